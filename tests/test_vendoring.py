"""A copy of dcp_filesystem/ vendored under another package name works and leaves no trace of its name."""
from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch
from helpers import REPO, assert_state_equal, dcp_save, run_clean_python

from dcp_filesystem import FileSystemWriter

FORBIDDEN = (b"dcp_filesystem", b"mypkg", b"dcpfs", b"_vendor")

SAVE_IN_VENDORED = """
import importlib.util, json, os, sys, warnings
warnings.simplefilter("ignore")
assert importlib.util.find_spec("dcp_filesystem") is None, "top-level dcp_filesystem must not be importable here"
import torch
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.filesystem as tfs
from helpers import dcp_save, probe_stock_torch

probe_stock_torch()  # its stock saves may set torch's lazy module attributes: before the snapshot

def snapshot(module):
    return {k: id(v) for k, v in vars(module).items()}

modules = [tfs, dcp, torch.distributed.checkpoint.storage, torch.distributed.checkpoint.metadata]
before = [snapshot(m) for m in modules]
writer_before = tfs.FileSystemWriter
reader_before = tfs.FileSystemReader
info_before = tfs._StorageInfo
info_state_before = dict(vars(tfs._StorageInfo))
loaded_before = set(sys.modules)

import mypkg._vendor.dcpfs as dcpfs

new_modules = sorted(set(sys.modules) - loaded_before)
foreign = [m for m in new_modules if not m.startswith("mypkg")
           and m.split(".")[0] in ("dcp_filesystem", "safetensors", "zstandard", "numpy")]
assert not foreign, foreign
assert "dcp_filesystem" not in sys.modules
assert [snapshot(m) for m in modules] == before, "importing the vendored copy changed torch's modules"
assert tfs.FileSystemWriter is writer_before and tfs.FileSystemReader is reader_before
assert tfs._StorageInfo is info_before and dict(vars(tfs._StorageInfo)) == info_state_before
assert dcpfs.FileSystemWriter is not tfs.FileSystemWriter
assert dcpfs.FileSystemWriter.__module__ == "mypkg._vendor.dcpfs.writer", dcpfs.FileSystemWriter.__module__
import logging
# Logs go to the vendored package's own logger, never to one named dcp_filesystem.
assert dcpfs.writer.logger is logging.getLogger("mypkg._vendor.dcpfs") is dcpfs.reader.logger
assert "dcp_filesystem" not in logging.root.manager.loggerDict

g = torch.Generator().manual_seed(7)
state = {
    "w": torch.randn(5, 3, generator=g),
    "h": torch.randn(4, generator=g).to(torch.bfloat16),
    "i": torch.arange(6, dtype=torch.int16).reshape(2, 3).t(),
    "nested": {"b": torch.randint(0, 2, (7,), generator=g).bool(), "l": [torch.tensor(1.5)]},
    "step": 9,
}
torch.save({"w": state["w"], "h": state["h"], "i": state["i"].contiguous(),
            "nested": state["nested"], "step": 9}, "expected.pt")
writer = dcpfs.FileSystemWriter("ckpt", thread_count=2)
dcp_save(state, writer)
assert "dcp_filesystem" not in sys.modules
assert [snapshot(m) for m in modules] == before, "saving with the vendored copy changed torch's modules"
print(json.dumps(new_modules))
"""

LOAD_IN_STOCK = """
import importlib.util, os, pickle, sys, warnings
warnings.simplefilter("ignore")
assert importlib.util.find_spec("dcp_filesystem") is None
assert importlib.util.find_spec("mypkg") is None
import torch
import torch.distributed.checkpoint as dcp
from helpers import dcp_load
from torch.distributed.checkpoint.filesystem import FileSystemReader, _StorageInfo
ckpt = {ckpt!r}
expected = torch.load({expected!r})
with open(os.path.join(ckpt, ".metadata"), "rb") as f:
    md = pickle.load(f)
assert set(type(v) for v in md.storage_data.values()) == {{_StorageInfo}}

def zeros(sd):
    if isinstance(sd, torch.Tensor):
        return torch.zeros(sd.shape, dtype=sd.dtype)
    if isinstance(sd, dict):
        return {{k: zeros(v) for k, v in sd.items()}}
    if isinstance(sd, list):
        return [zeros(v) for v in sd]
    return None

def same(e, a):
    if isinstance(e, torch.Tensor):
        assert a.dtype == e.dtype and a.shape == e.shape
        assert torch.equal(a.reshape(-1).view(torch.uint8), e.reshape(-1).view(torch.uint8))
    elif isinstance(e, dict):
        assert set(e) == set(a)
        for k in e:
            same(e[k], a[k])
    elif isinstance(e, list):
        assert len(e) == len(a)
        for x, y in zip(e, a):
            same(x, y)
    else:
        assert e == a, (e, a)

target = zeros(expected)
dcp_load(target, FileSystemReader(ckpt))
same(expected, target)
assert "dcp_filesystem" not in sys.modules and "mypkg" not in sys.modules
print("LOADED", len(md.storage_data))
"""


def _comparable(md):
    """Metadata with the per-save identity (save id, checkpoint path, load id) set aside."""
    if hasattr(md, "storage_meta"):
        md.storage_meta = None
    return md


@pytest.fixture(scope="module")
def vendored_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("vendoring")
    vendor = root / "mypkg" / "_vendor"
    shutil.copytree(
        os.path.join(REPO, "dcp_filesystem"), vendor / "dcpfs", ignore=shutil.ignore_patterns("__pycache__")
    )
    (root / "mypkg" / "__init__.py").write_text("")
    (vendor / "__init__.py").write_text("")
    out = run_clean_python(SAVE_IN_VENDORED, cwd=str(root))
    return root, json.loads(out.strip().splitlines()[-1])


def test_vendored_import_loads_only_its_own_modules(vendored_checkpoint):
    _, new_modules = vendored_checkpoint
    ours = [m for m in new_modules if m.startswith("mypkg")]
    assert "mypkg._vendor.dcpfs" in ours
    assert {"mypkg._vendor.dcpfs.writer", "mypkg._vendor.dcpfs.reader", "mypkg._vendor.dcpfs.fs"} <= set(ours)


def test_vendored_metadata_names_no_package(vendored_checkpoint):
    root, _ = vendored_checkpoint
    ckpt = root / "ckpt"
    names = sorted(os.listdir(ckpt))
    assert names == [".metadata", "__0_0.distcp", "__0_1.distcp"]
    raw = (ckpt / ".metadata").read_bytes()
    for word in FORBIDDEN:
        assert word not in raw, word
    for name in names:
        data = (ckpt / name).read_bytes()
        for word in (b"dcp_filesystem", b"mypkg", b"dcpfs"):
            assert word not in data, (name, word)


def test_vendored_metadata_equals_top_level(vendored_checkpoint, tmp_path):
    """The vendored copy writes the same metadata as the package itself (save id and path aside)."""
    root, _ = vendored_checkpoint
    g = torch.Generator().manual_seed(7)
    state = {
        "w": torch.randn(5, 3, generator=g),
        "h": torch.randn(4, generator=g).to(torch.bfloat16),
        "i": torch.arange(6, dtype=torch.int16).reshape(2, 3).t(),
        "nested": {"b": torch.randint(0, 2, (7,), generator=g).bool(), "l": [torch.tensor(1.5)]},
        "step": 9,
    }
    dcp_save(state, FileSystemWriter(tmp_path / "ckpt", thread_count=2))
    ours = _comparable(pickle.loads((tmp_path / "ckpt" / ".metadata").read_bytes()))
    vendored = _comparable(pickle.loads((root / "ckpt" / ".metadata").read_bytes()))
    assert vendored == ours
    # Same input in both processes (so equal metadata is meaningful).
    expected = torch.load(root / "expected.pt", weights_only=True)
    assert_state_equal(expected, dict(state, i=state["i"].contiguous()))


def test_vendored_checkpoint_loads_with_stock_torch(vendored_checkpoint, tmp_path):
    root, _ = vendored_checkpoint
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = LOAD_IN_STOCK.format(ckpt=str(root / "ckpt"), expected=str(root / "expected.pt"))
    out = run_clean_python(code, cwd=str(elsewhere))
    n_items = len(pickle.loads((root / "ckpt" / ".metadata").read_bytes()).storage_data)
    assert out.split() == ["LOADED", str(n_items)]

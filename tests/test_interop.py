"""Interoperability with stock torch.distributed.checkpoint, in processes that never import dcp_filesystem."""
from __future__ import annotations

import json
import pickle
import zlib

import pytest
import torch
import torch.distributed.checkpoint.filesystem as torch_fs
from helpers import (
    assert_state_equal,
    contiguous_state,
    dcp_load,
    dcp_save,
    run_clean_python,
    zeros_like_state,
)

from dcp_filesystem import FileSystemReader, FileSystemWriter, SerializationFormat, _compat

HAS_EXTENSION = _compat.torch_extension is not None
HAS_SERIALIZATION_FORMAT = _compat.TorchSerializationFormat is not None
needs_extension = pytest.mark.skipif(
    not HAS_EXTENSION, reason="this torch has no torch.distributed.checkpoint._extension (ZStandard)"
)
needs_serialization_format = pytest.mark.skipif(
    not HAS_SERIALIZATION_FORMAT, reason="this torch's FileSystemWriter has no SerializationFormat"
)

# Runs first in every clean subprocess: DCP entry points that work on torch 2.1 and later,
# and bit-exact comparison. Never imports dcp_filesystem, and proves it cannot.
PRELUDE = """
import importlib.util, os, pickle, sys, warnings
warnings.simplefilter("ignore")
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter, _StorageInfo
from helpers import dcp_load, dcp_save
assert importlib.util.find_spec("dcp_filesystem") is None, "dcp_filesystem is importable in the clean process"

def zeros(sd):
    if isinstance(sd, torch.Tensor):
        return torch.zeros(sd.shape, dtype=sd.dtype)
    if isinstance(sd, dict):
        return {k: zeros(v) for k, v in sd.items()}
    if isinstance(sd, list):
        return [zeros(v) for v in sd]
    return None

def check_same(expected, actual, path="state"):
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), path
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, (path, actual.dtype, actual.shape)
        e = expected.contiguous().reshape(-1).view(torch.uint8)
        a = actual.contiguous().reshape(-1).view(torch.uint8)
        assert torch.equal(a, e), path
    elif isinstance(expected, dict):
        assert set(actual) == set(expected), (path, set(actual), set(expected))
        for k in expected:
            check_same(expected[k], actual[k], path + "." + str(k))
    elif isinstance(expected, list):
        assert len(actual) == len(expected), path
        for i, (e, a) in enumerate(zip(expected, actual)):
            check_same(e, a, path + "[" + str(i) + "]")
    else:
        assert actual == expected, (path, actual, expected)
"""


def _state(contiguous_only=False):
    g = torch.Generator().manual_seed(20240601)
    f32 = torch.randn(6, 4, generator=g)
    f32[0, 0] = float("nan")
    f32[0, 1] = float("-inf")
    f32[0, 2] = -0.0
    state = {
        "model": {
            "weight": f32,
            "half": torch.randn(3, 5, generator=g).to(torch.float16),
            "bf16": torch.randn(8, generator=g).to(torch.bfloat16),
            "i8": torch.randint(-128, 128, (10,), generator=g, dtype=torch.int8),
            "i32": torch.randint(-(2**31), 2**31 - 1, (4, 2), generator=g, dtype=torch.int32),
            "i64": torch.tensor([-(2**63), 2**63 - 1, 7], dtype=torch.int64),
            "u8": torch.randint(0, 256, (5,), generator=g, dtype=torch.uint8),
            "mask": torch.randint(0, 2, (9,), generator=g).bool(),
            "scalar": torch.tensor(3.25),
            "empty": torch.empty(0, 3),
        },
        "layers": [torch.randn(2, 3, generator=g), {"bias": torch.randn(3, generator=g, dtype=torch.float64)}],
        "step": 42,
        "tag": "run-7",
    }
    if not contiguous_only:
        base = torch.arange(40, dtype=torch.float32).reshape(5, 8)
        state["model"]["transposed"] = base.t()
        state["model"]["strided"] = base[:, 1::3]
    return state


def _assert_metadata_is_torchs(ckpt, with_zstd):
    raw = (ckpt / ".metadata").read_bytes()
    assert b"dcp_filesystem" not in raw
    assert b"torch.distributed.checkpoint.filesystem" in raw and b"_StorageInfo" in raw
    md = pickle.loads(raw)
    assert md.storage_data
    data = {name: (ckpt / name).read_bytes() for name in {i.relative_path for i in md.storage_data.values()}}
    for info in md.storage_data.values():
        assert type(info) is torch_fs._StorageInfo
        # Ours: the CRC-32 of the item's stored bytes, an attribute stock torch never reads.
        assert info.crc32 == zlib.crc32(data[info.relative_path][info.offset : info.offset + info.length])
        if with_zstd:
            assert vars(info).keys() == {"relative_path", "offset", "length", "transform_descriptors", "crc32"}
            assert list(info.transform_descriptors) == ["stream.zstd/1"]
        else:
            # As upstream: the field is left out when there are no extensions, so old readers see what they know.
            assert vars(info).keys() == {"relative_path", "offset", "length", "crc32"}


# name -> (FileSystemWriter options, written with ZStandard)
OURS_TO_STOCK = {
    "torch_save": ({"thread_count": 1}, False),
    "torch_save-file-per-item": ({"thread_count": 2, "single_file_per_rank": False}, False),
    "torch_save-3-threads": ({"thread_count": 3, "sync_files": False}, False),
    "zstd": ({"thread_count": 2}, True),
}


@pytest.fixture(scope="module")
def ours_loaded_by_stock(tmp_path_factory):
    """Write every variant with this package, then load them all in ONE clean stock-torch process."""
    root = tmp_path_factory.mktemp("ours_to_stock")
    state = _state()
    torch.save(contiguous_state(state), root / "expected.pt")
    written = []
    for name, (options, with_zstd) in OURS_TO_STOCK.items():
        if with_zstd and not HAS_EXTENSION:
            continue
        options = dict(options)
        if with_zstd:
            from dcp_filesystem.transforms import ZStandard

            options["_extensions"] = [ZStandard()]
        dcp_save(state, FileSystemWriter(root / name, serialization_format=SerializationFormat.TORCH_SAVE, **options))
        written.append(name)
    out = run_clean_python(
        PRELUDE
        + f"""
import json, traceback
root = {str(root)!r}
expected = torch.load(os.path.join(root, "expected.pt"))
results = {{}}
for name in {written!r}:
    ckpt = os.path.join(root, name)
    try:
        with open(os.path.join(ckpt, ".metadata"), "rb") as f:
            md = pickle.load(f)
        kinds = set(type(v) for v in md.storage_data.values())
        assert kinds == {{_StorageInfo}}, kinds
        target = zeros(expected)
        dcp_load(target, FileSystemReader(ckpt))
        check_same(expected, target)
        results[name] = "ok " + str(len(md.storage_data))
    except BaseException as e:  # CheckpointException derives from BaseException
        results[name] = "error " + traceback.format_exc() + str(e)
assert "dcp_filesystem" not in sys.modules
print(json.dumps(results))
""",
        cwd=str(root),
    )
    return root, json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=needs_extension) if OURS_TO_STOCK[n][1] else n for n in OURS_TO_STOCK]
)
def test_ours_loads_with_stock_reader(ours_loaded_by_stock, name):
    root, results = ours_loaded_by_stock
    ckpt = root / name
    n_items = len(pickle.loads((ckpt / ".metadata").read_bytes()).storage_data)
    assert results[name] == f"ok {n_items}"
    _assert_metadata_is_torchs(ckpt, with_zstd=OURS_TO_STOCK[name][1])


_ZSTD = "__import__('torch.distributed.checkpoint._extension', fromlist=['ZStandard']).ZStandard()"
_ST = (
    "__import__('torch.distributed.checkpoint.filesystem', fromlist=['SerializationFormat'])"
    ".SerializationFormat.SAFETENSORS"
)
# name -> (stock FileSystemWriter expression, what this torch needs, contiguous tensors only)
STOCK_TO_OURS = {
    "torch_save": ("FileSystemWriter(ckpt)", None, False),
    "file-per-item": ("FileSystemWriter(ckpt, thread_count=3, single_file_per_rank=False)", None, False),
    "torch_save-2-threads": ("FileSystemWriter(ckpt, thread_count=2)", None, False),
    "zstd": (f"FileSystemWriter(ckpt, thread_count=2, _extensions=[{_ZSTD}])", "extension", False),
    # Stock SAFETENSORS mode rejects non-contiguous tensors: give it only contiguous ones.
    "safetensors": (f"FileSystemWriter(ckpt, serialization_format={_ST})", "format", True),
    "safetensors-2-threads": (f"FileSystemWriter(ckpt, thread_count=2, serialization_format={_ST})", "format", True),
}
_NEEDS = {
    "extension": (HAS_EXTENSION, needs_extension),
    "format": (HAS_SERIALIZATION_FORMAT, needs_serialization_format),
}


@pytest.fixture(scope="module")
def stock_written(tmp_path_factory):
    """Write every variant this torch supports with stock torch, in ONE clean process."""
    root = tmp_path_factory.mktemp("stock_to_ours")
    torch.save(_state(), root / "full.pt")
    torch.save(_state(contiguous_only=True), root / "contiguous.pt")
    jobs = [
        (name, expr, "contiguous.pt" if contiguous else "full.pt")
        for name, (expr, need, contiguous) in STOCK_TO_OURS.items()
        if need is None or _NEEDS[need][0]
    ]
    code = PRELUDE + f"""
import json, traceback
root = {str(root)!r}
results = {{}}
for name, expr, state_file in {jobs!r}:
    state = torch.load(os.path.join(root, state_file))
    ckpt = os.path.join(root, name)
    try:
        dcp_save(state, eval(expr))
        results[name] = "ok"
    except BaseException as e:  # CheckpointException derives from BaseException
        text = traceback.format_exc() + str(e)
        if "No module named 'numpy'" in text:
            results[name] = "numpy"
        else:
            results[name] = "error " + text
assert "dcp_filesystem" not in sys.modules
print(json.dumps(results))
"""
    out = run_clean_python(code, cwd=str(root))
    return root, json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=_NEEDS[need][1]) if need else n for n, (_, need, _) in STOCK_TO_OURS.items()],
)
def test_stock_checkpoint_loads_with_ours(stock_written, name):
    root, results = stock_written
    if results[name] == "numpy":
        pytest.skip("stock torch's SAFETENSORS writer needs numpy (safetensors.torch.save), absent here")
    assert results[name] == "ok"
    _, _, contiguous_only = STOCK_TO_OURS[name]
    state = _state(contiguous_only=contiguous_only)
    ckpt = root / name
    assert (ckpt / ".metadata").is_file()
    target = zeros_like_state(state)
    dcp_load(target, FileSystemReader(ckpt))
    assert_state_equal(contiguous_state(state), contiguous_state(target))
    assert target["step"] == 42 and target["tag"] == "run-7"


def test_stock_reader_in_same_process_reads_ours(tmp_path):
    """Also with this package imported: stock torch's reader follows the metadata our writer committed."""
    state = {"a": torch.arange(10, dtype=torch.int16), "b": {"c": torch.ones(2, 2, dtype=torch.bfloat16)}, "n": 5}
    ckpt = tmp_path / "ckpt"
    dcp_save(state, FileSystemWriter(ckpt, thread_count=2))
    target = zeros_like_state(state)
    dcp_load(target, torch_fs.FileSystemReader(str(ckpt)))
    assert_state_equal(state, target)

"""Which CRC-32 runs: zlib-ng (an install requirement) where installed, Python's zlib otherwise (a vendored copy),
with the same checksums and one INFO line that says what the slow one costs and how to get the fast one."""
import json
import os
import shutil
import zlib

import pytest
from helpers import REPO, run_clean_python

from dcp_filesystem import _crc

FALLBACK = """
import sys
sys.modules["zlib_ng"] = None  # as where zlib-ng is not installed
import json, logging, pickle, warnings, zlib
import torch
warnings.simplefilter("ignore")
from helpers import dcp_load, dcp_save
records = []
handler = logging.Handler()
handler.emit = records.append
logging.getLogger("yourpkg._vendor.dcp_filesystem").addHandler(handler)
logging.getLogger("yourpkg._vendor.dcp_filesystem").setLevel(logging.INFO)
from yourpkg._vendor.dcp_filesystem import FileSystemReader, FileSystemWriter, SerializationFormat, _crc
assert records == [], "importing logs nothing"
saved = {"w": torch.arange(300000.0), "b": torch.arange(7.0)}
for path in ("a", "b"):
    dcp_save(saved, FileSystemWriter(path, serialization_format=SerializationFormat.SAFETENSORS))  # same bytes
    loaded = {"w": torch.zeros(300000), "b": torch.zeros(7)}
    dcp_load(loaded, FileSystemReader(path))
    assert torch.equal(loaded["w"], saved["w"])
with open("a/.metadata", "rb") as f:
    crcs = sorted(info.crc32 for info in pickle.load(f).storage_data.values())
print(json.dumps({"implementation": _crc.IMPLEMENTATION, "crc32": _crc.crc32 is zlib.crc32, "crcs": crcs,
                  "log": [(r.levelname, r.name, r.getMessage()) for r in records]}))
"""


def vendored(tmp_path):
    vendor = tmp_path / "yourpkg" / "_vendor"
    shutil.copytree(os.path.join(REPO, "dcp_filesystem"), str(vendor / "dcp_filesystem"))
    (tmp_path / "yourpkg" / "__init__.py").write_text("")
    (vendor / "__init__.py").write_text("")


def test_zlib_ng_is_the_implementation_where_installed():
    zlib_ng = pytest.importorskip("zlib_ng.zlib_ng", reason="zlib-ng is an install requirement")
    assert _crc.FAST
    assert _crc.IMPLEMENTATION == f"zlib-ng {zlib_ng.ZLIBNG_RUNTIME_VERSION}"
    assert _crc.crc32 is zlib_ng.crc32 and _crc.crc32_combine is zlib_ng.crc32_combine


def test_without_zlib_ng_a_vendored_copy_works_with_the_same_checksums_and_says_so_once_at_info(tmp_path):
    vendored(tmp_path)
    out = json.loads(run_clean_python(FALLBACK, cwd=str(tmp_path)))
    assert out["implementation"] == f"zlib (Python's, {zlib.ZLIB_RUNTIME_VERSION})"
    assert out["crc32"] is True
    # Two writers and two readers: one line, at INFO, on the vendored package's logger.
    assert out["log"] == [[
        "INFO", "yourpkg._vendor.dcp_filesystem",
        f"CRC-32: zlib (Python's, {zlib.ZLIB_RUNTIME_VERSION}); the zlib-ng package is not installed: checksums "
        "use Python's zlib, about 6 times slower, which adds about 0.1 s per GB to a load (pip install zlib-ng, "
        "a requirement of dcp_filesystem, makes them run at memory speed)",
    ]]
    # The checksums any implementation records are zlib's CRC-32 of the same bytes.
    a, b = bytes(range(256)) * 4096, b"tail"
    assert _crc.crc32(a + b) == zlib.crc32(a + b)
    assert _crc.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)
    assert _crc._crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)
    assert len(out["crcs"]) == 2 and all(isinstance(c, int) for c in out["crcs"])


@pytest.mark.slow
def test_a_checkpoint_saved_with_python_zlib_has_the_checksums_zlib_ng_records(tmp_path):
    pytest.importorskip("zlib_ng.zlib_ng", reason="zlib-ng is an install requirement")
    vendored(tmp_path)
    slow = json.loads(run_clean_python(FALLBACK, cwd=str(tmp_path)))["crcs"]
    fast = json.loads(run_clean_python(FALLBACK.replace('sys.modules["zlib_ng"] = None', "pass"),
                                       cwd=str(tmp_path)))
    assert fast["log"] == [] and fast["implementation"] == _crc.IMPLEMENTATION
    assert fast["crcs"] == slow

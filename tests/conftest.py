import os
import sys

# Test the checkout itself, whatever is installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import contextlib  # noqa: E402

import pytest  # noqa: E402
from helpers import async_save_needs_process_group, one_rank_process_group  # noqa: E402

from dcp_filesystem import _compat, _data_file, _parallel  # noqa: E402

REAL_BYTES_PER_THREAD = _parallel._BYTES_PER_THREAD


@pytest.fixture(autouse=True)
def threads_even_for_small_checkpoints(monkeypatch):
    """Test checkpoints are small; without this, thread_count > 1 would run them on one thread
    (tests/test_threads.py checks that policy) and the threaded paths would go untested."""
    monkeypatch.setattr(_parallel, "_BYTES_PER_THREAD", 1)


@pytest.fixture(scope="module")
def bench():
    """benchmarks/bench.py, imported as a module."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    try:
        import bench
    finally:
        sys.path.pop(0)
    return bench


@pytest.fixture
def async_save_group():
    """Where dcp.async_save runs: skipped without it, in a one-rank process group where torch demands one (2.3)."""
    if not _compat.HAS_ASYNC_SAVE:
        pytest.skip("this torch has no torch.distributed.checkpoint.async_save")
    with one_rank_process_group() if async_save_needs_process_group() else contextlib.nullcontext():
        yield


@pytest.fixture
def data_file_reads(monkeypatch):
    """(offset, length) of each read a load makes of a data file, in order (every one goes through
    DataFile.readinto_with_crc)."""
    seen = []
    real = _data_file.DataFile.readinto_with_crc

    def readinto_with_crc(self, offset, view, with_crc):
        seen.append((offset, len(view)))
        return real(self, offset, view, with_crc)

    monkeypatch.setattr(_data_file.DataFile, "readinto_with_crc", readinto_with_crc)
    return seen

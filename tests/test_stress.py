"""Many saves in a row leave no open files or threads behind and every checkpoint exact."""
import os
import threading
import time

import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers import assert_state_equal, dcp_load, dcp_save

from dcp_filesystem import FileSystemReader, FileSystemWriter, SerializationFormat


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def resources():
    return open_fds(), threading.active_count()


def settled_resources(expected, seconds=5.0):
    """Resources once threads that were already finishing have exited (an executor's last thread may lag)."""
    deadline = time.monotonic() + seconds
    while resources() != expected and time.monotonic() < deadline:
        time.sleep(0.02)
    return resources()


def small_state(i, n=8):
    return dict({f"t{k}": torch.full((16, 16), float(i * 100 + k)) for k in range(n)}, step=i)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to count open files")
def test_fifty_async_saves_with_one_stager(tmp_path, async_save_group):
    writer = FileSystemWriter(tmp_path / "unused", cache_staged_state_dict=True, thread_count=2)
    baseline = resources()
    for i in range(50):
        future = dcp.async_save(small_state(i), storage_writer=writer, checkpoint_id=tmp_path / f"c{i}")
        future.result()
    assert settled_resources(baseline) == baseline
    for i in range(50):
        out = dict({f"t{k}": torch.zeros(16, 16) for k in range(8)}, step=-1)
        dcp_load(out, FileSystemReader(tmp_path / f"c{i}"))
        assert_state_equal(small_state(i), out, f"checkpoint {i}")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to count open files")
@pytest.mark.parametrize("fmt", [SerializationFormat.TORCH_SAVE, SerializationFormat.SAFETENSORS])
def test_ten_thousand_items_eight_threads(tmp_path, fmt):
    state = {f"layer{i}.w": torch.full((4,), float(i)) for i in range(10_000)}
    before = resources()
    dcp_save(state, FileSystemWriter(tmp_path / "c", thread_count=8, serialization_format=fmt))
    out = {k: torch.zeros(4) for k in state}
    dcp_load(out, FileSystemReader(tmp_path / "c", thread_count=8))
    assert settled_resources(before) == before
    assert_state_equal(state, out)
    assert len([p for p in os.listdir(tmp_path / "c") if p.endswith(".distcp")]) == 8

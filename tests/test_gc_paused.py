"""Saves and loads run the storage layer's calls with the cyclic garbage collector paused, and leave it
as they found it."""
import gc
import threading

import pytest
import torch
from helpers import dcp_load, dcp_save

from dcp_filesystem import FileSystemReader, FileSystemWriter, _commit, _load_items, _save_files
from dcp_filesystem._gc import gc_paused


@pytest.fixture
def gc_enabled():
    was = gc.isenabled()
    gc.enable()
    yield
    if not was:
        gc.disable()


@pytest.fixture
def gc_during_reads(monkeypatch):
    seen = []
    real = _load_items._read_item

    def spy(*args):
        seen.append(gc.isenabled())
        return real(*args)

    monkeypatch.setattr(_load_items, "_read_item", spy)
    return seen


@pytest.fixture
def gc_during_writes(monkeypatch):
    """Whether collection was enabled in each item write and in finish (when it builds the metadata)."""
    seen = []
    real_write, real_dump = _save_files._write_item, _commit.dump_metadata

    def spy_write(*args, **kwargs):
        seen.append(("write", gc.isenabled()))
        return real_write(*args, **kwargs)

    def spy_dump(*args, **kwargs):
        seen.append(("finish", gc.isenabled()))
        return real_dump(*args, **kwargs)

    monkeypatch.setattr(_save_files, "_write_item", spy_write)
    monkeypatch.setattr(_commit, "dump_metadata", spy_dump)
    return seen


def test_save_pauses_collection_and_restores_it(tmp_path, gc_enabled, gc_during_writes):
    dcp_save({"a": torch.arange(4), "b": torch.ones(3), "step": 3}, FileSystemWriter(tmp_path))
    assert sorted(gc_during_writes) == [("finish", False)] + [("write", False)] * 3
    assert gc.isenabled()


def test_save_leaves_collection_disabled_by_the_caller_disabled(tmp_path, gc_enabled):
    gc.disable()
    dcp_save({"a": torch.arange(4)}, FileSystemWriter(tmp_path))
    assert not gc.isenabled()


def test_failed_save_restores_collection(tmp_path, gc_enabled, monkeypatch):
    def fail(*args, **kwargs):
        assert not gc.isenabled()
        raise OSError("disk on fire")

    monkeypatch.setattr(_save_files, "_write_item", fail)
    with pytest.raises(BaseException, match="disk on fire"):
        dcp_save({"a": torch.arange(4)}, FileSystemWriter(tmp_path))
    assert gc.isenabled()


def test_load_pauses_collection_and_restores_it(tmp_path, gc_enabled, gc_during_reads):
    dcp_save({"a": torch.arange(4), "b": torch.ones(3)}, FileSystemWriter(tmp_path))
    dcp_load({"a": torch.zeros(4, dtype=torch.int64), "b": torch.zeros(3)}, FileSystemReader(tmp_path))
    assert gc_during_reads == [False, False]
    assert gc.isenabled()


def test_collection_disabled_by_the_caller_stays_disabled(tmp_path, gc_enabled):
    dcp_save({"a": torch.arange(4)}, FileSystemWriter(tmp_path))
    gc.disable()
    dcp_load({"a": torch.zeros(4, dtype=torch.int64)}, FileSystemReader(tmp_path))
    assert not gc.isenabled()


def test_failed_load_restores_collection(tmp_path, gc_enabled, gc_during_reads):
    dcp_save({"a": torch.arange(4)}, FileSystemWriter(tmp_path))
    (data_file,) = tmp_path.glob("*.distcp")
    data_file.write_bytes(data_file.read_bytes()[:10])
    with pytest.raises(BaseException, match="truncated or damaged checkpoint"):
        dcp_load({"a": torch.zeros(4, dtype=torch.int64)}, FileSystemReader(tmp_path))
    assert gc_during_reads == [False]
    assert gc.isenabled()


def test_overlapping_pauses_in_threads_resume_after_the_last(gc_enabled):
    inside, release = threading.Barrier(2), threading.Event()
    states = []

    def pause():
        with gc_paused():
            inside.wait()
            release.wait()

    other = threading.Thread(target=pause)
    other.start()
    with gc_paused():
        inside.wait()
        release.set()
        other.join()  # the other thread's pause ended first
        states.append(gc.isenabled())
    states.append(gc.isenabled())
    assert states == [False, True]

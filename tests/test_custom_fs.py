"""User-supplied FileSystemBase implementations, assigned as ``writer.fs`` / ``reader.fs``.

Upstream's fsspec classes plug in the same way.
"""
from __future__ import annotations

import os
import pickle
import warnings

import pytest
import torch
from fs_doubles import (
    AppendOnlyMemoryFS,
    ListingMemoryFS,
    MemoryFS,
    MemoryReader,
    MemoryWriter,
    RecordingFS,
    RefusingMemoryFS,
)
from helpers import assert_state_equal, dcp_load, dcp_save, zeros_like_state

from dcp_filesystem import FileSystem, FileSystemBase, FileSystemReader, FileSystemWriter, SerializationFormat
from dcp_filesystem.transforms import ZStandard

MODES = ["torch_save", "safetensors", "zstd"]
# dcp.save's own single-process notice (torch 2.2+) is not what these tests are about.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is unavailable:UserWarning")


def _writer_options(mode):
    if mode == "torch_save":
        return {"serialization_format": SerializationFormat.TORCH_SAVE}
    if mode == "safetensors":
        return {"serialization_format": SerializationFormat.SAFETENSORS}
    return {"serialization_format": SerializationFormat.TORCH_SAVE, "_extensions": [ZStandard()]}


def _state():
    g = torch.Generator().manual_seed(99)
    return {
        "w": torch.randn(6, 4, generator=g),
        "bf": torch.randn(5, generator=g).to(torch.bfloat16),
        "i": torch.randint(-100, 100, (3, 3), generator=g, dtype=torch.int32),
        "t": torch.arange(12, dtype=torch.float16).reshape(3, 4).t(),
        "nested": {"mask": torch.tensor([True, False, True]), "s": torch.tensor(7, dtype=torch.int64)},
        "step": 11,
        "name": "mem",
    }


def _contiguous(state):
    if isinstance(state, torch.Tensor):
        return state.contiguous()
    if isinstance(state, dict):
        return {k: _contiguous(v) for k, v in state.items()}
    return state


def _raw_save(state, writer):
    """dcp save without the helper's warning suppression, so warnings reach pytest."""
    return dcp_save(state, writer, quiet=False)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("thread_count", [1, 3])
def test_memory_fs_round_trip_touches_no_disk(tmp_path, monkeypatch, mode, thread_count):
    monkeypatch.chdir(tmp_path)
    fs = ListingMemoryFS()
    state = _state()
    dcp_save(state, MemoryWriter("memory://bucket/ckpt", fs, thread_count=thread_count, **_writer_options(mode)))
    assert os.listdir(tmp_path) == [], "the in-memory file system wrote to the local disk"

    data_files = sorted(k for k in fs.files if k.endswith(".distcp"))
    assert data_files == [f"memory://bucket/ckpt/__0_{i}.distcp" for i in range(thread_count)]
    assert sorted(fs.files) == sorted(data_files + ["memory://bucket/ckpt/.metadata"])
    assert ("rename", "memory://bucket/ckpt/.metadata.tmp", "memory://bucket/ckpt/.metadata") in fs.calls
    md = pickle.loads(fs.files["memory://bucket/ckpt/.metadata"])
    assert {i.relative_path for i in md.storage_data.values()} == {os.path.basename(f) for f in data_files}
    if mode == "safetensors":
        for f in data_files:
            assert fs.files[f][8:9] == b"{"  # a safetensors header
    elif mode == "torch_save":
        for f in data_files:
            assert fs.files[f][:4] == b"PK\x03\x04"

    fs.calls.clear()
    target = zeros_like_state(state)
    dcp_load(target, MemoryReader("memory://bucket/ckpt", fs))
    assert_state_equal(_contiguous(state), _contiguous(target))
    assert target["step"] == 11 and target["name"] == "mem"
    reads = sorted(c[1] for c in fs.calls if c[0] == "create_stream")
    assert all(c[2] == "rb" for c in fs.calls if c[0] == "create_stream")
    assert reads == sorted(data_files + ["memory://bucket/ckpt/.metadata"])
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("mode", MODES)
def test_memory_fs_assigned_after_construction(tmp_path, mode):
    """``writer.fs = MyFS()`` alone (path left as the writer made it) also routes all I/O through MyFS."""
    fs = ListingMemoryFS()
    ckpt = tmp_path / "ckpt"
    writer = FileSystemWriter(ckpt, **_writer_options(mode))
    writer.fs = fs
    state = _state()
    dcp_save(state, writer)
    assert not ckpt.exists() and os.listdir(tmp_path) == []
    assert f"{ckpt}/.metadata" in fs.files
    reader = FileSystemReader(ckpt)
    reader.fs = fs
    target = zeros_like_state(state)
    dcp_load(target, reader)
    assert_state_equal(_contiguous(state), _contiguous(target))


def test_memory_fs_overwrite_keeps_names_in_metadata(tmp_path):
    fs = ListingMemoryFS()
    dcp_save({"a": torch.arange(4), "b": torch.ones(3)}, MemoryWriter("memory://c", fs, single_file_per_rank=False))
    dcp_save({"a": torch.arange(4) * 3}, MemoryWriter("memory://c", fs))
    md = pickle.loads(fs.files["memory://c/.metadata"])
    (name,) = {i.relative_path for i in md.storage_data.values()}
    # Only the files the committed metadata names are left.
    assert sorted(fs.files) == sorted(["memory://c/.metadata", f"memory://c/{name}"])
    target = {"a": torch.zeros(4, dtype=torch.int64)}
    dcp_load(target, MemoryReader("memory://c", fs))
    assert torch.equal(target["a"], torch.arange(4) * 3)
    with pytest.raises(BaseException) as info:  # CheckpointException derives from BaseException
        dcp_save({"a": torch.arange(4)}, MemoryWriter("memory://c", fs, overwrite=False))
    assert "Checkpoint already exists" in str(info.value)


@pytest.mark.parametrize("mode", MODES)
def test_recording_fs_sees_all_io(tmp_path, mode):
    fs = RecordingFS()
    ckpt = tmp_path / "ckpt"
    writer = FileSystemWriter(ckpt, thread_count=2, **_writer_options(mode))
    writer.fs = fs
    state = _state()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _raw_save(state, writer)
    assert not [w for w in caught if "file descriptor" in str(w.message)]  # real files have one

    on_disk = sorted(os.listdir(ckpt))
    assert on_disk == [".metadata", "__0_0.distcp", "__0_1.distcp"]
    written = sorted(c[1] for c in fs.calls if c[0] == "create_stream")
    assert written == [".metadata.tmp", "__0_0.distcp", "__0_1.distcp"]
    assert all(c[2] == "wb" for c in fs.calls if c[0] == "create_stream")
    assert ("rename", ".metadata.tmp", ".metadata") in fs.calls
    assert ("mkdir", str(ckpt)) in fs.calls

    fs.calls.clear()
    reader = FileSystemReader(ckpt)
    reader.fs = fs
    target = zeros_like_state(state)
    dcp_load(target, reader)
    assert_state_equal(_contiguous(state), _contiguous(target))
    assert sorted(c[1:] for c in fs.calls) == [(".metadata", "rb"), ("__0_0.distcp", "rb"), ("__0_1.distcp", "rb")]


def test_stream_without_fileno_warns_under_sync_files():
    fs = ListingMemoryFS()
    with pytest.warns(UserWarning, match="no file descriptor") as record:
        _raw_save({"x": torch.arange(5)}, MemoryWriter("memory://w", fs, sync_files=True))
    messages = [str(w.message) for w in record if "no file descriptor" in str(w.message)]
    assert len(messages) == 2, messages  # the data file and the metadata file
    assert all("BytesIO" in m for m in messages)
    target = {"x": torch.zeros(5, dtype=torch.int64)}
    dcp_load(target, MemoryReader("memory://w", fs))
    assert torch.equal(target["x"], torch.arange(5))


def test_stream_without_fileno_no_warning_without_sync_files():
    fs = ListingMemoryFS()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _raw_save({"x": torch.arange(5)}, MemoryWriter("memory://w", fs, sync_files=False))
    assert not [w for w in caught if "file descriptor" in str(w.message)]
    assert sorted(fs.files) == ["memory://w/.metadata", "memory://w/__0_0.distcp"]


@pytest.mark.parametrize("mode", MODES)
def test_bare_write_stream_without_fileno(mode):
    fs = AppendOnlyMemoryFS()
    state = _state()
    with pytest.warns(UserWarning, match="no file descriptor"):
        _raw_save(state, MemoryWriter("memory://bare", fs, **_writer_options(mode)))
    target = zeros_like_state(state)
    dcp_load(target, MemoryReader("memory://bare", fs))
    assert_state_equal(_contiguous(state), _contiguous(target))


def test_file_system_capabilities_have_object_store_defaults():
    base = MemoryFS()
    assert (base.ls("memory://c"), base.local_path("memory://c")) == (None, None)
    assert FileSystemBase.sync_dir(base, "memory://c") is None
    assert FileSystem().local_path("/x/y") == "/x/y"


def _overwrite(fs, **options):
    dcp_save({"a": torch.arange(4)}, MemoryWriter("memory://c", fs, **options))
    first = set(fs.files)
    fs.calls.clear()
    dcp_save({"a": torch.arange(4) * 2}, MemoryWriter("memory://c", fs, **options))
    target = {"a": torch.zeros(4, dtype=torch.int64)}
    dcp_load(target, MemoryReader("memory://c", fs))
    assert torch.equal(target["a"], torch.arange(4) * 2)
    return first, [c for c in fs.calls if c[0] in ("rm_file", "rename", "rename refused", "sync_dir")]


def test_without_listing_the_replaced_metadata_names_the_files_to_remove():
    # Cannot list (an object store): the earlier .metadata is read before it is replaced, and the
    # data files it named are removed once the new one is in place; the rename replaces it in one step.
    fs = MemoryFS()
    first, calls = _overwrite(fs)
    (new_data,) = set(fs.files) - first
    assert sorted(fs.files) == ["memory://c/.metadata", new_data]
    assert calls == [
        ("rename", "memory://c/.metadata.tmp", "memory://c/.metadata"),
        ("sync_dir", "memory://c"),
        ("rm_file", "memory://c/__0_0.distcp"),
    ]
    old_read = fs.calls.index(("create_stream", "memory://c/.metadata", "rb"))
    assert old_read < fs.calls.index(("rename", "memory://c/.metadata.tmp", "memory://c/.metadata"))


def test_a_rename_that_refuses_an_existing_file_removes_the_old_metadata_first():
    fs = RefusingMemoryFS()
    _, calls = _overwrite(fs)
    assert calls == [
        ("rename refused", "memory://c/.metadata.tmp", "memory://c/.metadata"),
        ("rm_file", "memory://c/.metadata"),
        ("rename", "memory://c/.metadata.tmp", "memory://c/.metadata"),
        ("sync_dir", "memory://c"),
        ("rm_file", "memory://c/__0_0.distcp"),
    ]


def test_a_listing_file_system_removes_what_the_listing_finds():
    fs = ListingMemoryFS()
    _overwrite(fs, single_file_per_rank=False)
    renames = [c for c in fs.calls if c[0] in ("rm_file", "rename")]
    # Replaced in one step: the old metadata is never removed first; the listing finds the stale file.
    assert renames == [("rename", "memory://c/.metadata.tmp", "memory://c/.metadata"),
                       ("rm_file", "memory://c/__0_0.distcp")]

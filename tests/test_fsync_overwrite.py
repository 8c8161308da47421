"""Durability (torch 2.15 fsync semantics) and overwrite rules of FileSystemWriter."""

from __future__ import annotations

import io
import os
import pickle
import sys
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

import helpers
import pytest
import torch
from fs_doubles import MemoryFS, MemoryReader, MemoryWriter
from helpers import assert_state_equal, dcp_load, dcp_save
from torch.distributed.checkpoint.planner import SavePlan

import dcp_filesystem.fs as fs_module
from dcp_filesystem import FileSystem, FileSystemReader, FileSystemWriter, SerializationFormat

FORMATS = [SerializationFormat.TORCH_SAVE, SerializationFormat.SAFETENSORS]


def _state(scale=1):
    return {
        "w": torch.arange(24, dtype=torch.float32).reshape(4, 6) * scale,
        "b": torch.arange(7, dtype=torch.int64) * scale,
        "h": (torch.arange(10, dtype=torch.float32) / 3 * scale).to(torch.bfloat16),
        "step": 10 * scale,
    }


def _load(path, expected):
    target = {k: (torch.zeros_like(v) if isinstance(v, torch.Tensor) else None) for k, v in expected.items()}
    dcp_load(target, FileSystemReader(path))
    assert_state_equal(expected, target)


def _save_with_warnings(state, writer):
    """Like helpers.dcp_save, but returns the warnings raised (helpers.dcp_save silences them)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dcp_save(state, writer, quiet=False)
    return caught


def _root_cause(exc):
    """The exception a rank raised, out of torch's CheckpointException wrapper if there is one."""
    failures = getattr(exc, "failures", None)
    if failures:
        (wrapped,) = failures.values()
        return wrapped[0] if isinstance(wrapped, tuple) else wrapped
    return exc


def _save_error(state, writer):
    with pytest.raises(BaseException) as info:  # CheckpointException derives from BaseException
        dcp_save(state, writer)
    return _root_cause(info.value)


def _snapshot(path):
    """Every file under path: relative name -> (bytes, mtime_ns, inode)."""
    snap = {}
    for root, _, files in os.walk(str(path)):
        for name in files:
            full = os.path.join(root, name)
            st = os.stat(full)
            with open(full, "rb") as f:
                snap[os.path.relpath(full, str(path))] = (f.read(), st.st_mtime_ns, st.st_ino)
    return snap


# --------------------------------------------------------------------------- fsync order


class _Recorder:
    def __init__(self):
        self.events = []
        self.size_at_fsync = {}
        self.lock = threading.Lock()

    def add(self, *event):
        with self.lock:
            self.events.append(event)

    def index(self, event):
        return self.events.index(event)


def _fd_path(fd):
    return os.path.realpath(os.readlink(f"/proc/self/fd/{fd}"))


@pytest.fixture
def recorder(monkeypatch):
    """Records flush/fsync/close of written files, os.replace and FileSystem.sync_dir, in call order."""
    rec = _Recorder()
    real_fsync = os.fsync
    real_replace = os.replace
    real_sync_dir = FileSystem.sync_dir
    real_create_stream = FileSystem.create_stream

    class RecordingWriter(io.BufferedWriter):
        def __init__(self, path):
            super().__init__(io.FileIO(str(path), "wb"))
            self._rec_path = os.path.realpath(str(path))
            self._closing = False

        def flush(self):
            if not self._closing and not self.closed:
                rec.add("flush", self._rec_path)
            return super().flush()

        def close(self):
            if not self.closed:
                rec.add("close", self._rec_path)
                self._closing = True
            return super().close()

    @contextmanager
    def create_stream(self, path, mode):
        if mode != "wb":
            with real_create_stream(self, path, mode) as stream:
                yield stream
            return
        stream = RecordingWriter(path)
        try:
            yield stream
        finally:
            stream.close()

    def fsync(fd):
        rec.size_at_fsync[_fd_path(fd)] = os.fstat(fd).st_size
        rec.add("fsync", _fd_path(fd))
        return real_fsync(fd)

    def replace(src, dst):
        rec.add("replace", os.path.realpath(str(src)), os.path.realpath(str(dst)))
        return real_replace(src, dst)

    def sync_dir(self, path):
        rec.add("sync_dir", os.path.realpath(str(path)))
        return real_sync_dir(self, path)

    def no_os_sync():
        raise AssertionError("os.sync() must never be called")

    monkeypatch.setattr(FileSystem, "create_stream", create_stream)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "sync", no_os_sync, raising=False)
    monkeypatch.setattr(FileSystem, "sync_dir", sync_dir)
    return rec


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
@pytest.mark.parametrize("thread_count", [1, 3])
def test_sync_files_order(tmp_path, recorder, fmt, thread_count):
    path = tmp_path / "ckpt"
    state = _state()
    dcp_save(state, FileSystemWriter(path, thread_count=thread_count, serialization_format=fmt))
    ckpt = os.path.realpath(str(path))
    data = sorted(os.path.join(ckpt, f"__0_{i}.distcp") for i in range(thread_count))
    tmp = os.path.join(ckpt, ".metadata.tmp")
    final = os.path.join(ckpt, ".metadata")
    assert sorted(os.listdir(ckpt)) == sorted([".metadata"] + [os.path.basename(d) for d in data])

    ev = recorder.events
    # Every written file: flushed (torch.save may flush too), then fsynced once, then closed once.
    for f in data + [tmp]:
        kinds = [e[0] for e in ev if e[1:] == (f,)]
        assert kinds[-3:] == ["flush", "fsync", "close"], (f, kinds)
        assert set(kinds[:-3]) <= {"flush"}, (f, kinds)
    # What fsync made durable is the whole file: every byte was flushed to the OS before it.
    for f in data:
        assert recorder.size_at_fsync[f] == os.path.getsize(f) > 0
    assert recorder.size_at_fsync[tmp] == os.path.getsize(final) > 0
    # Nothing else is fsynced but the checkpoint directory, once, by sync_dir.
    fsynced = sorted(e[1] for e in ev if e[0] == "fsync")
    assert fsynced == sorted(data + [tmp, ckpt])
    assert [e for e in ev if e[0] == "replace"] == [("replace", tmp, final)]
    assert [e for e in ev if e[0] == "sync_dir"] == [("sync_dir", ckpt)]

    last_data_fsync = max(recorder.index(("fsync", d)) for d in data)
    metadata_fsync = recorder.index(("fsync", tmp))
    replace = recorder.index(("replace", tmp, final))
    dir_sync = recorder.index(("sync_dir", ckpt))
    assert last_data_fsync < metadata_fsync < recorder.index(("close", tmp)) < replace < dir_sync
    assert recorder.index(("fsync", ckpt)) == dir_sync + 1  # sync_dir fsyncs the directory itself
    _load(path, _state())


def test_no_sync_files_means_no_fsync(tmp_path, recorder):
    path = tmp_path / "ckpt"
    dcp_save(_state(), FileSystemWriter(path, sync_files=False, thread_count=2))
    ev = recorder.events
    assert [e for e in ev if e[0] in ("fsync", "sync_dir")] == []
    ckpt = os.path.realpath(str(path))
    # Still committed atomically through the temp file.
    assert [e for e in ev if e[0] == "replace"] == [
        ("replace", os.path.join(ckpt, ".metadata.tmp"), os.path.join(ckpt, ".metadata"))
    ]
    assert sorted(os.listdir(ckpt)) == [".metadata", "__0_0.distcp", "__0_1.distcp"]
    _load(path, _state())


# --------------------------------------------------------------------------- streams without a file descriptor


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
def test_stream_without_fileno_warns_and_never_os_syncs(monkeypatch, fmt):
    def fail(*args):
        raise AssertionError(f"must not be called: {args}")

    monkeypatch.setattr(os, "sync", fail, raising=False)
    monkeypatch.setattr(os, "fsync", fail)
    memfs = MemoryFS()
    writer = MemoryWriter("mem", memfs, thread_count=2, sync_files=True, serialization_format=fmt)
    state = _state()
    caught = _save_with_warnings(state, writer)
    ours = [w for w in caught if "no file descriptor" in str(w.message)]
    assert sorted(memfs.files) == ["mem/.metadata", "mem/__0_0.distcp", "mem/__0_1.distcp"]
    assert len(ours) == 3  # two data files and the metadata file
    for w in ours:
        assert w.category is UserWarning
        assert "BytesIO" in str(w.message) and "sync_files=True" in str(w.message)

    reader = MemoryReader("mem", memfs)
    target = {k: (torch.zeros_like(v) if isinstance(v, torch.Tensor) else None) for k, v in state.items()}
    dcp_load(target, reader)
    assert_state_equal(_state(), target)


def test_fsync_stream_flushes_before_fsync(monkeypatch, tmp_path):
    calls = []

    class Stream(io.BufferedWriter):
        def flush(self):
            calls.append("flush")
            return super().flush()

    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(("fsync", _fd_path(fd))))
    target = tmp_path / "f"
    with Stream(io.FileIO(str(target), "wb")) as stream:
        stream.write(b"abc")
        fs_module.fsync_stream(stream)
        assert calls == ["flush", ("fsync", os.path.realpath(str(target)))]
        assert target.read_bytes() == b"abc"  # the flush reached the file before fsync

    with pytest.warns(UserWarning, match="BytesIO has no file descriptor to fsync"):
        fs_module.fsync_stream(io.BytesIO())


# --------------------------------------------------------------------------- overwrite rules


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
def test_overwrite_false_raises_before_touching_anything(tmp_path, fmt):
    path = tmp_path / "ckpt"
    dcp_save(_state(), FileSystemWriter(path, serialization_format=fmt))
    before = _snapshot(path)
    assert sorted(before) == [".metadata", "__0_0.distcp"]

    err = _save_error(_state(2), FileSystemWriter(path, overwrite=False, serialization_format=fmt))
    assert type(err) is RuntimeError
    assert str(path) in str(err) and "overwrite" in str(err)
    assert str(err) == f"Checkpoint already exists in {path} and self.overwrite=False."
    assert _snapshot(path) == before
    _load(path, _state())


def test_overwrite_false_on_fresh_or_missing_directory_saves(tmp_path):
    path = tmp_path / "new" / "ckpt"
    dcp_save(_state(), FileSystemWriter(path, overwrite=False))
    assert sorted(os.listdir(path)) == [".metadata", "__0_0.distcp"]
    _load(path, _state())


def test_overwrite_true_warns_and_loads_new_data(tmp_path):
    path = tmp_path / "ckpt"
    dcp_save(_state(), FileSystemWriter(path))
    writer = FileSystemWriter(path, overwrite=True)
    caught = _save_with_warnings(_state(3), writer)
    ours = [w for w in caught if "Detected an existing checkpoint" in str(w.message)]
    assert len(ours) == 1
    assert ours[0].category is UserWarning
    # What this package does, not upstream's outdated "Past version 2.5 ... will default to False".
    assert str(ours[0].message) == (
        f"Detected an existing checkpoint in {path}, overwriting since self.overwrite=True. The old checkpoint "
        "stays loadable until the new .metadata replaces it; then the data files only the old one named are "
        "removed. Pass overwrite=False to raise instead."
    )
    # Attributed to the line that called dcp.save (helpers._call), not to contextlib, torch or this package.
    assert ours[0].filename == helpers._call.__code__.co_filename
    assert ours[0].lineno == helpers._call.__code__.co_firstlineno + 1
    _load(path, _state(3))


def test_overwrite_warning_points_at_a_direct_caller_of_the_writer(tmp_path):
    path = tmp_path / "ckpt"
    dcp_save(_state(), FileSystemWriter(path))
    writer = FileSystemWriter(path)
    writer.set_up_storage_writer(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = sys._getframe().f_lineno + 1
        writer.prepare_local_plan(SavePlan([]))
    (warning,) = [w for w in caught if "Detected an existing checkpoint" in str(w.message)]
    assert (warning.filename, warning.lineno) == (__file__, line)


def test_first_save_does_not_warn(tmp_path):
    caught = _save_with_warnings(_state(), FileSystemWriter(tmp_path / "ckpt"))
    assert [w for w in caught if "Detected an existing checkpoint" in str(w.message)] == []


def _referenced(path):
    with open(os.path.join(str(path), ".metadata"), "rb") as f:
        md = pickle.load(f)
    return sorted({info.relative_path for info in md.storage_data.values()})


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
def test_overwrite_in_place_renames_then_cleans_up(tmp_path, monkeypatch, fmt):
    path = tmp_path / "ckpt"
    dcp_save(_state(1), FileSystemWriter(path, serialization_format=fmt))
    assert sorted(os.listdir(path)) == [".metadata", "__0_0.distcp"]
    old_bytes = (path / "__0_0.distcp").read_bytes()

    # Second save: the committed file keeps its name until the new metadata replaces it.
    events = []
    real_rm = FileSystem.rm_file
    real_replace = os.replace
    real_sync_dir = FileSystem.sync_dir

    def rm_file(self, p):
        events.append(("rm", os.path.basename(str(p)), sorted(os.listdir(path))))
        return real_rm(self, p)

    def replace(src, dst):
        # At commit time the old file is still there, intact.
        events.append(("replace", os.path.basename(str(src)), os.path.basename(str(dst))))
        assert (path / "__0_0.distcp").read_bytes() == old_bytes
        return real_replace(src, dst)

    def sync_dir(self, p):
        events.append(("sync_dir",))
        return real_sync_dir(self, p)

    monkeypatch.setattr(FileSystem, "rm_file", rm_file)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(FileSystem, "sync_dir", sync_dir)
    writer = FileSystemWriter(path, serialization_format=fmt)
    dcp_save(_state(2), writer)
    new_name = f"__0_0.{writer.save_id[:8]}.distcp"
    assert all(c in "0123456789abcdef" for c in writer.save_id[:8])
    assert events == [
        ("replace", ".metadata.tmp", ".metadata"),
        ("sync_dir",),
        # The save lock is given back once the replaced files are gone.
        ("rm", "__0_0.distcp", sorted([".metadata", ".metadata.lock", "__0_0.distcp", new_name])),
    ]
    assert sorted(os.listdir(path)) == sorted([".metadata", new_name])
    assert _referenced(path) == [new_name]
    _load(path, _state(2))
    monkeypatch.undo()

    # Third save: the plain name is free again.
    dcp_save(_state(3), FileSystemWriter(path, serialization_format=fmt))
    assert sorted(os.listdir(path)) == [".metadata", "__0_0.distcp"]
    assert _referenced(path) == ["__0_0.distcp"]
    _load(path, _state(3))


def test_overwrite_in_place_many_files_and_foreign_files_kept(tmp_path):
    path = tmp_path / "ckpt"
    dcp_save(_state(1), FileSystemWriter(path, thread_count=2))
    (path / "notes.txt").write_bytes(b"keep me")
    (path / "__0_0.distcp.bak").write_bytes(b"not a data file name")
    writer = FileSystemWriter(path, thread_count=2)
    dcp_save(_state(5), writer)
    tag = writer.save_id[:8]
    assert sorted(os.listdir(path)) == sorted(
        [".metadata", f"__0_0.{tag}.distcp", f"__0_1.{tag}.distcp", "notes.txt", "__0_0.distcp.bak"]
    )
    assert (path / "notes.txt").read_bytes() == b"keep me"
    _load(path, _state(5))


@pytest.mark.parametrize("overwrite", [True, False])
def test_path_is_a_regular_file(tmp_path, overwrite):
    path = tmp_path / "ckpt"
    path.write_bytes(b"precious")
    before = _snapshot(tmp_path)
    err = _save_error(_state(), FileSystemWriter(path, overwrite=overwrite))
    assert type(err) is NotADirectoryError
    assert str(path) in str(err)
    assert str(err) == f"checkpoint path {path} exists and is not a directory"
    assert _snapshot(tmp_path) == before
    assert Path(path).read_bytes() == b"precious"


@pytest.mark.parametrize("exists", [True, False], ids=["existing-dir", "new-dir"])
def test_directory_not_writable(tmp_path, monkeypatch, exists):
    parent = tmp_path / "readonly"
    parent.mkdir()
    path = parent / "ckpt"
    if exists:
        path.mkdir()
    denied = path if exists else parent
    if os.geteuid() == 0:  # root writes anywhere: stand in for a read-only directory
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != denied and real_access(p, mode))
    else:
        denied.chmod(0o555)
    try:
        before = _snapshot(tmp_path)
        err = _save_error(_state(), FileSystemWriter(path))
        assert type(err) is PermissionError
        assert str(err) == f"cannot write checkpoint {path}: directory {denied} is not writable"
        assert _snapshot(tmp_path) == before
        assert path.exists() == exists
    finally:
        denied.chmod(0o755)

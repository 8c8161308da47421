"""A save that fails leaves nothing behind, keeps the committed checkpoint, and says what went wrong.

``FaultFS`` wraps the local file system and fails the N-th ``open``, ``write``,
``fsync``, ``rename`` or ``rm_file`` of a save; the sweep runs every N of an
overwrite with two data files, in both formats.
"""
from __future__ import annotations

import errno
import gc
import logging
import os
import re
import shutil
import signal
import threading
import time
from contextlib import contextmanager

import pytest
import torch
from fs_doubles import LocalFS
from helpers import assert_state_equal, coordinator_save_planner, dcp_load, dcp_save, raised_error, zeros_like_state
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

from dcp_filesystem import FileSystemReader, FileSystemWriter, SerializationFormat

FORMATS = [SerializationFormat.TORCH_SAVE, SerializationFormat.SAFETENSORS]
KINDS = ("open", "write", "fsync", "rename", "rm_file")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class _Stream:
    """A stream of FaultFS: every write call is counted (and may fail after writing half its bytes)."""

    def __init__(self, stream, fs, path):
        self._stream, self._fs, self._path = stream, fs, path

    def write(self, data):
        if self._fs.hit("write", self._path):
            view = memoryview(data).cast("B")
            self._stream.write(view[: len(view) // 2])
            self._fs.fail("write", self._path)
        return self._stream.write(data)

    def __getattr__(self, name):
        return getattr(self._stream, name)


class FaultFS(LocalFS):
    """The local file system, failing the ``fail_at``-th operation of kind ``fail_kind`` with EIO.

    Counts ``open`` (every ``create_stream``), ``write`` (every write call on its
    streams), ``fsync`` (of its streams' descriptors, through :meth:`fsync_hook`,
    and ``sync_dir``), ``rename`` and ``rm_file``; ``log`` records every operation
    in order. ``fail_every_rm`` makes every ``rm_file`` fail as well; ``no_space`` fails with ENOSPC.
    """

    def __init__(self, fail_kind=None, fail_at=0, fail_every_rm=False, replaces=True, no_space=False):
        super().__init__()
        self.fail_kind, self.fail_at, self.fail_every_rm, self.replaces = fail_kind, fail_at, fail_every_rm, replaces
        self.no_space = no_space
        self.counts = dict.fromkeys(KINDS, 0)
        self.failed = None  # (kind, path, mode) of the injected fault
        self.log = []
        self._fds = {}
        self._lock = threading.Lock()

    def hit(self, kind, path, mode=None):
        with self._lock:
            self.counts[kind] += 1
            self.log.append((kind, os.path.basename(str(path)), mode))
            if kind == self.fail_kind and self.counts[kind] == self.fail_at:
                self.failed = (kind, str(path), mode)
                return True
        return False

    def fail(self, kind, path):
        if self.no_space:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise OSError(errno.EIO, f"injected {kind} fault")

    def _tick(self, kind, path, mode=None):
        if self.hit(kind, path, mode):
            self.fail(kind, path)

    @contextmanager
    def create_stream(self, path, mode):
        self._tick("open", path, mode)
        with self.inner.create_stream(path, mode) as stream:
            fd = stream.fileno()
            self._fds[fd] = path
            try:
                yield _Stream(stream, self, path) if "w" in mode else stream
            finally:
                self._fds.pop(fd, None)

    def fsync_hook(self, real_fsync):
        def fsync(fd):
            path = self._fds.get(fd)
            if path is not None:
                self._tick("fsync", path)
            return real_fsync(fd)

        return fsync

    def sync_dir(self, path):
        self._tick("fsync", path)
        self.inner.sync_dir(path)

    def rename(self, path, new_path):
        self._tick("rename", path)
        if not self.replaces and os.path.exists(new_path):
            raise FileExistsError(errno.EEXIST, "this file system's rename keeps an existing file", str(new_path))
        self.inner.rename(path, new_path)

    def rm_file(self, path):
        self._tick("rm_file", path)
        if self.fail_every_rm:
            raise OSError(errno.EACCES, "injected: every removal fails")
        self.inner.rm_file(path)

    def ls(self, path):
        return self.inner.ls(path)

    def local_path(self, path):
        return self.inner.local_path(path)

    def before_first_write(self, kind):
        """Operations of ``kind`` logged before the first file was opened for writing."""
        first = next(i for i, (k, _, mode) in enumerate(self.log) if k == "open" and mode == "wb")
        return [name for k, name, _ in self.log[:first] if k == kind]


def state_of(generation):
    """Four small tensors of three dtypes and a non-tensor value, all depending on ``generation``."""
    g = torch.Generator().manual_seed(generation)
    return {
        "w": torch.randn(16, 16, generator=g),
        "v": torch.randn(40, generator=g).to(torch.bfloat16),
        "ids": torch.randint(-1000, 1000, (6, 5), generator=g, dtype=torch.int64),
        "bias": torch.randn(7, generator=g),
        "step": generation,
    }


def writer(path, fmt, fs=None, **kwargs):
    w = FileSystemWriter(path, thread_count=2, serialization_format=fmt, **kwargs)
    if fs is not None:
        w.fs = fs
    return w


def loaded(path):
    out = zeros_like_state(state_of(0))
    out["step"] = -1
    dcp_load(out, FileSystemReader(path))
    return out


def files_of(path):
    return {name: (path / name).read_bytes() for name in sorted(os.listdir(path))}


def committed_files(path):
    md = FileSystemReader(path).read_metadata()
    return sorted({info.relative_path for info in md.storage_data.values()} | {".metadata"})


def save_with(fs, path, fmt, state, monkeypatch):
    """One save through ``fs``; returns the exception it raised, or None."""
    monkeypatch.setattr(os, "fsync", fs.fsync_hook(os.fsync))
    try:
        dcp_save(state, writer(path, fmt, fs))
    except BaseException as e:  # CheckpointException derives from BaseException
        return e
    finally:
        monkeypatch.undo()
    return None


@pytest.fixture(scope="module")
def committed(tmp_path_factory):
    """Per format: a committed two-file checkpoint of generation 1 and its files' bytes."""
    out = {}
    for fmt in FORMATS:
        path = tmp_path_factory.mktemp(f"old_{fmt.value}")
        dcp_save(state_of(1), writer(path, fmt))
        assert sorted(os.listdir(path)) == [".metadata", "__0_0.distcp", "__0_1.distcp"]
        out[fmt] = (path, files_of(path))
    return out


def check_point(kind, n, fmt, path, old_files, error, fs, caplog):
    """The invariants after a save of generation 2 whose ``n``-th ``kind`` failed."""
    assert fs.failed is not None and fs.failed[0] == kind, (kind, n, fs.failed)
    _, failed_path, mode = fs.failed
    failed_name = os.path.basename(failed_path)
    if kind == "rm_file" or (kind == "open" and mode == "rb"):
        # Removing an earlier save's file after the commit, or reading the committed metadata to
        # reclaim leftovers: the save does not need either, so it succeeds and logs the failure.
        assert error is None, (kind, n, error)
        assert_state_equal(state_of(2), loaded(path))
        assert f"injected {kind} fault" in caplog.text and failed_name in caplog.text
        return "succeeded"
    assert error is not None, (kind, n)
    cause = raised_error(error)
    assert type(cause) is OSError and cause.errno == errno.EIO, repr(cause)
    if kind == "fsync" and failed_name == path.name:
        # The directory's fsync, after the new metadata was renamed into place: the new checkpoint
        # is the committed one, and the earlier save's data files are kept in case the rename is lost.
        assert (
            f"[Errno 5] injected fsync fault (syncing the directory after {path / '.metadata'} was replaced: "
            "the new checkpoint is in place but may not survive a power loss, so the earlier data files "
            f"were kept): '{path}'"
        ) in str(error)
        assert_state_equal(state_of(2), loaded(path))
        assert set(old_files) - {".metadata"} < set(os.listdir(path))
        return "committed, then failed"
    if kind == "rename":
        assert f"[Errno 5] injected rename fault: '{path / '.metadata.tmp'}' -> '{path / '.metadata'}'" in str(error)
    else:
        assert f"[Errno 5] injected {kind} fault: '{failed_path}'" in str(error)
    # The committed checkpoint is untouched, byte for byte, and nothing of the failed save is left.
    assert files_of(path) == old_files
    assert_state_equal(state_of(1), loaded(path))
    return "failed"


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
def test_every_fault_of_an_overwrite_keeps_the_old_checkpoint_and_leaves_nothing(
    tmp_path, committed, fmt, monkeypatch, caplog
):
    caplog.set_level(logging.WARNING, logger="dcp_filesystem")
    template, old_files = committed[fmt]
    counting = FaultFS()
    path = tmp_path / "count"
    shutil.copytree(template, path)
    assert save_with(counting, path, fmt, state_of(2), monkeypatch) is None
    counts = dict(counting.counts)
    # Two data files and the metadata: opened, written, fsynced; the directory fsynced; one rename;
    # the two earlier data files removed after the commit.
    assert counts["open"] == 4 and counts["fsync"] == 4 and counts["rename"] == 1 and counts["rm_file"] == 2
    # Small items reach the file system together: at least one write per data file and the metadata.
    assert counts["write"] >= 3, counts

    outcomes = {}
    for kind in KINDS:
        for n in range(1, counts[kind] + 1):
            path = tmp_path / f"{kind}{n}"
            shutil.copytree(template, path)
            caplog.clear()
            fs = FaultFS(kind, n)
            error = save_with(fs, path, fmt, state_of(2), monkeypatch)
            outcome = check_point(kind, n, fmt, path, old_files, error, fs, caplog)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            # A retry succeeds, and afterwards the directory holds exactly the new checkpoint.
            dcp_save(state_of(2), writer(path, fmt))
            assert sorted(os.listdir(path)) == committed_files(path)
            assert_state_equal(state_of(2), loaded(path))
            shutil.rmtree(path)
    points = sum(counts.values())
    assert outcomes == {"failed": points - 4, "succeeded": 3, "committed, then failed": 1}, outcomes
    print(f"\nfault sweep {fmt.value}: {points} points {counts}: {outcomes}")


def test_a_failing_removal_is_logged_and_never_masks_the_error(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="dcp_filesystem")
    fmt = SerializationFormat.TORCH_SAVE
    path = tmp_path / "c"
    dcp_save(state_of(1), writer(path, fmt))
    old_files = files_of(path)
    fs = FaultFS("write", 1, fail_every_rm=True)  # a data file's (the metadata is written last)
    error = save_with(fs, path, fmt, state_of(2), monkeypatch)
    assert f"[Errno 5] injected write fault: '{fs.failed[1]}'" in str(error)
    left = sorted(set(os.listdir(path)) - set(old_files))
    assert left and all(name.startswith("__0_") for name in left)
    for name in left:
        assert f"could not remove {path / name} (written by a failed save): PermissionError: " in caplog.text
    assert_state_equal(state_of(1), loaded(path))
    # The next save reclaims what could not be removed.
    dcp_save(state_of(2), writer(path, fmt))
    assert sorted(os.listdir(path)) == committed_files(path)


def test_no_room_for_the_metadata_says_what_the_whole_save_needed(tmp_path, monkeypatch):
    fmt = SerializationFormat.TORCH_SAVE
    path = tmp_path / "c"
    dcp_save(state_of(1), writer(path, fmt))
    old_files = files_of(path)
    counting = FaultFS()
    assert save_with(counting, tmp_path / "count", fmt, state_of(2), monkeypatch) is None
    fs = FaultFS("write", counting.counts["write"], no_space=True)  # the last write: the metadata's
    error = save_with(fs, path, fmt, state_of(2), monkeypatch)
    assert os.path.basename(fs.failed[1]) == ".metadata.tmp"
    assert files_of(path) == old_files
    st = os.statvfs(path)
    # What the save needed: its data files (torch.save archives, one after another) and the metadata,
    # as many bytes as the same save takes when it succeeds.
    dcp_save(state_of(2), writer(path, fmt))
    needed = sum(os.path.getsize(path / name) for name in committed_files(path))
    match = re.search(
        r"\[Errno 28\] No space left on device \(this save needs at least (\d+) bytes; "
        rf"(\d+) bytes are free in {re.escape(str(path))}\): '{re.escape(str(path / '.metadata.tmp'))}'",
        str(error),
    )
    assert match, str(error)
    # The same save again: its archives' random serialization ids give other checksums, which
    # pickle in 2 to 5 bytes each.
    items = len(FileSystemReader(path).read_metadata().storage_data)
    assert abs(int(match.group(1)) - needed) <= 3 * items, (match.group(1), needed)
    # The disk is shared with other processes: its free space moves a little between the two readings.
    assert abs(int(match.group(2)) - st.f_bavail * st.f_frsize) < 256 << 20


class _InterruptingPlanner(DefaultSavePlanner):
    """Sends SIGINT to the main thread while a writer thread resolves its first tensor (after a pause,
    so the main thread has written its own file and waits for the thread)."""

    def __init__(self):
        super().__init__()
        self.fired = False

    def resolve_data(self, write_item):
        if not self.fired and threading.current_thread() is not threading.main_thread():
            self.fired = True
            time.sleep(0.3)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        return super().resolve_data(write_item)


@pytest.fixture
def sigint_raises():
    """SIGINT raises KeyboardInterrupt, as at a terminal, also where this run was started in the
    background (which ignores SIGINT)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs signal.pthread_kill")
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
def test_ctrl_c_during_a_save_removes_its_files(tmp_path, fmt, sigint_raises):
    path = tmp_path / "c"
    dcp_save(state_of(1), writer(path, fmt))
    old_files = files_of(path)
    planner = _InterruptingPlanner()
    with pytest.raises(BaseException) as info:
        dcp_save(state_of(2), writer(path, fmt), planner=planner)
    assert planner.fired
    assert type(raised_error(info.value)) is KeyboardInterrupt
    assert files_of(path) == old_files
    assert_state_equal(state_of(1), loaded(path))


class _RenameThenFail(FaultFS):
    def rename(self, path, new_path):
        self.inner.rename(path, new_path)
        raise OSError(errno.EIO, "injected: the rename took place, then its reply was lost")


def test_a_rename_that_took_place_keeps_the_new_checkpoint(tmp_path, monkeypatch):
    fmt = SerializationFormat.SAFETENSORS
    path = tmp_path / "c"
    dcp_save(state_of(1), writer(path, fmt))
    error = save_with(_RenameThenFail(), path, fmt, state_of(2), monkeypatch)
    assert (
        f"[Errno 5] injected: the rename took place, then its reply was lost (the new checkpoint's "
        f"{path / '.metadata'} is in place nonetheless): '{path / '.metadata.tmp'}' -> '{path / '.metadata'}'"
    ) in str(error)
    assert_state_equal(state_of(2), loaded(path))
    # Its data files are kept, as are the earlier save's (removed by the next save).
    assert sorted(os.listdir(path)) == sorted(committed_files(path) + ["__0_0.distcp", "__0_1.distcp"])
    dcp_save(state_of(3), writer(path, fmt))
    assert sorted(os.listdir(path)) == committed_files(path)


def test_a_failed_rename_after_the_old_metadata_went_keeps_the_new_files(tmp_path, monkeypatch):
    # A file system whose rename refuses an existing file: the old .metadata is removed, then the
    # rename is tried again. If that fails, neither checkpoint is in place; the new one's files are
    # kept for recovery.
    fmt = SerializationFormat.TORCH_SAVE
    path = tmp_path / "c"
    dcp_save(state_of(1), writer(path, fmt))
    fs = FaultFS("rename", 2, replaces=False)
    error = save_with(fs, path, fmt, state_of(2), monkeypatch)
    assert (
        f"(the earlier {path / '.metadata'} was already removed (this file system cannot replace a file on "
        f"rename); {path / '.metadata.tmp'} holds the new checkpoint's metadata: rename it to use that checkpoint)"
    ) in str(error)
    assert not (path / ".metadata").exists()
    os.replace(path / ".metadata.tmp", path / ".metadata")
    assert_state_equal(state_of(2), loaded(path))


# --------------------------------------------------------------------------- leftovers of killed saves


def plant_leftovers(path):
    """What killed saves leave: rank 0's data files under a save id and under a plain name, another
    rank's data file, and a file that is not DCP's."""
    data = (path / "__0_0.distcp").read_bytes()
    for name in ("__0_0.0badc0de.distcp", "__0_7.distcp", "__1_0.0badc0de.distcp"):
        (path / name).write_bytes(data)
    (path / "notes.txt").write_text("not a checkpoint file")


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
def test_the_next_save_reclaims_its_ranks_leftovers_before_it_writes(tmp_path, fmt, monkeypatch):
    path = tmp_path / "c"
    dcp_save(state_of(1), writer(path, fmt))
    plant_leftovers(path)
    fs = FaultFS()
    assert save_with(fs, path, fmt, state_of(2), monkeypatch) is None
    # Before its first write, rank 0 removed its own leftovers, never another rank's.
    assert fs.before_first_write("rm_file") == ["__0_0.0badc0de.distcp", "__0_7.distcp"]
    # After the commit the coordinator removed the earlier save's files and the other rank's leftover.
    assert sorted(os.listdir(path)) == sorted(committed_files(path) + ["notes.txt"])
    assert_state_equal(state_of(2), loaded(path))


def test_nothing_is_reclaimed_where_the_metadata_cannot_be_read(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="dcp_filesystem")
    fmt = SerializationFormat.TORCH_SAVE
    path = tmp_path / "c"
    dcp_save(state_of(1), writer(path, fmt))
    plant_leftovers(path)
    (path / ".metadata").write_bytes(b"\x80\x04not a pickle")
    fs = FaultFS()
    assert save_with(fs, path, fmt, state_of(2), monkeypatch) is None
    assert fs.before_first_write("rm_file") == []
    assert f"not reclaiming leftovers in {path}: cannot read {path / '.metadata'}: UnpicklingError" in caplog.text
    assert sorted(os.listdir(path)) == sorted(committed_files(path) + ["notes.txt"])


def _write_without_commit(w, state):
    """write_data of a one-rank save, without finish (a save still running)."""
    planner = coordinator_save_planner(state, w)
    w.set_up_storage_writer(True)
    local = w.prepare_local_plan(planner.create_local_plan())
    plans, _ = planner.create_global_plan([local])
    plan = planner.finish_plan(w.prepare_global_plan(plans)[0])
    w.write_data(plan, planner).wait()


class _ListingLocalFS(LocalFS):
    """A file system without a local path (so without the save lock, as an object store) that can list."""

    def ls(self, path):
        return self.inner.ls(path)


@pytest.mark.parametrize("locked", [True, False], ids=["local", "no-lock"])
def test_files_a_save_in_this_process_may_still_commit_are_never_reclaimed(tmp_path, locked):
    fmt = SerializationFormat.TORCH_SAVE
    path = tmp_path / "c"

    def new_writer():
        w = writer(path, fmt)
        if not locked:
            w.fs = _ListingLocalFS()
        return w

    dcp_save(state_of(1), new_writer())
    running = new_writer()
    _write_without_commit(running, state_of(5))
    lock = [".metadata.lock"] if locked else []
    its_files = sorted(set(os.listdir(path)) - {".metadata", "__0_0.distcp", "__0_1.distcp", *lock})
    assert its_files == [f"__0_{i}.{running.save_id[:8]}.distcp" for i in range(2)]
    if locked:
        # The running save holds the directory's save lock: a second save stops before touching anything.
        with pytest.raises(BaseException, match="another save into it is in progress"):
            dcp_save(state_of(2), new_writer())
        assert sorted(os.listdir(path)) == sorted(committed_files(path) + its_files + lock)
    else:
        dcp_save(state_of(2), new_writer())
        # Neither the second save's reclaim nor its commit touched the running save's files.
        assert sorted(os.listdir(path)) == sorted(committed_files(path) + its_files)
    del running
    gc.collect()
    dcp_save(state_of(3), new_writer())  # abandoned now: reclaimed
    assert sorted(os.listdir(path)) == committed_files(path)
    assert_state_equal(state_of(3), loaded(path))

"""Two saves into one directory at once: it always loads as exactly one committed save, and a save that
cannot keep that promise raises before it touches anything (dcp_filesystem/_save_lock.py)."""
import contextlib
import functools
import multiprocessing
import os
import threading
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers import async_save_needs_process_group, dcp_load, dcp_save, one_rank_process_group

from dcp_filesystem import FileSystem, FileSystemReader, FileSystemWriter, SerializationFormat, _compat, _save_lock

FORMATS = [SerializationFormat.TORCH_SAVE, SerializationFormat.SAFETENSORS]
BUSY = "another save into it is in progress"
fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork to start savers without re-importing torch")


def state_of(generation):
    """Every value holds the generation, so a mix of two saves shows in any of them."""
    state = {f"w{i}": torch.full((64, 64), float(generation)) for i in range(3)}
    state.update({f"b{i}": torch.full((8,), float(generation)) for i in range(4)})
    state["step"] = generation
    return state


def generation_on_disk(path):
    """The one generation the directory loads (None where it has no checkpoint); fails on a mix."""
    if not os.path.exists(os.path.join(path, ".metadata")):
        return None
    out = {k: (torch.zeros_like(v) if isinstance(v, torch.Tensor) else -1) for k, v in state_of(0).items()}
    dcp_load(out, FileSystemReader(path))
    generations = {int(v.unique().item()) for v in out.values() if isinstance(v, torch.Tensor)} | {out["step"]}
    assert len(generations) == 1, f"mixed checkpoint: generations {sorted(generations)}"
    return generations.pop()


def assert_clean(path):
    """Nothing but the committed checkpoint's files: no leftovers, no lock file."""
    md = FileSystemReader(path).read_metadata()
    named = {info.relative_path for info in md.storage_data.values()}
    assert sorted(os.listdir(path)) == sorted(named | {".metadata"})


class PausingFileSystem(FileSystem):
    """The local file system, counting its calls; the ``pause_at``-th waits until ``resume`` is set."""

    def __init__(self, pause_at=None):
        self.calls = []
        self.pause_at = pause_at
        self.paused = threading.Event()
        self.resume = threading.Event()

    def _step(self, name, path):
        self.calls.append(f"{name} {os.path.basename(str(path))}")
        if len(self.calls) == self.pause_at:
            self.paused.set()
            assert self.resume.wait(60), "never resumed"

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        self._step(f"create_stream({mode})", path)
        with super().create_stream(path, mode) as stream:
            yield stream

    def rename(self, path, new_path):
        self._step("rename", path)
        super().rename(path, new_path)

    def mkdir(self, path):
        self._step("mkdir", path)
        super().mkdir(path)

    def exists(self, path):
        self._step("exists", path)
        return super().exists(path)

    def rm_file(self, path):
        self._step("rm_file", path)
        super().rm_file(path)

    def ls(self, path):
        self._step("ls", path)
        return super().ls(path)


def pausing_writer(path, fmt, pause_at=None):
    writer = FileSystemWriter(path, serialization_format=fmt)
    writer.fs = PausingFileSystem(pause_at)
    return writer


def outcome(save):
    """'ok', or 'busy' for the clear refusal; any other error fails the test."""
    try:
        save()
        return "ok"
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        if BUSY in str(e):
            return "busy"
        raise


def steps_of_a_save(tmp_path, fmt, committed):
    path = tmp_path / "count"
    if committed:
        dcp_save(state_of(1), FileSystemWriter(path, serialization_format=fmt))
    writer = pausing_writer(path, fmt)
    dcp_save(state_of(2), writer)
    return writer.fs.calls


def in_thread(save, result, key):
    thread = threading.Thread(target=lambda: result.update({key: outcome(save)}))
    thread.start()
    return thread


@pytest.mark.parametrize("committed", [False, True], ids=["empty", "over-committed"])
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
def test_each_step_of_a_save_against_a_whole_second_save(tmp_path, fmt, committed):
    """Save A stops at each of its file-system steps in turn; save B runs from start to end meanwhile."""
    steps = steps_of_a_save(tmp_path, fmt, committed)
    assert any(s.startswith("rename .metadata") for s in steps) and len(steps) >= 5, steps
    outcomes = set()
    for step in range(1, len(steps) + 1):
        where = (step, steps[step - 1])
        path = tmp_path / f"step{step}"
        previous = None
        if committed:
            dcp_save(state_of(1), FileSystemWriter(path, serialization_format=fmt))
            previous = 1
        writer_a = pausing_writer(path, fmt, step)
        result = {}
        thread = in_thread(functools.partial(dcp_save, state_of(2), writer_a), result, "a")
        assert writer_a.fs.paused.wait(60), where
        during = generation_on_disk(path)
        assert during in (previous, 2), (where, during)  # 2: A's commit is in place already
        b = outcome(functools.partial(dcp_save, state_of(3), FileSystemWriter(path, serialization_format=fmt)))
        assert generation_on_disk(path) == (3 if b == "ok" else during), (where, b)
        writer_a.fs.resume.set()
        thread.join(60)
        assert result == {"a": "ok"}, where
        # A committed last: the directory is A's, whole, and holds nothing else.
        assert generation_on_disk(path) == 2, (where, b)
        assert_clean(path)
        outcomes.add(b)
        dcp_save(state_of(4), FileSystemWriter(path, serialization_format=fmt))
        assert generation_on_disk(path) == 4
        assert_clean(path)
    # B ran to its end where A had not taken the lock yet, and was refused where A held it.
    assert outcomes == {"ok", "busy"}


def test_each_step_of_a_save_against_each_step_of_another(tmp_path):
    """A stops at step i; B runs until its step j and stops there; A runs to its end; then B does."""
    fmt = SerializationFormat.TORCH_SAVE
    steps = steps_of_a_save(tmp_path, fmt, committed=True)
    seen = set()
    for i in range(1, len(steps) + 1):
        for j in range(1, len(steps) + 1):
            path = tmp_path / f"a{i}b{j}"
            dcp_save(state_of(1), FileSystemWriter(path))
            writer_a, writer_b = pausing_writer(path, fmt, i), pausing_writer(path, fmt, j)
            result = {}
            a = in_thread(functools.partial(dcp_save, state_of(2), writer_a), result, "a")
            assert writer_a.fs.paused.wait(60)
            b = in_thread(functools.partial(dcp_save, state_of(3), writer_b), result, "b")
            while b.is_alive() and not writer_b.fs.paused.is_set():
                b.join(0.02)
            before = generation_on_disk(path)
            writer_a.fs.resume.set()
            a.join(60)
            assert generation_on_disk(path) in (before, 2)
            writer_b.fs.resume.set()
            b.join(60)
            committed = [g for g, key in ((2, "a"), (3, "b")) if result[key] == "ok"]
            assert committed, result
            assert generation_on_disk(path) in committed, (i, j, result)
            assert_clean(path)
            seen.add(tuple(sorted(result.values())))
    assert ("busy", "ok") in seen and ("ok", "ok") in seen, seen


def _save_together(start, result, name, path, generation, fmt):
    start.wait()
    writer = FileSystemWriter(path, serialization_format=fmt)
    result[name] = outcome(functools.partial(dcp_save, state_of(generation), writer))


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
def test_saves_started_together_in_threads(tmp_path, fmt):
    path = tmp_path / "c"
    for round_ in range(25):
        start = threading.Barrier(2)
        result = {}
        generations = {"a": 2 * round_ + 1, "b": 2 * round_ + 2}
        threads = [
            threading.Thread(target=_save_together, args=(start, result, name, path, generation, fmt))
            for name, generation in generations.items()
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        winners = {generations[name] for name, r in result.items() if r == "ok"}
        assert winners and len(result) == 2, result
        assert generation_on_disk(path) in winners
        assert_clean(path)


def _save_in_child(path, generation, fmt_value, results):
    torch.set_num_threads(1)
    try:
        writer = FileSystemWriter(path, serialization_format=SerializationFormat(fmt_value))
        results.put((generation, outcome(lambda: dcp_save(state_of(generation), writer))))
    except BaseException as e:
        results.put((generation, f"{type(e).__name__}: {e}"))
    results.close()
    results.join_thread()  # what put() handed to the queue's thread is sent before the exit
    os._exit(0)


@fork
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
def test_saves_started_together_in_processes(tmp_path, fmt):
    ctx = multiprocessing.get_context("fork")
    path = str(tmp_path / "c")
    for round_ in range(12):
        results = ctx.Queue()
        generations = (2 * round_ + 1, 2 * round_ + 2)
        children = [ctx.Process(target=_save_in_child, args=(path, g, fmt.value, results)) for g in generations]
        for child in children:
            child.start()
        got = dict(results.get(timeout=120) for _ in children)
        for child in children:
            child.join(60)
        assert set(got.values()) <= {"ok", "busy"}, got
        winners = {g for g, r in got.items() if r == "ok"}
        assert winners, got
        assert generation_on_disk(path) in winners
        assert_clean(path)


def test_async_save_overlapping_a_blocking_save(tmp_path):
    if not _compat.HAS_ASYNC_SAVE:
        pytest.skip("this torch has no torch.distributed.checkpoint.async_save")
    path = tmp_path / "c"
    dcp_save(state_of(1), FileSystemWriter(path))
    steps = steps_of_a_save(tmp_path, SerializationFormat.TORCH_SAVE, committed=True)
    first_data_file = 1 + next(n for n, s in enumerate(steps) if s.startswith("create_stream(wb) __0_0"))
    writer_a = pausing_writer(path, SerializationFormat.TORCH_SAVE, first_data_file)
    group = one_rank_process_group() if async_save_needs_process_group() else contextlib.nullcontext()
    with group, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        future = dcp.async_save(state_of(2), checkpoint_id=path, storage_writer=writer_a)
        assert writer_a.fs.paused.wait(60)
        with pytest.raises(BaseException) as refused:
            dcp_save(state_of(3), FileSystemWriter(path))
        lock = path / ".metadata.lock"
        assert f"cannot save to {path}: {BUSY} ({lock} is held by another writer of this process" in str(
            refused.value
        )
        assert generation_on_disk(path) == 1
        writer_a.fs.resume.set()
        future.result(timeout=60)
    assert generation_on_disk(path) == 2
    assert_clean(path)


def _hold_lock_forever(path, ready):
    writer = FileSystemWriter(path)
    _save_lock.acquire(writer, writer.fs, writer.path, None)
    ready.set()
    threading.Event().wait()


@fork
def test_a_killed_holder_leaves_a_lock_file_that_the_next_save_takes(tmp_path):
    path = tmp_path / "c"
    dcp_save(state_of(1), FileSystemWriter(path))
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    child = ctx.Process(target=_hold_lock_forever, args=(str(path), ready))
    child.start()
    assert ready.wait(60)
    with pytest.raises(BaseException, match=f"is held by pid {child.pid} on host "):
        dcp_save(state_of(2), FileSystemWriter(path))
    child.kill()
    child.join(30)
    assert (path / ".metadata.lock").exists()
    dcp_save(state_of(3), FileSystemWriter(path))
    assert generation_on_disk(path) == 3
    assert_clean(path)


class FullDisk(FileSystem):
    @contextlib.contextmanager
    def create_stream(self, path, mode):
        if mode == "wb" and str(path).endswith(".distcp"):
            raise OSError(28, "No space left on device")
        with super().create_stream(path, mode) as stream:
            yield stream


def test_a_failed_save_gives_the_lock_back(tmp_path):
    path = tmp_path / "c"
    dcp_save(state_of(1), FileSystemWriter(path))
    writer = FileSystemWriter(path)
    writer.fs = FullDisk()
    with pytest.raises(BaseException, match="No space left on device"):
        dcp_save(state_of(2), writer)
    # The failed writer is still referenced: its lock went back all the same.
    dcp_save(state_of(3), FileSystemWriter(path))
    assert generation_on_disk(path) == 3
    assert_clean(path)


def test_where_flock_is_missing_saves_go_on_with_one_warning(tmp_path, monkeypatch):
    fcntl = pytest.importorskip("fcntl", reason="flock is POSIX")

    def no_locks(fd, operation):
        raise OSError(37, "No locks available")  # ENOLCK, as an NFS mount with nolock answers

    monkeypatch.setattr(fcntl, "flock", no_locks)
    monkeypatch.setattr(_save_lock, "_warned", False)
    path = tmp_path / "c"
    with pytest.warns(UserWarning, match=r"cannot lock .*\.metadata\.lock \(No locks available\): saves into "):
        dcp_save(state_of(1), FileSystemWriter(path), quiet=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dcp_save(state_of(2), FileSystemWriter(path), quiet=False)
    assert not [w for w in caught if "cannot lock" in str(w.message)]
    assert generation_on_disk(path) == 2
    assert_clean(path)

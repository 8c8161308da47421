"""thread_count > 1 uses threads only where the files hold enough bytes to be worth them."""
import threading

import pytest
import torch
from conftest import REAL_BYTES_PER_THREAD
from helpers import assert_state_equal, dcp_load, dcp_save, raised_error, zeros_like_state

from dcp_filesystem import FileSystemReader, FileSystemWriter, _data_file, _load_items, _parallel, _save_files, reader

MiB = 1 << 20


@pytest.fixture
def real_policy(monkeypatch):
    monkeypatch.setattr(_parallel, "_BYTES_PER_THREAD", REAL_BYTES_PER_THREAD)


@pytest.fixture
def threads_started(monkeypatch):
    """How many threads (the calling one included) each save and load ran its files on, by job name."""
    started = {}
    real_run = _parallel.run_in_threads

    def run_in_threads(tasks, name, stop=None):
        started.setdefault(name, []).append(len(tasks))
        return real_run(tasks, name, stop)

    monkeypatch.setattr(_parallel, "run_in_threads", run_in_threads)  # for_each, the reader's
    monkeypatch.setattr(_save_files, "run_in_threads", run_in_threads)
    return started


@pytest.fixture
def threads_used(monkeypatch):
    """The names of the threads that wrote data files and that read them."""
    used = {"write": set(), "read": set()}
    real_write, real_open = _save_files._write_one_file, _data_file.DataFile.__init__

    def write_one_file(*args):
        used["write"].add(threading.current_thread().name)
        return real_write(*args)

    def open_data_file(self, *args):
        used["read"].add(threading.current_thread().name)
        real_open(self, *args)

    monkeypatch.setattr(_save_files, "_write_one_file", write_one_file)
    monkeypatch.setattr(_data_file.DataFile, "__init__", open_data_file)
    return used


def test_worker_count(real_policy):
    count = _parallel.worker_count
    assert count(4, 4, 0) == 1
    assert count(4, 4, REAL_BYTES_PER_THREAD - 1) == 1
    assert count(4, 4, 2 * REAL_BYTES_PER_THREAD) == 2
    assert count(4, 3, 100 * REAL_BYTES_PER_THREAD) == 3
    assert count(2, 8, 100 * REAL_BYTES_PER_THREAD) == 2
    assert count(1, 8, 100 * REAL_BYTES_PER_THREAD) == 1


@pytest.mark.parametrize("sync_files", [True, False])
def test_small_checkpoint_is_written_and_read_on_the_calling_thread(tmp_path, real_policy, threads_used, sync_files):
    state = {f"t{i}": torch.randn(16) for i in range(50)}
    dcp_save(state, FileSystemWriter(tmp_path, thread_count=2, sync_files=sync_files))
    out = zeros_like_state(state)
    dcp_load(out, FileSystemReader(tmp_path, thread_count=2))
    assert_state_equal(state, out)
    assert len(list(tmp_path.glob("*.distcp"))) == 2  # the file layout still follows thread_count
    assert threads_used == {"write": {threading.current_thread().name}, "read": {threading.current_thread().name}}


def test_large_checkpoint_uses_every_thread(tmp_path, real_policy, threads_started):
    state = {f"w{i}": torch.randn(4 * MiB) for i in range(4)}  # 4 x 16 MiB
    dcp_save(state, FileSystemWriter(tmp_path, thread_count=2))
    out = zeros_like_state(state)
    dcp_load(out, FileSystemReader(tmp_path, thread_count=2))
    assert_state_equal(state, out)
    # Two files on two threads each way (which thread takes which file is the scheduler's choice).
    assert (threads_started["writer"], threads_started["reader"]) == ([2], [2])


def test_many_synced_files_use_threads_for_their_fsyncs(tmp_path, real_policy, threads_started, threads_used):
    state = {f"t{i}": torch.randn(16) for i in range(40)}  # 40 files, one fsync each
    dcp_save(state, FileSystemWriter(tmp_path, thread_count=2, single_file_per_rank=False))
    assert threads_started["writer"] == [2]
    out = zeros_like_state(state)
    dcp_load(out, FileSystemReader(tmp_path, thread_count=2))
    assert_state_equal(state, out)
    assert threads_started["reader"] == [1]
    assert threads_used["read"] == {threading.current_thread().name}


def test_ctrl_c_while_threads_start_waits_for_the_started_ones(monkeypatch):
    """Ctrl-C can land inside Thread.start(); the threads started by then use the caller's buffers, so the
    interrupt reaches the caller only once they have finished."""
    import time

    finished = []

    def task(i):
        def run():
            time.sleep(0.2)
            finished.append(i)
        return run

    real_start = threading.Thread.start
    started = []

    def start(thread):
        real_start(thread)
        started.append(thread)
        if len(started) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(threading.Thread, "start", start)
    stopped = []
    with pytest.raises(KeyboardInterrupt):
        _parallel.run_in_threads([task(i) for i in range(4)], "test", stop=lambda: stopped.append(True))
    assert sorted(finished) == [1, 2]  # task 3 never started, task 0 (the calling thread's) never ran
    assert stopped == [True]


@pytest.fixture
def two_cores(monkeypatch):
    """Two cores, 64 KiB parts (a read of 128 KiB and up is split across them), no accelerator started;
    records the thread that resolves each tensor, every positioned read of a part, by offset, and the items
    handed to each side-by-side job with its thread count (which thread takes which item is the
    scheduler's choice: on a busy machine one thread may take them all)."""
    monkeypatch.setattr(_parallel, "_cores", lambda: 2)
    monkeypatch.setattr(_parallel, "_PART_BYTES", 64 << 10)
    monkeypatch.setattr(reader._compat, "accelerator_started", lambda: False)
    seen = {"resolved": {}, "committed": [], "parts": [], "side_by_side": []}
    real_range, real_for_each = _parallel._pread_range, _load_items.for_each

    def for_each(items, work, threads, name):
        if name == "items":
            seen["side_by_side"].append(([item.req.storage_index.fqn for item in items], threads))
        real_for_each(items, work, threads, name)

    monkeypatch.setattr(_load_items, "for_each", for_each)

    def pread_range(fd, offset, view, with_crc):
        seen["parts"].append((offset, len(view)))
        return real_range(fd, offset, view, with_crc)

    monkeypatch.setattr(_parallel, "_pread_range", pread_range)
    return seen


def recording_planner(seen):
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class Recording(DefaultLoadPlanner):
        def resolve_tensor(self, read_item):
            seen["resolved"].setdefault(read_item.storage_index.fqn, []).append(threading.current_thread().name)
            return super().resolve_tensor(read_item)

        def commit_tensor(self, read_item, tensor):
            seen["committed"].append(read_item.storage_index.fqn)
            super().commit_tensor(read_item, tensor)

    return Recording()


def storage_range(tmp_path, fqn):
    info = [s for i, s in FileSystemReader(tmp_path).read_metadata().storage_data.items() if i.fqn == fqn]
    return info[0].offset, info[0].length


@pytest.mark.parametrize("fmt", ["SAFETENSORS", "TORCH_SAVE"])
def test_neighbouring_large_items_are_read_side_by_side_each_whole(tmp_path, two_cores, fmt):
    from dcp_filesystem import SerializationFormat

    gen = torch.Generator().manual_seed(5)
    state = {f"w{i}": torch.randn(MiB // 4, generator=gen) for i in range(6)}  # 6 x 1 MiB
    state["norm"] = torch.randn(16, generator=gen)
    dcp_save(state, FileSystemWriter(tmp_path, serialization_format=getattr(SerializationFormat, fmt)))
    out = zeros_like_state(state)
    dcp_load(out, FileSystemReader(tmp_path), planner=recording_planner(two_cores))
    assert_state_equal(state, out)
    big = [f"w{i}" for i in range(6)]
    # Each tensor resolved and committed once; the large ones given to two threads, each read by one call.
    assert sorted(two_cores["resolved"]) == sorted(state)
    assert all(len(threads) == 1 for threads in two_cores["resolved"].values())
    assert sorted(two_cores["committed"]) == sorted(two_cores["resolved"])
    assert two_cores["side_by_side"] == [(big, 2)]
    for fqn in big:
        offset, length = storage_range(tmp_path, fqn)
        inside = [(o, n) for o, n in two_cores["parts"] if offset <= o < offset + length]
        assert MiB in [n for _, n in inside]  # the tensor's bytes in one read, not split in two
        assert all(n < MiB // 2 or n == MiB for _, n in inside)  # besides: an archive's head and tail


def test_an_item_larger_than_its_share_is_split_across_the_cores(tmp_path, two_cores):
    """3 MiB beside 1 MiB: side by side, one core would read 3 MiB alone; one after another, each split."""
    state = {"a": torch.randn(3 * MiB // 4), "b": torch.randn(MiB // 4)}
    dcp_save(state, FileSystemWriter(tmp_path))
    out = zeros_like_state(state)
    dcp_load(out, FileSystemReader(tmp_path), planner=recording_planner(two_cores))
    assert_state_equal(state, out)
    assert {t for threads in two_cores["resolved"].values() for t in threads} == {threading.current_thread().name}
    assert two_cores["side_by_side"] == []
    offset, length = storage_range(tmp_path, "a")
    halves = [n for o, n in two_cores["parts"] if offset <= o < offset + length and n >= MiB]
    assert halves == [3 * MiB // 2, 3 * MiB // 2]


def test_items_that_would_leave_a_core_idle_are_split_across_the_cores(tmp_path, two_cores):
    """Five 1 MiB items on two cores: four side by side, the fifth alone would leave a core idle, so it is
    read after them on the calling thread, split in two."""
    state = {f"w{i}": torch.randn(MiB // 4) for i in range(5)}
    dcp_save(state, FileSystemWriter(tmp_path))
    out = zeros_like_state(state)
    dcp_load(out, FileSystemReader(tmp_path), planner=recording_planner(two_cores))
    assert_state_equal(state, out)
    assert two_cores["side_by_side"] == [([f"w{i}" for i in range(4)], 2)]
    assert two_cores["resolved"]["w4"] == [threading.current_thread().name]
    offset, length = storage_range(tmp_path, "w4")
    assert [n for o, n in two_cores["parts"] if offset <= o < offset + length and n >= MiB // 4] == [MiB // 2] * 2
    for i in range(4):
        offset, length = storage_range(tmp_path, f"w{i}")
        assert MiB in [n for o, n in two_cores["parts"] if offset <= o < offset + length]


def test_with_an_accelerator_started_items_are_read_by_the_files_thread(tmp_path, two_cores, monkeypatch):
    """Device targets are filled on the thread whose current streams the copies follow."""
    monkeypatch.setattr(reader._compat, "accelerator_started", lambda: True)
    state = {f"w{i}": torch.randn(MiB // 4) for i in range(4)}
    dcp_save(state, FileSystemWriter(tmp_path))
    out = zeros_like_state(state)
    dcp_load(out, FileSystemReader(tmp_path), planner=recording_planner(two_cores))
    assert_state_equal(state, out)
    assert {t for threads in two_cores["resolved"].values() for t in threads} == {threading.current_thread().name}
    assert two_cores["side_by_side"] == []


def test_a_damaged_item_read_side_by_side_names_the_item(tmp_path, two_cores):
    state = {f"w{i}": torch.randn(MiB // 4) for i in range(4)}
    dcp_save(state, FileSystemWriter(tmp_path))
    offset, length = storage_range(tmp_path, "w2")
    (data_file,) = tmp_path.glob("*.distcp")
    raw = bytearray(data_file.read_bytes())
    raw[offset + length // 2] ^= 0x10
    data_file.write_bytes(bytes(raw))
    with pytest.raises(BaseException) as caught:  # DCP's CheckpointException is a BaseException
        dcp_load(zeros_like_state(state), FileSystemReader(tmp_path), planner=recording_planner(two_cores))
    error = raised_error(caught.value)
    assert isinstance(error, ValueError)
    assert str(error).startswith(f"{data_file}: item 'w2' (chunk at [0]): checksum mismatch")
    assert two_cores["side_by_side"] == [([f"w{i}" for i in range(4)], 2)]  # it was read side by side


def test_asking_whether_an_accelerator_started_starts_none(tmp_path):
    from helpers import REPO, run_clean_python

    out = run_clean_python(
        f"""
        import sys
        sys.path.insert(0, {REPO!r})
        import torch
        from dcp_filesystem import _compat
        print(_compat.accelerator_started(), torch.cuda.is_initialized())
        """,
        cwd=str(tmp_path),
    )
    assert out.split() == ["False", "False"]

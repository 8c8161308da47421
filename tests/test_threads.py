"""thread_count > 1 uses threads only where the files hold enough bytes to be worth them."""
import threading

import pytest
import torch
from conftest import REAL_BYTES_PER_THREAD
from helpers import assert_state_equal, dcp_load, dcp_save, zeros_like_state

from dcp_filesystem import FileSystemReader, FileSystemWriter, _parallel, reader, writer

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
    monkeypatch.setattr(writer, "run_in_threads", run_in_threads)
    return started


@pytest.fixture
def threads_used(monkeypatch):
    """The names of the threads that wrote data files and that read them."""
    used = {"write": set(), "read": set()}
    real_write, real_open = writer._write_one_file, reader._DataFile.__init__

    def write_one_file(*args):
        used["write"].add(threading.current_thread().name)
        return real_write(*args)

    def open_data_file(self, *args):
        used["read"].add(threading.current_thread().name)
        real_open(self, *args)

    monkeypatch.setattr(writer, "_write_one_file", write_one_file)
    monkeypatch.setattr(reader._DataFile, "__init__", open_data_file)
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

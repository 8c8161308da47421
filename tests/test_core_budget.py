"""The core budget: the CPUs of the process's affinity, shared by the ranks on its node (LOCAL_WORLD_SIZE)."""
import json
import os
import warnings

import pytest
from helpers import REPO, run_clean_python

from dcp_filesystem import _parallel


@pytest.fixture
def node(monkeypatch):
    """Fakes the machine: ``node(machine, affinity, local_world_size)``, affinity None for a platform
    without sched_getaffinity, local_world_size None for unset; returns the budget worked out from them,
    or (budget, the warnings' messages) where it warns."""

    def budget(machine, affinity=None, local_world_size=None):
        monkeypatch.setattr(os, "cpu_count", lambda: machine)
        if affinity is None:
            monkeypatch.delattr(os, "sched_getaffinity", raising=False)
        else:
            monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)), raising=False)
        if local_world_size is None:
            monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world_size)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = _parallel._core_budget()
        return (result, [str(w.message) for w in caught]) if caught else result

    return budget


def test_unset_the_process_takes_its_whole_affinity(node):
    assert node(96, affinity=96) == 96
    assert node(96, affinity=10) == 10
    assert node(96) == 96  # no sched_getaffinity (macOS, Windows): the machine


def test_ranks_sharing_the_machine_divide_it(node):
    assert node(96, affinity=96, local_world_size="8") == 12
    assert node(96, local_world_size="8") == 12
    assert node(100, affinity=100, local_world_size="8") == 12  # whole cores only
    assert node(96, affinity=96, local_world_size="1") == 96


def test_ranks_pinned_to_cores_of_their_own_keep_them(node):
    assert node(96, affinity=4, local_world_size="8") == 4
    assert node(96, affinity=12, local_world_size="8") == 12  # exactly the node split 8 ways


def test_ranks_bound_to_numa_nodes_take_their_share_of_the_machine(node):
    # 8 ranks on 2 NUMA nodes of 48 CPUs: each node's 4 ranks share its 48.
    assert node(96, affinity=48, local_world_size="8") == 12


def test_at_least_one_core(node):
    assert node(4, affinity=4, local_world_size="8") == 1
    assert node(96, affinity=96, local_world_size="1000") == 1
    assert node(None, affinity=1) == 1  # os.cpu_count() may not know
    assert node(None, local_world_size="8") == 1


def test_what_int_accepts_is_valid(node):
    assert node(96, affinity=96, local_world_size=" 8\n") == 12  # torch reads it with int() too


@pytest.mark.parametrize("value", ["", "0", "-8", "eight", "8.0"])
def test_an_invalid_local_world_size_is_warned_about_and_taken_as_one(node, value):
    assert node(96, affinity=40, local_world_size=value) == (40, [
        f"LOCAL_WORLD_SIZE={value!r} is not a positive integer: dcp_filesystem takes this process for the only "
        "rank on its node, with all 40 CPUs of its affinity"
    ])


def test_worked_out_once_per_process(node, monkeypatch):
    monkeypatch.setattr(_parallel, "_budget", (0, 0))
    node(96, affinity=96, local_world_size="8")
    assert _parallel._cores() == 12
    node(96, affinity=4, local_world_size="8")
    assert _parallel._cores() == 12  # the same process: not asked again
    monkeypatch.setattr(os, "getpid", lambda: -1)  # a forked child
    assert _parallel._cores() == 4


def test_parts_and_shares_follow_the_budget(node, monkeypatch):
    monkeypatch.setattr(_parallel, "_budget", (0, 0))
    node(96, affinity=96, local_world_size="8")
    large = 1000 * _parallel._PART_BYTES
    parts = _parallel._parts(large, 1)
    assert len(parts) == 12
    assert parts[0][0] == 0 and parts[-1][1] == large
    assert all(end == start for (_, end), (start, _) in zip(parts, parts[1:]))
    assert len(_parallel._parts(large, 2)) == 6
    assert _parallel.share_of_cores(2) == 6
    assert _parallel.share_of_cores(24) == 1


_LOAD_ON_PART_THREADS = """
    import json, os, sys, threading
    if {pinned}:
        os.sched_setaffinity(0, {{min(os.sched_getaffinity(0))}})
    import torch
    from helpers import dcp_load, dcp_save
    from dcp_filesystem import FileSystemReader, FileSystemWriter, _parallel

    _parallel._PART_BYTES = 64 << 10  # a 4 MiB item is split over up to 64 threads
    readers, real_preadv = set(), os.preadv

    def preadv(*args):
        readers.add(threading.current_thread())  # kept alive, so never confused with a later one
        return real_preadv(*args)

    os.preadv = preadv
    state = {{"w": torch.arange(1 << 20, dtype=torch.float32)}}
    dcp_save(state, FileSystemWriter("ckpt"))
    loaded = {{"w": torch.zeros_like(state["w"])}}
    dcp_load(loaded, FileSystemReader("ckpt"))
    assert torch.equal(loaded["w"], state["w"])
    result = {{"cores": _parallel._cores(), "readers": len(readers), "parts": len(_parallel._parts(64 << 20, 1))}}
    os.sched_setaffinity(0, {{min(os.sched_getaffinity(0))}})
    result["after_pinning"] = _parallel._cores()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(w, str(_parallel._cores()).encode())
        os._exit(0)
    os.close(w)
    result["forked_child"] = int(os.read(r, 64))
    os.waitpid(pid, 0)
    print(json.dumps(result))
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or not hasattr(os, "fork"), reason="needs Linux")
def test_a_load_splits_a_read_over_the_cores_of_its_affinity(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    path = os.pathsep.join([REPO, os.path.join(REPO, "tests")])

    def run(pinned):
        return json.loads(run_clean_python(_LOAD_ON_PART_THREADS.format(pinned=pinned), str(tmp_path / str(pinned)),
                                           env_extra={"PYTHONPATH": path}))

    (tmp_path / "True").mkdir()
    (tmp_path / "False").mkdir()
    cores = min(len(os.sched_getaffinity(0)), os.cpu_count())
    # Pinned to one CPU after the budget was worked out: not seen; a forked child sees it.
    assert run(False) == {"cores": cores, "readers": cores, "parts": cores, "after_pinning": cores, "forked_child": 1}
    assert run(True) == {"cores": 1, "readers": 1, "parts": 1, "after_pinning": 1, "forked_child": 1}

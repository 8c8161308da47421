"""dcp_filesystem.loaders: the serial loader, and the overlapping loader on a fake privateuse1 device."""

from __future__ import annotations

import os

import pytest
import torch
from fake_device import run as run_on_fake_device
from helpers import assert_state_equal, dcp_load

from dcp_filesystem import FileSystemReader
from dcp_filesystem.loaders import _OverlappingCpuLoader, _SerialCpuLoader

# --------------------------------------------------------------------------- serial loader


def test_serial_loader_yields_in_insertion_order_and_resolves_lazily():
    tensors = {name: torch.full((n,), float(n)) for name, n in [("c", 5), ("a", 1), ("b", 3)]}
    calls = []

    def resolve(obj):
        calls.append(obj)
        return tensors[obj]

    loader = _SerialCpuLoader(resolve)
    for name in ("c", "a", "b"):
        loader.add(tensors[name].numel() * 4, name)
    loader.start_loading()
    assert calls == []  # nothing is resolved before it is asked for
    seen = []
    for tensor, obj in loader.values():
        seen.append(obj)
        assert calls == seen  # resolved one at a time, exactly when handed out
        assert tensor.data_ptr() == tensors[obj].data_ptr()  # compact CPU tensors are not copied
        assert torch.equal(tensor, tensors[obj])
    assert seen == ["c", "a", "b"]


def test_serial_loader_compacts_views_of_a_larger_storage():
    base = torch.arange(100, dtype=torch.float32)
    view = base[10:20]
    strided = base.view(10, 10)[:, 3]
    assert view.untyped_storage().size() == 400
    loader = _SerialCpuLoader(lambda obj: obj)
    loader.add(40, view)
    loader.add(40, strided)
    (got_view, obj_view), (got_strided, obj_strided) = list(loader.values())
    assert obj_view is view and obj_strided is strided
    for got, src in ((got_view, view), (got_strided, strided)):
        assert got.untyped_storage().size() == got.numel() * got.element_size() == 40
        assert got.dtype == src.dtype and got.shape == src.shape
        assert torch.equal(got, src)
        assert got.untyped_storage().data_ptr() != base.untyped_storage().data_ptr()
    assert torch.equal(got_view, torch.arange(10, 20, dtype=torch.float32))
    assert torch.equal(got_strided, torch.arange(3, 100, 10, dtype=torch.float32))
    # The original base is untouched.
    assert torch.equal(base, torch.arange(100, dtype=torch.float32))


def test_serial_loader_does_not_copy_compact_cpu_tensors():
    compact = torch.arange(12, dtype=torch.int64).reshape(3, 4)
    transposed = torch.arange(12, dtype=torch.int64).reshape(3, 4).t()  # same bytes as its storage: kept
    loader = _SerialCpuLoader(lambda obj: obj)
    loader.add(96, compact)
    loader.add(96, transposed)
    (a, _), (b, _) = list(loader.values())
    assert a.data_ptr() == compact.data_ptr()
    assert b.data_ptr() == transposed.data_ptr() and b.stride() == transposed.stride()


def test_overlapping_loader_without_accelerator_raises():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is available: the overlapping loader has a device to use")
    from dcp_filesystem import _compat

    if _compat.available_device_type() is not None:
        pytest.skip("a privateuse1 device is available in this process")
    with pytest.raises(RuntimeError, match="needs CUDA or a privateuse1 device"):
        _OverlappingCpuLoader(lambda obj: obj)


# --------------------------------------------------------------------------- fake privateuse1 device

# Runs in the fake device's own interpreter (tests/fake_device.py); this process works on device 1.
_FAKE_DEVICE_SCRIPT = r"""
import os, threading
import torch
import fake_device
from fake_device import CURRENT, Stream, log, streams

fake_device.install(caller_device=1)
state = {"loader": None}


def synchronize(stream):
    # Noted with the bytes the loader under test has in flight when it waits.
    loader = state["loader"]
    log.append(("sync", stream.name, loader.in_flight_data if loader is not None else None))
    stream.run_until(stream.issued)


Stream.synchronize = synchronize

import dcp_filesystem
from dcp_filesystem import FileSystemWriter, _compat, _parallel
from dcp_filesystem import loaders as L
from helpers import dcp_save

_parallel._BYTES_PER_THREAD = 1  # these few small tensors still get every thread asked for
out = {"available_device_type": _compat.available_device_type(), "is_pinned_error": fake_device.is_pinned_error}

# ---- 1. one loader, sizes 5,1,4,2,3 bytes added in that order, threshold 6
def run_loader(sizes, threshold, stream_arg=None):
    del log[:]
    tensors = {n: torch.full((n,), n, dtype=torch.uint8) for n in sizes}
    def resolve(n):
        entered = fake_device.innermost_stream()
        log.append(("resolve", n, entered.name if entered is not None else None))
        return tensors[n]
    loader = L._OverlappingCpuLoader(resolve, stream=stream_arg, inflight_threshhold=threshold)
    state["loader"] = loader
    for n in sizes:
        loader.add(n, n)
    loader.start_loading()
    try:
        loader.add(99, 99)
        add_error = None
    except RuntimeError as e:
        add_error = str(e)
    max_inflight = loader.in_flight_data
    for t, obj in loader.values():
        max_inflight = max(max_inflight, loader.in_flight_data)
        log.append(("yield", obj, t.tolist(), t.data_ptr() == tensors[obj].data_ptr()))
    state["loader"] = None
    return {
        "events": [list(e) for e in log],
        "add_error": add_error,
        "max_inflight": max_inflight,
        "stream": loader.stream.name,
        "device_type": loader.device_type,
        "started_with_current": loader.stream is CURRENT[1],
    }

out["bounded"] = run_loader([5, 1, 4, 2, 3], 6)
out["unbounded"] = run_loader([5, 1, 4, 2, 3], 100)
own = Stream(name="own")
out["own_stream"] = run_loader([3, 1, 2], 2, stream_arg=own)

# ---- 2. full saves through the writer
loaders_made = []
orig_init = L._OverlappingCpuLoader.__init__
def recording_init(self, resolve_fun, stream=None, inflight_threshhold=1_000_000):
    orig_init(self, resolve_fun, stream=stream, inflight_threshhold=inflight_threshhold)
    loaders_made.append({
        "thread": threading.get_ident(),
        "stream_arg": None if stream is None else id(stream),
        "stream": id(self.stream),
        "is_current": self.stream is CURRENT[1],
        "threshold": inflight_threshhold,
    })
L._OverlappingCpuLoader.__init__ = recording_init

def state_dict():
    g = torch.Generator().manual_seed(7)
    return {
        "a": torch.randn(64, 8, generator=g),
        "b": torch.arange(300, dtype=torch.int64),
        "c": torch.randn(5, generator=g).to(torch.bfloat16),
        "d": torch.arange(40, dtype=torch.float64).reshape(4, 10)[:, 2:7],
        "step": 3,
    }

for threads in (1, 3):
    del streams[:], loaders_made[:], log[:]
    path = CKPT + "/t%d" % threads
    dcp_save(state_dict(), FileSystemWriter(path, thread_count=threads, per_thread_copy_ahead=1000))
    out["save%d" % threads] = {
        "streams": [{"id": id(s), "thread": s.thread} for s in streams],
        "loaders": loaders_made[:],
        "wait_stream": [list(e) for e in log if e[0] == "wait_stream"],
        "set_device": [list(e[1:]) for e in log if e[0] == "set_device"],
        "main_thread": threading.get_ident(),
        "syncs": len([e for e in log if e[0] == "sync"]),
        "files": sorted(os.listdir(path)),
    }
fake_device.report(out)
"""


IS_PINNED_NEEDS_HOOKS = "Please register PrivateUse1HooksInterface by `RegisterPrivateUse1HooksInterface` first."


@pytest.fixture(scope="module")
def fake_device(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("fakedev")
    return run_on_fake_device(_FAKE_DEVICE_SCRIPT, ckpt), ckpt


def test_fake_device_is_the_available_device(fake_device):
    out, _ = fake_device
    assert out["available_device_type"] == "fakedev"
    # Where torch demands a C++ PrivateUse1 hooks interface for is_pinned(), the fake device stands in for it.
    assert out["is_pinned_error"] in (None, IS_PINNED_NEEDS_HOOKS)
    assert out["bounded"]["device_type"] == "fakedev"
    assert out["bounded"]["started_with_current"] is True


def test_overlapping_loader_exact_sync_schedule(fake_device):
    """Sizes 5,1,4,2,3 bytes, threshold 6: worked out by hand.

    start: refill 1,2,3 (in flight 6).  drain: 6 >= 6 -> sync, pop 1 (5); refill 4 (9); yield 1.
    drain: 9 >= 6 -> sync, pop 2 (7), pop 3 (4); refill 5 (9); yield 2, 3.
    end: items left -> sync once; yield 4, 5.  Three syncs in all.
    """
    got = fake_device[0]["bounded"]
    s = "current@1"
    expected = [
        ["resolve", 1, s], ["resolve", 2, s], ["resolve", 3, s],
        ["sync", s, 6], ["resolve", 4, s],
        ["yield", 1, [1], True],
        ["sync", s, 9], ["resolve", 5, s],
        ["yield", 2, [2, 2], True], ["yield", 3, [3, 3, 3], True],
        ["sync", s, 9],
        ["yield", 4, [4] * 4, True], ["yield", 5, [5] * 5, True],
    ]  # fmt: skip
    assert got["events"] == expected
    # Smallest first, whatever the insertion order.
    assert [e[1] for e in got["events"] if e[0] == "yield"] == [1, 2, 3, 4, 5]
    assert got["max_inflight"] == 9
    assert got["max_inflight"] <= 6 + 5  # threshold + largest item
    assert got["add_error"] == "cannot add items after loading started"


def test_overlapping_loader_syncs_once_when_bound_never_reached(fake_device):
    got = fake_device[0]["unbounded"]
    s = "current@1"
    resolves = [["resolve", n, s] for n in (1, 2, 3, 4, 5)]
    yields = [["yield", n, [n] * n, True] for n in (1, 2, 3, 4, 5)]
    assert got["events"] == resolves + [["sync", s, 15]] + yields
    assert got["add_error"] == "cannot add items after loading started"


def test_overlapping_loader_own_stream_waits_on_current(fake_device):
    """A stream passed in waits on the current stream once, and copies are issued on it."""
    got = fake_device[0]["own_stream"]
    o = "own"
    assert got["stream"] == "own" and got["started_with_current"] is False
    expected = [
        ["wait_stream", o, "current@1"],
        ["resolve", 1, o], ["resolve", 2, o],  # in flight 3 >= 2
        ["sync", o, 3], ["resolve", 3, o],  # pop 1 (in flight 2 >= 2), pop 2 (0); refill 3 (3)
        ["yield", 1, [1], True], ["yield", 2, [2, 2], True],
        ["sync", o, 3],
        ["yield", 3, [3, 3, 3], True],
    ]  # fmt: skip
    assert got["events"] == expected


def _expected_state():
    g = torch.Generator().manual_seed(7)
    return {
        "a": torch.randn(64, 8, generator=g),
        "b": torch.arange(300, dtype=torch.int64),
        "c": torch.randn(5, generator=g).to(torch.bfloat16),
        "d": torch.arange(40, dtype=torch.float64).reshape(4, 10)[:, 2:7].contiguous(),
        "step": 3,
    }


def _load(path):
    exp = _expected_state()
    target = {k: (torch.zeros_like(v) if isinstance(v, torch.Tensor) else None) for k, v in exp.items()}
    dcp_load(target, FileSystemReader(path))
    assert_state_equal(exp, target)


def test_writer_single_thread_uses_current_stream(fake_device):
    out, ckpt = fake_device
    got = out["save1"]
    assert got["streams"] == []  # no Stream() constructed, as upstream
    assert len(got["loaders"]) == 1  # one data file, one overlapping loader
    (loader,) = got["loaders"]
    assert loader["stream_arg"] is None and loader["is_current"] is True
    assert loader["threshold"] == 1000
    assert got["wait_stream"] == []
    assert got["set_device"] == []
    assert got["syncs"] >= 1
    assert got["files"] == [".metadata", "__0_0.distcp"]
    _load(os.path.join(str(ckpt), "t1"))


def test_writer_three_threads_each_own_stream(fake_device):
    out, ckpt = fake_device
    got = out["save3"]
    streams = got["streams"]
    assert len(streams) == 3
    assert len({s["id"] for s in streams}) == 3  # distinct objects
    assert len({s["thread"] for s in streams}) == 3  # one per writer thread
    stream_of_thread = {s["thread"]: s["id"] for s in streams}
    assert len(got["loaders"]) == 3  # one per data file
    for loader in got["loaders"]:
        assert loader["is_current"] is False
        # Each loader runs on the stream its own thread created.
        assert loader["stream_arg"] == loader["stream"] == stream_of_thread[loader["thread"]]
        assert loader["threshold"] == 1000
    # Every thread's stream waited on the caller's current stream once per loader.
    assert len(got["wait_stream"]) == 3
    assert all(w[2] == "current@1" for w in got["wait_stream"])
    # The two worker threads moved to the caller's device before making their streams.
    workers = set(stream_of_thread) - {got["main_thread"]}
    assert sorted(got["set_device"]) == sorted([thread, 1] for thread in workers) and len(workers) == 2
    assert got["files"] == [".metadata", "__0_0.distcp", "__0_1.distcp", "__0_2.distcp"]
    _load(os.path.join(str(ckpt), "t3"))

"""dcp_filesystem.loaders: the serial loader, and the overlapping loader on a fake privateuse1 device."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import REPO, assert_state_equal, dcp_load, run_clean_python

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

_HAS_PRIVATEUSE1_HOOKS = (
    hasattr(torch.utils, "rename_privateuse1_backend")
    and hasattr(torch, "_register_device_module")
    and hasattr(torch._C, "_get_privateuse1_backend_name")
)

# Runs in its own interpreter: renaming privateuse1 is process-global and cannot be undone.
_FAKE_DEVICE_SCRIPT = r"""
import contextlib, json, sys, threading, types
sys.path.insert(0, REPO)
sys.path.insert(0, REPO + "/tests")
import torch

events = []          # (kind, ...) in call order
streams_made = []    # Stream() constructions after setup
state = {"loader": None, "ctx": []}

class Stream:
    device_type = "fakedev"
    counting = False

    def __init__(self, name=None):
        self.name = name or "stream%d" % len(streams_made)
        self.thread = threading.current_thread().name
        if Stream.counting:
            streams_made.append(self)

    def synchronize(self):
        loader = state["loader"]
        events.append(("sync", self.name, loader.in_flight_data if loader is not None else None))

    def wait_stream(self, other):
        events.append(("wait_stream", self.name, other.name))

    def __eq__(self, other):
        return self is other

    def __ne__(self, other):
        return self is not other

    def __hash__(self):
        return id(self)

CURRENT = Stream("current")
Stream.counting = True
counters = {"current_stream": 0, "stream_ctx": 0}

def current_stream(device=None):
    counters["current_stream"] += 1
    return CURRENT

@contextlib.contextmanager
def stream(s):
    counters["stream_ctx"] += 1
    state["ctx"].append(s)
    try:
        yield
    finally:
        state["ctx"].pop()

fake = types.ModuleType("fakedev")
fake.is_available = lambda: True
fake.current_stream = current_stream
fake.Stream = Stream
fake.stream = stream
fake.device_count = lambda: 1
fake.current_device = lambda: 1  # the caller works on device 1
fake.set_device = lambda index: events.append(("set_device", threading.current_thread().name, index))

torch.utils.rename_privateuse1_backend("fakedev")
torch._register_device_module("fakedev", fake)

# torch 2.5 and 2.6 answer Tensor.is_pinned() (which stock DCP's planner asks of every tensor)
# through the PrivateUse1 hooks interface, which only C++ can register there; 2.7+ need none.
try:
    torch.zeros(1).is_pinned()
    out_pinned = None
except RuntimeError as e:
    out_pinned = str(e)
    real_is_pinned = torch.Tensor.is_pinned
    # Nothing here is pinned: the fake device has no host allocator.
    torch.Tensor.is_pinned = lambda self, *a, **k: False if self.device.type == "cpu" else real_is_pinned(self, *a, **k)

import dcp_filesystem
from dcp_filesystem import FileSystemWriter, _compat, _parallel
from dcp_filesystem import loaders as L
from helpers import dcp_save

_parallel._BYTES_PER_THREAD = 1  # these few small tensors still get every thread asked for
out = {"available_device_type": _compat.available_device_type(), "is_pinned_error": out_pinned}

# ---- 1. one loader, sizes 5,1,4,2,3 bytes added in that order, threshold 6
def run_loader(sizes, threshold, stream_arg=None):
    del events[:]
    tensors = {n: torch.full((n,), n, dtype=torch.uint8) for n in sizes}
    def resolve(n):
        ctx = state["ctx"]
        events.append(("resolve", n, ctx[-1].name if ctx else None))
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
        events.append(("yield", obj, t.tolist(), t.data_ptr() == tensors[obj].data_ptr()))
    state["loader"] = None
    return {
        "events": [list(e) for e in events],
        "add_error": add_error,
        "max_inflight": max_inflight,
        "stream": loader.stream.name,
        "device_type": loader.device_type,
        "started_with_current": loader.stream is CURRENT,
    }

out["bounded"] = run_loader([5, 1, 4, 2, 3], 6)
out["unbounded"] = run_loader([5, 1, 4, 2, 3], 100)
own = Stream("own")
out["own_stream"] = run_loader([3, 1, 2], 2, stream_arg=own)
del streams_made[:]

# ---- 2. full saves through the writer
loaders_made = []
orig_init = L._OverlappingCpuLoader.__init__
def recording_init(self, resolve_fun, stream=None, inflight_threshhold=1_000_000):
    orig_init(self, resolve_fun, stream=stream, inflight_threshhold=inflight_threshhold)
    loaders_made.append({
        "thread": threading.current_thread().name,
        "stream_arg": None if stream is None else id(stream),
        "stream": id(self.stream),
        "is_current": self.stream is CURRENT,
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
    del streams_made[:], loaders_made[:]
    del events[:]
    counters["current_stream"] = 0
    path = CKPT + "/t%d" % threads
    dcp_save(state_dict(), FileSystemWriter(path, thread_count=threads, per_thread_copy_ahead=1000))
    out["save%d" % threads] = {
        "streams": [{"id": id(s), "thread": s.thread} for s in streams_made],
        "loaders": loaders_made[:],
        "wait_stream": [list(e) for e in events if e[0] == "wait_stream"],
        "set_device": [list(e[1:]) for e in events if e[0] == "set_device"],
        "main_thread": threading.current_thread().name,
        "syncs": len([e for e in events if e[0] == "sync"]),
        "files": sorted(os.listdir(path)),
    }
print("RESULT" + json.dumps(out))
"""


IS_PINNED_NEEDS_HOOKS = "Please register PrivateUse1HooksInterface by `RegisterPrivateUse1HooksInterface` first."


@pytest.fixture(scope="module")
def fake_device(tmp_path_factory):
    if not _HAS_PRIVATEUSE1_HOOKS:
        pytest.skip("this torch lacks rename_privateuse1_backend / _register_device_module")
    ckpt = tmp_path_factory.mktemp("fakedev")
    code = f"import os\nREPO = {REPO!r}\nCKPT = {str(ckpt)!r}\n" + _FAKE_DEVICE_SCRIPT
    # Hide any real CUDA device: CUDA would take precedence over the fake privateuse1 backend.
    stdout = run_clean_python(code, cwd=str(ckpt), env_extra={"CUDA_VISIBLE_DEVICES": ""})
    (line,) = [ln for ln in stdout.splitlines() if ln.startswith("RESULT")]
    return json.loads(line[len("RESULT") :]), ckpt


def test_fake_device_is_the_available_device(fake_device):
    out, _ = fake_device
    assert out["available_device_type"] == "fakedev"
    # Where torch demands a C++ PrivateUse1 hooks interface for is_pinned(), the script stands in for it.
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
    s = "current"
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
    s = "current"
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
        ["wait_stream", o, "current"],
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
    assert all(w[2] == "current" for w in got["wait_stream"])
    # The two worker threads moved to the caller's device before making their streams.
    workers = set(stream_of_thread) - {got["main_thread"]}
    assert sorted(got["set_device"]) == sorted([thread, 1] for thread in workers) and len(workers) == 2
    assert got["files"] == [".metadata", "__0_0.distcp", "__0_1.distcp", "__0_2.distcp"]
    _load(os.path.join(str(ckpt), "t3"))

"""The tests' fake accelerator: "fakedev", torch's privateuse1 backend defined in Python, with two devices.

Renaming privateuse1 is process-global and cannot be undone, so the device lives in an interpreter of
its own: ``run(script, folder)`` runs a test's script there and returns what the script handed to
``report``; the script calls ``install()`` before anything else. Used by tests/test_loaders.py (the
overlapping device-to-host loader) and tests/test_device_reads.py (loads through pinned buffers).

What the device does (``log`` records, in call order, each stream or event synchronized, each wait of
one stream on another, each set_device and each copy issued; threads by ``threading.get_ident``):

- ``Stream`` queues every non-blocking copy issued on it and runs it only when the stream is
  synchronized, another stream waits on it, or an ``Event`` recorded after it is synchronized. So a
  host buffer refilled before the copy out of it ran, or a tensor committed before its copies ran,
  shows up as wrong bytes. Streams made without a name are listed in ``streams``; each device's own
  current stream is named ``current@<index>``.
- Each thread has a current device (``install``'s ``caller_device`` for the installing thread, 0 for
  the others, as on CUDA, until ``set_device``) and the streams it entered with ``stream(s)``;
  ``current_stream(device)`` is the innermost entered stream of that device, else its current stream.
- ``FakeTensor`` (where torch can register a device guard for a Python-defined device: ``CAN_GUARD``)
  is a tensor on the device whose bytes live in a CPU tensor, ``.inner``.
- It has no host allocator, so it cannot pin memory: a test that wants pinned buffers supplies them.
"""
from __future__ import annotations

import contextlib
import json
import threading
import types
from typing import List, Optional

import torch
from helpers import REPO, run_clean_python
from torch.utils._pytree import tree_map

NAME = "fakedev"
COUNT = 2

CAN_DEFINE = (
    hasattr(torch.utils, "rename_privateuse1_backend")
    and hasattr(torch, "_register_device_module")
    and hasattr(torch._C, "_get_privateuse1_backend_name")
)
CAN_GUARD = CAN_DEFINE and hasattr(getattr(torch._C, "_acc", None), "register_python_privateuseone_device_guard")

_RESULT = "RESULT"


# --------------------------------------------------------------------------- in the test process


def run(script: str, folder, tensors: bool = False) -> dict:
    """Run ``script`` (which calls ``install()`` first) in a fresh interpreter, in ``folder`` (also the
    script's ``CKPT``); returns the dict it passed to ``report``. Skips where this torch cannot define the
    device, or, with ``tensors``, cannot give it tensors (``FakeTensor``)."""
    import pytest

    if not CAN_DEFINE:
        pytest.skip("this torch lacks rename_privateuse1_backend / _register_device_module")
    if tensors and not CAN_GUARD:
        pytest.skip("this torch cannot register a device guard for a Python-defined privateuse1 device")
    code = f"import sys\nREPO = {REPO!r}\nCKPT = {str(folder)!r}\nsys.path.insert(0, REPO)\n" + script
    # Hide any real CUDA device: CUDA would take precedence over the fake privateuse1 backend.
    stdout = run_clean_python(code, cwd=str(folder), env_extra={"CUDA_VISIBLE_DEVICES": ""})
    (line,) = [ln for ln in stdout.splitlines() if ln.startswith(_RESULT)]
    return json.loads(line[len(_RESULT) :])


# --------------------------------------------------------------------------- in the script's process

log: list = []  # what happened, in order: tuples, first item the kind
violations: list = []  # copies whose source buffer changed between issue and run
streams: List[Stream] = []  # streams made without a name (not the devices' current streams)
DEVICES: List[torch.device] = []
CURRENT: List[Stream] = []  # each device's current stream
is_pinned_error: Optional[str] = None  # what Tensor.is_pinned() raised before install() stood in for it

_lock = threading.RLock()
_tls = threading.local()
_installing_thread: Optional[int] = None
_installing_device = 0


def _thread_state():
    if not hasattr(_tls, "entered"):
        _tls.entered = []  # streams entered with stream(s), innermost last
        _tls.device = _installing_device if threading.get_ident() == _installing_thread else 0
    return _tls


class Stream:
    device_type = NAME

    def __init__(self, device=None, name=None):
        self.device = torch.device(device) if device is not None else DEVICES[current_device()]
        self.thread = threading.get_ident()
        self.queue, self.issued, self.done = [], 0, 0
        with _lock:  # reader threads make their streams at the same time: names must stay unique
            self.name = name or f"copy{len(streams)}@{self.device.index}"
            if name is None:
                streams.append(self)

    def enqueue(self, op):
        with _lock:
            self.queue.append(op)
            self.issued += 1

    def run_until(self, mark):
        with _lock:
            while self.done < mark:
                self.queue.pop(0)()
                self.done += 1

    def synchronize(self):
        log.append(("stream_sync", self.name))
        self.run_until(self.issued)

    def wait_stream(self, other):
        log.append(("wait_stream", self.name, other.name))
        other.run_until(other.issued)


class Event:
    made = 0

    def __init__(self):
        Event.made += 1
        self.stream, self.mark = None, 0

    def record(self, stream=None):
        self.stream = stream or current_stream()
        self.mark = self.stream.issued

    def synchronize(self):
        log.append(("event_sync", self.stream.name, self.mark))
        self.stream.run_until(self.mark)

    def query(self):
        return self.stream.done >= self.mark


def current_device() -> int:
    return _thread_state().device


def set_device(index) -> None:
    log.append(("set_device", threading.get_ident(), index))
    _thread_state().device = index if isinstance(index, int) else torch.device(index).index


def current_stream(device=None) -> Stream:
    index = current_device() if device is None else torch.device(device).index
    for s in reversed(_thread_state().entered):
        if s.device.index == index:
            return s
    return CURRENT[index]


def innermost_stream() -> Optional[Stream]:
    """The stream this thread entered last with ``stream(s)`` and has not left, if any."""
    entered = _thread_state().entered
    return entered[-1] if entered else None


@contextlib.contextmanager
def stream(s):
    entered = _thread_state().entered
    entered.append(s)
    try:
        yield
    finally:
        entered.pop()


class FakeTensor(torch.Tensor):
    """A tensor on a fake device: its bytes live in the CPU tensor ``.inner``."""

    @staticmethod
    def __new__(cls, inner, device):
        r = torch.Tensor._make_wrapper_subclass(
            cls, inner.size(), strides=inner.stride(), storage_offset=inner.storage_offset(),
            dtype=inner.dtype, device=device, requires_grad=False)
        r.inner = inner
        return r

    def __repr__(self):
        return f"FakeTensor({self.device}, {self.dtype}, {tuple(self.shape)})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        devices = set()

        def unwrap(x):
            if isinstance(x, FakeTensor):
                devices.add(x.device)
                return x.inner
            return x

        if func is torch.ops.aten.copy_.default:
            dst, src = args[0], args[1]
            non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
            dst_inner, src_inner = unwrap(dst), unwrap(src)
            if non_blocking:
                s = current_stream(dst.device)
                from_buffer = not isinstance(src, FakeTensor)
                snapshot = src_inner.clone() if from_buffer else None
                log.append(("copy_issued", s.name, str(s.device), str(dst.device), from_buffer,
                            src_inner.data_ptr(), src_inner.numel() * src_inner.element_size(), threading.get_ident()))

                def op():
                    if snapshot is not None and not torch.equal(src_inner, snapshot):
                        violations.append(("buffer changed before its copy ran", s.name))
                    dst_inner.copy_(src_inner)

                s.enqueue(op)
            else:
                dst_inner.copy_(src_inner)
            return dst
        a, k = tree_map(unwrap, args), tree_map(unwrap, kwargs)
        k.pop("device", None)
        k.pop("pin_memory", None)
        out = func(*a, **k)
        (device,) = devices
        return tree_map(lambda x: FakeTensor(x, device) if isinstance(x, torch.Tensor) else x, out)


def install(caller_device: int = 0) -> None:
    """Make "fakedev" torch's privateuse1 backend in this process, with this thread on ``caller_device``."""
    global _installing_thread, _installing_device, is_pinned_error
    _installing_thread, _installing_device = threading.get_ident(), caller_device
    torch.utils.rename_privateuse1_backend(NAME)
    DEVICES[:] = [torch.device(NAME, i) for i in range(COUNT)]
    CURRENT[:] = [Stream(d, f"current@{d.index}") for d in DEVICES]
    module = types.ModuleType(NAME)
    module.is_available = lambda: True
    module.device_count = lambda: COUNT
    module.current_device, module.set_device = current_device, set_device
    module.current_stream, module.stream = current_stream, stream
    module.Stream, module.Event = Stream, Event
    torch._register_device_module(NAME, module)
    if CAN_GUARD:

        class Guard(torch._C._acc.DeviceGuard):
            def type_(self):
                return torch._C._autograd.DeviceType.PrivateUse1

        torch._C._acc.register_python_privateuseone_device_guard(Guard())
    # torch 2.5 and 2.6 answer Tensor.is_pinned() (which stock DCP's planner asks of every tensor) through
    # the PrivateUse1 hooks interface, which only C++ can register there; 2.7+ need none. Nothing here is
    # pinned: the device has no host allocator.
    try:
        torch.zeros(1).is_pinned()
    except RuntimeError as e:
        is_pinned_error = str(e)
        real_is_pinned = torch.Tensor.is_pinned

        def is_pinned(self, *args, **kwargs):
            return False if self.device.type == "cpu" else real_is_pinned(self, *args, **kwargs)

        torch.Tensor.is_pinned = is_pinned


def report(out: dict) -> None:
    """Hand ``out`` (JSON) back to ``run``."""
    print(_RESULT + json.dumps(out), flush=True)

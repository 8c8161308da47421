"""Tensor loaders: hand a writer thread CPU tensors, copying from the device ahead of use."""
from __future__ import annotations

import collections
import contextlib
from abc import ABC, abstractmethod
from typing import Any, Callable, Deque, Iterator, List, NamedTuple, Optional, Tuple

import torch

from . import _compat


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU tensor whose storage holds exactly its own bytes (views would save their whole base)."""
    if tensor.untyped_storage().size() != tensor.numel() * tensor.element_size():
        return tensor.clone()
    return tensor


class DeviceContext(NamedTuple):
    """The calling thread's accelerator device and current stream, for writer threads to adopt."""

    module: Any
    index: Optional[int]
    stream: Any


def caller_device_context() -> Optional[DeviceContext]:
    device_type = _compat.available_device_type()
    if device_type is None:
        return None
    module = _compat.device_module(device_type)
    index = module.current_device() if hasattr(module, "current_device") else None
    return DeviceContext(module, index, module.current_stream())


@contextlib.contextmanager
def on_device(context: Optional[DeviceContext]) -> Iterator[None]:
    """Run on the caller's device and stream: a new thread starts on device 0 and its default stream,
    so its copies would not be ordered after the caller's work."""
    if context is None:
        yield
        return
    if context.index is not None and hasattr(context.module, "set_device"):
        context.module.set_device(context.index)
    with context.module.stream(context.stream):
        yield


class _TensorLoader(ABC):
    @abstractmethod
    def add(self, size: int, obj: object) -> None: ...

    @abstractmethod
    def start_loading(self) -> None: ...

    @abstractmethod
    def values(self) -> Iterator[Tuple[torch.Tensor, object]]: ...


class _SerialCpuLoader(_TensorLoader):
    """Copies each tensor to CPU when it is asked for, in the order added."""

    def __init__(self, resolve_fun: Callable) -> None:
        self.resolve_fun = resolve_fun
        self.items: List[Tuple[int, object]] = []

    def add(self, size: int, obj: object) -> None:
        self.items.append((size, obj))

    def start_loading(self) -> None:
        pass

    def values(self) -> Iterator[Tuple[torch.Tensor, object]]:
        for _, obj in self.items:
            yield _compact(self.resolve_fun(obj).detach().cpu()), obj


class _OverlappingCpuLoader(_TensorLoader):
    """Issues non-blocking device-to-host copies on ``stream`` ahead of the consumer.

    At most ``inflight_threshhold`` bytes are copied ahead; the stream is
    synchronized only when that bound is reached or at the end. Items are handed
    out smallest first.
    """

    def __init__(
        self,
        resolve_fun: Callable,
        stream: Optional[Any] = None,
        inflight_threshhold: int = 1_000_000,
    ) -> None:
        self.resolve_fun = resolve_fun
        self.items: List[Tuple[int, object]] = []
        self.inflight_threshhold = inflight_threshhold
        self.in_flight_data = 0
        self.current_items: Deque[Tuple[torch.Tensor, object]] = collections.deque()
        self.idx = 0
        self.started = False
        self.device_type = stream.device_type if stream is not None else _compat.available_device_type()
        if self.device_type is None:
            raise RuntimeError("_OverlappingCpuLoader needs CUDA or a privateuse1 device; none is available")
        self.device_module = _compat.device_module(self.device_type)
        current = self.device_module.current_stream()
        self.stream = stream if stream is not None else current
        if self.stream != current:
            self.stream.wait_stream(current)

    @property
    def _done(self) -> bool:
        return self.idx >= len(self.items)

    def _refill(self) -> None:
        with self.device_module.stream(self.stream):
            while not self._done and self.in_flight_data < self.inflight_threshhold:
                _, obj = self.items[self.idx]
                self.idx += 1
                tensor = self.resolve_fun(obj).detach()
                if tensor.device.type == self.device_type:
                    tensor = tensor.to(device="cpu", non_blocking=True)
                elif tensor.device.type == "cpu":
                    tensor = _compact(tensor)
                self.current_items.append((tensor, obj))
                self.in_flight_data += tensor.numel() * tensor.element_size()

    def _drain(self) -> List[Tuple[torch.Tensor, object]]:
        """Wait for the copies in flight and take the oldest until below the bound."""
        drained = []
        if self.in_flight_data >= self.inflight_threshhold:
            self.stream.synchronize()
        while self.in_flight_data >= self.inflight_threshhold:
            tensor, obj = self.current_items.popleft()
            self.in_flight_data -= tensor.numel() * tensor.element_size()
            drained.append((tensor, obj))
        return drained

    def add(self, size: int, obj: object) -> None:
        if self.started:
            raise RuntimeError("cannot add items after loading started")
        self.items.append((size, obj))

    def start_loading(self) -> None:
        if self.started:
            return
        self.started = True
        self.items.sort(key=lambda item: item[0])
        self._refill()

    def values(self) -> Iterator[Tuple[torch.Tensor, object]]:
        self.start_loading()
        while not self._done:
            drained = self._drain()
            # Issue the next copies before handing out the drained ones, so they overlap the writes.
            self._refill()
            yield from drained
        yield from self._finish()

    def _finish(self) -> Iterator[Tuple[torch.Tensor, object]]:
        """Wait for the last copies and hand out everything still held."""
        if self.current_items:
            self.stream.synchronize()
        while self.current_items:
            yield self.current_items.popleft()

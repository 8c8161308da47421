"""Loads into accelerator memory through a few pinned host buffers, copied on a stream of their own.

A stored tensor whose destination is on an accelerator is read in chunks into page-locked host
buffers (at most ``_BUFFERS`` of ``_BUFFER_BYTES`` each per data file being read, so per reader
thread), and each chunk is copied to the destination's bytes asynchronously on a copy stream of the
reader's own (one per device), while the next chunk is read into the other buffer. A buffer is
refilled only after the copy out of it has finished (an event recorded after that copy), and every
copy of an item has finished when ``read_into`` returns, before the reader commits the tensor.

Where the device cannot pin host memory (no accelerator, a Python-defined privateuse1 device), the
reader does what it did before: ``DeviceReads.accepts`` says no.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from . import _compat
from ._bytes import tensor_bytes
from ._crc import crc32_combine

# Each reader thread stages its reads through at most this many pinned buffers of this size.
_BUFFER_BYTES = 32 << 20
_BUFFERS = 2

# read(offset, view, with_crc) -> (bytes read, their CRC-32 or 0): _DataFile.readinto_with_crc.
ReadInto = Callable[[int, memoryview, bool], Tuple[int, int]]


class _Buffer:
    """One pinned host buffer, and the event recorded after the last copy out of it (None when idle)."""

    def __init__(self, tensor: torch.Tensor, view: memoryview, serial: int) -> None:
        self.tensor = tensor
        self.view = view
        self.event: Optional[Any] = None
        self.serial = serial  # when it was last handed out: the oldest busy buffer is waited on first


def _flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous tensor (any device, 0-d included) as a flat uint8 tensor sharing its memory."""
    return tensor.reshape(-1).view(torch.uint8)


class DeviceReads:
    """The pinned buffers and copy streams of one data file's reads (one reader thread's, while it reads it).

    Nothing is allocated until the first item for a device target arrives.
    """

    def __init__(self) -> None:
        self._buffers: List[_Buffer] = []
        self._handed_out = 0
        self._streams: Dict[torch.device, Any] = {}

    @staticmethod
    def accepts(target: torch.Tensor) -> bool:
        """Whether ``target``'s bytes can be loaded through pinned buffers: it lives on an accelerator that
        can pin host memory and has streams and events."""
        return target.device.type != "cpu" and _compat.pinned_host_allocator(target.device.type) is not None

    def read_into(
        self, target: torch.Tensor, read: ReadInto, offset: int, nbytes: int, with_crc: bool
    ) -> Tuple[int, int]:
        """Fill ``target`` (``nbytes`` bytes, on a device ``accepts``) with the stored bytes at ``offset``.

        Returns (bytes read, their CRC-32 or 0), as ``read`` does for the whole range; fewer bytes than
        ``nbytes`` means the file ended first. Every copy has finished when this returns, also on error.
        """
        if nbytes == 0:
            return 0, 0
        device = target.device
        module = _compat.device_module(device.type)
        allocate = _compat.pinned_host_allocator(device.type)
        if allocate is None:
            raise RuntimeError(f"no pinned host memory for {device}: DeviceReads.accepts should have said no")
        current = module.current_stream(device)
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = module.Stream(device=device)
        got = crc = 0
        try:
            with module.stream(stream):
                stream.wait_stream(current)  # the target may still be written by work queued before the load
                contiguous = target.is_contiguous()
                # A non-contiguous target gets a contiguous device copy, then one device-side copy_.
                dest = target if contiguous else torch.empty_like(target, memory_format=torch.contiguous_format)
                flat = _flat_bytes(dest)
                while got < nbytes:
                    buffer = self._take(allocate)
                    want = min(len(buffer.view), nbytes - got)
                    n, part_crc = read(offset + got, buffer.view[:want], with_crc)
                    if n > 0:
                        flat.narrow(0, got, n).copy_(buffer.tensor.narrow(0, 0, n), non_blocking=True)
                        buffer.event = module.Event()
                        buffer.event.record(stream)
                        crc = crc32_combine(crc, part_crc, n) if with_crc else 0
                        got += n
                    if n < want:
                        break
                if not contiguous and got == nbytes:
                    target.copy_(dest, non_blocking=True)
        finally:
            stream.synchronize()
            for buffer in self._buffers:
                buffer.event = None
        return got, crc

    def _take(self, allocate: Callable[[int], torch.Tensor]) -> _Buffer:
        """An idle buffer: a free one, a new one while fewer than _BUFFERS exist, else the oldest busy one
        once the copy out of it has finished."""
        idle = [b for b in self._buffers if b.event is None]
        if idle:
            buffer = idle[0]
        elif len(self._buffers) < _BUFFERS:
            tensor = allocate(_BUFFER_BYTES)
            buffer = _Buffer(tensor, tensor_bytes(tensor), 0)
            self._buffers.append(buffer)
        else:
            buffer = min(self._buffers, key=lambda b: b.serial)
            buffer.event.synchronize()
            buffer.event = None
        self._handed_out += 1
        buffer.serial = self._handed_out
        return buffer


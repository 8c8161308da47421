"""One open data file of a load: positioned reads on several cores, reads ahead, reads into targets."""
from __future__ import annotations

import ctypes
import os
from typing import IO, Any, Dict, Optional, Tuple

import torch

from ._bytes import address_of, tensor_bytes
from ._device_reads import DeviceReads
from ._item import Item
from ._parallel import crc32_on_cores, pread_into, preadv_descriptor


class DataFile:
    """One open data file: positioned reads, reads ahead, and what codecs remember about it (``parsed``).

    A local file is read as fast as it allows: its size first, positioned reads on several cores,
    reads ahead over runs of small items. A file of any other file system (an object store) is read
    only as one allows: inside the byte ranges of planned items, front to back, never at its end,
    never across an item's boundary; its size is not known, so a short read says what is missing.
    After ``read_ahead(start, end)``, reads that lie within that range are served from memory.
    A local file's positioned reads may run in several threads at once; ``reads_at_once`` says how
    many of this load's reads run at once (over all files), so that each takes its share of the cores.
    """

    def __init__(self, stream: IO[bytes], name: str, reads_at_once: int, local: bool) -> None:
        self.stream = stream
        self.name = name
        self.local = local
        self.fd = preadv_descriptor(stream) if local else None
        self.size: Optional[int] = None
        if self.fd is not None:
            self.size = os.fstat(self.fd).st_size
        elif local:
            stream.seek(0, os.SEEK_END)
            self.size = stream.tell()
        self.reads_at_once = reads_at_once
        self.parsed: Dict[Any, Any] = {}  # a codec's parse of part of the file (a safetensors header), by key
        self._ahead_start = self._ahead_address = 0
        self.ahead_buffer = bytearray()  # what read_ahead holds: the file's bytes from _ahead_start
        self.ahead = memoryview(b"")  # the bytes of ahead_buffer that were read
        self.device_reads = DeviceReads()  # pinned buffers for device targets, allocated on first use

    def read_ahead(self, start: int, end: int) -> None:
        start, end = max(start, 0), min(end, self.size)  # ranges outside the file fail where they are read
        buffer = bytearray(max(end - start, 0))
        self._ahead_start, self.ahead = 0, memoryview(b"")
        got, _ = self.readinto_with_crc(start, memoryview(buffer), False)
        self.ahead_buffer, self._ahead_address = buffer, address_of(buffer)
        self._ahead_start, self.ahead = start, memoryview(buffer)[:got]

    def ahead_index(self, offset: int, length: int) -> Optional[int]:
        """Where the bytes ``[offset, offset + length)`` start in ``ahead_buffer``, where it holds them."""
        begin = offset - self._ahead_start
        return None if begin < 0 or begin + length > len(self.ahead) else begin

    def read_ahead_part(self, offset: int, length: int) -> Optional[memoryview]:
        """The bytes ``[offset, offset + length)`` where ``read_ahead`` holds them, else None."""
        begin = self.ahead_index(offset, length)
        return None if begin is None else self.ahead[begin : begin + length]

    def copy_ahead(self, begin: int, length: int, address: int) -> None:
        """Copy ``length`` bytes of ``ahead_buffer`` from index ``begin`` to ``address``."""
        ctypes.memmove(address, self._ahead_address + begin, length)

    def readinto_at(self, offset: int, view: memoryview) -> int:
        return self.readinto_with_crc(offset, view, False)[0]

    def readinto_with_crc(self, offset: int, view: memoryview, with_crc: bool) -> Tuple[int, int]:
        """Fill ``view`` from ``offset``: (bytes read, their CRC-32 or 0), on several cores where possible."""
        part = self.read_ahead_part(offset, len(view))
        if part is not None:
            view[:] = part
            return len(view), crc32_on_cores(part, self.reads_at_once) if with_crc else 0
        if self.fd is not None:
            return pread_into(self.fd, offset, view, with_crc, self.reads_at_once)
        self.stream.seek(offset)
        got = 0
        while got < len(view):
            n = self.stream.readinto(view[got:])
            if not n:
                break
            got += n
        return got, crc32_on_cores(view[:got], self.reads_at_once) if with_crc else 0

    def read_at(self, offset: int, length: int) -> bytearray:
        buffer = bytearray(length)
        got = self.readinto_at(offset, memoryview(buffer))
        return buffer if got == length else buffer[:got]

    def check_range(self, offset: int, length: int, item: Item) -> None:
        if offset < 0 or length < 0 or (self.size is not None and offset + length > self.size):
            raise item.error(
                f" needs bytes [{offset}, {offset + length}) but the file has {self.size} bytes "
                "(truncated or damaged checkpoint)"
            )

    def read_exact(self, offset: int, length: int, item: Item) -> bytearray:
        self.check_range(offset, length, item)
        buffer = self.read_at(offset, length)
        if len(buffer) != length:
            raise item.error(f": read {len(buffer)} of {length} bytes at offset {offset}")
        return buffer

    def read_checked(self, item: Item) -> bytearray:
        """An item's stored bytes, checked against their checksum where the metadata has one."""
        info = item.info
        payload = self.read_exact(info.offset, info.length, item)
        if item.checked:
            item.check(crc32_on_cores(memoryview(payload), self.reads_at_once))
        return payload

    def takes(self, target: torch.Tensor) -> bool:
        """Whether ``read_into`` can fill ``target``: a contiguous CPU tensor, or one on a device with pinned
        host memory."""
        return target.is_contiguous() if target.device.type == "cpu" else self.device_reads.accepts(target)

    def read_into(self, item: Item, target: torch.Tensor, start: int, nbytes: int, with_crc: bool) -> int:
        """Fill ``target`` (which ``takes``) with the ``nbytes`` bytes at ``start``: their CRC-32, or 0 if not
        ``with_crc``. On a device through pinned buffers; every copy has finished when it returns."""
        self.check_range(start, nbytes, item)
        if target.device.type != "cpu":
            got, crc = self.device_reads.read_into(target, self.readinto_with_crc, start, nbytes, with_crc)
        else:
            got, crc = self.readinto_with_crc(start, tensor_bytes(target), with_crc)
        if got != nbytes:
            raise item.error(f": read {got} of {nbytes} bytes at offset {start}")
        return crc

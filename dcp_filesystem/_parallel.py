"""Spreading I/O over threads: how many a job is worth, and large positional reads with their CRC-32."""
from __future__ import annotations

import functools
import os
import threading
import zlib
from typing import IO, List, Optional, Tuple

from ._crc import crc32_combine
from .fs import file_descriptor

_STEP_BYTES = 4 << 20  # one read call, then its CRC, per step
_PART_BYTES = 8 << 20  # smaller ranges are not worth a thread
# Below this many bytes per thread, files are read or written one after another: the work on
# small items holds the GIL, so extra threads only add switching.
_BYTES_PER_THREAD = 16 << 20


def worker_count(thread_count: int, files: int, nbytes: int) -> int:
    """Threads worth using for ``files`` files holding ``nbytes`` bytes, at most ``thread_count``."""
    return max(1, min(thread_count, files, nbytes // _BYTES_PER_THREAD))


def preadv_descriptor(stream: IO[bytes]) -> Optional[int]:
    """The OS file descriptor behind ``stream``, where positional reads can use it."""
    return file_descriptor(stream) if hasattr(os, "preadv") else None


@functools.cache
def _cores() -> int:
    return os.cpu_count() or 1  # a system call on some platforms: asked once


def _pread_range(fd: int, offset: int, view: memoryview, with_crc: bool) -> Tuple[int, int]:
    """Fill ``view`` from ``fd`` at ``offset`` in steps, each checksummed right after it is read."""
    position, crc = 0, 0
    while position < len(view):
        step = view[position : position + _STEP_BYTES]
        n = os.preadv(fd, [step], offset + position)
        if n <= 0:
            break
        if with_crc:
            crc = zlib.crc32(step[:n], crc)
        position += n
    return position, crc


def pread_into(fd: int, offset: int, view: memoryview, with_crc: bool, sharing: int = 1) -> Tuple[int, int]:
    """Fill ``view`` from ``fd`` at ``offset``: (bytes read, their zlib CRC-32 or 0 if not ``with_crc``).

    The range is split over up to one thread per core (the cores divided among
    ``sharing`` such reads running at once); each reads its part in
    steps and checksums a step right after reading it (os.preadv and zlib.crc32
    release the GIL), and the parts' CRCs are joined with crc32_combine.
    Fewer bytes than ``len(view)`` means the file ended first.
    """
    size = len(view)
    parts = max(1, min(_cores() // sharing, size // _PART_BYTES))
    if parts == 1:
        return _pread_range(fd, offset, view, with_crc)
    per_part = -(-size // parts)
    got: List[int] = [0] * parts
    crcs: List[int] = [0] * parts
    errors: List[BaseException] = []

    def part(i: int) -> None:
        start = i * per_part
        try:
            got[i], crcs[i] = _pread_range(fd, offset + start, view[start : min(start + per_part, size)], with_crc)
        except BaseException as e:  # noqa: B036 - re-raised in the calling thread
            errors.append(e)

    workers = [threading.Thread(target=part, args=(i,), name="dcp_filesystem-pread") for i in range(1, parts)]
    for worker in workers:
        worker.start()
    part(0)
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]
    total, crc = 0, 0
    for i in range(parts):
        crc = crc32_combine(crc, crcs[i], got[i]) if i else crcs[0]
        total += got[i]
        if got[i] != min(per_part, size - i * per_part):
            break  # a short part: the bytes after it are not this range's
    return total, crc

"""Starting the kernel's writeback while a file is still being written (Linux ``sync_file_range``).

A file that will be fsync'd at the end otherwise sits in the page cache until
then, and the fsync waits for all of it to reach the disk. Asking the kernel to
start writing each window as soon as it is complete overlaps the disk with the
rest of the save, so the fsync waits only on the last window. Durability still
comes from that fsync; the early starts are hints, and where they are not
available nothing changes.
"""
from __future__ import annotations

import ctypes
import functools
import sys
from typing import Any, Optional

from .fs import file_descriptor

_WINDOW = 32 << 20
_SYNC_FILE_RANGE_WRITE = 2  # start writeback of the range's dirty pages; do not wait for it


@functools.cache
def _sync_file_range() -> Optional[Any]:
    """libc's sync_file_range, where there is one (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def with_early_writeback(stream: Any) -> Any:
    """``stream``, or a wrapper of it that starts the writeback of every window written."""
    function = _sync_file_range()
    fd = file_descriptor(stream)
    if function is None or fd is None:
        return stream
    return _WritebackStream(stream, fd, function)


class _WritebackStream:
    """Writes through to ``stream`` (large writes a window at a time), starting writeback per window."""

    def __init__(self, stream: Any, fd: int, sync_file_range: Any) -> None:
        self._stream = stream
        self._fd = fd
        self._sync_file_range = sync_file_range
        self._started = stream.tell()
        self._unstarted = 0  # bytes written since the last start

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), _WINDOW):
            piece = view[start : start + _WINDOW]
            while piece:
                written = self._stream.write(piece)
                piece = piece[len(piece) if written is None else written :]
            self._unstarted += min(_WINDOW, len(view) - start)
            if self._unstarted >= _WINDOW and self._sync_file_range is not None:
                self._start_writeback()
        return len(view)

    def _start_writeback(self) -> None:
        position = self._stream.tell()
        if self._sync_file_range(self._fd, self._started, position - self._started, _SYNC_FILE_RANGE_WRITE) != 0:
            self._sync_file_range = None  # refused (a file system without it): the fsync does it all
        self._started, self._unstarted = position, 0

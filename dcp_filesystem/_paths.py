"""Which files of a checkpoint may be opened, and opening them without blocking.

A checkpoint's metadata names the data file of every item. Whatever opens those
files (loads, ``verify``, ``inspect``) asks :func:`refusal` first, one rule for
all: a name is a non-empty relative path with no ``..`` part and no NUL byte,
and on a local disk it still lies inside the checkpoint directory once every
symlink is followed. A hostile ``.metadata`` can therefore make no reader open
(or print checksums of) a file outside the checkpoint.

Local files are opened with :func:`open_regular`: without waiting (``O_NONBLOCK``,
so that opening a named pipe with no writer returns at once), then refused unless
they are regular files. A FIFO, a device or a directory gets an error naming it
instead of a load that hangs or reads without end.
"""
from __future__ import annotations

import os
import stat
from typing import IO, Any, Optional

_KINDS = {
    stat.S_IFIFO: "a named pipe",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFDIR: "a directory",
    stat.S_IFSOCK: "a socket",
}
_NO_WAIT = getattr(os, "O_NONBLOCK", 0)


def refusal(relative_path: Any, directory: Any, local_directory: Optional[str]) -> Optional[str]:
    """Why the storage file name ``relative_path`` may not be opened from checkpoint ``directory``
    (``local_directory`` where it is on the local disk), or None where it may."""
    if not isinstance(relative_path, str) or not relative_path or "\0" in relative_path:
        return f"which is not a valid file name inside the checkpoint directory {directory}"
    parts = relative_path.replace("\\", "/").split("/")
    outside = f"which is outside the checkpoint directory {directory}"
    if os.path.isabs(relative_path) or ".." in parts:
        return outside
    if local_directory is not None:
        root = os.path.realpath(local_directory)
        if os.path.commonpath([root, os.path.realpath(os.path.join(root, relative_path))]) != root:
            return outside
    return None


def check_storage_file(relative_path: Any, directory: Any, local_directory: Optional[str], named_by: str) -> None:
    """Raise where :func:`refusal` refuses ``relative_path``; ``named_by`` says who names it
    (``"<metadata path>: item 'w'"``)."""
    why = refusal(relative_path, directory, local_directory)
    if why is not None:
        raise ValueError(f"{named_by} names storage file {relative_path!r}, {why}")


def open_regular(path: Any) -> IO[bytes]:
    """``path`` opened for reading, where it is a regular file; a clear ValueError where it is not."""
    fd = os.open(path, os.O_RDONLY | _NO_WAIT | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
            raise ValueError(f"{path}: is {kind}, not a regular file: checkpoints are read from regular files only")
        if _NO_WAIT:
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise

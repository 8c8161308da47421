"""One save at a time in a checkpoint directory.

Two saves into one directory at once (a restarted job whose old ranks still
save, two runs given one output path) would each take the other's files for
leftovers: one reclaims the other's unfinished data files, the other's commit
removes the files of the checkpoint committed meanwhile. So a save holds the
directory's save lock from before any of its ranks writes or removes a file
until its commit and the removal of the replaced files are done, and a second
save that finds the lock taken raises before it touches anything, naming the
directory and the holder. The directory then always loads as exactly one
committed save: the last one to commit, or the one before it.

Who holds it. DCP calls ``prepare_global_plan`` on one rank (the coordinator)
after every rank has planned and before any rank writes; ``finish`` follows on
the same rank once every rank has written. The coordinator takes the lock in
the first and gives it back at the end of the second, so a multi-rank save is
one save. A save without collectives (rank-local metadata) runs both on every
rank, and each rank locks ``__{rank}.metadata.lock``: such saves exclude the
same rank's, not each other. A save that fails on the coordinator gives the
lock back at once; one that fails on another rank never reaches ``finish``,
and its lock goes when its writer starts another save, is collected, or its
process ends.

Liveness. The lock is ``flock(2)`` on the open lock file ``.metadata.lock``.
The kernel drops it when its holder dies (SIGKILL, OOM), so a killed save never
blocks the next one; a lock file it leaves behind is taken as free, and the
next save removes it. The holder unlinks the file while it still holds the
lock, and a taker checks that the file it locked is still the one at that path,
so removal and taking never race. Saves within one process are told apart by a
table here (flock on NFS does not separate two holders in one process).

Where it holds. Local disks: fully, as above. NFS: Linux's client implements
flock with the server's byte-range locks (NFSv4, or NLM on v3), which exclude
across hosts; a crashed host's locks go when its lease ends (NFSv4: 90 s by
default). Where the mount makes flock local to one host (``local_lock=flock`` or
``all``, ``nolock``), saves from other hosts are not excluded; where flock fails
outright (ENOLCK, EOPNOTSUPP), the save goes on unlocked and says so once in a
warning. Object stores (any file system without a local path) have no lock:
saves there are not excluded from each other. What still holds there: a save's
own commit replaces ``.metadata`` in one step (or keeps the new metadata aside
where it cannot), and a save removes only the files the metadata it replaced
named, so an interrupted save never loses the committed checkpoint.
"""
from __future__ import annotations

import contextlib
import errno
import os
import socket
import threading
import time
import warnings
import weakref
from typing import IO, Any, Callable, Dict, Optional, Tuple

from ._format import metadata_file_name
from .fs import FileSystemBase, PathLike

_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}
_lock = threading.Lock()
# Lock file path -> (its holder, by weak reference, or a callable returning it; the open lock file).
_held: Dict[str, Tuple[Callable[[], Any], IO[bytes]]] = {}
_warned = False


def lock_file_name(rank: Optional[int] = None) -> str:
    return metadata_file_name(rank) + ".lock"


def _ref(owner: Any, file: IO[bytes]) -> Callable[[], Any]:
    """``owner`` by weak reference; should it be collected while it holds the lock, ``file`` is closed, and
    the lock goes with it (once the table drops the reference, nothing is called)."""
    try:
        return weakref.ref(owner, lambda _: file.close())
    except TypeError:  # a writer that cannot be weakly referenced: held until it gives the lock back
        return lambda: owner


def _holder(file: IO[bytes]) -> str:
    try:
        file.seek(0)
        said = file.read(200).decode("utf-8", "replace").strip()
    except OSError:
        said = ""
    return said or "a process that has not said which"


def _busy(directory: PathLike, path: str, holder: str) -> RuntimeError:
    return RuntimeError(
        f"cannot save to {directory}: another save into it is in progress ({path} is held by {holder}); "
        "this save stopped before writing anything. Wait for the other save to finish, or give each job "
        "its own checkpoint directory"
    )


def _flock(path: str, directory: PathLike) -> Optional[IO[bytes]]:
    """``path`` opened and locked; None where this file system cannot lock. Raises where it is held."""
    global _warned
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        return None
    while True:
        file = open(path, "a+b", buffering=0)  # unbuffered: nothing is left to flush when it closes
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(file)
            file.close()
            raise _busy(directory, path, holder) from None
        except OSError as e:
            file.close()
            if e.errno not in _UNSUPPORTED:
                raise
            with contextlib.suppress(OSError):
                os.unlink(path)  # it locks nothing here
            if not _warned:
                _warned = True
                warnings.warn(
                    f"cannot lock {path} ({e.strerror}): saves into {directory} are not protected from "
                    "another save running into the same directory at the same time",
                    stacklevel=4,
                )
            return None
        try:
            opened, current = os.fstat(file.fileno()), os.stat(path)
            same = (opened.st_dev, opened.st_ino) == (current.st_dev, current.st_ino)
        except FileNotFoundError:
            same = False
        if same:
            return file
        file.close()  # its holder removed it between our open and our lock: take the new one


def acquire(owner: Any, fs: FileSystemBase, directory: PathLike, rank: Optional[int]) -> None:
    """Take the save lock of ``directory`` for ``owner``'s save (per ``rank`` with rank-local metadata);
    raise, having changed nothing, where another save holds it. ``owner``'s own earlier save is over."""
    release(owner)
    local = fs.local_path(fs.concat_path(directory, lock_file_name(rank)))
    if local is None:
        return  # an object store: see the module docstring
    key = os.path.abspath(local)
    with _lock:
        entry = _held.get(key)
        if entry is not None:
            if entry[0]() is not None:
                raise _busy(directory, key, f"another writer of this process (pid {os.getpid()})")
            del _held[key]  # its writer was collected without giving it back
            entry[1].close()
        file = _flock(key, directory)
        if file is None:
            return
        _held[key] = (_ref(owner, file), file)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S %z")
        with contextlib.suppress(OSError):  # who holds it, for the error of a save that finds it taken; a full
            file.truncate(0)  # disk must fail the save where its data goes, not here
            file.write(f"pid {os.getpid()} on host {socket.gethostname()}, since {stamp}".encode())
            file.flush()


def release(owner: Any) -> None:
    """Give back the lock ``owner`` holds, if any: its lock file goes, then the lock."""
    with _lock:
        for key, (ref, file) in list(_held.items()):
            holder = ref()
            if holder is None or holder is owner:
                del _held[key]
                if holder is owner:
                    with contextlib.suppress(OSError):  # else the next save takes it as free
                        os.unlink(key)
                file.close()

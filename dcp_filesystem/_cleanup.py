"""What a failed or killed save leaves behind, and taking it away again.

A save that fails in this process removes the files it created and says in its
error which file it was writing (and, for a full disk, how much room the save
needed and how much there was). A save that was killed (SIGKILL, power loss)
cannot clean up: its data files stay, named by no metadata, and the next save
of the same rank reclaims them before it writes (:func:`reclaim`).

What a rank may reclaim. DCP gives rank ``r`` of a save the file prefix
``__{r}_`` (``prepare_global_plan``, or the rank itself with rank-local
metadata), so no other rank of any save ever writes a file with that prefix:
rank ``r`` reclaims only its own prefix's data files, and only those that
neither ``.metadata`` nor ``__{r}.metadata`` names (the two metadata files that
can name them). Other ranks' leftovers are theirs to reclaim, or go when the
coordinator removes what the newly committed metadata does not name. Within one
process, files a save may still commit (an ``async_save`` still running) are
registered here and never reclaimed by another save.

Once a save has committed, the data files of earlier saves that its metadata
no longer names are removed (:func:`remove_stale`).
"""
from __future__ import annotations

import errno
import logging
import os
import re
import threading
import weakref
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

from . import _save_lock
from ._format import DEFAULT_SUFFIX, metadata_file_name
from ._safe_pickle import load_metadata
from .fs import FileSystemBase, PathLike

logger = logging.getLogger(__package__)

DATA_FILE = re.compile(r"__(\d+)_\d+(\.[0-9a-f]{8})?" + re.escape(DEFAULT_SUFFIX))
_RANK_PREFIX = re.compile(r"__(\d+)_")
_NAMED = "_dcp_filesystem_file_named"
_NO_SPACE_NOTED = "_dcp_filesystem_no_space_noted"

_lock = threading.Lock()
# Per writer (by id, with a weak reference to it), the files of its latest save that it may still
# commit. A writer nobody references any more has finished or been abandoned: its entry is ignored.
_unsettled: Dict[int, Tuple[Callable[[], Any], Set[str]]] = {}


def _key(fs: FileSystemBase, path: PathLike) -> str:
    local = fs.local_path(path)
    return os.path.abspath(local) if local is not None else str(path)


def register(owner: Any, fs: FileSystemBase, path: PathLike) -> None:
    """``owner``'s save is about to create ``path``; no other save in this process reclaims it until settled."""
    key = _key(fs, path)
    with _lock:
        entry = _unsettled.get(id(owner))
        if entry is None or entry[0]() is not owner:
            try:
                entry = (weakref.ref(owner), set())
            except TypeError:  # a writer that cannot be weakly referenced: held until settled
                entry = ((lambda: owner), set())
            _unsettled[id(owner)] = entry
        entry[1].add(key)


def settle(owner: Any) -> None:
    """``owner``'s save has committed or given up: its files are ordinary files again."""
    with _lock:
        entry = _unsettled.get(id(owner))
        if entry is not None and entry[0]() is owner:
            del _unsettled[id(owner)]


def in_progress(fs: FileSystemBase, path: PathLike) -> bool:
    """Whether a save in this process created ``path`` and may still commit it."""
    key = _key(fs, path)
    with _lock:
        for owner_id, (ref, files) in list(_unsettled.items()):
            if ref() is None:
                del _unsettled[owner_id]
            elif key in files:
                return True
    return False


def remove_files(fs: FileSystemBase, paths: Iterable[PathLike], why: str) -> int:
    """Remove each of ``paths`` that exists, best effort: a failure is logged, never raised. Returns how many went."""
    removed = 0
    for path in paths:
        try:
            if fs.exists(path):
                fs.rm_file(path)
                removed += 1
        except Exception as e:
            logger.warning("could not remove %s (%s): %s: %s", path, why, type(e).__name__, e)
    return removed


def free_bytes(fs: FileSystemBase, path: PathLike) -> Optional[int]:
    """Bytes free for an unprivileged writer where ``path`` lives, where the OS can tell."""
    local = fs.local_path(path)
    if local is None or not hasattr(os, "statvfs"):
        return None
    try:
        st = os.statvfs(local)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def name_file(error: BaseException, path: PathLike, path2: Optional[PathLike] = None) -> None:
    """Say in an I/O error's message which file the save was working on (once: the innermost call wins)."""
    if not isinstance(error, OSError) or getattr(error, _NAMED, False):
        return
    setattr(error, _NAMED, True)
    if error.errno is not None:
        if error.filename is None:
            error.filename = str(path)
            if path2 is not None and error.filename2 is None:
                error.filename2 = str(path2)
        elif error.filename != str(path):
            error.strerror = f"{error.strerror} (while writing {path})"
    elif len(error.args) == 1 and isinstance(error.args[0], str):
        error.args = (f"{error.args[0]}: {path!r}",)


def add_to_message(error: BaseException, text: str) -> None:
    """Append ``text`` to an I/O error's message."""
    if isinstance(error, OSError) and error.errno is not None:
        error.strerror = f"{error.strerror} ({text})"
    elif isinstance(error, OSError) and len(error.args) == 1 and isinstance(error.args[0], str):
        error.args = (f"{error.args[0]} ({text})",)


def note_no_space(error: BaseException, fs: FileSystemBase, directory: PathLike, needed: int) -> None:
    """For a full disk, say how many bytes the save needed and, where the OS tells, how many are free."""
    if not isinstance(error, OSError) or error.errno != errno.ENOSPC or getattr(error, _NO_SPACE_NOTED, False):
        return
    setattr(error, _NO_SPACE_NOTED, True)
    free = free_bytes(fs, directory)
    where = f"; {free} bytes are free in {directory}" if free is not None else ""
    add_to_message(error, f"this save needs at least {needed} bytes{where}")


def named_by(fs: FileSystemBase, path: PathLike) -> Optional[Set[str]]:
    """The data files the metadata at ``path`` names; None where they cannot be told."""
    with fs.create_stream(path, "rb") as stream:
        metadata = load_metadata(stream, str(path))
    storage_data = metadata.storage_data
    if not isinstance(storage_data, dict):
        return None
    names = {getattr(info, "relative_path", None) for info in storage_data.values()}
    return None if None in names else {str(name) for name in names}


def reclaim(fs: FileSystemBase, directory: PathLike, prefix: str) -> Optional[Set[str]]:
    """Remove this rank's data files that no committed metadata names (leftovers of a killed or failed save).

    ``prefix`` is the rank's file prefix (``__{rank}_``). Returns the directory's
    entry names as they are afterwards: None where ``fs`` cannot list, empty
    where listing failed.
    Nothing is removed where a metadata file that could name these files cannot
    be read. Failures are logged, never raised: reclaiming only makes room.
    """
    try:
        entries = fs.ls(directory)
    except Exception as e:
        logger.warning("cannot list %s to reclaim leftovers of earlier saves: %s: %s", directory, type(e).__name__, e)
        return set()
    if entries is None:
        return None
    names = {os.path.basename(str(entry)) for entry in entries}
    rank = _RANK_PREFIX.fullmatch(prefix)
    if rank is None:
        return names
    candidates = sorted(
        name
        for name in names
        if name.startswith(prefix)
        and DATA_FILE.fullmatch(name)
        and not in_progress(fs, fs.concat_path(directory, name))
    )
    if not candidates:
        return names
    named: Set[str] = set()
    for metadata_name in (metadata_file_name(None), metadata_file_name(int(rank.group(1)))):
        if metadata_name not in names:
            continue
        path = fs.concat_path(directory, metadata_name)
        try:
            files = named_by(fs, path)
        except FileNotFoundError:
            continue
        except Exception as e:
            logger.warning("not reclaiming leftovers in %s: cannot read %s: %s: %s", directory, path,
                           type(e).__name__, e)
            return names
        if files is None:
            logger.warning("not reclaiming leftovers in %s: %s does not say which files it uses", directory, path)
            return names
        named |= files
    stale = [name for name in candidates if name not in named]
    gone = []
    for name in stale:
        if remove_files(fs, [fs.concat_path(directory, name)], "left by an earlier save that did not commit"):
            gone.append(name)
    if gone:
        logger.info("reclaimed %d data file(s) that no metadata in %s names: %s", len(gone), directory,
                    ", ".join(gone))
    return names - set(gone)


def discard(owner: Any, fs: FileSystemBase, directory: PathLike, paths: List[PathLike], error: BaseException,
            needed: int) -> None:
    """After ``error`` failed ``owner``'s save into ``directory``: remove the files it created, give its lock
    back, then say in the error what a full disk lacked (with the room its files took given back)."""
    removed = remove_files(fs, paths, "written by a failed save")
    settle(owner)
    _save_lock.release(owner)  # before counting free bytes: its file is gone too
    note_no_space(error, fs, directory, needed)
    logger.warning("save to %s failed (%s: %s); removed the %d file(s) it had written",
                   directory, type(error).__name__, error, removed)


def remove_stale(fs: FileSystemBase, directory: PathLike, referenced: Set[str], rank: Optional[int],
                 listed: Optional[Set[str]], replaced: Set[str]) -> None:
    """Delete data files of earlier (or killed) saves that the committed metadata (naming ``referenced``)
    no longer names.

    Where the save listed the directory before it wrote (``listed``), only files there then are
    candidates, so none another rank's later save creates; never one that another save in this
    process may still commit. Where the file system cannot list, the candidates are the files
    the replaced metadata named (``replaced``): leftovers of killed saves stay there. A file
    that cannot be removed is logged and left for the next save. With rank-local metadata (``rank``)
    only that rank's files are candidates.
    """
    try:
        entries = fs.ls(directory) if listed is not None else sorted(replaced)
    except Exception as e:
        logger.warning("cannot list %s to remove earlier data files: %s: %s", directory, type(e).__name__, e)
        return
    if entries is None:
        return
    stale = []
    for entry in entries:
        name = os.path.basename(str(entry))
        match = DATA_FILE.fullmatch(name)
        if match is None or name in referenced or (rank is not None and int(match.group(1)) != rank):
            continue
        if listed is not None and name not in listed:
            continue
        path = fs.concat_path(directory, name)
        if not in_progress(fs, path):
            stale.append(path)
    remove_files(fs, stale, "no longer named by the committed metadata")

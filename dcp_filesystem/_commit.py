"""Committing a save: its metadata written beside the old one, renamed over it, then the old files removed.

Until the rename the earlier checkpoint is the one on disk, and a failure
removes what this save wrote (unless the rename took place after all); after it,
nothing of the new checkpoint is removed, and the directory is synced before the
data files only the old metadata named go.
"""
from __future__ import annotations

import logging
from typing import Any, List, Optional, Set, Tuple

from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.storage import WriteResult

from . import _cleanup, _compat
from ._format import CURRENT_DCP_VERSION, metadata_file_name, storage_info_for_disk
from ._safe_pickle import dump_metadata
from .fs import PathLike, fsync_stream

logger = logging.getLogger(__package__)


def commit(writer: Any, metadata: Metadata, results: List[List[WriteResult]], rank: Optional[int],
           listed: Optional[Set[str]]) -> None:
    """Write ``writer``'s metadata for a save whose ranks wrote ``results``; ``rank`` for rank-local metadata;
    ``listed``: the directory's entries when the save began writing (None where it cannot be listed)."""
    fs, directory = writer.fs, writer.path
    if "version" in _compat.METADATA_FIELDS:
        metadata.version = CURRENT_DCP_VERSION
    metadata.storage_data = {
        wr.index: storage_info_for_disk(wr.storage_data) for wr_list in results for wr in wr_list
    }
    if "storage_meta" in _compat.METADATA_FIELDS:
        metadata.storage_meta = writer.storage_meta()
    tmp_path = fs.concat_path(directory, f"{metadata_file_name(rank)}.tmp")
    metadata_path = writer.metadata_path
    data = dump_metadata(metadata)
    step: Tuple[PathLike, ...] = (tmp_path,)  # the file(s) the step that may fail works on
    old_removed = False
    replaced = _files_named_by(fs, metadata_path) if listed is None else set()
    try:
        with fs.create_stream(tmp_path, "wb") as metadata_file:
            metadata_file.write(data)
            if writer.sync_files:
                fsync_stream(metadata_file)
        step = (tmp_path, metadata_path)
        try:
            # Replaces the earlier metadata in one step: os.replace, or an object store's copy.
            fs.rename(tmp_path, metadata_path)
        except FileExistsError:
            # A file system whose rename keeps an existing file: the earlier metadata goes first.
            step = (metadata_path,)
            fs.rm_file(metadata_path)
            old_removed = True
            step = (tmp_path, metadata_path)
            fs.rename(tmp_path, metadata_path)
    except BaseException as e:
        _cleanup.name_file(e, *step)
        _abandon(writer, e, tmp_path, metadata_path, data, results, old_removed, renaming=len(step) == 2)
        raise
    # Committed: the new checkpoint is the one on disk, so nothing of it may be removed now.
    _cleanup.settle(writer)
    if writer.sync_files:
        try:
            fs.sync_dir(directory)
        except BaseException as e:
            _cleanup.name_file(e, directory)
            _cleanup.add_to_message(
                e, f"syncing the directory after {metadata_path} was replaced: the new checkpoint is in place "
                "but may not survive a power loss, so the earlier data files were kept"
            )
            raise
    referenced = {info.relative_path for info in metadata.storage_data.values()}
    _cleanup.remove_stale(fs, directory, referenced, rank, listed, replaced)


def _files_named_by(fs: Any, metadata_path: PathLike) -> Set[str]:
    """The data files the committed metadata names: where a file system cannot list, they are the
    files a new save replaces. Empty where there is no metadata or it cannot be read."""
    try:
        if not fs.exists(metadata_path):  # an object store's missing key is not FileNotFoundError
            return set()
        return _cleanup.named_by(fs, metadata_path) or set()
    except FileNotFoundError:
        return set()
    except Exception as e:
        logger.warning("cannot read %s to find the data files it names, which are kept: %s", metadata_path, e)
        return set()


def _metadata_is(fs: Any, metadata_path: PathLike, data: bytes) -> bool:
    """Whether ``metadata_path`` holds ``data`` (a rename that failed may still have taken place)."""
    try:
        with fs.create_stream(metadata_path, "rb") as stream:
            return stream.read() == data
    except Exception:
        return False


def _abandon(
    writer: Any,
    error: BaseException,
    tmp_path: PathLike,
    metadata_path: PathLike,
    data: bytes,
    results: List[List[WriteResult]],
    old_removed: bool,
    renaming: bool,
) -> None:
    """The commit failed before its rename is known to have happened: remove what this save wrote,
    unless its metadata is in place after all (a failed rename may have taken place) or the
    earlier metadata is already gone."""
    fs = writer.fs
    if renaming and _metadata_is(fs, metadata_path, data):
        _cleanup.remove_files(fs, [tmp_path], "renamed")
        _cleanup.settle(writer)
        _cleanup.add_to_message(error, f"the new checkpoint's {metadata_path} is in place nonetheless")
        return
    if old_removed:
        # This file system cannot replace on rename, and the earlier metadata went first: keep the
        # new checkpoint's files, which a rename of the temporary metadata makes loadable.
        _cleanup.add_to_message(
            error, f"the earlier {metadata_path} was already removed (this file system cannot replace a file "
            f"on rename); {tmp_path} holds the new checkpoint's metadata: rename it to use that checkpoint"
        )
        return
    # Every rank has finished writing by now: the results name all of this save's data files.
    names = {getattr(wr.storage_data, "relative_path", None) for wr_list in results for wr in wr_list}
    names.discard(None)
    paths = [fs.concat_path(writer.path, name) for name in sorted(names)] + [tmp_path]
    needed = sum(wr.size_in_bytes for wr_list in results for wr in wr_list) + len(data)
    _cleanup.discard(writer, fs, writer.path, paths, error, needed)

"""FileSystemReader: a StorageReader for checkpoints written by this package or by stock torch."""
from __future__ import annotations

import errno
import io
import logging
import os
import time
from typing import IO, Any, Dict, List, Optional

from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from . import _compat, _crc, _load_items
from ._format import _generate_uuid, metadata_file_name
from ._gc import gc_paused
from ._parallel import worker_count
from ._paths import check_storage_file
from ._safe_pickle import load_metadata
from .fs import FileSystem, FileSystemAttribute, PathLike
from .transforms import ExtensionRegistry, _StorageReaderTransforms

logger = logging.getLogger(__package__)


class FileSystemReader(StorageReader):
    fs = FileSystemAttribute()

    def __init__(
        self,
        path: PathLike,
        _extension_registry: Optional[ExtensionRegistry] = None,  # EXPERIMENTAL
        *,
        thread_count: int = 1,
    ) -> None:
        """
        Initialize the reader pointing to ``path``.

        Args:
            path: directory holding the checkpoint.
            _extension_registry: Extensions that can undo the stream transforms named in the metadata (EXPERIMENTAL).
            thread_count: Number of data files read at once. Default to 1, as upstream.
        """
        super().__init__()
        if not isinstance(thread_count, int) or thread_count < 1:
            raise ValueError(f"thread_count must be a positive int, got {thread_count!r}")
        _crc.log_implementation(logger)
        self.fs = FileSystem()
        self.path = self.fs.init_path(path)
        self.storage_data: Dict[Any, Any] = {}
        self._tensors: Dict[str, Any] = {}  # the metadata's state_dict_metadata
        self.load_id = _generate_uuid()
        self.transforms = _StorageReaderTransforms(_extension_registry)
        self.thread_count = thread_count
        self._metadata_error_logged = False
        # Kept for upstream parity (set by set_up_storage_reader, read by subclasses); unused here.
        self.rank: Optional[int] = None
        self.use_collectives = True

    def _slice_file(self, file: IO[bytes], sinfo: Any) -> IO[bytes]:
        """The bytes of one item as a stream of their own. Kept for upstream parity (subclasses call it);
        this reader itself reads items with positioned reads instead."""
        file.seek(sinfo.offset)
        return io.BytesIO(file.read(sinfo.length))

    def reset(self, checkpoint_id: Optional[PathLike] = None) -> None:
        self.storage_data = {}
        if checkpoint_id:
            self.path = self.fs.init_path(checkpoint_id)
        self.load_id = _generate_uuid()

    @gc_paused()
    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        start = time.perf_counter()
        if not _compat.load_planner_checks_sizes():
            self._check_sizes(plan, planner)
        per_file: Dict[str, List[ReadItem]] = {}
        for req in plan.items:
            relative_path = self.storage_data[req.storage_index].relative_path
            if relative_path not in per_file:
                named_by = f"{self._get_metadata_path()}: item {req.storage_index.fqn!r}"
                check_storage_file(relative_path, self.path, self.fs.local_path(self.path), named_by)
            per_file.setdefault(relative_path, []).append(req)
        stored_bytes = sum(self.storage_data[req.storage_index].length for req in plan.items)
        threads = worker_count(self.thread_count, len(per_file), stored_bytes)
        _load_items.read_files(
            self.fs, self.path, per_file, self.storage_data, self._tensors, planner, threads, self.transforms
        )
        if logger.isEnabledFor(logging.DEBUG):
            seconds = time.perf_counter() - start
            logger.debug(
                "read %d items, %d stored bytes from %d files on %d thread(s) in %s in %.3f s (%.3f GB/s)",
                len(plan.items), stored_bytes, len(per_file), threads, self.path, seconds,
                stored_bytes / max(seconds, 1e-9) / 1e9,
            )
        fut: Future = Future()
        fut.set_result(None)
        return fut

    def _check_sizes(self, plan: LoadPlan, planner: LoadPlanner) -> None:
        """Refuse a target whose (global) size is not the saved tensor's, as newer torch's planner does
        before it plans: older torch's fills the overlap and leaves the rest as it was."""
        state_dict = getattr(planner, "state_dict", None)
        if not isinstance(state_dict, dict):
            return
        for fqn in {req.dest_index.fqn for req in plan.items if req.type != LoadItemType.BYTE_IO}:
            saved, target = self._tensors.get(fqn), state_dict.get(fqn)
            if isinstance(saved, TensorStorageMetadata) and getattr(target, "size", None) is not None:
                if saved.size != target.size():
                    raise ValueError(f"Size mismatch between saved {saved.size} and current: {target.size()} for {fqn}")

    def _get_metadata_path(self, rank: Optional[int] = None) -> PathLike:
        return self.fs.concat_path(self.path, metadata_file_name(rank))

    @gc_paused()
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        try:
            with self.fs.create_stream(path, "rb") as metadata_file:
                metadata = load_metadata(metadata_file, str(path))
        except (FileNotFoundError, NotADirectoryError) as e:
            missing = self._no_checkpoint()
            if missing is None:
                raise  # a rank-local checkpoint's: dcp.load then tries __{rank}.metadata, not worth a log line
            self._log_metadata_error(missing, e)
            raise missing from None
        except Exception as e:
            self._log_metadata_error(e, e)
            raise
        if _compat.StorageMeta is not None:
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = _compat.StorageMeta()
            metadata.storage_meta.load_id = self.load_id
        return metadata

    def _no_checkpoint(self) -> Optional[OSError]:
        """The error to raise where this reader's local path holds no checkpoint at all: None where it may hold
        a rank-local one (``__{rank}.metadata``) or is not on the local disk."""
        local = self.fs.local_path(self.path)
        if local is None:
            return None
        if not os.path.exists(local):
            return FileNotFoundError(errno.ENOENT, "No such checkpoint directory", str(self.path))
        if not os.path.isdir(local):
            return NotADirectoryError(errno.ENOTDIR, "Checkpoint path is not a directory", str(self.path))
        try:
            names = os.listdir(local)
        except OSError as e:
            return e
        if not any(name.endswith(".metadata") for name in names):
            return FileNotFoundError(errno.ENOENT, "No checkpoint in this directory (no .metadata file)",
                                     str(self.path))
        return None

    def _log_metadata_error(self, error: BaseException, cause: BaseException) -> None:
        """One ERROR line per reader: torch 2.9-2.11's dcp.load drops read_metadata's error and raises a bare
        "metadata is None", and 2.13+'s calls read_metadata twice (global, then rank-local). The traceback
        only where DEBUG is on."""
        if self._metadata_error_logged:
            return
        self._metadata_error_logged = True
        exc_info = (type(cause), cause, cause.__traceback__) if logger.isEnabledFor(logging.DEBUG) else None
        logger.error("%s", error, exc_info=exc_info)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.storage_data = metadata.storage_data
        self._tensors = metadata.state_dict_metadata
        self.rank = kwargs.get("rank")
        self.use_collectives = kwargs.get("use_collectives", True)
        if self.storage_data is None:
            raise ValueError(f"{self._get_metadata_path()}: metadata has no storage_data")

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        # The reads are known now: the disk can start on them while DCP plans.
        _load_items.advise(self.fs, self.path, plan.items, self.storage_data, self._tensors)
        return plan

    def prepare_global_plan(self, plans: List[LoadPlan]) -> List[LoadPlan]:
        return plans

    @property
    def checkpoint_id(self) -> PathLike:
        """The checkpoint_id that will be used to load the checkpoint."""
        return self.path

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: PathLike) -> bool:
        return FileSystem.validate_checkpoint_id(checkpoint_id)

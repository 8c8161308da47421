"""FileSystemWriter: a StorageWriter that writes DCP checkpoints through a FileSystemBase."""
from __future__ import annotations

import dataclasses
import logging
import os
import queue
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from . import _cleanup, _commit, _compat, _crc, _save_lock
from ._format import (
    DEFAULT_SUFFIX,
    SerializationFormat,
    _generate_uuid,
    _StoragePrefix,
    metadata_file_name,
)
from ._gc import gc_paused
from ._safetensors import dtype_name

# _write_item and _write_files_from_queue: upstream's names, kept here.
from ._save_files import _item_size, _write_files_from_queue, _write_item, write_files  # noqa: F401
from ._warn import warn_at_caller
from .fs import FileSystem, FileSystemAttribute, PathLike
from .transforms import StreamTransformExtension, _StorageWriterTransforms

logger = logging.getLogger(__package__)


def _split_by_size_and_type(bins: int, items: List[WriteItem]) -> List[List[WriteItem]]:
    """Spread items over ``bins`` files: byte items round-robin, tensors largest first to the lightest file."""
    if bins == 1:
        return [items]
    buckets: List[List[WriteItem]] = [[] for _ in range(bins)]
    bucket_sizes = [0] * bins
    byte_items = [wi for wi in items if wi.type == WriteItemType.BYTE_IO]
    for i, wi in enumerate(byte_items):
        buckets[i % bins].append(wi)
    tensor_items = sorted((wi for wi in items if wi.type != WriteItemType.BYTE_IO), key=_item_size, reverse=True)
    for wi in tensor_items:
        lightest = bucket_sizes.index(min(bucket_sizes))
        buckets[lightest].append(wi)
        bucket_sizes[lightest] += _item_size(wi)
    return buckets


class _FileSystemWriter(StorageWriter):
    """
    Basic implementation of StorageWriter using file IO.

    The checkpoint consists of one file per write request plus a ``.metadata``
    file (``__{rank}.metadata`` per rank when saving without collectives).
    """

    fs = FileSystemAttribute()
    # Whether SAFETENSORS headers get room for their entries' CRC-32s, which a subclass fills in once written.
    _crc32_room = False

    def __init__(
        self,
        path: PathLike,
        single_file_per_rank: bool = True,
        sync_files: bool = True,
        thread_count: int = 1,
        per_thread_copy_ahead: int = 10_000_000,
        overwrite: bool = True,
        _extensions: Optional[Sequence[StreamTransformExtension]] = None,
        serialization_format: SerializationFormat = SerializationFormat.TORCH_SAVE,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        """
        Initialize the writer pointing to ``path``.

        Args:
            path: directory where the checkpoint will be written to.
            single_file_per_rank: Produce one file per rank instead of one file per tensor/blob. Default to True.
            sync_files : force files to be synced to permanent storage. Default to True.
            thread_count: Number of IO threads to use to write. Default to 1.
            per_thread_copy_ahead: How many bytes to copy from the GPU ahead of saving them. Default 10Mb.
            overwrite: Whether to allow overwriting existing checkpoints. Defaults to True.
            _extensions: Extensions to apply to output streams (EXPERIMENTAL)
            serialization_format: TORCH_SAVE (default) or SAFETENSORS.

        N. B. If sync_files is disabled, there's no guarantee that the checkpoint will be consistent
        in the case of a failure.
        """
        super().__init__()
        if not isinstance(thread_count, int) or thread_count < 1:
            raise ValueError(f"thread_count must be a positive int, got {thread_count!r}")
        serialization_format = SerializationFormat(getattr(serialization_format, "value", serialization_format))
        if serialization_format == SerializationFormat.SAFETENSORS and _extensions:
            raise ValueError(
                "_extensions cannot be combined with SerializationFormat.SAFETENSORS: "
                "transformed bytes would not be a valid safetensors file"
            )
        _crc.log_implementation(logger)
        self.fs = FileSystem()
        self.path = self.fs.init_path(path)
        self.single_file_per_rank = single_file_per_rank
        self.sync_files = sync_files
        self.thread_count = thread_count
        self.per_thread_copy_ahead = per_thread_copy_ahead
        self.save_id = _generate_uuid()
        self.overwrite = overwrite
        self.transforms = _StorageWriterTransforms(_extensions)
        self.serialization_format = serialization_format
        self.rank: Optional[int] = None
        self.use_collectives: bool = True
        # The directory's entries when this save began writing (None: not listed): the data files
        # its commit may remove, so files another rank's later save creates are never touched.
        self._listed: Optional[Set[str]] = None

    def reset(self, checkpoint_id: Optional[PathLike] = None) -> None:
        _save_lock.release(self)  # an earlier save that failed on another rank never reached finish
        if checkpoint_id:
            self.path = self.fs.init_path(checkpoint_id)
        self.save_id = _generate_uuid()
        self._listed = None

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.rank = kwargs.get("rank")
        self.use_collectives = kwargs.get("use_collectives", True)

    def _rank_local(self) -> bool:
        return not self.use_collectives and self.rank is not None

    def _metadata_exists(self) -> bool:
        # Without collectives every rank writes its own metadata; rank 0's stands for the checkpoint.
        return self.fs.exists(self._get_metadata_path(rank=None if self.use_collectives else 0))

    def _check_items(self, plan: SavePlan) -> None:
        if self.serialization_format != SerializationFormat.SAFETENSORS:
            return
        for wi in plan.items:
            if wi.type != WriteItemType.BYTE_IO:
                dtype_name(wi.tensor_data.properties.dtype, wi.index.fqn)

    def _check_path(self) -> None:
        local = self.fs.local_path(self.path)
        if local is None:
            return
        path = Path(local)
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(f"checkpoint path {self.path} exists and is not a directory")
        existing = next(p for p in (path, *path.absolute().parents) if p.exists())
        if not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(f"cannot write checkpoint {self.path}: directory {existing} is not writable")

    @gc_paused()
    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        self._check_items(plan)
        self._check_path()
        self.fs.mkdir(self.path)
        if self._metadata_exists():
            if not self.overwrite:
                raise RuntimeError(f"Checkpoint already exists in {self.path} and self.overwrite=False.")
            warn_at_caller(
                f"Detected an existing checkpoint in {self.path}, overwriting since self.overwrite=True. The old"
                " checkpoint stays loadable until the new .metadata replaces it; then the data files only the old"
                " one named are removed. Pass overwrite=False to raise instead."
            )
        if self._rank_local():
            plan = dataclasses.replace(plan, storage_data=_StoragePrefix(f"__{self.rank}_"))
        return plan

    @gc_paused()
    def prepare_global_plan(self, plans: List[SavePlan]) -> List[SavePlan]:
        # Before any rank writes or removes a file: one save at a time in a directory (see _save_lock).
        _save_lock.acquire(self, self.fs, self.path, self.rank if self._rank_local() else None)
        return [
            dataclasses.replace(plan, storage_data=_StoragePrefix(f"__{i}_")) if plan.storage_data is None else plan
            for i, plan in enumerate(plans)
        ]

    def _new_file_name(self, prefix: str, n: int) -> Tuple[str, PathLike]:
        file_name = f"{prefix}{n}{DEFAULT_SUFFIX}"
        path = self.fs.concat_path(self.path, file_name)
        if self.fs.exists(path):
            # Never rewrite a file the committed checkpoint may name: it must stay loadable
            # until the new metadata replaces it.
            file_name = f"{prefix}{n}.{self.save_id[:8]}{DEFAULT_SUFFIX}"
            path = self.fs.concat_path(self.path, file_name)
        return file_name, path

    @gc_paused()
    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[List[WriteResult]]:
        prefix = plan.storage_data.prefix
        # An earlier save by this writer is over; leftovers of killed saves go before they cost room.
        _cleanup.settle(self)
        self._listed = _cleanup.reclaim(self.fs, self.path, prefix)
        buckets = (
            [b for b in _split_by_size_and_type(self.thread_count, plan.items) if b]
            if self.single_file_per_rank
            else [[item] for item in plan.items]
        )
        file_queue: queue.Queue = queue.Queue()
        for n, bucket in enumerate(buckets):
            file_name, path = self._new_file_name(prefix, n)
            file_queue.put((path, file_name, bucket))
        return self._write_data(planner, file_queue)

    def _write_data(self, planner: SavePlanner, file_queue: queue.Queue) -> Future[List[WriteResult]]:
        fut: Future[List[WriteResult]] = Future()
        fut.set_result(write_files(self, planner, file_queue))
        return fut

    @gc_paused()
    def finish(self, metadata: Metadata, results: List[List[WriteResult]]) -> None:
        try:
            listed, self._listed = self._listed, None
            _commit.commit(self, metadata, results, self.rank if self._rank_local() else None, listed)
        finally:
            _save_lock.release(self)

    def storage_meta(self) -> Optional[Any]:
        if _compat.StorageMeta is None:
            return None
        return _compat.StorageMeta(checkpoint_id=self.checkpoint_id, save_id=self.save_id)

    def _get_metadata_path(self, rank: Optional[int] = None) -> PathLike:
        return self.fs.concat_path(self.path, metadata_file_name(rank))

    @property
    def metadata_path(self) -> PathLike:
        """Where ``finish`` writes this rank's metadata (``.metadata``, or ``__{rank}.metadata`` rank-local)."""
        return self._get_metadata_path(self.rank if self._rank_local() else None)

    @property
    def checkpoint_id(self) -> PathLike:
        """The checkpoint_id that will be used to save the checkpoint."""
        return self.path

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: PathLike) -> bool:
        return FileSystem.validate_checkpoint_id(checkpoint_id)


class FileSystemWriter(_FileSystemWriter, _compat.BlockingAsyncStager):
    """
    Basic implementation of StorageWriter using file IO.

    The checkpoint consists of one file per write request plus a global
    ``.metadata`` file with the serialized metadata if rank coordination is
    enabled, or a rank local ``__{rank}.metadata`` file if it is not.
    """

    def __init__(
        self,
        path: PathLike,
        single_file_per_rank: bool = True,
        sync_files: bool = True,
        thread_count: int = 1,
        per_thread_copy_ahead: int = 10_000_000,
        cache_staged_state_dict: bool = False,
        overwrite: bool = True,
        _extensions: Optional[Sequence[StreamTransformExtension]] = None,
        serialization_format: SerializationFormat = SerializationFormat.TORCH_SAVE,
    ) -> None:
        """
        Initialize the writer pointing to ``path``.

        Args:
            path: directory where the checkpoint will be written to.
            single_file_per_rank: Produce one file per rank instead of one file per tensor/blob. Default to True.
            sync_files : force files to be synced to permanent storage. Default to True.
            thread_count: Number of IO threads to use to write. Default to 1.
            per_thread_copy_ahead: How many bytes to copy from the GPU ahead of saving them. Default 10Mb.
            cache_staged_state_dict: Whether to cache the staged state_dict. This option decreases staging
                latency at the cost of increased memory usage. Additionally, if this parameter is set to True,
                it's the expectation that the stager is maintained and reused for multiple dcp.async_save calls.
                Default to False.
            overwrite: Whether to allow overwriting existing checkpoints. Defaults to True.
            _extensions: Extensions to apply to output streams (EXPERIMENTAL)
            serialization_format: TORCH_SAVE (default) or SAFETENSORS.

        N. B. If sync_files is disabled, there's no guarantee that the checkpoint will be consistent
        in the case of a failure.
        """
        _FileSystemWriter.__init__(
            self,
            path=path,
            single_file_per_rank=single_file_per_rank,
            sync_files=sync_files,
            thread_count=thread_count,
            per_thread_copy_ahead=per_thread_copy_ahead,
            overwrite=overwrite,
            _extensions=_extensions,
            serialization_format=serialization_format,
        )
        _compat.BlockingAsyncStager.__init__(self, cache_staged_state_dict=cache_staged_state_dict)

    def stage(self, state_dict: Dict[str, Any]) -> Dict[str, Any]:
        """Override of AsyncStager.stage: the staged copy is already on CPU, so nothing is copied ahead."""
        self.per_thread_copy_ahead = 0
        if self.cache_staged_state_dict and _compat.available_device_type() is not None:
            return super().stage(state_dict)
        # torch's cache is pinned memory, which needs an accelerator; and some torch versions' uncached
        # stage hands CPU tensors back uncopied, so a later in-place update would leak into the save.
        return _compat.cpu_copy(state_dict)

"""FileSystemWriter: a StorageWriter that writes DCP checkpoints through a FileSystemBase."""
from __future__ import annotations

import dataclasses
import io
import logging
import os
import queue
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

import torch
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from . import _cleanup, _compat, _crc, _save_lock
from ._bytes import chunk_nbytes, tensor_bytes
from ._checksum import ChecksummingWriter, record_crc32
from ._cleanup import DATA_FILE as _DATA_FILE
from ._format import (
    CURRENT_DCP_VERSION,
    DEFAULT_SUFFIX,
    SerializationFormat,
    _generate_uuid,
    _StorageInfo,
    _StoragePrefix,
    metadata_file_name,
    storage_info_for_disk,
)
from ._gc import gc_paused
from ._parallel import run_in_threads, worker_count
from ._safe_pickle import dump_metadata
from ._safetensors import dtype_name, file_layout, mark_ours
from ._torch_save import save_tensor
from ._warn import warn_at_caller
from ._writeback import with_early_writeback
from .fs import FileSystem, FileSystemAttribute, PathLike, fsync_stream
from .loaders import _OverlappingCpuLoader, _SerialCpuLoader, _TensorLoader, caller_device_context, on_device
from .transforms import StreamTransformExtension, _StorageWriterTransforms

logger = logging.getLogger(__package__)
# An fsync'd file costs about as much time as writing this many bytes, and overlaps across threads as well.
_SYNCED_FILE_BYTES = 1 << 20


def _item_size(item: WriteItem) -> int:
    """Bytes of the tensor an item names (upstream's estimate, used to balance files)."""
    if item.tensor_data is None:
        raise AssertionError("WriteItem tensor_data must not be None")
    size = 1
    for s in item.tensor_data.size:
        size *= s
    return size * item.tensor_data.properties.dtype.itemsize


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


def _write_item(
    transforms: _StorageWriterTransforms,
    stream: io.IOBase,
    data: Union[io.BytesIO, torch.Tensor],
    write_item: WriteItem,
    storage_key: str,
    serialization_format: SerializationFormat = SerializationFormat.TORCH_SAVE,
) -> WriteResult:
    offset = stream.tell()
    if isinstance(stream, ChecksummingWriter):
        stream.start_item()
    if transforms.extensions:
        transform_to, descriptors = transforms.transform_save_stream(write_item, stream)
    else:  # the bytes go straight to the file's stream: no wrapper, no flush per item
        transform_to, descriptors = stream, []
    if write_item.type == WriteItemType.BYTE_IO:
        if not isinstance(data, io.BytesIO):
            raise AssertionError("Data must be io.BytesIO for BYTE_IO write items")
        transform_to.write(data.getvalue())  # not getbuffer(): see _bytes.byte_count for why
    else:
        if not isinstance(data, torch.Tensor) or data.device.type != "cpu":
            raise AssertionError("Data must be a CPU torch.Tensor for tensor write items")
        if serialization_format == SerializationFormat.TORCH_SAVE:
            save_tensor(data, transform_to)
        else:
            contiguous = data.contiguous()
            transform_to.write(tensor_bytes(contiguous))
    if transform_to is not stream:
        transform_to.close()
    length = stream.tell() - offset
    # Left out when empty, as upstream does, so older readers see the fields they know.
    info = _StorageInfo(storage_key, offset, length, transform_descriptors=descriptors or None)
    if isinstance(stream, ChecksummingWriter):
        record_crc32(info, stream.crc)
    if serialization_format == SerializationFormat.SAFETENSORS:
        mark_ours(info)
    return WriteResult(index=write_item.index, size_in_bytes=length, storage_data=info)


def _make_loader(planner: SavePlanner, inflight_threshhold: int, stream: Optional[Any]) -> _TensorLoader:
    if inflight_threshhold > 0 and _compat.available_device_type() is not None:
        return _OverlappingCpuLoader(planner.resolve_data, stream=stream, inflight_threshhold=inflight_threshhold)
    return _SerialCpuLoader(planner.resolve_data)


def _thread_stream(thread_count: int) -> Optional[Any]:
    """A stream of its own for each writer thread, so threads never wait on each other's copies."""
    device_type = _compat.available_device_type()
    if thread_count == 1 or device_type is None:
        return None
    return _compat.device_module(device_type).Stream()


def _write_one_file(
    stream: io.IOBase,
    storage_key: str,
    write_items: List[WriteItem],
    planner: SavePlanner,
    transforms: _StorageWriterTransforms,
    loader: _TensorLoader,
    serialization_format: SerializationFormat,
    crc32_room: bool = False,
) -> List[WriteResult]:
    tensor_items = [wi for wi in write_items if wi.type != WriteItemType.BYTE_IO]
    byte_items = [(wi, planner.resolve_data(wi)) for wi in write_items if wi.type == WriteItemType.BYTE_IO]
    safetensors = serialization_format == SerializationFormat.SAFETENSORS
    if safetensors:
        # The header comes first, so the order is fixed now: both loaders keep a size-sorted order.
        tensor_items.sort(key=_item_size)
        header, layout = file_layout(byte_items, tensor_items, crc32_room)
        stream.write(header)
    for wi in tensor_items:
        loader.add(_item_size(wi), wi)
    loader.start_loading()

    results = [
        _write_item(transforms, stream, data, wi, storage_key, serialization_format) for wi, data in byte_items
    ]
    expected = iter(tensor_items)
    for tensor, wi in loader.values():
        if safetensors:
            if wi is not next(expected):
                raise AssertionError("tensor loader changed the order fixed by the safetensors header")
            key, nbytes = layout[id(wi)]
            if tensor.dtype != wi.tensor_data.properties.dtype or tensor.numel() * tensor.element_size() != nbytes:
                raise ValueError(
                    f"{storage_key}: tensor {key!r} resolved to {tensor.dtype} {list(tensor.shape)}, "
                    f"but the save plan announced {wi.tensor_data.properties.dtype} "
                    f"{list(wi.tensor_data.chunk.sizes)}"
                )
        results.append(_write_item(transforms, stream, tensor, wi, storage_key, serialization_format))
    return results


def _drain(file_queue: queue.Queue) -> None:
    """Take every file not yet started off ``file_queue``."""
    while True:
        try:
            file_queue.get_nowait()
        except queue.Empty:
            return


def _write_files_from_queue(
    create_stream: Callable,
    file_queue: queue.Queue,
    result_queue: queue.Queue,
    planner: SavePlanner,
    transforms: _StorageWriterTransforms,
    inflight_threshhold: int,
    use_fsync: bool,
    thread_count: int,
    serialization_format: SerializationFormat = SerializationFormat.TORCH_SAVE,
    crc32_room: bool = False,
) -> None:
    """Write files from ``file_queue`` until it is empty, putting each file's results on ``result_queue``.
    ``crc32_room``: SAFETENSORS headers get room for their entries' CRC-32s (see _safetensors.with_crc32s)."""
    stream_for_copies = _thread_stream(thread_count)
    while True:
        try:
            file_name, storage_key, write_items = file_queue.get_nowait()
        except queue.Empty:
            return
        loader = _make_loader(planner, inflight_threshhold, stream_for_copies)
        with create_stream(file_name, "wb") as stream:
            if use_fsync:
                stream = with_early_writeback(stream)
            checksumming = ChecksummingWriter(stream)
            results = _write_one_file(
                checksumming, storage_key, write_items, planner, transforms, loader, serialization_format, crc32_room
            )
            checksumming.flush()  # its gathered small writes
            if use_fsync:
                fsync_stream(stream)
        result_queue.put(results)


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
        result_queue: queue.Queue = queue.Queue()
        files, start = file_queue.qsize(), time.perf_counter()
        tensor_items = [
            wi for _, _, items in list(file_queue.queue) for wi in items if wi.type != WriteItemType.BYTE_IO
        ]
        tensor_bytes = sum(_item_size(wi) for wi in tensor_items)
        synced_files_cost = files * _SYNCED_FILE_BYTES if self.sync_files else 0
        workers = worker_count(self.thread_count, files, tensor_bytes + synced_files_cost)
        device = caller_device_context() if workers > 1 else None
        created: List[PathLike] = []
        created_lock = threading.Lock()

        @contextmanager
        def create_stream(path: PathLike, mode: str) -> Iterator[io.IOBase]:
            """The file system's stream, with the file remembered (to remove it if the save fails) and
            its name put into any I/O error."""
            with created_lock:
                created.append(path)
            _cleanup.register(self, self.fs, path)
            try:
                with self.fs.create_stream(path, mode) as stream:
                    yield stream
            except BaseException as e:
                _cleanup.name_file(e, path)
                raise

        def work(context: Any = None) -> None:
            with on_device(context):
                _write_files_from_queue(
                    create_stream,
                    file_queue,
                    result_queue,
                    planner,
                    self.transforms,
                    self.per_thread_copy_ahead,
                    self.sync_files,
                    workers,
                    self.serialization_format,
                    self._crc32_room,
                )

        try:
            # The calling thread is on its device already; the others adopt it. After an error (or
            # Ctrl-C while waiting) the other threads stop after their current file.
            run_in_threads([work] + [lambda: work(device)] * (workers - 1), "writer", stop=lambda: _drain(file_queue))
        except BaseException as e:
            # Tensor bytes of the chunks this rank writes: the payload alone, so "at least".
            self._discard(created, e, sum(chunk_nbytes(wi) for wi in tensor_items))
            raise
        results: List[WriteResult] = []
        while not result_queue.empty():
            results += result_queue.get_nowait()
        if logger.isEnabledFor(logging.DEBUG):
            seconds = time.perf_counter() - start
            nbytes = sum(r.size_in_bytes for r in results)
            logger.debug(
                "wrote %d items, %d bytes in %d files on %d thread(s) to %s in %.3f s (%.3f GB/s)",
                len(results), nbytes, files, workers, self.path, seconds, nbytes / max(seconds, 1e-9) / 1e9,
            )
        fut: Future[List[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def _discard(self, paths: List[PathLike], error: BaseException, needed: int) -> None:
        """After ``error`` failed this save: remove the files it created, give its lock back, then say in
        the error what a full disk lacked (with the room its files took given back)."""
        removed = _cleanup.remove_files(self.fs, paths, "written by a failed save")
        _cleanup.settle(self)
        _save_lock.release(self)  # before counting free bytes: its file is gone too
        _cleanup.note_no_space(error, self.fs, self.path, needed)
        logger.warning("save to %s failed (%s: %s); removed the %d file(s) it had written",
                       self.path, type(error).__name__, error, removed)

    @gc_paused()
    def finish(self, metadata: Metadata, results: List[List[WriteResult]]) -> None:
        try:
            self._commit(metadata, results)
        finally:
            _save_lock.release(self)

    def _commit(self, metadata: Metadata, results: List[List[WriteResult]]) -> None:
        if "version" in _compat.METADATA_FIELDS:
            metadata.version = CURRENT_DCP_VERSION
        metadata.storage_data = {
            wr.index: storage_info_for_disk(wr.storage_data) for wr_list in results for wr in wr_list
        }
        if "storage_meta" in _compat.METADATA_FIELDS:
            metadata.storage_meta = self.storage_meta()

        rank = self.rank if self._rank_local() else None
        listed, self._listed = self._listed, None
        tmp_path = self.fs.concat_path(self.path, f"{metadata_file_name(rank)}.tmp")
        metadata_path = self.metadata_path
        data = dump_metadata(metadata)
        step: Tuple[PathLike, ...] = (tmp_path,)  # the file(s) the step that may fail works on
        old_removed = False
        replaced = self._files_named_by(metadata_path) if listed is None else set()
        try:
            with self.fs.create_stream(tmp_path, "wb") as metadata_file:
                metadata_file.write(data)
                if self.sync_files:
                    fsync_stream(metadata_file)
            step = (tmp_path, metadata_path)
            try:
                # Replaces the earlier metadata in one step: os.replace, or an object store's copy.
                self.fs.rename(tmp_path, metadata_path)
            except FileExistsError:
                # A file system whose rename keeps an existing file: the earlier metadata goes first.
                step = (metadata_path,)
                self.fs.rm_file(metadata_path)
                old_removed = True
                step = (tmp_path, metadata_path)
                self.fs.rename(tmp_path, metadata_path)
        except BaseException as e:
            _cleanup.name_file(e, *step)
            renaming = len(step) == 2
            self._abandon_commit(e, tmp_path, metadata_path, data, results, old_removed, renaming)
            raise
        # Committed: the new checkpoint is the one on disk, so nothing of it may be removed now.
        _cleanup.settle(self)
        if self.sync_files:
            try:
                self.fs.sync_dir(self.path)
            except BaseException as e:
                _cleanup.name_file(e, self.path)
                _cleanup.add_to_message(
                    e, f"syncing the directory after {metadata_path} was replaced: the new checkpoint is in place "
                    "but may not survive a power loss, so the earlier data files were kept"
                )
                raise
        self._remove_stale_data_files(metadata, rank, listed, replaced)

    def _files_named_by(self, metadata_path: PathLike) -> Set[str]:
        """The data files the committed metadata names: where a file system cannot list, they are the
        files a new save replaces. Empty where there is no metadata or it cannot be read."""
        try:
            if not self.fs.exists(metadata_path):  # an object store's missing key is not FileNotFoundError
                return set()
            return _cleanup.named_by(self.fs, metadata_path) or set()
        except FileNotFoundError:
            return set()
        except Exception as e:
            logger.warning("cannot read %s to find the data files it names, which are kept: %s", metadata_path, e)
            return set()

    def _metadata_is(self, metadata_path: PathLike, data: bytes) -> bool:
        """Whether ``metadata_path`` holds ``data`` (a rename that failed may still have taken place)."""
        try:
            with self.fs.create_stream(metadata_path, "rb") as stream:
                return stream.read() == data
        except Exception:
            return False

    def _abandon_commit(
        self,
        error: BaseException,
        tmp_path: PathLike,
        metadata_path: PathLike,
        data: bytes,
        results: List[List[WriteResult]],
        old_removed: bool,
        renaming: bool,
    ) -> None:
        """``finish`` failed before its rename is known to have happened: remove what this save wrote,
        unless its metadata is in place after all (a failed rename may have taken place) or the
        earlier metadata is already gone."""
        if renaming and self._metadata_is(metadata_path, data):
            _cleanup.remove_files(self.fs, [tmp_path], "renamed")
            _cleanup.settle(self)
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
        paths = [self.fs.concat_path(self.path, name) for name in sorted(names)] + [tmp_path]
        needed = sum(wr.size_in_bytes for wr_list in results for wr in wr_list) + len(data)
        self._discard(paths, error, needed)

    def _remove_stale_data_files(
        self, metadata: Metadata, rank: Optional[int], listed: Optional[Set[str]], replaced: Set[str]
    ) -> None:
        """Delete data files of earlier (or killed) saves that the committed metadata no longer names.

        Where this save listed the directory before it wrote (``listed``), only files there then are
        candidates, so none another rank's later save creates; never one that another save in this
        process may still commit. Where the file system cannot list, the candidates are the files
        the replaced metadata named (``replaced``): leftovers of killed saves stay there. A file
        that cannot be removed is logged and left for the next save. With rank-local metadata only
        this rank's files are candidates.
        """
        try:
            entries = self.fs.ls(self.path) if listed is not None else sorted(replaced)
        except Exception as e:
            logger.warning("cannot list %s to remove earlier data files: %s: %s", self.path, type(e).__name__, e)
            return
        if entries is None:
            return
        referenced = {info.relative_path for info in metadata.storage_data.values()}
        stale = []
        for entry in entries:
            name = os.path.basename(str(entry))
            match = _DATA_FILE.fullmatch(name)
            if match is None or name in referenced or (rank is not None and int(match.group(1)) != rank):
                continue
            if listed is not None and name not in listed:
                continue
            path = self.fs.concat_path(self.path, name)
            if not _cleanup.in_progress(self.fs, path):
                stale.append(path)
        _cleanup.remove_files(self.fs, stale, "no longer named by the committed metadata")

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

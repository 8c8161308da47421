"""One rank's data files of a save: each item in its file's format, checksummed, files on threads.

A file's tensors come from a loader (copied off their device ahead of writing,
``loaders.py``); each item goes through the stream transforms, if any, to its
codec (``_torch_save.save_tensor``, ``_safetensors.write_tensor``), and its
storage info records its place, its CRC-32 (``_checksum``) and, for a
SAFETENSORS entry, that it is one.
"""
from __future__ import annotations

import io
import logging
import queue
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, List, Optional, Union

import torch
from torch.distributed.checkpoint.planner import SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult

from . import _cleanup, _compat, _safetensors
from ._bytes import chunk_nbytes
from ._checksum import ChecksummingWriter, record_blocks, record_crc32
from ._format import SerializationFormat, _StorageInfo
from ._parallel import run_in_threads, worker_count
from ._torch_save import save_tensor
from ._writeback import with_early_writeback
from .fs import PathLike, fsync_stream
from .loaders import _OverlappingCpuLoader, _SerialCpuLoader, _TensorLoader, caller_device_context, on_device
from .transforms import _StorageWriterTransforms

logger = logging.getLogger(__package__)
# An fsync'd file costs about as much time as writing this many bytes, and overlaps across threads as well.
_SYNCED_FILE_BYTES = 1 << 20


def _item_size(item: WriteItem) -> int:
    """Bytes of the tensor an item names (upstream's estimate, used to balance files and order their items)."""
    if item.tensor_data is None:
        raise AssertionError("WriteItem tensor_data must not be None")
    size = 1
    for s in item.tensor_data.size:
        size *= s
    return size * item.tensor_data.properties.dtype.itemsize


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
    safetensors = serialization_format == SerializationFormat.SAFETENSORS
    if write_item.type == WriteItemType.BYTE_IO:
        if not isinstance(data, io.BytesIO):
            raise AssertionError("Data must be io.BytesIO for BYTE_IO write items")
        transform_to.write(data.getvalue())  # not getbuffer(): see _bytes.byte_count for why
    else:
        if not isinstance(data, torch.Tensor) or data.device.type != "cpu":
            raise AssertionError("Data must be a CPU torch.Tensor for tensor write items")
        (_safetensors.write_tensor if safetensors else save_tensor)(data, transform_to)
    if transform_to is not stream:
        transform_to.close()
    length = stream.tell() - offset
    # Left out when empty, as upstream does, so older readers see the fields they know.
    info = _StorageInfo(storage_key, offset, length, transform_descriptors=descriptors or None)
    if isinstance(stream, ChecksummingWriter):
        record_crc32(info, stream.crc)
        blocks = stream.blocks
        if blocks is not None and not descriptors and isinstance(data, torch.Tensor):
            if blocks.cover(data.numel() * data.element_size()):
                record_blocks(info, blocks)
    if safetensors:
        _safetensors.mark_ours(info)
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
    check: Optional[Callable[[torch.Tensor, WriteItem], None]] = None
    if serialization_format == SerializationFormat.SAFETENSORS:
        check = _safetensors.start_file(stream, storage_key, byte_items, tensor_items, _item_size, crc32_room)
    for wi in tensor_items:
        loader.add(_item_size(wi), wi)
    loader.start_loading()

    results = [
        _write_item(transforms, stream, data, wi, storage_key, serialization_format) for wi, data in byte_items
    ]
    for tensor, wi in loader.values():
        if check is not None:
            check(tensor, wi)
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


def write_files(writer: Any, planner: SavePlanner, file_queue: queue.Queue) -> List[WriteResult]:
    """Write the files of ``file_queue`` ((path, file name, items) each) as ``writer`` is set up to, on as many
    threads as they are worth; every rank's results. After an error the files written are removed
    (``_cleanup.discard``) and the error raised."""
    fs = writer.fs
    result_queue: queue.Queue = queue.Queue()
    files, start = file_queue.qsize(), time.perf_counter()
    tensor_items = [wi for _, _, items in list(file_queue.queue) for wi in items if wi.type != WriteItemType.BYTE_IO]
    synced_files_cost = files * _SYNCED_FILE_BYTES if writer.sync_files else 0
    workers = worker_count(writer.thread_count, files, sum(map(_item_size, tensor_items)) + synced_files_cost)
    device = caller_device_context() if workers > 1 else None
    created: List[PathLike] = []
    created_lock = threading.Lock()

    @contextmanager
    def create_stream(path: PathLike, mode: str) -> Iterator[io.IOBase]:
        """The file system's stream, with the file remembered (to remove it if the save fails) and
        its name put into any I/O error."""
        with created_lock:
            created.append(path)
        _cleanup.register(writer, fs, path)
        try:
            with fs.create_stream(path, mode) as stream:
                yield stream
        except BaseException as e:
            _cleanup.name_file(e, path)
            raise

    def work(context: Any = None) -> None:
        with on_device(context):
            _write_files_from_queue(
                create_stream, file_queue, result_queue, planner, writer.transforms, writer.per_thread_copy_ahead,
                writer.sync_files, workers, writer.serialization_format, writer._crc32_room,
            )

    try:
        # The calling thread is on its device already; the others adopt it. After an error (or
        # Ctrl-C while waiting) the other threads stop after their current file.
        run_in_threads([work] + [lambda: work(device)] * (workers - 1), "writer", stop=lambda: _drain(file_queue))
    except BaseException as e:
        # Tensor bytes of the chunks this rank writes: the payload alone, so "at least".
        _cleanup.discard(writer, fs, writer.path, created, e, sum(chunk_nbytes(wi) for wi in tensor_items))
        raise
    results: List[WriteResult] = []
    while not result_queue.empty():
        results += result_queue.get_nowait()
    if logger.isEnabledFor(logging.DEBUG):
        seconds = time.perf_counter() - start
        nbytes = sum(r.size_in_bytes for r in results)
        logger.debug(
            "wrote %d items, %d bytes in %d files on %d thread(s) to %s in %.3f s (%.3f GB/s)",
            len(results), nbytes, files, workers, writer.path, seconds, nbytes / max(seconds, 1e-9) / 1e9,
        )
    return results

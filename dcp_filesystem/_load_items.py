"""One load's reads: items grouped per data file, files and large items on threads, each item to its codec.

Before DCP has finished planning, ``advise`` tells the OS which ranges of the
local data files the load will read, so that the disk is already at work on a
cold load when ``read_data`` starts (a 1 GiB file read cold here: 2.2-2.7 s,
1.0-1.3 s after an early ``posix_fadvise(WILLNEED)``; on cached pages it costs
about 0.05 ms).

The one place that decides how an item is stored (``stored_as``) and so which
codec reads it: ``_torch_save``, ``_safetensors``, or ``_transformed`` for
stream-transformed items and non-tensor values. Within a file, items are read
front to back: runs of small neighbours with one read ahead (then each served
from memory), neighbouring large items side by side on the cores.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlanner, ReadItem

from . import _checksum, _compat, _partial, _safetensors, _torch_save, _transformed
from ._crc import crc32
from ._data_file import DataFile
from ._format import Stored, metadata_chunk, transform_descriptors_of
from ._item import Item
from ._parallel import for_each, share_of_cores
from ._paths import open_regular, refusal
from .fs import FileSystemBase, PathLike
from .transforms import _StorageReaderTransforms

# Neighbouring items smaller than this are read together, up to _RUN_BYTES in one call, then served from memory.
_SMALL_ITEM_BYTES = 64 << 10
_RUN_BYTES = 4 << 20
# Neighbouring items at least this large are read side by side, each whole on a core of its own (one core
# per item does not wait on the other cores between items, as splitting each item across them does).
_LARGE_ITEM_BYTES = 1 << 20


def advise(
    fs: FileSystemBase, path: PathLike, reqs: List[ReadItem], storage_data: Dict[Any, Any], tensors: Dict[str, Any]
) -> None:
    """Ask the OS to start reading the byte ranges of local data files that ``reqs`` will read: whole items of
    64 KiB and more, and the parts a load reads of this package's SAFETENSORS entries (the metadata alone places
    them). Best effort: any trouble is left for ``read_data`` to meet and report."""
    if not hasattr(os, "posix_fadvise"):
        return
    per_file: Dict[str, List[Tuple[int, int]]] = {}
    for req in reqs:
        info = storage_data.get(req.storage_index)
        if info is None or info.length < _SMALL_ITEM_BYTES:
            continue  # small items are read in runs, whose first read the OS reads ahead of anyway
        found = _planned_range(req, info, tensors.get(req.storage_index.fqn))
        if found is not None:
            per_file.setdefault(info.relative_path, []).append(found)
    local_path = fs.local_path(path)
    for relative_path, ranges in per_file.items():
        if local_path is None or refusal(relative_path, path, local_path) is not None:
            continue
        try:
            with open_regular(os.path.join(local_path, relative_path)) as f:
                for offset, length in _joined(ranges):  # one call per run of neighbours: a model has thousands
                    os.posix_fadvise(f.fileno(), offset, length, os.POSIX_FADV_WILLNEED)
        except (OSError, ValueError):
            continue


def _joined(ranges: List[Tuple[int, int]]) -> List[Tuple[int, int]]:
    """(offset, length) ranges, neighbouring and overlapping ones joined."""
    joined: List[Tuple[int, int]] = []
    for offset, length in sorted(ranges):
        if joined and offset <= joined[-1][0] + joined[-1][1]:
            start, end = joined[-1][0], max(joined[-1][0] + joined[-1][1], offset + length)
            joined[-1] = (start, end - start)
        else:
            joined.append((offset, length))
    return joined


def _planned_range(req: ReadItem, info: Any, tensor: Any) -> Optional[Tuple[int, int]]:
    """(offset, length) of what a load of ``req`` reads, where the metadata tells."""
    chunk = None if req.type == LoadItemType.BYTE_IO else metadata_chunk(tensor, req.storage_index)
    if chunk is None or (not any(req.storage_offsets) and tuple(req.lengths) == tuple(chunk.sizes)):
        return info.offset, info.length
    if not _safetensors.is_ours(info) or not _partial.enabled():
        return None  # an archive's storage is placed by its own bytes, a stock entry by its file's header
    blocks = _checksum.blocks_of_run(info, 0, info.length)
    if blocks is None and _checksum.stored_crc32(info) is not None:
        return info.offset, info.length
    begin, end = _partial.span(tuple(chunk.sizes), tensor.properties.dtype.itemsize, req.storage_offsets,
                               req.lengths, blocks)
    return info.offset + begin, end - begin


def stored_as(
    info: Any,
    file_header: Callable[[], Optional[_safetensors.Header]],
    read_head: Callable[[int], bytes],
    is_tensor: bool,
) -> Optional[Stored]:
    """How the item with storage info ``info`` is stored; None where its bytes are none of these.

    Decided by the storage info where it says (stream transforms; this package's safetensors entries
    are marked), else by the item's first bytes (``read_head(n)``: at least its first n bytes), else
    by the safetensors header at the start of its data file (``file_header()``: this package's
    files from before entries were marked). Each is called only where it decides. Non-tensor
    values are stored as their bytes: they count as the format of the file around them.
    """
    if transform_descriptors_of(info):
        return Stored.TORCH_SAVE
    if _safetensors.is_ours(info):
        return Stored.SAFETENSORS
    head = read_head(_safetensors.SNIFF_BYTES)
    if _torch_save.is_archive(head):
        return Stored.TORCH_SAVE
    if is_tensor and _safetensors.looks_like_header(head):
        return Stored.STOCK_SAFETENSORS
    header = file_header()
    if header is not None and info.offset >= header.data_start:
        return Stored.SAFETENSORS
    return None


class _LockedPlanner:
    """A LoadPlanner whose calls hold ``lock``: reads run in several threads, and planners are not
    promised to be thread-safe."""

    def __init__(self, planner: LoadPlanner, lock: threading.Lock) -> None:
        self.planner = planner
        self.lock = lock

    def resolve_tensor(self, req: ReadItem) -> torch.Tensor:
        with self.lock:
            return self.planner.resolve_tensor(req)

    def commit_tensor(self, req: ReadItem, tensor: torch.Tensor) -> None:
        with self.lock:
            self.planner.commit_tensor(req, tensor)

    def load_bytes(self, req: ReadItem, value: Any) -> None:
        with self.lock:
            self.planner.load_bytes(req, value)


class _Load(NamedTuple):
    fs: FileSystemBase
    path: PathLike
    transforms: _StorageReaderTransforms
    tensors: Dict[str, Any]  # the metadata's state_dict_metadata
    threads: int  # files read at once
    planner: Any  # the caller's planner where one thread reads, else the locked one
    locked_planner: _LockedPlanner
    item_workers: int  # large items of one file read at once


def read_files(
    fs: FileSystemBase,
    path: PathLike,
    per_file: Dict[str, List[ReadItem]],
    storage_data: Dict[Any, Any],
    tensors: Dict[str, Any],
    planner: LoadPlanner,
    threads: int,
    transforms: _StorageReaderTransforms,
) -> None:
    """Read every planned item of ``per_file`` (data file -> its items), ``threads`` files at once."""
    locked_planner = _LockedPlanner(planner, threading.Lock())
    # Device targets are filled by the thread that reads their file (its current streams order the copies).
    item_workers = 1 if _compat.accelerator_started() else share_of_cores(threads)
    load = _Load(fs, path, transforms, tensors, threads, planner if threads == 1 else locked_planner,
                 locked_planner, item_workers)
    for_each(per_file.items(), lambda entry: _read_file(load, entry[0], entry[1], storage_data), threads, "reader")


def _read_file(load: _Load, relative_path: str, reqs: List[ReadItem], storage_data: Dict[Any, Any]) -> None:
    path = load.fs.concat_path(load.path, relative_path)
    local = load.fs.local_path(path) is not None
    name = os.path.join(str(load.path), relative_path)
    items = [Item(req, storage_data[req.storage_index], load.tensors.get(req.storage_index.fqn), name)
             for req in reqs]
    items.sort(key=lambda item: item.info.offset)  # one pass, front to back
    with load.fs.create_stream(path, "rb") as stream:
        data_file = DataFile(stream, name, load.threads, local)
        _safetensors.prepare_file(data_file, [item.info for item in items])
        read_until = n = 0
        while n < len(items):
            info = items[n].info
            if data_file.fd is not None and info.length >= _LARGE_ITEM_BYTES:
                end = n
                while end < len(items) and items[end].info.length >= _LARGE_ITEM_BYTES:
                    end += 1
                _read_side_by_side(load, data_file, items[n:end])
                n = end
                continue
            if local and info.length < _SMALL_ITEM_BYTES and info.offset + info.length > read_until:
                read_until = _run_end(items, n)
                data_file.read_ahead(info.offset, read_until)
            _read_item(load, data_file, items[n], load.planner)
            n += 1


def _run_end(items: List[Item], first: int) -> int:
    """Where the run of small neighbouring items that starts at ``items[first]`` ends (sorted by offset)."""
    start = end = items[first].info.offset
    for n in range(first, len(items)):
        info = items[n].info
        stop = info.offset + info.length
        if info.length >= _SMALL_ITEM_BYTES or info.offset > end + _SMALL_ITEM_BYTES or stop - start > _RUN_BYTES:
            break
        end = max(end, stop)
    return end


def _read_side_by_side(load: _Load, data_file: DataFile, items: List[Item]) -> None:
    """Neighbouring large items of a local file, each read whole by one of the item workers, as many as keep
    every worker busy to the end; the others one after another, each split across the cores (so also all
    of them where one holds more than its share)."""
    workers = min(len(items), load.item_workers)
    side_by_side = len(items) - len(items) % workers
    largest = max(item.info.length for item in items[:side_by_side])
    if workers > 1 and largest * workers <= sum(item.info.length for item in items[:side_by_side]):
        reads_at_once = data_file.reads_at_once
        data_file.reads_at_once = reads_at_once * workers
        try:
            for_each(items[:side_by_side], lambda item: _read_item(load, data_file, item, load.locked_planner),
                     workers, "items")
        finally:
            data_file.reads_at_once = reads_at_once
        items = items[side_by_side:]
    for item in items:
        _read_item(load, data_file, item, load.planner)


def _read_item(load: _Load, data_file: DataFile, item: Item, planner: Any) -> None:
    req, info = item.req, item.info
    data_file.check_range(info.offset, info.length, item)
    if req.type == LoadItemType.BYTE_IO:
        _transformed.load_bytes(data_file, item, planner, load.transforms)
        return
    target = planner.resolve_tensor(req)
    if target.requires_grad:  # only then: detach() takes a tenth of a small item's time here
        target = target.detach()
    if not _from_memory(data_file, item, target):
        _read_tensor(load, data_file, item, target)
    planner.commit_tensor(req, target)


def _read_tensor(load: _Load, data_file: DataFile, item: Item, target: torch.Tensor) -> None:
    if transform_descriptors_of(item.info):
        _transformed.read_tensor(data_file, item, target, load.transforms)
        return
    read: List[bytearray] = []  # where sniffing the item's head read all of it (not a local file)

    def read_head(nbytes: int) -> bytes:
        if data_file.local:
            return data_file.read_at(item.info.offset, nbytes)
        read.append(data_file.read_checked(item))  # read once, front to back
        return bytes(read[0][:nbytes])

    stored = stored_as(item.info, lambda: _safetensors.file_header(data_file), read_head, True)
    payload = read[0] if read else None
    if stored is Stored.TORCH_SAVE:
        _torch_save.read_item(data_file, item, target, payload)
    elif stored is not None:
        _safetensors.read_item(data_file, item, target, stored is Stored.STOCK_SAFETENSORS, payload)
    else:
        if payload is None:
            data_file.read_checked(item)  # a damaged item says so first
        raise item.cannot_read(ValueError("payload is neither a torch.save archive nor a safetensors entry"))


def _from_memory(data_file: DataFile, item: Item, target: torch.Tensor) -> bool:
    """Fill a contiguous CPU ``target`` with a whole stored tensor whose bytes a read-ahead holds, where
    they are a plain run of the target's dtype and shape: a SAFETENSORS entry of this package, or a
    torch.save archive laid out like one decoded before. False, with nothing done but checks, for any
    other item or target. The many small tensors of a model take this way: it does per item only what
    such an item needs (the general way costs more per item than copying its bytes)."""
    info = item.info
    if not target.is_cpu or transform_descriptors_of(info) or any(item.req.storage_offsets):
        return False
    begin = data_file.ahead_index(info.offset, info.length)
    if begin is None or not target.is_contiguous():
        return False
    if item.checked:
        item.check(crc32(data_file.ahead[begin : begin + info.length]))
    if _safetensors.is_ours(info):
        plain = _safetensors.plain_in_metadata(item)
    else:
        plain = _torch_save.plain_in_memory(data_file, item, begin)
    if plain is None or target.dtype != plain[0] or target.size() != plain[1]:
        return False
    data_file.copy_ahead(begin + plain[2], plain[3], target.data_ptr())
    return True

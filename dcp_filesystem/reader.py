"""FileSystemReader: a StorageReader for checkpoints written by this package or by stock torch."""
from __future__ import annotations

import ctypes
import errno
import io
import logging
import os
import pickle
import threading
import time
from typing import IO, Any, Dict, List, Optional, Tuple

import torch
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from . import _checksum, _compat, _crc, _safetensors
from ._bytes import address_of, numel, tensor_bytes, tensor_from_bytes
from ._crc import crc32_combine
from ._device_reads import DeviceReads
from ._format import Stored, _generate_uuid, describe_item, metadata_file_name, stored_as, transform_descriptors_of
from ._gc import gc_paused
from ._parallel import crc32, for_each, pread_into, preadv_descriptor, share_of_cores, worker_count
from ._paths import check_storage_file
from ._safe_pickle import load_metadata
from ._torch_save import (
    PlainTensor,
    crc_error,
    load_tensor,
    plain_from_template,
    plain_storage,
    plain_storage_from_head,
)
from .fs import FileSystem, FileSystemAttribute, PathLike
from .transforms import (
    ARCHIVE_RECORDS_BYTES,
    MAX_VALUE_BYTES,
    ExtensionRegistry,
    _StorageReaderTransforms,
    read_at_most,
)

logger = logging.getLogger(__package__)
# torch.save archives this large are read straight into their destination: their head, the storage, the rest
# (or, where the head does not place the storage, both edges first).
_IN_PLACE_ARCHIVE_BYTES = 1 << 20
_ARCHIVE_EDGE_BYTES = 16 << 10
_EDGE_RANGE = range(_ARCHIVE_EDGE_BYTES + 1)
# Neighbouring items smaller than this are read together, up to _RUN_BYTES in one call, then served from memory.
_SMALL_ITEM_BYTES = 64 << 10
_RUN_BYTES = 4 << 20
# Neighbouring items at least this large are read side by side, each whole on a core of its own (one core
# per item does not wait on the other cores between items, as splitting each item across them does).
_LARGE_ITEM_BYTES = 1 << 20


def _describe(req: ReadItem) -> str:
    return describe_item(req.storage_index)


def _narrow(tensor: torch.Tensor, offsets: Any, lengths: Any) -> torch.Tensor:
    for dim, (offset, length) in enumerate(zip(offsets, lengths)):
        if offset != 0 or length != tensor.size(dim):
            tensor = tensor.narrow(dim, offset, length)
    return tensor


class _DataFile:
    """One open data file: positioned reads, and its safetensors headers parsed once.

    A local file is read as fast as it allows: its size first, positioned reads on several cores,
    reads ahead over runs of small items. A file of any other file system (an object store) is read
    only as one allows: inside the byte ranges of planned items, front to back, never at its end,
    never across an item's boundary; its size is not known, so a short read says what is missing.
    After ``read_ahead(start, end)``, reads that lie within that range are served from memory.
    A local file's positioned reads may run in several threads at once; ``reads_at_once`` says how
    many of this load's reads run at once (over all files), so that each takes its share of the cores.
    """

    def __init__(self, stream: IO[bytes], name: str, reads_at_once: int, local: bool) -> None:
        self.stream = stream
        self.name = name
        self.local = local
        self.fd = preadv_descriptor(stream) if local else None
        self.size: Optional[int] = None
        if self.fd is not None:
            self.size = os.fstat(self.fd).st_size
        elif local:
            stream.seek(0, os.SEEK_END)
            self.size = stream.tell()
        self.reads_at_once = reads_at_once
        self._headers: Dict[int, Optional[_safetensors.Header]] = {}
        self._ahead_start = self._ahead_address = 0
        self.ahead_buffer = bytearray()  # what read_ahead holds: the file's bytes from _ahead_start
        self.ahead = memoryview(b"")  # the bytes of ahead_buffer that were read
        self.device_reads = DeviceReads()  # pinned buffers for device targets, allocated on first use

    def read_ahead(self, start: int, end: int) -> None:
        start, end = max(start, 0), min(end, self.size)  # ranges outside the file fail where they are read
        buffer = bytearray(max(end - start, 0))
        self._ahead_start, self.ahead = 0, memoryview(b"")
        got, _ = self.readinto_with_crc(start, memoryview(buffer), False)
        self.ahead_buffer, self._ahead_address = buffer, address_of(buffer)
        self._ahead_start, self.ahead = start, memoryview(buffer)[:got]

    def ahead_index(self, offset: int, length: int) -> Optional[int]:
        """Where the bytes ``[offset, offset + length)`` start in ``ahead_buffer``, where it holds them."""
        begin = offset - self._ahead_start
        return None if begin < 0 or begin + length > len(self.ahead) else begin

    def read_ahead_part(self, offset: int, length: int) -> Optional[memoryview]:
        """The bytes ``[offset, offset + length)`` where ``read_ahead`` holds them, else None."""
        begin = self.ahead_index(offset, length)
        return None if begin is None else self.ahead[begin : begin + length]

    def copy_ahead(self, begin: int, length: int, address: int) -> None:
        """Copy ``length`` bytes of ``ahead_buffer`` from index ``begin`` to ``address``."""
        ctypes.memmove(address, self._ahead_address + begin, length)

    def readinto_at(self, offset: int, view: memoryview) -> int:
        return self.readinto_with_crc(offset, view, False)[0]

    def readinto_with_crc(self, offset: int, view: memoryview, with_crc: bool) -> Tuple[int, int]:
        """Fill ``view`` from ``offset``: (bytes read, their CRC-32 or 0), on several cores where possible."""
        part = self.read_ahead_part(offset, len(view))
        if part is not None:
            view[:] = part
            return len(view), crc32(part, self.reads_at_once) if with_crc else 0
        if self.fd is not None:
            return pread_into(self.fd, offset, view, with_crc, self.reads_at_once)
        self.stream.seek(offset)
        got = 0
        while got < len(view):
            n = self.stream.readinto(view[got:])
            if not n:
                break
            got += n
        return got, crc32(view[:got], self.reads_at_once) if with_crc else 0

    def read_at(self, offset: int, length: int) -> bytearray:
        buffer = bytearray(length)
        got = self.readinto_at(offset, memoryview(buffer))
        return buffer if got == length else buffer[:got]

    def check_range(self, offset: int, length: int, req: ReadItem) -> None:
        if offset < 0 or length < 0 or (self.size is not None and offset + length > self.size):
            raise ValueError(
                f"{self.name}: item {_describe(req)} needs bytes [{offset}, {offset + length}) "
                f"but the file has {self.size} bytes (truncated or damaged checkpoint)"
            )

    def read_exact(self, offset: int, length: int, req: ReadItem) -> bytearray:
        self.check_range(offset, length, req)
        buffer = self.read_at(offset, length)
        if len(buffer) != length:
            raise ValueError(
                f"{self.name}: item {_describe(req)}: read {len(buffer)} of {length} bytes at offset {offset}"
            )
        return buffer

    def safetensors_header(self, base: int = 0) -> Optional[_safetensors.Header]:
        """The safetensors header that starts at ``base``, or None where none does."""
        if base not in self._headers:
            where = f"{self.name} (offset {base})"
            self._headers[base] = _safetensors.read_header(self.read_at, base, self.size, where)
        return self._headers[base]

    def read_checked(self, req: ReadItem, info: Any) -> bytearray:
        """An item's stored bytes, checked against their checksum where the metadata has one."""
        payload = self.read_exact(info.offset, info.length, req)
        if _checksum.stored_crc32(info) is not None:
            _checksum.check(self.name, req.storage_index, info, crc32(memoryview(payload), self.reads_at_once))
        return payload


def _run_end(reqs: List[Tuple[ReadItem, Any]], first: int) -> int:
    """Where the run of small neighbouring items that starts at ``reqs[first]`` ends (reqs sorted by offset)."""
    start = end = reqs[first][1].offset
    for n in range(first, len(reqs)):
        info = reqs[n][1]
        stop = info.offset + info.length
        if info.length >= _SMALL_ITEM_BYTES or info.offset > end + _SMALL_ITEM_BYTES or stop - start > _RUN_BYTES:
            break
        end = max(end, stop)
    return end


def _large_run_end(reqs: List[Tuple[ReadItem, Any]], first: int) -> int:
    """Where the run of large items that starts at ``reqs[first]`` ends."""
    end = first
    while end < len(reqs) and reqs[end][1].length >= _LARGE_ITEM_BYTES:
        end += 1
    return end


class _LockedPlanner:
    """A LoadPlanner whose calls hold ``lock``: reads run in several threads, and planners are not
    promised to be thread-safe."""

    def __init__(self, planner: LoadPlanner, lock: threading.Lock) -> None:
        self.planner = planner
        self.lock = lock

    def _call(self, method: str, *args: Any) -> Any:
        with self.lock:
            return getattr(self.planner, method)(*args)

    def resolve_tensor(self, req: ReadItem) -> torch.Tensor:
        return self._call("resolve_tensor", req)

    def commit_tensor(self, req: ReadItem, tensor: torch.Tensor) -> None:
        self._call("commit_tensor", req, tensor)

    def load_bytes(self, req: ReadItem, value: io.BytesIO) -> None:
        self._call("load_bytes", req, value)


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
        per_file: Dict[str, List[Tuple[ReadItem, Any]]] = {}
        for req in plan.items:
            info = self.storage_data[req.storage_index]
            if info.relative_path not in per_file:
                named_by = f"{self._get_metadata_path()}: item {req.storage_index.fqn!r}"
                check_storage_file(info.relative_path, self.path, self.fs.local_path(self.path), named_by)
            per_file.setdefault(info.relative_path, []).append((req, info))
        stored_bytes = sum(info.length for reqs in per_file.values() for _, info in reqs)
        threads = worker_count(self.thread_count, len(per_file), stored_bytes)
        locked_planner = _LockedPlanner(planner, threading.Lock())
        file_planner = planner if threads == 1 else locked_planner
        # Device targets are filled by the thread that reads their file (its current streams order the copies).
        item_workers = 1 if _compat.accelerator_started() else share_of_cores(threads)

        def read_file(relative_path: str) -> None:
            reqs = sorted(per_file[relative_path], key=lambda r: r[1].offset)  # one pass, front to back
            path = self.fs.concat_path(self.path, relative_path)
            local = self.fs.local_path(path) is not None
            with self.fs.create_stream(path, "rb") as stream:
                data_file = _DataFile(stream, os.path.join(str(self.path), relative_path), threads, local)
                if local and not all(_safetensors.is_ours(info) for _, info in reqs):
                    # Where a load uses the header, a damaged one fails here, whichever item comes first.
                    data_file.safetensors_header()
                read_until = n = 0
                while n < len(reqs):
                    req, info = reqs[n]
                    if data_file.fd is not None and info.length >= _LARGE_ITEM_BYTES:
                        end = _large_run_end(reqs, n)
                        self._read_side_by_side(data_file, reqs[n:end], file_planner, locked_planner, item_workers)
                        n = end
                        continue
                    if local and info.length < _SMALL_ITEM_BYTES and info.offset + info.length > read_until:
                        read_until = _run_end(reqs, n)
                        data_file.read_ahead(info.offset, read_until)
                    self._read_item(data_file, req, info, file_planner)
                    n += 1

        for_each(per_file, read_file, threads, "reader")
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

    def _read_side_by_side(
        self,
        data_file: _DataFile,
        items: List[Tuple[ReadItem, Any]],
        planner: LoadPlanner,
        locked_planner: _LockedPlanner,
        workers: int,
    ) -> None:
        """Neighbouring large items of a local file, each read whole by one of ``workers`` threads, as many
        as keep every worker busy to the end; the others one after another, each split across the cores (so
        also all of them where one holds more than its share)."""
        workers = min(len(items), workers)
        side_by_side = len(items) - len(items) % workers
        largest = max(info.length for _, info in items[:side_by_side])
        if workers > 1 and largest * workers <= sum(info.length for _, info in items[:side_by_side]):
            reads_at_once = data_file.reads_at_once
            data_file.reads_at_once = reads_at_once * workers
            try:

                def read(item: Tuple[ReadItem, Any]) -> None:
                    self._read_item(data_file, *item, locked_planner)

                for_each(items[:side_by_side], read, workers, "items")
            finally:
                data_file.reads_at_once = reads_at_once
            items = items[side_by_side:]
        for req, info in items:
            self._read_item(data_file, req, info, planner)

    def _read_item(self, data_file: _DataFile, req: ReadItem, info: Any, planner: LoadPlanner) -> None:
        data_file.check_range(info.offset, info.length, req)
        if req.type == LoadItemType.BYTE_IO:
            payload = data_file.read_checked(req, info)
            try:
                planner.load_bytes(req, io.BytesIO(self._untransformed(req, info, payload)))
            except (ValueError, RuntimeError, pickle.UnpicklingError, EOFError) as e:
                raise ValueError(f"{data_file.name}: cannot read item {_describe(req)}: {e}") from e
            return
        target = planner.resolve_tensor(req)
        if target.requires_grad:  # only then: detach() takes a tenth of a small item's time here
            target = target.detach()
        if not self._item_from_memory(data_file, req, info, target):
            self._read_tensor(data_file, req, info, target)
        planner.commit_tensor(req, target)

    def _read_tensor(self, data_file: _DataFile, req: ReadItem, info: Any, target: torch.Tensor) -> None:
        read: List[bytearray] = []  # where sniffing the item's head read all of it (not a local file)

        def read_head() -> bytes:
            if data_file.local:
                return data_file.read_at(info.offset, _safetensors.SNIFF_BYTES)
            read.append(data_file.read_checked(req, info))  # read once, front to back
            return bytes(read[0][: _safetensors.SNIFF_BYTES])

        stored = stored_as(info, data_file.safetensors_header, read_head, True)
        in_place = not read and not transform_descriptors_of(info)
        if in_place and self._read_in_place(data_file, req, info, stored, target):
            return
        payload = read[0] if read else data_file.read_checked(req, info)
        try:
            tensor = self._decode_tensor(data_file, req, info, stored, payload)
        except (ValueError, RuntimeError, pickle.UnpicklingError, EOFError) as e:
            raise ValueError(f"{data_file.name}: cannot read item {_describe(req)}: {e}") from e
        tensor = _narrow(tensor, req.storage_offsets, req.lengths)
        if target.size() != tensor.size():
            raise ValueError(
                f"{data_file.name}: item {_describe(req)} has size {list(tensor.size())} "
                f"but the load plan expects {list(target.size())}"
            )
        target.copy_(tensor)

    def _item_from_memory(self, data_file: _DataFile, req: ReadItem, info: Any, target: torch.Tensor) -> bool:
        """Fill a contiguous CPU ``target`` with a whole stored tensor whose bytes a read-ahead holds, where
        they are a plain run of the target's dtype and shape: a SAFETENSORS entry of this package, or a
        torch.save archive laid out like one decoded before. False, with nothing done but checks, for any
        other item or target. The many small tensors of a model take this way: it does per item only what
        such an item needs (the general way costs more per item than copying its bytes)."""
        if not target.is_cpu or transform_descriptors_of(info) or any(req.storage_offsets):
            return False
        begin = data_file.ahead_index(info.offset, info.length)
        if begin is None or not target.is_contiguous():
            return False
        index = req.storage_index
        if _checksum.stored_crc32(info) is not None:
            _checksum.check(data_file.name, index, info, crc32(data_file.ahead[begin : begin + info.length]))
        # plain: (dtype, size, start within the item, nbytes). A bare tuple: building a PlainTensor per item
        # and reading its fields made this way 12-14 % slower for 2 000 small SAFETENSORS items.
        if _safetensors.is_ours(info):
            entry = _safetensors.entry_from_metadata(info, self._tensors.get(index.fqn), index)
            plain = None if entry is None else (entry.dtype, entry.shape, 0, info.length)
        else:
            try:
                found = plain_from_template(data_file.ahead_buffer, begin, info.length)
            except ValueError as e:  # a member's CRC-32
                raise ValueError(f"{data_file.name}: cannot read item {_describe(req)}: {e}") from e
            plain = None if found is None else (found.dtype, found.size, found.start, found.nbytes)
        if plain is None or target.dtype != plain[0] or target.size() != plain[1]:
            return False
        data_file.copy_ahead(begin + plain[2], plain[3], target.data_ptr())
        return True

    def _plain_tensor(
        self, data_file: _DataFile, req: ReadItem, info: Any, stored: Optional[Stored]
    ) -> Optional[Tuple[PlainTensor, memoryview, Optional[memoryview]]]:
        """Where the item lies as a plain run of bytes (a whole safetensors entry, or a large torch.save
        storage), with the item's stored bytes before and after that run; None where it does not. The
        bytes after are None where the archive's head alone placed its storage: they are read after it,
        front to back, and must confirm it (``_archive_after``)."""
        if stored is Stored.SAFETENSORS:
            entry = self._entry(data_file, req, info)
            plain = None if entry is None else PlainTensor(entry.dtype, entry.shape, info.offset, info.length, 0, "")
            return None if plain is None else (plain, memoryview(b""), memoryview(b""))
        if stored is not Stored.TORCH_SAVE or info.length < _IN_PLACE_ARCHIVE_BYTES or not data_file.local:
            return None
        head = memoryview(data_file.read_exact(info.offset, _ARCHIVE_EDGE_BYTES, req))
        guess = plain_storage_from_head(head)
        if guess is not None and guess.start <= len(head) and info.length - guess.start - guess.nbytes in _EDGE_RANGE:
            return guess._replace(start=info.offset + guess.start), head[: guess.start], None
        # Else the edges first, then the middle: only where the file allows reading back.
        tail_offset = info.offset + info.length - _ARCHIVE_EDGE_BYTES
        tail = memoryview(data_file.read_exact(tail_offset, _ARCHIVE_EDGE_BYTES, req))
        plain = self._archive_layout(data_file, req, info, head, tail)
        if plain is None:
            return None
        after = info.length - plain.start - plain.nbytes
        if plain.start > len(head) or after > len(tail):
            return None
        return plain._replace(start=info.offset + plain.start), head[: plain.start], tail[len(tail) - after :]

    def _archive_layout(
        self, data_file: _DataFile, req: ReadItem, info: Any, head: memoryview, tail: memoryview
    ) -> Optional[PlainTensor]:
        """``plain_storage`` of an archive's first and last bytes; None also where they are damaged and the
        item has a checksum: the whole item is then read and checked against it instead."""
        try:
            return plain_storage(head, tail, info.length)
        except (ValueError, RuntimeError, pickle.UnpicklingError, EOFError) as e:
            if _checksum.stored_crc32(info) is not None:
                return None
            raise ValueError(f"{data_file.name}: cannot read item {_describe(req)}: {e}") from e

    def _archive_after(
        self, data_file: _DataFile, req: ReadItem, info: Any, guess: PlainTensor, before: memoryview
    ) -> Optional[Tuple[PlainTensor, memoryview]]:
        """Read the bytes of an archive after its storage, which its head placed, and check that its directory
        puts the storage there too: (the storage as the directory describes it, those bytes), or None."""
        end = guess.start + guess.nbytes
        after = memoryview(data_file.read_exact(end, info.offset + info.length - end, req))
        plain = self._archive_layout(data_file, req, info, before, after)
        if plain is None or (info.offset + plain.start, plain.nbytes, plain.dtype, plain.size) != (
            guess.start, guess.nbytes, guess.dtype, guess.size
        ):
            return None
        return plain._replace(start=guess.start), after

    def _read_in_place(
        self, data_file: _DataFile, req: ReadItem, info: Any, stored: Optional[Stored], target: torch.Tensor
    ) -> bool:
        """Read a whole stored tensor straight into ``target``; False where that cannot be done."""
        if any(req.storage_offsets):
            return False
        found = self._plain_tensor(data_file, req, info, stored)
        if found is None or tuple(req.lengths) != found[0].size:
            return False
        plain, before, after = found
        on_device = target.device.type != "cpu"
        if on_device and not data_file.device_reads.accepts(target):
            return False  # no pinned memory for that device: the decoded tensor is copied there
        if target.dtype != plain.dtype or not (on_device or target.is_contiguous()):
            return False
        if tuple(target.size()) != plain.size:
            raise ValueError(
                f"{data_file.name}: item {_describe(req)} has size {list(plain.size)} "
                f"but the load plan expects {list(target.size())}"
            )
        data_file.check_range(plain.start, plain.nbytes, req)
        checked = _checksum.stored_crc32(info) is not None
        with_crc = checked or bool(plain.crc) or after is None
        if on_device:  # through pinned buffers; every copy has finished when it returns
            got, storage_crc = data_file.device_reads.read_into(
                target, data_file.readinto_with_crc, plain.start, plain.nbytes, with_crc
            )
        else:
            got, storage_crc = data_file.readinto_with_crc(plain.start, tensor_bytes(target), with_crc)
        if got != plain.nbytes:
            raise ValueError(
                f"{data_file.name}: item {_describe(req)}: read {got} of {plain.nbytes} bytes at offset {plain.start}"
            )
        if after is None:
            confirmed = self._archive_after(data_file, req, info, plain, before)
            if confirmed is None:
                return False  # the decoded archive is copied over what was read
            plain, after = confirmed
        if checked:
            crc = storage_crc
            if before or after:  # a torch.save archive: its records around the storage
                crc = crc32_combine(crc32_combine(crc32(before), crc, plain.nbytes), crc32(after), len(after))
            _checksum.check(data_file.name, req.storage_index, info, crc)
        if plain.crc and storage_crc != plain.crc:
            raise ValueError(f"{data_file.name}: cannot read item {_describe(req)}: {crc_error(plain.member)}")
        return True

    def _decode_tensor(
        self, data_file: _DataFile, req: ReadItem, info: Any, stored: Optional[Stored], payload: bytearray
    ) -> torch.Tensor:
        payload = self._untransformed(req, info, payload)
        if stored is Stored.TORCH_SAVE:
            return load_tensor(payload)
        if stored is Stored.SAFETENSORS:
            entry = self._entry(data_file, req, info)
            if entry is None:
                raise ValueError(f"no safetensors entry covers bytes [{info.offset}, {info.offset + info.length})")
            return tensor_from_bytes(payload, entry.dtype, entry.shape)
        if stored is Stored.STOCK_SAFETENSORS:
            # Stock torch records where the header of the file holding the item starts.
            entry = _safetensors.stock_entry(data_file.safetensors_header(info.offset), req.storage_index.fqn)
            if entry is not None:
                raw = data_file.read_exact(entry.begin, entry.end - entry.begin, req)
                return tensor_from_bytes(raw, entry.dtype, entry.shape)
        raise ValueError("payload is neither a torch.save archive nor a safetensors entry")

    def _entry(self, data_file: _DataFile, req: ReadItem, info: Any) -> Optional[_safetensors.Entry]:
        """The safetensors entry of an item stored by this package: from the metadata where the item is
        marked, else from its data file's header."""
        index = req.storage_index
        entry = _safetensors.entry_from_metadata(info, self._tensors.get(index.fqn), index)
        if entry is not None:
            return entry
        header = data_file.safetensors_header()
        end = info.offset + info.length
        return None if header is None else _safetensors.find_entry(header, index.fqn, index.offset, info.offset, end)

    def _untransformed(self, req: ReadItem, info: Any, payload: bytearray) -> bytearray:
        """An item's stored bytes with its stream transforms undone, no more than the item may hold."""
        descriptors = transform_descriptors_of(info)
        if not descriptors:
            return payload
        limit, why = MAX_VALUE_BYTES, "a non-tensor value"
        tensor = self._tensors.get(req.storage_index.fqn)
        chunk = None if req.type == LoadItemType.BYTE_IO else _safetensors.metadata_chunk(tensor, req.storage_index)
        if chunk is not None:
            nbytes = numel(chunk.sizes) * tensor.properties.dtype.itemsize
            limit, why = nbytes + ARCHIVE_RECORDS_BYTES, f"a {nbytes}-byte tensor and its archive's records"
        decoded = read_at_most(self.transforms.transform_load_stream(req, descriptors, io.BytesIO(payload)), limit)
        if decoded is None:
            raise ValueError(  # the caller names the file and the item
                f"its {info.length} stored bytes decode to more than {limit} bytes, the most {why} may take "
                "(damaged or hostile checkpoint): decoding stopped there"
            )
        return decoded

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

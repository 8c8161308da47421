"""Writing Hugging Face files of full tensors from their parts, in bounded memory.

Consolidation (the shard files of a distributed save, one per rank, into ``model-0000i-of-0000N`` files)
and ``export-hf`` (any DCP checkpoint into the same) write files the same way: each output file front to
back, its header first (every entry's dtype and shape are known before any byte is read), then its tensors
in order, a batch of regions at a time: whole tensors up to ``BATCH_BYTES`` together, larger ones in slabs
of rows along their first dimension. A source fills each region from wherever its parts are, the next batch
while the one before it is written out; so memory stays near two batches whatever the tensors' sizes. Each
file is written under a temporary name, with every entry's CRC-32 filled into its header at the end, then
renamed into place; the index comes last.
"""
from __future__ import annotations

import functools
import logging
import os
import struct
import time
from typing import IO, Callable, ContextManager, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch

from . import _safetensors
from ._bytes import numel, tensor_bytes
from ._checksum import BLOCK_BYTES
from ._crc import crc32, crc32_combine
from ._hf_layout import INDEX_FILE_NAME, Chunk, Tensor, file_name, index_bytes, names, scan
from ._parallel import for_each, run_in_threads, write_with_crc
from ._paths import open_regular
from .fs import FileSystem

logger = logging.getLogger(__package__)

BATCH_BYTES = 64 << 20
_BESIDE_BYTES = 1 << 20  # whole blocks this large are checksummed on a second thread while they are written


class Region(NamedTuple):
    """Rows ``[begin, end)`` along the first dimension of tensor ``fqn`` (all of a 0-d tensor), to be filled
    into ``out``."""

    fqn: str
    begin: int
    end: int
    out: torch.Tensor


# Fills every region of a batch with its tensor's bytes.
Source = Callable[[List[Region]], None]


class OutputTensor(NamedTuple):
    fqn: str
    dtype: torch.dtype
    size: Tuple[int, ...]


def _rows(size: Sequence[int]) -> int:
    return size[0] if size else 1


_ALIGN = 16  # where each region starts in its batch's buffer: a multiple of every element size


def _batch_plans(tensors: Sequence[OutputTensor]) -> Iterator[List[Tuple[OutputTensor, int, int]]]:
    """(tensor, first row, end row) of each region, in order, in batches of at most ``BATCH_BYTES`` (a single
    row larger than that is a batch of its own)."""
    batch: List[Tuple[OutputTensor, int, int]] = []
    held = 0
    for tensor in tensors:
        rows = _rows(tensor.size)
        nbytes = numel(tensor.size) * tensor.dtype.itemsize
        if nbytes == 0:
            batch.append((tensor, 0, rows))
            continue
        row_bytes = nbytes // rows
        begin = 0
        while begin < rows:
            if held and held + row_bytes > BATCH_BYTES:
                yield batch
                batch, held = [], 0
            end = min(rows, begin + max(1, (BATCH_BYTES - held) // row_bytes))
            batch.append((tensor, begin, end))
            held += (end - begin) * row_bytes
            begin = end
    if batch:
        yield batch


def batches(tensors: Sequence[OutputTensor]) -> Iterator[List[Region]]:
    """The regions of ``tensors``, in order, in batches of at most ``BATCH_BYTES``, each region's ``out`` a view
    of its batch's buffer. Batches take turns in two buffers allocated once (a consumer holds at most two batches:
    write_files reads one while it writes the other): fresh memory for every batch cost more in page faults here
    than its bytes took to read."""
    buffers: List[torch.Tensor] = []
    for n, plan in enumerate(_batch_plans(tensors)):
        starts, need = [], 0
        for tensor, begin, end in plan:
            starts.append(need)
            need += -(-(end - begin) * (numel(tensor.size[1:]) * tensor.dtype.itemsize) // _ALIGN) * _ALIGN
        if len(buffers) <= n % 2:
            buffers.append(torch.empty(0, dtype=torch.uint8))
        if buffers[n % 2].numel() < need:
            buffers[n % 2] = torch.empty(max(need, BATCH_BYTES + _ALIGN * len(plan)), dtype=torch.uint8)
        buffer = buffers[n % 2]
        batch = []
        for (tensor, begin, end), start in zip(plan, starts):
            shape = (end - begin, *tensor.size[1:]) if tensor.size else ()
            nbytes = numel(shape) * tensor.dtype.itemsize
            out = buffer[start : start + nbytes].view(tensor.dtype).view(shape) if nbytes else torch.empty(
                shape, dtype=tensor.dtype)
            batch.append(Region(tensor.fqn, begin, end, out))
        yield batch


class _EntryCrcs:
    """The CRC-32s of one entry's ``BLOCK_BYTES`` blocks, taken as its bytes are written piece by piece: each
    piece's whole blocks beside their write (``_parallel.write_with_crc``), the blocks it shares with the pieces
    before and after it here."""

    def __init__(self) -> None:
        self.words = bytearray()  # the finished blocks' CRC-32s, little-endian 32-bit words
        self.lengths: List[int] = []
        self._open_crc = 0
        self._open_bytes = 0  # of the block being filled

    def write(self, stream: IO[bytes], data: memoryview) -> None:
        if self._open_bytes:
            take = data[: BLOCK_BYTES - self._open_bytes]
            stream.write(take)
            self._add_to_open(take)
            data = data[len(take) :]
        whole = len(data) - len(data) % BLOCK_BYTES
        if whole >= _BESIDE_BYTES:
            _, words = write_with_crc(stream, data[:whole], BLOCK_BYTES)
            self.words += words
            self.lengths += [BLOCK_BYTES] * (whole // BLOCK_BYTES)
            data = data[whole:]
        if len(data):
            stream.write(data)
            for start in range(0, len(data), BLOCK_BYTES):
                self._add_to_open(data[start : start + BLOCK_BYTES])

    def _add_to_open(self, data: memoryview) -> None:
        self._open_crc = crc32(data, self._open_crc)
        self._open_bytes += len(data)
        if self._open_bytes == BLOCK_BYTES:
            self._close()

    def _close(self) -> None:
        self.words += struct.pack("<I", self._open_crc)
        self.lengths.append(self._open_bytes)
        self._open_crc = self._open_bytes = 0

    def finish(self) -> Tuple[int, bytes]:
        """(the entry's CRC-32, its blocks' CRC-32s)."""
        if self._open_bytes:
            self._close()
        crc = 0
        for (block_crc,), length in zip(struct.iter_unpack("<I", self.words), self.lengths):
            crc = crc32_combine(crc, block_crc, length)
        return crc, bytes(self.words)


class OutputFile:
    """One safetensors file of whole tensors, written front to back under a temporary name: ``write`` each
    tensor's bytes in the order of ``tensors``, then ``commit`` (CRC-32s into the header, sync, rename)."""

    def __init__(self, path: str, tensors: Sequence[OutputTensor], metadata: Dict[str, str]) -> None:
        self.path = path
        self.tmp_path = path + ".tmp"
        self._sizes = [(t.fqn, numel(t.size) * t.dtype.itemsize) for t in tensors]
        metadata = {**metadata, **_safetensors.crc32_room_for(self._sizes)}
        self.header = _safetensors.encode_header([(t.fqn, t.dtype, t.size) for t in tensors], metadata)
        self._at = -1  # the entry being written
        self._left = 0  # its bytes still to come
        self._entry = _EntryCrcs()
        self.crcs: Dict[str, int] = {}
        self.blocks: Dict[str, bytes] = {}
        self._file = open(self.tmp_path, "wb")
        try:
            self._file.write(self.header)
            self._advance()
        except BaseException:
            self.discard()
            raise

    def _advance(self) -> None:
        """Past every finished entry (an empty one at once), recording its CRC-32s; on to the next."""
        while self._left == 0 and self._at < len(self._sizes):
            if self._at >= 0:
                key = self._sizes[self._at][0]
                self.crcs[key], self.blocks[key] = self._entry.finish()
            self._at += 1
            if self._at < len(self._sizes):
                self._entry = _EntryCrcs()
                self._left = self._sizes[self._at][1]

    def write(self, fqn: str, data: memoryview) -> None:
        """The next bytes of tensor ``fqn``, which must be the one being written."""
        if not len(data):
            return
        key = self._sizes[self._at][0] if self._at < len(self._sizes) else None
        if fqn != key or len(data) > self._left:
            raise AssertionError(f"{self.path}: {len(data)} bytes of {fqn!r} do not fit where {key!r} is written")
        self._entry.write(self._file, data)
        self._left -= len(data)
        self._advance()

    def commit(self, sync: bool) -> None:
        try:
            if self._at < len(self._sizes):
                raise AssertionError(f"{self.path}: closed before all of its tensors were written")
            self._file.flush()
            os.pwrite(self._file.fileno(), _safetensors.with_crc32s(self.header, self.crcs, self.blocks), 0)
            if sync:
                os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self.tmp_path, self.path)
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        self._file.close()
        try:
            os.remove(self.tmp_path)
        except FileNotFoundError:
            pass


def write_files(
    out_dir: str,
    files: Dict[str, List[OutputTensor]],
    open_source: Callable[[], ContextManager[Source]],
    metadata: Dict[str, str],
    sync: bool = True,
    threads: int = 1,
    progress: Optional[Callable[[str, int], None]] = None,
) -> None:
    """Write each output file (name -> its tensors, in order) on ``threads`` threads, each from a source of its own
    (``open_source()``), then the index. A file's next batch is read while the one before it is written (two
    batches in memory). ``progress(name, nbytes)`` is called after each batch written."""

    def write_file(name: str) -> None:
        output = OutputFile(os.path.join(out_dir, name), files[name], metadata)
        try:
            with open_source() as source:
                pending = batches(files[name])
                current = next(pending, None)
                if current is not None:
                    source(current)
                while current is not None:
                    following = next(pending, None)
                    tasks = [functools.partial(_write_batch, output, current)]
                    if following is not None:
                        tasks.append(functools.partial(source, following))
                    run_in_threads(tasks, "hf-read-ahead")
                    if progress is not None:
                        progress(name, sum(r.out.numel() * r.out.element_size() for r in current))
                    current = following
        except BaseException:
            output.discard()
            raise
        output.commit(sync)

    for_each(list(files), write_file, max(1, min(threads, len(files))), "hf-write")
    weight_map = {t.fqn: name for name, tensors in files.items() for t in tensors}
    total_size = sum(numel(t.size) * t.dtype.itemsize for tensors in files.values() for t in tensors)
    index_path = os.path.join(out_dir, INDEX_FILE_NAME)
    with open(index_path + ".tmp", "wb") as f:
        f.write(index_bytes(weight_map, total_size))
        if sync:
            os.fsync(f.fileno())
    os.replace(index_path + ".tmp", index_path)
    if sync:
        FileSystem().sync_dir(out_dir)


def _write_batch(output: OutputFile, batch: List[Region]) -> None:
    for region in batch:
        output.write(region.fqn, tensor_bytes(region.out))


class _ShardFiles:
    """The source of consolidation: every region read from the chunks of the shard files that cover it. Each
    chunk's bytes are read once, front to back over the batches, so its CRC-32 is checked as it is read."""

    def __init__(self, directory: str, tensors: Dict[str, Tensor]) -> None:
        self.directory = directory
        self.tensors = tensors
        self._files: Dict[str, object] = {}
        self._crcs: Dict[Tuple[str, str], Tuple[int, int]] = {}  # (file, key) -> (rows read, CRC-32 so far)

    def _file(self, name: str) -> object:
        if name not in self._files:
            self._files[name] = open_regular(os.path.join(self.directory, name))
        return self._files[name]

    def __enter__(self) -> _ShardFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        for f in self._files.values():
            f.close()  # type: ignore[attr-defined]

    def __call__(self, batch: List[Region]) -> None:
        for region in batch:
            tensor = self.tensors[region.fqn]
            for chunk in tensor.chunks:
                self._fill(region, tensor, chunk)

    def _fill(self, region: Region, tensor: Tensor, chunk: Chunk) -> None:
        shape = chunk.entry.shape
        first = chunk.offsets[0] if shape else 0
        begin = max(region.begin, first) - first
        end = min(region.end, first + _rows(shape)) - first
        if begin >= end or numel(shape) == 0:
            return
        row_bytes = numel(shape[1:]) * tensor.dtype.itemsize
        into = region.out[first + begin - region.begin : first + end - region.begin] if shape else region.out
        whole_rows = tuple(shape[1:]) == tuple(tensor.size[1:])
        part = into if whole_rows else torch.empty((end - begin, *shape[1:]), dtype=tensor.dtype)
        view = tensor_bytes(part)
        f = self._file(chunk.file)
        f.seek(chunk.entry.begin + begin * row_bytes)  # type: ignore[attr-defined]
        got = f.readinto(view)  # type: ignore[attr-defined]
        path = os.path.join(self.directory, chunk.file)
        if got != len(view):
            raise ValueError(f"{path}: entry {chunk.fqn!r} is cut short (read {got} of {len(view)} bytes)")
        self._check(chunk, path, begin, end, view)
        if not whole_rows:
            for dim, (offset, length) in enumerate(zip(chunk.offsets[1:], shape[1:]), start=1):
                into = into.narrow(dim, offset, length)
            into.copy_(part)

    def _check(self, chunk: Chunk, path: str, begin: int, end: int, view: memoryview) -> None:
        if chunk.crc32 is None:
            return
        rows, crc = self._crcs.get((chunk.file, chunk.fqn), (0, 0))
        if rows != begin:
            raise AssertionError(f"{path}: entry {chunk.fqn!r} read out of order")
        crc = crc32(view, crc)
        self._crcs[(chunk.file, chunk.fqn)] = (end, crc)
        if end == _rows(chunk.entry.shape) and crc != chunk.crc32:
            raise ValueError(
                f"{path}: entry {chunk.fqn!r}: checksum mismatch: its bytes have CRC-32 {crc:#010x}, the header "
                f"recorded {chunk.crc32:#010x} (damaged file)"
            )


def consolidate_safetensors_files(
    input_dir: str,
    output_dir: str,
    fqn_to_index_mapping: Dict[str, int],
    num_threads: int = 1,
) -> None:
    """
    Consolidate sharded safetensors files into one or more output files.

    Reads the shard files of a distributed save in ``input_dir`` (each chunk placed by its file's
    ``DCP_SHARDING_INFO``) and writes every tensor of ``fqn_to_index_mapping`` whole into file
    ``model-{index}-of-{N}.safetensors`` of ``output_dir`` (N the largest index), then
    ``model.safetensors.index.json``.

    Args:
        input_dir: Directory containing sharded safetensors files
        output_dir: Directory where consolidated files will be written
        fqn_to_index_mapping: Mapping of tensor names to output file indices (from 1).
        num_threads: Number of threads to use for parallel processing of saving data to output files.
    """
    start = time.perf_counter()
    tensors, _ = scan(FileSystem(), input_dir)
    missing = [fqn for fqn in fqn_to_index_mapping if fqn not in tensors]
    if missing:
        raise ValueError(f"{input_dir}: no shard file holds {names(missing)} (named by fqn_to_index_mapping)")
    count = max(fqn_to_index_mapping.values())
    files: Dict[str, List[OutputTensor]] = {}
    for fqn, index in fqn_to_index_mapping.items():
        tensor = tensors[fqn]
        files.setdefault(file_name(index, count), []).append(OutputTensor(fqn, tensor.dtype, tensor.size))
    os.makedirs(output_dir, exist_ok=True)
    write_files(output_dir, files, functools.partial(_ShardFiles, input_dir, tensors),
                {_safetensors.FORMAT_KEY: _safetensors.FORMAT_VALUE}, True, num_threads)
    logger.info("consolidated %d tensors from %s into %d file(s) in %s in %.2f s",
                len(fqn_to_index_mapping), input_dir, len(files), output_dir, time.perf_counter() - start)

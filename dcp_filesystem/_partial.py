"""Reading part of a stored tensor: only the byte ranges of the sub-box a load asks for, checked by blocks.

A stored tensor is a run of bytes in row-major order (a SAFETENSORS entry, a
torch.save archive's storage). The sub-box a read item asks for
(``storage_offsets``/``lengths``) is a set of equal, evenly spaced chunks of
that run: one chunk where only the leading dimension is cut (an FSDP shard of a
dim-0 sharded tensor), many where an inner one is (a tensor-parallel slice).
One chunk is read straight into the target. Many are read as the slab of rows
around them where the gaps between them are small (below ``GAP_BYTES``,
reading a gap costs less than a read call per chunk), else one by one.

Where the item has block CRC-32s (``_checksum.Blocks``), every range read is
widened to whole blocks and each block is checked; where it has none (stock
torch, or no checksum at all) the ranges are read as they are.
``DCP_FILESYSTEM_PARTIAL_READS=0`` turns partial reads off: whole items are
read, as upstream does (benchmarks compare the two).
"""
from __future__ import annotations

import ctypes
import os
from typing import List, Optional, Sequence, Tuple

import torch

from ._bytes import numel, tensor_bytes
from ._checksum import Blocks, block_error
from ._crc import crc32, crc32_blocks
from ._item import Item
from ._parallel import run_in_threads, share_of_cores

# Gaps between the chunks of an inner-dimension slice below this are read through. Measured warm (page cache)
# on half the columns of a 128 MiB float32 matrix, unchecked: gaps of 8 KiB, the slab 113 ms, chunk by chunk
# 143 ms; gaps of 32 KiB, 117 ms against 43 ms (and 95 against 56 at 128 KiB, 121 against 28 at 512 KiB).
# Checked items widen every chunk to its 256 KiB blocks first, so their smaller gaps are read anyway.
GAP_BYTES = 16 << 10
_CHECK_PART_BYTES = 8 << 20  # blocks are checked on several cores in parts of about this size


def enabled() -> bool:
    return os.environ.get("DCP_FILESYSTEM_PARTIAL_READS", "1") != "0"


def _chunks(shape: Sequence[int], itemsize: int, offsets: Sequence[int], lengths: Sequence[int]) -> Tuple[int, int]:
    """(the last cut dimension, the bytes of one chunk) of a sub-box."""
    cut = max(d for d in range(len(shape)) if offsets[d] != 0 or lengths[d] != shape[d])
    return cut, lengths[cut] * numel(shape[cut + 1 :]) * itemsize


def span(shape: Sequence[int], itemsize: int, offsets: Sequence[int], lengths: Sequence[int],
         blocks: Optional[Blocks]) -> Tuple[int, int]:
    """[begin, end) of the run that holds a sub-box (the rows of its leading dimension), widened to whole
    blocks where ``blocks`` are given."""
    row = numel(shape[1:]) * itemsize
    begin, end = offsets[0] * row, (offsets[0] + lengths[0]) * row
    return (begin, end) if blocks is None else blocks.widen(begin, end, numel(shape) * itemsize)


def read_part(
    data_file: object, item: Item, target: torch.Tensor, start: int, shape: Tuple[int, ...], dtype: torch.dtype,
    blocks: Optional[Blocks],
) -> None:
    """Fill ``target`` with the sub-box ``item`` asks for of the tensor of ``shape`` and ``dtype`` stored as the
    run of bytes at ``start`` of ``data_file`` (a ``DataFile``); ``blocks``: the run's block CRC-32s, or None
    to read unchecked."""
    offsets, lengths = tuple(item.req.storage_offsets), tuple(item.req.lengths)
    item.check_size(target, torch.Size(lengths))
    if any(o < 0 or o + n > s for o, n, s in zip(offsets, lengths, shape)):
        raise item.error(f" asks for {list(lengths)} at {list(offsets)} of a stored tensor of size {list(shape)}")
    if numel(lengths) == 0:
        return
    direct = target.device.type == "cpu" and target.dtype == dtype and target.is_contiguous()
    box = target if direct else torch.empty(lengths, dtype=dtype)
    itemsize = dtype.itemsize
    reader = _Ranges(data_file, item, start, numel(shape) * itemsize, blocks)
    cut, chunk = _chunks(shape, itemsize, offsets, lengths)
    row = numel(shape[1:]) * itemsize
    if cut == 0:
        reader.read_into(offsets[0] * row, tensor_bytes(box))
    elif (shape[cut] - lengths[cut]) * numel(shape[cut + 1 :]) * itemsize < GAP_BYTES:
        slab = torch.empty((lengths[0], *shape[1:]), dtype=dtype)
        reader.read_into(offsets[0] * row, tensor_bytes(slab))
        for dim in range(1, cut + 1):
            slab = slab.narrow(dim, offsets[dim], lengths[dim])
        box.copy_(slab)
    else:
        _read_chunks(reader, shape, itemsize, offsets, lengths, cut, chunk, box)
    if box is not target:
        target.copy_(box)


def _read_chunks(
    reader: _Ranges, shape: Tuple[int, ...], itemsize: int, offsets: Sequence[int], lengths: Sequence[int],
    cut: int, chunk: int, box: torch.Tensor,
) -> None:
    """The chunks of a sub-box one by one (or blockwise groups of them), each into its place in ``box``."""
    strides = [numel(shape[d + 1 :]) * itemsize for d in range(len(shape))]
    starts = [offsets[cut] * strides[cut]]
    for dim in range(cut - 1, -1, -1):
        starts = [base + (offsets[dim] + i) * strides[dim] for i in range(lengths[dim]) for base in starts]
    starts.sort()
    address = box.data_ptr()
    for begin, end, members in reader.groups(starts, chunk):
        buffer = reader.read_span(begin, end)
        base = ctypes.addressof(ctypes.c_char.from_buffer(buffer)) if len(buffer) else 0
        for index, chunk_start in members:
            ctypes.memmove(address + index * chunk, base + chunk_start - begin, chunk)


class _Ranges:
    """Reads of byte ranges of one tensor's run: exact where unchecked, else widened to whole checked blocks."""

    def __init__(self, data_file: object, item: Item, start: int, size: int, blocks: Optional[Blocks]) -> None:
        self.data_file = data_file
        self.item = item
        self.start = start
        self.size = size
        self.blocks = blocks

    def _widened(self, begin: int, end: int) -> Tuple[int, int]:
        return (begin, end) if self.blocks is None else self.blocks.widen(begin, end, self.size)

    def groups(self, starts: List[int], chunk: int) -> List[Tuple[int, int, List[Tuple[int, int]]]]:
        """The chunks at ``starts`` (sorted), as the spans read for them: (begin, end, [(chunk index, start)])."""
        groups: List[Tuple[int, int, List[Tuple[int, int]]]] = []
        for index, chunk_start in enumerate(starts):
            begin, end = self._widened(chunk_start, chunk_start + chunk)
            if groups and begin <= groups[-1][1]:
                groups[-1] = (groups[-1][0], max(end, groups[-1][1]), groups[-1][2] + [(index, chunk_start)])
            else:
                groups.append((begin, end, [(index, chunk_start)]))
        return groups

    def read_span(self, begin: int, end: int) -> bytearray:
        """The bytes ``[begin, end)`` of the run (whole blocks where checked), checked."""
        buffer = self.data_file.read_exact(self.start + begin, end - begin, self.item)
        if self.blocks is not None:
            self._check(begin, [memoryview(buffer)])
        return buffer

    def read_into(self, begin: int, view: memoryview) -> None:
        """Fill ``view`` with the run's bytes from ``begin``, straight from the file; where checked, the bytes
        of the blocks around it are read beside it and every block is checked."""
        end = begin + len(view)
        wide_begin, wide_end = self._widened(begin, end)
        head = self.data_file.read_exact(self.start + wide_begin, begin - wide_begin, self.item)
        got, _ = self.data_file.readinto_with_crc(self.start + begin, view, False)
        if got != len(view):
            raise self.item.error(f": read {got} of {len(view)} bytes at offset {self.start + begin}")
        tail = memoryview(self.data_file.read_exact(self.start + end, wide_end - end, self.item))
        if self.blocks is None:
            return
        size = self.blocks.block_bytes
        if wide_end - wide_begin <= size:
            self._check(wide_begin, [memoryview(head), view, tail])
            return
        lead = (-begin) % size  # the view's bytes in the first block, after the head's
        whole = (len(view) - lead) // size * size
        self._check(wide_begin, [memoryview(head), view[:lead]])
        self._check(begin + lead, [view[lead : lead + whole]])
        self._check(begin + lead + whole, [view[lead + whole :], tail])

    def _check(self, begin: int, pieces: List[memoryview]) -> None:
        """Check the whole blocks that ``pieces``, back to back from ``begin`` (a block's start), consist of
        (the run's last block may be shorter)."""
        size = self.blocks.block_bytes
        first = begin // size
        if len(pieces) == 1 and len(pieces[0]) >= 2 * _CHECK_PART_BYTES:
            self._check_on_cores(first, pieces[0])
            return
        n, crc, filled = first, 0, 0
        for piece in pieces:
            while len(piece):
                take = min(len(piece), size - filled)
                crc, filled, piece = crc32(piece[:take], crc), filled + take, piece[take:]
                if filled == size:
                    self._expect(n, crc)
                    n, crc, filled = n + 1, 0, 0
        if filled:
            self._expect(n, crc)

    def _check_on_cores(self, first: int, data: memoryview) -> None:
        size = self.blocks.block_bytes
        step = max(size, _CHECK_PART_BYTES - _CHECK_PART_BYTES % size)
        parts = [(at, data[at : at + step]) for at in range(0, len(data), step)]
        parts = parts if share_of_cores(self.data_file.reads_at_once) > 1 else [(0, data)]
        found = run_in_threads([lambda part=part: crc32_blocks(part[1], size)[1] for part in parts], "crc32")
        for (at, _), crcs in zip(parts, found):
            n = first + at // size
            if crcs != self.blocks.crcs[4 * n : 4 * n + len(crcs)]:
                for k in range(len(crcs) // 4):
                    self._expect(n + k, int.from_bytes(crcs[4 * k : 4 * k + 4], "little"))

    def _expect(self, n: int, crc: int) -> None:
        expected = self.blocks.crc(n)
        if crc != expected:
            begin = self.start + n * self.blocks.block_bytes
            end = min(begin + self.blocks.block_bytes, self.start + self.size)
            raise block_error(self.item.file, self.item.req.storage_index, n, begin, end, crc, expected)

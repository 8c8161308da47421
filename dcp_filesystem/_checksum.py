"""Checksums of what this package writes: a CRC-32 of every item's stored bytes, and of ``.metadata``.

Every item (a tensor in either format, a non-tensor value, a stream-transformed
payload) is stored as one run of bytes ``[offset, offset + length)`` of a data
file, and its storage info in ``.metadata`` says where. The CRC-32 (zlib's) of
exactly that run is kept in the same storage info, as an extra attribute
``crc32``:

- it is known only once the item is written, and ``.metadata`` is written after
  every data file, so no stream ever seeks back (object stores cannot) and no
  second pass over the bytes is needed: the CRC is computed as they are written
  (large writes on a second thread, beside the write);
- data files keep their exact formats: a SAFETENSORS file stays a valid
  safetensors file, a torch.save archive stays one;
- stock torch unpickles the attribute into the storage info's ``__dict__`` and
  never looks at it, on every torch this package supports; older checkpoints and
  stock-written ones have none, and their items load unchecked.

A tensor whose bytes are one run of 1 MiB or more (a SAFETENSORS entry, a
torch.save archive's storage) also gets the CRC-32 of each ``BLOCK_BYTES``
block of that run (attribute ``crc32_blocks``: the block size, where the run
starts within the item, the CRC-32s as little-endian 32-bit words), so that a
load that needs part of the tensor reads whole blocks around that part and
checks each. An item with only its item CRC-32 is read whole (and checked); one
with none is read in part, unchecked. 256 KiB: the step in which positioned
reads checksum what they read (``_parallel._CRC_STEP_BYTES``, measured fastest),
16 KB of metadata per GB, and at most 0.5 MiB read beyond the edges of a part.

``.metadata`` itself ends with a 12-byte trailer after its pickle: a magic and
the CRC-32 of the pickle. ``pickle.load`` stops at the pickle's end, so stock
torch reads the file as before; a damaged pickle could otherwise load with other
offsets or shapes and put the right bytes in the wrong places.
"""
from __future__ import annotations

import struct
from typing import IO, Any, NamedTuple, Optional, Tuple

from ._crc import crc32, crc32_blocks, crc32_combine
from ._format import describe_item
from ._parallel import write_with_crc as _write_beside_crc

_FIELD = "crc32"
_BLOCKS_FIELD = "crc32_blocks"
BLOCK_BYTES = 256 << 10
# Writes this large get their CRC-32 computed on a second thread while they are written.
_OVERLAP_BYTES = 1 << 20
# Smaller writes are gathered into one write of about this many bytes.
_BATCH_BYTES = 1 << 20
_TRAILER_MAGIC = b"DCPCRC32"
_TRAILER = struct.Struct("<8sI")


def stored_crc32(info: Any) -> Optional[int]:
    """The CRC-32 recorded for an item's stored bytes, or None where there is none (stock torch, older ours)."""
    return getattr(info, _FIELD, None)


def record_crc32(info: Any, crc: int) -> None:
    setattr(info, _FIELD, crc)


class Blocks(NamedTuple):
    """The CRC-32s of the blocks of a tensor's run of bytes."""

    block_bytes: int
    start: int  # where the run starts, from the item's first byte
    crcs: bytes  # little-endian 32-bit words

    def crc(self, n: int) -> int:
        return _WORD.unpack_from(self.crcs, 4 * n)[0]

    def cover(self, nbytes: int) -> bool:
        """Whether these are the blocks of a run of ``nbytes`` bytes."""
        return len(self.crcs) == 4 * -(-nbytes // self.block_bytes)

    def widen(self, begin: int, end: int, run_bytes: int) -> Tuple[int, int]:
        """``[begin, end)`` of a run of ``run_bytes`` bytes, widened to the whole blocks around it."""
        size = self.block_bytes
        return begin - begin % size, min(end + (-end) % size, run_bytes)


_WORD = struct.Struct("<I")


def stored_blocks(info: Any) -> Optional[Blocks]:
    """The block CRC-32s recorded for an item's tensor, or None where there are none."""
    found = getattr(info, _BLOCKS_FIELD, None)
    if not (isinstance(found, tuple) and len(found) == 3):
        return None
    block_bytes, start, crcs = found
    if not (isinstance(block_bytes, int) and block_bytes > 0 and isinstance(start, int) and isinstance(crcs, bytes)):
        return None
    return Blocks(block_bytes, start, crcs)


def blocks_of_run(info: Any, start: int, nbytes: int) -> Optional[Blocks]:
    """The block CRC-32s of the run of ``nbytes`` bytes that starts ``start`` bytes into an item, where the
    metadata has those."""
    blocks = stored_blocks(info)
    return blocks if blocks is not None and blocks.start == start and blocks.cover(nbytes) else None


def record_blocks(info: Any, blocks: Blocks) -> None:
    setattr(info, _BLOCKS_FIELD, tuple(blocks))


def check(name: str, index: Any, info: Any, crc: int) -> None:
    """Raise if the stored bytes of the item ``index`` (a MetadataIndex), whose CRC-32 is ``crc``, are not
    what was written."""
    expected = stored_crc32(info)
    if expected is not None and expected != crc:
        raise ValueError(
            f"{name}: item {describe_item(index)}: checksum mismatch: its {info.length} stored bytes at offset "
            f"{info.offset} have CRC-32 {crc:#010x}, the metadata recorded {expected:#010x} (damaged checkpoint)"
        )


def block_error(name: str, index: Any, n: int, begin: int, end: int, crc: int, expected: int) -> ValueError:
    """The error for block ``n`` (the file's bytes ``[begin, end)``) of an item's tensor, whose CRC-32 is
    ``crc`` where the metadata recorded ``expected``."""
    return ValueError(
        f"{name}: item {describe_item(index)}: checksum mismatch in block {n} of its tensor (bytes [{begin}, {end})): "
        f"CRC-32 {crc:#010x}, the metadata recorded {expected:#010x} (damaged checkpoint)"
    )


def check_blocks(name: str, index: Any, info: Any, data: memoryview) -> None:
    """Raise if the bytes of an item's tensor, ``data``, do not match the block CRC-32s the metadata recorded
    (where it recorded some for a run of that size)."""
    blocks = stored_blocks(info)
    if blocks is None or not blocks.cover(len(data)):
        return
    run_start = info.offset + blocks.start
    _, crcs = crc32_blocks(data, blocks.block_bytes)
    if crcs == blocks.crcs:
        return
    n = next(k for k in range(len(crcs) // 4) if crcs[4 * k : 4 * k + 4] != blocks.crcs[4 * k : 4 * k + 4])
    begin = run_start + n * blocks.block_bytes
    end = min(begin + blocks.block_bytes, run_start + len(data))
    raise block_error(name, index, n, begin, end, _WORD.unpack_from(crcs, 4 * n)[0], blocks.crc(n))


class ChecksummingWriter:
    """A write stream that keeps the CRC-32 of what was written since ``start_item``.

    Small writes are gathered and reach ``stream`` together, up to ``_BATCH_BYTES`` in one call (an
    item's bytes are often smaller than a file system's write is worth); ``flush`` writes them out, and
    must be called before ``stream`` is synced or closed. ``tell`` is kept here, not asked of the stream.
    """

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream
        self.crc = 0
        self.blocks: Optional[Blocks] = None  # of this item's one large write
        self._item_start = self._position = stream.tell()
        self._large_writes = 0
        self._pending = bytearray()

    def start_item(self) -> None:
        self.crc = 0
        self.blocks = None
        self._item_start = self._position
        self._large_writes = 0

    def tell(self) -> int:
        return self._position

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        size = len(view)
        if size < _OVERLAP_BYTES:
            self._pending += view
            self.crc = crc32(view, self.crc)
            self._position += size
            if len(self._pending) >= _BATCH_BYTES:
                self._write_pending()
        else:
            self.write_with_crc(view)
        return size

    def write_with_crc(self, data: Any) -> int:
        """Write ``data``; the CRC-32 of ``data`` alone. The item's ``blocks`` are those of its one such write."""
        view = memoryview(data).cast("B")
        self._write_pending()
        crc, crcs = _write_beside_crc(self.stream, view, BLOCK_BYTES)
        self._large_writes += 1
        self.blocks = Blocks(BLOCK_BYTES, self._position - self._item_start, crcs) if self._large_writes == 1 else None
        self._position += len(view)
        self.crc = crc32_combine(self.crc, crc, len(view))
        return crc

    def _write_pending(self) -> None:
        if self._pending:
            pending, self._pending = self._pending, bytearray()
            self.stream.write(memoryview(pending))  # an object store's stream takes bytes or memoryview

    def flush(self) -> None:
        self._write_pending()
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def write_with_crc(stream: IO[bytes], data: memoryview) -> int:
    """Write ``data`` to ``stream``; the CRC-32 of ``data``, computed once however many need it."""
    if isinstance(stream, ChecksummingWriter):
        return stream.write_with_crc(data)
    if len(data) >= _OVERLAP_BYTES:
        return _write_beside_crc(stream, data, len(data))[0]
    return _write_then_crc(stream, data)


def _write_then_crc(stream: IO[bytes], data: memoryview) -> int:
    stream.write(data)
    return crc32(data)


def with_trailer(pickled: bytes) -> bytes:
    """``.metadata``'s bytes: the pickle, then its CRC-32 trailer."""
    return pickled + _TRAILER.pack(_TRAILER_MAGIC, crc32(pickled))


def checked_pickle(data: bytes, name: str) -> bytes:
    """The pickle of a ``.metadata`` file, checked against its trailer where it has one."""
    if len(data) < _TRAILER.size:
        return data
    magic, crc = _TRAILER.unpack_from(data, len(data) - _TRAILER.size)
    if magic != _TRAILER_MAGIC:
        return data  # written by stock torch or an older version of this package
    pickled = data[: -_TRAILER.size]
    if crc32(pickled) != crc:
        raise ValueError(f"{name}: checksum mismatch: the metadata is damaged (its CRC-32 does not match)")
    return pickled

"""The SAFETENSORS format: data files that are valid safetensors files.

This package writes one safetensors file per data file: the header (dtype,
shape and offsets of every entry, and DCP's sharding info in ``__metadata__``)
first, then every item's raw bytes back to back. A tensor is stored under its
fqn, or ``fqn@offsets`` where one file holds several chunks of it; a non-tensor
value as a uint8 entry of its bytes. An item's storage info points at its raw
bytes, inside the file's data section.

Stock torch 2.8+ writes the same kind of file, but an item's storage info
points at the file's header (offset 0), and the item is found by its fqn.

Loads: ``read_item`` fills a target with an entry's bytes, straight from the
file where the target takes them, checked against the item's CRC-32; where the
load needs part of the entry, only that part (``_partial``).
"""
from __future__ import annotations

import io
import json
import re
import struct
from typing import IO, Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch.distributed.checkpoint.planner import WriteItem

from . import _checksum, _compat, _partial
from ._bytes import byte_count, chunk_nbytes, numel, tensor_bytes, tensor_from_bytes
from ._format import metadata_chunk
from ._item import Item

SHARDING_INFO_KEY = "DCP_SHARDING_INFO"
DCP_VERSION_KEY = "DCP_VERSION"
DCP_VERSION_VALUE = "1.0"
FORMAT_KEY = "format"
FORMAT_VALUE = "pt"
BYTE_IO_KEY = "DCP_BYTE_IO"
# In ``__metadata__`` (whose values must be strings), where the writer could go back to the header once the
# entries were written (see with_crc32s): CRC32_KEY, a JSON object of entry key -> the CRC-32 of the entry's
# bytes as 8 hex digits; CRC32_BLOCKS_KEY, for entries of more than one block, {"block_bytes": N, "entries":
# {key: the CRC-32 of each N-byte block of the entry, 8 hex digits each}}. CRC32_UNKNOWN, in place of 8 hex
# digits, says a value was not recorded.
CRC32_KEY = "DCP_CRC32"
CRC32_BLOCKS_KEY = "DCP_CRC32_BLOCKS"
CRC32_UNKNOWN = "--------"
_HEX8 = re.compile("[0-9a-f]{8}")
_COMPACT = (",", ":")
HEADER_METADATA_KEY = "__metadata__"
MAX_HEADER_BYTES = 100_000_000
_OURS_FIELD = "safetensors_entry"  # in an item's storage info: see mark_ours
SNIFF_BYTES = 9  # the header's length, then its opening brace

DTYPES: Dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "C64": torch.complex64,
    **_compat.float8_dtypes(),
}
_NAMES: Dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


class Entry(NamedTuple):
    dtype: torch.dtype
    shape: Tuple[int, ...]
    begin: int  # absolute file offset
    end: int


class Header(NamedTuple):
    data_start: int  # absolute file offset of the data section
    entries: Dict[str, Entry]
    metadata: Dict[str, str]


def dtype_name(dtype: torch.dtype, key: str) -> str:
    try:
        return _NAMES[dtype]
    except KeyError:
        raise ValueError(
            f"SAFETENSORS format cannot store {key!r}: dtype {dtype} has no safetensors name "
            f"(supported: {', '.join(str(d) for d in _NAMES)})"
        ) from None


def chunk_key(fqn: str, offsets: Sequence[int]) -> str:
    """The key of one chunk of a tensor, where a data file holds several chunks of it."""
    return f"{fqn}@{','.join(str(o) for o in offsets)}"


def _encode_header(entries: Sequence[Tuple[str, torch.dtype, Sequence[int], int]], metadata: Dict[str, str]) -> bytes:
    """The 8-byte length and JSON header for ``entries`` laid out back to back in order."""
    header: Dict[str, Any] = {HEADER_METADATA_KEY: metadata}
    position = 0
    for key, dtype, shape, nbytes in entries:
        offsets = [position, position + nbytes]
        header[key] = {"dtype": dtype_name(dtype, key), "shape": list(shape), "data_offsets": offsets}
        position += nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(len(text) + 8) % 8)
    return struct.pack("<Q", len(text)) + text


def file_layout(
    byte_items: List[Tuple[WriteItem, io.BytesIO]], tensor_items: List[WriteItem], crc32_room: bool = False
) -> Tuple[bytes, Dict[int, Tuple[str, int]]]:
    """The header of a data file holding these items in this order and, per item id, its key and byte count;
    with ``crc32_room``, with room for the entries' CRC-32s (see with_crc32s)."""
    fqn_counts: Dict[str, int] = {}
    for wi in tensor_items:
        fqn_counts[wi.index.fqn] = fqn_counts.get(wi.index.fqn, 0) + 1
    entries = []
    layout: Dict[int, Tuple[str, int]] = {}
    sharding: Dict[str, Any] = {}
    for wi, data in byte_items:
        nbytes = byte_count(data)
        entries.append((wi.index.fqn, torch.uint8, (nbytes,), nbytes))
        layout[id(wi)] = (wi.index.fqn, nbytes)
    for wi in tensor_items:
        offsets = list(wi.tensor_data.chunk.offsets)
        key = wi.index.fqn if fqn_counts[wi.index.fqn] == 1 else chunk_key(wi.index.fqn, offsets)
        nbytes = chunk_nbytes(wi)
        entries.append((key, wi.tensor_data.properties.dtype, tuple(wi.tensor_data.chunk.sizes), nbytes))
        layout[id(wi)] = (key, nbytes)
        sharding[key] = {"saved_offsets": offsets}
    metadata = {SHARDING_INFO_KEY: json.dumps(sharding), DCP_VERSION_KEY: DCP_VERSION_VALUE, FORMAT_KEY: FORMAT_VALUE}
    if byte_items:
        metadata[BYTE_IO_KEY] = json.dumps([wi.index.fqn for wi, _ in byte_items])
    if crc32_room:
        metadata.update(crc32_room_for([(key, nbytes) for key, _, _, nbytes in entries]))
    return _encode_header(entries, metadata), layout


def looks_like_header(head: bytes) -> bool:
    """Whether bytes start a safetensors header: an 8-byte little-endian length, then the JSON's brace."""
    return len(head) >= SNIFF_BYTES and head[8:9] == b"{"


def read_header(
    read_at: Callable[[int, int], bytes], base: int, file_size: Optional[int], where: str
) -> Optional[Header]:
    """The bounds-checked safetensors header that begins at ``base``; None where none begins there.

    ``read_at(offset, n)`` returns up to n bytes at an absolute offset; ``file_size`` is None where
    the file's size is not known (an object store's stream), and reads past its end come back short.
    """
    size = MAX_HEADER_BYTES + base + 8 if file_size is None else file_size
    start = read_at(base, SNIFF_BYTES)
    if not looks_like_header(start):
        return None
    (header_len,) = struct.unpack("<Q", start[:8])
    if header_len > MAX_HEADER_BYTES or base + 8 + header_len > size:
        the_file = "" if file_size is None else f"the file ({file_size} bytes) or "
        raise ValueError(
            f"{where}: safetensors header length {header_len} is larger than {the_file}"
            f"the {MAX_HEADER_BYTES}-byte limit"
        )
    raw = read_at(base + 8, header_len)
    if len(raw) != header_len:
        raise ValueError(f"{where}: safetensors header of {header_len} bytes is cut short at {len(raw)} bytes")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{where}: safetensors header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{where}: safetensors header is not a JSON object")
    data_start = base + 8 + header_len
    metadata = header.pop(HEADER_METADATA_KEY, None) or {}
    entries: Dict[str, Entry] = {}
    for key, info in header.items():
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{where}: safetensors entry {key!r} is malformed: {info!r}") from None
        nbytes = numel(shape) * dtype.itemsize
        if min(shape, default=0) < 0 or begin < 0 or end - begin != nbytes or data_start + end > size:
            raise ValueError(
                f"{where}: safetensors entry {key!r} has offsets {[begin, end]} that do not fit "
                f"shape {list(shape)} of {info['dtype']} in a {file_size or 'not sized'}-byte file"
            )
        entries[key] = Entry(dtype, shape, data_start + begin, data_start + end)
    _check_tiling(entries, data_start, None if file_size is None else file_size - data_start, where)
    return Header(data_start, entries, metadata if isinstance(metadata, dict) else {})


def _check_tiling(entries: Dict[str, Entry], data_start: int, data_size: Optional[int], where: str) -> None:
    """As the safetensors library requires: the entries, in offset order, fill the data section back to
    back from its start (to its end, where the file's size is known), none overlapping another."""
    position = data_start
    for key, entry in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin != position:
            problem = "overlaps the entry before it" if entry.begin < position else "leaves a gap before it"
            offsets = [entry.begin - data_start, entry.end - data_start]
            raise ValueError(
                f"{where}: safetensors entry {key!r} at data offsets {offsets} {problem} "
                f"(the entries before it end at {position - data_start})"
            )
        position = entry.end
    if data_size is not None and position - data_start != data_size:
        raise ValueError(
            f"{where}: safetensors entries end at data offset {position - data_start}, "
            f"but the file's data section has {data_size} bytes"
        )


def find_entry(header: Header, fqn: str, offsets: Optional[Sequence[int]], begin: int, end: int) -> Optional[Entry]:
    """The entry of this package's file that holds the item stored at ``[begin, end)``."""
    keys = [fqn] if offsets is None else [fqn, chunk_key(fqn, offsets)]
    for key in keys:
        entry = header.entries.get(key)
        if entry is not None and entry.begin == begin and entry.end == end:
            return entry
    return None


def mark_ours(info: Any) -> None:
    """Say in an item's storage info that its bytes are an entry of this package's safetensors file, so a
    reader knows without the file's header (an object store serves only the items' own bytes)."""
    setattr(info, _OURS_FIELD, True)


def is_ours(info: Any) -> bool:
    return bool(getattr(info, _OURS_FIELD, False))


def entry_from_metadata(info: Any, tensor: Any, index: Any) -> Optional[Entry]:
    """The entry of a marked item, from the checkpoint's metadata of its tensor (``TensorStorageMetadata``);
    None for an unmarked item or where the metadata has no chunk at the item's offsets."""
    if not is_ours(info):
        return None
    chunk = metadata_chunk(tensor, index)
    if chunk is None:
        return None
    shape = tuple(chunk.sizes)
    dtype = tensor.properties.dtype
    if numel(shape) * dtype.itemsize != info.length:
        return None
    return Entry(dtype, shape, info.offset, info.offset + info.length)


def stock_entry(header: Optional[Header], fqn: str) -> Optional[Entry]:
    """The entry of an item in a stock torch file, whose storage info points at the file's header."""
    return None if header is None else header.entries.get(fqn)


def file_header(data_file: Any, base: int = 0) -> Optional[Header]:
    """The safetensors header that starts at ``base`` of an open data file (a ``DataFile``), or None where none
    does; parsed once per file."""
    key = (__name__, base)
    if key not in data_file.parsed:
        where = f"{data_file.name} (offset {base})"
        data_file.parsed[key] = read_header(data_file.read_at, base, data_file.size, where)
    return data_file.parsed[key]


def prepare_file(data_file: Any, infos: Sequence[Any]) -> None:
    """Parse the header a load of these items may use, so that a damaged one fails first, whichever item
    comes first: that of a local file holding items not marked as this package's."""
    if data_file.local and not all(is_ours(info) for info in infos):
        file_header(data_file)


def _entry(data_file: Any, item: Item, stock: bool) -> Entry:
    """The entry that holds an item: a marked item's from the metadata, else from its file's header (stock
    torch's items point at the header of the file holding them and are found by fqn)."""
    info, index = item.info, item.req.storage_index
    if stock:
        entry = stock_entry(file_header(data_file, info.offset), index.fqn)
    else:
        entry = entry_from_metadata(info, item.tensor, index)
        if entry is None:
            header = file_header(data_file)
            end = info.offset + info.length
            entry = None if header is None else find_entry(header, index.fqn, index.offset, info.offset, end)
    if entry is None:
        where = "" if stock else f" [{info.offset}, {info.offset + info.length})"
        raise item.cannot_read(ValueError(f"no safetensors entry covers the item's bytes{where}"))
    return entry


def read_item(data_file: Any, item: Item, target: torch.Tensor, stock: bool, payload: Optional[bytearray]) -> None:
    """Fill ``target`` with the part of a tensor stored as a safetensors entry that ``item`` asks for:
    straight from the file where the target takes the whole entry, else through memory. ``payload``: the
    item's stored bytes where they were read already (checked)."""
    entry = _entry(data_file, item, stock)
    nbytes = entry.end - entry.begin
    if payload is None and not item.is_whole(entry.shape) and _partial.enabled():
        blocks = _checksum.blocks_of_run(item.info, entry.begin - item.info.offset, nbytes)
        if blocks is not None or not item.checked:  # else read whole, to be checked
            _partial.read_part(data_file, item, target, entry.begin, entry.shape, entry.dtype, blocks)
            return
    if (payload is None and item.is_whole(entry.shape) and target.dtype == entry.dtype
            and data_file.takes(target)):
        item.check_size(target, entry.shape)
        with_crc = item.checked and not stock
        crc = data_file.read_into(item, target, entry.begin, nbytes, with_crc)
        if with_crc:
            item.check(crc)
        return
    if stock:
        raw = data_file.read_exact(entry.begin, nbytes, item)
    else:
        raw = data_file.read_checked(item) if payload is None else payload
    item.fill(target, tensor_from_bytes(raw, entry.dtype, entry.shape))


def plain_in_metadata(item: Item) -> Optional[Tuple[torch.dtype, Tuple[int, ...], int, int]]:
    """(dtype, shape, 0, nbytes) of a marked item's whole entry, from the metadata alone; None where it has none.
    A bare tuple: many small items take this way (see ``_load_items``)."""
    entry = entry_from_metadata(item.info, item.tensor, item.req.storage_index)
    return None if entry is None else (entry.dtype, entry.shape, 0, item.info.length)


def write_tensor(tensor: torch.Tensor, stream: IO[bytes]) -> None:
    """An entry's bytes: the tensor's, in row-major order."""
    contiguous = tensor.contiguous()  # held while its bytes are written: tensor_bytes does not hold it
    stream.write(tensor_bytes(contiguous))


def start_file(
    stream: IO[bytes],
    storage_key: str,
    byte_items: List[Tuple[WriteItem, io.BytesIO]],
    tensor_items: List[WriteItem],
    size: Callable[[WriteItem], int],
    crc32_room: bool = False,
) -> Callable[[torch.Tensor, WriteItem], None]:
    """Write the header of a data file of these items; the header fixes their order, so ``tensor_items`` is
    sorted into it here by ``size``, the order the writer's loaders keep. Returns the check each tensor must
    pass, in that order, before its bytes are written. ``crc32_room``: see file_layout."""
    tensor_items.sort(key=size)
    header, layout = file_layout(byte_items, tensor_items, crc32_room)
    stream.write(header)
    expected = iter(tensor_items)

    def check(tensor: torch.Tensor, wi: WriteItem) -> None:
        if wi is not next(expected):
            raise AssertionError("tensor loader changed the order fixed by the safetensors header")
        key, nbytes = layout[id(wi)]
        if tensor.dtype != wi.tensor_data.properties.dtype or tensor.numel() * tensor.element_size() != nbytes:
            raise ValueError(
                f"{storage_key}: tensor {key!r} resolved to {tensor.dtype} {list(tensor.shape)}, "
                f"but the save plan announced {wi.tensor_data.properties.dtype} {list(wi.tensor_data.chunk.sizes)}"
            )

    return check


# ---------------------------------------------------------------- CRC-32s in the header
def encode_header(entries: Sequence[Tuple[str, torch.dtype, Sequence[int]]], metadata: Dict[str, str]) -> bytes:
    """The 8-byte length and JSON header of a file holding whole tensors of these dtypes and shapes back to back."""
    return _encode_header([(key, dtype, shape, numel(shape) * dtype.itemsize) for key, dtype, shape in entries],
                          metadata)


def _block_count(nbytes: int) -> int:
    return -(-nbytes // _checksum.BLOCK_BYTES) if nbytes > _checksum.BLOCK_BYTES else 0


def crc32_room_for(entries: Sequence[Tuple[str, int]]) -> Dict[str, str]:
    """The ``__metadata__`` values that hold the CRC-32s of entries (key, byte count) until they are known:
    CRC32_UNKNOWN in every place, the length the values will have."""
    room = {CRC32_KEY: json.dumps({key: CRC32_UNKNOWN for key, _ in entries}, separators=_COMPACT)}
    blocks = {key: CRC32_UNKNOWN * _block_count(nbytes) for key, nbytes in entries if _block_count(nbytes)}
    if blocks:
        value = {"block_bytes": _checksum.BLOCK_BYTES, "entries": blocks}
        room[CRC32_BLOCKS_KEY] = json.dumps(value, separators=_COMPACT)
    return room


def _hex_words(words: bytes) -> str:
    return "".join(f"{w:08x}" for w in struct.unpack(f"<{len(words) // 4}I", words))


def with_crc32s(header: bytes, crcs: Dict[str, int], blocks: Dict[str, bytes]) -> bytes:
    """``header`` (with room from crc32_room_for) with the entries' CRC-32s and their blocks' (``_crc.crc32_blocks``
    words) filled in: bytes of the same length, to be written over it. An entry with room for block CRC-32s but
    none of the right count given keeps CRC32_UNKNOWN there."""
    parsed = json.loads(header[8:])
    metadata = parsed[HEADER_METADATA_KEY]
    room = json.loads(metadata[CRC32_KEY])
    if set(room) != set(crcs):
        raise AssertionError(f"CRC-32s for {sorted(crcs)}, but the header has room for {sorted(room)}")
    metadata[CRC32_KEY] = json.dumps({key: f"{crcs[key]:08x}" for key in room}, separators=_COMPACT)
    if CRC32_BLOCKS_KEY in metadata:
        block_room = json.loads(metadata[CRC32_BLOCKS_KEY])
        for key, unknown in block_room["entries"].items():
            words = blocks.get(key)
            if words is not None and 2 * len(words) == len(unknown):
                block_room["entries"][key] = _hex_words(words)
        metadata[CRC32_BLOCKS_KEY] = json.dumps(block_room, separators=_COMPACT)
    text = json.dumps(parsed, separators=_COMPACT).encode("utf-8")
    if len(text) > len(header) - 8:
        raise AssertionError("a header with its CRC-32s filled in is longer than the header it replaces")
    return header[:8] + text + b" " * (len(header) - 8 - len(text))


def write_crc32s(stream: IO[bytes], crcs: Dict[str, int], blocks: Dict[str, bytes]) -> None:
    """Fill CRC-32s into the header (with room from crc32_room_for) at the start of ``stream``, a file opened for
    reading and writing: see with_crc32s."""
    stream.seek(0)
    head = stream.read(8)
    header = with_crc32s(head + stream.read(struct.unpack("<Q", head)[0]), crcs, blocks)
    stream.seek(0)
    stream.write(header)


def _json_object(header: Header, key: str, where: str) -> Optional[Dict[str, Any]]:
    text = header.metadata.get(key)
    if text is None:
        return None
    try:
        value = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise ValueError(f"{where}: safetensors header's {key} is not a JSON object of CRC-32s: {text!r}")
    return value


def _bad_crc(where: str, key: str, value: Any, entry: str, what: str) -> ValueError:
    return ValueError(f"{where}: safetensors header's {key} has {value!r} for {entry!r}, which is no {what}")


def recorded_crc32s(header: Header, where: str) -> Tuple[Dict[str, int], Dict[str, _checksum.Blocks]]:
    """The CRC-32 the header records for each of its entries, and the block CRC-32s of those it records them for
    (entries written before the file was finished, or by another writer, have none)."""
    crcs: Dict[str, int] = {}
    for key, value in (_json_object(header, CRC32_KEY, where) or {}).items():
        if value == CRC32_UNKNOWN:
            continue
        if key not in header.entries or not isinstance(value, str) or not _HEX8.fullmatch(value):
            raise _bad_crc(where, CRC32_KEY, value, key, "entry's CRC-32 (8 hex digits)")
        crcs[key] = int(value, 16)
    blocks: Dict[str, _checksum.Blocks] = {}
    recorded = _json_object(header, CRC32_BLOCKS_KEY, where)
    if recorded is None:
        return crcs, blocks
    block_bytes, entries = recorded.get("block_bytes"), recorded.get("entries")
    if not isinstance(block_bytes, int) or isinstance(block_bytes, bool) or block_bytes < 1 or not isinstance(
            entries, dict):
        raise ValueError(f"{where}: safetensors header's {CRC32_BLOCKS_KEY} has no positive block_bytes and "
                         f"entries object: {header.metadata[CRC32_BLOCKS_KEY][:200]!r}")
    for key, value in entries.items():
        entry = header.entries.get(key)
        count = -(-(entry.end - entry.begin) // block_bytes) if entry is not None else -1
        if not isinstance(value, str) or len(value) != 8 * count:
            raise _bad_crc(where, CRC32_BLOCKS_KEY, value[:40] if isinstance(value, str) else value, key,
                           f"list of the CRC-32s of its {block_bytes}-byte blocks (8 hex digits each)")
        if value == CRC32_UNKNOWN * count:
            continue
        words = [value[i : i + 8] for i in range(0, len(value), 8)]
        if not all(_HEX8.fullmatch(word) for word in words):
            raise _bad_crc(where, CRC32_BLOCKS_KEY, value[:40], key,
                           f"list of the CRC-32s of its {block_bytes}-byte blocks (8 hex digits each)")
        blocks[key] = _checksum.Blocks(block_bytes, 0, struct.pack(f"<{count}I", *(int(w, 16) for w in words)))
    return crcs, blocks

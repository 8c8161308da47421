"""The SAFETENSORS format: data files that are valid safetensors files.

This package writes one safetensors file per data file: the header (dtype,
shape and offsets of every entry, and DCP's sharding info in ``__metadata__``)
first, then every item's raw bytes back to back. A tensor is stored under its
fqn, or ``fqn@offsets`` where one file holds several chunks of it; a non-tensor
value as a uint8 entry of its bytes. An item's storage info points at its raw
bytes, inside the file's data section.

Stock torch 2.8+ writes the same kind of file, but an item's storage info
points at the file's header (offset 0), and the item is found by its fqn.
"""
from __future__ import annotations

import io
import json
import re
import struct
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch.distributed.checkpoint.planner import WriteItem

from . import _compat
from ._bytes import byte_count, chunk_nbytes, numel

SHARDING_INFO_KEY = "DCP_SHARDING_INFO"
DCP_VERSION_KEY = "DCP_VERSION"
DCP_VERSION_VALUE = "1.0"
FORMAT_KEY = "format"
FORMAT_VALUE = "pt"
BYTE_IO_KEY = "DCP_BYTE_IO"
# In ``__metadata__`` (whose values must be strings): a JSON object of entry key -> the CRC-32 of the entry's
# bytes as 8 hex digits, or CRC32_UNKNOWN where the file was not finished. Written where the writer can go
# back to the header once the entries' bytes are written (see with_crc32s).
CRC32_KEY = "DCP_CRC32"
CRC32_UNKNOWN = "--------"
_HEX8 = re.compile("[0-9a-f]{8}")
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
    with ``crc32_room``, with CRC32_UNKNOWN for each entry's CRC-32 (filled in by with_crc32s)."""
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
        metadata[CRC32_KEY] = crc32_room_for(key for key, *_ in entries)
    return _encode_header(entries, metadata), layout


def encode_header(entries: Sequence[Tuple[str, torch.dtype, Sequence[int]]], metadata: Dict[str, str]) -> bytes:
    """The 8-byte length and JSON header of a file holding whole tensors of these dtypes and shapes back to back."""
    return _encode_header([(key, dtype, shape, numel(shape) * dtype.itemsize) for key, dtype, shape in entries],
                          metadata)


def crc32_room_for(keys: Iterable[str]) -> str:
    """The CRC32_KEY value a header holds until its entries' CRC-32s are known: the same length as theirs."""
    return json.dumps({key: CRC32_UNKNOWN for key in keys}, separators=(",", ":"))


def with_crc32s(header: bytes, crcs: Dict[str, int]) -> bytes:
    """``header`` (from file_layout or encode_header, with room for CRC-32s) with these CRC-32s filled in:
    bytes of the same length, to be written over it."""
    parsed = json.loads(header[8:])
    room = json.loads(parsed[HEADER_METADATA_KEY][CRC32_KEY])
    if set(room) != set(crcs):
        raise AssertionError(f"CRC-32s for {sorted(crcs)}, but the header has room for {sorted(room)}")
    parsed[HEADER_METADATA_KEY][CRC32_KEY] = json.dumps(
        {key: f"{crcs[key] & 0xFFFFFFFF:08x}" for key in room}, separators=(",", ":")
    )
    text = json.dumps(parsed, separators=(",", ":")).encode("utf-8")
    if len(text) > len(header) - 8:
        raise AssertionError("a header with its CRC-32s filled in is longer than the header it replaces")
    return header[:8] + text + b" " * (len(header) - 8 - len(text))


def recorded_crc32s(header: Header, where: str) -> Dict[str, int]:
    """The CRC-32 the header records for each of its entries (those written before the file was finished, or
    by another writer, have none)."""
    text = header.metadata.get(CRC32_KEY)
    if text is None:
        return {}
    try:
        recorded = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        recorded = None
    if not isinstance(recorded, dict):
        raise ValueError(f"{where}: safetensors header's {CRC32_KEY} is not a JSON object of CRC-32s: {text!r}")
    crcs: Dict[str, int] = {}
    for key, value in recorded.items():
        if value == CRC32_UNKNOWN:
            continue
        if key not in header.entries or not isinstance(value, str) or not _HEX8.fullmatch(value):
            raise ValueError(f"{where}: safetensors header's {CRC32_KEY} has {value!r} for {key!r}, "
                             "which is no entry's CRC-32 (8 hex digits)")
        crcs[key] = int(value, 16)
    return crcs


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


def metadata_chunk(tensor: Any, index: Any) -> Any:
    """The chunk of a tensor's metadata (``TensorStorageMetadata``) that the item ``index`` (a MetadataIndex)
    stores; None where it has none at the item's offsets."""
    chunks = getattr(tensor, "chunks", None) or []
    hint = getattr(index, "index", None)
    chunk = chunks[hint] if hint is not None and 0 <= hint < len(chunks) else None
    if chunk is None or (index.offset is not None and chunk.offsets != index.offset):  # torch.Size both
        offset = None if index.offset is None else tuple(index.offset)
        chunk = next((c for c in chunks if offset is None or tuple(c.offsets) == offset), None)
    return chunk


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

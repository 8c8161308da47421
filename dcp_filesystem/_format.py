"""On-disk vocabulary shared by the writer and the reader."""
from __future__ import annotations

import json
import struct
import uuid
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from . import _compat

_metadata_fn: str = ".metadata"
DEFAULT_SUFFIX = ".distcp"
CURRENT_DCP_VERSION = "1.0.0"


def _generate_uuid() -> str:
    return str(uuid.uuid4())


if _compat.STORAGE_INFO_HAS_TRANSFORMS:
    _StorageInfo = _compat.TorchStorageInfo
else:

    @dataclass
    class _StorageInfo:  # type: ignore[no-redef]
        """This is the per entry storage info."""

        relative_path: str
        offset: int
        length: int
        transform_descriptors: Optional[Sequence[str]] = None

        def __getstate__(self) -> dict:
            return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class _StoragePrefix:
    prefix: str


if _compat.TorchSerializationFormat is not None:
    SerializationFormat = _compat.TorchSerializationFormat
else:

    class SerializationFormat(Enum):  # type: ignore[no-redef]
        TORCH_SAVE = "torch_save"
        SAFETENSORS = "safetensors"


def storage_info_for_disk(info: Any) -> Any:
    """Storage info as torch's own class, so a checkpoint never names this package."""
    if type(info) is not _StorageInfo or _StorageInfo is _compat.TorchStorageInfo:
        return info
    on_disk = _compat.TorchStorageInfo.__new__(_compat.TorchStorageInfo)
    # torch < 2.7 has no transform_descriptors field: it is kept only when set.
    on_disk.__dict__.update(info.__getstate__())
    return on_disk


def transform_descriptors_of(storage_info: Any) -> Sequence[str]:
    """Descriptors of a storage info; older torch pickled none."""
    return getattr(storage_info, "transform_descriptors", None) or ()


def metadata_file_name(rank: Optional[int] = None) -> str:
    return _metadata_fn if rank is None else f"__{rank}{_metadata_fn}"


# --- safetensors -----------------------------------------------------------

SHARDING_INFO_KEY = "DCP_SHARDING_INFO"
DCP_VERSION_KEY = "DCP_VERSION"
DCP_VERSION_VALUE = "1.0"
FORMAT_KEY = "format"
FORMAT_VALUE = "pt"
BYTE_IO_KEY = "DCP_BYTE_IO"
HEADER_METADATA_KEY = "__metadata__"
MAX_HEADER_BYTES = 100_000_000

SAFETENSORS_DTYPES: Dict[str, torch.dtype] = {
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
SAFETENSORS_NAMES: Dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}


class SafetensorsEntry(NamedTuple):
    dtype: torch.dtype
    shape: Tuple[int, ...]
    begin: int  # absolute file offset
    end: int


class SafetensorsHeader(NamedTuple):
    data_start: int  # absolute file offset of the data section
    entries: Dict[str, SafetensorsEntry]
    metadata: Dict[str, str]


def safetensors_dtype_name(dtype: torch.dtype, key: str) -> str:
    try:
        return SAFETENSORS_NAMES[dtype]
    except KeyError:
        raise ValueError(
            f"SAFETENSORS format cannot store {key!r}: dtype {dtype} has no safetensors name "
            f"(supported: {', '.join(str(d) for d in SAFETENSORS_NAMES)})"
        ) from None


def encode_header(
    entries: Sequence[Tuple[str, torch.dtype, Sequence[int], int]], metadata: Dict[str, str]
) -> bytes:
    """The 8-byte length and JSON header for ``entries`` laid out back to back in order."""
    header: Dict[str, Any] = {HEADER_METADATA_KEY: metadata}
    position = 0
    for key, dtype, shape, nbytes in entries:
        header[key] = {
            "dtype": safetensors_dtype_name(dtype, key),
            "shape": list(shape),
            "data_offsets": [position, position + nbytes],
        }
        position += nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(len(text) + 8) % 8)
    return struct.pack("<Q", len(text)) + text


def decode_header(
    read_at: Callable[[int, int], bytes], base: int, file_size: int, where: str
) -> SafetensorsHeader:
    """Parse and bounds-check a safetensors header that begins at ``base``.

    ``read_at(offset, n)`` returns up to n bytes at an absolute offset.
    """
    raw_len = read_at(base, 8)
    if len(raw_len) != 8:
        raise ValueError(f"{where}: safetensors header length is truncated")
    (header_len,) = struct.unpack("<Q", raw_len)
    if header_len > MAX_HEADER_BYTES or base + 8 + header_len > file_size:
        raise ValueError(
            f"{where}: safetensors header length {header_len} is larger than the file "
            f"({file_size} bytes) or the {MAX_HEADER_BYTES}-byte limit"
        )
    try:
        header = json.loads(read_at(base + 8, header_len))
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{where}: safetensors header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{where}: safetensors header is not a JSON object")
    data_start = base + 8 + header_len
    metadata = header.pop(HEADER_METADATA_KEY, None) or {}
    entries: Dict[str, SafetensorsEntry] = {}
    for key, info in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{where}: safetensors entry {key!r} is malformed: {info!r}") from None
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * torch._utils._element_size(dtype)
        if min(shape, default=0) < 0 or begin < 0 or end - begin != nbytes or data_start + end > file_size:
            raise ValueError(
                f"{where}: safetensors entry {key!r} has offsets {[begin, end]} that do not fit "
                f"shape {list(shape)} of {info['dtype']} in a {file_size}-byte file"
            )
        entries[key] = SafetensorsEntry(dtype, shape, data_start + begin, data_start + end)
    return SafetensorsHeader(data_start, entries, metadata if isinstance(metadata, dict) else {})


def chunk_key(fqn: str, offsets: Sequence[int]) -> str:
    """The safetensors key of one chunk of a tensor, where a data file holds several chunks of it."""
    return f"{fqn}@{','.join(str(o) for o in offsets)}"


def byte_io_keys(header: SafetensorsHeader) -> List[str]:
    return json.loads(header.metadata.get(BYTE_IO_KEY, "[]"))

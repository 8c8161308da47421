"""Read the one-tensor archives that torch.save writes, without torch.load's per-call overhead.

The archive is an uncompressed zip holding ``data.pkl`` (a pickle that calls
``torch._utils._rebuild_tensor_v2`` on a storage reference) and the storage
bytes. This module checks every member against the CRC-32 torch.save recorded
(torch.load does not), unpickles with an allow-list of exactly those globals and
views the storage bytes in place; an archive it does not recognise is passed
to ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import collections
import io
import pickle
import struct
import sys
import zlib
from typing import Any, Dict, NamedTuple, Tuple

import torch

ZIP_MAGIC = b"PK\x03\x04"
_END_OF_CENTRAL_DIR = struct.Struct("<IHHHHIIH")
_CENTRAL_DIR_ENTRY = struct.Struct("<IHHHHHHIIIHHHHHII")
_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
_STORAGE_DTYPES: Dict[str, torch.dtype] = {
    name: dtype for dtype, name in torch.storage._dtype_to_storage_type_map().items()
}


class _Unsupported(Exception):
    pass


class _StorageRef(NamedTuple):
    dtype: torch.dtype
    key: str
    numel: int


class _TensorSpec(NamedTuple):
    storage: _StorageRef
    storage_offset: int
    size: Tuple[int, ...]
    stride: Tuple[int, ...]


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, *_: Any) -> _TensorSpec:
    return _TensorSpec(storage, storage_offset, size, stride)


class _TensorUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise _Unsupported(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)):
            raise _Unsupported("storage reference")
        return _StorageRef(pid[1], str(pid[2]), int(pid[4]))


def _members(payload: bytearray) -> Dict[str, Tuple[int, int]]:
    """Zip member name -> (data offset, size), each checked against its CRC-32.

    torch.save writes plain stored zips; anything else in an archive that starts
    with the zip signature is damage, except zip64 (members over 4 GiB).
    """
    end = len(payload) - _END_OF_CENTRAL_DIR.size
    if end < 0:
        raise ValueError(f"torch.save archive is truncated ({len(payload)} bytes)")
    signature, _, _, _, count, _, directory, comment = _END_OF_CENTRAL_DIR.unpack_from(payload, end)
    if count == 0xFFFF or directory == 0xFFFFFFFF:
        raise _Unsupported("zip64 archive")
    if signature != 0x06054B50 or comment != 0:
        raise ValueError("torch.save archive has no valid end-of-central-directory record")
    members = {}
    position = directory
    for _ in range(count):
        if position + _CENTRAL_DIR_ENTRY.size > end:
            raise ValueError("torch.save archive's central directory runs past its end")
        fields = _CENTRAL_DIR_ENTRY.unpack_from(payload, position)
        crc, size, local = fields[7], fields[8], fields[16]
        name_len, extra_len, comment_len = fields[10], fields[11], fields[12]
        if size == 0xFFFFFFFF:
            raise _Unsupported("zip64 member")
        if fields[0] != 0x02014B50 or fields[4] != 0 or local + _LOCAL_HEADER.size > end:
            raise ValueError("torch.save archive has a damaged central directory entry")
        name = bytes(payload[position + 46 : position + 46 + name_len]).decode("utf-8", "replace")
        position += 46 + name_len + extra_len + comment_len
        header = _LOCAL_HEADER.unpack_from(payload, local)
        start = local + _LOCAL_HEADER.size + header[9] + header[10]
        if header[0] != 0x04034B50 or start + size > end:
            raise ValueError(f"torch.save archive member {name!r} has a damaged header")
        # A CRC of 0 means torch.save was told not to compute one (set_crc32_options).
        if crc and zlib.crc32(memoryview(payload)[start : start + size]) != crc:
            raise ValueError(f"archive member {name!r} fails its CRC-32 check (damaged data)")
        members[name] = (start, size)
    return members


def _decode(payload: bytearray, members: Dict[str, Tuple[int, int]]) -> torch.Tensor:
    pickles = [name for name in members if name.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise _Unsupported("not a single-pickle archive")
    prefix = pickles[0][: -len("data.pkl")]
    start, size = members.get(prefix + "byteorder", (0, 0))
    byteorder = bytes(payload[start : start + size]).decode() if size else "little"
    if byteorder != sys.byteorder:
        raise _Unsupported(f"{byteorder}-endian archive")
    start, size = members[pickles[0]]
    spec = _TensorUnpickler(io.BytesIO(payload[start : start + size])).load()
    if not isinstance(spec, _TensorSpec):
        raise _Unsupported("archive holds no tensor")
    storage = spec.storage
    start, size = members.get(f"{prefix}data/{storage.key}", (0, -1))
    if size != storage.numel * torch.empty((), dtype=storage.dtype).element_size():
        raise ValueError(f"storage record {storage.key!r} has {size} bytes, expected {storage.numel} elements")
    if storage.numel == 0:
        base = torch.empty(0, dtype=storage.dtype)
    else:
        base = torch.frombuffer(payload, dtype=storage.dtype, count=storage.numel, offset=start)
    return base.as_strided(spec.size, spec.stride, spec.storage_offset)


def load_tensor(payload: bytearray) -> torch.Tensor:
    """The tensor in a torch.save archive; it may share memory with ``payload``."""
    try:
        if payload[:4] != ZIP_MAGIC:
            raise _Unsupported("not a zip archive (legacy torch.save format)")
        return _decode(payload, _members(payload))
    except _Unsupported:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)

"""Write and read the one-tensor archives of torch.save, without its per-call overhead.

The archive is an uncompressed zip holding ``data.pkl`` (a pickle that calls
``torch._utils._rebuild_tensor_v2`` on a storage reference) and the storage
bytes. ``save_tensor`` writes the same bytes as the running torch's torch.save
(but for the random serialization id) in three writes, computing the storage's
CRC-32 while its bytes are written; a small archive is the one built for the
first archive of its data.pkl and storage size, storage and serialization id
filled in, in one write. ``load_tensor`` checks every member against
its CRC-32 (torch.load does not), unpickles with an allow-list of exactly those
globals and views the storage bytes in place; an archive it does not recognise
is passed to ``torch.load(weights_only=True)``. An archive of a layout seen
before (same dtype, shape and size) is checked byte for byte against it and
only its storage and serialization id CRC-checked, instead of parsed again.

Loads: ``read_item`` fills a target with the tensor of an item's archive. A
large archive's storage is read straight into the target: where its first bytes
place it, the storage first and then the records after it (which must confirm
that place); else both edges of the archive first, then the storage.
"""
from __future__ import annotations

import collections
import io
import pickle
import random
import struct
import sys
import threading
import zipfile
from typing import IO, Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import torch

from . import _checksum, _partial
from ._bytes import storage_bytes
from ._checksum import write_with_crc
from ._crc import crc32
from ._item import Item

ZIP_MAGIC = b"PK\x03\x04"
# Archives this large are read straight into their destination: their head, the storage, the rest
# (or, where the head does not place the storage, both edges first).
_IN_PLACE_ARCHIVE_BYTES = 1 << 20
_ARCHIVE_EDGE_BYTES = 16 << 10
_EDGE_RANGE = range(_ARCHIVE_EDGE_BYTES + 1)
# What a failed decode raises, besides _Unsupported (which falls back to torch.load).
DECODE_ERRORS = (ValueError, RuntimeError, pickle.UnpicklingError, EOFError)
_END_OF_CENTRAL_DIR = struct.Struct("<IHHHHIIH")
_CENTRAL_DIR_ENTRY = struct.Struct("<IHHHHHHIIIHHHHHII")
_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
_DATA_DESCRIPTOR = struct.Struct("<IIII")
_CRC = struct.Struct("<I")
_ZIP64_END = struct.Struct("<IQHHIIQQQQ")
_ZIP64_LOCATOR = struct.Struct("<IIQI")
_FLAGS = 0x0808  # CRC and sizes follow the data; UTF-8 names
_ZIP32_LIMIT = 0xFFFFFFFF
_ARCHIVE = "archive/"
_SERIALIZATION_ID = ".data/serialization_id"
_STORAGE_RECORD = "data/0"
# Records this large are written on their own, not copied into the pending bytes first.
_LARGE_RECORD_BYTES = 1 << 20
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


class _Member(NamedTuple):
    start: int
    size: int
    crc: int
    crc_fields: Tuple[int, ...]  # where copies of its CRC-32 lie: local header, data descriptor, central directory


_Read = Callable[[int, int], memoryview]


def _directory(read: _Read, archive_size: int) -> Dict[str, _Member]:
    """Zip member name -> where its data lies; ``read(offset, length)`` serves the archive's bytes.

    torch.save writes plain stored zips; anything else in an archive that starts
    with the zip signature is damage, except zip64 (members over 4 GiB).
    """
    end = archive_size - _END_OF_CENTRAL_DIR.size
    if end < 0:
        raise ValueError(f"torch.save archive is truncated ({archive_size} bytes)")
    signature, _, _, _, count, _, directory, comment = _END_OF_CENTRAL_DIR.unpack(read(end, _END_OF_CENTRAL_DIR.size))
    if count == 0xFFFF or directory == 0xFFFFFFFF:
        raise _Unsupported("zip64 archive")
    if signature != 0x06054B50 or comment != 0 or directory > end:
        raise ValueError("torch.save archive has no valid end-of-central-directory record")
    entries = bytes(read(directory, end - directory))  # the whole central directory, parsed in memory
    members = {}
    position = 0
    for _ in range(count):
        entry = directory + position
        if position + _CENTRAL_DIR_ENTRY.size > len(entries):
            raise ValueError("torch.save archive's central directory runs past its end")
        fields = _CENTRAL_DIR_ENTRY.unpack_from(entries, position)
        crc, size, local = fields[7], fields[8], fields[16]
        name_len, extra_len, comment_len = fields[10], fields[11], fields[12]
        if size == 0xFFFFFFFF:
            raise _Unsupported("zip64 member")
        if fields[0] != 0x02014B50 or fields[4] != 0 or local + _LOCAL_HEADER.size > end:
            raise ValueError("torch.save archive has a damaged central directory entry")
        name = entries[position + 46 : position + 46 + name_len].decode("utf-8", "replace")
        position += 46 + name_len + extra_len + comment_len
        header = _LOCAL_HEADER.unpack(read(local, _LOCAL_HEADER.size))
        start = local + _LOCAL_HEADER.size + header[9] + header[10]
        if header[0] != 0x04034B50 or start + size > end:
            raise ValueError(f"torch.save archive member {name!r} has a damaged header")
        has_descriptor = header[2] & 0x08
        crc_fields = (local + 14, start + size + 4, entry + 16) if has_descriptor else (local + 14, entry + 16)
        members[name] = _Member(start, size, crc, crc_fields)
    return members


def _check_crcs(read: _Read, members: Dict[str, _Member], skip: str = "") -> None:
    for name, member in members.items():
        # A CRC of 0 means torch.save was told not to compute one (set_crc32_options).
        if name != skip and member.crc and crc32(read(member.start, member.size)) != member.crc:
            raise ValueError(crc_error(name))


def crc_error(name: str) -> str:
    return f"archive member {name!r} fails its CRC-32 check (damaged data)"


def _reader(buffer: bytearray) -> _Read:
    view = memoryview(buffer)
    return lambda offset, length: view[offset : offset + length]


def archive_members(payload: bytearray) -> Optional[Dict[str, Tuple[int, int]]]:
    """Zip member name -> (data offset, size), each checked against its CRC-32; None for a zip64
    archive (over 4 GiB), which is not checked."""
    read = _reader(payload)
    try:
        members = _directory(read, len(payload))
    except _Unsupported:
        return None
    _check_crcs(read, members)
    return {name: (member.start, member.size) for name, member in members.items()}


_spec_cache: Dict[bytes, _TensorSpec] = {}
_SPEC_CACHE_SIZE = 4096


def _unpickle_spec(pickled: bytes) -> _TensorSpec:
    """The tensor a data.pkl describes; remembered, as the tensors of one model share a few shapes."""
    spec = _spec_cache.get(pickled)
    if spec is None:
        spec = _TensorUnpickler(io.BytesIO(pickled)).load()
        if not isinstance(spec, _TensorSpec):
            raise _Unsupported("archive holds no tensor")
        if len(_spec_cache) >= _SPEC_CACHE_SIZE:
            _spec_cache.clear()
        _spec_cache[pickled] = spec
    return spec


def _tensor_spec(read: _Read, members: Dict[str, _Member]) -> Tuple[_TensorSpec, str]:
    """The pickled tensor and the name of its storage member."""
    pickles = [name for name in members if name.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise _Unsupported("not a single-pickle archive")
    prefix = pickles[0][: -len("data.pkl")]
    byteorder = members.get(prefix + "byteorder")
    if byteorder is not None and bytes(read(byteorder.start, byteorder.size)).decode() != sys.byteorder:
        raise _Unsupported("archive of the other byte order")
    pickled = members[pickles[0]]
    spec = _unpickle_spec(bytes(read(pickled.start, pickled.size)))
    storage = spec.storage
    name = f"{prefix}data/{storage.key}"
    size = members[name].size if name in members else -1
    if size != storage.numel * storage.dtype.itemsize:
        raise ValueError(f"storage record {storage.key!r} has {size} bytes, expected {storage.numel} elements")
    return spec, name


class _Template(NamedTuple):
    """A decoded archive, against which a later archive of the same layout is checked byte for byte.

    Archives of tensors of one dtype and shape differ only in their storage's
    bytes, a random serialization id and those members' CRC-32s: a later
    archive whose every other byte matches has the same members, pickle and
    tensor, and needs only those two CRC-32s checked.
    """

    fixed: Tuple[Tuple[int, bytes], ...]  # (offset, bytes) it must match
    varying: Tuple[Tuple[str, int, int, int], ...]  # (name, data start, size, offset of its CRC-32)
    spec: _TensorSpec
    storage_start: int
    plain: Optional[PlainTensor]  # its tensor as a plain run of bytes, where it is one


_templates: Dict[int, _Template] = {}  # by archive size
_TEMPLATES = 256


def _make_template(payload: bytearray, members: Dict[str, _Member], spec: _TensorSpec, storage: str) -> _Template:
    varying, holes = [], []
    for name, member in members.items():
        if name == storage or name.endswith(_SERIALIZATION_ID):
            varying.append((name, member.start, member.size, member.crc_fields[-1]))
            holes.append((member.start, member.start + member.size))
            holes.extend((at, at + 4) for at in member.crc_fields)
    fixed, position = [], 0
    for begin, end in sorted(holes):
        if begin > position:
            fixed.append((position, bytes(payload[position:begin])))
        position = max(position, end)
    fixed.append((position, bytes(payload[position:])))
    member = members[storage]
    plain = _plain(spec, member.start, member.size, 0, storage)
    return _Template(tuple(fixed), tuple(varying), spec, member.start, plain)


def _matching_template(data: bytearray, base: int, size: int) -> Optional[_Template]:
    """The template of the ``size``-byte archive at ``data[base:]``, where it matches one (its varying
    members' CRC-32s checked), else None."""
    template = _templates.get(size)
    if template is None:
        return None
    for offset, expected in template.fixed:
        if not data.startswith(expected, base + offset):
            return None
    view = memoryview(data)
    for name, start, length, crc_at in template.varying:
        (crc,) = _CRC.unpack_from(data, base + crc_at)
        if crc and crc32(view[base + start : base + start + length]) != crc:
            raise ValueError(crc_error(name))
    return template


def plain_from_template(data: bytearray, base: int, size: int) -> Optional[PlainTensor]:
    """The tensor of the ``size``-byte archive at ``data[base:]`` as a plain run of bytes (``start`` relative
    to ``base``), where the archive is laid out like one decoded before and its tensor is plain; its members'
    CRC-32s are checked. None otherwise."""
    template = _matching_template(data, base, size)
    return None if template is None else template.plain


def load_tensor(payload: bytearray) -> torch.Tensor:
    """The tensor in a torch.save archive; it may share memory with ``payload``."""
    template = _matching_template(payload, 0, len(payload))
    if template is not None:
        spec, start = template.spec, template.storage_start
    else:
        read = _reader(payload)
        try:
            if payload[:4] != ZIP_MAGIC:
                raise _Unsupported("not a zip archive (legacy torch.save format)")
            members = _directory(read, len(payload))
            _check_crcs(read, members)
            spec, name = _tensor_spec(read, members)
        except _Unsupported:
            return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        if len(_templates) >= _TEMPLATES:
            _templates.clear()
        _templates[len(payload)] = _make_template(payload, members, spec, name)
        start = members[name].start
    storage = spec.storage
    if storage.numel == 0:
        base = torch.empty(0, dtype=storage.dtype)
    else:
        base = torch.frombuffer(payload, dtype=storage.dtype, count=storage.numel, offset=start)
    return base.as_strided(spec.size, spec.stride, spec.storage_offset)


class PlainTensor(NamedTuple):
    """A contiguous tensor stored as one run of bytes, readable straight into a destination."""

    dtype: torch.dtype
    size: Tuple[int, ...]
    start: int
    nbytes: int
    crc: int  # 0: none to check
    member: str  # its name in the archive


def plain_storage(head: memoryview, tail: memoryview, archive_size: int) -> Optional[PlainTensor]:
    """Where a contiguous tensor's bytes lie in an archive, from the archive's first and last bytes alone.

    Every other member is CRC-checked here; the caller checks the storage's CRC
    once it has read it. None when the head and tail do not hold the rest of the
    archive, or the tensor is not a contiguous run from the start of its storage.
    """
    tail_start = archive_size - len(tail)

    def read(offset: int, length: int) -> memoryview:
        if offset + length <= len(head):
            return head[offset : offset + length]
        if offset >= tail_start:
            return tail[offset - tail_start : offset - tail_start + length]
        raise _Unsupported("member outside the head and tail")

    try:
        if head[:4] != ZIP_MAGIC:
            return None
        members = _directory(read, archive_size)
        spec, name = _tensor_spec(read, members)
        _check_crcs(read, members, skip=name)
    except _Unsupported:
        return None
    member = members[name]
    return _plain(spec, member.start, member.size, member.crc, name)


def _plain(spec: _TensorSpec, start: int, nbytes: int, crc: int, name: str) -> Optional[PlainTensor]:
    """The tensor of ``spec`` as a plain run of bytes, where it is one: contiguous, from its storage's start."""
    numel, strides = 1, []
    for dim in reversed(spec.size):
        strides.insert(0, numel)
        numel *= dim
    if spec.storage_offset != 0 or numel != spec.storage.numel or tuple(spec.stride) != tuple(strides):
        return None
    return PlainTensor(spec.storage.dtype, tuple(spec.size), start, nbytes, crc, name)


def plain_storage_from_head(head: memoryview) -> Optional[PlainTensor]:
    """Where a contiguous tensor's bytes lie in an archive, as its first bytes say: its pickle (the first
    member) and the local header of its storage record. A guess, so that the storage can be read before
    the archive's end: ``plain_storage`` of the bytes before and after the storage confirms it (``crc`` is
    0 here: the storage's CRC-32 is in the records after it). None where the head says nothing clear."""
    data = bytes(head)
    try:
        fields = _LOCAL_HEADER.unpack_from(data, 0)
        name_end = _LOCAL_HEADER.size + fields[9]
        name = data[_LOCAL_HEADER.size : name_end].decode("utf-8")
        if data[:4] != ZIP_MAGIC or not name.endswith("/data.pkl"):
            return None
        spec = _TensorUnpickler(io.BytesIO(data[name_end + fields[10] :])).load()
    except Exception:  # noqa: BLE001 - whatever the first bytes hold, no guess; plain_storage decides instead
        return None
    if not isinstance(spec, _TensorSpec):
        return None
    record = (name[: -len("data.pkl")] + "data/" + spec.storage.key).encode()
    nbytes = spec.storage.numel * spec.storage.dtype.itemsize
    at = data.find(ZIP_MAGIC, name_end)
    while 0 <= at <= len(data) - _LOCAL_HEADER.size:
        fields = _LOCAL_HEADER.unpack_from(data, at)
        name_start = at + _LOCAL_HEADER.size
        if data[name_start : name_start + fields[9]] == record:
            return _plain(spec, name_start + fields[9] + fields[10], nbytes, 0, record.decode())
        at = data.find(ZIP_MAGIC, at + 4)
    return None


class _Layout(NamedTuple):
    """The records this torch's torch.save writes around a tensor's pickle and storage."""

    before_storage: Tuple[Tuple[str, bytes], ...]
    after_storage: Tuple[Tuple[str, bytes], ...]
    serialization_id: bool
    alignment: int
    crc: bool


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, torch.storage.TypedStorage):
            return ("storage", getattr(torch, obj._pickle_storage_type()), "0", "cpu", obj._size())
        if isinstance(obj, torch.UntypedStorage):  # dtypes without a legacy storage class (float8, uint16...)
            return ("storage", torch.UntypedStorage, "0", "cpu", obj.nbytes())
        return None


class _Archive:
    """Builds one archive; small records are gathered and written with the next large one."""

    def __init__(self, stream: IO[bytes], layout: _Layout) -> None:
        self.stream = stream
        self.layout = layout
        self.pending = bytearray()
        self.offset = 0
        self.directory: List[Tuple[bytes, int, int, int]] = []

    def add(self, name: str, data: memoryview) -> None:
        encoded = (_ARCHIVE + name).encode()
        start = self.offset + _LOCAL_HEADER.size + len(encoded) + 4
        padding = -start % self.layout.alignment
        header = _LOCAL_HEADER.pack(0x04034B50, 0, _FLAGS, 0, 0, 0, 0, 0, 0, len(encoded), padding + 4)
        self.pending += header + encoded + b"FB" + struct.pack("<H", padding) + b"Z" * padding
        size = len(data)
        if size >= _LARGE_RECORD_BYTES:
            crc = self._write_with_crc(data)
        else:
            crc = crc32(data) if self.layout.crc else 0
            self.pending += data
        self.pending += _DATA_DESCRIPTOR.pack(0x08074B50, crc, size, size)
        self.directory.append((encoded, crc, size, self.offset))
        self.offset = start + padding + size + _DATA_DESCRIPTOR.size

    def _write_with_crc(self, data: memoryview) -> int:
        self.stream.write(memoryview(self.pending))
        self.pending = bytearray()
        if not self.layout.crc:
            self.stream.write(data)
            return 0
        return write_with_crc(self.stream, data)

    def close(self) -> None:
        directory_offset = self.offset
        for encoded, crc, size, offset in self.directory:
            self.pending += _CENTRAL_DIR_ENTRY.pack(
                0x02014B50, 0, 0, _FLAGS, 0, 0, 0, crc, size, size, len(encoded), 0, 0, 0, 0, 0, offset
            )
            self.pending += encoded
        end = directory_offset + sum(_CENTRAL_DIR_ENTRY.size + len(e[0]) for e in self.directory)
        count, directory_size = len(self.directory), end - directory_offset
        self.pending += _ZIP64_END.pack(
            0x06064B50, _ZIP64_END.size - 12, 0x031E, 0x2D, 0, 0, count, count, directory_size, directory_offset
        )
        self.pending += _ZIP64_LOCATOR.pack(0x07064B50, 0, end, 1)
        self.pending += _END_OF_CENTRAL_DIR.pack(0x06054B50, 0, 0, count, count, directory_size, directory_offset, 0)
        self.stream.write(memoryview(self.pending))


def _add_records(archive: _Archive, layout: _Layout, pickled: memoryview, storage: memoryview, sid: bytes) -> None:
    archive.add("data.pkl", pickled)
    for name, data in layout.before_storage:
        archive.add(name, memoryview(data))
    archive.add(_STORAGE_RECORD, storage)
    for name, data in layout.after_storage:
        archive.add(name, memoryview(data))
    if layout.serialization_id:
        archive.add(_SERIALIZATION_ID, memoryview(sid))


class _WriteTemplate(NamedTuple):
    """A small archive's bytes with its storage and serialization id left as holes: each hole's
    [begin, end) and the places of its CRC-32 (its data descriptor's and its central directory entry's)."""

    data: bytes
    holes: Tuple[Tuple[int, int, Tuple[int, int]], ...]


_WRITE_TEMPLATES = 1024
_write_templates: Dict[Tuple[_Layout, bytes, int, int], _WriteTemplate] = {}


def _write_template(layout: _Layout, pickled: bytes, nbytes: int, sid_len: int) -> _WriteTemplate:
    """The archive ``_add_records`` writes for this data.pkl and storage size, holes marked (built once
    by the same code, with zeros in the holes)."""
    key = (layout, pickled, nbytes, sid_len)
    found = _write_templates.get(key)
    if found is not None:
        return found
    out = io.BytesIO()
    archive = _Archive(out, layout)
    _add_records(archive, layout, memoryview(pickled), memoryview(bytes(nbytes)), bytes(sid_len))
    directory_offset = archive.offset
    archive.close()
    ends = [offset - _DATA_DESCRIPTOR.size for _, _, _, offset in archive.directory[1:]]
    ends.append(directory_offset - _DATA_DESCRIPTOR.size)
    entry = directory_offset
    holes = []
    for (encoded, _, size, _), end in zip(archive.directory, ends):
        if encoded in (_HOLE_NAMES[0], _HOLE_NAMES[1]):
            holes.append((end - size, end, (end + 4, entry + 16)))  # the CRC fields of both structs
        entry += _CENTRAL_DIR_ENTRY.size + len(encoded)
    template = _WriteTemplate(out.getvalue(), tuple(holes))
    if len(_write_templates) >= _WRITE_TEMPLATES:
        _write_templates.clear()
    _write_templates[key] = template
    return template


_HOLE_NAMES = ((_ARCHIVE + _STORAGE_RECORD).encode(), (_ARCHIVE + _SERIALIZATION_ID).encode())


_PICKLES = 1024
_pickles: Dict[Tuple[Any, ...], bytes] = {}


def _pickled(tensor: torch.Tensor, storage_nbytes: int) -> bytes:
    """The tensor's data.pkl. A plain tensor's is made of the values in ``key`` alone, so it is pickled once
    per key (the Pickler takes ~17 us a tensor; checkpoints hold thousands of small ones); one with
    Python attributes or backward hooks (which torch.save warns about) is pickled every time."""
    key = None
    if not tensor.__dict__ and not tensor._backward_hooks:
        metadata = tuple(sorted(torch._utils.get_tensor_metadata(tensor).items()))  # the conj and neg bits
        key = (tensor.dtype, storage_nbytes, tensor.storage_offset(), tensor.shape, tensor.stride(),
               tensor.requires_grad, metadata)
        found = _pickles.get(key)
        if found is not None:
            return found
    out = io.BytesIO()
    _Pickler(out, protocol=2).dump(tensor)
    pickled = out.getvalue()
    if key is not None:
        if len(_pickles) >= _PICKLES:
            _pickles.clear()
        _pickles[key] = pickled
    return pickled


def _write_archive(tensor: torch.Tensor, stream: IO[bytes], layout: _Layout, serialization_id: bytes) -> None:
    storage = storage_bytes(tensor.untyped_storage())
    pickled = _pickled(tensor, len(storage))
    if len(storage) >= _LARGE_RECORD_BYTES:
        archive = _Archive(stream, layout)
        _add_records(archive, layout, memoryview(pickled), storage, serialization_id)
        archive.close()
        return
    # A small archive: the one built before for this data.pkl and size, its holes filled, in one write.
    template = _write_template(layout, pickled, len(storage), len(serialization_id))
    data = bytearray(template.data)
    for (begin, end, crc_places), filling in zip(template.holes, (storage, serialization_id)):
        data[begin:end] = filling
        if layout.crc:
            crc = crc32(filling)
            for place in crc_places:
                _CRC.pack_into(data, place, crc)
    stream.write(data)


def _probe_layout() -> Optional[_Layout]:
    """The records torch.save writes on this torch, checked by re-encoding a probe tensor byte for byte."""
    probe = torch.zeros(1)
    buffer = io.BytesIO()
    torch.save(probe, buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as archive:
        infos = archive.infolist()
        names = [info.filename[len(_ARCHIVE) :] for info in infos]
        if not all(info.filename.startswith(_ARCHIVE) for info in infos) or names[0] != "data.pkl":
            return None
        if _STORAGE_RECORD not in names:
            return None
        records = {name: archive.read(_ARCHIVE + name) for name in names}
    has_id = names[-1] == _SERIALIZATION_ID
    fixed = names[1 : -1 if has_id else None]
    split = fixed.index(_STORAGE_RECORD)
    layout = _Layout(
        before_storage=tuple((name, records[name]) for name in fixed[:split]),
        after_storage=tuple((name, records[name]) for name in fixed[split + 1 :]),
        serialization_id=has_id,
        alignment=int(records.get(".storage_alignment", b"64")),
        crc=infos[names.index(_STORAGE_RECORD)].CRC != 0,
    )
    ours = io.BytesIO()
    _write_archive(probe, ours, layout, records.get(_SERIALIZATION_ID, b""))
    return layout if ours.getvalue() == buffer.getvalue() else None


_layout_lock = threading.Lock()
_layout: List[Optional[_Layout]] = []


def _torch_save_layout() -> Optional[_Layout]:
    with _layout_lock:
        if not _layout:
            _layout.append(_probe_layout())
        return _layout[0]


def save_tensor(tensor: torch.Tensor, stream: IO[bytes]) -> None:
    """``torch.save(tensor, stream)`` for a CPU tensor, in the same bytes, faster.

    Falls back to torch.save for what it was not checked against: tensor
    subclasses, non-strided or quantized tensors, archives of 4 GiB or more, and
    a torch whose archive layout the probe did not reproduce exactly, and empty
    storages (whose records torch writes differently).
    """
    layout = _torch_save_layout()
    if (
        layout is None
        or type(tensor) is not torch.Tensor
        or tensor.layout != torch.strided
        or tensor.is_quantized
        or not 0 < tensor.untyped_storage().nbytes() < _ZIP32_LIMIT - (1 << 20)
    ):
        torch.save(tensor, stream)
        return
    _write_archive(tensor, stream, layout, b"%040d" % random.getrandbits(128))


def is_archive(head: Any) -> bool:
    """Whether bytes start a zip archive, as torch.save writes."""
    return bytes(head[:4]) == ZIP_MAGIC


def plain_in_memory(data_file: Any, item: Item, begin: int) -> Optional[Tuple[torch.dtype, Tuple[int, ...], int, int]]:
    """(dtype, size, start within the item, nbytes) of an item's archive that ``data_file.ahead_buffer`` holds
    from ``begin``, where it is laid out like one decoded before (``plain_from_template``); else None. A bare
    tuple: building a PlainTensor per item and reading its fields made this way 12-14 % slower for 2 000
    small items."""
    try:
        found = plain_from_template(data_file.ahead_buffer, begin, item.info.length)
    except ValueError as e:  # a member's CRC-32
        raise item.cannot_read(e) from e
    return None if found is None else (found.dtype, found.size, found.start, found.nbytes)


def read_item(data_file: Any, item: Item, target: torch.Tensor, payload: Optional[bytearray]) -> None:
    """Fill ``target`` with the part of the tensor in an item's archive that the item asks for: straight from
    the file where that can be done, else decoded in memory. ``payload``: the archive's bytes where they were
    read already (checked, stream transforms undone)."""
    if payload is None:
        if _read_in_place(data_file, item, target):
            return
        payload = data_file.read_checked(item)
    try:
        tensor = load_tensor(payload)
    except DECODE_ERRORS as e:
        raise item.cannot_read(e) from e
    item.fill(target, tensor)


def _read_in_place(data_file: Any, item: Item, target: torch.Tensor) -> bool:
    """Read a large archive's tensor, or the part of it the item asks for, straight into ``target``; False
    where that cannot be done (the archive is then decoded in memory)."""
    info = item.info
    if info.length < _IN_PLACE_ARCHIVE_BYTES or not data_file.local:
        return False
    whole = not any(item.req.storage_offsets)
    if whole and not data_file.takes(target):
        return False  # e.g. no pinned memory for that device: the decoded tensor is copied there
    found = _plain_run(data_file, item)
    if found is None:
        return False
    plain, before, after = found
    if not item.is_whole(plain.size):
        return _read_part(data_file, item, target, plain, before, after)
    if target.dtype != plain.dtype:  # whole: data_file.takes(target) was asked above
        return False
    item.check_size(target, plain.size)
    with_crc = item.checked or bool(plain.crc) or after is None
    crc = data_file.read_into(item, target, plain.start, plain.nbytes, with_crc)
    if after is None:
        confirmed = _archive_after(data_file, item, plain, before)
        if confirmed is None:
            return False  # the decoded archive is copied over what was read
        plain, after = confirmed
    if item.checked:
        item.check_around(before, crc, plain.nbytes, after)
    if plain.crc and crc != plain.crc:
        raise item.cannot_read(ValueError(crc_error(plain.member)))
    return True


def _read_part(
    data_file: Any, item: Item, target: torch.Tensor, plain: PlainTensor, before: memoryview,
    after: Optional[memoryview],
) -> bool:
    """Read the part of a large archive's tensor that the item asks for (``_partial``), once the archive's
    records confirm where its storage lies; False where the item must be read whole (it has an item CRC-32
    but no block CRC-32s, or partial reads are off)."""
    blocks = _checksum.blocks_of_run(item.info, plain.start - item.info.offset, plain.nbytes)
    if not _partial.enabled() or (blocks is None and item.checked):
        return False
    if after is None and _archive_after(data_file, item, plain, before) is None:
        return False
    _partial.read_part(data_file, item, target, plain.start, plain.size, plain.dtype, blocks)
    return True


def _plain_run(data_file: Any, item: Item) -> Optional[Tuple[PlainTensor, memoryview, Optional[memoryview]]]:
    """Where a large archive's tensor lies as a plain run of bytes (``start`` in the file), with the archive's
    bytes before and after that run; None where it does not. The bytes after are None where the archive's
    head alone placed its storage: they are read after it, front to back, and must confirm it."""
    info = item.info
    head = memoryview(data_file.read_exact(info.offset, _ARCHIVE_EDGE_BYTES, item))
    guess = plain_storage_from_head(head)
    if guess is not None and guess.start <= len(head) and info.length - guess.start - guess.nbytes in _EDGE_RANGE:
        return guess._replace(start=info.offset + guess.start), head[: guess.start], None
    # Else the edges first, then the middle: only where the file allows reading back.
    tail_offset = info.offset + info.length - _ARCHIVE_EDGE_BYTES
    tail = memoryview(data_file.read_exact(tail_offset, _ARCHIVE_EDGE_BYTES, item))
    plain = _archive_layout(item, head, tail)
    if plain is None:
        return None
    after = info.length - plain.start - plain.nbytes
    if plain.start > len(head) or after > len(tail):
        return None
    return plain._replace(start=info.offset + plain.start), head[: plain.start], tail[len(tail) - after :]


def _archive_layout(item: Item, head: memoryview, tail: memoryview) -> Optional[PlainTensor]:
    """``plain_storage`` of an archive's first and last bytes; None also where they are damaged and the
    item has a checksum: the whole item is then read and checked against it instead."""
    try:
        return plain_storage(head, tail, item.info.length)
    except DECODE_ERRORS as e:
        if item.checked:
            return None
        raise item.cannot_read(e) from e


def _archive_after(
    data_file: Any, item: Item, guess: PlainTensor, before: memoryview
) -> Optional[Tuple[PlainTensor, memoryview]]:
    """Read the bytes of an archive after its storage, which its head placed, and check that its directory
    puts the storage there too: (the storage as the directory describes it, those bytes), or None."""
    info = item.info
    end = guess.start + guess.nbytes
    after = memoryview(data_file.read_exact(end, info.offset + info.length - end, item))
    plain = _archive_layout(item, before, after)
    if plain is None or (info.offset + plain.start, plain.nbytes, plain.dtype, plain.size) != (
        guess.start, guess.nbytes, guess.dtype, guess.size
    ):
        return None
    return plain._replace(start=guess.start), after

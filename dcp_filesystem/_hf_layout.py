"""Hugging Face model directories: their file names, their index, and reading what they hold, checked.

A Hugging Face directory holds safetensors files keyed by fqn: ``model-00001-of-00003.safetensors`` ...
with ``model.safetensors.index.json`` (``metadata.total_size``, ``weight_map``: fqn -> file), or one
``model.safetensors``; a sharded save (``save_distributed``) holds ``shard-00001-model-00001-of-00001``
... files, one per rank, whose headers say where each chunk lies in its tensor (``DCP_SHARDING_INFO``),
and no index. :func:`scan` reads such a directory's headers into chunks (a tensor, or a chunk of one, in
one file), refusing anything a load could not trust: a file the index names outside the directory (or a
symlink out of it), a missing file, an index entry its file lacks, a chunk stored twice, chunks that do
not fill their tensor, and whatever :func:`_safetensors.read_header` refuses (entries outside the file
or overlapping).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from . import _checksum, _safetensors
from ._bytes import numel
from ._paths import check_storage_file
from .fs import FileSystemBase, PathLike, file_descriptor

INDEX_FILE_NAME = "model.safetensors.index.json"
SUFFIX = ".safetensors"
SHARDED_DIR_NAME = "sharded"
SAVED_OFFSETS_KEY = "saved_offsets"
_MAX_INDEX_BYTES = 100_000_000


def file_name(index: int, count: int, shard: Optional[int] = None) -> str:
    """``model-{index}-of-{count}.safetensors``, with ``shard-{shard}-`` before it for one rank's file of a
    sharded save; the numbers 5 digits wide, counted from 1."""
    name = f"model-{index:05d}-of-{count:05d}{SUFFIX}"
    return name if shard is None else f"shard-{shard:05d}-{name}"


def names(fqns: Sequence[str]) -> str:
    """The first few of ``fqns`` for a message, and how many more there are."""
    shown = ", ".join(repr(fqn) for fqn in fqns[:5])
    return shown + (f" and {len(fqns) - 5} more" if len(fqns) > 5 else "")


def index_bytes(weight_map: Dict[str, str], total_size: int) -> bytes:
    """The index file's bytes: the total bytes of the tensors, and the file of each (sorted by fqn)."""
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    return (json.dumps(index, indent=2) + "\n").encode("utf-8")


class Chunk(NamedTuple):
    """A tensor, or one chunk of it, as one entry of one safetensors file of the directory."""

    fqn: str
    offsets: Tuple[int, ...]  # where the chunk begins in its tensor
    entry: _safetensors.Entry
    file: str  # the file's name, relative to the directory
    crc32: Optional[int]  # the CRC-32 its header records for the entry's bytes, if any
    blocks: Optional[_checksum.Blocks]  # and for each block of them, if any


class Tensor(NamedTuple):
    dtype: torch.dtype
    size: Tuple[int, ...]
    chunks: List[Chunk]  # in the order the files were read


def _read_at(stream: Any, offset: int, length: int) -> bytes:
    stream.seek(offset)
    return stream.read(length)


def _offsets(sharding: Any, key: str, entry: _safetensors.Entry, where: str) -> Tuple[int, ...]:
    """Where the entry ``key`` begins in its tensor: its sharding info's saved offsets, else the origin."""
    info = sharding.get(key) if isinstance(sharding, dict) else None
    if info is None:
        return (0,) * len(entry.shape)
    offsets = info.get(SAVED_OFFSETS_KEY) if isinstance(info, dict) else None
    if (
        not isinstance(offsets, list)
        or len(offsets) != len(entry.shape)
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
    ):
        raise ValueError(
            f"{where}: {_safetensors.SHARDING_INFO_KEY} of entry {key!r} has saved offsets {offsets!r}, "
            f"not {len(entry.shape)} non-negative integers"
        )
    return tuple(offsets)


def _file_chunks(fs: FileSystemBase, directory: PathLike, name: str) -> List[Chunk]:
    path = fs.concat_path(directory, name)
    where = str(path)
    try:
        with fs.create_stream(path, "rb") as stream:
            fd = file_descriptor(stream) if fs.local_path(path) is not None else None
            size = os.fstat(fd).st_size if fd is not None else None
            header = _safetensors.read_header(lambda offset, n: _read_at(stream, offset, n), 0, size, where)
    except FileNotFoundError:
        raise FileNotFoundError(f"{where}: no such file in the Hugging Face checkpoint {directory}") from None
    if header is None:
        raise ValueError(f"{where}: not a safetensors file (it does not start with a safetensors header)")
    try:
        sharding = json.loads(header.metadata.get(_safetensors.SHARDING_INFO_KEY, "{}"))
    except (TypeError, ValueError):
        sharding = None
    if not isinstance(sharding, dict):
        raise ValueError(f"{where}: safetensors header's {_safetensors.SHARDING_INFO_KEY} is not a JSON object")
    crcs, blocks = _safetensors.recorded_crc32s(header, where)
    return [
        Chunk(key, _offsets(sharding, key, entry, where), entry, name, crcs.get(key), blocks.get(key))
        for key, entry in header.entries.items()
    ]


def _read_index(fs: FileSystemBase, directory: PathLike, local: Optional[str]) -> Optional[Dict[str, str]]:
    """The index's weight_map, its file names checked; None where the directory has no index."""
    path = fs.concat_path(directory, INDEX_FILE_NAME)
    if not fs.exists(path):
        return None
    with fs.create_stream(path, "rb") as stream:
        data = stream.read(_MAX_INDEX_BYTES + 1)
    if len(data) > _MAX_INDEX_BYTES:
        raise ValueError(f"{path}: index file is larger than the {_MAX_INDEX_BYTES}-byte limit")
    try:
        index = json.loads(data)
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: index file is not valid JSON: {e}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{path}: index file has no weight_map object (fqn -> file name)")
    first_named_by: Dict[Any, str] = {}
    for fqn, name in weight_map.items():
        if isinstance(name, str):
            first_named_by.setdefault(name, fqn)
        else:
            check_storage_file(name, directory, local, f"{path}: weight_map entry {fqn!r}")
    for name, fqn in first_named_by.items():  # each file once: a model names a few files thousands of times
        check_storage_file(name, directory, local, f"{path}: weight_map entry {fqn!r}")
    return weight_map


def _listed_files(fs: FileSystemBase, directory: PathLike, local: Optional[str]) -> List[str]:
    entries = fs.ls(directory)
    if entries is None:  # an object store that cannot list: the single-file layout
        return [f"model{SUFFIX}"]
    names = sorted(os.path.basename(str(entry)) for entry in entries)
    names = [name for name in names if name.endswith(SUFFIX)]
    for name in names:
        check_storage_file(name, directory, local, f"{directory}: directory entry")
    return names


def _no_checkpoint(fs: FileSystemBase, directory: PathLike, local: Optional[str]) -> Optional[OSError]:
    if local is not None and not os.path.isdir(local):
        return FileNotFoundError(f"{directory}: no such Hugging Face checkpoint directory")
    return None


def scan(fs: FileSystemBase, directory: PathLike) -> Tuple[Dict[str, Tensor], List[str]]:
    """Every tensor of the Hugging Face directory (fqn -> dtype, size, chunks) and the files holding them: the
    files its index names, else every ``*.safetensors`` file in it."""
    local = fs.local_path(directory)
    missing = _no_checkpoint(fs, directory, local)
    if missing is not None:
        raise missing
    weight_map = _read_index(fs, directory, local)
    if weight_map is not None:
        files = list(dict.fromkeys(weight_map.values()))
    else:
        files = _listed_files(fs, directory, local)
        if not files:
            raise FileNotFoundError(
                f"{directory}: no Hugging Face checkpoint in this directory (no {INDEX_FILE_NAME}, no *{SUFFIX} file)"
            )
    tensors: Dict[str, Tensor] = {}
    stored_in: Dict[Tuple[str, Tuple[int, ...]], str] = {}
    for name in files:
        chunks = _file_chunks(fs, directory, name)
        if weight_map is not None:
            keys = {chunk.fqn for chunk in chunks}
            for fqn, mapped in weight_map.items():
                if mapped == name and fqn not in keys:
                    raise ValueError(
                        f"{fs.concat_path(directory, INDEX_FILE_NAME)}: weight_map names tensor {fqn!r} in "
                        f"{fs.concat_path(directory, name)}, whose safetensors header has no such entry"
                    )
        for chunk in chunks:
            other = stored_in.setdefault((chunk.fqn, chunk.offsets), name)
            if other != name:
                at = f" (chunk at {list(chunk.offsets)})" if any(chunk.offsets) else ""
                raise ValueError(
                    f"{directory}: tensor {chunk.fqn!r}{at} is stored twice: in {other} and in {name}"
                )
            _add_chunk(tensors, chunk, directory)
    for fqn, tensor in tensors.items():
        _check_filled(fqn, tensor, directory)
    return tensors, files


def _add_chunk(tensors: Dict[str, Tensor], chunk: Chunk, directory: PathLike) -> None:
    end = tuple(o + s for o, s in zip(chunk.offsets, chunk.entry.shape))
    tensor = tensors.get(chunk.fqn)
    if tensor is None:
        tensors[chunk.fqn] = Tensor(chunk.entry.dtype, end, [chunk])
        return
    first = tensor.chunks[0]
    if chunk.entry.dtype != tensor.dtype or len(end) != len(tensor.size):
        raise ValueError(
            f"{directory}: tensor {chunk.fqn!r} is {tensor.dtype} of {len(tensor.size)} dimensions in {first.file} "
            f"but {chunk.entry.dtype} of {len(end)} dimensions in {chunk.file}"
        )
    tensor.chunks.append(chunk)
    tensors[chunk.fqn] = tensor._replace(size=tuple(max(a, b) for a, b in zip(tensor.size, end)))


def _check_filled(fqn: str, tensor: Tensor, directory: PathLike) -> None:
    """Chunks at distinct offsets (checked by the caller) whose elements add up to their tensor's fill it,
    unless two of them overlap: a load would leave the rest of its target as it was. Both are refused."""
    stored = sum(numel(chunk.entry.shape) for chunk in tensor.chunks)
    if stored == numel(tensor.size) and (len(tensor.chunks) == 1 or not _any_overlap(tensor.chunks)):
        return
    files = sorted({chunk.file for chunk in tensor.chunks})
    raise ValueError(
        f"{directory}: the {len(tensor.chunks)} chunk(s) of tensor {fqn!r} in {', '.join(files)} do not fill its "
        f"size {list(tensor.size)} exactly ({stored} of {numel(tensor.size)} elements, or overlapping): "
        "a shard file missing or damaged?"
    )


def _any_overlap(chunks: List[Chunk]) -> bool:
    """Whether two chunks share an element: sorted by their first offset, a chunk can only overlap chunks
    that begin before it ends along dimension 0."""
    chunks = [c for c in chunks if numel(c.entry.shape)]  # an empty chunk holds no element
    if chunks and not chunks[0].offsets:
        return len(chunks) > 1
    boxes = sorted((c.offsets, tuple(o + s for o, s in zip(c.offsets, c.entry.shape))) for c in chunks)
    for i, (begin, end) in enumerate(boxes):
        for other_begin, other_end in boxes[i + 1 :]:
            if other_begin[0] >= end[0]:
                break
            if all(b < oe and ob < e for b, e, ob, oe in zip(begin, end, other_begin, other_end)):
                return True
    return False

"""``export-hf``: any DCP checkpoint (this package's or stock torch's, either format, any world size) into a
Hugging Face directory, ``model-0000i-of-0000N.safetensors`` files of whole tensors and their index.

The checkpoint is read through :class:`FileSystemReader`, a batch of tensors (or rows of one large tensor)
at a time, straight into the buffers that are then written out (see ``_hf_consolidate``): memory stays near
one batch, and every byte is the checkpoint's own, checked against its checksums where it has them.
Non-tensor values have no place in a Hugging Face checkpoint: they are refused by name, or left out where
the caller says so.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from . import _safetensors
from ._bytes import numel
from ._hf_consolidate import OutputTensor, Region, write_files
from ._hf_layout import INDEX_FILE_NAME, SUFFIX, file_name, names
from .reader import FileSystemReader

DEFAULT_MAX_SHARD_SIZE = 5_000_000_000  # "5GB", as Hugging Face's save_pretrained


class Exported(NamedTuple):
    tensors: int
    nbytes: int
    files: List[str]
    skipped: List[str]  # the non-tensor values left out


def _narrow(tensor: torch.Tensor, offsets: Sequence[int], lengths: Sequence[int]) -> torch.Tensor:
    for dim, (offset, length) in enumerate(zip(offsets, lengths)):
        tensor = tensor.narrow(dim, offset, length)
    return tensor


class _RegionPlanner:
    """What FileSystemReader.read_data asks of a load planner, for reads into the regions of a batch."""

    def __init__(self, targets: Dict[Tuple[str, Tuple[int, ...]], torch.Tensor]) -> None:
        self.targets = targets

    def resolve_tensor(self, req: ReadItem) -> torch.Tensor:
        target = self.targets[(req.dest_index.fqn, tuple(req.dest_index.offset))]
        return _narrow(target, req.dest_offsets, req.lengths)

    def commit_tensor(self, req: ReadItem, tensor: torch.Tensor) -> None:
        pass

    def load_bytes(self, req: ReadItem, value: Any) -> None:
        raise AssertionError(f"export-hf reads tensors only, not {req.storage_index.fqn!r}")


class _CheckpointSource:
    """Fills a batch of regions from a DCP checkpoint, with one read_data call."""

    def __init__(self, reader: FileSystemReader, metadata: Metadata) -> None:
        self.reader = reader
        self.metadata = metadata

    def __call__(self, batch: List[Region]) -> None:
        items: List[ReadItem] = []
        targets: Dict[Tuple[str, Tuple[int, ...]], torch.Tensor] = {}
        for region in batch:
            tensor = self.metadata.state_dict_metadata[region.fqn]
            size = tuple(tensor.size)
            offsets = (region.begin,) + (0,) * (len(size) - 1) if size else ()
            sizes = (region.end - region.begin, *size[1:]) if size else ()
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
            items += create_read_items_for_chunk_list(region.fqn, tensor, [chunk])
            targets[(region.fqn, offsets)] = region.out
        if items:
            self.reader.read_data(LoadPlan(items), _RegionPlanner(targets)).wait()  # type: ignore[arg-type]


def _file_plan(tensors: List[OutputTensor], max_shard_size: int) -> Dict[str, List[OutputTensor]]:
    """Tensors into files in checkpoint order, a new file where the next tensor would take one past
    ``max_shard_size`` (a larger tensor gets a file of its own); in each file the widest dtypes first, so that
    every tensor's bytes start aligned to its element size."""
    groups: List[List[OutputTensor]] = [[]]
    held = 0
    for tensor in tensors:
        nbytes = numel(tensor.size) * tensor.dtype.itemsize
        if groups[-1] and held + nbytes > max_shard_size:
            groups.append([])
            held = 0
        groups[-1].append(tensor)
        held += nbytes
    return {
        file_name(i, len(groups)): sorted(group, key=lambda t: -t.dtype.itemsize)
        for i, group in enumerate(groups, start=1)
    }


def _check_out_dir(out: str) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise NotADirectoryError(f"{out}: exists and is not a directory")
    if os.path.isdir(out):
        taken = sorted(n for n in os.listdir(out) if n == INDEX_FILE_NAME or n.endswith(SUFFIX))
        if taken:
            raise FileExistsError(
                f"{out}: already holds a Hugging Face checkpoint ({', '.join(taken[:3])}"
                f"{', ...' if len(taken) > 3 else ''}): remove it or export into another directory"
            )


def export_hf(
    checkpoint: str,
    out: str,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    skip_non_tensors: bool = False,
    sync: bool = True,
    progress: Optional[Callable[[int, int], None]] = None,
) -> Exported:
    """Export the DCP checkpoint in ``checkpoint`` into the Hugging Face directory ``out``; ``progress(done,
    total)`` in bytes after each batch."""
    reader = FileSystemReader(checkpoint)
    metadata = reader.read_metadata()
    reader.set_up_storage_reader(metadata, True)
    tensors: List[OutputTensor] = []
    values: List[str] = []
    for fqn, item in metadata.state_dict_metadata.items():
        if isinstance(item, TensorStorageMetadata):
            _safetensors.dtype_name(item.properties.dtype, fqn)
            tensors.append(OutputTensor(fqn, item.properties.dtype, tuple(item.size)))
        else:
            values.append(fqn)
    if values and not skip_non_tensors:
        raise ValueError(
            f"{checkpoint}: {names(values)} {'is a non-tensor value' if len(values) == 1 else 'are non-tensor values'}"
            ", which a Hugging Face checkpoint cannot hold: pass --skip-non-tensors to export the tensors without them"
        )
    if max_shard_size < 1:
        raise ValueError(f"max_shard_size must be positive, got {max_shard_size}")
    _check_out_dir(out)
    files = _file_plan(tensors, max_shard_size)
    total = sum(numel(t.size) * t.dtype.itemsize for t in tensors)
    done = [0]

    def step(name: str, nbytes: int) -> None:
        done[0] += nbytes
        if progress is not None:
            progress(done[0], total)

    os.makedirs(out, exist_ok=True)
    source = _CheckpointSource(reader, metadata)
    metadata_keys = {_safetensors.FORMAT_KEY: _safetensors.FORMAT_VALUE}
    write_files(out, files, lambda: contextlib.nullcontext(source), metadata_keys, sync, progress=step)
    return Exported(len(tensors), total, list(files), values)

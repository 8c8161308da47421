"""Items read whole, then decoded: stream-transformed payloads and non-tensor values, never past their bound.

A stream-transformed item's stored bytes are its transformed torch.save archive
(or value); its transforms are undone into at most the bytes the item may hold:
its chunk's tensor bytes and ``ARCHIVE_RECORDS_BYTES`` for a tensor,
``MAX_VALUE_BYTES`` for a non-tensor value.
"""
from __future__ import annotations

import io

import torch
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlanner

from . import _torch_save
from ._bytes import numel
from ._data_file import DataFile
from ._format import metadata_chunk, transform_descriptors_of
from ._item import Item
from .transforms import ARCHIVE_RECORDS_BYTES, MAX_VALUE_BYTES, _StorageReaderTransforms, read_at_most


def untransformed(transforms: _StorageReaderTransforms, item: Item, payload: bytearray) -> bytearray:
    """An item's stored bytes with its stream transforms undone, no more than the item may hold."""
    descriptors = transform_descriptors_of(item.info)
    if not descriptors:
        return payload
    limit, why = MAX_VALUE_BYTES, "a non-tensor value"
    req, tensor = item.req, item.tensor
    chunk = None if req.type == LoadItemType.BYTE_IO else metadata_chunk(tensor, req.storage_index)
    if chunk is not None:
        nbytes = numel(chunk.sizes) * tensor.properties.dtype.itemsize
        limit, why = nbytes + ARCHIVE_RECORDS_BYTES, f"a {nbytes}-byte tensor and its archive's records"
    decoded = read_at_most(transforms.transform_load_stream(req, descriptors, io.BytesIO(payload)), limit)
    if decoded is None:
        raise ValueError(  # the caller names the file and the item
            f"its {item.info.length} stored bytes decode to more than {limit} bytes, the most {why} may take "
            "(damaged or hostile checkpoint): decoding stopped there"
        )
    return decoded


def read_tensor(data_file: DataFile, item: Item, target: torch.Tensor, transforms: _StorageReaderTransforms) -> None:
    """Fill ``target`` from a stream-transformed tensor item (a transformed torch.save archive)."""
    payload = data_file.read_checked(item)
    try:
        archive = untransformed(transforms, item, payload)
    except _torch_save.DECODE_ERRORS as e:
        raise item.cannot_read(e) from e
    _torch_save.read_item(data_file, item, target, archive)


def load_bytes(data_file: DataFile, item: Item, planner: LoadPlanner, transforms: _StorageReaderTransforms) -> None:
    """Hand a non-tensor value's bytes (transforms undone) to the planner."""
    payload = data_file.read_checked(item)
    try:
        planner.load_bytes(item.req, io.BytesIO(untransformed(transforms, item, payload)))
    except _torch_save.DECODE_ERRORS as e:
        raise item.cannot_read(e) from e

"""One planned item of a load, as every codec sees it: what to read, where it lies, how errors name it."""
from __future__ import annotations

from typing import Any, Tuple

import torch
from torch.distributed.checkpoint.planner import ReadItem

from . import _checksum
from ._crc import crc32, crc32_combine
from ._format import describe_item


class Item:
    """A read item (``req``), its storage info (``info``), its tensor's metadata (``tensor``: the checkpoint's
    ``TensorStorageMetadata``, None for a non-tensor value) and the name of the data file that holds it."""

    __slots__ = ("req", "info", "tensor", "file")

    def __init__(self, req: ReadItem, info: Any, tensor: Any, file: str) -> None:
        self.req = req
        self.info = info
        self.tensor = tensor
        self.file = file

    def describe(self) -> str:
        return describe_item(self.req.storage_index)

    def error(self, problem: str) -> ValueError:
        """``problem`` follows the item's name: it starts with a space or a colon."""
        return ValueError(f"{self.file}: item {self.describe()}{problem}")

    def cannot_read(self, cause: BaseException) -> ValueError:
        return ValueError(f"{self.file}: cannot read item {self.describe()}: {cause}")

    @property
    def checked(self) -> bool:
        """Whether the metadata holds a CRC-32 of the item's stored bytes."""
        return _checksum.stored_crc32(self.info) is not None

    def check(self, crc: int) -> None:
        """Raise if ``crc`` is not the CRC-32 recorded for the item's stored bytes (where one is)."""
        _checksum.check(self.file, self.req.storage_index, self.info, crc)

    def check_around(self, before: memoryview, crc: int, nbytes: int, after: memoryview) -> None:
        """``check`` for stored bytes read in three parts: ``before``, ``nbytes`` bytes of CRC-32 ``crc``,
        ``after``."""
        if before or after:
            crc = crc32_combine(crc32_combine(crc32(before), crc, nbytes), crc32(after), len(after))
        self.check(crc)

    def is_whole(self, shape: Tuple[int, ...]) -> bool:
        """Whether the load wants all of a stored tensor of ``shape``."""
        return not any(self.req.storage_offsets) and tuple(self.req.lengths) == tuple(shape)

    def check_size(self, target: torch.Tensor, size: Any) -> None:
        if target.size() != size:
            raise self.error(f" has size {list(size)} but the load plan expects {list(target.size())}")

    def fill(self, target: torch.Tensor, tensor: torch.Tensor) -> None:
        """Copy the part of a decoded stored ``tensor`` this item asks for into ``target``."""
        for dim, (offset, length) in enumerate(zip(self.req.storage_offsets, self.req.lengths)):
            if offset != 0 or length != tensor.size(dim):
                tensor = tensor.narrow(dim, offset, length)
        self.check_size(target, tensor.size())
        target.copy_(tensor)

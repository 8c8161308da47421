"""On-disk vocabulary shared by the writer, the reader and the command line: names, storage info, formats."""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from enum import Enum
from typing import Any, Optional, Sequence

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


def describe_item(index: Any) -> str:
    """How error messages name an item (a MetadataIndex): its key, and its chunk's offsets where it has them."""
    return f"{index.fqn!r}" if index.offset is None else f"{index.fqn!r} (chunk at {list(index.offset)})"


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


def metadata_file_name(rank: Optional[int] = None) -> str:
    return _metadata_fn if rank is None else f"__{rank}{_metadata_fn}"


class Stored(Enum):
    """How one item's bytes are stored in its data file."""

    TORCH_SAVE = "torch_save"  # a torch.save archive (the only thing stream transforms are applied to)
    SAFETENSORS = "safetensors"  # an entry's raw bytes in this package's safetensors file
    STOCK_SAFETENSORS = "stock safetensors"  # stock torch 2.8+: found by fqn in the header the item points at

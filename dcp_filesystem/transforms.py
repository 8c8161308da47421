"""Stream transforms (compression and the like) applied to each item's bytes.

Where the running torch has ``torch.distributed.checkpoint._extension`` (2.7+),
its classes are used, so extensions written against upstream work unchanged;
older torch gets a carried copy with the same descriptor strings.
"""
from __future__ import annotations

import abc
import importlib
import importlib.util
import io
from typing import IO, Any, Dict, List, Optional, Sequence, Tuple, Type

from . import _compat

if _compat.torch_extension is not None:
    Extension = _compat.torch_extension.Extension
    StreamTransformExtension = _compat.torch_extension.StreamTransformExtension
    ZStandard = _compat.torch_extension.ZStandard
    ExtensionRegistry = _compat.torch_extension.ExtensionRegistry
else:

    def _zstandard() -> Any:
        try:
            return importlib.import_module("zstandard")
        except ImportError:
            raise ValueError(
                "ZStandard extension is unavailable because no module named 'zstandard': "
                "pip install zstandard"
            ) from None

    class Extension(abc.ABC):  # type: ignore[no-redef]
        @staticmethod
        @abc.abstractmethod
        def registry_name() -> str: ...

        @staticmethod
        @abc.abstractmethod
        def from_descriptor(version: str) -> Extension: ...

        @abc.abstractmethod
        def get_descriptor(self) -> str:
            """``extension_name[@local-domain][/version]``, recorded in the metadata."""

    class StreamTransformExtension(Extension):  # type: ignore[no-redef]
        @abc.abstractmethod
        def transform_to(self, output: IO[bytes]) -> IO[bytes]: ...

        @abc.abstractmethod
        def transform_from(self, input: IO[bytes]) -> IO[bytes]: ...

    class ZStandard(StreamTransformExtension):  # type: ignore[no-redef]
        @staticmethod
        def is_available() -> bool:
            return importlib.util.find_spec("zstandard") is not None

        @staticmethod
        def from_descriptor(version: str) -> ZStandard:
            if version.partition(".")[0] != "1":
                raise ValueError(f"Unknown extension version={version!r}")
            return ZStandard()

        @staticmethod
        def registry_name() -> str:
            return "stream.zstd"

        def __init__(self) -> None:
            super().__init__()
            _zstandard()

        def get_descriptor(self) -> str:
            return f"{self.registry_name()}/1"

        def transform_to(self, output: IO[bytes]) -> IO[bytes]:
            return _zstandard().ZstdCompressor().stream_writer(output)

        def transform_from(self, input: IO[bytes]) -> IO[bytes]:
            return _zstandard().ZstdDecompressor().stream_reader(input)

    class ExtensionRegistry:  # type: ignore[no-redef]
        def __init__(self) -> None:
            self.extensions: Dict[str, Type[Extension]] = {ZStandard.registry_name(): ZStandard}

        def register(self, cls: Type[Extension]) -> None:
            self.extensions[cls.registry_name()] = cls

        def from_descriptor_list(self, descriptors: Sequence[str]) -> Sequence[Extension]:
            found = []
            for desc in descriptors:
                name, _, version = desc.partition("/")
                ext = self.extensions.get(name)
                if ext is None:
                    raise ValueError(f"Unknown extension name={name!r}")
                found.append(ext.from_descriptor(version))
            return found


# Undoing a transform never makes more bytes than an item may hold: a tensor's torch.save archive is its
# storage (as the metadata sizes it) and records around it of a few kilobytes; a non-tensor value is a
# pickle, and none that a checkpoint holds (steps, RNG and data-loader states, configs) comes near a GiB.
# Past these, the stored bytes are a decompression bomb or damage, and decoding stops.
ARCHIVE_RECORDS_BYTES = 1 << 20
MAX_VALUE_BYTES = 1 << 30
_FIRST_READ_BYTES = 1 << 20


def read_at_most(stream: IO[bytes], limit: int) -> Optional[bytearray]:
    """All of ``stream``, or None as soon as it holds more than ``limit`` bytes: while reading, never more
    than ``limit`` + 1 of them, nor asking for more than it has read so far (the parts, then one copy)."""
    parts: List[bytes] = []
    total = 0
    while total <= limit:
        part = stream.read(min(limit + 1 - total, max(total, _FIRST_READ_BYTES)))
        if not part:
            out = bytearray(total)
            position = 0
            for part in parts:
                out[position : position + len(part)] = part
                position += len(part)
            return out
        parts.append(part)
        total += len(part)
    return None


class _NoCloseWriter(io.RawIOBase):
    """Lets a transform's close() cascade without closing the shared file underneath."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        return self.raw.write(b)

    def close(self) -> None:
        # The file underneath is closed first where a save failed mid-item (this writer is then
        # closed only when collected): there is nothing left to flush.
        if not self.closed and not getattr(self.raw, "closed", False):
            self.raw.flush()
        super().close()


class _StorageWriterTransforms:
    """The extensions applied to each item written (EXPERIMENTAL upstream)."""

    def __init__(self, extensions: Optional[Sequence[StreamTransformExtension]] = None) -> None:
        self.extensions = () if extensions is None else extensions

    def transform_save_stream(self, write_item: Any, raw_stream: IO[bytes]) -> Tuple[IO[bytes], List[str]]:
        transform_to: IO[bytes] = _NoCloseWriter(raw_stream)  # type: ignore[assignment]
        for ex in self.extensions:
            transform_to = ex.transform_to(transform_to)
        return transform_to, [ex.get_descriptor() for ex in reversed(self.extensions)]


class _StorageReaderTransforms:
    """Undoes the extensions named in an item's descriptors (EXPERIMENTAL upstream)."""

    def __init__(self, extension_registry: Optional[ExtensionRegistry] = None) -> None:
        self.extension_registry = ExtensionRegistry() if extension_registry is None else extension_registry

    def transform_load_stream(
        self, read_item: Any, transform_descriptors: Sequence[str], raw_stream: IO[bytes]
    ) -> IO[bytes]:
        transform_from = raw_stream
        for ex in self.extension_registry.from_descriptor_list(transform_descriptors):
            if isinstance(ex, StreamTransformExtension):
                transform_from = ex.transform_from(transform_from)
        return transform_from

"""The storage layer of torch.distributed.checkpoint, for every torch from 2.1 on."""
from ._format import DEFAULT_SUFFIX, SerializationFormat
from .fs import FileSystem, FileSystemBase
from .reader import FileSystemReader
from .writer import FileSystemWriter

__all__ = [
    "FileSystemWriter",
    "FileSystemReader",
    "FileSystem",
    "FileSystemBase",
    "SerializationFormat",
    "DEFAULT_SUFFIX",
]
__version__ = "0.1.0"

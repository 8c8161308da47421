"""The storage layer of torch.distributed.checkpoint, for every torch from 2.1 on."""
from ._format import DEFAULT_SUFFIX, SerializationFormat
from ._safe_pickle import add_safe_metadata_globals
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
    "add_safe_metadata_globals",
]
__version__ = "0.1.0"

"""The storage layer of torch.distributed.checkpoint, for every torch from 2.1 on."""
from ._format import DEFAULT_SUFFIX, SerializationFormat
from ._safe_pickle import add_safe_metadata_globals
from .fs import FileSystem, FileSystemBase
from .hf_storage import HuggingFaceStorageReader, HuggingFaceStorageWriter, consolidate_safetensors_files
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
    "HuggingFaceStorageWriter",
    "HuggingFaceStorageReader",
    "consolidate_safetensors_files",
]
__version__ = "0.1.0"

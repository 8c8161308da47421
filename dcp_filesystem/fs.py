"""Where checkpoint bytes go: the file-system abstraction and its local implementation."""
from __future__ import annotations

import io
import os
import warnings
from abc import ABC, abstractmethod
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Generator, List, Optional, Union

from ._paths import open_regular

PathLike = Union[str, os.PathLike]


class FileSystemBase(ABC):
    @contextmanager
    @abstractmethod
    def create_stream(self, path: PathLike, mode: str) -> Generator[io.IOBase, None, None]: ...

    @abstractmethod
    def concat_path(self, path: PathLike, suffix: str) -> PathLike: ...

    @abstractmethod
    def rename(self, path: PathLike, new_path: PathLike) -> None:
        """Move ``path`` to ``new_path``, best replacing an existing ``new_path`` in one step (os.replace,
        an object store's copy): where it raises FileExistsError, the writer removes ``new_path`` first."""

    @abstractmethod
    def init_path(self, path: PathLike) -> PathLike: ...

    @abstractmethod
    def mkdir(self, path: PathLike) -> None: ...

    @classmethod
    @abstractmethod
    def validate_checkpoint_id(cls, checkpoint_id: PathLike) -> bool: ...

    @abstractmethod
    def exists(self, path: PathLike) -> bool: ...

    @abstractmethod
    def rm_file(self, path: PathLike) -> None: ...

    # What a file system can do beyond upstream's abstract methods. The defaults suit an object
    # store; a file system that can do more says so by overriding them.

    def ls(self, path: PathLike) -> Optional[List[str]]:
        """The entries of directory ``path``, or None where this file system cannot list them."""
        return None

    def local_path(self, path: PathLike) -> Optional[str]:
        """``path`` on the local file system, for checks the OS can answer; None where it is not local.

        Files without a local path are read as an object store serves them: front to back, inside
        the planned items' byte ranges only, never seeking to their end."""
        return None

    def sync_dir(self, path: PathLike) -> None:
        """Make files created and renamed inside ``path`` durable; nothing to do where there are no directories."""
        return None


class _Adopted(FileSystemBase):
    """A file system built on torch's FileSystemBase instead of ours (s3torchconnector's S3FileSystem,
    torch's fsspec FileSystem): upstream's methods are its own; of the rest it gets the object-store
    defaults, and its own ``ls`` where it has one."""

    def __init__(self, fs: Any) -> None:
        self.adopted = fs

    def __getattr__(self, name: str) -> Any:  # its other attributes, e.g. an S3 client
        if name == "adopted":  # not set yet (while unpickling)
            raise AttributeError(name)
        return getattr(self.adopted, name)

    # Each method passes on whatever its caller gives: an adopted file system's own methods may take
    # more than upstream's (fsspec's init_path takes storage options as keyword arguments).
    def create_stream(self, path: PathLike, mode: str, *args: Any, **kwargs: Any) -> Any:
        return self.adopted.create_stream(path, mode, *args, **kwargs)

    def concat_path(self, path: PathLike, suffix: str, *args: Any, **kwargs: Any) -> PathLike:
        return self.adopted.concat_path(path, suffix, *args, **kwargs)

    def rename(self, path: PathLike, new_path: PathLike, *args: Any, **kwargs: Any) -> None:
        self.adopted.rename(path, new_path, *args, **kwargs)

    def init_path(self, path: PathLike, *args: Any, **kwargs: Any) -> PathLike:
        return self.adopted.init_path(path, *args, **kwargs)

    def mkdir(self, path: PathLike, *args: Any, **kwargs: Any) -> None:
        self.adopted.mkdir(path, *args, **kwargs)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: PathLike) -> bool:
        return False  # never asked: the writer and reader ask their own classes

    def exists(self, path: PathLike, *args: Any, **kwargs: Any) -> bool:
        return self.adopted.exists(path, *args, **kwargs)

    def rm_file(self, path: PathLike, *args: Any, **kwargs: Any) -> None:
        self.adopted.rm_file(path, *args, **kwargs)

    def ls(self, path: PathLike, *args: Any, **kwargs: Any) -> Optional[List[str]]:
        ls = getattr(self.adopted, "ls", None)
        return None if ls is None else [str(entry) for entry in ls(path, *args, **kwargs)]


class FileSystemAttribute:
    """The ``fs`` attribute of the writer and reader. Subclasses assign a file system of their own, as
    they do on torch's classes; one built on torch's FileSystemBase is adopted as one of ours."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = "_" + name

    def __get__(self, obj: Any, owner: Optional[type] = None) -> Any:
        return self if obj is None else obj.__dict__[self.slot]

    def __set__(self, obj: Any, fs: Any) -> None:
        obj.__dict__[self.slot] = fs if isinstance(fs, FileSystemBase) else _Adopted(fs)


class FileSystem(FileSystemBase):
    """The local file system."""

    @contextmanager
    def create_stream(self, path: PathLike, mode: str) -> Generator[io.IOBase, None, None]:
        # Reads open regular files only: a named pipe would block the open forever.
        with (open_regular(path) if mode == "rb" else Path(path).open(mode)) as stream:
            yield stream

    def concat_path(self, path: PathLike, suffix: str) -> PathLike:
        return Path(path) / suffix

    def init_path(self, path: PathLike) -> PathLike:
        return Path(path)

    def rename(self, path: PathLike, new_path: PathLike) -> None:
        os.replace(path, new_path)

    def mkdir(self, path: PathLike) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: PathLike) -> bool:
        if isinstance(checkpoint_id, Path):
            return True
        if "://" in str(checkpoint_id):
            return False
        return any(p.exists() and os.access(p, os.W_OK) for p in Path(checkpoint_id).parents)

    def exists(self, path: PathLike) -> bool:
        return Path(path).exists()

    def rm_file(self, path: PathLike) -> None:
        Path(path).unlink()

    def ls(self, path: PathLike) -> Optional[List[str]]:
        return [str(p) for p in Path(path).iterdir()]

    def local_path(self, path: PathLike) -> Optional[str]:
        return str(path)

    def sync_dir(self, path: PathLike) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def file_descriptor(stream: Any) -> Optional[int]:
    """The OS file descriptor behind ``stream``, or None where it has none."""
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError and a ValueError
        return None


def fsync_stream(stream: io.IOBase) -> None:
    """Flush then fsync; a stream with no file number gets a warning (torch 2.15 semantics)."""
    stream.flush()
    fileno = file_descriptor(stream)
    if fileno is None:
        warnings.warn(
            f"sync_files=True but {type(stream).__name__} has no file descriptor to fsync; "
            "its data may not be durable",
            stacklevel=3,
        )
        return
    os.fsync(fileno)

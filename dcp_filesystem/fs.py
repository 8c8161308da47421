"""Where checkpoint bytes go: the file-system abstraction and its local implementation."""
from __future__ import annotations

import io
import os
import warnings
from abc import ABC, abstractmethod
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Generator, List, Optional, Union

PathLike = Union[str, os.PathLike]


class FileSystemBase(ABC):
    @contextmanager
    @abstractmethod
    def create_stream(self, path: PathLike, mode: str) -> Generator[io.IOBase, None, None]: ...

    @abstractmethod
    def concat_path(self, path: PathLike, suffix: str) -> PathLike: ...

    @abstractmethod
    def rename(self, path: PathLike, new_path: PathLike) -> None: ...

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
        """``path`` on the local file system, for checks the OS can answer; None where it is not local."""
        return None

    def sync_dir(self, path: PathLike) -> None:
        """Make files created and renamed inside ``path`` durable; nothing to do where there are no directories."""
        return None

    def rename_replaces(self) -> bool:
        """Whether ``rename`` replaces an existing destination in one step, so readers never see it missing."""
        return False


class FileSystem(FileSystemBase):
    """The local file system."""

    @contextmanager
    def create_stream(self, path: PathLike, mode: str) -> Generator[io.IOBase, None, None]:
        with Path(path).open(mode) as stream:
            yield stream

    def concat_path(self, path: PathLike, suffix: str) -> PathLike:
        return Path(path) / suffix

    def init_path(self, path: PathLike) -> PathLike:
        return Path(path)

    def rename(self, path: PathLike, new_path: PathLike) -> None:
        os.replace(path, new_path)

    def rename_replaces(self) -> bool:
        return True  # os.replace is atomic on POSIX: readers see the old file or the new, never neither

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

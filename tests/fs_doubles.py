"""The tests' file systems: the local one behind FileSystemBase's abstract methods alone (to record or fail
calls), and object stores in memory (the files of one, checked: where the writer and reader touch them).
"""
from __future__ import annotations

import io
import os
import pickle
from contextlib import contextmanager

from dcp_filesystem import FileSystem, FileSystemBase, FileSystemReader, FileSystemWriter


class LocalFS(FileSystemBase):
    """Every call goes to the local FileSystem (this is not a FileSystem subclass); the capability
    methods keep FileSystemBase's defaults unless a subclass says otherwise."""

    def __init__(self):
        self.inner = FileSystem()

    @contextmanager
    def create_stream(self, path, mode):
        with self.inner.create_stream(path, mode) as stream:
            yield stream

    def concat_path(self, path, suffix):
        return self.inner.concat_path(path, suffix)

    def rename(self, path, new_path):
        self.inner.rename(path, new_path)

    def init_path(self, path):
        return self.inner.init_path(path)

    def mkdir(self, path):
        self.inner.mkdir(path)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id):
        return FileSystem.validate_checkpoint_id(checkpoint_id)

    def exists(self, path):
        return self.inner.exists(path)

    def rm_file(self, path):
        self.inner.rm_file(path)


class RecordingFS(LocalFS):
    """The local file system recording every call that creates, renames, removes or syncs (file names
    by their base name), and able to list and say its local paths, as FileSystem does."""

    def __init__(self):
        super().__init__()
        self.calls = []

    @contextmanager
    def create_stream(self, path, mode):
        self.calls.append(("create_stream", os.path.basename(str(path)), mode))
        with super().create_stream(path, mode) as stream:
            yield stream

    def rename(self, path, new_path):
        self.calls.append(("rename", os.path.basename(str(path)), os.path.basename(str(new_path))))
        super().rename(path, new_path)

    def mkdir(self, path):
        self.calls.append(("mkdir", str(path)))
        super().mkdir(path)

    def rm_file(self, path):
        self.calls.append(("rm_file", os.path.basename(str(path))))
        super().rm_file(path)

    def sync_dir(self, path):
        self.calls.append(("sync_dir", str(path)))
        self.inner.sync_dir(path)

    def ls(self, path):
        return self.inner.ls(path)

    def local_path(self, path):
        return self.inner.local_path(path)


# --------------------------------------------------------------------------- object stores in memory


class MemoryFS(FileSystemBase):
    """An object store in memory: ``files``, a dict of path -> bytes, where an object appears whole when its
    write stream is closed. Upstream's abstract methods only, so every capability method keeps FileSystemBase's
    object-store default (it cannot list, has no local paths, no directories to sync). Its streams are
    io.BytesIO, which has no file descriptor. ``calls`` records, with paths as given, every stream opened and
    every rename, removal, mkdir and sync_dir."""

    def __init__(self):
        self.files = {}
        self.calls = []

    def write_stream(self):
        return io.BytesIO()

    def written(self, stream) -> bytes:
        """What ``stream`` (of ``write_stream``) took."""
        return stream.getvalue()

    def read_stream(self, key):
        return io.BytesIO(self.files[key])

    @contextmanager
    def create_stream(self, path, mode):
        key = str(path)
        self.calls.append(("create_stream", key, mode))
        if "w" in mode:
            stream = self.write_stream()
            yield stream
            self.files[key] = self.written(stream)
        elif "r" in mode:
            if key not in self.files:
                raise FileNotFoundError(key)
            yield self.read_stream(key)
        else:
            raise ValueError(mode)

    def concat_path(self, path, suffix):
        return str(path).rstrip("/") + "/" + suffix

    def rename(self, path, new_path):
        self.calls.append(("rename", str(path), str(new_path)))
        self.files[str(new_path)] = self.files.pop(str(path))  # copy (replacing), then delete

    def init_path(self, path):
        return str(path)

    def mkdir(self, path):
        self.calls.append(("mkdir", str(path)))

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id):
        return "://" in str(checkpoint_id)

    def exists(self, path):
        return str(path) in self.files

    def rm_file(self, path):
        self.calls.append(("rm_file", str(path)))
        del self.files[str(path)]

    def sync_dir(self, path):
        self.calls.append(("sync_dir", str(path)))


class ListingMemoryFS(MemoryFS):
    """A MemoryFS that can list a directory's entries (as fsspec's memory file system can)."""

    def ls(self, path):
        prefix = str(path).rstrip("/") + "/"
        return [k for k in self.files if k.startswith(prefix) and "/" not in k[len(prefix) :]]


class RefusingMemoryFS(MemoryFS):
    """A MemoryFS whose rename keeps an existing destination, as some file systems' do."""

    def rename(self, path, new_path):
        if str(new_path) in self.files:
            self.calls.append(("rename refused", str(path), str(new_path)))
            raise FileExistsError(str(new_path))
        super().rename(path, new_path)


class AppendOnly:
    """A bare write stream (an object store's upload): write, tell, flush, close; no fileno, no seek."""

    def __init__(self):
        self.sink = bytearray()
        self.closed = False

    def write(self, b):
        n = len(memoryview(b).cast("B"))
        self.sink += bytes(memoryview(b).cast("B"))
        return n

    def tell(self):
        return len(self.sink)

    def flush(self):
        pass

    def close(self):
        self.closed = True


class AppendOnlyMemoryFS(ListingMemoryFS):
    """A ListingMemoryFS whose write streams are AppendOnly: no io class at all."""

    def write_stream(self):
        return AppendOnly()

    def written(self, stream) -> bytes:
        return bytes(stream.sink)


class Refused(AssertionError):
    """What StrictObjectStore's streams raise for a call an object store's would not serve."""


class PutStream(io.RawIOBase):
    """An upload: takes ``bytes`` and ``memoryview`` only (as s3torchconnector's does), cannot seek."""

    def __init__(self):
        self.data = bytearray()

    def writable(self):
        return True

    def write(self, data):
        if not isinstance(data, (bytes, memoryview)):
            raise Refused(f"write of {type(data).__name__}: an object store takes bytes or memoryview")
        self.data += data
        return len(data)

    def tell(self):
        return len(self.data)

    def seek(self, *args):
        raise Refused("seek on a write stream")


class GetStream(io.RawIOBase):
    """A download that reads only inside ``ranges`` (sorted [start, end) pairs; None: anywhere), front to
    back, never seeking from the end; ``reads`` lists the [start, end) of each read."""

    def __init__(self, data, ranges):
        self.data, self.ranges, self.pos, self.reads = data, ranges, 0, []

    def readable(self):
        return True

    def seek(self, offset, whence=os.SEEK_SET):
        if whence == os.SEEK_END:
            raise Refused("seek from the end: an object stream has no known end")
        target = offset if whence == os.SEEK_SET else self.pos + offset
        if target < self.pos:
            raise Refused(f"seek back from {self.pos} to {target}")
        self.pos = target
        return self.pos

    def tell(self):
        return self.pos

    def readinto(self, buffer):
        view = memoryview(buffer).cast("B")
        end = min(self.pos + len(view), len(self.data))
        if self.ranges is not None and end > self.pos:
            if not any(start <= self.pos and end <= stop for start, stop in self.ranges):
                raise Refused(f"read of [{self.pos}, {end}) outside every planned item {self.ranges}")
        view[: end - self.pos] = self.data[self.pos : end]
        self.reads.append((self.pos, end))
        got, self.pos = end - self.pos, end
        return got

    def read(self, n=-1):
        buffer = bytearray(len(self.data) - self.pos if n is None or n < 0 else n)
        return bytes(buffer[: self.readinto(buffer)])


class StrictObjectStore(MemoryFS):
    """A MemoryFS that stands in for S3: PutStream uploads, GetStream downloads, which after ``plan_ranges``
    fail any read outside the byte ranges of the checkpoint's items. ``gets`` lists (path, reads) of each
    download, in the order they finished."""

    def __init__(self):
        super().__init__()
        self.ranges, self.gets = {}, []

    def write_stream(self):
        return PutStream()

    def written(self, stream) -> bytes:
        return bytes(stream.data)

    def read_stream(self, key):
        return GetStream(self.files[key], self.ranges.get(key))

    @contextmanager
    def create_stream(self, path, mode):
        with super().create_stream(path, mode) as stream:
            yield stream
        if isinstance(stream, GetStream):
            self.gets.append((str(path), stream.reads))

    def plan_ranges(self, path):
        """Allow reads only inside the items the checkpoint's metadata lists (every item is loaded)."""
        with self.create_stream(f"{path}/.metadata", "rb") as stream:
            metadata = pickle.load(stream)
        self.ranges = {}
        for info in metadata.storage_data.values():
            self.ranges.setdefault(f"{path}/{info.relative_path}", []).append((info.offset, info.offset + info.length))
        self.gets = []


class MemoryWriter(FileSystemWriter):
    """A writer on ``fs``, as fsspec's is made: constructed, then given the file system and the path it derives."""

    def __init__(self, path, fs, **kwargs):
        super().__init__(path, **kwargs)
        self.fs = fs
        self.path = self.fs.init_path(path)


class MemoryReader(FileSystemReader):
    """A reader on ``fs``, made as MemoryWriter is."""

    def __init__(self, path, fs, **kwargs):
        super().__init__(path, **kwargs)
        self.fs = fs
        self.path = self.fs.init_path(path)

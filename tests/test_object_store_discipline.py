"""How the writer and reader touch the streams of a file system that is not local (an object store).

A strict in-memory object store stands in for S3: its write streams take only ``bytes`` and
``memoryview`` (as s3torchconnector's do) and cannot seek; its read streams fail any read outside
the byte ranges of the items the load planned, any read that goes back, and any seek from the end.
"""
from __future__ import annotations

import io
import os
import pickle
import re
from contextlib import contextmanager

import pytest
import torch
from helpers import assert_state_equal, dcp_load, dcp_save, raised_error, zeros_like_state

from dcp_filesystem import FileSystemBase, FileSystemReader, FileSystemWriter, SerializationFormat

FORMATS = [SerializationFormat.TORCH_SAVE, SerializationFormat.SAFETENSORS]


class Refused(AssertionError):
    pass


class _PutStream(io.RawIOBase):
    def __init__(self, store, key):
        self.store, self.key, self.data = store, key, bytearray()

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


class _GetStream(io.RawIOBase):
    """Reads only inside ``ranges`` (sorted [start, end) pairs), front to back."""

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


class StrictObjectStore(FileSystemBase):
    """Upstream's abstract methods only: every capability keeps its object-store default."""

    def __init__(self):
        self.objects, self.ranges, self.gets = {}, {}, []

    @contextmanager
    def create_stream(self, path, mode):
        key = str(path)
        if "w" in mode:
            stream = _PutStream(self, key)
            yield stream
            self.objects[key] = bytes(stream.data)  # appears whole when the upload completes
        else:
            if key not in self.objects:
                raise FileNotFoundError(key)
            stream = _GetStream(self.objects[key], self.ranges.get(key))
            yield stream
            self.gets.append((key, stream.reads))

    def concat_path(self, path, suffix):
        return f"{path}/{suffix}"

    def rename(self, path, new_path):
        self.objects[str(new_path)] = self.objects.pop(str(path))  # copy (replacing), then delete

    def init_path(self, path):
        return str(path)

    def mkdir(self, path):
        pass

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id):
        return str(checkpoint_id).startswith("store://")

    def exists(self, path):
        return str(path) in self.objects

    def rm_file(self, path):
        del self.objects[str(path)]

    def plan_ranges(self, path):
        """Allow reads only inside the items the checkpoint's metadata lists (every item is loaded)."""
        with self.create_stream(f"{path}/.metadata", "rb") as stream:
            metadata = pickle.load(stream)
        self.ranges = {}
        for info in metadata.storage_data.values():
            self.ranges.setdefault(f"{path}/{info.relative_path}", []).append((info.offset, info.offset + info.length))
        self.gets = []


class Writer(FileSystemWriter):
    def __init__(self, path, fs, **kwargs):
        super().__init__(path, **kwargs)
        self.fs = fs
        self.path = self.fs.init_path(path)


class Reader(FileSystemReader):
    def __init__(self, path, fs, **kwargs):
        super().__init__(path, **kwargs)
        self.fs = fs
        self.path = self.fs.init_path(path)


def state():
    gen = torch.Generator().manual_seed(7)
    return {
        "big": torch.randn(400, 1024, generator=gen),  # a 1.6 MB torch.save archive: read whole, not edges first
        "ints": torch.arange(5000),
        **{f"small.{i}": torch.randn(3, i + 1, generator=gen) for i in range(20)},  # read one by one
        "half": torch.randn(64, generator=gen).to(torch.bfloat16),
    }


@pytest.mark.parametrize("thread_count", [1, 3])
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
def test_an_object_store_is_read_inside_planned_items_front_to_back(fmt, thread_count):
    fs = StrictObjectStore()
    sd = state()
    sync = {"sync_files": False}  # an object store's streams have no descriptor to fsync
    dcp_save(sd, Writer("store://c", fs, serialization_format=fmt, thread_count=thread_count, **sync))
    fs.plan_ranges("store://c")
    target = zeros_like_state(sd)
    dcp_load(target, Reader("store://c", fs, thread_count=thread_count))
    assert_state_equal(sd, target)
    data_gets = [(key, reads) for key, reads in fs.gets if key.endswith(".distcp")]
    assert data_gets
    for key, reads in data_gets:
        # Every byte of the file's planned items is read exactly once, in order.
        assert sorted(reads) == reads
        covered = sum(end - start for start, end in reads)
        assert covered == sum(end - start for start, end in fs.ranges[key])


def test_reads_outside_the_planned_items_are_refused_by_the_double():
    # The double itself: a read across an item boundary, back, or from the end fails.
    stream = _GetStream(bytes(100), [(0, 10), (10, 30)])
    stream.read(10)
    with pytest.raises(Refused, match="outside every planned item"):
        stream.read(25)
    with pytest.raises(Refused, match="seek back"):
        stream.seek(5)
    with pytest.raises(Refused, match="from the end"):
        stream.seek(0, os.SEEK_END)
    with pytest.raises(Refused, match="bytearray"):
        _PutStream(None, "k").write(bytearray(3))


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
def test_a_truncated_object_says_which_item_is_short(fmt):
    fs = StrictObjectStore()
    sd = {"a": torch.arange(100.0), "b": torch.arange(50.0)}
    dcp_save(sd, Writer("store://c", fs, serialization_format=fmt, sync_files=False))
    (data_key,) = [k for k in fs.objects if k.endswith(".distcp")]
    fs.objects[data_key] = fs.objects[data_key][:-40]  # the last item lost its end
    with pytest.raises(BaseException) as info:  # torch's CheckpointException is a BaseException
        dcp_load(zeros_like_state(sd), Reader("store://c", fs))
    error = raised_error(info.value)
    assert type(error) is ValueError
    last = "b" if fmt == SerializationFormat.TORCH_SAVE else "a"  # SAFETENSORS orders items by size
    expected = rf"{data_key}: item '{last}' \(chunk at \[0\]\): read \d+ of \d+ bytes at offset \d+"
    assert re.fullmatch(expected, str(error))

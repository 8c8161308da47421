"""How the writer and reader touch the streams of a file system that is not local (an object store).

A strict in-memory object store (fs_doubles.StrictObjectStore) stands in for S3: its write streams take
only ``bytes`` and ``memoryview`` (as s3torchconnector's do) and cannot seek; its read streams fail any
read outside the byte ranges of the items the load planned, any read that goes back, and any seek from
the end.
"""
from __future__ import annotations

import os
import re

import pytest
import torch
from fs_doubles import GetStream, MemoryReader, MemoryWriter, PutStream, Refused, StrictObjectStore
from helpers import assert_state_equal, dcp_load, dcp_save, raised_error, zeros_like_state

from dcp_filesystem import SerializationFormat

FORMATS = [SerializationFormat.TORCH_SAVE, SerializationFormat.SAFETENSORS]


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
    dcp_save(sd, MemoryWriter("store://c", fs, serialization_format=fmt, thread_count=thread_count, **sync))
    fs.plan_ranges("store://c")
    target = zeros_like_state(sd)
    dcp_load(target, MemoryReader("store://c", fs, thread_count=thread_count))
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
    stream = GetStream(bytes(100), [(0, 10), (10, 30)])
    stream.read(10)
    with pytest.raises(Refused, match="outside every planned item"):
        stream.read(25)
    with pytest.raises(Refused, match="seek back"):
        stream.seek(5)
    with pytest.raises(Refused, match="from the end"):
        stream.seek(0, os.SEEK_END)
    with pytest.raises(Refused, match="bytearray"):
        PutStream().write(bytearray(3))


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
def test_a_truncated_object_says_which_item_is_short(fmt):
    fs = StrictObjectStore()
    sd = {"a": torch.arange(100.0), "b": torch.arange(50.0)}
    dcp_save(sd, MemoryWriter("store://c", fs, serialization_format=fmt, sync_files=False))
    (data_key,) = [k for k in fs.files if k.endswith(".distcp")]
    fs.files[data_key] = fs.files[data_key][:-40]  # the last item lost its end
    with pytest.raises(BaseException) as info:  # torch's CheckpointException is a BaseException
        dcp_load(zeros_like_state(sd), MemoryReader("store://c", fs))
    error = raised_error(info.value)
    assert type(error) is ValueError
    last = "b" if fmt == SerializationFormat.TORCH_SAVE else "a"  # SAFETENSORS orders items by size
    expected = rf"{data_key}: item '{last}' \(chunk at \[0\]\): read \d+ of \d+ bytes at offset \d+"
    assert re.fullmatch(expected, str(error))

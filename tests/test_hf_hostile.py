"""Hostile or damaged Hugging Face directories: every one gets an error naming the file, the item and the cause,
before a byte is read outside what the headers allow."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from test_hf_storage import save_plain

from dcp_filesystem import HuggingFaceStorageReader, HuggingFaceStorageWriter, consolidate_safetensors_files
from dcp_filesystem._cli import main


def _sd():
    return {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.arange(4, dtype=torch.int64)}


def _index(directory, weight_map):
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _read(directory):
    return HuggingFaceStorageReader(str(directory)).read_metadata()


def _error(directory, kind=ValueError):
    with pytest.raises(kind) as info:
        _read(directory)
    return str(info.value)


def _header(entries, metadata=None):
    header = dict(entries)
    if metadata is not None:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text


def test_index_naming_a_file_outside_the_directory(tmp_path):
    outside = tmp_path / "outside.safetensors"
    save_plain(_sd(), outside)
    model = tmp_path / "model"
    model.mkdir()
    for name in ("../outside.safetensors", str(outside)):
        _index(model, {"w": name})
        assert _error(model) == (
            f"{model / 'model.safetensors.index.json'}: weight_map entry 'w' names storage file {name!r}, which is "
            f"outside the checkpoint directory {model}"
        )
    os.symlink(outside, model / "link.safetensors")
    _index(model, {"w": "link.safetensors"})
    assert "names storage file 'link.safetensors', which is outside the checkpoint directory" in _error(model)
    (model / "model.safetensors.index.json").unlink()  # found by listing: refused all the same
    assert _error(model) == (
        f"{model}: directory entry names storage file 'link.safetensors', which is outside the checkpoint "
        f"directory {model}"
    )


def test_index_that_is_not_one(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    assert _error(tmp_path).startswith(f"{tmp_path / 'model.safetensors.index.json'}: index file is not valid JSON: ")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["w"]}))
    assert _error(tmp_path) == (
        f"{tmp_path / 'model.safetensors.index.json'}: index file has no weight_map object (fqn -> file name)"
    )
    _index(tmp_path, {"w": 7})
    assert "weight_map entry 'w' names storage file 7, which is not a valid file name" in _error(tmp_path)


def test_missing_shard_file(tmp_path):
    save_plain(_sd(), tmp_path / "model-00001-of-00002.safetensors")
    _index(tmp_path, {"w": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"})
    assert _error(tmp_path, FileNotFoundError) == (
        f"{tmp_path / 'model-00002-of-00002.safetensors'}: no such file in the Hugging Face checkpoint {tmp_path}"
    )


def test_empty_directory(tmp_path):
    assert _error(tmp_path, FileNotFoundError) == (
        f"{tmp_path}: no Hugging Face checkpoint in this directory (no model.safetensors.index.json, "
        "no *.safetensors file)"
    )
    assert _error(tmp_path / "nowhere", FileNotFoundError) == (
        f"{tmp_path / 'nowhere'}: no such Hugging Face checkpoint directory"
    )


def test_weight_map_naming_a_tensor_its_file_lacks(tmp_path):
    save_plain({"w": _sd()["w"]}, tmp_path / "a.safetensors")
    save_plain({"b": _sd()["b"]}, tmp_path / "b.safetensors")
    _index(tmp_path, {"w": "a.safetensors", "b": "a.safetensors"})
    assert _error(tmp_path) == (
        f"{tmp_path / 'model.safetensors.index.json'}: weight_map names tensor 'b' in {tmp_path / 'a.safetensors'}, "
        "whose safetensors header has no such entry"
    )


def test_tensor_stored_twice(tmp_path):
    save_plain(_sd(), tmp_path / "a.safetensors")
    save_plain({"w": _sd()["w"]}, tmp_path / "b.safetensors")
    assert _error(tmp_path) == f"{tmp_path}: tensor 'w' is stored twice: in a.safetensors and in b.safetensors"
    _index(tmp_path, {"w": "b.safetensors", "b": "a.safetensors"})
    assert _error(tmp_path) == f"{tmp_path}: tensor 'w' is stored twice: in b.safetensors and in a.safetensors"


def test_overlapping_and_outlying_entries(tmp_path):
    path = tmp_path / "model.safetensors"
    entries = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
               "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}
    path.write_bytes(_header(entries) + bytes(24))
    assert _error(tmp_path) == (
        f"{path}: safetensors entry 'b' at data offsets [8, 24] overlaps the entry before it (the entries before "
        "it end at 16)"
    )
    entries = {"a": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}
    path.write_bytes(_header(entries) + bytes(16))
    assert _error(tmp_path).startswith(f"{path}: safetensors entry 'a' has offsets [0, 4000] that do not fit shape "
                                       "[1000] of F32 in a ")
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{" + bytes(100))
    assert _error(tmp_path) == (
        f"{path}: safetensors header length {1 << 40} is larger than the file (109 bytes) or the 100000000-byte limit"
    )
    path.write_bytes(b"PK\x03\x04 not a safetensors file")
    assert _error(tmp_path) == f"{path}: not a safetensors file (it does not start with a safetensors header)"


def test_sharding_info_and_checksums_that_are_not_what_they_say(tmp_path):
    path = tmp_path / "model.safetensors"
    entries = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
    for sharding in ({"a": {"saved_offsets": [0]}}, {"a": {"saved_offsets": [0, -2]}}, {"a": {"saved_offsets": "0"}}):
        path.write_bytes(_header(entries, {"DCP_SHARDING_INFO": json.dumps(sharding)}) + bytes(16))
        assert _error(tmp_path) == (
            f"{path}: DCP_SHARDING_INFO of entry 'a' has saved offsets {sharding['a']['saved_offsets']!r}, not 2 "
            "non-negative integers"
        )
    path.write_bytes(_header(entries, {"DCP_SHARDING_INFO": "[1, 2]"}) + bytes(16))
    assert _error(tmp_path) == f"{path}: safetensors header's DCP_SHARDING_INFO is not a JSON object"
    for crcs, value, key in (({"a": "0x123456"}, "0x123456", "a"), ({"z": "00000000"}, "00000000", "z")):
        path.write_bytes(_header(entries, {"DCP_CRC32": json.dumps(crcs)}) + bytes(16))
        assert _error(tmp_path) == (
            f"{path}: safetensors header's DCP_CRC32 has {value!r} for {key!r}, which is no entry's CRC-32 "
            "(8 hex digits)"
        )
    path.write_bytes(_header(entries, {"DCP_CRC32": "[]"}) + bytes(16))
    assert _error(tmp_path) == f"{path}: safetensors header's DCP_CRC32 is not a JSON object of CRC-32s: '[]'"
    for blocks, shown in (({"block_bytes": 8, "entries": {"a": "00000000"}}, "'00000000'"),
                          ({"block_bytes": 8, "entries": {"a": "0000000g00000000"}}, "'0000000g00000000'"),
                          ({"block_bytes": 8, "entries": {"z": "0000000000000000"}}, "'0000000000000000'")):
        path.write_bytes(_header(entries, {"DCP_CRC32_BLOCKS": json.dumps(blocks)}) + bytes(16))
        key = next(iter(blocks["entries"]))
        assert _error(tmp_path) == (
            f"{path}: safetensors header's DCP_CRC32_BLOCKS has {shown} for {key!r}, which is no list of the "
            "CRC-32s of its 8-byte blocks (8 hex digits each)"
        )
    path.write_bytes(_header(entries, {"DCP_CRC32_BLOCKS": json.dumps({"block_bytes": 0, "entries": {}})})
                     + bytes(16))
    assert _error(tmp_path).startswith(f"{path}: safetensors header's DCP_CRC32_BLOCKS has no positive block_bytes")


def test_chunks_that_leave_a_hole_or_disagree(tmp_path):
    """A sharded save with one rank's file missing: the chunks no longer fill their tensor."""
    sd = {"w": torch.arange(24, dtype=torch.float32).reshape(6, 4)}

    def shard(name, rows, dtype="F32"):
        entries = {"w": {"dtype": dtype, "shape": [2, 4], "data_offsets": [0, 32]}}
        sharding = {"w": {"saved_offsets": [rows, 0]}}
        data = bytes(sd["w"][rows : rows + 2].reshape(-1).view(torch.uint8).tolist())
        (tmp_path / name).write_bytes(_header(entries, {"DCP_SHARDING_INFO": json.dumps(sharding)}) + data)

    shard("shard-00001.safetensors", 0)
    shard("shard-00003.safetensors", 4)
    assert _error(tmp_path) == (
        f"{tmp_path}: the 2 chunk(s) of tensor 'w' in shard-00001.safetensors, shard-00003.safetensors do not fill "
        "its size [6, 4] exactly (16 of 24 elements, or overlapping): a shard file missing or damaged?"
    )
    shard("shard-00002.safetensors", 3)  # overlaps the third: the elements add up, two rows are missing
    assert "do not fill its size [6, 4] exactly (24 of 24 elements, or overlapping)" in _error(tmp_path)
    shard("shard-00002.safetensors", 2, dtype="I32")
    assert _error(tmp_path) == (
        f"{tmp_path}: tensor 'w' is torch.float32 of 2 dimensions in shard-00001.safetensors but torch.int32 of 2 "
        "dimensions in shard-00002.safetensors"
    )
    with pytest.raises(ValueError) as info:
        consolidate_safetensors_files(str(tmp_path), str(tmp_path / "out"), {"w": 1})
    assert "tensor 'w' is torch.float32 of 2 dimensions" in str(info.value)


def test_a_named_pipe_is_refused_without_waiting(tmp_path):
    os.mkfifo(tmp_path / "model.safetensors")
    assert _error(tmp_path) == (
        f"{tmp_path / 'model.safetensors'}: is a named pipe, not a regular file: checkpoints are read from regular "
        "files only"
    )


def test_verify_reports_a_hostile_directory(tmp_path, capsys):
    _index(tmp_path, {"w": "../x.safetensors"})
    assert main(["verify", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"error: cannot read the checkpoint metadata: ValueError: {tmp_path / 'model.safetensors.index.json'}: "
        f"weight_map entry 'w' names storage file '../x.safetensors', which is outside the checkpoint directory "
        f"{tmp_path}\n"
    )


def test_a_file_cut_short_after_the_save(tmp_path):
    from helpers import dcp_save

    dcp_save(_sd(), HuggingFaceStorageWriter(str(tmp_path)))
    path = tmp_path / "model-00001-of-00001.safetensors"
    size = os.path.getsize(path)
    os.truncate(path, size - 4)
    assert _error(tmp_path).startswith(f"{path}: safetensors entry ")
    assert _error(tmp_path).endswith(f"in a {size - 4}-byte file")

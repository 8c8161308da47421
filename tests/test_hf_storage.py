"""HuggingFaceStorageWriter, HuggingFaceStorageReader and consolidate_safetensors_files in one process: the
files on disk (names, index, headers with each tensor's CRC-32), what the safetensors library and upstream's
classes (torch 2.8+) make of them, checksums checked on load and by ``verify``."""

from __future__ import annotations

import json
import os
import struct
import zlib

import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers import assert_state_equal, dcp_load, dcp_save, raised_error

from dcp_filesystem import HuggingFaceStorageReader, HuggingFaceStorageWriter, consolidate_safetensors_files
from dcp_filesystem._cli import main

safetensors_torch = pytest.importorskip("safetensors.torch")

UPSTREAM_HF = "torch.distributed.checkpoint has no HuggingFaceStorageWriter/Reader (added in torch 2.8)"


def state():
    gen = torch.Generator().manual_seed(0)
    return {
        "model.embed.weight": torch.randn(64, 32, generator=gen),
        "model.layers.0.attn.weight": torch.randn(32, 32, generator=gen).to(torch.bfloat16),
        "model.layers.0.norm.weight": torch.randn(32, generator=gen).to(torch.float16),
        "model.layers.0.bias": torch.randn(32, generator=gen, dtype=torch.float64),
        "buffers.ids": torch.arange(17, dtype=torch.int64) * 3_000_000_019,
        "buffers.small": torch.arange(7, dtype=torch.int32) - 3,
        "buffers.bytes": torch.arange(5, dtype=torch.uint8),
        "buffers.mask": torch.tensor([True, False, True]),
        "scale": torch.tensor(0.125),
        "empty": torch.zeros(0, 4),
    }


MAPPING = {name: 1 if name.startswith("model.") else 2 for name in state()}
FILES = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


def save_plain(tensors, path, metadata=None):
    """A safetensors file as the safetensors library writes one (widest dtypes first, then by name), built by
    hand: the library's own save needs NumPy, which torch 2.1's test cell has not."""
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header = {} if metadata is None else {"__metadata__": metadata}
    data = b""
    for key in order:
        raw = bytes(tensors[key].contiguous().reshape(-1).view(torch.uint8).tolist())
        header[key] = {"dtype": _NAMES[tensors[key].dtype], "shape": list(tensors[key].shape),
                       "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)


def zeros(sd):
    return {k: torch.zeros_like(v) for k, v in sd.items()}


def header_of(path):
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length)), 8 + length


def file_tensors(directory, names):
    loaded = {}
    for name in names:
        loaded.update(safetensors_torch.load_file(os.path.join(str(directory), name)))
    return loaded


def test_files_index_and_headers(tmp_path):
    sd = state()
    dcp_save(sd, HuggingFaceStorageWriter(str(tmp_path), fqn_to_index_mapping=MAPPING))
    assert sorted(os.listdir(tmp_path)) == FILES + ["model.safetensors.index.json"]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index == {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in sd.values())},
        "weight_map": {name: FILES[MAPPING[name] - 1] for name in sorted(sd)},
    }
    assert_state_equal(sd, file_tensors(tmp_path, FILES))
    for number, name in enumerate(FILES, start=1):
        header, data_start = header_of(tmp_path / name)
        meta = header.pop("__metadata__")
        keys = {k for k, i in MAPPING.items() if i == number}
        assert set(header) == keys
        assert sorted(meta) == ["DCP_CRC32", "DCP_SHARDING_INFO", "DCP_VERSION", "format"]
        assert (meta["DCP_VERSION"], meta["format"]) == ("1.0", "pt")
        assert json.loads(meta["DCP_SHARDING_INFO"]) == {k: {"saved_offsets": [0] * sd[k].dim()} for k in keys}
        raw = (tmp_path / name).read_bytes()
        crcs = json.loads(meta["DCP_CRC32"])
        for key in keys:
            begin, end = header[key]["data_offsets"]
            assert crcs[key] == f"{zlib.crc32(raw[data_start + begin : data_start + end]):08x}"


def test_round_trip_and_one_file_without_mapping(tmp_path):
    sd = state()
    dcp_save(sd, HuggingFaceStorageWriter(str(tmp_path)))
    assert sorted(os.listdir(tmp_path)) == ["model-00001-of-00001.safetensors", "model.safetensors.index.json"]
    target = zeros(sd)
    dcp_load(target, HuggingFaceStorageReader(str(tmp_path)))
    assert_state_equal(sd, target)


def test_reader_loads_into_nested_state_and_with_threads(tmp_path):
    sd = state()
    dcp_save(sd, HuggingFaceStorageWriter(str(tmp_path), fqn_to_index_mapping=MAPPING, thread_count=2))
    target = zeros(sd)
    dcp_load(target, HuggingFaceStorageReader(str(tmp_path), thread_count=2))
    assert_state_equal(sd, target)
    nested = {"model": {"embed": {"weight": torch.zeros(64, 32)}}}
    dcp_load(nested, HuggingFaceStorageReader(str(tmp_path)))
    assert_state_equal(sd["model.embed.weight"], nested["model"]["embed"]["weight"])


def test_non_tensor_values_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(BaseException) as info:
        dcp_save({"w": torch.ones(2), "step": 3, "name": "run"}, HuggingFaceStorageWriter(str(tmp_path / "x")))
    assert str(raised_error(info.value)) == (
        "HuggingFaceStorageWriter stores tensors only (a Hugging Face checkpoint holds nothing else), but 'step', "
        "'name' are not tensors: leave non-tensor values out of the state dict"
    )
    assert not (tmp_path / "x").exists() or os.listdir(tmp_path / "x") == []


def test_a_tensor_the_mapping_lacks_is_refused(tmp_path):
    with pytest.raises(BaseException) as info:
        dcp_save({"w": torch.ones(2), "b": torch.ones(1)},
                 HuggingFaceStorageWriter(str(tmp_path), fqn_to_index_mapping={"w": 1}))
    assert str(raised_error(info.value)) == "fqn_to_index_mapping has no file index for 'b'"


def test_upstream_reader_loads_ours(tmp_path):
    if not hasattr(dcp, "HuggingFaceStorageReader"):
        pytest.skip(UPSTREAM_HF)
    sd = {k: v for k, v in state().items() if v.dtype != torch.bool}  # torch 2.8's reader knows no BOOL
    dcp_save(sd, HuggingFaceStorageWriter(str(tmp_path), fqn_to_index_mapping=MAPPING))
    target = zeros(sd)
    dcp_load(target, dcp.HuggingFaceStorageReader(str(tmp_path)))
    assert_state_equal(sd, target)


def test_ours_loads_what_upstream_wrote(tmp_path):
    if not hasattr(dcp, "HuggingFaceStorageWriter"):
        pytest.skip(UPSTREAM_HF)
    sd = {k: v for k, v in state().items() if k != "empty"}
    dcp_save(sd, dcp.HuggingFaceStorageWriter(str(tmp_path), fqn_to_index_mapping=MAPPING))
    assert sorted(os.listdir(tmp_path)) == FILES + ["model.safetensors.index.json"]
    target = zeros(sd)
    dcp_load(target, HuggingFaceStorageReader(str(tmp_path)))
    assert_state_equal(sd, target)
    # Upstream records no checksums: loaded unchecked, and verify says so.
    assert "DCP_CRC32" not in header_of(tmp_path / FILES[0])[0]["__metadata__"]


def test_reads_a_plain_hugging_face_directory(tmp_path):
    """Files as the safetensors library writes them: no DCP metadata in the header; one model.safetensors, or
    several files and an index."""
    sd = state()
    save_plain(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert_state_equal(sd, file_tensors(tmp_path, ["model.safetensors"]))
    target = zeros(sd)
    dcp_load(target, HuggingFaceStorageReader(str(tmp_path)))
    assert_state_equal(sd, target)

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    weight_map = {}
    for number, name in enumerate(FILES, start=1):
        part = {k: v for k, v in sd.items() if MAPPING[k] == number}
        save_plain(part, sharded / name)
        weight_map.update(dict.fromkeys(part, name))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (sharded / "stale-00001-of-00001.safetensors").write_bytes(b"not read: the index does not name it")
    target = zeros(sd)
    dcp_load(target, HuggingFaceStorageReader(str(sharded)))
    assert_state_equal(sd, target)


def _flip_byte_of(path, key):
    header, data_start = header_of(path)
    begin, _ = header[key]["data_offsets"]
    with open(path, "r+b") as f:
        f.seek(data_start + begin)
        byte = f.read(1)
        f.seek(data_start + begin)
        f.write(bytes([byte[0] ^ 0x10]))


def test_checksums_are_checked_on_load_and_by_verify(tmp_path, capsys):
    sd = state()
    dcp_save(sd, HuggingFaceStorageWriter(str(tmp_path), fqn_to_index_mapping=MAPPING))
    assert main(["verify", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"OK: {len(sd)} entries, {sum(t.nbytes for t in sd.values())} bytes verified\n"

    path = tmp_path / FILES[0]
    _flip_byte_of(path, "model.embed.weight")
    with pytest.raises(BaseException) as info:
        dcp_load(zeros(sd), HuggingFaceStorageReader(str(tmp_path)))
    message = str(raised_error(info.value))
    assert message.startswith(f"{path}: item 'model.embed.weight' (chunk at [0, 0]): checksum mismatch: its 8192 "
                              "stored bytes at offset ")
    assert message.endswith("(damaged checkpoint)")
    assert main(["verify", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"model.embed.weight: ValueError: {path}: item 'model.embed.weight' (chunk at [0, 0]): "
                          "checksum mismatch")
    assert out.endswith("FAILED: 1 of 10 entries could not be read\n")


def test_files_without_checksums_load_unchecked(tmp_path, capsys):
    sd = state()
    save_plain(sd, tmp_path / "model.safetensors")
    _flip_byte_of(tmp_path / "model.safetensors", "scale")
    target = zeros(sd)
    dcp_load(target, HuggingFaceStorageReader(str(tmp_path)))
    assert not torch.equal(target["scale"], sd["scale"])
    assert main(["verify", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.endswith(f"UNCHECKED: {len(sd)} of {len(sd)} entries carry no checksum; the other 0 verified\n")


def test_consolidate_the_shard_files_of_one_rank(tmp_path):
    sd = state()
    dcp_save(sd, HuggingFaceStorageWriter(str(tmp_path / "sharded"), fqn_to_index_mapping=MAPPING,
                                          save_distributed=True))
    assert sorted(os.listdir(tmp_path / "sharded")) == [f"shard-00001-{name}" for name in FILES]
    consolidate_safetensors_files(str(tmp_path / "sharded"), str(tmp_path / "out"), MAPPING, num_threads=2)
    assert sorted(os.listdir(tmp_path / "out")) == FILES + ["model.safetensors.index.json"]
    assert_state_equal(sd, file_tensors(tmp_path / "out", FILES))
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {name: FILES[MAPPING[name] - 1] for name in sorted(sd)}
    assert main(["verify", str(tmp_path / "out")]) == 0


def test_writer_with_consolidation_in_one_process(tmp_path):
    sd = state()
    dcp_save(sd, HuggingFaceStorageWriter(str(tmp_path), save_distributed=True, enable_consolidation=True))
    assert sorted(os.listdir(tmp_path)) == ["model-00001-of-00001.safetensors", "model.safetensors.index.json",
                                            "sharded"]
    assert os.listdir(tmp_path / "sharded") == ["shard-00001-model-00001-of-00001.safetensors"]
    assert_state_equal(sd, file_tensors(tmp_path, ["model-00001-of-00001.safetensors"]))


def test_upstream_consolidation_of_our_shard_files(tmp_path):
    try:
        from torch.distributed.checkpoint._consolidate_hf_safetensors import consolidate_safetensors_files as theirs
    except ImportError:
        pytest.skip("torch has no torch.distributed.checkpoint._consolidate_hf_safetensors (added in torch 2.9)")
    # Upstream's takes element sizes from torch.finfo (floats only) and writes a 0-d tensor as zeros.
    sd = {k: v for k, v in state().items() if v.is_floating_point() and v.dim() and v.numel()}
    mapping = {k: MAPPING[k] for k in sd}
    dcp_save(sd, HuggingFaceStorageWriter(str(tmp_path / "sharded"), fqn_to_index_mapping=mapping,
                                          save_distributed=True))
    (tmp_path / "out").mkdir()
    theirs(str(tmp_path / "sharded"), str(tmp_path / "out"), mapping)
    assert sorted(os.listdir(tmp_path / "out")) == ["model-00001-of-00001.safetensors", "model.safetensors.index.json"]
    assert_state_equal(sd, file_tensors(tmp_path / "out", ["model-00001-of-00001.safetensors"]))


def test_through_a_file_system_that_cannot_go_back(tmp_path):
    """An object store's file system (no local path, no listing): the files are streamed front to back, so their
    headers carry no checksums; the reader finds them through the index."""
    from fs_doubles import LocalFS

    class Writer(HuggingFaceStorageWriter):
        def __init__(self, path, **kwargs):
            super().__init__(path, **kwargs)
            self.fs = LocalFS()

    class Reader(HuggingFaceStorageReader):
        def __init__(self, path):
            super().__init__(path)
            self.fs = LocalFS()

    sd = state()
    dcp_save(sd, Writer(str(tmp_path), fqn_to_index_mapping=MAPPING))
    assert sorted(os.listdir(tmp_path)) == FILES + ["model.safetensors.index.json"]
    assert "DCP_CRC32" not in header_of(tmp_path / FILES[0])[0]["__metadata__"]
    target = zeros(sd)
    dcp_load(target, Reader(str(tmp_path)))
    assert_state_equal(sd, target)


def test_inspect_a_hugging_face_directory(tmp_path, capsys):
    dcp_save(state(), HuggingFaceStorageWriter(str(tmp_path), fqn_to_index_mapping=MAPPING))
    assert main(["inspect", "--json", str(tmp_path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "safetensors" and sorted(info["files"]) == FILES
    assert {e["fqn"]: e["shape"] for e in info["entries"]} == {k: list(v.shape) for k, v in state().items()}


def _read_rows(directory, fqn, begin, end):
    """Rows [begin, end) of a 2-D tensor of a Hugging Face directory, read as a resharded load reads them; the
    bytes the reader's read() calls returned (/proc/self/io rchar)."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    from dcp_filesystem._hf_export import _RegionPlanner

    reader = HuggingFaceStorageReader(str(directory))
    metadata = reader.read_metadata()
    reader.set_up_storage_reader(metadata, True)
    tensor = metadata.state_dict_metadata[fqn]
    offsets, sizes = (begin, 0), (end - begin, tensor.size[1])
    items = create_read_items_for_chunk_list(
        fqn, tensor, [ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))])
    target = torch.zeros(sizes, dtype=tensor.properties.dtype)
    before = _rchar()
    reader.read_data(LoadPlan(items), _RegionPlanner({(fqn, offsets): target})).wait()
    return target, _rchar() - before


def _rchar():
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


@pytest.mark.parametrize("how", ["writer", "export"])
def test_block_checksums_let_a_load_read_part_of_a_tensor(tmp_path, how):
    big = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(5))  # 4 MiB: 16 blocks of 256 KiB
    sd = {"big": big, "small": torch.arange(3.0)}
    if how == "writer":
        dcp_save(sd, HuggingFaceStorageWriter(str(tmp_path / "hf")))
    else:
        from dcp_filesystem import FileSystemWriter

        dcp_save(sd, FileSystemWriter(str(tmp_path / "ckpt")))
        assert main(["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--no-sync"]) == 0
    path = tmp_path / "hf" / "model-00001-of-00001.safetensors"
    header, data_start = header_of(path)
    blocks = json.loads(header["__metadata__"]["DCP_CRC32_BLOCKS"])
    assert blocks["block_bytes"] == 256 << 10 and list(blocks["entries"]) == ["big"]  # "small" is one block
    raw = path.read_bytes()
    begin, end = header["big"]["data_offsets"]
    entry = raw[data_start + begin : data_start + end]
    assert blocks["entries"]["big"] == "".join(f"{zlib.crc32(entry[i : i + (256 << 10)]):08x}"
                                               for i in range(0, len(entry), 256 << 10))

    part, nbytes = _read_rows(tmp_path / "hf", "big", 512, 1024)
    assert torch.equal(part, big[512:])
    assert nbytes < 1.05 * big[512:].nbytes  # the rows asked for, in whole checked blocks: not the whole tensor

    with open(path, "r+b") as f:  # damage a byte of the first half: the second half still loads
        f.seek(data_start + begin + 300_000)
        byte = f.read(1)
        f.seek(data_start + begin + 300_000)
        f.write(bytes([byte[0] ^ 1]))
    assert torch.equal(_read_rows(tmp_path / "hf", "big", 512, 1024)[0], big[512:])
    with pytest.raises(ValueError) as info:
        _read_rows(tmp_path / "hf", "big", 0, 512)
    assert str(info.value).startswith(f"{path}: item 'big' (chunk at [0, 0]): checksum mismatch in block 1 of its "
                                      f"tensor (bytes [{data_start + begin + (256 << 10)}, ")

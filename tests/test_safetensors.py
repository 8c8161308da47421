"""SAFETENSORS format: round trips, valid files, stock-torch checkpoints, errors."""
import dataclasses
import json
import os
import re
import struct

import pytest
import torch
from helpers import assert_state_equal, dcp_load, dcp_save, run_clean_python, zeros_like_state
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    ReadItem,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)

from dcp_filesystem import FileSystemReader, FileSystemWriter, SerializationFormat, _compat
from dcp_filesystem._safetensors import DTYPES as SAFETENSORS_DTYPES

SAFETENSORS = SerializationFormat.SAFETENSORS
safetensors = pytest.importorskip("safetensors")


def random_tensor(dtype, shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    numel = 1
    for s in shape:
        numel *= s
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


def save(tmp_path, state_dict, **kwargs):
    path = tmp_path / "ckpt"
    dcp_save(state_dict, FileSystemWriter(path, serialization_format=SAFETENSORS, **kwargs))
    return path


def load(path, like):
    out = zeros_like_state(like)
    for k, v in like.items():
        if not isinstance(v, (torch.Tensor, dict, list)):
            out[k] = v  # non-tensors are replaced by what was saved
    dcp_load(out, FileSystemReader(path))
    return out


def data_files(path):
    return sorted(p for p in os.listdir(path) if p.endswith(".distcp"))


def assert_valid_safetensors(path, expected_by_key):
    """Every data file opens with safe_open; each key's tensor equals the expected one."""
    from safetensors import safe_open

    seen = {}
    for name in data_files(path):
        with safe_open(os.path.join(path, name), framework="pt") as f:
            meta = f.metadata()
            assert meta["format"] == "pt" and meta["DCP_VERSION"] == "1.0"
            sharding = json.loads(meta["DCP_SHARDING_INFO"])
            byte_keys = set(json.loads(meta.get("DCP_BYTE_IO", "[]")))
            for key in f.keys():
                seen[key] = f.get_tensor(key)
                assert (key in byte_keys) != (key in sharding), key
    assert set(seen) == set(expected_by_key)
    for key, expected in expected_by_key.items():
        if expected is not None:
            assert_state_equal(expected, seen[key], key)
    return seen


def safetensors_library_knows(dtype_name, tmp_path):
    """Whether this safetensors library's safe_open reads the dtype (0.7.0, what Python 3.9 gets,
    lacks F8_E4M3FNUZ and F8_E5M2FNUZ)."""
    from safetensors import safe_open

    size = torch.empty((), dtype=SAFETENSORS_DTYPES[dtype_name]).element_size()
    header = json.dumps({"t": {"dtype": dtype_name, "shape": [1], "data_offsets": [0, size]}}).encode()
    probe = tmp_path / "probe.safetensors"
    probe.write_bytes(len(header).to_bytes(8, "little") + header + bytes(size))
    try:
        with safe_open(str(probe), framework="pt") as f:
            f.keys()
    except Exception as e:  # the library's own error type differs between versions
        assert dtype_name in str(e) or "variant" in str(e), e
        return False
    return True


@pytest.mark.parametrize("name", sorted(SAFETENSORS_DTYPES))
def test_every_safetensors_dtype_round_trips_bit_exact(tmp_path, name):
    dtype = SAFETENSORS_DTYPES[name]
    state = {"t": random_tensor(dtype, (3, 5), seed=1), "scalar": random_tensor(dtype, (), seed=2)}
    path = save(tmp_path, state)
    assert_state_equal(state, load(path, state))
    if safetensors_library_knows(name, tmp_path):
        assert_valid_safetensors(path, state)
    else:  # the only dtypes an older library is known to lack
        assert name in ("F8_E4M3FNUZ", "F8_E5M2FNUZ"), name


@pytest.mark.parametrize("numel", [0, 1, 257, 1 << 20])
def test_sizes_from_zero_bytes(tmp_path, numel):
    state = {"t": random_tensor(torch.float32, (numel,)), "u": random_tensor(torch.uint8, (numel,))}
    path = save(tmp_path, state)
    assert_state_equal(state, load(path, state))
    assert_valid_safetensors(path, state)


def test_hundreds_of_mib(tmp_path):
    big = random_tensor(torch.bfloat16, (160, 1 << 20))  # 320 MiB
    state = {"big": big, "small": torch.arange(7)}
    path = save(tmp_path, state, sync_files=False)
    assert_state_equal(state, load(path, state))
    (name,) = data_files(path)
    header_len = struct.unpack("<Q", (path / name).read_bytes()[:8])[0]
    assert os.path.getsize(path / name) == 8 + header_len + big.numel() * 2 + 7 * 8


def test_views_and_non_contiguous(tmp_path):
    base = random_tensor(torch.float32, (64, 64))
    state = {
        "transposed": base.t(),
        "strided": base[::3, 1::2],
        "slice": base[10:12],
        "expanded": torch.arange(4.0).expand(3, 4),
        "shared_a": base[0],
        "shared_b": base[0, :5],
    }
    path = save(tmp_path, state)
    assert_state_equal(state, load(path, state))
    expected = {k: v.contiguous() for k, v in state.items()}
    assert_valid_safetensors(path, expected)
    # Each view is written as its own bytes, never its base: the files hold headers plus exactly those.
    headers = sum(8 + struct.unpack("<Q", (path / n).read_bytes()[:8])[0] for n in data_files(path))
    payload = sum(v.numel() * v.element_size() for v in state.values())
    assert sum(os.path.getsize(path / n) for n in data_files(path)) == headers + payload


@pytest.mark.parametrize("thread_count", [1, 2, 4])
@pytest.mark.parametrize("single_file_per_rank", [True, False])
def test_byte_io_mixed_in_threads_and_files(tmp_path, thread_count, single_file_per_rank):
    state = {
        "w": random_tensor(torch.float16, (33, 7)),
        "b": random_tensor(torch.int64, (5,)),
        "step": 1234,
        "config": {"lr": 0.1, "name": "adamw"},
        "nested": {"m": [random_tensor(torch.float32, (4,)), "tag"]},
    }
    path = save(tmp_path, state, thread_count=thread_count, single_file_per_rank=single_file_per_rank)
    out = load(path, state)
    assert_state_equal(state, out)
    # torch >= 2.2 flattens nested containers into dotted keys; 2.1 pickles them whole.
    md = FileSystemReader(path).read_metadata()
    assert set(data_files(path)) == {info.relative_path for info in md.storage_data.values()}
    n_files = len(data_files(path))
    assert (1 <= n_files <= thread_count) if single_file_per_rank else (n_files == len(md.storage_data))
    expected = {}
    for fqn, entry in md.state_dict_metadata.items():
        value = state
        for part in fqn.split("."):
            value = value[int(part)] if isinstance(value, list) else value[part]
        expected[fqn] = value if hasattr(entry, "chunks") else None
    assert "w" in expected and "step" in expected
    seen = assert_valid_safetensors(path, expected)
    # Non-tensor values are U8 entries holding exactly the bytes DCP pickled.
    assert seen["step"].dtype == torch.uint8
    assert torch.load(__import__("io").BytesIO(bytes(seen["step"].tolist())), weights_only=False) == 1234


class TwoChunkPlanner(DefaultSavePlanner):
    """Saves tensor 'w' as two row chunks held by this one rank."""

    def create_local_plan(self):
        plan = super().create_local_plan()
        w = self.state_dict["w"]
        items = [i for i in plan.items if i.index.fqn != "w"]
        for start, rows in ((0, 3), (3, w.size(0) - 3)):
            items.append(
                WriteItem(
                    index=MetadataIndex("w", torch.Size([start, 0])),
                    type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(
                        chunk=ChunkStorageMetadata(offsets=torch.Size([start, 0]), sizes=torch.Size([rows, w.size(1)])),
                        properties=TensorProperties.create_from_tensor(w),
                        size=w.size(),
                    ),
                )
            )
        self.plan = dataclasses.replace(plan, items=items)
        return self.plan

    def resolve_data(self, write_item):
        if write_item.index.fqn == "w":
            chunk = write_item.tensor_data.chunk
            return self.state_dict["w"].narrow(0, chunk.offsets[0], chunk.sizes[0])
        return super().resolve_data(write_item)


def test_two_chunks_of_one_tensor_on_one_rank_keep_both(tmp_path):
    state = {"w": random_tensor(torch.float32, (8, 5)), "x": torch.ones(2)}
    path = tmp_path / "ckpt"
    dcp_save(state, FileSystemWriter(path, serialization_format=SAFETENSORS), planner=TwoChunkPlanner())
    assert_state_equal(state, load(path, state))
    assert_valid_safetensors(path, {"w@0,0": state["w"][:3], "w@3,0": state["w"][3:], "x": state["x"]})


class _Collect:
    """The LoadPlanner calls a StorageReader makes, recorded."""

    def __init__(self, dest):
        self.dest = dest
        self.committed = []

    def resolve_tensor(self, req):
        return self.dest

    def commit_tensor(self, req, tensor):
        self.committed.append(req.storage_index.fqn)


def test_reading_a_slice_of_a_saved_chunk(tmp_path):
    w = random_tensor(torch.float32, (6, 8))
    path = save(tmp_path, {"w": w})
    reader = FileSystemReader(path)
    reader.set_up_storage_reader(reader.read_metadata(), True)
    dest = torch.zeros(2, 3)
    req = ReadItem(
        type=LoadItemType.TENSOR,
        dest_index=MetadataIndex("w", torch.Size([0, 0])),
        dest_offsets=torch.Size([0, 0]),
        storage_index=MetadataIndex("w", torch.Size([0, 0])),
        storage_offsets=torch.Size([1, 4]),
        lengths=torch.Size([2, 3]),
    )
    planner = _Collect(dest)
    reader.read_data(LoadPlan([req]), planner).wait()
    assert planner.committed == ["w"]
    assert torch.equal(dest, w[1:3, 4:7])


@pytest.mark.parametrize("dtype", [torch.complex128, torch.quint8])
def test_unsupported_dtype_raises_before_any_file(tmp_path, dtype):
    if dtype == torch.quint8:
        bad = torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.quint8)
    else:
        bad = torch.ones(3, dtype=dtype)
    path = tmp_path / "ckpt"
    message = f"SAFETENSORS format cannot store 'layer.bad': dtype {dtype} has no safetensors name"
    plan = SavePlan([WriteItem(index=MetadataIndex("layer.bad"), type=WriteItemType.TENSOR, tensor_data=TensorWriteData(
        chunk=ChunkStorageMetadata(offsets=torch.Size([0]), sizes=bad.size()),
        properties=TensorProperties.create_from_tensor(bad), size=bad.size()))])
    with pytest.raises(ValueError, match=re.escape(message)):
        FileSystemWriter(path, serialization_format=SAFETENSORS).prepare_local_plan(plan)
    # Through dcp.save, torch wraps it in CheckpointException (a BaseException), message intact.
    with pytest.raises(BaseException, match=re.escape(message)):
        dcp_save({"ok": torch.ones(2), "layer.bad": bad}, FileSystemWriter(path, serialization_format=SAFETENSORS))
    assert not path.exists()


def test_safetensors_package_is_never_imported(tmp_path):
    out = run_clean_python(
        f"""
        import sys
        sys.modules["safetensors"] = None  # any import of it now fails
        sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        import torch
        from helpers import dcp_save, dcp_load
        from dcp_filesystem import FileSystemWriter, FileSystemReader, SerializationFormat
        state = {{"w": torch.arange(12.0).reshape(3, 4), "step": 3}}
        dcp_save(state, FileSystemWriter({str(tmp_path / 'c')!r}, serialization_format=SerializationFormat.SAFETENSORS))
        out = {{"w": torch.zeros(3, 4), "step": 0}}
        dcp_load(out, FileSystemReader({str(tmp_path / 'c')!r}))
        assert torch.equal(out["w"], state["w"]) and out["step"] == 3
        print("ok")
        """,
        cwd=str(tmp_path),
    )
    assert out.strip() == "ok"


stock_format = _compat.TorchSerializationFormat


@pytest.mark.skipif(stock_format is None, reason="this torch's FileSystemWriter has no SAFETENSORS format")
@pytest.mark.parametrize("with_bytes", [False, True])
def test_reads_stock_torch_safetensors_checkpoints(tmp_path, with_bytes):
    pytest.importorskip("numpy", reason="stock torch's SAFETENSORS writer needs numpy")
    from torch.distributed.checkpoint import FileSystemWriter as StockWriter

    state = {"a": random_tensor(torch.float32, (4, 4)), "b": random_tensor(torch.bfloat16, (9,), seed=3)}
    if with_bytes:
        state["step"] = 42
    path = tmp_path / "stock"
    dcp_save(state, StockWriter(path, serialization_format=stock_format.SAFETENSORS))
    assert_state_equal(state, load(path, state))


def test_torch_consolidation_turns_ours_into_hf_files(tmp_path):
    consolidate = pytest.importorskip("torch.distributed.checkpoint._consolidate_hf_safetensors")
    pytest.importorskip("numpy", reason="torch's consolidation imports safetensors.torch, which needs numpy")
    state = {"embed": random_tensor(torch.float32, (6, 4)), "head": random_tensor(torch.bfloat16, (3,), seed=5)}
    path = save(tmp_path, state, thread_count=2)
    hf_in, hf_out = tmp_path / "in", tmp_path / "out"
    hf_in.mkdir()
    hf_out.mkdir()
    for i, name in enumerate(data_files(path)):
        os.symlink(path / name, hf_in / f"shard-{i}.safetensors")
    consolidate.consolidate_safetensors_files(str(hf_in), str(hf_out), {"embed": 1, "head": 1})
    from safetensors.torch import load_file

    (out_file,) = [p for p in os.listdir(hf_out) if p.endswith(".safetensors")]
    assert_state_equal(state, load_file(str(hf_out / out_file)))

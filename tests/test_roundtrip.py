"""Round trips through the running torch's DCP with dcp_filesystem's writer and reader."""
from __future__ import annotations

import os
import pickle

import pytest
import torch
from helpers import assert_state_equal, contiguous_state, dcp_load, dcp_save, zeros_like_state

from dcp_filesystem import FileSystemReader, FileSystemWriter, SerializationFormat
from dcp_filesystem.transforms import ZStandard

MODES = ["torch_save", "safetensors", "zstd"]


def _writer(path, mode, **kwargs):
    if mode == "torch_save":
        return FileSystemWriter(path, serialization_format=SerializationFormat.TORCH_SAVE, **kwargs)
    if mode == "safetensors":
        return FileSystemWriter(path, serialization_format=SerializationFormat.SAFETENSORS, **kwargs)
    if mode == "zstd":
        return FileSystemWriter(
            path, serialization_format=SerializationFormat.TORCH_SAVE, _extensions=[ZStandard()], **kwargs
        )
    raise AssertionError(mode)


def _data_files(path):
    return sorted(f for f in os.listdir(path) if f.endswith(".distcp"))


def _metadata(path):
    with open(os.path.join(str(path), ".metadata"), "rb") as f:
        return pickle.load(f)


def _rich_state():
    g = torch.Generator().manual_seed(1234)
    f32 = torch.randn(7, 5, generator=g)
    f32[0, 0] = float("nan")
    f32[0, 1] = float("inf")
    f32[0, 2] = float("-inf")
    f32[0, 3] = -0.0
    base = torch.arange(60, dtype=torch.float64).reshape(6, 10)
    return {
        "f32": f32,
        "f64": torch.randn(3, 3, generator=g, dtype=torch.float64),
        "f16": torch.randn(4, 6, generator=g).to(torch.float16),
        "bf16": torch.randn(4, 6, generator=g).to(torch.bfloat16),
        "i8": torch.randint(-128, 128, (17,), generator=g, dtype=torch.int8),
        "i16": torch.randint(-(2**15), 2**15, (5, 3), generator=g, dtype=torch.int16),
        "i32": torch.randint(-(2**31), 2**31 - 1, (9,), generator=g, dtype=torch.int32),
        "i64": torch.tensor([-(2**63), 2**63 - 1, 0, 1, -1], dtype=torch.int64),
        "u8": torch.randint(0, 256, (2, 2, 3), generator=g, dtype=torch.uint8),
        "bool": torch.randint(0, 2, (11,), generator=g).bool(),
        "scalar": torch.tensor(2.5, dtype=torch.float32),
        "scalar_i": torch.tensor(-7, dtype=torch.int64),
        "empty": torch.empty(0, 3),
        "empty_i": torch.empty(4, 0, dtype=torch.int32),
        "transposed": base.t(),
        "strided": base[:, ::3],
        "nested": {
            "a": torch.randn(3, generator=g),
            "list": [torch.arange(4, dtype=torch.int16), {"deep": torch.randn(2, 2, generator=g)}],
        },
        "step": 12345,
        "name": "adamw-β",
        "cfg": {"lr": 0.001, "betas": "0.9,0.999"},
    }


def _count_leaves(state):
    if isinstance(state, dict):
        return sum(_count_leaves(v) for v in state.values())
    if isinstance(state, list):
        return sum(_count_leaves(v) for v in state)
    return 1


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("single_file_per_rank", [True, False])
@pytest.mark.parametrize("thread_count", [1, 2, 4])
def test_roundtrip_all_kinds(tmp_path, thread_count, single_file_per_rank, mode):
    state = _rich_state()
    expected = contiguous_state(_rich_state())
    assert not state["transposed"].is_contiguous() and not state["strided"].is_contiguous()
    path = tmp_path / "ckpt"
    dcp_save(state, _writer(path, mode, thread_count=thread_count, single_file_per_rank=single_file_per_rank))

    # The saved state dict is not modified by saving.
    assert_state_equal(expected, contiguous_state(state))

    target = zeros_like_state(state)
    dcp_load(target, FileSystemReader(path, thread_count=thread_count))
    assert_state_equal(expected, contiguous_state(target))
    assert target["step"] == 12345 and type(target["step"]) is int
    assert target["name"] == "adamw-β"
    assert target["cfg"] == {"lr": 0.001, "betas": "0.9,0.999"}

    files = _data_files(path)
    md = _metadata(path)
    referenced = sorted({info.relative_path for info in md.storage_data.values()})
    assert referenced == files
    if single_file_per_rank:
        assert files == sorted(f"__0_{i}.distcp" for i in range(thread_count))
    else:
        # One file per item: one item per state_dict_metadata entry (no sharding here).
        n_items = len(md.state_dict_metadata)
        assert n_items == len(md.storage_data)
        assert n_items >= _count_leaves(state) - 1  # torch 2.1 keeps the non-tensor dict "cfg" as one item
        assert files == sorted(f"__0_{i}.distcp" for i in range(n_items))
    assert os.path.isfile(path / ".metadata")
    assert not [f for f in os.listdir(path) if f.endswith(".tmp")]

    descriptors = {tuple(getattr(info, "transform_descriptors", None) or ()) for info in md.storage_data.values()}
    assert descriptors == ({("stream.zstd/1",)} if mode == "zstd" else {()})


@pytest.mark.parametrize("mode", MODES)
def test_safetensors_data_file_is_valid(tmp_path, mode):
    """SAFETENSORS data files open with safetensors itself; other modes are not safetensors files."""
    safetensors = pytest.importorskip("safetensors")
    state = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.tensor([1, 2], dtype=torch.int8)}
    path = tmp_path / "ckpt"
    dcp_save(state, _writer(path, mode))
    (data_file,) = _data_files(path)
    if mode != "safetensors":
        with open(path / data_file, "rb") as f:
            head = f.read(4)
        assert head == (b"PK\x03\x04" if mode == "torch_save" else b"\x28\xb5\x2f\xfd")  # zip / zstd frame
        return
    with safetensors.safe_open(str(path / data_file), framework="pt") as f:
        assert sorted(f.keys()) == ["b", "w"]
        for key in ("w", "b"):
            got = f.get_tensor(key)
            assert got.dtype == state[key].dtype and torch.equal(got, state[key])
        meta = f.metadata()
    assert meta["format"] == "pt" and "DCP_SHARDING_INFO" in meta and "DCP_VERSION" in meta


@pytest.mark.parametrize("mode", MODES)
def test_view_of_large_base_is_not_bloated(tmp_path, mode):
    base = torch.arange(1_000_000, dtype=torch.float32)  # 4 MB of incompressible-ish values
    state = {"slice": base[1000:1010], "strided": base[::100_000], "row": base.view(1000, 1000)[7]}
    expected = {k: v.clone() for k, v in state.items()}
    path = tmp_path / "ckpt"
    dcp_save(state, _writer(path, mode))
    (data_file,) = _data_files(path)
    size = os.path.getsize(path / data_file)
    assert size < 64 * 1024, f"data file is {size} bytes: the 4 MB base was saved"
    assert size < base.numel() * base.element_size() // 50
    target = zeros_like_state(state)
    dcp_load(target, FileSystemReader(path))
    assert_state_equal(expected, target)


@pytest.mark.parametrize("mode", MODES)
def test_tensors_sharing_storage(tmp_path, mode):
    a = torch.arange(20, dtype=torch.int32)
    state = {"a": a, "head": a[:5], "tail": a[15:], "matrix": a.view(4, 5), "evens": a[::2]}
    expected = contiguous_state({k: v.clone() for k, v in state.items()})
    path = tmp_path / "ckpt"
    dcp_save(state, _writer(path, mode, thread_count=2))
    target = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in state.items()}
    dcp_load(target, FileSystemReader(path))
    assert_state_equal(expected, target)
    # Loading into views of one shared buffer writes through to it.
    buf = torch.full((20,), -1, dtype=torch.int32)
    shared_target = {"a": buf, "head": buf[:5], "tail": buf[15:], "matrix": buf.view(4, 5), "evens": buf[::2]}
    dcp_load(shared_target, FileSystemReader(path))
    assert torch.equal(buf, a)


@pytest.mark.parametrize("thread_count", [1, 2, 4])
def test_zstd_is_smaller_and_records_descriptor(tmp_path, thread_count):
    state = {
        "zeros": torch.zeros(64, 1024),
        "ramp": torch.arange(65536, dtype=torch.int32) % 7,
        "ones": torch.ones(128, 128, dtype=torch.float16),
        "meta": {"epoch": 3},
    }
    plain, packed = tmp_path / "plain", tmp_path / "zstd"
    dcp_save(state, _writer(plain, "torch_save", thread_count=thread_count))
    dcp_save(state, _writer(packed, "zstd", thread_count=thread_count))

    def total(p):
        return sum(os.path.getsize(p / f) for f in _data_files(p))

    # Three tensors: at most three non-empty buckets, whatever the thread count.
    assert _data_files(plain) == _data_files(packed) == [f"__0_{i}.distcp" for i in range(min(thread_count, 3))]
    assert total(packed) * 10 < total(plain), (total(packed), total(plain))

    md = _metadata(packed)
    assert len(md.storage_data) == 4
    for info in md.storage_data.values():
        assert list(info.transform_descriptors) == ["stream.zstd/1"]
    for info in _metadata(plain).storage_data.values():
        assert getattr(info, "transform_descriptors", None) is None
        assert "transform_descriptors" not in vars(info)

    for p in (plain, packed):
        target = zeros_like_state(state)
        dcp_load(target, FileSystemReader(p))
        tensors_only = {k: v for k, v in state.items() if k != "meta"}
        assert_state_equal(tensors_only, {k: v for k, v in target.items() if k != "meta"})
        assert target["meta"] == {"epoch": 3}


def test_safetensors_with_extensions_raises():
    with pytest.raises(ValueError, match="_extensions cannot be combined with SerializationFormat.SAFETENSORS"):
        FileSystemWriter("unused", serialization_format=SerializationFormat.SAFETENSORS, _extensions=[ZStandard()])
    # An empty extension list is no extension at all.
    w = FileSystemWriter("unused", serialization_format=SerializationFormat.SAFETENSORS, _extensions=[])
    assert w.serialization_format is SerializationFormat.SAFETENSORS


@pytest.mark.parametrize("bad", [0, -1])
def test_thread_count_must_be_positive(bad, tmp_path):
    with pytest.raises(ValueError, match="thread_count must be a positive int"):
        FileSystemWriter(tmp_path / "ckpt", thread_count=bad)
    assert not (tmp_path / "ckpt").exists()


def test_overwrite_false_refuses_existing(tmp_path):
    state = {"x": torch.arange(3)}
    path = tmp_path / "ckpt"
    dcp_save(state, FileSystemWriter(path))
    with pytest.raises(BaseException) as info:  # CheckpointException derives from BaseException
        dcp_save({"x": torch.arange(3) + 1}, FileSystemWriter(path, overwrite=False))
    assert "Checkpoint already exists" in str(info.value)
    target = {"x": torch.zeros(3, dtype=torch.int64)}
    dcp_load(target, FileSystemReader(path))
    assert torch.equal(target["x"], torch.arange(3))


def test_overwrite_replaces_and_leaves_no_stale_files(tmp_path):
    path = tmp_path / "ckpt"
    dcp_save({"x": torch.arange(3), "y": torch.ones(2)}, FileSystemWriter(path, single_file_per_rank=False))
    dcp_save({"x": torch.arange(3) * 5}, FileSystemWriter(path, single_file_per_rank=True))
    md = _metadata(path)
    assert _data_files(path) == sorted({i.relative_path for i in md.storage_data.values()})
    target = {"x": torch.zeros(3, dtype=torch.int64)}
    dcp_load(target, FileSystemReader(path))
    assert torch.equal(target["x"], torch.arange(3) * 5)


class _CountingWrites:
    """A stream that counts the writes it is given."""

    def __init__(self, stream, counts):
        self.stream, self.counts = stream, counts

    def write(self, data):
        self.counts.append(len(memoryview(data).cast("B")))
        return self.stream.write(data)

    def __getattr__(self, name):
        return getattr(self.stream, name)


@pytest.mark.parametrize("mode", MODES)
def test_small_items_reach_the_file_in_few_writes(tmp_path, mode, monkeypatch):
    from contextlib import contextmanager

    from dcp_filesystem import fs as fs_module

    writes = []
    real_create = fs_module.FileSystem.create_stream

    @contextmanager
    def counting_create(self, path, open_mode):
        with real_create(self, path, open_mode) as stream:
            yield _CountingWrites(stream, writes) if "w" in open_mode and str(path).endswith(".distcp") else stream

    monkeypatch.setattr(fs_module.FileSystem, "create_stream", counting_create)
    g = torch.Generator().manual_seed(3)
    state = {f"n.{i}": torch.randn(64, generator=g) for i in range(300)}
    state.update(big=torch.randn(1 << 19, generator=g), step=4)  # 2 MiB, written on its own
    dcp_save(state, _writer(tmp_path, mode, sync_files=False))
    monkeypatch.undo()
    target = zeros_like_state(state)
    dcp_load(target, FileSystemReader(tmp_path))  # every item checked against its CRC-32
    assert_state_equal(state, target)
    if mode == "zstd":  # each item's transform flushes its own bytes
        assert len(writes) >= 300
    else:
        # 300 small items (and the header): gathered, then the large one on its own
        assert len(writes) <= 4, writes

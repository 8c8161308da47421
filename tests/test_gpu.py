"""Device state dicts through FileSystemWriter/FileSystemReader, bit-exact.

Every test body runs on "cpu" (``make test``) and on "cuda" (marker gpu, ``make test-gpu``); the cuda
params are collected everywhere and skipped where torch has no CUDA device.
"""
from __future__ import annotations

import io
import os
import shutil
import threading

import pytest
import torch
from helpers import assert_state_equal, dcp_load, dcp_save, zeros_like_state
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

import dcp_filesystem._save_files
from dcp_filesystem import FileSystemReader, FileSystemWriter, SerializationFormat, _compat, _device_reads
from dcp_filesystem.loaders import _OverlappingCpuLoader, _SerialCpuLoader

_NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch with CUDA)")
CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, _NEEDS_CUDA], id="cuda")
DEVICES = [pytest.param("cpu", id="cpu"), CUDA]
FORMATS = [
    pytest.param(SerializationFormat.TORCH_SAVE, id="torch_save"),
    pytest.param(SerializationFormat.SAFETENSORS, id="safetensors"),
]
DEFAULT_COPY_AHEAD = 10_000_000
MiB = 1 << 20


@pytest.fixture
def made_loaders(monkeypatch):
    """(loader, stream passed in, thread id) for every loader the writer makes."""
    made = []
    make_loader = dcp_filesystem._save_files._make_loader

    def spy(planner, inflight_threshhold, stream):
        loader = make_loader(planner, inflight_threshhold, stream)
        made.append((loader, stream, threading.get_ident()))
        return loader

    monkeypatch.setattr(dcp_filesystem._save_files, "_make_loader", spy)
    return made


def _state(device):
    """Every dtype asked for, views sharing storage, 0-d and empty tensors, nested dicts, non-tensors."""
    g = torch.Generator().manual_seed(2024)
    f32 = torch.randn(33, 17, generator=g)
    f32[0, :4] = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0])
    base = torch.randn(6, 10, generator=g).to(device)
    shared = torch.randint(-(2**62), 2**62, (8, 12), generator=g, dtype=torch.int64).to(device)
    return {
        "f32": f32.to(device),
        "bf16": torch.randn(5, 7, generator=g).to(torch.bfloat16).to(device),
        "f16": torch.randn(129, generator=g).to(torch.float16).to(device),
        "i64": torch.tensor([-(2**63), 2**63 - 1, 0, -1], dtype=torch.int64).to(device),
        "bool": (torch.rand(3, 11, generator=g) > 0.5).to(device),
        "transposed": base.t(),
        "strided": base[1::2, ::3],
        "shared": shared,
        "shared_view": shared[2:5, 4:],
        "scalar": torch.tensor(-2.75).to(device),
        "scalar_i": torch.tensor(-7, dtype=torch.int64).to(device),
        "empty": torch.empty(0, 3).to(device),
        "empty_bf16": torch.empty(4, 0, dtype=torch.bfloat16).to(device),
        "nested": {
            "m": torch.randn(4, 4, generator=g).to(torch.bfloat16).to(device),
            "deeper": {"mask": torch.tensor([True, False, True]).to(device), "lr": 0.001},
        },
        "step": 12345,
        "name": "adamw",
    }


def _tensors(state, prefix=""):
    """(dotted name, tensor) for every tensor of a nested state dict."""
    for k, v in state.items():
        if isinstance(v, dict):
            yield from _tensors(v, f"{prefix}{k}.")
        elif isinstance(v, torch.Tensor):
            yield f"{prefix}{k}", v


def _zeros_on_cpu(state):
    """zeros_like_state, with every tensor on CPU (layout kept where torch keeps it)."""
    if isinstance(state, torch.Tensor):
        return torch.zeros_like(state, device="cpu")
    if isinstance(state, dict):
        return {k: _zeros_on_cpu(v) for k, v in state.items()}
    return None


def _data_files(path):
    return sorted(f for f in os.listdir(path) if f.endswith(".distcp"))


def _expected_loader(device, copy_ahead):
    if copy_ahead == 0:
        return _SerialCpuLoader
    if device == "cuda" or torch.cuda.is_available():
        return _OverlappingCpuLoader
    return _SerialCpuLoader  # CPU-only torch: no device copies to overlap


def _assert_loaders(made, device, threads, copy_ahead):
    """One loader per data file, of the expected class; overlapping ones on their thread's own stream."""
    assert len(made) == threads  # single_file_per_rank: one data file per thread, one loader per file
    cls = _expected_loader(device, copy_ahead)
    assert [type(loader) for loader, _, _ in made] == [cls] * threads
    if cls is _SerialCpuLoader:
        return
    current = torch.cuda.current_stream()
    if threads == 1:
        ((loader, stream, _),) = made
        assert stream is None and loader.stream == current
        return
    stream_of_thread = {}
    for loader, stream, thread in made:
        assert stream is not None and loader.stream is stream and stream != current
        assert stream_of_thread.setdefault(thread, stream) is stream  # a thread keeps its stream
    streams = list(stream_of_thread.values())
    assert all(a != b for i, a in enumerate(streams) for b in streams[i + 1 :])


def _assert_stored_compactly(path, fmt):
    """Each stored tensor holds exactly its own bytes: a view is never saved with the rest of its base."""
    reader = FileSystemReader(path)
    md = reader.read_metadata()
    checked = 0
    for index, info in md.storage_data.items():
        meta = md.state_dict_metadata[index.fqn]
        if not isinstance(meta, TensorStorageMetadata):
            continue
        numel = 1
        for s in meta.size:
            numel *= s
        nbytes = numel * torch.empty((), dtype=meta.properties.dtype).element_size()
        if fmt == SerializationFormat.SAFETENSORS:
            assert info.length == nbytes, index.fqn
        else:
            with open(os.path.join(str(path), info.relative_path), "rb") as f:
                f.seek(info.offset)
                stored = torch.load(io.BytesIO(f.read(info.length)), weights_only=True)
            assert stored.dtype == meta.properties.dtype and stored.shape == meta.size, index.fqn
            assert stored.untyped_storage().nbytes() == nbytes, index.fqn
        checked += 1
    return checked


def _roundtrip(state, expected, path, threads, fmt, copy_ahead=DEFAULT_COPY_AHEAD):
    """Save ``state``, check it is unchanged, load into same-device and into CPU tensors, bit-exact."""
    writer = FileSystemWriter(
        path, single_file_per_rank=True, thread_count=threads, per_thread_copy_ahead=copy_ahead,
        serialization_format=fmt,
    )
    dcp_save(state, writer)
    assert_state_equal(expected, state)  # saving does not touch the source
    assert _data_files(path) == [f"__0_{i}.distcp" for i in range(threads)]

    on_device = zeros_like_state(state)
    before = {name: (t.device, t.data_ptr(), t.stride()) for name, t in _tensors(on_device)}
    dcp_load(on_device, FileSystemReader(path, thread_count=threads))
    assert_state_equal(expected, on_device)
    # Loaded in place: the same device memory, layout kept.
    assert {name: (t.device, t.data_ptr(), t.stride()) for name, t in _tensors(on_device)} == before

    on_cpu = _zeros_on_cpu(state)
    dcp_load(on_cpu, FileSystemReader(path, thread_count=threads))
    assert all(t.device.type == "cpu" for _, t in _tensors(on_cpu))
    assert_state_equal(expected, on_cpu)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("device", DEVICES)
def test_roundtrip_every_kind(tmp_path, made_loaders, device, threads, fmt):
    state = _state(device)
    expected = _state("cpu")
    assert {t.device.type for _, t in _tensors(state)} == {device}
    assert not state["transposed"].is_contiguous() and not state["strided"].is_contiguous()
    assert not state["shared_view"].is_contiguous()
    assert state["shared_view"].untyped_storage().data_ptr() == state["shared"].untyped_storage().data_ptr()
    assert state["transposed"].untyped_storage().data_ptr() == state["strided"].untyped_storage().data_ptr()

    _roundtrip(state, expected, tmp_path / "ckpt", threads, fmt)
    _assert_loaders(made_loaders, device, threads, DEFAULT_COPY_AHEAD)
    assert _assert_stored_compactly(tmp_path / "ckpt", fmt) == len(list(_tensors(expected)))


@pytest.mark.parametrize("copy_ahead", [0, 64])
@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("device", DEVICES)
def test_copy_ahead_bound(tmp_path, made_loaders, device, threads, copy_ahead):
    """0 selects the serial loader; 64 bytes keeps the overlapping loader syncing between most tensors."""
    _roundtrip(_state(device), _state("cpu"), tmp_path / "ckpt", threads, SerializationFormat.TORCH_SAVE, copy_ahead)
    _assert_loaders(made_loaders, device, threads, copy_ahead)


def _large_state(device):
    """8 x 128 MiB (1 GiB): bf16 and float32, one of them a transposed view."""
    g = torch.Generator(device=device).manual_seed(11)
    state = {}
    for i in range(4):
        state[f"bf16_{i}"] = torch.randn(8192, 8192, generator=g, device=device).to(torch.bfloat16)
        state[f"f32_{i}"] = torch.randn(4096, 8192, generator=g, device=device)
    state["f32_3"] = state["f32_3"].t()
    return state


@pytest.mark.gpu
@_NEEDS_CUDA
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("threads", [1, 4])
def test_large_roundtrip_on_cuda(tmp_path, made_loaders, threads, fmt):
    state = _large_state("cuda")
    assert sum(t.numel() * t.element_size() for t in state.values()) == 1024 * MiB
    expected = {k: v.clone() for k, v in state.items()}
    path = tmp_path / "ckpt"
    _roundtrip(state, expected, path, threads, fmt)
    _assert_loaders(made_loaders, "cuda", threads, DEFAULT_COPY_AHEAD)
    assert _assert_stored_compactly(path, fmt) == 8
    shutil.rmtree(path)


# --------------------------------------------------------------------------- loads through pinned buffers


@pytest.fixture
def pinned_reads(monkeypatch):
    """Every pinned buffer allocated ((bytes, pinned?, thread)) and every read_into ((device, bytes)) of a load."""
    allocated, reads = [], []
    real_allocator = _compat.pinned_host_allocator

    def allocator(device_type):
        allocate = real_allocator(device_type)
        if allocate is None:
            return None

        def recording(nbytes):
            tensor = allocate(nbytes)
            allocated.append((nbytes, tensor.is_pinned(), threading.get_ident()))
            return tensor

        return recording

    real_read_into = _device_reads.DeviceReads.read_into

    def read_into(self, target, read, offset, nbytes, with_crc):
        reads.append((str(target.device), nbytes))
        return real_read_into(self, target, read, offset, nbytes, with_crc)

    monkeypatch.setattr(_compat, "pinned_host_allocator", allocator)
    monkeypatch.setattr(_device_reads.DeviceReads, "read_into", read_into)
    return allocated, reads


def _pinned_load_state(devices):
    """1 GiB and a little: bf16 and float32 tensors much larger than a pinned buffer, an odd size whose
    chunks do not line up with the buffers, a 0-d and an empty tensor; tensor i on devices[i % len]."""
    g = torch.Generator(device="cuda").manual_seed(19)
    state = {}
    for i in range(4):
        state[f"bf16_{i}"] = torch.randn(8192, 8192, generator=g, device="cuda").to(torch.bfloat16)
        state[f"f32_{i}"] = torch.randn(4096, 8192, generator=g, device="cuda")
    state["odd"] = torch.randn(1000 * 777 * 43 + 3, generator=g, device="cuda")
    state["scalar"] = torch.tensor(-2.75, device="cuda").to(torch.bfloat16)
    state["empty"] = torch.empty(0, 5, device="cuda")
    return {k: v.to(devices[i % len(devices)]) for i, (k, v) in enumerate(sorted(state.items()))}


def _pinned_load_targets(state):
    """Zeroed targets on each tensor's device; f32_1 a contiguous view at an offset into a larger base,
    bf16_1 a non-contiguous view (both bases are returned, to check what lies outside the view)."""
    targets = {k: torch.zeros_like(v) for k, v in state.items()}
    offset_base = torch.zeros(4096 + 5, 8192, device=state["f32_1"].device)
    targets["f32_1"] = offset_base.narrow(0, 3, 4096)
    strided_base = torch.zeros(8192, 8192 + 8, dtype=torch.bfloat16, device=state["bf16_1"].device)
    targets["bf16_1"] = strided_base.narrow(1, 4, 8192)
    assert targets["f32_1"].is_contiguous() and targets["f32_1"].storage_offset() == 3 * 8192
    assert not targets["bf16_1"].is_contiguous()
    return targets, offset_base, strided_base


def _check_pinned_load(tmp_path, pinned_reads, fmt, threads, devices):
    state = _pinned_load_state(devices)
    assert sum(t.numel() * t.element_size() for t in state.values()) >= 1024 * MiB
    path = tmp_path / "ckpt"
    dcp_save(state, FileSystemWriter(path, thread_count=threads, serialization_format=fmt))
    targets, offset_base, strided_base = _pinned_load_targets(state)
    before = {k: (t.device, t.data_ptr(), t.stride()) for k, t in targets.items()}
    dcp_load(targets, FileSystemReader(path, thread_count=threads))
    assert {k: (t.device, t.data_ptr(), t.stride()) for k, t in targets.items()} == before
    for k, v in state.items():
        assert targets[k].dtype == v.dtype and targets[k].shape == v.shape, k
        assert torch.equal(targets[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), k
    assert not offset_base[:3].any() and not offset_base[4099:].any()
    assert not strided_base[:, :4].any() and not strided_base[:, 8196:].any()
    allocated, reads = pinned_reads
    # Every tensor read in place went through pinned buffers: never more than two of 32 MiB per data file.
    assert allocated and all(a[:2] == (_device_reads._BUFFER_BYTES, True) for a in allocated)
    assert len(allocated) <= 2 * len(_data_files(path))
    big = {k for k, v in state.items() if v.numel() * v.element_size() >= MiB}
    expected = {(str(state[k].device), state[k].numel() * state[k].element_size()) for k in big}
    assert expected <= set(reads)
    shutil.rmtree(path)


@pytest.mark.gpu
@_NEEDS_CUDA
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("threads", [1, 4])
def test_pinned_load_on_cuda_bit_exact(tmp_path, pinned_reads, threads, fmt):
    _check_pinned_load(tmp_path, pinned_reads, fmt, threads, ["cuda:0"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("fmt", FORMATS)
def test_pinned_load_on_two_cuda_devices(tmp_path, pinned_reads, fmt):
    _check_pinned_load(tmp_path, pinned_reads, fmt, 2, ["cuda:0", "cuda:1"])

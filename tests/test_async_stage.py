"""FileSystemWriter as an AsyncStager: staging copies, and dcp.async_save where torch has it."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers import assert_state_equal, dcp_load, zeros_like_state

from dcp_filesystem import FileSystemReader, FileSystemWriter, SerializationFormat, _compat

# dcp.async_save stages through the writer (an AsyncStager) where torch has its own BlockingAsyncStager (2.4+;
# _compat stands one in before); torch 2.3 copies to CPU itself.
ASYNC_SAVE_STAGES_WITH_WRITER = _compat.BlockingAsyncStager.__module__ != _compat.__name__

try:
    from torch.distributed.checkpoint.staging import BlockingAsyncStager as TorchBlockingAsyncStager
except ImportError:
    TorchBlockingAsyncStager = None



def _state(scale=1):
    return {
        "w": torch.arange(20, dtype=torch.float32).reshape(4, 5) * scale,
        "nested": {
            "b": torch.arange(6, dtype=torch.int64) * scale,
            "list": [torch.arange(3, dtype=torch.float64) * scale, 7 * scale, "name"],
            "half": (torch.arange(4, dtype=torch.float32) * scale).to(torch.bfloat16),
        },
        "step": 100 * scale,
        "lr": 0.5 * scale,
    }


def _tensors(state):
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in _tensors(v)]
    if isinstance(state, list):
        return [t for v in state for t in _tensors(v)]
    return []


def _bump(state):
    for t in _tensors(state):
        t.add_(1)


def test_writer_is_torch_blocking_async_stager():
    if TorchBlockingAsyncStager is None:
        pytest.skip("this torch has no torch.distributed.checkpoint.staging.BlockingAsyncStager")
    writer = FileSystemWriter("unused")
    assert isinstance(writer, TorchBlockingAsyncStager)
    from torch.distributed.checkpoint.staging import AsyncStager

    assert isinstance(writer, AsyncStager)


def test_stage_returns_independent_cpu_copy(tmp_path):
    writer = FileSystemWriter(tmp_path / "ckpt", per_thread_copy_ahead=123_456)
    assert writer.per_thread_copy_ahead == 123_456
    original = _state()
    staged = writer.stage(original)
    assert writer.per_thread_copy_ahead == 0  # the staged copy is on CPU: nothing to copy ahead

    assert_state_equal(_state(), staged)
    assert isinstance(staged["nested"]["list"], list)
    for src, dst in zip(_tensors(original), _tensors(staged)):
        assert dst.device.type == "cpu"
        assert dst.untyped_storage().data_ptr() != src.untyped_storage().data_ptr()
    # Changing the original after staging leaves the staged copy as it was.
    _bump(original)
    original["step"] = -1
    original["nested"]["list"][1] = -1
    assert_state_equal(_state(), staged)
    assert torch.equal(original["w"], _state()["w"] + 1)


def test_stage_with_cache_across_two_calls(tmp_path):
    writer = FileSystemWriter(tmp_path / "ckpt", cache_staged_state_dict=True)
    first_src = _state(1)
    first = writer.stage(first_src)
    assert_state_equal(_state(1), first)
    # Snapshot what the first staging produced: the second may reuse the cached buffers.
    first_values = {"w": first["w"].clone(), "b": first["nested"]["b"].clone()}
    assert torch.equal(first_values["w"], _state(1)["w"])

    second_src = _state(2)
    second = writer.stage(second_src)
    assert_state_equal(_state(2), second)
    for src, dst in zip(_tensors(second_src), _tensors(second)):
        assert dst.untyped_storage().data_ptr() != src.untyped_storage().data_ptr()
    _bump(second_src)
    assert_state_equal(_state(2), second)
    assert writer.per_thread_copy_ahead == 0

    # The staged state dict saves and loads like any other.
    dcp_save_path = tmp_path / "ckpt"
    from helpers import dcp_save

    dcp_save(second, writer)
    target = zeros_like_state(_state())
    dcp_load(target, FileSystemReader(dcp_save_path))
    assert_state_equal(_state(2), target)


def _async_save(source, path, writer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dcp.async_save(source, checkpoint_id=path, storage_writer=writer)


@pytest.mark.parametrize("cache", [False, True], ids=["nocache", "cache"])
@pytest.mark.parametrize(
    "fmt", [SerializationFormat.TORCH_SAVE, SerializationFormat.SAFETENSORS], ids=lambda f: f.value
)
def test_three_async_saves_with_one_writer(tmp_path, fmt, cache, async_save_group):
    writer = FileSystemWriter(
        tmp_path / "unused", serialization_format=fmt, thread_count=2, cache_staged_state_dict=cache
    )
    paths = [tmp_path / f"step{i}" for i in range(3)]
    for i, path in enumerate(paths):
        future = _async_save(_state(i + 1), path, writer)
        assert future.result(timeout=120) is not None  # the Metadata
        assert writer.checkpoint_id == path
        # Staged on CPU by the writer's stage(): nothing left to copy ahead. torch 2.3 copies the
        # state itself and never calls stage().
        assert writer.per_thread_copy_ahead == (0 if ASYNC_SAVE_STAGES_WITH_WRITER else 10_000_000)
        assert sorted(os.listdir(path)) == [".metadata", "__0_0.distcp", "__0_1.distcp"]
    assert not (tmp_path / "unused").exists()
    for i, path in enumerate(paths):
        target = zeros_like_state(_state())
        dcp_load(target, FileSystemReader(path))
        assert_state_equal(_state(i + 1), target)


def test_async_save_is_isolated_from_later_changes(tmp_path, async_save_group):
    """Once async_save returns, the caller may change its tensors: the checkpoint has the old values."""
    if not ASYNC_SAVE_STAGES_WITH_WRITER:
        pytest.skip("this torch's async_save never calls the writer's stage() (no AsyncStager before torch 2.4): "
                    "it offloads with .cpu(), which does not copy CPU tensors, so isolation is not the writer's")
    writer = FileSystemWriter(tmp_path / "unused")
    for i in range(2):
        source = _state(i + 1)
        future = _async_save(source, tmp_path / f"step{i}", writer)
        _bump(source)
        source["nested"]["list"][0].mul_(-1)
        future.result(timeout=120)
        target = zeros_like_state(_state())
        dcp_load(target, FileSystemReader(tmp_path / f"step{i}"))
        assert_state_equal(_state(i + 1), target)

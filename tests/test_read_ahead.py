"""Neighbouring small items are read in runs, one read call each, and served from memory."""
import re

import pytest
import torch
from helpers import assert_state_equal, dcp_load, dcp_save, strip_checksums, zeros_like_state
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from dcp_filesystem import FileSystemReader, FileSystemWriter, SerializationFormat, _data_file, _load_items

RUN_BYTES = 100 << 10


def state():
    gen = torch.Generator().manual_seed(3)
    small = {f"norm.{i}": torch.randn(256, generator=gen) for i in range(300)}  # 1 KiB each
    return {**small, "big": torch.randn(512, 1024, generator=gen), "step": 7}


@pytest.fixture
def reads(monkeypatch):
    """(offset, length) of every positional read of a data file, and runs capped at RUN_BYTES."""
    seen = []
    real = _data_file.pread_into

    def spy(fd, offset, view, *args):
        seen.append((offset, len(view)))
        return real(fd, offset, view, *args)

    monkeypatch.setattr(_data_file, "pread_into", spy)
    monkeypatch.setattr(_load_items, "_RUN_BYTES", RUN_BYTES)
    return seen


@pytest.mark.parametrize("fmt", [SerializationFormat.TORCH_SAVE, SerializationFormat.SAFETENSORS])
def test_small_items_are_read_in_runs_bit_exact(tmp_path, reads, fmt):
    saved = state()
    dcp_save(saved, FileSystemWriter(tmp_path, serialization_format=fmt))
    metadata = FileSystemReader(tmp_path).read_metadata()
    small_bytes = sum(info.length for index, info in metadata.storage_data.items() if index.fqn.startswith("norm."))
    (big,) = [info for index, info in metadata.storage_data.items() if index.fqn == "big"]

    loaded = zeros_like_state(saved)
    dcp_load(loaded, FileSystemReader(tmp_path))
    assert_state_equal(saved, loaded)
    # The big tensor straight into its destination (a torch.save archive's head and tail around it).
    assert [n for o, n in reads if big.offset <= o < big.offset + big.length].count(512 * 1024 * 4) == 1
    runs = [n for o, n in reads if not big.offset <= o < big.offset + big.length]
    assert all(n <= RUN_BYTES for n in runs)
    # 300 items of 1 KiB and more, in runs of at most RUN_BYTES: a handful of reads instead of 300.
    assert sum(runs) >= small_bytes
    assert len(runs) <= small_bytes // RUN_BYTES + 2


@pytest.mark.parametrize("checksums", [True, False], ids=["checksums", "older-without-checksums"])
def test_a_damaged_item_inside_a_run_names_the_item(tmp_path, checksums):
    """Its archive laid out like the 150 before it (served from memory by their template) or not: the
    item's checksum, else its storage's zip CRC-32, names it; its destination is left as it was."""
    saved = state()
    dcp_save(saved, FileSystemWriter(tmp_path, serialization_format=SerializationFormat.TORCH_SAVE))
    if not checksums:
        strip_checksums(tmp_path)
    metadata = FileSystemReader(tmp_path).read_metadata()
    (info,) = [s for i, s in metadata.storage_data.items() if i.fqn == "norm.150"]
    data_file = tmp_path / info.relative_path
    raw = bytearray(data_file.read_bytes())
    tensor_bytes = bytes(saved["norm.150"].view(torch.uint8).tolist())
    storage = raw.find(tensor_bytes, info.offset, info.offset + info.length)
    assert storage > info.offset
    raw[storage + 100] ^= 0xFF
    data_file.write_bytes(bytes(raw))
    loaded = zeros_like_state(saved)
    why = (
        r"item 'norm\.150' \(chunk at \[0\]\): checksum mismatch"
        if checksums
        else r"cannot read item 'norm\.150' \(chunk at \[0\]\): archive member '.+' fails its CRC-32 check"
    )
    with pytest.raises(BaseException, match=re.escape(data_file.name) + ": " + why):
        dcp_load(loaded, FileSystemReader(tmp_path))
    assert not loaded["norm.150"].any()


def test_a_damaged_safetensors_entry_inside_a_run_names_the_item(tmp_path):
    saved = state()
    dcp_save(saved, FileSystemWriter(tmp_path, serialization_format=SerializationFormat.SAFETENSORS))
    metadata = FileSystemReader(tmp_path).read_metadata()
    (info,) = [s for i, s in metadata.storage_data.items() if i.fqn == "norm.150"]
    data_file = tmp_path / info.relative_path
    raw = bytearray(data_file.read_bytes())
    raw[info.offset + 100] ^= 0x01
    data_file.write_bytes(bytes(raw))
    loaded = zeros_like_state(saved)
    with pytest.raises(BaseException, match=r"item 'norm\.150' \(chunk at \[0\]\): checksum mismatch"):
        dcp_load(loaded, FileSystemReader(tmp_path))
    assert not loaded["norm.150"].any()  # the damaged bytes never reached the destination


@pytest.mark.parametrize("fmt", [SerializationFormat.SAFETENSORS, SerializationFormat.TORCH_SAVE])
def test_items_from_a_run_fill_any_destination(tmp_path, monkeypatch, fmt):
    """Items served from a run's memory (this package's SAFETENSORS entries; torch.save archives laid out
    like one decoded before) go straight into contiguous destinations of their dtype, and through a
    decoded tensor into the others (strided, another dtype); every value lands."""
    from dcp_filesystem import _torch_save

    gen = torch.Generator().manual_seed(5)
    saved = {f"m.{i}": torch.randn(16, 8, generator=gen) for i in range(40)}
    dcp_save(saved, FileSystemWriter(tmp_path, serialization_format=fmt))
    monkeypatch.setattr(_torch_save, "_templates", {})  # m.0's archive is the first of its layout
    copied_whole = []
    real = _data_file.DataFile.copy_ahead

    def copy_ahead(self, offset, length, address):
        copied_whole.append(address)
        real(self, offset, length, address)

    monkeypatch.setattr(_data_file.DataFile, "copy_ahead", copy_ahead)
    loaded = {}
    for i in range(40):
        if i % 3 == 0:
            loaded[f"m.{i}"] = torch.zeros(16, 8)
        elif i % 3 == 1:
            loaded[f"m.{i}"] = torch.zeros(8, 16).t()  # strided
        else:
            loaded[f"m.{i}"] = torch.zeros(16, 8, dtype=torch.float64)
    targets = {k: v.data_ptr() for k, v in loaded.items()}
    dcp_load(loaded, FileSystemReader(tmp_path))
    for i in range(40):
        key = f"m.{i}"
        assert loaded[key].data_ptr() == targets[key]
        assert torch.equal(loaded[key], saved[key].to(loaded[key].dtype)), key
    first = 0 if fmt == SerializationFormat.SAFETENSORS else 3  # an archive is decoded once per layout
    assert sorted(copied_whole) == sorted(targets[f"m.{i}"] for i in range(first, 40, 3))


@pytest.mark.parametrize("fmt", [SerializationFormat.TORCH_SAVE, SerializationFormat.SAFETENSORS])
def test_each_tensor_is_resolved_and_committed_once(tmp_path, fmt):
    """Whichever way an item is read (from a run, in place, decoded), the planner is asked for its
    destination once and told once that it is filled, as upstream's reader does."""
    saved = state()
    dcp_save(saved, FileSystemWriter(tmp_path, serialization_format=fmt))
    calls = []

    class Counting(DefaultLoadPlanner):
        def resolve_tensor(self, read_item):
            calls.append(("resolve", read_item.storage_index.fqn))
            return super().resolve_tensor(read_item)

        def commit_tensor(self, read_item, tensor):
            calls.append(("commit", read_item.storage_index.fqn))
            super().commit_tensor(read_item, tensor)

    loaded = zeros_like_state(saved)
    loaded["norm.7"] = torch.zeros(256, dtype=torch.float64)  # decoded, then converted
    loaded["big"] = torch.zeros(1024, 512).t()  # strided: decoded, then copied
    dcp_load(loaded, FileSystemReader(tmp_path), planner=Counting())
    tensors = sorted(k for k, v in saved.items() if isinstance(v, torch.Tensor))
    assert sorted(fqn for kind, fqn in calls if kind == "resolve") == tensors
    assert sorted(fqn for kind, fqn in calls if kind == "commit") == tensors
    assert torch.equal(loaded["norm.7"], saved["norm.7"].double())
    assert torch.equal(loaded["big"], saved["big"])


@pytest.mark.parametrize("fmt", [SerializationFormat.TORCH_SAVE, SerializationFormat.SAFETENSORS])
def test_parameters_that_require_grad_are_filled_without_autograd(tmp_path, fmt):
    """Destinations that require grad (a module's parameters) are filled whichever way their item is read,
    stay leaves with no history, and the planner is handed them detached, as upstream's reader does."""
    saved = state()
    dcp_save(saved, FileSystemWriter(tmp_path, serialization_format=fmt))
    committed = []

    class Recording(DefaultLoadPlanner):
        def commit_tensor(self, read_item, tensor):
            committed.append((read_item.storage_index.fqn, tensor.requires_grad))
            super().commit_tensor(read_item, tensor)

    loaded = {k: torch.nn.Parameter(torch.zeros_like(v)) for k, v in saved.items() if isinstance(v, torch.Tensor)}
    loaded["norm.7"] = torch.nn.Parameter(torch.zeros(256, dtype=torch.float64))  # decoded, then converted
    loaded["big"] = torch.nn.Parameter(torch.zeros(1024, 512).t())  # strided: decoded, then copied
    loaded["step"] = 0
    dcp_load(loaded, FileSystemReader(tmp_path), planner=Recording())
    for key, value in saved.items():
        if isinstance(value, torch.Tensor):
            assert isinstance(loaded[key], torch.nn.Parameter) and loaded[key].requires_grad, key
            assert loaded[key].is_leaf and loaded[key].grad_fn is None, key
            assert torch.equal(loaded[key].detach(), value.to(loaded[key].dtype)), key
    assert sorted(committed) == sorted((k, False) for k, v in saved.items() if isinstance(v, torch.Tensor))

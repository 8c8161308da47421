"""Neighbouring small items are read in runs, one read call each, and served from memory."""
import pytest
import torch
from helpers import assert_state_equal, dcp_load, dcp_save, zeros_like_state

from dcp_filesystem import FileSystemReader, FileSystemWriter, SerializationFormat, reader

RUN_BYTES = 100 << 10


def state():
    gen = torch.Generator().manual_seed(3)
    small = {f"norm.{i}": torch.randn(256, generator=gen) for i in range(300)}  # 1 KiB each
    return {**small, "big": torch.randn(512, 1024, generator=gen), "step": 7}


@pytest.fixture
def reads(monkeypatch):
    """The length of every positional read of a data file, and runs capped at RUN_BYTES."""
    seen = []
    real = reader.pread_into

    def spy(fd, offset, view, *args):
        seen.append(len(view))
        return real(fd, offset, view, *args)

    monkeypatch.setattr(reader, "pread_into", spy)
    monkeypatch.setattr(reader, "_RUN_BYTES", RUN_BYTES)
    return seen


@pytest.mark.parametrize("fmt", [SerializationFormat.TORCH_SAVE, SerializationFormat.SAFETENSORS])
def test_small_items_are_read_in_runs_bit_exact(tmp_path, reads, fmt):
    saved = state()
    dcp_save(saved, FileSystemWriter(tmp_path, serialization_format=fmt))
    metadata = FileSystemReader(tmp_path).read_metadata()
    small_bytes = sum(info.length for index, info in metadata.storage_data.items() if index.fqn.startswith("norm."))

    loaded = zeros_like_state(saved)
    dcp_load(loaded, FileSystemReader(tmp_path))
    assert_state_equal(saved, loaded)
    runs = [n for n in reads if n <= RUN_BYTES]
    assert reads.count(512 * 1024 * 4) == 1  # the big tensor, straight into its destination
    assert len(reads) == len(runs) + 1
    # 300 items of 1 KiB and more, in runs of at most RUN_BYTES: a handful of reads instead of 300.
    assert sum(runs) >= small_bytes
    assert len(runs) <= small_bytes // RUN_BYTES + 2


def test_a_damaged_item_inside_a_run_names_the_item(tmp_path):
    saved = state()
    dcp_save(saved, FileSystemWriter(tmp_path, serialization_format=SerializationFormat.TORCH_SAVE))
    metadata = FileSystemReader(tmp_path).read_metadata()
    (info,) = [s for i, s in metadata.storage_data.items() if i.fqn == "norm.150"]
    data_file = tmp_path / info.relative_path
    raw = bytearray(data_file.read_bytes())
    tensor_bytes = bytes(saved["norm.150"].view(torch.uint8).tolist())
    storage = raw.find(tensor_bytes, info.offset, info.offset + info.length)
    assert storage > info.offset
    raw[storage + 100] ^= 0xFF
    data_file.write_bytes(bytes(raw))
    with pytest.raises(BaseException, match=r"item 'norm\.150' \(chunk at \[0\]\): checksum mismatch"):
        dcp_load(zeros_like_state(saved), FileSystemReader(tmp_path))

"""A load that needs part of a stored tensor reads only the byte ranges that hold it, checked by blocks."""
import os

import pytest
import torch
import torch.distributed.checkpoint.filesystem as torch_fs
from helpers import _strip_storage_info_field, dcp_save, raised_error, strip_checksums
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

from dcp_filesystem import (
    FileSystemReader,
    FileSystemWriter,
    SerializationFormat,
    _checksum,
    _compat,
    _partial,
)

BLOCK = _checksum.BLOCK_BYTES
# (storage_offsets, lengths) of a [512, 1024] float32 tensor (4 KiB rows, 2 MiB): leading-dim slices, an
# inner-dim slice (small gaps: read through), a corner, a single row.
BOXES = [
    ((128, 0), (256, 1024)), ((0, 0), (1, 1024)), ((0, 512), (512, 512)), ((3, 5), (100, 7)), ((511, 0), (1, 1024)),
]
WRITERS = ["ours-torch_save", "ours-safetensors", "stock-torch_save", "stock-safetensors"]


def _writer(kind, path):
    impl, fmt = kind.split("-")
    if impl == "stock":
        if fmt == "safetensors" and _compat.TorchSerializationFormat is None:
            pytest.skip("this torch's FileSystemWriter has no serialization_format (SAFETENSORS: torch 2.8+)")
        kwargs = {"serialization_format": torch_fs.SerializationFormat.SAFETENSORS} if fmt == "safetensors" else {}
        return torch_fs.FileSystemWriter(path, **kwargs)
    return FileSystemWriter(path, serialization_format=SerializationFormat(fmt))


class _Planner:
    def __init__(self, targets):
        self.targets = targets
        self.committed = []

    def resolve_tensor(self, req):
        return self.targets[req.storage_index.fqn]

    def commit_tensor(self, req, tensor):
        self.committed.append(req.storage_index.fqn)


def load_box(path, fqn, offsets, lengths, target=None, dtype=torch.float32):
    """Load the sub-box of the one-chunk tensor ``fqn`` into ``target`` (a new tensor if None) through
    FileSystemReader.read_data, as DCP plans it for a resharded load."""
    reader = FileSystemReader(path)
    metadata = reader.read_metadata()
    reader.set_up_storage_reader(metadata, True)
    target = torch.full(lengths, -1, dtype=dtype) if target is None else target
    zeros = torch.Size([0] * len(lengths))
    req = ReadItem(
        type=LoadItemType.TENSOR,
        dest_index=MetadataIndex(fqn, zeros),
        dest_offsets=zeros,
        storage_index=MetadataIndex(fqn, zeros, 0),
        storage_offsets=torch.Size(offsets),
        lengths=torch.Size(lengths),
    )
    planner = _Planner({fqn: target})
    reader.read_data(LoadPlan([req]), planner).wait()
    assert planner.committed == [fqn]
    return target


def _part(tensor, offsets, lengths):
    for dim, (o, n) in enumerate(zip(offsets, lengths)):
        tensor = tensor.narrow(dim, o, n)
    return tensor


@pytest.mark.parametrize("box", BOXES, ids=lambda b: f"{b[0]}+{b[1]}")
@pytest.mark.parametrize("kind", WRITERS)
def test_a_part_is_read_bit_exact_and_only_its_bytes(tmp_path, kind, box, data_file_reads):
    full = torch.randn(512, 1024, generator=torch.Generator().manual_seed(1))
    dcp_save({"w": full}, _writer(kind, tmp_path))
    offsets, lengths = box
    data_file_reads.clear()
    out = load_box(tmp_path, "w", offsets, lengths)
    assert torch.equal(out, _part(full, offsets, lengths))
    needed = out.numel() * 4
    read = sum(n for _, n in data_file_reads)
    row = 1024 * 4
    if offsets[1] == 0:  # whole rows: one range, widened to whole blocks where checked
        checked = kind.startswith("ours")
        # torch.save archives: the sniffed head, the archive's first 16 KiB and its records after the storage;
        # stock SAFETENSORS files: their header (the item points at it)
        records = {"ours-safetensors": 0, "stock-safetensors": 4096}.get(kind, (16 << 10) + 4096)
        assert needed <= read <= needed + (2 * BLOCK if checked else 0) + records + 9, (read, needed)
    else:  # inner-dimension slices of 4 KiB rows: the rows around them, read through
        rows = lengths[0] * row
        assert rows <= read <= rows + 2 * BLOCK + (40 << 10), (read, rows)


@pytest.mark.parametrize("kind", WRITERS)
def test_inner_slices_with_large_gaps_read_each_chunk(tmp_path, kind, data_file_reads):
    """Rows of 1 MiB, half of each wanted: the gaps are larger than GAP_BYTES, so each chunk (widened to its
    blocks where checked) is read on its own."""
    full = torch.randn(8, 256 << 10, generator=torch.Generator().manual_seed(2))
    dcp_save({"w": full}, _writer(kind, tmp_path))
    assert (128 << 10) * 4 >= _partial.GAP_BYTES
    data_file_reads.clear()
    out = load_box(tmp_path, "w", (2, 128 << 10), (4, 128 << 10))
    assert torch.equal(out, full[2:6, 128 << 10 :])
    needed = out.numel() * 4
    assert needed <= sum(n for _, n in data_file_reads) <= needed + (40 << 10) + (4 * 2 * BLOCK)


@pytest.mark.parametrize("fmt", ["torch_save", "safetensors"])
def test_bf16_views_empty_and_0d(tmp_path, fmt):
    gen = torch.Generator().manual_seed(3)
    state = {
        "bf16": torch.randn(600, 1000, generator=gen).to(torch.bfloat16),  # 1.2 MB: block checksums
        "empty": torch.empty(0, 8),
        "scalar": torch.tensor(4.5),
    }
    dcp_save(state, FileSystemWriter(tmp_path, serialization_format=SerializationFormat(fmt)))
    out = load_box(tmp_path, "bf16", (100, 0), (300, 1000), dtype=torch.bfloat16)
    assert torch.equal(out, state["bf16"][100:400])
    # A non-contiguous target (a transposed view) and one of another dtype take the bytes through a copy.
    view = torch.zeros(1000, 300, dtype=torch.bfloat16).t()
    load_box(tmp_path, "bf16", (100, 0), (300, 1000), target=view)
    assert torch.equal(view, state["bf16"][100:400])
    wider = load_box(tmp_path, "bf16", (7, 10), (5, 600), target=torch.zeros(5, 600, dtype=torch.float32))
    assert torch.equal(wider, state["bf16"][7:12, 10:610].float())
    assert load_box(tmp_path, "empty", (0, 2), (0, 3)).shape == (0, 3)
    assert torch.equal(load_box(tmp_path, "scalar", (), ()), state["scalar"])


@pytest.mark.parametrize("fmt", ["torch_save", "safetensors"])
@pytest.mark.parametrize("where", ["inside", "outside"])
def test_a_flipped_bit_inside_the_needed_blocks_fails_outside_it_does_not_matter(tmp_path, fmt, where):
    full = torch.arange(512 * 1024, dtype=torch.float32).reshape(512, 1024)
    dcp_save({"w": full}, FileSystemWriter(tmp_path, serialization_format=SerializationFormat(fmt)))
    metadata = FileSystemReader(tmp_path).read_metadata()
    info = next(iter(metadata.storage_data.values()))
    assert _checksum.stored_blocks(info) is not None
    name = os.path.join(str(tmp_path), info.relative_path)
    raw = bytearray(open(name, "rb").read())
    row = 300 if where == "inside" else 10  # the load wants rows 256-383; row 10 lies in an unread block
    element = torch.tensor(float(row * 1024 + 5)).view(torch.int32).item().to_bytes(4, "little")
    at = raw.index(element, info.offset)
    raw[at] ^= 0x10
    open(name, "wb").write(bytes(raw))
    if where == "outside":
        assert torch.equal(load_box(tmp_path, "w", (256, 0), (128, 1024)), full[256:384])
        with pytest.raises(ValueError, match="checksum mismatch"):  # the whole tensor: its item CRC-32
            load_box(tmp_path, "w", (0, 0), (512, 1024))
        return
    block = (at - info.offset - _checksum.stored_blocks(info).start) // BLOCK
    with pytest.raises(ValueError) as caught:
        load_box(tmp_path, "w", (256, 0), (128, 1024))
    message = str(raised_error(caught.value))
    assert message.startswith(f"{name}: item 'w' (chunk at [0, 0]): checksum mismatch in block {block} of its tensor")
    assert "(damaged checkpoint)" in message


@pytest.mark.parametrize("fmt", ["torch_save", "safetensors"])
def test_an_item_with_only_its_item_crc_is_read_whole_and_checked(tmp_path, fmt, data_file_reads):
    """A checkpoint of a version before block checksums: a part cannot be checked alone, so the item is read
    whole and checked against its CRC-32."""
    full = torch.randn(512, 1024, generator=torch.Generator().manual_seed(4))
    dcp_save({"w": full}, FileSystemWriter(tmp_path, serialization_format=SerializationFormat(fmt)))
    _strip_storage_info_field(tmp_path, "crc32_blocks")
    info = next(iter(FileSystemReader(tmp_path).read_metadata().storage_data.values()))
    data_file_reads.clear()
    assert torch.equal(load_box(tmp_path, "w", (256, 0), (128, 1024)), full[256:384])
    assert sum(n for _, n in data_file_reads) >= info.length


@pytest.mark.parametrize("fmt", ["torch_save", "safetensors"])
def test_unchecked_items_are_read_in_part_exactly(tmp_path, fmt, data_file_reads):
    full = torch.randn(512, 1024, generator=torch.Generator().manual_seed(5))
    dcp_save({"w": full}, FileSystemWriter(tmp_path, serialization_format=SerializationFormat(fmt)))
    strip_checksums(tmp_path)
    data_file_reads.clear()
    assert torch.equal(load_box(tmp_path, "w", (256, 0), (128, 1024)), full[256:384])
    records = 0 if fmt == "safetensors" else (16 << 10) + 4096 + 9
    assert 128 * 4096 <= sum(n for _, n in data_file_reads) <= 128 * 4096 + records


def test_partial_reads_can_be_turned_off(tmp_path, data_file_reads, monkeypatch):
    full = torch.randn(512, 1024, generator=torch.Generator().manual_seed(6))
    dcp_save({"w": full}, FileSystemWriter(tmp_path, serialization_format=SerializationFormat.SAFETENSORS))
    monkeypatch.setenv("DCP_FILESYSTEM_PARTIAL_READS", "0")
    data_file_reads.clear()
    assert torch.equal(load_box(tmp_path, "w", (256, 0), (128, 1024)), full[256:384])
    assert sum(n for _, n in data_file_reads) == full.numel() * 4


def test_blocks_are_recorded_for_large_tensors_only(tmp_path):
    state = {"big": torch.randn(300, 1000), "small": torch.randn(1000), "step": 3}
    dcp_save(state, FileSystemWriter(tmp_path))
    metadata = FileSystemReader(tmp_path).read_metadata()
    blocks = {index.fqn: _checksum.stored_blocks(info) for index, info in metadata.storage_data.items()}
    assert blocks["small"] is None and blocks["step"] is None
    big = blocks["big"]
    assert big.block_bytes == BLOCK and big.cover(300 * 1000 * 4) and len(big.crcs) == 4 * 5
    import zlib

    stored = bytes(state["big"].view(torch.uint8).reshape(-1).tolist())  # no .numpy(): torch 2.1 beside NumPy 2
    assert [big.crc(n) for n in range(5)] == [zlib.crc32(stored[n * BLOCK : (n + 1) * BLOCK]) for n in range(5)]


@pytest.mark.parametrize("fmt", ["torch_save", "safetensors"])
def test_verify_checks_block_checksums(tmp_path, fmt):
    """A block CRC-32 that disagrees with the bytes (the item's CRC-32 agrees): verify names the item and block."""
    import contextlib
    import io
    import pickle

    from dcp_filesystem import _cli

    dcp_save({"w": torch.randn(512, 1024)}, FileSystemWriter(tmp_path, serialization_format=SerializationFormat(fmt)))
    metadata_path = tmp_path / ".metadata"
    metadata = pickle.loads(metadata_path.read_bytes())
    info = next(iter(metadata.storage_data.values()))
    size, start, crcs = info.crc32_blocks
    info.crc32_blocks = (size, start, crcs[:8] + bytes(b ^ 1 for b in crcs[8:12]) + crcs[12:])
    metadata_path.write_bytes(pickle.dumps(metadata))
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = _cli.main(["verify", str(tmp_path)])
    assert code == 1
    name = os.path.join(str(tmp_path), info.relative_path)
    expected = f"w: ValueError: {name}: item 'w' (chunk at [0, 0]): checksum mismatch in block 2 of its tensor"
    assert expected in out.getvalue()


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="this platform has no os.posix_fadvise")
@pytest.mark.parametrize("fmt", ["torch_save", "safetensors"])
def test_the_ranges_a_load_reads_are_announced_at_prepare_local_plan(tmp_path, fmt, monkeypatch):
    """Whole items, and the block-widened rows of a part of a SAFETENSORS entry (an archive's storage is placed
    by the archive's own bytes: its part is not announced)."""
    from dcp_filesystem import _load_items

    writer = FileSystemWriter(tmp_path, serialization_format=SerializationFormat(fmt))
    dcp_save({"w": torch.randn(512, 1024), "step": 3}, writer)
    advised = []

    def advise(fd, offset, n, advice):
        advised.append((offset, n, advice))

    monkeypatch.setattr(_load_items.os, "posix_fadvise", advise)
    reader = FileSystemReader(tmp_path)
    metadata = reader.read_metadata()
    reader.set_up_storage_reader(metadata, True)
    infos = {index.fqn: info for index, info in metadata.storage_data.items()}
    zeros = torch.Size([0, 0])
    whole = [ReadItem(LoadItemType.BYTE_IO, MetadataIndex("step"), torch.Size([]), MetadataIndex("step"),
                      torch.Size([]), torch.Size([])),
             ReadItem(LoadItemType.TENSOR, MetadataIndex("w", zeros), zeros, MetadataIndex("w", zeros, 0), zeros,
                      torch.Size([512, 1024]))]
    assert reader.prepare_local_plan(LoadPlan(whole)).items == whole
    # Only the large item: the small one is read in a run, which the OS reads ahead of anyway.
    assert infos["step"].length < 64 << 10 <= infos["w"].length
    assert advised == [(infos["w"].offset, infos["w"].length, os.POSIX_FADV_WILLNEED)]
    advised.clear()
    dcp_save({"a": torch.randn(200, 1000), "b": torch.randn(300, 1000)}, FileSystemWriter(tmp_path / "two"))
    two = FileSystemReader(tmp_path / "two")
    metadata = two.read_metadata()
    two.set_up_storage_reader(metadata, True)
    items = {index.fqn: (index, info) for index, info in metadata.storage_data.items()}
    reqs = [ReadItem(LoadItemType.TENSOR, MetadataIndex(k, zeros), zeros, index, zeros, torch.Size(shape))
            for k, (index, _), shape in zip("ab", (items["a"], items["b"]), ((200, 1000), (300, 1000)))]
    two.prepare_local_plan(LoadPlan(reqs))
    begin = min(info.offset for _, info in items.values())
    end = max(info.offset + info.length for _, info in items.values())
    assert advised == [(begin, end - begin, os.POSIX_FADV_WILLNEED)]  # neighbours: one call
    advised.clear()
    part = ReadItem(LoadItemType.TENSOR, MetadataIndex("w", zeros), zeros, MetadataIndex("w", zeros, 0),
                    torch.Size([100, 0]), torch.Size([200, 1024]))
    reader.prepare_local_plan(LoadPlan([part]))
    if fmt == "torch_save":
        assert advised == []
    else:
        begin = 100 * 4096 // BLOCK * BLOCK
        end = -(-300 * 4096 // BLOCK) * BLOCK
        assert advised == [(infos["w"].offset + begin, end - begin, os.POSIX_FADV_WILLNEED)]

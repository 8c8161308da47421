"""Seeded single-bit flips anywhere in a checkpoint: every load raises an error naming the file, or is bit-exact.

Flips land in every item's stored bytes (tensors, non-tensor values, torch.save
zip records, compressed payloads), in the rest of the data files (safetensors
headers) and in ``.metadata``. ``verify`` must fail, naming the item, for every
flip inside an item's stored bytes.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import pickle
import random

import pytest
import torch
from helpers import assert_state_equal, dcp_save
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from dcp_filesystem import FileSystemReader, FileSystemWriter, SerializationFormat, _cli

HAS_SAFETENSORS = importlib.util.find_spec("safetensors") is not None
HAS_ZSTD = importlib.util.find_spec("zstandard") is not None
FLIPS_PER_VARIANT = 350  # x 3 variants: over 1 000 flips


def _state():
    g = torch.Generator().manual_seed(7)
    return {
        "big": torch.randn(280_000, generator=g),  # a torch.save archive over 1 MiB: read in place
        "w": torch.randn(16, 8, generator=g),
        "bf": torch.randn(33, generator=g).to(torch.bfloat16),
        "i": torch.randint(-1000, 1000, (5, 3), generator=g, dtype=torch.int64),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
        "step": 123,
        "name": "fuzz",
    }


def _variants():
    yield pytest.param({"serialization_format": SerializationFormat.TORCH_SAVE}, id="torch_save")
    yield pytest.param(
        {"serialization_format": SerializationFormat.SAFETENSORS},
        id="safetensors",
        marks=pytest.mark.skipif(not HAS_SAFETENSORS, reason="safetensors is not installed"),
    )
    if HAS_ZSTD:
        from dcp_filesystem.transforms import ZStandard

        yield pytest.param({"_extensions": [ZStandard()]}, id="zstd")
    else:
        yield pytest.param({}, id="zstd", marks=pytest.mark.skip(reason="zstandard is not installed"))


def _load(path, template):
    """Load with this package's reader, driven by the stock planner (as dcp.load does, minus collectives)."""
    reader = FileSystemReader(path)
    metadata = reader.read_metadata()
    state = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else None for k, v in template.items()}
    planner = DefaultLoadPlanner(flatten_state_dict=False)
    planner.set_up_planner(state, metadata, True)
    reader.set_up_storage_reader(metadata, True)
    local = reader.prepare_local_plan(planner.create_local_plan())
    plans = reader.prepare_global_plan(planner.create_global_plan([local]))
    reader.read_data(planner.finish_plan(plans[0]), planner).wait()
    return planner.state_dict  # non-tensor values land there, the tensors in ``state``


def _regions(path):
    """(file name, start, end, fqn or None) covering every byte of every file of the checkpoint."""
    metadata = FileSystemReader(path).read_metadata()
    regions = [(".metadata", 0, (path / ".metadata").stat().st_size, None)]
    per_file = {}
    for index, info in metadata.storage_data.items():
        per_file.setdefault(info.relative_path, []).append((info.offset, info.offset + info.length, index.fqn))
    for name, items in per_file.items():
        position = 0
        for start, end, fqn in sorted(items):
            if start > position:
                regions.append((name, position, start, None))
            if end > start:
                regions.append((name, start, end, fqn))
            position = end
        size = (path / name).stat().st_size
        if size > position:
            regions.append((name, position, size, None))
    return regions


def _verify(path):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = _cli.main(["verify", str(path)])
    return code, out.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("options", list(_variants()))
def test_single_bit_flips_never_load_wrong_values(tmp_path, options):
    state = _state()
    path = tmp_path / "c"
    dcp_save(state, FileSystemWriter(path, **options))
    assert_state_equal(state, _load(path, state))
    regions = _regions(path)
    originals = {name: (path / name).read_bytes() for name, *_ in regions}
    rng = random.Random(20261203)
    outcomes = {"raised": 0, "bit-exact": 0}
    for n in range(FLIPS_PER_VARIANT):
        # Every region gets flips in turn (the big tensor would otherwise take nearly all), at a random bit.
        name, start, end, fqn = regions[n % len(regions)]
        offset, bit = rng.randrange(start, end), rng.randrange(8)
        damaged = bytearray(originals[name])
        damaged[offset] ^= 1 << bit
        (path / name).write_bytes(bytes(damaged))
        where = f"flip of bit {bit} at {name}:{offset} (item {fqn})"
        try:
            loaded = _load(path, state)
        except (ValueError, pickle.UnpicklingError, RuntimeError) as e:
            assert str(path / name) in str(e), f"{where}: the error does not name the file: {e}"
            outcomes["raised"] += 1
        else:
            assert_state_equal(state, loaded, where)  # loaded: then bit-exact, never silently wrong
            outcomes["bit-exact"] += 1
        if fqn is not None:
            code, out = _verify(path)
            assert code == 1, f"{where}: verify passed it:\n{out}"
            assert any(line.startswith(f"{fqn}: ") for line in out.splitlines()), f"{where}: verify output:\n{out}"
        (path / name).write_bytes(originals[name])
    print(f"{options}: {FLIPS_PER_VARIANT} flips: {outcomes}")
    assert outcomes["raised"] + outcomes["bit-exact"] == FLIPS_PER_VARIANT
    # Flips in .metadata and in the bytes of items a load reads always raise; what may load unchanged:
    # unused parts of a safetensors header, and the stored empty tensor (the planner reads no bytes of it).
    always_raise = [r[0] == ".metadata" or r[3] not in (None, "empty") for r in regions]
    item_and_metadata_flips = sum(always_raise[n % len(regions)] for n in range(FLIPS_PER_VARIANT))
    assert outcomes["raised"] >= item_and_metadata_flips


@pytest.mark.parametrize("fmt", [SerializationFormat.TORCH_SAVE, SerializationFormat.SAFETENSORS])
def test_single_bit_flips_never_load_a_wrong_part(tmp_path, fmt):
    """A load of part of a tensor with block checksums: a flip in a block it reads raises, naming the file and
    the block; a flip anywhere else in the item raises or leaves the part bit-exact."""
    from test_partial_reads import load_box

    from dcp_filesystem import _checksum

    big = _state()["big"]
    path = tmp_path / "c"
    dcp_save({"big": big}, FileSystemWriter(path, serialization_format=fmt))
    info = next(iter(FileSystemReader(path).read_metadata().storage_data.values()))
    blocks = _checksum.stored_blocks(info)
    first, count = 100_000, 50_000  # elements: bytes [400 000, 600 000) of the tensor, in blocks 1 and 2
    run = info.offset + blocks.start
    read_begin = run + (first * 4) // blocks.block_bytes * blocks.block_bytes
    read_end = run + -(-(first + count) * 4 // blocks.block_bytes) * blocks.block_bytes
    name = path / info.relative_path
    original = name.read_bytes()
    rng = random.Random(20261206)
    outcomes = {"raised": 0, "bit-exact": 0}
    for n in range(120):
        inside = n % 2 == 0
        begin, end = (read_begin, read_end) if inside else (info.offset, info.offset + info.length)
        offset = rng.randrange(begin, end)
        damaged = bytearray(original)
        damaged[offset] ^= 1 << rng.randrange(8)
        name.write_bytes(bytes(damaged))
        where = f"flip at {offset} (inside the blocks read: {inside})"
        try:
            part = load_box(path, "big", (first,), (count,))
        except ValueError as e:
            assert str(name) in str(e), f"{where}: the error does not name the file: {e}"
            if read_begin <= offset < read_end:
                assert "checksum mismatch in block" in str(e), f"{where}: {e}"
            outcomes["raised"] += 1
        else:
            assert not read_begin <= offset < read_end, f"{where}: loaded"
            assert torch.equal(part, big[first : first + count]), where
            outcomes["bit-exact"] += 1
    name.write_bytes(original)
    assert outcomes["raised"] >= 60 and outcomes["bit-exact"] > 0, outcomes

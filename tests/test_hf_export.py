"""``python -m dcp_filesystem export-hf``: DCP checkpoints (this package's and stock torch's, both formats) into
Hugging Face directories, bit-exact, in bounded memory; checkpoints of several ranks: test_hf_distributed.py."""

from __future__ import annotations

import json
import os
import struct
import zlib

import pytest
import torch
import torch.distributed.checkpoint.filesystem as torch_fs
from helpers import REPO, assert_state_equal, dcp_save, run_clean_python
from test_hf_storage import file_tensors, header_of

from dcp_filesystem import FileSystemWriter, SerializationFormat, _hf_consolidate
from dcp_filesystem._cli import main

pytest.importorskip("safetensors")


def state():
    gen = torch.Generator().manual_seed(1)
    return {
        "embed": torch.randn(40, 16, generator=gen),
        "blocks.0.w": torch.randn(3, 5, 7, generator=gen).to(torch.bfloat16),
        "blocks.0.ids": torch.arange(33, dtype=torch.int64),
        "blocks.0.mask": torch.arange(9) % 2 == 0,
        "scale": torch.tensor(1.5, dtype=torch.float64),
        "empty": torch.zeros(4, 0),
        "step": 10,
        "name": "run-7",
    }


TENSORS = {k: v for k, v in state().items() if isinstance(v, torch.Tensor)}


def _writers():
    writers = {
        "ours_torch_save": lambda p: FileSystemWriter(p),
        "ours_safetensors": lambda p: FileSystemWriter(p, serialization_format=SerializationFormat.SAFETENSORS),
        "stock_torch_save": lambda p: torch_fs.FileSystemWriter(p),
    }
    if hasattr(torch_fs, "SerializationFormat"):
        writers["stock_safetensors"] = lambda p: torch_fs.FileSystemWriter(
            p, serialization_format=torch_fs.SerializationFormat.SAFETENSORS)
    return writers


def _export(capsys, *args):
    code = main(["export-hf", *[str(a) for a in args]])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("kind", ["ours_torch_save", "ours_safetensors", "stock_torch_save", "stock_safetensors"])
def test_export_is_bit_exact_with_checksums_and_index(kind, tmp_path, capsys):
    if kind not in _writers():
        pytest.skip("stock torch's FileSystemWriter has no SerializationFormat.SAFETENSORS (added in torch 2.8)")
    dcp_save(state(), _writers()[kind](str(tmp_path / "ckpt")))
    code, out, err = _export(capsys, tmp_path / "ckpt", tmp_path / "hf", "--skip-non-tensors", "--max-shard-size",
                             "2KB")
    assert code == 0, err
    total = sum(t.numel() * t.element_size() for t in TENSORS.values())
    assert err.endswith(f"\rexport-hf: {total / 1e6:.1f} of {total / 1e6:.1f} MB (100%)\n")
    assert out == (f"exported 6 tensors, {total} bytes, into 2 file(s) and model.safetensors.index.json in "
                   f"{tmp_path / 'hf'}\nleft out 2 non-tensor value(s): step, name\n")
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert sorted(os.listdir(tmp_path / "hf")) == names + ["model.safetensors.index.json"]
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    # embed (2560 bytes) alone passes 2KB: a file of its own; the rest together.
    assert index == {"metadata": {"total_size": total},
                     "weight_map": {k: names[0] if k == "embed" else names[1] for k in sorted(TENSORS)}}
    assert_state_equal(TENSORS, file_tensors(tmp_path / "hf", names))
    for name in names:
        header, data_start = header_of(tmp_path / "hf" / name)
        meta = header.pop("__metadata__")
        assert sorted(meta) == ["DCP_CRC32", "format"] and meta["format"] == "pt"
        raw = (tmp_path / "hf" / name).read_bytes()
        crcs = json.loads(meta["DCP_CRC32"])
        offsets = sorted(info["data_offsets"] for info in header.values())
        assert offsets[0][0] == 0 and offsets[-1][1] == len(raw) - data_start  # tiled, nothing else
        for key, info in header.items():
            begin, end = info["data_offsets"]
            assert crcs[key] == f"{zlib.crc32(raw[data_start + begin : data_start + end]):08x}"
            assert (data_start + begin) % torch.empty((), dtype=TENSORS[key].dtype).element_size() == 0
    assert main(["verify", str(tmp_path / "hf")]) == 0
    assert capsys.readouterr().out == f"OK: 6 entries, {total} bytes verified\n"


def test_large_tensors_are_exported_in_slabs(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(_hf_consolidate, "BATCH_BYTES", 100)
    dcp_save(state(), FileSystemWriter(str(tmp_path / "ckpt")))
    code, _, err = _export(capsys, tmp_path / "ckpt", tmp_path / "hf", "--skip-non-tensors")
    assert code == 0, err
    assert_state_equal(TENSORS, file_tensors(tmp_path / "hf", ["model-00001-of-00001.safetensors"]))


def test_refusals(tmp_path, capsys):
    dcp_save(state(), FileSystemWriter(str(tmp_path / "ckpt")))
    code, _, err = _export(capsys, tmp_path / "ckpt", tmp_path / "hf")
    assert (code, err) == (1, f"error: ValueError: {tmp_path / 'ckpt'}: 'step', 'name' are non-tensor values, "
                              "which a Hugging Face checkpoint cannot hold: pass --skip-non-tensors to export the "
                              "tensors without them\n")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")  # a model directory's other files are welcome
    assert _export(capsys, tmp_path / "ckpt", tmp_path / "hf", "--skip-non-tensors")[0] == 0
    code, _, err = _export(capsys, tmp_path / "ckpt", tmp_path / "hf", "--skip-non-tensors")
    assert (code, err) == (1, f"error: FileExistsError: {tmp_path / 'hf'}: already holds a Hugging Face checkpoint "
                              "(model-00001-of-00001.safetensors, model.safetensors.index.json): remove it or export "
                              "into another directory\n")
    code, _, err = _export(capsys, tmp_path / "nothing", tmp_path / "hf2")
    assert code == 1 and err.startswith("error: FileNotFoundError: ")


def test_a_damaged_checkpoint_leaves_nothing_behind(tmp_path, capsys):
    sd = {"a": torch.arange(1000, dtype=torch.float32), "b": torch.ones(10)}
    dcp_save(sd, FileSystemWriter(str(tmp_path / "ckpt"), serialization_format=SerializationFormat.SAFETENSORS))
    data = tmp_path / "ckpt" / "__0_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[-100] ^= 1  # in "a", the larger entry, which comes last
    data.write_bytes(bytes(raw))
    code, _, err = _export(capsys, tmp_path / "ckpt", tmp_path / "hf")
    assert code == 1
    assert err.startswith(f"error: ValueError: {data}: item 'a' (chunk at [0]): checksum mismatch: ")
    assert os.listdir(tmp_path / "hf") == []


@pytest.mark.slow
def test_export_memory_stays_near_one_batch(tmp_path):
    """A 192 MiB checkpoint of 32 MiB tensors, exported by a fresh process: its peak RSS grows by less than
    three batches of 64 MiB (two are held: one written while the next is read)."""
    run_clean_python(f"""
        import sys, torch
        sys.path.insert(0, {REPO!r})
        from dcp_filesystem import FileSystemWriter
        from helpers import dcp_save
        sd = {{f"w{{i}}": torch.full((8 << 20,), float(i)) for i in range(6)}}
        dcp_save(sd, FileSystemWriter({str(tmp_path / "ckpt")!r}))
    """, cwd=str(tmp_path))
    grown_mib = int(run_clean_python(f"""
        import resource, sys
        sys.path.insert(0, {REPO!r})
        from dcp_filesystem._hf_export import export_hf
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        export_hf({str(tmp_path / "ckpt")!r}, {str(tmp_path / "hf")!r}, sync=False)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """, cwd=str(tmp_path)))
    print(f"export of 192 MiB: peak RSS grew by {grown_mib} MiB")
    assert grown_mib < 192, grown_mib
    with open(tmp_path / "hf" / "model-00001-of-00001.safetensors", "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
    assert os.path.getsize(tmp_path / "hf" / "model-00001-of-00001.safetensors") == 8 + length + (192 << 20)


def test_readme_export_command_runs_as_written(tmp_path):
    from test_readme import block

    ckpt = tmp_path / "CHECKPOINT"
    dcp_save(state(), FileSystemWriter(str(ckpt)))
    command = block("sh", "# writes OUT").splitlines()[-1].split()
    assert command[:4] == ["python", "-m", "dcp_filesystem", "export-hf"]
    code = main([str(tmp_path / w) if w in ("CHECKPOINT", "OUT") else w for w in command[3:]])
    assert code == 0
    assert_state_equal(TENSORS, file_tensors(tmp_path / "OUT", ["model-00001-of-00001.safetensors"]))


def test_readme_example_runs_as_written(tmp_path):
    from test_readme import block, skip_unless_dcp_save_runs_single_process

    skip_unless_dcp_save_runs_single_process("the Hugging Face example")
    run_clean_python(f"import sys\nsys.path.insert(0, {REPO!r})\n" + block("python", "# Hugging Face"),
                     cwd=str(tmp_path))
    assert sorted(os.listdir(tmp_path / "hf_model")) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]

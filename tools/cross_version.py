"""Checkpoints written on one torch, read with this package on another.

    python tools/cross_version.py DIR              # read every other torch's checkpoints in DIR, then write ours
    python tools/cross_version.py DIR --read-only

Run by ``tools/matrix.py`` in each cell's interpreter. ``DIR/<torch version>/<variant>``
holds one checkpoint per variant: this package's writer and stock torch's, in
each format the running torch can write. The state is built from integer
arithmetic and exact casts only, so every torch builds the same bytes and the
reader can check them bit-exact without a reference file. Exit status 1 when
any checkpoint fails to load bit-exact.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
import torch.distributed.checkpoint.filesystem as torch_fs  # noqa: E402
from helpers import assert_state_equal, dcp_load, dcp_save, zeros_like_state  # noqa: E402

from dcp_filesystem import FileSystemReader, FileSystemWriter, SerializationFormat  # noqa: E402
from dcp_filesystem.transforms import ZStandard  # noqa: E402


def expected_state(with_values: bool = True) -> dict:
    ints = torch.arange(300_000, dtype=torch.int64)
    state = {
        "layer.weight": ((ints[:4096] % 251).to(torch.float32) / 8).reshape(64, 64),
        "layer.bias": ((ints[:1000] % 97) - 48).to(torch.bfloat16),
        "ids": ints[:512] * 1_000_003,
        "big": (ints % 65_521).to(torch.float32),  # 1.2 MB: the reader's in-place path
        "scalar": torch.tensor(3.5),
        "mask": (ints[:77] % 3 == 0),
        "half": (ints[:33] - 16).to(torch.float16),
    }
    if with_values:
        state["step"] = 10
        # A tensor beside them: torch 2.1 keeps a dict of non-tensors whole, newer torches flatten it.
        state["config"] = {"lr": 0.25, "name": "run", "scale": torch.tensor([2.0, 0.5])}
    return state


def variants() -> dict:
    """Writers this torch has: name -> (make writer, state has non-tensor values)."""
    found = {
        "ours-torch_save": (lambda p: FileSystemWriter(p), True),
        "ours-safetensors": (lambda p: FileSystemWriter(p, serialization_format=SerializationFormat.SAFETENSORS), True),
        "stock-torch_save": (lambda p: torch_fs.FileSystemWriter(p), True),
    }
    try:
        import zstandard  # noqa: F401

        found["ours-zstd"] = (lambda p: FileSystemWriter(p, _extensions=[ZStandard()]), True)
    except ImportError:
        pass
    stock_format = getattr(torch_fs, "SerializationFormat", None)
    if stock_format is not None:
        # Stock SAFETENSORS holds tensors only.
        found["stock-safetensors"] = (
            lambda p: torch_fs.FileSystemWriter(p, serialization_format=stock_format.SAFETENSORS),
            False,
        )
    return found


def read_all(base: Path, own: str) -> int:
    failures = 0
    for torch_dir in sorted(p for p in base.iterdir() if p.is_dir() and p.name != own):
        for ckpt in sorted(p for p in torch_dir.iterdir() if p.is_dir()):
            with_values = (ckpt / "with-values").exists()
            expected = expected_state(with_values)
            target = zeros_like_state(expected)
            label = f"written by torch {torch_dir.name} ({ckpt.name}), read on torch {own}"
            try:
                dcp_load(target, FileSystemReader(str(ckpt)))
                assert_state_equal(expected, target)
            except BaseException:  # CheckpointException derives from BaseException
                failures += 1
                print(f"FAIL {label}\n{traceback.format_exc()}", flush=True)
            else:
                print(f"ok   {label}", flush=True)
    return failures


def write_all(base: Path, own: str) -> None:
    for name, (make_writer, with_values) in variants().items():
        path = base / own / name
        path.mkdir(parents=True)
        dcp_save(expected_state(with_values), make_writer(str(path)))
        if with_values:
            (path / "with-values").touch()
        print(f"wrote torch {own} {name}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--read-only", action="store_true")
    args = parser.parse_args()
    own = torch.__version__.split("+")[0]
    failures = read_all(args.dir, own)
    if not args.read_only:
        write_all(args.dir, own)
    return 1 if failures else 0


if __name__ == "__main__":
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    sys.exit(main())

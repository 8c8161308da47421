"""``python -m dcp_filesystem``: inspect, verify and bench."""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed.checkpoint.filesystem as torch_fs
from helpers import REPO, dcp_save, strip_checksums

from dcp_filesystem import FileSystemReader, FileSystemWriter, SerializationFormat, _bench, _cli, _compat, _crc
from dcp_filesystem._torch_save import archive_members

HAS_SAFETENSORS = importlib.util.find_spec("safetensors") is not None
needs_safetensors = pytest.mark.skipif(not HAS_SAFETENSORS, reason="safetensors is not installed")
FORMATS = [
    pytest.param(SerializationFormat.TORCH_SAVE, id="torch_save"),
    pytest.param(SerializationFormat.SAFETENSORS, id="safetensors", marks=needs_safetensors),
]
DCP_VERSION = "1.0.0" if "version" in _compat.METADATA_FIELDS else "-"


def make_state():
    gen = torch.Generator().manual_seed(3)
    return {
        "w": torch.randn(64, 32, generator=gen),
        "b": torch.arange(16),
        "h": torch.randn(3, 5, generator=gen).half(),
        "s": torch.tensor(2.5),
        "step": 5,
    }


def pickled_length(value):
    """What DefaultSavePlanner stores for a non-tensor value: its torch.save archive."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return len(buffer.getvalue())


def save(path, fmt, **kwargs):
    dcp_save(make_state(), FileSystemWriter(path, serialization_format=fmt, **kwargs))
    return path


def data_file(path):
    (name,) = [p for p in os.listdir(path) if p.endswith(".distcp")]
    return name


def storage_infos(path):
    return {index.fqn: info for index, info in FileSystemReader(path).read_metadata().storage_data.items()}


def run(capsys, *argv):
    code = _cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_module_help_lists_the_subcommands():
    env = {**os.environ, "COLUMNS": "100"}
    argv = [sys.executable, "-m", "dcp_filesystem", "--help"]
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m dcp_filesystem [-h] {inspect,verify,bench,export-hf} ...")
    for line in (
        "    inspect             list a checkpoint's entries, files and format\n",
        "    verify              read every item, list the ones that fail\n",
        "    bench               time save and load here, ours and stock torch's, both formats\n",
        "    export-hf           write a DCP checkpoint as a Hugging Face directory of safetensors files\n",
    ):
        assert line in proc.stdout


@pytest.mark.parametrize("fmt", FORMATS)
def test_inspect_text(tmp_path, capsys, fmt):
    path = save(tmp_path / "c", fmt)
    name = data_file(path)
    size = os.path.getsize(path / name)
    step = pickled_length(5)
    total = 128 + 30 + 4 + step + 8192
    code, out, err = run(capsys, "inspect", str(path))
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "FQN   KIND    DTYPE    SHAPE     CHUNKS  BYTES",
        "b     tensor  int64    [16]           1    128",
        "h     tensor  float16  [3, 5]         1     30",
        "s     tensor  float32  []             1      4",
        f"step  bytes   -        -              1  {step:>5}",
        "w     tensor  float32  [64, 32]       1   8192",
        "",
        f"format: {fmt.value}",
        "transforms: none",
        f"dcp version: {DCP_VERSION}",
        "files:",
        f"  {name}  {size} bytes",
        f"total: 5 entries, {total} bytes",
    ]


@pytest.mark.parametrize("fmt", FORMATS)
def test_inspect_json(tmp_path, capsys, fmt):
    path = save(tmp_path / "c", fmt, single_file_per_rank=False)
    code, out, err = run(capsys, "inspect", str(path), "--json")
    assert (code, err) == (0, "")
    step = pickled_length(5)
    names = {fqn: info.relative_path for fqn, info in storage_infos(path).items()}
    assert sorted(names) == ["b", "h", "s", "step", "w"] and len(set(names.values())) == 5
    assert json.loads(out) == {
        "path": str(path),
        "format": fmt.value,
        "transforms": [],
        "version": None if DCP_VERSION == "-" else DCP_VERSION,
        "files": {n: os.path.getsize(path / n) for n in sorted(names.values())},
        "entries": [
            {"fqn": "b", "kind": "tensor", "dtype": "int64", "shape": [16], "chunks": 1, "bytes": 128},
            {"fqn": "h", "kind": "tensor", "dtype": "float16", "shape": [3, 5], "chunks": 1, "bytes": 30},
            {"fqn": "s", "kind": "tensor", "dtype": "float32", "shape": [], "chunks": 1, "bytes": 4},
            {"fqn": "step", "kind": "bytes", "dtype": None, "shape": None, "chunks": 1, "bytes": step},
            {"fqn": "w", "kind": "tensor", "dtype": "float32", "shape": [64, 32], "chunks": 1, "bytes": 8192},
        ],
        "total_bytes": 128 + 30 + 4 + step + 8192,
    }


def _stock_torch_save_writer(path):
    return torch_fs.FileSystemWriter(path, thread_count=1)


def _stock_safetensors_writer(path):
    safetensors = torch_fs.SerializationFormat.SAFETENSORS
    return torch_fs.FileSystemWriter(path, thread_count=1, serialization_format=safetensors)


def _zstd_writer(path):
    from dcp_filesystem.transforms import ZStandard

    return FileSystemWriter(path, _extensions=[ZStandard()])


HAS_STOCK_SAFETENSORS = _compat.TorchSerializationFormat is not None and HAS_SAFETENSORS
HAS_ZSTD = importlib.util.find_spec("zstandard") is not None


@pytest.mark.parametrize(
    "make_writer, fmt, transforms",
    [
        pytest.param(_stock_torch_save_writer, "torch_save", [], id="stock-torch_save"),
        pytest.param(
            _stock_safetensors_writer,
            "safetensors",
            [],
            id="stock-safetensors",
            marks=pytest.mark.skipif(not HAS_STOCK_SAFETENSORS, reason="needs SerializationFormat and safetensors"),
        ),
        pytest.param(
            _zstd_writer,
            "torch_save",
            ["stream.zstd/1"],
            id="zstd",
            marks=pytest.mark.skipif(not HAS_ZSTD, reason="zstandard is not installed"),
        ),
    ],
)
def test_inspect_detects_format_of_stock_and_transformed_checkpoints(tmp_path, capsys, make_writer, fmt, transforms):
    path = tmp_path / "c"
    dcp_save(make_state(), make_writer(path))
    code, out, _ = run(capsys, "inspect", str(path), "--json")
    info = json.loads(out)
    assert (code, info["format"], info["transforms"]) == (0, fmt, transforms)
    assert [e["fqn"] for e in info["entries"]] == ["b", "h", "s", "step", "w"]
    code, out, _ = run(capsys, "verify", str(path))
    if make_writer is _zstd_writer:
        assert (code, out) == (0, f"OK: 5 entries, {info['total_bytes']} bytes verified\n")
    else:  # stock torch records no checksums: read, but not called OK
        unchecked = "unchecked: read, but no checksum was recorded (written by stock torch or an older version)"
        assert code == 0
        assert out.splitlines() == [f"{fqn}: {unchecked}" for fqn in ["b", "h", "s", "step", "w"]] + [
            "UNCHECKED: 5 of 5 entries carry no checksum; the other 0 verified"
        ]


@pytest.mark.parametrize("fmt", FORMATS)
def test_verify_good_checkpoint(tmp_path, capsys, fmt):
    path = save(tmp_path / "c", fmt)
    total = 128 + 30 + 4 + pickled_length(5) + 8192
    assert run(capsys, "verify", str(path)) == (0, f"OK: 5 entries, {total} bytes verified\n", "")
    code, out, err = run(capsys, "verify", str(path), "--json")
    assert (code, err) == (0, "")
    assert json.loads(out) == {"ok": True, "entries": 5, "bytes": total, "errors": {}, "unchecked": []}
    strip_checksums(path)
    code, out, _ = run(capsys, "verify", str(path), "--json")
    report = json.loads(out)
    assert (code, report["ok"], report["unchecked"]) == (0, True, ["b", "h", "s", "step", "w"])


def test_verify_shows_progress_only_on_a_tty(tmp_path, capsys, monkeypatch):
    path = save(tmp_path / "c", SerializationFormat.TORCH_SAVE)
    assert run(capsys, "verify", str(path))[2] == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    code, _, err = run(capsys, "verify", str(path))
    assert (code, err) == (0, "\rverify: 1/5\rverify: 2/5\rverify: 3/5\rverify: 4/5\rverify: 5/5\n")


def flip_in_member(file, info, member_suffix):
    """Flip one byte inside an archive member of one item, where only its CRC-32 can notice."""
    raw = bytearray(file.read_bytes())
    members = archive_members(raw[info.offset : info.offset + info.length])
    ((start, size),) = [v for k, v in members.items() if k.endswith(member_suffix)]
    raw[info.offset + start + size // 2] ^= 0x01
    file.write_bytes(bytes(raw))


@pytest.mark.parametrize("checksums", [True, False], ids=["checksums", "older-without-checksums"])
def test_verify_lists_exactly_the_damaged_items_torch_save(tmp_path, capsys, checksums):
    path = save(tmp_path / "c", SerializationFormat.TORCH_SAVE)
    if not checksums:
        strip_checksums(path)
    infos = storage_infos(path)
    file = path / data_file(path)
    flip_in_member(file, infos["step"], "/data.pkl")
    flip_in_member(file, infos["h"], "/data/0")
    last = max(infos.values(), key=lambda info: info.offset)
    (last_fqn,) = [fqn for fqn, info in infos.items() if info is last]
    with open(file, "r+b") as f:
        f.truncate(last.offset + last.length - 1)

    code, out, err = run(capsys, "verify", str(path))
    assert (code, err) == (1, "")
    lines = out.splitlines()
    failed = [line for line in lines[:-1] if ": unchecked: " not in line]
    unchecked = [line.split(":")[0] for line in lines[:-1] if ": unchecked: " in line]
    assert [line.split(":")[0] for line in failed] == sorted(["h", "step", last_fqn])
    assert unchecked == ([] if checksums else sorted({"b", "h", "s", "step", "w"} - {"h", "step", last_fqn}))
    assert lines[-1] == "FAILED: 3 of 5 entries could not be read"
    for line in failed:
        fqn = line.split(":")[0]
        if fqn == last_fqn:
            end = last.offset + last.length
            assert line.endswith(
                f"needs bytes [{last.offset}, {end}) but the file has {end - 1} bytes (truncated or damaged checkpoint)"
            )
        elif checksums:
            info = infos[fqn]
            item = "'h' (chunk at [0, 0])" if fqn == "h" else "'step'"
            assert line.startswith(
                f"{fqn}: ValueError: {file}: item {item}: checksum mismatch: its {info.length} stored bytes at "
                f"offset {info.offset} have CRC-32 0x"
            )
            assert line.endswith(f", the metadata recorded {info.crc32:#010x} (damaged checkpoint)")
        else:  # the archive's own CRC-32s still catch it
            item = "'h' (chunk at [0, 0])" if fqn == "h" else "'step'"
            assert line.startswith(f"{fqn}: ValueError: {file}: cannot read item {item}: archive member")
            assert line.endswith("fails its CRC-32 check (damaged data)")

    code, out, _ = run(capsys, "verify", str(path), "--json")
    report = json.loads(out)
    assert (code, report["ok"], report["entries"]) == (1, False, 5)
    assert sorted(report["errors"]) == sorted(["h", "step", last_fqn])


@needs_safetensors
def test_verify_lists_exactly_the_damaged_items_safetensors(tmp_path, capsys):
    path = save(tmp_path / "c", SerializationFormat.SAFETENSORS, single_file_per_rank=False)
    infos = storage_infos(path)
    w_file = path / infos["w"].relative_path
    with open(w_file, "r+b") as f:
        f.truncate(os.path.getsize(w_file) - 1)
    step_file = path / infos["step"].relative_path
    flip_in_member(step_file, infos["step"], "/data.pkl")

    code, out, err = run(capsys, "verify", str(path))
    assert (code, err) == (1, "")
    step_line, w_line, summary = out.splitlines()
    assert step_line.startswith(f"step: ValueError: {step_file}: item 'step': checksum mismatch: ")
    w = infos["w"]
    assert w_line == (
        f"w: ValueError: {w_file}: item 'w' (chunk at [0, 0]) needs bytes [{w.offset}, {w.offset + w.length}) "
        f"but the file has {os.path.getsize(w_file)} bytes (truncated or damaged checkpoint)"
    )
    assert summary == "FAILED: 2 of 5 entries could not be read"


def test_missing_data_file(tmp_path, capsys):
    path = save(tmp_path / "c", SerializationFormat.TORCH_SAVE)
    name = data_file(path)
    os.remove(path / name)
    code, out, _ = run(capsys, "inspect", str(path))
    assert code == 0
    assert out.splitlines()[7:12] == [
        "format: unknown",
        "transforms: none",
        f"dcp version: {DCP_VERSION}",
        "files:",
        f"  {name}  missing",
    ]
    code, out, _ = run(capsys, "verify", str(path))
    assert code == 1
    missing = f"FileNotFoundError: [Errno 2] No such file or directory: '{path / name}'"
    assert out.splitlines() == [f"{fqn}: {missing}" for fqn in ["b", "h", "s", "step", "w"]] + [
        "FAILED: 5 of 5 entries could not be read"
    ]


@pytest.mark.parametrize("command", ["verify", "inspect"])
def test_unreadable_metadata_exits_2(tmp_path, capsys, command):
    path = save(tmp_path / "c", SerializationFormat.TORCH_SAVE)
    os.remove(path / ".metadata")
    code, out, err = run(capsys, command, str(path))
    assert (code, out) == (2, "")
    assert err == (
        "error: cannot read the checkpoint metadata: FileNotFoundError: "
        f"[Errno 2] No checkpoint in this directory (no .metadata file): '{path}'\n"
    )

    (path / ".metadata").write_bytes(b"\x00garbage")
    code, out, err = run(capsys, command, str(path))
    assert (code, out) == (2, "")
    assert err.startswith(
        f"error: cannot read the checkpoint metadata: UnpicklingError: {path / '.metadata'}: "
        "cannot read DCP metadata (8 bytes; truncated or damaged?)"
    )


@pytest.mark.parametrize("command", ["verify", "inspect"])
@pytest.mark.parametrize("kind", ["file", "missing"])
def test_a_path_that_is_no_checkpoint_directory_prints_one_error_line(tmp_path, command, kind):
    path = tmp_path / "ckpt"
    if kind == "file":
        path.write_bytes(b"not a checkpoint")
    # -W ignore: torch 2.1 without NumPy warns on import ("Failed to initialize NumPy"), which is not ours.
    proc = subprocess.run([sys.executable, "-W", "ignore", "-m", "dcp_filesystem", command, str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout) == (2, "")
    error = ("NotADirectoryError: [Errno 20] Checkpoint path is not a directory" if kind == "file"
             else "FileNotFoundError: [Errno 2] No such checkpoint directory")
    # Once: the reader's ERROR line (for dcp.load's sake) is not repeated here.
    assert proc.stderr == f"error: cannot read the checkpoint metadata: {error}: '{path}'\n"


def test_a_vendored_copy_names_itself_in_its_usage_line(tmp_path):
    vendor = tmp_path / "yourpkg" / "_vendor"
    shutil.copytree(os.path.join(REPO, "dcp_filesystem"), str(vendor / "dcp_filesystem"))
    (tmp_path / "yourpkg" / "__init__.py").write_text("")
    (vendor / "__init__.py").write_text("")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-W", "ignore", "-m", "yourpkg._vendor.dcp_filesystem", "verify"],
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[0] == "usage: python -m yourpkg._vendor.dcp_filesystem verify [-h] [--json] path"


def test_bench_reasons_are_cut_between_words():
    stock = ("Weights only load failed. In PyTorch 2.6, we changed the default value of the `weights_only` argument "
             "in `torch.load` from `False` to `True`. Re-running `torch.load` with `weights_only` set to `False` "
             "will likely succeed, but it can result in arbitrary code execution.")
    reason = _bench._reason(pickle.UnpicklingError(stock))
    assert reason == (
        "UnpicklingError: Weights only load failed. In PyTorch 2.6, we changed the default value of the "
        "`weights_only` argument in `torch.load` from `False` to `True`. Re-running `torch.load` with ..."
    )
    assert len(reason) <= 200
    assert _bench._reason(ValueError("short: ")) == "ValueError: short"


def test_unknown_option_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        _cli.main(["inspect", str(tmp_path), "--bogus"])
    assert info.value.code == 2
    assert capsys.readouterr().err.endswith("error: unrecognized arguments: --bogus\n")


def test_bench_sizes():
    assert [_bench.parse_size(t) for t in ("512MB", "2GB", "64MiB", "1.5g", "8mb", "4096", "1KiB", "2 GiB")] == [
        512 * 10**6, 2 * 10**9, 64 << 20, 1_500_000_000, 8 * 10**6, 4096, 1024, 2 << 30]
    for bad in ("", "GB", "2XB", "-1GB", "100"):
        with pytest.raises(argparse.ArgumentTypeError):
            _bench.parse_size(bad)


def bench_rows(rows):
    return [(r["writer"], r["format"], r["bit_exact"], r["load_error"] is None) for r in rows]


EXPECTED_BENCH_ROWS = [
    ("dcp_filesystem", "TORCH_SAVE", True, True),
    ("dcp_filesystem", "SAFETENSORS", True, True),
    ("torch (stock)", "TORCH_SAVE", True, True),
]


def check_bench_json(report, size):
    rows = report["rows"]
    assert bench_rows(rows[:3]) == EXPECTED_BENCH_ROWS
    if _compat.TorchSerializationFormat is not None:  # stock torch's reader may fail on its own SAFETENSORS checkpoints
        assert [(r["writer"], r["format"]) for r in rows[3:]] == [("torch (stock)", "SAFETENSORS")]
        assert rows[3]["bit_exact"] is (True if rows[3]["load_error"] is None else None)
    else:
        assert len(rows) == 3
    assert abs(report["payload_bytes"] - size) < 4096 and report["values"] == 2 and report["tensors"] > 2
    for r in rows:
        assert len(r["save_seconds"]) == report["repeats"] and r["save_s"] > 0 and r["save_gb_per_s"] > 0
        if r["load_error"] is None:
            assert len(r["load_seconds"]) == report["repeats"] and r["load_s"] > 0 and r["load_gb_per_s"] > 0
    assert rows[2]["save_vs_stock"] == rows[2]["load_vs_stock"] == 1.0


def test_bench_json_creates_and_removes_a_missing_dir(tmp_path, capsys):
    scratch = tmp_path / "new" / "scratch"
    code, out, err = run(capsys, "bench", "--dir", str(scratch), "--size", "8MB", "--repeats", "2", "--json")
    assert code == 0, err
    report = json.loads(out)
    check_bench_json(report, 8 * 10**6)
    assert report["repeats"] == 2 and report["dir"] == str(scratch)
    assert report["crc32"] == _crc.IMPLEMENTATION
    assert os.listdir(tmp_path) == []  # new/ and new/scratch/ were created by bench, and removed


def test_bench_table_leaves_an_existing_dir_empty(tmp_path, capsys):
    code, out, err = run(capsys, "bench", "--dir", str(tmp_path), "--size", "64KiB", "--repeats", "1")
    assert code == 0, err
    assert os.listdir(tmp_path) == []
    lines = out.splitlines()
    assert lines[0].endswith(f"in {tmp_path}; torch {torch.__version__}; median of 1, sync_files=True")
    assert lines[2].split() == ["writer", "format", "save", "s", "GB/s", "vs", "stock", "load", "s", "GB/s", "vs",
                                "stock", "bit-exact"]
    assert lines[3].startswith("dcp_filesystem  TORCH_SAVE ") and lines[3].endswith(" yes")
    assert lines[4].startswith("dcp_filesystem  SAFETENSORS ") and lines[4].endswith(" yes")
    assert lines[5].startswith("torch (stock)   TORCH_SAVE ") and lines[5].endswith(" yes")
    assert "make bench" in lines[-1]
    assert lines[-2] == f"CRC-32: {_crc.IMPLEMENTATION}" + ("." if _crc.FAST else f" ({_crc.SLOW_NOTE}).")


def test_bench_fails_loudly_when_a_load_is_not_bit_exact(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(_bench, "first_difference", lambda expected, actual: "layers.0.weight")
    code, out, err = run(capsys, "bench", "--dir", str(tmp_path / "d"), "--size", "64KiB", "--repeats", "1")
    assert (code, out) == (1, "")
    assert err.endswith("bench: error: dcp_filesystem TORCH_SAVE: the loaded state dict is not bit-exact: "
                        "'layers.0.weight' differs\n")
    assert os.listdir(tmp_path) == []


def test_bench_bad_arguments_are_usage_errors(tmp_path, capsys):
    for argv in (["--size", "2XB"], ["--repeats", "x"]):
        with pytest.raises(SystemExit) as info:
            _cli.main(["bench", *argv])
        assert info.value.code == 2
    assert "error: argument --size: not a size: '2XB' (e.g. 512MB, 2GB, 64MiB)\n" in capsys.readouterr().err
    assert run(capsys, "bench", "--repeats", "0") == (2, "", "bench: error: --repeats must be at least 1\n")


def test_bench_progress_announces_slow_steps_only():
    stream = io.StringIO()
    progress = _bench.Progress(stream, after_s=0.05)
    with progress.step("fast"):
        pass
    with progress.step("slow"):
        time.sleep(0.5)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "bench: slow ..."
    assert re.fullmatch(r"bench: slow: \d+\.\d s", lines[1]) and len(lines) == 2


def test_bench_ctrl_c_removes_the_temporary_files(tmp_path):
    scratch = tmp_path / "scratch"
    argv = [sys.executable, "-m", "dcp_filesystem", "bench", "--dir", str(scratch), "--size", "16MB",
            "--repeats", "1000"]
    # SIGINT as at a terminal, even where this run was started in the background (which ignores it).
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not list(scratch.glob("dcp-bench-*/ckpt")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert err.endswith("bench: interrupted; temporary checkpoints removed\n")
    assert not scratch.exists() and os.listdir(tmp_path) == []

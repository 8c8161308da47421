"""``python -m dcp_filesystem bench``: save and load throughput on the user's own storage, ours and stock torch's.

Small on purpose (one generated state dict, four variants); the full benchmark is benchmarks/bench.py of a
source checkout (``make bench``).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from typing import IO, Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.distributed.checkpoint import filesystem as _torch_filesystem
from torch.distributed.checkpoint.api import CheckpointException

from . import _crc
from ._compat import TorchSerializationFormat, single_process_dcp
from ._format import SerializationFormat
from .reader import FileSystemReader
from .writer import FileSystemWriter

OURS = "dcp_filesystem"
STOCK = "torch (stock)"
DEFAULT_SIZE = "1GB"
PROGRESS_AFTER_S = 2.0
_LARGE_BYTES = 32 << 20  # the large tensors: up to 32 MiB each
_SMALL_BYTES = 1 << 10  # the small ones: 1 KiB each, about 1% of the payload, at most 1000
_UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "KI": 1 << 10, "MI": 1 << 20, "GI": 1 << 30, "TI": 1 << 40}


class BenchError(Exception):
    """A reason to stop the benchmark, printed as ``bench: error: ...``."""


def parse_size(text: str) -> int:
    """Bytes of ``512MB``, ``2GB``, ``64MiB``, ``1.5G``, ``4096`` (decimal units; ``KiB``/``MiB``/... binary)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]i?)?b?\s*", text, re.IGNORECASE)
    if m is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512MB, 2GB, 64MiB)")
    size = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    if size < 1 << 10:
        raise argparse.ArgumentTypeError(f"size {text!r} is under 1 KiB")
    return size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", help="where the temporary checkpoints go (created and removed if missing; "
                                      "default: a new directory under the system's temporary directory)")
    parser.add_argument("--size", type=parse_size, default=DEFAULT_SIZE,
                        help=f"bytes of tensor data, e.g. 512MB, 2GB, 64MiB (default {DEFAULT_SIZE}); "
                             "needs about twice that in memory and once that on disk")
    parser.add_argument("--repeats", type=int, default=3, help="timed saves and loads per variant (default 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


# ---------------------------------------------------------------- the state dict
def make_state_dict(size: int) -> Dict[str, Any]:
    """About ``size`` bytes of random float tensors, large float32 matrices and small float32/bfloat16
    vectors, and two non-tensor values."""
    gen = torch.Generator().manual_seed(0)
    n_small = min(1000, max(2, size // 100 // _SMALL_BYTES))
    large = max(4, size - n_small * _SMALL_BYTES) // 4  # float32 elements
    n_large = max(1, math.ceil(large * 4 / _LARGE_BYTES))
    sd: Dict[str, Any] = {}
    for i in range(n_large):
        numel = large // n_large + (1 if i < large % n_large else 0)
        shape = (numel // 1024, 1024) if numel % 1024 == 0 else (numel,)
        sd[f"layers.{i}.weight"] = torch.randn(shape, generator=gen)
    for i in range(n_small):
        dtype = torch.float32 if i % 2 == 0 else torch.bfloat16
        itemsize = torch.empty((), dtype=dtype).element_size()
        sd[f"norms.{i}.weight"] = torch.randn(_SMALL_BYTES // itemsize, generator=gen).to(dtype)
    sd["step"] = 1234
    sd["lr"] = 3e-4
    return sd


def payload_bytes(sd: Dict[str, Any]) -> int:
    return sum(v.numel() * v.element_size() for v in sd.values() if isinstance(v, torch.Tensor))


def targets_like(sd: Dict[str, Any]) -> Dict[str, Any]:
    return {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else None for k, v in sd.items()}


def clear_(targets: Dict[str, Any]) -> None:
    """Tensors zeroed in place (allocated and touched), other values None: each load must fill in both."""
    for k, v in targets.items():
        if isinstance(v, torch.Tensor):
            v.zero_()
        else:
            targets[k] = None


def first_difference(expected: Dict[str, Any], actual: Dict[str, Any]) -> Optional[str]:
    """None where ``actual`` equals ``expected`` bit for bit, else the first key that differs."""
    for k, e in expected.items():
        a = actual.get(k)
        if isinstance(e, torch.Tensor):
            same = (isinstance(a, torch.Tensor) and a.dtype == e.dtype and a.shape == e.shape
                    and torch.equal(a.view(torch.uint8), e.view(torch.uint8)))
        else:
            same = type(a) is type(e) and a == e
        if not same:
            return k
    return None


# ---------------------------------------------------------------- variants
class Variant:
    def __init__(self, writer: str, fmt: str, make_writer: Callable[[str], Any],
                 make_reader: Callable[[str], Any], load_may_fail: bool = False) -> None:
        self.writer, self.format, self.make_writer, self.make_reader = writer, fmt, make_writer, make_reader
        self.load_may_fail = load_may_fail

    @property
    def name(self) -> str:
        return f"{self.writer} {self.format}"


def variants() -> List[Variant]:
    """Ours in both formats, stock torch's TORCH_SAVE, and its SAFETENSORS where it has one (torch 2.8+;
    stock torch's reader may fail to load that, which is reported, not raised)."""
    out = [
        Variant(OURS, fmt.name,
                lambda path, fmt=fmt: FileSystemWriter(path, sync_files=True, serialization_format=fmt),
                lambda path: FileSystemReader(path))
        for fmt in (SerializationFormat.TORCH_SAVE, SerializationFormat.SAFETENSORS)
    ]
    out.append(Variant(STOCK, "TORCH_SAVE", lambda path: _torch_filesystem.FileSystemWriter(path, sync_files=True),
                       lambda path: _torch_filesystem.FileSystemReader(path)))
    if TorchSerializationFormat is not None:
        stock_safetensors = TorchSerializationFormat.SAFETENSORS  # type: ignore[attr-defined]
        out.append(Variant(
            STOCK, "SAFETENSORS",
            lambda path: _torch_filesystem.FileSystemWriter(
                path, sync_files=True, serialization_format=stock_safetensors),
            lambda path: _torch_filesystem.FileSystemReader(path),
            load_may_fail=True,
        ))
    return out


# ---------------------------------------------------------------- progress
class Progress:
    """Progress on ``stream``: on a terminal one line per step, overwritten; elsewhere a line only for a
    step still running after ``after_s`` seconds, and one when it ends."""

    def __init__(self, stream: IO[str], after_s: float = PROGRESS_AFTER_S) -> None:
        self.stream, self.after_s = stream, after_s
        try:
            self.tty = stream.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self._lock = threading.Lock()

    def _write(self, text: str) -> None:
        with self._lock:
            self.stream.write(text)
            self.stream.flush()

    @contextlib.contextmanager
    def step(self, label: str) -> Iterator[None]:
        if self.tty:
            self._write(f"\r\x1b[Kbench: {label}")
            yield
            return
        announced = threading.Event()

        def announce() -> None:
            announced.set()
            self._write(f"bench: {label} ...\n")

        timer = threading.Timer(self.after_s, announce)
        timer.daemon = True
        t0 = time.perf_counter()
        timer.start()
        try:
            yield
        finally:
            timer.cancel()
            timer.join()
            if announced.is_set():
                self._write(f"bench: {label}: {time.perf_counter() - t0:.1f} s\n")

    def clear(self) -> None:
        if self.tty:
            self._write("\r\x1b[K")


# ---------------------------------------------------------------- running
def _timed(fn: Callable[..., None], *args: Any) -> float:
    """Seconds of fn(*args), after flushing earlier dirty pages and garbage so that they are not timed here."""
    os.sync()
    gc.collect()
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def _created_dirs(path: str) -> List[str]:
    """The directories that ``os.makedirs(path)`` would create, deepest first."""
    created = []
    path = os.path.abspath(path)
    while not os.path.exists(path):
        created.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return created


@contextlib.contextmanager
def scratch_directory(parent: Optional[str]) -> Iterator[str]:
    """A new directory inside ``parent`` (created if missing; default: the system's temporary directory),
    removed on every exit, Ctrl-C included, with the part of ``parent`` that it created."""
    created = _created_dirs(parent) if parent is not None else []
    if parent is not None:
        if os.path.exists(parent) and not os.path.isdir(parent):
            raise BenchError(f"--dir {parent}: not a directory")
        os.makedirs(parent, exist_ok=True)
    root = tempfile.mkdtemp(prefix="dcp-bench-", dir=parent)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)
        for path in created:
            try:
                os.rmdir(path)
            except OSError:
                break  # not empty: something else now lives there


def _causes(e: BaseException) -> List[BaseException]:
    """``e``, or the exceptions of the ranks that a CheckpointException (DCP's wrapper) reports."""
    causes = []
    for failure in getattr(e, "failures", {}).values():
        if isinstance(failure, tuple) and failure:
            failure = failure[0]  # (exception, traceback summary)
        if isinstance(failure, BaseException):
            causes.append(failure)
    return causes or [e]


def _interrupted(e: BaseException) -> bool:
    """Ctrl-C, also where DCP caught it inside a save or load and raised a CheckpointException."""
    return any(isinstance(cause, KeyboardInterrupt) for cause in _causes(e))


def _quiet_finalizers() -> None:
    """Drop the complaints of finalizers for the rest of this process: the interrupted save or load left
    streams half-written (a flush of a file already removed, a BytesIO still exported), and Python would
    print them at exit, after the message that the run was interrupted. Not by collecting them now: stock
    torch's saves still export BytesIO buffers, which CPython 3.12.1's collector can crash on (see
    _bytes.byte_count)."""
    sys.unraisablehook = lambda unraisable: None


_REASON_CHARS = 200


def _reason(e: BaseException) -> str:
    """One line on why ``e`` was raised; a CheckpointException's is its first rank's exception."""
    e = _causes(e)[0]
    message = (str(e).strip().splitlines() or [""])[0]
    line = f"{type(e).__name__}: {message}".rstrip(": ")
    if len(line) <= _REASON_CHARS:
        return line
    return line[: line.rfind(" ", 0, _REASON_CHARS - 3)].rstrip(" :,;") + " ..."  # whole words only


def _median(samples: Sequence[float]) -> Optional[float]:
    return statistics.median(samples) if samples else None


def measure(sd: Dict[str, Any], root: str, repeats: int, progress: Progress) -> Tuple[List[Dict[str, Any]], str]:
    """Interleaved save-then-load of every variant, ``repeats`` times (each repeat starts one variant later);
    the first load of each is checked bit for bit. Returns (one row per variant, the DCP calls made)."""
    probe_dir = os.path.join(root, "probe")
    os.mkdir(probe_dir)
    dcp = single_process_dcp(probe_dir)
    shutil.rmtree(probe_dir, ignore_errors=True)
    cases = variants()
    payload = payload_bytes(sd)
    with progress.step("allocating the load targets"):
        targets = targets_like(sd)
    samples: Dict[Tuple[str, str], List[float]] = {(v.name, op): [] for v in cases for op in ("save", "load")}
    errors: Dict[str, str] = {}
    checked = set()
    path = os.path.join(root, "ckpt")
    for r in range(repeats):
        shift = r % len(cases)
        for variant in cases[shift:] + cases[:shift]:
            where = f"repeat {r + 1}/{repeats}, {variant.name}"
            shutil.rmtree(path, ignore_errors=True)
            with progress.step(f"{where}: save"):
                seconds = _timed(dcp.save, sd, variant.make_writer(path))
            samples[(variant.name, "save")].append(seconds)
            if variant.name in errors:
                continue
            clear_(targets)
            try:
                with progress.step(f"{where}: load"):
                    seconds = _timed(dcp.load, targets, variant.make_reader(path))
            except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
                if not variant.load_may_fail or _interrupted(e):
                    raise
                errors[variant.name] = _reason(e)
                continue
            if variant.name not in checked:
                differs = first_difference(sd, targets)
                if differs is not None:
                    raise BenchError(f"{variant.name}: the loaded state dict is not bit-exact: {differs!r} differs")
                checked.add(variant.name)
            samples[(variant.name, "load")].append(seconds)
    shutil.rmtree(path, ignore_errors=True)
    rows = []
    for v in cases:
        row: Dict[str, Any] = {"writer": v.writer, "format": v.format}
        for op in ("save", "load"):
            median = _median(samples[(v.name, op)])
            row[f"{op}_seconds"] = samples[(v.name, op)]
            row[f"{op}_s"] = median
            row[f"{op}_gb_per_s"] = payload / 1e9 / median if median else None
        row["load_error"] = errors.get(v.name)
        row["bit_exact"] = True if v.name in checked else None
        rows.append(row)
    stock = next(row for row in rows if (row["writer"], row["format"]) == (STOCK, "TORCH_SAVE"))
    for row in rows:
        for op in ("save", "load"):
            ours, theirs = row[f"{op}_gb_per_s"], stock[f"{op}_gb_per_s"]
            row[f"{op}_vs_stock"] = ours / theirs if ours and theirs else None
    return rows, dcp.calls


# ---------------------------------------------------------------- report
def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(header: Dict[str, Any], rows: List[Dict[str, Any]]) -> str:
    cells = [["writer", "format", "save s", "GB/s", "vs stock", "load s", "GB/s", "vs stock", "bit-exact"]]
    for r in rows:
        load = ["fails", "-", "-"] if r["load_error"] else [
            _fmt(r["load_s"], ".3f"), _fmt(r["load_gb_per_s"], ".2f"), _fmt(r["load_vs_stock"], ".2f")]
        cells.append([r["writer"], r["format"], _fmt(r["save_s"], ".3f"), _fmt(r["save_gb_per_s"], ".2f"),
                      _fmt(r["save_vs_stock"], ".2f"), *load, "yes" if r["bit_exact"] else "-"])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = [
        f"{header['payload_bytes'] / 1e9:.3g} GB ({header['tensors']} tensors, {header['values']} other values) "
        f"in {header['dir']}; torch {header['torch']}; median of {header['repeats']}, sync_files=True",
        "",
    ]
    lines += [
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
        for row in cells
    ]
    lines.append("")
    lines += [f"{r['writer']} {r['format']}: the load fails: {r['load_error']}" for r in rows if r["load_error"]]
    lines += [
        "vs stock: GB/s over stock torch's TORCH_SAVE (its default). Loads fill preallocated tensors, from the "
        "page cache.",
        f"CRC-32: {header['crc32']}" + ("" if _crc.FAST else f" ({_crc.SLOW_NOTE})") + ".",
        f"DCP calls: {header['dcp_calls']}. The full benchmark: make bench (benchmarks/bench.py of a source "
        "checkout).",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        print("bench: error: --repeats must be at least 1", file=sys.stderr)
        return 2
    progress = Progress(sys.stderr)
    interrupted = False
    try:
        with scratch_directory(args.dir) as root:
            free = shutil.disk_usage(root).free
            if free < args.size * 1.05:
                raise BenchError(f"{root} has {free / 1e9:.3g} GB free, the checkpoints need about "
                                 f"{args.size * 1.05 / 1e9:.3g} GB")
            with progress.step(f"generating {args.size / 1e9:.3g} GB of tensors"):
                sd = make_state_dict(args.size)
            rows, calls = measure(sd, root, args.repeats, progress)
            progress.clear()
            header = {
                "torch": torch.__version__, "dir": os.path.abspath(args.dir or os.path.dirname(root)),
                "payload_bytes": payload_bytes(sd), "repeats": args.repeats,
                "tensors": sum(isinstance(v, torch.Tensor) for v in sd.values()),
                "values": sum(not isinstance(v, torch.Tensor) for v in sd.values()), "dcp_calls": calls,
                "crc32": _crc.IMPLEMENTATION,
            }
    except BenchError as e:
        progress.clear()
        print(f"bench: error: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, CheckpointException) as e:
        if not _interrupted(e):
            raise
        interrupted = True
    if interrupted:
        _quiet_finalizers()
        progress.clear()
        print("bench: interrupted; temporary checkpoints removed", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps({**header, "rows": rows}, indent=2))
    else:
        print(table(header, rows))
    return 0

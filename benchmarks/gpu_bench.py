#!/usr/bin/env python3
"""Save and load throughput of a CUDA state dict: dcp_filesystem vs stock torch, and its two save loaders.

Run from the repo root on a CUDA machine (torch >= 2.2):

    python3 benchmarks/gpu_bench.py [--gib 4] [--threads] [--repeats 3] [--skip-save] [--skip-load]
                                    [--json PATH] [--dir DIR]

Every case uses the same state dict (--gib GiB of --tensor-mib MiB bf16 tensors), sync_files=False,
single_file_per_rank=True.

Save rows (dcp.save), at thread_count 1, or 1, 2 and 4 with --threads:

- "dcp_filesystem overlapping": FileSystemWriter(per_thread_copy_ahead=10_000_000), the default;
- "dcp_filesystem serial": FileSystemWriter(per_thread_copy_ahead=0), which makes the writer copy each
  tensor to CPU when it is written;
- "stock torch": torch.distributed.checkpoint.FileSystemWriter, for reference.

Each save case first saves once untimed (warm-up), and that checkpoint is loaded back and checked
bit-exact; the loader classes the dcp_filesystem writer made are recorded, and on CUDA must be the
expected ones. "vs serial" = serial median / case median at the same thread count.

Load rows (dcp.load into zeroed tensors on the device, allocated once): dcp_filesystem's
FileSystemReader (thread_count 1, or 1, 2 and 4 with --threads) and stock torch's, each reading a
checkpoint its own writer wrote, in both formats (stock SAFETENSORS needs torch >= 2.8, and its reader
fails on it: the row says how). The checkpoints are written once, untimed, and stay in the page cache.
Each load case is checked bit-exact once, untimed. "peak host RSS +MiB" is the largest rise of the
process's peak RSS over its RSS before a timed load (the kernel's VmHWM, reset before each load);
"first load +MiB" is the same for the untimed check load (it includes one-time allocations such as
pinned buffers, which torch then keeps cached); "vs stock" = stock torch_save median / case median.

Timed rounds run the save cases, then the load cases, interleaved (each round starts at a different
case); the tables give medians.

--device cpu runs the same logic on CPU tensors: a smoke test of this script, not a GPU measurement.
Exits 2 when the device is CUDA and torch has none, or when torch has no dcp.save (2.1).
"""
import argparse
import datetime
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402

import dcp_filesystem  # noqa: E402
import dcp_filesystem._save_files  # noqa: E402

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from bench import reset_peak_rss, status_bytes  # noqa: E402

try:
    from torch.distributed.checkpoint.filesystem import SerializationFormat as StockFormat
except ImportError:  # torch < 2.8
    StockFormat = None

MiB = 1 << 20
OVERLAPPING, SERIAL, STOCK = "dcp_filesystem overlapping", "dcp_filesystem serial", "stock torch"
OURS = "dcp_filesystem"
FORMATS = ("torch_save", "safetensors")


class Case:
    """One writer configuration: variant name, writer class, per_thread_copy_ahead (None: the class default)."""

    def __init__(self, variant, threads):
        self.variant, self.threads = variant, threads
        self.writer_cls = dcp.FileSystemWriter if variant == STOCK else dcp_filesystem.FileSystemWriter
        self.copy_ahead = {OVERLAPPING: 10_000_000, SERIAL: 0, STOCK: None}[variant]

    def writer(self, path):
        kwargs = {} if self.copy_ahead is None else {"per_thread_copy_ahead": self.copy_ahead}
        return self.writer_cls(path, single_file_per_rank=True, sync_files=False, thread_count=self.threads, **kwargs)

    def expected_loader(self, device):
        """The loader class dcp_filesystem must use here, or None where any is right (stock, CPU smoke)."""
        if self.copy_ahead == 0:
            return "_SerialCpuLoader"
        if self.copy_ahead is not None and device == "cuda":
            return "_OverlappingCpuLoader"
        return None


class LoaderLog:
    """Records the class of every loader dcp_filesystem's writer makes while installed."""

    def __init__(self):
        self.names = []
        self._make_loader = dcp_filesystem._save_files._make_loader

    def __enter__(self):
        def recording(planner, inflight_threshhold, stream):
            loader = self._make_loader(planner, inflight_threshhold, stream)
            self.names.append(type(loader).__name__)
            return loader

        dcp_filesystem._save_files._make_loader = recording
        return self

    def __exit__(self, *exc):
        dcp_filesystem._save_files._make_loader = self._make_loader


class LoadCase:
    """One reader configuration: variant (OURS or STOCK), format, thread_count; it loads what its own
    variant's writer wrote in that format."""

    def __init__(self, variant, fmt, threads):
        self.variant, self.fmt, self.threads = variant, fmt, threads

    def writer(self, path):
        if self.variant == OURS:
            fmt = getattr(dcp_filesystem.SerializationFormat, self.fmt.upper())
            return dcp_filesystem.FileSystemWriter(path, sync_files=False, serialization_format=fmt)
        kwargs = {} if StockFormat is None else {"serialization_format": getattr(StockFormat, self.fmt.upper())}
        return dcp.FileSystemWriter(path, sync_files=False, **kwargs)

    def reader(self, path):
        if self.variant == OURS:
            return dcp_filesystem.FileSystemReader(path, thread_count=self.threads)
        return dcp.FileSystemReader(path)

    def unavailable(self):
        """Why this case cannot run on this torch, or None."""
        if self.variant == STOCK and self.fmt == "safetensors" and StockFormat is None:
            return f"n/a: torch {torch.__version__} has no SerializationFormat"
        return None


def build_state(device, gib, tensor_mib):
    count = max(1, round(gib * 1024 / tensor_mib))
    g = torch.Generator(device=device).manual_seed(0)
    rows = tensor_mib * MiB // 2 // 1024  # bf16: 2 bytes an element, 1024 columns
    return {f"layer{i}.weight": torch.randn(rows, 1024, generator=g, device=device, dtype=torch.bfloat16)
            for i in range(count)}


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def save(case, sd, path, device):
    """Seconds for one dcp.save into a fresh ``path``."""
    shutil.rmtree(path, ignore_errors=True)
    synchronize(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no process group: DCP warns and saves as one rank
        t0 = time.perf_counter()
        dcp.save(sd, storage_writer=case.writer(path))
        return time.perf_counter() - t0


def verify(sd, path):
    """Load ``path`` into zeroed CPU tensors and compare every byte with ``sd``."""
    target = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in sd.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(target, storage_reader=dcp_filesystem.FileSystemReader(path))
    for k, v in sd.items():
        if not torch.equal(v.cpu().view(torch.uint8), target[k].view(torch.uint8)):
            raise AssertionError(f"{path}: {k} loaded back differs from what was saved")


def same_bytes(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                      b.reshape(-1).view(torch.uint8))


def load(case, path, target, device):
    """(seconds, peak host RSS increase in bytes) of one dcp.load of ``path`` into ``target``."""
    gc.collect()
    synchronize(device)
    before = status_bytes("VmRSS")
    can_reset = reset_peak_rss()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        dcp.load(target, storage_reader=case.reader(path))
        synchronize(device)
        seconds = time.perf_counter() - t0
    peak = status_bytes("VmHWM") if can_reset else status_bytes("VmRSS")
    return seconds, max(0, peak - before)


def run_loads(cases, sd, device, repeats, root):
    """Write each (variant, format) checkpoint once, check each case once, then interleaved timed rounds."""
    target = {k: torch.zeros_like(v) for k, v in sd.items()}
    paths, failed, seconds, rss = {}, {}, {case: [] for case in cases}, {case: [] for case in cases}
    first_rss = {}
    runnable = []
    for case in cases:
        if case.unavailable():
            failed[case] = case.unavailable()
            continue
        key = (case.variant, case.fmt)
        if key not in paths:
            paths[key] = os.path.join(root, f"load-{case.variant.replace(' ', '_')}-{case.fmt}")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dcp.save(sd, storage_writer=case.writer(paths[key]))
        for t in target.values():
            t.zero_()
        try:
            _, first_rss[case] = load(case, paths[key], target, device)
        except BaseException as e:  # CheckpointException derives from BaseException
            if isinstance(e, KeyboardInterrupt):
                raise
            failed[case] = f"fails: {type(e).__name__}"
            continue
        bad = [k for k, v in sd.items() if not same_bytes(v, target[k])]
        if bad:
            raise AssertionError(f"{case.variant} {case.fmt}, {case.threads} threads: {bad[:3]} loaded wrong")
        runnable.append(case)
    for r in range(repeats):
        shift = r * len(runnable) // max(repeats, 1)
        for case in runnable[shift:] + runnable[:shift]:
            s, peak = load(case, paths[(case.variant, case.fmt)], target, device)
            seconds[case].append(s)
            rss[case].append(peak)
            print(f"round {r + 1}: load {case.variant} {case.fmt}, threads={case.threads}: {s:.3f} s, "
                  f"peak host RSS +{peak / MiB:.0f} MiB", file=sys.stderr, flush=True)
    for path in paths.values():
        shutil.rmtree(path, ignore_errors=True)
    payload = sum(t.numel() * t.element_size() for t in sd.values())
    rows = []
    for case in cases:
        row = {"variant": case.variant, "format": case.fmt, "threads": case.threads}
        if case in failed:
            row.update(failed=failed[case])
        else:
            median = statistics.median(seconds[case])
            row.update(seconds=seconds[case], median_s=median, gb_per_s=payload / 1e9 / median,
                       peak_rss_increase_mib=[b / MiB for b in rss[case]], peak_rss_mib=max(rss[case]) / MiB,
                       first_load_rss_mib=first_rss[case] / MiB)
        rows.append(row)
    stock = [r for r in rows if r["variant"] == STOCK and r["format"] == "torch_save" and "median_s" in r]
    for row in rows:
        if "median_s" in row and stock:
            row["vs_stock"] = stock[0]["median_s"] / row["median_s"]
    return rows


def run(cases, sd, device, repeats, root):
    """Warm-up + check per case, then interleaved timed rounds; rows in case order."""
    path = os.path.join(root, "ckpt")
    loaders, seconds = {}, {case: [] for case in cases}
    for case in cases:
        with LoaderLog() as log:
            save(case, sd, path, device)
        verify(sd, path)
        loaders[case] = sorted(set(log.names))
        expected = case.expected_loader(device)
        if expected is not None and loaders[case] != [expected]:
            raise AssertionError(f"{case.variant}, {case.threads} threads: loaders {loaders[case]}, not {expected}")
    for r in range(repeats):
        shift = r * len(cases) // repeats
        for case in cases[shift:] + cases[:shift]:
            seconds[case].append(save(case, sd, path, device))
            print(f"round {r + 1}: {case.variant}, threads={case.threads}: {seconds[case][-1]:.3f} s",
                  file=sys.stderr, flush=True)
    shutil.rmtree(path, ignore_errors=True)
    payload = sum(t.numel() * t.element_size() for t in sd.values())
    rows = []
    for case in cases:
        median = statistics.median(seconds[case])
        rows.append({"variant": case.variant, "threads": case.threads, "loaders": loaders[case],
                     "seconds": seconds[case], "median_s": median, "gb_per_s": payload / 1e9 / median})
    for row in rows:
        (serial,) = [r for r in rows if r["variant"] == SERIAL and r["threads"] == row["threads"]]
        row["vs_serial"] = serial["median_s"] / row["median_s"]
    return rows


def markdown(header, rows, load_rows):
    lines = [f"# dcp_filesystem GPU benchmark — {header['date']}", "",
             f"{header['device_name']}; torch {header['torch']} (CUDA {header['cuda']}), python {header['python']}, "
             f"{header['cpus']} CPUs; {header['tensors']} x {header['tensor_mib']} MiB bf16 "
             f"({header['payload_bytes'] / 2**30:.3g} GiB) on {header['device']}, sync_files=False; "
             f"median of {header['repeats']}; command: `{header['command']}`"]
    if rows:
        lines += ["", "## save", "",
                  "| variant | threads | loader | median s | GB/s | vs serial |",
                  "|---|---:|---|---:|---:|---:|"]
        for r in rows:
            loader = ", ".join(r["loaders"]) or "-"
            lines.append(f"| {r['variant']} | {r['threads']} | {loader} | {r['median_s']:.3f} | {r['gb_per_s']:.3g} "
                         f"| {r['vs_serial']:.2f} |")
    if load_rows:
        lines += ["", f"## load into {header['device']} tensors (checkpoint in the page cache)", "",
                  "| variant | format | threads | median s | GB/s | vs stock | peak host RSS +MiB | first load +MiB |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in load_rows:
            if "failed" in r:
                lines.append(f"| {r['variant']} | {r['format']} | {r['threads']} | {r['failed']} | - | - | - | - |")
                continue
            vs = f"{r['vs_stock']:.2f}" if "vs_stock" in r else "-"
            lines.append(f"| {r['variant']} | {r['format']} | {r['threads']} | {r['median_s']:.3f} "
                         f"| {r['gb_per_s']:.3g} | {vs} | {r['peak_rss_mib']:.0f} | {r['first_load_rss_mib']:.0f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=4.0, help="state dict size in GiB (default 4)")
    p.add_argument("--tensor-mib", type=int, default=128, help="size of each bf16 tensor in MiB (default 128)")
    p.add_argument("--threads", action="store_true",
                   help="run dcp_filesystem's cases with thread_count 1, 2 and 4 (default: 1)")
    p.add_argument("--skip-save", action="store_true", help="no save rows")
    p.add_argument("--skip-load", action="store_true", help="no load rows")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3; the median is reported)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: smoke test of this script")
    p.add_argument("--json", default=os.path.join("bench-results", "gpu_bench.json"), help="where to write JSON")
    p.add_argument("--dir", help="directory for the scratch checkpoint (default: a new temp dir)")
    args = p.parse_args()
    if not hasattr(dcp, "save"):
        print(f"gpu_bench: torch {torch.__version__} has no dcp.save; this benchmark needs torch >= 2.2",
              file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu_bench: CUDA is not available (torch {torch.__version__}, built with CUDA {torch.version.cuda}); "
              "run it on a CUDA machine, or pass --device cpu for a smoke test of the script", file=sys.stderr)
        return 2
    thread_counts = [1, 2, 4] if args.threads else [1]
    cases = [] if args.skip_save else [Case(v, t) for t in thread_counts for v in (OVERLAPPING, SERIAL, STOCK)]
    load_cases = [] if args.skip_load else (
        [LoadCase(OURS, f, t) for f in FORMATS for t in thread_counts] + [LoadCase(STOCK, f, 1) for f in FORMATS])
    root = tempfile.mkdtemp(prefix="dcp-gpu-bench-", dir=args.dir)
    sd = {}
    try:
        sd.update(build_state(args.device, args.gib, args.tensor_mib))
        header = {
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(), "cpus": os.cpu_count(),
            "device": args.device,
            "device_name": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "CPU",
            "tensors": len(sd), "tensor_mib": args.tensor_mib,
            "payload_bytes": sum(t.numel() * t.element_size() for t in sd.values()), "repeats": args.repeats,
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        }
        rows = run(cases, sd, args.device, args.repeats, root) if cases else []
        load_rows = run_loads(load_cases, sd, args.device, args.repeats, root) if load_cases else []
    finally:
        shutil.rmtree(root, ignore_errors=True)
        sd.clear()  # the only reference to the device tensors
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    print(markdown(header, rows, load_rows))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"header": header, "rows": rows, "load_rows": load_rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

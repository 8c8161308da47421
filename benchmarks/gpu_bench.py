#!/usr/bin/env python3
"""Save throughput of a CUDA state dict: dcp_filesystem's overlapping loader vs its serial loader vs stock torch.

Run from the repo root on a CUDA machine (torch >= 2.2):

    python3 benchmarks/gpu_bench.py [--gib 4] [--threads] [--repeats 3] [--json PATH] [--dir DIR]

Every case saves the same state dict (--gib GiB of --tensor-mib MiB bf16 tensors) with dcp.save,
sync_files=False, single_file_per_rank=True:

- "dcp_filesystem overlapping": FileSystemWriter(per_thread_copy_ahead=10_000_000), the default;
- "dcp_filesystem serial": FileSystemWriter(per_thread_copy_ahead=0), which makes the writer copy each
  tensor to CPU when it is written;
- "stock torch": torch.distributed.checkpoint.FileSystemWriter, for reference.

Each case first saves once untimed (warm-up), and that checkpoint is loaded back and checked bit-exact;
the loader classes the dcp_filesystem writer made are recorded, and on CUDA must be the expected ones.
Then --repeats timed rounds run every case, interleaved (each round starts at a different case); the
table gives the median, and "vs serial" = serial median / case median at the same thread count.

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
import dcp_filesystem.writer  # noqa: E402

MiB = 1 << 20
OVERLAPPING, SERIAL, STOCK = "dcp_filesystem overlapping", "dcp_filesystem serial", "stock torch"


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
        self._make_loader = dcp_filesystem.writer._make_loader

    def __enter__(self):
        def recording(planner, inflight_threshhold, stream):
            loader = self._make_loader(planner, inflight_threshhold, stream)
            self.names.append(type(loader).__name__)
            return loader

        dcp_filesystem.writer._make_loader = recording
        return self

    def __exit__(self, *exc):
        dcp_filesystem.writer._make_loader = self._make_loader


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


def markdown(header, rows):
    lines = [f"# dcp_filesystem GPU save benchmark — {header['date']}", "",
             f"{header['device_name']}; torch {header['torch']} (CUDA {header['cuda']}), python {header['python']}, "
             f"{header['cpus']} CPUs; {header['tensors']} x {header['tensor_mib']} MiB bf16 "
             f"({header['payload_bytes'] / 2**30:.3g} GiB) on {header['device']}, sync_files=False; "
             f"median of {header['repeats']}; command: `{header['command']}`", "",
             "| variant | threads | loader | median s | GB/s | vs serial |",
             "|---|---:|---|---:|---:|---:|"]
    for r in rows:
        loader = ", ".join(r["loaders"]) or "-"
        lines.append(f"| {r['variant']} | {r['threads']} | {loader} | {r['median_s']:.3f} | {r['gb_per_s']:.3g} "
                     f"| {r['vs_serial']:.2f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=4.0, help="state dict size in GiB (default 4)")
    p.add_argument("--tensor-mib", type=int, default=128, help="size of each bf16 tensor in MiB (default 128)")
    p.add_argument("--threads", action="store_true", help="also run every case with thread_count=4")
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
    cases = [Case(v, t) for t in ([1, 4] if args.threads else [1]) for v in (OVERLAPPING, SERIAL, STOCK)]
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
        rows = run(cases, sd, args.device, args.repeats, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        sd.clear()  # the only reference to the device tensors
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    print(markdown(header, rows))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"header": header, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

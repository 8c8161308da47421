#!/usr/bin/env python3
"""Save/load throughput of dcp_filesystem vs stock torch.distributed.checkpoint, single-process peers, raw file I/O.

Run from the repo root:
  python benchmarks/bench.py [--quick] [--cold] [--json PATH] [--repeats N] [--dir DIR] [--workload W]
What is measured: the "Benchmark" section of README.rst. Optional libraries (safetensors) are imported
only inside their variants, so this module imports on every supported torch without them.
"""
import argparse
import ctypes
import datetime
import gc
import inspect
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint.api import CheckpointException  # noqa: E402

import dcp_filesystem  # noqa: E402
from dcp_filesystem._compat import single_process_dcp  # noqa: E402

try:
    from torch.distributed.checkpoint.filesystem import SerializationFormat as StockFormat
except ImportError:  # torch < 2.8
    StockFormat = None

# torch 2.1 logs an INFO line per save from here, on stderr
logging.getLogger("torch.distributed.checkpoint._dedup_tensors").setLevel(logging.WARNING)

MiB = 1 << 20
CHUNK = 64 * MiB


# ---------------------------------------------------------------- workloads
def workloads(quick):
    """name -> callable building the state dict (built lazily: one workload in memory at a time)."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    def llm():
        sd = {f"layers.{i}.weight": randn(2048, 4096) for i in range(2 if quick else 32)}  # 32 MiB each
        sd.update({f"norms.{i}.weight": randn(256) for i in range(500 if quick else 2000)})  # 1 KiB each
        sd.update(step=1234, epoch=7, config={"lr": 3e-4, "betas": [0.9, 0.95]}, name="bench-llm")
        return sd

    def tiny():
        return {f"t.{i}": randn(4) for i in range(1000 if quick else 20000)}

    def one_big():
        return {"weight": randn(16 * MiB if quick else 256 * MiB)}  # 64 MiB / 1 GiB of float32

    return {"llm": llm, "tiny": tiny, "one-big": one_big}


def tensors(sd):
    """The tensors of a nested state dict, in a fixed order."""
    if isinstance(sd, torch.Tensor):
        return [sd]
    if isinstance(sd, dict):
        return [t for k in sorted(sd) for t in tensors(sd[k])]
    if isinstance(sd, list):
        return [t for v in sd for t in tensors(v)]
    return []


def zeros_like_state(sd):
    """Same structure, tensors zeroed, other values replaced by None (DCP load fills them in)."""
    if isinstance(sd, torch.Tensor):
        return torch.zeros_like(sd)
    if isinstance(sd, dict):
        return {k: zeros_like_state(v) for k, v in sd.items()}
    if isinstance(sd, list):
        return [zeros_like_state(v) for v in sd]
    return None


def assert_equal(expected, actual, where):
    """Bit-exact equality of nested state dicts; raises AssertionError naming the first difference."""
    if isinstance(expected, torch.Tensor):
        ok = isinstance(actual, torch.Tensor) and actual.dtype == expected.dtype and actual.shape == expected.shape
        if not (ok and torch.equal(actual.view(torch.uint8), expected.view(torch.uint8))):
            raise AssertionError(f"loaded data differs at {where}")
    elif isinstance(expected, dict):
        if set(expected) != set(actual):
            raise AssertionError(f"loaded keys differ at {where}")
        for k in expected:
            assert_equal(expected[k], actual[k], f"{where}.{k}")
    elif isinstance(expected, list):
        for i, (e, a) in enumerate(zip(expected, actual)):
            assert_equal(e, a, f"{where}[{i}]")
    elif expected != actual:
        raise AssertionError(f"loaded value differs at {where}: {actual!r} != {expected!r}")


def named_tensors(sd, name=""):
    """(dotted name, tensor) of every tensor of a nested state dict, in the order of tensors()."""
    if isinstance(sd, torch.Tensor):
        return [(name, sd)]
    if isinstance(sd, (dict, list)):
        keys = sorted(sd) if isinstance(sd, dict) else range(len(sd))
        return [nt for k in keys for nt in named_tensors(sd[k], f"{name}.{k}" if name else str(k))]
    return []


def _entries(container):
    return list(container.items() if isinstance(container, dict) else enumerate(container))


def clear_(sd):
    """The state every load starts from: tensors zeroed in place (the targets stay allocated and
    touched), other values set to None, so that each load must fill in both."""
    if isinstance(sd, torch.Tensor):
        sd.zero_()
        return
    for k, v in _entries(sd):
        if isinstance(v, torch.Tensor):
            v.zero_()
        elif isinstance(v, (dict, list)):
            clear_(v)
        else:
            sd[k] = None


def fill_(dest, loaded):
    """A loaded state dict into dest: its tensors copy_'d into dest's tensors, other values assigned."""
    for k, v in _entries(dest):
        if isinstance(v, torch.Tensor):
            v.copy_(loaded[k])
        elif isinstance(v, (dict, list)):
            fill_(v, loaded[k])
        else:
            dest[k] = loaded[k]


# ---------------------------------------------------------------- variants
_DCP = []


def _dcp():
    """DCP's entry points for one process, as the package probes them (once, before any timed call)."""
    if not _DCP:
        with tempfile.TemporaryDirectory(prefix="dcp-bench-probe-") as path:
            _DCP.append(single_process_dcp(path))
    return _DCP[0]


def probe_dcp():
    """The calls dcp_save and dcp_load make here, in words."""
    return _dcp().calls


def dcp_save(sd, writer):
    _dcp().save(sd, writer)


def dcp_load(sd, reader):
    _dcp().load(sd, reader)


STORAGE_METHODS = (
    "reset", "set_up_storage_writer", "set_up_storage_reader", "read_metadata", "prepare_local_plan",
    "prepare_global_plan", "write_data", "read_data", "finish", "storage_meta",
)


def timing_storage_calls(storage):
    """``storage`` with every call DCP makes into it timed; returns (storage, [seconds inside them])."""
    spent = [0.0]
    for name in STORAGE_METHODS:
        method = getattr(storage, name, None)
        if method is None:
            continue

        def timed_method(*args, _method=method, **kwargs):
            t0 = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - t0

        setattr(storage, name, timed_method)
    return storage, spent


class DcpVariant:
    """A FileSystemWriter/FileSystemReader pair, optionally with a serialization_format.

    save and load return the seconds spent inside the storage layer's methods; the
    rest of a dcp.save/dcp.load is DCP's own work (planning, metadata), the same
    for any storage layer.
    """

    threaded = True  # one case per thread_count
    tensors_only = False

    def __init__(self, name, writer_cls, reader_cls, fmt=None, load_may_fail=False, reader_threads=False):
        self.name, self.writer_cls, self.reader_cls, self.fmt = name, writer_cls, reader_cls, fmt
        self.load_may_fail, self.reader_threads = load_may_fail, reader_threads

    def save(self, sd, path, sync, threads):
        kwargs = {} if self.fmt is None else {"serialization_format": self.fmt}
        writer, spent = timing_storage_calls(self.writer_cls(path, sync_files=sync, thread_count=threads, **kwargs))
        dcp_save(sd, writer)
        return spent[0]

    def load(self, dest, path, threads):
        kwargs = {"thread_count": threads} if self.reader_threads else {}
        reader, spent = timing_storage_calls(self.reader_cls(path, **kwargs))
        dcp_load(dest, reader)
        return spent[0]


def byte_view(tensor):
    """A writable memoryview over a contiguous CPU tensor's bytes (no NumPy)."""
    nbytes = tensor.numel() * tensor.element_size()
    return memoryview((ctypes.c_ubyte * nbytes).from_address(tensor.data_ptr())).cast("B")


class RawVariant:
    """The payload as one flat buffer: chunked write (+ fsync) to one file, chunked readinto back."""

    name = "raw"
    load_may_fail = False
    threaded = False

    def save(self, flat, path, sync, threads):
        os.makedirs(path)
        view = byte_view(flat)
        with open(os.path.join(path, "raw.bin"), "wb", buffering=0) as f:
            for off in range(0, len(view), CHUNK):
                f.write(view[off : off + CHUNK])
            if sync:
                os.fsync(f.fileno())

    def load(self, dest, path, threads):
        view = byte_view(dest)
        with open(os.path.join(path, "raw.bin"), "rb", buffering=0) as f:
            off = 0
            while off < len(view):
                n = f.readinto(view[off : off + CHUNK])
                if not n:
                    raise EOFError(path)
                off += n


def fsync_file(file):
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SafetensorsPeer:
    """What a single process would call without DCP: safetensors.torch.save_file of the tensors
    (non-tensor values have no place in a .safetensors file), then safe_open and get_tensor(name)
    copy_'d into each target."""

    name = "safetensors save_file/safe_open"
    load_may_fail = False
    threaded = False
    tensors_only = True

    def __init__(self):
        from safetensors import safe_open  # optional: ImportError skips these rows
        from safetensors.torch import save_file

        self.safe_open, self.save_file = safe_open, save_file
        with tempfile.TemporaryDirectory(prefix="dcp-bench-probe-") as path:
            # what save_file imports when it runs (some versions need NumPy), raised here
            self.save({"t": torch.ones(2)}, os.path.join(path, "probe"), sync=False, threads=1)

    def save(self, sd, path, sync, threads):
        os.makedirs(path)
        file = os.path.join(path, "model.safetensors")
        self.save_file(dict(named_tensors(sd)), file)
        if sync:
            fsync_file(file)

    def load(self, dest, path, threads):
        with self.safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
            for name, target in named_tensors(dest):
                target.copy_(f.get_tensor(name))


class TorchSavePeer:
    """torch.save of the whole state dict (tensors and other values) to one file, then
    torch.load(weights_only=True), with mmap=True or without, copy_'d into the targets."""

    load_may_fail = False
    threaded = False
    tensors_only = False

    def __init__(self, mmap):
        self.mmap = mmap
        self.name = "torch.save/torch.load mmap" if mmap else "torch.save/torch.load"

    def save(self, sd, path, sync, threads):
        os.makedirs(path)
        file = os.path.join(path, "model.pt")
        torch.save(sd, file)
        if sync:
            fsync_file(file)

    def load(self, dest, path, threads):
        kwargs = {"mmap": True} if self.mmap else {}
        fill_(dest, torch.load(os.path.join(path, "model.pt"), weights_only=True, **kwargs))


def variants():
    """DCP variants: this package and stock torch, each run at thread_count 1 and 2."""
    out = [
        DcpVariant("dcp_filesystem torch_save", dcp_filesystem.FileSystemWriter, dcp_filesystem.FileSystemReader,
                   dcp_filesystem.SerializationFormat.TORCH_SAVE, reader_threads=True),
        DcpVariant("dcp_filesystem safetensors", dcp_filesystem.FileSystemWriter, dcp_filesystem.FileSystemReader,
                   dcp_filesystem.SerializationFormat.SAFETENSORS, reader_threads=True),
        DcpVariant("stock torch_save", dcp.FileSystemWriter, dcp.FileSystemReader),
    ]
    if StockFormat is not None:
        out.append(DcpVariant("stock safetensors", dcp.FileSystemWriter, dcp.FileSystemReader,
                              StockFormat.SAFETENSORS, load_may_fail=True))
    return out


def peers():
    """(peer variants, reasons for the peers left out): one process's own save and load calls."""
    out, skipped = [], []
    try:
        out.append(SafetensorsPeer())
    except ImportError as e:
        skipped.append(f"safetensors rows skipped: safetensors' save_file cannot run here ({type(e).__name__}: {e})")
    out.append(TorchSavePeer(mmap=False))
    if "mmap" in inspect.signature(torch.load).parameters:
        out.append(TorchSavePeer(mmap=True))
    else:
        skipped.append(f"torch.load mmap row skipped: torch {torch.__version__}'s torch.load has no mmap")
    return out, skipped


# ---------------------------------------------------------------- timing
def status_bytes(field):
    """A memory figure of /proc/self/status (VmRSS, VmHWM) in bytes; 0 where there is none."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss():
    """Set the kernel's peak-RSS mark (VmHWM) to the current RSS; False where that cannot be done."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def drop_page_cache():
    """Write back dirty pages, then drop the clean ones (and dentries, inodes): the next read is
    from the disk. Raises OSError where /proc/sys/vm/drop_caches cannot be written (not root)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def filesystem_type(path):
    """The type of the file system holding path (its longest mount point in /proc/self/mounts), or None."""
    path, best = os.path.realpath(path), (-1, None)
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                mount = fields[1].replace("\\040", " ")
                inside = path == mount or path.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) > best[0]:
                    best = (len(mount), fields[2])
    except OSError:
        pass
    return best[1]


def cold_unavailable(scratch):
    """None where loads from the scratch directory can be made cold here, else why not."""
    if filesystem_type(scratch) in ("tmpfs", "ramfs"):
        return f"the scratch directory {scratch} is on {filesystem_type(scratch)}, which lives in memory: " \
               "dropping the page cache cannot make its loads cold (pass --dir on a disk)"
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "not root: dropping the page cache needs root (/proc/sys/vm/drop_caches)"
    try:
        drop_page_cache()
    except OSError as e:
        return f"cannot write /proc/sys/vm/drop_caches: {e}"
    return None


def timed(fn, *args, cold=False):
    """(seconds, peak RSS increase in bytes, seconds inside the storage layer or None) of fn(*args).

    Dirty pages of earlier cases are flushed and garbage collected first, so one case's writeback or
    garbage is not timed in the next; with ``cold`` the page cache is then dropped. Peak RSS is the
    kernel's own mark, reset before the call; where it cannot be reset, a thread samples RSS every
    ~2 ms (which takes some CPU from the timed call).
    """
    os.sync()
    gc.collect()
    if cold:
        drop_page_cache()
    before = status_bytes("VmRSS")
    peak, stop, sampler = [0], threading.Event(), None
    if not reset_peak_rss():
        def sample():
            while not stop.wait(0.002):
                peak[0] = max(peak[0], status_bytes("VmRSS"))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
    t0 = time.perf_counter()
    storage_seconds = fn(*args)
    seconds = time.perf_counter() - t0
    if sampler is None:
        peak[0] = status_bytes("VmHWM")
    else:
        stop.set()
        sampler.join()
        peak[0] = max(peak[0], status_bytes("VmRSS"))
    return seconds, max(0, peak[0] - before), storage_seconds


def run_workload(name, sd, cases, repeats, root, results, progress, cold=False):
    """Interleaved repeats of save-then-load for every case; appends row dicts to results.
    Every load fills the same preallocated targets (``dest``, zeroed and so touched before each load);
    with ``cold`` the page cache is dropped before each load."""
    flat = torch.cat([t.reshape(-1).view(torch.uint8) for t in tensors(sd)])
    payload = flat.numel()
    dest, flat_dest = zeros_like_state(sd), torch.zeros_like(flat)
    samples = {(c, op): [] for c in cases for op in ("save", "load")}
    failed, verified = {}, set()
    path = os.path.join(root, "ckpt")
    for r in range(repeats):
        shift = r * len(cases) // repeats
        for n, case in enumerate(cases[shift:] + cases[:shift], 1):
            variant, sync, threads = case
            progress(f"{name}: repeat {r + 1}/{repeats}, case {n}/{len(cases)}: {variant.name}, "
                     f"sync {sync}, threads {threads}")
            raw = isinstance(variant, RawVariant)
            src, dst = (flat, flat_dest) if raw else (sd, dest)
            shutil.rmtree(path, ignore_errors=True)
            samples[(case, "save")].append(timed(variant.save, src, path, sync, threads))
            if case in failed:
                continue
            clear_(dst)
            try:
                result = timed(variant.load, dst, path, threads, cold=cold)
            except (Exception, CheckpointException) as e:
                if not variant.load_may_fail:
                    raise
                failed[case] = f"fails: {type(e).__name__}"
                continue
            if case not in verified:
                where = f"{name}/{variant.name}/sync={sync}/threads={threads}"
                if getattr(variant, "tensors_only", False):
                    assert_equal(tensors(src), tensors(dst), where)
                else:
                    assert_equal(src, dst, where)
                verified.add(case)
            samples[(case, "load")].append(result)
    shutil.rmtree(path, ignore_errors=True)
    for op, case in [(op, case) for op in ("save", "load") for case in cases]:
        variant, sync, threads = case
        runs = samples[(case, op)]
        seconds = [s for s, _, _ in runs]
        median = statistics.median(seconds) if seconds else None
        inside = [i for _, _, i in runs if i is not None]
        outside = [s - i for s, _, i in runs if i is not None]
        results.append({
            "workload": name, "op": op, "cold": cold and op == "load", "variant": variant.name, "sync": sync,
            "threads": threads if variant.threaded else None,
            "payload_bytes": payload, "seconds": seconds, "median_s": median,
            "gb_per_s": payload / 1e9 / median if median else None,
            "storage_s": statistics.median(inside) if inside else None,
            "outside_storage_s": statistics.median(outside) if outside else None,
            "peak_rss_mib": max(m for _, m, _ in runs) / MiB if runs else None,
            "error": failed.get(case) if op == "load" else None,
        })


def add_ratios(rows):
    """vs stock / vs raw: throughput ratios. ceiling: stock's time over this row's time outside the
    storage layer, the ratio to stock that a storage layer taking no time at all would reach."""
    def find(workload, op, variant, sync, threads):
        key = (workload, op, variant, sync, threads)
        for r in rows:
            if (r["workload"], r["op"], r["variant"], r["sync"], r["threads"]) == key:
                return r
        return None

    for r in rows:
        key = (r["workload"], r["op"])
        stock = find(*key, "stock torch_save", r["sync"], r["threads"]) if r["threads"] else None
        raw = find(*key, "raw", r["sync"], None)
        r["vs_stock"] = r["gb_per_s"] / stock["gb_per_s"] if r["gb_per_s"] and stock and stock["gb_per_s"] else None
        r["vs_raw"] = r["gb_per_s"] / raw["gb_per_s"] if r["gb_per_s"] and raw and raw["gb_per_s"] else None
        outside = r["outside_storage_s"]
        r["ceiling_vs_stock"] = stock["median_s"] / outside if stock and stock["median_s"] and outside else None


# ---------------------------------------------------------------- report
def terminal_progress():
    """A function that shows one line of progress on stderr, overwriting the last ("" clears it)."""
    width = [0]

    def show(line):
        print("\r" + line.ljust(width[0]) + ("\r" if not line else ""), end="", file=sys.stderr, flush=True)
        width[0] = len(line)

    return show


def markdown(header, rows):
    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    loads = header.get("loads", "warm: from the page cache")
    notes = [f"Loads {loads}. Every load fills the same preallocated target tensors, zeroed (so already "
             "touched) before each load; the peers' loads copy_ into them. safetensors save_file/safe_open "
             "saves the tensors only (a .safetensors file holds no other values); torch.save saves the whole "
             "state dict and torch.load(weights_only=True) reads it all back. \"storage ms\" is the time "
             "inside the storage layer's methods (write_data, finish; read_metadata, read_data; ...), "
             "\"DCP ms\" the rest of a dcp.save/dcp.load; peers and raw have neither."]
    if header.get("dcp_calls"):
        notes.append(f"DCP calls: {header['dcp_calls']}.")
    notes += header.get("skipped", [])
    lines = [f"# dcp_filesystem benchmark — {header['date']}", "",
             f"torch {header['torch']}, python {header['python']}, {header['cpus']} CPUs; "
             f"repeats {header['repeats']} (median); command: `{header['command']}`", "",
             *[line for note in notes for line in (note, "")],
             "| workload | op | variant | sync | threads | median ms | storage ms | DCP ms | GB/s | vs stock "
             "| ceiling | vs raw | peak RSS +MiB |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ms = r["error"] or fmt(r["median_s"] and r["median_s"] * 1e3, ".1f")
        op = r["op"] + (" cold" if r.get("cold") else "")
        inside, outside = r.get("storage_s"), r["outside_storage_s"]
        lines.append(f"| {r['workload']} | {op} | {r['variant']} | {r['sync']} | {fmt(r['threads'], 'd')} "
                     f"| {ms} | {fmt(inside and inside * 1e3, '.1f')} | {fmt(outside and outside * 1e3, '.1f')} "
                     f"| {fmt(r['gb_per_s'], '.4g')} | {fmt(r['vs_stock'], '.2f')} "
                     f"| {fmt(r['ceiling_vs_stock'], '.2f')} | {fmt(r['vs_raw'], '.2f')} "
                     f"| {fmt(r['peak_rss_mib'], '.0f')} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, 3 repeats, sync=True only (about a minute)")
    p.add_argument("--cold", action="store_true",
                   help="drop the page cache before each load (needs root; runs warm, saying why, otherwise)")
    p.add_argument("--json", default=os.path.join("bench-results", "bench.json"), help="where to write the JSON")
    p.add_argument("--repeats", type=int, help="repeats per case (default 5, --quick 3)")
    p.add_argument("--dir", help="scratch directory for checkpoints (default: a new temp dir)")
    p.add_argument("--workload", action="append", choices=list(workloads(False)),
                   help="run only this workload (repeatable; default: all)")
    args = p.parse_args()
    repeats = args.repeats or (3 if args.quick else 5)
    syncs = [True] if args.quick else [True, False]
    peer_variants, skipped = peers()
    root = tempfile.mkdtemp(prefix="dcp-bench-", dir=args.dir)
    rows = []
    try:
        cold, loads = False, "warm: from the page cache"
        if args.cold:
            reason = cold_unavailable(root)
            if reason is None:
                cold = True
                loads = "cold: the page cache dropped (os.sync(), then 3 > /proc/sys/vm/drop_caches) before each"
            else:
                skipped.append(f"--cold skipped: {reason}; loads run warm")
        for line in skipped:
            print(line, file=sys.stderr, flush=True)
        dcp_calls = probe_dcp()
        cases = [(v, s, t) for s in syncs for v in variants() for t in (1, 2)]
        cases += [(v, s, 1) for s in syncs for v in peer_variants]
        cases += [(RawVariant(), s, 1) for s in syncs]
        header = {
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
            "python": platform.python_version(), "cpus": os.cpu_count(), "repeats": repeats,
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "quick": args.quick,
            "cold": cold, "loads": loads, "skipped": skipped, "dcp_calls": dcp_calls,
        }
        progress = terminal_progress() if sys.stderr.isatty() else (lambda line: None)
        for name, build in workloads(args.quick).items():
            if args.workload and name not in args.workload:
                continue
            t0 = time.perf_counter()
            run_workload(name, build(), cases, repeats, root, rows, progress, cold=cold)
            progress("")
            print(f"workload {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    add_ratios(rows)
    print(markdown(header, rows))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"header": header, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Save/load throughput of dcp_filesystem vs stock torch.distributed.checkpoint, single-process peers, raw file I/O.

Run from the repo root:
  python benchmarks/bench.py [--quick] [--cold] [--json PATH] [--repeats N] [--dir DIR] [--workload W]
                             [--docs | --no-docs]
A full run (all workloads, no --quick) also writes benchmarks/RESULTS.md, benchmarks/summary.png (with
matplotlib) and README.rst's summary table, all three from its rows; --docs and --no-docs decide instead.
What is measured: the "Benchmark" section of README.rst. Optional libraries (safetensors) are imported
only inside their variants, so this module imports on every supported torch without them.
"""
import argparse
import ctypes
import datetime
import gc
import importlib.util
import inspect
import json
import logging
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import textwrap
import threading
import time
import typing

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


def package_variants(prefix, package):
    return [
        DcpVariant(f"{prefix} torch_save", package.FileSystemWriter, package.FileSystemReader,
                   package.SerializationFormat.TORCH_SAVE, reader_threads=True),
        DcpVariant(f"{prefix} safetensors", package.FileSystemWriter, package.FileSystemReader,
                   package.SerializationFormat.SAFETENSORS, reader_threads=True),
    ]


def baseline_package(directory):
    """The package folder of another revision (``directory`` holds its ``__init__.py``), imported under a
    name of its own, as a vendored copy is."""
    init = os.path.join(directory, "__init__.py")
    if not os.path.isfile(init):
        raise SystemExit(f"--baseline {directory}: no __init__.py there (give a checkout's dcp_filesystem folder)")
    spec = importlib.util.spec_from_file_location(BASELINE_MODULE, init, submodule_search_locations=[directory])
    module = importlib.util.module_from_spec(spec)
    sys.modules[BASELINE_MODULE] = module
    spec.loader.exec_module(module)
    return module


BASELINE_MODULE = "dcp_filesystem_baseline"


def variants(baseline=None):
    """DCP variants: this package (and a baseline revision of it), stock torch, each at thread_count 1 and 2."""
    out = package_variants("dcp_filesystem", dcp_filesystem)
    if baseline is not None:
        out += package_variants("baseline", baseline)
    out.append(DcpVariant("stock torch_save", dcp.FileSystemWriter, dcp.FileSystemReader))
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
    with ``cold`` each save is followed by two loads, one from the page cache and one after dropping it."""
    flat = torch.cat([t.reshape(-1).view(torch.uint8) for t in tensors(sd)])
    payload = flat.numel()
    dest, flat_dest = zeros_like_state(sd), torch.zeros_like(flat)
    loads = (False, True) if cold else (False,)
    ops = [("save", False)] + [("load", c) for c in loads]
    samples = {(c, op): [] for c in cases for op in ops}
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
            samples[(case, ("save", False))].append(timed(variant.save, src, path, sync, threads))
            for load_cold in loads:
                if case in failed:
                    break
                clear_(dst)
                try:
                    result = timed(variant.load, dst, path, threads, cold=load_cold)
                except (Exception, CheckpointException) as e:
                    if not variant.load_may_fail:
                        raise
                    failed[case] = f"fails: {type(e).__name__}"
                    break
                if (case, load_cold) not in verified:
                    where = f"{name}/{variant.name}/sync={sync}/threads={threads}/cold={load_cold}"
                    if getattr(variant, "tensors_only", False):
                        assert_equal(tensors(src), tensors(dst), where)
                    else:
                        assert_equal(src, dst, where)
                    verified.add((case, load_cold))
                samples[(case, ("load", load_cold))].append(result)
    shutil.rmtree(path, ignore_errors=True)
    for (op, op_cold), case in [(op, case) for op in ops for case in cases]:
        variant, sync, threads = case
        runs = samples[(case, (op, op_cold))]
        seconds = [s for s, _, _ in runs]
        median = statistics.median(seconds) if seconds else None
        inside = [i for _, _, i in runs if i is not None]
        outside = [s - i for s, _, i in runs if i is not None]
        results.append({
            "workload": name, "op": op, "cold": op_cold, "variant": variant.name, "sync": sync,
            "threads": threads if variant.threaded else None,
            "payload_bytes": payload, "seconds": seconds, "median_s": median,
            "gb_per_s": payload / 1e9 / median if median else None,
            "storage_s": statistics.median(inside) if inside else None,
            "storage_seconds": [i for _, _, i in runs],
            "outside_storage_s": statistics.median(outside) if outside else None,
            "peak_rss_mib": max(m for _, m, _ in runs) / MiB if runs else None,
            "error": failed.get(case) if op == "load" else None,
        })


STOCK, SAFETENSORS_LIB = "stock torch_save", "safetensors save_file/safe_open"
TORCH_LOAD_MMAP = "torch.save/torch.load mmap"
OURS_TS, OURS_ST = "dcp_filesystem torch_save", "dcp_filesystem safetensors"


def find_row(rows, workload, op, cold, variant, sync, threads):
    """The row of that case, or None; a row without a thread count (peers, raw) matches any ``threads``."""
    for r in rows:
        if (r["workload"], r["op"], bool(r.get("cold")), r["variant"], r["sync"]) == (
                workload, op, cold, variant, sync) and r["threads"] in (threads, None):
            return r
    return None


def add_ratios(rows):
    """vs stock / vs raw: throughput ratios. ceiling: stock's time over this row's time outside the
    storage layer, the ratio to stock that a storage layer taking no time at all would reach."""
    for r in rows:
        key = (rows, r["workload"], r["op"], bool(r.get("cold")))
        stock = find_row(*key, STOCK, r["sync"], r["threads"]) if r["threads"] else None
        raw = find_row(*key, "raw", r["sync"], None)
        r["vs_stock"] = r["gb_per_s"] / stock["gb_per_s"] if r["gb_per_s"] and stock and stock["gb_per_s"] else None
        r["vs_raw"] = r["gb_per_s"] / raw["gb_per_s"] if r["gb_per_s"] and raw and raw["gb_per_s"] else None
        outside = r["outside_storage_s"]
        r["ceiling_vs_stock"] = stock["median_s"] / outside if stock and stock["median_s"] and outside else None


def crc32_implementation():
    """Which CRC-32 this run's dcp_filesystem computes its checksums with (zlib-ng, or Python's zlib)."""
    from dcp_filesystem import _crc

    return _crc.IMPLEMENTATION


OPTIONAL_PACKAGES = ("zlib-ng", "zstandard", "safetensors", "numpy", "pytest")


def installed_packages():
    """The version of each package of OPTIONAL_PACKAGES this interpreter has (None: not installed): which
    install the run measured (a plain ``pip install .`` has zlib-ng, the peers safetensors and NumPy)."""
    from importlib import metadata

    found = {}
    for name in OPTIONAL_PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def packages_line(header):
    found = header.get("packages")
    if not found:
        return "?"
    have = ", ".join(f"{name} {version}" for name, version in found.items() if version)
    missing = ", ".join(name for name, version in found.items() if not version)
    return have + (f"; not installed: {missing}" if missing else "")


# ---------------------------------------------------------------- targets
RSS_GOAL_MIB = 64


class Target(typing.NamedTuple):
    """A speed goal: ours (the storage layer's time where ``storage``, else the whole op) against a peer
    row of the same op (stock DCP's at the same thread_count), as ours/peer where ``at_most``, else
    peer/ours (how many times faster)."""

    what: str
    ours: tuple
    op: str
    cold: bool
    peer: str
    goal: float
    at_most: bool
    storage: bool = False
    syncs: tuple = (True, False)

    def ratio(self, ours_s, peer_s):
        return ours_s / peer_s if self.at_most else peer_s / ours_s


TARGETS = (
    Target("SAFETENSORS load (warm), storage layer / safetensors library", (OURS_ST,), "load", False, SAFETENSORS_LIB,
           1.0, True, storage=True),
    # As installed by a plain `pip install .` where the run's packages line says so: at least 0.8x the library's speed.
    Target("SAFETENSORS load (warm), storage layer / safetensors library, >= 0.8x its speed", (OURS_ST,), "load",
           False, SAFETENSORS_LIB, 1.25, True, storage=True),
    Target("cold load / raw cold read", (OURS_TS, OURS_ST), "load", True, "raw", 1.1, True),
    Target("SAFETENSORS save, storage layer / save_file + fsync", (OURS_ST,), "save", False, SAFETENSORS_LIB,
           1.0, True, storage=True, syncs=(True,)),
    Target("TORCH_SAVE load (warm), x stock", (OURS_TS,), "load", False, STOCK, 4.0, False),
    Target("TORCH_SAVE load (warm), x torch.load(mmap=True) + copy", (OURS_TS,), "load", False, TORCH_LOAD_MMAP,
           1.0, False),
    Target("TORCH_SAVE save, x stock", (OURS_TS,), "save", False, STOCK, 1.5, False),
)


def target_rows(rows):
    """Each target of TARGETS on summary_workload's rows, one entry per row of ours it covers: the ratios of
    each repeat (ours and the peer ran in the same repeat), their median, and the ratio ours would reach if
    its storage layer took as long as raw I/O of the same bytes; then the extra peak RSS of all our rows."""
    workload = summary_workload(rows)
    out = []
    for t in TARGETS:
        for variant in t.ours:
            for sync in t.syncs:
                for threads in (1, 2):
                    case = (rows, workload, t.op, t.cold)
                    ours, peer = find_row(*case, variant, sync, threads), find_row(*case, t.peer, sync, threads)
                    raw = find_row(*case, "raw", sync, 1)
                    if not (ours and peer and ours["median_s"] and peer["median_s"]) or ours["error"] or peer["error"]:
                        continue
                    mine = ours["storage_seconds"] if t.storage else ours["seconds"]
                    ratios = [t.ratio(a, b) for a, b in zip(mine, peer["seconds"]) if a is not None]
                    if not ratios:
                        continue
                    at_raw = None
                    if raw and raw["median_s"] and (t.storage or ours["outside_storage_s"] is not None):
                        at_raw = t.ratio(raw["median_s"] + (0 if t.storage else ours["outside_storage_s"]),
                                         peer["median_s"])
                    median = statistics.median(ratios)
                    out.append({"target": t, "variant": variant, "sync": sync, "threads": threads,
                                "ratios": ratios, "median": median, "at_raw_speed": at_raw,
                                "met": median <= t.goal if t.at_most else median >= t.goal})
    rss = [r["peak_rss_mib"] for r in rows if r["workload"] == workload and r["variant"] in (OURS_TS, OURS_ST)
           and r["peak_rss_mib"] is not None]
    if rss:
        out.append({"target": None, "rss_mib": max(rss), "met": max(rss) <= RSS_GOAL_MIB})
    return out


def _goal(goal):
    """1.0, 1.1, 1.25: one decimal where that says it all."""
    return f"{goal:.1f}" if round(goal, 1) == goal else f"{goal:.2f}"


def targets_table(rows):
    """target_rows as Markdown: the goal, the median of the per-repeat ratios and their range."""
    lines = ["| target | variant | sync | threads | goal | median | range | at raw speed | met |",
             "|---|---|---|---:|---|---:|---|---:|---|"]
    for e in target_rows(rows):
        t, met = e["target"], "yes" if e["met"] else "no"
        if t is None:
            lines.append(f"| extra peak RSS, any save or load of ours (MiB) | all | - | - | <= {RSS_GOAL_MIB} "
                         f"| {e['rss_mib']:.0f} | - | - | {met} |")
            continue
        lines.append(f"| {t.what} | {e['variant'].split(' ', 1)[1]} | {e['sync']} | {e['threads']} "
                     f"| {'<=' if t.at_most else '>='} {_goal(t.goal)} | {e['median']:.2f} "
                     f"| {min(e['ratios']):.2f}-{max(e['ratios']):.2f} | {fmt(e['at_raw_speed'], '.2f')} | {met} |")
    return "\n".join(lines)


TARGETS_NOTE = ("Each goal on the summary workload's rows: \"median\" is the median of the ratios of each repeat "
                "(ours and the peer ran in the same repeat), \"range\" their smallest and largest; \"storage "
                "layer\" goals take only the time inside our writer's or reader's methods. \"at raw speed\": the "
                "ratio ours would reach if its storage layer took as long as the raw row (the same bytes in one "
                "file, written and fsync'd or read, in 64 MiB calls on one thread), DCP's own time unchanged.")


# ---------------------------------------------------------------- report
def terminal_progress():
    """A function that shows one line of progress on stderr, overwriting the last ("" clears it)."""
    width = [0]

    def show(line):
        print("\r" + line.ljust(width[0]) + ("\r" if not line else ""), end="", file=sys.stderr, flush=True)
        width[0] = len(line)

    return show


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def markdown(header, rows):
    """What a run prints: a title line, then full_table's notes and table, the targets, and the before/after
    table of a run with a baseline."""
    return "\n".join([f"# dcp_filesystem benchmark — {header['date']}", "",
                      f"torch {header['torch']}, python {header['python']}, {header['cpus']} CPUs; "
                      f"repeats {header['repeats']} (median); command: `{header['command']}`", "",
                      f"CRC-32: {header.get('crc32', '?')}", "",
                      full_table(header, rows), "", "## Targets", "", TARGETS_NOTE, "", targets_table(rows)]
                     + baseline_table(header, rows))


def baseline_table(header, rows):
    """This revision's rows beside the baseline's, same run: the change of the median time."""
    if not header.get("baseline"):
        return []
    def key(r):
        return r["workload"], r["op"], r.get("cold", False), r["variant"].split(" ", 1)[1], r["sync"], r["threads"]

    baseline = {key(r): r for r in rows if r["variant"].startswith("baseline ")}
    lines = ["", f"## Before/after: this revision vs the baseline {header['baseline']}", "",
             "Same run, cases interleaved; medians, and in brackets the fastest of the repeats.", "",
             "| workload | op | format | sync | threads | baseline ms | this ms | change |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        if not r["variant"].startswith("dcp_filesystem ") or not r["median_s"]:
            continue
        fmt_name = r["variant"].split(" ", 1)[1]
        b = baseline.get(key(r))
        if b is None or not b["median_s"]:
            continue
        op = r["op"] + (" cold" if r.get("cold") else "")
        lines.append(f"| {r['workload']} | {op} | {fmt_name} | {r['sync']} | {r['threads']} "
                     f"| {b['median_s'] * 1e3:.1f} [{min(b['seconds']) * 1e3:.1f}] "
                     f"| {r['median_s'] * 1e3:.1f} [{min(r['seconds']) * 1e3:.1f}] "
                     f"| {(r['median_s'] / b['median_s'] - 1) * 100:+.1f} % |")
    return lines


def full_table(header, rows):
    """The notes on what was measured, then one Markdown row per result row."""
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
    lines = [*[line for note in notes for line in (note, "")],
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


# ---------------------------------------------------------------- README summary, chart, RESULTS.md
RESULTS_MD = os.path.join("benchmarks", "RESULTS.md")
CHART_PNG = os.path.join("benchmarks", "summary.png")
SUMMARY_START, SUMMARY_END = ".. bench-summary-start", ".. bench-summary-end"
# (variant of the result rows, its name in the summary): ours in both formats, stock DCP, the safetensors library
SUMMARY_VARIANTS = (
    (OURS_TS, "dcp_filesystem TORCH_SAVE"),
    (OURS_ST, "dcp_filesystem SAFETENSORS"),
    (STOCK, "stock DCP TORCH_SAVE"),
    (SAFETENSORS_LIB, "safetensors library"),
)
SUMMARY_COLUMNS = ("op", "variant", "median ms", "GB/s", "x stock DCP", "x safetensors")


def summary_workload(rows):
    """The workload the summary shows: llm where the run has it, else the first one run."""
    names = [r["workload"] for r in rows]
    return "llm" if "llm" in names else (names[0] if names else None)


def summary_rows(rows):
    """The result rows the README summarizes, at most 12: of summary_workload's rows, those of
    SUMMARY_VARIANTS with the writer's and reader's defaults (sync_files=True, thread_count 1; the
    safetensors library has no threads), for save, load and (where the run has them) cold load.
    Each: {"op", "variant" (summary name), "row" (the result row), "vs_stock", "vs_safetensors"}:
    how many times faster than stock DCP and than the safetensors library at the same op (its
    median time over this row's), None where either is missing or failed."""
    workload = summary_workload(rows)

    def find(op, cold, variant):
        return find_row(rows, workload, op, cold, variant, True, 1)

    def speedup(base, r):
        ok = base and r and base["median_s"] and r["median_s"] and not base["error"] and not r["error"]
        return base["median_s"] / r["median_s"] if ok else None

    ops = [("save", False), ("load", False)]
    if any(r.get("cold") for r in rows if r["workload"] == workload):
        ops.append(("load", True))
    out = []
    for op, cold in ops:
        stock, lib = find(op, cold, STOCK), find(op, cold, SAFETENSORS_LIB)
        for variant, shown in SUMMARY_VARIANTS:
            r = find(op, cold, variant)
            if r is not None:
                out.append({"op": op + (" cold" if cold else " warm" if op == "load" else ""), "variant": shown,
                            "row": r, "vs_stock": speedup(stock, r), "vs_safetensors": speedup(lib, r)})
    return out


def summary_cells(summary):
    """The summary as strings, one list per row in SUMMARY_COLUMNS' order; median ms and GB/s are
    formatted as in the full table, so each can be found there."""
    cells = []
    for s in summary:
        r = s["row"]
        ms = r["error"] or fmt(r["median_s"] and r["median_s"] * 1e3, ".1f")
        cells.append([s["op"], s["variant"], ms, fmt(r["gb_per_s"], ".4g"), fmt(s["vs_stock"], ".2f"),
                      fmt(s["vs_safetensors"], ".2f")])
    return cells


def summary_caption(header, rows):
    """One line naming what the summary shows and the run it comes from (plain text: the same in
    README.rst, RESULTS.md and the chart)."""
    workload = summary_workload(rows)
    payload = next((r["payload_bytes"] for r in rows if r["workload"] == workload), 0)
    quick = " (--quick: small sizes, a smoke run)" if header.get("quick") else ""
    return (f"Workload {workload}, {payload / 1e9:.3g} GB, sync_files=True, thread_count=1, median of "
            f"{header['repeats']}; run of {header['date']}{quick}, torch {header['torch']}, "
            f"{header.get('machine', {}).get('cpu', '?')}, {header['cpus']} CPUs.")


def rst_table(columns, cells):
    """An RST simple table."""
    widths = [max(len(c) for c in col) for col in zip(columns, *cells)]
    rule = "  ".join("=" * w for w in widths)

    def line(row):
        return "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()

    return "\n".join([rule, line(columns), rule, *[line(row) for row in cells], rule])


def md_table(columns, cells):
    aligns = ["---" if i < 2 else "---:" for i in range(len(columns))]
    return "\n".join("| " + " | ".join(row) + " |" for row in [list(columns), aligns, *cells])


def machine(scratch):
    """CPU model, cores, memory and the scratch directory's file system, in words."""
    cpu, mem = platform.processor() or platform.machine(), None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
        with open("/proc/meminfo") as f:
            mem = next((int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:")), None)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem and round(mem / (1 << 30), 1),
            "scratch_fs": filesystem_type(scratch), "system": f"{platform.system()} {platform.release()}"}


def results_markdown(header, rows):
    """benchmarks/RESULTS.md: the run (command, date, machine, versions), the README's summary, the targets,
    every row."""
    m = header.get("machine", {})
    lines = ["# dcp_filesystem benchmark results", ""]
    if header.get("quick"):
        lines += ["**A --quick run** (small workloads, sync=True only, few repeats): a smoke run that shows the "
                  "files' form, not the numbers to quote. `make bench` replaces it with a full run.", ""]
    lines += [
        f"- command: `{header['command']}` (from the repository root)",
        f"- date: {header['date']}",
        f"- machine: {m.get('cpu', '?')}, {m.get('cores', header['cpus'])} cores, "
        f"{m.get('memory_gib', '?')} GiB memory, {m.get('system', '?')}; scratch directory on "
        f"{m.get('scratch_fs') or '?'}",
        f"- torch {header['torch']}, Python {header['python']}",
        f"- CRC-32: {header.get('crc32', '?')} (dcp_filesystem's checksums; zlib-ng is an install requirement)",
        f"- packages beside torch: {packages_line(header)}",
        f"- repeats: {header['repeats']} per case (medians); loads {header.get('loads', '?')}",
        "",
        "## Summary",
        "",
        "The table in README.rst's Benchmark section and the chart `summary.png`, from the rows below "
        "(tests/test_readme.py checks that they agree). \"x stock DCP\" and \"x safetensors\": how many times "
        "faster than stock torch's FileSystemWriter/FileSystemReader (TORCH_SAVE) and than the safetensors "
        "library (save_file/safe_open) at the same op.",
        "",
        summary_caption(header, rows),
        "",
        md_table(SUMMARY_COLUMNS, summary_cells(summary_rows(rows))),
        "",
        "![summary](summary.png)",
        "",
        "## Targets",
        "",
        TARGETS_NOTE,
        "",
        targets_table(rows),
        "",
        "## All rows",
        "",
        full_table(header, rows),
        "",
    ]
    return "\n".join(lines)


def readme_summary(header, rows):
    """What goes between the README's summary markers (the markers included)."""
    return "\n".join([
        SUMMARY_START, "",
        textwrap.fill(summary_caption(header, rows) + " Every row, the command and the machine: "
                      "`benchmarks/RESULTS.md <benchmarks/RESULTS.md>`_.", 79, break_long_words=False,
                      break_on_hyphens=False), "",
        rst_table(SUMMARY_COLUMNS, summary_cells(summary_rows(rows))), "",
        ".. image:: benchmarks/summary.png",
        "   :alt: median save and load times of the rows above", "",
        SUMMARY_END,
    ])


def replace_summary(readme_text, summary):
    """readme_text with everything from its start marker to its end marker replaced by summary."""
    start, end = readme_text.find(SUMMARY_START + "\n"), readme_text.find(SUMMARY_END + "\n")
    if start < 0 or end < start:
        raise ValueError(f"README.rst has no '{SUMMARY_START}' ... '{SUMMARY_END}' lines to replace")
    return readme_text[:start] + summary + readme_text[end + len(SUMMARY_END):]


def write_chart(header, rows, path):
    """The summary as a bar chart (PNG) at path, with the summary's caption and cells in its text
    chunks; False, saying why on stderr, where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        print(f"chart not written ({e}; pip install matplotlib, or make bench): {path} left as it was",
              file=sys.stderr)
        return False
    summary, cells = summary_rows(rows), summary_cells(summary_rows(rows))
    ops = list(dict.fromkeys(s["op"] for s in summary))
    variants = [shown for _, shown in SUMMARY_VARIANTS]
    colors = dict(zip(variants, ("#1f77b4", "#2ca02c", "#7f7f7f", "#ff7f0e")))
    fig, axes = plt.subplots(1, len(ops), figsize=(4.2 * len(ops), 2.9), squeeze=False)
    for ax, op in zip(axes[0], ops):
        mine = [s for s in summary if s["op"] == op]
        names = [s["variant"] for s in mine]
        ms = [(s["row"]["median_s"] or 0) * 1e3 if not s["row"]["error"] else 0 for s in mine]
        ax.barh(range(len(mine)), ms, color=[colors.get(n, "#999999") for n in names])
        ax.set_yticks(range(len(mine)))
        ax.set_yticklabels(names if ax is axes[0][0] else [""] * len(mine), fontsize=8)
        ax.invert_yaxis()
        ax.set_title(op, fontsize=10)
        ax.set_xlabel("median ms (shorter is faster)", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        for i, s in enumerate(mine):
            ratio = s["vs_stock"] and s["variant"] != dict(SUMMARY_VARIANTS)[STOCK]
            label = s["row"]["error"] or f"{ms[i]:.0f} ms" + (f", {s['vs_stock']:.1f}\u00d7 stock" if ratio else "")
            ax.text(ms[i], i, " " + label, va="center", fontsize=7)
        ax.set_xlim(0, max(ms + [1]) * 1.6)
    caption = summary_caption(header, rows)
    fig.suptitle("\n".join(textwrap.wrap(caption, 130)), fontsize=7.5)
    fig.tight_layout()
    fig.savefig(path, dpi=90, metadata={"Title": "dcp_filesystem benchmark summary", "Description": json.dumps(
        {"caption": caption, "columns": SUMMARY_COLUMNS, "cells": cells})})
    plt.close(fig)
    return True


def write_docs(header, rows, repo=REPO):
    """RESULTS.md, the chart and README.rst's summary table, all from these rows."""
    readme = os.path.join(repo, "README.rst")
    with open(readme, encoding="utf-8") as f:  # first: without the markers nothing is written
        text = replace_summary(f.read(), readme_summary(header, rows))
    with open(os.path.join(repo, RESULTS_MD), "w", encoding="utf-8") as f:
        f.write(results_markdown(header, rows))
    write_chart(header, rows, os.path.join(repo, CHART_PNG))
    with open(readme, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {RESULTS_MD}, {CHART_PNG} and README.rst's summary table", file=sys.stderr)


def command_line(argv=None):
    """This run's command (``argv``: the script and its arguments, default sys.argv) as typed from the repository
    root: the interpreter by its path relative to the working directory where it is inside it (.venv/bin/python),
    else by its name."""
    exe = os.path.relpath(sys.executable)
    exe = exe if not exe.startswith("..") else os.path.basename(sys.executable)
    return " ".join(shlex.quote(w) for w in [exe] + (sys.argv if argv is None else argv))


def replace_section(path, section, start, end):
    """Write ``section`` (a markdown text from its line ``start`` to its line ``end``) into the file at ``path``:
    in place of the file's own lines from ``start`` to ``end`` where it has both, else appended (the file created
    where there is none). How the other benchmarks keep their sections in RESULTS.md, which a --docs run of this
    one rewrites whole."""
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    if start in text and end in text:
        text = text[: text.index(start)] + section + text[text.index(end) + len(end) + 1 :]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, 3 repeats, sync=True only (about a minute)")
    p.add_argument("--cold", action="store_true",
                   help="also time each load cold, after dropping the page cache (needs root and --dir on a disk; "
                        "runs warm only, saying why, otherwise)")
    p.add_argument("--json", default=os.path.join("bench-results", "bench.json"), help="where to write the JSON")
    p.add_argument("--repeats", type=int, help="repeats per case (default 5, --quick 3)")
    p.add_argument("--dir", help="scratch directory for checkpoints (default: a new temp dir)")
    p.add_argument("--workload", action="append", choices=list(workloads(False)),
                   help="run only this workload (repeatable; default: all)")
    docs = p.add_mutually_exclusive_group()
    docs.add_argument("--docs", action="store_true", default=None,
                      help=f"write {RESULTS_MD}, {CHART_PNG} and README.rst's summary table from this run "
                           "(the default for a full run: all workloads, no --quick)")
    docs.add_argument("--no-docs", dest="docs", action="store_false", help="write none of them")
    p.add_argument("--baseline", metavar="DIR",
                   help="also run the dcp_filesystem folder DIR of another revision (e.g. from git worktree add) "
                        "as rows 'baseline ...', and print a before/after table; never written to the docs")
    args = p.parse_args()
    if args.docs is None:
        args.docs = not args.quick and not args.workload and not args.baseline
    if args.docs and args.baseline:
        p.error("--docs and --baseline: the docs show this revision only")
    baseline = baseline_package(os.path.abspath(args.baseline)) if args.baseline else None
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
                loads = ("warm, from the page cache, and then cold (rows \"load cold\"): the page cache dropped "
                         "(os.sync(), then 3 > /proc/sys/vm/drop_caches) before each")
            else:
                skipped.append(f"--cold skipped: {reason}; loads run warm")
        for line in skipped:
            print(line, file=sys.stderr, flush=True)
        dcp_calls = probe_dcp()
        cases = [(v, s, t) for s in syncs for v in variants(baseline) for t in (1, 2)]
        cases += [(v, s, 1) for s in syncs for v in peer_variants]
        cases += [(RawVariant(), s, 1) for s in syncs]
        header = {
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
            "python": platform.python_version(), "cpus": os.cpu_count(), "repeats": repeats,
            "command": command_line(), "quick": args.quick, "machine": machine(root),
            "cold": cold, "loads": loads, "skipped": skipped, "dcp_calls": dcp_calls,
            "baseline": args.baseline, "crc32": crc32_implementation(), "packages": installed_packages(),
        }
        print(f"CRC-32: {header['crc32']}", file=sys.stderr, flush=True)
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
    if args.docs:
        write_docs(header, rows)


if __name__ == "__main__":
    main()

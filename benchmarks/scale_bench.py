#!/usr/bin/env python3
"""Resharding loads at several world sizes: gloo ranks as processes on this machine, ours vs stock torch.

    python benchmarks/scale_bench.py [--size-mib N] [--repeat N] [--cold] [--dir DIR] [--json FILE]
                                     [--results benchmarks/RESULTS.md]

A state dict of DTensors (float32 and bfloat16 matrices of 16-64 MiB and a few small vectors, ``--size-mib`` in
all) is saved by W ranks, every tensor Shard(0) on a CPU DeviceMesh, and loaded by W' ranks into DTensors placed
Shard(0) (FSDP-like) or, for the matrices, Shard(1) (TP-like). The ranks are processes of one gloo group (file
init), started afresh for each world size. Saves are untimed setup: one checkpoint per (W, format, writer),
reused by every load from it. Per row:

- bytes read: the sum over the ranks of the growth of ``rchar`` in /proc/self/io across ``dcp.load`` (bytes
  returned by read system calls, page-cache hits included; ``.metadata`` and DCP's few collective messages over
  gloo's sockets are in it too), median over the runs;
- bytes needed: the sum over the ranks of the bytes of their local shards;
- whole items: the bytes of the stored items the ranks' shards overlap, what reading whole items reads;
- seconds: the wall time of ``dcp.load``, its largest over the ranks, median and minimum over ``--repeat`` runs
  alternated between the row's variants, each into the same allocated and touched targets;
- with ``--cold`` (root, a scratch directory on a disk) the same runs again with the page cache dropped before
  each (``sync; echo 3 > /proc/sys/vm/drop_caches``), and the growth of ``read_bytes``: what the disk delivered to
  the ranks, read-ahead included (the ranks share one page cache: a chunk that two ranks read comes from the disk
  once);
- every value of every run checked bit-exact against the slice of the global tensor the rank should hold.

Variant "ours, whole items" runs our reader with ``DCP_FILESYSTEM_PARTIAL_READS=0`` in the ranks' environment
around each of its loads, alternated with the other variants in the same ranks: a reader that reads that variable
when it loads (not when it is imported) reads whole stored items, then narrows them; a row of it that reads less
than its whole items is flagged. The issue's targets (issue 32) are printed as met or not met. With ``--results``
the table replaces the section between ``<!-- scale-bench-start -->`` and ``<!-- scale-bench-end -->`` of that
file (appended where there is none).
"""
import argparse
import contextlib
import datetime
import gc
import inspect
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import typing
from datetime import timedelta

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from bench import (  # noqa: E402
    StockFormat,
    cold_unavailable,
    command_line,
    crc32_implementation,
    drop_page_cache,
    installed_packages,
    machine,
    packages_line,
    replace_section,
)
from torch.distributed.checkpoint.api import CheckpointException  # noqa: E402

import dcp_filesystem  # noqa: E402
from dcp_filesystem import _checksum  # noqa: E402
from dcp_filesystem._bench import _reason  # noqa: E402

MiB = 1 << 20
START, END = "<!-- scale-bench-start -->", "<!-- scale-bench-end -->"
DEFAULT_DIR_PARENT = "/var/tmp"
PARTIAL_READS_ENV = "DCP_FILESYSTEM_PARTIAL_READS"
FORMATS = ("TORCH_SAVE", "SAFETENSORS")
OURS, STOCK, WHOLE = "ours", "stock", "ours, whole items"
WRITERS = (OURS, STOCK)  # who writes each checkpoint; "ours, whole items" loads ours
# The targets: dim-0 rows read at most needed x 1.05 + two checksum blocks per item read; 2->4 dim-0 loads
# take at most 0.7x our whole-item reading's time and are at least 3x faster than stock torch's.
READ_SLACK, BLOCKS_PER_ITEM = 1.05, 2
WHOLE_GOAL, STOCK_GOAL = 0.7, 3.0
COLS = 4096  # columns of every matrix: divisible by every world size used
SMALL = 4  # small vectors
SMALL_NUMEL = 4096


class Reshard(typing.NamedTuple):
    """Saved by ``save_world`` ranks (Shard(0)), loaded by ``load_world`` ranks, the matrices Shard(``load_dim``)."""

    save_world: int
    load_world: int
    load_dim: int

    @property
    def name(self):
        placement = "Shard(0)" if self.load_dim == 0 else f"Shard(0)->Shard({self.load_dim})"
        return f"{self.save_world}->{self.load_world} {placement}"


RESHARDS = (Reshard(2, 4, 0), Reshard(4, 2, 0), Reshard(2, 1, 0), Reshard(2, 2, 1), Reshard(2, 2, 0))
WHOLE_ITEMS_RESHARD = Reshard(2, 4, 0)  # the target compares ours with our whole-item reading on 2->4


def parse_reshard(text):
    """``W:W2`` (Shard(0) both sides) or ``W:W2:1`` (the matrices Shard(1) at W2) as a Reshard."""
    try:
        numbers = [int(x) for x in text.split(":")]
    except ValueError:
        numbers = []
    if len(numbers) not in (2, 3) or min(numbers[:2]) < 1 or numbers[2:] not in ([], [0], [1]):
        raise argparse.ArgumentTypeError(f"not a reshard: {text!r} (W:W2 or W:W2:1, e.g. 2:4)")
    return Reshard(numbers[0], numbers[1], numbers[2] if len(numbers) == 3 else 0)


def block_bytes():
    """The checksum block of partial reads (dcp_filesystem._checksum.BLOCK_BYTES), 0 where there is none."""
    return getattr(_checksum, "BLOCK_BYTES", 0)


# ---------------------------------------------------------------- the state dict
def tensor_specs(size_mib):
    """[(name, shape, dtype)]: matrices of COLS columns, float32 and bfloat16 in turn, until ``size_mib`` MiB (64,
    32, 32 and 16 MiB each at 512 MiB; smaller rows for small sizes), then SMALL vectors. Every dimension is
    divisible by 4, so every world size used splits every tensor evenly."""
    rows = 4096
    while rows > 8 and 9 * rows * COLS * 3 > size_mib * MiB:  # a cycle of four is 9 * rows * COLS bytes
        rows //= 2
    cycle = ((rows, torch.float32), (rows, torch.bfloat16), (rows // 2, torch.float32), (rows // 2, torch.bfloat16))
    specs, total = [], 0
    while total < size_mib * MiB:
        n, dtype = cycle[len(specs) % len(cycle)]
        specs.append((f"layers.{len(specs)}.weight", (n, COLS), dtype))
        total += n * COLS * dtype.itemsize
    specs += [(f"norms.{i}.weight", (SMALL_NUMEL,), (torch.float32, torch.bfloat16)[i % 2]) for i in range(SMALL)]
    return specs


def global_tensors(specs):
    """The global tensors, the same on every rank: random normal values, one seeded generator per tensor."""
    out = {}
    for i, (name, shape, dtype) in enumerate(specs):
        gen = torch.Generator().manual_seed(1000 + i)
        out[name] = torch.randn(shape, generator=gen).to(dtype)
    return out


def placement_dim(shape, reshard):
    return reshard.load_dim if len(shape) == 2 else 0


def local_slice(tensor, dim, world, rank):
    """The part of ``tensor`` that rank ``rank`` of ``world`` holds when it is sharded evenly along ``dim``."""
    size = tensor.shape[dim] // world
    return tensor.narrow(dim, rank * size, size)


def items_read(shape, reshard, rank):
    """How many stored chunks (Shard(0) over save_world ranks) this rank's local shard overlaps: the items it
    reads, wholly or in part."""
    rows, dim = shape[0], placement_dim(shape, reshard)
    first, count = (rank * rows // reshard.load_world, rows // reshard.load_world) if dim == 0 else (0, rows)
    chunk = rows // reshard.save_world
    return (first + count - 1) // chunk - first // chunk + 1


def check(targets, wanted, where):
    """Raise AssertionError naming the first DTensor of ``targets`` whose local tensor is not ``wanted``'s tensor
    of that name, shape and bits."""
    for name, target in targets.items():
        local, expected = target.to_local(), wanted[name]
        if local.shape != expected.shape or local.dtype != expected.dtype:
            raise AssertionError(f"scale_bench: {where}: {name} is {local.dtype} {tuple(local.shape)}, expected "
                                 f"{expected.dtype} {tuple(expected.shape)}")
        if not torch.equal(bit_view(local), bit_view(expected.contiguous())):
            raise AssertionError(f"scale_bench: {where}: {name} is not the expected slice bit for bit")


def bit_view(tensor):
    """``tensor`` as integers of its element size: torch.equal on these compares bits (NaNs, -0.0 included)."""
    return tensor.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()])


# ---------------------------------------------------------------- readers and writers
def checkpoint_path(root, world, writer, fmt):
    return os.path.join(root, f"ckpt-w{world}-{writer}-{fmt.lower()}")


def stock_skip_reason(fmt):
    """Why stock torch cannot write this format here, or None."""
    if fmt == "SAFETENSORS" and StockFormat is None:
        return f"torch {torch.__version__}'s FileSystemWriter has no SAFETENSORS (torch 2.8+)"
    return None


def make_writer(writer, fmt, path):
    if writer == OURS:
        return dcp_filesystem.FileSystemWriter(path, serialization_format=dcp_filesystem.SerializationFormat[fmt])
    kwargs = {"serialization_format": StockFormat[fmt]} if StockFormat is not None else {}
    return dcp.FileSystemWriter(path, **kwargs)


def make_reader(impl, path):
    return dcp.FileSystemReader(path) if impl == STOCK else dcp_filesystem.FileSystemReader(path)


def writer_of(impl):
    return STOCK if impl == STOCK else OURS


_save = getattr(dcp, "save", None) or dcp.save_state_dict  # torch 2.1 has only save_state_dict/load_state_dict
_load = getattr(dcp, "load", None) or dcp.load_state_dict


# ---------------------------------------------------------------- one rank
def proc_io():
    """(rchar, read_bytes) of this process, and the bytes that reading them took (counted in the next rchar)."""
    with open("/proc/self/io", "rb", buffering=0) as f:
        text = f.read()
    fields = dict(line.split(b": ") for line in text.splitlines())
    return int(fields[b"rchar"]), int(fields[b"read_bytes"]), len(text)


def cpu_mesh(world):
    """``init_device_mesh("cpu", (world,))`` (torch 2.2+), or the same mesh built directly (torch 2.1)."""
    try:
        from torch.distributed.device_mesh import init_device_mesh
    except ImportError:
        from torch.distributed._tensor import DeviceMesh

        return DeviceMesh("cpu", list(range(world)))
    return init_device_mesh("cpu", (world,))


def distribute(mesh, tensor, dim):
    """``distribute_tensor(tensor, mesh, [Shard(dim)])``, each rank taking its part of its own copy of ``tensor``
    (the tensors are the same on every rank): with src_data_rank=None where this torch has it, else (older torch,
    whose scatter from rank 0 gloo refuses for bfloat16 on 2.1) the same DTensor made from the rank's part."""
    try:
        from torch.distributed.tensor import DTensor, Shard, distribute_tensor
    except ImportError:  # torch < 2.4
        from torch.distributed._tensor import DTensor, Shard, distribute_tensor

    if "src_data_rank" in inspect.signature(distribute_tensor).parameters:
        return distribute_tensor(tensor, mesh, [Shard(dim)], src_data_rank=None)
    local = local_slice(tensor, dim, mesh.size(), dist.get_rank()).contiguous()
    return DTensor.from_local(local, mesh, [Shard(dim)], run_check=False)


def warm_files(paths):
    """Read every file under ``paths`` once, so that the warm runs that follow are served from the page cache."""
    buf = bytearray(16 * MiB)
    for path in paths:
        for entry in sorted(os.listdir(path)):
            with open(os.path.join(path, entry), "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass


def save_task(spec, task, mesh, expected):
    """This world's checkpoints: each format by our writer, and by stock torch's where it writes the format."""
    sources = {name: distribute(mesh, t, 0) for name, t in expected.items()}
    for writer in WRITERS:
        for fmt in task["formats"]:
            if writer == OURS or stock_skip_reason(fmt) is None:
                path = checkpoint_path(spec["root"], spec["world"], writer, fmt)
                _save(sources, storage_writer=make_writer(writer, fmt, path))
    dist.barrier()


@contextlib.contextmanager
def partial_reads_off(off):
    """With ``off``, DCP_FILESYSTEM_PARTIAL_READS=0 in this process's environment for the block, then as before."""
    before = os.environ.get(PARTIAL_READS_ENV)
    if off:
        os.environ[PARTIAL_READS_ENV] = "0"
    try:
        yield
    finally:
        if off and before is None:
            del os.environ[PARTIAL_READS_ENV]
        elif off:
            os.environ[PARTIAL_READS_ENV] = before


def load_task(spec, task, mesh, expected, results):
    """Every run of one reshard: the variants alternated, warm runs and then (with cold) cold ones."""
    rank, reshard = dist.get_rank(), Reshard(*task["reshard"])
    dims = {name: placement_dim(t.shape, reshard) for name, t in expected.items()}
    targets = {name: distribute(mesh, torch.empty(t.shape, dtype=t.dtype), dims[name]) for name, t in expected.items()}
    wanted = {name: local_slice(t, dims[name], reshard.load_world, rank) for name, t in expected.items()}
    variants = [tuple(v) for v in task["variants"]]
    paths = {v: checkpoint_path(spec["root"], reshard.save_world, writer_of(v[0]), v[1]) for v in variants}
    failed = {}
    base = {"reshard": reshard.name, "rank": rank,
            "needed": sum(w.numel() * w.element_size() for w in wanted.values()),
            "items": sum(items_read(t.shape, reshard, rank) for t in expected.values()),
            "whole": sum(items_read(t.shape, reshard, rank) * t.numel() * t.element_size() // reshard.save_world
                         for t in expected.values())}
    for cold in (False, True) if spec["cold"] else (False,):
        if not cold and rank == 0:
            warm_files(sorted(set(paths.values())))
        for run in range(spec["repeat"]):
            shift = run % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                if variant in failed:
                    continue
                for t in targets.values():
                    t.to_local().zero_()  # touched, and no value of an earlier run left to pass the check
                gc.collect()
                dist.barrier()
                if cold:
                    if rank == 0:
                        drop_page_cache()
                    dist.barrier()
                rchar, read_bytes, extra = proc_io()
                start = time.perf_counter()
                try:
                    with partial_reads_off(variant[0] == WHOLE):
                        _load(targets, storage_reader=make_reader(variant[0], paths[variant]))
                except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
                    if variant != (STOCK, "SAFETENSORS"):
                        raise
                    failed[variant] = _reason(e)  # every rank gets the same CheckpointException
                    results["loads"].append({**base, "impl": variant[0], "format": variant[1],
                                             "error": failed[variant]})
                    continue
                seconds = time.perf_counter() - start
                rchar_after, read_bytes_after, _ = proc_io()
                check(targets, wanted, f"{reshard.name}, {variant[0]} {variant[1]}, run {run + 1}"
                                       f"{' (cold)' if cold else ''}, rank {rank}")
                results["loads"].append({
                    **base, "impl": variant[0], "format": variant[1], "cold": cold, "run": run, "seconds": seconds,
                    "rchar": rchar_after - rchar - extra, "read_bytes": read_bytes_after - read_bytes,
                })


def worker(spec_path, rank):
    """One rank of one phase: the phase's saves and loads, its measurements written to rank{rank}.json."""
    with open(spec_path) as f:
        spec = json.load(f)
    world = spec["world"]
    dist.init_process_group("gloo", init_method="file://" + spec["init_file"], rank=rank, world_size=world,
                            timeout=timedelta(minutes=30))
    mesh = cpu_mesh(world)
    expected = global_tensors(tensor_specs(spec["size_mib"]))
    results = {"loads": []}
    for task in spec["tasks"]:
        if task["op"] == "save":
            save_task(spec, task, mesh, expected)
        else:
            load_task(spec, task, mesh, expected, results)
    with open(os.path.join(os.path.dirname(spec_path), f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.barrier()


# ---------------------------------------------------------------- the driver
class BenchError(Exception):
    """Why the benchmark stopped, printed as ``scale_bench: error: ...``."""


def plan(reshards, formats):
    """(groups, phases). groups: [(reshard, [(impl, format)])], the row groups in table order; phases:
    [(world, tasks)], each a start of ``world`` ranks. A world's checkpoints are saved by the first phase of that
    world, which also runs the loads at that world that have their checkpoints by then."""
    groups = []
    for r in reshards:
        impls = (OURS, STOCK, WHOLE) if r == WHOLE_ITEMS_RESHARD else (OURS, STOCK)
        groups.append((r, [(impl, fmt) for impl in impls for fmt in formats
                           if impl != STOCK or stock_skip_reason(fmt) is None]))
    saved, done, phases = set(), set(), []

    def loads(world):
        mine = [i for i, (r, _) in enumerate(groups)
                if i not in done and r.load_world == world and r.save_world in saved]
        done.update(mine)
        return [{"op": "load", "reshard": list(groups[i][0]), "variants": groups[i][1]} for i in mine]

    for world in dict.fromkeys(r.save_world for r in reshards):
        saved.add(world)
        phases.append((world, [{"op": "save", "formats": list(formats)}] + loads(world)))
    for i, (r, _) in enumerate(groups):
        if i not in done:
            phases.append((r.load_world, loads(r.load_world)))
    return groups, phases


def run_phase(index, world, tasks, settings, what):
    """Start ``world`` ranks of one gloo group (this script with --worker), wait for all; their results."""
    phase_dir = os.path.join(settings["root"], f"phase{index}")
    os.mkdir(phase_dir)
    spec = {**settings, "world": world, "tasks": tasks, "init_file": os.path.join(phase_dir, "init")}
    spec_path = os.path.join(phase_dir, "spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    base_env = dict(os.environ)
    base_env.update(WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), GLOO_SOCKET_IFNAME="lo")
    if world > 1:
        base_env.setdefault("OMP_NUM_THREADS", "1")  # as torchrun sets it for several ranks per node
    procs = []
    try:
        for rank in range(world):
            rank_env = {**base_env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", spec_path,
                                           str(rank)], env=rank_env))
        while True:
            codes = [p.poll() for p in procs]
            bad = [(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)]
            if bad:
                raise BenchError(f"{world} ranks ({what}): rank {bad[0][0]} exited with status {bad[0][1]} "
                                 "(its error is above)")
            if all(code == 0 for code in codes):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    out = []
    for rank in range(world):
        with open(os.path.join(phase_dir, f"rank{rank}.json")) as f:
            out.append(json.load(f))
    return out


def summarize(groups, formats, loads):
    """One row per (reshard, impl, format): each run's figures summed (bytes) or maxed (seconds) over the ranks,
    then median and minimum over the runs; a row saying why for each stock format skipped."""
    rows = []
    for reshard, variants in groups:
        for impl, fmt in variants:
            mine = [x for x in loads if (x["reshard"], x["impl"], x["format"]) == (reshard.name, impl, fmt)]
            first = [x for x in mine if x.get("run") == 0 and not x["cold"]]
            errors = [x["error"] for x in mine if x.get("error")]
            row = {"reshard": reshard.name, "save_world": reshard.save_world, "load_world": reshard.load_world,
                   "load_dim": reshard.load_dim, "impl": impl, "format": fmt, "error": errors[0] if errors else None,
                   "needed": sum(x["needed"] for x in first), "items": sum(x["items"] for x in first),
                   "whole_items": sum(x["whole"] for x in first)}
            for cold in (False, True):
                runs = {}
                for x in mine:
                    if "seconds" in x and x["cold"] == cold:
                        runs.setdefault(x["run"], []).append(x)
                key = "cold_" if cold else ""
                seconds = [max(x["seconds"] for x in r) for r in runs.values()]
                row[key + "seconds"] = seconds
                row[key + "median_s"] = statistics.median(seconds) if seconds else None
                row[key + "min_s"] = min(seconds) if seconds else None
                row[key + "rchar"] = [sum(x["rchar"] for x in r) for r in runs.values()]
                row[key + "read_bytes"] = [sum(x["read_bytes"] for x in r) for r in runs.values()]
                row[key + "runs_checked"] = len(runs)
            row["read"] = statistics.median(row["rchar"]) if row["rchar"] else None
            row["read_ratio"] = row["read"] / row["needed"] if row["read"] and row["needed"] else None
            row["disk_read"] = statistics.median(row["cold_read_bytes"]) if row["cold_read_bytes"] else None
            row["disk_ratio"] = row["disk_read"] / row["needed"] if row["disk_read"] and row["needed"] else None
            row["bit_exact"] = row["runs_checked"] + row["cold_runs_checked"] > 0
            rows.append(row)
        rows += [{"reshard": reshard.name, "impl": STOCK, "format": fmt,
                  "error": f"skipped: {stock_skip_reason(fmt)}"} for fmt in formats if stock_skip_reason(fmt)]
    return rows


def find(rows, reshard, impl, fmt):
    return next((r for r in rows if (r["reshard"], r["impl"], r["format"]) == (reshard, impl, fmt)), None)


def targets(rows, block):
    """[(target, variant, value, goal, met; None where not measured)]: the issue's targets on this run's rows."""
    out = []
    for row in rows:
        if row["impl"] != OURS or row.get("read") is None or row["load_dim"] or row["save_world"] == row["load_world"]:
            continue
        limit = row["needed"] * READ_SLACK + BLOCKS_PER_ITEM * block * row["items"]
        out.append((f"{row['reshard']}: bytes read <= needed x {READ_SLACK} + {BLOCKS_PER_ITEM} checksum blocks "
                    f"({block:,} B) x {row['items']} items", f"ours {row['format']}", f"{row['read'] / MiB:,.1f} MiB",
                    f"<= {limit / MiB:,.1f} MiB", row["read"] <= limit))
    name = WHOLE_ITEMS_RESHARD.name
    for key, label in (("median_s", "warm"), ("cold_median_s", "cold")):
        for ours in [r for r in rows if (r["reshard"], r["impl"]) == (name, OURS) and r.get(key)]:
            for peer, goal in ((WHOLE, WHOLE_GOAL), (STOCK, STOCK_GOAL)):
                what = f"{name} load s ({label}), " + ("ours / ours, whole items" if peer == WHOLE else "stock / ours")
                other = find(rows, name, peer, ours["format"])
                if not (other and other.get(key)):
                    why = f"{peer} {ours['format']} " + (first_sentence(other["error"]) if other and other.get("error")
                                                        else "not measured")
                    out.append((what, f"ours {ours['format']}", why, "", None))
                    continue
                ratio = ours[key] / other[key] if peer == WHOLE else other[key] / ours[key]
                out.append((what, f"ours {ours['format']}", f"{ratio:.2f}",
                            f"<= {goal}" if peer == WHOLE else f">= {goal}",
                            ratio <= goal if peer == WHOLE else ratio >= goal))
    return out


def first_sentence(text):
    return text.split(". ")[0]


def _fmt(value, spec, scale=1):
    return "-" if value is None else format(value / scale, spec)


def markdown(header, rows, goals):
    cold = header["cold"]
    columns = ["reshard", "variant", "read MiB", "needed MiB", "whole items MiB", "read / needed", "load s", "min s"]
    if cold:
        columns += ["cold load s", "cold min s", "disk read MiB", "disk / needed"]
    columns.append("bit-exact")
    lines = [
        START,
        "## Scale: resharding loads at several world sizes",
        "",
        f"`{header['command']}` on {header['date']}, torch {header['torch']}, Python {header['python']}, "
        f"{header['machine']['cores']} cores, {header['machine']['memory_gib']} GiB memory, scratch directory on "
        f"{header['machine']['scratch_fs'] or '?'}; CRC-32: {header['crc32']}; packages beside torch: "
        f"{packages_line(header)}. {header['payload_bytes'] / MiB:,.0f} MiB of DTensors ({header['tensors']} tensors: "
        f"float32 and bfloat16 matrices of {header['matrix_mib'][0]:g}-{header['matrix_mib'][1]:g} MiB, and "
        f"{SMALL} vectors of {SMALL_NUMEL} elements) saved Shard(0) by W gloo ranks (processes on "
        "this machine) and loaded by W' ranks: \"W->W' Shard(0)\" FSDP-like, \"Shard(0)->Shard(1)\" the matrices "
        "TP-like. read: bytes the ranks' read system calls returned during dcp.load (rchar of /proc/self/io, summed "
        "over the ranks, .metadata included); needed: the bytes of the ranks' local shards. load s: dcp.load's wall "
        f"time, the slowest rank's, median and minimum of {header['repeat']} runs alternated between the variants, "
        "into allocated and touched targets, every run checked bit-exact. "
        + ("cold: the same runs after dropping the page cache (sync; 3 > /proc/sys/vm/drop_caches) before each; disk "
           "read: read_bytes of /proc/self/io summed over the ranks, read-ahead included (the ranks share this "
           "machine's page cache: a stored chunk that two ranks read comes from the disk once). " if cold else
           f"Warm loads only ({header['cold_skipped'] or 'no --cold'}). ")
        + "whole items: the bytes of the stored items the ranks' shards overlap (what reading whole items "
          f"reads). \"ours, whole items\": our reader with {PARTIAL_READS_ENV}=0 set around its loads. Checksum "
          f"block size: {header['block_bytes']:,} B.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" if i < 2 else "---:" for i in range(len(columns))) + "|",
    ]
    for r in rows:
        cells = [r["reshard"], f"{r['impl']} {r['format']}"]
        if r.get("error"):
            cells += [r["error"] if r["error"].startswith("skipped") else f"fails: {first_sentence(r['error'])}"]
            cells += [""] * (len(columns) - 3)
        else:
            cells += [_fmt(r["read"], ",.1f", MiB), _fmt(r["needed"], ",.1f", MiB), _fmt(r["whole_items"], ",.1f", MiB),
                      _fmt(r["read_ratio"], ".2f"), _fmt(r["median_s"], ".3f"), _fmt(r["min_s"], ".3f")]
            if cold:
                cells += [_fmt(r["cold_median_s"], ".3f"), _fmt(r["cold_min_s"], ".3f"),
                          _fmt(r["disk_read"], ",.1f", MiB), _fmt(r["disk_ratio"], ".2f")]
            cells.append("yes" if r["bit_exact"] else "-")
        lines.append("| " + " | ".join(cells) + " |")
    failures = {f"{r['impl']} {r['format']}": r["error"] for r in rows if r.get("error")}
    lines += [""] + [f"- {variant}: {'' if error.startswith('skipped') else 'the load fails: '}{error}"
                     for variant, error in failures.items()] + [f"- {line}" for line in notes(rows)]
    lines += ["", "Targets (issue 32):", "", "| target | variant | value | goal | met |", "|---|---|---:|---:|---|"]
    for what, variant, value, goal, met in goals:
        lines.append(f"| {what} | {variant} | {value} | {goal} | {met_word(met)} |")
    lines.append(END)
    return "\n".join(lines) + "\n"


def notes(rows):
    """Warnings on the rows: a whole-item row that read less than its whole items."""
    return [f"{r['reshard']}, {r['impl']} {r['format']} read {r['read'] / MiB:,.1f} MiB, less than its whole items "
            f"({r['whole_items'] / MiB:,.1f} MiB): the reader did not take {PARTIAL_READS_ENV}=0 (read per load?)"
            for r in rows if r["impl"] == WHOLE and r.get("read") is not None and r["read"] < r["whole_items"]]


def met_word(met):
    return "not measured" if met is None else "met" if met else "not met"


def run(args):
    """(header, rows) of a run of the reshards and formats that ``args`` selects."""
    specs = tensor_specs(args.size_mib)
    reshards, formats = args.reshard or list(RESHARDS), args.format or list(FORMATS)
    for r in reshards:
        for world in (r.save_world, r.load_world):
            if any(shape[d] % world for _, shape, _ in specs for d in range(len(shape))):
                raise BenchError(f"{r.name}: the tensors' dimensions do not split evenly into {world} parts")
    payload = sum(torch.Size(shape).numel() * dtype.itemsize for _, shape, dtype in specs)
    parent = args.dir or DEFAULT_DIR_PARENT
    os.makedirs(parent, exist_ok=True)
    root = tempfile.mkdtemp(prefix="dcp-scale-bench-", dir=parent)
    groups, phases = plan(reshards, formats)
    try:
        free = shutil.disk_usage(root).free
        checkpoints = len({(r.save_world, f) for r in reshards for f in formats}) * 2
        if free < payload * checkpoints * 1.05:
            raise BenchError(f"{root} has {free / 1e9:.3g} GB free, the checkpoints need about "
                             f"{payload * checkpoints * 1.05 / 1e9:.3g} GB")
        cold_skipped = cold_unavailable(root) if args.cold else None
        if cold_skipped:
            print(f"scale_bench: --cold skipped: {cold_skipped}; loads run warm", file=sys.stderr)
        skipped = [f"stock {fmt}: {stock_skip_reason(fmt)}" for fmt in formats if stock_skip_reason(fmt)]
        for line in skipped:
            print(f"scale_bench: rows skipped: {line}", file=sys.stderr)
        settings = {"root": root, "size_mib": args.size_mib, "repeat": args.repeat,
                    "cold": bool(args.cold and not cold_skipped)}
        loads = []
        for index, (world, tasks) in enumerate(phases):
            what = ", ".join("save" if t["op"] == "save" else Reshard(*t["reshard"]).name for t in tasks)
            t0 = time.perf_counter()
            for result in run_phase(index, world, tasks, settings, what):
                loads += result["loads"]
            print(f"scale_bench: {world} ranks: {what}: {time.perf_counter() - t0:.0f} s", file=sys.stderr,
                  flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    header = {
        "date": datetime.date.today().isoformat(), "torch": torch.__version__, "python": platform.python_version(),
        "command": args.command, "machine": machine(parent), "crc32": crc32_implementation(),
        "packages": installed_packages(), "repeat": args.repeat, "cold": settings["cold"],
        "cold_skipped": cold_skipped and f"--cold skipped: {cold_skipped}", "skipped": skipped,
        "payload_bytes": payload, "tensors": len(specs), "block_bytes": block_bytes(),
        "matrix_mib": [f(torch.Size(shape).numel() * dtype.itemsize / MiB for _, shape, dtype in specs
                         if len(shape) == 2) for f in (min, max)],
        "partial_reads_env": os.environ.get(PARTIAL_READS_ENV),
    }
    return header, summarize(groups, formats, loads)


def main(argv=None):
    """Run the benchmark (or, with the hidden --worker, one rank of it); (header, rows, targets)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=5, help="timed loads per row (default 5)")
    p.add_argument("--cold", action="store_true",
                   help="also run every load cold, after dropping the page cache (needs root and --dir on a disk; "
                        "runs warm only, saying why, otherwise)")
    p.add_argument("--dir", help=f"where the checkpoints go: a new directory inside DIR, removed at the end "
                                 f"(default: {DEFAULT_DIR_PARENT})")
    p.add_argument("--size-mib", type=int, default=512, help="MiB of tensors (default 512)")
    p.add_argument("--json", help="write the run's header, rows and targets as JSON to this file")
    p.add_argument("--results", help="write the table into this markdown file (e.g. benchmarks/RESULTS.md)")
    p.add_argument("--reshard", action="append", type=parse_reshard,
                   help="W:W2 (Shard(0) both sides) or W:W2:1 (the matrices Shard(1) at W2), repeatable (default: "
                        + ", ".join(f"{r.save_world}:{r.load_world}" + (f":{r.load_dim}" if r.load_dim else "")
                                    for r in RESHARDS) + ")")
    p.add_argument("--format", action="append", choices=FORMATS, help="repeatable (default: both)")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker[0], int(args.worker[1]))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # not destroy_process_group(): on torch 2.1 it can hang in gloo once a peer has exited
    if args.repeat < 1 or args.size_mib < 1:
        p.error("--repeat and --size-mib must be at least 1")
    args.command = command_line([os.path.relpath(os.path.abspath(__file__))] + argv)
    try:
        header, rows = run(args)
    except BenchError as e:
        print(f"scale_bench: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    goals = targets(rows, header["block_bytes"])
    table = markdown(header, rows, goals)
    print(table)
    for what, variant, value, goal, met in goals:
        print(f"target: {what}, {variant}: {value} {goal}: {met_word(met)}")
    for line in notes(rows):
        print(f"scale_bench: warning: {line}", file=sys.stderr)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows, "targets": goals}, f, indent=1)
    if args.results:
        replace_section(args.results, table, START, END)
    return header, rows, goals


if __name__ == "__main__":
    main()

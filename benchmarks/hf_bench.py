#!/usr/bin/env python3
"""Hugging Face checkpoints: export-hf against cp, and loading a Hugging Face directory into 2 ranks, ours
against upstream's HuggingFaceStorageReader.

    python benchmarks/hf_bench.py [--repeats N] [--dir DIR] [--results benchmarks/RESULTS.md]

The workload is the bench's llm one (benchmarks/bench.py: 32 float32 matrices of 32 MiB and 2 000 of 1 KiB,
1.07 GB; its non-tensor values left out), saved dim-0 sharded by 2 gloo ranks with this package's
FileSystemWriter in both formats. Export: ``export_hf`` in a fresh process (timed from after its imports; peak
RSS growth from there, ``ru_maxrss``), with and without fsync, against ``cp -r`` of the checkpoint directory
(the same bytes), with ``sync`` of the copies and without, alternated. Load: the exported directory loaded by 2
gloo ranks into dim-0 sharded DTensors with this package's HuggingFaceStorageReader and upstream's (torch 2.8+),
alternated; per rank the bytes its read() calls returned (``/proc/self/io`` rchar) against the bytes of its
shards (upstream's reader maps the file, so its reads do not show there); the time of a load is its slower
rank's. Every load is checked bit-exact. With ``--results`` the tables replace
the section between ``<!-- hf-bench-start -->`` and ``<!-- hf-bench-end -->`` of that file (appended where
there is none).
"""
import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402
from bench import replace_section  # noqa: E402

START, END = "<!-- hf-bench-start -->", "<!-- hf-bench-end -->"
FORMATS = ("torch_save", "safetensors")
WORLD = 2


def workload():
    """(fqn, full tensor) of the llm workload, one at a time, the same in every process."""
    gen = torch.Generator().manual_seed(0)
    for i in range(32):
        yield f"layers.{i}.weight", torch.randn(2048, 4096, generator=gen)
    for i in range(2000):
        yield f"norms.{i}.weight", torch.randn(256, generator=gen)


def rank_shards(rank):
    """This rank's dim-0 half of every tensor (its own memory)."""
    return {fqn: t.chunk(WORLD)[rank].clone() for fqn, t in workload()}


def rchar():
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


# ---------------------------------------------------------------- the 2 ranks
def worker(mode, rank, init, root, repeats):
    import warnings

    warnings.simplefilter("ignore")
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    import dcp_filesystem

    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:
        from torch.distributed._tensor import DTensor, Shard
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method="file://" + init, rank=rank, world_size=WORLD)
    mesh = init_device_mesh("cpu", (WORLD,))
    shards = rank_shards(rank)

    def dtensors(values):
        return {k: DTensor.from_local(v, mesh, [Shard(0)], run_check=False) for k, v in values.items()}

    result = []
    if mode == "save":
        for fmt in FORMATS:
            writer = dcp_filesystem.FileSystemWriter(os.path.join(root, fmt),
                                                     serialization_format=dcp_filesystem.SerializationFormat(fmt))
            dcp.save(dtensors(shards), storage_writer=writer)
    else:
        readers = {"ours": dcp_filesystem.HuggingFaceStorageReader, "upstream": dcp.HuggingFaceStorageReader}
        locals_ = {k: torch.empty_like(v) for k, v in shards.items()}
        for repeat in range(repeats):
            for name, reader in readers.items():
                for v in locals_.values():
                    v.fill_(0)  # touched: the load fills pages that exist
                targets = dtensors(locals_)
                dist.barrier()
                read = rchar()
                start = time.perf_counter()
                dcp.load(targets, storage_reader=reader(os.path.join(root, "hf")))
                seconds = time.perf_counter() - start
                read = rchar() - read
                if repeat == 0:
                    for k, v in shards.items():
                        if not torch.equal(v, locals_[k]):
                            raise SystemExit(f"hf_bench: rank {rank}: {name} loaded {k} wrong")
                result.append({"reader": name, "seconds": seconds, "read": read})
    result = {"rank": rank, "needed": sum(v.numel() * v.element_size() for v in shards.values()), "runs": result}
    with open(os.path.join(root, f"{mode}-rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    os._exit(0)


def run_ranks(mode, root, repeats):
    init = os.path.join(root, f"init-{mode}")
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", mode, str(rank), init, root,
                               str(repeats)], env=env) for rank in range(WORLD)]
    if any(p.wait() for p in procs):
        raise SystemExit(f"hf_bench: a {mode} rank failed")
    results = []
    for rank in range(WORLD):
        with open(os.path.join(root, f"{mode}-rank{rank}.json")) as f:
            results.append(json.load(f))
    return results


# ---------------------------------------------------------------- export against cp
EXPORT = """
import json, resource, sys, time
sys.path.insert(0, {repo!r})
from dcp_filesystem._hf_export import export_hf
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
export_hf({checkpoint!r}, {out!r}, sync={sync})
seconds = time.perf_counter() - start
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({{"seconds": seconds, "rss_mib": grown / 1024}}))
"""


def export_once(checkpoint, out, sync):
    code = EXPORT.format(repo=REPO, checkpoint=checkpoint, out=out, sync=sync)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


def cp_once(checkpoint, out, sync):
    start = time.perf_counter()
    subprocess.run(["cp", "-r", checkpoint, out], check=True)
    if sync:
        subprocess.run(["sync"] + [os.path.join(out, name) for name in os.listdir(out)], check=True)
    return {"seconds": time.perf_counter() - start, "rss_mib": None}


def clear(path):
    shutil.rmtree(path, ignore_errors=True)
    os.sync()  # the last run's dirty pages are not the next one's to write


def measure_export(root, repeats):
    samples = {}
    for repeat in range(repeats):
        for fmt in FORMATS:
            checkpoint = os.path.join(root, fmt)
            for sync in (True, False):
                for what, run in (("export-hf", export_once), ("cp -r", cp_once)):
                    out = os.path.join(root, "out")
                    clear(out)
                    samples.setdefault((fmt, sync, what), []).append(run(checkpoint, out, sync))
            print(f"  export repeat {repeat + 1}/{repeats}: {fmt}", file=sys.stderr)
    clear(os.path.join(root, "out"))
    return samples


def cp_version():
    return subprocess.run(["cp", "--version"], capture_output=True, text=True).stdout.splitlines()[0]


def checkpoint_bytes(path):
    return sum(os.path.getsize(os.path.join(path, name)) for name in os.listdir(path))


def markdown(command, payload, root, export, loads, repeats):
    lines = [
        START,
        "## Hugging Face: export-hf and HuggingFaceStorageReader",
        "",
        f"`{command}` on {datetime.date.today().isoformat()}, torch {torch.__version__}, Python "
        f"{sys.version.split()[0]}: the llm workload ({payload / 1e9:.2f} GB: 32 × 32 MiB and 2 000 × 1 KiB float32), "
        f"saved dim-0 sharded by 2 gloo ranks. Medians of {repeats} alternated repeats (min in brackets), warm page "
        "cache.",
        "",
        "Export of the 2-rank checkpoint to one Hugging Face directory, against `cp -r` of the checkpoint "
        f"(`sync` of each copied file where the export fsyncs; {cp_version()}, which copies inside the kernel with "
        "copy_file_range, where export-hf reads every byte into memory through FileSystemReader, checking the "
        "checkpoint's CRC-32s, and writes it out taking the new file's):",
        "",
        "| checkpoint | fsync | export-hf s | cp s | export / cp | peak RSS growth MiB | GB/s |",
        "|---|---|---|---|---|---|---|",
    ]
    ratios, rss = [], []
    for fmt in FORMATS:
        size = checkpoint_bytes(os.path.join(root, fmt))
        for sync in (True, False):
            ex = [s["seconds"] for s in export[(fmt, sync, "export-hf")]]
            cp = [s["seconds"] for s in export[(fmt, sync, "cp -r")]]
            grown = max(s["rss_mib"] for s in export[(fmt, sync, "export-hf")])
            ratio = statistics.median(ex) / statistics.median(cp)
            ratios.append(ratio)
            rss.append(grown)
            lines.append(f"| {fmt.upper()} ({size / 1e9:.2f} GB) | {'yes' if sync else 'no'} | "
                         f"{statistics.median(ex):.2f} ({min(ex):.2f}) | {statistics.median(cp):.2f} ({min(cp):.2f}) "
                         f"| {ratio:.2f} | {grown:.0f} | {payload / statistics.median(ex) / 1e9:.2f} |")
    lines += [
        "",
        "Loading the exported directory (one 1.07 GB file) into 2 dim-0 sharded ranks: bytes per rank are the "
        "larger rank's, against the bytes of its shards; a load's time is its slower rank's:",
        "",
        "| reader | median s | min s | GB/s | read() bytes per rank | × needed |",
        "|---|---|---|---|---|---|",
    ]
    needed = max(r["needed"] for r in loads)
    load_median = {}
    read_ratio = {}
    for name in ("ours", "upstream"):
        per_repeat = [max(runs) for runs in zip(*[[x["seconds"] for x in r["runs"] if x["reader"] == name]
                                                  for r in loads])]
        read = max(statistics.median([x["read"] for x in r["runs"] if x["reader"] == name]) for r in loads)
        load_median[name] = statistics.median(per_repeat)
        read_ratio[name] = read / needed
        label = "ours (HuggingFaceStorageReader)" if name == "ours" else "upstream's HuggingFaceStorageReader"
        lines.append(f"| {label} | {load_median[name]:.3f} | {min(per_repeat):.3f} | "
                     f"{payload / load_median[name] / 1e9:.2f} | {read / 1e6:.0f} MB | "
                     + ("(mmap) |" if name == "upstream" else f"{read / needed:.2f} |"))

    def met(ok):
        return "met" if ok else "**not met**"

    lines += [
        "",
        "Targets: export peak RSS growth ≤ 256 MiB: " + met(max(rss) <= 256) + f" (at most {max(rss):.0f} MiB); "
        "export time ≤ 1.5 × cp: " + met(max(ratios) <= 1.5) + f" (at most {max(ratios):.2f}); each rank reads "
        "≤ 1.05 × the bytes it needs: " + met(read_ratio["ours"] <= 1.05) + f" ({read_ratio['ours']:.2f}); load at "
        "least upstream's speed: " + met(load_median["ours"] <= load_median["upstream"])
        + f" ({load_median['upstream'] / load_median['ours']:.2f} × upstream's).",
        END,
    ]
    return "\n".join(lines) + "\n"


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        mode, rank, init, root, repeats = sys.argv[2:7]
        worker(mode, int(rank), init, root, int(repeats))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", help="where the checkpoints go (default: the system's temporary directory)")
    p.add_argument("--results", help="write the tables into this markdown file (e.g. benchmarks/RESULTS.md)")
    args = p.parse_args()
    import torch.distributed.checkpoint as dcp

    if not hasattr(dcp, "HuggingFaceStorageReader"):
        raise SystemExit("hf_bench: this torch has no upstream HuggingFaceStorageReader to compare with (torch 2.8+)")
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        print("hf_bench: saving the 2-rank checkpoints", file=sys.stderr)
        run_ranks("save", root, 0)
        payload = 32 * 2048 * 4096 * 4 + 2000 * 256 * 4
        export = measure_export(root, args.repeats)
        from dcp_filesystem._hf_export import export_hf

        export_hf(os.path.join(root, "safetensors"), os.path.join(root, "hf"))
        print("hf_bench: loading the Hugging Face directory into 2 ranks", file=sys.stderr)
        loads = run_ranks("load", root, args.repeats)
        command = "python benchmarks/hf_bench.py " + " ".join(sys.argv[1:])
        table = markdown(command.strip(), payload, root, export, loads, args.repeats)
    print(table)
    if args.results:
        replace_section(args.results, table, START, END)


if __name__ == "__main__":
    main()

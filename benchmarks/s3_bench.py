#!/usr/bin/env python3
"""Save and load through a local S3 server (moto, in its own process on 127.0.0.1): ours vs stock torch.

    python benchmarks/s3_bench.py [--size-mib N] [--repeats N] [--results benchmarks/RESULTS.md]

Both ways users reach S3 with DCP: s3torchconnector's file system (its dcp_optimized reader) and
upstream's fsspec file system (s3fs), under this package's writer and reader and under stock torch's.
Every load fills already-touched tensors and is checked bit-exact. Per row: median and minimum
seconds over alternated repeats, and the requests the server served for one save or load with the
bytes it received and sent. The server is a Python program on the same 2 cores, so its seconds say how much work each
client asks of it; the request and byte counts are exact. With ``--results`` the table replaces the
section between ``<!-- s3-bench-start -->`` and ``<!-- s3-bench-end -->`` of that file (appended
where there is none).
"""
import argparse
import copy
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

import torch  # noqa: E402
import torch.distributed.checkpoint  # noqa: E402
from bench import replace_section  # noqa: E402

import dcp_filesystem  # noqa: E402
from dcp_filesystem._compat import single_process_dcp  # noqa: E402

REGION = "us-east-1"
START, END = "<!-- s3-bench-start -->", "<!-- s3-bench-end -->"


def start_server():
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "s3_server.py")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    url = proc.stdout.readline().strip()
    if not url.startswith("http://127.0.0.1:"):
        proc.kill()
        raise SystemExit(f"s3_bench: the S3 server did not start (said {url!r})")
    return proc, url


def take_requests(url):
    with urllib.request.urlopen(f"{url}/__requests__?clear=1", timeout=60) as answer:
        return json.load(answer)


def state_dict(size_mib):
    gen = torch.Generator().manual_seed(0)
    big = max(1, size_mib // 32)
    sd = {f"layers.{i}.weight": torch.randn(2048, 4096, generator=gen) for i in range(big)}  # 32 MiB each
    sd.update({f"norms.{i}.weight": torch.randn(256, generator=gen) for i in range(500)})  # 1 KiB each
    sd.update(step=1234, config={"lr": 3e-4})
    return sd


def targets(sd):
    out = {k: torch.empty_like(v) if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in sd.items()}
    for v in out.values():
        if isinstance(v, torch.Tensor):
            v.fill_(0)  # touched: the load fills pages that exist
    return out


def check(sd, loaded):
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            if not torch.equal(v, loaded[k]):
                raise SystemExit(f"s3_bench: {k} differs after the load")


def connector_pair(base_writer, base_reader):
    from s3torchconnector import S3ClientConfig, S3ReaderConstructor
    from s3torchconnector.dcp import S3FileSystem, S3StorageReader

    config = S3ClientConfig(force_path_style=True)

    class Writer(base_writer):
        def __init__(self, path, **kwargs):
            super().__init__(path, sync_files=False, **kwargs)
            self.fs = S3FileSystem(REGION, s3client_config=config)
            self.path = self.fs.init_path(path)

    class Reader(base_reader):
        def __init__(self, path):
            super().__init__(path)
            self._reader_constructor = S3ReaderConstructor.dcp_optimized()
            self.fs = S3FileSystem(REGION, s3client_config=config, reader_constructor=self._reader_constructor)
            self.path = self.fs.init_path(path)

        prepare_local_plan = S3StorageReader.prepare_local_plan

    return Writer, Reader


def fsspec_pair(base_writer, base_reader):
    from torch.distributed.checkpoint._fsspec_filesystem import FileSystem

    class Writer(base_writer):
        def __init__(self, path, **kwargs):
            super().__init__(path, **kwargs)
            self.fs = FileSystem()
            self.path = self.fs.init_path(path)

    class Reader(base_reader):
        def __init__(self, path):
            super().__init__(path)
            self.fs = FileSystem()
            self.path = self.fs.init_path(path)

    return Writer, Reader


def variants():
    stock = (torch.distributed.checkpoint.FileSystemWriter, torch.distributed.checkpoint.FileSystemReader)
    ours = (dcp_filesystem.FileSystemWriter, dcp_filesystem.FileSystemReader)
    safetensors = {"serialization_format": dcp_filesystem.SerializationFormat.SAFETENSORS}
    found = []
    for client, pair in (("s3torchconnector", connector_pair), ("fsspec", fsspec_pair)):
        try:
            stock_classes, our_classes = pair(*stock), pair(*ours)
        except ImportError as e:
            print(f"s3_bench: no {client} rows: {e}", file=sys.stderr)
            continue
        found += [
            (f"{client}, stock torch TORCH_SAVE", stock_classes, {}),
            (f"{client}, ours TORCH_SAVE", our_classes, {}),
            (f"{client}, ours SAFETENSORS", our_classes, safetensors),
        ]
    return found


def counts(requests):
    methods = Counter(r[0] for r in requests)
    made = " ".join(f"{n} {m}" for m, n in sorted(methods.items()))
    return made, sum(r[3] for r in requests), sum(r[4] for r in requests)


def run(size_mib, repeats, bucket_url):
    with tempfile.TemporaryDirectory() as scratch:
        dcp = single_process_dcp(scratch)
    save, load = dcp.save, dcp.load
    sd = state_dict(size_mib)
    nbytes = sum(v.numel() * v.element_size() for v in sd.values() if isinstance(v, torch.Tensor))
    cases = variants()
    times = {(name, op): [] for name, _, _ in cases for op in ("save", "load")}
    requests = {}
    for repeat in range(repeats):
        for name, (writer_cls, reader_cls), options in cases:
            path = f"s3://bench/{uuid.uuid4().hex[:8]}"
            take_requests(bucket_url)
            start = time.perf_counter()
            save(sd, writer_cls(path, **options))
            times[(name, "save")].append(time.perf_counter() - start)
            requests.setdefault((name, "save"), take_requests(bucket_url))
            dest = targets(sd)
            start = time.perf_counter()
            load(dest, reader_cls(path))
            times[(name, "load")].append(time.perf_counter() - start)
            requests.setdefault((name, "load"), take_requests(bucket_url))
            check(sd, dest)
            print(f"  repeat {repeat + 1}/{repeats}: {name}", file=sys.stderr)
    rows = []
    for name, _, _ in cases:
        for op in ("save", "load"):
            samples = times[(name, op)]
            made, sent, received = counts(requests[(name, op)])
            rows.append((op, name, statistics.median(samples), min(samples), nbytes / statistics.median(samples) / 1e9,
                         made, sent, received))
    return nbytes, rows


def markdown(size_bytes, repeats, rows, command):
    lines = [
        START,
        "## Through a local S3 server",
        "",
        f"`{command}` on {datetime.date.today().isoformat()}, torch {torch.__version__}, Python "
        f"{sys.version.split()[0]}: {size_bytes / 1e6:.0f} MB of tensors (32 MiB matrices and 500 × 1 KiB), "
        f"moto's S3 server in its own process on 127.0.0.1, medians of {repeats} alternated repeats, loads into "
        "touched tensors, checked bit-exact. Requests and bytes are the server's, for one save or load.",
        "",
        "| op | variant | median s | min s | GB/s | requests | bytes received | bytes sent |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for op, name, median, low, rate, made, sent, received in rows:
        lines.append(f"| {op} | {name} | {median:.3f} | {low:.3f} | {rate:.3f} | {made} | {received:,} | {sent:,} |")
    lines.append(END)
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mib", type=int, default=256, help="MiB of 32 MiB matrices (default 256)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--results", help="write the table into this markdown file (e.g. benchmarks/RESULTS.md)")
    args = p.parse_args()
    proc, url = start_server()
    saved = dict(os.environ)
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_REGION=REGION,
                      AWS_DEFAULT_REGION=REGION, AWS_ENDPOINT_URL=url)
    try:
        import boto3

        boto3.client("s3", endpoint_url=url, region_name=REGION).create_bucket(Bucket="bench")
        size_bytes, rows = run(args.size_mib, args.repeats, url)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        proc.stdin.close()
        proc.wait(timeout=30)
    table = markdown(size_bytes, args.repeats, rows, "python benchmarks/s3_bench.py " + " ".join(sys.argv[1:]))
    print(table)
    if args.results:
        replace_section(args.results, table, START, END)


if __name__ == "__main__":
    main()

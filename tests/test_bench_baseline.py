"""``benchmarks/bench.py --baseline DIR``: another revision's package, in the same run, with a before/after table."""
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import assert_state_equal, dcp_load, dcp_save, zeros_like_state

import dcp_filesystem

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_baseline_is_a_package_of_its_own(bench, tmp_path):
    copy = tmp_path / "old" / "dcp_filesystem"
    shutil.copytree(os.path.dirname(dcp_filesystem.__file__), copy, ignore=shutil.ignore_patterns("__pycache__"))
    baseline = bench.baseline_package(str(copy))
    assert baseline.__name__ == bench.BASELINE_MODULE and baseline is not dcp_filesystem
    assert baseline.FileSystemWriter is not dcp_filesystem.FileSystemWriter
    assert os.path.dirname(sys.modules[baseline.FileSystemReader.__module__].__file__) == str(copy)
    names = [v.name for v in bench.variants(baseline)]
    assert names[:4] == ["dcp_filesystem torch_save", "dcp_filesystem safetensors",
                         "baseline torch_save", "baseline safetensors"]
    state = {"w": torch.randn(8, 8), "step": 3}
    dcp_save(state, baseline.FileSystemWriter(tmp_path / "c"))  # the baseline writes, this revision reads
    loaded = zeros_like_state(state)
    dcp_load(loaded, dcp_filesystem.FileSystemReader(tmp_path / "c"))
    assert_state_equal(state, loaded)


def test_a_folder_without_a_package_is_refused(bench, tmp_path):
    with pytest.raises(SystemExit, match=f"--baseline {tmp_path}: no __init__.py there"):
        bench.baseline_package(str(tmp_path))


def row(variant, op, median_ms, fastest_ms, cold=False, threads=1):
    return {"workload": "llm", "op": op, "cold": cold, "variant": variant, "sync": True, "threads": threads,
            "median_s": median_ms / 1e3, "seconds": [fastest_ms / 1e3, median_ms / 1e3]}


def test_before_after_table(bench):
    rows = [
        row("dcp_filesystem safetensors", "load", 105.0, 100.0),
        row("baseline safetensors", "load", 100.0, 95.0),
        row("dcp_filesystem torch_save", "load", 90.0, 80.0, cold=True),
        row("baseline torch_save", "load", 120.0, 110.0, cold=True),
        row("dcp_filesystem torch_save", "save", 50.0, 40.0, threads=2),  # no baseline row: left out
        row("stock torch_save", "load", 500.0, 450.0),
    ]
    lines = bench.baseline_table({"baseline": "/tmp/old/dcp_filesystem"}, rows)
    assert lines[1] == "## Before/after: this revision vs the baseline /tmp/old/dcp_filesystem"
    assert lines[-2:] == [
        "| llm | load | safetensors | True | 1 | 100.0 [95.0] | 105.0 [100.0] | +5.0 % |",
        "| llm | load cold | torch_save | True | 1 | 120.0 [110.0] | 90.0 [80.0] | -25.0 % |",
    ]
    assert bench.baseline_table({"baseline": None}, rows) == []


def test_docs_are_never_written_from_a_baseline_run(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "bench.py"), "--docs", "--baseline", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert "--docs and --baseline: the docs show this revision only" in proc.stderr

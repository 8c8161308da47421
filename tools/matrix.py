"""Run the test suite against several (torch, Python) pairs.

Each cell gets its own virtual environment in a cache folder outside the
repository (``$DCP_MATRIX_CACHE``, default ``~/.cache/dcp_filesystem-matrix``);
a stamp file records what was installed into it. After a cell's suite, the
cross-version check runs in that cell (``tools/cross_version.py``): it reads
with this package every checkpoint that cells run before it wrote, then writes
its own (ours and stock torch's, both formats) for the cells after it. Cells
run oldest first, then newest to second oldest, and the oldest reads again at
the end: every newer torch's checkpoints are read on every older torch, and
the oldest torch's on every newer one.

    python tools/matrix.py                      # the CI spread (venvs kept)
    python tools/matrix.py --all                # all fifteen minors (venvs beyond the CI spread deleted)
    python tools/matrix.py --all --keep         # ... and all kept
    python tools/matrix.py 2.6.0/3.9 2.13.0/3.11
    python tools/matrix.py --install-only
"""
from __future__ import annotations

import argparse
import glob
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CROSS = ROOT / "tools" / "cross_version.py"
CACHE = Path(os.environ.get("DCP_MATRIX_CACHE", Path.home() / ".cache" / "dcp_filesystem-matrix"))
# The newest patch of every minor, Pythons spread over 3.9-3.13 within what each torch supports.
ALL_CELLS = [
    "2.1.2/3.9", "2.2.2/3.10", "2.3.1/3.11", "2.4.1/3.10", "2.5.1/3.12",
    "2.6.0/3.9", "2.7.1/3.12", "2.8.0/3.11", "2.9.1/3.10", "2.10.0/3.12",
    "2.11.0/3.11", "2.12.1/3.13", "2.13.0/3.11", "2.14.1/3.13", "2.15.0/3.13",
]  # fmt: skip
# One cell on each side of every behaviour boundary the suite knows (README, "Per-version notes").
CI_CELLS = ["2.1.2/3.9", "2.2.2/3.10", "2.3.1/3.11", "2.5.1/3.12", "2.6.0/3.9", "2.8.0/3.11", "2.10.0/3.12",
            "2.15.0/3.13"]  # fmt: skip
# A cell's suite takes 3-4 minutes on 2 cores: past this, it is hung, and CI has other cells to run.
CELL_TIMEOUT_S = 900
TEST_DEPS = ["pytest", "safetensors", "zstandard", "zlib-ng", "hypothesis", "moto[server]", "s3fs"]


def minor(cell: str) -> tuple:
    return tuple(int(x) for x in cell.split("/")[0].split(".")[:2])


def find_python(version: str) -> str:
    pyenv_root = os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv"))
    found = sorted(glob.glob(f"{pyenv_root}/versions/{version}.*/bin/python{version}"))
    if found:
        return found[-1]
    exe = shutil.which(f"python{version}")
    if exe:
        return exe
    raise SystemExit(f"matrix: no Python {version} found (pyenv or PATH)")


def test_deps(torch_version: str) -> list:
    # torch 2.2's DCP imports NumPy and was built against NumPy 1; stock torch's SAFETENSORS
    # writer (2.8+) needs NumPy. 2.1 stays without it, which proves the package never needs it
    # (torch 2.1 + NumPy 2 has no Tensor.numpy()).
    version = minor(torch_version)
    if version >= (2, 3):  # s3torchconnector's DCP classes need torch 2.3+ (its "dcp" extra says so)
        return TEST_DEPS + ["numpy", "s3torchconnector[dcp]"]
    return TEST_DEPS + (["numpy<2"] if version == (2, 2) else [])


def venv_path(cell: str) -> Path:
    torch_version, py = cell.split("/")
    return CACHE / f"py{py}-torch{torch_version}"


def ensure_venv(cell: str, log) -> Path:
    torch_version, py = cell.split("/")
    venv = venv_path(cell)
    stamp = venv / "dcp-matrix-stamp"
    wanted = " ".join([f"torch=={torch_version}"] + test_deps(torch_version))
    if stamp.exists() and stamp.read_text() == wanted:
        return venv
    if not (venv / "bin" / "python").exists():
        subprocess.run([find_python(py), "-m", "venv", str(venv)], check=True, stdout=log, stderr=log)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-cache-dir"]
    # A machine-wide pip constraint may cap torch below the newest release: this cell asks for an exact one.
    env = dict(os.environ, PIP_CONSTRAINT=os.devnull)
    subprocess.run(pip + wanted.split(), check=True, stdout=log, stderr=log, env=env)
    stamp.write_text(wanted)
    return venv


def install(cell: str) -> tuple:
    """(venv or None, status, seconds), the pip log beside the venv."""
    start = time.monotonic()
    log_path = venv_path(cell).parent / (venv_path(cell).name + ".log")
    with open(log_path, "w") as log:
        try:
            return ensure_venv(cell, log), "installed", time.monotonic() - start
        except subprocess.CalledProcessError:
            return None, f"install failed (see {log_path})", time.monotonic() - start


def run_bounded(cmd: list) -> str:
    """passed, failed, or timed out (killed after CELL_TIMEOUT_S)."""
    try:
        return "passed" if subprocess.run(cmd, cwd=ROOT, timeout=CELL_TIMEOUT_S).returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        return f"timed out after {CELL_TIMEOUT_S} s"


def run_order(cells: list) -> list:
    """Oldest first, then newest to oldest (see the module docstring)."""
    ordered = sorted(cells, key=minor)
    return ordered[:1] + ordered[:0:-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cells", nargs="*", help="TORCH/PYTHON, e.g. 2.4.1/3.10 (default: the CI spread)")
    parser.add_argument("--all", action="store_true", help="every minor from 2.1 to 2.15")
    parser.add_argument("--keep", action="store_true",
                        help="with --all: keep every cell's venv (5-7 GB each), not only the CI spread's")
    parser.add_argument("--install-only", action="store_true")
    parser.add_argument("--no-cross", action="store_true", help="skip the cross-version check")
    parser.add_argument("--pytest-args", default="", help="extra arguments for pytest")
    args = parser.parse_args()
    cells = ALL_CELLS if args.all else (args.cells or CI_CELLS)
    delete_after = args.all and not args.keep
    CACHE.mkdir(parents=True, exist_ok=True)
    cross_dir = CACHE / "cross-version"
    if not args.install_only and not args.no_cross:
        shutil.rmtree(cross_dir, ignore_errors=True)
        cross_dir.mkdir()
    results = []
    order = run_order(cells)
    cross = not args.install_only and not args.no_cross and len(order) > 1
    # The next cell installs (network, disk) while this one's suite runs (CPU): one cell ahead.
    with ThreadPoolExecutor(max_workers=1) as installer:
        pending = installer.submit(install, order[0])
        for index, cell in enumerate(order):
            venv, status, seconds = pending.result()
            if index + 1 < len(order):
                pending = installer.submit(install, order[index + 1])
            if venv is None or args.install_only:
                results.append((cell, status, seconds))
                continue
            start = time.monotonic()
            python = str(venv / "bin" / "python")
            cmd = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"] + shlex.split(args.pytest_args)
            print(f"== {cell}: {' '.join(cmd)}", flush=True)
            status = run_bounded(cmd)
            if not args.no_cross:
                print(f"== {cell}: cross-version", flush=True)
                cross_status = run_bounded([python, str(CROSS), str(cross_dir)])
                if cross_status != "passed":
                    status += f", cross-version {cross_status}"
            if delete_after and cell not in CI_CELLS and not (index == 0 and cross):
                shutil.rmtree(venv)
            results.append((cell, status, seconds + time.monotonic() - start))
    first = venv_path(order[0])
    if cross and (first / "bin" / "python").exists():
        # The oldest cell reads what every newer one wrote.
        print(f"== {order[0]}: cross-version, newer checkpoints", flush=True)
        status = run_bounded([str(first / "bin" / "python"), str(CROSS), str(cross_dir), "--read-only"])
        results.append((f"{order[0]} reads newer", status if status == "passed" else f"cross-version {status}", 0.0))
        if delete_after and order[0] not in CI_CELLS:
            shutil.rmtree(first)
    print("\n| torch / Python | result | seconds |\n|---|---|---|")
    for cell, status, seconds in results:
        print(f"| {cell} | {status} | {seconds:.0f} |")
    ok = all(status in ("passed", "installed") for _, status, _ in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

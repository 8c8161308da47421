"""Run the test suite against several (torch, Python) pairs.

Each cell gets its own virtual environment in a cache folder outside the
repository (``$DCP_MATRIX_CACHE``, default ``~/.cache/dcp_filesystem-matrix``),
created once and reused; a stamp file records what was installed into it.

    python tools/matrix.py                      # the CI subset
    python tools/matrix.py 2.6.0/3.12 2.13.0/3.11
    python tools/matrix.py --install-only
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("DCP_MATRIX_CACHE", Path.home() / ".cache" / "dcp_filesystem-matrix"))
CI_CELLS = ["2.1.2/3.9", "2.4.1/3.10", "2.8.0/3.11", "2.15.0/3.13"]
TEST_DEPS = ["pytest", "safetensors", "zstandard", "hypothesis", "typing_extensions"]


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
    # Stock torch's SAFETENSORS writer (2.8+) needs NumPy; cells below 2.3 stay without it,
    # which also proves the package never needs it (torch 2.1 + NumPy 2 has no Tensor.numpy()).
    major, minor = (int(x) for x in torch_version.split(".")[:2])
    return TEST_DEPS + (["numpy"] if (major, minor) >= (2, 3) else [])


def ensure_venv(torch_version: str, py: str, log) -> Path:
    venv = CACHE / f"py{py}-torch{torch_version}"
    stamp = venv / "dcp-matrix-stamp"
    wanted = " ".join([f"torch=={torch_version}"] + test_deps(torch_version))
    if stamp.exists() and stamp.read_text() == wanted:
        return venv
    if not (venv / "bin" / "python").exists():
        subprocess.run([find_python(py), "-m", "venv", str(venv)], check=True, stdout=log, stderr=log)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run(pip + wanted.split(), check=True, stdout=log, stderr=log)
    stamp.write_text(wanted)
    return venv


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cells", nargs="*", default=CI_CELLS, help="TORCH/PYTHON, e.g. 2.4.1/3.10")
    parser.add_argument("--install-only", action="store_true")
    parser.add_argument("--pytest-args", default="", help="extra arguments for pytest")
    args = parser.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    results = []
    for cell in args.cells:
        torch_version, py = cell.split("/")
        log_path = CACHE / f"py{py}-torch{torch_version}.log"
        start = time.monotonic()
        with open(log_path, "w") as log:
            try:
                venv = ensure_venv(torch_version, py, log)
            except subprocess.CalledProcessError:
                results.append((cell, "install failed", time.monotonic() - start, log_path))
                continue
        if args.install_only:
            results.append((cell, "installed", time.monotonic() - start, log_path))
            continue
        cmd = [str(venv / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"]
        cmd += args.pytest_args.split()
        print(f"== {cell}: {' '.join(cmd)}", flush=True)
        proc = subprocess.run(cmd, cwd=ROOT)
        status = "passed" if proc.returncode == 0 else f"failed (pytest exit {proc.returncode})"
        results.append((cell, status, time.monotonic() - start, log_path))
    print("\n| torch / Python | result | seconds |\n|---|---|---|")
    for cell, status, seconds, log_path in results:
        extra = f" (see {log_path})" if "install" in status and "failed" in status else ""
        print(f"| {cell} | {status}{extra} | {seconds:.0f} |")
    ok = all(status in ("passed", "installed") for _, status, _, _ in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

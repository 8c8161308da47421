"""Packaging and the README's two commands, on a clone of this checkout (so only committed files count)."""
import importlib.machinery
import importlib.util
import json
import os
import re
import site
import subprocess
import sys
import tarfile
import zipfile

import pytest
from helpers import REPO, run_clean_python
from test_cli import check_bench_json

ROW = re.compile(
    r"(dcp_filesystem|torch \(stock\)) +(TORCH_SAVE|SAFETENSORS) +(\d+) +(\d+) +(\d+) +[\d.]+ +[\d.]+ +(yes|no) +(\S+)"
)


def clean_env():
    """The environment without this checkout on PYTHONPATH and without an enclosing make's settings."""
    return {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "VENV")
    }


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("clone") / "dcp_filesystem")
    subprocess.run(["git", "clone", "--quiet", REPO, path], check=True)
    return path


def build_package():
    """The build package (python -m build), or a skip where it is missing. After `pip install .` in a checkout,
    the build/ folder pip leaves there imports as a namespace package named build: that is no build package."""
    build = pytest.importorskip("build", reason="needs the build package (python -m build)")
    if not hasattr(build, "ProjectBuilder"):
        pytest.skip(f"needs the build package (python -m build); 'build' here is the folder {list(build.__path__)[0]}")
    return build


def test_a_build_folder_is_not_taken_for_the_build_package(tmp_path, monkeypatch):
    folder = tmp_path / "build"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "build", raising=False)
    monkeypatch.setattr(importlib.machinery.PathFinder, "find_spec", _namespace_only(str(tmp_path)))
    with pytest.raises(pytest.skip.Exception) as info:
        build_package()
    assert str(info.value) == f"needs the build package (python -m build); 'build' here is the folder {folder}"


def _namespace_only(root):
    """PathFinder.find_spec that finds ``build`` only in ``root`` (where it is a folder without __init__.py)."""
    original = importlib.machinery.PathFinder.find_spec

    def find_spec(name, path=None, target=None):
        return original(name, [root] if name == "build" else path, target)

    return find_spec


@pytest.fixture(scope="module")
def dist(clone, tmp_path_factory):
    build = build_package()
    pytest.importorskip("setuptools", reason="needs setuptools for python -m build --no-isolation")
    builder = build.ProjectBuilder(clone)
    unmet = builder.check_dependencies("sdist") | builder.check_dependencies("wheel")
    if unmet:  # e.g. a venv's bundled setuptools < 70.1 without the wheel package
        pytest.skip(f"python -m build --no-isolation: unmet build dependencies {sorted(unmet)}")
    out = str(tmp_path_factory.mktemp("dist"))
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", out, clone],
        check=True, capture_output=True, env=clean_env(),
    )
    return out


def version(clone):
    with open(os.path.join(clone, "dcp_filesystem", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"$', f.read(), re.M).group(1)


def test_build_makes_one_sdist_and_one_wheel_of_the_package_alone(clone, dist):
    v = version(clone)
    assert sorted(os.listdir(dist)) == [f"dcp_filesystem-{v}-py3-none-any.whl", f"dcp_filesystem-{v}.tar.gz"]
    with zipfile.ZipFile(os.path.join(dist, f"dcp_filesystem-{v}-py3-none-any.whl")) as wheel:
        names = wheel.namelist()
    package = sorted(n for n in names if not n.startswith(f"dcp_filesystem-{v}.dist-info/"))
    sources = [n for n in os.listdir(os.path.join(clone, "dcp_filesystem")) if n.endswith(".py") or n == "py.typed"]
    assert package == sorted("dcp_filesystem/" + name for name in sources)
    # The BSD-3-Clause text that setup.cfg declares travels with both (dist-info/ or dist-info/licenses/).
    assert [n for n in names if n.startswith(f"dcp_filesystem-{v}.dist-info/") and n.endswith("/LICENSE")]
    with tarfile.open(os.path.join(dist, f"dcp_filesystem-{v}.tar.gz")) as sdist:
        assert f"dcp_filesystem-{v}/LICENSE" in sdist.getnames()
    with zipfile.ZipFile(os.path.join(dist, f"dcp_filesystem-{v}-py3-none-any.whl")) as wheel:
        metadata = wheel.read(f"dcp_filesystem-{v}.dist-info/METADATA").decode()
    assert "Requires-Dist: zlib-ng\n" in metadata and "Classifier: Programming Language :: Python :: 3.11\n" in metadata
    assert "Torch versions\n==============" in metadata  # the README is the description
    assert ".. image:: benchmarks/" not in metadata and "<benchmarks/" not in metadata


def test_the_index_page_description_has_no_image_or_link_into_the_source_tree():
    spec = importlib.util.spec_from_file_location("dcp_filesystem_setup", os.path.join(REPO, "setup.py"))
    setup_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup_py)  # defines long_description; setup() runs only as __main__
    with open(os.path.join(REPO, "README.rst"), encoding="utf-8") as f:
        readme = f.read()
    assert ".. image:: benchmarks/summary.png" in readme and "<benchmarks/RESULTS.md>`_" in readme
    description = setup_py.long_description()
    assert ".. image::" not in description and "<benchmarks/" not in description
    assert "``benchmarks/RESULTS.md`` (in the source distribution)" in description
    assert description.replace("``benchmarks/RESULTS.md`` (in the source distribution)", "") == re.sub(
        r"\.\. image:: benchmarks/summary\.png\n   :alt: .*\n\n", "", readme
    ).replace(re.search(r"`benchmarks/RESULTS.md\s+<benchmarks/RESULTS.md>`_", readme).group(0), "")


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_runs_the_cli_and_round_trips(clone, dist, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    # torch and pip from the running interpreter's environment; --system-site-packages would give only the
    # base installation's packages when the running interpreter is itself a venv (make test, the matrix).
    with open(os.path.join(purelib, "running_interpreter.pth"), "w") as f:
        f.write("\n".join(site.getsitepackages()) + "\n")
    wheel = os.path.join(dist, f"dcp_filesystem-{version(clone)}-py3-none-any.whl")
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--force-reinstall", wheel],
        check=True, capture_output=True, env=clean_env(), cwd=str(tmp_path),
    )

    cli = subprocess.run(
        [python, "-m", "dcp_filesystem", "--help"], capture_output=True, text=True, env=clean_env(), cwd=str(tmp_path)
    )
    assert cli.returncode == 0, cli.stderr
    assert "{inspect,verify,bench}" in cli.stdout

    scratch = tmp_path / "bench" / "scratch"
    bench = subprocess.run(
        [python, "-m", "dcp_filesystem", "bench", "--dir", str(scratch), "--size", "4MB", "--repeats", "1", "--json"],
        capture_output=True, text=True, env=clean_env(), cwd=str(tmp_path), timeout=300,
    )
    assert bench.returncode == 0, bench.stderr
    check_bench_json(json.loads(bench.stdout), 4 * 10**6)
    assert not (tmp_path / "bench").exists()

    out = run_clean_python(
        """
        import os, warnings
        import torch
        import torch.distributed.checkpoint as dcp
        import dcp_filesystem
        from dcp_filesystem import FileSystemReader, FileSystemWriter, SerializationFormat
        from helpers import dcp_load, dcp_save

        warnings.simplefilter("ignore")
        print(os.path.realpath(dcp_filesystem.__file__))
        for fmt in (SerializationFormat.TORCH_SAVE, SerializationFormat.SAFETENSORS):
            saved = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "n": 7}
            loaded = {"w": torch.zeros(2, 3), "n": 0}
            writer, reader = FileSystemWriter(fmt.name, serialization_format=fmt), FileSystemReader(fmt.name)
            dcp_save(saved, writer)
            dcp_load(loaded, reader)
            print(fmt.name, loaded["w"].tolist(), loaded["n"])
        """,
        cwd=str(tmp_path), python=python,
    )
    assert out.splitlines() == [
        os.path.join(os.path.realpath(purelib), "dcp_filesystem", "__init__.py"),
        "TORCH_SAVE [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]] 7",
        "SAFETENSORS [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]] 7",
    ]


def make_n(clone, target):
    proc = subprocess.run(
        ["make", "--no-print-directory", "-n", target], cwd=clone, capture_output=True, text=True, env=clean_env()
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_readme_commands_create_the_venv_then_run(clone):
    venv = make_n(clone, "venv")
    base = [
        "python3 -m venv --system-site-packages .venv",
        '.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"',
        ".venv/bin/python -m pip install -q zlib-ng",
        "touch .venv/.base",
    ]
    assert venv[:4] == base and venv[-1] == "touch .venv/.ready"
    assert venv[4].startswith(".venv/bin/python -m pip install -q pytest ") and "moto[server]" in venv[4]
    # make demo installs what the demo uses (torch, the package's requirements) and none of the test tools.
    assert make_n(clone, "demo") == base + [".venv/bin/python examples/demo.py"]
    assert make_n(clone, "test") == venv + [".venv/bin/python -m pytest -q tests"]


def test_make_demo_installs_the_packages_requirements():
    with open(os.path.join(REPO, "setup.cfg")) as f:
        requires = re.search(r"^install_requires =\n((?:    .*\n)+)", f.read(), re.M).group(1).split()
    with open(os.path.join(REPO, "Makefile")) as f:
        make_requires = re.search(r"^REQUIRES := (.*)$", f.read(), re.M).group(1).split()
    assert requires == ["torch>=2.1"] + make_requires == ["torch>=2.1", "zlib-ng"]


@pytest.mark.slow
def test_demo_from_the_clone_is_bit_exact_and_verified(clone):
    assert os.path.isfile(os.path.join(clone, "examples", "demo.py")), "examples/demo.py is not committed"
    proc = subprocess.run(
        [sys.executable, os.path.join("examples", "demo.py")],
        cwd=clone, capture_output=True, text=True, env=clean_env(), timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert re.fullmatch(r"GPT: \d+\.\d M parameters, AdamW after 2 steps", lines[0])
    assert lines[2].split() == ["writer", "format", "entries", "bytes", "files", "save", "GB/s", "load", "GB/s",
                                "bit-exact", "verify"]
    rows = [ROW.fullmatch(line).groups() for line in lines[3:6]]
    assert [(r[0], r[1], r[4], r[5], r[6]) for r in rows] == [
        ("dcp_filesystem", "TORCH_SAVE", "3", "yes", "OK"),
        ("dcp_filesystem", "SAFETENSORS", "3", "yes", "OK"),
        ("torch (stock)", "TORCH_SAVE", "3", "yes", "-"),
    ]
    assert rows[0][2] == rows[1][2] == rows[2][2]  # the same entries in every checkpoint
    # TORCH_SAVE data files are upstream's format byte for byte; our .metadata adds a CRC-32 per item
    # (a few bytes each) and a 12-byte trailer, and holds each torch.Size value once (upstream: each use).
    assert 0 < abs(int(rows[0][3]) - int(rows[2][3])) < 8192, (rows[0][3], rows[2][3])
    assert lines[6:] == ["", "GB/s: one save and one load each; `make bench` takes medians of interleaved runs."]

"""Every code block of README.rst, run as written (placeholders of the command synopsis filled in)."""
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import REPO, dcp_save, load_writes_back_values, run_clean_python, save_needs_process_group

from dcp_filesystem import FileSystemWriter


def readme_blocks():
    """(kind, text) of each code block: ``.. code-block:: KIND`` or a ``::`` literal block ("literal")."""
    with open(os.path.join(REPO, "README.rst"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    blocks = []
    for i, line in enumerate(lines):
        directive = re.fullmatch(r"\.\. code-block:: (\w+)", line)
        if directive is None and not (line.endswith("::") and not line.startswith("..")):
            continue
        body = []
        for following in lines[i + 1 :]:
            if following and not following.startswith(" "):
                break
            body.append(following)
        blocks.append((directive.group(1) if directive else "literal", textwrap.dedent("\n".join(body)).strip()))
    return blocks


def block(kind, first_words):
    (text,) = [text for k, text in readme_blocks() if k == kind and text.startswith(first_words)]
    return text


def test_the_readme_has_exactly_the_blocks_these_tests_run():
    assert [(kind, text.split()[0]) for kind, text in readme_blocks()] == [
        ("python", "import"),  # the usage example
        ("sh", "make"),  # the two commands
        ("literal", "from"),  # the vendored import
        ("sh", "python"),  # the command line
        ("literal", "|"),  # the benchmark table: output, checked below against its JSON's form
    ]


def test_usage_example_runs_as_written(tmp_path):
    if save_needs_process_group():
        pytest.skip("the example calls dcp.save outside a process group: torch 2.1 has no dcp.save and torch 2.2's "
                    "needs a process group (README's per-version notes say so)")
    if not load_writes_back_values():
        pytest.skip("the example reads 'step' back: this torch's dcp.load leaves non-tensor values out of the "
                    "caller's dict (pytorch#125528; README's per-version notes say so)")
    code = f"import sys\nsys.path.insert(0, {REPO!r})\n" + block("python", "import")
    run_clean_python(code, cwd=str(tmp_path))


def test_two_commands_are_make_targets_that_the_packaging_tests_run():
    commands = [line.split("#")[0].strip() for line in block("sh", "make").splitlines()]
    assert commands == ["make demo", "make test"]
    for command in commands:  # what each runs is checked on a clone in tests/test_packaging.py
        proc = subprocess.run(shlex.split(command) + ["-n"], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


def test_vendored_import_runs_as_written(tmp_path):
    line = block("literal", "from")
    assert line == "from yourpkg._vendor.dcp_filesystem import FileSystemWriter, FileSystemReader"
    vendor = tmp_path / "yourpkg" / "_vendor"
    shutil.copytree(os.path.join(REPO, "dcp_filesystem"), str(vendor / "dcp_filesystem"))
    (tmp_path / "yourpkg" / "__init__.py").write_text("")
    (vendor / "__init__.py").write_text("")
    out = run_clean_python(
        line + "\n" + textwrap.dedent(
            """
            import importlib.util, sys, torch, warnings
            import torch.distributed.checkpoint as dcp
            assert importlib.util.find_spec("dcp_filesystem") is None
            warnings.simplefilter("ignore")
            saved, loaded = {"w": torch.arange(4.0)}, {"w": torch.zeros(4)}
            from helpers import dcp_load, dcp_save
            dcp_save(saved, FileSystemWriter("ckpt"))
            dcp_load(loaded, FileSystemReader("ckpt"))
            print(FileSystemWriter.__module__, loaded["w"].tolist())
            """
        ),
        cwd=str(tmp_path),
    )
    assert out.split() == ["yourpkg._vendor.dcp_filesystem.writer", "[0.0,", "1.0,", "2.0,", "3.0]"]


def synopsis_commands(path):
    """Each line of the command-line block with PATH filled in, once without and once with [--json];
    [ARGS] becomes --help."""
    for line in block("sh", "python").splitlines():
        words = shlex.split(line.split("#")[0])
        words = [path if w == "PATH" else "--help" if w == "[ARGS]" else w for w in words]
        if "[--json]" in words:
            yield [w for w in words if w != "[--json]"]
            yield [w if w != "[--json]" else "--json" for w in words]
        else:
            yield words


def test_command_line_synopsis_runs(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    dcp_save({"w": torch.ones(3), "step": 1}, FileSystemWriter(ckpt))
    commands = list(synopsis_commands(ckpt))
    assert [c[3] for c in commands] == ["inspect", "inspect", "verify", "verify", "bench"]
    for words in commands:
        assert words[:3] == ["python", "-m", "dcp_filesystem"]
        proc = subprocess.run([sys.executable] + words[1:], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, (words, proc.stdout, proc.stderr)
        assert proc.stdout.strip(), words
    verified = subprocess.run([sys.executable, "-m", "dcp_filesystem", "verify", ckpt], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
    assert verified.stdout.startswith("OK: 2 entries")


def test_benchmark_table_has_the_columns_bench_prints():
    header = block("literal", "|").splitlines()[0]
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        import bench
    finally:
        sys.path.pop(0)
    printed = bench.markdown({"date": "-", "torch": "-", "python": "-", "cpus": 1, "repeats": 1, "command": "-"}, [])
    assert header in printed.splitlines()

"""Every code block of README.rst, run as written (placeholders of the command synopsis filled in); its first
screen; and its benchmark summary, checked against benchmarks/RESULTS.md and the chart of the same run."""
import json
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch
from helpers import REPO, dcp_save, load_writes_back_values, run_clean_python, save_needs_process_group

from dcp_filesystem import FileSystemWriter, _compat


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
        ("literal", "from"),  # the vendored import
        ("sh", "make"),  # the two commands
        ("sh", "python"),  # the command line
        ("python", "#"),  # object storage: s3torchconnector
        ("python", "#"),  # object storage: fsspec
        ("python", "#"),  # Hugging Face: the writer and reader (tests/test_hf_export.py runs it)
        ("sh", "#"),  # Hugging Face: export-hf (tests/test_hf_export.py runs it)
    ]


FIRST_SCREEN = 40


def test_the_first_screen_says_what_it_is_how_to_install_and_run_it():
    with open(os.path.join(REPO, "README.rst"), encoding="utf-8") as f:
        text = f.read()
    screen = "\n".join(text.splitlines()[:FIRST_SCREEN])
    intro = screen.split("\n\n")[1]  # the paragraph under the title
    assert len(re.findall(r"[.!?](?:\s|$)", intro)) <= 5, intro
    for shown in (".. code-block:: python", "dcp.save(", "dcp.load(", "pip install .", "_vendor", "make demo",
                  "make test"):
        assert shown in screen, shown
    example = block("python", "import")
    assert len(example.splitlines()) <= 10 and "FileSystemWriter(" in example and "FileSystemReader(" in example


def skip_unless_dcp_save_runs_single_process(what):
    if save_needs_process_group():
        pytest.skip(f"{what} calls dcp.save outside a process group: torch 2.1 has no dcp.save and torch 2.2's "
                    "needs a process group (README's per-version notes say so)")
    if not load_writes_back_values():
        pytest.skip(f"{what} reads 'step' back: this torch's dcp.load leaves non-tensor values out of the "
                    "caller's dict (pytorch#125528; README's per-version notes say so)")


def test_usage_example_runs_as_written(tmp_path):
    skip_unless_dcp_save_runs_single_process("the example")
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


@pytest.mark.slow
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


@pytest.fixture
def s3_env():
    """A local S3 server with the bucket the recipes use, and the environment that points clients at it."""
    pytest.importorskip("moto.server", reason="needs moto[server] (the test extra) for a local S3 server")
    boto3 = pytest.importorskip("boto3", reason="needs boto3 (with moto)")
    from s3_server import S3Server

    server = S3Server()
    try:
        boto3.client("s3", endpoint_url=server.url, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket="my-bucket")
        yield {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": server.url}
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["s3torchconnector", "fsspec"])
def test_object_storage_recipes_run_as_written(tmp_path, s3_env, recipe):
    skip_unless_dcp_save_runs_single_process(f"the {recipe} recipe")
    if recipe == "s3torchconnector":
        pytest.importorskip("s3torchconnector.dcp", reason="needs s3torchconnector[dcp] (test-s3 extra, torch 2.3+)")
        text = block("python", "# s3torchconnector")
    else:
        pytest.importorskip("s3fs", reason="needs s3fs (test extra)")
        text = block("python", "# upstream's fsspec")
    run_clean_python(f"import sys\nsys.path.insert(0, {REPO!r})\n" + text, cwd=str(tmp_path), env_extra=s3_env)


# ---------------------------------------------------------------- the benchmark summary
def read(*path):
    with open(os.path.join(REPO, *path), encoding="utf-8") as f:
        return f.read()


def readme_summary(bench):
    """(caption, header cells, row cells) of the README's summary: the text between its markers."""
    text = read("README.rst")
    start, end = text.index(bench.SUMMARY_START + "\n"), text.index(bench.SUMMARY_END + "\n")
    paragraphs = text[start:end].split("\n\n")
    caption = paragraphs[1].replace("\n", " ")
    (table,) = [p for p in paragraphs if p.startswith("=")]
    rule, header, _, *rows, _ = table.splitlines()
    spans = [m.span() for m in re.finditer(r"=+", rule)]

    def cells(line):
        return [line[a:b if i < len(spans) - 1 else None].strip() for i, (a, b) in enumerate(spans)]

    return caption, cells(header), [cells(row) for row in rows]


def md_rows(lines):
    """The cells of a Markdown table's lines, its alignment line left out."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines if line.startswith("|")]
    return [r for r in rows if not all(set(c) <= set("-:") for c in r)]


def results_md():
    """(caption, header cells, row cells) of RESULTS.md's summary, and its full table as dicts by column."""
    summary = read("benchmarks", "RESULTS.md").split("\n## Summary\n", 1)[1]
    summary, full = summary.split("\n## All rows\n", 1)
    summary = summary.split("\n## ", 1)[0]  # sections between them (the targets) are not the summary
    full = re.split(r"\n(?:## |<!-- )", full, maxsplit=1)[0]  # sections after it (the S3 rows) are not its rows
    paragraphs = summary.strip().split("\n\n")
    (i,) = [i for i, p in enumerate(paragraphs) if p.startswith("|")]
    header, *rows = md_rows(paragraphs[i].splitlines())
    full_header, *full_rows = md_rows(full.splitlines())
    return paragraphs[i - 1], header, rows, [dict(zip(full_header, r)) for r in full_rows]


def png_text(path):
    """The text chunks (tEXt, zTXt, iTXt) of a PNG file, by keyword."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    out, pos = {}, 8
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body, pos = data[pos + 8:pos + 8 + length], pos + 12 + length
        if kind == b"tEXt":
            key, value = body.split(b"\0", 1)
            out[key.decode("latin-1")] = value.decode("latin-1")
        elif kind == b"zTXt":
            key, value = body.split(b"\0", 1)
            out[key.decode("latin-1")] = zlib.decompress(value[1:]).decode("latin-1")
        elif kind == b"iTXt":
            key, rest = body.split(b"\0", 1)
            compressed, rest = rest[0], rest[2:]
            rest = rest.split(b"\0", 2)[2]  # language tag, translated keyword
            out[key.decode("latin-1")] = (zlib.decompress(rest) if compressed else rest).decode("utf-8")
    return out


def test_summary_table_is_the_one_in_results_md(bench):
    caption, header, rows = readme_summary(bench)
    md_caption, md_header, md_rows_, _ = results_md()
    assert caption.startswith(md_caption + " ")
    assert header == md_header == list(bench.SUMMARY_COLUMNS)
    assert rows == md_rows_
    assert 6 <= len(rows) <= 12


def test_the_introductions_speedups_are_the_summarys(bench):
    """The first paragraph's "N× faster than stock torch" figures are the summary's "x stock DCP" column, rounded."""
    intro = " ".join(read("README.rst").split("\n\n")[1].split())
    _, _, rows = readme_summary(bench)
    shown = {(op, variant): vs_stock for op, variant, _, _, vs_stock, _ in rows}

    def figure(op, fmt):
        return f"{float(shown[(op, 'dcp_filesystem ' + fmt)]):.1f}×"

    assert (f"loads {figure('load warm', 'TORCH_SAVE')} (TORCH_SAVE) and {figure('load warm', 'SAFETENSORS')} "
            f"(SAFETENSORS) faster than stock torch and saves {figure('save', 'TORCH_SAVE')} and "
            f"{figure('save', 'SAFETENSORS')} faster") in intro, intro


def test_chart_comes_from_the_same_run(bench):
    caption, header, rows = readme_summary(bench)
    drawn = json.loads(png_text(os.path.join(REPO, bench.CHART_PNG))["Description"])
    assert caption.startswith(drawn["caption"] + " ")
    assert drawn["columns"] == header and drawn["cells"] == rows


def results_rows(full):
    """RESULTS.md's full table as the result rows bench.summary_rows takes (what it needs of them)."""
    rows = []
    for r in full:
        op, _, cold = r["op"].partition(" ")
        ms = r["median ms"]
        rows.append({
            "workload": r["workload"], "op": op, "cold": cold == "cold", "variant": r["variant"],
            "sync": r["sync"] == "True", "threads": None if r["threads"] == "-" else int(r["threads"]),
            "median_s": None if ms.startswith("fails") or ms == "-" else float(ms) / 1e3,
            "error": ms if ms.startswith("fails") else None,
            "gb_per_s": None if r["GB/s"] == "-" else float(r["GB/s"]),
        })
    return rows


def test_summary_numbers_are_rows_of_the_full_table(bench):
    """The summary is bench.summary_rows of RESULTS.md's full table: the same rows, their median ms and GB/s as
    printed there, and speedups that the printed medians (each rounded to 0.1 ms) allow."""
    _, _, rows = readme_summary(bench)
    derived = bench.summary_cells(bench.summary_rows(results_rows(results_md()[3])))
    assert [r[:4] for r in rows] == [r[:4] for r in derived]
    by_op = {}
    for row in rows:
        by_op.setdefault(row[0], {})[row[1]] = float(row[2])
    for op, variant, ms, _, vs_stock, vs_safetensors in rows:
        for shown, base in ((vs_stock, "stock DCP TORCH_SAVE"), (vs_safetensors, "safetensors library")):
            if base not in by_op[op]:
                assert shown == "-"
                continue
            b, m = by_op[op][base], float(ms)
            low, high = (b - 0.05) / (m + 0.05), (b + 0.05) / max(m - 0.05, 1e-9)
            assert low - 0.005 <= float(shown) <= high + 0.005, (op, variant, shown, b, m)


def fake_row(variant, op="load", ms=100.0, cold=False, sync=True, threads=1, workload="llm", error=None):
    return {"workload": workload, "op": op, "cold": cold, "variant": variant, "sync": sync, "threads": threads,
            "payload_bytes": 10**9, "median_s": None if error else ms / 1e3,
            "gb_per_s": None if error else 1.0 / ms * 1e3, "error": error}


def test_summary_rows_of_fake_results(bench):
    ours_ts, ours_st, stock = "dcp_filesystem torch_save", "dcp_filesystem safetensors", "stock torch_save"
    lib = "safetensors save_file/safe_open"
    rows = []
    for op, cold, scale in (("save", False, 4.0), ("load", False, 1.0), ("load", True, 2.0)):
        rows += [
            fake_row(ours_ts, op, 200 * scale, cold), fake_row(ours_st, op, 100 * scale, cold),
            fake_row(stock, op, 800 * scale, cold), fake_row(lib, op, 400 * scale, cold, threads=None),
            fake_row("stock safetensors", op, 1 * scale, cold),  # not a summary variant
            fake_row("torch.save/torch.load", op, 1 * scale, cold, threads=None),
            fake_row(ours_ts, op, 1 * scale, cold, threads=2),  # not thread_count=1
            fake_row(ours_st, op, 1 * scale, cold, sync=False),  # not sync_files=True
            fake_row(ours_ts, op, 1 * scale, cold, workload="one-big"),  # not llm
        ]
    rows.append(fake_row("stock safetensors", "load", error="fails: CheckpointException"))
    summary = bench.summary_rows(rows)
    assert [(s["op"], s["variant"], s["row"]["median_s"] * 1e3, s["vs_stock"], s["vs_safetensors"])
            for s in summary] == [
        ("save", "dcp_filesystem TORCH_SAVE", 800.0, 4.0, 2.0),
        ("save", "dcp_filesystem SAFETENSORS", 400.0, 8.0, 4.0),
        ("save", "stock DCP TORCH_SAVE", 3200.0, 1.0, 0.5),
        ("save", "safetensors library", 1600.0, 2.0, 1.0),
        ("load warm", "dcp_filesystem TORCH_SAVE", 200.0, 4.0, 2.0),
        ("load warm", "dcp_filesystem SAFETENSORS", 100.0, 8.0, 4.0),
        ("load warm", "stock DCP TORCH_SAVE", 800.0, 1.0, 0.5),
        ("load warm", "safetensors library", 400.0, 2.0, 1.0),
        ("load cold", "dcp_filesystem TORCH_SAVE", 400.0, 4.0, 2.0),
        ("load cold", "dcp_filesystem SAFETENSORS", 200.0, 8.0, 4.0),
        ("load cold", "stock DCP TORCH_SAVE", 1600.0, 1.0, 0.5),
        ("load cold", "safetensors library", 800.0, 2.0, 1.0),
    ]
    assert bench.summary_cells(summary)[4] == ["load warm", "dcp_filesystem TORCH_SAVE", "200.0", "5", "4.00",
                                               "2.00"]

    # a warm-only run without the safetensors library, a stock load that failed: 6 rows, "-" where no ratio
    warm = [r for r in rows if not r["cold"] and r["variant"] != lib and r["variant"] != stock]
    warm.append(fake_row(stock, "save", 800.0))
    warm.append(fake_row(stock, "load", error="fails: CheckpointException"))
    cells = bench.summary_cells(bench.summary_rows(warm))
    assert [c[:3] + c[4:] for c in cells] == [
        ["save", "dcp_filesystem TORCH_SAVE", "800.0", "1.00", "-"],
        ["save", "dcp_filesystem SAFETENSORS", "400.0", "2.00", "-"],
        ["save", "stock DCP TORCH_SAVE", "800.0", "1.00", "-"],
        ["load warm", "dcp_filesystem TORCH_SAVE", "200.0", "-", "-"],
        ["load warm", "dcp_filesystem SAFETENSORS", "100.0", "-", "-"],
        ["load warm", "stock DCP TORCH_SAVE", "fails: CheckpointException", "-", "-"],
    ]


def fake_header(**kw):
    header = {"date": "2030-01-02T03:04:05", "torch": "9.9", "python": "3.9.0", "cpus": 2, "repeats": 3,
              "command": "python benchmarks/bench.py", "quick": False, "loads": "warm", "skipped": [],
              "machine": {"cpu": "Fake CPU", "cores": 2, "memory_gib": 1.0, "scratch_fs": "ext4", "system": "X"}}
    header.update(kw)
    return header


def test_write_docs_replaces_only_the_summary(bench, tmp_path, capsys):
    readme = read("README.rst")
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "README.rst").write_text(readme, encoding="utf-8")
    rows = [fake_row(v, op, ms) for op in ("save", "load") for v, ms in (
        ("dcp_filesystem torch_save", 50.0), ("stock torch_save", 100.0))]
    for r in rows:
        r.update(storage_s=None, outside_storage_s=None, vs_stock=None, vs_raw=None, ceiling_vs_stock=None,
                 peak_rss_mib=0, seconds=[r["median_s"]] * 3, storage_seconds=[None] * 3)
    bench.write_docs(fake_header(quick=True, crc32="zlib-ng 9.9.9"), rows, repo=str(tmp_path))
    written = (tmp_path / "README.rst").read_text(encoding="utf-8")
    start, end = bench.SUMMARY_START + "\n", bench.SUMMARY_END + "\n"
    assert written.split(start)[0] == readme.split(start)[0]
    assert written.split(end)[1] == readme.split(end)[1]
    summary = written.split(start)[1].split(end)[0]
    assert "run of 2030-01-02T03:04:05 (--quick: small sizes, a smoke run), torch 9.9, Fake CPU" in " ".join(
        summary.split())
    assert re.search(r"\nsave +dcp_filesystem TORCH_SAVE +50\.0 +20 +2\.00 +-\n", summary), summary
    results = (tmp_path / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8")
    assert results.startswith("# dcp_filesystem benchmark results\n\n**A --quick run**")
    assert "- command: `python benchmarks/bench.py` (from the repository root)\n- date: 2030-01-02T03:04:05\n" \
           "- machine: Fake CPU, 2 cores, 1.0 GiB memory, X; scratch directory on ext4\n" \
           "- torch 9.9, Python 3.9.0\n" \
           "- CRC-32: zlib-ng 9.9.9 (dcp_filesystem's checksums; zlib-ng is an install requirement)\n" in results
    charted = "left as it was" not in capsys.readouterr().err  # matplotlib installed
    assert ("summary.png" in os.listdir(str(tmp_path / "benchmarks"))) == charted

    (tmp_path / "README.rst").write_text("no markers\n", encoding="utf-8")
    os.remove(str(tmp_path / "benchmarks" / "RESULTS.md"))
    with pytest.raises(ValueError, match="bench-summary-start"):
        bench.write_docs(fake_header(), rows, repo=str(tmp_path))
    assert not (tmp_path / "benchmarks" / "RESULTS.md").exists()


def test_cold_runs_time_each_load_warm_and_cold(bench, tmp_path, monkeypatch):
    drops = []
    monkeypatch.setattr(bench, "drop_page_cache", lambda: drops.append(1))
    ours = bench.DcpVariant("dcp_filesystem torch_save", bench.dcp_filesystem.FileSystemWriter,
                            bench.dcp_filesystem.FileSystemReader)
    cases = [(ours, True, 1), (bench.RawVariant(), True, 1)]
    rows = []
    bench.run_workload("w", {"a": torch.arange(8.0), "n": 3}, cases, 2, str(tmp_path), rows, lambda line: None,
                       cold=True)
    assert [(r["op"], r["cold"], r["variant"], len(r["seconds"])) for r in rows] == [
        ("save", False, "dcp_filesystem torch_save", 2), ("save", False, "raw", 2),
        ("load", False, "dcp_filesystem torch_save", 2), ("load", False, "raw", 2),
        ("load", True, "dcp_filesystem torch_save", 2), ("load", True, "raw", 2),
    ]
    assert len(drops) == 4  # before each cold load only
    bench.add_ratios(rows)
    assert rows[4]["vs_stock"] is None and rows[4]["vs_raw"] == rows[4]["gb_per_s"] / rows[5]["gb_per_s"]


def read_readme():
    with open(os.path.join(REPO, "README.rst"), encoding="utf-8") as f:
        return f.read()


def section_line(text, title):
    lines = text.splitlines()
    return next(i for i, line in enumerate(lines) if line == title and set(lines[i + 1]) == {"="})


def test_the_first_screen_tells_torch_2_1_users_what_to_call():
    screen = " ".join("\n".join(read_readme().splitlines()[:FIRST_SCREEN]).split())
    assert ("Torch 2.1 has no ``dcp.save``: call ``dcp.save_state_dict``/``dcp.load_state_dict`` with "
            "``no_dist=True`` (`Torch versions`_).") in screen
    assert "only the import changes" not in screen  # not true on 2.1


def test_the_per_version_notes_come_before_the_benchmark_and_the_long_sections():
    text = read_readme()
    versions = section_line(text, "Torch versions")
    assert versions < section_line(text, "Benchmark") < section_line(text, "Supported torch and Python")
    assert versions < 100, versions
    notes = text.splitlines()[versions:section_line(text, "Benchmark")]
    assert [line.split(":")[0] for line in notes if line.startswith("- 2.") or line.startswith("- Python")] == [
        "- 2.1", "- 2.1-2.5", "- 2.2", "- 2.2 and 2.3", "- 2.4-2.6", "- 2.4-2.6", "- 2.8+", "- 2.9-2.11", "- 2.15",
        "- Python 3.9"]


def test_every_pytest_marker_is_in_the_tests_section_with_the_make_target_that_selects_it():
    with open(os.path.join(REPO, "setup.cfg"), encoding="utf-8") as f:
        registered = re.search(r"^markers =\n((?:    .*\n)+)", f.read(), re.M).group(1)
    assert [line.split(":")[0].strip() for line in registered.splitlines()] == ["gpu", "slow"]
    text = read_readme()
    section = " ".join(" ".join(text.splitlines()[section_line(text, "Tests") :]).split())
    for marker, target, selection in [("gpu", "test-gpu", "-m gpu"), ("slow", "test-fast", '-m "not slow"')]:
        assert f"- ``make {target}``: " in section and f"(marker ``{marker}``" in section, marker
        # --no-print-directory: under make test (MAKELEVEL set) make -n adds "Entering directory" lines.
        made = subprocess.run(["make", "--no-print-directory", "-n", target], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout
        assert made.splitlines()[-1].endswith(f" -m pytest -q {selection} tests"), made


def test_the_readme_names_the_version_of_the_package():
    import dcp_filesystem

    assert f"Version {dcp_filesystem.__version__}. From a checkout" in read_readme()


def test_the_readme_quotes_no_test_counts_or_durations_that_change_with_every_commit():
    text = " ".join(read_readme().split())
    assert re.findall(r"\b\d+ (?:passed|skipped|failed)\b|\b\d+ +\d+ +0\n|about \d+ min|\d+ min\b", text) == []
    assert "CUDA tests without a GPU" in text  # no count of them


STOCK_READS = (
    "Stock torch's ``FileSystemReader`` loads its TORCH_SAVE checkpoints (the default) on the same or a newer "
    "torch, and no SAFETENSORS checkpoint on any torch, its own included."
)
STOCK_READS_DETAIL = (
    "- TORCH_SAVE, the default: on every version, the same torch or a newer one (older torches as far as stock "
    "torch reads its own newer checkpoints). - SAFETENSORS: on no version. Stock torch 2.8+ cannot read the "
    "SAFETENSORS checkpoints it writes either (``UnpicklingError: Weights only load failed ... Unsupported "
    "operand 64``); torch < 2.8 has no such format."
)


def test_what_the_readme_says_stock_torch_reads_is_what_this_torch_reads(tmp_path):
    """Checked against the installed stock torch, so on every CI cell."""
    text = " ".join(read_readme().split())
    assert STOCK_READS in text and STOCK_READS_DETAIL in text
    from dcp_filesystem import FileSystemWriter, SerializationFormat

    for fmt in (SerializationFormat.TORCH_SAVE, SerializationFormat.SAFETENSORS):
        dcp_save({"w": torch.arange(8.0), "step": 3}, FileSystemWriter(str(tmp_path / fmt.name),
                                                                        serialization_format=fmt))
    out = run_clean_python(
        """
        import json, sys, warnings
        import torch
        import torch.distributed.checkpoint.filesystem as stock
        from helpers import dcp_load
        warnings.simplefilter("ignore")
        result = {}
        for name in ("TORCH_SAVE", "SAFETENSORS"):
            loaded = {"w": torch.zeros(8), "step": 0}
            try:
                dcp_load(loaded, stock.FileSystemReader(name))
                result[name] = loaded["w"].tolist() == list(range(8))
            except BaseException as e:  # CheckpointException derives from BaseException
                result[name] = type(e).__name__
        assert "dcp_filesystem" not in sys.modules
        print(json.dumps(result))
        """,
        cwd=str(tmp_path),
    )
    result = json.loads(out)
    assert result["TORCH_SAVE"] is True
    assert result["SAFETENSORS"] is not True, result  # it raised
    if _compat.TorchSerializationFormat is not None:  # 2.8+: stock's own fails too
        import torch.distributed.checkpoint.filesystem as stock
        from helpers import dcp_load

        stock_path = str(tmp_path / "stock_safetensors")
        dcp_save({"w": torch.arange(8.0)}, stock.FileSystemWriter(
            stock_path, serialization_format=stock.SerializationFormat.SAFETENSORS))
        with pytest.raises(BaseException, match="Weights only load failed|Unsupported operand 64"):
            dcp_load({"w": torch.zeros(8)}, stock.FileSystemReader(stock_path))

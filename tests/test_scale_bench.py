"""benchmarks/scale_bench.py at a tiny size: gloo ranks as processes, 2 ranks -> 1 and 1 -> 2, ours and stock."""
import json
import os
import sys

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
try:
    import scale_bench
finally:
    sys.path.pop(0)



def object_collectives_work():
    """DCP's plans travel as pickled objects; torch 2.1 decodes those with NumPy, which fails beside NumPy 2."""
    try:
        torch.zeros(1, dtype=torch.uint8).numpy()
    except RuntimeError:
        return False
    return True


runs_ranks = pytest.mark.skipif(
    not os.path.exists("/proc/self/io") or not dist.is_available() or not dist.is_gloo_available()
    or not object_collectives_work(), reason="needs /proc/self/io, gloo, and object collectives (NumPy, torch 2.1)")


@runs_ranks
def test_rows_are_checked_and_read_at_least_what_they_need(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# results\n\nearlier text\n")
    argv = ["--size-mib", "8", "--repeat", "1", "--reshard", "2:1", "--reshard", "1:2", "--format", "TORCH_SAVE",
            "--dir", str(tmp_path), "--json", str(tmp_path / "scale.json"), "--results", str(results)]
    header, rows, goals = scale_bench.main(argv)

    assert [(r["reshard"], r["impl"], r["format"]) for r in rows] == [
        ("2->1 Shard(0)", "ours", "TORCH_SAVE"), ("2->1 Shard(0)", "stock", "TORCH_SAVE"),
        ("1->2 Shard(0)", "ours", "TORCH_SAVE"), ("1->2 Shard(0)", "stock", "TORCH_SAVE"),
    ]
    assert 8 << 20 <= header["payload_bytes"] < 10 << 20
    for r in rows:
        assert r["error"] is None
        assert r["bit_exact"] and r["runs_checked"] == 1 and len(r["seconds"]) == 1
        # Every row's ranks together hold the whole state dict once; what they read cannot be less.
        assert r["needed"] == header["payload_bytes"]
        # Whole stored items: one rank reads both halves of each tensor; two ranks each read the one whole tensor.
        assert r["whole_items"] == header["payload_bytes"] * (1 if r["reshard"] == "2->1 Shard(0)" else 2)
        assert r["read"] >= r["needed"], r
        assert r["median_s"] > 0
    # The bytes target is set on ours, on dim-0 rows that change the world size; no 2->4 row, no time targets.
    assert [(what.split(":")[0], variant) for what, variant, *_ in goals] == [
        ("2->1 Shard(0)", "ours TORCH_SAVE"), ("1->2 Shard(0)", "ours TORCH_SAVE")]

    saved = json.loads((tmp_path / "scale.json").read_text())
    assert [r["read"] for r in saved["rows"]] == [r["read"] for r in rows]
    text = results.read_text()
    assert text.startswith("# results\n\nearlier text\n\n" + scale_bench.START + "\n")
    assert text.endswith(scale_bench.END + "\n")
    assert "| 1->2 Shard(0) | stock TORCH_SAVE |" in text
    # A second run's section replaces the first one's.
    section = scale_bench.START + "\nnew\n" + scale_bench.END + "\n"
    scale_bench.replace_section(str(results), section, scale_bench.START, scale_bench.END)
    assert results.read_text() == "# results\n\nearlier text\n\n" + section
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("dcp-scale-bench-")]  # checkpoints removed


def test_check_names_a_value_that_differs_by_one_bit():
    class Local:
        def __init__(self, tensor):
            self.tensor = tensor

        def to_local(self):
            return self.tensor

    wanted = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4)[:, 1:3]}  # a view, as for Shard(1)
    loaded = wanted["w"].clone()
    scale_bench.check({"w": Local(loaded)}, wanted, "here")
    loaded.view(torch.int32)[2, 1] ^= 1
    with pytest.raises(AssertionError, match=r"^scale_bench: here: w is not the expected slice bit for bit$"):
        scale_bench.check({"w": Local(loaded)}, wanted, "here")
    with pytest.raises(AssertionError, match=r"w is torch.float32 \(3, 1\), expected torch.float32 \(3, 2\)"):
        scale_bench.check({"w": Local(loaded[:, :1])}, wanted, "here")


def test_a_whole_item_row_that_read_less_than_its_items_is_flagged():
    row = {"reshard": "2->4 Shard(0)", "impl": scale_bench.WHOLE, "format": "TORCH_SAVE", "read": 600 << 20,
           "whole_items": 1024 << 20}
    assert scale_bench.notes([row]) == [
        "2->4 Shard(0), ours, whole items TORCH_SAVE read 600.0 MiB, less than its whole items (1,024.0 MiB): the "
        "reader did not take DCP_FILESYSTEM_PARTIAL_READS=0 (read per load?)"]
    assert scale_bench.notes([{**row, "read": (1024 << 20) + 900}, {**row, "impl": scale_bench.OURS}]) == []

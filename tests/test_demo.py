"""examples/demo.py: its comparison, and a lossy load failing the demo (the full run is in test_packaging)."""
import importlib.util
import math
import os

import pytest
import torch
from helpers import REPO


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("demo", os.path.join(REPO, "examples", "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_leaves_names_every_leaf_by_its_path(demo):
    state = {"model": {"w": 1}, "optim": {"state": {0: {"step": 2.0}}, "param_groups": [{"betas": (0.9, 0.99)}]}}
    assert demo.leaves(state) == {
        "/model/w": 1,
        "/optim/state/0/step": 2.0,
        "/optim/param_groups/0/betas/0": 0.9,
        "/optim/param_groups/0/betas/1": 0.99,
    }


def test_same_compares_tensors_bit_for_bit(demo):
    nan = torch.tensor([math.nan, 1.0])
    assert demo.same(nan, nan.clone())
    assert not demo.same(torch.tensor([0.0]), torch.tensor([-0.0]))
    assert not demo.same(torch.zeros(2), torch.zeros(2, dtype=torch.float64))
    assert not demo.same(torch.zeros(2), torch.zeros(1, 2))
    flipped = torch.ones(3, 4, dtype=torch.bfloat16)
    flipped.view(torch.int16)[2, 3] ^= 1
    assert not demo.same(torch.ones(3, 4, dtype=torch.bfloat16), flipped)
    transposed = torch.arange(6.0).reshape(2, 3).t()
    assert demo.same(transposed, transposed.contiguous())
    assert demo.same(torch.tensor(True), torch.tensor(True))


def test_same_compares_other_values_by_type_and_equality(demo):
    assert demo.same(None, None) and demo.same(1e-3, 1e-3) and demo.same("adamw", "adamw")
    assert not demo.same(1, 1.0)
    assert not demo.same(True, 1)
    assert not demo.same(torch.tensor(2.0), 2.0)
    assert not demo.same(1e-3, 5e-4)


def test_mismatches_lists_differing_and_one_sided_paths(demo):
    expected = {"a": torch.zeros(2), "b": 1, "c": [1, 2], "only_expected": 0}
    actual = {"a": torch.tensor([0.0, -0.0]), "b": 1, "c": [1, 3], "only_actual": 0}
    assert demo.mismatches(expected, actual) == ["/a", "/c/1", "/only_actual", "/only_expected"]
    assert demo.mismatches(expected, expected) == []


@pytest.mark.slow
def test_a_lossy_load_fails_the_demo(demo, monkeypatch, capsys):
    real_load = demo.load

    def lossy_load(state_dict, reader):
        real_load(state_dict, reader)
        exp_avg = state_dict["optim"]["state"][3]["exp_avg"]
        exp_avg.view(-1).view(torch.uint8)[5] ^= 0x10  # one bit of one AdamW moment

    monkeypatch.setattr(demo, "load", lossy_load)
    monkeypatch.setattr(demo, "ROWS", demo.ROWS[:1])
    assert demo.main() == 1
    out, err = capsys.readouterr()
    row = out.splitlines()[3].split()
    assert row[:2] + row[-2:] == ["dcp_filesystem", "TORCH_SAVE", "no", "OK"]
    assert err == "dcp_filesystem TORCH_SAVE: 1 mismatch(es), the first at /optim/state/3/exp_avg\n"

"""Shared test helpers: DCP entry points on every torch, and clean subprocesses."""
from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner

HAS_DCP_SAVE = hasattr(dcp, "save")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dcp_save(state_dict, storage_writer, **kwargs):
    """dcp.save, or save_state_dict(no_dist=True) on torch 2.1."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if HAS_DCP_SAVE:
            return dcp.save(state_dict, storage_writer=storage_writer, **kwargs)
        no_dist = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        return dcp.save_state_dict(state_dict, storage_writer=storage_writer, no_dist=no_dist, **kwargs)


def dcp_load(state_dict, storage_reader, **kwargs):
    """dcp.load, or load_state_dict(no_dist=True) on torch 2.1."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if HAS_DCP_SAVE:
            return dcp.load(state_dict, storage_reader=storage_reader, **kwargs)
        no_dist = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        return dcp.load_state_dict(state_dict, storage_reader=storage_reader, no_dist=no_dist, **kwargs)


def zeros_like_state(state_dict):
    """A state dict of the same structure with every tensor zeroed (non-tensors kept as placeholders)."""
    if isinstance(state_dict, torch.Tensor):
        return torch.zeros_like(state_dict)
    if isinstance(state_dict, dict):
        return {k: zeros_like_state(v) for k, v in state_dict.items()}
    if isinstance(state_dict, list):
        return [zeros_like_state(v) for v in state_dict]
    return None


def contiguous_state(state_dict):
    """The same nested state with every tensor made contiguous (for torch.save of views, byte comparisons)."""
    if isinstance(state_dict, torch.Tensor):
        return state_dict.contiguous()
    if isinstance(state_dict, dict):
        return {k: contiguous_state(v) for k, v in state_dict.items()}
    if isinstance(state_dict, list):
        return [contiguous_state(v) for v in state_dict]
    return state_dict


def _raw_bytes(tensor):
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def assert_state_equal(expected, actual, path="state"):
    """Bit-exact equality of nested state dicts (tensors compared by dtype, shape and bytes)."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), path
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, path
        assert torch.equal(_raw_bytes(actual), _raw_bytes(expected)), path
    elif isinstance(expected, dict):
        assert set(actual) == set(expected), path
        for k in expected:
            assert_state_equal(expected[k], actual[k], f"{path}.{k}")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), path
        for i, (e, a) in enumerate(zip(expected, actual)):
            assert_state_equal(e, a, f"{path}[{i}]")
    else:
        assert actual == expected, path


def run_clean_python(code: str, cwd: str, env_extra=None, python: str = sys.executable) -> str:
    """Run code in a fresh interpreter that cannot import this checkout; returns stdout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(env_extra or {})
    proc = subprocess.run(
        [python, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def save_rank_local(writer, state, rank):
    """One rank's save without collectives, driven by hand: it writes ``__{rank}.metadata``."""
    planner = DefaultSavePlanner()
    if "storage_meta" in inspect.signature(planner.set_up_planner).parameters:
        planner.set_up_planner(state, storage_meta=writer.storage_meta(), is_coordinator=True)
    else:
        planner.set_up_planner(state, True)
    writer.set_up_storage_writer(True, rank=rank, use_collectives=False)
    local = writer.prepare_local_plan(planner.create_local_plan())
    plans, metadata = planner.create_global_plan([local])
    plan = planner.finish_plan(writer.prepare_global_plan(plans)[0])
    fut = writer.write_data(plan, planner)
    fut.wait()
    writer.finish(metadata, [fut.value()])


def load_rank_local(reader, state, rank):
    """One rank's load of ``__{rank}.metadata`` and its data, driven by hand; returns the metadata."""
    metadata = reader.read_metadata(rank=rank)
    planner = DefaultLoadPlanner()
    planner.set_up_planner(state, metadata, True)
    reader.set_up_storage_reader(metadata, True, rank=rank, use_collectives=False)
    local = reader.prepare_local_plan(planner.create_local_plan())
    plans = reader.prepare_global_plan(planner.create_global_plan([local]))
    reader.read_data(planner.finish_plan(plans[0]), planner).wait()
    return metadata

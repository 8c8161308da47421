"""Shared test helpers: DCP entry points on every torch, what stock torch does there, clean subprocesses.

What the running torch has and does comes from dcp_filesystem/_compat.py wherever the package probes it
(``HAS_DCP_SAVE``, ``HAS_ASYNC_SAVE``, ``TorchSerializationFormat``, ``torch_extension``,
``STORAGE_INFO_HAS_TRANSFORMS``, ``METADATA_FIELDS``, ``StorageMeta``, ``BlockingAsyncStager``, and
``single_process_dcp``: which calls save and load in one process): tests use that module. The probes
below are only those the package has no use for, behaviour of stock torch that the tests alone ask
about; each runs stock torch's own writer and reader once (cached) and reports the behaviour, never a
version number.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import os
import subprocess
import sys
import tempfile
import textwrap
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.filesystem as torch_fs
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _checkout_compat():
    """This checkout's dcp_filesystem/_compat.py, loaded as a module of its own (``helpers_compat``): these
    helpers also run where the package must not be importable (next to a vendored copy or an installed
    wheel, in run_clean_python), and _compat imports nothing else of the package."""
    spec = importlib.util.spec_from_file_location("helpers_compat", os.path.join(REPO, "dcp_filesystem", "_compat.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


_compat = _checkout_compat()
# Not probed by the package: whether stock dcp.save takes use_collectives (rank-local metadata, torch 2.9+).
SAVE_HAS_USE_COLLECTIVES = _compat.HAS_DCP_SAVE and "use_collectives" in inspect.signature(dcp.save).parameters


def _in_process_group() -> bool:
    return dist.is_available() and dist.is_initialized()


# Every group one_rank_process_group made, kept alive: destroy_process_group drops the last reference to
# the gloo group, and on torch 2.2 and 2.3 its C++ destructor now and then hung for good (CI, once each).
_DESTROYED_GROUPS = []


@contextlib.contextmanager
def one_rank_process_group():
    """A gloo group of one process, for DCP entry points that insist on a process group."""
    if _in_process_group():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        _DESTROYED_GROUPS.append(dist.group.WORLD)
        dist.destroy_process_group()


def _stock_probe(probe):
    """Cache a probe of stock torch; it saves to a private temporary folder, so it must run before a
    process group exists (see probe_stock_torch)."""
    cached = functools.cache(probe)

    @functools.wraps(probe)
    def run():
        if cached.cache_info().currsize == 0 and _in_process_group():
            raise RuntimeError(f"helpers.{probe.__name__}() first runs inside a process group: "
                               "call helpers.probe_stock_torch() before init_process_group")
        return cached()

    return run


def _quietly(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _call(fn, quiet, *args, **kwargs):
    return _quietly(fn, *args, **kwargs) if quiet else fn(*args, **kwargs)


@_stock_probe
def _single_process_dcp_calls() -> tuple:
    """The DCP calls that save and load whole state dicts in one process without a process group, in
    words (``_compat.single_process_dcp``): ("dcp.save" or "dcp.save_state_dict(no_dist=True)",
    "dcp.load" or "dcp.load_state_dict(no_dist=True)")."""
    with tempfile.TemporaryDirectory() as scratch:
        save, load = _compat.single_process_dcp(scratch).calls.split("; ")
    return save, load


def save_needs_process_group() -> bool:
    """torch 2.1 has no dcp.save, torch 2.2's dcp.save still needs a process group; 2.3+ runs without one."""
    return _single_process_dcp_calls()[0] != "dcp.save"


def load_writes_back_values() -> bool:
    """Whether dcp.load runs in one process and puts non-tensor values into the caller's dict: not on torch
    2.1, which has no dcp.load, 2.2, whose dcp.load needs a process group, nor 2.3 (pytorch#125528)."""
    return _single_process_dcp_calls()[1] == "dcp.load"


@_stock_probe
def async_save_needs_process_group() -> bool:
    """torch 2.3's dcp.async_save demands a process group; 2.4+ runs without one."""
    with tempfile.TemporaryDirectory() as path:
        try:
            _quietly(dcp.async_save, {"x": torch.zeros(1)}, storage_writer=torch_fs.FileSystemWriter(path)).result()
        except (ValueError, RuntimeError, AssertionError) as e:
            if "process group" not in str(e) and "torch.distributed" not in str(e):
                raise
            return True
    return False


def _single_process_dcp() -> bool:
    """dcp.save/dcp.load can run here: they exist, and a process group is up or not needed."""
    return _compat.HAS_DCP_SAVE and (_in_process_group() or not save_needs_process_group())


def dcp_save(state_dict, storage_writer, quiet=True, **kwargs):
    """dcp.save where it can run, else save_state_dict(no_dist=True) (torch 2.1, 2.2 outside a process group);
    warnings silenced unless ``quiet=False``."""
    if _single_process_dcp():
        return _call(dcp.save, quiet, state_dict, storage_writer=storage_writer, **kwargs)
    return _call(dcp.save_state_dict, quiet, state_dict, storage_writer=storage_writer,
                 no_dist=not _in_process_group(), **kwargs)


def _load(state_dict, storage_reader, use_dcp_load, **kwargs):
    if use_dcp_load and _single_process_dcp():
        return _quietly(dcp.load, state_dict, storage_reader=storage_reader, **kwargs)
    return _quietly(dcp.load_state_dict, state_dict, storage_reader=storage_reader,
                    no_dist=not _in_process_group(), **kwargs)


def dcp_load(state_dict, storage_reader, **kwargs):
    """dcp.load, or load_state_dict where dcp.load is missing, cannot run, or leaves non-tensor
    values out of the caller's dict (torch 2.3; its load_state_dict puts them in)."""
    return _load(state_dict, storage_reader, use_dcp_load=load_writes_back_values(), **kwargs)


class _MetadataFails(torch_fs.FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        raise ValueError("probe: this metadata cannot be read")


@_stock_probe
def load_passes_on_metadata_errors() -> bool:
    """Whether the error read_metadata raises reaches the caller of a load (not on torch 2.9-2.11,
    which fail an assertion instead)."""
    with tempfile.TemporaryDirectory() as path:
        try:
            dcp_load({"t": torch.zeros(1)}, _MetadataFails(path))
        except BaseException as e:  # CheckpointException derives from BaseException
            return "probe: this metadata cannot be read" in str(e)
    raise AssertionError("a load whose read_metadata raised did not fail")


def probe_stock_torch() -> None:
    """Run every probe of stock torch now (in a worker, before it joins a process group)."""
    _single_process_dcp_calls()
    load_passes_on_metadata_errors()
    if _compat.HAS_ASYNC_SAVE:
        async_save_needs_process_group()


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
    """Run code in a fresh interpreter that cannot import this checkout (only these helpers); returns stdout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.path.join(REPO, "tests")
    env.update(env_extra or {})
    proc = subprocess.run(
        [python, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def coordinator_save_planner(state, writer):
    """A DefaultSavePlanner set up for ``state`` as the coordinator, given ``writer``'s storage_meta where its
    set_up_planner takes one (torch 2.4+; not probed by the package, which never sets up a planner)."""
    planner = DefaultSavePlanner()
    if "storage_meta" in inspect.signature(planner.set_up_planner).parameters:
        planner.set_up_planner(state, storage_meta=writer.storage_meta(), is_coordinator=True)
    else:
        planner.set_up_planner(state, True)
    return planner


def save_rank_local(writer, state, rank):
    """One rank's save without collectives, driven by hand: it writes ``__{rank}.metadata``."""
    planner = coordinator_save_planner(state, writer)
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


def strip_checksums(path) -> None:
    """Rewrite a checkpoint's .metadata as an older dcp_filesystem wrote it: no checksums."""
    _strip_storage_info_field(path, "crc32")
    _strip_storage_info_field(path, "crc32_blocks")


def strip_safetensors_marks(path) -> None:
    """Rewrite a checkpoint's .metadata as an older dcp_filesystem wrote it: SAFETENSORS entries not marked as
    this package's, so a load finds them by the data file's header."""
    _strip_storage_info_field(path, "safetensors_entry")


def _strip_storage_info_field(path, name) -> None:
    import pickle

    metadata_path = os.path.join(str(path), ".metadata")
    with open(metadata_path, "rb") as f:
        metadata = pickle.load(f)  # stops at the end of the pickle, before the checksum trailer
    for info in metadata.storage_data.values():
        vars(info).pop(name, None)
    with open(metadata_path, "wb") as f:
        pickle.dump(metadata, f)


def raised_error(error):
    """The exception the storage layer raised, out of torch's CheckpointException where DCP wrapped it."""
    failures = getattr(error, "failures", None)
    if failures:
        value = next(iter(failures.values()))
        return value[0] if isinstance(value, tuple) else value
    return error

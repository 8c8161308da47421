"""The one place that knows which torch is running.

Every difference between torch 2.1 and the newest release is detected here by
probing for the feature, never by comparing version strings.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import os
import warnings
from typing import Any, Callable, Optional

import torch
import torch.distributed.checkpoint as _dcp
from torch.distributed.checkpoint import filesystem as _torch_filesystem
from torch.distributed.checkpoint import metadata as _torch_metadata

TorchStorageInfo = _torch_filesystem._StorageInfo
STORAGE_INFO_HAS_TRANSFORMS = "transform_descriptors" in {
    f.name for f in dataclasses.fields(TorchStorageInfo)
}

StorageMeta: Optional[type] = getattr(_torch_metadata, "StorageMeta", None)
METADATA_FIELDS = {f.name for f in dataclasses.fields(_torch_metadata.Metadata)}


class NewerMetadataValue:
    """A value of a DCP metadata class that a newer torch pickles and this torch lacks.

    Its fields become plain attributes; this torch's DCP never reads them
    (``Metadata.storage_meta`` arrived with ``StorageMeta`` in torch 2.4).
    """

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items())
        return f"{type(self).__name__}({fields})"


def tensor_properties_from_any_torch(cls: type) -> type:
    """``cls`` (torch's TensorProperties) for unpickling: newer torches append fields to its
    pickled state (2.15: ``strides``) that this torch's ``__setstate__`` cannot unpack and its
    DCP does not use; they are dropped, and the object is an exact ``cls`` again."""
    known = len(dataclasses.fields(cls))

    class TensorPropertiesFromAnyTorch(cls):  # type: ignore[misc, valid-type]
        def __setstate__(self, state: Any) -> None:
            if isinstance(state, tuple) and len(state) > known:
                state = state[:known]
            cls.__setstate__(self, state)
            self.__class__ = cls

    return TensorPropertiesFromAnyTorch


# Classes of torch.distributed.checkpoint.metadata that newer torches write into .metadata.
METADATA_STAND_INS: dict = {
    name: type(name, (NewerMetadataValue,), {"__module__": __name__})
    for name in ("StorageMeta",)
    if not hasattr(_torch_metadata, name)
}

TorchSerializationFormat: Optional[type] = getattr(_torch_filesystem, "SerializationFormat", None)

try:
    from torch.distributed.checkpoint import _extension as torch_extension
except ImportError:
    torch_extension = None

HAS_DCP_SAVE = hasattr(_dcp, "save")
HAS_ASYNC_SAVE = hasattr(_dcp, "async_save")


def _quietly(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _needs_process_group(e: Exception) -> bool:
    return "process group" in str(e)


@dataclasses.dataclass(frozen=True)
class SingleProcessDcp:
    """DCP's save and load as one process without a process group calls them here: ``save(state_dict,
    writer)``, ``load(state_dict, reader)`` (warnings silenced), and ``calls``, the two calls in words."""

    save: Callable[[Any, Any], None]
    load: Callable[[Any, Any], None]
    calls: str


def _dcp_save(state_dict: Any, writer: Any) -> None:
    _quietly(_dcp.save, state_dict, storage_writer=writer)


def _dcp_save_state_dict(state_dict: Any, writer: Any) -> None:
    _quietly(_dcp.save_state_dict, state_dict, storage_writer=writer, no_dist=True)


def _dcp_load(state_dict: Any, reader: Any) -> None:
    _quietly(_dcp.load, state_dict, storage_reader=reader)


def _dcp_load_state_dict(state_dict: Any, reader: Any) -> None:
    _quietly(_dcp.load_state_dict, state_dict, storage_reader=reader, no_dist=True)


def single_process_dcp(scratch: str) -> SingleProcessDcp:
    """The DCP entry points that save and load whole state dicts (non-tensor values included) in one
    process, found by trying stock torch's writer and reader in ``scratch`` (an existing directory; the
    probes write two tiny checkpoints into it and leave them): ``dcp.save`` where it runs without a
    process group (torch 2.1 has none, 2.2's needs a group), else ``save_state_dict(no_dist=True)``;
    ``dcp.load`` where it also writes non-tensor values back into the caller's dict (not on 2.2/2.3),
    else ``load_state_dict(no_dist=True)``."""
    save, save_name = _dcp_save_state_dict, "dcp.save_state_dict(no_dist=True)"
    if HAS_DCP_SAVE:
        try:
            _dcp_save({"t": torch.zeros(1)}, _torch_filesystem.FileSystemWriter(os.path.join(scratch, "save")))
            save, save_name = _dcp_save, "dcp.save"
        except (ValueError, RuntimeError) as e:
            if not _needs_process_group(e):
                raise
    load, load_name = _dcp_load_state_dict, "dcp.load_state_dict(no_dist=True)"
    if hasattr(_dcp, "load"):
        path = os.path.join(scratch, "load")
        save({"t": torch.ones(1), "step": 7}, _torch_filesystem.FileSystemWriter(path))
        out: dict = {"t": torch.zeros(1), "step": None}
        try:
            _dcp_load(out, _torch_filesystem.FileSystemReader(path))
            if out["step"] == 7 and out["t"].item() == 1:
                load, load_name = _dcp_load, "dcp.load"
        except (ValueError, RuntimeError) as e:
            if not _needs_process_group(e):
                raise
    return SingleProcessDcp(save, load, f"{save_name}; {load_name}")


def privateuse1_backend_name() -> Optional[str]:
    get_name = getattr(torch._C, "_get_privateuse1_backend_name", None)
    return get_name() if get_name is not None else None


def device_module(device_type: str) -> Any:
    return getattr(torch, device_type)


def available_device_type() -> Optional[str]:
    """The accelerator whose copies the overlapping loader can overlap, if any."""
    if torch.cuda.is_available():
        return "cuda"
    name = privateuse1_backend_name()
    module = getattr(torch, name, None) if name else None
    if module is not None and hasattr(module, "is_available") and module.is_available():
        return name
    return None


def accelerator_started() -> bool:
    """Whether this process has started the accelerator whose tensors loads fill through pinned buffers
    (asked without starting it)."""
    device_type = available_device_type()
    if device_type is None:
        return False
    is_initialized = getattr(device_module(device_type), "is_initialized", None)
    return bool(is_initialized()) if callable(is_initialized) else True


def _pinned_bytes(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


@functools.cache
def pinned_host_allocator(device_type: str) -> Optional[Callable[[int], torch.Tensor]]:
    """How to allocate ``n`` bytes of page-locked host memory for asynchronous copies to ``device_type``
    (a uint8 CPU tensor), or None where there is none: no accelerator of that type, a device module
    without streams and events, or a device that cannot pin host memory (a Python-defined privateuse1
    device registers no host allocator). Probed once per device type."""
    if device_type != available_device_type():
        return None  # torch pins host memory for the current accelerator only
    module = device_module(device_type)
    if not all(hasattr(module, name) for name in ("Stream", "Event", "stream", "current_stream")):
        return None
    try:
        pinned = _pinned_bytes(1).is_pinned()
    except (RuntimeError, NotImplementedError):
        return None
    return _pinned_bytes if pinned else None


def cpu_copy(value: Any) -> Any:
    """A copy of a state dict with every tensor copied to CPU memory."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: cpu_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(cpu_copy(v) for v in value)
    return copy.deepcopy(value)


try:
    from torch.distributed.checkpoint.staging import BlockingAsyncStager
except ImportError:

    class BlockingAsyncStager:  # type: ignore[no-redef]
        """Stages a state dict as a CPU copy (torch < 2.4 has no stager)."""

        _synchronize_after_execute: bool = False

        def __init__(self, cache_staged_state_dict: bool = False, type_check: bool = False) -> None:
            self.cache_staged_state_dict = cache_staged_state_dict
            self.type_check = type_check
            self.state_dict_cache: Optional[dict] = None

        def stage(self, state_dict: dict) -> dict:
            return cpu_copy(state_dict)

        def synchronize_staging(self) -> None:
            pass

        def close(self) -> None:
            pass


def float8_dtypes() -> dict:
    """safetensors names of the float8 dtypes this torch has."""
    names = {
        "F8_E4M3": "float8_e4m3fn",
        "F8_E4M3FNUZ": "float8_e4m3fnuz",
        "F8_E5M2": "float8_e5m2",
        "F8_E5M2FNUZ": "float8_e5m2fnuz",
        "U16": "uint16",
        "U32": "uint32",
        "U64": "uint64",
    }
    return {st: getattr(torch, attr) for st, attr in names.items() if hasattr(torch, attr)}


@functools.cache
def load_planner_checks_sizes() -> bool:
    """Whether torch's default load planner refuses a target whose size is not the saved tensor's (the 2.6
    wheel does, 2.5 loads the overlap silently): a plan for a 1-element target of a 2-element tensor."""
    from torch.distributed.checkpoint.default_planner import create_default_local_load_plan

    md = _torch_metadata
    saved = md.TensorStorageMetadata(
        md.TensorProperties(dtype=torch.float32),
        torch.Size([2]),
        [md.ChunkStorageMetadata(offsets=torch.Size([0]), sizes=torch.Size([2]))],
    )
    try:
        create_default_local_load_plan({"x": torch.zeros(1)}, md.Metadata(state_dict_metadata={"x": saved}))
    except ValueError:
        return True
    return False

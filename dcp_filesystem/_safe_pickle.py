"""DCP ``.metadata`` files: pickled as stock torch reads them, and a restricted unpickler.

``pickle.load`` on a checkpoint's ``.metadata`` runs whatever callable the file
names, so opening an untrusted checkpoint could run arbitrary code. This loader
resolves globals only from an allow-map keyed by ``(module, qualname)``: the
classes DCP's own metadata is made of on the running torch (measured by listing
the globals of checkpoints written by torch 2.1, 2.4, 2.8, 2.13 and 2.15, stock
and through this package), plus what plugins allow with
:func:`add_safe_metadata_globals`. A name that is not allowed is never imported
or executed: loading stops with :class:`pickle.UnpicklingError` naming it.
"""
from __future__ import annotations

import collections
import copyreg
import dataclasses
import enum
import importlib
import io
import os
import pathlib
import pickle
import pickletools
import sys
import threading
from typing import IO, Any, Callable, Dict, Iterable, Optional, Tuple, Union

import torch
from torch.distributed.checkpoint import filesystem as _torch_filesystem
from torch.distributed.checkpoint import metadata as _torch_metadata

from . import _checksum, _compat

_Key = Tuple[str, str]

_lock = threading.Lock()
_default_map: Optional[Dict[_Key, Any]] = None
# Allowed by plugins: resolved objects, and "module.qualname" names resolved when first met.
_extra_objects: Dict[_Key, Any] = {}
_extra_names: Dict[str, Optional[Any]] = {}

_PACKAGE = __name__.rpartition(".")[0] or "dcp_filesystem"


_LAYOUTS: Dict[str, torch.layout] = {}
_MISSING = object()


def _layout_from_name(name: Any) -> torch.layout:
    """Stands in for ``torch.serialization._get_layout``: a known layout name, nothing else."""
    layout = _LAYOUTS.get(name) if isinstance(name, str) else None
    if layout is None:
        raise pickle.UnpicklingError(f"unknown torch layout {name!r}")
    return layout


def _is_data_class(obj: Any) -> bool:
    return isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum))


def _build_default_map() -> Dict[_Key, Any]:
    allowed: Dict[_Key, Any] = {}
    meta_module = _torch_metadata.__name__  # torch.distributed.checkpoint.metadata

    # The dataclasses and enums torch's metadata module defines on this torch
    # (Metadata, TensorStorageMetadata, BytesStorageMetadata, ChunkStorageMetadata,
    # MetadataIndex, and from 2.4 TensorProperties, _MEM_FORMAT_ENCODING, StorageMeta).
    for obj in vars(_torch_metadata).values():
        if _is_data_class(obj) and obj.__module__ == meta_module:
            allowed[(meta_module, obj.__qualname__)] = obj

    # Newer torches' classes this torch lacks are read as stand-ins its DCP ignores.
    for name, stand_in in _compat.METADATA_STAND_INS.items():
        allowed[(meta_module, name)] = stand_in

    # torch 2.1 pickles TensorProperties and MEM_FORMAT_ENCODING from the sharded
    # tensor module; that module still exists (DCP itself imports it) in every torch probed.
    try:
        from torch.distributed._shard.sharded_tensor import metadata as shard_metadata
    except ImportError:  # pragma: no cover - not seen on torch 2.1-2.15
        shard_metadata = None
    shard_module = "torch.distributed._shard.sharded_tensor.metadata"
    if shard_metadata is not None:
        for name in ("TensorProperties", "MEM_FORMAT_ENCODING"):
            if hasattr(shard_metadata, name):
                allowed[(shard_module, name)] = getattr(shard_metadata, name)
    # Either spelling resolves on every torch, so a checkpoint of one era loads on the other.
    aliases = [
        ((meta_module, "TensorProperties"), (shard_module, "TensorProperties")),
        ((meta_module, "_MEM_FORMAT_ENCODING"), (shard_module, "MEM_FORMAT_ENCODING")),
    ]
    for a, b in aliases:
        if a not in allowed and b in allowed:
            allowed[a] = allowed[b]
        elif b not in allowed and a in allowed:
            allowed[b] = allowed[a]
    for key in aliases[0]:
        if key in allowed:
            allowed[key] = _compat.tensor_properties_from_any_torch(allowed[key])

    # Storage info of the file system layer, always pickled as torch's own class.
    allowed[(_torch_filesystem.__name__, "_StorageInfo")] = _torch_filesystem._StorageInfo

    # torch scalars of the metadata: Size, dtypes, layouts, memory formats.
    allowed[("torch", "Size")] = torch.Size
    for name, value in vars(torch).items():
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            allowed[("torch", name)] = value
            if isinstance(value, torch.memory_format):
                # memory formats pickle as torch._utils + "torch.<name>"
                allowed[("torch._utils", f"torch.{name}")] = value
    _LAYOUTS.update({str(v): v for v in vars(torch).values() if isinstance(v, torch.layout)})
    allowed[("torch.serialization", "_get_layout")] = _layout_from_name

    # StorageMeta.checkpoint_id may be a path; Python 3.13 pickles it from pathlib._local.
    path_classes: Dict[str, type] = {
        "Path": pathlib.Path,
        "PurePath": pathlib.PurePath,
        "PosixPath": pathlib.PosixPath,
        "WindowsPath": pathlib.WindowsPath,
        "PurePosixPath": pathlib.PurePosixPath,
        "PureWindowsPath": pathlib.PureWindowsPath,
    }
    # A concrete path of the other OS cannot be built here; keep its pure form.
    if os.name == "nt":
        path_classes["PosixPath"] = pathlib.PurePosixPath
    else:
        path_classes["WindowsPath"] = pathlib.PureWindowsPath
    for module in ("pathlib", "pathlib._local"):
        for name, cls in path_classes.items():
            allowed[(module, name)] = cls

    # Containers that older pickle protocols name as globals.
    allowed[("builtins", "set")] = set
    allowed[("builtins", "frozenset")] = frozenset
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    return allowed


def _defaults() -> Dict[_Key, Any]:
    global _default_map
    if _default_map is None:
        with _lock:
            if _default_map is None:
                _default_map = _build_default_map()
    return _default_map


def _key_of(obj: Any) -> _Key:
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    if not isinstance(module, str) or not isinstance(qualname, str):
        raise TypeError(
            f"add_safe_metadata_globals: {obj!r} has no __module__ and __qualname__; "
            "pass the class or function itself, a 'module.Qualname' string or a (module, qualname) tuple"
        )
    return module, qualname


def add_safe_metadata_globals(globals_list: Iterable[Union[Callable[..., Any], type, str, Tuple[str, str]]]) -> None:
    """Allow more globals in checkpoint ``.metadata`` files (for planner or storage plugins).

    Each entry is a class or function (allowed under its ``__module__`` and
    ``__qualname__``), a ``(module, qualname)`` tuple, or a ``"module.Qualname"``
    string. Names given as strings are imported only when a metadata file
    references exactly that name.
    """
    if isinstance(globals_list, (str, bytes)) or (
        isinstance(globals_list, tuple) and globals_list and all(isinstance(p, str) for p in globals_list)
    ):
        raise TypeError(
            f"add_safe_metadata_globals takes a list of globals, not a single one: wrap {globals_list!r} in a list"
        )
    objects: Dict[_Key, Any] = {}
    names: Dict[str, None] = {}
    for entry in globals_list:
        if isinstance(entry, str):
            if "." not in entry.strip(".") or entry != entry.strip():
                raise ValueError(f"add_safe_metadata_globals: {entry!r} is not a 'module.Qualname' name")
            names[entry] = None
        elif isinstance(entry, tuple):
            if len(entry) != 2 or not all(isinstance(p, str) and p for p in entry):
                raise ValueError(f"add_safe_metadata_globals: {entry!r} is not a (module, qualname) pair")
            names[f"{entry[0]}.{entry[1]}"] = None
        else:
            objects[_key_of(entry)] = entry
    with _lock:
        _extra_objects.update(objects)
        for name in names:
            _extra_names.setdefault(name, None)


def _resolve_named(module: str, qualname: str) -> Any:
    """Import a name a plugin allowed by string (never any other name)."""
    full = f"{module}.{qualname}"
    with _lock:
        cached = _extra_names.get(full)
    if cached is not None:
        return cached
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    with _lock:
        _extra_names[full] = obj
    return obj


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], name: str) -> None:
        super().__init__(file)
        self._name = name

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        found = _extra_objects.get(key, _MISSING)
        if found is _MISSING:
            found = _defaults().get(key, _MISSING)
        if found is not _MISSING:
            return found
        if f"{module}.{name}" in _extra_names:
            return _resolve_named(module, name)
        raise _blocked(f"{module}.{name}", self._name, _newer_torch_hint(module, name))

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed in DCP metadata")


def _newer_torch_hint(module: str, name: str) -> str:
    """A note when a torch module that is already loaded lacks the name (checked, never imported)."""
    loaded = sys.modules.get(module) if module.startswith("torch.") else None
    if loaded is None or hasattr(loaded, name.split(".")[0]):
        return ""
    return f" (torch {torch.__version__} does not define it: was the checkpoint written by a newer torch?)"


def _blocked(full_name: str, file_name: str, hint: str = "") -> pickle.UnpicklingError:
    error = pickle.UnpicklingError(
        f"{file_name}: refusing to load global '{full_name}' from DCP checkpoint metadata{hint}: it is not "
        f"on the allow-list of classes a .metadata file may reference, so it was neither imported nor run. "
        f"If you trust this checkpoint (for example it was written with a custom planner or storage plugin), "
        f"allow it with {_PACKAGE}.add_safe_metadata_globals(['{full_name}'])"
    )
    error.blocked_global = full_name  # type: ignore[attr-defined]
    return error


def _check_extension_codes(data: bytes, file_name: str) -> None:
    """EXT opcodes may be served from pickle's extension cache without find_class: refuse them."""
    if not copyreg._inverted_registry:  # type: ignore[attr-defined]
        return  # nothing registered: any EXT opcode fails as unregistered
    for opcode, arg, _ in pickletools.genops(data):
        if opcode.name in ("EXT1", "EXT2", "EXT4"):
            target = copyreg._inverted_registry.get(arg)  # type: ignore[attr-defined]
            full = ".".join(target) if target else f"extension code {arg}"
            raise _blocked(full, file_name)


def load_metadata(file: IO[bytes], name: str) -> Any:
    """Unpickle a DCP ``.metadata`` stream, allowing only known-safe globals.

    ``name`` (the file's path) is used in error messages. Raises
    :class:`pickle.UnpicklingError` for a disallowed global or an unreadable
    pickle, and :class:`ValueError` if the file fails its checksum or holds
    something other than torch's ``Metadata``.
    """
    data = file.read()
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"{name}: metadata stream returned {type(data).__name__}, not bytes")
    if len(data) == 0:
        raise pickle.UnpicklingError(f"{name}: DCP metadata file is empty")
    data = _checksum.checked_pickle(bytes(data), name)
    try:
        _check_extension_codes(bytes(data), name)
        stream = io.BytesIO(data)
        obj = _RestrictedUnpickler(stream, name).load()
        if stream.tell() != len(data):
            raise ValueError(f"{len(data) - stream.tell()} bytes after the pickle are not a checksum of it")
    except Exception as e:
        if getattr(e, "blocked_global", None) is not None:
            raise
        raise pickle.UnpicklingError(
            f"{name}: cannot read DCP metadata ({len(data)} bytes; truncated or damaged?): {type(e).__name__}: {e}"
        ) from e
    if not isinstance(obj, _torch_metadata.Metadata):
        raise ValueError(
            f"{name}: expected a pickled torch.distributed.checkpoint.metadata.Metadata, "
            f"got {type(obj).__module__}.{type(obj).__qualname__}"
        )
    return obj


def dump_metadata(metadata: Any) -> bytes:
    """``.metadata``'s bytes for ``metadata``: its pickle and a checksum trailer.

    Equal ``torch.Size`` values (a tensor's size, its chunks' offsets and sizes, the storage keys'
    offsets: four per tensor, mostly alike) become one object first, so the pickle holds each once
    and refers back to it: for 2 000 small tensors, 16 % fewer bytes and about a fifth less time
    to unpickle, with torch's own reader too. Only immutable values are shared.
    """
    shared: Dict[Any, torch.Size] = {}

    def one(size: Any) -> Any:
        return shared.setdefault(size, size) if type(size) is torch.Size else size

    for value in metadata.state_dict_metadata.values():
        if hasattr(value, "chunks"):
            value.size = one(value.size)
            for chunk in value.chunks:
                chunk.offsets, chunk.sizes = one(chunk.offsets), one(chunk.sizes)
    for index in metadata.storage_data or ():
        if getattr(index, "offset", None) is not None:
            object.__setattr__(index, "offset", one(index.offset))  # frozen; an equal value keeps its hash
    return _checksum.with_trailer(pickle.dumps(metadata))

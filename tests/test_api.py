"""The API surface: every name of the seed module, upstream's signatures, import hygiene, shared classes."""
from __future__ import annotations

import dataclasses
import enum
import importlib
import importlib.util
import inspect
import json

import pytest
import torch.distributed.checkpoint.filesystem as torch_fs
from helpers import REPO, run_clean_python
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter

import dcp_filesystem
from dcp_filesystem import _compat, _format, fs, loaders, reader, transforms, writer

# Every top-level name of seeds/000_530bcaa65fcc960d.txt (the 2.8-era backport's API listing),
# with the module of this package that holds it (SPEC "Layout").
SEED_NAMES = {
    # classes
    "SerializationFormat": "_format",
    "_StorageInfo": "_format",
    "_StoragePrefix": "_format",
    "_TensorLoader": "loaders",
    "_SerialCpuLoader": "loaders",
    "_OverlappingCpuLoader": "loaders",
    "_StorageWriterTransforms": "transforms",
    "FileSystemBase": "fs",
    "FileSystem": "fs",
    "_FileSystemWriter": "writer",
    "_StorageReaderTransforms": "transforms",
    "FileSystemReader": "reader",
    "FileSystemWriter": "writer",
    # functions
    "_generate_uuid": "_format",
    "_item_size": "writer",
    "_split_by_size_and_type": "writer",
    "_write_item": "writer",
    "_write_files_from_queue": "writer",
    # data
    "__all__": "",
    "_metadata_fn": "_format",
    "DEFAULT_SUFFIX": "_format",
}
SEED_ALL = ["FileSystemWriter", "FileSystemReader", "FileSystem", "FileSystemBase"]
UPSTREAM_2_15_ALL = ["FileSystemWriter", "FileSystemReader", "FileSystem", "FileSystemBase", "SerializationFormat"]
PUBLIC = [
    "FileSystemWriter",
    "FileSystemReader",
    "FileSystem",
    "FileSystemBase",
    "SerializationFormat",
    "DEFAULT_SUFFIX",
]

# Methods and properties the seed lists, with the parameters it gives them (None: a property).
SEED_MEMBERS = {
    "_TensorLoader": {"add": ["size", "obj"], "start_loading": [], "values": []},
    "_SerialCpuLoader": {"__init__": ["resolve_fun"], "add": ["size", "obj"], "start_loading": [], "values": []},
    "_OverlappingCpuLoader": {
        "__init__": ["resolve_fun", "stream", "inflight_threshhold"],
        "_done": None,
        "_drain": [],
        "_refill": [],
        "_finish": [],
        "add": ["size", "obj"],
        "start_loading": [],
        "values": [],
    },
    "_StorageWriterTransforms": {"__init__": ["extensions"], "transform_save_stream": ["write_item", "raw_stream"]},
    "_StorageReaderTransforms": {
        "__init__": ["extension_registry"],
        "transform_load_stream": ["read_item", "transform_descriptors", "raw_stream"],
    },
    "FileSystemBase": {
        "create_stream": ["path", "mode"],
        "concat_path": ["path", "suffix"],
        "rename": ["path", "new_path"],
        "init_path": ["path"],
        "mkdir": ["path"],
        "validate_checkpoint_id": ["checkpoint_id"],
        "exists": ["path"],
        "rm_file": ["path"],
    },
    "FileSystem": {
        "create_stream": ["path", "mode"],
        "concat_path": ["path", "suffix"],
        "init_path": ["path"],
        "rename": ["path", "new_path"],
        "mkdir": ["path"],
        "validate_checkpoint_id": ["checkpoint_id"],
        "exists": ["path"],
        "rm_file": ["path"],
        "ls": ["path"],
    },
    "_FileSystemWriter": {
        "reset": ["checkpoint_id"],
        "set_up_storage_writer": ["is_coordinator"],
        "prepare_local_plan": ["plan"],
        "prepare_global_plan": ["plans"],
        "write_data": ["plan", "planner"],
        "_write_data": ["planner", "file_queue"],
        "finish": ["metadata", "results"],
        "storage_meta": [],
        "metadata_path": None,
        "checkpoint_id": None,
        "validate_checkpoint_id": ["checkpoint_id"],
    },
    "FileSystemReader": {
        "_slice_file": ["file", "sinfo"],
        "reset": ["checkpoint_id"],
        "read_data": ["plan", "planner"],
        "read_metadata": [],
        "set_up_storage_reader": ["metadata", "is_coordinator"],
        "prepare_local_plan": ["plan"],
        "prepare_global_plan": ["plans"],
        "checkpoint_id": None,
        "validate_checkpoint_id": ["checkpoint_id"],
    },
    "FileSystemWriter": {"stage": ["state_dict"]},
}
SEED_FUNCTIONS = {
    "_generate_uuid": [],
    "_item_size": ["item"],
    "_split_by_size_and_type": ["bins", "items"],
    "_write_item": ["transforms", "stream", "data", "write_item", "storage_key", "serialization_format"],
    "_write_files_from_queue": [
        "create_stream",
        "file_queue",
        "result_queue",
        "planner",
        "transforms",
        "inflight_threshhold",
        "use_fsync",
        "thread_count",
        "serialization_format",
    ],
}
TORCH_HAS_FORMAT = _compat.TorchSerializationFormat is not None
TORCH_HAS_EXTENSION = _compat.torch_extension is not None
TORCH_INFO_HAS_TRANSFORMS = _compat.STORAGE_INFO_HAS_TRANSFORMS


def _obj(name):
    module = SEED_NAMES[name]
    return importlib.import_module("dcp_filesystem" + ("." + module if module else ""))


def _lookup(cls, member):
    """The member as defined on the class or a base (not object's defaults)."""
    for klass in cls.__mro__:
        if klass is not object and member in vars(klass):
            return vars(klass)[member]
    raise AttributeError(f"{cls.__name__}.{member}")


def _params(func):
    return [p for p in inspect.signature(func).parameters.values() if p.name not in ("self", "cls")]


def _check_params(func, seed_names):
    """The seed's parameters come first, in order; anything extra here is optional."""
    params = _params(func)
    named = [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    assert [p.name for p in named[: len(seed_names)]] == seed_names, (func, params)
    for extra in named[len(seed_names):]:
        assert extra.default is not inspect.Parameter.empty, (func, extra)


@pytest.mark.parametrize("name", sorted(SEED_NAMES))
def test_seed_name_exists_in_its_module(name):
    module = _obj(name)
    assert hasattr(module, name), f"dcp_filesystem.{SEED_NAMES[name]} has no {name}"


def test_seed_data_values():
    assert set(SEED_ALL) <= set(dcp_filesystem.__all__)
    assert set(UPSTREAM_2_15_ALL) <= set(dcp_filesystem.__all__)
    assert _format._metadata_fn == ".metadata"
    assert _format.DEFAULT_SUFFIX == ".distcp" and dcp_filesystem.DEFAULT_SUFFIX == ".distcp"
    assert [f.name for f in dataclasses.fields(_format._StorageInfo)] == [
        "relative_path",
        "offset",
        "length",
        "transform_descriptors",
    ]
    assert _format._StorageInfo("f", 1, 2).transform_descriptors is None
    assert [f.name for f in dataclasses.fields(_format._StoragePrefix)] == ["prefix"]
    assert issubclass(_format.SerializationFormat, enum.Enum)
    assert {m.name: m.value for m in _format.SerializationFormat} == {
        "TORCH_SAVE": "torch_save",
        "SAFETENSORS": "safetensors",
    }
    uuids = {_format._generate_uuid() for _ in range(3)}
    assert len(uuids) == 3 and all(len(u) == 36 and u.count("-") == 4 for u in uuids)


@pytest.mark.parametrize("name", PUBLIC)
def test_public_names_reexported(name):
    assert name in dcp_filesystem.__all__
    home = {"FileSystemWriter": writer, "FileSystemReader": reader, "FileSystem": fs, "FileSystemBase": fs}
    source = home.get(name, _format)
    assert getattr(dcp_filesystem, name) is getattr(source, name)


def test_all_resolves():
    assert len(dcp_filesystem.__all__) == len(set(dcp_filesystem.__all__))
    for name in dcp_filesystem.__all__:
        assert hasattr(dcp_filesystem, name), name


def _member_params():
    for cls_name, members in SEED_MEMBERS.items():
        for member, params in members.items():
            yield pytest.param(cls_name, member, params, id=f"{cls_name}.{member}")


@pytest.mark.parametrize("cls_name,member,params", list(_member_params()))
def test_seed_member_exists(cls_name, member, params):
    cls = getattr(_obj(cls_name), cls_name)
    found = _lookup(cls, member)
    if params is None:
        assert isinstance(found, property), f"{cls_name}.{member} should be a property"
    else:
        _check_params(getattr(cls, member), params)
    if member == "validate_checkpoint_id":
        assert isinstance(found, classmethod), f"{cls_name}.validate_checkpoint_id should be a classmethod"


@pytest.mark.parametrize("name", sorted(SEED_FUNCTIONS))
def test_seed_function_signature(name):
    _check_params(getattr(_obj(name), name), SEED_FUNCTIONS[name])


def test_storage_info_getstate_drops_none():
    info = _format._StorageInfo("__0_0.distcp", 8, 16)
    assert "__getstate__" in vars(_format._StorageInfo)
    assert info.__getstate__() == {"relative_path": "__0_0.distcp", "offset": 8, "length": 16}
    info = _format._StorageInfo("__0_0.distcp", 8, 16, transform_descriptors=["stream.zstd/1"])
    assert info.__getstate__()["transform_descriptors"] == ["stream.zstd/1"]


def test_class_hierarchy():
    assert issubclass(fs.FileSystem, fs.FileSystemBase)
    assert fs.FileSystemBase.__abstractmethods__ == frozenset(
        ["create_stream", "concat_path", "rename", "init_path", "mkdir", "validate_checkpoint_id", "exists", "rm_file"]
    )
    assert not fs.FileSystem.__abstractmethods__
    assert issubclass(writer._FileSystemWriter, StorageWriter)
    assert issubclass(writer.FileSystemWriter, writer._FileSystemWriter)
    assert issubclass(reader.FileSystemReader, StorageReader)
    assert issubclass(loaders._SerialCpuLoader, loaders._TensorLoader)
    assert issubclass(loaders._OverlappingCpuLoader, loaders._TensorLoader)
    assert loaders._TensorLoader.__abstractmethods__ == frozenset(["add", "start_loading", "values"])
    staging = importlib.util.find_spec("torch.distributed.checkpoint.staging")
    if staging is not None and hasattr(importlib.import_module("torch.distributed.checkpoint.staging"),
                                       "BlockingAsyncStager"):
        from torch.distributed.checkpoint.staging import BlockingAsyncStager

        assert issubclass(writer.FileSystemWriter, BlockingAsyncStager)
    assert callable(writer.FileSystemWriter("unused").stage)


def _sig(func):
    return [
        (p.name, p.kind.name, None if p.default is inspect.Parameter.empty else p.default) for p in _params(func)
    ]


TORCH_SAVE = dcp_filesystem.SerializationFormat.TORCH_SAVE
P, VP, VK = "POSITIONAL_OR_KEYWORD", "VAR_POSITIONAL", "VAR_KEYWORD"
UPSTREAM_SIGNATURES = {
    "FileSystemWriter": [
        ("path", P, None),
        ("single_file_per_rank", P, True),
        ("sync_files", P, True),
        ("thread_count", P, 1),
        ("per_thread_copy_ahead", P, 10_000_000),
        ("cache_staged_state_dict", P, False),
        ("overwrite", P, True),
        ("_extensions", P, None),
        ("serialization_format", P, TORCH_SAVE),
    ],
    "_FileSystemWriter": [
        ("path", P, None),
        ("single_file_per_rank", P, True),
        ("sync_files", P, True),
        ("thread_count", P, 1),
        ("per_thread_copy_ahead", P, 10_000_000),
        ("overwrite", P, True),
        ("_extensions", P, None),
        ("serialization_format", P, TORCH_SAVE),
        ("args", VP, None),
        ("kwargs", VK, None),
    ],
    "FileSystemReader": [("path", P, None), ("_extension_registry", P, None)],
}


def _upstream_part(func):
    """The parameters upstream has; this package may add keyword-only ones after them (with defaults)."""
    for p in _params(func):
        if p.kind is p.KEYWORD_ONLY:
            assert p.default is not inspect.Parameter.empty, f"added keyword-only parameter {p.name} needs a default"
    return [p for p in _sig(func) if p[1] != "KEYWORD_ONLY"]


@pytest.mark.parametrize("name", sorted(UPSTREAM_SIGNATURES))
def test_init_signature_matches_upstream_2_15(name):
    cls = getattr(_obj(name), name)
    got = _upstream_part(cls.__init__)
    assert got == UPSTREAM_SIGNATURES[name]
    for (pname, _, default) in got:
        if pname == "serialization_format":
            assert default is TORCH_SAVE and default.value == "torch_save"


@pytest.mark.skipif(not TORCH_HAS_FORMAT, reason="this torch's FileSystemWriter predates serialization_format")
@pytest.mark.parametrize("name", sorted(UPSTREAM_SIGNATURES))
def test_init_signature_matches_running_torch(name):
    ours = getattr(_obj(name), name)
    theirs = getattr(torch_fs, name)
    assert _upstream_part(ours.__init__) == _sig(theirs.__init__)


def test_overlapping_loader_defaults():
    params = {p.name: p.default for p in _params(loaders._OverlappingCpuLoader.__init__)}
    assert params["stream"] is None and params["inflight_threshhold"] == 1_000_000
    assert {p.name: p.default for p in _params(transforms._StorageWriterTransforms.__init__)} == {"extensions": None}
    assert {p.name: p.default for p in _params(transforms._StorageReaderTransforms.__init__)} == {
        "extension_registry": None
    }
    assert [(p.name, p.default) for p in _params(writer._FileSystemWriter.reset)] == [("checkpoint_id", None)]
    assert [(p.name, p.default) for p in _params(reader.FileSystemReader.reset)] == [("checkpoint_id", None)]


def test_defaults_take_effect(tmp_path):
    w = dcp_filesystem.FileSystemWriter(tmp_path / "c")
    assert (w.single_file_per_rank, w.sync_files, w.thread_count, w.per_thread_copy_ahead, w.overwrite) == (
        True,
        True,
        1,
        10_000_000,
        True,
    )
    assert w.serialization_format is TORCH_SAVE
    assert list(w.transforms.extensions) == []
    assert w.checkpoint_id == tmp_path / "c"
    r = dcp_filesystem.FileSystemReader(tmp_path / "c")
    assert r.checkpoint_id == tmp_path / "c"
    assert isinstance(r.transforms.extension_registry, transforms.ExtensionRegistry)


@pytest.mark.skipif(not TORCH_HAS_FORMAT, reason="this torch has no SerializationFormat")
def test_serialization_format_is_torchs():
    assert dcp_filesystem.SerializationFormat is torch_fs.SerializationFormat
    assert _format.SerializationFormat is torch_fs.SerializationFormat


@pytest.mark.skipif(not TORCH_HAS_EXTENSION, reason="this torch has no torch.distributed.checkpoint._extension")
def test_extension_classes_are_torchs():
    from torch.distributed.checkpoint import _extension

    for name in ("Extension", "StreamTransformExtension", "ZStandard", "ExtensionRegistry"):
        assert getattr(transforms, name) is getattr(_extension, name), name


@pytest.mark.skipif(not TORCH_INFO_HAS_TRANSFORMS, reason="this torch's _StorageInfo has no transform_descriptors")
def test_storage_info_is_torchs():
    assert _format._StorageInfo is torch_fs._StorageInfo


def test_carried_copies_without_torch_support():
    """Where torch lacks a class, the package's own copy has the same names, values and descriptors."""
    assert transforms.ZStandard.registry_name() == "stream.zstd"
    assert transforms.ZStandard().get_descriptor() == "stream.zstd/1"
    registry = transforms.ExtensionRegistry()
    (ext,) = registry.from_descriptor_list(["stream.zstd/1"])
    assert isinstance(ext, transforms.ZStandard) and isinstance(ext, transforms.StreamTransformExtension)
    with pytest.raises(ValueError, match="nknown extension"):
        registry.from_descriptor_list(["no.such/1"])


IMPORT_CHECK = """
import json, sys
import torch
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.filesystem as tfs
before_modules = set(sys.modules)
snap = lambda m: {k: id(v) for k, v in vars(m).items()}
before = [snap(tfs), snap(dcp)]
import dcp_filesystem
assert dcp_filesystem.__file__.startswith(REPO), dcp_filesystem.__file__
new = sorted(set(sys.modules) - before_modules)
print(json.dumps({"new": new, "torch_unchanged": [snap(tfs), snap(dcp)] == before,
                  "file": dcp_filesystem.__file__}))
"""


def test_import_is_light_and_patches_nothing(tmp_path):
    code = "REPO = " + repr(REPO) + "\n" + IMPORT_CHECK
    out = run_clean_python(code, cwd=str(tmp_path), env_extra={"PYTHONPATH": REPO})
    result = json.loads(out.strip().splitlines()[-1])
    assert result["file"].startswith(REPO)
    heavy = [m for m in result["new"] if m.split(".")[0] in ("safetensors", "zstandard", "numpy")]
    assert heavy == [], heavy
    assert "dcp_filesystem" in result["new"]
    assert result["torch_unchanged"], "importing dcp_filesystem changed torch.distributed.checkpoint"

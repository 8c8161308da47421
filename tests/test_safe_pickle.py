"""The restricted ``.metadata`` unpickler: hostile files are refused, real checkpoints load, plugins allow more."""
from __future__ import annotations

import copyreg
import dataclasses
import importlib.util
import inspect
import logging
import os
import pickle
import subprocess

import pytest
import torch
import torch.distributed.checkpoint.filesystem as torch_fs
from helpers import (
    assert_state_equal,
    dcp_load,
    dcp_save,
    load_passes_on_metadata_errors,
    load_rank_local,
    save_rank_local,
    zeros_like_state,
)
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from dcp_filesystem import FileSystemReader, FileSystemWriter, SerializationFormat, _compat, _safe_pickle
from dcp_filesystem import add_safe_metadata_globals as allow

HAS_STOCK_FORMATS = _compat.TorchSerializationFormat is not None
HAS_SAFETENSORS_LIB = importlib.util.find_spec("safetensors") is not None


@pytest.fixture(autouse=True)
def clean_allow_list(monkeypatch):
    monkeypatch.setattr(_safe_pickle, "_extra_objects", {})
    monkeypatch.setattr(_safe_pickle, "_extra_names", {})


class Reduce:
    """Pickles as ``func(*args)``: what a hostile .metadata runs under plain pickle.load."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@dataclasses.dataclass
class PlannerNote:
    step: int
    tags: tuple


@dataclasses.dataclass
class OtherNote:
    text: str


class Outer:
    @dataclasses.dataclass
    class Inner:
        value: int


def make_state():
    gen = torch.Generator().manual_seed(11)
    return {
        "model": {"weight": torch.randn(6, 4, generator=gen), "half": torch.randn(5, generator=gen).half()},
        "layers": [torch.arange(6, dtype=torch.int32).reshape(2, 3), {"bias": torch.randn(3, dtype=torch.float64)}],
        "scalar": torch.tensor(1.5),
        "step": 42,
        "lr": 0.25,
        "tag": "run-7",
    }


def save(path, **kwargs):
    state = make_state()
    dcp_save(state, FileSystemWriter(path, **kwargs))
    return state


def plain_metadata(path, name=".metadata"):
    with open(path / name, "rb") as f:
        return pickle.load(f)  # test-made, trusted


def set_planner_data(path, value):
    metadata = plain_metadata(path)
    metadata.planner_data = value
    (path / ".metadata").write_bytes(pickle.dumps(metadata))


def blocked_message(path, name):
    return f"{path / '.metadata'}: refusing to load global '{name}' from DCP checkpoint metadata"


def load_into_zeros(path):
    out = zeros_like_state(make_state())
    dcp_load(out, FileSystemReader(path))
    return out


# --------------------------------------------------------------------------- hostile files are refused

SYSTEM = f"{os.system.__module__}.system"  # pickle records os.system by its defining module: posix.system


def hostile(kind, marker):
    if kind == "os.system":
        return SYSTEM, Reduce(os.system, (f"touch {marker}",))
    if kind == "eval":
        return "builtins.eval", Reduce(eval, (f"open({str(marker)!r}, 'w').close()",))
    return "subprocess.Popen", Reduce(subprocess.Popen, (["touch", str(marker)],))


def run_unsafely(raw):
    """What plain pickle.load does with the file (waiting for a process it started)."""
    loaded = pickle.loads(raw)
    started = getattr(loaded, "planner_data", loaded)
    if isinstance(started, subprocess.Popen):
        started.wait()


@pytest.mark.parametrize("placement", ["whole_file", "inside_metadata"])
@pytest.mark.parametrize("kind", ["os.system", "eval", "subprocess.Popen"])
def test_code_running_globals_are_refused(tmp_path, kind, placement, caplog):
    path = tmp_path / "c"
    save(path)
    marker = tmp_path / "MARKER"
    name, payload = hostile(kind, marker)
    if placement == "whole_file":
        (path / ".metadata").write_bytes(pickle.dumps(payload))
    else:
        set_planner_data(path, payload)

    with pytest.raises(pickle.UnpicklingError) as info:
        FileSystemReader(path).read_metadata()
    assert str(info.value).startswith(blocked_message(path, name))
    assert str(info.value).endswith(f"allow it with dcp_filesystem.add_safe_metadata_globals(['{name}'])")
    assert info.value.blocked_global == name
    caplog.set_level(logging.ERROR, logger="dcp_filesystem")
    with pytest.raises(CheckpointException) as info:
        load_into_zeros(path)
    assert not marker.exists()
    # The cause is logged on every torch, and raised where torch passes read_metadata's error on;
    # torch 2.9-2.11's dcp.load drops it (stock readers' errors too) and fails an assertion on the
    # missing metadata: "assert metadata is not None" on 2.9, "metadata is None" after.
    logged = [r.getMessage() for r in caplog.records if r.name == "dcp_filesystem" and r.levelno == logging.ERROR]
    assert any(m.startswith(blocked_message(path, name)) for m in logged), logged
    if load_passes_on_metadata_errors():
        assert blocked_message(path, name) in str(info.value)
    else:
        assert "metadata is None" in str(info.value) or "assert metadata is not None" in str(info.value)
        assert blocked_message(path, name) not in str(info.value)

    # The same file under plain pickle does run the command: the refusal above is what kept it from running.
    run_unsafely((path / ".metadata").read_bytes())
    assert marker.exists()


@pytest.mark.parametrize(
    "name, value",
    [
        ("torch._utils._rebuild_tensor_v2", torch.ones(2)),
        ("torch._utils._rebuild_parameter", torch.nn.Parameter(torch.ones(2))),
        ("torch.storage._load_from_bytes", torch.ones(2).untyped_storage()),
    ],
)
def test_tensor_globals_are_refused(tmp_path, name, value):
    path = tmp_path / "c"
    save(path)
    set_planner_data(path, {"extra": value})
    with pytest.raises(pickle.UnpicklingError) as info:
        FileSystemReader(path).read_metadata()
    assert str(info.value).startswith(blocked_message(path, name))


def test_extension_codes_cannot_bypass_the_allow_list(tmp_path):
    """pickle serves a registered extension code from its cache without calling find_class."""
    path = tmp_path / "c"
    save(path)
    marker = tmp_path / "MARKER"
    code = 0xF0
    copyreg.add_extension(os.system.__module__, "system", code)
    try:
        pickle.loads(pickle.PROTO + bytes([2]) + pickle.EXT1 + bytes([code]) + pickle.STOP)  # fills the cache
        raw = pickle.dumps(Reduce(os.system, (f"touch {marker}",)), protocol=2)
        assert pickle.EXT1 + bytes([code]) in raw
        (path / ".metadata").write_bytes(raw)
        with pytest.raises(pickle.UnpicklingError) as info:
            FileSystemReader(path).read_metadata()
    finally:
        copyreg.remove_extension(os.system.__module__, "system", code)
    assert str(info.value).startswith(blocked_message(path, SYSTEM))
    assert not marker.exists()


# --------------------------------------------------------------------------- real checkpoints load


def check_loads_like_plain_pickle(path, name=".metadata", rank=None):
    plain = plain_metadata(path, name)
    safe = FileSystemReader(path).read_metadata(rank=rank)
    assert safe.state_dict_metadata == plain.state_dict_metadata
    assert safe.storage_data == plain.storage_data
    assert safe.planner_data == plain.planner_data


def stock_safetensors_writer(path):
    safetensors = torch_fs.SerializationFormat.SAFETENSORS
    return torch_fs.FileSystemWriter(path, thread_count=1, serialization_format=safetensors)


WRITERS = [
    pytest.param(lambda p: FileSystemWriter(p), id="ours-torch_save"),
    pytest.param(
        lambda p: FileSystemWriter(p, serialization_format=SerializationFormat.SAFETENSORS), id="ours-safetensors"
    ),
    pytest.param(lambda p: torch_fs.FileSystemWriter(p, thread_count=1), id="stock-torch_save"),
    pytest.param(
        stock_safetensors_writer,
        id="stock-safetensors",
        marks=pytest.mark.skipif(
            not (HAS_STOCK_FORMATS and HAS_SAFETENSORS_LIB), reason="needs SerializationFormat and safetensors"
        ),
    ),
]


@pytest.mark.parametrize("make_writer", WRITERS)
def test_real_checkpoints_load_bit_exact(tmp_path, make_writer):
    path = tmp_path / "c"
    state = make_state()
    dcp_save(state, make_writer(path))
    check_loads_like_plain_pickle(path)
    assert_state_equal(state, load_into_zeros(path))


STOCK_RANK_LOCAL = "use_collectives" in inspect.getsource(torch_fs.FileSystemWriter.set_up_storage_writer)


@pytest.mark.parametrize(
    "make_writer",
    [
        pytest.param(lambda p: FileSystemWriter(p), id="ours"),
        pytest.param(
            lambda p: torch_fs.FileSystemWriter(p, thread_count=1),
            id="stock",
            marks=pytest.mark.skipif(not STOCK_RANK_LOCAL, reason="this torch's writer has no rank-local metadata"),
        ),
    ],
)
def test_rank_local_metadata_loads_bit_exact(tmp_path, make_writer):
    path = tmp_path / "c"
    state = make_state()
    save_rank_local(make_writer(path), state, rank=1)
    assert sorted(os.listdir(path)) == ["__1.metadata", "__1_0.distcp"]
    check_loads_like_plain_pickle(path, "__1.metadata", rank=1)
    out = zeros_like_state(state)
    load_rank_local(FileSystemReader(path), out, rank=1)
    assert_state_equal(state, out)


# --------------------------------------------------------------------------- plugins allow more


NOTE = PlannerNote(step=3, tags=("a", "b"))


def test_custom_class_is_refused_until_allowed(tmp_path):
    path = tmp_path / "c"
    save(path)
    set_planner_data(path, NOTE)
    name = f"{__name__}.PlannerNote"
    with pytest.raises(pickle.UnpicklingError) as info:
        FileSystemReader(path).read_metadata()
    assert str(info.value).startswith(blocked_message(path, name))
    assert str(info.value).endswith(f"add_safe_metadata_globals(['{name}'])")


@pytest.mark.parametrize(
    "entry",
    [
        pytest.param(PlannerNote, id="class"),
        pytest.param((__name__, "PlannerNote"), id="tuple"),
        pytest.param(f"{__name__}.PlannerNote", id="string"),
    ],
)
def test_allowed_custom_class_loads(tmp_path, entry):
    path = tmp_path / "c"
    state = save(path)
    set_planner_data(path, NOTE)
    allow([entry])
    assert FileSystemReader(path).read_metadata().planner_data == NOTE
    assert_state_equal(state, load_into_zeros(path))


def test_allowing_one_class_does_not_allow_another(tmp_path):
    path = tmp_path / "c"
    save(path)
    set_planner_data(path, [NOTE, OtherNote("x")])
    allow([PlannerNote])
    with pytest.raises(pickle.UnpicklingError) as info:
        FileSystemReader(path).read_metadata()
    assert str(info.value).startswith(blocked_message(path, f"{__name__}.OtherNote"))


def test_nested_class_by_string_is_imported_only_when_met(tmp_path):
    path = tmp_path / "c"
    save(path)
    name = f"{__name__}.Outer.Inner"
    allow([name, "no_such_module_anywhere.Thing"])  # never imported: no checkpoint names it
    assert _safe_pickle._extra_names == {name: None, "no_such_module_anywhere.Thing": None}
    assert FileSystemReader(path).read_metadata().planner_data == plain_metadata(path).planner_data
    set_planner_data(path, Outer.Inner(7))
    assert FileSystemReader(path).read_metadata().planner_data == Outer.Inner(7)
    assert _safe_pickle._extra_names == {name: Outer.Inner, "no_such_module_anywhere.Thing": None}


@pytest.mark.parametrize("entry", [f"{__name__}.PlannerNote", (__name__, "PlannerNote")])
def test_a_single_global_instead_of_a_list_is_a_type_error(entry):
    with pytest.raises(TypeError, match="takes a list of globals, not a single one: wrap"):
        allow(entry)
    assert _safe_pickle._extra_names == {}


@pytest.mark.parametrize(
    "entry, message",
    [
        ("NoDot", "'NoDot' is not a 'module.Qualname' name"),
        (".module", "'.module' is not a 'module.Qualname' name"),
        ("module.", "'module.' is not a 'module.Qualname' name"),
        (" module.Name", "' module.Name' is not a 'module.Qualname' name"),
        (("module",), r"\('module',\) is not a \(module, qualname\) pair"),
        (("module", ""), r"\('module', ''\) is not a \(module, qualname\) pair"),
        (("a", "b", "c"), r"\('a', 'b', 'c'\) is not a \(module, qualname\) pair"),
        (("module", 1), r"\('module', 1\) is not a \(module, qualname\) pair"),
    ],
)
def test_malformed_entries_are_value_errors_and_allow_nothing(entry, message):
    with pytest.raises(ValueError, match=message):
        allow([PlannerNote, entry])
    assert (_safe_pickle._extra_objects, _safe_pickle._extra_names) == ({}, {})


def test_entry_without_a_name_is_a_type_error():
    with pytest.raises(TypeError, match="42 has no __module__ and __qualname__"):
        allow([42])


# --------------------------------------------------------------------------- unreadable and wrong content


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda raw: b"", "DCP metadata file is empty"),
        (lambda raw: b"\x00garbage", "cannot read DCP metadata (8 bytes; truncated or damaged?): UnpicklingError"),
        (lambda raw: raw[: len(raw) // 2], "cannot read DCP metadata ({n} bytes; truncated or damaged?)"),
        (lambda raw: raw[:-1], "cannot read DCP metadata ({n} bytes; truncated or damaged?)"),
    ],
    ids=["empty", "garbage", "half", "last-byte-missing"],
)
def test_unreadable_metadata_names_the_file(tmp_path, damage, message):
    path = tmp_path / "c"
    save(path)
    raw = damage((path / ".metadata").read_bytes())
    (path / ".metadata").write_bytes(raw)
    with pytest.raises(pickle.UnpicklingError) as info:
        FileSystemReader(path).read_metadata()
    assert str(info.value).startswith(f"{path / '.metadata'}: {message.format(n=len(raw))}")


@pytest.mark.parametrize(
    "value, got",
    [
        ({"a": 1}, "builtins.dict"),
        ([1, 2], "builtins.list"),
        (BytesStorageMetadata(), "torch.distributed.checkpoint.metadata.BytesStorageMetadata"),
        (torch.Size([2, 3]), "torch.Size"),
    ],
)
def test_pickle_of_something_else_is_a_value_error(tmp_path, value, got):
    path = tmp_path / "c"
    save(path)
    (path / ".metadata").write_bytes(pickle.dumps(value))
    with pytest.raises(ValueError) as info:
        FileSystemReader(path).read_metadata()
    assert str(info.value) == (
        f"{path / '.metadata'}: expected a pickled torch.distributed.checkpoint.metadata.Metadata, got {got}"
    )


# --------------------------------------------------------------------------- newer torches' metadata classes


def test_newer_storage_meta_is_read_on_every_torch(tmp_path, monkeypatch):
    """torch 2.4+ pickles Metadata.storage_meta as metadata.StorageMeta: torch 2.1-2.3 lack the class."""
    import torch.distributed.checkpoint.metadata as meta

    path = tmp_path / "c"
    state = save(path)
    metadata = plain_metadata(path)
    has_class = _compat.StorageMeta is not None
    if not has_class:
        # Pickle it the way a newer torch does: a class found under that module and name.
        stand_in = type("StorageMeta", (), {"__module__": meta.__name__, "__qualname__": "StorageMeta"})
        monkeypatch.setattr(meta, "StorageMeta", stand_in, raising=False)
    stored = meta.StorageMeta()
    stored.__dict__.update(checkpoint_id=str(path), save_id="s-1", load_id=None, modules=["m"])
    metadata.storage_meta = stored
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    monkeypatch.undo()
    assert hasattr(meta, "StorageMeta") == has_class

    read = FileSystemReader(path).read_metadata()
    assert type(read.storage_meta).__name__ == "StorageMeta"
    assert (read.storage_meta.checkpoint_id, read.storage_meta.save_id) == (str(path), "s-1")
    assert read.storage_meta.modules == ["m"]
    assert (type(read.storage_meta) is getattr(meta, "StorageMeta", None)) == has_class
    out = load_into_zeros(path)
    assert_state_equal(state, out)
    # Only that name: another class the module lacks is still refused.
    monkeypatch.setattr(meta, "StorageMetaV9", type("StorageMetaV9", (), {"__module__": meta.__name__}), raising=False)
    metadata.storage_meta, metadata.planner_data = None, meta.StorageMetaV9()
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    monkeypatch.undo()
    with pytest.raises(pickle.UnpicklingError, match="torch.distributed.checkpoint.metadata.StorageMetaV9"):
        FileSystemReader(path).read_metadata()


def test_tensor_properties_with_fields_a_newer_torch_appends(tmp_path, monkeypatch):
    """torch 2.15 appends ``strides`` to TensorProperties' pickled state; older torches could not unpack it."""
    path = tmp_path / "c"
    state = save(path)
    metadata = plain_metadata(path)
    props_class = type(metadata.state_dict_metadata["model.weight"].properties)
    own_state = props_class.__getstate__
    monkeypatch.setattr(props_class, "__getstate__", lambda self: own_state(self) + ("a newer field",))
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    monkeypatch.undo()

    read = FileSystemReader(path).read_metadata()
    for fqn, item in metadata.state_dict_metadata.items():
        if hasattr(item, "properties"):
            assert type(read.state_dict_metadata[fqn].properties) is props_class, fqn
            assert read.state_dict_metadata[fqn].properties == item.properties, fqn
    assert_state_equal(state, load_into_zeros(path))


def test_equal_sizes_are_pickled_once_and_read_as_one_object_by_stock_torch_too(tmp_path):
    """Every tensor's size, chunk offsets and sizes and storage key offsets are alike here: the .metadata
    holds one torch.Size per value, so unpickling (ours and plain pickle.load, as stock torch reads it)
    builds one object per value, equal to what DCP planned."""
    state = {f"norm.{i}": torch.randn(256) for i in range(50)}
    state["w"] = torch.randn(4, 8)
    dcp_save(state, FileSystemWriter(tmp_path))
    raw = (tmp_path / ".metadata").read_bytes()
    for metadata in (_safe_pickle.load_metadata(open(tmp_path / ".metadata", "rb"), "m"), pickle.loads(raw)):
        norms = [metadata.state_dict_metadata[f"norm.{i}"] for i in range(50)]
        assert {id(t.size) for t in norms} == {id(t.chunks[0].sizes) for t in norms}
        assert len({id(t.size) for t in norms}) == 1 and norms[0].size == torch.Size([256])
        offsets = {id(t.chunks[0].offsets) for t in norms}
        offsets |= {id(i.offset) for i in metadata.storage_data if i.fqn.startswith("norm.")}
        assert len(offsets) == 1  # also the 2-D tensor's offsets [0, 0] are a value of their own
        assert metadata.state_dict_metadata["w"].chunks[0].offsets == torch.Size([0, 0])
    out = zeros_like_state(state)
    dcp_load(out, FileSystemReader(tmp_path))
    assert_state_equal(state, out)

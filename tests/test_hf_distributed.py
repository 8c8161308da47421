"""Hugging Face checkpoints saved and loaded by 1, 2 and 3 gloo ranks: HuggingFaceStorageWriter with
save_distributed (shard files, consolidated or not) and HuggingFaceStorageReader into other shardings;
upstream's classes (torch 2.8+) on the same files; and DCP checkpoints of several ranks for export-hf."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import assert_state_equal
from test_distributed import HAS_DTENSOR, run_ranks

from dcp_filesystem._cli import main

safetensors_torch = pytest.importorskip("safetensors.torch")
pytestmark = pytest.mark.slow  # three runs of 1, 2 and 3 processes: about 20-60 s

_WORKER = r"""
import inspect, os, sys, warnings
REPO, OUT, INIT, RANK = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
WORLD = int(os.path.basename(OUT).split("-")[-1])
import faulthandler
faulthandler.dump_traceback_later(int(sys.argv[5]), exit=True)
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]
warnings.simplefilter("ignore")
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from dcp_filesystem import (FileSystemWriter, HuggingFaceStorageReader, HuggingFaceStorageWriter,
                            SerializationFormat)
from helpers import dcp_load, dcp_save, probe_stock_torch, raised_error
from test_distributed import _dtensor_api, object_collectives_without_numpy
from test_hf_distributed import full_state

object_collectives_without_numpy()
probe_stock_torch()
dist.init_process_group("gloo", init_method="file://" + INIT, rank=RANK, world_size=WORLD)
api = _dtensor_api()
Shard, Replicate, distribute_tensor = api.Shard, api.Replicate, api.distribute_tensor
init_device_mesh = getattr(api, "init_device_mesh", None)
try:
    from torch.distributed.device_mesh import init_device_mesh
except ImportError:
    pass
mesh = init_device_mesh("cpu", (WORLD,)) if init_device_mesh is not None else api.DeviceMesh("cpu", list(range(WORLD)))
PLACEMENTS = {"w": Shard(0), "v": Shard(1), "r": Replicate()}


def sharded(state, placements):
    return {k: distribute_tensor(v, mesh, [placements[k]]) if k in placements else v.clone() for k, v in state.items()}


def local(state):
    return {k: (v.to_local() if hasattr(v, "to_local") else v).clone() for k, v in state.items()}


def zeros(placements):
    return sharded({k: torch.zeros_like(v) for k, v in full_state().items()}, placements)


def attempt(key, fn):
    try:
        fn()
        results[key] = "ok"
    except BaseException as e:
        results[key] = str(raised_error(e))


results = {}
MAPPING = {"w": 1, "v": 2, "r": 2, "s": 1}
OTHER = {"w": Shard(1), "v": Shard(0), "r": Replicate()}

# Shard files, consolidated into whole tensors
path = os.path.join(OUT, "consolidated")
dcp_save(sharded(full_state(), PLACEMENTS), HuggingFaceStorageWriter(
    path, fqn_to_index_mapping=MAPPING, save_distributed=True, enable_consolidation=True,
    thread_count_consolidation=2))
dist.barrier()
target = zeros(OTHER)
dcp_load(target, HuggingFaceStorageReader(path))
results["consolidated/other"] = local(target)
target = {k: torch.zeros_like(v) for k, v in full_state().items()}
dcp_load(target, HuggingFaceStorageReader(path))
results["consolidated/full"] = target

# Shard files alone, read by the reader into another sharding
path = os.path.join(OUT, "sharded")
dcp_save(sharded(full_state(), PLACEMENTS), HuggingFaceStorageWriter(path, save_distributed=True))
dist.barrier()
target = zeros(OTHER)
dcp_load(target, HuggingFaceStorageReader(path, thread_count=2))
results["sharded/other"] = local(target)

# Without save_distributed, ranks that hold chunks of one file are refused before anything is written
path = os.path.join(OUT, "refused")
attempt("refused", lambda: dcp_save(sharded(full_state(), PLACEMENTS), HuggingFaceStorageWriter(path)))
dist.barrier()
results["refused/files"] = sorted(os.listdir(path)) if os.path.isdir(path) else None

# Upstream's classes (torch 2.8+) on the same kind of files
Upstream = getattr(dcp, "HuggingFaceStorageReader", None)
if Upstream is not None:
    target = zeros(OTHER)
    dcp_load(target, Upstream(os.path.join(OUT, "sharded")))
    results["upstream_reads_ours"] = local(target)
    path = os.path.join(OUT, "upstream_sharded")
    params = inspect.signature(dcp.HuggingFaceStorageWriter).parameters
    distributed = "save_distributed" if "save_distributed" in params else "save_sharded"  # torch 2.8's name
    dcp_save(sharded(full_state(), PLACEMENTS), dcp.HuggingFaceStorageWriter(path, **{distributed: True}))
    dist.barrier()
    target = zeros(OTHER)
    dcp_load(target, HuggingFaceStorageReader(path))
    results["ours_reads_upstream"] = local(target)

# DCP checkpoints of WORLD ranks, for export-hf (by the test process)
state = sharded(full_state(), PLACEMENTS)
state["step"] = 12
for fmt in ("torch_save", "safetensors"):
    dcp_save(state, FileSystemWriter(os.path.join(OUT, "dcp_" + fmt), serialization_format=SerializationFormat(fmt)))
import torch.distributed.checkpoint.filesystem as torch_fs
dcp_save(state, torch_fs.FileSystemWriter(os.path.join(OUT, "stock_torch_save")))
if hasattr(torch_fs, "SerializationFormat"):
    dcp_save(state, torch_fs.FileSystemWriter(os.path.join(OUT, "stock_safetensors"),
                                              serialization_format=torch_fs.SerializationFormat.SAFETENSORS))

torch.save(results, os.path.join(OUT, "rank%d.pt" % RANK))
dist.barrier()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
"""


def full_state():
    """Tensors that 1, 2 and 3 ranks shard evenly: w by rows, v by columns, r replicated, s a scalar."""
    gen = torch.Generator().manual_seed(3)
    return {
        "w": torch.randn(48, 24, generator=gen),
        "v": (torch.randn(6, 12, generator=gen) * 100).to(torch.float16),  # gloo of torch 2.1 scatters no bfloat16
        "r": torch.arange(10, dtype=torch.int64) * 1_000_000_007,
        "s": torch.tensor(2.5, dtype=torch.float64),
    }


def _expected_local(rank, world):
    """What rank ``rank`` holds of full_state() after loading into the OTHER placements (w Shard(1), v Shard(0))."""
    full = full_state()
    wc, vr = full["w"].shape[1] // world, full["v"].shape[0] // world
    return {"w": full["w"][:, wc * rank : wc * (rank + 1)].contiguous(), "v": full["v"][vr * rank : vr * (rank + 1)],
            "r": full["r"], "s": full["s"]}


@pytest.fixture(scope="module", params=[1, 2, 3])
def ranks(request, tmp_path_factory):
    if not HAS_DTENSOR:
        pytest.skip("this torch has no torch.distributed DTensor API (distribute_tensor, Shard, DeviceMesh)")
    world = request.param
    out = tmp_path_factory.mktemp("hf-world") / f"run-{world}"
    out.mkdir()
    return out, world, run_ranks(_WORKER, out, world)


def test_consolidated_files_on_disk(ranks):
    out, world, _ = ranks
    path = out / "consolidated"
    assert sorted(os.listdir(path)) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
        "sharded",
    ]
    shards = sorted(os.listdir(path / "sharded"))
    # Every rank that holds a chunk writes its files; the replicated and scalar tensors come from one rank.
    assert {name[:6] for name in shards} == {"shard-"}
    assert all(name.endswith(("-model-00001-of-00002.safetensors", "-model-00002-of-00002.safetensors"))
               for name in shards)
    assert len([n for n in shards if n.endswith("00001-of-00002.safetensors")]) == world
    full = full_state()
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert index == {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in full.values())},
        "weight_map": {"r": "model-00002-of-00002.safetensors", "s": "model-00001-of-00002.safetensors",
                       "v": "model-00002-of-00002.safetensors", "w": "model-00001-of-00002.safetensors"},
    }
    loaded = {}
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        loaded.update(safetensors_torch.load_file(str(path / name)))
    assert_state_equal(full, loaded)


def test_load_consolidated_into_other_sharding(ranks):
    _, world, results = ranks
    for rank in range(world):
        assert_state_equal(_expected_local(rank, world), results[rank]["consolidated/other"])
        assert_state_equal(full_state(), results[rank]["consolidated/full"])


def test_load_shard_files_into_other_sharding(ranks):
    out, world, results = ranks
    names = sorted(os.listdir(out / "sharded"))
    assert len([n for n in names if n.startswith("shard-")]) == world and "model.safetensors.index.json" not in names
    for rank in range(world):
        assert_state_equal(_expected_local(rank, world), results[rank]["sharded/other"])


def test_ranks_writing_one_file_are_refused(ranks):
    out, world, results = ranks
    for rank in range(world):
        if world == 1:
            assert results[rank]["refused"] == "ok"
        else:
            assert (f"HuggingFaceStorageWriter(save_distributed=False): ranks {list(range(world))} all have tensors "
                    "for model-00001-of-00001.safetensors: save the full state dict from one rank"
                    ) in results[rank]["refused"]
            assert results[rank]["refused/files"] == []


def test_upstream_reads_ours_and_ours_reads_upstream(ranks):
    import torch.distributed.checkpoint as dcp

    if not hasattr(dcp, "HuggingFaceStorageReader"):
        pytest.skip("torch.distributed.checkpoint has no HuggingFaceStorageReader/Writer (added in torch 2.8)")
    _, world, results = ranks
    for rank in range(world):
        assert_state_equal(_expected_local(rank, world), results[rank]["upstream_reads_ours"])
        assert_state_equal(_expected_local(rank, world), results[rank]["ours_reads_upstream"])


def _export(capsys, *args):
    code = main(["export-hf", *[str(a) for a in args]])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("checkpoint", ["dcp_torch_save", "dcp_safetensors", "stock_torch_save", "stock_safetensors"])
def test_export_checkpoint_of_several_ranks(ranks, checkpoint, tmp_path, capsys):
    out, world, _ = ranks
    if world == 1:
        pytest.skip("one rank's checkpoints: see test_hf_export.py")
    if not (out / checkpoint).exists():
        pytest.skip("stock torch's FileSystemWriter has no SerializationFormat.SAFETENSORS (added in torch 2.8)")
    code, _, err = _export(capsys, out / checkpoint, tmp_path / "refused")
    assert code == 1
    assert err == (
        f"error: ValueError: {out / checkpoint}: 'step' is a non-tensor value, which a Hugging Face checkpoint "
        "cannot hold: pass --skip-non-tensors to export the tensors without them\n"
    )
    assert not (tmp_path / "refused").exists()
    code, stdout, err = _export(capsys, out / checkpoint, tmp_path / "hf", "--skip-non-tensors",
                                "--max-shard-size", "2KiB")
    assert code == 0, err
    assert stdout.splitlines()[-1] == "left out 1 non-tensor value(s): step"
    names = sorted(os.listdir(tmp_path / "hf"))
    assert names == [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)] + ["model.safetensors.index.json"]
    loaded = {}
    for name in names[:2]:
        loaded.update(safetensors_torch.load_file(str(tmp_path / "hf" / name)))
    assert_state_equal(full_state(), loaded)

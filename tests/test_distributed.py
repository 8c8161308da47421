"""Two-process gloo save/load with DTensors, rank-local metadata (no collectives), and each rank
reclaiming its own leftovers of a killed save while the other writes."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist
from helpers import REPO, SAVE_HAS_USE_COLLECTIVES, assert_state_equal, load_rank_local, save_rank_local

from dcp_filesystem import FileSystem, FileSystemReader, FileSystemWriter, SerializationFormat

FORMATS = ["torch_save", "safetensors"]
WORLD = 2
JOIN_TIMEOUT_S = 150
WORKER_TIMEOUT_S = int(os.environ.get("DCP_TEST_WORKER_TIMEOUT_S", "120"))


def _dtensor_api():
    for name in ("torch.distributed.tensor", "torch.distributed._tensor"):
        try:
            mod = __import__(name, fromlist=["distribute_tensor"])
        except ImportError:
            continue
        if all(hasattr(mod, a) for a in ("distribute_tensor", "Shard", "Replicate", "DeviceMesh")):
            return mod
    return None


HAS_DTENSOR = dist.is_available() and _dtensor_api() is not None


def full_tensor():
    return torch.arange(48, dtype=torch.float32).reshape(8, 6) / 4 - 3


def replicated_tensor():
    return torch.arange(10, dtype=torch.int64) * 1_000_000_007


def object_collectives_without_numpy():
    """torch 2.1's object collectives (gather_object, scatter_object_list) decode with
    tensor.numpy(); where there is no NumPy, decode the same bytes without it. Only torch's
    transport of pickled plans changes; nothing of dcp_filesystem does."""
    try:
        torch.zeros(1, dtype=torch.uint8).numpy()
    except RuntimeError:
        import io

        import torch.distributed.distributed_c10d as c10d

        def _tensor_to_object(tensor, tensor_size, *args, **kwargs):
            buf = bytes(tensor.cpu().reshape(-1).tolist())[:tensor_size]
            return c10d._unpickler(io.BytesIO(buf)).load()

        c10d._tensor_to_object = _tensor_to_object


_WORKER = r"""
import inspect, os, sys, warnings
REPO, OUT, INIT, RANK = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
import faulthandler
faulthandler.dump_traceback_later(int(sys.argv[5]), exit=True)  # a hang prints every stack, then exits
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]
warnings.simplefilter("ignore")
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from dcp_filesystem import FileSystem, FileSystemReader, FileSystemWriter, SerializationFormat, _save_lock
from helpers import SAVE_HAS_USE_COLLECTIVES, dcp_load, dcp_save, probe_stock_torch
from test_distributed import _dtensor_api, full_tensor, object_collectives_without_numpy, replicated_tensor

object_collectives_without_numpy()
probe_stock_torch()
dist.init_process_group("gloo", init_method="file://" + INIT, rank=RANK, world_size=2)
api = _dtensor_api()
Shard, distribute_tensor = api.Shard, api.distribute_tensor
init_device_mesh = getattr(api, "init_device_mesh", None)
try:
    from torch.distributed.device_mesh import init_device_mesh
except ImportError:
    pass
mesh = init_device_mesh("cpu", (2,)) if init_device_mesh is not None else api.DeviceMesh("cpu", [0, 1])


def source():
    return {
        "dt": distribute_tensor(full_tensor(), mesh, [Shard(0)]),
        "repl": replicated_tensor(),
        "epoch": 7,
        "tag": "run-a",
    }


def describe(state):
    dt = state["dt"]
    is_dtensor = hasattr(dt, "to_local")
    return {
        "dt_local": (dt.to_local() if is_dtensor else dt).clone(),
        "dt_placements": [repr(p) for p in dt.placements] if is_dtensor else None,
        "repl": state["repl"].clone(),
        "epoch": state["epoch"],
        "tag": state["tag"],
    }


results = {}
for fmt in ("torch_save", "safetensors"):
    path = os.path.join(OUT, fmt)
    src = source()
    dcp_save(src, FileSystemWriter(path, serialization_format=SerializationFormat(fmt)))
    dist.barrier()
    results[fmt + "/files"] = sorted(os.listdir(path))
    results[fmt + "/source_local"] = src["dt"].to_local().clone()

    # (a) a DTensor sharded along the other dimension
    target = {"dt": distribute_tensor(torch.zeros(8, 6), mesh, [Shard(1)]),
              "repl": torch.zeros(10, dtype=torch.int64), "epoch": None, "tag": None}
    dcp_load(target, FileSystemReader(path))
    results[fmt + "/shard1"] = describe(target)

    # (b) plain full tensors on every rank
    target = {"dt": torch.zeros(8, 6), "repl": torch.zeros(10, dtype=torch.int64), "epoch": None, "tag": None}
    dcp_load(target, FileSystemReader(path))
    results[fmt + "/plain"] = describe(target)
    dist.barrier()

    # (c) a DTensor of another global size: refused on every torch, nothing read
    target = {"dt": distribute_tensor(torch.full((16, 6), 5.0), mesh, [Shard(0)]),
              "repl": torch.zeros(10, dtype=torch.int64), "epoch": None, "tag": None}
    try:
        dcp_load(target, FileSystemReader(path))
        results[fmt + "/bigger"] = "loaded"
    except BaseException as e:
        results[fmt + "/bigger"] = str(e)
    results[fmt + "/bigger_local"] = target["dt"].to_local().clone()
    dist.barrier()

    # (d) while another save holds the directory's lock, both ranks' save stops before writing anything;
    # once it is given back, the two ranks' save is one save (neither locks out the other)
    path = os.path.join(OUT, fmt + "_lock")
    dcp_save(source(), FileSystemWriter(path, serialization_format=SerializationFormat(fmt)))
    other = FileSystemWriter(path)
    if RANK == 0:
        _save_lock.acquire(other, other.fs, other.path, None)
    dist.barrier()
    try:
        dcp_save({"dt": distribute_tensor(torch.ones(8, 6), mesh, [Shard(0)])}, FileSystemWriter(path))
        results[fmt + "/while_held"] = "saved"
    except BaseException as e:
        results[fmt + "/while_held"] = str(e)
    results[fmt + "/files_while_held"] = sorted(os.listdir(path))
    dist.barrier()
    _save_lock.release(other)
    dcp_save(source(), FileSystemWriter(path, serialization_format=SerializationFormat(fmt)))
    dist.barrier()
    results[fmt + "/files_after"] = sorted(os.listdir(path))
    dist.barrier()

if SAVE_HAS_USE_COLLECTIVES:
    path = os.path.join(OUT, "rank_local")
    dcp.save(source(), storage_writer=FileSystemWriter(path), use_collectives=False)
    dist.barrier()
    results["rank_local/files"] = sorted(os.listdir(path))
    target = {"dt": distribute_tensor(torch.zeros(8, 6), mesh, [Shard(0)]),
              "repl": torch.zeros(10, dtype=torch.int64), "epoch": None, "tag": None}
    dcp.load(target, storage_reader=FileSystemReader(path))  # falls back to __{rank}.metadata
    results["rank_local/load"] = describe(target)
    dist.barrier()

torch.save(results, os.path.join(OUT, "rank%d.pt" % RANK))
dist.barrier()
# Not destroy_process_group(): on torch 2.1 it can hang in gloo once the peer has exited.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
"""


def run_two_ranks(worker, out):
    """Run ``worker`` (Python source) as ranks 0 and 1 of a gloo group; returns what each saved to rank{r}.pt."""
    return run_ranks(worker, out, WORLD)


def run_ranks(worker, out, world, extra_args=()):
    """Run ``worker`` as ranks 0 .. world-1 of a gloo group (argv: repo, out, init file, rank, timeout, then
    ``extra_args``); returns what each saved to rank{r}.pt (removed afterwards, for the next run in ``out``)."""
    if not dist.is_gloo_available():
        pytest.skip("this torch was built without gloo")
    init = out / f"init_store_{time.monotonic_ns()}"
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.update({"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    procs = []
    logs = []
    for rank in range(world):
        log = open(str(out / f"rank{rank}.log"), "w+")
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", worker, REPO, str(out), str(init), str(rank), str(WORKER_TIMEOUT_S),
                 *extra_args],
                env=env, cwd=str(out), stdout=log, stderr=subprocess.STDOUT,
            )
        )  # fmt: skip
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    texts = []
    for log in logs:
        log.seek(0)
        texts.append(log.read())
        log.close()
    codes = [p.returncode for p in procs]
    logs_text = "\n---\n".join(t[-6000:] for t in texts)
    assert codes == [0] * world, f"workers failed {codes}:\n{logs_text}"
    results = []
    for r in range(world):
        results.append(torch.load(str(out / f"rank{r}.pt"), weights_only=False))
        os.remove(str(out / f"rank{r}.pt"))
    return results


# The tests of a two-process run are marked slow: the run takes about 10 s.
@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    if not HAS_DTENSOR:
        pytest.skip("this torch has no torch.distributed DTensor API (distribute_tensor, Shard, DeviceMesh)")
    out = tmp_path_factory.mktemp("dist")
    return out, run_two_ranks(_WORKER, out)


def _metadata(path, name=".metadata"):
    with open(os.path.join(str(path), name), "rb") as f:
        return pickle.load(f)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_files_on_disk(two_ranks, fmt):
    out, results = two_ranks
    expected = [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert sorted(os.listdir(str(out / fmt))) == expected
    for r in range(WORLD):
        assert results[r][fmt + "/files"] == expected
    md = _metadata(out / fmt)
    assert sorted({info.relative_path for info in md.storage_data.values()}) == expected[1:]
    # The Shard(0) DTensor was saved as two row chunks, one per rank, in that rank's file.
    chunks = sorted((list(c.offsets), list(c.sizes)) for c in md.state_dict_metadata["dt"].chunks)
    assert chunks == [([0, 0], [4, 6]), ([4, 0], [4, 6])]
    assert list(md.state_dict_metadata["dt"].size) == [8, 6]
    for idx, info in md.storage_data.items():
        if idx.fqn == "dt":
            assert info.relative_path == f"__{idx.offset[0] // 4}_0.distcp"
    # Storage info is torch's own class, never this package's.
    assert {type(i).__module__ for i in md.storage_data.values()} == {"torch.distributed.checkpoint.filesystem"}
    if fmt == "safetensors":
        safetensors = pytest.importorskip("safetensors")
        for r in range(WORLD):
            with safetensors.safe_open(str(out / fmt / f"__{r}_0.distcp"), framework="pt") as f:
                assert torch.equal(f.get_tensor("dt"), full_tensor()[4 * r : 4 * r + 4])


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_source_shards(two_ranks, fmt):
    _, results = two_ranks
    for r in range(WORLD):
        assert_state_equal(full_tensor()[4 * r : 4 * r + 4], results[r][fmt + "/source_local"])


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_load_into_other_sharding(two_ranks, fmt):
    _, results = two_ranks
    for r in range(WORLD):
        got = results[r][fmt + "/shard1"]
        assert got["dt_placements"] == [repr(_dtensor_api().Shard(1))]
        assert_state_equal(full_tensor()[:, 3 * r : 3 * r + 3].contiguous(), got["dt_local"])
        assert_state_equal(replicated_tensor(), got["repl"])
        assert got["epoch"] == 7 and got["tag"] == "run-a"


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_load_into_plain_full_tensors(two_ranks, fmt):
    _, results = two_ranks
    for r in range(WORLD):
        got = results[r][fmt + "/plain"]
        assert got["dt_placements"] is None
        assert_state_equal(full_tensor(), got["dt_local"])
        assert_state_equal(replicated_tensor(), got["repl"])
        assert got["epoch"] == 7 and got["tag"] == "run-a"


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_dtensor_of_another_global_size_is_refused(two_ranks, fmt):
    _, results = two_ranks
    for r in range(WORLD):
        assert "Size mismatch between saved torch.Size([8, 6]) and current: torch.Size([16, 6]) for dt" in (
            results[r][fmt + "/bigger"]
        )
        assert torch.equal(results[r][fmt + "/bigger_local"], torch.full((8, 6), 5.0))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_two_rank_save_is_one_save_and_waits_for_no_other(two_ranks, fmt):
    out, results = two_ranks
    path = out / f"{fmt}_lock"
    for r in range(WORLD):
        # Refused on every rank, before any rank wrote a file.
        assert f"cannot save to {path}: another save into it is in progress ({path / '.metadata.lock'} is held by " \
               "another writer of this process" in results[r][fmt + "/while_held"]
        assert results[r][fmt + "/files_while_held"] == [".metadata", ".metadata.lock", "__0_0.distcp", "__1_0.distcp"]
    after = results[0][fmt + "/files_after"]
    assert sorted(os.listdir(path)) == after and after[0] == ".metadata" and len(after) == 3, after


@pytest.mark.slow
def test_rank_local_metadata_through_dcp_save(two_ranks):
    if not SAVE_HAS_USE_COLLECTIVES:
        pytest.skip("this torch's dcp.save has no use_collectives argument")
    out, results = two_ranks
    expected = ["__0.metadata", "__0_0.distcp", "__1.metadata", "__1_0.distcp"]
    assert sorted(os.listdir(str(out / "rank_local"))) == expected
    for r in range(WORLD):
        md = _metadata(out / "rank_local", f"__{r}.metadata")
        assert {info.relative_path for info in md.storage_data.values()} == {f"__{r}_0.distcp"}
        got = results[r]["rank_local/load"]
        assert_state_equal(full_tensor()[4 * r : 4 * r + 4], got["dt_local"])
        assert_state_equal(replicated_tensor(), got["repl"])
        assert got["epoch"] == 7 and got["tag"] == "run-a"


# --------------------------------------------------------------------------- rank-local, driven by hand


def _local_state(scale):
    return {"w": full_tensor() * scale, "ids": replicated_tensor(), "epoch": scale}


@pytest.mark.parametrize("fmt", FORMATS)
def test_rank_local_metadata_driven(tmp_path, fmt):
    path = tmp_path / "ckpt"
    writer = FileSystemWriter(path, serialization_format=SerializationFormat(fmt))
    save_rank_local(writer, _local_state(1), rank=3)
    assert sorted(os.listdir(str(path))) == ["__3.metadata", "__3_0.distcp"]

    reader = FileSystemReader(path)
    with pytest.raises(FileNotFoundError):
        reader.read_metadata()  # no global .metadata was written
    target = {"w": torch.zeros(8, 6), "ids": torch.zeros(10, dtype=torch.int64), "epoch": None}
    metadata = load_rank_local(FileSystemReader(path), target, rank=3)
    assert {info.relative_path for info in metadata.storage_data.values()} == {"__3_0.distcp"}
    assert_state_equal(_local_state(1), target)

    # A second save of rank 3 in place: new name, old file of rank 3 removed, other ranks' files kept.
    (path / "__1_0.distcp").write_bytes(b"rank 1 data")
    writer2 = FileSystemWriter(path, serialization_format=SerializationFormat(fmt))
    save_rank_local(writer2, _local_state(2), rank=3)
    new_name = f"__3_0.{writer2.save_id[:8]}.distcp"
    assert sorted(os.listdir(str(path))) == sorted(["__1_0.distcp", "__3.metadata", new_name])
    assert (path / "__1_0.distcp").read_bytes() == b"rank 1 data"
    target = {"w": torch.zeros(8, 6), "ids": torch.zeros(10, dtype=torch.int64), "epoch": None}
    metadata = load_rank_local(FileSystemReader(path), target, rank=3)
    assert {info.relative_path for info in metadata.storage_data.values()} == {new_name}
    assert_state_equal(_local_state(2), target)


# --------------------------------------------------------------------------- leftovers of killed saves, two ranks


class GatedFS(FileSystem):
    """The local file system, recording a rank's calls, with the two ranks' saves interleaved so that
    rank 0 reclaims while rank 1's new data file is open and still empty: rank 1 waits after opening
    it until rank 0 opens its own (after its reclaim), and rank 0 lists the directory only once
    rank 1's file exists."""

    def __init__(self, rank, gates):
        super().__init__()
        self.rank, self.gates = rank, gates
        self.log = []
        self.listings = []
        os.makedirs(gates, exist_ok=True)

    def _signal(self, name):
        with open(os.path.join(self.gates, name), "w"):
            pass

    def _wait(self, name):
        deadline = time.monotonic() + 60
        while not os.path.exists(os.path.join(self.gates, name)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank {self.rank}: the other rank never signalled {name}")
            time.sleep(0.01)

    @contextmanager
    def create_stream(self, path, mode):
        name = os.path.basename(str(path))
        first_data_file = mode == "wb" and name.endswith(".distcp") and not self._data_files_opened()
        self.log.append(("open", name, mode))
        with super().create_stream(path, mode) as stream:
            if first_data_file and self.rank == 0:
                self._signal("rank0_reclaimed")
            if first_data_file and self.rank == 1:
                self._signal("rank1_writing")
                self._wait("rank0_reclaimed")
            yield stream

    def _data_files_opened(self):
        return [name for kind, name, mode in self.log if kind == "open" and mode == "wb" and name.endswith(".distcp")]

    def ls(self, path):
        if self.rank == 0 and not self.listings:
            self._wait("rank1_writing")
        entries = sorted(os.path.basename(e) for e in super().ls(path))
        self.listings.append(entries)
        return [str(self.concat_path(path, e)) for e in entries]

    def rm_file(self, path):
        self.log.append(("rm_file", os.path.basename(str(path)), None))
        super().rm_file(path)

    def before_first_write(self, kind):
        first = next(i for i, (k, name, mode) in enumerate(self.log) if k == "open" and mode == "wb")
        return [name for k, name, _ in self.log[:first] if k == kind]

    def first_data_file(self):
        return next(name for k, name, mode in self.log if k == "open" and mode == "wb" and name.endswith(".distcp"))


def rank_state(rank, generation):
    return {f"w{rank}": torch.arange(24, dtype=torch.float32).reshape(4, 6) * generation + rank, "epoch": generation}


_RECLAIM_WORKER = r"""
import os, sys, warnings
REPO, OUT, INIT, RANK = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
import faulthandler
faulthandler.dump_traceback_later(int(sys.argv[5]), exit=True)
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]
warnings.simplefilter("ignore")
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from dcp_filesystem import FileSystem, FileSystemReader, FileSystemWriter, SerializationFormat, _save_lock
from helpers import SAVE_HAS_USE_COLLECTIVES, dcp_load, dcp_save, probe_stock_torch
from test_distributed import GatedFS, object_collectives_without_numpy, rank_state

object_collectives_without_numpy()
probe_stock_torch()
dist.init_process_group("gloo", init_method="file://" + INIT, rank=RANK, world_size=2)

cases = [("torch_save", True), ("safetensors", True)]
if SAVE_HAS_USE_COLLECTIVES:
    cases.append(("safetensors", False))
results = {}
for fmt, collectives in cases:
    case = fmt if collectives else fmt + "_rank_local"
    path = os.path.join(OUT, case)

    def save(state, writer):
        if collectives:
            dcp_save(state, writer)
        else:
            dcp.save(state, storage_writer=writer, use_collectives=False)

    save(rank_state(RANK, 1), FileSystemWriter(path, serialization_format=SerializationFormat(fmt)))
    dist.barrier()
    # What a save killed on this rank left: a data file of this rank's that no metadata names.
    with open(os.path.join(path, "__%d_0.0badc0de.distcp" % RANK), "wb") as f:
        f.write(bytes(4096))
    dist.barrier()
    fs = GatedFS(RANK, os.path.join(OUT, case + ".gates"))
    writer = FileSystemWriter(path, serialization_format=SerializationFormat(fmt))
    writer.fs = fs
    save(rank_state(RANK, 2), writer)
    dist.barrier()
    target = {k: (torch.zeros_like(v) if isinstance(v, torch.Tensor) else None) for k, v in rank_state(RANK, 0).items()}
    if collectives:
        dcp_load(target, FileSystemReader(path))
    else:
        dcp.load(target, storage_reader=FileSystemReader(path))  # falls back to __{rank}.metadata
    results[case] = {
        "removed_before_writing": fs.before_first_write("rm_file"),
        "removed": [name for kind, name, _ in fs.log if kind == "rm_file"],
        "first_listing": fs.listings[0] if fs.listings else None,
        "new_file": fs.first_data_file(),
        "files": sorted(os.listdir(path)),
        "loaded": target,
    }
    dist.barrier()

torch.save(results, os.path.join(OUT, "rank%d.pt" % RANK))
dist.barrier()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
"""


@pytest.fixture(scope="module")
def reclaiming_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("reclaim")
    return run_two_ranks(_RECLAIM_WORKER, out)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["torch_save", "safetensors", "safetensors_rank_local"])
def test_each_rank_reclaims_only_its_own_leftovers_never_a_file_being_written(reclaiming_ranks, case):
    if case not in reclaiming_ranks[0]:
        pytest.skip("this torch's dcp.save has no use_collectives argument")
    r0, r1 = (results[case] for results in reclaiming_ranks)
    # Each rank removed its own leftover before it wrote, and nothing else.
    assert r0["removed_before_writing"] == ["__0_0.0badc0de.distcp"]
    assert r1["removed_before_writing"] == ["__1_0.0badc0de.distcp"]
    # Rank 0 reclaimed while rank 1's new file was open and empty, and left it alone.
    assert r1["new_file"] in r0["first_listing"] and r1["new_file"].startswith("__1_0.")
    assert r1["new_file"] not in r0["removed"] + r1["removed"]
    if case.endswith("rank_local"):
        expected = ["__0.metadata", r0["new_file"], "__1.metadata", r1["new_file"]]
    else:
        expected = [".metadata", r0["new_file"], r1["new_file"]]
        # The coordinator removed the first save's files after the commit.
        assert sorted(r0["removed"]) == ["__0_0.0badc0de.distcp", "__0_0.distcp", "__1_0.distcp"]
    assert r0["files"] == r1["files"] == sorted(expected)
    for rank, got in enumerate((r0, r1)):
        assert_state_equal(rank_state(rank, 2), got["loaded"])

"""Checkpoints saved by 2 and 3 gloo ranks, loaded by 1, 2, 3 and 4 into dim-0 and dim-1 sharded DTensors:
bit-exact, and a dim-0 load reads little more than the bytes each rank needs (partial reads)."""
import json

import pytest
import torch
from test_distributed import HAS_DTENSOR, run_ranks

from dcp_filesystem import _checksum

FORMATS = ["torch_save", "safetensors"]
ROWS, COLS = 96, 8448  # divisible by 1, 2, 3 and 4 (so are 24 and 4092); a chunk of "a" saved by 2 or 3 ranks: > 1 MiB


def full_tensors():
    gen = torch.Generator().manual_seed(11)
    return {
        "a": torch.randn(ROWS, COLS, generator=gen),  # float32, 3.1 MB: chunks with block checksums
        "b": torch.randn(24, 4092, generator=gen).to(torch.bfloat16),  # small chunks: item checksums only
    }


_WORKER = r"""
import json, os, sys
REPO, OUT, INIT, RANK, TIMEOUT, WORLD, ACTIONS = sys.argv[1:8]
RANK, WORLD = int(RANK), int(WORLD)
import faulthandler
faulthandler.dump_traceback_later(int(TIMEOUT), exit=True)
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]
import warnings
warnings.simplefilter("ignore")
import torch
import torch.distributed as dist
from dcp_filesystem import FileSystemReader, FileSystemWriter, SerializationFormat, _data_file
from helpers import dcp_load, dcp_save, probe_stock_torch
from test_distributed import _dtensor_api, object_collectives_without_numpy
from test_resharding import full_tensors

object_collectives_without_numpy()
probe_stock_torch()
dist.init_process_group("gloo", init_method="file://" + INIT, rank=RANK, world_size=WORLD)
api = _dtensor_api()
try:
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (WORLD,))
except ImportError:
    mesh = api.DeviceMesh("cpu", list(range(WORLD)))

reads = []
real = _data_file.DataFile.readinto_with_crc
def spy(self, offset, view, with_crc):
    reads.append(len(view))
    return real(self, offset, view, with_crc)
_data_file.DataFile.readinto_with_crc = spy

def dtensor(full, dim):
    # From each rank's own part: torch 2.1's distribute_tensor scatters over gloo, which refuses bfloat16.
    local = torch.chunk(full, WORLD, dim)[RANK].contiguous()
    return api.DTensor.from_local(local, mesh, [api.Shard(dim)], run_check=False)

def sharded(dim):
    return {name: dtensor(t, dim) for name, t in full_tensors().items()}

results = {}
for action in json.loads(ACTIONS):
    kind, name, fmt, dim = action
    path = os.path.join(OUT, name + "-" + fmt)
    if kind == "save":
        dcp_save(sharded(dim), FileSystemWriter(path, serialization_format=SerializationFormat(fmt)))
    else:
        target = {k: dtensor(torch.zeros_like(t), dim) for k, t in full_tensors().items()}
        reads.clear()
        dcp_load(target, FileSystemReader(path))
        results["%s-%s-%d" % (name, fmt, dim)] = {
            "local": {k: t.to_local().clone() for k, t in target.items()}, "read": sum(reads),
        }
    dist.barrier()
torch.save(results, os.path.join(OUT, "rank%d.pt" % RANK))
dist.barrier()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
"""


def _actions(*actions):
    return json.dumps([list(a) for a in actions])


@pytest.fixture(scope="module")
def resharded(tmp_path_factory):
    if not HAS_DTENSOR:
        pytest.skip("this torch has no torch.distributed DTensor API (distribute_tensor, Shard, DeviceMesh)")
    out = tmp_path_factory.mktemp("reshard")
    loads = {}

    def run(world, *actions):
        for rank, result in enumerate(run_ranks(_WORKER, out, world, [str(world), _actions(*actions)])):
            for key, value in result.items():
                loads.setdefault((world, key), {})[rank] = value

    saves = [("save", name, fmt, 0) for name in ("two", "three") for fmt in FORMATS]
    loads_of = [("load", name, fmt, dim) for name in ("two", "three") for fmt in FORMATS for dim in (0, 1)]
    run(2, *[a for a in saves if a[1] == "two"])
    run(3, *[a for a in saves if a[1] == "three"], *[a for a in loads_of if a[1] == "two"])
    run(4, *loads_of)
    run(1, *loads_of)
    run(2, *[a for a in loads_of if a[1] == "three"])
    return loads


CASES = [(w, src, fmt, dim) for w in (1, 2, 3, 4) for src in ("two", "three") for fmt in FORMATS for dim in (0, 1)
         if not (w == 2 and src == "two") and not (w == 3 and src == "three")]


@pytest.mark.slow
@pytest.mark.parametrize("world,src,fmt,dim", CASES)
def test_resharded_loads_are_bit_exact(resharded, world, src, fmt, dim):
    ranks = resharded[(world, f"{src}-{fmt}-{dim}")]
    assert sorted(ranks) == list(range(world))
    for rank, result in ranks.items():
        for name, full in full_tensors().items():
            expected = torch.chunk(full, world, dim)[rank]
            got = result["local"][name]
            assert got.dtype == expected.dtype and torch.equal(got.view(torch.uint8), expected.contiguous().view(
                torch.uint8)), (rank, name)


@pytest.mark.slow
@pytest.mark.parametrize("world,src,fmt", [(w, s, f) for w, s, f, d in CASES if d == 0])
def test_dim0_loads_read_little_more_than_each_rank_needs(resharded, world, src, fmt):
    """Each rank reads the rows of "a" it needs, widened to whole checksum blocks, plus the small "b" chunks
    it touches whole (they have no block checksums) and, for torch.save archives, each archive's records."""
    saved_by = {"two": 2, "three": 3}[src]
    b_chunk = 24 // saved_by * 4092 * 2
    for rank, result in resharded[(world, f"{src}-{fmt}-0")].items():
        needed_a = ROWS // world * COLS * 4
        chunks_a = len({(rank * ROWS // world + r) * saved_by // ROWS for r in range(ROWS // world)})
        b_rows = range(rank * 24 // world, (rank + 1) * 24 // world)
        chunks_b = len({r * saved_by // 24 for r in b_rows})
        overhead = (chunks_a + chunks_b) * ((40 << 10) if fmt == "torch_save" else 64)
        allowed = needed_a + chunks_a * 2 * _checksum.BLOCK_BYTES + chunks_b * b_chunk + overhead
        assert needed_a <= result["read"] <= allowed, (rank, result["read"], needed_a, allowed)

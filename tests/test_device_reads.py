"""Loads into device tensors through pinned buffers (dcp_filesystem._device_reads), on a fake privateuse1 device.

The fake device (tests/fake_device.py: "fakedev", two devices, in a subprocess of its own) has tensors
that hold a CPU tensor, and streams that queue every non-blocking copy and run it only when an event
recorded after it or the stream is synchronized; the test supplies the pinned allocator it lacks. So a
buffer refilled before the copy out of it ran, or a tensor committed before its copies ran, shows up as
wrong bytes.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from fake_device import run as run_on_fake_device

_SCRIPT = r"""
import ctypes, os, threading, zlib
import torch
import fake_device
from fake_device import Event, FakeTensor, log, streams, violations

fake_device.install()
DEV, CURRENT = fake_device.DEVICES, fake_device.CURRENT

from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

import dcp_filesystem
from dcp_filesystem import FileSystemReader, FileSystemWriter, SerializationFormat, _compat, _data_file, _device_reads
from helpers import dcp_load, dcp_save

dcp_filesystem._parallel._BYTES_PER_THREAD = 1  # these small checkpoints still get every thread asked for
out = {"real_allocator": repr(_compat.pinned_host_allocator("fakedev")),
       "available_device_type": _compat.available_device_type()}

BUFFER = 64 << 10
_device_reads._BUFFER_BYTES = BUFFER
allocs = []


def fake_pinned(nbytes):
    t = torch.empty(nbytes, dtype=torch.uint8)
    allocs.append((nbytes, t.data_ptr(), threading.get_ident()))
    log.append(("alloc", nbytes, t.data_ptr()))
    return t


real_allocator = _compat.pinned_host_allocator

real_read = _data_file.DataFile.readinto_with_crc


def spy_read(self, offset, view, with_crc):
    if len(view):
        start = ctypes.addressof(ctypes.c_char.from_buffer(view))
        log.append(("fill", start, len(view), threading.get_ident()))
    return real_read(self, offset, view, with_crc)


_data_file.DataFile.readinto_with_crc = spy_read

real_read_into = _device_reads.DeviceReads.read_into


def spy_read_into(self, target, read, offset, nbytes, with_crc):
    log.append(("read_into", str(target.device), nbytes, threading.get_ident()))
    return real_read_into(self, target, read, offset, nbytes, with_crc)


_device_reads.DeviceReads.read_into = spy_read_into


def saved():
    g = torch.Generator().manual_seed(19)
    return {
        "big": torch.randn(512, 640, generator=g),                                # 1.25 MiB f32, 20 buffers
        "bf16": torch.randn(700, 1000, generator=g).to(torch.bfloat16),           # on device 1
        "view": torch.randn(600, 640, generator=g),                                # into a contiguous view
        "strided": torch.randn(640, 1000, generator=g).to(torch.bfloat16),        # into a non-contiguous view
        "scalar": torch.tensor(-2.75, dtype=torch.float64),
        "empty": torch.empty(0, 3),
        "small": torch.arange(10, dtype=torch.int64) - 5,
        "step": 3,
    }


def raw(t):
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def targets():
    view_base = FakeTensor(torch.zeros(605, 640), DEV[0])
    strided_base = FakeTensor(torch.zeros(640, 1100, dtype=torch.bfloat16), DEV[1])
    state = {
        "big": FakeTensor(torch.zeros(512, 640), DEV[0]),
        "bf16": FakeTensor(torch.zeros(700, 1000, dtype=torch.bfloat16), DEV[1]),
        "view": view_base.narrow(0, 3, 600),
        "strided": strided_base.narrow(1, 50, 1000),
        "scalar": FakeTensor(torch.zeros((), dtype=torch.float64), DEV[1]),
        "empty": FakeTensor(torch.empty(0, 3), DEV[0]),
        "small": FakeTensor(torch.zeros(10, dtype=torch.int64), DEV[0]),
        "step": None,
    }
    return state, view_base, strided_base


EXPECTED = saved()


class RecordingPlanner(DefaultLoadPlanner):
    def commit_tensor(self, read_item, tensor):
        fqn = read_item.storage_index.fqn
        me = threading.get_ident()  # the other reader thread's copies may well be in flight
        pending = sum(s.issued - s.done for s in streams + CURRENT if s.thread == me or s in CURRENT)
        exact = torch.equal(raw(tensor.inner), raw(EXPECTED[fqn]))
        log.append(("commit", fqn, pending, exact, str(tensor.device), threading.get_ident()))
        super().commit_tensor(read_item, tensor)


def summary(view_base, strided_base, state):
    loaded = {k: (v.inner if isinstance(v, FakeTensor) else v) for k, v in state.items()}
    return {
        "exact": {k: (torch.equal(raw(loaded[k]), raw(v)) and loaded[k].dtype == v.dtype
                      and loaded[k].shape == v.shape) if isinstance(v, torch.Tensor) else loaded[k] == v
                  for k, v in EXPECTED.items()},
        "devices": {k: str(v.device) for k, v in state.items() if isinstance(v, torch.Tensor)},
        "view_base_untouched": bool((view_base.inner[:3] == 0).all() and (view_base.inner[603:] == 0).all()),
        "strided_base_untouched": bool((strided_base.inner[:, :50] == 0).all()
                                       and (strided_base.inner[:, 1050:] == 0).all()),
    }


def run_load(path, threads, with_allocator):
    del log[:], violations[:], streams[:], allocs[:]
    Event.made = 0
    _compat.pinned_host_allocator = (lambda device_type: fake_pinned if device_type == "fakedev" else None) \
        if with_allocator else real_allocator
    state, view_base, strided_base = targets()
    error = None
    try:
        dcp_load(state, FileSystemReader(path, thread_count=threads), planner=RecordingPlanner())
    except BaseException as e:
        error = str(e)
    result = summary(view_base, strided_base, state)
    result.update({
        "error": error,
        "log": [list(e) for e in log],
        "violations": violations[:],
        "allocs": [list(a) for a in allocs],
        "streams": [{"name": s.name, "device": str(s.device), "thread": s.thread, "pending": s.issued - s.done}
                    for s in streams],
        "events_made": Event.made,
    })
    return result


for fmt in ("TORCH_SAVE", "SAFETENSORS"):
    for threads in (1, 2):
        path = os.path.join(CKPT, "%s-%d" % (fmt, threads))
        dcp_save(saved(), FileSystemWriter(path, thread_count=threads,
                                           serialization_format=getattr(SerializationFormat, fmt)))
        out["%s-%d" % (fmt, threads)] = run_load(path, threads, True)
    out["%s-unpinned" % fmt] = run_load(os.path.join(CKPT, "%s-1" % fmt), 1, False)

# A flipped byte in the stored bytes of "big" (torch.save): the CRC-32 fails before commit_tensor.
path = os.path.join(CKPT, "TORCH_SAVE-1")
md = FileSystemReader(path).read_metadata()
(info,) = [v for k, v in md.storage_data.items() if k.fqn == "big"]
data_file = os.path.join(path, info.relative_path)
with open(data_file, "r+b") as f:
    f.seek(info.offset + info.length // 2)
    byte = f.read(1)
    f.seek(info.offset + info.length // 2)
    f.write(bytes([byte[0] ^ 0x10]))
out["crc"] = run_load(path, 1, True)

# Straight to the module: an empty or 0-d target, a short file.
del streams[:], allocs[:]
_compat.pinned_host_allocator = lambda device_type: fake_pinned
reads = _device_reads.DeviceReads()
content = bytes(range(256)) * 5
def read(offset, view, with_crc):
    part = content[offset : offset + len(view)]
    view[: len(part)] = part
    return len(part), zlib.crc32(part) if with_crc else 0
empty = FakeTensor(torch.empty(0, 3), DEV[1])
scalar = FakeTensor(torch.zeros((), dtype=torch.float64), DEV[1])
short = FakeTensor(torch.zeros(1000, dtype=torch.uint8), DEV[0])
out["direct"] = {
    "empty": list(reads.read_into(empty, read, 0, 0, True)),
    "streams_after_empty": len(streams),
    "scalar": list(reads.read_into(scalar, read, 3, 8, True)),
    "scalar_bytes": list(raw(scalar.inner).tolist()),
    "short": list(reads.read_into(short, read, 700, 1000, True)),
    "short_bytes": raw(short.inner).tolist(),
    "allocs": len(allocs),
    "pending": [s.issued - s.done for s in streams],
}
out["crc"]["data_file"] = data_file
fake_device.report(out)
"""

BUFFER = 64 << 10
DEVICE_OF = {"big": "fakedev:0", "bf16": "fakedev:1", "view": "fakedev:0", "strided": "fakedev:1",
             "scalar": "fakedev:1", "empty": "fakedev:0", "small": "fakedev:0"}
# What goes through the pinned buffers: whole stored tensors read in place (torch.save archives of 1 MiB
# and more; every safetensors entry), with its bytes.
PINNED = {
    "TORCH_SAVE": {"big": 512 * 640 * 4, "bf16": 700 * 1000 * 2, "view": 600 * 640 * 4, "strided": 640 * 1000 * 2},
}
PINNED["SAFETENSORS"] = dict(PINNED["TORCH_SAVE"], scalar=8, small=80)
# DCP plans no read for an empty tensor: it never reaches the storage layer.
COMMITTED = sorted(set(DEVICE_OF) - {"empty"})


# The tests of these loads are marked slow: the fake device's process takes about 6 s.
@pytest.fixture(scope="module")
def fake_loads(tmp_path_factory):
    return run_on_fake_device(_SCRIPT, tmp_path_factory.mktemp("fakedev_reads"), tensors=True)


CASES = [f"{fmt}-{threads}" for fmt in ("TORCH_SAVE", "SAFETENSORS") for threads in (1, 2)]


def _items(got):
    """fqn -> the read_into calls made for it: on each thread, the reads since its previous commit."""
    items, pending = {}, {}
    for entry in got["log"]:
        if entry[0] == "read_into":
            pending.setdefault(entry[3], []).append(entry[1:3])
        elif entry[0] == "commit":
            items[entry[1]] = pending.pop(entry[5], [])
    return items


@pytest.mark.slow
def test_the_fake_device_cannot_pin_by_itself(fake_loads):
    assert fake_loads["available_device_type"] == "fakedev"
    assert fake_loads["real_allocator"] == "None"


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_values_bit_exact_on_two_devices(fake_loads, case):
    got = fake_loads[case]
    assert got["error"] is None
    assert got["exact"] == {k: True for k in ("big", "bf16", "view", "strided", "scalar", "empty", "small", "step")}
    assert got["devices"] == DEVICE_OF  # loaded in place: the caller's tensors, on their devices
    assert got["view_base_untouched"] and got["strided_base_untouched"]
    assert got["violations"] == []


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_pinned_path_taken_for_whole_stored_tensors(fake_loads, case):
    got = fake_loads[case]
    fmt = case.split("-")[0]
    read_into = {fqn: calls for fqn, calls in _items(got).items() if calls}
    assert read_into == {fqn: [[DEVICE_OF[fqn], nbytes]] for fqn, nbytes in PINNED[fmt].items()}
    # The non-contiguous target ("strided") is filled through a contiguous device temporary: one
    # device-to-device copy, on the copy stream of its device.
    device_copies = [e[2:4] + [e[6]] for e in got["log"] if e[0] == "copy_issued" and not e[4]]
    assert device_copies == [["fakedev:1", "fakedev:1", PINNED[fmt]["strided"]]]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_every_copy_done_and_correct_before_commit(fake_loads, case):
    got = fake_loads[case]
    commits = [e for e in got["log"] if e[0] == "commit"]
    assert sorted(e[1] for e in commits) == COMMITTED
    for _, fqn, pending, exact, device, _ in commits:
        assert (fqn, pending, exact, device) == (fqn, 0, True, DEVICE_OF[fqn])
    assert all(s["pending"] == 0 for s in got["streams"])


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_buffers_bounded_and_reused(fake_loads, case):
    got = fake_loads[case]
    threads = int(case.split("-")[1])
    allocs = got["allocs"]
    assert [a[0] for a in allocs] == [BUFFER] * len(allocs)
    # Two buffers per data file (each read by one thread), allocated on first use, never more.
    per_thread = {}
    for _, ptr, thread in allocs:
        per_thread.setdefault(thread, []).append(ptr)
    assert 1 <= len(per_thread) <= threads
    assert len(allocs) == 2 * threads  # each file holds a tensor larger than two buffers
    buffers = {ptr: thread for _, ptr, thread in allocs}
    copies = [e for e in got["log"] if e[0] == "copy_issued" and e[4]]
    # Every host-to-device copy comes out of one of those buffers, within its bound, from its own thread.
    for _, _, _, _, _, src, nbytes, thread in copies:
        (base,) = [ptr for ptr in buffers if ptr <= src < ptr + BUFFER]
        assert src == base and 0 < nbytes <= BUFFER and buffers[base] == thread
    total = sum(PINNED[case.split("-")[0]].values())
    assert sum(e[6] for e in copies) == total
    assert len(copies) == sum(-(-n // BUFFER) for n in PINNED[case.split("-")[0]].values())
    assert len(copies) > 2 * threads  # so buffers were reused


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_buffer_refilled_only_after_its_copy_ran(fake_loads, case):
    """Replays the log: when a pinned buffer is filled again, every copy out of it has run (its event waited)."""
    got = fake_loads[case]
    buffers = [(ptr, ptr + BUFFER) for _, ptr, _ in got["allocs"]]
    issued = {}  # stream -> source buffer address of each copy issued on it (None: device to device)
    done = {}  # stream -> how many of those copies have run
    fills = waits = 0
    for entry in got["log"]:
        kind = entry[0]
        if kind == "copy_issued":
            issued.setdefault(entry[1], []).append(entry[5] if entry[4] else None)
        elif kind == "stream_sync":
            done[entry[1]] = len(issued.get(entry[1], []))
        elif kind == "event_sync":
            waits += 1
            done[entry[1]] = max(done.get(entry[1], 0), entry[2])
        elif kind == "fill":
            inside = [(lo, hi) for lo, hi in buffers if lo <= entry[1] < hi]
            if not inside:
                continue  # a read into something else (read-ahead, a CPU target)
            ((lo, hi),) = inside
            fills += 1
            for stream, sources in issued.items():
                queued = sources[done.get(stream, 0) :]
                assert not any(src is not None and lo <= src < hi for src in queued), (entry, stream)
    assert fills > len(buffers) and waits > 0
    assert got["violations"] == []


@pytest.mark.slow
def test_streams_one_per_device_and_thread_and_ordered_after_current(fake_loads):
    for case in CASES:
        got = fake_loads[case]
        threads = int(case.split("-")[1])
        streams = got["streams"]
        assert {s["device"] for s in streams} == {"fakedev:0", "fakedev:1"}
        assert len(streams) <= 2 * threads
        for e in got["log"]:
            if e[0] == "copy_issued":
                assert e[2] == e[3]  # on a stream of the target's device
                (stream,) = [s for s in streams if s["name"] == e[1]]
                assert stream["thread"] == e[7]  # made by the thread that copies on it
        # Between an item's read_into and its first copy, its copy stream waited on the current stream of
        # the target's device (which may still be writing the target).
        since_read = {}  # thread -> log entries since its last read_into, or None once its first copy was seen
        checked = 0
        for e in got["log"]:
            if e[0] == "read_into":
                since_read[e[3]] = []
            elif e[0] == "copy_issued" and since_read.get(e[7]) is not None:
                assert ["wait_stream", e[1], "current@" + e[2][-1]] in since_read[e[7]], (case, e)
                since_read[e[7]] = None
                checked += 1
            else:
                for entries in since_read.values():
                    if entries is not None:
                        entries.append(e)
        assert checked == len(PINNED[case.split("-")[0]])


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["TORCH_SAVE", "SAFETENSORS"])
def test_without_pinned_memory_the_decoded_tensor_is_copied(fake_loads, fmt):
    got = fake_loads[f"{fmt}-unpinned"]
    assert got["error"] is None
    assert all(got["exact"].values()) and got["devices"] == DEVICE_OF
    assert got["allocs"] == [] and got["streams"] == [] and got["events_made"] == 0
    assert [e for e in got["log"] if e[0] in ("read_into", "copy_issued")] == []


@pytest.mark.slow
def test_flipped_byte_fails_the_crc_before_commit(fake_loads):
    got = fake_loads["crc"]
    item = f"{got['data_file']}: item 'big' (chunk at [0, 0])"
    assert f"{item}: checksum mismatch: its " in got["error"]
    assert "big" not in [e[1] for e in got["log"] if e[0] == "commit"]
    assert all(s["pending"] == 0 for s in got["streams"])  # the copies were waited for, also on error


@pytest.mark.slow
def test_module_direct_empty_scalar_and_short_read(fake_loads):
    """read_into on its own: no work for 0 bytes; a 0-d target; a file that ends early (fewer bytes back)."""
    got = fake_loads["direct"]
    content = bytes(range(256)) * 5
    assert got["empty"] == [0, 0] and got["streams_after_empty"] == 0
    assert got["scalar"] == [8, zlib.crc32(content[3:11])] and got["scalar_bytes"] == list(content[3:11])
    assert got["short"] == [580, zlib.crc32(content[700:])]
    assert got["short_bytes"] == list(content[700:]) + [0] * 420
    assert got["allocs"] == 1 and got["pending"] == [0, 0]


def test_no_pinned_memory_without_an_accelerator():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: it has pinned memory")
    from dcp_filesystem import _compat
    from dcp_filesystem._device_reads import DeviceReads

    if _compat.available_device_type() is not None:
        pytest.skip("a privateuse1 device is available in this process")
    assert _compat.pinned_host_allocator("cuda") is None
    assert _compat.pinned_host_allocator("meta") is None
    assert not DeviceReads.accepts(torch.zeros(3))
    assert not DeviceReads.accepts(torch.zeros(3, device="meta"))

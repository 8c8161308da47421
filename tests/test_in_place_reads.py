"""Large torch.save items are read straight into their destination, CRC-checked; everything else falls back."""
import os
import zlib

import pytest
import torch
from helpers import assert_state_equal, dcp_load, dcp_save, strip_checksums

from dcp_filesystem import (
    FileSystem,
    FileSystemReader,
    FileSystemWriter,
    _crc,
    _item,
    _parallel,
    _safetensors,
    _torch_save,
)
from dcp_filesystem._torch_save import archive_members

BIG = (512, 1024)  # 2 MiB of float32: above the in-place threshold


def big_state():
    gen = torch.Generator().manual_seed(1)
    return {"big": torch.randn(*BIG, generator=gen), "small": torch.arange(10), "step": 3}


def destination():
    return {"big": torch.zeros(*BIG), "small": torch.zeros(10, dtype=torch.int64), "step": 0}


@pytest.fixture
def small_parts(monkeypatch):
    """Reads of a few KiB already split over three threads, in steps of 1000 bytes."""
    monkeypatch.setattr(_parallel, "_PART_BYTES", 4096)
    monkeypatch.setattr(_parallel, "_STEP_BYTES", 1000)
    monkeypatch.setattr(_parallel, "_CRC_STEP_BYTES", 1000)
    monkeypatch.setattr(_parallel, "_cores", lambda: 3)


@pytest.fixture
def decoded(monkeypatch):
    """The fqns whose payload was decoded in memory, then copied into the target (not read in place)."""
    seen = []
    real = _item.Item.fill

    def spy(self, target, tensor):
        seen.append(self.req.storage_index.fqn)
        return real(self, target, tensor)

    monkeypatch.setattr(_item.Item, "fill", spy)
    return seen


@pytest.mark.parametrize("parts", ["one", "three"])
def test_big_item_is_read_in_place_bit_exact(tmp_path, decoded, request, parts):
    if parts == "three":
        request.getfixturevalue("small_parts")
    state = big_state()
    dcp_save(state, FileSystemWriter(tmp_path))
    out = destination()
    target = out["big"]
    dcp_load(out, FileSystemReader(tmp_path))
    assert out["big"] is target
    assert_state_equal(state, out)
    assert "big" not in decoded  # "small" is decoded, or matches an archive decoded before


def test_stock_torch_archive_is_read_in_place_too(tmp_path, decoded):
    from torch.distributed.checkpoint import FileSystemWriter as StockWriter

    state = big_state()
    dcp_save(state, StockWriter(tmp_path))
    out = destination()
    dcp_load(out, FileSystemReader(tmp_path))
    assert_state_equal(state, out)
    assert "big" not in decoded  # "small" is decoded, or matches an archive decoded before


def _big_storage_range(path):
    md = FileSystemReader(path).read_metadata()
    (info,) = [v for k, v in md.storage_data.items() if k.fqn == "big"]
    data_file = path / info.relative_path
    raw = bytearray(data_file.read_bytes())
    members = archive_members(raw[info.offset : info.offset + info.length])
    ((start, size),) = [v for k, v in members.items() if k.endswith("/data/0")]
    return data_file, raw, info, info.offset + start, size


def _load_error(path):
    with pytest.raises(BaseException) as caught:
        dcp_load(destination(), FileSystemReader(path))
    return str(caught.value)


@pytest.mark.parametrize("checksums", [True, False], ids=["checksums", "older-without-checksums"])
@pytest.mark.parametrize("parts", ["one", "three"])
def test_flipped_storage_byte_fails_the_crc(tmp_path, request, parts, checksums):
    if parts == "three":
        request.getfixturevalue("small_parts")
    dcp_save(big_state(), FileSystemWriter(tmp_path))
    if not checksums:
        strip_checksums(tmp_path)
    data_file, raw, info, start, size = _big_storage_range(tmp_path)
    raw[start + size - 7] ^= 0x10
    data_file.write_bytes(bytes(raw))
    message = _load_error(tmp_path)
    if checksums:  # the item's checksum, joined from the storage's CRC-32 and the archive's edges
        item = f"{data_file}: item 'big' (chunk at [0, 0])"
        assert f"{item}: checksum mismatch: its {info.length} stored bytes at offset {info.offset}" in message
    else:
        item = f"{data_file}: cannot read item 'big' (chunk at [0, 0])"
        assert f"{item}: archive member 'archive/data/0' fails its CRC-32 check (damaged data)" in message


@pytest.mark.parametrize("checksums", [True, False], ids=["checksums", "older-without-checksums"])
def test_damaged_central_directory_is_a_clear_error(tmp_path, checksums):
    dcp_save(big_state(), FileSystemWriter(tmp_path))
    if not checksums:
        strip_checksums(tmp_path)
    data_file, raw, info, _, _ = _big_storage_range(tmp_path)
    end = info.offset + info.length
    raw[end - 22 : end - 18] = b"XXXX"  # the end-of-central-directory signature
    data_file.write_bytes(bytes(raw))
    message = _load_error(tmp_path)
    if checksums:  # the whole item is read and checked before its archive is parsed
        assert f"{data_file}: item 'big' (chunk at [0, 0]): checksum mismatch" in message
    else:
        item = f"{data_file}: cannot read item 'big' (chunk at [0, 0])"
        assert f"{item}: torch.save archive has no valid end-of-central" in message


def test_truncated_file_names_the_item(tmp_path):
    dcp_save({"big": big_state()["big"]}, FileSystemWriter(tmp_path))
    data_file, raw, info, _, _ = _big_storage_range(tmp_path)
    data_file.write_bytes(bytes(raw[: info.offset + info.length - 100]))
    with pytest.raises(BaseException) as caught:
        dcp_load({"big": torch.zeros(*BIG)}, FileSystemReader(tmp_path))
    assert f"{data_file}: item 'big' (chunk at [0, 0]) needs bytes [{info.offset}, {info.offset + info.length})" in (
        str(caught.value)
    )


@pytest.mark.parametrize(
    "saved,target",
    [
        (lambda t: t.t(), lambda t: torch.zeros(BIG[1], BIG[0])),  # stored non-contiguous
        (lambda t: t, lambda t: torch.zeros(BIG[1], BIG[0]).t()),  # destination non-contiguous
        (lambda t: t, lambda t: torch.zeros(*BIG, dtype=torch.float64)),  # destination of another dtype
    ],
    ids=["stored-transposed", "target-transposed", "target-float64"],
)
def test_what_cannot_go_in_place_is_decoded(tmp_path, decoded, saved, target):
    tensor = saved(big_state()["big"])
    dcp_save({"big": tensor}, FileSystemWriter(tmp_path))
    out = {"big": target(tensor)}
    dcp_load(out, FileSystemReader(tmp_path))
    assert torch.equal(out["big"], tensor.to(out["big"].dtype))
    assert decoded == ["big"]


def test_parallel_crc_equals_zlib(monkeypatch):
    monkeypatch.setattr(_parallel, "_PART_BYTES", 1000)
    monkeypatch.setattr(_parallel, "_cores", lambda: 3)
    for size in (0, 999, 2000, 2001, 7777, 30011):
        data = memoryview(os.urandom(size))
        assert _parallel.crc32_on_cores(data) == zlib.crc32(data), size
    # The cores are shared among jobs running at once: with 3 sharing, one part each.
    parts = []
    monkeypatch.setattr(_parallel, "run_in_threads", lambda tasks, name: parts.append(len(tasks)))
    _parallel.crc32_on_cores(memoryview(os.urandom(30011)), sharing=3)
    assert parts == []


def test_errors_of_every_thread_reach_the_caller():
    def fail(n):
        raise OSError(f"part {n} failed")

    with pytest.raises(OSError, match="part 1 failed"):
        _parallel.run_in_threads([lambda: 0, lambda: fail(1), lambda: fail(2)], "test")
    seen = []

    def work(item):
        seen.append(item)
        if item == 3:
            raise KeyError(item)

    with pytest.raises(KeyError):
        _parallel.for_each(range(100), work, 1, "test")
    assert seen == [0, 1, 2, 3]  # nothing started after the failure


@pytest.mark.parametrize("combine", ["installed", "python"])
def test_crc32_combine_equals_zlib_of_the_concatenation(combine):
    joined = _crc.crc32_combine if combine == "installed" else _crc._crc32_combine
    for first, second in ((0, 5), (5, 0), (1, 1), (100, 3), (1 << 20, 12345)):
        a, b = os.urandom(first), os.urandom(second)
        assert joined(zlib.crc32(a), zlib.crc32(b), second) == zlib.crc32(a + b)
        assert _crc.crc32(memoryview(a + b)) == zlib.crc32(a + b)  # zlib-ng's where installed: the same CRC-32


@pytest.mark.parametrize("with_crc", [True, False])
def test_parallel_into_equals_readinto_and_zlib(tmp_path, small_parts, with_crc):
    content = os.urandom(40000)
    path = tmp_path / "f"
    path.write_bytes(content)
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset, size in ((0, 0), (7, 999), (0, 4096), (100, 8193), (5, 12288), (3, 30011)):
            buffer = bytearray(size)
            got, crc = _parallel.pread_into(fd, offset, memoryview(buffer), with_crc)
            assert (got, bytes(buffer)) == (size, content[offset : offset + size]), (offset, size)
            assert crc == (zlib.crc32(content[offset : offset + size]) if with_crc else 0)
    finally:
        os.close(fd)


def test_parallel_into_past_the_end_reports_what_it_read(tmp_path, small_parts):
    content = os.urandom(5000)
    path = tmp_path / "f"
    path.write_bytes(content)
    fd = os.open(path, os.O_RDONLY)
    try:
        buffer = bytearray(15000)  # three parts of 5000: the first two partly covered, the last not at all
        got, crc = _parallel.pread_into(fd, 1000, memoryview(buffer), True)
    finally:
        os.close(fd)
    assert got == 4000
    assert bytes(buffer[:got]) == content[1000:]
    assert crc == zlib.crc32(content[1000:])


class _StreamsWithoutFileno(FileSystem):
    """A file system whose read streams are in-memory copies: no descriptor for positional reads."""

    def create_stream(self, path, mode):
        import contextlib
        import io

        if "r" not in mode:
            return super().create_stream(path, mode)
        return contextlib.nullcontext(io.BytesIO(open(path, "rb").read()))


def test_streams_without_a_descriptor_are_read_in_place_and_crc_checked(tmp_path, decoded):
    state = big_state()
    dcp_save(state, FileSystemWriter(tmp_path))
    out = destination()
    target = out["big"]
    fs_reader = FileSystemReader(tmp_path)
    fs_reader.fs = _StreamsWithoutFileno()
    dcp_load(out, fs_reader)
    assert out["big"] is target
    assert_state_equal(state, out)
    assert "big" not in decoded  # "small" is decoded, or matches an archive decoded before

    data_file, raw, _, start, size = _big_storage_range(tmp_path)
    raw[start + 5] ^= 0x01
    data_file.write_bytes(bytes(raw))
    fs_reader = FileSystemReader(tmp_path)
    fs_reader.fs = _StreamsWithoutFileno()
    with pytest.raises(BaseException) as caught:
        dcp_load(destination(), fs_reader)
    assert "item 'big' (chunk at [0, 0]): checksum mismatch" in str(caught.value)
    strip_checksums(tmp_path)
    with pytest.raises(BaseException) as caught:
        dcp_load(destination(), fs_reader)
    assert "archive member 'archive/data/0' fails its CRC-32 check (damaged data)" in str(caught.value)


@pytest.mark.parametrize("sharing,threads", [(1, 4), (2, 2), (3, 1), (8, 1)])
def test_pread_into_divides_the_cores_among_reads_running_at_once(tmp_path, monkeypatch, sharing, threads):
    import threading

    monkeypatch.setattr(_parallel, "_PART_BYTES", 4096)
    monkeypatch.setattr(_parallel, "_cores", lambda: 4)
    callers, real_preadv = set(), os.preadv

    def preadv(*args):
        callers.add(threading.current_thread())  # kept alive, so never confused with a later one
        return real_preadv(*args)

    monkeypatch.setattr(os, "preadv", preadv)
    content = os.urandom(64 << 10)
    path = tmp_path / "f"
    path.write_bytes(content)
    fd = os.open(path, os.O_RDONLY)
    try:
        buffer = bytearray(len(content))
        assert _parallel.pread_into(fd, 0, memoryview(buffer), True, sharing) == (len(content), zlib.crc32(content))
    finally:
        os.close(fd)
    assert bytes(buffer) == content
    assert len(callers) == threads


@pytest.mark.parametrize("writer", ["ours", "stock"])
def test_an_archive_is_read_front_to_back(tmp_path, data_file_reads, writer):
    """Its head places the storage; the storage, then the records after it, follow in one forward pass
    (a cold read never seeks back), and those records confirm where the storage was."""
    from torch.distributed.checkpoint import FileSystemWriter as StockWriter

    state = big_state()
    dcp_save(state, (FileSystemWriter if writer == "ours" else StockWriter)(tmp_path))
    _, _, info, start, size = _big_storage_range(tmp_path)
    out = destination()
    dcp_load(out, FileSystemReader(tmp_path))
    assert_state_equal(state, out)
    end = info.offset + info.length
    reads = [(o, n) for o, n in data_file_reads if info.offset <= o < end]
    head = [(info.offset, _safetensors.SNIFF_BYTES), (info.offset, _torch_save._ARCHIVE_EDGE_BYTES)]  # format, head
    assert reads == head + [(start, size), (start + size, end - start - size)]


def test_an_archive_whose_head_does_not_place_its_storage_is_read_by_its_edges(tmp_path, data_file_reads):
    """The storage record's local header renamed (the directory still names it): no guess from the head,
    so the edges are read first, then the storage; the load is bit-exact."""
    state = big_state()
    dcp_save(state, FileSystemWriter(tmp_path))
    strip_checksums(tmp_path)  # the renamed header is damage the item's checksum would report
    data_file, raw, info, start, size = _big_storage_range(tmp_path)
    name = raw.rfind(b"archive/data/0", info.offset, start)
    raw[name : name + 14] = b"archive/data/X"
    data_file.write_bytes(bytes(raw))
    out = destination()
    dcp_load(out, FileSystemReader(tmp_path))
    assert_state_equal(state, out)
    end = info.offset + info.length
    reads = [(o, n) for o, n in data_file_reads if info.offset <= o < end]
    edge = _torch_save._ARCHIVE_EDGE_BYTES
    assert reads == [(info.offset, _safetensors.SNIFF_BYTES), (info.offset, edge), (end - edge, edge), (start, size)]

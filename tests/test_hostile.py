"""Hostile or unlucky checkpoints: bombs, files outside the checkpoint, pipes, lying headers, wrong shapes."""
import importlib.util
import io
import json
import os
import pickle
import shutil
import struct
import threading
import tracemalloc
import zlib

import pytest
import torch
import torch.distributed.checkpoint.filesystem as torch_fs
from helpers import assert_state_equal, dcp_load, dcp_save

from dcp_filesystem import FileSystemReader, FileSystemWriter, SerializationFormat, _cli, _compat, _safetensors
from dcp_filesystem.transforms import ARCHIVE_RECORDS_BYTES, MAX_VALUE_BYTES

FORMATS = [SerializationFormat.TORCH_SAVE, SerializationFormat.SAFETENSORS]
HAS_ZSTD = importlib.util.find_spec("zstandard") is not None
needs_zstd = pytest.mark.skipif(not HAS_ZSTD, reason="ZStandard needs the zstandard package, not installed")


def make_state():
    gen = torch.Generator().manual_seed(0)
    return {"w": torch.randn(64, 32, generator=gen), "b": torch.arange(16), "step": 5}


def zeros_state():
    return {"w": torch.zeros(64, 32), "b": torch.zeros(16, dtype=torch.int64), "step": 0}


def load_error(path, out=None):
    with pytest.raises(BaseException) as info:  # DCP's CheckpointException is a BaseException
        dcp_load(zeros_state() if out is None else out, FileSystemReader(path))
    return str(info.value)


def verify(path, capsys):
    code = _cli.main(["verify", str(path)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def edit_item(path, fqn, **changes):
    """Change one item's storage info in a test-made (trusted) .metadata."""
    with open(path / ".metadata", "rb") as f:
        md = pickle.load(f)
    for index, info in md.storage_data.items():
        if index.fqn == fqn:
            vars(info).update(changes)
    with open(path / ".metadata", "wb") as f:
        pickle.dump(md, f)


def item_info(path, fqn):
    md = FileSystemReader(path).read_metadata()
    return next(info for index, info in md.storage_data.items() if index.fqn == fqn)


def append_payload(path, fqn, payload):
    """Put ``payload`` at the end of the item's data file and point the item (and its CRC) at it."""
    info = item_info(path, fqn)
    data_file = path / info.relative_path
    offset = data_file.stat().st_size
    with open(data_file, "ab") as f:
        f.write(payload)
    edit_item(path, fqn, offset=offset, length=len(payload), crc32=zlib.crc32(payload))


_BOMBS = {}


def zstd_bomb(nbytes):
    """A small zstd frame that decodes to ``nbytes`` zero bytes."""
    if nbytes not in _BOMBS:
        import zstandard

        out = io.BytesIO()
        step = 64 << 20
        with zstandard.ZstdCompressor(level=1).stream_writer(out, closefd=False) as writer:
            zeros = bytes(step)
            for _ in range(nbytes // step):
                writer.write(zeros)
        _BOMBS[nbytes] = out.getvalue()
    return _BOMBS[nbytes]


def zstd_writer(path):
    from dcp_filesystem.transforms import ZStandard

    return FileSystemWriter(path, _extensions=[ZStandard()])


def peak_bytes_of(fn):
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


# 2. Decompression bombs.


@needs_zstd
def test_a_zstd_bomb_in_place_of_a_tensor_stops_at_the_tensor_size(tmp_path, capsys):
    path = tmp_path / "c"
    dcp_save(make_state(), zstd_writer(path))
    bomb = zstd_bomb(1 << 30)
    assert len(bomb) < 1 << 20
    append_payload(path, "w", bomb)
    limit = 64 * 32 * 4 + ARCHIVE_RECORDS_BYTES
    expected = f"{path / '__0_0.distcp'}: cannot read item 'w' (chunk at [0, 0]): its {len(bomb)} stored bytes " \
               f"decode to more than {limit} bytes, " \
               f"the most a 8192-byte tensor and its archive's records may take (damaged or hostile checkpoint)"
    messages = []
    peak = peak_bytes_of(lambda: messages.append(load_error(path)))
    assert expected in messages[0]
    assert peak < 4 * limit + (16 << 20), peak
    code, out = verify(path, capsys)
    assert code == 1 and expected in out


@needs_zstd
def test_a_zstd_bomb_in_place_of_a_value_stops_at_the_value_bound(tmp_path, capsys):
    path = tmp_path / "c"
    dcp_save(make_state(), zstd_writer(path))
    bomb = zstd_bomb(MAX_VALUE_BYTES + (64 << 20))
    append_payload(path, "step", bomb)
    expected = f"{path / '__0_0.distcp'}: cannot read item 'step': its {len(bomb)} stored bytes decode to more " \
               f"than {MAX_VALUE_BYTES} bytes, the most a non-tensor value may take (damaged or hostile " \
               "checkpoint): decoding stopped there"
    messages = []
    peak = peak_bytes_of(lambda: messages.append(load_error(path)))
    assert expected in messages[0]
    assert peak < MAX_VALUE_BYTES + (256 << 20), peak
    code, out = verify(path, capsys)
    assert code == 1 and expected in out


@needs_zstd
def test_compressed_checkpoints_still_load_whole(tmp_path):
    path = tmp_path / "c"
    state = {"big": torch.zeros(1 << 20), "w": torch.randn(8, 8), "v": list(range(100_000))}
    dcp_save(state, zstd_writer(path))
    out = {"big": torch.ones(1 << 20), "w": torch.zeros(8, 8), "v": None}
    dcp_load(out, FileSystemReader(path))
    assert_state_equal(state, out)


# 3, 7. One confinement rule for loads and the command line.

ESCAPES = ["../secret.distcp", "/etc/hostname", "sub/../../secret.distcp", "link/secret.distcp", "a\0b.distcp"]


def hostile_names(tmp_path, escape):
    path = tmp_path / "c"
    dcp_save(make_state(), FileSystemWriter(path))
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "secret.distcp").write_bytes(b"secret")
    (outside / "secret.distcp").write_bytes(b"secret")
    os.symlink(outside, path / "link")
    edit_item(path, "w", relative_path=escape, offset=0, length=6, crc32=0)
    return path


def refused(path, escape):
    why = "is not a valid file name inside" if "\0" in escape else "is outside"
    return f"{path / '.metadata'}: item 'w' names storage file {escape!r}, which {why} the checkpoint directory {path}"


@pytest.mark.parametrize("escape", ESCAPES)
def test_loads_verify_and_inspect_refuse_files_outside_the_checkpoint(tmp_path, escape, capsys):
    path = hostile_names(tmp_path, escape)
    assert refused(path, escape) in load_error(path)
    code, out = verify(path, capsys)
    assert code == 1 and refused(path, escape) in out
    assert "CRC-32 0x" not in out  # nothing computed from the secret's bytes
    code = _cli.main(["inspect", str(path)])
    captured = capsys.readouterr()
    assert code == 1 and captured.err == f"error: {refused(path, escape)}\n"


# 4. Files that are not regular files.


def in_time(fn, seconds=20):
    """fn() in a thread; its result, or the test fails if it has not returned in ``seconds``."""
    result = {}

    def run():
        try:
            result["value"] = fn()
        except BaseException as e:
            result["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "blocked"
    return result


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
def test_a_named_pipe_instead_of_a_data_file_fails_at_once(tmp_path, fmt, capsys):
    path = tmp_path / "c"
    dcp_save(make_state(), FileSystemWriter(path, serialization_format=fmt))
    data_file = path / item_info(path, "w").relative_path
    data_file.unlink()
    os.mkfifo(data_file)
    expected = f"{data_file}: is a named pipe, not a regular file: checkpoints are read from regular files only"
    result = in_time(lambda: dcp_load(zeros_state(), FileSystemReader(path)))
    assert expected in str(result["error"])
    result = in_time(lambda: _cli.main(["verify", str(path)]))
    assert result["value"] == 1 and expected in capsys.readouterr().out


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_named_pipe_or_a_directory_as_metadata_fails_at_once(tmp_path):
    path = tmp_path / "c"
    path.mkdir()
    os.mkfifo(path / ".metadata")
    result = in_time(lambda: FileSystemReader(path).read_metadata())
    assert str(result["error"]) == f"{path / '.metadata'}: is a named pipe, not a regular file: checkpoints " \
                                   "are read from regular files only"
    (path / ".metadata").unlink()
    (path / ".metadata").mkdir()
    result = in_time(lambda: FileSystemReader(path).read_metadata())
    assert "is a directory, not a regular file" in str(result["error"])


# 5. Safetensors headers as strict as the safetensors library.


def header_file(entries, data_size):
    text = json.dumps({"__metadata__": {"format": "pt"}, **entries}).encode()
    return struct.pack("<Q", len(text)) + text + bytes(data_size)


def parse(raw):
    return _safetensors.read_header(lambda offset, n: raw[offset : offset + n], 0, len(raw), "f")


def entry(begin, end, shape):
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


def test_safetensors_headers_must_tile_their_data_section():
    good = header_file({"a": entry(0, 16, [4]), "b": entry(16, 48, [8])}, 48)
    assert sorted(parse(good).entries) == ["a", "b"]
    with pytest.raises(ValueError, match=r"^f: safetensors entry 'b' at data offsets \[8, 24\] overlaps the entry "
                                         r"before it \(the entries before it end at 16\)$"):
        parse(header_file({"a": entry(0, 16, [4]), "b": entry(8, 24, [4])}, 24))
    with pytest.raises(ValueError, match=r"^f: safetensors entry 'b' at data offsets \[20, 36\] leaves a gap"):
        parse(header_file({"a": entry(0, 16, [4]), "b": entry(20, 36, [4])}, 36))
    with pytest.raises(ValueError, match=r"^f: safetensors entries end at data offset 16, but the file's data "
                                         r"section has 20 bytes$"):
        parse(header_file({"a": entry(0, 16, [4])}, 20))


@pytest.mark.skipif(_compat.TorchSerializationFormat is None, reason="stock torch writes SAFETENSORS from 2.8 only")
@pytest.mark.skipif(importlib.util.find_spec("safetensors") is None, reason="safetensors is not installed")
def test_a_stock_safetensors_file_with_overlapping_entries_is_refused(tmp_path, capsys):
    path = tmp_path / "c"
    state = {"a": torch.arange(16, dtype=torch.float32), "b": torch.arange(16, 32, dtype=torch.float32)}
    writer = torch_fs.FileSystemWriter(path, serialization_format=torch_fs.SerializationFormat.SAFETENSORS)
    try:
        dcp_save(state, writer)
    except BaseException as e:
        if "numpy" in str(e):
            pytest.skip("stock torch's SAFETENSORS writer needs numpy, not installed")
        raise
    (data_file,) = [p for p in path.iterdir() if p.suffix == ".distcp"]
    raw = data_file.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    header["b"]["data_offsets"] = header["a"]["data_offsets"]  # b's entry now reads a's bytes
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= length
    data_file.write_bytes(raw[:8] + text + b" " * (length - len(text)) + raw[8 + length :])
    out = {"a": torch.zeros(16), "b": torch.zeros(16)}
    message = load_error(path, out)
    assert f"{data_file} (offset 0): safetensors entry " in message and "overlaps the entry before it" in message
    code, out_text = verify(path, capsys)
    assert code == 1 and "overlaps the entry before it" in out_text


# 6. Shapes checked on every torch.


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
@pytest.mark.parametrize("shape", [(32, 64), (128, 64), (64, 32)], ids=str)
def test_a_target_of_another_size_is_refused(tmp_path, fmt, shape):
    path = tmp_path / "c"
    dcp_save({"w": torch.randn(64, 64)}, FileSystemWriter(path, serialization_format=fmt))
    out = {"w": torch.full(shape, 7.0)}
    message = load_error(path, out)
    assert f"Size mismatch between saved torch.Size([64, 64]) and current: torch.Size({list(shape)}) for w" in message
    assert torch.equal(out["w"], torch.full(shape, 7.0))  # refused before anything was read


@pytest.mark.parametrize("shape", [(32, 64), (128, 64)], ids=str)
def test_what_stock_torch_does_with_a_target_of_another_size(tmp_path, shape):
    """As the README's per-version notes say: stock's planner refuses where it checks sizes (2.6 and newer
    here), and elsewhere fills the overlap and leaves the rest."""
    path = tmp_path / "c"
    saved = torch.randn(64, 64)
    dcp_save({"w": saved}, torch_fs.FileSystemWriter(path))
    out = {"w": torch.full(shape, 7.0)}
    if _compat.load_planner_checks_sizes():
        assert "Size mismatch between saved torch.Size([64, 64])" in load_error(path, out)
        return
    dcp_load(out, torch_fs.FileSystemReader(path))
    rows = min(shape[0], 64)
    assert torch.equal(out["w"][:rows], saved[:rows])
    assert torch.equal(out["w"][rows:], torch.full((shape[0] - rows, 64), 7.0))


# 8. File systems adopted from torch's FileSystemBase get every argument.


@pytest.mark.skipif(not hasattr(torch_fs, "FileSystemBase"), reason="this torch has no FileSystemBase")
def test_an_adopted_file_system_gets_every_argument(tmp_path):
    calls = []

    class Recording(torch_fs.FileSystem):
        def init_path(self, path, **kwargs):
            calls.append(("init_path", kwargs))
            return super().init_path(path)

        def create_stream(self, path, mode, *args, **kwargs):
            calls.append(("create_stream", kwargs))
            return super().create_stream(path, mode)

        def exists(self, path, **kwargs):  # torch 2.3's FileSystem has no exists of its own
            calls.append(("exists", kwargs))
            return os.path.exists(path)

    writer = FileSystemWriter(tmp_path / "c")
    writer.fs = Recording()
    path = writer.fs.init_path(tmp_path / "c", client_kwargs={"region": "x"}, key="k", secret="s")
    assert path == tmp_path / "c"
    assert not writer.fs.exists(tmp_path / "c" / "x", detail=True)
    writer.fs.mkdir(tmp_path / "c")
    with writer.fs.create_stream(tmp_path / "c" / "f", "wb", block_size=5) as f:
        f.write(b"x")
    assert calls == [
        ("init_path", {"client_kwargs": {"region": "x"}, "key": "k", "secret": "s"}),
        ("exists", {"detail": True}),
        ("create_stream", {"block_size": 5}),
    ]


def test_the_rules_do_not_refuse_an_ordinary_checkpoint(tmp_path, capsys):
    path = tmp_path / "c"
    state = make_state()
    dcp_save(state, FileSystemWriter(path))
    shutil.copytree(path, tmp_path / "copy")
    out = zeros_state()
    dcp_load(out, FileSystemReader(tmp_path / "copy"))
    assert_state_equal(state, out)
    code, out = verify(tmp_path / "copy", capsys)
    assert code == 0 and out.startswith("OK: 3 entries"), out

"""Damaged and hostile checkpoints raise clear errors naming the file and the item."""
import contextlib
import io
import os
import pickle
import random
import shutil
import struct

import pytest
import torch
from helpers import assert_state_equal, dcp_load, dcp_save, strip_checksums, strip_safetensors_marks

from dcp_filesystem import FileSystemReader, FileSystemWriter, SerializationFormat, _cli
from dcp_filesystem._torch_save import archive_members

FORMATS = [SerializationFormat.TORCH_SAVE, SerializationFormat.SAFETENSORS]


def make_state():
    gen = torch.Generator().manual_seed(0)
    return {"w": torch.randn(64, 32, generator=gen), "b": torch.arange(16), "step": 5}


def save(path, fmt=SerializationFormat.TORCH_SAVE, **kwargs):
    state = make_state()
    dcp_save(state, FileSystemWriter(path, serialization_format=fmt, **kwargs))
    return state


def load_error(path):
    """The error a load of ``path`` raises (DCP wraps it in CheckpointException, a BaseException)."""
    out = {"w": torch.zeros(64, 32), "b": torch.zeros(16, dtype=torch.int64), "step": 0}
    with pytest.raises(BaseException) as info:
        dcp_load(out, FileSystemReader(path))
    return str(info.value)


def storage_info(path, fqn):
    md = FileSystemReader(path).read_metadata()
    (info,) = [v for k, v in md.storage_data.items() if k.fqn == fqn]
    return info


def rewrite_metadata(path, fqn, **changes):
    """Edit one item's storage info in a test-made (trusted) .metadata."""
    with open(path / ".metadata", "rb") as f:
        md = pickle.load(f)
    for index, info in md.storage_data.items():
        if index.fqn == fqn:
            for name, value in changes.items():
                setattr(info, name, value)
    with open(path / ".metadata", "wb") as f:
        pickle.dump(md, f)


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_data_file_names_file_and_item(tmp_path, fmt):
    path = tmp_path / "c"
    save(path, fmt)
    info = storage_info(path, "w")
    data = path / info.relative_path
    with open(data, "r+b") as f:
        f.truncate(info.offset + info.length - 1)
    message = load_error(path)
    assert f"{data}: item 'w' (chunk at [0, 0]) needs bytes [{info.offset}, {info.offset + info.length})" in message
    assert f"but the file has {info.offset + info.length - 1} bytes (truncated or damaged checkpoint)" in message


def test_truncated_older_safetensors_file_fails_on_its_header(tmp_path):
    """Entries not marked as this package's are found by the header, checked against the file size first."""
    path = tmp_path / "c"
    save(path, SerializationFormat.SAFETENSORS)
    strip_safetensors_marks(path)
    info = storage_info(path, "w")
    data = path / info.relative_path
    with open(data, "r+b") as f:
        f.truncate(info.offset + info.length - 1)
    message = load_error(path)
    assert f"{data} (offset 0): safetensors entry 'w' has offsets" in message
    assert f"in a {info.offset + info.length - 1}-byte file" in message


def test_missing_data_file_names_it(tmp_path):
    path = tmp_path / "c"
    save(path)
    info = storage_info(path, "w")
    os.remove(path / info.relative_path)
    message = load_error(path)
    assert "No such file or directory" in message and info.relative_path in message


def test_item_range_past_its_file(tmp_path):
    path = tmp_path / "c"
    save(path)
    info = storage_info(path, "b")
    size = os.path.getsize(path / info.relative_path)
    rewrite_metadata(path, "b", length=size)
    assert f"item 'b' (chunk at [0]) needs bytes [{info.offset}, {info.offset + size})" in load_error(path)


@pytest.mark.parametrize("checksums", [True, False], ids=["checksums", "older-without-checksums"])
def test_flipped_tensor_byte_fails_crc_instead_of_loading_wrong_values(tmp_path, checksums):
    path = tmp_path / "c"
    save(path)
    if not checksums:
        strip_checksums(path)
    info = storage_info(path, "w")
    data = path / info.relative_path
    raw = bytearray(data.read_bytes())
    item = raw[info.offset : info.offset + info.length]
    start, _ = [v for k, v in archive_members(item).items() if "/data/" in k][0]
    raw[info.offset + start + 100] ^= 0x01
    data.write_bytes(bytes(raw))
    message = load_error(path)
    if checksums:
        assert f"{data}: item 'w' (chunk at [0, 0]): checksum mismatch: its {info.length} stored bytes" in message
    else:  # the archive's own CRC-32
        assert f"{data}: cannot read item 'w' (chunk at [0, 0])" in message and "fails its CRC-32 check" in message


def write_header(data, header_len_override=None, header=None, keep_tail=True):
    raw = data.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    body = raw[8 + n :]
    text = raw[8 : 8 + n] if header is None else header
    length = len(text) if header_len_override is None else header_len_override
    data.write_bytes(struct.pack("<Q", length) + text + (body if keep_tail else b""))


def only_data_file(path):
    (name,) = [p for p in os.listdir(path) if p.endswith(".distcp")]
    return path / name


def verify(path):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = _cli.main(["verify", str(path)])
    return code, out.getvalue()


MARKS = ["marked", "older-unmarked"]


def assert_damaged_header_reported(path, data, message, marks):
    """This package's SAFETENSORS entries are placed by the metadata and checked by their checksums: with a
    damaged header they still load bit-exact, and ``verify`` fails naming the file (stock torch and the
    safetensors library read the file by its header). Unmarked entries (older versions of this package)
    are found by the header: their load fails with ``message``."""
    if marks == "older-unmarked":
        strip_safetensors_marks(path)
        assert message in load_error(path)
        return
    out = {"w": torch.zeros(64, 32), "b": torch.zeros(16, dtype=torch.int64), "step": 0}
    dcp_load(out, FileSystemReader(path))
    assert_state_equal(make_state(), out)
    code, report = verify(path)
    assert code == 1, report
    (line,) = [line for line in report.splitlines() if line.startswith(f"{data.name}: ")]
    assert line.startswith(f"{data.name}: ValueError: {message}"), report
    assert report.splitlines()[-1] == "FAILED: 1 data file(s) whose safetensors header disagrees with the metadata"


@pytest.mark.parametrize("marks", MARKS)
def test_safetensors_header_length_past_end_of_file(tmp_path, marks):
    path = tmp_path / "c"
    save(path, SerializationFormat.SAFETENSORS)
    data = only_data_file(path)
    write_header(data, header_len_override=1 << 40)
    if marks == "marked":
        message = f"{data} (offset 0): safetensors header length {1 << 40} is larger than the 100000000-byte limit"
    else:
        message = f"{data} (offset 0): safetensors header length {1 << 40} is larger than the file"
    assert_damaged_header_reported(path, data, message, marks)


def test_safetensors_oversized_json_header(tmp_path):
    path = tmp_path / "c"
    save(path, SerializationFormat.SAFETENSORS)
    data = only_data_file(path)
    data.write_bytes(struct.pack("<Q", 150_000_000) + b"{" + b" " * 1000)
    strip_safetensors_marks(path)
    message = load_error(path)
    assert f"{data} (offset 0): safetensors header length 150000000 is larger than the file (1009 bytes)" in message
    assert "or the 100000000-byte limit" in message


@pytest.mark.parametrize("marks", MARKS)
def test_safetensors_entry_offsets_that_do_not_fit(tmp_path, marks):
    path = tmp_path / "c"
    save(path, SerializationFormat.SAFETENSORS)
    data = only_data_file(path)
    raw = data.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = raw[8 : 8 + n].decode()
    bad = header.replace('"w":{"dtype":"F32","shape":[64,32]', '"w":{"dtype":"F32","shape":[64,33]')
    assert bad != header
    write_header(data, header=bad.encode())
    assert_damaged_header_reported(path, data, f"{data} (offset 0): safetensors entry 'w' has offsets", marks)


@pytest.mark.parametrize("marks", MARKS)
def test_safetensors_header_garbage_json(tmp_path, marks):
    path = tmp_path / "c"
    save(path, SerializationFormat.SAFETENSORS)
    data = only_data_file(path)
    raw = data.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    write_header(data, header=b"{" + b"\xff" * (n - 1))
    assert_damaged_header_reported(path, data, f"{data} (offset 0): safetensors header is not valid JSON", marks)


def test_safetensors_header_that_names_another_key_fails_verify(tmp_path):
    """Valid JSON, every entry fits, but one key is not the item's: stock torch would not find it."""
    path = tmp_path / "c"
    save(path, SerializationFormat.SAFETENSORS)
    data = only_data_file(path)
    raw = data.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    write_header(data, header=raw[8 : 8 + n].replace(b'"w":{', b'"v":{'))
    info = storage_info(path, "w")
    message = (
        f"{data}: the safetensors header does not describe item 'w' (chunk at [0, 0]) "
        f"(bytes [{info.offset}, {info.offset + info.length})) as the metadata does"
    )
    assert_damaged_header_reported(path, data, message, "marked")


@pytest.mark.parametrize("escape", ["../outside.distcp", "/etc/hostname", "sub/../../outside.distcp", "link/x.distcp"])
def test_storage_paths_outside_the_checkpoint_are_refused(tmp_path, escape):
    path = tmp_path / "c"
    save(path)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, path / "link")
    info = storage_info(path, "w")
    shutil.copy(path / info.relative_path, outside / "x.distcp")
    shutil.copy(path / info.relative_path, tmp_path / "outside.distcp")
    rewrite_metadata(path, "w", relative_path=escape)
    message = load_error(path)
    assert f"item 'w' names storage file {escape!r}, which is outside the checkpoint directory {path}" in message


def test_reader_does_not_follow_symlinked_data_outside_but_loads_inside_links(tmp_path):
    path = tmp_path / "c"
    state = save(path)
    info = storage_info(path, "w")
    inside = path / "sub"
    inside.mkdir()
    os.rename(path / info.relative_path, inside / info.relative_path)
    os.symlink(inside / info.relative_path, path / info.relative_path)
    out = {"w": torch.zeros(64, 32), "b": torch.zeros(16, dtype=torch.int64), "step": 0}
    dcp_load(out, FileSystemReader(path))
    assert_state_equal(state, out)


@pytest.mark.parametrize("fmt", FORMATS)
def test_fuzzed_bytes_give_a_clear_error_or_a_correct_load(tmp_path, fmt):
    """Seeded byte flips in the metadata, torch.save archives and safetensors headers.

    In SAFETENSORS files the flips land in the header (test_fuzz_flips.py flips
    every item's bytes, checked by their checksums).
    """
    pristine = tmp_path / "pristine"
    state = save(pristine, fmt)
    rng = random.Random(1234)
    outcomes = {"loaded": 0, "error": 0}
    for trial in range(40):
        path = tmp_path / f"t{trial}"
        shutil.copytree(pristine, path)
        names = sorted(os.listdir(path))
        target = path / rng.choice(names)
        raw = bytearray(target.read_bytes())
        span = len(raw)
        if fmt == SerializationFormat.SAFETENSORS and target.suffix == ".distcp":
            span = 8 + struct.unpack("<Q", raw[:8])[0]
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(span)] ^= 1 << rng.randrange(8)
        target.write_bytes(bytes(raw))
        out = {"w": torch.zeros(64, 32), "b": torch.zeros(16, dtype=torch.int64), "step": 0}
        try:
            dcp_load(out, FileSystemReader(path))
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: B036 - CheckpointException is a BaseException
            assert str(e).strip(), f"trial {trial}: empty error for a flip in {target.name}"
            outcomes["error"] += 1
            continue
        assert_state_equal(state, out, f"trial {trial} ({target.name})")
        outcomes["loaded"] += 1
    assert outcomes["error"] > 0

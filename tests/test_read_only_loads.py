"""Loads are read-only: a load never creates, renames or deletes a file, so it works where it cannot write."""
from __future__ import annotations

import contextlib
import io
import os
import stat
import subprocess

import pytest
import torch
from fs_doubles import RecordingFS
from helpers import assert_state_equal, dcp_load, dcp_save, zeros_like_state

from dcp_filesystem import FileSystemReader, FileSystemWriter, SerializationFormat
from dcp_filesystem._cli import main as cli_main

FORMATS = [SerializationFormat.TORCH_SAVE, SerializationFormat.SAFETENSORS]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def state():
    g = torch.Generator().manual_seed(5)
    return {
        "w": torch.randn(64, 64, generator=g),
        "h": torch.randn(300, generator=g).to(torch.float16),
        "ids": torch.arange(50, dtype=torch.int64),
        "step": 3,
    }


def snapshot(path):
    """Every entry's name, mode, size, modification time and bytes."""
    out = {}
    for name in sorted(os.listdir(path)):
        st = os.stat(path / name)
        out[name] = (st.st_mode, st.st_size, st.st_mtime_ns, (path / name).read_bytes())
    return out


def load_and_check(path, **reader_kwargs):
    target = zeros_like_state(state())
    dcp_load(target, FileSystemReader(path, **reader_kwargs))
    assert_state_equal(state(), target)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
@pytest.mark.parametrize("thread_count", [1, 2])
def test_a_load_only_opens_files_for_reading(tmp_path, fmt, thread_count):
    path = tmp_path / "c"
    dcp_save(state(), FileSystemWriter(path, thread_count=2, serialization_format=fmt))
    before = snapshot(path)
    fs = RecordingFS()
    reader = FileSystemReader(path, thread_count=thread_count)
    reader.fs = fs
    target = zeros_like_state(state())
    dcp_load(target, reader)
    assert_state_equal(state(), target)
    assert sorted(fs.calls) == [
        ("create_stream", ".metadata", "rb"), ("create_stream", "__0_0.distcp", "rb"),
        ("create_stream", "__0_1.distcp", "rb"),
    ]  # fmt: skip
    assert snapshot(path) == before


@pytest.fixture
def read_only_dir(tmp_path):
    """A function that makes a directory read-only for this process, and the way it did so.

    As root, permissions do not stop writes, so the directory is a tmpfs remounted read-only
    (skipped where mount is refused); otherwise the directory and its files lose write permission.
    """
    mounted = []

    def make(save):
        path = tmp_path / "c"
        if os.geteuid() != 0:
            path.mkdir()
            save(path)
            for name in os.listdir(path):
                os.chmod(path / name, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
            os.chmod(path, stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
            return path, "chmod a-w"
        path.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(path)],
                              capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            pytest.skip(f"as root, a read-only directory needs a mount, refused here: {proc.stderr.strip()}")
        mounted.append(path)
        save(path)
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True, timeout=30)
        return path, "read-only tmpfs"

    yield make
    for path in mounted:
        subprocess.run(["umount", str(path)], check=True, timeout=60)
    for root, dirs, _ in os.walk(tmp_path):
        for d in dirs:
            os.chmod(os.path.join(root, d), stat.S_IRWXU)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
def test_a_checkpoint_in_a_read_only_directory_loads(read_only_dir, fmt):
    path, how = read_only_dir(
        lambda p: dcp_save(state(), FileSystemWriter(p, thread_count=2, serialization_format=fmt))
    )
    with pytest.raises(OSError):
        (path / "probe").write_bytes(b"x")  # the directory really is read-only
    before = snapshot(path)
    load_and_check(path)
    load_and_check(path, thread_count=2)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert cli_main(["verify", str(path)]) == 0
        assert cli_main(["inspect", str(path)]) == 0
    assert "OK: 4 entries" in out.getvalue()
    assert snapshot(path) == before, how

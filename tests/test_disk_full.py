"""A full disk, for real: a save that does not fit fails cleanly, and the next one that fits succeeds.

The checkpoint lives on a 48 MiB tmpfs mounted for the test (root only; CI runs
as root). An 8 MiB checkpoint is committed, a 48 MiB one cannot fit, a 16 MiB
one can: the failed save must raise ENOSPC naming its file and the room it
lacked, keep the 8 MiB checkpoint bit-exact, and leave nothing that would make
the 16 MiB save fail too.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import subprocess

import pytest
import torch
from helpers import assert_state_equal, dcp_load, dcp_save, raised_error

from dcp_filesystem import FileSystemReader, FileSystemWriter, SerializationFormat

FORMATS = [SerializationFormat.TORCH_SAVE, SerializationFormat.SAFETENSORS]
MiB = 1 << 20
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def small_disk(tmp_path):
    """A 48 MiB tmpfs at tmp_path/disk, unmounted afterwards; skipped where it cannot be mounted."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    try:
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount_point)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot run mount: {type(e).__name__}: {e}")
    if proc.returncode != 0:
        pytest.skip(f"mount -t tmpfs refused (exit {proc.returncode}): {proc.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True, timeout=60)


def weights(megabytes, seed):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(megabytes * MiB // 4, generator=g)}


def free_bytes(path):
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def digests(path):
    return {name: hashlib.sha256((path / name).read_bytes()).hexdigest() for name in sorted(os.listdir(path))}


def referenced(path):
    md = FileSystemReader(path).read_metadata()
    return sorted({info.relative_path for info in md.storage_data.values()} | {".metadata"})


def load(path, megabytes):
    out = {"w": torch.zeros(megabytes * MiB // 4)}
    dcp_load(out, FileSystemReader(path))
    return out


def save(path, state, fmt):
    dcp_save(state, FileSystemWriter(path, serialization_format=fmt))


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
def test_a_save_that_does_not_fit_fails_cleanly_and_the_next_that_fits_succeeds(small_disk, fmt):
    path = small_disk / "ckpt"
    save(path, weights(8, seed=1), fmt)
    old = digests(path)
    assert sorted(old) == [".metadata", "__0_0.distcp"]

    with pytest.raises(BaseException) as info:  # DCP wraps it in CheckpointException (a BaseException)
        save(path, weights(48, seed=2), fmt)
    error = raised_error(info.value)
    assert type(error) is OSError and error.errno == errno.ENOSPC
    assert os.path.basename(error.filename).startswith("__0_0.") and error.filename.endswith(".distcp")
    free = free_bytes(small_disk)
    expected = (
        f"[Errno 28] No space left on device (this save needs at least {48 * MiB} bytes; "
        f"{free} bytes are free in {path}): '{error.filename}'"
    )
    assert expected in str(info.value)
    print(f"\n{fmt.value}: {expected}")
    # The committed checkpoint is intact and nothing of the failed save is left.
    assert digests(path) == old
    assert_state_equal(weights(8, seed=1), load(path, 8))
    assert free > 32 * MiB  # the failed save's partial file was given back

    save(path, weights(16, seed=3), fmt)
    assert sorted(os.listdir(path)) == referenced(path)
    assert_state_equal(weights(16, seed=3), load(path, 16))
    print(f"{fmt.value}: retry of 16 MiB committed, files {sorted(os.listdir(path))}, {free_bytes(small_disk)} free")


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
def test_a_killed_saves_leftover_does_not_fill_the_disk_for_the_next_save(small_disk, fmt):
    path = small_disk / "ckpt"
    save(path, weights(8, seed=1), fmt)
    # What a save killed at 30 MiB (SIGKILL, power loss) leaves: a data file no metadata names.
    (path / "__0_0.0badc0de.distcp").write_bytes(b"\0" * (30 * MiB))
    assert free_bytes(small_disk) < 16 * MiB
    save(path, weights(16, seed=3), fmt)
    assert sorted(os.listdir(path)) == referenced(path)
    assert_state_equal(weights(16, seed=3), load(path, 16))


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
def test_a_save_onto_a_disk_with_no_room_at_all_fails_where_its_data_goes(small_disk, fmt):
    """Even the save lock's line about its holder finds no room: the save fails on its data file, as it
    would without the lock, and leaves neither the lock file nor anything else behind."""
    path = small_disk / "ckpt"
    save(path, weights(8, seed=1), fmt)
    old = digests(path)
    with open(small_disk / "filler", "wb", buffering=0) as f:
        for size in (MiB, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(bytes(size))
    assert free_bytes(small_disk) == 0
    with pytest.raises(BaseException) as info:
        save(path, weights(1, seed=2), fmt)
    error = raised_error(info.value)
    assert type(error) is OSError and error.errno == errno.ENOSPC
    assert error.filename.endswith(".distcp"), error.filename
    assert digests(path) == old
    os.remove(small_disk / "filler")
    save(path, weights(1, seed=3), fmt)
    assert sorted(os.listdir(path)) == referenced(path)
    assert_state_equal(weights(1, seed=3), load(path, 1))

"""With sync_files, the writer starts the kernel's writeback window by window while it writes."""
import io
import os
import sys

import pytest
import torch
from helpers import assert_state_equal, dcp_load, dcp_save, zeros_like_state

from dcp_filesystem import FileSystemReader, FileSystemWriter, SerializationFormat, _writeback

WINDOW = 64 << 10


class RecordingSyncFileRange:
    def __init__(self, result=0):
        self.calls, self.result = [], result

    def __call__(self, fd, offset, nbytes, flags):
        self.calls.append((os.readlink(f"/proc/self/fd/{fd}") if sys.platform.startswith("linux") else fd,
                           offset, nbytes, flags))
        return self.result


@pytest.fixture
def recorder(monkeypatch):
    monkeypatch.setattr(_writeback, "_WINDOW", WINDOW)
    fake = RecordingSyncFileRange()
    monkeypatch.setattr(_writeback, "_sync_file_range", lambda: fake)
    return fake


def _state():
    gen = torch.Generator().manual_seed(0)
    return {"big": torch.randn(300_000, generator=gen), "small": torch.randn(10, generator=gen), "step": 3}


@pytest.mark.parametrize("fmt", ["TORCH_SAVE", "SAFETENSORS"])
def test_each_window_is_started_in_order_and_the_checkpoint_is_intact(tmp_path, recorder, fmt):
    state = _state()
    dcp_save(state, FileSystemWriter(str(tmp_path), serialization_format=getattr(SerializationFormat, fmt)))
    (data_file,) = [name for name in os.listdir(tmp_path) if name.endswith(".distcp")]
    size = os.path.getsize(tmp_path / data_file)
    calls = [c for c in recorder.calls if c[0].endswith(data_file)]
    assert calls and all(c[3] == 2 for c in calls)  # SYNC_FILE_RANGE_WRITE only: never waits
    position = 0
    for _, offset, nbytes, _ in calls:
        assert offset == position and nbytes >= WINDOW
        position += nbytes
    assert size - position < WINDOW + 8192  # the rest: the last part window and the stream's buffer
    loaded = zeros_like_state(state)
    dcp_load(loaded, FileSystemReader(str(tmp_path)))
    assert_state_equal(state, loaded)


def test_without_sync_files_nothing_is_started(tmp_path, recorder):
    dcp_save(_state(), FileSystemWriter(str(tmp_path), sync_files=False))
    assert recorder.calls == []


def test_a_refused_start_is_not_asked_again_and_the_save_completes(tmp_path, monkeypatch):
    monkeypatch.setattr(_writeback, "_WINDOW", WINDOW)
    refusing = RecordingSyncFileRange(result=-1)
    monkeypatch.setattr(_writeback, "_sync_file_range", lambda: refusing)
    state = _state()
    dcp_save(state, FileSystemWriter(str(tmp_path)))
    assert len(refusing.calls) == 1
    loaded = zeros_like_state(state)
    dcp_load(loaded, FileSystemReader(str(tmp_path)))
    assert_state_equal(state, loaded)


def test_a_stream_without_a_file_descriptor_is_left_as_it_is(recorder):
    stream = io.BytesIO()
    assert _writeback.with_early_writeback(stream) is stream


class ShortWrites(io.RawIOBase):
    """A file that takes at most 1000 bytes per write, as raw files may."""

    def __init__(self, path):
        self.file = open(path, "wb", buffering=0)

    def writable(self):
        return True

    def write(self, data):
        return self.file.write(bytes(memoryview(data)[:1000]))

    def fileno(self):
        return self.file.fileno()

    def tell(self):
        return self.file.tell()

    def close(self):
        self.file.close()
        super().close()


def test_short_writes_are_completed(tmp_path, recorder):
    payload = os.urandom(3 * WINDOW + 123)
    raw = ShortWrites(tmp_path / "f")
    stream = _writeback.with_early_writeback(raw)
    assert stream is not raw and stream.write(payload) == len(payload)
    raw.close()
    assert (tmp_path / "f").read_bytes() == payload
    assert [(offset, nbytes) for _, offset, nbytes, _ in recorder.calls] == [(i * WINDOW, WINDOW) for i in range(3)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_the_real_sync_file_range_accepts_a_written_range(tmp_path):
    function = _writeback._sync_file_range()
    assert function is not None
    with open(tmp_path / "f", "wb") as f:
        f.write(b"x" * WINDOW)
        f.flush()
        assert function(f.fileno(), 0, WINDOW, 2) == 0

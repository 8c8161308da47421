"""Save and load report items, bytes and timing at DEBUG on the "dcp_filesystem" logger, and nothing above."""
import logging
import re

import pytest
import torch
from helpers import dcp_load, dcp_save, load_passes_on_metadata_errors, zeros_like_state

from dcp_filesystem import FileSystemReader, FileSystemWriter


def test_debug_log_of_save_and_load(tmp_path, caplog):
    state = {"a": torch.ones(4, 4), "b": torch.arange(10), "step": 3}
    with caplog.at_level(logging.DEBUG, logger="dcp_filesystem"):
        dcp_save(state, FileSystemWriter(tmp_path, thread_count=2))
        dcp_load(zeros_like_state(state), FileSystemReader(tmp_path))
    ours = [r for r in caplog.records if r.name == "dcp_filesystem"]
    assert [r.levelno for r in ours] == [logging.DEBUG, logging.DEBUG]
    path, timing = re.escape(str(tmp_path)), r"in [\d.]+ s \([\d.]+ GB/s\)"
    wrote = re.fullmatch(
        rf"wrote 3 items, (\d+) bytes in 2 files on 2 thread\(s\) to {path} {timing}", ours[0].getMessage()
    )
    read = re.fullmatch(
        rf"read 3 items, (\d+) stored bytes from 2 files on 1 thread\(s\) in {path} {timing}", ours[1].getMessage()
    )
    assert wrote and read, [r.getMessage() for r in ours]
    on_disk = sum(p.stat().st_size for p in tmp_path.glob("*.distcp"))
    assert int(wrote.group(1)) == int(read.group(1)) == on_disk


def test_silent_above_debug(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="dcp_filesystem"):
        dcp_save({"a": torch.ones(2)}, FileSystemWriter(tmp_path))
        dcp_load({"a": torch.zeros(2)}, FileSystemReader(tmp_path))
    assert [r for r in caplog.records if r.name == "dcp_filesystem"] == []


NO_CHECKPOINT = {
    "missing": "[Errno 2] No such checkpoint directory: '{}'",
    "file": "[Errno 20] Checkpoint path is not a directory: '{}'",
    "empty": "[Errno 2] No checkpoint in this directory (no .metadata file): '{}'",
}


def _no_checkpoint(tmp_path, kind):
    path = tmp_path / "ckpt"
    if kind == "file":
        path.write_bytes(b"not a checkpoint")
    elif kind == "empty":
        path.mkdir()
    return path


@pytest.mark.parametrize("kind", sorted(NO_CHECKPOINT))
def test_a_load_of_no_checkpoint_logs_one_clear_line_naming_the_path_without_a_traceback(tmp_path, caplog, kind):
    path = _no_checkpoint(tmp_path, kind)
    caplog.set_level(logging.INFO, logger="dcp_filesystem")
    with pytest.raises(BaseException) as info:  # CheckpointException derives from BaseException
        dcp_load({"w": torch.zeros(2)}, FileSystemReader(path))
    expected = NO_CHECKPOINT[kind].format(path)
    ours = [(r.levelname, r.getMessage(), r.exc_info) for r in caplog.records if r.name == "dcp_filesystem"]
    # One line, though torch 2.13+'s dcp.load asks for .metadata and then for the rank-local __0.metadata.
    assert ours == [("ERROR", expected, None)]
    if load_passes_on_metadata_errors():  # torch 2.9-2.11 replace it with "metadata is None"
        assert expected in str(info.value)
    with pytest.raises(OSError) as direct:
        FileSystemReader(path).read_metadata()
    assert str(direct.value) == expected and direct.value.filename == str(path)
    assert direct.value.__suppress_context__  # not chained to the open() of .metadata that failed


def test_with_debug_on_the_line_carries_the_traceback(tmp_path, caplog):
    path = _no_checkpoint(tmp_path, "missing")
    caplog.set_level(logging.DEBUG, logger="dcp_filesystem")
    with pytest.raises(FileNotFoundError):
        FileSystemReader(path).read_metadata()
    (record,) = [r for r in caplog.records if r.name == "dcp_filesystem" and r.levelno == logging.ERROR]
    assert record.getMessage() == NO_CHECKPOINT["missing"].format(path)
    assert record.exc_info[0] is FileNotFoundError and record.exc_info[1].filename == str(path / ".metadata")


def test_a_rank_local_checkpoint_logs_nothing_when_dcp_load_first_asks_for_the_global_metadata(tmp_path, caplog):
    path = tmp_path / "ckpt"
    path.mkdir()
    (path / "__0.metadata").write_bytes(b"")  # as a rank-local save leaves it, no global .metadata
    caplog.set_level(logging.DEBUG, logger="dcp_filesystem")
    with pytest.raises(FileNotFoundError) as info:
        FileSystemReader(path).read_metadata()
    assert str(info.value) == f"[Errno 2] No such file or directory: '{path / '.metadata'}'"
    assert [r for r in caplog.records if r.name == "dcp_filesystem"] == []

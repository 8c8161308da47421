"""Save and load report items, bytes and timing at DEBUG on the "dcp_filesystem" logger, and nothing above."""
import logging
import re

import torch
from helpers import dcp_load, dcp_save, zeros_like_state

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

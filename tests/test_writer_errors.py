"""A failure in any writer thread fails the save, with its message, and commits nothing."""
import os

import pytest
import torch
from helpers import dcp_save
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

from dcp_filesystem import FileSystemWriter, SerializationFormat


class FailingPlanner(DefaultSavePlanner):
    def __init__(self, fail_fqn, replacement=None):
        super().__init__()
        self.fail_fqn = fail_fqn
        self.replacement = replacement

    def resolve_data(self, write_item):
        if write_item.index.fqn == self.fail_fqn:
            if self.replacement is None:
                raise OSError(f"disk on fire while resolving {self.fail_fqn}")
            return self.replacement
        return super().resolve_data(write_item)


def state():
    return {f"t{i}": torch.full((32, 32), float(i)) for i in range(12)}


@pytest.mark.parametrize("thread_count", [1, 4])
def test_exception_in_a_writer_thread_fails_the_save(tmp_path, thread_count):
    path = tmp_path / "c"
    with pytest.raises(BaseException, match="disk on fire while resolving t7"):
        dcp_save(state(), FileSystemWriter(path, thread_count=thread_count), planner=FailingPlanner("t7"))
    assert not (path / ".metadata").exists()


def test_safetensors_tensor_that_differs_from_the_plan_is_refused(tmp_path):
    path = tmp_path / "c"
    planner = FailingPlanner("t3", replacement=torch.zeros(16, 16))
    with pytest.raises(BaseException) as info:
        dcp_save(state(), FileSystemWriter(path, serialization_format=SerializationFormat.SAFETENSORS), planner=planner)
    assert (
        "__0_0.distcp: tensor 't3' resolved to torch.float32 [16, 16], "
        "but the save plan announced torch.float32 [32, 32]" in str(info.value)
    )
    assert not os.path.exists(path / ".metadata")

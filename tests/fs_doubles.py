"""A local file system behind FileSystemBase's abstract methods alone, for tests to record or fail calls."""
from __future__ import annotations

import os
from contextlib import contextmanager

from dcp_filesystem import FileSystem, FileSystemBase


class LocalFS(FileSystemBase):
    """Every call goes to the local FileSystem (this is not a FileSystem subclass); the capability
    methods keep FileSystemBase's defaults unless a subclass says otherwise."""

    def __init__(self):
        self.inner = FileSystem()

    @contextmanager
    def create_stream(self, path, mode):
        with self.inner.create_stream(path, mode) as stream:
            yield stream

    def concat_path(self, path, suffix):
        return self.inner.concat_path(path, suffix)

    def rename(self, path, new_path):
        self.inner.rename(path, new_path)

    def init_path(self, path):
        return self.inner.init_path(path)

    def mkdir(self, path):
        self.inner.mkdir(path)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id):
        return FileSystem.validate_checkpoint_id(checkpoint_id)

    def exists(self, path):
        return self.inner.exists(path)

    def rm_file(self, path):
        self.inner.rm_file(path)


class RecordingFS(LocalFS):
    """The local file system recording every call that creates, renames, removes or syncs (file names
    by their base name), and able to list and say its local paths, as FileSystem does."""

    def __init__(self):
        super().__init__()
        self.calls = []

    @contextmanager
    def create_stream(self, path, mode):
        self.calls.append(("create_stream", os.path.basename(str(path)), mode))
        with super().create_stream(path, mode) as stream:
            yield stream

    def rename(self, path, new_path):
        self.calls.append(("rename", os.path.basename(str(path)), os.path.basename(str(new_path))))
        super().rename(path, new_path)

    def mkdir(self, path):
        self.calls.append(("mkdir", str(path)))
        super().mkdir(path)

    def rm_file(self, path):
        self.calls.append(("rm_file", os.path.basename(str(path))))
        super().rm_file(path)

    def sync_dir(self, path):
        self.calls.append(("sync_dir", str(path)))
        self.inner.sync_dir(path)

    def ls(self, path):
        return self.inner.ls(path)

    def local_path(self, path):
        return self.inner.local_path(path)

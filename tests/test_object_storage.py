"""Checkpoints on S3, against a local S3-protocol server (moto, on 127.0.0.1, started and stopped here).

The two ways users reach object storage with DCP, rebuilt on this package the way they are built on
torch's classes: s3torchconnector's writer and reader (with each of its three stream readers), and
upstream's fsspec writer and reader (through s3fs). Every load is bit-exact; the server counts the
requests each load makes, and ours make no more than stock torch's and fetch no byte twice.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import uuid
from collections import defaultdict

import pytest
import torch
from helpers import assert_state_equal, dcp_load, dcp_save, zeros_like_state

import dcp_filesystem
from dcp_filesystem import SerializationFormat, _compat

pytest.importorskip("moto.server", reason="needs moto[server] (the test extra) for a local S3 server")
pytest.importorskip("boto3", reason="needs boto3 (with moto) to create buckets")
from s3_server import S3Server  # noqa: E402

REGION = "us-east-1"
FORMATS = [SerializationFormat.TORCH_SAVE, SerializationFormat.SAFETENSORS]
STOCK_HAS_SAFETENSORS = _compat.TorchSerializationFormat is not None  # torch 2.8+


def _connector():
    """s3torchconnector's DCP module, or a skip that says why it is missing."""
    return pytest.importorskip(
        "s3torchconnector.dcp", reason="needs s3torchconnector (test extra), which installs beside torch 2.3+ only"
    )


def _fsspec_module():
    pytest.importorskip("s3fs", reason="needs s3fs (test extra)")
    from torch.distributed.checkpoint import _fsspec_filesystem

    if not hasattr(_fsspec_filesystem, "FileSystem"):
        pytest.skip("this torch's fsspec storage has no FileSystem class to put under another writer (torch 2.1)")
    return _fsspec_filesystem


@pytest.fixture(scope="module")
def s3_server():
    saved = dict(os.environ)
    server = S3Server()
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_SESSION_TOKEN="testing",
        AWS_REGION=REGION, AWS_DEFAULT_REGION=REGION, AWS_ENDPOINT_URL=server.url,
    )  # fmt: skip
    try:
        yield server
    finally:
        server.stop()
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture
def bucket(s3_server):
    import boto3

    name = f"ckpt-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server.url, region_name=REGION).create_bucket(Bucket=name)
    s3_server.requests()  # forget the setup's
    return name


def _objects(s3_server, bucket, prefix):
    import boto3

    listed = boto3.client("s3", endpoint_url=s3_server.url, region_name=REGION).list_objects_v2(
        Bucket=bucket, Prefix=prefix + "/"
    )
    s3_server.requests()
    return sorted(o["Key"][len(prefix) + 1 :] for o in listed.get("Contents", []))


def state(generation=1, with_values=True):
    """A >1 MiB tensor (its torch.save archive is read in place on local disks), small tensors, values."""
    gen = torch.Generator().manual_seed(generation)
    sd = {
        "big": torch.randn(640, 1024, generator=gen),  # 2.5 MiB
        "ints": torch.randint(0, 1 << 30, (3000,), generator=gen),
        **{f"small.{i}": torch.randn(i + 1, 7, generator=gen) for i in range(12)},
    }
    if with_values:
        sd.update(step=generation, config={"lr": 0.1 * generation})
    return sd


# ------------------------------------------------------------------ s3torchconnector, rebuilt on ours


def _client_config():
    from s3torchconnector import S3ClientConfig

    return S3ClientConfig(force_path_style=True)  # the server is an IP address: no bucket subdomains


def connector_classes():
    """s3torchconnector's S3StorageWriter / S3StorageReader built on this package's writer and reader, as
    the connector builds them on torch's: its own S3FileSystem, prefix strategy and range injection."""
    connector = _connector()

    class S3StorageWriter(dcp_filesystem.FileSystemWriter):
        def __init__(self, region, path, thread_count=1, **kwargs):
            super().__init__(path=path, sync_files=False, thread_count=thread_count, **kwargs)
            self.fs = connector.S3FileSystem(region, s3client_config=_client_config())
            self.path = self.fs.init_path(path)
            self.prefix_strategy = connector.s3_file_system.DefaultPrefixStrategy()

        prepare_global_plan = connector.S3StorageWriter.prepare_global_plan

    class S3StorageReader(dcp_filesystem.FileSystemReader):
        def __init__(self, region, path, reader_constructor=None):
            super().__init__(path)
            self._reader_constructor = reader_constructor or _reader_constructor("dcp_optimized")
            self.fs = connector.S3FileSystem(
                region, s3client_config=_client_config(), reader_constructor=self._reader_constructor
            )
            self.path = self.fs.init_path(path)
            self.sync_files = False

        prepare_local_plan = connector.S3StorageReader.prepare_local_plan

    return S3StorageWriter, S3StorageReader


def stock_connector_classes():
    connector = _connector()

    def writer(region, path, **kwargs):
        return connector.S3StorageWriter(region, path, s3client_config=_client_config(), **kwargs)

    def reader(region, path, reader_constructor=None):
        return connector.S3StorageReader(region, path, _client_config(), reader_constructor)

    return writer, reader


READERS = ["sequential", "range_based", "dcp_optimized"]


def _reader_constructor(name):
    from s3torchconnector import S3ReaderConstructor

    return getattr(S3ReaderConstructor, name)()


def _format_kwargs(fmt):
    return {} if fmt == SerializationFormat.TORCH_SAVE else {"serialization_format": fmt}


def gets_by_object(requests):
    """{object path: [(first byte, bytes sent)]} of the GETs, with the number of GETs."""
    ranges = defaultdict(list)
    for r in requests:
        if r.method == "GET":
            start = int(r.range.split("=")[1].split("-")[0]) if r.range else 0
            ranges[r.path].append((start, r.bytes_out))
    return ranges


def assert_no_byte_fetched_twice(requests):
    for path, ranges in gets_by_object(requests).items():
        ranges.sort()
        for (start, sent), (next_start, _) in zip(ranges, ranges[1:]):
            assert start + sent <= next_start, (path, ranges)


def data_bytes(requests):
    return sum(r.bytes_out for r in requests if r.method == "GET" and r.path.endswith(".distcp"))


def load_counting(s3_server, reader, sd):
    target = zeros_like_state(sd)
    s3_server.requests()
    dcp_load(target, reader)
    requests = s3_server.requests()
    assert_state_equal(sd, target)
    return requests


@pytest.mark.parametrize("reader_name", READERS)
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
def test_connector_on_ours_round_trips_with_no_more_gets_than_stock(s3_server, bucket, fmt, reader_name):
    # Stock torch's reader loads TORCH_SAVE checkpoints only (its SAFETENSORS loads fail on torch.load):
    # ours in either format is held to what stock does with TORCH_SAVE.
    Writer, Reader = connector_classes()
    stock_writer, stock_reader = stock_connector_classes()
    sd = state()
    ours_path, stock_path = f"s3://{bucket}/ours", f"s3://{bucket}/stock"
    dcp_save(sd, Writer(REGION, ours_path, **_format_kwargs(fmt)))
    dcp_save(sd, stock_writer(REGION, stock_path))
    ours = load_counting(s3_server, Reader(REGION, ours_path, _reader_constructor(reader_name)), sd)
    stock = load_counting(s3_server, stock_reader(REGION, stock_path, _reader_constructor(reader_name)), sd)
    assert_no_byte_fetched_twice(ours)
    ours_gets = sum(r.method == "GET" for r in ours)
    assert 2 <= ours_gets <= sum(r.method == "GET" for r in stock)
    # Nor more bytes of data objects (ours' .metadata is larger by the checksums it carries).
    assert data_bytes(ours) <= data_bytes(stock)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
def test_connector_on_ours_with_several_threads_and_files(s3_server, bucket, fmt):
    Writer, Reader = connector_classes()
    sd = state(3)
    path = f"s3://{bucket}/c"
    dcp_save(sd, Writer(REGION, path, thread_count=3, single_file_per_rank=False, **_format_kwargs(fmt)))
    assert len([name for name in _objects(s3_server, bucket, "c") if name.endswith(".distcp")]) == len(sd)
    assert_no_byte_fetched_twice(load_counting(s3_server, Reader(REGION, path), sd))


def test_stock_connector_and_ours_read_each_others_torch_save_checkpoints(s3_server, bucket):
    Writer, Reader = connector_classes()
    stock_writer, stock_reader = stock_connector_classes()
    sd = state(4)
    dcp_save(sd, Writer(REGION, f"s3://{bucket}/ours"))
    dcp_save(sd, stock_writer(REGION, f"s3://{bucket}/stock"))
    load_counting(s3_server, stock_reader(REGION, f"s3://{bucket}/ours"), sd)
    load_counting(s3_server, Reader(REGION, f"s3://{bucket}/stock"), sd)


@pytest.mark.skipif(not STOCK_HAS_SAFETENSORS, reason="stock torch < 2.8 has no SerializationFormat")
def test_ours_reads_stock_safetensors_checkpoints_on_s3(s3_server, bucket):
    _, Reader = connector_classes()
    stock_writer, _ = stock_connector_classes()
    sd = state(4, with_values=False)
    dcp_save(sd, stock_writer(REGION, f"s3://{bucket}/stock", serialization_format=SerializationFormat.SAFETENSORS))
    # Stock entries are found through the header their storage info points at: a reader that can seek.
    load_counting(s3_server, Reader(REGION, f"s3://{bucket}/stock", _reader_constructor("sequential")), sd)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
def test_an_overwrite_on_s3_removes_the_objects_it_replaced(s3_server, bucket, fmt):
    # The connector's file system cannot list: the replaced .metadata names what to remove.
    Writer, Reader = connector_classes()
    path = f"s3://{bucket}/c"
    dcp_save(state(1), Writer(REGION, path, single_file_per_rank=False, **_format_kwargs(fmt)))
    first = _objects(s3_server, bucket, "c")
    dcp_save(state(2), Writer(REGION, path, single_file_per_rank=False, **_format_kwargs(fmt)))
    second = _objects(s3_server, bucket, "c")
    assert ".metadata" in first and ".metadata" in second
    assert not set(first) & set(second) - {".metadata"}  # no data object of the first save is left
    assert len(second) == len(first)
    load_counting(s3_server, Reader(REGION, path), state(2))


# ------------------------------------------------------------------ fsspec (s3fs), rebuilt on ours


def fsspec_classes():
    fsspec_fs = _fsspec_module()

    class FsspecWriter(dcp_filesystem.FileSystemWriter):
        def __init__(self, path, **kwargs):
            super().__init__(path, **kwargs)
            self.fs = fsspec_fs.FileSystem()
            self.path = self.fs.init_path(path)

    class FsspecReader(dcp_filesystem.FileSystemReader):
        def __init__(self, path):
            super().__init__(path)
            self.fs = fsspec_fs.FileSystem()
            self.path = self.fs.init_path(path)

    return FsspecWriter, FsspecReader


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
def test_fsspec_on_ours_round_trips_and_reads_stock(s3_server, bucket, fmt):
    fsspec_fs = _fsspec_module()
    Writer, Reader = fsspec_classes()
    sd = state(5)
    ours_path, stock_path = f"s3://{bucket}/ours", f"s3://{bucket}/stock"
    dcp_save(sd, Writer(ours_path, **_format_kwargs(fmt)))
    # TORCH_SAVE: the only format stock's reader loads. Without sync_files: stock torch 2.6 fsyncs
    # every stream's fileno(), which s3fs's files lack (io.UnsupportedOperation: fileno); 2.8+ does not.
    dcp_save(sd, fsspec_fs.FsspecWriter(stock_path, sync_files=False))
    ours = load_counting(s3_server, Reader(ours_path), sd)
    stock = load_counting(s3_server, fsspec_fs.FsspecReader(stock_path), sd)
    assert sum(r.method == "GET" for r in ours) <= sum(r.method == "GET" for r in stock)
    assert data_bytes(ours) <= data_bytes(stock)
    assert_no_byte_fetched_twice(ours)
    load_counting(s3_server, Reader(stock_path), sd)
    if fmt == SerializationFormat.TORCH_SAVE:
        load_counting(s3_server, fsspec_fs.FsspecReader(ours_path), sd)
    # fsspec lists: an overwrite removes the data objects it replaced.
    first = _objects(s3_server, bucket, "ours")
    dcp_save(state(6, with_values=False), Writer(ours_path, **_format_kwargs(fmt)))
    assert not set(first) & set(_objects(s3_server, bucket, "ours")) - {".metadata"}


# ------------------------------------------------------------------ killed saves on S3


def _save_when_told(go, env, path, fmt, generation):
    """A saving child: saves ``state(generation)`` once the parent has armed the server."""
    os.environ.update(env)
    Writer, _ = connector_classes()
    go.recv()
    dcp_save(state(generation, with_values=False), Writer(REGION, path, **_format_kwargs(fmt)))


_SAVER_SECONDS = 120  # far more than one small save takes: a child still running then is stuck


def _killed_at(s3_server, saver, n, path, fmt):
    """Run one save in a child of ``saver`` (a forkserver context); the server kills the child on
    receiving the save's n-th request. True where it was killed, False where the save finished first."""
    s3_server.requests()
    go, child_end = saver.Pipe()
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    child = saver.Process(target=_save_when_told, args=(child_end, env, path, fmt, 2))
    child.start()
    s3_server.kill_at(child.pid, n)
    go.send(True)
    child.join(_SAVER_SECONDS)
    s3_server.kill_at(None, 0)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail(f"the saving child was still running after {_SAVER_SECONDS} s (kill point {n})")
    if child.exitcode == -signal.SIGKILL:
        return True
    assert child.exitcode == 0, child.exitcode
    return False


@pytest.fixture(scope="module")
def saver():
    """Children for killed saves come from a fork server: a fresh process that imports torch and the
    connector once and forks each child, never holding an S3 client of its own (the connector's native
    client does not survive being forked from a process that has used one: seen hanging on 3.12)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "s3torchconnector.dcp", "dcp_filesystem", "test_object_storage"])
    return context


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork (a fork server) to start savers quickly")
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
def test_a_save_killed_at_any_request_leaves_the_old_or_the_new_checkpoint(s3_server, bucket, saver, fmt):
    Writer, Reader = connector_classes()
    path = f"s3://{bucket}/c"
    old, new = state(1, with_values=False), state(2, with_values=False)
    dcp_save(old, Writer(REGION, path, **_format_kwargs(fmt)))
    outcomes = []
    n = 1
    while _killed_at(s3_server, saver, n, path, fmt):
        target = zeros_like_state(old)
        dcp_load(target, Reader(REGION, path))
        outcomes.append("new" if torch.equal(target["big"], new["big"]) else "old")
        assert_state_equal(new if outcomes[-1] == "new" else old, target)
        if outcomes[-1] == "new":  # start over
            dcp_save(old, Writer(REGION, path, **_format_kwargs(fmt)))
        n += 1
    # Killed at every request of the save: before its copy of .metadata the old checkpoint loads,
    # after it the new one.
    assert n > 10 and outcomes[0] == "old" and "new" in outcomes
    assert outcomes == sorted(outcomes, key=["old", "new"].index)

"""``python -m dcp_filesystem``: inspect or verify a checkpoint, export one to Hugging Face, or measure save and
load on your own storage."""
from __future__ import annotations

import argparse
import functools
import io
import json
import logging
import os
import sys
import time
from typing import IO, Any, Dict, List, Optional, Sequence

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import ReadItem

from . import _bench, _safetensors, _torch_save
from ._bytes import numel, tensor_bytes
from ._checksum import check, check_blocks, stored_crc32
from ._crc import crc32
from ._format import Stored, describe_item, metadata_chunk, metadata_file_name, transform_descriptors_of
from ._hf_export import DEFAULT_MAX_SHARD_SIZE, export_hf
from ._hf_layout import INDEX_FILE_NAME, SUFFIX
from ._load_items import stored_as
from ._paths import check_storage_file, open_regular
from .hf_storage import HuggingFaceStorageReader
from .reader import FileSystemReader

_VERIFY_STEP_BYTES = 8 << 20


def _entries(metadata: Metadata) -> List[Dict[str, Any]]:
    """One row per fqn: kind, dtype, shape, chunks and bytes (tensor bytes, or stored length of byte items)."""
    stored: Dict[str, List[int]] = {}
    for index, info in metadata.storage_data.items():
        stored.setdefault(index.fqn, []).append(info.length)
    rows = []
    for fqn, item in sorted(metadata.state_dict_metadata.items()):
        if isinstance(item, TensorStorageMetadata):
            dtype = item.properties.dtype
            element_size = dtype.itemsize
            row = {
                "kind": "tensor",
                "dtype": str(dtype).replace("torch.", ""),
                "shape": list(item.size),
                "chunks": len(item.chunks),
                "bytes": sum(numel(c.sizes) for c in item.chunks) * element_size,
            }
        else:
            lengths = stored.get(fqn, [])
            row = {"kind": "bytes", "dtype": None, "shape": None, "chunks": len(lengths), "bytes": sum(lengths)}
        rows.append({"fqn": fqn, **row})
    return rows


def _read_at(f: IO[bytes], offset: int, length: int) -> bytes:
    f.seek(offset)
    return f.read(length)


def _storage_file(path: str, index: Any, info: Any) -> str:
    """Where the data file of an item is, after the same confinement check as a load's."""
    named_by = f"{os.path.join(path, metadata_file_name())}: item {index.fqn!r}"
    check_storage_file(info.relative_path, path, path, named_by)
    return os.path.join(path, info.relative_path)


def _file_format(path: str, items: List[Any]) -> Optional[str]:
    """``items``: (is_tensor, storage info) of one data file. Tensor items decide before byte items."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        read_at = functools.partial(_read_at, f)
        header = functools.partial(_safetensors.read_header, read_at, 0, size, path)
        for is_tensor, info in sorted(items, key=lambda item: not item[0]):
            head = functools.partial(read_at, info.offset)
            stored = stored_as(info, header, head, is_tensor)
            if stored is not None:
                return Stored.TORCH_SAVE.value if stored is Stored.TORCH_SAVE else Stored.SAFETENSORS.value
    return None


def describe(path: str, metadata: Metadata) -> Dict[str, Any]:
    """What ``inspect`` reports about the checkpoint in ``path``."""
    entries = _entries(metadata)
    per_file: Dict[str, List[Any]] = {}
    transforms = set()
    for index, info in metadata.storage_data.items():
        if info.relative_path not in per_file:  # once per file, as a load checks
            _storage_file(path, index, info)
        per_file.setdefault(info.relative_path, []).append((index.offset is not None, info))
        transforms.update(transform_descriptors_of(info))
    files: Dict[str, Optional[int]] = {}
    formats = set()
    for name, items in sorted(per_file.items()):
        file_path = os.path.join(path, name)
        files[name] = os.path.getsize(file_path) if os.path.isfile(file_path) else None
        found = _file_format(file_path, items) if files[name] is not None else None
        if found is not None:
            formats.add(found)
    return {
        "path": path,
        "format": "+".join(sorted(formats)) or "unknown",
        "transforms": sorted(transforms),
        "version": getattr(metadata, "version", None),
        "files": files,
        "entries": entries,
        "total_bytes": sum(e["bytes"] for e in entries),
    }


def _table(rows: List[List[str]], right: Sequence[int]) -> List[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        .rstrip()
        for row in rows
    ]


def _print_description(info: Dict[str, Any]) -> None:
    rows = [["FQN", "KIND", "DTYPE", "SHAPE", "CHUNKS", "BYTES"]]
    for e in info["entries"]:
        shape = "-" if e["shape"] is None else str(e["shape"])
        rows.append([e["fqn"], e["kind"], e["dtype"] or "-", shape, str(e["chunks"]), str(e["bytes"])])
    lines = _table(rows, right=(4, 5))
    lines.append("")
    lines.append(f"format: {info['format']}")
    lines.append(f"transforms: {', '.join(info['transforms']) or 'none'}")
    lines.append(f"dcp version: {info['version'] or '-'}")
    lines.append("files:")
    files = [[name, "missing" if size is None else f"{size} bytes"] for name, size in info["files"].items()]
    lines += ["  " + line for line in _table(files, right=(1,))]
    lines.append(f"total: {len(info['entries'])} entries, {info['total_bytes']} bytes")
    print("\n".join(lines))


class _VerifyPlanner(DefaultLoadPlanner):
    """Byte items are checked, never unpickled: an untrusted checkpoint's objects could run code."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        payload = bytearray(value.read())
        if _torch_save.is_archive(payload):
            _torch_save.archive_members(payload)  # checks each archive member's CRC-32


def _verify_entry(reader: FileSystemReader, metadata: Metadata, fqn: str, item: Any) -> None:
    value = torch.empty(item.size, dtype=item.properties.dtype) if isinstance(item, TensorStorageMetadata) else None
    planner = _VerifyPlanner(flatten_state_dict=False)
    planner.set_up_planner({fqn: value}, metadata, True)
    reader.set_up_storage_reader(metadata, True)
    local = reader.prepare_local_plan(planner.create_local_plan())
    plans = reader.prepare_global_plan(planner.create_global_plan([local]))
    reader.read_data(planner.finish_plan(plans[0]), planner).wait()
    if value is None:
        return
    for index, info in metadata.storage_data.items():  # the block checksums too, which whole loads do not use
        chunk = metadata_chunk(item, index) if index.fqn == fqn else None
        if chunk is not None:
            stored = value
            for dim, (offset, size) in enumerate(zip(chunk.offsets, chunk.sizes)):
                stored = stored.narrow(dim, offset, size)
            check_blocks(_storage_file(reader.path, index, info), index, info, tensor_bytes(stored.contiguous()))


def _reader(path: str) -> FileSystemReader:
    """The reader of the checkpoint in ``path``: a Hugging Face directory's (no ``.metadata``, an index or
    ``*.safetensors`` files) or a DCP checkpoint's."""
    if os.path.isdir(path) and not any(name.endswith(".metadata") for name in os.listdir(path)):
        if any(name == INDEX_FILE_NAME or name.endswith(SUFFIX) for name in os.listdir(path)):
            return HuggingFaceStorageReader(path)
    return FileSystemReader(path)


def _read_metadata(path: str) -> Optional[Metadata]:
    logger = logging.getLogger(__package__)
    disabled, logger.disabled = logger.disabled, True  # the reader's ERROR line would repeat the one below
    try:
        return _reader(path).read_metadata()
    except Exception as e:
        print(f"error: cannot read the checkpoint metadata: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    finally:
        logger.disabled = disabled


def _inspect(args: argparse.Namespace) -> int:
    metadata = _read_metadata(args.path)
    if metadata is None:
        return 2
    try:
        info = describe(args.path, metadata)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_description(info)
    return 0


def _verify(args: argparse.Namespace) -> int:
    metadata = _read_metadata(args.path)
    if metadata is None:
        return 2
    reader = _reader(args.path)
    items = sorted(metadata.state_dict_metadata.items())
    progress = sys.stderr.isatty()
    # Every recorded checksum, also of bytes no load reads (the archive of an empty tensor).
    errors: Dict[str, str] = _checksum_errors(args.path, metadata)
    for n, (fqn, item) in enumerate(items, 1):
        try:
            _verify_entry(reader, metadata, fqn, item)
        except Exception as e:  # one damaged item must not hide the others
            errors.setdefault(fqn, f"{type(e).__name__}: {e}")
        if progress:
            print(f"\rverify: {n}/{len(items)}", end="\n" if n == len(items) else "", file=sys.stderr, flush=True)
    header_errors = _header_errors(args.path, metadata)
    total = sum(e["bytes"] for e in _entries(metadata))
    unchecked = _unchecked(metadata, errors)
    errors = dict(sorted(errors.items()))
    failed = bool(errors or header_errors)
    if args.json:
        summary = {"ok": not failed, "entries": len(items), "bytes": total, "errors": errors, "unchecked": unchecked}
        if header_errors:
            summary["files"] = header_errors
        print(json.dumps(summary, indent=2))
        return 1 if failed else 0
    for name, error in {**errors, **header_errors}.items():
        print(f"{name}: {error}")
    for fqn in unchecked:
        print(f"{fqn}: unchecked: read, but no checksum was recorded (written by stock torch or an older version)")
    if failed:
        problems = [f"{len(errors)} of {len(items)} entries could not be read"] if errors else []
        if header_errors:
            problems.append(f"{len(header_errors)} data file(s) whose safetensors header disagrees with the metadata")
        print("FAILED: " + "; ".join(problems))
    elif unchecked:
        print(f"UNCHECKED: {len(unchecked)} of {len(items)} entries carry no checksum; the other "
              f"{len(items) - len(unchecked)} verified")
    else:
        print(f"OK: {len(items)} entries, {total} bytes verified")
    return 1 if failed else 0


def _header_errors(path: str, metadata: Metadata) -> Dict[str, str]:
    """Data file -> how its safetensors header disagrees with the metadata about this package's entries in it.

    This package's loads place such entries by the metadata alone and never read the header; stock torch
    and the safetensors library read them by the header. A missing or truncated file is left to the
    items' own errors."""
    per_file: Dict[str, List[Any]] = {}
    for index, info in metadata.storage_data.items():
        if _safetensors.is_ours(info):
            per_file.setdefault(info.relative_path, []).append((index, info))
    errors: Dict[str, str] = {}
    for name, stored in sorted(per_file.items()):
        file_path = os.path.join(path, name)
        try:
            _storage_file(path, *stored[0])
            with open_regular(file_path) as f:
                header = _safetensors.read_header(functools.partial(_read_at, f), 0, None, f"{file_path} (offset 0)")
            if header is None:
                raise ValueError(f"{file_path}: does not start with a safetensors header")
            for index, info in stored:
                end = info.offset + info.length
                found = _safetensors.find_entry(header, index.fqn, index.offset, info.offset, end)
                expected = _safetensors.entry_from_metadata(info, metadata.state_dict_metadata.get(index.fqn), index)
                if found is None or (expected is not None and found != expected):
                    raise ValueError(
                        f"{file_path}: the safetensors header does not describe item {describe_item(index)} "
                        f"(bytes [{info.offset}, {end})) as the metadata does"
                    )
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as e:
            errors[name] = f"{type(e).__name__}: {e}"
    return errors


def _checksum_errors(path: str, metadata: Metadata) -> Dict[str, str]:
    """fqn -> why the stored bytes of one of its items do not match their recorded checksum."""
    errors: Dict[str, str] = {}
    for index, info in metadata.storage_data.items():
        if stored_crc32(info) is None or index.fqn in errors:
            continue
        item = describe_item(index)
        try:
            file_path = _storage_file(path, index, info)
            with open_regular(file_path) as f:
                size, end = os.fstat(f.fileno()).st_size, info.offset + info.length
                if end > size:
                    raise ValueError(
                        f"{file_path}: item {item} needs bytes [{info.offset}, {end}) but the file has {size} bytes "
                        "(truncated or damaged checkpoint)"
                    )
                f.seek(info.offset)
                crc, left = 0, info.length
                while left:
                    part = f.read(min(left, _VERIFY_STEP_BYTES))
                    crc, left = crc32(part, crc), left - len(part)
            check(file_path, index, info, crc)
        except (OSError, ValueError) as e:
            errors[index.fqn] = f"{type(e).__name__}: {e}"
    return errors


def _unchecked(metadata: Metadata, errors: Dict[str, str]) -> List[str]:
    """Entries read without error whose stored bytes carry no checksum."""
    return sorted(
        {index.fqn for index, info in metadata.storage_data.items() if stored_crc32(info) is None} - set(errors)
    )


class _Progress:
    """export-hf's progress line on stderr, rewritten in place at most a few times a second."""

    def __init__(self) -> None:
        self.shown = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self.shown < 0.25:
            return
        self.shown = now
        end = "\n" if done >= total else ""
        percent = 100 * done // total if total else 100
        print(f"\rexport-hf: {done / 1e6:.1f} of {total / 1e6:.1f} MB ({percent}%)", end=end, file=sys.stderr,
              flush=True)


def _export_hf(args: argparse.Namespace) -> int:
    try:
        exported = export_hf(args.checkpoint, args.out, args.max_shard_size, args.skip_non_tensors,
                             not args.no_sync, _Progress())
    except Exception as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"exported {exported.tensors} tensors, {exported.nbytes} bytes, into {len(exported.files)} file(s) "
          f"and {INDEX_FILE_NAME} in {args.out}")
    if exported.skipped:
        print(f"left out {len(exported.skipped)} non-tensor value(s): {', '.join(exported.skipped)}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    # A vendored copy runs as python -m yourpkg._vendor.dcp_filesystem.
    parser = argparse.ArgumentParser(prog=f"python -m {__package__}", description="DCP checkpoint tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("inspect", "list a checkpoint's entries, files and format"),
        ("verify", "read every item, list the ones that fail"),
    ):
        command = commands.add_parser(name, help=text, description=text)
        command.add_argument("path", help="checkpoint directory")
        command.add_argument("--json", action="store_true", help="print one JSON object")
    text = "time save and load here, ours and stock torch's, both formats"
    bench = commands.add_parser(
        "bench", help=text, description=f"{text}: a small benchmark of a generated state dict. The full one is "
        "`make bench` (benchmarks/bench.py) of a source checkout.",
    )
    _bench.add_arguments(bench)
    text = "write a DCP checkpoint as a Hugging Face directory of safetensors files"
    export = commands.add_parser(
        "export-hf", help=text, description=f"{text} (model-0000i-of-0000N.safetensors and "
        f"{INDEX_FILE_NAME}), reading it a tensor or a batch of tensors at a time.",
    )
    export.add_argument("checkpoint", help="DCP checkpoint directory (any world size, either format)")
    export.add_argument("out", help="output directory (created; must not hold a Hugging Face checkpoint already)")
    export.add_argument("--max-shard-size", type=_bench.parse_size, default=DEFAULT_MAX_SHARD_SIZE,
                        help="the most tensor bytes per file, e.g. 5GB (the default), 500MB")
    export.add_argument("--skip-non-tensors", action="store_true",
                        help="leave non-tensor values out (by default they are refused, by name)")
    export.add_argument("--no-sync", action="store_true", help="do not fsync the files written")
    args = parser.parse_args(argv)
    if args.command == "bench":
        return _bench.run(args)
    if args.command == "export-hf":
        return _export_hf(args)
    return _inspect(args) if args.command == "inspect" else _verify(args)

"""Hugging Face checkpoints through DCP: HuggingFaceStorageWriter and HuggingFaceStorageReader, on every torch.

Upstream torch has these classes from 2.8 (``torch.distributed.checkpoint.hf_storage``); these have the
same names, arguments and files on disk (see ``_hf_layout``), built on this package's writer and reader:
the writer streams each file (its header first, then each tensor's bytes, never a whole file in memory)
and records every tensor's CRC-32 in the header; the reader places every tensor by its file's header and
reads it as this package's reader reads its own SAFETENSORS files, checking the CRC-32s where recorded.
"""
from __future__ import annotations

import dataclasses
import queue
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from . import _cleanup, _compat, _safetensors, _save_lock
from ._checksum import record_blocks, record_crc32, stored_blocks, stored_crc32
from ._format import SerializationFormat, _StorageInfo
from ._gc import gc_paused
from ._hf_consolidate import consolidate_safetensors_files
from ._hf_layout import INDEX_FILE_NAME, SHARDED_DIR_NAME, file_name, index_bytes, names, scan
from .fs import PathLike, fsync_stream
from .reader import FileSystemReader
from .writer import FileSystemWriter

__all__ = ["HuggingFaceStorageWriter", "HuggingFaceStorageReader", "consolidate_safetensors_files"]


class HuggingFaceStorageWriter(FileSystemWriter):
    """A writer that writes a checkpoint in the Hugging Face safetensors format.

    Without ``save_distributed`` (one rank saving the full state dict) it writes
    ``model-0000i-of-0000N.safetensors`` files and ``model.safetensors.index.json``; with it, every rank
    writes its own ``shard-0000r-model-0000i-of-0000N.safetensors`` files and no index, and with
    ``enable_consolidation`` they go to ``path/sharded`` and the full tensors to ``path`` once all ranks
    have written. Non-tensor values are refused: a Hugging Face checkpoint holds tensors only.
    """

    def __init__(
        self,
        path: str,
        fqn_to_index_mapping: Optional[Dict[str, int]] = None,
        thread_count: int = 1,
        save_distributed: bool = False,
        enable_consolidation: bool = False,
        thread_count_consolidation: int = 1,
    ) -> None:
        """
        Initialize the huggingface writer pointing to path.

        Args:
            path: directory where the checkpoint will be written to.
            fqn_to_index_mapping: A mapping from tensor FQN to the index of the file that the tensor should be
                written to. Indices are from 1 to N, where N is the number of files. If None, then all the
                tensors on the same rank will be written to the same file.
            thread_count: Number of threads to use to write distributed checkpoint. Default to 1.
            save_distributed: If True, save the checkpoint using distributed APIs where every rank saves its own
                shard. Default is False which assumes rank-0 checkpointing of the full state_dict.
            enable_consolidation: If True, consolidate the sharded checkpoint after saving. The sharded tensors
                will be saved to path/sharded and the full tensors will be saved to path. Default to False.
            thread_count_consolidation: Number of threads to use for parallel processing of saving data to
                consolidated output files. Default to 1.
        """
        super().__init__(path=path, thread_count=thread_count, serialization_format=SerializationFormat.SAFETENSORS)
        self.fqn_to_index_mapping: Optional[Dict[str, int]] = fqn_to_index_mapping
        self.save_distributed = save_distributed
        self.enable_consolidation = enable_consolidation
        self.consolidated_output_path: Optional[str] = None
        self.thread_count_consolidation = thread_count_consolidation
        self._sharded_path()

    def _sharded_path(self) -> None:
        if self.enable_consolidation:
            self.consolidated_output_path = str(self.path)
            self.path = self.fs.concat_path(self.path, SHARDED_DIR_NAME)

    def reset(self, checkpoint_id: Optional[PathLike] = None) -> None:
        super().reset(checkpoint_id)
        if checkpoint_id:
            self._sharded_path()

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        values = [wi.index.fqn for wi in plan.items if wi.type == WriteItemType.BYTE_IO]
        if values:
            raise ValueError(
                f"{type(self).__name__} stores tensors only (a Hugging Face checkpoint holds nothing else), but "
                f"{names(values)} {'is not a tensor' if len(values) == 1 else 'are not tensors'}: "
                "leave non-tensor values out of the state dict"
            )
        fqns = [wi.index.fqn for wi in plan.items]
        twice = sorted({fqn for fqn in fqns if fqns.count(fqn) > 1}) if len(set(fqns)) != len(fqns) else []
        if twice:
            raise ValueError(
                f"{type(self).__name__}: this rank holds several chunks of {names(twice)}, and a Hugging Face file "
                "keeps one tensor per name"
            )
        if self.fqn_to_index_mapping is not None:
            unmapped = [fqn for fqn in fqns if fqn not in self.fqn_to_index_mapping]
            if unmapped:
                raise ValueError(f"fqn_to_index_mapping has no file index for {names(unmapped)}")
            bad = {k: v for k, v in self.fqn_to_index_mapping.items() if not isinstance(v, int) or v < 1}
            if bad:
                raise ValueError(f"fqn_to_index_mapping: file indices count from 1, got {bad}")
        return super().prepare_local_plan(plan)

    def prepare_global_plan(self, plans: List[SavePlan]) -> List[SavePlan]:
        if not self.save_distributed:
            self._check_one_writer_per_file(plans)
        plans = super().prepare_global_plan(plans)  # takes the directory's save lock
        first = self.rank if self._rank_local() and self.rank is not None else 0
        new_plans = []
        for i, plan in enumerate(plans, start=first + 1):
            storage_data: Dict[str, Any] = {}
            if self.fqn_to_index_mapping is not None:
                storage_data["fqn_to_index_mapping"] = self.fqn_to_index_mapping
            if self.save_distributed:
                storage_data["shard_index"] = i
            new_plans.append(dataclasses.replace(plan, storage_data=storage_data))
        return new_plans

    def _check_one_writer_per_file(self, plans: List[SavePlan]) -> None:
        """Without save_distributed every rank writes the same file names: no two ranks may write one file."""
        count = max(self.fqn_to_index_mapping.values()) if self.fqn_to_index_mapping else 1
        writers: Dict[int, List[int]] = {}
        for rank, plan in enumerate(plans):
            indices = {self.fqn_to_index_mapping[wi.index.fqn] if self.fqn_to_index_mapping else 1 for wi in plan.items}
            for index in indices:
                writers.setdefault(index, []).append(rank)
        for index, ranks in sorted(writers.items()):
            if len(ranks) > 1:
                raise ValueError(
                    f"{type(self).__name__}(save_distributed=False): ranks {ranks} all have tensors for "
                    f"{file_name(index, count)}: save the full state dict from one rank (dcp.save(..., no_dist=True) "
                    "there), or pass save_distributed=True (each rank writes shard files of its own)"
                )

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[List[WriteResult]]:
        if not plan.items:
            fut: Future[List[WriteResult]] = Future()
            fut.set_result([])
            return fut
        mapping: Optional[Dict[str, int]] = plan.storage_data.get("fqn_to_index_mapping")
        shard: Optional[int] = plan.storage_data.get("shard_index")
        count = max(mapping.values()) if mapping else 1
        buckets: Dict[int, List[WriteItem]] = {}
        for item in plan.items:
            buckets.setdefault(mapping[item.index.fqn] if mapping else 1, []).append(item)
        _cleanup.settle(self)  # an earlier save by this writer is over
        file_queue: queue.Queue = queue.Queue()
        for index, items in sorted(buckets.items()):
            name = file_name(index, count, shard)
            file_queue.put((self.fs.concat_path(self.path, name), name, items))
        # Local files get their CRC-32s into the header once written; an object store cannot go back.
        self._crc32_room = self.fs.local_path(self.path) is not None
        fut = self._write_data(planner, file_queue)
        if self._crc32_room:
            self._fill_in_crc32s(fut.value())
        return fut

    def _fill_in_crc32s(self, results: List[WriteResult]) -> None:
        """Write each file's CRC-32s (and its entries' block CRC-32s, where the writer took them) into its header."""
        per_file: Dict[str, Tuple[Dict[str, int], Dict[str, bytes]]] = {}
        for wr in results:
            crcs, blocks = per_file.setdefault(wr.storage_data.relative_path, ({}, {}))
            crcs[wr.index.fqn] = stored_crc32(wr.storage_data)
            found = stored_blocks(wr.storage_data)
            if found is not None and found.start == 0:
                blocks[wr.index.fqn] = found.crcs
        for name, (crcs, blocks) in per_file.items():
            path = self.fs.local_path(self.fs.concat_path(self.path, name))
            try:
                with open(path, "r+b") as f:
                    _safetensors.write_crc32s(f, crcs, blocks)
                    if self.sync_files:
                        fsync_stream(f)
            except BaseException as e:
                _cleanup.name_file(e, path)
                raise

    def finish(self, metadata: Metadata, results: List[List[WriteResult]]) -> None:
        try:
            if not self.save_distributed:
                self._write_index(results)
            elif self.enable_consolidation:
                mapping = self.fqn_to_index_mapping or dict.fromkeys(metadata.state_dict_metadata, 1)
                consolidate_safetensors_files(
                    input_dir=str(self.path),
                    output_dir=str(self.consolidated_output_path),
                    fqn_to_index_mapping=mapping,
                    num_threads=self.thread_count_consolidation,
                )
            _cleanup.settle(self)
        finally:
            _save_lock.release(self)

    def _write_index(self, results: List[List[WriteResult]]) -> None:
        """``model.safetensors.index.json``, replaced in one step once written."""
        weight_map = {wr.index.fqn: wr.storage_data.relative_path for wr_list in results for wr in wr_list}
        total_size = sum(wr.storage_data.length for wr_list in results for wr in wr_list)
        path = self.fs.concat_path(self.path, INDEX_FILE_NAME)
        tmp_path = self.fs.concat_path(self.path, INDEX_FILE_NAME + ".tmp")
        try:
            with self.fs.create_stream(tmp_path, "wb") as stream:
                stream.write(index_bytes(weight_map, total_size))
                if self.sync_files:
                    fsync_stream(stream)
            self.fs.rename(tmp_path, path)
            if self.sync_files:
                self.fs.sync_dir(self.path)
        except BaseException as e:
            _cleanup.name_file(e, tmp_path, path)
            raise

    @property
    def metadata_path(self) -> str:
        return INDEX_FILE_NAME


class HuggingFaceStorageReader(FileSystemReader):
    """A reader that reads a checkpoint in the Hugging Face safetensors format: a directory with
    ``model.safetensors.index.json`` and the files it names, or with ``*.safetensors`` files (one
    ``model.safetensors``, or the shard files of a distributed save), into any sharding."""

    def __init__(self, path: str, thread_count: int = 1) -> None:
        """
        Initialize the huggingface reader pointing to path.

        Args:
            path: directory where the checkpoint will be read from.
            thread_count: Number of threads to use to read distributed checkpoint. Default to 1.
        """
        super().__init__(path=path, thread_count=thread_count)

    @gc_paused()
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        try:
            tensors, _ = scan(self.fs, self.path)
        except Exception as e:
            self._log_metadata_error(e, e)
            raise
        state_dict_metadata: Dict[str, Any] = {}
        storage_data: Dict[MetadataIndex, Any] = {}
        for fqn, tensor in tensors.items():
            chunks = []
            for i, chunk in enumerate(tensor.chunks):
                offsets = torch.Size(chunk.offsets)
                chunks.append(ChunkStorageMetadata(offsets=offsets, sizes=torch.Size(chunk.entry.shape)))
                info = _StorageInfo(chunk.file, chunk.entry.begin, chunk.entry.end - chunk.entry.begin)
                _safetensors.mark_ours(info)  # its bytes are this entry's: read in place, no header needed
                if chunk.crc32 is not None:
                    record_crc32(info, chunk.crc32)
                if chunk.blocks is not None:
                    record_blocks(info, chunk.blocks)  # a part of the entry is read in whole checked blocks
                storage_data[MetadataIndex(fqn, offsets, i)] = info
            state_dict_metadata[fqn] = TensorStorageMetadata(
                properties=TensorProperties(dtype=tensor.dtype), size=torch.Size(tensor.size), chunks=chunks
            )
        metadata = Metadata(state_dict_metadata=state_dict_metadata, storage_data=storage_data)
        if _compat.StorageMeta is not None:
            metadata.storage_meta = _compat.StorageMeta()
            metadata.storage_meta.load_id = self.load_id
        return metadata

    def _get_metadata_path(self, rank: Optional[int] = None) -> PathLike:
        return self.fs.concat_path(self.path, INDEX_FILE_NAME)

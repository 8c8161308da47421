"""Raw byte views of CPU tensors, without NumPy (torch 2.1 + NumPy 2 has none)."""
from __future__ import annotations

import ctypes
import io
from typing import Any, Sequence

import torch


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A writable view of a contiguous CPU tensor's bytes; the caller keeps the tensor alive."""
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(bytearray())
    if not tensor.is_contiguous() or tensor.device.type != "cpu":
        raise ValueError("tensor_bytes needs a contiguous CPU tensor")
    return _view(tensor.data_ptr(), nbytes)


def storage_bytes(storage: torch.UntypedStorage) -> memoryview:
    """A view of all of a CPU storage's bytes; the caller keeps the storage alive."""
    nbytes = storage.nbytes()
    return _view(storage.data_ptr(), nbytes) if nbytes else memoryview(b"")


def address_of(buffer: bytearray) -> int:
    """Where ``buffer``'s bytes start; the caller keeps it alive and unresized."""
    return ctypes.addressof((ctypes.c_char * len(buffer)).from_buffer(buffer))


def _view(address: int, nbytes: int) -> memoryview:
    return memoryview((ctypes.c_ubyte * nbytes).from_address(address)).cast("B")


def tensor_from_bytes(buffer: bytearray, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
    if len(buffer) == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype).reshape(shape)


def byte_count(data: io.BytesIO) -> int:
    """The size of a BytesIO's contents. Not by ``getbuffer()``, whose memoryview can outlive an interrupted
    save in a reference cycle with the BytesIO: CPython 3.12.1's garbage collector then released the
    buffer of a BytesIO it had already freed (a SIGSEGV at exit after Ctrl-C)."""
    return len(data.getvalue())


def numel(sizes: Sequence[int]) -> int:
    """Elements of a tensor of these sizes."""
    count = 1
    for size in sizes:
        count *= size
    return count


def chunk_nbytes(item: Any) -> int:
    """Bytes of the chunk a tensor WriteItem stores."""
    return numel(item.tensor_data.chunk.sizes) * item.tensor_data.properties.dtype.itemsize

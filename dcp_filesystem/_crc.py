"""CRC-32 (zlib's) of large buffers on several cores: parts in threads, joined with crc32_combine."""
from __future__ import annotations

import os
import threading
import zlib
from typing import List

_POLY = 0xEDB88320  # reflected CRC-32 polynomial
_X_TO_0 = 1 << 31  # the polynomial 1, bit-reflected
_PART_BYTES = 8 << 20  # smaller buffers are not worth a thread


def _multiply_mod_poly(a: int, b: int) -> int:
    """a * b modulo the CRC polynomial, both bit-reflected."""
    product = 0
    mask = _X_TO_0
    while mask:
        if a & mask:
            product ^= b
        mask >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
    return product


# _X_TO_2N[k] is x^(2^k) modulo the polynomial.
_X_TO_2N = [_X_TO_0 >> 1]
for _ in range(63):
    _X_TO_2N.append(_multiply_mod_poly(_X_TO_2N[-1], _X_TO_2N[-1]))


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC-32 of A + B from crc32(A), crc32(B) and len(B), as zlib's crc32_combine."""
    shift = _X_TO_0
    bits, k = len2 * 8, 0
    while bits:
        if bits & 1:
            shift = _multiply_mod_poly(_X_TO_2N[k], shift)
        bits >>= 1
        k += 1
    return _multiply_mod_poly(shift, crc1) ^ crc2


def crc32(data: memoryview) -> int:
    """zlib.crc32(data), computed on up to one thread per core for large buffers (zlib releases the GIL)."""
    size = len(data)
    parts = min(os.cpu_count() or 1, size // _PART_BYTES)
    if parts < 2:
        return zlib.crc32(data)
    step = -(-size // parts)
    bounds = [(start, min(start + step, size)) for start in range(0, size, step)]
    crcs: List[int] = [0] * len(bounds)

    def part(i: int) -> None:
        crcs[i] = zlib.crc32(data[bounds[i][0] : bounds[i][1]])

    workers = [threading.Thread(target=part, args=(i,)) for i in range(1, len(bounds))]
    for worker in workers:
        worker.start()
    part(0)
    for worker in workers:
        worker.join()
    result = crcs[0]
    for (start, end), crc in zip(bounds[1:], crcs[1:]):
        result = crc32_combine(result, crc, end - start)
    return result

"""CRC-32 (zlib's polynomial): the fastest implementation installed, and joining the CRC-32s of parts.

zlib-ng (the ``zlib-ng`` package, an install requirement) computes the same CRC-32 several times
faster than the zlib Python links (19 vs 3.3 GiB/s on one core here) and has crc32_combine; without
it (a vendored copy where it is not installed), zlib's crc32 and this module's crc32_combine (Python's
zlib lacks one) are used, and the first writer or reader says so once at INFO (``log_implementation``).
"""
from __future__ import annotations

import array
import logging
import sys
import threading
from typing import Any, Tuple

_POLY = 0xEDB88320  # reflected CRC-32 polynomial
_X_TO_0 = 1 << 31  # the polynomial 1, bit-reflected


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


def _crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC-32 of A + B from crc32(A), crc32(B) and len(B), as zlib's crc32_combine."""
    if crc1 == 0 or len2 == 0:
        return crc2 if crc1 == 0 else crc1  # crc32(b"") is 0: nothing to shift
    shift = _X_TO_0
    bits, k = len2 * 8, 0
    while bits:
        if bits & 1:
            shift = _multiply_mod_poly(_X_TO_2N[k], shift)
        bits >>= 1
        k += 1
    return _multiply_mod_poly(shift, crc1) ^ crc2


crc32: Any
crc32_combine: Any
IMPLEMENTATION: str
"""Which CRC-32 runs: ``"zlib-ng X.Y.Z"`` or ``"zlib (Python's, X.Y.Z)"``; benchmarks print it."""
FAST = True
try:
    from zlib_ng import zlib_ng as _zlib_ng
    from zlib_ng.zlib_ng import crc32, crc32_combine  # noqa: F401 - this module's interface
except ImportError:
    import zlib as _zlib
    from zlib import crc32  # noqa: F401 - this module's interface

    crc32_combine = _crc32_combine
    FAST = False
    IMPLEMENTATION = f"zlib (Python's, {_zlib.ZLIB_RUNTIME_VERSION})"
else:
    IMPLEMENTATION = f"zlib-ng {getattr(_zlib_ng, 'ZLIBNG_RUNTIME_VERSION', '')}".rstrip()

SLOW_NOTE = (
    "the zlib-ng package is not installed: checksums use Python's zlib, about 6 times slower, which "
    "adds about 0.1 s per GB to a load (pip install zlib-ng, a requirement of "
    "dcp_filesystem, makes them run at memory speed)"
)
_logged = threading.Lock()


def crc32_blocks(data: memoryview, block_bytes: int, value: int = 0) -> Tuple[int, bytes]:
    """(the CRC-32 of ``data`` continuing ``value``, the CRC-32 of each ``block_bytes`` block of ``data`` on
    its own, the last one maybe shorter, as little-endian 32-bit words): one pass over the bytes."""
    crcs = array.array("I", (crc32(data[start : start + block_bytes]) for start in range(0, len(data), block_bytes)))
    for start, crc in zip(range(0, len(data), block_bytes), crcs):
        value = crc32_combine(value, crc, min(block_bytes, len(data) - start))
    if sys.byteorder != "little":
        crcs.byteswap()
    return value, crcs.tobytes()


def log_implementation(logger: logging.Logger) -> None:
    """Say once per process, at INFO, that the slow CRC-32 is used and how to get the fast one."""
    if not FAST and _logged.acquire(blocking=False):  # never released: once per process
        logger.info("CRC-32: %s; %s", IMPLEMENTATION, SLOW_NOTE)

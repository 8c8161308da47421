"""CRC-32 arithmetic: joining the CRC-32s of parts (zlib's crc32_combine, which Python's zlib lacks)."""
from __future__ import annotations

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

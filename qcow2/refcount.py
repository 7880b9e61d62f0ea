"""Refcounts: the entry codec, the refcount table and cluster allocation.

Mirrors QEMU's ``block/qcow2-refcount.c``.  A refcount block is one cluster of
``refcount_bits``-wide entries: big-endian integers for widths >= 8, packed LSB-first inside
each byte for widths 1, 2 and 4.
"""

from __future__ import annotations


def read_refcount(block: bytes | bytearray | memoryview, index: int, bits: int) -> int:
    """Entry ``index`` of a refcount block whose entries are ``bits`` wide (1..64)."""
    if bits >= 8:
        width = bits // 8
        start = index * width
        return int.from_bytes(block[start : start + width], "big")
    bit = index * bits
    return (block[bit // 8] >> (bit % 8)) & ((1 << bits) - 1)


def write_refcount(block: bytearray, index: int, bits: int, value: int) -> None:
    """Store ``value`` (0 .. 2**bits-1) as entry ``index`` of a ``bits``-wide refcount block."""
    if not 0 <= value < (1 << bits):
        raise ValueError(f"refcount {value} does not fit in {bits} bits")
    if bits >= 8:
        width = bits // 8
        start = index * width
        block[start : start + width] = value.to_bytes(width, "big")
        return
    bit = index * bits
    shift = bit % 8
    mask = ((1 << bits) - 1) << shift
    block[bit // 8] = (block[bit // 8] & ~mask) | (value << shift)

"""Compressed clusters: L2 descriptor decoding, deflate / zstd decompression.

A compressed L2 entry holds a host *byte* offset and a count of additional 512-byte
sectors (``docs/interop/qcow2.txt``).  Every host cluster touched by
``[coffset, coffset + csize)`` carries one reference per compressed entry.
"""

from __future__ import annotations

import zlib

import zstandard

from . import layout
from .errors import CorruptImageError, UnsupportedFeatureError


def parse_compressed_entry(entry: int, cluster_bits: int) -> tuple[int, int]:
    """``(coffset, csize)`` of a compressed L2 entry (QEMU's
    ``qcow2_parse_compressed_l2_entry``): host byte offset and bytes to read."""
    shift = layout.compressed_shift(cluster_bits)
    coffset = entry & layout.compressed_offset_mask(cluster_bits)
    nb_sectors = ((entry >> shift) & layout.compressed_sectors_mask(cluster_bits)) + 1
    return coffset, nb_sectors * 512 - (coffset & 511)


def decompress(data: bytes, cluster_size: int, compression_type: int, *, where: str) -> bytes:
    """Decompress one cluster; stops at ``cluster_size`` output bytes (the input may hold
    the start of the next compressed cluster).  ``where`` names the entry in errors."""
    try:
        if compression_type == layout.COMPRESSION_ZLIB:
            out = zlib.decompressobj(-12).decompress(data, cluster_size)
        elif compression_type == layout.COMPRESSION_ZSTD:
            out = _zstd_decompress(data, cluster_size)
        else:
            raise UnsupportedFeatureError(f"unknown compression type: {compression_type}")
    except (zlib.error, zstandard.ZstdError) as err:
        raise CorruptImageError(f"compressed cluster {where} does not decompress: {err}") from err
    if len(out) != cluster_size:
        raise CorruptImageError(
            f"compressed cluster {where} decompresses to {len(out)} bytes, not {cluster_size}"
        )
    return out


def _zstd_decompress(data: bytes, cluster_size: int) -> bytes:
    """Decompress zstd frames one after the other until ``cluster_size`` bytes exist."""
    out = bytearray()
    view = memoryview(data)
    dctx = zstandard.ZstdDecompressor()
    while len(out) < cluster_size and len(view):
        obj = dctx.decompressobj()
        chunk = obj.decompress(view)
        out += chunk
        if not obj.eof:
            break
        used = len(view) - len(obj.unused_data)
        if used <= 0:
            break
        view = view[used:]
    return bytes(out[:cluster_size])

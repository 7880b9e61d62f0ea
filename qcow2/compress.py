"""Compressed clusters: deflate / zstd codecs, and writing them.

A compressed L2 entry holds a host *byte* offset and a count of additional 512-byte
sectors (``docs/interop/qcow2.txt``).  Every host cluster touched by
``[coffset, coffset + csize)`` carries one reference per compressed entry.

* :func:`decompress`: the read side (the L2 descriptor is :class:`qcow2.l2.L2Decoder`'s);
* :func:`compress_cluster`: QEMU's ``qcow2_co_compress``;
* :class:`CompressedWriter`: QEMU's compressed write path (``qemu-img convert -c``).
"""

from __future__ import annotations

import zlib

from .errors import (
    CorruptImageError,
    InvalidImageError,
    Qcow2IOError,
    ReadOnlyError,
    UnsupportedFeatureError,
    signal_corruption,
)
from .format import layout

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .image import Image


def decompress(
    data: bytes, cluster_size: int, compression_type: int, *, where: str, path: str | None = None
) -> bytes:
    """Decompress one cluster; stops at ``cluster_size`` output bytes (the input may hold
    the start of the next compressed cluster).  ``where`` names the entry in errors,
    ``path`` the image."""
    import zstandard

    try:
        if compression_type == layout.COMPRESSION_ZLIB:
            out = zlib.decompressobj(-12).decompress(data, cluster_size)
        elif compression_type == layout.COMPRESSION_ZSTD:
            out = _zstd_decompress(data, cluster_size)
        else:
            raise UnsupportedFeatureError(f"unknown compression type: {compression_type}")
    except (zlib.error, zstandard.ZstdError) as err:
        # an I/O error for QEMU, not a corruption event: the image is not marked
        raise CorruptImageError(
            f"compressed cluster {where} does not decompress: {err}", path=path
        ) from err
    if len(out) != cluster_size:
        raise CorruptImageError(
            f"compressed cluster {where} decompresses to {len(out)} bytes, not {cluster_size}",
            path=path,
        )
    return out


def _zstd_decompress(data: bytes, cluster_size: int) -> bytes:
    """Decompress zstd frames one after the other until ``cluster_size`` bytes exist."""
    import zstandard

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


def compress_cluster(data: bytes, compression_type: int, limit: int) -> bytes | None:
    """QEMU's ``qcow2_co_compress``: raw deflate (wbits -12, memLevel 9) or one zstd frame
    (recording its content size); None if the result does not fit in ``limit`` bytes."""
    if compression_type == layout.COMPRESSION_ZSTD:
        import zstandard

        out = zstandard.ZstdCompressor().compress(data)
    elif compression_type == layout.COMPRESSION_ZLIB:
        obj = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9)
        out = obj.compress(data) + obj.flush()
    else:
        raise UnsupportedFeatureError(f"unknown compression type: {compression_type}")
    return out if len(out) <= limit else None


class CompressedWriter:
    """Writes guest clusters compressed into an open, writable image, as QEMU's
    ``qcow2_co_pwritev_compressed_part`` does (``qemu-img convert -c``).

    Compressed clusters are packed into host clusters one after the other
    (``qcow2_alloc_bytes``: the writer remembers the last partly used host cluster, as
    QEMU's ``free_byte_offset`` does for one open image); each touched host cluster gets one
    reference per compressed cluster.  Only unallocated (or plain zero) clusters can be
    written: anything else raises ``Qcow2IOError`` (EIO), as in QEMU.  Call :meth:`finish`
    after the last write (qemu-img's final empty write: the file end is sector aligned).
    """

    def __init__(self, image: Image) -> None:
        h = image.header
        if not image.writable:
            raise ReadOnlyError("image is opened read-only", path=image.path)
        if h.crypt_method != layout.CRYPT_NONE:
            raise UnsupportedFeatureError(
                "compressed writes are not supported on encrypted images", path=image.path
            )
        self.image = image
        #: QEMU's ``free_byte_offset``: where the next compressed cluster may start (0: none).
        self.free_byte_offset = 0

    def write(self, guest_offset: int, data: bytes) -> bool:
        """Write one guest cluster at cluster-aligned ``guest_offset``: ``data`` is a whole
        cluster, or the rest of the disk for its last, partial cluster (zero padded).
        Returns True if it was stored compressed, False if it did not shrink below a
        cluster and was written normally."""
        image = self.image
        h = image.header
        cs = h.cluster_size
        if guest_offset % cs or not 0 < len(data) <= cs:
            raise InvalidImageError(
                f"compressed write at {guest_offset:#x} of {len(data)} bytes is not one "
                "aligned cluster",
                path=image.path,
            )
        if len(data) < cs and guest_offset + len(data) != image.virtual_size:
            raise InvalidImageError(
                f"compressed write at {guest_offset:#x} of {len(data)} bytes: only the last "
                "cluster of the disk may be partial",
                path=image.path,
            )
        packed = compress_cluster(data + bytes(cs - len(data)), h.compression_type, cs - 1)
        if packed is None:
            image.write(guest_offset, data)
            return False
        clusters = image.clusters
        l1_index, index = divmod(guest_offset // cs, h.l2_entries)
        l2_offset, table = clusters.l2_for_write(l1_index)
        entry, _ = clusters.get_entry(table, index)
        if entry & layout.L2E_OFFSET_MASK:
            raise Qcow2IOError(
                f"compressed write at {guest_offset:#x}: the cluster is already allocated "
                f"(L2 entry {entry:#x})",
                path=image.path,
            )
        coffset = self._alloc_bytes(len(packed))
        if clusters.overlap_check is not None:
            clusters.overlap_check(coffset, len(packed))
        image.file.pwrite(coffset, packed)
        # compressed clusters never carry COPIED; their refcounts are durable first
        clusters.l2_cache.set_dependency(image.refcounts.cache)
        clusters.set_entry(table, index, clusters.decoder.compressed_entry(coffset, len(packed)))
        clusters.mark_l2_dirty(l2_offset, table)
        return True

    def _alloc_bytes(self, size: int) -> int:
        """QEMU's ``qcow2_alloc_bytes``: continue in the last partly used host cluster, or
        take the next free cluster (spanning into it when it directly follows)."""
        refcounts = self.image.refcounts
        cs = self.image.header.cluster_size
        offset = self.free_byte_offset
        if offset and refcounts.get(offset // cs) == refcounts.max_refcount:
            offset = 0
        if not offset or cs - offset % cs < size:
            new_cluster = refcounts.find_free(1) * cs
            if new_cluster == 0:
                signal_corruption(
                    "Preventing invalid allocation of compressed cluster at offset 0",
                    path=self.image.path,
                )
            if not offset or layout.align_up(offset, cs) != new_cluster:
                offset = new_cluster
        refcounts.update(offset, size, 1)
        self.free_byte_offset = offset + size if (offset + size) % cs else 0
        return offset

    def finish(self) -> None:
        """Flush the image and extend its file to a whole number of 512-byte sectors (QEMU
        does so "to ease reading with sector based I/Os")."""
        self.image.flush()
        f = self.image.file
        size = f.size()
        if size % 512:
            f.truncate(layout.align_up(size, 512))

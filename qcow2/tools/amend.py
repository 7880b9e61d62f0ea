"""``qemu-img amend`` for the options this tool changes: the compat level and lazy refcounts.

QEMU's ``qcow2_amend_options`` (``block/qcow2.c``) for ``compat`` and ``lazy_refcounts``:
an upgrade to 1.1 rewrites the header; a downgrade to 0.10 (``qcow2_downgrade``) first
refuses what version 2 cannot hold, then turns zero clusters into what version 2 can
(``qcow2_expand_zero_clusters``, for the cases that need no allocation).  The image is
worked on as an open host file and its header, like ``check``: amend runs on images that
``qcow2.open`` would repair or refuse first.

A refusal raises :class:`~qcow2.errors.UnsupportedFeatureError` with QEMU's message; other
failures are the package's usual errors.
"""

from __future__ import annotations

import os
import struct

from .. import overlap
from ..check import repair_image_file
from ..errors import UnsupportedFeatureError, c_hex, signal_corruption
from ..format import layout
from ..format.header import rewrite_cluster0
from ..format.layout import ClusterType
from ..format.snapshot_table import read_snapshot_table, validate_snapshot_l1
from ..l2 import L2Decoder

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator

    from ..format.header import Header
    from ..format.snapshot_table import SnapshotEntry
    from ..image import Image
    from ..io.fileio import HostFile

#: QEMU's refusal of lazy refcounts below compat 1.1.
LAZY_REFCOUNTS_NEED_V3 = (
    "Lazy refcounts only supported with compatibility level 1.1 and above "
    "(use compat=1.1 or greater)"
)


def amend_image(
    f: HostFile,
    header: Header,
    *,
    version: int | None = None,
    lazy_refcounts: bool | None = None,
    overlap_checks: int = overlap.DEFAULT,
) -> None:
    """Amend the image open (writable, locked) as ``f`` whose header is ``header``:
    switch to qcow2 ``version`` (2 or 3) and turn lazy refcounts on or off (None: keep).
    ``header`` follows the image; ``overlap_checks`` are the metadata overlap checks of
    the writes (:mod:`qcow2.overlap` flags, QEMU's ``overlap-check`` open option)."""
    target = header.version if version is None else version
    change_lazy = lazy_refcounts is not None and lazy_refcounts != header.lazy_refcounts
    if change_lazy and lazy_refcounts and target < 3:
        raise UnsupportedFeatureError(LAZY_REFCOUNTS_NEED_V3, path=f.path)
    if target != header.version:
        _switch_version(f, header, target, overlap_checks)
    if change_lazy and lazy_refcounts is not None:
        _switch_lazy_refcounts(f, header, lazy_refcounts)


def _switch_version(f: HostFile, h: Header, target: int, overlap_checks: int) -> None:
    """QEMU's version switch in ``qcow2_amend_options``: an upgrade rewrites the header;
    a downgrade (``qcow2_downgrade``) first refuses what v2 cannot hold and turns zero
    clusters into data clusters (zero-filled) or, without a backing file, holes."""
    if target == 2:
        if h.refcount_order != 4:
            raise UnsupportedFeatureError("compat=0.10 requires refcount_bits=16", path=f.path)
        if h.has_data_file:
            raise UnsupportedFeatureError("Cannot downgrade an image with a data file", path=f.path)
        virtual = h.size // 512 * 512
        snapshots = read_snapshot_table(
            f,
            h.snapshots_offset,
            h.nb_snapshots,
            path=f.path,
            version=h.version,
            virtual_size=virtual,
            cluster_size=h.cluster_size,
        )
        if any(sn.vm_state_size > 0xFFFFFFFF or sn.virtual_size != virtual for sn in snapshots):
            raise UnsupportedFeatureError(
                "Internal snapshots prevent downgrade of image", path=f.path
            )
        if h.dirty:
            repair_image_file(f, h)
        incompatible = h.incompatible_features & ~layout.INCOMPAT_COMPRESSION
        if incompatible:
            raise UnsupportedFeatureError(
                f"Cannot downgrade an image with incompatible features {incompatible:#x} set",
                path=f.path,
                bits=incompatible,
            )
        compressed = expand_zero_clusters(f, h, snapshots, overlap_checks)
        if h.compression_type != layout.COMPRESSION_ZLIB and compressed:
            raise UnsupportedFeatureError(
                "Cannot downgrade an image with zstd compression type and existing "
                "compressed clusters",
                path=f.path,
            )
        h.compatible_features = 0
        h.autoclear_features = 0
        h.incompatible_features = 0
        h.compression_type = layout.COMPRESSION_ZLIB
    h.version = target
    if target == 3:
        h.header_length = layout.HEADER_V3_LENGTH
        h.refcount_order = 4
    rewrite_cluster0(f, h)


def _switch_lazy_refcounts(f: HostFile, h: Header, enable: bool) -> None:
    """QEMU's lazy_refcounts amend: set or clear compatible bit 0 (a dirty image is
    repaired first when lazy refcounts are switched off)."""
    if h.lazy_refcounts == enable:
        return
    if h.version < 3:
        raise UnsupportedFeatureError(LAZY_REFCOUNTS_NEED_V3, path=f.path)
    if not enable and h.dirty:
        repair_image_file(f, h)
    h.compatible_features ^= layout.COMPAT_LAZY_REFCOUNTS
    rewrite_cluster0(f, h)


#: Entries of an L1 table read at once (bounds the memory of a downgrade).
_L1_CHUNK = 128 * 1024


def _l1_entries(f: HostFile, offset: int, entries: int) -> Iterator[tuple[int, int]]:
    """``(index, entry)`` of the non-zero entries of an L1 table, read in chunks and only
    where the file holds data (past its end and in holes every entry reads as 0): memory
    and time stay bounded by the file's real size, whatever size the table claims."""
    size = layout.L1_ENTRY_SIZE
    end = min(offset + entries * size, max(f.size(), offset))
    pos = offset
    while pos < end:
        try:
            data = os.lseek(f.fd, pos, os.SEEK_DATA)
        except OSError:
            return  # nothing but a hole up to the end of the file
        if data > pos:
            pos = offset + (data - offset) // size * size
            if pos >= end:
                return
        count = min(_L1_CHUNK, (end - pos) // size)
        first = (pos - offset) // size
        chunk = f.pread(pos, count * size)
        pos += count * size
        if not chunk.strip(b"\0"):
            continue  # all unallocated (the usual tail of a table claiming a huge size)
        for k, (entry,) in enumerate(struct.iter_unpack(">Q", chunk)):
            if entry:
                yield first + k, entry


def expand_zero_clusters(
    f: HostFile,
    h: Header,
    snapshots: list[SnapshotEntry],
    overlap_checks: int = overlap.DEFAULT,
) -> bool:
    """QEMU's ``qcow2_expand_zero_clusters`` for what needs no allocation: the active L1
    table, then each snapshot's (validated first, as QEMU does when it gets there).  Zero
    clusters that own a host cluster get zeros written there; plain zero clusters of an
    image without backing file become unallocated.  Returns whether compressed clusters
    exist.  Standard (not extended) L2 entries only: a downgrade refuses extended L2
    before.

    What QEMU treats as fatal corruption (an unaligned L2 table or zero cluster, a write
    that would hit metadata) is signaled as the driver signals it: the corrupt bit is set
    and :class:`~qcow2.errors.CorruptImageError` raised."""
    from ..image import Image

    image = Image(f, h, force_share=False, overlap_checks=overlap_checks)
    done: set[int] = set()
    with image.corruption_guard():
        compressed = _expand(image, h.l1_table_offset, h.l1_size, done, active=True)
    for sn in snapshots:
        validate_snapshot_l1(sn, cluster_size=h.cluster_size, path=f.path)
        with image.corruption_guard():
            compressed |= _expand(image, sn.l1_table_offset, sn.l1_size, done, active=False)
    f.flush()
    return compressed


def _expand(image: Image, l1_offset: int, l1_size: int, done: set[int], *, active: bool) -> bool:
    """:func:`expand_zero_clusters` for one L1 table (QEMU's ``expand_zero_clusters_in_l1``);
    ``done``: the L2 tables already handled."""
    f, h = image.file, image.header
    cs = h.cluster_size
    n = cs // 8
    decoder = L2Decoder(h, f.path)
    compressed = False
    for l1_index, l1_entry in _l1_entries(f, l1_offset, l1_size):
        l2_offset = decoder.l2_table_offset(l1_entry, l1_index)  # signals unaligned
        if not l2_offset or l2_offset in done:
            continue
        done.add(l2_offset)
        words = list(struct.unpack(f">{n}Q", f.pread(l2_offset, cs)))
        shared = image.refcounts.get(l2_offset // cs) > 1
        dirty = False
        for j, entry in enumerate(words):
            ctype = decoder.cluster_type(entry)
            if ctype == ClusterType.COMPRESSED:
                compressed = True
            elif ctype == ClusterType.ZERO_PLAIN:
                if h.backing_file:
                    raise UnsupportedFeatureError(
                        "Failed to turn zero into data clusters: zero clusters over a "
                        "backing file need new clusters (not supported by this tool)",
                        path=f.path,
                    )
                words[j] = 0
                dirty = True
            elif ctype == ClusterType.ZERO_ALLOC:
                host = entry & layout.L2E_OFFSET_MASK
                if host % cs:
                    signal_corruption(
                        f"Cluster allocation offset {host:#x} unaligned (L2 offset: "
                        f"{c_hex(l2_offset)}, L2 index: {c_hex(j)})",
                        path=f.path,
                    )
                image._overlap_check(host, cs)
                f.pwrite(host, bytes(cs))
                words[j] = host if shared else host | layout.OFLAG_COPIED
                dirty = True
        if dirty:
            ignore = overlap.ACTIVE_L2 | (0 if active else overlap.INACTIVE_L2)
            image._overlap_check(l2_offset, cs, ignore)
            f.flush()
            f.pwrite(l2_offset, struct.pack(f">{n}Q", *words))
    return compressed

"""Atomic, durable multi-extent writes: shadow paging with one header pointer switch.

:func:`commit_atomically` is what the vTPM store's durability rests on.  All new content
goes to fresh clusters, reachable only through fresh copies of the touched L2 tables and a
fresh copy of the active L1 table; nothing the current header reaches is modified.  One
small write of ``l1_size`` + ``l1_table_offset`` (header bytes 36-47) then switches the
image from the old state to the new one.

Reference accounting.  A refcount counts references along every L1 -> L2 -> data path
(qemu's ``calculate_refcounts``).  The new L2 copy takes over the active L1's path to each
entry it keeps unchanged, so those clusters keep their refcount (and their COPIED bits stay
exact, copied from the old table); only the new clusters (refcount 1 on allocation) and,
after the switch, the old L1, the old L2 tables and the replaced data clusters (-1 each)
change.  Therefore at every point of the sequence the on-disk image is, for ``qemu-img
check``, either exactly clean or has leaks only:

* before the switch the new clusters are allocated but unreachable (leaks);
* after the switch the old L1, old L2 tables and replaced clusters are still counted but
  no longer reached from the active L1 (leaks) until they are freed.

Snapshots sharing an old L2 table keep it: it only loses the active L1's reference.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING

from . import layout
from .errors import Qcow2Error, ReadOnlyError
from .fileio import fault_point
from .header import write_header_fields
from .transaction import entry_host_ranges

if TYPE_CHECKING:
    from .image import Image

#: Extended L2 bitmap for a cluster whose 32 subclusters are all allocated, none zero.
_EXTL2_ALL_ALLOCATED = layout.SUBCLUSTER_ALLOC_MASK


def _merge_writes(image: Image, writes: Sequence[tuple[int, bytes]]) -> dict[int, bytearray]:
    """Full new content of every touched guest cluster (old content + writes, in order)."""
    size = image.header.size
    cluster_size = image.header.cluster_size
    clusters: dict[int, bytearray] = {}
    for offset, data in writes:
        if offset < 0 or offset + len(data) > size:
            err = Qcow2Error(
                f"write of {len(data)} bytes at {offset:#x} outside the virtual disk "
                f"({size:#x} bytes)",
                path=image.path,
            )
            err.errno = errno.EINVAL
            raise err
        pos = offset
        end = offset + len(data)
        while pos < end:
            index = pos // cluster_size
            start = index * cluster_size
            buf = clusters.get(index)
            if buf is None:
                old = image.read(start, min(cluster_size, size - start))
                buf = bytearray(old) + bytearray(cluster_size - len(old))
                clusters[index] = buf
            chunk_end = min(end, start + cluster_size)
            buf[pos - start : chunk_end - start] = data[pos - offset : chunk_end - offset]
            pos = chunk_end
    return clusters


def commit_atomically(image: Image, writes: Sequence[tuple[int, bytes]]) -> None:
    """Apply all ``(guest_offset, data)`` extents as one atomic, durable update.

    After a crash at any point the image reads as exactly the old or exactly the new
    content and ``qemu-img check`` finds at most leaks.  On return the new content is on
    stable storage.  Later extents win where extents overlap.
    """
    if not image.writable:
        raise ReadOnlyError("image is opened read-only", path=image.path)
    header = image.header
    if header.has_data_file:
        raise Qcow2Error("atomic commits need the data inside the image", path=image.path)
    writes = [(offset, bytes(data)) for offset, data in writes if data]
    if not writes:
        image.flush()  # "durable on return" holds for an empty commit too
        return
    # No flush up front: nothing below modifies what the current header reaches, and the
    # flush before the switch makes earlier writes durable together with the new state.
    new_content = _merge_writes(image, writes)
    cluster_size = header.cluster_size
    entry_size = header.l2_entry_size
    l2_entries = header.l2_entries
    old_l1 = list(image.l1_table)
    new_l1 = list(old_l1)
    by_l1: dict[int, list[int]] = {}
    for index in sorted(new_content):
        by_l1.setdefault(index // l2_entries, []).append(index)

    allocated: list[tuple[int, int]] = []
    replaced: list[tuple[int, int]] = []
    old_l2_tables: list[int] = []

    def alloc(length: int) -> int:
        offset = image.refcounts.alloc(length)
        allocated.append((offset, length))
        return offset

    try:
        for l1_index, indexes in by_l1.items():
            old_l2 = old_l1[l1_index] & layout.L1E_OFFSET_MASK
            table = bytearray(image.l2_cache.get(old_l2)) if old_l2 else bytearray(cluster_size)
            for index in indexes:
                fault_point("commit.write_data")
                data_offset = alloc(cluster_size)
                # Fresh cluster, unreachable until the header switch.
                image.file.pwrite(data_offset, bytes(new_content[index]))
                pos = (index % l2_entries) * entry_size
                old_entry = int.from_bytes(table[pos : pos + 8], "big")
                replaced.extend(entry_host_ranges(image, old_entry))
                new_entry = data_offset | layout.OFLAG_COPIED
                table[pos : pos + 8] = new_entry.to_bytes(8, "big")
                if entry_size == layout.L2_ENTRY_SIZE_EXTENDED:
                    table[pos + 8 : pos + 16] = _EXTL2_ALL_ALLOCATED.to_bytes(8, "big")
            fault_point("commit.write_l2")
            new_l2 = alloc(cluster_size)
            image.file.pwrite(new_l2, bytes(table))
            new_l1[l1_index] = new_l2 | layout.OFLAG_COPIED
            if old_l2:
                old_l2_tables.append(old_l2)
        fault_point("commit.write_l1")
        l1_size = header.l1_size
        new_l1_offset = alloc(l1_size * layout.L1_ENTRY_SIZE)
        image.file.pwrite(new_l1_offset, struct.pack(f">{len(new_l1)}Q", *new_l1))
        # The switch below requires the new tables, the data and their refcounts on disk.
        image.flush()
        fault_point("commit.header_switch")
    except BaseException:
        # Nothing reachable points at the new clusters: give them back (or they leak).
        for offset, length in reversed(allocated):
            try:
                image.refcounts.free(offset, length)
            except Qcow2Error:  # the original error wins; these clusters only leak
                break
        raise
    try:
        write_header_fields(image.file, l1_size=l1_size, l1_table_offset=new_l1_offset)
        image.file.flush()
    except BaseException:
        # The switch may or may not have reached the file.  Follow what the header now
        # says and free nothing: either state's clusters merely leak.
        on_disk = layout.field_struct("l1_table_offset").unpack(
            image.file.pread(layout.field_offset("l1_table_offset"), 8)
        )[0]
        if on_disk == new_l1_offset:
            header.l1_table_offset = new_l1_offset
            image.l1_table[:] = new_l1
            for offset in old_l2_tables:
                image.l2_cache.forget(offset)
        raise

    old_l1_offset = header.l1_table_offset
    header.l1_table_offset = new_l1_offset
    image.l1_table[:] = new_l1
    for offset in old_l2_tables:
        image.l2_cache.forget(offset)
    # From here on a failure only leaks: the new state is committed and durable.
    fault_point("commit.free_old")
    image.refcounts.free(old_l1_offset, l1_size * layout.L1_ENTRY_SIZE)
    for offset in old_l2_tables:
        image.refcounts.update(offset, cluster_size, -1)
    for offset, length in replaced:
        image.refcounts.update(offset, length, -1)

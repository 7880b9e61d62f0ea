"""Atomic, durable multi-extent writes: one metadata transaction.

:func:`commit_atomically` is what the vTPM store's durability rests on.  All new content
goes to fresh clusters, reachable only through fresh copies of the touched L2 tables and a
fresh copy of the active L1 table, with the refcount blocks that change copied as well and
a new refcount table (:class:`qcow2.transaction.MetadataTransaction`); nothing the current
header reaches is modified.  One write of header bytes 36-71 switches from the old
generation to the new one, in which every cluster the old one used and the new one does
not (old L1, replaced L2 tables and data clusters, old refblocks and reftable) already has
refcount 0.  So at every point ``qemu-img check`` finds the image clean, not even leaking.

Reference accounting.  A refcount counts references along every L1 -> L2 -> data path
(qemu's ``calculate_refcounts``).  A new L2 copy takes over the active L1's path to each
entry it keeps unchanged, so those clusters keep their refcount (and their COPIED flags);
only the new data clusters (+1), the replaced ones (-1), the old and new tables change.
Snapshots sharing an old L2 table keep it: it only loses the active L1's reference.
"""

from __future__ import annotations

from .format import layout
from .transaction import MetadataTransaction

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

    from .image import Image


def merge_writes(image: Image, writes: Sequence[tuple[int, bytes]]) -> dict[int, bytearray]:
    """Full new content of every touched guest cluster (old content + writes, in order)."""
    size = image.header.size
    cluster_size = image.header.cluster_size
    clusters: dict[int, bytearray] = {}
    for offset, data in writes:
        pos = offset
        end = offset + len(data)
        while pos < end:
            index = pos // cluster_size
            start = index * cluster_size
            chunk_end = min(end, start + cluster_size)
            buf = clusters.get(index)
            if buf is None:
                if pos == start and chunk_end - start == cluster_size:
                    buf = bytearray(cluster_size)  # overwritten whole: no need to read it
                else:
                    old = image.read(start, min(cluster_size, size - start))
                    buf = bytearray(old) + bytearray(cluster_size - len(old))
                clusters[index] = buf
            buf[pos - start : chunk_end - start] = data[pos - offset : chunk_end - offset]
            pos = chunk_end
    return clusters


def commit_atomically(image: Image, writes: Sequence[tuple[int, bytes]]) -> dict[int, bytearray]:
    """Apply all ``(guest_offset, data)`` extents as one atomic, durable update; returns
    the new content of every guest cluster written, by index.

    Called by :meth:`Image.commit_atomically`, which has checked that the image is
    writable and every extent lies inside the virtual disk.  After a crash at any point
    the image reads as exactly the old or exactly the new content and ``qemu-img check``
    finds it clean.  On return the new content is on stable storage.  Later extents win
    where extents overlap.  Fault points: ``commit.write_metadata`` and
    ``commit.header_switch`` (both before the switch); with commit records
    (:meth:`Image.enable_commit_records`: one flush) ``commit.write_metadata``,
    ``commit.flush`` (before the flush) and ``commit.header_write`` (after it: the commit
    is durable).
    """
    header = image.header
    writes = [(offset, bytes(data)) for offset, data in writes if data]
    if not writes:
        image.flush()  # "durable on return" holds for an empty commit too
        return {}
    new_content = merge_writes(image, writes)
    cluster_size = header.cluster_size
    entry_size = header.l2_entry_size
    l2_entries = header.l2_entries
    by_l1: dict[int, list[int]] = {}
    for index in sorted(new_content):
        by_l1.setdefault(index // l2_entries, []).append(index)
    log = image.commit_log
    if log is not None:
        log.prepare()
    txn = MetadataTransaction(image, "commit", excluded=log.excluded() if log else frozenset())
    for l1_index, indexes in by_l1.items():
        old_l2 = image.clusters.l2_offset(l1_index)
        table = bytearray(image.l2_cache.get(old_l2)) if old_l2 else bytearray(cluster_size)
        for index in indexes:
            data_offset = txn.alloc(cluster_size)
            # Encrypted images: ciphertext for the NEW host offset (XTS tweak = host sector).
            txn.stage(data_offset, image.encrypt_data(data_offset, bytes(new_content[index])))
            pos = (index % l2_entries) * entry_size
            old_entry = int.from_bytes(table[pos : pos + 8], "big")
            for offset, length in image.clusters.decoder.host_ranges(old_entry):
                txn.release(offset, length)
            table[pos : pos + 8] = data_offset.to_bytes(8, "big")
            if entry_size == layout.L2_ENTRY_SIZE_EXTENDED:
                table[pos + 8 : pos + 16] = layout.L2_BITMAP_ALL_ALLOC.to_bytes(8, "big")
        # Only the rewritten entries change references: the COPIED flags of the others
        # stay as they are (their clusters' refcounts do not change).
        txn.replace_l2(l1_index, table, [index % l2_entries for index in indexes])
    txn.commit(log)
    return new_content

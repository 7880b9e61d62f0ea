"""Internal snapshots: create, apply (goto), delete, and read-only snapshot views.

Each operation is one :class:`qcow2.transaction.MetadataTransaction`: the new snapshot
table, the new active L1 (with COPIED recomputed, L2 tables copied where flags change) and
the new refcount structure are written to free clusters and switched in by one header
write, so a crash at any moment leaves the image exactly before or after the operation and
``qemu-img check`` clean (not even leaks).  QEMU's own in-place order
(``block/qcow2-snapshot.c``) cannot promise that: its refcounts and COPIED flags disagree
between steps.  Lookup rules, IDs, error messages and the snapshot table format are
qemu's:

* create: a copy of the active L1 (+1 on everything it reaches) and the table with the new
  entry;
* apply: the active L1 becomes a copy of the snapshot's (+1 on its tree, -1 on the old
  active tree), the disk size switches back to the snapshot's in the same write;
* delete: the table without the entry, -1 on the snapshot's tree and its L1.

A snapshot saved by QEMU's ``savevm`` also holds the VM state (the migration stream):
ordinary guest data past the end of the snapshot's disk, at :func:`vm_state_offset`,
reachable only through the snapshot's own L1 table (QEMU drops it from the active one);
:meth:`SnapshotView.read_vmstate` reads it.
"""

from __future__ import annotations

import errno
import struct
import time

from .errors import RefcountRangeError, SnapshotError
from .format import layout
from .format.snapshot_table import (
    SnapshotEntry,
    find_snapshot,
    new_snapshot_id,
    validate_snapshot_l1,
)
from .snapshot_view import SnapshotView, read_l1, vm_state_offset
from .transaction import MetadataTransaction

__all__ = [
    "SnapshotView",
    "apply_snapshot",
    "create_snapshot",
    "delete_snapshot",
    "vm_state_offset",
]

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

    from .image import Image


# Section: create / apply / delete


def _commit(txn: MetadataTransaction, what: str) -> None:
    """Commit ``txn``; I/O errors and refcount range errors become SnapshotError."""
    image = txn.image
    try:
        txn.commit()
    except OSError as err:
        raise _io_failure(image, what, err) from err
    except RefcountRangeError as err:
        raise SnapshotError(f"{what}: {err.message}", path=image.path) from err


def create_snapshot(
    image: Image,
    name: str,
    *,
    replace: bool = False,
    content: Sequence[tuple[int, bytes]] = (),
) -> SnapshotEntry:
    """Create snapshot ``name`` (ID = max + 1) of the active state; returns its entry.

    With ``content`` (``(guest_offset, data)`` extents, later ones win), the snapshot holds
    the active state with those extents applied, while the active state stays as it is:
    a past state can be filed under a tag in the same single header switch.

    Names need not be unique (qemu allows duplicates).  With ``replace``, every snapshot
    named ``name`` is deleted in the same transaction (one header switch: a crash leaves
    the old snapshot or the new one, never none), the result of qemu's delete + create.
    A refcount overflow (refcount_bits 1 or 2) raises :class:`SnapshotError` before
    anything is written.
    """
    if not 0 < len(name.encode("utf-8", "surrogateescape")) <= 0xFFFF:
        raise SnapshotError(
            f"invalid snapshot name (must be 1 to 65535 bytes): {name[:40]!r}", path=image.path
        )
    header = image.header
    entries = list(image.snapshot_entries)
    replaced = [e for e in entries if replace and e.name == name]
    entries = [e for e in entries if not (replace and e.name == name)]
    if len(entries) >= layout.MAX_SNAPSHOTS:
        raise SnapshotError(
            f"Could not create snapshot '{name}': too many snapshots",
            path=image.path,
            errno=errno.EFBIG,
        )
    for old in replaced:
        validate_snapshot_l1(old, cluster_size=header.cluster_size, path=image.path)
    txn = MetadataTransaction(image, "snapshot_create")
    for old in replaced:
        _drop_snapshot_tree(txn, old)
    now = time.time_ns()
    l1 = list(image.l1_table)
    l1_size = header.l1_size
    l1_offset = 0
    if l1_size:
        l1_offset = txn.alloc(l1_size * layout.L1_ENTRY_SIZE)
        txn.stage(l1_offset, _pack_l1([e & ~layout.OFLAG_COPIED for e in l1[:l1_size]]))
    entry = SnapshotEntry(
        id=new_snapshot_id(entries),
        name=name,
        l1_table_offset=l1_offset,
        l1_size=l1_size,
        date_sec=now // 10**9,
        date_nsec=now % 10**9 // 1000 * 1000,
        vm_clock_nsec=0,
        vm_state_size=0,
        disk_size=header.size,
        icount=0,
        virtual_size=header.size,
    )
    # The snapshot's L1 copy references the whole active tree once more.
    if replaced or content or not l1_size:
        txn.reference_tree(l1[:l1_size], 1)
    else:
        _reference_as_qemu(txn, l1[:l1_size], l1_offset)
    if content:
        snap_l1 = _divert(txn, [e & ~layout.OFLAG_COPIED for e in l1[:l1_size]], content)
        txn.stage(l1_offset, _pack_l1(snap_l1))
    txn.set_active_l1(l1)
    txn.set_snapshots([*entries, entry])
    _commit(txn, f"Could not create snapshot '{name}'")
    return entry


def _reference_as_qemu(txn: MetadataTransaction, l1: list[int], l1_offset: int) -> None:
    """``txn.reference_tree(l1, 1)`` for ``qemu-img snapshot -c``, refusing a damaged
    image where and as QEMU's ``qcow2_snapshot_create`` does, and leaving the file as it
    leaves it: QEMU checks the new L1 copy's place against metadata, writes the copy (the
    active L1 as it is, COPIED flags included), then walks the tree (an unaligned table or
    cluster is a corruption), then rewrites in place the refcount blocks whose counts change
    and the L2 tables and the L1 table whose COPIED flags clear, each checked against the
    other metadata (a refcount block that is also an active L2 table is refused there).
    The transaction writes none of those in place, so it checks where QEMU would write."""
    from . import overlap as ol
    from .errors import CorruptImageError

    image = txn.image
    cs = txn.cluster_size
    refcounts = image.refcounts
    per_block = refcounts.entries_per_block
    first = l1_offset >> txn.cluster_bits
    end = first + -(-len(l1) * layout.L1_ENTRY_SIZE // cs)
    if first // per_block >= len(refcounts.table) or not refcounts.table[first // per_block]:
        # QEMU's allocation of the copy needs a refcount block: it takes the next cluster
        # with refcount 0 and writes the block there first
        block = end
        while refcounts.get(block):
            block += 1
        image._overlap_check(block * cs, cs, ol.REFCOUNT_BLOCK)
    image._overlap_check(l1_offset, len(l1) * layout.L1_ENTRY_SIZE)
    try:
        txn.reference_tree(l1, 1)
        step = image.header.l2_entry_size // 8
        for index in range(len(l1)):  # QEMU's walk refuses an unaligned data cluster
            l2_offset = image.clusters.l2_offset(index)
            words = _l2_entries(image, l2_offset) if l2_offset else ()
            for pos in range(0, len(words), step):
                data = words[pos] & layout.L2E_OFFSET_MASK
                if not words[pos] & layout.OFLAG_COMPRESSED and data % cs:
                    image.clusters.decoder.data_offset(words[pos], l2_offset, pos // step)
        table = refcounts.table
        blocks = {first // per_block}
        blocks.update(c // per_block for c, d in txn.delta.items() if d)
        for index in sorted(blocks):
            offset = table[index] & layout.REFT_OFFSET_MASK if index < len(table) else 0
            if offset:
                image._overlap_check(offset, cs, ol.REFCOUNT_BLOCK)
        copied = layout.OFLAG_COPIED
        for index in range(len(l1)):
            l2_offset = image.clusters.l2_offset(index)
            if l2_offset and any(e & copied for e in _l2_entries(image, l2_offset)):
                image._overlap_check(l2_offset, cs, ol.ACTIVE_L2)
        if any(e & copied for e in l1):
            offset = image.header.l1_table_offset
            image._overlap_check(offset, len(l1) * layout.L1_ENTRY_SIZE, ol.ACTIVE_L1)
    except CorruptImageError:
        image.file.pwrite(l1_offset, _pack_l1(l1))
        raise


def _l2_entries(image: Image, l2_offset: int) -> tuple[int, ...]:
    """The 64-bit words of the L2 table at ``l2_offset`` (extended entries: both words)."""
    table = image.l2_cache.get(l2_offset)
    return struct.unpack(f">{len(table) // 8}Q", table)


def _divert(
    txn: MetadataTransaction, snap_l1: list[int], content: Sequence[tuple[int, bytes]]
) -> list[int]:
    """Point the snapshot's L1 ``snap_l1`` (a copy of the active one, whose tree has been
    referenced once more) at new copies of the L2 tables that ``content`` changes, with new
    data clusters for the changed guest clusters; returns the new snapshot L1.

    References move from the shared tables to the copies: the shared L2 table loses the
    snapshot's path (-1) and so do the data clusters the copy replaces; the copy's other
    entries keep the +1 they got through the shared table.  No entry of a copy carries
    COPIED (the table belongs to a snapshot only).
    """
    from .commit import merge_writes

    image = txn.image
    header = image.header
    cluster_size, entry_size = header.cluster_size, header.l2_entry_size
    l2_entries = header.l2_entries
    new_content = merge_writes(image, content)
    by_l1: dict[int, list[int]] = {}
    for index in sorted(new_content):
        by_l1.setdefault(index // l2_entries, []).append(index)
    for l1_index, indexes in by_l1.items():
        if l1_index >= len(snap_l1):
            raise SnapshotError(
                f"Could not create snapshot: guest cluster {indexes[0]} beyond the L1 table",
                path=image.path,
            )
        old_l2 = image.clusters.l2_offset(l1_index)
        table = bytearray(image.l2_cache.get(old_l2)) if old_l2 else bytearray(cluster_size)
        if old_l2:
            txn.add(old_l2, cluster_size, -1)
        for index in indexes:
            data_offset = txn.alloc(cluster_size)
            txn.stage(data_offset, image.encrypt_data(data_offset, bytes(new_content[index])))
            pos = (index % l2_entries) * entry_size
            old_entry = int.from_bytes(table[pos : pos + 8], "big")
            if old_entry & ~layout.OFLAG_COPIED:
                for offset, length in image.clusters.decoder.host_ranges(old_entry):
                    txn.add(offset, length, -1)
            table[pos : pos + 8] = data_offset.to_bytes(8, "big")
            if entry_size == layout.L2_ENTRY_SIZE_EXTENDED:
                table[pos + 8 : pos + 16] = layout.L2_BITMAP_ALL_ALLOC.to_bytes(8, "big")
        for pos in range(0, cluster_size, entry_size):
            word = int.from_bytes(table[pos : pos + 8], "big")
            if word & layout.OFLAG_COPIED:
                table[pos : pos + 8] = (word & ~layout.OFLAG_COPIED).to_bytes(8, "big")
        new_l2 = txn.alloc(cluster_size)
        txn.stage(new_l2, bytes(table))
        snap_l1[l1_index] = new_l2
    return snap_l1


def apply_snapshot(image: Image, key: str, *, name_only: bool = False) -> SnapshotEntry:
    """Revert the active state to snapshot ``key`` (ID first, then name, like qemu-img;
    the name alone with ``name_only``).

    A snapshot with a different disk_size switches the disk size back to it in the same
    header write.
    """
    entries = image.snapshot_entries
    index = find_snapshot(entries, key, id_first=True, path=image.path, name_only=name_only)
    snap = entries[index]
    header = image.header
    validate_snapshot_l1(snap, cluster_size=header.cluster_size, path=image.path)
    txn = MetadataTransaction(image, "snapshot_apply")
    snap_l1 = read_l1(image, snap.l1_table_offset, snap.l1_size)
    needed = layout.size_to_clusters(header.cluster_size * header.l2_entries, snap.virtual_size)
    new_l1 = snap_l1 + [0] * (needed - len(snap_l1))
    txn.reference_tree(snap_l1, 1)
    txn.reference_tree(image.l1_table, -1)
    txn.set_active_l1(new_l1)
    txn.set_virtual_size(snap.virtual_size)
    _commit(txn, f"Could not apply snapshot '{key}'")
    return snap


def delete_snapshot(image: Image, key: str, *, name_only: bool = False) -> SnapshotEntry:
    """Delete snapshot ``key`` (name first, then ID; the name alone with ``name_only``) and
    free what only it referenced."""
    entries = list(image.snapshot_entries)
    index = find_snapshot(entries, key, id_first=False, path=image.path, name_only=name_only)
    snap = entries.pop(index)
    validate_snapshot_l1(snap, cluster_size=image.header.cluster_size, path=image.path)
    txn = MetadataTransaction(image, "snapshot_delete")
    _drop_snapshot_tree(txn, snap)
    # COPIED comes back in the active tables wherever a refcount drops to 1.
    txn.set_active_l1(image.l1_table)
    txn.set_snapshots(entries)
    _commit(txn, f"Could not delete snapshot '{key}'")
    return snap


def _drop_snapshot_tree(txn: MetadataTransaction, snap: SnapshotEntry) -> None:
    """Record the references snapshot ``snap`` holds going away: -1 on its tree, its L1
    table released."""
    image = txn.image
    txn.reference_tree(read_l1(image, snap.l1_table_offset, snap.l1_size), -1)
    if snap.l1_size:
        txn.release(snap.l1_table_offset, snap.l1_size * layout.L1_ENTRY_SIZE)


def _io_failure(image: Image, what: str, err: OSError) -> SnapshotError:
    return SnapshotError(
        f"{what}: {err.strerror or err}", path=image.path, errno=err.errno or errno.EIO
    )


# Section: small helpers


def _pack_l1(entries: list[int]) -> bytes:
    return struct.pack(f">{len(entries)}Q", *entries)

"""Internal snapshots: create, apply (goto), delete, and read-only snapshot views.

A port of QEMU 7.2's ``block/qcow2-snapshot.c`` and ``qcow2_update_snapshot_refcount()``
(``block/qcow2-refcount.c``), in the same order of steps, so that a crash at any point
leaves only leaked clusters (refcount higher than the references), never a cluster that is
referenced but free:

* create: copy the active L1 to new clusters, +1 on everything it reaches (clearing COPIED
  in the active tables), write a new snapshot table, switch the header (bytes 60-71);
* apply: +1 on the snapshot's tree, overwrite the active L1 in place with the snapshot's,
  -1 on the old active tree, recompute COPIED;
* delete: write a new table without the entry and switch the header, -1 on the snapshot's
  tree, free its L1, recompute COPIED.

Works on :class:`qcow2.image.Image` internals: ``header``, ``file``, ``refcounts``,
``l1_table``, ``l2_cache``, ``snapshot_entries`` and its ``flush``/``resize``/``grow_l1``/
``read_with_l1`` methods.
"""

from __future__ import annotations

import errno
import struct
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from . import layout
from .clusters import ClusterType, classify_l2_entry
from .compress import parse_compressed_entry
from .errors import CorruptImageError, Qcow2Error, SnapshotError, UnsupportedFeatureError
from .fileio import fault_point
from .header import write_header_fields
from .refcount import RefcountRangeError
from .snapshot_table import (
    SnapshotEntry,
    find_snapshot,
    new_snapshot_id,
    serialize_snapshot_table,
    table_length,
    validate_snapshot_l1,
)

if TYPE_CHECKING:
    from .image import Image


# Section: L2 entry references


def entry_host_ranges(image: Image, entry: int) -> list[tuple[int, int]]:
    """Host byte ranges an L2 entry holds a reference on (what refcounts count for it).

    NORMAL and ZERO_ALLOC: the one cluster; COMPRESSED: the byte range of its data (each
    host cluster it touches counts once); ZERO_PLAIN and UNALLOCATED: nothing.
    """
    header = image.header
    ctype = classify_l2_entry(entry, header.extended_l2)
    if ctype == ClusterType.COMPRESSED:
        return [parse_compressed_entry(entry, header.cluster_bits)]
    if ctype in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
        return [(entry & layout.L2E_OFFSET_MASK, header.cluster_size)]
    return []


# Section: update_snapshot_refcount


def _walk_l2(
    image: Image,
    l2_offset: int,
    l2: bytearray,
    addend: int,
    update: Callable[[int, int, int], None],
) -> bool:
    """Apply ``addend`` to every cluster one L2 table references and recompute its COPIED
    bits in ``l2`` (in memory).  Returns True if ``l2`` changed."""
    header = image.header
    cluster_size = header.cluster_size
    cluster_bits = header.cluster_bits
    words_per_entry = header.l2_entry_size // 8
    words = struct.unpack(f">{cluster_size // 8}Q", l2)
    standard: list[tuple[int, int, int]] = []  # (word index, entry, data offset)
    runs: list[list[int]] = []  # contiguous host ranges [start, length]
    modified = False
    for index in range(0, len(words), words_per_entry):
        old = words[index]
        if not old & ~layout.OFLAG_COPIED:
            continue  # UNALLOCATED: nothing to count (the common case, kept fast)
        ctype = classify_l2_entry(old, header.extended_l2)
        if ctype == ClusterType.COMPRESSED:
            if addend:
                update(*parse_compressed_entry(old, cluster_bits), addend)
            if old & layout.OFLAG_COPIED:  # never valid on a compressed entry
                _set_word(l2, index, old & ~layout.OFLAG_COPIED)
                modified = True
        elif ctype in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
            data_offset = old & layout.L2E_OFFSET_MASK
            if data_offset % cluster_size:
                raise CorruptImageError(
                    f"Cluster allocation offset {data_offset:#x} unaligned "
                    f"(L2 offset: {l2_offset:#x}, L2 index: {index // words_per_entry:#x})",
                    path=image.path,
                    offset=data_offset,
                )
            standard.append((index, old, data_offset))
            if runs and runs[-1][0] + runs[-1][1] == data_offset:
                runs[-1][1] += cluster_size
            else:
                runs.append([data_offset, cluster_size])
    if addend:
        for run_start, run_length in runs:  # one checked update per contiguous run
            update(run_start, run_length, addend)
    if addend < 0:
        # Every caller follows a -1 walk with a 0 walk over the active tables, which sets
        # COPIED where it matters; tables only snapshots reach may keep stale bits (qemu's
        # readers and check ignore them).  Skipping the lookups and writes here halves
        # the work of apply and delete.
        return modified
    for index, old, data_offset in standard:
        new = old & ~layout.OFLAG_COPIED
        # After +1 every cluster is shared (refcount >= 2): COPIED goes, no lookup needed.
        if addend == 0 and image.refcounts.get(data_offset >> cluster_bits) == 1:
            new |= layout.OFLAG_COPIED
        if new != old:
            _set_word(l2, index, new)
            modified = True
    return modified


def update_snapshot_refcount(
    image: Image, l1_offset: int, l1_size: int, addend: int, *, table: list[int] | None = None
) -> None:
    """qemu's ``qcow2_update_snapshot_refcount``: add ``addend`` (-1, 0, +1) to every
    cluster reachable from the L1 table at ``l1_offset`` and recompute COPIED flags.

    For the active L1 the in-memory table is used and updated; ``table`` overrides what
    is read (apply passes the old active table after the on-disk one was replaced).  The
    L1 table is rewritten only when ``addend >= 0`` and it changed, as in qemu.  With
    ``addend = -1`` only refcounts change: unlike qemu, COPIED is not recomputed there,
    because every caller runs the ``0`` walk over the active L1 next.  A refcount overflow
    (:class:`RefcountRangeError`) undoes the walk's updates before it propagates (qemu
    leaves them as leaks).

    Write order: with ``addend > 0`` the tables with cleared COPIED bits reach the disk
    before the raised refcounts (left in the refcount cache: the caller flushes before
    anything points at the new references); with ``addend = 0`` the refcounts lowered
    before reach the disk before the tables with COPIED set again.  A crash in between can
    only leave COPIED = 0 on a cluster with refcount 1 (an extra copy on write later, never
    a shared cluster written in place).
    """
    if addend not in (-1, 0, 1):
        raise ValueError(f"addend must be -1, 0 or 1, not {addend}")
    header = image.header
    cluster_size = header.cluster_size
    if table is not None:
        l1 = table
    elif l1_offset == header.l1_table_offset:
        l1 = image.l1_table
    else:
        l1 = _read_l1(image, l1_offset, l1_size)
    refcounts = image.refcounts
    original_l1 = list(l1)
    l1_modified = False
    changed_tables: dict[int, bytearray] = {}
    applied: list[tuple[int, int]] = []

    def update(offset: int, length: int, delta: int) -> None:
        refcounts.update(offset, length, delta)
        applied.append((offset, length))

    try:
        for i, l1_entry in enumerate(l1[:l1_size]):
            l2_offset = l1_entry & layout.L1E_OFFSET_MASK
            if not l2_offset:
                continue
            if l2_offset % cluster_size:
                raise CorruptImageError(
                    f"L2 table offset {l2_offset:#x} unaligned (L1 index: {i:#x})",
                    path=image.path,
                    offset=l2_offset,
                )
            l2 = changed_tables.get(l2_offset)
            if l2 is None:
                l2 = bytearray(image.file.pread(l2_offset, cluster_size))
            if _walk_l2(image, l2_offset, l2, addend, update):
                changed_tables[l2_offset] = l2
            if addend:
                update(l2_offset, cluster_size, addend)
            if addend < 0:
                continue  # COPIED is left to the caller's 0 walk (see _walk_l2)
            new_l1_entry = l2_offset
            if addend == 0 and refcounts.get(l2_offset // cluster_size) == 1:
                new_l1_entry |= layout.OFLAG_COPIED
            if new_l1_entry != l1_entry:
                l1[i] = new_l1_entry
                l1_modified = True
    except RefcountRangeError:
        # Nothing was written yet: undo the refcount changes and the tables on disk
        # still match the refcounts as they were.
        for offset, length in reversed(applied):
            refcounts.update(offset, length, -addend)
        l1[:] = original_l1
        raise

    if not changed_tables and not (addend >= 0 and l1_modified):
        return  # the refcounts wait in the cache for the caller's next flush
    if addend == 0:
        # Refcounts lowered earlier first: COPIED may only be set once they are durable.
        image.flush()
    for offset, l2 in changed_tables.items():
        image.l2_cache.forget(offset)
        image.file.pwrite(offset, bytes(l2))
    if addend >= 0 and l1_modified:
        image.file.pwrite(l1_offset, _pack_l1(l1[:l1_size]))
    # With addend > 0 the cleared COPIED bits are durable before the raised refcounts,
    # which reach the disk with the caller's next flush.
    image.file.flush()


# Section: the snapshot table on disk


def write_snapshot_table(image: Image, entries: Sequence[SnapshotEntry], op: str) -> None:
    """qemu's ``qcow2_write_snapshots``: the whole table moves to new clusters.

    Allocate, write the entries, flush (the table and every refcount raised so far), switch
    ``nb_snapshots`` + ``snapshots_offset`` in one 12-byte header write (the commit
    point), free the old table.  qemu also flushes right after allocating; nothing points
    at the new clusters before the switch, so one flush before it is enough.  On failure
    before the switch the new clusters are freed again (or leak).
    """
    header = image.header
    data = serialize_snapshot_table(entries, header.version)
    new_offset = 0
    if data:
        new_offset = image.refcounts.alloc(len(data))
    try:
        fault_point(f"{op}.write_table")
        if data:
            # The header does not point here yet, so these clusters are unused by anyone.
            image.file.pwrite(new_offset, data)
        # The header switch requires the new table and its refcounts to be on disk.
        image.flush()
        fault_point(f"{op}.header_switch")
    except BaseException:
        if new_offset:
            _free_quietly(image, new_offset, len(data))
        raise
    old_offset, old_length = header.snapshots_offset, table_length(image.snapshot_entries)

    def adopt() -> None:
        header.nb_snapshots = len(entries)
        header.snapshots_offset = new_offset
        image.snapshot_entries = list(entries)

    try:
        write_header_fields(image.file, nb_snapshots=len(entries), snapshots_offset=new_offset)
        image.file.flush()
    except BaseException:
        # The switch may already be in the file: follow the header, free nothing (leaks).
        pos = layout.field_offset("nb_snapshots")
        nb, offset = struct.unpack(">IQ", image.file.pread(pos, 12))
        if (nb, offset) == (len(entries), new_offset):
            adopt()
        raise
    adopt()
    if old_offset and old_length:
        fault_point(f"{op}.free_old_table")
        image.refcounts.free(old_offset, old_length)


# Section: create / apply / delete


def _check_supported(image: Image) -> None:
    if image.header.has_data_file:
        raise UnsupportedFeatureError(
            "snapshots are not supported with an external data file", path=image.path
        )


def create_snapshot(image: Image, name: str) -> SnapshotEntry:
    """Create snapshot ``name`` (ID = max + 1) of the active state; returns its entry.

    Names need not be unique (qemu allows duplicates).  A refcount overflow (refcount_bits
    1 or 2) raises :class:`SnapshotError` and leaves only leaked clusters behind.
    """
    _check_supported(image)
    if not 0 < len(name.encode("utf-8", "surrogateescape")) <= 0xFFFF:
        raise SnapshotError(
            f"invalid snapshot name (must be 1 to 65535 bytes): {name[:40]!r}", path=image.path
        )
    header = image.header
    entries = list(image.snapshot_entries)
    if len(entries) >= layout.MAX_SNAPSHOTS:
        err = SnapshotError(f"Could not create snapshot '{name}': too many snapshots")
        err.errno = errno.EFBIG
        raise err
    now = time.time_ns()
    l1 = image.l1_table
    l1_size = header.l1_size
    l1_bytes = l1_size * layout.L1_ENTRY_SIZE
    l1_offset = image.refcounts.alloc(l1_bytes) if l1_bytes else 0
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
    try:
        fault_point("snapshot_create.write_l1")
        # Not referenced by any table yet: a crash here leaks the cluster.
        image.file.pwrite(l1_offset, _pack_l1(l1[:l1_size]))
        fault_point("snapshot_create.refcount")
        # Raise every refcount (and clear COPIED) before the new table points at the copy.
        update_snapshot_refcount(image, header.l1_table_offset, l1_size, 1)
        write_snapshot_table(image, [*entries, entry], "snapshot_create")
    except OSError as err:
        raise _io_failure(image, f"Could not create snapshot '{name}'", err) from err
    except RefcountRangeError as err:
        # qemu fails with -EINVAL here; what was already raised stays as leaks.
        _free_quietly(image, l1_offset, l1_bytes)
        raise SnapshotError(
            f"Could not create snapshot '{name}': {err.message}", path=image.path
        ) from err
    return entry


def apply_snapshot(image: Image, key: str) -> SnapshotEntry:
    """Revert the active state to snapshot ``key`` (ID first, then name, like qemu).

    A snapshot with a different disk_size resizes the image back to it first.
    """
    _check_supported(image)
    entries = image.snapshot_entries
    snap = entries[find_snapshot(entries, key, id_first=True, path=image.path)]
    validate_snapshot_l1(snap, cluster_size=image.header.cluster_size, path=image.path)
    try:
        if snap.virtual_size != image.header.size:
            fault_point("snapshot_apply.resize")
            image.resize(snap.virtual_size)
        # The active L1 is grown (never shrunk) to hold the snapshot's table.
        image.grow_l1(snap.l1_size)
        header = image.header
        cur_size = header.l1_size
        # Snapshot L1 copies carry stale COPIED bits; written as they are, a crash before
        # the final recomputation would leave COPIED on tables that are shared.  Without
        # them the worst case is COPIED = 0 on a table with refcount 1 (harmless).
        new_l1 = [
            e & ~layout.OFLAG_COPIED for e in _read_l1(image, snap.l1_table_offset, snap.l1_size)
        ]
        new_l1 += [0] * (cur_size - len(new_l1))
        fault_point("snapshot_apply.refcount")
        # The new state's refcounts go up before the active L1 points at it.
        update_snapshot_refcount(image, snap.l1_table_offset, snap.l1_size, 1)
        image.flush()
        fault_point("snapshot_apply.write_l1")
        old_l1 = list(image.l1_table)
        try:
            image.file.pwrite(header.l1_table_offset, _pack_l1(new_l1))
            image.file.flush()
        except BaseException:
            # Both states' references are held now: whatever reached the file is leaks
            # only.  Memory follows the file, as qemu's does after a failed goto.
            image.l1_table[:] = _read_l1(image, header.l1_table_offset, cur_size)
            raise
        # Memory follows the disk at once; the old table's references are dropped next.
        image.l1_table[:] = new_l1
        fault_point("snapshot_apply.drop_old")
        update_snapshot_refcount(image, header.l1_table_offset, cur_size, -1, table=old_l1)
        fault_point("snapshot_apply.copied")
        update_snapshot_refcount(image, header.l1_table_offset, cur_size, 0)
    except OSError as err:
        raise _io_failure(image, f"Could not apply snapshot '{key}'", err) from err
    except RefcountRangeError as err:
        raise SnapshotError(
            f"Could not apply snapshot '{key}': {err.message}", path=image.path
        ) from err
    return snap


def delete_snapshot(image: Image, key: str) -> SnapshotEntry:
    """Delete snapshot ``key`` (name first, then ID) and free what only it referenced."""
    _check_supported(image)
    entries = list(image.snapshot_entries)
    index = find_snapshot(entries, key, id_first=False, path=image.path)
    snap = entries.pop(index)
    validate_snapshot_l1(snap, cluster_size=image.header.cluster_size, path=image.path)
    try:
        # The snapshot leaves the directory first: from here a failure only leaks.
        write_snapshot_table(image, entries, "snapshot_delete")
        fault_point("snapshot_delete.refcount")
        update_snapshot_refcount(image, snap.l1_table_offset, snap.l1_size, -1)
        fault_point("snapshot_delete.free_l1")
        if snap.l1_size:
            image.refcounts.free(snap.l1_table_offset, snap.l1_size * layout.L1_ENTRY_SIZE)
        fault_point("snapshot_delete.copied")
        # Clusters that dropped back to refcount 1 get COPIED again in the active tables.
        update_snapshot_refcount(image, image.header.l1_table_offset, image.header.l1_size, 0)
    except OSError as err:
        raise _io_failure(image, f"Could not delete snapshot '{key}'", err) from err
    return snap


def _io_failure(image: Image, what: str, err: OSError) -> SnapshotError:
    failure = SnapshotError(f"{what}: {err.strerror or err}", path=image.path)
    failure.errno = err.errno or errno.EIO
    return failure


# Section: reading a snapshot without applying it


class SnapshotView:
    """Read-only access to a snapshot's guest content (``qemu-img convert -l`` semantics).

    The view is the snapshot's own disk size; clusters the snapshot does not allocate fall
    through to the backing file (or read as zeros), exactly like the active image.
    """

    def __init__(self, image: Image, entry: SnapshotEntry) -> None:
        validate_snapshot_l1(entry, cluster_size=image.header.cluster_size, path=image.path)
        self.image = image
        self.entry = entry
        self._l1 = _read_l1(image, entry.l1_table_offset, entry.l1_size)

    @property
    def virtual_size(self) -> int:
        """The snapshot's disk size."""
        return self.entry.virtual_size

    @property
    def name(self) -> str:
        """The snapshot's name."""
        return self.entry.name

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes of the snapshot's disk at ``offset`` (clipped at its end)."""
        if offset < 0 or length < 0:
            raise ValueError(f"invalid read range {offset}+{length}")
        end = min(offset + length, self.virtual_size)
        if offset >= end:
            return b""
        return self.image.read_with_l1(self._l1, offset, end - offset)


# Section: small helpers


def _read_l1(image: Image, offset: int, size: int) -> list[int]:
    raw = image.file.pread(offset, size * layout.L1_ENTRY_SIZE)
    return list(struct.unpack(f">{size}Q", raw))


def _set_word(table: bytearray, index: int, value: int) -> None:
    table[index * 8 : index * 8 + 8] = value.to_bytes(8, "big")


def _pack_l1(entries: list[int]) -> bytes:
    return struct.pack(f">{len(entries)}Q", *entries)


def _free_quietly(image: Image, offset: int, length: int) -> None:
    """Free clusters on an error path; if that fails too, they merely leak."""
    try:
        image.refcounts.free(offset, length)
    except Qcow2Error:
        pass

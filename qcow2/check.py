"""``qemu-img check`` for qcow2: consistency check and repair, with QEMU 7.2's findings.

A port of QEMU's ``qcow2_co_check_locked`` and its helpers in ``block/qcow2-refcount.c``
(``qcow2_check_refcounts``, ``calculate_refcounts``, ``check_refcounts_l1/l2``,
``check_refblocks``, ``compare_refcounts``, ``check_oflag_copied``,
``rebuild_refcount_structure``) and ``block/qcow2-snapshot.c``
(``qcow2_check_read_snapshot_table``, ``qcow2_check_fix_snapshot_table``).  The messages
QEMU prints on stderr are collected, in order, in :attr:`CheckResult.messages`.

Memory is bounded by the *file* size: the in-memory reference counter has one entry per
host cluster of the file (QEMU's IMRT), whatever the header claims.  References may reach at
most one cluster past the end of the file; anything further is a finding, not an allocation.

An L2 table referenced from several L1 tables (the active one and its snapshots) is scanned
once per check pass; its references are then counted once per referencing L1 entry, which
keeps a check of an image with many snapshots linear in the number of distinct tables.
"""

from __future__ import annotations

import errno
import os
import struct

from . import overlap as ol
from .errors import (
    CorruptImageError,
    Qcow2Error,
    Qcow2IOError,
    ReadOnlyError,
    RefcountRangeError,
    c_hex,
)
from .format import layout
from .format.header import read_header, write_header_fields
from .format.layout import ClusterType
from .format.refcount import RefcountTable, read_refcount, refblock_offset, write_refcount
from .format.snapshot_table import (
    incomplete_entries,
    read_snapshot_table,
    serialize_snapshot_table,
    table_length,
)
from .io.cache import TableCache
from .io.fileio import MAX_OFFSET
from .l2 import L2Decoder

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, Literal

    from .format.header import Header
    from .format.snapshot_table import SnapshotEntry
    from .io.fileio import HostFile

#: Repair modes of ``qemu-img check -r`` (BDRV_FIX_LEAKS, BDRV_FIX_ERRORS).
FIX_LEAKS = 1
FIX_ERRORS = 2
REPAIR_MODES = {None: 0, "leaks": FIX_LEAKS, "all": FIX_LEAKS | FIX_ERRORS}

_INT_MAX = (1 << 31) - 1
_ZERO_SHIFT = layout.SUBCLUSTER_ZERO_SHIFT
#: memoryview formats of the in-memory refcount table (not array.array: importing array
#: imports collections.abc, milliseconds of start-up).
_ARRAY_CODES: dict[int, Literal["B", "H", "I", "Q"]] = {
    1: "B",
    2: "B",
    4: "B",
    8: "B",
    16: "H",
    32: "I",
    64: "Q",
}


class CheckResult:
    """What ``qemu-img check`` reports (its JSON fields) plus the stderr findings.

    ``error`` is set when the check could not complete (qemu-img's "Check failed: ...",
    exit code 1); ``repaired`` holds the counts of the repairing pass when a repair ran and
    this result is the second, verifying pass ("Double checking the fixed image now...").
    """

    __slots__ = (
        "allocated_clusters",
        "check_errors",
        "compressed_clusters",
        "corruptions",
        "corruptions_fixed",
        "error",
        "filename",
        "format",
        "fragmented_clusters",
        "image_end_offset",
        "leaks",
        "leaks_fixed",
        "messages",
        "repaired",
        "total_clusters",
    )

    def __init__(
        self,
        filename: str,
        format: str = "qcow2",
        check_errors: int = 0,
        corruptions: int = 0,
        leaks: int = 0,
        corruptions_fixed: int = 0,
        leaks_fixed: int = 0,
        image_end_offset: int = 0,
        total_clusters: int = 0,
        allocated_clusters: int = 0,
        fragmented_clusters: int = 0,
        compressed_clusters: int = 0,
        messages: list[str] | None = None,
        error: str | None = None,
        repaired: bool = False,
    ) -> None:
        self.filename = filename
        self.format = format
        self.check_errors = check_errors
        self.corruptions = corruptions
        self.leaks = leaks
        self.corruptions_fixed = corruptions_fixed
        self.leaks_fixed = leaks_fixed
        self.image_end_offset = image_end_offset
        self.total_clusters = total_clusters
        self.allocated_clusters = allocated_clusters
        self.fragmented_clusters = fragmented_clusters
        self.compressed_clusters = compressed_clusters
        self.messages: list[str] = [] if messages is None else messages
        self.error = error
        self.repaired = repaired

    def add(self, other: CheckResult, *, with_frag_info: bool) -> None:
        """QEMU's ``qcow2_add_check_result``."""
        self.corruptions += other.corruptions
        self.leaks += other.leaks
        self.check_errors += other.check_errors
        self.corruptions_fixed += other.corruptions_fixed
        self.leaks_fixed += other.leaks_fixed
        if other.image_end_offset > self.image_end_offset:
            self.image_end_offset = other.image_end_offset
        if with_frag_info:
            self.total_clusters = other.total_clusters
            self.allocated_clusters = other.allocated_clusters
            self.fragmented_clusters = other.fragmented_clusters
            self.compressed_clusters = other.compressed_clusters
        if other.messages is not self.messages:
            self.messages.extend(other.messages)

    @property
    def exit_code(self) -> int:
        """qemu-img check's exit code: 0 clean, 1 failed, 2 corruptions, 3 leaks."""
        if self.error is not None or self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0

    def to_json(self) -> dict[str, Any]:
        """qemu-img's ImageCheck object: same keys, same order, zero optional keys omitted."""
        out: dict[str, Any] = {
            "image-end-offset": self.image_end_offset,
            "total-clusters": self.total_clusters,
            "check-errors": self.check_errors,
            "leaks": self.leaks,
            "leaks-fixed": self.leaks_fixed,
            "corruptions": self.corruptions,
            "corruptions-fixed": self.corruptions_fixed,
            "allocated-clusters": self.allocated_clusters,
            "filename": self.filename,
            "format": self.format,
            "fragmented-clusters": self.fragmented_clusters,
            "compressed-clusters": self.compressed_clusters,
        }
        always = ("check-errors", "filename", "format")
        return {k: v for k, v in out.items() if k in always or v}


class _L2Summary:
    """One scan of an L2 table: its findings and the clusters it references, per visit.

    ``events`` (kept only in exact mode) is the interleaved order of findings (text) and
    references (cluster lists), which only matters when a refcount overflows."""

    __slots__ = (
        "allocated",
        "clusters",
        "compressed",
        "corruptions",
        "events",
        "fragmented",
        "messages",
    )

    def __init__(
        self,
        messages: list[str],
        corruptions: int,
        clusters: list[int],
        allocated: int = 0,
        fragmented: int = 0,
        compressed: int = 0,
        events: list[tuple[str | None, list[int] | None]] | None = None,
    ) -> None:
        self.messages = messages
        self.corruptions = corruptions
        self.clusters = clusters
        self.allocated = allocated
        self.fragmented = fragmented
        self.compressed = compressed
        self.events = events

    def say(self, text: str) -> None:
        """Record a finding."""
        self.messages.append(text)
        if self.events is not None:
            self.events.append((text, None))

    def refs(self, clusters: list[int]) -> None:
        """Record one reference to each of ``clusters``."""
        self.clusters.extend(clusters)
        if self.events is not None:
            self.events.append((None, clusters))


class _Checker:
    """One check (possibly repairing) of an open image: QEMU's BDRVQcow2State + result."""

    def __init__(
        self, f: HostFile, header: Header, fix: int, overlap_checks: int = ol.DEFAULT
    ) -> None:
        self.f = f
        self.h = header
        #: what repair writes are checked against (the ``overlap-check`` open options)
        self.overlap_checks = overlap_checks
        self.path = f.path
        self.fix = fix
        self.cluster_bits = header.cluster_bits
        self.cluster_size = header.cluster_size
        self.refcount_bits = header.refcount_bits
        self.refcount_max = (1 << self.refcount_bits) - 1
        self.refblock_bits = header.cluster_bits + 3 - header.refcount_order
        self.extended_l2 = header.extended_l2
        self.l2_entry_size = header.l2_entry_size
        self.has_data_file = header.has_data_file
        #: The L2 entry format: QEMU's cluster types, compressed descriptors.
        self.decoder = L2Decoder(header, f.path)
        self.file_len = f.size()
        self.snapshots: list[SnapshotEntry] = []
        self.snapshots_offset = 0
        self.snapshots_size = 0
        self.l1_table = self._read_u64_table(header.l1_table_offset, header.l1_size)
        self.reftable = self._read_u64_table(
            header.refcount_table_offset, header.refcount_table_entries
        )
        self.refblock_cache: dict[int, bytearray] = {}
        self.signaled_corruption = False
        #: set once a fatal corruption was signaled on a writable image (QEMU's drv = NULL)
        self.dead = False

    def signal_corruption(self, message: str, res: CheckResult) -> None:
        """QEMU's ``qcow2_signal_corruption(fatal=true)``: on a writable image the corrupt
        bit is set and every further write fails, as QEMU makes the node unusable."""
        if self.dead or (self.signaled_corruption and not self.f.writable):
            return
        self.signaled_corruption = True
        if not self.f.writable:
            res.messages.append(
                f"qcow2: Image is corrupt: {message}; further non-fatal corruption events "
                "will be suppressed"
            )
            return
        res.messages.append(
            f"qcow2: Marking image as corrupt: {message}; further corruption events will be "
            "suppressed"
        )
        features = self.h.incompatible_features | layout.INCOMPAT_CORRUPT
        if self.h.version >= 3:
            write_header_fields(self.f, incompatible_features=features)
            self.f.flush()
            self.h.incompatible_features = features
        self.dead = True

    def overlap(self, offset: int, size: int) -> str | None:
        """QEMU's ``qcow2_check_metadata_overlap`` with the image's ``overlap-check``
        options ("cached" by default): the metadata a write of ``[offset, offset+size)``
        would hit, or None."""
        chk = self.overlap_checks
        if not size:
            return None
        if chk & ol.MAIN_HEADER and offset < self.cluster_size:
            return ol.NAMES[ol.MAIN_HEADER]
        mask = self.cluster_size - 1
        start = offset & ~mask
        end = layout.align_up(offset + size, self.cluster_size)

        def hits(other: int, length: int) -> bool:
            return bool(length) and other < end and start < other + length

        h = self.h
        if chk & ol.ACTIVE_L1 and h.l1_size and hits(h.l1_table_offset, h.l1_size * 8):
            return ol.NAMES[ol.ACTIVE_L1]
        if chk & ol.REFCOUNT_TABLE and hits(h.refcount_table_offset, len(self.reftable) * 8):
            return ol.NAMES[ol.REFCOUNT_TABLE]
        if chk & ol.SNAPSHOT_TABLE and hits(self.snapshots_offset, self.snapshots_size):
            return ol.NAMES[ol.SNAPSHOT_TABLE]
        if chk & ol.INACTIVE_L1:
            for sn in self.snapshots:
                if sn.l1_size and hits(sn.l1_table_offset, sn.l1_size * 8):
                    return ol.NAMES[ol.INACTIVE_L1]
        if chk & ol.ACTIVE_L2:
            for entry in self.l1_table:
                if entry & layout.L1E_OFFSET_MASK and hits(
                    entry & layout.L1E_OFFSET_MASK, self.cluster_size
                ):
                    return ol.NAMES[ol.ACTIVE_L2]
        if chk & ol.REFCOUNT_BLOCK:
            for entry in self.reftable:
                if entry & layout.REFT_OFFSET_MASK and hits(
                    entry & layout.REFT_OFFSET_MASK, self.cluster_size
                ):
                    return ol.NAMES[ol.REFCOUNT_BLOCK]
        if chk & ol.INACTIVE_L2:
            # QEMU reads each snapshot's L1 table from the file for this one
            for sn in self.snapshots:
                for entry in self._read_u64_table(sn.l1_table_offset, sn.l1_size):
                    if entry & layout.L1E_OFFSET_MASK and hits(
                        entry & layout.L1E_OFFSET_MASK, self.cluster_size
                    ):
                        return ol.NAMES[ol.INACTIVE_L2]
        bitmaps = h.bitmaps_extension
        if (
            chk & ol.BITMAP_DIRECTORY
            and h.autoclear_features & layout.AUTOCLEAR_BITMAPS
            and bitmaps is not None
            and hits(bitmaps[2], bitmaps[1])
        ):
            return ol.NAMES[ol.BITMAP_DIRECTORY]
        return None

    def checked_write(self, offset: int, data: bytes, res: CheckResult, what: str) -> None:
        """Write metadata after the overlap check; failures raise _CheckFailed(EIO) with
        QEMU's ``what: strerror`` report."""
        # A node QEMU made unusable (drv = NULL) still writes through to its file: only
        # the overlap check (with the image's options) stops a write.
        hit = self.overlap(offset, len(data))
        if hit is not None:
            self.signal_corruption(
                f"Preventing invalid write on metadata (overlaps with {hit})", res
            )
            res.messages.append(f"qemu-img: {what}: Input/output error")
            res.check_errors += 1
            raise _CheckFailed(errno.EIO)
        self.f.pwrite(offset, data)

    # Section: host I/O helpers

    def _read_u64_table(self, offset: int, entries: int) -> list[int]:
        """Read a big-endian u64 table; the part past the end of the file reads as zeros."""
        if entries <= 0:
            return []
        present = max(0, min(entries, (self.file_len - offset) // 8)) if offset >= 0 else 0
        data = self.f.pread(offset, present * 8) if present else b""
        return list(struct.unpack(f">{present}Q", data)) + [0] * (entries - present)

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``; zeros past the end of the file (also for offsets
        no file can reach)."""
        if offset >= self.file_len and offset <= MAX_OFFSET - length:
            return bytes(length)
        return self.f.pread(offset, length)  # EIO past QEMU's limit, as bdrv_pread says

    def _refresh_file_len(self) -> None:
        self.file_len = self.f.size()

    # Section: on-disk refcounts (qcow2_get_refcount / update_refcount)

    def _refblock(self, offset: int) -> bytearray:
        block = self.refblock_cache.get(offset)
        if block is None:
            block = bytearray(self.read(offset, self.cluster_size))
            self.refblock_cache[offset] = block
        return block

    def get_refcount(self, cluster: int) -> int:
        """The stored refcount of host cluster ``cluster``; raises CorruptImageError if the
        refcount block covering it is misaligned (QEMU's ``Refblock offset ... unaligned``)."""
        index = cluster >> self.refblock_bits
        block_offset = refblock_offset(self.reftable, index, self.cluster_size, path=self.path)
        if not block_offset:
            return 0
        block = self._refblock(block_offset)
        return read_refcount(block, cluster & ((1 << self.refblock_bits) - 1), self.refcount_bits)

    def set_refcount(self, cluster: int, value: int) -> None:
        """Store ``value`` as the refcount of ``cluster`` (its refcount block must exist)."""
        index = cluster >> self.refblock_bits
        block_offset = self.reftable[index] & layout.REFT_OFFSET_MASK
        block = self._refblock(block_offset)
        entry = cluster & ((1 << self.refblock_bits) - 1)
        write_refcount(block, entry, self.refcount_bits, value)
        if self.dead:
            # QEMU's dirty cached block is never written: after a fatal corruption its
            # node has no driver left to flush it (nor to close it)
            return
        # Write the whole sector holding the entry (QEMU flushes the cached block).
        byte = entry * self.refcount_bits // 8
        start = byte - byte % 512
        self.f.pwrite(block_offset + start, bytes(block[start : start + 512]))

    def stored_refcounts(self, nb_clusters: int) -> Callable[[int], int]:
        """A fast reader of stored refcounts for clusters ``0 .. nb_clusters-1``."""
        per_block = 1 << self.refblock_bits
        decoded: dict[int, list[int]] = {}
        bits = self.refcount_bits
        fmt = {8: "B", 16: "H", 32: "I", 64: "Q"}.get(bits)

        def lookup(cluster: int) -> int:
            index = cluster >> self.refblock_bits
            if index >= len(self.reftable):
                return 0
            block_offset = self.reftable[index] & layout.REFT_OFFSET_MASK
            if not block_offset or block_offset & (self.cluster_size - 1) or fmt is None:
                return self.get_refcount(cluster)
            values = decoded.get(block_offset)
            if values is None:
                values = list(struct.unpack(f">{per_block}{fmt}", self._refblock(block_offset)))
                decoded[block_offset] = values
            return values[cluster & (per_block - 1)]

        return lookup


class _Pass:
    """One ``qcow2_check_refcounts`` run: the in-memory refcount table (IMRT) and results."""

    def __init__(self, c: _Checker, res: CheckResult, nb_clusters: int, *, exact: bool) -> None:
        self.c = c
        self.res = res
        self.nb_clusters = nb_clusters
        self.imrt = self._new_array(nb_clusters)
        #: count references in traversal order (QEMU's order of overflow findings)
        self.exact = exact
        self.overflowed = False

    def _new_array(self, n: int) -> memoryview[int]:
        """``n`` zero refcounts, one native integer each (wide enough for refcount_bits)."""
        code = _ARRAY_CODES[self.c.refcount_bits]
        try:
            return memoryview(bytearray(n * struct.calcsize(code))).cast(code)
        except MemoryError as err:
            self.res.check_errors += 1
            raise _CheckFailed(errno.ENOMEM) from err

    def grow(self, n: int) -> None:
        """Make the IMRT cover ``n`` clusters (a new :attr:`imrt`: reload local copies)."""
        if n > len(self.imrt):
            bigger = self._new_array(n)
            bigger[: len(self.imrt)] = self.imrt
            self.imrt = bigger
        self.nb_clusters = max(self.nb_clusters, n)

    def msg(self, text: str) -> None:
        self.res.messages.append(text)

    def corruption(self, text: str) -> None:
        """Report a finding that counts as one corruption."""
        self.msg(text)
        self.res.corruptions += 1

    # Section: counting references (qcow2_inc_refcounts_imrt)

    def _range_clusters(self, offset: int, size: int, out: list[str]) -> list[int] | None:
        """Clusters touched by ``[offset, offset+size)``, or None (and a finding in ``out``)
        if the range ends one cluster or more past the end of the file."""
        if size <= 0:
            return []
        c = self.c
        if offset + size - c.file_len >= c.cluster_size:
            out.append(
                "ERROR: counting reference for region exceeding the end of the file by one "
                f"cluster or more: offset {offset:#x} size {size:#x}"
            )
            return None
        first = offset >> c.cluster_bits
        last = (offset + size - 1) >> c.cluster_bits
        return list(range(first, last + 1))

    def inc(self, offset: int, size: int) -> None:
        """Count one reference to every cluster of ``[offset, offset+size)``."""
        found: list[str] = []
        clusters = self._range_clusters(offset, size, found)
        if clusters is None:
            self.res.messages.extend(found)
            self.res.corruptions += 1
            return
        self.add_references(clusters, 1)

    def add_references(self, clusters: list[int], times: int) -> None:
        """Count ``times`` references to each cluster listed (with repeats)."""
        if not clusters:
            return
        top = max(clusters)
        if top >= len(self.imrt):
            self.grow(top + 1)
        imrt = self.imrt
        limit = self.c.refcount_max
        for k in clusters:
            value = imrt[k] + times
            if value > limit:
                self._overflow(k, value - limit)
                value = limit
            imrt[k] = value

    def _overflow(self, cluster: int, count: int) -> None:
        self.overflowed = True
        offset = cluster << self.c.cluster_bits
        for _ in range(count):
            self.msg(f"ERROR: overflow cluster offset={offset:#x}")
            self.corruption(
                "Use qemu-img amend to increase the refcount entry width or qemu-img convert "
                "to create a clean copy if the image cannot be opened for writing"
            )

    # Section: L1/L2 tables

    def check_l1(self, l1_offset: int, l1_size: int, *, active: bool) -> None:
        """QEMU's ``check_refcounts_l1``."""
        c = self.c
        if not l1_size:
            return
        self.inc(l1_offset, l1_size * layout.L1_ENTRY_SIZE)
        table = c.l1_table if active else c._read_u64_table(l1_offset, l1_size)
        cache = self.l2_cache
        for l1_entry in table:
            if not l1_entry:
                continue
            if l1_entry & layout.L1E_RESERVED_MASK:
                self.corruption(f"ERROR found L1 entry with reserved bits set: {l1_entry:x}")
            l2_offset = l1_entry & layout.L1E_OFFSET_MASK
            self.inc(l2_offset, c.cluster_size)
            if l2_offset & (c.cluster_size - 1):
                self.corruption(
                    f"ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; "
                    "L1 entry corrupted"
                )
            # The scan does not depend on which L1 refers to the table (only the active
            # one counts the fragmentation figures): one scan per table and pass.
            key = l2_offset
            summary = cache.get(key)
            if summary is None:
                summary, wrote = self._scan_l2(l2_offset)
                if not wrote:
                    cache[key] = summary
            self.res.corruptions += summary.corruptions
            if active:
                self.res.allocated_clusters += summary.allocated
                self.res.fragmented_clusters += summary.fragmented
                self.res.compressed_clusters += summary.compressed
            if summary.events is not None:
                for text, clusters in summary.events:
                    if text is not None:
                        self.res.messages.append(text)
                    elif clusters is not None:
                        self.add_references(clusters, 1)
                continue
            self.res.messages.extend(summary.messages)
            self.pending[key] = self.pending.get(key, 0) + 1
            self.summaries[key] = summary

    def flush_pending(self) -> None:
        """Count the data references of every L2 visit made so far."""
        for key, times in self.pending.items():
            self.add_references(self.summaries[key].clusters, times)
        self.pending.clear()

    def _scan_l2(self, l2_offset: int) -> tuple[_L2Summary, bool]:
        """QEMU's ``check_refcounts_l2`` for one visit; returns (summary, wrote_to_image)."""
        c = self.c
        s = _L2Summary([], 0, [], events=[] if self.exact else None)
        wrote = False
        data = c.f.pread(l2_offset, c.cluster_size) if l2_offset < c.file_len else b""
        if not data.strip(b"\0"):
            return s, wrote
        n = c.cluster_size // 8
        words = struct.unpack(f">{n}Q", data)
        step = 2 if c.extended_l2 else 1
        next_contiguous = 0
        cs_mask = c.cluster_size - 1
        # Fast path: a standard, aligned data cluster with nothing else set (the bulk).
        plain_bits = layout.OFLAG_COPIED | layout.L2E_OFFSET_MASK
        fast = step == 1 and s.events is None and not c.has_data_file
        bits, file_len, clusters = c.cluster_bits, c.file_len, s.clusters
        for i in range(0, n, step):
            entry = words[i]
            if fast and entry and not entry & ~plain_bits and not entry & cs_mask:
                offset = entry & layout.L2E_OFFSET_MASK
                if offset:
                    s.allocated += 1
                    if next_contiguous and offset != next_contiguous:
                        s.fragmented += 1
                    next_contiguous = offset + c.cluster_size
                    if offset < file_len:
                        clusters.append(offset >> bits)
                    else:
                        self._count_range(s, offset, c.cluster_size)
                    continue
            bitmap = words[i + 1] if step == 2 else 0
            if not entry and not bitmap:
                continue
            ctype = c.decoder.cluster_type(entry)
            if ctype != ClusterType.COMPRESSED and entry & layout.L2E_STD_RESERVED_MASK:
                s.say(f"ERROR found l2 entry with reserved bits set: {entry:x}")
                s.corruptions += 1
            if ctype == ClusterType.COMPRESSED:
                coffset, csize = c.decoder.compressed_range(entry)
                if entry & layout.OFLAG_COPIED:
                    s.say(
                        f"ERROR: coffset={coffset:#x}: copied flag must never "
                        "be set for compressed clusters"
                    )
                    entry &= ~layout.OFLAG_COPIED
                    s.corruptions += 1
                if c.has_data_file:
                    s.say(f"ERROR compressed cluster {i // step} with data file, entry={entry:#x}")
                    s.corruptions += 1
                    continue
                if bitmap:
                    s.say(
                        f"ERROR compressed cluster {i // step} with non-zero subcluster "
                        f"allocation bitmap, entry={entry:#x}"
                    )
                    s.corruptions += 1
                    continue
                self._count_range(s, coffset, csize)
                s.allocated += 1
                s.compressed += 1
                s.fragmented += 1
            elif ctype in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
                offset = entry & layout.L2E_OFFSET_MASK
                if (bitmap >> _ZERO_SHIFT) & bitmap:
                    s.corruptions += 1
                    s.say(
                        f"ERROR offset={offset:x}: Allocated cluster has corrupted subcluster "
                        "allocation bitmap"
                    )
                if offset & cs_mask:
                    s.corruptions += 1
                    if c.extended_l2:
                        contains_data = bool(bitmap & layout.L2_BITMAP_ALL_ALLOC)
                    else:
                        contains_data = not entry & layout.OFLAG_ZERO
                    if not contains_data:
                        fixing = bool(self.c.fix & FIX_ERRORS)
                        s.say(
                            f"{'Repairing' if fixing else 'ERROR'} offset={offset:x}: "
                            "Preallocated cluster is not properly aligned; L2 entry corrupted."
                        )
                        if fixing:
                            wrote = True
                            if self._fix_l2_entry_by_zero(s, l2_offset, i // step, bitmap):
                                continue
                    else:
                        s.say(
                            f"ERROR offset={offset:x}: Data cluster is not properly aligned; "
                            "L2 entry corrupted."
                        )
                s.allocated += 1
                if next_contiguous and offset != next_contiguous:
                    s.fragmented += 1
                next_contiguous = offset + c.cluster_size
                if not c.has_data_file:
                    self._count_range(s, offset, c.cluster_size)
            elif ctype == ClusterType.UNALLOCATED and bitmap & layout.L2_BITMAP_ALL_ALLOC:
                s.corruptions += 1
                s.say("ERROR: Unallocated cluster has non-zero subcluster allocation map")
        return s, wrote

    def _count_range(self, s: _L2Summary, offset: int, size: int) -> None:
        found: list[str] = []
        clusters = self._range_clusters(offset, size, found)
        for text in found:
            s.say(text)
        if clusters is None:
            s.corruptions += 1
        else:
            s.refs(clusters)

    def _fix_l2_entry_by_zero(self, s: _L2Summary, l2_offset: int, index: int, bitmap: int) -> bool:
        """QEMU's ``fix_l2_entry_by_zero``: make the entry ZERO_PLAIN; True on success."""
        c = self.c
        if c.extended_l2:
            bitmap |= bitmap << _ZERO_SHIFT
            bitmap &= layout.L2_BITMAP_ALL_ZEROES
            raw = struct.pack(">QQ", 0, bitmap)
        else:
            raw = struct.pack(">Q", layout.OFLAG_ZERO)
        try:
            c.f.pwrite(l2_offset + index * c.l2_entry_size, raw)
            c.f.flush()
        except Qcow2IOError as err:
            s.say(f"ERROR: Failed to overwrite L2 table entry: {err.message}")
            self.res.check_errors += 1
            return False
        s.corruptions -= 1
        self.res.corruptions_fixed += 1
        return True

    # Section: the whole reference count (calculate_refcounts)

    def calculate(self) -> bool:
        """QEMU's ``calculate_refcounts``; returns whether a rebuild is needed."""
        c = self.c
        self.l2_cache: dict[int, _L2Summary] = {}
        self.summaries: dict[int, _L2Summary] = {}
        self.pending: dict[int, int] = {}
        self.inc(0, c.cluster_size)
        self.check_l1(c.h.l1_table_offset, c.h.l1_size, active=True)
        if c.has_data_file and c.snapshots:
            self.corruption(f"ERROR {len(c.snapshots)} snapshots in image with data file")
        for sn in c.snapshots:
            if sn.l1_table_offset & (c.cluster_size - 1):
                self.corruption(
                    f"ERROR snapshot {sn.id} ({sn.name}) l1_offset={c_hex(sn.l1_table_offset)}: "
                    "L1 table is not cluster aligned; snapshot table entry corrupted"
                )
                continue
            if sn.l1_size > layout.MAX_L1_BYTES // layout.L1_ENTRY_SIZE:
                self.corruption(
                    f"ERROR snapshot {sn.id} ({sn.name}) l1_size={c_hex(sn.l1_size)}: "
                    "L1 table is too large; snapshot table entry corrupted"
                )
                continue
            self.check_l1(sn.l1_table_offset, sn.l1_size, active=False)
        self.flush_pending()
        self.inc(c.snapshots_offset, c.snapshots_size)
        self.inc(c.h.refcount_table_offset, len(c.reftable) * 8)
        crypto = c.h.crypto_header
        if crypto is not None and crypto[1]:
            self.inc(crypto[0], crypto[1])
        self._count_bitmaps()
        return self._check_refblocks()

    def _count_bitmaps(self) -> None:
        """QEMU's ``qcow2_check_bitmaps_refcounts`` (directory, tables, data clusters)."""
        c = self.c
        ext = c.h.bitmaps_extension
        if ext is None or not c.h.autoclear_features & layout.AUTOCLEAR_BITMAPS:
            return
        nb, dir_size, dir_offset = ext
        if not nb:
            return
        self.inc(dir_offset, dir_size)
        if dir_size > 64 * 1024 * 1024:
            self.res.corruptions += 1
            return
        directory = c.read(dir_offset, dir_size)
        pos = 0
        entry_struct = layout.BITMAP_DIR_ENTRY_STRUCT
        while pos + entry_struct.size <= len(directory) and nb:
            table_offset, table_size, _flags, _type, _gran, name_size, extra = (
                entry_struct.unpack_from(directory, pos)
            )
            pos += layout.align_up(entry_struct.size + extra + name_size, 8)
            nb -= 1
            self.inc(table_offset, table_size * 8)
            for entry in c._read_u64_table(table_offset, min(table_size, 1 << 22)):
                offset = entry & layout.BME_TABLE_ENTRY_OFFSET_MASK
                if offset & (c.cluster_size - 1) or (
                    not offset and entry & ~layout.BME_TABLE_ENTRY_FLAG_ALL_ONES
                ):
                    self.res.corruptions += 1
                    continue
                if offset:
                    self.inc(offset, c.cluster_size)

    def _check_refblocks(self) -> bool:
        """QEMU's ``check_refblocks``; returns whether a rebuild is needed."""
        c = self.c
        rebuild = False
        fixing = bool(c.fix & FIX_ERRORS)
        for i, raw in enumerate(c.reftable):
            offset = raw & layout.REFT_OFFSET_MASK
            cluster = offset >> c.cluster_bits
            if raw & layout.REFT_RESERVED_MASK:
                self.corruption(f"ERROR refcount table entry {i} has reserved bits set")
                rebuild = True
                continue
            if offset & (c.cluster_size - 1):
                self.corruption(
                    f"ERROR refcount block {i} is not cluster aligned; refcount table entry "
                    "corrupted"
                )
                rebuild = True
                continue
            if cluster >= self.nb_clusters:
                self.res.corruptions += 1
                self.msg(
                    f"{'Repairing' if fixing else 'ERROR'} refcount block {i} is outside image"
                )
                if fixing:
                    if offset > MAX_OFFSET - c.cluster_size:
                        # QEMU: -EINVAL before any truncate, so no "Could not resize" line
                        rebuild = True
                        self.msg(f"ERROR could not resize image: {os.strerror(errno.EINVAL)}")
                        continue
                    try:
                        c.f.truncate(offset + c.cluster_size)
                        c._refresh_file_len()
                    except Qcow2IOError as err:
                        rebuild = True
                        reason = os.strerror(err.errno)
                        self.msg(f"qemu-img: Could not resize file: {reason}")
                        self.msg(f"ERROR could not resize image: {reason}")
                        continue
                    self.grow(layout.size_to_clusters(c.cluster_size, c.file_len))
                    self.res.corruptions -= 1
                    self.res.corruptions_fixed += 1
                    self.inc(offset, c.cluster_size)
                continue
            if offset:
                self.inc(offset, c.cluster_size)
                if self.imrt[cluster] != 1:
                    self.corruption(f"ERROR refcount block {i} refcount={self.imrt[cluster]}")
                    rebuild = True
        return rebuild

    # Section: comparing with the stored refcounts (compare_refcounts)

    def compare(self, fix: int) -> tuple[bool, int]:
        """QEMU's ``compare_refcounts``; returns (rebuild needed, highest used cluster)."""
        c = self.c
        rebuild = False
        highest = 0
        stored = c.stored_refcounts(self.nb_clusters)
        imrt = self.imrt
        for i in range(self.nb_clusters):
            try:
                refcount1 = stored(i)
            except (CorruptImageError, Qcow2IOError) as err:
                if isinstance(err, CorruptImageError):
                    self._signal_corruption(err)
                self.msg(f"Can't get refcount for cluster {i}: {os.strerror(err.errno)}")
                self.res.check_errors += 1
                continue
            refcount2 = imrt[i]
            if refcount1 or refcount2:
                highest = i
            if refcount1 == refcount2:
                continue
            fixed_kind = None
            if refcount1 == 0:
                rebuild = True
            elif refcount1 > refcount2 and fix & FIX_LEAKS:
                fixed_kind = "leaks"
            elif refcount1 < refcount2 and fix & FIX_ERRORS:
                fixed_kind = "corruptions"
            label = "Repairing" if fixed_kind else "ERROR" if refcount1 < refcount2 else "Leaked"
            self.msg(f"{label} cluster {i} refcount={refcount1} reference={refcount2}")
            if fixed_kind:
                try:
                    c.set_refcount(i, refcount2)
                except Qcow2Error:
                    pass
                else:
                    if fixed_kind == "leaks":
                        self.res.leaks_fixed += 1
                    else:
                        self.res.corruptions_fixed += 1
                    continue
            if refcount1 < refcount2:
                self.res.corruptions += 1
            else:
                self.res.leaks += 1
        return rebuild, highest

    def _signal_corruption(self, err: CorruptImageError) -> None:
        self.c.signal_corruption(err.message, self.res)

    # Section: rebuilding the refcount structure

    def alloc_imrt(self, count: int, first_free: list[int]) -> int:
        """QEMU's ``alloc_clusters_imrt``: first fit of ``count`` free clusters in the IMRT."""
        imrt = self.imrt
        cluster = first_free[0]
        first_gap = True
        contiguous = 0
        while cluster < self.nb_clusters and contiguous < count:
            if not imrt[cluster]:
                contiguous += 1
                if first_gap:
                    first_free[0] = cluster
                    first_gap = False
            elif contiguous:
                contiguous = 0
            cluster += 1
        if contiguous < count:
            self.grow(cluster + count - contiguous)
            self.nb_clusters = cluster + count - contiguous
            imrt = self.imrt
        cluster -= contiguous
        for k in range(cluster, cluster + count):
            imrt[k] = 1
        return cluster << self.c.cluster_bits

    def _refblock_bytes(self, index: int) -> bytes:
        """The IMRT slice that is refblock ``index``, in the on-disk encoding."""
        c = self.c
        per_block = 1 << c.refblock_bits
        start = index * per_block
        values = list(self.imrt[start : start + per_block])
        values += [0] * (per_block - len(values))
        bits = c.refcount_bits
        if bits >= 8:
            fmt = {8: "B", 16: "H", 32: "I", 64: "Q"}[bits]
            return struct.pack(f">{per_block}{fmt}", *values)
        block = bytearray(c.cluster_size)
        for k, v in enumerate(values):
            if v:
                write_refcount(block, k, bits, v)
        return bytes(block)

    def _write_refblocks(self, first: int, end: int, reftable: list[int]) -> bool:
        """QEMU's ``rebuild_refcounts_write_refblocks``; returns whether ``reftable`` grew."""
        c = self.c
        per_block = 1 << c.refblock_bits
        first_free = [0]
        grown = False
        cluster = first
        while cluster < end:
            if cluster >= len(self.imrt) or not self.imrt[cluster]:
                cluster += 1
                continue
            index = cluster >> c.refblock_bits
            start = index * per_block
            if index < len(reftable) and reftable[index]:
                block_offset = reftable[index]
            else:
                first_free[0] = max(first_free[0], start)
                block_offset = self.alloc_imrt(1, first_free)
                if block_offset >> c.cluster_bits >= end:
                    end = (block_offset >> c.cluster_bits) + 1
                if len(reftable) <= index:
                    entries = layout.align_up((index + 1) * 8, c.cluster_size) // 8
                    reftable.extend([0] * (entries - len(reftable)))
                    grown = True
                reftable[index] = block_offset
            c.checked_write(
                block_offset, self._refblock_bytes(index), self.res, "ERROR writing refblock"
            )
            cluster = start + per_block
        return grown

    def rebuild(self) -> None:
        """QEMU's ``rebuild_refcount_structure``: new refblocks and reftable from the IMRT,
        at fresh locations; the old structure becomes leaks."""
        c = self.c
        reftable: list[int] = []
        self._write_refblocks(0, self.nb_clusters, reftable)
        while True:
            length = len(reftable) * 8
            clusters = layout.size_to_clusters(c.cluster_size, length)
            reftable_offset = self.alloc_imrt(clusters, [0])
            start = reftable_offset >> c.cluster_bits
            if not self._write_refblocks(start, start + clusters, reftable):
                break
        data = struct.pack(f">{len(reftable)}Q", *reftable)
        c.checked_write(reftable_offset, data, self.res, "ERROR writing reftable")
        c.f.flush()
        write_header_fields(
            c.f, refcount_table_offset=reftable_offset, refcount_table_clusters=clusters
        )
        c.f.flush()
        c.h.refcount_table_offset = reftable_offset
        c.h.refcount_table_clusters = clusters
        c.reftable = reftable
        c.refblock_cache.clear()
        c._refresh_file_len()


class _CheckFailed(Exception):
    """The check cannot complete; ``errno`` names why (qemu-img's "Check failed: ...")."""

    def __init__(self, err: int) -> None:
        super().__init__(os.strerror(err))
        self.errno = err


def _check_refcounts(c: _Checker, res: CheckResult) -> None:
    """QEMU's ``qcow2_check_refcounts`` (refcounts, then COPIED flags)."""
    nb_clusters = layout.size_to_clusters(c.cluster_size, c.file_len)
    if nb_clusters > _INT_MAX:
        res.check_errors += 1
        raise _CheckFailed(errno.EFBIG)
    res.total_clusters = layout.size_to_clusters(c.cluster_size, c.h.size // 512 * 512)
    p, rebuild = _calculate(c, res, nb_clusters)
    pre_compare = _snapshot_counts(res)
    rebuild2, highest = p.compare(0)
    rebuild = rebuild or rebuild2
    if rebuild and c.fix & FIX_ERRORS:
        old = _snapshot_counts(res)
        p.msg("Rebuilding refcount structure")
        try:
            p.rebuild()
        except Qcow2IOError as err:
            p.msg(f"qemu-img: ERROR writing refblock: {os.strerror(err.errno)}")
            res.check_errors += 1
            raise _CheckFailed(err.errno) from err
        res.corruptions = 0
        res.leaks = 0
        res.allocated_clusters = res.fragmented_clusters = res.compressed_clusters = 0
        nb = p.nb_clusters
        saved_fix = c.fix
        c.fix = 0
        p2, _ = _calculate(c, res, nb)
        c.fix = saved_fix
        fresh_leaks = 0
        if c.fix & FIX_LEAKS:
            saved = _snapshot_counts(res)
            _restore_counts(res, (0, 0, 0, 0, 0))
            still_broken, highest = p2.compare(FIX_LEAKS)
            if still_broken:
                p2.msg("ERROR rebuilt refcount structure is still broken")
            fresh_leaks = res.leaks
            _restore_counts(res, saved)
        if res.corruptions < old[1]:
            res.corruptions_fixed += old[1] - res.corruptions
        if res.leaks < old[2]:
            res.leaks_fixed += old[2] - res.leaks
        res.leaks += fresh_leaks
    elif c.fix:
        if rebuild:
            p.msg("ERROR need to rebuild refcount structures")
            res.check_errors += 1
            raise _CheckFailed(errno.EIO)
        if res.leaks or res.corruptions:
            _restore_counts(res, pre_compare)
            _, highest = p.compare(c.fix)
    _check_oflag_copied(c, res)
    res.image_end_offset = (highest + 1) * c.cluster_size


def _calculate(c: _Checker, res: CheckResult, nb_clusters: int) -> tuple[_Pass, bool]:
    """``calculate_refcounts``, fast (shared L2 tables counted in bulk) unless a refcount
    overflows: then it is redone in traversal order so the findings come in QEMU's order."""
    saved = (_snapshot_counts(res), len(res.messages), _frag(res))
    p = _Pass(c, res, nb_clusters, exact=False)
    rebuild = p.calculate()
    if not p.overflowed:
        return p, rebuild
    _restore_counts(res, saved[0])
    del res.messages[saved[1] :]
    res.allocated_clusters, res.fragmented_clusters, res.compressed_clusters = saved[2]
    p = _Pass(c, res, nb_clusters, exact=True)
    return p, p.calculate()


def _frag(res: CheckResult) -> tuple[int, int, int]:
    return res.allocated_clusters, res.fragmented_clusters, res.compressed_clusters


def _snapshot_counts(res: CheckResult) -> tuple[int, int, int, int, int]:
    return (
        res.check_errors,
        res.corruptions,
        res.leaks,
        res.corruptions_fixed,
        res.leaks_fixed,
    )


def _restore_counts(res: CheckResult, counts: tuple[int, int, int, int, int]) -> None:
    (
        res.check_errors,
        res.corruptions,
        res.leaks,
        res.corruptions_fixed,
        res.leaks_fixed,
    ) = counts


def _check_oflag_copied(c: _Checker, res: CheckResult) -> None:
    """QEMU's ``check_oflag_copied`` over the active L1 and its L2 tables."""
    if c.fix & FIX_ERRORS:
        repair = True
    elif c.fix & FIX_LEAKS:
        repair = not res.check_errors and not res.corruptions and not res.leaks
    else:
        repair = False
    label = "Repairing" if repair else "ERROR"
    plain_bits = layout.OFLAG_COPIED | layout.L2E_OFFSET_MASK
    step = 2 if c.extended_l2 else 1
    n = c.cluster_size // 8
    scanned: dict[int, tuple[list[str], int]] = {}
    stored = c.stored_refcounts(0)  # refcounts no longer change in this pass
    for i, l1_entry in enumerate(c.l1_table):
        l2_offset = l1_entry & layout.L1E_OFFSET_MASK
        if not l2_offset:
            continue
        try:
            refcount = stored(l2_offset >> c.cluster_bits)
        except (CorruptImageError, Qcow2IOError):  # QEMU: skipped, not counted
            continue
        if (refcount == 1) != bool(l1_entry & layout.OFLAG_COPIED):
            res.corruptions += 1
            res.messages.append(
                f"{label} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1_entry:x} "
                f"refcount={refcount}"
            )
            if repair:
                new = (
                    l1_entry | layout.OFLAG_COPIED
                    if refcount == 1
                    else l1_entry & ~layout.OFLAG_COPIED
                )
                c.l1_table[i] = new
                c.f.pwrite(c.h.l1_table_offset + i * 8, struct.pack(">Q", new))
                c.f.flush()
                res.corruptions -= 1
                res.corruptions_fixed += 1
        # An L2 table referenced by several L1 entries gives the same findings each time
        # (and none after its repair): scan it once.
        known = scanned.get(l2_offset)
        if known is not None:
            res.messages.extend(known[0])
            res.corruptions += known[1]
            continue
        first_message = len(res.messages)
        corruptions_before = res.corruptions
        words = list(struct.unpack(f">{n}Q", c.read(l2_offset, c.cluster_size)))
        dirty = 0
        for j in range(0, n, step):
            entry = words[j]
            # A data cluster with at most COPIED set is NORMAL (the bulk): no decoder call.
            if (entry & ~plain_bits or not entry) and c.decoder.cluster_type(entry) not in (
                ClusterType.NORMAL,
                ClusterType.ZERO_ALLOC,
            ):
                continue
            if c.has_data_file:
                refcount = 1
            else:
                try:
                    refcount = stored((entry & layout.L2E_OFFSET_MASK) >> c.cluster_bits)
                except (CorruptImageError, Qcow2IOError):
                    continue
            if (refcount == 1) != bool(entry & layout.OFLAG_COPIED):
                res.corruptions += 1
                res.messages.append(
                    f"{label} OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={refcount}"
                )
                if repair:
                    words[j] = (
                        entry | layout.OFLAG_COPIED
                        if refcount == 1
                        else entry & ~layout.OFLAG_COPIED
                    )
                    dirty += 1
        if dirty:
            c.f.pwrite(l2_offset, struct.pack(f">{n}Q", *words))
            res.corruptions -= dirty
            res.corruptions_fixed += dirty
            scanned[l2_offset] = ([], 0)
        else:
            scanned[l2_offset] = (
                res.messages[first_message:],
                res.corruptions - corruptions_before,
            )


def _check_read_snapshot_table(c: _Checker, res: CheckResult) -> None:
    """QEMU's ``qcow2_check_read_snapshot_table`` (the open in check mode skips it)."""
    h = c.h
    nb = h.nb_snapshots
    entry_size = layout.SNAPSHOT_HEADER_STRUCT.size
    reduced = 0
    if nb > layout.MAX_SNAPSHOTS and c.fix & FIX_ERRORS:
        reduced = nb - layout.MAX_SNAPSHOTS
        res.messages.append(f"Discarding {reduced} overhanging snapshots")
        nb = h.nb_snapshots = layout.MAX_SNAPSHOTS
    if nb > layout.MAX_SNAPSHOTS:
        res.check_errors += 1
        res.messages.append("qemu-img: ERROR snapshot table too large")
        res.messages.append(
            f"You can force-remove all {nb - layout.MAX_SNAPSHOTS} overhanging snapshots "
            "with qemu-img check -r all"
        )
        raise _CheckFailed(errno.EFBIG)
    if (1 << 63) - 1 - nb * entry_size < h.snapshots_offset or h.snapshots_offset & (
        c.cluster_size - 1
    ):
        res.check_errors += 1
        res.messages.append("qemu-img: ERROR snapshot table offset invalid")
        raise _CheckFailed(errno.EINVAL)
    if c.fix & FIX_ERRORS:
        _read_snapshots_repairing(c, res, reduced)
    else:
        _read_snapshots(c, res)
    for i in incomplete_entries(c.snapshots, h.version):
        res.corruptions += 1
        res.messages.append(
            f"{'Repairing' if c.fix & FIX_ERRORS else 'ERROR'} snapshot table entry {i} "
            "is incomplete"
        )


def _read_snapshots(c: _Checker, res: CheckResult) -> None:
    """Read the snapshot table as QEMU's open does; a bad table ends the check."""
    h = c.h
    try:
        c.snapshots = read_snapshot_table(
            c.f,
            h.snapshots_offset,
            h.nb_snapshots,
            path=None,
            version=h.version,
            virtual_size=h.size // 512 * 512,
        )
    except CorruptImageError as err:
        res.check_errors += 1
        text = err.message.split(" (", 1)[0]
        res.messages.append(f"qemu-img: ERROR failed to read the snapshot table: {text}")
        if text.startswith("Too much extra metadata"):
            res.messages.append(
                "You can force-remove this extra metadata with qemu-img check -r all"
            )
        raise _CheckFailed(errno.EFBIG) from err
    c.snapshots_offset = h.snapshots_offset
    c.snapshots_size = _stored_table_length(c.snapshots)


class _Blob:
    """Bytes with a ``pread`` (so the snapshot table codec can parse a rebuilt entry)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def pread(self, offset: int, length: int) -> bytes:
        chunk = self.data[offset : offset + length]
        return chunk + bytes(length - len(chunk))


def _read_snapshots_repairing(c: _Checker, res: CheckResult, reduced: int) -> None:
    """QEMU's ``qcow2_do_read_snapshots(repair=true)``: extra data beyond 1024 bytes is
    truncated, and entries that push the table past 64 MiB are dropped (the header's
    snapshot count is lowered at once; their clusters become leaks that are then fixed)."""
    h = c.h
    header_struct = layout.SNAPSHOT_HEADER_STRUCT
    start = h.snapshots_offset
    offset = start
    table_len = 0
    dropped_extra = 0
    entries: list[SnapshotEntry] = []
    for i in range(h.nb_snapshots):
        entry_start = offset = layout.align_up(offset, 8)
        table_len = layout.align_up(table_len, 8)
        raw = c.read(entry_start, header_struct.size)
        fields = header_struct.unpack(raw)
        id_size, name_size, extra = fields[2], fields[3], fields[-1]
        kept_extra = extra
        if extra > layout.MAX_SNAPSHOT_EXTRA_DATA:
            res.messages.append(
                f"Discarding too much extra metadata in snapshot table entry {i} "
                f"({extra} > {layout.MAX_SNAPSHOT_EXTRA_DATA})"
            )
            dropped_extra += 1
            kept_extra = layout.MAX_SNAPSHOT_EXTRA_DATA
        body = raw[:-4] + struct.pack(">I", kept_extra)
        body += c.read(entry_start + header_struct.size, kept_extra)
        body += c.read(entry_start + header_struct.size + extra, id_size + name_size)
        entry = read_snapshot_table(
            _Blob(body), 0, 1, path=None, version=h.version, virtual_size=h.size // 512 * 512
        )[0]
        offset = entry_start + header_struct.size + extra + id_size + name_size
        table_len += header_struct.size + kept_extra + id_size + name_size
        if table_len > layout.MAX_SNAPSHOT_TABLE_BYTES or offset - start > _INT_MAX:
            overhang = h.nb_snapshots - i
            res.messages.append(
                f"Discarding {overhang} overhanging snapshots (snapshot table is too big)"
            )
            offset = entry_start
            reduced += overhang
            h.nb_snapshots = i
            break
        entries.append(entry)
    res.corruptions += dropped_extra
    if reduced:
        # The header must agree with the table before the refcounts are checked; the
        # dropped entries' clusters become leaks, which the check then fixes.
        write_header_fields(c.f, nb_snapshots=h.nb_snapshots)
        c.f.flush()
        res.corruptions_fixed += reduced
    c.snapshots = entries
    c.snapshots_offset = start
    c.snapshots_size = offset - start if entries else 0


def _stored_table_length(entries: list[SnapshotEntry]) -> int:
    """Exact byte length of a snapshot table as stored (entries with their own extra size)."""
    length = 0
    for e in entries:
        length = layout.align_up(length, 8)
        length += layout.SNAPSHOT_HEADER_STRUCT.size + e.extra_data_size
        length += len(e.id.encode("utf-8", "surrogateescape"))
        length += len(e.name.encode("utf-8", "surrogateescape"))
    return length


def _fix_snapshot_table(c: _Checker, res: CheckResult) -> None:
    """QEMU's ``qcow2_check_fix_snapshot_table``: rewrite the table at a new location."""
    if not (res.corruptions and c.fix & FIX_ERRORS):
        return
    data = serialize_snapshot_table(c.snapshots, c.h.version)
    assert len(data) == table_length(c.snapshots)
    # The refcounts are consistent by now: allocate with the library's allocator (first
    # fit like qcow2_alloc_clusters), which also adds refblocks when it must.
    refcounts = RefcountTable(c.f, c.h, TableCache(c.f, c.cluster_size, 16, "refblock"))
    try:
        offset = refcounts.alloc(len(data))
        refcounts.flush()
        c.f.flush()
        c.f.pwrite(offset, data)
        c.f.flush()
        write_header_fields(c.f, nb_snapshots=len(c.snapshots), snapshots_offset=offset)
        c.f.flush()
    except Qcow2Error as err:
        res.check_errors += 1
        res.messages.append(f"ERROR failed to update snapshot table: {err}")
        raise _CheckFailed(errno.EIO) from err
    if c.snapshots_size:
        try:
            refcounts.free(c.snapshots_offset, c.snapshots_size)
            refcounts.flush()
        except RefcountRangeError as err:
            # QEMU's qcow2_free_clusters only reports the failure: the old table leaks.
            res.messages.append(f"qcow2_free_clusters failed: {err.message}")
    c.refblock_cache.clear()
    c.reftable = list(refcounts.table)
    c.snapshots_offset = offset
    c.snapshots_size = len(data)
    c.h.snapshots_offset = offset
    res.corruptions_fixed += res.corruptions
    res.corruptions = 0


def _one_pass(
    f: HostFile, header: Header, fix: int, filename: str, overlap_checks: int, dead: list[bool]
) -> CheckResult:
    """QEMU's ``qcow2_co_check_locked``: one check (and repair) pass; ``dead`` gets
    whether it signaled a fatal corruption (QEMU's node is unusable after)."""
    c = _Checker(f, header, fix, overlap_checks)
    try:
        return _checked_pass(c, f, header, fix, filename)
    finally:
        dead.append(c.dead)


def _checked_pass(c: _Checker, f: HostFile, header: Header, fix: int, filename: str) -> CheckResult:
    # One message list: QEMU prints findings as it goes, so their order is chronological.
    result = CheckResult(filename)
    snapshot_res = CheckResult(filename, messages=result.messages)
    refcount_res = CheckResult(filename, messages=result.messages)
    try:
        _check_read_snapshot_table(c, snapshot_res)
    except _CheckFailed as err:
        result.add(snapshot_res, with_frag_info=False)
        result.error = str(err)
        return result
    try:
        _check_refcounts(c, refcount_res)
    except _CheckFailed as err:
        result.add(refcount_res, with_frag_info=True)
        result.add(snapshot_res, with_frag_info=False)
        result.error = str(err)
        return result
    result.add(refcount_res, with_frag_info=True)
    try:
        _fix_snapshot_table(c, snapshot_res)
    except _CheckFailed as err:
        result.add(snapshot_res, with_frag_info=False)
        result.error = str(err)
        return result
    result.add(snapshot_res, with_frag_info=False)
    if fix and not result.check_errors and not result.corruptions:
        features = header.incompatible_features & ~(layout.INCOMPAT_DIRTY | layout.INCOMPAT_CORRUPT)
        if header.version >= 3 and features != header.incompatible_features:
            f.flush()
            write_header_fields(f, incompatible_features=features)
            f.flush()
            header.incompatible_features = features
    return result


def check_file(
    f: HostFile,
    header: Header,
    repair: str | None = None,
    *,
    filename: str | None = None,
    overlap_checks: int = ol.DEFAULT,
) -> CheckResult:
    """Check (and with ``repair`` "leaks"/"all", repair) the image open as ``f``.

    Returns what ``qemu-img check [-r ...]`` reports: after a repair that fixed something,
    the image is checked again and the result of that second pass is returned with the
    fixed counts of the first (``repaired`` is then True, ``messages`` holds both passes).
    ``overlap_checks``: what the repair's writes are checked against (:mod:`qcow2.overlap`
    flags, from the ``overlap-check`` open options as QEMU's check uses them).  A repair
    that signaled a fatal corruption and still fixed something fails its second pass with
    ENOMEDIUM, as qemu-img's does (QEMU's node has no driver any more).
    """
    if repair not in REPAIR_MODES:
        raise ValueError(f"invalid repair mode {repair!r} (expected 'leaks' or 'all')")
    fix = REPAIR_MODES[repair]
    if fix and not f.writable:
        raise ReadOnlyError("repair needs an image opened for writing", path=f.path)
    name = filename if filename is not None else f.path
    dead: list[bool] = []
    first = _guarded_pass(f, header, fix, name, overlap_checks, dead)
    if first.error is None and (first.corruptions_fixed or first.leaks_fixed):
        f.flush()
        if any(dead):
            second = CheckResult(name, error=os.strerror(errno.ENOMEDIUM))
        else:
            fresh = read_header(f, mode="check")
            second = _guarded_pass(f, fresh, 0, name, overlap_checks, dead)
            header.assign(fresh)
        second.messages[:0] = first.messages
        second.corruptions_fixed = first.corruptions_fixed
        second.leaks_fixed = first.leaks_fixed
        second.repaired = True
        return second
    if fix:
        f.flush()
    return first


def _guarded_pass(
    f: HostFile, header: Header, fix: int, filename: str, overlap_checks: int, dead: list[bool]
) -> CheckResult:
    """One pass; host I/O failures end it as "Check failed" instead of propagating."""
    try:
        return _one_pass(f, header, fix, filename, overlap_checks, dead)
    except Qcow2IOError as err:
        res = CheckResult(filename, check_errors=1, error=os.strerror(err.errno))
        res.messages.append(f"ERROR: {err.message}")
        return res


def check_image(image: Any, repair: str | None = None) -> CheckResult:
    """``Image.check()``: check the open ``image`` (its host file and parsed header)."""
    f: HostFile = image.file
    header: Header = image.header
    checks = getattr(image, "overlap_checks", ol.DEFAULT)
    return check_file(f, header, repair, filename=image.path, overlap_checks=checks)


def repair_image_file(f: HostFile, header: Header) -> CheckResult:
    """Repair everything fixable (``check -r all``), e.g. a dirty image on writable open.

    This is what QEMU does when it opens an image with the dirty bit read-write; the dirty
    bit is cleared on success.  ``header`` is updated to the repaired image's header.
    """
    return check_file(f, header, "all")

"""Refcounts: the entry codec, the refcount table and cluster allocation.

Mirrors QEMU's ``block/qcow2-refcount.c``.  A refcount block is one cluster of
``refcount_bits``-wide entries: big-endian integers for widths >= 8, packed LSB-first inside
each byte for widths 1, 2 and 4.
"""

from __future__ import annotations

import errno
import struct

from ..errors import RefcountRangeError, c_hex, signal_corruption
from ..io.cache import TableCache
from ..io.fileio import HostFile, fault_point
from . import layout
from .header import Header, write_header_fields

#: qcow2.overlap.REFCOUNT_BLOCK (a new refcount block is no overlap with refcount blocks)
_OL_REFCOUNT_BLOCK = 1 << 4

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, KeysView, Sequence


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


def refblock_offset(
    table: Sequence[int], index: int, cluster_size: int, *, path: str | None
) -> int:
    """Host offset of the refcount block the refcount table ``table`` lists at ``index``
    (0: none, also past the table's end).  An unaligned one is a fatal corruption (QEMU's
    "Refblock offset ... unaligned")."""
    if index >= len(table):
        return 0
    offset = table[index] & layout.REFT_OFFSET_MASK
    if offset % cluster_size:
        signal_corruption(
            f"Refblock offset {c_hex(offset)} unaligned (reftable index: {c_hex(index)})",
            path=path,
            offset=offset,
        )
    return offset


class RefcountTable:
    """The refcount table of an open image: lookup, update, allocation, growth.

    Refcount blocks go through ``cache`` (write-back); the reftable itself is kept in
    memory and written through (its entries change only when refblocks are allocated).
    ``freed_hook(offset)`` is told about every cluster whose refcount drops to 0, so cached
    tables living there can be forgotten.
    """

    def __init__(self, f: HostFile, header: Header, cache: TableCache) -> None:
        self.file = f
        self.header = header
        self.cache = cache
        self.cluster_size = header.cluster_size
        self.bits = header.refcount_bits
        self.max_refcount = (1 << self.bits) - 1
        self.entries_per_block = header.refblock_entries
        self.freed_hook: Callable[[int], None] | None = None
        #: Called with (offset, length, ignore) before a new refcount structure is written
        #: (the image's metadata overlap check; ``ignore``: qcow2.overlap flags).
        self.overlap_check: Callable[[int, int, int], None] | None = None
        #: The cache holding the references (L2 tables): written before decrements.
        self.decrement_dependency: TableCache | None = None
        #: Lowest cluster index that may be free (QEMU's ``free_cluster_index``).
        self.free_cluster_index = 0
        raw = f.pread(
            header.refcount_table_offset, header.refcount_table_clusters * self.cluster_size
        )
        self.table = list(struct.unpack(f">{len(raw) // 8}Q", raw))

    @property
    def table(self) -> list[int]:
        """The refcount table entries in memory (assign a new list to replace it)."""
        return self._table

    @table.setter
    def table(self, entries: list[int]) -> None:
        self._table = entries
        #: How many table entries point at each refcount block offset (a corrupt table may
        #: name a block twice), counted on first use (a read-only open never asks), then
        #: kept with ``table``: the overlap checks ask at every write.
        self._block_refs: dict[int, int] | None = None

    @property
    def block_offsets(self) -> KeysView[int]:
        """Host offsets of the refcount blocks (for overlap checks)."""
        return self._refs().keys()

    def _refs(self) -> dict[int, int]:
        refs = self._block_refs
        if refs is None:
            refs = {}
            for entry in self._table:
                offset = entry & layout.REFT_OFFSET_MASK
                if offset:
                    refs[offset] = refs.get(offset, 0) + 1
            self._block_refs = refs
        return refs

    def adopt_table(self, entries: list[int], changed: Iterable[int]) -> None:
        """Replace the table with ``entries``, which differ from it only at the indexes
        ``changed`` (and in zero entries appended).  Same result as assigning ``table``,
        without a pass over every entry: a metadata transaction replaces the table at each
        commit but changes a handful of entries."""
        old, refs, mask = self._table, self._refs(), layout.REFT_OFFSET_MASK
        for index in changed:
            before = old[index] & mask if index < len(old) else 0
            after = entries[index] & mask
            if before == after:
                continue
            if before:
                left = refs[before] - 1
                if left:
                    refs[before] = left
                else:
                    del refs[before]
            if after:
                refs[after] = refs.get(after, 0) + 1
        self._table = entries

    # Section: lookup

    def _block_offset(self, index: int) -> int:
        """Host offset of refcount block ``index`` (0 if not allocated)."""
        return refblock_offset(self.table, index, self.cluster_size, path=self.file.path)

    def get(self, cluster_index: int) -> int:
        """Refcount of host cluster ``cluster_index`` (0 where no refblock covers it)."""
        block_offset = self._block_offset(cluster_index // self.entries_per_block)
        if not block_offset:
            return 0
        block = self.cache.get(block_offset)
        return read_refcount(block, cluster_index % self.entries_per_block, self.bits)

    # Section: update

    def update(self, offset: int, length: int, addend: int) -> None:
        """Add ``addend`` to the refcount of every cluster touched by ``[offset, +length)``.

        Checks the whole range first: on overflow or underflow nothing changes and
        :class:`RefcountRangeError` is raised.  Missing refblocks are allocated first.
        """
        if length <= 0 or addend == 0:
            return
        if addend < 0 and self.decrement_dependency is not None:
            # The reference being dropped must be gone on disk before its refcount drops.
            self.cache.set_dependency(self.decrement_dependency)
        first = offset // self.cluster_size
        last = (offset + length - 1) // self.cluster_size
        if addend > 0:
            self._ensure_blocks(first, last, exclude=(first, last))
        for cluster in range(first, last + 1):
            value = self.get(cluster) + addend
            if value < 0:
                raise RefcountRangeError(
                    f"refcount of cluster {cluster} would drop below 0 (offset {offset:#x})",
                    path=self.file.path,
                )
            if value > self.max_refcount:
                raise RefcountRangeError(
                    f"refcount of cluster {cluster} would exceed {self.max_refcount} "
                    f"(refcount_bits={self.bits})",
                    path=self.file.path,
                )
        for cluster in range(first, last + 1):
            self._set(cluster, self.get(cluster) + addend)

    def _set(self, cluster: int, value: int) -> None:
        block_offset = self._block_offset(cluster // self.entries_per_block)
        block = self.cache.get(block_offset)
        write_refcount(block, cluster % self.entries_per_block, self.bits, value)
        self.cache.mark_dirty(block_offset)
        if value == 0:
            self.free_cluster_index = min(self.free_cluster_index, cluster)
            if self.freed_hook is not None:
                self.freed_hook(cluster * self.cluster_size)

    # Section: allocation

    def find_free(self, nclusters: int, exclude: tuple[int, int] | None = None) -> int:
        """First cluster index of the lowest run of ``nclusters`` free clusters at or after
        the search hint.  ``exclude`` (first, last) is never handed out: clusters whose
        refcounts are being raised right now."""

        def excluded(lo: int, hi: int) -> bool:
            return exclude is not None and lo <= exclude[1] and exclude[0] < hi

        per_block = self.entries_per_block
        cluster = self.free_cluster_index
        run_start, run = cluster, 0
        while run < nclusters:
            if (
                cluster % per_block == 0
                and not self._block_offset(cluster // per_block)
                and not excluded(cluster, cluster + per_block)
            ):
                free = per_block  # no refblock: the whole range it would cover is free
            elif not excluded(cluster, cluster + 1) and self.get(cluster) == 0:
                free = 1
            else:
                run = 0
                cluster += 1
                continue
            if run == 0:
                run_start = cluster
            run += free
            cluster += free
        # Like QEMU's alloc_clusters_noref, the search hint moves past what it handed out
        # (a free of a lower cluster moves it back).
        self.free_cluster_index = run_start + nclusters
        return run_start

    def alloc(self, nbytes: int) -> int:
        """Allocate contiguous clusters for ``nbytes`` (first fit, lowest free clusters
        first, like QEMU) with refcount 1; returns the host offset."""
        nclusters = max(1, layout.size_to_clusters(self.cluster_size, nbytes))
        while True:
            first = self.find_free(nclusters)
            last = first + nclusters - 1
            started_covered = bool(self._block_offset(first // self.entries_per_block))
            if self._ensure_blocks(first, last, exclude=None):
                # New refblocks may have taken the range: search again (QEMU's -EAGAIN).
                # QEMU had already counted the run's covered head and reverts it, which
                # moves its search hint back to the run's start.
                if started_covered:
                    self.free_cluster_index = min(self.free_cluster_index, first)
                continue
            self.update(first * self.cluster_size, nclusters * self.cluster_size, 1)
            return first * self.cluster_size

    def free(self, offset: int, length: int) -> None:
        """Drop one reference from every cluster touched by ``[offset, +length)``."""
        self.update(offset, length, -1)

    # Section: refcount blocks and reftable growth

    def _ensure_blocks(self, first: int, last: int, exclude: tuple[int, int] | None) -> bool:
        """Allocate the refblocks covering clusters ``first..last``; True if any was."""
        per_block = self.entries_per_block
        missing = [
            index
            for index in range(first // per_block, last // per_block + 1)
            if not self._block_offset(index)
        ]
        if not missing:
            return False
        if missing[-1] >= len(self.table):
            self._grow_table(set(missing), exclude_end=(exclude[1] + 1) if exclude else 0)
            missing = [i for i in missing if not self._block_offset(i)]
        for index in missing:
            self._alloc_refblock(index, exclude)
        return True

    def _alloc_refblock(self, index: int, exclude: tuple[int, int] | None) -> None:
        """QEMU's ``alloc_refcount_block``: one new block, describing itself if it lies in
        the range it covers, hooked into the reftable after it is durable."""
        if self._block_offset(index):
            return
        cluster = self.find_free(1, exclude)
        home = cluster // self.entries_per_block
        if home >= len(self.table):
            self._grow_table({index, home}, exclude_end=(exclude[1] + 1) if exclude else 0)
            return
        if home != index and not self._block_offset(home):
            self._alloc_refblock(home, exclude)
            self._alloc_refblock(index, exclude)
            return
        block = bytearray(self.cluster_size)
        if home == index:
            write_refcount(block, cluster % self.entries_per_block, self.bits, 1)
        offset = cluster * self.cluster_size
        if offset == 0:
            signal_corruption(
                "Preventing invalid allocation of refcount block at offset 0",
                path=self.file.path,
            )
        if self.overlap_check is not None:
            self.overlap_check(offset, self.cluster_size, _OL_REFCOUNT_BLOCK)
        fault_point("refblock_alloc.write")
        self.file.pwrite(offset, bytes(block))
        self.cache.put(offset, block, dirty=False)
        if home != index:
            self._set(cluster, self.get(cluster) + 1)
        # The block and its own refcount must be durable before the table points at it.
        self.cache.flush()
        self.file.flush()
        fault_point("refblock_alloc.hookup")
        self.file.pwrite(self.header.refcount_table_offset + index * 8, struct.pack(">Q", offset))
        self.file.flush()
        refs = self._refs()
        refs[offset] = refs.get(offset, 0) + 1  # the entry was 0
        self.table[index] = offset

    def _grow_table(self, indices: set[int], exclude_end: int) -> None:
        """Move the reftable to a bigger one placed, with the new refblocks, in the first
        area no current refblock can describe; the new blocks describe that area itself."""
        cs = self.cluster_size
        per_block = self.entries_per_block
        old_entries = len(self.table)
        area = max(old_entries * per_block, exclude_end)
        nblocks, nclusters = 0, 1
        while True:
            area_end = area + nblocks + nclusters
            wanted = set(indices) | set(range(area // per_block, (area_end - 1) // per_block + 1))
            needed = sorted(i for i in wanted if not self._block_offset(i))
            entries = max(old_entries, needed[-1] + 1) * 3 // 2 + 1
            new_clusters = layout.size_to_clusters(cs, entries * 8)
            if (len(needed), new_clusters) == (nblocks, nclusters):
                break
            nblocks, nclusters = len(needed), new_clusters
        if nclusters * cs > layout.MAX_REFTABLE_BYTES:
            raise RefcountRangeError(
                f"refcount table would need {nclusters * cs} bytes (limit "
                f"{layout.MAX_REFTABLE_BYTES})",
                path=self.file.path,
            )
        blocks = {index: bytearray(cs) for index in needed}
        for cluster in range(area, area + nblocks + nclusters):
            write_refcount(blocks[cluster // per_block], cluster % per_block, self.bits, 1)
        new_table = self.table + [0] * (nclusters * cs // 8 - old_entries)
        for k, index in enumerate(needed):
            new_table[index] = (area + k) * cs
        table_offset = (area + nblocks) * cs
        if self.overlap_check is not None:
            self.overlap_check(area * cs, (nblocks + nclusters) * cs, 0)
        fault_point("refblock_alloc.write_blocks")
        self.file.pwrite(area * cs, b"".join(bytes(blocks[i]) for i in needed))
        fault_point("refblock_alloc.write_table")
        self.file.pwrite(table_offset, struct.pack(f">{len(new_table)}Q", *new_table))
        self.cache.flush()
        self.file.flush()
        # The new table and blocks are durable and describe themselves: switch.
        fault_point("refblock_alloc.switch_table")
        write_header_fields(
            self.file, refcount_table_offset=table_offset, refcount_table_clusters=nclusters
        )
        self.file.flush()
        old_offset = self.header.refcount_table_offset
        old_clusters = self.header.refcount_table_clusters
        self.header.refcount_table_offset = table_offset
        self.header.refcount_table_clusters = nclusters
        self.table = new_table
        for k, index in enumerate(needed):
            self.cache.put((area + k) * cs, blocks[index], dirty=False)
        # Only now that nothing points at the old table can it be freed.
        self.free(old_offset, old_clusters * cs)

    def shrink_table(self) -> None:
        """QEMU's ``qcow2_shrink_reftable`` (after a shrinking resize): refcount blocks
        that count nothing (but, for a block in the range it covers, itself) leave the
        refcount table, which is rewritten in place, and are freed.  What QEMU finds
        wrong on the way is a fatal corruption: an unaligned refcount block, a freed
        block whose own refcount is not 1 (``Invalid refcount: ...``, EINVAL), one no
        refcount block covers."""
        cs = self.cluster_size
        per_block = self.entries_per_block
        old = self.table
        new = list(old)
        for i, entry in enumerate(old):
            offset = entry & layout.REFT_OFFSET_MASK
            if not offset:
                new[i] = 0
                continue
            if offset % cs:
                signal_corruption(
                    f"Cannot get entry from refcount block cache: Offset {offset:#x} is unaligned",
                    path=self.file.path,
                    offset=offset,
                )
            block = bytearray(self.cache.get(offset))
            if i == offset // cs // per_block:  # the block counts itself
                write_refcount(block, offset // cs % per_block, self.bits, 0)
            if block.count(0) == len(block):
                new[i] = 0
        if new == old:
            return  # QEMU rewrites the table with the same bytes
        self.file.pwrite(self.header.refcount_table_offset, struct.pack(f">{len(new)}Q", *new))
        self.file.flush()
        unused = [i for i, entry in enumerate(old) if entry and not new[i]]
        try:
            for i in unused:
                self._discard_refblock(old[i] & layout.REFT_OFFSET_MASK)
                self._set_entry(i, 0)
        finally:
            for i in unused:  # QEMU drops them from the table in memory in any case
                self._set_entry(i, 0)

    def _set_entry(self, index: int, entry: int) -> None:
        entries = list(self._table)
        entries[index] = entry
        self.adopt_table(entries, [index])

    def _discard_refblock(self, offset: int) -> None:
        """QEMU's ``qcow2_discard_refcount_block``: the refcount of the unused refcount
        block at ``offset`` (1, or the image is corrupt) drops to 0."""
        cs = self.cluster_size
        cluster = offset // cs
        index = cluster // self.entries_per_block
        covering = self._table[index] & layout.REFT_OFFSET_MASK if index < len(self._table) else 0
        if not covering:
            signal_corruption(
                f"Refblock at {c_hex(covering)} is not covered by the refcount structures",
                path=self.file.path,
            )
        block = self.cache.get(covering)
        slot = cluster % self.entries_per_block
        refcount = read_refcount(block, slot, self.bits)
        if refcount != 1:
            signal_corruption(
                f"Invalid refcount: refblock offset {c_hex(covering)}, reftable index "
                f"{index}, block offset {c_hex(offset)}, refcount {c_hex(refcount)}",
                path=self.file.path,
                offset=offset,
                errno=errno.EINVAL,
            )
        write_refcount(block, slot, self.bits, 0)
        self.cache.mark_dirty(covering)
        self.free_cluster_index = min(self.free_cluster_index, cluster)
        self.cache.forget(offset)
        if self.freed_hook is not None:
            self.freed_hook(offset)

    def last_used_cluster(self, file_size: int) -> int:
        """Index of the highest cluster below ``file_size`` with a non-zero refcount
        (QEMU's ``qcow2_get_last_cluster``), -1 if none."""
        for cluster in range(layout.size_to_clusters(self.cluster_size, file_size) - 1, -1, -1):
            if self.get(cluster):
                return cluster
        return -1

    def flush(self) -> None:
        """Write dirty refcount blocks (the caller flushes the host file)."""
        self.cache.flush()

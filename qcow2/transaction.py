"""Metadata transactions: a complete new generation of metadata, switched in by ONE write.

QEMU updates snapshot metadata in place, step by step; because a refcount and the COPIED
flag that must agree with it live in different clusters, no order of in-place writes keeps
``qemu-img check`` clean at every moment.  A :class:`MetadataTransaction` instead builds the
next generation of everything that changes (active L1, L2 tables whose flags change, the
snapshot table, refcount blocks and the refcount table) in clusters that are free in the
*committed* refcount structure, and switches to it with one write of the adjacent header
fields ``l1_size`` .. ``snapshots_offset`` (bytes 36-71; 24-71 when the disk size changes
too), which lie in the first sector and therefore reach the disk whole or not at all.

Crash guarantee: before the header write the old generation is untouched and the new
clusters are unreferenced with refcount 0 (free space, not even a leak); after it the new
generation is complete, including refcount 0 for every cluster of the old generation it
no longer uses.  Either way ``qemu-img check`` finds nothing at all.

Refcount semantics are qemu's ``calculate_refcounts``: a data cluster counts one reference
per L1 -> L2 -> entry path (a table shared by two L1 tables counts its clusters twice), so
copying a shared L2 table moves references between tables without changing data refcounts.

Lazy refcounts: the transaction starts by writing every dirty cached table
(:meth:`Image.flush`), so the on-disk refcounts are exact even while the dirty bit is set;
the new generation is exact as well.  The dirty bit is left as it is.
"""

from __future__ import annotations

import array
import struct
import sys

from .errors import RefcountRangeError
from .format import layout
from .format.header import write_header_fields
from .format.refcount import refblock_offset, write_refcount
from .format.snapshot_table import SnapshotEntry, serialize_snapshot_table, table_length
from .io.fileio import fault_point

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import MutableSequence, Sequence, Set

    from .commit_records import CommitLog
    from .image import Image

_COPIED = layout.OFLAG_COPIED
#: struct codes of the refcount widths decoded a block at a time (others entry by entry).
_UNPACK_CODES = {8: "B", 16: "H", 32: "I", 64: "Q"}
_ARRAY_Q_IS_U64 = array.array("Q").itemsize == 8


class MetadataTransaction:
    """One atomic metadata update of an open, writable image.

    Usage: record changes (:meth:`alloc` + :meth:`stage` for new tables,
    :meth:`reference_tree` / :meth:`release` for references gained and lost,
    :meth:`set_active_l1`, :meth:`set_snapshots`, :meth:`set_virtual_size`), then
    :meth:`commit`.  Nothing touches the file before :meth:`commit`; an exception from it
    before the header switch leaves the image and the in-memory state as they were.
    ``op`` prefixes the fault point names (``{op}.write_metadata``, ``{op}.header_switch``).
    """

    def __init__(self, image: Image, op: str, *, excluded: Set[int] = frozenset()) -> None:
        if image.l2_cache.is_dirty() or image.refblock_cache.is_dirty():
            # The on-disk metadata becomes the committed generation.  (Without dirty
            # tables it already is; the flush before the switch makes it durable.)
            image.flush()
        header = image.header
        self.image = image
        self.op = op
        self.cluster_size = header.cluster_size
        self.cluster_bits = header.cluster_bits
        self.extended = header.extended_l2
        self.words_per_entry = header.l2_entry_size // 8
        self.decoder = image.clusters.decoder
        self.refcounts = image.refcounts
        #: Net refcount change per host cluster index.
        self.delta: dict[int, int] = {}
        #: Cluster indices taken by this transaction (free in the committed structure).
        self.taken: set[int] = set()
        #: Clusters free in the committed structure that must not be allocated (freed
        #: by a commit whose header is not durable yet: :mod:`qcow2.commit_records`).
        self.excluded = excluded
        self.staged: dict[int, bytes] = {}
        self.active_l1: list[int] | None = None
        #: Check every L2 table of the new active L1 for stale COPIED flags (set by
        #: set_active_l1); otherwise only the tables given to replace_l2 are rebuilt.
        self.recheck_all = False
        #: New content of the active L2 table of an L1 index (replace_l2).
        self.replaced_l2: dict[int, bytearray] = {}
        #: Entry indexes of a replaced table whose references changed (None: all may have).
        self.replaced_entries: dict[int, Sequence[int] | None] = {}
        #: Staged new tables by cache: kept warm in the caches after the switch.
        self._new_l2: list[int] = []
        self._new_refblocks: list[int] = []
        self._new_block_indexes: list[int] = []
        #: New refcounts of the clusters whose refcount changes (set by _build_refcounts).
        self._final: dict[int, int] = {}
        self.snapshots: list[SnapshotEntry] | None = None
        self.virtual_size: int | None = None
        self._old_refcounts: dict[int, int] = {}
        #: Committed refcount blocks decoded whole, by reftable index (byte-wide entries).
        self._decoded: dict[int, Sequence[int]] = {}
        self._whole_blocks = self.refcounts.bits in _UNPACK_CODES
        self._cursor = self.refcounts.free_cluster_index

    # Section: recording

    def old_refcount(self, cluster: int) -> int:
        """Refcount of ``cluster`` in the committed structure."""
        if self._whole_blocks:
            # Each block decoded once: snapshot operations ask for every cluster.
            index, within = divmod(cluster, self.refcounts.entries_per_block)
            values = self._decoded.get(index)
            if values is None:
                values = self._decoded[index] = self._decoded_block(index)
            return values[within]
        value = self._old_refcounts.get(cluster)
        if value is None:
            value = self.refcounts.get(cluster)
            self._old_refcounts[cluster] = value
        return value

    def _decoded_block(self, index: int) -> Sequence[int]:
        """Every refcount of committed refcount block ``index`` (zeros if not allocated)."""
        per_block = self.refcounts.entries_per_block
        offset = self._old_block(self.refcounts.table, index)
        if not offset:
            return (0,) * per_block
        block = self.image.refblock_cache.get(offset)
        code = _UNPACK_CODES[self.refcounts.bits]
        if array.array(code).itemsize * 8 == self.refcounts.bits:
            # array + byteswap: 2048 16-bit refcounts in 0.4 us, struct.unpack takes 7 us
            values = array.array(code, bytes(block))
            if sys.byteorder == "little" and values.itemsize > 1:
                values.byteswap()
            return values
        return struct.unpack(f">{per_block}{code}", block)

    def new_refcount(self, cluster: int) -> int:
        """Refcount of ``cluster`` after the transaction (as recorded so far)."""
        return self.old_refcount(cluster) + self.delta.get(cluster, 0)

    def add(self, offset: int, length: int, addend: int) -> None:
        """Add ``addend`` to the new refcount of every cluster ``[offset, +length)`` touches."""
        if length <= 0:
            return
        first = offset >> self.cluster_bits
        last = (offset + length - 1) >> self.cluster_bits
        delta = self.delta
        for cluster in range(first, last + 1):
            delta[cluster] = delta.get(cluster, 0) + addend

    def release(self, offset: int, length: int) -> None:
        """Drop one reference from every cluster of ``[offset, +length)`` (a table that the
        new generation no longer reaches)."""
        self.add(offset, length, -1)

    def alloc(self, nbytes: int) -> int:
        """Host offset of a run of clusters for ``nbytes``, free in the committed structure
        and not yet taken; they get refcount 1 in the new structure."""
        nclusters = max(1, layout.size_to_clusters(self.cluster_size, nbytes))
        first_free = self._next_free(self._cursor)
        run_start = first_free
        if nclusters > 1:
            cluster, run = first_free, 0
            while run < nclusters:
                if (
                    cluster not in self.taken
                    and cluster not in self.excluded
                    and self.old_refcount(cluster) == 0
                ):
                    if run == 0:
                        run_start = cluster
                    run += 1
                else:
                    run = 0
                cluster += 1
        for c in range(run_start, run_start + nclusters):
            self.taken.add(c)
            self.delta[c] = self.delta.get(c, 0) + 1
        # Every cluster below ``first_free`` is used or taken; so is the run just taken.
        if run_start == first_free:
            first_free = self._next_free(run_start + nclusters)
        self._cursor = first_free
        return run_start << self.cluster_bits

    def _next_free(self, cluster: int) -> int:
        """The lowest cluster from ``cluster`` on that is free in the committed structure
        and not taken."""
        taken = self.taken
        excluded = self.excluded
        if not self._whole_blocks:
            while cluster in taken or cluster in excluded or self.old_refcount(cluster):
                cluster += 1
            return cluster
        per_block = self.refcounts.entries_per_block
        while True:
            index, within = divmod(cluster, per_block)
            values = self._decoded.get(index)
            if values is None:
                values = self._decoded[index] = self._decoded_block(index)
            try:
                within = values.index(0, within)  # the next zero refcount, found in C
            except ValueError:
                cluster = (index + 1) * per_block
                continue
            cluster = index * per_block + within
            if cluster not in taken and cluster not in excluded:
                return cluster
            cluster += 1

    def _untake(self, first: int, nclusters: int) -> None:
        for c in range(first, first + nclusters):
            self.taken.discard(c)
            self.delta[c] -= 1
            self._cursor = min(self._cursor, c)

    def stage(self, offset: int, data: bytes) -> None:
        """Content for clusters obtained from :meth:`alloc` (written by :meth:`commit`)."""
        self.staged[offset] = data

    def reference_tree(self, l1: Sequence[int], addend: int) -> None:
        """``addend`` (+1: a new L1 table references the tree, -1: an L1 table that referenced
        it goes away) on every L2 table of ``l1`` and every cluster those tables reference."""
        for index, l1_entry in enumerate(l1):
            l2_offset = self._l2_offset(l1_entry, index)
            if not l2_offset:
                continue
            self.add(l2_offset, self.cluster_size, addend)
            words = self._l2_words(l2_offset)
            for pos in range(0, len(words), self.words_per_entry):
                entry = words[pos]
                if entry & ~_COPIED:
                    for offset, length in self.decoder.host_ranges(entry):
                        self.add(offset, length, addend)

    def set_active_l1(self, entries: Sequence[int]) -> None:
        """The new active L1 table.  COPIED flags are recomputed in it and in every L2 table
        it reaches (tables whose flags change are copied); like every active L1 it is
        written to a new location and the current one is released."""
        self.active_l1 = [e & ~_COPIED for e in entries]
        self.recheck_all = True

    def replace_l2(
        self, l1_index: int, table: bytearray, changed: Sequence[int] | None = None
    ) -> None:
        """New content for the active L2 table of ``l1_index`` (written to a new cluster,
        COPIED flags recomputed; the current table, if any, is released).  The caller
        records the references the content gains and loses.  Without
        :meth:`set_active_l1`, only replaced tables are rebuilt: valid when the recorded
        changes touch no cluster the other active tables reference.

        ``changed`` (entry indexes) limits the COPIED recomputation to those entries: valid
        when the refcounts of every other entry's clusters stay as they are.
        """
        self.replaced_l2[l1_index] = table
        self.replaced_entries[l1_index] = changed

    def set_snapshots(self, entries: Sequence[SnapshotEntry]) -> None:
        """The new snapshot table (written to a new location; the current one released)."""
        self.snapshots = list(entries)

    def set_virtual_size(self, size: int) -> None:
        """Switch the disk size together with the rest (header bytes 24-71)."""
        self.virtual_size = size

    # Section: helpers

    def _l2_offset(self, l1_entry: int, index: int) -> int:
        return self.decoder.l2_table_offset(l1_entry, index)

    def _l2_words(self, l2_offset: int) -> tuple[int, ...]:
        table = self.image.l2_cache.get(l2_offset)  # read only: never modified here
        return struct.unpack(f">{self.cluster_size // 8}Q", table)

    def _normalize(
        self,
        words: MutableSequence[int] | dict[int, int],
        l2_offset: int,
        entries: Sequence[int] | None = None,
    ) -> bool:
        """Set every COPIED flag of the L2 words (of ``entries`` only, if given) to match
        the new refcounts (``l2_offset`` names the table in errors); True if a word changed.

        The decoder's cluster types, inlined: compressed entries never carry COPIED; an entry
        without a host offset (unallocated, plain zero) is left as it is; NORMAL and
        ZERO_ALLOC get COPIED exactly when their cluster's new refcount is 1.
        """
        changed = False
        step = self.words_per_entry
        positions = range(0, len(words), step) if entries is None else [i * step for i in entries]
        cluster_size, bits = self.cluster_size, self.cluster_bits
        offset_mask, compressed = layout.L2E_OFFSET_MASK, layout.OFLAG_COMPRESSED
        for pos in positions:
            entry = words[pos]
            if entry & compressed:
                want = entry & ~_COPIED
            else:
                data = entry & offset_mask
                if not data:
                    continue
                if data % cluster_size:
                    self.decoder.data_offset(entry, l2_offset, pos // step)  # signals it
                want = entry & ~_COPIED
                if self.new_refcount(data >> bits) == 1:
                    want |= _COPIED
            if want != entry:
                words[pos] = want
                changed = True
        return changed

    def _normalize_entries(
        self, table: bytearray, l2_offset: int, entries: Sequence[int]
    ) -> bytearray:
        """:meth:`_normalize` of the L2 ``entries`` of ``table`` (its bytes, changed in
        place); returns ``table``."""
        step = self.words_per_entry
        words = {}
        for index in entries:
            pos = index * step
            words[pos] = int.from_bytes(table[pos * 8 : pos * 8 + 8], "big")
        wanted = dict(words)
        if self._normalize(wanted, l2_offset, entries):
            for pos, word in wanted.items():
                if word != words[pos]:
                    table[pos * 8 : pos * 8 + 8] = word.to_bytes(8, "big")
        return table

    # Section: building the new generation

    def _build_active_l1(self) -> tuple[list[int], int]:
        """Copy on write every active L2 table whose flags must change, place the new L1;
        returns (entries with COPIED, offset)."""
        assert self.active_l1 is not None
        header = self.image.header
        l2_offsets = [self._l2_offset(e, i) for i, e in enumerate(self.active_l1)]
        for i, l2_offset in enumerate(l2_offsets):
            table = self.replaced_l2.get(i)
            entries = self.replaced_entries.get(i)
            if table is not None and entries is not None:
                # A few changed entries (a commit): patch them in the new table's bytes
                # rather than decoding and re-encoding all of it.
                content = bytes(self._normalize_entries(table, l2_offset, entries))
            elif table is not None:
                words = list(struct.unpack(f">{self.cluster_size // 8}Q", table))
                self._normalize(words, l2_offset)
                content = struct.pack(f">{len(words)}Q", *words)
            elif not l2_offset or not self.recheck_all:
                continue
            else:
                words = list(self._l2_words(l2_offset))
                if not self._normalize(words, l2_offset):
                    continue
                content = struct.pack(f">{len(words)}Q", *words)
            # Never modified in place: the committed generation must stay intact.
            new_offset = self.alloc(self.cluster_size)
            self.stage(new_offset, content)
            self._new_l2.append(new_offset)
            if l2_offset:
                self.release(l2_offset, self.cluster_size)
            l2_offsets[i] = new_offset
        new_l1 = [
            off | _COPIED if off and self.new_refcount(off >> self.cluster_bits) == 1 else off
            for off in l2_offsets
        ]
        if header.l1_size:
            self.release(header.l1_table_offset, header.l1_size * layout.L1_ENTRY_SIZE)
        offset = 0
        if new_l1:
            offset = self.alloc(len(new_l1) * layout.L1_ENTRY_SIZE)
            self.stage(offset, struct.pack(f">{len(new_l1)}Q", *new_l1))
        elif not header.l1_size:
            offset = header.l1_table_offset  # nothing changes
        return new_l1, offset

    def _build_snapshot_table(self) -> int:
        assert self.snapshots is not None
        header = self.image.header
        old_length = table_length(self.image.snapshot_entries)
        if header.nb_snapshots and old_length:
            self.release(header.snapshots_offset, old_length)
        data = serialize_snapshot_table(self.snapshots, header.version)
        if not data:
            return 0
        offset = self.alloc(len(data))
        self.stage(offset, data)
        return offset

    def _build_refcounts(self) -> tuple[list[int], int, int]:
        """Copy on write every refcount block whose entries change, and a new reftable
        (grown if needed) pointing at them and at the untouched old blocks; iterated until
        the new blocks and table describe themselves.  Returns (table, offset, clusters)."""
        header = self.image.header
        cs = self.cluster_size
        per_block = self.refcounts.entries_per_block
        old_table = self.refcounts.table  # read only: the new table is a new list
        old_clusters = header.refcount_table_clusters
        self.release(header.refcount_table_offset, old_clusters * cs)
        new_blocks: dict[int, int] = {}  # refblock index -> new host offset
        table_run: tuple[int, int] | None = None  # (first cluster, clusters)
        while True:
            changed = False
            touched = sorted({c // per_block for c, d in self.delta.items() if d})
            for index in touched:
                if index in new_blocks:
                    continue
                old_offset = self._old_block(old_table, index)
                if old_offset:
                    self.release(old_offset, cs)
                new_blocks[index] = self.alloc(cs)
                changed = True
            entries = max(len(old_table), max(new_blocks, default=-1) + 1)
            nclusters = max(old_clusters, layout.size_to_clusters(cs, entries * 8))
            if table_run is None or table_run[1] < nclusters:
                if table_run is not None:
                    self._untake(*table_run)
                if nclusters > old_clusters:  # room to grow, like qemu's 3/2 rule
                    nclusters = layout.size_to_clusters(cs, (entries * 3 // 2 + 1) * 8)
                if nclusters * cs > layout.MAX_REFTABLE_BYTES:
                    raise RefcountRangeError(
                        f"refcount table would need {nclusters * cs} bytes (limit "
                        f"{layout.MAX_REFTABLE_BYTES})",
                        path=self.image.path,
                    )
                table_run = (self.alloc(nclusters * cs) >> self.cluster_bits, nclusters)
                changed = True
            if not changed:
                break
        assert table_run is not None
        values = self._final_refcounts()
        blocks: dict[int, bytearray] = {}
        for index in new_blocks:
            old_offset = self._old_block(old_table, index)
            blocks[index] = (
                bytearray(self.image.refblock_cache.get(old_offset))
                if old_offset
                else bytearray(cs)
            )
        bits = self.refcounts.bits
        for cluster, value in values.items():
            write_refcount(blocks[cluster // per_block], cluster % per_block, bits, value)
        for index, offset in new_blocks.items():
            self.stage(offset, bytes(blocks[index]))
        self._new_refblocks = list(new_blocks.values())
        self._new_block_indexes = list(new_blocks)
        first, nclusters = table_run
        table = old_table + [0] * (nclusters * cs // 8 - len(old_table))
        for index, offset in new_blocks.items():
            table[index] = offset
        table_offset = first * cs
        self.stage(table_offset, _pack_u64_be(table))
        return table, table_offset, nclusters

    def _old_block(self, old_table: Sequence[int], index: int) -> int:
        return refblock_offset(old_table, index, self.cluster_size, path=self.image.path)

    def _final_refcounts(self) -> dict[int, int]:
        """The new refcount of every cluster whose refcount changes (kept for
        :meth:`_adopt`).  Refuses before anything is written: no refcount may overflow or
        drop below 0."""
        limit = self.refcounts.max_refcount
        values = self._final = {}
        for cluster, d in self.delta.items():
            if not d:
                continue
            value = values[cluster] = self.old_refcount(cluster) + d
            if value < 0:
                raise RefcountRangeError(
                    f"refcount of cluster {cluster} would drop below 0 "
                    f"(offset {cluster << self.cluster_bits:#x})",
                    path=self.image.path,
                )
            if value > limit:
                raise RefcountRangeError(
                    f"refcount of cluster {cluster} would exceed {limit} "
                    f"(refcount_bits={self.refcounts.bits})",
                    path=self.image.path,
                )
        return values

    # Section: commit

    def commit(self, log: CommitLog | None = None) -> None:
        """Build the new generation, write it, switch the header, adopt it in memory.

        With ``log`` (an image using commit records), the generation and its record are
        written with one flush and the header follows without one, if the record can
        hold the commit's extents; otherwise (and without ``log``) two flushes.
        """
        image = self.image
        header = image.header
        if self.active_l1 is None:
            self.active_l1 = [e & ~_COPIED for e in image.l1_table]
        new_l1, l1_offset = self._build_active_l1()
        snapshots = self.snapshots if self.snapshots is not None else image.snapshot_entries
        snapshots_offset = header.snapshots_offset
        if self.snapshots is not None:
            snapshots_offset = self._build_snapshot_table()
        table, table_offset, table_clusters = self._build_refcounts()
        fields = {
            "l1_size": len(new_l1),
            "l1_table_offset": l1_offset,
            "refcount_table_offset": table_offset,
            "refcount_table_clusters": table_clusters,
            "nb_snapshots": len(snapshots),
            "snapshots_offset": snapshots_offset,
        }
        if self.virtual_size is not None and self.virtual_size != header.size:
            fields.update(size=self.virtual_size, crypt_method=header.crypt_method)

        runs = _coalesce(self.staged)
        overlap_check = image.clusters.overlap_check
        if overlap_check is not None:
            # Free by refcount but live metadata is possible only in a corrupt image.
            for offset, data in runs:
                overlap_check(offset, len(data))
        if log is not None:
            from .commit_records import header_fields

            new = header_fields(header, fields)
            if log.write(self.op, runs, new):
                self._adopt(fields, new_l1, snapshots, table)
                log.committed(self._freed_clusters(), self.op, new)
                return
        fault_point(f"{self.op}.write_metadata")
        for offset, data in runs:
            image.file.pwrite(offset, data)
        if log is not None:
            log.before_flush()
        image.file.flush()  # the new generation is durable before anything points at it
        if log is not None:
            log.after_flush()
        fault_point(f"{self.op}.header_switch")
        try:
            write_header_fields(image.file, **fields)
            image.file.flush()
        except BaseException:
            # The switch may or may not be in the file: follow what the header says.
            start, data = layout.pack_fields(**fields)
            if image.file.pread(start, len(data)) == data:
                self._adopt(fields, new_l1, snapshots, table)
                if log is not None:  # written, maybe not durable: as a one-flush commit
                    log.committed(self._freed_clusters(), self.op)
            else:
                image.refblock_cache.clear()
                image.l2_cache.clear()
            raise
        self._adopt(fields, new_l1, snapshots, table)
        if log is not None:
            log.switched()

    def _freed_clusters(self) -> list[int]:
        """Clusters whose refcount this transaction drops to 0."""
        return [cluster for cluster, value in self._final.items() if not value]

    def _adopt(
        self,
        fields: dict[str, int],
        new_l1: list[int],
        snapshots: Sequence[SnapshotEntry],
        table: list[int],
    ) -> None:
        """Memory follows the new generation: header fields, active L1, snapshot list,
        refcount table.  The caches (clean since ``__init__``) keep every table still in
        use, forget those in freed clusters and take the new tables as written: contents
        at an offset never change within a transaction, so nothing stale stays."""
        image = self.image
        header = image.header
        for name, value in fields.items():
            setattr(header, name, value)
        image.l1_table[:] = new_l1
        image.snapshot_entries = list(snapshots)
        refcounts = image.refcounts
        refcounts.adopt_table(table, self._new_block_indexes)
        freed = self._freed_clusters()
        # Below the cursor every cluster was used or is taken now: only the freed ones
        # may be free in the new structure, and the excluded ones (skipped, free).
        refcounts.free_cluster_index = min([self._cursor, *freed, *self.excluded])
        for cache in (image.refblock_cache, image.l2_cache):
            for cluster in freed:
                cache.forget(cluster << self.cluster_bits)
        for cache, offsets in (
            (image.l2_cache, self._new_l2),
            (image.refblock_cache, self._new_refblocks),
        ):
            for offset in offsets:
                cache.put(offset, bytearray(self.staged[offset]), dirty=False)


def _pack_u64_be(values: list[int]) -> bytes:
    """``struct.pack(">{n}Q", *values)`` without building an argument tuple: the reftable
    (512 entries per 4 KiB cluster) is written at every commit."""
    if _ARRAY_Q_IS_U64:
        packed = array.array("Q", values)
        if sys.byteorder == "little":
            packed.byteswap()
        return packed.tobytes()
    return struct.pack(f">{len(values)}Q", *values)


def _coalesce(staged: dict[int, bytes]) -> list[tuple[int, bytes]]:
    """Staged writes sorted by offset, adjacent ones joined (fewer, larger writes)."""
    runs: list[tuple[int, bytearray]] = []
    for offset in sorted(staged):
        data = staged[offset]
        if runs and runs[-1][0] + len(runs[-1][1]) == offset:
            runs[-1][1].extend(data)
        else:
            runs.append((offset, bytearray(data)))
    return [(offset, bytes(data)) for offset, data in runs]

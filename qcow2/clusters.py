"""L1/L2 mapping: guest offset -> host offset, cluster allocation, COW, zero and discard.

A port of the parts of QEMU's ``block/qcow2-cluster.c`` a synchronous writer needs:

* :meth:`ClusterMap.map_range` turns a guest range into runs (host data, zeros, backing
  file, compressed), extended L2 subclusters included, with the one entry decoder
  (:class:`qcow2.l2.L2Decoder`);
* :meth:`ClusterMap.write` writes in place where the active entry has COPIED, else
  allocates new clusters (copy on write of shared, compressed and zero clusters, of the
  touched subclusters with extended L2) and COWs shared L2 tables;
* :meth:`ClusterMap.zeroize` / :meth:`ClusterMap.discard` follow QEMU 7.2's
  ``zero_in_l2_slice`` / ``discard_in_l2_slice`` for v2 and v3.

Order of every allocation: refcounts raised (refblock cache) -> data written -> L2 entry
(the L2 cache depends on the refblock cache, so the entry reaches the disk only after the
refcount) -> old cluster freed (the refblock cache then depends on the L2 cache, so the
refcount drops only after the reference is gone).
"""

from __future__ import annotations

import struct

from .errors import (
    CorruptImageError,
    EncryptionKeyError,
    Qcow2Error,
    RefcountRangeError,
    UnsupportedFeatureError,
    c_hex,
    signal_corruption,
)
from .format import layout
from .format.header import write_header_fields
from .format.layout import ClusterType, SubclusterType, subcluster_range_bits
from .io.fileio import fault_point
from .l2 import L2Decoder

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from .crypto import DataCipher
    from .format.header import Header
    from .format.refcount import RefcountTable
    from .io.cache import TableCache
    from .io.fileio import HostFile
    from .l2 import Run

_U64 = struct.Struct(">Q")
_SECTOR = layout.LUKS_SECTOR_SIZE
_ALL_ALLOC = layout.L2_BITMAP_ALL_ALLOC
_ALL_ZEROES = layout.L2_BITMAP_ALL_ZEROES
_ZERO_SHIFT = layout.SUBCLUSTER_ZERO_SHIFT


class L1Table(list[int]):
    """The active L1 table: a list that counts its changes, so views derived from it (the
    set of L2 table offsets) can be cached.  Replace its content in place
    (``l1[:] = entries``) rather than rebinding it."""

    version = 0

    def __setitem__(self, index: Any, value: Any) -> None:
        super().__setitem__(index, value)
        self.version += 1


class ClusterMap:
    """The active L1 table in memory and the L2 tables behind it (through ``l2_cache``).

    ``l1`` is the active L1 table (entries with flags); other modules (snapshots, commit)
    read and replace it in place.  ``mark_dirty`` is called before the first metadata
    change (lazy refcounts set the dirty bit there); ``accurate_refcounts`` False drops
    the L2-after-refblock ordering (lazy refcounts with the dirty bit set).
    """

    def __init__(
        self, f: HostFile, header: Header, refcounts: RefcountTable, l2_cache: TableCache
    ) -> None:
        self.file = f
        self.header = header
        self.refcounts = refcounts
        self.l2_cache = l2_cache
        self.cluster_size = header.cluster_size
        self.cluster_bits = header.cluster_bits
        self.l2_entries = header.l2_entries
        self.entry_size = header.l2_entry_size
        self.extended = header.extended_l2
        self.subcluster_size = header.subcluster_size
        self.before_metadata_change: Callable[[], None] | None = None
        #: Called with (offset, length) before data or a new table is written to the
        #: host file; raises CorruptImageError if that would hit live metadata.
        self.overlap_check: Callable[[int, int], None] | None = None
        #: Told about non-fatal corruption events (QEMU's ``qcow2_signal_corruption``
        #: with fatal=false): the request goes on.
        self.nonfatal_corruption: Callable[[str], None] | None = None
        self.accurate_refcounts = True
        #: Data clusters are encrypted (LUKS); ``cipher`` is None while no key was given.
        self.encrypted = header.crypt_method != layout.CRYPT_NONE
        self.cipher: DataCipher | None = None
        #: The entry format (one decoder for every reader of the tables).
        self.decoder = L2Decoder(header, f.path)
        raw = f.pread(header.l1_table_offset, header.l1_size * layout.L1_ENTRY_SIZE)
        self.l1 = L1Table(struct.unpack(f">{header.l1_size}Q", raw))
        self._l2_offsets: tuple[int, set[int]] = (-1, set())

    # Section: tables

    def _path(self) -> str:
        return self.file.path

    def l2_offset(self, l1_index: int, l1: list[int] | None = None) -> int:
        """Host offset of the L2 table of ``l1_index`` (0: none), validated."""
        table = self.l1 if l1 is None else l1
        if l1_index >= len(table):
            return 0
        return self.decoder.l2_table_offset(table[l1_index], l1_index)

    def l2_offsets(self) -> set[int]:
        """Host offsets of the L2 tables the active L1 points at (cached per L1 version)."""
        version, offsets = self._l2_offsets
        if version != self.l1.version:
            offsets = {e & layout.L1E_OFFSET_MASK for e in self.l1} - {0}
            self._l2_offsets = (self.l1.version, offsets)
        return offsets

    def l2_table(self, l2_offset: int) -> bytearray:
        """The L2 table at host ``l2_offset`` through the cache (modify it in place, then
        call :meth:`mark_l2_dirty`)."""
        return self.l2_cache.get(l2_offset)

    def mark_l2_dirty(self, l2_offset: int, table: bytearray) -> None:
        """Record a change of ``table``, the L2 table at ``l2_offset`` (re-inserted into
        the cache in case it was evicted meanwhile)."""
        self.l2_cache.put(l2_offset, table, dirty=True)

    def get_entry(self, table: bytearray, index: int) -> tuple[int, int]:
        """``(entry, bitmap)`` of L2 slot ``index`` (bitmap 0 without extended L2)."""
        pos = index * self.entry_size
        entry = int.from_bytes(table[pos : pos + 8], "big")
        if self.extended:
            return entry, int.from_bytes(table[pos + 8 : pos + 16], "big")
        return entry, 0

    def set_entry(self, table: bytearray, index: int, entry: int, bitmap: int = 0) -> None:
        """Store an L2 entry (and bitmap with extended L2) into a cached table."""
        pos = index * self.entry_size
        table[pos : pos + 8] = _U64.pack(entry)
        if self.extended:
            table[pos + 8 : pos + 16] = _U64.pack(bitmap)

    def write_l1_entry(self, index: int) -> None:
        """Write one active L1 entry to disk (the caller flushes)."""
        self.file.pwrite(
            self.header.l1_table_offset + index * layout.L1_ENTRY_SIZE, _U64.pack(self.l1[index])
        )

    def _check_overlap(self, offset: int, length: int) -> None:
        if self.overlap_check is not None:
            self.overlap_check(offset, length)

    def _notify_change(self) -> None:
        if self.before_metadata_change is not None:
            self.before_metadata_change()

    # Section: guest data in host clusters

    def _data_cipher(self) -> DataCipher | None:
        if self.encrypted and self.cipher is None:
            raise EncryptionKeyError(EncryptionKeyError.MISSING_KEY, path=self._path())
        return self.cipher

    def read_data(self, host: int, length: int, guest: int) -> bytes:
        """Plaintext of ``length`` bytes of data clusters at ``host`` holding guest bytes
        at ``guest`` (decrypted with the IVs of the host sectors on LUKS images, of the
        guest sectors on legacy AES images)."""
        cipher = self._data_cipher()
        if cipher is None:
            return self.file.pread(host, length)
        start = host - host % _SECTOR
        end = layout.align_up(host + length, _SECTOR)
        iv_offset = (guest if cipher.guest_iv else host) - (host - start)
        plain = cipher.decrypt(iv_offset, self.file.pread(start, end - start))
        return plain[host - start : host - start + length]

    def write_data(self, host: int, data: bytes | bytearray | memoryview) -> None:
        """Store plaintext ``data`` in data clusters at ``host``: encrypted for that host
        offset on encrypted images (partial sectors merged with their old plaintext)."""
        cipher = self._data_cipher()
        if cipher is None:
            self.file.pwrite(host, data)
            return
        if cipher.guest_iv:
            raise UnsupportedFeatureError(
                "writing legacy AES encrypted images is not supported", path=self._path()
            )
        start = host - host % _SECTOR
        end = layout.align_up(host + len(data), _SECTOR)
        if (start, end) != (host, host + len(data)):
            merged = bytearray(self.read_data(start, end - start, start))
            merged[host - start : host - start + len(data)] = data
            data = merged
        self.file.pwrite(start, cipher.encrypt(start, data))

    # Section: lookup

    def lookup(self, guest_offset: int) -> tuple[int, int]:
        """``(ClusterType, host offset of that byte)`` for a guest offset (host 0 if none;
        compressed: the compressed data's host byte offset)."""
        cluster = guest_offset // self.cluster_size
        l1_index, l2_index = divmod(cluster, self.l2_entries)
        l2_offset = self.l2_offset(l1_index)
        if not l2_offset:
            return ClusterType.UNALLOCATED, 0
        entry, _ = self.get_entry(self.l2_table(l2_offset), l2_index)
        ctype = self.decoder.cluster_type(entry)
        if ctype == ClusterType.COMPRESSED:
            return ctype, self.decoder.compressed_range(entry)[0]
        host = entry & layout.L2E_OFFSET_MASK
        return ctype, host + guest_offset % self.cluster_size if host else 0

    def map_range(self, offset: int, length: int, l1: list[int] | None = None) -> list[Run]:
        """Runs covering guest ``[offset, offset+length)`` through ``l1`` (default: the
        active L1), in four kinds: ``NORMAL`` (host: where the data is), ``ZERO_PLAIN``
        (reads as zeros), ``UNALLOCATED_PLAIN`` (reads from the backing file, zeros
        without one) and ``COMPRESSED`` (host: the L2 entry).  Adjacent runs of one kind
        are merged (``NORMAL`` ones when contiguous on the host, ``COMPRESSED`` never)."""
        out: list[Run] = []
        cs = self.cluster_size
        span = self.l2_entries * cs
        cur, end = offset, offset + length
        while cur < end:
            l1_index = cur // span
            base = l1_index * span
            table_end = min(end, base + span)
            try:
                l2_offset = self.l2_offset(l1_index, l1)
            except CorruptImageError as err:
                err.guest_offset = base
                raise
            if not l2_offset:
                _merge(out, cur, table_end, SubclusterType.UNALLOCATED_PLAIN, None)
                cur = table_end
                continue
            first = (cur - base) // cs
            stop = (table_end - 1 - base) // cs + 1
            table = self.l2_table(l2_offset)
            runs, problem = self.decoder.runs(table, l2_offset, first, stop, base)
            if problem is not None:
                signal_corruption(
                    problem[0],
                    path=self._path(),
                    offset=problem[1],
                    guest_offset=runs[-1][1] if runs else base + first * cs,
                )
            for start, run_end, kind, host in runs:
                lo, hi = max(start, cur), min(run_end, table_end)
                if lo >= hi:
                    continue
                kind = _READ_KINDS[kind]
                if kind == SubclusterType.NORMAL:
                    assert host is not None
                    host += lo - start
                elif kind != SubclusterType.COMPRESSED:
                    host = None
                _merge(out, lo, hi, kind, host)
            cur = table_end
        return out

    # Section: L1 growth and L2 allocation

    def grow_l1(self, min_size: int, *, exact: bool = False) -> None:
        """QEMU's ``qcow2_grow_l1_table``: a bigger L1 in new clusters, switched in with
        one header write (bytes 36-47), the old one freed afterwards."""
        old_size = len(self.l1)
        if min_size <= old_size:
            return
        if exact:
            new_size = min_size
        else:
            new_size = max(old_size, 1)
            while new_size < min_size:
                new_size = (new_size * 3 + 1) // 2
        if new_size > layout.MAX_L1_BYTES // layout.L1_ENTRY_SIZE:
            raise Qcow2Error(
                f"L1 table of {new_size} entries exceeds qemu's limit", path=self._path()
            )
        self._notify_change()
        new_l1 = self.l1 + [0] * (new_size - old_size)
        fault_point("l1_grow.alloc_table")
        new_offset = self.refcounts.alloc(new_size * layout.L1_ENTRY_SIZE)
        self._check_overlap(new_offset, new_size * layout.L1_ENTRY_SIZE)
        switched = False
        try:
            # Refcounts of the new table durable before anything points at it.
            self.refcounts.flush()
            self.file.flush()
            fault_point("l1_grow.write_table")
            self.file.pwrite(new_offset, struct.pack(f">{new_size}Q", *new_l1))
            self.file.flush()
            fault_point("l1_grow.activate_table")
            write_header_fields(self.file, l1_size=new_size, l1_table_offset=new_offset)
            switched = True
            self.file.flush()
        except BaseException:
            if switched:
                # Only the flush after the header write failed: the file may name either
                # table.  Follow the file we wrote (the new table) and keep the old one
                # allocated: a leak at worst, never a table in use with refcount 0.
                self._adopt_l1(new_l1, new_offset)
                raise
            # The header still points at the old table: the new clusters are unused.
            try:
                self.refcounts.free(new_offset, new_size * layout.L1_ENTRY_SIZE)
            except Qcow2Error:
                pass
            raise
        old_offset = self.header.l1_table_offset
        self._adopt_l1(new_l1, new_offset)
        if old_size:
            self.refcounts.free(old_offset, old_size * layout.L1_ENTRY_SIZE)

    def _adopt_l1(self, new_l1: list[int], new_offset: int) -> None:
        """The header names ``new_l1`` at ``new_offset`` now: follow it in memory."""
        self.header.l1_size = len(new_l1)
        self.header.l1_table_offset = new_offset
        self.l1[:] = new_l1

    def l2_for_write(self, l1_index: int) -> tuple[int, bytearray]:
        """The L2 table of ``l1_index`` ready to be modified: allocated if missing, copied
        if shared (no COPIED in the L1 entry).  QEMU's ``get_cluster_table``/``l2_allocate``."""
        if l1_index >= len(self.l1):
            self.grow_l1(l1_index + 1)
        old = self.l2_offset(l1_index)
        if old and self.l1[l1_index] & layout.OFLAG_COPIED:
            return old, self.l2_table(old)
        self._notify_change()
        fault_point("l2_alloc.cow_read")
        table = bytearray(self.l2_table(old)) if old else bytearray(self.cluster_size)
        new = self.refcounts.alloc(self.cluster_size)
        self._check_overlap(new, self.cluster_size)
        self.l2_cache.put(new, table, dirty=True)
        fault_point("l2_alloc.write")
        # The new table and its refcount must both be durable before the L1 entry points
        # at it (one flush covers both: nothing references the table yet).
        self.refcounts.flush()
        self.l2_cache.flush()
        self.file.flush()
        fault_point("l1_update")
        self.l1[l1_index] = new | layout.OFLAG_COPIED
        self.write_l1_entry(l1_index)
        if old:
            # The switch must be durable before the shared table loses our reference.
            self.file.flush()
            self.refcounts.free(old, self.cluster_size)
        return new, table

    # Section: freeing

    def free_any_cluster(self, entry: int) -> None:
        """Drop the reference an L2 entry held (QEMU's ``qcow2_free_any_cluster``).  An
        unaligned cluster is not freed: a non-fatal corruption event, as in QEMU."""
        host = entry & layout.L2E_OFFSET_MASK
        if (
            self.decoder.cluster_type(entry) in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC)
            and host % self.cluster_size
        ):
            if self.nonfatal_corruption is not None:
                self.nonfatal_corruption(f"Cannot free unaligned cluster {host:#x}")
            return
        for offset, length in self.decoder.host_ranges(entry):
            self.free_clusters(offset, length)

    def free_clusters(self, offset: int, length: int) -> None:
        """QEMU's ``qcow2_free_clusters``: a refcount that would drop below 0 (a corrupt
        image) frees nothing, is reported (``qcow2_free_clusters failed: Invalid
        argument``) and does not fail the request: the cluster leaks, as in QEMU."""
        try:
            self.refcounts.free(offset, length)
        except RefcountRangeError:
            from .errors import report_corruption

            report_corruption("qcow2_free_clusters failed: Invalid argument", self._path())

    # Section: writes

    def _in_place(self, entry: int) -> bool:
        """QEMU's ``cluster_needs_new_alloc`` negated: standard cluster with COPIED."""
        return (
            bool(entry & layout.OFLAG_COPIED)
            and not entry & layout.OFLAG_COMPRESSED
            and bool(entry & layout.L2E_OFFSET_MASK)
        )

    def write(self, offset: int, data: bytes, guest_read: Callable[[int, int], bytes]) -> None:
        """Write guest bytes.  ``guest_read(offset, length)`` returns what the guest sees
        now (backing file included): the source of copy-on-write."""
        cs = self.cluster_size
        view = memoryview(data)
        end = offset + len(data)
        cur = offset
        while cur < end:
            l1_index = cur // cs // self.l2_entries
            first = cur // cs
            last = min((end - 1) // cs, (l1_index + 1) * self.l2_entries - 1)
            self._check_write(l1_index, first, last, offset, end)
            l2_offset, table = self.l2_for_write(l1_index)
            cluster = first
            while cluster <= last:
                entry, bitmap = self.get_entry(table, cluster % self.l2_entries)
                if self._in_place(entry):
                    self._write_in_place(
                        cluster, entry, bitmap, l2_offset, table, offset, view, guest_read
                    )
                    cluster += 1
                    continue
                run_end = cluster
                while run_end < last and not self._in_place(
                    self.get_entry(table, (run_end + 1) % self.l2_entries)[0]
                ):
                    run_end += 1
                self._write_new(cluster, run_end, l2_offset, table, offset, view, guest_read)
                cluster = run_end + 1
            cur = (last + 1) * cs

    def _check_write(self, l1_index: int, first: int, last: int, offset: int, end: int) -> None:
        """What QEMU finds wrong with the entries of clusters ``first..last`` (one L2
        table) when it writes guest ``[offset, end)``, signaled before anything changes:
        the zero flag in a v2 image; an unaligned cluster written in place (``Data
        cluster offset ...``, ``Preallocated zero cluster offset ...``); an unaligned
        cluster a partial write copies from (what the copy's read finds); with extended L2,
        an invalid entry (QEMU's ``calculate_l2_meta``: "Invalid cluster entry found",
        one space where the read path has two).  An unaligned cluster overwritten whole is
        only leaked (a non-fatal event when it is freed)."""
        l2_offset = self.l2_offset(l1_index)
        if not l2_offset:
            return
        table = self.l2_table(l2_offset)
        cs = self.cluster_size
        for cluster in range(first, last + 1):
            index = cluster % self.l2_entries
            entry, bitmap = self.get_entry(table, index)
            host = entry & layout.L2E_OFFSET_MASK
            if entry & layout.OFLAG_ZERO and self.header.version < 3:
                self.decoder.check(entry, bitmap, l2_offset, index, bitmap_checked=False)
            in_place = self._in_place(entry)
            if in_place and host % cs:
                kind = "Preallocated zero" if entry & layout.OFLAG_ZERO else "Data"
                guest = max(offset, cluster * cs)
                where = f"(guest offset: {c_hex(guest)})"
                signal_corruption(
                    f"{kind} cluster offset {host:#x} unaligned {where}",
                    path=self._path(),
                    offset=host,
                )
            if self.extended and not entry & layout.OFLAG_COMPRESSED:
                invalid = bitmap & (bitmap >> _ZERO_SHIFT) if host else bitmap & _ALL_ALLOC
                if invalid:
                    signal_corruption(
                        f"Invalid cluster entry found (L2 offset: {c_hex(l2_offset)}, "
                        f"L2 index: {c_hex(index)})",
                        path=self._path(),
                        offset=l2_offset,
                    )
            if not in_place and (cluster * cs < offset or (cluster + 1) * cs > end):
                self.decoder.check(entry, bitmap, l2_offset, index)

    def _write_in_place(
        self,
        cluster: int,
        entry: int,
        bitmap: int,
        l2_offset: int,
        table: bytearray,
        offset: int,
        view: memoryview,
        guest_read: Callable[[int, int], bytes],
    ) -> None:
        cs = self.cluster_size
        index = cluster % self.l2_entries
        host = self.decoder.data_offset(entry, l2_offset, index)
        start = cluster * cs
        seg_start = max(offset, start)
        seg_end = min(offset + len(view), start + cs)
        seg = view[seg_start - offset : seg_end - offset]
        ctype = self.decoder.cluster_type(entry)
        self._check_overlap(host, cs)
        if not self.extended and ctype == ClusterType.NORMAL:
            self.write_data(host + seg_start - start, seg)
            return
        self._notify_change()
        if not self.extended:
            # ZERO_ALLOC kept: the rest of the cluster must read as zeros.
            content = bytearray(cs)
            content[seg_start - start : seg_end - start] = seg
            self.write_data(host, content)
            new_entry, new_bitmap = host | layout.OFLAG_COPIED, 0
        else:
            scs = self.subcluster_size
            alloc = bitmap & _ALL_ALLOC
            first_sc = (seg_start - start) // scs
            last_sc = (seg_end - 1 - start) // scs
            fill_start, fill_end = seg_start, seg_end
            if not alloc >> first_sc & 1:
                fill_start = start + first_sc * scs
            if not alloc >> last_sc & 1:
                fill_end = start + (last_sc + 1) * scs
            if (fill_start, fill_end) != (seg_start, seg_end):
                content = bytearray(guest_read(fill_start, fill_end - fill_start))
                content[seg_start - fill_start : seg_end - fill_start] = seg
                self.write_data(host + fill_start - start, content)
            else:
                self.write_data(host + seg_start - start, seg)
            bits = subcluster_range_bits(first_sc, last_sc)
            zero = (bitmap >> _ZERO_SHIFT) & ~bits
            new_entry, new_bitmap = entry, (alloc | bits) | (zero << _ZERO_SHIFT)
            if new_bitmap == bitmap:
                return
        self.l2_cache.flush_before_write = True
        fault_point("cluster_alloc.write_l2")
        self.set_entry(table, index, new_entry, new_bitmap)
        self.mark_l2_dirty(l2_offset, table)

    def _write_new(
        self,
        first: int,
        last: int,
        l2_offset: int,
        table: bytearray,
        offset: int,
        view: memoryview,
        guest_read: Callable[[int, int], bytes],
    ) -> None:
        """Allocate clusters ``first..last`` (contiguous on the host), fill them with the
        new data merged into the old content, point the L2 entries at them, free the old."""
        cs = self.cluster_size
        count = last - first + 1
        end = offset + len(view)
        # Read the copy-on-write source first: a corrupt old cluster fails here, before
        # anything was allocated.
        if first * cs >= offset and (last + 1) * cs <= end:
            content: bytes | bytearray | memoryview = view[
                first * cs - offset : (last + 1) * cs - offset
            ]
        else:
            buf = bytearray(count * cs)
            for k in range(count):
                start = (first + k) * cs
                if start < offset or start + cs > end:
                    old = guest_read(start, cs)
                    buf[k * cs : k * cs + len(old)] = old
            seg_start = max(offset, first * cs)
            seg_end = min(end, (last + 1) * cs)
            buf[seg_start - first * cs : seg_end - first * cs] = view[
                seg_start - offset : seg_end - offset
            ]
            content = buf
        self._notify_change()
        fault_point("cluster_alloc")
        host = self.refcounts.alloc(count * cs)
        self._check_overlap(host, count * cs)
        fault_point("cluster_alloc.write_data")
        self.write_data(host, content)
        if self.accurate_refcounts:
            self.l2_cache.set_dependency(self.refcounts.cache)
        self.l2_cache.flush_before_write = True
        fault_point("cluster_alloc.write_l2")
        old_entries = []
        for k in range(count):
            cluster = first + k
            index = cluster % self.l2_entries
            entry, bitmap = self.get_entry(table, index)
            old_entries.append(entry)
            new_bitmap = 0
            if self.extended:
                if entry & layout.OFLAG_COMPRESSED:
                    new_bitmap = _ALL_ALLOC
                else:
                    start = cluster * cs
                    first_sc = (max(offset, start) - start) // self.subcluster_size
                    last_sc = (min(end, start + cs) - 1 - start) // self.subcluster_size
                    bits = subcluster_range_bits(first_sc, last_sc)
                    alloc = bitmap & _ALL_ALLOC if entry & layout.L2E_OFFSET_MASK else 0
                    zero = (bitmap >> _ZERO_SHIFT) & ~bits
                    new_bitmap = alloc | bits | (zero << _ZERO_SHIFT)
            self.set_entry(table, index, (host + k * cs) | layout.OFLAG_COPIED, new_bitmap)
        self.mark_l2_dirty(l2_offset, table)
        # The old clusters lose this reference only now (after the L2 update).
        for entry in old_entries:
            self.free_any_cluster(entry)

    # Section: zeroes and discard

    def _update_entries(
        self, offset: int, length: int, decide: Callable[[int, int, int, int], tuple[int, int]]
    ) -> None:
        """For every cluster of a cluster-aligned guest range, replace ``(entry, bitmap)``
        by ``decide(entry, bitmap, first_byte, end_byte)`` (bytes within the cluster) and
        free what the old entry held if the new one no longer holds it."""
        cs = self.cluster_size
        cur, end = offset, offset + length
        while cur < end:
            cluster = cur // cs
            l1_index, index = divmod(cluster, self.l2_entries)
            seg_end = min(end, (cluster + 1) * cs)
            l2_offset = self.l2_offset(l1_index)
            entry, bitmap = self.get_entry(self.l2_table(l2_offset), index) if l2_offset else (0, 0)
            new_entry, new_bitmap = decide(
                entry, bitmap, cur - cluster * cs, seg_end - cluster * cs
            )
            if (new_entry, new_bitmap) != (entry, bitmap):
                self._notify_change()
                l2_offset, table = self.l2_for_write(l1_index)
                fault_point("cluster_zero.write_l2")
                self.set_entry(table, index, new_entry, new_bitmap)
                self.mark_l2_dirty(l2_offset, table)
                old_host = entry & layout.L2E_OFFSET_MASK
                if self.decoder.cluster_type(entry) in ClusterType.HOLDING_HOST and (
                    entry & layout.OFLAG_COMPRESSED
                    or new_entry & layout.L2E_OFFSET_MASK != old_host
                ):
                    self.free_any_cluster(entry)
            cur = seg_end

    def zeroize(self, offset: int, length: int, *, unmap: bool) -> bool:
        """Make a cluster-aligned range (subcluster-aligned with extended L2) read as zeros
        through metadata only (v3; QEMU's ``qcow2_subcluster_zeroize``).  Returns False,
        changing nothing, if that is impossible (v2, partly written compressed cluster):
        the caller then writes zeros."""
        if self.header.version < 3:
            return False
        cs = self.cluster_size
        if self.extended:
            for cluster in range(offset // cs, (offset + length - 1) // cs + 1):
                whole = offset <= cluster * cs and (cluster + 1) * cs <= offset + length
                if not whole and self.lookup(cluster * cs)[0] == ClusterType.COMPRESSED:
                    return False

        def decide(entry: int, bitmap: int, lo: int, hi: int) -> tuple[int, int]:
            ctype = self.decoder.cluster_type(entry)
            drop = ctype == ClusterType.COMPRESSED or (unmap and ctype in ClusterType.HOLDING_HOST)
            new_entry = 0 if drop else entry
            if not self.extended:
                return new_entry | layout.OFLAG_ZERO, 0
            if lo == 0 and hi == cs:
                return new_entry, _ALL_ZEROES
            scs = self.subcluster_size
            bits = subcluster_range_bits(lo // scs, (hi - 1) // scs)
            alloc = (bitmap & _ALL_ALLOC) & ~bits
            zero = (bitmap >> _ZERO_SHIFT) | bits
            return entry, alloc | (zero << _ZERO_SHIFT)

        self._update_entries(offset, length, decide)
        return True

    def discard(self, offset: int, length: int, *, full: bool, has_backing: bool) -> None:
        """QEMU's ``discard_in_l2_slice`` over whole clusters.  ``full``: entries become 0
        (the backing file shows through); else v3 makes them read zeros (0x1 / all-zero
        bitmap) and v2 deallocates them."""

        def decide(entry: int, bitmap: int, lo: int, hi: int) -> tuple[int, int]:
            del lo, hi
            if full:
                return 0, 0
            if has_backing or self.decoder.cluster_type(entry) in ClusterType.HOLDING_HOST:
                if self.extended:
                    return 0, _ALL_ZEROES
                return (layout.OFLAG_ZERO if self.header.version >= 3 else 0), 0
            return entry, bitmap

        self._update_entries(offset, length, decide)

    def shrink_l1(self, new_l1_size: int) -> None:
        """Unhook and free the L2 tables of L1 entries ``>= new_l1_size`` (their entries
        were discarded before); the L1 keeps its size (QEMU's ``qcow2_shrink_l1_table``)."""
        freed = []
        for index in range(new_l1_size, len(self.l1)):
            l2_offset = self.l2_offset(index)
            if self.l1[index]:
                self._notify_change()
                self.l1[index] = 0
                self.write_l1_entry(index)
                if l2_offset:
                    freed.append(l2_offset)
        if freed:
            self.l2_cache.flush()
            self.file.flush()
            for l2_offset in freed:
                self.refcounts.free(l2_offset, self.cluster_size)


#: The kind :meth:`ClusterMap.map_range` reports for each subcluster type: what a read
#: needs to know (data, zeros, the backing file, compressed).
_READ_KINDS = {
    SubclusterType.NORMAL: SubclusterType.NORMAL,
    SubclusterType.COMPRESSED: SubclusterType.COMPRESSED,
    SubclusterType.ZERO_PLAIN: SubclusterType.ZERO_PLAIN,
    SubclusterType.ZERO_ALLOC: SubclusterType.ZERO_PLAIN,
    SubclusterType.UNALLOCATED_PLAIN: SubclusterType.UNALLOCATED_PLAIN,
    SubclusterType.UNALLOCATED_ALLOC: SubclusterType.UNALLOCATED_PLAIN,
}


def _merge(out: list[Run], start: int, end: int, kind: int, host: int | None) -> None:
    """Append a run to ``out``, merged into the last one where that keeps it one run."""
    if out:
        last_start, last_end, last_kind, last_host = out[-1]
        if (
            last_end == start
            and last_kind == kind
            and kind != SubclusterType.COMPRESSED
            and (
                kind != SubclusterType.NORMAL
                or (last_host is not None and host == last_host + (last_end - last_start))
            )
        ):
            out[-1] = (last_start, end, kind, last_host)
            return
    out.append((start, end, kind, host))

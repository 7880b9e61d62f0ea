"""A small write-back cache of metadata tables (L2 tables, refcount blocks).

Like QEMU's ``qcow2-cache.c``: tables are read once, modified in memory, marked dirty and
written back on :meth:`TableCache.flush` or eviction.  A cache may *depend* on another
(``l2_cache.set_dependency(refblock_cache)``): before any of its dirty tables reaches the disk,
the other cache is written and the host file flushed, so an L2 entry can never be durable
before the refcount that protects the cluster it points to.
"""

from __future__ import annotations

from .fileio import HostFile, fault_point

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable


class TableCache:
    """Cluster-sized tables keyed by host offset, LRU, write-back."""

    def __init__(self, f: HostFile, table_size: int, capacity: int, name: str) -> None:
        self.file = f
        self.table_size = table_size
        self.capacity = max(capacity, 4)
        #: "l2" or "refblock": used in fault point names.
        self.name = name
        #: least recently used first (a dict keeps insertion order; a hit re-inserts)
        self._tables: dict[int, bytearray] = {}
        self._dirty: set[int] = set()
        self._dependency: TableCache | None = None
        #: Set when data written since the last flush must be durable before the tables
        #: (QEMU's ``qcow2_cache_depends_on_flush``: COW data before the L2 entry).
        self.flush_before_write = False
        #: Called with (offset, length, ignore) before tables are written back (the
        #: image's metadata overlap check, QEMU's ``qcow2_cache_entry_flush``); raising
        #: stops the write-back before any of those tables is written.
        self.overlap_check: Callable[[int, int, int], None] | None = None
        #: The structure kind this cache holds (qcow2.overlap flag): no overlap with itself.
        self.overlap_ignore = 0

    def set_dependency(self, other: TableCache) -> None:
        """Write ``other`` (and flush the file) before writing any table of this cache.

        QEMU's ``qcow2_cache_set_dependency``: an existing dependency in the other
        direction is resolved first (by flushing), so dependencies never form a cycle.
        """
        if other._dependency is not None:
            other.flush_dependency()
        if self._dependency is not None and self._dependency is not other:
            self.flush_dependency()
        self._dependency = other

    def flush_dependency(self) -> None:
        """Write the cache this one depends on, flush the file, and drop the dependency."""
        dep = self._dependency
        if dep is not None:
            dep.flush()
            self.file.flush()
            self._dependency = None

    def get(self, offset: int) -> bytearray:
        """The table at host ``offset`` (read from disk on a miss).  Modify it in place,
        then call :meth:`mark_dirty`."""
        table = self._tables.pop(offset, None)
        if table is not None:
            self._tables[offset] = table  # now the most recently used
            return table
        table = bytearray(self.file.pread(offset, self.table_size))
        self._insert(offset, table)
        return table

    def put(self, offset: int, table: bytearray, *, dirty: bool) -> None:
        """Insert a table built in memory (a new or copied table)."""
        if dirty:
            self._check_overlap(offset)
        self._insert(offset, table)
        if dirty:
            self._dirty.add(offset)

    def mark_dirty(self, offset: int) -> None:
        """Record that the cached table at ``offset`` was modified."""
        if offset not in self._tables:
            raise KeyError(f"table at {offset:#x} is not cached (use put)")
        if offset not in self._dirty:
            self._check_overlap(offset)
        self._dirty.add(offset)

    def _check_overlap(self, offset: int) -> None:
        """A table about to change must not be other metadata as well: checked when it
        is first marked dirty (the request fails before anything is written) and again
        before it is written back."""
        if self.overlap_check is not None:
            self.overlap_check(offset, self.table_size, self.overlap_ignore)

    def is_dirty(self) -> bool:
        """True if some table waits to be written."""
        return bool(self._dirty)

    def forget(self, offset: int) -> None:
        """Drop a table without writing it (its cluster was freed)."""
        self._tables.pop(offset, None)
        self._dirty.discard(offset)

    def _insert(self, offset: int, table: bytearray) -> None:
        self._tables.pop(offset, None)
        self._tables[offset] = table
        while len(self._tables) > self.capacity:
            victim = next(iter(self._tables))
            if victim in self._dirty:
                self._write_back([victim])
            self._tables.pop(victim)

    def _write_back(self, offsets: list[int]) -> None:
        if self._dependency is not None:
            # The tables about to be written may rely on the other cache's changes (new
            # refcounts before the L2 entries using them; L2 entries gone before the
            # refcounts they held drop): make those durable first.
            self.flush_dependency()
        for offset in offsets:
            self._check_overlap(offset)
        if self.flush_before_write:
            self.file.flush()
            self.flush_before_write = False
        for offset in sorted(offsets):
            fault_point(f"{self.name}_cache.write")
            self.file.pwrite(offset, bytes(self._tables[offset]))
            self._dirty.discard(offset)

    def flush(self) -> None:
        """Write every dirty table (after the dependency); the caller flushes the file."""
        if self._dirty:
            self._write_back(list(self._dirty))

    def clear(self) -> None:
        """Forget everything (after :meth:`flush`, or when metadata was rewritten)."""
        self._tables.clear()
        self._dirty.clear()

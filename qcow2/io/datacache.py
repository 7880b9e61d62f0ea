"""A small, bounded, write-through cache of guest data clusters.

For images read and rewritten in small pieces, as a vTPM state store is (swtpm rewrites a
few KiB of a ~30 KiB file per command): reads are served from memory, and an atomic commit
(:func:`qcow2.commit.commit_atomically`) completes partly written clusters from it instead
of reading them back, then stores the clusters it wrote.  Off unless an image enables it
(:meth:`qcow2.image.Image.enable_data_cache`); any other change of guest data empties it.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping


class DataCache:
    """Guest clusters by index, least recently used first, at most ``limit`` bytes."""

    def __init__(self, cluster_size: int, limit: int, readahead: int = 0) -> None:
        self.cluster_size = cluster_size
        self.capacity = max(1, limit // cluster_size)
        #: A miss reads at least this many clusters (those not cached yet).
        self.readahead = max(1, min(readahead // cluster_size, self.capacity // 2))
        self._clusters: dict[int, bytes] = {}

    def read(self, offset: int, length: int, fill: Callable[[int, int], bytes]) -> bytes:
        """``length`` guest bytes at ``offset``; missing clusters are read whole with
        ``fill(offset, length)`` (one call per run of missing clusters, read ahead to at
        least ``readahead`` clusters; ``fill`` may return less at the disk's end).  A
        request larger than the cache bypasses it.  Eviction is first in, first out: the
        working sets this cache is for fit in it whole."""
        cs = self.cluster_size
        first, last = offset // cs, (offset + length - 1) // cs
        clusters = self._clusters
        if first == last:  # the common case: no joining
            data = clusters.get(first)
            if data is not None:
                start = offset - first * cs
                return data[start : start + length]
        elif last - first + 1 > self.capacity:
            return fill(offset, length)
        missing = [i for i in range(first, last + 1) if i not in clusters]
        if missing:  # read ahead after the last miss, up to what is cached already
            more = missing[-1] + 1
            while more < missing[0] + self.readahead and more not in clusters:
                missing.append(more)
                more += 1
        fetched: dict[int, bytes] = {}
        while missing:
            run = 1
            while run < len(missing) and missing[run] == missing[0] + run:
                run += 1
            data = fill(missing[0] * cs, run * cs)
            for k in range(run):
                fetched[missing[k]] = self._insert(missing[k], data[k * cs : (k + 1) * cs])
            missing = missing[run:]
        out = bytearray(length)
        pos = 0
        for i in range(first, last + 1):
            data = fetched.get(i) or clusters[i]
            start = max(offset - i * cs, 0)
            end = min(offset + length - i * cs, cs)
            out[pos : pos + end - start] = memoryview(data)[start:end]
            pos += end - start
        return bytes(out)

    def store(self, clusters: Mapping[int, bytes | bytearray]) -> None:
        """The new content of whole clusters (written by a commit that succeeded)."""
        for index, data in clusters.items():
            self._clusters.pop(index, None)
            self._insert(index, bytes(data))

    def _insert(self, index: int, data: bytes) -> bytes:
        if len(data) < self.cluster_size:  # the disk's last, partial cluster
            data += bytes(self.cluster_size - len(data))
        self._clusters[index] = data
        while len(self._clusters) > self.capacity:
            del self._clusters[next(iter(self._clusters))]
        return data

    def clear(self) -> None:
        """Forget everything (guest data changed some other way)."""
        self._clusters.clear()

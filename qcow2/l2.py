"""L1 and L2 entries: the one decoder every reader of the cluster tables uses.

QEMU's ``qcow2_get_cluster_type``, ``qcow2_get_subcluster_type``,
``qcow2_parse_compressed_l2_entry`` and the corruption checks of ``qcow2_get_host_offset``
(``block/qcow2.h``, ``block/qcow2-cluster.c``), in one place for all their readers: guest
I/O and metadata transactions (``clusters``, ``image``, ``transaction``), ``check``,
``qemu-img map`` (``tools/map``), amend's zero-cluster expansion (``tools/amend``) and the
recovery scans (``scan``).

An :class:`L2Decoder` knows one image's entry format (cluster size, extended L2, version,
external data file).  Per entry it gives the cluster type, the compressed descriptor, the
host bytes a reference holds and the corruption QEMU reports for it; per range of a table
it gives :data:`Run` tuples (guest start, guest end, :class:`SubclusterType`, host offset),
finding stretches of plain entries with slice compares rather than one step per entry.

Corruption found here is signalled through :func:`qcow2.errors.signal_corruption`.
"""

from __future__ import annotations

import struct

from .errors import c_hex, signal_corruption
from .format import layout
from .format.layout import ClusterType, SubclusterType

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

    from .format.header import Header

    #: A guest range with one status: (start, end, SubclusterType, host).  ``host`` is the
    #: host offset of ``start`` (None if the range has none); for COMPRESSED it is the L2
    #: entry itself (the compressed descriptor).
    Run = tuple[int, int, int, int | None]

_OFFSET = layout.L2E_OFFSET_MASK
_COPIED = layout.OFLAG_COPIED
_COMPRESSED = layout.OFLAG_COMPRESSED
_ZERO = layout.OFLAG_ZERO
_ALLOC_MASK = layout.SUBCLUSTER_ALLOC_MASK
_ZERO_SHIFT = layout.SUBCLUSTER_ZERO_SHIFT


class L2Decoder:
    """The L1/L2 entry format of one image (see the module docstring).

    ``path`` names the image in corruption messages.
    """

    __slots__ = (
        "_coffset_mask",
        "_csize_mask",
        "_csize_shift",
        "cluster_bits",
        "cluster_size",
        "data_file",
        "extended",
        "path",
        "subcluster_size",
        "version",
        "words_per_entry",
    )

    def __init__(self, header: Header, path: str | None) -> None:
        self.path = path
        self.cluster_size = header.cluster_size
        self.cluster_bits = header.cluster_bits
        self.extended = header.extended_l2
        self.version = header.version
        #: guest data lives in an external file: offset 0 with COPIED is a real cluster
        self.data_file = header.has_data_file
        self.subcluster_size = header.subcluster_size
        self.words_per_entry = header.l2_entry_size // 8
        self._csize_shift = layout.compressed_shift(header.cluster_bits)
        self._coffset_mask = layout.compressed_offset_mask(header.cluster_bits)
        self._csize_mask = layout.compressed_sectors_mask(header.cluster_bits)

    # Section: L1 entries

    def l2_table_offset(self, l1_entry: int, l1_index: int) -> int:
        """Host offset of the L2 table an L1 entry points at (0: none).  An unaligned one is
        a fatal corruption."""
        found = self.l1_problem(l1_entry, l1_index)
        if found is not None:
            signal_corruption(found[0], path=self.path, offset=found[1])
        return l1_entry & layout.L1E_OFFSET_MASK

    def l1_problem(self, l1_entry: int, l1_index: int) -> tuple[str, int] | None:
        """The corruption QEMU reports for L1 entry ``l1_index`` (an unaligned L2 table
        offset), as ``(message, offset)``, or None."""
        offset = l1_entry & layout.L1E_OFFSET_MASK
        if offset % self.cluster_size:
            return (
                f"L2 table offset {c_hex(offset)} unaligned (L1 index: {c_hex(l1_index)})",
                offset,
            )
        return None

    # Section: one L2 entry

    def cluster_type(self, entry: int) -> int:
        """The :class:`ClusterType` of an L2 entry (QEMU's ``qcow2_get_cluster_type``).

        With extended L2 the zero flag is unused (zeros live in the bitmap); with an
        external data file, offset 0 with COPIED is a cluster at offset 0.
        """
        if entry & _COMPRESSED:
            return ClusterType.COMPRESSED
        if entry & _ZERO and not self.extended:
            return ClusterType.ZERO_ALLOC if entry & _OFFSET else ClusterType.ZERO_PLAIN
        if not entry & _OFFSET:
            if self.data_file and entry & _COPIED:
                return ClusterType.NORMAL
            return ClusterType.UNALLOCATED
        return ClusterType.NORMAL

    def compressed_range(self, entry: int) -> tuple[int, int]:
        """``(host offset, bytes)`` of a compressed entry's data (QEMU's
        ``qcow2_parse_compressed_l2_entry``)."""
        coffset = entry & self._coffset_mask
        sectors = ((entry >> self._csize_shift) & self._csize_mask) + 1
        return coffset, sectors * 512 - (coffset & 511)

    def compressed_entry(self, coffset: int, length: int) -> int:
        """The L2 entry of ``length`` compressed bytes at host ``coffset`` (the inverse of
        :meth:`compressed_range`; never COPIED)."""
        sectors = (coffset + length - 1) // 512 - coffset // 512
        return _COMPRESSED | (sectors << self._csize_shift) | coffset

    def host_ranges(self, entry: int) -> list[tuple[int, int]]:
        """Host byte ranges a reference through this entry holds (what refcounts count):
        the cluster of NORMAL and ZERO_ALLOC, the data of COMPRESSED, else nothing."""
        ctype = self.cluster_type(entry)
        if ctype == ClusterType.COMPRESSED:
            return [self.compressed_range(entry)]
        if ctype in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC) and entry & _OFFSET:
            return [(entry & _OFFSET, self.cluster_size)]
        return []

    def problem(
        self, entry: int, bitmap: int, l2_offset: int, index: int, *, bitmap_checked: bool = True
    ) -> tuple[str, int] | None:
        """The corruption QEMU's ``qcow2_get_host_offset`` reports for entry ``index`` of the
        L2 table at ``l2_offset``, as ``(message, offset of the culprit)``, or None.

        In QEMU's order: an invalid subcluster bitmap (``bitmap_checked=False`` skips it,
        as the write path does), the zero flag in a v2 image, an unaligned cluster offset.
        """
        where = _where(l2_offset, index)
        if entry & _COMPRESSED:
            return None
        host = entry & _OFFSET
        # extended L2: allocated and zero at once, or allocated without a host cluster
        invalid = bitmap & (bitmap >> _ZERO_SHIFT) if host else bitmap & _ALLOC_MASK
        if bitmap_checked and self.extended and invalid:
            return f"Invalid cluster entry found  {where}", l2_offset
        if entry & _ZERO and self.version < 3:
            return f"Zero cluster entry found in pre-v3 image {where}", l2_offset
        if host % self.cluster_size:
            return f"Cluster allocation offset {c_hex(host)} unaligned {where}", host
        return None

    def check(
        self, entry: int, bitmap: int, l2_offset: int, index: int, *, bitmap_checked: bool = True
    ) -> None:
        """Signal the corruption :meth:`problem` finds, if any."""
        found = self.problem(entry, bitmap, l2_offset, index, bitmap_checked=bitmap_checked)
        if found is not None:
            signal_corruption(found[0], path=self.path, offset=found[1])

    def data_offset(self, entry: int, l2_offset: int, index: int) -> int:
        """The host cluster offset of an entry (0: none).  An unaligned one is a fatal
        corruption."""
        host = entry & _OFFSET
        if host % self.cluster_size:
            signal_corruption(
                f"Cluster allocation offset {c_hex(host)} unaligned {_where(l2_offset, index)}",
                path=self.path,
                offset=host,
            )
        return host

    def subclusters(self, entry: int, bitmap: int, start: int) -> list[Run]:
        """The runs of one valid entry mapping guest ``start``: one per subcluster with
        extended L2 (compressed entries: one), else one."""
        cs = self.cluster_size
        host = entry & _OFFSET
        if entry & _COMPRESSED:
            return [(start, start + cs, SubclusterType.COMPRESSED, entry)]
        if not self.extended:
            if entry & _ZERO:
                kind = SubclusterType.ZERO_ALLOC if host else SubclusterType.ZERO_PLAIN
                return [(start, start + cs, kind, host or None)]
            if host or (self.data_file and entry & _COPIED):
                return [(start, start + cs, SubclusterType.NORMAL, host)]
            return [(start, start + cs, SubclusterType.UNALLOCATED_PLAIN, None)]
        runs: list[Run] = []
        scs = self.subcluster_size
        for sc in range(layout.SUBCLUSTERS_PER_CLUSTER):
            s = start + sc * scs
            at = host + sc * scs if host else None
            if bitmap >> (_ZERO_SHIFT + sc) & 1:
                kind = SubclusterType.ZERO_ALLOC if host else SubclusterType.ZERO_PLAIN
            elif host and bitmap >> sc & 1:
                kind = SubclusterType.NORMAL
            elif host:
                # UNALLOCATED_ALLOC keeps a valid host offset although it reads from below.
                kind = SubclusterType.UNALLOCATED_ALLOC
            else:
                kind = SubclusterType.UNALLOCATED_PLAIN
            runs.append((s, s + scs, kind, at))
        return runs

    # Section: ranges of a table

    def runs(
        self, table: bytes | bytearray, l2_offset: int, first: int, stop: int, base: int
    ) -> tuple[list[Run], tuple[str, int] | None]:
        """The runs of entries ``first .. stop-1`` of the L2 table ``table`` (at host
        ``l2_offset``) whose entry 0 maps guest offset ``base``, and the corruption that
        ended the walk early (None if it got through).

        Stretches of unallocated entries, and of data clusters contiguous on the host with
        nothing but COPIED set, come out as one run each (found by slice compares).
        """
        step = self.words_per_entry
        count = stop - first
        words = struct.unpack_from(f">{count * step}Q", table, first * step * 8)
        cs = self.cluster_size
        out: list[Run] = []
        j = 0
        while j < count:
            entry = words[j * step]
            start = base + (first + j) * cs
            if step == 1 and _plain(entry, cs):
                n = _progression_length(words, j, count, cs if entry else 0)
                if entry:
                    host = entry & _OFFSET
                    out.append((start, start + n * cs, SubclusterType.NORMAL, host))
                else:
                    out.append((start, start + n * cs, SubclusterType.UNALLOCATED_PLAIN, None))
                j += n
                continue
            bitmap = words[j * step + 1] if step == 2 else 0
            found = self.problem(entry, bitmap, l2_offset, first + j)
            if found is not None:
                return out, found
            out.extend(self.subclusters(entry, bitmap, start))
            j += 1
        return out, None


def _where(l2_offset: int, index: int) -> str:
    """Where an L2 entry is, as QEMU's messages say it."""
    return f"(L2 offset: {c_hex(l2_offset)}, L2 index: {c_hex(index)})"


def _plain(entry: int, cluster_size: int) -> bool:
    """Whether a standard L2 entry is 0 (unallocated) or an aligned data cluster with at
    most the COPIED flag: the entries :func:`_progression_length` may skip over."""
    if entry == 0:
        return True
    host = entry & _OFFSET
    return host != 0 and host % cluster_size == 0 and entry & ~(_OFFSET | _COPIED) == 0


def _progression_length(words: Sequence[int], first: int, end: int, step: int) -> int:
    """How many of ``words[first:end]`` continue ``words[first]`` by ``step`` each (>= 1).

    Gallops by doubling, then bisects, comparing whole slices against the progression.
    """
    origin = words[first]

    def continues(lo: int, hi: int) -> bool:
        expected = (
            range(origin + lo * step, origin + hi * step, step) if step else (origin,) * (hi - lo)
        )
        return words[first + lo : first + hi] == tuple(expected)

    good = 1  # words[first:first + good] are known to continue the progression
    while first + good < end:
        ahead = min(2 * good, end - first)
        if continues(good, ahead):
            good = ahead
            continue
        bad = ahead  # the mismatch is in [good, bad)
        while bad - good > 1:
            middle = (good + bad) // 2
            if continues(good, middle):
                good = middle
            else:
                bad = middle
        break
    return good

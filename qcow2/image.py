"""Opening, creating and using images: :class:`Image`, :func:`open`, :func:`create`.

``Image`` is the one reader of a qcow2 image, for the driver's own guest I/O as for the
qemu-img tools: it ties the header, refcounts, metadata caches and cluster mapping
together, handles locking, the dirty/corrupt/autoclear bits, and delegates snapshots,
atomic commits and check to their modules.  :func:`open_chain` opens an image and its
backing chain (one loop rule, one depth limit, QEMU's nesting of backing errors) as the
library opens it or as qemu-img does (``mode``); :class:`RawImage` is a raw layer.

The ``qcow2`` command's read-only subcommands open images here too, so this module and
what it imports at module level stay cheap to import: no ``typing``, ``contextlib``,
``collections`` at run time, and the encryption and write-path modules are imported by
the functions that need them (``tests/qcow2/test_import_diet.py``).
"""

from __future__ import annotations

import errno as _errno
import os
import struct

from . import overlap
from .errors import (
    BackingChainError,
    BackingOpenError,
    CorruptImageError,
    EncryptionKeyError,
    InvalidImageError,
    OpenOptionError,
    OutOfRangeError,
    Qcow2Error,
    Qcow2IOError,
    ReadOnlyError,
    SnapshotError,
    UnsupportedFeatureError,
    signal_corruption,
)
from .format import layout
from .format.header import (
    Header,
    HeaderExtension,
    clear_unknown_autoclear,
    read_header,
    write_header_fields,
)
from .format.layout import SubclusterType
from .io.cache import TableCache
from .io.fileio import HostFile, fault_point
from .io.lock import lock_image

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from types import TracebackType
    from typing import TypeAlias

    from .check import CheckResult
    from .clusters import ClusterMap
    from .commit_records import CommitLog
    from .crypto import DataCipher
    from .format.header import OpenMode
    from .format.refcount import RefcountTable
    from .format.snapshot_table import SnapshotEntry
    from .io.datacache import DataCache
    from .l2 import Run
    from .snapshot_view import SnapshotView

    #: One image of a backing chain.
    Layer: TypeAlias = "Image | RawImage"

#: Bytes of metadata tables each cache may hold.
_CACHE_BYTES = 8 * 1024 * 1024
#: Largest explicit zero buffer written at once.
_ZERO_CHUNK = 1024 * 1024


class RawImage:
    """A raw image (a layer of a backing chain, or what qemu-img opens as raw): guest
    offset == file offset, the size rounded up to whole sectors, zeros past the end."""

    #: Nothing of qcow2: no header, no snapshots, no backing file.
    header = None
    snapshots: list[SnapshotEntry] = []
    backing = None
    format = "raw"

    def __init__(self, f: HostFile) -> None:
        self.file = f
        self.path = f.path
        self.virtual_size = layout.align_up(f.size(), 512)

    def read(self, offset: int, length: int) -> bytes:
        """Bytes of the raw file (zeros past its end)."""
        return self.file.pread(offset, length)

    def close(self) -> None:
        """Close the file."""
        self.file.close()


def backing_path(image_path: str, name: str) -> str:
    """QEMU's ``path_combine``: a relative backing (or data) file name is relative to the
    directory of the image naming it, and spelled as QEMU spells it."""
    if name.startswith("/") or "/" not in image_path:
        return name
    return image_path[: image_path.rindex("/") + 1] + name


class _GuestDataChange:
    """The context of :meth:`Image._mutating` and of every metadata change: a corruption
    found inside is signaled (QEMU's ``qcow2_signal_corruption``) and stops the image
    (a class: ``contextlib`` costs start-up)."""

    __slots__ = ("image",)

    def __init__(self, image: Image) -> None:
        self.image = image

    def __enter__(self) -> None:
        pass

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if isinstance(exc, CorruptImageError):
            if exc.signaled:
                self.image._signal_corruption(exc.message, fatal=True)
            self.image._stop_after_corruption(exc)


class Image:
    """An open qcow2 image (see :func:`open` / :func:`create`).

    Attributes used by the other qcow2 modules: ``file`` (HostFile), ``header``,
    ``refcounts`` (RefcountTable), ``clusters`` (ClusterMap), ``l2_cache``, ``l1_table``
    (the active L1 in memory), ``snapshot_entries``, ``path``, ``writable``, ``backing``
    (the next image of the chain, set by :func:`open_chain`).

    Not thread-safe: callers serialize access (one lock around every call).  Metadata
    changes are cached (write-back) until :meth:`flush` or :meth:`close`; data writes go
    straight to the file.
    """

    format = "qcow2"

    def __init__(
        self,
        f: HostFile,
        header: Header,
        *,
        force_share: bool,
        cipher: DataCipher | None = None,
        overlap_checks: int = overlap.DEFAULT,
    ) -> None:
        self.file = f
        #: Data cluster cipher of an encrypted image (None: plain, or no key given).
        self.cipher = cipher
        self.path = f.path
        self.header = header
        self.writable = f.writable
        self.force_share = force_share
        self.backing: Layer | None = None
        self._set_lazy_dirty = False
        self._closed = False
        #: Why the image stopped accepting writes (a corruption was detected), if it did.
        self._broken: str | None = None
        #: A corruption event was reported (QEMU's ``signaled_corruption``).
        self._signaled = False
        self._snapshot_areas_cache: (
            tuple[
                list[SnapshotEntry], tuple[int, int], tuple[tuple[int, int], list[tuple[int, int]]]
            ]
            | None
        ) = None
        #: The structures writes are checked against (:mod:`qcow2.overlap` flags: QEMU's
        #: ``overlap-check`` option, "cached" by default).
        self.overlap_checks = overlap_checks
        self._compressed_cache: tuple[int, bytes] | None = None
        #: Guest clusters kept in memory (None: off; :meth:`enable_data_cache`).
        self.data_cache: DataCache | None = None
        #: Commit records in use (None: off; :meth:`enable_commit_records`).
        self.commit_log: CommitLog | None = None
        #: Commit records asked for: set up at the first commit.
        self._records_wanted = False
        #: Header bytes 24-71 a writable open rolled forward to, not written yet (the
        #: next flush writes them: an open alone never changes the file).
        self._unwritten_fields: bytes | None = None
        #: The record slots may hold records: emptied before the first header change
        #: made without a record (:meth:`_settle`).
        self._stale_slots = False
        self._load_metadata()

    # Section: metadata setup

    def _load_metadata(self) -> None:
        header = self.header
        capacity = max(16, _CACHE_BYTES // header.cluster_size)
        self.refblock_cache = TableCache(self.file, header.cluster_size, capacity, "refblock")
        self.l2_cache = TableCache(self.file, header.cluster_size, capacity, "l2")
        for cache, kind in (
            (self.refblock_cache, overlap.REFCOUNT_BLOCK),
            (self.l2_cache, overlap.ACTIVE_L2),
        ):
            cache.overlap_check = self._overlap_check
            cache.overlap_ignore = kind
        self._refcounts: RefcountTable | None = None
        self._clusters: ClusterMap | None = None
        #: Parsed snapshot table; qcow2.snapshots replaces it when it rewrites the table.
        self.snapshot_entries: list[SnapshotEntry] = self._read_snapshot_entries()

    @property
    def refcounts(self) -> RefcountTable:
        """The refcount table (read on first use: ``qemu-img info`` needs none)."""
        table = self._refcounts
        if table is None:
            from .format.refcount import RefcountTable

            table = RefcountTable(self.file, self.header, self.refblock_cache)
            table.decrement_dependency = self.l2_cache
            table.freed_hook = self._cluster_freed
            table.overlap_check = self._overlap_check
            self._refcounts = table
        return table

    @property
    def clusters(self) -> ClusterMap:
        """The cluster mapping and the active L1 table (read on first use)."""
        mapping = self._clusters
        if mapping is None:
            from .clusters import ClusterMap

            mapping = ClusterMap(self.file, self.header, self.refcounts, self.l2_cache)
            mapping.before_metadata_change = self._before_metadata_change
            mapping.overlap_check = self._overlap_check
            mapping.nonfatal_corruption = self._nonfatal_corruption
            mapping.accurate_refcounts = not self.header.dirty
            mapping.cipher = self.cipher
            self._clusters = mapping
        return mapping

    def _cluster_freed(self, offset: int) -> None:
        self.l2_cache.forget(offset)

    def _reload_metadata(self) -> None:
        """Re-read everything after another module rewrote metadata behind the caches."""
        self._forget_data()
        self.header = read_header(self.file, writable=self.writable)
        self._load_metadata()

    # Section: properties

    @property
    def l1_table(self) -> list[int]:
        """The active L1 table in memory (modify in place)."""
        return self.clusters.l1

    @property
    def virtual_size(self) -> int:
        """Guest disk size in bytes."""
        return self.header.size

    @property
    def encrypted(self) -> bool:
        """True if guest data clusters are encrypted (``crypt_method`` != 0)."""
        return self.header.crypt_method != layout.CRYPT_NONE

    @property
    def cluster_size(self) -> int:
        """Cluster size in bytes."""
        return self.header.cluster_size

    @property
    def version(self) -> int:
        """qcow2 version (2 or 3)."""
        return self.header.version

    @property
    def refcount_bits(self) -> int:
        """Refcount width in bits."""
        return self.header.refcount_bits

    @property
    def backing_file(self) -> str | None:
        """Backing file name as stored in the header."""
        return self.header.backing_file

    @property
    def snapshots(self) -> list[SnapshotEntry]:
        """The internal snapshots (parsed snapshot table, in table order)."""
        return list(self.snapshot_entries)

    def _read_snapshot_entries(self) -> list[SnapshotEntry]:
        from .format.snapshot_table import read_snapshot_table

        h = self.header
        return read_snapshot_table(
            self.file,
            h.snapshots_offset,
            h.nb_snapshots,
            path=self.path,
            version=h.version,
            virtual_size=h.size,
            cluster_size=h.cluster_size,
        )

    # Section: guards

    def _check_open(self) -> None:
        if self._closed:
            raise Qcow2Error("image is closed", path=self.path)

    def _check_io(self) -> None:
        """Guest I/O (and everything qemu-img does beyond ``info``) needs the key of an
        encrypted image, and the data inside the image (an image opened as qemu-img opens
        it may have an external data file: its metadata can be read, its data not)."""
        self._check_open()
        if self.encrypted and self.cipher is None:
            raise EncryptionKeyError(EncryptionKeyError.MISSING_KEY, path=self.path)
        if self.header.has_data_file:
            raise UnsupportedFeatureError(
                "images with an external data file are not supported", path=self.path
            )

    def _check_writable(self) -> None:
        self._check_io()
        if not self.writable:
            raise ReadOnlyError("image is opened read-only", path=self.path)
        if self._broken is not None:
            raise CorruptImageError(
                f"image unusable after a detected corruption: {self._broken}", path=self.path
            )

    def _mutating(self) -> _GuestDataChange:
        """Guard a change of guest data (``with self._mutating(): ...``): on a detected
        corruption, stop like QEMU does (drop the cached metadata unwritten, refuse
        further writes) so nothing more reaches the file."""
        self._check_writable()
        self._settle()
        self._guest_data_changes()
        self._forget_data()
        return _GuestDataChange(self)

    def corruption_guard(self) -> _GuestDataChange:
        """``with image.corruption_guard(): ...`` around metadata changes made outside
        this class (``amend``): a corruption found inside is signaled as QEMU does (the
        corrupt bit, no further writes through this image)."""
        self._settle()
        return _GuestDataChange(self)

    def _settle(self) -> None:
        """Before a change that is not a commit with a record: the header on disk must be
        durable and current (in-place writes and other allocators know no records), and
        the record slots empty (:meth:`CommitLog.invalidate`)."""
        log = self.commit_log
        if self._unwritten_fields is not None or (log is not None and not log.settled):
            self.flush()
        if log is not None:
            log.invalidate()
        elif self._stale_slots:
            from .commit_records import clear_slots

            clear_slots(self.file, self.header)
            self._stale_slots = False

    def _stop_after_corruption(self, err: CorruptImageError) -> None:
        if not self.writable:
            return  # nothing cached to drop, no write to refuse
        self._broken = err.message
        self.l2_cache.clear()
        self.refblock_cache.clear()

    def _signal_corruption(self, message: str, *, fatal: bool) -> None:
        """QEMU 7.2's ``qcow2_signal_corruption``: report the event once (a fatal one on a
        writable image always, unless the corrupt bit is already set), and for a fatal
        one on a writable image set the corrupt bit (on disk for version 3; a version 2
        header has no field for it, QEMU's header rewrite leaves it unchanged), so that
        later read-write opens are refused.  A fatal event on a read-only image is
        reported as non-fatal.  The caller fails the request (fatal) or goes on."""
        h = self.header
        fatal = fatal and self.writable
        if self._signaled and (not fatal or h.corrupt):
            return
        from .errors import corruption_line, report_corruption

        report_corruption(corruption_line(message, fatal=fatal), self.path)
        self._signaled = True
        if fatal:
            h.incompatible_features |= layout.INCOMPAT_CORRUPT
            if h.version >= 3:
                try:
                    write_header_fields(self.file, incompatible_features=h.incompatible_features)
                    self.file.flush()
                except Qcow2Error:
                    pass  # QEMU ignores a failure to mark the image, too

    def _nonfatal_corruption(self, message: str) -> None:
        self._signal_corruption(message, fatal=False)

    def _read_guard(self, err: CorruptImageError) -> None:
        """A read found a corruption: signal it (fatal on a writable image)."""
        if err.signaled:
            self._signal_corruption(err.message, fatal=True)
            self._stop_after_corruption(err)

    def report_corruption(self, err: CorruptImageError) -> None:
        """Signal a corruption a tool found reading this image's metadata itself (``map``)
        as a read through the image would (once; non-fatal on a read-only image)."""
        self._read_guard(err)

    def detect_metadata_preallocation(self) -> bool:
        """QEMU's ``qcow2_detect_metadata_preallocation``, run by its first block-status
        query of an image (``qemu-img map``, ``convert``, ``compare``): whether more clusters
        have a refcount than the file has allocated blocks for.  It reads the refcounts of
        the clusters up to the end of the file (at most ~10/9 of the allocated ones); a
        corruption found there (an unaligned refcount block) is signaled and otherwise
        ignored, as QEMU ignores the error."""
        cs = self.header.cluster_size
        try:
            real_clusters = os.fstat(self.file.fd).st_blocks * 512 // cs
        except OSError:
            return False
        threshold = max(real_clusters * 10 // 9, real_clusters + 2)
        end = layout.size_to_clusters(cs, self.file.size())
        count = 0
        try:
            for cluster in range(end):
                if count >= threshold:
                    break
                count += bool(self.refcounts.get(cluster))
        except CorruptImageError as err:
            self._read_guard(err)
            return False
        except Qcow2IOError:
            return False  # a refcount block QEMU cannot read either: the error is ignored
        return count >= threshold

    def _guest_data_changes(self) -> None:
        """Called before guest data changes.  Persistent dirty bitmaps record guest
        writes, which this library does not do: the first change marks them inconsistent
        by clearing autoclear bit 0 (what the qcow2 spec asks of a program without bitmap
        support; QEMU then ignores them, and their clusters count as leaks)."""
        h = self.header
        if h.autoclear_features & layout.AUTOCLEAR_BITMAPS:
            h.autoclear_features &= ~layout.AUTOCLEAR_BITMAPS
            write_header_fields(self.file, autoclear_features=h.autoclear_features)
            self.file.flush()

    def _overlap_check(self, offset: int, length: int, ignore: int = 0) -> None:
        """QEMU's ``qcow2_pre_write_overlap_check``: a write of ``[offset, +length)``
        (data, or a table of the kind ``ignore`` names: :mod:`qcow2.overlap` flags) must
        not land on live metadata, which only a corrupt image makes possible.  Which
        structures are checked is the ``overlap-check`` open option (QEMU's "cached" by
        default: inactive L2 tables are not looked at), in QEMU's order; a hit is a fatal
        corruption "Preventing invalid write on metadata (overlaps with ...)"."""
        ol = overlap
        chk = self.overlap_checks & ~ignore
        if not length:
            return
        h = self.header
        cs = h.cluster_size
        what = 0
        if chk & ol.MAIN_HEADER and offset < cs:
            what = ol.MAIN_HEADER
        # The clusters the write touches, as a byte range [low, high) of whole clusters.
        low = offset // cs * cs
        high = ((offset + length - 1) // cs + 1) * cs

        def hits(start: int, size: int) -> bool:
            return size > 0 and start < high and low < start + size

        clusters = range(low, high, cs)
        snapshots = self.snapshot_entries
        if what:
            pass
        elif chk & ol.ACTIVE_L1 and hits(h.l1_table_offset, h.l1_size * layout.L1_ENTRY_SIZE):
            what = ol.ACTIVE_L1
        elif chk & ol.REFCOUNT_TABLE and hits(
            h.refcount_table_offset, h.refcount_table_clusters * cs
        ):
            what = ol.REFCOUNT_TABLE
        elif chk & ol.SNAPSHOT_TABLE and snapshots and hits(*self._snapshot_areas()[0]):
            what = ol.SNAPSHOT_TABLE
        elif chk & ol.INACTIVE_L1 and any(hits(*area) for area in self._snapshot_areas()[1]):
            what = ol.INACTIVE_L1
        elif chk & ol.ACTIVE_L2 and not self.clusters.l2_offsets().isdisjoint(clusters):
            what = ol.ACTIVE_L2
        elif chk & ol.REFCOUNT_BLOCK and not self.refcounts.block_offsets.isdisjoint(clusters):
            what = ol.REFCOUNT_BLOCK
        elif chk & ol.INACTIVE_L2 and snapshots and self._inactive_l2_hit(hits):
            what = ol.INACTIVE_L2
        elif (
            chk & ol.BITMAP_DIRECTORY
            and h.autoclear_features & layout.AUTOCLEAR_BITMAPS
            and h.bitmaps_extension is not None
            and hits(h.bitmaps_extension[2], h.bitmaps_extension[1])
        ):
            what = ol.BITMAP_DIRECTORY
        name = ol.NAMES.get(what)
        if name is None and h.crypto_header is not None and hits(*h.crypto_header):
            # not in QEMU's list: losing the LUKS key slots would lose all data
            name = "crypto header"
        if name is not None:
            signal_corruption(
                f"Preventing invalid write on metadata (overlaps with {name})",
                path=self.path,
                offset=offset,
                size=length,
            )

    def _snapshot_areas(self) -> tuple[tuple[int, int], list[tuple[int, int]]]:
        """``(offset, length)`` of the snapshot table and of the snapshots' L1 tables,
        computed once per snapshot table (the overlap check asks at every table write)."""
        entries = self.snapshot_entries
        key = (len(entries), self.header.snapshots_offset)
        cached = self._snapshot_areas_cache
        if cached is not None and cached[0] is entries and cached[1] == key:
            return cached[2]
        from .format.snapshot_table import table_length

        areas = (
            (self.header.snapshots_offset, table_length(entries)),
            [(e.l1_table_offset, e.l1_size * layout.L1_ENTRY_SIZE) for e in entries],
        )
        self._snapshot_areas_cache = (entries, key, areas)
        return areas

    def _inactive_l2_hit(self, hits: Callable[[int, int], bool]) -> bool:
        """The ``all`` mode's disk reads: the L2 tables the snapshots' L1 tables name."""
        cs = self.header.cluster_size
        file_size = self.file.size()
        for e in self.snapshot_entries:
            # past the end of the file an L1 table reads as zeros: nothing to read there
            length = min(e.l1_size * layout.L1_ENTRY_SIZE, max(0, file_size - e.l1_table_offset))
            raw = self.file.pread(e.l1_table_offset, length // 8 * 8)
            for (entry,) in struct.iter_unpack(">Q", raw):
                l2 = entry & layout.L1E_OFFSET_MASK
                if l2 and hits(l2, cs):
                    return True
        return False

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.header.size:
            raise OutOfRangeError(
                f"request {offset:#x}+{length:#x} outside the virtual disk "
                f"({self.header.size:#x} bytes)",
                path=self.path,
            )

    def _before_metadata_change(self) -> None:
        """Lazy refcounts: set and flush the dirty bit before refcounts may go stale."""
        h = self.header
        if h.lazy_refcounts and not h.dirty and h.version >= 3:
            features = h.incompatible_features | layout.INCOMPAT_DIRTY
            write_header_fields(self.file, incompatible_features=features)
            self.file.flush()
            h.incompatible_features = features
            self._set_lazy_dirty = True
            self.clusters.accurate_refcounts = False

    # Section: reading

    def read(self, offset: int, length: int) -> bytes:
        """``length`` guest bytes at ``offset`` (backing file and zeros included)."""
        self._check_io()
        self._check_range(offset, length)
        cache = self.data_cache
        if cache is not None and length:
            return cache.read(offset, length, self._read_within)
        return self._read(offset, length)

    def enable_data_cache(self, limit: int, *, readahead: int = 0) -> None:
        """Keep up to ``limit`` bytes of guest clusters in memory (:mod:`qcow2.io.datacache`),
        reading at least ``readahead`` bytes on a miss: for images read and rewritten in
        small pieces through :meth:`commit_atomically`."""
        from .io.datacache import DataCache

        self.data_cache = DataCache(self.header.cluster_size, limit, readahead)

    def _forget_data(self) -> None:
        if self.data_cache is not None:
            self.data_cache.clear()

    def _read_within(self, offset: int, length: int) -> bytes:
        """:meth:`_read`, cut at the disk's end (the data cache reads whole clusters)."""
        length = min(length, self.header.size - offset)
        return self._read(offset, length) if length > 0 else b""

    def _read(self, offset: int, length: int) -> bytes:
        try:
            runs = self.clusters.map_range(offset, length)
            if len(runs) == 1 and runs[0][2] == SubclusterType.NORMAL:
                host = runs[0][3]
                assert host is not None
                return self.clusters.read_data(host, length, offset)  # one read
            return bytes(self._read_runs(offset, length, runs))
        except CorruptImageError as err:
            self._read_guard(err)
            raise

    def read_with_l1(self, l1: list[int], offset: int, length: int) -> bytes:
        """Guest bytes as seen through another L1 table (snapshot views)."""
        self._check_io()
        try:
            return bytes(self._read_guest(offset, length, l1))
        except CorruptImageError as err:
            self._read_guard(err)
            raise

    def _read_guest(self, offset: int, length: int, l1: list[int] | None = None) -> bytearray:
        return self._read_runs(offset, length, self.clusters.map_range(offset, length, l1))

    def _read_runs(self, offset: int, length: int, runs: list[Run]) -> bytearray:
        """The guest bytes ``[offset, +length)`` that :meth:`ClusterMap.map_range` mapped
        to ``runs``."""
        out = bytearray(length)
        for start, end, kind, host in runs:
            pos, n = start - offset, end - start
            if kind == SubclusterType.NORMAL:
                assert host is not None
                out[pos : pos + n] = self.clusters.read_data(host, n, start)
            elif kind == SubclusterType.UNALLOCATED_PLAIN:
                backing = self.backing
                if backing is not None and start < backing.virtual_size:
                    n = min(n, backing.virtual_size - start)
                    out[pos : pos + n] = backing.read(start, n)
            elif kind == SubclusterType.COMPRESSED:
                assert host is not None
                cluster = self._decompress(host)
                within = start % self.header.cluster_size
                out[pos : pos + n] = cluster[within : within + n]
        return out

    def _decompress(self, entry: int) -> bytes:
        cached = self._compressed_cache
        if cached is not None and cached[0] == entry:
            return cached[1]
        h = self.header
        coffset, csize = self.clusters.decoder.compressed_range(entry)
        if coffset + csize > self.file.size() + h.cluster_size:
            raise Qcow2IOError(
                f"compressed cluster at {coffset:#x} lies past the end of the file",
                path=self.path,
            )
        from .compress import decompress

        data = decompress(
            self.file.pread(coffset, csize),
            h.cluster_size,
            h.compression_type,
            where=f"at {coffset:#x}",
            path=self.path,
        )
        self._compressed_cache = (entry, data)
        return data

    # Section: writing

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write guest bytes (copy on write of shared, compressed and zero clusters)."""
        self._check_writable()
        self._check_range(offset, len(data))
        if not len(data):
            return
        self._compressed_cache = None
        with self._mutating():
            self.clusters.write(offset, bytes(data), self._cow_read)

    def _cow_read(self, offset: int, length: int) -> bytes:
        return bytes(self._read_guest(offset, length))

    def _write_explicit_zeroes(self, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            n = min(_ZERO_CHUNK, end - offset)
            self.clusters.write(offset, bytes(n), self._cow_read)
            offset += n

    def _reads_as_zero(self, offset: int, length: int) -> bool:
        """True if metadata alone says ``[offset, +length)`` reads as zeros (QEMU's
        ``is_zero`` via block status: zero clusters, or unallocated over no backing)."""
        if length <= 0:
            return True
        for start, end, kind, _ in self.clusters.map_range(offset, length):
            if kind == SubclusterType.ZERO_PLAIN:
                continue
            if kind == SubclusterType.UNALLOCATED_PLAIN:
                backing = self.backing
                if backing is None or start >= backing.virtual_size:
                    continue
                n = min(end - start, backing.virtual_size - start)
                if backing.read(start, n).count(0) == n:
                    continue
            return False
        return True

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Make a range read as zeros, through metadata where QEMU 7.2 does so (v3 zero
        flag / extended L2 zero bits; ``unmap`` also frees the clusters), else by
        writing zeros (v2 deallocates whole clusters when there is no backing file)."""
        self._check_writable()
        self._check_range(offset, length)
        if not length:
            return
        self._compressed_cache = None
        with self._mutating():
            self._write_zeroes(offset, length, unmap)

    def _write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        h = self.header
        end = offset + length
        if h.version < 3:
            if self.backing is not None:
                self._write_explicit_zeroes(offset, length)
                return
            cs = h.cluster_size
            start = layout.align_up(offset, cs)
            stop = end if end == h.size else end // cs * cs
            for lo, hi in ((offset, min(start, end)), (max(stop, start), end)):
                if hi > lo and not self._reads_as_zero(lo, hi - lo):
                    self._write_explicit_zeroes(lo, hi - lo)
            if stop > start:
                self.clusters.discard(start, stop - start, full=False, has_backing=False)
            return
        gran = h.subcluster_size
        start = layout.align_up(offset, gran)
        stop = end if end == h.size else end // gran * gran
        # Head and tail partial granules (inside one granule: the head is the request).
        for lo, hi in ((offset, min(start, end)), (max(stop, start), end)):
            if hi <= lo:
                continue
            g_lo = lo // gran * gran
            g_hi = min(g_lo + gran, h.size)
            rest_zero = self._reads_as_zero(g_lo, lo - g_lo) and self._reads_as_zero(hi, g_hi - hi)
            if (
                rest_zero
                and self._no_data(g_lo, g_hi - g_lo)
                and self.clusters.zeroize(g_lo, g_hi - g_lo, unmap=unmap)
            ):
                continue
            self._write_explicit_zeroes(lo, hi - lo)
        if stop > start and not self.clusters.zeroize(start, stop - start, unmap=unmap):
            self._write_explicit_zeroes(start, stop - start)

    def _no_data(self, offset: int, length: int) -> bool:
        """True if no byte of the range is host data or compressed (QEMU only zeroizes a
        partial granule whose type is unallocated or zero)."""
        return all(
            kind in (SubclusterType.ZERO_PLAIN, SubclusterType.UNALLOCATED_PLAIN)
            for _, _, kind, _ in self.clusters.map_range(offset, length)
        )

    def discard(self, offset: int, length: int) -> None:
        """QEMU 7.2's discard: whole clusters only (and the final partial cluster); v3
        makes them read zeros, v2 deallocates them (no-op over a backing file)."""
        self._check_writable()
        self._check_range(offset, length)
        h = self.header
        if h.version < 3 and self.backing is not None:
            return
        cs = h.cluster_size
        start = layout.align_up(offset, cs)
        end = offset + length
        stop = end if end == h.size and offset % cs == 0 else end // cs * cs
        if stop > start:
            self._compressed_cache = None
            with self._mutating():
                self.clusters.discard(
                    start, stop - start, full=False, has_backing=self.backing is not None
                )

    def flush(self) -> None:
        """Write every cached metadata change and make everything durable."""
        self._check_open()
        if not self.writable or self._broken is not None:
            return
        with _GuestDataChange(self):  # a table write may hit metadata (overlap check)
            self.l2_cache.flush()
            self.refblock_cache.flush()
            self.l2_cache.flush()
            log = self.commit_log
            if self._unwritten_fields is not None:
                self.file.pwrite(layout.RECORD_FIELDS_START, self._unwritten_fields)
            if log is not None:
                log.before_flush()
            self.file.flush()
            self._unwritten_fields = None
            if log is not None:
                log.after_flush()

    def resize(self, new_size: int) -> None:
        """Grow or shrink the virtual disk as ``qemu-img resize [--shrink]`` does."""
        self._check_writable()
        if new_size < 0:
            raise OutOfRangeError(f"invalid size {new_size}", path=self.path)
        new_size = layout.align_up(new_size, 512)
        if new_size == self.header.size:
            return
        if self.header.has_bitmaps:
            # QEMU resizes the bitmaps; dropping them instead would cost their owner (an
            # incremental backup chain, say) more than a refusal.
            raise UnsupportedFeatureError(
                "Cannot resize an image with persistent dirty bitmaps (this library does "
                "not maintain them; qemu-img resize does)",
                path=self.path,
            )
        with self._mutating():
            self._resize(new_size)

    def _resize(self, new_size: int) -> None:
        h = self.header
        old_size = h.size
        cs = h.cluster_size
        if new_size > old_size:
            self.clusters.grow_l1(layout.size_to_clusters(cs * h.l2_entries, new_size), exact=True)
            self.flush()
            write_header_fields(self.file, size=new_size)
            self.file.flush()
            h.size = new_size
            backing = self.backing
            if backing is not None and backing.virtual_size > old_size:
                # The backing file must not show through the new area.
                self.write_zeroes(old_size, min(new_size, backing.virtual_size) - old_size)
            return
        # Shrink: zero the tail of the last kept cluster so a later grow reads zeros, drop
        # every cluster past the end, then switch the size.
        tail_end = min(layout.align_up(new_size, cs), old_size)
        if tail_end > new_size:
            self._write_explicit_zeroes(new_size, tail_end - new_size)
        first_dropped = layout.align_up(new_size, cs)
        if layout.align_up(old_size, cs) > first_dropped:
            self.clusters.discard(
                first_dropped,
                layout.align_up(old_size, cs) - first_dropped,
                full=True,
                has_backing=self.backing is not None,
            )
        self.clusters.shrink_l1(layout.size_to_clusters(cs * h.l2_entries, new_size))
        self.flush()
        # As QEMU: refcount blocks left unused leave the table, the space after the last
        # cluster still in use goes back to the host, then the size changes.
        self._shrink_step("Failed to discard unused refblocks", self.refcounts.shrink_table)
        self.flush()
        file_size = self.file.size()
        last = self.refcounts.last_used_cluster(file_size)
        if last < 0:
            self._shrink_step("Failed to find the last cluster", self._no_references)
        if (last + 1) * cs < file_size:
            fault_point("shrink.truncate")
            self.file.truncate((last + 1) * cs)
        write_header_fields(self.file, size=new_size)
        self.file.flush()
        h.size = new_size
        self._compressed_cache = None

    def _shrink_step(self, what: str, step: Callable[[], None]) -> None:
        """Run one step of a shrink; a corruption it finds is signaled, and the shrink
        fails as QEMU's does: ``what: <strerror>``."""
        try:
            step()
        except CorruptImageError as err:
            if not err.signaled:
                raise
            self._signal_corruption(err.message, fatal=True)
            failure = CorruptImageError(f"{what}: {os.strerror(err.errno)}", path=self.path)
            failure.signaled = True  # reported above
            raise failure from err

    def _no_references(self) -> None:
        signal_corruption("There are no references in the refcount table.", path=self.path)

    def grow_l1(self, min_size: int) -> None:
        """Grow the active L1 to at least ``min_size`` entries (snapshot apply)."""
        with self._mutating():
            self.clusters.grow_l1(min_size)

    # Section: delegation to the other modules

    def _before_metadata_rewrite(self) -> None:
        """Other modules read and write tables directly: start them from a clean state."""
        self._forget_data()
        self.flush()
        self._settle()
        self._compressed_cache = None

    def _after_metadata_rewrite(self) -> None:
        self.flush()
        self.l2_cache.clear()
        self._compressed_cache = None

    def create_snapshot(
        self,
        name: str,
        *,
        replace: bool = False,
        content: Sequence[tuple[int, bytes]] = (),
    ) -> SnapshotEntry:
        """Create internal snapshot ``name`` (``qemu-img snapshot -c``).

        ``replace=True`` drops every snapshot named ``name`` in the same metadata switch
        (QEMU's savevm over an existing tag, but a crash keeps the old one or the new one).
        ``content`` (``(guest_offset, data)`` extents) makes the snapshot hold the active
        state with those writes applied, leaving the active state unchanged.
        """
        from .snapshots import create_snapshot

        self._check_writable()
        for offset, data in content:
            self._check_range(offset, len(data))
        self._before_metadata_rewrite()
        try:
            with _GuestDataChange(self):
                return create_snapshot(self, name, replace=replace, content=content)
        finally:
            self._after_metadata_rewrite()

    def apply_snapshot(self, name: str, *, name_only: bool = False) -> SnapshotEntry:
        """Revert the disk to snapshot ``name`` (``qemu-img snapshot -a``: ID, then name;
        ``name_only``: the name alone, as QEMU's loadvm)."""
        from .snapshots import apply_snapshot

        self._check_writable()
        if self.header.has_bitmaps:
            # QEMU refuses too: the bitmaps would not record what the revert changes.
            raise SnapshotError("Device has active dirty bitmaps", path=self.path)
        self._before_metadata_rewrite()
        try:
            with _GuestDataChange(self):
                return apply_snapshot(self, name, name_only=name_only)
        finally:
            self._after_metadata_rewrite()

    def delete_snapshot(self, name: str, *, name_only: bool = False) -> SnapshotEntry:
        """Delete snapshot ``name`` (``qemu-img snapshot -d``: name, then ID; ``name_only``:
        the name alone, as QEMU's delvm)."""
        from .snapshots import delete_snapshot

        self._check_writable()
        self._before_metadata_rewrite()
        try:
            with _GuestDataChange(self):
                return delete_snapshot(self, name, name_only=name_only)
        finally:
            self._after_metadata_rewrite()

    def snapshot(self, name: str, *, name_only: bool = False) -> SnapshotView:
        """A read-only view of snapshot ``name`` (ID first, then name; the name alone with
        ``name_only``)."""
        from .format.snapshot_table import find_snapshot
        from .snapshot_view import SnapshotView

        self._check_open()
        self.flush()
        entries = self.snapshots
        index = find_snapshot(entries, name, id_first=True, path=self.path, name_only=name_only)
        return SnapshotView(self, entries[index])

    def snapshot_views(self) -> list[SnapshotView]:
        """A read-only view of every snapshot, in table order (no lookup by name: listing
        many snapshots stays linear)."""
        from .snapshot_view import SnapshotView

        self._check_open()
        self.flush()
        return [SnapshotView(self, entry) for entry in self.snapshots]

    def encrypt_data(self, host_offset: int, plaintext: bytes) -> bytes:
        """The bytes to store for guest data ``plaintext`` placed at ``host_offset``
        (sector aligned): encrypted for that offset on an encrypted image, else unchanged.
        For modules that stage data clusters themselves."""
        self._check_io()
        if self.cipher is None:
            return plaintext
        return self.cipher.encrypt(host_offset, plaintext)

    def enable_commit_records(self) -> bool:
        """Commit with one flush from now on (:mod:`qcow2.commit_records`): the header
        switch of each :meth:`commit_atomically` follows its flush instead of needing one
        of its own, and opening the image rolls forward.  The first commit adds the
        records' header extension and sets their autoclear bit (each step flushed), so
        nothing is written before.  False if this image cannot have them (version 2, a
        backing file, no room in cluster 0); its commits then keep two flushes."""
        from .commit_records import possible

        self._check_writable()
        if self.commit_log is None:
            self._records_wanted = possible(self.header)
        return self.commit_log is not None or self._records_wanted

    def commit_atomically(self, writes: Sequence[tuple[int, bytes]]) -> None:
        """All of ``writes`` or none across a crash; durable on return."""
        from .commit import commit_atomically

        self._check_writable()
        for offset, data in writes:
            self._check_range(offset, len(data))
        self._compressed_cache = None
        self._guest_data_changes()
        if self.commit_log is None and self._records_wanted:
            from .commit_records import enable

            self._records_wanted = False
            self.commit_log = enable(self)
        if self.commit_log is None:
            self._settle()
        with _GuestDataChange(self):
            try:
                written = commit_atomically(self, writes)
            except BaseException:
                self._forget_data()
                raise
        if self.data_cache is not None:
            self.data_cache.store(written)

    def check(self, repair: str | None = None) -> CheckResult:
        """``qemu-img check [-r leaks|all]``."""
        from .check import check_image

        self._check_io()
        self.flush()
        if repair and self.writable:
            self._settle()
        try:
            return check_image(self, repair)
        finally:
            if repair and self.writable:
                self._reload_metadata()

    # Section: closing

    def close(self) -> None:
        """Flush, clear the dirty bit lazy refcounts set, release the lock (idempotent)."""
        if self._closed:
            return
        try:
            if self.writable and self._broken is None:
                self.flush()
                h = self.header
                if self._set_lazy_dirty and h.dirty:
                    features = h.incompatible_features & ~layout.INCOMPAT_DIRTY
                    write_header_fields(self.file, incompatible_features=features)
                    self.file.flush()
                    h.incompatible_features = features
        finally:
            self._closed = True
            if self.backing is not None:
                self.backing.close()
            self.file.close()

    def __enter__(self) -> Image:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# Section: open and create


def open(
    path: str,
    *,
    writable: bool = False,
    force_share: bool = False,
    key_secret: bytes | None = None,
    options: Mapping[str, str] | None = None,
    roll_forward: bool = False,
) -> Image:
    """Open a qcow2 image and its backing chain; use as a context manager.

    ``writable`` takes QEMU's writer locks (refused while QEMU holds the image); a
    read-only open locks like ``qemu-img info``; ``force_share`` takes no lock (``-U``).
    ``key_secret`` is the passphrase of a LUKS-encrypted image (``encrypt.key-secret``):
    a wrong one raises :class:`~qcow2.errors.EncryptionKeyError`; without one the image
    opens for ``info`` and snapshot listing, and guest I/O raises that error.
    ``options`` are QEMU's qcow2 open options, as ``qemu-io -c 'open -o ...'`` takes them:
    ``overlap-check`` (``none``, ``constant``, ``cached`` the default, ``all``) and the
    per-structure ``overlap-check.<name>`` booleans (:mod:`qcow2.overlap`); anything
    else raises :class:`~qcow2.errors.OpenOptionError` with QEMU's message.
    A writable open rolls the image forward to its newest commit record
    (:mod:`qcow2.commit_records`); ``roll_forward`` does so in memory for a read-only
    open (which otherwise sees what QEMU sees: the header on disk).
    """
    path = os.fspath(path)
    if writable and force_share:
        raise UnsupportedFeatureError(
            "force-share=on can only be used with read-only images", path=path
        )
    image = open_chain(
        path,
        "qcow2",
        writable=writable,
        force_share=force_share,
        key_secret=key_secret,
        options=options,
        roll_forward=roll_forward,
    )
    assert isinstance(image, Image)
    return image


def open_chain(
    path: str,
    fmt: str | None = None,
    *,
    writable: bool = False,
    force_share: bool = False,
    key_secret: bytes | None = None,
    mode: OpenMode = "strict",
    io: bool = True,
    backing: bool = True,
    options: Mapping[str, str] | None = None,
    roll_forward: bool = False,
) -> Layer:
    """Open the image ``path`` (``fmt`` "qcow2" or "raw", None: probe) and, with
    ``backing``, its backing chain: each image's ``backing`` is the next one, and closing
    an image closes the images below it.

    ``mode`` is the open being mirrored (see :func:`~qcow2.format.header.read_header`):
    ``"strict"`` is the library's (a key is optional, external data files are refused,
    a writable open clears unknown autoclear bits and repairs a dirty image), ``"qemu"``
    qemu-img's, which with ``io`` needs what guest I/O needs (the key of an encrypted
    image, an external data file); ``io=False`` opens for metadata only (``qemu-img
    info``).  Images below the top are opened read-only, without a key.  ``options``
    are the top image's open options (see :func:`open`); ``roll_forward`` as there.
    """
    top = _open_layer(
        path,
        fmt,
        writable=writable,
        force_share=force_share,
        key=key_secret,
        mode=mode,
        io=io,
        options=options,
        roll_forward=roll_forward,
    )
    if backing and isinstance(top, Image):
        try:
            top.backing = open_backing(
                top.file, top.header, force_share=force_share, mode=mode, io=io
            )
        except BaseException:
            top.close()
            raise
    return top


def chain_layers(top: Layer) -> list[Layer]:
    """``top`` and the images below it (their ``backing``), top first."""
    layers = [top]
    below = top.backing
    while below is not None:
        layers.append(below)
        below = below.backing
    return layers


def open_backing(
    f: HostFile,
    header: Header,
    *,
    force_share: bool = False,
    mode: OpenMode = "strict",
    io: bool = True,
    seen: set[tuple[int, int]] | None = None,
) -> Layer | None:
    """The backing chain below the qcow2 image open as ``f`` with ``header``, opened as
    :func:`open_chain` opens it (None without a backing file).

    One rule for every chain: a backing file name is relative to the image naming it
    (:func:`backing_path`); a file that is already in the chain (same device and inode,
    ``seen``) is a loop; at most ``MAX_BACKING_CHAIN_DEPTH`` images; a failure below is
    a :class:`~qcow2.errors.BackingOpenError` per level, nesting like QEMU's messages
    (``Could not open backing file: Could not open 'base.qcow2': ...``).
    """
    if not header.backing_file:
        return None
    if seen is None:
        seen = {_file_id(f)}
    name = backing_path(f.path, header.backing_file)
    try:
        if len(seen) >= layout.MAX_BACKING_CHAIN_DEPTH:
            raise BackingChainError(
                f"Backing file chain deeper than {layout.MAX_BACKING_CHAIN_DEPTH} images",
                path=f.path,
            )
        below = _open_layer(
            name,
            header.backing_format,
            writable=False,
            force_share=force_share,
            key=None,
            mode=mode,
            io=io,
        )
        try:
            file_id = _file_id(below.file)
            if file_id in seen:
                raise BackingChainError(f"Backing file chain loops back to '{name}'", path=f.path)
            seen.add(file_id)
            if isinstance(below, Image):
                below.backing = open_backing(
                    below.file, below.header, force_share=force_share, mode=mode, io=io, seen=seen
                )
        except BaseException:
            below.close()
            raise
    except Qcow2Error as err:
        raise BackingOpenError(f.path, name, err) from err
    return below


def _file_id(f: HostFile) -> tuple[int, int]:
    """What makes two open files the same file: device and inode."""
    try:
        st = os.fstat(f.fd)
    except OSError as err:
        raise Qcow2IOError(
            f"fstat failed: {err.strerror}", path=f.path, errno=err.errno or _errno.EIO
        ) from err
    return st.st_dev, st.st_ino


def _open_layer(
    path: str,
    fmt: str | None,
    *,
    writable: bool,
    force_share: bool,
    key: bytes | None,
    mode: OpenMode,
    io: bool,
    options: Mapping[str, str] | None = None,
    roll_forward: bool = False,
) -> Layer:
    """One image of a chain, opened as :func:`open_chain` describes (no backing yet)."""
    if writable and mode != "strict":
        raise ValueError(f"the {mode!r} open mode is read-only")
    f = HostFile(path, writable=writable)
    try:
        if not force_share:
            lock_image(f.fd, path, writable=writable)
        if fmt == "raw" or (fmt is None and f.pread(0, 4) != layout.MAGIC_BYTES):
            if options:
                raise OpenOptionError(
                    f"Block format 'raw' does not support the option '{next(iter(options))}'",
                    path=path,
                )
            return RawImage(f)
        if fmt not in (None, "qcow2"):
            raise UnsupportedFeatureError(f"Unsupported image format '{fmt}'", path=path)
        header = read_header(f, writable=writable, mode=mode, io=io)
        rolled: bytes | None = None
        stale = False
        if (
            mode == "strict"
            and (writable or roll_forward)
            and header.autoclear_features & layout.AUTOCLEAR_COMMIT_RECORDS
        ):
            header, rolled, stale = _roll_forward(f, header, io=io)
        checks = overlap.parse_options(options) if options else overlap.DEFAULT
        cipher = None
        if mode == "strict":
            cipher, header = _open_for_library(f, header, key, rolled)
        elif io:
            cipher = require_io_resources(f, header, key)
        image = Image(f, header, force_share=force_share, cipher=cipher, overlap_checks=checks)
        if writable:
            image._unwritten_fields = rolled
            image._stale_slots = stale
        return image
    except BaseException:
        f.close()
        raise


def _roll_forward(f: HostFile, header: Header, *, io: bool) -> tuple[Header, bytes | None, bool]:
    """The header of the newest generation the commit records reach, in memory (a
    writable image writes it at its first flush), its bytes 24-71 (None: no record
    applies, or the one reached does not validate), and whether the slots hold anything
    (a writable image empties them before a header change made without a record: such a
    change may bring back the header bytes an old record was built on)."""
    from .commit_records import roll_forward, slots_in_use

    found = roll_forward(f, header)
    rolled = header
    fields = None
    if found is not None:
        try:
            rolled = read_header(f, writable=f.writable, mode="strict", io=io, fields=found[0])
            fields = found[0]
        except Qcow2Error:
            pass  # a record naming an invalid header is not applied
    return rolled, fields, f.writable and slots_in_use(f, rolled)


def _open_for_library(
    f: HostFile, header: Header, key: bytes | None, rolled: bytes | None = None
) -> tuple[DataCipher | None, Header]:
    """What the library's open adds to QEMU's checks: the key is optional, external data
    files and writing legacy AES images are refused, and a writable open clears unknown
    autoclear bits and repairs a dirty image (as QEMU does).  Returns the data cipher and
    the header (read again after a repair)."""
    path = f.path
    writable = f.writable
    cipher: DataCipher | None = None
    if header.crypt_method == layout.CRYPT_AES:
        if writable:
            raise UnsupportedFeatureError(
                "legacy AES encrypted images (crypt_method 1) can only be opened read-only",
                path=path,
            )
        if key is not None:
            from .crypto import LegacyAesCipher

            cipher = LegacyAesCipher(key)
    if header.crypt_method == layout.CRYPT_LUKS and key is not None:
        from .crypto import open_cipher

        cipher = open_cipher(f, header.crypto_header, key)
    if header.has_data_file:
        raise UnsupportedFeatureError(
            "images with an external data file are not supported", path=path
        )
    if writable:
        # Autoclear bits we do not maintain are cleared before the first write, as
        # QEMU does for the bits it does not know.  The bitmaps bit stays until guest
        # data changes (Image._guest_data_changes): snapshot create/delete keep bitmaps.
        # The commit records' bit is ours: the open rolled forward (_roll_forward).
        kept = layout.AUTOCLEAR_BITMAPS | layout.AUTOCLEAR_COMMIT_RECORDS
        clear_unknown_autoclear(f, header, kept)
    if writable and header.dirty:
        from .check import repair_image_file

        if rolled is not None:  # the repair starts from the header on disk
            f.pwrite(layout.RECORD_FIELDS_START, rolled)
            f.flush()
        result = repair_image_file(f, header)
        if result.error is not None or header.dirty:
            raise Qcow2Error(
                f"could not repair the dirty image: {result.error or 'dirty bit still set'}",
                path=path,
            )
        header = read_header(f, writable=True)
    return cipher, header


def require_io_resources(f: HostFile, header: Header, key: bytes | None) -> DataCipher | None:
    """What QEMU 7.2's open needs beyond the header for an open with I/O: the key of an
    encrypted image (``key``, checked against the LUKS key slots) and the external data
    file, if the image has one.  Returns the data cipher."""
    cipher: DataCipher | None = None
    if header.crypt_method != layout.CRYPT_NONE:
        if key is None:
            raise InvalidImageError(EncryptionKeyError.MISSING_KEY, path=f.path)
        if header.crypt_method == layout.CRYPT_LUKS:
            from .crypto import open_cipher

            cipher = open_cipher(f, header.crypto_header, key)
        else:
            from .crypto import LegacyAesCipher

            cipher = LegacyAesCipher(key)
    if header.has_data_file:
        name = header.data_file
        if not name:
            raise InvalidImageError("'data-file' is required for this image", path=f.path)
        name = backing_path(f.path, name)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            raise InvalidImageError(
                f"Could not open '{name}': {err.strerror}", path=f.path
            ) from err
        os.close(fd)
    return cipher


def create(
    path: str,
    size: int | None = None,
    *,
    cluster_size: int = layout.DEFAULT_CLUSTER_SIZE,
    refcount_bits: int = 16,
    version: int = 3,
    backing_file: str | None = None,
    backing_format: str | None = None,
    extended_l2: bool = False,
    lazy_refcounts: bool = False,
    encrypt_key_secret: bytes | None = None,
    encrypt_format: str = "luks",
    encrypt_iter_time: int = 2000,
    encrypt_hash: str = "sha256",
    compression_type: str = "zlib",
) -> Image:
    """Create an image with QEMU 7.2's fresh layout (header, reftable, refblock, L1 in
    clusters 0..3) and return it open for writing.

    With ``encrypt_key_secret`` the image is LUKS encrypted like ``qemu-img create -o
    encrypt.format=luks,encrypt.key-secret=...,encrypt.iter-time=MS,encrypt.hash-alg=H``
    (aes-256-xts-plain64, one key slot; the LUKS area follows the L1 table).
    ``compression_type`` is qemu-img's option of that name: "zlib" or "zstd" (version 3)."""
    path = os.fspath(path)
    compression = _compression_type(compression_type, version)
    if encrypt_key_secret is not None and encrypt_format != "luks":
        raise UnsupportedFeatureError(
            f"encrypt.format {encrypt_format!r} is not supported (only 'luks')", path=path
        )
    if encrypt_key_secret is not None:
        from .crypto import HASHES

        if encrypt_hash not in HASHES:
            raise UnsupportedFeatureError(
                f"encrypt.hash-alg {encrypt_hash!r} is not supported (sha1, sha256, sha512)",
                path=path,
            )
    if encrypt_key_secret is not None and encrypt_iter_time < 0:
        raise UnsupportedFeatureError(
            f"encrypt.iter-time {encrypt_iter_time} must not be negative", path=path
        )
    cluster_bits = cluster_size.bit_length() - 1
    if cluster_size != 1 << cluster_bits or not (
        layout.MIN_CLUSTER_BITS <= cluster_bits <= layout.MAX_CLUSTER_BITS
    ):
        raise UnsupportedFeatureError(
            f"Cluster size must be a power of two between 512 and 2048k (got {cluster_size})"
        )
    refcount_order = refcount_bits.bit_length() - 1
    if refcount_bits != 1 << refcount_order or refcount_order > layout.MAX_REFCOUNT_ORDER:
        raise UnsupportedFeatureError(
            f"Refcount width must be a power of two and may not exceed 64 bits "
            f"(got {refcount_bits})"
        )
    if version not in layout.SUPPORTED_VERSIONS:
        raise UnsupportedFeatureError(f"Unsupported qcow2 version {version}")
    if version < 3:
        if refcount_bits != 16:
            raise UnsupportedFeatureError(
                "Different refcount widths than 16 bits require compatibility level 1.1 or "
                "above (use version=3)"
            )
        if lazy_refcounts:
            raise UnsupportedFeatureError(
                "Lazy refcounts only supported with compatibility level 1.1 and above"
            )
        if extended_l2:
            raise UnsupportedFeatureError(
                "Extended L2 entries are only supported with compatibility level 1.1 and above"
            )
    if extended_l2 and cluster_size < layout.MIN_EXTL2_CLUSTER_SIZE:
        raise UnsupportedFeatureError(
            f"Extended L2 entries are only supported with cluster sizes of at least "
            f"{layout.MIN_EXTL2_CLUSTER_SIZE} bytes"
        )
    if backing_format is not None and backing_format not in ("qcow2", "raw"):
        raise UnsupportedFeatureError(f"Unsupported backing file format '{backing_format}'")
    if backing_file:
        # The chain must open before anything is created; it gives the format and size.
        below_path = backing_path(path, backing_file)
        try:
            below = open_chain(below_path, backing_format, force_share=True)
        except Qcow2Error as err:
            raise BackingOpenError(path, below_path, err) from err
        below.close()
        backing_format = backing_format or below.format
        if size is None:
            size = below.virtual_size
    if size is None or size < 0:
        raise OutOfRangeError(f"invalid image size {size}", path=path)
    size = layout.align_up(size, 512)
    l2_entries = cluster_size // (
        layout.L2_ENTRY_SIZE_EXTENDED if extended_l2 else layout.L2_ENTRY_SIZE
    )
    if layout.size_to_clusters(cluster_size * l2_entries, size) > (
        layout.MAX_L1_BYTES // layout.L1_ENTRY_SIZE
    ):
        raise UnsupportedFeatureError(
            "The image size is too large for file format 'qcow2' (try using a larger cluster size)",
            path=path,
        )

    header = Header(
        version=version,
        cluster_bits=cluster_bits,
        refcount_order=refcount_order,
        header_length=layout.HEADER_V3_LENGTH if version >= 3 else layout.HEADER_V2_LENGTH,
        refcount_table_offset=cluster_size,
        refcount_table_clusters=1,
        incompatible_features=(layout.INCOMPAT_EXTL2 if extended_l2 else 0)
        | (layout.INCOMPAT_COMPRESSION if compression != layout.COMPRESSION_ZLIB else 0),
        compression_type=compression,
        backing_file=backing_file or None,
        backing_format=backing_format if backing_file else None,
    )
    cluster0 = header.pack_cluster0()
    reftable = (2 * cluster_size).to_bytes(8, "big") + bytes(cluster_size - 8)
    from .format.refcount import write_refcount

    refblock = bytearray(cluster_size)
    for cluster in range(3):
        write_refcount(refblock, cluster, refcount_bits, 1)
    try:
        # No O_TRUNC: like QEMU's raw_co_create, lock first, truncate only when nobody
        # else uses the file.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        os.close(fd)
    except OSError as err:
        raise Qcow2IOError(
            f"Could not create '{path}': {err.strerror}", path=path, errno=err.errno or _errno.EIO
        ) from err
    f = HostFile(path, writable=True)
    try:
        lock_image(f.fd, path, writable=True)
        f.truncate(0)
        f.pwrite(0, cluster0 + bytes(cluster_size - len(cluster0)) + reftable + bytes(refblock))
        f.flush()
        image = Image(f, read_header(f, writable=True), force_share=False)
    except BaseException:
        f.close()
        raise
    try:
        image.backing = open_backing(f, image.header)
    except BaseException:
        image.close()
        raise
    try:
        l1_size = layout.size_to_clusters(cluster_size * image.header.l2_entries, size)
        if l1_size:
            image.clusters.grow_l1(l1_size, exact=True)
        image.flush()
        write_header_fields(f, size=size)
        f.flush()
        image.header.size = size
        if encrypt_key_secret is not None:
            _set_up_encryption(image, encrypt_key_secret, encrypt_iter_time, encrypt_hash)
        if lazy_refcounts:
            # Only now: building the fresh layout must not mark the image dirty.
            write_header_fields(f, compatible_features=layout.COMPAT_LAZY_REFCOUNTS)
            f.flush()
            image.header.compatible_features = layout.COMPAT_LAZY_REFCOUNTS
    except BaseException:
        image.close()
        raise
    return image


def _compression_type(name: str, version: int) -> int:
    """The ``compression_type`` header value qemu-img's option ``name`` stands for,
    refused with qemu-img's messages where it does not apply."""
    value = {known: value for value, known in layout.COMPRESSION_NAMES.items()}.get(name)
    if value is None:
        raise InvalidImageError(f"Parameter 'compression-type' does not accept value '{name}'")
    if value != layout.COMPRESSION_ZLIB and version < 3:
        raise InvalidImageError(
            "Non-zlib compression type is only supported with compatibility level 1.1 and "
            "above (use version=v3 or greater)"
        )
    return value


def _set_up_encryption(image: Image, secret: bytes, iter_time_ms: int, hash_spec: str) -> None:
    """QEMU's ``qcow2_set_up_encryption`` on a fresh image: a refcounted, zero-filled
    cluster range holding the LUKS area, then the header (crypt_method 2, extension
    0x0537be77) in one write of cluster 0."""
    from .crypto import SectorCipher, build_luks_area

    area, master = build_luks_area(secret, hash_spec=hash_spec, iter_time_ms=iter_time_ms)
    cs = image.cluster_size
    offset = image.refcounts.alloc(len(area))
    image.flush()
    padded = area + bytes(layout.align_up(len(area), cs) - len(area))
    image.file.pwrite(offset, padded)
    image.file.flush()
    header = image.header
    header.crypt_method = layout.CRYPT_LUKS
    header.extensions.append(
        HeaderExtension(layout.EXT_CRYPTO_HEADER, layout.EXT_CRYPTO_STRUCT.pack(offset, len(area)))
    )
    image.file.pwrite(0, header.pack_cluster0())
    image.file.flush()
    image.cipher = SectorCipher(master)
    image.clusters.encrypted = True
    image.clusters.cipher = image.cipher

"""The qcow2 header (cluster 0): parse and validate like QEMU 7.2, serialize, commit fields.

Reading mirrors ``qcow2_do_open`` / ``qcow2_read_extensions`` in QEMU's ``block/qcow2.c``
(same checks, same messages).  Writing has two forms:

* :meth:`Header.pack_cluster0` builds the whole header area (fixed header, extensions in
  QEMU's order, unknown extensions preserved byte for byte, backing file name) for create
  and full rewrites;
* :func:`rewrite_cluster0` writes that area over cluster 0 (amend);
* :func:`write_header_fields` writes a few adjacent fields in one small write: the commit
  point of every metadata switch (L1 at bytes 36-47, reftable at 48-59, snapshot table at
  60-71).
"""

from __future__ import annotations

import errno as _errno

from ..errors import CorruptImageError, InvalidImageError, ReadOnlyError, UnsupportedFeatureError
from . import layout

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Literal

    from ..io.fileio import HostFile

    #: How :func:`read_header` validates (see there): ``"strict"`` for the library's own
    #: open, ``"qemu"`` for QEMU 7.2's open, ``"check"`` for its open in check mode
    #: (BDRV_O_CHECK).
    OpenMode = Literal["strict", "qemu", "check"]

#: Size of a snapshot table entry header; qemu bounds nb_snapshots with it.
_SNAPSHOT_HEADER_SIZE = layout.SNAPSHOT_HEADER_STRUCT.size
#: qemu's ``sizeof(bs->backing_format)``: a backing format name must be shorter.
_BACKING_FORMAT_MAX = 16


class HeaderExtension:
    """One header extension, kept byte for byte (``data`` excludes the padding)."""

    __slots__ = ("data", "type")

    def __init__(self, type: int, data: bytes) -> None:
        self.type = type
        self.data = data

    def __eq__(self, other: object) -> bool:
        """Same type and bytes (tests compare extensions read back with those written)."""
        if not isinstance(other, HeaderExtension):
            return NotImplemented
        return self.type == other.type and self.data == other.data


class Header:
    """The parsed header of a qcow2 image.

    Field names are those of :data:`qcow2.format.layout.HEADER_FIELDS`.  ``extensions`` lists every
    extension found (known and unknown) in file order; the convenience attributes
    ``backing_format``, ``feature_table``... are derived from it when reading and written
    back by :meth:`pack_cluster0`.  :meth:`copy` and :meth:`assign` copy every field.
    """

    __slots__ = (  # the fixed header's fields in on-disk order, then the parsed extras
        *(name for name, _ in layout.HEADER_FIELDS),
        "unknown_header_fields",
        "backing_file",
        "backing_format",
        "feature_table",
        "extensions",
    )

    def __init__(
        self,
        magic: int = layout.MAGIC,
        version: int = 3,
        backing_file_offset: int = 0,
        backing_file_size: int = 0,
        cluster_bits: int = 16,
        size: int = 0,
        crypt_method: int = layout.CRYPT_NONE,
        l1_size: int = 0,
        l1_table_offset: int = 0,
        refcount_table_offset: int = 0,
        refcount_table_clusters: int = 0,
        nb_snapshots: int = 0,
        snapshots_offset: int = 0,
        incompatible_features: int = 0,
        compatible_features: int = 0,
        autoclear_features: int = 0,
        refcount_order: int = layout.DEFAULT_REFCOUNT_ORDER,
        header_length: int = layout.HEADER_V3_LENGTH,
        compression_type: int = layout.COMPRESSION_ZLIB,
        padding: bytes = bytes(7),
        unknown_header_fields: bytes = b"",
        backing_file: str | None = None,
        backing_format: str | None = None,
        feature_table: list[tuple[int, int, str]] | None = None,
        extensions: list[HeaderExtension] | None = None,
    ) -> None:
        self.magic = magic
        self.version = version
        self.backing_file_offset = backing_file_offset
        self.backing_file_size = backing_file_size
        self.cluster_bits = cluster_bits
        self.size = size
        self.crypt_method = crypt_method
        self.l1_size = l1_size
        self.l1_table_offset = l1_table_offset
        self.refcount_table_offset = refcount_table_offset
        self.refcount_table_clusters = refcount_table_clusters
        self.nb_snapshots = nb_snapshots
        self.snapshots_offset = snapshots_offset
        self.incompatible_features = incompatible_features
        self.compatible_features = compatible_features
        self.autoclear_features = autoclear_features
        self.refcount_order = refcount_order
        self.header_length = header_length
        self.compression_type = compression_type
        self.padding = padding
        #: Bytes between the known fields (112) and ``header_length`` (preserved on rewrite).
        self.unknown_header_fields = unknown_header_fields
        self.backing_file = backing_file
        self.backing_format = backing_format
        #: Feature name table entries ``(type, bit, name)`` as found in the image.
        self.feature_table: list[tuple[int, int, str]] = (
            [] if feature_table is None else feature_table
        )
        #: Every extension in file order (the end marker excluded).
        self.extensions: list[HeaderExtension] = [] if extensions is None else extensions

    # Section: derived values

    @property
    def cluster_size(self) -> int:
        """Bytes per cluster."""
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        """Width of one refcount entry in bits."""
        return 1 << self.refcount_order

    @property
    def refblock_entries(self) -> int:
        """Refcount entries per refcount block (one cluster)."""
        return self.cluster_size * 8 // self.refcount_bits

    @property
    def extended_l2(self) -> bool:
        """True if L2 entries are 128 bits with 32 subclusters."""
        return bool(self.incompatible_features & layout.INCOMPAT_EXTL2)

    @property
    def l2_entry_size(self) -> int:
        """Bytes per L2 entry (8, or 16 with extended L2)."""
        return layout.L2_ENTRY_SIZE_EXTENDED if self.extended_l2 else layout.L2_ENTRY_SIZE

    @property
    def l2_entries(self) -> int:
        """Entries per L2 table (one cluster)."""
        return self.cluster_size // self.l2_entry_size

    @property
    def subclusters_per_cluster(self) -> int:
        """32 with extended L2, else 1."""
        return layout.SUBCLUSTERS_PER_CLUSTER if self.extended_l2 else 1

    @property
    def subcluster_size(self) -> int:
        """Bytes per subcluster (the cluster size without extended L2)."""
        return self.cluster_size // self.subclusters_per_cluster

    @property
    def l1_vm_state_index(self) -> int:
        """Number of L1 entries the virtual disk needs (qemu's ``size_to_l1``)."""
        return layout.size_to_clusters(self.cluster_size * self.l2_entries, self.size)

    @property
    def refcount_table_entries(self) -> int:
        """Entries of the refcount table."""
        return self.refcount_table_clusters * self.cluster_size // 8

    @property
    def dirty(self) -> bool:
        """Incompatible bit 0: refcounts may be stale."""
        return bool(self.incompatible_features & layout.INCOMPAT_DIRTY)

    @property
    def corrupt(self) -> bool:
        """Incompatible bit 1: the image must not be written."""
        return bool(self.incompatible_features & layout.INCOMPAT_CORRUPT)

    @property
    def lazy_refcounts(self) -> bool:
        """Compatible bit 0."""
        return bool(self.compatible_features & layout.COMPAT_LAZY_REFCOUNTS)

    @property
    def data_file(self) -> str | None:
        """External data file name from extension 0x44415441, if any."""
        ext = self.find_extension(layout.EXT_DATA_FILE)
        return ext.data.decode("utf-8", "replace") if ext else None

    @property
    def has_data_file(self) -> bool:
        """Incompatible bit 2: guest data lives in an external file."""
        return bool(self.incompatible_features & layout.INCOMPAT_DATA_FILE)

    @property
    def crypto_header(self) -> tuple[int, int] | None:
        """``(offset, length)`` of the LUKS area from extension 0x0537be77, if any."""
        ext = self.find_extension(layout.EXT_CRYPTO_HEADER)
        if ext is None or len(ext.data) != layout.EXT_CRYPTO_STRUCT.size:
            return None
        offset, length = layout.EXT_CRYPTO_STRUCT.unpack(ext.data)
        return offset, length

    @property
    def bitmaps_extension(self) -> tuple[int, int, int] | None:
        """``(nb_bitmaps, directory_size, directory_offset)`` from extension 0x23852875."""
        ext = self.find_extension(layout.EXT_BITMAPS)
        if ext is None or len(ext.data) < layout.EXT_BITMAPS_STRUCT.size:
            return None
        nb, _reserved, dir_size, dir_offset = layout.EXT_BITMAPS_STRUCT.unpack_from(ext.data)
        return nb, dir_size, dir_offset

    @property
    def has_bitmaps(self) -> bool:
        """Persistent dirty bitmaps QEMU would load: the extension lists some and
        autoclear bit 0 says they are consistent with the data."""
        ext = self.bitmaps_extension
        return bool(ext and ext[0] and self.autoclear_features & layout.AUTOCLEAR_BITMAPS)

    def find_extension(self, ext_type: int) -> HeaderExtension | None:
        """The extension of ``ext_type``, or None."""
        for ext in self.extensions:
            if ext.type == ext_type:
                return ext
        return None

    def copy(self) -> Header:
        """A deep enough copy to modify and pack without touching this one."""
        new = Header.__new__(Header)
        new.assign(self)
        new.feature_table = list(self.feature_table)
        new.extensions = [HeaderExtension(e.type, e.data) for e in self.extensions]
        return new

    def assign(self, other: Header) -> None:
        """Set every field of this header to ``other``'s (the lists are shared, not copied):
        holders of this object see the other header."""
        for name in Header.__slots__:
            setattr(self, name, getattr(other, name))

    # Section: serialization

    def pack_fixed(self) -> bytes:
        """The fixed header (72 bytes for v2, ``header_length`` bytes for v3)."""
        values = [getattr(self, name) for name, _ in layout.HEADER_FIELDS]
        if self.version == 2:
            return layout.HEADER_V2_STRUCT.pack(*values[:13])
        full = layout.HEADER_V3_FULL_STRUCT.pack(*values)
        data = (full + self.unknown_header_fields)[: self.header_length]
        return data + bytes(self.header_length - len(data))

    def _ordered_extensions(self) -> list[HeaderExtension]:
        """Extensions in QEMU's order: backing format, data file, crypto, feature table,
        bitmaps, then unknown ones (preserved, in their original order)."""
        exts: list[HeaderExtension] = []
        if self.backing_format:
            exts.append(HeaderExtension(layout.EXT_BACKING_FORMAT, self.backing_format.encode()))
        for ext_type in (layout.EXT_DATA_FILE, layout.EXT_CRYPTO_HEADER):
            ext = self.find_extension(ext_type)
            if ext is not None:
                exts.append(ext)
        if self.version >= 3 and self.cluster_size >= layout.FEATURE_TABLE_MIN_CLUSTER_SIZE:
            table = b"".join(
                layout.FEATURE_NAME_STRUCT.pack(t, bit, name.encode())
                for t, bit, name in layout.FEATURE_NAMES
            )
            exts.append(HeaderExtension(layout.EXT_FEATURE_TABLE, table))
        ext = self.find_extension(layout.EXT_BITMAPS)
        if ext is not None:
            exts.append(ext)
        known = {
            layout.EXT_BACKING_FORMAT,
            layout.EXT_DATA_FILE,
            layout.EXT_CRYPTO_HEADER,
            layout.EXT_FEATURE_TABLE,
            layout.EXT_BITMAPS,
        }
        exts.extend(e for e in self.extensions if e.type not in known)
        return exts

    def pack_cluster0(self) -> bytes:
        """Header, extensions and backing file name, as QEMU's ``qcow2_update_header`` lays
        them out.  Updates ``backing_file_offset``/``backing_file_size``/``feature_table``
        /``extensions`` to what was packed.  Raises ``InvalidImageError`` if it does not fit
        in cluster 0."""
        exts = self._ordered_extensions()
        ext_bytes = bytearray()
        for ext in exts:
            ext_bytes += layout.EXT_HEADER_STRUCT.pack(ext.type, len(ext.data))
            ext_bytes += ext.data + bytes(layout.align_up(len(ext.data), 8) - len(ext.data))
        ext_bytes += layout.EXT_HEADER_STRUCT.pack(layout.EXT_END, 0)
        header_len = layout.HEADER_V2_LENGTH if self.version == 2 else self.header_length
        name = self.backing_file.encode() if self.backing_file else b""
        if len(name) > layout.MAX_BACKING_FILE_NAME:
            raise InvalidImageError(f"Backing file name too long ({len(name)} bytes)")
        if self.backing_file:
            self.backing_file_offset = header_len + len(ext_bytes)
            self.backing_file_size = len(name)
        else:
            self.backing_file_offset = 0
            self.backing_file_size = 0
        self.extensions = exts
        self.feature_table = (
            [(t, bit, n) for t, bit, n in layout.FEATURE_NAMES]
            if self.find_extension(layout.EXT_FEATURE_TABLE)
            else []
        )
        data = self.pack_fixed() + bytes(ext_bytes) + name
        if len(data) > self.cluster_size:
            raise InvalidImageError(
                f"header area of {len(data)} bytes does not fit in a {self.cluster_size}-byte "
                "cluster"
            )
        return data


# Section: validation helpers


def validate_table(
    name: str,
    offset: int,
    entries: int,
    entry_size: int,
    max_bytes: int,
    cluster_size: int,
    *,
    path: str | None = None,
    file_size: int | None = None,
) -> None:
    """QEMU's ``qcow2_validate_table``: bound a table before anything is read from it.

    Raises ``CorruptImageError`` "<name> too large" if ``entries * entry_size`` exceeds
    ``max_bytes``, "<name> offset invalid" if the offset is unaligned or overflows, and (when
    ``file_size`` is given) "... extends past the end of the file" unless the whole table
    lies inside the file.
    """
    if entries > max_bytes // entry_size:
        err = CorruptImageError(f"{name} too large", path=path, offset=offset)
        err.errno = _errno.EFBIG  # QEMU's return value, which some callers print
        raise err
    if (1 << 63) - 1 - entries * entry_size < offset or offset % cluster_size:
        err = CorruptImageError(f"{name} offset invalid", path=path, offset=offset)
        err.errno = _errno.EINVAL
        raise err
    if file_size is not None and entries and offset + entries * entry_size > file_size:
        # QEMU would read zeros there; we refuse, so that a lying size field never makes
        # us allocate memory for bytes the file does not have.
        raise CorruptImageError(
            f"{name} at {offset:#x} ({entries * entry_size} bytes) extends past the end of "
            f"the file ({file_size:#x})",
            path=path,
            offset=offset,
            size=entries * entry_size,
        )


def _feature_report(header: Header, unknown: int) -> str:
    """QEMU's ``report_unsupported_feature`` text for incompatible bits ``unknown``."""
    names = []
    remaining = unknown
    for ftype, bit, fname in header.feature_table:
        if ftype == layout.FEATURE_TYPE_INCOMPAT and remaining & (1 << bit):
            names.append(fname)
            remaining &= ~(1 << bit)
    if remaining:
        names.append(f"Unknown incompatible feature: {remaining:x}")
    return "Unsupported qcow2 feature(s): " + ", ".join(names)


def _read_extensions(header: Header, cluster0: bytes, end: int, path: str | None) -> None:
    """Parse the extension area ``[header_length, end)`` of ``cluster0`` into ``header``."""
    offset = header.header_length
    while offset < end:
        if offset + layout.EXT_HEADER_STRUCT.size > end:
            raise InvalidImageError("Header extension too large", path=path)
        ext_type, length = layout.EXT_HEADER_STRUCT.unpack_from(cluster0, offset)
        offset += layout.EXT_HEADER_STRUCT.size
        if length > end - offset:
            raise InvalidImageError("Header extension too large", path=path)
        if ext_type == layout.EXT_END:
            return
        data = bytes(cluster0[offset : offset + length])
        if ext_type == layout.EXT_BACKING_FORMAT:
            if length >= _BACKING_FORMAT_MAX:
                raise InvalidImageError(
                    f"ERROR: ext_backing_format: len={length} too large (>={_BACKING_FORMAT_MAX})",
                    path=path,
                )
            header.backing_format = data.decode("utf-8", "replace")
        elif ext_type == layout.EXT_FEATURE_TABLE:
            entry = layout.FEATURE_NAME_STRUCT
            for pos in range(0, length - entry.size + 1, entry.size):
                ftype, bit, raw = entry.unpack_from(data, pos)
                header.feature_table.append(
                    (ftype, bit, raw.split(b"\0", 1)[0].decode("utf-8", "replace"))
                )
        elif ext_type == layout.EXT_CRYPTO_HEADER:
            if header.crypt_method != layout.CRYPT_LUKS:
                raise InvalidImageError(
                    "CRYPTO header extension only expected with LUKS encryption method",
                    path=path,
                )
            if length != layout.EXT_CRYPTO_STRUCT.size:
                raise InvalidImageError(
                    f"CRYPTO header extension size {length}, but expected size "
                    f"{layout.EXT_CRYPTO_STRUCT.size}",
                    path=path,
                )
        elif ext_type == layout.EXT_BITMAPS and length != layout.EXT_BITMAPS_STRUCT.size:
            raise InvalidImageError(f"bitmaps_ext: Invalid extension length {length}", path=path)
        header.extensions.append(HeaderExtension(ext_type, data))
        offset += layout.align_up(length, 8)


def read_header(
    f: HostFile,
    *,
    writable: bool = False,
    mode: OpenMode = "strict",
    io: bool = True,
    fields: bytes | None = None,
) -> Header:
    """Read and validate cluster 0 of ``f`` with QEMU 7.2's checks and messages.

    ``mode`` chooses the open being mirrored:

    * ``"strict"`` (the library): QEMU's checks, and the header, the L1 table and the
      refcount table must lie inside the file (a lying field never makes us allocate
      memory for bytes the file does not have);
    * ``"qemu"`` (``qemu-img info``/``map``/``snapshot``): only QEMU's checks, tables may
      start past the end of the file;
    * ``"check"`` (``qemu-img check``, BDRV_O_CHECK): as ``"qemu"``, and an empty refcount
      table and a bad snapshot table location are left to the check to report.

    ``writable`` adds QEMU's read-write refusal of images with the corrupt bit; ``io=False``
    is an open for metadata only (BDRV_O_NO_IO: the data file settings are not checked).
    ``fields`` replaces header bytes 24-71 as read (a generation rolled forward in memory
    by :mod:`qcow2.commit_records`), validated like the rest.
    Raises ``InvalidImageError``/``CorruptImageError``/``UnsupportedFeatureError``; never
    writes.
    """
    path = f.path
    file_size = f.size()
    # QEMU never compares a table or header length with the file size (reads past the end
    # give zeros); only a file too short for a v3 header fails its header read.
    bound = file_size if mode == "strict" or file_size < layout.HEADER_V3_LENGTH else None
    fixed = _patched(f.pread(0, layout.HEADER_V3_LENGTH), fields)
    if file_size < layout.HEADER_V2_LENGTH or fixed[:4] != layout.MAGIC_BYTES:
        if fixed[:4] == layout.MAGIC_BYTES:
            raise _short_file(path, file_size)
        raise InvalidImageError("Image is not in qcow2 format", path=path)
    values = layout.HEADER_V3_FULL_STRUCT.unpack(fixed)
    h = Header(**{name: v for (name, _), v in zip(layout.HEADER_FIELDS, values, strict=True)})
    if h.version not in layout.SUPPORTED_VERSIONS:
        raise UnsupportedFeatureError(
            f"Unsupported qcow2 version {h.version}", path=path, field="version"
        )
    if not layout.MIN_CLUSTER_BITS <= h.cluster_bits <= layout.MAX_CLUSTER_BITS:
        raise InvalidImageError(
            f"Unsupported cluster size: 2^{h.cluster_bits}", path=path, field="cluster_bits"
        )
    cluster_size = h.cluster_size
    if h.version == 2:
        h.incompatible_features = h.compatible_features = h.autoclear_features = 0
        h.refcount_order = layout.DEFAULT_REFCOUNT_ORDER
        h.header_length = layout.HEADER_V2_LENGTH
        h.compression_type = layout.COMPRESSION_ZLIB
        h.padding = bytes(7)
    else:
        if h.header_length < layout.HEADER_V3_MIN_LENGTH:
            raise InvalidImageError("qcow2 header too short", path=path, field="header_length")
        if h.header_length > cluster_size:
            raise InvalidImageError(
                "qcow2 header exceeds cluster size", path=path, field="header_length"
            )
        if h.header_length % 8:
            raise InvalidImageError(
                f"header_length {h.header_length} is not a multiple of 8",
                path=path,
                field="header_length",
            )
        if h.header_length <= layout.field_offset("compression_type"):
            h.compression_type = layout.COMPRESSION_ZLIB
            h.padding = bytes(7)
    if h.backing_file_offset > cluster_size:
        raise InvalidImageError(
            "Invalid backing file offset", path=path, field="backing_file_offset"
        )
    ext_end = h.backing_file_offset if h.backing_file_offset else cluster_size
    if bound is not None and bound < h.header_length:
        raise _short_file(path, file_size)
    cluster0 = _patched(f.pread(0, cluster_size), fields)
    if h.version >= 3 and h.header_length > layout.HEADER_V3_LENGTH:
        h.unknown_header_fields = bytes(cluster0[layout.HEADER_V3_LENGTH : h.header_length])

    unknown = h.incompatible_features & ~layout.INCOMPAT_MASK
    if unknown:
        probe = Header(**{n: getattr(h, n) for n, _ in layout.HEADER_FIELDS})
        try:
            _read_extensions(probe, cluster0, ext_end, path)
        except InvalidImageError:
            pass
        raise UnsupportedFeatureError(
            _feature_report(probe, unknown),
            path=path,
            bits=unknown,
            field="incompatible_features",
        )
    if writable and h.corrupt:
        raise ReadOnlyError("qcow2: Image is corrupt; cannot be opened read/write", path=path)
    _validate_compression(h, path)
    if h.refcount_order > layout.MAX_REFCOUNT_ORDER:
        raise InvalidImageError(
            "Reference count entry width too large; may not exceed 64 bits",
            path=path,
            field="refcount_order",
        )
    if h.crypt_method > layout.CRYPT_LUKS:
        raise UnsupportedFeatureError(
            f"Unsupported encryption method {h.crypt_method}", path=path, field="crypt_method"
        )
    if h.extended_l2 and h.subcluster_size < (1 << layout.MIN_CLUSTER_BITS):
        raise UnsupportedFeatureError(
            f"Unsupported subcluster size: {h.subcluster_size}", path=path, field="cluster_bits"
        )
    if h.refcount_table_clusters == 0 and mode != "check":
        raise CorruptImageError(
            "Image does not contain a reference count table",
            path=path,
            field="refcount_table_clusters",
        )
    validate_table(
        "Reference count table",
        h.refcount_table_offset,
        h.refcount_table_entries,
        8,
        layout.MAX_REFTABLE_BYTES,
        cluster_size,
        path=path,
        file_size=bound,
    )
    if mode != "check":
        validate_table(
            "Snapshot table",
            h.snapshots_offset,
            h.nb_snapshots,
            _SNAPSHOT_HEADER_SIZE,
            _SNAPSHOT_HEADER_SIZE * layout.MAX_SNAPSHOTS,
            cluster_size,
            path=path,
        )
    if h.l1_size > layout.MAX_L1_BYTES // layout.L1_ENTRY_SIZE:
        raise CorruptImageError("Active L1 table too large", path=path, field="l1_size")
    if h.l1_vm_state_index > 0x7FFFFFFF:
        raise InvalidImageError("Image is too big", path=path, field="size")
    if h.l1_size < h.l1_vm_state_index:
        raise CorruptImageError("L1 table is too small", path=path, field="l1_size")
    if h.l1_size:
        validate_table(
            "Active L1 table",
            h.l1_table_offset,
            h.l1_size,
            layout.L1_ENTRY_SIZE,
            layout.MAX_L1_BYTES,
            cluster_size,
            path=path,
            file_size=bound,
        )
    _read_extensions(h, cluster0, ext_end, path)
    if io and not h.has_data_file and h.autoclear_features & layout.AUTOCLEAR_DATA_FILE_RAW:
        raise InvalidImageError(
            "data-file-raw requires a data file", path=path, field="autoclear_features"
        )
    if h.backing_file_offset:
        length = h.backing_file_size
        if length > min(layout.MAX_BACKING_FILE_NAME, cluster_size - h.backing_file_offset):
            raise InvalidImageError(
                "Backing file name too long", path=path, field="backing_file_size"
            )
        raw = cluster0[h.backing_file_offset : h.backing_file_offset + length]
        # A C string to QEMU: the name ends at the first NUL, and an empty one means no
        # backing file (bdrv_open_backing_file skips it; info shows none).
        name = bytes(raw).split(b"\0", 1)[0]
        h.backing_file = name.decode("utf-8", "surrogateescape") if name else None
    return h


def _patched(data: bytes, fields: bytes | None) -> bytes:
    """``data`` (read from offset 0) with header bytes 24-71 replaced by ``fields``."""
    if fields is None or len(data) < layout.RECORD_FIELDS_END:
        return data
    return data[: layout.RECORD_FIELDS_START] + fields + data[layout.RECORD_FIELDS_END :]


def _short_file(path: str | None, file_size: int) -> InvalidImageError:
    return InvalidImageError(
        f"Could not read qcow2 header: file is only {file_size} bytes", path=path
    )


def _validate_compression(h: Header, path: str | None) -> None:
    """QEMU's ``validate_compression_type``."""
    if h.compression_type not in layout.COMPRESSION_NAMES:
        raise UnsupportedFeatureError(
            f"qcow2: unknown compression type: {h.compression_type}",
            path=path,
            field="compression_type",
        )
    has_bit = bool(h.incompatible_features & layout.INCOMPAT_COMPRESSION)
    if h.compression_type != layout.COMPRESSION_ZLIB and not has_bit:
        raise InvalidImageError(
            "qcow2: Compression type incompatible feature bit must be set",
            path=path,
            field="incompatible_features",
        )
    if h.compression_type == layout.COMPRESSION_ZLIB and has_bit:
        raise InvalidImageError(
            "qcow2: Compression type incompatible feature bit must not be set",
            path=path,
            field="incompatible_features",
        )


def rewrite_cluster0(f: HostFile, header: Header) -> None:
    """Replace the whole header cluster with ``header`` packed (:meth:`Header.pack_cluster0`,
    zero padded): flushed before (what it points at is durable) and after."""
    data = header.pack_cluster0()
    f.flush()
    f.pwrite(0, data + bytes(header.cluster_size - len(data)))
    f.flush()


def clear_unknown_autoclear(
    f: HostFile, header: Header, known: int = layout.AUTOCLEAR_MASK
) -> None:
    """QEMU's read-write open: autoclear bits a program does not maintain are cleared
    (written and flushed) before its first write, so whatever they vouch for is never
    trusted after that program's writes.  ``known`` defaults to QEMU's bits: the
    qemu-img tools (``check -r``, ``amend``) write as QEMU does, also over this library's
    commit records (:mod:`qcow2.commit_records`)."""
    if header.version >= 3 and header.autoclear_features & ~known:
        header.autoclear_features &= known
        write_header_fields(f, autoclear_features=header.autoclear_features)
        f.flush()


def write_header_fields(f: HostFile, **fields: int) -> None:
    """Write adjacent header fields in one small write (a commit point).

    Example: ``write_header_fields(f, l1_size=n, l1_table_offset=off)``.  The caller
    flushes before (the new structure is durable) and after (the switch is durable), and
    updates its in-memory :class:`Header`.
    """
    offset, data = layout.pack_fields(**fields)
    f.pwrite(offset, data)

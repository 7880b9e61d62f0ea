"""On-disk structures of the qcow2 format, declared once.

Everything here mirrors QEMU's ``block/qcow2.h`` and ``docs/interop/qcow2.txt``.  All
integers on disk are big-endian.  Other modules address header fields by name through
:data:`HEADER_FIELDS` (``field_offset("l1_size")``), never by hard-coded byte offsets.
"""

from __future__ import annotations

import struct

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

# Section: magic and versions

MAGIC: Final = 0x514649FB
MAGIC_BYTES: Final = b"QFI\xfb"
SUPPORTED_VERSIONS: Final = (2, 3)

MIN_CLUSTER_BITS: Final = 9
MAX_CLUSTER_BITS: Final = 21
DEFAULT_CLUSTER_SIZE: Final = 65536
MAX_REFCOUNT_ORDER: Final = 6
DEFAULT_REFCOUNT_ORDER: Final = 4

#: qemu limits (QCOW_MAX_L1_SIZE, QCOW_MAX_REFTABLE_SIZE, QCOW_MAX_SNAPSHOTS, ...).
MAX_L1_BYTES: Final = 32 * 1024 * 1024
MAX_REFTABLE_BYTES: Final = 8 * 1024 * 1024
MAX_SNAPSHOTS: Final = 65536
MAX_SNAPSHOT_TABLE_BYTES: Final = 64 * 1024 * 1024
MAX_SNAPSHOT_EXTRA_DATA: Final = 1024
MAX_BACKING_FILE_NAME: Final = 1023
MAX_BACKING_CHAIN_DEPTH: Final = 64

# Section: header

#: (name, struct format) of the fixed header, in on-disk order.  v2 headers end after
#: ``snapshots_offset`` (72 bytes); v3 headers carry the rest (104 bytes, 112 with
#: ``compression_type`` and its padding).
HEADER_FIELDS: Final[tuple[tuple[str, str], ...]] = (
    ("magic", "I"),
    ("version", "I"),
    ("backing_file_offset", "Q"),
    ("backing_file_size", "I"),
    ("cluster_bits", "I"),
    ("size", "Q"),
    ("crypt_method", "I"),
    ("l1_size", "I"),
    ("l1_table_offset", "Q"),
    ("refcount_table_offset", "Q"),
    ("refcount_table_clusters", "I"),
    ("nb_snapshots", "I"),
    ("snapshots_offset", "Q"),
    ("incompatible_features", "Q"),
    ("compatible_features", "Q"),
    ("autoclear_features", "Q"),
    ("refcount_order", "I"),
    ("header_length", "I"),
    ("compression_type", "B"),
    ("padding", "7s"),
)

HEADER_V2_STRUCT: Final = struct.Struct(">" + "".join(f for _, f in HEADER_FIELDS[:13]))
HEADER_V3_STRUCT: Final = struct.Struct(">" + "".join(f for _, f in HEADER_FIELDS[:18]))
HEADER_V3_FULL_STRUCT: Final = struct.Struct(">" + "".join(f for _, f in HEADER_FIELDS))
HEADER_V2_LENGTH: Final = HEADER_V2_STRUCT.size
HEADER_V3_MIN_LENGTH: Final = HEADER_V3_STRUCT.size
#: header_length qemu 7.2 writes for v3 (compression_type plus 7 bytes of padding).
HEADER_V3_LENGTH: Final = HEADER_V3_FULL_STRUCT.size


def _field_offsets() -> dict[str, tuple[int, struct.Struct]]:
    offsets: dict[str, tuple[int, struct.Struct]] = {}
    pos = 0
    for name, fmt in HEADER_FIELDS:
        st = struct.Struct(">" + fmt)
        offsets[name] = (pos, st)
        pos += st.size
    return offsets


_FIELD_OFFSETS: Final = _field_offsets()


def field_offset(name: str) -> int:
    """Byte offset of header field ``name`` (e.g. ``field_offset("l1_size") == 36``)."""
    return _FIELD_OFFSETS[name][0]


def field_struct(name: str) -> struct.Struct:
    """The big-endian struct that encodes header field ``name`` alone."""
    return _FIELD_OFFSETS[name][1]


def pack_fields(**values: int) -> tuple[int, bytes]:
    """Encode adjacent header fields for one small write.

    Returns ``(offset, data)``.  The fields must be contiguous on disk, which is what makes
    the write a single commit point (QEMU's ``QEMU_BUILD_BUG_ON(offsetof(...) != endof(...))``).
    """
    names = sorted(values, key=field_offset)
    start = field_offset(names[0])
    data = bytearray()
    for name in names:
        if field_offset(name) != start + len(data):
            raise ValueError(f"header fields {names} are not contiguous")
        data += field_struct(name).pack(values[name])
    return start, bytes(data)


# Layout facts the commit points rely on (QEMU asserts the same at build time).
assert HEADER_V2_LENGTH == 72 and HEADER_V3_MIN_LENGTH == 104 and HEADER_V3_LENGTH == 112
assert field_offset("l1_size") == 36 and field_offset("l1_table_offset") == 40
assert field_offset("refcount_table_offset") == 48 and field_offset("nb_snapshots") == 60
assert field_offset("compression_type") == 104

# Section: feature bits

INCOMPAT_DIRTY_BITNR: Final = 0
INCOMPAT_CORRUPT_BITNR: Final = 1
INCOMPAT_DATA_FILE_BITNR: Final = 2
INCOMPAT_COMPRESSION_BITNR: Final = 3
INCOMPAT_EXTL2_BITNR: Final = 4
INCOMPAT_DIRTY: Final = 1 << INCOMPAT_DIRTY_BITNR
INCOMPAT_CORRUPT: Final = 1 << INCOMPAT_CORRUPT_BITNR
INCOMPAT_DATA_FILE: Final = 1 << INCOMPAT_DATA_FILE_BITNR
INCOMPAT_COMPRESSION: Final = 1 << INCOMPAT_COMPRESSION_BITNR
INCOMPAT_EXTL2: Final = 1 << INCOMPAT_EXTL2_BITNR
INCOMPAT_MASK: Final = (
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
)

COMPAT_LAZY_REFCOUNTS_BITNR: Final = 0
COMPAT_LAZY_REFCOUNTS: Final = 1 << COMPAT_LAZY_REFCOUNTS_BITNR
COMPAT_MASK: Final = COMPAT_LAZY_REFCOUNTS

AUTOCLEAR_BITMAPS_BITNR: Final = 0
AUTOCLEAR_DATA_FILE_RAW_BITNR: Final = 1
AUTOCLEAR_BITMAPS: Final = 1 << AUTOCLEAR_BITMAPS_BITNR
AUTOCLEAR_DATA_FILE_RAW: Final = 1 << AUTOCLEAR_DATA_FILE_RAW_BITNR
AUTOCLEAR_MASK: Final = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW
#: This library's own autoclear bit: the commit records of extension
#: :data:`EXT_COMMIT_RECORDS` may be rolled forward (:mod:`qcow2.commit_records`).  A
#: program that does not know it (QEMU) clears it when it opens the image read-write, so
#: records never roll forward over that program's writes.  The top bit: far from the
#: bits the qcow2 specification hands out from the bottom.
AUTOCLEAR_COMMIT_RECORDS_BITNR: Final = 63
AUTOCLEAR_COMMIT_RECORDS: Final = 1 << AUTOCLEAR_COMMIT_RECORDS_BITNR

CRYPT_NONE: Final = 0
CRYPT_AES: Final = 1
CRYPT_LUKS: Final = 2

COMPRESSION_ZLIB: Final = 0
COMPRESSION_ZSTD: Final = 1
COMPRESSION_NAMES: Final = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

#: Feature name table qemu 7.2 writes (type, bit, name), in its order.
FEATURE_TYPE_INCOMPAT: Final = 0
FEATURE_TYPE_COMPAT: Final = 1
FEATURE_TYPE_AUTOCLEAR: Final = 2
FEATURE_NAMES: Final[tuple[tuple[int, int, str], ...]] = (
    (FEATURE_TYPE_INCOMPAT, INCOMPAT_DIRTY_BITNR, "dirty bit"),
    (FEATURE_TYPE_INCOMPAT, INCOMPAT_CORRUPT_BITNR, "corrupt bit"),
    (FEATURE_TYPE_INCOMPAT, INCOMPAT_DATA_FILE_BITNR, "external data file"),
    (FEATURE_TYPE_INCOMPAT, INCOMPAT_COMPRESSION_BITNR, "compression type"),
    (FEATURE_TYPE_INCOMPAT, INCOMPAT_EXTL2_BITNR, "extended L2 entries"),
    (FEATURE_TYPE_COMPAT, COMPAT_LAZY_REFCOUNTS_BITNR, "lazy refcounts"),
    (FEATURE_TYPE_AUTOCLEAR, AUTOCLEAR_BITMAPS_BITNR, "bitmaps"),
    (FEATURE_TYPE_AUTOCLEAR, AUTOCLEAR_DATA_FILE_RAW_BITNR, "raw external data"),
)
FEATURE_NAME_STRUCT: Final = struct.Struct(">BB46s")
assert FEATURE_NAME_STRUCT.size == 48

# Section: header extensions

EXT_HEADER_STRUCT: Final = struct.Struct(">II")  # type, length
EXT_END: Final = 0x00000000
EXT_BACKING_FORMAT: Final = 0xE2792ACA
EXT_FEATURE_TABLE: Final = 0x6803F857
EXT_BITMAPS: Final = 0x23852875
EXT_CRYPTO_HEADER: Final = 0x0537BE77
EXT_DATA_FILE: Final = 0x44415441
#: Commit records (this library's; QEMU keeps unknown extensions byte for byte).
EXT_COMMIT_RECORDS: Final = 0x636F6D72  # "comr"
EXT_BITMAPS_STRUCT: Final = struct.Struct(">IIQQ")  # nb_bitmaps, reserved, dir size, dir offset
EXT_CRYPTO_STRUCT: Final = struct.Struct(">QQ")  # offset, length
#: qemu omits the feature name table when cluster_size <= this.
FEATURE_TABLE_MIN_CLUSTER_SIZE: Final = 4096 + 1

# Section: L1 and L2 entries

L1E_OFFSET_MASK: Final = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK: Final = 0x7F000000000001FF
L2E_OFFSET_MASK: Final = 0x00FFFFFFFFFFFE00
L2E_STD_RESERVED_MASK: Final = 0x3F000000000001FE
OFLAG_COPIED: Final = 1 << 63
OFLAG_COMPRESSED: Final = 1 << 62
OFLAG_ZERO: Final = 1 << 0
L1_ENTRY_SIZE: Final = 8
L2_ENTRY_SIZE: Final = 8
L2_ENTRY_SIZE_EXTENDED: Final = 16
MIN_EXTL2_CLUSTER_SIZE: Final = 16384

#: Extended L2: the second word of an entry is a bitmap, bit ``n`` says subcluster ``n`` is
#: allocated, bit ``32 + n`` that it reads as zeros (QEMU's ``QCOW_OFLAG_SUB_ALLOC`` /
#: ``QCOW_OFLAG_SUB_ZERO``).
SUBCLUSTERS_PER_CLUSTER: Final = 32
SUBCLUSTER_ALLOC_MASK: Final = 0x00000000FFFFFFFF
SUBCLUSTER_ZERO_SHIFT: Final = 32
L2_BITMAP_ALL_ALLOC: Final = SUBCLUSTER_ALLOC_MASK
L2_BITMAP_ALL_ZEROES: Final = SUBCLUSTER_ALLOC_MASK << SUBCLUSTER_ZERO_SHIFT


def subcluster_range_bits(first: int, last: int) -> int:
    """Bits ``first..last`` of one half of an extended L2 bitmap (QEMU's
    ``QCOW_OFLAG_SUB_ALLOC_RANGE``; shift by :data:`SUBCLUSTER_ZERO_SHIFT` for zeros)."""
    return ((1 << (last + 1)) - 1) ^ ((1 << first) - 1)


class ClusterType:
    """What an L2 entry holds (QEMU's ``QCow2ClusterType``).  Plain integers rather than an
    enum: importing ``enum`` costs the command's start-up milliseconds."""

    UNALLOCATED: Final = 0
    ZERO_PLAIN: Final = 1
    ZERO_ALLOC: Final = 2
    NORMAL: Final = 3
    COMPRESSED: Final = 4
    #: The types holding a refcounted host cluster (``qcow2_cluster_is_allocated``).
    HOLDING_HOST: Final = frozenset({ZERO_ALLOC, NORMAL, COMPRESSED})


class SubclusterType:
    """What one subcluster of an L2 entry holds (QEMU's ``QCow2SubclusterType``); without
    extended L2 the whole cluster is one subcluster.  QEMU's ``INVALID`` is not a type
    here: the decoder reports an invalid entry as a corruption (``qcow2.l2``)."""

    COMPRESSED: Final = 0
    NORMAL: Final = 1
    ZERO_PLAIN: Final = 2
    ZERO_ALLOC: Final = 3
    UNALLOCATED_PLAIN: Final = 4
    UNALLOCATED_ALLOC: Final = 5


REFT_OFFSET_MASK: Final = 0xFFFFFFFFFFFFFE00
REFT_RESERVED_MASK: Final = 0x1FF


def compressed_shift(cluster_bits: int) -> int:
    """Bit position of the sector count in a compressed L2 entry (``csize_shift``)."""
    return 62 - (cluster_bits - 8)


def compressed_offset_mask(cluster_bits: int) -> int:
    """Mask of the host byte offset in a compressed L2 entry."""
    return (1 << compressed_shift(cluster_bits)) - 1


def compressed_sectors_mask(cluster_bits: int) -> int:
    """Mask (after shifting) of the additional-sector count in a compressed L2 entry."""
    return (1 << (cluster_bits - 8)) - 1


# Section: snapshot table

#: Fixed part of a snapshot table entry (QCowSnapshotHeader).
SNAPSHOT_HEADER_FIELDS: Final[tuple[tuple[str, str], ...]] = (
    ("l1_table_offset", "Q"),
    ("l1_size", "I"),
    ("id_str_size", "H"),
    ("name_size", "H"),
    ("date_sec", "I"),
    ("date_nsec", "I"),
    ("vm_clock_nsec", "Q"),
    ("vm_state_size", "I"),
    ("extra_data_size", "I"),
)
SNAPSHOT_HEADER_STRUCT: Final = struct.Struct(">" + "".join(f for _, f in SNAPSHOT_HEADER_FIELDS))
#: Known extra data (QCowSnapshotExtraData): vm_state_size_large, disk_size, icount.
SNAPSHOT_EXTRA_FIELDS: Final[tuple[tuple[str, str], ...]] = (
    ("vm_state_size_large", "Q"),
    ("disk_size", "Q"),
    ("icount", "Q"),
)
SNAPSHOT_EXTRA_STRUCT: Final = struct.Struct(">" + "".join(f for _, f in SNAPSHOT_EXTRA_FIELDS))
#: extra_data_size qemu writes (for v2 and v3 alike).
SNAPSHOT_EXTRA_SIZE: Final = SNAPSHOT_EXTRA_STRUCT.size
#: v3 requires at least vm_state_size_large and disk_size.
SNAPSHOT_EXTRA_MIN_V3: Final = 16
assert SNAPSHOT_HEADER_STRUCT.size == 40 and SNAPSHOT_EXTRA_SIZE == 24

# Section: bitmaps (read and refcount only)

BITMAP_DIR_ENTRY_STRUCT: Final = struct.Struct(">QIIBBHI")
BME_TABLE_ENTRY_OFFSET_MASK: Final = 0x00FFFFFFFFFFFE00
BME_TABLE_ENTRY_FLAG_ALL_ONES: Final = 1
assert BITMAP_DIR_ENTRY_STRUCT.size == 24

# Section: LUKS1 header of encrypted images (read only: qemu-img info shows it)

LUKS_MAGIC: Final = b"LUKS\xba\xbe"
#: magic, version, cipher_name, cipher_mode, hash_spec, payload_offset (sectors),
#: key_bytes, mk_digest, mk_digest_salt, mk_digest_iter, uuid
LUKS_HEADER_STRUCT: Final = struct.Struct(">6sH32s32s32sII20s32sI40s")
#: active, iterations, salt, key_material_offset (sectors), stripes
LUKS_KEY_SLOT_STRUCT: Final = struct.Struct(">II32sII")
LUKS_NUM_KEY_SLOTS: Final = 8
LUKS_KEY_SLOT_ENABLED: Final = 0x00AC71F3
LUKS_SECTOR_SIZE: Final = 512
assert LUKS_HEADER_STRUCT.size == 208 and LUKS_KEY_SLOT_STRUCT.size == 48
LUKS_VERSION: Final = 1
LUKS_KEY_SLOT_DISABLED: Final = 0x0000DEAD
LUKS_STRIPES: Final = 4000
LUKS_DIGEST_LEN: Final = 20
LUKS_SALT_LEN: Final = 32
LUKS_UUID_LEN: Final = 40
#: Key material of each slot starts on this alignment (bytes, from the LUKS header start).
LUKS_KEY_SLOT_ALIGN: Final = 4096
#: Lower bounds QEMU applies to the benchmarked PBKDF2 iteration counts.
LUKS_MIN_SLOT_KEY_ITERS: Final = 1000
LUKS_MIN_MASTER_KEY_ITERS: Final = 1000


# Section: commit records (qcow2.commit_records)

#: Header bytes a commit record switches: ``size`` .. ``snapshots_offset`` (24-71).
RECORD_FIELDS_START: Final = 24
RECORD_FIELDS_END: Final = 72
#: Those fields, in order, and their encoding.
RECORD_FIELD_NAMES: Final = (
    "size",
    "crypt_method",
    "l1_size",
    "l1_table_offset",
    "refcount_table_offset",
    "refcount_table_clusters",
    "nb_snapshots",
    "snapshots_offset",
)
RECORD_FIELDS_STRUCT: Final = struct.Struct(">QIIQQIIQ")
#: The extension holds two record slots of this size, used alternately.
COMMIT_RECORD_SLOTS: Final = 2
COMMIT_RECORD_SLOT_SIZE: Final = 1024
COMMIT_RECORD_MAGIC: Final = b"qcow2rec"
#: magic, generation, base (header bytes 24-71 the commit was built on), new (the bytes it
#: switches to), extent count, reserved; then the extents, then the xxh3-128 digest of
#: everything before it followed by the content of every extent.
COMMIT_RECORD_HEAD: Final = struct.Struct(">8sQ48s48sII")
COMMIT_RECORD_EXTENT: Final = struct.Struct(">QQ")  # host offset, length
COMMIT_RECORD_DIGEST_SIZE: Final = 16
COMMIT_RECORD_MAX_EXTENTS: Final = (
    COMMIT_RECORD_SLOT_SIZE - COMMIT_RECORD_HEAD.size - COMMIT_RECORD_DIGEST_SIZE
) // COMMIT_RECORD_EXTENT.size
assert field_offset("size") == RECORD_FIELDS_START
assert RECORD_FIELDS_STRUCT.size == RECORD_FIELDS_END - RECORD_FIELDS_START
assert field_offset("snapshots_offset") + 8 == RECORD_FIELDS_END


def align_up(value: int, alignment: int) -> int:
    """Round ``value`` up to a multiple of ``alignment``."""
    return (value + alignment - 1) // alignment * alignment


def size_to_clusters(cluster_size: int, size: int) -> int:
    """Number of clusters needed to hold ``size`` bytes."""
    return (size + cluster_size - 1) // cluster_size

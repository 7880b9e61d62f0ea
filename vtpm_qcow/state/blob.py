"""swtpm's state blob header and TLVs (what each linear section / dir file holds), for ``info``.

From swtpm 0.7.1 ``src/swtpm/swtpm_nvstore.c``: every stored state blob starts with a big
endian header ``{u8 version=2, u8 min_version=1, u16 hdrsize=10, u16 flags, u32 totlen}``
followed by TLVs ``{u16 tag, u32 length, value}``.  swtpm treats data whose header does
not check out (totlen != length, min_version > 2) as a headerless version 1 blob; so does
:func:`parse_blob` (``header=None``).
"""

from __future__ import annotations

import struct

from ..errors import StateFormatError
from .record import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

BLOB_HEADER_STRUCT: Final = struct.Struct(">BBHHI")  # version, min_version, hdrsize, flags, totlen
TLV_HEADER_STRUCT: Final = struct.Struct(">HI")  # tag, length
BLOB_HEADER_VERSION: Final = 2

BLOB_FLAG_ENCRYPTED: Final = 0x01
BLOB_FLAG_MIGRATION_ENCRYPTED: Final = 0x02
BLOB_FLAG_MIGRATION_DATA: Final = 0x04
BLOB_FLAG_ENCRYPTED_256BIT_KEY: Final = 0x08
BLOB_FLAG_MIGRATION_256BIT_KEY: Final = 0x10
BLOB_FLAG_NAMES: Final = {
    BLOB_FLAG_ENCRYPTED: "encrypted",
    BLOB_FLAG_MIGRATION_ENCRYPTED: "migration-encrypted",
    BLOB_FLAG_MIGRATION_DATA: "migration-data",
    BLOB_FLAG_ENCRYPTED_256BIT_KEY: "aes-256-key",
    BLOB_FLAG_MIGRATION_256BIT_KEY: "migration-aes-256-key",
}

TAG_DATA: Final = 1
TAG_ENCRYPTED_DATA: Final = 2
TAG_HMAC: Final = 3
TAG_MIGRATION_DATA: Final = 4
TAG_ENCRYPTED_MIGRATION_DATA: Final = 5
TAG_IVEC_ENCRYPTED_DATA: Final = 6
TAG_IVEC_ENCRYPTED_MIGRATION_DATA: Final = 7
TAG_NAMES: Final = {
    TAG_DATA: "data",
    TAG_ENCRYPTED_DATA: "encrypted-data",
    TAG_HMAC: "hmac",
    TAG_MIGRATION_DATA: "migration-data",
    TAG_ENCRYPTED_MIGRATION_DATA: "encrypted-migration-data",
    TAG_IVEC_ENCRYPTED_DATA: "ivec-encrypted-data",
    TAG_IVEC_ENCRYPTED_MIGRATION_DATA: "ivec-encrypted-migration-data",
}


class BlobHeader(Record):
    """The fixed header of a state blob."""

    __slots__ = _FIELDS = ("version", "min_version", "hdrsize", "flags", "totlen")
    version: int
    min_version: int
    hdrsize: int
    flags: int
    totlen: int

    def __init__(
        self, version: int, min_version: int, hdrsize: int, flags: int, totlen: int
    ) -> None:
        self._init(version, min_version, hdrsize, flags, totlen)

    @property
    def flag_names(self) -> list[str]:
        """Names of the set flags (unknown bits as hex)."""
        names = [name for bit, name in BLOB_FLAG_NAMES.items() if self.flags & bit]
        unknown = self.flags & ~sum(BLOB_FLAG_NAMES)
        return names + ([f"0x{unknown:x}"] if unknown else [])


class Tlv(Record):
    """One TLV of a blob: tag, its name, where its value starts and how long it is."""

    __slots__ = _FIELDS = ("tag", "offset", "length")
    tag: int
    offset: int
    length: int

    def __init__(self, tag: int, offset: int, length: int) -> None:
        self._init(tag, offset, length)

    @property
    def name(self) -> str:
        """The tag's name (``tag-N`` for tags swtpm 0.7.1 does not define)."""
        return TAG_NAMES.get(self.tag, f"tag-{self.tag}")


class BlobInfo(Record):
    """A parsed blob: its header (None for a headerless v1 blob) and TLVs."""

    __slots__ = _FIELDS = ("size", "header", "tlvs")
    size: int
    header: BlobHeader | None
    tlvs: tuple[Tlv, ...]

    def __init__(self, size: int, header: BlobHeader | None, tlvs: tuple[Tlv, ...]) -> None:
        self._init(size, header, tlvs)

    @property
    def encrypted(self) -> bool:
        """True if the state is encrypted with a file key (``--key``)."""
        return self.header is not None and bool(self.header.flags & BLOB_FLAG_ENCRYPTED)

    def to_dict(self) -> dict[str, object]:
        """A JSON-friendly summary (for ``vtpm-qcow info --json``)."""
        if self.header is None:
            return {"size": self.size, "header": None, "encrypted": False, "tlvs": []}
        h = self.header
        return {
            "size": self.size,
            "header": {
                "version": h.version,
                "min_version": h.min_version,
                "hdrsize": h.hdrsize,
                "flags": h.flags,
                "flag_names": h.flag_names,
                "totlen": h.totlen,
            },
            "encrypted": self.encrypted,
            "tlvs": [{"tag": t.tag, "name": t.name, "length": t.length} for t in self.tlvs],
        }


def parse_blob(data: bytes, *, source: str = "state blob") -> BlobInfo:
    """Parse a stored state blob.

    Data without a valid header (as swtpm's CheckHeader decides) is a headerless blob.  A
    header that checks out but whose TLVs overrun it raises :class:`StateFormatError`.
    """
    size = len(data)
    if size < BLOB_HEADER_STRUCT.size:
        return BlobInfo(size, None, ())
    header = BlobHeader(*BLOB_HEADER_STRUCT.unpack_from(data))
    if header.totlen != size or header.min_version > BLOB_HEADER_VERSION:
        return BlobInfo(size, None, ())
    if not BLOB_HEADER_STRUCT.size <= header.hdrsize <= size:
        raise StateFormatError(f"blob hdrsize {header.hdrsize} out of range", path=source)
    tlvs = []
    pos = header.hdrsize
    while pos < size:
        if pos + TLV_HEADER_STRUCT.size > size:
            raise StateFormatError(f"truncated TLV header at offset {pos}", path=source)
        tag, length = TLV_HEADER_STRUCT.unpack_from(data, pos)
        start = pos + TLV_HEADER_STRUCT.size
        if start + length > size:
            raise StateFormatError(
                f"TLV tag {tag} length {length} at offset {pos} overruns the blob", path=source
            )
        tlvs.append(Tlv(tag, start, length))
        pos = start + length
    return BlobInfo(size, header, tuple(tlvs))


def check_stored_blob(data: bytes, *, source: str = "state blob") -> BlobInfo:
    """The blob swtpm just stored, checked as swtpm >= 0.5 writes and loads it.

    Every store of swtpm 0.7.1 (``SWTPM_NVRAM_StoreData_Intern``) prepends a version 2
    header; :func:`parse_blob` accepts header-less data (swtpm's fallback for blobs of
    very old versions), but a store that lacks a header, or whose ``totlen``, ``hdrsize``
    or TLVs do not match its length, is not what swtpm wrote: a torn or foreign write.
    Raises :class:`StateFormatError` naming ``source`` and the offending field.
    """
    if len(data) < BLOB_HEADER_STRUCT.size:
        raise StateFormatError(f"{len(data)} bytes, too short for a state blob", path=source)
    version, min_version, hdrsize, _flags, totlen = BLOB_HEADER_STRUCT.unpack_from(data)
    if totlen != len(data):
        raise StateFormatError(f"blob totlen {totlen} != its length {len(data)}", path=source)
    if min_version > BLOB_HEADER_VERSION or version < min_version:
        raise StateFormatError(
            f"blob version {version} (min_version {min_version}) not loadable", path=source
        )
    if hdrsize != BLOB_HEADER_STRUCT.size:
        raise StateFormatError(f"blob hdrsize {hdrsize} != {BLOB_HEADER_STRUCT.size}", path=source)
    info = parse_blob(data, source=source)
    if not info.tlvs:
        raise StateFormatError("blob holds no TLV", path=source)
    return info


#: libtpms' PERSISTENT_ALL_MAGIC: a TPM 2.0 permall payload starts {u16 version, u32 magic}.
TPM2_PERMALL_MAGIC: Final = b"\xab\x36\x47\x23"


def plain_payload(data: bytes, info: BlobInfo | None = None) -> bytes | None:
    """The unencrypted libtpms payload of a blob (its DATA TLV, or all of a headerless blob).

    None when the payload is encrypted or absent.
    """
    info = parse_blob(data) if info is None else info
    if info.header is None:
        return data
    for tlv in info.tlvs:
        if tlv.tag == TAG_DATA:
            return data[tlv.offset : tlv.offset + tlv.length]
    return None


def permall_tpm_version(data: bytes) -> str | None:
    """ "2.0" or "1.2" for a permall blob (libtpms' magic tells), None if encrypted."""
    payload = plain_payload(data)
    if payload is None:
        return None
    return "2.0" if payload[2:6] == TPM2_PERMALL_MAGIC else "1.2"

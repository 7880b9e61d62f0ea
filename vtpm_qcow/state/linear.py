"""swtpm's linear state layout (``--tpmstate backend-uri=file://``), as pure functions.

Mirrors swtpm 0.7.1 ``src/swtpm/swtpm_nvstore_linear.{c,h}``.  The layout (little endian)::

    0    u64 magic "swtpmlin" (0x737774706d6c696e)
    8    u8  version (1), u8 padding, u16 hdrsize (192)
    12   15 slots of {u32 offset, u32 data_length, u32 section_length}; offset 0 = unused
    192  sections, each a power of two long, packed one after the other

Slot 0 holds ``permall``, 1 ``volatilestate``, 2 ``savestate``; TPM 1.2 and TPM 2.0 use the
same slots (only the dir backend's file names differ: ``tpm-00.*`` vs ``tpm2-00.*``).

Allocation follows swtpm byte for byte: a new section goes after the end of the last one
(``SWTPM_NVRAM_Linear_AllocFile``); a blob that outgrows its section is removed, the
following sections move down (``SWTPM_NVRAM_Linear_RemoveFile`` with its memmove) and it is
allocated again at the end; only ``data_length`` bytes are copied, so the rest of a section
keeps whatever it held before.  The logical file size is the end of the last section, as
swtpm ftruncates a regular file to exactly that.

:func:`store_section` and :func:`delete_section` take the current bytes of the linear file
and return a :class:`LinearUpdate`: the new header, the changed extents and the new size.
The bytes given may extend past the layout's end (a fixed-size file such as the store's
disk or a block device keeps stale bytes there): the extents then turn exactly that window
into the new layout followed by zeros, so a new section never inherits stale bytes.
"""

from __future__ import annotations

import itertools
import struct

from ..errors import StateFormatError
from .record import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

MAGIC: Final = 0x737774706D6C696E
MAGIC_BYTES: Final = struct.pack("<Q", MAGIC)
VERSION: Final = 1
HEADER_PREFIX_STRUCT: Final = struct.Struct("<QBBH")  # magic, version, padding, hdrsize
SLOT_STRUCT: Final = struct.Struct("<III")  # offset, data_length, section_length
MAX_SLOTS: Final = 15
HEADER_SIZE: Final = HEADER_PREFIX_STRUCT.size + MAX_SLOTS * SLOT_STRUCT.size
assert HEADER_SIZE == 192

#: Section names (libtpms' TPM_PERMANENT_ALL_NAME, ...) and their slot numbers.
SECTION_SLOTS: Final[dict[str, int]] = {"permall": 0, "volatilestate": 1, "savestate": 2}
SECTION_NAMES: Final = tuple(SECTION_SLOTS)
#: The last slot holds the dir view's file attributes (:mod:`vtpm_qcow.export.attrs`), not
#: TPM state: swtpm neither reads nor frees it, and moves its section along with the others
#: as it does every allocated slot's (``SWTPM_NVRAM_Linear_RemoveFile``).  It is no
#: section of ``SECTION_NAMES``: nothing that lists the TPM's state shows it.
ATTRS_SECTION: Final = "vtpm-qcow-attrs"
ATTRS_SLOT: Final = MAX_SLOTS - 1

#: Largest blob a slot can describe: its section (next power of two) must fit in a u32.
MAX_BLOB_SIZE: Final = 1 << 31
#: Diff runs closer than this are merged into one extent.
_MERGE_GAP: Final = 256
#: Chunk sizes :func:`_next_difference` skips equal bytes in (each level runs < 8 times)
#: and that trim a run's equal tail (shorter than ``_MERGE_GAP``).
_SKIP_SIZES: Final = (4096, 512, 64, 8, 1)
_TRIM_SIZES: Final = (64, 8, 1)


class Slot(Record):
    """One slot of the header: where a section lives and how much of it is valid."""

    __slots__ = _FIELDS = ("offset", "data_length", "section_length")
    offset: int
    data_length: int
    section_length: int

    def __init__(self, offset: int = 0, data_length: int = 0, section_length: int = 0) -> None:
        self._init(offset, data_length, section_length)

    @property
    def allocated(self) -> bool:
        """True if the slot points at a section (swtpm: offset 0 means unallocated)."""
        return self.offset != 0

    @property
    def end(self) -> int:
        """First byte after the section."""
        return self.offset + self.section_length

    @property
    def end_of_data(self) -> int:
        """First byte after the slot's data."""
        return self.offset + self.data_length


EMPTY_SLOT: Final = Slot()


class LinearHeader(Record):
    """The parsed header of a linear state file."""

    _FIELDS = ("version", "hdrsize", "slots")
    __slots__ = (*_FIELDS, "_end")
    version: int
    hdrsize: int
    slots: tuple[Slot, ...]
    _end: int | None

    def __init__(
        self,
        version: int = VERSION,
        hdrsize: int = HEADER_SIZE,
        slots: tuple[Slot, ...] = (EMPTY_SLOT,) * MAX_SLOTS,
    ) -> None:
        self._init(version, hdrsize, slots)
        object.__setattr__(self, "_end", None)

    @property
    def end(self) -> int:
        """Logical size of the linear file: end of the last section, at least hdrsize
        (computed once: a section store asks several times)."""
        if self._end is None:
            end = max([self.hdrsize, *(s.end for s in self.slots if s.allocated)])
            object.__setattr__(self, "_end", end)
            return end
        return self._end

    def slot(self, name: str) -> Slot:
        """The slot of section ``name`` ("permall", "volatilestate", "savestate")."""
        return self.slots[slot_number(name)]

    def pack(self) -> bytes:
        """The header's 192 bytes, as swtpm lays them out."""
        out = bytearray(HEADER_PREFIX_STRUCT.pack(MAGIC, self.version, 0, self.hdrsize))
        for s in self.slots:
            out += SLOT_STRUCT.pack(s.offset, s.data_length, s.section_length)
        return bytes(out)

    def with_slot(self, number: int, slot: Slot) -> LinearHeader:
        """A copy with slot ``number`` replaced."""
        slots = list(self.slots)
        slots[number] = slot
        return LinearHeader(self.version, self.hdrsize, tuple(slots))


class LinearUpdate(Record):
    """The result of a section store/delete.

    ``writes`` are non-overlapping ``(offset, data)`` extents, in offset order, that turn the
    old bytes into the new ones; ``size`` is the new logical file size (header.end).
    """

    __slots__ = _FIELDS = ("header", "writes", "size")
    header: LinearHeader
    writes: tuple[tuple[int, bytes], ...]
    size: int

    def __init__(
        self, header: LinearHeader, writes: tuple[tuple[int, bytes], ...], size: int
    ) -> None:
        self._init(header, writes, size)


def slot_number(name: str) -> int:
    """Slot number of a section name (or :data:`ATTRS_SECTION`); ValueError for others."""
    if name == ATTRS_SECTION:
        return ATTRS_SLOT
    try:
        return SECTION_SLOTS[name]
    except KeyError:
        raise ValueError(f"unknown TPM state section {name!r}") from None


def dir_file_name(name: str, *, tpm2: bool = True) -> str:
    """The dir backend's file name of section ``name`` (``tpm2-00.permall``)."""
    slot_number(name)
    return f"{'tpm2' if tpm2 else 'tpm'}-00.{name}"


def section_of_file_name(file_name: str) -> tuple[str, bool] | None:
    """``(section, is_tpm2)`` for a dir backend state file name, None for other names."""
    for prefix, tpm2 in (("tpm2-00.", True), ("tpm-00.", False)):
        if file_name.startswith(prefix) and file_name[len(prefix) :] in SECTION_SLOTS:
            return file_name[len(prefix) :], tpm2
    return None


def is_formatted(data: bytes) -> bool:
    """True if ``data`` starts with the linear magic (swtpm formats anything else afresh)."""
    return data[:8] == MAGIC_BYTES


def _is_power_of_two_or_zero(value: int) -> bool:
    return value & (value - 1) == 0


def parse_header(
    data: bytes, *, size: int | None = None, source: str = "linear file"
) -> LinearHeader:
    """Parse and validate the header at the start of ``data``.

    ``size`` is the file's size (default ``len(data)``); every section must lie inside it.
    Raises :class:`StateFormatError` naming ``source`` and the offending field.
    """
    size = len(data) if size is None else size
    if len(data) < HEADER_SIZE:
        raise StateFormatError(f"{len(data)} bytes, shorter than the linear header", path=source)
    head = bytes(data[:HEADER_SIZE])
    header = _PARSED.get((head, size))
    if header is None:
        header = _parse_header_bytes(head, size, source)
        if len(_PARSED) >= _PARSED_MAX:
            _PARSED.clear()
        _PARSED[head, size] = header
    return header


#: :func:`parse_header`'s memo, by (header bytes, file size): a store parses the same
#: header several times per section write, and ``snapshot -l`` the same header of every
#: snapshot (the result is immutable and ``source`` only names the file in errors, which
#: are not cached).  A dict rather than functools.lru_cache, whose import (collections)
#: the read-only commands' start-up does without; emptied when full.
_PARSED: dict[tuple[bytes, int], LinearHeader] = {}
_PARSED_MAX: Final = 64


def _parse_header_bytes(data: bytes, size: int, source: str) -> LinearHeader:
    """:func:`parse_header` of exactly the header's bytes."""
    magic, version, _pad, hdrsize = HEADER_PREFIX_STRUCT.unpack_from(data)
    if magic != MAGIC:
        raise StateFormatError(f"bad magic 0x{magic:016x} (not a swtpm linear file)", path=source)
    if version > VERSION or version == 0:
        raise StateFormatError(f"unsupported linear format version {version}", path=source)
    if not HEADER_SIZE <= hdrsize <= size:
        raise StateFormatError(f"hdrsize {hdrsize} out of range", path=source)
    slots = []
    for number in range(MAX_SLOTS):
        offset, data_length, section_length = SLOT_STRUCT.unpack_from(
            data, HEADER_PREFIX_STRUCT.size + number * SLOT_STRUCT.size
        )
        slot = Slot(offset, data_length, section_length) if offset else EMPTY_SLOT
        where = f"{source}: slot {number}"
        if slot.allocated:
            if offset < hdrsize:
                raise StateFormatError(f"{where} offset {offset} inside the header")
            if data_length > section_length:
                raise StateFormatError(
                    f"{where} data_length {data_length} > section_length {section_length}"
                )
            if not _is_power_of_two_or_zero(section_length):
                raise StateFormatError(f"{where} section_length {section_length} not a power of 2")
            if slot.end > size:
                raise StateFormatError(f"{where} section end {slot.end} beyond file size {size}")
        slots.append(slot)
    used = sorted((s for s in slots if s.allocated and s.section_length), key=lambda s: s.offset)
    for before, after in itertools.pairwise(used):
        if before.end > after.offset:
            raise StateFormatError(
                f"sections at {before.offset} and {after.offset} overlap", path=source
            )
    return LinearHeader(version, hdrsize, tuple(slots))


def read_section(data: bytes, name: str, *, source: str = "linear file") -> bytes | None:
    """The blob stored in section ``name`` of linear file ``data``, None if absent.

    An unformatted file (no magic, e.g. all zeros) holds no sections.
    """
    if not is_formatted(data):
        return None
    slot = parse_header(data, source=source).slot(name)
    if not slot.allocated:
        return None
    return bytes(data[slot.offset : slot.offset + slot.data_length])


def _round_to_power_of_two(value: int) -> int:
    """swtpm's ROUND_TO_NEXT_POWER_OF_2_32 (0 stays 0, powers of two stay)."""
    return 0 if value == 0 else 1 << (value - 1).bit_length()


class _Buffer:
    """The linear file being edited: a growable copy with swtpm's memory operations."""

    def __init__(self, data: bytes, header: LinearHeader, *, old: bytes | None = None) -> None:
        self.old = bytes(data if old is None else old)
        self.buf = bytearray(data)
        self.header = header

    def resize(self, size: int) -> None:
        """ftruncate: shrinking drops bytes, growing adds zeros."""
        if size < len(self.buf):
            del self.buf[size:]
        else:
            self.buf.extend(bytes(size - len(self.buf)))

    def alloc(self, number: int, length: int) -> None:
        """SWTPM_NVRAM_Linear_AllocFile: place a section after the last one."""
        section_length = _round_to_power_of_two(length)
        new_offset = self.header.end
        self.resize(new_offset + section_length)
        self.header = self.header.with_slot(number, Slot(new_offset, length, section_length))

    def remove(self, number: int) -> None:
        """SWTPM_NVRAM_Linear_RemoveFile: drop a section, move the following ones down."""
        old = self.header.slots[number]
        if not old.allocated:
            return
        header = self.header.with_slot(number, EMPTY_SLOT)
        next_offset, state_end = None, 0
        slots = list(header.slots)
        for i, s in enumerate(slots):
            if s.allocated and s.offset > old.offset:
                next_offset = s.offset if next_offset is None else min(next_offset, s.offset)
                state_end = max(state_end, s.end)
                slots[i] = Slot(s.offset - old.section_length, s.data_length, s.section_length)
        if next_offset is not None:
            moved = bytes(self.buf[next_offset:state_end])
            self.buf[old.offset : old.offset + len(moved)] = moved
        self.header = LinearHeader(header.version, header.hdrsize, tuple(slots))
        self.resize(self.header.end)

    def update(self) -> LinearUpdate:
        """The changed extents between the original and the edited bytes."""
        new = bytearray(self.buf)
        new[:HEADER_SIZE] = self.header.pack()
        # Bytes cut off by a shrink read as zeros afterwards, as after ftruncate.
        length = max(len(new), len(self.old))
        writes = _diff(self.old.ljust(length, b"\0"), bytes(new).ljust(length, b"\0"))
        return LinearUpdate(self.header, tuple(writes), self.header.end)


def _diff(old: bytes, new: bytes) -> list[tuple[int, bytes]]:
    """Runs where ``new`` differs from ``old`` (same length), merging runs close together.

    Slices are compared at memcmp speed: equal stretches are skipped in ever smaller
    chunks, a run grows by ``_MERGE_GAP`` bytes while the next chunk still differs and is
    then trimmed to its last differing byte.  Runs less than ``_MERGE_GAP`` bytes apart
    are merged (some up to twice that): commits copy whole clusters anyway.
    """
    length = len(new)
    step = _MERGE_GAP
    runs: list[tuple[int, bytes]] = []
    pos = 0
    while (start := _next_difference(old, new, pos)) < length:
        end = start + 1
        while end < length and old[end : end + step] != new[end : end + step]:
            end += step
        end = min(end, length)
        for size in _TRIM_SIZES:  # the last chunk ends in fewer than ``step`` equal bytes
            while end - size > start and old[end - size : end] == new[end - size : end]:
                end -= size
        runs.append((start, bytes(new[start:end])))
        pos = end
    return runs


def _next_difference(old: bytes, new: bytes, pos: int) -> int:
    """First index from ``pos`` where ``old`` and ``new`` differ (their length if none)."""
    length = len(new)
    for size in _SKIP_SIZES:
        while pos < length and old[pos : pos + size] == new[pos : pos + size]:
            pos += size
    return min(pos, length)


def _editable(data: bytes, source: str) -> _Buffer:
    """A buffer over ``data``; an unformatted file is formatted as swtpm's Prepare does."""
    if is_formatted(data):
        header = parse_header(data, source=source)
        # The logical file ends at header.end; what ``data`` holds beyond it is the disk's
        # actual content there (a fixed-size file keeps stale bytes), which the extents
        # must overwrite or zero rather than assume to be zero.
        return _Buffer(data[: header.end], header, old=data)
    # SWTPM_NVRAM_Prepare_Linear: new magic/version/hdrsize, all slots zeroed.
    return _Buffer(data.ljust(HEADER_SIZE, b"\0"), LinearHeader(), old=data)


def empty_layout() -> bytes:
    """A freshly formatted linear file: the header with no sections."""
    return LinearHeader().pack()


def store_section(
    data: bytes, name: str, blob: bytes, *, source: str = "linear file"
) -> LinearUpdate:
    """Store ``blob`` as section ``name`` (SWTPM_NVRAM_StoreData_Linear).

    ``data`` must cover at least the layout; to place a new section correctly over stale
    bytes it should reach :func:`store_window` bytes.
    """
    number = slot_number(name)
    if not 0 < len(blob) <= MAX_BLOB_SIZE:
        raise StateFormatError(f"{name} blob of {len(blob)} bytes cannot be stored", path=source)
    buf = _editable(data, source)
    slot = buf.header.slots[number]
    if not slot.allocated:
        buf.alloc(number, len(blob))
    elif len(blob) > slot.section_length:
        buf.remove(number)
        buf.alloc(number, len(blob))
    slot = buf.header.slots[number]
    if slot.data_length != len(blob):
        buf.header = buf.header.with_slot(number, Slot(slot.offset, len(blob), slot.section_length))
    buf.buf[slot.offset : slot.offset + len(blob)] = blob
    return buf.update()


def store_window(data: bytes, blob_size: int) -> int:
    """How many bytes of the file :func:`store_section` may touch for a blob of that size.

    ``data`` needs only the first :data:`HEADER_SIZE` bytes.  A new or grown section goes
    after the last one, so the layout end plus the blob's section size bounds the writes.
    """
    end = parse_header(data[:HEADER_SIZE], size=1 << 32).end if is_formatted(data) else HEADER_SIZE
    return end + _round_to_power_of_two(blob_size)


def delete_section(data: bytes, name: str, *, source: str = "linear file") -> LinearUpdate:
    """Remove section ``name`` and shrink the file (SWTPM_NVRAM_DeleteName_Linear)."""
    number = slot_number(name)
    buf = _editable(data, source)
    buf.remove(number)
    return buf.update()


def apply_update(data: bytes, update: LinearUpdate) -> bytes:
    """``data`` with ``update``'s extents written and truncated to its size (for tests/export)."""
    out = bytearray(data)
    for offset, chunk in update.writes:
        if len(out) < offset + len(chunk):
            out.extend(bytes(offset + len(chunk) - len(out)))
        out[offset : offset + len(chunk)] = chunk
    return bytes(out[: update.size]) + bytes(max(0, update.size - len(out)))

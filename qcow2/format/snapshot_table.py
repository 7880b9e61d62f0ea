"""The internal snapshot table: parse, validate and serialize its entries.

Mirrors QEMU 7.2's ``qcow2_do_read_snapshots()`` / ``qcow2_write_snapshots()`` in
``block/qcow2-snapshot.c``: entries start 8-byte aligned, extra data up to 1024 bytes is
accepted and the part qemu does not know is kept byte for byte, the whole table may not
exceed 64 MiB, and a table (partly) beyond the end of the file reads as zeros.  Nothing is
allocated from a size field before that size has been checked against qemu's limits.
"""

from __future__ import annotations

import errno

from ..errors import CorruptImageError, SnapshotError, SnapshotNotFoundError
from .header import validate_table
from .layout import (
    L1_ENTRY_SIZE,
    MAX_L1_BYTES,
    MAX_SNAPSHOT_EXTRA_DATA,
    MAX_SNAPSHOT_TABLE_BYTES,
    MAX_SNAPSHOTS,
    SNAPSHOT_EXTRA_MIN_V3,
    SNAPSHOT_EXTRA_SIZE,
    SNAPSHOT_EXTRA_STRUCT,
    SNAPSHOT_HEADER_STRUCT,
    align_up,
)

#: icount value on disk that means "no icount" (qemu's ``-1ULL``).
NO_ICOUNT = (1 << 64) - 1
#: extra data sizes at which each known extra field becomes present (``endof(...)``).
_EXTRA_END_VM_STATE = 8
_EXTRA_END_DISK_SIZE = 16
_EXTRA_END_ICOUNT = 24
#: bytes fetched per read while walking the table (keeps syscalls few, memory bounded).
_READ_CHUNK = 64 * 1024

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence
    from typing import Protocol

    class _PositionedReader(Protocol):
        def pread(self, offset: int, length: int) -> bytes: ...


class SnapshotEntry:
    """One parsed snapshot table entry.

    ``disk_size`` is the stored value, None when the entry's extra data is too short to hold
    it; :attr:`virtual_size` is what qemu uses instead (the image's size when the table was
    read).  ``icount`` is None when absent or -1.  ``unknown_extra`` holds extra data past
    the 24 bytes qemu knows, preserved on rewrite.  ``extra_data_size`` is the on-disk value.

    Immutable by convention (never changed once made; a changed entry is a new one).  Its
    ``__dict__`` holds exactly the constructor's arguments, so
    ``SnapshotEntry(**{**entry.__dict__, "name": new})`` is a modified copy.
    """

    def __init__(
        self,
        id: str,
        name: str,
        l1_table_offset: int,
        l1_size: int,
        date_sec: int = 0,
        date_nsec: int = 0,
        vm_clock_nsec: int = 0,
        vm_state_size: int = 0,
        disk_size: int | None = None,
        icount: int | None = None,
        extra_data_size: int = SNAPSHOT_EXTRA_SIZE,
        unknown_extra: bytes = b"",
        virtual_size: int = 0,
    ) -> None:
        self.id = id
        self.name = name
        self.l1_table_offset = l1_table_offset
        self.l1_size = l1_size
        self.date_sec = date_sec
        self.date_nsec = date_nsec
        self.vm_clock_nsec = vm_clock_nsec
        self.vm_state_size = vm_state_size
        self.disk_size = disk_size
        self.icount = icount
        self.extra_data_size = extra_data_size
        self.unknown_extra = unknown_extra
        self.virtual_size = virtual_size


class _ChunkedTableReader:
    """Sequential reader over the table that fetches bounded chunks from the host file."""

    def __init__(self, f: _PositionedReader, start: int) -> None:
        self._f = f
        self._buf = b""
        self._buf_start = start
        self.pos = start

    def read(self, length: int) -> bytes:
        end = self.pos + length
        if end > self._buf_start + len(self._buf) or self.pos < self._buf_start:
            fetch = max(length, _READ_CHUNK)
            self._buf = self._f.pread(self.pos, fetch)
            self._buf_start = self.pos
        rel = self.pos - self._buf_start
        self.pos = end
        return self._buf[rel : rel + length]


def _decode(raw: bytes) -> str:
    # qemu keeps ids and names as C strings; surrogateescape keeps any byte round-trippable.
    return raw.decode("utf-8", "surrogateescape")


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def validate_snapshot_l1(entry: SnapshotEntry, *, cluster_size: int, path: str | None) -> None:
    """The check qemu runs before using a snapshot's L1 (goto, delete, load_tmp)."""
    validate_table(
        "Snapshot L1 table",
        entry.l1_table_offset,
        entry.l1_size,
        L1_ENTRY_SIZE,
        MAX_L1_BYTES,
        cluster_size,
        path=path,
    )


def read_snapshot_table(
    f: _PositionedReader,
    offset: int,
    nb: int,
    *,
    path: str | None,
    version: int,
    virtual_size: int,
    cluster_size: int | None = None,
) -> list[SnapshotEntry]:
    """Parse ``nb`` entries starting at ``offset`` of host file ``f``.

    The table location is validated first as qemu's open does ("Snapshot table too large",
    and with ``cluster_size`` "Snapshot table offset invalid").  ``version`` is accepted for
    symmetry with serialization; v3's "extra data >= 16" rule is a check finding, not an
    open error (see :func:`incomplete_entries`).
    """
    del version  # qemu parses v2 and v3 tables identically
    # qemu's open: more than 65536 entries is "Snapshot table too large"; the offset must be
    # cluster aligned (checked when the caller passes cluster_size).
    validate_table(
        "Snapshot table",
        offset,
        nb,
        SNAPSHOT_HEADER_STRUCT.size,
        SNAPSHOT_HEADER_STRUCT.size * MAX_SNAPSHOTS,
        cluster_size or 1,
        path=path,
    )
    entries: list[SnapshotEntry] = []
    reader = _ChunkedTableReader(f, offset)
    table_length = 0
    for i in range(nb):
        table_length = align_up(table_length, 8)
        reader.pos = offset + table_length
        (
            l1_table_offset,
            l1_size,
            id_str_size,
            name_size,
            date_sec,
            date_nsec,
            vm_clock_nsec,
            vm_state_size,
            extra_data_size,
        ) = SNAPSHOT_HEADER_STRUCT.unpack(reader.read(SNAPSHOT_HEADER_STRUCT.size))
        if extra_data_size > MAX_SNAPSHOT_EXTRA_DATA:
            raise CorruptImageError(
                f"Too much extra metadata in snapshot table entry {i} "
                f"({extra_data_size} > {MAX_SNAPSHOT_EXTRA_DATA})",
                path=path,
                offset=offset + table_length,
            )
        known = reader.read(min(SNAPSHOT_EXTRA_SIZE, extra_data_size))
        known_padded = known + bytes(SNAPSHOT_EXTRA_SIZE - len(known))
        vm_state_large, disk_size_raw, icount_raw = SNAPSHOT_EXTRA_STRUCT.unpack(known_padded)
        if extra_data_size >= _EXTRA_END_VM_STATE:
            vm_state_size = vm_state_large
        disk_size = disk_size_raw if extra_data_size >= _EXTRA_END_DISK_SIZE else None
        has_icount = extra_data_size >= _EXTRA_END_ICOUNT and icount_raw != NO_ICOUNT
        unknown = reader.read(max(0, extra_data_size - SNAPSHOT_EXTRA_SIZE))
        id_str = _decode(reader.read(id_str_size))
        name = _decode(reader.read(name_size))
        table_length += SNAPSHOT_HEADER_STRUCT.size + extra_data_size + id_str_size + name_size
        if table_length > MAX_SNAPSHOT_TABLE_BYTES:
            raise CorruptImageError(
                f"Snapshot table is too big (entry {i} ends at {table_length} bytes)",
                path=path,
                offset=offset,
            )
        entries.append(
            SnapshotEntry(
                id=id_str,
                name=name,
                l1_table_offset=l1_table_offset,
                l1_size=l1_size,
                date_sec=date_sec,
                date_nsec=date_nsec,
                vm_clock_nsec=vm_clock_nsec,
                vm_state_size=vm_state_size,
                disk_size=disk_size,
                icount=icount_raw if has_icount else None,
                extra_data_size=extra_data_size,
                unknown_extra=unknown,
                virtual_size=disk_size if disk_size is not None else virtual_size,
            )
        )
    return entries


def table_length(entries: Iterable[SnapshotEntry]) -> int:
    """Exact byte length :func:`serialize_snapshot_table` produces (last entry unpadded)."""
    length = 0
    for entry in entries:
        length = align_up(length, 8)
        length += SNAPSHOT_HEADER_STRUCT.size
        length += max(SNAPSHOT_EXTRA_SIZE, entry.extra_data_size)
        length += len(_encode(entry.id)) + len(_encode(entry.name))
    return length


def serialize_snapshot_table(entries: Sequence[SnapshotEntry], version: int) -> bytes:
    """Encode the table as qemu writes it: extra_data_size = max(24, existing).

    The known extra fields are always written (disk_size from :attr:`virtual_size`, icount
    -1 when None) and unknown extra data follows them unchanged.
    """
    del version  # qemu writes the same layout for v2 and v3
    if table_length(entries) > MAX_SNAPSHOT_TABLE_BYTES:
        raise SnapshotError("Snapshot table is too big", errno=errno.EFBIG)
    out = bytearray()
    for entry in entries:
        out += bytes(align_up(len(out), 8) - len(out))
        id_raw, name_raw = _encode(entry.id), _encode(entry.name)
        if len(id_raw) > 0xFFFF or len(name_raw) > 0xFFFF:
            raise SnapshotError(f"snapshot id/name too long ({entry.name[:32]!r}...)")
        unknown = entry.unknown_extra
        out += SNAPSHOT_HEADER_STRUCT.pack(
            entry.l1_table_offset,
            entry.l1_size,
            len(id_raw),
            len(name_raw),
            entry.date_sec,
            entry.date_nsec,
            entry.vm_clock_nsec,
            # Larger VM states leave the 32-bit field 0, so older readers see a disk-only
            # snapshot rather than a truncated VM state (qemu's rule).
            entry.vm_state_size if entry.vm_state_size <= 0xFFFFFFFF else 0,
            SNAPSHOT_EXTRA_SIZE + len(unknown),
        )
        out += SNAPSHOT_EXTRA_STRUCT.pack(
            entry.vm_state_size,
            entry.virtual_size,
            NO_ICOUNT if entry.icount is None else entry.icount,
        )
        out += unknown + id_raw + name_raw
    return bytes(out)


def incomplete_entries(entries: Sequence[SnapshotEntry], version: int) -> list[int]:
    """Indexes of v3 entries with less than 16 bytes of extra data (a check finding)."""
    if version < 3:
        return []
    return [i for i, e in enumerate(entries) if e.extra_data_size < SNAPSHOT_EXTRA_MIN_V3]


def new_snapshot_id(entries: Iterable[SnapshotEntry]) -> str:
    """qemu's ``find_new_snapshot_id``: max(strtoul(id)) + 1 over the existing entries."""
    highest = 0
    for entry in entries:
        digits = ""
        for ch in entry.id.lstrip():
            if not ch.isdigit() or not ch.isascii():
                break
            digits += ch
        if digits:
            highest = max(highest, int(digits))
    return str(highest + 1)


def _find(entries: Sequence[SnapshotEntry], *, id: str | None, name: str | None) -> int:
    for i, entry in enumerate(entries):
        if (id is None or entry.id == id) and (name is None or entry.name == name):
            return i
    return -1


def find_snapshot(
    entries: Sequence[SnapshotEntry],
    key: str,
    *,
    id_first: bool,
    path: str | None = None,
    name_only: bool = False,
    id_only: bool = False,
) -> int:
    """Index of the snapshot ``key`` names.

    ``id_first=True`` is qemu's rule for apply and ``convert -l`` (ID, then name);
    ``id_first=False`` is the rule of ``qemu-img snapshot -d`` (name, then ID).
    ``name_only=True`` matches the name alone, as QEMU's savevm/loadvm/delvm do: a name that
    looks like another snapshot's ID never selects that snapshot; ``id_only=True`` the ID
    alone (``convert -l snapshot.id=``).  Raises :class:`SnapshotNotFoundError` when nothing
    matches.
    """
    if name_only:
        order: list[tuple[str | None, str | None]] = [(None, key)]
    elif id_only:
        order = [(key, None)]
    elif id_first:
        order = [(key, None), (None, key)]
    else:
        order = [(None, key), (key, None)]
    for by_id, by_name in order:
        index = _find(entries, id=by_id, name=by_name)
        if index >= 0:
            return index
    raise SnapshotNotFoundError(f"Can't find snapshot '{key}'", path=path)

"""Snapshot table parsing/serialization against tables qemu-img wrote."""

from __future__ import annotations

from pathlib import Path

import pytest

from qcow2.errors import CorruptImageError, SnapshotNotFoundError
from qcow2.format.layout import (
    HEADER_FIELDS,
    HEADER_V2_STRUCT,
    SNAPSHOT_EXTRA_SIZE,
    SNAPSHOT_HEADER_STRUCT,
    field_offset,
    field_struct,
)
from qcow2.format.snapshot_table import (
    SnapshotEntry,
    find_snapshot,
    new_snapshot_id,
    read_snapshot_table,
    serialize_snapshot_table,
    table_length,
)
from qcow2.io.fileio import HostFile
from tests.qcow2 import oracle

MiB = 1024 * 1024


def raw_header(path: Path) -> dict[str, int]:
    """The v2 part of the header, decoded with layout's field list (no dependency on header.py)."""
    values = HEADER_V2_STRUCT.unpack(path.read_bytes()[: HEADER_V2_STRUCT.size])
    return {name: value for (name, _), value in zip(HEADER_FIELDS, values, strict=False)}


def parse(path: Path) -> list[SnapshotEntry]:
    hdr = raw_header(path)
    f = HostFile(str(path), writable=False)
    try:
        return read_snapshot_table(
            f,
            hdr["snapshots_offset"],
            hdr["nb_snapshots"],
            path=str(path),
            version=hdr["version"],
            virtual_size=hdr["size"],
            cluster_size=1 << hdr["cluster_bits"],
        )
    finally:
        f.close()


def table_bytes(path: Path, entries: list[SnapshotEntry]) -> bytes:
    hdr = raw_header(path)
    start = hdr["snapshots_offset"]
    return path.read_bytes()[start : start + table_length(entries)]


def poke(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


def set_header(path: Path, name: str, value: int) -> None:
    poke(path, field_offset(name), field_struct(name).pack(value))


def assert_matches_qemu(path: Path, entries: list[SnapshotEntry]) -> None:
    listed = oracle.snapshot_list(path)
    assert [(e.id, e.name) for e in entries] == [(s["id"], s["name"]) for s in listed]
    for entry, snap in zip(entries, listed, strict=True):
        assert entry.date_sec == snap["date-sec"]
        assert entry.date_nsec == snap["date-nsec"]
        assert entry.vm_clock_nsec == snap["vm-clock-sec"] * 10**9 + snap["vm-clock-nsec"]
        assert entry.vm_state_size == snap["vm-state-size"]
        assert entry.icount == snap.get("icount")


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_parse_and_reserialize_qemu_table(tmp_path: Path, compat: str) -> None:
    img = oracle.create(tmp_path / "a.qcow2", 4 * MiB, compat=compat, cluster_size=4096)
    oracle.qemu_io(img, "write -P 0x5a 0 64k")
    for name in ("first", "second", "x" * 300, "first"):
        oracle.snapshot(img, "create", name)
    oracle.snapshot(img, "delete", "second")  # IDs are now 1, 3, 4
    entries = parse(img)
    assert_matches_qemu(img, entries)
    assert [e.id for e in entries] == ["1", "3", "4"]
    assert all(e.disk_size == 4 * MiB and e.virtual_size == 4 * MiB for e in entries)
    assert all(e.extra_data_size == SNAPSHOT_EXTRA_SIZE for e in entries)
    version = raw_header(img)["version"]
    assert serialize_snapshot_table(entries, version) == table_bytes(img, entries)


def test_unknown_extra_data_preserved_like_qemu(tmp_path: Path) -> None:
    img = oracle.create(tmp_path / "a.qcow2", 4 * MiB)
    oracle.snapshot(img, "create", "s1")
    (entry,) = parse(img)
    # Grow the entry's extra data to 24 + 16 bytes in place (the table's cluster is
    # already refcounted, so the image stays check-clean).
    unknown = bytes(range(1, 17))
    bigger = SnapshotEntry(**{**entry.__dict__, "unknown_extra": unknown, "extra_data_size": 40})
    poke(img, raw_header(img)["snapshots_offset"], serialize_snapshot_table([bigger], 3))
    oracle.assert_clean(img)
    (parsed,) = parse(img)
    assert parsed.unknown_extra == unknown and parsed.extra_data_size == 40
    assert_matches_qemu(img, [parsed])
    # qemu rewrites the table on create and must keep our unknown bytes: so must we.
    oracle.snapshot(img, "create", "s2")
    entries = parse(img)
    assert entries[0].unknown_extra == unknown and entries[1].unknown_extra == b""
    assert serialize_snapshot_table(entries, 3) == table_bytes(img, entries)


def test_short_extra_data_defaults(tmp_path: Path) -> None:
    """extra_data_size 0 (old writers): disk_size falls back to the image size, icount None."""
    img = oracle.create(tmp_path / "a.qcow2", 4 * MiB, compat="0.10")
    oracle.snapshot(img, "create", "old")
    (entry,) = parse(img)
    start = raw_header(img)["snapshots_offset"]
    hdr = list(SNAPSHOT_HEADER_STRUCT.unpack(img.read_bytes()[start : start + 40]))
    hdr[-1] = 0  # extra_data_size
    poke(img, start, SNAPSHOT_HEADER_STRUCT.pack(*hdr) + b"1old")
    (short,) = parse(img)
    assert short.extra_data_size == 0 and short.disk_size is None and short.icount is None
    assert short.virtual_size == 4 * MiB and (short.id, short.name) == ("1", "old")
    listed = oracle.snapshot_list(img)
    assert "icount" not in listed[0]  # qemu agrees: no icount
    # Re-serialized the qemu way: extra_data_size grows to 24 with disk_size filled in.
    again = serialize_snapshot_table([short], 2)
    assert again[36:40] == (SNAPSHOT_EXTRA_SIZE).to_bytes(4, "big")
    assert int.from_bytes(again[48:56], "big") == 4 * MiB
    assert entry.icount == 0  # what qemu-img wrote originally


def test_too_much_extra_metadata(tmp_path: Path) -> None:
    img = oracle.create(tmp_path / "a.qcow2", 4 * MiB)
    oracle.snapshot(img, "create", "s1")
    oracle.snapshot(img, "create", "s2")
    entries = parse(img)
    second = raw_header(img)["snapshots_offset"] + (table_length(entries[:1]) + 7) // 8 * 8
    poke(img, second + 36, (1025).to_bytes(4, "big"))
    proc = oracle.qemu_img("info", str(img), ok=(1,))
    assert b"Too much extra metadata in snapshot table entry 1" in proc.stderr
    with pytest.raises(
        CorruptImageError, match="Too much extra metadata in snapshot table entry 1"
    ):
        parse(img)


def test_table_too_big_without_reading_it_all_into_entries(tmp_path: Path) -> None:
    """Entries with huge id/name sizes (sparse holes read as zeros) exceed 64 MiB."""
    img = oracle.create(tmp_path / "a.qcow2", 4 * MiB)
    oracle.snapshot(img, "create", "s1")
    start = raw_header(img)["snapshots_offset"]
    entry_len = SNAPSHOT_HEADER_STRUCT.size + 0xFFFF + 0xFFFF
    count = 64 * MiB // entry_len + 2
    pos = 0
    for _ in range(count):
        pos = (pos + 7) // 8 * 8
        poke(img, start + pos, SNAPSHOT_HEADER_STRUCT.pack(0, 0, 0xFFFF, 0xFFFF, 0, 0, 0, 0, 0))
        pos += entry_len
    set_header(img, "nb_snapshots", count)
    proc = oracle.qemu_img("info", str(img), ok=(1,))
    assert b"Snapshot table is too big" in proc.stderr
    with pytest.raises(CorruptImageError, match="Snapshot table is too big"):
        parse(img)


def test_too_many_snapshots_and_bad_table_offset(tmp_path: Path) -> None:
    img = oracle.create(tmp_path / "a.qcow2", 4 * MiB)
    oracle.snapshot(img, "create", "s1")
    set_header(img, "nb_snapshots", 65537)
    assert b"Snapshot table too large" in oracle.qemu_img("info", str(img), ok=(1,)).stderr
    with pytest.raises(CorruptImageError, match="Snapshot table too large"):
        parse(img)
    set_header(img, "nb_snapshots", 1)
    set_header(img, "snapshots_offset", raw_header(img)["snapshots_offset"] + 8)
    err = oracle.qemu_img("info", str(img), ok=(1,)).stderr
    assert b"Snapshot table offset invalid" in err
    with pytest.raises(CorruptImageError, match="Snapshot table offset invalid"):
        parse(img)


def test_table_beyond_eof_reads_zeros(tmp_path: Path) -> None:
    img = oracle.create(tmp_path / "a.qcow2", 4 * MiB)
    set_header(img, "nb_snapshots", 2)
    set_header(img, "snapshots_offset", 64 * MiB)
    listed = oracle.snapshot_list(img)  # qemu opens it: two empty entries
    entries = parse(img)
    assert [(e.id, e.name) for e in entries] == [(s["id"], s["name"]) for s in listed]
    assert all(e.l1_table_offset == 0 and e.disk_size is None for e in entries)


def test_lookup_rules_and_new_id() -> None:
    def entry(id_: str, name: str) -> SnapshotEntry:
        return SnapshotEntry(id=id_, name=name, l1_table_offset=0, l1_size=0)

    entries = [entry("1", "2"), entry("2", "a"), entry("7", "1")]
    assert find_snapshot(entries, "2", id_first=True) == 1  # apply: ID first
    assert find_snapshot(entries, "2", id_first=False) == 0  # delete: name first
    assert find_snapshot(entries, "a", id_first=True) == 1
    with pytest.raises(SnapshotNotFoundError):
        find_snapshot(entries, "zz", id_first=True)
    assert new_snapshot_id(entries) == "8"
    assert new_snapshot_id([]) == "1"
    assert new_snapshot_id([entry("abc", "x"), entry("12x", "y")]) == "13"

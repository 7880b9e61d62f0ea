"""Damaged images rebuilt from the qemu-iotests' corruption scenarios (060, 080, ...).

Each :class:`Case` makes its image with ``qemu-img create`` and ``qemu-io`` writes, then
patches metadata with ``struct`` as the iotests' ``poke_file`` does, and names one request
to make on it: the same request is run through ``qemu-io`` (the oracle) and through the
library, on identical copies.  Layout of every base image (64 KiB clusters, 1 MiB disk,
``write -P 7 0 64k``): header 0, reftable 0x10000, refblock 0x20000, L1 0x30000, L2
0x40000, data 0x50000.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.qcow2 import oracle

KiB = 1024
CS = 64 * KiB
REFTABLE, REFBLOCK, L1, L2, DATA = 0x10000, 0x20000, 0x30000, 0x40000, 0x50000
COPIED = 1 << 63
ZERO = 1


def poke(path: Path, offset: int, fmt: str, value: int) -> None:
    """iotests' ``poke_file``: one big-endian value at ``offset``."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(">" + fmt, value))


def peek(path: Path, offset: int, fmt: str = "Q") -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        value: int = struct.unpack(">" + fmt, f.read(struct.calcsize(fmt)))[0]
        return value


@dataclass(frozen=True)
class Case:
    """A damaged image and one request on it.

    ``op`` is a qemu-io command (``read``/``write``/``write -z``/``write -z -u``/
    ``discard`` with offset and length); ``compat`` the image version; ``damage`` patches
    the base image; ``setup`` are qemu-io commands run before the damage (``snapshot``
    adds one); ``opts`` are qcow2 open options (``overlap-check`` ...).
    """

    name: str
    damage: Callable[[Path], None]
    op: str
    compat: str = "1.1"
    setup: tuple[str, ...] = ("write -P 7 0 64k",)
    snapshot: bool = False
    opts: dict[str, str] = field(default_factory=dict)
    #: QEMU writes the new data cluster past the old end of the file before it refuses
    qemu_grows: bool = False
    #: more ``qemu-img create -o`` options (``extended_l2``)
    create: dict[str, str] = field(default_factory=dict)

    def build(self, path: Path) -> Path:
        oracle.create(path, 1024 * KiB, compat=self.compat, **self.create)
        if self.setup:
            oracle.qemu_io(path, *self.setup)
        if self.snapshot:
            # a snapshot, then a write that gives the active L1 its own L2 table
            oracle.qemu_img("snapshot", "-c", "snap", os.fspath(path))
            oracle.qemu_io(path, "write -P 8 0 4k")
        self.damage(path)
        return path

    def image_opts(self, path: Path) -> str:
        """qemu-io's ``--image-opts`` for ``path`` with this case's open options."""
        opts = "".join(f",{key}={value}" for key, value in self.opts.items())
        return f"driver=qcow2,file.filename={os.fspath(path)}{opts}"


def _l1(value: int) -> Callable[[Path], None]:
    return lambda p: poke(p, L1, "Q", value)


def _l2(value: int, index: int = 0) -> Callable[[Path], None]:
    return lambda p: poke(p, L2 + 8 * index, "Q", value)


def _refcount(cluster: int, value: int) -> Callable[[Path], None]:
    return lambda p: poke(p, REFBLOCK + 2 * cluster, "H", value)


def _reftable(value: int) -> Callable[[Path], None]:
    return lambda p: poke(p, REFTABLE, "Q", value)


def _snapshot_l1(p: Path) -> int:
    """Host offset of the first snapshot's L1 table."""
    return peek(p, peek(p, 64))


def _active_l2(p: Path) -> int:
    return peek(p, L1) & 0x00FFFFFFFFFFFE00


def _into_inactive_l2(p: Path) -> None:
    """Active L2[1] points (COPIED) at the snapshot's own L2 table."""
    poke(p, _active_l2(p) + 8, "Q", COPIED | peek(p, _snapshot_l1(p)) & 0x00FFFFFFFFFFFE00)


def _into_inactive_l1(p: Path) -> None:
    poke(p, _active_l2(p) + 8, "Q", COPIED | _snapshot_l1(p))


def _into_snapshot_table(p: Path) -> None:
    poke(p, _active_l2(p) + 8, "Q", COPIED | peek(p, 64))


def _ext_l2(entry: int, bitmap: int) -> Callable[[Path], None]:
    """Extended L2 entry 0 (entry and subcluster bitmap)."""

    def damage(p: Path) -> None:
        poke(p, L2, "Q", entry)
        poke(p, L2 + 8, "Q", bitmap)

    return damage


def _compressed_past_eof(p: Path) -> None:
    """The compressed entry 0 now points at data far past the end of the file."""
    poke(p, L2, "Q", peek(p, L2) & ~((1 << 54) - 1) | 0x3000000)


def unref_inactive_l2(p: Path) -> None:
    """Refcount 0 for the snapshot's own L2 table: the next allocation takes it."""
    l2 = peek(p, _snapshot_l1(p)) & 0x00FFFFFFFFFFFE00
    poke(p, REFBLOCK + 2 * (l2 // CS), "H", 0)


def _zero_refblock(p: Path) -> None:
    with open(p, "r+b") as f:
        f.seek(REFBLOCK)
        f.write(bytes(CS))


CASES = [
    # 060 "unaligned L2 table": fatal on any access of a writable image
    Case("l2_unaligned_read", _l1(COPIED | L2 + 0x200), "read 0 4k"),
    Case("l2_unaligned_write", _l1(COPIED | L2 + 0x200), "write 0 4k"),
    Case("l2_unaligned_read_v2", _l1(COPIED | L2 + 0x200), "read 0 4k", compat="0.10"),
    Case("l2_unaligned_write_v2", _l1(COPIED | L2 + 0x200), "write 0 4k", compat="0.10"),
    # 060 "unaligned L2 entry"
    Case("data_unaligned_read", _l2(COPIED | DATA + 0x200), "read 0 4k"),
    Case("data_unaligned_write", _l2(COPIED | DATA + 0x200), "write 0 4k"),
    Case("data_unaligned_write_v2", _l2(COPIED | DATA + 0x200), "write 0 4k", compat="0.10"),
    Case("data_unaligned_cow", _l2(DATA + 0x200), "write 0 4k"),
    # 060 "non-fatal corruption on freeing": the request succeeds
    Case("data_unaligned_discard", _l2(COPIED | DATA + 0x200), "discard 0 64k"),
    Case("data_unaligned_unmap", _l2(COPIED | DATA + 0x200), "write -z -u 0 64k"),
    Case("data_unaligned_overwrite", _l2(DATA + 0x200), "write 0 64k"),
    # 060 "unaligned pre-allocated zero cluster"
    Case("zero_alloc_unaligned_write", _l2(COPIED | DATA + 0x200 | ZERO), "write 0 4k"),
    Case("zero_alloc_unaligned_read", _l2(COPIED | DATA + 0x200 | ZERO), "read 0 4k"),
    # 060 "L2 reference into L1" and friends: writes in place onto metadata
    Case("l2_into_l1", _l2(COPIED | L1), "write 0 512"),
    Case("l2_into_reftable", _l2(COPIED | REFTABLE), "write 0 512"),
    Case("l2_into_refblock", _l2(COPIED | REFBLOCK), "write 0 512"),
    Case("l2_into_l1_v2", _l2(COPIED | L1), "write 0 512", compat="0.10"),
    # refcount 0 for metadata in use: the allocator hands it out again
    Case("l1_refcount_zero", _refcount(L1 // CS, 0), "write 256k 4k"),
    Case("l2_refcount_zero", _refcount(L2 // CS, 0), "write 128k 4k"),
    Case("refblock_refcount_zero", _refcount(REFBLOCK // CS, 0), "write 128k 4k"),
    # 060 "empty refcount table" / "unaligned reftable entry"
    Case("reftable_entry_zero", _reftable(0), "write 128k 4k"),
    Case("reftable_entry_zero_v2", _reftable(0), "write 128k 4k", compat="0.10"),
    Case("refblock_zeroed", _zero_refblock, "write 128k 4k"),
    Case("reftable_unaligned", _reftable(REFBLOCK + 0x200), "write 128k 4k"),
    Case("reftable_unaligned_read", _reftable(REFBLOCK + 0x200), "read 0 4k"),
    # v2 zero flag (080-like): fatal on use
    Case("v2_zero_flag_read", _l2(COPIED | DATA | ZERO), "read 0 4k", compat="0.10"),
    Case("v2_zero_flag_write", _l2(COPIED | DATA | ZERO), "write 0 4k", compat="0.10"),
]

# 060 "L1 reference into a refcount block": the allocation's refcount update would
# write the block that is also the L2 table (QEMU also writes the data cluster past the
# old end of the file first; we refuse before that)
CASES.append(Case("l1_into_refblock", _l1(COPIED | REFBLOCK), "write 128k 4k", qemu_grows=True))

# overlap-check modes and toggles: "cached" (the default) does not see inactive L2 tables
OVERLAP_CASES = [
    Case("inactive_l2_cached", _into_inactive_l2, "write 64k 512", snapshot=True),
    Case(
        "inactive_l2_all",
        _into_inactive_l2,
        "write 64k 512",
        snapshot=True,
        opts={"overlap-check": "all"},
    ),
    Case(
        "inactive_l2_on",
        _into_inactive_l2,
        "write 64k 512",
        snapshot=True,
        opts={"overlap-check": "cached", "overlap-check.inactive-l2": "on"},
    ),
    Case(
        "inactive_l2_all_off",
        _into_inactive_l2,
        "write 64k 512",
        snapshot=True,
        opts={"overlap-check": "all", "overlap-check.inactive-l2": "off"},
    ),
    Case(
        "inactive_l2_template",
        _into_inactive_l2,
        "write 64k 512",
        snapshot=True,
        opts={"overlap-check.template": "all"},
    ),
    Case("inactive_l1", _into_inactive_l1, "write 64k 512", snapshot=True),
    Case(
        "inactive_l1_off",
        _into_inactive_l1,
        "write 64k 512",
        snapshot=True,
        opts={"overlap-check.inactive-l1": "off"},
    ),
    Case("snapshot_table", _into_snapshot_table, "write 64k 512", snapshot=True),
    Case("l2_into_l1_none", _l2(COPIED | L1), "write 0 512", opts={"overlap-check": "none"}),
    Case(
        "l2_into_l1_no_active_l1",
        _l2(COPIED | L1),
        "write 0 512",
        opts={"overlap-check.active-l1": "off"},
    ),
    Case(
        "l2_refcount_zero_constant",
        _refcount(L2 // CS, 0),
        "write 128k 4k",
        opts={"overlap-check": "constant"},
    ),
]
CASES.extend(OVERLAP_CASES)

_EXTL2 = {"extended_l2": "on"}
CASES += [
    # 060-like: two cases write other messages than reads ("found (" vs "found  (")
    Case(
        "ext_alloc_and_zero_read", _ext_l2(COPIED | DATA, 1 << 32 | 1), "read 0 4k", create=_EXTL2
    ),
    Case(
        "ext_alloc_and_zero_write", _ext_l2(COPIED | DATA, 1 << 32 | 1), "write 0 4k", create=_EXTL2
    ),
    Case("ext_unallocated_bits_read", _ext_l2(0, 1), "read 0 4k", create=_EXTL2),
    Case("ext_unallocated_bits_write", _ext_l2(0, 1), "write 0 4k", create=_EXTL2),
    # a refcount that would drop below 0 on discard: reported, the discard succeeds
    Case(
        "compressed_discard_past_eof",
        _compressed_past_eof,
        "discard 0 64k",
        setup=("write -c -P 7 0 64k",),
    ),
    # more clusters: the one at fault is named, nothing is written before it
    Case(
        "data_unaligned_second_cluster",
        _l2(COPIED | 0x60200, 1),
        "write 0 128k",
        setup=("write -P 7 0 128k",),
    ),
    Case("data_unaligned_discard_v2", _l2(COPIED | DATA + 0x200), "discard 0 64k", compat="0.10"),
    # not corruption for QEMU: reserved bits, clusters past the end of the file
    Case("l2_reserved_bits", _l2(COPIED | DATA | 0x3F00000000000000), "write 0 4k"),
    Case("data_past_eof_write", _l2(COPIED | 0x1000000), "write 0 4k"),
    Case("l2_past_eof_write", _l1(COPIED | 0x1000000), "write 0 4k"),
]

BY_NAME = {case.name: case for case in CASES}


# Hostile sizes and counts (issue 13, "bounded memory and time"): headers and tables that
# claim far more than the file holds.  Not requests to compare with qemu-io: images that
# ``info``/``check``/``map``/``convert``/``amend`` must refuse or get through in bounded
# memory and time.  Base: the snapshot layout of :data:`OVERLAP_CASES` (a snapshot, then a
# write), so the snapshot table has an entry to damage.
HEADER_L1_SIZE, HEADER_REFTABLE_CLUSTERS, HEADER_NB_SNAPSHOTS = 36, 56, 60
SNAPSHOT_L1_SIZE, SNAPSHOT_NAME_SIZE, SNAPSHOT_VMSTATE, SNAPSHOT_EXTRA = 8, 14, 32, 36


def _header(offset: int, fmt: str, value: int) -> Callable[[Path], None]:
    return lambda p: poke(p, offset, fmt, value)


def _snapshot_entry(offset: int, fmt: str, value: int) -> Callable[[Path], None]:
    return lambda p: poke(p, peek(p, 64) + offset, fmt, value)


def _many(*damages: Callable[[Path], None]) -> Callable[[Path], None]:
    def damage(p: Path) -> None:
        for one in damages:
            one(p)

    return damage


def _reftable_all_same(p: Path) -> None:
    """Every entry of the refcount table names the one refcount block."""
    with open(p, "r+b") as f:
        f.seek(REFTABLE)
        f.write(struct.pack(">Q", REFBLOCK) * (CS // 8))


def _compressed_huge(p: Path) -> None:
    """Active L2[1]: a compressed cluster of the largest size the entry can say."""
    poke(p, _active_l2(p) + 8, "Q", 1 << 62 | ((1 << 54) - 1) & ~0xFFFF | DATA)


@dataclass(frozen=True)
class Hostile:
    """A snapshot-bearing image whose metadata ``damage`` makes claim huge sizes."""

    name: str
    damage: Callable[[Path], None]

    def build(self, path: Path) -> Path:
        oracle.create(path, 1024 * KiB, compat="1.1")
        oracle.qemu_io(path, "write -P 7 0 64k")
        oracle.qemu_img("snapshot", "-c", "snap", os.fspath(path))
        oracle.qemu_io(path, "write -P 8 0 4k")
        self.damage(path)
        return path


HOSTILE = [
    Hostile("l1_size_max", _header(HEADER_L1_SIZE, "I", 0x7FFFFFFF)),
    Hostile("l1_size_past_eof", _many(_header(24, "Q", 1 << 50), _header(36, "I", 1 << 21))),
    Hostile("virtual_size_max", _header(24, "Q", (1 << 63) - 1)),
    Hostile("reftable_clusters_max", _header(HEADER_REFTABLE_CLUSTERS, "I", 0xFFFFFFFF)),
    Hostile("reftable_clusters_1m", _header(HEADER_REFTABLE_CLUSTERS, "I", 1 << 20)),
    Hostile("nb_snapshots_max", _header(HEADER_NB_SNAPSHOTS, "I", 0xFFFFFFFF)),
    Hostile("nb_snapshots_65536", _header(HEADER_NB_SNAPSHOTS, "I", 65536)),
    Hostile("snapshot_l1_size_max", _snapshot_entry(SNAPSHOT_L1_SIZE, "I", 0x7FFFFFFF)),
    Hostile("snapshot_l1_size_16m", _snapshot_entry(SNAPSHOT_L1_SIZE, "I", 1 << 24)),
    Hostile("snapshot_extra_max", _snapshot_entry(SNAPSHOT_EXTRA, "I", 0xFFFFFFFF)),
    Hostile("snapshot_name_max", _snapshot_entry(SNAPSHOT_NAME_SIZE, "H", 0xFFFF)),
    Hostile("snapshot_vmstate_max", _snapshot_entry(SNAPSHOT_VMSTATE, "I", 0xFFFFFFFF)),
    Hostile("backing_name_max", _many(_header(8, "Q", 0x200), _header(16, "I", 0xFFFFFFFF))),
    Hostile("header_length_max", _header(100, "I", 0xFFFFFFFF)),
    Hostile("cluster_bits_30", _header(20, "I", 30)),
    Hostile("refcount_order_6", _header(96, "I", 6)),
    Hostile("compressed_size_max", _compressed_huge),
    Hostile("reftable_all_same", _reftable_all_same),
]


def _backing_name(name: bytes) -> Callable[[Path], None]:
    """The header names a backing file ``name`` (raw bytes, stored at 0x800)."""

    def damage(p: Path) -> None:
        with open(p, "r+b") as f:
            f.seek(0x800)
            f.write(name)
        poke(p, 8, "Q", 0x800)
        poke(p, 16, "I", len(name))

    return damage


#: Images on which the fuzzer (tests/qcow2/test_fuzz.py) found a failure, rebuilt.
FUZZ_FINDINGS: list[Hostile] = [
    # a backing file name with a NUL: "internal error: ValueError: embedded null byte";
    # QEMU reads it as a C string ("" is no backing file, "ab\0cd" is "ab")
    Hostile("backing_name_nul", _backing_name(b"\0")),
    Hostile("backing_name_nul_inside", _backing_name(b"ab\0cd")),
    # a refcount table entry with bit 63 set: OverflowError from os.pread; QEMU's reads
    # fail with EIO there ("Can't get refcount for cluster N: Input/output error")
    Hostile("reftable_entry_bit63", lambda p: poke(p, REFTABLE, "Q", peek(p, REFTABLE) | 1 << 63)),
]

"""qcow2 check against qemu-img check 7.2: same JSON, same findings, same exit codes.

Every case builds an image with qemu-img/qemu-io, injects damage by patching bytes, then
runs ``qemu-img check`` and ``qcow2 check`` on identical copies.  Expected values come from
qemu-img, never from this file.  Repairs are judged by qemu-img: after ``qcow2 check -r``
qemu-img must report what it reports after its own repair of the same image.
"""

from __future__ import annotations

import json
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from qcow2.check import check_file
from qcow2.format.header import read_header
from qcow2.io.fileio import HostFile
from tests.helpers import need
from tests.qcow2 import oracle
from tests.qcow2.test_cli import by_name, run_both

MiB = 1024 * 1024
L1 = 0x30000  # fresh qemu-img layout: header, reftable, refblock 0, L1
REFBLOCK = 0x20000
REFTABLE = 0x10000
FIRST_L2 = 0x40000


def u64(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        value: int = struct.unpack(">Q", f.read(8))[0]
    return value


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def make(tmp: Path, *io: str, size: int = 64 * MiB, **opts: object) -> Path:
    img = oracle.create(tmp / "img.qcow2", size, **opts)
    if io:
        oracle.qemu_io(img, *io)
    return img


def update_u64(path: Path, offset: int, change: Callable[[int], int]) -> None:
    """Replace the big-endian u64 at ``offset`` with ``change(old)``."""
    patch(path, offset, struct.pack(">Q", change(u64(path, offset))))


def set_refcount16(path: Path, cluster: int, value: int) -> None:
    """Set the 16-bit refcount of host ``cluster`` in the first refcount block."""
    patch(path, REFBLOCK + cluster * 2, struct.pack(">H", value))


def snapshot_table_offset(path: Path) -> int:
    return u64(path, 64)


# Section: damage builders (each returns the damaged image)


def damaged(*io: str, damage: Callable[[Path], None], **opts: object) -> Callable[[Path], Path]:
    """An image maker: qemu-io runs ``io`` on a new image (``opts``), then ``damage``
    patches it."""

    def maker(tmp: Path) -> Path:
        img = make(tmp, *io, **opts)
        damage(img)
        return img

    return maker


def clean_with_snapshots(tmp: Path) -> Path:
    img = make(tmp, "write 0 128k", "write 10M 64k")
    oracle.snapshot(img, "create", "s1")
    oracle.qemu_io(img, "write 0 64k")
    oracle.snapshot(img, "create", "s2")
    return img


def refcount_too_low(tmp: Path) -> Path:
    img = make(tmp, "write 0 128k")
    oracle.snapshot(img, "create", "s1")
    set_refcount16(img, 5, 1)
    return img


def l1_copied_wrong(tmp: Path) -> Path:
    img = make(tmp, "write 0 128k")
    oracle.snapshot(img, "create", "s1")
    update_u64(img, L1, lambda entry: entry | (1 << 63))
    return img


def with_snapshot(tmp: Path) -> tuple[Path, int]:
    """An image with data and snapshot "s1", and the offset of its snapshot table."""
    img = make(tmp, "write 0 64k")
    oracle.snapshot(img, "create", "s1")
    return img, snapshot_table_offset(img)


def snapshot_damaged(damage: Callable[[Path, int], None]) -> Callable[[Path], Path]:
    """An image maker: :func:`with_snapshot`, then ``damage(image, table_offset)``."""

    def maker(tmp: Path) -> Path:
        img, table = with_snapshot(tmp)
        damage(img, table)
        return img

    return maker


def snapshot_entry_incomplete(tmp: Path) -> Path:
    img, table = with_snapshot(tmp)
    # extra_data_size 24 -> 8: the id/name move up by 16 bytes, as a short entry would be.
    raw = img.read_bytes()
    entry = raw[table : table + 40 + 24 + 2]
    short = entry[:36] + struct.pack(">I", 8) + entry[40:48] + entry[64:66]
    patch(img, table, short + bytes(16))
    return img


def dirty_lazy_refcounts(tmp: Path) -> Path:
    img = make(tmp, lazy_refcounts=True)
    # qemu-io's abort leaves the dirty bit and stale refcounts behind.
    subprocess.run(
        [need("qemu-io"), "-c", "write 0 64k", "-c", "abort", str(img)],
        capture_output=True,
        check=False,
    )
    return img


def extended_l2_bitmap_corrupt(tmp: Path) -> Path:
    img = make(tmp, "write 0 4k", "write -z 64k 64k", extended_l2=True)
    # alloc bit and zero bit both set for subcluster 1 of cluster 0
    bitmap = u64(img, FIRST_L2 + 8)
    patch(img, FIRST_L2 + 8, struct.pack(">Q", bitmap | 2 | (2 << 32)))
    return img


def small_clusters_one_bit(tmp: Path) -> Path:
    return make(tmp, "write 0 10k", cluster_size=512, refcount_bits=1)


def v2_with_snapshot(tmp: Path) -> Path:
    img = make(tmp, "write 0 64k", compat="0.10")
    oracle.snapshot(img, "create", "s1")
    return img


def zstd_compressed(tmp: Path) -> Path:
    return make(tmp, "write -c 0 64k", "write -c 64k 64k", compression_type="zstd")


CASES = {
    **by_name(
        clean_with_snapshots,
        refcount_too_low,
        l1_copied_wrong,
        snapshot_entry_incomplete,
        dirty_lazy_refcounts,
        extended_l2_bitmap_corrupt,
        small_clusters_one_bit,
        v2_with_snapshot,
        zstd_compressed,
    ),
    "snapshot_l1_unaligned": snapshot_damaged(
        lambda img, table: update_u64(img, table, lambda entry: entry + 512)
    ),
    "snapshot_l1_too_large": snapshot_damaged(
        lambda img, table: patch(img, table + 8, struct.pack(">I", 0x7FFFFFF))
    ),
    "snapshot_extra_too_large": snapshot_damaged(
        lambda img, table: patch(img, table + 36, struct.pack(">I", 4096))
    ),
    "leaked_cluster": damaged("write 0 128k", damage=lambda img: set_refcount16(img, 5, 2)),
    "refcount_zero": damaged("write 0 128k", damage=lambda img: set_refcount16(img, 5, 0)),
    "copied_flag_wrong": damaged(
        "write 0 128k",
        damage=lambda img: update_u64(img, FIRST_L2, lambda entry: entry & ~(1 << 63)),
    ),
    "l2_reserved_bits": damaged(
        "write 0 64k", damage=lambda img: update_u64(img, FIRST_L2, lambda entry: entry | 2)
    ),
    "data_unaligned": damaged(
        "write 0 64k", damage=lambda img: update_u64(img, FIRST_L2, lambda entry: entry + 512)
    ),
    "zero_alloc_unaligned": damaged(
        "write 0 64k",
        "write -z 0 64k",
        damage=lambda img: update_u64(img, FIRST_L2, lambda entry: entry + 512),
    ),
    "l2_table_unaligned": damaged(
        "write 0 64k", damage=lambda img: update_u64(img, L1, lambda entry: entry + 512)
    ),
    "l1_reserved_bits": damaged(
        "write 0 64k", damage=lambda img: update_u64(img, L1, lambda entry: entry | 1)
    ),
    "refblock_outside_image": damaged(
        "write 0 64k", damage=lambda img: patch(img, REFTABLE + 8, struct.pack(">Q", 0x1000000))
    ),
    "refblock_unaligned": damaged(
        "write 0 64k", damage=lambda img: patch(img, REFTABLE, struct.pack(">Q", REFBLOCK + 512))
    ),
    "reftable_reserved_bits": damaged(
        "write 0 64k", damage=lambda img: patch(img, REFTABLE, struct.pack(">Q", REFBLOCK | 1))
    ),
    "l2_beyond_eof": damaged(
        "write 0 64k",
        damage=lambda img: patch(img, FIRST_L2, struct.pack(">Q", (1 << 63) | 0x10000000)),
    ),
    "compressed_leak": damaged(
        "write -c 0 64k",
        "write -c 64k 64k",
        "write 1M 64k",
        damage=lambda img: set_refcount16(img, 4, 9),
    ),
    "compressed_copied": damaged(
        "write -c 0 64k",
        damage=lambda img: update_u64(img, FIRST_L2, lambda entry: entry | (1 << 63)),
    ),
    "refcount_bits_64_leak": damaged(
        "write 0 100k",
        refcount_bits=64,
        damage=lambda img: patch(img, REFBLOCK + 5 * 8, struct.pack(">Q", 7)),
    ),
}


def _stderr_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line]


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("output", ["json", "human"])
def test_check_matches_qemu_img(tmp_path: Path, case: str, output: str) -> None:
    img = CASES[case](tmp_path)
    before = img.read_bytes()
    theirs, ours, _, mine = run_both(img, "check", f"--output={output}")
    assert ours.code == theirs.code
    if output == "json" and theirs.out:
        assert json.loads(ours.out) == json.loads(theirs.out)
        assert ours.out == theirs.out  # key order and layout too
    else:
        assert ours.out == theirs.out
    assert _stderr_lines(ours.err) == _stderr_lines(theirs.err)
    assert "Traceback" not in ours.err
    assert mine.read_bytes() == before, "check without -r must not write"


REPAIR_CASES = [
    "leaked_cluster",
    "refcount_too_low",
    "refcount_zero",
    "copied_flag_wrong",
    "l1_copied_wrong",
    "zero_alloc_unaligned",
    "data_unaligned",
    "refblock_outside_image",
    "refblock_unaligned",
    "reftable_reserved_bits",
    "snapshot_l1_unaligned",
    "snapshot_entry_incomplete",
    "snapshot_extra_too_large",
    "compressed_leak",
    "dirty_lazy_refcounts",
    "refcount_bits_64_leak",
]


@pytest.mark.parametrize("case", REPAIR_CASES)
@pytest.mark.parametrize("mode", ["leaks", "all"])
def test_repair_matches_qemu_img(tmp_path: Path, case: str, mode: str) -> None:
    img = CASES[case](tmp_path)
    theirs, ours, q, o = run_both(img, "check", "-r", mode, "--output=json")
    assert ours.code == theirs.code
    assert _stderr_lines(ours.err) == _stderr_lines(theirs.err)
    if theirs.out:
        assert json.loads(ours.out) == json.loads(theirs.out)
    # qemu-img is the judge of both repaired images.
    after_theirs = oracle.check(q)
    after_ours = oracle.check(o)
    for result in (after_theirs, after_ours):
        result.pop("filename", None)
        result.pop("stderr")
    assert after_ours == after_theirs
    if after_theirs["exit-code"] == 0:
        assert oracle.convert(o) == oracle.convert(q)


def test_qemu_img_repair_is_judged_clean_by_us(tmp_path: Path) -> None:
    img = CASES["leaked_cluster"](tmp_path)
    oracle.check(img, repair="all")
    f = HostFile(str(img), writable=False)
    try:
        result = check_file(f, read_header(f))
    finally:
        f.close()
    assert result.exit_code == 0 and not result.messages


def test_repair_needs_a_writable_handle(tmp_path: Path) -> None:
    from qcow2.errors import ReadOnlyError

    img = CASES["leaked_cluster"](tmp_path)
    f = HostFile(str(img), writable=False)
    try:
        with pytest.raises(ReadOnlyError):
            check_file(f, read_header(f), "leaks")
    finally:
        f.close()


def test_many_snapshots_sharing_tables_count_every_reference(tmp_path: Path) -> None:
    """Shared L2 tables are scanned once but counted per L1: refcounts stay exact."""
    img = make(tmp_path, "write 0 256k")
    for i in range(5):
        oracle.snapshot(img, "create", f"s{i}")
    oracle.snapshot(img, "delete", "s2")
    # One reference too many on a data cluster shared by the active L1 and 4 snapshots.
    data = u64(img, FIRST_L2) & 0x00FFFFFFFFFFFE00
    cluster = data >> 16
    patch(img, REFBLOCK + cluster * 2, struct.pack(">H", 6))
    theirs, ours, _, _ = run_both(img, "check", "--output=json")
    assert (ours.code, ours.out) == (theirs.code, theirs.out)
    assert _stderr_lines(ours.err) == _stderr_lines(theirs.err)
    assert f"Leaked cluster {cluster} refcount=6 reference=5" in ours.err


def test_image_check_api_reports_qemu_img_fields(tmp_path: Path) -> None:
    import qcow2

    img = CASES["leaked_cluster"](tmp_path)
    twin = tmp_path / "twin.qcow2"
    twin.write_bytes(img.read_bytes())
    expected = oracle.check(img)
    with qcow2.open(str(img)) as image:
        result = image.check()
    volatile = ("filename", "exit-code", "stderr")
    assert {k: v for k, v in result.to_json().items() if k != "filename"} == {
        k: v for k, v in expected.items() if k not in volatile
    }
    assert result.exit_code == expected["exit-code"]
    expected_repair = oracle.check(twin, repair="leaks")
    with qcow2.open(str(img), writable=True) as image:
        repaired = image.check("leaks")
    assert {k: v for k, v in repaired.to_json().items() if k != "filename"} == {
        k: v for k, v in expected_repair.items() if k not in volatile
    }
    assert oracle.check(img)["exit-code"] == oracle.check(twin)["exit-code"]


def test_dirty_image_is_repaired_on_writable_open(tmp_path: Path) -> None:
    """core opens dirty images through check's repair entry point, as QEMU does."""
    import qcow2

    img = dirty_lazy_refcounts(tmp_path)
    before = oracle.check(img)
    assert before["exit-code"] == 2
    data = oracle.convert(img)
    with qcow2.open(str(img), writable=True):
        pass
    assert oracle.check(img)["exit-code"] == 0
    assert oracle.info(img)["dirty-flag"] is False
    assert oracle.convert(img) == data


def _fuzzed_images(base: bytes, count: int, seed: int) -> list[bytes]:
    """Images with a few random bytes of metadata (header, reftable, refblock, L1, L2,
    snapshot table) overwritten; deterministic for a seed."""
    import random

    rng = random.Random(seed)
    regions = [(0, 112), (REFTABLE, 64), (REFBLOCK, 64), (L1, 64), (FIRST_L2, 256)]
    table = int.from_bytes(base[64:72], "big")
    regions.append((table, 80))
    out = []
    for _ in range(count):
        raw = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            start, length = rng.choice(regions)
            pos = start + rng.randrange(length)
            raw[pos] = rng.randrange(256)
        out.append(bytes(raw))
    return out


@pytest.mark.parametrize("seed", range(4))
def test_fuzzed_metadata_gives_qemu_img_output(tmp_path: Path, seed: int) -> None:
    """Random metadata damage: check, info and map print exactly what qemu-img prints."""
    img = clean_with_snapshots(tmp_path)
    base = img.read_bytes()
    failures = []
    commands = [("check", "--output=json"), ("check",), ("info", "--output=json"), ("map",)]
    for i, data in enumerate(_fuzzed_images(base, 8, seed)):
        case = tmp_path / f"case{i}"
        case.mkdir()
        path = case / "img.qcow2"
        path.write_bytes(data)
        for command in commands:
            theirs, ours, _, mine = run_both(path, *command)
            assert "Traceback" not in ours.err
            assert mine.read_bytes() == data
            if (ours.code, ours.out, ours.err) != (theirs.code, theirs.out, theirs.err):
                failures.append((i, command, theirs.code, ours.code, theirs.err, ours.err))
    assert not failures, failures


def test_one_l2_table_behind_every_l1_entry(tmp_path: Path) -> None:
    """A hostile L1 whose 512 entries all name the same L2 table: every reference is
    counted and reported as qemu-img does (the table is scanned once, not 512 times)."""
    img = make(tmp_path, "write 0 4k", size=1024 * MiB, cluster_size=4096)
    l1_offset = u64(img, 40)
    l1_size = int.from_bytes(img.read_bytes()[36:40], "big")
    first = u64(img, l1_offset)
    assert l1_size == 512 and first
    patch(img, l1_offset, struct.pack(f">{l1_size}Q", *([first] * l1_size)))
    for args in (("check", "--output=json"), ("check", "-r", "all", "--output=json")):
        theirs, ours, q, o = run_both(img, *args)
        assert (ours.code, ours.out) == (theirs.code, theirs.out)
        assert _stderr_lines(ours.err) == _stderr_lines(theirs.err)
    assert oracle.check(o)["exit-code"] == oracle.check(q)["exit-code"]

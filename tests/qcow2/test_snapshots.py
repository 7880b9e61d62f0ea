"""Internal snapshots, differential against qemu-img in both directions."""

from __future__ import annotations

from pathlib import Path

import pytest

import qcow2
from qcow2.errors import SnapshotError, SnapshotNotFoundError
from tests.qcow2 import oracle

MiB = 1024 * 1024


def names(path: Path) -> list[tuple[str, str]]:
    return [(s["id"], s["name"]) for s in oracle.snapshot_list(path)]


@pytest.mark.parametrize(("compat", "cluster_size", "extended_l2"), oracle.LAYOUTS)
def test_our_snapshots_as_qemu_sees_them(
    tmp_path: Path, compat: str, cluster_size: int, extended_l2: bool
) -> None:
    img = oracle.create_layout(tmp_path / "a.qcow2", 4 * MiB, compat, cluster_size, extended_l2)
    oracle.qemu_io(img, "write -P 0x11 0 200k")
    expected: dict[str, bytes] = {}
    with qcow2.open(str(img), writable=True) as image:
        image.create_snapshot("one")
        expected["one"] = oracle.convert(img, force_share=True)  # the state when taken
    oracle.assert_clean(img)
    oracle.qemu_io(img, "write -P 0x22 100k 300k", "write -z 0 4k")
    with qcow2.open(str(img), writable=True) as image:
        image.create_snapshot("two")
        image.write(3 * MiB, b"\x33" * 5000)
        image.create_snapshot("one")  # duplicate names are allowed, like qemu
    oracle.assert_clean(img)
    assert names(img) == [("1", "one"), ("2", "two"), ("3", "one")]
    current = oracle.convert(img)
    assert oracle.convert(img, snapshot_id="1") == expected["one"]
    assert oracle.convert(img, snapshot="two") != current
    with qcow2.open(str(img), writable=True) as image:
        # Views read what qemu-img convert -l reads.
        for sid in ("1", "2", "3"):
            view = image.snapshot(sid).read(0, 4 * MiB)
            assert view == oracle.convert(img, snapshot_id=sid, force_share=True)
        image.apply_snapshot("1")  # ID first
        assert image.read(0, 4 * MiB) == expected["one"]
    oracle.assert_clean(img)
    assert oracle.convert(img) == expected["one"]
    # qemu-img can apply and delete what we made.
    oracle.snapshot(img, "apply", "two")
    oracle.assert_clean(img)
    oracle.snapshot(img, "delete", "two")
    oracle.assert_clean(img)


def test_delete_frees_exactly(tmp_path: Path) -> None:
    img = oracle.create(tmp_path / "a.qcow2", 4 * MiB, cluster_size=4096)
    oracle.qemu_io(img, "write -P 0x11 0 1M")
    start = oracle.check(img)
    with qcow2.open(str(img), writable=True) as image:
        image.create_snapshot("s")
        image.write(0, b"\x99" * 300 * 1024)  # COW: the snapshot keeps the old clusters
    grown = oracle.assert_clean(img)
    assert grown["image-end-offset"] > start["image-end-offset"]
    with qcow2.open(str(img), writable=True) as image:
        image.delete_snapshot("s")
    after = oracle.assert_clean(img)  # no leaks: every snapshot-only cluster went back
    assert after["allocated-clusters"] == start["allocated-clusters"]
    # Same sequence through qemu-img: the same clusters are allocated afterwards.
    twin = oracle.create(tmp_path / "b.qcow2", 4 * MiB, cluster_size=4096)
    oracle.qemu_io(twin, "write -P 0x11 0 1M")
    oracle.snapshot(twin, "create", "s")
    oracle.qemu_io(twin, "write -P 0x99 0 300k")
    oracle.snapshot(twin, "delete", "s")
    assert oracle.check(twin)["allocated-clusters"] == after["allocated-clusters"]
    assert oracle.convert(twin) == oracle.convert(img)


def test_qemu_snapshots_applied_and_deleted_by_us(tmp_path: Path) -> None:
    img = oracle.create(tmp_path / "a.qcow2", 4 * MiB)
    contents = {}
    for i, name in enumerate(["2", "a", "1"]):  # names that look like IDs
        oracle.qemu_io(img, f"write -P {0x40 + i} {i * 64}k 100k")
        oracle.snapshot(img, "create", name)
        contents[name] = oracle.convert(img)
    oracle.qemu_io(img, "write -c -P 0x77 1M 64k", "discard 0 64k")
    twin = tmp_path / "twin.qcow2"
    twin.write_bytes(img.read_bytes())
    # apply "2": qemu matches the ID first (ID 2 is named "a")
    oracle.snapshot(twin, "apply", "2")
    with qcow2.open(str(img), writable=True) as image:
        image.apply_snapshot("2")
    oracle.assert_clean(img)
    assert oracle.convert(img) == oracle.convert(twin) == contents["a"]
    # delete "1": qemu-img matches the name (ID 3), not ID 1.
    oracle.snapshot(twin, "delete", "1")
    with qcow2.open(str(img), writable=True) as image:
        image.delete_snapshot("1")
        with pytest.raises(SnapshotNotFoundError):
            image.delete_snapshot("no such")
    oracle.assert_clean(img)
    assert names(img) == names(twin) == [("1", "2"), ("2", "a")]
    # New IDs are max + 1 over what is left (a gap stays a gap), like qemu's.
    oracle.snapshot(twin, "delete", "2")
    with qcow2.open(str(img), writable=True) as image:
        image.delete_snapshot("2")
        image.create_snapshot("again")
        image.create_snapshot("more")
    oracle.snapshot(twin, "create", "again")
    oracle.snapshot(twin, "create", "more")
    assert names(img) == names(twin)
    with qcow2.open(str(img), writable=True) as image:
        for name in ("a", "again", "more"):
            image.delete_snapshot(name)
        assert image.snapshots == []
    oracle.assert_clean(img)
    assert oracle.convert(img) == contents["a"]


def test_apply_restores_disk_size(tmp_path: Path) -> None:
    img = oracle.create(tmp_path / "a.qcow2", 2 * MiB)
    oracle.qemu_io(img, "write -P 0x61 0 2M")
    with qcow2.open(str(img), writable=True) as image:
        image.create_snapshot("small")
    oracle.qemu_img("resize", str(img), "6M")
    oracle.qemu_io(img, "write -P 0x62 5M 1M")
    small = oracle.convert(img, snapshot="small")  # qemu pads to the current size
    with qcow2.open(str(img), writable=True) as image:
        view = image.snapshot("small")
        assert view.virtual_size == 2 * MiB
        assert view.read(0, 6 * MiB) == small[: 2 * MiB]
        image.apply_snapshot("small")
        assert image.virtual_size == 2 * MiB
    oracle.assert_clean(img)
    assert oracle.info(img)["virtual-size"] == 2 * MiB
    assert oracle.convert(img) == small[: 2 * MiB]


def test_snapshot_view_falls_through_to_backing(tmp_path: Path) -> None:
    base = oracle.create(tmp_path / "base.qcow2", 1 * MiB)
    oracle.qemu_io(base, "write -P 0x10 0 1M")
    top = tmp_path / "top.qcow2"
    oracle.qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    oracle.qemu_io(top, "write -P 0x20 64k 64k")
    with qcow2.open(str(top), writable=True) as image:
        image.create_snapshot("s")
        image.write(0, b"\x30" * 4096)
        assert image.snapshot("s").read(0, MiB) == oracle.convert(
            top, snapshot="s", force_share=True
        )
    oracle.assert_clean(top)


@pytest.mark.parametrize(("bits", "allowed"), [(1, 0), (2, 2)])
def test_refcount_overflow_fails_cleanly(tmp_path: Path, bits: int, allowed: int) -> None:
    img = oracle.create(tmp_path / "a.qcow2", 1 * MiB, refcount_bits=bits)
    oracle.qemu_io(img, "write -P 0x5 0 64k")
    with qcow2.open(str(img), writable=True) as image:
        for i in range(allowed):
            image.create_snapshot(f"s{i}")
        with pytest.raises(SnapshotError, match="refcount"):
            image.create_snapshot("overflow")
    # Like qemu no snapshot, content intact; unlike qemu not even a leak (refused before
    # anything was written).
    assert len(names(img)) == allowed
    oracle.assert_clean(img)
    assert oracle.convert(img)[:65536] == b"\x05" * 65536
    twin = oracle.create(tmp_path / "b.qcow2", 1 * MiB, refcount_bits=bits)
    oracle.qemu_io(twin, "write -P 0x5 0 64k")
    for i in range(allowed):
        oracle.snapshot(twin, "create", f"s{i}")
    proc = oracle.qemu_img("snapshot", "-c", "overflow", str(twin), ok=(1,))
    assert b"Could not create snapshot" in proc.stderr  # qemu refuses the same one


def test_bad_snapshot_requests_fail_cleanly(tmp_path: Path) -> None:
    img = oracle.create(tmp_path / "a.qcow2", 1 * MiB)
    oracle.qemu_io(img, "write -P 0x8 0 64k")
    before = img.read_bytes()
    with qcow2.open(str(img), writable=True) as image:
        for bad in ("", "x" * 65536):
            with pytest.raises(SnapshotError, match="invalid snapshot name"):
                image.create_snapshot(bad)
        with pytest.raises(SnapshotNotFoundError):
            image.apply_snapshot("missing")
        with pytest.raises(SnapshotNotFoundError):
            image.snapshot("missing")
    assert img.read_bytes() == before  # nothing was allocated or written


def test_delete_falls_back_to_id(tmp_path: Path) -> None:
    """Name first, then ID (qemu's qcow2 driver rule; qemu-img 7.2's -d only matches names)."""
    img = oracle.create(tmp_path / "a.qcow2", 1 * MiB)
    oracle.snapshot(img, "create", "first")
    oracle.snapshot(img, "create", "second")
    with qcow2.open(str(img), writable=True) as image:
        image.delete_snapshot("1")
    assert names(img) == [("2", "second")]
    oracle.assert_clean(img)


def test_corrupt_snapshot_l1_refused_like_qemu(tmp_path: Path) -> None:
    from qcow2.errors import CorruptImageError
    from qcow2.format.layout import field_offset, field_struct

    img = oracle.create(tmp_path / "a.qcow2", 1 * MiB)
    oracle.qemu_io(img, "write -P 0x8 0 64k")
    oracle.snapshot(img, "create", "s")
    raw = img.read_bytes()
    table = field_struct("snapshots_offset").unpack_from(raw, field_offset("snapshots_offset"))[0]
    with img.open("r+b") as f:  # l1_table_offset of entry 0, off by 512 bytes
        f.seek(table)
        f.write((int.from_bytes(raw[table : table + 8], "big") + 512).to_bytes(8, "big"))
    proc = oracle.qemu_img("snapshot", "-a", "s", str(img), ok=(1,))
    assert b"Snapshot L1 table offset invalid" in proc.stderr
    before = img.read_bytes()
    with qcow2.open(str(img), writable=True) as image:
        for action in (image.apply_snapshot, image.delete_snapshot, image.snapshot):
            with pytest.raises(CorruptImageError, match="Snapshot L1 table offset invalid"):
                action("s")
    assert img.read_bytes() == before


def test_overflow_midway_rolls_back(tmp_path: Path) -> None:
    """A cluster raised before the overflowing one is lowered again: no stale COPIED."""
    img = oracle.create(tmp_path / "a.qcow2", 1 * MiB, refcount_bits=2)
    oracle.qemu_io(img, "write -P 0xa 64k 64k")
    with qcow2.open(str(img), writable=True) as image:
        image.create_snapshot("s0")
        image.create_snapshot("s1")  # the cluster at 64k now has refcount 3 = max
        image.write(0, b"\x0c" * 65536)  # a fresh cluster before it, refcount 1
        with pytest.raises(SnapshotError, match="refcount"):
            image.create_snapshot("s2")
        image.write(0, b"\x0d" * 10)  # still written in place: COPIED stayed right
    oracle.assert_clean(img)
    assert names(img) == [("1", "s0"), ("2", "s1")]
    assert oracle.convert(img)[:10] == b"\x0d" * 10


def test_replace_drops_every_snapshot_of_the_name_in_one_switch(tmp_path: Path) -> None:
    """``create_snapshot(name, replace=True)``: the snapshots named ``name`` (qemu allows
    duplicates) give way to one new snapshot of the current state, in a single header
    write; the other snapshots and their data stay; nothing leaks."""
    from qcow2.snapshots import create_snapshot

    img = oracle.create(tmp_path / "a.qcow2", 4 * MiB, cluster_size=4096)
    oracle.qemu_io(img, "write -P 0x11 0 64k")
    oracle.snapshot(img, "create", "a")
    oracle.qemu_io(img, "write -P 0x22 16k 64k")
    oracle.snapshot(img, "create", "b")
    oracle.qemu_io(img, "write -P 0x33 32k 64k")
    oracle.snapshot(img, "create", "a")
    oracle.qemu_io(img, "write -P 0x44 48k 8k")
    b_before = oracle.convert(img, snapshot="b")
    current = oracle.convert(img)
    header_writes: list[int] = []
    with qcow2.open(str(img), writable=True) as image:
        image.file.observers.append(
            lambda ev: (
                header_writes.append(ev.offset) if ev.kind == "write" and ev.offset < 512 else None
            )
        )
        create_snapshot(image, "a", replace=True)
    assert len(header_writes) == 1  # one switch
    oracle.assert_clean(img)
    assert [n for _, n in names(img)] == ["b", "a"]
    assert oracle.convert(img, snapshot="a") == current
    assert oracle.convert(img, snapshot="b") == b_before
    assert oracle.convert(img) == current
    with qcow2.open(str(img), writable=True) as image:  # without replace: a duplicate
        create_snapshot(image, "b")
    assert [n for _, n in names(img)] == ["b", "a", "b"]

"""Snapshots created with other content than the active state (``create_snapshot(content=)``):
the snapshot holds the active state plus the writes, the active state is unchanged, and
qemu-img agrees about both, about the refcounts and about the COPIED flags."""

from __future__ import annotations

from pathlib import Path

import pytest

import qcow2
from tests.qcow2 import oracle

MiB = 1024 * 1024


def _apply(base: bytes, writes: list[tuple[int, bytes]]) -> bytes:
    out = bytearray(base)
    for offset, data in writes:
        out[offset : offset + len(data)] = data
    return bytes(out)


@pytest.mark.parametrize(("compat", "cluster_size", "extended_l2"), oracle.LAYOUTS)
def test_snapshot_holds_the_given_content(
    tmp_path: Path, compat: str, cluster_size: int, extended_l2: bool
) -> None:
    img = oracle.create_layout(tmp_path / "a.qcow2", 4 * MiB, compat, cluster_size, extended_l2)
    oracle.qemu_io(img, "write -P 0x11 0 200k", "write -P 0x44 3M 64k")
    with qcow2.open(str(img), writable=True) as image:
        image.create_snapshot("plain")
    active = oracle.convert(img, force_share=True)
    # within allocated clusters, across a cluster border, into unallocated space and
    # over a cluster shared with snapshot "plain"
    writes = [
        (100, b"\xaa" * 300),
        (cluster_size - 7, b"\xbb" * 20),
        (2 * MiB + 5, b"\xcc" * 4000),
        (3 * MiB + 1000, b"\xdd" * 10),
        (150, b"\xee" * 10),  # later writes win
    ]
    with qcow2.open(str(img), writable=True) as image:
        image.create_snapshot("past", content=writes)
        assert image.read(0, 4 * MiB) == active
    oracle.assert_clean(img)
    assert oracle.convert(img, force_share=True) == active
    assert oracle.convert(img, snapshot="past") == _apply(active, writes)
    assert oracle.convert(img, snapshot="plain") == active
    # the active state is still writable in place of the shared clusters, and deleting
    # the diverted snapshot leaves nothing behind
    oracle.qemu_io(img, "write -P 0x55 0 64k")
    oracle.assert_clean(img)
    with qcow2.open(str(img), writable=True) as image:
        image.delete_snapshot("past")
        image.delete_snapshot("plain")
    result = oracle.assert_clean(img)
    assert result.get("leaks", 0) == 0


def test_replace_with_content_keeps_one_snapshot(tmp_path: Path) -> None:
    img = oracle.create(tmp_path / "a.qcow2", 1 * MiB)
    oracle.qemu_io(img, "write -P 0x11 0 128k")
    with qcow2.open(str(img), writable=True) as image:
        image.create_snapshot("t")
        image.create_snapshot("t", replace=True, content=[(0, b"\x99" * 512)])
        image.apply_snapshot("t")
        assert image.read(0, 513) == b"\x99" * 512 + b"\x11"
    assert [s["name"] for s in oracle.snapshot_list(img)] == ["t"]
    oracle.assert_clean(img)


def test_content_beyond_the_disk_is_refused_untouched(tmp_path: Path) -> None:
    img = oracle.create(tmp_path / "a.qcow2", 1 * MiB)
    before = img.read_bytes()
    with qcow2.open(str(img), writable=True) as image, pytest.raises(qcow2.Qcow2Error):
        image.create_snapshot("t", content=[(MiB - 10, b"x" * 20)])
    assert img.read_bytes() == before

"""Persistent dirty bitmaps (made by qemu-img) survive what does not change guest data.

The library does not maintain bitmaps.  Snapshot create/delete and metadata-only changes
keep them as qemu-img does (incremental backups depend on them); snapshot apply is refused
with qemu-img's own error; resize is refused (qemu-img resizes them); guest writes mark
them inconsistent by clearing autoclear bit 0, as the qcow2 spec asks of programs without
bitmap support, which costs leaks but never corruption.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

import qcow2
from tests.qcow2 import oracle
from tests.qcow2.test_cli import (  # noqa: F401 - restore_cwd is an autouse fixture
    restore_cwd,
    run_both,
    run_cli,
    run_qemu_img,
)

MiB = 1 << 20


@pytest.fixture()
def image(tmp_path: Path) -> Path:
    """Data, an enabled bitmap that saw writes, a disabled one, and a snapshot."""
    img = oracle.create(tmp_path / "img.qcow2", 64 * MiB)
    oracle.qemu_io(img, "write -P 1 0 1M")
    oracle.qemu_img("bitmap", "--add", str(img), "tracked")
    oracle.qemu_img("bitmap", "--add", "--disable", str(img), "frozen")
    oracle.qemu_io(img, "write -P 2 4M 2M")
    oracle.snapshot(img, "create", "before")
    return img


def bitmaps(path: Path) -> list[dict[str, Any]]:
    info = json.loads(oracle.qemu_img("info", "--output=json", "-U", str(path)).stdout)
    found: list[dict[str, Any]] = info["format-specific"]["data"].get("bitmaps", [])
    return found


def check_code(path: Path) -> int:
    return run_qemu_img("check", str(path)).code


@pytest.mark.parametrize(
    "args",
    [
        ("snapshot", "-c", "after"),
        ("snapshot", "-d", "before"),
        ("amend", "-o", "lazy_refcounts=on"),
    ],
    ids=lambda a: " ".join(a),
)
def test_metadata_changes_keep_bitmaps_like_qemu_img(image: Path, args: tuple[str, ...]) -> None:
    expected = bitmaps(image)
    assert [b["name"] for b in expected] == ["tracked", "frozen"]
    theirs, ours, q, o = run_both(image, *args)
    assert (ours.code, ours.out, ours.err) == (theirs.code, theirs.out, theirs.err)
    assert bitmaps(o) == bitmaps(q) == expected
    assert check_code(o) == check_code(q) == 0


def test_snapshot_apply_is_refused_like_qemu_img(image: Path) -> None:
    before = image.read_bytes()
    theirs, ours, _, o = run_both(image, "snapshot", "-a", "before")
    assert theirs.code == 1 and "Device has active dirty bitmaps" in theirs.err
    assert (ours.code, ours.out, ours.err) == (theirs.code, theirs.out, theirs.err)
    assert o.read_bytes() == before


def test_resize_is_refused_and_changes_nothing(image: Path) -> None:
    before = image.read_bytes()
    run = run_cli("resize", str(image), "+1M")
    assert run.code == 1 and run.err.count("\n") == 1
    assert "persistent dirty bitmaps" in run.err
    assert image.read_bytes() == before
    with qcow2.open(image, writable=True) as img, pytest.raises(qcow2.UnsupportedFeatureError):
        img.resize(128 * MiB)
    assert bitmaps(image) and check_code(image) == 0


def test_writable_open_without_changes_keeps_bitmaps(image: Path) -> None:
    expected = bitmaps(image)
    with qcow2.open(image, writable=True) as img:
        assert img.read(0, 4096) == b"\x01" * 4096
    assert bitmaps(image) == expected
    assert check_code(image) == 0


@pytest.mark.parametrize("how", ["write", "commit_atomically", "discard"])
def test_guest_writes_mark_bitmaps_inconsistent_without_corruption(
    image: Path, tmp_path: Path, how: str
) -> None:
    with qcow2.open(image, writable=True) as img:
        if how == "write":
            img.write(8 * MiB, b"x" * 4096)
        elif how == "commit_atomically":
            img.commit_atomically([(8 * MiB, b"x" * 4096)])
        else:
            img.discard(0, 1 * MiB)
    assert bitmaps(image) == []  # QEMU ignores them now (autoclear bit 0 is clear)
    assert check_code(image) == 3  # their clusters are leaks, nothing is corrupt
    repaired = tmp_path / "repaired.qcow2"
    shutil.copyfile(image, repaired)
    assert run_cli("check", "-r", "leaks", str(repaired)).code == 0
    assert check_code(repaired) == 0

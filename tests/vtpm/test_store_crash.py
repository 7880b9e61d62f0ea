"""Crash consistency of the store: a section replace is all or nothing.

An observer on the image's host file records every write/flush of one store operation;
each prefix of that log (and the variant where only the last unflushed write landed) is
replayed onto a copy of the image taken before the operation.  Every replayed image must be
``qemu-img check`` clean (leaks allowed: clusters allocated by an unfinished commit) and
must hold, as qemu-img reads it and as the Store reads it, exactly the old or the new state.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from qcow2.io.fileio import WriteEvent
from tests.qcow2 import oracle
from tests.writelog import all_crash_variants, replay
from vtpm_qcow.errors import StoreError
from vtpm_qcow.state import linear
from vtpm_qcow.state.store import Store


def layout_of_disk(disk: bytes) -> bytes:
    return disk[: linear.parse_header(disk).end] if linear.is_formatted(disk) else b""


def prepared(tmp_path: Path) -> Path:
    """An image with permall followed by volatilestate, and a snapshot of that state."""
    path = tmp_path / "base.qcow2"
    with Store.create(path) as store:
        store.write_section("permall", b"P" * 1500)
        store.write_section("volatilestate", b"V" * 5000)
        store.create_snapshot("snap")
        store.write_section("permall", b"p" * 1700)
    return path


OPERATIONS: dict[str, Callable[[Store], None]] = {
    # permall outgrows its section: volatilestate moves down, permall goes last (3 extents)
    "grow-and-relocate": lambda s: s.write_section("permall", b"G" * 6000),
    "import": lambda s: s.replace_layout(
        linear.apply_update(
            linear.empty_layout(),
            linear.store_section(linear.empty_layout(), "savestate", b"S" * 9000),
        )
    ),
    "apply-snapshot": lambda s: s.apply_snapshot("snap"),
    "delete-section": lambda s: s.delete_section("permall"),
}


@pytest.mark.parametrize("operation", list(OPERATIONS))
def test_every_crash_point_leaves_old_or_new_state(tmp_path: Path, operation: str) -> None:
    path = prepared(tmp_path)
    base = path.read_bytes()
    events: list[WriteEvent] = []
    with Store.open(path) as store:
        old = store.layout()
        store.image.file.observers.append(events.append)
        OPERATIONS[operation](store)
        new = store.layout()
    assert old != new and any(ev.kind == "write" for ev in events)
    target = tmp_path / "crashed.qcow2"
    seen = set()
    for variant in all_crash_variants(events):
        replay(base, variant, target)
        result = oracle.check(target)
        assert result["exit-code"] in (oracle.CHECK_CLEAN, oracle.CHECK_LEAKS), result["stderr"]
        theirs = layout_of_disk(oracle.convert(target))
        assert theirs in (old, new), f"{operation}: torn state after {len(variant)} events"
        shutil.copy(target, tmp_path / "reopened.qcow2")
        with Store.open(tmp_path / "reopened.qcow2") as store:  # rolls forward, repairs
            ours = store.layout()
        # qemu-img knows no commit records: it may see the old state where the store,
        # rolling forward, sees the new one, never the other way round.
        assert ours in (old, new), f"{operation}: torn state after {len(variant)} events"
        assert not (theirs == new and ours == old), f"{operation}: rolled back"
        seen.add(ours == new)
    replay(base, events, target)
    with Store.open(target) as store:
        assert store.layout() == new, "the complete operation must read as new"
    assert seen == {False, True}  # the log really spans the switch from old to new


def test_snapshot_overwrite_never_loses_the_tag(tmp_path: Path) -> None:
    """``create_snapshot(tag, overwrite=True)`` is one switch: after a crash at any point
    the tag exists exactly once and holds the old snapshot's state or the current one."""
    path = prepared(tmp_path)
    base = path.read_bytes()
    events: list[WriteEvent] = []
    old_snap = layout_of_disk(oracle.convert(path, snapshot="snap"))
    with Store.open(path) as store:
        current = store.layout()
        store.image.file.observers.append(events.append)
        store.create_snapshot("snap", overwrite=True)
    assert old_snap != current and any(ev.kind == "write" for ev in events)
    assert [s["name"] for s in oracle.snapshot_list(path)] == ["snap"]
    assert layout_of_disk(oracle.convert(path, snapshot="snap")) == current
    target = tmp_path / "crashed.qcow2"
    seen = set()
    for variant in all_crash_variants(events):
        replay(base, variant, target)
        result = oracle.check(target)
        assert result["exit-code"] in (oracle.CHECK_CLEAN, oracle.CHECK_LEAKS), result["stderr"]
        assert [s["name"] for s in oracle.snapshot_list(target)] == ["snap"], len(variant)
        held = layout_of_disk(oracle.convert(target, snapshot="snap"))
        assert held in (old_snap, current), f"torn snapshot after {len(variant)} events"
        assert layout_of_disk(oracle.convert(target)) == current  # the active state stays
        seen.add(held == current)
    assert seen == {False, True}  # the log really spans the switch from old to new


def test_snapshot_overwrite_matches_delete_then_create(tmp_path: Path) -> None:
    """The replacing transaction leaves what qemu-img's delete + create would: same
    snapshot list (names, ids) and contents, a clean image, no leaked clusters."""
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    shutil.copy(prepared(tmp_path), ours)
    shutil.copy(ours, theirs)
    with Store.open(ours) as store:
        store.create_snapshot("second")
        store.create_snapshot("snap", overwrite=True)
    oracle.snapshot(theirs, "create", "second")
    oracle.snapshot(theirs, "delete", "snap")
    oracle.snapshot(theirs, "create", "snap")
    oracle.assert_clean(ours)

    def summary(p: Path) -> list[tuple[str, str]]:
        return [(s["id"], s["name"]) for s in oracle.snapshot_list(p)]

    assert summary(ours) == summary(theirs)
    for tag in ("snap", "second"):
        assert oracle.convert(ours, snapshot=tag) == oracle.convert(theirs, snapshot=tag)
    with Store.open(ours) as store, pytest.raises(StoreError, match="already exists"):
        store.create_snapshot("snap")

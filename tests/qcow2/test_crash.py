"""Crash consistency: replay every prefix of the recorded write log onto the start image.

An observer on ``image.file.observers`` records each write/flush/truncate of a sequence of
operations.  For every prefix of that log (plus variants where writes since the last flush
are reordered or torn, which a crash may also produce) the replayed image must be
``qemu-img check`` clean (exit 0, not even a leak), and must read, through qemu-img and us,
as a state that existed before or after the interrupted operation: for
``commit_atomically`` exactly the old or the new content.

Fault injection: each named fault point, armed with ``inject_fault``, makes the operation
fail with an error, and the image is then still clean, with exactly the old content.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import qcow2
from qcow2.errors import Qcow2Error
from qcow2.io.fileio import WriteEvent, inject_fault
from tests.qcow2 import oracle
from tests.writelog import crash_variants, replay

KiB = 1024
SIZE = 512 * KiB


@dataclass
class State:
    """What the image holds between two operations: its content and its snapshots'."""

    content: bytes
    snapshots: dict[str, bytes] = field(default_factory=dict)


def assert_consistent(path: Path) -> None:
    """``qemu-img check`` exit 0: snapshot operations and ``commit_atomically`` are metadata
    transactions, which leave not even leaks."""
    result = oracle.check(path)
    assert result["exit-code"] == oracle.CHECK_CLEAN, (
        f"{path}: check exit {result['exit-code']}: {result['stderr']}"
    )


def read_state(path: Path, names: list[str]) -> State:
    """The active content and each named snapshot's, read by qemu-img and checked against
    our reader (qemu-img convert -l reads a snapshot at the current disk size)."""
    content = oracle.convert(path)
    snapshots = {n: oracle.convert(path, snapshot=n) for n in names}
    with qcow2.open(str(path)) as image:
        assert image.read(0, len(content)) == content, "qcow2 and qemu-img disagree"
        for name, theirs in snapshots.items():
            view = image.snapshot(name)
            common = min(view.virtual_size, len(theirs))
            assert theirs[:common] == view.read(0, common), f"snapshot {name}: readers disagree"
    return State(content, snapshots)


Operation = Callable[[qcow2.Image], object]


def run_recorded(path: Path, ops: list[Operation]) -> tuple[list[WriteEvent], list[int]]:
    """Run ``ops`` on one open image; return the write log and each op's end index."""
    events: list[WriteEvent] = []
    ends = []
    with qcow2.open(str(path), writable=True) as image:
        image.file.observers.append(events.append)
        for op in ops:
            op(image)
            ends.append(len(events))
    ends[-1] = len(events)  # close() may flush caches: part of the last operation
    return events, ends


def verify_all_prefixes(
    tmp_path: Path, base: bytes, events: list[WriteEvent], ends: list[int], states: list[State]
) -> int:
    target = tmp_path / "replay.qcow2"
    checked = 0
    start = 0
    for op_index, end in enumerate(ends):
        allowed = (states[op_index], states[op_index + 1])
        for k in range(start, end + 1):
            for variant in crash_variants(events, k):
                replay(base, variant, target)
                assert_consistent(target)
                listed = [s["name"] for s in oracle.snapshot_list(target)]
                got = read_state(target, listed)
                assert got in allowed, (
                    f"op {op_index}, event {k}/{len(events)}: state is neither before nor after"
                )
                checked += 1
        start = end
    return checked


def write_state(image: qcow2.Image, names: list[str]) -> State:
    return State(image.read(0, SIZE), {n: image.snapshot(n).read(0, SIZE) for n in names})


@pytest.mark.parametrize(
    ("compat", "extended_l2"), [("1.1", False), ("0.10", False), ("1.1", True)]
)
def test_commit_crash_at_every_write(tmp_path: Path, compat: str, extended_l2: bool) -> None:
    opts: dict[str, object] = {"compat": compat, "cluster_size": 16384 if extended_l2 else 4096}
    if extended_l2:
        opts["extended_l2"] = True
    img = oracle.create(tmp_path / "a.qcow2", SIZE, **opts)
    oracle.qemu_io(img, "write -P 0x11 0 64k", "write -c -P 0x12 320k 16k")
    oracle.snapshot(img, "create", "keep")
    base = img.read_bytes()
    keep = oracle.convert(img, snapshot="keep")
    commits = [
        [(0, b"\xa1" * 5000), (200 * KiB, b"\xa2" * 9000)],
        [(4096 - 3, b"\xb1" * 6), (500 * KiB, b"\xb2" * 12 * KiB)],
        [(1000, b"\xc1" * 100)],
    ]

    def committer(writes: list[tuple[int, bytes]]) -> Operation:
        return lambda image: image.commit_atomically(writes)

    ops = [committer(w) for w in commits]
    states = [State(oracle.convert(img), {"keep": keep})]
    content = bytearray(states[0].content)
    for writes in commits:
        for offset, data in writes:
            content[offset : offset + len(data)] = data
        states.append(State(bytes(content), {"keep": keep}))
    events, ends = run_recorded(img, ops)
    assert read_state(img, ["keep"]) == states[-1]
    checked = verify_all_prefixes(tmp_path, base, events, ends, states)
    assert checked > len(events)


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_snapshot_ops_crash_at_every_write(tmp_path: Path, compat: str) -> None:
    img = oracle.create(tmp_path / "a.qcow2", SIZE, cluster_size=4096, compat=compat)
    oracle.qemu_io(img, "write -P 0x21 0 40k", "write -c -P 0x22 256k 4k")
    oracle.snapshot(img, "create", "old")
    oracle.qemu_io(img, "write -P 0x23 8k 8k")
    base = img.read_bytes()

    ops: list[Operation] = [
        lambda image: image.create_snapshot("new"),
        lambda image: image.commit_atomically([(0, b"\xd1" * 10000)]),
        lambda image: image.delete_snapshot("old"),
        lambda image: image.apply_snapshot("new"),
    ]
    names_after = [["old", "new"], ["old", "new"], ["new"], ["new"]]
    # The states, computed on a scratch copy with the same operations.
    scratch = tmp_path / "scratch.qcow2"
    scratch.write_bytes(base)
    states = [read_state(scratch, ["old"])]
    with qcow2.open(str(scratch), writable=True) as image:
        for op, names in zip(ops, names_after, strict=True):
            op(image)
            states.append(write_state(image, names))
    events, ends = run_recorded(img, ops)
    assert read_state(img, ["new"]) == states[-1]
    verify_all_prefixes(tmp_path, base, events, ends, states)


COMMIT_POINTS = ["commit.write_metadata", "commit.header_switch"]
#: The metadata transaction's two steps (tests/qcow2/test_transaction.py covers them in depth).
SNAPSHOT_POINTS = {
    op: [f"snapshot_{op}.write_metadata", f"snapshot_{op}.header_switch"]
    for op in ("create", "apply", "delete")
}


def prepared_image(tmp_path: Path) -> Path:
    img = oracle.create(tmp_path / "a.qcow2", SIZE, cluster_size=4096)
    oracle.qemu_io(img, "write -P 0x31 0 32k")
    oracle.snapshot(img, "create", "s")
    oracle.qemu_io(img, "write -P 0x32 4k 4k")
    return img


@pytest.mark.parametrize("point", COMMIT_POINTS)
def test_commit_fault_points(tmp_path: Path, point: str) -> None:
    img = prepared_image(tmp_path)
    old = oracle.convert(img)
    new = bytearray(old)
    new[100:6000] = b"\xee" * 5900
    with (
        qcow2.open(str(img), writable=True) as image,
        inject_fault(point),
        pytest.raises((Qcow2Error, OSError)),
    ):
        image.commit_atomically([(100, b"\xee" * 5900)])
    oracle.assert_clean(img)  # before the switch: the old generation, not even a leak
    assert oracle.convert(img) == old
    assert oracle.convert(img, snapshot="s")[: 32 * KiB] == b"\x31" * 32 * KiB


@pytest.mark.parametrize(
    ("op", "point"), [(op, p) for op, points in SNAPSHOT_POINTS.items() for p in points]
)
def test_snapshot_fault_points(tmp_path: Path, op: str, point: str) -> None:
    img = prepared_image(tmp_path)
    old = oracle.convert(img)
    snap = oracle.convert(img, snapshot="s")
    before = [s["name"] for s in oracle.snapshot_list(img)]
    with qcow2.open(str(img), writable=True) as image:
        action: dict[str, Callable[[], object]] = {
            "create": lambda: image.create_snapshot("t"),
            "apply": lambda: image.apply_snapshot("s"),
            "delete": lambda: image.delete_snapshot("s"),
        }
        with inject_fault(point), pytest.raises(Qcow2Error):
            action[op]()
        assert [e.name for e in image.snapshots] == before  # memory follows the file
        assert image.read(0, SIZE) == old
    # Every fault point lies before the switch: exactly the old state, not even a leak.
    assert_consistent(img)
    assert [s["name"] for s in oracle.snapshot_list(img)] == before
    assert oracle.convert(img) == old
    assert oracle.convert(img, snapshot="s") == snap


def test_apply_fault_keeps_the_size(tmp_path: Path) -> None:
    """The disk size switches with the rest: a failed apply keeps the grown size."""
    img = prepared_image(tmp_path)
    oracle.qemu_img("resize", str(img), str(2 * SIZE))
    old = oracle.convert(img)
    with (
        qcow2.open(str(img), writable=True) as image,
        inject_fault("snapshot_apply.header_switch"),
        pytest.raises(Qcow2Error),
    ):
        image.apply_snapshot("s")
    oracle.assert_clean(img)
    assert oracle.convert(img) == old and oracle.info(img)["virtual-size"] == 2 * SIZE


def is_transaction_switch(event: WriteEvent) -> bool:
    """The one header write of a metadata transaction (bytes 36-71, or 24-71 with the size)."""
    return event.kind == "write" and (event.offset, len(event.data)) in ((36, 36), (24, 48))


def fail_at_switch(fail_on: str) -> Callable[[WriteEvent], None]:
    """A write observer that fails a transaction's header write (``fail_on="write"``) or
    the flush right after it (``"flush"``) with EIO."""
    seen = {"header": False}

    def fail(event: WriteEvent) -> None:
        if is_transaction_switch(event):
            seen["header"] = True
            if fail_on == "write":
                raise OSError(5, "injected header write failure")
        elif event.kind == "flush" and seen["header"] and fail_on == "flush":
            seen["header"] = False
            raise OSError(5, "injected flush failure")

    return fail


@pytest.mark.parametrize("fail_on", ["write", "flush"])
def test_commit_switch_failure_follows_the_header(tmp_path: Path, fail_on: str) -> None:
    """The header write (or the flush after it) fails: the image keeps working in whatever
    state the header now describes, clean either way."""
    img = prepared_image(tmp_path)
    old = oracle.convert(img)
    new = bytearray(old)
    new[0:3] = b"new"
    fail = fail_at_switch(fail_on)

    with qcow2.open(str(img), writable=True) as image:
        image.file.observers.append(fail)
        with pytest.raises(OSError):
            image.commit_atomically([(0, b"new")])
        image.file.observers.remove(fail)
        expected = bytes(new) if fail_on == "flush" else old
        assert image.read(0, len(old)) == expected
        image.commit_atomically([(SIZE - 1, b"z")])  # still usable
    oracle.assert_clean(img)
    assert oracle.convert(img) == expected[:-1] + b"z"


@pytest.mark.parametrize("fail_on", ["write", "flush"])
@pytest.mark.parametrize("op", ["create", "apply", "delete"])
def test_snapshot_switch_failure_follows_the_header(tmp_path: Path, op: str, fail_on: str) -> None:
    """The header write (or the flush after it) fails: memory follows whatever the header
    now says, and the image is clean and usable either way."""
    img = prepared_image(tmp_path)
    oracle.qemu_img("resize", str(img), str(2 * SIZE))  # apply switches the size too
    old = oracle.convert(img)
    snap = oracle.convert(img, snapshot="s")
    fail = fail_at_switch(fail_on)

    switched = fail_on == "flush"
    expected_names = {
        "create": ["s", "t"] if switched else ["s"],
        "apply": ["s"],
        "delete": [] if switched else ["s"],
    }[op]
    # (qemu-img convert -l pads a smaller snapshot to the current disk size)
    expected = snap[:SIZE] if op == "apply" and switched else old
    with qcow2.open(str(img), writable=True) as image:
        image.file.observers.append(fail)
        action: dict[str, Callable[[], object]] = {
            "create": lambda: image.create_snapshot("t"),
            "apply": lambda: image.apply_snapshot("s"),
            "delete": lambda: image.delete_snapshot("s"),
        }
        with pytest.raises(Qcow2Error):
            action[op]()
        image.file.observers.remove(fail)
        assert [e.name for e in image.snapshots] == expected_names
        assert image.virtual_size == len(expected)
        assert image.read(0, len(expected)) == expected
        image.write(0, b"still usable")
        image.create_snapshot("u")
    assert_consistent(img)
    assert [s["name"] for s in oracle.snapshot_list(img)] == [*expected_names, "u"]
    assert oracle.convert(img) == b"still usable" + expected[12:]

"""Commit records (qcow2.commit_records): one flush per commit, still atomic across a crash.

The crash model: everything written before the last completed flush is on disk; of the
writes issued after it, any subset may be (every subset of whole writes, plus sampled
subsets of their 512-byte sectors: a write may be torn).  For a crash between the flush
of commit k and the flush of commit k+1, the image must

* be ``qemu-img check``-clean as it lies on disk, and read by qemu-img (which knows no
  records) as commit k-1, k or k+1: a foreign reader is at most one commit behind;
* read, once rolled forward (our open), as commit k (acknowledged) or k+1 (not yet
  acknowledged), never older; and be clean after a writable open persisted the roll.

A program that does not know the records (QEMU) clears their autoclear bit when it opens
the image read-write: a crash, then a qemu-io write, then our open must keep qemu-io's
write and never roll forward over it.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import shutil
from pathlib import Path

import pytest

import qcow2
from qcow2.errors import Qcow2IOError
from qcow2.format import layout
from qcow2.io.fileio import WriteEvent, fail_host_io, inject_fault
from tests.qcow2 import oracle
from tests.writelog import SECTOR

KiB = 1024
SIZE = 256 * KiB
SPAN = 24 * KiB  # the guest bytes the commits touch


def _commits(seed: int, count: int) -> list[list[tuple[int, bytes]]]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        writes = []
        for _ in range(rng.choice((1, 1, 2, 3))):
            length = rng.choice((7, 512, 3000, 4096, 9000))
            offset = rng.randrange(0, SPAN - length)
            writes.append((offset, bytes([(i * 37 + len(writes) * 11 + 1) % 256]) * length))
        out.append(writes)
    return out


def _recorded(
    path: Path, commits: list[list[tuple[int, bytes]]]
) -> tuple[list[WriteEvent], list[bytes]]:
    """Run ``commits`` with commit records on; the write log from the first commit on and
    the content after each commit (index 0: before the first)."""
    events: list[WriteEvent] = []
    states = []
    with qcow2.open(str(path), writable=True) as image:
        assert image.enable_commit_records()
        states.append(image.read(0, SPAN))
        image.file.observers.append(events.append)
        for writes in commits:
            image.commit_atomically(writes)
            states.append(image.read(0, SPAN))
        assert image.commit_log is not None and image.commit_log.commits == len(commits)
        image.file.observers.remove(events.append)
    return events, states


def _sectors(ev: WriteEvent) -> list[WriteEvent]:
    out = []
    pos = 0
    while pos < len(ev.data):
        cut = SECTOR - (ev.offset + pos) % SECTOR
        out.append(WriteEvent("write", ev.offset + pos, ev.data[pos : pos + cut]))
        pos += cut
    return out


def _apply(image: bytearray, writes: list[WriteEvent]) -> None:
    for ev in writes:
        end = ev.offset + len(ev.data)
        if end > len(image):
            image.extend(bytes(end - len(image)))
        image[ev.offset : end] = ev.data


def _crash_images(base: bytes, events: list[WriteEvent], seed: int) -> list[tuple[int, bytes]]:
    """``(k, image)`` for crash states after flush k (k counts flushes; 0: before the first)."""
    flushes = [i for i, ev in enumerate(events) if ev.kind == "flush"]
    rng = random.Random(seed)
    out = []
    boundaries = [-1, *flushes]
    for k, start in enumerate(boundaries):
        durable = bytearray(base)
        _apply(durable, [ev for ev in events[: start + 1] if ev.kind == "write"])
        stop = flushes[k] if k < len(flushes) else len(events)
        pending = [ev for ev in events[start + 1 : stop] if ev.kind == "write"]
        seen = set()
        subsets: list[list[WriteEvent]] = []
        for n in range(len(pending) + 1):
            subsets.extend(list(c) for c in itertools.combinations(pending, n))
        sectors = [s for ev in pending for s in _sectors(ev)]
        for _ in range(40):
            subsets.append([s for s in sectors if rng.random() < 0.5])
        for subset in subsets:
            image = bytearray(durable)
            _apply(image, subset)
            key = hashlib.sha256(image).digest()
            if key not in seen:
                seen.add(key)
                out.append((k, bytes(image)))
    return out


@pytest.mark.parametrize("cluster_size", [4096, 65536])
def test_every_crash_state_reads_old_or_new(tmp_path: Path, cluster_size: int) -> None:
    img = oracle.create(tmp_path / "a.qcow2", SIZE, cluster_size=cluster_size)
    oracle.qemu_io(img, "write -P 0x33 0 20k")
    commits = _commits(cluster_size, 6)
    with qcow2.open(str(img), writable=True) as image:
        image.enable_commit_records()  # the one-time set-up, at the first commit
        image.commit_atomically([(SPAN, b"set up")])
    base = img.read_bytes()
    events, states = _recorded(img, commits)
    assert sum(ev.kind == "flush" for ev in events) == len(commits), "one flush per commit"
    target = tmp_path / "crash.qcow2"
    checked = 0
    for k, image_bytes in _crash_images(base, events, seed=cluster_size):
        target.write_bytes(image_bytes)
        oracle.assert_clean(target)
        theirs = oracle.convert(target)[:SPAN]
        assert theirs in states[max(0, k - 1) : k + 2], f"flush {k}: qemu-img reads an older state"
        with qcow2.open(str(target), roll_forward=True) as image:
            ours = image.read(0, SPAN)
        assert ours in states[k : k + 2], f"flush {k}: rolled forward to neither old nor new"
        with qcow2.open(str(target), writable=True) as image:
            assert image.read(0, SPAN) == ours
        oracle.assert_clean(target)
        assert oracle.convert(target)[:SPAN] == ours, "the roll was not persisted"
        checked += 1
    assert checked > 50


def test_foreign_writer_after_crash_is_never_rolled_over(tmp_path: Path) -> None:
    img = oracle.create(tmp_path / "a.qcow2", SIZE, cluster_size=4096)
    with qcow2.open(str(img), writable=True) as image:
        image.enable_commit_records()
        image.commit_atomically([(SPAN, b"set up")])
    base = img.read_bytes()
    events, states = _recorded(img, _commits(7, 3))
    flushes = [i for i, ev in enumerate(events) if ev.kind == "flush"]
    # A crash right after the second commit's flush: header of commit 1 on disk, the
    # record of commit 2 durable.
    crashed = bytearray(base)
    _apply(crashed, [ev for ev in events[: flushes[1] + 1] if ev.kind == "write"])
    target = tmp_path / "crash.qcow2"
    target.write_bytes(bytes(crashed))
    with qcow2.open(str(target), roll_forward=True) as image:
        assert image.read(0, SPAN) == states[2], "the record of commit 2 rolls forward"
    assert oracle.convert(target)[:SPAN] == states[1]
    # QEMU writes where our next generation was (it knows no records): clears the bit.
    oracle.qemu_io(target, "write -P 0x5a 0 8k")
    header = target.read_bytes()[:112]
    autoclear = int.from_bytes(header[88:96], "big")
    assert not autoclear & layout.AUTOCLEAR_COMMIT_RECORDS, "QEMU cleared the bit"
    expected = bytes([0x5A]) * 8192 + states[1][8192:]
    for writable in (False, True):
        with qcow2.open(str(target), writable=writable, roll_forward=True) as image:
            assert image.read(0, SPAN) == expected, "rolled forward over QEMU's write"
    oracle.assert_clean(target)
    # Records work again after the next enable, from zeroed slots.
    with qcow2.open(str(target), writable=True) as image:
        assert image.enable_commit_records()
        image.commit_atomically([(100, b"x" * 100)])
        expected = image.read(0, SPAN)
    with qcow2.open(str(target), roll_forward=True) as image:
        assert image.read(0, SPAN) == expected
    oracle.assert_clean(target)


def test_qemu_keeps_the_extension_and_clears_only_the_bit(tmp_path: Path) -> None:
    img = oracle.create(tmp_path / "a.qcow2", SIZE, cluster_size=65536)
    with qcow2.open(str(img), writable=True) as image:
        image.enable_commit_records()
        image.commit_atomically([(0, b"a" * 5000)])
    oracle.qemu_img("snapshot", "-c", "s1", str(img))
    with qcow2.open(str(img)) as image:
        assert image.header.find_extension(layout.EXT_COMMIT_RECORDS) is not None
        assert not image.header.autoclear_features & layout.AUTOCLEAR_COMMIT_RECORDS
    with qcow2.open(str(img), writable=True) as image:
        assert image.enable_commit_records()
        assert not image.header.autoclear_features & layout.AUTOCLEAR_COMMIT_RECORDS
        image.commit_atomically([(0, b"b" * 5000)])
        assert image.header.autoclear_features & layout.AUTOCLEAR_COMMIT_RECORDS
    oracle.assert_clean(img)
    assert oracle.convert(img)[:5000] == b"b" * 5000
    assert oracle.convert(img, snapshot="s1")[:5000] == b"a" * 5000


def test_failed_flush_is_never_rolled_forward(tmp_path: Path) -> None:
    img = oracle.create(tmp_path / "a.qcow2", SIZE, cluster_size=4096)
    with qcow2.open(str(img), writable=True) as image:
        image.enable_commit_records()
        image.commit_atomically([(0, b"1" * 3000)])
        with fail_host_io("flush", 1), pytest.raises(Qcow2IOError):
            image.commit_atomically([(0, b"2" * 3000)])
        assert image.read(0, 3000) == b"1" * 3000
        shutil.copy(img, tmp_path / "after-failure.qcow2")
        image.commit_atomically([(0, b"3" * 3000)])
        assert image.read(0, 3000) == b"3" * 3000
    with qcow2.open(str(tmp_path / "after-failure.qcow2"), roll_forward=True) as image:
        assert image.read(0, 3000) == b"1" * 3000, "a commit that failed rolled forward"
    oracle.assert_clean(tmp_path / "after-failure.qcow2")
    assert oracle.convert(img)[:3000] == b"3" * 3000
    oracle.assert_clean(img)


def test_header_write_failure_after_the_flush_still_commits(tmp_path: Path) -> None:
    img = oracle.create(tmp_path / "a.qcow2", SIZE, cluster_size=4096)
    with qcow2.open(str(img), writable=True) as image:
        image.enable_commit_records()
        with inject_fault("commit.header_write"):
            image.commit_atomically([(0, b"1" * 3000)])  # durable: no error
        assert image.commit_log is not None and image.commit_log.written == 0
        shutil.copy(img, tmp_path / "copy.qcow2")
        image.commit_atomically([(5000, b"2" * 3000)])  # writes the missing header too
    with qcow2.open(str(tmp_path / "copy.qcow2"), roll_forward=True) as image:
        assert image.read(0, 3000) == b"1" * 3000
    got = oracle.convert(img)
    assert got[:3000] == b"1" * 3000 and got[5000:8000] == b"2" * 3000
    oracle.assert_clean(img)


def test_other_changes_settle_first(tmp_path: Path) -> None:
    """In-place writes, snapshots and resize know no records: the header on disk is made
    durable and current before them, so a crash never rolls a record over them."""
    img = oracle.create(tmp_path / "a.qcow2", SIZE, cluster_size=4096)
    with qcow2.open(str(img), writable=True) as image:
        image.enable_commit_records()
        image.commit_atomically([(0, b"1" * 3000)])
        log = image.commit_log
        assert log is not None and not log.settled
        image.write(0, b"w" * 100)
        assert log.settled
        image.commit_atomically([(0, b"2" * 3000)])
        image.create_snapshot("s")
        assert log.settled
        image.commit_atomically([(0, b"3" * 3000)])
        image.resize(SIZE * 2)
        assert log.settled
        expected = image.read(0, SPAN)
    assert oracle.convert(img)[:SPAN] == expected
    assert oracle.convert(img, snapshot="s")[:3000] == b"2" * 3000
    oracle.assert_clean(img)


def test_version_2_and_backing_files_keep_two_flushes(tmp_path: Path) -> None:
    v2 = oracle.create(tmp_path / "v2.qcow2", SIZE, compat="0.10")
    with qcow2.open(str(v2), writable=True) as image:
        assert not image.enable_commit_records()
        image.commit_atomically([(0, b"a" * 100)])
    oracle.assert_clean(v2)
    top = tmp_path / "top.qcow2"
    oracle.qemu_img("create", "-f", "qcow2", "-b", str(v2), "-F", "qcow2", str(top))
    with qcow2.open(str(top), writable=True) as image:
        assert not image.enable_commit_records()


def test_a_hostile_record_is_ignored(tmp_path: Path) -> None:
    """Records whose extents lie outside the file, or whose digest fails, or whose new
    header does not validate, are not applied: the image opens as its header says."""
    img = oracle.create(tmp_path / "a.qcow2", SIZE, cluster_size=4096)
    with qcow2.open(str(img), writable=True) as image:
        image.enable_commit_records()
        image.commit_atomically([(0, b"1" * 3000)])
        log = image.commit_log
        assert log is not None
        slots = log.slots
        fields = bytes(image.file.pread(24, 48))
    from qcow2.commit_records import pack_record

    bad_fields = fields[:16] + (123).to_bytes(8, "big") + fields[24:]  # unaligned L1
    data = bytearray(img.read_bytes())
    for record in (
        pack_record(5, fields, bad_fields, [(4096, bytes(data[4096:8192]))]),
        pack_record(5, fields, fields, [(1 << 40, b"x")]),
    ):
        assert record is not None
        data[slots : slots + len(record)] = record
        img.write_bytes(bytes(data))
        with qcow2.open(str(img), writable=True) as image:
            assert image.read(0, 3000) == b"1" * 3000
        oracle.assert_clean(img)


def test_freed_clusters_are_reused_once_no_durable_header_reaches_them(tmp_path: Path) -> None:
    """Clusters a commit frees wait one commit, then are reused: the file stops growing."""
    img = oracle.create(tmp_path / "a.qcow2", SIZE, cluster_size=4096)
    with qcow2.open(str(img), writable=True) as image:
        image.enable_commit_records()
        sizes = []
        for i in range(60):
            image.commit_atomically([(1000, bytes([i]) * 3000), (20000, bytes([i]) * 100)])
            sizes.append(image.file.size())
    assert sizes[-1] == sizes[10], f"the file keeps growing: {sizes[10]} -> {sizes[-1]}"
    oracle.assert_clean(img)


def test_no_old_record_rolls_forward_after_other_changes(tmp_path: Path) -> None:
    """Snapshot operations and in-place writes switch headers without a record and may
    bring back header bytes an old record was built on (the same L1 and refcount table
    offsets, reused first-fit): the slots are emptied before them, so an open never
    rolls an old record forward over them."""
    img = oracle.create(tmp_path / "a.qcow2", SIZE, cluster_size=4096)
    copy = tmp_path / "copy.qcow2"
    rng = random.Random(0)
    with qcow2.open(str(img), writable=True) as image:
        image.enable_commit_records()
        for step in range(60):
            choice = rng.random()
            if choice < 0.5:
                image.commit_atomically([(rng.randrange(0, SPAN - 600), bytes([step]) * 600)])
            elif choice < 0.65:
                image.create_snapshot(f"s{step}")
            elif choice < 0.8 and image.snapshots:
                image.apply_snapshot(rng.choice(image.snapshots).name)
            elif choice < 0.9 and image.snapshots:
                image.delete_snapshot(rng.choice(image.snapshots).name)
            else:
                image.write(rng.randrange(0, SPAN - 100), bytes([step]) * 100)
                image.flush()  # plain writes are durable at a flush
            expected = image.read(0, SPAN)
            shutil.copy(img, copy)  # a crash now: every step returned durable
            with qcow2.open(str(copy), roll_forward=True) as crashed:
                assert crashed.read(0, SPAN) == expected, f"step {step}: an old record rolled"


def test_a_writer_without_records_never_meets_an_old_one(tmp_path: Path) -> None:
    """A writable open that does not use records (``qcow2 snapshot``, an older program
    version) empties the slots after rolling forward, so its header changes never meet
    a record built on the same bytes."""
    img = oracle.create(tmp_path / "a.qcow2", SIZE, cluster_size=4096)
    rng = random.Random(0)
    for step in range(30):
        with qcow2.open(str(img), writable=True) as image:
            choice = rng.random()
            if choice < 0.4:
                image.enable_commit_records()
                for i in range(rng.randrange(1, 4)):
                    offset = rng.randrange(0, SPAN - 600)
                    image.commit_atomically([(offset, bytes([i + step]) * 600)])
            elif image.snapshots and choice < 0.7:
                name = rng.choice(image.snapshots).name
                if rng.random() < 0.5:
                    image.apply_snapshot(name)
                else:
                    image.delete_snapshot(name)
            else:
                image.create_snapshot(f"s{step}")
            expected = image.read(0, SPAN)
        with qcow2.open(str(img), roll_forward=True) as image:
            assert image.read(0, SPAN) == expected, f"step {step}: an old record rolled"


def test_a_writable_open_alone_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    """Records in the slots are emptied before the first change, not at the open: an
    open that ends up refused (a missing key, say) or changes nothing writes nothing."""
    img = oracle.create(tmp_path / "a.qcow2", SIZE, cluster_size=4096)
    with qcow2.open(str(img), writable=True) as image:
        image.enable_commit_records()
        image.commit_atomically([(0, b"1" * 3000)])
    before = img.read_bytes()
    with qcow2.open(str(img), writable=True) as image:
        assert image.read(0, 3000) == b"1" * 3000
    with qcow2.open(str(img), writable=True) as image:
        image.enable_commit_records()
    assert img.read_bytes() == before


@pytest.mark.parametrize(
    "command",
    [["check", "-r", "all"], ["amend", "-o", "lazy_refcounts=on"]],
    ids=["check-r", "amend"],
)
def test_qemu_img_tools_clear_the_bit_as_qemu_img_does(tmp_path: Path, command: list[str]) -> None:
    """``qcow2 check -r`` and ``qcow2 amend`` write as qemu-img does, as programs that
    know no records: the bit goes first, on both, and both images stay clean."""
    import subprocess
    import sys

    img = oracle.create(tmp_path / "a.qcow2", SIZE, cluster_size=4096)
    with qcow2.open(str(img), writable=True) as image:
        image.enable_commit_records()
        image.commit_atomically([(0, b"1" * 3000)])
        image.commit_atomically([(0, b"2" * 3000)])
    theirs = tmp_path / "theirs.qcow2"
    shutil.copy(img, theirs)
    oracle.qemu_img(*command, str(theirs))
    subprocess.run([sys.executable, "-m", "qcow2", *command, str(img)], check=True, timeout=60)
    for path in (img, theirs):
        autoclear = int.from_bytes(path.read_bytes()[88:96], "big")
        assert not autoclear & layout.AUTOCLEAR_COMMIT_RECORDS, path
        oracle.assert_clean(path)
        assert oracle.convert(path)[:3000] == b"2" * 3000

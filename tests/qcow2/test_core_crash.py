"""Crash safety of the core's metadata updates, and lazy refcounts / dirty images.

Like QEMU's iotest 026: each named fault point fails in turn; the process then "crashes"
(the file is closed without any further write or flush) and ``qemu-img check`` must find
at most leaked clusters, never a corruption; the content is the old or the new one.
"""

from __future__ import annotations

import random
import resource
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

import qcow2
from qcow2.io.fileio import WriteEvent, inject_fault
from tests.helpers import need
from tests.qcow2 import oracle

MiB = 1024 * 1024


def _crash(image: qcow2.Image) -> None:
    """Drop the image as a crash would: no flush, no cache write-back, no header update."""
    if image.backing is not None:
        image.backing.close()
    image.file.close()


def _new_data_write(image: qcow2.Image) -> None:
    image.write(3 * 65536 + 100, b"new" * 1000)


def _new_l2_write(image: qcow2.Image) -> None:
    image.write(600 * MiB, b"beyond the first L2 table")


def _grow(image: qcow2.Image) -> None:
    image.resize(2048 * MiB)


def _zero(image: qcow2.Image) -> None:
    image.write_zeroes(0, 2 * 65536, unmap=True)


def _flush(image: qcow2.Image) -> None:
    image.write(5 * 65536, b"x" * 65536)
    image.flush()


def _small_cluster_fill(image: qcow2.Image) -> None:
    image.write(MiB, random.Random(1).randbytes(3 * MiB))


#: 512-byte clusters with 64-bit refcounts: a refblock covers 32 KiB, a reftable 2 MiB.
_SMALL = {"cluster_size": 512, "refcount_bits": 64}

#: (fault point, setup kwargs, operation)
CASES: list[tuple[str, dict[str, int], Callable[[qcow2.Image], None]]] = [
    ("cluster_alloc", {}, _new_data_write),
    ("cluster_alloc.write_data", {}, _new_data_write),
    ("cluster_alloc.write_l2", {}, _new_data_write),
    ("l2_alloc.cow_read", {}, _new_l2_write),
    ("l2_alloc.write", {}, _new_l2_write),
    ("l1_update", {}, _new_l2_write),
    ("l1_grow.alloc_table", {}, _grow),
    ("l1_grow.write_table", {}, _grow),
    ("l1_grow.activate_table", {}, _grow),
    ("cluster_zero.write_l2", {}, _zero),
    ("l2_cache.write", {}, _flush),
    ("refblock_cache.write", {}, _flush),
    ("refblock_alloc.write", _SMALL, _small_cluster_fill),
    ("refblock_alloc.hookup", _SMALL, _small_cluster_fill),
    ("refblock_alloc.write_blocks", _SMALL, _small_cluster_fill),
    ("refblock_alloc.write_table", _SMALL, _small_cluster_fill),
    ("refblock_alloc.switch_table", _SMALL, _small_cluster_fill),
]


@pytest.mark.parametrize(("point", "options", "operation"), CASES, ids=[c[0] for c in CASES])
def test_fault_points_leave_at_most_leaks(
    tmp_path: Path,
    point: str,
    options: dict[str, int],
    operation: Callable[[qcow2.Image], None],
) -> None:
    need("qemu-img")
    path = tmp_path / "f.qcow2"
    with qcow2.create(str(path), 1024 * MiB, **options) as image:
        image.write(0, b"\x11" * 65536 * 3)  # some existing data to keep intact
    with qcow2.open(str(path)) as old:
        before = old.read(0, 65536 * 3)
    image = qcow2.open(str(path), writable=True)
    try:
        with inject_fault(point), pytest.raises((OSError, qcow2.Qcow2Error)):
            operation(image)
    finally:
        _crash(image)
    result = oracle.check(path)
    assert result["exit-code"] in (oracle.CHECK_CLEAN, oracle.CHECK_LEAKS), result["stderr"]
    with qcow2.open(str(path)) as reopened:
        assert reopened.read(0, 65536) == before[:65536]


def test_lazy_refcounts_set_dirty_bit_and_clear_it_on_close(tmp_path: Path) -> None:
    need("qemu-img")
    path = tmp_path / "lazy.qcow2"
    image = qcow2.create(str(path), 8 * MiB, lazy_refcounts=True)
    assert not image.header.dirty
    image.write(0, b"a" * 300_000)
    # The dirty bit is on disk before anything that relies on it.
    assert oracle.info(path, force_share=True)["format-specific"]["data"]["lazy-refcounts"]
    crashed = tmp_path / "crashed.qcow2"
    shutil.copyfile(path, crashed)
    image.close()
    with qcow2.open(str(path)) as clean:
        assert not clean.header.dirty
    oracle.assert_clean(path)
    with qcow2.open(str(crashed)) as dirty_ro:  # read-only: no repair
        assert dirty_ro.header.dirty
    assert crashed.read_bytes()[72:80] != bytes(8)  # incompatible bits still set on disk


def test_dirty_image_is_repaired_on_writable_open(tmp_path: Path) -> None:
    need("qemu-io")
    path = oracle.create(tmp_path / "d.qcow2", 8 * MiB, lazy_refcounts=True)
    # qemu-io with lazy refcounts, killed before it can clean up: a dirty image whose
    # refcounts are stale (QEMU never wrote them).
    subprocess.run(
        [need("qemu-io"), "-f", "qcow2", "-c", "write -P 0x42 0 1M", "-c", "abort", str(path)],
        capture_output=True,
        timeout=60,
        check=False,
        cwd=tmp_path,  # and no core dump anywhere
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_CORE, (0, 0)),
    )
    raw = path.read_bytes()
    assert int.from_bytes(raw[72:80], "big") & 1, "qemu-io abort left no dirty bit"
    before = oracle.check(path)
    assert before["exit-code"] != oracle.CHECK_CLEAN
    with qcow2.open(str(path), writable=True) as image:
        assert not image.header.dirty
        assert image.read(0, MiB) == b"\x42" * MiB
        image.write(MiB, b"more")
    oracle.assert_clean(path)
    assert oracle.convert(path)[: MiB + 4] == b"\x42" * MiB + b"more"


def test_every_prefix_of_the_write_log_is_consistent(tmp_path: Path) -> None:
    """Record every host write of a workload that allocates data and L2 tables, refcount
    blocks, grows the reftable and the L1, zeroes and discards; replay every prefix onto
    the starting file: qemu-img check must never find more than leaks."""
    need("qemu-img")
    start = tmp_path / "start.qcow2"
    with qcow2.create(str(start), MiB, cluster_size=512, refcount_bits=64) as image:
        image.write(0, b"\x01" * 4096)
    events: list[WriteEvent] = []
    work = tmp_path / "work.qcow2"
    shutil.copyfile(start, work)
    with qcow2.open(str(work), writable=True) as image:
        image.file.observers.append(events.append)
        image.resize(4 * MiB)  # L1 growth
        rnd = random.Random(9)
        for i in range(8):
            # Spread 2.4 MB over the disk: refblocks, then a reftable that moves.
            image.write(i * 500_000 + rnd.randrange(100_000), rnd.randbytes(300_000))
            if i == 3:
                image.write_zeroes(0, 2048, unmap=True)
                image.discard(MiB, 64 * 1024)
    writes = [e for e in events if e.kind in ("write", "truncate")]
    assert any(e.offset == 48 and len(e.data) == 12 for e in writes), "no reftable growth"
    assert 40 < len(writes) < 2000
    replay = tmp_path / "replay.qcow2"
    step = max(1, len(writes) // 120)  # every prefix up to ~120 cuts, always the last
    cuts = sorted({*range(0, len(writes), step), len(writes)})
    for cut in cuts:
        shutil.copyfile(start, replay)
        with open(replay, "r+b") as f:
            for event in writes[:cut]:
                if event.kind == "truncate":
                    f.truncate(event.offset)
                else:
                    f.seek(event.offset)
                    f.write(event.data)
        result = oracle.check(replay)
        assert result["exit-code"] in (oracle.CHECK_CLEAN, oracle.CHECK_LEAKS), (
            f"after {cut}/{len(writes)} writes: {result['stderr']}"
        )

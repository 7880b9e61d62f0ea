"""The guest data cache (``Image.enable_data_cache``): reads and atomic commits served from
memory, and never a stale byte after any other change of guest data (qemu-img's view is the
oracle)."""

from __future__ import annotations

from pathlib import Path

import pytest

import qcow2
from tests.qcow2 import oracle

KiB = 1024
MiB = 1024 * KiB


def test_reads_and_commits_come_from_the_cache(tmp_path: Path) -> None:
    img = oracle.create(tmp_path / "a.qcow2", 1 * MiB, cluster_size=4096)
    oracle.qemu_io(img, "write -P 0x11 0 64k")
    data_hosts = [
        (e["offset"], e["offset"] + e["length"]) for e in oracle.map_json(img) if e.get("data")
    ]

    def reads_data(reads: list[tuple[int, int]]) -> list[tuple[int, int]]:
        return [
            (o, n) for o, n in reads if any(o < end and start < o + n for start, end in data_hosts)
        ]

    with qcow2.open(str(img), writable=True) as image:
        image.enable_data_cache(256 * KiB)
        reads: list[tuple[int, int]] = []
        pread = image.file.pread

        def counting_pread(offset: int, length: int) -> bytes:
            reads.append((offset, length))
            return pread(offset, length)

        image.file.pread = counting_pread  # type: ignore[method-assign]  # a spy, not a mock
        assert image.read(100, 30000) == b"\x11" * 30000
        first = len(reads)
        assert first > 0
        assert image.read(5000, 20000) == b"\x11" * 20000
        # a commit of partial clusters completes them from the cache ...
        image.commit_atomically([(4100, b"\x22" * 10), (20000, b"\x33" * 5000)])
        assert reads_data(reads[first:]) == [], "the commit read data clusters back"
        # ... and stores what it wrote: reading it back touches no data cluster either
        before = len(reads)
        got = image.read(0, 32 * KiB)  # what the first reads brought in
        assert reads_data(reads[before:]) == []
    expected = bytearray(b"\x11" * 64 * KiB)
    expected[4100:4110] = b"\x22" * 10
    expected[20000:25000] = b"\x33" * 5000
    assert got == bytes(expected[: 32 * KiB])
    assert oracle.convert(img)[: 64 * KiB] == bytes(expected)
    oracle.assert_clean(img)


@pytest.mark.parametrize(
    "change",
    ["write", "write_zeroes", "discard", "apply_snapshot", "resize", "commit", "failed commit"],
)
def test_no_stale_byte_after_any_change(tmp_path: Path, change: str) -> None:
    img = oracle.create(tmp_path / "a.qcow2", 1 * MiB, cluster_size=4096)
    oracle.qemu_io(img, "write -P 0x11 0 128k")
    with qcow2.open(str(img), writable=True) as image:
        image.create_snapshot("old")
        image.commit_atomically([(0, b"\x44" * 8192)])
        image.enable_data_cache(64 * KiB)
        assert image.read(0, 48 * KiB)[:8193] == b"\x44" * 8192 + b"\x11"  # cached
        if change == "write":
            image.write(1000, b"\x55" * 3000)
        elif change == "write_zeroes":
            image.write_zeroes(4096, 8192)
        elif change == "discard":
            image.discard(0, 65536)
        elif change == "apply_snapshot":
            image.apply_snapshot("old")
        elif change == "resize":
            image.resize(64 * KiB)
        elif change == "commit":
            image.commit_atomically([(70000, b"\x66" * 100)])
        else:
            with pytest.raises(qcow2.Qcow2Error):
                image.commit_atomically([(10, b"x"), (MiB - 1, b"yy")])
        size = image.virtual_size
        step = 8 * KiB  # within the cache's capacity: served from it where it can be
        ours = b"".join(image.read(o, min(step, size - o)) for o in range(0, size, step))
    assert ours == oracle.convert(img)
    oracle.assert_clean(img)

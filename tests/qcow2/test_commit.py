"""commit_atomically: content, reference accounting and snapshot safety, judged by qemu-img."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

import qcow2
from qcow2.errors import Qcow2Error, ReadOnlyError
from tests.qcow2 import oracle

MiB = 1024 * 1024


def apply_to_model(model: bytearray, writes: list[tuple[int, bytes]]) -> None:
    for offset, data in writes:
        model[offset : offset + len(data)] = data


def random_writes(
    rng: random.Random, size: int, count: int, max_len: int
) -> list[tuple[int, bytes]]:
    writes = []
    for _ in range(count):
        length = rng.randint(1, max_len)
        offset = rng.randrange(0, size - length)
        writes.append((offset, rng.randbytes(length)))
    return writes


@pytest.mark.parametrize(
    ("compat", "cluster_size", "extended_l2"),
    [("1.1", 65536, False), ("0.10", 65536, False), ("1.1", 512, False), ("1.1", 4096, False),
     ("1.1", 65536, True), ("1.1", 16384, True), ("0.10", 2 * MiB, False)],
)  # fmt: skip
def test_commit_content_and_no_leaks(
    tmp_path: Path, compat: str, cluster_size: int, extended_l2: bool
) -> None:
    size = 4 * MiB
    img = tmp_path / "a.qcow2"
    opts: dict[str, object] = {"compat": compat, "cluster_size": cluster_size}
    if extended_l2:
        opts["extended_l2"] = True
    oracle.create(img, size, **opts)
    oracle.qemu_io(img, "write -P 0x11 0 100k", "write -P 0x22 1M 3k")
    model = bytearray(oracle.convert(img))
    rng = random.Random(cluster_size + len(compat) + extended_l2)
    with qcow2.open(str(img), writable=True) as image:
        for _round in range(4):
            writes = random_writes(rng, size, rng.randint(1, 6), min(3 * cluster_size, MiB))
            # Overlapping extents inside one commit: the later one wins.
            writes.append((writes[0][0], b"\xee" * min(17, len(writes[0][1]))))
            image.commit_atomically(writes)
            apply_to_model(model, writes)
            assert image.read(0, size) == bytes(model)
    oracle.assert_clean(img)  # no leaks: every replaced cluster and old table was freed
    assert oracle.convert(img) == bytes(model)


def test_commit_keeps_snapshots_intact(tmp_path: Path) -> None:
    size = 4 * MiB
    img = oracle.create(tmp_path / "a.qcow2", size, cluster_size=4096)
    oracle.qemu_io(img, "write -P 0x31 0 64k", "write -P 0x32 2M 8k")
    oracle.snapshot(img, "create", "before")
    before = oracle.convert(img, snapshot="before")
    model = bytearray(before)
    rng = random.Random(7)
    with qcow2.open(str(img), writable=True) as image:
        writes = [(0, b"A" * 5000), (2 * MiB + 100, b"B" * 10000), (3 * MiB, b"C" * 4096)]
        image.commit_atomically(writes)
        apply_to_model(model, writes)
        writes = random_writes(rng, size, 5, 9000)
        image.commit_atomically(writes)
        apply_to_model(model, writes)
    oracle.assert_clean(img)
    assert oracle.convert(img, snapshot="before") == before
    assert oracle.convert(img) == bytes(model)
    # qemu can still go back to the snapshot, and then nothing leaks either.
    oracle.snapshot(img, "apply", "before")
    oracle.assert_clean(img)
    assert oracle.convert(img) == before
    oracle.snapshot(img, "delete", "before")
    oracle.assert_clean(img)


def test_commit_over_backing_file_and_compressed(tmp_path: Path) -> None:
    size = 2 * MiB
    base = oracle.create(tmp_path / "base.qcow2", size)
    oracle.qemu_io(base, "write -P 0x44 0 2M")
    top = tmp_path / "top.qcow2"
    oracle.qemu_img(
        "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top), str(size)
    )
    oracle.qemu_io(top, "write -c -P 0x55 64k 64k", "write -z 256k 64k")
    model = bytearray(oracle.convert(top))
    with qcow2.open(str(top), writable=True) as image:
        writes = [(100, b"x" * 10), (64 * 1024 + 5, b"y" * 7), (256 * 1024 + 1, b"z")]
        image.commit_atomically(writes)
        apply_to_model(model, writes)
    oracle.assert_clean(top)
    assert oracle.convert(top) == bytes(model)
    assert oracle.convert(base) == b"\x44" * size


def test_commit_rejects_bad_extents_and_read_only(tmp_path: Path) -> None:
    img = oracle.create(tmp_path / "a.qcow2", 1 * MiB)
    with qcow2.open(str(img), writable=True) as image:
        with pytest.raises(Qcow2Error, match="outside the virtual disk"):
            image.commit_atomically([(0, b"ok"), (MiB - 1, b"xx")])
        image.commit_atomically([])
    oracle.assert_clean(img)
    assert oracle.convert(img) == bytes(MiB)  # the valid first extent was not applied
    with qcow2.open(str(img)) as image, pytest.raises(ReadOnlyError):
        image.commit_atomically([(0, b"x")])


def test_commit_and_snapshots_with_lazy_refcounts(tmp_path: Path) -> None:
    img = oracle.create(tmp_path / "a.qcow2", 1 * MiB, lazy_refcounts=True, cluster_size=4096)
    model = bytearray(MiB)
    with qcow2.open(str(img), writable=True) as image:
        image.write(0, b"w" * 10000)  # sets the dirty bit (lazy refcounts)
        model[0:10000] = b"w" * 10000
        image.create_snapshot("s")
        writes = [(5000, b"c" * 9000), (700 * 1024, b"d" * 3)]
        image.commit_atomically(writes)
        apply_to_model(model, writes)
    oracle.assert_clean(img)
    assert oracle.convert(img) == bytes(model)
    assert oracle.convert(img, snapshot="s")[:10000] == b"w" * 10000

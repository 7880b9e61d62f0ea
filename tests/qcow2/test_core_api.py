"""The Image API surface: refcount range errors and the delegating methods."""

from __future__ import annotations

from pathlib import Path

import pytest

import qcow2
from qcow2.errors import RefcountRangeError
from qcow2.tools.info import image_info
from tests.helpers import need
from tests.qcow2 import oracle

MiB = 1024 * 1024


def test_refcount_overflow_changes_nothing(tmp_path: Path) -> None:
    """With 1-bit refcounts a second reference cannot be counted: the update fails as a
    whole (no cluster of the range changed) and the image stays clean."""
    need("qemu-img")
    path = tmp_path / "o.qcow2"
    with qcow2.create(str(path), MiB, refcount_bits=1, cluster_size=4096) as image:
        image.write(0, b"a" * 8192)
        _, first_host = image.clusters.lookup(0)
        free_cluster = image.refcounts.find_free(1)
        assert image.refcounts.get(free_cluster) == 0
        span_start = min(free_cluster * 4096, first_host)
        # One cluster in the range is free (0 -> 1 fits), another is used (1 -> 2 does not).
        span = abs(free_cluster * 4096 - first_host) + 4096
        with pytest.raises(RefcountRangeError, match="exceed 1"):
            image.refcounts.update(span_start, span, 1)
        assert image.refcounts.get(free_cluster) == 0
        assert image.refcounts.get(first_host // 4096) == 1
        with pytest.raises(RefcountRangeError, match="below 0"):
            image.refcounts.update(free_cluster * 4096, 4096, -1)
    oracle.assert_clean(path)


def test_delegating_methods(tmp_path: Path) -> None:
    """Snapshots, check and info go through the Image and see what it cached."""
    need("qemu-img")
    path = tmp_path / "d.qcow2"
    with qcow2.create(str(path), 4 * MiB) as image:
        image.write(0, b"old" * 1000)
        entry = image.create_snapshot("s1")
        assert entry.name == "s1"
        image.write(0, b"new" * 1000)  # COW of a cluster now shared with s1
        assert [s.name for s in image.snapshots] == ["s1"]
        assert image.snapshot("s1").read(0, 3000) == b"old" * 1000
        assert image.read(0, 3000) == b"new" * 1000
        result = image.check()
        assert result.exit_code == 0, result.messages
        assert image_info(image)["virtual-size"] == 4 * MiB
        image.apply_snapshot("s1")
        assert image.read(0, 3000) == b"old" * 1000
        image.write(MiB, b"after apply")
        image.delete_snapshot("s1")
        assert image.snapshots == []
        image.commit_atomically([(2 * MiB, b"atomic"), (10, b"X")])
        assert image.read(2 * MiB, 6) == b"atomic"
    oracle.assert_clean(path)
    content = oracle.convert(path)
    expected = bytearray(b"old" * 1000)
    expected[10:11] = b"X"
    assert content[:3000] == expected
    assert content[MiB : MiB + 11] == b"after apply"
    assert content[2 * MiB : 2 * MiB + 6] == b"atomic"


def test_closed_image_refuses_io(tmp_path: Path) -> None:
    image = qcow2.create(str(tmp_path / "c.qcow2"), MiB)
    image.close()
    image.close()  # idempotent
    with pytest.raises(qcow2.Qcow2Error, match="closed"):
        image.read(0, 1)

"""qcow2.compress: compressed cluster writes, and zstd image creation, judged by qemu-img.

Oracles: ``qemu-img check`` (refcounts of every touched host cluster, compressed cluster
count), ``qemu-img compare`` against a raw model of the guest disk, ``qemu-img map`` (a
compressed cluster is data without a host offset in QEMU 7.2), ``qemu-img info``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import qcow2
from qcow2.compress import CompressedWriter
from tests.qcow2 import oracle

KiB = 1024
MiB = 1024 * KiB


def _pattern(seed: int, n: int) -> bytes:
    """Compressible guest data (a short repeated phrase)."""
    return (f"cluster {seed} ".encode() * (n // 8 + 1))[:n]


def _map(path: Path) -> list[dict[str, object]]:
    out = oracle.qemu_img("map", "--output=json", "-f", "qcow2", str(path)).stdout
    result: list[dict[str, object]] = json.loads(out)
    return result


def _compressed_ranges(path: Path) -> set[tuple[int, int]]:
    """Guest ranges qemu-img map shows as data without a host offset (compressed)."""
    return {
        (int(str(e["start"])), int(str(e["length"])))
        for e in _map(path)
        if e["data"] and "offset" not in e
    }


def _write_model(model: Path, size: int, writes: dict[int, bytes]) -> None:
    raw = bytearray(size)
    for offset, data in writes.items():
        raw[offset : offset + len(data)] = data
    model.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"compression_type": "zstd"},
        {"cluster_size": 4096},
        {"extended_l2": True},
        {"cluster_size": 512, "refcount_bits": 1},
    ],
    ids=["zlib-64k", "zstd", "4k-clusters", "extended-l2", "512-refcount1"],
)
def test_compressed_writes_read_back_and_check_clean_in_qemu_img(
    tmp_path: Path, options: dict[str, object]
) -> None:
    """Compressible clusters are stored compressed (packed several per host cluster with
    small clusters), incompressible ones plainly, the partial last cluster padded."""
    cs = int(str(options.get("cluster_size", 64 * KiB)))
    tail = max(512, cs // 2)  # the last cluster is partial (but with 512-byte clusters)
    size = 40 * cs + tail
    path = tmp_path / "img.qcow2"
    ctype = str(options.get("compression_type", "zlib"))
    create_kwargs = {k: v for k, v in options.items() if k != "compression_type"}
    writes: dict[int, bytes] = {}
    for i in (0, 1, 2, 5, 17, 39):
        writes[i * cs] = _pattern(i, cs)
    writes[7 * cs] = os.urandom(cs)  # does not shrink: a normal cluster
    writes[40 * cs] = _pattern(40, tail)
    stored: dict[int, bool] = {}
    with qcow2.create(str(path), size, compression_type=ctype, **create_kwargs) as image:
        writer = CompressedWriter(image)
        for offset, data in writes.items():
            stored[offset] = writer.write(offset, data)
        writer.finish()
    assert stored[7 * cs] is False
    assert all(v for k, v in stored.items() if k != 7 * cs)
    assert path.stat().st_size % 512 == 0

    result = oracle.assert_clean(path)
    assert result["compressed-clusters"] == sum(stored.values())
    model = tmp_path / "model.raw"
    _write_model(model, size, writes)
    oracle.qemu_img("compare", "-f", "qcow2", "-F", "raw", str(path), str(model))
    compressed = _compressed_ranges(path)
    for offset, was_compressed in stored.items():
        covered = any(start <= offset < start + length for start, length in compressed)
        assert covered == was_compressed, offset
    info = json.loads(oracle.qemu_img("info", "--output=json", str(path)).stdout)
    assert info["format-specific"]["data"]["compression-type"] == ctype


def test_packed_clusters_span_host_clusters_with_one_reference_each(tmp_path: Path) -> None:
    """Compressed clusters are packed back to back, crossing into the next host cluster
    when it directly follows; every host cluster touched holds one reference per
    compressed cluster in it (qemu-img check finds neither leaks nor corruptions)."""
    path = tmp_path / "img.qcow2"
    # 512-byte clusters, each about 40% random: streams of ~220 bytes, two per host
    # cluster at most, so most of them straddle a host cluster boundary
    clusters = [os.urandom(200) + bytes(312) for _ in range(64)]
    with qcow2.create(str(path), 64 * 512, cluster_size=512) as image:
        writer = CompressedWriter(image)
        assert all(writer.write(i * 512, data) for i, data in enumerate(clusters))
        writer.finish()
    result = oracle.assert_clean(path)
    assert result["compressed-clusters"] == 64
    assert result["image-end-offset"] < 64 * 512  # packed: smaller than the guest data
    model = tmp_path / "model.raw"
    model.write_bytes(b"".join(clusters))
    oracle.qemu_img("compare", "-f", "qcow2", "-F", "raw", str(path), str(model))


def test_only_unallocated_or_zero_clusters_can_be_written(tmp_path: Path) -> None:
    """QEMU refuses a compressed write onto an allocated cluster (EIO) and accepts one onto
    a plain zero cluster; a refusal leaves the image clean."""
    path = oracle.create(tmp_path / "img.qcow2", MiB)
    oracle.qemu_io(path, "write -P 1 0 64k", "write -c -P 2 64k 64k", "write -z 128k 64k")
    with qcow2.open(str(path), writable=True) as image:
        writer = CompressedWriter(image)
        for offset in (0, 64 * KiB):
            with pytest.raises(qcow2.Qcow2IOError, match="already allocated"):
                writer.write(offset, _pattern(9, 64 * KiB))
        assert writer.write(128 * KiB, _pattern(3, 64 * KiB))
        writer.finish()
    result = oracle.assert_clean(path)
    assert result["compressed-clusters"] == 2
    model = tmp_path / "model.raw"
    _write_model(
        model,
        MiB,
        {0: b"\x01" * 64 * KiB, 64 * KiB: b"\x02" * 64 * KiB, 128 * KiB: _pattern(3, 64 * KiB)},
    )
    oracle.qemu_img("compare", "-f", "qcow2", "-F", "raw", str(path), str(model))


@pytest.mark.parametrize(
    ("offset", "length"),
    [(512, 64 * KiB), (0, 4096), (0, 64 * KiB + 1), (0, 0)],
    ids=["unaligned", "short-not-last", "too-long", "empty"],
)
def test_writes_that_are_not_one_cluster_are_refused(
    tmp_path: Path, offset: int, length: int
) -> None:
    path = oracle.create(tmp_path / "img.qcow2", MiB)
    before = path.read_bytes()
    with (
        qcow2.open(str(path), writable=True) as image,
        pytest.raises(qcow2.InvalidImageError, match="compressed write at"),
    ):
        CompressedWriter(image).write(offset, b"a" * length)
    assert path.read_bytes() == before


def test_read_only_image_is_refused(tmp_path: Path) -> None:
    path = oracle.create(tmp_path / "img.qcow2", MiB)
    with qcow2.open(str(path)) as image, pytest.raises(qcow2.ReadOnlyError):
        CompressedWriter(image)


def test_zstd_creation_matches_qemu_img_header(tmp_path: Path) -> None:
    """A zstd image we create has qemu-img's cluster 0 for the same options."""
    ours, theirs = tmp_path / "o.qcow2", tmp_path / "q.qcow2"
    qcow2.create(str(ours), 8 * MiB, compression_type="zstd").close()
    oracle.create(theirs, 8 * MiB, compression_type="zstd")
    assert ours.read_bytes()[:4096] == theirs.read_bytes()[:4096]
    oracle.assert_clean(ours)


def test_compression_type_is_validated_like_qemu_img(tmp_path: Path) -> None:
    with pytest.raises(qcow2.InvalidImageError, match="does not accept value 'lz4'"):
        qcow2.create(str(tmp_path / "a.qcow2"), MiB, compression_type="lz4")
    with pytest.raises(qcow2.InvalidImageError, match=r"compatibility level 1\.1"):
        qcow2.create(str(tmp_path / "b.qcow2"), MiB, compression_type="zstd", version=2)
    assert not (tmp_path / "a.qcow2").exists() and not (tmp_path / "b.qcow2").exists()

"""Differential tests of the qcow2 core against qemu-img / qemu-io.

Images we write must be ``qemu-img check`` clean and read back (``qemu-img compare``
against a sparse raw model, or ``convert -O raw``) exactly as our in-memory model says;
images QEMU writes must read back byte-identical through our reader; our writes into
QEMU-made images (shared clusters after a snapshot, compressed clusters) stay clean.
"""

from __future__ import annotations

import itertools
import os
import random
from pathlib import Path

import pytest

import qcow2
from qcow2.format import layout
from tests.helpers import need
from tests.qcow2 import oracle

MiB = 1024 * 1024


class Model:
    """The expected guest content, kept as a sparse raw file (``qemu-img compare``)."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        with open(path, "wb") as f:
            f.truncate(size)

    def write(self, offset: int, data: bytes) -> None:
        with open(self.path, "r+b") as f:
            f.seek(offset)
            f.write(data)

    def zero(self, offset: int, length: int) -> None:
        with open(self.path, "r+b") as f:
            f.seek(offset)
            f.write(bytes(length))

    def read(self, offset: int, length: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def resize(self, size: int) -> None:
        with open(self.path, "r+b") as f:
            f.truncate(size)
        self.size = size


def assert_same_as_model(image_path: Path, model: Model) -> None:
    """qemu-img check is clean and qemu-img compare finds the model's content."""
    oracle.assert_clean(image_path)
    proc = oracle.qemu_img(
        "compare", "-f", "qcow2", "-F", "raw", str(image_path), str(model.path), ok=(0, 1)
    )
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()


def discarded_range(offset: int, length: int, cluster_size: int, size: int) -> tuple[int, int]:
    """The part of a discard QEMU 7.2 acts on: whole clusters (and the final partial one)."""
    start = layout.align_up(offset, cluster_size)
    end = offset + length
    stop = end if end == size and offset % cluster_size == 0 else end // cluster_size * cluster_size
    return start, max(start, stop)


def _matrix() -> list[tuple[int, int, int]]:
    combos = [(2, cs, 16) for cs in (512, 4096, 65536, 2 * MiB)]
    for cs in (512, 4096, 65536, 2 * MiB):
        combos += [(3, cs, 1 << order) for order in range(7)]
    return combos


@pytest.mark.parametrize(("version", "cluster_size", "refcount_bits"), _matrix())
def test_written_images_match_model(
    tmp_path: Path, version: int, cluster_size: int, refcount_bits: int
) -> None:
    need("qemu-img")
    path = tmp_path / "ours.qcow2"
    size = 6 * cluster_size + 2 * MiB + 1536
    model = Model(tmp_path / "model.raw", size)
    rnd = random.Random(f"{version}-{cluster_size}-{refcount_bits}")
    with qcow2.create(
        str(path), size, cluster_size=cluster_size, refcount_bits=refcount_bits, version=version
    ) as image:
        cs = cluster_size
        # partial, cross-cluster, cross-L2 (for small clusters), whole clusters, tail
        l2_span = cs * (cs // 8)
        writes = [
            (100, 3000),
            (cs - 10, 20),
            (2 * cs, 3 * cs),
            (min(l2_span, size - 2 * cs) - cs // 2, cs),
            (size - 700, 700),
            (size - MiB - 7, 200_000),
        ]
        for offset, length in writes:
            data = rnd.randbytes(length)
            image.write(offset, data)
            model.write(offset, data)
        image.write_zeroes(size - MiB + 100, 5000)
        model.zero(size - MiB + 100, 5000)
        image.write_zeroes(2 * cs, 2 * cs, unmap=True)
        model.zero(2 * cs, 2 * cs)
        image.discard(0, 2 * cs)
        lo, hi = discarded_range(0, 2 * cs, cs, size)
        model.zero(lo, hi - lo)
        image.write(3 * cs + 1, b"after discard")
        model.write(3 * cs + 1, b"after discard")
        assert image.read(0, size) == model.read(0, size)
    assert_same_as_model(path, model)


@pytest.mark.parametrize("version", [2, 3])
def test_resize_grow_and_shrink(tmp_path: Path, version: int) -> None:
    need("qemu-img")
    path = tmp_path / "r.qcow2"
    model = Model(tmp_path / "model.raw", 2 * MiB)
    with qcow2.create(str(path), 2 * MiB, version=version, cluster_size=4096) as image:
        data = random.Random(1).randbytes(2 * MiB)
        image.write(0, data)
        model.write(0, data)
        image.resize(1_000_001)  # qemu rounds sizes up to 512 bytes
        assert image.virtual_size == 1_000_448
        model.resize(1_000_448)
        image.resize(40 * MiB)  # L1 grows (2 MiB per L2 table with 4 KiB clusters)
        model.resize(40 * MiB)
        image.write(40 * MiB - 5, b"12345")
        model.write(40 * MiB - 5, b"12345")
    assert oracle.info(path)["virtual-size"] == 40 * MiB
    assert_same_as_model(path, model)


def test_cross_l2_with_64k_clusters(tmp_path: Path) -> None:
    """A write across the 512 MiB boundary of two L2 tables, L1 growth by resize."""
    need("qemu-img")
    path = tmp_path / "big.qcow2"
    size = 600 * MiB
    model = Model(tmp_path / "model.raw", size)
    with qcow2.create(str(path), 100 * MiB) as image:
        image.resize(size)
        data = random.Random(2).randbytes(200_000)
        image.write(512 * MiB - 100_000, data)
        model.write(512 * MiB - 100_000, data)
    assert_same_as_model(path, model)


def test_refcount_table_growth(tmp_path: Path) -> None:
    """512-byte clusters with 64-bit refcounts: the reftable must move several times."""
    need("qemu-img")
    path = tmp_path / "g.qcow2"
    model = Model(tmp_path / "model.raw", 8 * MiB)
    with qcow2.create(str(path), 8 * MiB, cluster_size=512, refcount_bits=64) as image:
        first_table = image.header.refcount_table_offset
        data = random.Random(3).randbytes(3 * MiB)
        image.write(4 * MiB, data)
        model.write(4 * MiB, data)
        assert image.header.refcount_table_offset != first_table
    assert_same_as_model(path, model)


# Section: images made by QEMU


def _qemu_made(tmp_path: Path) -> dict[str, Path]:
    """A set of images written by qemu-io / qemu-img in every way our reader must handle."""
    images: dict[str, Path] = {}
    rnd = random.Random(7)
    src = tmp_path / "src.raw"
    content = bytearray(rnd.randbytes(2 * MiB))
    content[MiB // 2 : MiB] = bytes(MiB // 2)
    content[MiB : MiB + MiB // 2] = b"compressible" * (MiB // 24) + bytes(MiB // 2 % 12)
    src.write_bytes(bytes(content))
    for name, options in {
        "v3_64k": {},
        "v3_4k": {"cluster_size": 4096},
        "v2": {"compat": "0.10"},
        "extl2": {"extended_l2": True},
        "extl2_16k": {"extended_l2": True, "cluster_size": 16384},
        "refcount1": {"refcount_bits": 1, "cluster_size": 512},
    }.items():
        path = oracle.create(tmp_path / f"{name}.qcow2", 4 * MiB, **options)
        oracle.qemu_io(
            path,
            "write -P 0x11 0 100k",
            "write -P 0x22 70000 3000",
            "write -z 200k 64k",
            "write -z -u 0 8k",
            "discard 1M 256k",
            "write -P 0x33 1M 5000",
            "write -z 2000 500",
            "write -P 0x44 3M 1M",
        )
        images[name] = path
    for name, opts in {
        "compressed_zlib": "compression_type=zlib",
        "compressed_zstd": "compression_type=zstd",
        "compressed_512": "cluster_size=512",  # one bit of sector count
        "compressed_extl2": "extended_l2=on,compression_type=zstd",
    }.items():
        path = tmp_path / f"{name}.qcow2"
        oracle.qemu_img(
            "convert", "-f", "raw", "-c", "-O", "qcow2", "-o", opts, str(src), str(path)
        )
        images[name] = path
    base = oracle.create(tmp_path / "base.qcow2", 4 * MiB)
    oracle.qemu_io(base, "write -P 0x55 0 4M")
    mid = tmp_path / "mid.qcow2"
    oracle.qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(mid))
    oracle.qemu_io(mid, "write -P 0x66 64k 100k", "discard 1M 64k", "write -z 2M 64k")
    top = tmp_path / "top.qcow2"
    oracle.qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", str(top), "6M")
    oracle.qemu_io(top, "write -P 0x77 3000 70000")
    images["chain_top"] = top
    raw_base = tmp_path / "rawbase.raw"
    raw_base.write_bytes(rnd.randbytes(3 * MiB))
    overlay = tmp_path / "overlay_extl2.qcow2"
    oracle.qemu_img(
        "create", "-q", "-f", "qcow2", "-b", "rawbase.raw", "-F", "raw",
        "-o", "extended_l2=on", str(overlay), "4M",
    )  # fmt: skip
    oracle.qemu_io(overlay, "write -P 0x12 5000 3000", "write -z 64k 4k", "discard 128k 64k")
    images["raw_backed_extl2"] = overlay
    snap = oracle.create(tmp_path / "snap.qcow2", 4 * MiB)
    oracle.qemu_io(snap, "write -P 0x01 0 1M")
    oracle.snapshot(snap, "create", "s1")
    oracle.qemu_io(snap, "write -P 0x02 512k 1M")
    images["snapshot"] = snap
    return images


@pytest.fixture(scope="module")
def qemu_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    need("qemu-io")
    return _qemu_made(tmp_path_factory.mktemp("qemu_made"))


def test_reads_qemu_images_byte_identical(qemu_images: dict[str, Path]) -> None:
    for name, path in qemu_images.items():
        expected = oracle.convert(path)
        with qcow2.open(str(path)) as image:
            assert image.read(0, image.virtual_size) == expected, name


def test_compressed_images_are_really_compressed(qemu_images: dict[str, Path]) -> None:
    """Guard: the compressed fixtures must contain compressed clusters to test anything."""
    for name in ("compressed_zlib", "compressed_zstd", "compressed_512", "compressed_extl2"):
        result = oracle.check(qemu_images[name])
        assert result.get("compressed-clusters", 0) > 0, name


@pytest.mark.parametrize(
    "name",
    [
        "v3_64k",
        "v2",
        "extl2",
        "refcount1",
        "compressed_zlib",
        "compressed_zstd",
        "compressed_512",
        "compressed_extl2",
        "chain_top",
        "raw_backed_extl2",
        "snapshot",
    ],
)
def test_our_writes_into_qemu_images(
    qemu_images: dict[str, Path], tmp_path: Path, name: str
) -> None:
    """Overwrite compressed / shared / backing-file clusters; qemu reads what we wrote."""
    src = qemu_images[name]
    work = tmp_path / src.name
    for sibling in src.parent.iterdir():  # keep the backing chain next to the copy
        if sibling.is_file():
            (tmp_path / sibling.name).write_bytes(sibling.read_bytes())
    snapshot_before = oracle.convert(work, snapshot="s1") if name == "snapshot" else None
    model = Model(tmp_path / "model.raw", 0)
    model.write(0, oracle.convert(work))
    rnd = random.Random(name)
    with qcow2.open(str(work), writable=True) as image:
        size = image.virtual_size
        cs = image.cluster_size
        for _ in range(30):
            offset = rnd.randrange(size - 1)
            length = min(rnd.randrange(1, 150_000), size - offset)
            pick = rnd.random()
            if pick < 0.6:
                data = rnd.randbytes(length)
                image.write(offset, data)
                model.write(offset, data)
            elif pick < 0.8:
                image.write_zeroes(offset, length, unmap=pick < 0.7)
                model.zero(offset, length)
            elif image.version >= 3:
                image.discard(offset, length)
                lo, hi = discarded_range(offset, length, cs, size)
                model.zero(lo, hi - lo)
        assert image.read(0, size) == model.read(0, size)
    assert_same_as_model(work, model)
    if snapshot_before is not None:
        assert oracle.convert(work, snapshot="s1") == snapshot_before


def test_backing_relative_path_resolves_against_image_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    need("qemu-img")
    sub = tmp_path / "d"
    sub.mkdir()
    base = oracle.create(sub / "base.qcow2", MiB)
    oracle.qemu_io(base, "write -P 0x5a 0 1M")
    with qcow2.create(str(sub / "top.qcow2"), backing_file="base.qcow2") as top:
        assert top.virtual_size == MiB
        assert top.backing_file == "base.qcow2"
        top.write(10, b"top")
    monkeypatch.chdir(tmp_path)  # the name must not be resolved against the cwd
    with qcow2.open("d/top.qcow2") as top:
        assert top.read(0, 20) == b"\x5a" * 10 + b"top" + b"\x5a" * 7
    assert oracle.convert(sub / "top.qcow2") == qcow2.open(str(sub / "top.qcow2")).read(0, MiB)
    assert oracle.info(sub / "top.qcow2")["backing-filename-format"] == "qcow2"


def test_backing_loop_missing_and_too_deep(tmp_path: Path) -> None:
    need("qemu-img")
    a = oracle.create(tmp_path / "a.qcow2", MiB)
    missing = tmp_path / "m.qcow2"
    oracle.qemu_img("create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", str(missing))
    oracle.qemu_img("rebase", "-u", "-b", "gone.qcow2", "-F", "qcow2", str(missing))
    with pytest.raises(qcow2.BackingChainError, match=r"gone\.qcow2"):
        qcow2.open(str(missing))
    b = tmp_path / "b.qcow2"
    oracle.qemu_img("create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", str(b))
    # Make a point back at b (qemu-img itself must not open the loop afterwards: it hangs).
    oracle.qemu_img("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", str(a))
    with pytest.raises(qcow2.BackingChainError, match="loops"):
        qcow2.open(str(b))
    prev = oracle.create(tmp_path / "c0.qcow2", MiB)
    for i in range(1, layout.MAX_BACKING_CHAIN_DEPTH + 1):
        nxt = tmp_path / f"c{i}.qcow2"
        oracle.qemu_img("create", "-q", "-f", "qcow2", "-b", prev.name, "-F", "qcow2", str(nxt))
        prev = nxt
    with pytest.raises(qcow2.BackingChainError, match="deeper"):
        qcow2.open(str(prev))
    with qcow2.open(str(tmp_path / f"c{layout.MAX_BACKING_CHAIN_DEPTH - 1}.qcow2")) as ok:
        assert ok.read(0, 4) == bytes(4)


def test_zstd_and_extl2_created_by_us_are_readable_by_qemu(tmp_path: Path) -> None:
    need("qemu-img")
    path = tmp_path / "e.qcow2"
    model = Model(tmp_path / "model.raw", 4 * MiB)
    with qcow2.create(str(path), 4 * MiB, extended_l2=True, cluster_size=32768) as image:
        data = random.Random(4).randbytes(5000)
        image.write(1000, data)  # touches subclusters 0..5 of cluster 0 only
        model.write(1000, data)
        image.write_zeroes(40_000, 2048)  # one whole subcluster: zero bit only
        model.zero(40_000, 2048)
        image.write_zeroes(65536, 32768)
        model.zero(65536, 32768)
    assert_same_as_model(path, model)
    mapping = oracle.map_json(path)
    assert any(not extent["data"] and extent["zero"] for extent in mapping)


def test_errors_are_typed_for_bad_requests(tmp_path: Path) -> None:
    path = tmp_path / "x.qcow2"
    with qcow2.create(str(path), MiB) as image:
        with pytest.raises(qcow2.OutOfRangeError):
            image.write(MiB - 1, b"ab")
        with pytest.raises(qcow2.OutOfRangeError):
            image.read(-1, 1)
    with qcow2.open(str(path)) as image, pytest.raises(qcow2.ReadOnlyError):
        image.write(0, b"x")
    with pytest.raises(qcow2.UnsupportedFeatureError, match="Cluster size"):
        qcow2.create(str(tmp_path / "y.qcow2"), MiB, cluster_size=1000)
    with pytest.raises(qcow2.UnsupportedFeatureError, match="Refcount width"):
        qcow2.create(str(tmp_path / "y.qcow2"), MiB, refcount_bits=128)
    with pytest.raises(qcow2.UnsupportedFeatureError, match="16384"):
        qcow2.create(str(tmp_path / "y.qcow2"), MiB, extended_l2=True, cluster_size=4096)
    with pytest.raises(qcow2.UnsupportedFeatureError, match="image size is too large"):
        qcow2.create(str(tmp_path / "huge.qcow2"), 100 * 2**50)
    assert not os.path.exists(tmp_path / "huge.qcow2")  # refused before creating anything
    with pytest.raises(qcow2.Qcow2IOError):
        qcow2.open(str(tmp_path / "does-not-exist.qcow2"))
    assert not os.path.exists(tmp_path / "does-not-exist.qcow2")


@pytest.mark.parametrize(
    "options", [{}, {"cluster_size": 4096}, {"compat": "0.10"}, {"cluster_size": 512}]
)
def test_file_identical_to_qemu_io_for_the_same_writes(
    tmp_path: Path, options: dict[str, object]
) -> None:
    """Same creation options and writes: the very same file as qemu-img + qemu-io
    (fresh layout, first-fit allocation order, COW padding, L2 placement)."""
    need("qemu-io")
    theirs = oracle.create(tmp_path / "theirs.qcow2", 64 * MiB, **options)
    oracle.qemu_io(
        theirs, "write -P 1 0 64k", "write -P 2 1M 128k", "write -P 3 100k 4k", "write -P 4 40M 1"
    )
    cluster_size = int(options.get("cluster_size", 65536))  # type: ignore[call-overload]
    version = 2 if options.get("compat") == "0.10" else 3
    ours = tmp_path / "ours.qcow2"
    with qcow2.create(str(ours), 64 * MiB, cluster_size=cluster_size, version=version) as image:
        image.write(0, b"\x01" * 65536)
        image.write(MiB, b"\x02" * 131072)
        image.write(100 * 1024, b"\x03" * 4096)
        image.write(40 * MiB, b"\x04")
    assert ours.read_bytes() == theirs.read_bytes()


def test_shrink_identical_to_qemu_img(tmp_path: Path) -> None:
    """resize(smaller) drops the clusters past the end and truncates the host file after
    the last used cluster exactly as ``qemu-img resize --shrink`` does."""
    need("qemu-io")
    theirs = oracle.create(tmp_path / "theirs.qcow2", 8 * MiB)
    oracle.qemu_io(theirs, "write -P 1 0 8M")
    ours = tmp_path / "ours.qcow2"
    ours.write_bytes(theirs.read_bytes())
    oracle.qemu_img("resize", "-q", "--shrink", str(theirs), "1M")
    with qcow2.open(str(ours), writable=True) as image:
        image.resize(MiB)
    assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.parametrize("op", ["zero", "discard", "write"])
@pytest.mark.parametrize(
    "options",
    [
        {"cluster_size": 512, "version": 3},
        {"cluster_size": 512, "version": 2},
        {"cluster_size": 16384, "extended_l2": True},
    ],
)
def test_operations_at_every_boundary(tmp_path: Path, options: dict[str, int], op: str) -> None:
    """write_zeroes / discard / write over dense or sparse data, for offsets and lengths
    around cluster (and subcluster) boundaries: every case reads back as the model says
    and the image stays clean."""
    need("qemu-img")
    path = tmp_path / "z.qcow2"
    cs = options["cluster_size"]
    gran = cs // (32 if options.get("extended_l2") else 1)
    span = 4 * max(gran, cs)
    size = 32 * span
    model = Model(tmp_path / "model.raw", size)
    with qcow2.create(str(path), size, **options) as image:  # type: ignore[arg-type]
        fill = bytes(range(1, 256)) * (span // 255 + 1)
        base = 0
        for dense, start, length in itertools.product(
            (True, False), (0, 1, gran - 1), (1, gran - 1, gran, gran + 1, 2 * gran + 1)
        ):
            if dense:
                image.write(base, fill[:span])
                model.write(base, fill[:span])
            else:  # data only in the second granule: the first one stays unallocated
                image.write(base + gran, b"\x01")
                model.write(base + gran, b"\x01")
            if op == "zero":
                image.write_zeroes(base + start, length)
                model.zero(base + start, length)
            elif op == "write":
                image.write(base + start, b"\xee" * length)
                model.write(base + start, b"\xee" * length)
            else:
                image.discard(base + start, length)  # v2 and v3 alike without backing
                lo, hi = discarded_range(base + start, length, cs, size)
                model.zero(lo, hi - lo)
            assert image.read(base, span) == model.read(base, span), (dense, start, length)
            base += span
    assert_same_as_model(path, model)

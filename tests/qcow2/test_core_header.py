"""Header parsing/serialization, the refcount codec, and hostile images.

Oracles: qemu-img's own images (``pack_cluster0`` must reproduce their cluster 0 byte for
byte), qemu-img's error messages for the same malformed header, and qemu-img check's
"Leaked cluster N refcount=R" report for refcount entries we encode.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import pytest

import qcow2
from qcow2.format import layout
from qcow2.format.header import HeaderExtension, read_header
from qcow2.format.refcount import read_refcount, write_refcount
from qcow2.io.fileio import HostFile
from tests.helpers import need
from tests.qcow2 import oracle

MiB = 1024 * 1024


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"compat": "0.10"},
        {"cluster_size": 4096},
        {"cluster_size": 512, "refcount_bits": 1},
        {"extended_l2": True, "compression_type": "zstd"},
        {"lazy_refcounts": True},
    ],
)
def test_cluster0_round_trip(tmp_path: Path, options: dict[str, object]) -> None:
    need("qemu-img")
    base = oracle.create(tmp_path / "base.qcow2", MiB)
    path = tmp_path / "img.qcow2"
    opts = ",".join(f"{k}={'on' if v is True else v}" for k, v in options.items())
    args = ["create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2"]
    if opts:
        args += ["-o", opts]
    oracle.qemu_img(*args, str(path), "4M")
    raw = path.read_bytes()
    f = HostFile(str(path), writable=False)
    try:
        header = read_header(f)
    finally:
        f.close()
    info = oracle.info(path)
    assert header.size == info["virtual-size"]
    assert header.cluster_size == info["cluster-size"]
    assert header.backing_file == base.name
    assert header.backing_format == "qcow2"
    if "format-specific" in info and "refcount-bits" in info["format-specific"]["data"]:
        assert header.refcount_bits == info["format-specific"]["data"]["refcount-bits"]
    packed = header.copy().pack_cluster0()
    assert raw[: len(packed)] == packed


def test_unknown_extensions_and_header_fields_are_preserved(tmp_path: Path) -> None:
    """An unknown extension and extra header bytes survive pack_cluster0, in order."""
    need("qemu-img")
    path = oracle.create(tmp_path / "x.qcow2", MiB)
    f = HostFile(str(path), writable=False)
    try:
        header = read_header(f)
    finally:
        f.close()
    unknown = HeaderExtension(0x12345678, b"hello")
    header.extensions.append(unknown)
    header.header_length = 120
    header.unknown_header_fields = b"\x01" * 8
    packed = header.pack_cluster0()
    path.write_bytes(packed + path.read_bytes()[len(packed) :])
    f = HostFile(str(path), writable=False)
    try:
        again = read_header(f)
    finally:
        f.close()
    assert again.unknown_header_fields == b"\x01" * 8
    assert again.extensions[-1] == unknown
    assert again.copy().pack_cluster0() == packed
    info = oracle.info(path)  # qemu accepts what we wrote
    assert info["virtual-size"] == MiB


# Section: refcount codec


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16, 32, 64])
def test_refcount_codec_against_qemu_check(tmp_path: Path, bits: int) -> None:
    """Raise an unused cluster's refcount with our encoder: qemu-img check must report
    exactly that cluster leaked with exactly that refcount."""
    need("qemu-img")
    path = oracle.create(tmp_path / "r.qcow2", 4 * MiB, refcount_bits=bits, cluster_size=512)
    # Data clusters, then a discard: a free cluster (a hole) below the end of the file.
    oracle.qemu_io(path, "write -P 1 0 8k", "discard 2k 1k")
    f = HostFile(str(path), writable=True)
    try:
        header = read_header(f)
        reftable0 = struct.unpack(">Q", f.pread(header.refcount_table_offset, 8))[0]
        block = bytearray(f.pread(reftable0, header.cluster_size))
        holes = [i for i in range(f.size() // 512) if read_refcount(block, i, bits) == 0]
        assert len(holes) == 2  # the two discarded clusters
        target = holes[0]
        before = [read_refcount(block, i, bits) for i in range(header.refblock_entries)]
        value = (1 << bits) - 1
        write_refcount(block, target, bits, value)
        after = [read_refcount(block, i, bits) for i in range(header.refblock_entries)]
        assert after[target] == value
        assert after[:target] + after[target + 1 :] == before[:target] + before[target + 1 :]
        f.pwrite(reftable0, bytes(block))
    finally:
        f.close()
    result = oracle.check(path)
    assert result["exit-code"] == oracle.CHECK_LEAKS
    assert f"Leaked cluster {target} refcount={value} reference=0" in result["stderr"]
    assert result["leaks"] == 1


def test_refcount_codec_rejects_values_too_wide() -> None:
    block = bytearray(8)
    with pytest.raises(ValueError):
        write_refcount(block, 0, 4, 16)


# Section: hostile headers


def _patch(path: Path, offset: int, fmt: str, value: int) -> None:
    data = bytearray(path.read_bytes())
    struct.pack_into(">" + fmt, data, offset, value)
    path.write_bytes(bytes(data))


def _field(name: str, value: int) -> Callable[[Path], None]:
    def patch(path: Path) -> None:
        _patch(path, layout.field_offset(name), _FIELD_FORMATS[name], value)

    return patch


_FIELD_FORMATS = dict(layout.HEADER_FIELDS)


def _truncate(n: int) -> Callable[[Path], None]:
    def patch(path: Path) -> None:
        path.write_bytes(path.read_bytes()[:n])

    return patch


def _extension_too_large(path: Path) -> None:
    # The feature table extension at 112 claims more bytes than cluster 0 has left.
    _patch(path, 112 + 4, "I", 0x10000)


#: (name, patch, expected error class, message regex, qemu says the same)
HOSTILE = [
    ("truncated", _truncate(50), qcow2.InvalidImageError, "Could not read qcow2 header", False),
    ("magic", _field("magic", 0x12345678), qcow2.InvalidImageError, "not in qcow2 format", True),
    (
        "version",
        _field("version", 4),
        qcow2.UnsupportedFeatureError,
        "Unsupported qcow2 version 4",
        True,
    ),
    (
        "cluster_bits",
        _field("cluster_bits", 22),
        qcow2.InvalidImageError,
        r"Unsupported cluster size: 2\^22",
        True,
    ),
    (
        "header_length",
        _field("header_length", 96),
        qcow2.InvalidImageError,
        "qcow2 header too short",
        True,
    ),
    (
        "huge_l1",
        _field("l1_size", 0x7FFFFFFF),
        qcow2.CorruptImageError,
        "Active L1 table too large",
        True,
    ),
    ("small_l1", _field("l1_size", 0), qcow2.CorruptImageError, "L1 table is too small", True),
    (
        "l1_unaligned",
        _field("l1_table_offset", 0x30001),
        qcow2.CorruptImageError,
        "Active L1 table offset invalid",
        True,
    ),
    (
        "l1_past_eof",
        _field("l1_table_offset", 0x7FFF0000),
        qcow2.CorruptImageError,
        "extends past the end of the file",
        False,
    ),
    (
        "no_reftable",
        _field("refcount_table_clusters", 0),
        qcow2.CorruptImageError,
        "does not contain a reference count table",
        True,
    ),
    (
        "huge_reftable",
        _field("refcount_table_clusters", 0x10000),
        qcow2.CorruptImageError,
        "Reference count table too large",
        True,
    ),
    (
        "reftable_past_eof",
        _field("refcount_table_offset", 0x100000000),
        qcow2.CorruptImageError,
        "extends past the end of the file",
        False,
    ),
    (
        "snapshots_unaligned",
        _field("snapshots_offset", 0x123),
        qcow2.CorruptImageError,
        "Snapshot table offset invalid",
        True,
    ),
    (
        "too_many_snapshots",
        _field("nb_snapshots", 70000),
        qcow2.CorruptImageError,
        "Snapshot table too large",
        True,
    ),
    (
        "unknown_incompat",
        _field("incompatible_features", 1 << 5),
        qcow2.UnsupportedFeatureError,
        "Unsupported qcow2 feature\\(s\\): Unknown incompatible feature: 20",
        True,
    ),
    (
        "compression_type",
        _field("compression_type", 2),
        qcow2.UnsupportedFeatureError,
        "unknown compression type: 2",
        True,
    ),
    (
        "zstd_without_bit",
        _field("compression_type", 1),
        qcow2.InvalidImageError,
        "incompatible feature bit must be set",
        True,
    ),
    (
        "refcount_order",
        _field("refcount_order", 7),
        qcow2.InvalidImageError,
        "Reference count entry width too large",
        True,
    ),
    (
        "crypt_method",
        _field("crypt_method", 3),
        qcow2.UnsupportedFeatureError,
        "Unsupported encryption method 3",
        True,
    ),
    (
        "backing_offset",
        _field("backing_file_offset", 0x20000),
        qcow2.InvalidImageError,
        "Invalid backing file offset",
        True,
    ),
    (
        "extension_overrun",
        _extension_too_large,
        qcow2.InvalidImageError,
        "Header extension too large",
        True,
    ),
    (
        # qemu-img info opens without I/O and accepts it; map and qemu-io refuse it alike
        "data_file_raw_without_data_file",
        _field("autoclear_features", layout.AUTOCLEAR_DATA_FILE_RAW),
        qcow2.InvalidImageError,
        "data-file-raw requires a data file",
        False,
    ),
]


@pytest.mark.parametrize(
    ("name", "patch", "error", "message", "qemu_agrees"), HOSTILE, ids=[h[0] for h in HOSTILE]
)
def test_hostile_headers(
    tmp_path: Path,
    name: str,
    patch: Callable[[Path], None],
    error: type[Exception],
    message: str,
    qemu_agrees: bool,
) -> None:
    need("qemu-img")
    path = oracle.create(tmp_path / f"{name}.qcow2", MiB)
    oracle.qemu_io(path, "write -P 7 0 64k")
    patch(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    for writable in (False, True):
        with pytest.raises(error, match=message) as caught:
            qcow2.open(str(path), writable=writable)
        assert str(path) in str(caught.value)
        assert "\n" not in str(caught.value)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    if qemu_agrees:
        proc = oracle.qemu_img("info", "-f", "qcow2", str(path), ok=(1,))
        assert re.search(message, proc.stderr.decode()), proc.stderr.decode()


#: read_header's QEMU modes and the qemu-img command whose open each one mirrors.
QEMU_MODES = [
    pytest.param("qemu", False, "info", id="qemu-no-io-as-info"),
    pytest.param("qemu", True, "map", id="qemu-as-map"),
    pytest.param("check", True, "check", id="check-as-check"),
]


@pytest.mark.parametrize(("mode", "io", "command"), QEMU_MODES)
@pytest.mark.parametrize(
    ("name", "patch", "qemu_agrees"),
    [(h[0], h[1], h[4]) for h in HOSTILE],
    ids=[h[0] for h in HOSTILE],
)
def test_qemu_modes_open_what_qemu_img_opens(
    tmp_path: Path,
    name: str,
    patch: Callable[[Path], None],
    qemu_agrees: bool,
    mode: Literal["qemu", "check"],
    io: bool,
    command: str,
) -> None:
    """A QEMU mode refuses a header exactly when the qemu-img command it mirrors cannot
    open the image, with qemu-img's message; what it accepts it reports unaltered."""
    path = oracle.create(tmp_path / f"{name}.qcow2", MiB)
    oracle.qemu_io(path, "write -P 7 0 64k")
    patch(path)
    proc = oracle.qemu_img(command, "-f", "qcow2", str(path), ok=(0, 1, 2, 3))
    stderr = proc.stderr.decode()
    theirs_refused = f"Could not open '{path}'" in stderr
    f = HostFile(str(path), writable=False)
    try:
        header = read_header(f, mode=mode, io=io)
    except qcow2.Qcow2Error as err:
        assert theirs_refused, f"qemu-img {command} opened it; we said {err}"
        if qemu_agrees:
            assert err.message in stderr
        return
    finally:
        f.close()
    assert not theirs_refused, f"we opened it; qemu-img {command} said {stderr}"
    fixed = struct.unpack_from(layout.HEADER_V3_FULL_STRUCT.format, path.read_bytes())
    for (field, _), value in zip(layout.HEADER_FIELDS, fixed, strict=True):
        if field not in ("compression_type", "padding"):  # normalized for short headers
            assert getattr(header, field) == value, field


def _l2_offset(path: Path) -> int:
    f = HostFile(str(path), writable=False)
    try:
        header = read_header(f)
        l1e = struct.unpack(">Q", f.pread(header.l1_table_offset, 8))[0]
        return int(l1e & layout.L1E_OFFSET_MASK)
    finally:
        f.close()


@pytest.mark.parametrize("case", ["l2_unaligned", "data_unaligned", "v2_zero_flag", "bad_zlib"])
def test_corrupt_metadata_raises_typed_error_without_writing(tmp_path: Path, case: str) -> None:
    need("qemu-io")
    path = tmp_path / "c.qcow2"
    if case == "bad_zlib":
        src = tmp_path / "src.raw"
        src.write_bytes(b"abc" * 100_000)
        oracle.qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", str(src), str(path))
    else:
        oracle.create(path, MiB, **({"compat": "0.10"} if case == "v2_zero_flag" else {}))
        oracle.qemu_io(path, "write -P 7 0 64k")
    l2 = _l2_offset(path)
    data = bytearray(path.read_bytes())
    if case == "l2_unaligned":
        f_off = read_header_offset(path)
        struct.pack_into(">Q", data, f_off, (l2 + 512) | layout.OFLAG_COPIED)
    else:
        entry = struct.unpack_from(">Q", data, l2)[0]
        if case == "data_unaligned":
            struct.pack_into(">Q", data, l2, entry + 512)
        elif case == "v2_zero_flag":
            struct.pack_into(">Q", data, l2, entry | layout.OFLAG_ZERO)
        else:
            assert entry & layout.OFLAG_COMPRESSED
            coffset = entry & layout.compressed_offset_mask(16)
            data[coffset : coffset + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    before = path.read_bytes()
    with qcow2.open(str(path), writable=True) as image:
        with pytest.raises(qcow2.CorruptImageError):
            image.read(0, 65536)
        with pytest.raises(qcow2.CorruptImageError):
            image.write(0, b"x" * 100)
    if case in ("l2_unaligned", "data_unaligned"):
        # QEMU marks a v3 image corrupt (incompatible bit 1), and changes nothing else
        marked = bytearray(before)
        marked[layout.field_offset("incompatible_features") + 7] |= layout.INCOMPAT_CORRUPT
        before = bytes(marked)
    assert path.read_bytes() == before


def read_header_offset(path: Path) -> int:
    """Host offset of the first active L1 entry."""
    f = HostFile(str(path), writable=False)
    try:
        return read_header(f).l1_table_offset
    finally:
        f.close()


def test_corrupt_bit_allows_reading_only(tmp_path: Path) -> None:
    need("qemu-img")
    path = oracle.create(tmp_path / "c.qcow2", MiB)
    oracle.qemu_io(path, "write -P 9 0 4k")
    _patch(path, layout.field_offset("incompatible_features"), "Q", layout.INCOMPAT_CORRUPT)
    with qcow2.open(str(path)) as image:
        assert image.read(0, 4) == b"\x09" * 4
    with pytest.raises(qcow2.ReadOnlyError, match="Image is corrupt; cannot be opened read/write"):
        qcow2.open(str(path), writable=True)
    # QEMU refuses the read-write open with the same message.
    proc = oracle.qemu_img("resize", str(path), "2M", ok=(1,))
    assert b"Image is corrupt; cannot be opened read/write" in proc.stderr


def test_unknown_autoclear_bits_cleared_on_writable_open(tmp_path: Path) -> None:
    need("qemu-img")
    path = oracle.create(tmp_path / "a.qcow2", MiB)
    _patch(path, layout.field_offset("autoclear_features"), "Q", 1 << 40)
    with qcow2.open(str(path)) as image:  # read-only leaves the file alone
        assert image.header.autoclear_features == 1 << 40
    with qcow2.open(str(path), writable=True) as image:
        assert image.header.autoclear_features == 0
    f = HostFile(str(path), writable=False)
    try:
        assert read_header(f).autoclear_features == 0
    finally:
        f.close()
    oracle.assert_clean(path)


def test_unknown_incompatible_bits_are_named_from_the_feature_table(tmp_path: Path) -> None:
    """Bits the image's feature table names are listed by name, the rest as a hex mask,
    exactly as qemu-img reports them."""
    need("qemu-img")
    path = oracle.create(tmp_path / "f.qcow2", MiB)
    data = bytearray(path.read_bytes())
    ext_type, _ = struct.unpack_from(">II", data, 112)
    assert ext_type == layout.EXT_FEATURE_TABLE
    # Rename the table's fifth entry (extended L2, bit 4) into an unknown bit 5 feature.
    entry = 112 + 8 + 4 * layout.FEATURE_NAME_STRUCT.size
    layout.FEATURE_NAME_STRUCT.pack_into(data, entry, 0, 5, b"future feature")
    struct.pack_into(">Q", data, layout.field_offset("incompatible_features"), (1 << 5) | (1 << 6))
    path.write_bytes(bytes(data))
    expected = "Unsupported qcow2 feature(s): future feature, Unknown incompatible feature: 40"
    with pytest.raises(qcow2.UnsupportedFeatureError) as caught:
        qcow2.open(str(path))
    assert expected in str(caught.value)
    assert caught.value.bits == (1 << 5) | (1 << 6)
    assert expected in oracle.qemu_img("info", str(path), ok=(1,)).stderr.decode()


@pytest.mark.parametrize("target", ["reftable", "l1", "refblock", "freed_l1"])
def test_writes_never_land_on_metadata(tmp_path: Path, target: str) -> None:
    """A malicious image points a data cluster (COPIED: written in place) at metadata, or
    claims the L1's cluster is free: QEMU's overlap check stops the write, and so do we,
    without changing a byte of the file."""
    need("qemu-io")
    path = oracle.create(tmp_path / "m.qcow2", MiB)
    oracle.qemu_io(path, "write -P 7 0 64k")
    f = HostFile(str(path), writable=False)
    try:
        header = read_header(f)
        reftable0 = struct.unpack(">Q", f.pread(header.refcount_table_offset, 8))[0]
    finally:
        f.close()
    data = bytearray(path.read_bytes())
    l2 = _l2_offset(path)
    if target == "freed_l1":
        # refcount 0 for the L1's cluster (16-bit refcounts): the allocator may hand it out
        struct.pack_into(">H", data, reftable0 + 2 * (header.l1_table_offset // 65536), 0)
    else:
        # (offset 0 cannot be aimed at: an entry with offset 0 is unallocated)
        host = {
            "reftable": header.refcount_table_offset,
            "l1": header.l1_table_offset,
            "refblock": reftable0,
        }[target]
        struct.pack_into(">Q", data, l2, host | layout.OFLAG_COPIED)
    path.write_bytes(bytes(data))
    with qcow2.open(str(path), writable=True) as image:
        offset = 0 if target != "freed_l1" else 4 * 65536  # an unallocated cluster
        with pytest.raises(qcow2.CorruptImageError, match="Preventing invalid write on metadata"):
            image.write(offset, b"evil" * 100)
        with pytest.raises(qcow2.CorruptImageError, match="unusable"):
            image.write(MiB - 512, b"more")
    # nothing changed but the corrupt bit QEMU sets
    data[layout.field_offset("incompatible_features") + 7] |= layout.INCOMPAT_CORRUPT
    assert path.read_bytes() == bytes(data)

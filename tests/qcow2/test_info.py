"""qcow2 info / map / snapshot -l against qemu-img 7.2 on the same images.

JSON is compared as text (key order included: qemu-img prints QDict hash order).  The one
field that legitimately differs is ``actual-size``: both tools read the same file, so it is
compared too, except where noted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import qcow2
from qcow2.tools.info import image_info, size_to_str
from qcow2.tools.qemujson import qdict_order
from tests.helpers import need
from tests.qcow2 import oracle
from tests.qcow2.test_cli import (  # noqa: F401 - restore_cwd is an autouse fixture
    Run,
    by_name,
    restore_cwd,
    run_both,
    run_cli,
    run_qemu_img,
)
from tests.qcow2.test_cli_encryption import create_luks

MiB = 1024 * 1024


def plain(tmp: Path) -> Path:
    return oracle.create(tmp / "img.qcow2", 64 * MiB)


def written_with_zero_and_discard(tmp: Path) -> Path:
    img = oracle.create(tmp / "img.qcow2", 64 * MiB)
    oracle.qemu_io(img, "write -P 1 0 1M", "write -z 2M 1M", "discard 512k 128k", "write 40M 4k")
    return img


def with_snapshots(tmp: Path) -> Path:
    img = oracle.create(tmp / "img.qcow2", 64 * MiB)
    oracle.qemu_io(img, "write -P 1 0 256k")
    oracle.snapshot(img, "create", "first")
    oracle.qemu_io(img, "write -P 2 0 64k")
    oracle.snapshot(img, "create", "second snapshot with a long name")
    return img


def compressed_zlib(tmp: Path) -> Path:
    img = oracle.create(tmp / "img.qcow2", 64 * MiB)
    oracle.qemu_io(img, "write -c -P 3 0 64k", "write -P 4 1M 64k")
    return img


def compressed_zstd(tmp: Path) -> Path:
    img = oracle.create(tmp / "img.qcow2", 64 * MiB, compression_type="zstd")
    oracle.qemu_io(img, "write -P 4 1M 64k")
    return img


def extended_l2(tmp: Path) -> Path:
    img = oracle.create(tmp / "img.qcow2", 64 * MiB, extended_l2=True)
    oracle.qemu_io(img, "write -P 5 0 4k", "write -z 64k 64k", "write -P 6 130k 2k")
    return img


def small_clusters_v2(tmp: Path) -> Path:
    img = oracle.create(tmp / "img.qcow2", 1000000, compat="0.10", cluster_size=4096)
    oracle.qemu_io(img, "write -P 7 8k 12k")
    return img


def refcount_bits_and_lazy(tmp: Path) -> Path:
    img = oracle.create(tmp / "img.qcow2", 3 * MiB, refcount_bits=8, lazy_refcounts=True)
    oracle.qemu_io(img, "write 0 64k")
    return img


def backing_chain(tmp: Path) -> Path:
    base = oracle.create(tmp / "base.qcow2", 32 * MiB)
    oracle.qemu_io(base, "write -P 1 0 1M", "write -P 2 8M 64k")
    mid = tmp / "mid.qcow2"
    oracle.qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(mid))
    oracle.qemu_io(mid, "write -P 3 512k 64k", "write -z 8M 64k")
    top = tmp / "img.qcow2"
    oracle.qemu_img(
        "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", str(top), "48M"
    )
    oracle.qemu_io(top, "write -P 4 1M 64k")
    return top


def raw_backing(tmp: Path) -> Path:
    base = tmp / "base.raw"
    with open(base, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(MiB)
        f.write(b"\x09" * 65536)
    top = tmp / "img.qcow2"
    oracle.qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", str(top))
    oracle.qemu_io(top, "write -P 4 4M 64k")
    return top


def with_bitmaps(tmp: Path) -> Path:
    img = oracle.create(tmp / "img.qcow2", 64 * MiB)
    oracle.qemu_io(img, "write 0 1M")
    oracle.qemu_img("bitmap", "--add", str(img), "bm0")
    oracle.qemu_img("bitmap", "--add", "-g", "128k", "--disable", str(img), "bm1")
    return img


def external_data_file(tmp: Path) -> Path:
    # qemu-img create names the data file relative to its working directory
    img = oracle.create(tmp / "img.qcow2", 8 * MiB, data_file=str(tmp / "img.data"))
    oracle.qemu_io(img, "write -P 5 0 128k", "write -z 1M 64k", "write -P 6 4M 64k")
    return img


def external_raw_data_file(tmp: Path) -> Path:
    img = oracle.create(
        tmp / "img.qcow2", 8 * MiB, data_file=str(tmp / "img.data"), data_file_raw=True
    )
    oracle.qemu_io(img, "write -P 5 0 128k")
    return img


def metadata_preallocated(tmp: Path) -> Path:
    img = oracle.create(tmp / "img.qcow2", 4 * MiB, preallocation="metadata")
    oracle.qemu_io(img, "write -P 7 0 64k", "write -P 8 1M 4k")
    return img


IMAGES = by_name(
    plain,
    written_with_zero_and_discard,
    with_snapshots,
    compressed_zlib,
    compressed_zstd,
    extended_l2,
    small_clusters_v2,
    refcount_bits_and_lazy,
    backing_chain,
    raw_backing,
    with_bitmaps,
    external_data_file,
    external_raw_data_file,
    metadata_preallocated,
)


def _copy_chain(src: Path) -> None:
    """Backing files live next to the image: copy them into both run directories."""
    for sibling in src.parent.iterdir():
        if sibling.is_file() and sibling != src:
            for d in ("q", "o"):
                (src.parent / d).mkdir(exist_ok=True)
                (src.parent / d / sibling.name).write_bytes(sibling.read_bytes())


@pytest.mark.parametrize("image", sorted(IMAGES))
@pytest.mark.parametrize(
    "args",
    [
        ("info", "--output=json"),
        ("info",),
        ("info", "--backing-chain", "--output=json"),
        ("info", "--backing-chain"),
        ("map", "--output=json"),
        ("map",),
        ("snapshot", "-l"),
        ("check", "--output=json"),
    ],
    ids=lambda a: "-".join(a),
)
def test_matches_qemu_img(tmp_path: Path, image: str, args: tuple[str, ...]) -> None:
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    img = IMAGES[image](src_dir)
    _copy_chain(img)
    theirs, ours, _, _ = run_both(img, *args)
    # Same file content on both sides, so actual-size (st_blocks) agrees too.
    assert ours.code == theirs.code
    assert ours.out == theirs.out
    assert ours.err == theirs.err


def test_dirty_flag_is_reported(tmp_path: Path) -> None:
    img = oracle.create(tmp_path / "img.qcow2", 4 * MiB, lazy_refcounts=True)
    subprocess.run(
        [need("qemu-io"), "-c", "write 0 64k", "-c", "abort", str(img)],
        capture_output=True,
        check=False,
    )
    for args in (("info", "--output=json"), ("info",)):
        theirs, ours, _, _ = run_both(img, *args)
        assert (ours.code, ours.out) == (theirs.code, theirs.out)
    assert json.loads(run_cli("info", "--output=json", str(img)).out)["dirty-flag"] is True
    assert "cleanly shut down: no" in run_cli("info", str(img)).out


def test_image_info_api_equals_qemu_img_json(tmp_path: Path) -> None:
    img = with_snapshots(tmp_path)
    with qcow2.open(str(img)) as image:
        info = image_info(image)
    expected = oracle.info(img)
    assert qdict_order(info) == expected
    assert list(qdict_order(info)) == list(expected)


def test_snapshot_dates_print_in_local_time_like_qemu_img(tmp_path: Path) -> None:
    img = with_snapshots(tmp_path)
    for tz in ("UTC", "America/New_York", "Asia/Kolkata"):
        env = dict(os.environ, TZ=tz)
        theirs = subprocess.run(
            [need("qemu-img"), "snapshot", "-l", str(img)],
            capture_output=True,
            text=True,
            env=env,
        )
        ours = subprocess.run(
            [sys.executable, "-m", "qcow2", "snapshot", "-l", str(img)],
            capture_output=True,
            text=True,
            env=env,
        )
        assert ours.stdout == theirs.stdout and ours.returncode == theirs.returncode


@pytest.mark.parametrize(
    "value",
    [0, 512, 1024, 1000 * 512, 1048064, 1 << 20, 1536 * 1024, 10**9, 1 << 40, 1 << 50],
)
def test_size_to_str_matches_qemu_img(tmp_path: Path, value: int) -> None:
    """qemu-img prints size_to_str(virtual size) in 'virtual size:' (sizes are 512-byte
    multiples, the only ones qemu-img creates)."""
    img = tmp_path / "s.qcow2"
    run_qemu_img("create", "-q", "-f", "qcow2", str(img), str(value))
    line = next(
        x for x in run_qemu_img("info", str(img)).out.splitlines() if x.startswith("virtual")
    )
    assert line == f"virtual size: {size_to_str(value)} ({value} bytes)"


def test_map_stops_at_compressed_cluster_like_qemu_img(tmp_path: Path) -> None:
    img = compressed_zlib(tmp_path)
    theirs, ours, _, _ = run_both(img, "map")
    assert ours.code == theirs.code == 1
    assert ours.err == theirs.err
    assert "compressed clusters" in ours.err


@pytest.mark.parametrize(
    "name", [b"s\x00hidden", b"\xf3bad-utf8", "d\u00e9j\u00e0-vu".encode(), b"x" * 40]
)
def test_snapshot_names_are_shown_as_qemu_img_shows_them(tmp_path: Path, name: bytes) -> None:
    """Tags are C strings of arbitrary bytes: cut at NUL, raw in text, U+FFFD in JSON."""
    img = oracle.create(tmp_path / "img.qcow2", 4 * MiB)
    oracle.snapshot(img, "create", "x" * len(name))
    raw = bytearray(img.read_bytes())
    table = int.from_bytes(raw[64:72], "big")
    id_size = int.from_bytes(raw[table + 12 : table + 14], "big")
    extra = int.from_bytes(raw[table + 36 : table + 40], "big")
    name_at = table + 40 + extra + id_size
    raw[name_at : name_at + len(name)] = name
    img.write_bytes(bytes(raw))
    for args in (("info", "--output=json"), ("info",), ("snapshot", "-l")):
        theirs, ours, _, _ = run_both(img, *args)
        assert (ours.code, ours.out, ours.err) == (theirs.code, theirs.out, theirs.err), args


@pytest.fixture(scope="module")
def luks_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LUKS-encrypted qcow2 made by qemu-img (key derivation takes a few seconds)."""
    img = tmp_path_factory.mktemp("luks") / "img.qcow2"
    create_luks(img)
    return img


@pytest.mark.parametrize(
    "args",
    [("info", "--output=json"), ("info",), ("check",), ("map",), ("snapshot", "-l")],
    ids=lambda a: "-".join(a),
)
def test_luks_image_like_qemu_img_without_a_key(luks_image: Path, args: tuple[str, ...]) -> None:
    """info shows the LUKS header; commands that need the key fail as qemu-img does."""
    work = luks_image.parent / "-".join(args)
    work.mkdir()
    img = work / "img.qcow2"
    img.write_bytes(luks_image.read_bytes())
    theirs, ours, _, _ = run_both(img, *args)
    assert (ours.code, ours.out, ours.err) == (theirs.code, theirs.out, theirs.err)


@pytest.mark.parametrize(
    "window",
    [
        ("--start-offset=1M", "--max-length=3M"),
        ("--start-offset=100", "--max-length=1000"),
        ("--start-offset=200M",),
        ("--start-offset=1k", "--max-length=0"),
        ("--start-offset=-1",),
        ("--max-length=12x",),
    ],
    ids=lambda w: " ".join(w),
)
@pytest.mark.parametrize("output", ["json", "human"])
def test_map_window_matches_qemu_img(tmp_path: Path, window: tuple[str, ...], output: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    img = backing_chain(src)
    _copy_chain(img)
    theirs, ours, _, _ = run_both(img, "map", f"--output={output}", *window)
    assert (ours.code, ours.out, ours.err) == (theirs.code, theirs.out, theirs.err)


def test_missing_external_data_file_like_qemu_img(tmp_path: Path) -> None:
    """qemu-img opens the data file for check/map (and fails without it), not for info."""
    os.chdir(tmp_path)  # qemu-img create names the data file relative to the cwd
    img = oracle.create(Path("img.qcow2"), 8 * MiB, data_file="img.data")
    (tmp_path / "img.data").unlink()
    for args in (("check",), ("map",), ("info",), ("snapshot", "-l")):
        theirs = run_qemu_img(*args, img.name)
        ours = run_cli(*args, img.name)
        assert (ours.code, ours.out, ours.err) == (theirs.code, theirs.out, theirs.err), args


@pytest.mark.parametrize("missing", ["base.qcow2", "mid.qcow2"])
@pytest.mark.parametrize(
    "args",
    [("check",), ("map",), ("snapshot", "-l"), ("info",), ("info", "--backing-chain")],
    ids=lambda a: "-".join(a),
)
def test_missing_backing_file_like_qemu_img(
    tmp_path: Path, missing: str, args: tuple[str, ...]
) -> None:
    """check, map and snapshot open the whole chain (messages nest per level); info does
    not; info --backing-chain opens each image on its own."""
    src = tmp_path / "src"
    src.mkdir()
    img = backing_chain(src)
    (src / missing).unlink()
    _copy_chain(img)
    theirs, ours, _, _ = run_both(img, *args)
    assert (ours.code, ours.out, ours.err) == (theirs.code, theirs.out, theirs.err)


@pytest.mark.parametrize(
    ("compat", "index", "change"),
    [("1.1", 16, "unaligned"), ("0.10", 16, "zero-flag"), ("0.10", 20, "zero-plain")],
)
@pytest.mark.parametrize("output", ["json", "human"])
def test_map_stops_at_corrupt_entries_like_qemu_img(
    tmp_path: Path, compat: str, index: int, change: str, output: str
) -> None:
    """Unaligned data clusters and v2 zero flags: the records before, QEMU's corruption
    line, then 'Could not read file metadata'."""
    import struct

    img = oracle.create(tmp_path / "img.qcow2", 4 * MiB, compat=compat)
    oracle.qemu_io(img, "write 0 64k", "write 1M 64k")
    raw = bytearray(img.read_bytes())
    at = 0x40000 + index * 8
    (entry,) = struct.unpack_from(">Q", raw, at)
    new = {"unaligned": entry + 512, "zero-flag": entry | 1, "zero-plain": 1}[change]
    struct.pack_into(">Q", raw, at, new)
    img.write_bytes(bytes(raw))
    theirs, ours, _, _ = run_both(img, "map", f"--output={output}")
    assert (ours.code, ours.out, ours.err) == (theirs.code, theirs.out, theirs.err)
    assert ours.code == 1

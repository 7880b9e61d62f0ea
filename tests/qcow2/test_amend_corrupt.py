"""``amend -o compat=0.10`` of damaged images, as qemu-img 7.2 amends them (issue 13).

QEMU's downgrade expands zero clusters through the active L1 table, then through each
snapshot's, validating each snapshot L1 table when it gets to it; an unaligned L2 table
or preallocated zero cluster is a fatal corruption event (corrupt bit set).  Each case
runs through qemu-img and through the ``qcow2`` command on copies: same stderr, same exit
code, byte-identical files.  A snapshot table claiming huge L1 tables costs memory and
time bounded by the file, not by the claim.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import need
from tests.qcow2 import oracle

MiB = 1 << 20


def _u64(data: bytearray, offset: int) -> int:
    value: int = struct.unpack_from(">Q", data, offset)[0]
    return value


def _snapshot_entries(data: bytearray) -> list[int]:
    """Offsets of the snapshot table entries."""
    count = struct.unpack_from(">I", data, 60)[0]
    offset = _u64(data, 64)
    out = []
    for _ in range(count):
        out.append(offset)
        id_size, name_size = struct.unpack_from(">HH", data, offset + 12)
        extra = struct.unpack_from(">I", data, offset + 36)[0]
        offset += (40 + extra + id_size + name_size + 7) // 8 * 8
    return out


def _l2(data: bytearray) -> int:
    return _u64(data, _u64(data, 40)) & 0x00FFFFFFFFFFFE00


def _sn_l1_unaligned(data: bytearray) -> None:
    entry = _snapshot_entries(data)[0]
    struct.pack_into(">Q", data, entry, _u64(data, entry) + 512)


def _sn_l1_size(size: int) -> Callable[[bytearray], None]:
    def damage(data: bytearray) -> None:
        struct.pack_into(">I", data, _snapshot_entries(data)[0] + 8, size)

    return damage


def _zero_alloc_unaligned(data: bytearray) -> None:
    struct.pack_into(">Q", data, _l2(data) + 8, 0x50200 | 1 | 1 << 63)


def _l2_unaligned(data: bytearray) -> None:
    l1 = _u64(data, 40)
    struct.pack_into(">Q", data, l1, _u64(data, l1) + 512)


def _data_unaligned(data: bytearray) -> None:
    l2 = _l2(data)
    struct.pack_into(">Q", data, l2, _u64(data, l2) + 512)


CASES: dict[str, Callable[[bytearray], None]] = {
    "snapshot_l1_offset_unaligned": _sn_l1_unaligned,
    "snapshot_l1_max_size": _sn_l1_size(0x400000),
    "snapshot_l1_too_large": _sn_l1_size(0x400001),
    "zero_cluster_unaligned": _zero_alloc_unaligned,
    "l2_table_unaligned": _l2_unaligned,
    "data_cluster_unaligned": _data_unaligned,  # not a zero cluster: QEMU goes ahead
}


def _base(path: Path, snapshots: int = 1) -> None:
    """64 KiB of data, a zero cluster (64k), then ``snapshots`` snapshots."""
    oracle.create(path, MiB)
    oracle.qemu_io(path, "write -P 7 0 64k", "write -z 64k 64k")
    for i in range(snapshots):
        oracle.qemu_img("snapshot", "-c", f"s{i}", str(path))


def _copy(src: Path, dst: Path) -> None:
    """Copy keeping the holes (the huge-claims image is mostly one)."""
    with open(src, "rb") as f, open(dst, "wb") as g:
        size = os.fstat(f.fileno()).st_size
        pos = 0
        while pos < size:
            try:
                data = os.lseek(f.fileno(), pos, os.SEEK_DATA)
            except OSError:
                break
            pos = os.lseek(f.fileno(), data, os.SEEK_HOLE)
            f.seek(data)
            g.seek(data)
            g.write(f.read(pos - data))
        g.truncate(size)


def _amend_both(tmp_path: Path, image: Path) -> list[tuple[int, str, bytes]]:
    results = []
    for tool in ("qemu-img", "qcow2"):
        (tmp_path / tool).mkdir()
        copy = tmp_path / tool / "img.qcow2"
        _copy(image, copy)
        argv = [need("qemu-img")] if tool == "qemu-img" else [sys.executable, "-m", "qcow2"]
        run = subprocess.run(
            [*argv, "amend", "-o", "compat=0.10", "img.qcow2"],
            capture_output=True,
            text=True,
            check=False,
            cwd=tmp_path / tool,
            timeout=120,
        )
        results.append((run.returncode, run.stderr, copy.read_bytes()))
    return results


@pytest.mark.parametrize("case", list(CASES))
def test_downgrade_of_damaged_image_as_qemu(tmp_path: Path, case: str) -> None:
    image = tmp_path / "base.qcow2"
    _base(image)
    data = bytearray(image.read_bytes())
    CASES[case](data)
    image.write_bytes(bytes(data))
    theirs, ours = _amend_both(tmp_path, image)
    assert ours[:2] == theirs[:2]
    assert ours[2] == theirs[2]
    if case != "data_cluster_unaligned":
        assert ours[0] == 1


def test_huge_snapshot_l1_claims_cost_what_the_file_holds(tmp_path: Path) -> None:
    """40 snapshots each claiming a 32 MiB L1 table over a hole of the file: QEMU reads
    them all and goes ahead; so do we, in bounded memory and time (the file's real size,
    not the claims)."""
    image = tmp_path / "base.qcow2"
    _base(image, snapshots=40)
    data = bytearray(image.read_bytes())
    hole = (len(data) + 0xFFFF) // 0x10000 * 0x10000
    for entry in _snapshot_entries(data):
        struct.pack_into(">QI", data, entry, hole, 0x400000)
    with open(image, "wb") as f:
        f.write(data)
        f.truncate(hole + 0x400000 * 8)
    theirs, ours = _amend_both(tmp_path, image)
    assert ours == theirs
    assert ours[0] == 0
    # the same amend, measured in a process of its own
    copy = tmp_path / "measured.qcow2"
    _copy(image, copy)
    # VmHWM, not ru_maxrss: that one keeps the forking parent's size across exec
    probe = (
        "import json, sys, time\n"
        "from qcow2.cli.main import main\n"
        "start = time.monotonic()\n"
        "code = main(['amend', '-o', 'compat=0.10', sys.argv[1]])\n"
        "seconds = time.monotonic() - start\n"
        "status = open('/proc/self/status').read().split('VmHWM:')[1]\n"
        "print(json.dumps([code, int(status.split()[0]), seconds]))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", probe, str(copy)],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    code, max_rss_kib, seconds = json.loads(run.stdout)
    assert code == 0
    assert max_rss_kib < 64 * 1024, max_rss_kib  # 40 x 32 MiB claimed
    assert seconds < 10, seconds


@pytest.mark.parametrize("case", ["snapshot_l1_offset_unaligned", "snapshot_l1_too_large"])
@pytest.mark.parametrize(
    "args",
    [
        ["convert", "-l", "s0", "-O", "raw", "img.qcow2", "out.raw"],
        ["convert", "-l", "snapshot.name=s0", "-O", "raw", "img.qcow2", "out.raw"],
        ["snapshot", "-a", "s0", "img.qcow2"],
        ["snapshot", "-d", "s0", "img.qcow2"],
    ],
)
def test_damaged_snapshot_l1_refused_as_qemu_img(
    tmp_path: Path, case: str, args: list[str]
) -> None:
    """A snapshot whose L1 table QEMU's validation refuses: the same words (``Failed to
    load snapshot: ...``; apply prints the reason, then the load's errno), the same exit
    code, the file as qemu-img leaves it."""
    image = tmp_path / "base.qcow2"
    _base(image)
    data = bytearray(image.read_bytes())
    CASES[case](data)
    image.write_bytes(bytes(data))
    results = []
    for tool in ("qemu-img", "qcow2"):
        (tmp_path / tool).mkdir()
        _copy(image, tmp_path / tool / "img.qcow2")
        argv = [need("qemu-img")] if tool == "qemu-img" else [sys.executable, "-m", "qcow2"]
        run = subprocess.run(
            [*argv, *args], capture_output=True, text=True, check=False, cwd=tmp_path / tool
        )
        results.append((run.returncode, run.stderr, (tmp_path / tool / "img.qcow2").read_bytes()))
    assert results[1] == results[0]
    assert results[1][0] == 1


@pytest.mark.parametrize("opts", ["", ",overlap-check=all", ",overlap-check=bogus"])
def test_downgrade_takes_overlap_check_options(tmp_path: Path, opts: str) -> None:
    """A preallocated zero cluster aimed at a snapshot's own L2 table: the downgrade
    writes its zeros there under the default "cached" checks (QEMU's blind spot) and is
    refused under "all", as qemu-img amend --image-opts is."""
    image = tmp_path / "base.qcow2"
    _base(image)
    oracle.qemu_io(image, "write -P 8 0 4k")  # the active L1 gets its own L2 table
    data = bytearray(image.read_bytes())
    snapshot_l2 = _u64(data, _u64(data, _snapshot_entries(data)[0])) & 0x00FFFFFFFFFFFE00
    struct.pack_into(">Q", data, _l2(data) + 8 * 2, snapshot_l2 | 1 | 1 << 63)
    image.write_bytes(bytes(data))
    results = []
    for tool in ("qemu-img", "qcow2"):
        (tmp_path / tool).mkdir()
        _copy(image, tmp_path / tool / "img.qcow2")
        argv = [need("qemu-img")] if tool == "qemu-img" else [sys.executable, "-m", "qcow2"]
        spec = f"driver=qcow2,file.filename=img.qcow2{opts}"
        run = subprocess.run(
            [*argv, "amend", "-o", "compat=0.10", "--image-opts", spec],
            capture_output=True,
            text=True,
            check=False,
            cwd=tmp_path / tool,
        )
        results.append((run.returncode, run.stderr, (tmp_path / tool / "img.qcow2").read_bytes()))
    assert results[1] == results[0]
    assert (results[1][0] == 0) == (opts == "")

"""Fatal and non-fatal corruption events, as QEMU 7.2 reacts to them (issue 13).

Every case of :mod:`tests.qcow2.corrupt_corpus` is an image damaged as the qemu-iotests
damage theirs and one request; the request runs through ``qemu-io`` on one copy and through
the library on another.  Compared: the corruption line (QEMU's stderr; the library's
reporter), whether the request fails, the file afterwards (byte for byte: QEMU's file and
ours), the corrupt bit, the refusal of a later read-write open, read-only opens, and what
``check -r all`` makes of both files.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import qcow2
from qcow2.errors import set_corruption_reporter
from qcow2.format import layout
from tests.helpers import need
from tests.qcow2 import oracle
from tests.qcow2.corrupt_corpus import CASES, Case, unref_inactive_l2

INCOMPAT = layout.field_offset("incompatible_features")


def _num(text: str) -> int:
    units = {"k": 1024, "M": 1 << 20}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def qemu_io_command(op: str) -> str:
    """The qemu-io spelling of ``op`` (writes of pattern 0x2a, as :func:`library_op`)."""
    if op.startswith("write ") and not op.startswith("write -z"):
        return "write -P 42 " + op.removeprefix("write ")
    return op


def library_op(image: qcow2.Image, op: str) -> None:
    """Run qemu-io command ``op`` through the library."""
    words = op.split()
    offset, length = _num(words[-2]), _num(words[-1])
    if words[0] == "read":
        image.read(offset, length)
    elif words[0] == "discard":
        image.discard(offset, length)
    elif words[:2] == ["write", "-z"]:
        image.write_zeroes(offset, length, unmap="-u" in words)
    else:
        image.write(offset, b"\x2a" * length)


@pytest.fixture
def reported() -> Iterator[list[str]]:
    """The corruption lines the library reports while the test runs."""
    lines: list[str] = []
    previous = set_corruption_reporter(lambda line, path: lines.append(line))
    try:
        yield lines
    finally:
        set_corruption_reporter(previous)


def _with_corrupt_bit(data: bytes) -> bytes:
    out = bytearray(data)
    out[INCOMPAT + 7] |= layout.INCOMPAT_CORRUPT
    return bytes(out)


def _corruption_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("qcow2")]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_corruption_as_qemu(tmp_path: Path, case: Case, reported: list[str]) -> None:
    need("qemu-io")
    base = case.build(tmp_path / "base.qcow2")
    original = base.read_bytes()
    theirs, ours = tmp_path / "qemu.qcow2", tmp_path / "lib.qcow2"
    shutil.copy(base, theirs)
    shutil.copy(base, ours)
    target = ["--image-opts", case.image_opts(theirs)] if case.opts else [str(theirs)]
    proc = subprocess.run(
        [need("qemu-io"), "-c", qemu_io_command(case.op), *target],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    qemu_failed = "failed:" in proc.stdout
    failure: qcow2.Qcow2Error | None = None
    with qcow2.open(str(ours), writable=True, options=case.opts) as image:
        try:
            library_op(image, case.op)
        except qcow2.Qcow2Error as err:
            failure = err
    # the same event, worded the same, once
    assert reported == _corruption_lines(proc.stderr)
    assert (failure is not None) == qemu_failed, failure
    if failure is not None:
        # the request fails as QEMU's does (EIO), with a typed error
        assert isinstance(failure, qcow2.CorruptImageError)
        assert failure.errno == 5
        # a refused request changed nothing but the corrupt bit (v3 only: a v2 header
        # has no field for it)
        fatal = reported[0].startswith("qcow2: Marking image as corrupt")
        expected = _with_corrupt_bit(original) if fatal and case.compat != "0.10" else original
        assert ours.read_bytes() == expected
    # byte for byte what QEMU leaves (the data written is the same pattern)
    if case.qemu_grows:
        assert theirs.read_bytes()[: len(original)] == ours.read_bytes()
    else:
        assert ours.read_bytes() == theirs.read_bytes()
    corrupt = bool(ours.read_bytes()[INCOMPAT + 7] & layout.INCOMPAT_CORRUPT)
    if corrupt:
        with pytest.raises(qcow2.ReadOnlyError, match="Image is corrupt; cannot be opened"):
            qcow2.open(str(ours), writable=True)
        with qcow2.open(str(ours)) as image:  # read-only opens work
            assert image.virtual_size == 1024 * 1024


@pytest.mark.parametrize(
    "name", ["l2_into_l1", "l2_refcount_zero", "data_unaligned_write", "reftable_entry_zero"]
)
def test_repair_after_corruption_as_qemu(tmp_path: Path, name: str) -> None:
    """``check -r all`` of the image the library marked corrupt ends as qemu-img's repair
    of the image QEMU marked: same report, same corrupt bit (cleared once repaired)."""
    case = next(c for c in CASES if c.name == name)
    theirs, ours = tmp_path / "qemu.qcow2", tmp_path / "lib.qcow2"
    case.build(theirs)
    shutil.copy(theirs, ours)
    subprocess.run([need("qemu-io"), "-c", qemu_io_command(case.op), str(theirs)], check=False)
    set_corruption_reporter(lambda line, path: None)
    try:
        with (
            qcow2.open(str(ours), writable=True) as image,
            pytest.raises(qcow2.CorruptImageError),
        ):
            library_op(image, case.op)
    finally:
        set_corruption_reporter(None)
    assert ours.read_bytes() == theirs.read_bytes()
    expected = oracle.check(theirs, repair="all")
    proc = subprocess.run(
        [sys.executable, "-m", "qcow2", "check", "-r", "all", str(ours)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == expected["exit-code"], proc.stderr
    after_theirs, after_ours = oracle.check(theirs), oracle.check(ours)
    for result in (after_theirs, after_ours):
        del result["filename"], result["stderr"]
    assert after_ours == after_theirs
    corrupt = oracle.info(theirs)["format-specific"]["data"]["corrupt"]
    assert oracle.info(ours)["format-specific"]["data"]["corrupt"] is corrupt
    if name != "data_unaligned_write":  # that one qemu-img cannot repair either
        assert corrupt is False
        with qcow2.open(str(ours), writable=True):  # repaired: read-write again
            pass


def test_command_prints_the_corruption_line(tmp_path: Path) -> None:
    """The ``qcow2`` command prints the library's corruption events as qemu-img does."""
    case = next(c for c in CASES if c.name == "l2_unaligned_read")
    results = []
    for tool in ("qemu-img", "qcow2"):
        (tmp_path / tool).mkdir()
        path = case.build(tmp_path / tool / "img.qcow2")
        argv = [need("qemu-img")] if tool == "qemu-img" else [sys.executable, "-m", "qcow2"]
        runs = [
            subprocess.run(
                [*argv, *args],
                capture_output=True,
                text=True,
                check=False,
                cwd=tmp_path / tool,
            )
            for args in (["snapshot", "-c", "s", "img.qcow2"], ["resize", "img.qcow2", "2M"])
        ]
        results.append(([(run.returncode, run.stderr) for run in runs], path.read_bytes()[79]))
    assert results[0] == results[1]
    (snapshot, resize), corrupt = results[1]
    assert snapshot[1].startswith("qcow2: Marking image as corrupt: L2 table offset")
    assert "Image is corrupt; cannot be opened read/write" in resize[1]
    assert corrupt & layout.INCOMPAT_CORRUPT


def test_read_only_open_reports_non_fatal_once(tmp_path: Path, reported: list[str]) -> None:
    """On a read-only image a fatal inconsistency is reported as non-fatal, once, and
    the file is left alone; the request still fails."""
    case = next(c for c in CASES if c.name == "l2_unaligned_read")
    path = case.build(tmp_path / "ro.qcow2")
    before = path.read_bytes()
    with qcow2.open(str(path)) as image:
        for _ in range(2):
            with pytest.raises(qcow2.CorruptImageError):
                image.read(0, 4096)
    proc = subprocess.run(
        [need("qemu-io"), "-r", "-c", "read 0 4k", "-c", "read 0 4k", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert reported == _corruption_lines(proc.stderr)
    assert len(reported) == 1 and "further non-fatal" in reported[0]
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    "opts", ["", ",overlap-check=all", ",overlap-check.inactive-l2=on", ",overlap-check=bogus"]
)
def test_command_takes_overlap_check_options(tmp_path: Path, opts: str) -> None:
    """``--image-opts`` with QEMU's overlap-check options: a snapshot whose new L1 table
    lands on an inactive L2 table (refcount 0) goes ahead under the default "cached"
    checks and is refused under "all", word for word and byte for byte as qemu-img."""
    case = Case("unref_inactive_l2", unref_inactive_l2, "", snapshot=True)
    results = []
    for tool in ("qemu-img", "qcow2"):
        (tmp_path / tool).mkdir()
        path = case.build(tmp_path / tool / "img.qcow2")
        before = path.read_bytes()
        argv = [need("qemu-img")] if tool == "qemu-img" else [sys.executable, "-m", "qcow2"]
        spec = f"driver=qcow2,file.filename=img.qcow2{opts}"
        run = subprocess.run(
            [*argv, "snapshot", "-c", "new", "--image-opts", spec],
            capture_output=True,
            text=True,
            check=False,
            cwd=tmp_path / tool,
        )
        results.append((run.returncode, run.stderr))
        if run.returncode:
            after = path.read_bytes()
            refused = _with_corrupt_bit(before) if "Marking" in run.stderr else before
            assert after == refused  # nothing but the corrupt bit
        results.append(oracle.info(path, force_share=True)["format-specific"]["data"]["corrupt"])
    assert results[:2] == results[2:]
    assert (results[0][0] == 1) == (opts != "")


@pytest.mark.parametrize(
    "opts",
    [
        {"overlap-check": "bogus"},
        {"overlap-check.inactive-l2": "maybe"},
        {"overlap-check": "all", "overlap-check.template": "none"},
        {"foo": "bar"},
    ],
)
def test_bad_open_options_refused_as_qemu(tmp_path: Path, opts: dict[str, str]) -> None:
    path = oracle.create(tmp_path / "o.qcow2", 1 << 20)
    before = path.read_bytes()
    spec = f"driver=qcow2,file.filename={path}" + "".join(f",{k}={v}" for k, v in opts.items())
    proc = subprocess.run(
        [need("qemu-io"), "--image-opts", "-c", "read 0 1", spec],
        capture_output=True,
        text=True,
        check=False,
    )
    expected = proc.stderr.strip().removeprefix("qemu-io: can't open: ")
    for writable in (False, True):
        with pytest.raises(qcow2.OpenOptionError) as caught:
            qcow2.open(str(path), writable=writable, options=opts)
        assert caught.value.message == expected
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    "name",
    [
        "reftable_unaligned",
        "l2_unaligned_read",
        "data_unaligned_read",
        "data_unaligned_second_cluster",
    ],
)
@pytest.mark.parametrize("command", ["map", "convert", "compare"])
def test_read_only_commands_report_as_qemu_img(tmp_path: Path, name: str, command: str) -> None:
    """``map``, ``convert`` and ``compare`` of a damaged image: the non-fatal corruption
    line (also the one QEMU's first block-status query prints for an unaligned refcount
    block), the error QEMU words from its block-status query, the exit code, the output."""
    case = next(c for c in CASES if c.name == name)
    results = []
    for tool in ("qemu-img", "qcow2"):
        (tmp_path / tool).mkdir()
        path = case.build(tmp_path / tool / "img.qcow2")
        before = path.read_bytes()
        argv = [need("qemu-img")] if tool == "qemu-img" else [sys.executable, "-m", "qcow2"]
        args = {
            "map": ["map", "--output=json", "img.qcow2"],
            "convert": ["convert", "-O", "raw", "img.qcow2", "out.raw"],
            "compare": ["compare", "img.qcow2", "img.qcow2"],
        }[command]
        run = subprocess.run(
            [*argv, *args], capture_output=True, text=True, check=False, cwd=tmp_path / tool
        )
        results.append((run.returncode, run.stdout, run.stderr))
        assert path.read_bytes() == before  # read-only: nothing written, no corrupt bit
    assert results[1] == results[0]


def _run_both(
    tmp_path: Path, build: Callable[[Path], object], *args: str
) -> list[tuple[int, str, str, bytes]]:
    """``args`` run by qemu-img and by the ``qcow2`` command, each in a directory of its
    own on ``img.qcow2`` made by ``build``: exit code, stdout, stderr and the file after."""
    results = []
    for tool in ("qemu-img", "qcow2"):
        (tmp_path / tool).mkdir()
        path = tmp_path / tool / "img.qcow2"
        build(path)
        argv = [need("qemu-img")] if tool == "qemu-img" else [sys.executable, "-m", "qcow2"]
        run = subprocess.run(
            [*argv, *args], capture_output=True, text=True, check=False, cwd=tmp_path / tool
        )
        results.append((run.returncode, run.stdout, run.stderr, path.read_bytes()))
    return results


@pytest.mark.parametrize(
    "name",
    ["reftable_entry_zero", "reftable_entry_zero_v2", "refblock_zeroed", "reftable_unaligned"],
)
def test_shrink_of_damaged_refcounts_as_qemu_img(tmp_path: Path, name: str) -> None:
    """A shrinking resize where the refcounts are damaged: QEMU's reftable shrink and
    last-cluster search signal the corruption and fail; the file is left as QEMU leaves
    it (the library cut such a file to 0 bytes)."""
    case = next(c for c in CASES if c.name == name)
    base = case.build(tmp_path / "base.qcow2")
    theirs, ours = _run_both(
        tmp_path, lambda p: shutil.copy(base, p), "resize", "--shrink", "img.qcow2", "512k"
    )
    assert ours == theirs
    assert ours[0] == 1


def test_shrink_frees_unused_refcount_blocks_as_qemu_img(tmp_path: Path) -> None:
    """QEMU's shrink drops refcount blocks left counting nothing and gives the file's
    tail back: the result is byte-identical."""
    base = oracle.create(tmp_path / "base.qcow2", 64 << 20, cluster_size=4096)
    oracle.qemu_io(base, "write -P 1 0 1M", "write -P 2 30M 10M")
    theirs, ours = _run_both(
        tmp_path, lambda p: shutil.copy(base, p), "resize", "--shrink", "img.qcow2", "1M"
    )
    assert ours == theirs
    assert len(ours[3]) < 2 << 20


@pytest.mark.parametrize(
    "spec_tail", [",overlap-check=bogus", ",overlap-check=all", ",overlap-check.main-header=off"]
)
def test_resize_takes_image_opts_as_qemu_img(tmp_path: Path, spec_tail: str) -> None:
    base = oracle.create(tmp_path / "base.qcow2", 1 << 20)
    spec = f"driver=qcow2,file.filename=img.qcow2{spec_tail}"
    theirs, ours = _run_both(
        tmp_path, lambda p: shutil.copy(base, p), "resize", "--image-opts", spec, "2M"
    )
    assert ours == theirs


def _with_65536_snapshots(path: Path) -> None:
    """An image whose snapshot table holds QEMU's maximum of 65536 entries (copies of one
    qemu-img snapshot entry, all naming its L1 table)."""
    oracle.create(path, 1 << 20)
    oracle.qemu_img("snapshot", "-c", "s", str(path))
    data = bytearray(path.read_bytes())
    first = struct.unpack_from(">Q", data, 64)[0]
    extra = struct.unpack_from(">I", data, first + 36)[0]
    head = bytes(data[first : first + 40 + extra])
    entries = []
    for i in range(65536):
        ident, name = str(i + 1).encode(), f"s{i}".encode()
        entry = bytearray(head)
        struct.pack_into(">HH", entry, 12, len(ident), len(name))
        entry += ident + name
        entries.append(bytes(entry + bytes(-len(entry) % 8)))
    offset = layout.align_up(len(data), 65536)
    data += bytes(offset - len(data)) + b"".join(entries)
    struct.pack_into(">IQ", data, 60, 65536, offset)
    path.write_bytes(bytes(data))


def test_snapshot_create_beyond_the_table_limit_as_qemu_img(tmp_path: Path) -> None:
    """The 65537th snapshot: qemu-img's ``-27 (File too large)``, nothing written."""
    base = tmp_path / "base.qcow2"
    _with_65536_snapshots(base)
    theirs, ours = _run_both(
        tmp_path, lambda p: shutil.copy(base, p), "snapshot", "-c", "x", "img.qcow2"
    )
    assert ours == theirs
    assert ours[2] == "qemu-img: Could not create snapshot 'x': -27 (File too large)\n"
    assert ours[3] == base.read_bytes()


def _check_json(path: Path) -> tuple[int, dict[str, object]]:
    result = oracle.check(path)
    code = result.pop("exit-code")
    for key in ("filename", "stderr"):
        result.pop(key, None)
    return code, result


@pytest.mark.parametrize("mode", ["leaks", "all"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_repair_of_damaged_image_judged_as_qemu_img(tmp_path: Path, case: Case, mode: str) -> None:
    """``check -r leaks|all`` of every damaged image: the same exit code as qemu-img's
    repair, and ``qemu-img check`` says of our result what it says of qemu-img's."""
    base = case.build(tmp_path / "base.qcow2")
    theirs, ours = _run_both(
        tmp_path, lambda p: shutil.copy(base, p), "check", "-r", mode, "img.qcow2"
    )
    assert ours[0] == theirs[0]
    assert _check_json(tmp_path / "qcow2" / "img.qcow2") == _check_json(
        tmp_path / "qemu-img" / "img.qcow2"
    )

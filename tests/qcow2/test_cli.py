"""The ``qcow2`` command as a process: entry points, --help, errors without tracebacks.

Also home of :func:`run_cli` / :func:`run_qemu_img`, which the check/info golden tests use
to run both tools on the same image and compare stdout, stderr and exit code.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qcow2.cli.main import main
from tests.helpers import held_by_qemu_io, need
from tests.qcow2 import oracle

MiB = 1024 * 1024


@pytest.fixture(autouse=True)
def restore_cwd() -> Iterator[None]:
    """Tests here chdir next to their images (paths in output are relative): undo it.
    (Autouse; the other golden-test modules import it.)"""
    cwd = os.getcwd()
    yield
    os.chdir(cwd)


def by_name(*makers: Callable[[Path], Path]) -> dict[str, Callable[[Path], Path]]:
    """Image makers keyed by their function names (the ids of parametrized cases)."""
    return {maker.__name__: maker for maker in makers}


@dataclass
class Run:
    """Outcome of one command: exit code, stdout, stderr."""

    code: int
    out: str
    err: str


def run_cli(*args: str) -> Run:
    """``qcow2 ARGS`` in-process (same code path as the console script, much faster)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return Run(code, out.getvalue(), err.getvalue())


def run_qemu_img(*args: str) -> Run:
    """``qemu-img ARGS`` (the oracle); never raises on a non-zero exit."""
    proc = subprocess.run(
        [need("qemu-img"), *args],
        capture_output=True,
        text=True,
        errors="surrogateescape",  # snapshot tags are bytes; keep them comparable
        timeout=120,
        check=False,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


def run_both(path: Path, *args: str, copy: bool = True) -> tuple[Run, Run, Path, Path]:
    """Run ``qemu-img ARGS IMG`` and ``qcow2 ARGS IMG`` on two identical copies of ``path``
    with the same file name (in sibling directories), so output naming the file matches."""
    q_dir = path.parent / "q"
    o_dir = path.parent / "o"
    q_dir.mkdir(exist_ok=True)
    o_dir.mkdir(exist_ok=True)
    q, o = q_dir / path.name, o_dir / path.name
    if copy:
        shutil.copyfile(path, q)
        shutil.copyfile(path, o)
    cwd = os.getcwd()
    try:
        os.chdir(q_dir)
        theirs = run_qemu_img(*args, path.name)
        os.chdir(o_dir)
        ours = run_cli(*args, path.name)
    finally:
        os.chdir(cwd)
    return theirs, ours, q, o


def test_console_script_and_module_give_the_same_output(tmp_path: Path) -> None:
    img = oracle.create(tmp_path / "a.qcow2", 64 * MiB)
    oracle.qemu_io(img, "write 0 64k")
    script = shutil.which("qcow2")
    assert script is not None, "the qcow2 console script is not installed (pip install -e .)"
    by_script = subprocess.run([script, "info", str(img)], capture_output=True, text=True)
    by_module = subprocess.run(
        [sys.executable, "-m", "qcow2", "info", str(img)], capture_output=True, text=True
    )
    expected = run_qemu_img("info", str(img))
    assert by_script.returncode == by_module.returncode == 0
    assert by_script.stdout == by_module.stdout == expected.out


def test_help_explains_every_subcommand() -> None:
    proc = subprocess.run([sys.executable, "-m", "qcow2", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    commands = ("info", "check", "snapshot", "map", "create", "resize", "compare", "convert")
    for command in (*commands, "amend"):
        assert command in proc.stdout
        sub = subprocess.run(
            [sys.executable, "-m", "qcow2", command, "--help"], capture_output=True, text=True
        )
        assert sub.returncode == 0 and "usage: qcow2 " + command in sub.stdout


@pytest.mark.parametrize(
    "args",
    [
        ("info", "nonexistent.qcow2"),
        ("check", "nonexistent.qcow2"),
        ("map", "nonexistent.qcow2"),
        ("snapshot", "-l", "nonexistent.qcow2"),
    ],
)
def test_missing_file_is_one_qemu_img_line(tmp_path: Path, args: tuple[str, ...]) -> None:
    os.chdir(tmp_path)
    theirs = run_qemu_img(*args)
    ours = run_cli(*args)
    assert (ours.code, ours.out, ours.err) == (theirs.code, theirs.out, theirs.err)


def test_bad_arguments_fail_without_traceback(tmp_path: Path) -> None:
    for args in (["check", "-r", "bogus", "x"], ["frobnicate"], [], ["info"]):
        proc = subprocess.run(
            [sys.executable, "-m", "qcow2", *args], capture_output=True, text=True
        )
        assert proc.returncode != 0
        assert "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_check_on_raw_file_is_unsupported_like_qemu_img(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(os.urandom(1000))
    theirs, ours, _, _ = run_both(raw, "check")
    assert (ours.code, ours.out, ours.err) == (theirs.code, theirs.out, theirs.err)
    assert ours.code == 63


# Section: write commands, judged by qemu-img


def _info_without_volatile(path: Path) -> dict[str, object]:
    info = oracle.info(path)
    info.pop("actual-size", None)
    info.pop("filename", None)
    for sn in info.get("snapshots", []):
        sn.pop("date-sec"), sn.pop("date-nsec")
    return info


CREATE_CASES = [
    "-f qcow2 img.qcow2 64M",
    "-f qcow2 -o cluster_size=4096,refcount_bits=8 img.qcow2 1.5G",
    "-f qcow2 -o compat=0.10 img.qcow2 1000000",
    "-f qcow2 -o lazy_refcounts=on,extended_l2=on img.qcow2 10M",
    "-f qcow2 -o compression_type=zstd img.qcow2 100k",
    "-q -f qcow2 img.qcow2 3G",
    "img.qcow2 10M",
    "-f raw img.qcow2 1000",
    "-f qcow2 img.qcow2",
    "-f qcow2 -b base.qcow2 -F qcow2 img.qcow2",
    "-f qcow2 -b base.qcow2 img.qcow2",
    "-f qcow2 -b missing.qcow2 -F qcow2 img.qcow2 1M",
    "-f qcow2 -b img.qcow2 -F qcow2 img.qcow2 1M",
    "-f qcow2 -o cluster_size=1000 img.qcow2 1M",
    "-f qcow2 -o cluster_size=4M img.qcow2 1M",
    "-f qcow2 -o compat=0.9 img.qcow2 1M",
    "-f qcow2 -o refcount_bits=3 img.qcow2 1M",
    "-f qcow2 -o compat=0.10,refcount_bits=8 img.qcow2 1M",
    "-f qcow2 -o foo=bar img.qcow2 1M",
    "-f qcow2 img.qcow2 1x",
    "-f qcow2 -o compression_type=lz4 img.qcow2 1M",
    "-f qcow2 -o compat=0.10,compression_type=zstd img.qcow2 1M",
    "-f qcow2 -o compat=0.10,lazy_refcounts=on img.qcow2 1M",
    "-f qcow2 -o compat=0.10,extended_l2=on img.qcow2 1M",
    "-f qcow2 -o cluster_size=4k,extended_l2=on img.qcow2 1M",
    "-f raw -o cluster_size=4k img.qcow2 1M",
]


@pytest.mark.parametrize("line", CREATE_CASES)
def test_create_matches_qemu_img(tmp_path: Path, line: str) -> None:
    """Same output, errors and exit code; a created image is byte-identical to qemu's."""
    args = line.split()
    results = {}
    for side, run in (("q", run_qemu_img), ("o", run_cli)):
        work = tmp_path / side
        work.mkdir()
        oracle.create(work / "base.qcow2", 4 * MiB)
        os.chdir(work)
        results[side] = run("create", *args)
    theirs, ours = results["q"], results["o"]
    assert (ours.code, ours.out, ours.err) == (theirs.code, theirs.out, theirs.err)
    q, o = tmp_path / "q" / "img.qcow2", tmp_path / "o" / "img.qcow2"
    assert q.exists() == o.exists()
    if q.exists():
        assert o.read_bytes() == q.read_bytes(), "a fresh image is laid out as qemu lays it"


def _image_with_data(tmp_path: Path) -> Path:
    img = oracle.create(tmp_path / "img.qcow2", 64 * MiB)
    oracle.qemu_io(img, "write -P 7 0 1M", "write -P 9 40M 64k")
    return img


def test_snapshot_create_apply_delete_match_qemu_img(tmp_path: Path) -> None:
    img = _image_with_data(tmp_path)
    _, _, q, o = run_both(img, "info")
    steps = [
        ("snapshot", "-c", "s1"),
        ("snapshot", "-c", "s2"),
        ("snapshot", "-a", "s1"),
        ("snapshot", "-d", "s2"),
        ("snapshot", "-d", "nosuch"),
        ("snapshot", "-a", "nosuch"),
        ("snapshot", "-l"),
    ]
    for i, step in enumerate(steps):
        if i == 1:
            for path in (q, o):
                oracle.qemu_io(path, "write -P 8 0 64k")
        theirs, ours, _, _ = run_both(img, *step, copy=False)
        if step[1] == "-l":
            # dates differ (created at different times): compare all other columns
            assert [line[:46] for line in ours.out.splitlines()] == [
                line[:46] for line in theirs.out.splitlines()
            ]
        else:
            assert (ours.code, ours.out, ours.err) == (theirs.code, theirs.out, theirs.err), step
    assert _info_without_volatile(o) == _info_without_volatile(q)
    assert oracle.convert(o) == oracle.convert(q)
    assert oracle.convert(o, snapshot="s1") == oracle.convert(q, snapshot="s1")
    assert oracle.check(o)["exit-code"] == 0


def test_resize_matches_qemu_img(tmp_path: Path) -> None:
    img = _image_with_data(tmp_path)
    _, _, q, o = run_both(img, "info")
    for step in (("resize", "+1M"), ("resize", "-1M"), ("resize", "--shrink", "-8M")):
        os.chdir(q.parent)
        theirs = run_qemu_img(step[0], *step[1:-1], q.name, step[-1])
        os.chdir(o.parent)
        ours = run_cli(step[0], *step[1:-1], o.name, step[-1])
        assert (ours.code, ours.out, ours.err) == (theirs.code, theirs.out, theirs.err), step
    assert _info_without_volatile(o) == _info_without_volatile(q)
    assert oracle.convert(o) == oracle.convert(q)
    assert oracle.check(o)["exit-code"] == 0


def test_compare_exit_codes_match_qemu_img(tmp_path: Path) -> None:
    a = oracle.create(tmp_path / "a.qcow2", 8 * MiB)
    oracle.qemu_io(a, "write -P 1 0 64k")
    same = oracle.create(tmp_path / "same.qcow2", 8 * MiB)
    oracle.qemu_io(same, "write -P 1 0 32k", "write -P 1 32k 32k")
    differs = oracle.create(tmp_path / "differs.qcow2", 8 * MiB)
    oracle.qemu_io(differs, "write -P 1 0 64k", "write -P 2 5M 512")
    bigger = oracle.create(tmp_path / "bigger.qcow2", 9 * MiB)
    oracle.qemu_io(bigger, "write -P 1 0 64k")
    raw = tmp_path / "a.raw"
    raw.write_bytes(oracle.convert(a))
    os.chdir(tmp_path)
    pairs = [
        ("a.qcow2", "same.qcow2"),
        ("a.qcow2", "differs.qcow2"),
        ("a.qcow2", "bigger.qcow2"),
        ("bigger.qcow2", "differs.qcow2"),
        ("a.qcow2", "a.raw"),
        ("a.qcow2", "missing.qcow2"),
    ]
    codes = []
    for x, y in pairs:
        theirs = run_qemu_img("compare", x, y)
        ours = run_cli("compare", x, y)
        assert (ours.code, ours.out, ours.err) == (theirs.code, theirs.out, theirs.err), (x, y)
        codes.append(ours.code)
    assert set(codes) == {0, 1, 2}


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_convert_output_is_byte_identical_to_qemu_img(tmp_path: Path, fmt: str) -> None:
    img = _image_with_data(tmp_path)
    oracle.snapshot(img, "create", "s1")
    oracle.qemu_io(img, "write -P 3 0 64k", "write -c -P 4 2M 64k", "write -z 40M 64k")
    os.chdir(tmp_path)
    for extra, name in (((), "out"), (("-l", "snapshot.name=s1"), "snap"), (("-l", "1"), "id")):
        theirs = run_qemu_img("convert", *extra, "-O", fmt, "img.qcow2", f"{name}.q")
        ours = run_cli("convert", *extra, "-O", fmt, "img.qcow2", f"{name}.o")
        assert (ours.code, ours.out, ours.err) == (theirs.code, theirs.out, theirs.err)
        assert (tmp_path / f"{name}.o").read_bytes() == (tmp_path / f"{name}.q").read_bytes()


def test_convert_progress_ends_at_100_percent(tmp_path: Path) -> None:
    img = _image_with_data(tmp_path)
    ours = run_cli("convert", "-p", "-O", "raw", str(img), str(tmp_path / "out.raw"))
    assert ours.code == 0
    assert ours.out.startswith("    (0.00/100%)\r")
    assert ours.out.endswith("    (100.00/100%)\r\n")
    assert (tmp_path / "out.raw").read_bytes() == oracle.convert(img)


# Section: locks and hostile images


def test_locked_image_gives_qemu_img_lock_error(tmp_path: Path) -> None:
    img = _image_with_data(tmp_path)
    os.chdir(tmp_path)
    with held_by_qemu_io(img):
        assert run_qemu_img("info", "img.qcow2").code == 1, "qemu-io never took its lock"
        for args in (
            ("info", "img.qcow2"),
            ("check", "img.qcow2"),
            ("check", "-r", "all", "img.qcow2"),
            ("map", "img.qcow2"),
            ("snapshot", "-l", "img.qcow2"),
            ("snapshot", "-c", "x", "img.qcow2"),
            ("info", "-U", "img.qcow2"),
            ("compare", "img.qcow2", "img.qcow2"),
            ("compare", "-U", "img.qcow2", "img.qcow2"),
            ("convert", "-O", "raw", "img.qcow2", "out.raw"),
            ("convert", "-U", "-O", "raw", "img.qcow2", "out.raw"),
        ):
            theirs = run_qemu_img(*args)
            ours = run_cli(*args)
            assert (ours.code, ours.out, ours.err) == (theirs.code, theirs.out, theirs.err), args
        assert "Is another process using the image [img.qcow2]?" in run_cli("info", "img.qcow2").err


#: Hostile header values: (name, offset, struct format, value); None = a truncation.
HOSTILE = [
    ("truncated-header", 50, None, 0),
    ("truncated-after-header", 4096, None, 0),
    ("cluster_bits-30", 20, ">I", 30),
    ("size-huge", 24, ">Q", 1 << 62),
    ("l1_size-huge", 36, ">I", 0x7FFFFFFF),
    ("l1_offset-unaligned", 40, ">Q", 0x30001),
    ("l1_offset-past-eof", 40, ">Q", 1 << 50),
    ("reftable-offset-past-eof", 48, ">Q", 1 << 40),
    ("reftable-clusters-huge", 56, ">I", 0xFFFFFFFF),
    ("reftable-clusters-zero", 56, ">I", 0),
    ("nb_snapshots-huge", 60, ">I", 0xFFFFFFFF),
    ("snapshots-offset-unaligned", 64, ">Q", 0x1234),
    ("snapshot-table-garbage", 60, ">I", 3),
    ("unknown-incompatible-bit", 72, ">Q", 1 << 40),
    ("autoclear-data-file-raw-without-data-file", 88, ">Q", 2),
    ("refcount_order-7", 96, ">I", 7),
    ("header_length-huge", 100, ">I", 1 << 20),
    ("refblock-pointer-garbage", 0x10000, ">Q", 0xFFFFFFFFFFFFFFFF),
    ("l1-entry-garbage", 0x30000, ">Q", 0x7FFFFFFFFFFFFFFF),
    ("l2-entry-garbage", 0x40000, ">Q", 0xFFFFFFFFFFFFFFFF),
]

_COMMANDS = [
    ("check",),
    ("check", "--output=json"),
    ("info", "--output=json"),
    ("map",),
    ("snapshot", "-l"),
]


def _hostile_params() -> list[object]:
    return [
        pytest.param(command, variant, id=f"{variant[0]}-{'-'.join(command)}")
        for variant in HOSTILE
        for command in _COMMANDS
    ]


def _hostile_image(base: bytes, offset: int, fmt: str | None, value: int) -> bytes:
    import struct

    if fmt is None:
        return base[:offset]
    raw = bytearray(base)
    struct.pack_into(fmt, raw, offset, value)
    if offset == 60:  # a snapshot count needs a table to point at
        struct.pack_into(">Q", raw, 64, 0x50000)
    return bytes(raw)


@pytest.mark.parametrize(("command", "variant"), _hostile_params())
def test_hostile_images_fail_like_qemu_img_without_traceback(
    tmp_path: Path, command: tuple[str, ...], variant: tuple[str, int, str | None, int]
) -> None:
    _, offset, fmt, value = variant
    (tmp_path / "base").mkdir()
    base = _image_with_data(tmp_path / "base")
    data = _hostile_image(base.read_bytes(), offset, fmt, value)
    path = tmp_path / "img.qcow2"
    path.write_bytes(data)
    theirs, ours, _, mine = run_both(path, *command)
    assert "Traceback" not in ours.err
    assert mine.read_bytes() == data, "a read-only command modified the image"
    assert ours.code == theirs.code, (theirs.err, ours.err)
    if theirs.code != 0:
        assert ours.err.strip()
    if theirs.err.startswith("qemu-img: "):
        assert ours.err.startswith("qemu-img: ")


@pytest.mark.parametrize(
    "options",
    [(), ("-o", "compression_type=zstd"), ("-o", "cluster_size=4096"), ("-o", "extended_l2=on")],
    ids=lambda o: o[1] if o else "default",
)
def test_convert_compressed_is_byte_identical_to_qemu_img(
    tmp_path: Path, options: tuple[str, ...]
) -> None:
    """-c packs compressed clusters as qemu does; incompressible ones are stored plainly."""
    img = oracle.create(tmp_path / "img.qcow2", 8 * MiB + 4096)  # last cluster partial
    random = tmp_path / "random.bin"
    random.write_bytes(os.urandom(200 * 1024))
    oracle.qemu_io(
        img,
        "write -P 0x11 0 300k",
        f"write -s {random} 1M 200k",
        "write -P 0x22 3M 64k",
        "write -P 0x33 8M 4k",
    )
    os.chdir(tmp_path)
    theirs = run_qemu_img("convert", "-c", *options, "-O", "qcow2", "img.qcow2", "q.qcow2")
    ours = run_cli("convert", "-c", *options, "-O", "qcow2", "img.qcow2", "o.qcow2")
    assert (ours.code, ours.out, ours.err) == (theirs.code, theirs.out, theirs.err)
    assert (tmp_path / "o.qcow2").read_bytes() == (tmp_path / "q.qcow2").read_bytes()
    assert oracle.check(tmp_path / "o.qcow2")["compressed-clusters"] > 0


@pytest.mark.parametrize(
    "args",
    [("check", "-q"), ("check", "-q", "--output=json"), ("snapshot", "-q", "-l")],
    ids=lambda a: "-".join(a),
)
def test_quiet_flag_like_qemu_img(tmp_path: Path, args: tuple[str, ...]) -> None:
    """-q drops the summary but not the findings (stderr) nor the exit code."""
    img = _image_with_data(tmp_path)
    oracle.snapshot(img, "create", "s1")
    with open(img, "r+b") as f:  # one leaked cluster: refcount 2 instead of 1
        f.seek(0x20000 + 2 * ((img.stat().st_size - 1) // 65536))
        f.write(b"\x00\x05")
    theirs, ours, _, _ = run_both(img, *args)
    assert (ours.code, ours.out, ours.err) == (theirs.code, theirs.out, theirs.err)


def _amend_images(tmp: Path) -> dict[str, Path]:
    images = {
        "v2-snapshot": oracle.create(tmp / "v2-snapshot.qcow2", 64 * MiB, compat="0.10"),
        "zero-clusters": oracle.create(tmp / "zero-clusters.qcow2", 64 * MiB),
        "extended-l2": oracle.create(tmp / "extended-l2.qcow2", MiB, extended_l2=True),
        "refcount-8": oracle.create(tmp / "refcount-8.qcow2", MiB, refcount_bits=8),
        "zstd-compressed": oracle.create(
            tmp / "zstd-compressed.qcow2", MiB, compression_type="zstd"
        ),
        "lazy": oracle.create(tmp / "lazy.qcow2", MiB, lazy_refcounts=True),
    }
    oracle.qemu_io(images["v2-snapshot"], "write 0 64k")
    oracle.snapshot(images["v2-snapshot"], "create", "s")
    oracle.qemu_io(
        images["zero-clusters"],
        "write 0 128k",
        "write -z 0 64k",
        "write -z 1M 64k",
        "discard 64k 64k",
    )
    oracle.snapshot(images["zero-clusters"], "create", "s")
    oracle.qemu_io(images["zero-clusters"], "write -z 2M 64k")
    oracle.qemu_io(images["zstd-compressed"], "write -c 0 64k")
    oracle.qemu_io(images["lazy"], "write 0 64k")
    return images


def test_amend_matches_qemu_img(tmp_path: Path) -> None:
    """compat up/downgrades (zero clusters expanded) and lazy_refcounts, byte for byte."""
    images = _amend_images(tmp_path)
    options = [
        "compat=1.1",
        "compat=0.10",
        "compat=0.9",
        "lazy_refcounts=on",
        "lazy_refcounts=off",
        "compat=0.10,lazy_refcounts=on",
    ]
    mismatches = []
    for name, img in images.items():
        for opt in options:
            theirs, ours, q, o = run_both(img, "amend", "-o", opt)
            if (ours.code, ours.out, ours.err) != (theirs.code, theirs.out, theirs.err):
                mismatches.append((name, opt, theirs.err, ours.err))
            elif q.read_bytes() != o.read_bytes():
                mismatches.append((name, opt, "image bytes differ", ""))
    assert not mismatches, mismatches
    theirs, ours, _, _ = run_both(images["lazy"], "amend")
    hint = "Try 'qemu-img --help' for more information\n"  # usage errors are one line here
    assert (ours.code, ours.err) == (theirs.code, theirs.err.replace(hint, "")) == (1, ours.err)


def test_resize_of_v2_image_with_snapshots_is_refused_like_qemu_img(tmp_path: Path) -> None:
    img = oracle.create(tmp_path / "img.qcow2", 64 * MiB, compat="0.10")
    oracle.snapshot(img, "create", "s1")
    for size in ("+1M", "64M"):
        os.chdir(tmp_path)
        theirs = run_qemu_img("resize", "img.qcow2", size)
        ours = run_cli("resize", "img.qcow2", size)
        assert (ours.code, ours.out, ours.err) == (theirs.code, theirs.out, theirs.err)
        assert ours.code == 1


def test_convert_snapshot_selection_matches_qemu_img(tmp_path: Path) -> None:
    """-l picks by exact ID or name, a bare tag is an ID first; the output has the current
    size even when the snapshot's disk was smaller."""
    img = oracle.create(tmp_path / "img.qcow2", 2 * MiB)
    oracle.qemu_io(img, "write -P 1 0 64k")
    oracle.snapshot(img, "create", "2")  # ID 1, named "2"
    oracle.qemu_io(img, "write -P 2 0 64k")
    oracle.snapshot(img, "create", "first")  # ID 2
    oracle.qemu_img("resize", str(img), "4M")
    oracle.qemu_io(img, "write -P 3 3M 64k")
    os.chdir(tmp_path)
    for sel in ("1", "2", "first", "snapshot.name=2", "snapshot.id=2", "nosuch", "snapshot.id=7"):
        theirs = run_qemu_img("convert", "-l", sel, "-O", "raw", "img.qcow2", "q.raw")
        ours = run_cli("convert", "-l", sel, "-O", "raw", "img.qcow2", "o.raw")
        assert (ours.code, ours.out, ours.err) == (theirs.code, theirs.out, theirs.err), sel
        if theirs.code == 0:
            assert (tmp_path / "o.raw").read_bytes() == (tmp_path / "q.raw").read_bytes(), sel


def test_snapshot_refcount_overflow_fails_like_qemu_img(tmp_path: Path) -> None:
    """refcount_bits=1 cannot count a snapshot's shared clusters: both tools refuse, with
    the same first words; ours names the cluster once and leaves the image as it was."""
    img = oracle.create(tmp_path / "img.qcow2", 4 << 20, refcount_bits=1, cluster_size=4096)
    oracle.qemu_io(img, "write -P 1 0 64k")
    before = img.read_bytes()
    theirs, ours, _, o = run_both(img, "snapshot", "-c", "s1")
    prefix = "qemu-img: Could not create snapshot 's1': "
    assert theirs.code == ours.code == 1 and theirs.err.startswith(prefix)
    assert ours.err.startswith(prefix) and ours.err.count("Could not") == 1
    assert ours.err.count("\n") == 1 and "refcount" in ours.err
    assert o.read_bytes() == before
    assert run_qemu_img("check", str(o)).code == 0

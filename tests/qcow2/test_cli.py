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
from dataclasses import dataclass
from pathlib import Path

import pytest

from qcow2.cli import main
from tests.helpers import need
from tests.qcow2 import oracle

MiB = 1024 * 1024


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
        [need("qemu-img"), *args], capture_output=True, text=True, timeout=120, check=False
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
    for command in ("info", "check", "snapshot", "map", "create", "resize", "compare", "convert"):
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
        assert len(proc.stderr.strip().splitlines()) <= 3


def test_check_on_raw_file_is_unsupported_like_qemu_img(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(os.urandom(1000))
    theirs, ours, _, _ = run_both(raw, "check")
    assert (ours.code, ours.out, ours.err) == (theirs.code, theirs.out, theirs.err)
    assert ours.code == 63

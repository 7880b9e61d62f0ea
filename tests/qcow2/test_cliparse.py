"""The ``qcow2`` command line parses like qemu-img's getopt_long, errors included.

Every case runs both tools on copies of the same image and compares exit code, stdout and
stderr; a usage error is qemu-img's first line only (qemu-img adds a hint line naming its
own --help).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.qcow2 import oracle
from tests.qcow2.test_cli import (  # noqa: F401 - restore_cwd is an autouse fixture
    Run,
    restore_cwd,
    run_cli,
    run_qemu_img,
)

THEIR_HINT = "Try 'qemu-img --help' for more information\n"


@pytest.fixture()
def image(tmp_path: Path) -> Path:
    img = oracle.create(tmp_path / "img.qcow2", 8 << 20)
    oracle.qemu_io(img, "write -P 1 0 64k")
    oracle.snapshot(img, "create", "snap")
    return img


SPELLINGS = [
    # options after the operand, "=" or a separate word, abbreviated long options
    ("info", "--output=json", "IMG"),
    ("info", "IMG", "--output=json"),
    ("info", "--output", "json", "IMG"),
    ("info", "--out=json", "IMG"),
    ("info", "--force-share", "IMG"),
    ("info", "-U", "--backing-chain", "IMG"),
    ("check", "-r", "leaks", "IMG"),
    ("check", "-rleaks", "IMG"),
    ("check", "IMG", "-r", "all"),
    ("snapshot", "-l", "-U", "IMG"),
    ("snapshot", "-lU", "IMG"),
    ("map", "--start-offset", "64k", "IMG", "--output=json"),
    ("info", "--", "IMG"),
    ("info", "-fqcow2", "IMG"),
]

ERRORS = [
    ("info", "-z", "IMG"),
    ("info", "--frobnicate", "IMG"),
    ("info", "--backing-chain=yes", "IMG"),
    ("info", "--output=xml", "IMG"),
    ("info", "IMG", "--output"),
    ("check", "-r", "bogus", "IMG"),
    ("check", "IMG", "-r"),
    ("info",),
    ("info", "IMG", "IMG"),
    ("check",),
    ("snapshot",),
    ("map",),
    ("compare", "IMG"),
    ("compare", "IMG", "IMG", "IMG"),
    ("resize", "IMG"),
    ("resize", "IMG", "1M", "2M"),
    ("create", "-f", "qcow2"),
    ("create", "-f", "qcow2", "new.qcow2", "1M", "extra"),
    ("convert", "IMG"),
    ("frobnicate", "IMG"),
    (),
    ("snapshot", "-l", "-c", "x", "IMG"),
    ("info", "-Uq", "IMG"),
]


def both(image: Path, args: tuple[str, ...]) -> tuple[Run, Run]:
    """qemu-img and qcow2 with ``args`` (``IMG`` = the image's name), each in a directory
    holding its own copy of the image."""
    argv = [image.name if a == "IMG" else a for a in args]
    runs = []
    for tool, run in (("q", run_qemu_img), ("o", run_cli)):
        where = image.parent / tool
        where.mkdir(exist_ok=True)
        shutil.copyfile(image, where / image.name)
        os.chdir(where)  # restore_cwd puts the test's cwd back
        runs.append(run(*argv))
    return runs[0], runs[1]


@pytest.mark.parametrize("args", SPELLINGS, ids=lambda a: " ".join(a))
def test_option_spellings_like_qemu_img(image: Path, args: tuple[str, ...]) -> None:
    theirs, ours = both(image, args)
    assert theirs.code == 0, theirs.err
    assert (ours.code, ours.out, ours.err) == (theirs.code, theirs.out, theirs.err)


@pytest.mark.parametrize("args", ERRORS, ids=lambda a: " ".join(a) or "nothing")
def test_usage_errors_like_qemu_img(image: Path, args: tuple[str, ...]) -> None:
    theirs, ours = both(image, args)
    assert theirs.code != 0
    assert (ours.code, ours.out) == (theirs.code, theirs.out)
    assert ours.err == theirs.err.replace(THEIR_HINT, "")
    assert ours.err.count("\n") == 1 and ours.err.startswith("qemu-img: ")


def test_help_lists_every_option_of_a_command() -> None:
    from qcow2.cli.main import commands

    for command in commands():
        run = run_cli(command.name, "--help")
        assert run.code == 0 and run.out.startswith(f"usage: qcow2 {command.name} ")
        for option in command.options:
            for name in option.names:
                assert name in run.out, (command.name, name)


@pytest.mark.parametrize("ident", ["sec0", "a.b-c_d", "0sec", "-sec", "s/ec", "", "é"])
def test_secret_ids_are_checked_like_qemu_img(image: Path, ident: str) -> None:
    """QEMU's id_wellformed: a letter, then letters, digits, '-', '.', '_'."""
    args = ("info", "--object", f"secret,id={ident},data=pw", "IMG")
    theirs, ours = both(image, args)
    assert (ours.code, ours.out, ours.err) == (theirs.code, theirs.out, theirs.err)

"""Every ``vtpm-qcow`` subcommand explains itself, and its failures are one line.

The list of commands comes from the parser itself, so a new command is checked too; each
``--help`` runs the real installed command.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import held_by_qemu_io, need
from tests.vtpm.mount_fixtures import (
    create_image,
    mounted,
    runtime_dir,  # noqa: F401  (fixture)
    vtpm_qcow,
)
from vtpm_qcow.cli.main import build_parser

pytestmark = pytest.mark.usefixtures("runtime_dir")


def subcommands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every (nested) subcommand: its words and its parser."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from subcommands(sub, (*path, name))


COMMANDS = dict(subcommands(build_parser()))


def test_the_command_set_is_complete() -> None:
    words = {" ".join(path) for path in COMMANDS}
    expected = {"create", "setup", "snapshot", "info", "import", "export", "backup", "verify"}
    expected |= {"restore", "mount", "serve", "umount", "vm", "vm save", "vm load", "vm watch"}
    assert expected <= words


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=" ".join)
def test_help_explains_every_argument_with_examples(path: tuple[str, ...]) -> None:
    parser = COMMANDS[path]
    done = subprocess.run(
        [need("vtpm-qcow"), *path, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "80"},
    )
    assert done.returncode == 0 and not done.stderr
    text = done.stdout
    assert text.startswith(f"usage: vtpm-qcow {' '.join(path)}")
    assert "examples:\n  vtpm-qcow " + path[0] in text, "no examples in the epilog"
    assert max(len(line) for line in text.splitlines()) <= 100, "prose not wrapped"
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        names = action.option_strings or [str(action.metavar or action.dest)]
        assert all(str(name) in text for name in names), f"{names} not in the help"
        assert action.help, f"{path}: argument {names} has no help text"


def one_line_failure(*args: str) -> str:
    """A failing command's single stderr line."""
    done = vtpm_qcow(*args, check=False)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


def test_a_missing_image_is_one_line_everywhere(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.qcow2")
    for args in (
        ("info", missing),
        ("snapshot", "-l", missing),
        ("snapshot", "-c", "t", missing),
        ("export", missing, str(tmp_path / "x")),
        ("import", missing, str(tmp_path / "x")),
        ("setup", missing),
        ("backup", missing, str(tmp_path / "x")),
        ("serve", missing, "--ctrl", str(tmp_path / "ctrl")),
    ):
        line = one_line_failure(*args)
        assert line.startswith(f"vtpm-qcow: {missing}: no such"), (args, line)


def test_held_images_name_their_holder(tmp_path: Path) -> None:
    image = create_image(tmp_path / "vtpm.qcow2")
    source = tmp_path / "state.lin"
    vtpm_qcow("export", str(image), str(source), check=False)  # nothing to export yet
    with held_by_qemu_io(image):
        for args in (("import", str(image), str(source)), ("snapshot", "-c", "t", str(image))):
            line = one_line_failure(*args)
            assert "locked by another process (QEMU" in line, line
    with mounted(image, tmp_path / "mnt"):
        line = one_line_failure("import", str(image), str(source))
        assert "held by a vtpm-qcow mount daemon" in line and "umount" in line, line


def test_qmp_socket_problems_are_one_line(tmp_path: Path) -> None:
    image = create_image(tmp_path / "vtpm.qcow2")
    gone = tmp_path / "vanished.qmp"
    line = one_line_failure("vm", "status", "--qmp", str(gone), "--store", str(image))
    assert str(gone) in line
    plain = tmp_path / "plain-file"
    plain.write_text("")
    line = one_line_failure("vm", "list", "--qmp", str(plain), "--store", str(image))
    assert "not a socket" in line


def test_json_output_parses(tmp_path: Path) -> None:
    image = create_image(tmp_path / "vtpm.qcow2")
    vtpm_qcow("snapshot", "-c", "one", str(image))
    listed = json.loads(vtpm_qcow("snapshot", "-l", "--json", str(image)).stdout)
    assert [s["tag"] for s in listed] == ["one"]
    info = json.loads(vtpm_qcow("info", "--json", str(image)).stdout)
    assert info["image"] == str(image) and os.path.exists(info["image"])


def test_missing_swtpm_is_one_line(tmp_path: Path) -> None:
    image = create_image(tmp_path / "vtpm.qcow2")
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    for args, tool in (
        (("serve", str(image), "--ctrl", str(tmp_path / "ctrl")), "swtpm"),
        (("setup", "--overwrite", str(image)), "swtpm_setup"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "vtpm_qcow", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PATH": str(empty)},
            check=False,
        )
        assert done.returncode == 1 and "Traceback" not in done.stderr
        expected = f"vtpm-qcow: {tool}: not found on PATH (install swtpm / swtpm-tools)"
        assert done.stderr.strip() == expected

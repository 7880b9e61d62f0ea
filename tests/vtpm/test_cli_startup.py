"""``vtpm-qcow info`` and ``snapshot -l`` start without the slow standard modules.

Hooks and scripts run them often, beside qemu-img, which answers in a few milliseconds
(issue 11): so they take a fast path without argparse (``vtpm_qcow.cli.main._read_only``)
and import none of :data:`FORBIDDEN`, directly or through another module (argparse,
dataclasses, typing, pathlib and the rest cost 40 ms of the 65 ms the command took).  Each
command runs under ``-X importtime`` as the installed launcher (``python -S -X importtime
LAUNCHER ...``, as the launcher runs itself) and as ``python -S -m vtpm_qcow`` (there, what
runpy imports before any of our code is exempt), on a TPM manufactured by swtpm_setup with
snapshots, an image not set up yet, a LUKS-encrypted one read without its key, and an image
another process holds.  Its output must be the argparse path's, byte for byte: the same
command with the global ``-q`` (which the fast path leaves to argparse).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest

import vtpm_qcow
from tests.helpers import held_by_qemu_io, need
from tests.qcow2.test_import_diet import FORBIDDEN as QCOW2_FORBIDDEN
from tests.qcow2.test_import_diet import import_tree
from tests.vtpm.swtpm_fixtures import need_swtpm
from vtpm_qcow.cli.output import dumps

#: What ``info``/``snapshot -l`` must not import: qcow2's list (tests/qcow2/test_import_diet.py)
#: and the modules the vtpm-qcow command used to import before its first line of work.
FORBIDDEN = QCOW2_FORBIDDEN | frozenset(
    {
        "pathlib",
        "datetime",  # the pure-Python module; its C twin _datetime is what is used
        "urllib.parse",
        "functools",
        "threading",
        "json",
        "logging",
        "ctypes",
        "tempfile",
        "subprocess",
        "certifi",
        "trio",
        "cryptography",
    }
)

REPO = Path(vtpm_qcow.__file__).resolve().parents[1]
LAUNCHER = Path(sysconfig.get_path("scripts")) / "vtpm-qcow"
#: The read-only invocations of the fast path (IMAGE is appended).
COMMANDS = [("info",), ("info", "--json"), ("snapshot", "-l"), ("snapshot", "--list", "--json")]
SECRET = b"a passphrase for the startup test"


def vtpm_qcow_cmd(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m vtpm_qcow ARGS`` (with site: the full command as the tests run it)."""
    return subprocess.run(
        [sys.executable, "-m", "vtpm_qcow", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A manufactured TPM with 2 snapshots, an empty image, a LUKS-encrypted one."""
    need_swtpm()
    need("qemu-img")
    tmp = tmp_path_factory.mktemp("startup")
    tpm, empty, enc = tmp / "tpm.qcow2", tmp / "empty.qcow2", tmp / "enc.qcow2"
    key = tmp / "key"
    key.write_bytes(SECRET)
    key.chmod(0o600)
    for args in (
        ("-q", "setup", "--create", str(tpm)),
        ("-q", "snapshot", "-c", "first", str(tpm)),
        ("-q", "snapshot", "-c", "second tag", str(tpm)),
        ("-q", "create", str(empty)),
        ("-q", "create", "--encrypt", "--iter-time", "10", "--secret-file", str(key), str(enc)),
        ("-q", "snapshot", "-c", "s1", "--secret-file", str(key), str(enc)),
    ):
        done = vtpm_qcow_cmd(*args)
        assert done.returncode == 0, done.stderr
    return {"tpm": tpm, "empty": empty, "encrypted": enc}


def run_importtime(
    how: str, args: list[str], cwd: Path
) -> tuple[subprocess.CompletedProcess[str], list[tuple[int, str]]]:
    """Run the command with ``-S -X importtime``; the process and its import tree."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    if how == "launcher":
        assert LAUNCHER.is_file(), f"{LAUNCHER} missing: run tools/setup-system"
        argv = [sys.executable, "-S", "-X", "importtime", str(LAUNCHER), *args]
    else:
        # -S: what site's .pth code imports is not the command's; PYTHONPATH finds the
        # package and its dependencies (xxhash) without site.
        paths = {str(REPO), sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
        env["PYTHONPATH"] = os.pathsep.join(sorted(paths))
        argv = [sys.executable, "-S", "-X", "importtime", "-m", "vtpm_qcow", *args]
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=60, check=False, cwd=cwd, env=env
    )
    tree = import_tree(proc.stderr)
    proc.stderr = "\n".join(
        line for line in proc.stderr.splitlines() if not line.startswith("import time:")
    )
    return proc, tree


def slow_imports(tree: list[tuple[int, str]], exempt: frozenset[str]) -> str:
    """The forbidden modules of ``tree`` not in ``exempt``, each with its importer."""
    found = {}
    for i, (depth, name) in enumerate(tree):
        if (name in FORBIDDEN or name.split(".")[0] in FORBIDDEN) and name not in exempt:
            found[name] = next((n for d, n in tree[i + 1 :] if d < depth), "at run time")
    return ", ".join(f"{name} (by {importer})" for name, importer in sorted(found.items()))


@pytest.fixture(scope="module")
def before_runpy() -> frozenset[str]:
    done = subprocess.run(
        [sys.executable, "-S", "-X", "importtime", "-c", "import runpy"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return frozenset(name for _, name in import_tree(done.stderr))


def check_command(
    how: str, args: list[str], cwd: Path, runpy: frozenset[str]
) -> subprocess.CompletedProcess[str]:
    """Run a read-only invocation: no slow import, and argparse's output, byte for byte."""
    proc, tree = run_importtime(how, args, cwd)
    exempt = frozenset() if how == "launcher" else runpy
    slow = slow_imports(tree, exempt)
    assert not slow, f"vtpm-qcow {' '.join(args)} imports {slow}"
    full = vtpm_qcow_cmd("-q", *args, cwd=cwd)  # global -q: argparse parses the command
    assert "Traceback" not in proc.stderr
    assert (proc.returncode, proc.stdout, proc.stderr.strip()) == (
        full.returncode,
        full.stdout,
        full.stderr.strip(),
    )
    return proc


@pytest.mark.parametrize("how", ["launcher", "python -S -m vtpm_qcow"])
@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
@pytest.mark.parametrize("image", ["tpm", "empty", "encrypted"])
def test_read_only_command_skips_slow_imports(
    images: dict[str, Path],
    before_runpy: frozenset[str],
    command: tuple[str, ...],
    image: str,
    how: str,
) -> None:
    path = images[image]
    proc = check_command(how, [*command, path.name], path.parent, before_runpy)
    if image == "encrypted" and command[0] == "snapshot":  # reading the state needs the key
        assert proc.returncode == 1 and "is LUKS-encrypted" in proc.stderr, proc.stderr
        return
    assert proc.returncode == 0, proc.stderr
    if image == "tpm":
        assert "second tag" in proc.stdout
    if "--json" in command:
        value = json.loads(proc.stdout)
        assert proc.stdout == json.dumps(value, indent=2) + "\n"


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_held_image_is_read_shared_on_the_fast_path(
    images: dict[str, Path], before_runpy: frozenset[str], command: tuple[str, ...]
) -> None:
    """While qemu-io holds the image, both paths read it shared (like qemu-img -U)."""
    path = images["tpm"]
    with held_by_qemu_io(path):
        proc = check_command("launcher", [*command, str(path)], path.parent, before_runpy)
    assert proc.returncode == 0 and "first" in proc.stdout, proc.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["info", "no-such.qcow2"],
        ["snapshot", "-l", "no-such.qcow2"],
        ["info", "--json", "not-a-qcow2"],
    ],
    ids=" ".join,
)
def test_failures_on_the_fast_path_are_the_same_line(
    tmp_path: Path, before_runpy: frozenset[str], args: list[str]
) -> None:
    (tmp_path / "not-a-qcow2").write_bytes(b"not a qcow2 image\n" * 100)
    proc = check_command("launcher", args, tmp_path, before_runpy)
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["info", "-U", "IMAGE"],  # info has no -U: argparse's error
        ["info", "--js", "IMAGE"],  # an abbreviation argparse accepts
        ["info", "IMAGE", "IMAGE"],
        ["info", "--json", "--json", "IMAGE"],
        ["snapshot", "--json", "IMAGE"],  # no action: argparse's error
        ["snapshot", "-l", "-c", "x", "IMAGE"],
        ["info", "--secret-file", "KEY", "IMAGE"],
        ["info", "--help"],
        ["info"],
        ["info", "--", "IMAGE"],
        ["info", ""],
    ],
    ids=" ".join,
)
def test_anything_else_goes_to_argparse(images: dict[str, Path], args: list[str]) -> None:
    """Invocations the fast path does not take exactly as written are argparse's (the
    same output as with the global -q, which never takes the fast path)."""
    key = images["encrypted"].parent / "key"
    image = str(images["encrypted"] if "--secret-file" in args else images["tpm"])
    argv = [image if a == "IMAGE" else str(key) if a == "KEY" else a for a in args]
    proc, tree = run_importtime("launcher", argv, images["tpm"].parent)
    assert "argparse" in {name for _, name in tree}
    full = vtpm_qcow_cmd("-q", *argv, cwd=images["tpm"].parent)
    assert (proc.returncode, proc.stdout, proc.stderr.strip()) == (
        full.returncode,
        full.stdout,
        full.stderr.strip(),
    )


def test_the_fast_path_is_taken_and_argparse_agrees() -> None:
    """``_read_only`` takes exactly the invocations it names, in any order."""
    from vtpm_qcow.cli.main import _read_only, build_parser

    taken = [
        ["info", "x"],
        ["info", "--json", "x"],
        ["info", "x", "--json"],
        ["snapshot", "-l", "x"],
        ["snapshot", "x", "--list"],
        ["snapshot", "--json", "x", "-l"],
        ["snapshot", "-l", "--list", "x"],
    ]
    for argv in taken:
        quick = _read_only(argv)
        assert quick is not None, argv
        args = build_parser().parse_args(argv)
        assert (args.command, args.image, args.json) == quick, argv
        assert args.command == "info" or args.list
    for argv in [[], ["create", "x"], ["info", "-"], ["info", "-5"], ["snapshot", "x"]]:
        assert _read_only(argv) is None, argv


def _values() -> Iterator[object]:
    yield from ({}, [], (), {"a": []}, {"a": {}}, [[], {}, ()], "", 0, -7, 10**30)
    yield from (1.5, -0.0, 1e300, float("nan"), float("inf"), -float("inf"), True, None)
    yield 'quote " backslash \\ control \x00\x1f\n\t é 漢 \U0001f600 \ud800'
    yield {1: "int key", 2.5: "float key", None: "null key", False: "bool key", "s": (1, 2)}
    yield {"nested": [{"deep": [[[]]], "x": [True, False, None]}], "n": 3}


def test_json_output_is_json_dumps_byte_for_byte() -> None:
    """``--json`` writes what ``json.dumps(value, indent=2)`` writes, without json."""
    for value in _values():
        assert dumps(value) == json.dumps(value, indent=2), repr(value)
    deep: list[object] = []
    inner = deep
    for _ in range(150):  # deeper than the fast encoder goes: json's own
        inner.append([])
        inner = inner[0]  # type: ignore[assignment]
    assert dumps(deep) == json.dumps(deep, indent=2)
    with pytest.raises(TypeError, match="not JSON serializable"):
        dumps({"x": object()})
    cycle: list[object] = []
    cycle.append(cycle)
    with pytest.raises(ValueError, match="Circular reference"):
        dumps(cycle)


def test_snapshot_dates_are_the_datetime_module_s() -> None:
    """The store takes its dates from ``_datetime`` (``import datetime`` costs 1.7 ms):
    the very classes and values :mod:`datetime` gives."""
    import datetime

    from vtpm_qcow.state.store import utc_time

    for seconds in (0, 1, 1_700_000_000, 0xFFFFFFFF):
        date = utc_time(seconds)
        assert type(date) is datetime.datetime
        assert date == datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)
        assert (
            date.isoformat()
            == datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC).isoformat()
        )

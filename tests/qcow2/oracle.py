"""qemu-img / qemu-io as oracles: thin wrappers that return parsed results.

Every test that compares this project's qcow2 code against QEMU goes through here, so the
command lines (and their failure reporting) live in one place.  A missing tool fails the
test (``tests.helpers.need``).  Failures of the tools raise :class:`OracleError` with the
command line and stderr, except where a non-zero exit is a result (``check``).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.helpers import need

PathLike = str | os.PathLike[str]

#: qemu-img check exit codes (qemu-img.c): 0 clean, 1 check failed, 2 corruptions, 3 leaks.
CHECK_CLEAN = 0
CHECK_FAILED = 1
CHECK_CORRUPT = 2
CHECK_LEAKS = 3


class OracleError(AssertionError):
    """A qemu tool failed where the test expected it to succeed."""


def _run(
    args: Sequence[str], *, ok: Sequence[int] = (0,), timeout: float = 120
) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run(list(args), capture_output=True, timeout=timeout, check=False)
    if proc.returncode not in ok:
        raise OracleError(
            f"{' '.join(args)} exited {proc.returncode}: "
            f"{proc.stderr.decode(errors='replace').strip()}"
        )
    return proc


def qemu_img(*args: str, ok: Sequence[int] = (0,)) -> subprocess.CompletedProcess[bytes]:
    """Run ``qemu-img ARGS``; raise OracleError unless the exit code is in ``ok``."""
    return _run([need("qemu-img"), *args], ok=ok)


def qemu_io(path: PathLike, *commands: str, fmt: str = "qcow2") -> str:
    """Run ``qemu-io -f FMT -c CMD ...`` on ``path``; return stdout.

    qemu-io exits 0 even when a command fails, so output lines starting with a failure
    marker are turned into OracleError.
    """
    args = [need("qemu-io"), "-f", fmt]
    for command in commands:
        args += ["-c", command]
    out = _run([*args, os.fspath(path)]).stdout.decode(errors="replace")
    for line in out.splitlines():
        if "failed:" in line or line.startswith("qemu-io:"):
            raise OracleError(f"qemu-io {commands!r} on {path}: {line}")
    return out


def create(path: PathLike, size: int, **options: object) -> Path:
    """``qemu-img create -f qcow2 -o key=value,... PATH SIZE`` (qemu-img's option names)."""
    opts = [f"{key}={_opt(value)}" for key, value in options.items()]
    args = ["create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", ",".join(opts)]
    qemu_img(*args, os.fspath(path), str(size))
    return Path(path)


def _opt(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def check(
    path: PathLike, *, repair: str | None = None, force_share: bool = False
) -> dict[str, Any]:
    """``qemu-img check --output=json``: the parsed JSON plus ``exit-code`` and ``stderr``.

    Exit codes 0 (clean), 2 (corruptions) and 3 (leaks) are results; 1 ("Check failed")
    still returns, with whatever JSON qemu printed (possibly none).
    """
    args = ["check", "--output=json"]
    if repair:
        args += ["-r", repair]
    if force_share:
        args.append("-U")
    proc = qemu_img(*args, os.fspath(path), ok=(0, 1, 2, 3))
    text = proc.stdout.decode(errors="replace").strip()
    result: dict[str, Any] = json.loads(text) if text.startswith("{") else {}
    result["exit-code"] = proc.returncode
    result["stderr"] = proc.stderr.decode(errors="replace")
    return result


def verdict(path: PathLike, *, drop: Sequence[str] = ("filename",)) -> tuple[int, object]:
    """``qemu-img check --output=json``'s exit code and report without the ``drop`` keys
    (the text it printed when that is no JSON), to compare the verdicts on two images."""
    proc = qemu_img("check", "--output=json", os.fspath(path), ok=range(256))
    text = proc.stdout.decode(errors="replace")
    try:
        report = json.loads(text)
    except json.JSONDecodeError:
        return proc.returncode, text
    for key in drop:
        report.pop(key, None)
    return proc.returncode, report


def assert_clean(path: PathLike, *, allow_leaks: bool = False) -> dict[str, Any]:
    """Fail unless ``qemu-img check`` calls the image clean (or, if allowed, leaks only)."""
    result = check(path)
    accepted = (CHECK_CLEAN, CHECK_LEAKS) if allow_leaks else (CHECK_CLEAN,)
    if result["exit-code"] not in accepted:
        raise AssertionError(
            f"qemu-img check {path}: exit {result['exit-code']}: {result['stderr'].strip()}"
        )
    return result


def info(path: PathLike, *, force_share: bool = False) -> dict[str, Any]:
    """``qemu-img info --output=json``, parsed."""
    args = ["info", "--output=json"]
    if force_share:
        args.append("-U")
    parsed: dict[str, Any] = json.loads(qemu_img(*args, os.fspath(path)).stdout)
    return parsed


def snapshot_list(path: PathLike) -> list[dict[str, Any]]:
    """The image's internal snapshots as qemu-img info reports them (id, name, sizes...)."""
    snapshots: list[dict[str, Any]] = info(path).get("snapshots", [])
    return snapshots


def snapshot(path: PathLike, op: str, name: str) -> None:
    """``qemu-img snapshot -c|-a|-d NAME PATH`` with op one of create/apply/delete."""
    flag = {"create": "-c", "apply": "-a", "delete": "-d"}[op]
    qemu_img("snapshot", flag, name, os.fspath(path))


def convert(
    path: PathLike,
    *,
    snapshot: str | None = None,
    snapshot_id: str | None = None,
    force_share: bool = False,
) -> bytes:
    """The raw guest content (``qemu-img convert -O raw``), optionally of a snapshot.

    ``snapshot`` selects by name (``-l snapshot.name=``), ``snapshot_id`` by ID;
    ``force_share`` (``-U``) reads an image another process holds open.
    """
    out = Path(os.fspath(path) + ".oracle.raw")
    args = ["convert", "-f", "qcow2", "-O", "raw"]
    if force_share:
        args.append("-U")
    if snapshot is not None:
        args += ["-l", f"snapshot.name={snapshot}"]
    if snapshot_id is not None:
        args += ["-l", f"snapshot.id={snapshot_id}"]
    try:
        qemu_img(*args, os.fspath(path), os.fspath(out))
        return out.read_bytes()
    finally:
        out.unlink(missing_ok=True)


def map_json(path: PathLike) -> list[dict[str, Any]]:
    """``qemu-img map --output=json``, parsed."""
    parsed: list[dict[str, Any]] = json.loads(
        qemu_img("map", "--output=json", os.fspath(path)).stdout
    )
    return parsed


#: qcow2 layouts the differential tests run on: (compat, cluster_size, extended_l2).
LAYOUTS = [("1.1", 65536, False), ("0.10", 4096, False), ("1.1", 512, False), ("1.1", 65536, True)]


def create_layout(
    path: PathLike, size: int, compat: str, cluster_size: int, extended_l2: bool
) -> Path:
    """:func:`create` with one of :data:`LAYOUTS`."""
    opts: dict[str, object] = {"compat": compat, "cluster_size": cluster_size}
    if extended_l2:
        opts["extended_l2"] = True
    return create(path, size, **opts)

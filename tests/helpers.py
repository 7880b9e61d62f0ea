"""Helpers shared by the test modules (kept free of fixtures; see conftest.py)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator

import pytest

ALLOW_SKIP = os.environ.get("VTPM_QCOW_ALLOW_SKIP") == "1"


def missing(what: str) -> None:
    """Fail (or, with VTPM_QCOW_ALLOW_SKIP=1, skip) because ``what`` is unavailable."""
    if ALLOW_SKIP:
        pytest.skip(f"{what} is not available (VTPM_QCOW_ALLOW_SKIP=1)")
    pytest.fail(f"{what} is not available; run tools/setup-system", pytrace=False)


def need(tool: str) -> str:
    """Path of executable ``tool``; a missing tool fails the test unless skips are allowed."""
    path = shutil.which(tool)
    if path is None:
        missing(f"required tool '{tool}'")
        raise AssertionError("unreachable")
    return path


def need_root(why: str) -> None:
    """Require root (``why`` says what for), as .ci/run has it."""
    if os.geteuid() != 0:
        missing(f"root ({why})")


def need_fuse() -> None:
    """Require a usable /dev/fuse."""
    if not os.path.exists("/dev/fuse"):
        missing("/dev/fuse")


def _holds_write_lock(path: str) -> bool:
    """True if another process holds QEMU's "write" permission lock byte on ``path``.

    Probes with F_OFD_GETLK, which takes no lock: a probing qemu-img/qemu-io could win the
    race for QEMU's bytes and make the holder give up.
    """
    from qcow2.io.lock import F_OFD_GETLK, LOCK_PERM_BASE, PERM_WRITE_BITNR

    write_byte = LOCK_PERM_BASE + PERM_WRITE_BITNR
    probe = struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, write_byte, 1, 0)
    fd = os.open(path, os.O_RDONLY)
    try:
        kind = struct.unpack("hhqqi4x", fcntl.fcntl(fd, F_OFD_GETLK, probe))[0]
    finally:
        os.close(fd)
    return bool(kind != fcntl.F_UNLCK)


@contextlib.contextmanager
def held_by_qemu_io(image: str | os.PathLike[str]) -> Iterator[subprocess.Popen[bytes]]:
    """An interactive qemu-io holding ``image`` open read-write (QEMU's locks) meanwhile."""
    proc = subprocess.Popen(
        [need("qemu-io"), "-f", "qcow2", os.fspath(image)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not _holds_write_lock(os.fspath(image)):
            assert proc.poll() is None, "qemu-io exited instead of holding the image"
            assert time.monotonic() < deadline, "qemu-io did not lock the image"
            time.sleep(0.05)
        yield proc
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

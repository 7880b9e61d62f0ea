"""Hostile images cost bounded memory and time (issue 13).

Every damaged image of :mod:`tests.qcow2.corrupt_corpus` (the iotests' corruption cases and
the :data:`~tests.qcow2.corrupt_corpus.HOSTILE` headers and tables that claim huge sizes,
the fuzzer's :data:`~tests.qcow2.corrupt_corpus.FUZZ_FINDINGS`)
goes through the ``qcow2`` command's ``info``, ``check``, ``map --output=json``, ``convert
-O raw`` and ``amend -o compat=0.10`` in a child limited to 512 MiB of address space
(RLIMIT_AS) and 20 s.  Each must exit with a code qemu-img uses (the same code as
qemu-img for the read-only commands), without a traceback or the command's "internal
error" line: a MemoryError, a kill by the limit or a timeout fails the test.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import need
from tests.qcow2.corrupt_corpus import CASES, FUZZ_FINDINGS, HOSTILE

LIMIT = 512 << 20
TIMEOUT = 20

_IMAGES = (
    [(case.name, case.build) for case in CASES]
    + [(f"hostile_{h.name}", h.build) for h in HOSTILE]
    + [(f"fuzz_{h.name}", h.build) for h in FUZZ_FINDINGS]
)


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))


def _run_limited(args: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            preexec_fn=_limit_memory,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(args)}: no exit within {TIMEOUT} s")


def _assert_clean_exit(args: list[str], result: subprocess.CompletedProcess[str]) -> None:
    what = f"{' '.join(args)} -> {result.returncode}: {result.stderr.strip()[-600:]}"
    assert result.returncode in (0, 1, 2, 3), what
    assert "Traceback" not in result.stderr, what
    assert "MemoryError" not in result.stderr, what
    assert "internal error" not in result.stderr, what
    assert len(result.stderr.strip().splitlines()) <= 3 or args[1] == "check", what


@pytest.mark.parametrize("build", [b for _, b in _IMAGES], ids=[n for n, _ in _IMAGES])
def test_bounded_on_hostile_image(tmp_path: Path, build: object) -> None:
    assert callable(build)
    qcow2_cmd = shutil.which("qcow2")
    assert qcow2_cmd, "the qcow2 command is installed with the package"
    qemu_img = need("qemu-img")
    image = build(tmp_path / "img.qcow2")
    theirs = tmp_path / "theirs.qcow2"
    shutil.copyfile(image, theirs)
    out = os.fspath(tmp_path / "out.raw")
    for command in (
        ["info", "{}"],
        ["check", "{}"],
        ["map", "--output=json", "{}"],
        ["convert", "-O", "raw", "{}", out],
    ):
        ours = [qcow2_cmd, *(os.fspath(image) if a == "{}" else a for a in command)]
        result = _run_limited(ours)
        _assert_clean_exit(ours, result)
        expected = subprocess.run(
            [qemu_img, *(os.fspath(theirs) if a == "{}" else a for a in command)],
            capture_output=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == expected.returncode, (
            f"{' '.join(ours)}: exit {result.returncode}, qemu-img {expected.returncode}: "
            f"{result.stderr.strip()} / {expected.stderr.decode().strip()}"
        )
    amend = [qcow2_cmd, "amend", "-o", "compat=0.10", os.fspath(image)]
    result = _run_limited(amend)
    _assert_clean_exit(amend, result)
    assert result.returncode in (0, 1), f"{amend}: {result.returncode}"

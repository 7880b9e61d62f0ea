"""Helpers shared by the test modules (kept free of fixtures; see conftest.py)."""

from __future__ import annotations

import os
import shutil

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


def need_fuse() -> None:
    """Require a usable /dev/fuse."""
    if not os.path.exists("/dev/fuse"):
        missing("/dev/fuse")

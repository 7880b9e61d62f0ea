"""Fixtures of the VM tests: a private runtime dir for daemon sockets, fresh image + disk."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm.qemu_fixtures import create_disk, vtpm_qcow_command
from vtpm_qcow.control import RUNTIME_DIR_ENV


@pytest.fixture(autouse=True)
def runtime_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Daemon control sockets in a short private dir (unix socket paths: 108 bytes max)."""
    path = Path(tempfile.mkdtemp(prefix="vqvm-"))
    monkeypatch.setenv(RUNTIME_DIR_ENV, str(path))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def images(tmp_path: Path) -> tuple[Path, Path]:
    """A fresh vTPM image (``vtpm-qcow create``) and a fresh qcow2 disk."""
    image = tmp_path / "vtpm.qcow2"
    vtpm_qcow_command("create", str(image))
    return image, create_disk(tmp_path / "disk.qcow2")

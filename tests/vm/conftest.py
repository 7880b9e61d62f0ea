"""Fixtures of the VM tests: a private runtime dir for daemon sockets, fresh image + disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vm.qemu_fixtures import create_disk
from tests.vtpm.mount_fixtures import runtime_dir, vtpm_qcow  # noqa: F401  (fixture)


@pytest.fixture(autouse=True)
def private_runtime_dir(runtime_dir: Path) -> Path:  # noqa: F811  (the fixture)
    """Daemon control sockets in a short private dir, for every VM test."""
    return runtime_dir


@pytest.fixture
def images(tmp_path: Path) -> tuple[Path, Path]:
    """A fresh vTPM image (``vtpm-qcow create``) and a fresh qcow2 disk."""
    image = tmp_path / "vtpm.qcow2"
    vtpm_qcow("create", str(image))
    return image, create_disk(tmp_path / "disk.qcow2")

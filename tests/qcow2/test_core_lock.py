"""Image locks interoperate with QEMU's (qemu-img info, a running qemu-io)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import qcow2
from tests.helpers import held_by_qemu_io
from tests.qcow2 import oracle

MiB = 1024 * 1024


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "img.qcow2"
    qcow2.create(str(path), MiB).close()
    return path


@pytest.fixture
def qemu_io_holder(image: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A qemu-io process holding ``image`` open read-write until the test ends."""
    with held_by_qemu_io(image) as proc:
        yield proc


def test_qemu_img_info_fails_while_we_hold_the_image_writable(image: Path) -> None:
    with qcow2.open(str(image), writable=True):
        proc = oracle.qemu_img("info", str(image), ok=(1,))
        assert b'Failed to get shared "write" lock' in proc.stderr
        assert b"Is another process using the image" in proc.stderr
        assert oracle.info(image, force_share=True)["virtual-size"] == MiB
        with pytest.raises(qcow2.ImageLockedError, match='Failed to get shared "write" lock'):
            qcow2.open(str(image))
        with qcow2.open(str(image), force_share=True) as shared:
            assert shared.read(0, 16) == bytes(16)
    assert oracle.info(image)["virtual-size"] == MiB  # released on close


def test_readers_share_and_block_qemu_writers(image: Path) -> None:
    with qcow2.open(str(image)), qcow2.open(str(image)):
        assert oracle.info(image)["virtual-size"] == MiB
        proc = oracle.qemu_img("resize", str(image), "2M", ok=(1,))
        assert b'Failed to get "write" lock' in proc.stderr
        with pytest.raises(qcow2.ImageLockedError, match='Failed to get "write" lock'):
            qcow2.open(str(image), writable=True)


@pytest.mark.usefixtures("qemu_io_holder")
def test_we_refuse_an_image_qemu_io_holds(image: Path) -> None:
    with pytest.raises(qcow2.ImageLockedError, match='Failed to get "write" lock') as caught:
        qcow2.open(str(image), writable=True)
    assert str(image) in str(caught.value)
    with pytest.raises(qcow2.ImageLockedError, match='Failed to get shared "write" lock'):
        qcow2.open(str(image))
    with qcow2.open(str(image), force_share=True) as shared:
        assert shared.virtual_size == MiB


def test_failed_lock_leaves_no_lock_behind(image: Path, tmp_path: Path) -> None:
    with qcow2.open(str(image), writable=True), pytest.raises(qcow2.ImageLockedError):
        qcow2.open(str(image), writable=True)
    # Neither the holder nor the refused opener left a lock: qemu can write now.
    oracle.qemu_io(image, "write -P 1 0 512")


@pytest.mark.usefixtures("qemu_io_holder")
def test_create_refuses_to_overwrite_an_image_in_use(image: Path) -> None:
    before = image.read_bytes()
    with pytest.raises(qcow2.ImageLockedError):
        qcow2.create(str(image), 2 * MiB)
    assert image.read_bytes() == before


def test_force_share_is_for_readers_only(image: Path) -> None:
    with pytest.raises(qcow2.UnsupportedFeatureError, match="read-only"):
        qcow2.open(str(image), writable=True, force_share=True)

"""``vtpm-qcow wait IMAGE``: scripts wait for the image's release instead of racing it."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from tests.helpers import need
from tests.qcow2 import oracle
from tests.vm.qemu_fixtures import quit_qemu, stop_process
from tests.vm.scenario import stack, state_a
from tests.vtpm.mount_fixtures import vtpm_qcow


def test_wait_returns_when_the_holder_lets_go(tmp_path: Path) -> None:
    image = oracle.create(tmp_path / "held.qcow2", 1 << 20)
    assert vtpm_qcow("wait", str(image)).returncode == 0  # nobody holds it
    holder = subprocess.Popen(
        [need("qemu-io"), "-c", "sleep 1500", str(image)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.3)  # qemu-io has opened it by now
        busy = vtpm_qcow("wait", "--timeout", "0.2", str(image), check=False)
        assert busy.returncode == 1
        assert busy.stderr.strip().endswith("holds its write lock)"), busy.stderr
        assert len(busy.stderr.strip().splitlines()) == 1
        assert holder.poll() is None, "the check must not disturb the holder"
        assert vtpm_qcow("wait", "--timeout", "20", str(image)).returncode == 0
        assert holder.poll() == 0
        oracle.snapshot(image, "create", "after")  # a writer gets the lock at once
    finally:
        stop_process(holder)


def test_wait_after_qemu_quits_lets_qemu_img_write_at_once(
    images: tuple[Path, Path], tmp_path: Path
) -> None:
    image, disk = images
    with stack(tmp_path / "run", image, disk) as s:
        state_a(s.tpm)
        busy = vtpm_qcow("wait", "--timeout", "0", str(image), check=False)
        assert busy.returncode == 1  # served: swtpm runs on it
        quit_qemu(s.qemu)
        assert vtpm_qcow("wait", "--timeout", "10", str(image)).returncode == 0
        oracle.snapshot(image, "create", "offline")
        assert [x["name"] for x in oracle.snapshot_list(image)] == ["offline"]


def test_wait_on_a_missing_image_is_one_line(tmp_path: Path) -> None:
    done = vtpm_qcow("wait", str(tmp_path / "nope.qcow2"), check=False)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1
    assert "nope.qcow2" in done.stderr and "Traceback" not in done.stderr

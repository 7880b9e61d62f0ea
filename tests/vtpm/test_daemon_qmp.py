"""``vtpm-qcow serve --qmp``: the daemon mirrors a real QEMU's HMP savevm/delvm in the image.

QEMU runs with swtpm on the served mount (``-chardev socket`` on serve's ``--ctrl``); the
watcher runs inside serve (:mod:`vtpm_qcow.vm.follow`) on QEMU's second QMP monitor.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import pytest

from tests.vm.qemu_fixtures import create_disk, hmp_over_qmp, qemu_vm
from tests.vtpm.mount_fixtures import (
    create_image,
    force_unmount,
    is_mounted,
    qemu_img_check,
    qemu_img_snapshots,
    runtime_dir,  # noqa: F401  (fixture)
    vtpm_qcow,
    wait_gone,
)
from vtpm_qcow.export.control import ControlClient, pid_path_for

pytestmark = pytest.mark.usefixtures("runtime_dir")


def wait_for(condition: object, what: str, timeout: float = 30.0) -> None:
    """Poll ``condition()`` until true; AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_serve_with_qmp_mirrors_savevm_and_delvm(tmp_path: Path) -> None:
    image = create_image(tmp_path / "vtpm.qcow2")
    disk = create_disk(tmp_path / "disk.qcow2")
    qemu_dir = tmp_path / "qemu"
    qemu_dir.mkdir()
    ctrl = tmp_path / "swtpm.sock"
    log = tmp_path / "serve.log"
    vtpm_qcow(
        "serve", str(image), "--ctrl", str(ctrl), "--qmp", str(qemu_dir / "qmp2.sock"),
        "--log", str(log), "--view", "dir",
    )  # fmt: skip
    pid = int(pid_path_for(image).read_text())
    try:
        with (
            qemu_vm(qemu_dir, str(ctrl), [disk], running=True) as qemu,
            ControlClient.for_image(image) as client,
        ):
            wait_for(lambda: "qmp watcher following" in log.read_text(), "the watcher")

            def tags() -> list[str]:
                return [s["tag"] for s in client.snapshot_list()]

            hmp_over_qmp(qemu.qmp, "savevm T1")
            wait_for(lambda: tags() == ["T1"], "the vTPM snapshot of savevm T1")
            assert qemu_img_snapshots(image) == ["T1"]
            hmp_over_qmp(qemu.qmp, "delvm T1")
            wait_for(lambda: tags() == [], "the vTPM snapshot to follow delvm T1")
        # QEMU quit: swtpm got CMD_SHUTDOWN and exited, serve follows
        assert wait_gone(pid), "serve outlived QEMU"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        wait_gone(pid)
    qemu_img_check(image)
    assert qemu_img_snapshots(image) == []


def test_serve_stops_when_qemu_is_killed(tmp_path: Path) -> None:
    """QEMU killed with -9 sends swtpm no CMD_SHUTDOWN; swtpm (``--terminate``) ends when
    QEMU's data channel closes, and serve exits with it (mount gone, image clean).  Brief
    control connections (probes) before QEMU attaches end nothing."""
    from vtpm_qcow.tpm.swtpm import CMD_GET_CAPABILITY, control_command

    image = create_image(tmp_path / "vtpm.qcow2")
    disk = create_disk(tmp_path / "disk.qcow2")
    qemu_dir = tmp_path / "qemu"
    qemu_dir.mkdir()
    ctrl = tmp_path / "swtpm.sock"
    log = tmp_path / "serve.log"
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    vtpm_qcow(
        "serve", str(image), "--ctrl", str(ctrl), "--mountpoint", str(mountpoint),
        "--log", str(log), "--view", "file",
    )  # fmt: skip
    pid = int(pid_path_for(image).read_text())
    try:
        swtpm_pid = ControlClient.for_image(image).info()["swtpm_pid"]
        for _ in range(3):
            control_command(str(ctrl), CMD_GET_CAPABILITY)
        assert not wait_gone(pid, timeout=0.5), "serve took a probe for a leaving QEMU"
        with qemu_vm(qemu_dir, str(ctrl), [disk], running=True) as qemu:
            qemu.proc.kill()
            qemu.proc.wait()
            assert wait_gone(pid), "serve outlived a QEMU killed with -9"
        assert f"swtpm {swtpm_pid} exited with 0" in log.read_text()
        assert not os.path.exists(f"/proc/{swtpm_pid}"), "swtpm outlived serve"
        assert not is_mounted(mountpoint)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        wait_gone(pid)
        if is_mounted(mountpoint):
            force_unmount(mountpoint)
    qemu_img_check(image)

"""Life cycle of the mount daemon: signals, kill -9, image locks, bad input, serve, umount.

Every process started here is stopped and reaped in ``finally`` blocks (mount_fixtures).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import held_by_qemu_io, need
from tests.vtpm.mount_fixtures import (
    NV_INDEX,
    create_image,
    force_unmount,
    is_mounted,
    mounted,
    pid_alive,
    qemu_img_check,
    qemu_img_snapshots,
    raw_content,
    raw_sections,
    runtime_dir,  # noqa: F401  (fixture)
    socket_of,
    stale_mount,
    start_mount,
    vtpm_qcow,
    wait_gone,
)
from tests.vtpm.swtpm_fixtures import running_swtpm, setup_state, tpm_client
from vtpm_qcow.export.control import RUNTIME_DIR_ENV, ControlClient, pid_path_for
from vtpm_qcow.tpm.client import SwtpmSocketTransport, Tpm
from vtpm_qcow.tpm.swtpm import CMD_SHUTDOWN, control_command, free_tcp_port_pair

pytestmark = pytest.mark.usefixtures("runtime_dir")


def assert_one_line_error(done: subprocess.CompletedProcess[str], *words: str) -> None:
    """A refusal: non-zero exit, one line on stderr naming ``words``, no traceback."""
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    for word in words:
        assert word in lines[0], lines[0]


def opens_writable(image: Path) -> bool:
    """True if qemu-io can open ``image`` read-write (takes QEMU's write lock)."""
    done = subprocess.run(
        [need("qemu-io"), "-f", "qcow2", "-c", "read 0 512", str(image)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.returncode == 0 and "lock" not in done.stderr


def test_sigterm_commits_unmounts_and_releases_the_lock(tmp_path: Path) -> None:
    image = create_image(tmp_path / "vtpm.qcow2")
    mount = start_mount(image, tmp_path / "mnt", view="file")
    try:
        assert not opens_writable(image)  # the daemon holds QEMU's write lock
        fd = os.open(mount.state_path, os.O_RDWR)
        try:
            os.pwrite(fd, b"pending!", 4096)  # buffered: no fsync yet
            assert raw_content(image)[4096:4104] == bytes(8)
            mount.stop()
        finally:
            with contextlib.suppress(OSError):  # ENOTCONN: the mount is gone
                os.close(fd)
        assert not is_mounted(mount.mountpoint)
        assert not socket_of(image).exists()
        assert not pid_path_for(image).exists()
        qemu_img_check(image)
        assert raw_content(image)[4096:4104] == b"pending!"  # flushed on the way out
        assert opens_writable(image)
    finally:
        force_unmount(mount.mountpoint)


def test_kill_9_leaves_an_image_that_opens_clean(tmp_path: Path) -> None:
    image = create_image(tmp_path / "vtpm.qcow2")
    mountpoint = tmp_path / "mnt"
    try:
        mount = start_mount(image, mountpoint, view="dir")
        setup_state(str(mountpoint))
        committed = raw_sections(image)
        os.kill(mount.pid, signal.SIGKILL)
        assert wait_gone(mount.pid)
        assert stale_mount(mountpoint)
        # a new mount on the dead one is refused with a hint
        refused = vtpm_qcow("mount", str(image), str(mountpoint), check=False)
        assert_one_line_error(refused, "fusermount3 -u")
        subprocess.run(["fusermount3", "-u", str(mountpoint)], check=True)
        assert not is_mounted(mountpoint)
        qemu_img_check(image, allow_leaks=True)  # lazily freed clusters leak, nothing worse
        assert raw_sections(image) == committed
        assert opens_writable(image)
        with mounted(image, mountpoint, view="dir"):
            assert (mountpoint / "tpm2-00.permall").read_bytes() == committed["permall"]
    finally:
        force_unmount(mountpoint)


def test_mount_of_a_locked_image_is_refused(tmp_path: Path) -> None:
    image = create_image(tmp_path / "vtpm.qcow2")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    try:
        with held_by_qemu_io(image):
            done = vtpm_qcow("mount", str(image), str(mountpoint), check=False)
            assert_one_line_error(done, str(image), "lock")
            assert not is_mounted(mountpoint)
        qemu_img_check(image)
    finally:
        force_unmount(mountpoint)


def test_bad_arguments_give_one_line(tmp_path: Path) -> None:
    image = create_image(tmp_path / "vtpm.qcow2")
    missing = vtpm_qcow("mount", str(tmp_path / "nope.qcow2"), str(tmp_path), check=False)
    assert_one_line_error(missing, "nope.qcow2")
    not_dir = tmp_path / "file"
    not_dir.write_text("x")
    done = vtpm_qcow("mount", str(image), str(not_dir), check=False)
    assert_one_line_error(done, "not a directory")
    garbage = tmp_path / "garbage.qcow2"
    garbage.write_bytes(b"not an image" * 100)
    (tmp_path / "mnt").mkdir()
    done = vtpm_qcow("mount", str(garbage), str(tmp_path / "mnt"), check=False)
    assert_one_line_error(done, "garbage.qcow2")
    assert not is_mounted(tmp_path / "mnt")
    done = vtpm_qcow("umount", str(tmp_path / "mnt"), check=False)
    assert_one_line_error(done, "not a FUSE mount point")
    # the refused mounts left the image as it was
    qemu_img_check(image)
    assert opens_writable(image)


def test_umount_command_waits_for_the_daemon(tmp_path: Path) -> None:
    image = create_image(tmp_path / "vtpm.qcow2")
    mount = start_mount(image, tmp_path / "mnt", view="dir")
    try:
        vtpm_qcow("umount", str(mount.mountpoint))
        assert not is_mounted(mount.mountpoint)
        assert wait_gone(mount.pid, 0.1)  # umount returned after the daemon exited
        assert opens_writable(image)
    finally:
        force_unmount(mount.mountpoint)


def left_behind() -> list[str]:
    """What daemons left in the runtime directory (their sockets, pid files, swtpm dirs)."""
    return sorted(os.listdir(os.environ[RUNTIME_DIR_ENV]))


@pytest.mark.parametrize("view", ["file", "dir"])
def test_serve_runs_swtpm_until_it_is_shut_down(view: str, tmp_path: Path) -> None:
    image = create_image(tmp_path / "vtpm.qcow2")
    ctrl = tmp_path / "swtpm.ctrl"
    port = free_tcp_port_pair()
    done = vtpm_qcow(
        "serve",
        str(image),
        "--ctrl",
        str(ctrl),
        "--view",
        view,
        "--swtpm-flags",
        "not-need-init,startup-clear",
        "--swtpm-option=--server",
        f"--swtpm-option=type=tcp,port={port}",
        "--log",
        str(tmp_path / "serve.log"),
    )
    assert done.returncode == 0
    pid = int(pid_path_for(image).read_text())
    try:
        with SwtpmSocketTransport(port) as transport:
            tpm = Tpm(transport)
            tpm.nv_define_space(NV_INDEX, 8)
            tpm.nv_write(NV_INDEX, b"served!!")
        assert "permall" in raw_sections(image)
        # the CLI reaches the daemon holding the image through its control socket
        vtpm_qcow("snapshot", "-c", "while-serving", str(image))
        assert qemu_img_snapshots(image) == ["while-serving"]
        # QEMU quitting = CMD_SHUTDOWN on the control socket: swtpm exits, serve follows
        assert control_command(str(ctrl), CMD_SHUTDOWN) == 0
        assert wait_gone(pid), "serve did not exit after swtpm"
        assert left_behind() == [], "serve left files behind"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        wait_gone(pid)
    qemu_img_check(image)
    mountpoint = tmp_path / "mnt"
    with (
        mounted(image, mountpoint, view=view) as mount,
        running_swtpm(mount.tpmstate, tmp_path / "swtpm") as swtpm,
        tpm_client(swtpm) as tpm,
    ):
        assert tpm.nv_read(NV_INDEX, 8) == b"served!!"


def test_serve_failure_is_one_line(tmp_path: Path) -> None:
    image = create_image(tmp_path / "vtpm.qcow2")
    done = vtpm_qcow(
        "serve",
        str(image),
        "--ctrl",
        str(tmp_path / "ctrl"),
        "--swtpm-option=--no-such-swtpm-option",
        check=False,
    )
    assert_one_line_error(done, "swtpm")
    # swtpm's own output stays for a look when swtpm failed
    kept = left_behind()
    assert len(kept) == 1 and kept[0].startswith("swtpm-"), kept
    stderr = Path(os.environ[RUNTIME_DIR_ENV], kept[0], "swtpm.stderr").read_text()
    assert "no-such-swtpm-option" in stderr
    assert "unrecognized option '--no-such-swtpm-option'" in done.stderr  # not the usage
    qemu_img_check(image)
    assert opens_writable(image)
    assert not any(is_mounted(p) for p in tmp_path.iterdir())


def test_socket_path_too_long_is_one_line_with_the_reason(tmp_path: Path) -> None:
    """A unix socket path longer than the kernel takes (107 bytes): the reason, not "None"."""
    image = create_image(tmp_path / "vtpm.qcow2")
    too_long = tmp_path / ("d" * 110)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    done = vtpm_qcow(
        "mount", str(image), str(mountpoint), "--control", str(too_long / "c.sock"), check=False
    )
    assert_one_line_error(done, "cannot listen: AF_UNIX path too long")
    assert not is_mounted(mountpoint)
    done = vtpm_qcow("serve", str(image), "--ctrl", str(too_long / "s.sock"), check=False)
    assert_one_line_error(done, "cannot create the control socket: AF_UNIX path too long")
    qemu_img_check(image)
    assert opens_writable(image)
    assert not any(is_mounted(p) for p in tmp_path.iterdir())


def test_setup_through_the_mount_then_state_survives_remount(tmp_path: Path) -> None:
    image = create_image(tmp_path / "vtpm.qcow2")
    mountpoint = tmp_path / "mnt"
    with mounted(image, mountpoint, view="file") as mount:
        setup_state(mount.setup_tpmstate)
        first = raw_sections(image)
    qemu_img_check(image)
    with mounted(image, mountpoint, view="dir"):
        # the same image, seen through the other view
        assert (mountpoint / "tpm2-00.permall").read_bytes() == first["permall"]


def test_serve_keep_serving_restarts_swtpm_and_sigterm_stops_both(tmp_path: Path) -> None:
    image = create_image(tmp_path / "vtpm.qcow2")
    ctrl = tmp_path / "swtpm.ctrl"
    vtpm_qcow("serve", str(image), "--ctrl", str(ctrl), "--keep-serving", "--view", "dir")
    pid = int(pid_path_for(image).read_text())
    try:
        with ControlClient.for_image(image) as client:
            first = client.info()["swtpm_pid"]
            assert first and pid_alive(first)
            assert control_command(str(ctrl), CMD_SHUTDOWN) == 0
            assert wait_gone(first)
            deadline = time.monotonic() + 20
            while client.info()["swtpm_pid"] in (first, None):
                assert time.monotonic() < deadline, "swtpm was not restarted"
                time.sleep(0.05)
            second = client.info()["swtpm_pid"]
        assert pid_alive(pid) and pid_alive(second)
        os.kill(pid, signal.SIGTERM)
        assert wait_gone(pid) and wait_gone(second)
        assert left_behind() == [], "serve left files behind"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_gone(pid)
    qemu_img_check(image)


def test_idle_checkpoint_makes_the_last_header_durable_once(tmp_path: Path) -> None:
    """Commits flush once and leave their header to the next flush; once idle, the
    daemon flushes it (one checkpoint per burst, none while nothing is committed)."""
    from vtpm_qcow.export.fuse import CHECKPOINT_AFTER

    image = create_image(tmp_path / "vtpm.qcow2")
    with (
        mounted(image, tmp_path / "mnt") as mount,
        ControlClient.for_image(image) as control,
        running_swtpm(mount.tpmstate, tmp_path / "swtpm") as swtpm,
        tpm_client(swtpm) as tpm,
    ):
        tpm.nv_define_space(NV_INDEX, 8)
        before = control.info()["checkpoints"]
        for _ in range(5):
            tpm.nv_write(NV_INDEX, os.urandom(8))
        deadline = time.monotonic() + CHECKPOINT_AFTER * 4 + 5
        while control.info()["checkpoints"] == before:
            assert time.monotonic() < deadline, "no checkpoint after the commits"
            time.sleep(0.2)
        after = control.info()["checkpoints"]
        time.sleep(CHECKPOINT_AFTER * 3)
        assert control.info()["checkpoints"] == after, "checkpoints without commits"

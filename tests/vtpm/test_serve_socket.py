"""``vtpm-qcow serve``'s control socket: owner, group and mode for a QEMU that runs as
another user (libvirt's ``libvirt-qemu``), and a socket that stays in place while
``--keep-serving`` restarts swtpm, so a QEMU connecting meanwhile is never refused.

Real swtpm through the real command; clients as other users run as real processes.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import signal
import socket
import stat
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import need, need_root
from tests.vtpm.mount_fixtures import (
    create_image,
    qemu_img_check,
    runtime_dir,  # noqa: F401  (fixture)
    vtpm_qcow,
    wait_gone,
)
from tests.vtpm.test_daemon import assert_one_line_error, left_behind, opens_writable
from vtpm_qcow.export.control import ControlClient, pid_path_for
from vtpm_qcow.tpm.swtpm import CMD_GET_CAPABILITY, CMD_SHUTDOWN, control_command

pytestmark = pytest.mark.usefixtures("runtime_dir")

#: the client and the refused user: nobody/nogroup exist on every Debian system
CLIENT, CLIENT_GROUP, OTHER = "nobody", "nogroup", "tss"


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user may traverse (pytest's own tmp dirs are root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="vq-sock-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def probe_as(user: str, ctrl: Path) -> str:
    """CMD_GET_CAPABILITY on ``ctrl`` from a process of ``user`` (socat): "0" for swtpm's
    success, else what went wrong."""
    entry = pwd.getpwnam(user)
    done = subprocess.run(
        [need("socat"), "-t", "2", "STDIO", f"UNIX-CONNECT:{ctrl}"],
        input=struct.pack(">I", CMD_GET_CAPABILITY),
        user=entry.pw_uid,
        group=entry.pw_gid,
        extra_groups=[],
        capture_output=True,
        timeout=60,
        check=False,
    )
    if done.returncode == 0 and len(done.stdout) >= 4:
        return str(struct.unpack(">I", done.stdout[:4])[0])
    return done.stderr.decode(errors="replace").strip() or f"exit status {done.returncode}"


def test_socket_owner_group_mode_and_no_refusal_while_swtpm_restarts(open_dir: Path) -> None:
    need_root("serve chowns its control socket")
    image = create_image(open_dir / "vtpm.qcow2")
    ctrl = open_dir / "swtpm.sock"
    vtpm_qcow(
        "serve", str(image), "--ctrl", str(ctrl), "--keep-serving", "--view", "dir",
        "--socket-owner", CLIENT, "--socket-group", CLIENT_GROUP, "--socket-mode", "0660",
        "--log", str(open_dir / "serve.log"),
    )  # fmt: skip
    pid = int(pid_path_for(image).read_text())

    def expected_socket() -> None:
        st = os.stat(ctrl)
        assert stat.S_ISSOCK(st.st_mode)
        assert (st.st_uid, st.st_gid) == (
            pwd.getpwnam(CLIENT).pw_uid,
            grp.getgrnam(CLIENT_GROUP).gr_gid,
        )
        assert stat.S_IMODE(st.st_mode) == 0o660

    try:
        expected_socket()
        assert probe_as(CLIENT, ctrl) == "0"
        assert "Permission denied" in probe_as(OTHER, ctrl)
        with ControlClient.for_image(image) as client:
            first = client.info()["swtpm_pid"]
        # a client probing all the time while swtpm is shut down and restarted
        answers: list[str] = []
        stop = threading.Event()

        def probe() -> None:
            while not stop.is_set():
                try:
                    answers.append(str(control_command(str(ctrl), CMD_GET_CAPABILITY)))
                except Exception as err:  # the refusal this test is about
                    answers.append(str(err))

        prober = threading.Thread(target=probe)
        prober.start()
        try:
            time.sleep(0.2)
            assert control_command(str(ctrl), CMD_SHUTDOWN) == 0
            assert wait_gone(first)
            with ControlClient.for_image(image) as client:
                deadline = time.monotonic() + 20
                while client.info()["swtpm_pid"] in (first, None):
                    assert time.monotonic() < deadline, "swtpm was not restarted"
                    time.sleep(0.01)
            time.sleep(0.2)
        finally:
            stop.set()
            prober.join()
        refused = [answer for answer in answers if answer != "0"]
        assert refused == [], f"{len(refused)} of {len(answers)} probes failed: {refused[:3]}"
        expected_socket()  # the same socket, still the client's
        assert probe_as(CLIENT, ctrl) == "0"
        os.kill(pid, signal.SIGTERM)
        assert wait_gone(pid)
        assert not ctrl.exists(), "serve left its control socket behind"
        assert left_behind() == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_gone(pid)
    qemu_img_check(image)


@pytest.mark.parametrize(
    ("option", "value", "words"),
    [
        ("--socket-owner", "no-such-user-here", ("no such user",)),
        ("--socket-group", "no-such-group-here", ("no such group",)),
        ("--socket-mode", "0999", ("invalid mode",)),
        ("--socket-mode", "01777", ("invalid mode",)),
    ],
)
def test_bad_socket_options_give_one_line(
    option: str, value: str, words: tuple[str, ...], tmp_path: Path
) -> None:
    image = create_image(tmp_path / "vtpm.qcow2")
    before = image.read_bytes()
    ctrl = tmp_path / "swtpm.sock"
    done = vtpm_qcow("serve", str(image), "--ctrl", str(ctrl), option, value, check=False)
    assert_one_line_error(done, *words)
    assert image.read_bytes() == before
    assert not ctrl.exists()


def test_a_non_socket_at_the_ctrl_path_is_refused(tmp_path: Path) -> None:
    image = create_image(tmp_path / "vtpm.qcow2")
    ctrl = tmp_path / "precious"
    ctrl.write_text("not a socket")
    done = vtpm_qcow("serve", str(image), "--ctrl", str(ctrl), check=False)
    assert_one_line_error(done, str(ctrl), "not a socket")
    assert ctrl.read_text() == "not a socket"
    assert opens_writable(image)
    qemu_img_check(image)


def test_a_client_queued_during_the_restart_does_not_block_the_next_swtpm(tmp_path: Path) -> None:
    """libvirt's revert starts the next QEMU at once: it may connect while no swtpm runs.
    The next swtpm accepts it first, and QEMU keeps its control connection open, so serve's
    readiness probe waits behind it; serve must still see that swtpm serves."""
    image = create_image(tmp_path / "vtpm.qcow2")
    ctrl = tmp_path / "swtpm.sock"
    vtpm_qcow("serve", str(image), "--ctrl", str(ctrl), "--keep-serving", "--view", "dir")
    pid = int(pid_path_for(image).read_text())
    try:
        with ControlClient.for_image(image) as client:
            first = client.info()["swtpm_pid"]
        request = struct.pack(">I", CMD_GET_CAPABILITY)
        with socket.socket(socket.AF_UNIX) as quitting, socket.socket(socket.AF_UNIX) as qemu:
            quitting.connect(str(ctrl))  # accepted by the first swtpm, which serves it alone
            quitting.sendall(request)
            assert len(quitting.recv(64)) >= 4
            qemu.connect(str(ctrl))  # waits in the backlog
            qemu.sendall(request)
            quitting.sendall(struct.pack(">I", CMD_SHUTDOWN))  # the first swtpm ends
            assert quitting.recv(4) == b"\0\0\0\0"
            qemu.settimeout(20)
            assert qemu.recv(4) == b"\0\0\0\0", "the next swtpm did not answer the queued client"
            with ControlClient.for_image(image) as client:
                deadline = time.monotonic() + 10
                while client.info()["swtpm_pid"] in (first, None):
                    assert time.monotonic() < deadline, "serve did not see the next swtpm ready"
                    time.sleep(0.05)
            assert os.path.exists(f"/proc/{pid}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        wait_gone(pid)
    qemu_img_check(image)

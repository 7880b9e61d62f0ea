"""Shared fixtures and helpers: real swtpm and QEMU processes that are always cleaned up.

Other test modules import these helpers directly (``from tests.vm.qemu_fixtures import
...``).  Every process started here is killed in a ``finally`` block, so a failing test never
leaves swtpm or QEMU behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.helpers import need, need_fuse
from vtpm_qcow.tpm.swtpm import free_tcp_port_pair

#: How long a started process may take to open its sockets.
STARTUP_TIMEOUT = 20.0


def wait_for_path(
    path: Path, proc: subprocess.Popen[bytes], what: str, log: Path | None = None
) -> None:
    """Wait until ``path`` exists; fail early (with ``log``'s tail) if ``proc`` exits."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not path.exists():
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise RuntimeError(
                f"{what} exited with {proc.returncode} before creating {path}: {tail}"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not create {path} within {STARTUP_TIMEOUT}s")
        time.sleep(0.02)


def _wait_connectable(
    family: socket.AddressFamily,
    address: str | tuple[str, int],
    proc: subprocess.Popen[bytes],
    what: str,
) -> None:
    """Wait until ``address`` accepts connections; fail if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        with socket.socket(family) as probe:
            if probe.connect_ex(address) == 0:
                return
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} does not accept connections on {address}")
        time.sleep(0.02)


def wait_for_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    """Wait until 127.0.0.1:``port`` accepts connections."""
    _wait_connectable(socket.AF_INET, ("127.0.0.1", port), proc, what)


def wait_for_listener(path: Path, proc: subprocess.Popen[bytes], what: str) -> None:
    """Wait until the unix socket ``path`` accepts connections (it exists before listen())."""
    _wait_connectable(socket.AF_UNIX, str(path), proc, what)


def stop_process(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """Terminate ``proc`` (SIGTERM, then SIGKILL after ``grace`` seconds) and reap it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class SwtpmProcess:
    """A running ``swtpm socket``: its process and how to reach it."""

    proc: subprocess.Popen[bytes]
    #: TCP port or unix socket path of the data channel (None when only --ctrl is given).
    server: int | str | None
    #: TCP port or unix socket path of the control channel.
    ctrl: int | str
    log: Path


@contextlib.contextmanager
def swtpm_process(
    tpmstate: str,
    workdir: Path,
    *,
    tcp: bool = False,
    data_channel: bool = True,
    flags: str | None = "not-need-init",
) -> Iterator[SwtpmProcess]:
    """Run ``swtpm socket --tpm2`` on ``tpmstate`` (``dir=...`` or ``backend-uri=...``).

    ``tcp``: data channel on port N and control on N+1 (the layout tpm2-tools' swtpm TCTI
    expects); otherwise unix sockets in ``workdir``.  ``data_channel=False`` gives only a
    control socket (what QEMU's ``-tpmdev emulator`` connects to).  Killed on exit.
    """
    for attempt in range(3):  # a TCP port pair may be taken between probing and binding
        stack = contextlib.ExitStack()
        try:
            process = stack.enter_context(
                _swtpm_once(tpmstate, workdir, tcp=tcp, data_channel=data_channel, flags=flags)
            )
        except SwtpmStartError:
            stack.close()
            if attempt == 2 or not tcp:
                raise
            continue
        with stack:
            yield process
        return


class SwtpmStartError(RuntimeError):
    """swtpm exited before opening its sockets."""


@contextlib.contextmanager
def _swtpm_once(
    tpmstate: str, workdir: Path, *, tcp: bool, data_channel: bool, flags: str | None
) -> Iterator[SwtpmProcess]:
    swtpm = need("swtpm")
    log = workdir / "swtpm.log"
    cmd = [swtpm, "socket", "--tpm2", "--tpmstate", tpmstate, "--log", f"file={log},level=1"]
    server: int | str | None
    ctrl: int | str
    if tcp:
        port = free_tcp_port_pair()
        server, ctrl = port, port + 1
        cmd += ["--server", f"type=tcp,port={port}", "--ctrl", f"type=tcp,port={port + 1}"]
    else:
        ctrl = str(workdir / "swtpm-ctrl.sock")
        cmd += ["--ctrl", f"type=unixio,path={ctrl}"]
        server = None
        if data_channel:
            server = str(workdir / "swtpm-data.sock")
            cmd += ["--server", f"type=unixio,path={server}"]
    if flags:
        cmd += ["--flags", flags]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    try:
        try:
            if isinstance(ctrl, int):
                wait_for_port(ctrl, proc, "swtpm")
            else:
                wait_for_path(Path(ctrl), proc, "swtpm", log)
                wait_for_listener(Path(ctrl), proc, "swtpm")
            if isinstance(server, str):
                wait_for_path(Path(server), proc, "swtpm")
                wait_for_listener(Path(server), proc, "swtpm")
        except RuntimeError as err:
            raise SwtpmStartError(str(err)) from err
        yield SwtpmProcess(proc, server, ctrl, log)
    finally:
        stop_process(proc)


def swtpm_tcti(process: SwtpmProcess) -> str:
    """The tpm2-tools ``-T`` argument for a TCP ``swtpm_process``."""
    assert isinstance(process.server, int)
    return f"swtpm:host=127.0.0.1,port={process.server}"


def run_tool(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command, capture text output, fail with its stderr if it exits non-zero."""
    done = subprocess.run(
        args, capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})}
    )
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
    return done


@dataclass
class QemuProcess:
    """A running ``qemu-system-x86_64`` with a TPM, its monitors and its disks."""

    proc: subprocess.Popen[bytes]
    qmp: Path
    #: A second QMP monitor (for the passive watcher beside an orchestrating client).
    qmp2: Path
    qtest: Path
    disks: list[Path]
    log: Path


def halt_firmware(workdir: Path) -> Path:
    """A 64 KiB firmware of HLT instructions: the CPU stops at the reset vector.

    SeaBIOS would send its own TPM commands (Startup, PCR measurements) while a test drives
    the TPM through qtest; with interrupts off after reset, HLT halts the vCPU for good.
    """
    path = workdir / "halt.bin"
    path.write_bytes(b"\xf4" * 65536)
    return path


def create_disk(path: Path, size: str = "16M") -> Path:
    """A fresh qcow2 disk made by qemu-img."""
    run_tool(need("qemu-img"), "create", "-q", "-f", "qcow2", str(path), size)
    return path


@contextlib.contextmanager
def qemu_vm(
    workdir: Path,
    swtpm_ctrl: str,
    disks: list[Path],
    *,
    extra: list[str] | None = None,
    running: bool = False,
) -> Iterator[QemuProcess]:
    """QEMU (q35, tcg, stopped with -S) with a tpm-tis on ``swtpm_ctrl`` and ``disks``.

    Disk ``i`` gets node name ``disk{i}``.  Two QMP monitors and a qtest socket live in
    ``workdir``.  The firmware is :func:`halt_firmware`, so a running VM never touches the
    TPM behind the test's back.  With ``running=True`` the VM is continued (``cont``) before
    yielding.  QEMU is killed on exit.
    """
    qemu = need("qemu-system-x86_64")
    bios = halt_firmware(workdir)
    qmp, qmp2, qtest = workdir / "qmp.sock", workdir / "qmp2.sock", workdir / "qtest.sock"
    log = workdir / "qemu.log"
    cmd = [
        qemu, "-machine", "q35", "-accel", "tcg", "-S", "-display", "none", "-nodefaults",
        "-m", "64", "-bios", str(bios),
        "-chardev", f"socket,id=chrtpm,path={swtpm_ctrl}",
        "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
        "-device", "tpm-tis,tpmdev=tpm0",
        "-qmp", f"unix:{qmp},server=on,wait=off",
        "-qmp", f"unix:{qmp2},server=on,wait=off",
        "-qtest", f"unix:{qtest},server=on,wait=off", "-qtest-log", "/dev/null",
    ]  # fmt: skip
    for i, disk in enumerate(disks):
        cmd += ["-drive", f"if=none,id=drive{i},file={disk},format=qcow2,node-name=disk{i}"]
    cmd += extra or []
    with log.open("wb") as log_file:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file)
    try:
        for path in (qmp, qmp2, qtest):
            wait_for_path(path, proc, "qemu", log)
        # A socket file exists between bind() and listen(); a QMP answer means QEMU reached
        # its main loop, long after every chardev listens.
        hmp_over_qmp(qmp, "cont" if running else "info status")
        vm = QemuProcess(proc, qmp, qmp2, qtest, disks, log)
        yield vm
    finally:
        stop_process(proc)


def hmp_over_qmp(qmp: Path, command: str) -> str:
    """Run one HMP command over a QMP socket with the synchronous legacy client."""
    from qemu.qmp.legacy import QEMUMonitorProtocol

    monitor = QEMUMonitorProtocol(str(qmp))
    monitor.connect()
    try:
        reply = monitor.cmd_obj(
            {"execute": "human-monitor-command", "arguments": {"command-line": command}}
        )
    finally:
        monitor.close()
    return str(reply.get("return", reply))


@dataclass
class ServedStore:
    """A running ``vtpm-qcow serve --foreground``: mounted vTPM image + swtpm for QEMU."""

    proc: subprocess.Popen[bytes]
    image: Path
    #: swtpm's control socket (QEMU's ``-chardev socket,path=...``).
    swtpm_ctrl: Path
    mountpoint: Path
    log: Path


@contextlib.contextmanager
def served_store(
    image: Path, workdir: Path, *, view: str = "file", extra: list[str] | None = None
) -> Iterator[ServedStore]:
    """``vtpm-qcow serve IMAGE`` in the foreground (``extra``: more options, e.g. a
    secret); killed and unmounted on exit.

    The daemon's control socket lands in ``$VTPM_QCOW_RUNTIME_DIR`` (set it to a short
    directory: unix socket paths are limited to 108 bytes).
    """
    need_fuse()
    swtpm_ctrl = workdir / "swtpm.sock"
    mountpoint = workdir / "mnt"
    mountpoint.mkdir(exist_ok=True)
    log = workdir / "serve.log"
    cmd = [
        need("vtpm-qcow"), "serve", str(image), "--ctrl", str(swtpm_ctrl),
        "--mountpoint", str(mountpoint), "--view", view, "--foreground", *(extra or []),
    ]  # fmt: skip
    with log.open("ab") as log_file:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file)
    try:
        wait_for_path(swtpm_ctrl, proc, "vtpm-qcow serve", log)
        wait_for_listener(swtpm_ctrl, proc, "swtpm (vtpm-qcow serve)")
        yield ServedStore(proc, image, swtpm_ctrl, mountpoint, log)
    finally:
        stop_process(proc, grace=15)
        if os.path.ismount(mountpoint) or _stale(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)


def _stale(path: Path) -> bool:
    try:
        os.stat(path)
    except OSError:
        return True
    return False


def qmp_query(qmp: Path, command: str) -> Any:
    """The ``return`` of one argument-less QMP command (synchronous legacy client)."""
    from qemu.qmp.legacy import QEMUMonitorProtocol

    monitor = QEMUMonitorProtocol(str(qmp))
    monitor.connect()
    try:
        return monitor.cmd_obj({"execute": command})["return"]
    finally:
        monitor.close()


def qmp_job(qmp: Path, command: str, arguments: dict[str, Any], timeout: float = 60) -> Any:
    """Run a ``snapshot-*`` job like any other QMP client would; its error (None if none)."""
    from qemu.qmp.legacy import QEMUMonitorProtocol

    job_id = f"test-{command}-{time.monotonic_ns()}"
    monitor = QEMUMonitorProtocol(str(qmp))
    monitor.connect()
    try:
        reply = monitor.cmd_obj({"execute": command, "arguments": {"job-id": job_id, **arguments}})
        assert "return" in reply, reply
        deadline = time.monotonic() + timeout
        while True:
            jobs = {j["id"]: j for j in monitor.cmd_obj({"execute": "query-jobs"})["return"]}
            if jobs[job_id]["status"] == "concluded":
                break
            assert time.monotonic() < deadline, f"{command} job did not conclude"
            time.sleep(0.02)
        monitor.cmd_obj({"execute": "job-dismiss", "arguments": {"id": job_id}})
        return jobs[job_id].get("error")
    finally:
        monitor.close()


def quit_qemu(qemu: QemuProcess) -> None:
    """Ask QEMU to quit over QMP (it may hang up before answering) and wait for it to exit."""
    from qemu.qmp.legacy import QEMUMonitorProtocol

    monitor = QEMUMonitorProtocol(str(qemu.qmp))
    monitor.connect()
    # QEMU may close the monitor on its way out before or after answering.
    with contextlib.suppress(EOFError, OSError):
        monitor.cmd_obj({"execute": "quit"})
    with contextlib.suppress(EOFError, OSError):
        monitor.close()
    qemu.proc.wait(60)

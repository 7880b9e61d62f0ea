"""A real Linux guest with a TPM: the guest's files, its serial command loop, its VM's lifetime.

The guest (``tools/guest/build``: Debian's cloud kernel, busybox, tpm2-tools) runs one
command per line read from its serial port and answers with the output and an end marker
carrying the exit code.  A :class:`Lab` holds one VM's files (a vTPM image served by
``vtpm-qcow serve --qmp``, a qcow2 disk for the snapshots) and boots QEMU on them:

* q35 under TCG (this machine's KVM cannot run a normal kernel), ``-kernel``/``-initrd``;
* the serial port on a unix socket (:class:`Guest` talks to it);
* ``-chardev socket`` to the swtpm of ``vtpm-qcow serve IMAGE --ctrl SOCK --foreground``;
* two QMP monitors: ``qmp`` for the test (and ``vtpm-qcow vm``), ``qmp_watch`` for the
  watcher that ``serve --qmp`` runs.

Every process started here (serve with its swtpm, QEMU) runs in a process group of its own
and is stopped in a ``finally`` block, and the FUSE mount is unmounted, also on failure.
vtpm-qcow is driven through its command line only.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers import missing, need, need_fuse
from tests.vm.qemu_fixtures import create_disk, wait_for_listener, wait_for_path

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "tools" / "guest" / "build"
READY = b"@@VQ-READY@@"
END = b"@@VQ-END"
#: How long the guest may take from ``cont`` to its command loop (TCG boot: about 5 s).
BOOT_TIMEOUT = 90.0
#: The runtime directory variable of vtpm-qcow (daemon control sockets and pid files).
RUNTIME_DIR_ENV = "VTPM_QCOW_RUNTIME_DIR"


class GuestError(AssertionError):
    """The guest did not answer as expected (its serial output so far is in the message)."""


@dataclass(frozen=True)
class GuestFiles:
    """The kernel and initramfs built by ``tools/guest/build``, and what went into them."""

    vmlinuz: Path
    initramfs: Path
    manifest: dict[str, object] = field(repr=False)


def build_guest() -> GuestFiles:
    """Build (or take from the cache) the guest; fails the test if it cannot be built.

    With ``VTPM_QCOW_ALLOW_SKIP=1`` a failed build skips instead.
    """
    try:
        done = subprocess.run(
            [sys.executable, str(BUILD), "--json", "--quiet"],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
    except subprocess.TimeoutExpired:
        missing("the guest kernel and initramfs (tools/guest/build timed out)")
        raise
    if done.returncode != 0:
        reason = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        missing(f"the guest kernel and initramfs (tools/guest/build: {reason[0]})")
    manifest = json.loads(done.stdout)
    files = GuestFiles(Path(manifest["vmlinuz"]), Path(manifest["initramfs"]), manifest)
    for path in (files.vmlinuz, files.initramfs):
        if not path.is_file() or path.stat().st_size == 0:
            missing(f"the guest file {path} (tools/guest/build reported it)")
    return files


# Section: the serial command loop


class Guest:
    """The guest's command loop on a serial port (a QEMU unix socket chardev)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.buffer = b""
        self.prefix = secrets.token_hex(3)
        self.count = 0

    def close(self) -> None:
        """Hang up the serial socket."""
        self.sock.close()

    def _read_until(self, marker: bytes, deadline: float) -> bytes:
        """Everything up to and including ``marker``'s line; GuestError after ``deadline``."""
        while True:
            at = self.buffer.find(marker)
            if at >= 0:
                end = self.buffer.find(b"\n", at)
                if end >= 0:
                    text, self.buffer = self.buffer[: end + 1], self.buffer[end + 1 :]
                    return text
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                tail = self.buffer[-2000:].decode(errors="replace")
                raise GuestError(f"no {marker.decode()} from the guest in time; it said: {tail}")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                tail = self.buffer[-2000:].decode(errors="replace")
                raise GuestError(f"the guest's serial port closed; it said: {tail}")
            self.buffer += chunk

    def wait_ready(self, timeout: float = BOOT_TIMEOUT) -> str:
        """Wait for the command loop's ready line; the boot messages before it."""
        text = self._read_until(READY, time.monotonic() + timeout)
        return text.decode(errors="replace")

    def run(self, command: str, timeout: float = 60.0) -> tuple[int, str]:
        """Run one shell command line in the guest: (exit code, stdout + stderr)."""
        if "\n" in command:
            raise ValueError("one command line at a time")
        self.count += 1
        ident = f"{self.prefix}-{self.count}"
        self.sock.sendall(f"{ident} {command}\n".encode())
        marker = f"{END.decode()} {ident} ".encode()
        text = self._read_until(marker, time.monotonic() + timeout)
        body, _, trailer = text.rpartition(marker)
        code = int(trailer.decode().strip().removesuffix("@@"))
        return code, body.decode(errors="replace").removesuffix("\n")

    def ok(self, command: str, timeout: float = 60.0) -> str:
        """Run ``command``; its output, or GuestError if it exits non-zero."""
        code, output = self.run(command, timeout)
        if code != 0:
            raise GuestError(f"guest: `{command}` exited {code}: {output}")
        return output


# Section: processes


def stop_group(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """Stop ``proc`` (SIGTERM, SIGKILL after ``grace`` seconds), then SIGKILL what is left of
    the process group it leads (it was started with a session of its own: serve's swtpm)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def is_mounted(path: Path) -> bool:
    """True if something (even a dead FUSE daemon) is mounted on ``path``."""
    target = os.path.realpath(path)
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == target for line in mounts)


@dataclass(repr=False)
class Lab:
    """One VM's files and sockets; boots the guest on them (see the module docstring)."""

    files: GuestFiles
    workdir: Path
    #: Short directory for unix sockets (paths are limited to 108 bytes) and daemon files.
    run_dir: Path
    image: Path = field(init=False)
    disk: Path = field(init=False)

    def __post_init__(self) -> None:
        self.image = self.workdir / "vtpm.qcow2"
        self.disk = self.workdir / "disk.qcow2"
        self.qmp = self.run_dir / "qmp.sock"
        self.qmp_watch = self.run_dir / "qmp-watch.sock"
        self.serial = self.run_dir / "serial.sock"
        self.swtpm_ctrl = self.run_dir / "swtpm.sock"
        self.mountpoint = self.run_dir / "mnt"
        self.boots = 0

    @classmethod
    @contextlib.contextmanager
    def create(cls, files: GuestFiles, workdir: Path) -> Iterator[Lab]:
        """A fresh vTPM image (``vtpm-qcow create``) and disk; the run directory removed after."""
        need_fuse()
        run_dir = Path(tempfile.mkdtemp(prefix="vqg-"))
        try:
            lab = cls(files, workdir, run_dir)
            lab.vtpm_qcow("create", str(lab.image))
            create_disk(lab.disk)
            yield lab
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)

    @property
    def env(self) -> dict[str, str]:
        """The environment of every vtpm-qcow command: this lab's private runtime dir."""
        return {**os.environ, RUNTIME_DIR_ENV: str(self.run_dir)}

    def vtpm_qcow(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``vtpm-qcow ARGS``; AssertionError with its output if it fails and ``check``."""
        done = subprocess.run(
            [need("vtpm-qcow"), *args],
            capture_output=True,
            text=True,
            timeout=120,
            env=self.env,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"vtpm-qcow {' '.join(args)} exited {done.returncode}: "
                f"{done.stdout.strip()} {done.stderr.strip()}"
            )
        return done

    def vm(self, action: str, *args: str) -> str:
        """``vtpm-qcow vm ACTION --qmp QMP --store IMAGE ARGS``; its stdout."""
        cmd = ["vm", action, "--qmp", str(self.qmp), "--store", str(self.image), *args]
        return self.vtpm_qcow(*cmd).stdout

    @contextlib.contextmanager
    def serve(self) -> Iterator[subprocess.Popen[bytes]]:
        """``vtpm-qcow serve IMAGE --ctrl ... --qmp QMP_WATCH --foreground``; stopped after."""
        self.mountpoint.mkdir(exist_ok=True)
        log = self.workdir / f"serve-{self.boots}.log"
        cmd = [
            need("vtpm-qcow"), "serve", str(self.image), "--ctrl", str(self.swtpm_ctrl),
            "--mountpoint", str(self.mountpoint), "--qmp", str(self.qmp_watch), "--foreground",
        ]  # fmt: skip
        with log.open("ab") as log_file:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                env=self.env,
                start_new_session=True,
            )
        try:
            wait_for_path(self.swtpm_ctrl, proc, "vtpm-qcow serve", log)
            wait_for_listener(self.swtpm_ctrl, proc, "swtpm (vtpm-qcow serve)")
            yield proc
        finally:
            stop_group(proc, grace=15)
            if is_mounted(self.mountpoint):
                subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], check=False)
            with contextlib.suppress(FileNotFoundError):
                self.swtpm_ctrl.unlink()

    def qemu_command(self, tpm_device: str) -> list[str]:
        """QEMU's command line for this lab (stopped with -S until the serial is attached)."""
        return [
            need("qemu-system-x86_64"),
            "-machine", "q35", "-accel", "tcg", "-m", "256", "-S",
            "-display", "none", "-nodefaults", "-no-user-config",
            "-kernel", str(self.files.vmlinuz), "-initrd", str(self.files.initramfs),
            "-append", "console=ttyS0 quiet",
            "-chardev", f"socket,id=serial0,path={self.serial},server=on,wait=off",
            "-serial", "chardev:serial0",
            "-chardev", f"socket,id=chrtpm,path={self.swtpm_ctrl}",
            "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
            "-device", f"{tpm_device},tpmdev=tpm0",
            "-drive", f"if=none,id=drive0,file={self.disk},format=qcow2,node-name=disk0",
            "-qmp", f"unix:{self.qmp},server=on,wait=off",
            "-qmp", f"unix:{self.qmp_watch},server=on,wait=off",
        ]  # fmt: skip

    @contextlib.contextmanager
    def qemu(self, tpm_device: str) -> Iterator[subprocess.Popen[bytes]]:
        """QEMU on this lab's files, stopped (-S); killed after."""
        log = self.workdir / f"qemu-{self.boots}.log"
        for path in (self.qmp, self.qmp_watch, self.serial):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        with log.open("wb") as log_file:
            proc = subprocess.Popen(
                self.qemu_command(tpm_device),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,
            )
        try:
            for path in (self.qmp, self.qmp_watch, self.serial):
                wait_for_path(path, proc, "qemu", log)
                wait_for_listener(path, proc, "qemu")
            yield proc
        finally:
            stop_group(proc)

    @contextlib.contextmanager
    def boot(self, tpm_device: str = "tpm-tis") -> Iterator[RunningVm]:
        """Serve the vTPM image, start QEMU, boot the guest to its command loop."""
        self.boots += 1
        with self.serve() as serve, self.qemu(tpm_device) as qemu:
            guest = Guest(self.serial)
            try:
                qmp_command(self.qmp, "cont")
                guest.wait_ready()
                yield RunningVm(self, serve, qemu, guest)
            finally:
                guest.close()


@dataclass(repr=False)
class RunningVm:
    """A booted guest: its lab, serve and QEMU processes and its command loop."""

    lab: Lab
    serve: subprocess.Popen[bytes]
    qemu: subprocess.Popen[bytes]
    guest: Guest

    def quit(self, timeout: float = 30.0) -> None:
        """Quit QEMU over QMP and wait until serve has released the image (swtpm exits with
        QEMU, serve with swtpm)."""
        with contextlib.suppress(EOFError, OSError):
            qmp_command(self.lab.qmp, "quit")
        self.qemu.wait(timeout)
        self.serve.wait(timeout)


def qmp_command(qmp: Path, command: str, arguments: dict[str, object] | None = None) -> object:
    """One QMP command with the synchronous client; its ``return`` (AssertionError on error)."""
    from qemu.qmp.legacy import QEMUMonitorProtocol

    monitor = QEMUMonitorProtocol(str(qmp))
    monitor.connect()
    try:
        message: dict[str, object] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        reply = monitor.cmd_obj(message)
    finally:
        with contextlib.suppress(EOFError, OSError):
            monitor.close()
    if "error" in reply:
        raise AssertionError(f"QMP {command}: {reply['error']}")
    return reply.get("return")


def hmp(qmp: Path, command_line: str) -> str:
    """One HMP command through QMP; its text (AssertionError when HMP says "Error:")."""
    text = str(qmp_command(qmp, "human-monitor-command", {"command-line": command_line}))
    if text.lstrip().startswith("Error"):
        raise AssertionError(f"HMP {command_line}: {text.strip()}")
    return text

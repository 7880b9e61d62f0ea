"""Locating and running swtpm / swtpm_setup, and shutting swtpm down cleanly.

* :func:`find_tool` finds ``swtpm``/``swtpm_setup`` on PATH.
* :func:`run_setup` manufactures a TPM (``swtpm_setup``) into a dir or a linear file.
* :class:`Swtpm` runs ``swtpm socket`` with a control channel (unix socket or TCP port),
  an optional data channel, a pid file and a log.  :meth:`Swtpm.start` returns once swtpm
  answers a control command (polling, failing at once if swtpm exits);
  :meth:`Swtpm.stop` sends CMD_SHUTDOWN, then SIGTERM, then SIGKILL, and always reaps.

Errors are :class:`~vtpm_qcow.errors.SwtpmError` with one line naming the tool and, when swtpm
said why it failed, the last line of its output or log.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final

from ..errors import SwtpmError
from . import localca

#: swtpm control channel commands (swtpm's ``tpm_ioctl.h``).
CMD_GET_CAPABILITY: Final = 0x01
CMD_INIT: Final = 0x02
CMD_SHUTDOWN: Final = 0x03
CMD_STORE_VOLATILE: Final = 0x0A
#: CMD_INIT flag PTM_INIT_FLAG_DELETE_VOLATILE.
INIT_FLAG_DELETE_VOLATILE: Final = 1

STARTUP_TIMEOUT: Final = 20.0
SETUP_TIMEOUT: Final = 300.0
#: swtpm's state cipher as libvirt has swtpm use it (``<encryption secret=...>``): the key is
#: derived (PBKDF2) from the passphrase swtpm reads from a descriptor.
STATE_CIPHER: Final = "aes-256-cbc"


def _key_pipe(key: bytes) -> int:
    """The read end of a pipe holding ``key`` and then EOF: what swtpm's ``pwdfd=`` and
    swtpm_setup's ``--pwdfile-fd`` read.  Never a file, an argument or the environment."""
    read_end, write_end = os.pipe()
    try:
        view = memoryview(key)
        while view:  # a pipe holds 64 KiB: a passphrase fits before anyone reads
            view = view[os.write(write_end, view) :]
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
    return read_end


def state_key_options(key_fds: Sequence[int]) -> list[str]:
    """swtpm's ``--key`` (the state) and ``--migration-key`` (the state QEMU migrates) on
    the passphrase pipes ``key_fds``, as libvirt passes them."""
    state, migration = key_fds
    return [
        "--key", f"pwdfd={state},mode={STATE_CIPHER}",
        "--migration-key", f"pwdfd={migration},mode={STATE_CIPHER}",
    ]  # fmt: skip


def find_tool(name: str) -> str:
    """Absolute path of ``swtpm`` or ``swtpm_setup``; SwtpmError if it is not on PATH."""
    path = shutil.which(name)
    if path is None:
        raise SwtpmError("not found on PATH (install swtpm / swtpm-tools)", path=name)
    return path


def _last_line(*texts: str) -> str:
    """The last non-empty line of the given outputs (swtpm's reason for failing); when swtpm
    printed its usage after the reason (a bad option), the line before the usage."""
    for text in reversed(texts):
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        usage = next((i for i, line in enumerate(lines) if line.startswith("Usage:")), None)
        if usage:
            return lines[usage - 1]
        if lines:
            return lines[-1]
    return ""


def run_setup(
    tpmstate: str,
    *,
    tpm2: bool = True,
    options: Sequence[str] = (),
    overwrite: bool = True,
    timeout: float = SETUP_TIMEOUT,
    ca_dir: str | None = None,
    state_key: bytes | None = None,
) -> str:
    """Run ``swtpm_setup`` on ``tpmstate`` (a directory or ``file://PATH``), return its output.

    ``options`` pass through (``--create-ek-cert``, ``--create-platform-cert``, ...).  The
    certificates come from the system's local CA, signed as the CA's owner, or from a CA in
    ``ca_dir`` (:mod:`vtpm_qcow.tpm.localca`): the system's CA is never left with files of
    another owner.  ``state_key``: swtpm encrypts the state with a key derived from this
    passphrase (``--pwdfile-fd``, ``--cipher aes-256-cbc``), as libvirt has it do.
    """
    setup = find_tool("swtpm_setup")
    with tempfile.TemporaryDirectory(prefix="vtpm-qcow-swtpm-setup-") as workdir:
        config = localca.setup_options(options, Path(workdir), ca_dir)
        cmd = [setup, "--tpmstate", tpmstate, *(["--tpm2"] if tpm2 else []), *config, *options]
        if overwrite and "--overwrite" not in options and "--not-overwrite" not in options:
            cmd.append("--overwrite")
        if state_key is None:
            return _run_setup(setup, cmd, tpmstate, timeout)
        key_fd = _key_pipe(state_key)
        try:
            cmd += ["--pwdfile-fd", str(key_fd), "--cipher", STATE_CIPHER]
            return _run_setup(setup, cmd, tpmstate, timeout, pass_fds=(key_fd,))
        finally:
            os.close(key_fd)


def _run_setup(
    setup: str, cmd: list[str], tpmstate: str, timeout: float, pass_fds: Sequence[int] = ()
) -> str:
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, check=False, pass_fds=pass_fds
        )
    except subprocess.TimeoutExpired as err:
        raise SwtpmError(f"swtpm_setup on {tpmstate}: no result after {timeout:g}s") from err
    except OSError as err:
        raise SwtpmError(
            f"swtpm_setup: cannot run {setup}: {err.strerror}", errno=err.errno
        ) from err
    if done.returncode != 0:
        reason = _last_line(done.stdout, done.stderr) or f"exit status {done.returncode}"
        raise SwtpmError(f"swtpm_setup on {tpmstate} failed: {reason}")
    return done.stdout + done.stderr


def socket_address(spec: str | int | tuple[str, int]) -> tuple[int, str | tuple[str, int]]:
    """(family, address) for a TCP port on 127.0.0.1, a (host, port) pair, or a unix socket
    path: how swtpm's ``--ctrl``/``--server`` channels are named throughout."""
    if isinstance(spec, int):
        return socket.AF_INET, ("127.0.0.1", spec)
    if isinstance(spec, tuple):
        return socket.AF_INET, spec
    return socket.AF_UNIX, spec


def connect_channel(spec: str | int | tuple[str, int], timeout: float) -> socket.socket:
    """A connected stream socket to ``spec`` (OSError if refused)."""
    family, address = socket_address(spec)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(address)
    except OSError:
        sock.close()
        raise
    return sock


def control_command(
    ctrl: str | int | tuple[str, int], command: int, payload: bytes = b"", timeout: float = 10.0
) -> int:
    """Send one control channel command, return swtpm's result code (0 = success); the one
    control channel client (the TPM transports use it too).  SwtpmError if the channel
    fails or closes without a reply."""
    try:
        with connect_channel(ctrl, timeout) as sock:
            sock.sendall(struct.pack(">I", command) + payload)
            reply = b""
            while len(reply) < 4:
                chunk = sock.recv(4 - len(reply))
                if not chunk:
                    break
                reply += chunk
    except OSError as err:
        raise SwtpmError(
            f"swtpm control channel {ctrl}: {err.strerror or err}", errno=err.errno
        ) from err
    if len(reply) < 4:
        raise SwtpmError(f"swtpm control channel {ctrl}: connection closed without a reply")
    return int(struct.unpack(">I", reply)[0])


@dataclass
class Swtpm:
    """A running ``swtpm socket`` process.  Use :meth:`start`; stop with :meth:`stop`."""

    proc: subprocess.Popen[bytes]
    #: Control channel: unix socket path or TCP port on 127.0.0.1.
    ctrl: str | int
    #: Data channel: unix socket path, TCP port, or None (QEMU talks over ctrl only).
    server: str | int | None
    pid_file: Path
    log: Path
    tpmstate: str
    #: How :meth:`stop` ended swtpm: "CMD_SHUTDOWN", "SIGTERM", "SIGKILL" or "exited".
    stopped_by: str | None = None

    @classmethod
    def start(
        cls,
        tpmstate: str,
        workdir: Path,
        *,
        ctrl: str | int | None = None,
        ctrl_fd: int | None = None,
        server: str | int | None = None,
        tpm2: bool = True,
        flags: Sequence[str] = ("not-need-init", "startup-clear"),
        options: Sequence[str] = (),
        timeout: float = STARTUP_TIMEOUT,
        state_key: bytes | None = None,
    ) -> Swtpm:
        """Start swtpm on ``tpmstate`` (``dir=DIR`` or ``backend-uri=file://PATH``).

        ``ctrl`` defaults to a unix socket in ``workdir``; ``server`` (data channel) is
        optional.  With ``ctrl_fd``, a listening unix socket bound at ``ctrl`` by the
        caller, swtpm serves that socket (``--ctrl type=unixio,fd=N``) and the caller keeps
        its path, owner and mode.  ``state_key``: the passphrase of swtpm's own state
        encryption (:func:`state_key_options`), given through pipes.  Returns once swtpm
        answers on the control channel.
        """
        binary = find_tool("swtpm")
        workdir.mkdir(parents=True, exist_ok=True)
        ctrl = str(workdir / "swtpm-ctrl.sock") if ctrl is None else ctrl
        pid_file, log = workdir / "swtpm.pid", workdir / "swtpm.log"
        ours = (ctrl, server) if ctrl_fd is None else (server,)
        for stale in (pid_file, *(Path(p) for p in ours if isinstance(p, str))):
            stale.unlink(missing_ok=True)
        ctrl_spec = _channel_spec(ctrl) if ctrl_fd is None else f"type=unixio,fd={ctrl_fd}"
        cmd = [binary, "socket", *(["--tpm2"] if tpm2 else []), "--tpmstate", tpmstate]
        cmd += ["--ctrl", ctrl_spec, "--pid", f"file={pid_file}"]
        cmd += ["--log", f"file={log},level=1"]
        if server is not None:
            cmd += ["--server", _channel_spec(server)]
        if flags:
            cmd += ["--flags", ",".join(flags)]
        cmd += list(options)
        key_fds = [] if state_key is None else [_key_pipe(state_key), _key_pipe(state_key)]
        if key_fds:
            cmd += state_key_options(key_fds)
        try:
            with open(workdir / "swtpm.stderr", "wb") as stderr:
                proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                    pass_fds=(*(() if ctrl_fd is None else (ctrl_fd,)), *key_fds),
                )
        except OSError as err:
            raise SwtpmError(
                f"swtpm: cannot run {binary}: {err.strerror}", errno=err.errno
            ) from err
        finally:
            for fd in key_fds:
                os.close(fd)
        instance = cls(proc, ctrl, server, pid_file, log, tpmstate)
        try:
            instance._wait_ready(timeout)
        except BaseException:
            instance.stop()
            raise
        return instance

    def _wait_ready(self, timeout: float) -> None:
        """Wait until swtpm answers CMD_GET_CAPABILITY on its control channel.

        swtpm creates its sockets before it initializes the TPM (and its state backend) and
        serves control commands only from its main loop; so an answer means the TPM state
        loaded, and a failing swtpm is seen exiting instead.

        swtpm serves one control client at a time.  On a socket the caller keeps between
        two swtpm runs, a client that connected meanwhile (QEMU, which stays connected) is
        accepted before the probe, which then gets no answer: a swtpm holding an accepted
        connection is in its main loop, so that counts as ready too.
        """
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise SwtpmError(f"swtpm on {self.tpmstate} exited early: {self._reason()}")
            try:
                control_command(self.ctrl, CMD_GET_CAPABILITY, timeout=1.0)
                return
            except SwtpmError:
                if self._serves_a_client():
                    return
                if time.monotonic() > deadline:
                    raise SwtpmError(
                        f"swtpm on {self.tpmstate}: {self.ctrl} not ready after {timeout:g}s"
                    ) from None
                time.sleep(0.01)

    def _serves_a_client(self) -> bool:
        """Whether swtpm holds a connection it accepted (more sockets than its listeners)."""
        listeners = 1 + (self.server is not None)
        sockets = 0
        try:
            for fd in os.listdir(f"/proc/{self.pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{self.pid}/fd/{fd}").startswith("socket:"):
                        sockets += 1
        except OSError:
            return False
        return sockets > listeners

    def _reason(self) -> str:
        """Why swtpm exited: the last line of its stderr or log."""
        texts = []
        for path in (self.log, self.log.with_suffix(".stderr")):
            try:
                texts.append(path.read_text(errors="replace"))
            except OSError:
                texts.append("")
        return _last_line(*texts) or f"exit status {self.proc.returncode}"

    @property
    def pid(self) -> int:
        """swtpm's process id."""
        return self.proc.pid

    def control(self, command: int, payload: bytes = b"") -> None:
        """Send a control channel command; SwtpmError unless it succeeds."""
        result = control_command(self.ctrl, command, payload)
        if result != 0:
            raise SwtpmError(f"swtpm control command 0x{command:02x} failed: 0x{result:x}")

    def init(self, *, delete_volatile: bool = False) -> None:
        """CMD_INIT: (re)start the TPM; ``delete_volatile`` drops the volatile state first."""
        self.control(
            CMD_INIT, struct.pack(">I", INIT_FLAG_DELETE_VOLATILE if delete_volatile else 0)
        )

    def store_volatile(self) -> None:
        """CMD_STORE_VOLATILE: make swtpm write its volatile state section."""
        self.control(CMD_STORE_VOLATILE)

    def stop(self, timeout: float = 10.0) -> int:
        """Shut swtpm down (CMD_SHUTDOWN, then SIGTERM, then SIGKILL); return its exit code.

        Each step gets ``timeout`` seconds; :attr:`stopped_by` records which one worked.
        """
        if self.proc.poll() is None and self.stopped_by is None:
            steps: list[tuple[str, signal.Signals | None]] = [
                ("SIGTERM", signal.SIGTERM),
                ("SIGKILL", signal.SIGKILL),
            ]
            try:
                control_command(self.ctrl, CMD_SHUTDOWN, timeout=timeout)
                steps.insert(0, ("CMD_SHUTDOWN", None))
            except SwtpmError:
                pass
            for name, sig in steps:
                if sig is not None and self.proc.poll() is None:
                    self.proc.send_signal(sig)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    continue
                self.stopped_by = name
                break
        elif self.stopped_by is None:
            self.stopped_by = "exited"
        self.proc.wait()
        return int(self.proc.returncode)

    def __enter__(self) -> Swtpm:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _channel_spec(address: str | int) -> str:
    """swtpm's ``--ctrl``/``--server`` argument for a unix path or a TCP port."""
    if isinstance(address, int):
        return f"type=tcp,port={address}"
    return f"type=unixio,path={address}"


def free_tcp_port_pair() -> int:
    """A port N with N and N+1 free on 127.0.0.1 (tpm2-tools' swtpm TCTI uses N and N+1)."""
    for _ in range(100):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port
    raise SwtpmError("no free pair of TCP ports on 127.0.0.1")

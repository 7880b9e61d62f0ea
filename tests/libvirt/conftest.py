"""A real libvirtd of the tests' own, and the domains they define on it.

:func:`libvirtd` starts Debian's ``libvirtd`` (and ``virtlogd``) as root without systemd,
in a private mount namespace: ``/etc/libvirt``, ``/run/libvirt``, ``/var/lib/libvirt``,
``/var/cache/libvirt``, ``/var/log/libvirt`` and ``/var/log/swtpm`` are bind mounts of
directories under one private base directory, so the daemon has its own configuration,
sockets, domain definitions, swtpm state and logs, and never touches a system libvirt's.
The swtpm local CA (``/var/lib/swtpm-localca``) is private too and starts empty, ``tss:root
0750`` as swtpm-tools' postinst makes it: a fresh machine's.  Commands that must see what
libvirt sees run through :meth:`Libvirtd.in_namespace`.  The same files
are visible to the tests at ``daemon.base / ...`` (the client socket is
``daemon.base / "run/libvirt-sock"``).

Teardown always destroys and undefines every domain of the daemon, stops libvirtd and
virtlogd, kills whatever still runs in the private namespace (QEMU, swtpm) and removes the
base directory, also when a test failed.  Domains are TCG (``<domain type='qemu'>``): KVM
may not work for the kernel a test runs on.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import need, need_root
from tests.vtpm.mount_fixtures import wait_gone
from vtpm_qcow.tpm.client import Tpm
from vtpm_qcow.tpm.qtest_tis import QtestTisTransport

#: What the private namespace gets of its own: system path -> directory under the base.
PRIVATE_DIRS = {
    "/etc/libvirt": "etc",
    "/run/libvirt": "run",
    "/var/lib/libvirt": "lib",
    "/var/cache/libvirt": "cache",
    "/var/log/libvirt": "log",
    "/var/log/swtpm": "swtpmlog",
    "/var/lib/swtpm-localca": "localca",
}
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
#: Domains the tests define are named with this prefix: unique to this test run, since
#: libvirt names a domain's cgroups after it (and its id, the same in every daemon) and two
#: runs on one machine each have a libvirtd of their own.
PREFIX = f"vtpmtest-{os.getpid()}-"


@dataclass
class Libvirtd:
    """A running private libvirtd."""

    base: Path
    proc: subprocess.Popen[bytes]
    #: the mount namespace (inode of /proc/PID/ns/mnt) everything it runs lives in
    mnt_ns: int
    defined: list[str] = field(default_factory=list)

    @property
    def socket(self) -> Path:
        return self.base / "run" / "libvirt-sock"

    @property
    def uri(self) -> str:
        return f"qemu:///system?socket={self.socket}"

    @property
    def log(self) -> Path:
        return self.base / "libvirtd.out"

    def virsh(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run ``virsh -c URI ARGS``; AssertionError with its output if it fails."""
        done = subprocess.run(
            [need("virsh"), "-c", self.uri, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"virsh {' '.join(args)} exited {done.returncode}: "
                f"{done.stderr.strip()}{self.log_tail()}"
            )
        return done

    def in_namespace(self, *argv: str) -> list[str]:
        """``argv`` run inside the daemon's mount namespace (where libvirt's paths are)."""
        return [need("nsenter"), f"--mount=/proc/{self.proc.pid}/ns/mnt", "--", *argv]

    def define(self, xml: str) -> str:
        """Define a domain from ``xml``; it is undefined again at teardown. Returns its name."""
        path = self.base / "define.xml"
        path.write_text(xml)
        done = self.virsh("define", str(path))
        name = done.stdout.split("'")[1]
        self.defined.append(name)
        return name

    def state(self, name: str) -> str:
        return self.virsh("domstate", name).stdout.strip()

    def wait_answer(self) -> None:
        """Until libvirtd answers on its socket (AssertionError if it exits or times out)."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"libvirtd exited with {self.proc.returncode}{self.log_tail()}"
                )
            if self.socket.exists() and self.virsh("version", check=False).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"libvirtd did not answer within {START_TIMEOUT:g}s")
            time.sleep(0.1)

    def restart(self) -> None:
        """Stop libvirtd (running domains keep running) and start it again in the same
        namespace: the new daemon reconnects to them and discovers hooks anew."""
        keeper = int((self.base / "virtlogd.pid").read_text())  # virtlogd holds the namespace
        self.proc.terminate()
        self.proc.wait(STOP_TIMEOUT)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [
                    need("nsenter"),
                    f"--mount=/proc/{keeper}/ns/mnt",
                    "--",
                    need("libvirtd"),
                    "-p",
                    str(self.base / "libvirtd.pid"),
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.wait_answer()
        assert _mnt_ns(self.proc.pid) == self.mnt_ns

    def log_tail(self, lines: int = 15) -> str:
        """The end of libvirtd's own log, for failure messages."""
        try:
            text = self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "\nlibvirtd log:\n" + "\n".join(text)


def _make_base() -> Path:
    """The private directory tree: libvirt's configuration copied, the rest empty."""
    base = Path(tempfile.mkdtemp(prefix="vtpm-libvirt-", dir="/tmp"))
    base.chmod(0o755)  # QEMU (libvirt-qemu) and swtpm (tss) reach sockets under it
    for sub in PRIVATE_DIRS.values():
        (base / sub).mkdir()
    for conf in Path("/etc/libvirt").glob("*.conf"):
        shutil.copy2(conf, base / "etc" / conf.name)
    (base / "etc" / "qemu").mkdir()
    (base / "etc" / "hooks").mkdir()
    for sub in ("images", "boot"):
        (base / "lib" / sub).mkdir(mode=0o711)
    qemu_dir = base / "lib" / "qemu"
    qemu_dir.mkdir(mode=0o750)
    shutil.chown(qemu_dir, "libvirt-qemu", "libvirt-qemu")
    (base / "cache").chmod(0o711)
    localca = base / "localca"
    localca.chmod(0o750)
    shutil.chown(localca, "tss", "root")
    return base


def _mnt_ns(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/mnt").st_ino


def _namespace_pids(ns: int) -> list[int]:
    """Every process in the mount namespace ``ns``."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if _mnt_ns(int(entry)) == ns:
                    pids.append(int(entry))
    return pids


def _pid_file_pids(base: Path) -> list[int]:
    """The processes libvirt recorded in pid files (QEMU runs in a mount namespace of its
    own, libvirt's default): those still running with the base or a test domain's name on
    their command line."""
    pids: set[int] = set()
    for pid_file in (base / "run").rglob("*.pid"):
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if PREFIX.encode() in cmdline or str(base).encode() in cmdline:
                pids.add(pid)
    return sorted(pids)


def _start(base: Path) -> Libvirtd:
    for tool in ("libvirtd", "virtlogd", "virsh", "unshare", "nsenter"):
        need(tool)
    script = base / "namespace.sh"
    mounts = "\n".join(
        f"mount --bind {base / sub} {target}" for target, sub in PRIVATE_DIRS.items()
    )
    script.write_text(
        textwrap.dedent(
            """\
            set -e
            {mounts}
            virtlogd -d -p {base}/virtlogd.pid
            exec libvirtd -p {base}/libvirtd.pid
            """
        ).format(mounts=mounts, base=base)
    )
    for target in PRIVATE_DIRS:
        os.makedirs(target, exist_ok=True)  # bind mount targets (empty where libvirt is not set up)
    with open(base / "libvirtd.out", "wb") as out:
        proc = subprocess.Popen(
            [need("unshare"), "--mount", "--propagation", "private", "sh", str(script)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    daemon = Libvirtd(base, proc, 0)
    daemon.wait_answer()
    daemon.mnt_ns = _mnt_ns(proc.pid)
    assert daemon.mnt_ns != _mnt_ns(os.getpid()), "libvirtd is not in a namespace of its own"
    return daemon


def _stop(daemon: Libvirtd) -> None:
    """Destroy and undefine every domain, stop the daemons, end what is left in the namespace."""
    try:
        if daemon.proc.poll() is None:
            names = daemon.virsh("list", "--all", "--name", check=False).stdout.split()
            for name in names:
                daemon.virsh("destroy", name, check=False)
                daemon.virsh(
                    "undefine", name, "--snapshots-metadata", "--nvram", "--tpm", check=False
                )
    finally:
        ns = daemon.mnt_ns or _mnt_ns(daemon.proc.pid)
        recorded = _pid_file_pids(daemon.base)
        if daemon.proc.poll() is None:
            daemon.proc.terminate()
            try:
                daemon.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                daemon.proc.kill()
                daemon.proc.wait()
        # virtlogd, and anything a failed teardown left running (QEMU, swtpm)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = [*_namespace_pids(ns), *(p for p in recorded if os.path.exists(f"/proc/{p}"))]
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            if all(wait_gone(pid, 10) for pid in pids):
                break
        shutil.rmtree(daemon.base, ignore_errors=True)


@contextlib.contextmanager
def private_libvirtd(
    before_start: Callable[[Path], None] = lambda base: None,
) -> Iterator[Libvirtd]:
    """A private libvirtd (root, no systemd), stopped at the end; ``before_start(base)``
    prepares its tree first (hooks are discovered when libvirtd starts)."""
    need_root("libvirtd runs QEMU as libvirt-qemu and swtpm as tss")
    base = _make_base()
    try:
        before_start(base)
        daemon = _start(base)
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    try:
        yield daemon
    finally:
        _stop(daemon)


@pytest.fixture(scope="session")
def libvirtd() -> Iterator[Libvirtd]:
    """A private libvirtd for the libvirt tests; stopped at the end."""
    with private_libvirtd() as daemon:
        yield daemon


@pytest.fixture
def lv(libvirtd: Libvirtd) -> Iterator[Libvirtd]:
    """The private libvirtd; every domain a test defined is destroyed and undefined after it."""
    try:
        yield libvirtd
    finally:
        for name in libvirtd.defined:
            libvirtd.virsh("destroy", name, check=False)
            libvirtd.virsh(
                "undefine", name, "--snapshots-metadata", "--nvram", "--tpm", check=False
            )
        libvirtd.defined.clear()


def guest_tpm(qtest: Path) -> Tpm:
    """The running domain's TPM, as its guest sees it (TIS registers through qtest)."""
    deadline = time.monotonic() + 30
    while not qtest.exists():
        assert time.monotonic() < deadline, "QEMU made no qtest socket"
        time.sleep(0.05)
    return Tpm(QtestTisTransport(str(qtest)))


def guest_side(daemon: Libvirtd) -> Path:
    """A directory QEMU (``libvirt-qemu``) can create its qtest socket in, with a firmware of
    HLT instructions (``halt.bin``): a guest whose TPM only the test drives, through qtest."""
    path = daemon.base / "guest"
    if not path.exists():
        path.mkdir(mode=0o755)
        shutil.chown(path, "libvirt-qemu", "libvirt-qemu")
        halt = path / "halt.bin"
        halt.write_bytes(b"\xf4" * 65536)  # SeaBIOS would talk to the TPM on its own
        halt.chmod(0o644)
    return path


def domain_xml(
    name: str,
    tpm: str,
    *,
    uuid: str | None = None,
    disk: Path | None = None,
    qtest: Path | None = None,
) -> str:
    """A small TCG domain (64 MiB, no display) with the ``<tpm>`` element ``tpm``.

    With ``qtest`` (a socket path in :func:`guest_side`'s directory) the firmware is the HLT
    one and QEMU gets a qtest socket there (``<qemu:commandline>``: the domain is tainted,
    as a test-only monitor may be), through which the test drives the TPM as a guest would
    (:class:`vtpm_qcow.tpm.qtest_tis.QtestTisTransport`).
    """
    uuid_xml = f"<uuid>{uuid}</uuid>" if uuid else ""
    disk_xml = (
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{disk}'/><target dev='vda' bus='virtio'/></disk>"
        if disk
        else ""
    )
    loader = f"<loader type='rom'>{qtest.parent / 'halt.bin'}</loader>" if qtest else ""
    commandline = (
        "<qemu:commandline>"
        "<qemu:arg value='-qtest'/>"
        f"<qemu:arg value='unix:{qtest},server=on,wait=off'/>"
        "<qemu:arg value='-qtest-log'/><qemu:arg value='/dev/null'/>"
        "</qemu:commandline>"
        if qtest
        else ""
    )
    return textwrap.dedent(
        f"""\
        <domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
          <name>{name}</name>{uuid_xml}
          <memory unit='MiB'>64</memory><vcpu>1</vcpu>
          <os><type arch='x86_64' machine='pc'>hvm</type>{loader}<boot dev='hd'/></os>
          <devices>
            <emulator>/usr/bin/qemu-system-x86_64</emulator>
            {disk_xml}
            {tpm}
            <memballoon model='none'/>
          </devices>
          {commandline}
        </domain>
        """
    )

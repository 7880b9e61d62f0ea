"""Shared helpers for tests that mount a vTPM image with the real ``vtpm-qcow mount`` daemon.

Every daemon started here is stopped in a ``finally`` block: SIGTERM, then SIGKILL, and a
``fusermount3 -u`` if the mount point is still attached, so a failing test never leaves a
mount or a process behind.  Control sockets and pid files go to a short private runtime
directory (unix socket paths are limited to 108 bytes).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import need, need_fuse
from vtpm_qcow.export.control import RUNTIME_DIR_ENV, ControlClient, pid_path_for, socket_path_for
from vtpm_qcow.state import linear
from vtpm_qcow.state.blob import BLOB_HEADER_STRUCT, TAG_DATA, TLV_HEADER_STRUCT

STATE_FILE = "tpmstate"
#: a TCTI-independent NV index for the tests' data
NV_INDEX = 0x01500030


@pytest.fixture
def runtime_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A short private runtime directory for control sockets and pid files."""
    path = Path(tempfile.mkdtemp(prefix="vq-"))
    monkeypatch.setenv(RUNTIME_DIR_ENV, str(path))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def vtpm_qcow(
    *args: str, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the real ``vtpm-qcow`` command; AssertionError with its stderr if it fails."""
    done = subprocess.run(
        [need("vtpm-qcow"), *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise AssertionError(f"vtpm-qcow {' '.join(args)} exited {done.returncode}: {done.stderr}")
    return done


def create_image(path: Path) -> Path:
    """A new empty vTPM image made by ``vtpm-qcow create``."""
    vtpm_qcow("create", str(path))
    return path


def is_mounted(mountpoint: Path) -> bool:
    """True if something (even a dead FUSE daemon) is mounted on ``mountpoint``.  Never
    stats the mount point itself (a stuck FUSE connection would block the test)."""
    target = os.path.join(os.path.realpath(mountpoint.parent), mountpoint.name)
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == target for line in mounts)


def pid_alive(pid: int) -> bool:
    """True while process ``pid`` exists (zombies of others count as gone soon after)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_gone(pid: int, timeout: float = 30.0) -> bool:
    """Wait until ``pid`` has exited; True if it did within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return False


def force_unmount(mountpoint: Path) -> None:
    """Detach ``mountpoint`` whatever state its daemon is in."""
    if is_mounted(mountpoint):
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)


@dataclass
class Mount:
    """A running mount daemon."""

    image: Path
    mountpoint: Path
    view: str
    pid: int
    log: Path

    @property
    def state_path(self) -> Path:
        """The state file of the file view / the permall file of the dir view."""
        if self.view == "file":
            return self.mountpoint / STATE_FILE
        return self.mountpoint / "tpm2-00.permall"

    @property
    def tpmstate(self) -> str:
        """swtpm's --tpmstate argument for this mount."""
        if self.view == "file":
            return f"backend-uri=file://{self.mountpoint}/{STATE_FILE}"
        return f"dir={self.mountpoint}"

    @property
    def setup_tpmstate(self) -> str:
        """swtpm_setup's --tpmstate argument for this mount."""
        if self.view == "file":
            return f"file://{self.mountpoint}/{STATE_FILE}"
        return str(self.mountpoint)

    def control(self) -> ControlClient:
        """A control client on the daemon's default socket."""
        return ControlClient.for_image(self.image, timeout=60)

    def stop(self) -> None:
        """SIGTERM the daemon and wait for it (it unmounts itself)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        assert wait_gone(self.pid), f"mount daemon {self.pid} ignored SIGTERM"


def start_mount(
    image: Path, mountpoint: Path, *, view: str = "file", env: dict[str, str] | None = None
) -> Mount:
    """``vtpm-qcow mount`` (detaching); returns once the daemon says the mount is ready."""
    need_fuse()
    mountpoint.mkdir(exist_ok=True)
    log = mountpoint.with_name(mountpoint.name + ".log")
    done = subprocess.run(
        [
            need("vtpm-qcow"),
            "mount",
            str(image),
            str(mountpoint),
            "--view",
            view,
            "--log",
            str(log),
            "--verbose",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )
    if done.returncode != 0:
        force_unmount(mountpoint)
        raise AssertionError(f"vtpm-qcow mount failed: {done.stderr.strip()}")
    pid = int(pid_path_for(image).read_text())
    return Mount(image, mountpoint, view, pid, log)


@contextlib.contextmanager
def mounted(
    image: Path, mountpoint: Path, *, view: str = "file", env: dict[str, str] | None = None
) -> Iterator[Mount]:
    """A mount daemon for the ``with`` block; always stopped, killed and detached after."""
    mount = start_mount(image, mountpoint, view=view, env=env)
    try:
        yield mount
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(mount.pid, signal.SIGTERM)
        if not wait_gone(mount.pid, 20):
            with contextlib.suppress(ProcessLookupError):
                os.kill(mount.pid, signal.SIGKILL)
            wait_gone(mount.pid, 10)
        force_unmount(mountpoint)


def stale_mount(mountpoint: Path) -> bool:
    """True if ``mountpoint`` is the dead mount of a killed FUSE daemon (ENOTCONN)."""
    try:
        os.stat(mountpoint)
    except OSError as err:
        return err.errno == errno.ENOTCONN
    return False


def state_blob(payload: bytes) -> bytes:
    """``payload`` as swtpm stores a state blob: a version 2 header and one DATA TLV (the
    views refuse to commit anything else, see :func:`vtpm_qcow.state.blob.check_stored_blob`)."""
    tlv = TLV_HEADER_STRUCT.pack(TAG_DATA, len(payload)) + payload
    total = BLOB_HEADER_STRUCT.size + len(tlv)
    return BLOB_HEADER_STRUCT.pack(2, 1, BLOB_HEADER_STRUCT.size, 0, total) + tlv


def raw_content(image: Path) -> bytes:
    """The image's virtual disk as qemu-img reads it (``convert -U -O raw``): the oracle."""
    raw = image.with_name(image.name + ".raw")
    try:
        subprocess.run(
            [need("qemu-img"), "convert", "-U", "-f", "qcow2", "-O", "raw", str(image), str(raw)],
            check=True,
            capture_output=True,
            timeout=60,
        )
        return raw.read_bytes()
    finally:
        raw.unlink(missing_ok=True)


def raw_sections(image: Path) -> dict[str, bytes]:
    """The state sections in the image according to qemu-img and the linear codec."""
    data = raw_content(image)
    out = {}
    for name in linear.SECTION_NAMES:
        blob = linear.read_section(data, name, source=str(image))
        if blob is not None:
            out[name] = blob
    return out


def qemu_img_check(image: Path, *, allow_leaks: bool = False) -> None:
    """``qemu-img check -U``: clean, else AssertionError.

    ``allow_leaks`` for a live image: the qcow2 layer frees replaced clusters lazily (their
    refcounts reach the disk at its next flush), which qemu-img reports as leaks.
    """
    done = subprocess.run(
        [need("qemu-img"), "check", "-U", str(image)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    ok = (0, 3) if allow_leaks else (0,)
    assert done.returncode in ok, (
        f"qemu-img check {image}: {done.returncode} {done.stdout}{done.stderr}"
    )


def qemu_img_snapshots(image: Path) -> list[str]:
    """Snapshot names per ``qemu-img snapshot -l -U``."""
    done = subprocess.run(
        [need("qemu-img"), "snapshot", "-l", "-U", str(image)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    names = []
    for line in done.stdout.splitlines()[2:]:
        fields = line.split()
        if len(fields) >= 2:
            names.append(fields[1])
    return names


def socket_of(image: Path) -> Path:
    """The image's default control socket."""
    return socket_path_for(image)


def one_line_failure(*args: str) -> str:
    """Run ``vtpm-qcow ARGS``; expect exit 1 with one line on stderr and no traceback."""
    done = vtpm_qcow(*args, check=False)
    assert done.returncode == 1, done
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    return done.stderr


@contextlib.contextmanager
def qsd_fuse_export(
    image: Path, mountpoint: Path, *, secret: list[str] | None = None
) -> Iterator[Path]:
    """``image`` exported as a regular file at ``mountpoint`` by qemu-storage-daemon (the
    Proxmox VE stack); ``secret``: a LUKS image's ``--object secret,id=s0,...`` options."""
    qsd = need("qemu-storage-daemon")
    need_fuse()
    mountpoint.touch()
    qcow2_node = "driver=qcow2,node-name=q,file=f"
    if secret:
        qcow2_node += ",encrypt.format=luks,encrypt.key-secret=s0"
    proc = subprocess.Popen(
        [
            qsd, *(secret or []),
            "--blockdev", f"driver=file,node-name=f,filename={image}",
            "--blockdev", qcow2_node,
            "--export", f"type=fuse,id=e,node-name=q,mountpoint={mountpoint},writable=on",
        ],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not is_mounted(mountpoint):
            if proc.poll() is not None:
                raise AssertionError(f"qemu-storage-daemon exited: {proc.stderr.read()!r}")  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "qemu-storage-daemon did not mount"
            time.sleep(0.02)
        yield mountpoint
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        force_unmount(mountpoint)
        if proc.stderr is not None:
            proc.stderr.close()

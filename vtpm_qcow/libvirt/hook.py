"""libvirt's ``qemu`` hook for domains enabled with ``vtpm-qcow libvirt enable``.

libvirt runs ``/etc/libvirt/hooks/qemu.d/*`` with ``DOMAIN OP SUBOP EXTRA`` and the domain
XML on stdin (../shared/reference/libvirt-9.0.md, Q5: call order measured).  Domains
without the vtpm-qcow element in ``<metadata>`` are left alone.  For an enabled domain:

* ``prepare begin`` (before libvirt creates the TPM state directory or starts swtpm):
  the vTPM image's dir view is mounted at libvirt's state directory
  (``/var/lib/libvirt/swtpm/<uuid>/tpm2``).  libvirt runs swtpm_setup only when that
  directory does not exist, so its own swtpm (as ``tss``) runs on the image's manufactured
  state; libvirt's ``chown``/``chmod`` of the directory are kept by the view.
* ``started begin`` and ``reconnect begin`` (QEMU runs; after a libvirtd restart): a
  follower (``vtpm-qcow libvirt follow``) is started, detached, unless one runs: it keeps
  the image's snapshot tags with the domain's through libvirt's API.
* ``release end`` (QEMU and swtpm gone): the follower is stopped and the view unmounted.

The view exists only between ``prepare`` and ``release``: a ``virsh undefine`` of a
shut-off domain finds an empty directory to delete, never the TPM state in the image.
Nothing here calls back into libvirt (a hook must not: libvirtd waits for it).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ..errors import HANDLED, LibvirtError
from ..export.control import runtime_dir
from . import DEFAULT_URI
from .domain import DomainInfo

#: Where libvirt keeps each domain's swtpm state (``<uuid>/tpm2`` below it).
STATE_ROOT = Path("/var/lib/libvirt/swtpm")
#: Where libvirt keeps each domain's QEMU log; the follower's log goes beside it.
LOG_DIR = Path("/var/log/libvirt/qemu")
#: libvirt's default swtpm user (qemu.conf ``swtpm_user``).
SWTPM_USER = "tss"
#: Seconds a follower gets to end after SIGTERM.
STOP_TIMEOUT = 10.0


def state_dir(info: DomainInfo, root: Path = STATE_ROOT) -> Path:
    """libvirt's swtpm state directory of the domain (``tpm2``, or ``tpm1.2``)."""
    version = "tpm1.2" if info.tpm_version == "1.2" else "tpm2"
    return root / info.uuid / version


def follower_pid_file(info: DomainInfo) -> Path:
    return runtime_dir() / f"libvirt-follow-{info.uuid}.pid"


def self_command() -> list[str]:
    """How to run this program again (the installed launcher, else ``python -m``)."""
    argv0 = sys.argv[0]
    if os.path.basename(argv0) == "vtpm-qcow" and os.access(argv0, os.X_OK):
        return [os.path.abspath(argv0)]
    return [sys.executable, "-m", "vtpm_qcow"]


def run(argv: Sequence[str]) -> None:
    """Run one of our own commands; LibvirtError with its message if it fails."""
    done = subprocess.run(
        [*self_command(), *argv],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        message = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        raise LibvirtError(f"vtpm-qcow {argv[0]}: {message[0]}")


def _owned_dir(path: Path, user: str) -> None:
    """``path`` as libvirt makes a domain's state directory: ``user``'s, mode 0700."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(KeyError):
        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)


def prepare(info: DomainInfo, *, root: Path = STATE_ROOT) -> None:
    """Mount the image's dir view at the domain's state directory."""
    assert info.image is not None
    target = state_dir(info, root)
    if os.path.ismount(target):
        return  # a previous start's view that was never released
    _owned_dir(target.parent, SWTPM_USER)
    _owned_dir(target, SWTPM_USER)
    if any(target.iterdir()):
        raise LibvirtError(
            f"{target} holds plain swtpm state; 'vtpm-qcow libvirt enable' moves it into "
            f"the image ({info.image}) first",
            path=str(target),
        )
    LOG_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)  # libvirt makes it at the first start
    log = LOG_DIR / f"{info.name}-vtpm-qcow.log"
    run(["mount", "--view", "dir", "--log", str(log), info.image, str(target)])


def start_follower(info: DomainInfo, uri: str) -> int:
    """Start the domain's follower, detached, unless one runs; its pid."""
    assert info.image is not None
    pid_file = follower_pid_file(info)
    running = _pid(pid_file)
    if running is not None:
        return running
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log = LOG_DIR / f"{info.name}-vtpm-qcow-follow.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [*self_command(), "libvirt", "follow", info.uuid, "--connect", uri,
             "--image", info.image],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True,
        )  # fmt: skip
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.write_text(f"{proc.pid}\n")
    return proc.pid


def _pid(pid_file: Path) -> int | None:
    """The pid in ``pid_file`` if that process still runs."""
    try:
        pid = int(pid_file.read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def stop_follower(info: DomainInfo) -> None:
    pid_file = follower_pid_file(info)
    pid = _pid(pid_file)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline and _pid(pid_file) is not None:
            time.sleep(0.05)
    pid_file.unlink(missing_ok=True)


def release(info: DomainInfo, *, root: Path = STATE_ROOT) -> None:
    """Stop the follower and unmount the view (the image is released)."""
    stop_follower(info)
    target = state_dir(info, root)
    if os.path.ismount(target):
        run(["umount", str(target)])


def hook_log(info: DomainInfo) -> Path:
    """Where the hook notes what it did for the domain (beside libvirt's QEMU log)."""
    return LOG_DIR / f"{info.name}-vtpm-qcow-hook.log"


def handle(info: DomainInfo, op: str, subop: str) -> str | None:
    """Act on hook call ``op subop`` for an enabled domain; what was done (also appended
    to :func:`hook_log`), None for a call that needs nothing."""
    if info.image is None:
        return None
    try:
        done = _handle(info, op, subop)
    except HANDLED as err:
        _note(info, f"{op} {subop}: error: {err}")
        raise
    if done:
        _note(info, f"{op} {subop}: {done}")
    return done


def _note(info: DomainInfo, line: str) -> None:
    with contextlib.suppress(OSError):
        LOG_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(hook_log(info), "a", encoding="utf-8") as log:
            log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")


def _handle(info: DomainInfo, op: str, subop: str) -> str | None:
    assert info.image is not None
    uri = info.uri or DEFAULT_URI
    if (op, subop) == ("prepare", "begin"):
        from .offline import reconcile

        done = reconcile(info)
        prepare(info)
        return "; ".join([*done, f"mounted {info.image} at {state_dir(info)}"])
    if (op, subop) in (("started", "begin"), ("reconnect", "begin")):
        pid = start_follower(info, uri)
        return f"follower {pid} for {info.image}"
    if (op, subop) == ("release", "end"):
        from .offline import record

        release(info)
        record(info)
        return f"released {info.image}"
    return None

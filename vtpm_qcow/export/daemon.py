"""The mount daemon: what ``vtpm-qcow mount``, ``serve`` and ``umount`` run.

:func:`run_mount` opens the store (taking the image's QEMU-compatible lock), mounts its file
view or dir view (:mod:`vtpm_qcow.export.fuse`) and serves the control socket
(:mod:`vtpm_qcow.export.control`).  :func:`daemonize` detaches it; the command returns only
once the mount and the socket are usable (the daemon reports readiness, or its error,
through a pipe).  SIGTERM/SIGINT, :func:`unmount` or ``fusermount3 -u`` commit buffered
writes, unmount, close the image (releasing its lock) and remove the socket and pid file.
A daemon killed with -9 leaves the image consistent (every commit is atomic) and the
mount point needing ``fusermount3 -u``.

With a :class:`SwtpmConfig` (``serve``) it runs ``swtpm socket`` on a private mount point
for QEMU's ``-chardev socket``.  The daemon binds the control socket itself, once, with the
owner, group and mode asked for (QEMU under libvirt runs as ``libvirt-qemu``), and hands it
to each swtpm (``--ctrl type=unixio,fd=N``): the socket stays in place between two swtpm
runs, and a QEMU connecting meanwhile waits in its backlog for the next swtpm instead of
being refused.  swtpm runs with ``--terminate``, so it exits when QEMU quits or dies (its
data channel closes); the daemon sees the exit at once through a pidfd, then unmounts and
exits, or with ``keep_serving`` starts a fresh swtpm for the next QEMU run.
``SwtpmConfig.follower`` runs beside each swtpm run (``serve --qmp``: the snapshot watcher
of :mod:`vtpm_qcow.vm.follow`, given this daemon's file system); the daemon knows nothing
of QMP.  ``serve --incoming`` (a live migration's destination, :mod:`.handoff`) starts on a
private copy of the image, unlocked, and runs ``SwtpmConfig.incoming`` before the follower:
it returns once the image is taken over; a swtpm that ends first ends the daemon.

What the daemon measures and the crash tests' hooks are :mod:`vtpm_qcow.export.instruments`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from qcow2.errors import ImageLockedError

from ..errors import HANDLED, MountError, StateFormatError, StoreError
from . import VIEWS
from .content import STATE_FILE_NAME
from .control import (
    ControlClient,
    daemon_answers,
    held_image_error,
    pid_path_for,
    runtime_dir,
    socket_path_for,
)
from .control_server import ControlServer, store_handlers
from .fuse import StoreFS, make_fs, mount_options
from .instruments import IoCounter, instrument
from .lean import heap_trims, loaded_modules, trim_when_idle

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..state.store import Store
    from ..tpm.swtpm import Swtpm

log = logging.getLogger(__name__)

#: Seconds between looks for swtpm's exit where the kernel cannot signal it (no pidfd).
SWTPM_POLL_INTERVAL = 0.2
#: Mode of serve's control socket unless given (swtpm's own default for a unixio socket).
CTRL_MODE = 0o770
#: Connections the control socket queues while no swtpm accepts (between two runs).
CTRL_BACKLOG = 16
#: umount2() flags: abort a FUSE connection, detach lazily.
MNT_FORCE, MNT_DETACH = 1, 2
#: Seconds ``umount`` waits for the daemon to exit.
UMOUNT_TIMEOUT = 30.0


@dataclass
class MountConfig:
    """What one daemon serves and where."""

    image: str
    mountpoint: str
    view: str = "file"
    control: str | None = None
    pid_file: str | None = None
    #: the passphrase of an encrypted image, read by the command before the daemon
    #: detaches (a fork keeps it: never on a command line or in the environment)
    key: bytes | None = field(default=None, repr=False)
    #: ``serve --incoming``: start on a private copy of the image, unlocked (the migration
    #: source's daemon holds it); :mod:`vtpm_qcow.export.handoff`
    incoming: bool = False

    @property
    def control_path(self) -> Path:
        """The control socket (the image's default one unless given)."""
        return Path(self.control) if self.control else socket_path_for(self.image)

    @property
    def pid_path(self) -> Path:
        """The pid file (the image's default one unless given)."""
        return Path(self.pid_file) if self.pid_file else pid_path_for(self.image)


@dataclass
class SwtpmConfig:
    """The swtpm that ``serve`` runs on the mount."""

    ctrl: str
    flags: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
    tpm2: bool = True
    keep_serving: bool = False
    #: the control socket's owner and group (ids; None: the daemon's) and mode
    ctrl_owner: int | None = None
    ctrl_group: int | None = None
    ctrl_mode: int = CTRL_MODE
    #: run beside each swtpm, given the file system; cancelled when that swtpm ends
    #: (``serve --qmp``: :func:`vtpm_qcow.vm.follow.follow_qmp`)
    follower: Callable[[StoreFS], Awaitable[None]] | None = None
    #: ``serve --incoming``: run beside the first swtpm, before the follower; returns once
    #: the image is taken over (:meth:`vtpm_qcow.export.handoff.Handoff.acquire`).  If that
    #: swtpm ends first, the migration failed: the daemon stops, the image untouched.
    incoming: Callable[[StoreFS], Awaitable[None]] | None = None
    #: the swtpm running now (filled in while serving)
    current: Swtpm | None = None
    #: the passphrase of swtpm's own state encryption (``--key``/``--migration-key``
    #: pwdfd=), handed to each swtpm through pipes
    state_key: bytes | None = field(default=None, repr=False)


# Section: running a mount


def _open_store(image: str, key: bytes | None) -> Store:
    from ..state.store import Store  # the store module is the layer this daemon serves

    if not os.path.exists(image):
        raise StoreError("no such image", path=image)
    try:
        return Store.open(image, writable=True, key=key)
    except ImageLockedError as err:  # one image, one TPM: say who has it
        raise held_image_error(image, "serving it here") from err


def _refuse_unloadable_state(store: Store, *, has_key: bool, tpm2: bool) -> None:
    """Refuse now, not when QEMU initializes the TPM, a state swtpm would not load: one
    encrypted with swtpm's own key (libvirt's ``<encryption>``) when no key is given, or
    one that fails the checks swtpm makes before libtpms reads it (``vtpm-qcow check``'s
    quick part).  No state at all is fine: swtpm manufactures a TPM."""
    from ..state.blob import parse_blob
    from ..state.probe import NO_STATE, layout_problem

    try:
        permall = store.read_section("permall")
        encrypted = bool(permall) and parse_blob(permall or b"").encrypted
    except StateFormatError:
        encrypted = False
    if encrypted and not has_key:
        raise StoreError(
            "swtpm's state is encrypted with its own key (libvirt's <encryption>): "
            "give --swtpm-key and the secret",
            path=store.path,
        )
    if encrypted:
        return  # its payload is swtpm's to decrypt
    try:
        problem = layout_problem(store.layout(), source="state", tpm2=tpm2)
    except StateFormatError as err:
        problem = str(err)
    if problem is not None and not problem.endswith(NO_STATE):
        raise StoreError(
            f"swtpm would not load this state ({problem}); 'vtpm-qcow check --repair' "
            "restores the newest one it loads",
            path=store.path,
        )


def _check_mountpoint(mountpoint: str) -> None:
    try:
        st = os.stat(mountpoint)
    except OSError as err:
        if err.errno == errno.ENOTCONN:
            raise MountError(
                "stale FUSE mount of a dead daemon (run fusermount3 -u)",
                path=mountpoint,
                errno=err.errno,
            ) from err
        raise MountError(
            f"mount point unusable: {err.strerror}", path=mountpoint, errno=err.errno
        ) from err
    if not stat.S_ISDIR(st.st_mode):
        raise MountError("mount point is not a directory", path=mountpoint, errno=errno.ENOTDIR)
    if os.path.ismount(mountpoint):
        raise MountError("something is already mounted there", path=mountpoint, errno=errno.EBUSY)


def _write_pid_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{os.getpid()}\n")
    tmp.replace(path)


def _sole(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception inside (nested) ``group``, or ``group`` itself if there are more."""
    inner: BaseException = group
    while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
        inner = inner.exceptions[0]
    return inner


def run_mount(
    config: MountConfig,
    *,
    on_ready: Callable[[], None] = lambda: None,
    swtpm: SwtpmConfig | None = None,
) -> None:
    """Serve ``config`` until a signal or an unmount; ``on_ready`` once it is usable.

    Raises :class:`VtpmQcowError`/:class:`Qcow2Error` for what prevents serving (image locked
    or corrupt, bad mount point, swtpm failing).
    """
    if config.view not in VIEWS:
        raise StoreError(f"unknown view {config.view!r} (file or dir)", path=config.image)
    mountpoint = os.path.abspath(config.mountpoint)
    _check_mountpoint(mountpoint)
    if config.incoming:
        from .handoff import open_incoming

        store = open_incoming(config.image, config.key)
    else:
        store = _open_store(config.image, config.key)
    try:
        if swtpm is not None:
            own_key = any(o.startswith("--key") for o in swtpm.options)
            has_key = swtpm.state_key is not None or own_key
            _refuse_unloadable_state(store, has_key=has_key, tpm2=swtpm.tpm2)
        fs = make_fs(store, config.view)
        if config.incoming:
            fs.migrating = "incoming live migration: the image is not taken over yet"
        io = instrument(store, fs)
        # From the mount on, a stop signal never cuts the unmount short: outside trio's
        # receiver (before it opens, after it restores this handler) one is remembered.
        for signum in STOP_SIGNALS:
            signal.signal(signum, _remember_signal)
        try:
            pyfuse3.init(fs, mountpoint, mount_options(os.path.abspath(config.image)))
        except RuntimeError as err:
            raise MountError(f"cannot mount: {err}", path=mountpoint) from err
        try:
            trio.run(_serve, fs, config, mountpoint, on_ready, swtpm, io)
        except BaseExceptionGroup as group:
            # trio >= 0.25 wraps what a nursery task raised in a group: one failure is
            # still one failure, with its own one-line message
            raise _sole(group) from None
        finally:
            pyfuse3.close(unmount=True)
    finally:
        store.close()
        with contextlib.suppress(OSError):
            if config.pid_path.read_text().strip() == str(os.getpid()):
                config.pid_path.unlink()


async def _serve(
    fs: StoreFS,
    config: MountConfig,
    mountpoint: str,
    on_ready: Callable[[], None],
    swtpm: SwtpmConfig | None,
    io: IoCounter,
) -> None:
    def describe() -> dict[str, Any]:
        return {
            "image_io": io.counts(),
            "image": os.path.abspath(config.image),
            "mountpoint": mountpoint,
            "pid": os.getpid(),
            "swtpm_pid": swtpm.current.pid if swtpm and swtpm.current else None,
            # what this daemon has imported (its memory: docs/BENCHMARKS.md)
            "modules": loaded_modules(),
            "heap_trims": heap_trims(),
            # the last commit's header made durable once idle (commit records)
            "checkpoints": fs.checkpoints,
        }

    server = ControlServer(config.control_path, store_handlers(fs, describe))
    await server.bind()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signals, swtpm)
            nursery.start_soon(server.serve)
            nursery.start_soon(_run_fuse, nursery.cancel_scope)
            nursery.start_soon(trim_when_idle, lambda: sum(fs.requests.values()))
            nursery.start_soon(fs.checkpoint_when_idle)
            if swtpm is not None:
                await nursery.start(_run_swtpm, swtpm, fs, mountpoint)
            _write_pid_file(config.pid_path)
            on_ready()
            log.info("serving %s on %s (%s view)", config.image, mountpoint, config.view)
    finally:
        with trio.CancelScope(shield=True):
            await _stop_swtpm(swtpm)  # normally done already, while the mount still served
            # Buffered writes were never committed by their writer; keep them anyway.
            fs.flush_all()
            server.close()


async def _run_fuse(scope: trio.CancelScope) -> None:
    """pyfuse3's loop; it returns on terminate() or an external unmount: stop the rest.

    One worker task (``max_tasks=1``): the handlers' bodies are synchronous
    (:mod:`vtpm_qcow.export.fuse`), so a second task would only wait for /dev/fuse beside
    the busy one, and the hand-over between the two costs each request time
    (docs/BENCHMARKS.md).  No handler waits for another FUSE request: kernel cache
    invalidations run in system tasks, after the handler has answered.
    """
    await pyfuse3.main(min_tasks=1, max_tasks=1)
    scope.cancel()


async def _stop_swtpm(swtpm: SwtpmConfig | None) -> None:
    """Stop serve's swtpm (its last writes need the mount, so before unmounting)."""
    if swtpm is not None and swtpm.current is not None:
        swtpm.keep_serving = False
        await trio.to_thread.run_sync(swtpm.current.stop)


#: The signals that stop a daemon (it unmounts first).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: Stop signals that arrived while trio's receiver was not open.
_early_signals: list[int] = []


def _remember_signal(signum: int, frame: object) -> None:
    _early_signals.append(signum)


async def _stop_on_signals(swtpm: SwtpmConfig | None) -> None:
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        if _early_signals:
            log.info("signal %d (while starting): unmounting", _early_signals[0])
        else:
            async for signum in signals:
                log.info("signal %d: unmounting", signum)
                break
        await _stop_swtpm(swtpm)
        pyfuse3.terminate()


def swtpm_tpmstate(view: str, mountpoint: str) -> str:
    """swtpm's ``--tpmstate`` argument for a mount of ``view`` at ``mountpoint``."""
    if view == "dir":
        return f"dir={mountpoint}"
    return f"backend-uri=file://{mountpoint}/{STATE_FILE_NAME}"


def bind_ctrl_socket(config: SwtpmConfig) -> tuple[socket.socket, int]:
    """The listening control socket at ``config.ctrl`` and the inode of its path, with its
    owner, group and mode set before it listens (no client can connect earlier).  A stale
    socket there is replaced; anything else is refused."""
    path = config.ctrl
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
        else:
            raise MountError(
                "control socket path exists and is not a socket", path=path, errno=errno.EEXIST
            )
    except FileNotFoundError:
        pass
    except OSError as err:
        raise MountError(
            f"control socket unusable: {err.strerror}", path=path, errno=err.errno
        ) from err
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        os.chmod(path, config.ctrl_mode)
        if config.ctrl_owner is not None or config.ctrl_group is not None:
            os.chown(
                path,
                -1 if config.ctrl_owner is None else config.ctrl_owner,
                -1 if config.ctrl_group is None else config.ctrl_group,
            )
        inode = os.lstat(path).st_ino
        listener.listen(CTRL_BACKLOG)
    except OSError as err:
        listener.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise MountError(
            f"cannot create the control socket: {err.strerror or err}",
            path=path,
            errno=err.errno,
        ) from err
    return listener, inode


def _remove_ctrl_socket(path: str, listener: socket.socket, inode: int) -> None:
    """Close the control socket and remove its path, if the path is still this socket."""
    try:
        ours = os.lstat(path).st_ino == inode
    except OSError:
        ours = False
    listener.close()
    if ours:
        with contextlib.suppress(OSError):
            os.unlink(path)


async def _run_swtpm(
    config: SwtpmConfig,
    fs: StoreFS,
    mountpoint: str,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run swtpm on the mount; when it exits stop serving, or restart it (keep_serving)."""
    workdir = runtime_dir() / f"swtpm-{os.getpid()}"
    listener, inode = bind_ctrl_socket(config)
    try:
        await _serve_swtpm(config, fs, mountpoint, workdir, listener, task_status)
    finally:
        _remove_ctrl_socket(config.ctrl, listener, inode)
        # swtpm's pid file and log: kept only when swtpm did not start or did not end well
        current = config.current
        if current is None or current.proc.poll() != 0:
            log.warning("swtpm's log is kept in %s", workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


async def _serve_swtpm(
    config: SwtpmConfig,
    fs: StoreFS,
    mountpoint: str,
    workdir: Path,
    listener: socket.socket,
    task_status: trio.TaskStatus[None],
) -> None:
    """The loop of :func:`_run_swtpm`: start swtpm, wait for it to end, maybe again."""
    from ..tpm.swtpm import Swtpm

    tpmstate = swtpm_tpmstate(fs.namespace.view, mountpoint)
    options = config.options
    if not any(option.startswith("--server") for option in options):
        # QEMU's data channel is a socket it passes over the control channel: swtpm ends
        # when it closes, that is when QEMU quits or dies.  (A --server data channel is a
        # plain TPM client's, which may come and go.)
        options = (*options, "--terminate")
    started = False
    while True:
        # Blocking start in a thread: swtpm reads its state through this very event loop.
        instance = await trio.to_thread.run_sync(
            lambda: Swtpm.start(
                tpmstate,
                workdir,
                ctrl=config.ctrl,
                ctrl_fd=listener.fileno(),
                tpm2=config.tpm2,
                flags=config.flags,
                options=options,
                state_key=config.state_key,
            )
        )
        config.current = instance
        if not started:
            task_status.started()
            started = True
        async with trio.open_nursery() as run:
            run.start_soon(_follow, config, fs)
            await _wait_swtpm(instance)
            run.cancel_scope.cancel()
        log.info("swtpm %d exited with %s", instance.pid, instance.proc.returncode)
        if config.incoming is not None:  # QEMU failed, cancelled or died: not migrated
            raise MountError(
                "swtpm ended before the incoming migration completed; image untouched",
                path=fs.store.path,
            )
        if not config.keep_serving:
            pyfuse3.terminate()
            return


async def _follow(config: SwtpmConfig, fs: StoreFS) -> None:
    """Beside one swtpm run: the incoming migration's hand-over (once), then the follower."""
    if config.incoming is not None:
        await config.incoming(fs)
        config.incoming = None
    if config.follower is not None:
        await config.follower(fs)


async def _wait_swtpm(instance: Swtpm) -> None:
    """Until swtpm exits (one swtpm per QEMU run: ``--terminate`` ends it with QEMU).

    The exit is seen at once through a pidfd, so the image is released, or the next swtpm
    started, as soon as swtpm is gone; without pidfds (kernel < 5.3) every
    :data:`SWTPM_POLL_INTERVAL`.
    """
    try:
        exited = os.pidfd_open(instance.pid)
    except OSError:
        while instance.proc.poll() is None:
            await trio.sleep(SWTPM_POLL_INTERVAL)
        return
    try:
        await trio.lowlevel.wait_readable(exited)
    finally:
        os.close(exited)
    instance.proc.wait()


# Section: detaching


def daemonize(run: Callable[[Callable[[], None]], None], log_file: str | None) -> None:
    """Run ``run(on_ready)`` in a detached daemon; return once it is ready.

    Double fork: the daemon is a grandchild in its own session, so it never becomes a
    zombie of a long-lived caller.  It reports ``ok`` or its one-line error through a pipe;
    that error is raised here (StoreError), as is the silence of a daemon that died.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        os.waitpid(pid, 0)  # the intermediate child exits as soon as it has forked
        with os.fdopen(read_end, "rb") as reader:
            message = reader.readline().decode(errors="replace").strip()
        if message != "ok":
            raise StoreError(message or "mount daemon exited before it was ready")
        return
    os.close(read_end)
    try:
        os.setsid()
        if os.fork():
            os._exit(0)
    except BaseException:
        os._exit(1)
    pipe = _ReadyPipe(write_end)
    code = 0
    try:
        _redirect_stdio(log_file)
        run(pipe.ready)
    except HANDLED as err:
        log.error("%s", err)
        pipe.report(str(err))
        code = 1
    except BaseException as err:
        log.exception("mount daemon failed")
        pipe.report(f"mount daemon failed: {err!r}")
        code = 1
    finally:
        pipe.report("mount daemon exited")
        logging.shutdown()
        os._exit(code)


class _ReadyPipe:
    """The child's end of the readiness pipe: one message ("ok" or an error), then closed."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd

    def report(self, message: str) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.write(self.fd, message.encode() + b"\n")
            os.close(self.fd)
            self.fd = None

    def ready(self) -> None:
        self.report("ok")


def _redirect_stdio(log_file: str | None) -> None:
    null = os.open(os.devnull, os.O_RDWR)
    try:
        out = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600) if log_file else null
    except OSError as err:
        raise StoreError(f"cannot open the log file: {err.strerror}", path=log_file) from None
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)


# Section: unmounting


def _mount_source(mountpoint: str) -> str | None:
    """The source (image path) of our FUSE mount at ``mountpoint``, None if not mounted.

    The plain absolute path is tried before the resolved one: resolving stats the mount
    point, and a FUSE connection whose daemon cannot answer blocks every such request.
    """
    with open("/proc/self/mounts") as mounts:
        entries = [line.split()[:3] for line in mounts]
    for target in dict.fromkeys((os.path.abspath(mountpoint), os.path.realpath(mountpoint))):
        for source, where, fstype in entries:
            where = where.encode().decode("unicode_escape")
            if where == target and fstype.startswith("fuse"):
                return source.encode().decode("unicode_escape")
    return None


def _abort_mount(mountpoint: str) -> None:
    """Abort the FUSE connection at ``mountpoint`` and detach it (``umount -f``, then lazily),
    without a stat of the mount point (it would block on the stuck connection)."""
    libc = ctypes.CDLL(None, use_errno=True)
    path = os.fsencode(os.path.abspath(mountpoint))
    libc.umount2(path, MNT_FORCE)  # aborts the connection: pending requests fail
    libc.umount2(path, MNT_DETACH)


def _wait_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def unmount(mountpoint: str) -> None:
    """Unmount a store's mount and wait until its daemon has exited (MountError if not)."""
    source = _mount_source(mountpoint)
    if source is None:
        raise MountError("not a FUSE mount point", path=mountpoint, errno=errno.EINVAL)
    pid = None
    with contextlib.suppress(OSError, ValueError):
        pid = int(pid_path_for(source).read_text().strip())
    done = subprocess.run(
        ["fusermount3", "-u", mountpoint], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        with ControlClient.for_image(source, timeout=2.0) as client:
            answers = daemon_answers(client)
        if not answers:
            # A daemon killed while the kernel waited on it (a cache invalidation writing
            # pages back) leaves the connection up and the mount busy: abort it, as
            # umount -f does.
            log.warning("%s: the daemon does not answer; aborting its FUSE connection", source)
            _abort_mount(mountpoint)
            if _mount_source(mountpoint) is None:
                done = subprocess.CompletedProcess(done.args, 0)
    if done.returncode != 0:
        reason = done.stderr.strip().splitlines()[-1:] or [f"status {done.returncode}"]
        raise MountError(f"unmount failed: {reason[0]}", path=mountpoint)
    if pid is not None and not _wait_exit(pid, UMOUNT_TIMEOUT):
        raise MountError(
            f"daemon {pid} still running after unmount", path=mountpoint, errno=errno.EBUSY
        )

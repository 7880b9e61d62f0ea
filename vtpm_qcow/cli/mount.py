"""``vtpm-qcow mount``, ``serve`` and ``umount``: the command side of the mount daemon.

The daemon itself (:mod:`vtpm_qcow.export.daemon`) and, for ``serve --qmp``, the snapshot
watcher (:mod:`vtpm_qcow.vm.follow`) are imported by the commands that run them, not by
the parser: every other ``vtpm-qcow`` command starts without trio, pyfuse3 or qemu.qmp.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import grp
import os
import pwd
import sys

from ..export import VIEWS
from .secrets import add_secret_options, add_swtpm_key_option, secret_key, swtpm_state_key

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from ..export.daemon import MountConfig, SwtpmConfig


def _setup_logging(verbose: bool) -> None:
    import logging

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s vtpm-qcow[%(process)d] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def parse_user(text: str) -> int:
    """A user name or numeric id -> uid (argparse type)."""
    try:
        return pwd.getpwnam(text).pw_uid
    except KeyError:
        if text.isdigit():
            return int(text)
        raise argparse.ArgumentTypeError(f"no such user {text!r}") from None


def parse_group(text: str) -> int:
    """A group name or numeric id -> gid (argparse type)."""
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        if text.isdigit():
            return int(text)
        raise argparse.ArgumentTypeError(f"no such group {text!r}") from None


def parse_mode(text: str) -> int:
    """An octal permission mode such as ``0660`` -> int (argparse type)."""
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"invalid mode {text!r} (octal, e.g. 0660)")
    return mode


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--view", choices=VIEWS, default="file", help="file (default) or dir")
    parser.add_argument("--control", metavar="SOCKET", help="control socket path")
    parser.add_argument("--pid-file", metavar="FILE", help="pid file path")
    parser.add_argument("--foreground", "-f", action="store_true", help="do not detach")
    parser.add_argument("--log", metavar="FILE", help="daemon log file (default: none)")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    add_secret_options(parser)


def _defer_unused_imports() -> None:
    """Before the daemon's modules: what trio imports and a daemon never uses is loaded
    only if something uses it (:mod:`vtpm_qcow.export.lean`: OpenSSL, above all)."""
    from ..export.lean import defer

    defer()


def _start(
    args: argparse.Namespace,
    config: MountConfig,
    swtpm: SwtpmConfig | None,
    cleanup: Callable[[], None] = lambda: None,
) -> int:
    """Run the daemon in the foreground or detached; ``cleanup`` when it will not run."""
    from ..export.daemon import daemonize, run_mount
    from ..export.lean import settle

    def run(on_ready: Callable[[], None]) -> None:
        _setup_logging(args.verbose)

        def ready() -> None:
            on_ready()
            settle()

        try:
            run_mount(config, on_ready=ready, swtpm=swtpm)
        finally:
            cleanup()

    if args.foreground:
        run(lambda: None)
        return 0
    try:
        daemonize(run, args.log)
    except BaseException:
        cleanup()
        raise
    return 0


def cmd_mount(args: argparse.Namespace) -> int:
    """``vtpm-qcow mount IMAGE MOUNTPOINT``."""
    _defer_unused_imports()
    from ..export.daemon import MountConfig

    config = MountConfig(
        args.image, args.mountpoint, args.view, args.control, args.pid_file, key=secret_key(args)
    )
    return _start(args, config, None)


def cmd_serve(args: argparse.Namespace) -> int:
    """``vtpm-qcow serve IMAGE --ctrl SOCKET`` (with ``--qmp``: and the snapshot watcher)."""
    _defer_unused_imports()
    from ..export.control import runtime_dir
    from ..export.daemon import CTRL_MODE, MountConfig, SwtpmConfig

    mountpoint = args.mountpoint
    made = False
    if mountpoint is None:
        mountpoint = os.fspath(runtime_dir() / f"mnt-{os.getpid()}")
        os.makedirs(mountpoint, mode=0o700, exist_ok=True)
        made = True
    if args.incoming and not args.qmp:
        from ..errors import StoreError

        raise StoreError(
            "--incoming needs --qmp: the destination QEMU's monitor says when to take over",
            path=args.image,
        )
    key = secret_key(args)
    config = MountConfig(
        args.image,
        mountpoint,
        args.view,
        args.control,
        args.pid_file,
        key=key,
        incoming=args.incoming,
    )
    swtpm = SwtpmConfig(
        ctrl=os.path.abspath(args.ctrl),
        flags=tuple(f for f in (args.swtpm_flags or "").split(",") if f),
        options=tuple(args.swtpm_option or ()),
        tpm2=not args.tpm12,
        keep_serving=args.keep_serving,
        ctrl_owner=args.socket_owner,
        ctrl_group=args.socket_group,
        ctrl_mode=CTRL_MODE if args.socket_mode is None else args.socket_mode,
        state_key=swtpm_state_key(args),
    )
    if args.qmp:
        from ..export.handoff import Handoff
        from ..vm.follow import follow_qmp
        from ..vm.migrate import receive

        qmp = os.path.abspath(args.qmp)
        handoff = Handoff(os.path.abspath(args.image), key, held=not args.incoming)
        swtpm.follower = functools.partial(follow_qmp, qmp, handoff=handoff)
        if args.incoming:
            swtpm.incoming = functools.partial(receive, qmp, handoff)

    def remove_mountpoint() -> None:
        if made:
            with contextlib.suppress(OSError):
                os.rmdir(mountpoint)

    return _start(args, config, swtpm, remove_mountpoint)


def cmd_umount(args: argparse.Namespace) -> int:
    """``vtpm-qcow umount MOUNTPOINT``: unmount and wait until the daemon has exited."""
    from ..export.daemon import unmount

    unmount(args.mountpoint)
    return 0


def add_mount_commands(subparsers: Any) -> None:
    """Register ``mount``, ``serve`` and ``umount`` on the CLI's subparsers.

    Each sets ``func``: called with the parsed arguments, returns the exit status and
    raises an error of :data:`vtpm_qcow.errors.HANDLED` with a one-line message on failure.
    """
    mount = subparsers.add_parser("mount", help="mount a vTPM image (file or dir view)")
    mount.add_argument("image", help="the vTPM qcow2 image")
    mount.add_argument("mountpoint", help="an existing directory")
    _add_common(mount)
    mount.set_defaults(func=cmd_mount)

    serve = subparsers.add_parser(
        "serve",
        help="mount a vTPM image and run swtpm on it for QEMU",
        description="Runs swtpm socket --ctrl type=unixio,path=SOCKET on a private mount of "
        "IMAGE; give QEMU -chardev socket,path=SOCKET.  Exits when swtpm exits (QEMU quit) "
        "unless --keep-serving.  For libvirt's <backend type='external'>, QEMU runs as "
        "libvirt-qemu: --socket-owner libvirt-qemu (or --socket-group and --socket-mode 0660).",
    )
    serve.add_argument("image", help="the vTPM qcow2 image")
    serve.add_argument("--ctrl", required=True, metavar="SOCKET", help="swtpm control socket")
    serve.add_argument(
        "--socket-owner", type=parse_user, metavar="USER", help="owner of the control socket"
    )
    serve.add_argument(
        "--socket-group", type=parse_group, metavar="GROUP", help="group of the control socket"
    )
    serve.add_argument(
        "--socket-mode",
        type=parse_mode,
        metavar="MODE",
        help="mode of the control socket (octal, default 0770)",
    )
    serve.add_argument("--mountpoint", help="where to mount (default: a private directory)")
    serve.add_argument(
        "--keep-serving",
        action="store_true",
        help="restart swtpm as soon as it exits (the socket stays: a QEMU started meanwhile "
        "waits for the new swtpm)",
    )
    serve.add_argument(
        "--qmp",
        metavar="SOCKET",
        help="follow QEMU's savevm/loadvm/delvm on this QMP socket (give QEMU a -qmp of its "
        "own for it) and keep the image's snapshots aligned",
    )
    serve.add_argument(
        "--incoming",
        action="store_true",
        help="the destination of a live migration (QEMU -incoming): serve a private copy "
        "of IMAGE, unlocked, until the --qmp QEMU's incoming migration completed and the "
        "source's daemon let go of IMAGE; then write the migrated state into it "
        "(docs/MIGRATION.md)",
    )
    serve.add_argument("--tpm12", action="store_true", help="run a TPM 1.2 (default TPM 2.0)")
    add_swtpm_key_option(serve)
    serve.add_argument("--swtpm-flags", metavar="F,F", help="swtpm --flags (e.g. startup-clear)")
    serve.add_argument(
        "--swtpm-option", action="append", metavar="ARG", help="extra swtpm argument"
    )
    _add_common(serve)
    serve.set_defaults(func=cmd_serve)

    umount = subparsers.add_parser("umount", help="unmount a vTPM image mount")
    umount.add_argument("mountpoint")
    umount.set_defaults(func=cmd_umount)

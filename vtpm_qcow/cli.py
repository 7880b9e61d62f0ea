"""The ``vtpm-qcow`` command: create, set up, inspect, snapshot, import and export vTPM images.

Every failure is one line on stderr (``vtpm-qcow: IMAGE: what is wrong``) and a non-zero
exit status; tracebacks are for bugs only.  ``mount``/``serve`` come from
:mod:`vtpm_qcow.daemon` and ``vm ...`` from :mod:`vtpm_qcow.vm`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, NoReturn

from qcow2.errors import ImageLockedError, Qcow2Error

from . import backup
from .blob import parse_blob, permall_tpm_version
from .control import ControlClient
from .daemon import add_mount_commands
from .errors import StateFormatError, StoreError, VtpmQcowError
from .store import (
    DEFAULT_CLUSTER_SIZE,
    DEFAULT_SIZE,
    SnapshotInfo,
    Store,
    snapshot_digest,
)
from .swtpm import find_tool, run_setup
from .vm import add_vm_commands

PROG: Final = "vtpm-qcow"
_SIZE_RE: Final = re.compile(r"^(\d+)\s*([kmgt]?)(i?b)?$", re.IGNORECASE)
_UNITS: Final = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}

#: A subcommand: ``set_defaults(func=...)``, called with the parsed arguments (plus
#: ``args.extra``, the options passed through to swtpm_setup), returns the exit status.
Handler = Callable[[argparse.Namespace], int]


def parse_size(text: str) -> int:
    """``4M``, ``4MiB``, ``512k``, ``4194304`` -> bytes (argparse type)."""
    match = _SIZE_RE.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (e.g. 4M, 512K, 4194304)")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def _say(args: argparse.Namespace, message: str) -> None:
    """A progress message on stderr (silenced by --quiet)."""
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr)


def _human(size: int) -> str:
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} bytes"


# Section: create / setup


def cmd_create(args: argparse.Namespace) -> int:
    with Store.create(args.image, size=args.size, cluster_size=args.cluster_size):
        pass
    _say(args, f"Created {args.image}: empty vTPM state image, {_human(args.size)} capacity")
    return 0


def cmd_setup(args: argparse.Namespace) -> int:
    """Run swtpm_setup on a temporary linear file, then import it atomically."""
    options = [option for option in args.extra if option != "--"]
    exists = os.path.exists(args.image)
    if not exists and not args.create:
        raise StoreError(f"{args.image}: no such file (use --create, or 'vtpm-qcow create')")
    find_tool("swtpm_setup")  # fail before any progress output
    find_tool("swtpm")
    # An existing image is opened (and locked) first, so nothing is manufactured in vain.
    store = Store.open(args.image) if exists else None
    try:
        if store is not None and not args.overwrite and _holds_state(store):
            raise StoreError(f"{args.image}: already holds TPM state (use --overwrite)")
        with tempfile.TemporaryDirectory(prefix="vtpm-qcow-setup-") as tmp:
            state = Path(tmp) / "state.lin"
            kind = "TPM 1.2" if args.tpm12 else "TPM 2.0"
            _say(args, f"Manufacturing a {kind} with swtpm_setup")
            run_setup(f"file://{state}", tpm2=not args.tpm12, options=options)
            data = backup.layout_from_file(state)
        if store is None:
            store = Store.create(args.image, size=args.size, cluster_size=args.cluster_size)
        store.replace_layout(data, source="swtpm_setup output")
        sizes = {name: info.size for name, info in store.sections().items()}
    finally:
        if store is not None:
            store.close()
    _say(args, f"Stored the new TPM state in {args.image}: {_sections_text(sizes)}")
    return 0


def _holds_state(store: Store) -> bool:
    """True if the store has sections (or a layout too damaged to tell)."""
    try:
        return bool(store.sections())
    except StateFormatError:
        return True


def _sections_text(sizes: dict[str, int]) -> str:
    return ", ".join(f"{name} {size} bytes" for name, size in sizes.items()) or "no sections"


# Section: import / export


def cmd_import(args: argparse.Namespace) -> int:
    with Store.open(args.image) as store:
        sizes = backup.import_state(store, args.source)
    _say(args, f"Imported {args.source} into {args.image}: {_sections_text(sizes)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    with _open_readonly(args.image) as store:
        as_dir = True if args.dir else None
        tpm2 = False if args.tpm12 else (True if args.tpm2 else None)
        sizes = backup.export_state(store, args.target, as_dir=as_dir, tpm2=tpm2)
    _say(args, f"Exported {args.image} to {args.target}: {_sections_text(sizes)}")
    return 0


def _open_readonly(image: str) -> Store:
    """Open read-only; if a daemon or QEMU holds the image, read it shared (like -U)."""
    try:
        return Store.open(image, writable=False)
    except ImageLockedError:
        return Store.open(image, writable=False, force_share=True)


# Section: snapshots


def cmd_snapshot(args: argparse.Namespace) -> int:
    if args.list:  # reading needs no daemon: a held image is read shared, like info
        with _open_readonly(args.image) as store:
            _print_snapshots([_snapshot_dict(s) for s in store.snapshots()])
        return 0
    try:
        store = Store.open(args.image)
    except ImageLockedError as err:
        return _snapshot_via_daemon(args, err)
    with store:
        if args.create is not None:
            store.create_snapshot(args.create, overwrite=args.overwrite)
            _say(args, f"Created snapshot '{args.create}' of {args.image}")
        elif args.apply is not None:
            store.apply_snapshot(args.apply)
            _say(args, f"Applied snapshot '{args.apply}' to {args.image}")
        else:
            store.delete_snapshot(args.delete)
            _say(args, f"Deleted snapshot '{args.delete}' of {args.image}")
    return 0


def _snapshot_via_daemon(args: argparse.Namespace, locked: ImageLockedError) -> int:
    """The image is held: ask the mount daemon serving it, or explain who holds it."""
    try:
        client = (
            ControlClient(args.control) if args.control else ControlClient.for_image(args.image)
        )
        client.ping()
    except VtpmQcowError:
        raise StoreError(
            f"{args.image}: in use by another process (QEMU or a daemon) and no vtpm-qcow "
            "mount daemon answers for it; stop that process first"
        ) from locked
    with client:
        if args.create is not None:
            client.snapshot_create(args.create, overwrite=args.overwrite)
            _say(args, f"Created snapshot '{args.create}' through the mount daemon")
        elif args.apply is not None:
            client.snapshot_apply(args.apply)
            _say(args, f"Applied snapshot '{args.apply}' through the mount daemon")
        else:
            client.snapshot_delete(args.delete)
            _say(args, f"Deleted snapshot '{args.delete}' through the mount daemon")
    return 0


def _snapshot_dict(snap: SnapshotInfo) -> dict[str, Any]:
    """A snapshot as JSON, with the digest of its whole TPM state."""
    return {
        "tag": snap.tag,
        "id": snap.id,
        "date": snap.date.isoformat(),
        "vm_state_size": snap.vm_state_size,
        "state_digest": snapshot_digest(snap),
        "sections": {n: {"size": s.size, "digest": s.digest} for n, s in snap.sections.items()},
    }


def _print_snapshots(snapshots: list[dict[str, Any]]) -> None:
    """qemu-img snapshot -l style table; the state digest identifies the TPM state."""
    if not snapshots:
        print("No snapshots.")
        return
    print(f"{'ID':<6} {'TAG':<24} {'DATE':<26} STATE DIGEST")
    for s in snapshots:
        print(f"{s['id']:<6} {s['tag']:<24} {s['date']:<26} {s['state_digest']}")


# Section: info


def info_dict(store: Store) -> dict[str, Any]:
    """Everything ``info`` shows, JSON-ready."""
    image = store.image
    sections: dict[str, Any] = {}
    layout_error = None
    try:
        found = store.sections()
    except StateFormatError as err:
        found, layout_error = {}, str(err)
    for name, section in found.items():
        blob = store.read_section(name) or b""
        try:
            blob_info: dict[str, Any] = parse_blob(blob, source=f"{store.path} {name}").to_dict()
        except StateFormatError as err:
            blob_info = {"error": str(err)}
        sections[name] = {
            "offset": section.offset,
            "size": section.size,
            "section_length": section.section_length,
            "digest": section.digest,
            "blob": blob_info,
        }
    snapshots = [_snapshot_dict(snap) for snap in store.snapshots()]
    permall = store.read_section("permall") if layout_error is None else None
    return {
        "image": store.path,
        "virtual_size": store.linear_size,
        "tpm_version": permall_tpm_version(permall) if permall else None,
        "cluster_size": int(image.cluster_size),
        "formatted": bool(found) or layout_error is not None or bool(store.layout()),
        "layout_error": layout_error,
        "state_digest": store.state_digest() if layout_error is None else None,
        "sections": sections,
        "snapshots": snapshots,
    }


def cmd_info(args: argparse.Namespace) -> int:
    with _open_readonly(args.image) as store:
        info = info_dict(store)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"image: {info['image']}")
    print(f"capacity: {_human(info['virtual_size'])}, cluster size {info['cluster_size']}")
    if info["layout_error"]:
        print(f"state: unreadable: {info['layout_error']}")
    elif not info["sections"]:
        print("state: none (not set up yet)")
    else:
        print(f"state digest: {info['state_digest']}")
        print(f"TPM version: {info['tpm_version'] or 'unknown (encrypted state)'}")
    for name, s in info["sections"].items():
        blob = s["blob"]
        header = blob.get("header")
        flags = ",".join(header["flag_names"]) if header else "no blob header"
        enc = "encrypted" if blob.get("encrypted") else "plain"
        print(
            f"  {name:<14} {s['size']:>7} bytes at {s['offset']:>6} "
            f"(section {s['section_length']}) {enc} [{flags or '-'}] xxh3 {s['digest']}"
        )
    print(f"snapshots: {len(info['snapshots'])}")
    for snap in info["snapshots"]:
        print(f"  {snap['id']:<4} {snap['tag']:<24} {snap['date']}  state {snap['state_digest']}")
    return 0


# Section: parser


def _add_hooks(subparsers: Any) -> None:
    """The daemon's ``mount``/``serve``/``umount`` and the QMP alignment's ``vm`` commands."""
    add_mount_commands(subparsers)
    add_vm_commands(subparsers)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``vtpm-qcow create: error: ... (see --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``vtpm-qcow`` argument parser."""
    parser = _Parser(
        prog=PROG,
        description="Keep a virtual TPM's state (swtpm) in a qcow2 image whose internal "
        "snapshots follow the VM's snapshots.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def image_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("image", metavar="IMAGE", help="the vTPM state image (qcow2)")

    def size_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--size",
            type=parse_size,
            default=DEFAULT_SIZE,
            help=f"capacity of the state file (default {_human(DEFAULT_SIZE)})",
        )
        p.add_argument(
            "--cluster-size",
            type=parse_size,
            default=DEFAULT_CLUSTER_SIZE,
            help=f"qcow2 cluster size (default {DEFAULT_CLUSTER_SIZE})",
        )

    p = sub.add_parser("create", help="create an empty vTPM state image")
    image_arg(p)
    size_args(p)
    p.set_defaults(func=cmd_create)

    p = sub.add_parser(
        "setup",
        help="manufacture a TPM into the image with swtpm_setup",
        description="Run swtpm_setup and store the new TPM state in IMAGE. Options this "
        "command does not know are passed to swtpm_setup, e.g. --create-ek-cert "
        "--create-platform-cert --pcr-banks sha256 (give them after IMAGE).",
    )
    image_arg(p)
    p.add_argument("--create", action="store_true", help="create IMAGE if it does not exist")
    p.add_argument("--overwrite", action="store_true", help="replace existing TPM state")
    p.add_argument("--tpm12", action="store_true", help="a TPM 1.2 (default: TPM 2.0)")
    size_args(p)
    p.set_defaults(func=cmd_setup, passthrough=True)

    p = sub.add_parser(
        "snapshot",
        help="list, create, apply or delete snapshots of the TPM state",
        description="Like 'qemu-img snapshot'. If a vtpm-qcow mount daemon holds IMAGE, "
        "the request goes through its control socket.",
    )
    image_arg(p)
    action = p.add_mutually_exclusive_group(required=True)
    action.add_argument("-l", "--list", action="store_true", help="list snapshots")
    action.add_argument("-c", "--create", metavar="TAG", help="create snapshot TAG")
    action.add_argument("-a", "--apply", metavar="TAG", help="revert the state to snapshot TAG")
    action.add_argument("-d", "--delete", metavar="TAG", help="delete snapshot TAG")
    p.add_argument("--overwrite", action="store_true", help="with -c: replace an existing TAG")
    p.add_argument(
        "--control",
        metavar="SOCKET",
        help="the mount daemon's control socket, if it was given one (vtpm-qcow mount "
        "--control); by default the daemon serving IMAGE is found by the image's path",
    )
    p.set_defaults(func=cmd_snapshot)

    p = sub.add_parser("info", help="show state sections, blob headers, digests and snapshots")
    image_arg(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "import",
        help="replace the image's state with plain swtpm state (a dir or a linear file)",
    )
    image_arg(p)
    p.add_argument(
        "source", metavar="DIR|FILE", help="swtpm state dir (tpm2-00.permall...) or linear file"
    )
    p.set_defaults(func=cmd_import)

    p = sub.add_parser(
        "export",
        help="write the image's state as plain swtpm state (a dir or a linear file)",
        description="An existing directory (or a path ending in /) receives dir backend "
        "files (tpm2-00.permall, ...); any other path receives a linear file for "
        "swtpm --tpmstate backend-uri=file://PATH. Dir file names follow the TPM version "
        "read from the state (tpm2-00.* unless it is a TPM 1.2; encrypted: tpm2-00.*).",
    )
    image_arg(p)
    p.add_argument("target", metavar="DIR|FILE")
    p.add_argument(
        "--dir", action="store_true", help="write a directory even if TARGET does not exist"
    )
    names = p.add_mutually_exclusive_group()
    names.add_argument("--tpm12", action="store_true", help="name dir files tpm-00.* (TPM 1.2)")
    names.add_argument("--tpm2", action="store_true", help="name dir files tpm2-00.* (TPM 2.0)")
    p.set_defaults(func=cmd_export)

    _add_hooks(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the command, print errors as one line, return the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    func: Handler = args.func
    try:
        return int(func(args))
    except (VtpmQcowError, Qcow2Error) as err:
        print(f"{PROG}: {err}", file=sys.stderr)
    except OSError as err:
        where = f"{err.filename}: " if err.filename else ""
        print(f"{PROG}: {where}{err.strerror or err}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 1


__all__ = ["build_parser", "main", "parse_size"]

"""The ``vtpm-qcow`` command: create, set up, inspect, check, snapshot, import, export, back
up, verify and restore vTPM images.

Every failure is one line on stderr (``vtpm-qcow: IMAGE: what is wrong``) and a non-zero
exit status; tracebacks are for bugs only.  ``mount``/``serve``/``umount`` come from
:mod:`vtpm_qcow.cli.mount` and ``vm ...`` from :mod:`vtpm_qcow.cli.vm`.
"""

from __future__ import annotations

import os
import sys

from qcow2.errors import ImageLockedError

from ..errors import HANDLED, SecretError, StateFormatError, StoreError
from ..state.blob import parse_blob, permall_tpm_version
from ..state.secret import OPTIONS_HINT, staging_dir
from ..state.store import (
    DEFAULT_CLUSTER_SIZE,
    DEFAULT_ITER_TIME,
    DEFAULT_SIZE,
    SnapshotInfo,
    Store,
    snapshot_digest,
    utc_time,
)
from .output import print_json
from .secrets import (
    add_new_secret_options,
    add_secret_options,
    add_swtpm_key_option,
    new_secret_key,
    secret_key,
    swtpm_state_key,
)

# Start-up: ``info`` and ``snapshot -l`` (which hooks and scripts run often) take a fast
# path without argparse (:func:`_read_only`), so what this module imports at run time
# stays cheap: argparse, re, pathlib, typing and the other subcommands' modules are
# imported by the functions that use them (tests/vtpm/test_cli_startup.py).
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Sequence
    from typing import Any, Final, TypeAlias

    from ..backup.archive import Progress
    from ..export.control import ControlClient

    #: A subcommand: ``set_defaults(func=...)``, called with the parsed arguments (plus
    #: ``args.extra``, the options passed through to swtpm_setup), returns the exit status.
    Handler: TypeAlias = Callable[[argparse.Namespace], int]

PROG: Final = "vtpm-qcow"
_SIZE_PATTERN: Final = r"^(\d+)\s*([kmgt]?)(i?b)?$"
_UNITS: Final = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
#: Seconds between two looks at an image lock (vtpm-qcow wait).
WAIT_POLL_INTERVAL: Final = 0.01


def parse_size(text: str) -> int:
    """``4M``, ``4MiB``, ``512k``, ``4194304`` -> bytes (argparse type)."""
    import argparse
    import re

    match = re.match(_SIZE_PATTERN, text.strip(), re.IGNORECASE)
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


def _new_key(args: argparse.Namespace) -> bytes | None:
    """The key a new image is encrypted with: the secret, with --encrypt only."""
    key = secret_key(args)
    if args.encrypt and key is None:
        raise SecretError(f"--encrypt needs the passphrase: give {OPTIONS_HINT}")
    if key is not None and not args.encrypt:
        if getattr(args, "swtpm_key", False):
            return None  # the secret is swtpm's, the image stays plain
        raise SecretError("a secret was given for a new image without --encrypt")
    return key


def _create_store(args: argparse.Namespace) -> Store:
    return Store.create(
        args.image,
        size=args.size,
        cluster_size=args.cluster_size,
        key=_new_key(args),
        iter_time=args.iter_time,
    )


def cmd_create(args: argparse.Namespace) -> int:
    with _create_store(args):
        pass
    what = "LUKS-encrypted" if args.encrypt else "empty"
    _say(args, f"Created {args.image}: {what} vTPM state image, {_human(args.size)} capacity")
    return 0


def cmd_setup(args: argparse.Namespace) -> int:
    """Run swtpm_setup on a temporary linear file, then import it atomically."""
    import tempfile
    from pathlib import Path

    from ..backup import plainstate
    from ..tpm.swtpm import find_tool, run_setup

    options = [option for option in args.extra if option != "--"]
    exists = os.path.exists(args.image)
    if not exists and not args.create:
        raise StoreError("no such file (use --create, or 'vtpm-qcow create')", path=args.image)
    find_tool("swtpm_setup")  # fail before any progress output
    find_tool("swtpm")
    # An existing image is opened (and locked) first, so nothing is manufactured in vain.
    if not exists:
        _new_key(args)  # refused before swtpm_setup runs
    store = _open_writable(args.image, "setup", secret_key(args)) if exists else None
    try:
        if store is not None and not args.overwrite and _holds_state(store):
            raise StoreError("already holds TPM state (use --overwrite)", path=args.image)
        with tempfile.TemporaryDirectory(prefix="vtpm-qcow-setup-", dir=staging_dir()) as tmp:
            state = Path(tmp) / "state.lin"
            kind = "TPM 1.2" if args.tpm12 else "TPM 2.0"
            _say(args, f"Manufacturing a {kind} with swtpm_setup")
            run_setup(
                f"file://{state}",
                tpm2=not args.tpm12,
                options=options,
                ca_dir=args.ca_dir,
                state_key=swtpm_state_key(args),
            )
            data = plainstate.layout_from_file(state)
        if store is None:
            store = _create_store(args)
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


def _open_writable(image: str, what: str, key: bytes | None) -> Store:
    """Open for writing; if the image is held, a one-line error saying by whom."""
    try:
        return Store.open(image, key=key)
    except ImageLockedError as err:
        from ..export.control import held_image_error

        raise held_image_error(image, what) from err


def cmd_import(args: argparse.Namespace) -> int:
    from ..backup import plainstate

    if args.overwrite and args.snapshot is None:
        raise StoreError("--overwrite replaces a snapshot: it goes with --snapshot TAG")
    with _open_writable(args.image, "an import", secret_key(args)) as store:
        sizes = plainstate.import_state(
            store, args.source, snapshot=args.snapshot, overwrite=args.overwrite
        )
        permall = store.read_section("permall")
    where = f"snapshot '{args.snapshot}' of {args.image}" if args.snapshot else args.image
    _say(args, f"Imported {args.source} into {where}: {_sections_text(sizes)}")
    if permall and _swtpm_encrypted(permall, args.source):
        _say(
            args,
            "The state is encrypted with swtpm's own key (libvirt's <encryption>): serve, "
            f"setup and check it with --swtpm-key and that secret ({OPTIONS_HINT})",
        )
    return 0


def _swtpm_encrypted(permall: bytes, source: str) -> bool:
    try:
        return parse_blob(permall, source=source).encrypted
    except StateFormatError:
        return False


def cmd_export(args: argparse.Namespace) -> int:
    """A consistent read (through the mount daemon if one holds the image), then write."""
    from ..backup import archive, plainstate

    taken = archive.capture_image(
        args.image, tag=args.snapshot, snapshots=False, control=args.control,
        key=secret_key(args),
    )  # fmt: skip
    as_dir = True if args.dir else None
    tpm2 = False if args.tpm12 else (True if args.tpm2 else None)
    sizes = plainstate.export_layout(
        taken.layout, args.target, source=args.image, as_dir=as_dir, tpm2=tpm2,
        raw_size=args.size,
    )  # fmt: skip
    _say(args, f"Exported {args.image} to {args.target}: {_sections_text(sizes)}")
    return 0


# Section: backup / verify / restore


def _progress(args: argparse.Namespace) -> Progress:
    """Progress on stderr when it is a terminal (and not --quiet); else silent."""
    if getattr(args, "quiet", False) or not sys.stderr.isatty():
        return lambda done, total, what: None

    def show(done: int, total: int, what: str) -> None:
        end = "\n" if done >= total else ""
        print(f"\r\033[K{PROG}: [{done}/{total}] {what}", end=end, file=sys.stderr, flush=True)

    return show


def cmd_backup(args: argparse.Namespace) -> int:
    from ..backup import archive

    key = secret_key(args)
    encrypted = Store.is_encrypted(args.image)
    if encrypted and key is None:  # a daemon would hand over the state: encrypt it again
        raise StoreError(
            f"is LUKS-encrypted: its backup is encrypted with its secret ({OPTIONS_HINT})",
            path=args.image,
        )
    taken = archive.capture_image(
        args.image,
        tag=args.snapshot,
        snapshots=args.format == "qcow2",
        control=args.control,
        key=key,
    )
    manifest = archive.write_backup(
        taken,
        args.dest,
        fmt=args.format,
        overwrite=args.overwrite,
        progress=_progress(args),
        key=key if encrypted else None,
    )
    if args.json:
        print_json(manifest)
    snaps = len(manifest["snapshots"])
    what = f"state {manifest['state']['state_digest']}" + (f", {snaps} snapshots" if snaps else "")
    _say(args, f"Backed up {args.image} to {args.dest} ({args.format}, {what})")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from ..backup import archive

    found = archive.verify_backup(args.backup, key=secret_key(args))
    if args.json:
        print_json(found.to_dict())
    for problem in found.problems:
        print(f"{PROG}: {problem}", file=sys.stderr)
    for note in found.notes:
        print(f"{PROG}: note: {note}", file=sys.stderr)
    if found.ok:
        _say(args, f"{args.backup}: {found.format} backup OK ({len(found.checked)} checks)")
        return 0
    return 1


def cmd_restore(args: argparse.Namespace) -> int:
    from ..backup import archive

    result = archive.restore_backup(
        args.backup, args.image, snapshot=args.snapshot, key=secret_key(args)
    )
    if args.json:
        print_json(result)
    sizes = {name: s["size"] for name, s in result["sections"].items()}
    _say(args, f"Restored {args.backup} into {args.image}: {_sections_text(sizes)}")
    return 0


def _open_readonly(image: str, key: bytes | None, *, require_key: bool = True) -> Store:
    """Open read-only; if a daemon or QEMU holds the image, read it shared (like -U)."""
    try:
        return Store.open(image, writable=False, key=key, require_key=require_key)
    except ImageLockedError:
        return Store.open(image, writable=False, force_share=True, key=key, require_key=require_key)


# Section: snapshots


#: snapshot change -> (past tense for the message, Store method, ControlClient method)
_SNAPSHOT_CHANGES: Final = {
    "create": ("Created", "create_snapshot", "snapshot_create"),
    "apply": ("Applied", "apply_snapshot", "snapshot_apply"),
    "delete": ("Deleted", "delete_snapshot", "snapshot_delete"),
}


def cmd_snapshot(args: argparse.Namespace) -> int:
    if args.list:
        return _list_snapshots(args.image, secret_key(args), args.json)
    action = next(name for name in _SNAPSHOT_CHANGES if getattr(args, name) is not None)
    tag: str = getattr(args, action)
    past, store_method, client_method = _SNAPSHOT_CHANGES[action]
    kwargs = {"overwrite": args.overwrite} if action == "create" else {}
    try:
        store = Store.open(args.image, key=secret_key(args))
    except ImageLockedError as err:
        with _daemon_for(args.image, args.control, err) as client:
            getattr(client, client_method)(tag, **kwargs)
        _say(args, f"{past} snapshot '{tag}' of {args.image} through the mount daemon")
        return 0
    with store:
        getattr(store, store_method)(tag, **kwargs)
    _say(args, f"{past} snapshot '{tag}' of {args.image}")
    return 0


def _list_snapshots(image: str, key: bytes | None, as_json: bool) -> int:
    """``snapshot -l``: reading needs no daemon, a held image is read shared, like info."""
    with _open_readonly(image, key) as store:
        snapshots = [_snapshot_dict(s) for s in store.snapshots()]
    if as_json:
        print_json(snapshots)
    else:
        _print_snapshots(snapshots)
    return 0


def _daemon_for(image: str, control: str | None, locked: ImageLockedError) -> ControlClient:
    """The mount daemon holding ``image``; if none answers, explain who holds the image."""
    from ..export.control import ControlClient, daemon_answers, held_image_error

    client = ControlClient(control) if control else ControlClient.for_image(image)
    if control:
        client.ping()  # the user named a daemon: its own error if it does not answer
    elif not daemon_answers(client):
        raise held_image_error(image, "a snapshot change") from locked
    return client


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


def _encryption_text(encryption: dict[str, Any]) -> str:
    """One line on a LUKS header: ``LUKS (aes-256 xts, sha256), key slots 0``."""
    if encryption.get("format") != "luks":
        return str(encryption.get("format", "unknown"))
    slots = [str(i) for i, slot in enumerate(encryption.get("slots", ())) if slot.get("active")]
    return (
        f"LUKS ({encryption.get('cipher-alg')} {encryption.get('cipher-mode')}-"
        f"{encryption.get('ivgen-alg')}, {encryption.get('hash-alg')}), "
        f"key slots {', '.join(slots) or 'none'}"
    )


def _encrypted_layers(store: Store, sections: dict[str, Any]) -> list[str]:
    """Which encryption layers the image and its state blobs show: the qcow2 image's LUKS,
    swtpm's state key (``--key``), swtpm's migration key (``--migration-key``)."""
    layers = ["qcow2 LUKS"] if store.encrypted else []
    flags = set()
    for section in sections.values():
        header = section["blob"].get("header") or {}
        flags.update(header.get("flag_names", ()))
    if "encrypted" in flags:
        layers.append("swtpm state key")
    if "migration-encrypted" in flags:
        layers.append("swtpm migration key")
    return layers


def locked_info_dict(store: Store) -> dict[str, Any]:
    """What ``info`` shows of an encrypted image without its key: the header only."""
    return {
        "image": store.path,
        "virtual_size": store.linear_size,
        "cluster_size": int(store.image.cluster_size),
        "encryption": store.encryption(),
        "encrypted_layers": ["qcow2 LUKS"],
        "locked": True,
        "snapshots": [
            {
                "tag": s.name,
                "id": s.id,
                "date": utc_time(s.date_sec).isoformat(),
                "vm_state_size": s.vm_state_size,
            }
            for s in store.image.snapshots
        ],
    }


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
    problem = layout_error
    if problem is None:
        from ..state.probe import layout_problem  # swtpm's own structural checks, no swtpm run

        problem = layout_problem(store.layout(), source=store.path)
    return {
        "image": store.path,
        "virtual_size": store.linear_size,
        "tpm_version": permall_tpm_version(permall) if permall else None,
        "cluster_size": int(image.cluster_size),
        "encryption": store.encryption(),
        "locked": False,
        "encrypted_layers": _encrypted_layers(store, sections),
        "formatted": bool(found) or layout_error is not None or bool(store.layout()),
        "layout_error": layout_error,
        "state_digest": store.state_digest() if layout_error is None else None,
        "loadable": problem is None,
        "problem": problem,
        "sections": sections,
        "snapshots": snapshots,
    }


def _without_path(message: str, path: str) -> str:
    """``message`` without its leading ``PATH: `` (the image is named on its own line)."""
    return message.removeprefix(f"{path}: ")


def cmd_info(args: argparse.Namespace) -> int:
    return _show_info(args.image, secret_key(args), args.json)


def _show_info(image: str, key: bytes | None, as_json: bool) -> int:
    """``info``: what :func:`info_dict` finds (the header only without an image's key)."""
    with _open_readonly(image, key, require_key=False) as store:
        info = locked_info_dict(store) if store.encrypted and key is None else info_dict(store)
    if as_json:
        print_json(info)
        return 0
    print(f"image: {info['image']}")
    print(f"capacity: {_human(info['virtual_size'])}, cluster size {info['cluster_size']}")
    if info["encryption"]:
        print(f"encryption: {_encryption_text(info['encryption'])}")
    if info["encrypted_layers"]:
        print(f"encrypted layers: {', '.join(info['encrypted_layers'])}")
    if info["locked"]:
        print(f"state: LUKS-encrypted (give {OPTIONS_HINT} to read it)")
        print(f"snapshots: {len(info['snapshots'])}")
        for snap in info["snapshots"]:
            print(f"  {snap['id']:<4} {snap['tag']:<24} {snap['date']}")
        return 0
    if info["layout_error"]:
        print(f"state: unreadable: {info['layout_error']}")
    elif not info["sections"]:
        print("state: none (not set up yet)")
    elif info["problem"]:
        print(f"state: not loadable: {_without_path(info['problem'], info['image'])}")
        print(f"TPM version: {info['tpm_version'] or 'unknown (encrypted state)'}")
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


# Section: check


def _open_for_check(args: argparse.Namespace) -> Store:
    """Writable for --repair (refused on a held image, naming the holder); else read-only,
    shared only with -U (like qemu-img check)."""
    if args.repair:
        if args.force_share:
            raise StoreError(
                "-U reads an image another process may change; --repair "
                "needs it to itself (stop swtpm/QEMU/the mount daemon, drop -U)",
                path=args.image,
            )
        if args.no_load:
            raise StoreError(
                "--repair restores only a state a real swtpm loads; drop --no-load",
                path=args.image,
            )
        if args.swtpm_key:
            raise StoreError(
                "--repair cannot tell a wrong --swtpm-key from a damaged state; check "
                "without --repair",
                path=args.image,
            )
        return _open_writable(args.image, "a repair", secret_key(args))
    try:
        return Store.open(
            args.image, writable=False, force_share=args.force_share, key=secret_key(args)
        )
    except ImageLockedError as err:
        raise StoreError(
            "in use by another process (swtpm/QEMU/a mount daemon); "
            "check it read-only with -U (a state caught mid-update may look torn)",
            path=args.image,
        ) from err


def cmd_rekey(args: argparse.Namespace) -> int:
    """Add or erase LUKS key slots of an encrypted image (qemu-img amend's encrypt.state)."""
    key = secret_key(args)
    if key is None:
        raise SecretError(f"rekey needs the image's current passphrase: give {OPTIONS_HINT}")
    new_key = new_secret_key(args)
    if args.add and new_key is None:
        raise SecretError(
            "--add needs the new passphrase: give --new-secret-file, --new-secret-fd, "
            "--new-secret-keyring or --new-secret-credential"
        )
    if not args.add and (new_key is not None or args.keyslot is not None):
        raise SecretError("a new passphrase and --keyslot go with --add only")
    with _open_writable(args.image, "a rekey", key) as store:
        if args.add:
            slot = store.add_key(
                key, new_key or b"", keyslot=args.keyslot, iter_time=args.iter_time
            )
            _say(args, f"Added key slot {slot} to {args.image}")
        else:
            if args.remove:
                slots = store.erase_keys(old_key=key)
            else:
                slots = store.erase_keys(keyslot=args.remove_keyslot)
            _say(args, f"Erased key slot {', '.join(map(str, slots))} of {args.image}")
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    """Wait until no process holds IMAGE for writing (qemu-img may then open it)."""
    import time

    from qcow2.io.lock import writer_would_lock

    deadline = time.monotonic() + args.timeout
    with open(args.image, "rb") as f:
        while not writer_would_lock(f.fileno(), args.image):
            if time.monotonic() >= deadline:
                print(
                    f"{PROG}: {args.image}: still in use after {args.timeout:g}s "
                    "(a mount daemon, swtpm or QEMU holds its write lock)",
                    file=sys.stderr,
                )
                return 1
            time.sleep(WAIT_POLL_INTERVAL)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Check the image and its current state; with --repair, restore a loadable one."""
    from ..state import checkup

    with _open_for_check(args) as store:
        report = checkup.check_store(store, load=not args.no_load, state_key=swtpm_state_key(args))
        if args.force_share:
            report.add("note", "note", "read shared (-U): a state caught mid-update may look torn")
        status = report.exit_status
        repair: dict[str, Any] | None = None
        if args.repair:
            repair, status = checkup.repair(store, report)
    if args.json:
        print_json({**report.to_dict(), "repair": repair, "exit_status": status})
    else:
        print(f"image: {args.image}")
        for finding in report.findings:
            print(finding.line)
    return status


# Section: parser

#: Examples shown under each command's --help (mount/serve/umount/vm are registered by
#: :mod:`vtpm_qcow.cli.mount` and :mod:`vtpm_qcow.cli.vm`; their examples are added here).
EXAMPLES: Final = {
    "create": """examples:
  vtpm-qcow create vm1-tpm.qcow2              # 4 MiB, like Proxmox VE's tpmstate0
  qemu-img info vm1-tpm.qcow2                 # a plain qcow2 image to QEMU's tools""",
    "setup": """examples:
  vtpm-qcow setup --create vm1-tpm.qcow2 --create-ek-cert --create-platform-cert
  vtpm-qcow setup --overwrite vm1-tpm.qcow2 --pcr-banks sha256""",
    "rekey": """examples:
  vtpm-qcow rekey --add --secret-file old.key --new-secret-file new.key vm1-tpm.qcow2
  vtpm-qcow rekey --remove --secret-file old.key vm1-tpm.qcow2      # new.key must open it
  vtpm-qcow rekey --remove-keyslot 0 --secret-file new.key vm1-tpm.qcow2""",
    "wait": """examples:
  vtpm-qcow wait vm1-tpm.qcow2 && qemu-img snapshot -l vm1-tpm.qcow2   # after virsh destroy
  vtpm-qcow wait --timeout 5 vm1-tpm.qcow2 || echo "still in use\"""",
    "snapshot": """examples:
  vtpm-qcow snapshot -l vm1-tpm.qcow2                 # also while swtpm runs on it
  vtpm-qcow snapshot -c before-update vm1-tpm.qcow2   # via the mount daemon if mounted
  vtpm-qcow snapshot -a before-update vm1-tpm.qcow2
  qemu-img snapshot -l -U vm1-tpm.qcow2               # the same tags, seen by QEMU""",
    "info": """examples:
  vtpm-qcow info vm1-tpm.qcow2
  vtpm-qcow info --json vm1-tpm.qcow2 | jq .state_digest""",
    "check": """exit status:
  0  the image is sound and the state loads (or there is no state yet, or --repair
     restored a state swtpm loads)
  1  the check could not run (no such file, image held without -U, bad arguments...)
  2  swtpm would refuse the current state (with --repair: and no earlier state loads)
  3  the qcow2 metadata is damaged (corruptions, as 'qemu-img check' counts them)

examples:
  vtpm-qcow check vm1-tpm.qcow2                  # qcow2 + swtpm's checks + a dry load
  vtpm-qcow check -U --no-load vm1-tpm.qcow2     # while QEMU runs, without starting swtpm
  vtpm-qcow check --repair vm1-tpm.qcow2         # stop QEMU/swtpm first
  vtpm-qcow backup --format raw --snapshot unloadable-20250101T120000Z \\
      vm1-tpm.qcow2 refused.lin                  # the state a repair set aside""",
    "import": """examples:
  vtpm-qcow import vm1-tpm.qcow2 /var/lib/swtpm/vm1/     # swtpm --tpmstate dir=... files
  vtpm-qcow import vm1-tpm.qcow2 tpmstate.lin            # backend-uri=file:// file
  vtpm-qcow import vm1-tpm.qcow2 /dev/pve/vm-100-disk-1  # a Proxmox VE tpmstate0 volume
  vtpm-qcow import --snapshot before-update vm1-tpm.qcow2 \\
      /dev/zvol/rpool/data/vm-100-disk-1@before-update   # a volume's snapshot, as TAG""",
    "export": """examples:
  vtpm-qcow export vm1-tpm.qcow2 /tmp/vm1-state/         # then swtpm --tpmstate dir=...
  vtpm-qcow export vm1-tpm.qcow2 vm1.lin                 # swtpm backend-uri=file://vm1.lin
  vtpm-qcow export --size 4M vm1-tpm.qcow2 vm-100-disk-1.raw   # a Proxmox VE tpmstate0
  vtpm-qcow export vm1-tpm.qcow2 /dev/pve/vm-100-disk-1        # written in place (VM stopped)
  vtpm-qcow export --snapshot before-update vm1-tpm.qcow2 before-update.lin""",
    "backup": """examples:
  vtpm-qcow backup vm1-tpm.qcow2 /backup/vm1-tpm.qcow2           # image + all snapshots
  vtpm-qcow backup --format raw vm1-tpm.qcow2 /backup/vm1.lin    # swtpm linear file
  vtpm-qcow backup --format dir --snapshot before-update vm1-tpm.qcow2 /backup/vm1-dir
  vtpm-qcow verify /backup/vm1-tpm.qcow2""",
    "verify": """examples:
  vtpm-qcow verify /backup/vm1-tpm.qcow2
  vtpm-qcow verify --json /backup/vm1.lin""",
    "restore": """examples:
  vtpm-qcow restore /backup/vm1-tpm.qcow2 vm1-tpm.qcow2          # state only, keeps snapshots
  vtpm-qcow restore /backup/vm1-tpm.qcow2 new-tpm.qcow2          # new image: full copy
  vtpm-qcow restore --snapshot before-update /backup/vm1-tpm.qcow2 vm1-tpm.qcow2""",
    "mount": """The file view holds one file, tpmstate (swtpm --tpmstate backend-uri=file://MNT/tpmstate);
the dir view holds tpm2-00.permall etc. (swtpm --tpmstate dir=MNT, libvirt).  Every write
swtpm makes is one atomic commit to IMAGE; snapshots go through the control socket.

examples:
  vtpm-qcow mount vm1-tpm.qcow2 /run/vm1-tpm --view dir
  swtpm socket --tpm2 --tpmstate dir=/run/vm1-tpm --ctrl type=unixio,path=/run/vm1-swtpm.sock
  vtpm-qcow umount /run/vm1-tpm""",
    "serve": """examples:
  vtpm-qcow serve vm1-tpm.qcow2 --ctrl /run/vm1-swtpm.sock &
  qemu-system-x86_64 ... -chardev socket,id=chrtpm,path=/run/vm1-swtpm.sock \\
      -tpmdev emulator,id=tpm0,chardev=chrtpm -device tpm-tis,tpmdev=tpm0
  # live migration's destination (docs/MIGRATION.md), beside QEMU -incoming:
  vtpm-qcow serve vm1-tpm.qcow2 --incoming --ctrl /run/vm1-swtpm.sock --qmp /run/vm1-watch.qmp""",
    "umount": """Stops the mount daemon serving MOUNTPOINT (it commits and unmounts first).

examples:
  vtpm-qcow umount /run/vm1-tpm""",
    "vm": """QEMU needs a QMP socket (-qmp unix:/run/vm1.qmp,server=on,wait=off) and the vTPM image
mounted by 'vtpm-qcow serve' (or 'mount'); its disks get the same snapshot tags.

examples:
  vtpm-qcow vm save --qmp /run/vm1.qmp --store vm1-tpm.qcow2 before-update
  vtpm-qcow vm load --qmp /run/vm1.qmp --store vm1-tpm.qcow2 before-update
  vtpm-qcow vm status --qmp /run/vm1.qmp --store vm1-tpm.qcow2""",
    "vm save": """Like QEMU's savevm (snapshot-save job), with the vTPM image snapshotted as TAG
while the VM is paused, so the TPM state matches the disks and RAM of the snapshot.

examples:
  vtpm-qcow vm save --qmp /run/vm1.qmp --store vm1-tpm.qcow2 before-update
  vtpm-qcow vm save --force --qmp /run/vm1.qmp --store vm1-tpm.qcow2 nightly""",
    "vm load": """Like QEMU's loadvm (snapshot-load job): the vTPM image is reverted to TAG too,
while the VM is paused; swtpm reads the reverted state when the VM resumes.

examples:
  vtpm-qcow vm load --qmp /run/vm1.qmp --store vm1-tpm.qcow2 before-update""",
    "vm delete": """Like QEMU's delvm (snapshot-delete job), on the disks and the vTPM image.

examples:
  vtpm-qcow vm delete --qmp /run/vm1.qmp --store vm1-tpm.qcow2 before-update""",
    "libvirt": """examples:
  vtpm-qcow libvirt follow vm1 --image /var/lib/vtpm/vm1-tpm.qcow2""",
    "libvirt install": """examples:
  vtpm-qcow libvirt install && systemctl restart libvirtd""",
    "libvirt enable": """examples:
  vtpm-qcow libvirt enable vm1 --image /var/lib/vtpm/vm1-tpm.qcow2
  virsh start vm1 && virsh snapshot-create-as vm1 before-update   # the TPM follows""",
    "libvirt disable": """examples:
  vtpm-qcow libvirt disable vm1""",
    "libvirt status": """examples:
  vtpm-qcow libvirt status
  vtpm-qcow libvirt status vm1 --json""",
    "libvirt hook": """examples:
  vtpm-qcow libvirt hook vm1 prepare begin - < vm1.xml   # what libvirtd runs""",
    "libvirt follow": """examples:
  vtpm-qcow libvirt follow vm1                          # the image recorded by 'libvirt enable'
  vtpm-qcow libvirt follow vm1 --image vm1-tpm.qcow2 -c qemu:///system""",
    "vm list": """examples:
  vtpm-qcow vm list --qmp /run/vm1.qmp --store vm1-tpm.qcow2""",
    "vm status": """Exit status 0 when the disks' and the vTPM image's tags agree,
3 when they do not.

examples:
  vtpm-qcow vm status --qmp /run/vm1.qmp --store vm1-tpm.qcow2""",
    "vm watch": """For snapshots taken by others (libvirt, virsh snapshot-create,
QEMU's HMP savevm).

examples:
  vtpm-qcow vm watch --qmp /run/vm1-watch.qmp --store vm1-tpm.qcow2 &""",
    "vm verify": """results per tag:
  match         the VM state's permanent TPM blob is the vTPM snapshot's permall
  MISMATCH      it is not (the blob that differs is named)
  MISSING-DISK  the tag is on the vTPM image only
  MISSING-VTPM  the tag is on the disks only
  no-vmstate    a disk-only snapshot (no VM state): nothing to compare
  UNREADABLE    the VM state holds no readable TPM state (the reason is given)

exit status:
  0  every tag matches (or has no VM state)
  1  a tag mismatches, is missing on one side or is unreadable
  2  the check could not run (bad arguments, an image that does not open, held without -U)

examples:
  vtpm-qcow vm verify --disk vm1.qcow2 vm1-tpm.qcow2
  vtpm-qcow vm verify -U --json --disk vm1.qcow2 --disk data.qcow2 vm1-tpm.qcow2""",
}


#: Help for arguments other modules register without any (by command, then dest).
ARGUMENT_HELP: Final = {
    "umount": {"mountpoint": "where 'vtpm-qcow mount' mounted the image"},
}


def _add_hooks(subparsers: Any) -> None:
    """The daemon's ``mount``/``serve``/``umount`` and the QMP alignment's ``vm`` commands."""
    from .adopt import add_adopt_commands
    from .libvirt import add_libvirt_commands
    from .migrate import add_migrate_commands
    from .mount import add_mount_commands
    from .vm import add_vm_commands

    add_mount_commands(subparsers)
    add_vm_commands(subparsers)
    add_libvirt_commands(subparsers)
    add_adopt_commands(subparsers)
    add_migrate_commands(subparsers)


def _finish_help(subparsers: Any, prefix: str = "") -> None:
    """Examples, raw formatting and one-line errors for every (nested) subcommand."""
    import argparse

    from .parsing import HelpFormatter, Parser

    for name, sub in subparsers.choices.items():
        sub.formatter_class = HelpFormatter
        sub.error = Parser.error.__get__(sub)
        if prefix + name in EXAMPLES and not sub.epilog:
            sub.epilog = EXAMPLES[prefix + name]
        for action in sub._actions:
            if action.help is None:
                action.help = ARGUMENT_HELP.get(prefix + name, {}).get(action.dest)
            if isinstance(action, argparse._SubParsersAction):
                _finish_help(action, f"{prefix}{name} ")


def _image_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", metavar="IMAGE", help="the vTPM state image (qcow2)")


def _json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")


def _control_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--control",
        metavar="SOCKET",
        help="the mount daemon's control socket, if it was given one (vtpm-qcow mount "
        "--control); by default the daemon serving IMAGE is found by the image's path",
    )


def _size_args(p: argparse.ArgumentParser) -> None:
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


def _encrypt_args(p: argparse.ArgumentParser) -> None:
    """--encrypt and --iter-time of a command that creates an image, and the secret."""
    p.add_argument(
        "--encrypt",
        action="store_true",
        help="make a LUKS-encrypted image (encrypt.format=luks, aes-256-xts-plain64, as "
        "qemu-img makes it; QEMU opens it with --object secret + encrypt.key-secret) with "
        "the passphrase of --secret-file/--secret-fd/--secret-keyring/--secret-credential",
    )
    p.add_argument(
        "--iter-time",
        type=int,
        default=DEFAULT_ITER_TIME,
        metavar="MS",
        help=f"PBKDF2 time of the key slot, in milliseconds (default {DEFAULT_ITER_TIME})",
    )
    add_secret_options(p)


def _command(
    sub: Any, func: Handler, name: str, *, help: str, description: str
) -> argparse.ArgumentParser:
    """Add subcommand ``name`` running ``func``."""
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help, description=description)
    parser.set_defaults(func=func)
    return parser


class _Unbuilt:
    """Stands in for the parser of a subcommand not being run: every call is accepted and
    does nothing (building all 30-odd subparsers costs a command more than its own work)."""

    def __getattr__(self, name: str) -> Callable[..., _Unbuilt]:
        return lambda *args, **kwargs: self


class _OnlySubcommand:
    """The subparsers action of a parser built for subcommand ``wanted`` alone."""

    def __init__(self, real: Any, wanted: str) -> None:
        self.real = real
        self.wanted = wanted
        self.found = False

    def add_parser(self, name: str, **kwargs: Any) -> Any:
        if name != self.wanted:
            return _Unbuilt()
        self.found = True
        return self.real.add_parser(name, **kwargs)


def _parser_for(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser, with only the subparser of the subcommand ``argv`` names (the first word
    that is no option); the whole parser for --help, a bad command or none."""
    wanted = next((a for a in argv if not a.startswith("-")), None)
    if wanted is not None:
        parser = _build_parser(wanted)
        if parser is not None:
            return parser
    return build_parser()


def build_parser() -> argparse.ArgumentParser:
    """The ``vtpm-qcow`` argument parser."""
    parser = _build_parser(None)
    assert parser is not None
    return parser


def _build_parser(only: str | None) -> argparse.ArgumentParser | None:
    """The ``vtpm-qcow`` argument parser (``only``: just that subcommand's subparser; None
    if there is no such subcommand)."""
    from ..backup import FORMATS
    from .parsing import Parser

    parser = Parser(
        prog=PROG,
        description="Keep a virtual TPM's state (swtpm) in a qcow2 image whose internal "
        "snapshots follow the VM's snapshots.",
        epilog="Run 'vtpm-qcow COMMAND --help' for a command's options and examples.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    real_sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub: Any = real_sub if only is None else _OnlySubcommand(real_sub, only)

    p = _command(
        sub,
        cmd_create,
        "create",
        help="create an empty vTPM state image",
        description="Create IMAGE: a qcow2 image whose virtual disk is an empty swtpm linear "
        "state file (what swtpm --tpmstate backend-uri=file:// uses).  Fill it with "
        "'vtpm-qcow setup' or 'import', or let swtpm manufacture a TPM through a mount.",
    )
    _image_arg(p)
    _size_args(p)
    _encrypt_args(p)

    p = _command(
        sub,
        cmd_setup,
        "setup",
        help="manufacture a TPM into the image with swtpm_setup",
        description="Run swtpm_setup and store the new TPM state in IMAGE. Options this "
        "command does not know are passed to swtpm_setup, e.g. --create-ek-cert "
        "--create-platform-cert --pcr-banks sha256 (give them after IMAGE).",
    )
    _image_arg(p)
    p.add_argument("--create", action="store_true", help="create IMAGE if it does not exist")
    p.add_argument("--overwrite", action="store_true", help="replace existing TPM state")
    p.add_argument("--tpm12", action="store_true", help="a TPM 1.2 (default: TPM 2.0)")
    p.add_argument(
        "--ca-dir",
        metavar="DIR",
        help="sign the certificates with a local CA in DIR (created if missing) instead of "
        "the system's (/var/lib/swtpm-localca, which is signed with as its owner, so that "
        "libvirt's swtpm_setup as tss keeps working)",
    )
    _size_args(p)
    _encrypt_args(p)
    add_swtpm_key_option(p)
    p.set_defaults(passthrough=True)

    p = _command(
        sub,
        cmd_snapshot,
        "snapshot",
        help="list, create, apply or delete snapshots of the TPM state",
        description="Like 'qemu-img snapshot' on IMAGE's internal snapshots, which hold the "
        "TPM state under the VM's snapshot tags. If a vtpm-qcow mount daemon holds IMAGE "
        "(swtpm running on it), changes go through its control socket; listing reads a "
        "held image shared, like qemu-img -U.",
    )
    _image_arg(p)
    action = p.add_mutually_exclusive_group(required=True)
    action.add_argument("-l", "--list", action="store_true", help="list snapshots")
    action.add_argument("-c", "--create", metavar="TAG", help="create snapshot TAG")
    action.add_argument("-a", "--apply", metavar="TAG", help="revert the state to snapshot TAG")
    action.add_argument("-d", "--delete", metavar="TAG", help="delete snapshot TAG")
    p.add_argument("--overwrite", action="store_true", help="with -c: replace an existing TAG")
    _json_arg(p)
    _control_arg(p)
    add_secret_options(p)

    p = _command(
        sub,
        cmd_info,
        "info",
        help="show state sections, blob headers, digests and snapshots",
        description="Show what IMAGE holds: swtpm's state sections (permall, volatilestate, "
        "savestate) with their blob headers and xxh3-128 digests, and each snapshot's state "
        "digest.  A state swtpm would refuse by its own structural checks shows as 'not "
        "loadable' ('vtpm-qcow check' also dry-loads it in a real swtpm).  A held image "
        "(swtpm or QEMU running) is read shared.  Of an encrypted image without its "
        "secret: the LUKS header and the snapshot table.",
    )
    _image_arg(p)
    _json_arg(p)
    add_secret_options(p)

    p = _command(
        sub,
        cmd_check,
        "check",
        help="check the image and whether swtpm loads its state; --repair restores one",
        description="Check IMAGE like 'qemu-img check' (corruptions damage it, leaks are "
        "reported), then swtpm's linear header and every section's state blob as swtpm "
        "reads them, then dry-load the current state in a real swtpm (on a private copy). "
        "One line per finding on stdout.  Read-only unless --repair: when swtpm refuses "
        "the current state, the newest earlier state a real swtpm loads becomes current "
        "(first the generation before the current one, still on disk in freed clusters; "
        "then the snapshots, newest first), and the refused state is kept as snapshot "
        "unloadable-<UTC time>.  Nothing changes when no earlier state loads.",
    )
    _image_arg(p)
    _json_arg(p)
    p.add_argument("--no-load", action="store_true", help="skip the dry load (no swtpm is started)")
    add_secret_options(p)
    add_swtpm_key_option(p)
    p.add_argument(
        "-U",
        "--force-share",
        action="store_true",
        help="read an image swtpm/QEMU/a mount daemon holds (read-only check only)",
    )
    p.add_argument(
        "--repair",
        action="store_true",
        help="make the newest state swtpm loads current, keeping the refused one as a "
        "snapshot (the image must not be in use)",
    )
    if isinstance(p, Parser):  # (not when only another subcommand is built)
        p.usage_status = 1  # exit 2 means "state not loadable" here
    p.set_defaults(usage_status=1)

    p = _command(
        sub,
        cmd_rekey,
        "rekey",
        help="add or erase a passphrase (LUKS key slot) of an encrypted image",
        description="Like 'qemu-img amend -o encrypt.state=active|inactive' on IMAGE's LUKS "
        "header: --add lets the --new-secret-* passphrase open IMAGE too (a new key slot), "
        "--remove erases every key slot the --secret-* passphrase opens, --remove-keyslot N "
        "erases slot N.  The data and its master key stay as they are; the last active key "
        "slot is never erased.  IMAGE must not be in use.",
    )
    _image_arg(p)
    action = p.add_mutually_exclusive_group(required=True)
    action.add_argument(
        "--add", action="store_true", help="add the new passphrase in a free key slot"
    )
    action.add_argument(
        "--remove", action="store_true", help="erase every key slot the passphrase opens"
    )
    action.add_argument("--remove-keyslot", type=int, metavar="N", help="erase key slot N (0 to 7)")
    p.add_argument("--keyslot", type=int, metavar="N", help="with --add: the key slot to fill")
    p.add_argument(
        "--iter-time",
        type=int,
        default=DEFAULT_ITER_TIME,
        metavar="MS",
        help=f"PBKDF2 time of the new key slot, in milliseconds (default {DEFAULT_ITER_TIME})",
    )
    add_secret_options(p)
    add_new_secret_options(p)

    p = _command(
        sub,
        cmd_wait,
        "wait",
        help="wait until IMAGE is released (no daemon, swtpm or QEMU writes it)",
        description="Wait until no process holds IMAGE's write lock, so that qemu-img, a "
        "backup job or the next 'vtpm-qcow serve' can open it: a 'serve' daemon releases "
        "the image within tens of milliseconds of QEMU quitting, but a script that runs "
        "qemu-img right after stopping a VM should not race it.  Exit 0 once released, 1 "
        "after --timeout.",
    )
    _image_arg(p)
    p.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="give up after this long (default 30)",
    )

    p = _command(
        sub,
        cmd_import,
        "import",
        help="replace the image's state with plain swtpm state (a dir or a linear file)",
        description="Replace IMAGE's current TPM state, in one atomic commit, with the state "
        "of a swtpm dir backend (tpm2-00.permall, ...) or a linear file.  Snapshots stay.",
    )
    _image_arg(p)
    p.add_argument(
        "source", metavar="DIR|FILE", help="swtpm state dir (tpm2-00.permall...) or linear file"
    )
    p.add_argument(
        "--snapshot",
        metavar="TAG",
        help="file the state as snapshot TAG instead (the current state and the other "
        "snapshots stay): e.g. a storage snapshot of a Proxmox VE tpmstate0 volume",
    )
    p.add_argument("--overwrite", action="store_true", help="with --snapshot: replace TAG")
    add_secret_options(p)

    p = _command(
        sub,
        cmd_export,
        "export",
        help="write the image's state as plain swtpm state (a dir or a linear file)",
        description="An existing directory (or a path ending in /) receives dir backend "
        "files (tpm2-00.permall, ...); any other path receives a linear file for "
        "swtpm --tpmstate backend-uri=file://PATH. Dir file names follow the TPM version "
        "read from the state (tpm2-00.* unless it is a TPM 1.2; encrypted: tpm2-00.*). "
        "A mounted image is read through its daemon: a committed state, never a torn one.",
    )
    _image_arg(p)
    p.add_argument("target", metavar="DIR|FILE", help="where to write the state")
    p.add_argument(
        "--dir", action="store_true", help="write a directory even if TARGET does not exist"
    )
    names = p.add_mutually_exclusive_group()
    names.add_argument("--tpm12", action="store_true", help="name dir files tpm-00.* (TPM 1.2)")
    names.add_argument("--tpm2", action="store_true", help="name dir files tpm2-00.* (TPM 2.0)")
    p.add_argument("--snapshot", metavar="TAG", help="export snapshot TAG's state")
    p.add_argument(
        "--size",
        type=parse_size,
        metavar="SIZE",
        help="zero-fill the linear file to SIZE, a raw volume's size (4M: a Proxmox VE "
        "tpmstate0); a block device is written in place, filled to its own size",
    )
    _control_arg(p)
    add_secret_options(p)

    p = _command(
        sub,
        cmd_backup,
        "backup",
        help="consistent backup of a (live) image, with a digest manifest",
        description="Copy IMAGE's TPM state to DEST while swtpm/QEMU may run on it.  A "
        "mounted image is read through its mount daemon (one committed state, never a torn "
        "one); an image QEMU holds is read shared until two reads agree.  --format qcow2 "
        "(default) writes a standalone vTPM image with every snapshot (snapshot dates become "
        "the backup's time; the originals are in the manifest); raw a swtpm linear file; dir "
        "swtpm dir backend files.  DEST appears atomically (temp + fsync + rename) and "
        "DEST.manifest.json beside it holds xxh3-128 digests of every section, every "
        "snapshot's sections and every file, for 'vtpm-qcow verify'.",
    )
    _image_arg(p)
    p.add_argument("dest", metavar="DEST", help="the backup file or directory to write")
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="qcow2",
        help="qcow2 (default: image with snapshots), raw (linear file) or dir",
    )
    p.add_argument(
        "--snapshot", metavar="TAG", help="back up snapshot TAG's state (no other snapshots)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing DEST")
    _json_arg(p)
    _control_arg(p)
    add_secret_options(p)

    p = _command(
        sub,
        cmd_verify,
        "verify",
        help="re-check a backup against its manifest (digests, qcow2 check)",
        description="Recompute the xxh3-128 digests of BACKUP's files, state sections and "
        "snapshots and compare them with BACKUP.manifest.json; a qcow2 backup also gets a "
        "'qemu-img check' equivalent.  Exit 0 if all match, 1 otherwise (one line each).",
    )
    p.add_argument("backup", metavar="BACKUP", help="a backup written by 'vtpm-qcow backup'")
    _json_arg(p)
    add_secret_options(p)

    p = _command(
        sub,
        cmd_restore,
        "restore",
        help="verify a backup, then make its state the image's state",
        description="Verify BACKUP, then replace IMAGE's current TPM state with it in one "
        "atomic commit (IMAGE's snapshots stay).  A missing IMAGE is created: a copy of a "
        "qcow2 backup with its snapshots, or a new image with a raw/dir backup's state.  "
        "Stop swtpm/QEMU (and the mount daemon) on IMAGE first.",
    )
    p.add_argument("backup", metavar="BACKUP", help="a backup written by 'vtpm-qcow backup'")
    _image_arg(p)
    p.add_argument(
        "--snapshot", metavar="TAG", help="restore the state of the backup's snapshot TAG"
    )
    _json_arg(p)
    add_secret_options(p)

    _add_hooks(sub)
    if isinstance(sub, _OnlySubcommand) and not sub.found:
        return None
    _finish_help(real_sub)
    return parser


def _read_only(argv: Sequence[str]) -> tuple[str, str, bool] | None:
    """``(command, IMAGE, json)`` when ``argv`` is exactly ``info [--json] IMAGE`` or
    ``snapshot -l|--list [--json] IMAGE`` (options in any order, each at most once), else
    None: anything else (--help, other options, abbreviations, errors) goes to argparse,
    which parses these the same way."""
    if not argv or argv[0] not in ("info", "snapshot"):
        return None
    command, rest = argv[0], argv[1:]
    options = ("--json",) if command == "info" else ("--json", "-l", "--list")
    given: list[str] = []
    images: list[str] = []
    for arg in rest:
        if arg in options and arg not in given:
            given.append(arg)
        elif arg and not arg.startswith("-"):
            images.append(arg)
        else:
            return None
    listing = "-l" in given or "--list" in given
    if len(images) != 1 or (command == "snapshot" and not listing):
        return None
    return command, images[0], "--json" in given


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the command, print errors as one line, return the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    quick = _read_only(argv)
    if quick is not None:
        command, image, as_json = quick
        show = _show_info if command == "info" else _list_snapshots
        return _reporting_errors(lambda: show(image, None, as_json))
    from .parsing import Parser

    parser = _parser_for(argv)
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "passthrough", False):
        if isinstance(parser, Parser):  # check: exit 1, its 2 means "not loadable"
            parser.usage_status = getattr(args, "usage_status", 2)
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    func: Handler = args.func
    return _reporting_errors(lambda: func(args))


def _reporting_errors(run: Callable[[], int]) -> int:
    """``run()``'s exit status; a failure is one line on stderr and status 1 (130 for ^C)."""
    try:
        return int(run())
    except HANDLED as err:
        print(f"{PROG}: {err}", file=sys.stderr)
    except OSError as err:
        where = f"{err.filename}: " if err.filename else ""
        print(f"{PROG}: {where}{err.strerror or err}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 1


__all__ = ["build_parser", "main", "parse_size"]

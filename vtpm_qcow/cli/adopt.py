"""``vtpm-qcow adopt`` and ``vtpm-qcow clone``: move an existing VM's TPM history in
(:mod:`vtpm_qcow.vm.adopt`), copy a vTPM image (:mod:`vtpm_qcow.backup.clone`)."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Final

from ..state.store import DEFAULT_ITER_TIME
from .output import print_json
from .secrets import add_secret_options, secret_key

#: ``adopt`` exit status when a disk snapshot was not adopted (the image was written).
EXIT_PARTIAL: Final = 3

ADOPT_EPILOG: Final = """exit status:
  0  every disk snapshot was adopted
  1  nothing was written (bad arguments, an image refused, nothing to adopt)
  3  partial: IMAGE was written, but some disk snapshots were not adopted (listed with the
     reason: disk-only snapshots, VM states without a readable TPM section)

examples:
  vtpm-qcow adopt --disk vm1.qcow2 --state /var/lib/libvirt/swtpm/UUID/tpm2 vm1-tpm.qcow2
  vtpm-qcow adopt --disk vm1.qcow2 --disk data.qcow2 --state tpmstate.lin vm1-tpm.qcow2
  vtpm-qcow adopt --encrypt --secret-file vm1.key --disk vm1.qcow2 --state DIR vm1-tpm.qcow2
  vtpm-qcow vm verify --disk vm1.qcow2 vm1-tpm.qcow2        # every adopted tag matches"""

CLONE_EPILOG: Final = """examples:
  vtpm-qcow clone vm1-tpm.qcow2 vm2-tpm.qcow2               # all snapshots, also while served
  vtpm-qcow clone --flatten vm1-tpm.qcow2 vm2-tpm.qcow2     # the current state only
  vtpm-qcow clone --new-identity template-tpm.qcow2 vm3-tpm.qcow2
  vtpm-qcow clone --new-identity template-tpm.qcow2 vm3-tpm.qcow2 --create-ek-cert"""

#: swtpm_setup options of ``clone --new-identity`` when none are given.
IDENTITY_OPTIONS: Final = ("--create-ek-cert", "--create-platform-cert")


def _say(args: argparse.Namespace, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr)


def cmd_adopt(args: argparse.Namespace) -> int:
    """Read the current state (if given), adopt the disks' history, report per tag."""
    import os

    from ..backup import plainstate
    from ..errors import SecretError, StoreError
    from ..state.secret import OPTIONS_HINT
    from ..vm.adopt import ADOPTED, adopt

    current = None if args.state is None else plainstate.read_state(args.state)
    key = secret_key(args)
    if not os.path.lexists(args.image):  # a new image: encrypted with --encrypt only
        if args.encrypt and key is None:
            raise SecretError(f"--encrypt needs the passphrase: give {OPTIONS_HINT}")
        if key is not None and not args.encrypt:
            raise SecretError("a secret was given for a new image without --encrypt")
    elif args.encrypt:
        raise StoreError("exists: --encrypt is for a new image", path=args.image)
    done = adopt(
        args.disk,
        args.image,
        current=current,
        current_source=args.state or "",
        shared=args.force_share,
        key=key,
        iter_time=args.iter_time,
    )
    if args.json:
        print_json(done.to_dict())
    else:
        width = max([len("TAG"), *(len(t.tag) for t in done.tags)])
        print(f"{'TAG':<{width}}  {'RESULT':<8}  DETAIL")
        for t in done.tags:
            shown = t.result if t.result == ADOPTED else t.result.upper()
            detail = f"{t.detail} ({t.disk})" if t.result == ADOPTED else t.detail
            print(f"{t.tag:<{width}}  {shown:<8}  {detail}")
        print(f"current state: {done.current}")
    adopted = sum(t.result == ADOPTED for t in done.tags)
    what = "created" if done.created else "filled"
    _say(args, f"{args.image}: {what}, {adopted} of {len(done.tags)} disk snapshots adopted")
    return EXIT_PARTIAL if done.partial else 0


def cmd_clone(args: argparse.Namespace) -> int:
    """Copy SRC to DST; with --new-identity, manufacture DST's TPM afresh."""
    import os
    import tempfile
    from pathlib import Path

    from ..backup import plainstate
    from ..backup.clone import clone
    from ..errors import StoreError
    from ..state.secret import staging_dir
    from ..tpm.swtpm import find_tool, run_setup

    options = [option for option in args.extra if option != "--"]
    if options and not args.new_identity:
        raise StoreError(f"unrecognized arguments: {' '.join(options)} (swtpm_setup options "
                         "go with --new-identity)")  # fmt: skip
    if args.new_identity and args.flatten:
        raise StoreError("--new-identity copies no state at all: --flatten says nothing more")
    if os.path.lexists(args.dest):
        raise StoreError("already exists: a clone never overwrites", path=args.dest)
    key = secret_key(args)
    identity = None
    if args.new_identity:
        find_tool("swtpm_setup")
        with tempfile.TemporaryDirectory(prefix="vtpm-qcow-clone-", dir=staging_dir()) as tmp:
            state = Path(tmp) / "state.lin"
            _say(args, "Manufacturing a new TPM 2.0 identity with swtpm_setup")
            run_setup(f"file://{state}", options=options or IDENTITY_OPTIONS, ca_dir=args.ca_dir)
            identity = plainstate.layout_from_file(state)
    done = clone(
        args.source,
        args.dest,
        flatten=args.flatten,
        identity=identity,
        control=args.control,
        key=key,
    )
    if done.new_identity:
        _say(
            args,
            f"Cloned {args.source} to {args.dest} with a NEW TPM identity: a new EK and new "
            "certificates.  Data sealed to the source's TPM, its EK and its NV indices do not "
            "follow, nor its snapshots (they hold the old identity).",
        )
    elif done.snapshots:
        _say(args, f"Cloned {args.source} to {args.dest}: the current state and "
                   f"{len(done.snapshots)} snapshots ({', '.join(done.snapshots)})")  # fmt: skip
    else:
        what = " (flattened)" if args.flatten else ""
        _say(args, f"Cloned {args.source} to {args.dest}: the current state{what}")
    return 0


def add_adopt_commands(subparsers: Any) -> None:
    """Register ``adopt`` and ``clone``."""
    p = subparsers.add_parser(
        "adopt",
        help="move a VM with snapshots in: one vTPM snapshot per disk snapshot's TPM state",
        description="For a VM whose internal snapshots were taken while its TPM state lived "
        "in a plain swtpm directory (libvirt's default) or linear file: every disk snapshot "
        "saved with VM state becomes a vTPM snapshot of the same tag (in the disks' "
        "order) holding the permanent TPM state QEMU saved in it (permall only: the "
        "volatile state belongs with the snapshot's RAM, and QEMU's loadvm restores it "
        "from there), then the state in --state becomes IMAGE's current state.  IMAGE is "
        "created (all or nothing), or filled if it is a vTPM image without snapshots; one "
        "with snapshots is refused.  Without --state, an existing IMAGE keeps its state and "
        "a new one gets the last adopted snapshot's.  Shut the VM down first (or -U).",
        epilog=ADOPT_EPILOG,
    )
    p.add_argument(
        "--disk",
        action="append",
        required=True,
        metavar="DISK",
        help="a qcow2 disk of the VM (repeat for each; the VM state is on one of them)",
    )
    p.add_argument(
        "--state",
        metavar="DIR|FILE",
        help="the TPM state the VM uses now: swtpm's state directory (tpm2-00.permall...) "
        "or a linear file (backend-uri=file://)",
    )
    p.add_argument("image", metavar="IMAGE", help="the vTPM image to create (or fill)")
    p.add_argument(
        "-U",
        "--force-share",
        action="store_true",
        help="read the disks without QEMU's locks (as qemu-img -U)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="no summary on stderr")
    p.add_argument(
        "--encrypt",
        action="store_true",
        help="make the new IMAGE LUKS-encrypted (as 'vtpm-qcow create --encrypt') with the "
        "passphrase of --secret-file/--secret-fd/--secret-keyring/--secret-credential",
    )
    p.add_argument(
        "--iter-time",
        type=int,
        default=DEFAULT_ITER_TIME,
        metavar="MS",
        help=f"with --encrypt: PBKDF2 time of the key slot, in ms (default {DEFAULT_ITER_TIME})",
    )
    add_secret_options(p)
    p.set_defaults(func=cmd_adopt)

    p = subparsers.add_parser(
        "clone",
        help="an independent copy of a vTPM image (also while served)",
        description="Copy SRC to the new image DST: every snapshot (same tags, same order) "
        "and the current state, read consistently through the mount daemon when SRC is "
        "served.  DST shares nothing with SRC; it is never overwritten.  --new-identity "
        "re-manufactures the TPM instead (swtpm_setup, like 'vtpm-qcow setup'; options "
        f"after it go to swtpm_setup, default {' '.join(IDENTITY_OPTIONS)}): a new EK and "
        "new certificates for a VM made from a template.  Sealed data, the old EK and NV "
        "indices do not follow, nor do the snapshots.",
        epilog=CLONE_EPILOG,
    )
    p.add_argument("source", metavar="SRC", help="the vTPM image to copy")
    p.add_argument("dest", metavar="DST", help="the new vTPM image (must not exist)")
    p.add_argument("--flatten", action="store_true", help="copy the current state only")
    p.add_argument(
        "--new-identity",
        action="store_true",
        help="a freshly manufactured TPM (new EK, certificates); no state or snapshot follows",
    )
    p.add_argument(
        "--ca-dir",
        metavar="DIR",
        help="with --new-identity: sign the certificates with the CA in DIR (as setup does)",
    )
    p.add_argument(
        "--control",
        metavar="SOCKET",
        help="the control socket of the mount daemon serving SRC, if it was given one",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no summary on stderr")
    add_secret_options(p)
    p.set_defaults(func=cmd_clone, passthrough=True)

"""``vtpm-qcow adopt``: move an existing VM's TPM history in (:mod:`vtpm_qcow.vm.adopt`)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Final

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
  vtpm-qcow vm verify --disk vm1.qcow2 vm1-tpm.qcow2        # every adopted tag matches"""


def _say(args: argparse.Namespace, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr)


def cmd_adopt(args: argparse.Namespace) -> int:
    """Read the current state (if given), adopt the disks' history, report per tag."""
    from pathlib import Path

    from ..backup import plainstate
    from ..errors import StoreError
    from ..vm.adopt import ADOPTED, adopt

    current = None
    if args.state is not None:
        state = Path(args.state)
        if state.is_dir():
            current, _tpm2 = plainstate.layout_from_dir(state)
        elif state.exists():
            current = plainstate.layout_from_file(state)
        else:
            raise StoreError("no such file or directory", path=state)
    done = adopt(
        args.disk,
        args.image,
        current=current,
        current_source=args.state or "",
        shared=args.force_share,
        key=secret_key(args),
    )
    if args.json:
        print(json.dumps(done.to_dict(), indent=2))
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


def add_adopt_commands(subparsers: Any) -> None:
    """Register ``adopt``."""
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
    add_secret_options(p)
    p.set_defaults(func=cmd_adopt)

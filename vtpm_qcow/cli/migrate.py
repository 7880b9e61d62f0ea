"""``vtpm-qcow migrate-prepare``: copy a vTPM image to where a live migration's destination
will serve it (:mod:`vtpm_qcow.backup.migrate`; docs/MIGRATION.md)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

EPILOG = """examples:
  vtpm-qcow migrate-prepare /srv/vm/vm1-tpm.qcow2 /mnt/dst-host/vm1-tpm.qcow2
  ssh dst vtpm-qcow serve /srv/vm/vm1-tpm.qcow2 --incoming --qmp ... (docs/MIGRATION.md)"""


def cmd_migrate_prepare(args: argparse.Namespace) -> int:
    """Copy IMAGE to DEST byte for byte (consistently while served)."""
    from ..backup.migrate import prepare

    done = prepare(args.image, args.dest, control=args.control)
    if not args.quiet:
        tags = f": {', '.join(done.snapshots)}" if done.snapshots else ""
        print(
            f"Copied {done.source} to {done.dest} ({done.size} bytes, "
            f"{len(done.snapshots)} snapshots{tags}); serve it there with --incoming",
            file=sys.stderr,
        )
    return 0


def add_migrate_commands(subparsers: Any) -> None:
    """Register ``migrate-prepare``."""
    p = subparsers.add_parser(
        "migrate-prepare",
        help="copy a vTPM image for a live migration without shared storage",
        description="Copy IMAGE byte for byte (every snapshot, its dates and ids, the "
        "encryption as it is) to the new file DEST, for the destination of a live migration "
        "to serve with 'serve --incoming'.  A served IMAGE is read by its mount daemon "
        "between two commits.  DEST is written aside and linked into place: never "
        "overwritten, never left half-written.  IMAGE is not changed.",
        epilog=EPILOG,
    )
    p.add_argument("image", metavar="IMAGE", help="the vTPM image the source VM uses")
    p.add_argument("dest", metavar="DEST", help="the new copy (must not exist)")
    p.add_argument(
        "--control",
        metavar="SOCKET",
        help="the control socket of the mount daemon serving IMAGE, if it was given one",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no summary on stderr")
    p.set_defaults(func=cmd_migrate_prepare)

"""``vtpm-qcow vm ...``: keep a vTPM image's snapshots aligned with a QEMU VM's snapshots.

Commands (registered on the main CLI by :func:`add_vm_commands`):

* ``vm save|load|delete --qmp SOCKET --store IMAGE [--force] TAG``: orchestrated snapshot
  of disks, VM state and vTPM image together (:mod:`vtpm_qcow.vm.orchestrate`).
* ``vm list``: the disks' tags beside the vTPM image's tags.
* ``vm status``: the VM's run state, its snapshot disks, the tag table and mismatches
  (exit status 3 when not aligned).
* ``vm watch``: follow HMP ``savevm``/``loadvm``/``delvm`` and snapshot jobs of others
  (:mod:`vtpm_qcow.vm.watch`); give it its own ``-qmp`` monitor.
* ``vm verify --disk DISK [--disk ...] IMAGE [-U] [--json]``: offline, no QMP: the TPM
  state in each disk snapshot's VM state against the vTPM snapshot of the same tag
  (:mod:`vtpm_qcow.vm.verify`); exit 0 all match, 1 a mismatch or missing tag, 2 error.

The vTPM image is reached through its ``vtpm-qcow serve``/``mount`` daemon when one serves it
(the normal case: swtpm runs on it), else opened directly.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ..vm import (
    DEFAULT_GRACE,
    DEFAULT_JOB_TIMEOUT,
    DEFAULT_POLL_INTERVAL,
    DEFAULT_RECONNECT_TIMEOUT,
    DEFAULT_TIMEOUT,
)
from .output import print_json
from .secrets import add_secret_options, secret_key

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..vm.orchestrate import Monitor, VtpmSnapshots

T = TypeVar("T")

#: ``vm status`` exit status when disk and vTPM tags differ.
EXIT_MISALIGNED = 3
#: ``vm verify`` exit statuses: a tag mismatches or is missing / the check could not run.
EXIT_VERIFY_FAILED = 1
EXIT_VERIFY_ERROR = 2


def _run(args: argparse.Namespace, body: Callable[[Monitor, VtpmSnapshots], Awaitable[T]]) -> T:
    """Open the vTPM side and a QMP session, run ``body``, close both."""
    import asyncio

    from ..vm.orchestrate import Monitor, open_vtpm

    vtpm = open_vtpm(args.store, args.control, secret_key(args))
    try:

        async def session() -> T:
            monitor = Monitor(args.qmp, timeout=args.timeout, job_timeout=args.job_timeout)
            await monitor.connect()
            try:
                return await body(monitor, vtpm)
            finally:
                await monitor.close()

        return asyncio.run(session())
    finally:
        vtpm.close()


def cmd_save(args: argparse.Namespace) -> int:
    """``vm save``."""
    from ..vm.orchestrate import save

    outcome = _run(args, lambda m, v: save(m, v, args.tag, force=args.force))
    print(outcome.summary("saved"))
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    """``vm load``."""
    from ..vm.orchestrate import load

    outcome = _run(args, lambda m, v: load(m, v, args.tag))
    print(outcome.summary("loaded"))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    """``vm delete``."""
    from ..vm.orchestrate import delete

    outcome = _run(args, lambda m, v: delete(m, v, args.tag))
    print(outcome.summary("deleted"))
    return 0


async def _table(monitor: Monitor, vtpm: VtpmSnapshots) -> tuple[str, list[Any], list[Any]]:
    from ..vm.orchestrate import tag_table

    state = await monitor.run_state()
    nodes = await monitor.disk_nodes()
    return state.status, nodes, tag_table(nodes, await vtpm.tags())


def _print_rows(rows: list[Any]) -> None:
    from ..vm.orchestrate import quoted

    width = max([len("TAG"), *(len(quoted(r.tag)) - 2 for r in rows)])
    print(f"{'TAG':<{width}}  {'DISKS':<24}  {'VTPM':<4}  STATE")
    for row in rows:
        state = "aligned" if row.aligned else "MISMATCH"
        disks = ",".join(row.disks) or "-"
        vtpm = "yes" if row.vtpm else "no"
        print(f"{quoted(row.tag)[1:-1]:<{width}}  {disks:<24}  {vtpm:<4}  {state}")


def cmd_list(args: argparse.Namespace) -> int:
    """``vm list``."""
    from ..export.control import to_json

    _, _, rows = _run(args, _table)
    if args.json:
        print_json({"tags": to_json(rows)})
    else:
        _print_rows(rows)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """``vm status``: exit 0 when aligned, 3 when not."""
    from ..export.control import to_json
    from ..vm.orchestrate import quoted

    status, nodes, rows = _run(args, _table)
    aligned = all(row.aligned for row in rows)
    if args.json:
        fields = {"vm": status, "disks": nodes, "vtpm": args.store, "tags": rows}
        print_json(to_json({**fields, "aligned": aligned}))
        return 0 if aligned else EXIT_MISALIGNED
    print(f"vm: {status}")
    for node in nodes:
        print(f"disk: {node.node} ({node.device}, {node.driver})")
    print(f"vtpm: {args.store}")
    _print_rows(rows)
    mismatched = [row for row in rows if not row.aligned]
    for row in mismatched:
        where = (
            "vTPM image only"
            if not row.disks
            else (f"disks {','.join(row.disks)} only" if not row.vtpm else "not on every disk")
        )
        print(f"mismatch: {quoted(row.tag)} is on the {where}")
    return EXIT_MISALIGNED if mismatched else 0


def cmd_watch(args: argparse.Namespace) -> int:
    """``vm watch``: runs until QEMU shuts down (or Ctrl-C)."""
    from ..vm.watch import Watcher

    def report(line: str) -> None:
        print(line, flush=True)

    async def body(monitor: Monitor, vtpm: VtpmSnapshots) -> None:
        watcher = Watcher(
            monitor,
            vtpm,
            report=report,
            poll_interval=args.poll,
            grace=args.grace,
            reconnect_timeout=args.reconnect,
            on_ready=lambda: report(f"watching {args.qmp} for {args.store}"),
        )
        if args.once:
            await watcher.reconcile()
        else:
            await watcher.run(connected=True)

    _run(args, body)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """``vm verify``: exit 0 when every tag matches (or has no VM state), 1 when one does
    not, 2 when the images cannot be read at all."""
    import sys

    from ..errors import HANDLED
    from ..export.control import to_json
    from ..vm.orchestrate import quoted
    from ..vm.verify import verify

    try:
        results = verify(args.disk, args.image, shared=args.force_share, key=secret_key(args))
    except HANDLED as err:
        print(f"vtpm-qcow: {err}", file=sys.stderr)
        return EXIT_VERIFY_ERROR
    except OSError as err:
        where = f"{err.filename}: " if err.filename else ""
        print(f"vtpm-qcow: {where}{err.strerror or err}", file=sys.stderr)
        return EXIT_VERIFY_ERROR
    ok = not any(r.failed for r in results)
    if args.json:
        fields = {"disks": args.disk, "vtpm": args.image, "tags": results, "ok": ok}
        print_json(to_json(fields))
    else:
        width = max([len("TAG"), *(len(quoted(r.tag)) - 2 for r in results)])
        print(f"{'TAG':<{width}}  {'RESULT':<12}  DETAIL")
        for r in results:
            shown = r.result.upper() if r.failed else r.result
            detail = r.detail or f"permanent = permall ({r.blob_sizes['permanent']} bytes)"
            print(f"{quoted(r.tag)[1:-1]:<{width}}  {shown:<12}  {detail}")
        if not results:
            print("(no snapshots on the disks or the vTPM image)")
    return 0 if ok else EXIT_VERIFY_FAILED


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--qmp", required=True, metavar="SOCKET", help="QEMU's QMP socket")
    parser.add_argument("--store", required=True, metavar="IMAGE", help="the vTPM image")
    parser.add_argument(
        "--control",
        metavar="SOCKET",
        help="control socket of the daemon serving IMAGE (default: its standard socket; "
        "without a daemon IMAGE is opened directly)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="S",
        help=f"seconds to wait for QMP (default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--job-timeout",
        type=float,
        default=DEFAULT_JOB_TIMEOUT,
        metavar="S",
        help=f"seconds to wait for a snapshot job (default {DEFAULT_JOB_TIMEOUT:g})",
    )
    add_secret_options(parser)


def add_vm_commands(subparsers: Any) -> None:
    """Register ``vm save|load|delete|list|status|watch|verify`` on the CLI's subparsers.

    Each sets ``func`` (parsed arguments -> exit status); failures raise
    :class:`~vtpm_qcow.errors.QmpError` / :class:`~vtpm_qcow.errors.StoreError` with one line.
    """
    vm = subparsers.add_parser(
        "vm",
        help="snapshots of a running QEMU VM with its vTPM image (QMP)",
        description="Keep the vTPM image's snapshots aligned with the VM's disk snapshots.",
    )
    sub = vm.add_subparsers(
        dest="vm_command", metavar="ACTION", required=True, help="what to do with TAG or the VM"
    )
    for name, func, text in (
        ("save", cmd_save, "pause, snapshot the vTPM image and the disks + VM state as TAG"),
        ("load", cmd_load, "revert disks, VM state and vTPM image to TAG"),
        ("delete", cmd_delete, "delete TAG from the disks and the vTPM image"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        _common(p)
        p.add_argument("tag", metavar="TAG", help="snapshot tag (disks and vTPM)")
        if name == "save":
            p.add_argument("--force", action="store_true", help="replace an existing TAG")
        p.set_defaults(func=func)
    for name, func, text in (
        ("list", cmd_list, "disk snapshot tags beside vTPM snapshot tags"),
        ("status", cmd_status, "VM state, disks, tags and mismatches (exit 3 when misaligned)"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        _common(p)
        p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
        p.set_defaults(func=func)
    p = sub.add_parser(
        "watch",
        help="follow savevm/loadvm/delvm and snapshot jobs of others (own -qmp monitor)",
        description="Reconcile at start, then react to QMP events and poll the disks' "
        "snapshot lists; prints one line per action; ends when QEMU shuts down.",
    )
    _common(p)
    p.add_argument(
        "--poll",
        type=float,
        default=DEFAULT_POLL_INTERVAL,
        metavar="S",
        help=f"seconds between polls (default {DEFAULT_POLL_INTERVAL:g})",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=DEFAULT_GRACE,
        metavar="S",
        help=f"seconds before a vTPM-only tag is deleted (default {DEFAULT_GRACE:g})",
    )
    p.add_argument(
        "--reconnect",
        type=float,
        default=DEFAULT_RECONNECT_TIMEOUT,
        metavar="S",
        help=f"seconds to retry a lost monitor (default {DEFAULT_RECONNECT_TIMEOUT:g})",
    )
    p.add_argument("--once", action="store_true", help="reconcile once and exit")
    p.set_defaults(func=cmd_watch)
    p = sub.add_parser(
        "verify",
        help="offline: the TPM state in the disks' snapshots vs the vTPM image's snapshots",
        description="For every snapshot tag of the disks or IMAGE: read the TPM blobs QEMU "
        "saved in the disk snapshot's VM state and compare the permanent one with the "
        "permall of IMAGE's snapshot of the same tag, byte for byte (volatile and save "
        "state belong with the snapshot's RAM: reported, not compared).  Read-only; no QMP.",
    )
    p.add_argument(
        "--disk",
        action="append",
        required=True,
        metavar="DISK",
        help="a qcow2 disk of the VM (repeat for each; the VM state is on one of them)",
    )
    p.add_argument("image", metavar="IMAGE", help="the vTPM image")
    p.add_argument(
        "-U",
        "--force-share",
        action="store_true",
        help="open without QEMU's locks (the VM may be running, as qemu-img -U)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    add_secret_options(p)
    p.set_defaults(func=cmd_verify)

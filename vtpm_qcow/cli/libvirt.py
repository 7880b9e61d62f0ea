"""``vtpm-qcow libvirt ...``: libvirt-managed VMs (:mod:`vtpm_qcow.libvirt`)."""

from __future__ import annotations

import argparse
from typing import Any

from ..libvirt import DEFAULT_URI


def cmd_follow(args: argparse.Namespace) -> int:
    """``libvirt follow``: the snapshot watcher on a domain, through libvirt's API."""
    import asyncio

    from ..errors import StoreError
    from ..libvirt.domain import LibvirtVm
    from ..vm.orchestrate import open_vtpm
    from ..vm.watch import Watcher

    def report(line: str) -> None:
        print(line, flush=True)

    async def follow() -> None:
        vm = LibvirtVm(args.domain, args.connect)
        await vm.connect()
        try:
            image = args.image or (await vm.info()).image
            if image is None:
                raise StoreError(
                    f"domain {args.domain} names no vTPM image: give --image or "
                    "run 'vtpm-qcow libvirt enable' first",
                    path=args.connect,
                )
            vtpm = await asyncio.to_thread(open_vtpm, image)
            try:
                watcher = Watcher(
                    vm, vtpm, report=report, poll_interval=args.poll,
                    reconnect_timeout=args.reconnect,
                    on_ready=lambda: report(f"following domain {args.domain} for {image}"),
                )  # fmt: skip
                await watcher.run(connected=True)
            finally:
                await asyncio.to_thread(vtpm.close)
        finally:
            await vm.close()

    asyncio.run(follow())
    return 0


def _connect_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--connect",
        "-c",
        metavar="URI",
        default=DEFAULT_URI,
        help=f"libvirt URI, as virsh -c takes it (default {DEFAULT_URI})",
    )


def add_libvirt_commands(subparsers: Any) -> None:
    """Register ``libvirt follow`` on the CLI's subparsers."""
    lv = subparsers.add_parser(
        "libvirt",
        help="libvirt-managed VMs: keep the vTPM image's snapshots with the domain's",
        description="Integration with libvirt (virsh, virt-manager): the vTPM image follows "
        "the domain's snapshots through libvirt's own API (no extra QMP monitor, no tainted "
        "domain).",
    )
    sub = lv.add_subparsers(dest="libvirt_command", metavar="ACTION", required=True)
    p = sub.add_parser(
        "follow",
        help="follow a running domain's snapshots (until it stops)",
        description="Reconcile the vTPM image's snapshot tags with the domain's disk "
        "snapshots, then follow them: a snapshot created while the domain runs gets the TPM "
        "state its vmstate holds, a deleted one goes.  One line per action; ends when the "
        "domain stops (libvirt's hook starts it again with the domain); reconnects when "
        "libvirtd restarts.",
    )
    p.add_argument("domain", metavar="DOMAIN", help="domain name or UUID")
    _connect_arg(p)
    p.add_argument(
        "--image",
        metavar="IMAGE",
        help="the vTPM image (default: the one 'vtpm-qcow libvirt enable' recorded in the "
        "domain's metadata)",
    )
    p.add_argument(
        "--poll",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="how often to look at the disks' snapshot tables between events (default 1; "
        "libvirt 9.0 emits no event for a snapshot deletion)",
    )
    p.add_argument(
        "--reconnect",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="how long to wait for libvirtd to come back after losing it (default 120)",
    )
    p.set_defaults(func=cmd_follow)

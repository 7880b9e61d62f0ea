"""``vtpm-qcow libvirt ...``: libvirt-managed VMs (:mod:`vtpm_qcow.libvirt`)."""

from __future__ import annotations

import argparse
from typing import Any

from ..libvirt import DEFAULT_URI
from .output import print_json


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
    """Register ``libvirt follow|install|enable|disable|status|hook``."""
    lv = subparsers.add_parser(
        "libvirt",
        help="libvirt-managed VMs: keep the vTPM image's snapshots with the domain's",
        description="Integration with libvirt (virsh, virt-manager): the vTPM image follows "
        "the domain's snapshots through libvirt's own API (no extra QMP monitor, no tainted "
        "domain).",
    )
    sub = lv.add_subparsers(
        dest="libvirt_command", metavar="ACTION", required=True, help="what to do"
    )
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

    p = sub.add_parser(
        "install",
        help="install the libvirt hook that mounts and follows enabled domains",
        description="Write the qemu hook (HOOKS_DIR/qemu.d/vtpm-qcow).  It acts only on "
        "domains enabled with 'vtpm-qcow libvirt enable': it mounts the domain's vTPM image "
        "at libvirt's TPM state directory before each start, follows its snapshots while it "
        "runs, and unmounts it when the domain stops.  libvirtd discovers hooks when it "
        "starts: restart it once afterwards.",
    )
    _hooks_arg(p)
    p.set_defaults(func=cmd_install)

    p = sub.add_parser(
        "enable",
        help="keep a (shut-off) domain's TPM in a vTPM image from its next start",
        description="Move the domain's TPM state into IMAGE (libvirt's existing state is "
        "imported and its directory kept beside, renamed; without one, a TPM is "
        "manufactured with the options libvirt's swtpm_setup uses: EK, EK and platform "
        "certificates, locked NVRAM), and record IMAGE in the domain's <metadata>.  An "
        "existing IMAGE is used as it is.  The domain must be shut off and have an "
        "emulator TPM (<tpm><backend type='emulator'/></tpm>).",
    )
    p.add_argument("domain", metavar="DOMAIN", help="domain name or UUID")
    p.add_argument(
        "--image",
        metavar="IMAGE",
        help="the vTPM image to use (default: /var/lib/libvirt/images/DOMAIN-vtpm.qcow2, "
        "beside libvirt's default disk pool; never inside libvirt's TPM state directory, "
        "which undefine deletes)",
    )
    _connect_arg(p)
    _hooks_arg(p)
    p.set_defaults(func=cmd_enable)

    p = sub.add_parser(
        "disable",
        help="give a (shut-off) domain its plain libvirt TPM state back",
        description="Write the image's current TPM state into libvirt's state directory "
        "(owned by tss, as libvirt makes it) and remove the opt-in.  The image and its "
        "snapshots stay where they are.",
    )
    p.add_argument("domain", metavar="DOMAIN", help="domain name or UUID")
    _connect_arg(p)
    p.set_defaults(func=cmd_disable)

    p = sub.add_parser(
        "status",
        help="enabled domains: image, follower, whether the snapshot tags agree",
        description="One line per enabled domain (or DOMAIN): its image, whether it runs, "
        "its follower, and whether the disks' snapshot tags and the image's agree.  Exit 3 "
        "when they do not.",
    )
    p.add_argument("domain", metavar="DOMAIN", nargs="?", help="only this domain")
    _connect_arg(p)
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "hook",
        help="what libvirtd runs (installed by 'libvirt install')",
        description="libvirt's qemu hook: DOMAIN OP SUBOP EXTRA, the domain XML on stdin.  "
        "prepare/begin mounts an enabled domain's image at its TPM state directory, "
        "started/begin and reconnect/begin start its follower, release/end stops the "
        "follower and unmounts.  Other domains and calls: nothing.",
    )
    p.add_argument("domain", metavar="DOMAIN", help="domain name")
    p.add_argument("op", metavar="OP", help="prepare, start, started, stopped, release, ...")
    p.add_argument("subop", metavar="SUBOP", help="begin or end")
    p.add_argument("extra", metavar="EXTRA", nargs="*", help="ignored")
    p.set_defaults(func=cmd_hook)


def _hooks_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--hooks-dir",
        default="/etc/libvirt/hooks",
        metavar="DIR",
        help="libvirt's hook directory (default /etc/libvirt/hooks)",
    )


def cmd_install(args: argparse.Namespace) -> int:
    """``libvirt install``: the hook script, and what libvirtd needs to pick it up."""
    from pathlib import Path

    from ..libvirt.manage import install_hook

    path, changed = install_hook(Path(args.hooks_dir))
    print(f"{'installed' if changed else 'already installed'}: {path}")
    if changed:
        print(
            "libvirtd discovers hooks when it starts: restart it once "
            "(systemctl restart libvirtd, or virtqemud with modular daemons)"
        )
    return 0


def cmd_enable(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..libvirt.manage import enable, hook_path

    image = args.image or f"/var/lib/libvirt/images/{args.domain}-vtpm.qcow2"
    for line in enable(args.connect, args.domain, image):
        print(line)
    if not hook_path(Path(args.hooks_dir)).exists():
        print("note: the hook is not installed yet: run 'vtpm-qcow libvirt install'")
    return 0


def cmd_disable(args: argparse.Namespace) -> int:
    from ..libvirt.manage import disable

    for line in disable(args.connect, args.domain):
        print(line)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """``libvirt status``: exit 3 when an enabled domain's tags and its image's differ."""

    from ..libvirt.manage import status

    domains = status(args.connect, args.domain)
    if args.json:
        print_json([{**d.__dict__, "aligned": d.aligned} for d in domains])
    for d in [] if args.json else domains:
        state = "running" if d.running else "shut off"
        follower = f"follower {d.follower}" if d.follower else "no follower"
        tags = (
            "tags aligned"
            if d.aligned
            else (f"tags differ: disks {list(d.disk_tags)}, vTPM {list(d.vtpm_tags)}")
        )
        print(f"{d.name}: {d.image or 'not enabled'}; {state}; {follower}; {tags}")
    if not domains and not args.json:
        print("no domain is enabled")
    return 0 if all(d.aligned for d in domains) else 3


def cmd_hook(args: argparse.Namespace) -> int:
    """``libvirt hook``: what libvirtd runs (the domain XML on stdin)."""
    import sys

    from ..libvirt.domain import parse_domain
    from ..libvirt.hook import handle

    info = parse_domain(sys.stdin.read(), source=f"hook input for {args.domain}")
    done = handle(info, args.op, args.subop)
    if done:
        print(f"vtpm-qcow: {info.name}: {done}", file=sys.stderr)
    return 0

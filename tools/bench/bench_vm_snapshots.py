#!/usr/bin/env python3
"""Benchmark: what an orchestrated VM snapshot adds over QEMU's bare snapshot job.

One QEMU (q35, TCG, running on a HLT firmware, 64 MiB, one qcow2 disk) with a tpm-tis on a
vTPM image served by ``vtpm-qcow serve``.  Each round times, on the same VM and through one
open QMP session:

* bare save: ``snapshot-save`` job (QEMU stops and restarts the VM itself), wait, dismiss;
* orchestrated save: :func:`vtpm_qcow.vm.orchestrate.save` (query-status, stop, tag checks,
  vTPM snapshot over the daemon's control socket, the same job, cont);
* bare load / orchestrated load likewise (``snapshot-load``; vTPM apply after it).

Snapshots are deleted between rounds (untimed) so every round sees the same image.  Prints
a Markdown table of medians over ``--rounds`` and the added latency.  The process start-up of
the ``vtpm-qcow vm`` command is not included (a watcher or a management daemon pays it once).

Usage: python3 tools/bench/bench_vm_snapshots.py [--rounds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.vm.qemu_fixtures import create_disk, qemu_vm, served_store
from tests.vtpm.mount_fixtures import vtpm_qcow as vtpm_qcow_command
from vtpm_qcow.export.control import RUNTIME_DIR_ENV
from vtpm_qcow.vm.orchestrate import Monitor, VtpmSnapshots, load, open_vtpm, save


async def timed(action: Callable[[], Awaitable[object]]) -> float:
    start = time.perf_counter()
    await action()
    return (time.perf_counter() - start) * 1000


async def rounds(monitor: Monitor, vtpm: VtpmSnapshots, count: int) -> dict[str, list[float]]:
    """Time ``count`` rounds of bare and orchestrated save and load (ms)."""
    names = ("bare save", "vm save", "bare load", "vm load")
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(count):
        bare, orch = f"bare{i}", f"orch{i}"
        bare_job = {"tag": bare, "vmstate": "disk0", "devices": ["disk0"]}
        times["bare save"].append(await timed(partial(monitor.run_job, "snapshot-save", bare_job)))
        times["vm save"].append(await timed(partial(save, monitor, vtpm, orch)))
        times["bare load"].append(await timed(partial(monitor.run_job, "snapshot-load", bare_job)))
        if not (await monitor.run_state()).running:
            await monitor.execute("cont")  # keep every round on a running VM
        times["vm load"].append(await timed(partial(load, monitor, vtpm, orch)))
        for tag in (bare, orch):
            await monitor.run_job("snapshot-delete", {"tag": tag, "devices": ["disk0"]})
        await vtpm.delete(orch)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-vm-") as tmp:
        work = Path(tmp)
        os.environ[RUNTIME_DIR_ENV] = str(work / "rt")
        image = work / "vtpm.qcow2"
        vtpm_qcow_command("create", str(image))
        vtpm_qcow_command("setup", str(image), "--create-ek-cert", "--create-platform-cert")
        disk = create_disk(work / "disk.qcow2", "64M")
        with (
            served_store(image, work) as served,
            qemu_vm(work, str(served.swtpm_ctrl), [disk], running=True) as qemu,
        ):
            vtpm = open_vtpm(str(image))

            async def session() -> dict[str, list[float]]:
                monitor = Monitor(str(qemu.qmp))
                await monitor.connect()
                try:
                    return await rounds(monitor, vtpm, args.rounds)
                finally:
                    await monitor.close()

            try:
                times = asyncio.run(session())
            finally:
                vtpm.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"| operation (median of {args.rounds}) | bare QEMU job | orchestrated | added |")
    print("|---|---:|---:|---:|")
    for op in ("save", "load"):
        bare, orch = med[f"bare {op}"], med[f"vm {op}"]
        print(f"| {op} | {bare:.1f} ms | {orch:.1f} ms | {orch - bare:+.1f} ms |")
    print(f"\nreproduce: python3 tools/bench/bench_vm_snapshots.py --rounds {args.rounds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

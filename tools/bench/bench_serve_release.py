#!/usr/bin/env python3
"""Benchmark: how soon the vTPM image is free again after QEMU quits (whole stack).

A script that runs ``qemu-img`` right after stopping a VM needs the image's lock released.
Each round starts a storage stack for the vTPM image, a QEMU (q35, TCG, a halted CPU)
whose TPM is a swtpm on that stack, then sends QEMU ``quit`` over QMP and times until
``qemu-img info IMAGE`` (without ``-U``: it takes the image's lock) succeeds.  Stacks:

* ``serve --qmp``   ``vtpm-qcow serve --qmp`` (the snapshot watcher on QEMU's second
                    monitor, started before the quit)
* ``serve``         ``vtpm-qcow serve`` without ``--qmp``
* ``qsd``           swtpm on qemu-storage-daemon's FUSE export of the image; the script
                    stops qemu-storage-daemon (SIGTERM) as soon as swtpm has exited, which
                    is what a supervisor of that stack does

Median of ``--rounds`` per stack, the rounds of the stacks interleaved; ratios against
qemu-storage-daemon's figure.  The resolution is one ``qemu-img info`` run (about 10 ms).
Markdown on stdout.  Run as root (FUSE):

    python3 tools/bench/bench_serve_release.py --rounds 7
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.vm.qemu_fixtures import (
    create_disk,
    qemu_vm,
    stop_process,
    wait_for_listener,
    wait_for_path,
)
from vtpm_qcow.export.control import RUNTIME_DIR_ENV

STACKS = ("serve --qmp", "serve", "qsd")
#: Seconds a stack may take to release the image before the round counts as failed.
RELEASE_TIMEOUT = 20.0


def image_free(image: Path) -> bool:
    """``qemu-img info IMAGE`` succeeds (it needs the image's lock: no ``-U``)."""
    done = subprocess.run(["qemu-img", "info", str(image)], capture_output=True, check=False)
    return done.returncode == 0


def send_quit(qmp: Path) -> None:
    """QMP ``quit`` (QEMU may hang up before answering)."""
    from qemu.qmp.legacy import QEMUMonitorProtocol

    monitor = QEMUMonitorProtocol(str(qmp))
    monitor.connect()
    with contextlib.suppress(EOFError, OSError):
        monitor.cmd_obj({"execute": "quit"})
    with contextlib.suppress(EOFError, OSError):
        monitor.close()


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.02)


def release_after_quit(image: Path, qmp: Path, qemu: subprocess.Popen[bytes]) -> float:
    """Quit QEMU; seconds until the image's lock is free."""
    time.sleep(0.3)  # let the guest's TPM initialisation settle
    start = time.perf_counter()
    send_quit(qmp)
    while not image_free(image):
        if time.perf_counter() - start > RELEASE_TIMEOUT:
            raise RuntimeError(f"{image}: still locked {RELEASE_TIMEOUT:g}s after QEMU quit")
    elapsed = time.perf_counter() - start
    qemu.wait(10)
    return elapsed


@contextlib.contextmanager
def serve(work: Path, image: Path, qmp2: Path | None) -> Iterator[Path]:
    """``vtpm-qcow serve --foreground`` (``--qmp`` if ``qmp2``); yields swtpm's ctrl socket."""
    ctrl, mountpoint, log = work / "swtpm.sock", work / "mnt", work / "serve.log"
    mountpoint.mkdir()
    cmd = ["vtpm-qcow", "serve", str(image), "--ctrl", str(ctrl), "--mountpoint", str(mountpoint)]
    cmd += ["--foreground", *(["--qmp", str(qmp2)] if qmp2 else [])]
    with log.open("ab") as log_file:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file)
    try:
        wait_for_path(ctrl, proc, "vtpm-qcow serve", log)
        wait_for_listener(ctrl, proc, "swtpm (vtpm-qcow serve)")
        yield ctrl
    finally:
        stop_process(proc, grace=15)
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)


@contextlib.contextmanager
def qsd_swtpm(work: Path, image: Path) -> Iterator[tuple[Path, Callable[[], None]]]:
    """swtpm on qemu-storage-daemon's FUSE export; yields its ctrl socket and the
    supervisor's "swtpm exited: stop qemu-storage-daemon" step."""
    target = work / "export.lin"
    target.touch()
    export = f"type=fuse,id=e,node-name=q,mountpoint={target},writable=on"
    qsd = subprocess.Popen(
        ["qemu-storage-daemon", "--blockdev", f"driver=file,node-name=f,filename={image}",
         "--blockdev", "driver=qcow2,node-name=q,file=f", "--export", export],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    ctrl = work / "swtpm.sock"
    swtpm: subprocess.Popen[bytes] | None = None
    try:
        wait_until(lambda: _mounted(target), "qemu-storage-daemon's export")
        swtpm = subprocess.Popen(
            ["swtpm", "socket", "--tpm2", "--tpmstate", f"backend-uri=file://{target}",
             "--ctrl", f"type=unixio,path={ctrl}", "--flags", "not-need-init"],
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for_path(ctrl, swtpm, "swtpm")
        wait_for_listener(ctrl, swtpm, "swtpm")
        running = swtpm

        def supervise() -> None:
            running.wait(RELEASE_TIMEOUT)
            qsd.send_signal(signal.SIGTERM)

        yield ctrl, supervise
    finally:
        if swtpm is not None:
            stop_process(swtpm)
        stop_process(qsd)
        subprocess.run(["fusermount3", "-u", "-z", str(target)], capture_output=True)


def _mounted(path: Path) -> bool:
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == str(path) for line in mounts)


def one_round(stack: str, work: Path) -> float:
    """One start-quit-release cycle of ``stack`` in the fresh directory ``work``."""
    image = work / "vtpm.qcow2"
    subprocess.run(["vtpm-qcow", "create", str(image)], check=True, capture_output=True)
    disk = create_disk(work / "disk.qcow2")
    qemu_dir = work / "qemu"
    qemu_dir.mkdir()
    if stack == "qsd":
        with (
            qsd_swtpm(work, image) as (ctrl, supervise),
            qemu_vm(qemu_dir, str(ctrl), [disk], running=True) as qemu,
        ):
            time.sleep(0.3)  # as in release_after_quit
            start = time.perf_counter()
            send_quit(qemu.qmp)
            supervise()  # what a script supervising this stack does
            while not image_free(image):
                if time.perf_counter() - start > RELEASE_TIMEOUT:
                    raise RuntimeError(f"{image}: still locked after qsd stopped")
            return time.perf_counter() - start
    qmp2 = qemu_dir / "qmp2.sock" if stack == "serve --qmp" else None
    with (
        serve(work, image, qmp2) as ctrl,
        qemu_vm(qemu_dir, str(ctrl), [disk], running=True) as qemu,
    ):
        if qmp2 is not None:
            log = work / "serve.log"
            wait_until(lambda: "qmp watcher following" in log.read_text(), "serve's watcher")
        return release_after_quit(image, qemu.qmp, qemu.proc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    times: dict[str, list[float]] = {stack: [] for stack in STACKS}
    with tempfile.TemporaryDirectory(prefix="bench-release-") as tmp:
        os.environ[RUNTIME_DIR_ENV] = str(Path(tmp) / "rt")
        for number in range(args.rounds):
            for stack in STACKS:
                work = Path(tmp) / f"{number}-{stack.replace(' ', '').replace('-', '')}"
                work.mkdir()
                times[stack].append(one_round(stack, work))
    reference = statistics.median(times["qsd"])
    print(f"image released after QEMU's quit (median of {args.rounds} rounds)\n")
    print("| stack | median ms | min ms | max ms | vs qsd |")
    print("|---|---:|---:|---:|---:|")
    for stack in STACKS:
        median = statistics.median(times[stack])
        low, high = min(times[stack]), max(times[stack])
        print(
            f"| {stack} | {median * 1000:.0f} | {low * 1000:.0f} | {high * 1000:.0f} | "
            f"{median / reference:.2f}x |"
        )
    print(f"\nreproduce: python3 tools/bench/bench_serve_release.py --rounds {args.rounds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

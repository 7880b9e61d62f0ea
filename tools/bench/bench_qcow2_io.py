#!/usr/bin/env python3
"""Benchmark: qcow2 data I/O of this library vs ``qemu-io`` (whole-process wall time).

Workloads on a 256 MiB image with 64 KiB clusters:

* sequential write of the whole disk in 64 KiB requests (fresh image, flushed at close),
* sequential read of it in 64 KiB requests,
* random 4 KiB writes (``--random-ops`` of them, seeded, 4 KiB aligned) into a fresh image.

qemu-io gets the same requests as commands on stdin (``-t writeback``: flushed at close,
like us).  Our side runs this script in worker mode in a separate interpreter, so both
sides are timed as whole processes (interpreter start-up included).  Median of
``--rounds`` runs; both tools run in the same invocation, so the ratios compare like with
like on a noisy machine.  Prints a Markdown table.

Usage: python3 tools/bench/bench_qcow2_io.py [--size-mib 256] [--random-ops 4096] [--rounds 3]
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REQUEST = 64 * 1024
SMALL = 4 * 1024
PATTERN = 0xAB


def random_offsets(size: int, count: int) -> list[int]:
    rnd = random.Random(1234)
    return [rnd.randrange(size // SMALL) * SMALL for _ in range(count)]


def qemu_io_commands(workload: str, size: int, count: int) -> str:
    if workload == "seq-write":
        lines = [f"write -P {PATTERN} {off} {REQUEST}" for off in range(0, size, REQUEST)]
    elif workload == "seq-read":
        lines = [f"read {off} {REQUEST}" for off in range(0, size, REQUEST)]
    else:
        lines = [f"write -P {PATTERN} {off} {SMALL}" for off in random_offsets(size, count)]
    return "\n".join(lines) + "\n"


def worker(workload: str, path: str, size: int, count: int) -> None:
    """Our side of one workload (run in a fresh interpreter)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import qcow2

    if workload == "seq-read":
        with qcow2.open(path) as image:
            for off in range(0, size, REQUEST):
                image.read(off, REQUEST)
        return
    with qcow2.open(path, writable=True) as image:
        if workload == "seq-write":
            data = bytes([PATTERN]) * REQUEST
            for off in range(0, size, REQUEST):
                image.write(off, data)
        else:
            data = bytes([PATTERN]) * SMALL
            for off in random_offsets(size, count):
                image.write(off, data)


def fresh_image(path: Path, size: int) -> None:
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)],
        check=True,
        capture_output=True,
    )


def timed(argv: list[str], stdin: str | None = None) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0 or "failed" in proc.stdout:
        raise SystemExit(f"{' '.join(argv[:4])} failed: {proc.stderr.strip()}")
    return elapsed


def run(tool: str, workload: str, tmp: Path, size: int, count: int) -> float:
    path = tmp / f"{tool}-{workload}.qcow2"
    source = tmp / f"{tool}-seq-write.qcow2"
    if workload == "seq-read":
        path = source  # read back what the same tool wrote
    else:
        fresh_image(path, size)
    if tool == "qemu-io":
        argv = ["qemu-io", "-t", "writeback", "-f", "qcow2", str(path)]
        if workload == "seq-read":
            argv.insert(1, "-r")
        return timed(argv, qemu_io_commands(workload, size, count))
    argv = [sys.executable, __file__, "--worker", workload, str(path), str(size), str(count)]
    return timed(argv)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, workload, path, size, count = sys.argv
        worker(workload, path, int(size), int(count))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--random-ops", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    size = args.size_mib * 1024 * 1024
    count = args.random_ops
    workloads = [
        ("seq-write", f"sequential write {args.size_mib} MiB, 64 KiB requests", size),
        ("seq-read", f"sequential read {args.size_mib} MiB, 64 KiB requests", size),
        ("rand-write", f"random 4 KiB writes x{count}", count * SMALL),
    ]
    times: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-qcow2-io-") as tmpdir:
        tmp = Path(tmpdir)
        for _ in range(args.rounds):
            for tool in ("qemu-io", "ours"):
                for workload, _, _ in workloads:
                    elapsed = run(tool, workload, tmp, size, count)
                    times.setdefault((tool, workload), []).append(elapsed)
    print("| workload | qemu-io s | ours s | qemu-io MB/s | ours MB/s | ours/qemu-io |")
    print("|---|---|---|---|---|---|")
    for workload, label, nbytes in workloads:
        theirs = statistics.median(times[("qemu-io", workload)])
        ours = statistics.median(times[("ours", workload)])
        mb = nbytes / 1e6
        print(
            f"| {label} | {theirs:.3f} | {ours:.3f} | {mb / theirs:.0f} | {mb / ours:.0f} "
            f"| {theirs / ours:.2f}x |"
        )
    print()
    print(f"Median of {args.rounds} rounds, whole-process wall time (interpreter start-up")
    print("included), flushed at close.  Reproduce:")
    print(
        f"`python3 tools/bench/bench_qcow2_io.py --size-mib {args.size_mib} "
        f"--random-ops {count} --rounds {args.rounds}`"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

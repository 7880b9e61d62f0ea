#!/usr/bin/env python3
"""Benchmark: qcow2 internal snapshot create/apply/delete, this project vs qemu-img.

Both sides work on copies of the same image (1000 allocated 64 KiB clusters by default).
qemu-img is timed as a whole process (``qemu-img snapshot -c/-a/-d``); this project is
timed twice: in-process (open + operation + close, what a long-running daemon pays) and as
a whole process (``python3 -c`` doing the same, interpreter start-up included).  The output
is a Markdown table with medians over ``--rounds`` runs and the ratio to qemu-img.

Usage: python3 tools/bench/bench_qcow2_snapshots.py [--clusters 1000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

CLUSTER = 65536
OPS = {"create": "-c", "apply": "-a", "delete": "-d"}


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def make_image(path: Path, clusters: int) -> None:
    size = max(clusters * CLUSTER * 2, 16 * 1024 * 1024)
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size))
    sh("qemu-io", "-c", f"write -P 0x5a 0 {clusters * CLUSTER}", str(path))
    # One existing snapshot, so apply and delete have something to work on.
    sh("qemu-img", "snapshot", "-c", "base", str(path))


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def prepare(template: Path, work: Path, op: str) -> None:
    shutil.copyfile(template, work)
    if op == "delete":
        sh("qemu-img", "snapshot", "-c", "victim", str(work))


def target_name(op: str) -> str:
    return {"create": "new", "apply": "base", "delete": "victim"}[op]


def run_qemu(work: Path, op: str) -> float:
    return timed(lambda: sh("qemu-img", "snapshot", OPS[op], target_name(op), str(work)))


def run_ours_in_process(work: Path, op: str) -> float:
    import qcow2

    def go() -> None:
        with qcow2.open(str(work), writable=True) as image:
            getattr(image, f"{op}_snapshot")(target_name(op))

    return timed(go)


def run_ours_process(work: Path, op: str) -> float:
    code = (
        "import qcow2,sys\n"
        "with qcow2.open(sys.argv[1], writable=True) as i:\n"
        f"    i.{op}_snapshot({target_name(op)!r})\n"
    )
    return timed(lambda: sh(sys.executable, "-c", code, str(work)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-snap-") as tmp:
        template = Path(tmp) / "template.qcow2"
        work = Path(tmp) / "work.qcow2"
        make_image(template, args.clusters)
        rows = []
        for op in OPS:
            results: dict[str, list[float]] = {"qemu": [], "inproc": [], "proc": []}
            for _ in range(args.rounds):
                for kind, runner in (
                    ("qemu", run_qemu),
                    ("inproc", run_ours_in_process),
                    ("proc", run_ours_process),
                ):
                    prepare(template, work, op)
                    results[kind].append(runner(work, op))
                    check = subprocess.run(
                        ["qemu-img", "check", str(work)], capture_output=True, check=False
                    )
                    if check.returncode != 0:
                        print(f"{kind} {op}: image not clean: {check.stdout!r}", file=sys.stderr)
                        return 1
            med = {k: statistics.median(v) * 1000 for k, v in results.items()}
            rows.append((op, med))
    print(
        f"snapshot ops on an image with {args.clusters} allocated 64 KiB clusters "
        f"(median of {args.rounds} runs, ms)\n"
    )
    print("| op | qemu-img (process) | ours in-process | ratio | ours (process) | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for op, med in rows:
        print(
            f"| {op} | {med['qemu']:.1f} | {med['inproc']:.1f} | "
            f"{med['inproc'] / med['qemu']:.2f} | {med['proc']:.1f} | "
            f"{med['proc'] / med['qemu']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

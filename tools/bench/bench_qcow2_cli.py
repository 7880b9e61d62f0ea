#!/usr/bin/env python3
"""Benchmark: the ``qcow2`` command vs ``qemu-img`` (whole-process wall time).

One image is built with qemu-img/qemu-io: 1 GiB virtual, every 64 KiB cluster allocated
(16384 clusters), 50 internal snapshots.  ``info``, ``check``, ``snapshot -l`` and
``map --output=json`` are timed as whole processes (interpreter start-up included, what a
script pays), median of ``--rounds`` runs; ``convert -O raw`` is reported as throughput.
Both tools run in the same invocation, so the ratios compare like with like on a noisy
machine.

``qcow2`` is the installed command (``bin/qcow2``, the launcher that starts Python without
running .pth code); ``python3 -m qcow2`` is shown beside it, as is the interpreter's own
start-up with and without ``site``.  The "modules" column counts the modules the command
imports (``-X importtime``; the interpreter's own start-up imports included).

Our commands run with a bytecode cache (``PYTHONPYCACHEPREFIX`` in the temporary
directory, ``PYTHONDONTWRITEBYTECODE`` removed) after one warm-up run, as an installed
package would: without it every start recompiles the modules.

Usage: python3 tools/bench/bench_qcow2_cli.py [--size-mib 1024] [--snapshots 50] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

COMMANDS = [("info",), ("check",), ("snapshot", "-l"), ("map", "--output=json")]


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def make_image(path: Path, size_mib: int, snapshots: int) -> None:
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(path), f"{size_mib}M")
    sh("qemu-io", "-c", f"write -P 0x5a 0 {size_mib}M", str(path))
    for i in range(snapshots):
        sh("qemu-img", "snapshot", "-c", f"snap{i}", str(path))


def wall(argv: list[str], rounds: int, env: dict[str, str] | None = None) -> float:
    """Median wall time of running ``argv`` to completion (output discarded)."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, check=False, env=env)
        times.append(time.perf_counter() - start)
        if proc.returncode not in (0, 2, 3):
            raise SystemExit(f"{' '.join(argv)} failed: {proc.stderr.decode().strip()}")
    return statistics.median(times)


def imported_modules(argv: list[str], env: dict[str, str]) -> int:
    """How many modules ``python3 -X importtime ARGV`` imports."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", *argv], capture_output=True, env=env, check=False
    )
    return sum(
        1
        for line in proc.stderr.decode(errors="replace").splitlines()
        if line.startswith("import time:") and not line.endswith("imported package")
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--snapshots", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    launcher = Path(sysconfig.get_path("scripts")) / "qcow2"
    if not launcher.is_file():
        raise SystemExit(f"{launcher} is missing: run tools/setup-system")
    ours = [str(launcher)]
    module = [sys.executable, "-m", "qcow2"]
    with tempfile.TemporaryDirectory(prefix="bench-qcow2-cli-") as tmp:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = str(Path(tmp) / "pycache")
        img = Path(tmp) / "big.qcow2"
        make_image(img, args.size_mib, args.snapshots)
        rows: list[tuple[str, float | None, float, float | None, int]] = []
        for flags in (["-S"], []):
            argv = [*flags, "-c", "pass"]
            base = wall([sys.executable, *argv], args.rounds, env)
            name = f"`python3 {' '.join(argv)}` (interpreter start)"
            rows.append((name, None, base, None, imported_modules(argv, env)))
        for command in COMMANDS:
            wall([*ours, *command, str(img)], 1, env)  # warm-up: fills the bytecode cache
            theirs = wall(["qemu-img", *command, str(img)], args.rounds)
            mine = wall([*ours, *command, str(img)], args.rounds, env)
            as_module = wall([*module, *command, str(img)], args.rounds, env)
            modules = imported_modules(["-S", str(launcher), *command, str(img)], env)
            rows.append((" ".join(command), theirs, mine, as_module, modules))
        raw_q, raw_o = Path(tmp) / "q.raw", Path(tmp) / "o.raw"
        theirs = wall(["qemu-img", "convert", "-O", "raw", str(img), str(raw_q)], 1)
        mine = wall([*ours, "convert", "-O", "raw", str(img), str(raw_o)], 1, env)
        if raw_q.read_bytes() != raw_o.read_bytes():
            raise SystemExit("convert outputs differ")
    print(
        f"Image: {args.size_mib} MiB, {args.size_mib * 16} allocated 64 KiB clusters, "
        f"{args.snapshots} snapshots; median of {args.rounds} runs.\n"
    )
    print("| command | qemu-img (s) | qcow2 (s) | ratio | python3 -m qcow2 (s) | modules |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, q, o, m, n in rows:
        if q is None or m is None:
            print(f"| {name} | | {o:.3f} | | | {n} |")
        else:
            print(f"| {name} | {q:.3f} | {o:.3f} | {o / q:.1f}x | {m:.3f} | {n} |")
    mib = args.size_mib
    print(
        f"| convert -O raw ({mib} MiB) | {theirs:.2f} ({mib / theirs:.0f} MiB/s) | "
        f"{mine:.2f} ({mib / mine:.0f} MiB/s) | {mine / theirs:.1f}x | | |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

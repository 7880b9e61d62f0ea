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

The ``vtpm-qcow`` command's read-only subcommands (``info``, ``info --json``, ``snapshot
-l``) are timed the same way beside ``qemu-img info``/``info --output=json``/``snapshot -l``
on vTPM images (a TPM manufactured by swtpm_setup) with a few and with many snapshots: the
runs alternate ``python3 -S -c pass`` (the floor: the interpreter's own start-up), qemu-img
and vtpm-qcow, and the ratio is the median of the vtpm-qcow/qemu-img pairs' ratios.
``vtpm-qcow`` is the installed launcher (``bin/vtpm-qcow``, the same as ``bin/qcow2``).
``--vtpm-only`` times these alone.

Small and medium images (``--images``) are timed the same way, in paired runs.

Usage: python3 tools/bench/bench_qcow2_cli.py [--size-mib 1024] [--snapshots 50] [--rounds 5]
       [--vtpm-snapshots 5,400] [--images small:64:16:5,medium:1024:256:5] [--vtpm-only]
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


def make_image(path: Path, size_mib: int, snapshots: int, written_mib: int | None = None) -> None:
    written = size_mib if written_mib is None else written_mib
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(path), f"{size_mib}M")
    if written:
        sh("qemu-io", "-c", f"write -P 0x5a 0 {written}M", str(path))
    for i in range(snapshots):
        sh("qemu-img", "snapshot", "-c", f"snap{i}", str(path))


def parse_images(spec: str) -> list[tuple[str, int, int, int]]:
    """``name:size_mib:written_mib:snapshots,...``"""
    out = []
    for item in spec.split(","):
        name, size, written, snaps = item.split(":")
        out.append((name, int(size), int(written), int(snaps)))
    return out


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


def paired(
    theirs: list[str], ours: list[str], rounds: int, env: dict[str, str]
) -> tuple[float, float, float]:
    """Median wall times of ``theirs`` and ``ours`` run alternately, and the median ratio."""
    pairs = [(wall(theirs, 1), wall(ours, 1, env)) for _ in range(rounds)]
    return (
        statistics.median(t for t, _ in pairs),
        statistics.median(o for _, o in pairs),
        statistics.median(o / t for t, o in pairs),
    )


def make_vtpm_image(path: Path, snapshots: int) -> None:
    """A vTPM image holding a manufactured TPM 2.0 and ``snapshots`` snapshots."""
    sh("vtpm-qcow", "setup", "--create", str(path))
    for i in range(snapshots):
        sh("qemu-img", "snapshot", "-c", f"tag{i}", str(path))


#: vtpm-qcow's read-only invocations and qemu-img's counterparts (IMAGE appended).
VTPM_COMMANDS = [
    (("info",), ("info",)),
    (("info", "--json"), ("info", "--output=json")),
    (("snapshot", "-l"), ("snapshot", "-l")),
]


def vtpm_rows(tmp: Path, counts: list[int], rounds: int, env: dict[str, str]) -> list[str]:
    """Markdown rows: ``vtpm-qcow info``/``snapshot -l`` beside qemu-img's and the bare
    interpreter's start-up, per image (the three alternate in every round)."""
    script = Path(sysconfig.get_path("scripts")) / "vtpm-qcow"
    if not script.is_file():
        raise SystemExit(f"{script} is missing: run tools/setup-system")
    floor = [sys.executable, "-S", "-c", "pass"]
    rows = []
    for count in counts:
        img = tmp / f"vtpm-{count}.qcow2"
        make_vtpm_image(img, count)
        for command, qemu in VTPM_COMMANDS:
            ours = [str(script), *command, str(img)]
            theirs = ["qemu-img", *qemu, str(img)]
            wall(ours, 1, env)  # warm-up: fills the bytecode cache
            runs = [(wall(floor, 1), wall(theirs, 1), wall(ours, 1, env)) for _ in range(rounds)]
            bare, q, o = (statistics.median(r[i] for r in runs) for i in range(3))
            ratio = statistics.median(r[2] / r[1] for r in runs)
            # -S: what the launcher imports (it runs itself with -S)
            modules = imported_modules(["-S", str(script), *command, str(img)], env)
            rows.append(
                f"| {' '.join(command)} | {count} | {bare * 1000:.1f} | {q * 1000:.1f} "
                f"| {o * 1000:.1f} | {ratio:.1f}x | {modules} |"
            )
    return rows


def print_vtpm(rows: list[str], rounds: int) -> None:
    load = os.getloadavg()
    print(
        f"vTPM images (TPM 2.0 from swtpm_setup); runs alternate the three commands, median "
        f"of {rounds}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
        f"on {os.cpu_count()} CPUs.\n"
    )
    print(
        "| command | snapshots | `python3 -S -c pass` (ms) | qemu-img (ms) | vtpm-qcow (ms) "
        "| ratio | modules |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


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
    parser.add_argument(
        "--vtpm-snapshots", default="5,400", help="snapshot counts of the vTPM images"
    )
    parser.add_argument(
        "--images",
        default="small:64:16:5,medium:1024:256:5",
        help="smaller images timed too: name:size_mib:written_mib:snapshots,...",
    )
    parser.add_argument("--vtpm-only", action="store_true", help="time the vtpm-qcow commands only")
    args = parser.parse_args()
    counts = [int(n) for n in args.vtpm_snapshots.split(",") if n]
    if args.vtpm_only:
        with tempfile.TemporaryDirectory(prefix="bench-vtpm-cli-") as tmp:
            env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
            env["PYTHONPYCACHEPREFIX"] = str(Path(tmp) / "pycache")
            print_vtpm(vtpm_rows(Path(tmp), counts, args.rounds, env), args.rounds)
        return 0
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
        sized: list[str] = []
        for name, size, written, snaps in parse_images(args.images):
            small = Path(tmp) / f"{name}.qcow2"
            make_image(small, size, snaps, written)
            for command in COMMANDS:
                argv = [*ours, *command, str(small)]
                wall(argv, 1, env)
                theirs_s, mine_s, ratio = paired(
                    ["qemu-img", *command, str(small)], argv, args.rounds, env
                )
                sized.append(
                    f"| {name} ({size} MiB, {written} MiB written, {snaps} snapshots) "
                    f"| {' '.join(command)} | {theirs_s:.4f} | {mine_s:.4f} | {ratio:.1f}x |"
                )
        raw_q, raw_o = Path(tmp) / "q.raw", Path(tmp) / "o.raw"
        theirs = wall(["qemu-img", "convert", "-O", "raw", str(img), str(raw_q)], 1)
        mine = wall([*ours, "convert", "-O", "raw", str(img), str(raw_o)], 1, env)
        if raw_q.read_bytes() != raw_o.read_bytes():
            raise SystemExit("convert outputs differ")
        vtpm = vtpm_rows(Path(tmp), counts, args.rounds, env)
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
    print(
        f"\nSmaller images; paired runs (qemu-img and qcow2 alternate), median of {args.rounds}.\n"
    )
    print("| image | command | qemu-img (s) | qcow2 (s) | ratio |")
    print("|---|---|---:|---:|---:|")
    print("\n".join(sized))
    print()
    print_vtpm(vtpm, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Benchmark: data I/O on LUKS-encrypted qcow2 images, this library vs ``qemu-io``.

Sequential 64 KiB writes of the whole disk into a fresh encrypted image, then sequential
reads of it, timed as whole processes (interpreter / qemu start-up and key unlocking
included; the images use ``encrypt.iter-time=10``).  Our side also runs on a plain image,
which shows what AES-XTS costs us.  Median of ``--rounds`` runs; prints a Markdown table.

Usage: python3 tools/bench/bench_luks_io.py [--size-mib 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REQUEST = 64 * 1024
PATTERN = 0xAB
SECRET = "benchpass"
OBJECT = ["--object", f"secret,id=sec0,data={SECRET}"]


def worker(workload: str, path: str, size: int, encrypted: bool) -> None:
    """Our side of one workload (run in a fresh interpreter)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import qcow2

    key = SECRET.encode() if encrypted else None
    with qcow2.open(path, writable=workload == "seq-write", key_secret=key) as image:
        if workload == "seq-read":
            for off in range(0, size, REQUEST):
                image.read(off, REQUEST)
            return
        data = bytes([PATTERN]) * REQUEST
        for off in range(0, size, REQUEST):
            image.write(off, data)


def create(path: Path, size: int, encrypted: bool) -> None:
    options = ["-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10"]
    args = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if encrypted:
        args += [*OBJECT, *options]
    for _ in range(20):  # qemu's PBKDF2 benchmark fails now and then on a busy host
        if subprocess.run([*args, str(path), str(size)], capture_output=True).returncode == 0:
            return
    raise SystemExit(f"qemu-img create {path} failed")


def timed(argv: list[str], stdin: str | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(argv, input=stdin, text=True, check=True, capture_output=True)
    return time.perf_counter() - start


def qemu_io_argv(path: Path) -> list[str]:
    opts = f"driver=qcow2,file.filename={path},encrypt.key-secret=sec0"
    return ["qemu-io", *OBJECT, "-t", "writeback", "--image-opts", opts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    size = args.size_mib * 1024 * 1024
    writes = "".join(f"write -P {PATTERN} {o} {REQUEST}\n" for o in range(0, size, REQUEST))
    reads = "".join(f"read {o} {REQUEST}\n" for o in range(0, size, REQUEST))
    times: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for enc_name, encrypted in (("luks", True), ("plain", False)):
            template = work / f"{enc_name}.template"
            create(template, size, encrypted)
            for _ in range(args.rounds):
                for side in ("ours", "qemu-io") if encrypted else ("ours",):
                    img = work / f"{enc_name}-{side}.qcow2"
                    shutil.copyfile(template, img)
                    for workload, script in (("seq-write", writes), ("seq-read", reads)):
                        if side == "ours":
                            argv = [sys.executable, __file__, "--worker", workload, str(img)]
                            argv += [str(size), "1" if encrypted else "0"]
                            elapsed = timed(argv)
                        else:
                            elapsed = timed(qemu_io_argv(img), script)
                        times.setdefault((f"{side} {enc_name}", workload), []).append(elapsed)
    mib = size / (1024 * 1024)
    print(f"| side | workload | median s | MiB/s |  ({args.size_mib} MiB, 64 KiB requests)")
    print("|---|---|---|---|")
    for (side, workload), samples in times.items():
        median = statistics.median(samples)
        print(f"| {side} | {workload} | {median:.2f} | {mib / median:.1f} |")


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1")
    else:
        main()

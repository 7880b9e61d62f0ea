#!/usr/bin/env python3
"""Benchmark: consistent captures and backups of a vTPM image with many snapshots.

For each snapshot count, builds an image holding swtpm-sized state (a 6 KiB permall, a
9 KiB volatilestate) with that many snapshots of changing states, then times a direct
capture (what ``vtpm-qcow backup`` reads from an unheld image; a mount daemon's ``capture``
op runs the same code under its file system lock, so this is also how long swtpm waits),
and writing the qcow2, raw and dir backups with their manifests plus a ``verify`` of the
qcow2 one.  Output is a Markdown table; compare rows within one run only.

Usage: python3 tools/bench/bench_backup.py [--snapshots 1,10,50]
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from vtpm_qcow.backup.archive import capture_image, verify_backup, write_backup
from vtpm_qcow.state.store import Store


def blob(i: int, size: int) -> bytes:
    """A blob whose content changes with ``i`` (as swtpm's permall does)."""
    return (i.to_bytes(4, "big") * (size // 4 + 1))[:size]


def build(path: Path, snapshots: int) -> None:
    """An image with ``snapshots`` snapshots of changing states, and one more current one."""
    with Store.create(path) as store:
        for i in range(snapshots + 1):
            store.write_section("permall", b"\0\0\xab\x36\x47\x23" + blob(i, 6000))
            store.write_section("volatilestate", blob(i + 7, 9000))
            if i < snapshots:
                store.create_snapshot(f"s{i}")


def timed(call: Callable[[], object]) -> float:
    """Milliseconds ``call()`` takes."""
    start = time.perf_counter()
    call()
    return (time.perf_counter() - start) * 1000


def run(snapshots: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "vtpm.qcow2"
        build(image, snapshots)
        start = time.perf_counter()
        taken = capture_image(image)
        row = {"capture": (time.perf_counter() - start) * 1000}
        for fmt in ("qcow2", "raw", "dir"):
            dest = Path(tmp) / f"backup.{fmt}"
            row[fmt] = timed(functools.partial(write_backup, taken, dest, fmt=fmt))
        row["verify"] = timed(lambda: verify_backup(Path(tmp) / "backup.qcow2"))
        return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshots", default="1,10,50", help="comma-separated counts")
    args = parser.parse_args()
    print("| snapshots | capture ms | qcow2 backup ms | raw ms | dir ms | verify qcow2 ms |")
    print("|---:|---:|---:|---:|---:|---:|")
    for count in (int(n) for n in args.snapshots.split(",")):
        r = run(count)
        print(
            f"| {count} | {r['capture']:.1f} | {r['qcow2']:.1f} | {r['raw']:.1f} "
            f"| {r['dir']:.1f} | {r['verify']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

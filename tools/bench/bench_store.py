#!/usr/bin/env python3
"""Benchmark: Store section writes per cluster size (the data behind the 4 KiB default).

swtpm rewrites its whole permall (about 6 KiB with EK certificates) on every
state-changing TPM command; the store turns each into one atomic commit.  For each cluster
size this times ``--writes`` permall rewrites (alternating contents, sizes swtpm produces),
first without snapshots, then with one snapshot taken every ``--snapshot-every`` writes
(each snapshot makes the next write copy-on-write), and reports writes/s, bytes written to
the host file per commit, and the image file size at the end.  Also times snapshot
create/apply.  The last row is the 4 KiB store LUKS-encrypted (``create --encrypt``:
aes-256-xts, every data cluster encrypted on write and decrypted on read).  Output is a
Markdown table; compare rows within one run only.

Usage: python3 tools/bench/bench_store.py [--writes 300] [--snapshot-every 10]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from qcow2.io.fileio import WriteEvent
from vtpm_qcow.state.store import Store

CLUSTER_SIZES = (4096, 16384, 65536)


def permall(i: int) -> bytes:
    """A permall-sized blob whose content changes every write (as swtpm's does)."""
    size = 6000 + (i % 3) * 400
    return (i.to_bytes(4, "big") * (size // 4 + 1))[:size]


def run(
    cluster_size: int, writes: int, snapshot_every: int, key: bytes | None = None
) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.qcow2"
        written = [0]

        def count(event: WriteEvent) -> None:
            written[0] += len(event.data)

        with Store.create(path, cluster_size=cluster_size, key=key, iter_time=10) as store:
            store.write_section("volatilestate", b"v" * 9000)
            store.image.file.observers.append(count)
            start = time.perf_counter()
            for i in range(writes):
                store.write_section("permall", permall(i))
            plain = writes / (time.perf_counter() - start)
            plain_bytes = written[0] / writes
            written[0] = 0
            start = time.perf_counter()
            snap_time = 0.0
            for i in range(writes):
                if i % snapshot_every == 0:
                    t = time.perf_counter()
                    store.create_snapshot(f"s{i}")
                    snap_time += time.perf_counter() - t
                store.write_section("permall", permall(writes + i))
            with_snaps = writes / (time.perf_counter() - start - snap_time)
            snap_bytes = written[0] / writes
            snapshots = writes // snapshot_every + (writes % snapshot_every > 0)
            t = time.perf_counter()
            store.apply_snapshot("s0")
            apply_ms = (time.perf_counter() - t) * 1000
        return {
            "plain": plain,
            "plain_bytes": plain_bytes,
            "snaps": with_snaps,
            "snap_bytes": snap_bytes,
            "create_ms": snap_time / snapshots * 1000,
            "apply_ms": apply_ms,
            "file_kib": os.path.getsize(path) / 1024,
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writes", type=int, default=300)
    parser.add_argument("--snapshot-every", type=int, default=10)
    args = parser.parse_args()
    print(
        "| cluster | writes/s | host bytes/write | writes/s (snapshots) | host bytes/write "
        "(snapshots) | snapshot create ms | apply ms | file KiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    rows = [(str(size), size, None) for size in CLUSTER_SIZES]
    rows.append(("4096 LUKS", 4096, b"bench passphrase"))
    for label, cluster_size, key in rows:
        r = run(cluster_size, args.writes, args.snapshot_every, key)
        print(
            f"| {label} | {r['plain']:.0f} | {r['plain_bytes']:.0f} | {r['snaps']:.0f} "
            f"| {r['snap_bytes']:.0f} | {r['create_ms']:.1f} | {r['apply_ms']:.1f} "
            f"| {r['file_kib']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

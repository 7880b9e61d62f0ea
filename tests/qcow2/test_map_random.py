"""``qcow2 map`` against ``qemu-img map`` on seeded random images.

map merges runs of contiguous clusters with slice compares instead of one step per L2
entry (the fast path of ``qcow2.l2.L2Decoder.runs``).  These images mix what that path must
stop at: holes, host-contiguous and host-scattered data, COPIED and shared clusters
(snapshots), zero clusters with and without an allocation, compressed clusters, and sizes
that end inside an L2 table.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.qcow2 import oracle
from tests.qcow2.test_cli import restore_cwd, run_both  # noqa: F401 - autouse fixture

KiB = 1024


def random_image(tmp: Path, seed: int) -> Path:
    rng = random.Random(seed)
    cluster = rng.choice([512, 4 * KiB, 64 * KiB])
    clusters = rng.randrange(cluster // 8 // 2, cluster // 8 * 3)  # 0.5 to 3 L2 tables
    size = clusters * cluster - rng.choice([0, 512, cluster // 2 if cluster > 512 else 0])
    img = oracle.create(tmp / "img.qcow2", size, cluster_size=cluster)
    # compressed writes first: qemu-io writes compressed clusters only where none is allocated
    compressed = rng.sample(range(clusters - 1), k=rng.randrange(0, 4))
    commands = [f"write -c -P 9 {c * cluster} {cluster}" for c in compressed]
    for _ in range(rng.randrange(5, 25)):
        start = rng.randrange(clusters) * cluster
        length = min(size - start, rng.choice([1, 1, 2, 7, 40, 300]) * cluster)
        if length <= 0:
            continue
        op = rng.choice(["write", "write", "write", "zero", "zero-unmap", "discard"])
        if op == "write":
            commands.append(f"write -P {rng.randrange(1, 255)} {start} {length}")
        elif op == "zero":
            commands.append(f"write -z {start} {length}")
        elif op == "zero-unmap":
            commands.append(f"write -z -u {start} {length}")
        else:
            commands.append(f"discard {start} {length}")
        if rng.random() < 0.15:
            oracle.qemu_io(img, *commands)
            commands = []
            oracle.snapshot(img, "create", f"s{len(oracle.snapshot_list(img))}")
    if commands:
        oracle.qemu_io(img, *commands)
    return img


@pytest.mark.parametrize("seed", range(24))
def test_map_matches_qemu_img_on_random_images(tmp_path: Path, seed: int) -> None:
    img = random_image(tmp_path, seed)
    for output in ("json", "human"):
        theirs, ours, _, _ = run_both(img, "map", f"--output={output}")
        assert (ours.code, ours.out, ours.err) == (theirs.code, theirs.out, theirs.err), output

"""Crash safety of writes to LUKS-encrypted images.

The write log of a session (new clusters, in-place partial sectors, COW after a snapshot,
zeroes) is replayed prefix by prefix onto a copy of the starting image.  At every prefix
qemu-img (with the key) must find no corruption and decrypt every 512-byte guest sector to
a value that sector had at some operation boundary: a sector encrypted for the wrong host
offset, or written before its cluster was hooked up, would decrypt to garbage.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import qcow2
from qcow2.io.fileio import WriteEvent
from tests.qcow2.test_luks import SECRET, q_check, q_raw

SIZE = 1024 * 1024
SECTOR = 512
#: Replaying every prefix costs two qemu-img runs each: cap the number of prefixes.
MAX_PREFIXES = 40


def _apply_events(path: Path, events: list[WriteEvent]) -> None:
    with path.open("r+b") as f:
        for event in events:
            if event.kind == "write":
                f.seek(event.offset)
                f.write(event.data)
            elif event.kind == "truncate":
                f.truncate(event.offset)


def test_every_crash_prefix_decrypts_to_known_sectors(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    rng = random.Random(7)
    with qcow2.create(str(base), SIZE, encrypt_key_secret=SECRET, encrypt_iter_time=10) as image:
        image.write(0, rng.randbytes(200_000))
    work = tmp_path / "work.qcow2"
    shutil.copyfile(base, work)
    model = bytearray(q_raw(base))
    history = [bytes(model)]
    events: list[WriteEvent] = []
    with qcow2.open(str(work), writable=True, key_secret=SECRET) as image:
        image.file.observers.append(events.append)
        image.create_snapshot("s1")
        for offset, data in (
            (100, rng.randbytes(1000)),  # COW of a shared cluster, partial sectors
            (300_000, rng.randbytes(70_000)),  # new clusters
            (150, rng.randbytes(10)),  # in place inside one sector
            (SIZE - 700, rng.randbytes(700)),
        ):
            image.write(offset, data)
            model[offset : offset + len(data)] = data
            history.append(bytes(model))
        image.write_zeroes(65536, 65536)
        model[65536 : 2 * 65536] = bytes(65536)
        history.append(bytes(model))
        image.flush()
    assert q_raw(work) == model
    known = [{h[s : s + SECTOR] for h in history} for s in range(0, SIZE, SECTOR)]
    assert len(events) > 10
    step = max(1, len(events) // MAX_PREFIXES)
    prefixes = sorted({*range(0, len(events), step), len(events)})
    for n in prefixes:
        crashed = tmp_path / f"crash{n}.qcow2"
        shutil.copyfile(base, crashed)
        _apply_events(crashed, events[:n])
        result = q_check(crashed)
        assert result["exit-code"] in (0, 3), (n, result)  # clean or leaks only
        content = q_raw(crashed)
        bad = [
            s for s in range(0, SIZE, SECTOR) if content[s : s + SECTOR] not in known[s // SECTOR]
        ]
        assert not bad, f"prefix {n}/{len(events)}: sectors {bad[:5]} hold unknown data"
        crashed.unlink()

"""Crash images from a recorded write log (``HostFile.observers`` events).

A crash test records every write/flush/truncate an operation makes, then rebuilds on a copy
of the starting image each state a crash could leave behind and checks it.
"""

from __future__ import annotations

import os
from pathlib import Path

from qcow2.io.fileio import WriteEvent

SECTOR = 512


def replay(base: bytes, events: list[WriteEvent], target: Path) -> None:
    """Write ``base`` to ``target`` and apply ``events`` (flushes are no-ops here)."""
    target.write_bytes(base)
    fd = os.open(target, os.O_RDWR)
    try:
        for ev in events:
            if ev.kind == "write":
                os.pwrite(fd, ev.data, ev.offset)
            elif ev.kind == "truncate":
                os.ftruncate(fd, ev.offset)
    finally:
        os.close(fd)


def crash_variants(events: list[WriteEvent], k: int) -> list[list[WriteEvent]]:
    """Images a crash after event ``k`` may leave: the prefix itself; the prefix where only
    the last write since the last flush reached the disk; the prefix with its last write
    torn at a sector boundary."""
    prefix = events[:k]
    variants = [prefix]
    last_flush = max((i for i, ev in enumerate(prefix) if ev.kind == "flush"), default=-1)
    pending = [ev for ev in prefix[last_flush + 1 :] if ev.kind == "write"]
    if len(pending) >= 2:
        variants.append([*prefix[: last_flush + 1], pending[-1]])
    if prefix and prefix[-1].kind == "write" and len(prefix[-1].data) > SECTOR:
        last = prefix[-1]
        cut = len(last.data) // 2 // SECTOR * SECTOR
        variants.append([*prefix[:-1], WriteEvent("write", last.offset, last.data[:cut])])
    return variants


def all_crash_variants(events: list[WriteEvent]) -> list[list[WriteEvent]]:
    """:func:`crash_variants` after every event of the log (and before the first)."""
    return [v for k in range(len(events) + 1) for v in crash_variants(events, k)]

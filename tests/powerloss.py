"""Power-loss crash states from a log recorded below the mount daemon (tests.powerloss_fs).

A disk that loses power keeps every write that a completed flush covered; of the writes
after the last completed flush, each may be lost, may have reached the disk, or may have
reached it in part (some of its 512-byte sectors), in any order.  :func:`crash_states`
rebuilds such states from the recording of a run: for every crash point (after every log
record, and before the first), the writes up to the last FSYNC of the image file before it
are applied in order onto the image as it was before the recording began, then the writes
after that FSYNC get a fate: all applied (what a killed process leaves), all lost, and
seeded random mixes of lost, applied and torn writes in a random order.

:func:`recording_fs` runs the recording file system for a ``with`` block and always
unmounts it and ends its process afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import select
import signal
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.powerloss_fs import FSYNC, MARK, MARK_NAME, TRUNCATE, WRITE, Record, read_log

__all__ = [
    "CrashState",
    "Distinct",
    "Record",
    "RecordingMount",
    "crash_image",
    "crash_states",
    "distinct_states",
    "image_key",
    "read_log",
    "recording_fs",
    "sample",
]

SECTOR = 512
#: Fates of the writes after the last flush: 0 all applied, 1 all lost, then random ones.
ALL_APPLIED, ALL_LOST = 0, 1
REPO_ROOT = Path(__file__).resolve().parent.parent

_WRITE, _FSYNC, _TRUNCATE, _MARK = (k.decode() for k in (WRITE, FSYNC, TRUNCATE, MARK))
_ATOMIC = ("lost", "applied")


# Section: the recording file system


@dataclass
class RecordingMount:
    """A running :mod:`tests.powerloss_fs`: files in ``backing`` served at ``mountpoint``."""

    backing: Path
    mountpoint: Path
    log: Path
    proc: subprocess.Popen[bytes]

    def mark(self, text: str) -> None:
        """Append a marker record (after everything the file system served so far)."""
        fd = os.open(self.mountpoint / MARK_NAME, os.O_WRONLY)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)

    def records(self) -> list[Record]:
        """The log so far."""
        return read_log(self.log)


def _mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == target for line in mounts)


def _wait_ready(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait for the ``ready`` line of the file system process (AssertionError if none)."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else b""
    if line.strip() != b"ready":
        raise AssertionError(f"recording file system did not start: {line!r}")


def _stop(proc: subprocess.Popen[bytes], mountpoint: Path) -> None:
    """SIGTERM (it unmounts itself); then unmount (lazily if need be) and kill what is left."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
    if _mounted(mountpoint):
        done = subprocess.run(["fusermount3", "-u", str(mountpoint)], check=False)
        if done.returncode != 0:
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


@contextlib.contextmanager
def recording_fs(backing: Path, mountpoint: Path, log: Path) -> Iterator[RecordingMount]:
    """Serve ``backing`` at ``mountpoint`` recording into ``log`` for the ``with`` block."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    stderr = log.with_name(log.name + ".stderr")
    with open(stderr, "wb") as errors:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.powerloss_fs", str(backing), str(mountpoint), str(log)],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=errors,
        )
    try:
        _wait_ready(proc, 30)
        yield RecordingMount(backing, mountpoint, log, proc)
    finally:
        _stop(proc, mountpoint)


# Section: crash states


@dataclass(frozen=True)
class CrashState:
    """An image a power loss right after ``records[:point]`` may leave."""

    point: int
    #: 0 all writes since the last flush applied, 1 all lost, >1 a random mix
    variant: int
    #: the text of the last marker before the crash point (None: no marker yet)
    mark: str | None
    image: bytes
    #: what happened to the writes since the last flush, for messages
    fate: str


def _apply(image: bytearray, record: Record) -> None:
    """Apply one write or truncate to ``image``."""
    if record.kind == _TRUNCATE:
        del image[record.offset :]
        image.extend(bytes(record.offset - len(image)))
        return
    end = record.offset + len(record.data)
    if end > len(image):
        image.extend(bytes(end - len(image)))
    image[record.offset : end] = record.data


def _sectors(record: Record) -> list[Record]:
    """A write split at the disk's 512-byte sector boundaries."""
    pieces, pos, data = [], record.offset, record.data
    while data:
        take = min(len(data), SECTOR - pos % SECTOR)
        pieces.append(Record(record.kind, record.name, pos, data[:take]))
        pos, data = pos + take, data[take:]
    return pieces


def _fate(pending: list[Record], variant: int, rng: random.Random) -> tuple[list[Record], str]:
    """What of ``pending`` (writes and truncates since the last flush) reached the disk."""
    if variant == ALL_APPLIED:
        return pending, f"all {len(pending)} applied"
    if variant == ALL_LOST:
        return [], f"all {len(pending)} lost"
    order = list(pending)
    rng.shuffle(order)
    reached: list[Record] = []
    counts = {"lost": 0, "applied": 0, "torn": 0}
    for record in order:
        # a write may be torn at sector boundaries; a truncate happens or does not
        choice = rng.choice(("lost", "applied", "torn") if record.kind == _WRITE else _ATOMIC)
        counts[choice] += 1
        if choice == "applied":
            reached.append(record)
        elif choice == "torn":
            reached += [piece for piece in _sectors(record) if rng.random() < 0.5]
    return reached, ", ".join(f"{n} {what}" for what, n in counts.items() if n) or "nothing pending"


def _rng(seed: int, point: int, variant: int) -> random.Random:
    return random.Random(f"{seed}/{point}/{variant}")


def crash_states(
    base: bytes, records: list[Record], name: str, *, variants: int = 6, seed: int = 0
) -> Iterator[CrashState]:
    """Every crash state of the image file ``name``: ``variants`` per crash point.

    ``base`` is the image before the recording started; ``records`` the whole log.  Points
    after a record that does not touch the image repeat the previous point's images (with
    the newer marker).
    """
    durable = bytearray(base)
    pending: list[Record] = []
    mark: str | None = None
    images: list[tuple[bytes, str]] = []
    for point in range(len(records) + 1):
        if point:
            record = records[point - 1]
            if record.kind == _MARK:
                mark = record.data.decode(errors="replace")
            elif record.name == name and record.kind in (_WRITE, _TRUNCATE):
                pending.append(record)
                images = []
            elif record.name == name and record.kind == _FSYNC:
                for done in pending:
                    _apply(durable, done)
                pending = []
                images = []
        if not images:
            for variant in range(variants):
                reached, fate = _fate(pending, variant, _rng(seed, point, variant))
                built = bytearray(durable)
                for done in reached:
                    _apply(built, done)
                images.append((bytes(built), fate))
        for variant, (image, fate) in enumerate(images):
            yield CrashState(point, variant, mark, image, fate)


def crash_image(
    base: bytes, records: list[Record], name: str, point: int, variant: int, *, seed: int = 0
) -> CrashState:
    """The one crash state :func:`crash_states` yields for ``point`` and ``variant``."""
    pending: list[Record] = []
    durable = bytearray(base)
    for record in records[:point]:
        if record.name != name:
            continue
        if record.kind in (_WRITE, _TRUNCATE):
            pending.append(record)
        elif record.kind == _FSYNC:
            for done in pending:
                _apply(durable, done)
            pending = []
    marks = [r.data.decode(errors="replace") for r in records[:point] if r.kind == _MARK]
    # the fate of a point's pending writes is drawn at the first point that had them
    first = point
    while first > 0 and not _touches(records[first - 1], name):
        first -= 1
    reached, fate = _fate(pending, variant, _rng(seed, first, variant))
    for done in reached:
        _apply(durable, done)
    return CrashState(point, variant, marks[-1] if marks else None, bytes(durable), fate)


def _touches(record: Record, name: str) -> bool:
    return record.name == name and record.kind in (_WRITE, _TRUNCATE, _FSYNC)


def image_key(image: bytes) -> str:
    """The identity of a crash image (sha256 of its bytes)."""
    return hashlib.sha256(image).hexdigest()


@dataclass
class Distinct:
    """One distinct crash image: how to rebuild it (the first crash state that produced
    it), and every marker that a crash point producing it followed (it must satisfy each)."""

    point: int
    variant: int
    fate: str
    marks: set[str | None] = field(default_factory=set)
    points: list[int] = field(default_factory=list)


def distinct_states(states: Iterable[CrashState]) -> dict[str, Distinct]:
    """Crash states deduplicated by image content, in order of first appearance.

    Images are not kept (they may be many): rebuild one with :func:`crash_image`.
    """
    out: dict[str, Distinct] = {}
    for state in states:
        key = image_key(state.image)
        entry = out.get(key)
        if entry is None:
            entry = out[key] = Distinct(state.point, state.variant, state.fate)
        entry.marks.add(state.mark)
        entry.points.append(state.point)
    return out


def sample(keys: list[str], cap: int) -> list[str]:
    """At most ``cap`` of ``keys``, spread evenly over them (deterministic)."""
    if len(keys) <= cap:
        return list(keys)
    return [keys[i * len(keys) // cap] for i in range(cap)]

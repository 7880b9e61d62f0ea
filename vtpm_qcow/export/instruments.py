"""What the mount daemon measures and records: I/O counters, the crash tests' write log and
their kill switch.

Each instrument observes; none changes what it observes.  The image file is observed through
qcow2's observer API (``HostFile.observers``: every write, flush and truncate, in order, as
it is about to happen); the file system through :class:`~vtpm_qcow.export.fuse.StoreFS`'s
``commit_observers`` (after each operation that changed the store) and ``fsync_observers``
(as each fsync request arrives).

* :class:`IoCounter`, always on: the image file's writes, bytes written, flushes and the
  time in flushes, for the control socket's ``info`` and the benchmarks.
* :class:`WriteLog`, with ``$VTPM_QCOW_WRITE_LOG`` set: every write, flush and truncate of
  the image file and every commit point, appended to that file (:func:`read_write_log`).
* ``$VTPM_QCOW_TEST_KILL_AT_FSYNC=N``: the daemon SIGKILLs itself when its Nth fsync
  request arrives, before committing anything (the crash tests' "killed between swtpm's
  msyncs").
* ``$VTPM_QCOW_TEST_FAIL_IO=KIND:N:ERRNO``: the image file's Nth host ``KIND`` call
  ("write", "flush" or "truncate", counted from the mount on) fails with ``ERRNO`` (a
  name such as ``ENOSPC``, or a number), as the host would fail it; ``N+`` fails it and
  every later one (a disk that stays full).  ``point:NAME:ERRNO`` arms qcow2's named
  fault point ``NAME`` for good.  qcow2's own hooks
  (:func:`qcow2.io.fileio.fail_host_io`, :func:`~qcow2.io.fileio.inject_fault`), armed
  for the daemon's life: the fault tests' "ENOSPC in the middle of a commit".

:func:`instrument` attaches them all to a mount.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import struct
import time
from pathlib import Path

from qcow2.io.fileio import HostFile, WriteEvent, fail_host_io, inject_fault

from ..errors import StoreError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from ..state.store import Store
    from .fuse import StoreFS

log = logging.getLogger(__name__)

WRITE_LOG_ENV = "VTPM_QCOW_WRITE_LOG"
KILL_AT_FSYNC_ENV = "VTPM_QCOW_TEST_KILL_AT_FSYNC"
FAIL_IO_ENV = "VTPM_QCOW_TEST_FAIL_IO"


class IoCounter:
    """Counts the image file's writes and flushes and times the flushes.

    A flush is timed from its event (which comes just before the fdatasync) to the next
    event on the file or the end of the store operation, whichever comes first: the
    fdatasync and the Python around it, a little more than the fdatasync alone
    (docs/BENCHMARKS.md).
    """

    def __init__(self) -> None:
        self.writes = 0
        self.bytes_written = 0
        self.flushes = 0
        #: microseconds spent in the image's flushes (fdatasync), for per-commit budgets
        self.flush_us = 0
        self._flush_since: int | None = None

    def observe(self, event: WriteEvent) -> None:
        """A :class:`HostFile` observer."""
        now = time.perf_counter_ns()
        self._end_flush(now)
        if event.kind == "flush":
            self.flushes += 1
            self._flush_since = now
        elif event.kind == "write":
            self.writes += 1
            self.bytes_written += len(event.data)

    def operation_done(self, view: str) -> None:
        """A commit observer: the store operation that flushed has returned."""
        self._end_flush(time.perf_counter_ns())

    def _end_flush(self, now: int) -> None:
        if self._flush_since is not None:
            self.flush_us += (now - self._flush_since) // 1000
            self._flush_since = None

    def counts(self) -> dict[str, int]:
        """The counters, for ``info``."""
        return {name: value for name, value in vars(self).items() if not name.startswith("_")}


# Section: the write log (crash tests)

_RECORD = struct.Struct(">cQI")  # kind, offset, length of the data that follows
_KINDS = {"write": b"W", "flush": b"F", "truncate": b"T", "commit": b"C"}


class WriteLog:
    """Appends image mutations and commit points to a file (``$VTPM_QCOW_WRITE_LOG``)."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)

    def record(self, kind: str, offset: int = 0, data: bytes = b"") -> None:
        """Append one record (written at once, so a killed daemon leaves whole records)."""
        os.write(self.fd, _RECORD.pack(_KINDS[kind], offset, len(data)) + data)

    def observe(self, event: WriteEvent) -> None:
        """A :class:`HostFile` observer."""
        self.record(event.kind, event.offset, event.data)

    def commit(self, view: str) -> None:
        """A commit observer: mark a committed state."""
        self.record("commit", 0, view.encode())


def read_write_log(path: str | os.PathLike[str]) -> list[tuple[str, int, bytes]]:
    """The records of a write log: ``(kind, offset, data)``, kind as in :class:`WriteEvent`
    or ``"commit"`` (data: the view)."""
    names = {v: k for k, v in _KINDS.items()}
    raw = Path(path).read_bytes()
    records, pos = [], 0
    while pos + _RECORD.size <= len(raw):
        kind, offset, length = _RECORD.unpack_from(raw, pos)
        pos += _RECORD.size
        records.append((names[kind], offset, raw[pos : pos + length]))
        pos += length
    return records


# Section: attaching


def _kill_at_fsync(value: str) -> Callable[[int], None]:
    try:
        target = int(value)
    except ValueError:
        raise StoreError(f"{KILL_AT_FSYNC_ENV}={value!r}: not a number") from None

    def observe(count: int) -> None:
        if count == target:
            log.warning("%s=%d: killing the daemon at this fsync", KILL_AT_FSYNC_ENV, target)
            os.kill(os.getpid(), signal.SIGKILL)

    return observe


def _errno(value: str) -> int:
    code = int(value) if value.isdigit() else getattr(errno, value.upper(), None)
    if not isinstance(code, int) or code <= 0 or code not in errno.errorcode:
        raise StoreError(f"{FAIL_IO_ENV}: no errno {value!r}")
    return code


#: The faults armed for the life of the process (entered, never left).
_faults = contextlib.ExitStack()


def arm_faults(value: str) -> None:
    """Arm what ``$VTPM_QCOW_TEST_FAIL_IO`` asks for (see the module docstring)."""
    kind, _, rest = value.partition(":")
    where, _, code = rest.rpartition(":")
    if not where or not code:
        raise StoreError(f"{FAIL_IO_ENV}={value!r}: not KIND:N:ERRNO or point:NAME:ERRNO")
    err = _errno(code)
    if kind == "point":
        _faults.enter_context(inject_fault(where, err))
    elif kind in ("write", "flush", "truncate"):
        always = where.endswith("+")
        nth = where.removesuffix("+")
        if not nth.isdigit() or int(nth) < 1:
            raise StoreError(f"{FAIL_IO_ENV}={value!r}: {nth!r} is not a call number")
        _faults.enter_context(fail_host_io(kind, int(nth), err, once=not always))
    else:
        raise StoreError(
            f"{FAIL_IO_ENV}={value!r}: {kind!r} is not write, flush, truncate or point"
        )
    log.warning("%s=%s: armed", FAIL_IO_ENV, value)


def instrument(store: Store, fs: StoreFS) -> IoCounter:
    """Attach the I/O counter (and what the environment asks for) to a mount; the counter."""
    host_file = getattr(store.image, "file", None)
    if not isinstance(host_file, HostFile):
        raise StoreError("the image has no host file to observe", path=store.path)
    io = IoCounter()
    host_file.observers.append(io.observe)
    fs.commit_observers.append(io.operation_done)
    write_log = os.environ.get(WRITE_LOG_ENV)
    if write_log:
        log_file = WriteLog(write_log)
        host_file.observers.append(log_file.observe)
        fs.commit_observers.append(log_file.commit)
    kill_at_fsync = os.environ.get(KILL_AT_FSYNC_ENV)
    if kill_at_fsync:
        fs.fsync_observers.append(_kill_at_fsync(kill_at_fsync))
    fail_io = os.environ.get(FAIL_IO_ENV)
    if fail_io:
        arm_faults(fail_io)
    return io

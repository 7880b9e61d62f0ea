"""Host file access: the only place the qcow2 package touches the image file's bytes.

Every read, write, flush and truncate of an image goes through a :class:`HostFile`.  That
gives tests two hooks without mocking anything:

* ``HostFile.observers``: callables told about every write/flush/truncate, in order.  The
  crash tests record the write log with one and replay every prefix onto a copy.
* ``fault_point(name)``: named points before each metadata commit step (QEMU's
  ``BLKDBG_EVENT``).  A test arms one with :func:`inject_fault` to make it raise, then
  checks the image with ``qemu-img check``.
* :func:`fail_host_io`: the n-th write, flush or truncate of the host file fails as the
  host would fail it (ENOSPC, EIO, ...), once or from then on, like the ``blkdebug``
  rules of qemu-iotest 026.
"""

from __future__ import annotations

import errno
import os

from ..errors import Qcow2IOError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from types import TracebackType

    Observer = Callable[["WriteEvent"], None]


class WriteEvent:
    """One mutation of the host file: ``kind`` is "write", "flush" or "truncate".

    Immutable by convention: observers receive the same event, none may change it.
    """

    __slots__ = ("data", "kind", "offset")

    def __init__(self, kind: str, offset: int = 0, data: bytes = b"") -> None:
        self.kind = kind
        self.offset = offset
        self.data = data


_armed_faults: dict[str, int] = {}


def inject_fault(name: str, err: int = errno.EIO) -> _ArmedFault:
    """Make :func:`fault_point` ``name`` raise ``OSError(err)`` inside the ``with`` block."""
    return _ArmedFault(name, err)


class _ArmedFault:
    """The context manager :func:`inject_fault` returns (armed on entry, disarmed on exit)."""

    __slots__ = ("err", "name")

    def __init__(self, name: str, err: int) -> None:
        self.name = name
        self.err = err

    def __enter__(self) -> None:
        _armed_faults[self.name] = self.err

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _armed_faults.pop(self.name, None)


def fault_point(name: str) -> None:
    """A named step of a metadata update; raises if a test armed it with inject_fault."""
    err = _armed_faults.get(name)
    if err is not None:
        raise OSError(err, f"injected fault at {name}")


_host_faults: list[_HostFault] = []


def fail_host_io(kind: str, nth: int, err: int = errno.EIO, *, once: bool = True) -> _HostFault:
    """Make the ``nth`` (1-based) host-file ``kind`` call ("write", "flush" or "truncate")
    inside the ``with`` block fail with ``OSError(err)``, and with ``once=False`` every
    later one too.  A failed write writes nothing; a failed flush leaves the writes
    unsynced.  Counted over every :class:`HostFile` (flushes with nothing to sync are not
    calls); the returned object's ``seen`` is the number of calls so far, so ``nth=0``
    only counts them."""
    if kind not in ("write", "flush", "truncate"):
        raise ValueError(f"no host file call {kind!r}")
    return _HostFault(kind, nth, err, once)


class _HostFault:
    """The context manager :func:`fail_host_io` returns (armed on entry, disarmed on exit)."""

    __slots__ = ("err", "kind", "nth", "once", "seen")

    def __init__(self, kind: str, nth: int, err: int, once: bool) -> None:
        self.kind = kind
        self.nth = nth
        self.err = err
        self.once = once
        self.seen = 0

    @property
    def fired(self) -> bool:
        """Whether the armed call was reached."""
        return 0 < self.nth <= self.seen

    def __enter__(self) -> _HostFault:
        _host_faults.append(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _host_faults.remove(self)


def _host_fault(kind: str) -> None:
    """Count one host-file ``kind`` call; raise if an armed :func:`fail_host_io` says so."""
    for fault in _host_faults:
        if fault.kind == kind:
            fault.seen += 1
            if fault.seen == fault.nth or (not fault.once and fault.fired):
                raise OSError(fault.err, os.strerror(fault.err))


#: QEMU's BDRV_MAX_LENGTH: no request reaches past it (a file offset is an off_t).
MAX_OFFSET = (1 << 63) - 1


def _host_offset(offset: int, length: int) -> int:
    """``offset`` if a host request of ``length`` bytes there is possible; else EIO, as
    QEMU's ``bdrv_check_request`` refuses it (an offset from hostile metadata with bit 63
    set, say: not a ValueError or OverflowError from the os module)."""
    if offset < 0 or length < 0 or offset > MAX_OFFSET - length:
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    return offset


class HostFile:
    """An image file opened for positioned I/O.

    Reads past the end of the file return zeros (qcow2 files need not end on a cluster
    boundary).  OSErrors become :class:`Qcow2IOError` naming the file.
    """

    def __init__(self, path: str, *, writable: bool) -> None:
        self.path = path
        self.writable = writable
        self.observers: list[Observer] = []
        #: True while a write or truncate may not be on stable storage yet.
        self.unsynced = False
        #: Number of fdatasync calls actually made (benchmarks report flushes per commit).
        self.sync_count = 0
        try:
            self.fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        except OSError as err:
            raise Qcow2IOError(
                f"Could not open '{path}': {err.strerror}", path=path, errno=err.errno or errno.EIO
            ) from err

    def _fail(self, what: str, err: OSError) -> Qcow2IOError:
        return Qcow2IOError(f"{what} failed: {err.strerror}", path=self.path, errno=err.errno or 5)

    def size(self) -> int:
        """Current length of the file in bytes."""
        try:
            return os.fstat(self.fd).st_size
        except OSError as err:
            raise self._fail("fstat", err) from err

    def pread(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset``; the part past end of file reads as zeros."""
        try:
            data = os.pread(self.fd, length, _host_offset(offset, length))
        except OSError as err:
            raise self._fail(f"read of {length} bytes at {offset:#x}", err) from err
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data`` (any bytes-like object, not copied) at ``offset``."""
        if _host_faults:
            try:
                _host_fault("write")
            except OSError as err:
                raise self._fail(f"write of {len(data)} bytes at {offset:#x}", err) from err
        for observer in self.observers:
            observer(WriteEvent("write", offset, bytes(data)))
        self.unsynced = True
        view = memoryview(data)
        try:
            _host_offset(offset, len(data))
            while view:
                done = os.pwrite(self.fd, view, offset)
                view = view[done:]
                offset += done
        except OSError as err:
            raise self._fail(f"write of {len(data)} bytes at {offset:#x}", err) from err

    def flush(self) -> None:
        """Make every completed write durable (fdatasync).

        Nothing to do, and no fdatasync, when nothing was written since the last flush:
        callers flush at every commit boundary without paying twice for the same point.
        """
        if not self.unsynced:
            return
        if _host_faults:
            try:
                _host_fault("flush")
            except OSError as err:
                raise self._fail("flush", err) from err
        for observer in self.observers:
            observer(WriteEvent("flush"))
        try:
            os.fdatasync(self.fd)
        except OSError as err:
            raise self._fail("flush", err) from err
        self.unsynced = False
        self.sync_count += 1

    def truncate(self, length: int) -> None:
        """Set the file's length."""
        if _host_faults:
            try:
                _host_fault("truncate")
            except OSError as err:
                raise self._fail(f"truncate to {length}", err) from err
        for observer in self.observers:
            observer(WriteEvent("truncate", length))
        self.unsynced = True
        try:
            os.ftruncate(self.fd, length)
        except OSError as err:
            raise self._fail(f"truncate to {length}", err) from err

    def close(self) -> None:
        """Close the descriptor (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

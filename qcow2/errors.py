"""The qcow2 package's exception hierarchy.

::

    Qcow2Error                      every error this package raises
     +-- InvalidImageError          not a usable qcow2 image (bad magic, bad header field)
     |    +-- CorruptImageError     metadata contradicts itself (offset/size of the culprit)
     +-- UnsupportedFeatureError    a feature this implementation (or QEMU) refuses
     +-- ImageLockedError           another process holds a conflicting lock
     +-- ReadOnlyError              a write on an image opened read-only or marked corrupt
     +-- SnapshotError              unknown tag, duplicate tag, refcount overflow, ...
     |    +-- SnapshotNotFoundError
     +-- BackingChainError          missing, looping or too deep backing chain
     +-- Qcow2IOError               the host file failed (wraps the OSError, keeps errno)

Messages name the file and the offending field or offset, e.g.
``disk.qcow2: L2 table offset 0x30200 unaligned (L1 index: 0x0)``.  Errors that wrap a
lower-level failure keep it as ``__cause__`` (``raise X(...) from err``).
"""

from __future__ import annotations

import errno as _errno


class Qcow2Error(Exception):
    """Base class of every error raised by the :mod:`qcow2` package.

    :ivar path: the image file concerned, if known.
    """

    #: errno that best describes the error (used by the FUSE export and the CLI).
    errno: int = _errno.EIO

    def __init__(self, message: str, *, path: str | None = None) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


class InvalidImageError(Qcow2Error):
    """The file is not a qcow2 image this package can open (bad magic, invalid header)."""

    errno = _errno.EINVAL


class CorruptImageError(InvalidImageError):
    """Metadata is inconsistent.  ``offset``/``size`` locate the offending structure."""

    errno = _errno.EIO

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        offset: int | None = None,
        size: int | None = None,
    ) -> None:
        self.offset = offset
        self.size = size
        super().__init__(message, path=path)


class UnsupportedFeatureError(Qcow2Error):
    """The image uses a feature that is refused (unknown incompatible bits, ...).

    :ivar bits: the offending feature bits, if the refusal is about feature bits.
    """

    errno = _errno.ENOTSUP

    def __init__(self, message: str, *, path: str | None = None, bits: int = 0) -> None:
        self.bits = bits
        super().__init__(message, path=path)


class ImageLockedError(Qcow2Error):
    """Another process holds a lock that conflicts with the requested access."""

    errno = _errno.EAGAIN


class ReadOnlyError(Qcow2Error):
    """A write was attempted on an image opened read-only (or marked corrupt)."""

    errno = _errno.EROFS


class SnapshotError(Qcow2Error):
    """A snapshot operation cannot be done (duplicate tag, refcount overflow, ...)."""

    errno = _errno.EINVAL


class SnapshotNotFoundError(SnapshotError):
    """No snapshot has the requested ID or name."""

    errno = _errno.ENOENT


class BackingChainError(Qcow2Error):
    """A backing file is missing, unreadable, loops back or the chain is too deep."""

    errno = _errno.ENOENT


class Qcow2IOError(Qcow2Error):
    """The host file failed; ``errno`` is the OSError's."""

    def __init__(self, message: str, *, path: str | None = None, errno: int = _errno.EIO) -> None:
        self.errno = errno
        super().__init__(message, path=path)

"""Every error the qcow2 package raises, in one tree, and the one way to signal corruption.

::

    Qcow2Error                      every error this package raises (path, errno)
     +-- InvalidImageError          not a usable qcow2 image (bad magic, bad header field)
     |    +-- CorruptImageError     metadata contradicts itself (offset/size of the culprit)
     +-- UnsupportedFeatureError    a feature this implementation (or QEMU) refuses (bits)
     +-- ImageLockedError           another process holds a conflicting lock
     +-- ReadOnlyError              a write on an image opened read-only or marked corrupt
     +-- EncryptionKeyError         an encrypted image without its key, or a wrong key
     +-- OutOfRangeError            a request outside the virtual disk (also a ValueError)
     +-- OpenOptionError            an open option QEMU refuses (also a ValueError)
     +-- RefcountRangeError         a refcount would exceed its width or drop below 0
     +-- SnapshotError              duplicate or invalid tag, too many snapshots, ...
     |    +-- SnapshotNotFoundError no snapshot has that ID or name
     |    +-- NoVmStateError        a disk-only snapshot: no VM state to read
     +-- BackingChainError          a backing chain that loops or is too deep
     |    +-- BackingOpenError      a backing file that does not open (cause nests, as QEMU's)
     +-- Qcow2IOError               the host file failed (wraps the OSError, keeps errno)
     +-- CommandError               the ``qcow2`` command's own failures (exit code)
          +-- UsageError            a command line that does not parse
          +-- OptionError           a bad ``--object`` / ``--image-opts`` argument

Every constructor takes the message and, by keyword, where it happened: ``path`` (the image
file), ``errno`` (when it differs from the class's), the header ``field`` at fault (invalid
images, refused features) and for corruption the ``offset`` and ``size`` of the culprit.
Messages name the file and the offending field or offset, e.g. ``disk.qcow2: L2 table
offset 0x30200 unaligned (L1 index: 0)``.  Errors that wrap a lower-level failure keep it
as ``__cause__`` (``raise X(...) from err``).

Fatal inconsistencies found while an image is in use go through :func:`signal_corruption`
and nowhere else (QEMU's ``qcow2_signal_corruption``).
"""

from __future__ import annotations

import errno as _errno

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NoReturn


class Qcow2Error(Exception):
    """Base class of every error raised by the :mod:`qcow2` package.

    :ivar path: the image file concerned, if known.
    :ivar message: the message without the path.
    :ivar errno: the errno that best describes the error (the FUSE export and the command
        use it); the class's default unless the constructor is given another.
    """

    errno: int = _errno.EIO

    def __init__(self, message: str, *, path: str | None = None, errno: int | None = None) -> None:
        self.path = path
        self.message = message
        if errno is not None:
            self.errno = errno
        super().__init__(f"{path}: {message}" if path else message)


class InvalidImageError(Qcow2Error):
    """The file is not a qcow2 image this package can open (bad magic, invalid header).

    :ivar field: the header field at fault (``layout.HEADER_FIELDS`` names), if one is.
    """

    errno = _errno.EINVAL

    def __init__(self, message: str, *, path: str | None = None, field: str | None = None) -> None:
        self.field = field
        super().__init__(message, path=path)


class CorruptImageError(InvalidImageError):
    """Metadata is inconsistent.  ``offset``/``size`` locate the offending structure.

    :ivar signaled: True for an inconsistency found while the image is in use (raised by
        :func:`signal_corruption`): the image then reacts as QEMU does (corrupt bit, no
        further writes); False for a refusal while opening.
    :ivar guest_offset: where a walk of the guest range met the inconsistency (the start
        of the cluster, or of the L2 table's range, QEMU's block-status query stops at),
        if it was found by one.
    """

    errno = _errno.EIO
    signaled = False
    guest_offset: int | None = None

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        offset: int | None = None,
        size: int | None = None,
        field: str | None = None,
    ) -> None:
        self.offset = offset
        self.size = size
        super().__init__(message, path=path, field=field)


class UnsupportedFeatureError(Qcow2Error):
    """The image uses a feature that is refused (unknown incompatible bits, ...).

    :ivar bits: the offending feature bits, if the refusal is about feature bits.
    :ivar field: the header field at fault, if one is.
    """

    errno = _errno.ENOTSUP

    def __init__(
        self, message: str, *, path: str | None = None, bits: int = 0, field: str | None = None
    ) -> None:
        self.bits = bits
        self.field = field
        super().__init__(message, path=path)


class ImageLockedError(Qcow2Error):
    """Another process holds a lock that conflicts with the requested access."""

    errno = _errno.EAGAIN


class ReadOnlyError(Qcow2Error):
    """A write was attempted on an image opened read-only (or marked corrupt)."""

    errno = _errno.EROFS


class EncryptionKeyError(Qcow2Error):
    """The image is encrypted and no key, or a wrong one, was given."""

    errno = _errno.EACCES

    #: qemu-img's message when an encrypted image is opened for I/O without a secret.
    MISSING_KEY = "Parameter 'encrypt.key-secret' is required for cipher"
    #: QEMU's message when no key slot accepts the passphrase.
    WRONG_KEY = "Invalid password, cannot unlock any keyslot"


class OutOfRangeError(Qcow2Error, ValueError):
    """A request outside the virtual disk, or an invalid size argument."""

    errno = _errno.EINVAL


class OpenOptionError(Qcow2Error, ValueError):
    """An open option (``overlap-check`` ...) QEMU refuses; the message is QEMU's."""

    errno = _errno.EINVAL


class RefcountRangeError(Qcow2Error):
    """A refcount update would overflow 2**refcount_bits-1 or drop below 0.

    Raised before anything is changed, so a failed multi-cluster update leaves at most
    leaks (refcounts raised earlier by the caller), never too-low refcounts.
    """

    errno = _errno.ERANGE


class SnapshotError(Qcow2Error):
    """A snapshot operation cannot be done (duplicate tag, refcount overflow, ...)."""

    errno = _errno.EINVAL


class SnapshotNotFoundError(SnapshotError):
    """No snapshot has the requested ID or name."""

    errno = _errno.ENOENT


class NoVmStateError(SnapshotError):
    """The snapshot holds no VM state (``vm_state_size`` 0: a disk-only snapshot)."""

    errno = _errno.ENODATA


class BackingChainError(Qcow2Error):
    """A backing chain that loops back to one of its images or is too deep."""

    errno = _errno.ENOENT


class BackingOpenError(BackingChainError):
    """A backing file of the chain could not be opened; ``cause`` says why.

    For a deeper layer ``cause`` is itself a BackingOpenError, and the message nests like
    QEMU's: ``Could not open backing file: Could not open backing file: ...``.
    """

    def __init__(self, image: str, backing: str, cause: Qcow2Error) -> None:
        super().__init__(
            f"Could not open backing file: {cause.message}", path=image, errno=cause.errno
        )
        #: the backing file name that failed (as resolved against ``image``'s directory)
        self.backing = backing
        self.cause = cause

    def innermost(self) -> tuple[str, Qcow2Error]:
        """The backing file that failed to open and why."""
        err = self
        while isinstance(err.cause, BackingOpenError):
            err = err.cause
        return err.backing, err.cause


class Qcow2IOError(Qcow2Error):
    """The host file failed; ``errno`` is the OSError's."""


class CommandError(Qcow2Error):
    """A failure of the ``qcow2`` command, reported as ``qemu-img: <message>``.

    :ivar code: the exit code.
    :ivar end: what follows the last line (QEMU prints some hints without a newline).
    """

    def __init__(self, message: str, code: int = 1, *, end: str = "\n") -> None:
        super().__init__(message)
        self.code = code
        self.end = end


class UsageError(CommandError):
    """A command line that does not parse; the message is qemu-img's (one line)."""


class OptionError(CommandError):
    """A bad ``--object`` / ``--image-opts`` argument; the text is qemu-img's message."""


def signal_corruption(
    message: str,
    *,
    path: str | None,
    offset: int | None = None,
    size: int | None = None,
    guest_offset: int | None = None,
    errno: int | None = None,
) -> NoReturn:
    """Report a fatal inconsistency found in an image's metadata while using it.

    QEMU's ``qcow2_signal_corruption(fatal=true)``, and the only place the driver raises
    :class:`CorruptImageError` for what it finds in use (an unaligned table or cluster
    offset, an invalid L2 entry, a write that would hit metadata, ...).  The request
    fails; ``Image`` reports the event once (:func:`corruption_line`, through
    :func:`report_corruption`), sets the corrupt bit on disk when the image is writable
    (version 3; a version 2 image has no field for it), and stops accepting writes.
    Validation while opening an image raises its own errors, as QEMU's open does.
    """
    err = CorruptImageError(message, path=path, offset=offset, size=size)
    err.signaled = True
    err.guest_offset = guest_offset
    if errno is not None:
        err.errno = errno  # what QEMU's caller reports (EIO unless told)
    raise err


def corruption_line(message: str, *, fatal: bool) -> str:
    """QEMU 7.2's stderr line for a corruption event (``qcow2_signal_corruption``)."""
    if fatal:
        return (
            f"qcow2: Marking image as corrupt: {message}; further corruption events will be "
            "suppressed"
        )
    return (
        f"qcow2: Image is corrupt: {message}; further non-fatal corruption events will be "
        "suppressed"
    )


#: Where corruption events go (see :func:`set_corruption_reporter`); None: the
#: ``qcow2`` logger at WARNING level.
_reporter: Callable[[str, str | None], None] | None = None


def set_corruption_reporter(
    reporter: Callable[[str, str | None], None] | None,
) -> Callable[[str, str | None], None] | None:
    """Send corruption events to ``reporter(line, path)`` (None: the ``qcow2`` logger);
    returns the previous reporter.  The ``qcow2`` command prints the line on stderr, as
    QEMU does."""
    global _reporter
    previous, _reporter = _reporter, reporter
    return previous


def report_corruption(line: str, path: str | None) -> None:
    """Hand one corruption event (QEMU's stderr ``line``, about image ``path``) to the
    reporter."""
    if _reporter is not None:
        _reporter(line, path)
        return
    import logging

    logging.getLogger("qcow2").warning("%s", line)


def c_hex(value: int) -> str:
    """C's ``%#x``, as QEMU's messages print numbers: ``0x``-prefixed hex, but ``0``."""
    return f"{value:#x}" if value else "0"

"""Every error the vtpm_qcow package raises, in one tree.

::

    VtpmQcowError                 every error this package raises (path, errno)
     +-- StateFormatError         bytes that are not swtpm's linear layout or a state blob
     +-- StoreError               the vTPM image cannot do what was asked (locked, no such tag...)
     |    +-- MountError          a mount point that cannot be used, mounted or unmounted
     +-- SecretError              a secret (an encrypted image's passphrase) that cannot be
     |                            read: unsafe file mode, no such key, empty, bad fd
     +-- RequestError             a control socket request the daemon refuses (bad JSON,
     |                            unknown op, missing or malformed argument)
     +-- SwtpmError               swtpm / swtpm_setup missing, failed or exited early
     +-- TpmError                 a TPM command could not be carried out
     |    +-- TpmTransportError   the transport failed: connection refused, closed, timed out
     |    +-- TpmResponseError    the TPM answered with a non-zero response code (command, rc)
     +-- VmstateError             a disk snapshot's VM state holds no readable TPM state
     |                            (no such tag, disk-only snapshot, no tpm-emulator
     |                            section, no JSON description, encrypted disk, malformed)
     +-- MonitorError             the VM's management side (QEMU's QMP, libvirt) refused or
          |                       went away
          +-- MonitorDisconnectedError  the connection went away (what the watcher
          |                       reconnects after)
          +-- QmpError            QEMU's monitor refused, went away or a job failed
          |    +-- QmpDisconnectedError  the connection went away: the outcome of the command
          |    |                  in flight is unknown (also a MonitorDisconnectedError)
          |    +-- QmpJobError    a snapshot job concluded with an error
          |    +-- AlignmentError an orchestrated VM snapshot failed; says which half and
          |                       what was undone
          +-- LibvirtError        libvirt refused, or has no such domain
               +-- LibvirtDisconnectedError  the connection to libvirtd went away (also a
                                  MonitorDisconnectedError)

Every constructor takes the message and, by keyword, where it happened: ``path`` (the
image, mount point, socket or QMP address concerned) and ``errno`` (when it differs from
the class's).  The message is what went wrong, the string ``PATH: message``.

qcow2's errors (:class:`qcow2.errors.Qcow2Error`) pass through unchanged where they already
say what is wrong; :data:`HANDLED` names both trees for the places that report either kind
as one line (the command, the daemon's control socket, the watcher).  The FUSE export gives
the kernel each error's ``errno``.
"""

from __future__ import annotations

import errno as _errno
import os

from qcow2.errors import Qcow2Error


class VtpmQcowError(Exception):
    """Base class of every error raised by :mod:`vtpm_qcow`.

    :ivar path: what the error is about (image, mount point, socket), if known.
    :ivar message: the message without the path.
    :ivar errno: the errno that best describes the error (what the FUSE export answers).
    """

    errno: int = _errno.EIO

    def __init__(
        self,
        message: str,
        *,
        path: str | os.PathLike[str] | None = None,
        errno: int | None = None,
    ) -> None:
        self.path = os.fspath(path) if path is not None else None
        self.message = message
        if errno is not None:
            self.errno = errno
        super().__init__(f"{self.path}: {message}" if self.path is not None else message)


class StateFormatError(VtpmQcowError):
    """Data is not in swtpm's linear layout or state-blob format."""

    errno = _errno.EINVAL


class StoreError(VtpmQcowError):
    """The vTPM state store cannot carry out the request."""


class MountError(StoreError):
    """A mount point that cannot be used, or a mount that cannot be made or undone."""


class SecretError(VtpmQcowError):
    """A secret cannot be read from where it was said to be (never holds the secret)."""

    errno = _errno.EACCES


class RequestError(VtpmQcowError):
    """A control socket request the daemon refuses (bad JSON, unknown op, bad argument)."""

    errno = _errno.EINVAL


class SwtpmError(VtpmQcowError):
    """swtpm or swtpm_setup is missing, failed, or exited unexpectedly."""


class TpmError(VtpmQcowError):
    """A TPM command could not be carried out (transport failure or malformed response)."""


class TpmTransportError(TpmError):
    """The transport to the TPM failed: connection refused, closed, or timed out."""


class TpmResponseError(TpmError):
    """The TPM answered with a non-zero response code.

    :ivar command: the command code that failed.
    :ivar rc: the TPM_RC value.
    """

    def __init__(self, command: int, rc: int, *, name: str | None = None) -> None:
        self.command = command
        self.rc = rc
        super().__init__(f"TPM2_{name or f'0x{command:x}'}: response code 0x{rc:03x}")


class VmstateError(VtpmQcowError):
    """The TPM state of a disk snapshot's VM state cannot be read (``path``: the disk, or
    ``DISK@TAG`` for the stream); the message says why, in one line."""

    errno = _errno.ENODATA


class MonitorError(VtpmQcowError):
    """The VM's management side failed: QEMU's QMP monitor or libvirt (``path``: the QMP
    socket or the libvirt URI and domain)."""


class MonitorDisconnectedError(MonitorError):
    """The connection to the VM's management side went away."""


class QmpError(MonitorError):
    """A QMP command, job or connection failed (``path``: the QMP socket)."""


class QmpDisconnectedError(QmpError, MonitorDisconnectedError):
    """The QMP connection went away; the outcome of the command in flight is unknown."""


class QmpJobError(QmpError):
    """A snapshot job concluded with an error (``query-jobs[].error``)."""


class AlignmentError(QmpError):
    """An orchestrated operation failed; the message says which half and what was undone."""


class LibvirtError(MonitorError):
    """libvirt refused a call, or has no such domain (``path``: URI and domain)."""


class LibvirtDisconnectedError(LibvirtError, MonitorDisconnectedError):
    """The connection to libvirtd went away (libvirtd stopped or restarted)."""


#: What the places that report any failure as one line catch: both packages' trees.
HANDLED: tuple[type[VtpmQcowError], type[Qcow2Error]] = (VtpmQcowError, Qcow2Error)

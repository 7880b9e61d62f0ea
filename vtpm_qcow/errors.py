"""The vtpm_qcow package's exception hierarchy.

::

    VtpmQcowError                 every error this package raises (one line, names the file)
     +-- StateFormatError         bytes that are not swtpm's linear layout or a state blob
     +-- StoreError               the vTPM image cannot do what was asked (locked, no such tag...)
     +-- SwtpmError               swtpm / swtpm_setup missing, failed or exited early
     +-- QmpError                 QEMU's monitor refused, went away or a job failed

qcow2 errors (:class:`qcow2.errors.Qcow2Error`) pass through unchanged where they already say
what is wrong; the CLI prints either kind as one line and exits non-zero.
"""

from __future__ import annotations


class VtpmQcowError(Exception):
    """Base class of every error raised by :mod:`vtpm_qcow`."""


class StateFormatError(VtpmQcowError):
    """Data is not in swtpm's linear layout or state-blob format."""


class StoreError(VtpmQcowError):
    """The vTPM state store cannot carry out the request."""


class SwtpmError(VtpmQcowError):
    """swtpm or swtpm_setup is missing, failed, or exited unexpectedly."""


class QmpError(VtpmQcowError):
    """A QMP command, job or connection failed."""

"""The FUSE views of a store and the mount daemon that serves them (with its control socket)."""

from __future__ import annotations

#: The views a store can be mounted as (:mod:`vtpm_qcow.export.fuse`); here so that the
#: command's parser lists them without importing pyfuse3 and trio.
VIEWS = ("file", "dir")

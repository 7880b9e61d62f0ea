"""``vtpm-qcow migrate-prepare``: the image, byte for byte, where the destination host
will serve it (live migration without shared storage, docs/MIGRATION.md).

Unlike ``clone`` (new clusters, snapshot dates of now) this is the image file itself: every
snapshot with its id, date and clock, the encryption and key slots as they are.  A served
image is read by its mount daemon between two of its commits (the control socket's
``image-file``); an image nobody holds is read under a reader's lock (no writer can start
meanwhile).  The copy is written beside ``dest`` in a temporary file, flushed, opened and
checked, then linked into place, which fails if ``dest`` appeared meanwhile: an existing
file is never replaced and a crash leaves no partial ``dest``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import qcow2
from qcow2.errors import ImageLockedError

from ..errors import StoreError
from ..export.control import ControlClient, daemon_answers
from .plainstate import fsync_dir


@dataclass(frozen=True)
class Prepared:
    """What :func:`prepare` wrote."""

    source: str
    dest: str
    size: int
    snapshots: tuple[str, ...]


def read_image_file(source: str, *, control: str | None = None) -> bytes:
    """``source``'s file, consistent: through its mount daemon when one serves it."""
    try:
        image = qcow2.open(source, writable=False)
    except ImageLockedError:
        client = ControlClient(control) if control else ControlClient.for_image(source)
        with client:
            if control:
                client.ping()
            elif not daemon_answers(client):
                raise StoreError(
                    "held by a process that is not a vtpm-qcow daemon (QEMU?): stop it, "
                    "or copy it with 'vtpm-qcow clone'",
                    path=source,
                ) from None
            return client.image_file()
    with image, open(source, "rb") as file:  # a reader's lock: no writer meanwhile
        return file.read()


def prepare(
    source: str | os.PathLike[str], dest: str | os.PathLike[str], *, control: str | None = None
) -> Prepared:
    """Copy vTPM image ``source`` to the new file ``dest`` (see the module)."""
    source, dest = os.fspath(source), os.fspath(dest)
    if not os.path.exists(source):
        raise StoreError("no such image", path=source)
    if os.path.lexists(dest):
        raise StoreError("already exists: migrate-prepare never overwrites", path=dest)
    data = read_image_file(source, control=control)
    directory = Path(dest).parent
    if not directory.is_dir():
        raise StoreError("no such directory", path=str(directory))
    fd, tmp = tempfile.mkstemp(prefix=f".{Path(dest).name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        with qcow2.open(tmp, writable=False) as copy:  # what QEMU's reader makes of it
            tags = tuple(s.name for s in copy.snapshots)
        try:
            os.link(tmp, dest)
        except FileExistsError:
            raise StoreError(
                "already exists: migrate-prepare never overwrites", path=dest
            ) from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    fsync_dir(directory)
    return Prepared(source, dest, len(data), tags)

"""``vtpm-qcow clone``: an independent copy of a (live) vTPM image.

The source is read like a backup (:func:`~vtpm_qcow.backup.archive.capture_image`: through
the mount daemon's ``capture`` when one serves it, so a clone of a running VM's TPM is one
committed state, never a torn one) and written as a new image: every snapshot with its tag,
in order, then the current state; ``flatten`` copies the current state only.  The copy
shares nothing with the source (new clusters, its own file), has the source's capacity and,
for an encrypted source, its encryption and passphrase.  Snapshot dates become the clone's
time (as in a qcow2 backup).

``identity`` (``--new-identity``): the copy gets a freshly manufactured TPM state instead of
the source's (the caller runs swtpm_setup): a new EK and new certificates, for a VM made
from a template.  Nothing of the source's TPM follows: not its EK, its NV indices or the
keys that sealed data depends on, and not its snapshots, whose states hold the old identity
(applying one would bring it back).

The destination is never overwritten: it is written beside and linked into place, which
fails if a file of that name appeared meanwhile.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import StoreError
from ..state.capture import StateCapture
from ..state.secret import OPTIONS_HINT
from ..state.store import Store
from .archive import capture_image
from .plainstate import fsync_dir


@dataclass(frozen=True)
class Cloned:
    """What :func:`clone` wrote."""

    source: str
    dest: str
    snapshots: tuple[str, ...]
    new_identity: bool


def clone(
    source: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    flatten: bool = False,
    identity: bytes | None = None,
    control: str | None = None,
    key: bytes | None = None,
) -> Cloned:
    """Copy vTPM image ``source`` to the new image ``dest`` (see the module).

    ``identity``: a manufactured linear layout that replaces the source's state (no
    snapshots follow).  ``key``: the passphrase of an encrypted source; the clone is
    encrypted with it.  Raises :class:`StoreError` (nothing written) when ``dest`` exists.
    """
    src, path = os.fspath(source), Path(dest)
    if path.exists() or path.is_symlink():
        raise StoreError("already exists: a clone never overwrites", path=path)
    if not path.parent.is_dir():
        raise StoreError("no such directory", path=path.parent)
    if key is None and Store.is_encrypted(src):
        raise StoreError(
            f"is LUKS-encrypted: its clone is encrypted with its secret ({OPTIONS_HINT})",
            path=src,
        )
    copy_snapshots = not flatten and identity is None
    taken = capture_image(src, snapshots=copy_snapshots, control=control, key=key)
    if identity is None and not taken.layout and not taken.snapshots:
        raise StoreError("holds no TPM state to clone", path=src)
    _write(taken, path, identity, key)
    return Cloned(src, str(path), tuple(s.tag for s in taken.snapshots), identity is not None)


def _write(taken: StateCapture, path: Path, identity: bytes | None, key: bytes | None) -> None:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    tmp.unlink()
    try:
        size = max(taken.linear_size, len(identity or b""))
        with Store.create(tmp, size=size, key=key) as store:
            for snap in taken.snapshots:
                store.create_snapshot(snap.tag, layout=snap.layout or None)
            store.replace_layout(identity if identity is not None else taken.layout)
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())
        os.chmod(tmp, 0o640)
        try:
            os.link(tmp, path)  # unlike a rename, never replaces a file that appeared
        except FileExistsError as err:
            raise StoreError("appeared during the clone; left as it is", path=path) from err
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


__all__: Sequence[str] = ("Cloned", "clone")

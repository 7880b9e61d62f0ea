"""Consistent backups of (live) vTPM images, with a digest manifest: write, verify, restore.

A backup is taken from a :class:`~vtpm_qcow.state.capture.StateCapture`, which
:func:`capture_image` reads consistently: through the mount daemon's ``capture`` control op
when a daemon holds the image (one committed generation, read between two FUSE requests),
directly when nobody holds it, and as a repeated shared read (until two reads agree) when
another process such as QEMU's qemu-storage-daemon holds it.

Formats (``DEST`` is replaced atomically: temporary file or directory, fsync, rename):

``qcow2``
    a standalone vTPM image holding the current state and every snapshot (same tags, in the
    same order; their dates become the backup's time, the original dates are in the
    manifest).  With a snapshot tag: that snapshot's state and no snapshots.
``raw``
    the linear file (``swtpm --tpmstate backend-uri=file://DEST``).
``dir``
    a directory of dir backend files (``swtpm --tpmstate dir=DEST``).

The manifest ``DEST.manifest.json`` beside it records the xxh3-128 digest of each section
(and of each snapshot's sections) and of every file written; :func:`verify_backup` re-checks
them (plus a ``qemu-img check`` equivalent for qcow2 backups).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import xxhash

import qcow2
from qcow2.errors import ImageLockedError, Qcow2Error

from ..errors import HANDLED, StateFormatError, StoreError
from ..export.control import ControlClient, daemon_answers, held_image_error
from ..state.capture import (
    StateCapture,
    capture_store,
    section_digests,
    state_digest_of,
)
from ..state.secret import OPTIONS_HINT
from ..state.store import DEFAULT_SIZE, Store
from . import FORMATS
from .plainstate import (
    copy_atomically,
    fsync_dir,
    is_tpm2,
    layout_from_dir,
    layout_from_file,
    layout_sections,
    write_atomically,
    write_state_files,
)

MANIFEST_SUFFIX: Final = ".manifest.json"
MANIFEST_VERSION: Final = 1
#: Shared reads of an image another process holds, until two consecutive ones agree.
SHARED_READ_ATTEMPTS: Final = 8
#: Files are hashed in chunks of this size (a huge garbage file must not fill memory).
HASH_CHUNK: Final = 1 << 20
#: Largest manifest read (bounds memory on a garbage file).
MAX_MANIFEST: Final = 64 * 1024 * 1024

#: ``progress(done, total, what)`` for long operations.
Progress = Callable[[int, int, str], None]


def _no_progress(done: int, total: int, what: str) -> None:
    """The default progress callback: silent."""


# Section: consistent capture


def capture_image(
    image: str | os.PathLike[str],
    *,
    tag: str | None = None,
    snapshots: bool = True,
    control: str | None = None,
    key: bytes | None = None,
) -> StateCapture:
    """A consistent capture of ``image``'s state (see the module docstring for how);
    ``key`` unlocks an encrypted image opened here (a daemon holding it has its own)."""
    path = os.fspath(image)
    try:
        store = Store.open(path, writable=False, key=key)
    except ImageLockedError:
        return _capture_held(path, tag=tag, snapshots=snapshots, control=control, key=key)
    with store:
        return _undated(capture_store(store, tag=tag, snapshots=snapshots))


def _undated(capture: StateCapture) -> StateCapture:
    """A capture read outside a daemon: its store's generation counter means nothing."""
    return dataclasses.replace(capture, generation=None)


def _capture_held(
    path: str, *, tag: str | None, snapshots: bool, control: str | None, key: bytes | None
) -> StateCapture:
    """Through the mount daemon holding ``path``; without one, a repeated shared read."""
    client = ControlClient(control) if control else ControlClient.for_image(path)
    with client:
        if control:
            client.ping()  # the user named a daemon: its own error if it does not answer
        elif not daemon_answers(client):
            return _capture_shared(path, tag=tag, snapshots=snapshots, key=key)
        return client.capture(tag=tag, snapshots=snapshots)


def _capture_shared(
    path: str, *, tag: str | None, snapshots: bool, key: bytes | None
) -> StateCapture:
    """Read an image another process (QEMU) holds until two reads agree."""
    previous: StateCapture | None = None
    failure: Qcow2Error | StateFormatError | None = None
    for _ in range(SHARED_READ_ATTEMPTS):
        try:
            with Store.open(path, writable=False, force_share=True, key=key) as store:
                current = _undated(capture_store(store, tag=tag, snapshots=snapshots))
        except (Qcow2Error, StateFormatError) as err:
            previous, failure = None, err  # read mid-update (or damaged): try again
            continue
        if previous is not None and current == previous:
            return current
        previous, failure = current, None
    if failure is not None:  # the last read failed: the image may simply be damaged
        raise failure
    raise StoreError(
        "in use by another process (QEMU?) and changing too fast for a consistent "
        "shared read; back it up through a vtpm-qcow mount daemon or stop that process",
        path=path,
    )


# Section: writing backups


def manifest_path(dest: str | os.PathLike[str]) -> Path:
    """Where the manifest of backup ``dest`` lives: ``DEST.manifest.json`` beside it."""
    return Path(str(dest).rstrip("/") + MANIFEST_SUFFIX)


def _state_entry(layout: bytes, source: str) -> dict[str, Any]:
    sections = section_digests(layout, source)
    return {"sections": sections, "state_digest": state_digest_of(sections)}


def _file_digests(root: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """Size and xxh3-128 of each file ``root/name`` (``""``: ``root`` itself), streamed."""
    out = {}
    for name in names:
        hasher, size = xxhash.xxh3_128(), 0
        with open(root / name if name else root, "rb") as file:
            while chunk := file.read(HASH_CHUNK):
                hasher.update(chunk)
                size += len(chunk)
        out[name or root.name] = {"size": size, "xxh3_128": hasher.hexdigest()}
    return out


def write_backup(
    capture: StateCapture,
    dest: str | os.PathLike[str],
    *,
    fmt: str = "qcow2",
    overwrite: bool = False,
    progress: Progress = _no_progress,
    key: bytes | None = None,
) -> dict[str, Any]:
    """Write ``capture`` as a backup in ``fmt`` at ``dest`` plus its manifest; the manifest.

    ``key`` (the capture of an encrypted image): the backup stays encrypted, a qcow2 image
    LUKS-encrypted with the same passphrase; raw and dir backups (plain state) are refused.
    """
    if fmt not in FORMATS:
        raise StoreError(f"unknown backup format {fmt!r} (one of {', '.join(FORMATS)})", path=dest)
    if key is not None and fmt != "qcow2":
        raise StoreError(
            f"is encrypted: its backup stays encrypted (--format qcow2), a {fmt} backup "
            "would hold the plain state ('vtpm-qcow export' writes that on purpose)",
            path=capture.source,
        )
    path = Path(str(dest).rstrip("/") or "/")
    sections = layout_sections(capture.layout, capture.source)
    if not sections:
        raise StoreError("holds no TPM state to back up", path=capture.source)
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise StoreError("already exists (use --overwrite)", path=path)
    if not path.parent.is_dir():
        raise StoreError("no such directory", path=path.parent)
    tpm2 = is_tpm2(sections)
    try:
        if fmt == "raw":
            write_atomically(path, capture.layout)
            files = _file_digests(path, [""])
        elif fmt == "dir":
            files = _write_dir_backup(path, sections, tpm2=tpm2)
        else:
            _write_qcow2_backup(capture, path, progress, key)
            files = _file_digests(path, [""])
    except OSError as err:
        raise StoreError(
            f"cannot write: {err.strerror or err}", path=path, errno=err.errno
        ) from err
    manifest = {
        "vtpm_qcow_backup": MANIFEST_VERSION,
        "format": fmt,
        "source": capture.source,
        "created": dt.datetime.now(dt.UTC).isoformat(),
        "generation": capture.generation,
        "linear_size": capture.linear_size,
        "tpm2": tpm2,
        "state": _state_entry(capture.layout, capture.source),
        "snapshots": [
            {
                "tag": snap.tag,
                "id": snap.id,
                "date": snap.date,
                "vm_state_size": snap.vm_state_size,
                **_state_entry(snap.layout, f"{capture.source}@{snap.tag}"),
            }
            for snap in (capture.snapshots if fmt == "qcow2" else ())
        ],
        "files": files,
    }
    text = json.dumps(manifest, indent=2) + "\n"
    try:
        write_atomically(manifest_path(path), text.encode())
    except OSError as err:
        raise StoreError(
            f"cannot write: {err.strerror}", path=manifest_path(path), errno=err.errno
        ) from err
    return manifest


def _write_dir_backup(
    path: Path, sections: dict[str, bytes], *, tpm2: bool
) -> dict[str, dict[str, Any]]:
    """A dir backend directory, built aside and renamed into place."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    old: Path | None = None
    try:
        write_state_files(tmp, sections, tpm2=tpm2)
        os.chmod(tmp, 0o750)
        files = _file_digests(tmp, sorted(os.listdir(tmp)))
        if path.exists() or path.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / "x")
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return files


def _write_qcow2_backup(
    capture: StateCapture, path: Path, progress: Progress, key: bytes | None
) -> None:
    """A standalone vTPM image: each snapshot's state then snapshotted, then the current."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    tmp.unlink()
    total = len(capture.snapshots) + 1
    try:
        with Store.create(tmp, size=capture.linear_size, key=key) as store:
            for number, snap in enumerate(capture.snapshots, 1):
                progress(number - 1, total, f"snapshot {snap.tag}")
                store.replace_layout(snap.layout, source=f"{capture.source}@{snap.tag}")
                store.create_snapshot(snap.tag)
            progress(total - 1, total, "current state")
            store.replace_layout(capture.layout, source=capture.source)
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())
        os.chmod(tmp, 0o640)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        progress(total, total, "done")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# Section: verifying and reading backups


@dataclass
class Verification:
    """What :func:`verify_backup` found: ``problems`` is empty for a good backup."""

    backup: str
    format: str = ""
    problems: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)
    #: what could not be checked and why (an encrypted backup verified without its key)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True if every digest (and the qcow2 check) matched."""
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        """JSON fields."""
        return {
            "backup": self.backup,
            "format": self.format,
            "ok": self.ok,
            "checked": self.checked,
            "problems": self.problems,
            "notes": self.notes,
        }


def read_manifest(backup: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of ``backup`` (StoreError if missing or malformed)."""
    path = manifest_path(backup)
    try:
        if path.stat().st_size > MAX_MANIFEST:
            raise StoreError("too large for a backup manifest", path=path)
        manifest = json.loads(path.read_bytes())
    except OSError as err:
        raise StoreError(
            f"cannot read backup manifest: {err.strerror}", path=path, errno=err.errno
        ) from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StoreError("backup manifest is not JSON", path=path) from err
    if not isinstance(manifest, dict) or manifest.get("vtpm_qcow_backup") != MANIFEST_VERSION:
        raise StoreError("not a vtpm-qcow backup manifest (version 1)", path=path)
    if manifest.get("format") not in FORMATS:
        raise StoreError(f"unknown backup format {manifest.get('format')!r}", path=path)
    for key, kind in (("state", dict), ("snapshots", list), ("files", dict)):
        if not isinstance(manifest.get(key), kind):
            raise StoreError(f"manifest field {key!r} missing or malformed", path=path)
    if not all(isinstance(snap, dict) for snap in manifest["snapshots"]):
        raise StoreError("manifest field 'snapshots' holds a non-object", path=path)
    return manifest


def read_backup(backup: str | os.PathLike[str], fmt: str, key: bytes | None = None) -> StateCapture:
    """The state a backup holds (current layout, and snapshots for qcow2)."""
    path = Path(str(backup).rstrip("/") or "/")
    if fmt == "raw":
        return StateCapture(str(path), 0, layout_from_file(path), ())
    if fmt == "dir":
        if not path.is_dir():
            raise StoreError("not a directory (a dir backup)", path=path)
        layout, _tpm2 = layout_from_dir(path)
        return StateCapture(str(path), 0, layout, ())
    with Store.open(path, writable=False, key=key) as store:
        return capture_store(store)


def _compare(found: Verification, what: str, expected: Any, actual: Any) -> None:
    found.checked.append(what)
    if expected != actual:
        found.problems.append(f"{found.backup}: {what} differs from the manifest")


def verify_backup(backup: str | os.PathLike[str], key: bytes | None = None) -> Verification:
    """Re-check a backup against its manifest: files, sections, snapshots, qcow2 check
    (``key``: the passphrase of an encrypted qcow2 backup, for its sections)."""
    path = Path(str(backup).rstrip("/") or "/")
    manifest = read_manifest(path)
    fmt = str(manifest["format"])
    found = Verification(str(path), fmt)
    if not (path.exists()):
        raise StoreError("no such file or directory", path=path)
    try:
        if fmt == "dir":
            names = sorted(os.listdir(path))
            actual_files = _file_digests(path, names)
        else:
            actual_files = _file_digests(path, [""])
    except OSError as err:
        raise StoreError(f"cannot read: {err.strerror}", path=path, errno=err.errno) from err
    for name in sorted(set(manifest["files"]) | set(actual_files)):
        _compare(found, f"file {name}", manifest["files"].get(name), actual_files.get(name))
    if fmt == "qcow2":
        _check_qcow2(found, path, key)
        if key is None and Store.is_encrypted(path):
            found.notes.append(
                f"{path}: LUKS-encrypted: its files and qcow2 structure were checked; give "
                f"its secret ({OPTIONS_HINT}) to check the TPM state inside"
            )
            return found
    try:
        held = read_backup(path, fmt, key)
    except HANDLED as err:
        found.problems.append(str(err))
        return found
    state = _state_entry(held.layout, str(path))
    _compare(found, "state sections", manifest["state"].get("sections"), state["sections"])
    expected_snaps = {s.get("tag"): s.get("sections") for s in manifest["snapshots"]}
    actual_snaps = {s.tag: section_digests(s.layout, f"{path}@{s.tag}") for s in held.snapshots}
    _compare(found, "snapshot tags", list(expected_snaps), list(actual_snaps))
    for tag, sections in expected_snaps.items():
        _compare(found, f"snapshot {tag!r} sections", sections, actual_snaps.get(tag))
    return found


def _check_qcow2(found: Verification, path: Path, key: bytes | None) -> None:
    """``qemu-img check`` through the qcow2 library: no corruption, leak or error.  An
    encrypted image's metadata is not encrypted: without the key its structure is checked
    all the same (the library's check reads no guest data)."""
    found.checked.append("qcow2 check")
    try:
        with qcow2.open(str(path), key_secret=key) as image:
            if image.encrypted and key is None:
                from qcow2.check import check_image

                result = check_image(image, None)
            else:
                result = image.check()
    except Qcow2Error as err:
        found.problems.append(str(err))
        return
    if result.error or result.corruptions or result.leaks or result.check_errors:
        found.problems.append(
            f"{path}: qcow2 check: {result.corruptions} corruptions, {result.leaks} leaks, "
            f"{result.check_errors} errors{': ' + result.error if result.error else ''}"
        )


# Section: restoring


def restore_backup(
    backup: str | os.PathLike[str],
    image: str | os.PathLike[str],
    *,
    snapshot: str | None = None,
    key: bytes | None = None,
) -> dict[str, Any]:
    """Verify ``backup``, then make its state ``image``'s current state (``key``: the
    passphrase of an encrypted backup and of an encrypted image).

    An existing image keeps its snapshots and gets the backup's state in one atomic commit
    (like ``import``); ``snapshot`` picks the state of one of a qcow2 backup's snapshots.  A
    missing image is created: a copy of a qcow2 backup (with its snapshots) or a new image
    holding a raw/dir backup's state.  Returns the verification and the restored sections.
    """
    found = verify_backup(backup, key)
    if not found.ok:
        raise StoreError(found.problems[0])
    held = read_backup(backup, found.format, key)
    layout = held.layout
    if snapshot is not None:
        chosen = [s for s in held.snapshots if s.tag == snapshot]
        if not chosen:
            raise StoreError(f"backup holds no snapshot '{snapshot}'", path=backup)
        layout = chosen[0].layout
    target = Path(image)
    if not target.exists() and found.format == "qcow2" and snapshot is None:
        copy_atomically(Path(backup), target)
    elif not target.exists():
        size = read_manifest(backup).get("linear_size")
        if not isinstance(size, int) or size < len(layout):
            size = max(DEFAULT_SIZE, len(layout))  # not covered by the digests: sanitized
        with Store.create(target, size=size, key=key) as new:
            new.replace_layout(layout, source=str(backup))
    else:
        try:
            store = Store.open(target, key=key)
        except ImageLockedError as err:
            raise held_image_error(target, "a restore") from err
        with store:
            store.replace_layout(layout, source=str(backup))
    return {"verification": found.to_dict(), "sections": section_digests(layout, str(backup))}


__all__ = [
    "FORMATS",
    "Verification",
    "capture_image",
    "manifest_path",
    "read_backup",
    "read_manifest",
    "restore_backup",
    "verify_backup",
    "write_backup",
]

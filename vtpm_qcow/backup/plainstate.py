"""Import and export of plain swtpm state: a dir backend directory or a linear file.

A directory holds ``tpm2-00.permall``, ``tpm2-00.volatilestate``, ``tpm2-00.savestate``
(``tpm-00.*`` for a TPM 1.2); a linear file is what ``backend-uri=file://`` uses.  Both
become the store's linear layout; an import replaces the whole state in one atomic commit.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Final

from ..errors import StateFormatError, StoreError
from ..state import linear
from ..state.blob import permall_tpm_version
from ..state.store import Store

#: Largest plain state file read (swtpm's states are tens of KiB; this bounds memory).
MAX_STATE_FILE: Final = 64 * 1024 * 1024


def _read_bounded(path: Path) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_STATE_FILE:
            raise StateFormatError(f"{size} bytes, too large for TPM state", path=path)
        return path.read_bytes()
    except OSError as err:
        raise StoreError(f"cannot read: {err.strerror}", path=path, errno=err.errno) from err


def layout_from_dir(directory: Path) -> tuple[bytes, bool]:
    """The linear layout of a dir backend's state files, and whether they are TPM 2.0."""
    found: dict[bool, dict[str, Path]] = {True: {}, False: {}}
    try:
        names = sorted(os.listdir(directory))
    except OSError as err:
        raise StoreError(f"cannot list: {err.strerror}", path=directory, errno=err.errno) from err
    for name in names:
        parsed = linear.section_of_file_name(name)
        if parsed is not None:
            section, tpm2 = parsed
            found[tpm2][section] = directory / name
    if found[True] and found[False]:
        raise StateFormatError("holds both TPM 1.2 and TPM 2.0 state files", path=directory)
    tpm2 = bool(found[True])
    files = found[tpm2]
    if "permall" not in files:
        raise StateFormatError("no tpm2-00.permall or tpm-00.permall", path=directory)
    data = linear.empty_layout()
    for section in linear.SECTION_NAMES:  # slot order: permall first
        if section in files:
            blob = _read_bounded(files[section])
            if not blob:
                raise StateFormatError("empty state file", path=files[section])
            update = linear.store_section(data, section, blob, source=str(files[section]))
            data = linear.apply_update(data, update)
    return data, tpm2


def layout_from_file(path: Path) -> bytes:
    """A linear state file's bytes up to the end of its last section, validated.

    ``path`` may be a block device (a Proxmox VE ``tpmstate0`` volume on LVM, ZFS or
    Ceph): its size is its end, and only the header and the sections are read, so a
    volume of any size costs a few reads.
    """
    try:
        with open(path, "rb") as file:
            size = file.seek(0, os.SEEK_END)
            file.seek(0)
            head = file.read(linear.HEADER_SIZE)
            header = linear.parse_header(head, size=size, source=str(path))
            if header.end > MAX_STATE_FILE:
                raise StateFormatError(
                    f"sections end at {header.end} bytes, too large for TPM state", path=path
                )
            data = head + file.read(max(0, header.end - len(head)))
    except OSError as err:
        raise StoreError(f"cannot read: {err.strerror}", path=path, errno=err.errno) from err
    if header.slot("permall").allocated is False:
        raise StateFormatError("linear file holds no permall section", path=path)
    if len(data) < header.end:
        raise StateFormatError(f"{len(data)} bytes, sections end at {header.end}", path=path)
    return data[: header.end]


def is_block_device(path: Path) -> bool:
    """True if ``path`` is a block device (a raw volume of LVM, ZFS, Ceph...)."""
    try:
        return stat.S_ISBLK(path.stat().st_mode)
    except OSError:
        return False


def padded(layout: bytes, size: int | None, *, target: Path) -> bytes:
    """``layout`` zero-filled to ``size`` bytes (a raw volume's size); None: as it is."""
    if size is None:
        return layout
    if size < len(layout):
        raise StoreError(
            f"the state needs {len(layout)} bytes, more than the volume's {size}", path=target
        )
    return layout + bytes(size - len(layout))


def write_volume(device: Path, layout: bytes, *, expect: int | None = None) -> int:
    """Write ``layout`` over block device ``device`` in place, the rest of the device zeroed
    (no old TPM state left behind), and flush; returns the device's size (``expect``:
    refused unless it is that).

    A device node is never replaced by a file (a rename would do that); the write is not
    atomic: stop whatever uses the volume first.  A device larger than
    :data:`MAX_STATE_FILE` is refused (a TPM state volume is a few MiB: a bigger one is
    the wrong device), and so is one the kernel holds (``O_EXCL``: mounted, in a VG...).
    """
    try:
        fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC | os.O_EXCL)
    except OSError as err:
        raise StoreError(f"cannot open: {err.strerror}", path=device, errno=err.errno) from err
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        if size > MAX_STATE_FILE:
            raise StoreError(
                f"is a block device of {size} bytes, far larger than a TPM state volume: "
                "not written (the wrong device?)",
                path=device,
            )
        if expect is not None and expect != size:
            raise StoreError(f"is a block device of {size} bytes, not {expect}", path=device)
        data = padded(layout, size, target=device)
        pos = 0
        while pos < size:
            chunk = data[pos : pos + (1 << 20)]
            written = os.pwrite(fd, chunk, pos)
            if written <= 0:
                raise StoreError(f"short write at {pos}", path=device)
            pos += written
        os.fsync(fd)
    except OSError as err:
        raise StoreError(f"cannot write: {err.strerror}", path=device, errno=err.errno) from err
    finally:
        os.close(fd)
    return size


def read_state(source: str | os.PathLike[str]) -> bytes:
    """The linear layout of plain state: a dir backend directory or a linear file (or a
    raw volume: a block device)."""
    path = Path(source)
    if path.is_dir():
        return layout_from_dir(path)[0]
    if path.exists():
        return layout_from_file(path)
    raise StoreError("no such file or directory", path=path)


def import_state(
    store: Store,
    source: str | os.PathLike[str],
    *,
    snapshot: str | None = None,
    overwrite: bool = False,
) -> dict[str, int]:
    """Replace the store's state with a dir or linear file's; returns section sizes.

    With ``snapshot``, the state is filed as snapshot ``snapshot`` instead (one atomic
    commit; the current state and the other snapshots stay; an existing tag needs
    ``overwrite``): how a history kept as plain states (a storage's snapshots of a
    Proxmox VE ``tpmstate0`` volume, copies of a state directory) moves in.
    """
    data = read_state(source)
    if snapshot is None:
        store.replace_layout(data, source=os.fspath(source))
        return {name: info.size for name, info in store.sections().items()}
    store.create_snapshot(snapshot, layout=data, overwrite=overwrite)
    return {name: len(blob) for name, blob in layout_sections(data, os.fspath(source)).items()}


def replace_atomically(
    path: Path, fill: Callable[[BinaryIO], object], *, mode: int = 0o640
) -> None:
    """Write ``path`` through ``fill(file)`` on a temporary file, fsync, rename, fsync the dir.

    A crash leaves either the old file or the new one under ``path``, never a part.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            fill(out)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    replace_atomically(path, lambda out: out.write(data))


def copy_atomically(source: Path, path: Path) -> None:
    """Replace ``path`` with a copy of file ``source`` atomically and durably."""
    with open(source, "rb") as src:
        replace_atomically(path, lambda out: shutil.copyfileobj(src, out))


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def layout_sections(layout: bytes, source: str) -> dict[str, bytes]:
    """The blobs of a linear layout's sections, by name (absent ones left out)."""
    out = {}
    for name in linear.SECTION_NAMES:
        blob = linear.read_section(layout, name, source=source) if layout else None
        if blob is not None:
            out[name] = blob
    return out


def is_tpm2(sections: dict[str, bytes]) -> bool:
    """TPM 2.0 unless the permall blob says TPM 1.2 (encrypted state counts as 2.0)."""
    return permall_tpm_version(sections.get("permall", b"")) != "1.2"


def write_state_files(directory: Path, sections: dict[str, bytes], *, tpm2: bool) -> None:
    """Write dir backend files into ``directory``, each atomically; absent sections removed."""
    for name in linear.SECTION_NAMES:
        file = directory / linear.dir_file_name(name, tpm2=tpm2)
        if name in sections:
            write_atomically(file, sections[name])
        else:
            file.unlink(missing_ok=True)


def export_layout(
    layout: bytes,
    target: str | os.PathLike[str],
    *,
    source: str,
    as_dir: bool | None = None,
    tpm2: bool | None = None,
    raw_size: int | None = None,
) -> dict[str, int]:
    """Write a linear layout (read consistently from ``source``) as a dir or a linear file.

    ``as_dir=None`` decides by the target: an existing directory (or a path ending in
    ``/``) gets state files, anything else a linear file.  Dir file names follow the TPM
    version (``tpm2-00.*`` or ``tpm-00.*``): ``tpm2=None`` reads it from the permall blob
    (TPM 2.0 if it is encrypted).  A linear file is zero-filled to ``raw_size`` (a raw
    volume's size, e.g. Proxmox VE's 4 MiB ``tpmstate0``); a block device is written in
    place, filled to its own size (:func:`write_volume`).  Returns section sizes.
    """
    path = Path(target)
    if as_dir is None:
        as_dir = path.is_dir() or str(target).endswith("/")
    sections = layout_sections(layout, source)
    if not sections:
        raise StoreError("holds no TPM state to export", path=source)
    if tpm2 is None:
        tpm2 = is_tpm2(sections)
    if raw_size is not None and as_dir:
        raise StoreError("a directory has no volume size: --size is for a linear file", path=path)
    try:
        if as_dir:
            path.mkdir(parents=True, exist_ok=True)
            write_state_files(path, sections, tpm2=tpm2)
        elif is_block_device(path):
            write_volume(path, layout, expect=raw_size)
        else:
            write_atomically(path, padded(layout, raw_size, target=path))
    except OSError as err:
        raise StoreError(f"cannot write: {err.strerror}", path=path, errno=err.errno) from err
    return {name: len(blob) for name, blob in sections.items()}


def export_state(
    store: Store,
    target: str | os.PathLike[str],
    *,
    as_dir: bool | None = None,
    tpm2: bool | None = None,
) -> dict[str, int]:
    """Write an open store's state as a dir backend directory or a linear file.

    See :func:`export_layout`; a held image is exported consistently by the CLI through
    :func:`vtpm_qcow.backup.archive.capture_image`.
    """
    return export_layout(store.layout(), target, source=store.path, as_dir=as_dir, tpm2=tpm2)

"""The TPM state QEMU saved in a disk snapshot's VM state (``savevm`` / ``snapshot-save``).

Every internal snapshot QEMU saves with VM state holds the ``tpm-emulator`` device section
of the migration stream: the three blobs QEMU got from swtpm with ``CMD_GET_STATEBLOB``
(permanent, volatile, savestate).  :func:`read_tpm_vmstate` finds it without reading RAM
(measured facts: ``../shared/reference/vmstate-tpm.md``):

1. the disk whose snapshot ``tag`` (by name, never by ID) has ``vm_state_size > 0`` holds
   the stream, at :attr:`qcow2.snapshots.SnapshotView.vm_state_offset` of the snapshot's
   own L1 table (qcow2 reads it: :meth:`~qcow2.snapshots.SnapshotView.read_vmstate`);
2. the stream is ``QEVM`` version 3, sections, ``QEMU_VM_EOF`` (0x00), then the JSON
   description ``0x06, be32 length, JSON`` running exactly to the end; it is found in the
   stream's tail (1 MiB, growing x4 up to :data:`MAX_TAIL`);
3. the description sizes every device (FULL) section, in stream order, so walking it
   backwards from EOF gives each section's start: ``u8 0x04, be32 section_id, u8 idlen,
   idstr, be32 instance_id, be32 version_id``, the body, and ``0x7e be32 section_id``
   (the footer, absent for machine types older than 2.4: tried without when the header
   does not check out with it);
4. the ``tpm-emulator`` body is ``be32 flags, be32 size, data`` three times.  The
   permanent blob is swtpm's migration wrapper (blob header flags 0x04, TLV 4 around the
   TLV 1 of the state); :func:`unwrap_permanent` turns it into the bytes swtpm stores as
   ``tpm2-00.permall`` (linear slot 0), header flags 0 and the TLV 1, so it compares with
   :meth:`~vtpm_qcow.state.store.Store.snapshot_section` ``(tag, "permall")`` byte for byte.

Everything read is bounded (:data:`MAX_TAIL`, :data:`MAX_SECTION`): a hostile image or
stream gives a :class:`~vtpm_qcow.errors.VmstateError` naming the file, never a traceback
or an allocation of its claimed sizes.  A snapshot saved with ``-machine
suppress-vmdesc=on`` has no description: refused with that reason (a forward parse of the
RAM section would be the fallback; not implemented).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import qcow2
from qcow2.errors import Qcow2Error
from qcow2.image import open_chain

from ..errors import StateFormatError, VmstateError
from ..state import linear
from ..state.blob import (
    BLOB_FLAG_MIGRATION_DATA,
    BLOB_FLAG_MIGRATION_ENCRYPTED,
    BLOB_HEADER_STRUCT,
    BLOB_HEADER_VERSION,
    TAG_MIGRATION_DATA,
    TLV_HEADER_STRUCT,
    parse_blob,
)

#: The stream's magic and the only version QEMU writes since 0.1x.
QEVM_MAGIC: Final = b"QEVM"
QEVM_VERSION: Final = 3
#: Section types and markers of the stream (``migration/savevm.c``).
SECTION_FULL: Final = 0x04
SECTION_FOOTER: Final = 0x7E
VM_EOF: Final = 0x00
VM_DESCRIPTION: Final = 0x06
#: The TPM's device section (``backends/tpm/tpm_emulator.c``, vmsd version 0).
TPM_SECTION: Final = "tpm-emulator"
#: ``PTM_STATE_FLAG_ENCRYPTED``: the blob is encrypted with swtpm's ``--migration-key``.
PTM_STATE_FLAG_ENCRYPTED: Final = 0x02

#: First tail read; grows x4 while the description does not fit.
FIRST_TAIL: Final = 1024 * 1024
#: Largest tail read (the description of a big VM is some 100 KiB; QEMU's own tools look
#: within the last 16 MiB too).
MAX_TAIL: Final = 16 * 1024 * 1024
#: Largest tpm-emulator section accepted (swtpm's state is some 10-100 KiB).
MAX_SECTION: Final = 16 * 1024 * 1024

_BE32: Final = struct.Struct(">I")
_SECTION_HEAD: Final = 1 + 4 + 1  # type, section_id, idlen (then idstr)
_SECTION_TAIL: Final = 4 + 4  # instance_id, version_id
_FOOTER: Final = 1 + 4
_SUBSECTION_HEAD: Final = 1 + 1 + 4  # 0x05, namelen (then name), version_id

#: A read of the stream: ``(offset, length) -> bytes`` (short only past its end).
Reader = Callable[[int, int], bytes]


@dataclass(frozen=True)
class TpmVmstate:
    """The TPM state a disk snapshot's VM state holds.

    ``permanent`` is unwrapped: byte-identical to what swtpm stores as ``permall``
    (``tpm2-00.permall``, linear slot 0).  ``volatile`` and ``savestate`` are the raw blobs
    as QEMU got them from ``CMD_GET_STATEBLOB`` (volatile belongs with the snapshot's RAM;
    savestate is empty for TPM 2.0).  A blob QEMU saved empty is None.  ``encrypted``:
    the blobs are encrypted with swtpm's ``--migration-key``; ``permanent`` is then None
    (it cannot be unwrapped without the key) and the other two stay raw.
    """

    tag: str
    disk: str
    permanent: bytes | None
    volatile: bytes | None
    savestate: bytes | None
    encrypted: bool


@dataclass(frozen=True)
class TpmSection:
    """The raw tpm-emulator section: each blob's flags and bytes, where it sat."""

    offset: int
    permanent_flags: int
    permanent: bytes
    volatile_flags: int
    volatile: bytes
    savestate_flags: int
    savestate: bytes
    footer: bool


@dataclass(frozen=True)
class DiskSnapshot:
    """One snapshot of one disk, as the snapshot table tells (nothing else read)."""

    disk: str
    tag: str
    id: str
    vm_state_size: int


# Section: the disks


def _open(disk: str, shared: bool) -> qcow2.Image:
    """The disk alone: savevm writes the VM state into the top image, so its backing
    chain is not opened (nor needed: it may be elsewhere, or gone)."""
    try:
        image = open_chain(disk, "qcow2", force_share=shared, backing=False)
        assert isinstance(image, qcow2.Image)
        return image
    except Qcow2Error as err:
        raise VmstateError(f"cannot open the disk: {err.message}", path=disk) from err
    except OSError as err:
        raise VmstateError(f"cannot open the disk: {err.strerror or err}", path=disk) from err


def disk_snapshots(disks: Sequence[str], *, shared: bool = True) -> list[DiskSnapshot]:
    """Every snapshot of every disk (disk order, then table order): tag, ID and VM state
    size, from the snapshot tables alone."""
    out = []
    for disk in disks:
        with _open(disk, shared) as image:
            out += [DiskSnapshot(disk, e.name, e.id, e.vm_state_size) for e in image.snapshots]
    return out


def read_tpm_vmstate(disks: Sequence[str], tag: str, *, shared: bool = True) -> TpmVmstate:
    """The TPM blobs of snapshot ``tag`` (by name only) from the disk holding its VM state.

    ``disks`` are the VM's qcow2 disks; the first whose snapshot ``tag`` has VM state is
    read (QEMU puts it on one disk only).  ``shared`` opens them as ``qemu-img -U`` does,
    without QEMU's locks (QEMU may have them open: read right after a savevm).  Reads the
    snapshot table, the stream's first 8 bytes, its tail and the TPM section.  Raises
    :class:`VmstateError` (one line naming the file): no snapshot ``tag``, no VM state on
    any disk, an encrypted disk, no description (``suppress-vmdesc``), no tpm-emulator
    section, or a malformed stream.
    """
    if not disks:
        raise VmstateError(f"no disk given to read snapshot '{tag}' from")
    seen_on: list[str] = []
    for disk in disks:
        with _open(disk, shared) as image:
            entry = next((e for e in image.snapshots if e.name == tag), None)
            if entry is None:
                continue
            seen_on.append(disk)
            if entry.vm_state_size <= 0:
                continue
            if image.encrypted:
                raise VmstateError(
                    f"snapshot '{tag}': the disk is encrypted; its VM state cannot be read",
                    path=disk,
                )
            try:
                view = image.snapshot(tag, name_only=True)
                size = view.vm_state_size
                section = find_tpm_section(view.read_vmstate, size, source=f"{disk}@{tag}")
            except Qcow2Error as err:
                raise VmstateError(
                    f"snapshot '{tag}': cannot read its VM state: {err.message}", path=disk
                ) from err
            return tpm_vmstate(tag, disk, section)
    if not seen_on:
        raise VmstateError(f"no snapshot '{tag}' on {_names(disks)}")
    raise VmstateError(
        f"snapshot '{tag}' holds no VM state on {_names(seen_on)} (a disk-only snapshot)"
    )


def state_with_saved_permall(base: bytes, saved: TpmVmstate) -> bytes:
    """Linear file ``base`` (the vTPM state the other sections come from) with the
    permanent state ``saved`` holds as its permall: the TPM state QEMU saved, as swtpm
    would store it.  VmstateError (one line: why) when ``saved`` cannot give it: no
    permanent blob, blobs encrypted with a migration key, or a clear blob for an swtpm that
    keeps its state encrypted with its own key (it could not load what would be filed)."""
    where = f"{saved.disk}@{saved.tag}"
    if saved.encrypted:
        raise VmstateError("the TPM blobs are encrypted with a migration key", path=where)
    if saved.permanent is None:
        raise VmstateError("the snapshot saved no permanent TPM state", path=where)
    try:
        permall = linear.read_section(base, "permall") if base else None
        state_key = permall is not None and parse_blob(permall).encrypted
    except StateFormatError:
        state_key = False
    if state_key:
        raise VmstateError("swtpm encrypts its state, the vmstate does not", path=where)
    return linear.apply_update(base, linear.store_section(base, "permall", saved.permanent))


def _names(disks: Sequence[str]) -> str:
    return ", ".join(disks)


def tpm_vmstate(tag: str, disk: str, section: TpmSection) -> TpmVmstate:
    """The decoded :class:`TpmVmstate` of a raw section."""
    source = f"{disk}@{tag}"
    encrypted = bool(
        (section.permanent_flags | section.volatile_flags | section.savestate_flags)
        & PTM_STATE_FLAG_ENCRYPTED
    )
    permanent: bytes | None = None
    if section.permanent and not encrypted:
        permanent, encrypted = unwrap_permanent(section.permanent, source=source)
    return TpmVmstate(
        tag=tag,
        disk=disk,
        permanent=permanent,
        volatile=section.volatile or None,
        savestate=section.savestate or None,
        encrypted=encrypted,
    )


# Section: the stream


def _malformed(source: str, what: str) -> VmstateError:
    return VmstateError(f"malformed VM state: {what}", path=source)


def _read_exact(read: Reader, offset: int, length: int, source: str) -> bytes:
    data = read(offset, length)
    if len(data) != length:
        raise _malformed(source, f"{length} bytes at {offset} read as {len(data)}")
    return data


def find_tpm_section(read: Reader, size: int, *, source: str) -> TpmSection:
    """Find and decode the tpm-emulator section of a stream of ``size`` bytes.

    ``read(offset, length)`` reads the stream; ``source`` names it in errors.
    """
    if size < len(QEVM_MAGIC) + 4:
        raise _malformed(source, f"{size} bytes, too short for a migration stream")
    head = _read_exact(read, 0, 8, source)
    if head[:4] != QEVM_MAGIC:
        raise _malformed(source, f"magic {head[:4].hex()}, not QEVM")
    version = _BE32.unpack_from(head, 4)[0]
    if version != QEVM_VERSION:
        raise _malformed(source, f"stream version {version}, not {QEVM_VERSION}")
    eof, desc = _find_description(read, size, source)
    devices = desc.get("devices")
    if not isinstance(devices, list):
        raise _malformed(source, "the JSON description has no 'devices' list")
    if not any(isinstance(d, dict) and d.get("name") == TPM_SECTION for d in devices):
        raise VmstateError(
            f"no {TPM_SECTION} section in the VM state (the VM had no swtpm TPM)", path=source
        )
    problems = []
    for footer in (True, False):
        try:
            return _walk(read, eof, devices, footer=footer, source=source)
        except VmstateError as err:
            problems.append(err.message)
    raise VmstateError(problems[0], path=source)


def _find_description(read: Reader, size: int, source: str) -> tuple[int, dict[str, Any]]:
    """The stream offset of ``QEMU_VM_EOF`` and the parsed JSON description."""
    length = min(size, FIRST_TAIL)
    while True:
        start = size - length
        tail = _read_exact(read, start, length, source)
        found = _description_in(tail)
        if found is not None:
            break
        if length >= min(size, MAX_TAIL):
            raise VmstateError(
                "no JSON device description at the end of the VM state (saved with "
                "suppress-vmdesc=on, or truncated): the TPM section cannot be located",
                path=source,
            )
        length = min(size, length * 4, MAX_TAIL)
    marker = found
    if marker == 0:
        eof_byte = _read_exact(read, start - 1, 1, source)[0] if start else None
    else:
        eof_byte = tail[marker - 1]
    if eof_byte != VM_EOF:
        raise _malformed(source, "the device description does not follow QEMU_VM_EOF")
    try:
        desc = json.loads(tail[marker + 5 :].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise _malformed(source, f"the JSON device description does not parse ({err})") from None
    if not isinstance(desc, dict):
        raise _malformed(source, "the JSON device description is not an object")
    return start + marker - 1, desc


def _description_in(tail: bytes) -> int | None:
    """Index in ``tail`` of the 0x06 that starts a description running exactly to its end.

    JSON text holds no 0x06 byte, so searching back from the end finds the marker before
    anything of the description could look like one."""
    end = len(tail)
    pos = end
    while True:
        pos = tail.rfind(VM_DESCRIPTION.to_bytes(1, "big"), 0, pos)
        if pos < 0:
            return None
        json_start = pos + 5
        if (
            json_start < end
            and tail[json_start] == ord("{")
            and _BE32.unpack_from(tail, pos + 1)[0] == end - json_start
        ):
            return pos


def _body_length(vmsd: Any, source: str, depth: int = 0) -> int:
    """Bytes a described section (or subsection) body takes: each field's size times its
    array length, plus each subsection with its header."""
    if not isinstance(vmsd, dict) or depth > 64:
        raise _malformed(source, "a device description entry is not an object")
    total = 0
    fields = vmsd.get("fields", [])
    subsections = vmsd.get("subsections", [])
    if not isinstance(fields, list) or not isinstance(subsections, list):
        raise _malformed(source, "a device description has no field list")
    for field in fields:
        size = field.get("size") if isinstance(field, dict) else None
        count = field.get("array_len", 1) if isinstance(field, dict) else None
        if not isinstance(size, int) or not isinstance(count, int) or size < 0 or count < 0:
            raise _malformed(source, f"a field without a valid size in {vmsd.get('name')!r}")
        total += size * count
    for sub in subsections:
        name = sub.get("vmsd_name") if isinstance(sub, dict) else None
        if not isinstance(name, str):
            raise _malformed(source, "a subsection without a vmsd_name")
        total += _SUBSECTION_HEAD + len(name.encode()) + _body_length(sub, source, depth + 1)
    return total


def _walk(read: Reader, eof: int, devices: list[Any], *, footer: bool, source: str) -> TpmSection:
    """Walk the described sections back from ``eof`` to the tpm-emulator one and decode it."""
    pos = eof
    for dev in reversed(devices):
        name = dev.get("name") if isinstance(dev, dict) else None
        if not isinstance(name, str):
            raise _malformed(source, "a device description without a name")
        idstr = name.encode()
        body = _body_length(dev, source)
        length = _SECTION_HEAD + len(idstr) + _SECTION_TAIL + body + (_FOOTER if footer else 0)
        pos -= length
        if pos < 8:
            raise _malformed(source, "the described device sections do not fit the stream")
        if name == TPM_SECTION:
            if length > MAX_SECTION:
                raise _malformed(source, f"{TPM_SECTION} section of {length} bytes")
            data = _read_exact(read, pos, length, source)
            return _decode_section(data, pos, dev, body, footer=footer, source=source)
    raise VmstateError(f"no {TPM_SECTION} section in the VM state", path=source)


def _decode_section(
    data: bytes, offset: int, dev: dict[str, Any], body: int, *, footer: bool, source: str
) -> TpmSection:
    where = f"{TPM_SECTION} section at {offset}"
    idstr = TPM_SECTION.encode()
    section_id = _BE32.unpack_from(data, 1)[0]
    head_end = _SECTION_HEAD + len(idstr)
    if data[0] != SECTION_FULL or data[5] != len(idstr) or data[6:head_end] != idstr:
        raise _malformed(source, f"no section header where the description puts the {where}")
    instance, version = struct.unpack_from(">II", data, head_end)
    if instance != dev.get("instance_id", 0) or version != dev.get("version", 0):
        raise _malformed(
            source, f"{where}: instance {instance} version {version} differ from the description"
        )
    if footer and (
        data[-5] != SECTION_FOOTER or _BE32.unpack_from(data, len(data) - 4)[0] != section_id
    ):
        raise _malformed(source, f"{where}: no footer for section id {section_id}")
    pos = head_end + _SECTION_TAIL
    end = pos + body
    blobs: list[tuple[int, bytes]] = []
    for name in ("permanent", "volatile", "savestate"):
        if pos + 8 > end:
            raise _malformed(source, f"{where}: truncated before the {name} blob")
        flags, size = struct.unpack_from(">II", data, pos)
        pos += 8
        if pos + size > end:
            raise _malformed(source, f"{where}: {name} blob of {size} bytes overruns the section")
        blobs.append((flags, bytes(data[pos : pos + size])))
        pos += size
    if pos != end:
        raise _malformed(source, f"{where}: {end - pos} bytes after the savestate blob")
    (pf, perm), (vf, vol), (sf, save) = blobs
    return TpmSection(offset, pf, perm, vf, vol, sf, save, footer)


# Section: the blobs


def unwrap_permanent(blob: bytes, *, source: str) -> tuple[bytes | None, bool]:
    """swtpm's migration blob of the permanent state -> the bytes swtpm stores as permall.

    Returns ``(permall, encrypted)``; ``permall`` is None when the blob is encrypted with a
    migration key.  The migration blob is ``header(flags 0x04) + TLV(4, inner)``; the stored
    file is ``header(flags 0) + inner`` (swtpm's ``SWTPM_NVRAM_PrependHeader``).
    """
    return unwrap_blob(blob, source=source, what="permanent")


def unwrap_blob(blob: bytes, *, source: str, what: str) -> tuple[bytes | None, bool]:
    """Any of swtpm's migration blobs (``what``: permanent, volatile) -> the bytes swtpm
    stores for that state (``tpm2-00.permall``, ``tpm2-00.volatilestate``); see
    :func:`unwrap_permanent`."""
    if len(blob) < BLOB_HEADER_STRUCT.size:
        raise _malformed(source, f"{what} blob of {len(blob)} bytes has no header")
    version, min_version, hdrsize, flags, totlen = BLOB_HEADER_STRUCT.unpack_from(blob)
    if totlen != len(blob) or min_version > BLOB_HEADER_VERSION or version < min_version:
        raise _malformed(
            source, f"{what} blob header (version {version}, totlen {totlen}) not swtpm's"
        )
    if not BLOB_HEADER_STRUCT.size <= hdrsize <= len(blob):
        raise _malformed(source, f"{what} blob hdrsize {hdrsize} out of range")
    if flags & BLOB_FLAG_MIGRATION_ENCRYPTED:
        return None, True
    if not flags & BLOB_FLAG_MIGRATION_DATA:
        raise _malformed(source, f"{what} blob flags 0x{flags:x} lack migration-data")
    pos = hdrsize
    while pos + TLV_HEADER_STRUCT.size <= len(blob):
        tag, length = TLV_HEADER_STRUCT.unpack_from(blob, pos)
        start = pos + TLV_HEADER_STRUCT.size
        if start + length > len(blob):
            raise _malformed(source, f"{what} blob TLV {tag} overruns the blob")
        if tag == TAG_MIGRATION_DATA:
            inner = blob[start : start + length]
            header = BLOB_HEADER_STRUCT.pack(
                BLOB_HEADER_VERSION,
                1,
                BLOB_HEADER_STRUCT.size,
                0,
                BLOB_HEADER_STRUCT.size + len(inner),
            )
            return header + inner, False
        pos = start + length
    raise _malformed(source, f"{what} blob has no migration-data TLV")


__all__: Sequence[str] = (
    "DiskSnapshot",
    "TpmSection",
    "TpmVmstate",
    "disk_snapshots",
    "find_tpm_section",
    "read_tpm_vmstate",
    "tpm_vmstate",
    "unwrap_blob",
    "unwrap_permanent",
)

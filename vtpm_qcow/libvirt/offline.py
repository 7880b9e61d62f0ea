"""Snapshots of a shut-off domain: what happened while no QEMU (and no follower) ran.

libvirt snapshots a shut-off domain with ``qemu-img snapshot -c/-a/-d`` on its disks; no
event reaches anyone.  So the hook looks when the domain is next prepared, against what it
recorded when the domain was last released (:func:`record`: libvirt's current snapshot and a
fingerprint of the disks' active state):

* a disk snapshot the image lacks is filed with the TPM state of the disk state it holds.
  Its disk state is recognized by fingerprint (the disks' L1 tables, COPIED flags masked:
  ``snapshot -c`` copies the active table, ``snapshot -a`` copies the snapshot's back): the
  disks as the domain left them mean the TPM state it left, the image's active state; the
  disks of an existing snapshot mean that snapshot's TPM state.  A snapshot with VM state
  (taken while the domain ran, missed by the follower) gets the state of its vmstate.
  Anything else is reported, not invented.
* a tag the disks lost is deleted from the image.
* a revert (the disks' active state is no longer the one the domain left, or libvirt's
  current snapshot changed to an older one) applies the matching vTPM snapshot before
  swtpm starts: the TPM starts where the disks do.

The record lives in :data:`RECORD_DIR` (``<uuid>.json``); libvirt's snapshot metadata is
read from its files (a hook must not call libvirt).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import xxhash

import qcow2
from qcow2.errors import Qcow2Error
from qcow2.format.layout import L1E_OFFSET_MASK

from ..errors import LibvirtError, VmstateError
from ..state.capture import capture_store
from ..state.store import Store
from ..vm.orchestrate import quoted
from ..vm.vmstate import read_tpm_vmstate, state_with_saved_permall
from .domain import DomainInfo

#: Where the hook keeps, per domain, what the disks looked like when it last stopped.
RECORD_DIR = Path("/var/lib/vtpm-qcow/libvirt")
#: libvirt's snapshot metadata (``<name>/<snapshot>.xml``).
SNAPSHOT_META = Path("/var/lib/libvirt/qemu/snapshot")


@dataclass(frozen=True)
class Record:
    """The domain as it was left: libvirt's current snapshot, the disks' fingerprint."""

    current: str | None
    disks: str


def _masked(l1: Sequence[int], n: int) -> bytes:
    return b"".join((e & L1E_OFFSET_MASK).to_bytes(8, "big") for e in l1[:n])


def _l1_entries(image: qcow2.Image, size: int) -> int:
    h = image.header
    span = h.cluster_size * h.l2_entries
    return -(-size // span)


def disks_fingerprint(files: Sequence[str], tag: str | None = None) -> str | None:
    """A digest of the disks' active state (or of snapshot ``tag``'s on every disk; None
    if a disk lacks it)."""
    digest = xxhash.xxh3_128()
    try:
        for path in files:
            with qcow2.open(path, force_share=True) as image:
                if tag is None:
                    n = _l1_entries(image, image.virtual_size)
                    digest.update(_masked(image.l1_table, n))
                    continue
                if tag not in {e.name for e in image.snapshots}:
                    return None
                view = image.snapshot(tag, name_only=True)
                digest.update(_masked(view.l1_table, _l1_entries(image, view.virtual_size)))
    except (Qcow2Error, OSError) as err:
        raise LibvirtError(f"disk fingerprint: {err}") from err
    return digest.hexdigest()


def libvirt_snapshots(
    name: str, meta: Path = SNAPSHOT_META
) -> tuple[dict[str, str | None], str | None]:
    """libvirt's snapshots of domain ``name`` (tag -> parent) and its current one."""
    parents: dict[str, str | None] = {}
    current = None
    folder = meta / name
    for path in sorted(folder.glob("*.xml")) if folder.is_dir() else []:
        try:
            root = ET.parse(path).getroot()
        except (ET.ParseError, OSError):
            continue
        tag = root.findtext("name")
        if not tag:
            continue
        parents[tag] = root.findtext("parent/name")
        if root.findtext("active") == "1":
            current = tag
    return parents, current


def _record_path(info: DomainInfo, records: Path) -> Path:
    return records / f"{info.uuid}.json"


def record(
    info: DomainInfo,
    *,
    current: str | None = None,
    records: Path = RECORD_DIR,
    meta: Path = SNAPSHOT_META,
) -> None:
    """Note how the domain is left (at release, and when it is enabled); ``current``:
    libvirt's current snapshot if known (else read from libvirt's metadata files)."""
    fingerprint = disks_fingerprint(info.qcow2_files) or ""
    if current is None:
        _, current = libvirt_snapshots(info.name, meta)
    records.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = _record_path(info, records)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"current": current, "disks": fingerprint}))
    tmp.replace(path)


def _load(info: DomainInfo, records: Path) -> Record | None:
    try:
        data = json.loads(_record_path(info, records).read_text())
        return Record(data.get("current"), str(data["disks"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def reconcile(
    info: DomainInfo, *, records: Path = RECORD_DIR, meta: Path = SNAPSHOT_META
) -> list[str]:
    """Bring the (unmounted) image up to what was done to the shut-off domain; report lines."""
    assert info.image is not None
    files = info.qcow2_files
    left = _load(info, records)
    _, current = libvirt_snapshots(info.name, meta)
    disk_tags: list[str] = []
    vm_state: dict[str, int] = {}
    try:
        for path in files:
            with qcow2.open(path, force_share=True) as image:
                for entry in image.snapshots:
                    if entry.name not in disk_tags:
                        disk_tags.append(entry.name)
                    vm_state[entry.name] = max(vm_state.get(entry.name, 0), entry.vm_state_size)
    except (Qcow2Error, OSError) as err:
        raise LibvirtError(f"disk snapshots: {err}") from err
    now = disks_fingerprint(files)
    lines: list[str] = []
    with Store.open(info.image) as store:
        vtpm_tags = set(store.snapshot_tags())
        known = {t: disks_fingerprint(files, t) for t in vtpm_tags if t in disk_tags}
        for tag in disk_tags:
            if tag in vtpm_tags:
                continue
            try:
                layout, how = _state_of(store, files, tag, vm_state[tag], left, known)
            except (LibvirtError, VmstateError) as err:
                lines.append(f"not filed: vTPM snapshot {quoted(tag)}: {err}")
                continue
            store.create_snapshot(tag, layout=layout)
            known[tag] = disks_fingerprint(files, tag)
            lines.append(f"created: vTPM snapshot {quoted(tag)} (offline snapshot; {how})")
        for tag in sorted(vtpm_tags - set(disk_tags)):
            store.delete_snapshot(tag)
            lines.append(f"deleted: vTPM snapshot {quoted(tag)} (disk snapshot deleted)")
        target = _reverted_to(left, now, current, known)
        if target is not None:
            store.apply_snapshot(target)
            lines.append(f"applied: vTPM snapshot {quoted(target)} (the disks were reverted)")
    return lines


def _state_of(
    store: Store,
    files: Sequence[str],
    tag: str,
    vm_state_size: int,
    left: Record | None,
    known: dict[str, str | None],
) -> tuple[bytes, str]:
    """The TPM state disk snapshot ``tag`` goes with, and how it was found."""
    if vm_state_size > 0:
        saved = read_tpm_vmstate(files, tag)
        return state_with_saved_permall(store.layout(), saved), "TPM state from its vmstate"
    fingerprint = disks_fingerprint(files, tag)
    if left is not None and fingerprint == left.disks:
        return store.layout(), "the TPM state the domain was shut down with"
    for other, other_fp in known.items():
        if other_fp == fingerprint:
            taken = capture_store(store, tag=other, snapshots=False)
            return taken.layout, f"the TPM state of {quoted(other)}, whose disks it holds"
    raise LibvirtError("its disks match neither the domain as it was shut down nor a snapshot")


def _reverted_to(
    left: Record | None, now: str | None, current: str | None, known: dict[str, str | None]
) -> str | None:
    """The vTPM snapshot the disks were reverted to since the domain stopped, if any."""
    if left is None:
        return None
    if now == left.disks and current == left.current:
        return None
    if current is not None and known.get(current) == now:
        return current if (now != left.disks or current != left.current) else None
    matches = sorted(t for t, fp in known.items() if fp == now)
    return matches[0] if now != left.disks and matches else None

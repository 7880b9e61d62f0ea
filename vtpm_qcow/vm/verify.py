"""``vtpm-qcow vm verify``: prove, offline, that a vTPM image's snapshots hold the TPM state
the VM's disk snapshots saved.

For every tag on the disks or the vTPM image: the disk snapshot's VM state holds the TPM
blobs QEMU took from swtpm at ``savevm`` time (:mod:`vtpm_qcow.vm.vmstate`); the unwrapped
permanent blob must be byte for byte the vTPM snapshot's ``permall``.  The volatile and
savestate blobs are not compared: the volatile state belongs with the snapshot's RAM (QEMU
pushes it back into swtpm on ``loadvm``) and swtpm only writes it to its state file at
shutdown; they are reported for information.

Results per tag (:data:`RESULTS`): ``match``; ``mismatch`` (which blob differs);
``missing-disk`` (on the vTPM image only); ``missing-vtpm`` (on the disks only);
``no-vmstate`` (a disk-only snapshot: nothing to compare, not a failure);
``unreadable`` (the VM state exists but holds no readable TPM state: the reason, e.g. a
migration key, no tpm-emulator section, suppress-vmdesc).  Everything is opened read-only;
``shared`` opens without QEMU's locks (``-U``), for a running VM.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from ..errors import StoreError, VmstateError
from ..state.blob import parse_blob
from ..state.store import Store
from .vmstate import DiskSnapshot, disk_snapshots, read_tpm_vmstate

#: Every result, and the ones that make the verification fail.
RESULTS: Final = ("match", "mismatch", "missing-disk", "missing-vtpm", "no-vmstate", "unreadable")
FAILING: Final = frozenset({"mismatch", "missing-disk", "missing-vtpm", "unreadable"})


@dataclass(frozen=True)
class TagResult:
    """What verification found for one tag."""

    tag: str
    result: str
    #: The disk holding the tag's VM state (None when no disk does).
    disk: str | None = None
    #: The blobs that differ (``["permanent"]``), for ``mismatch``.
    differs: tuple[str, ...] = ()
    #: One line saying why, for everything but ``match``.
    detail: str = ""
    #: Sizes of the blobs in the VM state (informational), when it was read.
    blob_sizes: dict[str, int] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        """True for a result that makes the verification fail."""
        return self.result in FAILING


def verify(
    disks: Sequence[str], vtpm: str, *, shared: bool = False, key: bytes | None = None
) -> list[TagResult]:
    """Compare every tag of ``disks`` and the vTPM image ``vtpm`` (``key``: its passphrase
    if encrypted); disk tags first (in disk and table order), then the vTPM image's own.
    Raises :class:`VmstateError` / :class:`StoreError` / qcow2 errors when an image cannot
    be opened at all."""
    on_disks = disk_snapshots(disks, shared=shared)
    with Store.open(vtpm, writable=False, force_share=shared, key=key) as store:
        vtpm_tags = store.snapshot_tags()
        order = list(dict.fromkeys([s.tag for s in on_disks] + vtpm_tags))
        return [_one(tag, on_disks, store, disks, shared) for tag in order]


def _one(
    tag: str, on_disks: list[DiskSnapshot], store: Store, disks: Sequence[str], shared: bool
) -> TagResult:
    holders = [s for s in on_disks if s.tag == tag]
    in_vtpm = tag in store.snapshot_tags()
    if not holders:
        return TagResult(tag, "missing-disk", detail=f"on the vTPM image {store.path} only")
    with_state = [s for s in holders if s.vm_state_size > 0]
    if not in_vtpm:
        where = ", ".join(dict.fromkeys(s.disk for s in holders))
        return TagResult(tag, "missing-vtpm", detail=f"on {where} only, not on the vTPM image")
    if not with_state:
        return TagResult(
            tag, "no-vmstate", detail="a disk-only snapshot: no VM state to compare with"
        )
    try:
        state = read_tpm_vmstate(disks, tag, shared=shared)
    except VmstateError as err:
        return TagResult(tag, "unreadable", disk=with_state[0].disk, detail=str(err))
    sizes = {
        "permanent": len(state.permanent or b""),
        "volatile": len(state.volatile or b""),
        "savestate": len(state.savestate or b""),
    }
    if state.encrypted:
        return TagResult(
            tag,
            "unreadable",
            disk=state.disk,
            detail="the TPM blobs are encrypted with a migration key: cannot compare",
            blob_sizes=sizes,
        )
    try:
        stored = store.snapshot_section(tag, "permall")
    except StoreError as err:
        return TagResult(tag, "unreadable", disk=state.disk, detail=str(err), blob_sizes=sizes)
    if stored is not None and parse_blob(stored).encrypted:
        return TagResult(
            tag,
            "unreadable",
            disk=state.disk,
            detail="the vTPM snapshot's permall is encrypted with a state key: cannot compare",
            blob_sizes=sizes,
        )
    if stored == state.permanent:
        return TagResult(tag, "match", disk=state.disk, blob_sizes=sizes)
    if stored is None:
        detail = "the vTPM snapshot holds no permall"
    elif state.permanent is None:
        detail = "the VM state holds no permanent blob"
    else:
        detail = (
            f"permanent blob ({len(state.permanent)} bytes) differs from the vTPM "
            f"snapshot's permall ({len(stored)} bytes)"
        )
    return TagResult(
        tag, "mismatch", disk=state.disk, differs=("permanent",), detail=detail, blob_sizes=sizes
    )


__all__: Sequence[str] = ("FAILING", "RESULTS", "TagResult", "verify")

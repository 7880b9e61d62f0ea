"""``vtpm-qcow adopt``: a VM whose internal snapshots were taken while its TPM state lived
in a plain swtpm directory (libvirt's default) or linear file moves into a vTPM image
without losing its history.

Every disk snapshot QEMU saved with VM state holds the TPM's permanent state as swtpm
handed it to QEMU (:mod:`vtpm_qcow.vm.vmstate`).  Each becomes a vTPM snapshot of the same
tag, in the disks' snapshot order, so that ``vm verify`` proves every adopted tag and a
``loadvm`` / revert finds the TPM state of its moment.  The current state comes from the
plain state the VM uses now (the command reads it: a dir or a linear file).

What an adopted snapshot holds: ``permall`` only, no ``volatilestate``.  The volatile
blob in the vmstate belongs with the snapshot's RAM: QEMU's ``loadvm`` pushes it into
swtpm itself (``CMD_SET_STATEBLOB``), never from the vTPM image.  A vTPM snapshot is read
by swtpm only when it starts on it, which is a power-on: a volatile state there would make
swtpm resume a TPM (PCRs, sessions, the started flag) of a machine that is booting
afresh; without one, swtpm starts as after a power-off, as it does for a snapshot the
watcher files from a vmstate.

Where it goes: a new image (written beside the target and renamed into place: all or
nothing), or an existing vTPM image without snapshots (``vtpm-qcow create``, an ``import``
of the current state): each snapshot is one atomic commit there.  An image that already
has snapshots is refused: two histories would interleave under one set of tags.

Not adopted, each with its reason: disk-only snapshots (no VM state: no TPM state was
saved), VM states without a readable TPM section (no TPM in the VM, ``suppress-vmdesc``,
blobs encrypted with a migration key, a damaged stream), tags a vTPM image cannot hold.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from qcow2.errors import ImageLockedError

from ..errors import StateFormatError, StoreError, VmstateError
from ..export.control import held_image_error
from ..state import linear
from ..state.store import DEFAULT_ITER_TIME, DEFAULT_SIZE, Store, check_tag
from .vmstate import disk_snapshots, read_tpm_vmstate

#: Results per disk snapshot.
ADOPTED: Final = "adopted"
SKIPPED: Final = "skipped"


@dataclass(frozen=True)
class TagOutcome:
    """One disk snapshot: adopted (the disk its VM state came from) or skipped (why)."""

    tag: str
    result: str
    disk: str | None = None
    detail: str = ""


@dataclass
class Adoption:
    """What :func:`adopt` did."""

    image: str
    tags: list[TagOutcome] = field(default_factory=list)
    #: Where the image's current state came from.
    current: str = ""
    created: bool = False

    @property
    def partial(self) -> bool:
        """True if a disk snapshot was not adopted."""
        return any(t.result != ADOPTED for t in self.tags)

    def to_dict(self) -> dict[str, Any]:
        """JSON fields."""
        return {
            "image": self.image,
            "created": self.created,
            "current": self.current,
            "partial": self.partial,
            "tags": [
                {"tag": t.tag, "result": t.result, "disk": t.disk, "detail": t.detail}
                for t in self.tags
            ],
        }


def snapshot_layout(permall: bytes, source: str) -> bytes:
    """The linear layout of an adopted snapshot: ``permall`` alone (see the module)."""
    empty = linear.empty_layout()
    return linear.apply_update(
        empty, linear.store_section(empty, "permall", permall, source=source)
    )


def read_history(
    disks: Sequence[str], *, shared: bool = False
) -> tuple[list[TagOutcome], dict[str, bytes]]:
    """Every disk snapshot tag (disk order, then table order) with its outcome, and the
    layout of each adoptable one."""
    on_disks = disk_snapshots(disks, shared=shared)
    outcomes: list[TagOutcome] = []
    layouts: dict[str, bytes] = {}
    for tag in dict.fromkeys(s.tag for s in on_disks):
        holders = [s for s in on_disks if s.tag == tag]
        try:
            check_tag(tag, holders[0].disk)
        except StoreError:
            outcomes.append(TagOutcome(tag, SKIPPED, detail="a tag a vTPM image cannot hold"))
            continue
        if not any(s.vm_state_size > 0 for s in holders):
            outcomes.append(
                TagOutcome(tag, SKIPPED, detail="a disk-only snapshot: it saved no TPM state")
            )
            continue
        try:
            state = read_tpm_vmstate(disks, tag, shared=shared)
        except VmstateError as err:
            outcomes.append(TagOutcome(tag, SKIPPED, detail=str(err)))
            continue
        if state.encrypted or state.permanent is None:
            why = (
                "its TPM blobs are encrypted with a migration key"
                if state.encrypted
                else "its VM state holds no permanent TPM state"
            )
            outcomes.append(TagOutcome(tag, SKIPPED, disk=state.disk, detail=why))
            continue
        try:
            layouts[tag] = snapshot_layout(state.permanent, f"{state.disk}@{tag}")
        except StateFormatError as err:
            outcomes.append(TagOutcome(tag, SKIPPED, disk=state.disk, detail=str(err)))
            continue
        outcomes.append(
            TagOutcome(tag, ADOPTED, disk=state.disk, detail="permall from its VM state")
        )
    return outcomes, layouts


def adopt(
    disks: Sequence[str],
    image: str | os.PathLike[str],
    *,
    current: bytes | None = None,
    current_source: str = "",
    shared: bool = False,
    size: int = DEFAULT_SIZE,
    key: bytes | None = None,
    iter_time: int = DEFAULT_ITER_TIME,
) -> Adoption:
    """Adopt the disks' snapshot history into vTPM image ``image`` (see the module).

    ``current``: the linear layout of the TPM state the VM uses now (``current_source``
    names it).  Without it, an existing image keeps its current state; a new one (or one
    without state) gets the last adopted snapshot's, and the result says so.  ``key``: the
    passphrase of an encrypted image (a new one is encrypted with it).  Raises
    :class:`StoreError` when nothing can be adopted or the image is refused; then nothing
    was written.
    """
    if not disks:
        raise VmstateError("no disk given: name the VM's disks with --disk")
    path = Path(image)
    outcomes, layouts = read_history(disks, shared=shared)
    if not layouts and current is None:
        raise StoreError(
            "nothing to adopt: no disk snapshot holds a readable TPM state and no current "
            "state was given (--state)",
            path=path,
        )
    done = Adoption(str(path), outcomes)
    needed = max([size, *(len(x) for x in layouts.values()), len(current or b"")])
    if path.exists() or path.is_symlink():
        try:
            store = Store.open(path, key=key)
        except ImageLockedError as err:
            raise held_image_error(path, "an adoption") from err
        with store:
            if store.snapshot_tags():
                raise StoreError(
                    f"already has snapshots ({', '.join(store.snapshot_tags())}): adopt "
                    "into a new image, or one without snapshots",
                    path=path,
                )
            done.current = _fill(store, outcomes, layouts, current, current_source)
        return done
    if not path.parent.is_dir():
        raise StoreError("no such directory", path=path.parent)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    tmp.unlink()
    try:
        with Store.create(tmp, size=needed, key=key, iter_time=iter_time) as store:
            done.current = _fill(store, outcomes, layouts, current, current_source)
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())
        os.chmod(tmp, 0o640)
        if path.exists() or path.is_symlink():  # appeared meanwhile: never overwritten
            raise StoreError("appeared during the adoption; left as it is", path=path)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    done.created = True
    return done


def _fill(
    store: Store,
    outcomes: list[TagOutcome],
    layouts: dict[str, bytes],
    current: bytes | None,
    current_source: str,
) -> str:
    """Snapshots in order, then the current state; where the current state came from."""
    for outcome in outcomes:
        if outcome.result == ADOPTED:
            store.create_snapshot(outcome.tag, layout=layouts[outcome.tag])
    if current is not None:
        store.replace_layout(current, source=current_source or "the current state")
        return current_source or "the given state"
    if store.sections():
        return "the image's own current state (kept)"
    last = [o.tag for o in outcomes if o.result == ADOPTED][-1]
    store.replace_layout(layouts[last], source=f"snapshot '{last}'")
    return f"snapshot '{last}' (no --state given)"


__all__: Sequence[str] = ("ADOPTED", "SKIPPED", "Adoption", "TagOutcome", "adopt", "read_history")

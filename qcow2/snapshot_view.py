"""Reading a snapshot without applying it: :class:`SnapshotView`.

Apart from the snapshot operations (:mod:`qcow2.snapshots`), which write: reading a
snapshot (``vtpm-qcow info`` reads every snapshot's state, ``qemu-img convert -l``) must not
import the write path (transactions, refcount tables).
"""

from __future__ import annotations

import struct

from .errors import EncryptionKeyError, NoVmStateError
from .format import layout
from .format.snapshot_table import validate_snapshot_l1

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .format.snapshot_table import SnapshotEntry
    from .image import Image


class SnapshotView:
    """Read-only access to a snapshot's guest content (``qemu-img convert -l`` semantics).

    The view is the snapshot's own disk size; clusters the snapshot does not allocate fall
    through to the backing file (or read as zeros), exactly like the active image.
    """

    def __init__(self, image: Image, entry: SnapshotEntry) -> None:
        validate_snapshot_l1(entry, cluster_size=image.header.cluster_size, path=image.path)
        self.image = image
        self.entry = entry
        self._l1 = read_l1(image, entry.l1_table_offset, entry.l1_size)

    @property
    def virtual_size(self) -> int:
        """The snapshot's disk size."""
        return self.entry.virtual_size

    @property
    def name(self) -> str:
        """The snapshot's name."""
        return self.entry.name

    @property
    def l1_table(self) -> list[int]:
        """The snapshot's L1 entries (a copy)."""
        return list(self._l1)

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes of the snapshot's disk at ``offset`` (clipped at its end)."""
        if offset < 0 or length < 0:
            raise ValueError(f"invalid read range {offset}+{length}")
        end = min(offset + length, self.virtual_size)
        if offset >= end:
            return b""
        return self.image.read_with_l1(self._l1, offset, end - offset)

    @property
    def vm_state_size(self) -> int:
        """Bytes of VM state the snapshot holds (0: a disk-only snapshot).  The 64-bit
        ``vm_state_size_large`` of the extra data when present, else the entry's 32-bit
        field."""
        return self.entry.vm_state_size

    @property
    def vm_state_offset(self) -> int:
        """Guest offset of the VM state in the snapshot's L1 (QEMU's
        ``qcow2_vm_state_offset`` for the snapshot's own disk size)."""
        h = self.image.header
        return vm_state_offset(h.cluster_size, h.l2_entries, self.virtual_size)

    def read_vmstate(self, offset: int, length: int) -> bytes:
        """``length`` bytes of the snapshot's VM state at ``offset`` (clipped at its end):
        what QEMU's ``bdrv_load_vmstate`` reads after ``loadvm`` applied the snapshot.

        Raises :class:`NoVmStateError` for a disk-only snapshot and
        :class:`EncryptionKeyError` when the image is encrypted and opened without its
        key (the VM state goes through the encrypted data path).  The caller bounds the
        length: this reads what it asks for in one piece.
        """
        if offset < 0 or length < 0:
            raise ValueError(f"invalid read range {offset}+{length}")
        size = self.vm_state_size
        entry = self.entry
        if size <= 0:
            raise NoVmStateError(
                f"snapshot '{entry.name}' (ID {entry.id}) holds no VM state "
                "(vm_state_size 0: a disk-only snapshot)",
                path=self.image.path,
            )
        image = self.image
        if image.encrypted and image.cipher is None:
            raise EncryptionKeyError(
                f"snapshot '{entry.name}': the VM state is encrypted with the image; "
                f"{EncryptionKeyError.MISSING_KEY}",
                path=image.path,
            )
        end = min(offset + length, size)
        if offset >= end:
            return b""
        base = self.vm_state_offset
        return image.read_with_l1(self._l1, base + offset, end - offset)


def vm_state_offset(cluster_size: int, l2_entries: int, disk_size: int) -> int:
    """Where QEMU keeps a snapshot's VM state in the guest address space: the first L1
    entry past the disk (``size_to_l1(disk_size) << (cluster_bits + l2_bits)``), so an L2
    table never holds both disk and VM state.  ``l2_entries`` is half as many with
    extended L2 (16-byte entries), which doubles the granularity."""
    span = cluster_size * l2_entries
    return layout.size_to_clusters(span, disk_size) * span


def read_l1(image: Image, offset: int, size: int) -> list[int]:
    """The ``size`` big-endian L1 entries at ``offset`` of the image file."""
    raw = image.file.pread(offset, size * layout.L1_ENTRY_SIZE)
    return list(struct.unpack(f">{size}Q", raw))

"""``qemu-img compare`` and ``qemu-img convert``: an image's guest content, compared or copied.

:class:`GuestSource` reads what a guest sees in an open image, its active state or one of
its snapshots, through the one reader (:class:`~qcow2.image.Image`, or
:class:`~qcow2.image.RawImage` for a raw file); :func:`first_mismatch` and
:func:`first_nonzero` are compare's scans, :func:`copy_guest` is convert's copy.
"""

from __future__ import annotations

from ..errors import UnsupportedFeatureError
from ..format.snapshot_table import find_snapshot
from ..image import Image

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from ..compress import CompressedWriter
    from ..image import Layer

#: Bytes read, compared or copied at a time.
CHUNK = 1 << 20
#: Holes qemu-img convert keeps: blocks of this size that are all zero are not written.
_ZERO_BLOCK = 4096


class GuestSource:
    """The guest content of the open image ``layer`` (closed with it), ``size`` bytes.

    ``snapshot`` selects a snapshot instead of the active state: ``("id", key)`` and
    ``("name", key)`` match exactly, ``("any", key)`` is an ID first, then a name (QEMU's
    ``bdrv_snapshot_load_tmp_by_id_or_name``).  The size stays the image's: past the
    snapshot's own size it reads zeros.  Raises :class:`~qcow2.errors.SnapshotNotFoundError`,
    or :class:`~qcow2.errors.UnsupportedFeatureError` for a snapshot of a raw image.
    """

    def __init__(self, layer: Layer, snapshot: tuple[str, str] | None = None) -> None:
        self.layer = layer
        self.size = layer.virtual_size
        self._read: Callable[[int, int], bytes] = layer.read
        if snapshot is None:
            if isinstance(layer, Image):
                layer.detect_metadata_preallocation()  # QEMU's first block-status query
            return
        if not isinstance(layer, Image):
            raise UnsupportedFeatureError(
                "Block format 'raw' used by device '' does not support feature "
                "'internal snapshots'",
                path=layer.path,
            )
        kind, key = snapshot
        entries = layer.snapshots
        index = find_snapshot(
            entries,
            key,
            id_first=True,
            path=layer.path,
            name_only=kind == "name",
            id_only=kind == "id",
        )
        from ..snapshot_view import SnapshotView

        view = SnapshotView(layer, entries[index])
        end = view.virtual_size

        def read(offset: int, length: int) -> bytes:
            inside = max(0, min(length, end - offset))
            data = view.read(offset, inside) if inside else b""
            return data + bytes(length - inside)

        self._read = read

    def read(self, offset: int, length: int) -> bytes:
        """Guest bytes, cut at the size."""
        length = max(0, min(length, self.size - offset))
        return self._read(offset, length) if length else b""

    def close(self) -> None:
        """Close the image."""
        self.layer.close()


def first_mismatch(a: GuestSource, b: GuestSource) -> int | None:
    """The offset of the first 512-byte sector where ``a`` and ``b`` differ, in the part
    both have (None: identical there)."""
    common = min(a.size, b.size)
    for pos in range(0, common, CHUNK):
        n = min(CHUNK, common - pos)
        da, db = a.read(pos, n), b.read(pos, n)
        if da != db:
            diff = next(i for i in range(n) if da[i] != db[i])
            return (pos + diff) // 512 * 512
    return None


def first_nonzero(source: GuestSource, start: int) -> int | None:
    """The offset of the first 512-byte sector from ``start`` on holding a nonzero byte
    (None: all zeros to the end)."""
    for pos in range(start, source.size, CHUNK):
        n = min(CHUNK, source.size - pos)
        data = source.read(pos, n)
        if data.count(0) != len(data):
            first = next(i for i in range(n) if data[i])
            return (pos + first) // 512 * 512
    return None


def copy_guest(
    source: GuestSource,
    write: Callable[[int, bytes], object],
    *,
    compressed: CompressedWriter | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Copy ``source`` by ``write(offset, data)`` (or ``compressed``, one cluster at a
    time), skipping what is zero as qemu-img does; ``progress(position, done)`` is told
    before and after each chunk (the position is where a failure happened)."""
    size = source.size
    for pos in range(0, size, CHUNK):
        if progress is not None:
            progress(pos, pos)
        n = min(CHUNK, size - pos)
        data = source.read(pos, n)
        if compressed is not None:
            step = compressed.image.cluster_size
            for sub in range(0, n, step):
                chunk = data[sub : sub + step]
                if chunk.count(0) != len(chunk):
                    compressed.write(pos + sub, chunk)
        else:
            _write_nonzero(write, pos, data)
        if progress is not None:
            progress(pos, pos + n)
    if compressed is not None:
        compressed.finish()


def _write_nonzero(write: Callable[[int, bytes], object], pos: int, data: bytes) -> None:
    """Write the 4 KiB blocks of ``data`` that are not all zero (qemu-img keeps holes)."""
    start = None
    for off in range(0, len(data), _ZERO_BLOCK):
        zero = data.count(0, off, off + _ZERO_BLOCK) == min(_ZERO_BLOCK, len(data) - off)
        if zero and start is not None:
            write(pos + start, data[start:off])
            start = None
        elif not zero and start is None:
            start = off
    if start is not None:
        write(pos + start, data[start:])

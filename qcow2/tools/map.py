"""``qemu-img map``: where each guest range of a backing chain reads from, as QEMU 7.2.

:func:`map_entries` computes qemu-img's records (``start, length, depth, present, zero,
data, offset``) over the chain, merged as qemu-img merges them; :func:`format_map_json`
and :func:`format_map_human` print them.  The statuses come from the images' own mapping
(the one L2 decoder, :class:`qcow2.l2.L2Decoder`), raw layers from SEEK_DATA/SEEK_HOLE.
"""

from __future__ import annotations

import bisect
import os

from ..errors import CorruptImageError, Qcow2Error, c_hex, signal_corruption
from ..format import layout
from ..format.layout import SubclusterType
from ..format.refcount import read_refcount
from ..image import Image, backing_path
from .info import sectors_size

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Literal

    from ..image import Layer, RawImage

_DATA, _ZERO, _UNALLOCATED, _INVALID, _DATA_ZERO = 1, 2, 0, 3, 4
_COMPRESSED = SubclusterType.COMPRESSED
#: The map kind of each subcluster type (compressed data has no offset to show).
_MAP_KINDS = {
    SubclusterType.NORMAL: _DATA,
    SubclusterType.COMPRESSED: _DATA,
    SubclusterType.ZERO_PLAIN: _ZERO,
    SubclusterType.ZERO_ALLOC: _ZERO,
    SubclusterType.UNALLOCATED_PLAIN: _UNALLOCATED,
    SubclusterType.UNALLOCATED_ALLOC: _UNALLOCATED,
}


class _Run:
    """A guest range of one layer with one status: kind, host offset (None if unknown).

    An ``_INVALID`` run carries the corruption QEMU reports when a query reaches it, as
    ``(message, offset)``."""

    __slots__ = ("end", "kind", "offset", "problem", "start")

    def __init__(
        self,
        start: int,
        end: int,
        kind: int,
        offset: int | None,
        problem: tuple[str, int] | None = None,
    ) -> None:
        self.start = start
        self.end = end
        self.kind = kind
        self.offset = offset
        self.problem = problem


class MapEntry:
    """One record of ``qemu-img map`` (``offset``/``filename`` None if not reported)."""

    __slots__ = ("data", "depth", "filename", "length", "offset", "present", "start", "zero")

    def __init__(
        self,
        start: int,
        length: int,
        depth: int,
        present: bool,
        zero: bool,
        data: bool,
        offset: int | None,
        filename: str | None,
    ) -> None:
        self.start = start
        self.length = length
        self.depth = depth
        self.present = present
        self.zero = zero
        self.data = data
        self.offset = offset
        self.filename = filename

    def copy(self) -> MapEntry:
        """A copy to modify without touching this record."""
        return MapEntry(
            self.start,
            self.length,
            self.depth,
            self.present,
            self.zero,
            self.data,
            self.offset,
            self.filename,
        )


def _qcow2_runs(image: Image) -> list[_Run]:
    """The block status of every guest range of a qcow2 image (QEMU's
    ``qcow2_co_block_status``), adjacent equal statuses merged.  A corrupt entry ends the
    walk with an ``_INVALID`` run to the end of the disk, which fails the query reaching it."""
    h = image.header
    decoder = image.clusters.decoder
    cs = h.cluster_size
    l2_span = cs * h.l2_entries
    size = sectors_size(image)
    nb_l1 = min(h.l1_size, layout.size_to_clusters(l2_span, size))
    runs: list[_Run] = []
    encrypted = bool(h.crypt_method)

    def add(start: int, end: int, kind: int, offset: int | None) -> None:
        end = min(end, size)
        if start >= end:
            return
        if runs:
            last = runs[-1]
            if (
                last.end == start
                and last.kind == kind
                and (last.offset is None) == (offset is None)
                and (offset is None or last.offset == offset - (start - last.start))
            ):
                last.end = end
                return
        runs.append(_Run(start, end, kind, offset))

    for i, l1_entry in enumerate(image.l1_table[:nb_l1]):
        base = i * l2_span
        problem = decoder.l1_problem(l1_entry, i)
        if problem is not None:
            runs.append(_Run(base, max(size, base + 1), _INVALID, None, problem))
            return runs
        l2_offset = l1_entry & layout.L1E_OFFSET_MASK
        if not l2_offset:
            add(base, base + l2_span, _UNALLOCATED, None)
            continue
        table = image.clusters.l2_table(l2_offset)
        stop = min(h.l2_entries, layout.size_to_clusters(cs, size - base))
        found, problem = decoder.runs(table, l2_offset, 0, stop, base)
        for start, end, sctype, host in found:
            kind = _MAP_KINDS[sctype]
            add(start, end, kind, None if encrypted or sctype == _COMPRESSED else host)
        if problem is not None:
            start = found[-1][1] if found else base
            runs.append(_Run(start, max(size, start + 1), _INVALID, None, problem))
            return runs
    add(nb_l1 * l2_span, size, _UNALLOCATED, None)
    if not encrypted and not h.has_data_file and _metadata_preallocated(image):
        return _split_by_host_holes(image, runs)
    return runs


def _metadata_preallocated(image: Image) -> bool:
    """QEMU's ``qcow2_detect_metadata_preallocation``: far more clusters are refcounted
    than the host file really stores (``preallocation=metadata``)."""
    h = image.header
    f = image.file
    real_clusters = os.fstat(f.fd).st_blocks * 512 // h.cluster_size
    threshold = max(real_clusters * 10 // 9, real_clusters + 2)
    end_cluster = layout.size_to_clusters(h.cluster_size, f.size())
    if end_cluster < threshold:
        return False  # not even every cluster of the file could be refcounted
    cs = h.cluster_size
    reftable = image.refcounts.table
    per_block = h.refblock_entries
    count = 0
    for index in range(min(len(reftable), layout.size_to_clusters(per_block, end_cluster))):
        block_offset = reftable[index] & layout.REFT_OFFSET_MASK
        if not block_offset:
            continue
        if block_offset % cs:
            return False  # a corrupt refcount table: QEMU's detection fails, no split
        try:
            block = f.pread(block_offset, cs)
        except Qcow2Error:
            return False
        entries = min(per_block, end_cluster - index * per_block)
        count += _nonzero_refcounts(block, entries, h.refcount_bits)
        if count >= threshold:
            return True
    return False


#: memoryview formats by refcount width in bytes (any byte order tells zero from nonzero).
_UINT_FORMATS: dict[int, Literal["B", "H", "I", "Q"]] = {1: "B", 2: "H", 4: "I", 8: "Q"}


def _nonzero_refcounts(block: bytes, entries: int, bits: int) -> int:
    """How many of the first ``entries`` refcounts of refcount block ``block`` are not 0."""
    if bits >= 8:
        values = memoryview(block).cast(_UINT_FORMATS[bits // 8])[:entries]
        return entries - values.tolist().count(0)
    return sum(1 for i in range(entries) if read_refcount(block, i, bits))


def _split_by_host_holes(layer: Image, runs: list[_Run]) -> list[_Run]:
    """With metadata preallocation QEMU asks the host file about data clusters
    (BDRV_BLOCK_RECURSE): the parts that are holes there read as zero (and stay data)."""
    fd = layer.file.fd
    file_end = layer.file.size()
    out: list[_Run] = []
    for run in runs:
        if run.kind != _DATA or run.offset is None:
            out.append(run)
            continue
        pos = run.start
        while pos < run.end:
            host = run.offset + (pos - run.start)
            length = run.end - pos
            data_at = _seek(fd, host, os.SEEK_DATA, file_end)
            if data_at > host:
                piece, kind = min(length, data_at - host), _DATA_ZERO
            else:
                hole_at = _seek(fd, host, os.SEEK_HOLE, file_end)
                piece, kind = min(length, hole_at - host), _DATA
            out.append(_Run(pos, pos + piece, kind, host))
            pos += piece
    return out


def _seek(fd: int, offset: int, whence: int, file_end: int) -> int:
    """lseek SEEK_DATA/SEEK_HOLE; past the end of the file everything is a hole."""
    if offset >= file_end:
        return 1 << 62 if whence == os.SEEK_DATA else offset
    try:
        return os.lseek(fd, offset, whence)
    except OSError:
        return 1 << 62 if whence == os.SEEK_DATA else file_end


def _raw_runs(layer: RawImage) -> list[_Run]:
    """Data and holes of a raw layer (file-posix's SEEK_DATA/SEEK_HOLE status)."""
    size = layer.virtual_size
    runs: list[_Run] = []
    pos = 0
    fd = layer.file.fd
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            data = size
        if data > pos:
            runs.append(_Run(pos, min(data, size), _ZERO, pos))
            pos = min(data, size)
            continue
        try:
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
        except OSError:
            hole = size
        runs.append(_Run(pos, min(hole, size), _DATA, pos))
        pos = min(hole, size)
    return runs


def _status(runs: list[_Run], starts: list[int], pos: int) -> _Run:
    return runs[bisect.bisect_right(starts, pos) - 1]


def map_entries(
    layers: Sequence[Layer], start: int = 0, max_length: int | None = None
) -> tuple[list[MapEntry], CorruptImageError | None]:
    """qemu-img map's records for the chain ``layers`` (top first), merged like qemu-img
    (same depth/present/zero/data/file and contiguous offsets), for the guest range
    ``[start, start + max_length)`` (``--start-offset``/``--max-length``).

    If the walk reaches corrupt metadata, the records found so far are returned with the
    error (qemu-img prints all but the last, still open, record before failing).  An
    empty range gives qemu-img's single empty record."""
    if isinstance(layers[0], Image):
        layers[0].detect_metadata_preallocation()  # QEMU's first block-status query does
    statuses = [_qcow2_runs(x) if isinstance(x, Image) else _raw_runs(x) for x in layers]
    starts = [[r.start for r in runs] for runs in statuses]
    length = sectors_size(layers[0])
    if max_length is not None:
        length = min(start + max_length, length)
    if start >= length:
        return [MapEntry(start, 0, 0, False, False, False, None, None)], None
    entries: list[MapEntry] = []
    pos = start
    while pos < length:
        try:
            entry = _block_status(layers, statuses, starts, pos, length - pos)
        except CorruptImageError as err:
            for layer in layers:
                if isinstance(layer, Image) and layer.path == err.path:
                    layer.report_corruption(err)
            return entries, err
        if entries and _mergeable(entries[-1], entry):
            entries[-1].length += entry.length
        else:
            entries.append(entry)
        pos += entry.length
    return entries, None


def _block_status(
    layers: Sequence[Layer],
    statuses: list[list[_Run]],
    starts: list[list[int]],
    pos: int,
    nbytes: int,
) -> MapEntry:
    """qemu-img's ``get_block_status``: descend the chain until a layer has the range."""
    for depth, layer in enumerate(layers):
        nbytes = min(nbytes, sectors_size(layer) - pos)
        run = _status(statuses[depth], starts[depth], pos)
        if run.problem is not None:
            signal_corruption(run.problem[0], path=layer.path, offset=run.problem[1])
        nbytes = min(nbytes, run.end - pos)
        offset = None if run.offset is None else run.offset + (pos - run.start)
        if run.kind in (_DATA, _ZERO, _DATA_ZERO):
            data = run.kind in (_DATA, _DATA_ZERO)
            zero = run.kind in (_ZERO, _DATA_ZERO)
            name = _data_file_name(layer) if offset is not None else None
            return MapEntry(pos, nbytes, depth, True, zero, data, offset, name)
        below = layers[depth + 1] if depth + 1 < len(layers) else None
        if below is None or pos >= sectors_size(below):
            name = _data_file_name(layer) if offset is not None else None
            return MapEntry(pos, nbytes, depth, False, True, False, offset, name)
    raise AssertionError("unreachable")


def _mergeable(curr: MapEntry, nxt: MapEntry) -> bool:
    """qemu-img's ``entry_mergeable``."""
    if curr.length == 0:
        return False
    if (curr.zero, curr.data, curr.depth, curr.present) != (
        nxt.zero,
        nxt.data,
        nxt.depth,
        nxt.present,
    ):
        return False
    if (curr.filename is None) != (nxt.filename is None) or curr.filename != nxt.filename:
        return False
    if (curr.offset is None) != (nxt.offset is None):
        return False
    return curr.offset is None or nxt.offset == curr.offset + curr.length


def format_map_json(entries: Sequence[MapEntry], *, complete: bool = True) -> str:
    """``qemu-img map --output=json`` text (ends with a newline).  An incomplete map (the
    walk failed) shows what qemu-img printed before failing: all but the open record."""
    parts = []
    for e in entries:
        text = (
            f'{{ "start": {e.start}, "length": {e.length}, "depth": {e.depth}, '
            f'"present": {_b(e.present)}, "zero": {_b(e.zero)}, "data": {_b(e.data)}'
        )
        if e.offset is not None:
            text += f', "offset": {e.offset}'
        parts.append(text + "}")
    if not complete:
        return "[" + "".join(part + ",\n" for part in parts[:-1])
    return "[" + ",\n".join(parts) + "]\n"


def _b(value: bool) -> str:
    return "true" if value else "false"


def format_map_human(
    entries: Sequence[MapEntry], *, complete: bool = True
) -> tuple[str, str | None]:
    """``qemu-img map`` human text, and the error qemu-img stops with (None if none).

    Like qemu-img, entries are re-merged after zero/data distinctions are dropped, and a
    data range without a host offset (compressed, encrypted) ends the listing with an error.
    """
    out = [f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File\n"]
    if not entries:
        return "".join(out), None
    work = [e.copy() for e in entries]
    curr = work[0]
    for nxt in [*work[1:], None]:
        if nxt is not None and _mergeable(curr, nxt):
            curr.length += nxt.length
            continue
        if nxt is None and not complete:
            break  # the walk failed while this record was still open
        if curr.data and curr.offset is None:
            return "".join(out), "File contains external, encrypted or compressed clusters."
        if curr.data and not curr.zero:
            out.append(
                f"{c_hex(curr.start):<16}{c_hex(curr.length):<16}"
                f"{c_hex(curr.offset or 0):<16}{curr.filename}\n"
            )
        if nxt is None:
            break
        if not nxt.data or nxt.zero:
            nxt.data = False
            nxt.zero = True
        curr = nxt
    return "".join(out), None


def _data_file_name(layer: Layer) -> str:
    """The file holding a layer's guest data: its external data file if it has one."""
    if isinstance(layer, Image) and layer.header.has_data_file and layer.header.data_file:
        return backing_path(layer.path, layer.header.data_file)
    return layer.path

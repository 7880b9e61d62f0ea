"""Looking at what an image no longer uses: clusters a metadata transaction freed (refcount
0) or that ``check`` finds leaked, and whether such a cluster reads as an L2 table.

For recovery tools: a commit writes a new generation of metadata and frees the previous
one, whose L2 tables and data clusters stay on disk until they are allocated again.  These
functions find them; what the bytes mean is up to the caller.  Nothing here writes.
"""

from __future__ import annotations

import re
import struct

from .errors import InvalidImageError
from .format import layout
from .format.layout import ClusterType
from .image import Image

_LEAK_RE = re.compile(r"^Leaked cluster (\d+) refcount=\d+ reference=0$")


def unused_clusters(image: Image, *, leaks: bool = True) -> list[int]:
    """Host offsets, ascending, of the clusters inside the image file that hold nothing
    the image uses: refcount 0, and (``leaks``) those ``check`` finds leaked with no
    reference at all.  The header cluster is never among them.

    Cost: one refcount lookup per cluster of the file (plus a full check for ``leaks``).
    """
    cs = image.cluster_size
    nclusters = -(-image.file.size() // cs)
    found = {c for c in range(1, nclusters) if image.refcounts.get(c) == 0}
    if leaks:
        for message in image.check().messages:
            match = _LEAK_RE.match(message)
            if match is not None and 0 < int(match.group(1)) < nclusters:
                found.add(int(match.group(1)))
    return [c * cs for c in sorted(found)]


def read_host(image: Image, offset: int, length: int) -> bytes:
    """``length`` raw bytes of the image file at ``offset`` (no mapping, no decryption);
    InvalidImageError if the range is not inside the file."""
    size = image.file.size()
    if offset < 0 or length < 0 or offset + length > size:
        raise InvalidImageError(
            f"host range {offset:#x}+{length:#x} outside the image file ({size} bytes)",
            path=image.path,
        )
    return image.file.pread(offset, length)


def parse_l2_table(image: Image, data: bytes) -> list[int] | None:
    """The entries of ``data`` (one cluster) if it reads as a standard L2 table of
    ``image``, else None.

    Every entry must be 0, or free of reserved bits and (unless compressed) point at a
    cluster-aligned offset inside the file; the COPIED flag and the zero flag are kept in
    the entries.  A table with no entry pointing at a cluster is None (an all-zero
    cluster would trivially qualify).  Images with extended L2 entries give None.
    """
    header = image.header
    cs = header.cluster_size
    if header.extended_l2 or len(data) != cs:
        return None
    size = image.file.size()
    decoder = image.clusters.decoder
    entries = list(struct.unpack(f">{cs // 8}Q", data))
    allocated = False
    for entry in entries:
        if not entry:
            continue
        if decoder.cluster_type(entry) == ClusterType.COMPRESSED:
            allocated = True
            continue
        offset = entry & layout.L2E_OFFSET_MASK
        if entry & layout.L2E_STD_RESERVED_MASK or offset % cs or offset >= size:
            return None
        if offset:
            allocated = True
        elif entry & layout.OFLAG_COPIED:
            return None  # COPIED without a cluster: never written by QEMU or this library
    return entries if allocated else None


def guest_mappings(image: Image, length: int, *, snapshots: bool = True) -> set[tuple[int, int]]:
    """``(guest offset, host offset)`` of every uncompressed data cluster mapped in the
    first ``length`` guest bytes by the active L1 table and (``snapshots``) every
    snapshot's L1 table."""
    header = image.header
    cs = header.cluster_size
    per_l2 = header.l2_entries
    step = header.l2_entry_size // 8
    l1_entries = -(-length // (per_l2 * cs))
    tables = [list(image.l1_table[:l1_entries])]
    for snap in image.snapshots if snapshots else ():
        count = min(snap.l1_size, l1_entries)
        raw = image.file.pread(snap.l1_table_offset, count * layout.L1_ENTRY_SIZE)
        tables.append(list(struct.unpack(f">{count}Q", raw)))
    decoder = image.clusters.decoder
    holding_data = (ClusterType.NORMAL, ClusterType.ZERO_ALLOC)
    out: set[tuple[int, int]] = set()
    for l1 in tables:
        for l1_index, l1_entry in enumerate(l1):
            # Read as stored, unvalidated: these tables may be old generations.
            l2_offset = l1_entry & layout.L1E_OFFSET_MASK
            if not l2_offset:
                continue
            words = struct.unpack(f">{cs // 8}Q", image.file.pread(l2_offset, cs))
            for index in range(per_l2):
                entry = words[index * step]
                guest = (l1_index * per_l2 + index) * cs
                if guest < length and decoder.cluster_type(entry) in holding_data:
                    out.add((guest, entry & layout.L2E_OFFSET_MASK))
    return out


__all__ = ["guest_mappings", "parse_l2_table", "read_host", "unused_clusters"]

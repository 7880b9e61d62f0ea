"""``qemu-img info`` and ``qemu-img map`` for qcow2 images, with QEMU 7.2's output.

* :func:`image_info` returns the ``qemu-img info --output=json`` object; :func:`qemu_json`
  prints it (or any such object) exactly as qemu-img does, keys in QEMU's ``QDict`` order
  (its hash-bucket order, not insertion order), and :func:`format_info_human` gives the
  human layout (``bdrv_image_info_dump``).
* :func:`map_entries` computes ``qemu-img map``'s records (``start, length, depth, present,
  zero, data, offset``) over the backing chain, merged as qemu-img merges them;
  :func:`format_map_json` / :func:`format_map_human` print them.
* :func:`format_snapshot_table` is the ``qemu-img snapshot -l`` table.
"""

from __future__ import annotations

import bisect
import os
import struct
import time

from ..errors import (
    BackingChainError,
    BackingOpenError,
    CorruptImageError,
    InvalidImageError,
    Qcow2Error,
    c_hex,
    signal_corruption,
)
from ..format import layout
from ..format.header import read_header
from ..format.layout import SubclusterType
from ..format.refcount import read_refcount
from ..format.snapshot_table import SnapshotEntry, read_snapshot_table
from ..io.fileio import HostFile
from ..l2 import L2Decoder

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any, Literal

    from ..format.header import Header

# Section: QEMU's JSON and QDict order


def _tdb_hash(key: str) -> int:
    """QEMU's ``tdb_hash`` (qobject/qdict.c) of a QDict key."""
    raw = key.encode()
    value = (0x238F13AF * len(raw)) & 0xFFFFFFFF
    for i, ch in enumerate(raw):
        value = (value + (ch << (i * 5 % 24))) & 0xFFFFFFFF
    return (1103515243 * value + 12345) & 0xFFFFFFFF


_QDICT_BUCKETS = 512


def qdict_order(obj: Any) -> Any:
    """``obj`` with every dict re-ordered as QEMU iterates a QDict built in insertion order.

    Keys iterate by hash bucket; a later insertion into the same bucket comes first.
    """
    if isinstance(obj, dict):
        items = list(obj.items())
        keyed = sorted(enumerate(items), key=lambda p: (_tdb_hash(p[1][0]) % _QDICT_BUCKETS, -p[0]))
        return {k: qdict_order(v) for _, (k, v) in keyed}
    if isinstance(obj, list):
        return [qdict_order(v) for v in obj]
    return obj


def _json_str(text: str) -> str:
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch in "\b\f\n\r\t":
            out.append({"\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch])
        elif code < 0x20 or code >= 0x7F:
            if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte (surrogateescape)
                out.append("\\uFFFD")
            elif code > 0xFFFF:
                code -= 0x10000
                out.append(f"\\u{0xD800 | (code >> 10):04X}\\u{0xDC00 | (code & 0x3FF):04X}")
            else:
                out.append(f"\\u{code:04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _json(obj: Any, indent: int) -> str:
    pad = "    " * (indent + 1)
    end = "    " * indent
    if isinstance(obj, bool):
        return "true" if obj else "false"
    if isinstance(obj, int):
        return str(obj)
    if isinstance(obj, str):
        return _json_str(obj)
    if obj is None:
        return "null"
    if isinstance(obj, dict):
        if not obj:
            return "{\n" + end + "}"
        body = ",\n".join(f"{pad}{_json_str(k)}: {_json(v, indent + 1)}" for k, v in obj.items())
        return "{\n" + body + "\n" + end + "}"
    if isinstance(obj, list):
        if not obj:
            return "[\n" + end + "]"
        body = ",\n".join(pad + _json(v, indent + 1) for v in obj)
        return "[\n" + body + "\n" + end + "]"
    raise TypeError(f"cannot encode {type(obj).__name__} as QEMU JSON")


def qemu_json(obj: Any) -> str:
    """``obj`` as qemu-img's pretty JSON (4-space indent, QDict key order), no newline."""
    return _json(qdict_order(obj), 0)


# Section: opening images as qemu-img 7.2 does


def require_open_resources(f: HostFile, header: Header, key: bytes | None = None) -> None:
    """What QEMU 7.2's open needs beyond the header, for an open with I/O: the key of an
    encrypted image (``key``, checked against the LUKS key slots) and the external data
    file, if the image has one."""
    if header.crypt_method != layout.CRYPT_NONE:
        if key is None:
            raise InvalidImageError(
                "Parameter 'encrypt.key-secret' is required for cipher", path=f.path
            )
        if header.crypt_method == layout.CRYPT_LUKS:
            from ..crypto import open_cipher

            open_cipher(f, header.crypto_header, key)
    if header.has_data_file:
        _require_data_file(f.path, header)


def _require_data_file(image: str, header: Header) -> None:
    """QEMU opens an image's external data file (named relative to the image's directory);
    a missing one fails the open."""
    name = header.data_file
    if not name:
        raise InvalidImageError("'data-file' is required for this image", path=image)
    name = full_backing_filename(image, name)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise InvalidImageError(f"Could not open '{name}': {err.strerror}", path=image) from err
    os.close(fd)


# Section: sizes and the snapshot table


def size_to_str(value: int) -> str:
    """QEMU's ``size_to_str``: ``"1 GiB"``, ``"332 KiB"``, ``"1.25 MiB"``, ``"0 B"``."""
    suffixes = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")
    _, exp = _frexp(value / (1000.0 / 1024.0))
    i = (exp - 1) // 10 if exp > 0 else 0
    i = max(0, min(i, len(suffixes) - 1))
    return f"{'%0.3g' % (value / (1 << (i * 10)))} {suffixes[i]}B"


def _frexp(x: float) -> tuple[float, int]:
    import math

    return math.frexp(x)


_SNAPSHOT_HEADER = f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}"


def _snapshot_line(sn: SnapshotEntry) -> str:
    """One row of QEMU's ``bdrv_snapshot_dump`` (dates in local time, like qemu-img)."""
    date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sn.date_sec))
    secs = sn.vm_clock_nsec // 1_000_000_000
    millis = (sn.vm_clock_nsec // 1_000_000) % 1000
    clock = f"{secs // 3600:02d}:{(secs // 60) % 60:02d}:{secs % 60:02d}.{millis:03d}"
    icount = "" if sn.icount is None else str(_signed64(sn.icount))
    size = size_to_str(sn.vm_state_size)
    ident, name = _ljust(c_string(sn.id), 9), _ljust(c_string(sn.name), 16)
    return f"{ident} {name} {size:>8}{date:>20}{clock:>13}{icount:>11}"


def _ljust(text: str, width: int) -> str:
    """printf's ``%-Ns``: pad to ``width`` *bytes* (UTF-8), as C counts them."""
    return text + " " * max(0, width - len(text.encode("utf-8", "surrogateescape")))


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def format_snapshot_table(snapshots: Sequence[SnapshotEntry]) -> str:
    """The table ``qemu-img snapshot -l`` and ``info`` print (header line + one per
    snapshot, each line ending in a newline)."""
    return "".join(line + "\n" for line in [_SNAPSHOT_HEADER, *map(_snapshot_line, snapshots)])


# Section: opening images and backing chains (read-only)


class Layer:
    """One image of a backing chain, open read-only.

    ``name`` is the file name as QEMU shows it (the command-line path for the top image,
    the full backing file name below); ``header`` is None for a raw image.
    """

    __slots__ = ("file", "header", "name", "snapshots", "virtual_size")

    def __init__(
        self,
        name: str,
        file: HostFile,
        header: Header | None,
        virtual_size: int,
        snapshots: list[SnapshotEntry],
    ) -> None:
        self.name = name
        self.file = file
        self.header = header
        self.virtual_size = virtual_size
        self.snapshots = snapshots

    @property
    def data_name(self) -> str:
        """The file that holds guest data: the external data file if the image has one."""
        h = self.header
        if h is not None and h.has_data_file and h.data_file:
            return full_backing_filename(self.name, h.data_file)
        return self.name

    @property
    def format(self) -> str:
        """ "qcow2" or "raw"."""
        return "raw" if self.header is None else "qcow2"

    def close(self) -> None:
        """Close the host file."""
        self.file.close()


def full_backing_filename(image_name: str, backing: str) -> str:
    """QEMU's ``path_combine``: a relative backing name is relative to the image's dir."""
    if backing.startswith("/") or "/" not in image_name:
        return backing
    return image_name[: image_name.rindex("/") + 1] + backing


def open_layer(
    name: str,
    fmt: str | None = None,
    *,
    force_share: bool = True,
    io: bool = True,
    key: bytes | None = None,
) -> Layer:
    """Open ``name`` read-only as qcow2 (or raw if ``fmt`` is "raw" or it is not qcow2
    and no format was requested).  Without ``force_share`` the image is locked as
    ``qemu-img info`` locks it (refused while a QEMU writer holds it); ``io=False`` opens
    it for metadata only, as ``qemu-img info`` does.  ``key`` is the passphrase of an
    encrypted image (an open with I/O verifies it)."""
    f = HostFile(name, writable=False)
    try:
        if not force_share:
            from ..io.lock import lock_image

            lock_image(f.fd, name, writable=False)
        if fmt == "raw" or (fmt is None and f.pread(0, 4) != layout.MAGIC_BYTES):
            return Layer(name, f, None, layout.align_up(f.size(), 512), [])
        h = read_header(f, mode="qemu", io=io)
        if io:
            require_open_resources(f, h, key)
        snaps = read_snapshot_table(
            f,
            h.snapshots_offset,
            h.nb_snapshots,
            path=name,
            version=h.version,
            virtual_size=h.size // 512 * 512,
            cluster_size=h.cluster_size,
        )
        return Layer(name, f, h, h.size // 512 * 512, snaps)
    except BaseException:
        f.close()
        raise


def open_chain(
    name: str,
    fmt: str | None = None,
    *,
    force_share: bool = True,
    io: bool = True,
    key: bytes | None = None,
) -> list[Layer]:
    """The image ``name`` (encrypted with ``key``, if any) and its backing files, top
    first (at most 64 deep, no loops)."""
    return _open_chain(name, fmt, force_share=force_share, io=io, seen=set(), key=key)


def _open_chain(
    name: str,
    fmt: str | None,
    *,
    force_share: bool,
    io: bool,
    seen: set[tuple[int, int]],
    key: bytes | None = None,
) -> list[Layer]:
    layer = open_layer(name, fmt, force_share=force_share, io=io, key=key)
    try:
        st = os.fstat(layer.file.fd)
        if (st.st_dev, st.st_ino) in seen:
            raise BackingChainError("Backing file chain loops", path=layer.name)
        seen.add((st.st_dev, st.st_ino))
        h = layer.header
        if h is None or not h.backing_file:
            return [layer]
        if len(seen) > layout.MAX_BACKING_CHAIN_DEPTH:
            raise BackingChainError("Backing file chain too deep", path=name)
        return [layer, *open_backing(layer.name, h, force_share=force_share, io=io, seen=seen)]
    except BaseException:
        layer.close()
        raise


def open_backing(
    name: str,
    header: Header,
    *,
    force_share: bool = True,
    io: bool = True,
    seen: set[tuple[int, int]] | None = None,
) -> list[Layer]:
    """The backing chain below image ``name`` (whose header is ``header``), opened as QEMU
    opens it with the image; failures nest as "Could not open backing file: ..."."""
    if not header.backing_file:
        return []
    backing = full_backing_filename(name, header.backing_file)
    try:
        return _open_chain(
            backing,
            header.backing_format,
            force_share=force_share,
            io=io,
            seen=set() if seen is None else seen,
        )
    except Qcow2Error as err:
        raise BackingOpenError(name, backing, err) from err


# Section: qemu-img info


def _bitmaps(f: HostFile, h: Header) -> list[dict[str, Any]]:
    """QEMU's ``qcow2_get_bitmap_info_list``: name, granularity and flags of each bitmap."""
    ext = h.bitmaps_extension
    if ext is None or not h.autoclear_features & layout.AUTOCLEAR_BITMAPS:
        return []
    nb, dir_size, dir_offset = ext
    if dir_size > 64 * 1024 * 1024:
        raise CorruptImageError("Bitmap directory too large", path=f.path)
    directory = f.pread(dir_offset, dir_size)
    entry = layout.BITMAP_DIR_ENTRY_STRUCT
    bitmaps = []
    pos = 0
    for _ in range(nb):
        if pos + entry.size > len(directory):
            raise CorruptImageError("Bitmap directory is truncated", path=f.path)
        _, _, flags, _, gran_bits, name_size, extra = entry.unpack_from(directory, pos)
        name_at = pos + entry.size + extra
        name = directory[name_at : name_at + name_size].decode("utf-8", "surrogateescape")
        names = [n for bit, n in ((1, "in-use"), (2, "auto")) if flags & bit]
        bitmaps.append({"name": name, "granularity": 1 << gran_bits, "flags": names})
        pos += layout.align_up(entry.size + extra + name_size, 8)
    return bitmaps


def _luks_info(f: HostFile, h: Header) -> dict[str, Any]:
    """QEMU's ``qcrypto_block_luks_get_info`` of the LUKS1 header (no key needed)."""
    crypto = h.crypto_header
    if crypto is None:
        raise InvalidImageError("Missing CRYPTO header for crypt method 2", path=f.path)
    raw = f.pread(crypto[0], layout.LUKS_HEADER_STRUCT.size)
    if raw[:6] != layout.LUKS_MAGIC:
        raise InvalidImageError("Volume is not in LUKS format", path=f.path)
    (_, _, cipher, mode_spec, hash_spec, payload, key_bytes, _, _, mk_iters, uuid) = (
        layout.LUKS_HEADER_STRUCT.unpack(raw)
    )

    def text(value: bytes) -> str:
        return value.split(b"\0", 1)[0].decode("ascii", "replace")

    mode, _, ivgen = text(mode_spec).partition("-")
    ivgen_alg, _, ivgen_hash = ivgen.partition(":")
    key_bits = key_bytes * 8 // (2 if mode == "xts" else 1)
    info: dict[str, Any] = {
        "format": "luks",
        "cipher-alg": f"{text(cipher)}-{key_bits}",
        "cipher-mode": mode,
        "ivgen-alg": ivgen_alg,
        "hash-alg": text(hash_spec),
        "payload-offset": payload * layout.LUKS_SECTOR_SIZE,
        "master-key-iters": mk_iters,
        "uuid": text(uuid),
    }
    if ivgen_alg == "essiv":
        info["ivgen-hash-alg"] = ivgen_hash
    slots = []
    slot_struct = layout.LUKS_KEY_SLOT_STRUCT
    table = f.pread(crypto[0] + layout.LUKS_HEADER_STRUCT.size, 8 * slot_struct.size)
    for i in range(layout.LUKS_NUM_KEY_SLOTS):
        active, iters, _, key_offset, stripes = slot_struct.unpack_from(table, i * 48)
        slot: dict[str, Any] = {
            "active": active == layout.LUKS_KEY_SLOT_ENABLED,
            "key-offset": key_offset * layout.LUKS_SECTOR_SIZE,
        }
        if slot["active"]:
            slot["iters"] = iters
            slot["stripes"] = stripes
        slots.append(slot)
    info["slots"] = slots
    return info


def _format_specific(h: Header, f: HostFile) -> dict[str, Any]:
    data: dict[str, Any] = {}
    compression = layout.COMPRESSION_NAMES.get(h.compression_type, str(h.compression_type))
    if h.version == 2:
        data = {"compat": "0.10", "compression-type": compression, "refcount-bits": 16}
    else:
        data = {
            "compat": "1.1",
            "lazy-refcounts": h.lazy_refcounts,
            "corrupt": h.corrupt,
            "extended-l2": h.extended_l2,
            "refcount-bits": h.refcount_bits,
            "compression-type": compression,
        }
        bitmaps = _bitmaps(f, h)
        if bitmaps:
            data["bitmaps"] = bitmaps
    if h.crypt_method == layout.CRYPT_LUKS:
        data["encrypt"] = _luks_info(f, h)
    elif h.crypt_method == layout.CRYPT_AES:
        data["encrypt"] = {"format": "aes"}
    if h.version >= 3:
        if h.data_file is not None:
            data["data-file"] = h.data_file
        if h.has_data_file:
            data["data-file-raw"] = bool(h.autoclear_features & layout.AUTOCLEAR_DATA_FILE_RAW)
    return {"type": "qcow2", "data": data}


def c_string(text: str) -> str:
    """What QEMU keeps of an on-disk string: a C string, cut at the first NUL.  Invalid
    UTF-8 stays surrogate-escaped; :func:`qemu_json` prints it as U+FFFD like QEMU."""
    return text.split("\0", 1)[0]


def _snapshot_info(sn: SnapshotEntry) -> dict[str, Any]:
    info: dict[str, Any] = {
        "id": c_string(sn.id),
        "name": c_string(sn.name),
        "vm-state-size": _signed64(sn.vm_state_size),
        "date-sec": sn.date_sec,
        "date-nsec": sn.date_nsec,
        "vm-clock-sec": sn.vm_clock_nsec // 1_000_000_000,
        "vm-clock-nsec": sn.vm_clock_nsec % 1_000_000_000,
    }
    if sn.icount is not None:
        info["icount"] = _signed64(sn.icount)
    return info


def layer_info(layer: Layer) -> dict[str, Any]:
    """The ``qemu-img info --output=json`` object of one open image (insertion order;
    :func:`qemu_json` applies QEMU's key order)."""
    st = os.fstat(layer.file.fd)
    info: dict[str, Any] = {
        "filename": layer.name,
        "format": layer.format,
        "dirty-flag": False,
        "actual-size": st.st_blocks * 512,
        "virtual-size": layer.virtual_size,
    }
    h = layer.header
    if h is None:
        return info
    info["dirty-flag"] = h.dirty
    info["cluster-size"] = h.cluster_size
    if h.crypt_method:
        info["encrypted"] = True
    if h.backing_file:
        info["backing-filename"] = h.backing_file
        info["full-backing-filename"] = full_backing_filename(layer.name, h.backing_file)
        if h.backing_format:
            info["backing-filename-format"] = h.backing_format
    if layer.snapshots:
        info["snapshots"] = [_snapshot_info(sn) for sn in layer.snapshots]
    info["format-specific"] = _format_specific(h, layer.file)
    return info


def image_info(image: Any) -> dict[str, Any]:
    """``Image.info()``: the ``qemu-img info --output=json`` object of an open image."""
    layer = Layer(
        image.path,
        image.file,
        image.header,
        image.header.size // 512 * 512,
        list(image.snapshots),
    )
    return layer_info(layer)


def _dump_qobject(obj: Any, indentation: int, out: list[str]) -> None:
    if isinstance(obj, dict):
        for key, value in obj.items():
            composite = isinstance(value, dict | list)
            out.append(" " * (indentation * 4) + key.replace("-", " ") + ":")
            out.append("\n" if composite else " ")
            _dump_qobject(value, indentation + 1, out)
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            composite = isinstance(value, dict | list)
            out.append(" " * (indentation * 4) + f"[{i}]:" + ("\n" if composite else " "))
            _dump_qobject(value, indentation + 1, out)
    elif isinstance(obj, bool):
        out.append("true\n" if obj else "false\n")
    else:
        out.append(f"{obj}\n")


def format_info_human(info: dict[str, Any]) -> str:
    """QEMU's ``bdrv_image_info_dump`` of one :func:`layer_info` object."""
    lines = [
        f"image: {info['filename']}\n",
        f"file format: {info['format']}\n",
        f"virtual size: {size_to_str(info['virtual-size'])} ({info['virtual-size']} bytes)\n",
        f"disk size: {size_to_str(info['actual-size'])}\n",
    ]
    if info.get("encrypted"):
        lines.append("encrypted: yes\n")
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}\n")
    if info.get("dirty-flag"):
        lines.append("cleanly shut down: no\n")
    if "backing-filename" in info:
        line = f"backing file: {info['backing-filename']}"
        full = info.get("full-backing-filename")
        if full is None:
            line += " (cannot determine actual path)"
        elif full != info["backing-filename"]:
            line += f" (actual path: {full})"
        lines.append(line + "\n")
        if "backing-filename-format" in info:
            lines.append(f"backing file format: {info['backing-filename-format']}\n")
    if info.get("snapshots"):
        lines.append("Snapshot list:\n")
        entries = [
            SnapshotEntry(
                id=s["id"],
                name=s["name"],
                l1_table_offset=0,
                l1_size=0,
                date_sec=s["date-sec"],
                date_nsec=s["date-nsec"],
                vm_clock_nsec=s["vm-clock-sec"] * 1_000_000_000 + s["vm-clock-nsec"],
                vm_state_size=s["vm-state-size"] & 0xFFFFFFFFFFFFFFFF,
                icount=s.get("icount"),
            )
            for s in info["snapshots"]
        ]
        lines.append(format_snapshot_table(entries))
    if "format-specific" in info:
        lines.append("Format specific information:\n")
        out: list[str] = []
        _dump_qobject(qdict_order(info["format-specific"])["data"], 1, out)
        lines.append("".join(out))
    return "".join(lines)


# Section: qemu-img map

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

    An ``_INVALID`` run carries the corruption QEMU reports when a query reaches it."""

    __slots__ = ("end", "error", "kind", "offset", "start")

    def __init__(
        self,
        start: int,
        end: int,
        kind: int,
        offset: int | None,
        error: CorruptImageError | None = None,
    ) -> None:
        self.start = start
        self.end = end
        self.kind = kind
        self.offset = offset
        self.error = error


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


def _qcow2_runs(layer: Layer) -> list[_Run]:
    """The block status of every guest range of a qcow2 layer (QEMU's
    ``qcow2_co_block_status``), adjacent equal statuses merged.  A corrupt entry ends the
    walk with an ``_INVALID`` run to the end of the disk, which fails the query reaching it."""
    h = layer.header
    assert h is not None
    f = layer.file
    decoder = L2Decoder(h, layer.name)
    cs = h.cluster_size
    l2_span = cs * h.l2_entries
    size = layer.virtual_size
    nb_l1 = min(h.l1_size, layout.size_to_clusters(l2_span, size))
    file_len = f.size()
    l1_raw = f.pread(h.l1_table_offset, nb_l1 * 8) if nb_l1 else b""
    l1 = struct.unpack(f">{nb_l1}Q", l1_raw)
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

    for i, l1_entry in enumerate(l1):
        base = i * l2_span
        try:
            l2_offset = decoder.l2_table_offset(l1_entry, i)
        except CorruptImageError as err:
            runs.append(_Run(base, max(size, base + 1), _INVALID, None, err))
            return runs
        if not l2_offset:
            add(base, base + l2_span, _UNALLOCATED, None)
            continue
        table = f.pread(l2_offset, cs) if l2_offset < file_len else bytes(cs)
        stop = min(h.l2_entries, layout.size_to_clusters(cs, size - base))
        found, problem = decoder.runs(table, l2_offset, 0, stop, base)
        for start, end, sctype, host in found:
            kind = _MAP_KINDS[sctype]
            add(start, end, kind, None if encrypted or sctype == _COMPRESSED else host)
        if problem is not None:
            start = found[-1][1] if found else base
            try:
                signal_corruption(problem[0], path=layer.name, offset=problem[1])
            except CorruptImageError as err:
                runs.append(_Run(start, max(size, start + 1), _INVALID, None, err))
            return runs
    add(nb_l1 * l2_span, size, _UNALLOCATED, None)
    if not encrypted and not h.has_data_file and _metadata_preallocated(layer):
        return _split_by_host_holes(layer, runs)
    return runs


def _metadata_preallocated(layer: Layer) -> bool:
    """QEMU's ``qcow2_detect_metadata_preallocation``: far more clusters are refcounted
    than the host file really stores (``preallocation=metadata``)."""
    h = layer.header
    assert h is not None
    f = layer.file
    real_clusters = os.fstat(f.fd).st_blocks * 512 // h.cluster_size
    threshold = max(real_clusters * 10 // 9, real_clusters + 2)
    end_cluster = layout.size_to_clusters(h.cluster_size, f.size())
    if end_cluster < threshold:
        return False  # not even every cluster of the file could be refcounted
    cs = h.cluster_size
    raw = f.pread(h.refcount_table_offset, h.refcount_table_clusters * cs)
    reftable = struct.unpack(f">{len(raw) // 8}Q", raw)
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


def _split_by_host_holes(layer: Layer, runs: list[_Run]) -> list[_Run]:
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


def _raw_runs(layer: Layer) -> list[_Run]:
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
    statuses = [(_qcow2_runs(x) if x.header is not None else _raw_runs(x)) for x in layers]
    starts = [[r.start for r in runs] for runs in statuses]
    length = layers[0].virtual_size
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
        nbytes = min(nbytes, layer.virtual_size - pos)
        run = _status(statuses[depth], starts[depth], pos)
        if run.error is not None:
            raise run.error
        nbytes = min(nbytes, run.end - pos)
        offset = None if run.offset is None else run.offset + (pos - run.start)
        if run.kind in (_DATA, _ZERO, _DATA_ZERO):
            data = run.kind in (_DATA, _DATA_ZERO)
            zero = run.kind in (_ZERO, _DATA_ZERO)
            name = layer.data_name if offset is not None else None
            return MapEntry(pos, nbytes, depth, True, zero, data, offset, name)
        below = layers[depth + 1] if depth + 1 < len(layers) else None
        if below is None or pos >= below.virtual_size:
            name = layer.data_name if offset is not None else None
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


def layers_for(image_name: str) -> list[Layer]:
    """Open ``image_name`` and its backing chain for :func:`map_entries`; raises
    InvalidImageError for unknown formats."""
    layers = open_chain(image_name)
    if layers[0].header is None:
        for layer in layers:
            layer.close()
        raise InvalidImageError("Image is not in qcow2 format", path=image_name)
    return layers

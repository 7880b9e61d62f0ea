"""``qemu-img info`` and the snapshot table ``qemu-img snapshot -l`` prints, as QEMU 7.2.

* :func:`image_info` returns the ``qemu-img info --output=json`` object of an open image
  (:func:`~qcow2.tools.qemujson.qemu_json` prints it as qemu-img does) and
  :func:`format_info_human` the human layout (``bdrv_image_info_dump``);
* :func:`format_snapshot_table` is the ``qemu-img snapshot -l`` table.

Images are opened by :func:`qcow2.image.open_chain` (``mode="qemu"``, ``io=False``).
"""

from __future__ import annotations

import os
import time

from ..errors import CorruptImageError, InvalidImageError
from ..format import layout
from ..format.snapshot_table import SnapshotEntry
from ..image import Image, backing_path
from .qemujson import qdict_order

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

    from ..format.header import Header
    from ..image import Layer
    from ..io.fileio import HostFile


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


def image_info(layer: Layer, name: str | None = None) -> dict[str, Any]:
    """The ``qemu-img info --output=json`` object of an open image (in QEMU's insertion
    order: :func:`~qcow2.tools.qemujson.qemu_json` applies its key order).  ``name`` is
    the file name qemu-img shows (default: the path it was opened with)."""
    name = layer.path if name is None else name
    st = os.fstat(layer.file.fd)
    info: dict[str, Any] = {
        "filename": name,
        "format": layer.format,
        "dirty-flag": False,
        "actual-size": st.st_blocks * 512,
        "virtual-size": sectors_size(layer),
    }
    if not isinstance(layer, Image):
        return info
    h = layer.header
    info["dirty-flag"] = h.dirty
    info["cluster-size"] = h.cluster_size
    if h.crypt_method:
        info["encrypted"] = True
    if h.backing_file:
        info["backing-filename"] = h.backing_file
        info["full-backing-filename"] = backing_path(name, h.backing_file)
        if h.backing_format:
            info["backing-filename-format"] = h.backing_format
    if layer.snapshots:
        info["snapshots"] = [_snapshot_info(sn) for sn in layer.snapshots]
    info["format-specific"] = _format_specific(h, layer.file)
    return info


def sectors_size(layer: Layer) -> int:
    """The virtual size qemu-img shows: in whole 512-byte sectors (rounded down)."""
    return layer.virtual_size // 512 * 512


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

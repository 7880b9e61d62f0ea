"""The dir view's file attributes (mode, owner, group, times), kept in the image.

libvirt chowns its swtpm state directory to ``tss`` and makes it 0700, then runs swtpm as
``tss``; with a dir view mounted there, the kernel (``default_permissions``) must see those
attributes, and they must still be there after a remount.  They live in the store, in the
linear layout's last slot (:data:`vtpm_qcow.state.linear.ATTRS_SLOT`), as one small record:

* the layout is the image's only content, so the record is committed atomically like any
  section, copied by backups and carried by snapshots (an applied snapshot brings back the
  attributes it was taken with);
* swtpm (file view, or qemu-storage-daemon's export) never reads that slot and moves its
  section along with the others, so the image stays swtpm's own linear file;
* qcow2 knows nothing of it.

The record is a swtpm state blob (version 2 header, one DATA TLV) whose payload is JSON
``{"version": 1, "files": {NAME: {"mode", "uid", "gid", "atime_ns", "mtime_ns",
"ctime_ns"}}}``, with the name ``"."`` for the directory itself: a blob, so the views'
checks of every slot they commit (:func:`vtpm_qcow.state.blob.check_stored_blob`) pass.
An unreadable record is ignored (the defaults apply) rather than making the image unusable.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass

from ..errors import StateFormatError
from ..state.blob import BLOB_HEADER_STRUCT, TAG_DATA, TLV_HEADER_STRUCT, check_stored_blob
from ..state.linear import ATTRS_SECTION

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..state.store import Store

log = logging.getLogger(__name__)

#: the directory's own entry in the record
DIRECTORY = "."
RECORD_VERSION = 1
#: most names the record keeps (the directory, swtpm's sections under both prefixes)
MAX_ENTRIES = 64


@dataclass
class Attrs:
    """One file's attributes as the kernel sees them (``mode`` without the file type)."""

    mode: int
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int


def encode(files: dict[str, Attrs]) -> bytes:
    """The record for ``files`` as a stored blob."""
    payload = json.dumps(
        {"version": RECORD_VERSION, "files": {n: asdict(a) for n, a in sorted(files.items())}},
        separators=(",", ":"),
    ).encode()
    tlv = TLV_HEADER_STRUCT.pack(TAG_DATA, len(payload)) + payload
    total = BLOB_HEADER_STRUCT.size + len(tlv)
    return BLOB_HEADER_STRUCT.pack(2, 1, BLOB_HEADER_STRUCT.size, 0, total) + tlv


def decode(data: bytes, *, source: str = ATTRS_SECTION) -> dict[str, Attrs]:
    """The attributes in a record; StateFormatError if it is not one."""
    info = check_stored_blob(data, source=source)
    tlv = next((t for t in info.tlvs if t.tag == TAG_DATA), None)
    if tlv is None:
        raise StateFormatError("attribute record without data", path=source)
    try:
        record = json.loads(data[tlv.offset : tlv.offset + tlv.length])
        if record.get("version") != RECORD_VERSION:
            raise StateFormatError(
                f"attribute record version {record.get('version')!r}", path=source
            )
        return {
            str(name): Attrs(**{k: int(v) for k, v in fields.items()})
            for name, fields in record["files"].items()
        }
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise StateFormatError(f"attribute record unreadable: {err}", path=source) from None


def load(store: Store) -> dict[str, Attrs]:
    """The attributes kept in ``store`` (none if it holds no readable record)."""
    data = store.read_section(ATTRS_SECTION)
    if data is None:
        return {}
    try:
        return decode(data, source=f"{store.path} {ATTRS_SECTION}")
    except StateFormatError as err:
        log.warning("%s; using default attributes", err)
        return {}


def save(store: Store, files: dict[str, Attrs]) -> None:
    """Keep ``files`` in ``store`` (one atomic commit)."""
    if len(files) > MAX_ENTRIES:
        keep = sorted(files)[:MAX_ENTRIES]
        files = {name: files[name] for name in keep}
    store.write_section(ATTRS_SECTION, encode(files))

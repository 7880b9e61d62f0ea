"""The vTPM state store: a qcow2 image whose virtual disk is swtpm's linear state file.

There is no private container: byte ``n`` of the virtual disk is byte ``n`` of the file
swtpm's ``--tpmstate backend-uri=file://`` backend would use (see :mod:`vtpm_qcow.state.linear`).
The same image therefore also works through qemu-storage-daemon's FUSE export + swtpm, and
``qemu-img``/``qemu-io`` read it.  Internal qcow2 snapshots carry the TPM state; their names
are the tags (the same tags as the VM disk's snapshots).

The linear file has a fixed capacity, the virtual disk size (default 4 MiB, like Proxmox
VE's ``tpmstate0`` volumes; swtpm 0.7.1 needs about 30 KiB even with EK certificates).  Like
a block device, or qemu-storage-daemon's non-growable FUSE export, it does not change size:
:meth:`Store.resize_linear` (the file view's ftruncate) zeroes what a shrink would cut and
refuses to grow past the capacity, which swtpm tolerates (it only needs the mapped size).

The default cluster size is 4 KiB: swtpm rewrites a whole ~6-9 KiB permall per state-changing
command, so each atomic commit copies two or three data clusters plus one 4 KiB L2 table
instead of 64 KiB ones, and a snapshot only un-shares the few clusters a later write touches.
It is also the page size swtpm msyncs with, so file view writes map onto whole clusters.
``tools/bench/bench_store.py`` measures it (docs/BENCHMARKS.md, "vTPM store write path").

Every change goes through one ``Image.commit_atomically`` call: a section replace (the
dir view's rename) or a file view write is all-or-nothing across a crash and durable on
return.  The store holds the image's write lock (QEMU-compatible) while open.
"""

from __future__ import annotations

import errno
import os
from _thread import RLock  # threading's RLock; threading imports functools, collections

import xxhash

import qcow2

from ..errors import StateFormatError, StoreError
from . import linear
from .record import Record
from .secret import OPTIONS_HINT

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from datetime import UTC, datetime
    from types import TracebackType
    from typing import Final
else:
    try:  # the C module: ``import datetime`` runs all of its pure-Python twin first (1.7 ms
        # of info's start-up) before taking these same objects from it
        from _datetime import UTC, datetime
    except ImportError:  # an interpreter without the C module
        from datetime import UTC, datetime

DEFAULT_SIZE: Final = 4 * 1024 * 1024
DEFAULT_CLUSTER_SIZE: Final = 4096
#: PBKDF2 time of an encrypted store's key slot, in milliseconds (qemu-img's default).
DEFAULT_ITER_TIME: Final = 2000
#: The store must at least hold the linear header.
MIN_SIZE: Final = linear.HEADER_SIZE
#: swtpm's linear layout uses u32 offsets: a larger state file is pointless.
MAX_SIZE: Final = 1 << 32
#: Layouts ending beyond this are refused rather than read into memory (swtpm's state with
#: EK certificates is about 30 KiB; libtpms caps its NV memory far below this).
MAX_LAYOUT: Final = 64 * 1024 * 1024
#: How much of the linear file a writable store keeps in memory, in qcow2's data cache
#: (swtpm's state is about 30 KiB with EK certificates): reads and the completion of a
#: commit's partly written clusters come from there (docs/BENCHMARKS.md).
DATA_CACHE_LIMIT: Final = 1024 * 1024
#: What a cache miss reads at least: the whole state and the room after it, in one read.
DATA_CACHE_READAHEAD: Final = 64 * 1024


def digest(data: bytes) -> str:
    """The content digest used throughout: xxh3-128, hex."""
    return xxhash.xxh3_128_hexdigest(data)


class SectionInfo(Record):
    """One state section: where it lives in the linear file, its size and digest."""

    __slots__ = _FIELDS = ("name", "offset", "size", "section_length", "digest")
    name: str
    offset: int
    size: int
    section_length: int
    digest: str

    def __init__(self, name: str, offset: int, size: int, section_length: int, digest: str) -> None:
        self._init(name, offset, size, section_length, digest)


class SnapshotInfo(Record):
    """One snapshot: its tag (qcow2 name), qcow2 id, date and the digests of its sections."""

    __slots__ = _FIELDS = ("tag", "id", "date", "vm_state_size", "sections")
    tag: str
    id: str
    date: datetime
    vm_state_size: int
    sections: dict[str, SectionInfo]

    def __init__(
        self,
        tag: str,
        id: str,
        date: datetime,
        vm_state_size: int,
        sections: dict[str, SectionInfo] | None = None,
    ) -> None:
        self._init(tag, id, date, vm_state_size, {} if sections is None else sections)


def _parse_bounded(head: bytes, size: int, source: str) -> linear.LinearHeader:
    """Parse a layout header, refusing layouts too large to be TPM state (bounded memory)."""
    header = linear.parse_header(head, size=size, source=source)
    if header.end > MAX_LAYOUT:
        raise StateFormatError(
            f"state sections end at {header.end} bytes, beyond the "
            f"{MAX_LAYOUT >> 20} MiB any TPM state needs",
            path=source,
        )
    return header


def _sections_of(
    read: Callable[[int, int], bytes], size: int, source: str
) -> dict[str, SectionInfo]:
    """Section infos of the linear file read through ``read(offset, length)``."""
    head = read(0, min(linear.HEADER_SIZE, size))
    if not linear.is_formatted(head):
        return {}
    header = _parse_bounded(head, size, source)
    out = {}
    for name in linear.SECTION_NAMES:
        slot = header.slot(name)
        if slot.allocated:
            data = read(slot.offset, slot.data_length)
            out[name] = SectionInfo(
                name, slot.offset, slot.data_length, slot.section_length, digest(data)
            )
    return out


class Store:
    """A vTPM state image.  Use :meth:`create` or :meth:`open`; a context manager."""

    def __init__(self, image: qcow2.Image, path: str, *, writable: bool) -> None:
        self._image = image
        self.path = path
        self.writable = writable
        self._generation = 0
        self._lock = RLock()
        self._closed = False
        if writable:
            # Only a writer holds the image's write lock, so every change goes through it;
            # a shared reader must see other writers' changes.
            image.enable_data_cache(DATA_CACHE_LIMIT, readahead=DATA_CACHE_READAHEAD)
            # One flush per commit; the open rolled forward (qcow2.commit_records).
            image.enable_commit_records()

    # Section: life cycle

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        size: int = DEFAULT_SIZE,
        cluster_size: int = DEFAULT_CLUSTER_SIZE,
        key: bytes | None = None,
        iter_time: int = DEFAULT_ITER_TIME,
    ) -> Store:
        """Create a new image holding an empty linear layout (no sections); open for writing.

        With ``key`` the image is LUKS-encrypted as ``qemu-img create -o
        encrypt.format=luks,encrypt.key-secret=...,encrypt.iter-time=MS`` makes it
        (aes-256-xts-plain64, PBKDF2-SHA256 for ``iter_time`` milliseconds): QEMU's tools
        open it with the same secret."""
        path = os.fspath(path)
        if not MIN_SIZE <= size <= MAX_SIZE or size % 512:
            raise StoreError(
                f"size {size} must be a multiple of 512 from 512 bytes to 4 GiB", path=path
            )
        if key is not None and not key:
            raise StoreError("an empty secret cannot encrypt an image", path=path)
        if iter_time < 1:
            raise StoreError(f"iteration time {iter_time} ms must be at least 1", path=path)
        if os.path.exists(path):
            raise StoreError("already exists", path=path)
        if key is None:
            image = qcow2.create(path, size, cluster_size=cluster_size)
        else:
            image = qcow2.create(
                path,
                size,
                cluster_size=cluster_size,
                encrypt_key_secret=key,
                encrypt_format="luks",
                encrypt_iter_time=iter_time,
            )
        store = cls(image, path, writable=True)
        try:
            store.commit_linear([(0, linear.empty_layout())])
        except BaseException:
            store.close()
            raise
        return store

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        writable: bool = True,
        force_share: bool = False,
        key: bytes | None = None,
        require_key: bool = True,
    ) -> Store:
        """Open an existing image; writable opens take the image's write lock.

        ``force_share`` (read-only only) reads an image another process holds, like
        ``qemu-img -U``: what is read may be mid-update.  ``key`` is the passphrase of a
        LUKS-encrypted image (a wrong one raises :class:`qcow2.errors.EncryptionKeyError`);
        without it an encrypted image is refused, naming the options that give it, unless
        ``require_key`` is False (then only its metadata can be read: ``info``).
        """
        path = os.fspath(path)
        if not os.path.exists(path):
            raise StoreError("no such file", path=path)
        image = qcow2.open(
            path,
            writable=writable,
            force_share=force_share,
            key_secret=key,
            roll_forward=True,  # read-only too: the newest commit, as the daemon wrote it
        )
        if image.encrypted and key is None and require_key:
            image.close()
            raise StoreError(
                f"is LUKS-encrypted: give its secret ({OPTIONS_HINT})",
                path=path,
                errno=errno.EACCES,
            )
        if image.virtual_size < MIN_SIZE:
            image.close()
            raise StoreError(
                f"virtual size {image.virtual_size} too small for a linear state file", path=path
            )
        return cls(image, path, writable=writable)

    @staticmethod
    def is_encrypted(path: str | os.PathLike[str]) -> bool:
        """True if the image at ``path`` is encrypted (its header, read without a lock:
        also while a daemon or QEMU holds it)."""
        path = os.fspath(path)
        if not os.path.exists(path):
            raise StoreError("no such file", path=path)
        with qcow2.open(path, force_share=True) as image:
            return bool(image.encrypted)

    def close(self) -> None:
        """Release the image (and its lock).  Idempotent."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._image.close()

    def exchange_image(self, other: Store) -> None:
        """Swap the images behind this store and ``other`` (paths stay): a live migration's
        hand-over (:mod:`vtpm_qcow.export.handoff`) moves a mounted store between its image
        and a private copy holding the same linear file, without the file system noticing.
        Both generations move on (cached section bytes are read again)."""
        with self._lock, other._lock:
            self._check_open()
            other._check_open()
            self._image, other._image = other._image, self._image
            self.writable, other.writable = other.writable, self.writable
            self._changed()
            other._changed()

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def image(self) -> qcow2.Image:
        """The underlying :class:`qcow2.Image` (for inspection)."""
        return self._image

    @property
    def encrypted(self) -> bool:
        """True if the image's data is encrypted (LUKS or QEMU's legacy AES)."""
        return bool(self._image.encrypted)

    def encryption(self) -> dict[str, object] | None:
        """What ``qemu-img info`` shows of the image's encryption, read from the LUKS
        header (no key needed): format, cipher, hash, key slots; None if not encrypted."""
        if not self._image.encrypted:
            return None
        from qcow2.tools.info import image_info

        data = image_info(self._image)["format-specific"]["data"]
        found: dict[str, object] = data["encrypt"]
        return found

    def add_key(
        self, key: bytes, new_key: bytes, *, keyslot: int | None = None, iter_time: int = 2000
    ) -> int:
        """Let ``new_key`` open the encrypted image too (``qemu-img amend -o
        encrypt.state=active,encrypt.new-secret=...``): a new LUKS key slot, unlocked by
        ``key``; returns its number.  The data and the master key stay as they are."""
        from qcow2.crypto import add_key_slot

        with self._lock:
            self._check_open(write=True)
            self._check_luks()
            return add_key_slot(
                self._image.file,
                self._image.header.crypto_header,
                key,
                new_key,
                keyslot=keyslot,
                iter_time_ms=iter_time,
            )

    def erase_keys(self, *, old_key: bytes | None = None, keyslot: int | None = None) -> list[int]:
        """Erase the LUKS key slots ``old_key`` opens, or slot ``keyslot`` (``qemu-img amend
        -o encrypt.state=inactive``); never the last active one.  Returns the slots."""
        from qcow2.crypto import erase_key_slots

        with self._lock:
            self._check_open(write=True)
            self._check_luks()
            return erase_key_slots(
                self._image.file,
                self._image.header.crypto_header,
                old_secret=old_key,
                keyslot=keyslot,
            )

    def _check_luks(self) -> None:
        if not self._image.encrypted or self._image.header.crypto_header is None:
            raise StoreError("is not LUKS-encrypted: it has no key slots", path=self.path)

    @property
    def generation(self) -> int:
        """Bumped by every change of content or snapshots (cache invalidation)."""
        return self._generation

    @property
    def linear_size(self) -> int:
        """Size of the linear file (the file view): the virtual disk size."""
        return int(self._image.virtual_size)

    def _check_open(self, *, write: bool = False) -> None:
        if self._closed:
            raise StoreError("store is closed", path=self.path)
        if write and not self.writable:
            raise StoreError("opened read-only", path=self.path)

    def _changed(self) -> None:
        self._generation += 1

    # Section: the linear file (file view)

    def read_linear(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset``; short at the end of the file, like read()."""
        with self._lock:
            self._check_open()
            if offset < 0 or length < 0:
                raise StoreError(
                    f"negative read offset {offset} or length {length}", path=self.path
                )
            length = max(0, min(length, self.linear_size - offset))
            if not length:
                return b""
            return bytes(self._image.read(offset, length))

    def commit_linear(self, writes: Iterable[tuple[int, bytes]]) -> None:
        """Write all extents atomically and durably (all or nothing across a crash)."""
        extents = [(int(offset), bytes(data)) for offset, data in writes if data]
        with self._lock:
            self._check_open(write=True)
            for offset, data in extents:
                if offset < 0 or offset + len(data) > self.linear_size:
                    raise StoreError(
                        f"write of {len(data)} bytes at {offset} beyond the "
                        f"capacity of {self.linear_size} bytes",
                        path=self.path,
                    )
            if not extents:
                return
            self._image.commit_atomically(extents)
            self._changed()

    def checkpoint(self) -> bool:
        """Make the header of the last commit durable (commits with one flush leave it to
        the next flush): after a crash, programs that know no commit records (qemu-img,
        QEMU) then see the newest state too.  True if there was anything to do."""
        with self._lock:
            self._check_open()
            log = self._image.commit_log
            if not self.writable or log is None or log.settled:
                return False
            self._image.flush()
            return True

    def resize_linear(self, new_size: int) -> None:
        """The file view's ftruncate: bytes from ``new_size`` on read as zeros afterwards.

        The size stays the capacity (like a block device); growing past it is refused.
        """
        with self._lock:
            self._check_open(write=True)
            if new_size < 0 or new_size > self.linear_size:
                raise StoreError(
                    f"cannot resize the state file to {new_size} bytes "
                    f"(capacity {self.linear_size})",
                    path=self.path,
                )
            if new_size < self.linear_size:
                self._image.write_zeroes(new_size, self.linear_size - new_size)
                self._image.flush()
                self._changed()

    # Section: state sections (dir view)

    def _current_layout(self, blob_size: int = 0) -> bytes:
        """The linear file's bytes up to the end of its last section (or its first 192).

        With ``blob_size``, up to where storing such a blob may write (bytes past the
        layout's end may be stale on this fixed-size disk: the update must see them).
        """
        head = self.read_linear(0, linear.HEADER_SIZE)
        end = linear.HEADER_SIZE
        if linear.is_formatted(head):
            end = _parse_bounded(head, self.linear_size, self.path).end
        if blob_size:
            end = min(self.linear_size, max(end, linear.store_window(head, blob_size)))
        return head + self.read_linear(linear.HEADER_SIZE, end - linear.HEADER_SIZE)

    def _header(self) -> linear.LinearHeader | None:
        head = self.read_linear(0, linear.HEADER_SIZE)
        if not linear.is_formatted(head):
            return None
        return _parse_bounded(head, self.linear_size, self.path)

    def read_section(self, name: str) -> bytes | None:
        """The blob of section ``name`` ("permall", "volatilestate", "savestate") or None."""
        number = self._slot_number(name)
        with self._lock:
            header = self._header()
            if header is None:
                return None
            slot = header.slots[number]
            return self.read_linear(slot.offset, slot.data_length) if slot.allocated else None

    def write_section(self, name: str, data: bytes) -> None:
        """Replace section ``name`` with ``data`` atomically (swtpm's allocation rules)."""
        self._slot_number(name)
        with self._lock:
            self._check_open(write=True)
            current = self._current_layout(len(data))
            update = linear.store_section(current, name, data, source=self.path)
            self._apply(update, f"{name} of {len(data)} bytes")

    def delete_section(self, name: str) -> None:
        """Remove section ``name`` (later sections move down, as swtpm does); no-op if absent."""
        self._slot_number(name)
        with self._lock:
            self._check_open(write=True)
            header = self._header()
            if header is None or not header.slot(name).allocated:
                return
            update = linear.delete_section(self._current_layout(), name, source=self.path)
            self._apply(update, f"removal of {name}")

    def _apply(self, update: linear.LinearUpdate, what: str) -> None:
        if update.size > self.linear_size:
            raise StoreError(
                f"{what} needs {update.size} bytes, capacity is {self.linear_size}", path=self.path
            )
        self.commit_linear(update.writes)

    def clear(self) -> None:
        """Forget all TPM state: the linear file reads as zeros (swtpm formats it afresh)."""
        self.replace_layout(b"")

    def replace_layout(self, data: bytes, *, source: str = "linear file") -> None:
        """Atomically replace the whole state with linear file ``data`` (import; ``b""``
        clears).

        Whatever the old layout used beyond the new end is zeroed in the same commit.  If
        the old layout was unreadable (its end unknown), the rest of the file is zeroed
        afterwards: the new state is already complete then, so a crash in between only
        leaves stale bytes past its end, which nothing reads.
        """
        if data:
            linear.parse_header(data, source=source)
        with self._lock:
            self._check_open(write=True)
            try:
                self._header()
                known = True
            except StateFormatError:
                known = False
            extent = self._whole_layout(data, source=source)
            self.commit_linear([extent])
            end = len(extent[1])
            if not known and end < self.linear_size:
                self._image.write_zeroes(end, self.linear_size - end)
                self._image.flush()

    def _whole_layout(self, data: bytes, *, source: str = "linear file") -> tuple[int, bytes]:
        """The extent that makes the linear file exactly ``data``: zeros over whatever
        the current layout uses beyond its end (all of the header if that is unreadable)."""
        if len(data) > self.linear_size:
            raise StoreError(
                f"{source} needs {len(data)} bytes, capacity is {self.linear_size}",
                path=self.path,
            )
        try:
            header = self._header()
            used = header.end if header else linear.HEADER_SIZE
        except StateFormatError:
            used = linear.HEADER_SIZE
        used = min(used, self.linear_size)
        return (0, data + bytes(max(0, used - len(data))))

    def layout(self) -> bytes:
        """The linear file's meaningful bytes: up to the end of its last section (export).

        Empty if the file is not formatted (no TPM state yet).
        """
        with self._lock:
            self._check_open()
            head = self.read_linear(0, linear.HEADER_SIZE)
            if not linear.is_formatted(head):
                return b""
            return self._current_layout()

    def sections(self) -> dict[str, SectionInfo]:
        """Info (offset, size, digest) of the sections present, by name."""
        with self._lock:
            self._check_open()
            return _sections_of(self.read_linear, self.linear_size, self.path)

    def state_digest(self) -> str:
        """One digest over all sections (name and content): equal iff the TPM state is."""
        return combined_digest({n: s.digest for n, s in self.sections().items()})

    @staticmethod
    def _slot_number(name: str) -> int:
        try:
            return linear.slot_number(name)
        except ValueError as err:
            raise StoreError(str(err)) from None

    # Section: snapshots

    def snapshots(self) -> list[SnapshotInfo]:
        """The image's internal snapshots, oldest first, with their sections' digests."""
        with self._lock:
            self._check_open()
            out = []
            for view in self._image.snapshot_views():
                entry = view.entry
                size = min(int(view.virtual_size), self.linear_size)
                try:
                    sections = _sections_of(view.read, size, f"{self.path}@{entry.name}")
                except StateFormatError:
                    sections = {}
                date = utc_time(entry.date_sec)
                out.append(SnapshotInfo(entry.name, entry.id, date, entry.vm_state_size, sections))
            return out

    def snapshot_tags(self) -> list[str]:
        """The snapshots' tags, oldest first (the snapshot table alone: nothing is read)."""
        with self._lock:
            self._check_open()
            return [entry.name for entry in self._image.snapshots]

    def create_snapshot(
        self, tag: str, *, overwrite: bool = False, layout: bytes | None = None
    ) -> None:
        """Snapshot the current state as ``tag``; an existing tag needs ``overwrite=True``.

        Overwriting replaces the old snapshot in one metadata transaction (the result of
        QEMU's savevm delete + create, but a crash leaves the old snapshot or the new one,
        never neither).  With ``layout`` (a linear file, as :meth:`layout` returns), the
        snapshot holds that state instead of the current one, which stays as it is: a
        state of the past gets its tag in the same single transaction.
        """
        check_tag(tag, self.path)
        if layout:
            linear.parse_header(layout, source=f"state for snapshot '{tag}'")
        with self._lock:
            self._check_open(write=True)
            exists = tag in self.snapshot_tags()
            if exists and not overwrite:
                raise StoreError(f"snapshot '{tag}' already exists", path=self.path)
            # The current state needs no copy: the plain snapshot shares its clusters.
            content = []
            if layout is not None and layout != self.layout():
                content = [self._whole_layout(layout)]
            self._image.create_snapshot(tag, replace=exists, content=content)
            self._changed()

    def apply_snapshot(self, tag: str) -> None:
        """Revert the TPM state to snapshot ``tag``."""
        with self._lock:
            self._check_open(write=True)
            self._require(tag)
            self._image.apply_snapshot(tag, name_only=True)
            self._changed()

    def delete_snapshot(self, tag: str) -> None:
        """Delete snapshot ``tag`` and free the clusters only it used."""
        with self._lock:
            self._check_open(write=True)
            self._require(tag)
            self._image.delete_snapshot(tag, name_only=True)
            self._changed()

    def _require(self, tag: str) -> None:
        if tag not in self.snapshot_tags():
            raise StoreError(f"no snapshot '{tag}'", path=self.path)

    def snapshot_section(self, tag: str, name: str) -> bytes | None:
        """Section ``name`` as snapshot ``tag`` holds it (None if absent)."""
        number = self._slot_number(name)
        with self._lock:
            self._check_open()
            self._require(tag)
            view = self._image.snapshot(tag, name_only=True)
            size = min(int(view.virtual_size), self.linear_size)
            head = view.read(0, linear.HEADER_SIZE)
            if not linear.is_formatted(head):
                return None
            slot = _parse_bounded(head, size, f"{self.path}@{tag}").slots[number]
            return bytes(view.read(slot.offset, slot.data_length)) if slot.allocated else None


def utc_time(seconds: int) -> datetime:
    """A snapshot's date (qcow2's seconds since the epoch) as an aware UTC datetime."""
    return datetime.fromtimestamp(seconds, tz=UTC)


def combined_digest(section_digests: dict[str, str]) -> str:
    """One digest over the sections' names and digests: equal iff the TPM states are."""
    return digest("".join(f"{n}={d};" for n, d in sorted(section_digests.items())).encode())


def snapshot_digest(info: SnapshotInfo) -> str:
    """The :meth:`Store.state_digest` the state of snapshot ``info`` had."""
    return combined_digest({n: s.digest for n, s in info.sections.items()})


def check_tag(tag: str, path: str) -> None:
    """The one rule for tags, everywhere a tag comes in: a qcow2 snapshot name (non-empty,
    at most 65535 bytes of UTF-8) on one line.  A tag is looked up by name only, never as
    a snapshot ID: the vTPM image's IDs are not the disks' IDs."""
    if not tag or len(tag.encode()) > 0xFFFF or "\n" in tag:
        raise StoreError(f"invalid snapshot tag {tag!r}", path=path)


__all__ = (
    "DEFAULT_CLUSTER_SIZE",
    "DEFAULT_SIZE",
    "SectionInfo",
    "SnapshotInfo",
    "Store",
    "check_tag",
    "combined_digest",
    "digest",
    "snapshot_digest",
    "utc_time",
)

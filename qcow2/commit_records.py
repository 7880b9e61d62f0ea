"""Commit records: one flush per acknowledged commit, still atomic across a crash.

A metadata transaction (:mod:`qcow2.transaction`) makes a commit durable with two barriers:
the new generation, then the header switch that points at it.  With commit records the
switch is no longer a barrier of its own:

1. Commit ``g`` writes its new generation into clusters that no header reachable after a
   crash can reach (free in generation ``g-1`` and not freed by it, see below), and a
   *record* into slot ``g % 2`` of header extension :data:`~layout.EXT_COMMIT_RECORDS`:
   the header bytes 24-71 it was built on (``base``) and switches to (``new``), the host
   extents it wrote, and an xxh3-128 digest over the record and every byte of those
   extents.  Then ONE flush, then the commit is acknowledged.
2. Right after that flush, the header bytes 24-71 of generation ``g`` are written (no
   flush): the next commit's flush, or :meth:`qcow2.image.Image.flush`, makes them
   durable.  Until then the durable header is ``g-1`` or ``g``.
3. Opening the image rolls forward (:func:`roll_forward`): from the header on disk it
   follows the records whose base matches and whose digest verifies (a torn record or a
   torn extent fails its digest: that commit was never acknowledged).

Reuse rule: clusters that commit ``g`` frees are still reachable from header ``g-1``,
which may be the durable one until the flush of commit ``g+1``; so commit ``g+1`` never
allocates them (:meth:`CommitLog.excluded`) and commit ``g+2`` may.  Two slots suffice:
commit ``g`` overwrites record ``g-2``, which is only needed while header ``g-3`` may be
the durable one, and :meth:`CommitLog.prepare` settles (writes and flushes the header)
before a commit whenever that could be the case.

Foreign writers: the records are valid only while autoclear bit
:data:`~layout.AUTOCLEAR_COMMIT_RECORDS` is set.  QEMU (and any program that does not know
the bit) clears it when it opens the image read-write, before its first write, so a crash,
then a write by QEMU, then our open never rolls forward over QEMU's writes; such a program
sees the header on disk: a consistent, ``qemu-img check``-clean generation at most one
commit behind.  Before the bit is set again the slots are zeroed and flushed
(:func:`enable`), so no stale record can match a header QEMU wrote.
"""

from __future__ import annotations

from .errors import Qcow2Error
from .format import layout
from .format.header import HeaderExtension, rewrite_cluster0, write_header_fields
from .io.fileio import fault_point

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

    from .format.header import Header
    from .image import Image
    from .io.fileio import HostFile

_START = layout.RECORD_FIELDS_START
_SLOT = layout.COMMIT_RECORD_SLOT_SIZE
_HEAD = layout.COMMIT_RECORD_HEAD
_EXTENT = layout.COMMIT_RECORD_EXTENT
_DIGEST = layout.COMMIT_RECORD_DIGEST_SIZE
_FIELDS = layout.RECORD_FIELDS_STRUCT
_FIELD_NAMES = layout.RECORD_FIELD_NAMES
#: A record whose extents add up to more than this is not believed (hostile images): a
#: commit of the vTPM store writes a few clusters, a resize of a big disk a few MiB.
_MAX_VERIFIED_BYTES = 256 << 20
#: Bytes read at once while verifying a record's digest.
_VERIFY_CHUNK = 1 << 20


class Record:
    """One parsed commit record (digest not yet verified)."""

    __slots__ = ("base", "digest", "extents", "generation", "head", "new")

    def __init__(
        self,
        generation: int,
        base: bytes,
        new: bytes,
        extents: list[tuple[int, int]],
        head: bytes,
        digest: bytes,
    ) -> None:
        self.generation = generation
        self.base = base
        self.new = new
        self.extents = extents
        #: The record's bytes before the digest (covered by it).
        self.head = head
        self.digest = digest


def header_fields(header: Header, changes: dict[str, int] | None = None) -> bytes:
    """Header bytes 24-71 of ``header`` with ``changes`` applied (what a record's
    ``base`` and ``new`` hold)."""
    if changes:
        values = [changes.get(name, getattr(header, name)) for name in _FIELD_NAMES]
    else:
        values = [getattr(header, name) for name in _FIELD_NAMES]
    return _FIELDS.pack(*values)


def pack_record(
    generation: int, base: bytes, new: bytes, runs: Sequence[tuple[int, bytes]]
) -> bytes | None:
    """The record of a commit writing ``runs`` (``(host_offset, data)``), or None if the
    extents do not fit in a slot."""
    import xxhash

    if len(runs) > layout.COMMIT_RECORD_MAX_EXTENTS:
        return None
    head = bytearray(_HEAD.pack(layout.COMMIT_RECORD_MAGIC, generation, base, new, len(runs), 0))
    for offset, data in runs:
        head += _EXTENT.pack(offset, len(data))
    digest = xxhash.xxh3_128(head)
    for _, data in runs:
        digest.update(data)
    return bytes(head) + digest.digest()


def parse_record(raw: bytes) -> Record | None:
    """The record in slot bytes ``raw``, or None (empty, torn beyond its head, foreign)."""
    if len(raw) < _HEAD.size:
        return None
    magic, generation, base, new, count, _ = _HEAD.unpack_from(raw)
    if magic != layout.COMMIT_RECORD_MAGIC or count > layout.COMMIT_RECORD_MAX_EXTENTS:
        return None
    end = _HEAD.size + count * _EXTENT.size
    extents = [_EXTENT.unpack_from(raw, pos) for pos in range(_HEAD.size, end, _EXTENT.size)]
    return Record(generation, base, new, extents, bytes(raw[:end]), bytes(raw[end : end + _DIGEST]))


def verify(f: HostFile, record: Record) -> bool:
    """Whether every extent of ``record`` lies in the file and the digest matches."""
    import xxhash

    file_size = f.size()
    total = 0
    for offset, length in record.extents:
        total += length
        if offset < 0 or offset + length > file_size or total > _MAX_VERIFIED_BYTES:
            return False
    digest = xxhash.xxh3_128(record.head)
    for offset, length in record.extents:
        end = offset + length
        while offset < end:  # in pieces: a hostile record's extents cost no memory
            n = min(_VERIFY_CHUNK, end - offset)
            digest.update(f.pread(offset, n))
            offset += n
    return digest.digest() == record.digest


def slots_offset(header: Header) -> int | None:
    """File offset of the record slots (the data of the commit records extension), or
    None if the image has no usable one."""
    if header.version < 3:
        return None
    offset = header.header_length
    for ext in header.extensions:
        offset += layout.EXT_HEADER_STRUCT.size
        if ext.type == layout.EXT_COMMIT_RECORDS:
            if len(ext.data) < layout.COMMIT_RECORD_SLOTS * _SLOT:
                return None
            return offset
        offset += layout.align_up(len(ext.data), 8)
    return None


def read_records(f: HostFile, header: Header) -> list[Record]:
    """The parseable records of the image's slots (none if the bit is clear)."""
    if not header.autoclear_features & layout.AUTOCLEAR_COMMIT_RECORDS:
        return []
    start = slots_offset(header)
    if start is None:
        return []
    raw = f.pread(start, layout.COMMIT_RECORD_SLOTS * _SLOT)
    records = []
    for slot in range(layout.COMMIT_RECORD_SLOTS):
        record = parse_record(raw[slot * _SLOT : (slot + 1) * _SLOT])
        if record is not None:
            records.append(record)
    return records


def roll_forward(f: HostFile, header: Header) -> tuple[bytes, int] | None:
    """``(header bytes 24-71, generation)`` of the newest generation the records reach
    from the header on disk, or None if no record applies.  Never writes."""
    return _roll(f, header, read_records(f, header))


def slots_in_use(f: HostFile, header: Header) -> bool:
    """Whether the record slots hold anything but zeros."""
    start = slots_offset(header)
    if start is None:
        return False
    length = layout.COMMIT_RECORD_SLOTS * _SLOT
    return f.pread(start, length).count(0) != length


def clear_slots(f: HostFile, header: Header) -> None:
    """Empty the record slots (flushed) if they hold anything."""
    start = slots_offset(header)
    if start is not None and slots_in_use(f, header):
        f.pwrite(start, bytes(layout.COMMIT_RECORD_SLOTS * _SLOT))
        f.flush()


def _roll(f: HostFile, header: Header, records: list[Record]) -> tuple[bytes, int] | None:
    if not records:
        return None
    current = header_fields(header)
    reached: Record | None = None
    while True:
        candidates = [
            r
            for r in records
            if r.base == current
            and (reached is None or r.generation == reached.generation + 1)
            and verify(f, r)
        ]
        if not candidates:
            break
        reached = max(candidates, key=lambda r: r.generation)
        current = reached.new
        records.remove(reached)
    if reached is None:
        return None
    return current, reached.generation


class CommitLog:
    """The commit records of one open, writable image (:meth:`Image.enable_commit_records`).

    Tracks which generation's header is written and which is known durable, and the
    clusters each not-yet-settled commit freed (:meth:`excluded`).
    """

    def __init__(self, image: Image, slots: int, generation: int) -> None:
        self.image = image
        self.slots = slots
        #: Generation of the image's state in memory (the newest commit).
        self.generation = generation
        #: Generation whose header bytes are in the file (maybe not durable yet).
        self.written = generation
        #: Generation whose header is durable.
        self.durable = generation
        self._freed: dict[int, list[int]] = {}
        #: Commits made with one flush (for ``info`` and the tests).
        self.commits = 0
        #: The slots may hold a record (:meth:`invalidate` empties them).
        self.slots_used = False

    @property
    def settled(self) -> bool:
        """The durable header is the state in memory: nothing to roll forward."""
        return self.durable == self.generation and not self._freed

    def excluded(self) -> set[int]:
        """Clusters free in memory that a durable header may still reach."""
        out: set[int] = set()
        for generation, clusters in self._freed.items():
            if generation > self.durable:
                out.update(clusters)
        return out

    def invalidate(self) -> None:
        """Empty the slots, durably, before a header change made without a record (a
        snapshot, a resize, an in-place write, a commit too big for a record): such a
        change may bring back header bytes an old record was built on, and the record
        must not roll forward from them.  The header must be durable and current first
        (:meth:`qcow2.image.Image.flush`), or emptying the slots would lose commits."""
        if self.slots_used:
            assert self.settled
            self.image.file.pwrite(self.slots, bytes(layout.COMMIT_RECORD_SLOTS * _SLOT))
            self.image.file.flush()
            self.slots_used = False

    def prepare(self) -> None:
        """Before a commit: settle if the slot it overwrites may still be needed."""
        if self.durable < self.generation - 1:
            self.image.flush()

    def before_flush(self) -> None:
        """Write the newest header if it is not in the file yet (the flush that follows
        makes it durable)."""
        if self.written != self.generation:
            self.image.file.pwrite(_START, header_fields(self.image.header))
            self.written = self.generation

    def after_flush(self) -> None:
        """Everything written so far is durable."""
        self.durable = self.written
        for generation in [g for g in self._freed if g <= self.durable]:
            del self._freed[generation]

    def write(self, op: str, runs: Sequence[tuple[int, bytes]], new: bytes) -> bool:
        """Write a commit's runs and its record, and flush once: the commit is durable on
        return.  False (nothing written) if its extents do not fit in a record."""
        image = self.image
        record = pack_record(self.generation + 1, header_fields(image.header), new, runs)
        if record is None:
            image.flush()
            self.invalidate()
            return False
        f = image.file
        slot = self.slots + (self.generation + 1) % layout.COMMIT_RECORD_SLOTS * _SLOT
        fault_point(f"{op}.write_metadata")
        try:
            for offset, data in runs:
                f.pwrite(offset, data)
            self.slots_used = True
            f.pwrite(slot, record)
            self.before_flush()
            fault_point(f"{op}.flush")
            f.flush()
        except BaseException:
            # Never acknowledged: the record must never roll forward.
            try:
                f.pwrite(slot, bytes(_SLOT))
            except Qcow2Error:
                pass
            raise
        self.after_flush()
        return True

    def committed(self, freed: list[int], op: str, new: bytes | None = None) -> None:
        """The commit written by :meth:`write` is the state in memory now: write its
        header, ``new`` if given (durable with the next flush; a failure leaves that to
        the next commit)."""
        self.generation += 1
        self.commits += 1
        if freed:
            self._freed[self.generation] = freed
        try:
            fault_point(f"{op}.header_write")
            self.image.file.pwrite(_START, new or header_fields(self.image.header))
            self.written = self.generation
        except (OSError, Qcow2Error):
            pass

    def switched(self) -> None:
        """A commit of another kind (two flushes, header included) made the state in
        memory durable."""
        self.generation += 1
        self.written = self.durable = self.generation
        self._freed.clear()


def _with_extension(header: Header) -> Header | None:
    """A copy of ``header`` with an empty records extension added (bit clear), or None
    if the image cannot have one (version 2, a backing file name after the extensions,
    a foreign extension of our type, no room in cluster 0)."""
    if header.version < 3 or header.backing_file:
        return None
    if header.find_extension(layout.EXT_COMMIT_RECORDS) is not None:
        return None
    trial = header.copy()
    trial.autoclear_features &= ~layout.AUTOCLEAR_COMMIT_RECORDS
    trial.extensions.append(
        HeaderExtension(layout.EXT_COMMIT_RECORDS, bytes(layout.COMMIT_RECORD_SLOTS * _SLOT))
    )
    try:
        trial.pack_cluster0()
    except Qcow2Error:
        return None  # does not fit in cluster 0
    return trial


def possible(header: Header) -> bool:
    """Whether an image with ``header`` can use commit records (nothing is written)."""
    return slots_offset(header) is not None or _with_extension(header) is not None


def enable(image: Image) -> CommitLog | None:
    """Start using commit records on writable ``image`` (at its first commit, so that an
    open alone writes nothing): add the extension if needed, zero the slots, set the
    autoclear bit, each step flushed.  None if the image cannot have them
    (:func:`possible`)."""
    header = image.header
    f = image.file
    if header.version < 3 or header.backing_file:
        return None
    image.flush()  # a generation the open rolled forward to is written first
    bit = layout.AUTOCLEAR_COMMIT_RECORDS
    slots = slots_offset(header)
    generation = max((r.generation for r in read_records(f, header)), default=0)
    if slots is None:
        trial = _with_extension(header)
        if trial is None:
            return None
        rewrite_cluster0(f, trial)
        header.assign(trial)
        slots = slots_offset(header)
        assert slots is not None
    elif not header.autoclear_features & bit:
        image.flush()
        f.pwrite(slots, bytes(layout.COMMIT_RECORD_SLOTS * _SLOT))
        f.flush()
    log = CommitLog(image, slots, generation)
    if not header.autoclear_features & bit:
        header.autoclear_features |= bit
        write_header_fields(f, autoclear_features=header.autoclear_features)
        f.flush()
    else:
        log.slots_used = image._stale_slots  # emptied at the first change without a record
    image._stale_slots = False
    return log

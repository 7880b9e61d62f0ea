"""What the files of a mounted store hold, and what each view's directory holds.

A file's bytes are a :class:`Content`: :class:`MemoryContent` (dir view temp files and
``.lock``, files detached from the store), :class:`SectionContent` (a dir view state file:
one section of the store) or :class:`LinearContent` (the file view's one file: the store's
linear layout, with its commit rule for swtpm's stores).  A view is a :class:`Namespace`:
which names exist, what backs them and where the commit points are
(:class:`FileNamespace`, :class:`DirNamespace`).  The inode and handle bookkeeping around
them is :class:`vtpm_qcow.export.fuse.StoreFS`'s; these classes never see a FUSE request,
and run only inside its handlers (one at a time, see that module).

Both views refuse to commit a blob that fails swtpm's own header checks
(:func:`~vtpm_qcow.state.blob.check_stored_blob`): the file view's fsync fails with EIO, the
dir view's rename with EINVAL, and the store keeps its last state.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterable

import pyfuse3

from ..errors import HANDLED, StateFormatError
from ..state.blob import check_stored_blob
from ..state.linear import (
    EMPTY_SLOT,
    HEADER_SIZE,
    SECTION_NAMES,
    LinearHeader,
    Slot,
    dir_file_name,
    is_formatted,
    parse_header,
    section_of_file_name,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..state.store import Store

log = logging.getLogger(__name__)

#: Name of the only file in the file view.
STATE_FILE_NAME = "tpmstate"
#: Granularity of the file view's write buffer (the kernel writes mmap pages of this size).
PAGE_SIZE = 4096
#: Largest in-memory file (dir view temp files, detached files) and largest linear file.
MAX_FILE_SIZE = 64 * 1024 * 1024
#: How far past a truncate the file view looks for cut bytes that were not zeros (swtpm's
#: whole state is a few dozen KiB; a writable store keeps its first MiB in memory).
MAX_CUT_SCAN = 1024 * 1024
#: Most in-memory files the dir view holds at once (bounds memory with MAX_FILE_SIZE).
MAX_MEMORY_FILES = 64


def _refuse(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


# Section: file contents


class Content:
    """What a file holds."""

    store_backed = False

    def size(self) -> int:
        """Current length, uncommitted writes included."""
        raise NotImplementedError

    def read(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (short at end of file)."""
        raise NotImplementedError

    def write(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` (buffered until :meth:`commit`)."""
        raise NotImplementedError

    def truncate(self, length: int) -> None:
        """Set the length."""
        raise NotImplementedError

    @property
    def dirty(self) -> bool:
        """True if writes wait for :meth:`commit`."""
        return False

    def commit(self) -> None:
        """Make buffered writes part of the store (atomic and durable); no-op if clean."""

    def commit_at_close(self) -> bool:
        """At the last close: :meth:`commit`; True if buffered writes were dropped instead
        (the kernel's cached pages then no longer match the store)."""
        self.commit()
        return False

    def discard(self) -> None:
        """Drop buffered writes (the store changed underneath, e.g. snapshot apply)."""

    def all_bytes(self) -> bytes:
        """The whole content, uncommitted writes included."""
        return self.read(0, self.size())


def _check_extent(offset: int, length: int) -> None:
    if offset < 0 or offset + length > MAX_FILE_SIZE:
        raise _refuse(errno.EFBIG)


class MemoryContent(Content):
    """Bytes kept in memory only (dir view temp files and ``.lock``)."""

    def __init__(self, data: bytes = b"") -> None:
        self.data = bytearray(data)

    def size(self) -> int:
        return len(self.data)

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.data[offset : offset + length])

    def write(self, offset: int, data: bytes) -> None:
        _check_extent(offset, len(data))
        if offset > len(self.data):
            self.data.extend(bytes(offset - len(self.data)))
        self.data[offset : offset + len(data)] = data

    def truncate(self, length: int) -> None:
        _check_extent(length, 0)
        if length < len(self.data):
            del self.data[length:]
        else:
            self.data.extend(bytes(length - len(self.data)))


class SectionContent(Content):
    """A state section of the store (dir view ``tpm2-00.<name>``).

    Direct writes (not through a temp file and rename) copy the section into memory and are
    committed as one ``write_section`` at fsync or release.
    """

    store_backed = True

    def __init__(self, store: Store, name: str) -> None:
        self.store = store
        self.name = name
        self.pending: MemoryContent | None = None
        self._cached: tuple[int, bytes] | None = None  # (store.generation, section bytes)

    def _current(self) -> bytes:
        generation = self.store.generation
        if self._cached is None or self._cached[0] != generation:
            self._cached = (generation, bytes(self.store.read_section(self.name) or b""))
        return self._cached[1]

    def size(self) -> int:
        if self.pending is not None:
            return self.pending.size()
        return len(self._current())

    def read(self, offset: int, length: int) -> bytes:
        if self.pending is not None:
            return self.pending.read(offset, length)
        return self._current()[offset : offset + length]

    def _editable(self) -> MemoryContent:
        if self.pending is None:
            self.pending = MemoryContent(self._current())
        return self.pending

    def write(self, offset: int, data: bytes) -> None:
        self._editable().write(offset, data)

    def truncate(self, length: int) -> None:
        self._editable().truncate(length)

    @property
    def dirty(self) -> bool:
        return self.pending is not None

    def commit(self) -> None:
        if self.pending is not None:
            data = bytes(self.pending.data)
            if data:
                check_stored_blob(data, source=f"{self.store.path} {self.name}")
            try:
                if data:
                    self.store.write_section(self.name, data)
                else:
                    # swtpm never stores an empty blob; an emptied state file has no section.
                    self.store.delete_section(self.name)
            except HANDLED:
                # the host failed the commit: the section stays as committed, writes dropped
                self.pending = None
                raise
            self.pending = None

    def discard(self) -> None:
        self.pending = None

    def prime(self, data: bytes) -> None:
        """The section now holds ``data`` (just written): no need to read it back."""
        self._cached = (self.store.generation, bytes(data))


class LinearContent(Content):
    """The store's linear file (file view): a page-granular write-back buffer that commits
    swtpm's *stores*, not its msyncs.

    ``pages`` maps page numbers to the page's new bytes; a partial page write first reads
    the page's committed bytes.  The file's size is the store's capacity, like a block
    device (see :meth:`Store.resize_linear`): writes past it fail with EFBIG.

    swtpm's linear backend (``swtpm_nvstore_linear.c``, the same sequence from 0.7.1 to
    0.10) makes one blob durable with up to three ``msync(MS_SYNC)`` calls, each of which
    reaches this file system as the pages in its range and then an fsync:

    * a blob of the same length: its pages, one msync;
    * a new length within its section: the header page (``FlushHeader``), then the blob's
      pages: at the first fsync the header points at data that is not written yet;
    * a new slot: a whole-file msync and an ftruncate first (nothing changed yet), then as
      above;
    * a blob outgrowing its section: slot emptied and the sections after it moved down
      (``RemoveFile``), a whole-file msync, ftruncate, the slot allocated again at the end,
      a whole-file msync: at the first fsync the slot is empty;
    * a delete (``DeleteName``): slot emptied, whole-file msync, ftruncate, whole-file msync.

    So an fsync commits only a complete layout (:meth:`problem`): every slot whose
    header entry changed since the last commit has every page of its data rewritten since
    then, and a slot is emptied only together with swtpm's ftruncate (a delete, not a
    blob on its way to a larger section).  An fsync that arrives half-way through a store
    is answered without committing; the store's last msync commits all of it.  A complete
    layout whose rewritten blobs fail swtpm's own header checks is refused (EIO) and
    dropped.  A half-done store still buffered when the last descriptor closes (swtpm
    killed between its msyncs) is dropped too: the last complete state stays.
    """

    store_backed = True

    def __init__(self, store: Store) -> None:
        self.store = store
        self.pages: dict[int, bytearray] = {}
        #: an ftruncate since the last commit (swtpm resizes between emptying and refilling)
        self.truncated = False
        #: fsyncs answered without a commit because a store was half done (for ``info``)
        self.deferred = 0
        #: half-done stores dropped at release or refused stores (for ``info`` and logs)
        self.dropped = 0
        #: the last truncate cut bytes that were not zeros (the kernel may cache them)
        self.cut_data = False

    def size(self) -> int:
        return int(self.store.linear_size)

    def _committed(self, offset: int, length: int) -> bytes:
        return bytes(self.store.read_linear(offset, length))

    def read(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size() - offset))
        if not self.pages:
            return self._committed(offset, length)
        out = bytearray()
        pos, end = offset, offset + length
        while pos < end:
            number, within = divmod(pos, PAGE_SIZE)
            take = min(PAGE_SIZE - within, end - pos)
            page = self.pages.get(number)
            if page is not None:
                out += page[within : within + take]
            else:
                out += self._committed(pos, take)
            pos += take
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        if offset < 0 or offset + len(data) > self.size():
            raise _refuse(errno.EFBIG)
        pos, view = offset, memoryview(data)
        while view:
            number, within = divmod(pos, PAGE_SIZE)
            take = min(PAGE_SIZE - within, len(view))
            page = self.pages.get(number)
            if page is None:
                # a whole-page write (mmap writeback) needs no copy of the old bytes
                base = number * PAGE_SIZE
                old = bytes(take) if take == PAGE_SIZE else self._committed(base, PAGE_SIZE)
                page = self.pages[number] = bytearray(old)
            page[within : within + take] = view[:take]
            pos += take
            view = view[take:]

    def _committed_header(self) -> LinearHeader | None:
        """The committed layout's header; None if the committed file is not a layout."""
        head = self._committed(0, HEADER_SIZE)
        if not is_formatted(head):
            return None
        try:
            return parse_header(head, size=self.size(), source=self.store.path)
        except StateFormatError:
            return None

    def truncate(self, length: int) -> None:
        # ftruncate: the bytes past ``length`` read as zeros (the size stays the capacity).
        # Within the committed layout the zeros are buffered like any write, so that they
        # become durable with the store they belong to; beyond it they are written at once.
        if length < 0 or length > self.size():
            raise _refuse(errno.EFBIG)
        committed = self._committed_header()
        live_end = max(length, committed.end if committed is not None else 0)
        # What the kernel caches past ``length`` came from here (swtpm msyncs before it
        # truncates): only cut non-zero bytes make its cached pages stale.
        tail = (
            self.read(length, min(self.size(), MAX_CUT_SCAN) - length)
            if length < MAX_CUT_SCAN
            else b""
        )
        self.cut_data = bool(tail.strip(b"\0"))
        if live_end > length:
            self.write(length, bytes(live_end - length))
        for number in [n for n in self.pages if (n + 1) * PAGE_SIZE > live_end]:
            keep = max(0, live_end - number * PAGE_SIZE)
            if keep:
                self.pages[number][keep:] = bytes(PAGE_SIZE - keep)
            else:
                del self.pages[number]
        self.store.resize_linear(live_end)
        self.truncated = True

    @property
    def dirty(self) -> bool:
        return bool(self.pages)

    def extents(self) -> list[tuple[int, bytes]]:
        """The buffered pages as ``(offset, data)`` extents, adjacent pages merged."""
        size = self.size()
        extents: list[tuple[int, bytes]] = []
        for number in sorted(self.pages):
            offset = number * PAGE_SIZE
            data = bytes(self.pages[number][: max(0, size - offset)])
            if extents and extents[-1][0] + len(extents[-1][1]) == offset:
                extents[-1] = (extents[-1][0], extents[-1][1] + data)
            elif data:
                extents.append((offset, data))
        return extents

    def _rewritten(self, slot: Slot) -> bool:
        """True if every page of ``slot``'s data is buffered (rewritten since the commit)."""
        first, last = slot.offset // PAGE_SIZE, (slot.end_of_data - 1) // PAGE_SIZE
        return all(number in self.pages for number in range(first, last + 1))

    def _touched(self, slot: Slot) -> bool:
        """True if any page of ``slot``'s data is buffered."""
        first, last = slot.offset // PAGE_SIZE, (slot.end_of_data - 1) // PAGE_SIZE
        return any(first <= number <= last for number in self.pages)

    def problem(self) -> tuple[bool, str] | None:
        """What keeps the buffered layout from being committed; None if nothing does.

        ``(True, why)``: a store half done, to be completed by swtpm's next msync.
        ``(False, why)``: complete, but not a state swtpm would load (refused).
        """
        head = self.read(0, HEADER_SIZE)
        if not is_formatted(head):
            return None  # no layout (cleared or not yet formatted): nothing points anywhere
        try:
            new = parse_header(head, size=self.size(), source=self.store.path)
        except StateFormatError as err:
            return False, str(err)
        rewritten: list[tuple[int, Slot]] = []
        if head == self._committed(0, HEADER_SIZE):
            # the usual store (same length): no slot changed, check the blobs it rewrote
            rewritten = [
                (n, s) for n, s in enumerate(new.slots) if s.allocated and self._touched(s)
            ]
        else:
            old = self._committed_header()
            for number, slot in enumerate(new.slots):
                before = old.slots[number] if old is not None else EMPTY_SLOT
                if not slot.allocated:
                    if before.allocated and not self.truncated:
                        return True, f"slot {number} emptied without a resize (a blob moving)"
                elif slot != before:
                    if not self._rewritten(slot):
                        return True, f"slot {number}: data at {slot.offset} not rewritten yet"
                    rewritten.append((number, slot))
                elif self._touched(slot):
                    rewritten.append((number, slot))
        for number, slot in rewritten:
            name = SECTION_NAMES[number] if number < len(SECTION_NAMES) else f"slot {number}"
            try:
                check_stored_blob(
                    self.read(slot.offset, slot.data_length), source=f"{self.store.path} {name}"
                )
            except StateFormatError as err:
                return False, str(err)
        return None

    def commit(self) -> None:
        if not self.pages:
            return
        problem = self.problem()
        if problem is not None:
            half_done, why = problem
            if half_done:
                # swtpm's next msync completes this store and commits it with these pages
                self.deferred += 1
                log.debug("fsync in the middle of a store, not committed: %s", why)
                return
            self.drop(f"refused: {why}")
            raise pyfuse3.FUSEError(errno.EIO)
        try:
            self.store.commit_linear(self.extents())
        except HANDLED as err:
            # The host failed the commit (ENOSPC, EIO): the store keeps what it holds (the
            # last committed state), and so does the file; swtpm's msync fails.
            self.drop(f"not committed: {err}")
            raise
        self.pages.clear()
        self.truncated = False

    def drop(self, why: str) -> None:
        """Forget the buffered pages (the committed state stays), saying ``why``."""
        self.dropped += 1
        log.warning(
            "%s: buffered state file writes dropped, the last complete state stays: %s",
            self.store.path,
            why,
        )
        self.discard()

    def commit_at_close(self) -> bool:
        """At the last close: commit a complete store, drop a half-done or refused one (its
        writer is gone).  True if pages were dropped (the kernel's cached pages are stale)."""
        if not self.pages:
            return False
        problem = self.problem()
        if problem is None:
            self.commit()
            return False
        half_done, why = problem
        self.drop(f"closed in the middle of a store: {why}" if half_done else f"refused: {why}")
        return True

    def discard(self) -> None:
        self.pages.clear()
        self.truncated = False


# Section: namespaces (the two views)


class Namespace:
    """What a view's directory holds: which names exist, what backs them, commit points."""

    #: short name for messages and the control socket's ``info``
    view = ""

    def __init__(self, store: Store) -> None:
        self.store = store

    def initial_names(self) -> dict[str, Content]:
        """Names present at mount time and their contents."""
        raise NotImplementedError

    def create(self, name: str, existing: int) -> Content:
        """Content of a new file ``name`` (``existing`` = files in the directory now)."""
        raise NotImplementedError

    def bind(self, name: str, data: bytes) -> Content:
        """Content for ``data`` renamed onto ``name``: the commit point of the dir view."""
        raise NotImplementedError

    def unbind(self, name: str, content: Content) -> None:
        """``name`` (backed by ``content``) leaves the directory (unlink, rename away)."""
        raise NotImplementedError

    def names_after_apply(self) -> dict[str, Content | None]:
        """After a snapshot apply: store-backed names and their content (None: gone)."""
        raise NotImplementedError

    def names_to_invalidate(self) -> Iterable[str]:
        """Names whose existence may change without the kernel knowing (snapshot apply)."""
        raise NotImplementedError


class FileNamespace(Namespace):
    """One file, ``tpmstate``, holding the linear layout (swtpm ``backend-uri=file://``)."""

    view = "file"

    def __init__(self, store: Store, file_name: str = STATE_FILE_NAME) -> None:
        super().__init__(store)
        self.file_name = file_name

    def initial_names(self) -> dict[str, Content]:
        return {self.file_name: LinearContent(self.store)}

    def create(self, name: str, existing: int) -> Content:
        if name != self.file_name:
            raise _refuse(errno.EPERM)
        return LinearContent(self.store)

    def bind(self, name: str, data: bytes) -> Content:
        raise _refuse(errno.EPERM)

    def unbind(self, name: str, content: Content) -> None:
        # swtpm_setup --overwrite unlinks the state file to start a new TPM.
        self.store.clear()

    def names_after_apply(self) -> dict[str, Content | None]:
        return {self.file_name: LinearContent(self.store)}

    def names_to_invalidate(self) -> Iterable[str]:
        return (self.file_name,)


class DirNamespace(Namespace):
    """swtpm's state directory: ``tpm2-00.<section>`` from the store, the rest in memory."""

    view = "dir"

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        #: readdir shows sections under the prefix last written (TPM 2.0 until told otherwise)
        self.tpm2 = True

    def _section_names(self) -> dict[str, Content]:
        return {
            dir_file_name(section, tpm2=self.tpm2): SectionContent(self.store, section)
            for section in self.store.sections()
        }

    def initial_names(self) -> dict[str, Content]:
        return self._section_names()

    def create(self, name: str, existing: int) -> Content:
        parsed = section_of_file_name(name)
        if parsed is not None:
            self.tpm2 = parsed[1]
            return SectionContent(self.store, parsed[0])
        if existing >= MAX_MEMORY_FILES:
            raise _refuse(errno.ENOSPC)
        return MemoryContent()

    def bind(self, name: str, data: bytes) -> Content:
        parsed = section_of_file_name(name)
        if parsed is None:
            return MemoryContent(data)
        section, self.tpm2 = parsed
        content = SectionContent(self.store, section)
        if data:
            check_stored_blob(data, source=f"{self.store.path} {name}")
            self.store.write_section(section, data)
            content.prime(data)
        else:
            self.store.delete_section(section)
        return content

    def unbind(self, name: str, content: Content) -> None:
        if isinstance(content, SectionContent):
            self.store.delete_section(content.name)

    def names_after_apply(self) -> dict[str, Content | None]:
        present = self._section_names()
        gone: dict[str, Content | None] = {
            dir_file_name(section, tpm2=tpm2): None
            for section in SECTION_NAMES
            for tpm2 in (True, False)
        }
        return gone | dict(present)

    def names_to_invalidate(self) -> Iterable[str]:
        return [dir_file_name(s, tpm2=t) for s in SECTION_NAMES for t in (True, False)]


def same_section(a: Content, b: Content) -> bool:
    """Whether ``a`` and ``b`` are the same section of the store."""
    return isinstance(a, SectionContent) and isinstance(b, SectionContent) and a.name == b.name

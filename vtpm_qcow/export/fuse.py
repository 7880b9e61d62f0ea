"""pyfuse3 views of a :class:`~vtpm_qcow.state.store.Store`: the file view and the dir view.

Both views are one :class:`StoreFS` (inodes, lookup counts, open handles, attributes) with a
:class:`Namespace` strategy that decides what the directory holds and where the commit
points are:

* :class:`FileNamespace` (``swtpm --tpmstate backend-uri=file://MOUNT/tpmstate``): one file
  whose bytes are the store's linear layout.  Writes (swtpm's mmap pages) are buffered;
  **fsync is the commit point** (``store.commit_linear``, atomic and durable), and release
  (last close) for writers that never fsync; close itself is not (see
  :meth:`StoreFS.flush`).  ftruncate zeroes the tail, ``unlink`` (swtpm_setup's way to
  start over) clears the store.
* :class:`DirNamespace` (``swtpm --tpmstate dir=MOUNT``): ``tpm2-00.<section>`` files are
  the store's sections; everything else (``.lock``, ``TMP2-00.*``) lives in memory.  **A
  rename onto a state file name is the commit point** (``store.write_section``); unlink of a
  state file deletes the section.

Both views refuse to commit a blob that fails swtpm's own header checks
(:func:`~vtpm_qcow.state.blob.check_stored_blob`): the file view's fsync fails with EIO, the dir
view's rename with EINVAL, and the store keeps its last state.

Every handler runs its whole body as one synchronous function under one lock (``_locked``,
on the event loop or, with ``threaded``, in a worker thread),
so the store sees one caller at a time and control-socket snapshots never interleave with a
commit.  Failures become ``FUSEError(errno)`` in one place, :func:`fuse_errors`.

Caching: every change passes through this process, so entries and attributes are cached by
the kernel for a long time and page caches are kept across opens.  Changes that do not come
through the kernel (snapshot apply, see :meth:`StoreFS.apply_snapshot`) invalidate the
kernel's entries, attributes and pages explicitly.
"""

from __future__ import annotations

import collections
import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

import pyfuse3
import trio
from pyfuse3 import FileHandleT, FileNameT, FlagT, InodeT, ModeT

from ..errors import HANDLED, StateFormatError, StoreError
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

if TYPE_CHECKING:
    from ..state.store import Store

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

#: Name of the only file in the file view.
STATE_FILE_NAME = "tpmstate"
#: Seconds the kernel may cache entries and attributes.  Safe because every change either
#: goes through the kernel or is followed by an explicit invalidation.
CACHE_TIMEOUT = 3600.0
#: Granularity of the file view's write buffer (the kernel writes mmap pages of this size).
PAGE_SIZE = 4096
#: Largest in-memory file (dir view temp files, detached files) and largest linear file.
MAX_FILE_SIZE = 64 * 1024 * 1024
#: How far past a truncate the file view looks for cut bytes that were not zeros (swtpm's
#: whole state is a few dozen KiB; a writable store keeps its first MiB in memory).
MAX_CUT_SCAN = 1024 * 1024
#: Most in-memory files the dir view holds at once (bounds memory with MAX_FILE_SIZE).
MAX_MEMORY_FILES = 64


def error_errno(err: BaseException) -> int:
    """The errno a FUSE client should see for ``err`` (both error trees carry one)."""
    if isinstance(err, pyfuse3.FUSEError):
        return err.errno
    if isinstance(err, HANDLED):
        return err.errno
    if isinstance(err, OSError) and err.errno:
        return err.errno
    return errno.EIO


def fuse_errors(
    handler: Callable[Concatenate[StoreFS, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[StoreFS, P], Coroutine[Any, Any, T]]:
    """Let a handler raise anything: every failure reaches the kernel as ``FUSEError(errno)``.

    Expected refusals (``FUSEError`` raised on purpose) pass unchanged; anything else is
    logged with its traceback once, here.
    """

    name = handler.__name__

    @functools.wraps(handler)
    async def wrapper(self: StoreFS, /, *args: P.args, **kwargs: P.kwargs) -> T:
        self.requests[name] += 1
        start = time.perf_counter_ns()
        try:
            return await handler(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception as err:  # the FUSE boundary: nothing else may reach pyfuse3
            code = error_errno(err)
            log.error("%s failed (%s): %s", name, errno.errorcode.get(code), err)
            log.debug("traceback of the %s failure", name, exc_info=True)
            raise pyfuse3.FUSEError(code) from err
        finally:
            self.handler_ns[name] += time.perf_counter_ns() - start

    return wrapper


def _refuse(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


# Section: permission checks

#: Linux capability numbers (``linux/capability.h``) the checks below honour.
CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER, CAP_FSETID = 0, 1, 2, 3, 4
MAY_EXEC, MAY_WRITE, MAY_READ = os.X_OK, os.W_OK, os.R_OK


class Caller:
    """Who sent a request: ``ctx``'s fsuid/fsgid, and (read from ``/proc`` only when a
    decision depends on them) its supplementary groups and effective capabilities.

    The mount has no ``default_permissions`` (each of its checks cost the dir view a
    GETATTR round trip per commit, see :func:`mount_options`), so the handlers make the
    kernel's checks themselves: :meth:`permits` is ``generic_permission()``.
    """

    def __init__(self, ctx: pyfuse3.RequestContext) -> None:
        self.uid = ctx.uid
        self.gid = ctx.gid
        self.pid = ctx.pid
        self._status: tuple[frozenset[int], int] | None = None

    def _proc(self) -> tuple[frozenset[int], int]:
        if self._status is None:
            groups: frozenset[int] = frozenset()
            caps = 0
            try:
                with open(f"/proc/{self.pid}/status", encoding="ascii") as status:
                    for line in status:
                        if line.startswith("Groups:"):
                            groups = frozenset(int(g) for g in line.split()[1:])
                        elif line.startswith("CapEff:"):
                            caps = int(line.split()[1], 16)
            except (OSError, ValueError):
                pass  # the caller is gone: no groups, no capabilities
            self._status = (groups, caps)
        return self._status

    def in_group(self, gid: int) -> bool:
        """``in_group_p``: the fsgid or a supplementary group."""
        return gid == self.gid or gid in self._proc()[0]

    def capable(self, cap: int) -> bool:
        """The caller's effective capability set holds ``cap``."""
        return bool(self._proc()[1] >> cap & 1)

    def owns(self, uid: int) -> bool:
        """``inode_owner_or_capable``: the owner, or CAP_FOWNER."""
        return self.uid == uid or self.capable(CAP_FOWNER)

    def permits(self, mode: int, uid: int, gid: int, want: int) -> bool:
        """``generic_permission``: may the caller ``want`` (MAY_* bits) an inode?"""
        if self.uid == uid:
            bits = mode >> 6
        elif (mode >> 3 & want) != (mode & want) and self.in_group(gid):
            bits = mode >> 3  # group and other bits differ here: membership matters
        else:
            bits = mode
        if bits & want == want:
            return True
        if stat.S_ISDIR(mode):
            if not want & MAY_WRITE and self.capable(CAP_DAC_READ_SEARCH):
                return True
            return self.capable(CAP_DAC_OVERRIDE)
        if want == MAY_READ and self.capable(CAP_DAC_READ_SEARCH):
            return True
        if not want & MAY_EXEC or mode & 0o111:
            return self.capable(CAP_DAC_OVERRIDE)
        return False

    def require(self, mode: int, uid: int, gid: int, want: int) -> None:
        """:meth:`permits` or EACCES."""
        if not self.permits(mode, uid, gid, want):
            raise _refuse(errno.EACCES)


def _open_access(flags: int) -> int:
    """MAY_* bits an open with ``flags`` needs (``build_open_flags``)."""
    want = {os.O_RDONLY: MAY_READ, os.O_WRONLY: MAY_WRITE}.get(
        flags & os.O_ACCMODE, MAY_READ | MAY_WRITE
    )
    return want | MAY_WRITE if flags & os.O_TRUNC else want


# Section: file contents


class Content:
    """What a file holds.  Methods run under the file system lock, in a worker thread."""

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

    def snapshot(self) -> bytes:
        """The whole content."""
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
                self.store.write_section(self.name, data)
            else:
                # swtpm never stores an empty blob; an emptied state file has no section.
                self.store.delete_section(self.name)
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
        self.store.commit_linear(self.extents())
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


# Section: inodes and handles


@dataclass
class Node:
    """An inode: attributes, content and the counts that decide when it may be forgotten."""

    inode: InodeT
    content: Content
    mode: int
    uid: int = 0
    gid: int = 0
    name: str | None = None  # None once unlinked or replaced
    lookups: int = 0
    opens: int = 0
    atime_ns: int = field(default_factory=time.time_ns)
    mtime_ns: int = field(default_factory=time.time_ns)
    ctime_ns: int = field(default_factory=time.time_ns)

    def touch(self) -> None:
        """Record a modification."""
        self.mtime_ns = self.ctime_ns = time.time_ns()


@dataclass
class Handle:
    """An open file: the node and whether it may write."""

    node: Node
    writable: bool


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


# Section: the file system


class StoreFS(pyfuse3.Operations):
    """pyfuse3 operations serving a :class:`Store` through a :class:`Namespace`.

    :param threaded: run store calls in a worker thread (keeps the event loop responsive
        while a commit waits for the disk) instead of on the event loop itself.  Off by
        default: every request waits for the same lock anyway, and the thread hop costs
        more than a typical store call.
    """

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, store: Store, namespace: Namespace, *, threaded: bool = False) -> None:
        super().__init__()
        self.store = store
        self.namespace = namespace
        self.threaded = threaded
        self.lock = trio.Lock()
        self.uid = os.getuid()
        self.gid = os.getgid()
        self.nodes: dict[InodeT, Node] = {}
        self.names: dict[str, Node] = {}
        self.handles: dict[FileHandleT, Handle] = {}
        self._next_inode = pyfuse3.ROOT_INODE + 1
        self._next_handle = 1
        self.root_ctime_ns = time.time_ns()
        #: (mode, uid, gid) of the root directory: fixed (chmod/chown of it are no-ops).
        self._root_perm = (stat.S_IFDIR | 0o755, self.uid, self.gid)
        #: requests that changed the store (for the control socket's info and benchmarks)
        self.commits = 0
        #: FUSE requests served, by handler name
        self.requests: collections.Counter[str] = collections.Counter()
        #: nanoseconds spent inside the handlers, by handler name (what a request costs
        #: this process, commits included, apart from pyfuse3's and trio's own work)
        self.handler_ns: collections.Counter[str] = collections.Counter()
        #: called with the view after each request that changed the store (test hook: the
        #: crash tests' write logs mark committed states with it)
        self.commit_observers: list[Callable[[str], None]] = []
        #: called with the running count of fsync requests as each arrives (test hook)
        self.fsync_observers: list[Callable[[int], None]] = []
        for name, content in namespace.initial_names().items():
            self._link(name, content, 0o640)

    # -- plumbing ----------------------------------------------------------------------

    async def _locked(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn`` under the file system lock (in a worker thread if ``threaded``)."""
        if not self.threaded and not self.lock.locked():
            # Uncontended and synchronous (the usual request): no task holds the lock and
            # none can take it while a call that never yields runs on this event loop, so
            # the call needs neither ``await`` (a pass of trio's scheduler, an epoll_wait)
            # nor the lock's bookkeeping (acquire_nowait + release: ~1.5 us per request).
            return self._observed(fn, *args, **kwargs)
        async with self.lock:
            if not self.threaded:
                return self._observed(fn, *args, **kwargs)
            call = functools.partial(self._observed, fn, *args, **kwargs)
            result: T = await trio.to_thread.run_sync(call)
            return result

    def _observed(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(...)``; if it changed the store, count a commit and tell the observers."""
        generation = self.store.generation
        try:
            return fn(*args, **kwargs)
        finally:
            if self.store.generation != generation:
                self.commits += 1
                for observer in self.commit_observers:
                    observer(self.namespace.view)

    def _new_node(self, content: Content, mode: int) -> Node:
        inode = InodeT(self._next_inode)
        self._next_inode += 1
        node = Node(inode, content, stat.S_IFREG | (mode & 0o7777), self.uid, self.gid)
        self.nodes[inode] = node
        return node

    def _link(self, name: str, content: Content, mode: int) -> Node:
        node = self._new_node(content, mode)
        node.name = name
        self.names[name] = node
        return node

    @staticmethod
    def _keep(node: Node) -> bytes | None:
        """What an open store-backed node must keep showing once detached (else None)."""
        return node.content.snapshot() if node.opens and node.content.store_backed else None

    def _detach(self, node: Node, kept: bytes | None = None) -> None:
        """``node`` loses its name; a store-backed node becomes ``kept`` bytes in memory.

        Like an unlinked file on a disk, an open node keeps showing its old bytes, but no
        longer reaches the store.
        """
        if node.name is not None and self.names.get(node.name) is node:
            del self.names[node.name]
        node.name = None
        if node.content.store_backed:
            node.content = MemoryContent(kept or b"")
        self._maybe_forget(node)

    def _maybe_forget(self, node: Node) -> None:
        if node.name is None and node.lookups <= 0 and node.opens <= 0:
            self.nodes.pop(node.inode, None)

    def _node(self, inode: InodeT) -> Node:
        node = self.nodes.get(inode)
        if node is None:
            raise _refuse(errno.ENOENT)
        return node

    def _handle(self, fh: FileHandleT) -> Handle:
        handle = self.handles.get(fh)
        if handle is None:
            raise _refuse(errno.EBADF)
        return handle

    def _attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = node.inode
        attrs.st_mode = ModeT(node.mode)
        attrs.st_nlink = 1 if node.name is not None else 0
        attrs.st_uid, attrs.st_gid = node.uid, node.gid
        size = node.content.size()
        attrs.st_size = size
        attrs.st_blksize = PAGE_SIZE
        attrs.st_blocks = (size + 511) // 512
        attrs.st_atime_ns, attrs.st_mtime_ns = node.atime_ns, node.mtime_ns
        attrs.st_ctime_ns = node.ctime_ns
        attrs.entry_timeout = attrs.attr_timeout = CACHE_TIMEOUT
        return attrs

    def _root_attrs(self) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = pyfuse3.ROOT_INODE
        attrs.st_mode = ModeT(self._root_perm[0])
        attrs.st_nlink = 2
        attrs.st_uid, attrs.st_gid = self.uid, self.gid
        attrs.st_blksize = PAGE_SIZE
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = self.root_ctime_ns
        attrs.entry_timeout = attrs.attr_timeout = CACHE_TIMEOUT
        return attrs

    def _getattr(self, inode: InodeT) -> pyfuse3.EntryAttributes:
        if inode == pyfuse3.ROOT_INODE:
            return self._root_attrs()
        return self._attrs(self._node(inode))

    @staticmethod
    def _name(name: FileNameT) -> str:
        return os.fsdecode(name)

    @staticmethod
    def _check_dir(inode: InodeT) -> None:
        if inode != pyfuse3.ROOT_INODE:
            raise _refuse(errno.ENOTDIR)

    def _commit(self, node: Node) -> None:
        if node.content.dirty:
            log.debug("commit of inode %d (%s)", node.inode, node.name)
            node.content.commit()

    # -- lookups and attributes --------------------------------------------------------

    def _lookup(self, parent: InodeT, name: str) -> pyfuse3.EntryAttributes:
        self._check_dir(parent)
        if name in (".", ".."):
            return self._root_attrs()
        node = self.names.get(name)
        if node is None:
            # a cached negative entry: the kernel stops asking until we invalidate it
            attrs = pyfuse3.EntryAttributes()
            attrs.st_ino = InodeT(0)
            attrs.entry_timeout = CACHE_TIMEOUT
            return attrs
        node.lookups += 1
        return self._attrs(node)

    @fuse_errors
    async def lookup(
        self, parent_inode: InodeT, name: FileNameT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return await self._locked(self._lookup, parent_inode, self._name(name))

    def _forget(self, inode_list: Sequence[tuple[InodeT, int]]) -> None:
        for inode, count in inode_list:
            node = self.nodes.get(inode)
            if node is not None:
                node.lookups -= count
                self._maybe_forget(node)

    async def forget(self, inode_list: Sequence[tuple[InodeT, int]]) -> None:
        # forget must not raise: it answers no request.
        self.requests["forget"] += 1
        try:
            await self._locked(self._forget, list(inode_list))
        except Exception:
            log.exception("forget failed")

    @fuse_errors
    async def getattr(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._locked(self._getattr, inode)

    def _access(self, inode: InodeT, mode: int, caller: Caller) -> bool:
        if inode == pyfuse3.ROOT_INODE:
            perm = self._root_perm
        else:
            node = self._node(inode)
            perm = (node.mode, node.uid, node.gid)
        want = mode & (MAY_READ | MAY_WRITE | MAY_EXEC)
        return not want or caller.permits(*perm, want)

    @fuse_errors
    async def access(self, inode: InodeT, mode: ModeT, ctx: pyfuse3.RequestContext) -> bool:
        # access(2): without default_permissions the kernel asks (see Caller).
        return await self._locked(self._access, inode, mode, Caller(ctx))

    def _check_setattr(
        self,
        caller: Caller,
        current: tuple[int, int, int],
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: FileHandleT | None,
    ) -> None:
        """``setattr_prepare()`` and ``may_setattr()`` for an inode whose (mode, uid, gid)
        are ``current``.  Changing times needs ownership or write access (pyfuse3 does not
        tell explicit times from "now", for which that is the kernel's rule)."""
        mode, uid, gid = current
        if fields.update_size and fh is None:  # truncate(path); ftruncate needs a writable fd
            caller.require(mode, uid, gid, MAY_WRITE)
        if fields.update_uid and not (
            (caller.uid == uid and attr.st_uid == uid) or caller.capable(CAP_CHOWN)
        ):
            raise _refuse(errno.EPERM)
        if fields.update_gid and not (
            (caller.uid == uid and (attr.st_gid == gid or caller.in_group(attr.st_gid)))
            or caller.capable(CAP_CHOWN)
        ):
            raise _refuse(errno.EPERM)
        if fields.update_mode and not caller.owns(uid):
            raise _refuse(errno.EPERM)
        if (fields.update_atime or fields.update_mtime) and not caller.owns(uid):
            caller.require(mode, uid, gid, MAY_WRITE)

    def _setattr(
        self,
        inode: InodeT,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: FileHandleT | None,
        caller: Caller,
    ) -> pyfuse3.EntryAttributes:
        if inode == pyfuse3.ROOT_INODE:
            if fields.update_size:
                raise _refuse(errno.EISDIR)
            self._check_setattr(caller, self._root_perm, attr, fields, fh)
            return self._root_attrs()
        node = self._node(inode)
        self._check_setattr(caller, (node.mode, node.uid, node.gid), attr, fields, fh)
        now = time.time_ns()
        if fields.update_size:
            node.content.truncate(attr.st_size)
            node.mtime_ns = now
        if fields.update_mode:
            mode = attr.st_mode & 0o7777
            if not (caller.in_group(node.gid) or caller.capable(CAP_FSETID)):
                mode &= ~stat.S_ISGID  # as chmod does for a caller outside the group
            node.mode = stat.S_IFREG | mode
        if fields.update_uid:
            node.uid = attr.st_uid
        if fields.update_gid:
            node.gid = attr.st_gid
        if fields.update_atime:
            node.atime_ns = attr.st_atime_ns
        if fields.update_mtime:
            node.mtime_ns = attr.st_mtime_ns
        node.ctime_ns = now
        return self._attrs(node)

    @fuse_errors
    async def setattr(
        self,
        inode: InodeT,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: FileHandleT | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        attrs = await self._locked(self._setattr, inode, attr, fields, fh, Caller(ctx))
        node = self.nodes.get(inode)
        content = node.content if node is not None else None
        if fields.update_size and isinstance(content, LinearContent) and content.cut_data:
            # The linear file keeps its size, so the kernel keeps the cached pages past the
            # new end; they must read as zeros now.  Not from inside this request (the
            # kernel holds off writes until it completes): right after the reply.  Only when
            # non-zero bytes were cut: the invalidation writes dirty pages back through this
            # daemon and waits for them in the kernel, so a daemon killed meanwhile could not
            # exit.  swtpm's own truncates (after a whole-file msync) never cut any.
            trio.lowlevel.spawn_system_task(self.invalidate, [inode], False)
        return attrs

    # -- directory -----------------------------------------------------------------------

    @fuse_errors
    async def opendir(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> FileHandleT:
        self._check_dir(inode)
        return FileHandleT(0)

    @fuse_errors
    async def readdir(self, fh: FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # readdir_reply must run on the event loop; sizes come from memory or the cache.
        async with self.lock:
            entries = sorted(self.names.items())
            for index, (name, node) in enumerate(entries[start_id:], start_id + 1):
                attrs = self._attrs(node)
                if not pyfuse3.readdir_reply(token, FileNameT(os.fsencode(name)), attrs, index):
                    break
                node.lookups += 1  # a successful readdir_reply counts as a lookup

    async def releasedir(self, fh: FileHandleT) -> None:
        """Nothing to release: directory handles carry no state."""
        self.requests["releasedir"] += 1

    @fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        stats = pyfuse3.StatvfsData()
        stats.f_bsize = stats.f_frsize = PAGE_SIZE
        stats.f_blocks = MAX_FILE_SIZE // PAGE_SIZE
        stats.f_bfree = stats.f_bavail = stats.f_blocks
        stats.f_files = stats.f_ffree = stats.f_favail = MAX_MEMORY_FILES
        stats.f_namemax = 255
        return stats

    # -- create, open, read, write, commit -----------------------------------------------

    def _open_node(self, node: Node, flags: int) -> pyfuse3.FileInfo:
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        if flags & os.O_TRUNC:
            if not writable:
                raise _refuse(errno.EACCES)
            node.content.truncate(0)
            node.touch()
        node.opens += 1
        fh = FileHandleT(self._next_handle)
        self._next_handle += 1
        self.handles[fh] = Handle(node, writable)
        # Page cache on (mmap needs it), kept across opens: external changes invalidate.
        return pyfuse3.FileInfo(fh=fh, direct_io=False, keep_cache=True)

    def _open(self, inode: InodeT, flags: int, caller: Caller) -> pyfuse3.FileInfo:
        node = self._node(inode)
        caller.require(node.mode, node.uid, node.gid, _open_access(flags))
        return self._open_node(node, flags)

    @fuse_errors
    async def open(
        self, inode: InodeT, flags: FlagT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        return await self._locked(self._open, inode, flags, Caller(ctx))

    def _create(
        self, parent: InodeT, name: str, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self._check_dir(parent)
        caller = Caller(ctx)
        node = self.names.get(name)
        if node is not None:
            if flags & os.O_EXCL:
                raise _refuse(errno.EEXIST)
            caller.require(node.mode, node.uid, node.gid, _open_access(flags))
        else:
            caller.require(*self._root_perm, MAY_WRITE | MAY_EXEC)
            memory_files = sum(
                1
                for n in self.nodes.values()
                if not n.content.store_backed and (n.name is not None or n.opens)
            )
            content = self.namespace.create(name, memory_files)
            node = self._link(name, content, mode & ~ctx.umask)
            node.uid, node.gid = ctx.uid, ctx.gid
        info = self._open_node(node, flags)
        node.lookups += 1
        return info, self._attrs(node)

    @fuse_errors
    async def create(
        self,
        parent_inode: InodeT,
        name: FileNameT,
        mode: ModeT,
        flags: FlagT,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        return await self._locked(self._create, parent_inode, self._name(name), mode, flags, ctx)

    def _read(self, fh: FileHandleT, offset: int, length: int) -> bytes:
        return self._handle(fh).node.content.read(offset, length)

    @fuse_errors
    async def read(self, fh: FileHandleT, off: int, size: int) -> bytes:
        return await self._locked(self._read, fh, off, size)

    def _write(self, fh: FileHandleT, offset: int, data: bytes) -> int:
        handle = self._handle(fh)
        if not handle.writable:
            raise _refuse(errno.EBADF)
        handle.node.content.write(offset, data)
        handle.node.touch()
        return len(data)

    @fuse_errors
    async def write(self, fh: FileHandleT, off: int, buf: bytes) -> int:
        return await self._locked(self._write, fh, off, buf)

    def _sync(self, fh: FileHandleT) -> None:
        for observer in self.fsync_observers:
            observer(self.requests["fsync"])
        node = self._handle(fh).node
        try:
            self._commit(node)
        except pyfuse3.FUSEError:
            # the refused writes were dropped: the kernel's cached pages are stale now
            trio.lowlevel.spawn_system_task(self.invalidate, [node.inode], False)
            raise

    @fuse_errors
    async def fsync(self, fh: FileHandleT, datasync: bool) -> None:
        # The commit point of the file view: swtpm's msync(MS_SYNC).
        await self._locked(self._sync, fh)

    async def flush(self, fh: FileHandleT) -> None:
        """close() of one descriptor: not a commit point, and not needed at all.

        Every process that forks and execs while holding the file sends one (close-on-exec),
        so committing here would commit in the middle of a writer's update.  Writers that
        never fsync are committed at release, when the last descriptor is gone.  ENOSYS
        tells the kernel to stop sending FLUSH (close() still succeeds, and the kernel still
        writes back dirty pages first): one FUSE request less per dir view commit.
        """
        self.requests["flush"] += 1
        raise pyfuse3.FUSEError(errno.ENOSYS)

    def _release(self, fh: FileHandleT) -> None:
        handle = self.handles.pop(fh, None)
        if handle is None:
            return
        node = handle.node
        node.opens -= 1
        try:
            # Only the last close commits (mmap pages written back after close arrive
            # before it): a reader closing must not commit a writer's unsynced pages.
            if node.opens == 0 and node.content.dirty and node.content.commit_at_close():
                trio.lowlevel.spawn_system_task(self.invalidate, [node.inode], False)
        finally:
            self._maybe_forget(node)

    @fuse_errors
    async def release(self, fh: FileHandleT) -> None:
        await self._locked(self._release, fh)

    # -- unlink and rename ---------------------------------------------------------------

    def _unlink(self, parent: InodeT, name: str, caller: Caller) -> None:
        self._check_dir(parent)
        node = self.names.get(name)
        if node is None:
            raise _refuse(errno.ENOENT)
        caller.require(*self._root_perm, MAY_WRITE | MAY_EXEC)
        content = node.content
        self._detach(node, self._keep(node))
        if content.store_backed:
            content.discard()
            self.namespace.unbind(name, content)

    @fuse_errors
    async def unlink(
        self, parent_inode: InodeT, name: FileNameT, ctx: pyfuse3.RequestContext
    ) -> None:
        await self._locked(self._unlink, parent_inode, self._name(name), Caller(ctx))

    def _rename(
        self, parent_old: InodeT, old: str, parent_new: InodeT, new: str, flags: int, caller: Caller
    ) -> None:
        self._check_dir(parent_old)
        self._check_dir(parent_new)
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise _refuse(errno.EINVAL)
        node = self.names.get(old)
        if node is None:
            raise _refuse(errno.ENOENT)
        caller.require(*self._root_perm, MAY_WRITE | MAY_EXEC)
        target = self.names.get(new)
        if target is node:
            return
        if target is not None and flags & pyfuse3.RENAME_NOREPLACE:
            raise _refuse(errno.EEXIST)
        # The commit point of the dir view: the new name's content is stored first, so a
        # failure leaves both names as they were.
        data = node.content.snapshot()
        target_kept = self._keep(target) if target is not None else None
        content = self.namespace.bind(new, data)
        if node.content.store_backed and not _same_section(node.content, content):
            self.namespace.unbind(old, node.content)
        if target is not None:
            self._detach(target, target_kept)
        del self.names[old]
        node.name = new
        node.content = content
        node.ctime_ns = time.time_ns()
        self.names[new] = node

    @fuse_errors
    async def rename(
        self,
        parent_inode_old: InodeT,
        name_old: FileNameT,
        parent_inode_new: InodeT,
        name_new: FileNameT,
        flags: FlagT,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        await self._locked(
            self._rename,
            parent_inode_old,
            self._name(name_old),
            parent_inode_new,
            self._name(name_new),
            flags,
            Caller(ctx),
        )

    # -- what the daemon and the control socket use --------------------------------------

    async def run_locked(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a store operation serialized with every FUSE request."""
        return await self._locked(fn, *args, **kwargs)

    def _apply(self, tag: str) -> list[InodeT]:
        self.store.apply_snapshot(tag)
        changed: list[InodeT] = []
        for name, content in self.namespace.names_after_apply().items():
            node = self.names.get(name)
            if node is not None and content is None:
                node.content.discard()
                changed.append(node.inode)
                self._detach(node)
            elif node is not None and content is not None:
                node.content.discard()
                node.content = content
                node.touch()
                changed.append(node.inode)
            elif content is not None:
                self._link(name, content, 0o640)
        return changed

    async def apply_snapshot(self, tag: str) -> None:
        """Revert the store to snapshot ``tag`` and make every reader see it.

        Buffered (uncommitted) writes belonged to the state being replaced and are dropped.
        """
        changed = await self._locked(self._apply, tag)
        await self.invalidate(changed)

    async def invalidate(self, inodes: Iterable[InodeT], entries: bool = True) -> None:
        """Drop the kernel's cached pages and attributes of ``inodes`` (and the entries)."""
        # The calls wait for the kernel, which may need this event loop: run them off it,
        # all in one thread hop (a hop per call cost a snapshot apply about 0.2 ms each).
        names = self.namespace.names_to_invalidate() if entries else ()
        calls = [functools.partial(_invalidate_entry, name) for name in names]
        calls += [functools.partial(_invalidate_inode, inode) for inode in inodes]
        await trio.to_thread.run_sync(_invalidate_all, calls)

    def _flush_all(self) -> None:
        for node in list(self.nodes.values()):
            if node.content.dirty and node.content.store_backed:
                node.content.commit_at_close()

    async def flush_all(self) -> None:
        """Commit every buffered write (before unmounting)."""
        await self._locked(self._flush_all)

    def status(self) -> dict[str, Any]:
        """Counters for the control socket's ``info``."""
        return {
            "view": self.namespace.view,
            "files": sorted(self.names),
            "commits": self.commits,
            "open_files": len(self.handles),
            "requests": dict(self.requests),
            "handler_us": {name: ns // 1000 for name, ns in self.handler_ns.items()},
            # file view: fsyncs answered mid-store without a commit, half-done stores dropped
            "deferred_fsyncs": sum(getattr(n.content, "deferred", 0) for n in self.nodes.values()),
            "dropped_stores": sum(getattr(n.content, "dropped", 0) for n in self.nodes.values()),
        }


def _same_section(a: Content, b: Content) -> bool:
    return isinstance(a, SectionContent) and isinstance(b, SectionContent) and a.name == b.name


def _invalidate_all(calls: Sequence[functools.partial[None]]) -> None:
    """Run the kernel cache invalidations; failures are logged, never raised."""
    for call in calls:
        try:
            call()
        except OSError as err:
            if err.errno != errno.ENOENT:  # ENOENT: the kernel had not cached it
                log.warning("kernel cache invalidation %s failed: %s", call.args, err)
        except Exception:  # never fatal: it may run as a trio system task
            log.exception("kernel cache invalidation %s failed", call.args)


def _invalidate_inode(inode: InodeT) -> None:
    pyfuse3.invalidate_inode(inode, attr_only=False)


def _invalidate_entry(name: str) -> None:
    pyfuse3.invalidate_entry(pyfuse3.ROOT_INODE, FileNameT(os.fsencode(name)))


def make_fs(store: Store, view: str, *, threaded: bool = False) -> StoreFS:
    """The :class:`StoreFS` for ``view`` ("file" or "dir")."""
    namespaces: dict[str, Callable[[Store], Namespace]] = {
        "file": FileNamespace,
        "dir": DirNamespace,
    }
    try:
        namespace = namespaces[view](store)
    except KeyError:
        raise StoreError(f"unknown view {view!r} (file or dir)", path=store.path) from None
    return StoreFS(store, namespace, threaded=threaded)


def mount_options(fsname: str) -> set[str]:
    """pyfuse3 mount options for a store mount named ``fsname``.

    No ``default_permissions``: with it the kernel checks modes itself, but every create,
    rename and unlink invalidates the directory's attributes, so the next permission
    check costs a GETATTR round trip (two per dir view commit: 9 requests instead of 7).
    The handlers make the same checks (:class:`Caller`).  ``allow_other`` lets
    QEMU/libvirt's swtpm (another user) in when we are root.
    """
    options = set(pyfuse3.default_options)
    options.discard("default_permissions")
    options |= {f"fsname={fsname}", "subtype=vtpm-qcow"}
    if os.getuid() == 0:
        options.add("allow_other")
    return options

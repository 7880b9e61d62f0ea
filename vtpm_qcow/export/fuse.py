"""pyfuse3 views of a :class:`~vtpm_qcow.state.store.Store`: the file view and the dir view.

Both views are one ``pyfuse3.Operations`` class, :class:`StoreFS` (inodes, lookup counts,
open handles, attributes), with a :class:`~vtpm_qcow.export.content.Namespace` that decides
what the directory holds and where the commit points are (:mod:`vtpm_qcow.export.content`):

* the file view (``swtpm --tpmstate backend-uri=file://MOUNT/tpmstate``): one file whose
  bytes are the store's linear layout.  Writes (swtpm's mmap pages) are buffered; **an
  fsync that completes one of swtpm's stores is the commit point** (``store.commit_linear``,
  atomic and durable), and release (last close) for writers that never fsync; close itself
  is not (see :meth:`StoreFS.flush`).  ftruncate zeroes the tail, ``unlink``
  (swtpm_setup's way to start over) clears the store.
* the dir view (``swtpm --tpmstate dir=MOUNT``): ``tpm2-00.<section>`` files are the
  store's sections; everything else (``.lock``, ``TMP2-00.*``) lives in memory.  **A
  rename onto a state file name is the commit point** (``store.write_section``); unlink of
  a state file deletes the section.

**One caller at a time.**  pyfuse3 runs the handlers in one worker task on trio's loop, and
every handler body is synchronous: it never awaits before it has returned its answer (the
kernel cache invalidations that must wait for the kernel run afterwards, in system
tasks).  So the store sees one caller at a time, and the operations the daemon runs for its
control socket and for ``serve --qmp``'s watcher (:meth:`StoreFS.run`, also synchronous, on
the same loop) never interleave with a commit.  No lock is needed, and none is taken.

Access control is the kernel's: the mount has ``default_permissions`` (:func:`mount_options`),
so the kernel checks every request against the modes and owners this class reports.
Failures become ``FUSEError(errno)`` in one place, :func:`fuse_errors`.

Caching: every change passes through this process, so entries and attributes are cached by
the kernel for a long time and page caches are kept across opens.  Changes that do not come
through the kernel (snapshot apply, see :meth:`StoreFS.apply_snapshot`) invalidate the
kernel's entries, attributes and pages explicitly.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Concatenate, ParamSpec, TypeVar

import pyfuse3
import trio
from pyfuse3 import FileHandleT, FileNameT, FlagT, InodeT, ModeT

from ..errors import HANDLED, StoreError
from . import attrs
from .content import (
    MAX_FILE_SIZE,
    MAX_MEMORY_FILES,
    PAGE_SIZE,
    Content,
    DirNamespace,
    FileNamespace,
    LinearContent,
    MemoryContent,
    Namespace,
    same_section,
)
from .lean import when_idle

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..state.store import Store

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

#: Seconds the kernel may cache entries and attributes.  Safe because every change either
#: goes through the kernel or is followed by an explicit invalidation.
CACHE_TIMEOUT = 3600.0
#: Seconds without a commit after which the last commit's header is made durable.
CHECKPOINT_AFTER = 1.0


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
    """The FUSE boundary around a handler: every failure reaches the kernel as
    ``FUSEError(errno)``; the request is counted, timed and, if it changed the store, told
    to the commit observers (:meth:`StoreFS.run` does the same for the daemon's own calls).

    Expected refusals (``FUSEError`` raised on purpose) pass unchanged; anything else is
    logged with its traceback once, here.
    """

    name = handler.__name__

    @functools.wraps(handler)
    async def wrapper(self: StoreFS, /, *args: P.args, **kwargs: P.kwargs) -> T:
        self.requests[name] += 1
        start = time.perf_counter_ns()
        generation = self.store.generation
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
            self._observe_commit(generation)
            self.handler_ns[name] += time.perf_counter_ns() - start

    return wrapper


def _refuse(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


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


# Section: the file system


class StoreFS(pyfuse3.Operations):
    """pyfuse3 operations serving a :class:`Store` through a :class:`Namespace`."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, store: Store, namespace: Namespace) -> None:
        super().__init__()
        self.store = store
        self.namespace = namespace
        #: Idle checkpoints made (:meth:`checkpoint_when_idle`).
        self.checkpoints = 0
        self.uid = os.getuid()
        self.gid = os.getgid()
        self.nodes: dict[InodeT, Node] = {}
        self.names: dict[str, Node] = {}
        self.handles: dict[FileHandleT, Handle] = {}
        self._next_inode = pyfuse3.ROOT_INODE + 1
        self._next_handle = 1
        now = time.time_ns()
        #: The root directory's attributes; the kernel checks creates, renames and unlinks
        #: against them.  The dir view keeps them, and those of the store's files, in the
        #: image (:mod:`vtpm_qcow.export.attrs`): chmod/chown/utimens are real and survive
        #: a remount.
        self.root = attrs.Attrs(0o755, self.uid, self.gid, now, now, now)
        self.keeps_attrs = namespace.view == "dir"
        #: the attributes as the image holds them now
        self.kept: dict[str, attrs.Attrs] = attrs.load(store) if self.keeps_attrs else {}
        if attrs.DIRECTORY in self.kept:
            self.root = dataclasses.replace(self.kept[attrs.DIRECTORY])
        #: why the store is not the image now, in a live migration (None: it is): the
        #: control socket refuses the store's operations meanwhile (:mod:`.handoff`)
        self.migrating: str | None = None
        #: requests that changed the store (for the control socket's info and benchmarks)
        self.commits = 0
        #: FUSE requests served, by handler name
        self.requests: collections.Counter[str] = collections.Counter()
        #: nanoseconds spent inside the handlers, by handler name (what a request costs
        #: this process, commits included, apart from pyfuse3's and trio's own work)
        self.handler_ns: collections.Counter[str] = collections.Counter()
        #: called with the view after each request (or :meth:`run`) that changed the store
        #: (the write log marks committed states with it; :mod:`vtpm_qcow.export.instruments`)
        self.commit_observers: list[Callable[[str], None]] = []
        #: called with the running count of fsync requests as each arrives (test hook)
        self.fsync_observers: list[Callable[[int], None]] = []
        for name, content in namespace.initial_names().items():
            self._restore_attrs(self._link(name, content, 0o640))

    # -- plumbing ----------------------------------------------------------------------

    def _observe_commit(self, generation: int) -> None:
        """If the store changed since it was at ``generation``: count a commit, tell the
        observers."""
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
        return node.content.all_bytes() if node.opens and node.content.store_backed else None

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

    def _restore_attrs(self, node: Node) -> None:
        """Give a store-backed ``node`` the attributes the image keeps for its name."""
        kept = self.kept.get(node.name or "")
        if kept is not None and node.content.store_backed:
            node.mode = stat.S_IFREG | (kept.mode & 0o7777)
            node.uid, node.gid = kept.uid, kept.gid
            node.atime_ns, node.mtime_ns, node.ctime_ns = (
                kept.atime_ns,
                kept.mtime_ns,
                kept.ctime_ns,
            )

    def _attrs_now(self) -> dict[str, attrs.Attrs]:
        """The attributes the image should keep: the directory's and its store's files'."""
        files = {attrs.DIRECTORY: dataclasses.replace(self.root)}
        for name, node in self.names.items():
            if node.content.store_backed:
                files[name] = attrs.Attrs(
                    node.mode & 0o7777,
                    node.uid,
                    node.gid,
                    node.atime_ns,
                    node.mtime_ns,
                    node.ctime_ns,
                )
        return files

    def _keep_attrs(self, *, unless_only_times: bool = False) -> None:
        """Write the attributes into the image if they changed (with ``unless_only_times``:
        only if more than times changed, so that swtpm's renames cost no extra commit)."""
        if not self.keeps_attrs:
            return
        files = self._attrs_now()

        def identity(table: dict[str, attrs.Attrs]) -> dict[str, tuple[int, int, int]]:
            return {n: (a.mode, a.uid, a.gid) for n, a in table.items()}

        if files == self.kept or (unless_only_times and identity(files) == identity(self.kept)):
            return
        attrs.save(self.store, files)
        self.kept = files

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
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = pyfuse3.ROOT_INODE
        entry.st_mode = ModeT(stat.S_IFDIR | (self.root.mode & 0o7777))
        entry.st_nlink = 2
        entry.st_uid, entry.st_gid = self.root.uid, self.root.gid
        entry.st_blksize = PAGE_SIZE
        entry.st_atime_ns, entry.st_mtime_ns = self.root.atime_ns, self.root.mtime_ns
        entry.st_ctime_ns = self.root.ctime_ns
        entry.entry_timeout = entry.attr_timeout = CACHE_TIMEOUT
        return entry

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

    @fuse_errors
    async def lookup(
        self, parent_inode: InodeT, name: FileNameT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._check_dir(parent_inode)
        if name in (b".", b".."):
            return self._root_attrs()
        node = self.names.get(self._name(name))
        if node is None:
            # a cached negative entry: the kernel stops asking until we invalidate it
            attrs = pyfuse3.EntryAttributes()
            attrs.st_ino = InodeT(0)
            attrs.entry_timeout = CACHE_TIMEOUT
            return attrs
        node.lookups += 1
        return self._attrs(node)

    async def forget(self, inode_list: Sequence[tuple[InodeT, int]]) -> None:
        # forget must not raise: it answers no request.
        self.requests["forget"] += 1
        for inode, count in inode_list:
            node = self.nodes.get(inode)
            if node is not None:
                node.lookups -= count
                self._maybe_forget(node)

    @fuse_errors
    async def getattr(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode == pyfuse3.ROOT_INODE:
            return self._root_attrs()
        return self._attrs(self._node(inode))

    @fuse_errors
    async def setattr(
        self,
        inode: InodeT,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: FileHandleT | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        # The kernel has checked the caller may (default_permissions: setattr_prepare), and
        # cleared a set-group-ID bit the caller may not set.
        now = time.time_ns()
        if inode == pyfuse3.ROOT_INODE:
            if fields.update_size:
                raise _refuse(errno.EISDIR)
            before, root = self.root, dataclasses.replace(self.root)
            if fields.update_mode:
                root.mode = attr.st_mode & 0o7777
            if fields.update_uid:
                root.uid = attr.st_uid
            if fields.update_gid:
                root.gid = attr.st_gid
            if fields.update_atime:
                root.atime_ns = attr.st_atime_ns
            if fields.update_mtime:
                root.mtime_ns = attr.st_mtime_ns
            root.ctime_ns = now
            self.root = root
            try:
                self._keep_attrs()
            except BaseException:
                self.root = before  # not in the image: not changed at all
                raise
            return self._root_attrs()
        node = self._node(inode)
        saved = (node.mode, node.uid, node.gid, node.atime_ns, node.mtime_ns, node.ctime_ns)
        if fields.update_size:
            node.content.truncate(attr.st_size)
            node.mtime_ns = now
        if fields.update_mode:
            node.mode = stat.S_IFREG | (attr.st_mode & 0o7777)
        if fields.update_uid:
            node.uid = attr.st_uid
        if fields.update_gid:
            node.gid = attr.st_gid
        if fields.update_atime:
            node.atime_ns = attr.st_atime_ns
        if fields.update_mtime:
            node.mtime_ns = attr.st_mtime_ns
        node.ctime_ns = now
        content = node.content
        if fields.update_size and isinstance(content, LinearContent) and content.cut_data:
            # The linear file keeps its size, so the kernel keeps the cached pages past the
            # new end; they must read as zeros now.  Not from inside this request (the
            # kernel holds off writes until it completes): right after the reply.  Only when
            # non-zero bytes were cut: the invalidation writes dirty pages back through this
            # daemon and waits for them in the kernel, so a daemon killed meanwhile could not
            # exit.  swtpm's own truncates (after a whole-file msync) never cut any.
            trio.lowlevel.spawn_system_task(self.invalidate, [inode], False)
        if node.name is not None and node.content.store_backed and not fields.update_size:
            try:
                self._keep_attrs()
            except BaseException:
                node.mode, node.uid, node.gid, node.atime_ns, node.mtime_ns, node.ctime_ns = saved
                raise
        return self._attrs(node)

    # -- directory -----------------------------------------------------------------------

    @fuse_errors
    async def opendir(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> FileHandleT:
        self._check_dir(inode)
        return FileHandleT(0)

    @fuse_errors
    async def readdir(self, fh: FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
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

    @fuse_errors
    async def open(
        self, inode: InodeT, flags: FlagT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        return self._open_node(self._node(inode), flags)

    @fuse_errors
    async def create(
        self,
        parent_inode: InodeT,
        name: FileNameT,
        mode: ModeT,
        flags: FlagT,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self._check_dir(parent_inode)
        node = self.names.get(self._name(name))
        if node is not None:
            if flags & os.O_EXCL:
                raise _refuse(errno.EEXIST)
        else:
            memory_files = sum(
                1
                for n in self.nodes.values()
                if not n.content.store_backed and (n.name is not None or n.opens)
            )
            content = self.namespace.create(self._name(name), memory_files)
            node = self._link(self._name(name), content, mode & ~ctx.umask)
            node.uid, node.gid = ctx.uid, ctx.gid
        info = self._open_node(node, flags)
        node.lookups += 1
        return info, self._attrs(node)

    @fuse_errors
    async def read(self, fh: FileHandleT, off: int, size: int) -> bytes:
        return self._handle(fh).node.content.read(off, size)

    @fuse_errors
    async def write(self, fh: FileHandleT, off: int, buf: bytes) -> int:
        handle = self._handle(fh)
        if not handle.writable:
            raise _refuse(errno.EBADF)
        handle.node.content.write(off, buf)
        handle.node.touch()
        return len(buf)

    @fuse_errors
    async def fsync(self, fh: FileHandleT, datasync: bool) -> None:
        # The commit point of the file view: swtpm's msync(MS_SYNC).
        for observer in self.fsync_observers:
            observer(self.requests["fsync"])
        node = self._handle(fh).node
        try:
            self._commit(node)
        except pyfuse3.FUSEError:
            # the refused writes were dropped: the kernel's cached pages are stale now
            trio.lowlevel.spawn_system_task(self.invalidate, [node.inode], False)
            raise

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

    @fuse_errors
    async def release(self, fh: FileHandleT) -> None:
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

    # -- unlink and rename ---------------------------------------------------------------

    @fuse_errors
    async def unlink(
        self, parent_inode: InodeT, name: FileNameT, ctx: pyfuse3.RequestContext
    ) -> None:
        self._check_dir(parent_inode)
        node = self.names.get(self._name(name))
        if node is None:
            raise _refuse(errno.ENOENT)
        content = node.content
        self._detach(node, self._keep(node))
        if content.store_backed:
            content.discard()
            self.namespace.unbind(self._name(name), content)

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
        self._check_dir(parent_inode_old)
        self._check_dir(parent_inode_new)
        old, new = self._name(name_old), self._name(name_new)
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise _refuse(errno.EINVAL)
        node = self.names.get(old)
        if node is None:
            raise _refuse(errno.ENOENT)
        target = self.names.get(new)
        if target is node:
            return
        if target is not None and flags & pyfuse3.RENAME_NOREPLACE:
            raise _refuse(errno.EEXIST)
        # The commit point of the dir view: the new name's content is stored first, so a
        # failure leaves both names as they were.
        data = node.content.all_bytes()
        target_kept = self._keep(target) if target is not None else None
        content = self.namespace.bind(new, data)
        if node.content.store_backed and not same_section(node.content, content):
            self.namespace.unbind(old, node.content)
        if target is not None:
            self._detach(target, target_kept)
        del self.names[old]
        node.name = new
        node.content = content
        node.ctime_ns = time.time_ns()
        self.names[new] = node
        if content.store_backed:
            # swtpm renames a file of its own making over the section each time: one more
            # commit only the first time (a new owner or mode), none for new times.  The
            # rename itself is done (committed): a failure here leaves the attributes to
            # the next save.
            try:
                self._keep_attrs(unless_only_times=True)
            except HANDLED as err:
                log.warning("%s: attributes not kept: %s", new, err)

    # -- what the daemon, its control socket and serve --qmp's watcher use --------------

    def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a store operation of the daemon's own between two FUSE requests (see the
        module docstring), observed like a request that changed the store."""
        generation = self.store.generation
        try:
            return fn(*args, **kwargs)
        finally:
            self._observe_commit(generation)

    def _apply(self, tag: str) -> list[InodeT]:
        self.store.apply_snapshot(tag)
        changed: list[InodeT] = []
        if self.keeps_attrs:  # the snapshot's attributes come back with its state
            changed.append(pyfuse3.ROOT_INODE)
            self.kept = attrs.load(self.store)
            if attrs.DIRECTORY in self.kept:
                self.root = dataclasses.replace(self.kept[attrs.DIRECTORY])
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
                self._restore_attrs(node)
                changed.append(node.inode)
            elif content is not None:
                self._restore_attrs(self._link(name, content, 0o640))
        return changed

    async def checkpoint_when_idle(self, idle: float = CHECKPOINT_AFTER) -> None:
        """Forever: once no commit came for ``idle`` seconds after one did, make the last
        commit's header durable (:meth:`Store.checkpoint`): its one flush, off the commit
        path, between two requests."""
        await when_idle(lambda: self.commits, self._checkpoint, idle)

    def _checkpoint(self) -> None:
        try:
            self.checkpoints += self.run(self.store.checkpoint)
        except HANDLED as err:
            log.warning("idle checkpoint: %s", err)

    async def apply_snapshot(self, tag: str) -> None:
        """Revert the store to snapshot ``tag`` and make every reader see it.

        Buffered (uncommitted) writes belonged to the state being replaced and are dropped.
        """
        changed = self.run(self._apply, tag)
        await self.invalidate(changed)

    async def invalidate(self, inodes: Iterable[InodeT], entries: bool = True) -> None:
        """Drop the kernel's cached pages and attributes of ``inodes`` (and the entries)."""
        # The calls wait for the kernel, which may need this event loop: run them off it,
        # all in one thread hop (docs/BENCHMARKS.md: a hop per call is measurable).
        names = self.namespace.names_to_invalidate() if entries else ()
        calls = [functools.partial(_invalidate_entry, name) for name in names]
        calls += [functools.partial(_invalidate_inode, inode) for inode in inodes]
        await trio.to_thread.run_sync(_invalidate_all, calls)

    def _flush_all(self) -> None:
        for node in list(self.nodes.values()):
            if node.content.dirty and node.content.store_backed:
                node.content.commit_at_close()

    def flush_all(self) -> None:
        """Commit every buffered write (before unmounting)."""
        self.run(self._flush_all)

    def status(self) -> dict[str, Any]:
        """Counters for the control socket's ``info``."""
        return {
            "view": self.namespace.view,
            "migrating": self.migrating,
            "files": sorted(self.names),
            "commits": self.commits,
            "open_files": len(self.handles),
            "requests": dict(self.requests),
            "handler_us": {name: ns // 1000 for name, ns in self.handler_ns.items()},
            # file view: fsyncs answered mid-store without a commit, half-done stores dropped
            "deferred_fsyncs": sum(getattr(n.content, "deferred", 0) for n in self.nodes.values()),
            "dropped_stores": sum(getattr(n.content, "dropped", 0) for n in self.nodes.values()),
        }


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


def make_fs(store: Store, view: str) -> StoreFS:
    """The :class:`StoreFS` for ``view`` ("file" or "dir")."""
    namespaces: dict[str, Callable[[Store], Namespace]] = {
        "file": FileNamespace,
        "dir": DirNamespace,
    }
    try:
        namespace = namespaces[view](store)
    except KeyError:
        raise StoreError(f"unknown view {view!r} (file or dir)", path=store.path) from None
    return StoreFS(store, namespace)


def mount_options(fsname: str) -> set[str]:
    """pyfuse3 mount options for a store mount named ``fsname``.

    ``default_permissions`` (pyfuse3's default) leaves access control to the kernel; it
    costs the dir view two GETATTR round trips per commit (every create, rename and unlink
    invalidates the directory's attributes, the next permission check refetches them), a
    price worth not keeping a copy of the kernel's checks here.  ``allow_other`` lets
    QEMU/libvirt's swtpm (another user) in when we are root.
    """
    options = set(pyfuse3.default_options)
    options |= {"default_permissions", f"fsname={fsname}", "subtype=vtpm-qcow"}
    if os.getuid() == 0:
        options.add("allow_other")
    return options

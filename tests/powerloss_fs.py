"""A recording passthrough file system for the power-loss tests.

``python3 -m tests.powerloss_fs BACKING_DIR MOUNTPOINT LOG`` serves the regular files of
BACKING_DIR at MOUNTPOINT (one flat directory) and appends to LOG, in the order they were
served, every request that changes a file's bytes or names: WRITE (name, offset, bytes),
FSYNC/fdatasync (name, logged once the backing file's sync returned), truncate (name, new
size), unlink and rename.  A write to the special file ``MOUNTPOINT/.mark`` appends a marker
record holding the written text instead (a test writes ``ack N`` once its client got the
answer to step N).

The point of recording *here*, below the mount daemon, rather than in the daemon: the log
holds what actually reached the image file, in the order the kernel delivered it, whatever
the daemon believes it did.  One pyfuse3 worker task serves one request at a time, so the
log's order is the order the requests completed in: everything the daemon wrote or synced
before answering swtpm precedes a marker written after that answer.

No writeback cache (each pwrite arrives as WRITE requests, each fdatasync as FSYNC); byte-
range locks are left to the kernel (no lock operations).  SIGTERM or SIGINT unmount
cleanly.  The process prints ``ready`` on stdout once the mount is usable.
"""

from __future__ import annotations

import argparse
import errno
import functools
import os
import signal
import stat
import struct
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio
from pyfuse3 import FileHandleT, FileNameT, FlagT, InodeT, ModeT

#: The special file whose writes become marker records.
MARK_NAME = ".mark"
#: Record header: kind, offset, length of the file name, length of the data; then both.
RECORD = struct.Struct(">cQHI")
#: Record kinds.
WRITE, FSYNC, TRUNCATE, MARK, UNLINK, RENAME = b"W", b"F", b"T", b"M", b"U", b"R"

_MARK_INODE = InodeT(pyfuse3.ROOT_INODE + 1)
_MARK_FH = FileHandleT(1 << 40)  # never an fd

P = ParamSpec("P")
T = TypeVar("T")


@dataclass(frozen=True)
class Record:
    """One log record: ``kind`` is one of the record kinds above (as a str)."""

    kind: str
    name: str
    offset: int = 0
    data: bytes = b""


def encode_record(kind: bytes, name: str, offset: int = 0, data: bytes = b"") -> bytes:
    """The bytes of one record."""
    raw_name = os.fsencode(name)
    return RECORD.pack(kind, offset, len(raw_name), len(data)) + raw_name + data


def read_log(path: str | os.PathLike[str]) -> list[Record]:
    """Every whole record of a log, in order (a torn last record is ignored)."""
    raw = Path(path).read_bytes()
    records, pos = [], 0
    while pos + RECORD.size <= len(raw):
        kind, offset, name_len, data_len = RECORD.unpack_from(raw, pos)
        end = pos + RECORD.size + name_len + data_len
        if end > len(raw):
            break
        name = os.fsdecode(raw[pos + RECORD.size : pos + RECORD.size + name_len])
        records.append(Record(kind.decode(), name, offset, raw[end - data_len : end]))
        pos = end
    return records


def fuse_errors(
    handler: Callable[P, Coroutine[Any, Any, T]],
) -> Callable[P, Coroutine[Any, Any, T]]:
    """OSErrors of a handler reach the kernel as ``FUSEError(errno)``."""

    @functools.wraps(handler)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await handler(*args, **kwargs)
        except OSError as err:
            raise pyfuse3.FUSEError(err.errno or errno.EIO) from err

    return wrapper


class RecordingFS(pyfuse3.Operations):
    """Passthrough of one flat directory that logs every mutation of its files."""

    enable_writeback_cache = False
    supports_dot_lookup = True

    def __init__(self, backing: Path, log_fd: int) -> None:
        super().__init__()
        self.backing = backing
        self.log_fd = log_fd
        self.names: dict[InodeT, str | None] = {}  # None once unlinked or replaced
        self.inodes: dict[str, InodeT] = {}
        self.handles: dict[FileHandleT, InodeT] = {}
        self._next_inode = _MARK_INODE + 1

    # -- plumbing -------------------------------------------------------------------------

    def _log(self, kind: bytes, name: str, offset: int = 0, data: bytes = b"") -> None:
        os.write(self.log_fd, encode_record(kind, name, offset, data))

    def _path(self, name: str) -> str:
        return os.path.join(self.backing, name)

    def _inode(self, name: str) -> InodeT:
        inode = self.inodes.get(name)
        if inode is None:
            inode = self.inodes[name] = InodeT(self._next_inode)
            self.names[inode] = name
            self._next_inode += 1
        return inode

    def _name_of(self, inode: InodeT) -> str:
        name = self.names.get(inode)
        if name is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return name

    def _fh_name(self, fh: FileHandleT) -> str:
        return self.names.get(self.handles[fh]) or "(deleted)"

    @staticmethod
    def _name(name: FileNameT) -> str:
        decoded = os.fsdecode(name)
        if "/" in decoded or decoded in ("", ".", ".."):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return decoded

    @staticmethod
    def _attrs(st: os.stat_result, inode: InodeT) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        for field in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size"):
            setattr(attrs, field, getattr(st, field))
        attrs.st_blksize, attrs.st_blocks = st.st_blksize, st.st_blocks
        attrs.st_atime_ns, attrs.st_mtime_ns = st.st_atime_ns, st.st_mtime_ns
        attrs.st_ctime_ns = st.st_ctime_ns
        attrs.st_ino = inode
        attrs.entry_timeout = attrs.attr_timeout = 0  # never stale: cheap enough here
        return attrs

    def _mark_attrs(self) -> pyfuse3.EntryAttributes:
        attrs = self._attrs(os.stat(self.backing), _MARK_INODE)
        attrs.st_mode = ModeT(stat.S_IFREG | 0o600)
        attrs.st_nlink, attrs.st_size, attrs.st_blocks = 1, 0, 0
        return attrs

    def _stat(self, inode: InodeT) -> pyfuse3.EntryAttributes:
        if inode == pyfuse3.ROOT_INODE:
            return self._attrs(os.stat(self.backing), inode)
        if inode == _MARK_INODE:
            return self._mark_attrs()
        name = self.names.get(inode)
        if name is not None:
            return self._attrs(os.lstat(self._path(name)), inode)
        for fh, open_inode in self.handles.items():  # unlinked but open
            if open_inode == inode:
                return self._attrs(os.fstat(fh), inode)
        raise pyfuse3.FUSEError(errno.ENOENT)

    @staticmethod
    def _check_root(inode: InodeT) -> None:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)

    # -- names and attributes -------------------------------------------------------------

    @fuse_errors
    async def lookup(
        self, parent_inode: InodeT, name: FileNameT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._check_root(parent_inode)
        decoded = os.fsdecode(name)
        if decoded in (".", ".."):
            return self._stat(pyfuse3.ROOT_INODE)
        if decoded == MARK_NAME:
            return self._mark_attrs()
        st = os.lstat(self._path(self._name(name)))
        if not stat.S_ISREG(st.st_mode):
            raise pyfuse3.FUSEError(errno.ENOENT)  # only regular files are served
        return self._attrs(st, self._inode(decoded))

    @fuse_errors
    async def getattr(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._stat(inode)

    @fuse_errors
    async def setattr(
        self,
        inode: InodeT,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: FileHandleT | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        if inode in (pyfuse3.ROOT_INODE, _MARK_INODE):
            return self._stat(inode)  # truncating the marker file, touching the root: no-ops
        target: int | str = fh if fh is not None else self._path(self._name_of(inode))
        name = self.names.get(inode) or "(deleted)"
        if fields.update_size:
            os.truncate(target, attr.st_size)
            self._log(TRUNCATE, name, attr.st_size)
        if fields.update_mode:
            os.chmod(target, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            os.chown(target, uid, gid)
        if fields.update_atime or fields.update_mtime:
            st = os.stat(target)
            atime = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
            os.utime(target, ns=(atime, mtime))
        return self._stat(inode)

    @fuse_errors
    async def unlink(
        self, parent_inode: InodeT, name: FileNameT, ctx: pyfuse3.RequestContext
    ) -> None:
        self._check_root(parent_inode)
        decoded = self._name(name)
        os.unlink(self._path(decoded))
        self._log(UNLINK, decoded)
        inode = self.inodes.pop(decoded, None)
        if inode is not None:
            self.names[inode] = None

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
        self._check_root(parent_inode_old)
        self._check_root(parent_inode_new)
        old, new = self._name(name_old), self._name(name_new)
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise pyfuse3.FUSEError(errno.EINVAL)
        if flags & pyfuse3.RENAME_NOREPLACE and os.path.lexists(self._path(new)):
            raise pyfuse3.FUSEError(errno.EEXIST)
        os.rename(self._path(old), self._path(new))
        self._log(RENAME, old, 0, os.fsencode(new))
        replaced = self.inodes.pop(new, None)
        if replaced is not None:
            self.names[replaced] = None
        inode = self.inodes.pop(old, None)
        if inode is not None:
            self.inodes[new] = inode
            self.names[inode] = new

    # -- the directory --------------------------------------------------------------------

    @fuse_errors
    async def opendir(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> FileHandleT:
        self._check_root(inode)
        return FileHandleT(0)

    @fuse_errors
    async def readdir(self, fh: FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = sorted(
            e.name for e in os.scandir(self.backing) if e.is_file(follow_symlinks=False)
        )
        for index, name in enumerate(entries[start_id:], start_id + 1):
            attrs = self._attrs(os.lstat(self._path(name)), self._inode(name))
            if not pyfuse3.readdir_reply(token, FileNameT(os.fsencode(name)), attrs, index):
                break

    async def releasedir(self, fh: FileHandleT) -> None:
        """Directory handles hold nothing."""

    @fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = os.statvfs(self.backing)
        out = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail"):
            setattr(out, field, getattr(st, field))
        for field in ("f_files", "f_ffree", "f_favail", "f_namemax"):
            setattr(out, field, getattr(st, field))
        return out

    # -- files ----------------------------------------------------------------------------

    def _opened(self, fd: int, inode: InodeT) -> pyfuse3.FileInfo:
        fh = FileHandleT(fd)
        self.handles[fh] = inode
        return pyfuse3.FileInfo(fh=fh, direct_io=False, keep_cache=False)

    @fuse_errors
    async def open(
        self, inode: InodeT, flags: FlagT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        if inode == _MARK_INODE:
            return pyfuse3.FileInfo(fh=_MARK_FH, direct_io=True)
        name = self._name_of(inode)
        fd = os.open(self._path(name), flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY))
        if flags & os.O_TRUNC:
            self._log(TRUNCATE, name, 0)
        return self._opened(fd, inode)

    @fuse_errors
    async def create(
        self,
        parent_inode: InodeT,
        name: FileNameT,
        mode: ModeT,
        flags: FlagT,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self._check_root(parent_inode)
        decoded = os.fsdecode(name)
        if decoded == MARK_NAME:
            info = pyfuse3.FileInfo(fh=_MARK_FH, direct_io=True)
            return info, self._mark_attrs()
        decoded = self._name(name)
        existed = os.path.lexists(self._path(decoded))
        fd = os.open(self._path(decoded), flags | os.O_CREAT, stat.S_IMODE(mode) & ~ctx.umask)
        if existed and flags & os.O_TRUNC:
            self._log(TRUNCATE, decoded, 0)
        inode = self._inode(decoded)
        return self._opened(fd, inode), self._attrs(os.fstat(fd), inode)

    @fuse_errors
    async def read(self, fh: FileHandleT, off: int, size: int) -> bytes:
        if fh == _MARK_FH:
            return b""
        return os.pread(fh, size, off)

    @fuse_errors
    async def write(self, fh: FileHandleT, off: int, buf: bytes) -> int:
        if fh == _MARK_FH:
            self._log(MARK, "", 0, bytes(buf))
            return len(buf)
        done = os.pwrite(fh, buf, off)
        self._log(WRITE, self._fh_name(fh), off, bytes(buf[:done]))
        return done

    @fuse_errors
    async def fsync(self, fh: FileHandleT, datasync: bool) -> None:
        if fh == _MARK_FH:
            return
        (os.fdatasync if datasync else os.fsync)(fh)
        self._log(FSYNC, self._fh_name(fh))

    async def flush(self, fh: FileHandleT) -> None:
        """close() of one descriptor: nothing to do (the data already went through)."""

    @fuse_errors
    async def release(self, fh: FileHandleT) -> None:
        if fh != _MARK_FH:
            self.handles.pop(fh, None)
            os.close(fh)


async def _serve() -> None:
    """pyfuse3's loop (one worker: requests are served, and logged, one at a time) until
    SIGTERM/SIGINT or an external unmount."""
    async with trio.open_nursery() as nursery:

        async def stop_on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    pyfuse3.terminate()
                    return

        nursery.start_soon(stop_on_signal)
        await pyfuse3.main(min_tasks=1, max_tasks=1)
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    """``python3 -m tests.powerloss_fs BACKING_DIR MOUNTPOINT LOG``."""
    parser = argparse.ArgumentParser(prog="powerloss_fs", description=__doc__.splitlines()[0])
    parser.add_argument("backing", type=Path)
    parser.add_argument("mountpoint", type=Path)
    parser.add_argument("log", type=Path)
    args = parser.parse_args(argv)
    log_fd = os.open(args.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    fs = RecordingFS(args.backing.resolve(), log_fd)
    options = set(pyfuse3.default_options) | {"fsname=powerloss", "subtype=powerloss"}
    pyfuse3.init(fs, os.fspath(args.mountpoint), options)
    try:
        print("ready", flush=True)
        trio.run(_serve)
    finally:
        pyfuse3.close(unmount=True)
        os.close(log_fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())

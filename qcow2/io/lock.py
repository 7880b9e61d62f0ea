"""QEMU-compatible image locks (``block/file-posix.c``: ``raw_apply_lock_bytes`` and
``raw_check_lock_bytes``).

QEMU holds a shared OFD lock on byte ``100 + bit`` for each permission it uses and on byte
``200 + bit`` for each permission it refuses to share.  An opener conflicts if a permission
it wants is unshared by someone (byte 200+bit locked) or if it refuses to share a
permission someone holds (byte 100+bit locked).  Measured on QEMU 7.2: a writer (qemu-io,
qemu-system) holds consistent read, write and resize and unshares write and resize; a
read-only ``qemu-img info`` holds consistent read and unshares write and resize.  We take
the same bytes, so ``qemu-img info`` fails on an image we hold writable (and works with
``-U``), and we refuse an image QEMU holds writable.
"""

from __future__ import annotations

import errno
import fcntl
import struct

from ..errors import ImageLockedError, Qcow2IOError

#: Lock bytes: LOCK_PERM_BASE + bit for each permission held, LOCK_SHARED_BASE + bit for
#: each permission *not* shared with others.  QEMU's BLK_PERM_* bit numbers.
LOCK_PERM_BASE = 100
LOCK_SHARED_BASE = 200
PERM_CONSISTENT_READ_BITNR = 0
PERM_WRITE_BITNR = 1
PERM_WRITE_UNCHANGED_BITNR = 2
PERM_RESIZE_BITNR = 3
PERM_GRAPH_MOD_BITNR = 4  # QEMU 7.2 still has it; never locked
PERM_NAMES = ("consistent read", "write", "write unchanged", "resize", "change children")

#: Linux open-file-description locks (not in Python's fcntl module on every version).
F_OFD_GETLK = 36
F_OFD_SETLK = 37
#: struct flock on 64-bit Linux: l_type, l_whence, l_start, l_len, l_pid (+ padding).
_FLOCK = struct.Struct("hhqqi4x")

PERM_CONSISTENT_READ = 1 << PERM_CONSISTENT_READ_BITNR
PERM_WRITE = 1 << PERM_WRITE_BITNR
PERM_WRITE_UNCHANGED = 1 << PERM_WRITE_UNCHANGED_BITNR
PERM_RESIZE = 1 << PERM_RESIZE_BITNR
#: The permission bits QEMU 7.2 locks (graph-mod is never locked).
_LOCKED_BITS = (
    PERM_CONSISTENT_READ_BITNR,
    PERM_WRITE_BITNR,
    PERM_WRITE_UNCHANGED_BITNR,
    PERM_RESIZE_BITNR,
)

#: What a QEMU writer holds / leaves shared (qemu-io, qemu-system with a writable drive).
WRITER_PERMS = PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE
WRITER_SHARED = PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED
#: What a read-only QEMU opener (qemu-img info) holds / leaves shared.
READER_PERMS = PERM_CONSISTENT_READ
READER_SHARED = PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED


def _fcntl_lock(fd: int, cmd: int, lock_type: int, offset: int) -> int:
    """One OFD lock call on byte ``offset``; returns the l_type fcntl reports back."""
    arg = _FLOCK.pack(lock_type, 0, offset, 1, 0)
    result = fcntl.fcntl(fd, cmd, arg)
    return int(_FLOCK.unpack(result)[0])


def _is_locked_by_other(fd: int, offset: int) -> bool:
    """True if another open file description holds a lock on byte ``offset``."""
    return _fcntl_lock(fd, F_OFD_GETLK, fcntl.F_WRLCK, offset) != fcntl.F_UNLCK


def _lock_message(what: str, path: str) -> str:
    return f"{what}. Is another process using the image [{path}]?"


def acquire(fd: int, path: str, *, perms: int, shared: int) -> None:
    """Take QEMU's lock bytes for ``perms``/``~shared`` on ``fd`` and check for conflicts.

    Like QEMU: apply first, then check; on conflict the bytes just taken are released and
    :class:`ImageLockedError` carries QEMU's message (``Failed to get "write" lock``).
    """
    try:
        for bit in _LOCKED_BITS:
            if perms & (1 << bit):
                _fcntl_lock(fd, F_OFD_SETLK, fcntl.F_RDLCK, LOCK_PERM_BASE + bit)
            if not shared & (1 << bit):
                _fcntl_lock(fd, F_OFD_SETLK, fcntl.F_RDLCK, LOCK_SHARED_BASE + bit)
        for bit in _LOCKED_BITS:
            if perms & (1 << bit) and _is_locked_by_other(fd, LOCK_SHARED_BASE + bit):
                name = PERM_NAMES[bit]
                raise ImageLockedError(_lock_message(f'Failed to get "{name}" lock', path))
        for bit in _LOCKED_BITS:
            if not shared & (1 << bit) and _is_locked_by_other(fd, LOCK_PERM_BASE + bit):
                name = PERM_NAMES[bit]
                raise ImageLockedError(_lock_message(f'Failed to get shared "{name}" lock', path))
    except ImageLockedError:
        release(fd)
        raise
    except OSError as err:
        release(fd)
        if err.errno in (errno.EAGAIN, errno.EACCES):
            raise ImageLockedError(_lock_message("Failed to lock byte", path)) from err
        raise Qcow2IOError(
            f"{path}: lock failed: {err.strerror}", path=path, errno=err.errno or errno.EIO
        ) from err


def release(fd: int) -> None:
    """Drop every lock byte this file description holds (closing the fd does it too)."""
    for base in (LOCK_PERM_BASE, LOCK_SHARED_BASE):
        for bit in _LOCKED_BITS:
            try:
                _fcntl_lock(fd, F_OFD_SETLK, fcntl.F_UNLCK, base + bit)
            except OSError:
                pass


def lock_image(fd: int, path: str, *, writable: bool) -> None:
    """Lock an image as a QEMU writer (``writable``) or as ``qemu-img info`` does."""
    if writable:
        acquire(fd, path, perms=WRITER_PERMS, shared=WRITER_SHARED)
    else:
        acquire(fd, path, perms=READER_PERMS, shared=READER_SHARED)


def writer_would_lock(fd: int, path: str) -> bool:
    """Whether a QEMU writer (``qemu-img snapshot``, ``qemu-system``) opening ``path`` now
    would get its locks: tried on ``fd`` (an open file description of ``path``), then
    released again."""
    try:
        acquire(fd, path, perms=WRITER_PERMS, shared=WRITER_SHARED)
    except ImageLockedError:
        return False
    release(fd)
    return True

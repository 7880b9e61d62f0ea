"""Live migration: one image, two mount daemons, never two writers (docs/MIGRATION.md).

A served store is *held* (the daemon has the image open with QEMU's write lock and every
commit lands in it) or *released* (the store's image is a private copy of the same linear
file, in memory: an unlinked file under ``/dev/shm``, gone with the daemon; swtpm's
writes land there and the image is neither written nor locked).  The file system never
notices the move (:meth:`~vtpm_qcow.state.store.Store.exchange_image`: the bytes it serves
stay the same).

* ``serve --incoming`` (the destination) starts released, on a copy of the image read
  without a lock (:func:`open_incoming`): QEMU's incoming migration pushes the TPM state
  into the destination's swtpm, which writes it into the copy.  When the incoming migration
  has completed, :meth:`Handoff.acquire` waits for the write lock (the source daemon lets
  go when its QEMU has completed the migration, or when it exits) and writes the copy's
  linear file into the image as one atomic commit.
* the source releases (:meth:`Handoff.release`) when its QEMU reports the migration
  completed: whatever its swtpm writes afterwards stays in memory.

Both run on the daemon's trio loop, between two FUSE requests (``StoreFS.run``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Final

import trio

from qcow2.errors import ImageLockedError, Qcow2Error

from ..errors import StateFormatError, StoreError
from ..state.secret import staging_dir

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..state.store import Store
    from .fuse import StoreFS

log = logging.getLogger(__name__)

#: Seconds between two attempts to take the image's write lock from the other daemon.
ACQUIRE_POLL: Final = 0.1
#: Reads of an image another process writes, until two agree.
SHARED_READS: Final = 10
#: Log again that the lock is still held, every this many seconds.
WAIT_REPORT: Final = 10.0


def private_copy(layout: bytes, size: int, path: str) -> Store:
    """A writable store holding ``layout`` on an unlinked file in memory; its ``path``
    reads ``path`` (the image it stands in for, for messages)."""
    import tempfile

    from ..state.store import Store

    tmpdir = tempfile.mkdtemp(prefix="vtpm-qcow-migration-", dir=staging_dir())
    file = os.path.join(tmpdir, "copy.qcow2")
    try:
        store = Store.create(file, size=size)
        try:
            if layout:
                store.replace_layout(layout, source=path)
        except BaseException:
            store.close()
            raise
    finally:
        with contextlib.suppress(OSError):
            os.unlink(file)
        with contextlib.suppress(OSError):
            os.rmdir(tmpdir)
    store.path = path
    return store


def read_shared(image: str, key: bytes | None) -> tuple[bytes, int]:
    """The linear file (its meaningful bytes) and capacity of ``image``, read without a lock
    while another daemon may be writing it: read again until two reads agree."""
    from ..state.store import Store

    last: tuple[bytes, int] | None = None
    problem: Exception | None = None
    for _ in range(SHARED_READS):
        try:
            with Store.open(image, writable=False, force_share=True, key=key) as store:
                got = (store.layout(), store.linear_size)
        except (Qcow2Error, StateFormatError, StoreError) as err:
            if isinstance(err, StoreError) and not os.path.exists(image):
                raise
            problem, last = err, None
            time.sleep(ACQUIRE_POLL)
            continue
        if got == last:
            return got
        last = got
    raise StoreError(f"no consistent read while it is being written ({problem})", path=image)


def open_incoming(image: str, key: bytes | None) -> Store:
    """The store ``serve --incoming`` starts with: a private copy of ``image``'s state.
    The image is not locked: the source daemon still serves it."""
    if not os.path.exists(image):
        raise StoreError("no such image", path=image)
    layout, size = read_shared(image, key)
    return private_copy(layout, size, image)


class Handoff:
    """Whether a daemon holds ``image`` (see the module); ``key``: an encrypted image's."""

    def __init__(self, image: str, key: bytes | None, *, held: bool) -> None:
        self.image = image
        self.key = key
        self.held = held

    def release(self, fs: StoreFS) -> None:
        """Let the image go: the store moves to a private copy, the image is closed (its
        lock released).  Synchronous: call it between two FUSE requests (``fs.run``)."""
        if not self.held:
            return
        store = fs.store
        copy = private_copy(store.layout(), store.linear_size, self.image)
        store.exchange_image(copy)
        copy.close()  # now the image: its lock goes with it
        self.held = False
        fs.migrating = "the VM migrated away: the image is the destination's now"
        log.info("migration: released %s (the destination takes it over)", self.image)

    async def acquire(self, fs: StoreFS, *, wait: bool = True) -> bool:
        """Take the image's write lock (waiting for the other daemon to let it go unless
        not ``wait``), then make its state the copy's in one atomic commit and serve it.
        False if not ``wait`` and someone holds it."""
        if self.held:
            return True
        waited = 0.0
        while True:
            try:
                real = await trio.to_thread.run_sync(self._open)
                break
            except ImageLockedError:
                if not wait:
                    return False
                if waited % WAIT_REPORT < ACQUIRE_POLL:
                    log.info("migration: waiting for the source to release %s", self.image)
                await trio.sleep(ACQUIRE_POLL)
                waited += ACQUIRE_POLL
        try:
            fs.run(self._commit, fs, real)
        finally:
            real.close()  # the copy, once exchanged
        log.info("migration: took over %s", self.image)
        return True

    def _open(self) -> Store:
        from ..state.store import Store

        return Store.open(self.image, writable=True, key=self.key)

    def _commit(self, fs: StoreFS, real: Store) -> None:
        real.replace_layout(fs.store.layout(), source=f"{self.image} (migrated state)")
        fs.store.exchange_image(real)
        self.held = True
        fs.migrating = None

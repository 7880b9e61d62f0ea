"""``serve --qmp``: the snapshot watcher inside the mount daemon, on the daemon's own store.

The daemon runs trio (pyfuse3 needs it); the watcher (:mod:`vtpm_qcow.vm.watch`) and
qemu.qmp run asyncio.  So the watcher gets its own asyncio loop in a thread
(:class:`~vtpm_qcow.vm.watch.WatcherThread`), and two small pieces join the two worlds:

* :class:`TrioBridge`: the one way from the watcher's asyncio loop into the daemon's trio
  loop.  A store operation is handed to trio (``trio.from_thread``) from a worker thread of
  the asyncio loop, so the asyncio loop never blocks, and it runs on the trio loop between
  two FUSE requests, like a control socket request: the store sees one caller at a time.
  The other way, trio hears from the thread through the loop's token
  (:meth:`TrioBridge.soon`).
* :class:`MountedVtpm`: the watcher's vTPM side (:class:`~vtpm_qcow.vm.orchestrate
  .VtpmSnapshots`) on the daemon's :class:`~vtpm_qcow.export.fuse.StoreFS`: the same store
  operations as for an image opened directly, run through the bridge.  Nothing goes out
  through the daemon's control socket and back in.

:func:`follow_qmp` is what the daemon runs beside each swtpm (``SwtpmConfig.follower``).
When QEMU quits, the watcher sees its SHUTDOWN event and ends at once, and cancelling the
follower cancels the watcher's task at once: the daemon releases the image within the time
it takes to notice swtpm's exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from ..errors import MountError, StoreError
from .orchestrate import StoreVtpm
from .watch import WatcherThread

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..export.fuse import StoreFS
    from ..export.handoff import Handoff

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds between looks for QEMU's QMP socket (QEMU starts after serve's swtpm).
QMP_SOCKET_POLL = 0.2
#: Seconds before a watcher that failed is started again.
RETRY_DELAY = 1.0


class TrioBridge:
    """Calls from an asyncio loop in another thread into the trio loop of ``token``."""

    def __init__(self, token: trio.lowlevel.TrioToken, what: str) -> None:
        self.token = token
        #: for messages: what the trio loop serves
        self.what = what

    async def run_sync(self, action: Callable[[], T]) -> T:
        """Run ``action`` on the trio loop; await its result without blocking this loop."""
        return await self._hand_over(trio.from_thread.run_sync, action)

    async def run(self, action: Callable[[], Awaitable[T]]) -> T:
        """:meth:`run_sync` for a coroutine function (run as a task of the trio loop)."""
        return await self._hand_over(trio.from_thread.run, action)

    async def _hand_over(self, enter: Callable[..., T], action: object) -> T:
        # A worker thread of this asyncio loop waits for trio: this loop goes on meanwhile.
        try:
            return await asyncio.to_thread(enter, action, trio_token=self.token)
        except trio.RunFinishedError:
            raise StoreError("the mount daemon is shutting down", path=self.what) from None

    def soon(self, action: Callable[[], None]) -> None:
        """Have the trio loop run ``action`` (from any thread; dropped once it has ended)."""
        with contextlib.suppress(trio.RunFinishedError):
            self.token.run_sync_soon(action)


class MountedVtpm(StoreVtpm):
    """The daemon's own store as the watcher's vTPM side, reached through ``bridge``."""

    def __init__(self, fs: StoreFS, bridge: TrioBridge) -> None:
        super().__init__(fs.store, f"{fs.store.path} (this mount daemon)")
        self.fs = fs
        self.bridge = bridge

    async def run(self, action: Callable[[], T]) -> T:
        return await self.bridge.run_sync(functools.partial(self.fs.run, action))

    async def apply(self, tag: str) -> None:
        # through the file system: readers must see the reverted state at once
        await self.bridge.run(functools.partial(self.fs.apply_snapshot, tag))

    def close(self) -> None:
        """Nothing to release: the daemon owns the store."""


async def follow_qmp(qmp: str, fs: StoreFS, *, handoff: Handoff | None = None) -> None:
    """Keep ``fs``'s snapshots aligned with those of the QEMU at ``qmp`` while swtpm runs.

    QEMU starts after serve (it needs swtpm's socket): wait for its QMP socket, then watch.
    A failed watcher is logged and started again; one that saw QEMU shut down ends this.
    With ``handoff``, a completed outgoing live migration releases the image
    (:func:`vtpm_qcow.vm.migrate.source_hook`).
    """
    from .migrate import source_hook

    bridge = TrioBridge(trio.lowlevel.current_trio_token(), fs.store.path)
    hook = None if handoff is None else source_hook(handoff, bridge, fs)
    while True:
        while not os.path.exists(qmp):
            await trio.sleep(QMP_SOCKET_POLL)
        # A new QEMU (QEMU removes its socket when it quits) after this daemon let go: with
        # --keep-serving after a migration to a file (virsh save, managedsave), a restore.
        # The image again, if it is free; not if a live migration's destination took it.
        if handoff is not None and not await handoff.acquire(fs, wait=False):
            raise MountError(
                "held elsewhere since this VM migrated away: not serving it again",
                path=handoff.image,
            )
        ended = trio.Event()
        watcher = WatcherThread(
            qmp,
            functools.partial(MountedVtpm, fs, bridge),
            report=lambda line: log.info("qmp watcher: %s", line),
            on_ready=lambda: log.info("qmp watcher following %s", qmp),
            on_exit=functools.partial(bridge.soon, ended.set),
            on_event=hook,
            suspended=None if handoff is None else lambda: not handoff.held,
        )
        watcher.start(timeout=None)
        try:
            await ended.wait()
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(watcher.stop)
        if watcher.error is None:
            return  # QEMU shut down
        log.warning("qmp watcher on %s stopped: %s; retrying", qmp, watcher.error)
        await trio.sleep(RETRY_DELAY)

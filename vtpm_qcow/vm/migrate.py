"""Live migration on QMP's word: when each daemon lets go of or takes over its image.

The moves themselves are :class:`vtpm_qcow.export.handoff.Handoff`'s; this module decides
when, from QEMU's ``MIGRATION`` events (docs/MIGRATION.md):

* :func:`receive` (``serve --incoming --qmp``): waits until the destination QEMU's
  incoming migration has completed, then takes the image over (waiting for the source's
  daemon to release it).  A failed or cancelled incoming migration ends the daemon with the
  image untouched; so does the destination QEMU dying first (its swtpm ends).
* :func:`source_hook` (every ``serve --qmp``, through the snapshot watcher's events and
  polls): QEMU in run state ``postmigrate`` (it completed an outgoing migration) releases
  the image; it looks on ``MIGRATION`` events (QEMU sends them once the ``events``
  migration capability is on, as libvirt sets it), on ``STOP`` and at each of the
  watcher's polls (every second), so plain QEMU without the capability is followed too.
  A ``RESUME`` after that (the management rolled back: the destination did not start)
  takes the image again if nobody else has.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import threading
from typing import Any, Final

import trio

from ..errors import MountError
from .watch import POLL as WATCHER_POLL

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..export.fuse import StoreFS
    from ..export.handoff import Handoff
    from .follow import TrioBridge
    from .watch import EventHook, WatchedVm

log = logging.getLogger(__name__)

#: Seconds between looks for the QMP socket and for a stop request while waiting.
POLL: Final = 0.2
#: trio.to_thread.run_sync's "let the thread go when cancelled" keyword: ``cancellable``
#: up to trio 0.22, ``abandon_on_cancel`` from 0.23 on (the old name warns, then goes).
_run_sync: Any = trio.to_thread.run_sync
_ABANDON: Final = (
    "abandon_on_cancel"
    if "abandon_on_cancel" in inspect.signature(_run_sync).parameters
    else "cancellable"
)
#: ``query-migrate`` statuses after which nothing more happens.
FINAL: Final = ("completed", "failed", "cancelled")


def incoming_status(qmp: str, stop: threading.Event) -> str:
    """Block until the incoming migration of the QEMU at ``qmp`` ends; its final status
    (``"stopped"`` if ``stop`` was set first).  ``query-migrate`` every :data:`POLL`
    seconds; a ``MIGRATION`` event only ends a wait early."""
    from qemu.qmp.legacy import QEMUMonitorProtocol

    monitor = QEMUMonitorProtocol(qmp)
    monitor.connect()
    try:
        while not stop.is_set():
            reply = monitor.cmd_obj({"execute": "query-migrate"})
            status = str(reply.get("return", {}).get("status", "none"))
            if status in FINAL:
                return status
            with contextlib.suppress(TimeoutError):
                monitor.pull_event(wait=POLL)
        return "stopped"
    finally:
        monitor.close()


async def receive(qmp: str, handoff: Handoff, fs: StoreFS) -> None:
    """``serve --incoming``: take ``handoff``'s image over once the incoming migration of
    the QEMU at ``qmp`` has completed."""
    stop = threading.Event()
    try:
        while True:
            while not os.path.exists(qmp):
                await trio.sleep(POLL)
            try:
                status = await _run_sync(incoming_status, qmp, stop, **{_ABANDON: True})
                break
            except Exception as err:  # not listening yet, a stale socket, QEMU restarting
                log.debug("migration: QMP at %s: %s; again", qmp, err)
                await trio.sleep(POLL)
    finally:
        stop.set()
    if status != "completed":
        raise MountError(f"incoming migration {status}; image untouched", path=handoff.image)
    log.info("migration: incoming migration completed")
    await handoff.acquire(fs)


def source_hook(handoff: Handoff, bridge: TrioBridge, fs: StoreFS) -> EventHook:
    """The snapshot watcher's event hook that releases (and after a roll-back retakes)
    the image of a migration source (see the module)."""

    async def hook(name: str, data: dict[str, object], vm: WatchedVm) -> None:
        if name in ("MIGRATION", "STOP", WATCHER_POLL) and handoff.held:
            state = await vm.run_state()
            if state.status == "postmigrate":
                await bridge.run_sync(functools.partial(fs.run, handoff.release, fs))
        elif name == "RESUME" and not handoff.held:
            took = await bridge.run(functools.partial(handoff.acquire, fs, wait=False))
            if not took:
                log.error(
                    "migration: this VM resumed after migrating, but %s is held elsewhere: "
                    "its TPM changes from now on are not kept",
                    handoff.image,
                )

    return hook

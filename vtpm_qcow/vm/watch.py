"""Passive alignment: follow snapshots others take (HMP savevm/loadvm/delvm, snapshot-* jobs).

The watcher holds its own QMP monitor (QEMU accepts several ``-qmp`` options; one monitor
serves one client at a time).  It does not drive QEMU; it reacts:

* ``STOP``: record the vTPM image's committed state (and its section digests) -- the TPM
  state at the pause.  HMP ``savevm``/``loadvm`` and ``snapshot-save`` on a running VM all
  pause it first.
* ``RESUME``, a snapshot job ``concluded``, and a periodic poll (HMP ``delvm`` emits no event
  at all, HMP ``savevm`` on a paused VM neither): *reconcile* -- compare the disks' snapshot
  tags with the vTPM image's:

  - a tag that appeared on the disks while watching gets a vTPM snapshot of the TPM state
    QEMU saved, which is the state of the pause, not the active one: by the time the watcher
    hears ``RESUME`` the guest may have changed the TPM again.  The exact state comes from
    the disk snapshot itself: its vmstate holds the TPM's permanent state as swtpm handed it
    to QEMU (:mod:`vtpm_qcow.vm.vmstate`); it replaces ``permall`` in the state recorded at
    ``STOP`` and the result is filed under the tag while the active state stays as it is
    (``Store.create_snapshot(layout=)``).  Without a readable vmstate (a disk the watcher
    cannot open, a migration-key-encrypted blob), the state recorded at ``STOP`` is used
    only if the state has not changed since (then it is the pause's for sure), or, when no
    pause was seen, the state of a VM that is paused now; otherwise the tag is not filed
    and the report says why: a later state is never stored silently.
  - a tag saved again on the disks (HMP ``savevm`` silently replaces an existing tag: the
    snapshot's id and date change) gets its vTPM snapshot replaced the same way.
  - a tag that vanished from the disks while watching (delvm) is deleted from the vTPM image.
  - at (re)connect, disk tags without a vTPM snapshot are filed from their vmstate when
    they have one (a snapshot taken while nobody watched, e.g. during a libvirtd restart),
    else *reported*, not invented; vTPM-only tags (never seen on the disks,
    e.g. made with ``vtpm-qcow snapshot -c``) are deleted once they have been vTPM-only for
    ``grace`` seconds (room for another tool's operation in progress).
  - an orchestrated ``vm save`` running beside the watcher is harmless: it snapshots the
    vTPM image after the disks, with overwrite, while the VM is still paused, so whichever
    of the two takes the vTPM snapshot, it holds the same state.
  - a ``loadvm`` needs no action: QEMU pushes the snapshot's TPM blobs into swtpm, which
    rewrites ``permall`` in the active layer.  The watcher reports it when the active
    layer's ``permall`` changed during a pause and now equals a snapshot's.

Every action is reported as one line through the ``report`` callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from typing import Protocol, TypeVar

from ..errors import (
    HANDLED,
    MonitorDisconnectedError,
    MonitorError,
    VmstateError,
)
from . import DEFAULT_GRACE, DEFAULT_POLL_INTERVAL, DEFAULT_RECONNECT_TIMEOUT
from .orchestrate import (
    DiskNode,
    EventQueue,
    Monitor,
    RunState,
    VtpmSnapshots,
    delete_if_present,
    quoted,
)
from .vmstate import read_tpm_vmstate, state_with_saved_permall

T = TypeVar("T")


class WatchedVm(Protocol):
    """The VM side of a watcher: QEMU's QMP monitor (:class:`~vtpm_qcow.vm.orchestrate
    .Monitor`) or libvirt (:class:`vtpm_qcow.libvirt.domain.LibvirtVm`).

    Events are QMP's names (``STOP``, ``RESUME``, ``JOB_STATUS_CHANGE``, ``SHUTDOWN``); a
    lost connection surfaces as :class:`~vtpm_qcow.errors.MonitorDisconnectedError`.
    """

    #: For messages: the QMP socket, or the libvirt URI and domain.
    address: str

    async def connect(self) -> None: ...

    async def reconnect(self) -> None: ...

    async def close(self) -> None: ...

    def listen(self, events: EventQueue) -> AbstractContextManager[None]:
        """Deliver the VM's events to ``events`` while the context is open."""
        ...

    def connected(self) -> bool: ...

    async def disk_nodes(self) -> list[DiskNode]: ...

    async def run_state(self) -> RunState: ...


class _NotFiled(Exception):
    """The TPM state a disk snapshot saved is not known for sure (the message says why)."""


WATCHED_EVENTS = ("STOP", "RESUME", "JOB_STATUS_CHANGE", "SHUTDOWN", "MIGRATION")
#: Told of every event (name, data, the VM) before the watcher reacts to it, and of each
#: poll (:data:`POLL`): ``serve --qmp``'s live migration hand-over (:mod:`vtpm_qcow.vm
#: .migrate`).
EventHook = Callable[[str, dict[str, object], WatchedVm], Awaitable[None]]
#: The event hook's name for a poll (no QMP event is lower case).
POLL = "poll"
#: What a vTPM-side action may fail with: reported, the watcher goes on.
VTPM_FAILURES: tuple[type[Exception], ...] = (*HANDLED, OSError)


class Watcher:
    """Keeps a vTPM image's snapshot tags equal to a running VM's disk snapshot tags."""

    def __init__(
        self,
        monitor: WatchedVm,
        vtpm: VtpmSnapshots,
        *,
        report: Callable[[str], None] = print,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        grace: float = DEFAULT_GRACE,
        reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT,
        on_ready: Callable[[], None] | None = None,
        on_event: EventHook | None = None,
        suspended: Callable[[], bool] | None = None,
    ) -> None:
        self.monitor = monitor
        self.event_hook = on_event
        #: True while the vTPM side is not the VM's to align (``serve --qmp`` after its QEMU
        #: migrated away: the daemon serves an in-memory copy); no reconcile meanwhile
        self.suspended = suspended
        #: Called once, after the first reconcile: from then on every change is followed.
        self.on_ready = on_ready
        self.vtpm = vtpm
        self.report = report
        self.poll_interval = poll_interval
        self.grace = grace
        self.reconnect_timeout = reconnect_timeout
        #: Disk snapshots (tag -> identity) at the last reconcile (None: none this session).
        self.disk_snapshots: dict[str, str] | None = None
        #: Section digests of the active layer at the last STOP (None: none pending).
        self.pause_digests: dict[str, str] | None = None
        #: The committed state (linear file) at the last STOP (None: none pending).
        self.pause_layout: bytes | None = None
        #: A disk snapshot was saved during the current pause (so it was no loadvm).
        self.saved_in_pause = False
        #: Monotonic time each vTPM-only tag was first seen vTPM-only.
        self.orphans_since: dict[str, float] = {}
        #: Disk tags already reported as lacking a vTPM snapshot.
        self.reported_missing: set[str] = set()
        self.shutdown_seen = False
        #: Number of reconciles done (observability: tests, status reports).
        self.reconciles = 0

    async def run(self, *, connected: bool = False) -> None:
        """Watch until QEMU shuts down (or the task is cancelled); MonitorError if the VM's
        monitor vanished for good.

        Connects the monitor first unless ``connected``.
        """
        if not connected:
            await self.monitor.connect()
        while not self.shutdown_seen:
            try:
                await self._session()
            except MonitorDisconnectedError as err:
                if self.shutdown_seen:
                    return
                self.report(f"monitor connection lost ({err}); reconnecting")
                await self._reconnect(err)

    async def _reconnect(self, cause: MonitorError) -> None:
        deadline = time.monotonic() + self.reconnect_timeout
        while True:
            try:
                await self.monitor.reconnect()
                self.disk_snapshots = None  # what happened meanwhile is unknown
                return
            except MonitorError as err:
                if time.monotonic() > deadline:
                    raise MonitorError(
                        f"monitor gone and not back within {self.reconnect_timeout:g}s: {err}",
                        path=self.monitor.address,
                    ) from cause
                await asyncio.sleep(0.5)

    async def _session(self) -> None:
        events = EventQueue(WATCHED_EVENTS)
        with self.monitor.listen(events):
            await self.reconcile()
            if self.on_ready is not None:
                self.on_ready()
                self.on_ready = None
            while not self.shutdown_seen:  # QEMU quits after SHUTDOWN: no wait for the poll
                try:
                    event = await asyncio.wait_for(events.get(), self.poll_interval)
                except TimeoutError:
                    if not self.monitor.connected():
                        raise MonitorDisconnectedError(
                            "connection lost", path=self.monitor.address
                        ) from None
                    await self.reconcile()
                    if self.event_hook is not None:
                        await self.event_hook(POLL, {}, self.monitor)
                    continue
                data = event.get("data")
                await self.on_event(str(event["event"]), data if isinstance(data, dict) else {})

    async def on_event(self, name: str, data: dict[str, object]) -> None:
        """React to one QMP event."""
        if self.event_hook is not None:
            await self.event_hook(name, data, self.monitor)
        if name == "STOP":
            self.saved_in_pause = False
            self.pause_layout = await self._vtpm(self.vtpm.layout(), "read the state")
            self.pause_digests = await self._vtpm(
                self.vtpm.section_digests(), "read section digests"
            )
        elif name == "RESUME":
            await self.reconcile()
            self.pause_digests = self.pause_layout = None
        elif name == "JOB_STATUS_CHANGE" and data.get("status") == "concluded":
            await self.reconcile()
        elif name == "SHUTDOWN":
            self.shutdown_seen = True

    async def reconcile(self) -> list[str]:
        """Align the vTPM tags with the disks' now; return the report lines."""
        if self.suspended is not None and self.suspended():
            self.disk_snapshots = None  # what happens meanwhile is not ours to follow
            return []
        lines: list[str] = []
        disk: dict[str, str] = {}
        files: list[str] = []  # qcow2 images that may hold a snapshot's vmstate
        for node in await self.monitor.disk_nodes():
            for tag, identity in node.identities.items():
                disk.setdefault(tag, identity)
            if node.driver == "qcow2" and node.filename and node.tags:
                files.append(node.filename)
        vtpm_tags = set(await self._vtpm(self.vtpm.tags(), "list snapshots") or [])
        first = self.disk_snapshots is None
        known = self.disk_snapshots or {}

        async def take(tag: str, verb: str, why: str, *, unseen: bool = False) -> None:
            """File the TPM state the disk snapshot ``tag`` saved as vTPM snapshot ``tag``
            (``unseen``: saved while nobody watched, so only its vmstate can tell)."""
            try:
                state = await self._saved_state(tag, files, vmstate_only=unseen)
            except _NotFiled as err:
                self.reported_missing.add(tag)
                if unseen:
                    lines.append(f"missing: disk snapshot {quoted(tag)} has no vTPM snapshot")
                else:
                    lines.append(f"not filed: vTPM snapshot {quoted(tag)} ({why}): {err}")
                return
            except VTPM_FAILURES as err:
                lines.append(f"error: vTPM snapshot {tag}: {err}")
                return
            layout, source = state
            create = self.vtpm.create(tag, overwrite=True, layout=layout)
            if await self._vtpm_ok(create, f"snapshot {tag}"):
                lines.append(f"{verb}: vTPM snapshot {quoted(tag)} ({why}; {source})")

        for tag in sorted(disk.keys() - vtpm_tags):
            if first or tag in known:
                if tag not in self.reported_missing:
                    await take(tag, "created", "found at connect", unseen=True)
                continue
            await take(tag, "created", "disk snapshot appeared")
        for tag in sorted(disk.keys() & vtpm_tags):
            if tag in known and known[tag] != disk[tag]:
                await take(tag, "replaced", "disk snapshot saved again")

        now = time.monotonic()
        for tag in sorted(vtpm_tags - disk.keys()):
            vanished = tag in known
            since = self.orphans_since.setdefault(tag, now)
            if not vanished and now - since < self.grace:
                continue
            if await self._vtpm_ok(delete_if_present(self.vtpm, tag), f"delete {tag}"):
                why = "disk snapshot deleted" if vanished else "no disk snapshot"
                lines.append(f"deleted: vTPM snapshot {quoted(tag)} ({why})")
            self.orphans_since.pop(tag, None)
        for tag in list(self.orphans_since):
            if tag in disk or tag not in vtpm_tags:
                self.orphans_since.pop(tag)
        self.reported_missing &= disk.keys()

        # A pause in which a disk snapshot was saved is a save, not a load: the TPM state may
        # have moved on during it (a command in flight at the pause), and the new snapshot
        # then holds it, which would look like a load of that snapshot.
        if not first and any(known.get(tag) != identity for tag, identity in disk.items()):
            self.saved_in_pause = self.pause_digests is not None
        if self.pause_digests is not None and not self.saved_in_pause:
            lines += await self._detect_load()
        self.disk_snapshots = disk
        self.reconciles += 1
        for line in lines:
            self.report(line)
        return lines

    async def _saved_state(
        self, tag: str, files: list[str], *, vmstate_only: bool = False
    ) -> tuple[bytes, str]:
        """The TPM state that disk snapshot ``tag`` saved, as a linear file, and where it
        came from; :class:`_NotFiled` if it is unknown (``vmstate_only``: unless its
        vmstate holds it).

        Always the bytes, never "the active state": the guest may change that before the
        snapshot is taken.  Raises what the vTPM side fails with (VTPM_FAILURES).
        """
        current = await self.vtpm.layout()
        try:
            saved = await asyncio.to_thread(read_tpm_vmstate, files, tag)
            state = state_with_saved_permall(self.pause_layout or current, saved)
        except VmstateError as err:
            unreadable = str(err)
        else:
            return state, "TPM state from its vmstate"
        if vmstate_only:
            raise _NotFiled(unreadable)
        if self.pause_layout is not None:
            if self.pause_layout == current:
                return current, "TPM state unchanged since the pause"
            raise _NotFiled(
                "the TPM state changed after the pause and the vmstate cannot tell which "
                f"state was saved ({unreadable})"
            )
        if not (await self.monitor.run_state()).running:
            return current, "TPM state of the paused VM"
        raise _NotFiled(f"the pause was not seen and the vmstate is unreadable ({unreadable})")

    async def _detect_load(self) -> list[str]:
        """Report a loadvm: permall changed during the pause and now equals a snapshot's."""
        current = await self._vtpm(self.vtpm.section_digests(), "read section digests") or {}
        assert self.pause_digests is not None
        permall = current.get("permall")
        if permall is None or permall == self.pause_digests.get("permall"):
            return []
        self.pause_digests = current  # report this change once, not on every poll
        snapshots = await self._vtpm(self.vtpm.snapshot_digests(), "list snapshots") or {}
        tags = sorted(t for t, d in snapshots.items() if d.get("permall") == permall)
        if tags:
            names = "/".join(quoted(t) for t in tags)
            return [f"loaded: TPM state of {names} (pushed by QEMU's loadvm)"]
        return ["changed: permall changed during the pause and matches no snapshot"]

    async def _vtpm(self, action: Awaitable[T], what: str) -> T | None:
        """Await a vTPM-side action; report a failure (None) instead of stopping the watcher."""
        try:
            return await action
        except VTPM_FAILURES as err:
            self.report(f"error: vTPM {what}: {err}")
            return None

    async def _vtpm_ok(self, action: Awaitable[None], what: str) -> bool:
        """Await a vTPM-side action with no result; whether it succeeded."""

        async def done() -> bool:
            await action
            return True

        return await self._vtpm(done(), what) is True


class WatcherThread:
    """A :class:`Watcher` on its own asyncio loop in a thread (for trio or sync programs).

    :meth:`start` begins watching; :meth:`stop` cancels the watcher at once and joins the
    thread; :attr:`error` holds what ended it unexpectedly (a :class:`MonitorError` when the
    VM's monitor vanished).  ``vm`` is a QMP socket path, or makes the VM side (in the
    thread: libvirt's, :class:`vtpm_qcow.libvirt.domain.LibvirtVm`); ``vtpm`` opens the
    vTPM side, in the thread.  ``on_ready`` (after the first
    reconcile) and ``on_exit`` (once the watcher has ended, for whatever reason) are called
    in the thread.
    """

    def __init__(
        self,
        vm: str | Callable[[], WatchedVm],
        vtpm: Callable[[], VtpmSnapshots],
        *,
        report: Callable[[str], None] = print,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        grace: float = DEFAULT_GRACE,
        on_ready: Callable[[], None] = lambda: None,
        on_exit: Callable[[], None] = lambda: None,
        on_event: EventHook | None = None,
        suspended: Callable[[], bool] | None = None,
    ) -> None:
        self.on_event = on_event
        self.suspended = suspended
        self.open_vm: Callable[[], WatchedVm] = (
            functools.partial(Monitor, vm) if isinstance(vm, str) else vm
        )
        self.open_vtpm = vtpm
        self.report = report
        self.poll_interval, self.grace = poll_interval, grace
        self.on_ready, self.on_exit = on_ready, on_exit
        self.error: BaseException | None = None
        #: The running :class:`Watcher` (None before :meth:`start`).
        self.watcher: Watcher | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="vtpm-qcow-watch", daemon=True)

    def start(self, timeout: float | None = 30.0) -> None:
        """Start watching; wait up to ``timeout`` seconds for the first reconcile (or the
        watcher's end); ``None``: return at once."""
        self._thread.start()
        if timeout is not None:
            self._ready.wait(timeout)

    def _main(self) -> None:
        try:
            asyncio.run(self._watch())
        except asyncio.CancelledError:
            pass  # stop()
        except HANDLED as err:
            self.error = err
            self.report(f"error: watcher stopped: {err}")
        except Exception as err:  # a bug: say so, and let the owner see it ended
            self.error = err
            self.report(f"error: watcher failed: {err!r}")
        finally:
            self._ready.set()
            self.on_exit()

    def _became_ready(self) -> None:
        self._ready.set()
        self.on_ready()

    async def _watch(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        if self._stopping:  # stop() came before there was a task to cancel
            return
        vtpm = await asyncio.to_thread(self.open_vtpm)  # may connect or open: off the loop
        monitor = self.open_vm()
        try:
            self.watcher = Watcher(
                monitor, vtpm, report=self.report, poll_interval=self.poll_interval,
                grace=self.grace, on_ready=self._became_ready, on_event=self.on_event,
                suspended=self.suspended,
            )  # fmt: skip
            await self.watcher.run()
        finally:
            await monitor.close()
            await asyncio.to_thread(vtpm.close)

    @property
    def finished(self) -> bool:
        """Whether the watcher has ended (QEMU shut down, :attr:`error`, or :meth:`stop`)."""
        return self._ready.is_set() and not self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the watcher (whatever it waits for) and wait for the thread."""
        self._stopping = True
        loop, task = self._loop, self._task
        if loop is not None and task is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nothing to cancel
                loop.call_soon_threadsafe(task.cancel)
        if self._thread.ident is not None:
            self._thread.join(timeout)

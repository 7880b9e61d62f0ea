"""Orchestrated VM snapshots: the VM's disks (QEMU, over QMP) and the vTPM image together.

``save``, ``load`` and ``delete`` make one tag appear on, revert to, or vanish from both
halves, as one step from the user's view:

* **save**: refuse a tag that exists on a disk or the vTPM image unless ``force`` (before
  touching anything); pause the VM (if running); ``snapshot-save`` the disks and VM state;
  then snapshot the vTPM image while the VM is still paused.  QEMU's save waits for a TPM
  command in flight before reading the TPM state, so at that point the active layer holds
  exactly the TPM state in the vmstate (a vTPM snapshot taken *before* the job could miss
  the write of such a command).  If the vTPM half fails, the disks' fresh snapshot is
  deleted again.  Resume only if the VM was running.
* **load**: check the tag exists on every disk and on the vTPM image (refuse before
  touching anything otherwise); pause; ``snapshot-load`` the disks first, *then* apply the vTPM
  snapshot.  Why this order: loadvm pushes the TPM blobs saved in the vmstate into swtpm,
  which rewrites ``permall`` in the vTPM image's active layer.  So after a successful
  ``snapshot-load`` the TPM inside the VM *and* the active layer already hold the snapshot's
  TPM state; applying the vTPM snapshot afterwards makes the active layer identical to the
  snapshot also for what swtpm did not rewrite (stale volatile/save state) and shares its
  clusters.  Applying first would let loadvm overwrite it anyway, and a failed
  ``snapshot-load`` would then need an undo of the apply; loading first needs none (a failed
  load leaves the vTPM image untouched).  The VM is resumed only after both succeeded.
* **delete**: ``snapshot-delete`` on the disks holding the tag, then delete the vTPM
  snapshot.  Deletions cannot be undone; the operation is idempotent instead: running it
  again finishes a half-done delete.

Disks are the writable root nodes of QEMU's block backends (``query-block``), as QEMU's own
``savevm`` picks them; the first one gets the vmstate.  A disk that cannot snapshot makes
QEMU's job fail, and that failure is reported (never silently skipped).

The QMP connection is modelled explicitly (:class:`Monitor`): every command has a timeout,
QMP failures become :class:`~vtpm_qcow.errors.QmpError`, and after a lost connection the
outcome of the command in flight is treated as unknown: the monitor reconnects and
re-queries the job by its id instead of guessing.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import stat
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from qemu.qmp import EventListener, ExecInterruptedError, ExecuteError, Message, QMPClient
from qemu.qmp import QMPError as QmpLibError

import qcow2
from qcow2.errors import Qcow2Error

from ..errors import (
    HANDLED,
    AlignmentError,
    QmpDisconnectedError,
    QmpError,
    QmpJobError,
    StoreError,
)
from ..export.control import ControlClient
from ..state.store import Store
from . import DEFAULT_JOB_TIMEOUT, DEFAULT_TIMEOUT

_job_ids = itertools.count(1)

T = TypeVar("T")


def quoted(tag: str) -> str:
    """``tag`` in quotes for a one-line message (newlines and backslashes escaped)."""
    return "'" + tag.replace("\\", "\\\\").replace("\n", "\\n") + "'"


# Section: the QMP connection


class EventQueue(EventListener):
    """An :class:`EventListener` that keeps no history (watchers run for a long time)."""

    def __init__(self, names: Iterable[str]) -> None:
        super().__init__(tuple(names))
        self.pending: asyncio.Queue[Message] = asyncio.Queue()

    async def put(self, event: Message) -> None:
        """Queue ``event`` if accepted (reader task side)."""
        if self.accept(event):
            await self.pending.put(event)

    async def get(self) -> Message:
        """The next event."""
        return await self.pending.get()


@dataclass(frozen=True)
class DiskNode:
    """A writable block node that snapshot jobs act on."""

    #: Node name as passed to ``snapshot-*`` (``devices``/``vmstate``).
    node: str
    #: The block backend (device) it is the root of, for messages.
    device: str
    #: Block driver (qcow2, raw...).
    driver: str
    #: Tags of the node's internal snapshots.
    tags: frozenset[str]
    #: Tag -> identity (id and date) of each snapshot: changes when a tag is saved anew
    #: (HMP savevm silently replaces an existing tag).
    identities: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    #: Snapshot ID -> name: QEMU's qcow2 driver resolves a loadvm tag as an ID first.
    names_by_id: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    #: The image file QEMU opened (``query-block``'s ``file``: a path, or ``json:{...}``).
    filename: str = field(default="", compare=False, hash=False)


@dataclass(frozen=True)
class RunState:
    """``query-status``: whether vCPUs run and QEMU's run state name."""

    running: bool
    status: str


class Monitor:
    """One QMP connection with timeouts and typed errors.

    States: *disconnected* (after construction or :meth:`close`) and *connected* (after
    :meth:`connect`).  A lost connection surfaces as :class:`QmpDisconnectedError` from
    whatever was running; :meth:`reconnect` opens a fresh session.
    """

    def __init__(
        self,
        address: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        job_timeout: float = DEFAULT_JOB_TIMEOUT,
        name: str = "vtpm-qcow",
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.job_timeout = job_timeout
        self.name = name
        self.client = QMPClient(name)

    # upper half: called by the orchestration code

    async def connect(self) -> None:
        """Open the session (greeting + capabilities negotiation) within the timeout."""
        try:
            mode = os.stat(self.address).st_mode
        except OSError as err:
            raise QmpError(
                f"QMP socket: {err.strerror}", path=self.address, errno=err.errno
            ) from err
        if not stat.S_ISSOCK(mode):
            raise QmpError("not a socket", path=self.address)
        try:
            await asyncio.wait_for(self.client.connect(self.address), self.timeout)
        except TimeoutError as err:
            await self._drop()
            raise QmpError(
                f"no QMP greeting within {self.timeout:g}s "
                "(QEMU hung, or another client holds this monitor)",
                path=self.address,
            ) from err
        except (QmpLibError, OSError, EOFError) as err:
            await self._drop()
            raise QmpError(f"cannot connect: {err}", path=self.address) from err

    async def reconnect(self) -> None:
        """Drop the current session and connect again."""
        await self._drop()
        self.client = QMPClient(self.name)
        await self.connect()

    async def close(self) -> None:
        """Disconnect (idempotent; never raises)."""
        await self._drop()

    def listen(self, events: EventQueue) -> AbstractContextManager[None]:
        """Deliver QEMU's events to ``events`` while the context is open."""
        return self.client.listen(events)

    def connected(self) -> bool:
        """Whether the session is up (False once QEMU hung up)."""
        return self.client.runstate.name == "RUNNING"

    async def _drop(self) -> None:
        try:
            await asyncio.wait_for(self.client.disconnect(), self.timeout)
        except Exception:  # the connection is being thrown away; its error is not news
            pass

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> Any:
        """Run one QMP command; its ``return`` value."""
        try:
            return await asyncio.wait_for(self.client.execute(command, arguments), self.timeout)
        except ExecuteError as err:
            raise QmpError(f"{command}: {err}", path=self.address) from err
        except TimeoutError as err:
            raise QmpDisconnectedError(
                f"{command}: no answer within {self.timeout:g}s; outcome unknown", path=self.address
            ) from err
        except (ExecInterruptedError, QmpLibError, OSError, EOFError) as err:
            raise QmpDisconnectedError(
                f"{command}: connection lost ({err or type(err).__name__}); outcome unknown",
                path=self.address,
            ) from err

    async def hmp(self, command_line: str) -> str:
        """Run an HMP command; its text output (``Error: ...`` output raises QmpError)."""
        output = str(await self.execute("human-monitor-command", {"command-line": command_line}))
        if output.startswith("Error:"):
            raise QmpError(f"{command_line}: {output.strip()}", path=self.address)
        return output

    async def run_state(self) -> RunState:
        """``query-status``."""
        reply = await self.execute("query-status")
        return RunState(bool(reply["running"]), str(reply["status"]))

    async def disk_nodes(self) -> list[DiskNode]:
        """Writable root nodes of the block backends with a medium, in QEMU's order."""
        nodes: list[DiskNode] = []
        for backend in await self.execute("query-block"):
            inserted = backend.get("inserted")
            if not inserted or inserted.get("ro"):
                continue
            snapshots = inserted.get("image", {}).get("snapshots", [])
            identities = {
                str(s["name"]): f"{s['id']}@{s['date-sec']}.{s['date-nsec']:09d}" for s in snapshots
            }
            names_by_id = {str(s["id"]): str(s["name"]) for s in snapshots}
            device = backend.get("qdev") or backend.get("device") or inserted["node-name"]
            node = DiskNode(
                inserted["node-name"],
                device,
                inserted["drv"],
                frozenset(identities),
                identities,
                names_by_id,
                str(inserted.get("file", "")),
            )
            nodes.append(node)
        return nodes

    async def run_job(self, command: str, arguments: Mapping[str, object]) -> None:
        """Run a ``snapshot-*`` job to its end, dismiss it; QmpJobError if it failed.

        The job's id ties a reconnected session to it: if the connection drops after QEMU
        accepted the job, the monitor reconnects once and waits for, reads and dismisses
        the same job (jobs outlive monitor connections).
        """
        job_id = f"vtpm-qcow-{os.getpid()}-{next(_job_ids)}"
        events = EventQueue(["JOB_STATUS_CHANGE"])
        with self.client.listen(events):
            await self.execute(command, {"job-id": job_id, **arguments})
            try:
                job = await self._finish_job(events, job_id)
            except QmpDisconnectedError:
                await self.reconnect()
                events = EventQueue(["JOB_STATUS_CHANGE"])
                with self.client.listen(events):
                    job = await self._finish_job(events, job_id)
        if job.get("error"):
            raise QmpJobError(f"{command}: {job['error']}", path=self.address)

    async def _finish_job(self, events: EventQueue, job_id: str) -> dict[str, Any]:
        """Wait for ``job_id`` to conclude, read its final state, dismiss it."""
        await self._wait_concluded(events, job_id)
        job = await self._query_job(job_id)
        if job is None:
            raise QmpDisconnectedError(f"job {job_id} vanished; outcome unknown", path=self.address)
        await self.execute("job-dismiss", {"id": job_id})
        return job

    async def _query_job(self, job_id: str) -> dict[str, Any] | None:
        for job in await self.execute("query-jobs"):
            if job.get("id") == job_id:
                return dict(job)
        return None

    async def _wait_concluded(self, events: EventQueue, job_id: str) -> None:
        """Wait until ``job_id`` is concluded (events first, query-jobs as the truth)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.job_timeout
        while True:
            job = await self._query_job(job_id)
            if job is None:
                raise QmpDisconnectedError(
                    f"job {job_id} vanished; its outcome is unknown", path=self.address
                )
            if job.get("status") in ("concluded", "null"):
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise QmpError(
                    f"job {job_id} still {job.get('status')} after {self.job_timeout:g}s",
                    path=self.address,
                )
            # Wake on the next status change of any job, or re-poll after a second.
            try:
                await asyncio.wait_for(events.get(), min(remaining, 1.0))
            except TimeoutError:
                if self.client.runstate.name != "RUNNING":
                    raise QmpDisconnectedError(
                        f"connection lost while job {job_id} ran", path=self.address
                    ) from None


# Section: the vTPM half


class VtpmSnapshots(Protocol):
    """Snapshot operations on the vTPM image (mounted by a daemon, or opened directly).

    The operations are coroutines: they run on the caller's asyncio loop without blocking
    it (a store operation or a control socket round trip runs in a worker thread, or on
    the mount daemon's own event loop, :mod:`vtpm_qcow.vm.follow`).
    """

    #: For messages: the image (and how it is reached).
    description: str

    async def tags(self) -> list[str]:
        """Tags of the image's snapshots."""
        ...

    async def create(
        self, tag: str, *, overwrite: bool = False, layout: bytes | None = None
    ) -> None:
        """Snapshot the active layer as ``tag`` (with ``layout``: that state, as
        :meth:`layout` returned it, while the active layer stays as it is)."""
        ...

    async def layout(self) -> bytes:
        """The committed state of the active layer (the linear file; ``b""`` if none)."""
        ...

    async def apply(self, tag: str) -> None:
        """Revert the active layer to ``tag``."""
        ...

    async def delete(self, tag: str) -> None:
        """Delete snapshot ``tag``."""
        ...

    async def section_digests(self) -> dict[str, str]:
        """Digest of each state section of the active layer, by section name."""
        ...

    async def snapshot_digests(self) -> dict[str, dict[str, str]]:
        """Section digests of every snapshot, by tag."""
        ...

    def close(self) -> None:
        """Release the image or connection."""
        ...


class DaemonVtpm:
    """The vTPM image served by a ``vtpm-qcow serve`` daemon, through its control socket."""

    def __init__(self, client: ControlClient, image: str) -> None:
        self.client = client
        self.image = image
        self.description = f"{image} (via {client.path})"

    async def tags(self) -> list[str]:
        return await asyncio.to_thread(self._tags)

    def _tags(self) -> list[str]:
        """Snapshot tags read from the image's snapshot table, like ``qemu-img -U``.

        The daemon's ``snapshot-list`` digests every snapshot's sections (milliseconds);
        the table itself is a fraction of that, and the daemon replaces it atomically (one
        header pointer write), so a shared read sees the old or the new table, never a mix.
        """
        try:
            with qcow2.open(self.image, force_share=True) as image:
                return [snapshot.name for snapshot in image.snapshots]
        except (Qcow2Error, OSError):
            return [str(s["tag"]) for s in self.client.snapshot_list()]

    async def create(
        self, tag: str, *, overwrite: bool = False, layout: bytes | None = None
    ) -> None:
        await asyncio.to_thread(
            self.client.snapshot_create, tag, overwrite=overwrite, layout=layout
        )

    async def layout(self) -> bytes:
        return (await asyncio.to_thread(self.client.capture, snapshots=False)).layout

    async def apply(self, tag: str) -> None:
        await asyncio.to_thread(self.client.snapshot_apply, tag)

    async def delete(self, tag: str) -> None:
        await asyncio.to_thread(self.client.snapshot_delete, tag)

    async def section_digests(self) -> dict[str, str]:
        sections = (await asyncio.to_thread(self.client.info))["sections"]
        return {str(name): str(info["digest"]) for name, info in sections.items()}

    async def snapshot_digests(self) -> dict[str, dict[str, str]]:
        return {
            str(snap["tag"]): {str(n): str(i["digest"]) for n, i in snap["sections"].items()}
            for snap in await asyncio.to_thread(self.client.snapshot_list)
        }

    def close(self) -> None:
        self.client.close()


class StoreVtpm:
    """A :class:`Store` as the vTPM side: each operation runs through :meth:`run`.

    Here ``run`` is a worker thread (a store nobody has mounted, opened directly: it holds
    the image's qcow2 lock); :class:`vtpm_qcow.vm.follow.MountedVtpm` runs the same
    operations on the mount daemon's event loop instead.
    """

    def __init__(self, store: Store, description: str | None = None) -> None:
        self.store = store
        self.description = description or store.path

    async def run(self, action: Callable[[], T]) -> T:
        """Run the store operation ``action`` off this event loop; its result."""
        return await asyncio.to_thread(action)

    async def tags(self) -> list[str]:
        return await self.run(self.store.snapshot_tags)

    async def create(
        self, tag: str, *, overwrite: bool = False, layout: bytes | None = None
    ) -> None:
        create = functools.partial(
            self.store.create_snapshot, tag, overwrite=overwrite, layout=layout
        )
        await self.run(create)

    async def layout(self) -> bytes:
        return await self.run(self.store.layout)

    async def apply(self, tag: str) -> None:
        await self.run(functools.partial(self.store.apply_snapshot, tag))

    async def delete(self, tag: str) -> None:
        await self.run(functools.partial(self.store.delete_snapshot, tag))

    async def section_digests(self) -> dict[str, str]:
        sections = await self.run(self.store.sections)
        return {name: info.digest for name, info in sections.items()}

    async def snapshot_digests(self) -> dict[str, dict[str, str]]:
        return {
            snap.tag: {name: info.digest for name, info in snap.sections.items()}
            for snap in await self.run(self.store.snapshots)
        }

    def close(self) -> None:
        self.store.close()


def open_vtpm(image: str, control: str | None = None, key: bytes | None = None) -> VtpmSnapshots:
    """The vTPM side of ``image``: its daemon if one serves it, else the image itself.

    ``control`` names the daemon's control socket; by default the daemon's standard socket
    for ``image`` is tried (``ControlClient.for_image``).  ``key`` unlocks an encrypted
    image opened here (a daemon has its own).
    """
    client = ControlClient(control) if control else ControlClient.for_image(image)
    try:
        client.ping()
    except StoreError:
        client.close()
        if control:
            raise
        if not os.path.exists(image):
            raise StoreError("no such vTPM image", path=image) from None
        return StoreVtpm(Store.open(image, key=key))
    return DaemonVtpm(client, image)


# Section: orchestrated operations


@dataclass
class Outcome:
    """What an orchestrated operation did, for the CLI's report."""

    tag: str
    disks: list[str] = field(default_factory=list)
    vtpm: str = ""
    paused: bool = False
    resumed: bool = False
    notes: list[str] = field(default_factory=list)

    def summary(self, verb: str) -> str:
        """One line for the user."""
        text = f"{verb} {quoted(self.tag)}: disks {', '.join(self.disks) or '-'} + vTPM {self.vtpm}"
        if self.paused:
            text += "; VM resumed" if self.resumed else "; VM left paused"
        return text + "".join(f"; {note}" for note in self.notes)


class PausedVm:
    """Pause the VM if it runs; :meth:`resume` continues it only if it was running."""

    def __init__(self, monitor: Monitor, state: RunState) -> None:
        self.monitor = monitor
        self.was_running = state.running

    async def pause(self) -> None:
        if self.was_running:
            await self.monitor.execute("stop")

    async def resume(self) -> bool:
        if self.was_running:
            await self.monitor.execute("cont")
        return self.was_running


async def save(monitor: Monitor, vtpm: VtpmSnapshots, tag: str, *, force: bool = False) -> Outcome:
    """Snapshot disks, VM state and vTPM image as ``tag`` (see the module docstring)."""
    state, nodes, vtpm_tags = await asyncio.gather(
        monitor.run_state(), _snapshot_nodes(monitor), vtpm.tags()
    )
    on_disks = [n.node for n in nodes if tag in n.tags]
    holders = [*on_disks, *(["the vTPM image"] if tag in vtpm_tags else [])]
    if holders and not force:
        raise AlignmentError(
            f"save {quoted(tag)}: tag exists on {', '.join(holders)}; use --force to replace it"
        )
    vm = PausedVm(monitor, state)
    await vm.pause()
    try:
        outcome = await _save_paused(monitor, vtpm, tag, nodes, on_disks)
    except QmpDisconnectedError:
        raise  # nothing to resume through
    except BaseException:
        try:
            await vm.resume()  # the VM's state did not change: let it go on
        except QmpError:
            pass
        raise
    outcome.paused = vm.was_running
    outcome.resumed = await vm.resume()
    return outcome


async def _save_paused(
    monitor: Monitor, vtpm: VtpmSnapshots, tag: str, nodes: list[DiskNode], on_disks: list[str]
) -> Outcome:
    outcome = Outcome(tag, [n.node for n in nodes], vtpm.description)
    if on_disks:
        old = {"tag": tag, "devices": on_disks}
        await _disk_half(monitor, "save", "snapshot-delete", old, tag)
        outcome.notes.append("replaced the old snapshot")
    save_job = {"tag": tag, "vmstate": nodes[0].node, "devices": outcome.disks}
    try:
        await monitor.run_job("snapshot-save", save_job)
    except QmpError as err:
        raise AlignmentError(
            f"save {quoted(tag)}: disk half failed: {err}; vTPM image untouched"
        ) from err
    # vTPM half after the disks': the VM is still paused, and QEMU's save waited for any TPM
    # command in flight before reading the TPM state, so the active layer now holds exactly
    # the TPM state in the vmstate.  overwrite: a watcher may have followed the disks already.
    try:
        await vtpm.create(tag, overwrite=True)
    except HANDLED as err:
        try:
            await monitor.run_job("snapshot-delete", {"tag": tag, "devices": outcome.disks})
            undo = "the disks' snapshot was deleted again"
        except QmpError as undo_err:
            undo = f"rollback failed too ({undo_err})"
        raise AlignmentError(f"save {quoted(tag)}: vTPM half failed: {err}; {undo}") from err
    return outcome


async def load(monitor: Monitor, vtpm: VtpmSnapshots, tag: str) -> Outcome:
    """Revert disks, VM state and vTPM image to ``tag`` (see the module docstring)."""
    state, nodes, vtpm_tags = await asyncio.gather(
        monitor.run_state(), _snapshot_nodes(monitor), vtpm.tags()
    )
    missing = [n.node for n in nodes if tag not in n.tags]
    if tag not in vtpm_tags:
        missing.append("the vTPM image")
    if missing:
        raise AlignmentError(f"load {quoted(tag)}: no such snapshot on {', '.join(missing)}")
    for node in nodes:
        other = node.names_by_id.get(tag)
        if other is not None and other != tag:
            # loadvm/snapshot-load find the snapshot by name but revert each qcow2 disk with
            # qcow2_snapshot_goto, which tries the tag as an ID first: the disks and their
            # vmstate would go to another snapshot than the vTPM image (looked up by name).
            raise AlignmentError(
                f"load {quoted(tag)}: QEMU would revert {node.node} to its snapshot ID {tag} "
                f"({quoted(other)}), not to the one named {quoted(tag)}; rename one of them "
                "(savevm a new tag) to load it"
            )
    vm = PausedVm(monitor, state)
    await vm.pause()
    outcome = Outcome(tag, [n.node for n in nodes], vtpm.description, vm.was_running)
    try:
        await monitor.run_job(
            "snapshot-load", {"tag": tag, "vmstate": nodes[0].node, "devices": outcome.disks}
        )
    except QmpError as err:
        raise AlignmentError(
            f"load {quoted(tag)}: disk half failed: {err}; vTPM image untouched, VM left paused"
        ) from err
    await _vtpm_half(vtpm.apply(tag), "load", tag, after="the disks were loaded (VM paused)")
    outcome.resumed = await vm.resume()
    return outcome


async def delete(monitor: Monitor, vtpm: VtpmSnapshots, tag: str) -> Outcome:
    """Delete ``tag`` from the disks and the vTPM image (idempotent when half done)."""
    nodes = await monitor.disk_nodes()
    on_disks = [n.node for n in nodes if tag in n.tags]
    on_vtpm = tag in await vtpm.tags()
    if not on_disks and not on_vtpm:
        raise AlignmentError(
            f"delete {quoted(tag)}: no such snapshot on the disks or the vTPM image"
        )
    outcome = Outcome(tag, on_disks, vtpm.description if on_vtpm else "-")
    if on_disks:
        await _disk_half(
            monitor, "delete", "snapshot-delete", {"tag": tag, "devices": on_disks}, tag
        )
    if on_vtpm:
        after = "the disks' snapshot was deleted (run delete again)" if on_disks else ""
        await _vtpm_half(delete_if_present(vtpm, tag), "delete", tag, after=after)
    return outcome


async def _snapshot_nodes(monitor: Monitor) -> list[DiskNode]:
    nodes = await monitor.disk_nodes()
    if not nodes:
        raise AlignmentError("the VM has no writable disk for the vmstate", path=monitor.address)
    return nodes


async def _disk_half(
    monitor: Monitor, verb: str, command: str, arguments: Mapping[str, object], tag: str
) -> None:
    """Run a disk job; its failure becomes an AlignmentError naming the half."""
    try:
        await monitor.run_job(command, arguments)
    except QmpError as err:
        raise AlignmentError(
            f"{verb} {quoted(tag)}: disk half failed: {err}; vTPM image untouched"
        ) from err


async def delete_if_present(vtpm: VtpmSnapshots, tag: str) -> None:
    """Delete ``tag``; a tag already gone (another party deleted it first) is fine."""
    try:
        await vtpm.delete(tag)
    except HANDLED:
        if tag in await vtpm.tags():
            raise


async def _vtpm_half(action: Awaitable[None], verb: str, tag: str, *, after: str = "") -> None:
    """Run the vTPM half; its failure becomes an AlignmentError naming the half."""
    try:
        await action
    except HANDLED as err:
        context = f" after {after}" if after else "; disks untouched"
        raise AlignmentError(f"{verb} {quoted(tag)}: vTPM half failed{context}: {err}") from err


# Section: listing


@dataclass(frozen=True)
class TagRow:
    """One tag: which disks hold it and whether the vTPM image does."""

    tag: str
    disks: tuple[str, ...]
    vtpm: bool
    aligned: bool


def tag_table(nodes: list[DiskNode], vtpm_tags: Iterable[str]) -> list[TagRow]:
    """Every tag of the disks or the vTPM image; aligned = on every disk and the vTPM."""
    vtpm_set = set(vtpm_tags)
    all_tags = set(vtpm_set).union(*(n.tags for n in nodes))
    rows = []
    for tag in sorted(all_tags):
        holders = tuple(n.node for n in nodes if tag in n.tags)
        aligned = len(holders) == len(nodes) and tag in vtpm_set
        rows.append(TagRow(tag, holders, tag in vtpm_set, aligned))
    return rows

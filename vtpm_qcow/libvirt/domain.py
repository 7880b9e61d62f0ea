"""A libvirt domain: what its XML says, and the domain as the snapshot watcher's VM side.

:func:`parse_domain` reads what vtpm-qcow needs from a domain's XML (as ``virsh dumpxml``
prints it, or as libvirt hands it to a hook on stdin): name, UUID, the qcow2 disks, the TPM
backend and the vtpm-qcow opt-in in ``<metadata>``.

:class:`LibvirtVm` follows a running domain through libvirt's own API, so the domain gets
no extra QMP monitor and is never tainted (``custom-argv``/``custom-monitor``):

* lifecycle events become the QMP events the watcher knows: ``SUSPENDED`` -> ``STOP``,
  ``RESUMED`` -> ``RESUME``, ``STOPPED`` -> ``SHUTDOWN`` (a revert of a running domain
  kills QEMU, so the domain's next start gets a new follower from the hook);
* the disks' snapshot tags come from the images themselves, read shared like
  ``qemu-img -U`` (libvirt 9.0 snapshots running domains with HMP ``savevm``, emitting no
  snapshot event, and shut-off ones with ``qemu-img snapshot``: the watcher's poll and its
  reconcile at each pause/resume see both);
* libvirt's events need its event loop: one thread per process runs
  ``virEventRunDefaultImpl`` (registered once, before the first connection).

A lost connection (libvirtd restarted) is a
:class:`~vtpm_qcow.errors.LibvirtDisconnectedError`; :meth:`LibvirtVm.reconnect` opens a
new one and finds the domain again by UUID (its id changes across restarts and reverts).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import qcow2
from qcow2.errors import Qcow2Error

from ..errors import LibvirtDisconnectedError, LibvirtError
from ..vm.orchestrate import DiskNode, EventQueue, RunState
from . import DEFAULT_URI, METADATA_URI

TYPE_CHECKING = False
if TYPE_CHECKING:
    import libvirt


@dataclass(frozen=True)
class DomainDisk:
    """A disk of the domain: its target (``vda``), image file and format."""

    target: str
    file: str
    format: str
    readonly: bool = False


@dataclass(frozen=True)
class DomainInfo:
    """What vtpm-qcow reads from a domain's XML."""

    name: str
    uuid: str
    disks: tuple[DomainDisk, ...]
    #: ``<tpm><backend type=...>``: emulator, external, passthrough; None without a TPM.
    tpm_backend: str | None
    #: ``<backend version=...>`` (libvirt's default: 2.0).
    tpm_version: str
    #: The vTPM image named by the vtpm-qcow opt-in in ``<metadata>`` (None: not enabled).
    image: str | None
    #: The libvirt URI recorded with the opt-in (the hook's follower connects to it).
    uri: str | None = None

    @property
    def qcow2_files(self) -> list[str]:
        """The writable qcow2 disks' image files, in the domain's order."""
        return [d.file for d in self.disks if d.format == "qcow2" and not d.readonly]


def parse_domain(xml: str, *, source: str = "domain XML") -> DomainInfo:
    """The parts of a domain's XML vtpm-qcow uses; LibvirtError if it is not one."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as err:
        raise LibvirtError(f"not XML: {err}", path=source) from None
    if root.tag != "domain":
        raise LibvirtError(f"not a domain definition (root <{root.tag}>)", path=source)
    name = root.findtext("name") or ""
    uuid = root.findtext("uuid") or ""
    disks = []
    for disk in root.iterfind("devices/disk"):
        src = disk.find("source")
        target = disk.find("target")
        if disk.get("device", "disk") != "disk" or src is None or src.get("file") is None:
            continue
        driver = disk.find("driver")
        disks.append(
            DomainDisk(
                target.get("dev", "") if target is not None else "",
                str(src.get("file")),
                (driver.get("type") if driver is not None else None) or "raw",
                disk.find("readonly") is not None,
            )
        )
    backend = root.find("devices/tpm/backend")
    image = uri = None
    for element in root.iterfind("metadata/*"):
        if element.tag == f"{{{METADATA_URI}}}vtpm":
            image, uri = element.get("image"), element.get("uri")
    return DomainInfo(
        name=name,
        uuid=uuid,
        disks=tuple(disks),
        tpm_backend=backend.get("type") if backend is not None else None,
        tpm_version=(backend.get("version") if backend is not None else None) or "2.0",
        image=image,
        uri=uri,
    )


def metadata_xml(image: str, uri: str) -> str:
    """The element :func:`parse_domain` reads the opt-in from (``virDomainSetMetadata``)."""
    return ET.tostring(ET.Element("vtpm", image=image, uri=uri), encoding="unicode")


def disk_node(disk: DomainDisk) -> DiskNode:
    """The snapshot tags of ``disk``'s image, read shared (``qemu-img -U``), as the
    watcher's :class:`DiskNode`; LibvirtError if the image cannot be read."""
    try:
        with qcow2.open(disk.file, force_share=True) as image:
            entries = list(image.snapshots)
    except (Qcow2Error, OSError) as err:
        raise LibvirtError(f"disk {disk.target}: {err}", path=disk.file) from err
    identities = {e.name: f"{e.id}@{e.date_sec}.{e.date_nsec:09d}" for e in entries}
    return DiskNode(
        node=disk.target,
        device=disk.target,
        driver="qcow2",
        tags=frozenset(identities),
        identities=identities,
        names_by_id={e.id: e.name for e in entries},
        filename=disk.file,
    )


# Section: libvirt's event loop (one per process)

_event_loop_lock = threading.Lock()
_event_loop_started = False


def libvirt_api() -> Any:
    """The libvirt module (libvirt-python), with its event loop running in a thread."""
    global _event_loop_started
    try:
        import libvirt
    except ImportError:
        raise LibvirtError(
            "libvirt-python is not installed (pip install 'vtpm-qcow[libvirt]', or Debian's "
            "python3-libvirt for the system Python)"
        ) from None
    with _event_loop_lock:
        if not _event_loop_started:
            libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # no stderr noise
            libvirt.virEventRegisterDefaultImpl()
            threading.Thread(
                target=_run_event_loop, args=(libvirt,), name="libvirt-events", daemon=True
            ).start()
            _event_loop_started = True
    return libvirt


def _run_event_loop(libvirt: Any) -> None:
    while True:
        libvirt.virEventRunDefaultImpl()


# Section: the domain as a watcher's VM side

#: libvirt lifecycle event -> the QMP event the watcher reacts to.
_LIFECYCLE_EVENTS = {"SUSPENDED": "STOP", "RESUMED": "RESUME", "STOPPED": "SHUTDOWN"}


class LibvirtVm:
    """Domain ``domain`` (name or UUID) of the libvirt at ``uri`` as a watcher's VM side
    (:class:`vtpm_qcow.vm.watch.WatchedVm`)."""

    def __init__(self, domain: str, uri: str = DEFAULT_URI) -> None:
        self.domain = domain
        self.uri = uri
        self.address = f"{uri} domain {domain}"
        self._conn: libvirt.virConnect | None = None
        self._dom: libvirt.virDomain | None = None
        self._uuid: str | None = None
        self._closed = threading.Event()
        self._queues: list[tuple[asyncio.AbstractEventLoop, EventQueue]] = []
        self._callback: int | None = None

    def _error(self, what: str, err: Exception) -> LibvirtError:
        lv = libvirt_api()
        code = err.get_error_code() if isinstance(err, lv.libvirtError) else None
        gone = code in (lv.VIR_ERR_SYSTEM_ERROR, lv.VIR_ERR_RPC, lv.VIR_ERR_NO_CONNECT)
        message = err.get_error_message() if isinstance(err, lv.libvirtError) else str(err)
        if gone or self._closed.is_set():
            return LibvirtDisconnectedError(f"{what}: {message}", path=self.address)
        return LibvirtError(f"{what}: {message}", path=self.address)

    def _open(self) -> None:
        lv = libvirt_api()
        self._closed.clear()
        try:
            conn = lv.open(self.uri)
        except lv.libvirtError as err:
            raise self._error("cannot connect to libvirt", err) from None
        try:
            conn.registerCloseCallback(lambda *_: self._closed.set(), None)
            dom = conn.lookupByUUIDString(self._uuid) if self._uuid else None
            if dom is None:
                try:
                    dom = conn.lookupByUUIDString(self.domain)
                except lv.libvirtError:
                    dom = conn.lookupByName(self.domain)
            self._uuid = dom.UUIDString()
            self._callback = conn.domainEventRegisterAny(
                dom, lv.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None
            )
        except lv.libvirtError as err:
            with contextlib.suppress(lv.libvirtError):
                conn.close()
            raise self._error("no such domain", err) from None
        self._conn, self._dom = conn, dom

    def _on_lifecycle(self, _conn: Any, _dom: Any, event: int, detail: int, _opaque: Any) -> None:
        """In libvirt's event loop thread: hand the event to every listening queue."""
        lv = libvirt_api()
        names = {getattr(lv, f"VIR_DOMAIN_EVENT_{n}"): q for n, q in _LIFECYCLE_EVENTS.items()}
        name = names.get(event)
        if name is None:
            return
        message = {"event": name, "data": {"libvirt-detail": detail}}
        for loop, queue in list(self._queues):
            if queue.accept(message):  # type: ignore[arg-type]  # a plain dict suffices
                loop.call_soon_threadsafe(queue.pending.put_nowait, message)  # type: ignore[arg-type]

    def _close(self) -> None:
        conn, self._conn, self._dom = self._conn, None, None
        if conn is None:
            return
        lv = libvirt_api()
        with contextlib.suppress(lv.libvirtError):
            if self._callback is not None:
                conn.domainEventDeregisterAny(self._callback)
        with contextlib.suppress(lv.libvirtError):
            conn.unregisterCloseCallback()
        with contextlib.suppress(lv.libvirtError):
            conn.close()
        self._callback = None

    async def connect(self) -> None:
        await asyncio.to_thread(self._open)

    async def reconnect(self) -> None:
        await asyncio.to_thread(self._close)
        await self.connect()

    async def close(self) -> None:
        await asyncio.to_thread(self._close)

    @contextlib.contextmanager
    def listen(self, events: EventQueue) -> Iterator[None]:
        entry = (asyncio.get_running_loop(), events)
        self._queues.append(entry)
        try:
            yield
        finally:
            self._queues.remove(entry)

    def connected(self) -> bool:
        conn = self._conn
        if conn is None or self._closed.is_set():
            return False
        try:
            return bool(conn.isAlive())
        except Exception:
            return False

    def _domain(self) -> Any:
        if self._dom is None or not self.connected():
            raise LibvirtDisconnectedError("connection to libvirt lost", path=self.address)
        return self._dom

    def _info(self) -> DomainInfo:
        try:
            xml = self._domain().XMLDesc(0)
        except libvirt_api().libvirtError as err:
            raise self._error("domain XML", err) from None
        return parse_domain(xml, source=self.address)

    async def info(self) -> DomainInfo:
        """The domain's XML, parsed (its live definition while it runs)."""
        return await asyncio.to_thread(self._info)

    async def disk_nodes(self) -> list[DiskNode]:
        info = await self.info()
        disks = [d for d in info.disks if d.format == "qcow2" and not d.readonly]
        return await asyncio.to_thread(lambda: [disk_node(d) for d in disks])

    async def run_state(self) -> RunState:
        def query() -> RunState:
            lv = libvirt_api()
            try:
                state, _reason = self._domain().state()
            except lv.libvirtError as err:
                raise self._error("domain state", err) from None
            names = {
                lv.VIR_DOMAIN_RUNNING: "running",
                lv.VIR_DOMAIN_PAUSED: "paused",
                lv.VIR_DOMAIN_SHUTOFF: "shutdown",
            }
            return RunState(state == lv.VIR_DOMAIN_RUNNING, names.get(state, str(state)))

        return await asyncio.to_thread(query)

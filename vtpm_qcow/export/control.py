"""The control socket of a mounted store: JSON lines over a unix socket.

One request per line, one reply per line::

    {"op": "snapshot-create", "tag": "T", "overwrite": false}
    {"ok": true}
    {"op": "snapshot-apply", "tag": "nope"}
    {"ok": false, "error": "vtpm.qcow2: no snapshot with tag 'nope'"}

Ops: ``ping``, ``info``, ``snapshot-list``, ``snapshot-create``, ``snapshot-apply``,
``snapshot-delete`` and ``capture`` (the committed state and its snapshots, read in one step
between two FUSE requests: what backups and exports of a held image use; ``"tag"`` reads one
snapshot's state instead, ``"snapshots": false`` leaves the snapshots out).
The daemon (:mod:`vtpm_qcow.export.daemon`) serves it next to its FUSE mount;
every op runs serialized with the file system's requests, so snapshots are safe while swtpm
runs.  :class:`ControlClient` is the synchronous client used by the CLI, backups and the
QMP alignment run from the command (:mod:`vtpm_qcow.vm.orchestrate`).

The default socket of an image lives in :func:`runtime_dir` and is named after the image's
real path (:func:`socket_path_for`), so ``ControlClient.for_image(path)`` finds it.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from ..errors import HANDLED, RequestError, StoreError
from ..state.capture import StateCapture, capture_store, from_wire, to_wire
from ..state.store import check_tag

if TYPE_CHECKING:
    from .fuse import StoreFS

log = logging.getLogger(__name__)

#: Longest request line accepted (bounds memory on garbage input).
MAX_LINE = 1 << 20
#: Longest reply line a client accepts (a capture carries base64 layouts of every snapshot).
MAX_REPLY = 256 << 20
#: Environment variable that overrides :func:`runtime_dir` (tests, unprivileged users).
RUNTIME_DIR_ENV = "VTPM_QCOW_RUNTIME_DIR"
OPS = (
    "ping",
    "info",
    "snapshot-list",
    "snapshot-create",
    "snapshot-apply",
    "snapshot-delete",
    "capture",
)

Reply = dict[str, Any]
Handler = Callable[[dict[str, Any]], Awaitable[Reply]]


def runtime_dir() -> Path:
    """Where daemons put control sockets and pid files.

    ``$VTPM_QCOW_RUNTIME_DIR``, else ``/run/vtpm-qcow`` for root, else
    ``$XDG_RUNTIME_DIR/vtpm-qcow``, else ``/tmp/vtpm-qcow-UID``.
    """
    override = os.environ.get(RUNTIME_DIR_ENV)
    if override:
        return Path(override)
    if os.getuid() == 0:
        return Path("/run/vtpm-qcow")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return Path(xdg) / "vtpm-qcow" if xdg else Path(f"/tmp/vtpm-qcow-{os.getuid()}")


def image_key(image: str | os.PathLike[str]) -> str:
    """A short file name stem naming ``image`` by its real path."""
    real = os.path.realpath(image)
    digest = hashlib.sha256(os.fsencode(real)).hexdigest()[:16]
    return f"{os.path.basename(real)[:40]}-{digest}"


def socket_path_for(image: str | os.PathLike[str]) -> Path:
    """The default control socket of ``image``'s daemon."""
    return runtime_dir() / f"{image_key(image)}.sock"


def pid_path_for(image: str | os.PathLike[str]) -> Path:
    """The default pid file of ``image``'s daemon."""
    return runtime_dir() / f"{image_key(image)}.pid"


def to_json(value: Any) -> Any:
    """``value`` with dataclasses, enums, bytes and paths turned into JSON types."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_json(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, Enum):
        return to_json(value.value)
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def _tag(request: dict[str, Any]) -> str:
    tag = request.get("tag")
    if not isinstance(tag, str) or not tag:
        raise RequestError(f"op {request.get('op')!r} needs a non-empty string 'tag'")
    try:
        check_tag(tag, "tag")
    except StoreError as err:
        raise RequestError(str(err)) from None
    return tag


# Section: server


class ControlServer:
    """Serves the control protocol for a mounted store.

    :param handlers: one coroutine per op taking the request and returning the reply's
        fields (``ok`` is added); raising :class:`VtpmQcowError`, :class:`Qcow2Error` or
        :class:`RequestError` gives ``{"ok": false, "error": ...}``.
    """

    def __init__(self, path: str | os.PathLike[str], handlers: dict[str, Handler]) -> None:
        self.path = Path(path)
        self.handlers = handlers
        self.listener: trio.SocketListener | None = None

    async def bind(self) -> None:
        """Create the socket (replacing a stale one left by a killed daemon)."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _remove_stale_socket(self.path)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(os.fspath(self.path))
            os.chmod(self.path, 0o600)
            sock.listen(16)
        except OSError as err:
            sock.close()
            raise StoreError(
                f"cannot listen: {err.strerror}", path=self.path, errno=err.errno
            ) from err
        self.listener = trio.SocketListener(sock)

    async def serve(self) -> None:
        """Accept clients until cancelled (call :meth:`bind` first)."""
        assert self.listener is not None, "bind() first"
        async with self.listener, trio.open_nursery() as nursery:
            while True:
                stream = await self.listener.accept()
                nursery.start_soon(self._client, stream)

    def close(self) -> None:
        """Remove the socket file."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    async def _client(self, stream: trio.SocketStream) -> None:
        buffer = b""
        async with stream:
            try:
                while True:
                    while b"\n" not in buffer:
                        if len(buffer) > MAX_LINE:
                            await _send(stream, {"ok": False, "error": "request line too long"})
                            return
                        chunk = await stream.receive_some(65536)
                        if not chunk:
                            return
                        buffer += chunk
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        await _send(stream, await self.handle(line))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

    async def handle(self, line: bytes) -> Reply:
        """The reply to one request line."""
        op = None
        try:
            try:
                request = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise RequestError(f"request is not JSON: {err}") from err
            if not isinstance(request, dict):
                raise RequestError("request is not a JSON object")
            op = request.get("op")
            handler = self.handlers.get(op) if isinstance(op, str) else None
            if handler is None:
                raise RequestError(f"unknown op {op!r} (known: {', '.join(self.handlers)})")
            return {"ok": True, **to_json(await handler(request))}
        except HANDLED as err:
            return {"ok": False, "error": str(err)}
        except Exception as err:  # a control client must get an answer, never a hang
            log.exception("control op %r failed", op)
            return {"ok": False, "error": f"internal error in {op}: {err}"}


async def _send(stream: trio.SocketStream, reply: Reply) -> None:
    await stream.send_all(json.dumps(reply).encode() + b"\n")


def _remove_stale_socket(path: Path) -> None:
    """Unlink ``path`` if it is a socket nobody listens on; refuse if a daemon answers."""
    if not path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(os.fspath(path))
    except OSError as err:
        if err.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
            raise StoreError(
                f"cannot check existing socket: {err.strerror}", path=path, errno=err.errno
            ) from err
        path.unlink(missing_ok=True)
    else:
        raise StoreError("another daemon already serves this control socket", path=path)
    finally:
        probe.close()


# Section: client


class ControlClient:
    """Synchronous client of a daemon's control socket.

    Each method sends one request and returns the reply's fields; a refusal or a dead
    daemon raises :class:`StoreError` with the daemon's one-line message.
    """

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 60.0) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buffer = b""

    @classmethod
    def for_image(cls, image: str | os.PathLike[str], *, timeout: float = 60.0) -> ControlClient:
        """The client of the daemon serving ``image`` on its default socket."""
        return cls(socket_path_for(image), timeout=timeout)

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(os.fspath(self.path))
            except OSError as err:
                sock.close()
                raise StoreError(
                    f"no vtpm-qcow daemon answers: {err.strerror or err}",
                    path=self.path,
                    errno=err.errno,
                ) from err
            self._sock = sock
        return self._sock

    def request(self, op: str, **args: Any) -> Reply:
        """Send ``op`` with ``args``; the reply without ``ok`` (StoreError if refused)."""
        sock = self._connect()
        try:
            sock.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
            while b"\n" not in self._buffer:
                if len(self._buffer) > MAX_REPLY:
                    raise StoreError(f"reply to {op} too long", path=self.path)
                chunk = sock.recv(65536)
                if not chunk:
                    raise StoreError(f"daemon closed the connection during {op}", path=self.path)
                self._buffer += chunk
        except OSError as err:
            self.close()
            raise StoreError(
                f"{op} failed: {err.strerror or err}", path=self.path, errno=err.errno
            ) from err
        except StoreError:
            self.close()
            raise
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            reply = json.loads(line)
        except json.JSONDecodeError as err:
            raise StoreError(f"reply to {op} is not JSON", path=self.path) from err
        if not isinstance(reply, dict) or not reply.get("ok"):
            error = reply.get("error") if isinstance(reply, dict) else None
            raise StoreError(str(error or f"{self.path}: {op} failed"))
        reply.pop("ok")
        return reply

    def ping(self) -> bool:
        """True if the daemon answers."""
        self.request("ping")
        return True

    def info(self) -> Reply:
        """Image, mount point, view, pid, sections and counters of the daemon."""
        return self.request("info")

    def snapshot_list(self) -> list[dict[str, Any]]:
        """The store's snapshots (tag, date, section digests)."""
        snapshots: list[dict[str, Any]] = self.request("snapshot-list")["snapshots"]
        return snapshots

    def snapshot_create(self, tag: str, *, overwrite: bool = False) -> Reply:
        """Snapshot the committed state as ``tag``."""
        return self.request("snapshot-create", tag=tag, overwrite=overwrite)

    def snapshot_apply(self, tag: str) -> Reply:
        """Revert the mounted store to ``tag`` (readers see it at once)."""
        return self.request("snapshot-apply", tag=tag)

    def snapshot_delete(self, tag: str) -> Reply:
        """Delete snapshot ``tag``."""
        return self.request("snapshot-delete", tag=tag)

    def capture(self, *, tag: str | None = None, snapshots: bool = True) -> StateCapture:
        """The committed state (or snapshot ``tag``'s) and the snapshots, read atomically."""
        args: dict[str, Any] = {"snapshots": snapshots}
        if tag is not None:
            args["tag"] = tag
        return from_wire(self.request("capture", **args))

    def close(self) -> None:
        """Close the connection (the next request reconnects)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self._buffer = b""

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def daemon_answers(client: ControlClient) -> bool:
    """True if a vtpm-qcow daemon answers on ``client``'s socket."""
    try:
        return client.ping()
    except StoreError:
        client.close()
        return False


def held_image_error(
    image: str | os.PathLike[str], what: str, *, control: str | os.PathLike[str] | None = None
) -> StoreError:
    """The one-line error for ``what`` on an image another process holds: says who holds it.

    A vtpm-qcow mount daemon answering for the image is named as such (stop it with
    ``vtpm-qcow umount``); otherwise QEMU (or qemu-storage-daemon, qemu-img) holds it.
    """
    client = ControlClient(control) if control else ControlClient.for_image(image)
    with client:
        if daemon_answers(client):
            return StoreError(
                f"held by a vtpm-qcow mount daemon ({client.path}); "
                f"{what} needs it stopped first (vtpm-qcow umount)",
                path=os.fspath(image),
            )
    return StoreError(
        f"locked by another process (QEMU, qemu-storage-daemon?) and no "
        f"vtpm-qcow mount daemon answers for it; stop that process before {what}",
        path=os.fspath(image),
    )


# Section: the ops of a mounted store


def store_handlers(fs: StoreFS, describe: Callable[[], Reply]) -> dict[str, Handler]:
    """The op table for :class:`ControlServer` over a mounted :class:`StoreFS` ``fs``.

    ``describe`` adds the daemon's own fields (image, mount point, pid) to ``info``.
    """
    store = fs.store

    async def ping(request: dict[str, Any]) -> Reply:
        return {}

    async def info(request: dict[str, Any]) -> Reply:
        def collect() -> Reply:
            return {
                "generation": store.generation,
                "linear_size": store.linear_size,
                "sections": store.sections(),
            }

        return {**describe(), **fs.status(), **fs.run(collect)}

    async def snapshot_list(request: dict[str, Any]) -> Reply:
        return {"snapshots": fs.run(store.snapshots)}

    async def snapshot_create(request: dict[str, Any]) -> Reply:
        overwrite = request.get("overwrite", False)
        if not isinstance(overwrite, bool):
            raise RequestError("'overwrite' must be true or false")
        tag = _tag(request)
        fs.run(store.create_snapshot, tag, overwrite=overwrite)
        return {}

    async def snapshot_apply(request: dict[str, Any]) -> Reply:
        await fs.apply_snapshot(_tag(request))
        return {}

    async def snapshot_delete(request: dict[str, Any]) -> Reply:
        fs.run(store.delete_snapshot, _tag(request))
        return {}

    async def capture(request: dict[str, Any]) -> Reply:
        tag = _tag(request) if request.get("tag") is not None else None
        snapshots = request.get("snapshots", True)
        if not isinstance(snapshots, bool):
            raise RequestError("'snapshots' must be true or false")
        taken = fs.run(capture_store, store, tag=tag, snapshots=snapshots)
        return to_wire(taken)

    return {
        "ping": ping,
        "info": info,
        "snapshot-list": snapshot_list,
        "snapshot-create": snapshot_create,
        "snapshot-apply": snapshot_apply,
        "snapshot-delete": snapshot_delete,
        "capture": capture,
    }

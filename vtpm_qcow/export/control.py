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
``snapshot-create`` with ``"layout"`` (a base64 linear file) files that state under the tag
and leaves the committed state as it is (the state of a VM's pause, tagged later).
The daemon (:mod:`vtpm_qcow.export.daemon`) serves it next to its FUSE mount
(:mod:`vtpm_qcow.export.control_server`); every op runs between two of the file system's
requests, so snapshots are safe while swtpm runs.  :class:`ControlClient` is the
synchronous client used by the CLI, backups and the QMP alignment run from the command
(:mod:`vtpm_qcow.vm.orchestrate`).  This module is the protocol and the client only: it
imports neither trio nor the file system.

The default socket of an image lives in :func:`runtime_dir` and is named after the image's
real path (:func:`socket_path_for`), so ``ControlClient.for_image(path)`` finds it.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib
import json
import os
import socket
import struct
from enum import Enum
from pathlib import Path
from typing import Any

from ..errors import RequestError, StoreError
from ..state.capture import StateCapture, from_wire
from ..state.record import Record

#: ``struct ucred`` (pid, uid, gid) of ``SO_PEERCRED``.
_PEERCRED = struct.Struct("3i")

#: Longest request line accepted (bounds memory on garbage input).
MAX_LINE = 1 << 20
#: Longest reply line a client accepts (a capture carries base64 layouts of every snapshot).
MAX_REPLY = 256 << 20
#: Environment variable that overrides :func:`runtime_dir` (tests, unprivileged users).
RUNTIME_DIR_ENV = "VTPM_QCOW_RUNTIME_DIR"

#: A reply's fields.
Reply = dict[str, Any]


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
    digest = _sha256_hex(os.fsencode(real))[:16]
    return f"{os.path.basename(real)[:40]}-{digest}"


def _sha256_hex(data: bytes) -> str:
    """sha256 of ``data`` by the interpreter's own implementation: ``hashlib`` loads and
    initialises OpenSSL (MiBs of a daemon's RSS) for this one short digest."""
    for name in ("_sha2", "_sha256"):  # Python >= 3.12, before
        try:
            return str(importlib.import_module(name).sha256(data).hexdigest())
        except ImportError:
            continue
    import hashlib  # an interpreter built without its own sha256

    return hashlib.sha256(data).hexdigest()


def socket_path_for(image: str | os.PathLike[str]) -> Path:
    """The default control socket of ``image``'s daemon."""
    return runtime_dir() / f"{image_key(image)}.sock"


def pid_path_for(image: str | os.PathLike[str]) -> Path:
    """The default pid file of ``image``'s daemon."""
    return runtime_dir() / f"{image_key(image)}.pid"


def to_json(value: Any) -> Any:
    """``value`` with dataclasses, records, enums, bytes and paths turned into JSON types."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Record):
        return {name: to_json(getattr(value, name)) for name in value.field_names()}
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

    def peer_pid(self) -> int | None:
        """The pid of the process serving the socket (the kernel's ``SO_PEERCRED``), or
        None when it cannot be told."""
        try:
            creds = self._connect().getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size
            )
        except (OSError, StoreError):
            return None
        pid: int = _PEERCRED.unpack(creds)[0]
        return pid or None

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

    def snapshot_create(
        self, tag: str, *, overwrite: bool = False, layout: bytes | None = None
    ) -> Reply:
        """Snapshot the committed state as ``tag`` (or the state ``layout``, a linear
        file, leaving the committed state as it is)."""
        args: dict[str, Any] = {"tag": tag, "overwrite": overwrite}
        if layout is not None:
            args["layout"] = base64.b64encode(layout).decode("ascii")
        return self.request("snapshot-create", **args)

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

    def image_file(self) -> bytes:
        """The served image file, byte for byte, read between two of the daemon's commits."""
        data = self.request("image-file").get("image")
        if not isinstance(data, str):
            raise RequestError("the daemon's answer has no image")
        return base64.b64decode(data)

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
            pid = client.peer_pid()
            who = f"pid {pid}, {client.path}" if pid else str(client.path)
            return StoreError(
                f"held by a vtpm-qcow mount daemon ({who}); "
                f"{what} needs it stopped first (vtpm-qcow umount)",
                path=os.fspath(image),
            )
    return StoreError(
        f"locked by another process (QEMU, qemu-storage-daemon?) and no "
        f"vtpm-qcow mount daemon answers for it; stop that process before {what}",
        path=os.fspath(image),
    )

"""The server side of the control socket (:mod:`vtpm_qcow.export.control`): the mount
daemon's listener and the ops of a mounted store.

Each op's body is synchronous (:meth:`~vtpm_qcow.export.fuse.StoreFS.run`): it runs on the
daemon's trio loop between two FUSE requests, so it never meets a commit half done.
"""

from __future__ import annotations

import base64
import binascii
import errno
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from ..errors import HANDLED, RequestError, StoreError
from ..state.capture import capture_store, to_wire
from ..state.store import check_tag
from .control import MAX_LINE, Reply, to_json

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..state.store import Store
    from .fuse import StoreFS

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[Reply]]


def _tag(request: dict[str, Any]) -> str:
    tag = request.get("tag")
    if not isinstance(tag, str) or not tag:
        raise RequestError(f"op {request.get('op')!r} needs a non-empty string 'tag'")
    try:
        check_tag(tag, "tag")
    except StoreError as err:
        raise RequestError(str(err)) from None
    return tag


class ControlServer:
    """Serves the control protocol for a mounted store.

    :param handlers: one coroutine per op taking the request and returning the reply's
        fields (``ok`` is added); raising an error of :data:`~vtpm_qcow.errors.HANDLED`
        (:class:`RequestError` for a bad request) gives ``{"ok": false, "error": ...}``.
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
                f"cannot listen: {err.strerror or err}", path=self.path, errno=err.errno
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


# Section: the ops of a mounted store


def store_handlers(fs: StoreFS, describe: Callable[[], Reply]) -> dict[str, Handler]:
    """The op table for :class:`ControlServer` over a mounted :class:`StoreFS` ``fs``.

    ``describe`` adds the daemon's own fields (image, mount point, pid) to ``info``.
    """
    store = fs.store

    def image_held() -> None:
        if fs.migrating is not None:
            raise RequestError(f"not now: {fs.migrating}")

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
        image_held()
        return {"snapshots": fs.run(store.snapshots)}

    async def snapshot_create(request: dict[str, Any]) -> Reply:
        overwrite = request.get("overwrite", False)
        if not isinstance(overwrite, bool):
            raise RequestError("'overwrite' must be true or false")
        image_held()
        tag = _tag(request)
        layout = request.get("layout")
        if layout is not None:
            if not isinstance(layout, str):
                raise RequestError("'layout' must be a base64 string")
            try:
                layout = base64.b64decode(layout, validate=True)
            except binascii.Error:
                raise RequestError("'layout' is not valid base64") from None
        fs.run(store.create_snapshot, tag, overwrite=overwrite, layout=layout)
        return {}

    async def snapshot_apply(request: dict[str, Any]) -> Reply:
        image_held()
        await fs.apply_snapshot(_tag(request))
        return {}

    async def snapshot_delete(request: dict[str, Any]) -> Reply:
        image_held()
        fs.run(store.delete_snapshot, _tag(request))
        return {}

    async def capture(request: dict[str, Any]) -> Reply:
        tag = _tag(request) if request.get("tag") is not None else None
        snapshots = request.get("snapshots", True)
        if not isinstance(snapshots, bool):
            raise RequestError("'snapshots' must be true or false")
        image_held()
        taken = fs.run(capture_store, store, tag=tag, snapshots=snapshots)
        return to_wire(taken)

    async def image_file(request: dict[str, Any]) -> Reply:
        # the image file byte for byte, read between two FUSE requests: no commit is
        # half-way (``vtpm-qcow migrate-prepare`` of a served image)
        image_held()
        return {"image": base64.b64encode(fs.run(read_image_file, store)).decode()}

    return {
        "ping": ping,
        "info": info,
        "snapshot-list": snapshot_list,
        "snapshot-create": snapshot_create,
        "snapshot-apply": snapshot_apply,
        "snapshot-delete": snapshot_delete,
        "capture": capture,
        "image-file": image_file,
    }


def read_image_file(store: Store) -> bytes:
    """All bytes of the image file ``store`` has open."""
    fd = store.image.file.fd
    size = os.fstat(fd).st_size
    chunks = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, min(size - offset, 1 << 20), offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)

"""vm_orchestrate.Monitor against a real QEMU: nodes, snapshot jobs, errors, lost connections.

``qemu-img snapshot -l -U`` on the disk files is the oracle for what the jobs did.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from tests.helpers import need
from tests.vm.qemu_fixtures import QemuProcess, create_disk, qemu_vm, run_tool, swtpm_process
from vtpm_qcow.errors import QmpDisconnectedError, QmpError, QmpJobError
from vtpm_qcow.vm import DEFAULT_TIMEOUT
from vtpm_qcow.vm.orchestrate import Monitor

T = TypeVar("T")


def qemu_img_tags(disk: Path) -> dict[str, int]:
    """Tag -> VM state size of ``disk``'s snapshots, according to qemu-img (-U: QEMU holds it)."""
    import json

    out = run_tool(need("qemu-img"), "info", "-U", "--output=json", str(disk)).stdout
    return {s["name"]: int(s["vm-state-size"]) for s in json.loads(out).get("snapshots", [])}


def with_monitor(
    vm: QemuProcess, body: Callable[[Monitor], Awaitable[T]], *, timeout: float = DEFAULT_TIMEOUT
) -> T:
    async def session() -> T:
        monitor = Monitor(str(vm.qmp), timeout=timeout)
        await monitor.connect()
        try:
            return await body(monitor)
        finally:
            await monitor.close()

    return asyncio.run(session())


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[QemuProcess]:
    state = tmp_path / "state"
    state.mkdir()
    disks = [create_disk(tmp_path / "a.qcow2"), create_disk(tmp_path / "b.qcow2")]
    with (
        swtpm_process(f"dir={state}", tmp_path, data_channel=False, flags=None) as swtpm,
        qemu_vm(tmp_path, str(swtpm.ctrl), disks, running=True) as qemu,
    ):
        yield qemu


def test_disk_nodes_and_snapshot_jobs_match_qemu_img(vm: QemuProcess) -> None:
    async def body(monitor: Monitor) -> None:
        assert (await monitor.run_state()).running
        nodes = await monitor.disk_nodes()
        assert [(n.node, n.driver, n.tags) for n in nodes] == [
            ("disk0", "qcow2", frozenset()),
            ("disk1", "qcow2", frozenset()),
        ]
        await monitor.execute("stop")
        await monitor.run_job(
            "snapshot-save", {"tag": "one", "vmstate": "disk0", "devices": ["disk0", "disk1"]}
        )
        assert [n.tags for n in await monitor.disk_nodes()] == [{"one"}, {"one"}]
        assert await monitor.execute("query-jobs") == []  # dismissed
        first, second = (qemu_img_tags(d) for d in vm.disks)
        assert first["one"] > 0 and second == {"one": 0}  # vmstate on the first disk only
        await monitor.run_job("snapshot-delete", {"tag": "one", "devices": ["disk0", "disk1"]})
        assert [n.tags for n in await monitor.disk_nodes()] == [frozenset(), frozenset()]

    with_monitor(vm, body)
    assert all(qemu_img_tags(d) == {} for d in vm.disks)


def test_failed_job_raises_qemus_error_and_is_dismissed(vm: QemuProcess) -> None:
    async def body(monitor: Monitor) -> None:
        with pytest.raises(QmpJobError, match="Snapshot 'nope' does not exist"):
            await monitor.run_job(
                "snapshot-load", {"tag": "nope", "vmstate": "disk0", "devices": ["disk0"]}
            )
        assert await monitor.execute("query-jobs") == []

    with_monitor(vm, body)


def test_hmp_error_text_becomes_qmp_error(vm: QemuProcess) -> None:
    async def body(monitor: Monitor) -> None:
        with pytest.raises(QmpError, match="loadvm nope: Error: Snapshot 'nope' does not exist"):
            await monitor.hmp("loadvm nope")
        assert "no snapshot available" in await monitor.hmp("info snapshots")

    with_monitor(vm, body)


def test_read_only_disk_is_not_a_snapshot_node(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    ro = create_disk(tmp_path / "ro.qcow2")
    with (
        swtpm_process(f"dir={state}", tmp_path, data_channel=False, flags=None) as swtpm,
        qemu_vm(
            tmp_path,
            str(swtpm.ctrl),
            [create_disk(tmp_path / "rw.qcow2")],
            extra=["-drive", f"if=none,id=ro0,file={ro},format=qcow2,readonly=on,node-name=ro"],
        ) as qemu,
    ):

        async def body(monitor: Monitor) -> list[str]:
            return [n.node for n in await monitor.disk_nodes()]

        assert with_monitor(qemu, body) == ["disk0"]


def test_missing_or_wrong_socket_is_one_line_error(tmp_path: Path) -> None:
    async def connect(path: Path) -> None:
        await Monitor(str(path), timeout=2).connect()

    with pytest.raises(QmpError, match="No such file or directory") as caught:
        asyncio.run(connect(tmp_path / "missing.sock"))
    assert "\n" not in str(caught.value)
    (tmp_path / "file").write_text("not a socket")
    with pytest.raises(QmpError, match="not a socket"):
        asyncio.run(connect(tmp_path / "file"))
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(stale))  # bound, never listening: connection refused
    with pytest.raises(QmpError, match="cannot connect"):
        asyncio.run(connect(stale))


def test_silent_server_times_out_instead_of_hanging(tmp_path: Path) -> None:
    path = tmp_path / "silent.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        server.listen(1)  # accepts into the backlog, never greets
        start = time.monotonic()
        with pytest.raises(QmpError, match="no QMP greeting within"):
            asyncio.run(Monitor(str(path), timeout=0.5).connect())
        assert time.monotonic() - start < 30  # bounded, not a performance assertion


def test_qemu_dying_mid_session_is_disconnected_error(vm: QemuProcess) -> None:
    async def body(monitor: Monitor) -> None:
        vm.proc.kill()
        vm.proc.wait()
        with pytest.raises(QmpDisconnectedError, match="outcome unknown"):
            for _ in range(50):  # the reader notices EOF on its next wake-up
                await monitor.execute("query-status")
                await asyncio.sleep(0.05)

    with_monitor(vm, body, timeout=2)


class CuttingProxy:
    """A unix-socket relay to QEMU's monitor that hangs up once ``trigger`` was answered.

    The first connection is cut right after QEMU's reply to the first command containing
    ``trigger`` (the command itself reached QEMU); later connections are relayed untouched.
    """

    def __init__(self, listen: Path, target: Path, trigger: bytes) -> None:
        self.listen, self.target, self.trigger = listen, target, trigger
        self.cut = threading.Event()
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(listen))
        self.server.listen(4)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX)
            upstream.connect(str(self.target))
            armed = threading.Event()
            pair = (client, upstream)
            for args in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(*args, armed, pair), daemon=True).start()

    def _pump(
        self,
        src: socket.socket,
        dst: socket.socket,
        to_qemu: bool,
        armed: threading.Event,
        pair: tuple[socket.socket, socket.socket],
    ) -> None:
        try:
            while data := src.recv(65536):
                if to_qemu and self.trigger in data:
                    armed.set()  # before QEMU can answer
                dst.sendall(data)
                answered = not to_qemu and armed.is_set() and b'"return"' in data
                if answered and not self.cut.is_set():
                    time.sleep(0.05)  # let the client take the reply in, then hang up
                    self.cut.set()
                    for sock in pair:
                        sock.shutdown(socket.SHUT_RDWR)
                    return
        except OSError:
            pass
        for sock in pair:  # one side hung up: end the relay both ways
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.server.close()


def test_job_survives_a_lost_connection_by_its_id(vm: QemuProcess, tmp_path: Path) -> None:
    """The connection drops after snapshot-save was accepted: reconnect, find the job, finish."""
    proxy = CuttingProxy(tmp_path / "proxy.sock", vm.qmp, b"snapshot-save")
    try:

        async def body() -> None:
            monitor = Monitor(str(tmp_path / "proxy.sock"), timeout=5)
            await monitor.connect()
            try:
                job = {"tag": "cut", "vmstate": "disk0", "devices": ["disk0"]}
                await monitor.run_job("snapshot-save", job)
                assert proxy.cut.is_set()  # the connection really was lost meanwhile
                assert await monitor.execute("query-jobs") == []  # found again and dismissed
            finally:
                await monitor.close()

        asyncio.run(body())
    finally:
        proxy.close()
    assert "cut" in qemu_img_tags(vm.disks[0])

"""vtpm_qcow.tpm.qtest_tis: real TPM commands through a real QEMU's TIS device."""

from __future__ import annotations

import contextlib
import hashlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import need
from tests.vm.qemu_fixtures import (
    QemuProcess,
    create_disk,
    qemu_vm,
    run_tool,
    swtpm_process,
    swtpm_tcti,
)
from vtpm_qcow.errors import TpmResponseError, TpmTransportError
from vtpm_qcow.tpm.client import Tpm, sha256
from vtpm_qcow.tpm.qtest_tis import QtestTisTransport

NV_INDEX = 0x01500020
#: QEMU hw/tpm/tpm_tis.h: TPM_TIS_TPM_DID 0x0001, TPM_TIS_TPM_VID = IBM's PCI vendor id.
QEMU_TIS_DID_VID = 0x0001 << 16 | 0x1014


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[QemuProcess]:
    state = tmp_path / "state"
    state.mkdir()
    with (
        swtpm_process(f"dir={state}", tmp_path, data_channel=False, flags=None) as swtpm,
        qemu_vm(tmp_path, str(swtpm.ctrl), [create_disk(tmp_path / "disk.qcow2")]) as qemu,
    ):
        yield qemu


def test_did_vid_is_qemus_tis(vm: QemuProcess) -> None:
    with QtestTisTransport(str(vm.qtest)) as tis:
        assert tis.did_vid() == QEMU_TIS_DID_VID


def test_startup_random_and_pcrs_through_qemu(vm: QemuProcess) -> None:
    with QtestTisTransport(str(vm.qtest)) as tis:
        tpm = Tpm(tis)
        tpm.startup()
        with pytest.raises(TpmResponseError, match="0x100"):
            tpm.startup()  # proves the command really reached the TPM
        assert len(tpm.get_random(32)) == 32
        before = tpm.pcr_read([10])[10]
        tpm.pcr_extend(10, sha256(b"through QEMU"))
        assert tpm.pcr_read([10])[10] == hashlib.sha256(before + sha256(b"through QEMU")).digest()


def test_nv_written_through_qemu_is_in_swtpms_state(tmp_path: Path) -> None:
    """Write NV through QEMU's TIS, quit QEMU, read it with tpm2-tools from the same state."""
    state = tmp_path / "state"
    state.mkdir()
    data = b"written by a guest driver" * 40  # > one FIFO burst of small commands
    with (
        swtpm_process(f"dir={state}", tmp_path, data_channel=False, flags=None) as swtpm,
        qemu_vm(tmp_path, str(swtpm.ctrl), [create_disk(tmp_path / "disk.qcow2")]) as qemu,
        QtestTisTransport(str(qemu.qtest)) as tis,
    ):
        tpm = Tpm(tis)
        tpm.startup()
        tpm.nv_define_space(NV_INDEX, len(data))
        tpm.nv_write(NV_INDEX, data[:512])
        tpm.nv_write(NV_INDEX, data[512:], offset=512)
        assert tpm.nv_read(NV_INDEX, len(data)) == data
    with swtpm_process(f"dir={state}", tmp_path, tcp=True, flags="startup-clear") as swtpm:
        out = tmp_path / "nv.bin"
        run_tool(need("tpm2_nvread"), "-T", swtpm_tcti(swtpm), "-C", "o", "-o", str(out),
                 hex(NV_INDEX))  # fmt: skip
        assert out.read_bytes() == data


def test_qemu_gone_is_a_transport_error(vm: QemuProcess) -> None:
    with QtestTisTransport(str(vm.qtest)) as tis:
        vm.proc.kill()
        vm.proc.wait()
        with pytest.raises(TpmTransportError):
            Tpm(tis).startup()


def test_missing_qtest_socket_is_a_transport_error(tmp_path: Path) -> None:
    with pytest.raises(TpmTransportError, match="cannot connect to qtest socket"):
        QtestTisTransport(str(tmp_path / "nope.sock"))


def test_garbage_from_the_qtest_socket_is_bounded(tmp_path: Path) -> None:
    """Bad input: a peer that streams bytes without a newline gets a typed error, not OOM."""
    path = tmp_path / "garbage.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        server.listen(1)

        def serve() -> None:
            peer, _ = server.accept()
            with peer, contextlib.suppress(OSError):
                for _ in range(64):
                    peer.sendall(b"x" * 4096)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with (
            QtestTisTransport(str(path), timeout=5) as tis,
            pytest.raises(TpmTransportError, match="reply line too long"),
        ):
            tis.did_vid()
        thread.join(10)

"""vtpm_qcow.tpm.client against a real swtpm, cross-checked with tpm2-tools over the swtpm TCTI."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import need
from tests.vm.qemu_fixtures import SwtpmProcess, run_tool, swtpm_process, swtpm_tcti
from vtpm_qcow.errors import TpmResponseError, TpmTransportError, VtpmQcowError
from vtpm_qcow.tpm.client import (
    TPM_RC_INITIALIZE,
    TPM_SU_CLEAR,
    TPM_SU_STATE,
    SwtpmSocketTransport,
    Tpm,
    build_command,
    password_auth,
    sha256,
)

NV_INDEX = 0x01500016


@pytest.fixture
def swtpm_tcp(tmp_path: Path) -> Iterator[SwtpmProcess]:
    """swtpm on TCP ports N/N+1 that needs CMD_INIT (like a real QEMU-less setup)."""
    state = tmp_path / "state"
    state.mkdir()
    with swtpm_process(f"dir={state}", tmp_path, tcp=True, flags=None) as process:
        yield process


def open_tpm(process: SwtpmProcess, *, init: bool = False) -> tuple[SwtpmSocketTransport, Tpm]:
    assert process.server is not None
    transport = SwtpmSocketTransport(process.server, process.ctrl, init=init)
    return transport, Tpm(transport)


def started(process: SwtpmProcess) -> tuple[SwtpmSocketTransport, Tpm]:
    transport, tpm = open_tpm(process, init=True)
    tpm.startup(TPM_SU_CLEAR)
    return transport, tpm


def tpm2(process: SwtpmProcess, *args: str) -> str:
    """Run a tpm2-tools command against ``process`` (our own connection must be closed)."""
    tool = need(f"tpm2_{args[0]}")
    return run_tool(tool, "-T", swtpm_tcti(process), *args[1:]).stdout


def test_command_without_init_fails_with_typed_error(swtpm_tcp: SwtpmProcess) -> None:
    transport, tpm = open_tpm(swtpm_tcp, init=False)
    with transport, pytest.raises(VtpmQcowError):
        # swtpm without CMD_INIT answers with TPM_RC_FAILURE or drops the connection.
        tpm.startup()


def test_startup_twice_reports_rc_in_hex(swtpm_tcp: SwtpmProcess) -> None:
    transport, tpm = started(swtpm_tcp)
    with transport, pytest.raises(TpmResponseError) as caught:
        tpm.startup()
    assert caught.value.rc == TPM_RC_INITIALIZE
    assert str(caught.value) == "TPM2_Startup: response code 0x100"


def test_get_random_returns_requested_length_and_fresh_bytes(swtpm_tcp: SwtpmProcess) -> None:
    transport, tpm = started(swtpm_tcp)
    with transport:
        first, second = tpm.get_random(24), tpm.get_random(24)
    assert len(first) == len(second) == 24
    assert first != second


def test_pcr_extend_follows_the_hash_chain_and_matches_tpm2_pcrread(
    swtpm_tcp: SwtpmProcess,
) -> None:
    transport, tpm = started(swtpm_tcp)
    with transport:
        before = tpm.pcr_read(range(24))
        events = [sha256(b"first"), sha256(b"second")]
        for event in events:
            tpm.pcr_extend(16, event)
        after = tpm.pcr_read()
    expected = before[16]
    for event in events:
        expected = hashlib.sha256(expected + event).digest()
    assert after[16] == expected
    assert {p: v for p, v in after.items() if p != 16} == {
        p: v for p, v in before.items() if p != 16
    }
    listing = tpm2(swtpm_tcp, "pcrread", "sha256:16")
    assert expected.hex().upper() in listing


def test_nv_define_write_read_undefine_cross_checked_with_tpm2_tools(
    swtpm_tcp: SwtpmProcess, tmp_path: Path
) -> None:
    data = b"written through vtpm_qcow.tpm.client"
    transport, tpm = started(swtpm_tcp)
    with transport:
        tpm.nv_define_space(NV_INDEX, 64)
        tpm.nv_write(NV_INDEX, data, offset=3)
        public = tpm.nv_read_public(NV_INDEX)
        assert public.index == NV_INDEX and public.data_size == 64
        assert tpm.nv_read(NV_INDEX, len(data), offset=3) == data
        assert tpm.nv_indices() == [NV_INDEX]
    read_back = tmp_path / "nv.bin"
    tpm2(
        swtpm_tcp,
        "nvread",
        "-C",
        "o",
        "-s",
        str(len(data)),
        "--offset",
        "3",
        "-o",
        str(read_back),
        hex(NV_INDEX),
    )
    assert read_back.read_bytes() == data
    # tpm2-tools writes, we read.
    theirs = tmp_path / "theirs.bin"
    theirs.write_bytes(b"from tpm2_nvwrite")
    tpm2(swtpm_tcp, "nvwrite", "-C", "o", "-i", str(theirs), hex(NV_INDEX))
    transport, tpm = open_tpm(swtpm_tcp)
    with transport:
        assert tpm.nv_read(NV_INDEX, 17, owner=True) == b"from tpm2_nvwrite"
        tpm.nv_undefine_space(NV_INDEX)
        assert tpm.nv_indices() == []
        with pytest.raises(TpmResponseError):
            tpm.nv_read_public(NV_INDEX)
    assert hex(NV_INDEX) not in tpm2(swtpm_tcp, "getcap", "handles-nv-index")


def test_owner_auth_change_is_enforced(swtpm_tcp: SwtpmProcess) -> None:
    transport, tpm = started(swtpm_tcp)
    with transport:
        assert tpm.owner_auth_is(b"")
        tpm.hierarchy_change_auth(b"owner-secret")
        assert tpm.owner_auth_is(b"owner-secret")
        assert not tpm.owner_auth_is(b"")
        with pytest.raises(TpmResponseError, match="TPM2_NV_DefineSpace: response code 0x9a2"):
            tpm.nv_define_space(NV_INDEX, 8)
        tpm.nv_define_space(NV_INDEX, 8, owner_auth=b"owner-secret")
    # tpm2-tools agrees: the new owner password authorizes, the empty one does not.
    tpm2(swtpm_tcp, "nvundefine", "-C", "o", "-P", "owner-secret", hex(NV_INDEX))


def test_shutdown_state_then_startup_state_keeps_pcrs_across_restart(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    with swtpm_process(f"dir={state}", tmp_path, tcp=True, flags=None) as process:
        transport, tpm = started(process)
        with transport:
            # PCRs 0..15 are saved by Shutdown(STATE); 16 (debug) is reset on any Startup.
            tpm.pcr_extend(8, sha256(b"kept"))
            kept = tpm.pcr_read([8])
            assert kept != {8: bytes(32)}
            tpm.shutdown(TPM_SU_STATE)
    assert (state / "tpm2-00.permall").exists()
    with swtpm_process(f"dir={state}", tmp_path, tcp=True, flags=None) as process:
        transport, tpm = open_tpm(process, init=True)
        with transport:
            tpm.startup(TPM_SU_STATE)
            assert tpm.pcr_read([8]) == kept


def test_build_command_layout() -> None:
    command = build_command(0x17B, params=struct.pack(">H", 8))
    assert command == bytes.fromhex("80010000000c0000017b0008")
    auth = password_auth(b"pw")
    # u32 size, TPM_RS_PW, empty nonce, attributes continueSession, hmac "pw"
    assert auth == bytes.fromhex("0000000b400000090000010002") + b"pw"


def test_unreachable_swtpm_is_a_one_line_transport_error(tmp_path: Path) -> None:
    with pytest.raises(TpmTransportError, match="cannot connect"):
        SwtpmSocketTransport(str(tmp_path / "missing.sock"))


def test_swtpm_dying_mid_session_raises_instead_of_hanging(swtpm_tcp: SwtpmProcess) -> None:
    transport, tpm = started(swtpm_tcp)
    swtpm_tcp.proc.kill()
    swtpm_tcp.proc.wait()
    with transport, pytest.raises(TpmTransportError):
        tpm.get_random(8)


def test_unix_socket_transport_without_init(tmp_path: Path) -> None:
    """swtpm on unix sockets with --flags not-need-init: no control channel needed."""
    state = tmp_path / "state"
    state.mkdir()
    with swtpm_process(f"dir={state}", tmp_path) as process:
        assert isinstance(process.server, str)
        with SwtpmSocketTransport(process.server) as transport:
            tpm = Tpm(transport)
            tpm.startup()
            assert len(tpm.get_random(8)) == 8
            with pytest.raises(TpmTransportError, match="no control channel"):
                transport.control(2)

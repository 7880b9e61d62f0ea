"""vtpm_qcow.tpm.swtpm with the real swtpm and swtpm_setup."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.vtpm.swtpm_fixtures import NV_INDEX, need_swtpm, running_swtpm, setup_state, tpm_client
from vtpm_qcow.errors import SwtpmError
from vtpm_qcow.state import linear
from vtpm_qcow.tpm.swtpm import Swtpm, find_tool, run_setup

#: TCG NV index of the RSA EK certificate (swtpm_setup --create-ek-cert writes it).
EK_CERT_RSA_INDEX = 0x01C00002
#: TCG NV index of the platform certificate (--create-platform-cert).
PLATFORM_CERT_INDEX = 0x01C08000


def test_missing_tools_give_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    for tool in ("swtpm", "swtpm_setup"):
        with pytest.raises(SwtpmError, match=f"{tool}: not found on PATH") as info:
            find_tool(tool)
        assert "\n" not in str(info.value)
    with pytest.raises(SwtpmError, match="swtpm: not found"):
        Swtpm.start(f"dir={tmp_path}", tmp_path / "run")


def test_setup_with_certificates_and_state_survives_restart(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    need_swtpm()
    run_setup(str(state), options=["--create-ek-cert", "--create-platform-cert"])
    assert (state / "tpm2-00.permall").stat().st_size > 4096  # certificates are big
    with running_swtpm(f"dir={state}", tmp_path / "run1") as swtpm, tpm_client(swtpm) as tpm:
        indices = tpm.nv_indices()
        assert EK_CERT_RSA_INDEX in indices and PLATFORM_CERT_INDEX in indices
        tpm.nv_define_space(NV_INDEX, 8)
        tpm.nv_write(NV_INDEX, b"persists")
    assert swtpm.proc.returncode == 0  # CMD_SHUTDOWN: a clean exit
    with running_swtpm(f"dir={state}", tmp_path / "run2") as swtpm, tpm_client(swtpm) as tpm:
        assert tpm.nv_read(NV_INDEX, 8) == b"persists"


def test_setup_failure_is_one_line(tmp_path: Path) -> None:
    need_swtpm()
    with pytest.raises(SwtpmError, match=r"swtpm_setup on .* failed") as info:
        run_setup(f"file://{tmp_path}/no/such/dir/state.lin")
    assert "\n" not in str(info.value)


def test_start_failure_reports_swtpm_reason(tmp_path: Path) -> None:
    need_swtpm()
    with pytest.raises(SwtpmError, match="exited early") as info:
        Swtpm.start(f"dir={tmp_path}/missing", tmp_path / "run")
    assert "\n" not in str(info.value)


def test_unix_sockets_pid_file_and_linear_backend(tmp_path: Path) -> None:
    path = tmp_path / "state.lin"
    setup_state(f"file://{path}")
    with Swtpm.start(
        f"backend-uri=file://{path}", tmp_path / "run", server=str(tmp_path / "d.sock")
    ) as swtpm:
        assert int(swtpm.pid_file.read_text().strip()) == swtpm.pid
        swtpm.store_volatile()
        assert linear.read_section(path.read_bytes(), "volatilestate") is not None
        with tpm_client(swtpm) as tpm:
            assert len(tpm.get_random(8)) == 8
    assert swtpm.proc.returncode == 0
    assert swtpm.stop() == 0  # idempotent


def test_stop_falls_back_to_signals_and_reaps(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    need_swtpm()
    swtpm = Swtpm.start(f"dir={state}", tmp_path / "run1")
    try:
        os.unlink(str(swtpm.ctrl))  # CMD_SHUTDOWN cannot reach it any more
        swtpm.stop(timeout=5)
        assert swtpm.stopped_by == "SIGTERM" and swtpm.proc.poll() is not None
    finally:
        swtpm.stop()
    swtpm = Swtpm.start(f"dir={state}", tmp_path / "run2")
    try:
        os.kill(swtpm.pid, signal.SIGSTOP)  # a hung swtpm: only SIGKILL ends it
        assert swtpm.stop(timeout=0.5) == -signal.SIGKILL
        assert swtpm.stopped_by == "SIGKILL"
    finally:
        swtpm.stop()


def test_clean_stop_uses_the_control_channel(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    need_swtpm()
    with Swtpm.start(f"dir={state}", tmp_path / "run") as swtpm:
        pass
    assert swtpm.stopped_by == "CMD_SHUTDOWN" and swtpm.proc.returncode == 0

"""``vtpm-qcow setup`` as root leaves the local CA as its owner has it.

Debian's swtpm-tools make ``/var/lib/swtpm-localca`` ``tss:root 0750`` and libvirt signs EK
certificates there as ``tss``.  Each test builds such a CA of its own (a private
``swtpm_setup.conf`` found through ``XDG_CONFIG_HOME``, as swtpm_setup looks for it, naming a
``swtpm-localca.conf`` with a private state directory owned by ``tss``), runs the real
``vtpm-qcow setup --create-ek-cert`` as root on it, then libvirt's own ``swtpm_setup``
command line as ``tss``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import need, need_root
from tests.vtpm.mount_fixtures import qemu_img_check, raw_sections
from tests.vtpm.test_daemon import assert_one_line_error

CA_USER = "tss"


@dataclass
class LocalCa:
    config_home: Path
    statedir: Path

    def env(self) -> dict[str, str]:
        return {**os.environ, "XDG_CONFIG_HOME": str(self.config_home)}

    def owners(self) -> dict[str, str]:
        """Owner of the directory and of each file in it."""
        out = {".": pwd.getpwuid(self.statedir.stat().st_uid).pw_name}
        for child in self.statedir.iterdir():
            out[child.name] = pwd.getpwuid(child.lstat().st_uid).pw_name
        return out


@pytest.fixture
def local_ca() -> Iterator[LocalCa]:
    """A CA like Debian's, owned by tss, that swtpm_setup finds through XDG_CONFIG_HOME."""
    need_root("the CA belongs to tss; setup runs as root")
    need("swtpm_setup")
    base = Path(tempfile.mkdtemp(prefix="vq-localca-"))
    try:
        base.chmod(0o755)  # tss reads the configuration and reaches the CA
        config_home = base / "config"
        config_home.mkdir(mode=0o755)
        statedir = base / "swtpm-localca"
        statedir.mkdir(mode=0o750)
        shutil.chown(statedir, CA_USER, "root")
        (base / "swtpm-localca.conf").write_text(
            f"statedir = {statedir}\n"
            f"signingkey = {statedir}/signkey.pem\n"
            f"issuercert = {statedir}/issuercert.pem\n"
            f"certserial = {statedir}/certserial\n"
        )
        (config_home / "swtpm_setup.conf").write_text(
            "create_certs_tool = /usr/bin/swtpm_localca\n"
            f"create_certs_tool_config = {base}/swtpm-localca.conf\n"
            "create_certs_tool_options = /etc/swtpm-localca.options\n"
            "active_pcr_banks = sha256\n"
        )
        for path in (config_home / "swtpm_setup.conf", base / "swtpm-localca.conf"):
            path.chmod(0o644)
        yield LocalCa(config_home, statedir)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def vtpm_qcow_env(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [need("vtpm-qcow"), *args], capture_output=True, text=True, env=env, timeout=300
    )


def libvirt_swtpm_setup(ca: LocalCa, state: Path, vmid: str) -> subprocess.CompletedProcess[str]:
    """libvirt 9.0's swtpm_setup command line (shared/reference/libvirt-9.0.md), as tss."""
    state.mkdir(mode=0o700)
    shutil.chown(state, CA_USER, CA_USER)
    entry = pwd.getpwnam(CA_USER)
    return subprocess.run(
        [
            need("swtpm_setup"),
            "--tpm2",
            "--tpm-state",
            str(state),
            "--vmid",
            vmid,
            "--logfile",
            str(state / "setup.log"),
            "--createek",
            "--create-ek-cert",
            "--create-platform-cert",
            "--lock-nvram",
            "--not-overwrite",
        ],
        user=entry.pw_uid,
        group=entry.pw_gid,
        extra_groups=[],
        env={**ca.env(), "HOME": "/nonexistent"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_setup_as_root_signs_as_the_ca_owner_and_libvirt_still_can(
    local_ca: LocalCa, tmp_path: Path
) -> None:
    image = tmp_path / "vtpm.qcow2"
    done = vtpm_qcow_env(
        local_ca.env(),
        "setup",
        "--create",
        str(image),
        "--create-ek-cert",
        "--create-platform-cert",
    )
    assert done.returncode == 0, done.stderr
    assert "permall" in raw_sections(image)
    qemu_img_check(image)
    owners = local_ca.owners()
    # the CA was made by this very run (keys, certificate, serial, lock), all as tss
    assert {"signkey.pem", "issuercert.pem", "certserial", ".lock.swtpm-localca"} <= set(owners)
    assert set(owners.values()) == {CA_USER}, owners
    serial = (local_ca.statedir / "certserial").read_text()

    # libvirt's manufacturing, as tss, on the same CA
    state = local_ca.statedir.parent / "libvirt-state"  # where tss may go
    try:
        lv = libvirt_swtpm_setup(local_ca, state, "vm:00000000-0000-0000-0000-000000000001")
        log = (state / "setup.log").read_text(errors="replace") if state.exists() else ""
        assert lv.returncode == 0, lv.stdout + lv.stderr + log
        assert (state / "tpm2-00.permall").exists()
    finally:
        shutil.rmtree(state, ignore_errors=True)
    assert (local_ca.statedir / "certserial").read_text() != serial  # it signed too
    assert set(local_ca.owners().values()) == {CA_USER}


def test_a_ca_spoilt_by_an_earlier_root_run_is_refused_with_the_repair(
    local_ca: LocalCa, tmp_path: Path
) -> None:
    (local_ca.statedir / ".lock.swtpm-localca").touch()  # root's, as older versions left it
    image = tmp_path / "vtpm.qcow2"
    done = vtpm_qcow_env(
        local_ca.env(), "--quiet", "setup", "--create", str(image), "--create-ek-cert"
    )
    assert_one_line_error(done, str(local_ca.statedir), ".lock.swtpm-localca", "chown -R tss")
    assert not image.exists()
    assert sorted(p.name for p in local_ca.statedir.iterdir()) == [".lock.swtpm-localca"]


def test_ca_dir_option_uses_a_ca_of_our_own(local_ca: LocalCa, tmp_path: Path) -> None:
    image = tmp_path / "vtpm.qcow2"
    own = tmp_path / "own-ca"
    done = vtpm_qcow_env(
        local_ca.env(), "setup", "--create", str(image), "--ca-dir", str(own),
        "--create-ek-cert", "--create-platform-cert",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert {"signkey.pem", "issuercert.pem", "certserial"} <= {p.name for p in own.iterdir()}
    assert list(local_ca.statedir.iterdir()) == []  # the system's CA was not used
    assert "permall" in raw_sections(image)


def test_setup_without_certificates_touches_no_ca(local_ca: LocalCa, tmp_path: Path) -> None:
    image = tmp_path / "vtpm.qcow2"
    done = vtpm_qcow_env(local_ca.env(), "setup", "--create", str(image))
    assert done.returncode == 0, done.stderr
    assert list(local_ca.statedir.iterdir()) == []

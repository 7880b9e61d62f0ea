"""``vtpm-qcow libvirt install|enable|status|disable`` and the hook, with a real libvirtd.

A libvirtd of the tests' own starts with the hook installed (libvirtd discovers hooks at
start).  A TCG domain with an emulator TPM (libvirt's own swtpm, as ``tss``) is enabled:
its TPM is manufactured into a vTPM image, which the hook mounts at libvirt's state
directory for each start and releases at each stop, following the domain's snapshots in
between through libvirt's API.  The guest's TPM is driven through qtest.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import need
from tests.libvirt.conftest import (
    PREFIX,
    Libvirtd,
    domain_xml,
    guest_side,
    guest_tpm,
    private_libvirtd,
)
from tests.vm.scenario import permall, snapshot_tags
from tests.vtpm.mount_fixtures import NV_INDEX, qemu_img_check, vtpm_qcow
from vtpm_qcow.libvirt.offline import RECORD_DIR
from vtpm_qcow.tpm.client import Tpm

EMULATOR_TPM = "<tpm model='tpm-tis'><backend type='emulator' version='2.0'/></tpm>"
UUID = "0d9a7c64-3f8e-4b52-a1c7-5e2f9b8d6a10"
UUID_DISABLE = "7b0e3d21-96c4-4f0a-8e55-3c1d2b4a5f60"
UUID_MOVED = "3e8f1a90-2b7c-4d6e-9f01-a2b3c4d5e6f7"
UUID_OFFLINE = "9c2d4e6f-8a1b-4c3d-9e5f-6a7b8c9d0e1f"
UUID_RESTART = "c4a1e2b3-5d6f-4a7b-8c9d-0e1f2a3b4c5d"
UUIDS = (UUID, UUID_DISABLE, UUID_MOVED, UUID_OFFLINE, UUID_RESTART)


@pytest.fixture(scope="module")
def hooked() -> Iterator[Libvirtd]:
    """A private libvirtd started after ``vtpm-qcow libvirt install`` put the hook in place."""

    def install(base: Path) -> None:
        done = vtpm_qcow("libvirt", "install", "--hooks-dir", str(base / "etc" / "hooks"))
        assert "installed:" in done.stdout and "restart" in done.stdout
        again = vtpm_qcow("libvirt", "install", "--hooks-dir", str(base / "etc" / "hooks"))
        assert again.stdout.startswith("already installed:")

    try:
        with private_libvirtd(install) as daemon:
            yield daemon
    finally:
        for uuid in UUIDS:  # what the hook recorded at each release
            (RECORD_DIR / f"{uuid}.json").unlink(missing_ok=True)


def emulator_domain(lv: Libvirtd, label: str, uuid: str) -> tuple[str, Path, Path, Path]:
    """A domain with a 64 MiB qcow2 disk, an emulator TPM and a qtest socket: (name, the
    vTPM image path to enable it with, the disk, the qtest socket)."""
    work = lv.base / "vtpm"
    work.mkdir(mode=0o755, exist_ok=True)
    image, disk = work / f"{label}-tpm.qcow2", work / f"{label}-disk.qcow2"
    subprocess.run([need("qemu-img"), "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    qtest = guest_side(lv) / f"{label}.qtest"
    xml = domain_xml(PREFIX + label, EMULATOR_TPM, uuid=uuid, disk=disk, qtest=qtest)
    return lv.define(xml), image, disk, qtest


def wait_for(condition: object, what: str, lv: Libvirtd, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            logs = "\n".join(
                f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}"
                for p in (lv.base / "log" / "qemu").glob("*vtpm-qcow*.log")
            )
            raise AssertionError(f"timed out waiting for {what}\n{logs}{lv.log_tail()}")
        time.sleep(0.1)


def test_enable_start_snapshot_revert_delete_undefine(hooked: Libvirtd) -> None:
    lv = hooked
    name, image, disk, qtest = emulator_domain(lv, "hooked", UUID)

    enabled = vtpm_qcow(
        "libvirt", "enable", name, "--image", str(image), "--connect", lv.uri,
        "--hooks-dir", str(lv.base / "etc" / "hooks"),
    )  # fmt: skip
    assert "manufactured a TPM" in enabled.stdout and "enabled:" in enabled.stdout
    assert "vtpm-qcow" in lv.virsh("dumpxml", name).stdout  # the opt-in in <metadata>
    manufactured = permall(image)
    assert manufactured

    lv.virsh("start", name)
    state_dir = lv.base / "lib" / "swtpm" / UUID / "tpm2"
    tpm = guest_tpm(qtest)
    try:
        tpm.startup()
        tpm.nv_define_space(NV_INDEX, 8)
        tpm.nv_write(NV_INDEX, b"before-1")
    finally:
        tpm.transport.close()
    assert permall(image) != manufactured  # libvirt's swtpm wrote through the image
    # qtest's <qemu:commandline> taints it (custom-argv, test only); nothing of ours does
    assert "custom-monitor" not in lv.log.read_text(errors="replace")
    wait_for(lambda: "following domain" in _follow_log(lv, name), "the follower", lv)

    lv.virsh("snapshot-create-as", name, "s1")
    tpm = guest_tpm(qtest)
    try:
        tpm.nv_write(NV_INDEX, b"after--1")
    finally:
        tpm.transport.close()
    wait_for(lambda: snapshot_tags(image) == ["s1"], "vTPM snapshot s1", lv)
    proof = vtpm_qcow("vm", "verify", "--disk", str(disk), str(image), "-U", check=False)
    assert proof.returncode == 0, proof.stdout + proof.stderr
    status = vtpm_qcow("libvirt", "status", "--connect", lv.uri, check=False)
    assert status.returncode == 0 and "running" in status.stdout, status.stdout

    # a revert of a running domain: libvirt kills QEMU, the hook releases and mounts
    # again, and the new QEMU's -loadvm pushes s1's TPM state into the image
    qtest.unlink(missing_ok=True)
    lv.virsh("snapshot-revert", name, "s1")
    tpm = guest_tpm(qtest)
    try:
        assert tpm.nv_read(NV_INDEX, 8) == b"before-1"
    finally:
        tpm.transport.close()
    assert permall(image) == permall(image, "s1")
    wait_for(lambda: _follow_log(lv, name).count("following domain") >= 2, "a new follower", lv)

    lv.virsh("snapshot-delete", name, "s1")
    wait_for(lambda: snapshot_tags(image) == [], "vTPM snapshot s1 to go", lv)

    lv.virsh("destroy", name)
    # released: nothing holds the image, nothing is mounted at the state directory
    assert vtpm_qcow("wait", "--timeout", "20", str(image)).returncode == 0
    mounted = subprocess.run(
        lv.in_namespace("findmnt", "-n", str(state_dir).replace(str(lv.base / "lib"),
                                                                 "/var/lib/libvirt")),
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert mounted.stdout.strip() == "", mounted.stdout
    qemu_img_check(image)

    # undefine removes libvirt's TPM state directory: the image and its state stay
    before = permall(image)
    lv.virsh("undefine", name, "--tpm")
    lv.defined.remove(name)
    assert permall(image) == before and before is not None
    text = _follow_log(lv, name)
    assert "created: vTPM snapshot 's1'" in text and "from its vmstate" in text, text
    assert "deleted: vTPM snapshot 's1' (disk snapshot deleted)" in text, text


def _follow_log(lv: Libvirtd, name: str) -> str:
    path = lv.base / "log" / "qemu" / f"{name}-vtpm-qcow-follow.log"
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def test_enable_refuses_a_running_domain_or_one_without_an_emulator_tpm(hooked: Libvirtd) -> None:
    lv = hooked
    name = lv.define(domain_xml(PREFIX + "notpm", ""))
    done = vtpm_qcow(
        "libvirt", "enable", name, "--image", str(lv.base / "x.qcow2"), "--connect", lv.uri,
        check=False,
    )  # fmt: skip
    assert done.returncode == 1 and "no <tpm>" in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1
    assert not (lv.base / "x.qcow2").exists()
    inside = vtpm_qcow(
        "libvirt", "enable", name, "--image", "/var/lib/libvirt/swtpm/x.qcow2",
        "--connect", lv.uri, check=False,
    )  # fmt: skip
    assert inside.returncode == 1 and "undefine" in inside.stderr, inside.stderr


def test_disable_gives_the_state_back_as_a_plain_directory(hooked: Libvirtd) -> None:
    lv = hooked
    uuid = UUID_DISABLE
    name = lv.define(domain_xml(PREFIX + "disable", EMULATOR_TPM, uuid=uuid))
    image = lv.base / "vtpm-disable.qcow2"
    vtpm_qcow("libvirt", "enable", name, "--image", str(image), "--connect", lv.uri)
    # in libvirtd's namespace: its /var/lib/libvirt is the tests' private one
    done = subprocess.run(
        lv.in_namespace(need("vtpm-qcow"), "libvirt", "disable", name, "--connect", lv.uri),
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0 and "disabled:" in done.stdout, done.stderr
    plain = lv.base / "lib" / "swtpm" / uuid / "tpm2"
    assert (plain / "tpm2-00.permall").read_bytes() == permall(image)
    assert plain.stat().st_uid == plain.parent.stat().st_uid != 0  # tss's, as libvirt makes it
    assert "vtpm-qcow" not in lv.virsh("dumpxml", name).stdout
    status = vtpm_qcow("libvirt", "status", name, "--connect", lv.uri, check=False)
    assert "not enabled" in status.stdout


def test_enable_moves_libvirts_own_state_into_the_image(hooked: Libvirtd) -> None:
    """A domain that ran with libvirt's plain state: enable imports it (the EK stays the
    same), keeps the directory beside, and the next start runs on the image."""
    lv = hooked
    uuid = UUID_MOVED
    qtest = guest_side(lv) / "moved.qtest"
    name = lv.define(domain_xml(PREFIX + "moved", EMULATOR_TPM, uuid=uuid, qtest=qtest))
    lv.virsh("start", name)  # libvirt's swtpm_setup manufactures the plain state
    tpm = guest_tpm(qtest)
    try:
        tpm.startup()
        tpm.nv_define_space(NV_INDEX, 8)
        tpm.nv_write(NV_INDEX, b"plain-st")
    finally:
        tpm.transport.close()
    lv.virsh("destroy", name)
    plain = lv.base / "lib" / "swtpm" / uuid / "tpm2"
    plain_permall = (plain / "tpm2-00.permall").read_bytes()
    image = lv.base / "vtpm-moved.qcow2"
    done = subprocess.run(
        lv.in_namespace(need("vtpm-qcow"), "libvirt", "enable", name, "--image", str(image),
                        "--connect", lv.uri),
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "moved libvirt's TPM state" in done.stdout and "kept" in done.stdout, done.stdout
    assert permall(image) == plain_permall
    assert (plain.with_name("tpm2.before-vtpm-qcow") / "tpm2-00.permall").exists()
    qtest.unlink(missing_ok=True)
    lv.virsh("start", name)
    tpm = guest_tpm(qtest)
    try:
        tpm.startup()  # a cold boot
        assert tpm.nv_read(NV_INDEX, 8) == b"plain-st"
        tpm.nv_write(NV_INDEX, b"in-image")
    finally:
        tpm.transport.close()
    lv.virsh("destroy", name)
    assert vtpm_qcow("wait", "--timeout", "20", str(image)).returncode == 0
    assert permall(image) != plain_permall  # the write went to the image


def _cold_boot(lv: Libvirtd, name: str, qtest: Path) -> Tpm:
    qtest.unlink(missing_ok=True)
    lv.virsh("start", name)
    tpm = guest_tpm(qtest)
    tpm.startup()
    return tpm


def test_snapshots_of_the_shut_off_domain_are_followed_at_the_next_start(
    hooked: Libvirtd,
) -> None:
    """libvirt snapshots a shut-off domain with qemu-img on its disks; the hook files,
    deletes and reverts the vTPM image's snapshots to match before the next start."""
    lv = hooked
    uuid = UUID_OFFLINE
    name, image, _disk, qtest = emulator_domain(lv, "offline", uuid)
    try:
        vtpm_qcow("libvirt", "enable", name, "--image", str(image), "--connect", lv.uri)
        tpm = _cold_boot(lv, name, qtest)
        try:
            tpm.nv_define_space(NV_INDEX, 8)
            tpm.nv_write(NV_INDEX, b"run-1...")
        finally:
            tpm.transport.close()
        lv.virsh("destroy", name)
        at_shutdown = permall(image)

        lv.virsh("snapshot-create-as", name, "off1")  # shut off: qemu-img snapshot -c
        assert snapshot_tags(image) == []  # nobody followed it yet
        tpm = _cold_boot(lv, name, qtest)  # the hook files it before swtpm starts
        try:
            assert snapshot_tags(image) == ["off1"]
            assert permall(image, "off1") == at_shutdown
            tpm.nv_write(NV_INDEX, b"run-2...")
        finally:
            tpm.transport.close()
        lv.virsh("destroy", name)
        at_shutdown_2 = permall(image)
        lv.virsh("snapshot-create-as", name, "off2")
        tpm = _cold_boot(lv, name, qtest)
        tpm.transport.close()
        assert snapshot_tags(image) == ["off1", "off2"]
        assert permall(image, "off2") == at_shutdown_2 != permall(image, "off1")
        lv.virsh("destroy", name)

        lv.virsh("snapshot-revert", name, "off1")  # shut off: qemu-img snapshot -a
        tpm = _cold_boot(lv, name, qtest)  # the TPM starts where the disks do
        hook_log = (lv.base / "log" / "qemu" / f"{name}-vtpm-qcow-hook.log").read_text()
        try:
            assert tpm.nv_read(NV_INDEX, 8) == b"run-1...", hook_log
        finally:
            tpm.transport.close()
        lv.virsh("destroy", name)

        lv.virsh("snapshot-delete", name, "off1")
        tpm = _cold_boot(lv, name, qtest)
        tpm.transport.close()
        assert snapshot_tags(image) == ["off2"]
        lv.virsh("destroy", name)
        assert vtpm_qcow("wait", "--timeout", "20", str(image)).returncode == 0
        qemu_img_check(image)
    finally:
        lv.virsh("destroy", name, check=False)


def test_the_follower_survives_a_libvirtd_restart(hooked: Libvirtd) -> None:
    """libvirtd restarts while the domain runs: the follower reconnects (and the hook's
    reconnect call finds it running), so later snapshots are still followed."""
    lv = hooked
    uuid = UUID_RESTART
    name, image, _disk, qtest = emulator_domain(lv, "restart", uuid)
    vtpm_qcow("libvirt", "enable", name, "--image", str(image), "--connect", lv.uri)
    tpm = _cold_boot(lv, name, qtest)
    tpm.transport.close()
    wait_for(lambda: "following domain" in _follow_log(lv, name), "the follower", lv)
    lv.restart()
    assert lv.state(name) == "running"
    lv.virsh("snapshot-create-as", name, "after-restart")
    wait_for(lambda: snapshot_tags(image) == ["after-restart"], "the snapshot to be followed", lv)
    text = _follow_log(lv, name)
    assert "reconnecting" in text or "connection lost" in text, text
    assert _follow_log(lv, name).count("following domain") == 1  # the same follower
    lv.virsh("destroy", name)

"""libvirt's external TPM backend served by ``vtpm-qcow serve``.

A real libvirtd (tests/libvirt/conftest.py) starts a TCG domain whose ``<tpm>`` has
``<backend type='external'>`` on serve's control socket.  QEMU runs as ``libvirt-qemu``:
serve gives it the socket (``--socket-owner``).  The test drives the guest's TPM through
QEMU's TIS device (qtest) and sees the state change in the image.  With
``--keep-serving`` a ``virsh destroy`` ends that swtpm, serve starts the next at once, and
the domain starts again on the same socket with the state it left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import need
from tests.libvirt.conftest import PREFIX, Libvirtd, domain_xml, guest_side, guest_tpm
from tests.vtpm.mount_fixtures import (
    NV_INDEX,
    qemu_img_check,
    raw_sections,
    runtime_dir,  # noqa: F401  (fixture)
    vtpm_qcow,
    wait_gone,
)
from vtpm_qcow.errors import TpmResponseError
from vtpm_qcow.export.control import ControlClient, pid_path_for

pytestmark = pytest.mark.usefixtures("runtime_dir")


def external_tpm(socket: Path) -> str:
    return (
        "<tpm model='tpm-tis'><backend type='external'>"
        f"<source type='unix' mode='connect' path='{socket}'/></backend></tpm>"
    )


@pytest.fixture
def served(lv: Libvirtd) -> Iterator[tuple[Path, Path, int]]:
    """A manufactured image served on a socket QEMU (libvirt-qemu) may use: (image, socket,
    serve's pid).  serve is stopped afterwards."""
    work = lv.base / "vtpm"
    work.mkdir(mode=0o755, exist_ok=True)
    image = work / "ext.qcow2"
    ctrl = work / "ext.sock"
    vtpm_qcow("setup", "--create", str(image))
    vtpm_qcow(
        "serve", str(image), "--ctrl", str(ctrl), "--keep-serving",
        "--socket-owner", "libvirt-qemu", "--socket-group", "libvirt-qemu",
        "--socket-mode", "0660", "--log", str(work / "serve.log"),
    )  # fmt: skip
    pid = int(pid_path_for(image).read_text())
    try:
        yield image, ctrl, pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        assert wait_gone(pid), "serve ignored SIGTERM"
        qemu_img_check(image)
        image.unlink(missing_ok=True)


def swtpm_pid(image: Path) -> int | None:
    with ControlClient.for_image(image) as client:
        pid = client.info()["swtpm_pid"]
    return int(pid) if pid else None


def test_domain_with_external_tpm_starts_changes_the_image_and_restarts(
    lv: Libvirtd, served: tuple[Path, Path, int]
) -> None:
    image, ctrl, serve = served
    qtest = guest_side(lv) / "external.qtest"
    name = lv.define(domain_xml(PREFIX + "external", external_tpm(ctrl), qtest=qtest))
    before = raw_sections(image)["permall"]
    first = swtpm_pid(image)
    lv.virsh("start", name)
    assert lv.state(name) == "running"
    tpm = guest_tpm(qtest)
    try:
        tpm.startup()
        tpm.nv_define_space(NV_INDEX, 8)
        tpm.nv_write(NV_INDEX, b"libvirt!")
    finally:
        tpm.transport.close()
    assert raw_sections(image)["permall"] != before  # the guest's write is in the image

    lv.virsh("destroy", name)
    # QEMU's end closed swtpm's data channel: that swtpm ended, serve started the next
    assert first is not None and wait_gone(first, 10), "swtpm outlived QEMU"
    assert os.path.exists(f"/proc/{serve}")
    # at once, with no wait for the new swtpm: the socket never went away
    qtest.unlink(missing_ok=True)
    lv.virsh("start", name)
    assert lv.state(name) == "running"
    second = swtpm_pid(image)
    assert second not in (None, first)
    tpm = guest_tpm(qtest)
    try:
        tpm.startup()
        assert tpm.nv_read(NV_INDEX, 8) == b"libvirt!"
    finally:
        tpm.transport.close()
    lv.virsh("destroy", name)
    assert second is not None and wait_gone(second, 10)


def test_without_socket_options_qemu_is_refused(lv: Libvirtd) -> None:
    """What issue 12 found: swtpm's socket is root's, QEMU (libvirt-qemu) may not connect."""
    work = lv.base / "vtpm"
    work.mkdir(mode=0o755, exist_ok=True)
    image = work / "plain.qcow2"
    ctrl = work / "plain.sock"
    vtpm_qcow("create", str(image))
    vtpm_qcow("serve", str(image), "--ctrl", str(ctrl))
    pid = int(pid_path_for(image).read_text())
    try:
        name = lv.define(domain_xml(PREFIX + "refused", external_tpm(ctrl)))
        done = lv.virsh("start", name, check=False)
        assert done.returncode != 0
        assert "Permission denied" in done.stderr
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        wait_gone(pid)
        image.unlink(missing_ok=True)


def test_snapshot_revert_of_a_running_domain_reaches_the_next_swtpm(
    lv: Libvirtd, served: tuple[Path, Path, int]
) -> None:
    """libvirt 9.0 reverts a running domain by killing QEMU and starting a new one with
    ``-loadvm`` at once; serve (``--keep-serving``) must have the socket and a swtpm for
    it.  The new QEMU pushes the snapshot's TPM state into that swtpm, which writes it
    through serve into the image: the NV index made after the snapshot is gone."""
    image, ctrl, serve = served
    disk = lv.base / "vtpm" / "revert-disk.qcow2"
    subprocess.run([need("qemu-img"), "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    qtest = guest_side(lv) / "revert.qtest"
    name = lv.define(domain_xml(PREFIX + "revert", external_tpm(ctrl), disk=disk, qtest=qtest))
    try:
        lv.virsh("start", name)
        tpm = guest_tpm(qtest)
        try:
            tpm.startup()
            tpm.nv_define_space(NV_INDEX, 8)
            tpm.nv_write(NV_INDEX, b"before!!")
        finally:
            tpm.transport.close()
        lv.virsh("snapshot-create-as", name, "s1")
        tpm = guest_tpm(qtest)
        try:
            tpm.nv_define_space(NV_INDEX + 1, 8)
        finally:
            tpm.transport.close()
        after_s1 = raw_sections(image)["permall"]
        first = swtpm_pid(image)
        qtest.unlink(missing_ok=True)
        lv.virsh("snapshot-revert", name, "s1")
        assert lv.state(name) == "running"
        assert first is not None and wait_gone(first, 10), "the first swtpm outlived its QEMU"
        assert os.path.exists(f"/proc/{serve}")
        tpm = guest_tpm(qtest)
        try:
            assert tpm.nv_read(NV_INDEX, 8) == b"before!!"
            with pytest.raises(TpmResponseError):
                tpm.nv_read_public(NV_INDEX + 1)
        finally:
            tpm.transport.close()
        assert raw_sections(image)["permall"] != after_s1  # the reverted state, in the image
        lv.virsh("destroy", name)
    finally:
        lv.virsh("destroy", name, check=False)
        lv.virsh("undefine", name, "--snapshots-metadata", check=False)
        disk.unlink(missing_ok=True)

"""``vtpm-qcow libvirt follow``: a domain's snapshots followed through libvirt's own API.

A real libvirtd runs a TCG domain with a qcow2 disk and an external TPM served by
``vtpm-qcow serve``; the test drives the guest's TPM through qtest.  ``virsh
snapshot-create-as`` on the running domain (libvirt 9.0: stop, HMP savevm, cont) must give
the vTPM image the same tag holding the TPM state QEMU saved in the vmstate (checked by
``vtpm-qcow vm verify``, and by the later state being different), ``snapshot-delete``
removes it, and the follower ends with the domain.  No QMP monitor of ours is involved.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import need
from tests.libvirt.conftest import PREFIX, Libvirtd, domain_xml, guest_side, guest_tpm
from tests.libvirt.test_external_backend import external_tpm, served
from tests.vm.qemu_fixtures import stop_process
from tests.vm.scenario import permall, snapshot_tags
from tests.vtpm.mount_fixtures import NV_INDEX, runtime_dir, vtpm_qcow  # noqa: F401

pytestmark = pytest.mark.usefixtures("runtime_dir")

__all__ = ["served"]  # the fixture, imported for this module's tests


def wait_for(condition: object, what: str, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; follower log:\n{log.read_text()}")
        time.sleep(0.1)


@pytest.fixture
def follower(lv: Libvirtd) -> Iterator[object]:
    """Start ``vtpm-qcow libvirt follow`` for a domain; always stopped afterwards."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, image: Path, log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [need("vtpm-qcow"), "libvirt", "follow", name, "--connect", lv.uri,
                 "--image", str(image), "--poll", "0.3"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        procs.append(proc)
        wait_for(lambda: "following domain" in log.read_text(), "the follower", log)
        return proc

    yield start
    for proc in procs:
        stop_process(proc)


def test_running_snapshots_follow_through_libvirt(
    lv: Libvirtd, served: tuple[Path, Path, int], follower: object
) -> None:
    image, ctrl, _serve = served
    work = image.parent
    disk = work / "follow-disk.qcow2"
    subprocess.run([need("qemu-img"), "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    qtest = guest_side(lv) / "follow.qtest"
    qtest.unlink(missing_ok=True)
    name = lv.define(domain_xml(PREFIX + "follow", external_tpm(ctrl), disk=disk, qtest=qtest))
    lv.virsh("start", name)
    tpm = guest_tpm(qtest)
    log = work / "follow.log"
    try:
        tpm.startup()
        tpm.nv_define_space(NV_INDEX, 8)
        tpm.nv_write(NV_INDEX, b"before-1")
        proc = follower(name, image, log)  # type: ignore[operator]

        lv.virsh("snapshot-create-as", name, "s1")
        tpm.nv_write(NV_INDEX, b"after--1")  # the guest moves on at once
        wait_for(lambda: snapshot_tags(image) == ["s1"], "vTPM snapshot s1", log)
        assert permall(image, "s1") != permall(image)
        proof = vtpm_qcow("vm", "verify", "--disk", str(disk), str(image), "-U", check=False)
        assert proof.returncode == 0, proof.stdout + proof.stderr

        lv.virsh("snapshot-delete", name, "s1")
        wait_for(lambda: snapshot_tags(image) == [], "vTPM snapshot s1 to go", log)
    finally:
        tpm.transport.close()
    lv.virsh("destroy", name)
    assert proc.wait(30) == 0, log.read_text()
    text = log.read_text()
    assert "created: vTPM snapshot 's1'" in text and "from its vmstate" in text, text
    assert "deleted: vTPM snapshot 's1' (disk snapshot deleted)" in text, text
    assert "error" not in text, text


def test_follow_refuses_an_unknown_domain_in_one_line(lv: Libvirtd) -> None:
    done = vtpm_qcow(
        "libvirt", "follow", "no-such-domain", "--connect", lv.uri, "--image", "/nonexistent",
        check=False,
    )  # fmt: skip
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "no such domain" in done.stderr and "Traceback" not in done.stderr

"""libvirt's own swtpm (emulator backend, as ``tss``) on a dir view mounted at the domain's
state directory, ``/var/lib/libvirt/swtpm/<uuid>/tpm2``.

The image is manufactured first with libvirt's swtpm_setup options (libvirt skips
swtpm_setup when the directory exists, and a mount point always does).  libvirt chowns the
view to ``tss`` and makes it 0700; the view takes it, so swtpm as ``tss`` locks and writes
its state through it.  The guest's TPM writes (qtest) land in the image, and the view's
owner and mode are still there after a remount.
"""

from __future__ import annotations

import pwd
import subprocess
from pathlib import Path

import pytest

from tests.helpers import need
from tests.libvirt.conftest import PREFIX, Libvirtd, domain_xml, guest_side, guest_tpm
from tests.vtpm.mount_fixtures import (
    NV_INDEX,
    qemu_img_check,
    raw_sections,
    runtime_dir,  # noqa: F401  (fixture)
)

pytestmark = pytest.mark.usefixtures("runtime_dir")

UUID = "5f1c0e2a-7d3b-4c1e-9a6f-0123456789ab"
EMULATOR_TPM = "<tpm model='tpm-tis'><backend type='emulator' version='2.0'/></tpm>"


def in_ns(lv: Libvirtd, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in libvirtd's mount namespace (where the view must be mounted)."""
    done = subprocess.run(
        lv.in_namespace(*argv), capture_output=True, text=True, timeout=300, check=False
    )
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr}")
    return done


def swtpm_user(lv: Libvirtd) -> str:
    pid_files = list((lv.base / "run" / "qemu" / "swtpm").glob("*.pid"))
    assert len(pid_files) == 1, pid_files
    pid = int(pid_files[0].read_text())
    status = Path(f"/proc/{pid}/status").read_text()
    uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
    return pwd.getpwuid(uid).pw_name


def test_libvirt_swtpm_as_tss_runs_on_the_mounted_view(lv: Libvirtd) -> None:
    work = lv.base / "vtpm"
    work.mkdir(mode=0o755, exist_ok=True)
    image = work / "view.qcow2"
    vtpm = need("vtpm-qcow")
    in_ns(lv, vtpm, "setup", "--create", str(image), "--create-ek-cert",
          "--create-platform-cert", "--lock-nvram")  # fmt: skip
    state_dir = lv.base / "lib" / "swtpm" / UUID  # /var/lib/libvirt/swtpm/UUID in the namespace
    state_dir.mkdir(mode=0o711, parents=True)
    (lv.base / "lib" / "swtpm").chmod(0o711)
    mnt = f"/var/lib/libvirt/swtpm/{UUID}/tpm2"
    (state_dir / "tpm2").mkdir()
    qtest = guest_side(lv) / "view.qtest"
    try:
        in_ns(lv, vtpm, "mount", "--view", "dir", str(image), mnt, "--log", str(work / "m.log"))
        name = lv.define(domain_xml(PREFIX + "view", EMULATOR_TPM, uuid=UUID, qtest=qtest))
        before = raw_sections(image)["permall"]
        lv.virsh("start", name)
        assert lv.state(name) == "running"
        assert swtpm_user(lv) == "tss"
        tpm = guest_tpm(qtest)
        try:
            tpm.startup()
            tpm.nv_define_space(NV_INDEX, 8)
            tpm.nv_write(NV_INDEX, b"on view!")
        finally:
            tpm.transport.close()
        lv.virsh("destroy", name)
        assert raw_sections(image)["permall"] != before
        assert in_ns(lv, "stat", "-c", "%U %a", mnt).stdout.split() == ["tss", "700"]
        in_ns(lv, vtpm, "umount", mnt)
        qemu_img_check(image)
        # the owner and mode libvirt gave the view are the image's now
        in_ns(lv, vtpm, "mount", "--view", "dir", str(image), mnt)
        assert in_ns(lv, "stat", "-c", "%U %a", mnt).stdout.split() == ["tss", "700"]
        # and the domain starts again on it, with the guest's NV index still there
        qtest.unlink(missing_ok=True)
        lv.virsh("start", name)
        tpm = guest_tpm(qtest)
        try:
            tpm.startup()
            assert tpm.nv_read(NV_INDEX, 8) == b"on view!"
        finally:
            tpm.transport.close()
        lv.virsh("destroy", name)
    finally:
        lv.virsh("destroy", PREFIX + "view", check=False)
        in_ns(lv, vtpm, "umount", mnt, check=False)
    qemu_img_check(image)

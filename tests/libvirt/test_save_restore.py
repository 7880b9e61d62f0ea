"""``virsh save`` and ``virsh restore`` of a domain whose external TPM ``vtpm-qcow serve
--qmp --keep-serving`` serves (docs/MIGRATION.md).

``virsh save`` is a migration to a file: QEMU ends in ``postmigrate`` and serve lets go of
the image, then libvirt stops QEMU.  The restored QEMU pushes the saved TPM state into the
next swtpm; serve takes the image again when that QEMU's monitor appears, so the restored
state and what the guest does next land in the image.  (libvirt cannot live-migrate to its
own host; ``tests/vm/test_migration.py`` covers live migration with QMP.)
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.libvirt.conftest import PREFIX, Libvirtd, domain_xml, guest_side, guest_tpm
from tests.vm.scenario import wait_until
from tests.vtpm.mount_fixtures import (
    NV_INDEX,
    qemu_img_check,
    raw_sections,
    runtime_dir,  # noqa: F401  (fixture)
    vtpm_qcow,
    wait_gone,
)
from vtpm_qcow.export.control import pid_path_for

pytestmark = pytest.mark.usefixtures("runtime_dir")


@pytest.fixture
def served(lv: Libvirtd) -> Iterator[tuple[Path, Path, Path, Path]]:
    """A manufactured image served with a watcher on a QMP socket the domain will make:
    (image, swtpm socket, QMP socket, serve's log)."""
    work = lv.base / "vtpm"
    work.mkdir(mode=0o755, exist_ok=True)
    image, ctrl, log = work / "saved.qcow2", work / "saved.sock", work / "saved-serve.log"
    qmp = guest_side(lv) / "saved.qmp"
    vtpm_qcow("setup", "--create", str(image))
    vtpm_qcow(
        "serve", str(image), "--ctrl", str(ctrl), "--keep-serving", "--qmp", str(qmp),
        "--socket-owner", "libvirt-qemu", "--socket-group", "libvirt-qemu",
        "--socket-mode", "0660", "--log", str(log),
    )  # fmt: skip
    pid = int(pid_path_for(image).read_text())
    try:
        yield image, ctrl, qmp, log
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        assert wait_gone(pid), "serve ignored SIGTERM"
        qemu_img_check(image)
        image.unlink(missing_ok=True)


def test_save_and_restore_keep_the_tpm_in_the_image(
    lv: Libvirtd, served: tuple[Path, Path, Path, Path]
) -> None:
    image, ctrl, qmp, log = served
    qtest = guest_side(lv) / "saved.qtest"
    tpm_xml = (
        "<tpm model='tpm-tis'><backend type='external'>"
        f"<source type='unix' mode='connect' path='{ctrl}'/></backend></tpm>"
    )
    xml = domain_xml(PREFIX + "saved", tpm_xml, qtest=qtest).replace(
        "</qemu:commandline>",
        f"<qemu:arg value='-qmp'/><qemu:arg value='unix:{qmp},server=on,wait=off'/>"
        "</qemu:commandline>",
    )
    name = lv.define(xml)
    state = lv.base / "saved.state"
    try:
        lv.virsh("start", name)
        wait_until(lambda: "qmp watcher following" in log.read_text(), "the watcher")
        tpm = guest_tpm(qtest)
        try:
            tpm.startup()
            tpm.nv_define_space(NV_INDEX, 8)
            tpm.nv_write(NV_INDEX, b"saved!!!")
        finally:
            tpm.transport.close()
        qtest.unlink(missing_ok=True)
        lv.virsh("save", name, str(state))
        assert lv.state(name) == "shut off"
        lv.virsh("restore", str(state))
        assert lv.state(name) == "running"
        tpm = guest_tpm(qtest)
        try:
            assert tpm.nv_read(NV_INDEX, 8) == b"saved!!!"  # from the saved state
            before = raw_sections(image)["permall"]
            tpm.nv_write(NV_INDEX, b"restored")
        finally:
            tpm.transport.close()
        text = log.read_text()
        assert "migration: released" in text, text  # libvirt turned QMP's events on
        wait_until(lambda: "migration: took over" in log.read_text(), "serve taking it again")
        assert raw_sections(image)["permall"] != before  # the guest's write: in the image
        lv.virsh("destroy", name)
    finally:
        lv.virsh("destroy", name, check=False)
        state.unlink(missing_ok=True)

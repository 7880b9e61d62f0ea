"""The ``vm`` commands on a LUKS-encrypted vTPM image (issue 16), with a real QEMU.

``serve --secret-file --qmp`` runs swtpm on the encrypted image for QEMU and follows its
snapshots; ``vm save/list/status/delete`` open an image no daemon serves directly and take
the secret like every other command.  QEMU and the daemon are stopped in ``finally``
blocks (qemu_fixtures).
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.vm.qemu_fixtures import (
    create_disk,
    hmp_over_qmp,
    qemu_vm,
    served_store,
    swtpm_process,
)
from tests.vtpm.mount_fixtures import vtpm_qcow
from tests.vtpm.swtpm_fixtures import setup_state
from tests.vtpm.test_encrypted import ITER, SECRET, SECRET_TEXT
from tests.vtpm.test_secret import private_file
from vtpm_qcow.state.store import Store


def _encrypted_image(tmp_path: Path) -> tuple[Path, Path]:
    key = private_file(tmp_path / "vtpm.key")
    image = tmp_path / "vtpm.qcow2"
    vtpm_qcow("setup", "--create", "--encrypt", "--iter-time", ITER, "--secret-file", str(key),
              str(image))  # fmt: skip
    return image, key


def test_vm_commands_open_an_encrypted_image_with_the_secret(tmp_path: Path) -> None:
    image, key = _encrypted_image(tmp_path)
    disk = create_disk(tmp_path / "disk.qcow2")
    plain = tmp_path / "plain-tpm"
    plain.mkdir()
    setup_state(str(plain))
    run = tmp_path / "run"
    run.mkdir()
    with (
        swtpm_process(f"dir={plain}", run, data_channel=False) as swtpm,
        qemu_vm(run, str(swtpm.ctrl), [disk]) as qemu,
    ):
        common = ["--qmp", str(qemu.qmp), "--store", str(image)]
        refused = vtpm_qcow("vm", "status", *common, check=False)
        assert refused.returncode != 0 and "Traceback" not in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert "LUKS-encrypted" in refused.stderr and "--secret-file" in refused.stderr
        secret = ["--secret-file", str(key)]
        vtpm_qcow("vm", "save", *common, *secret, "first")
        listed = json.loads(vtpm_qcow("vm", "list", *common, *secret, "--json").stdout)
        assert [row["tag"] for row in listed["tags"]] == ["first"]
        vtpm_qcow("vm", "status", *common, *secret)  # exit 0: aligned
        vtpm_qcow("vm", "delete", *common, *secret, "first")
    with Store.open(image, writable=False, key=SECRET) as store:
        assert store.snapshot_tags() == []


def test_vm_save_through_the_daemon_serving_an_encrypted_image(tmp_path: Path) -> None:
    image, key = _encrypted_image(tmp_path)
    disk = create_disk(tmp_path / "disk.qcow2")
    run = tmp_path / "run"
    run.mkdir()
    with (
        served_store(image, run, extra=["--secret-file", str(key)]) as serve,
        qemu_vm(run, str(serve.swtpm_ctrl), [disk]) as qemu,
    ):
        for name in ("cmdline", "environ"):
            assert SECRET_TEXT not in Path(f"/proc/{serve.proc.pid}/{name}").read_bytes()
        # the daemon holds the key: the command needs none to snapshot through it
        common = ["--qmp", str(qemu.qmp), "--store", str(image)]
        vtpm_qcow("vm", "save", *common, "snap1")
        hmp_over_qmp(qemu.qmp, "info snapshots")
        status = json.loads(vtpm_qcow("vm", "status", *common, "--json").stdout)
        assert status["aligned"] and [row["tag"] for row in status["tags"]] == ["snap1"]
    with Store.open(image, writable=False, key=SECRET) as store:
        assert store.snapshot_tags() == ["snap1"]

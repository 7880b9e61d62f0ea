"""End to end: a served vTPM image, a real QEMU, snapshots saved/loaded/deleted together.

The building blocks (the stack, TPM states A and B, the qemu-img oracles) are in
:mod:`tests.vm.scenario`.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from tests.vm.qemu_fixtures import (
    hmp_over_qmp,
    qemu_vm,
    qmp_query,
    quit_qemu,
    swtpm_process,
)
from tests.vm.scenario import (
    NV_INDEX,
    NV_SIZE,
    OWNER_B,
    PCR,
    assert_permanent_state_a,
    assert_permanent_state_b,
    cold_boot_state,
    orphan_vtpm_snapshot,
    permall,
    save_a_then_change_to_b,
    snapshot_tags,
    stack,
    state_a,
    state_b,
    wait_until,
    watch_process,
)
from tests.vtpm.mount_fixtures import vtpm_qcow


@pytest.mark.parametrize("view", ["file", "dir"])
def test_orchestrated_save_change_load_cold_boot_delete(
    images: tuple[Path, Path], tmp_path: Path, view: str
) -> None:
    image, disk = images
    with stack(tmp_path / "run1", image, disk, view=view) as s:
        pcr_a = state_a(s.tpm)
        saved = s.vm("save", "T1")
        assert "saved 'T1'" in saved.stdout and "VM resumed" in saved.stdout
        assert snapshot_tags(disk) == ["T1"] and snapshot_tags(image) == ["T1"]
        assert qmp_query(s.qemu.qmp, "query-status")["running"]
        listing = s.vm("list").stdout.splitlines()
        assert listing[1].split() == ["T1", "disk0", "yes", "aligned"]
        row = {"tag": "T1", "disks": ["disk0"], "vtpm": True, "aligned": True}
        assert json.loads(s.vm("list", "--json").stdout) == {"tags": [row]}
        state_b(s.tpm)
        assert_permanent_state_b(s.tpm)
        assert permall(image) != permall(image, "T1")

        refused = s.vm("save", "T1", check=False)
        assert refused.returncode != 0 and "--force" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1

        loaded = s.vm("load", "T1")
        assert "VM resumed" in loaded.stdout
        assert qmp_query(s.qemu.qmp, "query-status")["running"]
        assert s.tpm.pcr_read([PCR])[PCR] == pcr_a  # volatile state: from the vmstate
        assert_permanent_state_a(s.tpm)
        assert permall(image) == permall(image, "T1")
    cold_boot_state(tmp_path / "run2", image, disk, view=view)
    with stack(tmp_path / "run3", image, disk, view=view) as s:
        s.vm("delete", "T1")
        assert snapshot_tags(disk) == [] and snapshot_tags(image) == []


@pytest.mark.parametrize("view", ["file", "dir"])
def test_loadvm_pushes_exactly_the_vtpm_snapshots_permall(
    images: tuple[Path, Path], tmp_path: Path, view: str
) -> None:
    """HMP loadvm alone (no vTPM apply): what swtpm rewrites is the vTPM snapshot's permall."""
    image, disk = images
    with stack(tmp_path / "run", image, disk, view=view) as s:
        save_a_then_change_to_b(s)
        snapshot_permall = permall(image, "T1")
        assert snapshot_permall is not None and permall(image) != snapshot_permall
        hmp_over_qmp(s.qemu.qmp, "loadvm T1")
        assert permall(image) == snapshot_permall  # byte for byte
        assert_permanent_state_a(s.tpm)


def test_force_replaces_and_load_returns_to_the_new_state(
    images: tuple[Path, Path], tmp_path: Path
) -> None:
    image, disk = images
    with stack(tmp_path / "run", image, disk, running=False) as s:
        save_a_then_change_to_b(s)
        s.vm("save", "--force", "T1")
        assert snapshot_tags(disk) == ["T1"] and snapshot_tags(image) == ["T1"]
        s.tpm.nv_write(NV_INDEX, b"C" * NV_SIZE, owner=True, auth=OWNER_B)
        s.vm("load", "T1")
        assert_permanent_state_b(s.tpm)
        assert not qmp_query(s.qemu.qmp, "query-status")["running"]  # -S VM: not resumed


def test_failed_disk_half_leaves_no_orphan_vtpm_snapshot(
    images: tuple[Path, Path], tmp_path: Path
) -> None:
    image, disk = images
    raw = tmp_path / "raw.img"
    raw.write_bytes(bytes(1 << 20))
    extra = ["-drive", f"if=none,id=rawdrive,file={raw},format=raw,node-name=raw0"]
    with stack(tmp_path / "run", image, disk, extra=extra) as s:
        state_a(s.tpm)
        failed = s.vm("save", "T1", check=False)
        assert failed.returncode == 1
        assert "disk half failed" in failed.stderr and "does not support snapshots" in failed.stderr
        assert "vTPM image untouched" in failed.stderr
        assert len(failed.stderr.strip().splitlines()) == 1
        assert snapshot_tags(image) == [] and snapshot_tags(disk) == []
        assert qmp_query(s.qemu.qmp, "query-status")["running"]
        status = s.vm("status", check=False)
        assert status.returncode == 0, status.stdout


def test_failed_vtpm_half_deletes_the_disks_fresh_snapshot(
    images: tuple[Path, Path], tmp_path: Path
) -> None:
    """QEMU accepts a tag with a newline, the vTPM store refuses it: the disks roll back."""
    image, disk = images
    with stack(tmp_path / "run", image, disk) as s:
        state_a(s.tpm)
        failed = s.vm("save", "bad\ntag", check=False)
        assert failed.returncode == 1
        assert "vTPM half failed" in failed.stderr and "deleted again" in failed.stderr
        assert len(failed.stderr.strip().splitlines()) == 1 and "'bad\\ntag'" in failed.stderr
        assert snapshot_tags(disk) == [] and snapshot_tags(image) == []
        assert qmp_query(s.qemu.qmp, "query-status")["running"]


def test_load_of_unknown_tag_is_refused_before_touching_anything(
    images: tuple[Path, Path], tmp_path: Path
) -> None:
    image, disk = images
    with stack(tmp_path / "run", image, disk) as s:
        orphan_vtpm_snapshot(s)  # the disks lose T1, the vTPM image keeps it
        before = permall(image)
        refused = s.vm("load", "T1", check=False)
        assert refused.returncode == 1 and "no such snapshot on disk0" in refused.stderr
        assert permall(image) == before
        status = s.vm("status", check=False)
        assert status.returncode == 3 and "mismatch: 'T1'" in status.stdout
        status = s.vm("status", "--json", check=False)
        fields = json.loads(status.stdout)
        assert status.returncode == 3 and fields["aligned"] is False
        assert fields["tags"] == [{"tag": "T1", "disks": [], "vtpm": True, "aligned": False}]
        assert [d["node"] for d in fields["disks"]] == ["disk0"] and fields["vm"] == "running"
        refused = s.vm("save", "T1", check=False)  # still on the vTPM image
        assert refused.returncode == 1 and "exists on the vTPM image" in refused.stderr
        assert snapshot_tags(disk) == [] and permall(image) == before
        s.vm("delete", "T1")  # finishes a half-done delete
        assert snapshot_tags(image) == []


def test_hmp_savevm_loadvm_delvm_followed_by_the_watcher(
    images: tuple[Path, Path], tmp_path: Path
) -> None:
    image, disk = images
    options = ("--poll", "0.2", "--grace", "0.5")
    with stack(tmp_path / "run1", image, disk) as s, watch_process(s, *options) as watch:
        state_a(s.tpm)
        hmp_over_qmp(s.qemu.qmp, "savevm T1")
        wait_until(lambda: snapshot_tags(image) == ["T1"], "vTPM snapshot T1")
        assert permall(image, "T1") == permall(image)
        state_b(s.tpm)
        hmp_over_qmp(s.qemu.qmp, "loadvm T1")
        assert_permanent_state_a(s.tpm)
        wait_until(lambda: "loaded:" in watch.output(), "the load report")
        assert permall(image) == permall(image, "T1")
    cold_boot_state(tmp_path / "run2", image, disk)
    with stack(tmp_path / "run3", image, disk) as s, watch_process(s, *options) as watch:
        hmp_over_qmp(s.qemu.qmp, "delvm T1")
        deleted = "deleted: vTPM snapshot 'T1' (disk snapshot deleted)"
        wait_until(lambda: deleted in watch.output(), "the watcher's delete")
        assert snapshot_tags(image) == []
        quit_qemu(s.qemu)
        assert watch.proc.wait(30) == 0  # ends with QEMU


def test_qmp_socket_gone_is_one_line_error(images: tuple[Path, Path], tmp_path: Path) -> None:
    image, _ = images
    done = vtpm_qcow(
        "vm", "save", "--qmp", str(tmp_path / "gone.sock"), "--store", str(image), "T1",
        check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "gone.sock" in done.stderr
    assert "Traceback" not in done.stderr
    assert snapshot_tags(image) == []
    silent = tmp_path / "silent.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(silent))
        server.listen(1)  # a monitor held by someone else: connects, never greets
        done = vtpm_qcow(
            "vm", "load", "--qmp", str(silent), "--store", str(image), "--timeout", "1", "T1",
            check=False,
        )  # fmt: skip
    assert done.returncode == 1 and "no QMP greeting within 1s" in done.stderr
    assert done.stderr.count("\n") == 1
    missing = vtpm_qcow(
        "vm", "list", "--qmp", str(silent), "--store", str(tmp_path / "nope.qcow2"), check=False
    )
    assert missing.returncode == 1 and "nope.qcow2: no such vTPM image" in missing.stderr


def test_qemu_killed_during_watch_ends_watch_with_error(
    images: tuple[Path, Path], tmp_path: Path
) -> None:
    image, disk = images
    options = ("--timeout", "2", "--reconnect", "1")
    with stack(tmp_path / "run", image, disk) as s, watch_process(s, *options) as watch:
        s.qemu.proc.kill()
        s.qemu.proc.wait()
        assert watch.proc.wait(60) == 1
        message = watch.err.read_text()
        assert "Traceback" not in message and len(message.strip().splitlines()) == 1


def test_unserved_image_is_opened_directly(images: tuple[Path, Path], tmp_path: Path) -> None:
    """No daemon serves the vTPM image: vm save/load/delete open it (and its lock) directly."""
    image, disk = images
    state = tmp_path / "plain-state"
    state.mkdir()
    with (
        swtpm_process(f"dir={state}", tmp_path, data_channel=False, flags=None) as swtpm,
        qemu_vm(tmp_path, str(swtpm.ctrl), [disk]) as qemu,
    ):
        common = ["--qmp", str(qemu.qmp), "--store", str(image)]
        vtpm_qcow("vm", "save", *common, "T1")
        assert snapshot_tags(image) == ["T1"] and snapshot_tags(disk) == ["T1"]
        vtpm_qcow("vm", "load", *common, "T1")
        vtpm_qcow("vm", "delete", *common, "T1")
        assert snapshot_tags(image) == [] and snapshot_tags(disk) == []
        gone = vtpm_qcow("vm", "list", *common, "--control", str(tmp_path / "no.sock"), check=False)
        assert gone.returncode == 1 and "no.sock" in gone.stderr
        assert len(gone.stderr.strip().splitlines()) == 1

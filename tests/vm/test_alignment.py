"""End to end: a served vTPM image, a real QEMU, snapshots saved/loaded/deleted together.

TPM state is changed and read through QEMU's TIS (qtest), like a guest would; the disks' and
the vTPM image's snapshot lists come from ``qemu-img -U`` (the oracle), and the vTPM
image's sections from ``qemu-img convert`` + the linear codec.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import need
from tests.vm.qemu_fixtures import (
    QemuProcess,
    ServedStore,
    create_disk,
    hmp_over_qmp,
    qemu_vm,
    qmp_query,
    run_tool,
    served_store,
    stop_process,
    vtpm_qcow_command,
)
from vtpm_qcow import linear
from vtpm_qcow.control import RUNTIME_DIR_ENV
from vtpm_qcow.qtest_tis import QtestTisTransport
from vtpm_qcow.tpm import Tpm, TpmResponseError, sha256

NV_INDEX = 0x01500040
NV_EXTRA = 0x01500041
NV_SIZE = 32
PCR = 10
OWNER_B = b"owner-of-branch-B"


@pytest.fixture(autouse=True)
def runtime_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vqvm-"))
    monkeypatch.setenv(RUNTIME_DIR_ENV, str(path))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class Stack:
    """A served vTPM image, a QEMU using it, and a TPM client through QEMU's TIS."""

    workdir: Path
    image: Path
    disk: Path
    served: ServedStore
    qemu: QemuProcess
    tis: QtestTisTransport
    tpm: Tpm

    def vm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``vtpm-qcow vm ACTION --qmp ... --store ... ARGS``."""
        action, *rest = args
        return vtpm_qcow_command(
            "vm", action, "--qmp", str(self.qemu.qmp), "--store", str(self.image), *rest,
            check=check,
        )  # fmt: skip


@contextlib.contextmanager
def stack(
    workdir: Path, image: Path, disk: Path, *, running: bool = True, extra: list[str] | None = None
) -> Iterator[Stack]:
    """Serve ``image``, start QEMU on it with ``disk``; everything stopped on exit."""
    workdir.mkdir(exist_ok=True)
    with (
        served_store(image, workdir) as served,
        qemu_vm(workdir, str(served.swtpm_ctrl), [disk], running=running, extra=extra) as qemu,
        QtestTisTransport(str(qemu.qtest)) as tis,
    ):
        yield Stack(workdir, image, disk, served, qemu, tis, Tpm(tis))


@pytest.fixture
def images(tmp_path: Path) -> tuple[Path, Path]:
    image = tmp_path / "vtpm.qcow2"
    vtpm_qcow_command("create", str(image))
    return image, create_disk(tmp_path / "disk.qcow2")


def snapshot_tags(image: Path) -> list[str]:
    """Snapshot tags of a qcow2 file per qemu-img (-U: it may be in use)."""
    out = run_tool(need("qemu-img"), "info", "-U", "--output=json", str(image)).stdout
    return [s["name"] for s in json.loads(out).get("snapshots", [])]


def permall(image: Path, tag: str | None = None) -> bytes | None:
    """The permall section of ``image`` (active layer, or snapshot ``tag``) via qemu-img."""
    raw = image.with_name(f"{image.name}.{tag or 'active'}.raw")
    args = ["convert", "-U", "-f", "qcow2", "-O", "raw"]
    if tag:
        args += ["-l", f"snapshot.name={tag}"]
    run_tool(need("qemu-img"), *args, str(image), str(raw))
    try:
        return linear.read_section(raw.read_bytes(), "permall", source=str(raw))
    finally:
        raw.unlink()


def state_a(tpm: Tpm) -> bytes:
    """Fresh TPM -> state A: one NV index holding A, PCR extended with A; PCR value."""
    tpm.startup()
    tpm.nv_define_space(NV_INDEX, NV_SIZE)
    tpm.nv_write(NV_INDEX, b"A" * NV_SIZE)
    tpm.pcr_extend(PCR, sha256(b"A"))
    return tpm.pcr_read([PCR])[PCR]


def state_b(tpm: Tpm) -> None:
    """A -> B: owner password set, NV rewritten, a second index, PCR extended again."""
    tpm.hierarchy_change_auth(OWNER_B)
    tpm.nv_write(NV_INDEX, b"B" * NV_SIZE)
    tpm.nv_define_space(NV_EXTRA, 8, owner_auth=OWNER_B)
    tpm.pcr_extend(PCR, sha256(b"B"))


def assert_permanent_state_a(tpm: Tpm) -> None:
    """Owner password empty (it authorizes the read), NV holds A, no second index."""
    assert tpm.nv_read(NV_INDEX, NV_SIZE, owner=True, auth=b"") == b"A" * NV_SIZE
    assert tpm.nv_indices() == [NV_INDEX]
    with pytest.raises(TpmResponseError):
        tpm.nv_read(NV_INDEX, NV_SIZE, owner=True, auth=OWNER_B)


def assert_permanent_state_b(tpm: Tpm) -> None:
    assert tpm.nv_read(NV_INDEX, NV_SIZE, owner=True, auth=OWNER_B) == b"B" * NV_SIZE
    assert tpm.nv_indices() == [NV_INDEX, NV_EXTRA]


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll ``condition`` (a bounded wait for an asynchronous actor, not a timing check)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def cold_boot_state(workdir: Path, image: Path, disk: Path) -> None:
    """Start serve + QEMU again on the same files: the TPM must show state A."""
    with stack(workdir, image, disk) as again:
        again.tpm.startup()
        assert_permanent_state_a(again.tpm)


def test_orchestrated_save_change_load_cold_boot_delete(
    images: tuple[Path, Path], tmp_path: Path
) -> None:
    image, disk = images
    with stack(tmp_path / "run1", image, disk) as s:
        pcr_a = state_a(s.tpm)
        saved = s.vm("save", "T1")
        assert "saved 'T1'" in saved.stdout and "VM resumed" in saved.stdout
        assert snapshot_tags(disk) == ["T1"] and snapshot_tags(image) == ["T1"]
        assert qmp_query(s.qemu.qmp, "query-status")["running"]
        state_b(s.tpm)
        assert_permanent_state_b(s.tpm)
        assert permall(image) != permall(image, "T1")

        refused = s.vm("save", "T1", check=False)
        assert refused.returncode != 0 and "--force" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1

        s.vm("load", "T1")
        assert s.tpm.pcr_read([PCR])[PCR] == pcr_a  # volatile state: from the vmstate
        assert_permanent_state_a(s.tpm)
        assert permall(image) == permall(image, "T1")
    cold_boot_state(tmp_path / "run2", image, disk)
    with stack(tmp_path / "run3", image, disk) as s:
        s.vm("delete", "T1")
        assert snapshot_tags(disk) == [] and snapshot_tags(image) == []


def test_loadvm_pushes_exactly_the_vtpm_snapshots_permall(
    images: tuple[Path, Path], tmp_path: Path
) -> None:
    """HMP loadvm alone (no vTPM apply): what swtpm rewrites is the vTPM snapshot's permall."""
    image, disk = images
    with stack(tmp_path / "run", image, disk) as s:
        state_a(s.tpm)
        s.vm("save", "T1")
        state_b(s.tpm)
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
        state_a(s.tpm)
        s.vm("save", "T1")
        state_b(s.tpm)
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
        assert "disk half failed" in failed.stderr and "deleted again" in failed.stderr
        assert len(failed.stderr.strip().splitlines()) == 1
        assert snapshot_tags(image) == [] and snapshot_tags(disk) == []
        assert qmp_query(s.qemu.qmp, "query-status")["running"]
        status = s.vm("status", check=False)
        assert status.returncode == 0, status.stdout


def test_load_of_unknown_tag_is_refused_before_touching_anything(
    images: tuple[Path, Path], tmp_path: Path
) -> None:
    image, disk = images
    with stack(tmp_path / "run", image, disk) as s:
        state_a(s.tpm)
        s.vm("save", "T1")
        hmp_over_qmp(s.qemu.qmp, "delvm T1")  # disks lose T1, the vTPM image keeps it
        before = permall(image)
        refused = s.vm("load", "T1", check=False)
        assert refused.returncode == 1 and "no such snapshot on disk0" in refused.stderr
        assert permall(image) == before
        status = s.vm("status", check=False)
        assert status.returncode == 3 and "mismatch: 'T1'" in status.stdout
        refused = s.vm("save", "T1", check=False)  # still on the vTPM image
        assert refused.returncode == 1 and "exists on the vTPM image" in refused.stderr
        assert snapshot_tags(disk) == [] and permall(image) == before
        s.vm("delete", "T1")  # finishes a half-done delete
        assert snapshot_tags(image) == []


def test_hmp_savevm_loadvm_delvm_followed_by_the_watcher(
    images: tuple[Path, Path], tmp_path: Path
) -> None:
    image, disk = images
    workdir = tmp_path / "run1"
    with stack(workdir, image, disk) as s:
        watch_log = workdir / "watch.log"
        with watch_log.open("w") as log:
            watcher = subprocess.Popen(
                [need("vtpm-qcow"), "vm", "watch", "--qmp", str(s.qemu.qmp2), "--store",
                 str(image), "--poll", "0.2", "--grace", "0.5"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            wait_until(lambda: "watching" in watch_log.read_text(), "the watcher to start")
            state_a(s.tpm)
            hmp_over_qmp(s.qemu.qmp, "savevm T1")
            wait_until(lambda: snapshot_tags(image) == ["T1"], "vTPM snapshot T1")
            assert permall(image, "T1") == permall(image)
            state_b(s.tpm)
            hmp_over_qmp(s.qemu.qmp, "loadvm T1")
            assert_permanent_state_a(s.tpm)
            wait_until(lambda: "loaded:" in watch_log.read_text(), "the load report")
            assert permall(image) == permall(image, "T1")
        finally:
            stop_process(watcher)
    cold_boot_state(tmp_path / "run2", image, disk)
    workdir = tmp_path / "run3"
    with stack(workdir, image, disk) as s:
        watch_log = workdir / "watch.log"
        with watch_log.open("w") as log:
            watcher = subprocess.Popen(
                [need("vtpm-qcow"), "vm", "watch", "--qmp", str(s.qemu.qmp2), "--store",
                 str(image), "--poll", "0.2", "--grace", "0.5"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            wait_until(lambda: "watching" in watch_log.read_text(), "the watcher to start")
            hmp_over_qmp(s.qemu.qmp, "delvm T1")
            wait_until(lambda: snapshot_tags(image) == [], "vTPM snapshot T1 to go")
            assert "deleted: vTPM snapshot 'T1' (disk snapshot deleted)" in watch_log.read_text()
            hmp_over_qmp(s.qemu.qmp, "quit")
            assert watcher.wait(30) == 0  # ends with QEMU
        finally:
            stop_process(watcher)


def test_qmp_socket_gone_is_one_line_error(images: tuple[Path, Path], tmp_path: Path) -> None:
    image, _ = images
    done = vtpm_qcow_command(
        "vm", "save", "--qmp", str(tmp_path / "gone.sock"), "--store", str(image), "T1",
        check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "gone.sock" in done.stderr
    assert "Traceback" not in done.stderr
    assert snapshot_tags(image) == []


def test_qemu_killed_during_watch_ends_watch_with_error(
    images: tuple[Path, Path], tmp_path: Path
) -> None:
    image, disk = images
    with stack(tmp_path / "run", image, disk) as s:
        out, err = tmp_path / "watch.out", tmp_path / "watch.err"
        with out.open("w") as out_file, err.open("w") as err_file:
            watcher = subprocess.Popen(
                [need("vtpm-qcow"), "vm", "watch", "--qmp", str(s.qemu.qmp2), "--store",
                 str(image), "--timeout", "2"],
                stdout=out_file, stderr=err_file,
            )  # fmt: skip
        try:
            wait_until(lambda: "watching" in out.read_text(), "the watcher to start")
            s.qemu.proc.kill()
            s.qemu.proc.wait()
            assert watcher.wait(60) == 1
            message = err.read_text()
            assert "Traceback" not in message and len(message.strip().splitlines()) == 1
        finally:
            stop_process(watcher)

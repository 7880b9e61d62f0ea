"""The passive watcher: reconcile at connect, snapshot jobs of other QMP clients, the hook."""

from __future__ import annotations

import threading
from pathlib import Path

from tests.vm.qemu_fixtures import hmp_over_qmp, qmp_job
from tests.vm.scenario import permall, snapshot_tags, stack, state_a, state_b, wait_until
from vtpm_qcow.vm import WatcherThread


def test_reconcile_at_connect_reports_missing_and_deletes_orphans(
    images: tuple[Path, Path], tmp_path: Path
) -> None:
    image, disk = images
    with stack(tmp_path / "run", image, disk) as s:
        state_a(s.tpm)
        s.vm("save", "T1")
        hmp_over_qmp(s.qemu.qmp, "delvm T1")  # unwatched: the vTPM keeps an orphan T1
        hmp_over_qmp(s.qemu.qmp, "savevm T2")  # unwatched: no vTPM snapshot T2
        done = s.vm("watch", "--once", "--grace", "0")
        assert "missing: disk snapshot 'T2' has no vTPM snapshot" in done.stdout
        assert "deleted: vTPM snapshot 'T1' (no disk snapshot)" in done.stdout
        assert snapshot_tags(image) == [] and snapshot_tags(disk) == ["T2"]
        status = s.vm("status", check=False)
        assert (
            status.returncode == 3 and "mismatch: 'T2' is on the disks disk0 only" in status.stdout
        )


def test_watcher_thread_follows_snapshot_jobs_of_another_client(
    images: tuple[Path, Path], tmp_path: Path
) -> None:
    image, disk = images
    lines: list[str] = []
    lock = threading.Lock()

    def report(line: str) -> None:
        with lock:
            lines.append(line)

    with stack(tmp_path / "run", image, disk) as s:
        state_a(s.tpm)
        watcher = WatcherThread(str(s.qemu.qmp2), str(image), report=report, poll_interval=0.2)
        watcher.start()
        try:
            job = {"tag": "J1", "vmstate": "disk0", "devices": ["disk0"]}
            assert qmp_job(s.qemu.qmp, "snapshot-save", job) is None
            wait_until(lambda: snapshot_tags(image) == ["J1"], f"vTPM snapshot J1 ({lines})")
            assert permall(image, "J1") == permall(image)  # the state at the pause
            state_b(s.tpm)
            assert (
                qmp_job(s.qemu.qmp, "snapshot-delete", {"tag": "J1", "devices": ["disk0"]}) is None
            )
            wait_until(lambda: snapshot_tags(image) == [], "vTPM snapshot J1 to go")
            hmp_over_qmp(s.qemu.qmp, "quit")
            wait_until(lambda: watcher.finished, "the watcher to end with QEMU")
        finally:
            watcher.stop()
        assert watcher.error is None
        with lock:
            text = "\n".join(lines)
        assert "created: vTPM snapshot 'J1'" in text and "warning" not in text
        assert "deleted: vTPM snapshot 'J1' (disk snapshot deleted)" in text

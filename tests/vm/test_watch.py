"""The passive watcher: reconcile at connect, snapshot jobs of other QMP clients, the hook."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from tests.vm.qemu_fixtures import hmp_over_qmp, qmp_job, quit_qemu
from tests.vm.scenario import (
    Stack,
    assert_permanent_state_a,
    assert_permanent_state_b,
    orphan_vtpm_snapshot,
    permall,
    save_a_then_change_to_b,
    snapshot_tags,
    stack,
    state_a,
    state_b,
    wait_until,
    watcher_thread,
)
from vtpm_qcow.state.blob import parse_blob
from vtpm_qcow.vm.watch import Watcher, WatcherThread


@contextlib.contextmanager
def watched_state_a(
    images: tuple[Path, Path], tmp_path: Path, **options: float
) -> Iterator[tuple[Stack, WatcherThread, list[str]]]:
    """The stack in TPM state A, and a watcher thread whose report lines collect in a list."""
    image, disk = images
    lines: list[str] = []
    with stack(tmp_path / "run", image, disk) as s:
        state_a(s.tpm)
        with watcher_thread(s, lines.append, **options) as thread:
            yield s, thread, lines


def test_reconcile_at_connect_reports_missing_and_deletes_orphans(
    images: tuple[Path, Path], tmp_path: Path
) -> None:
    image, disk = images
    with stack(tmp_path / "run", image, disk) as s:
        orphan_vtpm_snapshot(s)  # the disks lose T1, the vTPM image keeps it
        hmp_over_qmp(s.qemu.qmp, "savevm T2")  # unwatched: no vTPM snapshot T2 ...
        saved = permall(image)
        state_b(s.tpm)
        # ... and a disk-only T3, whose TPM state nothing records
        hmp_over_qmp(s.qemu.qmp, "snapshot_blkdev_internal disk0 T3")
        done = s.vm("watch", "--once", "--grace", "0")
        # T2's vmstate says which TPM state goes with it; T3 is reported, not invented
        created = "created: vTPM snapshot 'T2' (found at connect; TPM state from its vmstate)"
        assert created in done.stdout, done.stdout
        assert permall(image, "T2") == saved != permall(image)
        assert "missing: disk snapshot 'T3' has no vTPM snapshot" in done.stdout
        assert "deleted: vTPM snapshot 'T1' (no disk snapshot)" in done.stdout
        assert snapshot_tags(image) == ["T2"] and snapshot_tags(disk) == ["T2", "T3"]
        status = s.vm("status", check=False)
        assert (
            status.returncode == 3 and "mismatch: 'T3' is on the disks disk0 only" in status.stdout
        ), status.stdout


def test_watcher_thread_follows_snapshot_jobs_of_another_client(
    images: tuple[Path, Path], tmp_path: Path
) -> None:
    image, _ = images
    with watched_state_a(images, tmp_path, poll_interval=0.2) as (s, watcher, lines):
        job = {"tag": "J1", "vmstate": "disk0", "devices": ["disk0"]}
        assert qmp_job(s.qemu.qmp, "snapshot-save", job) is None
        wait_until(lambda: snapshot_tags(image) == ["J1"], f"vTPM snapshot J1 ({lines})")
        assert permall(image, "J1") == permall(image)  # the state at the pause
        state_b(s.tpm)
        delete = {"tag": "J1", "devices": ["disk0"]}
        assert qmp_job(s.qemu.qmp, "snapshot-delete", delete) is None
        wait_until(lambda: snapshot_tags(image) == [], "vTPM snapshot J1 to go")
        quit_qemu(s.qemu)
        wait_until(lambda: watcher.finished, "the watcher to end with QEMU")
    assert watcher.error is None
    text = "\n".join(lines)
    assert "created: vTPM snapshot 'J1'" in text and "warning" not in text
    assert "deleted: vTPM snapshot 'J1' (disk snapshot deleted)" in text


def test_loadvm_while_paused_is_reported_once(images: tuple[Path, Path], tmp_path: Path) -> None:
    image, disk = images
    lines: list[str] = []
    with stack(tmp_path / "run", image, disk) as s:
        save_a_then_change_to_b(s)
        with watcher_thread(s, lines.append, poll_interval=0.1) as thread:
            watcher = thread.watcher
            assert watcher is not None
            hmp_over_qmp(s.qemu.qmp, "stop")  # STOP: the watcher records the paused state
            wait_until(lambda: watcher.pause_digests is not None, "the STOP to be seen")
            hmp_over_qmp(s.qemu.qmp, "loadvm T1")  # stays paused: no STOP/RESUME events
            wait_until(lambda: any(x.startswith("loaded:") for x in lines), "the load report")
            polls = watcher.reconciles
            wait_until(lambda: watcher.reconciles >= polls + 3, "three more polls")
        loads = [line for line in lines if line.startswith("loaded:")]
        assert loads == ["loaded: TPM state of 'T1' (pushed by QEMU's loadvm)"]


def test_hmp_savevm_over_an_existing_tag_replaces_the_vtpm_snapshot(
    images: tuple[Path, Path], tmp_path: Path
) -> None:
    """HMP savevm silently replaces a tag; the watcher sees the new id and follows."""
    image, disk = images
    with watched_state_a(images, tmp_path, poll_interval=0.2) as (s, _watcher, lines):
        hmp_over_qmp(s.qemu.qmp, "savevm T1")
        wait_until(lambda: any(x.startswith("created:") for x in lines), "vTPM snapshot T1")
        permall_a = permall(image, "T1")
        state_b(s.tpm)
        hmp_over_qmp(s.qemu.qmp, "savevm T1")  # same tag, new disk snapshot
        wait_until(lambda: any(x.startswith("replaced:") for x in lines), "the replacement")
    assert snapshot_tags(image) == ["T1"] and snapshot_tags(disk) == ["T1"]
    assert permall(image, "T1") == permall(image) != permall_a
    why = "disk snapshot saved again; TPM state from its vmstate"
    assert f"replaced: vTPM snapshot 'T1' ({why})" in lines


def test_orchestrated_commands_beside_a_watcher_do_not_fight(
    images: tuple[Path, Path], tmp_path: Path
) -> None:
    """serve --qmp runs a watcher; vm save/load/delete on the other monitor must still work."""
    image, disk = images
    options = {"poll_interval": 0.05, "grace": 0.0}
    with watched_state_a(images, tmp_path, **options) as (s, thread, lines):
        watcher = thread.watcher
        assert watcher is not None
        for action in ("save", "load", "delete"):
            s.vm(action, "T1")
            target = watcher.reconciles + 3

            def polled(target: int = target) -> bool:
                return watcher.reconciles >= target

            wait_until(polled, "three more polls")
            expected = [] if action == "delete" else ["T1"]
            assert snapshot_tags(image) == snapshot_tags(disk) == expected
    assert thread.error is None
    assert not [line for line in lines if line.startswith(("error:", "missing:"))], lines


def test_a_save_whose_pause_saw_the_tpm_change_is_not_reported_as_a_load(
    images: tuple[Path, Path], tmp_path: Path
) -> None:
    """The TPM changes while the VM is paused (as a command in flight at the pause does),
    then ``vm save``: the watcher must not take the new snapshot for a loadvm (issue 11)."""
    image, disk = images
    # polls only now and then: the events (STOP, the save job, RESUME) drive the reconciles
    with watched_state_a(images, tmp_path, poll_interval=30) as (s, thread, lines):
        watcher = thread.watcher
        assert watcher is not None
        hmp_over_qmp(s.qemu.qmp, "stop")
        wait_until(lambda: watcher.pause_digests is not None, "the watcher to see the pause")
        state_b(s.tpm)  # qtest drives the TIS while the vCPUs are stopped
        s.vm("save", "T1")
        target = watcher.reconciles + 1
        hmp_over_qmp(s.qemu.qmp, "cont")
        wait_until(lambda: watcher.reconciles >= target, "the reconcile at RESUME")
        assert snapshot_tags(image) == snapshot_tags(disk) == ["T1"]
        assert permall(image, "T1") == permall(image)
    assert not [line for line in lines if line.startswith("loaded:")], lines


def _save_while_paused_then_change(s: Stack, watcher: Watcher, tag: str) -> None:
    """Pause, HMP ``savevm`` (no event on a paused VM), the TPM moves on to state B (as a
    guest's first commands after the resume do before the watcher hears of it), resume."""
    hmp_over_qmp(s.qemu.qmp, "stop")
    wait_until(lambda: watcher.pause_layout is not None, "the watcher to see the pause")
    hmp_over_qmp(s.qemu.qmp, f"savevm {tag}")
    state_b(s.tpm)
    target = watcher.reconciles + 1
    hmp_over_qmp(s.qemu.qmp, "cont")
    wait_until(lambda: watcher.reconciles >= target, "the reconcile at RESUME")


def test_a_followed_savevm_files_the_state_qemu_saved_not_the_later_one(
    images: tuple[Path, Path], tmp_path: Path
) -> None:
    """Issue 11: the TPM state changed between the save and the watcher's reconcile; the
    vTPM snapshot must hold the state in the disk snapshot's vmstate, and the active state
    must keep the later changes."""
    image, disk = images
    with watched_state_a(images, tmp_path, poll_interval=30) as (s, thread, lines):
        watcher = thread.watcher
        assert watcher is not None
        saved = permall(image)
        _save_while_paused_then_change(s, watcher, "T1")
        assert snapshot_tags(image) == snapshot_tags(disk) == ["T1"]
        assert permall(image, "T1") == saved != permall(image)
        assert_permanent_state_b(s.tpm)  # the active state was not touched
    assert any("created: vTPM snapshot 'T1'" in x and "from its vmstate" in x for x in lines)
    # QEMU agrees: loading T1 pushes the vmstate's state, which is the one filed
    with stack(tmp_path / "run2", image, disk) as s2:
        hmp_over_qmp(s2.qemu.qmp, "loadvm T1")
        assert permall(image) == saved
        assert_permanent_state_a(s2.tpm)


def test_without_a_readable_vmstate_a_changed_state_is_not_filed(
    images: tuple[Path, Path], tmp_path: Path
) -> None:
    """No vmstate description to read (suppress-vmdesc): the state of the pause is unknown
    once the TPM changed, so the tag is refused with the reason, never filed with a later
    state; an unchanged state is filed."""
    image, disk = images
    extra = ["-machine", "suppress-vmdesc=on"]
    lines: list[str] = []
    with stack(tmp_path / "run", image, disk, extra=extra) as s:
        state_a(s.tpm)
        with watcher_thread(s, lines.append, poll_interval=30) as thread:
            watcher = thread.watcher
            assert watcher is not None
            _save_while_paused_then_change(s, watcher, "T1")
            assert snapshot_tags(disk) == ["T1"] and snapshot_tags(image) == []
            hmp_over_qmp(s.qemu.qmp, "stop")
            wait_until(lambda: watcher.pause_layout is not None, "the watcher to see the pause")
            hmp_over_qmp(s.qemu.qmp, "savevm T2")
            target = watcher.reconciles + 1
            hmp_over_qmp(s.qemu.qmp, "cont")
            wait_until(lambda: watcher.reconciles >= target, "the reconcile at RESUME")
            assert snapshot_tags(image) == ["T2"]
            assert permall(image, "T2") == permall(image)
    text = "\n".join(lines)
    assert "not filed: vTPM snapshot 'T1'" in text and "changed after the pause" in text, text
    assert "created: vTPM snapshot 'T2'" in text and "unchanged since the pause" in text, text


def test_a_vmstate_in_the_clear_is_not_filed_for_an_swtpm_with_a_state_key(
    images: tuple[Path, Path], tmp_path: Path
) -> None:
    """swtpm run with --key but no --migration-key keeps permall encrypted while QEMU's
    vmstate holds it in the clear: filing the vmstate's would leave a snapshot that swtpm
    cannot load, so the tag is refused with the reason (it changed after the pause)."""
    image, disk = images
    key = tmp_path / "state.key"
    key.write_bytes(bytes(range(32)))
    key.chmod(0o600)
    options = ["--swtpm-option=--key", f"--swtpm-option=file={key},format=binary,mode=aes-256-cbc"]
    lines: list[str] = []
    with stack(tmp_path / "run", image, disk, serve_options=options) as s:
        state_a(s.tpm)
        stored = permall(image)
        assert stored is not None and parse_blob(stored).encrypted  # swtpm's key is in use
        with watcher_thread(s, lines.append, poll_interval=30) as thread:
            watcher = thread.watcher
            assert watcher is not None
            _save_while_paused_then_change(s, watcher, "T1")
            assert snapshot_tags(disk) == ["T1"] and snapshot_tags(image) == []
    text = "\n".join(lines)
    assert "not filed: vTPM snapshot 'T1'" in text, text
    assert "swtpm encrypts its state, the vmstate does not" in text, text

"""Live migration between two QEMUs on this machine, each with its own vtpm-qcow daemon.

The source serves the image with ``serve --qmp`` (the watcher releases the image when its
QEMU completed an outgoing migration), the destination with ``serve --incoming --qmp``
beside a QEMU started with ``-incoming unix:...``; the migration itself is QMP's
``migrate`` (libvirt cannot migrate a domain to the host it runs on).  The image is shared
by path (the same file) or not (``vtpm-qcow migrate-prepare`` copies it first).  TPM state
is written and read through QEMU's TIS (qtest), as a guest would; the image is read with
``qemu-img`` and, after the VMs are gone, by a fresh serve + QEMU.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import held_by_qemu_io, need
from tests.vm.qemu_fixtures import (
    QemuProcess,
    ServedStore,
    create_disk,
    hmp_over_qmp,
    qemu_vm,
    qmp_query,
    quit_qemu,
    run_tool,
    served_store,
    swtpm_process,
)
from tests.vm.scenario import (
    NV_INDEX,
    NV_SIZE,
    OWNER_B,
    PCR,
    assert_permanent_state_a,
    assert_permanent_state_b,
    permall,
    snapshot_tags,
    stack,
    state_a,
    state_b,
    wait_until,
)
from tests.vtpm.mount_fixtures import one_line_failure, vtpm_qcow
from tests.vtpm.test_encrypted import ITER
from tests.vtpm.test_secret import private_file
from vtpm_qcow.errors import StoreError
from vtpm_qcow.export.control import ControlClient
from vtpm_qcow.state import linear
from vtpm_qcow.tpm.client import Tpm
from vtpm_qcow.tpm.qtest_tis import QtestTisTransport
from vtpm_qcow.vm import DEFAULT_POLL_INTERVAL

TOOK_OVER = "migration: took over"
RELEASED = "migration: released"


@dataclass
class Side:
    """One host's half: the vtpm-qcow daemon, its QEMU and a TPM client through the TIS."""

    workdir: Path
    image: Path
    served: ServedStore
    qemu: QemuProcess
    tis: QtestTisTransport
    tpm: Tpm

    def log(self) -> str:
        return self.served.log.read_text(errors="replace")


@contextlib.contextmanager
def side(
    workdir: Path,
    image: Path,
    disk: Path,
    *,
    incoming: str | None = None,
    view: str = "file",
    options: tuple[str, ...] = (),
) -> Iterator[Side]:
    """``serve IMAGE --qmp`` (``--incoming`` with ``incoming``: QEMU's ``-incoming`` URI)
    and a QEMU on it; all stopped on exit."""
    workdir.mkdir(exist_ok=True)
    options = (*options, "--qmp", str(workdir / "qmp2.sock"))
    extra = []
    if incoming is not None:
        # its own control socket and pid file: on one machine, the default ones (by the
        # image's path) are the source daemon's
        options += ("--incoming", "--control", str(workdir / "ctl.sock"))
        options += ("--pid-file", str(workdir / "serve.pid"))
        extra = ["-incoming", incoming]
    with (
        served_store(image, workdir, view=view, extra=list(options)) as served,
        qemu_vm(workdir, str(served.swtpm_ctrl), [disk], extra=extra) as qemu,
        QtestTisTransport(str(qemu.qtest)) as tis,
    ):
        yield Side(workdir, image, served, qemu, tis, Tpm(tis))


def qmp(qemu: QemuProcess, command: str, **arguments: Any) -> Any:
    """One QMP command with arguments; its reply (``return`` or ``error``)."""
    from qemu.qmp.legacy import QEMUMonitorProtocol

    monitor = QEMUMonitorProtocol(str(qemu.qmp))
    monitor.connect()
    try:
        return monitor.cmd_obj({"execute": command, "arguments": arguments})
    finally:
        monitor.close()


def migration_status(qemu: QemuProcess) -> str:
    return str(qmp_query(qemu.qmp, "query-migrate").get("status", "none"))


def start_migration(src: Side, uri: str, *, bandwidth: int | None = None) -> None:
    if bandwidth is not None:  # bytes/s: slow enough to act in the middle
        reply = qmp(src.qemu, "migrate-set-parameters", **{"max-bandwidth": bandwidth})
        assert "return" in reply, reply
    reply = qmp(src.qemu, "migrate", uri=uri)
    assert "return" in reply, reply


def wait_status(qemu: QemuProcess, *wanted: str, timeout: float = 60) -> str:
    found = ""

    def reached() -> bool:
        nonlocal found
        found = migration_status(qemu)
        return found in wanted

    wait_until(reached, f"migration status {wanted}", timeout)
    return found


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def permall_with(image: Path, tag: str | None = None, *, secret: str | None) -> bytes | None:
    """:func:`permall` (qemu-img's reading) of an image that may be encrypted."""
    if secret is None:
        return permall(image, tag)
    raw = image.with_name(f"{image.name}.{tag or 'active'}.raw")
    args = ["convert", "-U", "--object", f"secret,id=s0,file={secret}", "-O", "raw"]
    if tag:
        args += ["-l", f"snapshot.name={tag}"]
    opts = f"driver=qcow2,file.filename={image},encrypt.key-secret=s0"
    run_tool(need("qemu-img"), *args, "--image-opts", opts, str(raw))
    try:
        return linear.read_section(raw.read_bytes(), "permall", source=str(raw))
    finally:
        raw.unlink()


def migrate_and_check(
    tmp_path: Path,
    image: Path,
    disk: Path,
    *,
    shared: bool,
    quit_source: bool = True,
    view: str = "file",
    options: tuple[str, ...] = (),
) -> None:
    """Snapshot T0, TPM state A on the source, migrate (to a copy of the image made by
    migrate-prepare before A when not ``shared``): the destination sees A, takes the image
    over, follows a new snapshot and moves on to state B, which a cold boot sees."""
    uri = f"unix:{tmp_path / 'migrate.sock'}"
    secret = options[options.index("--secret-file") + 1] if "--secret-file" in options else None
    read_permall = functools.partial(permall_with, secret=secret)
    dst_image = image if shared else tmp_path / "dst-vtpm.qcow2"
    with side(tmp_path / "src", image, disk, view=view, options=options) as src:
        hmp_over_qmp(src.qemu.qmp, "savevm T0")  # the source's watcher files T0
        wait_until(lambda: snapshot_tags(image) == ["T0"], "T0 in the vTPM image")
        if not shared:  # copied while served: through the daemon, before state A
            done = vtpm_qcow("migrate-prepare", str(image), str(dst_image))
            assert "1 snapshots: T0" in done.stderr
            assert snapshot_tags(dst_image) == ["T0"]
        pcr_a = state_a(src.tpm)
        saved = read_permall(image)
        if not shared:
            assert read_permall(dst_image) != saved  # A reaches it through the migration only
        with side(
            tmp_path / "dst", dst_image, disk, incoming=uri, view=view, options=options
        ) as dst:
            start_migration(src, uri)
            assert wait_status(src.qemu, "completed", "failed") == "completed"
            assert wait_status(dst.qemu, "completed", "failed") == "completed"
            # the source's daemon released the image on its QEMU's word (the QEMU still
            # runs, in postmigrate); the destination's took it over
            wait_until(lambda: TOOK_OVER in dst.log(), "the destination taking over")
            assert qmp_query(src.qemu.qmp, "query-status")["status"] == "postmigrate"
            wait_until(lambda: RELEASED in src.log(), "the source releasing the image")
            # what the source's daemon serves now is not the image: its control socket
            # refuses the store's operations (a backup, a snapshot through it)
            with ControlClient.for_image(image) as client, pytest.raises(StoreError) as refused:
                client.capture()
            assert "migrated away" in str(refused.value)
            if quit_source:
                quit_qemu(src.qemu)
            else:  # killed: nothing it does any more matters
                # meanwhile, in postmigrate, its watcher has nothing to align: the in-memory
                # copy it would see is not the VM's vTPM
                time.sleep(2 * DEFAULT_POLL_INTERVAL)
                after = src.log().split(RELEASED, 1)[1]
                assert "qmp watcher:" not in after, after
                src.qemu.proc.send_signal(signal.SIGKILL)
                src.qemu.proc.wait()
            src.served.proc.wait(30)
            assert read_permall(dst_image) == saved
            qmp(dst.qemu, "cont")
            assert dst.tpm.pcr_read([PCR])[PCR] == pcr_a  # volatile state: from the stream
            assert_permanent_state_a(dst.tpm)
            hmp_over_qmp(dst.qemu.qmp, "savevm T1")  # the destination's watcher files T1
            wait_until(lambda: snapshot_tags(dst_image) == ["T0", "T1"], "T1 in the image")
            assert read_permall(dst_image, "T1") == saved
            state_b(dst.tpm)  # the destination writes the image now
            assert_permanent_state_b(dst.tpm)
            changed = read_permall(dst_image)
            assert changed is not None and changed != saved
            quit_qemu(dst.qemu)
            dst.served.proc.wait(30)
    assert read_permall(dst_image) == changed
    if not shared:
        assert read_permall(image) == saved  # the source's image: as the source left it
    # a real swtpm loads it: the guest sees state B after a cold boot
    with stack(
        tmp_path / "again", dst_image, disk, view=view, serve_options=list(options)
    ) as again:
        again.tpm.startup()
        assert_permanent_state_b(again.tpm)


@pytest.mark.parametrize("view", ["file", "dir"])
def test_shared_image_migrates_and_the_destination_takes_it_over(
    images: tuple[Path, Path], tmp_path: Path, view: str
) -> None:
    image, disk = images
    migrate_and_check(tmp_path, image, disk, shared=True, view=view)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "unshared"])
def test_encrypted_image_migrates(tmp_path: Path, shared: bool) -> None:
    """The destination reads and takes over a LUKS image with the same secret."""
    key = private_file(tmp_path / "vtpm.key")
    image = tmp_path / "vtpm.qcow2"
    vtpm_qcow("create", "--encrypt", "--iter-time", ITER, "--secret-file", str(key), str(image))
    disk = create_disk(tmp_path / "disk.qcow2")
    options = ("--secret-file", str(key))
    migrate_and_check(tmp_path, image, disk, shared=shared, options=options)


def test_source_killed_after_completion(images: tuple[Path, Path], tmp_path: Path) -> None:
    image, disk = images
    migrate_and_check(tmp_path, image, disk, shared=True, quit_source=False)


def test_unshared_image_prepared_with_its_snapshots(
    images: tuple[Path, Path], tmp_path: Path
) -> None:
    image, disk = images
    migrate_and_check(tmp_path, image, disk, shared=False)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "unshared"])
@pytest.mark.parametrize("how", ["cancel", "kill-destination"])
def test_failed_migration_leaves_the_source_serving_and_the_images_untouched(
    images: tuple[Path, Path], tmp_path: Path, how: str, shared: bool
) -> None:
    image, disk = images
    uri = f"unix:{tmp_path / 'migrate.sock'}"
    dst_image = image if shared else tmp_path / "dst-vtpm.qcow2"
    with side(tmp_path / "src", image, disk) as src:
        state_a(src.tpm)
        if not shared:
            vtpm_qcow("migrate-prepare", str(image), str(dst_image))
        before, dst_before = file_digest(image), file_digest(dst_image)
        with side(tmp_path / "dst", dst_image, disk, incoming=uri) as dst:
            start_migration(src, uri, bandwidth=1000)
            wait_status(src.qemu, "active")
            wait_status(dst.qemu, "active")
            with (
                ControlClient(dst.workdir / "ctl.sock") as client,
                pytest.raises(StoreError) as refused,
            ):
                client.capture()
            assert "not taken over yet" in str(refused.value)
            # the source's watcher polls QEMU's run state meanwhile: an active migration
            # is no completed one (the image stays the source's)
            time.sleep(2 * DEFAULT_POLL_INTERVAL)
            if how == "cancel":
                assert "return" in qmp(src.qemu, "migrate_cancel")
                assert wait_status(src.qemu, "cancelled", "completed") == "cancelled"
            else:
                dst.qemu.proc.send_signal(signal.SIGKILL)
                assert wait_status(src.qemu, "failed", "completed") == "failed"
            # the destination's QEMU is gone, its swtpm with it: its daemon stops
            dst.qemu.proc.wait(30)
            assert dst.served.proc.wait(30) == 1  # one line: why, and that it wrote nothing
            assert "image untouched" in dst.log() and TOOK_OVER not in dst.log()
            assert "Traceback" not in dst.log()
        time.sleep(2 * DEFAULT_POLL_INTERVAL)  # and so is a failed one
        assert file_digest(image) == before and file_digest(dst_image) == dst_before
        assert RELEASED not in src.log()
        assert_permanent_state_a(src.tpm)
        state_b(src.tpm)  # the source still writes its image
        assert_permanent_state_b(src.tpm)
    with stack(tmp_path / "again", image, disk) as again:
        again.tpm.startup()
        assert_permanent_state_b(again.tpm)


def test_source_resumed_after_completion_takes_its_image_back(
    images: tuple[Path, Path], tmp_path: Path
) -> None:
    """The management rolls back after QEMU completed (the destination never started, here
    a plain swtpm's QEMU that never runs): ``cont`` on the source takes the image back,
    and what its TPM does from then on lands in it."""
    image, disk = images
    uri = f"unix:{tmp_path / 'migrate.sock'}"
    with side(tmp_path / "src", image, disk) as src:
        state_a(src.tpm)
        state_dir = tmp_path / "plain-state"
        state_dir.mkdir()
        (tmp_path / "dst").mkdir()
        with (
            swtpm_process(f"dir={state_dir}", tmp_path / "dst", data_channel=False) as plain,
            qemu_vm(tmp_path / "dst", str(plain.ctrl), [disk], extra=["-incoming", uri]) as dst,
        ):
            start_migration(src, uri)
            assert wait_status(src.qemu, "completed", "failed") == "completed"
            wait_until(lambda: RELEASED in src.log(), "the source releasing the image")
            quit_qemu(dst)
        reply = qmp(src.qemu, "cont")
        assert "return" in reply, reply
        wait_until(lambda: "migration: took over" in src.log(), "the source taking it back")
        state_b(src.tpm)
        assert_permanent_state_b(src.tpm)
        changed = permall(image)
    assert changed == permall(image)  # the source's last word
    with stack(tmp_path / "again", image, disk) as again:
        again.tpm.startup()
        assert_permanent_state_b(again.tpm)


def test_bad_input_is_one_line_and_touches_nothing(tmp_path: Path) -> None:
    image = tmp_path / "vtpm.qcow2"
    vtpm_qcow("create", str(image))
    before = file_digest(image)
    refused = one_line_failure("serve", str(image), "--ctrl", str(tmp_path / "s"), "--incoming")
    assert "--incoming needs --qmp" in refused
    missing = str(tmp_path / "missing.qcow2")
    assert "no such image" in one_line_failure(
        "serve", missing, "--ctrl", str(tmp_path / "s"), "--incoming", "--qmp", "q"
    )
    assert "no such image" in one_line_failure("migrate-prepare", missing, str(tmp_path / "d"))
    exists = tmp_path / "exists.qcow2"
    exists.write_bytes(b"keep me")
    assert "never overwrites" in one_line_failure("migrate-prepare", str(image), str(exists))
    assert exists.read_bytes() == b"keep me"
    nodir = tmp_path / "no" / "dir.qcow2"
    assert "no such directory" in one_line_failure("migrate-prepare", str(image), str(nodir))
    assert file_digest(image) == before
    with held_by_qemu_io(image):  # held, but by no daemon: nothing consistent to read
        held = one_line_failure("migrate-prepare", str(image), str(tmp_path / "copy.qcow2"))
        assert "not a vtpm-qcow daemon" in held
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.qcow2", "vtpm.qcow2"]


def test_saved_to_a_file_then_restored_under_keep_serving(
    images: tuple[Path, Path], tmp_path: Path
) -> None:
    """A migration to a file (virsh save, managedsave) leaves QEMU in postmigrate too: the
    daemon lets go of the image, and takes it again for the next QEMU run (``--keep-serving``),
    whose restored TPM state and what follows land in the image, not in memory."""
    image, disk = images
    work, saved = tmp_path / "run", tmp_path / "vm.state"
    qdir = work / "qemu"
    qdir.mkdir(parents=True)
    options = ["--qmp", str(qdir / "qmp2.sock"), "--keep-serving"]
    with served_store(image, work, extra=options) as served:
        log = served.log.read_text
        with (
            qemu_vm(qdir, str(served.swtpm_ctrl), [disk]) as qemu,
            QtestTisTransport(str(qemu.qtest)) as tis,
        ):
            pcr_a = state_a(Tpm(tis))
            assert "return" in qmp(qemu, "migrate", uri=f"exec:cat > {saved}")
            assert wait_status(qemu, "completed", "failed") == "completed"
            wait_until(lambda: RELEASED in log(), "the daemon releasing the image")
            quit_qemu(qemu)
        assert not (qdir / "qmp2.sock").exists()  # QEMU removed it: the next one makes it
        restore = ["-incoming", f"exec:cat {saved}"]
        with (
            qemu_vm(qdir, str(served.swtpm_ctrl), [disk], extra=restore) as qemu,
            QtestTisTransport(str(qemu.qtest)) as tis,
        ):
            assert wait_status(qemu, "completed", "failed") == "completed"
            wait_until(lambda: TOOK_OVER in log(), "the daemon taking the image again")
            qmp(qemu, "cont")
            tpm = Tpm(tis)
            assert tpm.pcr_read([PCR])[PCR] == pcr_a
            assert_permanent_state_a(tpm)
            state_b(tpm)
            changed = permall(image)
    assert changed == permall(image)
    with stack(tmp_path / "again", image, disk) as again:
        again.tpm.startup()
        assert_permanent_state_b(again.tpm)


def test_source_without_qmp_lets_go_when_its_qemu_quits(
    images: tuple[Path, Path], tmp_path: Path
) -> None:
    """A source daemon without a watcher cannot tell a migration from a pause: the
    destination takes over once the source QEMU quit (its swtpm ends, its daemon exits);
    what the destination's TPM did meanwhile was kept for it in memory."""
    image, disk = images
    uri = f"unix:{tmp_path / 'migrate.sock'}"
    (tmp_path / "src").mkdir()
    with (
        served_store(image, tmp_path / "src") as served,
        qemu_vm(tmp_path / "src", str(served.swtpm_ctrl), [disk]) as src_qemu,
        QtestTisTransport(str(src_qemu.qtest)) as tis,
    ):
        pcr_a = state_a(Tpm(tis))
        with side(tmp_path / "dst", image, disk, incoming=uri) as dst:
            reply = qmp(src_qemu, "migrate", uri=uri)
            assert "return" in reply, reply
            assert wait_status(dst.qemu, "completed", "failed") == "completed"
            wait_until(lambda: "waiting for the source" in dst.log(), "the destination waiting")
            qmp(dst.qemu, "cont")
            assert dst.tpm.pcr_read([PCR])[PCR] == pcr_a
            state_b(dst.tpm)  # into the destination's memory: the source holds the image
            in_image = permall(image)
            quit_qemu(src_qemu)
            served.proc.wait(30)
            wait_until(lambda: TOOK_OVER in dst.log(), "the destination taking over")
            assert permall(image) != in_image  # state B, committed at the hand-over
            assert_permanent_state_b(dst.tpm)
            quit_qemu(dst.qemu)
            dst.served.proc.wait(30)
    with stack(tmp_path / "again", image, disk) as again:
        again.tpm.startup()
        assert_permanent_state_b(again.tpm)


def test_destination_daemon_killed_mid_migration(images: tuple[Path, Path], tmp_path: Path) -> None:
    """kill -9 of the destination's daemon: it never wrote the image.  Its swtpm cannot
    store the incoming state, so the destination QEMU fails to load it; the source
    completed (precopy does not wait for the load) or failed, and either way, resumed,
    it serves the image on."""
    image, disk = images
    uri = f"unix:{tmp_path / 'migrate.sock'}"
    with side(tmp_path / "src", image, disk) as src:
        state_a(src.tpm)
        saved = permall(image)
        with side(tmp_path / "dst", image, disk, incoming=uri) as dst:
            start_migration(src, uri, bandwidth=1000)
            wait_status(dst.qemu, "active")
            dst.served.proc.send_signal(signal.SIGKILL)
            dst.served.proc.wait()
            reply = qmp(src.qemu, "migrate-set-parameters", **{"max-bandwidth": 1 << 30})
            assert "return" in reply, reply
            status = wait_status(src.qemu, "completed", "failed")
            dst.qemu.proc.wait(30)  # its TPM state could not be stored: the load failed
            # the source's QEMU fetched the volatile state at completion (swtpm stored it
            # through the source's daemon), nothing else changed
            assert permall(image) == saved
            if status == "completed":  # the management resumes the source
                wait_until(lambda: RELEASED in src.log(), "the source releasing the image")
                assert "return" in qmp(src.qemu, "cont")
                wait_until(lambda: TOOK_OVER in src.log(), "the source taking it back")
        assert_permanent_state_a(src.tpm)
        state_b(src.tpm)
        assert_permanent_state_b(src.tpm)
    with stack(tmp_path / "again", image, disk) as again:
        again.tpm.startup()
        assert_permanent_state_b(again.tpm)


def test_there_and_back_again(images: tuple[Path, Path], tmp_path: Path) -> None:
    """The daemon that took the image over is an ordinary source for the next migration."""
    image, disk = images
    there, back = f"unix:{tmp_path / 'there.sock'}", f"unix:{tmp_path / 'back.sock'}"
    with side(tmp_path / "a", image, disk) as a:
        pcr_a = state_a(a.tpm)
        with side(tmp_path / "b", image, disk, incoming=there) as b:
            start_migration(a, there)
            assert wait_status(b.qemu, "completed", "failed") == "completed"
            wait_until(lambda: TOOK_OVER in b.log(), "b taking over")
            quit_qemu(a.qemu)
            a.served.proc.wait(30)
            qmp(b.qemu, "cont")
            state_b(b.tpm)
            with side(tmp_path / "c", image, disk, incoming=back) as c:
                start_migration(b, back)
                assert wait_status(c.qemu, "completed", "failed") == "completed"
                wait_until(lambda: TOOK_OVER in c.log(), "c taking over")
                assert RELEASED in b.log()
                quit_qemu(b.qemu)
                qmp(c.qemu, "cont")
                assert c.tpm.pcr_read([PCR])[PCR] != pcr_a  # extended on b
                assert_permanent_state_b(c.tpm)
                c.tpm.nv_write(NV_INDEX, b"C" * NV_SIZE, owner=True, auth=OWNER_B)
                quit_qemu(c.qemu)
                c.served.proc.wait(30)
    with stack(tmp_path / "again", image, disk) as again:
        again.tpm.startup()
        assert again.tpm.nv_read(NV_INDEX, NV_SIZE, owner=True, auth=OWNER_B) == b"C" * NV_SIZE

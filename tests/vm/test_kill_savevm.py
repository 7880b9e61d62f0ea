"""``kill -9`` of QEMU in the middle of an HMP ``savevm`` while ``vtpm-qcow serve --qmp``
runs its vTPM (issue 13).

The VM's RAM is a private mapping of a file of random bytes, so ``savevm`` writes a few
hundred MiB of VM state and takes long enough to be killed at different points (measured
by a first, acknowledged ``savevm T0``).  After each kill:

* swtpm (``--terminate``) and serve end with QEMU; the disk and the vTPM image are
  ``qemu-img check`` clean (leaks at most: a VM state QEMU never got to reference);
* nothing acknowledged is lost: T0 is on the disk and in the vTPM image, and ``vm verify``
  finds the TPM state in T0's VM state equal to the vTPM snapshot's;
* restarted (serve without ``--qmp``, a new QEMU on the same disk), ``vtpm-qcow vm status``
  says exactly what is misaligned: exit 3 and one ``mismatch`` line per tag that the
  disk and the vTPM image do not both have (a T1 whose disk snapshot QEMU completed before
  the kill but serve's watcher never saw), exit 0 when nothing is;
* ``serve --qmp`` restarted reconciles at connect: then ``vm status`` says aligned and
  ``vm verify`` finds every tag's TPM state equal on both sides.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import need
from tests.vm.qemu_fixtures import QemuProcess, create_disk, hmp_over_qmp, qemu_vm
from tests.vtpm.mount_fixtures import (
    create_image,
    qemu_img_snapshots,
    runtime_dir,  # noqa: F401  (fixture)
    vtpm_qcow,
    wait_gone,
)
from vtpm_qcow.export.control import ControlClient, pid_path_for
from vtpm_qcow.state.store import Store

pytestmark = pytest.mark.usefixtures("runtime_dir")

RAM_MIB = 256
#: where in savevm's measured duration each kill lands; None: at once after savevm of a
#: paused VM replied (no RESUME: serve's watcher notices the new disk snapshot at its next
#: poll, a second later, so QEMU dies before the vTPM follows; tried up to 3 times)
FRACTIONS = (0.2, 0.5, 0.8, 0.97, 1.1, None, None, None)


def wait_for(condition: object, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def ram_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """RAM_MIB MiB of random bytes: the VM's RAM (mapped privately, never written)."""
    path = tmp_path_factory.mktemp("ram") / "ram.bin"
    with path.open("wb") as f:
        for _ in range(RAM_MIB):
            f.write(os.urandom(1 << 20))
    return path


def ram_options(ram: Path) -> list[str]:
    return [
        "-m", f"{RAM_MIB}M",
        "-object", f"memory-backend-file,id=ram0,size={RAM_MIB}M,mem-path={ram},share=off",
        "-machine", "memory-backend=ram0",
    ]  # fmt: skip


@contextlib.contextmanager
def serving(image: Path, workdir: Path, *, qmp: Path | None) -> Iterator[int]:
    """``vtpm-qcow serve`` (detached) with swtpm on ``workdir/swtpm.sock``; its pid.
    Stopped (SIGTERM) on exit if still running."""
    log = workdir / "serve.log"
    follow = ["--qmp", str(qmp)] if qmp is not None else []
    vtpm_qcow(
        "serve", str(image), "--ctrl", str(workdir / "swtpm.sock"), "--log", str(log),
        "--view", "file", *follow,
    )  # fmt: skip
    pid = int(pid_path_for(image).read_text())
    try:
        yield pid
    finally:
        # serve ends with QEMU (swtpm with it); SIGTERM only one that does not
        if not wait_gone(pid, 10):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        gone = wait_gone(pid)
        left = mounts_of(image)
        for mountpoint in left:  # never leave a mount behind, whatever the test found
            subprocess.run(["fusermount3", "-u", "-z", mountpoint], check=False)
        assert gone, "serve did not stop"
        assert not left, f"serve left its mount {left}"


def mounts_of(image: Path) -> list[str]:
    """The mount points of FUSE mounts serving ``image`` (the mount's source names it)."""
    with open("/proc/self/mounts") as mounts:
        return [
            fields[1]
            for fields in (line.split() for line in mounts)
            if fields[0] == os.fspath(image) and fields[2].startswith("fuse")
        ]


def vtpm_tags(image: Path) -> list[str]:
    with Store.open(image, writable=False, force_share=True) as store:
        return store.snapshot_tags()


def check_exit(image: Path) -> int:
    return subprocess.run(
        [need("qemu-img"), "check", str(image)], capture_output=True, timeout=60, check=False
    ).returncode


def vm_status(qemu: QemuProcess, image: Path) -> subprocess.CompletedProcess[str]:
    return vtpm_qcow("vm", "status", "--qmp", str(qemu.qmp), "--store", str(image), check=False)


def savevm_in_thread(qemu: QemuProcess, tag: str) -> tuple[threading.Thread, list[object]]:
    """HMP savevm TAG in a thread; the list gets its reply, or the error that ended it."""
    result: list[object] = []

    def run() -> None:
        try:
            result.append(hmp_over_qmp(qemu.qmp, f"savevm {tag}"))
        except BaseException as err:  # QEMU killed: the monitor connection drops
            result.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def test_kill_9_of_qemu_mid_savevm(tmp_path: Path, ram_file: Path) -> None:
    outcomes = []
    duration = None
    for run, fraction in enumerate(FRACTIONS):
        if fraction is None and any("exit 3" in o for o in outcomes):
            break
        workdir = tmp_path / f"run{run}"
        (workdir / "qemu").mkdir(parents=True)
        image = create_image(workdir / "vtpm.qcow2")
        disk = create_disk(workdir / "disk.qcow2")
        qmp2 = workdir / "qemu" / "qmp2.sock"
        with serving(image, workdir, qmp=qmp2) as pid:
            with qemu_vm(
                workdir / "qemu", str(workdir / "swtpm.sock"), [disk], running=True,
                extra=ram_options(ram_file),
            ) as qemu:  # fmt: skip
                log = workdir / "serve.log"
                wait_for(following(log), "the watcher")
                start = time.monotonic()
                assert hmp_over_qmp(qemu.qmp, "savevm T0") == ""
                took = time.monotonic() - start
                duration = duration or took
                wait_for(functools.partial(has_tag, image, "T0"), "the vTPM snapshot of T0")
                if fraction is None:
                    hmp_over_qmp(qemu.qmp, "stop")
                thread, result = savevm_in_thread(qemu, "T1")
                if fraction is None:
                    thread.join(60)
                else:
                    time.sleep(fraction * duration)
                qemu.proc.send_signal(signal.SIGKILL)
                qemu.proc.wait(30)
                thread.join(30)
            assert wait_gone(pid), "serve outlived a QEMU killed with -9"
        replied = bool(result) and result[0] == ""
        assert check_exit(disk) in (0, 3), f"disk after a kill at {fraction}"
        assert check_exit(image) in (0, 3), f"vTPM image after a kill at {fraction}"
        disk_tags, tpm_tags = qemu_img_snapshots(disk), vtpm_tags(image)
        assert "T0" in disk_tags and "T0" in tpm_tags, (disk_tags, tpm_tags)
        if replied:  # acknowledged: on the disk (the vTPM follows at the next connect)
            assert "T1" in disk_tags
        verified = vtpm_qcow("vm", "verify", "--disk", str(disk), str(image), check=False)
        assert "T0" in verified.stdout and "match" in verified.stdout.split("T0", 1)[1], (
            verified.stdout
        )
        # restarted without the watcher: vm status tells what is misaligned
        restart = workdir / "again"
        (restart / "qemu").mkdir(parents=True)
        with (
            serving(image, restart, qmp=None),
            qemu_vm(restart / "qemu", str(restart / "swtpm.sock"), [disk]) as qemu,
        ):
            status = vm_status(qemu, image)
            only_disk = sorted(set(disk_tags) - set(tpm_tags))
            only_vtpm = sorted(set(tpm_tags) - set(disk_tags))
            mismatches = [line for line in status.stdout.splitlines() if "mismatch" in line]
            expected = [f"mismatch: '{t}' is on the disks disk0 only" for t in only_disk] + [
                f"mismatch: '{t}' is on the vTPM image only" for t in only_vtpm
            ]
            assert sorted(mismatches) == sorted(expected), status.stdout
            assert status.returncode == (3 if expected else 0), status
            quit_monitor(qemu)
        # serve --qmp again: the watcher reconciles at connect
        again = workdir / "reconcile"
        (again / "qemu").mkdir(parents=True)
        with (
            serving(image, again, qmp=again / "qemu" / "qmp2.sock"),
            qemu_vm(again / "qemu", str(again / "swtpm.sock"), [disk]) as qemu,
        ):
            wait_for(following(again / "serve.log"), "the watcher")
            status = vm_status(qemu, image)
            assert status.returncode == 0, status
            quit_monitor(qemu)
        # and every tag's TPM state in the VM state is the vTPM snapshot's
        verified = vtpm_qcow("vm", "verify", "--disk", str(disk), str(image), check=False)
        assert verified.returncode == 0, verified.stdout
        when = "after the reply" if fraction is None else f"at {fraction:.2f} of {duration:.2f} s"
        outcomes.append(
            f"kill {when}: savevm "
            f"{'replied' if replied else 'cut'}, T1 on disk {'T1' in disk_tags}, "
            f"in vTPM {'T1' in tpm_tags}, vm status exit {3 if expected else 0}"
        )
    print("\n".join(outcomes))
    assert any("cut" in o for o in outcomes), outcomes
    assert any("exit 3" in o for o in outcomes), outcomes


def has_tag(image: Path, tag: str) -> bool:
    """Whether the serving daemon's image has vTPM snapshot ``tag``."""
    with ControlClient.for_image(image) as client:
        return tag in [s["tag"] for s in client.snapshot_list()]


def following(log: Path) -> functools.partial[bool]:
    """A condition: serve's watcher follows QEMU (says its log)."""
    return functools.partial(_says, log, "qmp watcher following")


def _says(log: Path, text: str) -> bool:
    return text in log.read_text()


def quit_monitor(qemu: QemuProcess) -> None:
    """Quit QEMU over QMP (swtpm and serve follow it)."""
    from tests.vm.qemu_fixtures import quit_qemu

    quit_qemu(qemu)


def test_sigterm_while_serve_stops_leaves_no_mount(tmp_path: Path) -> None:
    """serve stops by itself when its swtpm ends (QEMU quit); a SIGTERM meanwhile (a
    test's, systemd's) used to land after trio had given the default handler back and
    kill the daemon before its unmount, leaving a dead FUSE mount behind.  SIGTERMs every
    half millisecond from swtpm's shutdown until serve is gone hit every moment of it."""
    from vtpm_qcow.tpm.swtpm import CMD_SHUTDOWN, control_command

    for run in range(3):
        workdir = tmp_path / f"run{run}"
        workdir.mkdir()
        image = create_image(workdir / "vtpm.qcow2")
        log = workdir / "serve.log"
        ctrl = workdir / "swtpm.sock"
        vtpm_qcow("serve", str(image), "--ctrl", str(ctrl), "--log", str(log), "--view", "file")
        pid = int(pid_path_for(image).read_text())
        try:
            control_command(str(ctrl), CMD_SHUTDOWN)
            deadline = time.monotonic() + 30
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                time.sleep(0.0005)
            assert wait_gone(pid), "serve did not stop"
            assert mounts_of(image) == [], log.read_text()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            for mountpoint in mounts_of(image):
                subprocess.run(["fusermount3", "-u", "-z", mountpoint], check=False)

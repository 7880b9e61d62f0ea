"""The end-to-end scenario's building blocks: a served vTPM image + QEMU, TPM states A and B.

TPM state is changed and read through QEMU's TIS (qtest), like a guest would; the disks' and
the vTPM image's snapshot lists come from ``qemu-img -U`` (the oracle), and the vTPM
image's sections from ``qemu-img convert`` + the linear codec.
"""

from __future__ import annotations

import contextlib
import functools
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import need
from tests.vm.qemu_fixtures import (
    QemuProcess,
    ServedStore,
    hmp_over_qmp,
    qemu_vm,
    run_tool,
    served_store,
    stop_process,
)
from tests.vtpm.mount_fixtures import vtpm_qcow
from vtpm_qcow.errors import TpmResponseError
from vtpm_qcow.state import linear
from vtpm_qcow.tpm.client import Tpm, sha256
from vtpm_qcow.tpm.qtest_tis import QtestTisTransport
from vtpm_qcow.vm import DEFAULT_GRACE
from vtpm_qcow.vm.orchestrate import open_vtpm
from vtpm_qcow.vm.watch import WatcherThread

NV_INDEX = 0x01500040
NV_EXTRA = 0x01500041
NV_SIZE = 32
PCR = 10
OWNER_B = b"owner-of-branch-B"


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
        return vtpm_qcow(
            "vm", action, "--qmp", str(self.qemu.qmp), "--store", str(self.image), *rest,
            check=check,
        )  # fmt: skip


@contextlib.contextmanager
def stack(
    workdir: Path,
    image: Path,
    disk: Path,
    *,
    running: bool = True,
    extra: list[str] | None = None,
    view: str = "file",
    serve_options: list[str] | None = None,
) -> Iterator[Stack]:
    """Serve ``image`` (file or dir view; ``serve_options``: more serve options), start QEMU
    on it with ``disk`` (``extra``: more QEMU options); all stopped on exit."""
    workdir.mkdir(exist_ok=True)
    with (
        served_store(image, workdir, view=view, extra=serve_options) as served,
        qemu_vm(workdir, str(served.swtpm_ctrl), [disk], running=running, extra=extra) as qemu,
        QtestTisTransport(str(qemu.qtest)) as tis,
    ):
        yield Stack(workdir, image, disk, served, qemu, tis, Tpm(tis))


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


def save_a_then_change_to_b(s: Stack) -> None:
    """State A saved (disks + vTPM) as T1, then the TPM moves on to state B."""
    state_a(s.tpm)
    s.vm("save", "T1")
    state_b(s.tpm)


def orphan_vtpm_snapshot(s: Stack) -> None:
    """State A saved as T1, then T1 deleted from the disks only (QEMU's delvm, unwatched)."""
    state_a(s.tpm)
    s.vm("save", "T1")
    hmp_over_qmp(s.qemu.qmp, "delvm T1")


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll ``condition`` (a bounded wait for an asynchronous actor, not a timing check)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@dataclass
class WatchProcess:
    """A running ``vtpm-qcow vm watch`` and the files its stdout and stderr go to."""

    proc: subprocess.Popen[bytes]
    out: Path
    err: Path

    def output(self) -> str:
        """What it printed so far."""
        return self.out.read_text()


@contextlib.contextmanager
def watch_process(s: Stack, *options: str) -> Iterator[WatchProcess]:
    """``vtpm-qcow vm watch`` on the stack's second monitor, running once it says so."""
    out, err = s.workdir / "watch.out", s.workdir / "watch.err"
    with out.open("w") as out_file, err.open("w") as err_file:
        proc = subprocess.Popen(
            [need("vtpm-qcow"), "vm", "watch", "--qmp", str(s.qemu.qmp2), "--store",
             str(s.image), *options],
            stdout=out_file, stderr=err_file,
        )  # fmt: skip
    watch = WatchProcess(proc, out, err)
    try:
        wait_until(lambda: "watching" in watch.output(), "the watcher to start")
        yield watch
    finally:
        stop_process(proc)


@contextlib.contextmanager
def watcher_thread(
    s: Stack, report: Callable[[str], None], *, poll_interval: float, grace: float = DEFAULT_GRACE
) -> Iterator[WatcherThread]:
    """A :class:`WatcherThread` on the stack's second monitor, stopped on exit."""
    thread = WatcherThread(
        str(s.qemu.qmp2),
        functools.partial(open_vtpm, str(s.image)),
        report=report,
        poll_interval=poll_interval,
        grace=grace,
    )
    thread.start()
    try:
        yield thread
    finally:
        thread.stop()


def cold_boot_state(workdir: Path, image: Path, disk: Path, *, view: str = "file") -> None:
    """Start serve + QEMU again on the same files: the TPM must show state A."""
    with stack(workdir, image, disk, view=view) as again:
        again.tpm.startup()
        assert_permanent_state_a(again.tpm)

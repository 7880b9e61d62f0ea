#!/usr/bin/env python3
"""Benchmark: swtpm on four storage stacks, three workloads and memory, in one run.

Stacks (each gets a fresh image or directory, then runs every workload in turn):

* ``plain-dir``   swtpm ``--tpmstate dir=`` on a plain directory (no durability: no fsync)
* ``qsd-fuse``    swtpm ``backend-uri=file://`` on qemu-storage-daemon's FUSE export of the
                  qcow2 image (the Proxmox VE stack), with a QMP monitor for snapshots
* ``file-view``   swtpm ``backend-uri=file://`` on ``vtpm-qcow mount --view file``
* ``dir-view``    swtpm ``--tpmstate dir=`` on ``vtpm-qcow mount --view dir``

Workloads (a fresh swtpm each):

* NV writes: one NV index, then ``--commands`` TPM2_NV_Write commands with new random data,
  each of which makes swtpm store its whole permanent state once.  Reported: commands/s,
  latency p50/p95/p99, the storage daemon's CPU time per command (its threads' time on a
  CPU: a cost that load on the machine changes little), FUSE requests, the time inside
  vtpm-qcow's request handlers (the commit with its fdatasyncs included, and of it the time
  in the image flushes; not pyfuse3's and trio's own per-request work) and image flushes
  per commit (vtpm-qcow's own counters), the fdatasync latency of the image's file system
  and the ceiling it implies.
* measured boot: TPM2_Startup(CLEAR), ``--boot-extends`` PCR_Extends over PCRs 0-9 with a
  PCR_Read after every third, 4 NV writes, 2 HierarchyChangeAuth (the owner password set,
  then cleared again), a read of all 24 PCRs, TPM2_Shutdown(STATE): the trace timed end to
  end (and with swtpm's start, which reads the state), latency p50/p99 of all commands and of
  the state-changing ones.  Each stack boots twice: the second boot is measured (the usual
  case, a VM that has booted before), the first one's time is reported apart (its Shutdown
  stores the volatile state for the first time).
* snapshot-heavy: ``--snapshot-commands`` NV writes; every 10 commands a snapshot is
  created, every 20 the previous one is applied (vtpm-qcow: through the daemon's control
  socket while swtpm runs; qemu-storage-daemon: ``blockdev-snapshot-internal-sync`` on its
  QMP socket, which has no live "apply"; a plain directory has no snapshots).  Reported:
  wall time, command and snapshot latency p50/p99.

Memory: VmRSS (a few seconds idle after the workloads: "steady") and VmHWM (peak) of each
storage daemon and of swtpm, from /proc/PID/status, and their private memory
(smaps_rollup), plus ``vtpm-qcow serve`` (file view, its own swtpm) running the NV
workload, detached and in the foreground (as the systemd unit runs it: no fork, so the
shared libraries' pages all count).

``--rounds`` rounds run every stack in turn (fresh images each round), so that a burst of
load on a shared machine hits every stack alike; command latencies are pooled over the
rounds, trace times are the median round's.  Ratios are to the qsd-fuse stack of the same
run.  Markdown on stdout.  Run as root (FUSE):

    python3 tools/bench/bench_swtpm_stacks.py --commands 500
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vtpm_qcow.export.control import RUNTIME_DIR_ENV, ControlClient, pid_path_for
from vtpm_qcow.export.lean import IDLE_TRIM_AFTER
from vtpm_qcow.tpm.client import SwtpmSocketTransport, Tpm, sha256
from vtpm_qcow.tpm.swtpm import Swtpm, free_tcp_port_pair

NV_INDEX = 0x01500040
NV_SIZE = 64
#: A snapshot every this many commands of the snapshot-heavy trace (an apply every twice).
SNAPSHOT_EVERY = 10
STACKS = ("plain-dir", "qsd-fuse", "file-view", "dir-view")


def percentile(samples: list[float], q: float) -> float | None:
    """The ``q`` quantile of ``samples`` (seconds) in ms, nearest rank; None if empty."""
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


@dataclass
class Result:
    """One stack's numbers for the NV-write workload."""

    stack: str
    latencies: list[float] = field(default_factory=list)
    elapsed: float = 0.0
    requests_per_commit: float | None = None
    handler_ms_per_commit: float | None = None
    flush_ms_per_commit: float | None = None
    flushes_per_commit: float | None = None
    #: CPU seconds the storage daemon spent during the workload (user + system)
    daemon_cpu_s: float | None = None

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.elapsed if self.elapsed else 0.0

    def percentile(self, q: float) -> float:
        return percentile(self.latencies, q) or 0.0


@dataclass
class BootResult:
    """The measured-boot trace on one stack."""

    stack: str
    #: (command, seconds) in trace order
    commands: list[tuple[str, float]] = field(default_factory=list)
    #: Startup to Shutdown's response, and swtpm's start (process, state read) before it
    elapsed: float = 0.0
    start: float = 0.0
    #: the same trace's time on the stack's first boot (Shutdown(STATE) stores swtpm's
    #: volatile state for the first time: the state grows)
    first: float = 0.0

    def latencies(self, *, state_changing: bool | None = None) -> list[float]:
        changing = {"NV_Write", "HierarchyChangeAuth", "Shutdown"}
        return [
            t
            for name, t in self.commands
            if state_changing is None or (name in changing) == state_changing
        ]


@dataclass
class SnapshotResult:
    """The snapshot-heavy trace on one stack."""

    stack: str
    commands: list[float] = field(default_factory=list)
    creates: list[float] = field(default_factory=list)
    applies: list[float] = field(default_factory=list)
    elapsed: float = 0.0
    #: why a stack has no snapshot (or no apply), for the report
    note: str = ""


@dataclass
class Memory:
    """VmRSS (steady, idle after the workloads) and VmHWM (peak) of one process, and its
    private memory (USS: what one more such process costs; the rest is shared libraries'
    pages other processes map too), KiB."""

    process: str
    rss_kib: int | None = None
    hwm_kib: int | None = None
    private_kib: int | None = None


@dataclass
class Stack:
    """A running storage stack: where swtpm keeps its state, how to snapshot it."""

    name: str
    tpmstate: str
    daemon_pid: int | None = None
    #: a vtpm-qcow mount's control socket
    control: ControlClient | None = None
    #: qemu-storage-daemon's monitor and its node
    qmp: Qmp | None = None
    #: the largest swtpm seen on this stack
    swtpm_memory: Memory = field(default_factory=lambda: Memory("swtpm"))

    def snapshot_create(self, tag: str) -> bool:
        """Create snapshot ``tag``; False if the stack cannot."""
        if self.control is not None:
            self.control.snapshot_create(tag)
            return True
        if self.qmp is not None:
            self.qmp.execute("blockdev-snapshot-internal-sync", device="q", name=tag)
            return True
        return False

    def snapshot_apply(self, tag: str) -> bool:
        """Apply snapshot ``tag`` under the running swtpm; False if the stack cannot."""
        if self.control is not None:
            self.control.snapshot_apply(tag)
            return True
        return False


def proc_status(pid: int) -> Memory:
    """VmRSS, VmHWM and private memory of ``pid`` (None once it has gone)."""
    memory = Memory(str(pid))
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                memory.rss_kib = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                memory.hwm_kib = int(line.split()[1])
        private = 0
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                private += int(line.split()[1])
        memory.private_kib = private
    except OSError:
        pass
    return memory


def cpu_seconds(pid: int) -> float | None:
    """Seconds process ``pid``'s live threads have run on a CPU so far (the scheduler's
    nanosecond count in /proc/PID/task/*/schedstat; None if it has gone)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for task in tasks:
        with contextlib.suppress(OSError):
            total += int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[0])
    return total / 1e9


def note_swtpm(stack: Stack, pid: int) -> None:
    """Keep the larger of ``stack``'s swtpm figures and those of swtpm ``pid`` now."""
    now = proc_status(pid)
    mine = stack.swtpm_memory
    mine.rss_kib = max(mine.rss_kib or 0, now.rss_kib or 0) or None
    mine.hwm_kib = max(mine.hwm_kib or 0, now.hwm_kib or 0) or None
    mine.private_kib = max(mine.private_kib or 0, now.private_kib or 0) or None


class Qmp:
    """A minimal synchronous QMP client (JSON lines on a unix socket)."""

    def __init__(self, path: Path, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(timeout)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.stream = self.sock.makefile("rwb")
        self.stream.readline()  # greeting
        self.execute("qmp_capabilities")

    def execute(self, command: str, **arguments: Any) -> Any:
        self.stream.write(json.dumps({"execute": command, "arguments": arguments}).encode())
        self.stream.write(b"\n")
        self.stream.flush()
        while True:
            reply = json.loads(self.stream.readline())
            if "error" in reply:
                raise RuntimeError(f"QMP {command}: {reply['error']}")
            if "return" in reply:
                return reply["return"]

    def close(self) -> None:
        self.stream.close()
        self.sock.close()


@contextlib.contextmanager
def swtpm_session(
    stack: Stack, workdir: Path, *, startup: bool = True
) -> Iterator[tuple[Tpm, float]]:
    """A fresh swtpm on ``stack`` and a client; yields it and the seconds swtpm took to
    start (process start and state read).  ``startup``: swtpm runs TPM2_Startup itself."""
    port = free_tcp_port_pair()
    flags = ("not-need-init", "startup-clear") if startup else ("not-need-init",)
    t0 = time.perf_counter()
    swtpm = Swtpm.start(stack.tpmstate, workdir, server=port, ctrl=port + 1, flags=flags)
    started = time.perf_counter() - t0
    try:
        with SwtpmSocketTransport(port) as transport:
            yield Tpm(transport), started
            note_swtpm(stack, swtpm.pid)
    finally:
        swtpm.stop()


def nv_writes(tpm: Tpm, commands: int, result: Result) -> None:
    """Time ``commands`` NV writes of fresh random data (the index exists)."""
    start = time.perf_counter()
    for _ in range(commands):
        data = os.urandom(NV_SIZE)
        t0 = time.perf_counter()
        tpm.nv_write(NV_INDEX, data)
        result.latencies.append(time.perf_counter() - t0)
    result.elapsed = time.perf_counter() - start


def nv_workload(stack: Stack, workdir: Path, commands: int, result: Result) -> None:
    """Define the index, time ``commands`` NV writes (and the daemon's CPU time in them)."""
    with swtpm_session(stack, workdir) as (tpm, _):
        tpm.nv_define_space(NV_INDEX, NV_SIZE)
        before = cpu_seconds(stack.daemon_pid) if stack.daemon_pid else None
        nv_writes(tpm, commands, result)
        after = cpu_seconds(stack.daemon_pid) if stack.daemon_pid else None
        if before is not None and after is not None:
            result.daemon_cpu_s = after - before


def boot_traces(stack: Stack, workdir: Path, extends: int) -> BootResult:
    """A first boot, then the boot measured (a VM that has booted before, the usual case)."""
    first = boot_trace(stack, workdir / "first", extends)
    result = boot_trace(stack, workdir / "next", extends)
    result.first = first.elapsed
    return result


def boot_trace(stack: Stack, workdir: Path, extends: int) -> BootResult:
    """The measured-boot-like trace on a fresh swtpm (the NV index exists)."""
    result = BootResult(stack.name)
    nv_points = {extends * k // 5 for k in range(1, 5)}
    auth_points = {extends // 2: b"boot-owner", extends * 3 // 4: b""}
    owner = b""
    with swtpm_session(stack, workdir, startup=False) as (tpm, started):
        result.start = started

        def timed(name: str, call: Any, *args: Any, **kwargs: Any) -> None:
            t0 = time.perf_counter()
            call(*args, **kwargs)
            result.commands.append((name, time.perf_counter() - t0))

        begin = time.perf_counter()
        timed("Startup", tpm.startup)
        for i in range(extends):
            pcr = i % 10
            timed("PCR_Extend", tpm.pcr_extend, pcr, sha256(os.urandom(16)))
            if i % 3 == 2:
                timed("PCR_Read", tpm.pcr_read, [pcr])
            if i in nv_points:
                timed("NV_Write", tpm.nv_write, NV_INDEX, os.urandom(NV_SIZE))
            if i in auth_points:
                new = auth_points[i]
                timed("HierarchyChangeAuth", tpm.hierarchy_change_auth, new, owner_auth=owner)
                owner = new
        timed("PCR_Read", tpm.pcr_read)
        timed("Shutdown", tpm.shutdown)
        result.elapsed = time.perf_counter() - begin
    if owner:
        raise RuntimeError("boot trace left an owner password set")
    return result


def snapshot_trace(stack: Stack, workdir: Path, commands: int) -> SnapshotResult:
    """NV writes with a snapshot created every 10 commands and applied every 20."""
    result = SnapshotResult(stack.name)
    with swtpm_session(stack, workdir) as (tpm, _):
        begin = time.perf_counter()
        for i in range(1, commands + 1):
            t0 = time.perf_counter()
            tpm.nv_write(NV_INDEX, os.urandom(NV_SIZE))
            result.commands.append(time.perf_counter() - t0)
            if i % SNAPSHOT_EVERY:
                continue
            k = i // SNAPSHOT_EVERY
            t0 = time.perf_counter()
            if not stack.snapshot_create(f"bench{k}"):
                result.note = "no snapshots"
                continue
            result.creates.append(time.perf_counter() - t0)
            if k % 2 == 0:
                t0 = time.perf_counter()
                if stack.snapshot_apply(f"bench{k - 1}"):
                    result.applies.append(time.perf_counter() - t0)
                else:
                    result.note = "no live apply"
        result.elapsed = time.perf_counter() - begin
    return result


def wait_mounted(path: Path, timeout: float = 20.0) -> None:
    """Wait until ``path`` is a mount point (qemu-storage-daemon mounts asynchronously)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open("/proc/self/mounts") as mounts:
            if any(line.split()[1] == str(path) for line in mounts):
                return
        time.sleep(0.02)
    raise RuntimeError(f"{path}: not mounted after {timeout}s")


def vtpm_qcow(*args: str) -> None:
    """Run ``vtpm-qcow ARGS``; its one-line error if it fails."""
    done = subprocess.run(["vtpm-qcow", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"vtpm-qcow {args[0]} failed: {done.stderr.strip()}")


def create_image(path: Path) -> None:
    vtpm_qcow("create", str(path))


@contextlib.contextmanager
def qsd_export(
    image: Path, target: Path, strace_to: Path | None = None, qmp: Path | None = None
) -> Iterator[int]:
    """qemu-storage-daemon exporting ``image`` over FUSE at file ``target``; yields its pid.

    With ``strace_to``, it runs under ``strace -c`` counting its flush syscalls; with
    ``qmp``, it serves a QMP monitor there.
    """
    target.touch()
    tracer = ["strace", "-f", "-c", "-e", "trace=fdatasync,fsync", "-o", str(strace_to)]
    monitor = ["--chardev", f"socket,id=m,path={qmp},server=on,wait=off", "--monitor", "m"]
    proc = subprocess.Popen(
        [
            *(tracer if strace_to else []),
            "qemu-storage-daemon",
            "--blockdev",
            f"driver=file,node-name=f,filename={image}",
            "--blockdev",
            "driver=qcow2,node-name=q,file=f",
            "--export",
            f"type=fuse,id=e,node-name=q,mountpoint={target},writable=on",
            *(monitor if qmp else []),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_mounted(target)
        daemon = _traced_child(proc.pid) if strace_to else proc.pid
        yield daemon
    finally:
        # SIGTERM to qemu-storage-daemon itself: a traced one then exits and strace
        # writes its counts.
        with contextlib.suppress(ProcessLookupError, UnboundLocalError):
            os.kill(daemon, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
        subprocess.run(["fusermount3", "-u", "-z", str(target)], check=False, capture_output=True)


def _traced_child(tracer: int, timeout: float = 10.0) -> int:
    """The pid of the process ``strace`` (pid ``tracer``) started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{tracer}/task/{tracer}/children").read_text().split()
            if children:
                return int(children[0])
        time.sleep(0.01)
    raise RuntimeError("strace started no qemu-storage-daemon")


def stop_daemon(pid: int) -> None:
    """SIGTERM a vtpm-qcow daemon and wait until it has gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


@contextlib.contextmanager
def vtpm_mount(image: Path, mountpoint: Path, view: str) -> Iterator[int]:
    """``vtpm-qcow mount``; yields the daemon's pid."""
    mountpoint.mkdir(exist_ok=True)
    vtpm_qcow("mount", str(image), str(mountpoint), "--view", view)
    pid = int(pid_path_for(image).read_text())
    try:
        yield pid
    finally:
        stop_daemon(pid)
        subprocess.run(
            ["fusermount3", "-u", "-z", str(mountpoint)], check=False, capture_output=True
        )


def counters(image: Path) -> tuple[int, int, int, int, int]:
    """(FUSE requests, commits, image flushes, µs inside the request handlers, µs of those
    in the image's flushes) so far, from the daemon's info."""
    info = ControlClient.for_image(image).info()
    return (
        sum(info["requests"].values()),
        info["commits"],
        info["image_io"]["flushes"],
        sum(info.get("handler_us", {}).values()),
        info["image_io"].get("flush_us", 0),
    )


@dataclass
class Run:
    """Everything one stack measured."""

    nv: Result
    boot: BootResult
    snapshots: SnapshotResult
    daemon: Memory | None
    swtpm: Memory


@dataclass
class Sizes:
    """How much each workload does."""

    commands: int
    boot_extends: int
    snapshot_commands: int


#: Seconds the daemons are left idle before their steady memory is read (a vtpm-qcow daemon
#: trims its heap between IDLE_TRIM_AFTER and twice that after its last request).
IDLE_PAUSE = 2 * IDLE_TRIM_AFTER + 0.5


def workloads(stack: Stack, work: Path, sizes: Sizes, nv: Result, pause: float) -> Run:
    """Run the three workloads on ``stack``, then read the daemon's memory after ``pause``
    seconds idle."""
    nv_workload(stack, work / "nv", sizes.commands, nv)
    boot = boot_traces(stack, work / "boot", sizes.boot_extends)
    snapshots = snapshot_trace(stack, work / "snap", sizes.snapshot_commands)
    daemon = None
    time.sleep(pause)
    if stack.daemon_pid is not None:
        daemon = proc_status(stack.daemon_pid)
        daemon.process = stack.name
    return Run(nv, boot, snapshots, daemon, stack.swtpm_memory)


def bench_ours(work: Path, view: str, sizes: Sizes, pause: float) -> Run:
    nv = Result(f"{view}-view")
    image = work / f"{view}.qcow2"
    create_image(image)
    mountpoint = work / f"mnt-{view}"
    with vtpm_mount(image, mountpoint, view) as pid:
        tpmstate = (
            f"dir={mountpoint}" if view == "dir" else f"backend-uri=file://{mountpoint}/tpmstate"
        )
        with ControlClient.for_image(image) as control:
            stack = Stack(nv.stack, tpmstate, daemon_pid=pid, control=control)
            before = counters(image)
            nv_workload(stack, work / view / "nv", sizes.commands, nv)
            after = counters(image)
            commits = max(1, after[1] - before[1])
            nv.requests_per_commit = (after[0] - before[0]) / commits
            nv.flushes_per_commit = (after[2] - before[2]) / commits
            nv.handler_ms_per_commit = (after[3] - before[3]) / commits / 1000
            nv.flush_ms_per_commit = (after[4] - before[4]) / commits / 1000
            boot = boot_traces(stack, work / view / "boot", sizes.boot_extends)
            snapshots = snapshot_trace(stack, work / view / "snap", sizes.snapshot_commands)
            time.sleep(pause)
            daemon = proc_status(pid)
            daemon.process = f"vtpm-qcow mount ({view} view)"
    return Run(nv, boot, snapshots, daemon, stack.swtpm_memory)


def bench_qsd(work: Path, sizes: Sizes, pause: float, *, trace_flushes: bool = True) -> Run:
    image = work / "qsd.qcow2"
    create_image(image)
    target = work / "qsd-export"
    qmp_path = Path(os.environ[RUNTIME_DIR_ENV]) / "qsd-qmp.sock"
    with qsd_export(image, target, qmp=qmp_path) as pid:
        qmp = Qmp(qmp_path)
        try:
            stack = Stack("qsd-fuse", f"backend-uri=file://{target}", daemon_pid=pid, qmp=qmp)
            run = workloads(stack, work / "qsd", sizes, Result("qsd-fuse"), pause)
        finally:
            qmp.close()
    if run.daemon is not None:
        run.daemon.process = "qemu-storage-daemon"
    run.snapshots.note = "no live apply in QMP"
    if trace_flushes and shutil.which("strace"):
        run.nv.flushes_per_commit = qsd_flushes_per_commit(work, min(sizes.commands, 100))
    return run


def qsd_flushes_per_commit(work: Path, commands: int) -> float:
    """qemu-storage-daemon's fdatasync/fsync calls per command, from a separate run under
    ``strace -c`` (the timed run is not traced).  Includes the handful at start and exit."""
    image = work / "qsd-traced.qcow2"
    create_image(image)
    target = work / "qsd-traced-export"
    counts = work / "qsd-strace.txt"
    with qsd_export(image, target, strace_to=counts):
        stack = Stack("x", f"backend-uri=file://{target}")
        nv_workload(stack, work / "qsd-traced", commands, Result("x"))
    calls = 0
    for line in counts.read_text().splitlines():
        fields = line.split()
        if fields and fields[-1] in ("fdatasync", "fsync"):
            calls += int(fields[3])
    return calls / commands


def bench_plain(work: Path, sizes: Sizes) -> Run:
    state = work / "plain"
    state.mkdir()
    stack = Stack("plain-dir", f"dir={state}")
    run = workloads(stack, work / "plain-run", sizes, Result("plain-dir"), 0.0)  # no daemon
    run.snapshots.note = "no snapshots"
    return run


def bench_serve(
    work: Path, commands: int, pause: float, *, foreground: bool
) -> tuple[Memory, Memory]:
    """Memory of ``vtpm-qcow serve`` (file view) and of its swtpm after ``commands`` NV
    writes through that swtpm's TCP data channel; ``foreground``: ``serve --foreground``,
    as the systemd unit (docs/examples) runs it, else detached as ``mount`` is."""
    image = work / ("serve-fg.qcow2" if foreground else "serve.qcow2")
    create_image(image)
    port = free_tcp_port_pair()
    args = [
        "serve",
        str(image),
        "--ctrl",
        str(Path(os.environ[RUNTIME_DIR_ENV]) / f"serve-{int(foreground)}.sock"),
        "--swtpm-flags",
        "not-need-init,startup-clear",
        "--swtpm-option=--server",
        f"--swtpm-option=type=tcp,port={port}",
    ]
    proc = None
    if foreground:
        proc = subprocess.Popen(
            ["vtpm-qcow", *args, "--foreground"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while not pid_path_for(image).exists():  # written once it serves
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise RuntimeError("vtpm-qcow serve --foreground did not start")
            time.sleep(0.02)
    else:
        vtpm_qcow(*args)
    pid = int(pid_path_for(image).read_text())
    try:
        with SwtpmSocketTransport(port) as transport:
            tpm = Tpm(transport)
            tpm.nv_define_space(NV_INDEX, NV_SIZE)
            nv_writes(tpm, commands, Result("serve"))
        swtpm_pid = ControlClient.for_image(image).info()["swtpm_pid"]
        time.sleep(pause)
        daemon = proc_status(pid)
        swtpm = proc_status(swtpm_pid)
    finally:
        stop_daemon(pid)
        if proc is not None:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    daemon.process = (
        "vtpm-qcow serve --foreground (file view, as the systemd unit runs it)"
        if foreground
        else "vtpm-qcow serve (file view, detached)"
    )
    swtpm.process = "swtpm (under serve)"
    return daemon, swtpm


def merge(rounds: list[Run]) -> Run:
    """One stack's rounds as one: command latencies pooled, NV time summed (commands/s over
    all rounds), trace times the median round's, counters averaged, memory of the last round
    with the highest peak."""
    first, last = rounds[0], rounds[-1]
    nv = Result(
        first.nv.stack,
        [t for r in rounds for t in r.nv.latencies],
        sum(r.nv.elapsed for r in rounds),
    )
    cpu = [r.nv.daemon_cpu_s for r in rounds if r.nv.daemon_cpu_s is not None]
    nv.daemon_cpu_s = sum(cpu) if len(cpu) == len(rounds) else None
    for name in (
        "requests_per_commit",
        "handler_ms_per_commit",
        "flush_ms_per_commit",
        "flushes_per_commit",
    ):
        values = [getattr(r.nv, name) for r in rounds if getattr(r.nv, name) is not None]
        setattr(nv, name, statistics.mean(values) if values else None)
    boot = BootResult(
        first.boot.stack,
        [c for r in rounds for c in r.boot.commands],
        statistics.median(r.boot.elapsed for r in rounds),
        statistics.median(r.boot.start for r in rounds),
        statistics.median(r.boot.first for r in rounds),
    )
    snapshots = SnapshotResult(
        first.snapshots.stack,
        [t for r in rounds for t in r.snapshots.commands],
        [t for r in rounds for t in r.snapshots.creates],
        [t for r in rounds for t in r.snapshots.applies],
        statistics.median(r.snapshots.elapsed for r in rounds),
        first.snapshots.note,
    )
    daemon = last.daemon
    if daemon is not None:
        daemon.hwm_kib = max((r.daemon.hwm_kib or 0) for r in rounds if r.daemon) or None
    swtpm = Memory(
        "swtpm",
        max((r.swtpm.rss_kib or 0) for r in rounds) or None,
        max((r.swtpm.hwm_kib or 0) for r in rounds) or None,
        max((r.swtpm.private_kib or 0) for r in rounds) or None,
    )
    return Run(nv, boot, snapshots, daemon, swtpm)


def fdatasync_latency(directory: Path, rounds: int = 200) -> float:
    """Median seconds of a 4 KiB pwrite + fdatasync on ``directory``'s file system."""
    path = directory / "fsync-probe"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    samples = []
    try:
        os.pwrite(fd, bytes(16 * 4096), 0)  # allocated blocks: overwrites, as in an image
        os.fsync(fd)
        for i in range(rounds):
            os.pwrite(fd, os.urandom(4096), (i % 16) * 4096)
            t0 = time.perf_counter()
            os.fdatasync(fd)
            samples.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
        path.unlink()
    return statistics.median(samples)


def fmt(value: float | int | None, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def mib(kib: int | None) -> str:
    return fmt(kib / 1024 if kib else None)


def nv_report(runs: list[Run], fsync_s: float, commands: int) -> list[str]:
    base = next((r.nv for r in runs if r.nv.stack == "qsd-fuse"), None)
    lines = [
        f"swtpm state writes: {commands} TPM2_NV_Write commands per stack and round, "
        f"one state store each; fdatasync median {fsync_s * 1e6:.0f} µs",
        "",
        "| stack | cmd/s | vs qsd | p50 ms | p95 ms | p99 ms | daemon RSS MiB | "
        "daemon CPU µs/cmd | FUSE req/commit | handler ms/commit | of which flush ms | "
        "flushes/commit | flush ceiling cmd/s | snap create ms | snap apply ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        r = run.nv
        ratio = r.rate / base.rate if base and base.rate else None
        ceiling = 1 / (r.flushes_per_commit * fsync_s) if r.flushes_per_commit else None
        cpu_us = r.daemon_cpu_s / len(r.latencies) * 1e6 if r.daemon_cpu_s is not None else None
        snaps = run.snapshots
        lines.append(
            f"| {r.stack} | {r.rate:.0f} | {fmt(ratio, '.2f')} | {r.percentile(0.5):.2f} | "
            f"{r.percentile(0.95):.2f} | {r.percentile(0.99):.2f} | "
            f"{mib(run.daemon.rss_kib if run.daemon else None)} | "
            f"{fmt(cpu_us, '.0f')} | {fmt(r.requests_per_commit)} | "
            f"{fmt(r.handler_ms_per_commit, '.3f')} | "
            f"{fmt(r.flush_ms_per_commit, '.3f')} | "
            f"{fmt(r.flushes_per_commit)} | "
            f"{fmt(ceiling, '.0f')} | "
            f"{fmt(statistics.median(snaps.creates) * 1000 if snaps.creates else None)} | "
            f"{fmt(statistics.median(snaps.applies) * 1000 if snaps.applies else None)} |"
        )
    return lines


def boot_report(runs: list[Run], extends: int, rounds: int) -> list[str]:
    base = next((r.boot for r in runs if r.boot.stack == "qsd-fuse"), None)
    sample = runs[0].boot if runs else None
    count = len(sample.commands) if sample else 0
    changing = len(sample.latencies(state_changing=True)) if sample else 0
    lines = [
        f"measured-boot trace: Startup, {extends} PCR_Extend, a PCR_Read after every third, "
        f"4 NV_Write, 2 HierarchyChangeAuth, a read of all PCRs, Shutdown(STATE): "
        f"{count // max(1, rounds)} commands, {changing // max(1, rounds)} of them "
        "state-changing; a fresh swtpm per boot; timed: the second boot on the stack (the first "
        "one's time apart); trace times: the median round",
        "",
        "| stack | trace ms | vs qsd | with swtpm start ms | first boot ms | p50 ms | p99 ms | "
        "state-changing p50 ms | state-changing p99 ms | max ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        b = run.boot
        ratio = base.elapsed / b.elapsed if base and b.elapsed else None
        every = b.latencies()
        writes = b.latencies(state_changing=True)
        lines.append(
            f"| {b.stack} | {b.elapsed * 1000:.1f} | {fmt(ratio, '.2f')} | "
            f"{(b.elapsed + b.start) * 1000:.1f} | {b.first * 1000:.1f} | "
            f"{fmt(percentile(every, 0.5), '.2f')} | "
            f"{fmt(percentile(every, 0.99), '.2f')} | {fmt(percentile(writes, 0.5), '.2f')} | "
            f"{fmt(percentile(writes, 0.99), '.2f')} | {fmt(percentile(every, 1.0), '.2f')} |"
        )
    return lines


def snapshot_report(runs: list[Run], commands: int) -> list[str]:
    base = next((r.snapshots for r in runs if r.snapshots.stack == "qsd-fuse"), None)
    lines = [
        f"snapshot-heavy trace: {commands} TPM2_NV_Write, a snapshot created every "
        f"{SNAPSHOT_EVERY} commands and the previous one applied every {2 * SNAPSHOT_EVERY}, "
        "while swtpm runs; wall time: the median round",
        "",
        "| stack | wall ms | vs qsd | cmd p50 ms | cmd p99 ms | creates | create p50 ms | "
        "create p99 ms | applies | apply p50 ms | apply p99 ms | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        s = run.snapshots
        ratio = base.elapsed / s.elapsed if base and s.elapsed else None
        lines.append(
            f"| {s.stack} | {s.elapsed * 1000:.1f} | {fmt(ratio, '.2f')} | "
            f"{fmt(percentile(s.commands, 0.5), '.2f')} | "
            f"{fmt(percentile(s.commands, 0.99), '.2f')} | {len(s.creates)} | "
            f"{fmt(percentile(s.creates, 0.5), '.2f')} | "
            f"{fmt(percentile(s.creates, 0.99), '.2f')} | {len(s.applies)} | "
            f"{fmt(percentile(s.applies, 0.5), '.2f')} | "
            f"{fmt(percentile(s.applies, 0.99), '.2f')} | {s.note} |"
        )
    return lines


def memory_report(runs: list[Run], serve: list[tuple[Memory, Memory]], pause: float) -> list[str]:
    rows: list[Memory] = [run.daemon for run in runs if run.daemon is not None]
    swtpms = [run.swtpm for run in runs]
    rows += [daemon for daemon, _ in serve]
    base = next((m for m in rows if m.process == "qemu-storage-daemon"), None)
    largest = Memory(
        "swtpm (largest of the stacks)",
        max((m.rss_kib or 0 for m in swtpms), default=0) or None,
        max((m.hwm_kib or 0 for m in swtpms), default=0) or None,
        max((m.private_kib or 0 for m in swtpms), default=0) or None,
    )
    rows.append(largest)
    if serve:
        rows.append(serve[-1][1])
    lines = [
        f"memory {pause:.1f} s idle after the workloads: VmRSS (steady) and VmHWM (peak) "
        "from "
        "/proc/PID/status; private = Private_Clean + Private_Dirty of /proc/PID/smaps_rollup "
        "(what one more such process costs)",
        "",
        "| process | steady RSS MiB | peak RSS MiB | steady vs qsd | private MiB |",
        "|---|---|---|---|---|",
    ]
    for m in rows:
        ratio = m.rss_kib / base.rss_kib if base and base.rss_kib and m.rss_kib else None
        lines.append(
            f"| {m.process} | {mib(m.rss_kib)} | {mib(m.hwm_kib)} | {fmt(ratio, '.2f')}x | "
            f"{mib(m.private_kib)} |"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commands", type=int, default=500, help="NV writes per stack")
    parser.add_argument(
        "--boot-extends", type=int, default=300, help="PCR extends of the measured-boot trace"
    )
    parser.add_argument(
        "--snapshot-commands",
        type=int,
        default=200,
        help="NV writes of the snapshot-heavy trace (a snapshot every 10)",
    )
    parser.add_argument(
        "--stacks", default=",".join(STACKS), help="comma-separated subset of the stacks"
    )
    parser.add_argument(
        "--no-serve", action="store_true", help="skip the memory of 'vtpm-qcow serve'"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds, each running every stack in turn"
    )
    parser.add_argument(
        "--idle-pause",
        type=float,
        default=IDLE_PAUSE,
        help=f"seconds idle before steady memory is read (default {IDLE_PAUSE})",
    )
    parser.add_argument("--workdir", help="where images and mounts go (default: a temp dir)")
    args = parser.parse_args()
    for tool in ("swtpm", "qemu-storage-daemon", "vtpm-qcow", "fusermount3"):
        if shutil.which(tool) is None:
            print(f"bench_swtpm_stacks: {tool} not found", file=sys.stderr)
            return 1
    if args.rounds < 1:
        parser.error("--rounds: at least 1")
    if args.boot_extends < 4:
        parser.error("--boot-extends: at least 4 (the trace's NV writes and password changes)")
    stacks = args.stacks.split(",")
    unknown = [s for s in stacks if s not in STACKS]
    if unknown:
        print(f"bench_swtpm_stacks: unknown stack {unknown[0]!r}", file=sys.stderr)
        return 1
    sizes = Sizes(args.commands, args.boot_extends, args.snapshot_commands)
    work = Path(tempfile.mkdtemp(prefix="vq-bench-", dir=args.workdir))
    # sockets and pid files: a short path of their own (a unix socket path has 107 bytes)
    run_dir = tempfile.mkdtemp(prefix="vq-bench-run-")
    os.environ[RUNTIME_DIR_ENV] = run_dir
    rounds: dict[str, list[Run]] = {name: [] for name in stacks}
    serve = []
    try:
        # round-robin: a burst of load on the shared machine hits every stack alike
        for k in range(args.rounds):
            here = work / f"round{k}"
            here.mkdir()
            pause = args.idle_pause if k == args.rounds - 1 else 0.0  # memory: the last round
            for name in stacks:
                if name == "plain-dir":
                    run = bench_plain(here, sizes)
                elif name == "qsd-fuse":
                    run = bench_qsd(here, sizes, pause, trace_flushes=k == 0)
                else:
                    run = bench_ours(here, name.split("-")[0], sizes, pause)
                rounds[name].append(run)
        runs = [merge(rounds[name]) for name in stacks]
        if not args.no_serve:
            for foreground in (False, True):
                serve.append(
                    bench_serve(
                        work, min(args.commands, 200), args.idle_pause, foreground=foreground
                    )
                )
        fsync_s = fdatasync_latency(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)
    sections = [
        [f"{args.rounds} rounds, the stacks taking turns in each (figures pooled over rounds)"],
        nv_report(runs, fsync_s, args.commands),
        boot_report(runs, args.boot_extends, args.rounds),
        snapshot_report(runs, args.snapshot_commands),
        memory_report(runs, serve, args.idle_pause),
    ]
    print("\n\n".join("\n".join(section) for section in sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())

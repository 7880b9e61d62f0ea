#!/usr/bin/env python3
"""Benchmark: swtpm state writes through four storage stacks, in one run.

Each stack runs the same workload: a fresh swtpm (``startup-clear``), one NV index, then
``--commands`` TPM2_NV_Write commands with new random data, each of which makes swtpm
store its whole permanent state once.  Stacks:

* ``plain-dir``   swtpm ``--tpmstate dir=`` on a plain directory (no durability: no fsync)
* ``qsd-fuse``    swtpm ``backend-uri=file://`` on qemu-storage-daemon's FUSE export of the
                  qcow2 image (the Proxmox VE stack)
* ``file-view``   swtpm ``backend-uri=file://`` on ``vtpm-qcow mount --view file``
* ``dir-view``    swtpm ``--tpmstate dir=`` on ``vtpm-qcow mount --view dir``

Reported: commands/s, latency p50/p95/p99, the storage daemon's RSS, FUSE requests,
the time spent inside vtpm-qcow's request handlers (the commit with its fdatasyncs
included, and of it the time in the image flushes; not pyfuse3's and trio's own
per-request work) and image flushes per commit
(vtpm-qcow's own counters), the fdatasync latency of the image's
file system and the ceiling it implies, and the median snapshot create/apply time on a
mounted store.  Markdown on stdout.  Run as root (FUSE):

    python3 tools/bench/bench_swtpm_stacks.py --commands 500
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vtpm_qcow.export.control import RUNTIME_DIR_ENV, ControlClient, pid_path_for
from vtpm_qcow.tpm.client import SwtpmSocketTransport, Tpm
from vtpm_qcow.tpm.swtpm import Swtpm, free_tcp_port_pair

NV_INDEX = 0x01500040
NV_SIZE = 64


@dataclass
class Result:
    """One stack's numbers."""

    stack: str
    latencies: list[float] = field(default_factory=list)
    elapsed: float = 0.0
    rss_kib: int | None = None
    requests_per_commit: float | None = None
    handler_ms_per_commit: float | None = None
    flush_ms_per_commit: float | None = None
    flushes_per_commit: float | None = None
    snapshot_create_ms: float | None = None
    snapshot_apply_ms: float | None = None

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.elapsed if self.elapsed else 0.0

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def rss_kib(pid: int) -> int | None:
    """Resident set size of ``pid`` in KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def run_workload(tpmstate: str, workdir: Path, commands: int, result: Result) -> None:
    """Start swtpm on ``tpmstate``, define the index, time ``commands`` NV writes."""
    port = free_tcp_port_pair()
    swtpm = Swtpm.start(tpmstate, workdir / "swtpm", server=port, ctrl=port + 1)
    try:
        with SwtpmSocketTransport(port) as transport:
            tpm = Tpm(transport)
            tpm.nv_define_space(NV_INDEX, NV_SIZE)
            start = time.perf_counter()
            for _ in range(commands):
                data = os.urandom(NV_SIZE)
                t0 = time.perf_counter()
                tpm.nv_write(NV_INDEX, data)
                result.latencies.append(time.perf_counter() - t0)
            result.elapsed = time.perf_counter() - start
    finally:
        swtpm.stop()


def wait_mounted(path: Path, timeout: float = 20.0) -> None:
    """Wait until ``path`` is a mount point (qemu-storage-daemon mounts asynchronously)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open("/proc/self/mounts") as mounts:
            if any(line.split()[1] == str(path) for line in mounts):
                return
        time.sleep(0.02)
    raise RuntimeError(f"{path}: not mounted after {timeout}s")


def create_image(path: Path) -> None:
    subprocess.run(["vtpm-qcow", "create", str(path)], check=True, capture_output=True)


@contextlib.contextmanager
def qsd_export(image: Path, target: Path, strace_to: Path | None = None) -> Iterator[int]:
    """qemu-storage-daemon exporting ``image`` over FUSE at file ``target``; yields its pid.

    With ``strace_to``, it runs under ``strace -c`` counting its flush syscalls.
    """
    target.touch()
    tracer = ["strace", "-f", "-c", "-e", "trace=fdatasync,fsync", "-o", str(strace_to)]
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


@contextlib.contextmanager
def vtpm_mount(image: Path, mountpoint: Path, view: str) -> Iterator[int]:
    """``vtpm-qcow mount``; yields the daemon's pid."""
    mountpoint.mkdir(exist_ok=True)
    subprocess.run(
        ["vtpm-qcow", "mount", str(image), str(mountpoint), "--view", view],
        check=True,
        capture_output=True,
    )
    pid = int(pid_path_for(image).read_text())
    try:
        yield pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
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


def snapshot_times(image: Path, rounds: int) -> tuple[float, float]:
    """Median snapshot create and apply times (ms) through the control socket."""
    creates, applies = [], []
    with ControlClient.for_image(image) as client:
        for i in range(rounds):
            t0 = time.perf_counter()
            client.snapshot_create(f"bench{i}")
            creates.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            client.snapshot_apply(f"bench{i}")
            applies.append(time.perf_counter() - t0)
    return statistics.median(creates) * 1000, statistics.median(applies) * 1000


def bench_ours(work: Path, view: str, commands: int, rounds: int) -> Result:
    result = Result(f"{view}-view")
    image = work / f"{view}.qcow2"
    create_image(image)
    mountpoint = work / f"mnt-{view}"
    with vtpm_mount(image, mountpoint, view) as pid:
        tpmstate = (
            f"dir={mountpoint}" if view == "dir" else f"backend-uri=file://{mountpoint}/tpmstate"
        )
        before = counters(image)
        run_workload(tpmstate, work / view, commands, result)
        after = counters(image)
        commits = max(1, after[1] - before[1])
        result.requests_per_commit = (after[0] - before[0]) / commits
        result.flushes_per_commit = (after[2] - before[2]) / commits
        result.handler_ms_per_commit = (after[3] - before[3]) / commits / 1000
        result.flush_ms_per_commit = (after[4] - before[4]) / commits / 1000
        result.rss_kib = rss_kib(pid)
        result.snapshot_create_ms, result.snapshot_apply_ms = snapshot_times(image, rounds)
    return result


def bench_qsd(work: Path, commands: int) -> Result:
    result = Result("qsd-fuse")
    image = work / "qsd.qcow2"
    create_image(image)
    target = work / "qsd-export"
    with qsd_export(image, target) as pid:
        run_workload(f"backend-uri=file://{target}", work / "qsd", commands, result)
        result.rss_kib = rss_kib(pid)
    if shutil.which("strace"):
        result.flushes_per_commit = qsd_flushes_per_commit(work, min(commands, 100))
    return result


def qsd_flushes_per_commit(work: Path, commands: int) -> float:
    """qemu-storage-daemon's fdatasync/fsync calls per command, from a separate run under
    ``strace -c`` (the timed run is not traced).  Includes the handful at start and exit."""
    image = work / "qsd-traced.qcow2"
    create_image(image)
    target = work / "qsd-traced-export"
    counts = work / "qsd-strace.txt"
    with qsd_export(image, target, strace_to=counts):
        run_workload(f"backend-uri=file://{target}", work / "qsd-traced", commands, Result("x"))
    calls = 0
    for line in counts.read_text().splitlines():
        fields = line.split()
        if fields and fields[-1] in ("fdatasync", "fsync"):
            calls += int(fields[3])
    return calls / commands


def bench_plain(work: Path, commands: int) -> Result:
    result = Result("plain-dir")
    state = work / "plain"
    state.mkdir()
    run_workload(f"dir={state}", work / "plain-run", commands, result)
    return result


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


def report(results: list[Result], fsync_s: float, commands: int) -> str:
    base = next((r for r in results if r.stack == "qsd-fuse"), None)
    lines = [
        f"swtpm state writes: {commands} TPM2_NV_Write commands per stack, "
        f"one state store each; fdatasync median {fsync_s * 1e6:.0f} µs",
        "",
        "| stack | cmd/s | vs qsd | p50 ms | p95 ms | p99 ms | daemon RSS MiB | "
        "FUSE req/commit | handler ms/commit | of which flush ms | flushes/commit | "
        "flush ceiling cmd/s | snap create ms | snap apply ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ratio = r.rate / base.rate if base and base.rate else None
        ceiling = 1 / (r.flushes_per_commit * fsync_s) if r.flushes_per_commit else None
        lines.append(
            f"| {r.stack} | {r.rate:.0f} | {fmt(ratio, '.2f')} | {r.percentile(0.5):.2f} | "
            f"{r.percentile(0.95):.2f} | {r.percentile(0.99):.2f} | "
            f"{fmt(r.rss_kib / 1024 if r.rss_kib else None)} | "
            f"{fmt(r.requests_per_commit)} | {fmt(r.handler_ms_per_commit, '.3f')} | "
            f"{fmt(r.flush_ms_per_commit, '.3f')} | "
            f"{fmt(r.flushes_per_commit)} | "
            f"{fmt(ceiling, '.0f')} | {fmt(r.snapshot_create_ms)} | "
            f"{fmt(r.snapshot_apply_ms)} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commands", type=int, default=500, help="NV writes per stack")
    parser.add_argument("--snapshot-rounds", type=int, default=10)
    parser.add_argument(
        "--stacks",
        default="plain-dir,qsd-fuse,file-view,dir-view",
        help="comma-separated subset of the stacks",
    )
    parser.add_argument("--workdir", help="where images and mounts go (default: a temp dir)")
    args = parser.parse_args()
    for tool in ("swtpm", "qemu-storage-daemon", "vtpm-qcow", "fusermount3"):
        if shutil.which(tool) is None:
            print(f"bench_swtpm_stacks: {tool} not found", file=sys.stderr)
            return 1
    work = Path(tempfile.mkdtemp(prefix="vq-bench-", dir=args.workdir))
    os.environ[RUNTIME_DIR_ENV] = str(work / "run")
    results = []
    try:
        for stack in args.stacks.split(","):
            if stack == "plain-dir":
                results.append(bench_plain(work, args.commands))
            elif stack == "qsd-fuse":
                results.append(bench_qsd(work, args.commands))
            elif stack in ("file-view", "dir-view"):
                view = stack.split("-")[0]
                results.append(bench_ours(work, view, args.commands, args.snapshot_rounds))
            else:
                print(f"bench_swtpm_stacks: unknown stack {stack!r}", file=sys.stderr)
                return 1
        fsync_s = fdatasync_latency(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(report(results, fsync_s, args.commands))
    return 0


if __name__ == "__main__":
    sys.exit(main())

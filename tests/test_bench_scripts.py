"""The benchmark scripts stay runnable: each imports (project modules and test fixtures it
reuses) and parses its options, and the swtpm stacks benchmark runs every workload in a
tiny mode.  Their figures are measured by ``tools/bench/run-all``, never asserted here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import need, need_fuse, need_root

BENCH = Path(__file__).resolve().parent.parent / "tools" / "bench"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("bench_*.py")))
def test_benchmark_script_imports_and_parses_options(script: str) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / script), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout


def test_run_all_names_every_benchmark() -> None:
    run_all = (BENCH / "run-all").read_text()
    for script in BENCH.glob("bench_*.py"):
        assert script.name in run_all, f"tools/bench/run-all does not run {script.name}"


def test_swtpm_stacks_runs_every_workload_on_every_stack(tmp_path: Path) -> None:
    """A tiny run of 2 rounds: each stack's row in each table (NV writes, measured boot,
    snapshot-heavy) and a memory row for each daemon and for swtpm."""
    need_root("FUSE mounts")
    need_fuse()
    for tool in ("swtpm", "qemu-storage-daemon", "vtpm-qcow", "fusermount3"):
        need(tool)
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH / "bench_swtpm_stacks.py"),
            "--commands", "5",
            "--boot-extends", "10",
            "--snapshot-commands", "20",
            "--rounds", "2",
            "--idle-pause", "0",
            "--workdir", str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    tables = done.stdout.split("\n\n")
    titles = ("swtpm state writes", "measured-boot trace", "snapshot-heavy trace", "memory")
    for title in titles:
        assert any(t.startswith(title) for t in tables), f"no {title!r} table:\n{done.stdout}"
    rows = [line.split(" | ") for line in done.stdout.splitlines() if line.startswith("| ")]
    for stack in ("plain-dir", "qsd-fuse", "file-view", "dir-view"):
        assert sum(row[0] == f"| {stack}" for row in rows) == 3, f"{stack} misses a table"
    snapshot_rows = {row[0][2:]: row for row in rows if len(row) == 12}
    for stack in ("qsd-fuse", "file-view", "dir-view"):
        assert snapshot_rows[stack][5] == "4", f"{stack}: not 2 snapshots created a round"
    for stack in ("file-view", "dir-view"):
        assert snapshot_rows[stack][8] == "2", f"{stack}: not 1 snapshot applied a round"
    memory = {row[0][2:]: row for row in rows if len(row) == 5}
    for process in (
        "qemu-storage-daemon",
        "vtpm-qcow mount (file view)",
        "vtpm-qcow mount (dir view)",
        "vtpm-qcow serve (file view, detached)",
        "vtpm-qcow serve --foreground (file view, as the systemd unit runs it)",
        "swtpm (largest of the stacks)",
        "swtpm (under serve)",
    ):
        assert process in memory, f"no memory row for {process}:\n{done.stdout}"
        assert "n/a" not in (memory[process][1], memory[process][4]), f"{process}: no RSS"
    assert list(tmp_path.iterdir()) == [], "the benchmark left its work directory behind"

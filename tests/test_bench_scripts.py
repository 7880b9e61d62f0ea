"""The benchmark scripts stay runnable: each imports (project modules and test fixtures it
reuses) and parses its options.  Their figures are measured by ``tools/bench/run-all``,
never asserted here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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

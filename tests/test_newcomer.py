"""README's first command as a newcomer runs it: a fresh clone, and a Python in which nothing
of this project is installed yet.

A new virtual environment comes first on ``PATH``, so ``python3`` (the demo's interpreter)
and ``pip`` are the venv's: ``tools/demo`` must install the package into it (through
``tools/setup-system``) and then run end to end in the same invocation.  The first run used
to fail (the demo imported the package in an interpreter whose ``sys.path`` predated the
install); CI never saw it because the package was installed by then.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import need

REPO = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    """The commands of README's first ``sh`` block (comments stripped)."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"```sh\n(.*?)```", text, re.S)
    assert block, "README.md has no sh block"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_starts_with_the_demo_and_the_tests() -> None:
    assert readme_commands()[:2] == ["tools/demo", "tools/test"]


def test_the_demo_runs_on_its_first_run_in_a_clean_venv(tmp_path: Path) -> None:
    git = need("git")
    clone, venv = tmp_path / "clone", tmp_path / "venv"
    subprocess.run([git, "clone", "-q", str(REPO), str(clone)], check=True, timeout=120)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python3"
    fresh = subprocess.run(
        [python, "-c", "import vtpm_qcow"], cwd=tmp_path, capture_output=True, check=False
    )
    assert fresh.returncode != 0, "the new venv already has the package"

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    command = readme_commands()[0]
    done = subprocess.run(
        command.split(),
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{command} failed on its first run:\n{output[-3000:]}"
    assert "demo: OK - the TPM followed the VM snapshot" in done.stdout
    assert "Traceback" not in output
    with open("/proc/self/mounts", encoding="utf-8", errors="replace") as mounts:
        left = [line.split()[1] for line in mounts if "vtpm-qcow-demo-" in line]
    assert not left, f"the demo left mounts behind: {left}"
    installed = subprocess.run(
        [python, "-c", "import vtpm_qcow, os; print(os.path.dirname(vtpm_qcow.__file__))"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(installed.stdout.strip()).parent == clone

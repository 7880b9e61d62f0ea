"""The ``qcow2`` launcher (``bin/qcow2``): Python without .pth code, same results.

The launcher starts the interpreter next to it with ``-S`` and sets up ``sys.path`` the way
``site`` does, except that .pth lines which execute code are skipped (they are most of the
interpreter's start-up time).  These tests run it in real virtual environments: a .pth
file with code must not run, a .pth path line must be honoured, and a package reachable
only through .pth code (an editable install with an import hook) must still work, by way of
``python -m qcow2``.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import qcow2
from tests.qcow2 import oracle
from tests.qcow2.test_cli import run_qemu_img

REPO = Path(qcow2.__file__).resolve().parents[1]
LAUNCHER = REPO / "bin" / "qcow2"


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    img = tmp_path_factory.mktemp("launcher") / "img.qcow2"
    oracle.create(img, 16 << 20)
    oracle.qemu_io(img, "write -P 7 1M 128k")
    oracle.snapshot(img, "create", "snap")
    return img


def make_venv(root: Path, *, system_site_packages: bool) -> tuple[Path, Path]:
    """A venv without pip holding a copy of the launcher: (its bin/, its site-packages)."""
    args = [sys.executable, "-m", "venv", "--without-pip"]
    if system_site_packages:
        args.append("--system-site-packages")
    subprocess.run([*args, str(root)], check=True, capture_output=True, timeout=60)
    bin_dir = root / "bin"
    shutil.copy2(LAUNCHER, bin_dir / "qcow2")
    site = Path(sysconfig.get_path("purelib", vars={"base": str(root), "platbase": str(root)}))
    return bin_dir, site


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=60, check=False, cwd=cwd, env=env
    )


@pytest.mark.parametrize("command", ["qcow2", "vtpm-qcow"])
def test_installed_command_is_this_launcher(command: str) -> None:
    """tools/setup-system installs bin/qcow2 as the ``qcow2`` and ``vtpm-qcow`` commands
    (pip copies it; bin/vtpm-qcow is a link to it)."""
    installed = Path(sysconfig.get_path("scripts")) / command
    assert filecmp.cmp(installed, LAUNCHER, shallow=False), installed
    assert (REPO / "bin" / command).resolve() == LAUNCHER


def test_the_launcher_named_vtpm_qcow_runs_vtpm_qcow(tmp_path: Path) -> None:
    """The name it is started by picks the command, without site (no .pth code runs)."""
    bin_dir, site = make_venv(tmp_path / "venv", system_site_packages=True)
    marker = tmp_path / "pth-code-ran"
    (site / "aaa_marker.pth").write_text(
        f"import os; open({str(marker)!r}, 'w').close()\n", encoding="utf-8"
    )
    shutil.copy2(LAUNCHER, bin_dir / "vtpm-qcow")
    proc = run([str(bin_dir / "vtpm-qcow"), "wait", "--help"], tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: vtpm-qcow wait"), proc
    assert not marker.exists()
    bad = run([str(bin_dir / "vtpm-qcow"), "info", str(tmp_path / "missing.qcow2")], tmp_path)
    assert bad.returncode == 1 and bad.stderr.startswith("vtpm-qcow: "), bad.stderr
    assert bad.stderr.count("\n") == 1


def test_installed_command_matches_qemu_img(image: Path) -> None:
    installed = Path(sysconfig.get_path("scripts")) / "qcow2"
    for args in (["info"], ["info", "--output=json"], ["snapshot", "-l"], ["map"]):
        ours = run([str(installed), *args, str(image)], image.parent)
        theirs = run_qemu_img(*args, str(image))
        assert (ours.returncode, ours.stdout, ours.stderr) == (0, theirs.out, ""), args


def test_pth_code_is_skipped_and_path_lines_kept(tmp_path: Path, image: Path) -> None:
    """In a venv whose site-packages has a .pth that runs code and one that adds a
    directory: plain ``python`` runs the code; the launcher does not, yet finds modules in
    the added directory (here: a copy of qcow2 in a directory named only by the .pth)."""
    bin_dir, site = make_venv(tmp_path / "venv", system_site_packages=True)
    marker = tmp_path / "pth-code-ran"
    (site / "aaa_marker.pth").write_text(
        f"import os; open({str(marker)!r}, 'w').close()\n", encoding="utf-8"
    )
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(REPO / "qcow2", elsewhere / "qcow2", ignore=shutil.ignore_patterns("*.pyc"))
    (site / "zzz_paths.pth").write_text(f"# a comment\n{elsewhere}\n", encoding="utf-8")

    proc = run([str(bin_dir / "python3"), "-c", "import qcow2; print(qcow2.__file__)"], tmp_path)
    assert proc.returncode == 0 and marker.exists(), proc.stderr  # site runs .pth code
    marker.unlink()

    probe = "import qcow2; print(qcow2.__file__, sys.flags.no_site); main = lambda: 0"
    script = bin_dir / "probe"
    entry = 'main = __import__(f"{package}.cli.main", fromlist=["main"]).main'
    assert entry in LAUNCHER.read_text()
    script.write_text(LAUNCHER.read_text().replace(entry, probe))
    script.chmod(0o755)
    proc = run([str(script)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    where, no_site = proc.stdout.split()
    assert not marker.exists()
    assert no_site == "1"
    # the venv's own site-packages come first, as with site: the copy wins over the checkout
    assert Path(where) == elsewhere / "qcow2" / "__init__.py"

    ours = run([str(bin_dir / "qcow2"), "info", "--output=json", str(image)], tmp_path)
    theirs = run_qemu_img("info", "--output=json", str(image))
    assert (ours.returncode, ours.stdout) == (0, theirs.out), ours.stderr
    assert not marker.exists()


def test_package_reachable_only_through_pth_code(tmp_path: Path, image: Path) -> None:
    """Like setuptools' editable finders: the launcher falls back to ``python -m qcow2``."""
    bin_dir, site = make_venv(tmp_path / "venv", system_site_packages=False)
    (site / "hook.pth").write_text(f"import sys; sys.path.append({str(REPO)!r})\n")
    ours = run([str(bin_dir / "qcow2"), "snapshot", "-l", str(image)], tmp_path)
    theirs = run_qemu_img("snapshot", "-l", str(image))
    assert (ours.returncode, ours.stdout, ours.stderr) == (0, theirs.out, "")


def test_bad_arguments_give_one_line_and_exit_1(tmp_path: Path) -> None:
    installed = Path(sysconfig.get_path("scripts")) / "qcow2"
    proc = run([str(installed), "info", str(tmp_path / "missing.qcow2")], tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_the_installed_modules_have_bytecode() -> None:
    """tools/setup-system compiles the checkout (pip does it for a wheel): with
    PYTHONDONTWRITEBYTECODE set, the commands would otherwise compile every module at
    every start."""
    import importlib.util

    import vtpm_qcow

    missing = [
        str(path)
        for package in (qcow2, vtpm_qcow)
        for path in Path(package.__file__).parent.rglob("*.py")
        if not Path(importlib.util.cache_from_source(str(path))).exists()
    ]
    assert not missing, f"no bytecode for {missing[:5]} (run tools/setup-system)"

"""``qcow2 check -r`` with the ``overlap-check`` open options, as ``qemu-img check -r``
takes them (``--image-opts driver=qcow2,file.filename=...,overlap-check=...``), issue 13.

QEMU's repair writes (rebuilt refcount blocks and table, fixed L1/L2 entries) pass
``qcow2_pre_write_overlap_check`` with the node's options: with ``overlap-check=none`` (or
``constant``, or ``overlap-check.refcount-block=off``) a rebuild over an unaligned refcount
block goes ahead where the default refuses it.  After the fatal corruption such a repair
signals, QEMU's node has no driver: its writes still reach the file, its cached refcount
updates never do, and the second pass fails with "No medium found".  Every damaged image of
the corpus, under each option set: the same exit code, stdout and stderr as qemu-img, and
``qemu-img check`` says of our result what it says of qemu-img's.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import need
from tests.qcow2 import oracle
from tests.qcow2.corrupt_corpus import CASES, Case

#: option sets run on every case; the cases whose repair the options change get them all
EVERY_CASE = ("", ",overlap-check=none", ",overlap-check=all")
ALL_OPTIONS = (
    *EVERY_CASE,
    ",overlap-check=constant",
    ",overlap-check=cached",
    ",overlap-check.refcount-block=off",
    ",overlap-check=none,overlap-check.refcount-block=on",
    ",overlap-check.template=constant",
    ",overlap-check.active-l2=off",
)
OPTION_DEPENDENT = {"reftable_unaligned", "reftable_unaligned_read"}


def run_check(tool: str, path: Path, options: str, mode: str) -> tuple[int, str, str]:
    argv = [need("qemu-img")] if tool == "qemu-img" else [sys.executable, "-m", "qcow2"]
    spec = f"driver=qcow2,file.filename={path}{options}"
    done = subprocess.run(
        [*argv, "check", "-r", mode, "--image-opts", spec],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.returncode, done.stdout, done.stderr.replace(str(path), "IMG")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_repair_with_overlap_check_options_as_qemu_img(tmp_path: Path, case: Case) -> None:
    base = case.build(tmp_path / "base.qcow2")
    option_sets = ALL_OPTIONS if case.name in OPTION_DEPENDENT else EVERY_CASE
    seen = set()
    for options in option_sets:
        results = {}
        for tool in ("qemu-img", "qcow2"):
            path = tmp_path / tool / "img.qcow2"
            path.parent.mkdir(exist_ok=True)
            shutil.copy(base, path)
            results[tool] = (*run_check(tool, path, options, "all"), oracle.verdict(path))
        assert results["qcow2"] == results["qemu-img"], f"{case.name} {options!r}"
        seen.add(repr(results["qemu-img"]))
    if case.name in OPTION_DEPENDENT:
        assert len(seen) > 1, "the options no longer change qemu-img's repair of this case"

"""Fuzzing the reader with structure-aware mutations of qemu-made images (issue 13).

Property: whatever one to four metadata fields of a seed image say (see
:mod:`tests.qcow2.fuzz`), opening it, reading it, checking it, mapping it, reading its
snapshots and the ``qcow2`` command's ``info``/``check``/``map`` raise nothing but
:class:`~qcow2.errors.Qcow2Error` (exit codes 0-3, no internal error), within 20 s and
512 MiB of extra address space (a forked child under RLIMIT_AS and an alarm).

The suite runs a bounded number of examples (about a minute here).  A longer run:
``VTPM_QCOW_FUZZ_EXAMPLES=100000 python -m pytest tests/qcow2/test_fuzz.py``; every
finding becomes an image builder in :data:`tests.qcow2.corrupt_corpus.FUZZ_FINDINGS`,
which :mod:`tests.qcow2.test_hostile_limits` and :func:`test_finding` run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import need
from tests.qcow2 import fuzz
from tests.qcow2.corrupt_corpus import FUZZ_FINDINGS, Hostile

EXAMPLES = int(os.environ.get("VTPM_QCOW_FUZZ_EXAMPLES", "800"))

_seeds: list[fuzz.Seed] = []


def seeds() -> list[fuzz.Seed]:
    """The seed images, made once per test session."""
    if not _seeds:
        need("qemu-img")
        _seeds.extend(fuzz.build_seeds(Path(tempfile.mkdtemp(prefix="qcow2-fuzz-seeds-"))))
    return _seeds


@pytest.mark.timeout(max(300, EXAMPLES))
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_mutated_images_fail_only_with_qcow2_errors(data: st.DataObject) -> None:
    name, image, changes = data.draw(fuzz.mutated(seeds()), label="mutation")
    with tempfile.TemporaryDirectory(prefix="qcow2-fuzz-") as directory:
        path = Path(directory) / f"{name}.qcow2"
        path.write_bytes(image)
        failure = fuzz.run_bounded(os.fspath(path))
    assert failure is None, f"seed {name}, {changes}:\n{failure}"


@pytest.mark.parametrize("finding", FUZZ_FINDINGS, ids=[f.name for f in FUZZ_FINDINGS])
def test_finding(tmp_path: Path, finding: Hostile) -> None:
    """Each image the fuzzer once found a failure on."""
    path = finding.build(tmp_path / "img.qcow2")
    assert fuzz.run_bounded(os.fspath(path)) is None


def _run(*args: str) -> tuple[int, str, str]:
    result = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    return result.returncode, result.stdout, result.stderr


@pytest.mark.parametrize("name", ["reftable_entry_bit63", "backing_name_nul_inside"])
def test_finding_reads_as_qemu(tmp_path: Path, name: str) -> None:
    """``info``, ``check`` and ``check -r all`` of a finding print what qemu-img prints
    (a refcount block past QEMU's largest offset: "Can't get refcount for cluster N:
    Input/output error", check errors, no "Could not resize file" line on repair)."""
    qemu_img = need("qemu-img")
    finding = next(f for f in FUZZ_FINDINGS if f.name == name)
    ours = finding.build(tmp_path / "ours.qcow2")
    theirs = tmp_path / "theirs.qcow2"
    shutil.copyfile(ours, theirs)
    for args in (["info"], ["check"], ["check", "--output=json"]):  # read-only: one file
        assert _run("qcow2", *args, os.fspath(ours)) == _run(qemu_img, *args, os.fspath(ours))
    repair = ["check", "-r", "all"]
    expected = expected_for(_run(qemu_img, *repair, os.fspath(theirs)), theirs, ours)
    assert _run("qcow2", *repair, os.fspath(ours)) == expected
    assert (
        _run(qemu_img, "check", os.fspath(ours))[1:]
        == expected_for(_run(qemu_img, "check", os.fspath(theirs)), theirs, ours)[1:]
    )


def expected_for(result: tuple[int, str, str], theirs: Path, ours: Path) -> tuple[int, str, str]:
    """qemu-img's output on ``theirs`` as it reads for ``ours``."""
    code, out, err = result
    swap = (os.fspath(theirs), os.fspath(ours))
    return code, out.replace(*swap), err.replace(*swap)

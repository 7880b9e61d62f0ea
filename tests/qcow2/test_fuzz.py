"""Fuzzing the reader with structure-aware mutations of qemu-made images (issue 13).

Property: whatever one to four metadata fields of a seed image say (see
:mod:`tests.qcow2.fuzz`), opening it, reading it, checking it, mapping it, reading its
snapshots and the ``qcow2`` command's ``info``/``check``/``map`` raise nothing but
:class:`~qcow2.errors.Qcow2Error` (exit codes 0-3, no internal error), within 20 s and
512 MiB of extra address space (a forked child under RLIMIT_AS and an alarm).

The seeds include a LUKS-encrypted image (two key slots): its crypto header extension and
LUKS header are fuzz targets, and an encrypted image is exercised a second time with its
secret (when unlocking it costs at most :data:`tests.qcow2.fuzz.KEYED_OPEN_ITERATIONS`).

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


def test_luks_header_is_a_fuzz_target(tmp_path: Path) -> None:
    """The LUKS seed's fields cover the crypto header extension, the LUKS header and its
    key slots, and the keyed pass of :func:`fuzz.exercise` unlocks the seed itself."""
    seed = next(s for s in seeds() if s.name == "luks")
    kinds = {f.what for f in seed.fields}
    assert {
        "crypto_header_offset",
        "crypto_header_length",
        "luks_magic",
        "luks_payload_offset",
        "luks_key_bytes",
        "luks_mk_digest_iter",
        "luks_slot_active",
        "luks_slot_iterations",
        "luks_slot_key_offset",
        "luks_slot_stripes",
        "luks_key_material",
    } <= kinds
    # both key slots (the second added by qemu-img amend) carry key material fields
    assert len({f.offset // 4096 for f in seed.fields if f.what == "luks_key_material"}) >= 2
    path = tmp_path / "luks.qcow2"
    path.write_bytes(seed.data)
    cost = fuzz.keyed_open_cost(os.fspath(path))
    assert cost is not None and 0 < cost <= fuzz.KEYED_OPEN_ITERATIONS
    import qcow2

    with qcow2.open(os.fspath(path), key_secret=fuzz.SECRET.encode()) as image:
        assert image.read(0, 4096) == b"\x51" * 4096
    assert fuzz.run_bounded(os.fspath(path)) is None


def test_commit_records_are_a_fuzz_target(tmp_path: Path) -> None:
    """The records seed is a crash state (header one commit behind) whose newest record
    rolls forward; its records' fields are targets, and a mutation keeps each record's
    digest right, so that roll-forward itself is fuzzed, not only the digest check."""
    import qcow2

    seed = next(s for s in seeds() if s.name == "records")
    kinds = {f.what for f in seed.fields}
    assert {
        "record_generation",
        "record_base",
        "record_new",
        "record_count",
        "record_extent_offset",
        "record_extent_length",
    } <= kinds
    path = tmp_path / "records.qcow2"
    path.write_bytes(seed.data)
    with qcow2.open(os.fspath(path)) as image:
        behind = image.read(0, 16384)
    with qcow2.open(os.fspath(path), roll_forward=True) as image:
        rolled = image.read(0, 16384)
    assert rolled != behind and rolled[10000:16000] == b"\x53" * 6000
    # a record's new header bytes changed, digest fixed: believed as far as the digest goes
    data = bytearray(seed.data)
    field = next(f for f in seed.fields if f.what == "record_new")
    data[field.offset] ^= 0xFF
    fuzz.fix_record_digests(data)
    path.write_bytes(bytes(data))
    assert fuzz.run_bounded(os.fspath(path)) is None
    from qcow2.commit_records import read_records, verify

    with qcow2.open(os.fspath(path), roll_forward=True) as image:
        records = read_records(image.file, image.header)
        assert records and all(verify(image.file, r) for r in records)

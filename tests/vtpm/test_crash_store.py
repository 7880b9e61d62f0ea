"""Crash consistency of a mounted store under a real swtpm workload.

The mount daemon records every write, flush and truncate of the image file plus a marker
after each request that changed the store (``$VTPM_QCOW_WRITE_LOG``).  Replaying every
prefix of that log onto a copy of the image as it was before the mount gives every state a
crash could leave.  Each must pass ``qemu-img check`` (leaks at most) and hold exactly one
committed state: the sections qemu-img reads back (linear codec) equal, by digest, the
sections at some commit marker; never a mix of an old and a new state.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from tests.helpers import need
from tests.vtpm.mount_fixtures import (
    NV_INDEX,
    create_image,
    mounted,
    qemu_img_check,
    qemu_img_snapshots,
    raw_sections,
    runtime_dir,  # noqa: F401  (fixture)
)
from tests.vtpm.swtpm_fixtures import running_swtpm, setup_state, tpm_client
from vtpm_qcow.export.instruments import WRITE_LOG_ENV, read_write_log
from vtpm_qcow.state import linear

pytestmark = pytest.mark.usefixtures("runtime_dir")

State = frozenset[tuple[str, str]]


def state_of(sections: dict[str, bytes]) -> State:
    """A TPM state as a set of (section, sha256 of its blob)."""
    return frozenset((name, hashlib.sha256(blob).hexdigest()) for name, blob in sections.items())


def check_exit(image: Path) -> int:
    """``qemu-img check``'s exit status (0 clean, 3 leaks only, 2 corrupt, 1 failed)."""
    return subprocess.run(
        [need("qemu-img"), "check", str(image)], capture_output=True, timeout=60, check=False
    ).returncode


def test_every_prefix_of_a_swtpm_write_log_is_a_committed_state(tmp_path: Path) -> None:
    for view in ("file", "dir"):
        _crash_run(tmp_path / view, view)


def _crash_run(workdir: Path, view: str) -> None:
    workdir.mkdir()
    image = create_image(workdir / "vtpm.qcow2")
    base = workdir / "base.qcow2"
    shutil.copyfile(image, base)
    log = workdir / "writes.log"
    observed: list[State] = []
    with mounted(image, workdir / "mnt", view=view, env={WRITE_LOG_ENV: str(log)}) as mount:
        setup_state(mount.setup_tpmstate)
        observed.append(state_of(raw_sections(image)))
        with running_swtpm(mount.tpmstate, workdir / "swtpm") as swtpm, tpm_client(swtpm) as tpm:
            tpm.nv_define_space(NV_INDEX, 64)
            observed.append(state_of(raw_sections(image)))
            for _ in range(3):
                tpm.nv_write(NV_INDEX, os.urandom(64))
                observed.append(state_of(raw_sections(image)))
            tpm.hierarchy_change_auth(b"crash-owner")
            observed.append(state_of(raw_sections(image)))
    qemu_img_check(image)

    records = read_write_log(log)
    assert sum(1 for kind, _, _ in records if kind == "commit") >= len(observed)
    replay = workdir / "replay.qcow2"
    shutil.copyfile(base, replay)
    committed = {state_of(raw_sections(replay))}
    prefix_states: list[State] = []
    fd = os.open(replay, os.O_RDWR)
    try:
        for kind, offset, data in records:
            if kind == "commit":
                committed.add(prefix_states[-1] if prefix_states else state_of({}))
                continue
            if kind == "flush":
                continue
            if kind == "write":
                os.pwrite(fd, data, offset)
            elif kind == "truncate":
                os.ftruncate(fd, offset)
            status = check_exit(replay)
            assert status in (0, 3), f"{view}: prefix after {kind} at {offset:#x}: check {status}"
            prefix_states.append(state_of(raw_sections(replay)))
    finally:
        os.close(fd)
    # the log is complete: replaying all of it gives the image the daemon left
    assert replay.read_bytes() == image.read_bytes()
    # what swtpm's commands left behind was committed, and every crash state is committed
    assert set(observed) <= committed
    print(f"{view}: {len(prefix_states)} crash states, {len(committed)} committed states")
    assert len(committed) > len(observed)  # swtpm_setup alone commits several states
    mixed = [s for s in prefix_states if s not in committed]
    assert not mixed, f"{view}: {len(mixed)} of {len(prefix_states)} crash states never committed"


def test_snapshots_racing_tpm_writes_stay_consistent(tmp_path: Path) -> None:
    image = create_image(tmp_path / "vtpm.qcow2")
    blobs: list[bytes] = []
    tags: list[str] = []
    errors: list[BaseException] = []
    with mounted(image, tmp_path / "mnt", view="file") as mount:
        setup_state(mount.setup_tpmstate)
        stop = threading.Event()

        def snapshot_loop() -> None:
            try:
                with mount.control() as client:
                    while not stop.is_set() and len(tags) < 30:
                        tag = f"race{len(tags)}"
                        client.snapshot_create(tag)
                        tags.append(tag)
            except BaseException as err:
                errors.append(err)

        with running_swtpm(mount.tpmstate, tmp_path / "swtpm") as swtpm, tpm_client(swtpm) as tpm:
            blobs.append(raw_sections(image)["permall"])
            tpm.nv_define_space(NV_INDEX, 64)
            blobs.append(raw_sections(image)["permall"])
            thread = threading.Thread(target=snapshot_loop)
            thread.start()
            try:
                for _ in range(15):
                    tpm.nv_write(NV_INDEX, os.urandom(64))
                    blobs.append(raw_sections(image)["permall"])
            finally:
                stop.set()
                thread.join(60)
            blobs.append(raw_sections(image)["permall"])
    assert not errors, errors
    qemu_img_check(image)
    assert qemu_img_snapshots(image) == tags
    # every snapshot holds one whole committed state (qemu-img reads it back)
    known = {hashlib.sha256(b).hexdigest() for b in blobs}
    for tag in tags:
        raw = tmp_path / f"{tag}.raw"
        subprocess.run(
            [need("qemu-img"), "convert", "-l", f"snapshot.name={tag}", "-O", "raw", image, raw],
            check=True,
            capture_output=True,
            timeout=60,
        )
        blob = linear.read_section(raw.read_bytes(), "permall", source=tag)
        raw.unlink()
        assert blob is not None, tag
        assert hashlib.sha256(blob).hexdigest() in known, tag

"""Backups of a live vTPM image: swtpm writes NV through a real mount while backups run.

The mount daemon logs every image write and a marker after each committed request
(``$VTPM_QCOW_WRITE_LOG``); replaying the log onto a copy of the image taken before the
mount and reading each marked state with ``qemu-img convert`` gives every committed state.
Each backup's sections (from its manifest, re-checked by ``verify``) must equal one of them,
and swtpm restarted on the backup must read back an NV value that was written.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
import time
from pathlib import Path

import pytest
import xxhash

from tests.qcow2 import oracle
from tests.vtpm.mount_fixtures import (
    NV_INDEX,
    mounted,
    qemu_img_check,
    runtime_dir,  # noqa: F401  (fixture)
    vtpm_qcow,
)
from tests.vtpm.swtpm_fixtures import need_swtpm, running_swtpm, tpm_client
from vtpm_qcow.export.instruments import WRITE_LOG_ENV, read_write_log
from vtpm_qcow.state import linear

pytestmark = pytest.mark.usefixtures("runtime_dir")

Sections = frozenset[tuple[str, str]]
#: formats of the backups taken while swtpm writes, in order
LIVE_FORMATS = ("qcow2", "raw", "dir", "qcow2", "raw", "dir")


def sections_of(raw: bytes, source: str) -> Sections:
    """(section, xxh3-128) of a linear file's sections, read with the linear codec."""
    out = []
    for name in linear.SECTION_NAMES:
        blob = linear.read_section(raw, name, source=source) if linear.is_formatted(raw) else None
        if blob is not None:
            out.append((name, xxhash.xxh3_128_hexdigest(blob)))
    return frozenset(out)


def image_sections(image: Path, snapshot: str | None = None) -> Sections:
    """The sections of ``image`` (or of one snapshot) as qemu-img reads them."""
    return sections_of(oracle.convert(image, snapshot=snapshot, force_share=True), str(image))


def manifest_sections(entry: dict[str, dict[str, dict[str, object]]]) -> Sections:
    """The sections a manifest entry (state or snapshot) records."""
    return frozenset((name, str(s["digest"])) for name, s in entry["sections"].items())


def committed_states(base: Path, log: Path, workdir: Path) -> set[Sections]:
    """Every state the daemon committed: the log replayed onto ``base``, read at each marker."""
    replay = workdir / "replay.qcow2"
    shutil.copyfile(base, replay)
    states = {image_sections(replay)}
    fd = os.open(replay, os.O_RDWR)
    try:
        for kind, offset, data in read_write_log(log):
            if kind == "write":
                os.pwrite(fd, data, offset)
            elif kind == "truncate":
                os.ftruncate(fd, offset)
            elif kind == "commit":
                states.add(image_sections(replay))
    finally:
        os.close(fd)
    return states


def nv_value_in(tpmstate: str, workdir: Path) -> int:
    """Start swtpm on a state and read the test's NV counter."""
    with running_swtpm(tpmstate, workdir) as swtpm, tpm_client(swtpm) as tpm:
        value: int = struct.unpack(">Q", tpm.nv_read(NV_INDEX, 8))[0]
        return value


def restart_on_backup(fmt: str, backup: Path, workdir: Path) -> int:
    """The NV counter swtpm reads from a backup (raw/dir used as is, qcow2 restored)."""
    workdir.mkdir()
    if fmt == "raw":
        copy = workdir / "state.lin"
        shutil.copyfile(backup, copy)
        return nv_value_in(f"backend-uri=file://{copy}", workdir / "swtpm")
    if fmt == "dir":
        copy = workdir / "state"
        shutil.copytree(backup, copy)
        return nv_value_in(f"dir={copy}", workdir / "swtpm")
    restored, exported = workdir / "restored.qcow2", workdir / "exported.lin"
    vtpm_qcow("restore", str(backup), str(restored))
    vtpm_qcow("export", str(restored), str(exported))
    return nv_value_in(f"backend-uri=file://{exported}", workdir / "swtpm")


def test_backups_while_swtpm_writes_hold_committed_states(tmp_path: Path) -> None:
    need_swtpm()
    image = tmp_path / "vtpm.qcow2"
    vtpm_qcow("setup", "--create", str(image))
    base, log = tmp_path / "base.qcow2", tmp_path / "writes.log"
    shutil.copyfile(image, base)
    written: list[int] = []
    errors: list[BaseException] = []
    backups: list[tuple[str, Path]] = []
    stop = threading.Event()
    with (
        mounted(image, tmp_path / "mnt", env={WRITE_LOG_ENV: str(log)}) as mount,
        running_swtpm(mount.tpmstate, tmp_path / "swtpm") as swtpm,
        tpm_client(swtpm) as tpm,
    ):
        tpm.nv_define_space(NV_INDEX, 8)
        tpm.nv_write(NV_INDEX, struct.pack(">Q", 0))
        vtpm_qcow("snapshot", "-c", "before", str(image))  # through the daemon

        def writer() -> None:
            try:
                while not stop.is_set():
                    value = len(written) + 1
                    tpm.nv_write(NV_INDEX, struct.pack(">Q", value))
                    written.append(value)
                    time.sleep(0.01)
            except BaseException as err:
                errors.append(err)

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            for number, fmt in enumerate(LIVE_FORMATS):
                dest = tmp_path / f"backup{number}.{fmt}"
                vtpm_qcow("backup", "--format", fmt, str(image), str(dest))
                backups.append((fmt, dest))
            exported = tmp_path / "exported.lin"
            vtpm_qcow("export", str(image), str(exported))  # the same consistent path
            backups.append(("raw", exported))
        finally:
            stop.set()
            thread.join(60)
        writes_during_backups = len(written)
    assert not errors, errors
    assert writes_during_backups >= len(LIVE_FORMATS), "swtpm barely wrote during the backups"

    committed = committed_states(base, log, tmp_path)
    assert len(committed) > writes_during_backups  # one per NV write at least
    values, generations = [], []
    for number, (fmt, backup) in enumerate(backups):
        state = backup_state(fmt, backup)
        if fmt != "raw" or backup.name != "exported.lin":
            vtpm_qcow("verify", str(backup))
            manifest = json.loads(Path(f"{backup}.manifest.json").read_text())
            assert manifest_sections(manifest["state"]) == state
            generations.append(manifest["generation"])  # set only by the daemon's capture op
        assert state in committed, f"{backup}: a state the daemon never committed"
        values.append(restart_on_backup(fmt, backup, tmp_path / f"restart{number}"))
    assert all(0 <= v <= writes_during_backups + 1 for v in values), values
    assert values == sorted(values), f"backups taken in turn went back in time: {values}"
    assert values[-1] > 0, "no write reached any backup"
    assert all(isinstance(g, int) for g in generations), f"not read by the daemon: {generations}"
    assert generations == sorted(generations) and generations[0] < generations[-1], generations

    # the qcow2 backups carry the snapshot as the source image has it (qemu-img reads both)
    before = image_sections(image, "before")
    for fmt, backup in backups:
        if fmt == "qcow2":
            qemu_img_check(backup)
            assert image_sections(backup, "before") == before
            assert [s["name"] for s in oracle.snapshot_list(backup)] == ["before"]


def backup_state(fmt: str, backup: Path) -> Sections:
    """A backup's sections, read independently of vtpm-qcow (qemu-img, plain files)."""
    if fmt == "raw":
        return sections_of(backup.read_bytes(), str(backup))
    if fmt == "qcow2":
        return image_sections(backup)
    return frozenset(
        (name, xxhash.xxh3_128_hexdigest((backup / f"tpm2-00.{name}").read_bytes()))
        for name in linear.SECTION_NAMES
        if (backup / f"tpm2-00.{name}").exists()
    )

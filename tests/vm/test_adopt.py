"""``vtpm-qcow adopt`` (issue 15): a VM snapshotted by a real QEMU while its TPM state lived in
a plain swtpm directory moves into a vTPM image with its history.

The VM: QEMU with ``-tpmdev emulator`` on a real ``swtpm socket --tpmstate dir=...``, the
TPM changed through QEMU's TIS (qtest) between HMP ``savevm``s.  The oracle for each
adopted snapshot is a real swtpm started on that snapshot's state (applied to a copy and
exported to a directory) answering NV reads with what was written before the snapshot.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

from tests.helpers import held_by_qemu_io, need
from tests.vm.qemu_fixtures import (
    create_disk,
    hmp_over_qmp,
    qemu_vm,
    quit_qemu,
    run_tool,
    swtpm_process,
)
from tests.vm.scenario import NV_INDEX, NV_SIZE, OWNER_B, snapshot_tags, state_a, state_b
from tests.vtpm.mount_fixtures import qemu_img_check, vtpm_qcow
from tests.vtpm.swtpm_fixtures import running_swtpm, tpm_client
from vtpm_qcow.state.store import Store
from vtpm_qcow.tpm.client import Tpm
from vtpm_qcow.tpm.qtest_tis import QtestTisTransport


@contextlib.contextmanager
def plain_vm(
    workdir: Path, statedir: Path, disks: list[Path], *extra: str
) -> Iterator[tuple[Path, Tpm]]:
    """swtpm on the plain directory ``statedir`` + QEMU on it and ``disks``: (QMP, TPM)."""
    workdir.mkdir()
    with (
        swtpm_process(f"dir={statedir}", workdir, data_channel=False) as swtpm,
        qemu_vm(workdir, str(swtpm.ctrl), disks, running=True, extra=list(extra)) as qemu,
        QtestTisTransport(str(qemu.qtest)) as tis,
    ):
        yield qemu.qmp, Tpm(tis)
        quit_qemu(qemu)


def nv_of(image: Path, tag: str | None, workdir: Path) -> bytes:
    """NV_INDEX as a real swtpm reads it from ``image``'s snapshot ``tag`` (current state
    if None): applied to a copy, exported to a directory, swtpm started on that."""
    workdir.mkdir()
    copy = workdir / "copy.qcow2"
    shutil.copyfile(image, copy)
    if tag is not None:
        vtpm_qcow("snapshot", "-a", tag, str(copy))
    state = workdir / "state"
    vtpm_qcow("export", str(copy), f"{state}/")
    assert not (state / "tpm2-00.volatilestate").exists()  # permall only (adopt's rule)
    with running_swtpm(f"dir={state}", workdir / "swtpm") as swtpm, tpm_client(swtpm) as tpm:
        for auth in (b"", OWNER_B):
            with contextlib.suppress(Exception):
                return tpm.nv_read(NV_INDEX, NV_SIZE, owner=True, auth=auth)
    raise AssertionError(f"{tag}: NV index {NV_INDEX:#x} unreadable")


def verify_rows(disk: Path, image: Path) -> tuple[int, dict[str, str]]:
    done = vtpm_qcow("vm", "verify", "--json", "--disk", str(disk), str(image), check=False)
    return done.returncode, {r["tag"]: r["result"] for r in json.loads(done.stdout)["tags"]}


def test_adopt_the_history_of_a_vm_on_a_plain_swtpm_directory(tmp_path: Path) -> None:
    statedir = tmp_path / "tpm2"
    statedir.mkdir()
    disk = create_disk(tmp_path / "disk.qcow2")  # QEMU saves the VM state on this one
    data = create_disk(tmp_path / "data.qcow2")
    disks = [disk, data]
    # An early snapshot saved without a device description: its TPM state is unreadable.
    with plain_vm(tmp_path / "run1", statedir, disks, "-machine", "suppress-vmdesc=on") as (
        qmp,
        tpm,
    ):
        tpm.startup()
        assert hmp_over_qmp(qmp, "savevm NODESC") == ""
    with plain_vm(tmp_path / "run2", statedir, disks) as (qmp, tpm):
        state_a(tpm)  # NV holds A
        assert hmp_over_qmp(qmp, "savevm H1") == ""
        assert hmp_over_qmp(qmp, "snapshot_blkdev_internal drive0 DISKONLY") == ""
        state_b(tpm)  # owner password set, NV holds B
        assert hmp_over_qmp(qmp, "savevm H2") == ""
        assert hmp_over_qmp(qmp, "savevm GONE") == ""  # deleted in the middle
        assert hmp_over_qmp(qmp, "delvm GONE") == ""
        tpm.nv_write(NV_INDEX, b"C" * NV_SIZE, owner=True, auth=OWNER_B)
        assert hmp_over_qmp(qmp, "savevm H3") == ""
        tpm.nv_write(NV_INDEX, b"D" * NV_SIZE, owner=True, auth=OWNER_B)  # the current state
    assert snapshot_tags(disk) == ["NODESC", "H1", "DISKONLY", "H2", "H3"]
    assert snapshot_tags(data) == ["NODESC", "H1", "H2", "H3"]
    image = tmp_path / "vtpm.qcow2"
    before = {path: path.read_bytes() for path in disks}
    # The data disk first: tags in disk order then table order, the VM state found on disk.
    done = vtpm_qcow(
        "adopt", "--disk", str(data), "--disk", str(disk), "--state", str(statedir),
        str(image), check=False,
    )  # fmt: skip
    assert done.returncode == 3, done.stderr  # partial: two snapshots were not adopted
    assert {path: path.read_bytes() for path in disks} == before  # the disks are only read
    rows = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines()[1:-1]}
    assert list(rows) == ["NODESC", "H1", "H2", "H3", "DISKONLY"]
    assert all(rows[t][-1] == f"({disk})" for t in ("H1", "H2", "H3"))
    assert rows["NODESC"][0] == "SKIPPED" and "suppress-vmdesc" in " ".join(rows["NODESC"])
    assert rows["DISKONLY"][0] == "SKIPPED" and "disk-only" in " ".join(rows["DISKONLY"])
    assert all(rows[t][0] == "adopted" for t in ("H1", "H2", "H3"))
    assert done.stdout.splitlines()[-1] == f"current state: {statedir}"
    # The image: QEMU's tools see the tags in the disks' order, clean.
    assert snapshot_tags(image) == ["H1", "H2", "H3"]
    qemu_img_check(image)
    # Each adopted snapshot, loaded by a real swtpm, holds what was written before it.
    assert nv_of(image, "H1", tmp_path / "H1") == b"A" * NV_SIZE
    assert nv_of(image, "H2", tmp_path / "H2") == b"B" * NV_SIZE
    assert nv_of(image, "H3", tmp_path / "H3") == b"C" * NV_SIZE
    assert nv_of(image, None, tmp_path / "now") == b"D" * NV_SIZE
    with Store.open(image, writable=False) as store:
        assert store.read_section("permall") == (statedir / "tpm2-00.permall").read_bytes()
        for tag in ("H1", "H2", "H3"):
            assert store.snapshot_section(tag, "volatilestate") is None
    # vm verify proves every adopted tag; the two not adopted are missing on the vTPM side
    # (nothing invents a TPM state for them), and once gone from the disk all is well.
    status, results = verify_rows(disk, image)
    assert status == 1 and results == {
        "NODESC": "missing-vtpm", "H1": "match", "DISKONLY": "missing-vtpm",
        "H2": "match", "H3": "match",
    }  # fmt: skip
    for tag in ("NODESC", "DISKONLY"):
        run_tool(need("qemu-img"), "snapshot", "-d", tag, str(disk))
    assert verify_rows(disk, image)[0] == 0
    # Adopting again into the same image is refused: it has snapshots now.
    before = image.read_bytes()
    again = vtpm_qcow("adopt", "--disk", str(disk), str(image), check=False)
    assert again.returncode == 1 and "already has snapshots" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1 and image.read_bytes() == before


def test_adopt_into_an_imported_image_and_from_a_linear_file(tmp_path: Path) -> None:
    """An image without snapshots (an import of the current state) is filled; a linear
    file is a --state too; JSON output; one-line refusals leave nothing behind."""
    statedir = tmp_path / "tpm2"
    statedir.mkdir()
    disk = create_disk(tmp_path / "disk.qcow2")
    with plain_vm(tmp_path / "run", statedir, [disk]) as (qmp, tpm):
        state_a(tpm)
        assert hmp_over_qmp(qmp, "savevm S1") == ""
        tpm.nv_write(NV_INDEX, b"E" * NV_SIZE)
    # An image made by 'import' (libvirt enable does the same): kept state, snapshots added.
    imported = tmp_path / "imported.qcow2"
    vtpm_qcow("create", str(imported))
    vtpm_qcow("import", str(imported), str(statedir))
    done = vtpm_qcow("adopt", "--json", "--disk", str(disk), str(imported))
    fields = json.loads(done.stdout)
    assert fields["created"] is False and fields["partial"] is False
    assert [(t["tag"], t["result"]) for t in fields["tags"]] == [("S1", "adopted")]
    assert "kept" in fields["current"]
    assert nv_of(imported, "S1", tmp_path / "S1") == b"A" * NV_SIZE
    assert nv_of(imported, None, tmp_path / "now") == b"E" * NV_SIZE
    # A linear file as the current state.
    lin = tmp_path / "state.lin"
    vtpm_qcow("export", str(imported), str(lin))
    from_file = tmp_path / "from-file.qcow2"
    vtpm_qcow("adopt", "--disk", str(disk), "--state", str(lin), str(from_file))
    with Store.open(from_file, writable=False) as store:
        assert store.read_section("permall") == (statedir / "tpm2-00.permall").read_bytes()
        assert store.snapshot_tags() == ["S1"]
    # Refusals: one line, exit 1, no image left behind.
    plain = create_disk(tmp_path / "plain.qcow2")
    for args, words in (
        (("--disk", str(plain), str(tmp_path / "a.qcow2")), "nothing to adopt"),
        (("--disk", str(tmp_path / "gone.qcow2"), str(tmp_path / "b.qcow2")), "gone.qcow2"),
        (("--disk", str(disk), "--state", str(tmp_path / "no"), str(tmp_path / "c.qcow2")), "no"),
        (("--disk", str(disk), str(tmp_path / "nodir" / "d.qcow2")), "no such directory"),
    ):
        failed = vtpm_qcow("adopt", *args, check=False)
        assert failed.returncode == 1 and words in failed.stderr, (args, failed.stderr)
        assert len(failed.stderr.strip().splitlines()) == 1 and "Traceback" not in failed.stderr
    leftovers = {p.name for p in tmp_path.iterdir() if p.name.startswith((".", "a.", "b.", "c."))}
    assert not leftovers
    # Encrypted: --encrypt with a secret makes a LUKS image; vm verify opens it with it.
    from tests.vtpm.test_secret import private_file

    key = private_file(tmp_path / "vtpm.key")
    enc = tmp_path / "enc.qcow2"
    secret = ("--secret-file", str(key))
    vtpm_qcow("adopt", "--encrypt", "--iter-time", "10", *secret, "--disk", str(disk), str(enc))
    assert Store.is_encrypted(str(enc))
    done = vtpm_qcow("vm", "verify", *secret, "--disk", str(disk), str(enc))
    assert done.stdout.split()[3:5] == ["S1", "match"], done.stdout
    for args, words in (
        (("--encrypt", "--disk", str(disk), str(tmp_path / "e1.qcow2")), "passphrase"),
        ((*secret, "--disk", str(disk), str(tmp_path / "e2.qcow2")), "without --encrypt"),
        (("--encrypt", *secret, "--disk", str(disk), str(enc)), "new image"),
    ):
        failed = vtpm_qcow("adopt", *args, check=False)
        assert failed.returncode == 1 and words in failed.stderr, (args, failed.stderr)
    assert not (tmp_path / "e1.qcow2").exists() and not (tmp_path / "e2.qcow2").exists()
    # Without --state, a new image's current state is the last adopted snapshot's.
    bare = tmp_path / "bare.qcow2"
    done = vtpm_qcow("adopt", "--disk", str(disk), str(bare))
    assert "snapshot 'S1'" in done.stdout.splitlines()[-1]
    assert nv_of(bare, None, tmp_path / "bare-now") == b"A" * NV_SIZE
    # Held by QEMU: refused without -U (one line naming the lock), read with -U.
    with held_by_qemu_io(disk):
        held = vtpm_qcow("adopt", "--disk", str(disk), str(tmp_path / "h.qcow2"), check=False)
        assert held.returncode == 1 and "lock" in held.stderr, held.stderr
        assert len(held.stderr.strip().splitlines()) == 1 and not (tmp_path / "h.qcow2").exists()
        vtpm_qcow("adopt", "-U", "--disk", str(disk), str(tmp_path / "h.qcow2"))
    assert snapshot_tags(tmp_path / "h.qcow2") == ["S1"]

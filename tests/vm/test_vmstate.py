"""The TPM state in a disk snapshot's VM state (issue 15): read back from snapshots a real
QEMU saved with a real swtpm behind ``vtpm-qcow serve``, compared with the vTPM image.

The oracle for the vTPM side is ``qemu-img convert -l`` + the linear codec
(:func:`tests.vm.scenario.permall`); for the disk side ``qemu-img snapshot -l`` sizes.
"""

from __future__ import annotations

import json
import random
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import qcow2
from tests.helpers import need
from tests.qcow2.test_snapshots_vmstate import hmp, qemu_with_disk, set_vm_state_size
from tests.vm.qemu_fixtures import create_disk, hmp_over_qmp, qmp_job, run_tool
from tests.vm.scenario import permall, snapshot_tags, stack, state_a, state_b
from tests.vtpm.mount_fixtures import vtpm_qcow
from vtpm_qcow.errors import VmstateError
from vtpm_qcow.state.blob import TAG_DATA, check_stored_blob, parse_blob
from vtpm_qcow.state.store import Store
from vtpm_qcow.vm.vmstate import find_tpm_section, read_tpm_vmstate, tpm_vmstate, unwrap_blob


def test_orchestrated_save_permanent_is_the_vtpm_snapshots_permall(
    images: tuple[Path, Path], tmp_path: Path
) -> None:
    image, disk = images
    with stack(tmp_path / "run", image, disk) as s:
        state_a(s.tpm)
        s.vm("save", "T1")
        started = time.monotonic()
        vm = read_tpm_vmstate([str(disk)], "T1")  # shared: QEMU holds the disk
        elapsed = time.monotonic() - started
        expected = permall(image, "T1")
        assert expected is not None and vm.permanent == expected  # byte for byte
        with Store.open(image, writable=False, force_share=True) as store:
            assert store.snapshot_section("T1", "permall") == vm.permanent
        assert vm.tag == "T1" and vm.disk == str(disk) and not vm.encrypted
        assert vm.volatile is not None and parse_blob(vm.volatile).header is not None
        # The volatile blob unwraps the same way, to what swtpm would store for it.
        volatile, encrypted = unwrap_blob(vm.volatile, source="x", what="volatile")
        assert volatile is not None and not encrypted
        assert [t.tag for t in check_stored_blob(volatile).tlvs] == [TAG_DATA]
        assert vm.savestate is None  # TPM 2.0 has no save state
        assert elapsed < 2.0, elapsed  # the tail only, while the VM runs
        state_b(s.tpm)  # the TPM moves on: a second snapshot holds the new state
        s.vm("save", "T2")
        later = read_tpm_vmstate([str(disk)], "T2")
        assert later.permanent == permall(image, "T2") != vm.permanent
        assert read_tpm_vmstate([str(disk)], "T1") == vm


def test_hmp_savevm_of_a_running_vm(images: tuple[Path, Path], tmp_path: Path) -> None:
    """QEMU's own savevm (no vtpm-qcow involved): the permanent blob is the permall swtpm
    has in the active layer at that moment (the firmware never touches the TPM)."""
    image, disk = images
    with stack(tmp_path / "run", image, disk) as s:
        state_a(s.tpm)
        assert hmp_over_qmp(s.qemu.qmp, "savevm H1") == ""
        vm = read_tpm_vmstate([str(disk)], "H1")
        assert vm.permanent == permall(image)
        assert snapshot_tags(image) == []  # nobody filed it on the vTPM side
        done = verify("-U", "--disk", str(disk), str(image))
        assert done.returncode == 1 and rows(done)["H1"][0] == "MISSING-VTPM"
        vtpm_qcow("snapshot", "-c", "H1", str(image))  # filed now: the TPM stayed idle
        done = verify("-U", "--disk", str(disk), str(image))
        assert done.returncode == 0 and rows(done)["H1"][0] == "match", done.stdout


def test_errors_name_the_file_and_the_reason(images: tuple[Path, Path], tmp_path: Path) -> None:
    image, disk = images
    other = create_disk(tmp_path / "other.qcow2")
    run_tool(need("qemu-img"), "snapshot", "-c", "DISKONLY", str(other))
    with stack(tmp_path / "run", image, disk) as s:
        state_a(s.tpm)
        s.vm("save", "T1")
        with pytest.raises(VmstateError, match=r"no snapshot 'nope' on .*disk.qcow2"):
            read_tpm_vmstate([str(disk)], "nope")
        with pytest.raises(VmstateError, match=r"DISKONLY' holds no VM state on .*other"):
            read_tpm_vmstate([str(disk), str(other)], "DISKONLY")
        # By name only: snapshot ID "1" is T1, but no snapshot is named "1".
        with pytest.raises(VmstateError, match="no snapshot '1'"):
            read_tpm_vmstate([str(disk)], "1")
        # The disk holding the VM state is found among several.
        assert read_tpm_vmstate([str(other), str(disk)], "T1").disk == str(disk)


def verify(*args: str) -> subprocess.CompletedProcess[str]:
    """``vtpm-qcow vm verify ARGS`` (never raises on its exit status)."""
    return vtpm_qcow("vm", "verify", *args, check=False)


def rows(done: subprocess.CompletedProcess[str]) -> dict[str, list[str]]:
    """The human table: tag -> [result, first detail word, ...]."""
    lines = done.stdout.splitlines()
    assert lines[0].split()[:3] == ["TAG", "RESULT", "DETAIL"], done.stdout
    return {line.split()[0]: line.split()[1:] for line in lines[1:]}


def test_verify_match_missing_and_a_swapped_snapshot(
    images: tuple[Path, Path], tmp_path: Path
) -> None:
    image, disk = images
    with stack(tmp_path / "run", image, disk) as s:
        state_a(s.tpm)
        s.vm("save", "T1")
        state_b(s.tpm)
        s.vm("save", "T2")
        hmp_over_qmp(s.qemu.qmp, "savevm H1")  # the disks only
        vtpm_qcow("snapshot", "-c", "V1", str(image))  # the vTPM image only
        done = verify("-U", "--disk", str(disk), str(image))
        assert done.returncode == 1, done.stderr
        table = rows(done)
        assert table["T1"][0] == "match" and table["T2"][0] == "match"
        assert table["H1"][0] == "MISSING-VTPM" and table["V1"][0] == "MISSING-DISK"
        # QEMU holds the disk: without -U the check cannot run (exit 2, one line).
        locked = verify("--disk", str(disk), str(image))
        assert locked.returncode == 2 and locked.stdout == ""
        assert len(locked.stderr.strip().splitlines()) == 1 and "lock" in locked.stderr
        assert "Traceback" not in locked.stderr
        hmp_over_qmp(s.qemu.qmp, "delvm H1")
        vtpm_qcow("snapshot", "-d", "V1", str(image))
        done = verify("-U", "--disk", str(disk), str(image))
        assert done.returncode == 0, done.stdout
        assert [r[0] for r in rows(done).values()] == ["match", "match"]
    # Offline: T1 re-filed with T2's TPM state (applied, then snapshotted over T1).
    vtpm_qcow("snapshot", "-a", "T2", str(image))
    vtpm_qcow("snapshot", "-c", "T1", "--overwrite", str(image))
    files = {path: path.read_bytes() for path in (image, disk)}
    done = verify("--disk", str(disk), str(image))
    assert {path: path.read_bytes() for path in files} == files  # read-only
    assert done.returncode == 1
    table = rows(done)
    assert table["T1"][0] == "MISMATCH" and table["T1"][1:3] == ["permanent", "blob"]
    assert table["T2"][0] == "match"
    fields = json.loads(verify("--json", "--disk", str(disk), str(image)).stdout)
    assert fields["ok"] is False and fields["vtpm"] == str(image)
    by_tag = {row["tag"]: row for row in fields["tags"]}
    assert by_tag["T1"]["result"] == "mismatch" and by_tag["T1"]["differs"] == ["permanent"]
    assert by_tag["T2"]["result"] == "match" and by_tag["T2"]["disk"] == str(disk)
    assert by_tag["T2"]["blob_sizes"]["permanent"] == len(permall(image, "T2") or b"")


def test_verify_usage_and_unreadable_images(images: tuple[Path, Path], tmp_path: Path) -> None:
    image, disk = images
    raw = tmp_path / "raw.img"
    raw.write_bytes(b"not a qcow2 image" * 100)
    for args in (
        ("--disk", str(disk), str(tmp_path / "nope.qcow2")),
        ("--disk", str(tmp_path / "gone.qcow2"), str(image)),
        ("--disk", str(raw), str(image)),
        (str(image),),  # no --disk
    ):
        done = verify(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert verify("--disk", str(disk), str(image)).returncode == 0  # nothing to compare
    run_tool(need("qemu-img"), "snapshot", "-c", "COLD", str(disk))
    vtpm_qcow("snapshot", "-c", "COLD", str(image))
    done = verify("--disk", str(disk), str(image))
    assert done.returncode == 0 and rows(done)["COLD"][0] == "no-vmstate"


def test_cluster_sizes_extended_l2_resize_and_a_deleted_snapshot(
    images: tuple[Path, Path], tmp_path: Path
) -> None:
    """One TPM state saved by QEMU's snapshot-save job into disks of every layout: the
    same permanent blob from each, also after a resize and a delete in the middle."""
    image, disk = images
    layouts = {
        "c512": "cluster_size=512",
        "c2m": "cluster_size=2M",
        "extl2": "cluster_size=128k,extended_l2=on",
    }
    paths = {"disk0": disk}
    extra: list[str] = []
    for node, options in layouts.items():
        path = tmp_path / f"{node}.qcow2"
        run_tool(need("qemu-img"), "create", "-q", "-f", "qcow2", "-o", options, str(path), "16M")
        paths[node] = path
        extra += ["-drive", f"if=none,id=d{node},file={path},format=qcow2,node-name={node}"]
    with stack(tmp_path / "run", image, disk, extra=extra) as s:
        state_a(s.tpm)
        for node in paths:
            for tag in ("S1", "S2", "S3"):
                job = {"tag": tag, "vmstate": node, "devices": [node]}
                assert qmp_job(s.qemu.qmp, "snapshot-save", job) is None
        active = permall(image)
    assert active is not None
    before = {node: read_tpm_vmstate([str(p)], "S3") for node, p in paths.items()}
    assert all(vm.permanent == active for vm in before.values())
    run_tool(need("qemu-img"), "resize", "-q", str(paths["c2m"]), "600G")
    run_tool(need("qemu-img"), "resize", "-q", str(disk), "+1G")
    for path in paths.values():
        run_tool(need("qemu-img"), "snapshot", "-d", "S2", str(path))
    for node, path in paths.items():
        assert snapshot_tags(path) == ["S1", "S3"]
        assert read_tpm_vmstate([str(path)], "S3") == before[node]
        assert read_tpm_vmstate([str(path)], "S1").permanent == active
    # All disks at once: the first holding S1 answers.
    assert read_tpm_vmstate([str(p) for p in paths.values()], "S1").disk == str(disk)


def _patched(disk: Path, name: str, patch: Callable[[bytearray], None]) -> Path:
    copy = disk.with_name(name)
    data = bytearray(disk.read_bytes())
    patch(data)
    copy.write_bytes(data)
    return copy


def test_hostile_vm_states_are_one_line_errors(images: tuple[Path, Path], tmp_path: Path) -> None:
    image, disk = images
    with stack(tmp_path / "run", image, disk) as s:
        state_a(s.tpm)
        s.vm("save", "T1")
    good = read_tpm_vmstate([str(disk)], "T1")
    with qcow2.open(str(disk)) as qimage:
        view = qimage.snapshot("T1", name_only=True)
        size = view.vm_state_size
        stream = view.read_vmstate(0, size)
    # The snapshot table lies about the size: shorter, longer, tiny, absurd.
    for wrong in (size - 1000, size + 4096, 5, 1 << 40):
        copy = _patched(disk, f"size-{wrong}.qcow2", lambda data: None)
        set_vm_state_size(copy, wrong)
        with pytest.raises(VmstateError) as caught:
            read_tpm_vmstate([str(copy)], "T1")
        assert str(copy) in str(caught.value) and "\n" not in str(caught.value)
        done = verify("--disk", str(copy), str(image))
        assert done.returncode == 1 and rows(done)["T1"][0] == "UNREADABLE", done.stdout
        assert "Traceback" not in done.stderr
    # The section itself damaged where the description puts it.
    marker = b"\x0ctpm-emulator"
    at = disk.read_bytes().index(marker)

    def wrong_type(data: bytearray) -> None:
        data[at - 5] = 0x05

    def huge_blob(data: bytearray) -> None:
        data[at + len(marker) + 12 : at + len(marker) + 16] = b"\xff\xff\xff\xf0"

    for name, patch, reason in (
        ("type.qcow2", wrong_type, "no section header"),
        ("blob.qcow2", huge_blob, "overruns the section"),
    ):
        copy = _patched(disk, name, patch)
        with pytest.raises(VmstateError, match=reason):
            read_tpm_vmstate([str(copy)], "T1")
    # Random damage to the stream's tail and cuts anywhere: a result or VmstateError.
    rng = random.Random(15)
    tail = max(0, len(stream) - 65536)
    outcomes = {"ok": 0, "error": 0}
    for _ in range(300):
        data = bytearray(stream)
        if rng.random() < 0.3:
            data = data[: rng.randrange(len(data))]
        else:
            for _ in range(rng.randrange(1, 8)):
                data[rng.randrange(tail, len(data))] = rng.randrange(256)
        blob = bytes(data)
        try:
            section = find_tpm_section(
                lambda offset, length, b=blob: b[offset : offset + length], len(blob), source="x"
            )
        except VmstateError:
            outcomes["error"] += 1
        else:
            outcomes["ok"] += 1
            tpm_vmstate("T1", "x", section)  # decodes, or VmstateError (not caught: fails)
    assert outcomes["error"] > 50 and outcomes["ok"] > 0, outcomes
    assert read_tpm_vmstate([str(disk)], "T1") == good  # the original is untouched


def test_no_description_and_no_tpm_are_refused_with_the_reason(
    images: tuple[Path, Path], tmp_path: Path
) -> None:
    image, disk = images
    with stack(tmp_path / "run", image, disk, extra=["-machine", "suppress-vmdesc=on"]) as s:
        state_a(s.tpm)
        s.vm("save", "T1")
    with pytest.raises(VmstateError, match="suppress-vmdesc=on"):
        read_tpm_vmstate([str(disk)], "T1")
    done = verify("--disk", str(disk), str(image))
    assert done.returncode == 1 and rows(done)["T1"][0] == "UNREADABLE"
    assert "suppress-vmdesc" in done.stdout
    plain = create_disk(tmp_path / "plain.qcow2")
    with qemu_with_disk(tmp_path, plain) as qmp:  # a VM without a TPM
        assert hmp(qmp, "savevm N1", "quit")[0] == ""
    with pytest.raises(VmstateError, match="no tpm-emulator section"):
        read_tpm_vmstate([str(plain)], "N1")


def test_an_encrypted_disk_is_refused(tmp_path: Path) -> None:
    from tests.qcow2.test_luks import _OBJECT, _image_opts, q_create

    disk = tmp_path / "luks.qcow2"
    q_create(disk, 4 * 1024 * 1024)
    run_tool(need("qemu-img"), "snapshot", *_OBJECT, "--image-opts", "-c", "S1", _image_opts(disk))
    set_vm_state_size(disk, 65536)  # QEMU 7.2 aborts a savevm onto a LUKS qcow2
    with pytest.raises(VmstateError, match=r"luks.qcow2: snapshot 'S1': the disk is encrypted"):
        read_tpm_vmstate([str(disk)], "S1")


def test_machine_type_without_section_footers(images: tuple[Path, Path], tmp_path: Path) -> None:
    """Machine types before 2.4 write no section footers: the walk is retried without."""
    image, disk = images
    with stack(tmp_path / "run", image, disk, extra=["-machine", "pc-i440fx-2.3"]) as s:
        state_a(s.tpm)
        s.vm("save", "T1")
    assert read_tpm_vmstate([str(disk)], "T1").permanent == permall(image, "T1")
    with qcow2.open(str(disk)) as qimage:
        view = qimage.snapshot("T1", name_only=True)
        section = find_tpm_section(view.read_vmstate, view.vm_state_size, source="x")
    assert section.footer is False
    assert verify("--disk", str(disk), str(image)).returncode == 0


def test_an_overlay_disk_is_read_without_its_backing_file(
    images: tuple[Path, Path], tmp_path: Path
) -> None:
    """savevm writes the VM state into the top image: the backing file is not needed."""
    image, _ = images
    base = create_disk(tmp_path / "base.qcow2")
    overlay = tmp_path / "overlay.qcow2"
    run_tool(
        need("qemu-img"), "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base),
        str(overlay),
    )  # fmt: skip
    with stack(tmp_path / "run", image, overlay) as s:
        state_a(s.tpm)
        s.vm("save", "T1")
    base.unlink()
    assert read_tpm_vmstate([str(overlay)], "T1").permanent == permall(image, "T1")
    assert verify("--disk", str(overlay), str(image)).returncode == 0


def test_only_the_tail_is_read(images: tuple[Path, Path], tmp_path: Path) -> None:
    """48 MiB of guest RAM that is not zero makes a stream of some 50 MiB; finding the TPM
    reads its first bytes, its last MiB and the section, whatever the RAM size."""
    image, disk = images
    with stack(tmp_path / "run", image, disk) as s:
        state_a(s.tpm)
        s.tis.qtest.command(f"memset 0x100000 0x{48 * 1024 * 1024:x} 0x5a")
        s.vm("save", "T1")
    read_bytes = []
    with qcow2.open(str(disk)) as qimage:
        view = qimage.snapshot("T1", name_only=True)

        def counting(offset: int, length: int) -> bytes:
            read_bytes.append(length)
            return view.read_vmstate(offset, length)

        assert view.vm_state_size > 48 * 1024 * 1024
        section = find_tpm_section(counting, view.vm_state_size, source="x")
    assert sum(read_bytes) <= 8 + 1024 * 1024 + len(section.permanent) + len(section.volatile) + 64
    assert tpm_vmstate("T1", str(disk), section).permanent == permall(image, "T1")

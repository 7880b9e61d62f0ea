"""The TPM state in a disk snapshot's VM state (issue 15): read back from snapshots a real
QEMU saved with a real swtpm behind ``vtpm-qcow serve``, compared with the vTPM image.

The oracle for the vTPM side is ``qemu-img convert -l`` + the linear codec
(:func:`tests.vm.scenario.permall`); for the disk side ``qemu-img snapshot -l`` sizes.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.helpers import need
from tests.vm.qemu_fixtures import create_disk, hmp_over_qmp, run_tool
from tests.vm.scenario import permall, snapshot_tags, stack, state_a, state_b
from vtpm_qcow.errors import VmstateError
from vtpm_qcow.state.blob import parse_blob
from vtpm_qcow.state.store import Store
from vtpm_qcow.vm.vmstate import read_tpm_vmstate


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

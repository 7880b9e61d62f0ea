"""Tags that look like snapshot IDs, through QEMU (issue 10).

The vTPM image looks tags up by name only.  QEMU 7.2 does too when it saves and deletes, but
its loadvm/snapshot-load revert each qcow2 disk with ``qcow2_snapshot_goto``, which tries the
tag as a snapshot ID first (measured here: ``loadvm 2`` on a disk whose snapshot ID 2 is
named ``before`` loads ``before``, disk and vmstate).  So: the watcher follows what QEMU
really loaded, and ``vm load`` refuses a tag QEMU would resolve to another snapshot.
"""

from __future__ import annotations

from pathlib import Path

from tests.vm.qemu_fixtures import hmp_over_qmp
from tests.vm.scenario import (
    NV_INDEX,
    NV_SIZE,
    permall,
    snapshot_tags,
    stack,
    state_a,
    wait_until,
    watcher_thread,
)


def nv_value(tag: str) -> bytes:
    return tag.encode().ljust(NV_SIZE, b"\0")


def test_numeric_tags_through_hmp_and_the_vm_commands(
    images: tuple[Path, Path], tmp_path: Path
) -> None:
    image, disk = images
    lines: list[str] = []
    with stack(tmp_path / "run", image, disk) as s:
        state_a(s.tpm)
        with watcher_thread(s, lines.append, poll_interval=0.2):
            saved: dict[str, bytes | None] = {}
            for tag in ("2", "before", "1", "10"):  # IDs 1, 2, 3, 4 on the disk and vTPM
                s.tpm.nv_write(NV_INDEX, nv_value(tag))
                hmp_over_qmp(s.qemu.qmp, f"savevm {tag}")
                wait_until(lambda t=tag: t in snapshot_tags(image), f"vTPM snapshot {tag}")
                saved[tag] = permall(image)
            assert snapshot_tags(image) == ["2", "before", "1", "10"] == snapshot_tags(disk)
            for tag, state in saved.items():
                assert permall(image, tag) == state  # qemu-img -l snapshot.name= reads by name
            assert len(set(saved.values())) == 4

            # HMP loadvm 2: QEMU loads snapshot ID 2, 'before'; the watcher says so
            s.tpm.nv_write(NV_INDEX, nv_value("later"))
            hmp_over_qmp(s.qemu.qmp, "loadvm 2")
            wait_until(lambda: any(line.startswith("loaded:") for line in lines), "the load")
            assert "loaded: TPM state of 'before' (pushed by QEMU's loadvm)" in lines
            assert s.tpm.nv_read(NV_INDEX, NV_SIZE) == nv_value("before")
            assert permall(image) == saved["before"]

            # vm load of a tag QEMU would take for another snapshot's ID: refused, untouched
            for tag, other in (("1", "2"), ("2", "before")):
                refused = s.vm("load", tag, check=False)
                assert refused.returncode != 0
                assert f"QEMU would revert disk0 to its snapshot ID {tag} ('{other}')" in (
                    refused.stderr
                )
            assert s.tpm.nv_read(NV_INDEX, NV_SIZE) == nv_value("before")
            assert permall(image) == saved["before"]

            # a numeric tag that is no other snapshot's ID loads as itself
            s.vm("load", "10")
            assert s.tpm.nv_read(NV_INDEX, NV_SIZE) == nv_value("10")
            assert permall(image) == saved["10"]

            # deletes go by name, on both sides
            s.vm("delete", "2")
            assert snapshot_tags(image) == ["before", "1", "10"] == snapshot_tags(disk)
            assert permall(image, "before") == saved["before"]
            hmp_over_qmp(s.qemu.qmp, "delvm 1")
            wait_until(lambda: snapshot_tags(image) == ["before", "10"], f"delvm 1 ({lines})")
            assert permall(image, "before") == saved["before"]
            assert permall(image, "10") == saved["10"]
        assert s.vm("status").returncode == 0

"""Proxmox VE ``tpmstate0`` interop (issue 15): raw volumes holding swtpm's linear format.

Proxmox VE gives a VM's TPM a 4 MiB raw volume (a file on directory storages, a block device
on LVM, ZFS, Ceph) and runs ``swtpm_setup``/``swtpm`` with ``--tpmstate
backend-uri=file://VOLUME`` on it.  ``import`` takes such a volume (file or block device),
``export --size`` writes one back (a block device in place, the device node kept).  The
oracle: a real swtpm on the volume reading back the NV value written on the other side.
(qcow2 ``tpmstate0`` volumes, served by qemu-storage-daemon, are vTPM images as they are:
``tests/vtpm/test_store.py``.)
"""

from __future__ import annotations

import contextlib
import os
import stat
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tests.helpers import need, need_root
from tests.vtpm.mount_fixtures import NV_INDEX, one_line_failure, vtpm_qcow
from tests.vtpm.swtpm_fixtures import need_swtpm, running_swtpm, setup_state, tpm_client
from vtpm_qcow.state import linear
from vtpm_qcow.state.store import Store

#: The size Proxmox VE allocates for a tpmstate0 volume.
PVE_TPMSTATE_SIZE = 4 * 1024 * 1024


def write_counter(tpmstate: str, workdir: Path, value: int, *, define: bool = False) -> None:
    with running_swtpm(tpmstate, workdir) as swtpm, tpm_client(swtpm) as tpm:
        if define:
            tpm.nv_define_space(NV_INDEX, 8)
        tpm.nv_write(NV_INDEX, struct.pack(">Q", value))


def read_counter(tpmstate: str, workdir: Path) -> int:
    with running_swtpm(tpmstate, workdir) as swtpm, tpm_client(swtpm) as tpm:
        value: int = struct.unpack(">Q", tpm.nv_read(NV_INDEX, 8))[0]
        return value


def test_raw_volume_file_round_trip(tmp_path: Path) -> None:
    need_swtpm()
    volume = tmp_path / "vm-100-disk-1.raw"
    with open(volume, "wb") as file:
        file.truncate(PVE_TPMSTATE_SIZE)  # what PVE allocates, then swtpm_setup on it
    setup_state(f"file://{volume}")
    write_counter(f"backend-uri=file://{volume}", tmp_path / "pve", 7, define=True)
    image = tmp_path / "vtpm.qcow2"
    vtpm_qcow("create", str(image))
    vtpm_qcow("import", str(image), str(volume))
    with Store.open(image, writable=False) as store:
        layout = store.layout()
    assert volume.read_bytes()[: len(layout)] == layout
    # Back to PVE: a volume of exactly the size PVE allocated, the state at its start.
    back = tmp_path / "vm-101-disk-1.raw"
    vtpm_qcow("export", "--size", "4M", str(image), str(back))
    assert back.stat().st_size == PVE_TPMSTATE_SIZE
    assert back.read_bytes() == layout + bytes(PVE_TPMSTATE_SIZE - len(layout))
    assert read_counter(f"backend-uri=file://{back}", tmp_path / "back") == 7
    # Refused: a volume too small for the state, --size for a directory.
    assert "more than the volume" in one_line_failure(
        "export", "--size", "1K", str(image), str(tmp_path / "small.raw")
    )
    assert "--size" in one_line_failure("export", "--size", "4M", str(image), f"{tmp_path}/d/")
    assert not (tmp_path / "small.raw").exists() and not (tmp_path / "d").exists()
    # A fresh PVE volume that swtpm never formatted holds no state to import.
    empty = tmp_path / "empty.raw"
    empty.write_bytes(bytes(PVE_TPMSTATE_SIZE))
    one_line_failure("import", str(image), str(empty))
    with Store.open(image, writable=False) as store:
        assert store.layout() == layout  # untouched


@contextlib.contextmanager
def loop_device(backing: Path) -> Iterator[Path]:
    """A loop block device over ``backing`` (detached on exit)."""
    need_root("loop devices for block-device volumes")
    losetup = need("losetup")
    done = subprocess.run(
        [losetup, "-f", "--show", str(backing)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    device = Path(done.stdout.strip())
    try:
        yield device
    finally:
        subprocess.run([losetup, "-d", str(device)], check=False)


def test_block_device_volume_import_and_export_in_place(tmp_path: Path) -> None:
    """An LVM/ZFS/Ceph tpmstate0 is a block device: exported in place, never replaced."""
    need_swtpm()
    image = tmp_path / "vtpm.qcow2"
    vtpm_qcow("setup", "--create", str(image))
    state = tmp_path / "state.lin"
    vtpm_qcow("export", str(image), str(state))
    write_counter(f"backend-uri=file://{state}", tmp_path / "w", 9, define=True)
    vtpm_qcow("import", str(image), str(state))
    backing = tmp_path / "lv.img"
    backing.write_bytes(b"\xa5" * PVE_TPMSTATE_SIZE)  # old bytes: all must go
    with loop_device(backing) as device:
        node = tmp_path / "vm-100-disk-1"  # like /dev/pve/vm-100-disk-1 (a device node)
        os.mknod(node, stat.S_IFBLK | 0o600, os.stat(device).st_rdev)
        vtpm_qcow("export", str(image), str(node))
        assert stat.S_ISBLK(node.lstat().st_mode)  # still the device, not a file
        with open(device, "rb") as dev:
            written = dev.read()
        with Store.open(image, writable=False) as store:
            layout = store.layout()
        assert written == layout + bytes(PVE_TPMSTATE_SIZE - len(layout))
        assert read_counter(f"backend-uri=file://{node}", tmp_path / "r") == 9
        # swtpm on the device changes it; import reads it back from the device.
        write_counter(f"backend-uri=file://{node}", tmp_path / "w2", 10)
        again = tmp_path / "again.qcow2"
        vtpm_qcow("create", str(again))
        vtpm_qcow("import", str(again), str(node))
        exported = tmp_path / "again.lin"
        vtpm_qcow("export", str(again), str(exported))
        assert read_counter(f"backend-uri=file://{exported}", tmp_path / "r2") == 10
        # A device of another size than --size says is refused before any write.
        before = backing.read_bytes()
        assert "not 8388608" in one_line_failure("export", "--size", "8M", str(image), str(node))
        assert backing.read_bytes() == before
        assert linear.read_section(before, "permall") is not None


def test_qcow2_volume_filled_through_qemu_storage_daemon_is_a_vtpm_image(tmp_path: Path) -> None:
    """A qcow2 tpmstate0 made by qemu-img and filled by swtpm_setup + swtpm through
    qemu-storage-daemon's FUSE export opens as a vTPM image: info, snapshot, export."""
    from tests.vm.qemu_fixtures import run_tool
    from tests.vtpm.mount_fixtures import qsd_fuse_export

    need_swtpm()
    volume = tmp_path / "vm-100-disk-1.qcow2"
    run_tool(need("qemu-img"), "create", "-q", "-f", "qcow2", str(volume), "4M")
    with qsd_fuse_export(volume, tmp_path / "tpmstate") as exported:
        made = tmp_path / "made.lin"  # swtpm_setup unlinks a file it clears: made aside
        setup_state(f"file://{made}")
        with open(exported, "r+b") as file:
            file.write(made.read_bytes())
        write_counter(f"backend-uri=file://{exported}", tmp_path / "w", 5, define=True)
    vtpm_qcow("info", str(volume))
    vtpm_qcow("snapshot", "-c", "moved", str(volume))
    state = tmp_path / "state.lin"
    vtpm_qcow("export", str(volume), str(state))
    assert read_counter(f"backend-uri=file://{state}", tmp_path / "r") == 5


def test_block_device_export_refuses_the_wrong_or_a_held_device(tmp_path: Path) -> None:
    """A device far larger than a TPM state volume is the wrong one; a device the kernel
    holds (here: opened exclusively, as a mount or a VG does) is busy.  Neither is written."""
    need_swtpm()
    image = tmp_path / "vtpm.qcow2"
    vtpm_qcow("setup", "--create", str(image))
    big = tmp_path / "big.img"
    with open(big, "wb") as file:
        file.truncate(128 * 1024 * 1024)  # sparse: a data disk, not a tpmstate0
    with loop_device(big) as device:
        assert "wrong device" in one_line_failure("export", str(image), str(device))
    with open(big, "rb") as file:
        assert file.read(1 << 20) == bytes(1 << 20)
    small = tmp_path / "lv.img"
    small.write_bytes(b"\xa5" * PVE_TPMSTATE_SIZE)
    with loop_device(small) as device:
        held = os.open(device, os.O_RDONLY | os.O_EXCL)
        try:
            assert "busy" in one_line_failure("export", str(image), str(device)).lower()
        finally:
            os.close(held)
    assert small.read_bytes() == b"\xa5" * PVE_TPMSTATE_SIZE


def set_counter(image: Path, value: int, workdir: Path, *, define: bool = False) -> None:
    """The image's current state with the NV counter at ``value``, written by a real swtpm
    (exported, changed, imported back)."""
    workdir.mkdir()
    lin = workdir / "state.lin"
    vtpm_qcow("export", str(image), str(lin))
    write_counter(f"backend-uri=file://{lin}", workdir / "swtpm", value, define=define)
    vtpm_qcow("import", str(image), str(lin))


def counter_of(image: Path, workdir: Path, *snapshot: str) -> int:
    """The NV counter swtpm reads from the image's state (``--snapshot TAG``'s if given)."""
    workdir.mkdir()
    raw = workdir / "volume.raw"
    vtpm_qcow("export", *(("--snapshot", *snapshot) if snapshot else ()), "--size", "4M",
              str(image), str(raw))  # fmt: skip
    return read_counter(f"backend-uri=file://{raw}", workdir / "swtpm")


def test_snapshots_move_as_plain_volumes_import_and_export_snapshot(tmp_path: Path) -> None:
    """A history kept as plain states (a storage's snapshots of a tpmstate0 volume) moves
    in with ``import --snapshot TAG`` and out with ``export --snapshot TAG``."""
    need_swtpm()
    image = tmp_path / "vtpm.qcow2"
    vtpm_qcow("setup", "--create", str(image))
    set_counter(image, 1, tmp_path / "c1", define=True)
    vtpm_qcow("snapshot", "-c", "S1", str(image))
    set_counter(image, 2, tmp_path / "c2")
    # Out: each state as a PVE-sized raw volume.
    s1, now = tmp_path / "vm-100-disk-1@S1.raw", tmp_path / "vm-100-disk-1.raw"
    vtpm_qcow("export", "--snapshot", "S1", "--size", "4M", str(image), str(s1))
    vtpm_qcow("export", "--size", "4M", str(image), str(now))
    assert s1.stat().st_size == now.stat().st_size == PVE_TPMSTATE_SIZE
    # In: the current state, then the snapshot filed under its tag; the current one stays.
    moved = tmp_path / "moved.qcow2"
    vtpm_qcow("create", str(moved))
    vtpm_qcow("import", str(moved), str(now))
    done = vtpm_qcow("import", "--snapshot", "S1", str(moved), str(s1))
    assert "snapshot 'S1'" in done.stderr
    with Store.open(moved, writable=False) as new, Store.open(image, writable=False) as old:
        assert new.snapshot_tags() == ["S1"]
        assert new.layout() == old.layout()
        assert new.snapshot_section("S1", "permall") == old.snapshot_section("S1", "permall")
    assert counter_of(moved, tmp_path / "m-now") == 2
    assert counter_of(moved, tmp_path / "m-s1", "S1") == 1
    # An existing tag is replaced only with --overwrite; --overwrite alone is refused.
    before = moved.read_bytes()
    assert "already exists" in one_line_failure("import", "--snapshot", "S1", str(moved), str(now))
    assert "--snapshot" in one_line_failure("import", "--overwrite", str(moved), str(now))
    assert moved.read_bytes() == before
    vtpm_qcow("import", "--snapshot", "S1", "--overwrite", str(moved), str(now))
    assert counter_of(moved, tmp_path / "m-s1b", "S1") == 2
    assert "no snapshot 'nope'" in one_line_failure(
        "export", "--snapshot", "nope", str(moved), str(tmp_path / "x.raw")
    )

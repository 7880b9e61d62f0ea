"""QEMU savevm snapshots (with VM state) survive our snapshot operations on the same image."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import qcow2
from tests.helpers import need
from tests.qcow2 import oracle
from tests.vm.qemu_fixtures import stop_process, wait_for_path

MiB = 1024 * 1024


@contextlib.contextmanager
def qemu_with_disk(workdir: Path, disk: Path) -> Iterator[Path]:
    """A stopped q35 QEMU with ``disk`` as node ``disk0``; yields its QMP socket path."""
    qmp = workdir / "qmp.sock"
    cmd = [
        need("qemu-system-x86_64"), "-machine", "q35", "-accel", "tcg", "-S",
        "-display", "none", "-nodefaults", "-m", "64",
        "-drive", f"if=none,id=drive0,file={disk},format=qcow2,node-name=disk0",
        "-qmp", f"unix:{qmp},server=on,wait=off",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_path(qmp, proc, "qemu-system-x86_64")
        yield qmp
    finally:
        stop_process(proc)


def hmp(qmp: Path, *commands: str) -> list[str]:
    """Run HMP commands through QMP ``human-monitor-command``; return their outputs."""
    from qemu.qmp import QMPClient

    async def run() -> list[str]:
        client = QMPClient("test")
        await client.connect(str(qmp))
        try:
            out = []
            for command in commands:
                reply = await client.execute("human-monitor-command", {"command-line": command})
                out.append(str(reply))
            return out
        finally:
            # After "quit" QEMU may close the socket before we do: that EOF is expected.
            with contextlib.suppress(EOFError, ConnectionError):
                await client.disconnect()

    return asyncio.run(asyncio.wait_for(run(), 60))


def test_savevm_snapshot_survives_our_create_and_delete(tmp_path: Path) -> None:
    disk = oracle.create(tmp_path / "disk.qcow2", 4 * MiB)
    oracle.qemu_io(disk, "write -P 0x71 0 256k")
    with qemu_with_disk(tmp_path, disk) as qmp:
        assert hmp(qmp, "savevm vm1", "quit")[0] == ""
    listed = oracle.snapshot_list(disk)
    assert listed[0]["name"] == "vm1" and listed[0]["vm-state-size"] > 0
    oracle.assert_clean(disk)
    vm1_disk = oracle.convert(disk, snapshot="vm1")
    with qcow2.open(str(disk), writable=True) as image:
        (entry,) = image.snapshots
        assert entry.vm_state_size == listed[0]["vm-state-size"] and entry.icount is None
        image.create_snapshot("ours")
        image.write(0, b"\x72" * 4096)
        image.create_snapshot("ours2")
        image.delete_snapshot("ours")
        image.write(4096, b"\x73" * 4096)
    oracle.assert_clean(disk)
    # vmstate lives past the disk end in vm1's L1: QEMU must still be able to load it.
    with qemu_with_disk(tmp_path, disk) as qmp:
        replies = hmp(qmp, "loadvm vm1", "info snapshots", "quit")
    assert not replies[0].startswith("Error"), replies[0]
    assert "vm1" in replies[1] and "ours2" in replies[1]
    oracle.assert_clean(disk)
    assert oracle.convert(disk) == vm1_disk
    assert oracle.snapshot_list(disk)[0]["vm-state-size"] == listed[0]["vm-state-size"]
    # Applying it ourselves takes its L1 with the VM state area (refcounted, no leaks).
    with qcow2.open(str(disk), writable=True) as image:
        image.write(0, b"\x74" * 4096)
        image.apply_snapshot("vm1")
        assert image.read(0, 4 * MiB) == vm1_disk
    oracle.assert_clean(disk)
    # Deleting the savevm snapshot ourselves frees its VM state clusters too.
    with qcow2.open(str(disk), writable=True) as image:
        image.delete_snapshot("vm1")
        image.delete_snapshot("ours2")
    oracle.assert_clean(disk)  # no leaks: the VM state clusters were freed with vm1
    with qcow2.open(str(disk)) as image:
        assert image.read(0, 4 * MiB) == vm1_disk


def vmstate_by_qemu_io(tmp_path: Path, disk: Path, tag: str, size: int) -> bytes:
    """The VM state of snapshot ``tag`` as QEMU reads it: on a copy reverted to the
    snapshot (``qemu-img snapshot -a``), qemu-io's ``read -v -b`` of the active VM state
    (512-aligned, so the tail of the last sector is cut off)."""
    copy = tmp_path / f"{disk.stem}-{tag}-copy.qcow2"
    shutil.copyfile(disk, copy)
    oracle.snapshot(copy, "apply", tag)
    length = size // 512 * 512
    dump = oracle.qemu_io(copy, f"read -v -b 0 {length}")
    copy.unlink()
    out = bytearray()
    for line in dump.splitlines():
        head, sep, rest = line.partition(":  ")
        if sep and len(head) == 8 and all(c in "0123456789abcdef" for c in head):
            out += bytes.fromhex(rest[: 16 * 3])
    assert len(out) == length, (len(out), length)
    return bytes(out)


@pytest.mark.parametrize(
    ("size", "options", "expected_offset"),
    [
        # The reference's measured table (shared/reference/vmstate-tpm.md).
        (64 * MiB, {"cluster_size": 65536}, 0x20000000),
        (64 * MiB, {"cluster_size": 131072, "extended_l2": True}, 0x40000000),
        (64 * MiB + 512, {"cluster_size": 512}, 0x4008000),
        (64 * MiB, {"cluster_size": 2 * MiB}, 0x8000000000),
    ],
    ids=["64k", "128k-extl2", "512", "2M"],
)
def test_read_vmstate_is_what_qemu_reads(
    tmp_path: Path, size: int, options: dict[str, object], expected_offset: int
) -> None:
    disk = oracle.create(tmp_path / "disk.qcow2", size, **options)
    with qemu_with_disk(tmp_path, disk) as qmp:
        assert hmp(qmp, "savevm vm1", "quit")[0] == ""
    (listed,) = oracle.snapshot_list(disk)
    with qcow2.open(str(disk)) as image:
        view = image.snapshot("vm1", name_only=True)
        assert view.vm_state_offset == expected_offset
        assert view.vm_state_size == listed["vm-state-size"] > 0
        stream = view.read_vmstate(0, view.vm_state_size)
        # Clipped at the end, bounded pieces read the same bytes.
        assert view.read_vmstate(view.vm_state_size - 10, 100) == stream[-10:]
        assert view.read_vmstate(view.vm_state_size, 100) == b""
        assert view.read_vmstate(12345, 4096) == stream[12345 : 12345 + 4096]
    assert stream[:8] == b"QEVM\x00\x00\x00\x03"
    expected = vmstate_by_qemu_io(tmp_path, disk, "vm1", len(stream))
    assert stream[: len(expected)] == expected
    # After a resize the VM state stays where the snapshot's own disk size puts it (the
    # new size would put it one L1 entry further).
    oracle.qemu_img("resize", "-q", str(disk), str(expected_offset + MiB))
    with qcow2.open(str(disk)) as image:
        view = image.snapshot("vm1", name_only=True)
        assert view.vm_state_offset == expected_offset
        assert view.read_vmstate(0, len(stream)) == stream


def test_disk_only_snapshot_has_no_vm_state(tmp_path: Path) -> None:
    disk = oracle.create(tmp_path / "disk.qcow2", 4 * MiB)
    oracle.snapshot(disk, "create", "cold")
    with qcow2.open(str(disk)) as image:
        view = image.snapshot("cold", name_only=True)
        assert view.vm_state_size == 0
        with pytest.raises(qcow2.NoVmStateError, match=r"disk.qcow2: snapshot 'cold' \(ID 1\)"):
            view.read_vmstate(0, 8)


def test_vm_state_of_an_encrypted_image_needs_its_key(tmp_path: Path) -> None:
    """QEMU 7.2 aborts a savevm onto a LUKS qcow2, so the VM state size of a qemu-img
    snapshot is set by hand: the VM state goes through the encrypted data path."""
    from tests.qcow2.test_luks import _OBJECT, SECRET, _image_opts, q_create

    disk = tmp_path / "luks.qcow2"
    q_create(disk, 4 * MiB)
    oracle.qemu_img("snapshot", *_OBJECT, "--image-opts", "-c", "S1", _image_opts(disk))
    set_vm_state_size(disk, 65536)
    with qcow2.open(str(disk)) as image:
        view = image.snapshot("S1", name_only=True)
        with pytest.raises(qcow2.EncryptionKeyError, match="'S1': the VM state is encrypted"):
            view.read_vmstate(0, 512)
    with qcow2.open(str(disk), key_secret=SECRET) as image:
        view = image.snapshot("S1", name_only=True)
        assert view.read_vmstate(0, 512) == bytes(512)  # never written: zeros


def set_vm_state_size(disk: Path, size: int) -> None:
    """Rewrite both VM state size fields of the first snapshot table entry of ``disk``."""
    with disk.open("r+b") as f:
        (table,) = struct.unpack(">Q", f.read(72)[64:72])
        f.seek(table + 32)
        f.write(struct.pack(">I", size & 0xFFFFFFFF))
        f.seek(table + 40)
        f.write(struct.pack(">Q", size))

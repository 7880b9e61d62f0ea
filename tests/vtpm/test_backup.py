"""``vtpm-qcow backup``/``verify``/``restore`` on images nobody runs swtpm on.

The state is a linear layout built with the linear codec around random blobs (the backup
path copies sections, it does not interpret them); qemu-img and plain file reads are the
oracles.  Live images under a writing swtpm: ``test_backup_live.py``.
"""

from __future__ import annotations

import json
import os
import pty
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash

from tests.helpers import held_by_qemu_io, need
from tests.qcow2 import oracle
from tests.vtpm.mount_fixtures import (
    create_image,
    mounted,
    runtime_dir,  # noqa: F401  (fixture)
    vtpm_qcow,
)
from vtpm_qcow.errors import StoreError
from vtpm_qcow.state import linear

pytestmark = pytest.mark.usefixtures("runtime_dir")


def layout_with(**blobs: bytes) -> bytes:
    """A linear file holding ``blobs`` by section name."""
    data = linear.empty_layout()
    for name, blob in blobs.items():
        data = linear.apply_update(data, linear.store_section(data, name, blob))
    return data


def digests(layout: bytes) -> dict[str, str]:
    """xxh3-128 of each section of a linear file."""
    out = {}
    for name in linear.SECTION_NAMES:
        blob = linear.read_section(layout, name)
        if blob is not None:
            out[name] = xxhash.xxh3_128_hexdigest(blob)
    return out


def image_digests(image: Path, snapshot: str | None = None) -> dict[str, str]:
    """Section digests of an image (or snapshot) as qemu-img reads it."""
    return digests(oracle.convert(image, snapshot=snapshot, force_share=True))


#: libtpms' TPM 2.0 permall magic, after a u16: a headerless TPM 2.0 permall blob's start
TPM2_PERMALL_START = b"\x00\x00\xab\x36\x47\x23"


def permall(size: int) -> bytes:
    """A fake TPM 2.0 permall blob (headerless, libtpms' magic, random content)."""
    return TPM2_PERMALL_START + os.urandom(size)


def load_state(image: Path, tmp_path: Path, **blobs: bytes) -> bytes:
    """Import a layout holding ``blobs`` into ``image``; the layout."""
    layout = layout_with(**blobs)
    source = tmp_path / f"import-{os.urandom(4).hex()}.lin"
    source.write_bytes(layout)
    vtpm_qcow("import", str(image), str(source))
    return layout


def failure(*args: str) -> str:
    """Run a command that must fail: its one stderr line (no traceback)."""
    done = vtpm_qcow(*args, check=False)
    assert done.returncode != 0, f"vtpm-qcow {' '.join(args)} succeeded"
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("vtpm-qcow: "), lines[0]
    return lines[0]


@pytest.fixture
def image_with_snapshots(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """An image with snapshots s1, s2 and a third current state; the layouts by tag."""
    image = create_image(tmp_path / "vtpm.qcow2")
    states = {}
    for tag in ("s1", "s2"):
        states[tag] = load_state(
            image, tmp_path, permall=permall(3000), volatilestate=os.urandom(500)
        )
        vtpm_qcow("snapshot", "-c", tag, str(image))
    states["current"] = load_state(image, tmp_path, permall=permall(4100))
    return image, states


@pytest.mark.parametrize("fmt", ["qcow2", "raw", "dir"])
def test_backup_formats_hold_the_state_and_verify(
    fmt: str, image_with_snapshots: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    image, states = image_with_snapshots
    dest = tmp_path / f"backup.{fmt}"
    manifest = json.loads(
        vtpm_qcow("backup", "--json", "--format", fmt, str(image), str(dest)).stdout
    )
    expected = digests(states["current"])
    assert {n: s["digest"] for n, s in manifest["state"]["sections"].items()} == expected
    assert manifest["generation"] is None  # read directly, not through a daemon
    if fmt == "qcow2":  # the current state and every snapshot, as qemu-img reads them
        oracle.assert_clean(dest)
        assert image_digests(dest) == expected
        assert [s["name"] for s in oracle.snapshot_list(dest)] == ["s1", "s2"]
        for snap in manifest["snapshots"]:
            tag = snap["tag"]
            assert image_digests(dest, tag) == digests(states[tag]) == image_digests(image, tag)
            assert {n: s["digest"] for n, s in snap["sections"].items()} == digests(states[tag])
    elif fmt == "raw":
        assert dest.read_bytes() == states["current"]
        assert manifest["snapshots"] == []
    else:
        assert sorted(os.listdir(dest)) == ["tpm2-00.permall"]
        blob = (dest / "tpm2-00.permall").read_bytes()
        assert blob == linear.read_section(states["current"], "permall")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left
    result = json.loads(vtpm_qcow("verify", "--json", str(dest)).stdout)
    assert result["ok"] and result["problems"] == []


def test_backup_of_a_snapshot(
    image_with_snapshots: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    image, states = image_with_snapshots
    dest = tmp_path / "s1.qcow2"
    vtpm_qcow("backup", "--snapshot", "s1", str(image), str(dest))
    assert image_digests(dest) == digests(states["s1"])
    assert oracle.snapshot_list(dest) == []
    raw = tmp_path / "s2.lin"
    vtpm_qcow("backup", "--format", "raw", "--snapshot", "s2", str(image), str(raw))
    assert raw.read_bytes() == states["s2"]


def flip_byte(path: Path, offset: int) -> None:
    """Invert one byte of a file in place."""
    with open(path, "r+b") as file:
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 0xFF]))


def qcow2_refblock_offset(path: Path) -> int:
    """Host offset of the first refcount block (header field refcount_table_offset)."""
    with open(path, "rb") as file:
        file.seek(48)
        (table,) = struct.unpack(">Q", file.read(8))
        file.seek(table)
        (block,) = struct.unpack(">Q", file.read(8))
    return int(block)


@pytest.mark.parametrize("fmt", ["qcow2", "raw", "dir"])
def test_verify_catches_a_flipped_byte(
    fmt: str, image_with_snapshots: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    image, states = image_with_snapshots
    dest = tmp_path / f"backup.{fmt}"
    vtpm_qcow("backup", "--format", fmt, str(image), str(dest))
    if fmt == "dir":
        flip_byte(dest / "tpm2-00.permall", 1000)
        expected = ["file tpm2-00.permall", "state sections"]
    elif fmt == "raw":
        slot = linear.parse_header(states["current"]).slot("permall")
        flip_byte(dest, slot.offset + 1000)
        expected = ["file backup.raw", "state sections"]
    else:  # the refcount of the header cluster: metadata only, qemu-img check sees it
        flip_byte(dest, qcow2_refblock_offset(dest) + 1)
        assert oracle.check(dest)["exit-code"] != 0
        expected = ["file backup.qcow2", "qcow2 check"]
    done = vtpm_qcow("verify", "--json", str(dest), check=False)
    assert done.returncode == 1
    problems = json.loads(done.stdout)["problems"]
    for what in expected:
        assert any(what in problem for problem in problems), (what, problems)
    assert all(line.startswith("vtpm-qcow: ") for line in done.stderr.strip().splitlines())
    # a damaged backup is never restored
    before = image.read_bytes()
    assert "differs from the manifest" in failure("restore", str(dest), str(image))
    assert image.read_bytes() == before


def test_restore_replaces_the_state_and_keeps_snapshots(
    image_with_snapshots: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    image, states = image_with_snapshots
    backup = tmp_path / "backup.qcow2"
    vtpm_qcow("backup", str(image), str(backup))
    load_state(image, tmp_path, permall=permall(2000))  # the state moves on
    vtpm_qcow("restore", str(backup), str(image))
    assert image_digests(image) == digests(states["current"])
    assert [s["name"] for s in oracle.snapshot_list(image)] == ["s1", "s2"]
    vtpm_qcow("restore", "--snapshot", "s1", str(backup), str(image))
    assert image_digests(image) == digests(states["s1"])
    oracle.assert_clean(image)
    # a missing image becomes a full copy (qcow2) or a new image with the state (raw, dir)
    copy = tmp_path / "copy.qcow2"
    vtpm_qcow("restore", str(backup), str(copy))
    assert [s["name"] for s in oracle.snapshot_list(copy)] == ["s1", "s2"]
    assert image_digests(copy) == digests(states["current"])
    for fmt in ("raw", "dir"):
        plain, new = tmp_path / f"plain.{fmt}", tmp_path / f"new-{fmt}.qcow2"
        vtpm_qcow("backup", "--format", fmt, str(copy), str(plain))
        vtpm_qcow("restore", str(plain), str(new))
        assert image_digests(new) == digests(states["current"])
        oracle.assert_clean(new)
    # the capacity a raw backup's manifest records is not trusted blindly
    manifest_file = Path(f"{tmp_path / 'plain.raw'}.manifest.json")
    manifest = json.loads(manifest_file.read_text())
    for size in ("4M", 5):
        manifest_file.write_text(json.dumps({**manifest, "linear_size": size}))
        new = tmp_path / f"new-{size}.qcow2"
        vtpm_qcow("restore", str(tmp_path / "plain.raw"), str(new))
        assert image_digests(new) == digests(states["current"])
    assert "backup holds no snapshot 'nope'" in failure(
        "restore", "--snapshot", "nope", str(backup), str(image)
    )


def test_backup_of_an_image_qemu_holds_reads_it_shared(
    image_with_snapshots: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    image, states = image_with_snapshots
    dest = tmp_path / "held.lin"
    with held_by_qemu_io(image):
        vtpm_qcow("backup", "--format", "raw", str(image), str(dest))
        line = failure("backup", "--control", str(tmp_path / "nobody.sock"), str(image), "x")
        assert "no vtpm-qcow daemon answers" in line
        assert "locked by another process (QEMU" in failure("restore", str(dest), str(image))
    assert dest.read_bytes() == states["current"]


def test_restore_into_a_mounted_image_is_refused(tmp_path: Path) -> None:
    image = create_image(tmp_path / "vtpm.qcow2")
    load_state(image, tmp_path, permall=permall(1000))
    backup = tmp_path / "b.qcow2"
    vtpm_qcow("backup", str(image), str(backup))
    with mounted(image, tmp_path / "mnt") as mount:
        line = failure("restore", str(backup), str(image))
        assert "held by a vtpm-qcow mount daemon" in line and "umount" in line
        # but a backup through the daemon works
        vtpm_qcow("backup", "--format", "raw", str(image), str(tmp_path / "m.lin"))
        with mount.control() as client:  # the capture op refuses bad requests in one line
            with pytest.raises(StoreError, match="'snapshots' must be true or false"):
                client.request("capture", snapshots="yes")
            with pytest.raises(StoreError, match="no snapshot 'nope'"):
                client.capture(tag="nope")
            assert client.capture().layout == (tmp_path / "m.lin").read_bytes()
    assert digests((tmp_path / "m.lin").read_bytes()) == image_digests(backup)


def test_backup_errors_are_one_line(tmp_path: Path) -> None:
    image = create_image(tmp_path / "vtpm.qcow2")
    assert "no such file" in failure("backup", str(tmp_path / "nope.qcow2"), "x")
    assert "no TPM state to back up" in failure("backup", str(image), str(tmp_path / "b"))
    load_state(image, tmp_path, permall=permall(100))
    dest = tmp_path / "b.qcow2"
    vtpm_qcow("backup", str(image), str(dest))
    assert "already exists (use --overwrite)" in failure("backup", str(image), str(dest))
    vtpm_qcow("backup", "--overwrite", str(image), str(dest))
    assert "no such directory" in failure("backup", str(image), str(tmp_path / "no/where"))
    assert "no snapshot 'x'" in failure("backup", "--snapshot", "x", str(image), "y")
    assert "cannot read backup manifest" in failure("verify", str(tmp_path / "none"))
    manifest_file = Path(f"{dest}.manifest.json")
    manifest = json.loads(manifest_file.read_text())
    manifest_file.write_text(json.dumps({**manifest, "snapshots": [1]}))
    assert "holds a non-object" in failure("verify", str(dest))
    manifest_file.write_text(json.dumps({**manifest, "format": "tar"}))
    assert "unknown backup format 'tar'" in failure("verify", str(dest))
    manifest_file.write_text("{not json")
    assert "manifest is not JSON" in failure("verify", str(dest))
    garbage = tmp_path / "garbage.qcow2"
    garbage.write_bytes(b"QFI\xfb" + os.urandom(1000))
    assert "garbage.qcow2" in failure("backup", str(garbage), "z")


def test_progress_shows_on_a_terminal_only(
    image_with_snapshots: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    image, _states = image_with_snapshots
    leader, follower = pty.openpty()
    try:
        done = subprocess.run(
            [need("vtpm-qcow"), "backup", str(image), str(tmp_path / "tty.qcow2")],
            stderr=follower,
            stdout=subprocess.DEVNULL,
            timeout=60,
            check=True,
        )
        assert done.returncode == 0
        shown = os.read(leader, 65536).decode()
    finally:
        os.close(leader)
        os.close(follower)
    assert "[1/3] snapshot s2" in shown and "[3/3] done" in shown
    piped = vtpm_qcow("backup", str(image), str(tmp_path / "pipe.qcow2"))
    assert "[1/3]" not in piped.stderr and "Backed up" in piped.stderr


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 96 KiB tmpfs: writes of larger backups fail part way with ENOSPC."""
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mountpoint)],
        check=True,
        timeout=30,
    )
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False, timeout=30)


@pytest.mark.parametrize("fmt", ["qcow2", "raw", "dir"])
def test_a_failed_backup_leaves_no_part_under_dest(
    fmt: str, small_filesystem: Path, tmp_path: Path
) -> None:
    image = create_image(tmp_path / "vtpm.qcow2")
    load_state(image, tmp_path, permall=permall(150_000))
    dest = small_filesystem / "backup"
    line = failure("backup", "--format", fmt, str(image), str(dest))
    assert "No space left on device" in line or "ENOSPC" in line, line
    assert os.listdir(small_filesystem) == []  # neither DEST nor a temporary file
    # an existing good backup stays as it was when its replacement fails
    small = create_image(tmp_path / "small.qcow2")
    load_state(small, tmp_path, permall=permall(1000))
    vtpm_qcow("backup", "--format", fmt, str(small), str(dest))
    vtpm_qcow("verify", str(dest))
    before = sorted(os.listdir(small_filesystem))
    failure("backup", "--overwrite", "--format", fmt, str(image), str(dest))
    assert sorted(os.listdir(small_filesystem)) == before
    vtpm_qcow("verify", str(dest))


def test_a_damaged_held_image_reports_the_damage(tmp_path: Path) -> None:
    image = create_image(tmp_path / "vtpm.qcow2")
    oracle.qemu_io(image, "write -P 0x55 12 12")  # slot 0: garbage offsets and lengths
    with held_by_qemu_io(image):
        line = failure("backup", str(image), str(tmp_path / "b.qcow2"))
    assert "slot 0" in line and "changing too fast" not in line
    assert not (tmp_path / "b.qcow2").exists()

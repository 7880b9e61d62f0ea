"""The FUSE export through real mounts: swtpm_setup, swtpm, snapshots via the control socket.

Oracles: ``qemu-img convert -U`` (what the image really holds) parsed with the linear codec,
``qemu-img check -U`` and ``qemu-img snapshot -l -U``; the TPM's own answers (NV contents,
owner authorization) for the TPM state.
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import socket
import stat
import time
from pathlib import Path

import pytest

from tests.vtpm.mount_fixtures import (
    NV_INDEX,
    STATE_FILE,
    create_image,
    mounted,
    qemu_img_check,
    qemu_img_snapshots,
    raw_content,
    raw_sections,
    runtime_dir,  # noqa: F401  (fixture)
    state_blob,
)
from tests.vtpm.swtpm_fixtures import running_swtpm, setup_state, tpm_client
from vtpm_qcow.errors import StoreError
from vtpm_qcow.export.content import MAX_FILE_SIZE, MAX_MEMORY_FILES
from vtpm_qcow.export.control import MAX_LINE
from vtpm_qcow.state import linear

pytestmark = pytest.mark.usefixtures("runtime_dir")

NV_SIZE = 16
DATA_A = b"snapshot-data-A!"
DATA_B = b"changed-after-s1"


def served_permall(mount_view: str, mountpoint: Path) -> bytes | None:
    """The permall blob as the mount serves it."""
    if mount_view == "file":
        return linear.read_section((mountpoint / STATE_FILE).read_bytes(), "permall")
    return (mountpoint / "tpm2-00.permall").read_bytes()


@pytest.mark.parametrize("view", ["file", "dir"])
def test_tpm_state_follows_snapshot_apply(view: str, tmp_path: Path) -> None:
    image = create_image(tmp_path / "vtpm.qcow2")
    with mounted(image, tmp_path / "mnt", view=view) as mount:
        setup_state(mount.setup_tpmstate, "--create-ek-cert", "--create-platform-cert")
        assert "permall" in raw_sections(image)
        qemu_img_check(image, allow_leaks=True)
        with running_swtpm(mount.tpmstate, tmp_path / "swtpm") as swtpm, tpm_client(swtpm) as tpm:
            tpm.nv_define_space(NV_INDEX, NV_SIZE)
            tpm.nv_write(NV_INDEX, DATA_A)
            tpm.hierarchy_change_auth(b"owner-A")
            at_snapshot = raw_sections(image)
            # what the mount serves is what the image holds
            assert served_permall(view, mount.mountpoint) == at_snapshot["permall"]
            mount.control().snapshot_create("s1")
            assert qemu_img_snapshots(image) == ["s1"]
            qemu_img_check(image, allow_leaks=True)
            tpm.nv_write(NV_INDEX, DATA_B)
            tpm.hierarchy_change_auth(b"owner-B", owner_auth=b"owner-A")
            assert raw_sections(image)["permall"] != at_snapshot["permall"]
        mount.control().snapshot_apply("s1")
        assert raw_sections(image) == at_snapshot
        assert served_permall(view, mount.mountpoint) == at_snapshot["permall"]
        with running_swtpm(mount.tpmstate, tmp_path / "swtpm") as swtpm, tpm_client(swtpm) as tpm:
            assert tpm.nv_read(NV_INDEX, NV_SIZE) == DATA_A
            assert tpm.owner_auth_is(b"owner-A")
            assert not tpm.owner_auth_is(b"owner-B")
        qemu_img_check(image, allow_leaks=True)
        assert qemu_img_snapshots(image) == ["s1"]
        mount.control().snapshot_delete("s1")
        assert qemu_img_snapshots(image) == []
    qemu_img_check(image)


def test_file_view_commits_at_fsync_and_apply_reaches_mappings(tmp_path: Path) -> None:
    image = create_image(tmp_path / "vtpm.qcow2")
    with mounted(image, tmp_path / "mnt", view="file") as mount:
        setup_state(mount.setup_tpmstate)
        path = mount.state_path
        size = path.stat().st_size
        assert size == len(raw_content(image))
        fd = os.open(path, os.O_RDWR)
        try:
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED)
            before = bytes(mapping[:65536])
            assert before == raw_content(image)[:65536]
            mount.control().snapshot_create("s1")

            # swtpm's way: store into the mapping, msync(MS_SYNC) = the commit point
            mapping[30000:30008] = b"mmapped!"
            mapping.flush()
            assert raw_content(image)[30000:30008] == b"mmapped!"

            # plain writes are buffered until fsync
            os.pwrite(fd, b"buffered", 40000)
            assert raw_content(image)[40000:40008] == before[40000:40008]
            assert os.pread(fd, 8, 40000) == b"buffered"
            os.fsync(fd)
            assert raw_content(image)[40000:40008] == b"buffered"

            # apply while the file is mapped and cached: every reader sees the snapshot
            mount.control().snapshot_apply("s1")
            assert raw_content(image)[:65536] == before
            assert bytes(mapping[:65536]) == before
            assert os.pread(fd, 65536, 0) == before
            mapping.close()
        finally:
            os.close(fd)

        with pytest.raises(OSError) as too_far, open(path, "r+b") as f:
            f.seek(size)
            f.write(b"x")
        assert too_far.value.errno == errno.EFBIG

        with pytest.raises(OSError) as other:
            (mount.mountpoint / "other").write_bytes(b"x")
        assert other.value.errno == errno.EPERM

        # swtpm_setup --overwrite starts over by unlinking the state file
        os.unlink(path)
        assert os.listdir(mount.mountpoint) == []
        assert raw_sections(image) == {}
        assert raw_content(image)[: linear.HEADER_SIZE] == bytes(linear.HEADER_SIZE)
        setup_state(mount.setup_tpmstate)
        assert os.listdir(mount.mountpoint) == [STATE_FILE]
        assert "permall" in raw_sections(image)
    qemu_img_check(image)


def _write_new(path: Path, data: bytes) -> None:
    """swtpm's dir backend write: O_CREAT|O_TRUNC|O_NOFOLLOW, one write, close."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o640)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def test_dir_view_commits_at_rename(tmp_path: Path) -> None:
    image = create_image(tmp_path / "vtpm.qcow2")
    with mounted(image, tmp_path / "mnt", view="dir") as mount:
        mnt = mount.mountpoint
        setup_state(str(mnt))
        committed = raw_sections(image)
        assert sorted(os.listdir(mnt)) == [".lock", "tpm2-00.permall"]
        assert (mnt / "tpm2-00.permall").read_bytes() == committed["permall"]

        new_blob = state_blob(os.urandom(9000))
        _write_new(mnt / "TMP2-00.permall", new_blob)
        assert raw_sections(image) == committed  # a temp file is not state
        assert (mnt / "TMP2-00.permall").read_bytes() == new_blob
        os.rename(mnt / "TMP2-00.permall", mnt / "tpm2-00.permall")
        assert raw_sections(image) == {"permall": new_blob}
        assert (mnt / "tpm2-00.permall").read_bytes() == new_blob
        assert sorted(os.listdir(mnt)) == [".lock", "tpm2-00.permall"]

        # fchmod on load, as swtpm does
        fd = os.open(mnt / "tpm2-00.permall", os.O_RDONLY)
        os.fchmod(fd, 0o600)
        os.close(fd)
        assert stat.S_IMODE((mnt / "tpm2-00.permall").stat().st_mode) == 0o600

        # savevm's transient volatile state: written, renamed, then unlinked
        volatile = state_blob(os.urandom(3000))
        _write_new(mnt / "TMP2-00.volatilestate", volatile)
        os.rename(mnt / "TMP2-00.volatilestate", mnt / "tpm2-00.volatilestate")
        assert raw_sections(image) == {"permall": new_blob, "volatilestate": volatile}
        os.unlink(mnt / "tpm2-00.volatilestate")
        assert raw_sections(image) == {"permall": new_blob}
        assert not (mnt / "tpm2-00.volatilestate").exists()

        # a direct O_TRUNC rewrite of a state file commits at fsync
        direct = state_blob(os.urandom(500))
        fd = os.open(mnt / "tpm2-00.permall", os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, direct)
            assert raw_sections(image) == {"permall": new_blob}
            os.fsync(fd)
            assert raw_sections(image) == {"permall": direct}
        finally:
            os.close(fd)

        # TPM 1.2 names map onto the same sections
        saved = state_blob(os.urandom(700))
        _write_new(mnt / "TMP-00.savestate", saved)
        os.rename(mnt / "TMP-00.savestate", mnt / "tpm-00.savestate")
        assert raw_sections(image) == {"permall": direct, "savestate": saved}
        assert (mnt / "tpm-00.savestate").read_bytes() == saved

        os.unlink(mnt / "tpm2-00.permall")
        assert raw_sections(image) == {"savestate": saved}
    qemu_img_check(image)


def test_dir_view_apply_brings_back_and_removes_files(tmp_path: Path) -> None:
    image = create_image(tmp_path / "vtpm.qcow2")
    with mounted(image, tmp_path / "mnt", view="dir") as mount:
        mnt = mount.mountpoint
        first = state_blob(os.urandom(2000))
        _write_new(mnt / "TMP2-00.permall", first)
        os.rename(mnt / "TMP2-00.permall", mnt / "tpm2-00.permall")
        mount.control().snapshot_create("only-permall")
        assert (mnt / "tpm2-00.permall").read_bytes() == first  # cached by the kernel now

        second = state_blob(os.urandom(3000))
        _write_new(mnt / "TMP2-00.permall", second)
        os.rename(mnt / "TMP2-00.permall", mnt / "tpm2-00.permall")
        _write_new(mnt / "TMP2-00.volatilestate", state_blob(b"v" * 100))
        os.rename(mnt / "TMP2-00.volatilestate", mnt / "tpm2-00.volatilestate")
        os.unlink(mnt / "tpm2-00.permall")
        assert not (mnt / "tpm2-00.permall").exists()  # a cached negative entry now

        mount.control().snapshot_apply("only-permall")
        assert raw_sections(image) == {"permall": first}
        assert (mnt / "tpm2-00.permall").read_bytes() == first
        assert not (mnt / "tpm2-00.volatilestate").exists()
        assert os.listdir(mnt) == ["tpm2-00.permall"]
    qemu_img_check(image)


def test_control_socket_refusals_are_one_line(tmp_path: Path) -> None:
    image = create_image(tmp_path / "vtpm.qcow2")
    with mounted(image, tmp_path / "mnt", view="dir") as mount, mount.control() as client:
        client.snapshot_create("t")
        with pytest.raises(StoreError, match="already exists") as dup:
            client.snapshot_create("t")
        assert "\n" not in str(dup.value)
        client.snapshot_create("t", overwrite=True)
        with pytest.raises(StoreError, match="no snapshot 'nope'"):
            client.snapshot_apply("nope")
        with pytest.raises(StoreError, match="unknown op"):
            client.request("format-disk")
        with pytest.raises(StoreError, match="tag"):
            client.request("snapshot-delete")
        with pytest.raises(StoreError, match="overwrite"):
            client.request("snapshot-create", tag="x", overwrite="yes")
        # garbage on the wire gets an answer, and the daemon keeps serving
        with socket.socket(socket.AF_UNIX) as raw:
            raw.connect(str(client.path))
            raw.sendall(b"{not json\n[1, 2]\n")
            reader = raw.makefile("rb")
            replies = [json.loads(reader.readline()) for _ in range(2)]
        assert [r["ok"] for r in replies] == [False, False]
        assert "not JSON" in replies[0]["error"] and "object" in replies[1]["error"]
        # an endless line is cut off with an answer, not buffered without bound
        with socket.socket(socket.AF_UNIX) as raw:
            raw.connect(str(client.path))
            with contextlib.suppress(OSError):  # the daemon may close while we still send
                raw.sendall(b"x" * (MAX_LINE + 65536 * 4))
            reply = json.loads(raw.makefile("rb").readline())
        assert reply == {"ok": False, "error": "request line too long"}
        assert client.ping()
        assert [s["tag"] for s in client.snapshot_list()] == ["t"]
        info = client.info()
        assert info["view"] == "dir" and info["pid"] == mount.pid
        assert info["mountpoint"] == str(mount.mountpoint)
    assert qemu_img_snapshots(image) == ["t"]


def test_dir_view_bounds_memory(tmp_path: Path) -> None:
    image = create_image(tmp_path / "vtpm.qcow2")
    with mounted(image, tmp_path / "mnt", view="dir") as mount:
        mnt = mount.mountpoint
        fd = os.open(mnt / "big", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.write(fd, b"x" * 4096)
            with pytest.raises(OSError) as too_big:
                os.pwrite(fd, b"x", MAX_FILE_SIZE)
        finally:
            os.close(fd)
        assert too_big.value.errno == errno.EFBIG
        created = 1
        with pytest.raises(OSError) as full:
            for created in range(1, MAX_MEMORY_FILES + 2):
                (mnt / f"TMP2-00.{created}").write_bytes(b"t")
        assert full.value.errno == errno.ENOSPC
        assert created == MAX_MEMORY_FILES
        # unlinking frees the slots; the store was never touched
        for name in os.listdir(mnt):
            os.unlink(mnt / name)
        assert os.listdir(mnt) == []
        (mnt / "again").write_bytes(b"fine")
        assert raw_sections(image) == {}
    qemu_img_check(image)


def test_file_view_ftruncate_zeroes_the_tail_for_every_reader(tmp_path: Path) -> None:
    image = create_image(tmp_path / "vtpm.qcow2")
    with mounted(image, tmp_path / "mnt", view="file") as mount:
        path = mount.state_path
        size = path.stat().st_size
        fd = os.open(path, os.O_RDWR)
        try:
            os.pwrite(fd, b"T" * 8192, 65536)
            os.fsync(fd)
            assert os.pread(fd, 8192, 65536) == b"T" * 8192  # now in the page cache
            os.ftruncate(fd, 65536 + 4096)
            assert raw_content(image)[65536:] == b"T" * 4096 + bytes(size - 65536 - 4096)
            assert os.fstat(fd).st_size == size  # the capacity, like a block device
            # the kernel's cached copy of the cut part is dropped right after the reply
            deadline = time.monotonic() + 10
            while os.pread(fd, 4096, 65536 + 4096) != bytes(4096):
                assert time.monotonic() < deadline, "stale page cache after ftruncate"
                time.sleep(0.01)
            assert os.pread(fd, 4096, 65536) == b"T" * 4096
        finally:
            os.close(fd)
    qemu_img_check(image)


def test_a_reader_closing_does_not_commit_a_writers_pages(tmp_path: Path) -> None:
    image = create_image(tmp_path / "vtpm.qcow2")
    with mounted(image, tmp_path / "mnt", view="file") as mount:
        writer = os.open(mount.state_path, os.O_RDWR)
        try:
            os.pwrite(writer, b"unsynced", 8192)
            with open(mount.state_path, "rb") as reader:
                assert reader.read(8200)[8192:] == b"unsynced"
            # the reader's release has been handled once a later request is answered
            os.pread(writer, 1, 0)
            mount.control().ping()
            assert raw_content(image)[8192:8200] == bytes(8)
            os.fsync(writer)
            assert raw_content(image)[8192:8200] == b"unsynced"
        finally:
            os.close(writer)
    qemu_img_check(image)

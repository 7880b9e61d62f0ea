"""ENOSPC and EIO from the host image file while a mounted store commits swtpm's write
(issue 13), both views, a real swtpm on a real FUSE mount.

The daemon arms qcow2's own host-file fault (:func:`qcow2.io.fileio.fail_host_io`) from
``$VTPM_QCOW_TEST_FAIL_IO`` (:mod:`vtpm_qcow.export.instruments`); nothing is patched.  A
dry run counts the image file's writes and flushes of each step (the control socket's
``image_io``); then, for every write and flush of the commit of one TPM2_NV_Write, a run
fails exactly that call, with EIO once and with ENOSPC from then on (a disk that stays
full).  Each time:

* swtpm's store fails with the host's errno (its log says so) and its client gets a TPM
  error (libtpms enters failure mode on a failed NV commit);
* the daemon keeps running and serves the last committed state: the state file (or the
  dir view's permall) read through the mount is what the image holds, and that is the
  state of the write before, except when the fault hit the flush after the header switch
  (then the image holds the new state: the switch is in the file, only not yet durable);
* the image is ``qemu-img check`` clean (leaks at most);
* after the fault clears (EIO once) the same daemon commits again: swtpm re-initialized
  (CMD_INIT, what QEMU's reset does) loads the served state and a new write is stored;
* a restart of the daemon (without the fault) loads the last committed state and commits.

Also a genuine ENOSPC, both views: the image on a small tmpfs (``size=``), filled up while
swtpm runs (root only, for the mount).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import need, need_root
from tests.vtpm.mount_fixtures import (
    NV_INDEX,
    Mount,
    create_image,
    is_mounted,
    mounted,
    state_blob,
)
from tests.vtpm.swtpm_fixtures import running_swtpm, setup_state, tpm_client
from vtpm_qcow.errors import StoreError, SwtpmError, TpmResponseError
from vtpm_qcow.export.control import RUNTIME_DIR_ENV
from vtpm_qcow.export.instruments import FAIL_IO_ENV
from vtpm_qcow.state import linear
from vtpm_qcow.state.store import Store
from vtpm_qcow.tpm.client import Tpm
from vtpm_qcow.tpm.swtpm import Swtpm

#: libtpms' TPM_RC_FAILURE: the TPM entered failure mode (a failed NV commit)
TPM_RC_FAILURE = 0x101
SIZE = 64
A, B, C, D = (bytes([n]) * SIZE for n in (0xA1, 0xB2, 0xC3, 0xD4))


def check_exit(image: Path, *, shared: bool = False) -> int:
    """``qemu-img check``'s exit status (0 clean, 3 leaked clusters only)."""
    args = [need("qemu-img"), "check", *(["-U"] if shared else []), str(image)]
    return subprocess.run(args, capture_output=True, timeout=60, check=False).returncode


def io_counts(mount: Mount) -> dict[str, int]:
    """The daemon's image file writes and flushes so far."""
    with mount.control() as control:
        counts = control.info()["image_io"]
    return {"write": counts["writes"], "flush": counts["flushes"]}


def requests(mount: Mount) -> dict[str, int]:
    """The FUSE requests the daemon has served, by name."""
    with mount.control() as control:
        return {"release": 0, **control.info()["requests"]}


def wait_for_releases(mount: Mount, count: int, timeout: float = 10.0) -> None:
    """Wait until the daemon has served ``count`` RELEASE requests."""
    deadline = time.monotonic() + timeout
    while requests(mount)["release"] < count:
        assert time.monotonic() < deadline, f"no RELEASE number {count}"
        time.sleep(0.02)


def served_permall(mount: Mount) -> bytes | None:
    """The permall blob as the mount serves it (read through the kernel)."""
    if mount.view == "file":
        return linear.read_section(mount.state_path.read_bytes(), "permall", source="mount")
    return mount.state_path.read_bytes()


@contextlib.contextmanager
def tpm_on(mount: Mount, workdir: Path) -> Iterator[tuple[Swtpm, Tpm]]:
    """A real swtpm on the mount (always stopped) and a client on it."""
    with running_swtpm(mount.tpmstate, workdir) as swtpm, tpm_client(swtpm) as tpm:
        yield swtpm, tpm


def reinit(swtpm: Swtpm, tpm: Tpm) -> None:
    """CMD_INIT and TPM2_Startup (what QEMU's reset does): swtpm loads the state from the
    mount again, and leaves failure mode."""
    swtpm.init()
    tpm.startup()


def image_permall(image: Path) -> bytes | None:
    """The permall blob the image holds (read shared, rolled forward as an open does)."""
    with Store.open(image, writable=False, force_share=True) as store:
        return store.read_section("permall")


@pytest.fixture(scope="module")
def runtime() -> Iterator[None]:
    """A short private runtime directory (control sockets) for the module's daemons."""
    path = tempfile.mkdtemp(prefix="vq-")
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv(RUNTIME_DIR_ENV, path)
            yield
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def base_image(tmp_path_factory: pytest.TempPathFactory, runtime: None) -> Path:
    """A TPM 2.0 out of swtpm_setup with NV_INDEX defined and holding A."""
    need("qemu-img")
    workdir = tmp_path_factory.mktemp("base")
    image = create_image(workdir / "base.qcow2")
    with mounted(image, workdir / "mnt", view="file") as mount:
        setup_state(mount.setup_tpmstate)
        with tpm_on(mount, workdir / "sw") as (_, tpm):
            tpm.nv_define_space(NV_INDEX, SIZE)
            tpm.nv_write(NV_INDEX, A)
    return image


def step_calls(base: Path, workdir: Path, view: str) -> tuple[dict[str, int], dict[str, int]]:
    """The daemon's image writes and flushes before and after the commit of one
    TPM2_NV_Write (swtpm started on ``base``'s state first)."""
    image = workdir / "dry.qcow2"
    shutil.copyfile(base, image)
    with (
        mounted(image, workdir / "mnt-dry", view=view) as mount,
        tpm_on(mount, workdir / "sw-dry") as (_, tpm),
    ):
        before = io_counts(mount)
        tpm.nv_write(NV_INDEX, B)
        after = io_counts(mount)
    assert after["write"] > before["write"] and after["flush"] > before["flush"]
    return before, after


def nv_write(tpm: Tpm, data: bytes) -> bool:
    """TPM2_NV_Write of ``data``; False if the TPM failed it (failure mode: a failed store)."""
    try:
        tpm.nv_write(NV_INDEX, data)
    except TpmResponseError as err:
        assert err.rc == TPM_RC_FAILURE, err
        return False
    return True


def fault_run(
    base: Path, workdir: Path, view: str, before: dict[str, int],
    kind: str, nth: int, err: int, once: bool,
) -> str:  # fmt: skip
    """One run: the daemon fails its ``nth`` ``kind`` call (in the commit of writing B)
    with ``err`` (once, or from then on); every claim of the module docstring is checked.
    Returns what happened to the write of B ("failed" or "acknowledged": a fault after a
    commit's durable point may not fail it)."""
    where = f"{view} view, {errno.errorcode[err]} at {kind} {nth}{'' if once else '+'}"
    workdir.mkdir()
    image = workdir / "vtpm.qcow2"
    shutil.copyfile(base, image)
    fault = f"{kind}:{nth}{'' if once else '+'}:{errno.errorcode[err]}"
    with mounted(image, workdir / "mnt", view=view, env={FAIL_IO_ENV: fault}) as mount:
        with tpm_on(mount, workdir / "sw") as (swtpm, tpm):
            assert io_counts(mount) == before, where
            held_a = served_permall(mount)
            if nv_write(tpm, B):
                outcome, expected = "acknowledged", B
                assert served_permall(mount) != held_a, where
            else:
                outcome = "failed"
                log = swtpm.log.read_text()
                assert os.strerror(err) in log, f"{where}: swtpm did not say why: {log}"
                # the daemon serves one whole state: the last committed one (A), or B
                # when the fault came after B's commit point (its outcome is unknown)
                served = served_permall(mount)
                expected = A if served == held_a else B
                assert served == image_permall(image), f"{where}: serves what is not stored"
            assert check_exit(image, shared=True) in (0, 3), where
            if once:  # the fault cleared: the same daemon serves and commits again
                reinit(swtpm, tpm)
                assert tpm.nv_read(NV_INDEX, SIZE) == expected, f"{where}: {outcome}"
                assert nv_write(tpm, C), f"{where}: the next commit failed"
                expected = C
            elif outcome == "failed":  # the disk stays full: every later store fails
                # (in the dir view CMD_INIT stores already, and swtpm gives up)
                with pytest.raises((TpmResponseError, SwtpmError)):
                    reinit(swtpm, tpm)
                    tpm.nv_write(NV_INDEX, C)
                assert served_permall(mount) == served, f"{where}: the served state moved"
        with mount.control() as control:
            assert control.ping(), where
        mount.stop()
    assert check_exit(image) in (0, 3), where
    with mounted(image, workdir / "mnt2", view=view) as mount:
        with tpm_on(mount, workdir / "sw2") as (_, tpm):
            got = tpm.nv_read(NV_INDEX, SIZE)
            assert got == expected, f"{where}: B {outcome}; after a restart {got[:1]!r}"
            assert nv_write(tpm, D), where
            assert tpm.nv_read(NV_INDEX, SIZE) == D, where
        mount.stop()
    assert check_exit(image) in (0, 3), where
    shutil.rmtree(workdir)
    return outcome


@pytest.mark.parametrize("view", ["file", "dir"])
def test_host_fault_at_every_call_of_a_commit(tmp_path: Path, base_image: Path, view: str) -> None:
    before, after = step_calls(base_image, tmp_path, view)
    outcomes = []
    for kind in ("write", "flush"):
        for nth in range(before[kind] + 1, after[kind] + 1):
            for err, once in ((errno.EIO, True), (errno.ENOSPC, False)):
                name = f"{kind}{nth}-{errno.errorcode[err]}"
                got = fault_run(base_image, tmp_path / name, view, before, kind, nth, err, once)
                outcomes.append(f"{name}: {got}")
    print(f"{view} view:", "; ".join(outcomes))
    assert sum("failed" in o for o in outcomes) >= 4, outcomes


@pytest.mark.parametrize("commit_at", ["fsync", "close"])
def test_a_failed_direct_write_of_a_section_leaves_the_committed_one(
    tmp_path: Path, base_image: Path, commit_at: str
) -> None:
    """A writer that rewrites ``tpm2-00.permall`` in place (not through a temporary file
    and a rename) commits at its fsync, or at its last close: when the host fails that
    commit, the file reads as the committed section again, and the next write commits."""
    image = tmp_path / "vtpm.qcow2"
    shutil.copyfile(base_image, image)
    committed = image_permall(image)
    assert committed is not None
    blob, again = state_blob(b"\x11" * 700), state_blob(b"\x22" * 900)
    with mounted(image, tmp_path / "mnt", view="dir", env={FAIL_IO_ENV: "write:1:EIO"}) as m:
        releases = requests(m)["release"]
        for data, fails in ((blob, True), (again, False)):
            fd = os.open(m.state_path, os.O_WRONLY | os.O_TRUNC)
            try:
                os.write(fd, data)
                if commit_at == "fsync":
                    if fails:
                        with pytest.raises(OSError) as failed:
                            os.fsync(fd)
                        assert failed.value.errno == errno.EIO
                    else:
                        os.fsync(fd)
            finally:
                os.close(fd)  # a failed commit at the last close is not reported to close()
            if commit_at == "close":  # the kernel sends RELEASE after close() returned
                wait_for_releases(m, releases := releases + 1)
            stored = image_permall(image)
            assert stored == (committed if fails else data), commit_at
            assert m.state_path.read_bytes() == stored, f"{commit_at}: serves what is not stored"
        m.stop()
    assert check_exit(image) in (0, 3)


#: 2 KiB NV indices that grow the permall until the image file must grow
GROW_INDICES = range(0x01500050, 0x0150006F)
GROW_SIZE = 2048


def write_index(tpm: Tpm, index: int, data: bytes) -> None:
    """TPM2_NV_Write of ``data`` in 1 KiB pieces (the TPM's largest NV buffer)."""
    for offset in range(0, len(data), 1024):
        tpm.nv_write(index, data[offset : offset + 1024], offset=offset)


def read_index(tpm: Tpm, index: int) -> bytes:
    """The GROW_SIZE bytes of ``index``."""
    return b"".join(tpm.nv_read(index, 1024, offset=o) for o in range(0, GROW_SIZE, 1024))


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` bytes mounted on ``path`` (unmounted after)."""
    need_root("mounting a small tmpfs")
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> None:
    """Write ``path`` until its file system is full."""
    chunk = b"\xff" * 4096
    with open(path, "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(chunk)
    assert path.stat().st_size > 0


@pytest.mark.parametrize("view", ["file", "dir"])
def test_a_full_file_system_fails_the_store_and_the_next_one_commits(
    tmp_path: Path, base_image: Path, view: str
) -> None:
    """A genuine ENOSPC: the image on a small tmpfs that a filler file makes full; swtpm's
    state grows (new NV indices) until a store needs a new cluster of the image file."""
    with small_tmpfs(tmp_path / "small", "2m") as fs:
        image = fs / "vtpm.qcow2"
        shutil.copyfile(base_image, image)
        acked: dict[int, bytes] = {}
        with mounted(image, tmp_path / "mnt", view=view) as mount:
            with tpm_on(mount, tmp_path / "sw") as (swtpm, tpm):
                fill(fs / "filler")
                for index in GROW_INDICES:
                    data = os.urandom(GROW_SIZE)
                    try:
                        tpm.nv_define_space(index, GROW_SIZE)
                        write_index(tpm, index, data)
                    except TpmResponseError as err:
                        assert err.rc == TPM_RC_FAILURE, err
                        break
                    acked[index] = data
                else:
                    raise AssertionError("the state never outgrew the full file system")
                assert os.strerror(errno.ENOSPC) in swtpm.log.read_text()
                assert mount.state_path.exists()
                assert served_permall(mount) == image_permall(image)
                assert check_exit(image, shared=True) in (0, 3)
                (fs / "filler").unlink()  # the fault clears
                reinit(swtpm, tpm)
                for acked_index, data in acked.items():
                    assert read_index(tpm, acked_index) == data, hex(acked_index)
                index += 1  # (the failed one may be defined)
                tpm.nv_define_space(index, GROW_SIZE)
                acked[index] = os.urandom(GROW_SIZE)
                write_index(tpm, index, acked[index])
            mount.stop()
        assert check_exit(image) in (0, 3)
        with mounted(image, tmp_path / "mnt2", view=view) as mount:
            with tpm_on(mount, tmp_path / "sw2") as (_, tpm):
                for index, data in acked.items():
                    assert read_index(tpm, index) == data, hex(index)
            mount.stop()
        assert check_exit(image) in (0, 3)


def test_a_fault_point_fails_the_daemons_own_operation(tmp_path: Path, base_image: Path) -> None:
    """``point:NAME:ERRNO`` arms a qcow2 fault point for the daemon's life: a snapshot
    through the control socket fails with one line naming the errno, the image keeps no
    snapshot and stays clean, and swtpm's stores (another operation) still commit."""
    image = tmp_path / "vtpm.qcow2"
    shutil.copyfile(base_image, image)
    fault = "point:snapshot_create.write_metadata:ENOSPC"
    with mounted(image, tmp_path / "mnt", view="file", env={FAIL_IO_ENV: fault}) as mount:
        with mount.control() as control:
            with pytest.raises(StoreError) as failed:
                control.snapshot_create("t1")
            assert "injected fault at snapshot_create.write_metadata" in str(failed.value)
            assert "\n" not in str(failed.value)
            assert control.snapshot_list() == []
        with tpm_on(mount, tmp_path / "sw") as (_, tpm):
            assert nv_write(tpm, B)
        assert check_exit(image, shared=True) in (0, 3)
        mount.stop()
    assert check_exit(image) == 0


@pytest.mark.parametrize(
    "value", ["write:0:EIO", "write:x:EIO", "read:1:EIO", "write:1:ENOTANERRNO", "write"]
)
def test_a_bad_fault_setting_is_refused(tmp_path: Path, base_image: Path, value: str) -> None:
    """A malformed ``$VTPM_QCOW_TEST_FAIL_IO`` stops the mount with one line naming it."""
    image = tmp_path / "vtpm.qcow2"
    shutil.copyfile(base_image, image)
    (tmp_path / "mnt").mkdir()
    done = subprocess.run(
        [need("vtpm-qcow"), "mount", str(image), str(tmp_path / "mnt")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, FAIL_IO_ENV: value},
        check=False,
    )
    assert done.returncode == 1, done
    assert FAIL_IO_ENV in done.stderr and len(done.stderr.strip().splitlines()) == 1, done
    assert not is_mounted(tmp_path / "mnt")

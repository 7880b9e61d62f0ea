"""The dir view's modes, owners and times: real, checked by the kernel, kept in the image.

libvirt chowns swtpm's state directory to ``tss``, makes it 0700 and runs swtpm as ``tss``.
Through a real mount: chown/chmod/utimens of the directory and of a section file take
effect, the kernel enforces them for other users, and a remount shows them again (the
image keeps them, :mod:`vtpm_qcow.export.attrs`) while the TPM's sections are unchanged.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import need, need_root
from tests.vtpm.mount_fixtures import (
    NV_INDEX,
    create_image,
    mounted,
    qemu_img_check,
    raw_content,
    raw_sections,
    runtime_dir,  # noqa: F401  (fixture)
    state_blob,
    vtpm_qcow,
)
from tests.vtpm.swtpm_fixtures import running_swtpm, setup_state, tpm_client
from vtpm_qcow.state import linear

pytestmark = pytest.mark.usefixtures("runtime_dir")

OWNER, STRANGER = "tss", "nobody"
MTIME_NS = 1_700_000_000_123_456_789


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user may traverse (pytest's own tmp dirs are root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="vq-attrs-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def as_user(user: str, script: str, data: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    entry = pwd.getpwnam(user)
    return subprocess.run(
        [need("sh"), "-c", script],
        input=data,
        user=entry.pw_uid,
        group=entry.pw_gid,
        extra_groups=[],
        cwd="/",
        capture_output=True,
        timeout=60,
        check=False,
    )


def identity(path: Path) -> tuple[str, str, int]:
    st = os.stat(path)
    return pwd.getpwuid(st.st_uid).pw_name, oct(stat.S_IMODE(st.st_mode)), st.st_gid


def test_chown_chmod_utimens_are_real_enforced_and_survive_a_remount(open_dir: Path) -> None:
    need_root("chown to tss")
    image = create_image(open_dir / "vtpm.qcow2")
    mnt = open_dir / "tpm2"
    tss = pwd.getpwnam(OWNER)
    blob = state_blob(b"permanent state of a TPM")
    with mounted(image, mnt, view="dir"):
        os.chown(mnt, tss.pw_uid, tss.pw_gid)  # what libvirt does before starting swtpm
        os.chmod(mnt, 0o700)
        os.utime(mnt, ns=(MTIME_NS, MTIME_NS))
        assert identity(mnt) == (OWNER, "0o700", tss.pw_gid)
        assert os.stat(mnt).st_mtime_ns == MTIME_NS
        # swtpm as tss: its lock file, and a section written the way swtpm writes one
        done = as_user(OWNER, f"touch {mnt}/.lock && cat > {mnt}/TMP2-00.permall && "
                       f"mv {mnt}/TMP2-00.permall {mnt}/tpm2-00.permall", blob)  # fmt: skip
        assert done.returncode == 0, done.stderr
        os.chmod(mnt / "tpm2-00.permall", 0o600)
        # the kernel refuses everyone else
        refused = as_user(STRANGER, f"ls {mnt}")
        assert refused.returncode != 0 and b"Permission denied" in refused.stderr
    qemu_img_check(image)
    assert raw_sections(image) == {"permall": blob}
    with mounted(image, mnt, view="dir"):
        assert identity(mnt) == (OWNER, "0o700", tss.pw_gid)
        assert os.stat(mnt).st_mtime_ns == MTIME_NS
        assert identity(mnt / "tpm2-00.permall") == (OWNER, "0o600", tss.pw_gid)
        assert sorted(os.listdir(mnt)) == ["tpm2-00.permall"]  # .lock was memory only
        assert (mnt / "tpm2-00.permall").read_bytes() == blob
        assert as_user(STRANGER, f"ls {mnt}").returncode != 0
    # what lists the TPM's state does not show the attributes
    info = json.loads(vtpm_qcow("info", "--json", str(image)).stdout)
    assert set(info["sections"]) == {"permall"}


def test_a_new_image_shows_the_old_defaults(open_dir: Path) -> None:
    image = create_image(open_dir / "vtpm.qcow2")
    mnt = open_dir / "tpm2"
    with mounted(image, mnt, view="dir"):
        st = os.stat(mnt)
        assert stat.S_IMODE(st.st_mode) == 0o755
        assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
    qemu_img_check(image)


def test_swtpm_through_the_file_view_moves_the_record_along(open_dir: Path) -> None:
    """swtpm compacts every allocated slot when a section grows; the record (a blob in the
    last slot) moves with it, the file view commits that, and the attributes survive."""
    need_root("chown to tss")
    image = create_image(open_dir / "vtpm.qcow2")
    mnt = open_dir / "tpm2"
    setup_state(f"file://{open_dir}/seed", "--tpm2")
    vtpm_qcow("import", str(image), str(open_dir / "seed"))
    with mounted(image, mnt, view="dir"):
        os.chown(mnt, pwd.getpwnam(OWNER).pw_uid, -1)  # the record goes after permall
    layout = raw_content(image)
    before = linear.parse_header(layout[: linear.HEADER_SIZE], size=len(layout))
    assert before.slots[linear.ATTRS_SLOT].offset > before.slot("permall").offset
    with (
        mounted(image, open_dir / "file", view="file") as mount,
        running_swtpm(mount.tpmstate, open_dir / "swtpm") as swtpm,
        tpm_client(swtpm) as tpm,
    ):
        for i in range(4):  # permall outgrows its section: swtpm moves the record down
            tpm.nv_define_space(NV_INDEX + i, 1024)
    layout = raw_content(image)
    after = linear.parse_header(layout[: linear.HEADER_SIZE], size=len(layout))
    assert after.slots[linear.ATTRS_SLOT].offset < after.slot("permall").offset
    qemu_img_check(image)
    with mounted(image, mnt, view="dir"):
        assert identity(mnt)[0] == OWNER
    with (
        mounted(image, open_dir / "file", view="file") as mount,
        running_swtpm(mount.tpmstate, open_dir / "swtpm") as swtpm,
        tpm_client(swtpm) as tpm,
    ):
        assert tpm.nv_read_public(NV_INDEX + 3).data_size == 1024
    # the structural checks and swtpm's dry load take the record in their stride
    done = vtpm_qcow("check", str(image), check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_swtpms_stores_cost_no_extra_commit_and_a_snapshot_keeps_its_attributes(
    open_dir: Path,
) -> None:
    need_root("chown to tss")
    image = create_image(open_dir / "vtpm.qcow2")
    mnt = open_dir / "tpm2"
    store = f"cat > {mnt}/TMP2-00.permall && mv {mnt}/TMP2-00.permall {mnt}/tpm2-00.permall"
    with mounted(image, mnt, view="dir") as mount, mount.control() as client:
        os.chown(mnt, pwd.getpwnam(OWNER).pw_uid, -1)
        os.chmod(mnt, 0o700)

        def changes() -> int:
            return int(client.info()["generation"])  # one per store change

        assert as_user(OWNER, store, state_blob(b"first")).returncode == 0
        start = changes()
        for i in range(3):  # as swtpm stores: same owner and mode each time
            assert as_user(OWNER, store, state_blob(b"store %d" % i)).returncode == 0
        assert changes() == start + 3, "a store cost more than its own commit"
        client.snapshot_create("s1")
        os.chmod(mnt, 0o750)
        client.snapshot_apply("s1")
        assert identity(mnt)[:2] == (OWNER, "0o700")  # the snapshot's, seen at once
    with mounted(image, mnt, view="dir"):
        assert identity(mnt)[:2] == (OWNER, "0o700")
    qemu_img_check(image)

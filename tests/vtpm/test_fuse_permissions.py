"""Permission checks of a mount, seen by other users.

The mount has ``default_permissions``: the kernel checks every request against the modes
and owners the file system reports (:func:`vtpm_qcow.export.fuse.mount_options`).  These
tests pin the kernel's rules down: they fail if the option is dropped and nothing checks in
its place.  A forked child switches to an unprivileged user (with or without a
supplementary group) and reports each operation's errno.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import need_root
from tests.vtpm.mount_fixtures import (
    create_image,
    mounted,
    runtime_dir,  # noqa: F401  (fixture)
)

pytestmark = pytest.mark.usefixtures("runtime_dir", "as_root")


@pytest.fixture
def as_root() -> None:
    """Switching users needs root: without it the tests fail (skip only if allowed)."""
    need_root("the tests switch to other users")


NOBODY = 65534
GROUP = 4242


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user may traverse (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="vq-perm-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def as_user(
    ops: dict[str, Callable[[], object]], *, uid: int = NOBODY, groups: tuple[int, ...] = ()
) -> dict[str, object]:
    """Run each op in a child switched to ``uid`` (gid ``uid``, supplementary ``groups``):
    its result, or the errno name it failed with."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery from here on
        try:
            os.close(read_end)
            os.setgroups(list(groups))
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            results: dict[str, object] = {}
            for name, op in ops.items():
                try:
                    results[name] = op()
                except OSError as err:
                    results[name] = errno.errorcode.get(err.errno or 0, str(err.errno))
            os.write(write_end, json.dumps(results).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    results = json.loads(data)
    assert isinstance(results, dict)
    return results


def _open(path: Path, flags: int) -> str:
    os.close(os.open(path, flags, 0o666))
    return "ok"


def _call(fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        fn()
        return "ok"

    return run


@pytest.mark.parametrize("view", ["dir", "file"])
def test_other_users_get_the_kernels_answers(view: str, tmp_path: Path, open_dir: Path) -> None:
    image = create_image(tmp_path / "vtpm.qcow2")
    with mounted(image, open_dir / "mnt", view=view) as mount:
        mnt = mount.mountpoint
        if view == "dir":
            target = mnt / "TMP2-00.permall"
            target.write_bytes(b"state")
        else:
            target = mnt / "tpmstate"
        os.chown(target, 0, GROUP)
        os.chmod(target, 0o640)
        ops: dict[str, Callable[[], object]] = {
            "list": lambda: sorted(os.listdir(mnt)),
            "read": lambda: _open(target, os.O_RDONLY),
            "write": lambda: _open(target, os.O_WRONLY),
            "create": lambda: _open(mnt / "new", os.O_WRONLY | os.O_CREAT),
            "access_r": lambda: os.access(target, os.R_OK),
            "access_w": lambda: os.access(target, os.W_OK),
            "access_dir_w": lambda: os.access(mnt, os.W_OK),
            "access_dir_rx": lambda: os.access(mnt, os.R_OK | os.X_OK),
            "chmod": _call(lambda: os.chmod(target, 0o666)),
            "chgrp": _call(lambda: os.chown(target, -1, GROUP)),
            "truncate": _call(lambda: os.truncate(target, 0)),
            "utime": _call(lambda: os.utime(target)),
            "rename": _call(lambda: os.rename(target, mnt / "elsewhere")),
            "unlink": _call(lambda: os.unlink(target)),
        }
        stranger = as_user(ops)
        assert stranger == {
            "list": sorted(os.listdir(mnt)),
            "read": "EACCES",
            "write": "EACCES",
            "create": "EACCES",
            "access_r": False,
            "access_w": False,
            "access_dir_w": False,
            "access_dir_rx": True,
            "chmod": "EPERM",
            "chgrp": "EPERM",
            "truncate": "EACCES",
            "utime": "EACCES",
            "rename": "EACCES",
            "unlink": "EACCES",
        }
        # A supplementary group member gets the group's bits (read, not write).
        member = as_user(ops, groups=(GROUP,))
        assert member["read"] == "ok" and member["access_r"] is True
        assert member["write"] == "EACCES" and member["access_w"] is False
        assert member["chmod"] == "EPERM" and member["unlink"] == "EACCES"
        # Others' bits: readable by everyone now.
        os.chmod(target, 0o604)
        assert as_user({"read": ops["read"], "write": ops["write"]}) == {
            "read": "ok",
            "write": "EACCES",
        }
        # The owner (root here) may do all of it; the file is still there.
        assert stat.S_IMODE(target.stat().st_mode) == 0o604
        assert target.stat().st_gid == GROUP
        os.chmod(target, 0o600)
        assert _open(target, os.O_RDWR) == "ok"


def test_the_owner_of_a_file_may_chmod_it_and_no_one_else(tmp_path: Path, open_dir: Path) -> None:
    image = create_image(tmp_path / "vtpm.qcow2")
    with mounted(image, open_dir / "mnt", view="dir") as mount:
        mnt = mount.mountpoint
        mine = mnt / "TMP2-00.mine"
        mine.write_bytes(b"x")
        os.chown(mine, NOBODY, NOBODY)
        os.chmod(mine, 0o600)
        owner = as_user(
            {
                "read": lambda: _open(mine, os.O_RDONLY),
                "chmod": _call(lambda: os.chmod(mine, 0o640)),
                "chown": _call(lambda: os.chown(mine, 0, -1)),
                "chgrp_member": _call(lambda: os.chown(mine, -1, GROUP)),
                "utime": _call(lambda: os.utime(mine)),
            },
            groups=(GROUP,),
        )
        assert owner == {
            "read": "ok",
            "chmod": "ok",
            "chown": "EPERM",
            "chgrp_member": "ok",
            "utime": "ok",
        }
        assert stat.S_IMODE(mine.stat().st_mode) == 0o640
        assert mine.stat().st_gid == GROUP

"""One vTPM image, one TPM (issue 15): a second ``serve`` or ``mount`` of an image someone
already serves is refused with one line that names the holder (the mount daemon's pid and
control socket, or "another process" such as QEMU); the first one keeps serving."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import held_by_qemu_io
from tests.vm.qemu_fixtures import served_store
from tests.vtpm.mount_fixtures import (
    runtime_dir,  # noqa: F401  (fixture)
    vtpm_qcow,
)
from tests.vtpm.swtpm_fixtures import need_swtpm
from vtpm_qcow.export.control import ControlClient

pytestmark = pytest.mark.usefixtures("runtime_dir")


def refusal(*args: str) -> str:
    done = vtpm_qcow(*args, check=False)
    assert done.returncode == 1, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


def test_a_served_image_is_not_served_twice_and_the_holder_is_named(tmp_path: Path) -> None:
    need_swtpm()
    image = tmp_path / "vtpm.qcow2"
    vtpm_qcow("setup", "--create", str(image))
    (tmp_path / "first").mkdir()
    with served_store(image, tmp_path / "first") as first:
        pid = first.proc.pid  # serve --foreground: the daemon itself
        second = tmp_path / "second"
        second.mkdir()
        line = refusal("serve", str(image), "--ctrl", str(second / "swtpm.sock"), "--foreground")
        assert f"held by a vtpm-qcow mount daemon (pid {pid}, " in line and "umount" in line
        (tmp_path / "mnt2").mkdir()
        line = refusal("mount", str(image), str(tmp_path / "mnt2"))
        assert f"(pid {pid}, " in line
        assert first.proc.poll() is None  # the first one still serves
        with ControlClient.for_image(image) as client:
            client.ping()
    with held_by_qemu_io(image):
        line = refusal("serve", str(image), "--ctrl", str(tmp_path / "s.sock"), "--foreground")
        assert "locked by another process (QEMU" in line, line

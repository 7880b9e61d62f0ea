"""``kill -9`` of swtpm in the middle of an NV write storm on a mounted store (issue 13),
both views, a real swtpm on a real FUSE mount.

A client writes an NV index as fast as swtpm answers, each write a new value; swtpm is
killed with SIGKILL after a different delay each time, so the kill lands anywhere in a
store (between the pages and the msyncs of the file view, between the temporary file and
the rename of the dir view).  Then at once (as QEMU or libvirt would) a new swtpm starts on
the same mount: it must load the last acknowledged value or the one then in flight, never
an older one and never a state it cannot load; and it must store again.  The daemon never
stops serving; what it serves is what the image holds.  At the end the daemon is stopped,
the image is ``qemu-img check`` clean (leaks at most), and a new daemon with a new swtpm
loads the last acknowledged value.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.vtpm.mount_fixtures import (
    NV_INDEX,
    Mount,
    create_image,
    mounted,
    runtime_dir,  # noqa: F401  (fixture)
)
from tests.vtpm.swtpm_fixtures import running_swtpm, setup_state, tpm_client
from tests.vtpm.test_store_faults import check_exit, image_permall, served_permall
from vtpm_qcow.tpm.client import Tpm

pytestmark = pytest.mark.usefixtures("runtime_dir")

SIZE = 64
#: seconds from the storm's start to the kill, one run each
DELAYS = (0.05, 0.11, 0.17, 0.23, 0.31, 0.37, 0.43)


def value(n: int) -> bytes:
    """The storm's n-th value."""
    return n.to_bytes(4, "big") * (SIZE // 4)


class Storm(threading.Thread):
    """Writes value(first), value(first + 1), ... until the TPM goes away."""

    def __init__(self, tpm: Tpm, first: int) -> None:
        super().__init__(daemon=True)
        self.tpm = tpm
        self.next = first
        self.acked: list[int] = []
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            while True:
                self.tpm.nv_write(NV_INDEX, value(self.next))
                self.acked.append(self.next)
                self.next += 1
        except BaseException as err:  # the kill: a closed connection, whatever its type
            self.failure = err


def kill_during_storm(mount: Mount, workdir: Path, first: int, delay: float) -> tuple[int, int]:
    """A storm from value ``first`` on a new swtpm, SIGKILLed after ``delay`` seconds;
    the last acknowledged value and the one in flight."""
    with running_swtpm(mount.tpmstate, workdir) as swtpm, tpm_client(swtpm) as tpm:
        storm = Storm(tpm, first)
        storm.start()
        time.sleep(delay)
        os.kill(swtpm.pid, signal.SIGKILL)
        swtpm.proc.wait(10)
        storm.join(20)
        assert not storm.is_alive(), "the client still waits for a killed swtpm"
    assert storm.failure is not None
    assert storm.acked, f"nothing written in {delay} s"
    return storm.acked[-1], storm.next


def read_value(tpm: Tpm) -> int:
    data = tpm.nv_read(NV_INDEX, SIZE)
    return int.from_bytes(data[:4], "big")


@pytest.mark.parametrize("view", ["file", "dir"])
def test_kill_9_of_swtpm_mid_write_loses_nothing_acknowledged(tmp_path: Path, view: str) -> None:
    image = create_image(tmp_path / "vtpm.qcow2")
    first = 0
    with mounted(image, tmp_path / "mnt", view=view) as mount:
        setup_state(mount.setup_tpmstate)
        with running_swtpm(mount.tpmstate, tmp_path / "sw0") as swtpm, tpm_client(swtpm) as tpm:
            tpm.nv_define_space(NV_INDEX, SIZE)
            tpm.nv_write(NV_INDEX, value(first))
        outcomes = []
        for run, delay in enumerate(DELAYS):
            acked, in_flight = kill_during_storm(mount, tmp_path / f"sw{run}", first + 1, delay)
            swtpm_dir = tmp_path / f"sw{run}-after"
            with running_swtpm(mount.tpmstate, swtpm_dir) as swtpm, tpm_client(swtpm) as tpm:
                got = read_value(tpm)
                assert got in (acked, in_flight), (
                    f"{view} view, kill after {delay} s: loaded value {got}, "
                    f"acknowledged {acked}, in flight {in_flight}"
                )
                assert served_permall(mount) == image_permall(image), "serves what is not stored"
                first = in_flight + 1
                tpm.nv_write(NV_INDEX, value(first))
                assert read_value(tpm) == first
            outcomes.append(f"{acked}/{in_flight}: {'in flight' if got == in_flight else 'acked'}")
        print(f"{view} view, loaded after each kill:", "; ".join(outcomes))
        mount.stop()
    assert check_exit(image) in (0, 3)
    with mounted(image, tmp_path / "mnt2", view=view) as mount:
        with running_swtpm(mount.tpmstate, tmp_path / "sw-end") as swtpm, tpm_client(swtpm) as tpm:
            assert read_value(tpm) == first
        mount.stop()
    assert check_exit(image) in (0, 3)

"""The tests' private libvirtd: it answers, runs a TCG domain, and cleans up after itself."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from tests.helpers import need
from tests.libvirt.conftest import (
    PREFIX,
    Libvirtd,
    _make_base,
    _mnt_ns,
    _namespace_pids,
    _pid_file_pids,
    _start,
    _stop,
    domain_xml,
)


def test_domain_runs_in_the_private_namespace_and_python_bindings_connect(lv: Libvirtd) -> None:
    import libvirt

    name = lv.define(domain_xml(PREFIX + "plain", ""))
    lv.virsh("start", name)
    assert lv.state(name) == "running"
    # libvirt's paths are the namespace's own, seen from here under the base directory
    qemu = int((lv.base / "run" / "qemu" / f"{name}.pid").read_text())
    assert Path(f"/proc/{qemu}/exe").resolve().name.startswith("qemu-system")
    assert qemu in _pid_file_pids(lv.base)
    assert not Path(f"/run/libvirt/qemu/{name}.pid").exists()
    conn = libvirt.open(lv.uri)
    try:
        assert conn.lookupByName(name).isActive()
    finally:
        conn.close()
    lv.virsh("destroy", name)
    assert lv.state(name) == "shut off"


def test_teardown_leaves_no_domain_process_or_directory() -> None:
    # a daemon of this test's own, so that its teardown can be watched
    daemon = _start(_make_base())
    try:
        name = daemon.define(domain_xml(PREFIX + "teardown", ""))
        daemon.virsh("start", name)
        ns = daemon.mnt_ns
        assert len(_namespace_pids(ns)) == 2  # libvirtd, virtlogd
        qemu = int((daemon.base / "run" / "qemu" / f"{name}.pid").read_text())
        assert qemu in _pid_file_pids(daemon.base)
    finally:
        _stop(daemon)
    assert _namespace_pids(ns) == []
    assert not os.path.exists(f"/proc/{qemu}")
    assert not daemon.base.exists()
    assert ns != _mnt_ns(os.getpid())
    # the system's libvirt directories did not get the domain
    done = subprocess.run(
        [need("sh"), "-c", f"ls /etc/libvirt/qemu /run/libvirt/qemu 2>/dev/null | grep {name}"],
        capture_output=True,
        check=False,
    )
    assert done.returncode != 0


def test_restart_keeps_a_running_domain(lv: Libvirtd) -> None:
    name = lv.define(domain_xml(PREFIX + "restart", ""))
    lv.virsh("start", name)
    qemu = int((lv.base / "run" / "qemu" / f"{name}.pid").read_text())
    old = lv.proc.pid
    lv.restart()
    assert lv.proc.pid != old and not os.path.exists(f"/proc/{old}")
    assert lv.state(name) == "running"  # reconnected to the same QEMU
    assert int((lv.base / "run" / "qemu" / f"{name}.pid").read_text()) == qemu
    lv.virsh("destroy", name)
    assert not os.path.exists(f"/proc/{qemu}") or _wait_gone(qemu)


def _wait_gone(pid: int) -> bool:
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}"):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True

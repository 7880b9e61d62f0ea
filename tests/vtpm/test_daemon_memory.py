"""What a mount daemon holds in memory: a plain ``mount`` or ``serve`` (no ``--qmp``) never
loads OpenSSL, idna, asyncio, qemu.qmp, cryptography or the backup and libvirt code, while
a program that does use a deferred module still gets it (:mod:`vtpm_qcow.export.lean`).

Which modules a daemon has run comes from its control socket (``info``'s ``modules``) and
which shared objects it maps from /proc/PID/maps.  RSS figures belong to the benchmark
(tools/bench/bench_swtpm_stacks.py), never to an assertion here.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vtpm.mount_fixtures import (
    NV_INDEX,
    create_image,
    mounted,
    runtime_dir,  # noqa: F401  (fixture)
    vtpm_qcow,
    wait_gone,
)
from tests.vtpm.swtpm_fixtures import running_swtpm, tpm_client
from vtpm_qcow.export.control import ControlClient, pid_path_for
from vtpm_qcow.export.lean import IDLE_TRIM_AFTER
from vtpm_qcow.tpm.client import SwtpmSocketTransport, Tpm
from vtpm_qcow.tpm.swtpm import free_tcp_port_pair

pytestmark = pytest.mark.usefixtures("runtime_dir")

#: Modules a plain daemon must not have run: OpenSSL's (through trio), host name tables,
#: the QMP follower's asyncio stack, LUKS's cryptography, the commands' own code.
HEAVY = (
    "ssl",
    "_ssl",
    "hashlib",
    "_hashlib",
    "hmac",
    "idna",
    "asyncio",
    "qemu",
    "qemu.qmp",
    "cryptography",
    "vtpm_qcow.vm.follow",
    "vtpm_qcow.backup.archive",
    "vtpm_qcow.libvirt.domain",
)
#: Shared objects that show OpenSSL, asyncio or cryptography loaded, whoever imported them.
HEAVY_OBJECTS = ("libcrypto", "libssl", "/_ssl.", "/_hashlib.", "/_asyncio.", "cryptography")


def mapped_objects(pid: int) -> set[str]:
    """The files process ``pid`` maps."""
    with open(f"/proc/{pid}/maps") as maps:
        return {fields[5] for fields in map(str.split, maps) if len(fields) > 5}


def assert_lean(image: Path, pid: int) -> list[str]:
    """The daemon of ``image`` (``pid``) has run no heavy module and maps no heavy object;
    returns its modules."""
    modules = ControlClient.for_image(image).info()["modules"]
    assert "trio" in modules and "pyfuse3" in modules, "info's modules are not the daemon's"
    assert [m for m in HEAVY if m in modules] == []
    objects = [o for o in mapped_objects(pid) if any(h in o for h in HEAVY_OBJECTS)]
    assert objects == []
    return list(modules)


@pytest.mark.parametrize("view", ["file", "dir"])
def test_plain_mount_runs_no_heavy_module(view: str, tmp_path: Path) -> None:
    """After commits and a snapshot created and applied, still nothing heavy."""
    image = create_image(tmp_path / "vtpm.qcow2")
    with mounted(image, tmp_path / "mnt", view=view) as mount:
        with running_swtpm(mount.tpmstate, tmp_path / "swtpm") as swtpm, tpm_client(swtpm) as tpm:
            tpm.nv_define_space(NV_INDEX, 8)
            tpm.nv_write(NV_INDEX, b"lean!!!!")
            with ControlClient.for_image(image) as control:
                control.snapshot_create("s")
                control.snapshot_apply("s")
        assert_lean(image, mount.pid)


def test_daemon_trims_its_heap_when_idle_after_requests(tmp_path: Path) -> None:
    """Idle with nothing served: no trims; after commits and IDLE_TRIM_AFTER seconds
    without a request: one more (the freed heap of the burst handed back)."""
    image = create_image(tmp_path / "vtpm.qcow2")
    with mounted(image, tmp_path / "mnt") as mount, ControlClient.for_image(image) as control:
        before = -1
        for _ in range(10):  # until the mount's own start-up requests are trimmed
            now = control.info()["heap_trims"]
            if now == before:
                break
            before = now
            time.sleep(IDLE_TRIM_AFTER * 2.5)
        else:
            raise AssertionError("the idle daemon kept trimming its heap")
        with running_swtpm(mount.tpmstate, tmp_path / "swtpm") as swtpm, tpm_client(swtpm) as tpm:
            tpm.nv_define_space(NV_INDEX, 8)
            for _ in range(20):
                tpm.nv_write(NV_INDEX, os.urandom(8))
        deadline = time.monotonic() + IDLE_TRIM_AFTER * 4 + 5
        while control.info()["heap_trims"] == before:
            assert time.monotonic() < deadline, "no heap trim after the commits"
            time.sleep(0.2)


def start_serve(image: Path, tmp_path: Path, *extra: str) -> tuple[int, int]:
    """``vtpm-qcow serve`` with swtpm on a TCP data channel; (daemon pid, data port)."""
    port = free_tcp_port_pair()
    vtpm_qcow(
        "serve", str(image),
        "--ctrl", str(tmp_path / "swtpm.ctrl"),
        "--swtpm-flags", "not-need-init,startup-clear",
        "--swtpm-option=--server", f"--swtpm-option=type=tcp,port={port}",
        "--log", str(tmp_path / "serve.log"),
        *extra,
    )  # fmt: skip
    return int(pid_path_for(image).read_text()), port


@contextlib.contextmanager
def stopped_after(pid: int) -> Iterator[None]:
    """The daemon ``pid`` stopped (TERM, then KILL) when the block ends."""
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not wait_gone(pid, 20):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            wait_gone(pid, 10)


def test_plain_serve_runs_no_heavy_module(tmp_path: Path) -> None:
    image = create_image(tmp_path / "vtpm.qcow2")
    pid, port = start_serve(image, tmp_path)
    with stopped_after(pid):
        with SwtpmSocketTransport(port) as transport:
            tpm = Tpm(transport)
            tpm.nv_define_space(NV_INDEX, 8)
            tpm.nv_write(NV_INDEX, b"served!!")
        assert_lean(image, pid)


def test_serve_with_qmp_gets_the_deferred_modules_it_uses(tmp_path: Path) -> None:
    """The QMP follower's asyncio uses ssl at import: deferred, ssl still loads and runs."""
    image = create_image(tmp_path / "vtpm.qcow2")
    pid, _ = start_serve(image, tmp_path, "--qmp", str(tmp_path / "no-qemu-yet.qmp"))
    with stopped_after(pid):
        modules = ControlClient.for_image(image).info()["modules"]
        assert {"asyncio", "ssl", "_ssl", "vtpm_qcow.vm.follow"} <= set(modules)


def run_python(code: str) -> str:
    """Run ``code`` in a fresh interpreter (deferral changes sys.modules for good)."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_deferred_module_runs_on_first_use_as_the_real_module() -> None:
    out = run_python(
        """
        import sys
        from vtpm_qcow.export import lean

        assert lean.defer(["hmac", "ssl", "no_such_module_xyz"]) == ["hmac", "ssl"]
        assert lean.is_deferred("hmac") and "_hashlib" not in sys.modules
        import hmac
        import ssl as stdlib_ssl
        assert lean.is_deferred("hmac") and lean.is_deferred("ssl"), "import ran the code"
        assert "hmac" not in lean.loaded_modules()
        assert hmac.compare_digest(b"a", b"a")
        assert not lean.is_deferred("hmac") and "hmac" in lean.loaded_modules()
        from ssl import SSLContext
        assert SSLContext is stdlib_ssl.SSLContext and sys.modules["ssl"] is stdlib_ssl
        try:
            stdlib_ssl.no_such_attribute
        except AttributeError:
            pass
        else:
            raise AssertionError("a missing attribute did not raise AttributeError")
        assert lean.defer(["hmac"]) == [], "an imported module was deferred again"
        print("ok")
        """
    )
    assert out.strip() == "ok"


def test_trio_runs_with_its_unused_imports_deferred() -> None:
    out = run_python(
        """
        import sys, threading
        from vtpm_qcow.export import lean

        lean.defer()
        import trio

        async def main():
            await trio.sleep(0)
            return await trio.to_thread.run_sync(lambda: 42)

        assert trio.run(main) == 42
        assert not {"_ssl", "_hashlib"} & set(sys.modules), "trio loaded OpenSSL"
        assert lean.is_deferred("idna")
        # two threads using a deferred module at once: one runs it, both get it
        got = []
        threads = [
            threading.Thread(target=lambda: got.append(sys.modules["idna"].encode("a.b")))
            for _ in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got == [b"a.b", b"a.b"], got
        lean.settle()
        import gc
        assert gc.get_freeze_count() > 0
        print("ok")
        """
    )
    assert out.strip() == "ok"


def test_image_key_digest_is_still_sha256(tmp_path: Path) -> None:
    """The socket and pid file names of an image keep their sha256 (a daemon started by an
    earlier version stays reachable) without hashlib, which would load OpenSSL."""
    import hashlib

    from vtpm_qcow.export.control import image_key

    image = tmp_path / "vtpm.qcow2"
    digest = hashlib.sha256(os.fsencode(os.path.realpath(image))).hexdigest()[:16]
    assert image_key(image) == f"vtpm.qcow2-{digest}"

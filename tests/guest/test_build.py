"""tools/guest/build: the guest's kernel and initramfs, from Debian packages, cached.

A machine that cannot build the kernel or the initramfs fails the first test here (it skips
only with VTPM_QCOW_ALLOW_SKIP=1), and the guest tests that need them error out.
"""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

from tests.guest.machine import BUILD, GuestFiles, build_guest

MULTIARCH_LIBS = "lib/x86_64-linux-gnu"


def cpio_entries(archive: Path) -> dict[str, int]:
    """Name -> mode of every entry of a gzipped ``newc`` cpio archive."""
    data = gzip.decompress(archive.read_bytes())
    entries: dict[str, int] = {}
    at = 0
    while True:
        assert data[at : at + 6] == b"070701", f"not a newc header at {at}"
        fields = [int(data[at + 6 + 8 * i : at + 14 + 8 * i], 16) for i in range(13)]
        mode, size, name_size = fields[1], fields[6], fields[11]
        name = data[at + 110 : at + 110 + name_size - 1].decode()
        at += 110 + name_size
        at += -at % 4
        at += size
        at += -at % 4
        if name == "TRAILER!!!":
            return entries
        entries[name] = mode


def test_the_guest_has_a_kernel_and_an_initramfs_with_tpm2_tools() -> None:
    guest_files = build_guest()  # here, not in a fixture: a failed build fails this test
    manifest = guest_files.manifest
    packages = manifest["packages"]
    assert isinstance(packages, dict)
    assert {"busybox-static", "tpm2-tools", "libtss2-tcti-device0", "libc6"} <= packages.keys()
    assert f"linux-image-{manifest['kernel']}" in packages
    assert guest_files.vmlinuz.stat().st_size > 1 << 20
    entries = cpio_entries(guest_files.initramfs)
    for name in (
        "init",
        "bin/busybox",
        "bin/command-loop",
        "usr/bin/tpm2",
        "usr/bin/tpm2_nvincrement",
        "lib64/ld-linux-x86-64.so.2",
        f"{MULTIARCH_LIBS}/libc.so.6",
        f"{MULTIARCH_LIBS}/libtss2-esys.so.0",
        f"{MULTIARCH_LIBS}/libtss2-tcti-device.so.0",  # loaded with dlopen: not in ldd's list
        "dev/console",
    ):
        assert name in entries, f"{name} missing from the initramfs"
    for module in manifest["modules"]:  # type: ignore[attr-defined]
        assert f"lib/modules/{module}" in entries


def test_an_unchanged_recipe_reuses_the_cached_guest(guest_files: GuestFiles) -> None:
    again = build_guest()
    assert again.manifest["key"] == guest_files.manifest["key"]
    assert again.initramfs == guest_files.initramfs


def test_build_explains_itself() -> None:
    done = subprocess.run(
        [sys.executable, str(BUILD), "--help"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0
    assert "VTPM_QCOW_GUEST_CACHE" in done.stdout and "--force" in done.stdout

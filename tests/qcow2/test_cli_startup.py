"""Start-up of ``import qcow2`` and of the ``qcow2`` command: only what is used is imported.

The package's public names are lazy (module ``__getattr__``): ``import qcow2`` imports no
image code.  The read-only subcommands read images with the one reader (``Image``) but not
the write path (transactions, snapshots, atomic commits) nor encryption and zstd, which
they do not use on plain images.  Checked with ``python3 -X importtime`` on real runs whose
output is compared with qemu-img's.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import qcow2
from tests.qcow2 import oracle
from tests.qcow2.test_cli import run_qemu_img

#: The image stack, which ``import qcow2`` does not import.
IMAGE_STACK = {"qcow2.image", "qcow2.clusters", "qcow2.l2"}
#: Modules of the write path and of encryption and zstd (heavy dependencies).
WRITE_STACK = {
    "qcow2.transaction",
    "qcow2.commit",
    "qcow2.snapshots",
    "qcow2.crypto",
    "cryptography",
    "zstandard",
}


def _imported(argv: list[str]) -> tuple[set[str], subprocess.CompletedProcess[str]]:
    """Modules imported by ``python3 -X importtime ARGV`` (and the finished process)."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    modules = set()
    out = []
    for line in proc.stderr.splitlines():
        if line.startswith("import time:"):
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":  # the header line
                modules.add(name)
        else:
            out.append(line)
    proc.stderr = "\n".join(out)
    return modules, proc


def test_import_qcow2_is_lazy() -> None:
    modules, proc = _imported(["-c", "import qcow2"])
    assert proc.returncode == 0, proc.stderr
    assert "qcow2" in modules and "qcow2.errors" in modules
    assert not modules & (IMAGE_STACK | WRITE_STACK)


def test_every_public_name_resolves_to_its_definition() -> None:
    from qcow2 import errors, image

    for name in qcow2.__all__:
        value = getattr(qcow2, name)
        home = image if name in ("open", "create", "Image") else errors
        assert value is getattr(home, name), name
    assert set(qcow2.__all__) <= set(dir(qcow2))
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        qcow2.no_such_name  # noqa: B018 - the access is the test


@pytest.mark.parametrize(
    "command",
    [("info",), ("info", "--output=json"), ("check",), ("snapshot", "-l"), ("map",)],
    ids=lambda c: "-".join(c),
)
def test_read_only_commands_skip_the_write_stack(tmp_path: Path, command: tuple[str, ...]) -> None:
    img = oracle.create(tmp_path / "img.qcow2", 64 * 1024 * 1024)
    oracle.qemu_io(img, "write -P 1 0 1M")
    oracle.snapshot(img, "create", "s1")
    modules, proc = _imported(["-m", "qcow2", *command, str(img)])
    expected = run_qemu_img(*command, str(img))
    assert (proc.returncode, proc.stdout) == (expected.code, expected.out), proc.stderr
    assert not modules & WRITE_STACK, sorted(modules & WRITE_STACK)

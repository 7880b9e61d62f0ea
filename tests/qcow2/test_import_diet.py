"""The read-only subcommands import none of the standard modules that are slow to import.

qemu-img answers ``info`` in about 12 ms; on this project's machines ``import typing`` alone
costs 10 ms and ``import dataclasses`` 15 ms.  So ``qcow2 info|check|snapshot -l|map`` (issue
3's benchmark) must not import the modules in :data:`FORBIDDEN`, directly or through another
module.  Each command runs under ``-X importtime`` on a qemu-img-made image, both as the
installed ``qcow2`` launcher (``python -S -X importtime LAUNCHER ...``, which is how the
launcher runs itself) and as ``python -S -m qcow2`` (there, what runpy imports before any
qcow2 code, contextlib and collections among them, is exempt; the launcher runs still catch
those).  A failure names each forbidden module and the module whose import pulled it in
("at run time": imported inside a function).
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from functools import cache
from pathlib import Path

import pytest

import qcow2
from qcow2.format import layout
from qcow2.format.refcount import RefcountTable
from qcow2.image import open_chain
from qcow2.io.cache import TableCache
from qcow2.tools import map as qemu_map
from tests.qcow2 import oracle
from tests.qcow2.test_cli import run_qemu_img

#: Modules the read-only subcommands must not import (a submodule such as ``re._parser``
#: comes with its package).  The one list to extend when another slow import is found.
FORBIDDEN = frozenset(
    {
        "typing",
        "dataclasses",
        "enum",
        "re",
        "inspect",
        "collections",
        "collections.abc",
        "contextlib",
        "shutil",
        "argparse",
        "gettext",
        "locale",
    }
)

COMMANDS = [("info",), ("check",), ("snapshot", "-l"), ("map", "--output=json")]
REPO = Path(qcow2.__file__).resolve().parents[1]
LAUNCHER = Path(sysconfig.get_path("scripts")) / "qcow2"


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    img = oracle.create(tmp_path_factory.mktemp("diet") / "img.qcow2", 64 << 20)
    oracle.qemu_io(img, "write -P 1 0 1M")
    oracle.snapshot(img, "create", "s1")
    return img


def import_tree(stderr: str) -> list[tuple[int, str]]:
    """``(depth, module)`` of every ``-X importtime`` line, in the order printed (a module
    after the modules it imported; depth 0 for an import made by running code)."""
    tree = []
    for line in stderr.splitlines():
        if not line.startswith("import time:"):
            continue
        column = line.rsplit("|", 1)[1]
        name = column.strip()
        if name != "imported package":  # the header line
            tree.append(((len(column) - len(column.lstrip()) - 1) // 2, name))
    return tree


def forbidden_imports(tree: list[tuple[int, str]], exempt: frozenset[str]) -> dict[str, str]:
    """Each forbidden module of ``tree`` not in ``exempt``, with the module importing it."""
    found = {}
    for i, (depth, name) in enumerate(tree):
        if name not in FORBIDDEN or name in exempt:
            continue
        importer = next((n for d, n in tree[i + 1 :] if d < depth), "at run time")
        found[name] = importer
    return found


def run(
    argv: list[str], cwd: Path, pythonpath: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=60, check=False, cwd=cwd, env=env
    )


@cache
def runpy_imports() -> frozenset[str]:
    """What ``python -m`` imports before any code of the module it runs (runpy needs
    ``importlib.util``, which imports ``contextlib``): not the command's doing."""
    proc = run([sys.executable, "-S", "-X", "importtime", "-c", "import runpy"], REPO)
    assert proc.returncode == 0, proc.stderr
    return frozenset(name for _, name in import_tree(proc.stderr))


@pytest.mark.parametrize("how", ["launcher", "python -m qcow2"])
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c))
def test_read_only_command_skips_slow_imports(
    image: Path, command: tuple[str, ...], how: str
) -> None:
    if how == "launcher":
        assert LAUNCHER.is_file(), f"{LAUNCHER} missing: run tools/setup-system"
        argv = [sys.executable, "-S", "-X", "importtime", str(LAUNCHER)]
        proc = run([*argv, *command, str(image)], image.parent)
        exempt: frozenset[str] = frozenset()
    else:
        # -S: what site's .pth code imports is not the command's; PYTHONPATH finds qcow2.
        argv = [sys.executable, "-S", "-X", "importtime", "-m", "qcow2"]
        proc = run([*argv, *command, str(image)], image.parent, pythonpath=str(REPO))
        exempt = runpy_imports()
    expected = run_qemu_img(*command, str(image))
    assert (proc.returncode, proc.stdout) == (expected.code, expected.out), proc.stderr[-2000:]

    found = forbidden_imports(import_tree(proc.stderr), exempt)
    assert not found, ", ".join(
        f"{name} (by {importer})" for name, importer in sorted(found.items())
    )


def test_the_check_sees_a_forbidden_import() -> None:
    """The tree parsing finds a nested forbidden import and names its importer."""
    stderr = "\n".join(
        [
            "import time: self [us] | cumulative | imported package",
            "import time:        10 |         10 |     re._parser",
            "import time:        10 |         20 |   re",
            "import time:        10 |         30 | qcow2.cli.options",
            "import time:        10 |         10 | shutil",
        ]
    )
    tree = import_tree(stderr)
    assert tree == [(2, "re._parser"), (1, "re"), (0, "qcow2.cli.options"), (0, "shutil")]
    found = forbidden_imports(tree, frozenset())
    assert found == {"re": "qcow2.cli.options", "shutil": "at run time"}
    assert forbidden_imports(tree, frozenset({"re"})) == {"shutil": "at run time"}


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16, 32, 64])
def test_map_counts_refcounts_like_the_refcount_table(tmp_path: Path, bits: int) -> None:
    """``map`` detects metadata preallocation by counting nonzero refcounts a block at a
    time: the same count as RefcountTable's, every width."""
    img = oracle.create(
        tmp_path / "img.qcow2", 4 << 20, preallocation="metadata", refcount_bits=bits
    )
    oracle.qemu_io(img, "write -P 7 0 64k", "write -P 8 1M 4k")
    layer = open_chain(str(img), force_share=True, mode="qemu")
    try:
        assert isinstance(layer, qcow2.Image)
        h = layer.header
        f = layer.file
        table = RefcountTable(f, h, TableCache(f, h.cluster_size, 4, "refblock"))
        end = layout.size_to_clusters(h.cluster_size, f.size())
        expected = sum(1 for cluster in range(end) if table.get(cluster))
        per_block = h.refblock_entries
        counted = 0
        for index, entry in enumerate(table.table[: layout.size_to_clusters(per_block, end)]):
            if entry & layout.REFT_OFFSET_MASK:
                block = f.pread(entry & layout.REFT_OFFSET_MASK, h.cluster_size)
                entries = min(per_block, end - index * per_block)
                counted += qemu_map._nonzero_refcounts(block, entries, bits)
        assert counted == expected > 0
        assert qemu_map._metadata_preallocated(layer)
    finally:
        layer.close()
    argv = [sys.executable, "-m", "qcow2", "map", "--output=json", str(img)]
    ours = run(argv, tmp_path, pythonpath=str(REPO))
    theirs = run_qemu_img("map", "--output=json", str(img))
    assert (ours.returncode, ours.stdout) == (0, theirs.out), ours.stderr

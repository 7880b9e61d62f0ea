"""The vtpm_qcow package's import graph: layers as folders, no cycles, no runtime -> CLI import.

Every import is read from the source (ast), at module level or inside a function; only those
under ``if TYPE_CHECKING:`` are left out (they never run).  The layers, bottom up:

    errors       the error tree (and the package file)
    tpm/         launching swtpm, TPM commands, the qtest TIS transport
    state/       swtpm's linear layout, the store, probe, recover, check
    export/      the FUSE views, the mount daemon, the control socket (server and client)
    vm/ backup/  QMP orchestration and watcher; backups and plain-state import/export
    cli/         the ``vtpm-qcow`` command (and ``python -m vtpm_qcow``)

A module imports only from its own layer or below: nothing at run time imports the command,
and the daemon learns of the QMP watcher only as a callable the command hands it.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import vtpm_qcow

PACKAGE = Path(vtpm_qcow.__file__).resolve().parent

RANK = {"errors": 0, "tpm": 1, "state": 2, "export": 3, "vm": 4, "backup": 4, "cli": 5}


def dotted(path: Path) -> str:
    parts = ["vtpm_qcow", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    if module == "vtpm_qcow.__main__":
        return "cli"
    folder = module.split(".")[1:2]
    return folder[0] if folder and folder[0] in RANK else "errors"


def run_time_imports(path: Path, known: set[str]) -> set[str]:
    """The vtpm_qcow modules importing ``path`` runs (a name imported from a package counts
    as its module when it is one)."""
    name = dotted(path)
    here = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    pending: list[ast.AST] = [ast.parse(path.read_text(encoding="utf-8"))]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            pending.extend(node.orelse)
            continue
        pending.extend(ast.iter_child_nodes(node))
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = here.split(".")[: len(here.split(".")) - node.level + 1] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target)
    return {m for m in found if m.split(".")[0] == "vtpm_qcow" and m != name}


def graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    known = {dotted(p) for p in paths}
    return {dotted(p): run_time_imports(p, known) for p in paths}


def test_every_folder_is_a_known_layer() -> None:
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert folders <= RANK.keys(), folders - RANK.keys()


def test_imports_point_to_the_same_layer_or_below() -> None:
    upward = sorted(
        f"{module} ({layer(module)}) imports {target} ({layer(target)})"
        for module, targets in graph().items()
        for target in targets
        if RANK[layer(target)] > RANK[layer(module)]
    )
    assert not upward, "\n".join(upward)


def test_no_runtime_module_imports_the_command() -> None:
    offenders = sorted(
        f"{module} imports {target}"
        for module, targets in graph().items()
        for target in targets
        if layer(target) == "cli" != layer(module)
    )
    assert not offenders, "\n".join(offenders)


def test_no_import_cycles() -> None:
    try:
        graphlib.TopologicalSorter(graph()).prepare()
    except graphlib.CycleError as err:
        raise AssertionError(f"import cycle: {' -> '.join(err.args[1])}") from None

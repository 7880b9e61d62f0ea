"""The qcow2 package's import graph: layers as folders, no cycles, no runtime -> CLI import.

Read from the source (ast), every import counted, at module level or inside a function,
except those under ``if TYPE_CHECKING:`` (they never run).  The layers, bottom up:

    errors          the error tree (every module may raise)
    io/             the host file, locks, the table cache
    format/         on-disk structures and their codecs
    driver          qcow2/*.py: Image, the mapping, transactions, check, ...
    tools/          what qemu-img does on top of an image
    cli/            the ``qcow2`` command (and ``python -m qcow2``)

A module imports only from its own layer or below, so no runtime module imports the
command; within a layer, imports must not form a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import qcow2

PACKAGE = Path(qcow2.__file__).resolve().parent

#: Rank of each layer, bottom up.
LAYERS = {"errors": 0, "io": 1, "format": 2, "driver": 3, "tools": 4, "cli": 5}


def module_name(path: Path) -> str:
    parts = ["qcow2", *path.relative_to(PACKAGE).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    if module in ("qcow2", "qcow2.errors"):
        return "errors"  # the package's __init__ imports errors alone (names load lazily)
    if module == "qcow2.__main__":
        return "cli"
    if len(parts) > 1 and parts[1] in ("io", "format", "tools", "cli"):
        return parts[1]
    return "driver"


def _type_checking_only(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imports(path: Path, modules: set[str]) -> set[str]:
    """The qcow2 modules ``path`` imports when it runs."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("qcow2"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.startswith("qcow2"):
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    found.add(sub if sub in modules else target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    found.discard(name)
    return found


def graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports(p, modules) for p in paths}


def test_every_import_points_to_its_layer_or_below() -> None:
    upward = [
        f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)})"
        for module, targets in graph().items()
        for target in sorted(targets)
        if LAYERS[layer_of(target)] > LAYERS[layer_of(module)]
    ]
    assert not upward, "\n".join(upward)


def test_no_runtime_module_imports_the_command() -> None:
    offenders = [
        f"{module} imports {target}"
        for module, targets in graph().items()
        if layer_of(module) != "cli"
        for target in targets
        if layer_of(target) == "cli"
    ]
    assert not offenders, "\n".join(offenders)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``edges`` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state:
                cycle = visit(target)
                if cycle is not None:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle is not None:
                return cycle
    return None


def test_no_import_cycle() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle or ())


@pytest.mark.parametrize(
    ("edges", "cycle"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ],
)
def test_the_cycle_finder_finds_cycles(edges: dict[str, set[str]], cycle: list[str] | None) -> None:
    assert find_cycle(edges) == cycle


def test_the_graph_sees_function_level_imports_and_skips_type_checking_ones() -> None:
    edges = graph()
    assert "qcow2.clusters" in edges["qcow2.image"]  # imported on first use
    assert "qcow2.snapshots" in edges["qcow2.image"]  # imported inside a method
    assert "qcow2.image" not in edges["qcow2.transaction"]  # only under TYPE_CHECKING

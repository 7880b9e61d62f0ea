"""The house, read from the code's imports: layers as folders, no cycles, no runtime -> CLI.

Read from the source (ast), every import counted, at module level or inside a function,
except those under ``if TYPE_CHECKING:`` (they never run).  The layers, bottom up:

    qcow2       errors; io/ (host file, locks, table cache); format/ (on-disk structures);
                the driver (qcow2/*.py); tools/ (what qemu-img does); cli/ (the command)
    vtpm_qcow   errors; tpm/ (swtpm, TPM commands); state/ (linear layout, store, probe);
                export/ (FUSE views, daemon, control); backup/ and vm/ side by side;
                cli/ (the command)

``qcow2`` knows nothing of TPMs: it never imports ``vtpm_qcow``.  Across folders a module
imports only from folders below it (side by side: neither imports the other), so no
runtime module imports a command; and no imports form a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("qcow2", "vtpm_qcow")

#: Rank of each layer (package, layer name), bottom up; equal ranks are side by side.
LAYERS = {
    ("qcow2", "errors"): 0,
    ("qcow2", "io"): 1,
    ("qcow2", "format"): 2,
    ("qcow2", "driver"): 3,
    ("qcow2", "tools"): 4,
    ("qcow2", "cli"): 5,
    ("vtpm_qcow", "errors"): 0,
    ("vtpm_qcow", "tpm"): 1,
    ("vtpm_qcow", "state"): 2,
    ("vtpm_qcow", "export"): 3,
    ("vtpm_qcow", "backup"): 4,
    ("vtpm_qcow", "vm"): 4,
    ("vtpm_qcow", "libvirt"): 5,
    ("vtpm_qcow", "cli"): 6,
}
FOLDERS = {name for _, name in LAYERS} - {"errors", "driver"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> tuple[str, str]:
    """(package, layer) of ``module``."""
    package, *rest = module.split(".")
    if not rest or rest == ["errors"]:
        return package, "errors"  # a package's __init__ imports its errors alone
    if rest == ["__main__"]:
        return package, "cli"
    if rest[0] in FOLDERS and (package, rest[0]) in LAYERS:
        return package, rest[0]
    return package, "driver"


def _type_checking_only(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules ``path`` imports when it runs."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()

    def ours(target: str) -> bool:
        return target.split(".")[0] in PACKAGES

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if ours(a.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if ours(target):
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    found.add(sub if sub in modules else target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    found.discard(name)
    return found


def graph() -> dict[str, set[str]]:
    paths = sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports(p, modules) for p in paths}


def test_qcow2_knows_nothing_of_tpms() -> None:
    offenders = [
        f"{module} imports {target}"
        for module, targets in graph().items()
        if module.startswith("qcow2")
        for target in targets
        if not target.startswith("qcow2")
    ]
    assert not offenders, "\n".join(offenders)


def test_every_import_points_to_its_layer_or_below() -> None:
    upward = []
    for module, targets in graph().items():
        layer = layer_of(module)
        for target in sorted(targets):
            other = layer_of(target)
            if other[0] != layer[0] or other == layer:
                continue
            if LAYERS[other] >= LAYERS[layer]:
                upward.append(f"{module} {layer} imports {target} {other}")
    assert not upward, "\n".join(upward)


def test_no_runtime_module_imports_the_command() -> None:
    offenders = [
        f"{module} imports {target}"
        for module, targets in graph().items()
        if layer_of(module)[1] != "cli"
        for target in targets
        if layer_of(target)[1] == "cli"
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
    assert "qcow2" in edges["vtpm_qcow.state.store"]  # across the packages too


def test_layers_of_modules() -> None:
    assert layer_of("qcow2.io.fileio") == ("qcow2", "io")
    assert layer_of("qcow2.image") == ("qcow2", "driver")
    assert layer_of("vtpm_qcow.export.daemon") == ("vtpm_qcow", "export")
    assert layer_of("vtpm_qcow.__main__") == ("vtpm_qcow", "cli")
    assert LAYERS[layer_of("vtpm_qcow.vm.watch")] == LAYERS[layer_of("vtpm_qcow.backup.archive")]

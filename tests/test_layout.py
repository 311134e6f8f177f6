"""The package's shape, enforced: subpackages in one order along the data flow, each importing only
the ones below it; no import cycle between modules; no private name imported across modules; no
module over 600 lines; nothing imports the CLI. docs/architecture.md draws the same picture."""

from __future__ import annotations

import ast
import pathlib
from collections import defaultdict

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "featx"
# lowest first; a package imports only packages of a lower rank (and its own modules)
LAYERS = [
    {"errors", "files", "stats", "settings", "__init__"},  # the base: featx/*.py
    {"sources"},
    {"store"},
    {"models"},
    {"engine"},
    {"classifiers"},
    {"finetune"},
    {"bench"},
    {"cli"},
    {"__main__"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}
MAX_LINES = 600


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = ("featx", *p.relative_to(ROOT).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


MODULES = _modules()


def _runtime_imports(tree: ast.Module):
    """Every import statement outside `if TYPE_CHECKING:` blocks (function-level ones included)."""

    def walk(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                yield from (walk_list(child.orelse))
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child
            yield from walk(child)

    def walk_list(nodes):
        for n in nodes:
            if isinstance(n, (ast.Import, ast.ImportFrom)):
                yield n
            yield from walk(n)

    yield from walk(tree)


def _edges() -> dict[str, set[tuple[str, str]]]:
    """module -> {(imported module, imported name or '')}."""
    edges: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for mod, path in MODULES.items():
        for node in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                edges[mod] |= {(a.name, "") for a in node.names if a.name.split(".")[0] == "featx"}
            elif node.level == 0 and node.module and node.module.split(".")[0] == "featx":
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    edges[mod].add((sub, "") if sub in MODULES else (node.module, a.name))
    return edges


EDGES = _edges()


def _package(mod: str) -> str:
    parts = mod.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def test_every_package_has_a_layer():
    assert {_package(m) for m in MODULES} <= set(RANK), {_package(m) for m in MODULES} - set(RANK)


def test_packages_import_only_the_layers_below():
    up = sorted(
        f"{mod} imports {target}"
        for mod, targets in EDGES.items()
        for target, _ in targets
        if _package(target) != _package(mod)
        and RANK[_package(target)] >= RANK[_package(mod)]
        and not (RANK[_package(mod)] == 0 and RANK[_package(target)] == 0)
    )
    assert not up, "\n".join(up)


def test_no_import_cycle_between_modules():
    graph = {m: {t for t, _ in EDGES.get(m, ()) if t in MODULES and t != m} for m in MODULES}
    graph = {m: {t for t in ts if t != "featx"} for m, ts in graph.items()}  # the root only exports lazily
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(m: str, stack: list[str]) -> bool:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle.extend(stack[stack.index(t) :] + [m, t] if t in stack else [m, t])
                return True
            if t not in state and visit(t, [*stack, m]):
                return True
        state[m] = 2
        return False

    for m in sorted(graph):
        if m not in state and visit(m, []):
            break
    assert not cycle, " -> ".join(cycle)


def test_no_private_name_imported_across_modules():
    private = sorted(
        f"{mod}: {target}.{name}"
        for mod, targets in EDGES.items()
        for target, name in targets
        if name.startswith("_") and name != "__version__"
    )
    assert not private, "\n".join(private)


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_module_size(mod):
    n = len(MODULES[mod].read_text(encoding="utf-8").splitlines())
    assert n <= MAX_LINES, f"{mod}: {n} lines; split it along its concerns"


def test_nothing_imports_the_cli():
    users = sorted(
        m
        for m, ts in EDGES.items()
        for t, _ in ts
        if _package(t) == "cli" and _package(m) not in ("cli", "__main__")
    )
    assert not users, users

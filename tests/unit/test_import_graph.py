"""The package's layering, checked on the source: no import cycle, and Flower only in its adapters.

Every import counts, at module level or deferred inside a function or under ``TYPE_CHECKING``: a cycle
hidden by a deferred import is still a cycle a reader has to untangle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import fedfreeze

PACKAGE = Path(fedfreeze.__file__).parent
FLOWER_ADAPTERS = "fedfreeze.flower"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module name an import statement anywhere in ``path`` names (``from a import b`` gives a and a.b)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {t for t in imports_of(path) if t in files and t != name} for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_sees_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert "fedfreeze.federation.coordinator" in graph  # the walk found the package
    assert cycles(graph) == []


def test_flower_is_imported_only_by_its_adapters() -> None:
    importers = sorted(
        module_name(path)
        for path in PACKAGE.rglob("*.py")
        if any(name == "flwr" or name.startswith("flwr.") for name in imports_of(path))
    )
    assert importers, "no module imports Flower: the adapters moved?"
    assert [m for m in importers if not m.startswith(FLOWER_ADAPTERS)] == []

"""The package's layering, checked on the source: every module has a rank and imports none above
its own, no import cycle, and Flower only in its adapters.

Every import counts, at module level or deferred inside a function or under ``TYPE_CHECKING``: a cycle
or an upward dependency hidden by a deferred import is still one a reader has to untangle. The rank
table is the one docs/architecture.md shows: the test reads the doc's table and compares.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import fedfreeze

PACKAGE = Path(fedfreeze.__file__).parent
ROOT = PACKAGE.name
ARCHITECTURE = PACKAGE.parent / "docs" / "architecture.md"
FLOWER_ADAPTERS = "fedfreeze.flower"

# The layers, bottom first: a module may import its own rank and those below, never one above. An entry
# is a package (all its modules) or a module; the package's own ``__init__`` is ``fedfreeze``.
RANKS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "foundation",
        (
            "fedfreeze",
            "fedfreeze.errors",
            "fedfreeze.config",
            "fedfreeze.tensor_hash",
            "fedfreeze.outputs",
            "fedfreeze.metrics",
            "fedfreeze.operating_point",
            "fedfreeze.sample_data",
            "fedfreeze.git_state",
        ),
    ),
    ("data and models", ("fedfreeze.data", "fedfreeze.models")),
    ("inference", ("fedfreeze.inference",)),
    ("training", ("fedfreeze.training",)),
    ("statistics", ("fedfreeze.evaluation",)),
    ("records", ("fedfreeze.provenance", "fedfreeze.model_card", "fedfreeze.reference_scores")),
    ("model folder", ("fedfreeze.model_io",)),
    ("site work", ("fedfreeze.site", "fedfreeze.init_from", "fedfreeze.evaluate", "fedfreeze.adaptation")),
    ("federation protocol", ("fedfreeze.federation",)),
    ("state folders", ("fedfreeze.state",)),
    ("experiment harness", ("fedfreeze.experiment",)),
    ("Flower adapters", ("fedfreeze.flower",)),
    ("launching", ("fedfreeze.deploy", "fedfreeze.cli", "fedfreeze.__main__")),
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module name an import statement anywhere in ``path`` names (``from a import b`` gives a and a.b)."""
    return imports_in(path.read_text(encoding="utf-8"))


def imports_in(source: str) -> set[str]:
    """``imports_of`` on source text: module level, inside functions and under ``TYPE_CHECKING`` alike."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {t for t in imports_of(path) if t in files and t != name} for name, path in files.items()}


def rank_of(module: str, ranks: tuple[tuple[str, tuple[str, ...]], ...] = RANKS) -> int | None:
    """The rank of the longest table entry that is ``module`` or a package holding it; ``None``: unranked."""
    best: tuple[int, int] | None = None  # (length of the entry, rank)
    for rank, (_, entries) in enumerate(ranks):
        for entry in entries:
            holds = module == entry or (entry != ROOT and module.startswith(entry + "."))
            if holds and (best is None or len(entry) > best[0]):
                best = (len(entry), rank)
    return None if best is None else best[1]


def upward_imports(graph: dict[str, set[str]], ranks: tuple[tuple[str, tuple[str, ...]], ...] = RANKS) -> list[str]:
    """Every import of a module ranked above the importer, as ``importer (layer) -> imported (layer)``."""
    found = []
    for importer, targets in sorted(graph.items()):
        low = rank_of(importer, ranks)
        for target in sorted(targets):
            high = rank_of(target, ranks)
            if low is not None and high is not None and high > low:
                found.append(f"{importer} ({ranks[low][0]}) -> {target} ({ranks[high][0]})")
    return found


def doc_path_to_module(path: str) -> str:
    """``deploy/`` -> ``fedfreeze.deploy``, ``cli.py`` -> ``fedfreeze.cli``, ``__init__.py`` -> ``fedfreeze``."""
    stem = path.removesuffix("/").removesuffix(".py")
    return ROOT if stem == "__init__" else f"{ROOT}.{stem.replace('/', '.')}"


def ranks_in_doc(text: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The rank table of docs/architecture.md (``| rank | layer | `module`, `package/` |``), bottom first."""
    rows = re.findall(r"^\|\s*(\d+)\s*\|\s*([^|]+?)\s*\|([^|]+)\|\s*$", text, flags=re.MULTILINE)
    table = sorted(
        (int(rank), layer, tuple(doc_path_to_module(p) for p in re.findall(r"`([^`]+)`", paths)))
        for rank, layer, paths in rows
    )
    assert [rank for rank, _, _ in table] == list(range(1, len(table) + 1)), "ranks should be 1, 2, 3, ..."
    return tuple((layer, modules) for _, layer, modules in table)


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


def test_rank_check_catches_an_upward_import() -> None:
    """A synthetic package: models reaching up to training, once under TYPE_CHECKING and once in a function."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "from fedfreeze.errors import ConfigError\n"
        "if TYPE_CHECKING:\n"
        "    from fedfreeze.training.engine import EpochLog\n"
        "def load():\n"
        "    import fedfreeze.federation.coordinator\n"
    )
    found = imports_in(source)
    assert {"fedfreeze.training.engine", "fedfreeze.federation.coordinator", "fedfreeze.errors"} <= found
    modules = {"fedfreeze.errors", "fedfreeze.training.engine", "fedfreeze.federation.coordinator"}
    graph = {"fedfreeze.models.grouped": found & modules, "fedfreeze.training.engine": {"fedfreeze.models.grouped"}}
    assert upward_imports(graph) == [
        "fedfreeze.models.grouped (data and models) -> fedfreeze.federation.coordinator (federation protocol)",
        "fedfreeze.models.grouped (data and models) -> fedfreeze.training.engine (training)",
    ]
    assert rank_of("fedfreeze.newthing") is None  # an unranked module is reported, not ranked by default
    assert rank_of("fedfreeze") == 0 and rank_of("fedfreeze.deploy.launch") == len(RANKS) - 1


def test_every_module_has_a_rank() -> None:
    assert [m for m in import_graph() if rank_of(m) is None] == []


def test_no_module_imports_one_ranked_above_it() -> None:
    assert upward_imports(import_graph()) == []


def test_the_architecture_doc_shows_the_rank_table() -> None:
    assert ranks_in_doc(ARCHITECTURE.read_text(encoding="utf-8")) == RANKS


def test_doc_table_reader_sees_a_changed_table() -> None:
    table = "| Rank | Layer | Modules |\n|---|---|---|\n| 2 | adapters | `flower/` |\n| 1 | core | `__init__.py`, `cli.py` |\n"
    assert ranks_in_doc(table) == (("core", ("fedfreeze", "fedfreeze.cli")), ("adapters", ("fedfreeze.flower",)))
    with pytest.raises(AssertionError, match="ranks should be 1, 2, 3"):
        ranks_in_doc(table.replace("| 2 |", "| 3 |"))


def test_no_relative_imports() -> None:
    """The rank check reads absolute names only: a relative import would pass it unseen."""
    relative = sorted(
        f"{module_name(path)}:{node.lineno}"
        for path in PACKAGE.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.ImportFrom) and node.level > 0
    )
    assert relative == []

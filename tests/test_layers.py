"""The package's layers: every module imports, the module-level import graph has no cycle, and the library's
loaders do not reach into the training package or the command line."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import wetok

PACKAGE = Path(wetok.__file__).parent
MODULES = sorted(m.name for m in pkgutil.walk_packages([str(PACKAGE)], prefix="wetok."))


def _module_path(name: str) -> Path:
    parts = name.split(".")[1:]
    base = PACKAGE.joinpath(*parts)
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def _resolve(module: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The wetok modules an import statement names (``from . import x`` names the submodule x where it is one)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "wetok"]
    package = module if _module_path(module).name == "__init__.py" else module.rsplit(".", 1)[0]
    if node.level:
        base = package.split(".")
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "wetok":
        return []
    found = [target] if target in MODULES or target == "wetok" else []
    found += [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
    return found


def _imports(module: str, *, module_level: bool) -> set[str]:
    """What ``module`` imports from wetok: at import time only (``module_level``), or anywhere in it."""
    tree = ast.parse(_module_path(module).read_text())
    if not module_level:
        nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    else:
        nodes = []
        for stmt in tree.body:  # top-level statements, plus try/if bodies that are not TYPE_CHECKING blocks
            if isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test):
                continue
            nodes += [n for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom))
                      and not any(isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef)) for p in ast.walk(stmt)
                                  if n in ast.walk(p))]
    return {target for node in nodes for target in _resolve(module, node)} - {module}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


@pytest.mark.parametrize("module", MODULES)
def test_every_module_imports(module):
    importlib.import_module(module)


def test_module_level_import_graph_has_no_cycle():
    graph = {m: _imports(m, module_level=True) for m in MODULES}
    # a submodule's import runs its package's __init__ first: that edge is not a cycle of the modules' own
    graph = {m: {t for t in targets if not m.startswith(t + ".")} for m, targets in graph.items()}
    assert _find_cycle(graph) is None, " -> ".join(_find_cycle(graph) or [])
    assert "wetok.registry" in graph["wetok.checkpoints"]  # the walk sees real edges


def test_the_cycle_finder_finds_cycles():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


LIBRARY_LOADERS = ("wetok.model", "wetok.checkpoints", "wetok.official", "wetok.registry", "wetok.tokens",
                   "wetok.presets", "wetok.config", "wetok._hub")


@pytest.mark.parametrize("module", LIBRARY_LOADERS)
def test_library_loaders_do_not_import_training_or_the_cli(module):
    imported = _imports(module, module_level=False)
    assert not {m for m in imported if m.startswith(("wetok.train", "wetok.cli"))}, imported

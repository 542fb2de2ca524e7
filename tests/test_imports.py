"""Every module of the product imports alone, and the import graph between them has no cycle.

The graph counts imports at any depth (module level and inside functions): a function-level
import that points back up the graph hides a cycle without breaking one.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("blt_data", "blt_model", "pipelines", "cli")


def _modules() -> dict[str, Path]:
    return {
        ".".join(p.relative_to(REPO).with_suffix("").parts): p
        for package in PACKAGES
        for p in sorted((REPO / package).glob("*.py"))
        if p.name != "__init__.py"
    }


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The product's modules that ``path`` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found.update(n for n in names if n in modules)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_import_graph_has_no_cycle():
    modules = _modules()
    graph = {m: _imports(p, modules) - {m} for m, p in modules.items()}
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_libraries_never_import_the_cli_or_ray_programs():
    modules = _modules()
    for m, p in modules.items():
        if m.startswith(("blt_data.", "blt_model.")):
            bad = {n for n in _imports(p, modules) if n.startswith(("cli.", "pipelines."))}
            assert not bad, f"{m} imports {sorted(bad)}"


@pytest.mark.parametrize("module", sorted(_modules()))
def test_module_imports_alone(module):
    """A fresh interpreter per module: an import order that only works after another module
    was loaded first shows up here."""
    done = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]

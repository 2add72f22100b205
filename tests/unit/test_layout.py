"""The house rules that can be counted: modules of at most 400 lines, functions of at most 60, and
no import circle among the project's modules (lazy imports inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for package in ("mpo", "reward") for p in sorted((REPO / package).rglob("*.py"))}


def _tree(path: Path) -> ast.AST:
    return ast.parse(path.read_text(encoding="utf-8"))


def test_modules_are_at_most_400_lines():
    sizes = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in MODULES.items()}
    assert {name: n for name, n in sizes.items() if n > 400} == {}


def test_functions_are_at_most_60_lines():
    long = [(name, node.name, node.end_lineno - node.lineno + 1) for name, path in MODULES.items()
            for node in ast.walk(_tree(path)) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > 60]
    assert long == []


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(_tree(path)):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
            [a.name for a in node.names] if isinstance(node, ast.Import) else []
        found.update(n for n in names if n in MODULES)
    return found


def test_no_import_circles():
    graph = {name: _imports(path) - {name} for name, path in MODULES.items()}
    circles, done = [], set()

    def visit(name, trail):
        if name in trail:
            circles.append(trail[trail.index(name):] + [name])
            return
        if name in done:
            return
        for target in sorted(graph[name]):
            visit(target, trail + [name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    assert circles == []

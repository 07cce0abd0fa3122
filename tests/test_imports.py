"""No import circles among the project's modules: each shared piece has one owner, and every module can be read
(and imported) after the modules it uses. Function-level imports count: they defer a circle, they do not remove it."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("common", "resnet50", "mobilenet", "vgg", "benchmarks")


def project_modules() -> dict[str, Path]:
    """``{dotted module name: file}`` for every module of the project's packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(node: ast.AST):
    """Every import statement below ``node``, at any depth, except under ``if TYPE_CHECKING:`` (never run)."""
    for child in ast.iter_child_nodes(node):
        run = child.orelse if isinstance(child, ast.If) and _is_type_checking(child.test) else [child]
        for statement in run:
            if isinstance(statement, (ast.Import, ast.ImportFrom)):
                yield statement
            yield from _import_nodes(statement)


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules that module ``name`` imports (``from pkg import sub`` names the submodule ``pkg.sub``;
    ``from pkg import thing`` names ``pkg``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                prefixes = (".".join(parts[:n]) for n in range(len(parts), 0, -1))
                found.update(next(([p] for p in prefixes if p in modules), []))
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            base = ".".join(anchor + ([node.module] if node.module else []))
        for alias in node.names:
            if f"{base}.{alias.name}" in modules:
                found.add(f"{base}.{alias.name}")
            elif base in modules:
                found.add(base)
    found.discard(name)
    return found


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected group of modules (Tarjan's algorithm), each as ``[a, b, ..., a]``."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_circle_in(graph, group) for group in groups]


def _circle_in(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A shortest path from the group's first module back to itself, staying inside the group."""
    start = min(group)
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & group):
            if w == start:
                return paths[v] + [start]
            if w not in paths:
                paths[w] = paths[v] + [w]
                queue.append(w)
    raise AssertionError(f"no circle through {start} in {sorted(group)}")


def test_the_finder_sees_function_level_imports_and_names_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
    modules = project_modules()
    # common/serving/app.py imports the batcher at the top; common/cli.py its commands inside functions.
    assert "common.serving.batcher" in imports_of("common.serving.app", modules["common.serving.app"], modules)
    assert "common.engine" in imports_of("common.cli", modules["common.cli"], modules)
    # Imports under `if TYPE_CHECKING:` never run (common/data/__init__.py names TrainConfig's module there).
    assert "common.config" not in imports_of("common.data", modules["common.data"], modules)


def test_no_import_circles():
    modules = project_modules()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    circles = find_cycles(graph)
    assert not circles, "import circle(s): " + "; ".join(" -> ".join(c) for c in circles)

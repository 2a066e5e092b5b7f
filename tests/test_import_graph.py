"""No import circle among the modules of ``predictor/`` and ``pipelines/``.

The graph is read from the source with ``ast``, without importing anything: an edge A → B for every import A
makes of a module of the same two packages in a statement of A's module body, inside top-level ``if``/``try``/``with``
blocks and class bodies too, and under ``if TYPE_CHECKING:`` as well: Python never runs that one, but a module that
needs its importer's types is the same circle in the design (as the engine and its scheduler were, until ``Sequence``
moved to ``engine/request.py``). Imports inside
functions do not count: they run after both modules are loaded, and are how a module defers a heavy dependency.
``from . import x``, ``from .x import y``, ``import predictor.x`` and ``from pipelines.x import y`` all count;
``from P import y`` is an edge to the submodule ``P.y`` when there is one, else to ``P`` itself.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest
from conftest import REPO

PACKAGES = ("predictor", "pipelines")


def module_names(root: Path = REPO) -> dict[str, Path]:
    """Dotted name → file of every module of the two packages (``pkg/__init__.py`` is ``pkg``)."""
    names = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def import_time_statements(body: list[ast.stmt]):
    """The import statements of the module body (``if TYPE_CHECKING:`` blocks included), not those in functions."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            yield from import_time_statements(node.body)
            yield from import_time_statements(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, *(h.body for h in node.handlers), node.orelse, node.finalbody):
                yield from import_time_statements(block)
        elif isinstance(node, (ast.With, ast.ClassDef)):
            yield from import_time_statements(node.body)


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of the two packages that ``name`` imports in its module body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in import_time_statements(ast.parse(path.read_text(), str(path)).body):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - (node.level - 1)])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        for target in targets:
            while target and target not in modules:  # import a.b.c of a module a.b (c an attribute) or outside
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    modules = module_names(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary circle found by a depth-first search (each reported once, from its smallest module name)."""
    found: set[tuple[str, ...]] = set()

    def visit(node: str, path: list[str], on_path: set[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt == path[0]:
                found.add(tuple(path))
            elif nxt not in on_path and nxt > path[0]:  # circles through a smaller module are found from that one
                path.append(nxt)
                on_path.add(nxt)
                visit(nxt, path, on_path)
                on_path.discard(nxt)
                path.pop()

    for start in sorted(graph):
        visit(start, [start], {start})
    return sorted(list(c) for c in found)


@functools.cache
def repository_cycles() -> list[list[str]]:
    return cycles(import_graph())


def package_cycles(package: str) -> list[list[str]]:
    """The circles through a module of ``package``."""
    return [c for c in repository_cycles() if any(m.split(".")[0] == package for m in c)]


def test_the_graph_sees_each_kind_of_import_and_skips_those_in_functions(tmp_path):
    (tmp_path / "predictor" / "sub").mkdir(parents=True)
    (tmp_path / "pipelines").mkdir()
    files = {
        "predictor/__init__.py": "",
        "predictor/a.py": "from . import b\nfrom .sub import c\nimport pipelines.x\n",
        "predictor/b.py": "def f():\n    from . import a\n",
        "predictor/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import T\n",
        "predictor/sub/__init__.py": "",
        "predictor/sub/c.py": "from ..b import thing\ntry:\n    from predictor import a\nexcept ImportError:\n    pass\n",
        "pipelines/__init__.py": "",
        "pipelines/x.py": "import os\nfrom predictor.sub.c import name\nclass K:\n    from pipelines import y\n",
        "pipelines/y.py": "from . import x\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path)
    assert graph["predictor.a"] == {"predictor.b", "predictor.sub.c", "pipelines.x"}
    assert graph["predictor.b"] == set()  # a function's import runs later
    assert graph["predictor.d"] == {"predictor.b"}  # a type annotation's import is part of the design
    assert graph["predictor.sub.c"] == {"predictor.b", "predictor.a"}
    assert graph["pipelines.x"] == {"predictor.sub.c", "pipelines.y"}
    assert cycles(graph) == [["pipelines.x", "pipelines.y"], ["pipelines.x", "predictor.sub.c", "predictor.a"], ["predictor.a", "predictor.sub.c"]]


def test_the_data_step_imports_the_tokenizer_not_the_trainer():
    graph = import_graph()
    assert "pipelines.tokenizer" in graph["pipelines.dataset"] and "pipelines.train" not in graph["pipelines.dataset"]
    assert "pipelines.dataset" in graph["pipelines.train"]


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_circle(package):
    found = package_cycles(package)
    assert not found, f"import circles in {package}/: " + "; ".join(" -> ".join([*c, c[0]]) for c in found)

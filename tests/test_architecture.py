"""The package's shape: no import cycles, and the command line is a layer the library never imports.

Imports are read from the source (ast), including those inside functions: a cycle closed by a deferred import is
still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import capvector

PACKAGE = Path(capvector.__file__).parent
CLI = "capvector.cli"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(name: str) -> set[str]:
    """The capvector modules `name` imports: `from pkg import sub` counts as pkg.sub when that is a module."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {module for module in found if module in MODULES and module != name}


GRAPH = {name: imported_modules(name) for name in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a list of nodes (first == last), or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" when fully explored
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = "done"
        return None

    for module in graph:
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_the_checks_see_what_they_check():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    assert {"capvector.cli", "capvector.params.vectors", "capvector.training.engine"} <= set(MODULES)
    assert "capvector.params.checkpoints" in GRAPH["capvector.params.vectors"]
    assert "capvector.bench.experiment.report" in GRAPH["capvector.bench.experiment.reproduce"]


def test_no_import_cycles():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_only_entry_points_import_the_command_line():
    importers = sorted(name for name, targets in GRAPH.items() if CLI in targets)
    assert importers == ["capvector.__main__", "capvector.training.__main__"]


def test_the_readme_layout_names_every_module():
    readme = (PACKAGE.parents[1] / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("```")[1]
    words = set(layout.replace("/", " ").replace(",", " ").replace(":", " ").split())
    missing = [
        name
        for name, path in MODULES.items()
        if path.name != "__init__.py" and path.stem not in words and path.name not in words
    ]
    assert not missing, f"README's layout section does not mention {missing}"
    packages = [name for name, path in MODULES.items() if path.name == "__init__.py" and name.count(".") >= 1]
    assert all(name.rpartition(".")[2] in words for name in packages), packages

"""The package's layout: every module imports, and the subpackages of wadi_core depend on each other without
cycles (read from the source with ast, so that a lazy import inside a function counts too)."""

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import wadi_core

PACKAGE_DIR = Path(wadi_core.__file__).parent
# A sitecustomize that blocks the network once imported; a __main__ runs its command line.
NOT_IMPORTED = ("wadi_core._offline_guard", "__main__")


def _module_names() -> list[str]:
    return sorted(info.name for info in pkgutil.walk_packages([str(PACKAGE_DIR)], prefix="wadi_core.")
                  if not info.name.startswith(NOT_IMPORTED[0]) and not info.name.endswith(NOT_IMPORTED[1]))


@pytest.mark.parametrize("name", _module_names())
def test_every_module_imports(name):
    if name.startswith("wadi_core.kernels.lorad_triton"):
        pytest.importorskip("triton")
    importlib.import_module(name)


def subpackage_imports() -> dict[str, set[str]]:
    """``{unit: the units it imports}`` over wadi_core's subpackages and top-level modules (``wadi_core.x``)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE_DIR.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE_DIR).with_suffix("").parts)
        package = parts[:-1]  # the package the file's relative imports start from
        unit = parts[0]
        if parts == ["__init__"]:
            continue  # wadi_core/__init__.py
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name.split(".")[1:] for alias in node.names if alias.name.startswith("wadi_core")]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the file's package, up level - 1 packages
                    module = package[: len(package) - node.level + 1] + (node.module or "").split(".")
                elif (node.module or "").split(".")[0] == "wadi_core":
                    module = node.module.split(".")[1:]
                else:
                    continue
                module = [part for part in module if part]
                targets = [module] if module else [[alias.name] for alias in node.names]  # from wadi_core import x
            else:
                continue
            for target in targets:
                if target and target[0] != unit:  # target[0]: the subpackage or top-level module imported
                    graph.setdefault(unit, set()).add(target[0])
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path [a, b, ..., a], or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for other in sorted(graph.get(node, ())):
            if state.get(other) == "open":
                return stack[stack.index(other):] + [other]
            if other not in state and (found := visit(other)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}}) is None


def test_subpackages_import_each_other_without_cycles():
    graph = subpackage_imports()
    assert "kernels" in graph["adapters"] and "artifacts" in graph["distill"]  # the graph is read at all
    cycle = _cycle(graph)
    assert cycle is None, "import cycle between wadi_core subpackages: " + " -> ".join(cycle)

"""Package layout: no import cycles between capsearch modules, and modules short enough to read."""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "capsearch"
MAX_LINES = 400

# Modules allowed over MAX_LINES, with their line counts when they were listed. They are being split:
# delete an entry once its module is under the limit (test_long_module_allow_list_is_current says when).
LONG_MODULES = {
    "capsearch/training/loop.py",  # 427 lines: the training loop and the helpers its tests patch in place
}


def module_files() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name, for its __init__)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_time_statements(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: not inside functions, not under `if TYPE_CHECKING:`."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue  # imports inside functions are the deliberate lazy ones
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from import_time_statements(node.body)
            yield from import_time_statements(node.orelse)
        else:  # class bodies, try/with/for blocks run at import time
            for field in ("body", "orelse", "finalbody", "handlers"):
                yield from import_time_statements(getattr(node, field, []))


def imported_modules(name: str, path: Path, modules: Mapping[str, Path]) -> set[str]:
    """The package's modules that `name` imports when it is imported.

    `from a.b import c` counts as importing module `a.b.c` where that is a module, else `a.b`; the
    parent packages Python initialises on the way are not counted, so a package's `__init__` importing
    its own submodules is not a cycle unless a submodule imports the package back.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in import_time_statements(ast.parse(path.read_text(), str(path)).body):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                for alias in node.names
            ]
        found.update(t for t in targets if t in modules and t != name)
    return found


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One import cycle as a path that ends where it starts, or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once fully explored
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def test_the_walker_sees_the_methods_package(graph: dict[str, set[str]]) -> None:
    assert "capsearch.methods.lora" in graph["capsearch.methods"]
    assert graph["capsearch.methods.lora"] >= {"capsearch.methods.base", "capsearch.methods._peft"}
    assert "capsearch.methods" not in graph["capsearch.methods.lora"]


def test_no_import_cycles(graph: dict[str, set[str]]) -> None:
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_find_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_modules_are_short_enough_to_read() -> None:
    long = {
        str(path.relative_to(ROOT)): n
        for path in module_files().values()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    unlisted = {path: n for path, n in long.items() if path not in LONG_MODULES}
    assert not unlisted, f"modules over {MAX_LINES} lines (split them): {unlisted}"


def test_long_module_allow_list_is_current() -> None:
    short = [
        path
        for path in sorted(LONG_MODULES)
        if not (ROOT / path).is_file() or len((ROOT / path).read_text().splitlines()) <= MAX_LINES
    ]
    assert not short, f"gone or under {MAX_LINES} lines now: delete them from LONG_MODULES: {short}"

"""Package layout: wings that import one way, no import cycles (imports inside functions included), a
reason on every import that waits inside a function, and modules short enough to read."""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "capsearch"
MAX_LINES = 400
LAZY = "# lazy:"

# The wings from the top of the data flow down (README, "Layout"): a module may import its own wing,
# any wing below it and the shared modules at the top of the package, never a wing above it.
WINGS = ["commands", "export", "reporting", "search", "training", "metrics", "models", "methods",
         "datasets", "worlds"]  # fmt: skip


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


def running_imports(
    body: list[ast.stmt], in_function: bool = False
) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement that can run, with whether it sits inside a function; those under
    `if TYPE_CHECKING:` never run and are left out."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, in_function
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from running_imports(node.body, True)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from running_imports(node.orelse, in_function)
        else:  # class bodies, if/try/with/for blocks
            for field in ("body", "orelse", "finalbody", "handlers"):
                yield from running_imports(getattr(node, field, None) or [], in_function)


def imported_modules(name: str, path: Path, modules: Mapping[str, Path]) -> set[str]:
    """The package's modules that `name` imports, at import time or inside a function.

    `from a.b import c` counts as importing module `a.b.c` where that is a module, else `a.b`; the
    parent packages Python initialises on the way are not counted, so a package's `__init__` importing
    its own submodules is not a cycle unless a submodule imports the package back.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node, _ in running_imports(ast.parse(path.read_text(), str(path)).body):
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


def unexplained_lazy_imports(path: Path) -> list[int]:
    """Line numbers of imports inside functions that carry no `# lazy: reason`: on their own first
    line, or on a comment line above the run of imports (blank lines between them allowed) they
    belong to."""
    source = path.read_text()
    lines = source.splitlines()
    nodes = [n for n, inside in running_imports(ast.parse(source, str(path)).body) if inside]
    import_lines = {i for n in nodes for i in range(n.lineno - 1, n.end_lineno or n.lineno)}
    missing = []
    for node in nodes:
        if LAZY in lines[node.lineno - 1]:
            continue
        above = node.lineno - 2
        while above >= 0 and (not lines[above].strip() or above in import_lines):
            above -= 1
        if above < 0 or not lines[above].strip().startswith(LAZY):
            missing.append(node.lineno)
    return missing


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


def wing_of(module: str) -> str | None:
    """The wing a module belongs to, or None for the shared modules at the top of the package."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in WINGS) else None


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def test_the_walker_sees_the_methods_package(graph: dict[str, set[str]]) -> None:
    assert "capsearch.methods.lora" in graph["capsearch.methods"]
    assert graph["capsearch.methods.lora"] >= {"capsearch.methods.base", "capsearch.methods._peft"}
    assert "capsearch.methods" not in graph["capsearch.methods.lora"]


def test_the_walker_sees_imports_inside_functions(tmp_path: Path) -> None:
    (tmp_path / "capsearch").mkdir()
    source = tmp_path / "capsearch" / "a.py"
    source.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from capsearch import c\n"
        "def f():\n    from capsearch import b\n"
    )
    modules = {"capsearch.a": source, "capsearch.b": source, "capsearch.c": source}
    assert imported_modules("capsearch.a", source, modules) == {"capsearch.b"}


def test_no_import_cycles(graph: dict[str, set[str]]) -> None:
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_find_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_wings_import_one_way(graph: dict[str, set[str]]) -> None:
    upward = sorted(
        f"{a} -> {b}"
        for a, targets in graph.items()
        for b in targets
        if (wa := wing_of(a)) is not None
        and (wb := wing_of(b)) is not None
        and WINGS.index(wb) < WINGS.index(wa)
    )
    assert not upward, f"imports against the wings' order {WINGS}: {upward}"


def test_every_wing_is_listed_and_the_top_holds_a_handful_of_shared_modules() -> None:
    wings = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert wings == sorted(WINGS)
    shared = sorted(p.stem for p in PACKAGE.glob("*.py") if not p.stem.startswith("__"))
    assert len(shared) <= 10, f"the top of capsearch/ holds {shared}: give them wings"


def test_imports_inside_functions_say_why(tmp_path: Path) -> None:
    missing = {
        str(path.relative_to(ROOT)): lines
        for path in module_files().values()
        if (lines := unexplained_lazy_imports(path))
    }
    assert not missing, f"imports inside functions without a '{LAZY} reason' comment: {missing}"


def test_unexplained_lazy_imports_finds_a_bare_one(tmp_path: Path) -> None:
    path = tmp_path / "m.py"
    path.write_text(
        "def f():\n    # lazy: heavy\n    import json\n\n    import os\n"
        "def g():\n    import re  # lazy: heavy\n"
        "def h():\n    x = 1\n    import sys\n"
    )
    assert unexplained_lazy_imports(path) == [10]


def test_modules_are_short_enough_to_read() -> None:
    long = {
        str(path.relative_to(ROOT)): n
        for path in module_files().values()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines (split them): {long}"

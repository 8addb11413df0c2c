"""The shape of the `gateway` package: no import cycles, small modules, no test-only imports.

Every import statement of every module under gateway/ counts, wherever it
stands: at module level, inside a function (a cycle dodged by importing late
is still a cycle) or under `if TYPE_CHECKING:`. The modules are parsed, never
imported, so the check cannot be fooled by import order or by what happens to
be in `sys.modules`.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE = REPO_ROOT / "gateway"
MAX_LINES = 600

# The test extra's distributions (pyproject.toml) by the names they are imported as.
TEST_ONLY_IMPORTS = {
    "pytest": {"pytest", "_pytest"},
    "pytest-twisted": {"pytest_twisted"},
    "hypothesis": {"hypothesis"},
    "trustme": {"trustme"},
    "ruff": {"ruff"},
    "aiosmtpd": {"aiosmtpd"},
    "mypy": {"mypy"},
    "mypy-zope": {"mypy_zope"},
    "selenium": {"selenium"},
}
# Not a distribution, but as test-only as one.
TEST_TREE = {"tests"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def gateway_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_names(path: Path, module: str) -> Iterator[tuple[str, int]]:
    is_package = path.name == "__init__.py"
    return imported_names_in(path.read_text(), module, is_package=is_package)


def imported_names_in(text: str, module: str, *, is_package: bool) -> Iterator[tuple[str, int]]:
    """(absolute dotted name, line) of every import in the source; for
    `from X import y`, both X and X.y (y may be a module)."""
    tree = ast.parse(text)
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            yield base, node.lineno
            for alias in node.names:
                yield f"{base}.{alias.name}", node.lineno


def import_graph() -> dict[str, set[str]]:
    """Module -> the gateway modules it imports (a package's own submodules
    importing the package itself are not edges: Python has the package in
    `sys.modules` by then)."""
    modules = gateway_modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets = set()
        for name, _ in imported_names(path, module):
            if name in modules and name != module and not module.startswith(name + "."):
                targets.add(name)
        graph[module] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_checks_see_the_whole_package() -> None:
    graph = import_graph()
    assert {"gateway", "gateway.cli", "gateway.service", "gateway.runtime"} <= set(graph)
    assert "gateway.runtime" in graph["gateway.smtp.service"]
    assert "gateway.cli.common" in graph["gateway.cli.config"]


def test_cycle_finder_finds_a_cycle_through_a_function_level_import() -> None:
    source = {
        "p.a": "import p.b\n",
        "p.b": "def f():\n    from .c import x\n",
        "p.c": "if TYPE_CHECKING:\n    from p import a\n",
    }
    graph = {
        name: {t for t, _ in imported_names_in(text, name, is_package=False) if t in source}
        for name, text in source.items()
    }
    assert cycles(graph) == [["p.a", "p.b", "p.c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_gateway_modules() -> None:
    found = cycles(import_graph())
    assert found == [], "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize("module", sorted(gateway_modules()))
def test_module_is_at_most_600_lines(module: str) -> None:
    path = gateway_modules()[module]
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(REPO_ROOT)} has {lines} lines"


def test_every_test_extra_is_known() -> None:
    """A new test-only dependency must be added above, or the next check misses it."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]["test"]
    names = {_distribution(requirement) for requirement in extras}
    assert names <= set(TEST_ONLY_IMPORTS), names - set(TEST_ONLY_IMPORTS)


def _distribution(requirement: str) -> str:
    for i, char in enumerate(requirement):
        if not (char.isalnum() or char in "-_."):
            return requirement[:i].lower()
    return requirement.lower()


def test_no_gateway_module_imports_a_test_only_dependency() -> None:
    forbidden = TEST_TREE.union(*TEST_ONLY_IMPORTS.values())
    found = [
        f"{path.relative_to(REPO_ROOT)}:{line}: {name}"
        for module, path in gateway_modules().items()
        for name, line in imported_names(path, module)
        if name.split(".")[0] in forbidden
    ]
    assert found == []


def private_imports() -> list[str]:
    """`from gateway.x import _name` anywhere in the package: a private name
    used from another module is a seam nobody declared."""
    found = []
    for module, path in gateway_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gateway"):
                found += [
                    f"{module}:{node.lineno} imports {node.module}.{alias.name}"
                    for alias in node.names
                    if alias.name.startswith("_") and not alias.name.startswith("__")
                ]
    return found


def test_no_gateway_module_imports_a_private_name_of_another() -> None:
    assert private_imports() == []

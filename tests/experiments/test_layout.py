"""experiments/ stays readable: no import cycle, no private names across modules,
variant names only in the registry, no module over 600 lines."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "experiments"
MAX_LINES = 600


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
# Parsed once, at collection: CPython 3.11's parser can raise "AST constructor
# recursion depth mismatch" when called after a test that hit the recursion
# limit in the same process.
TREES = {path: ast.parse(path.read_text()) for path in MODULES.values()}


def imports(path: pathlib.Path) -> list[tuple[str, str | None, dict[str, str]]]:
    """``(module, name or None, aliases)`` for every import of an experiments
    module in ``path``, at any depth (imports inside functions count)."""
    found = []
    for node in ast.walk(TREES[path]):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("experiments"):
                    found.append((alias.name, None))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
            "experiments"
        ):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if full in MODULES:  # `from experiments import train`
                    found.append((full, None))
                else:  # `from experiments.train import Config`
                    found.append((node.module, alias.name))
    return found


def module_aliases(path: pathlib.Path) -> dict[str, str]:
    """The local names under which ``path`` binds experiments modules."""
    aliases = {}
    for node in ast.walk(TREES[path]):
        if isinstance(node, ast.ImportFrom) and node.module == "experiments":
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"experiments.{alias.name}"
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
            "experiments."
        ):
            for alias in node.names:
                if f"{node.module}.{alias.name}" in MODULES:
                    aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return aliases


def test_no_import_cycle_among_the_experiments_modules():
    graph = {
        name: {m for m, _ in imports(path) if m in MODULES and m != name}
        for name, path in MODULES.items()
    }
    # The package's __init__ holds no imports of its modules; a submodule
    # importing a sibling imports the package first, which is not a cycle.
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = trail[trail.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = "done"

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_no_module_uses_another_modules_private_names():
    offences = []
    for name, path in MODULES.items():
        for module, imported in imports(path):
            if imported is not None and imported.startswith("_"):
                offences.append(f"{name}: from {module} import {imported}")
        aliases = module_aliases(path)
        for node in ast.walk(TREES[path]):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                offences.append(f"{name}: {node.value.id}.{node.attr}")
    assert not offences, offences


def test_variant_names_are_compared_only_in_the_registry():
    offences = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in MODULES.values()
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if 'optimizer == "' in line or 'optimizer != "' in line
    ]
    assert not offences, offences


def test_no_module_is_over_600_lines():
    lengths = {
        str(p.relative_to(ROOT)): len(p.read_text().splitlines())
        for p in MODULES.values()
    }
    assert {p: n for p, n in lengths.items() if n > MAX_LINES} == {}

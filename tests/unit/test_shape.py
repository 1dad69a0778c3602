"""The code keeps the shape DESIGN.md asks for: no import cycle inside a package, privates stay in their
module, no import hidden in a function to dodge a cycle, small modules that say what they are for."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "services.registry": ROOT / "services" / "registry",
    "services.scheduler": ROOT / "services" / "scheduler",
    "services.evaluator": ROOT / "services" / "evaluator",
    "services.runtime": ROOT / "services" / "runtime",
    "maw_agent": ROOT / "agent" / "maw_agent",
    "deploy.local": ROOT / "deploy" / "local",
}
MAX_LINES = 600


def modules(package: str, root: Path) -> dict[str, Path]:
    """Every module of a package (migrations excluded) by dotted name."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if "migrations" in rel.parts:
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join([package, *parts])] = path
    return found


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute name an ImportFrom refers to."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join([*base, node.module] if node.module else base)


def imports(module: str, path: Path, known: dict[str, Path]) -> list[tuple[str, str, int, bool]]:
    """(target module, imported name, line, at top level) for each import of our own code."""
    tree = ast.parse(path.read_text(), str(path))
    top = set(map(id, tree.body))
    guarded = {id(n) for stmt in tree.body if isinstance(stmt, ast.If) for n in ast.walk(stmt)}
    out = []
    for node in ast.walk(tree):
        at_top = id(node) in top or id(node) in guarded
        if isinstance(node, ast.ImportFrom):
            target = resolve(module, path.name == "__init__.py", node)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in known:
                    out.append((sub, "", node.lineno, at_top))
                elif target in known:
                    out.append((target, alias.name, node.lineno, at_top))
        elif isinstance(node, ast.Import):
            out.extend((a.name, "", node.lineno, at_top) for a in node.names if a.name in known)
    return out


def cycle_in(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of the graph, or []."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return []

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return []


def problems_of(package: str, root: Path) -> list[str]:
    """Everything in one package that breaks the shape."""
    known = modules(package, root)
    graph: dict[str, set[str]] = {m: set() for m in known}
    problems = []
    for module, path in known.items():
        text = path.read_text()
        tree = ast.parse(text)
        if not ast.get_docstring(tree) and text.strip():
            problems.append(f"{module}: no module docstring saying what it is for")
        if (lines := text.count("\n")) > MAX_LINES:
            problems.append(f"{module}: {lines} lines (more than {MAX_LINES})")
        for target, name, line, at_top in imports(module, path, known):
            if not at_top:
                problems.append(f"{module}:{line}: imports {target} inside a function")
            if name.startswith("_") and not name.startswith("__"):
                problems.append(f"{module}:{line}: imports {target}.{name}, a name private to that module")
            # A package's __init__ re-exports its modules: that is its public face, not a dependency of theirs.
            if path.name != "__init__.py" and not target.startswith(module + "."):
                graph[module].add(target)
    # A module taking a name from its own (parent) package's __init__ takes one of its re-exports: the module
    # behind it is the real edge, not the __init__ that imports every sibling.
    real = {m: {t for t in targets if not m.startswith(t + ".")} for m, targets in graph.items()}
    if found := cycle_in(real):
        problems.append("import cycle: " + " -> ".join(found))
    return problems


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_the_package_keeps_its_shape(package: str) -> None:
    assert problems_of(package, PACKAGES[package]) == []


def test_the_shape_check_finds_a_cycle_a_private_import_and_a_hidden_import(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('"""A package."""\n')
    (pkg / "a.py").write_text('"""A."""\nfrom .b import _helper\n')
    (pkg / "b.py").write_text('"""B."""\nfrom . import a\n\n\ndef _helper() -> None:\n    from . import c\n')
    (pkg / "c.py").write_text("x = 1\n")
    found = problems_of("pkg", pkg)
    assert "pkg.a:2: imports pkg.b._helper, a name private to that module" in found
    assert "pkg.b:6: imports pkg.c inside a function" in found
    assert "pkg.c: no module docstring saying what it is for" in found
    assert any(p.startswith("import cycle: pkg.a -> pkg.b -> pkg.a") for p in found)

"""The project's own import graph, read from the source with `ast` (nothing is imported).

`dvcgen` lists a stage's code dependencies as the files its module reaches through imports, so
editing a helper module reruns exactly the stages that use it; `tests/test_structure.py` checks that
the graph has no cycle. Every import statement counts, inside functions too (a stage runs them). Method modules are found by name at run time (`get_method`), so a
stage's methods are added by the caller (`closure(..., roots)`), not followed from the registry.
"""
from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
PACKAGES = ("fastgen_core", "stages", "flows")


def module_file(module: str) -> Path | None:
    """The file of a project module (a package is its __init__.py); None outside the project."""
    if module.split(".")[0] not in PACKAGES:
        return None
    base = PROJECT.joinpath(*module.split("."))
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def project_modules() -> list[str]:
    out = []
    for pkg in PACKAGES:
        for f in sorted((PROJECT / pkg).rglob("*.py")):
            parts = f.relative_to(PROJECT).with_suffix("").parts
            out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


@cache
def imports(module: str) -> frozenset[str]:
    """The project modules `module` imports (`from pkg import name` counts pkg.name when that is a
    module, else pkg)."""
    f = module_file(module)
    if f is None:
        return frozenset()
    package = module if f.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for a in child.names:
                    found.add(f"{base}.{a.name}" if module_file(f"{base}.{a.name}") else base)
            visit(child)

    visit(ast.parse(f.read_text(), str(f)))
    return frozenset(m for m in found if module_file(m) is not None and m != module)


def graph() -> dict[str, frozenset[str]]:
    return {m: imports(m) for m in project_modules()}


def cycles() -> list[list[str]]:
    """Every import cycle, each once (as found by depth-first search)."""
    g, state, out = graph(), {}, []

    def dfs(m: str, path: list[str]):
        state[m] = 1
        for n in sorted(g.get(m, ())):
            if state.get(n) == 1:
                out.append(path[path.index(n):] + [n])
            elif n not in state:
                dfs(n, path + [n])
        state[m] = 2

    for m in g:
        if m not in state:
            dfs(m, [m])
    return out


def closure(roots: list[str], skip: dict[str, set[str]] | None = None) -> list[str]:
    """Files (relative to the project) of `roots` and every project module they reach, with the
    packages they live in. `skip[a]` names modules not followed from module `a`."""
    skip = skip or {}
    seen: list[str] = []
    todo = list(roots)
    while todo:
        m = todo.pop()
        if m in seen or module_file(m) is None:
            continue
        seen.append(m)
        parts = m.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a.b runs a/__init__
        todo += [n for n in imports(m) if n not in skip.get(m, ())]
    return sorted(module_file(m).relative_to(PROJECT).as_posix() for m in seen)

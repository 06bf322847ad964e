"""The house rules of the package's layout, checked on its source (no import needed).

- Every HDF5 file is opened by the disk wing: `h5py` is imported only under logix/disk/.
- The core never imports an adapter: nothing under logix/ imports logix.integrations.
- No library file over 500 lines, no function over 80.
- The longest chain of module-level imports between library modules is at most 6 links. A
  package's `__init__` that only re-exports (a facade: docstring, imports, `__all__`) adds no link
  of its own: importing it is importing what it re-exports. The console entry points (`logix.cli`,
  its `main` and `logix.__main__`) sit on top of the library and import nothing back, so their
  chains are reported (test_entry_points_chain) but not held to the rule.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80
MAX_IMPORT_CHAIN = 6


def library_files() -> dict[str, Path]:
    """{module name: path} of logix/ and of integrations/ (installed as logix.integrations)."""
    out = {}
    for top, package in (("logix", ["logix"]), ("integrations", ["logix", "integrations"])):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = package + list(path.relative_to(ROOT / top).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = library_files()


@functools.cache
def tree(module: str) -> ast.Module:
    return ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))


def imported(module: str, node: ast.AST) -> list[str]:
    """The modules an import statement names, relative imports resolved; `from pkg import sub`
    names the submodule where `sub` is one."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    subs = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES]
    return subs or [base]


def imports_anywhere(module: str) -> set[str]:
    return {name for node in ast.walk(tree(module)) for name in imported(module, node)}


def module_level_links(module: str) -> set[str]:
    """Library modules imported at module level (where a chain of imports is paid at import time)."""
    names = {name for node in tree(module).body for name in imported(module, node)}
    return {name for name in names if name in MODULES and name != module}


def test_only_the_disk_wing_imports_h5py():
    outside = [m for m in MODULES if not m.startswith("logix.disk") and "h5py" in imports_anywhere(m)]
    assert outside == []


def test_the_core_never_imports_an_adapter():
    core = [m for m in MODULES if not m.startswith("logix.integrations")]
    offenders = [m for m in core if any(name.startswith("logix.integrations") for name in imports_anywhere(m))]
    assert offenders == []


def test_no_library_file_is_over_500_lines():
    sizes = {m: len(p.read_text().splitlines()) for m, p in MODULES.items()}
    assert {m: n for m, n in sizes.items() if n > MAX_FILE_LINES} == {}


def test_no_library_function_is_over_80_lines():
    long = {
        f"{m}.{node.name}": node.end_lineno - node.lineno + 1
        for m in MODULES
        for node in ast.walk(tree(m))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    }
    assert long == {}


ENTRY_POINTS = ("logix.cli", "logix.cli.main", "logix.__main__")


def is_facade(module: str) -> bool:
    """A package __init__ holding only a docstring, imports and __all__."""
    if MODULES[module].name != "__init__.py":
        return False
    for node in tree(module).body:
        docstring = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        exports = isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["__all__"]
        if not (docstring or exports or isinstance(node, (ast.Import, ast.ImportFrom))):
            return False
    return True


def longest_chain(module: str, seen: tuple = ()) -> list[str]:
    """The longest chain of module-level imports from `module` down, facades not counted as links."""
    if module in seen:
        raise AssertionError(f"import cycle at module level: {' -> '.join(seen + (module,))}")
    below = [longest_chain(name, seen + (module,)) for name in sorted(module_level_links(module))]
    deepest = max(below, key=links, default=[])
    return [f"({module})" if is_facade(module) else module] + deepest


def links(chain: list[str]) -> int:
    return len([m for m in chain if not m.startswith("(")]) - 1


def test_the_longest_chain_of_imports_is_at_most_6():
    chains = {m: longest_chain(m) for m in MODULES if m not in ENTRY_POINTS}
    worst = max(chains.values(), key=links)
    assert links(worst) <= MAX_IMPORT_CHAIN, " -> ".join(worst)


def test_entry_points_chain(capsys):
    """The entry points' chains, printed (pytest -s) for the record; nothing imports them back."""
    importers = {m for m in MODULES for name in module_level_links(m) if name in ENTRY_POINTS and m not in ENTRY_POINTS}
    assert importers == set()
    for m in ENTRY_POINTS:
        chain = longest_chain(m)
        print(f"{m}: {links(chain)} links: {' -> '.join(chain)}")


@pytest.mark.parametrize(
    "bad, rule",
    [
        ("import h5py\n", test_only_the_disk_wing_imports_h5py),
        ("from .integrations import deepspeed\n", test_the_core_never_imports_an_adapter),
        ("def f():\n" + "    pass\n" * 90, test_no_library_function_is_over_80_lines),
    ],
)
def test_the_rules_can_fail(bad, rule, tmp_path, monkeypatch):
    """A module planted in the package with a violation is caught by its rule."""
    planted = tmp_path / "planted.py"
    planted.write_text(bad)
    monkeypatch.setitem(MODULES, "logix.planted", planted)
    tree.cache_clear()
    try:
        with pytest.raises(AssertionError):
            rule()
    finally:
        tree.cache_clear()

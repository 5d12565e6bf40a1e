"""The pure state machines import no I/O: neither trio nor time, random,
socket or sqlite3, directly or through any Sentinel module they import.

Two checks: the import statements themselves (parsed, followed transitively
through ``sentinel_ipc``), and a fresh interpreter that loads only those
modules (bypassing the package ``__init__``s, which re-export the drivers) and
reports what got imported.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PURE = [
    "sentinel_ipc.resilience.breaker",
    "sentinel_ipc.resilience.retry",
    "sentinel_ipc.resilience.budget",
    "sentinel_ipc.resilience.instruments",
    "sentinel_ipc.resilience.fallback",
    "sentinel_ipc.framing",
    "sentinel_ipc.server.usage",
]
BANNED = {"trio", "time", "random", "socket", "sqlite3", "asyncio", "selectors", "subprocess"}


def module_file(name: str) -> Path:
    path = ROOT.joinpath(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imports_of(name: str) -> set[str]:
    """Absolute names of everything ``name`` imports (also in functions and
    TYPE_CHECKING blocks: stricter than what runs, and simpler to trust)."""
    tree = ast.parse(module_file(name).read_text(), filename=str(module_file(name)))
    package = name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.add(target)
            for alias in node.names:  # `from pkg import module`
                candidate = f"{target}.{alias.name}"
                if target.startswith("sentinel_ipc") and module_file(candidate).exists():
                    found.add(candidate)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module":
            pytest.fail(f"{name} imports dynamically (line {node.lineno}); keep imports static")
    return found


def closure(name: str) -> dict[str, str]:
    """Every module reachable from ``name`` through sentinel_ipc modules -> importer."""
    seen: dict[str, str] = {}
    todo = [name]
    visited = set()
    while todo:
        current = todo.pop()
        if current in visited:
            continue
        visited.add(current)
        for imported in imports_of(current):
            seen.setdefault(imported, current)
            if imported.startswith("sentinel_ipc.") and module_file(imported).exists():
                todo.append(imported)
    return seen


@pytest.mark.parametrize("name", PURE)
def test_pure_module_imports_no_io(name: str) -> None:
    reached = closure(name)
    bad = {
        module: importer for module, importer in reached.items() if module.split(".")[0] in BANNED
    }
    assert not bad, f"{name} reaches I/O modules (module <- importer): {bad}"
    assert "sentinel_ipc.resilience.guard" not in reached
    assert "sentinel_ipc.resilience.classifiers" not in reached


def test_pure_modules_load_without_io_in_a_fresh_interpreter() -> None:
    script = f"""
import importlib, json, sys, types
before = set(sys.modules)
for name, path in [("sentinel_ipc", "sentinel_ipc"),
                   ("sentinel_ipc.resilience", "sentinel_ipc/resilience"),
                   ("sentinel_ipc.server", "sentinel_ipc/server")]:
    module = types.ModuleType(name)
    module.__path__ = [path]
    sys.modules[name] = module
for name in {PURE!r}:
    importlib.import_module(name)
print(json.dumps(sorted(set(sys.modules) - before)))
"""
    out = subprocess.run(
        [sys.executable, "-S", "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    loaded = json.loads(out)
    assert set(PURE) <= set(loaded)
    assert not [m for m in loaded if m.split(".")[0] in BANNED], loaded


def test_the_check_would_catch_an_offender() -> None:
    """guard.py imports trio; the same walk must say so."""
    reached = closure("sentinel_ipc.resilience.guard")
    assert "trio" in reached and "time" in reached and "random" in reached

"""profiling is the ground layer: it imports nothing from pipeline or graphs, and cupti only lazily."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "profiling"


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_profiling_imports_only_downwards():
    for path in sorted(PACKAGE.glob("*.py")):
        upward = {m for m in _imported_modules(path) if m.split(".")[0] in ("pipeline", "graphs")}
        assert not upward, f"{path.name} imports {sorted(upward)}: profiling must not know the layers above it"


def test_every_module_imports_without_a_gpu_or_cupti(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupti", None)  # as if cupti-python were not installed
    for path in sorted(PACKAGE.glob("*.py")):
        importlib.import_module(f"profiling.{path.stem}" if path.stem != "__init__" else "profiling")

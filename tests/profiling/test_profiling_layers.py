"""profiling is the ground layer: every module imports without a GPU, and cupti only lazily.

That it imports nothing from pipeline or graphs is checked for every package in tests/test_layers.py.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "profiling"


def test_every_module_imports_without_a_gpu_or_cupti(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupti", None)  # as if cupti-python were not installed
    for path in sorted(PACKAGE.glob("*.py")):
        importlib.import_module(f"profiling.{path.stem}" if path.stem != "__init__" else "profiling")

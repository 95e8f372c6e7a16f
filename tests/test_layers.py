"""The layers of the design hold: imports only go down graphs -> pipeline -> profiling, and the tests mirror them.

Every import statement is read with `ast`, lazy imports inside functions included, so a layering violation
fails here even when it sits in a code path the other tests never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What each directory must never import (its own layer and the ones below are fine).
FORBIDDEN = {
    "profiling": {"pipeline", "graphs", "tests"},
    "pipeline": {"graphs", "tests"},
    "graphs": {"tests"},
    "tests/profiling": {"pipeline", "graphs"},
    "tests/pipeline": {"graphs"},
}


def imported_packages(path: Path) -> dict[str, int]:
    """Top-level package of every absolute import in `path` -> the first line that imports it."""
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue  # relative imports stay inside their own package
        for name in names:
            found.setdefault(name.split(".")[0], node.lineno)
    return found


@pytest.mark.parametrize("directory", sorted(FORBIDDEN))
def test_imports_only_go_down(directory):
    files = sorted((ROOT / directory).rglob("*.py"))
    assert files, f"no Python files under {directory}/: the layer list in this test is out of date"
    upward = [
        f"{path.relative_to(ROOT)}:{line} imports {package}"
        for path in files
        for package, line in sorted(imported_packages(path).items())
        if package in FORBIDDEN[directory]
    ]
    assert not upward, f"{directory}/ must not import {sorted(FORBIDDEN[directory])}: " + "; ".join(upward)


def test_the_checker_sees_lazy_imports(tmp_path):
    source = tmp_path / "module.py"
    source.write_text("import torch\n\ndef f():\n    from graphs.cli import main\n    import pipeline.model as m\n")
    assert imported_packages(source) == {"torch": 1, "graphs": 4, "pipeline": 5}

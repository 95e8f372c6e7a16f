"""Run the GPU (``cuda``-marked) tests and record the outcome in ``tests/GPU_RESULTS.md``.

GPU results are never written by hand: this script runs pytest, reads the counts from a JUnit XML report, and
rewrites the results file with the command, card, torch/CUDA versions, date and pass/fail counts (plus the
failing test ids, so a red run explains itself).

Usage (on a machine with an NVIDIA GPU, from the repository root):

    python tests/run_gpu.py                 # cuda-marked tests only
    python tests/run_gpu.py -- -x -k graph  # extra arguments go to pytest
"""

from __future__ import annotations

import datetime as dt
import os
import shlex
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "GPU_RESULTS.md"


def _counts(junit_xml: Path) -> tuple[dict[str, int], list[str]]:
    """Totals and the ids of failed/errored tests, read from a JUnit XML report."""
    root = ET.parse(junit_xml).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed: list[str] = []
    for suite in suites:
        for key in totals:
            totals[key] += int(suite.get(key, 0))
        for case in suite.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname')}::{case.get('name')}")
    totals["passed"] = totals["tests"] - totals["failures"] - totals["errors"] - totals["skipped"]
    return totals, failed


def main(argv: list[str]) -> int:
    if not torch.cuda.is_available():
        print("run_gpu.py: no CUDA GPU visible (torch.cuda.is_available() is False); nothing recorded.")
        return 2
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", *extra]
        started = dt.datetime.now(dt.timezone.utc)
        proc = subprocess.run([*cmd, f"--junitxml={junit}"], cwd=RESULTS.parent.parent, env=os.environ.copy())
        seconds = (dt.datetime.now(dt.timezone.utc) - started).total_seconds()
        if not junit.exists():
            print(f"run_gpu.py: pytest wrote no report (exit {proc.returncode}); nothing recorded.")
            return proc.returncode or 1
        totals, failed = _counts(junit)

    props = torch.cuda.get_device_properties(0)
    lines = [
        "# GPU test results",
        "",
        "Written by `python tests/run_gpu.py` (never by hand). Latest run:",
        "",
        "| field | value |",
        "|---|---|",
        f"| command | `{shlex.join(['python', '-m', 'pytest', '-m', 'cuda', '-q', *extra])}` |",
        f"| card | {props.name} ({props.total_memory / 2**30:.0f} GiB), {torch.cuda.device_count()} visible |",
        f"| torch | {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}) |",
        f"| date (UTC) | {started:%Y-%m-%d %H:%M} |",
        f"| duration | {seconds:.0f} s |",
        f"| passed | {totals['passed']} |",
        f"| failed | {totals['failures']} |",
        f"| errors | {totals['errors']} |",
        f"| skipped | {totals['skipped']} |",
        f"| pytest exit code | {proc.returncode} |",
        "",
    ]
    if failed:
        lines += ["Failed tests:", "", *[f"- `{name}`" for name in failed], ""]
    RESULTS.write_text("\n".join(lines))
    print(RESULTS.read_text())
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

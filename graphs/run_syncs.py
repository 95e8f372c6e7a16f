"""Counting host syncs while the commands run, with the detector that fits the device.

- CPU: the dispatch-level detector (`profiling.syncs.detect_host_syncs(mode="record")`). It flags the aten ops
  that would force a sync on a GPU even on CPU tensors, so the CPU default run proves the loop is sync-free.
- GPU: PyTorch's CUDA sync debug mode in "warn" (`profiling.syncs.sync_debug_warnings`), counting its sync
  warnings (every other warning is shown as usual). It
  costs nothing per op, unlike a Python dispatch hook (which would slow an eager pass of ~6,000 kernels by
  a few hundred milliseconds and does not mix with torch.compile). It misses `torch.cuda.synchronize()` and
  pageable non-blocking copies; `ltx2-graphs profile` (CUPTI) sees those.

Deliberate syncs inside `allow_host_sync` (e.g. reading the per-step CUDA events after the loop) are not counted.
On CPU with a torch.compile executor nothing is checked: dynamo refuses to run compiled frames under Python
dispatch modes, so the dispatch-level detector and compiled code cannot be active together.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch


@dataclass
class SyncCount:
    """Result of one checked block: `count` is None when nothing was checked."""

    detector: str  # "dispatch" | "cuda-sync-debug" | "off" | "not checked (compile)"
    count: int | None = None
    findings: list[str] = field(default_factory=list)

    def describe(self) -> str:
        if self.count is None:
            return "not checked" if self.detector == "off" else self.detector
        return f"{self.count} ({self.detector})"


@contextlib.contextmanager
def count_host_syncs(device: torch.device, *, enabled: bool = True, compiled: bool = False) -> Iterator[SyncCount]:
    """Count host syncs inside the block (see the module docstring for which detector runs where).

    `compiled`: the block runs torch.compile'd code (then nothing is checked on CPU).
    """
    if not enabled:
        yield SyncCount("off")
        return
    if compiled and device.type != "cuda":
        yield SyncCount("not checked (compile)")
        return
    from profiling.syncs import detect_host_syncs, sync_debug_warnings

    if device.type != "cuda":
        result = SyncCount("dispatch", 0)
        with detect_host_syncs(mode="record") as report:
            yield result
        result.count = len(report.findings)
        result.findings = [str(f) for f in report.findings]
        return
    result = SyncCount("cuda-sync-debug", 0)

    def on_sync(message: str, filename: str, lineno: int) -> None:
        result.findings.append(f"{filename}:{lineno}: {message.splitlines()[0]}")

    with sync_debug_warnings(on_sync):
        yield result
    result.count = len(result.findings)

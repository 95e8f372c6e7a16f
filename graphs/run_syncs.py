"""Counting host syncs while the commands run, with the detector that fits the device.

- CPU: the dispatch-level detector (`profiling.syncs.detect_host_syncs(mode="record")`). It flags the aten ops
  that would force a sync on a GPU even on CPU tensors, so the CPU default run proves the loop is sync-free.
- GPU: PyTorch's CUDA sync debug mode in "warn" (`profiling.syncs.cuda_sync_debug`), counting its warnings. It
  costs nothing per op, unlike a Python dispatch hook (which would slow an eager pass of ~12,000 kernels by
  a few hundred milliseconds and does not mix with torch.compile). It misses `torch.cuda.synchronize()` and
  pageable non-blocking copies; `ltx2-graphs profile` (CUPTI) sees those.

Deliberate syncs inside `allow_host_sync` (e.g. reading the per-step CUDA events after the loop) are not counted.
On CPU with a torch.compile executor nothing is checked: dynamo refuses to run compiled frames under Python
dispatch modes, so the dispatch-level detector and compiled code cannot be active together.
"""

from __future__ import annotations

import contextlib
import warnings
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


# What PyTorch's sync debug mode warns on each synchronizing call (c10/cuda/CUDAFunctions.cpp). Matching only
# this keeps out the one-time "Synchronization debug mode is a prototype feature" notice that torch emits the
# first time the mode is set in a process; counted as a sync, it made the first benchmark cell report one.
SYNC_DEBUG_WARNING = "called a synchronizing CUDA operation"


def is_sync_warning(message: str) -> bool:
    """Whether a warning caught under sync debug mode "warn" reports a host sync."""
    return SYNC_DEBUG_WARNING in message


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
    from profiling.syncs import cuda_sync_debug, detect_host_syncs

    if device.type != "cuda":
        result = SyncCount("dispatch", 0)
        with detect_host_syncs(mode="record") as report:
            yield result
        result.count = len(report.findings)
        result.findings = [str(f) for f in report.findings]
        return
    result = SyncCount("cuda-sync-debug", 0)
    with warnings.catch_warnings(record=True) as caught, cuda_sync_debug("warn"):
        warnings.simplefilter("always")
        yield result
    syncs = [w for w in caught if is_sync_warning(str(w.message))]
    result.count = len(syncs)
    result.findings = [f"{w.filename}:{w.lineno}: {str(w.message).splitlines()[0]}" for w in syncs]

"""Warm-up accounting of the executors the commands build (graph executors report per-warm-up deltas)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from graphs.run_executors import make_executor, warm_up


class CountingGraphExecutor:
    """Stands in for GraphExecutor on CPU: cumulative stats, one capture per new pass name."""

    def __init__(self):
        self.captured: set[str] = set()

    @property
    def stats(self):
        return SimpleNamespace(captures=len(self.captured), compiles=0, pool_bytes=1024 * len(self.captured))

    def warmup(self, specs, video, audio, *, conditioning=None):
        self.captured |= {s.name for s in specs}


def test_graph_warmups_report_their_own_captures():
    executor = CountingGraphExecutor()
    video, audio = torch.zeros(1, 2, 3), torch.zeros(1, 1, 3)
    specs = [SimpleNamespace(name=n) for n in ("cond", "neg", "modality")]
    first = warm_up(executor, "graphs", specs, None, video, audio, progress=lambda _: None)
    second = warm_up(executor, "graphs", specs[:1] + [SimpleNamespace(name="perturbed")], None, video, audio,
                     progress=lambda _: None)
    assert (first.captures, second.captures) == (3, 1)
    assert second.pool_bytes == 4 * 1024  # the shared pool, not a delta


def test_unknown_executor_name():
    with pytest.raises(ValueError, match="executor must be one of"):
        make_executor("turbo", torch.nn.Linear(1, 1))


def test_captures_inside_the_loop_count_as_syncs():
    from graphs.run_syncs import SyncCount
    from graphs.runner import _count_loop_captures

    executor = CountingGraphExecutor()
    executor.captured = {"cond"}
    syncs = SyncCount("cuda-sync-debug", 0)
    _count_loop_captures(executor, 0, syncs)
    assert syncs.count == 1 and "inside the loop" in syncs.findings[0]
    unchecked = SyncCount("off")
    _count_loop_captures(executor, 0, unchecked)
    assert unchecked.count is None

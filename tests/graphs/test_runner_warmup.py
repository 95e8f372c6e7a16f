"""Warm-up accounting of the executors the commands build (graph executors report per-warm-up deltas), and graphs
captured inside the loop (reported with or without the sync check)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from graphs.run_executors import make_executor, warm_up
from pipeline.executor import EagerExecutor


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
    assert _count_loop_captures(executor, 0, syncs) == 1
    assert syncs.count == 1 and "inside the loop" in syncs.findings[0]
    unchecked = SyncCount("off")
    assert _count_loop_captures(executor, 0, unchecked) == 1  # counted without the sync check too
    assert unchecked.count is None and unchecked.findings == []
    assert _count_loop_captures(executor, 1, SyncCount("off")) == 0
    assert _count_loop_captures(torch.nn.Linear(1, 1), None, SyncCount("off")) is None  # no stats: no captures


class CapturingInTheLoop(EagerExecutor):
    """Eager passes with a graph executor's stats: 3 captures at warm-up (its first call), then 1 more at its
    second call, the first of the loop (a cache miss)."""

    calls = 0

    @property
    def stats(self):
        return SimpleNamespace(captures=3 * (self.calls >= 1) + (self.calls >= 2), compiles=0, pool_bytes=0)

    def run(self, *args, **kwargs):
        self.calls += 1
        return super().run(*args, **kwargs)


def stage_row(out: str) -> list[str]:
    """The cells of the stage-1 row of the run table."""
    row = next(line for line in out.splitlines() if line.startswith("| stage1"))
    return [cell.strip() for cell in row.strip("|").split("|")]


@pytest.mark.parametrize("sync_check", ["on", "off"])
def test_loop_captures_are_reported_with_or_without_the_sync_check(capsys, monkeypatch, tmp_path, sync_check):
    import json

    from graphs import runner
    from graphs.cli import main

    monkeypatch.setattr(runner, "make_executor", lambda name, model, **_: CapturingInTheLoop(model))
    path = tmp_path / "run.json"
    code = main(["run", "--quiet", "--steps", "1", "--sync-check", sync_check, "--json", str(path)])
    out = capsys.readouterr()
    assert code == 0, out.err
    stage = json.loads(path.read_text())["stages"][0]
    assert stage["warmup"]["captures"] == 3 and stage["loop_captures"] == 1
    assert stage_row(out.out)[8] == "3+1"  # the captures column: warm-up + inside the loop
    assert "warning: stage1 captured 1 graph(s) inside the loop" in out.out
    assert (stage["syncs"]["count"] is None) == (sync_check == "off")


def test_no_loop_captures_no_warning(capsys):
    from graphs.cli import main

    assert main(["run", "--quiet", "--steps", "1", "--sync-check", "off"]) == 0
    out = capsys.readouterr().out
    assert "inside the loop" not in out and stage_row(out)[8] == "-"  # eager: nothing captured

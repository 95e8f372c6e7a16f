"""Timing helpers: statistics, warm-up excluded, argument checks; CUDA events on a GPU."""

from __future__ import annotations

import pytest
import torch

from profiling.syncs import detect_host_syncs
from profiling.timing import TimingStats, matmul_peak_tflops, time_cuda


def test_stats_from_samples():
    stats = TimingStats.from_samples([3.0, 1.0, 2.0, 10.0])
    assert (stats.median_ms, stats.min_ms, stats.max_ms) == (2.5, 1.0, 10.0)
    assert stats.samples == (3.0, 1.0, 2.0, 10.0)
    assert stats.spread_ms == 9.0 and stats.spread_pct == pytest.approx(360.0)
    assert str(stats).startswith("2.500 ms median (min 1.000 ms, max 10.000 ms")
    with pytest.raises(ValueError, match="no samples"):
        TimingStats.from_samples([])


@pytest.mark.parametrize("bad", [[float("nan"), 1.0, 2.0], [1.0, float("nan"), 2.0], [1.0, float("inf")], [-1.0]])
def test_stats_refuse_samples_that_are_not_times(bad):
    """A NaN made the median depend on where it sat (median 1.0, nan or 2.0 for the same three samples)."""
    with pytest.raises(ValueError, match="expected finite times >= 0 ms"):
        TimingStats.from_samples(bad)


def test_spread_of_a_zero_median():
    assert TimingStats.from_samples([0.0, 0.0, 5.0]).spread_pct == float("inf")  # no time resolved: not "0%"
    assert TimingStats.from_samples([0.0, 0.0]).spread_pct == 0.0


def test_warmup_calls_are_not_timed():
    calls = []
    stats = time_cuda(lambda: calls.append(1), warmup=2, repeats=5, device="cpu")
    assert len(calls) == 7 and len(stats.samples) == 5
    assert all(s >= 0.0 for s in stats.samples)


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="repeats"):
        time_cuda(lambda: None, repeats=0, device="cpu")
    with pytest.raises(ValueError, match="warmup"):
        time_cuda(lambda: None, warmup=-1, device="cpu")


def test_matmul_peak_on_cpu_is_positive():
    assert matmul_peak_tflops("cpu", torch.float32, size=64, warmup=1, repeats=3) > 0.0


@pytest.mark.cuda
def test_cuda_events_sync_only_at_the_boundaries():
    x = torch.randn(2048, 2048, device="cuda")
    with detect_host_syncs(mode="raise"):  # boundary syncs are inside allow_host_sync
        stats = time_cuda(lambda: x @ x, warmup=2, repeats=5)
    assert len(stats.samples) == 5 and stats.min_ms > 0.0


@pytest.mark.cuda
def test_matmul_peak_on_gpu_is_plausible():
    tflops = matmul_peak_tflops("cuda", torch.bfloat16, size=4096)
    assert 1.0 < tflops < 5000.0


def test_matmul_peak_counts_two_flops_per_multiply_add(monkeypatch):
    import profiling.timing

    monkeypatch.setattr(profiling.timing, "time_cuda", lambda fn, **kw: TimingStats.from_samples([2.0]))
    assert matmul_peak_tflops("cpu", size=1000) == pytest.approx(1.0)  # 2 * 1000^3 FLOP in 2 ms


def test_time_cuda_brackets_each_call_with_its_events_and_waits_for_the_last(monkeypatch):
    """The CUDA-event path on CPU with stand-in events (the GPU test checks only that nothing syncs in between).
    No sync after the warm-up: the first timed call queues behind it, so its sample holds no host lead-in."""
    import contextlib

    import profiling.timing

    log, clock = [], [0.0]

    class FakeEvent:
        def __init__(self, enable_timing):
            self.t = None

        def record(self, stream=None):
            self.t = clock[0]
            log.append(("record", self))

        def synchronize(self):
            log.append(("sync", self))

        def elapsed_time(self, end):
            return end.t - self.t

    def fn():
        clock[0] += 1.5  # each call takes 1.5 "ms" of device time
        log.append(("call", None))

    monkeypatch.setattr(profiling.timing.torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(profiling.timing.torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(profiling.timing.torch.cuda, "synchronize", lambda *a: log.append(("device sync", None)))
    stats = time_cuda(fn, warmup=1, repeats=3, device="cuda")
    assert stats.samples == (1.5, 1.5, 1.5)
    assert [k for k, _ in log] == ["call"] + ["record", "call", "record"] * 3 + ["sync"]
    assert log[-1][1] is log[-2][1]  # the host waits on the last end event, once

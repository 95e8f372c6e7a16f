"""SM clock / power sampling (`profiling.gpu_clocks`): summaries, the sampler thread with a fake reader, and on a
GPU the real NVML reader. (The benchmark's clock table: tests/graphs/test_bench.py.)"""

from __future__ import annotations

import itertools
import time

import pytest
import torch

from profiling.gpu_clocks import ClockSample, ClockSampler, ClockSummary, nvml_sampler


def test_summary_of_samples():
    samples = [ClockSample(0.0, 1980, 300.0, 0), ClockSample(0.1, 1500, 690.0, 0x4),
               ClockSample(0.2, 1600, 700.0, 0x4 | 0x20), ClockSample(0.3, 1550, 695.0, 0x80)]
    s = ClockSummary.of(samples)
    assert (s.samples, s.sm_mhz_median, s.sm_mhz_min, s.power_w_median) == (4, 1575, 1500, 692.5)
    assert s.power_capped_pct == 75.0 and s.thermal_pct == 25.0
    with pytest.raises(ValueError, match="no samples"):
        ClockSummary.of([])


def test_sampler_keeps_timestamped_samples_and_summarises_a_window():
    counter = itertools.count()

    def read():
        return ClockSample(time.monotonic(), 1000.0 + next(counter), 100.0, 0)

    with ClockSampler(read, interval_s=0.005) as sampler:
        time.sleep(0.05)
        middle = time.monotonic()
        time.sleep(0.05)
        whole, late = sampler.summary_since(0.0), sampler.summary_since(middle)
    assert whole.samples > late.samples >= 2
    assert late.sm_mhz_min > whole.sm_mhz_min  # the window left the early samples out
    assert sampler.summary_since(time.monotonic() + 10) is None and sampler.error is None


def test_summary_within_windows_leaves_out_the_time_between_them():
    samples = iter([ClockSample(t, mhz, 500.0, 0) for t, mhz in ((1.0, 1500), (2.0, 1980), (3.0, 1600), (4.0, 1980))])
    sampler = ClockSampler(lambda: next(samples), interval_s=0.001)
    with sampler:
        time.sleep(0.05)  # the reader runs dry (StopIteration) and sampling stops with an error
    within = sampler.summary_within([(0.5, 1.5), (2.5, 3.5)])
    assert (within.samples, within.sm_mhz_median, within.sm_mhz_min) == (2, 1550, 1500)
    assert sampler.summary_within([(5.0, 6.0)]) is None and "StopIteration" in sampler.error


def test_sampler_stops_on_a_reader_error_and_says_why():
    def read():
        raise RuntimeError("nvmlDeviceGetClockInfo failed with NVML error 999")

    with ClockSampler(read, interval_s=0.005) as sampler:
        time.sleep(0.02)
    assert "NVML error 999" in sampler.error and sampler.summary_since(0.0) is None
    with pytest.raises(ValueError, match="interval_s"):
        ClockSampler(read, interval_s=0)


def test_no_sampler_without_a_gpu():
    assert nvml_sampler(torch.device("cpu")) == (None, None, "no GPU")


@pytest.mark.cuda
def test_nvml_reads_the_gpu_clock_and_power():
    sampler, limits, why = nvml_sampler(torch.device("cuda"))
    assert why is None and sampler is not None, why
    assert limits.sm_max_mhz > 500 and limits.power_limit_w > 50
    a = torch.randn(4096, 4096, device="cuda")
    with sampler:
        started = time.monotonic()
        for _ in range(50):
            a = torch.tanh(a @ a)
        torch.cuda.synchronize()
        time.sleep(0.15)
        summary = sampler.summary_since(started)
    assert sampler.error is None and summary is not None and summary.samples >= 2
    assert 0 < summary.sm_mhz_min <= summary.sm_mhz_median <= limits.sm_max_mhz
    assert summary.power_w_median > 0

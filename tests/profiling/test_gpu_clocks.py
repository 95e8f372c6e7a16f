"""SM clock / power sampling (`profiling.gpu_clocks`): summaries, window selection with scripted readings, the
sampler thread with a fake reader, and on a GPU the real NVML reader. (The benchmark's clock table:
tests/graphs/test_bench.py.)"""

from __future__ import annotations

import time

import pytest
import torch

from profiling.gpu_clocks import ClockSample, ClockSampler, ClockSummary, nvml_sampler


def scripted(*readings: tuple[float, float]):
    """A reader returning ClockSamples at the given (time, MHz), then failing."""
    samples = iter([ClockSample(t, mhz, 500.0, 0) for t, mhz in readings])
    return lambda: next(samples)


def wait_for(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the sampler thread did not get there in time"
        time.sleep(0.01)


def test_summary_of_samples():
    samples = [ClockSample(0.0, 1980, 300.0, 0), ClockSample(0.1, 1500, 690.0, 0x4),
               ClockSample(0.2, 1600, 700.0, 0x4 | 0x20), ClockSample(0.3, 1550, None, 0x80)]
    s = ClockSummary.of(samples)
    assert (s.samples, s.sm_mhz_median, s.sm_mhz_min, s.power_w_median) == (4, 1575, 1500, 690.0)
    assert s.power_capped_pct == 75.0 and s.thermal_pct == 25.0
    assert s.describe() == ("SM clock 1575 MHz median (lowest 1500), power-capped in 75%, thermal slowdown in 25% "
                            "of 4 samples")
    assert ClockSummary.of([ClockSample(0.0, 1500, None, 0)]).power_w_median is None  # board without power
    with pytest.raises(ValueError, match="no samples"):
        ClockSummary.of([])


def test_a_window_has_the_sample_before_it_and_a_reading_at_its_end():
    """Even a window shorter than the sampling interval gets readings from both of its ends."""
    sampler = ClockSampler(scripted((1.0, 1500), (2.0, 1600), (3.0, 1700)))  # not started: no thread
    first = sampler.summary_since(0.5)  # reads (1.0, 1500) at the window's end
    assert (first.samples, first.sm_mhz_median) == (1, 1500)
    second = sampler.summary_since(1.5)  # (1.0) before it, (2.0) read at its end
    assert (second.samples, second.sm_mhz_min, second.sm_mhz_median) == (2, 1500, 1550)
    third = sampler.summary_since(2.5)  # only the latest sample before it: (2.0), then (3.0)
    assert (third.samples, third.sm_mhz_min, third.sm_mhz_median) == (2, 1600, 1650)


def test_summary_within_windows_leaves_out_the_time_between_them():
    sampler = ClockSampler(scripted((1.0, 1500), (2.0, 1980), (3.0, 1600), (4.0, 1980)), interval_s=0.001)
    with sampler:
        wait_for(lambda: sampler.error is not None)  # the script runs dry: StopIteration ends sampling
    within = sampler.summary_within([(0.5, 1.5), (2.5, 3.5)])
    assert (within.samples, within.sm_mhz_median, within.sm_mhz_min) == (2, 1550, 1500)
    assert sampler.summary_within([(5.0, 6.0)]) is None and "StopIteration" in sampler.error


def test_the_thread_keeps_sampling_while_open():
    sampler = ClockSampler(lambda: ClockSample(time.monotonic(), 1700.0, 400.0, 0), interval_s=0.005)

    def samples_so_far() -> int:
        summary = sampler.summary_within([(0.0, float("inf"))])
        return 0 if summary is None else summary.samples

    with sampler:
        wait_for(lambda: samples_so_far() >= 3)
    assert sampler.error is None
    with pytest.raises(RuntimeError, match="samples once"):
        sampler.__enter__()
    with pytest.raises(ValueError, match="interval_s"):
        ClockSampler(sampler._read, interval_s=0)


def test_a_reader_error_stops_sampling_and_says_why():
    def read():
        raise RuntimeError("nvmlDeviceGetClockInfo failed: Unknown Error (NVML error 999)")

    with ClockSampler(read, interval_s=0.005) as sampler:
        wait_for(lambda: sampler.error is not None)
    assert "NVML error 999" in sampler.error
    assert sampler.summary_since(0.0) is None and sampler.summary_within([(0.0, float("inf"))]) is None


def test_after_a_failure_a_window_gets_no_old_sample():
    """Once reading failed, a later window has no clocks: the last good sample (maybe minutes old) is not its."""
    sampler = ClockSampler(scripted((1.0, 1500)))  # the second read raises StopIteration
    assert sampler.summary_since(0.5).sm_mhz_median == 1500
    assert sampler.summary_since(2.0) is None and "StopIteration" in sampler.error


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


class FakeNvml:
    """Stands in for libnvidia-ml.so.1: each function writes its answer through the ctypes pointer it is given,
    as the C library does, and returns an NVML status code."""

    def __init__(self, power_code: int = 0, limit_code: int = 0):
        self.power_code = power_code  # what nvmlDeviceGetPowerUsage returns (3: not supported)
        self.limit_code = limit_code  # what nvmlDeviceGetEnforcedPowerLimit returns
        self.calls: list[str] = []
        self.nvmlErrorString = lambda code: {3: b"Not Supported", 999: b"Unknown Error"}[code]

    def _answer(self, name, value, code=0):
        def call(*args):
            self.calls.append(name)
            if code == 0 and value is not None:
                args[-1]._obj.value = value  # ctypes.byref(x)._obj is x
            return code
        return call

    def __getattr__(self, name):
        answers = {"nvmlInit_v2": (None,), "nvmlDeviceGetHandleByUUID": (1234,),
                   "nvmlDeviceGetCurrentClocksEventReasons": (0x4,), "nvmlDeviceGetClockInfo": (1575,),
                   "nvmlDeviceGetMaxClockInfo": (1980,),
                   "nvmlDeviceGetEnforcedPowerLimit": (700000, self.limit_code),
                   "nvmlDeviceGetPowerUsage": (691500, self.power_code)}
        if name not in answers:
            raise AttributeError(name)  # as ctypes does for a symbol the library lacks
        return self._answer(name, *answers[name])


def fake_nvml_sampler(monkeypatch, lib: FakeNvml):
    import ctypes
    from types import SimpleNamespace

    monkeypatch.setattr(ctypes, "CDLL", lambda name: lib)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(uuid="6f2b-77"))
    return nvml_sampler(torch.device("cuda"))


def test_nvml_reader_speaks_the_c_protocol(monkeypatch):
    lib = FakeNvml()
    sampler, limits, why = fake_nvml_sampler(monkeypatch, lib)
    assert why is None and (limits.sm_max_mhz, limits.power_limit_w) == (1980.0, 700.0)
    sample = sampler._read()
    assert (sample.sm_mhz, sample.power_w, sample.reasons) == (1575.0, 691.5, 0x4)
    assert lib.calls[:2] == ["nvmlInit_v2", "nvmlDeviceGetHandleByUUID"]


def test_a_board_without_power_readings_still_gives_clocks(monkeypatch):
    sampler, limits, why = fake_nvml_sampler(monkeypatch, FakeNvml(power_code=3, limit_code=3))
    assert why is None and sampler._read().power_w is None
    assert (limits.sm_max_mhz, limits.power_limit_w) == (1980.0, None)


def test_nvml_failures_read_plainly(monkeypatch):
    import ctypes

    sampler, _, _ = fake_nvml_sampler(monkeypatch, FakeNvml(power_code=999))
    with pytest.raises(RuntimeError, match=r"nvmlDeviceGetPowerUsage failed: Unknown Error \(NVML error 999\)"):
        sampler._read()  # in a running sampler this ends sampling and becomes `sampler.error`

    def missing(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", missing)
    assert nvml_sampler(torch.device("cuda"))[2].startswith("SM clock and power not sampled (RuntimeError: NVML")

"""SM clock and board power while timed work runs: says whether the card was power-capped.

Why this exists: in a back-to-back loop the LTX-2.3 passes reach the board power limit within about a second
(an H200 drew 690 W of its 700 W). The driver then lowers the SM clock, to 1,470-1,680 MHz instead of 1,980,
and every kernel slows with it. A 1536-token cond graph took 75-79 ms when replayed after 0.5 s idle and 86 ms
back to back (profiling/PERF_LOG.md, eighth session). Such a card is power-bound: its pass times follow its
power limit and temperature as much as the code, so the benchmark prints the clocks next to its rows.

How: a daemon thread reads NVML (the driver's management library, `libnvidia-ml.so.1`, through ctypes: no
extra package) every `interval_s` and keeps timestamped samples; `summary_since(t)` summarises the samples of
one timed window, `summary_within(windows)` those of several short ones (the `--floor` kernels' replays). NVML calls are not CUDA calls, so the sampler neither syncs the host nor adds work to the
device. Without a driver library (CPU machines) there is no sampler and the benchmark says why. The SM clock and
the event reasons are instantaneous; the power reading is the driver's average over the last second on Ampere
and newer cards (GA100 excepted), so a window shorter than that understates a rising draw.
"""

from __future__ import annotations

import ctypes
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

_NVML_CLOCK_SM = 1
# nvmlClocksEventReasons bits (nvml.h): what is holding the clocks below their maximum.
POWER_CAP_REASONS = 0x4 | 0x80  # SW power cap, HW power brake
THERMAL_REASONS = 0x20 | 0x40  # SW thermal slowdown, HW thermal slowdown


@dataclass(frozen=True)
class ClockSample:
    t: float  # time.monotonic() seconds when read
    sm_mhz: float
    power_w: float
    reasons: int  # clocks event reasons bitmask


@dataclass(frozen=True)
class CardLimits:
    sm_max_mhz: float
    power_limit_w: float


@dataclass(frozen=True)
class ClockSummary:
    """The samples of one timed window: median and lowest SM clock, median power, and the share of samples in
    which the driver reported a power cap or a thermal slowdown."""

    samples: int
    sm_mhz_median: float
    sm_mhz_min: float
    power_w_median: float
    power_capped_pct: float
    thermal_pct: float

    @classmethod
    def of(cls, samples: list[ClockSample]) -> ClockSummary:
        if not samples:
            raise ValueError("ClockSummary.of: got no samples, expected at least one")
        n = len(samples)
        return cls(n, statistics.median(s.sm_mhz for s in samples), min(s.sm_mhz for s in samples),
                   statistics.median(s.power_w for s in samples),
                   100.0 * sum(1 for s in samples if s.reasons & POWER_CAP_REASONS) / n,
                   100.0 * sum(1 for s in samples if s.reasons & THERMAL_REASONS) / n)

    def describe(self) -> str:
        return (f"SM clock {self.sm_mhz_median:.0f} MHz median (lowest {self.sm_mhz_min:.0f}), power-capped in "
                f"{self.power_capped_pct:.0f}% of {self.samples} samples")


class ClockSampler:
    """Calls `read()` every `interval_s` on a daemon thread while open (`with ClockSampler(read): ...`)."""

    def __init__(self, read: Callable[[], ClockSample], interval_s: float = 0.05):
        if interval_s <= 0:
            raise ValueError(f"ClockSampler(interval_s=...): got {interval_s}, expected > 0")
        self._read, self._interval = read, interval_s
        self._samples: list[ClockSample] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: str | None = None  # why sampling stopped early, if it did

    def __enter__(self) -> ClockSampler:
        self._thread = threading.Thread(target=self._run, name="gpu-clock-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                sample = self._read()
            except Exception as e:  # a driver error ends sampling; the rows then carry no clocks
                self.error = f"{type(e).__name__}: {e}"
                return
            with self._lock:
                self._samples.append(sample)
            self._stop.wait(self._interval)

    def summary_since(self, start: float, end: float | None = None) -> ClockSummary | None:
        """Summary of the samples read in [start - interval, end] (time.monotonic() seconds; end: now): the
        sample read just before the window describes its start, so a window shorter than the interval still
        has one. None if there is none."""
        end = time.monotonic() if end is None else end
        with self._lock:
            window = [s for s in self._samples if start - self._interval <= s.t <= end]
        return ClockSummary.of(window) if window else None

    def summary_within(self, windows: list[tuple[float, float]]) -> ClockSummary | None:
        """Summary of the samples read inside any of `windows` ((start, end) time.monotonic() seconds), None if
        none: the clock while short timed bursts ran, without the set-up between them."""
        with self._lock:
            inside = [s for s in self._samples if any(start <= s.t <= end for start, end in windows)]
        return ClockSummary.of(inside) if inside else None


class _Nvml:
    """The five NVML queries the sampler needs, for the GPU behind one torch CUDA device."""

    def __init__(self, device: torch.device):
        try:
            self._lib = ctypes.CDLL("libnvidia-ml.so.1")
        except OSError as e:
            raise RuntimeError(f"NVML (libnvidia-ml.so.1) not found: {e}") from None
        self._call("nvmlInit_v2")
        uuid = str(torch.cuda.get_device_properties(device).uuid)  # NVML names GPUs "GPU-<uuid>"
        uuid = uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
        self._handle = ctypes.c_void_p()
        self._call("nvmlDeviceGetHandleByUUID", uuid.encode(), ctypes.byref(self._handle))
        names = ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons")
        self._reasons_fn = next(n for n in names if hasattr(self._lib, n))  # the second is the pre-r535 name

    def _call(self, name: str, *args) -> None:
        code = getattr(self._lib, name)(*args)
        if code != 0:
            raise RuntimeError(f"{name} failed with NVML error {code}")

    def _uint(self, name: str, *args) -> int:
        out = ctypes.c_uint()
        self._call(name, self._handle, *args, ctypes.byref(out))
        return out.value

    def limits(self) -> CardLimits:
        return CardLimits(self._uint("nvmlDeviceGetMaxClockInfo", _NVML_CLOCK_SM),
                          self._uint("nvmlDeviceGetEnforcedPowerLimit") / 1000.0)

    def read(self) -> ClockSample:
        reasons = ctypes.c_ulonglong()
        self._call(self._reasons_fn, self._handle, ctypes.byref(reasons))
        return ClockSample(time.monotonic(), float(self._uint("nvmlDeviceGetClockInfo", _NVML_CLOCK_SM)),
                           self._uint("nvmlDeviceGetPowerUsage") / 1000.0, reasons.value)


def nvml_sampler(device: torch.device, interval_s: float = 0.05) -> tuple[ClockSampler | None, CardLimits | None,
                                                                         str | None]:
    """(sampler, the card's max SM clock and power limit, None) for a CUDA device, or (None, None, why not)."""
    if device.type != "cuda":
        return None, None, "no GPU"
    try:
        nvml = _Nvml(device)
        return ClockSampler(nvml.read, interval_s), nvml.limits(), None
    except (RuntimeError, StopIteration, AttributeError) as e:
        return None, None, f"SM clock and power not sampled ({type(e).__name__}: {e})"

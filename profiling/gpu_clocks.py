"""SM clock and board power while timed work runs: says whether the card was power-capped.

Why this exists: in a back-to-back loop the LTX-2.3 passes reach the board power limit within about a second
(an H200 drew 690 W of its 700 W). The driver then lowers the SM clock, to 1,470-1,680 MHz instead of 1,980,
and every kernel slows with it. A 1536-token cond graph took 75-79 ms when replayed after 0.5 s idle and 86 ms
back to back (profiling/PERF_LOG.md, eighth session). Such a card is power-bound: its pass times follow its
power limit and temperature as much as the code, so the benchmark prints the clocks next to its rows.

How: a daemon thread reads NVML (the driver's management library, `libnvidia-ml.so.1`, through ctypes: no
extra package) about every `interval_s` and keeps timestamped samples. `summary_since(t)` summarises one timed
window: the last sample before it, the samples inside it and one reading taken at its end, so even a window
shorter than the interval (or one in which the thread waited for the GIL) has readings from both ends.
`summary_within(windows)` summarises several short windows without the time between them (the `--floor`
kernels' replays). NVML calls are not CUDA calls: the sampler neither syncs the host nor adds device work.

Readings: the SM clock and the clock event reasons are instantaneous; power is the driver's average over the
last second on Ampere and newer cards (GA100 excepted), so a window shorter than that understates a rising
draw, and it is None where the board does not report it. Without NVML (CPU machines) there is no sampler and the
benchmark says why. MIG instances report no clocks or power of their own and are not supported.
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
_NVML_ERROR_NOT_SUPPORTED = 3
# nvmlClocksEventReasons bits (nvml.h): what is holding the clocks below their maximum. HW slowdown (0x8) can
# come from either power or heat and is counted in neither.
POWER_CAP_REASONS = 0x4 | 0x80  # SW power cap, HW power brake
THERMAL_REASONS = 0x20 | 0x40  # SW thermal slowdown, HW thermal slowdown


@dataclass(frozen=True)
class ClockSample:
    t: float  # time.monotonic() seconds when read
    sm_mhz: float
    power_w: float | None  # None where the board does not report power
    reasons: int  # clocks event reasons bitmask


@dataclass(frozen=True)
class CardLimits:
    sm_max_mhz: float
    power_limit_w: float | None  # None on boards that do not report power


@dataclass(frozen=True)
class ClockSummary:
    """The samples of one timed window: median and lowest SM clock, median power, and the share of samples in
    which the driver reported a power cap or a thermal slowdown."""

    samples: int
    sm_mhz_median: float
    sm_mhz_min: float
    power_w_median: float | None
    power_capped_pct: float
    thermal_pct: float

    @classmethod
    def of(cls, samples: list[ClockSample]) -> ClockSummary:
        if not samples:
            raise ValueError("ClockSummary.of: got no samples, expected at least one")
        n = len(samples)
        powers = [s.power_w for s in samples if s.power_w is not None]
        return cls(n, statistics.median(s.sm_mhz for s in samples), min(s.sm_mhz for s in samples),
                   statistics.median(powers) if powers else None,
                   100.0 * sum(1 for s in samples if s.reasons & POWER_CAP_REASONS) / n,
                   100.0 * sum(1 for s in samples if s.reasons & THERMAL_REASONS) / n)

    def describe(self) -> str:
        thermal = f", thermal slowdown in {self.thermal_pct:.0f}%" if self.thermal_pct else ""
        return (f"SM clock {self.sm_mhz_median:.0f} MHz median (lowest {self.sm_mhz_min:.0f}), power-capped in "
                f"{self.power_capped_pct:.0f}%{thermal} of {self.samples} samples")


class ClockSampler:
    """Calls `read()` about every `interval_s` on a daemon thread while open (`with ClockSampler(read): ...`).
    One use per sampler."""

    def __init__(self, read: Callable[[], ClockSample], interval_s: float = 0.05):
        if interval_s <= 0:
            raise ValueError(f"ClockSampler(interval_s=...): got {interval_s}, expected > 0")
        self._read, self.interval_s = read, interval_s
        self._samples: list[ClockSample] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: str | None = None  # why sampling stopped early, if it did

    def __enter__(self) -> ClockSampler:
        if self._thread is not None:
            raise RuntimeError("a ClockSampler samples once: make a new one for another `with` block")
        self._thread = threading.Thread(target=self._run, name="gpu-clock-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)
        if self._thread.is_alive() and self.error is None:  # a driver call hung; the daemon thread is left behind
            self.error = "the sampler thread did not stop within 5 s"

    def _take(self) -> bool:
        """One reading into the samples; False (and `error` set) if the reader failed."""
        try:
            sample = self._read()
        except Exception as e:  # a driver error ends sampling; later windows carry no clocks
            self.error = f"{type(e).__name__}: {e}"
            self._stop.set()  # also when the failing read was the caller's (`summary_since`), not the thread's
            return False
        with self._lock:
            self._samples.append(sample)
        return True

    def _run(self) -> None:
        while not self._stop.is_set() and self._take():
            self._stop.wait(self.interval_s)

    def read_now(self) -> None:
        """One reading now, besides the thread's (nothing after a failure): for windows shorter than the
        interval, whose end would otherwise often hold no sample."""
        if self.error is None:
            self._take()

    def summary_since(self, start: float) -> ClockSummary | None:
        """Summary of one window from `start` (time.monotonic() seconds) to now: the last sample before it, the
        samples inside it and one reading taken now. None if there is none (sampling failed)."""
        self.read_now()
        with self._lock:
            before = [s for s in self._samples if s.t < start]
            window = [s for s in self._samples if s.t >= start]
        if before and (window or self.error is None):  # after a failure, an old sample would pose as this window's
            window.append(max(before, key=lambda s: s.t))
        return ClockSummary.of(window) if window else None

    def summary_within(self, windows: list[tuple[float, float]]) -> ClockSummary | None:
        """Summary of the samples read inside any of `windows` ((start, end) time.monotonic() seconds), None if
        none: the clock while short timed bursts ran, without the set-up between them."""
        with self._lock:
            inside = [s for s in self._samples if any(start <= s.t <= end for start, end in windows)]
        return ClockSummary.of(inside) if inside else None


class _Nvml:
    """The NVML queries the sampler needs, for the GPU behind one torch CUDA device. NVML stays initialised for
    the life of the process (no nvmlShutdown): a command samples once."""

    def __init__(self, device: torch.device):
        try:
            self._lib = ctypes.CDLL("libnvidia-ml.so.1")
        except OSError as e:
            raise RuntimeError(f"NVML (libnvidia-ml.so.1) not found: {e}") from None
        self._lib.nvmlErrorString.restype = ctypes.c_char_p
        self._call("nvmlInit_v2")
        uuid = f"GPU-{torch.cuda.get_device_properties(device).uuid}"  # torch prints the bare UUID
        self._handle = ctypes.c_void_p()
        self._call("nvmlDeviceGetHandleByUUID", uuid.encode(), ctypes.byref(self._handle))
        names = ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons")
        self._reasons_fn = next((n for n in names if hasattr(self._lib, n)), None)  # the second: pre-r535 name
        if self._reasons_fn is None:
            raise RuntimeError(f"this NVML has neither {' nor '.join(names)}")

    def _code(self, name: str, *args) -> int:
        return getattr(self._lib, name)(*args)

    def _call(self, name: str, *args) -> None:
        code = self._code(name, *args)
        if code != 0:
            raise self._failure(name, code)

    def _failure(self, name: str, code: int) -> RuntimeError:
        return RuntimeError(f"{name} failed: {self._lib.nvmlErrorString(code).decode()} (NVML error {code})")

    def _uint(self, name: str, *args) -> int:
        out = ctypes.c_uint()
        self._call(name, self._handle, *args, ctypes.byref(out))
        return out.value

    def _power_w(self) -> float | None:
        out = ctypes.c_uint()
        code = self._code("nvmlDeviceGetPowerUsage", self._handle, ctypes.byref(out))
        if code == _NVML_ERROR_NOT_SUPPORTED:
            return None
        if code != 0:
            raise self._failure("nvmlDeviceGetPowerUsage", code)
        return out.value / 1000.0  # mW

    def limits(self) -> CardLimits:
        limit = ctypes.c_uint()
        code = self._code("nvmlDeviceGetEnforcedPowerLimit", self._handle, ctypes.byref(limit))
        if code not in (0, _NVML_ERROR_NOT_SUPPORTED):
            raise self._failure("nvmlDeviceGetEnforcedPowerLimit", code)
        return CardLimits(float(self._uint("nvmlDeviceGetMaxClockInfo", _NVML_CLOCK_SM)),
                          limit.value / 1000.0 if code == 0 else None)  # mW; boards without power readings

    def read(self) -> ClockSample:
        reasons = ctypes.c_ulonglong()
        self._call(self._reasons_fn, self._handle, ctypes.byref(reasons))
        return ClockSample(time.monotonic(), float(self._uint("nvmlDeviceGetClockInfo", _NVML_CLOCK_SM)),
                           self._power_w(), reasons.value)


def nvml_sampler(device: torch.device, interval_s: float = 0.05) -> tuple[ClockSampler | None, CardLimits | None,
                                                                         str | None]:
    """(sampler, the card's max SM clock and power limit, None) for a CUDA device, or (None, None, why not).
    Any failure means no clocks, never a failed benchmark: they are diagnostics."""
    if device.type != "cuda":
        return None, None, "no GPU"
    try:
        nvml = _Nvml(device)
        return ClockSampler(nvml.read, interval_s), nvml.limits(), None
    except Exception as e:
        return None, None, f"SM clock and power not sampled ({type(e).__name__}: {e})"

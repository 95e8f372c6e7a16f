"""Timing helpers: median-of-N with warm-up excluded, CUDA events on a GPU, and a measured matmul peak.

Conventions (the project's timing rules): warm-up runs are excluded and reported separately by the
caller; the host synchronises only at measurement boundaries (once after warm-up, once after the last
repeat), never between repeats, so the timed region itself stays asynchronous; every number carries
its unit.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from profiling.syncs import allow_host_sync


@dataclass(frozen=True)
class TimingStats:
    """Per-call times of the timed repeats, in milliseconds."""

    median_ms: float
    min_ms: float
    max_ms: float
    samples: tuple[float, ...]

    @classmethod
    def from_samples(cls, samples_ms) -> TimingStats:
        samples = tuple(float(s) for s in samples_ms)
        if not samples:
            raise ValueError("TimingStats.from_samples: got no samples, expected at least one")
        bad = [s for s in samples if not 0.0 <= s < math.inf]  # a NaN made the median depend on sample order
        if bad:
            raise ValueError(f"TimingStats.from_samples: got {bad[0]!r}; expected finite times >= 0 ms")
        return cls(statistics.median(samples), min(samples), max(samples), samples)

    @property
    def spread_ms(self) -> float:
        return self.max_ms - self.min_ms

    @property
    def spread_pct(self) -> float:
        """(max - min) / median, in percent: how much to trust the median (inf when the median is 0 ms and the
        samples differ: no time was resolved)."""
        if self.median_ms:
            return 100.0 * self.spread_ms / self.median_ms
        return 0.0 if self.spread_ms == 0 else math.inf

    def __str__(self) -> str:
        return (f"{self.median_ms:.3f} ms median (min {self.min_ms:.3f} ms, max {self.max_ms:.3f} ms, "
                f"spread {self.spread_pct:.1f}%, n={len(self.samples)})")


def _resolve(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def time_cuda(fn: Callable[[], object], *, warmup: int = 3, repeats: int = 10, device=None) -> TimingStats:
    """Time `fn()` `repeats` times after `warmup` untimed calls.

    On a GPU (the default when CUDA is available) each call is bracketed by CUDA events on the current
    stream, so the numbers are device time of the work `fn` enqueues there; the host synchronises once, at
    the end. Not after warm-up: the first timed call is enqueued while the warm-up still runs, so, like the
    others, it holds no host time before its first kernel (for a graph executor's replay, its staleness
    checks: ~7 ms at `ltx2.3`), unless the host is what bounds the calls. With `warmup=0` the first sample
    holds that host time. On CPU each call is timed with ``time.perf_counter``.
    """
    if warmup < 0:
        raise ValueError(f"time_cuda(warmup=...): got {warmup}, expected >= 0")
    if repeats < 1:
        raise ValueError(f"time_cuda(repeats=...): got {repeats}, expected >= 1")
    device = _resolve(device)
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return TimingStats.from_samples(samples)
    with torch.cuda.device(device):
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for start, end in zip(starts, ends):
            start.record()
            fn()
            end.record()
        with allow_host_sync("timing boundary"):
            ends[-1].synchronize()
        return TimingStats.from_samples(s.elapsed_time(e) for s, e in zip(starts, ends))


def matmul_peak_tflops(device, dtype: torch.dtype = torch.bfloat16, *, size: int | None = None,
                       warmup: int = 3, repeats: int = 10) -> float:
    """Measured dense matmul throughput in TFLOP/s (2*n^3 flops per n x n matmul, median time).

    A measured peak, not the datasheet one, is the honest denominator for "fraction of peak" figures.
    Default size: 8192 on a GPU (large enough to saturate tensor cores), 256 on CPU (a quick sanity value).
    """
    device = _resolve(device)
    n = size or (8192 if device.type == "cuda" else 256)
    if n < 1:
        raise ValueError(f"matmul_peak_tflops(size=...): got {n}, expected >= 1")
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)  # [n, n]
    b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)  # [n, n]
    out = torch.empty(n, n, device=device, dtype=dtype)
    stats = time_cuda(lambda: torch.mm(a, b, out=out), warmup=warmup, repeats=repeats, device=device)
    return 2 * n**3 / (stats.median_ms * 1e-3) / 1e12

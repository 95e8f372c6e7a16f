"""Kernel count and GPU busy % of a block of work, with the best tool available.

GPU busy % = time at least one kernel was running / wall time of the block, where the block ends with one
synchronisation (inside `allow_host_sync`) so work the host enqueued ahead is inside the window. Sources, in
order of preference:

- "cupti": the in-process CUPTI profiler (`profiling.cupti`, needs `ltx2-graphs[cupti]`); kernels of a graph
  replay are counted per kernel node, attributed to the region that launched them.
- "torch.profiler": kineto's CUDA kernel events when cupti-python is missing. Same definitions; torch's
  profiler is itself a CUPTI client, so it never runs at the same time as the CUPTI profiler.
- "aten ops" (CPU): no kernels exist; the count is the number of aten ops dispatched, a cheap stand-in
  that tracks launch count (each eager GPU op is about one kernel launch); GPU busy is not measured.
- "not counted (compile)" (CPU, compiled code): dynamo does not run compiled frames under a Python dispatch
  mode (the op counter is one), so compiled work is not counted on CPU rather than made to fail.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from profiling.attribution import merged_intervals
from profiling.ranges import region
from profiling.syncs import allow_host_sync

MEASURED_RANGE = "measured"


KERNEL_CLASSES = ("gemm", "attention", "other")
# Inductor names its pointwise/reduction kernels after every op they fuse ("triton_poi_fused__scaled_dot_
# product_cudnn_attention_mul_..." only lays out SDPA's inputs): those are "other" whatever they mention.
_FUSED_ELEMENTWISE = ("triton_poi", "triton_per", "triton_red")
_GEMM_MARKS = ("gemm", "gemv", "nvjet", "cutlass", "xmma", "cublas", "triton_mm", "addmm", "_mm_")
_ATTENTION_MARKS = ("flash", "fmha", "sdpa", "attention", "attn")


def kernel_class(name: str) -> str:
    """"gemm", "attention" or "other" (elementwise, norms, copies...), from a kernel's name.

    Why: the pass's floor is its GEMMs and attention at their best rates; everything else is overhead to fuse
    away, so the benchmark splits kernel time into these three (profiling/PERF_LOG.md uses the split).
    """
    lowered = name.lower()
    if lowered.startswith(_FUSED_ELEMENTWISE):
        return "other"
    if any(mark in lowered for mark in _ATTENTION_MARKS):
        return "attention"
    if any(mark in lowered for mark in _GEMM_MARKS):
        return "gemm"
    return "other"


def kernel_ms_by_class(kernels, start_ns: int, end_ns: int) -> dict[str, float]:
    """Kernel execution time (ms) per class, each kernel clipped to the window [start_ns, end_ns].

    Summed kernel by kernel: where kernels overlap (the audio chain on its side stream), the classes can add up
    to more than the window's wall time."""
    totals = dict.fromkeys(KERNEL_CLASSES, 0.0)
    for k in kernels:
        overlap = min(k.end, end_ns) - max(k.start, start_ns)
        if overlap > 0:
            totals[kernel_class(k.name)] += overlap / 1e6
    return totals


def kernel_counts_by_name(kernels, start_ns: int, end_ns: int) -> dict[str, int]:
    """Kernels per name that started inside the window [start_ns, end_ns), most frequent first.

    Why: when a pass's kernel count moves, the names say which kernels came or went (a fusion lost, a GEMM that
    now runs split-K with a reduction kernel of its own), where the class counts only say how many."""
    return dict(Counter(k.name for k in kernels if start_ns <= k.start < end_ns).most_common())


def kernel_counts_by_class(counts_by_name: dict[str, int]) -> dict[str, int]:
    """`kernel_counts_by_name` summed per `kernel_class`.

    Why: GEMMs and attention calls are fixed by the model (18 GEMMs and 6 SDPA calls per LTX-2.3 block); the
    "other" count is the part fusion can still take away, so it tracks the kernels-per-pass goal."""
    counts = dict.fromkeys(KERNEL_CLASSES, 0)
    for name, n in counts_by_name.items():
        counts[kernel_class(name)] += n
    return counts


@dataclass
class KernelActivity:
    """What `kernel_activity` saw; fields stay None when the source cannot measure them."""

    source: str  # "cupti" | "torch.profiler" | "aten ops" | "not counted (compile)" | "off"
    kernels: int | None = None
    busy_pct: float | None = None
    wall_ms: float | None = None
    ms_by_class: dict[str, float] | None = None  # kernel time per `kernel_class` (CUPTI only)
    count_by_class: dict[str, int] | None = None  # kernels per `kernel_class` (CUPTI only)
    count_by_name: dict[str, int] | None = None  # kernels per name (CUPTI only)

    def per_call(self, calls: int) -> float | None:
        return None if self.kernels is None else self.kernels / calls


def cupti_available() -> bool:
    try:
        from profiling.cupti import import_cupti

        import_cupti()
    except Exception:
        return False
    return True


class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def kernel_activity(
    device: torch.device, *, enabled: bool = True, prefer: str = "auto", cupti_only: bool = False,
    compiled: bool = False,
) -> Iterator[KernelActivity]:
    """Measure kernels and GPU busy of the block (see the module docstring). `prefer`: auto|cupti|torch.

    `cupti_only`: measure nothing (source "off") rather than fall back to torch.profiler, whose per-event cost
    is too high for long blocks such as a whole eager denoising loop (~1M kernels).
    `compiled`: the block runs torch.compile'd code; on CPU it is then not counted (see the module docstring).
    """
    if not enabled:
        yield KernelActivity("off")
        return
    if device.type != "cuda" and compiled:
        yield KernelActivity("not counted (compile)")
        return
    if device.type != "cuda":
        counter = _OpCounter()
        result = KernelActivity("aten ops")
        started = time.perf_counter()
        with counter:
            yield result
        result.kernels, result.wall_ms = counter.count, (time.perf_counter() - started) * 1e3
        return
    use_cupti = prefer == "cupti" or (prefer == "auto" and cupti_available())
    if cupti_only and not use_cupti:
        yield KernelActivity("off")
    elif use_cupti:
        with _cupti_activity(device) as result:
            yield result
    else:
        with _torch_profiler_activity(device) as result:
            yield result


def _end_of_window(device: torch.device) -> None:
    with allow_host_sync("end of a measured window"):
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _cupti_activity(device: torch.device) -> Iterator[KernelActivity]:
    from profiling.cupti import CuptiProfiler

    result = KernelActivity("cupti")
    with CuptiProfiler(control=False) as prof:
        with region(MEASURED_RANGE):
            yield result
            _end_of_window(device)
    row = next((r for r in prof.report(require_control=False).ranges if r.name == MEASURED_RANGE), None)
    if row is not None:
        result.kernels, result.busy_pct, result.wall_ms = row.kernels, row.gpu_busy_pct, row.wall_ns / 1e6
    window = next((r for r in prof.timeline.ranges if r.name == MEASURED_RANGE), None)
    if window is not None:
        result.ms_by_class = kernel_ms_by_class(prof.timeline.kernels, window.start, window.end)
        result.count_by_name = kernel_counts_by_name(prof.timeline.kernels, window.start, window.end)
        result.count_by_class = kernel_counts_by_class(result.count_by_name)


@contextlib.contextmanager
def _torch_profiler_activity(device: torch.device) -> Iterator[KernelActivity]:
    from torch.profiler import ProfilerActivity, profile

    result = KernelActivity("torch.profiler")
    with allow_host_sync("start of a measured window"):
        torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        started = time.perf_counter()
        yield result
        _end_of_window(device)
        wall_s = time.perf_counter() - started
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and _is_kernel(e)]
    intervals = [(int(e.time_range.start * 1e3), int(e.time_range.end * 1e3)) for e in kernels]  # us -> ns
    result.kernels = len(kernels)
    result.wall_ms = wall_s * 1e3
    result.busy_pct = min(100.0, 100.0 * sum(e - s for s, e in merged_intervals(intervals)) / 1e9 / wall_s) if wall_s > 0 else None


def _is_kernel(event) -> bool:
    """Kineto's device events include memcpy/memset; count kernels only."""
    name = event.name.lower()
    return not (name.startswith("memcpy") or name.startswith("memset"))

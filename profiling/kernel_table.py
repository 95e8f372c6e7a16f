"""Where a profiled window's GPU time went, kernel by kernel, and how long the GPU sat idle between kernels.

`ltx2-graphs profile --kernels N` prints both for the profiled loop (live CUPTI run or nsys export): the N kernels
with the most time, and the stretches with no kernel running, by length. This is how the performance log found that
the idle time of the 1536-token loop is short gaps inside the graphs (launch latency between dependent kernels, and
the memsets before cuDNN's SDPA and two cuBLASLt GEMMs), not time between replays. Pure functions over `Timeline`
records (unit-tested on CPU with synthetic ones).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from tabulate import tabulate

from profiling.attribution import merged_intervals
from profiling.timeline import KernelRecord, Timeline

WINDOW_RANGE = "loop"
# Upper bounds of the idle-gap buckets, in microseconds; the last bucket holds everything longer.
GAP_BUCKETS_US = (1, 2, 5, 10, 100, 1000)


@dataclass(frozen=True)
class KernelRow:
    """Every kernel of one name in the window: calls and execution time (clipped to the window)."""

    name: str
    calls: int
    total_ns: int

    @property
    def mean_us(self) -> float:
        return self.total_ns / self.calls / 1e3


@dataclass(frozen=True)
class IdleGaps:
    """Stretches of the window with no kernel running on any stream, bucketed by length."""

    window_ns: int
    buckets: tuple[tuple[str, int, int], ...]  # (label, gaps, idle ns)

    @property
    def count(self) -> int:
        return sum(n for _, n, _ in self.buckets)

    @property
    def idle_ns(self) -> int:
        return sum(ns for _, _, ns in self.buckets)


def measured_windows(timeline: Timeline) -> list[tuple[int, int]]:
    """One window per "loop" region (two stages: two loops, not the time between them), else one over all kernels;
    empty when nothing ran.

    A loop region ends when the host has launched its last work, and the GPU may be a whole step behind: a window
    runs on to the end of the last kernel launched inside its region (its launch call's time, found by correlation
    id; a kernel without one counts from its own start)."""
    spans = sorted((r.start, r.end) for r in timeline.ranges if r.name == WINDOW_RANGE)
    if not spans and timeline.kernels:
        spans = [(min(k.start for k in timeline.kernels), max(k.end for k in timeline.kernels))]
    launched = {a.correlation: a.start for a in timeline.api_calls}
    return [(start, max([end] + [k.end for k in timeline.kernels
                                 if start <= launched.get(k.correlation, k.start) < end])) for start, end in spans]


def kernel_rows(kernels: Iterable[KernelRecord], windows: list[tuple[int, int]]) -> list[KernelRow]:
    """Kernels overlapping the windows, grouped by name, most time first (time clipped to the windows)."""
    totals: dict[str, list[int]] = {}
    for k in kernels:
        overlap = sum(max(0, min(k.end, end) - max(k.start, start)) for start, end in windows)
        if overlap > 0:
            row = totals.setdefault(k.name, [0, 0])
            row[0] += 1
            row[1] += overlap
    rows = [KernelRow(name, calls, ns) for name, (calls, ns) in totals.items()]
    return sorted(rows, key=lambda r: (-r.total_ns, r.name))


def idle_gaps(kernels: Iterable[KernelRecord], windows: list[tuple[int, int]]) -> IdleGaps:
    """The idle stretches of the windows: where no kernel of any stream runs (overlapping kernels merged)."""
    bounds_ns = [b * 1000 for b in GAP_BUCKETS_US]
    labels = [f"< {b} us" for b in GAP_BUCKETS_US] + [f">= {GAP_BUCKETS_US[-1]} us"]
    counts, idle = [0] * len(labels), [0] * len(labels)

    def add(gap: int) -> None:
        if gap > 0:
            i = next((j for j, b in enumerate(bounds_ns) if gap < b), len(bounds_ns))
            counts[i] += 1
            idle[i] += gap

    kernels = list(kernels)
    for start, end in windows:
        clipped = [(max(k.start, start), min(k.end, end)) for k in kernels]
        covered = start
        for s, e in merged_intervals([(s, e) for s, e in clipped if e > s]):  # kernels inside the window
            add(s - covered)
            covered = e
        add(end - covered)
    return IdleGaps(sum(end - start for start, end in windows), tuple(zip(labels, counts, idle)))


_TEMPLATE_OR_ARGS = re.compile(r"[<(].*$")


def short_kernel_name(name: str, width: int = 90) -> str:
    """`void at::native::foo<float, 4>(...)` -> `at::native::foo`, cut to `width` characters."""
    short = _TEMPLATE_OR_ARGS.sub("", name.removeprefix("void ")) or name
    return short if len(short) <= width else short[: width - 3] + "..."


def kernels_table(rows: list[KernelRow], top: int) -> str:
    total = sum(r.total_ns for r in rows) or 1
    body = [(short_kernel_name(r.name), r.calls, r.total_ns / 1e6, r.mean_us, 100 * r.total_ns / total)
            for r in rows[:top]]
    return tabulate(body, headers=["kernel", "calls", "total ms", "mean us", "% of kernel time"],
                    floatfmt=("", "", ".2f", ".1f", ".1f"))


def gaps_table(gaps: IdleGaps) -> str:
    body = [(label, n, ns / 1e6) for label, n, ns in gaps.buckets]
    return tabulate(body, headers=["idle gap", "gaps", "total ms"], floatfmt=("", "", ".3f"))


def kernel_report(timeline: Timeline, top: int) -> tuple[str, dict] | None:
    """(printable text, JSON-ready dict) over the measured windows of `timeline`; None when no kernel ran in them
    (an nsys export without `--cuda-graph-trace=node` has no kernels of graph replays)."""
    windows = measured_windows(timeline)
    rows, gaps = kernel_rows(timeline.kernels, windows), idle_gaps(timeline.kernels, windows)
    if not rows:
        return None
    busy_pct = 100.0 * (1 - gaps.idle_ns / gaps.window_ns) if gaps.window_ns else 0.0
    head = (f"window {gaps.window_ns / 1e6:.2f} ms ({len(windows)} '{WINDOW_RANGE}' region(s), else all kernels): "
            f"{sum(r.calls for r in rows)} kernels of {len(rows)} names, GPU busy {busy_pct:.1f}%; "
            f"idle {gaps.idle_ns / 1e6:.2f} ms in {gaps.count} gaps")
    text = "\n\n".join([head, kernels_table(rows, top), gaps_table(gaps)])
    data = {
        "window_ns": gaps.window_ns,
        "idle_ns": gaps.idle_ns,
        "top_kernels": [{"name": r.name, "calls": r.calls, "total_ns": r.total_ns} for r in rows[:top]],
        "idle_gaps": [{"bucket": label, "gaps": n, "idle_ns": ns} for label, n, ns in gaps.buckets],
    }
    return text, data

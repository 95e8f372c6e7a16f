"""Attribute syncs, copies, kernels and API time to regions: :class:`Timeline` -> :class:`ProfileReport`.

Rules (the same for CUPTI and nsys input):

* Host-side events (API calls, syncs, copies and kernels through their launching API call, matched by
  correlation id) belong to the innermost region open *on the calling thread* at the call's start. When the
  thread is unknown or has no regions at all, the innermost region at that time on any thread is used instead,
  except for host syncs: a sync on a thread without regions of its own is outside regions (unexpected), never in
  another thread's `allow_host_sync` or positive-control window (regions recorded without a thread id, thread 0,
  still count for every thread).
* A region's counts include its nested regions ("loop" counts every sync of every "step").
* A host sync is a CUPTI synchronisation record other than stream-wait-event (that one waits on the GPU,
  not the host) and other than those of polling calls (`cudaEventQuery`/`cudaStreamQuery` return at once);
  or a blocking API call without such a record; or a device->host copy into pageable memory that is not
  already followed by a sync on its thread (pageable copies block the host even when ``non_blocking=True``).
* GPU busy % of a region is the union of kernel execution intervals clipped to the region's wall time,
  over that wall time (whoever launched the kernels).
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import dataclass

from profiling.ranges import CONTROL_RANGE
from profiling.report import OUTSIDE, HostSync, ProfileReport, RangeStats
from profiling.timeline import (ApiRecord, RangeRecord, Timeline, canonical_api_name, is_blocking_api,
                                is_polling_api)

NO_RANGE = -1
UNKNOWN_THREAD = 0  # the thread id of regions whose recorder gave none (`profiling.cupti` marker records)


@dataclass(frozen=True)
class _Instance:
    name: str
    start: int
    end: int
    thread: int
    parent: int
    path: tuple[str, ...]


class RangeIndex:
    """Region instances with their nesting, and a per-thread lookup "innermost region at time t"."""

    def __init__(self, ranges: tuple[RangeRecord, ...]) -> None:
        self.instances: list[_Instance] = []
        self._starts: dict[int, list[int]] = {}
        self._owners: dict[int, list[int]] = {}
        by_thread: dict[int, list[RangeRecord]] = defaultdict(list)
        for r in ranges:
            if r.end < r.start:
                raise ValueError(f"RangeRecord {r.name!r}: end {r.end} is before start {r.start}")
            by_thread[r.thread].append(r)
        for thread, records in by_thread.items():
            self._index_thread(thread, sorted(records, key=lambda r: (r.start, -r.end)))

    def _index_thread(self, thread: int, records: list[RangeRecord]) -> None:
        starts: list[int] = []
        owners: list[int] = []

        def boundary(t: int, owner: int) -> None:
            if starts and starts[-1] == t:
                owners[-1] = owner
            else:
                starts.append(t)
                owners.append(owner)

        stack: list[int] = []
        for r in records:
            while stack and self.instances[stack[-1]].end <= r.start:
                closed = self.instances[stack.pop()]
                boundary(closed.end, stack[-1] if stack else NO_RANGE)
            parent = stack[-1] if stack else NO_RANGE
            path = (self.instances[parent].path if stack else ()) + (r.name,)
            self.instances.append(_Instance(r.name, r.start, r.end, thread, parent, path))
            stack.append(len(self.instances) - 1)
            boundary(r.start, stack[-1])
        while stack:
            closed = self.instances[stack.pop()]
            boundary(closed.end, stack[-1] if stack else NO_RANGE)
        self._starts[thread], self._owners[thread] = starts, owners

    def _lookup(self, thread: int, t: int) -> int:
        starts = self._starts[thread]
        i = bisect.bisect_right(starts, t) - 1
        return self._owners[thread][i] if i >= 0 else NO_RANGE

    def innermost(self, thread: int | None, t: int) -> int:
        """Index of the innermost region containing `t` on `thread` (any thread if unknown), or NO_RANGE."""
        if thread in self._starts:
            return self._lookup(thread, t)
        found = [self._lookup(other, t) for other in self._starts]
        found = [i for i in found if i != NO_RANGE]
        return max(found, key=lambda i: len(self.instances[i].path), default=NO_RANGE)  # the deepest

    def innermost_on_thread(self, thread: int | None, t: int) -> int:
        """`innermost` for a host sync: only `thread`'s own regions (or, when none of its own were recorded, regions
        recorded without a thread id, `UNKNOWN_THREAD`). Whether a sync is allowed or the positive control is read
        from its region, so a sync on a worker thread must not borrow the main thread's `allow_host_sync` or control
        window: it counts as unexpected, outside regions."""
        if thread is None or thread in self._starts:
            return self.innermost(thread, t)
        return self._lookup(UNKNOWN_THREAD, t) if UNKNOWN_THREAD in self._starts else NO_RANGE

    def chain(self, index: int) -> list[int]:
        """`index` and all its enclosing regions."""
        out = []
        while index != NO_RANGE:
            out.append(index)
            index = self.instances[index].parent
        return out

    def path(self, index: int) -> tuple[str, ...]:
        return self.instances[index].path if index != NO_RANGE else ()


def _host_syncs(timeline: Timeline, index: RangeIndex) -> list[tuple[HostSync, int]]:
    """Every moment the host waited for the device, with the index of its innermost region."""
    api_by_corr = {a.correlation: a for a in timeline.api_calls}
    out: list[tuple[HostSync, int]] = []
    synced: set[int] = set()

    def add(kind: str, api: ApiRecord | None, start: int, end: int) -> None:
        thread = api.thread if api else None
        where = index.innermost_on_thread(thread, api.start if api else start)
        name = canonical_api_name(api.name) if api else ""
        correlation = api.correlation if api else None
        out.append((HostSync(kind, name, start, max(0, end - start), thread, index.path(where), correlation), where))

    for sync in timeline.syncs:
        api = api_by_corr.get(sync.correlation)
        if sync.kind == "stream_wait_event" or (api is not None and is_polling_api(api.name)):
            continue
        synced.add(sync.correlation)
        add(sync.kind, api, sync.start, sync.end)
    for api in timeline.api_calls:
        if is_blocking_api(api.name) and api.correlation not in synced:
            synced.add(api.correlation)
            add("blocking call", api, api.start, api.end)

    calls_by_thread: dict[int, list[ApiRecord]] = defaultdict(list)
    position: dict[int, int] = {}  # correlation -> index in its thread's call list
    for api in sorted(timeline.api_calls, key=lambda a: a.start):
        position[api.correlation] = len(calls_by_thread[api.thread])
        calls_by_thread[api.thread].append(api)
    for copy in timeline.memcpys:
        if copy.direction != "DtoH" or copy.dst_kind != "pageable":
            continue
        api = api_by_corr.get(copy.correlation)
        if api is not None:
            if api.correlation in synced:
                continue  # a blocking copy call (cudaMemcpy): already counted
            follower = _following_sync(calls_by_thread[api.thread], position[api.correlation], synced)
            if follower is not None and index.innermost(follower.thread, follower.start) == index.innermost(
                    api.thread, api.start):
                continue  # the sync right after the copy in the same region (.item()) is already counted
        add("pageable D2H copy", api, copy.start, copy.end)
    return sorted(out, key=lambda pair: pair[0].start_ns)


_ENQUEUES = ("Launch", "Memcpy", "Memset", "EventRecord")


def _following_sync(calls: list[ApiRecord], at: int, synced: set[int], lookahead: int = 8) -> ApiRecord | None:
    """The synchronising call that follows call `at` on its thread before any call queueing more work.

    Bookkeeping calls in between (cudaGetDevice, cudaGetLastError, ...) are skipped over.
    """
    for call in calls[at + 1:at + 1 + lookahead]:
        if call.correlation in synced:
            return call
        if any(word in call.name for word in _ENQUEUES):
            return None
    return None


def host_syncs(timeline: Timeline) -> list[HostSync]:
    """Every moment the host waited for the device, attributed to regions (see the module rules)."""
    return [sync for sync, _ in _host_syncs(timeline, RangeIndex(timeline.ranges))]


def merged_intervals(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, non-overlapping union of [start, end) intervals (e.g. kernels of every stream: when the GPU ran)."""
    merged: list[list[int]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def _overlap(merged: list[tuple[int, int]], ends: list[int], start: int, end: int) -> int:
    total = 0
    for s, e in merged[bisect.bisect_right(ends, start):]:
        if s >= end:
            break
        total += min(e, end) - max(s, start)
    return total


def analyse(timeline: Timeline, *, require_control: bool = False) -> ProfileReport:
    """Build the per-region report. With `require_control`, raise unless the positive control was seen."""
    index = RangeIndex(timeline.ranges)
    api_by_corr = {a.correlation: a for a in timeline.api_calls}
    counters: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def credit(where: int, **amounts: int) -> None:
        for i in index.chain(where) or [NO_RANGE]:
            for key, value in amounts.items():
                counters[i][key] += value

    def host_owner(correlation: int, fallback_t: int) -> int:
        api = api_by_corr.get(correlation)
        return index.innermost(api.thread, api.start) if api else index.innermost(None, fallback_t)

    pairs = _host_syncs(timeline, index)
    syncs = [sync for sync, _ in pairs]
    blocked = {s.correlation for s in syncs if s.correlation is not None}
    for sync, where in pairs:
        credit(where, **{"allowed_syncs" if (sync.allowed or sync.control) else "syncs": 1})
    for copy in timeline.memcpys:
        if copy.direction == "DtoH":
            credit(host_owner(copy.correlation, copy.start), d2h_copies=1, d2h_bytes=copy.bytes)
    for kernel in timeline.kernels:
        credit(host_owner(kernel.correlation, kernel.start), kernels=1, kernel_ns=kernel.end - kernel.start)
    for api in timeline.api_calls:
        blocking = is_blocking_api(api.name) or api.correlation in blocked
        credit(index.innermost(api.thread, api.start),
               **{"blocking_ns" if blocking else "enqueue_ns": api.end - api.start})

    busy = merged_intervals([(k.start, k.end) for k in timeline.kernels])
    busy_ends = [e for _, e in busy]
    stats: dict[str, RangeStats] = {}
    order = sorted(range(len(index.instances)), key=lambda i: index.instances[i].start)
    for i in order:
        inst = index.instances[i]
        c = counters.get(i, {})
        row = RangeStats(
            name=inst.name, instances=1, wall_ns=inst.end - inst.start, syncs=c.get("syncs", 0),
            allowed_syncs=c.get("allowed_syncs", 0),
            d2h_copies=c.get("d2h_copies", 0), d2h_bytes=c.get("d2h_bytes", 0), kernels=c.get("kernels", 0),
            kernel_ns=c.get("kernel_ns", 0), busy_ns=_overlap(busy, busy_ends, inst.start, inst.end),
            enqueue_ns=c.get("enqueue_ns", 0), blocking_ns=c.get("blocking_ns", 0),
        )
        stats[inst.name] = stats[inst.name].merged(row, inst.name) if inst.name in stats else row
    outside = counters.get(NO_RANGE)
    if outside and any(outside.get(k, 0) for k in ("syncs", "allowed_syncs", "d2h_copies", "kernels")):
        stats[OUTSIDE] = RangeStats(name=OUTSIDE, **{k: v for k, v in outside.items()})

    names = {inst.name for inst in index.instances}
    if CONTROL_RANGE not in names:
        control = "absent"
    else:
        control = "seen" if any(s.control for s in syncs) else "missing"
    report = ProfileReport(
        source=timeline.source, ranges=tuple(stats.values()), syncs=tuple(syncs), control=control,
        wall_ns=_wall(timeline),
    )
    if require_control:
        report.check_control()
    return report


def _wall(timeline: Timeline) -> int:
    spans = [(r.start, r.end) for group in (timeline.ranges, timeline.api_calls, timeline.syncs,
                                             timeline.memcpys, timeline.kernels) for r in group]
    return max(e for _, e in spans) - min(s for s, _ in spans) if spans else 0

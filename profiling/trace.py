"""Export a :class:`Timeline` as Chrome trace JSON (opens in Perfetto and chrome://tracing).

Layout: process "host" has one track per host thread with the regions (nested) and the host syncs on top
of them; process "GPU" has one track per stream with kernels and copies. Timestamps are microseconds
from the first record, as the trace event format expects.
"""

from __future__ import annotations

import json
from pathlib import Path

from profiling.attribution import host_syncs
from profiling.timeline import Timeline

HOST_PID, GPU_PID = 1, 2


def _us(ns: int, origin: int) -> float:
    return (ns - origin) / 1e3


def chrome_trace(timeline: Timeline) -> dict:
    """The trace as a dict ``{"traceEvents": [...], "displayTimeUnit": "ms"}``."""
    records = [*timeline.ranges, *timeline.api_calls, *timeline.syncs, *timeline.memcpys, *timeline.kernels]
    origin = min((r.start for r in records), default=0)
    events: list[dict] = [
        {"ph": "M", "pid": HOST_PID, "name": "process_name", "args": {"name": "host"}},
        {"ph": "M", "pid": GPU_PID, "name": "process_name", "args": {"name": "GPU"}},
    ]

    def span(pid, tid, name, cat, start, end, **args):
        events.append({"ph": "X", "pid": pid, "tid": tid, "name": name, "cat": cat,
                       "ts": _us(start, origin), "dur": max(end - start, 0) / 1e3, "args": args})

    for r in sorted(timeline.ranges, key=lambda r: (r.start, -r.end)):
        span(HOST_PID, r.thread, r.name, "region", r.start, r.end)
    for sync in host_syncs(timeline):
        verdict = "control" if sync.control else ("allowed" if sync.allowed else "UNEXPECTED")
        span(HOST_PID, sync.thread if sync.thread is not None else 0, f"sync: {sync.kind}", "sync",
             sync.start_ns, sync.start_ns + sync.duration_ns, api=sync.api, regions=" > ".join(sync.ranges),
             verdict=verdict)
    for k in timeline.kernels:
        span(GPU_PID, k.stream if k.stream is not None else 0, k.name, "kernel", k.start, k.end,
             correlation=k.correlation)
    for c in timeline.memcpys:
        span(GPU_PID, c.stream if c.stream is not None else 0, f"memcpy {c.direction}", "memcpy", c.start, c.end,
             bytes=c.bytes, src=c.src_kind, dst=c.dst_kind, correlation=c.correlation)
    threads = sorted({r.thread for r in timeline.ranges})
    streams = sorted({x.stream for x in (*timeline.kernels, *timeline.memcpys) if x.stream is not None})
    events += [{"ph": "M", "pid": HOST_PID, "tid": t, "name": "thread_name", "args": {"name": f"thread {t}"}}
               for t in threads]
    events += [{"ph": "M", "pid": GPU_PID, "tid": s, "name": "thread_name", "args": {"name": f"stream {s}"}}
               for s in streams]
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_chrome_trace(timeline: Timeline, path: str | Path) -> Path:
    """Write :func:`chrome_trace` to `path` (``.json``); returns the path."""
    path = Path(path)
    path.write_text(json.dumps(chrome_trace(timeline)))
    return path

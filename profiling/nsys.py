"""Read an Nsight Systems SQLite export and print the same per-region report as the CUPTI profiler.

Recording a good file (the profiled program wraps the positive control and the loop in one region,
``with region("profile"): run_positive_control(); with region("loop"): ...``)::

    nsys profile --trace=cuda,nvtx --cuda-graph-trace=node \\
        --capture-range=nvtx --nvtx-capture=profile@ltx2 --capture-range-end=stop \\
        --env-var=NSYS_NVTX_PROFILER_REGISTER_ONLY=0 \\
        --output=ltx2 --force-overwrite=true  <the program and its arguments>
    nsys export --type=sqlite --output=ltx2.sqlite ltx2.nsys-rep
    python -m profiling.nsys ltx2.sqlite --json report.json --trace trace.json

Why these flags: ``--trace=cuda,nvtx`` records CUDA API calls, synchronisation, copies, kernels and the
NVTX regions; ``--cuda-graph-trace=node`` records each kernel of a CUDA graph replay (the default records
whole graphs, so kernel counts and GPU busy % would miss them); ``--capture-range=nvtx`` with
``--nvtx-capture=<region>@<domain>`` records only while region ``profile`` of domain ``ltx2`` is open
(use ``loop@ltx2`` to skip the control, then pass ``--no-control``); ``NSYS_NVTX_PROFILER_REGISTER_ONLY=0``
lets the capture range match NVTX messages that are not registered strings.

Tables read (all optional, an export creates tables lazily): ``StringIds``, ``NVTX_EVENTS`` (push/pop and
start/end ranges, eventType 59/60, and domain creation, eventType 75), ``CUPTI_ACTIVITY_KIND_RUNTIME``,
``CUPTI_ACTIVITY_KIND_SYNCHRONIZATION``, ``CUPTI_ACTIVITY_KIND_MEMCPY``, ``CUPTI_ACTIVITY_KIND_KERNEL`` and,
when present, the ``ENUM_*`` tables that name sync types, copy directions and memory kinds. API names keep
their version suffix in exports (``cudaStreamSynchronize_v3020``) and are matched without it. The tests
exercise this reader on small SQLite files they build with the documented schema, not on real exports.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from pathlib import Path

from profiling.attribution import analyse
from profiling.ranges import DOMAIN
from profiling.report import BlindProfilerError, ProfileReport
from profiling.timeline import ApiRecord, KernelRecord, MemcpyRecord, RangeRecord, SyncRecord, Timeline
from profiling.trace import write_chrome_trace

PUSH_POP, START_END, DOMAIN_CREATE = 59, 60, 75

# Defaults when the export carries no ENUM_* tables (values from the Nsight Systems export reference).
_SYNC_TYPES = {1: "event_synchronize", 2: "stream_wait_event", 3: "stream_synchronize", 4: "context_synchronize"}
_COPY_KINDS = {1: "HtoD", 2: "DtoH", 8: "DtoD", 9: "HtoH", 10: "PtoP"}
_MEMORY_KINDS = {0: "pageable", 1: "pinned", 2: "device", 4: "managed"}  # not CUPTI's numbering


def _tables(conn: sqlite3.Connection) -> set[str]:
    return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def _rows(conn: sqlite3.Connection, table: str, columns: list[str]) -> list[dict]:
    """Rows of `table` as dicts; columns the export lacks read as None."""
    present = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
    chosen = [c for c in columns if c in present]
    if not chosen:
        return []
    quoted = ", ".join(f'"{c}"' for c in chosen)
    return [{**dict.fromkeys(columns), **dict(zip(chosen, row))}
            for row in conn.execute(f"SELECT {quoted} FROM {table}")]


def _enum(conn, tables, table: str, suffixes: dict[str, str], default: dict[int, str]) -> dict[int, str]:
    """Map ids of an ENUM_* table onto our vocabulary by the suffix of each enum name."""
    if table not in tables:
        return default
    out = {}
    for row in _rows(conn, table, ["id", "name"]):
        name = str(row["name"] or "")
        for suffix, ours in suffixes.items():
            if name.endswith(suffix) and "UVM" not in name:
                out[row["id"]] = ours
                break
    return out


def read_timeline(path: str | Path, *, domain: str | None = DOMAIN) -> Timeline:
    """Convert an ``nsys export --type sqlite`` file into a :class:`Timeline` (regions of `domain` only;
    ``domain=None`` keeps every NVTX range)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"nsys sqlite path: {str(path)!r} is not a file; create it with "
                         "`nsys export --type=sqlite --output=FILE.sqlite REPORT.nsys-rep`")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = _tables(conn)
        strings = dict(conn.execute("SELECT id, value FROM StringIds")) if "StringIds" in tables else {}
        return Timeline(
            ranges=_ranges(conn, tables, strings, domain), api_calls=_api_calls(conn, tables, strings),
            syncs=_syncs(conn, tables), memcpys=_memcpys(conn, tables), kernels=_kernels(conn, tables, strings),
            source="nsys",
        )
    finally:
        conn.close()


def _pid(global_tid) -> int:
    return (int(global_tid or 0) >> 24) & 0xFFFFFF  # globalTid packs the process id above the thread id


def _ranges(conn, tables, strings, domain) -> list[RangeRecord]:
    if "NVTX_EVENTS" not in tables:
        return []
    rows = _rows(conn, "NVTX_EVENTS", ["start", "end", "eventType", "text", "textId", "globalTid", "domainId"])
    domains = {(_pid(r["globalTid"]), r["domainId"]): r["text"] for r in rows if r["eventType"] == DOMAIN_CREATE}
    if not domains:
        domain = None  # an export without domain-creation events cannot filter by domain: keep every range
    out = []
    for r in rows:
        if r["eventType"] not in (PUSH_POP, START_END) or r["end"] is None:
            continue
        if domain is not None and domains.get((_pid(r["globalTid"]), r["domainId"])) != domain:
            continue
        name = r["text"] if r["text"] is not None else strings.get(r["textId"], "")
        out.append(RangeRecord(str(name), int(r["start"]), int(r["end"]), int(r["globalTid"] or 0)))
    return out


def _api_calls(conn, tables, strings) -> list[ApiRecord]:
    if "CUPTI_ACTIVITY_KIND_RUNTIME" not in tables:
        return []
    rows = _rows(conn, "CUPTI_ACTIVITY_KIND_RUNTIME", ["start", "end", "globalTid", "correlationId", "nameId"])
    return [ApiRecord(str(strings.get(r["nameId"], f"api#{r['nameId']}")), int(r["start"]), int(r["end"]),
                      int(r["globalTid"] or 0), int(r["correlationId"] or 0)) for r in rows]


def _syncs(conn, tables) -> list[SyncRecord]:
    if "CUPTI_ACTIVITY_KIND_SYNCHRONIZATION" not in tables:
        return []
    kinds = _enum(conn, tables, "ENUM_CUPTI_SYNC_TYPE",
                  {"EVENT_SYNCHRONIZE": "event_synchronize", "STREAM_WAIT_EVENT": "stream_wait_event",
                   "STREAM_SYNCHRONIZE": "stream_synchronize", "CONTEXT_SYNCHRONIZE": "context_synchronize"},
                  _SYNC_TYPES)
    rows = _rows(conn, "CUPTI_ACTIVITY_KIND_SYNCHRONIZATION", ["start", "end", "correlationId", "syncType", "streamId"])
    return [SyncRecord(kinds.get(r["syncType"], "unknown"), int(r["start"]), int(r["end"]),
                       int(r["correlationId"] or 0), r["streamId"]) for r in rows]


def _memcpys(conn, tables) -> list[MemcpyRecord]:
    if "CUPTI_ACTIVITY_KIND_MEMCPY" not in tables:
        return []
    directions = _enum(conn, tables, "ENUM_CUDA_MEMCPY_OPER",
                       {"HTOD": "HtoD", "DTOH": "DtoH", "DTOD": "DtoD", "HTOH": "HtoH", "PTOP": "PtoP"}, _COPY_KINDS)
    memory = _enum(conn, tables, "ENUM_CUDA_MEM_KIND",
                   {"PAGEABLE": "pageable", "PINNED": "pinned", "KIND_DEVICE": "device", "KIND_MANAGED": "managed"},
                   _MEMORY_KINDS)
    rows = _rows(conn, "CUPTI_ACTIVITY_KIND_MEMCPY",
                 ["start", "end", "correlationId", "copyKind", "srcKind", "dstKind", "bytes", "streamId"])
    return [MemcpyRecord(directions.get(r["copyKind"], "other"), memory.get(r["srcKind"], "other"),
                         memory.get(r["dstKind"], "other"), int(r["bytes"] or 0), int(r["start"]), int(r["end"]),
                         int(r["correlationId"] or 0), r["streamId"]) for r in rows]


def _kernels(conn, tables, strings) -> list[KernelRecord]:
    if "CUPTI_ACTIVITY_KIND_KERNEL" not in tables:
        return []
    rows = _rows(conn, "CUPTI_ACTIVITY_KIND_KERNEL",
                 ["start", "end", "correlationId", "streamId", "shortName", "demangledName"])
    return [KernelRecord(str(strings.get(r["shortName"], strings.get(r["demangledName"], "kernel"))),
                         int(r["start"]), int(r["end"]), int(r["correlationId"] or 0), r["streamId"]) for r in rows]


def analyse_nsys(path: str | Path, *, require_control: bool = True, domain: str | None = DOMAIN) -> ProfileReport:
    """The per-region report of an nsys SQLite export (raises BlindProfilerError without a seen control
    unless `require_control` is False)."""
    return analyse(read_timeline(path, domain=domain), require_control=require_control)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m profiling.nsys", description=__doc__.split("\n")[0])
    parser.add_argument("sqlite", help="file written by `nsys export --type=sqlite`")
    parser.add_argument("--json", help="also write the report as JSON to this path")
    parser.add_argument("--trace", help="also write a Chrome trace / Perfetto JSON to this path")
    parser.add_argument("--no-control", action="store_true",
                        help="accept a capture without a seen positive control (the sync count is then unverified)")
    parser.add_argument("--all-domains", action="store_true",
                        help=f"use NVTX ranges of every domain, not only {DOMAIN!r}")
    args = parser.parse_args(argv)
    domain = None if args.all_domains else DOMAIN
    timeline = read_timeline(args.sqlite, domain=domain)
    try:
        report = analyse(timeline, require_control=not args.no_control)
    except BlindProfilerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.table())
    print()
    print(report.syncs_table())
    if args.json:
        report.to_json(args.json)
    if args.trace:
        write_chrome_trace(timeline, args.trace)
    return 1 if report.unexpected_syncs else 0


if __name__ == "__main__":
    sys.exit(main())

"""The nsys analyser on small SQLite files built here with the documented export schema (no real export).

The synthetic run of test_range_attribution is written into the tables an ``nsys export --type sqlite`` file has
(StringIds, NVTX_EVENTS, CUPTI_ACTIVITY_KIND_RUNTIME / SYNCHRONIZATION / MEMCPY / KERNEL, ENUM_*), with
nsys's own numbering (memory kinds: 0 pageable, 1 pinned, 2 device), and must give the same report.
"""

from __future__ import annotations

import json
import sqlite3

import pytest
from test_range_attribution import make_timeline

from profiling.attribution import analyse
from profiling.nsys import analyse_nsys, main, read_timeline
from profiling.report import BlindProfilerError

PID = 4321

SCHEMA = """
CREATE TABLE StringIds (id INTEGER NOT NULL PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE NVTX_EVENTS (start INTEGER NOT NULL, end INTEGER, eventType INTEGER NOT NULL, rangeId INTEGER,
    category INTEGER, color INTEGER, text TEXT, globalTid INTEGER, endGlobalTid INTEGER,
    textId INTEGER REFERENCES StringIds(id), domainId INTEGER, uint64Value INTEGER, int64Value INTEGER,
    doubleValue REAL, uint32Value INTEGER, int32Value INTEGER, floatValue REAL, jsonTextId INTEGER, jsonText TEXT);
CREATE TABLE CUPTI_ACTIVITY_KIND_RUNTIME (start INTEGER NOT NULL, end INTEGER NOT NULL, eventClass INTEGER NOT NULL,
    globalTid INTEGER, correlationId INTEGER, nameId INTEGER NOT NULL REFERENCES StringIds(id),
    returnValue INTEGER NOT NULL, callchainId INTEGER);
CREATE TABLE CUPTI_ACTIVITY_KIND_SYNCHRONIZATION (start INTEGER NOT NULL, end INTEGER NOT NULL,
    deviceId INTEGER NOT NULL, contextId INTEGER NOT NULL, streamId INTEGER NOT NULL, correlationId INTEGER,
    globalPid INTEGER, syncType INTEGER NOT NULL, eventId INTEGER NOT NULL);
CREATE TABLE CUPTI_ACTIVITY_KIND_MEMCPY (start INTEGER NOT NULL, end INTEGER NOT NULL, deviceId INTEGER NOT NULL,
    contextId INTEGER NOT NULL, streamId INTEGER NOT NULL, correlationId INTEGER, globalPid INTEGER,
    bytes INTEGER NOT NULL, copyKind INTEGER NOT NULL, deprecatedSrcId INTEGER, srcKind INTEGER, dstKind INTEGER,
    srcDeviceId INTEGER, srcContextId INTEGER, dstDeviceId INTEGER, dstContextId INTEGER, migrationCause INTEGER,
    graphNodeId INTEGER, virtualAddress INTEGER);
CREATE TABLE CUPTI_ACTIVITY_KIND_KERNEL (start INTEGER NOT NULL, end INTEGER NOT NULL, deviceId INTEGER NOT NULL,
    contextId INTEGER NOT NULL, streamId INTEGER NOT NULL, correlationId INTEGER, globalPid INTEGER,
    demangledName INTEGER NOT NULL REFERENCES StringIds(id), shortName INTEGER NOT NULL REFERENCES StringIds(id),
    mangledName INTEGER, launchType INTEGER, registersPerThread INTEGER, gridX INTEGER, gridY INTEGER,
    gridZ INTEGER, blockX INTEGER, blockY INTEGER, blockZ INTEGER, graphNodeId INTEGER);
"""

ENUMS = """
CREATE TABLE ENUM_CUPTI_SYNC_TYPE (id INTEGER NOT NULL PRIMARY KEY, name TEXT NOT NULL, label TEXT NOT NULL);
INSERT INTO ENUM_CUPTI_SYNC_TYPE VALUES
    (0, 'CUPTI_ACTIVITY_SYNCHRONIZATION_TYPE_UNKNOWN', 'Unknown'),
    (1, 'CUPTI_ACTIVITY_SYNCHRONIZATION_TYPE_EVENT_SYNCHRONIZE', 'Event sync'),
    (2, 'CUPTI_ACTIVITY_SYNCHRONIZATION_TYPE_STREAM_WAIT_EVENT', 'Stream wait event'),
    (3, 'CUPTI_ACTIVITY_SYNCHRONIZATION_TYPE_STREAM_SYNCHRONIZE', 'Stream sync'),
    (4, 'CUPTI_ACTIVITY_SYNCHRONIZATION_TYPE_CONTEXT_SYNCHRONIZE', 'Context sync');
CREATE TABLE ENUM_CUDA_MEMCPY_OPER (id INTEGER NOT NULL PRIMARY KEY, name TEXT NOT NULL, label TEXT NOT NULL);
INSERT INTO ENUM_CUDA_MEMCPY_OPER VALUES (0, 'CUDA_MEMCPY_KIND_UNKNOWN', 'Unknown'),
    (1, 'CUDA_MEMCPY_KIND_HTOD', 'Host-to-Device'), (2, 'CUDA_MEMCPY_KIND_DTOH', 'Device-to-Host'),
    (8, 'CUDA_MEMCPY_KIND_DTOD', 'Device-to-Device'), (12, 'CUDA_MEMCPY_KIND_UVM_DTOH', 'Unified Device-to-Host');
CREATE TABLE ENUM_CUDA_MEM_KIND (id INTEGER NOT NULL PRIMARY KEY, name TEXT NOT NULL, label TEXT NOT NULL);
INSERT INTO ENUM_CUDA_MEM_KIND VALUES (0, 'CUDA_MEMOPR_MEMORY_KIND_PAGEABLE', 'Pageable'),
    (1, 'CUDA_MEMOPR_MEMORY_KIND_PINNED', 'Pinned'), (2, 'CUDA_MEMOPR_MEMORY_KIND_DEVICE', 'Device'),
    (5, 'CUDA_MEMOPR_MEMORY_KIND_DEVICE_STATIC', 'Device Static');
"""

SYNC_TYPE = {"event_synchronize": 1, "stream_wait_event": 2, "stream_synchronize": 3, "context_synchronize": 4}
COPY_KIND = {"HtoD": 1, "DtoH": 2, "DtoD": 8}
MEM_KIND = {"pageable": 0, "pinned": 1, "device": 2}


def global_tid(tid: int) -> int:
    return (PID << 24) | tid


def write_export(path, timeline, *, enums: bool = True, with_domain: bool = True) -> None:
    """Write `timeline` as an nsys SQLite export, plus noise the reader must ignore."""
    db = sqlite3.connect(path)
    db.executescript(SCHEMA + (ENUMS if enums else ""))
    strings: dict[str, int] = {}

    def sid(text: str) -> int:
        if text not in strings:
            strings[text] = len(strings) + 1
            db.execute("INSERT INTO StringIds VALUES (?, ?)", (strings[text], text))
        return strings[text]

    nvtx = "INSERT INTO NVTX_EVENTS (start, end, eventType, text, textId, globalTid, domainId) VALUES (?,?,?,?,?,?,?)"
    if with_domain:
        db.execute(nvtx, (0, None, 75, "ltx2", None, global_tid(7), 1))
        db.execute(nvtx, (0, None, 75, "other", None, global_tid(7), 2))
    for i, r in enumerate(timeline.ranges):
        # Half the names as registered strings (textId), half inline (text): exports use both.
        text, text_id = (None, sid(r.name)) if i % 2 else (r.name, None)
        db.execute(nvtx, (r.start, r.end, 59, text, text_id, global_tid(r.thread), 1))
    if with_domain:
        db.execute(nvtx, (1500, 1600, 59, "foreign range", None, global_tid(7), 2))  # another domain
    db.execute(nvtx, (1500, None, 34, "a mark", None, global_tid(7), 1))  # instantaneous mark
    for a in timeline.api_calls:
        db.execute("INSERT INTO CUPTI_ACTIVITY_KIND_RUNTIME VALUES (?,?,0,?,?,?,0,NULL)",
                   (a.start, a.end, global_tid(a.thread), a.correlation, sid(a.name)))
    for s in timeline.syncs:
        db.execute("INSERT INTO CUPTI_ACTIVITY_KIND_SYNCHRONIZATION VALUES (?,?,0,1,?,?,?,?,0)",
                   (s.start, s.end, s.stream, s.correlation, PID, SYNC_TYPE[s.kind]))
    for c in timeline.memcpys:
        db.execute("INSERT INTO CUPTI_ACTIVITY_KIND_MEMCPY (start, end, deviceId, contextId, streamId, correlationId,"
                   " globalPid, bytes, copyKind, srcKind, dstKind) VALUES (?,?,0,1,?,?,?,?,?,?,?)",
                   (c.start, c.end, c.stream, c.correlation, PID, c.bytes, COPY_KIND[c.direction],
                    MEM_KIND[c.src_kind], MEM_KIND[c.dst_kind]))
    for k in timeline.kernels:
        db.execute("INSERT INTO CUPTI_ACTIVITY_KIND_KERNEL (start, end, deviceId, contextId, streamId, correlationId,"
                   " globalPid, demangledName, shortName) VALUES (?,?,0,1,?,?,?,?,?)",
                   (k.start, k.end, k.stream, k.correlation, PID, sid(f"void {k.name}<float>()"), sid(k.name)))
    db.commit()
    db.close()


def _summary(report):
    return report.ranges, [(s.kind, s.api, s.ranges, s.control, s.allowed) for s in report.syncs], report.control


@pytest.mark.parametrize("enums", [True, False], ids=["with-enum-tables", "default-enums"])
def test_same_report_as_the_in_memory_timeline(tmp_path, enums):
    timeline = make_timeline()
    path = tmp_path / "run.sqlite"
    write_export(path, timeline, enums=enums)
    report = analyse_nsys(path)
    assert report.source == "nsys"
    assert _summary(report) == _summary(analyse(timeline))


def test_reader_converts_names_kinds_and_domains(tmp_path):
    path = tmp_path / "run.sqlite"
    write_export(path, make_timeline())
    timeline = read_timeline(path)
    assert "foreign range" not in {r.name for r in timeline.ranges}
    assert len(timeline.ranges) == 8
    assert {a.name for a in timeline.api_calls} >= {"cudaStreamSynchronize_v3020", "cudaLaunchKernel_v7000"}
    assert sorted({c.dst_kind for c in timeline.memcpys}) == ["pageable", "pinned"]
    assert {k.name for k in timeline.kernels} == {"k1", "k2", "k3"}
    assert "foreign range" in {r.name for r in read_timeline(path, domain=None).ranges}


def test_export_without_domain_events_keeps_every_range(tmp_path):
    path = tmp_path / "run.sqlite"
    write_export(path, make_timeline(), with_domain=False)
    assert len(read_timeline(path).ranges) == 8


def test_missing_tables_and_missing_control(tmp_path):
    path = tmp_path / "empty.sqlite"
    sqlite3.connect(path).executescript("CREATE TABLE StringIds (id INTEGER PRIMARY KEY, value TEXT);")
    assert read_timeline(path).ranges == ()
    with pytest.raises(BlindProfilerError, match="no positive control"):
        analyse_nsys(path)
    assert analyse_nsys(path, require_control=False).control == "absent"


def test_bad_path_says_how_to_make_the_file(tmp_path):
    with pytest.raises(ValueError, match="nsys export --type=sqlite"):
        read_timeline(tmp_path / "nope.sqlite")


def test_command_line(tmp_path, capsys):
    path = tmp_path / "run.sqlite"
    write_export(path, make_timeline())
    code = main([str(path), "--json", str(tmp_path / "r.json"), "--trace", str(tmp_path / "t.json")])
    out = capsys.readouterr().out
    assert code == 1  # three unexpected syncs
    assert "step #" in out and "UNEXPECTED" in out and "positive control seen" in out
    assert json.loads((tmp_path / "r.json").read_text())["unexpected_syncs"] == 3
    assert json.loads((tmp_path / "t.json").read_text())["traceEvents"]

    clean = tmp_path / "clean.sqlite"
    write_export(clean, make_timeline(control=False))
    assert main([str(clean)]) == 2  # refuses: no positive control
    assert "refusing" in capsys.readouterr().err
    assert main([str(clean), "--no-control"]) == 1

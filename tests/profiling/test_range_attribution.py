"""Records -> attribution -> report -> trace, on a synthetic timeline whose answers are worked out by hand.

Thread 7 runs the regions; thread 9 launches one kernel without any region (attributed by time).

    loop [1000, 10000]
      step 0 [1100, 5000]:  pass cond [1200, 2000] (launch K1), pass neg [2000, 2800] (launch K2, pinned D2H)
      step 1 [5000, 9000]:  pass cond [5100, 5900] (cudaStreamSynchronize), pageable D2H copy at 6000,
                            cudaDeviceSynchronize at 7000 (no sync record), stream-wait-event at 7600
    profiler control [10100, 10500] > allow_host_sync: positive control [10150, 10450]  (.item())
"""

from __future__ import annotations

import json

import pytest

from profiling.attribution import RangeIndex, analyse, host_syncs
from profiling.ranges import ALLOW_PREFIX, CONTROL_RANGE
from profiling.report import BlindProfilerError
from profiling.timeline import (
    ApiRecord,
    KernelRecord,
    MemcpyRecord,
    RangeRecord,
    SyncRecord,
    Timeline,
    canonical_api_name,
    is_blocking_api,
)
from profiling.trace import chrome_trace, write_chrome_trace

T, U = 7, 9


def make_timeline(*, control: bool = True, control_sync: bool = True) -> Timeline:
    ranges = [
        RangeRecord("loop", 1000, 10000, T),
        RangeRecord("step 0", 1100, 5000, T),
        RangeRecord("pass cond", 1200, 2000, T),
        RangeRecord("pass neg", 2000, 2800, T),
        RangeRecord("step 1", 5000, 9000, T),
        RangeRecord("pass cond", 5100, 5900, T),
    ]
    api = [
        ApiRecord("cudaLaunchKernel_v7000", 1250, 1260, T, 1),
        ApiRecord("cudaLaunchKernel_v7000", 2100, 2110, T, 2),
        ApiRecord("cudaMemcpyAsync_v3020", 2200, 2210, T, 3),
        ApiRecord("cudaStreamSynchronize_v3020", 5200, 5800, T, 4),
        ApiRecord("cudaMemcpyAsync_v3020", 6000, 6400, T, 5),
        ApiRecord("cudaEventRecord_v3020", 6500, 6505, T, 6),
        ApiRecord("cudaDeviceSynchronize_v3020", 7000, 7500, T, 7),
        ApiRecord("cudaStreamWaitEvent_v3020", 7600, 7605, T, 8),
        ApiRecord("cudaLaunchKernel_v7000", 3000, 3010, U, 11),
    ]
    syncs = [SyncRecord("stream_synchronize", 5200, 5800, 4, 13), SyncRecord("stream_wait_event", 7600, 7605, 8, 13)]
    copies = [
        MemcpyRecord("DtoH", "device", "pinned", 64, 3500, 3510, 3, 13),
        MemcpyRecord("DtoH", "device", "pageable", 4096, 6100, 6390, 5, 13),
    ]
    kernels = [
        KernelRecord("k1", 1300, 2500, 1, 13),  # launched in "pass cond", runs on past its end
        KernelRecord("k2", 2500, 3500, 2, 13),
        KernelRecord("k3", 3600, 3700, 11, 14),
    ]
    if control:
        ranges += [RangeRecord(CONTROL_RANGE, 10100, 10500, T),
                   RangeRecord(ALLOW_PREFIX + "positive control", 10150, 10450, T)]
        if control_sync:  # False: a blind profiler recorded nothing of the control's .item()
            api.append(ApiRecord("cudaMemcpyAsync_v3020", 10200, 10210, T, 9))
            api.append(ApiRecord("cudaGetLastError_v3020", 10211, 10212, T, 12))  # bookkeeping in between
            copies.append(MemcpyRecord("DtoH", "device", "pageable", 4, 10205, 10215, 9, 13))
            api.append(ApiRecord("cudaStreamSynchronize_v3020", 10220, 10300, T, 10))
            syncs.append(SyncRecord("stream_synchronize", 10220, 10300, 10, 13))
    return Timeline(ranges=ranges, api_calls=api, syncs=syncs, memcpys=copies, kernels=kernels)


def test_api_names_match_without_version_suffix():
    assert canonical_api_name("cudaStreamSynchronize_v3020") == "cudaStreamSynchronize"
    assert canonical_api_name("cuMemcpyDtoH_v2") == "cuMemcpyDtoH"
    assert canonical_api_name("cudaMemcpyAsync_ptsz_v7000") == "cudaMemcpyAsync"
    assert is_blocking_api("cudaDeviceSynchronize_v3020") and not is_blocking_api("cudaMemcpyAsync_v3020")


def test_host_syncs_are_found_and_attributed():
    syncs = host_syncs(make_timeline())
    summary = [(s.kind, s.api, s.ranges, s.control, s.allowed) for s in syncs]
    assert summary == [
        ("stream_synchronize", "cudaStreamSynchronize", ("loop", "step 1", "pass cond"), False, False),
        ("pageable D2H copy", "cudaMemcpyAsync", ("loop", "step 1"), False, False),
        ("blocking call", "cudaDeviceSynchronize", ("loop", "step 1"), False, False),
        ("stream_synchronize", "cudaStreamSynchronize",
         (CONTROL_RANGE, ALLOW_PREFIX + "positive control"), True, True),
    ]


def test_per_range_report():
    report = analyse(make_timeline(), require_control=True)
    rows = {r.name: r for r in report.ranges}
    assert [r.name for r in report.ranges] == [
        "loop", "step 0", "pass cond", "pass neg", "step 1", CONTROL_RANGE, ALLOW_PREFIX + "positive control"]
    loop = rows["loop"]
    assert (loop.instances, loop.wall_ns, loop.syncs, loop.allowed_syncs) == (1, 9000, 3, 0)
    assert (loop.d2h_copies, loop.d2h_bytes, loop.kernels, loop.kernel_ns) == (2, 64 + 4096, 3, 2300)
    assert loop.busy_ns == 2300 and loop.gpu_busy_pct == pytest.approx(100 * 2300 / 9000)
    assert (loop.enqueue_ns, loop.blocking_ns) == (50, 1500)
    step0 = rows["step 0"]
    assert (step0.syncs, step0.d2h_copies, step0.kernels, step0.busy_ns, step0.enqueue_ns) == (0, 1, 3, 2300, 40)
    cond = rows["pass cond"]  # two instances, one per step
    assert (cond.instances, cond.wall_ns, cond.syncs, cond.kernels, cond.busy_ns, cond.blocking_ns) == (
        2, 1600, 1, 1, 700, 600)
    neg = rows["pass neg"]
    assert (neg.kernels, neg.kernel_ns, neg.d2h_copies, neg.gpu_busy_pct, neg.enqueue_ns) == (1, 1000, 1, 100.0, 20)
    step1 = rows["step 1"]
    assert (step1.syncs, step1.d2h_copies, step1.d2h_bytes, step1.kernels, step1.blocking_ns) == (3, 1, 4096, 0, 1500)
    control = rows[CONTROL_RANGE]
    assert (control.syncs, control.allowed_syncs, control.d2h_copies, control.blocking_ns) == (0, 1, 1, 80)
    assert report.control == "seen" and len(report.unexpected_syncs) == 3
    assert report.wall_ns == 9500


def test_table_groups_numbered_ranges_and_states_the_control():
    report = analyse(make_timeline())
    steps = [r for r in report.rows(group_numbers=True) if r.name == "step #"]
    assert len(steps) == 1 and steps[0].instances == 2 and steps[0].syncs == 3
    table = report.table()
    for word in ("range", "syncs", "GPU busy %", "enqueue ms", "step #", "pass cond"):
        assert word in table
    assert "3 unexpected host sync(s); positive control seen" in table
    assert "UNEXPECTED" in report.syncs_table() and "control" in report.syncs_table()


def test_json_round_trip(tmp_path):
    report = analyse(make_timeline())
    data = json.loads(report.to_json(tmp_path / "report.json"))
    assert data == json.loads((tmp_path / "report.json").read_text())
    assert data["control"] == "seen" and data["unexpected_syncs"] == 3
    assert data["ranges"][0]["name"] == "loop" and data["ranges"][0]["gpu_busy_pct"] == pytest.approx(25.56)
    assert data["syncs"][-1]["control"] is True


@pytest.mark.parametrize("control,control_sync,state", [(True, False, "missing"), (False, False, "absent")])
def test_refuses_to_certify_without_a_seen_control(control, control_sync, state):
    timeline = make_timeline(control=control, control_sync=control_sync)
    report = analyse(timeline)
    assert report.control == state
    assert "UNVERIFIED" in report.summary() and "0 unexpected" not in report.summary()
    with pytest.raises(BlindProfilerError, match="refusing"):
        analyse(timeline, require_control=True)


def test_clean_run_reports_zero_only_with_the_control():
    timeline = Timeline(
        ranges=[RangeRecord("loop", 0, 100, 1), RangeRecord(CONTROL_RANGE, 200, 300, 1)],
        api_calls=[ApiRecord("cudaGraphLaunch_v10000", 10, 20, 1, 1),
                   ApiRecord("cudaStreamSynchronize", 210, 290, 1, 2)],
        syncs=[SyncRecord("stream_synchronize", 210, 290, 2)],
        kernels=[KernelRecord("node", 30, 90, 1)],
    )
    report = analyse(timeline, require_control=True)
    assert report.summary().startswith("0 unexpected host sync(s)")
    loop = report.ranges[0]
    assert (loop.syncs, loop.kernels, loop.gpu_busy_pct) == (0, 1, 60.0)


def test_a_sync_on_another_thread_borrows_no_allowed_or_control_window():
    """Thread U has no regions: its sync inside thread T's control (or `allow_host_sync`) window is unexpected and
    outside regions, so a profiler that missed the control's own sync is not certified by U's. Regions recorded
    without a thread id (0) still count for every thread."""
    ranges = [RangeRecord("loop", 0, 100, T), RangeRecord(CONTROL_RANGE, 200, 300, T),
              RangeRecord(ALLOW_PREFIX + "read timings", 400, 500, T)]
    api = [ApiRecord("cudaStreamSynchronize", 210, 290, U, 1), ApiRecord("cudaDeviceSynchronize", 410, 420, U, 2)]
    report = analyse(Timeline(ranges=ranges, api_calls=api, syncs=[SyncRecord("stream_synchronize", 210, 290, 1)]))
    assert report.control == "missing" and len(report.unexpected_syncs) == 2
    assert [s.ranges for s in report.syncs] == [(), ()]
    untagged = [RangeRecord(r.name, r.start, r.end, 0) for r in ranges]
    report = analyse(Timeline(ranges=untagged, api_calls=api, syncs=[SyncRecord("stream_synchronize", 210, 290, 1)]))
    assert report.control == "seen" and report.unexpected_syncs == ()


def test_events_outside_regions_get_their_own_row():
    timeline = Timeline(api_calls=[ApiRecord("cudaDeviceSynchronize", 5, 6, 1, 1)])
    report = analyse(timeline)
    assert [(r.name, r.syncs) for r in report.ranges] == [("(outside regions)", 1)]
    assert report.syncs[0].ranges == ()


def test_range_index_nesting_and_lookup():
    index = RangeIndex(tuple(make_timeline().ranges))
    at = lambda t: index.path(index.innermost(T, t))  # noqa: E731
    assert at(1000) == ("loop",)
    assert at(1500) == ("loop", "step 0", "pass cond")
    assert at(2000) == ("loop", "step 0", "pass neg")  # boundaries are half-open
    assert at(4000) == ("loop", "step 0")
    assert at(9500) == ("loop",)
    assert at(10000) == ()
    assert index.path(index.innermost(12345, 1500)) == ("loop", "step 0", "pass cond")  # unknown thread: by time


def test_records_are_validated():
    with pytest.raises(ValueError, match="SyncRecord.kind"):
        Timeline(syncs=[SyncRecord("stream", 0, 1, 1)])
    with pytest.raises(ValueError, match="end 1 is before start 5"):
        RangeIndex((RangeRecord("x", 5, 1, 1),))


def test_chrome_trace(tmp_path):
    timeline = make_timeline()
    trace = chrome_trace(timeline)
    events = trace["traceEvents"]
    by_cat = {}
    for event in events:
        by_cat.setdefault(event.get("cat"), []).append(event)
    assert len(by_cat["region"]) == 8 and len(by_cat["kernel"]) == 3
    assert len(by_cat["memcpy"]) == 3 and len(by_cat["sync"]) == 4
    loop = next(e for e in by_cat["region"] if e["name"] == "loop")
    assert (loop["ts"], loop["dur"], loop["pid"], loop["tid"]) == (0.0, 9.0, 1, T)
    k1 = next(e for e in by_cat["kernel"] if e["name"] == "k1")
    assert (k1["ts"], k1["dur"], k1["pid"], k1["tid"]) == (0.3, 1.2, 2, 13)
    verdicts = sorted(e["args"]["verdict"] for e in by_cat["sync"])
    assert verdicts == ["UNEXPECTED"] * 3 + ["control"]
    path = write_chrome_trace(timeline, tmp_path / "trace.json")
    assert json.loads(path.read_text())["displayTimeUnit"] == "ms"


def test_pageable_copy_counts_when_the_next_sync_is_elsewhere():
    """A pageable copy followed by a sync in another region (a profiler's final flush) is its own sync."""
    timeline = Timeline(
        ranges=[RangeRecord("copy", 0, 100, 1), RangeRecord(ALLOW_PREFIX + "profiler flush", 150, 300, 1)],
        api_calls=[ApiRecord("cudaMemcpyAsync_v3020", 10, 60, 1, 1),
                   ApiRecord("cudaDeviceSynchronize", 200, 250, 1, 2)],
        syncs=[SyncRecord("context_synchronize", 200, 250, 2)],
        memcpys=[MemcpyRecord("DtoH", "device", "pageable", 1 << 20, 20, 55, 1)],
    )
    assert [(s.kind, s.ranges, s.allowed) for s in analyse(timeline).syncs] == [
        ("pageable D2H copy", ("copy",), False), ("context_synchronize", (ALLOW_PREFIX + "profiler flush",), True)]


def test_event_queries_are_polls_not_syncs():
    # Seen on an H200 (CUDA 13): CUPTI files the caching allocator's cudaEventQuery calls as EVENT_SYNCHRONIZE
    # records of ~2 us. The host never waits on a query, so they must not count as syncs.
    base = make_timeline()
    query = ApiRecord("cudaEventQuery_v3020", 2300, 2302, T, 40)
    timeline = Timeline(ranges=base.ranges, api_calls=[*base.api_calls, query],
                        syncs=[*base.syncs, SyncRecord("event_synchronize", 2300, 2302, 40, 13)],
                        memcpys=base.memcpys, kernels=base.kernels)
    assert [s.api for s in host_syncs(timeline)] == [s.api for s in host_syncs(make_timeline())]
    assert len(analyse(timeline, require_control=True).unexpected_syncs) == 3

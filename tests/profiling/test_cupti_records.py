"""The CUPTI profiler: record conversion on CPU with stand-in records, the real thing on a GPU.

The stand-in module below mirrors what cupti-python 13 exposes (enum names, record field names such as
``copy_kind``, ``dst_kind``, ``flags_``, ``object_id.pt.thread_id``), with CUPTI's own enum values.
"""

from __future__ import annotations

import enum
import itertools
import json
import sys
from types import SimpleNamespace as NS

import pytest
import torch

from profiling.attribution import analyse
from profiling.cupti import (
    CuptiProfiler,
    RecordConverter,
    _RangeClock,
    import_cupti,
    ranges_from_boundaries,
    ranges_from_markers,
)
from profiling.ranges import ALLOW_PREFIX, CONTROL_RANGE, range_listener, region
from profiling.timeline import ApiRecord, KernelRecord, MemcpyRecord, RangeRecord, SyncRecord, Timeline


class ActivityKind(enum.IntEnum):
    MEMCPY, KERNEL, RUNTIME, CONCURRENT_KERNEL, MARKER, SYNCHRONIZATION = 1, 3, 5, 10, 12, 38


FakeCupti = NS(
    ActivityKind=ActivityKind,
    ActivitySynchronizationType=enum.IntEnum(
        "T", {"UNKNOWN": 0, "EVENT_SYNCHRONIZE": 1, "STREAM_WAIT_EVENT": 2, "STREAM_SYNCHRONIZE": 3,
              "CONTEXT_SYNCHRONIZE": 4}),
    ActivityMemcpyKind=enum.IntEnum("C", {"UNKNOWN": 0, "HTOD": 1, "DTOH": 2, "DTOD": 8, "HTOH": 9, "PTOP": 10}),
    ActivityMemoryKind=enum.IntEnum("M", {"UNKNOWN": 0, "PAGEABLE": 1, "PINNED": 2, "DEVICE": 3, "MANAGED": 5}),
    ActivityFlag=enum.IntEnum("F", {"MARKER_INSTANTANEOUS": 1, "MARKER_START": 2, "MARKER_END": 4}),
    ActivityObjectKind=enum.IntEnum("O", {"PROCESS": 1, "THREAD": 2}),
    CallbackDomain=enum.IntEnum("D", {"RUNTIME_API": 2}),
    get_callback_name=lambda domain, cbid: {41: "cudaMemcpyAsync_v3020", 131: "cudaStreamSynchronize_v3020",
                                            211: "cudaLaunchKernel_v7000"}[cbid],
)


def api(cbid, start, end, corr, thread=77):
    return NS(kind=ActivityKind.RUNTIME, cbid=cbid, start=start, end=end, thread_id=thread, correlation_id=corr)


def marker(ts, marker_id, flags, name="", domain="", thread=77):
    return NS(kind=ActivityKind.MARKER, timestamp=ts, id=marker_id, flags_=flags, name=name, domain=domain,
              object_kind=2, object_id=NS(pt=NS(thread_id=thread, process_id=1)))


ITEM_RECORDS = [  # what `.item()` on a CUDA tensor produced (CUPTI_NOTES): copy + stream sync
    api(41, 100, 110, corr=1),
    NS(kind=ActivityKind.MEMCPY, copy_kind=2, src_kind=3, dst_kind=1, bytes=4, start=104, end=106,
       correlation_id=1, stream_id=7),
    api(131, 112, 150, corr=2),
    NS(kind=ActivityKind.SYNCHRONIZATION, type=3, start=112, end=150, correlation_id=2, stream_id=7),
    api(211, 20, 30, corr=3),
    NS(kind=ActivityKind.CONCURRENT_KERNEL, name="vectorized_elementwise_kernel", start=40, end=90,
       correlation_id=3, stream_id=7),
    NS(kind=ActivityKind.SYNCHRONIZATION, type=2, start=31, end=32, correlation_id=4, stream_id=7),
    NS(kind=99),  # a kind the profiler does not use
]


def test_converter_handles_binding_without_marker_end():
    # cupti-python 13.0.1 (seen on an H200 machine) has MARKER_START but no MARKER_END member.
    flags = enum.IntEnum("F", {"MARKER_INSTANTANEOUS": 1, "MARKER_START": 2})
    converter = RecordConverter(NS(**{**vars(FakeCupti), "ActivityFlag": flags}))
    assert (converter.marker_start, converter.marker_end) == (2, 4)


def test_converter_maps_fields_and_enums():
    converter = RecordConverter(FakeCupti)
    records = [converter.convert(r) for r in ITEM_RECORDS]
    assert records == [
        ApiRecord("cudaMemcpyAsync_v3020", 100, 110, 77, 1),
        MemcpyRecord("DtoH", "device", "pageable", 4, 104, 106, 1, 7),
        ApiRecord("cudaStreamSynchronize_v3020", 112, 150, 77, 2),
        SyncRecord("stream_synchronize", 112, 150, 2, 7),
        ApiRecord("cudaLaunchKernel_v7000", 20, 30, 77, 3),
        KernelRecord("vectorized_elementwise_kernel", 40, 90, 3, 7),
        SyncRecord("stream_wait_event", 31, 32, 4, 7),
        None,
    ]


def test_converted_item_is_one_sync_in_its_region():
    converter = RecordConverter(FakeCupti)
    records = [r for r in map(converter.convert, ITEM_RECORDS) if r is not None]
    timeline = Timeline(
        ranges=[RangeRecord("loop", 0, 200, 77), RangeRecord(CONTROL_RANGE, 95, 160, 77),
                RangeRecord(ALLOW_PREFIX + "positive control", 96, 159, 77)],
        api_calls=[r for r in records if isinstance(r, ApiRecord)],
        syncs=[r for r in records if isinstance(r, SyncRecord)],
        memcpys=[r for r in records if isinstance(r, MemcpyRecord)],
        kernels=[r for r in records if isinstance(r, KernelRecord)],
    )
    report = analyse(timeline, require_control=True)
    assert [(s.kind, s.ranges[-1]) for s in report.syncs] == [
        ("stream_synchronize", ALLOW_PREFIX + "positive control")]
    assert report.unexpected_syncs == () and report.ranges[0].kernels == 1


def test_markers_pair_into_regions_of_our_domain():
    converter = RecordConverter(FakeCupti)
    for record in [
        marker(10, 1, 2, "loop", "ltx2"), marker(20, 2, 2, "step 0", "ltx2"), marker(25, 3, 1, "a mark", "ltx2"),
        marker(30, 2, 4), marker(35, 4, 2, "foreign", "other"), marker(36, 4, 4), marker(40, 1, 4),
    ]:
        assert converter.convert(record) is None  # markers are kept aside, not returned
    assert ranges_from_markers(converter.markers) == [
        RangeRecord("step 0", 20, 30, 77), RangeRecord("loop", 10, 40, 77)]


def test_boundaries_pair_per_thread_and_close_at_the_end():
    boundaries = [(1, 1, "loop", 5), (2, 1, "step 0", 5), (3, 1, "worker", 6), (4, -1, "step 0", 5),
                  (5, -1, "worker", 6)]
    assert sorted(ranges_from_boundaries(boundaries, end_time=9), key=lambda r: r.start) == [
        RangeRecord("loop", 1, 9, 5), RangeRecord("step 0", 2, 4, 5), RangeRecord("worker", 3, 5, 6)]


def test_boundaries_closed_out_of_order_pair_by_name():
    """`region` allows closing out of order (a suspended generator); the pairing follows names, as the dispatch
    detector's region stack does, so an `allow_host_sync` window ends when it closed."""
    allow = "allow_host_sync: read timings"
    boundaries = [(0, 1, allow, 1), (10, 1, "pass cond", 1), (20, -1, allow, 1), (30, -1, "pass cond", 1)]
    assert sorted(ranges_from_boundaries(boundaries, end_time=99), key=lambda r: r.start) == [
        RangeRecord(allow, 0, 20, 1), RangeRecord("pass cond", 10, 30, 1)]


def test_range_clock_timestamps_region_boundaries():
    ticks = itertools.count(100)
    clock = _RangeClock(lambda: next(ticks), lambda: 3)
    with range_listener(clock):
        with region("loop"):
            with region("pass cond"):
                pass
    assert ranges_from_boundaries(clock.boundaries, end_time=0) == [
        RangeRecord("pass cond", 101, 102, 3), RangeRecord("loop", 100, 103, 3)]


def test_missing_package_error_says_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupti", None)
    with pytest.raises(ImportError, match=r"pip install 'ltx2-graphs\[cupti\]'"):
        import_cupti()


def test_profiler_arguments_and_cpu_error():
    with pytest.raises(ValueError, match="ranges"):
        CuptiProfiler(ranges="nvtx")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
            with CuptiProfiler():
                pass
    with pytest.raises(RuntimeError, match="after the `with` block"):
        CuptiProfiler().report()


# -- GPU ------------------------------------------------------------------------------------------------------

def _profile(body):
    pytest.importorskip("cupti")
    with CuptiProfiler() as prof:
        body()
    return prof, prof.report()


def _syncs_in(report, name):
    return [s for s in report.unexpected_syncs if s.ranges and s.ranges[-1] == name]


@pytest.mark.cuda
def test_gpu_item_synchronize_and_pageable_copy_are_attributed():
    x = torch.randn(1 << 20, device="cuda")
    pageable = torch.empty(1 << 20)

    def body():
        with region("loop"):
            with region("item"):
                (x * 2).sum().item()
            with region("synchronize"):
                torch.cuda.synchronize()
            with region("pageable copy"):
                pageable.copy_(x, non_blocking=True)  # blocks: the destination is not pinned
                x.add_(1.0)

    _, report = _profile(body)
    assert report.control == "seen"
    assert _syncs_in(report, "item"), report.syncs_table()
    assert {s.kind for s in _syncs_in(report, "synchronize")} & {"context_synchronize", "blocking call"}
    assert _syncs_in(report, "pageable copy"), report.syncs_table()
    rows = {r.name: r for r in report.ranges}
    assert rows["loop"].syncs >= 3 and rows["loop"].kernels >= 1 and rows["pageable copy"].d2h_copies >= 1


@pytest.mark.cuda
def test_gpu_clean_loop_and_graph_replay_have_zero_syncs(tmp_path):
    static = torch.randn(1 << 16, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        (static * 2).sin_()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        (static * 2).sin_()

    def body():
        with region("loop"):
            for step in range(3):
                with region(f"step {step}"):
                    with region("replay cond"):
                        graph.replay()
                    torch.where(static > 0, static, -static).mul_(0.5)

    prof, report = _profile(body)
    assert report.control == "seen" and report.unexpected_syncs == (), report.syncs_table()
    rows = {r.name: r for r in report.ranges}
    assert rows["replay cond"].instances == 3 and rows["replay cond"].kernels >= 3
    assert 0.0 < rows["loop"].gpu_busy_pct <= 100.0
    trace = json.loads(prof.write_trace(tmp_path / "trace.json").read_text())
    assert any(e.get("cat") == "kernel" for e in trace["traceEvents"])
    assert json.loads(report.to_json())["unexpected_syncs"] == 0

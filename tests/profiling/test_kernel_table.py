"""profiling.kernel_table on synthetic records: kernels grouped and clipped to the window, idle gaps over every
stream at once, the window taken from the "loop" regions."""

from __future__ import annotations

from profiling.kernel_table import (
    idle_gaps,
    kernel_report,
    kernel_rows,
    measured_windows,
    short_kernel_name,
)
from profiling.timeline import ApiRecord, KernelRecord, RangeRecord, Timeline


def k(name: str, start: int, end: int, stream: int = 7) -> KernelRecord:
    return KernelRecord(name, start, end, correlation=0, stream=stream)


def test_kernels_grouped_by_name_clipped_to_the_window_most_time_first_ties_by_name():
    kernels = [k("gemm", 0, 3000), k("norm", 3000, 3500), k("gemm", 4000, 6000), k("late", 9500, 12000)]
    rows = kernel_rows(kernels, [(1000, 10000)])
    assert [(r.name, r.calls, r.total_ns) for r in rows] == [("gemm", 2, 4000), ("late", 1, 500), ("norm", 1, 500)]
    assert rows[0].mean_us == 2.0


def test_idle_gaps_count_only_time_when_no_stream_runs_a_kernel():
    kernels = [k("a", 1000, 2000, 7), k("b", 1500, 2500, 8), k("c", 2600, 3000, 7), k("d", 20000, 21000, 8)]
    gaps = idle_gaps(kernels, [(0, 22000)])
    by_label = {label: (n, ns) for label, n, ns in gaps.buckets}
    assert by_label["< 1 us"] == (1, 100)  # 2500 -> 2600: the overlap of a and b is busy, not idle
    assert by_label["< 2 us"] == (2, 2000)  # 0 -> 1000 before the first kernel, 21000 -> 22000 after the last
    assert by_label["< 100 us"] == (1, 17000)  # 3000 -> 20000
    assert gaps.count == 4 and gaps.idle_ns == 19100 and gaps.window_ns == 22000


def test_window_is_the_loop_region_and_its_queued_work_else_all_kernels():
    kernels = (k("a", 50, 60), k("b", 500, 900))
    assert measured_windows(Timeline(kernels=kernels)) == [(50, 900)]
    loop = Timeline(ranges=(RangeRecord("setup", 0, 40, 1), RangeRecord("loop", 100, 800, 1)), kernels=kernels)
    assert measured_windows(loop) == [(100, 900)]  # the GPU finishes what the loop queued: b runs on to 900
    early = Timeline(ranges=(RangeRecord("loop", 100, 400, 1),), kernels=kernels)
    assert measured_windows(early) == [(100, 400)]  # b starts after the loop and no launch record says otherwise
    queued = Timeline(ranges=early.ranges, kernels=(KernelRecord("b", 500, 900, correlation=3, stream=7),),
                      api_calls=(ApiRecord("cudaGraphLaunch_v10000", 300, 310, 1, 3),))
    assert measured_windows(queued) == [(100, 900)]  # launched at 300, inside the loop: the loop's work
    assert measured_windows(Timeline()) == [] and kernel_report(Timeline(), 5) is None


def test_two_loops_are_two_windows_and_no_kernel_is_no_report():
    """Stage 1 and stage 2 are two "loop" regions: the time between them (a VAE, an upsampler) is neither kernel
    time nor idle time of the loops. A window with no kernel (an nsys export without graph node tracing) gives no
    report rather than "0 kernels, GPU busy 0%"."""
    loops = (RangeRecord("loop", 0, 1000, 1), RangeRecord("loop", 5000, 6000, 1))
    kernels = (k("step", 0, 900), k("between_loops", 2000, 4000), k("step", 5000, 5900))
    text, data = kernel_report(Timeline(ranges=loops, kernels=kernels), top=5)
    assert [r["name"] for r in data["top_kernels"]] == ["step"]
    assert (data["window_ns"], data["idle_ns"]) == (2000, 200) and "2 'loop' region(s)" in text
    assert kernel_report(Timeline(ranges=loops), top=5) is None


def test_short_names_drop_return_type_templates_and_arguments():
    name = "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>(int, float)"
    assert short_kernel_name(name) == "at::native::vectorized_elementwise_kernel"
    assert short_kernel_name("nvjet_sm90_tst_128x192") == "nvjet_sm90_tst_128x192"
    assert short_kernel_name("x" * 100, width=10) == "xxxxxxx..."


def test_report_text_and_json_agree():
    timeline = Timeline(ranges=(RangeRecord("loop", 0, 10000, 1),),
                        kernels=(k("gemm", 0, 6000), k("norm", 6500, 7500), k("gemm", 8000, 9000)))
    text, data = kernel_report(timeline, top=1)
    assert "GPU busy 80.0%" in text and "in 3 gaps" in text and "3 kernels of 2 names" in text
    assert data["top_kernels"] == [{"name": "gemm", "calls": 2, "total_ns": 7000}]
    assert data["window_ns"] == 10000 and data["idle_ns"] == 2000
    assert sum(g["gaps"] for g in data["idle_gaps"]) == 3

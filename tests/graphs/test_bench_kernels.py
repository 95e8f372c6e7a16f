"""Kernel time by class (GEMM / attention / other), the benchmark's view of where a pass's time goes."""

from graphs.bench_kernels import kernel_class, kernel_counts_by_class, kernel_counts_by_name, kernel_ms_by_class
from graphs.bench_report import BenchReport, PassRow, format_report, kernel_class_table
from profiling.timeline import KernelRecord
from profiling.timing import TimingStats

SEEN_ON_H200 = {  # kernel names from a torch.profiler run of an 8160-token pass (torch 2.11, cuBLAS, cuDNN)
    "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_bias_TNT": "gemm",
    "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1_cga1x1x1_kernel0_0":
        "attention",
    "void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::BinaryFunctor<":
        "other",
    "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float, true>": "other",
    "triton_tem_fused_addmm_0": "gemm",
    "triton_poi_fused__scaled_dot_product_cudnn_attention_add_mul_3": "other",  # SDPA input layout, not SDPA
    "triton_per_fused_add_mean_mul_rsqrt_5": "other",
}


def test_kernel_names_are_classified():
    assert {name: kernel_class(name) for name in SEEN_ON_H200} == SEEN_ON_H200


def test_kernel_time_is_clipped_to_the_window_and_summed_per_class():
    kernels = [KernelRecord("nvjet_gemm", 0, 2_000_000, 1), KernelRecord("flash_fwd", 2_000_000, 3_000_000, 2),
               KernelRecord("elementwise_kernel", 3_000_000, 3_500_000, 3),
               KernelRecord("elementwise_kernel", 9_000_000, 9_500_000, 4)]  # after the window
    assert kernel_ms_by_class(kernels, 1_000_000, 4_000_000) == {"gemm": 1.0, "attention": 1.0, "other": 0.5}
    # counted where they start: the GEMM began before the window
    by_name = kernel_counts_by_name(kernels + [KernelRecord("flash_fwd", 3_500_000, 3_600_000, 5)],
                                    1_000_000, 4_000_000)
    assert list(by_name.items()) == [("flash_fwd", 2), ("elementwise_kernel", 1)]  # most frequent first
    assert kernel_counts_by_class(by_name) == {"gemm": 0, "attention": 2, "other": 1}


def test_report_prints_the_class_table_only_when_measured():
    report = BenchReport(device="cuda:0", card="card", torch_version="t", diffusers_version=None, date="d",
                         preset="ltx2.3", dtype="bfloat16", text_tokens=1024, peak_tflops=790.0, guidance="hq",
                         repeats=3)
    row = PassRow("ours", "graphs", 8160, "cond", 275_400_000_000_000, timing=TimingStats.from_samples([630.0]))
    report.passes.append(row)
    assert "by class" not in format_report(report)
    row.kernel_ms = {"gemm": 281.8, "attention": 109.4, "other": 218.0}
    text = format_report(report)
    assert "kernel time per pass by class" in text and "281.8" in text and "35.8%" in text
    assert kernel_class_table(report).splitlines()[-1].split("|")[-2].strip() == "-"  # no counts measured
    row.kernel_counts = {"gemm": 993.0, "attention": 288.0, "other": 1176.0}
    assert kernel_class_table(report).splitlines()[-1].split("|")[-2].strip() == "993 / 288 / 1,176"

"""The kernel floor: its list of one block's GEMMs and attention calls (checked against the analytic FLOP count of
the whole pass, on the real ltx2.3 shapes built on the meta device), its arithmetic, its refusals without a GPU,
and a real measurement on the GPU."""

from __future__ import annotations

import pytest
import torch

from graphs.bench_flops import gemm, spec_flops
from graphs.bench_floor import (
    Floor,
    FloorKernel,
    _attention_call,
    _gemm_call,
    _tokens_of,
    block_kernels,
    kernel_alone_ms,
    measure_floor,
)
from graphs.cli import main
from pipeline.config import LatentGrid, ModelConfig
from pipeline.model import build_model
from pipeline.passes import PassSpec


@pytest.mark.parametrize("preset, tokens", [("tiny", 48), ("ltx2.3", 1536), ("ltx2.3", 8160)])
def test_block_kernels_add_up_to_the_analytic_flops_of_a_cond_pass(preset, tokens):
    config = ModelConfig.preset(preset)
    model = build_model(config, device="meta", dtype=torch.bfloat16)  # shapes only, no memory
    grid = LatentGrid.from_tokens(tokens)
    text = 1024
    kernels = block_kernels(model, grid.num_video_tokens, grid.num_audio_tokens, text)
    expected = spec_flops(config, grid, text, PassSpec("cond"))
    patchify_and_out = (2 * gemm(grid.num_video_tokens, config.video_dim, config.in_channels)
                        + 2 * gemm(grid.num_audio_tokens, config.audio_dim, config.audio_in_channels))
    layers = config.num_layers
    assert layers * sum(k.flops for k in kernels if k.kind == "gemm") + patchify_and_out == expected.gemm
    assert layers * sum(k.flops for k in kernels if k.kind == "attention") == expected.attention
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.blocks[0].modules())
    assert sum(k.kind == "gemm" for k in kernels) == linears  # every Linear of the block, once


def test_each_linear_sees_the_right_tokens():
    model = build_model(ModelConfig.preset("tiny"), device="meta", dtype=torch.float32)
    shapes = {k.name: k.shape for k in block_kernels(model, video_tokens=48, audio_tokens=18, text_tokens=16)}
    assert shapes["video_self.qkvg"][0] == 48 and shapes["audio_ff.fc2"][0] == 18
    assert shapes["video_text.kv"][0] == 16 and shapes["audio_text.kv"][0] == 16
    assert shapes["a2v.q_gate"][0] == 48 and shapes["a2v.kv"][0] == 18  # queries video, keys/values audio
    assert shapes["v2a.q_gate"][0] == 18 and shapes["v2a.kv"][0] == 48
    assert shapes["video self-attention"] == (2, 48, 48, 16)


def test_a_linear_without_a_known_token_count_is_an_error():
    with pytest.raises(ValueError, match="no token count known for the Linear 'gate_proj'"):
        _tokens_of("gate_proj")


def test_floor_sums_scale_by_depth():
    kernels = (FloorKernel("fc", "gemm", (1000, 1000, 1000)), FloorKernel("sdpa", "attention", (1, 100, 100, 10)))
    floor = Floor(video_tokens=1000, layers=4, kernels=kernels, ms=(2.0, 0.5), backends=("", "flash"))
    assert floor.pass_ms("gemm") == 8.0 and floor.pass_ms("attention") == 2.0
    assert floor.pass_tflops("gemm") == pytest.approx(4 * 2e9 / 8e-3 / 1e12)
    assert "GEMMs 8.0 ms" in floor.describe() and "sum 10.0 ms" in floor.describe()
    assert floor.to_json()["kernels"][1] == {"name": "sdpa", "kind": "attention", "shape": [1, 100, 100, 10],
                                             "ms": 0.5, "backend": "flash"}


def test_floor_needs_a_gpu():
    model = build_model(ModelConfig.preset("tiny"), device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="needs a GPU model, got device cpu"):
        measure_floor(model, 48, 18, 16)


def test_bench_floor_flag_refused_on_cpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only error")
    code = main(["bench", "--floor", "--no-peer", "--quiet"])
    assert code == 3  # a GPU missing, like every other GPU-only request
    assert "--floor times kernels in CUDA graphs and needs a GPU" in capsys.readouterr().err


@pytest.mark.cuda
def test_floor_on_the_gpu_is_kernel_time_below_the_peak():
    """Rates under the measured matmul peak; a big GEMM's graph time matches its eager time (launch cost
    negligible there); a small attention call's graph time is below its eager, launch-bound time. The eager GEMM
    is timed over as many calls as the floor's (200): a short burst runs above the clock the card holds under its
    power cap (0.265 vs 0.306 ms on an H200 with 20 calls), which is not what this compares."""
    from profiling.timing import matmul_peak_tflops, time_cuda

    model = build_model(ModelConfig.preset("small"), device="cuda", dtype=torch.bfloat16)
    floor = measure_floor(model, video_tokens=1536, audio_tokens=126, text_tokens=1024)
    peak = matmul_peak_tflops(model.device, torch.bfloat16)
    assert all(ms > 0 for ms in floor.ms)
    for kind in ("gemm", "attention"):
        assert 10 < floor.pass_tflops(kind) < 1.05 * peak, kind
    assert all(b in ("cudnn", "flash", "efficient") for k, b in zip(floor.kernels, floor.backends)
               if k.kind == "attention")
    by_name = dict(zip((k.name for k in floor.kernels), floor.ms))
    fc1 = next(k for k in floor.kernels if k.name == "video_ff.fc1")
    eager_fc1 = time_cuda(_gemm_call(fc1, model.device, torch.bfloat16), warmup=20, repeats=200).median_ms
    assert by_name["video_ff.fc1"] == pytest.approx(eager_fc1, rel=0.15)
    small = next(k for k in floor.kernels if k.name == "audio text cross-attention")
    backend = floor.backends[floor.kernels.index(small)]
    eager_small = time_cuda(_attention_call(small, backend, model.device, torch.bfloat16), warmup=3,
                            repeats=20).median_ms
    assert by_name["audio text cross-attention"] < eager_small


@pytest.mark.cuda
def test_min_seconds_replays_a_kernel_long_enough_to_reach_the_sustained_clock():
    a = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)

    def matmul(i=0):
        return a @ a

    matmul()
    windows = []
    ms = kernel_alone_ms(matmul, torch.device("cuda"), min_seconds=0.3, timed_windows=windows)
    (start, end), = windows
    assert ms > 0 and end - start >= 0.25


@pytest.mark.cuda
def test_a_short_window_holds_a_clock_reading():
    """A kernel timed in less than the sampler's interval had no sample in its window (most of a 1536-token
    floor's kernels): `read_clock` reads the clock as the replays end, inside the window."""
    from profiling.gpu_clocks import nvml_sampler

    a = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    sampler, _, why = nvml_sampler(torch.device("cuda"), interval_s=10.0)  # the thread reads once, at the start
    if sampler is None:
        pytest.skip(f"no clock sampler here: {why}")
    windows = []
    with sampler:
        a @ a
        kernel_alone_ms(lambda i=0: a @ a, torch.device("cuda"), timed_windows=windows, read_clock=sampler.read_now)
        summary = sampler.summary_within(windows)
    assert summary is not None and summary.samples >= 1 and summary.sm_mhz_median > 0


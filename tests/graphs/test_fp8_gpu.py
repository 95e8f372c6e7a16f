"""The FP8 model (`pipeline.fp8`) under our per-pass CUDA graphs on a GPU, with the `small` preset in bf16: graph
replays equal eager bitwise, compile + graphs stays as close to eager FP8 as FP8 is to bf16, a graph of the bf16
weights is never replayed after quantizing, and the warm loop makes no host sync."""

from __future__ import annotations

import pytest
import torch

from graphs.executor import GraphExecutor
from pipeline.config import LatentGrid, ModelConfig
from pipeline.denoise import denoise_stage1
from pipeline.executor import EagerExecutor
from pipeline.fp8 import fp8_unsupported, output_error, quantize_fp8
from pipeline.guidance import GuidanceConfig
from pipeline.model import build_model
from pipeline.passes import pass_specs_for
from profiling.syncs import cuda_sync_debug, detect_host_syncs
from tests.graphs.helpers import make_conditioning, make_latents

pytestmark = pytest.mark.cuda


@pytest.mark.filterwarnings("ignore::graphs.errors.GraphMissWarning")
def test_fp8_graphs_compile_and_no_host_sync():
    """The `small` preset quantized: graph replays (no compile) equal eager bitwise; compile + graphs stays as
    close to eager FP8 as FP8 is to bf16; a graph captured before quantizing is never replayed after it; the warm
    loop makes no host sync."""
    if fp8_unsupported("cuda"):
        pytest.skip(fp8_unsupported("cuda"))
    grid = LatentGrid(frames=2, height=4, width=6, audio_tokens=13)
    hq = pass_specs_for(GuidanceConfig.preset("hq"))
    model = build_model(ModelConfig.preset("small"), device="cuda", dtype=torch.bfloat16, seed=0)
    cond = make_conditioning(model.config, grid, device="cuda", text_tokens=16, seed=1)
    video, audio = make_latents(model.config, grid, device="cuda", seed=2)

    def passes(executor):
        if hasattr(executor, "set_conditioning"):
            executor.set_conditioning(cond)
        with torch.no_grad():
            return executor.run(video, audio, 0.5, hq)

    bf16_eager = passes(EagerExecutor(model))
    graphs = GraphExecutor(model, miss_policy="capture")
    graphs.warmup(hq, video, audio, conditioning=cond)
    captures = graphs.stats.captures
    quantize_fp8(model)
    fp8_eager = passes(EagerExecutor(model))
    fp8_graphs = passes(graphs)  # the bf16 graphs are keyed on the old weights version: captured again
    assert graphs.stats.captures == captures + len(hq)
    for name in fp8_eager:
        for out, ref in zip(fp8_graphs[name], fp8_eager[name]):
            assert torch.equal(out, ref), name
    compiled = GraphExecutor(model, compile="default")
    fp8_compiled = passes(compiled)
    for name in fp8_eager:
        for out, ref, bf16 in zip(fp8_compiled[name], fp8_eager[name], bf16_eager[name]):
            fp8_error = output_error(ref, bf16)["relative_error"]
            assert 1e-3 < fp8_error < 0.1, (name, fp8_error)
            assert output_error(out, ref)["relative_error"] <= max(fp8_error, 1e-2), name
    strict = GraphExecutor(model, miss_policy="strict", compile="default")
    strict.warmup(hq, video, audio, conditioning=cond)
    with cuda_sync_debug("error"), detect_host_syncs(mode="raise"):
        result = denoise_stage1(strict, cond, video, audio, seed=3, steps=2, guidance="hq", quiet=True)
    assert strict.stats.misses == 0 and torch.isfinite(result.video).all()
    del model, graphs, compiled, strict
    torch.cuda.empty_cache()

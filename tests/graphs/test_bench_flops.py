"""The analytic FLOP formula against torch's FLOP counter on the real model (tiny preset, math attention, so
every product is an aten matmul the counter sees), for every pass kind; plus the ltx2.3 anchor values."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from graphs.bench_flops import PassShape, TransformerDims, dims_from_config, pass_flops, spec_flops
from pipeline.config import LatentGrid, ModelConfig
from pipeline.model import build_model, timestep_sinusoid
from pipeline.passes import PassSpec
from pipeline.rope import build_rope_tables

SPECS = (
    PassSpec("cond"),
    PassSpec("perturbed", skip_video_self_attn_blocks=(1,), skip_audio_self_attn_blocks=(1,)),
    PassSpec("perturbed", skip_video_self_attn_blocks=(0,), skip_audio_self_attn_blocks=()),
    PassSpec("modality", disable_a2v_cross_attn=True, disable_v2a_cross_attn=True),
    PassSpec("modality", disable_a2v_cross_attn=True),
)


def counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.name}-{s.model_kwargs()}")
def test_formula_equals_torch_flop_counter(spec):
    config = ModelConfig.preset("tiny")
    grid = LatentGrid(frames=2, height=3, width=4, audio_tokens=9)
    text = 5
    model = build_model(config, device="cpu", dtype=torch.float32, seed=0)
    model.attention_backend = "math"
    gen = torch.Generator().manual_seed(0)
    video = torch.randn(1, grid.num_video_tokens, config.in_channels, generator=gen)
    audio = torch.randn(1, grid.audio_tokens, config.audio_in_channels, generator=gen)
    vctx = torch.randn(1, text, config.video_context_dim, generator=gen)
    actx = torch.randn(1, text, config.audio_context_dim, generator=gen)
    sigma = torch.tensor([0.5])
    rope = build_rope_tables(config, grid, device="cpu")
    sinusoid = timestep_sinusoid(sigma[:, None] * config.timestep_scale, model.dtype)
    with torch.no_grad():
        total = counted(lambda: model(video, audio, vctx, actx, sigma, rope, **spec.model_kwargs()))
        # per-sample AdaLN MLPs (the prompt ones run in text_kv): left out of the formula
        adaln = counted(lambda: model.modulation(sigma)) + counted(lambda: model.video_prompt(sinusoid)) + counted(
            lambda: model.audio_prompt(sinusoid))
    assert total - adaln == spec_flops(config, grid, text, spec).total


def test_ltx23_anchor_values():
    """The numbers quoted in graphs/bench_flops.py's docstring (1024 text, 126 audio tokens, batch 1)."""
    dims = dims_from_config(ModelConfig.preset("ltx2.3"))
    assert dims == TransformerDims(48, 4096, 2048, 32, 32, 4096, 2048, 16384, 8192)
    cond_1536 = pass_flops(dims, PassShape(1536, 126, 1024))
    mod_8160 = pass_flops(dims, PassShape(8160, 126, 1024), disable_a2v_cross_attn=True, disable_v2a_cross_attn=True)
    assert round(cond_1536.total / 1e12, 1) == 48.0 and round(cond_1536.attention / 1e12, 1) == 3.3
    assert round(mod_8160.total / 1e12, 1) == 248.0
    # Batch scales linearly; skipping work only ever removes FLOPs.
    assert pass_flops(dims, PassShape(1536, 126, 1024, batch=2)).total == 2 * cond_1536.total
    stg = pass_flops(dims, PassShape(1536, 126, 1024), skip_video_self_attn_blocks=(28,),
                     skip_audio_self_attn_blocks=(28,))
    assert stg.total < cond_1536.total


def test_a_pass_reading_shared_text_kv_does_not_count_their_projections():
    """Graph rows whose pass reads the text keys/values another pass holds (modality, perturbed) do not project
    them: 2 GEMMs [text x context_dim] x [context_dim x dim] per stream and block fewer (4.12 TFLOP at ltx2.3)."""
    dims = dims_from_config(ModelConfig.preset("ltx2.3"))
    shape = PassShape(1536, 126, 1024)
    own = pass_flops(dims, shape, disable_a2v_cross_attn=True, disable_v2a_cross_attn=True)
    shared = pass_flops(dims, shape, disable_a2v_cross_attn=True, disable_v2a_cross_attn=True,
                        text_kv_projected=False)
    per_block = 2 * 2 * 1024 * (4096 * 4096 + 2048 * 2048)  # 2 FLOP per MAC x (k and v), both streams
    assert own.total - shared.total == 48 * per_block and round(per_block * 48 / 1e12, 2) == 4.12
    assert own.attention == shared.attention

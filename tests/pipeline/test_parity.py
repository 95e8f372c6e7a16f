"""This model vs diffusers' LTX2VideoTransformer3DModel (LTX-2.3 configuration), float32 on CPU.

diffusers' random weights go through a diffusers safetensors file and our loader, so the key map, the fused
projections and the block math are all checked at once. Relative error (max |diff| / max |ref|) < 1e-5.
"""

import pytest
import torch
from safetensors.torch import save_file

from pipeline.config import LatentGrid, ModelConfig
from pipeline.model import build_model
from pipeline.rope import build_rope_tables
from pipeline.weights import load_diffusers_transformer
from tests.pipeline.reference import (
    build_reference,
    random_inputs,
    reference_forward,
    relative_error,
)

TOL = 1e-5
GRID = LatentGrid(frames=3, height=2, width=3, audio_tokens=7, fps=25.0)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(ours, diffusers reference) sharing diffusers' random weights via a safetensors file."""
    config = ModelConfig.preset("tiny")
    ref = build_reference(config, seed=1)
    folder = tmp_path_factory.mktemp("diffusers_tiny")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()},
              folder / "diffusion_pytorch_model.safetensors")
    ours = build_model(config, device="cpu", dtype=torch.float32, seed=7)
    load_diffusers_transformer(ours, folder)
    return ours, ref


PASSES = {
    "cond": ({}, {}),
    "stg_block0": (dict(skip_video_self_attn_blocks=(0,), skip_audio_self_attn_blocks=(0,)), dict(stg_blocks=(0,))),
    "stg_block1": (dict(skip_video_self_attn_blocks=(1,), skip_audio_self_attn_blocks=(1,)), dict(stg_blocks=(1,))),
    "modality": (dict(disable_a2v_cross_attn=True, disable_v2a_cross_attn=True), dict(isolate_modalities=True)),
}


@pytest.mark.parametrize("name", list(PASSES))
def test_pass_matches_diffusers(pair, name):
    ours, ref = pair
    ours_kwargs, ref_kwargs = PASSES[name]
    x = random_inputs(ours.config, GRID, batch=2, seed=3)  # two samples with different sigmas
    rope = build_rope_tables(ours.config, GRID, device="cpu")
    with torch.no_grad():
        video, audio = ours(x.video, x.audio, x.video_context, x.audio_context, x.sigma, rope, **ours_kwargs)
    ref_video, ref_audio = reference_forward(ref, GRID, x, **ref_kwargs)
    assert relative_error(video, ref_video) < TOL, f"{name}: video rel err {relative_error(video, ref_video):.2e}"
    assert relative_error(audio, ref_audio) < TOL, f"{name}: audio rel err {relative_error(audio, ref_audio):.2e}"


def test_passes_differ_from_cond(pair):
    """The perturbed and isolated passes really change the output (so the parity above is not vacuous)."""
    ours, _ = pair
    x = random_inputs(ours.config, GRID, batch=1, seed=4)
    rope = build_rope_tables(ours.config, GRID, device="cpu")
    with torch.no_grad():
        outs = {name: ours(x.video, x.audio, x.video_context, x.audio_context, x.sigma, rope, **kw)
                for name, (kw, _) in PASSES.items()}
    for name in ("stg_block0", "stg_block1", "modality"):
        assert relative_error(outs[name][0], outs["cond"][0]) > 1e-3, name
        assert relative_error(outs[name][1], outs["cond"][1]) > 1e-3, name


def test_per_token_sigma_matches_diffusers_image_to_video_call(pair):
    """sigma [B, Nv] (clean first-frame tokens at 0): video AdaLN per token, the rest per sample (max)."""
    ours, ref = pair
    x = random_inputs(ours.config, GRID, batch=2, seed=5)
    first_frame = GRID.height * GRID.width
    per_token = x.sigma[:, None].expand(2, GRID.num_video_tokens).clone()
    per_token[:, :first_frame] = 0.0
    x = type(x)(x.video, x.audio, x.video_context, x.audio_context, per_token)
    rope = build_rope_tables(ours.config, GRID, device="cpu")
    with torch.no_grad():
        video, audio = ours(x.video, x.audio, x.video_context, x.audio_context, x.sigma, rope)
    ref_video, ref_audio = reference_forward(ref, GRID, x)
    assert relative_error(video, ref_video) < TOL
    assert relative_error(audio, ref_audio) < TOL


def test_rope_tables_match_diffusers(pair):
    """Our token-major tables are diffusers' [B, H, N, r] tables transposed."""
    ours, ref = pair
    grid = LatentGrid(frames=4, height=3, width=5, audio_tokens=11, fps=24.0)
    tables = build_rope_tables(ours.config, grid, device="cpu")
    vc = ref.rope.prepare_video_coords(1, grid.frames, grid.height, grid.width, "cpu", fps=grid.fps)
    ac = ref.audio_rope.prepare_audio_coords(1, grid.audio_tokens, "cpu")
    expected = {
        "video": ref.rope(vc), "audio": ref.audio_rope(ac),
        "video_cross": ref.cross_attn_rope(vc[:, 0:1]), "audio_cross": ref.cross_attn_audio_rope(ac[:, 0:1]),
    }
    for name, (cos, sin) in expected.items():
        ours_cos, ours_sin = getattr(tables, name)
        torch.testing.assert_close(ours_cos, cos.transpose(1, 2), rtol=0, atol=1e-6, msg=name)
        torch.testing.assert_close(ours_sin, sin.transpose(1, 2), rtol=0, atol=1e-6, msg=name)

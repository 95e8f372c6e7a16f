"""Test helpers shared by the model, graphs and runner tests: the diffusers reference model and random inputs.

`build_reference(config)` gives diffusers' `LTX2VideoTransformer3DModel` with the LTX-2.3 architecture of
`config` and random weights; `reference_forward` runs it the way the LTX-2.3 pipeline does (timestep = sigma * 1000,
sigma = timestep, use_cross_timestep=True) with a pass's options translated to diffusers' arguments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.config import LatentGrid, ModelConfig
from pipeline.weights import diffusers_config


@dataclass(frozen=True)
class Inputs:
    video: Tensor  # [B, Nv, 128]
    audio: Tensor  # [B, Na, 128]
    video_context: Tensor  # [B, Nt, Dv_ctx]
    audio_context: Tensor  # [B, Nt, Da_ctx]
    sigma: Tensor  # float32 [B] (or [B, Nv])


def random_inputs(config: ModelConfig, grid: LatentGrid, *, batch: int = 1, text_tokens: int = 8, seed: int = 0,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                  sigma: tuple[float, ...] | None = None) -> Inputs:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    sig = sigma if sigma is not None else tuple(0.3 + 0.6 * i / max(1, batch - 1) for i in range(batch))
    return Inputs(
        video=randn(batch, grid.num_video_tokens, config.in_channels),
        audio=randn(batch, grid.audio_tokens, config.audio_in_channels),
        video_context=randn(batch, text_tokens, config.video_context_dim),
        audio_context=randn(batch, text_tokens, config.audio_context_dim),
        sigma=torch.tensor(sig, dtype=torch.float32).to(device),
    )


def build_reference(config: ModelConfig, *, seed: int = 0, randomize: bool = True):
    """diffusers' LTX-2.3 transformer for `config` (float32, CPU), every parameter random (norm weights and
    gate biases included, so a wrong key mapping cannot hide behind a default init)."""
    from diffusers import LTX2VideoTransformer3DModel

    torch.manual_seed(seed)
    ref = LTX2VideoTransformer3DModel(**diffusers_config(config)).eval()
    if randomize:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in ref.named_parameters():
                noise = torch.randn(p.shape, generator=gen)
                if "norm_q" in name or "norm_k" in name:
                    p.copy_(1.0 + 0.2 * noise)
                elif p.ndim == 1:
                    p.copy_(0.1 * noise)
                else:
                    p.copy_(noise / math.sqrt(p.shape[-1]))
    return ref


def reference_forward(ref, grid: LatentGrid, inputs: Inputs, *, stg_blocks: tuple[int, ...] = (),
                      isolate_modalities: bool = False) -> tuple[Tensor, Tensor]:
    """Run the diffusers model like the LTX-2.3 pipeline. Per-token sigma [B, Nv] follows the image-to-video
    pipeline: video timestep per token, audio timestep and sigma per sample (the max over tokens)."""
    sigma = inputs.sigma
    per_sample = sigma if sigma.ndim == 1 else sigma.amax(dim=1)
    with torch.no_grad():
        return ref(
            hidden_states=inputs.video, audio_hidden_states=inputs.audio,
            encoder_hidden_states=inputs.video_context, audio_encoder_hidden_states=inputs.audio_context,
            timestep=sigma * 1000.0, audio_timestep=per_sample * 1000.0, sigma=per_sample * 1000.0,
            num_frames=grid.frames, height=grid.height, width=grid.width, fps=grid.fps,
            audio_num_frames=grid.audio_tokens, isolate_modalities=isolate_modalities,
            spatio_temporal_guidance_blocks=list(stg_blocks) or None, use_cross_timestep=True, return_dict=False)


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """max |a - e| / max |e| (float64), one number per comparison."""
    a, e = actual.double(), expected.double()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()

"""Split rotary position tables, built once per latent grid, outside the model's forward.

Building coordinates inside forward (from Python lists, on the device) is a blocking host->device copy and
breaks graph capture; here the four tables (video self, audio self, and the temporal-only tables of the A2V/V2A
cross-attention) are made once and handed to every forward of that grid.

Math (the reference's "split" RoPE, bit for bit where it matters): each token's position is the midpoint of its
patch's [start, end) bounds in pixel / second units (the first video frame is causal: it starts at 0 and ends at
1/fps), divided by the maximum positions; per axis `theta ** linspace(0, 1, dim // (2 * axes))` (float64, then
float32) times pi/2, times `2 * pos - 1`; axes interleaved per frequency, front-padded with cos=1, sin=0 to
`dim / 2` and split over the heads. A head's two halves are rotated as (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.config import LatentGrid, ModelConfig, is_int

CosSin = tuple[Tensor, Tensor]


@dataclass(frozen=True, eq=False)
class RopeTables:
    """Float32 (cos, sin) pairs of shape [B, N, H_rope, r] (token-major, like the activations they rotate).

    video: [B, Nv, video_heads, video_head_dim / 2]; audio: [B, Na, audio_heads, audio_head_dim / 2];
    video_cross / audio_cross: the A2V/V2A tables (temporal coordinate only, audio width), [B, N, H, audio_dim / 2H]
    with H = video_heads on the video side and audio_heads on the audio side, as in the reference.
    The batch dimension is an expanded view (batch_size copies cost no memory).

    The tables are what places tokens on a grid: latents [B, N, C] carry no grid, so tables of another grid with
    the same token counts (384x256 and 256x384 both have 1536 tokens) cannot be told apart here. Build them from
    the grid the latents will be decoded with.
    """

    video: CosSin
    audio: CosSin
    video_cross: CosSin
    audio_cross: CosSin

    @property
    def num_video_tokens(self) -> int:
        return self.video[0].shape[1]

    @property
    def num_audio_tokens(self) -> int:
        return self.audio[0].shape[1]

    @property
    def batch_size(self) -> int:
        return self.video[0].shape[0]

    @property
    def device(self) -> torch.device:
        return self.video[0].device

    def tensors(self) -> tuple[Tensor, ...]:
        return (*self.video, *self.audio, *self.video_cross, *self.audio_cross)

    def check_fits(self, video: Tensor, audio: Tensor, *, name: str = "rope") -> None:
        """ValueError unless these tables serve latents video [B, Nv, C] and audio [B, Na, C]: batch 1 or B, and the
        latents' token counts (named as the latents' fault, the likelier one). Metadata only."""
        b = video.shape[0]
        if self.batch_size not in (1, b):
            raise ValueError(f"{name} was built for batch size {self.batch_size}, but the latents have batch {b} "
                             "(RoPE tables serve batch 1 or the latents' batch)")
        for stream, n, built in (("video", video.shape[1], self.num_video_tokens),
                                 ("audio", audio.shape[1], self.num_audio_tokens)):
            if n != built:
                raise ValueError(f"{stream} has {n} tokens but the RoPE tables were built for {built}")


def video_coords(config: ModelConfig, grid: LatentGrid, device: torch.device | str) -> Tensor:
    """Patch bounds of every video token in pixel units (time in seconds): [3, Nv, 2] float32 (t, h, w; start, end)."""
    f, h, w = (torch.arange(n, dtype=torch.float32, device=device) for n in (grid.frames, grid.height, grid.width))
    starts = torch.stack(torch.meshgrid(f, h, w, indexing="ij"), dim=0).flatten(1)  # [3, Nv] latent units
    bounds = torch.stack([starts, starts + 1], dim=-1)  # [3, Nv, 2]
    scale = torch.tensor(config.vae_scale_factors, dtype=torch.float32, device=device)
    pixels = bounds * scale.view(3, 1, 1)
    # The causal VAE maps the first latent frame to one pixel frame: shift by (offset - 8) and clamp at 0.
    t = (pixels[0] + config.causal_offset - config.vae_scale_factors[0]).clamp(min=0) / grid.fps
    return torch.cat([t[None], pixels[1:]], dim=0)


def audio_coords(config: ModelConfig, grid: LatentGrid, device: torch.device | str) -> Tensor:
    """Bounds of every audio token in seconds: [1, Na, 2] float32."""
    s = config.audio_scale_factor
    f = torch.arange(grid.audio_tokens, dtype=torch.float32, device=device)
    start = (f * s + config.causal_offset - s).clip(min=0) * config.audio_hop_length / config.audio_sampling_rate
    end = ((f + 1) * s + config.causal_offset - s).clip(min=0) * config.audio_hop_length / config.audio_sampling_rate
    return torch.stack([start, end], dim=-1)[None]  # [1, Na, 2]


def split_rope_table(coords: Tensor, max_pos: tuple[float, ...], *, dim: int, heads: int, theta: float) -> CosSin:
    """(cos, sin), each [N, heads, dim / (2 heads)] float32, from patch bounds `coords` [axes, N, 2]."""
    axes = coords.shape[0]
    pos = coords.mean(dim=-1)  # [axes, N] patch midpoints
    grid = torch.stack([pos[i] / max_pos[i] for i in range(axes)], dim=-1)  # [N, axes]
    exponents = torch.linspace(0.0, 1.0, dim // (2 * axes), dtype=torch.float64, device=coords.device)
    freqs = (torch.pow(theta, exponents) * math.pi / 2.0).to(torch.float32)  # [F]
    angles = (grid.unsqueeze(-1) * 2 - 1) * freqs  # [N, axes, F]
    angles = angles.transpose(-1, -2).flatten(1)  # [N, F * axes], axes interleaved per frequency
    n, pad = angles.shape[0], dim // 2 - angles.shape[-1]
    cos, sin = angles.cos(), angles.sin()
    if pad:  # shaped explicitly: below 2 * axes columns there are no frequencies, and `cos` has no columns
        cos = torch.cat([cos.new_ones(n, pad), cos], dim=-1)
        sin = torch.cat([sin.new_zeros(n, pad), sin], dim=-1)
    return cos.reshape(n, heads, -1), sin.reshape(n, heads, -1)  # [N, H, r]


def build_rope_tables(config: ModelConfig, grid: LatentGrid, *, device: torch.device | str,
                      batch_size: int = 1) -> RopeTables:
    """All RoPE tables for `grid`, on `device`. Call once per grid (and batch size), before any forward/capture."""
    if not isinstance(config, ModelConfig):
        raise ValueError(f"config must be a ModelConfig, got {type(config).__name__}")
    if not isinstance(grid, LatentGrid):
        raise ValueError(f"grid must be a LatentGrid (e.g. LatentGrid.from_pixels(...)), got {grid!r}")
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    v = video_coords(config, grid, device)  # [3, Nv, 2]
    a = audio_coords(config, grid, device)  # [1, Na, 2]
    cross_max = (max(config.video_max_pos[0], config.audio_max_pos),)
    theta = config.rope_theta
    tables = (
        split_rope_table(v, config.video_max_pos, dim=config.video_dim, heads=config.video_heads, theta=theta),
        split_rope_table(a, (config.audio_max_pos,), dim=config.audio_dim, heads=config.audio_heads, theta=theta),
        split_rope_table(v[:1], cross_max, dim=config.audio_dim, heads=config.video_heads, theta=theta),
        split_rope_table(a, cross_max, dim=config.audio_dim, heads=config.audio_heads, theta=theta),
    )
    batched = [tuple(t.unsqueeze(0).expand(batch_size, *t.shape) for t in pair) for pair in tables]
    return RopeTables(*batched)


def apply_split_rope(x: Tensor, rope: CosSin) -> Tensor:
    """Rotate `x` [B, N, H_rope * 2r] with (cos, sin) [B or 1, N, H_rope, r]; computed in float32 like the
    reference, returned in x's dtype."""
    cos, sin = rope
    xs = x.float().unflatten(-1, (cos.shape[-2], 2, cos.shape[-1]))  # [B, N, H, 2, r]
    x1, x2 = xs.unbind(-2)  # [B, N, H, r] each
    out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-2)  # [B, N, H, 2, r]
    return out.flatten(2).to(x.dtype)  # [B, N, H * 2r]

"""Seeded noise on the latents' device: the initial latents, stage-2 re-noising and res2s SDE noise.

Every draw uses an explicit `torch.Generator` on the latents' device, so the same seed gives bitwise
identical latents run after run, and drawing never synchronises the host (generators and `randn` stay on
the device; only Python ints seed them).

Streams: each stage derives its own seeds from the user seed (`derive_seed(seed, stage, stream)`), so
stage 2 does not replay stage 1's noise and the res2s "step" and "substep" noise come from two separate
generators, as in the reference (which seeds them with fixed constants, re-seeded per stage). Within a
stream the draws come in a fixed order: video, then audio.

SDE noise is drawn in float64, standardised over the whole tensor, then per batch item over (tokens,
channels) - the reference's `_get_new_noise`.

A batch is one draw, not B single draws: item i of a batch-B run differs from a batch-1 run with the same seed
(its values sit elsewhere in the stream: after the earlier items', and the audio's after the whole batch's
video noise; the whole-tensor standardisation also mixes the items). The transformer passes themselves are
batch-independent; to reproduce an item on its own, run it with batch 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.config import is_int

_MASK64 = (1 << 64) - 1
# Streams mixed into derived seeds by position (append only: reordering changes every generated latent).
STREAMS = ("init", "step", "substep", "renoise")


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def validate_seed(seed: object, *, name: str = "seed") -> int:
    """A user seed is a Python int in [0, 2**63)."""
    if not is_int(seed) or not 0 <= seed < 2**63:
        raise ValueError(f"{name} must be an int in [0, 2**63), got {seed!r}")
    return seed


def derive_seed(seed: int, stage: int, stream: str) -> int:
    """A 63-bit seed for one (stage, stream), mixed from the user seed with splitmix64 (pure host math)."""
    validate_seed(seed)
    if stream not in STREAMS:
        raise ValueError(f"stream must be one of {STREAMS}, got {stream!r}")
    x = _splitmix64(seed)
    x = _splitmix64(x ^ (stage & _MASK64))
    x = _splitmix64(x ^ (STREAMS.index(stream) + 1))
    return x >> 1


def generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A fresh generator on `device` seeded with `seed`."""
    return torch.Generator(device=torch.device(device)).manual_seed(seed)


def standard_noise(like: Tensor, gen: torch.Generator) -> Tensor:
    """float64 noise shaped like `like` [B, N, C]: standardised globally, then per item over (N, C).

    Never synchronises the host.
    """
    noise = torch.randn(like.shape, generator=gen, dtype=torch.float64, device=like.device)
    noise = (noise - noise.mean()) / noise.std()
    return (noise - noise.mean(dim=(-2, -1), keepdim=True)) / noise.std(dim=(-2, -1), keepdim=True)


@dataclass(frozen=True)
class NoiseSeeds:
    """Seeds of the two res2s SDE noise streams of one stage."""

    step: int
    substep: int

    @classmethod
    def for_stage(cls, seed: int, stage: int) -> NoiseSeeds:
        return cls(step=derive_seed(seed, stage, "step"), substep=derive_seed(seed, stage, "substep"))


class SdeNoise:
    """The res2s noise source of one stage: separate step and substep generators on one device.

    Called as `noise(kind, like)` with kind "step" or "substep"; returns one float64 standard-noise tensor
    per latent in `like`, drawn in order from that kind's generator. Never synchronises the host.
    """

    def __init__(self, seeds: NoiseSeeds, device: torch.device | str):
        self._generators = {"step": generator(seeds.step, device), "substep": generator(seeds.substep, device)}

    def __call__(self, kind: str, like: Sequence[Tensor]) -> tuple[Tensor, ...]:
        if kind not in self._generators:
            raise ValueError(f"noise kind must be 'step' or 'substep', got {kind!r}")
        gen = self._generators[kind]
        return tuple(standard_noise(x, gen) for x in like)


def initial_latents(
    video_shape: Sequence[int],
    audio_shape: Sequence[int],
    *,
    seed: int,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    stage: int = 1,
) -> tuple[Tensor, Tensor]:
    """Pure-noise starting latents (sigma = 1) for text-to-video stage 1: video then audio, one generator.

    `stage` picks whose "init" stream draws them: 2 for stage 2 started without stage 1 (a benchmark of stage 2
    alone), so those latents are no other seed's stage-1 noise."""
    gen = generator(derive_seed(seed, stage, "init"), device)
    video = torch.randn(tuple(video_shape), generator=gen, dtype=dtype, device=device)
    audio = torch.randn(tuple(audio_shape), generator=gen, dtype=dtype, device=device)
    return video, audio


def renoise(latents: Sequence[Tensor], sigma: float, gen: torch.Generator) -> tuple[Tensor, ...]:
    """Flow-matching re-noising to `sigma`: `x * (1 - sigma) + n * sigma`, n ~ N(0, 1) in each dtype.

    Used by stage 2 to put the refined latents back at the first distilled sigma. Never synchronises the host.
    """
    out = []
    for x in latents:
        n = torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device)
        out.append(x * (1.0 - sigma) + n * sigma)
    return tuple(out)


__all__ = [
    "NoiseSeeds",
    "SdeNoise",
    "derive_seed",
    "generator",
    "initial_latents",
    "renoise",
    "standard_noise",
    "validate_seed",
]

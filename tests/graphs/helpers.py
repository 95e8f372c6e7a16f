"""Helpers for the graph tests: a model, conditioning and latents on any device, and a CPU stand-in pool.

`FakePool` replaces `graphs.capture.GraphPool` on CPU so the executor's own logic (keys, misses, policies,
replay order, held outputs, static inputs) runs in CI without a GPU: "capture" runs the pass once into held
output tensors, and "replay" recomputes it from the static inputs and copies the result into those same
tensors - the observable behaviour of a static CUDA graph with static outputs - and poisons the held outputs
of the graphs captured after it, the worst a shared pool allows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from graphs import trees
from graphs.capture import PassGraph
from pipeline.config import LatentGrid, ModelConfig
from pipeline.executor import Conditioning, Velocity, random_conditioning
from pipeline.model import build_model


def tiny_model(device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    return build_model(ModelConfig.preset("tiny"), device=device, dtype=dtype, seed=seed)


def make_conditioning(config: ModelConfig, grid: LatentGrid, *, device, dtype=torch.float32, text_tokens: int = 8,
                      seed: int = 1, batch: int = 1) -> Conditioning:
    """Random positive/negative text contexts (seeded, made on the CPU then moved) and the grid's RoPE tables."""
    return random_conditioning(config, grid, generator=torch.Generator().manual_seed(seed), text_tokens=text_tokens,
                               batch=batch, device=device, dtype=dtype)


def make_latents(config: ModelConfig, grid: LatentGrid, *, device, seed: int = 2, batch: int = 1,
                 dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    video = torch.randn(batch, grid.num_video_tokens, config.in_channels, generator=gen)
    audio = torch.randn(batch, grid.audio_tokens, config.audio_in_channels, generator=gen)
    return video.to(device=device, dtype=dtype), audio.to(device=device, dtype=dtype)


class FakeGraph:
    """Stands in for a captured CUDA graph: replay recomputes the pass into the held outputs (velocities and,
    for a producing pass, the text keys/values), then poisons (NaN) the held outputs of every graph of its pool
    captured after it: in a real pool its temporaries may sit where those were placed, so nothing may read them
    until they are recomputed. A replay-order bug in the executor shows up as NaN, not as a lucky pass."""

    def __init__(self, fn, held: list[Tensor], name: str, log: list[str], captured_after: list[FakeGraph]) -> None:
        self.fn, self.held, self.name, self.log = fn, held, name, log
        self.captured_after = captured_after

    def replay(self) -> None:
        self.log.append(self.name)
        with torch.no_grad():
            fresh = trees.tensor_leaves(self.fn())
        for dst, src in zip(self.held, fresh, strict=True):
            dst.copy_(src)
        for later in self.captured_after:
            for t in later.held:
                t.fill_(float("nan"))


class FakePool:
    """CPU stand-in for `graphs.capture.GraphPool` (same `capture` and `reserved_bytes` signatures)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.replayed: list[str] = []  # pass names in replay order
        self.captured: list[str] = []
        self._graphs: list[FakeGraph] = []  # in capture order

    def capture(self, key, fn, static, *, order: int, warmup_iters: int = 2, warmup_fn=None) -> PassGraph:
        with torch.no_grad():
            for _ in range(warmup_iters):
                (warmup_fn or fn)()
            out = trees.map_tensors(fn(), torch.clone)
        self.captured.append(key.pass_name)
        graph = FakeGraph(fn, trees.tensor_leaves(out), key.pass_name, self.replayed, captured_after=[])
        for earlier in self._graphs:
            earlier.captured_after.append(graph)
        self._graphs.append(graph)
        return PassGraph(key, graph, Velocity(*out.velocity), static, order, 0.0, 0.0, out.text_kv)

    def reserved_bytes(self) -> int:
        return 0

"""Which SDPA backend runs the self-attention fastest at each shape: measured, not assumed.

The video self-attention (`[B, heads, N, head_dim]`, N = video tokens) is the one attention that grows with the
square of the grid, so its backend decides most of the attention time: on an H200 at 8160 tokens cuDNN took
1.74 ms, flash 3.20 ms and memory-efficient 6.32 ms, while at small grids the order can change. This module
times SDPA alone on that shape for each backend PyTorch can run there and picks the fastest per shape;
`ltx2-graphs bench --attention measure` pins the winner on the model (`model.attention_backend`, part of every
graph key) before each shape's rows and prints the timings, so the choice is shown, not asserted.

The model's other attentions (text cross-attention, A2V/V2A, audio) run under the same backend. Timing those
small calls alone misleads (an eager loop of them is launch-bound: cuDNN's 10.8 us A2V kernel times as ~80 us),
and pinning flash for them inside the compiled graphs made every pass slower (+2 to +10 ms on an H200;
profiling/PERF_LOG.md), so they are not measured or pinned separately.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

from pipeline.config import ModelConfig
from pipeline.model import ATTENTION_BACKENDS
from profiling.timing import TimingStats, time_cuda

CANDIDATES = ("cudnn", "flash", "efficient")  # "math" materialises N x N scores: never the fastest on a GPU


@dataclass(frozen=True)
class BackendChoice:
    """SDPA timings of one video self-attention shape and the fastest backend."""

    tokens: int
    median_ms: dict[str, float]  # backend -> median ms; backends that cannot run this shape are left out
    errors: dict[str, str]  # backend -> why it could not run

    @property
    def best(self) -> str:
        """The fastest backend, or "auto" (PyTorch's own choice) when none could run."""
        return min(self.median_ms, key=self.median_ms.get) if self.median_ms else "auto"

    def describe(self) -> str:
        timings = ", ".join(f"{name} {ms:.3f} ms" for name, ms in sorted(self.median_ms.items(), key=lambda kv: kv[1]))
        skipped = "".join(f"; {name} cannot run ({why})" for name, why in self.errors.items())
        return f"{self.tokens} tokens: {timings or 'no backend ran'}{skipped} -> {self.best}"


Timer = Callable[[Callable[[], object]], TimingStats]


def measure_self_attention(config: ModelConfig, tokens: int, *, device: torch.device, dtype: torch.dtype,
                           backends: Sequence[str] = CANDIDATES, timer: Timer | None = None) -> BackendChoice:
    """Time SDPA on the video self-attention shape `[1, video_heads, tokens, video_head_dim]` per backend.

    `timer` defaults to CUDA events on `device`'s current stream (`time_cuda`): events of another GPU than the one
    the calls run on would time nothing."""
    if timer is None:
        timer = lambda fn: time_cuda(fn, warmup=3, repeats=20, device=device)  # noqa: E731
    unknown = [b for b in backends if b not in ATTENTION_BACKENDS or b == "auto"]
    if unknown:
        known = sorted(set(ATTENTION_BACKENDS) - {"auto"})
        raise ValueError(f"backends {unknown} are not SDPA backends; expected some of {known}")
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, config.video_heads, tokens, config.video_head_dim, device=device, dtype=dtype,
                           generator=gen) for _ in range(3))  # [B, H, N, D]
    timings: dict[str, float] = {}
    errors: dict[str, str] = {}
    for name in backends:
        def attend(backend=ATTENTION_BACKENDS[name]):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v)

        try:
            timings[name] = timer(attend).median_ms
        except RuntimeError as e:  # "No available kernel" for this shape/dtype/card
            errors[name] = str(e).splitlines()[0][:80]
    return BackendChoice(tokens, timings, errors)

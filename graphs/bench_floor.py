"""The kernel floor of a cond pass: every GEMM and attention call of one block timed alone, times the depth.

Why: a speed target is only meaningful next to what the big kernels cost by themselves. The pass's GEMMs and
SDPA calls are taken from the model itself (block 0's `nn.Linear` shapes, with the token count each one sees;
the attention shapes from the config), each is timed alone at its pass shape, and the sums are scaled by the
number of blocks. Elementwise work (norms, modulation, gates, residuals, RoPE) and the patchify/output
projections are left out: the floor is what no fusion can remove.

How each kernel is timed: `calls` calls captured in one CUDA graph, replayed; per-call time = replay time /
calls. Timed eagerly one by one, a small call measures its launch, not its kernel (cuDNN's A2V call at 1536
tokens: ~80 us in an eager loop, 10.8 us as a graph kernel). Each attention call takes its fastest SDPA backend,
with separate K and V; weights small enough to stay in L2 are rotated over copies, so no call reads them hot.
On an H200 (profiling/PERF_LOG.md) the GEMMs alone run at ~680-710 TFLOP/s at these shapes, below the short
square-matmul peak the benchmark reports: sustained clocks are lower than a burst's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import sdpa_kernel

from graphs.bench_attention import CANDIDATES
from graphs.bench_flops import gemm
from pipeline.model import ATTENTION_BACKENDS
from profiling.syncs import allow_host_sync
from profiling.timing import time_cuda

# Which tokens each Linear of an AudioVideoBlock sees (longest matching prefix of its module path).
TOKENS_OF = {
    "video_self": "video", "audio_self": "audio",
    "video_text": "video", "video_text.kv": "text", "audio_text": "audio", "audio_text.kv": "text",
    "a2v": "video", "a2v.kv": "audio",  # queries from video, keys/values from audio
    "v2a": "audio", "v2a.kv": "video",
    "video_ff": "video", "audio_ff": "audio",
}


@dataclass(frozen=True)
class FloorKernel:
    """One GEMM ([rows, k] x [k, n]) or SDPA call ([heads, q_len, kv_len, head_dim]) of one block."""

    name: str
    kind: str  # "gemm" | "attention"
    shape: tuple[int, ...]

    @property
    def flops(self) -> int:
        if self.kind == "gemm":
            rows, k, n = self.shape
            return gemm(rows, n, k)
        heads, q_len, kv_len, head_dim = self.shape
        return 2 * gemm(q_len, kv_len, heads * head_dim)  # QK^T and PV


@dataclass(frozen=True)
class Floor:
    """Per-call times (ms) of one block's kernels, and the per-pass sums over `layers` blocks."""

    video_tokens: int
    layers: int
    kernels: tuple[FloorKernel, ...]
    ms: tuple[float, ...]  # per call, aligned with `kernels`
    backends: tuple[str, ...]  # the SDPA backend that won each attention call ("" for GEMMs)

    def pass_ms(self, kind: str) -> float:
        return self.layers * sum(ms for k, ms in zip(self.kernels, self.ms) if k.kind == kind)

    def pass_tflops(self, kind: str) -> float:
        flops = self.layers * sum(k.flops for k in self.kernels if k.kind == kind)
        return flops / (self.pass_ms(kind) * 1e-3) / 1e12

    def describe(self) -> str:
        gemm_ms, attention_ms = self.pass_ms("gemm"), self.pass_ms("attention")
        return (f"{self.video_tokens} tokens, cond pass, each kernel alone: GEMMs {gemm_ms:.1f} ms "
                f"({self.pass_tflops('gemm'):.0f} TFLOP/s), attention {attention_ms:.1f} ms "
                f"({self.pass_tflops('attention'):.0f} TFLOP/s), sum {gemm_ms + attention_ms:.1f} ms")

    def to_json(self) -> dict:
        return {
            "video_tokens": self.video_tokens, "layers": self.layers,
            "gemm_ms": self.pass_ms("gemm"), "attention_ms": self.pass_ms("attention"),
            "kernels": [{"name": k.name, "kind": k.kind, "shape": list(k.shape), "ms": ms, "backend": b}
                        for k, ms, b in zip(self.kernels, self.ms, self.backends)],
        }


def _tokens_of(path: str) -> str:
    matches = [prefix for prefix in TOKENS_OF if path == prefix or path.startswith(prefix + ".")]
    if not matches:
        raise ValueError(f"bench_floor: no token count known for the Linear {path!r}; add it to TOKENS_OF")
    return TOKENS_OF[max(matches, key=len)]


def block_kernels(model: nn.Module, video_tokens: int, audio_tokens: int, text_tokens: int) -> list[FloorKernel]:
    """The GEMMs and SDPA calls of one block in a cond pass (every sublayer on, no STG skip) of a bf16 model (an
    FP8 one is refused: the floor times bf16 GEMMs, the `nn.Linear`s found here)."""
    from pipeline.fp8 import is_quantized

    if is_quantized(model):
        raise ValueError("block_kernels: the floor is of bf16 GEMMs; measure it before quantize_fp8")
    tokens = {"video": video_tokens, "audio": audio_tokens, "text": text_tokens}
    kernels = [
        FloorKernel(path, "gemm", (tokens[_tokens_of(path)], module.in_features, module.out_features))
        for path, module in model.blocks[0].named_modules()
        if isinstance(module, nn.Linear)
    ]
    c = model.config
    hv, dv, ha, da = c.video_heads, c.video_head_dim, c.audio_heads, c.audio_head_dim
    n, m, t = video_tokens, audio_tokens, text_tokens
    kernels += [
        FloorKernel("video self-attention", "attention", (hv, n, n, dv)),
        FloorKernel("video text cross-attention", "attention", (hv, n, t, dv)),
        FloorKernel("audio self-attention", "attention", (ha, m, m, da)),
        FloorKernel("audio text cross-attention", "attention", (ha, m, t, da)),
        FloorKernel("a2v cross-attention", "attention", (ha, n, m, da)),
        FloorKernel("v2a cross-attention", "attention", (ha, m, n, da)),
    ]
    return kernels


def kernel_alone_ms(fn: Callable[[], object], device: torch.device, *, calls: int = 20, repeats: int = 10,
                    min_seconds: float = 0.0, timed_windows: list[tuple[float, float]] | None = None,
                    read_clock: Callable[[], object] | None = None) -> float:
    """Per-call device time of `fn`'s kernels: `calls` calls in one CUDA graph, replayed (no launch cost).

    `fn` must already have run once eagerly (library set-up: cuBLAS handles, cuDNN plans). `fn(i)` is called with
    the call's index, so a caller can rotate its operands (see `_gemm_call`). Capture runs on an explicit stream
    of `device`, as every capture in this package does.

    `min_seconds` > 0 replays for about that long (more repeats, sized from a first run with a 25% margin, since
    replays speed up as the clock climbs), so a card at its power limit settles at the
    clock a back-to-back loop sustains instead of timing a burst at its boost clock. `timed_windows` gets the
    (start, end) time.monotonic() of the timed replays, so a clock sampler can read the clock of the kernels
    apart from the set-up around them; `read_clock` (`ClockSampler.read_now`) is called as the replays end,
    inside the window, so a window shorter than the sampler's interval still holds one reading.
    """
    stream = torch.cuda.Stream(device=device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.device(device), allow_host_sync("floor measurement: capture"):
        torch.cuda.synchronize(device)
        with torch.cuda.graph(graph, stream=stream):
            for i in range(calls):
                fn(i)
    if min_seconds > 0:  # sized from a short run, with a margin: replays get faster as the clock climbs
        replay_ms = time_cuda(graph.replay, warmup=10, repeats=5, device=device).median_ms
        repeats = max(repeats, math.ceil(1.25 * min_seconds * 1e3 / replay_ms))
    started = time.monotonic()
    ms = time_cuda(graph.replay, warmup=2, repeats=repeats, device=device).median_ms / calls
    if read_clock is not None:
        read_clock()
    if timed_windows is not None:
        timed_windows.append((started, time.monotonic()))
    return ms


def _gemm_call(kernel: FloorKernel, device: torch.device, dtype: torch.dtype) -> Callable[[int], object]:
    """`F.linear` at the kernel's shape. A weight that fits in L2 (the audio stream's, at 126 rows) would be read
    from cache by repeated calls, while the pass reads each block's weights cold: such weights get enough copies,
    used in turn, to exceed twice the L2 size."""
    rows, k, n = kernel.shape
    x = torch.randn(rows, k, device=device, dtype=dtype)  # [rows, K]
    weight_bytes = n * k * x.element_size()
    l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size
    copies = max(1, -(-2 * l2_bytes // weight_bytes))  # ceil
    weights = [torch.randn(n, k, device=device, dtype=dtype) * k**-0.5 for _ in range(copies)]  # [N, K] each
    biases = [torch.randn(n, device=device, dtype=dtype) for _ in range(copies)]
    return lambda i=0: F.linear(x, weights[i % copies], biases[i % copies])


def _attention_call(kernel: FloorKernel, backend: str, device: torch.device,
                    dtype: torch.dtype) -> Callable[[int], object]:
    """SDPA at the kernel's shape under one backend, with separate K and V laid out as the model passes them
    ([B, N, H*D] projections viewed as [B, H, N, D])."""
    heads, q_len, kv_len, head_dim = kernel.shape

    def heads_view(tokens: int):
        return torch.randn(1, tokens, heads * head_dim, device=device, dtype=dtype).view(
            1, tokens, heads, head_dim).transpose(1, 2)  # [B, H, N, D]

    q, k, v = heads_view(q_len), heads_view(kv_len), heads_view(kv_len)
    sdp_backend = ATTENTION_BACKENDS[backend]

    def run(i=0):
        with sdpa_kernel([sdp_backend]):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def measure_floor(model: nn.Module, video_tokens: int, audio_tokens: int, text_tokens: int, *,
                  min_seconds: float = 0.0, timed_windows: list[tuple[float, float]] | None = None,
                  read_clock: Callable[[], object] | None = None) -> Floor:
    """Time every kernel of `block_kernels` alone on the model's GPU, in the model's dtype. `min_seconds` and
    `read_clock`: see `kernel_alone_ms`; `timed_windows` gets one window per kernel, in `Floor.kernels` order (for
    an attention call, that of its fastest backend)."""
    device, dtype = model.device, model.dtype
    if device.type != "cuda":
        raise ValueError(f"the kernel floor times CUDA graphs and needs a GPU model, got device {device}")
    kernels = block_kernels(model, video_tokens, audio_tokens, text_tokens)
    times, backends, windows = [], [], []
    for kernel in kernels:
        if kernel.kind == "gemm":
            call = _gemm_call(kernel, device, dtype)
            call()
            times.append(kernel_alone_ms(call, device, min_seconds=min_seconds, timed_windows=windows,
                                         read_clock=read_clock))
            backends.append("")
            continue
        timed, refused, backend_windows = {}, {}, {}
        for name in CANDIDATES:
            call = _attention_call(kernel, name, device, dtype)
            try:
                call()  # eager first: a backend that cannot run this shape says so here, never inside a capture
            except RuntimeError as e:
                refused[name] = str(e).splitlines()[0][:80]
                continue
            window: list[tuple[float, float]] = []
            timed[name] = kernel_alone_ms(call, device, min_seconds=min_seconds, timed_windows=window,
                                          read_clock=read_clock)
            backend_windows[name] = window[0]
        if not timed:
            raise RuntimeError(f"no SDPA backend could run the {kernel.name} at shape {kernel.shape}: {refused}")
        best = min(timed, key=timed.get)
        times.append(timed[best])
        backends.append(best)
        windows.append(backend_windows[best])
    if timed_windows is not None:
        timed_windows += windows
    return Floor(video_tokens, model.config.num_layers, tuple(kernels), tuple(times), tuple(backends))

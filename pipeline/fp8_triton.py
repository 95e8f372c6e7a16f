"""The Triton kernels behind `pipeline.fp8`: an FP8 projection's input computed and quantized per row in one pass,
one program per token row, the row held in registers.

- `gelu_quantize_rows`: tanh-GELU of the FFN's hidden row, the FP8 fc2's input.
- `gated_heads_quantize_rows`: the attention heads scaled by their gates (2 sigmoid(logit) per head), the FP8
  output projection's input.

Imported only on CUDA (or under Triton's interpreter). Why kernels of our own: a projection in FP8 needs its
input's row maximum before it can quantize, so inductor's fusion of the producing math + `quantize_rows` loops
over each row twice, reading it and computing the math twice (GELU: ~470 us per block at 8160 video tokens on an
H200, the largest cost the FP8 mode added), or splits into a reduction kernel and a pointwise one (the gated
heads: ~55 + ~35 us per projection). Holding the row, a kernel here reads it once and writes e4m3 plus one scale
(profiling/PERF_LOG.md has the measurements).

Numerics: the math runs in float32 and is quantized without the bf16 rounding in between that the reference
(`F.gelu` or `heads * gates` in bf16, then `quantize_rows`) applies: equal within that rounding, which e4m3's is
16x coarser than.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from pipeline.rms_norm_triton import on_device_of


@triton.jit
def _gelu_quantize_rows(x_ptr, q_ptr, scale_ptr, row_stride, n_cols, amax_floor, fp8_max,
                        BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)  # sqrt(2 / pi) (x + 0.044715 x^3)
    tanh = 2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0  # saturates to +-1 without overflow (exp -> inf or 0)
    g = 0.5 * x * (1.0 + tanh)
    scale = tl.maximum(tl.max(tl.abs(g), axis=0), amax_floor) / fp8_max
    q = tl.minimum(tl.maximum(g / scale, -fp8_max), fp8_max)
    tl.store(q_ptr + row * n_cols + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row, scale)


@triton.jit
def _gated_heads_quantize_rows(h_ptr, g_ptr, q_ptr, scale_ptr, tokens, heads, head_dim, h_sb, h_sn, h_sh, g_sb, g_sn,
                               g_sh, amax_floor, fp8_max, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # b * tokens + n
    b, n = row // tokens, row % tokens
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < heads) & (d < head_dim)
    x = tl.load(h_ptr + b * h_sb + n * h_sn + h * h_sh + d, mask=mask, other=0.0).to(tl.float32)
    logit = tl.load(g_ptr + b * g_sb + n * g_sn + h * g_sh, mask=h < heads, other=0.0).to(tl.float32)
    y = x * (2.0 / (1.0 + tl.exp(-logit)))  # [H, D] * [H, 1]: each head scaled by 2 sigmoid(its logit)
    scale = tl.maximum(tl.max(tl.max(tl.abs(y), axis=1), axis=0), amax_floor) / fp8_max
    q = tl.minimum(tl.maximum(y / scale, -fp8_max), fp8_max)
    tl.store(q_ptr + row * heads * head_dim + h * head_dim + d, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row, scale)


def gated_heads_quantize_rows(heads: Tensor, gate_logits: Tensor, amax_floor: float,
                              fp8_max: float) -> tuple[Tensor, Tensor]:
    """heads [B, N, H, D] (stride(-1) == 1, any other strides), gate_logits [B, N, H] -> (e4m3 [B * N, H * D]
    contiguous, float32 scales [B * N, 1]) of `heads * 2 sigmoid(gate_logits)`."""
    if heads.stride(-1) != 1:  # the caller checks; a layout chosen by the compiler could still differ
        heads = heads.contiguous()
    b, n, h, d = heads.shape
    q = torch.empty((b * n, h * d), dtype=torch.float8_e4m3fn, device=heads.device)
    scale = torch.empty((b * n, 1), dtype=torch.float32, device=heads.device)
    with on_device_of(heads):
        _gated_heads_quantize_rows[(b * n,)](heads, gate_logits, q, scale, n, h, d, *heads.stride()[:3],
                                             *gate_logits.stride(), amax_floor, fp8_max,
                                             BLOCK_H=triton.next_power_of_2(h), BLOCK_D=triton.next_power_of_2(d),
                                             num_warps=8 if h * d >= 4096 else 4)
    return q, scale


def gelu_quantize_rows(rows: Tensor, amax_floor: float, fp8_max: float) -> tuple[Tensor, Tensor]:
    """rows [M, N] (stride(1) == 1, N <= 16384) -> (e4m3 [M, N] contiguous, float32 scales [M, 1])."""
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    m, n = rows.shape
    q = torch.empty((m, n), dtype=torch.float8_e4m3fn, device=rows.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=rows.device)
    block = triton.next_power_of_2(n)
    with on_device_of(rows):
        _gelu_quantize_rows[(m,)](rows, q, scale, rows.stride(0), n, amax_floor, fp8_max, BLOCK=block,
                                  num_warps=16 if block >= 8192 else 8 if block >= 2048 else 4)
    return q, scale

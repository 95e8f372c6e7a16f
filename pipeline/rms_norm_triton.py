"""Triton RMSNorm kernels behind `pipeline.fused`: one program per token row, the row held in registers.

Imported only on CUDA (Triton is not needed, and may be absent, on CPU). Each program loads its row once (the
LTX-2.3 widths, 2048 and 4096, fit), reduces its mean square in float32, and computes
`x * rsqrt(mean(x^2) + eps) * weight` in float32, rounded once to the row's dtype (ATen's `rms_norm` rounds
before the weight, and the reference rounds again before RoPE; sums run in another order: equal within bf16
rounding, not bitwise). Rows may be strided (column slices of a wider projection); columns must be contiguous.

- `rms_norm_rows_inplace`: the normed row written over the input (the text keys inside their [k | v] buffers, all
  blocks' in one launch: consecutive groups of rows take consecutive rows of a stacked weight).
- `rms_norm_rope_qk`: queries and keys rotated by one table (a self-attention's; each side of the exchange: A2V
  queries with V2A keys on the video side, V2A queries with A2V keys on the audio side), normed with their own weights
  and rotated by the same split-RoPE table row, into new contiguous tensors. One program does both rows of its token,
  so each float32 (cos, sin) row is read once for q and k (at 8160 video tokens the tables are 134 MB, beyond L2).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor


def on_device_of(t: Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device. CPU tensors only reach here under Triton's interpreter
    (TRITON_INTERPRET=1, tests/pipeline/test_triton_interpret.py)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@triton.jit
def _rms_norm_rows_inplace(x_ptr, w_ptr, row_stride, rows_per_weight, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    ptrs = x_ptr + row * row_stride + cols
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + (row // rows_per_weight) * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, (x * rstd * w).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_rope_row(x_row, w_ptr, out_row, cos, sin, first, mask, n_cols, r, eps):
    """One row [H, 2, r] of x: RMSNorm over all of it, then split RoPE per head with (cos, sin) [H, r]."""
    x1 = tl.load(x_row + first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + first + r, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt((tl.sum(x1 * x1) + tl.sum(x2 * x2)) / n_cols + eps)
    y1 = x1 * rstd * tl.load(w_ptr + first, mask=mask, other=0.0).to(tl.float32)
    y2 = x2 * rstd * tl.load(w_ptr + first + r, mask=mask, other=0.0).to(tl.float32)
    dtype = out_row.dtype.element_ty
    tl.store(out_row + first, (y1 * cos - y2 * sin).to(dtype), mask=mask)
    tl.store(out_row + first + r, (y2 * cos + y1 * sin).to(dtype), mask=mask)


@triton.jit
def _rms_norm_rope_qk(q_ptr, q_stride, wq_ptr, k_ptr, k_stride, wk_ptr, q_out, k_out, cos_ptr, sin_ptr,
                      tokens, table_batch_stride, heads, r, eps, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # b * tokens + n
    h = tl.arange(0, BLOCK_H)[:, None]
    j = tl.arange(0, BLOCK_R)[None, :]
    mask = (h < heads) & (j < r)
    first = h * (2 * r) + j  # column of x1 in head h; its partner x2 is r further
    table = (row // tokens) * table_batch_stride + (row % tokens) * (heads * r) + h * r + j
    cos = tl.load(cos_ptr + table, mask=mask, other=0.0)
    sin = tl.load(sin_ptr + table, mask=mask, other=0.0)
    n_cols = heads * 2 * r
    _norm_rope_row(q_ptr + row * q_stride, wq_ptr, q_out + row * n_cols, cos, sin, first, mask, n_cols, r, eps)
    _norm_rope_row(k_ptr + row * k_stride, wk_ptr, k_out + row * n_cols, cos, sin, first, mask, n_cols, r, eps)


def rms_norm_rope_qk(q: Tensor, wq: Tensor, k: Tensor, wk: Tensor, eps: float, cos: Tensor,
                     sin: Tensor) -> tuple[Tensor, Tensor]:
    """q, k [M, I] (stride(1) == 1, M = B * N), weights [I], cos/sin [B or 1, N, H, r] float32 with contiguous
    [N, H, r] and H * 2r == I (`fused.rms_norm_rope_qk` checks). A table of batch 1 serves every sample, whatever
    its stride(0) (an expanded view has 0, a plain [1, N, H, r] tensor N * H * r)."""
    m, n_cols = q.shape
    _, tokens, heads, r = cos.shape
    table_batch_stride = 0 if cos.shape[0] == 1 else cos.stride(0)
    q_out = torch.empty((m, n_cols), dtype=q.dtype, device=q.device)
    k_out = torch.empty((m, n_cols), dtype=k.dtype, device=k.device)
    with on_device_of(q):
        _rms_norm_rope_qk[(m,)](q, q.stride(0), wq, k, k.stride(0), wk, q_out, k_out, cos, sin, tokens,
                                table_batch_stride, heads, r, eps, BLOCK_H=triton.next_power_of_2(heads),
                                BLOCK_R=triton.next_power_of_2(r), num_warps=8 if n_cols >= 4096 else 4)
    return q_out, k_out


def rms_norm_rows_inplace(rows: Tensor, weight: Tensor, eps: float) -> None:
    """rows [M, N] (stride(1) == 1), weight [N] or [G, N] (G dividing M: rows [g * M / G, (g + 1) * M / G) take
    weight row g), contiguous on the same CUDA device; N <= 16384 (`fused.rms_norm_` checks)."""
    m, n = rows.shape
    block = triton.next_power_of_2(n)
    with on_device_of(rows):
        _rms_norm_rows_inplace[(m,)](rows, weight, rows.stride(0), m * n // weight.numel(), n, eps, BLOCK=block,
                                     num_warps=8 if block >= 4096 else 4)

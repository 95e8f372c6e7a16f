"""Triton kernel behind `pipeline.fused.rms_norm_`: RMSNorm of each row of a 2-D view, written over the row.

Imported only on CUDA (Triton is not needed, and may be absent, on CPU). One program per row: the row is loaded
once into registers (the LTX-2.3 key widths, 2048 and 4096, fit), its mean square reduced in float32, and
`x * rsqrt(mean(x^2) + eps) * weight` computed in float32 and rounded once to the row's dtype (ATen's
`rms_norm` may round `x * rsqrt(...)` before the weight and sums in another order: equal within bf16
rounding, not bitwise). Rows may be strided (a column slice of a wider buffer); columns must be contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _rms_norm_rows_inplace(x_ptr, w_ptr, row_stride, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    ptrs = x_ptr + row * row_stride + cols
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, (x * rstd * w).to(x_ptr.dtype.element_ty), mask=mask)


def rms_norm_rows_inplace(rows: Tensor, weight: Tensor, eps: float) -> None:
    """rows [M, N] (stride(1) == 1), weight [N] on the same CUDA device; N <= 16384 (`fused.rms_norm_` checks)."""
    m, n = rows.shape
    block = triton.next_power_of_2(n)
    with torch.cuda.device(rows.device):  # Triton launches on the current device
        _rms_norm_rows_inplace[(m,)](rows, weight, rows.stride(0), n, eps, BLOCK=block,
                                     num_warps=8 if block >= 4096 else 4)

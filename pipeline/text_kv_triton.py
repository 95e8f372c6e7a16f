"""The Triton kernel behind `pipeline.text_kv`: the text context modulated by every block's prompt AdaLN rows in one
launch, one program per (context row, block), the row held in registers.

Writes `x * (1 + scale[g]) + shift[g]` for each block g, computed in float32 and rounded once, in the model dtype
or (FP8 projections) quantized to e4m3 with one scale per row (its absolute maximum maps to the e4m3 maximum, as
`pipeline.fp8.quantize_rows` does). Why a kernel: eager `torch.addcmul` over the broadcast [G, B, Nt, C] output
takes ATen's generic strided loop, 0.89 ms for both streams of the `ltx2.3` preset (48 blocks, 1024 text tokens)
on an H200, where this kernel takes 2 x 108 us (profiling/PERF_LOG.md); the FP8 form in eager ops would be a dozen
passes over the G copies.

Imported only on CUDA (or under Triton's interpreter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from pipeline.rms_norm_triton import on_device_of


@triton.jit
def _modulate_rows(x_ptr, scale_ptr, shift_ptr, out_ptr, qscale_ptr, rows, tokens, n_cols, amax_floor, fp8_max,
                   QUANTIZE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # b * tokens + n
    group = tl.program_id(1).to(tl.int64)  # the block whose modulation applies
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    mod = (group * (rows // tokens) + row // tokens) * n_cols + cols  # row b of [G, B, C]
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + mod, mask=mask, other=0.0).to(tl.float32)
    y = x * (1.0 + scale) + tl.load(shift_ptr + mod, mask=mask, other=0.0).to(tl.float32)
    out = group * rows + row
    if QUANTIZE:
        row_scale = tl.maximum(tl.max(tl.abs(y), axis=0), amax_floor) / fp8_max
        y = tl.minimum(tl.maximum(y / row_scale, -fp8_max), fp8_max)
        tl.store(qscale_ptr + out, row_scale)
    tl.store(out_ptr + out * n_cols + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def modulate_rows(x: Tensor, scale: Tensor, shift: Tensor, *,
                  e4m3: tuple[float, float] | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """x [B, N, C], scale/shift [G, B or 1, 1, C] -> [G, B * N, C] in x's dtype of `x * (1 + scale[g]) + shift[g]`,
    rows of sample b taking row b; with `e4m3` = (amax floor, e4m3 max), the rows quantized instead: (e4m3
    [G, B * N, C], float32 scales [G, B * N, 1]). C <= 16384."""
    b, n, c = x.shape
    groups = scale.shape[0]
    x = x.contiguous()
    scale, shift = (t.expand(groups, b, 1, c).reshape(groups, b, c).contiguous() for t in (scale, shift))
    out = torch.empty((groups, b * n, c), dtype=x.dtype if e4m3 is None else torch.float8_e4m3fn, device=x.device)
    qscale = torch.empty((groups, b * n, 1) if e4m3 else (1,), dtype=torch.float32, device=x.device)
    amax_floor, fp8_max = e4m3 or (1.0, 1.0)
    block = triton.next_power_of_2(c)
    with on_device_of(x):
        _modulate_rows[(b * n, groups)](x, scale, shift, out, qscale, b * n, n, c, amax_floor, fp8_max,
                                        QUANTIZE=e4m3 is not None, BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return out if e4m3 is None else (out, qscale)

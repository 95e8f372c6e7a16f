"""Fused GPU ops the model calls where neither eager PyTorch nor inductor fuses on its own.

`linear_gelu_tanh`: the FFN's first Linear with its tanh-GELU applied in the cuBLASLt epilogue
(`torch._addmm_activation(..., use_gelu=True)`, CUBLASLT_EPILOGUE_GELU_BIAS). Unfused, the [N, 4 * dim]
activation is written by the GEMM, read and written again by a GELU kernel: at 8160 video tokens that is
~0.5 GB of traffic per block. Inductor decomposes `_addmm_activation` back into mm + pointwise, so the op is
registered as a custom op (`ltx2::linear_gelu_tanh`): opaque to inductor, which then calls cuBLASLt
with the epilogue, and capturable in a CUDA graph like any cuBLAS call.

Numerics: the epilogue applies GELU in float32 to the float32 accumulator before rounding to the output dtype,
so it is at least as accurate as `gelu(linear(x))` in bf16 (within bf16 rounding of it). Off CUDA the plain
`F.gelu(F.linear(x), approximate="tanh")` runs, also inside the op (PyTorch's CPU `_addmm_activation` applies the
erf GELU). Inference only: the op has no autograd formula.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.library.custom_op("ltx2::linear_gelu_tanh", mutates_args=())
def _linear_gelu_tanh_op(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    if not x.is_cuda:
        return F.gelu(F.linear(x, weight, bias), approximate="tanh")
    rows = x.reshape(-1, x.shape[-1])  # [M, K]
    out = torch._addmm_activation(bias, rows, weight.t(), use_gelu=True)  # [M, N], GELU(tanh) in the epilogue
    return out.view(*x.shape[:-1], weight.shape[0])


@_linear_gelu_tanh_op.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def linear_gelu_tanh(x: Tensor, linear: torch.nn.Linear) -> Tensor:
    """`gelu(linear(x), approximate="tanh")`, fused into the GEMM epilogue on CUDA (see the module docstring)."""
    if x.is_cuda and linear.bias is not None:
        return _linear_gelu_tanh_op(x, linear.weight, linear.bias)
    return F.gelu(linear(x), approximate="tanh")

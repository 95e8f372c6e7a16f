"""Fused GPU ops the model calls where neither eager PyTorch nor inductor fuses on its own.

`rms_norm_`: RMSNorm written over its input, one Triton kernel (`pipeline.rms_norm_triton`). The text keys are normed
in place inside their [k | v] projection output so k and v stay views of one buffer (held across passes without the
raw keys). Written as `k.copy_(rms_norm(k))`, inductor cannot update the slice in place: it emits a reduction kernel,
then a pointwise kernel rewriting the whole [k | v] buffer (values included), 2 kernels and ~2.5x the traffic per
stream and block. `pipeline.text_kv` calls it once per stream on the keys of all blocks (a [G, N] weight, one row of
norm weights per block), outside any compiled region; as a custom op that mutates its input it would also stay in
place under inductor (a GPU test checks that). Off CUDA the plain `x.copy_(rms_norm(x))` runs; when autograd records,
a plain out-of-place `rms_norm(x)`.

`rms_norm_rope_qk`: RMSNorm + split RoPE of a query and a key tensor rotated by the same table, in one Triton
kernel (`pipeline.rms_norm_triton`) that reads each float32 RoPE table row once for both: a self-attention's q and
k, and the exchange's same-modality pairs (`attention.exchange_attention`). Inductor's fusion of the same math
loops over each row twice and reads the tables for q and for k; at 8160 video tokens it took 160 us per video
self-attention, the kernel ~104 us (PERF_LOG, seventh session). Off CUDA, or when autograd records, the reference
path runs (`rms_norm` then `apply_split_rope`).

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

from pipeline.rope import CosSin, apply_split_rope


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


def is_plain_linear(module: torch.nn.Module) -> bool:
    """An `nn.Linear` itself (no subclass) without forward hooks: code that reads its weight and bias directly
    computes what calling it computes. Anything else (a subclass, hooks) must run its own forward. Global module
    hooks (`register_module_forward_hook`) are not looked at: torch's observers install them (`FlopCounterMode`,
    the module tracker), and they would turn every fused path off while they watch it."""
    return type(module) is torch.nn.Linear and not (module._forward_hooks or module._forward_pre_hooks)


def linear_gelu_tanh(x: Tensor, linear: torch.nn.Module) -> Tensor:
    """`gelu(linear(x), approximate="tanh")`, fused into the GEMM epilogue on CUDA for a plain `nn.Linear` with a
    bias (see the module docstring); any other module runs its own forward, then the GELU."""
    if x.is_cuda and is_plain_linear(linear) and linear.bias is not None:
        return _linear_gelu_tanh_op(x, linear.weight, linear.bias)
    return F.gelu(linear(x), approximate="tanh")


_TRITON_MAX_COLS = 16384  # pipeline.rms_norm_triton holds one row per program in registers


@torch.library.custom_op("ltx2::rms_norm_", mutates_args=("x",))
def _rms_norm_inplace_op(x: Tensor, weight: Tensor, eps: float) -> None:
    if not x.is_cuda:
        _rms_norm_copy_(x, weight, eps)
        return
    from pipeline.rms_norm_triton import rms_norm_rows_inplace

    rms_norm_rows_inplace(x.view(-1, x.shape[-1]), weight, eps)


def _rows_viewable(x: Tensor) -> bool:
    """Whether `x.view(-1, x.shape[-1])` exists with contiguous columns and rows that do not overlap (e.g. a column
    slice of a wider buffer; not an expanded or strided-over view, whose rows the kernel would write in a race)."""
    if x.dim() == 0 or x.shape[-1] == 0 or x.stride(-1) != 1:
        return False
    if x.dim() >= 2 and x.numel() > x.shape[-1] and x.stride(-2) < x.shape[-1]:
        return False
    return all(x.stride(d) == x.stride(d + 1) * x.shape[d + 1] for d in range(x.dim() - 2))


def _triton_takes(x: Tensor, weight: Tensor) -> bool:
    """The CUDA kernel's conditions on one input and its weight (`rms_norm_`)."""
    return (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16, torch.float32) and weight.device == x.device
            and x.shape[-1] <= _TRITON_MAX_COLS and weight.is_contiguous() and _rows_viewable(x))


def _rms_norm_copy_(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """`x.copy_(rms_norm(x, weight))`, one weight row per leading index when `weight` is [G, N]."""
    n = x.shape[-1]
    if weight.dim() == 1:
        return x.copy_(F.rms_norm(x, (n,), weight, eps))
    for part, w in zip(x, weight):
        part.copy_(F.rms_norm(part, (n,), w, eps))
    return x


def rms_norm_(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dim written over `x` (one in-place kernel on CUDA, see the module docstring); returns
    the normed tensor: `x` itself, except when autograd records (x or weight requires grad), where a new tensor
    comes back and `x` is left as it was (autograd refuses in-place writes to split views).

    `weight` is [N], or [G, N] for x [G, ..., N]: x[g] normed with weight[g], all in the one kernel (the text keys
    of every block, `pipeline.text_kv`).

    The kernel holds a row in registers: it needs a float16/bfloat16/float32 x whose rows are viewable as [M, N]
    with contiguous columns and do not overlap, 0 < N <= 16384, and a contiguous weight on x's device. Other
    inputs, and CPU tensors, take `x.copy_(rms_norm(x))` (the same formula in ATen kernels; equal within bf16
    rounding, not bitwise, see pipeline/rms_norm_triton.py)."""
    n = x.shape[-1]
    if weight.shape != (n,) and not (weight.dim() == 2 and x.dim() >= 2 and weight.shape == (x.shape[0], n)):
        raise ValueError(f"rms_norm_: weight must have shape ({n},) (x's last dim), or ({x.shape[0]}, {n}) for one "
                         f"weight per x[g], got {tuple(weight.shape)}")
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        if weight.dim() == 1:
            return F.rms_norm(x, (n,), weight, eps)
        return torch.stack([F.rms_norm(part, (n,), w, eps) for part, w in zip(x, weight)])
    if _triton_takes(x, weight):
        _rms_norm_inplace_op(x, weight, eps)
        return x
    return _rms_norm_copy_(x, weight, eps)


def _norm_rope_reference(x: Tensor, weight: Tensor, eps: float, cos: Tensor, sin: Tensor) -> Tensor:
    return apply_split_rope(F.rms_norm(x, (x.shape[-1],), weight, eps), (cos, sin))


@torch.library.custom_op("ltx2::rms_norm_rope_qk", mutates_args=())
def _rms_norm_rope_qk_op(q: Tensor, q_weight: Tensor, k: Tensor, k_weight: Tensor, eps: float, cos: Tensor,
                         sin: Tensor) -> tuple[Tensor, Tensor]:
    if not q.is_cuda:
        return _norm_rope_reference(q, q_weight, eps, cos, sin), _norm_rope_reference(k, k_weight, eps, cos, sin)
    from pipeline.rms_norm_triton import rms_norm_rope_qk as kernel

    width = q.shape[-1]
    q_out, k_out = kernel(q.view(-1, width), q_weight, k.view(-1, width), k_weight, eps, cos, sin)
    return q_out.view(q.shape), k_out.view(k.shape)


@_rms_norm_rope_qk_op.register_fake
def _(q: Tensor, q_weight: Tensor, k: Tensor, k_weight: Tensor, eps: float, cos: Tensor,
      sin: Tensor) -> tuple[Tensor, Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _kernel_takes_tables(x: Tensor, cos: Tensor, sin: Tensor) -> bool:
    """(cos, sin) [B or 1, N, H, r] float32 with contiguous [N, H, r], H * 2r == x's width, N == x's tokens."""
    if cos.dim() != 4 or cos.shape != sin.shape or cos.stride() != sin.stride():
        return False
    _, tokens, heads, r = cos.shape
    return (cos.dtype == sin.dtype == torch.float32 and cos.stride()[1:] == (heads * r, r, 1)
            and x.dim() == 3 and x.shape[1] == tokens and cos.shape[0] in (1, x.shape[0])
            and heads * 2 * r == x.shape[-1])


def rms_norm_rope_qk(q: Tensor, q_weight: Tensor, k: Tensor, k_weight: Tensor, eps: float,
                     rope: CosSin) -> tuple[Tensor, Tensor]:
    """`apply_split_rope(rms_norm(q))` and the same for k with its own weight, q/k [B, N, I], rope (cos, sin)
    [B or 1, N, H, r]: one kernel for both on CUDA (module docstring), new contiguous tensors.

    The kernel needs q and k of one shape, dtype and device, each meeting `rms_norm_`'s conditions (column slices
    of the fused projection do), and float32 tables on their device with contiguous [N, H, r] (a batch-1 table
    serves every sample); otherwise, on CPU and when autograd records, the reference path runs (equal within bf16
    rounding, not bitwise). A weight whose shape is not (I,) is an error on every path."""
    cos, sin = rope
    for name, x, weight in (("q_weight", q, q_weight), ("k_weight", k, k_weight)):
        if weight.shape != (x.shape[-1],):
            raise ValueError(f"rms_norm_rope_qk: {name} must have shape ({x.shape[-1]},), got {tuple(weight.shape)}")
    records = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, q_weight, k_weight))
    if (not records and q.shape == k.shape and q.dtype == k.dtype and q.device == k.device
            and _triton_takes(q, q_weight) and _triton_takes(k, k_weight) and cos.device == sin.device == q.device
            and _kernel_takes_tables(q, cos, sin)):
        return _rms_norm_rope_qk_op(q, q_weight, k, k_weight, eps, cos, sin)
    return _norm_rope_reference(q, q_weight, eps, cos, sin), _norm_rope_reference(k, k_weight, eps, cos, sin)

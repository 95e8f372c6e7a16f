"""FP8 (e4m3) GEMMs for the projections that read video or text tokens: `Float8Linear`, `quantize_fp8`.

Why: the GEMMs are ~67-77% of a pass's kernel time, and on Hopper an e4m3 GEMM with per-row scales ran at ~1,286
TFLOP/s where the same bf16 GEMM ran at ~669 (H200, 8160 rows, 4096 -> 16384; profiling/PERF_LOG.md). The 8160-token targets lie
below the bf16 kernel floor, so only fewer or cheaper FLOPs reach them. This is an opt-in mode (`--fp8`): the
default model stays bf16, and its parity with eager is unchanged.

Scaling (`torch._scaled_mm`'s row-wise mode on CUDA; off CUDA the same product of the dequantized operands in
float32): one float32 scale per weight row (output channel), computed once
by `quantize_fp8`; one per activation row (token), computed in the forward from the row's absolute maximum. Under
compile, inductor fuses that maximum and the cast into the kernel that produces the row (the norm + modulation
before a projection), in a second loop over the row. The FFN's GELU before fc2 and the attention gates before each
output projection are computed and quantized by Triton kernels of ours instead, in one read of the row
(`gelu_quantize_rows`, `gated_heads_quantize_rows`; pipeline/fp8_triton.py), eager or compiled. The bias is added
in the GEMM epilogue, the output is in the model dtype (bf16 on CUDA; float32 too on CPU, for tests).

Which projections: those whose rows are video tokens or text tokens (`FP8_PROJECTIONS`). The audio chain's
(126 rows at every video size) stay bf16: at that height a GEMM is bound by its weight reads, and the row-wise
FP8 kernels measured no faster there, slower for half the shapes. The AdaLN MLPs and the input/output
projections stay bf16 too (a few rows, or a few channels).

Numerics: e4m3 keeps 3 mantissa bits. On random data one GEMM is ~3.8e-2 off the float64 product, against
~1.7e-3 for bf16 operands (same measurement). A whole forward drifts further from the bf16 model; the benchmark
(`ltx2-graphs bench --fp8`) reports the cond output's error and cosine against bf16 at each shape (~5%
relative, cosine 0.9985, on the random weights of the `ltx2.3` preset). Real checkpoints were not measured
here: check the videos. This is a speed/quality trade, not parity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.fused import _TRITON_MAX_COLS  # the widest row one Triton program holds in registers
from pipeline.fused import is_plain_linear

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
_AMAX_FLOOR = 1e-12  # rows below this share its scale (coarser steps for them, never a division by zero)
_ALIGN = 16  # the CUDA kernels need both GEMM widths to be multiples of 16

# Per block: the linears whose inputs are video tokens or text tokens (see the module docstring).
FP8_PROJECTIONS = (
    "video_self.qkvg", "video_self.out",
    "video_text.q_gate", "video_text.out", "video_text.kv", "audio_text.kv",
    "a2v.q_gate", "a2v.out", "v2a.kv",
    "video_ff.fc1", "video_ff.fc2",
)


def fp8_unsupported(device: torch.device | str) -> str | None:
    """Why `device` cannot run the FP8 projections, or None when it can: CUDA needs FP8 tensor cores (sm_89 or
    newer; only sm_90 (an H200) was measured: row-wise `_scaled_mm` has had gaps on other archs in some torch
    releases). CPU runs the same product in float32 (for tests: no faster)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return (f"{torch.cuda.get_device_name(device)} (sm_{major}{minor}) has no FP8 tensor cores; FP8 needs "
                "sm_89 or newer (Ada, Hopper)")
    return None


def refuse_casts(fn, device: torch.device) -> None:
    """Raise if the `nn.Module._apply` function `fn` would change an e4m3 tensor's dtype (`.to(dtype)`, `.half()`,
    `.float()`): moves pass. A quantized model calls it before touching any of its modules, so a refused cast
    leaves every tensor as it was."""
    probe = fn(torch.empty(0, dtype=E4M3, device=device))
    if probe.dtype != E4M3:
        raise ValueError(f"the model's FP8 projections cannot be cast to {probe.dtype} (e4m3 weights with their "
                         "scales); move it with .to(device) only, or cast before quantize_fp8")


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [..., K] -> (e4m3 [..., K], float32 scales [..., 1]) with x ~= q * scale, one scale per row (its absolute
    max maps to 448). The clamp guards a rounding of max / scale just above 448, which e4m3 would make NaN."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=_AMAX_FLOOR) / E4M3_MAX
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


@torch.library.custom_op("ltx2::gelu_quantize_rows", mutates_args=())
def _gelu_quantize_rows_op(rows: Tensor) -> tuple[Tensor, Tensor]:
    from pipeline.fp8_triton import gelu_quantize_rows as kernel

    return kernel(rows, _AMAX_FLOOR, E4M3_MAX)


@_gelu_quantize_rows_op.register_fake
def _(rows: Tensor) -> tuple[Tensor, Tensor]:
    return rows.new_empty(rows.shape, dtype=E4M3), rows.new_empty((rows.shape[0], 1), dtype=torch.float32)


@torch.library.custom_op("ltx2::gated_heads_quantize_rows", mutates_args=())
def _gated_heads_quantize_rows_op(heads: Tensor, gate_logits: Tensor) -> tuple[Tensor, Tensor]:
    from pipeline.fp8_triton import gated_heads_quantize_rows as kernel

    return kernel(heads, gate_logits, _AMAX_FLOOR, E4M3_MAX)


@_gated_heads_quantize_rows_op.register_fake
def _(heads: Tensor, gate_logits: Tensor) -> tuple[Tensor, Tensor]:
    b, n, h, d = heads.shape
    return heads.new_empty((b * n, h * d), dtype=E4M3), heads.new_empty((b * n, 1), dtype=torch.float32)


def gated_heads_quantize_rows(heads: Tensor, gate_logits: Tensor) -> tuple[Tensor, Tensor]:
    """`quantize_rows` of `heads * 2 sigmoid(gate_logits)` flattened to [B * N, H * D] (heads [B, N, H, D],
    gate_logits [B, N, H]): on CUDA one Triton kernel reading each row once (pipeline/fp8_triton.py; inductor
    splits it into a reduction and a pointwise kernel), elsewhere the formula. The FP8 output projection's input
    (`Float8Linear.of_gated_heads`)."""
    if heads.is_cuda and heads.stride(-1) == 1 and heads.shape[-2] * heads.shape[-1] <= _TRITON_MAX_COLS:
        return _gated_heads_quantize_rows_op(heads, gate_logits)
    gated = heads * (2.0 * torch.sigmoid(gate_logits)).unsqueeze(-1)
    return quantize_rows(gated.reshape(-1, heads.shape[-2] * heads.shape[-1]))


def gelu_quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """`quantize_rows(gelu(x, approximate="tanh"))` for x [M, K]: on CUDA one Triton kernel that reads each row
    once (pipeline/fp8_triton.py; inductor's fusion of the two reads and computes it twice), elsewhere the
    formula. The FP8 fc2's input (`Float8Linear.of_gelu`)."""
    if x.is_cuda and x.shape[-1] <= _TRITON_MAX_COLS and x.stride(-1) == 1:
        return _gelu_quantize_rows_op(x)
    return quantize_rows(F.gelu(x, approximate="tanh"))


def modulate_quantize_rows(x: Tensor, scale: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
    """`quantize_rows(x * (1 + scale[g]) + shift[g])` for every g, x [B, N, C], scale/shift [G, B, 1, C] ->
    (e4m3 [G, B * N, C], float32 scales [G, B * N, 1]): the FP8 text key/value projections' inputs of all blocks
    (`pipeline.text_kv`). On CUDA one Triton launch for all blocks (pipeline/text_kv_triton.py; eager, it would be
    a dozen kernels over the G copies), elsewhere the formula."""
    if x.is_cuda and x.shape[-1] <= _TRITON_MAX_COLS:
        from pipeline.text_kv_triton import modulate_rows

        return modulate_rows(x, scale, shift, e4m3=(_AMAX_FLOOR, E4M3_MAX))
    return quantize_rows(torch.addcmul(shift, x, 1 + scale).view(scale.shape[0], -1, x.shape[-1]))


class Float8Linear(nn.Module):
    """A Linear whose weight is stored in e4m3 with one float32 scale per output channel; the input is quantized
    per row in the forward (`quantize_rows`) and multiplied by `torch._scaled_mm`. Built by `from_linear`.

    The output rows are padded to a multiple of 16 with zero weights (the CUDA kernels need it; the LTX-2.3 widths
    already are) and the padding is sliced off the output. `project_rows` gives the STG value pass-through the
    rows it needs without touching the others."""

    # Buffers that are weights: the graph executor's weights check counts their version counters and placement as
    # it counts parameters' (graphs/keys.py `WeightsProbe`), so an edited or replaced one drops the old graphs.
    weight_buffers = ("weight_e4m3", "weight_scale", "bias")

    def __init__(self, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, out_features: int,
                 out_dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features, self.out_dtype = weight.shape[1], out_features, out_dtype
        self.register_buffer("weight_e4m3", weight)  # [N rounded up to 16, K] (not `weight`: no bf16 loads)
        self.register_buffer("weight_scale", weight_scale)  # [1, N rounded up] float32
        self.register_buffer("bias", bias)  # [N rounded up] model dtype, or None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Float8Linear:
        """Quantize `linear`'s weight per output channel (its bias stays in its dtype)."""
        n, k = linear.weight.shape
        if k % _ALIGN:
            raise ValueError(f"Float8Linear: in_features must be a multiple of {_ALIGN}, got {k}")
        pad = -n % _ALIGN
        with torch.no_grad():
            q, scale = quantize_rows(F.pad(linear.weight, (0, 0, 0, pad)))  # [N', K], [N', 1]
            bias = None if linear.bias is None else F.pad(linear.bias, (0, pad))
        return cls(q, scale.view(1, -1).contiguous(), bias, n, linear.weight.dtype)

    def _apply(self, fn, recurse=True):
        """`.to(device)` moves the module; a cast (`.to(dtype)`, `.half()`) would turn the e4m3 weights and their
        float32 scales into other values without a word: refused before anything changes (`refuse_casts`)."""
        refuse_casts(fn, self.weight_e4m3.device)
        return super()._apply(fn, recurse)

    def forward(self, x: Tensor) -> Tensor:
        return self.project_rows(x, 0)

    def project_rows(self, x: Tensor, start: int) -> Tensor:
        """The output features [start:] of `self(x)`, computing only those rows of the weight. `start` must be a
        multiple of 16 (the kernels' alignment) and below out_features."""
        if start % _ALIGN or not 0 <= start < self.out_features:
            raise ValueError(f"Float8Linear.project_rows: start must be a multiple of {_ALIGN} in "
                             f"[0, {self.out_features}), got {start}")
        self._check_width(x)
        q, scale = quantize_rows(x.reshape(-1, self.in_features))
        return self._project(q, scale, x.shape[:-1], start)

    def of_gelu(self, h: Tensor) -> Tensor:
        """`self(gelu(h, approximate="tanh"))`: the GELU and the input's quantization in one pass
        (`gelu_quantize_rows`). The FFN's fc2 under FP8, where the bf16 model has the GELU in fc1's epilogue."""
        self._check_width(h)
        q, scale = gelu_quantize_rows(h.reshape(-1, self.in_features))
        return self._project(q, scale, h.shape[:-1], 0)

    def of_gated_heads(self, heads: Tensor, gate_logits: Tensor) -> Tensor:
        """`self((heads * 2 sigmoid(gate_logits)).flatten(2))` for heads [B, N, H, D], gate_logits [B, N, H]: the
        gates and the input's quantization in one pass (`gated_heads_quantize_rows`). An attention's output
        projection under FP8 (`pipeline.attention.gated_output`)."""
        b, n, h, d = heads.shape
        if h * d != self.in_features:
            raise ValueError(f"Float8Linear: heads give {h} x {d} features, expected {self.in_features}")
        if gate_logits.shape != heads.shape[:3]:
            raise ValueError(f"Float8Linear: gate_logits has shape {list(gate_logits.shape)}, expected "
                             f"{list(heads.shape[:3])} (one logit per token and head)")
        q, scale = gated_heads_quantize_rows(heads, gate_logits)
        return self._project(q, scale, torch.Size((b, n)), 0)

    def project_quantized_into(self, q: Tensor, scale: Tensor, out: Tensor) -> Tensor:
        """`self` applied to rows already quantized (q [M, K] e4m3, scales [M, 1]: `modulate_quantize_rows`),
        written into `out` [M, out_features] (a contiguous slice of a buffer shared by all blocks,
        `pipeline.text_kv`). Needs out_features a multiple of 16 (no padding to slice off)."""
        if out.shape != (q.shape[0], self.out_features) or self.weight_e4m3.shape[0] != self.out_features:
            raise ValueError(f"Float8Linear.project_quantized_into: out must be [{q.shape[0]}, "
                             f"{self.out_features}] with out_features a multiple of {_ALIGN}, got {list(out.shape)}")
        return self._project(q, scale, q.shape[:1], 0, out=out)

    def _check_width(self, x: Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Float8Linear: input has {x.shape[-1]} features, expected {self.in_features}")

    def _project(self, q: Tensor, scale: Tensor, lead: torch.Size, start: int, out: Tensor | None = None) -> Tensor:
        """The GEMM of quantized rows q [M, K] (scales [M, 1]) with weight rows [start:], shaped [*lead, N'];
        written into `out` [M, N'] when given."""
        weight, weight_scale = self.weight_e4m3[start:], self.weight_scale[:, start:]
        bias = None if self.bias is None else self.bias[start:]
        if q.is_cuda:
            extra = {} if out is None else {"out": out}
            out = torch._scaled_mm(q, weight.t(), scale_a=scale, scale_b=weight_scale, bias=bias,
                                   out_dtype=self.out_dtype, **extra)
        else:  # the same product in float32 (CPU `_scaled_mm` takes only per-tensor scales in some releases)
            product = F.linear(q.float() * scale, weight.float() * weight_scale.t(),
                               None if bias is None else bias.float()).to(self.out_dtype)
            out = product if out is None else out.copy_(product)
        out = out.view(*lead, -1)
        return out if out.shape[-1] == self.out_features - start else out[..., : self.out_features - start]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3, per-channel scales"


def project_rows(linear: nn.Module, x: Tensor, start: int) -> Tensor:
    """The output features [start:] of `linear(x)` for an `nn.Linear` or a `Float8Linear`, computing only those
    rows of the weight (the STG value pass-through needs [v | gate] of the fused q/k/v/gate projection)."""
    hooked = bool(linear._forward_hooks or linear._forward_pre_hooks)
    if type(linear) is Float8Linear and not hooked:
        return linear.project_rows(x, start)
    if not is_plain_linear(linear):  # a subclass (a LoRA wrapper) or hooks: only its own forward is what it computes
        return linear(x)[..., start:]
    return F.linear(x, linear.weight[start:], None if linear.bias is None else linear.bias[start:])


def output_error(out: Tensor, ref: Tensor) -> dict[str, float]:
    """||out - ref|| / ||ref|| and the cosine of the two, in float64: how far an FP8 output is from bf16's."""
    o, r = out.double().flatten(), ref.double().flatten()
    return {"relative_error": ((o - r).norm() / r.norm()).item(), "cosine": F.cosine_similarity(o, r, dim=0).item()}


def is_quantized(model: nn.Module) -> bool:
    """Whether any module of `model` is a `Float8Linear`."""
    return any(isinstance(m, Float8Linear) for m in model.modules())


@torch.no_grad()
def quantize_fp8(model: nn.Module) -> int:
    """Replace the `FP8_PROJECTIONS` of every block of an `LTX2Transformer` by `Float8Linear`s, in place; returns
    how many were replaced. The bf16 weights they held are released (unless referenced elsewhere). Load weights
    first: the checkpoint loaders refuse a quantized model. A model quantized twice is an error (its weights are
    already e4m3)."""
    from pipeline.model import LTX2Transformer  # here: pipeline.model imports this module

    if not isinstance(model, LTX2Transformer):
        raise ValueError(f"quantize_fp8 needs an LTX2Transformer (pipeline.model.build_model), got "
                         f"{type(model).__name__}")
    if is_quantized(model):
        raise ValueError("quantize_fp8 needs an unquantized model; this one is already quantized")
    reason = fp8_unsupported(model.device)
    if reason:
        raise ValueError(f"quantize_fp8: {reason}")
    allowed = (torch.bfloat16,) if model.device.type == "cuda" else (torch.bfloat16, torch.float32)
    if model.dtype not in allowed:
        raise ValueError(f"quantize_fp8: the model dtype must be {' or '.join(str(d) for d in allowed)} on "
                         f"{model.device.type} (the row-wise FP8 GEMMs write bf16 on CUDA), got {model.dtype}")
    sites = [(f"blocks.{i}.{path}", getattr(block, path.split(".")[0]), path.split(".")[1])
             for i, block in enumerate(model.blocks) for path in FP8_PROJECTIONS]
    for name, owner, leaf in sites:  # every width checked before the first swap: all or nothing
        k = getattr(owner, leaf).in_features
        if k % _ALIGN:
            raise ValueError(f"quantize_fp8: {name} has in_features {k}; FP8 needs a multiple of {_ALIGN}")
    for _, owner, leaf in sites:
        setattr(owner, leaf, Float8Linear.from_linear(getattr(owner, leaf)))
    model.weights_version += 1  # graph keys include it: no graph of the bf16 weights replays
    return len(sites)

"""Attention sublayers of the LTX-2.3 block: gated self-attention and gated cross-attention with fused projections.

One Linear per input stream: self-attention projects [q | k | v | gate logits] in one GEMM; cross-attention
projects [q | gate logits] from the queries and [k | v] from the context. The STG "value pass-through" of a
skipped block runs only the contiguous [v | gate] rows of the fused weight (no Q, K, QK-norm, RoPE or SDPA).
The A2V/V2A exchange runs both directions in `exchange_attention`, which norms and rotates same-modality queries
and keys together. Per-head gates (LTX-2.3): the attention output of each head is scaled by 2 * sigmoid(logit)
before `out`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.fp8 import Float8Linear, project_rows
from pipeline.fused import rms_norm_, rms_norm_rope_qk
from pipeline.rope import CosSin, apply_split_rope


def gated_output(out: nn.Module, heads: Tensor, gate_logits: Tensor) -> Tensor:
    """`out(heads * 2 sigmoid(gate))`: heads [B, N, H, D], gate_logits [B, N, H] -> [B, N, dim]. An FP8 `out`
    (`pipeline.fp8`) gates and quantizes its input in one kernel."""
    if isinstance(out, Float8Linear):
        return out.of_gated_heads(heads, gate_logits)
    gates = 2.0 * torch.sigmoid(gate_logits)  # [B, N, H]
    return out((heads * gates.unsqueeze(-1)).flatten(2))  # [B, N, H * D] -> [B, N, dim]


def attend(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """SDPA over heads: q [B, Nq, H*D], k/v [B, Nk, H*D] -> [B, Nq, H, D]."""
    b, nq, _ = q.shape
    nk = k.shape[1]
    q = q.view(b, nq, heads, -1).transpose(1, 2)  # [B, H, Nq, D]
    k = k.view(b, nk, heads, -1).transpose(1, 2)  # [B, H, Nk, D]
    v = v.view(b, nk, heads, -1).transpose(1, 2)  # [B, H, Nk, D]
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)  # [B, Nq, H, D]


class SelfAttention(nn.Module):
    """Gated self-attention with RMS QK-norm across heads and split RoPE."""

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float):
        super().__init__()
        self.heads, self.head_dim, self.eps = heads, head_dim, eps
        self.inner = heads * head_dim
        self.qkvg = nn.Linear(dim, 3 * self.inner + heads)  # rows: [q | k | v | gate logits]
        self.q_norm = nn.Parameter(torch.empty(self.inner))
        self.k_norm = nn.Parameter(torch.empty(self.inner))
        self.out = nn.Linear(self.inner, dim)

    def forward(self, x: Tensor, rope: CosSin) -> Tensor:
        i = self.inner
        q, k, v, g = self.qkvg(x).split([i, i, i, self.heads], dim=-1)  # [B, N, I] x3, [B, N, H]
        q, k = rms_norm_rope_qk(q, self.q_norm, k, self.k_norm, self.eps, rope)
        return gated_output(self.out, attend(q, k, v, self.heads), g)

    def value_passthrough(self, x: Tensor) -> Tensor:
        """STG-perturbed output: `out(gate * v)`, computing only the [v | gate] rows of the fused projection."""
        i = self.inner
        vg = project_rows(self.qkvg, x, 2 * i)  # [B, N, I + H]
        v, g = vg.split([i, self.heads], dim=-1)
        return gated_output(self.out, v.unflatten(-1, (self.heads, self.head_dim)), g)


class CrossAttention(nn.Module):
    """Gated cross-attention: queries (and gate logits) from `x`, keys/values from `context`; optional RoPE on
    both sides (A2V/V2A use the temporal tables, the text cross-attention none)."""

    def __init__(self, dim: int, context_dim: int, heads: int, head_dim: int, eps: float):
        super().__init__()
        self.heads, self.head_dim, self.eps = heads, head_dim, eps
        self.inner = heads * head_dim
        self.q_gate = nn.Linear(dim, self.inner + heads)  # rows: [q | gate logits]
        self.kv = nn.Linear(context_dim, 2 * self.inner)  # rows: [k | v]
        self.q_norm = nn.Parameter(torch.empty(self.inner))
        self.k_norm = nn.Parameter(torch.empty(self.inner))
        self.out = nn.Linear(self.inner, dim)

    def forward(self, x: Tensor, context: Tensor, q_rope: CosSin | None = None,
                k_rope: CosSin | None = None) -> Tensor:
        return self.attend_to(x, *self.context_kv(context, k_rope), q_rope)

    def context_kv(self, context: Tensor, k_rope: CosSin | None = None) -> tuple[Tensor, Tensor]:
        """Keys (RMS-normed, RoPE'd when `k_rope` is given) and values of `context` [B, Nk, C]: [B, Nk, I] each.

        Separate from `attend_to` because a context's keys/values do not depend on the queries: the text ones are
        computed for all blocks at once (`pipeline.text_kv`, which calls this block by block only when autograd
        records). Without RoPE, at inference, the normed keys overwrite the raw ones in the [k | v] projection
        output (`fused.rms_norm_`, one in-place kernel on CUDA), so k and v are views of one [B, Nk, 2I] buffer
        (when autograd records, the keys are a new tensor). With RoPE (A2V or V2A running alone; both directions
        go through `exchange_attention`) the keys are a new tensor, so inductor fuses norm and RoPE into one
        kernel."""
        k, v = self.keys_values(context)  # views of the [B, Nk, 2I] projection, rows [k | v]
        if k_rope is None:
            return rms_norm_(k, self.k_norm, self.eps), v
        return apply_split_rope(F.rms_norm(k, (self.inner,), self.k_norm, self.eps), k_rope), v

    def attend_to(self, x: Tensor, k: Tensor, v: Tensor, q_rope: CosSin | None = None) -> Tensor:
        """Gated attention of the queries of `x` [B, Nq, dim] over prepared keys/values (`context_kv`)."""
        q, g = self.queries(x)
        q = F.rms_norm(q, (self.inner,), self.q_norm, self.eps)
        if q_rope is not None:  # static per module use (A2V/V2A always, text never), not data-dependent
            q = apply_split_rope(q, q_rope)
        return self.attend_prepared(q, g, k, v)

    def queries(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Raw queries [B, Nq, I] (not yet normed) and gate logits [B, Nq, H]: views of one projection."""
        return self.q_gate(x).split([self.inner, self.heads], dim=-1)

    def keys_values(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Raw keys (not yet normed) and values of `context`: [B, Nk, I] views of one [k | v] projection."""
        return self.kv(context).split([self.inner, self.inner], dim=-1)

    def attend_prepared(self, q: Tensor, gate_logits: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Gated attention of normed (and rotated) queries over normed keys: the tail shared by every path."""
        return gated_output(self.out, attend(q, k, v, self.heads), gate_logits)


def exchange_attention(a2v: CrossAttention, v2a: CrossAttention, video_for_a2v: Tensor, audio_for_a2v: Tensor,
                       audio_for_v2a: Tensor, video_for_v2a: Tensor, video_rope: CosSin,
                       audio_rope: CosSin) -> tuple[Tensor, Tensor]:
    """A2V and V2A together (`a2v(video_for_a2v, audio_for_a2v)`, `v2a(audio_for_v2a, video_for_v2a)`), returning
    (A2V output [B, Nv, Dv], V2A output [B, Na, Da]).

    Same math as the two calls, regrouped by modality: the A2V queries and the V2A keys are both video tokens
    rotated by the video temporal table, so one `rms_norm_rope_qk` kernel norms and rotates both, reading each
    table row once (likewise the audio side). At 8160 video tokens inductor's fusion of the video side took
    ~90 us per block, the kernel ~53 us (profiling/PERF_LOG.md). With one direction disabled the model calls that
    direction's `CrossAttention` alone (norm and RoPE by inductor on CUDA): equal within bf16 rounding, not
    bitwise, to that direction's output here."""
    if a2v.inner != v2a.inner or a2v.eps != v2a.eps:
        raise ValueError(f"exchange_attention: a2v and v2a must share inner width and eps, got "
                         f"{(a2v.inner, a2v.eps)} and {(v2a.inner, v2a.eps)}")
    video_q, video_gates = a2v.queries(video_for_a2v)
    audio_k, audio_v = a2v.keys_values(audio_for_a2v)
    audio_q, audio_gates = v2a.queries(audio_for_v2a)
    video_k, video_v = v2a.keys_values(video_for_v2a)
    video_q, video_k = rms_norm_rope_qk(video_q, a2v.q_norm, video_k, v2a.k_norm, a2v.eps, video_rope)
    audio_q, audio_k = rms_norm_rope_qk(audio_q, v2a.q_norm, audio_k, a2v.k_norm, a2v.eps, audio_rope)
    return (a2v.attend_prepared(video_q, video_gates, audio_k, audio_v),
            v2a.attend_prepared(audio_q, audio_gates, video_k, video_v))

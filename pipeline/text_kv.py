"""The text cross-attention keys/values of every block, computed together before the first block.

In LTX-2.3 each block's text keys/values are its projection of the text context shifted and scaled by the prompt
AdaLN (`context * (1 + scale) + shift`, rows from the block's prompt table plus the forward's prompt AdaLN
output), keys RMS-normed. They read neither the latents nor the other blocks, so one pass computes all of them up
front (`LTX2Transformer.text_kv`), and passes that read the same text at the same sigma can share them.

Batched per stream, the work is one modulation kernel for all blocks (`modulate_contexts`; under FP8 the same
kernel quantizes, `fp8.modulate_quantize_rows`), the blocks' projections written into one [blocks, B * Nt, 2I]
buffer, and one key-norm kernel over all of it (`fused.rms_norm_` with the stacked norm weights). Block by block it
was three kernels per block and stream (modulation, GEMM, key norm): ~180 launches more per pass of the `ltx2.3`
preset. The modulated contexts of all blocks exist at once (0.6 GB for both streams at 1024 text tokens in bf16),
and a pass that computes its own keys/values holds all blocks' (1.2 GB) instead of one block's at a time; the
graph executor captures such a pass before the one that holds keys/values for others, so that pool memory is
shared (`graphs.keys.TextKVRole.capture_rank`; profiling/PERF_LOG.md has the measurements).

Each block's keys and values are views of its slice of the stream's buffer, the normed keys written over the raw
ones: held keys/values keep that buffer alive (all blocks'), and nothing else. When autograd records (any input
or weight of the stream requires grad), the same math runs block by block, out of place, through each block's own
modules.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from pipeline.attention import CrossAttention
from pipeline.fp8 import Float8Linear, modulate_quantize_rows
from pipeline.fused import _TRITON_MAX_COLS, is_plain_linear, rms_norm_


class BlockTextKV(NamedTuple):
    """One block's text cross-attention keys (RMS-normed) and values, per stream: [B, Nt, I] each."""

    video_k: Tensor
    video_v: Tensor
    audio_k: Tensor
    audio_v: Tensor


def linear_into(linear: nn.Module, x: Tensor, out: Tensor) -> Tensor:
    """`linear(x)` for x [M, K] written into `out` [M, N]. A plain `nn.Linear` without hooks writes there directly
    (contiguous `out`: on CUDA the bias stays in the cuBLASLt epilogue); anything else (a subclass, a
    parametrization, hooks) runs its own forward and is copied in."""
    if not is_plain_linear(linear):
        return out.copy_(linear(x))
    if linear.bias is None:
        return torch.mm(x, linear.weight.t(), out=out)
    return torch.addmm(linear.bias, x, linear.weight.t(), out=out)


def modulate_contexts(context: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """`context * (1 + scale[g]) + shift[g]` for every block g, context [B, Nt, C], scale/shift [G, B, 1, C] ->
    [G, B * Nt, C]: on CUDA one Triton launch (pipeline/text_kv_triton.py; eager `addcmul` over the broadcast
    output is ~4x slower), elsewhere `torch.addcmul` (equal within one rounding: both compute in float32)."""
    if context.is_cuda and context.shape[-1] <= _TRITON_MAX_COLS:
        from pipeline.text_kv_triton import modulate_rows

        return modulate_rows(context, scale, shift)
    return torch.addcmul(shift, context, 1 + scale).view(scale.shape[0], -1, context.shape[-1])


def stream_text_kv(attentions: Sequence[CrossAttention], prompt_tables: Sequence[Tensor], context: Tensor,
                   prompt_mod: Tensor) -> list[tuple[Tensor, Tensor]]:
    """One stream's (normed keys, values) [B, Nt, I] for every block (module docstring).

    attentions: the blocks' text cross-attentions of this stream; prompt_tables: their [2, C] prompt tables (rows
    shift, scale); context [B, Nt, C]; prompt_mod [B, 1, 2, C]: the stream's prompt AdaLN output."""
    b, tokens, _ = context.shape
    inner = attentions[0].inner
    tables = torch.stack(list(prompt_tables))[:, None, None]  # [G, 1, 1, 2, C]
    shift, scale = (tables + prompt_mod).unbind(3)  # [G, B, 1, C] each
    weights = [p for attention in attentions for p in (*attention.kv.parameters(), attention.k_norm)]
    records = torch.is_grad_enabled() and any(t.requires_grad for t in (context, shift, scale, *weights))
    if records:
        return [attention.context_kv(torch.addcmul(shift[g], context, 1 + scale[g]))
                for g, attention in enumerate(attentions)]
    kv = context.new_empty(len(attentions), b * tokens, 2 * inner)  # [G, B * Nt, 2I]: rows [k | v]
    if isinstance(attentions[0].kv, Float8Linear):  # `quantize_fp8` swaps every block's, or none
        q, q_scale = modulate_quantize_rows(context, scale, shift)  # [G, B * Nt, C] e4m3, [G, B * Nt, 1]
        for g, attention in enumerate(attentions):
            attention.kv.project_quantized_into(q[g], q_scale[g], kv[g])
    else:
        x = modulate_contexts(context, scale, shift)  # [G, B * Nt, C]
        for g, attention in enumerate(attentions):
            linear_into(attention.kv, x[g], kv[g])
    keys = rms_norm_(kv[..., :inner], torch.stack([attention.k_norm for attention in attentions]), attentions[0].eps)
    assert keys.data_ptr() == kv.data_ptr(), "the keys are normed in place when autograd does not record"
    kv = kv.view(len(attentions), b, tokens, 2 * inner)
    return [(kv[g, ..., :inner], kv[g, ..., inner:]) for g in range(len(attentions))]

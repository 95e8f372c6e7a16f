"""`pipeline.text_kv`: every block's text keys/values at once. The model-level checks (each block's keys/values are
its own formula's, the buffer they share, autograd) are in test_model.py; here the modulation of all blocks' contexts
on CPU and, on a GPU, its kernel and the batched keys/values of the `ltx2.3` widths against block-by-block ones."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.attention import CrossAttention
from pipeline.fp8 import Float8Linear, fp8_unsupported
from pipeline.text_kv import modulate_contexts, stream_text_kv


def test_modulate_contexts_is_each_blocks_modulation():
    gen = torch.Generator().manual_seed(0)
    context = torch.randn(2, 5, 16, generator=gen)
    scale, shift = torch.randn(3, 2, 1, 16, generator=gen), torch.randn(3, 2, 1, 16, generator=gen)
    out = modulate_contexts(context, scale, shift)
    assert out.shape == (3, 10, 16)
    for g in range(3):
        torch.testing.assert_close(out[g].view(2, 5, 16), context * (1 + scale[g]) + shift[g])


def test_text_projections_that_are_not_plain_linears_run_their_own_forward():
    """A wrapped or hooked projection (an adapter, a parametrization) is called, not bypassed by the `out=` GEMM."""
    attentions = [CrossAttention(16, 8, 2, 8, 1e-6) for _ in range(2)]
    for attention in attentions:
        torch.nn.init.ones_(attention.k_norm)
    calls = []
    attentions[1].kv.register_forward_hook(lambda module, args, out: calls.append(1) or out * 2)
    context, tables, prompt = torch.randn(1, 3, 8), [torch.zeros(2, 8)] * 2, torch.zeros(1, 1, 2, 8)
    with torch.no_grad():
        (k0, v0), (k1, v1) = stream_text_kv(attentions, tables, context, prompt)
        raw_v1 = attentions[1].kv.weight[16:] @ context[0].t() + attentions[1].kv.bias[16:, None]
    assert calls == [1]
    torch.testing.assert_close(v1[0], 2 * raw_v1.t())


def _attentions(blocks, width, context_dim, device, *, seed):
    torch.manual_seed(seed)
    attentions = [CrossAttention(width, context_dim, width // 128, 128, 1e-6).to(device, torch.bfloat16)
                  for _ in range(blocks)]
    with torch.no_grad():
        for attention in attentions:
            attention.kv.weight.normal_(0, context_dim ** -0.5)
            attention.k_norm.normal_(1, 0.1)
    return attentions


def _one_by_one(attentions, tables, context, prompt):
    out = []
    for attention, table in zip(attentions, tables):
        shift, scale = (table + prompt).unbind(2)
        k, v = attention.kv(context * (1 + scale) + shift).chunk(2, dim=-1)
        out.append((F.rms_norm(k, (k.shape[-1],), attention.k_norm, attention.eps), v))
    return out


@pytest.mark.cuda
@pytest.mark.parametrize("fp8", [False, True])
def test_batched_text_kv_on_the_gpu_is_the_block_by_block_formula(fp8):
    """The `ltx2.3` video stream's widths (4096-wide context and keys), 6 blocks, 2 samples: the kernels (one
    modulation, GEMMs into one buffer, one key norm) against each block computed on its own in bf16 eager ops;
    with FP8 projections against the same blocks' FP8 projections of their own modulated contexts."""
    if fp8 and fp8_unsupported("cuda"):
        pytest.skip(fp8_unsupported("cuda"))
    attentions = _attentions(6, 4096, 4096, "cuda", seed=1)
    if fp8:
        for attention in attentions:
            attention.kv = Float8Linear.from_linear(attention.kv)
    context = torch.randn(2, 300, 4096, device="cuda", dtype=torch.bfloat16)
    tables = [torch.randn(2, 4096, device="cuda", dtype=torch.bfloat16) * 0.3 for _ in attentions]
    prompt = torch.randn(2, 1, 2, 4096, device="cuda", dtype=torch.bfloat16) * 0.3
    with torch.no_grad():
        got = stream_text_kv(attentions, tables, context, prompt)
        want = _one_by_one(attentions, tables, context, prompt)
    tolerance = 3e-2 if fp8 else 1e-2  # FP8: each side quantizes a differently rounded modulation (e4m3 steps)
    for (k, v), (rk, rv) in zip(got, want):
        assert k.shape == v.shape == (2, 300, 4096)
        for ours, ref in ((k, rk), (v, rv)):
            err = ((ours.double() - ref.double()).norm() / ref.double().norm()).item()
            assert err < tolerance, err


@pytest.mark.cuda
def test_modulate_contexts_kernel_is_the_formula():
    """One launch for 48 blocks against `torch.addcmul` per block: the kernel rounds once, addcmul rounds 1 + scale
    first; within bf16 rounding."""
    context = torch.randn(1, 1024, 4096, device="cuda", dtype=torch.bfloat16) * 2
    scale = torch.randn(48, 1, 1, 4096, device="cuda", dtype=torch.bfloat16) * 0.5
    shift = torch.randn(48, 1, 1, 4096, device="cuda", dtype=torch.bfloat16)
    out = modulate_contexts(context, scale, shift)
    exact = (context.double() * (1 + scale.double()) + shift.double()).view(48, 1024, 4096)
    assert out.dtype == torch.bfloat16 and out.shape == (48, 1024, 4096)
    torch.testing.assert_close(out.double(), exact, rtol=1e-2, atol=1e-2)

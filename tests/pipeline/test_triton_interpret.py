"""The Triton kernels of `pipeline.rms_norm_triton` (and the bf16 form of `pipeline.text_kv_triton`'s), run on CPU
tensors by Triton's interpreter.

Runs wherever Triton is installed (GPU machines; skipped where it is not, e.g. a CPU-only torch): a subprocess sets
TRITON_INTERPRET=1 before the kernels are defined, then checks them against the ATen reference in float32, on
column slices of wider buffers, RoPE tables broadcast over the batch (expanded, or a plain batch-1 tensor) or
given per sample, and head/rotary sizes that are not powers of two (masked lanes). The GPU tests in test_fused.py check the compiled kernels in bf16.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")

CHECK = textwrap.dedent("""
    import torch, torch.nn.functional as F
    from pipeline import rms_norm_triton as kernels
    from pipeline.rope import apply_split_rope

    torch.manual_seed(0)
    for width in (96, 2048):
        kv = torch.randn(2, 33, 2 * width) * 3
        k, v = kv.split([width, width], dim=-1)
        w, v_before = torch.randn(width), v.clone()
        expected = F.rms_norm(k, (width,), w, 1e-6)
        kernels.rms_norm_rows_inplace(k.view(-1, width), w, 1e-6)
        torch.testing.assert_close(k, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(v, v_before)
    kv = torch.randn(3, 5, 2 * 96)  # one weight per group of rows (all blocks' text keys)
    k, w = kv[..., :96], torch.randn(3, 96)
    expected = torch.stack([F.rms_norm(k[g], (96,), w[g], 1e-6) for g in range(3)])
    kernels.rms_norm_rows_inplace(k.view(-1, 96), w, 1e-6)
    torch.testing.assert_close(k, expected, rtol=1e-5, atol=1e-5)
    for batch, heads, r, table in ((1, 4, 8, "expanded"), (2, 3, 5, "expanded"), (2, 3, 5, "batch 1"),
                                   (2, 4, 8, "per sample")):
        width, tokens = heads * 2 * r, 17
        q, k, _, _ = (torch.randn(batch, tokens, 3 * width + heads) * 2).split([width, width, width, heads], -1)
        angles = torch.rand(2, tokens, heads, r) * 6.28  # two different tables
        if table == "expanded":  # batch stride 0
            angles = angles[:1].expand(batch, tokens, heads, r)
        elif table == "batch 1":  # a plain [1, N, H, r] slice (stride(0) = N * H * r) serving both samples
            angles = angles[:1]
        cos, sin = angles.cos(), angles.sin()
        if table == "batch 1":  # slices of bigger buffers: a read past the first table finds other values
            cos, sin = (torch.cat([t, t.flip(1) + 1]).contiguous()[:1] for t in (cos, sin))
        wq, wk = torch.randn(width), torch.randn(width)
        outs = kernels.rms_norm_rope_qk(q.view(-1, width), wq, k.view(-1, width), wk, 1e-6, cos, sin)
        for got, x, w in zip(outs, (q, k), (wq, wk)):
            expected = apply_split_rope(F.rms_norm(x, (width,), w, 1e-6), (cos, sin))
            torch.testing.assert_close(got.view(x.shape), expected, rtol=1e-5, atol=1e-5)
    from pipeline.text_kv_triton import modulate_rows  # every block's modulated text context (not its e4m3 form:
    ctx = torch.randn(2, 5, 96)                         # the interpreter's e4m3 conversion is not the GPU's)
    scale, shift = torch.randn(3, 2, 1, 96), torch.randn(3, 2, 1, 96)
    expected = (ctx * (1 + scale) + shift).view(3, 10, 96)
    torch.testing.assert_close(modulate_rows(ctx, scale, shift), expected, rtol=1e-5, atol=1e-5)
    print("ok")
""")


def test_kernels_match_aten_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]

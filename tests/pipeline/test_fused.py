"""`pipeline.fused`: the FFN's fc1 + tanh-GELU in the cuBLASLt epilogue, the in-place RMSNorm of the text keys,
and the q/k RMSNorm + RoPE of the self-attentions and the A2V/V2A exchange.

CPU: the fallbacks are exactly `gelu(linear(x), "tanh")`, `x.copy_(rms_norm(x))` and `apply_split_rope(rms_norm(x))`,
and the custom ops' fake (meta) implementations agree with their real ones (`torch.library.opcheck`). GPU (`cuda`
marker): the epilogue and the Triton kernels match float64 references within bf16 rounding; torch.compile keeps
the epilogue as one opaque op, and runs the RMSNorm on the [k | v] GEMM output in place (no copy of the buffer).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.fused import (_linear_gelu_tanh_op, _rms_norm_inplace_op, _rms_norm_rope_qk_op, is_plain_linear,
                            linear_gelu_tanh, rms_norm_, rms_norm_rope_qk)
from pipeline.rope import apply_split_rope


def test_cpu_path_is_the_unfused_tanh_gelu():
    torch.manual_seed(0)
    fc = nn.Linear(16, 64)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(linear_gelu_tanh(x, fc), F.gelu(fc(x), approximate="tanh"), rtol=0, atol=0)


def test_linear_without_bias_takes_the_plain_path():
    fc = nn.Linear(16, 64, bias=False)
    x = torch.randn(3, 16)
    torch.testing.assert_close(linear_gelu_tanh(x, fc), F.gelu(fc(x), approximate="tanh"), rtol=0, atol=0)


def test_only_a_plain_linear_has_its_weights_read_directly():
    """The fused epilogue reads weight and bias itself; a subclass or a hooked Linear must run its own forward."""

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    hooked = nn.Linear(4, 4)
    hooked.register_forward_hook(lambda module, args, out: out + 1)
    assert is_plain_linear(nn.Linear(4, 4))
    assert not is_plain_linear(Scaled(4, 4)) and not is_plain_linear(hooked) and not is_plain_linear(nn.Identity())


def test_custom_op_registration_is_consistent():
    x, w, b = torch.randn(2, 3, 8), torch.randn(12, 8), torch.randn(12)
    torch.library.opcheck(_linear_gelu_tanh_op, (x, w, b), test_utils=("test_schema", "test_faketensor"))
    torch.testing.assert_close(_linear_gelu_tanh_op(x, w, b), F.gelu(F.linear(x, w, b), approximate="tanh"),
                               rtol=0, atol=0)  # the tanh GELU on CPU too, never the erf one


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_epilogue_matches_float32_reference_on_gpu(dtype):
    torch.manual_seed(0)
    fc = nn.Linear(512, 2048).to("cuda", dtype)
    x = torch.randn(3, 300, 512, device="cuda", dtype=dtype)
    with torch.no_grad():
        ours = linear_gelu_tanh(x, fc)
        ref = F.gelu(F.linear(x.double(), fc.weight.double(), fc.bias.double()), approximate="tanh")
        unfused = F.gelu(fc(x), approximate="tanh")
    assert ours.dtype == dtype and ours.shape == (3, 300, 2048)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-3  # bf16: output rounding; float32: summation order
    err_ours = (ours.double() - ref).abs().max().item()
    err_unfused = (unfused.double() - ref).abs().max().item()
    assert err_ours <= max(tol, 1.01 * err_unfused), (err_ours, err_unfused)


@pytest.mark.cuda
def test_compiled_graph_keeps_the_epilogue_op():
    torch._dynamo.reset()
    fc = nn.Linear(256, 1024).to("cuda", torch.bfloat16)
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    with torch.no_grad():
        out = torch.compile(lambda t: linear_gelu_tanh(t, fc), backend=backend, fullgraph=True)(x)
        torch.testing.assert_close(out, linear_gelu_tanh(x, fc), rtol=0, atol=0)
    assert any("linear_gelu_tanh" in t for t in seen), seen
    torch._dynamo.reset()


def _rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


def test_rms_norm_in_place_on_cpu_is_copy_of_rms_norm():
    torch.manual_seed(0)
    kv = torch.randn(2, 7, 2 * 24)
    k, v = kv.split([24, 24], dim=-1)
    w, v_before = torch.randn(24), v.clone()
    expected = F.rms_norm(k, (24,), w, 1e-6)
    out = rms_norm_(k, w, 1e-6)
    assert out is k
    torch.testing.assert_close(k, expected, rtol=0, atol=0)
    assert torch.equal(v, v_before)  # the other half of the buffer is untouched


def test_rms_norm_in_place_names_a_wrong_weight():
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\) .* or \(3, 8\) for one weight per x\[g\]"):
        rms_norm_(torch.zeros(3, 8), torch.ones(4), 1e-6)
    with pytest.raises(ValueError, match=r"or \(3, 8\) for one weight per x\[g\], got \(2, 8\)"):
        rms_norm_(torch.zeros(3, 5, 8), torch.ones(2, 8), 1e-6)


def test_rms_norm_in_place_with_one_weight_per_group():
    """weight [G, N] norms x[g] with weight[g] (all blocks' text keys in one launch on CUDA)."""
    torch.manual_seed(1)
    kv = torch.randn(3, 7, 2 * 24)
    k, v = kv[..., :24], kv[..., 24:]
    w, v_before = torch.randn(3, 24), v.clone()
    expected = torch.stack([F.rms_norm(k[g], (24,), w[g], 1e-6) for g in range(3)])
    assert rms_norm_(k, w, 1e-6) is k
    torch.testing.assert_close(k, expected, rtol=0, atol=0)
    assert torch.equal(v, v_before)
    lin = nn.Linear(4, 48)
    k = lin(torch.randn(3, 5, 4))[..., :24]
    out = rms_norm_(k, w, 1e-6)  # autograd records: out of place
    torch.testing.assert_close(out, torch.stack([F.rms_norm(k[g], (24,), w[g], 1e-6) for g in range(3)]))
    out.sum().backward()
    assert lin.weight.grad is not None


def test_rms_norm_in_place_under_autograd_takes_the_recorded_path():
    lin = nn.Linear(4, 16)
    k, _ = lin(torch.randn(3, 4)).split([8, 8], dim=-1)
    w = torch.ones(8, requires_grad=True)
    out = rms_norm_(k, w, 1e-6)  # out of place: autograd refuses in-place writes to split views
    torch.testing.assert_close(out, F.rms_norm(k, (8,), w, 1e-6), rtol=0, atol=0)
    out.sum().backward()
    assert w.grad is not None and lin.weight.grad is not None


def test_kernel_path_refuses_layouts_it_would_get_wrong():
    from pipeline.fused import _rows_viewable

    base = torch.zeros(4, 16)
    assert _rows_viewable(base[:, :8]) and _rows_viewable(base.view(2, 2, 16)) and _rows_viewable(torch.zeros(8))
    assert not _rows_viewable(torch.zeros(1, 8).expand(4, 8))  # every row the same memory
    assert not _rows_viewable(base.as_strided((4, 8), (2, 1)))  # rows overlap
    assert not _rows_viewable(base.t())  # strided columns
    assert not _rows_viewable(torch.zeros(3, 0))  # nothing to normalise
    assert not _rows_viewable(base.view(2, 2, 16)[:, :, :8].transpose(0, 1))  # not viewable as rows


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]  # on CUDA the ops run their Triton kernels


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_op_registration_is_consistent(device):
    x, w = torch.randn(4, 16, device=device), torch.randn(16, device=device)
    torch.library.opcheck(_rms_norm_inplace_op, (x, w, 1e-6), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.cuda
@pytest.mark.parametrize("width", [2048, 4096, 96])
def test_triton_rms_norm_matches_float64_on_a_column_slice(width):
    torch.manual_seed(0)
    kv = torch.randn(2, 333, 2 * width, device="cuda", dtype=torch.bfloat16) * 3
    k, v = kv.split([width, width], dim=-1)
    w = torch.randn(width, device="cuda", dtype=torch.bfloat16)
    ref = _rms_norm_reference(k, w, 1e-6)
    aten = F.rms_norm(k, (width,), w, 1e-6)
    v_before, ptr = v.clone(), k.data_ptr()
    with torch.no_grad():
        out = rms_norm_(k, w, 1e-6)
    assert out is k and k.data_ptr() == ptr and torch.equal(v, v_before)
    err_ours = (k.double() - ref).abs().max().item()
    err_aten = (aten.double() - ref).abs().max().item()
    assert err_ours <= max(1e-2 * ref.abs().max().item(), 1.01 * err_aten), (err_ours, err_aten)


@pytest.mark.cuda
def test_triton_rms_norm_with_one_weight_per_group_matches_float64():
    """48 blocks' keys, each normed with its block's weight, in one launch: each group as the single-weight
    kernel does it (bitwise: same program per row), and near float64."""
    torch.manual_seed(0)
    width = 4096
    kv = torch.randn(48, 1024, 2 * width, device="cuda", dtype=torch.bfloat16) * 3
    w = torch.randn(48, width, device="cuda", dtype=torch.bfloat16)
    one_by_one = kv.clone()
    with torch.no_grad():
        rms_norm_(kv[..., :width], w, 1e-6)
        for g in range(48):
            rms_norm_(one_by_one[g, :, :width], w[g], 1e-6)
    assert torch.equal(kv, one_by_one)
    sample = torch.randn(2, 33, 2 * width, device="cuda", dtype=torch.bfloat16)
    expected = torch.stack([_rms_norm_reference(sample[g, :, :width], w[g], 1e-6) for g in range(2)])
    with torch.no_grad():
        rms_norm_(sample[..., :width], w[:2], 1e-6)
    assert (sample[..., :width].double() - expected).abs().max().item() <= 1e-2 * expected.abs().max().item()


@pytest.mark.cuda
def test_compiled_text_kv_norms_the_keys_in_place_of_the_projection():
    """k and v come back as views of one buffer: inductor ran the op on the GEMM output, no copy of it."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    width = 1024
    lin = nn.Linear(512, 2 * width).to("cuda", torch.bfloat16)
    w = torch.randn(width, device="cuda", dtype=torch.bfloat16)
    ctx = torch.randn(1, 256, 512, device="cuda", dtype=torch.bfloat16)

    def kv_of(c):
        k, v = lin(c).split([width, width], dim=-1)
        return rms_norm_(k, w, 1e-6), v

    with torch.no_grad():
        k_eager, v_eager = kv_of(ctx)
        k, v = torch.compile(kv_of, fullgraph=True)(ctx)
    assert v.data_ptr() == k.data_ptr() + width * k.element_size()
    assert torch.equal(k, k_eager) and torch.equal(v, v_eager)
    torch._dynamo.reset()


def _qkv_and_tables(batch: int, tokens: int, heads: int, r: int, device: str, dtype: torch.dtype,
                    table: str = "expanded"):
    """q and k as column slices of one [q | k | v | gates] projection, and a float32 table: "expanded" (batch
    stride 0), "batch 1" (a plain [1, N, H, r] slice of a bigger buffer, serving every sample) or "per sample"."""
    torch.manual_seed(0)
    width = heads * 2 * r
    proj = torch.randn(batch, tokens, 3 * width + heads, device=device, dtype=dtype) * 2
    q, k, _, _ = proj.split([width, width, width, heads], dim=-1)
    angles = torch.rand(batch + 1, tokens, heads, r, device=device) * 6.28  # different tables per sample
    angles = {"expanded": angles[:1].expand(batch, tokens, heads, r), "batch 1": angles[:1],
              "per sample": angles[:batch]}[table]
    cos, sin = angles.cos(), angles.sin()
    if table == "batch 1":  # slices of bigger buffers: a read past the first table would find other values
        cos, sin = (torch.cat([t, t.flip(1) + 1])[:1] for t in (cos, sin))
    weights = [torch.randn(width, device=device, dtype=dtype) for _ in range(2)]
    return q, k, weights, (cos, sin)


def _norm_rope_float64(x, weight, eps, rope):
    cos, sin = (t.double() for t in rope)
    y = _rms_norm_reference(x, weight, eps).unflatten(-1, (cos.shape[-2], 2, cos.shape[-1]))
    y1, y2 = y.unbind(-2)
    return torch.stack([y1 * cos - y2 * sin, y2 * cos + y1 * sin], dim=-2).flatten(2)


def test_norm_rope_qk_on_cpu_is_the_reference_path():
    q, k, (wq, wk), rope = _qkv_and_tables(2, 5, 4, 3, "cpu", torch.float32)
    got_q, got_k = rms_norm_rope_qk(q, wq, k, wk, 1e-6, rope)
    for got, x, w in ((got_q, q, wq), (got_k, k, wk)):
        torch.testing.assert_close(got, apply_split_rope(F.rms_norm(x, (x.shape[-1],), w, 1e-6), rope), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_norm_rope_qk_op_registration_is_consistent(device):
    q, k, (wq, wk), (cos, sin) = _qkv_and_tables(1, 4, 2, 4, device, torch.float32)
    torch.library.opcheck(_rms_norm_rope_qk_op, (q.contiguous(), wq, k.contiguous(), wk, 1e-6, cos, sin),
                          test_utils=("test_schema", "test_faketensor"))


def test_norm_rope_qk_names_a_wrong_weight():
    q, k, (wq, wk), rope = _qkv_and_tables(1, 4, 2, 4, "cpu", torch.float32)
    with pytest.raises(ValueError, match=r"k_weight must have shape \(16,\), got \(8,\)"):
        rms_norm_rope_qk(q, wq, k, wk[:8], 1e-6, rope)


@pytest.mark.cuda
@pytest.mark.parametrize("batch,heads,r,table", [(1, 32, 64, "expanded"), (2, 32, 32, "expanded"), (1, 3, 5, "expanded"),
                                                 (2, 32, 32, "batch 1"), (2, 4, 16, "per sample")])
def test_triton_norm_rope_qk_matches_float64(batch, heads, r, table):
    q, k, (wq, wk), rope = _qkv_and_tables(batch, 257, heads, r, "cuda", torch.bfloat16, table)
    with torch.no_grad():
        got_q, got_k = rms_norm_rope_qk(q, wq, k, wk, 1e-6, rope)
        for got, x, w in ((got_q, q, wq), (got_k, k, wk)):
            assert got.shape == x.shape and got.dtype == x.dtype and got.is_contiguous()
            ref = _norm_rope_float64(x, w, 1e-6, rope)
            aten = apply_split_rope(F.rms_norm(x, (x.shape[-1],), w, 1e-6), rope)
            err_ours = (got.double() - ref).abs().max().item()
            err_aten = (aten.double() - ref).abs().max().item()
            bound = max(1.01 * err_aten, 2.0 ** -8 * ref.abs().max().item())  # one rounding, not two
            assert err_ours <= bound, (err_ours, err_aten)


@pytest.mark.cuda
def test_compiled_self_attention_calls_the_qk_kernel():
    from pipeline.attention import SelfAttention

    torch._dynamo.reset()
    attn = SelfAttention(256, 4, 64, 1e-6).to("cuda", torch.bfloat16)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(1, 96, 256, device="cuda", dtype=torch.bfloat16)
    angles = torch.rand(1, 96, 4, 32, device="cuda") * 6.28
    rope = (angles.cos(), angles.sin())
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    with torch.no_grad():
        out = torch.compile(attn, backend=backend, fullgraph=True)(x, rope)
        torch.testing.assert_close(out, attn(x, rope), rtol=0, atol=0)
    assert any("rms_norm_rope_qk" in t for t in seen), seen
    torch._dynamo.reset()


@pytest.mark.cuda
def test_triton_norm_rope_qk_takes_q_and_k_of_different_projections():
    """The exchange's shape: q a column slice of a [q | gates] projection, k of a [k | v] one (different row
    strides), 32 heads of 64 (r = 32), a broadcast batch-2 table."""
    torch.manual_seed(1)
    batch, tokens, heads, r = 2, 300, 32, 32
    width = heads * 2 * r
    q = torch.randn(batch, tokens, width + heads, device="cuda", dtype=torch.bfloat16)[..., :width]
    k = torch.randn(batch, tokens, 2 * width, device="cuda", dtype=torch.bfloat16)[..., :width]
    angles = torch.rand(1, tokens, heads, r, device="cuda") * 6.28
    rope = tuple(t.expand(batch, tokens, heads, r) for t in (angles.cos(), angles.sin()))
    wq, wk = (torch.randn(width, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    with torch.no_grad():
        got_q, got_k = rms_norm_rope_qk(q, wq, k, wk, 1e-6, rope)
    for got, x, w in ((got_q, q, wq), (got_k, k, wk)):
        ref = _norm_rope_float64(x, w, 1e-6, rope)
        assert (got.double() - ref).abs().max().item() <= 2.0 ** -7 * ref.abs().max().item()


@pytest.mark.cuda
def test_compiled_exchange_norms_each_modality_in_one_kernel():
    """Under compile the exchange calls the q/k kernel twice (video side, audio side) and matches eager."""
    from pipeline.attention import CrossAttention, exchange_attention

    torch._dynamo.reset()
    torch.manual_seed(2)
    a2v = CrossAttention(256, 128, 4, 32, 1e-6).to("cuda", torch.bfloat16)  # Q video (256), K/V audio (128)
    v2a = CrossAttention(128, 256, 4, 32, 1e-6).to("cuda", torch.bfloat16)
    for p in [*a2v.parameters(), *v2a.parameters()]:
        torch.nn.init.normal_(p, std=0.05)
    v, a = torch.randn(1, 96, 256, device="cuda", dtype=torch.bfloat16), torch.randn(1, 12, 128, device="cuda",
                                                                                       dtype=torch.bfloat16)
    tables = [torch.rand(1, n, 4, 16, device="cuda") * 6.28 for n in (96, 12)]
    video_rope, audio_rope = ((t.cos(), t.sin()) for t in tables)
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    def both(v, a):
        return exchange_attention(a2v, v2a, v, a, a, v, video_rope, audio_rope)

    with torch.no_grad():
        out = torch.compile(both, backend=backend, fullgraph=True)(v, a)
        ref = both(v, a)
    assert all(torch.equal(o, r) for o, r in zip(out, ref))
    assert sum("rms_norm_rope_qk" in t for t in seen) == 2, seen
    torch._dynamo.reset()

"""The FP8 projections (`pipeline.fp8`): the e4m3 Linear against its float64 definition and against the Linear
it replaces, the quantization of a model, and (GPU) the one-pass Triton input kernels against their formulas
(tests/graphs/test_fp8_gpu.py runs the FP8 model under compile + CUDA graphs).

The definition: with row scales s_x (per token) and s_w (per output channel), out = (q_x s_x) (q_w s_w)^T + b,
where q are the e4m3 values. Against that, the GEMM is exact up to its float32 accumulation and the output's
rounding; against the unquantized Linear it is off by e4m3's 3 mantissa bits (~4e-2 on random data)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.config import LatentGrid, ModelConfig
from pipeline.fp8 import (
    E4M3,
    FP8_PROJECTIONS,
    Float8Linear,
    fp8_unsupported,
    is_quantized,
    modulate_quantize_rows,
    output_error,
    project_rows,
    quantize_fp8,
    quantize_rows,
)
from pipeline.model import build_model, timestep_sinusoid
from pipeline.rope import build_rope_tables
from pipeline.weights import WeightLoadError, load_weights, save_diffusers_transformer
from tests.pipeline.reference import random_inputs, relative_error

GRID = LatentGrid(frames=3, height=2, width=3, audio_tokens=7)


def dequantized_reference(layer: Float8Linear, x: torch.Tensor) -> torch.Tensor:
    """The float64 value `layer(x)` computes: both operands rebuilt from their e4m3 values and row scales."""
    q, scale = quantize_rows(x.reshape(-1, layer.in_features))
    xs = q.double() * scale.double()
    ws = layer.weight_e4m3.double() * layer.weight_scale.double().t()
    out = xs @ ws.t() + (0 if layer.bias is None else layer.bias.double())
    return out[:, : layer.out_features].view(*x.shape[:-1], layer.out_features)


def random_linear(k: int, n: int, *, dtype=torch.float32, device="cpu", seed=0, bias=True) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(k, n, bias=bias).to(device=device, dtype=dtype)
    with torch.no_grad():
        linear.weight.normal_(0, k ** -0.5)
    return linear


def check_linear(linear: nn.Linear, x: torch.Tensor, *, exact_tol: float) -> Float8Linear:
    layer = Float8Linear.from_linear(linear)
    out = layer(x)
    assert out.shape == (*x.shape[:-1], linear.out_features) and out.dtype == x.dtype
    assert relative_error(out, dequantized_reference(layer, x)) < exact_tol
    err = relative_error(out, linear(x))  # e4m3's rounding on random data
    assert 5e-3 < err < 6e-2, err
    return layer


@pytest.mark.parametrize("n", [64, 98])  # 98: padded to 112 rows, sliced off the output
@pytest.mark.parametrize("bias", [True, False])
def test_float8_linear_is_its_definition_and_near_the_linear(n, bias):
    linear = random_linear(32, n, bias=bias, seed=n)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(n))
    layer = check_linear(linear, x, exact_tol=1e-6)
    assert layer.weight_e4m3.dtype == E4M3 and layer.weight_e4m3.shape == (-(-n // 16) * 16, 32)
    assert layer.weight_scale.shape == (1, layer.weight_e4m3.shape[0]) and layer.weight_scale.dtype == torch.float32


def test_project_rows_is_the_slice_of_the_full_output():
    linear = random_linear(32, 98, seed=3)
    layer = Float8Linear.from_linear(linear)
    x = torch.randn(4, 32)
    for start in (0, 16, 64, 96):
        torch.testing.assert_close(project_rows(layer, x, start), layer(x)[..., start:], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(project_rows(linear, x, start), linear(x)[..., start:])
    for bad in (8, -16, 98, 112):
        with pytest.raises(ValueError, match=f"start must be a multiple of 16 in \\[0, 98\\), got {bad}"):
            layer.project_rows(x, bad)


def test_project_rows_of_a_wrapped_or_hooked_linear_runs_its_forward():
    """The STG value pass-through reads [v | gate] rows of the fused projection; a LoRA-style subclass or a hook
    must act there too, as in every other pass (it was bypassed: the weight was read directly)."""

    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    x = torch.randn(3, 16)
    doubled = Doubled(16, 8)
    torch.testing.assert_close(project_rows(doubled, x, 5), doubled(x)[..., 5:])
    hooked = nn.Linear(16, 8)
    hooked.register_forward_hook(lambda module, args, out: out + 1)
    torch.testing.assert_close(project_rows(hooked, x, 5), hooked(x)[..., 5:])
    quantized = Float8Linear.from_linear(nn.Linear(16, 8))  # after quantize_fp8 too
    quantized.register_forward_hook(lambda module, args, out: out + 1)
    torch.testing.assert_close(project_rows(quantized, x, 5), quantized(x)[..., 5:])


def test_fused_inputs_are_the_linear_of_their_formula():
    """`of_gelu` and `of_gated_heads` (one kernel each on CUDA) compute the projection of their formula."""
    gen = torch.Generator().manual_seed(5)
    fc2 = Float8Linear.from_linear(random_linear(64, 48, seed=5))
    h = torch.randn(2, 7, 64, generator=gen)
    torch.testing.assert_close(fc2.of_gelu(h), fc2(torch.nn.functional.gelu(h, approximate="tanh")))
    heads, logits = torch.randn(2, 7, 4, 16, generator=gen), torch.randn(2, 7, 4, generator=gen)
    gated = (heads * (2.0 * torch.sigmoid(logits)).unsqueeze(-1)).flatten(2)
    torch.testing.assert_close(fc2.of_gated_heads(heads, logits), fc2(gated))
    with pytest.raises(ValueError, match="heads give 4 x 8 features, expected 64"):
        fc2.of_gated_heads(heads[..., :8], logits)
    with pytest.raises(ValueError, match=r"gate_logits has shape \[2, 1, 4\], expected \[2, 7, 4\]"):
        fc2.of_gated_heads(heads, logits[:, :1])


def test_text_kv_inputs_of_all_blocks_quantize_as_each_block_would():
    """`modulate_quantize_rows` (one kernel on CUDA) is `quantize_rows` of each block's modulated context, and
    `project_quantized_into` writes what the layer computes from those rows."""
    gen = torch.Generator().manual_seed(6)
    context = torch.randn(2, 5, 32, generator=gen)
    scale, shift = torch.randn(3, 2, 1, 32, generator=gen) * 0.3, torch.randn(3, 2, 1, 32, generator=gen)
    q, q_scale = modulate_quantize_rows(context, scale, shift)
    assert q.dtype == E4M3 and q.shape == (3, 10, 32) and q_scale.shape == (3, 10, 1)
    kv = Float8Linear.from_linear(random_linear(32, 64, seed=6))
    out = torch.empty(3, 10, 64)
    for g in range(3):
        rq, rscale = quantize_rows(torch.addcmul(shift[g], context, 1 + scale[g]).view(10, 32))
        assert torch.equal(q[g], rq) and torch.equal(q_scale[g], rscale)
        assert kv.project_quantized_into(q[g], q_scale[g], out[g]).data_ptr() == out[g].data_ptr()
        torch.testing.assert_close(out[g], kv._project(rq, rscale, rq.shape[:1], 0), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"out must be \[10, 64\] .* got \[10, 48\]"):
        kv.project_quantized_into(q[0], q_scale[0], out[0, :, :48])
    padded = Float8Linear.from_linear(random_linear(32, 56, seed=7))  # 56 rows padded to 64: nowhere to put them
    with pytest.raises(ValueError, match="out_features a multiple of 16"):
        padded.project_quantized_into(q[0], q_scale[0], torch.empty(10, 56))


def test_float8_linear_moves_but_refuses_a_cast():
    """`.to(device)` keeps the e4m3 weights; a dtype cast (the model's `.to(bfloat16)`, `.half()`) would rewrite
    them and their scales into other numbers: refused, nothing changed. A bf16 state dict does not load either
    (the e4m3 weights are not named `weight`)."""
    layer = Float8Linear.from_linear(random_linear(32, 32))
    before = layer.weight_e4m3.clone()
    assert layer.to("cpu").weight_e4m3.dtype == E4M3
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.float()):
        with pytest.raises(ValueError, match="cannot be cast to torch.(bfloat16|float16|float32)"):
            cast(layer)
    assert torch.equal(layer.weight_e4m3.view(torch.uint8), before.view(torch.uint8))
    with pytest.raises(RuntimeError, match="Missing key.*weight_e4m3"):
        layer.load_state_dict(random_linear(32, 32).state_dict())


def test_float8_linear_refuses_widths_and_inputs_it_cannot_multiply():
    with pytest.raises(ValueError, match="in_features must be a multiple of 16, got 24"):
        Float8Linear.from_linear(nn.Linear(24, 32))
    layer = Float8Linear.from_linear(nn.Linear(32, 32))
    with pytest.raises(ValueError, match="input has 16 features, expected 32"):
        layer(torch.randn(3, 16))


def test_fp8_support_is_decided_by_the_compute_capability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Card")
    for capability, supported in (((8, 0), False), ((8, 6), False), ((8, 9), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        reason = fp8_unsupported(torch.device("cuda"))
        assert (reason is None) is supported
        if not supported:
            assert f"Card (sm_{capability[0]}{capability[1]}) has no FP8 tensor cores" in reason
    assert fp8_unsupported("cpu") is None


def test_quantize_rows_is_safe_at_the_edges():
    """An all-zero row quantizes to zeros (no 0/0); a huge or small row keeps its relative precision, its largest
    value mapped to +-448 (e4m3's max), never past it (which would be NaN); a row under 1e-12 is quantized on the
    fixed scale 1e-12 / 448 (coarser, never a division by zero)."""
    x = torch.stack([torch.zeros(32), torch.randn(32) * 1e30, torch.randn(32) * 1e-8, torch.randn(32),
                     torch.full((32,), 1e-14)])
    q, scale = quantize_rows(x)
    assert torch.isfinite(q.float()).all() and (q[0].float() == 0).all()
    assert scale[4].item() == pytest.approx(1e-12 / 448) and (q[4].float() * scale[4] - 1e-14).abs().max() < 1e-15
    assert q.float().abs().amax(dim=-1)[1:4].eq(448).all()
    back = q.float() * scale
    for row in (1, 2, 3):
        assert relative_error(back[row], x[row]) < 4e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_model_stays_near_the_model(dtype):
    """Every FP8 projection of every block is replaced; the forward's outputs stay within a few percent of the
    unquantized model's, on every pass kind (STG value pass-through and the exchange switches included)."""
    model = build_model(ModelConfig.preset("tiny"), device="cpu", dtype=dtype, seed=0)
    rope = build_rope_tables(model.config, GRID, device="cpu")
    x = random_inputs(model.config, GRID, batch=2, seed=4, dtype=dtype)
    passes = [{}, dict(skip_video_self_attn_blocks=(0,), skip_audio_self_attn_blocks=(1,)),
              dict(disable_a2v_cross_attn=True, disable_v2a_cross_attn=True)]

    def outputs():
        with torch.no_grad():
            return [model(x.video, x.audio, x.video_context, x.audio_context, x.sigma, rope, **p) for p in passes]

    before, version = outputs(), model.weights_version
    assert quantize_fp8(model) == len(FP8_PROJECTIONS) * model.config.num_layers
    assert is_quantized(model) and model.weights_version == version + 1  # no graph of the old weights replays
    assert isinstance(model.blocks[1].video_ff.fc2, Float8Linear)
    assert type(model.blocks[1].audio_ff.fc2) is nn.Linear  # the audio tokens' projections stay
    for b, a in zip(before, outputs()):
        for ref, out in zip(b, a):
            error = output_error(out, ref)
            assert error["relative_error"] < 6e-2 and error["cosine"] > 0.998, error
    # The text keys/values of all blocks at once (one quantization of every block's context) are each block's
    # FP8 projection of its own modulated context.
    with torch.no_grad():
        text_kv = model.text_kv(x.video_context, x.audio_context, x.sigma)
        prompt = model.video_prompt(timestep_sinusoid(model._timesteps(x.sigma)[1], dtype))[0]
        for block, kv in zip(model.blocks, text_kv):
            shift, scale = (block.video_prompt_table + prompt).unbind(2)
            k, v = block.video_text.context_kv(torch.addcmul(shift, x.video_context, 1 + scale))
            assert torch.equal(kv.video_k, k) and torch.equal(kv.video_v, v)


def test_a_refused_cast_of_a_quantized_model_changes_nothing():
    model = build_model(ModelConfig.preset("tiny"), device="cpu", dtype=torch.float32, seed=0)
    quantize_fp8(model)
    before = {name: t.dtype for name, t in model.state_dict().items()}
    with pytest.raises(ValueError, match="FP8 projections cannot be cast to torch.bfloat16"):
        model.to(torch.bfloat16)
    assert {name: t.dtype for name, t in model.state_dict().items()} == before
    assert model.to("cpu") is model  # a move is not a cast


def test_quantize_fp8_refusals(tmp_path):
    model = build_model(ModelConfig.preset("tiny"), device="cpu", dtype=torch.float32, seed=0)
    save_diffusers_transformer(model, tmp_path / "ckpt")
    quantize_fp8(model)
    with pytest.raises(ValueError, match="needs an unquantized model; this one is already quantized"):
        quantize_fp8(model)
    with pytest.raises(ValueError, match="quantize_fp8 needs an LTX2Transformer .*got Linear"):
        quantize_fp8(torch.nn.Linear(16, 16))
    with pytest.raises(WeightLoadError, match="load or export its weights before quantizing"):
        load_weights(model, tmp_path / "ckpt")
    with pytest.raises(WeightLoadError, match="before quantizing"):
        save_diffusers_transformer(model, tmp_path / "again")
    half = build_model(ModelConfig.preset("tiny"), device="cpu", dtype=torch.float16, seed=0)
    with pytest.raises(ValueError, match="model dtype must be torch.bfloat16 or torch.float32 on cpu"):
        quantize_fp8(half)
    odd = build_model(ModelConfig.preset("tiny"), device="cpu", dtype=torch.float32, seed=0)
    odd.blocks[1].video_ff.fc2 = nn.Linear(72, 32)  # a width the FP8 kernels cannot take, in the last block
    with pytest.raises(ValueError, match="blocks.1.video_ff.fc2 has in_features 72; FP8 needs a multiple of 16"):
        quantize_fp8(odd)
    assert not is_quantized(odd)  # checked before the first swap: nothing half-done


def test_quantized_forward_has_no_host_sync_ops():
    from tests.pipeline.test_model import _OpRecorder

    model = build_model(ModelConfig.preset("tiny"), device="cpu", dtype=torch.float32, seed=0)
    quantize_fp8(model)
    rope = build_rope_tables(model.config, GRID, device="cpu")
    x = random_inputs(model.config, GRID, seed=6)
    recorder = _OpRecorder()
    with torch.no_grad(), recorder:
        model(x.video, x.audio, x.video_context, x.audio_context, x.sigma, rope, skip_video_self_attn_blocks=(1,))
    assert recorder.found == []


# ---- GPU ------------------------------------------------------------------------------------------------------

def _needs_fp8_gpu():
    reason = fp8_unsupported("cuda")
    if reason:
        pytest.skip(reason)


@pytest.mark.cuda
@pytest.mark.parametrize("m, k, n", [(37, 64, 98), (1536, 4096, 12320), (126, 2048, 4096)])
def test_float8_linear_on_the_gpu_is_its_definition(m, k, n):
    _needs_fp8_gpu()
    linear = random_linear(k, n, dtype=torch.bfloat16, device="cuda", seed=m)
    x = torch.randn(1, m, k, device="cuda", dtype=torch.bfloat16)
    check_linear(linear, x, exact_tol=5e-3)  # bf16 output rounding


@pytest.mark.cuda
@pytest.mark.parametrize("m, n", [(37, 98), (300, 4096), (129, 16384)])
def test_gelu_quantize_kernel_is_the_formula(m, n):
    """The one-pass Triton GELU + quantization against the formula (GELU in bf16, then `quantize_rows`): equal
    within the bf16 rounding the kernel skips; large inputs saturate tanh without NaN."""
    _needs_fp8_gpu()
    from pipeline.fp8 import gelu_quantize_rows

    x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16) * 3
    x[0, :4] = torch.tensor([60.0, -60.0, 0.0, 1e-3])  # tanh saturated both ways, zero, tiny
    q, scale = gelu_quantize_rows(x)
    assert q.dtype == E4M3 and q.shape == (m, n) and scale.shape == (m, 1) and torch.isfinite(q.float()).all()
    rq, rscale = quantize_rows(torch.nn.functional.gelu(x, approximate="tanh"))
    torch.testing.assert_close(scale, rscale, rtol=1e-2, atol=0)
    exact = torch.nn.functional.gelu(x.double(), approximate="tanh")
    # Norm-wise errors: a bf16 rounding moves some values across an e4m3 rounding boundary, one e4m3 step (up to
    # 1/8 of the row maximum) each, so max-wise errors say little. On CPU the two roundings differ by ~0.5%.
    assert output_error(q.double() * scale, rq.double() * rscale)["relative_error"] < 1.5e-2
    assert output_error(q.double() * scale, exact)["relative_error"] < 3.5e-2


@pytest.mark.cuda
@pytest.mark.parametrize("groups, b, n, c", [(3, 1, 37, 96), (48, 1, 1024, 4096), (4, 2, 300, 2048)])
def test_modulate_quantize_kernel_is_the_formula(groups, b, n, c):
    """The one-launch Triton modulation + quantization of every block's text context against the formula
    (modulation in bf16, then `quantize_rows`), each sample's rows taking its own modulation row."""
    _needs_fp8_gpu()
    context = torch.randn(b, n, c, device="cuda", dtype=torch.bfloat16) * 2
    scale = torch.randn(groups, b, 1, c, device="cuda", dtype=torch.bfloat16) * 0.5
    shift = torch.randn(groups, b, 1, c, device="cuda", dtype=torch.bfloat16)
    q, q_scale = modulate_quantize_rows(context, scale, shift)
    assert q.shape == (groups, b * n, c) and q_scale.shape == (groups, b * n, 1) and torch.isfinite(q.float()).all()
    modulated = torch.addcmul(shift, context, 1 + scale).view(groups, b * n, c)
    rq, rscale = quantize_rows(modulated)
    torch.testing.assert_close(q_scale, rscale, rtol=1e-2, atol=0)
    exact = (context.double() * (1 + scale.double()) + shift.double()).view(groups, b * n, c)
    # Norm-wise, as above: the formula rounds the modulation to bf16 once (1.55e-2 apart on an H200), and the
    # kernel, which skips that rounding, is no further from the exact values than the formula.
    assert output_error(q.double() * q_scale, rq.double() * rscale)["relative_error"] < 2e-2
    ours = output_error(q.double() * q_scale, exact)["relative_error"]
    assert ours < 3.5e-2 and ours <= 1.02 * output_error(rq.double() * rscale, exact)["relative_error"]


@pytest.mark.cuda
@pytest.mark.parametrize("b, n, h, d, layout", [(1, 37, 3, 24, "bhnd"), (2, 300, 32, 128, "bhnd"),
                                                (1, 129, 32, 64, "bnhd")])
def test_gated_heads_quantize_kernel_is_the_formula(b, n, h, d, layout):
    """The one-pass Triton gates + quantization against the formula, on heads laid out as SDPA returns them (a
    [B, H, N, D] buffer seen as [B, N, H, D]) or contiguous, gate logits a column slice of a wider projection."""
    _needs_fp8_gpu()
    from pipeline.fp8 import gated_heads_quantize_rows

    heads = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2) if layout == "bhnd" else \
        torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16)
    logits = torch.randn(b, n, 3 * h, device="cuda", dtype=torch.bfloat16)[..., h: 2 * h] * 4
    q, scale = gated_heads_quantize_rows(heads, logits)
    assert q.shape == (b * n, h * d) and scale.shape == (b * n, 1) and torch.isfinite(q.float()).all()
    gated = (heads * (2.0 * torch.sigmoid(logits)).unsqueeze(-1)).reshape(b * n, h * d)
    rq, rscale = quantize_rows(gated)
    torch.testing.assert_close(scale, rscale, rtol=1e-2, atol=0)
    exact = (heads.double() * (2.0 * torch.sigmoid(logits.double())).unsqueeze(-1)).reshape(b * n, h * d)
    # Norm-wise, as above; the formula rounds twice to bf16 (gates, product): ~1.4% apart on CPU.
    assert output_error(q.double() * scale, rq.double() * rscale)["relative_error"] < 3e-2
    assert output_error(q.double() * scale, exact)["relative_error"] < 3.5e-2

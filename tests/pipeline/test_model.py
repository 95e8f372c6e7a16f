"""The transformer itself: presets, grids, forward contract, input validation, capture-readiness (CPU), and
the GPU checks (sync debug mode, the 19B preset against diffusers)."""

import contextlib
import copy
import gc
import math
import time

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pipeline.rope
from pipeline.config import PRESET_NAMES, LatentGrid, ModelConfig
from pipeline.model import build_model
from pipeline.rope import build_rope_tables
from tests.pipeline.reference import random_inputs, relative_error

GRID = LatentGrid(frames=3, height=2, width=3, audio_tokens=7)


@pytest.fixture(scope="module")
def tiny():
    return build_model(ModelConfig.preset("tiny"), device="cpu", dtype=torch.float32, seed=0)


def run(model, x, rope, **options):
    with torch.no_grad():
        return model(x.video, x.audio, x.video_context, x.audio_context, x.sigma, rope, **options)


# ---- config and grid ------------------------------------------------------------------------------------------

def test_presets():
    assert PRESET_NAMES == ("tiny", "small", "ltx2.3")
    big = ModelConfig.preset("ltx2.3")
    assert (big.num_layers, big.video_dim, big.audio_dim) == (48, 4096, 2048)
    assert (big.video_context_dim, big.audio_context_dim) == (4096, 2048)
    small = ModelConfig.preset("small")
    assert (small.video_dim, small.audio_dim, small.num_layers) == (4096, 2048, 4)
    assert ModelConfig.preset("tiny").num_layers == 2
    assert hash(big) == hash(ModelConfig.preset("ltx2.3"))
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        ModelConfig.preset("huge")


def test_ltx23_parameter_count_on_meta():
    model = build_model(ModelConfig.preset("ltx2.3"), device="meta", dtype=torch.bfloat16)
    count = sum(p.numel() for p in model.parameters())
    assert 18.9e9 < count < 19.1e9, count  # diffusers' LTX-2.3 transformer: 18.99 B
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in model.parameters())


def test_latent_grid():
    grid = LatentGrid.from_pixels(width=768, height=512, num_frames=121, fps=24.0)
    assert (grid.num_video_tokens, grid.audio_tokens) == (6144, 126)
    assert LatentGrid.from_pixels(width=960, height=544, num_frames=121).num_video_tokens == 8160
    g = LatentGrid.from_tokens(1536)
    assert (g.frames, g.height, g.width, g.audio_tokens) == (16, 8, 12, 126)
    assert (LatentGrid.from_tokens(8160).height, LatentGrid.from_tokens(8160).width) == (17, 30)
    assert LatentGrid.from_tokens(1000).num_video_tokens == 1000
    with pytest.raises(ValueError, match="frames"):
        LatentGrid(frames=0, height=1, width=1, audio_tokens=1)
    with pytest.raises(ValueError, match="num_video_tokens"):
        LatentGrid.from_tokens(0)


# ---- forward ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_shapes_dtype_finite(dtype):
    config = ModelConfig.preset("tiny")
    model = build_model(config, device="cpu", dtype=dtype)
    x = random_inputs(config, GRID, batch=2, dtype=dtype)
    video, audio = run(model, x, build_rope_tables(config, GRID, device="cpu"))
    assert video.shape == x.video.shape and audio.shape == x.audio.shape
    assert video.dtype == dtype and audio.dtype == dtype
    assert torch.isfinite(video).all() and torch.isfinite(audio).all()


def test_rope_pads_widths_too_narrow_for_frequencies():
    """A stream narrower than 2 x axes has no RoPE frequencies: its tables are all padding (cos 1, sin 0, no
    rotation). The padding was taken as a slice of the (empty) angles, so it came out empty and every forward
    failed on the table's shape."""
    config = ModelConfig.preset("tiny").replace(video_heads=1, video_head_dim=4, video_context_dim=4)
    rope = build_rope_tables(config, GRID, device="cpu")
    cos, sin = rope.video
    assert cos.shape == (1, GRID.num_video_tokens, 1, 2)
    assert torch.equal(cos, torch.ones_like(cos)) and torch.equal(sin, torch.zeros_like(sin))
    video, audio = run(build_model(config, device="cpu", dtype=torch.float32), random_inputs(config, GRID), rope)
    assert torch.isfinite(video).all() and torch.isfinite(audio).all()


def test_deep_model_stays_finite_in_bf16():
    """48 layers of the default random init keep activations O(1) (finite and not collapsed) in bf16."""
    config = ModelConfig.preset("tiny").replace(num_layers=48)
    model = build_model(config, device="cpu", dtype=torch.bfloat16, seed=0)
    x = random_inputs(config, GRID, dtype=torch.bfloat16)
    video, audio = run(model, x, build_rope_tables(config, GRID, device="cpu"))
    for out in (video.float(), audio.float()):
        assert torch.isfinite(out).all()
        assert 0.1 < out.std().item() < 10.0


def test_seeded_build_is_deterministic():
    config = ModelConfig.preset("tiny")
    a, b, c = (build_model(config, device="cpu", dtype=torch.float32, seed=s) for s in (3, 3, 4))
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if "norm" not in name:
            assert not torch.equal(pa, pc), name
    assert a.weights_version == 0


@pytest.mark.parametrize("kwargs, match", [
    ({"dtype": "bf16"}, r"dtype must be one of torch.bfloat16, torch.float16, torch.float32, torch.float64, "
                        r"got 'bf16'"),
    ({"dtype": torch.int32}, "dtype must be one of"),
    ({"dtype": torch.float8_e4m3fn}, "dtype must be one of"),  # floating point, but init cannot fill it
    ({"seed": -1}, r"seed must be an int in \[0, 2\*\*63\), got -1"),
    ({"seed": "a"}, "seed must be an int in .*got 'a'"),
    ({"seed": 2**70}, "seed must be an int in"),  # overflowed inside torch
    ({"config": "tiny"}, "config must be a ModelConfig .*got 'tiny'"),
])
def test_build_model_names_a_bad_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_model(**{"config": ModelConfig.preset("tiny"), "device": "meta", "dtype": torch.float32, **kwargs})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_build_model_on_cuda_without_a_gpu_says_so():
    with pytest.raises(ValueError, match=r"device 'cuda': no CUDA device is available"):
        build_model(ModelConfig.preset("tiny"), device="cuda", dtype=torch.float32)


def test_batch_matches_single_samples(tiny):
    """Batch 2 with batch-1 RoPE tables equals two batch-1 calls (per-sample sigma and AdaLN)."""
    rope = build_rope_tables(tiny.config, GRID, device="cpu")
    x = random_inputs(tiny.config, GRID, batch=2, seed=1)
    video, audio = run(tiny, x, rope)
    for i in range(2):
        xi = type(x)(*(t[i:i + 1] for t in (x.video, x.audio, x.video_context, x.audio_context, x.sigma)))
        vi, ai = run(tiny, xi, rope)
        torch.testing.assert_close(video[i:i + 1], vi, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(audio[i:i + 1], ai, rtol=1e-5, atol=1e-5)
    batched_rope = build_rope_tables(tiny.config, GRID, device="cpu", batch_size=2)
    torch.testing.assert_close(run(tiny, x, batched_rope)[0], video, rtol=0, atol=0)


def test_uniform_per_token_sigma_equals_per_sample(tiny):
    rope = build_rope_tables(tiny.config, GRID, device="cpu")
    x = random_inputs(tiny.config, GRID, batch=2, seed=2)
    per_token = x.sigma[:, None].expand(2, GRID.num_video_tokens).contiguous()
    ref = run(tiny, x, rope)
    out = run(tiny, type(x)(x.video, x.audio, x.video_context, x.audio_context, per_token), rope)
    torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1], ref[1], rtol=1e-5, atol=1e-5)


def test_isolated_video_ignores_audio(tiny):
    """With A2V and V2A disabled the video prediction does not depend on the audio latents (and vice versa)."""
    rope = build_rope_tables(tiny.config, GRID, device="cpu")
    x = random_inputs(tiny.config, GRID, seed=3)
    y = type(x)(x.video, torch.randn_like(x.audio), x.video_context, x.audio_context, x.sigma)
    z = type(x)(torch.randn_like(x.video), x.audio, x.video_context, x.audio_context, x.sigma)
    off = dict(disable_a2v_cross_attn=True, disable_v2a_cross_attn=True)
    assert torch.equal(run(tiny, x, rope, **off)[0], run(tiny, y, rope, **off)[0])
    assert torch.equal(run(tiny, x, rope, **off)[1], run(tiny, z, rope, **off)[1])
    assert not torch.equal(run(tiny, x, rope)[0], run(tiny, y, rope)[0])
    # one direction only: A2V off -> video ignores audio; audio still hears video through V2A
    assert torch.equal(run(tiny, x, rope, disable_a2v_cross_attn=True)[0],
                       run(tiny, y, rope, disable_a2v_cross_attn=True)[0])
    assert not torch.equal(run(tiny, x, rope, disable_a2v_cross_attn=True)[1],
                           run(tiny, z, rope, disable_a2v_cross_attn=True)[1])


def test_exchange_attention_is_the_two_cross_attentions(tiny):
    """`exchange_attention` regroups A2V and V2A by modality (video q/k normed together); on CPU (reference path)
    it is bitwise the two separate calls. Modules that cannot share the kernel are named."""
    from pipeline.attention import CrossAttention, exchange_attention

    block, rope = tiny.blocks[0], build_rope_tables(tiny.config, GRID, device="cpu")
    torch.manual_seed(5)
    v = torch.randn(1, GRID.num_video_tokens, tiny.config.video_dim)
    a = torch.randn(1, GRID.audio_tokens, tiny.config.audio_dim)
    v2, a2 = v + 1, a - 1  # each direction reads its own modulation of the same snapshot
    with torch.no_grad():
        got = exchange_attention(block.a2v, block.v2a, v, a, a2, v2, rope.video_cross, rope.audio_cross)
        want = (block.a2v(v, a, rope.video_cross, rope.audio_cross), block.v2a(a2, v2, rope.audio_cross,
                                                                               rope.video_cross))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    other = CrossAttention(tiny.config.audio_dim, tiny.config.video_dim, 1, 8, block.v2a.eps)
    with pytest.raises(ValueError, match="share inner width and eps"):
        exchange_attention(block.a2v, other, v, a, a2, v2, rope.video_cross, rope.audio_cross)


def test_exchange_directions_are_independent(tiny):
    """Both directions read the same pre-update snapshot, so one direction alone is bitwise that direction's part
    of both together (on CPU `exchange_attention` is bitwise the two calls) and the other stream passes through:
    each branch of `exchange_and_video_ffn` modulates only the inputs of the directions that run."""
    from pipeline.model import AUDIO_TEXT_GATE, TEXT_GATE, PendingResidual

    block, rope = tiny.blocks[1], build_rope_tables(tiny.config, GRID, device="cpu")
    x = random_inputs(tiny.config, GRID, seed=13)
    gen = torch.Generator().manual_seed(13)
    v, v_text = (torch.randn(1, GRID.num_video_tokens, tiny.config.video_dim, generator=gen) for _ in range(2))
    a, a_text = (torch.randn(1, GRID.audio_tokens, tiny.config.audio_dim, generator=gen) for _ in range(2))
    with torch.no_grad():
        mod = tiny.modulation(x.sigma)[0]
        v_in = PendingResidual(v, v_text, *block.video_gate(mod, TEXT_GATE))
        a_in = PendingResidual(a, a_text, *block.audio_gate(mod, AUDIO_TEXT_GATE))
        out = {(a2v, v2a): block.exchange_and_video_ffn(v_in, a_in, mod, rope, a2v, v2a)
               for a2v in (True, False) for v2a in (True, False)}
        audio = {k: o[1].add() for k, o in out.items()}
    both, a2v_only, v2a_only, neither = out[True, True], out[True, False], out[False, True], out[False, False]
    assert torch.equal(a2v_only[0].x, both[0].x) and torch.equal(a2v_only[0].delta, both[0].delta)
    assert a2v_only[1] is a_in and neither[1] is a_in  # no V2A: the audio hand-over goes on as it came
    assert torch.equal(audio[False, True], audio[True, True]) and not torch.equal(audio[False, True], a_in.add())
    assert torch.equal(v2a_only[0].x, neither[0].x) and torch.equal(v2a_only[0].delta, neither[0].delta)
    assert not torch.equal(both[0].x, neither[0].x)


def test_hand_overs_share_one_layout_per_chain_and_block_0_adds_zero(tiny):
    """`PendingResidual`: every audio hand-over's gate halves have one shape and stride (the audio FFN region
    compiles once whether the V2A or the text residual reaches it), the table row is detached without autograd
    (torch's module tracker refuses a no_grad view of a parameter in a module's inputs), and block 0's hand-over
    adds exactly zero, whatever the gate."""
    from pipeline.model import AUDIO_FFN_GATE, AUDIO_TEXT_GATE, AUDIO_V2A_GATE, FFN_GATE, TEXT_GATE, nothing_pending

    x = random_inputs(tiny.config, GRID, seed=21)
    block = tiny.blocks[1]
    with torch.no_grad():
        mod = tiny.modulation(x.sigma)[0]
        for gates in ([block.audio_gate(mod, row) for row in (AUDIO_TEXT_GATE, AUDIO_FFN_GATE, AUDIO_V2A_GATE)],
                      [block.video_gate(mod, row) for row in (TEXT_GATE, FFN_GATE)]):
            assert len({(t.shape, t.stride(), m.shape, m.stride()) for t, m in gates}) == 1
            assert not any(t.requires_grad for t, _ in gates)
        assert torch.equal(block.audio_gate(mod, AUDIO_V2A_GATE)[0], block.audio_av_table[4])
        assert torch.equal(mod.audio_gates[:, :, AUDIO_FFN_GATE], mod.audio[:, :, FFN_GATE])
        v = torch.randn(1, 5, tiny.config.video_dim)
        huge = torch.full((1, 1, tiny.config.video_dim), 1e30)
        assert torch.equal(nothing_pending(v, huge[0, 0], huge).add(), v)
    gate_row = block.video_gate(mod, FFN_GATE)[0]
    assert gate_row.requires_grad and gate_row.grad_fn is not None  # with autograd: a view that gradients reach


def test_skip_lists_are_independent(tiny):
    rope = build_rope_tables(tiny.config, GRID, device="cpu")
    x = random_inputs(tiny.config, GRID, seed=4)
    cond = run(tiny, x, rope)
    video_only = run(tiny, x, rope, skip_video_self_attn_blocks=(1,))
    audio_only = run(tiny, x, rope, skip_audio_self_attn_blocks=(1,))
    both = run(tiny, x, rope, skip_video_self_attn_blocks=(1,), skip_audio_self_attn_blocks=(1,))
    outs = [cond, video_only, audio_only, both]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.equal(outs[i][0], outs[j][0]) or not torch.equal(outs[i][1], outs[j][1])


def test_attention_backend(tiny):
    assert tiny.attention_backend == "auto"
    rope = build_rope_tables(tiny.config, GRID, device="cpu")
    x = random_inputs(tiny.config, GRID, seed=5)
    ref = run(tiny, x, rope)
    try:
        tiny.attention_backend = "math"
        assert hash(tiny.attention_backend) == hash("math")
        torch.testing.assert_close(run(tiny, x, rope)[0], ref[0], rtol=1e-5, atol=1e-5)
    finally:
        tiny.attention_backend = "auto"
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        tiny.attention_backend = "fast"


@pytest.mark.parametrize("backend", ["cudnn", "efficient"])
def test_a_backend_that_cannot_run_here_is_named(tiny, backend):
    """CPU SDPA has neither: the forward failed in block 0 with "No viable backend", naming no setting."""
    rope = build_rope_tables(tiny.config, GRID, device="cpu")
    try:
        tiny.attention_backend = backend
        with pytest.raises(ValueError, match=rf"model.attention_backend '{backend}' cannot run on cpu with "
                                             r"torch.float32; expected one of \['auto', 'flash', 'math'\]"):
            run(tiny, random_inputs(tiny.config, GRID), rope)
    finally:
        tiny.attention_backend = "auto"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_backend_table_matches_what_sdpa_runs(device):
    """`BACKEND_DTYPES` against SDPA itself on this machine, for every backend and dtype (the model's shapes:
    head dims 64 and 128)."""
    from torch.nn.attention import sdpa_kernel

    from pipeline.model import ATTENTION_BACKENDS, attention_backend_runs

    for head_dim in (64, 128):
        q = torch.randn(1, 2, 8, head_dim, device=device)
        for name, backend in ATTENTION_BACKENDS.items():
            for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
                try:
                    with contextlib.nullcontext() if backend is None else sdpa_kernel([backend]):
                        torch.nn.functional.scaled_dot_product_attention(*(q.to(dtype),) * 3)
                    runs = True
                except RuntimeError:
                    runs = False
                assert attention_backend_runs(name, torch.device(device), dtype) == runs, (name, dtype, head_dim)


def test_overlap_audio_setting(tiny):
    """On by default, part of the graph key, validated; on CPU there is one stream, so it changes nothing."""
    assert tiny.overlap_audio is True and tiny.graph_key_extra == (("overlap_audio", True),)
    rope = build_rope_tables(tiny.config, GRID, device="cpu")
    x = random_inputs(tiny.config, GRID, seed=5)
    ref = run(tiny, x, rope)
    try:
        tiny.overlap_audio = False
        assert tiny.graph_key_extra == (("overlap_audio", False),)
        for a, b in zip(run(tiny, x, rope), ref):
            assert torch.equal(a, b)
    finally:
        tiny.overlap_audio = True
    with pytest.raises(ValueError, match="overlap_audio must be a bool, got 1"):
        tiny.overlap_audio = 1


# ---- capture readiness (CPU) ------------------------------------------------------------------------------------

class _OpRecorder(TorchDispatchMode):
    """Records the aten ops that force a host sync on a GPU or build tensors from host data."""

    FORBIDDEN = ("_local_scalar_dense", "item", "nonzero", "masked_select", "unique", "lift_fresh", "is_nonzero",
                 "equal")

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in self.FORBIDDEN or (name in ("_to_copy", "to") and kwargs and
                                      str(kwargs.get("device", "")) == "cpu"):
            self.found.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("options", [{}, dict(skip_video_self_attn_blocks=(0,), skip_audio_self_attn_blocks=(1,)),
                                     dict(skip_video_self_attn_blocks=range(2), skip_audio_self_attn_blocks=[1]),
                                     dict(disable_a2v_cross_attn=True, disable_v2a_cross_attn=True)])
def test_forward_has_no_host_sync_ops(tiny, options):
    rope = build_rope_tables(tiny.config, GRID, device="cpu")
    x = random_inputs(tiny.config, GRID, batch=2, seed=6)
    recorder = _OpRecorder()
    with torch.no_grad(), recorder:
        tiny(x.video, x.audio, x.video_context, x.audio_context, x.sigma, rope, **options)
    assert recorder.found == []


def test_op_recorder_positive_control():
    recorder = _OpRecorder()
    with recorder:
        torch.ones(2)[0].item()
        torch.tensor([1.0, 2.0])
        torch.ones(3).nonzero()
    assert len(recorder.found) == 3, recorder.found


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=True), "batch_size must be a positive int, got True"),  # expand() failed inside torch
    (dict(batch_size=0), "batch_size must be a positive int, got 0"),
    (dict(grid=(3, 4, 4, 18)), r"grid must be a LatentGrid .*got \(3, 4, 4, 18\)"),
    (dict(config=None), "config must be a ModelConfig, got NoneType"),
])
def test_build_rope_tables_names_a_bad_argument(kwargs, match):
    args = dict(config=ModelConfig.preset("tiny"), grid=GRID, device="cpu") | kwargs
    with pytest.raises(ValueError, match=match):
        build_rope_tables(**args)


def test_forward_builds_no_rope_tables(tiny, monkeypatch):
    rope = build_rope_tables(tiny.config, GRID, device="cpu")
    x = random_inputs(tiny.config, GRID, seed=7)

    def forbidden(*args, **kwargs):
        raise AssertionError("RoPE tables must be built outside forward")

    for name in ("build_rope_tables", "split_rope_table", "video_coords", "audio_coords"):
        monkeypatch.setattr(pipeline.rope, name, forbidden)
    run(tiny, x, rope)


def _block_text_kv(model, block, stream, context, t_sample):
    """One block's text keys/values written out block by block: the context modulated by the block's prompt table
    plus the prompt AdaLN, projected, keys RMS-normed (what `pipeline.text_kv` batches over the blocks)."""
    adaln = getattr(model, f"{stream}_prompt")
    freqs = torch.exp(torch.arange(128, dtype=torch.float32) * (-math.log(10000.0) / 128))
    angles = t_sample.float().unsqueeze(-1) * freqs
    prompt = adaln(torch.cat([angles.cos(), angles.sin()], dim=-1))[0]  # [B, 1, 2, C]
    shift, scale = (getattr(block, f"{stream}_prompt_table") + prompt).unbind(2)
    attention = getattr(block, f"{stream}_text")
    k, v = attention.kv(context * (1 + scale) + shift).chunk(2, dim=-1)
    return torch.nn.functional.rms_norm(k, (k.shape[-1],), attention.k_norm, attention.eps), v


def test_text_kv_is_the_block_by_block_formula():
    """`text_kv` batches the blocks (one modulation, one key norm per stream): each block's keys/values are its own
    formula's (each with its own key-norm weight), for per-sample and per-token sigma (whose per-sample max feeds the
    prompt AdaLN), with audio and video texts of different lengths."""
    model = build_model(ModelConfig.preset("tiny"), device="cpu", dtype=torch.float32, seed=3)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for block in model.blocks:  # init_weights sets every norm weight to 1: make the blocks' differ
            for attention in (block.video_text, block.audio_text):
                attention.k_norm.copy_(1 + 0.5 * torch.randn(attention.k_norm.shape, generator=gen))
    x = random_inputs(model.config, GRID, batch=2, seed=8)
    audio_context = x.audio_context[:, :5]
    per_token = x.sigma[:, None].expand(2, GRID.num_video_tokens).contiguous() * torch.linspace(0.5, 1, 18)
    for sigma in (x.sigma, per_token):
        t_sample = model._timesteps(sigma)[1]
        with torch.no_grad():
            text_kv = model.text_kv(x.video_context, audio_context, sigma)
            assert len(text_kv) == model.config.num_layers
            for block, kv in zip(model.blocks, text_kv):
                for stream, context in (("video", x.video_context), ("audio", audio_context)):
                    k, v = _block_text_kv(model, block, stream, context, t_sample)
                    torch.testing.assert_close(getattr(kv, f"{stream}_k"), k, rtol=1e-5, atol=1e-5)
                    torch.testing.assert_close(getattr(kv, f"{stream}_v"), v, rtol=1e-5, atol=1e-5)


def test_shared_text_kv_changes_no_bit(tiny):
    """forward(text_kv=model.text_kv(...)) is the computation forward runs on its own, for every pass kind and for
    per-token sigma; the held keys/values keep one buffer per stream alive (all blocks), no raw keys."""
    rope = build_rope_tables(tiny.config, GRID, device="cpu")
    x = random_inputs(tiny.config, GRID, batch=2, seed=8)
    per_token = x.sigma[:, None].expand(2, GRID.num_video_tokens).contiguous() * torch.linspace(0.5, 1, 18)
    for sigma in (x.sigma, per_token):
        y = type(x)(x.video, x.audio, x.video_context, x.audio_context, sigma)
        with torch.no_grad():
            text_kv = tiny.text_kv(x.video_context, x.audio_context, sigma)
        for stream in ("video", "audio"):
            keys = [getattr(kv, f"{stream}_k") for kv in text_kv]
            values = [getattr(kv, f"{stream}_v") for kv in text_kv]
            storage = keys[0].untyped_storage()
            assert all(t.untyped_storage().data_ptr() == storage.data_ptr() for t in keys + values)
            assert storage.nbytes() == sum(t.numel() for t in keys + values) * keys[0].element_size()
        for options in ({}, dict(skip_video_self_attn_blocks=(1,), skip_audio_self_attn_blocks=(0,)),
                        dict(disable_a2v_cross_attn=True, disable_v2a_cross_attn=True)):
            own, shared = run(tiny, y, rope, **options), run(tiny, y, rope, text_kv=text_kv, **options)
            assert torch.equal(own[0], shared[0]) and torch.equal(own[1], shared[1])
    # keys/values of another sigma are another computation: the prompt AdaLN reads sigma
    with torch.no_grad():
        other = tiny.text_kv(x.video_context, x.audio_context, x.sigma * 0.5)
    assert not torch.equal(run(tiny, x, rope)[0], run(tiny, x, rope, text_kv=other)[0])


def test_forward_with_text_kv_skips_the_prompt_adalns(tiny):
    """The prompt AdaLNs only feed the text keys/values: a forward reading `text_kv` does not run them (fewer
    kernels per reading pass), one without runs each once, and the results are bitwise equal."""
    rope = build_rope_tables(tiny.config, GRID, device="cpu")
    x = random_inputs(tiny.config, GRID, batch=2, seed=14)
    calls = []
    hooks = [module.register_forward_hook(lambda *_, name=name: calls.append(name))
             for name, module in (("video_prompt", tiny.video_prompt), ("audio_prompt", tiny.audio_prompt))]
    try:
        with torch.no_grad():
            text_kv = tiny.text_kv(x.video_context, x.audio_context, x.sigma)
        assert calls == ["video_prompt", "audio_prompt"]  # once in all, shared by every block
        calls.clear()
        shared = run(tiny, x, rope, text_kv=text_kv)
        assert calls == []
        own = run(tiny, x, rope)
        assert calls == ["video_prompt", "audio_prompt"]
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.equal(own[0], shared[0]) and torch.equal(own[1], shared[1])


def test_adalns_fed_one_timestep_share_its_sinusoids(tiny):
    """`modulation` builds the sinusoids once per distinct timestep (1 with per-sample sigma, which the A2V/V2A
    gates see too at LTX-2.3's gate scale 1.0; 2 with per-token sigma; one more for a gate scale of its own)
    instead of once per AdaLN (6; the prompt AdaLNs run in `text_kv`), and every row is bitwise what each AdaLN
    makes from its own timestep."""
    class CountCos(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.cos = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.cos += func is torch.ops.aten.cos.default
            return func(*args, **(kwargs or {}))

    x = random_inputs(tiny.config, GRID, batch=2, seed=16)
    per_token = torch.rand(2, GRID.num_video_tokens, generator=torch.Generator().manual_seed(0))
    scaled = copy.deepcopy(tiny)
    scaled.config = tiny.config.replace(cross_attn_gate_scale=0.5)
    for model, sigma, distinct in ((tiny, x.sigma, 1), (tiny, per_token, 2), (scaled, x.sigma, 2)):
        with torch.no_grad(), CountCos() as counter:
            mod, video_emb, audio_emb = model.modulation(sigma)
        assert counter.cos == distinct
        t_video, t_sample = tiny._timesteps(sigma)
        t_gate = t_sample * model.config.cross_attn_gate_scale

        def own(adaln, t):  # each AdaLN from its own timestep, the formula written out as before the sharing
            freqs = torch.exp(torch.arange(128, dtype=torch.float32) * (-math.log(10000.0) / 128))
            angles = t.float().unsqueeze(-1) * freqs
            return adaln(torch.cat([angles.cos(), angles.sin()], dim=-1).to(tiny.dtype))[0]

        with torch.no_grad():
            expected = {"video": own(tiny.video_time, t_video), "audio": own(tiny.audio_time, t_sample),
                        "video_av": own(tiny.video_av, t_sample), "audio_av": own(tiny.audio_av, t_sample),
                        "video_av_gate": own(tiny.video_av_gate, t_gate)}
            audio, v2a_gate = expected["audio"], own(tiny.audio_av_gate, t_gate)[:, :, 0]
            expected["audio_gates"] = torch.stack([audio[:, :, 8], audio[:, :, 5], v2a_gate], dim=2)  # text, FFN, V2A
        for field, value in expected.items():
            assert torch.equal(getattr(mod, field), value), field


def _bad_text_kv_inputs(config):
    x = random_inputs(config, GRID, batch=2, seed=15)
    args = dict(video_context=x.video_context, audio_context=x.audio_context, sigma=x.sigma)
    per_token = x.sigma[:1, None].expand(1, GRID.num_video_tokens)
    return args, {
        r"video_context has shape \[2, 8, 5\], expected \[\*, \*, 32\]": dict(video_context=x.video_context[..., :5]),
        r"video_context is on meta": dict(video_context=x.video_context.to("meta")),
        r"audio_context has shape \[1, 8, 16\], expected \[2, \*, 16\]": dict(audio_context=x.audio_context[:1]),
        r"audio_context has dtype torch.bfloat16, expected torch.float32":
            dict(audio_context=x.audio_context.to(torch.bfloat16)),
        r"sigma has shape \[1\], expected \[2\] \(per sample\) or \[2, Nv\] \(per video token\)":
            dict(sigma=x.sigma[:1]),
        r"sigma has shape \[1, 18\], expected \[2\] \(per sample\) or \[2, Nv\]": dict(sigma=per_token),
        r"sigma has shape \[2, 1, 1\], expected \[2\] \(per sample\) or \[2, Nv\]":
            dict(sigma=x.sigma[:, None, None]),
        r"sigma has dtype torch.float64, expected torch.float32": dict(sigma=x.sigma.double()),
        r"sigma must be a torch.Tensor, got float": dict(sigma=0.5),
    }


@pytest.mark.parametrize("case", list(_bad_text_kv_inputs(ModelConfig.preset("tiny"))[1]))
def test_text_kv_validates_contexts_and_sigma_as_forward_does(tiny, case):
    """Checked before any work (the prompt AdaLNs do not run), from metadata only; sigma's batch is the contexts'."""
    args, cases = _bad_text_kv_inputs(tiny.config)
    args.update(cases[case])
    calls = []
    hook = tiny.video_prompt.register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad(), pytest.raises(ValueError, match=case):
            tiny.text_kv(**args)
    finally:
        hook.remove()
    assert calls == []


def test_text_kv_checks_read_no_device_value(tiny):
    x = random_inputs(tiny.config, GRID, batch=2, seed=16)
    per_token = x.sigma[:, None].expand(2, GRID.num_video_tokens).contiguous()
    for sigma in (x.sigma, per_token):
        recorder = _OpRecorder()
        with torch.no_grad(), recorder:
            tiny.text_kv(x.video_context, x.audio_context, sigma)
        assert recorder.found == []


def test_forward_takes_block_indices_as_any_iterable(tiny):
    """One rule (`pipeline.config.block_indices`) for forward, PassSpec and GuidanceConfig: any non-string
    iterable of ints; a one-shot generator is read once."""
    rope = build_rope_tables(tiny.config, GRID, device="cpu")
    x = random_inputs(tiny.config, GRID, seed=17)
    want = run(tiny, x, rope, skip_video_self_attn_blocks=(0, 1), skip_audio_self_attn_blocks=(1,))
    for video, audio in (([1, 0], [1]), (range(2), {1}), (frozenset({0, 1}), iter([1])),
                         ((b for b in (1, 0)), range(1, 2))):
        got = run(tiny, x, rope, skip_video_self_attn_blocks=video, skip_audio_self_attn_blocks=audio)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (video, audio)
    with pytest.raises(ValueError, match=r"skip_audio_self_attn_blocks contains 2; expected block indices in \[0, 1\]"):
        run(tiny, x, rope, skip_audio_self_attn_blocks=range(3))
    with pytest.raises(ValueError, match="skip_video_self_attn_blocks must be a non-string iterable"):
        run(tiny, x, rope, skip_video_self_attn_blocks="01")
    with pytest.raises(ValueError, match="skip_video_self_attn_blocks has duplicates"):
        run(tiny, x, rope, skip_video_self_attn_blocks=[1, 1])


def test_text_kv_under_autograd_is_out_of_place_and_the_same(tiny):
    """When autograd records, the blocks run one by one out of place (no `out=` GEMMs, no in-place norm): same
    values, and gradients reach the weights."""
    x = random_inputs(tiny.config, GRID, seed=10)
    with torch.no_grad():
        want = tiny.text_kv(x.video_context, x.audio_context, x.sigma)
    got = tiny.text_kv(x.video_context, x.audio_context, x.sigma)
    for w, g in zip(want, got):
        for field in w._fields:
            torch.testing.assert_close(getattr(g, field), getattr(w, field), rtol=1e-6, atol=1e-6)
    sum(kv.video_k.sum() + kv.audio_v.sum() for kv in got).backward()
    block = tiny.blocks[1]
    assert block.video_text.k_norm.grad is not None and block.audio_text.kv.weight.grad is not None
    tiny.zero_grad(set_to_none=True)


@pytest.mark.parametrize("trainable", ["kv.weight", "k_norm"])
def test_text_kv_records_when_only_a_later_block_is_trainable(trainable):
    """Partial fine-tuning (block 0 frozen, block 1's text projection or key norm trainable) takes the recorded
    path too: the values are the inference path's and the gradient reaches that weight."""
    model = build_model(ModelConfig.preset("tiny"), device="cpu", dtype=torch.float32, seed=5)
    model.requires_grad_(False)
    x = random_inputs(model.config, GRID, seed=12)
    with torch.no_grad():
        want = model.text_kv(x.video_context, x.audio_context, x.sigma)
    weight = model.blocks[1].video_text.get_parameter(trainable)
    weight.requires_grad_(True)
    got = model.text_kv(x.video_context, x.audio_context, x.sigma)
    for w, g in zip(want, got):
        for field in w._fields:
            torch.testing.assert_close(getattr(g, field), getattr(w, field), rtol=1e-6, atol=1e-6)
    got[1].video_k.sum().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


def test_text_keys_and_values_are_views_of_one_buffer(tiny):
    """Held text keys/values keep nothing else alive: the normed keys overwrite the raw ones in the projection,
    each block's [k | v] a slice of one buffer per stream."""
    x = random_inputs(tiny.config, GRID, seed=11)
    with torch.no_grad():
        kv = tiny.text_kv(x.video_context, x.audio_context, x.sigma)[0]
        raw = tiny.blocks[0].video_text.kv(x.video_context)
    inner = kv.video_k.shape[-1]
    assert kv.video_v.data_ptr() == kv.video_k.data_ptr() + inner * kv.video_k.element_size()
    assert kv.audio_v.data_ptr() == kv.audio_k.data_ptr() + kv.audio_k.shape[-1] * kv.audio_k.element_size()
    blocks = tiny.config.num_layers
    assert kv.video_k.untyped_storage().nbytes() == blocks * raw.numel() * raw.element_size()


@pytest.mark.parametrize("case", ["entries", "BlockTextKV", "video_k", "audio_v"])
def test_invalid_text_kv_raises_naming_the_field(tiny, case):
    rope = build_rope_tables(tiny.config, GRID, device="cpu")
    x = random_inputs(tiny.config, GRID, seed=9)
    with torch.no_grad():
        text_kv = list(tiny.text_kv(x.video_context, x.audio_context, x.sigma))
    if case == "entries":
        text_kv = text_kv[:1]
    elif case == "BlockTextKV":
        text_kv[1] = tuple(text_kv[1])
    elif case == "video_k":
        text_kv[0] = text_kv[0]._replace(video_k=text_kv[0].video_k[:, :3])
    else:
        text_kv[1] = text_kv[1]._replace(audio_v=text_kv[1].audio_v.double())
    with pytest.raises(ValueError, match=case):
        run(tiny, x, rope, text_kv=text_kv)


# ---- validation -------------------------------------------------------------------------------------------------

def _bad_inputs(config):
    x = random_inputs(config, GRID, batch=2)
    rope = build_rope_tables(config, GRID, device="cpu")
    other_rope = build_rope_tables(config, LatentGrid(frames=2, height=2, width=3, audio_tokens=7), device="cpu")
    args = dict(video=x.video, audio=x.audio, video_context=x.video_context, audio_context=x.audio_context,
                sigma=x.sigma, rope=rope)
    meta = torch.empty_like(x.video, device="meta")
    return args, {
        "skip_video_self_attn_blocks": dict(skip_video_self_attn_blocks=(2,)),  # tiny has blocks 0, 1
        "skip_audio_self_attn_blocks": dict(skip_audio_self_attn_blocks=(-1,)),
        "skip_video_self_attn_blocks ": dict(skip_video_self_attn_blocks=(True,)),
        "skip_audio_self_attn_blocks ": dict(skip_audio_self_attn_blocks=1),
        "disable_a2v_cross_attn": dict(disable_a2v_cross_attn=1),
        "disable_v2a_cross_attn": dict(disable_v2a_cross_attn=None),
        "video": dict(video=x.video.double()),
        "video ": dict(video=meta),
        "video  ": dict(video=x.video[..., :64]),
        "audio": dict(audio=x.audio[:1]),
        "video_context": dict(video_context=x.video_context[..., :5]),
        "audio_context": dict(audio_context=x.audio_context.to(torch.bfloat16)),
        "sigma": dict(sigma=x.sigma.to(torch.bfloat16)),
        "sigma ": dict(sigma=x.sigma[:1]),
        "sigma  ": dict(sigma=x.sigma[:, None, None]),
        "sigma   ": dict(sigma=0.5),
        "video has 18 tokens but the RoPE tables were built for 12": dict(rope=other_rope),  # latents named first
        "rope": dict(rope=(rope.video,)),
        "rope was built for batch size 3, but the latents have batch 2": dict(
            rope=build_rope_tables(config, GRID, device="cpu", batch_size=3)),
        "video_context has shape .*no text tokens": dict(video_context=x.video_context[:, :0]),
    }


@pytest.mark.parametrize("case", list(_bad_inputs(ModelConfig.preset("tiny"))[1]))
def test_invalid_inputs_raise_value_error_naming_the_argument(tiny, case):
    args, cases = _bad_inputs(tiny.config)
    bad = cases[case]
    kwargs = {k: v for k, v in bad.items() if k.startswith(("skip", "disable"))}
    args.update({k: v for k, v in bad.items() if k not in kwargs})
    with pytest.raises(ValueError, match=case.strip()):
        tiny(**args, **kwargs)


# ---- GPU --------------------------------------------------------------------------------------------------------

@pytest.mark.cuda
def test_forward_under_cuda_sync_debug_error_mode():
    config = ModelConfig.preset("tiny")
    model = build_model(config, device="cuda", dtype=torch.bfloat16)
    x = random_inputs(config, GRID, batch=2, dtype=torch.bfloat16, device="cuda")
    rope = build_rope_tables(config, GRID, device="cuda")
    per_token = x.sigma[:, None].expand(2, GRID.num_video_tokens).contiguous()
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            for options in ({}, dict(skip_video_self_attn_blocks=(1,), skip_audio_self_attn_blocks=(1,)),
                            dict(disable_a2v_cross_attn=True, disable_v2a_cross_attn=True)):
                model(x.video, x.audio, x.video_context, x.audio_context, x.sigma, rope, **options)
            model(x.video, x.audio, x.video_context, x.audio_context, per_token, rope)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cudnn", "flash", "efficient"])
def test_attention_backends_agree_on_gpu(backend):
    """Each SDPA backend gives the math backend's answer (bf16 tolerance) at real head sizes (small preset)."""
    config = ModelConfig.preset("small").replace(num_layers=1)
    grid = LatentGrid.from_tokens(1536)
    model = build_model(config, device="cuda", dtype=torch.bfloat16)
    x = random_inputs(config, grid, text_tokens=128, dtype=torch.bfloat16, device="cuda")
    rope = build_rope_tables(config, grid, device="cuda")
    model.attention_backend = "math"
    ref = run(model, x, rope)
    model.attention_backend = backend
    try:
        out = run(model, x, rope)
    except RuntimeError as e:  # a backend without a kernel for these shapes on this card/build: say so
        pytest.skip(f"{backend} backend unavailable here: {str(e)[:300]}")
    for a, b in zip(out, ref):
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 2e-2


@pytest.mark.cuda
def test_batch_matches_single_samples_on_gpu():
    """Batch 2 with batch-1 RoPE tables (the graph executor's static tables are plain [1, N, H, r] copies) equals
    two batch-1 calls within bf16 noise: the Triton q/k kernel serves every sample from the batch-1 table."""
    config = ModelConfig.preset("small")
    grid = LatentGrid.from_tokens(1536)
    model = build_model(config, device="cuda", dtype=torch.bfloat16)
    x = random_inputs(config, grid, batch=2, text_tokens=128, dtype=torch.bfloat16, device="cuda", seed=1)
    rope = build_rope_tables(config, grid, device="cuda")  # batch 1: stride(0) = N * H * r, not 0
    assert rope.video[0].shape[0] == 1 and rope.video[0].stride(0) > 0
    out = run(model, x, rope)
    for i in range(2):
        xi = type(x)(*(t[i:i + 1] for t in (x.video, x.audio, x.video_context, x.audio_context, x.sigma)))
        for a, b in zip(out, run(model, xi, rope)):
            assert ((a[i:i + 1].float() - b.float()).norm() / b.float().norm()).item() < 2e-2, i


@pytest.mark.cuda
def test_audio_side_stream_changes_no_bit():
    """The audio chain on a side stream gives bitwise the single-stream result (same kernels, same order per
    chain), for every pass shape: exchange on, STG skips, exchange off, one direction of it off."""
    config = ModelConfig.preset("small")
    grid = LatentGrid.from_tokens(1536)
    model = build_model(config, device="cuda", dtype=torch.bfloat16)
    x = random_inputs(config, grid, text_tokens=128, dtype=torch.bfloat16, device="cuda")
    rope = build_rope_tables(config, grid, device="cuda")
    for options in ({}, dict(skip_video_self_attn_blocks=(1,), skip_audio_self_attn_blocks=(1,)),
                    dict(disable_a2v_cross_attn=True, disable_v2a_cross_attn=True),
                    dict(disable_a2v_cross_attn=True), dict(disable_v2a_cross_attn=True)):
        model.overlap_audio = False
        ref = run(model, x, rope, **options)
        model.overlap_audio = True
        out = run(model, x, rope, **options)
        for a, b in zip(out, ref):
            assert torch.equal(a, b), options
    assert len(model._side_streams) == 1


@pytest.mark.cuda
def test_ltx23_bf16_builds_fast_and_matches_diffusers():
    """The 19B preset builds on the GPU in seconds; one forward at 1536 video tokens (+126 audio, 1024 text)
    matches diffusers' model loaded with the same weights within bf16 tolerance.

    Memory: ours (38 GB) runs first; its output is kept on the CPU, its weights moved to the CPU under diffusers
    names, and it is freed before diffusers' copy is loaded.
    """
    from diffusers import LTX2VideoTransformer3DModel

    from pipeline.weights import diffusers_config, diffusers_state_dict
    from tests.pipeline.reference import reference_forward

    config = ModelConfig.preset("ltx2.3")
    grid = LatentGrid.from_tokens(1536)
    assert grid.audio_tokens == 126
    torch.cuda.init()
    torch.cuda.synchronize()
    start = time.perf_counter()
    model = build_model(config, device="cuda", dtype=torch.bfloat16, seed=0)
    torch.cuda.synchronize()
    build_s = time.perf_counter() - start
    print(f"ltx2.3 bf16 build: {build_s:.2f} s")
    assert build_s < 30.0

    x = random_inputs(config, grid, text_tokens=1024, dtype=torch.bfloat16, device="cuda", sigma=(0.7,))
    rope = build_rope_tables(config, grid, device="cuda")
    video, audio = run(model, x, rope)
    video, audio = video.float().cpu(), audio.float().cpu()
    assert torch.isfinite(video).all() and torch.isfinite(audio).all()

    state = diffusers_state_dict(model, device="cpu")
    del model
    gc.collect()
    torch.cuda.empty_cache()
    with torch.device("meta"):
        ref = LTX2VideoTransformer3DModel(**diffusers_config(config))
    ref.load_state_dict(state, strict=True, assign=True)
    del state
    ref = ref.to("cuda").eval()
    ref_video, ref_audio = reference_forward(ref, grid, x)
    ref_video, ref_audio = ref_video.float().cpu(), ref_audio.float().cpu()
    del ref
    gc.collect()
    torch.cuda.empty_cache()
    for name, out, expected in (("video", video, ref_video), ("audio", audio, ref_audio)):
        norm_rel = ((out - expected).norm() / expected.norm()).item()
        print(f"{name}: norm-relative error {norm_rel:.3e}, max-relative {relative_error(out, expected):.3e}")
        assert norm_rel < 5e-2, f"{name}: norm-relative error {norm_rel:.3e}"

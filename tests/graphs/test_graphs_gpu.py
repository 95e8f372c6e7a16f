"""Per-pass CUDA graphs on a GPU, with the `small` preset (full widths, 4 blocks) in bf16.

- the full stage-1 + stage-2 loop with graphs equals the eager loop bitwise (same kernels, same inputs);
- with torch.compile the loop stays within bf16 tolerance of eager (no farther from eager bf16 than eager
  bf16 is from the same weights in fp32);
- a pass's held output survives the replays of the other passes;
- passes sharing their text keys/values (cond holds them, perturbed and modality read them) equal passes that
  compute their own, bitwise, at every sigma; so do new consumers captured beside cached producers, and
  audio texts shorter than the video texts;
- a changed skip block, shape or weights is a miss, never a stale replay;
- the warmed-up loop makes no host sync (PyTorch's sync debug mode, the dispatch detector, CUPTI);
- every pass graph shares one pool, whose size is reported;
- a pass that syncs fails its capture with the cause, and the pool is refused afterwards.
Expected time on one H100/H200: ~1 min without the compile test, ~2-4 min with it (two inductor compiles).
"""

from __future__ import annotations

import copy

import pytest
import torch

from graphs.errors import CaptureError, GraphMissError, GraphMissWarning
from graphs.executor import GraphExecutor
from pipeline.config import LatentGrid, ModelConfig
from pipeline.denoise import denoise_stage1, denoise_stage2
from pipeline.executor import Conditioning, EagerExecutor, TextContext
from pipeline.guidance import GuidanceConfig
from pipeline.model import build_model
from pipeline.passes import PassSpec, pass_specs_for
from profiling.syncs import cuda_sync_debug, detect_host_syncs
from tests.graphs.helpers import make_conditioning, make_latents

pytestmark = pytest.mark.cuda

GRID1 = LatentGrid(frames=2, height=4, width=6, audio_tokens=13)  # stage 1: 48 video tokens
GRID2 = LatentGrid(frames=2, height=8, width=12, audio_tokens=13)  # stage 2: 2x spatial, 192 video tokens
STEPS = 3  # stage 1: 5 evaluations x 3 passes; stage 2 (distilled): 7 evaluations x 1 pass
SEED = 7
HQ = pass_specs_for(GuidanceConfig.preset("hq"))  # cond, neg, modality
COND = PassSpec("cond")
TEXT_TOKENS = 16


@pytest.fixture(scope="module")
def small():
    model = build_model(ModelConfig.preset("small"), device="cuda", dtype=torch.bfloat16, seed=0)
    config = model.config
    cond1 = make_conditioning(config, GRID1, device="cuda", text_tokens=TEXT_TOKENS, seed=1)
    cond2 = make_conditioning(config, GRID2, device="cuda", text_tokens=TEXT_TOKENS, seed=1)
    video, audio = make_latents(config, GRID1, device="cuda", seed=2)  # fp32 loop state
    yield model, cond1, cond2, video, audio
    del model
    torch.cuda.empty_cache()


def upsample(video: torch.Tensor) -> torch.Tensor:
    """Stage-1 latents [B, f*h*w, C] on GRID1 -> [B, f*2h*2w, C] on GRID2 (nearest; views, no host sync)."""
    b, _, c = video.shape
    f, h, w = GRID1.frames, GRID1.height, GRID1.width
    x = video.reshape(b, f, h, 1, w, 1, c).expand(b, f, h, 2, w, 2, c)
    return x.reshape(b, f * 2 * h * 2 * w, c)


def run_loop(executor, cond1, cond2, video, audio):
    s1 = denoise_stage1(executor, cond1, video, audio, seed=SEED, steps=STEPS, guidance="hq", quiet=True)
    s2 = denoise_stage2(executor, cond2, upsample(s1.video), s1.audio, seed=SEED, quiet=True)
    return s1, s2


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def eager_pass(model, conditioning, video, audio, sigma, spec):
    executor = EagerExecutor(model)
    executor.set_conditioning(conditioning)
    with torch.no_grad():
        return executor.run(video, audio, sigma, (spec,))[spec.name]


@pytest.mark.filterwarnings("ignore::graphs.errors.GraphMissWarning")
def test_graph_loop_equals_eager_loop_bitwise(small):
    model, cond1, cond2, video, audio = small
    eager1, eager2 = run_loop(EagerExecutor(model), cond1, cond2, video, audio)
    executor = GraphExecutor(model)  # capture on first use, inside the loop
    graph1, graph2 = run_loop(executor, cond1, cond2, video, audio)
    for name, a, b in (("stage1 video", graph1.video, eager1.video), ("stage1 audio", graph1.audio, eager1.audio),
                       ("stage2 video", graph2.video, eager2.video), ("stage2 audio", graph2.audio, eager2.audio)):
        assert torch.equal(a, b), f"{name}: graphs differ from eager (max abs {(a - b).abs().max().item():.3e})"
    stats = executor.stats
    assert stats.captures == 4 and stats.graphs == 4  # cond/neg/modality at GRID1, cond at GRID2
    assert stats.replays == graph1.transformer_calls + graph2.transformer_calls
    assert stats.eager_passes == 0


def test_held_outputs_survive_the_other_replays(small):
    model, cond1, _, video, audio = small
    executor = GraphExecutor(model, miss_policy="strict")
    executor.warmup(HQ, video, audio, conditioning=cond1)
    out = executor.run(video, audio, 0.6, HQ)
    assert [k.pass_name for k in executor.keys()] == ["neg", "cond", "modality"]  # capture (= replay) order
    held = {name: (v.video.clone(), v.audio.clone()) for name, v in out.items()}
    executor.replay_only(HQ[2])  # modality, captured after neg and cond: it never writes their outputs
    for name in ("neg", "cond"):
        assert torch.equal(out[name].video, held[name][0]) and torch.equal(out[name].audio, held[name][1]), name
    expected = eager_pass(model, cond1, video, audio, 0.6, COND)
    assert torch.equal(out["cond"].video, expected.video) and torch.equal(out["cond"].audio, expected.audio)
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
                   for v in out.values() for t in (v.video, v.audio))
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:])), "held outputs overlap"


def test_shared_text_kv_equals_own_projections_bitwise(small):
    model, cond1, _, video, audio = small
    stg = PassSpec("perturbed", skip_video_self_attn_blocks=(1,), skip_audio_self_attn_blocks=(2,))
    specs = (*HQ, stg)
    shared, own = GraphExecutor(model, progress=None), GraphExecutor(model, share_text_kv=False, progress=None)
    for executor in (shared, own):
        executor.warmup(specs, video, audio, conditioning=cond1)
    assert {k.pass_name: str(k.text_kv_role) for k in shared.keys()} == {
        "cond": "produce", "neg": "own", "perturbed": "consume:cond", "modality": "consume:cond"}
    for sigma in (0.9, 0.3):  # the prompt AdaLN makes the keys/values sigma-dependent
        a, b = shared.run(video, audio, sigma, specs), own.run(video, audio, sigma, specs)
        for name in a:
            assert torch.equal(a[name].video, b[name].video) and torch.equal(a[name].audio, b[name].audio), name
    held = [t for kv in shared.pass_graph(COND).text_kv for t in kv]
    c = model.config
    expected = c.num_layers * 2 * TEXT_TOKENS * (c.video_heads * c.video_head_dim + c.audio_heads * c.audio_head_dim)
    assert sum(t.numel() for t in held) == expected


def _assert_equal_to_eager(out, model, conditioning, video, audio, sigma, specs):
    for spec in specs:
        expected = eager_pass(model, conditioning, video, audio, sigma, spec)
        got = out[spec.name]
        assert torch.equal(got.video, expected.video) and torch.equal(got.audio, expected.audio), spec.name


@pytest.mark.filterwarnings("ignore::graphs.errors.GraphMissWarning")
def test_shared_text_kv_with_cached_and_new_graphs_in_one_evaluation(small):
    """New consumers captured beside cached producers (and a new producer beside an own-K/V graph of the same
    pass) read the right keys/values; held keys/values survive the replay of another reader, and a pass captured
    before the producer (neg: its temporaries may be where they are) invalidates them."""
    model, cond1, _, video, audio = small
    stg = PassSpec("perturbed", skip_video_self_attn_blocks=(1,), skip_audio_self_attn_blocks=(2,))
    modality = HQ[2]
    executor = GraphExecutor(model, progress=None)
    executor.set_conditioning(cond1)
    executor.run(video, audio, 0.8, (COND,))  # cond alone: computes its own K/V
    out = executor.run(video, audio, 0.8, HQ)  # cond again, now producing; modality new
    _assert_equal_to_eager(out, model, cond1, video, audio, 0.8, HQ)
    out = executor.run(video, audio, 0.4, (*HQ, stg))  # a new consumer beside the cached producer
    _assert_equal_to_eager(out, model, cond1, video, audio, 0.4, (*HQ, stg))
    assert sorted(str(k.text_kv_role) for k in executor.keys()) == sorted(
        ["own", "produce", "own", "consume:cond", "consume:cond"])
    assert [k.pass_name for k in executor.keys()] == ["cond", "neg", "cond", "modality", "perturbed"]
    executor.replay_only(stg)  # another reader
    held = executor.replay_only(modality)
    expected = eager_pass(model, cond1, video, audio, 0.4, modality)
    assert torch.equal(held.video, expected.video) and torch.equal(held.audio, expected.audio)
    executor.replay_only(HQ[1])  # neg: its own K/V, captured before the producer
    with pytest.raises(GraphMissError, match="replay cond first"):
        executor.replay_only(modality)


def test_shared_text_kv_with_audio_and_video_texts_of_different_lengths(small):
    model, cond1, _, video, audio = small
    texts = {name: TextContext(t.video, t.audio[:, : TEXT_TOKENS // 2]) for name, t in cond1.texts.items()}
    conditioning = Conditioning(texts=texts, rope=cond1.rope)
    executor = GraphExecutor(model, progress=None)
    executor.set_conditioning(conditioning)
    out = executor.run(video, audio, 0.6, HQ)
    assert {k.pass_name: str(k.text_kv_role) for k in executor.keys()}["modality"] == "consume:cond"
    _assert_equal_to_eager(out, model, conditioning, video, audio, 0.6, HQ)


def test_changed_skip_block_or_shape_is_a_miss(small):
    model, cond1, cond2, video, audio = small
    executor = GraphExecutor(model, miss_policy="strict")
    stg1 = PassSpec("perturbed", skip_video_self_attn_blocks=(1,), skip_audio_self_attn_blocks=(1,))
    executor.warmup((COND, stg1), video, audio, conditioning=cond1)
    stg2 = PassSpec("perturbed", skip_video_self_attn_blocks=(0,), skip_audio_self_attn_blocks=(1,))
    with pytest.raises(GraphMissError, match=r"skip_video_self_attn_blocks: \(0,\) \(cached: \(1,\)\)"):
        executor.run(video, audio, 0.5, (COND, stg2))
    executor.set_conditioning(cond2)
    video2, audio2 = make_latents(model.config, GRID2, device="cuda", seed=3)
    with pytest.raises(GraphMissError, match=r"video: bf16\[1,192,128\] \(cached: bf16\[1,48,128\]\)"):
        executor.run(video2, audio2, 0.5, (COND,))
    # With capture on miss the new skip block gets its own graph and matches eager bitwise.
    capturing = GraphExecutor(model)
    capturing.warmup((stg1,), video, audio, conditioning=cond1)
    with pytest.warns(GraphMissWarning, match="skip_video_self_attn_blocks"):
        out = capturing.run(video, audio, 0.5, (stg2,))["perturbed"]
    expected = eager_pass(model, cond1, video, audio, 0.5, stg2)
    assert torch.equal(out.video, expected.video) and torch.equal(out.audio, expected.audio)
    assert capturing.stats.graphs == 2


@pytest.mark.filterwarnings("ignore::graphs.errors.GraphMissWarning")
def test_changed_weights_are_a_miss_never_a_stale_replay(small):
    model, cond1, _, video, audio = small
    strict = GraphExecutor(model, miss_policy="strict")
    executor = GraphExecutor(model)
    strict.warmup((COND,), video, audio, conditioning=cond1)
    executor.warmup((COND,), video, audio, conditioning=cond1)
    weight, version = model.video_out.weight, model.weights_version
    original = weight.detach().clone()
    try:
        model.weights_version += 1
        with pytest.raises(GraphMissError, match=r"weights_version: \d+ \(cached: \d+\)"):
            strict.run(video, audio, 0.5, (COND,))
        model.weights_version -= 1
        with torch.no_grad():
            weight.add_(0.01)  # in place: same address, new values, version counter bumped
        with pytest.raises(GraphMissError, match="param_versions"):
            strict.run(video, audio, 0.5, (COND,))
        out = executor.run(video, audio, 0.5, (COND,))["cond"]
        assert executor.stats.captures == 2
        expected = eager_pass(model, cond1, video, audio, 0.5, COND)
        assert torch.equal(out.video, expected.video)
        # A replaced parameter moves: a stale graph would read the old storage.
        model.video_out.weight = torch.nn.Parameter(original.clone() * 2)
        out = executor.run(video, audio, 0.5, (COND,))["cond"]
        assert executor.stats.captures == 3
        expected = eager_pass(model, cond1, video, audio, 0.5, COND)
        assert torch.equal(out.video, expected.video)
        # An edit no version counter sees (through `.data`, as a NumPy view would) changes the memory the graph
        # reads: the same graph replays (no capture) and sees it, as eager does.
        model.video_out.weight.data.mul_(0.5)
        out = executor.run(video, audio, 0.5, (COND,))["cond"]
        assert executor.stats.captures == 3
        expected = eager_pass(model, cond1, video, audio, 0.5, COND)
        assert torch.equal(out.video, expected.video)
    finally:
        model.video_out.weight, model.weights_version = weight, version
        with torch.no_grad():
            weight.copy_(original)


def test_pool_is_shared_and_reported(small):
    model, cond1, cond2, video, audio = small
    lines: list[str] = []
    executor = GraphExecutor(model, progress=lines.append)
    seconds = executor.warmup(HQ, video, audio, conditioning=cond1)
    seconds += executor.warmup((COND,), upsample(video), audio, conditioning=cond2)
    stats = executor.stats
    assert stats.graphs == 4 and seconds > 0 and abs(stats.capture_seconds - seconds) < 1e-6
    pool = tuple(executor._pool.handle)
    assert all(tuple(executor._graphs[k].graph.pool()) == pool for k in executor.keys())
    assert stats.pool_bytes > 0, stats
    assert len(lines) == 4 and all("pool" in line and " MiB" in line for line in lines)
    print(f"\n{stats}")


def test_own_text_kv_pass_captured_before_the_producer_saves_its_pool(small):
    """neg projects its own text keys/values, as temporaries of its graph: captured before cond (the executor's
    order), its freed blocks take the keys/values cond holds for modality. Captured after cond, both sets live in
    the pool at once (1.1 GiB at ltx2.3 scale). The order changes no value."""
    model, _, _, video, audio = small
    text_tokens = 1024  # large enough that the keys/values dwarf the allocator's rounding
    conditioning = make_conditioning(model.config, GRID1, device="cuda", text_tokens=text_tokens, seed=1)
    c = model.config
    inner = c.video_heads * c.video_head_dim + c.audio_heads * c.audio_head_dim
    kv_bytes = c.num_layers * text_tokens * 2 * inner * 2  # [k | v] of both streams, bf16
    cond, neg, modality = HQ
    own_first = GraphExecutor(model, progress=None)
    own_first.warmup(HQ, video, audio, conditioning=conditioning)
    own_last = GraphExecutor(model, progress=None)
    own_last.warmup((cond, modality), video, audio, conditioning=conditioning)
    own_last.warmup((neg,), video, audio)  # new: captured after the cached producer
    assert [k.pass_name for k in own_first.keys()] == ["neg", "cond", "modality"]
    assert [k.pass_name for k in own_last.keys()] == ["cond", "modality", "neg"]
    saved = own_last.stats.pool_bytes - own_first.stats.pool_bytes
    assert saved >= 0.9 * kv_bytes, f"pool {own_first.stats.pool_bytes} vs {own_last.stats.pool_bytes} bytes, " \
                                    f"text K/V {kv_bytes} bytes"
    a, b = own_first.run(video, audio, 0.6, HQ), own_last.run(video, audio, 0.6, HQ)
    for name in a:
        assert torch.equal(a[name].video, b[name].video) and torch.equal(a[name].audio, b[name].audio), name


def _warmed_strict_executor(small):
    model, cond1, cond2, video, audio = small
    executor = GraphExecutor(model, miss_policy="strict")
    executor.warmup(HQ, video, audio, conditioning=cond1)
    executor.warmup((COND,), upsample(video), audio, conditioning=cond2)
    run_loop(executor, cond1, cond2, video, audio)  # steady state: the caching allocator holds the loop's blocks
    torch.cuda.synchronize()
    return executor


def test_warm_loop_makes_no_host_sync(small):
    model, cond1, cond2, video, audio = small
    executor = _warmed_strict_executor(small)
    captures = executor.stats.captures
    with cuda_sync_debug("error"):
        with pytest.raises(RuntimeError):  # positive control: the guard is live
            torch.ones((), device="cuda").item()
        with detect_host_syncs(mode="raise"):
            s1, s2 = run_loop(executor, cond1, cond2, video, audio)
    torch.cuda.synchronize()
    assert executor.stats.captures == captures and executor.stats.misses == 0
    assert torch.isfinite(s2.video).all()


def test_warm_loop_cupti_sees_no_host_sync(small):
    pytest.importorskip("cupti")
    from profiling.cupti import CuptiProfiler

    model, cond1, cond2, video, audio = small
    executor = _warmed_strict_executor(small)
    with CuptiProfiler() as profiler:  # runs the positive control first
        run_loop(executor, cond1, cond2, video, audio)
    report = profiler.report()  # raises BlindProfilerError unless the control's sync was seen
    assert report.control == "seen"
    assert report.unexpected_syncs == (), report.syncs_table()


def test_compiled_graph_loop_within_bf16_tolerance(small):
    model, cond1, _, video, audio = small
    # Stage 2 runs cond alone on the stage-1 grid: with no other pass reading its text it computes its own
    # keys/values, a fourth graph beside stage 1's cond (which holds them for modality), neg and modality.
    def loop(executor):
        s1 = denoise_stage1(executor, cond1, video, audio, seed=SEED, steps=STEPS, guidance="hq", quiet=True)
        s2 = denoise_stage2(executor, cond1, s1.video, s1.audio, seed=SEED, quiet=True)
        return s1.video, s1.audio, s2.video

    eager = loop(EagerExecutor(model))
    model32 = copy.deepcopy(model).float()  # the same (bf16-representable) weights, fp32 math
    reference = loop(EagerExecutor(model32))
    del model32
    torch.cuda.empty_cache()
    executor = GraphExecutor(model, compile="default")
    compiled = loop(executor)
    assert executor.stats.compiles >= 1 and executor.stats.graphs == 4
    for name, c, e, r in zip(("stage1 video", "stage1 audio", "stage2 video"), compiled, eager, reference):
        floor = rel_err(e, r)  # how far bf16 itself is from fp32 on this loop
        err = rel_err(c, e)
        assert err <= max(2 * floor, 1e-2), f"{name}: compile+graphs vs eager {err:.3e}, bf16 vs fp32 {floor:.3e}"
    # One pass, directly: compiled+graph cond velocity vs eager.
    out = executor.run(video, audio, 0.5, HQ)["cond"]
    expected = eager_pass(model, cond1, video, audio, 0.5, COND)
    assert rel_err(out.video, expected.video) < 3e-2 and rel_err(out.audio, expected.audio) < 3e-2
    # Compiled code keeps no copy of a weight either: an edit no version counter sees (`.data`) inside a compiled
    # region reaches the replay of the same graph.
    before = out.video.clone()
    fc2 = model.blocks[0].video_ff.fc2.weight
    captures = executor.stats.captures
    try:
        fc2.data.mul_(0.5)
        out = executor.run(video, audio, 0.5, HQ)["cond"]
        expected = eager_pass(model, cond1, video, audio, 0.5, COND)
    finally:
        fc2.data.mul_(2.0)  # exact in bf16: a power of two
    assert executor.stats.captures == captures
    assert rel_err(out.video, before) > 1e-3 and rel_err(out.video, expected.video) < 3e-2


def test_a_host_sync_in_a_pass_fails_its_capture_with_the_cause_and_for_good(small):
    """The capture of a pass that syncs (here a hook reading a tensor's value) raises `CaptureError` with CUDA's own
    error and the hint, and leaves the executor's pool unusable: a later capture into it is refused by name, never
    attempted. A new executor on the same model captures and matches eager. Last in the module: it breaks a
    capture on purpose."""
    model, cond1, _, video, audio = small
    executor = GraphExecutor(model)
    executor.set_conditioning(cond1)

    def read_a_value(module, args):
        float(args[0].sum())  # a host sync (returns None: the inputs stay as they are)

    handle = model.video_in.register_forward_pre_hook(read_a_value)
    try:
        cause_then_hint = r"(?s)capturing pass 'cond' \(.*\) failed: .+A CUDA graph cannot contain a host sync"
        with pytest.raises(CaptureError, match=cause_then_hint) as caught:  # CUDA's messages span lines
            executor.run(video, audio, 0.5, (COND,))
    finally:
        handle.remove()
    assert isinstance(caught.value.__cause__, RuntimeError)
    with pytest.raises(CaptureError, match="unusable after a failed capture .*create a new GraphExecutor"):
        executor.run(video, audio, 0.5, (COND,))
    fresh = GraphExecutor(model)
    fresh.set_conditioning(cond1)
    out = fresh.run(video, audio, 0.5, (COND,))["cond"]
    expected = eager_pass(model, cond1, video, audio, 0.5, COND)
    assert torch.equal(out.video, expected.video) and torch.equal(out.audio, expected.audio)


@pytest.mark.filterwarnings("ignore::graphs.errors.GraphMissWarning")
def test_a_capture_is_a_declared_one_time_sync(small):
    """A loop that captures is not a warm loop: each capture is recorded as a one-time block, which the pytest
    plugin and `no_host_sync` refuse unless allowed, and its own syncs are not unexpected ones."""
    model, cond1, _, video, audio = small
    executor = GraphExecutor(model, progress=None)
    executor.set_conditioning(cond1)
    with detect_host_syncs(mode="record") as report:
        executor.run(video, audio, 0.5, (COND,))
    assert report.one_time == ["capture cond"] and report.findings == []

"""GraphExecutor logic on CPU: refusal/fallback on a CPU model, and - with a stand-in pool that "captures" by
running the pass into held outputs - keys, miss policies, replay order, held outputs, static inputs,
weight changes and re-entrancy. The same tests on real CUDA graphs are in test_graphs_gpu.py."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
from torch import nn

import graphs.executor
from graphs.errors import CaptureError, GraphMissError, GraphMissWarning
from graphs.executor import GraphExecutor, GraphStats, text_kv_roles
from pipeline.config import LatentGrid
from pipeline.executor import Conditioning, EagerExecutor, PassExecutor, TextContext
from pipeline.passes import PassSpec
from profiling.syncs import detect_host_syncs
from tests.graphs.helpers import FakePool, make_conditioning, make_latents, tiny_model

COND = PassSpec("cond", "positive")
NEG = PassSpec("neg", "negative")
MODALITY = PassSpec("modality", disable_a2v_cross_attn=True, disable_v2a_cross_attn=True)
HQ = (COND, NEG, MODALITY)
PERTURBED = PassSpec("perturbed", skip_video_self_attn_blocks=(1,), skip_audio_self_attn_blocks=(1,))
GRID = LatentGrid.from_tokens(24, audio_tokens=10)


@pytest.fixture
def fake_graphs(monkeypatch):
    """Let the executor 'capture' on CPU with FakePool."""
    monkeypatch.setattr(graphs.executor, "graphs_supported", lambda device: True)
    monkeypatch.setattr(graphs.executor, "GraphPool", FakePool)


_SHARED: dict = {}


def _setup(grid: LatentGrid = GRID, *, fresh: bool = False):
    """(model, conditioning, video, audio). The tiny model is built once per module unless `fresh` (tests that
    edit weights or the model get their own); the executor never writes into any of these."""
    if fresh or "model" not in _SHARED:
        model = tiny_model()
        if fresh:
            return (model, *_inputs(model, grid))
        _SHARED["model"] = model
    model = _SHARED["model"]
    return (model, *_inputs(model, grid))


def _inputs(model, grid):
    conditioning = make_conditioning(model.config, grid, device="cpu")
    video, audio = make_latents(model.config, grid, device="cpu")
    return conditioning, video, audio


def _eager(model, conditioning, video, audio, sigma, specs):
    eager = EagerExecutor(model)
    eager.set_conditioning(conditioning)
    with torch.no_grad():
        return eager.run(video, audio, sigma, specs)


def _assert_equal_to_eager(out, model, conditioning, video, audio, sigma, specs):
    """Every pass's video and audio velocity bitwise equal to the eager executor's."""
    expected = _eager(model, conditioning, video, audio, sigma, specs)
    for name in expected:
        assert torch.equal(out[name].video, expected[name].video), (name, sigma)
        assert torch.equal(out[name].audio, expected[name].audio), (name, sigma)


def _executor(model, **kwargs) -> GraphExecutor:
    lines: list[str] = []
    executor = GraphExecutor(model, progress=lines.append, warmup_iters=1, **kwargs)
    executor.progress_lines = lines  # type: ignore[attr-defined]
    return executor


# --------------------------------------------------------------------------- a CPU model: refuse or fall back


@pytest.mark.parametrize("policy", ["capture", "strict"])
def test_cpu_model_is_refused_with_the_fix(policy):
    model = _setup()[0]
    with pytest.raises(CaptureError, match=r"needs the model on a CUDA device, but it is on cpu.*EagerExecutor"):
        GraphExecutor(model, miss_policy=policy)


def test_cpu_model_falls_back_to_eager_when_configured():
    model, conditioning, video, audio = _setup()
    executor = GraphExecutor(model, miss_policy="eager", progress=None)
    assert isinstance(executor, PassExecutor)
    executor.set_conditioning(conditioning)
    with pytest.warns(GraphMissWarning, match="CUDA graphs need a CUDA device"):
        out = executor.run(video, audio, 0.7, HQ)
    expected = _eager(model, conditioning, video, audio, 0.7, HQ)
    for name in ("cond", "neg", "modality"):
        assert torch.equal(out[name].video, expected[name].video)
        assert torch.equal(out[name].audio, expected[name].audio)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        executor.run(video, audio, 0.5, HQ)
    assert executor.stats.eager_passes == 6 and executor.stats.captures == 0
    assert executor.warmup(HQ, video, audio) == 0.0


@pytest.mark.parametrize("kwargs, match", [
    ({"miss_policy": "sometimes"}, "miss_policy must be one of"),
    ({"compile": "reduce-overhead"}, "compile must be False, True or one of"),
    ({"compile": "max-autotune"}, "compile must be False, True or one of"),
    ({"warmup_iters": 0}, "warmup_iters must be an int >= 1"),
    ({"warmup_iters": True}, "warmup_iters must be an int >= 1"),
    ({"warmup_iters": 1.5}, "warmup_iters must be an int >= 1"),
    ({"max_compile_variants": 0}, "max_compile_variants must be an int >= 1"),
    ({"progress": 5}, "progress must be a callable"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GraphExecutor(_setup()[0], **{"miss_policy": "eager", **kwargs})


def test_a_model_that_is_not_a_module_is_named():
    with pytest.raises(ValueError, match="model must be a torch.nn.Module .*got NoneType"):
        GraphExecutor(None, miss_policy="eager")


# --------------------------------------------------------------------------- input validation


def test_run_before_set_conditioning(fake_graphs):
    model, _, video, audio = _setup()
    with pytest.raises(ValueError, match="set_conditioning"):
        _executor(model).run(video, audio, 0.5, HQ)


@pytest.mark.parametrize("case", ["device", "rank", "batch", "sigma_tensor", "dup_names", "int_latents", "one_spec",
                                  "empty"])
def test_bad_run_inputs_raise_value_error(fake_graphs, case):
    model, conditioning, video, audio = _setup()
    executor = _executor(model)
    executor.set_conditioning(conditioning)
    args = {"video": video, "audio": audio, "sigma": 0.5, "specs": HQ}
    match = {
        "device": ("video", torch.empty(video.shape, device="meta"), "video is on meta"),
        "rank": ("audio", audio[0], r"audio must be a floating \[B, N, C\]"),
        "batch": ("audio", torch.cat([audio, audio]), "video batch 1 != audio batch 2"),
        "sigma_tensor": ("sigma", torch.tensor(0.5), "sigma must be a host float"),
        "dup_names": ("specs", (COND, COND), "unique"),
        "int_latents": ("video", video.long(), "floating"),
        "one_spec": ("specs", COND, r"specs must be a sequence of PassSpec \(e.g. \(COND,\)\), got PassSpec"),
        "empty": ("video", video[:, :0], "no empty dimension"),
    }[case]
    args[match[0]] = match[1]
    with pytest.raises(ValueError, match=match[2]):
        executor.run(**args)
    assert executor.stats.captures == 0


def test_text_batch_must_be_one_or_the_latents_batch(fake_graphs):
    model, _, video, audio = _setup()
    executor = _executor(model)
    executor.set_conditioning(make_conditioning(model.config, GRID, device="cpu", batch=3))
    with pytest.raises(ValueError, match=r"conditioning.texts\['positive'\] has batch 3, expected 1 or the latents' "
                                         r"batch 2"):
        executor.run(torch.cat([video, video]), torch.cat([audio, audio]), 0.5, HQ)


def test_a_model_moved_after_construction_is_refused(fake_graphs):
    model, conditioning, video, audio = _setup(fresh=True)
    executor = _executor(model)
    executor.set_conditioning(conditioning)
    model.to("meta")
    with pytest.raises(CaptureError, match="the model moved from cpu to meta.*build a new GraphExecutor"):
        executor.run(video, audio, 0.5, HQ)


def test_conditioning_on_another_device_is_refused(fake_graphs):
    model, conditioning, _, _ = _setup()
    positive = conditioning.texts["positive"]
    meta = TextContext(*(torch.empty(t.shape, device="meta") for t in (positive.video, positive.audio)))
    bad = Conditioning(texts={"positive": meta, "negative": conditioning.texts["negative"]}, rope=conditioning.rope)
    with pytest.raises(ValueError, match="not on the model's device"):
        _executor(model).set_conditioning(bad)


# --------------------------------------------------------------------------- capture, replay, held outputs


def test_capture_on_first_use_then_replay(fake_graphs):
    model, conditioning, video, audio = _setup()
    executor = _executor(model)
    executor.set_conditioning(conditioning)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the first captures of an executor are not warned misses
        out = executor.run(video, audio, 0.7, HQ)
    assert executor.stats.captures == 3 and executor.stats.misses == 3 and executor.stats.replays == 3
    assert len(executor.progress_lines) == 3 and executor.progress_lines[0].startswith("captured neg")
    expected = _eager(model, conditioning, video, audio, 0.7, HQ)
    for name in expected:
        assert torch.equal(out[name].video, expected[name].video)
    # New values, same shapes: replays only, reading the new inputs.
    video2, audio2 = make_latents(model.config, GRID, device="cpu", seed=9)
    out2 = executor.run(video2, audio2, 0.3, HQ)
    assert executor.stats.captures == 3 and executor.stats.replays == 6 and executor.stats.misses == 3
    expected2 = _eager(model, conditioning, video2, audio2, 0.3, HQ)
    for name in expected2:
        assert torch.equal(out2[name].video, expected2[name].video)
        assert torch.equal(out2[name].audio, expected2[name].audio)
        assert out2[name].video is out[name].video  # the same held output tensors, rewritten


def test_outputs_are_held_per_pass(fake_graphs):
    model, conditioning, video, audio = _setup()
    executor = _executor(model)
    executor.set_conditioning(conditioning)
    out = executor.run(video, audio, 0.7, HQ)
    neg, cond = out["neg"].video.clone(), out["cond"].video.clone()
    executor.replay_only(MODALITY)  # captured after neg and cond: it never writes their outputs
    assert torch.equal(out["neg"].video, neg) and torch.equal(out["cond"].video, cond)
    pointers = {out[n].video.data_ptr() for n in out} | {out[n].audio.data_ptr() for n in out}
    assert len(pointers) == 6


def test_the_fake_pool_poisons_what_a_real_pool_may_overwrite(fake_graphs):
    """A replay may overwrite the held outputs of the graphs captured after it (graphs.capture). FakePool fills
    them with NaN, so a replay-order bug in any test here fails instead of passing by luck."""
    model, conditioning, video, audio = _setup()
    executor = _executor(model)
    executor.set_conditioning(conditioning)
    out = executor.run(video, audio, 0.7, HQ)  # captured and replayed: neg, cond, modality
    assert all(not torch.isnan(v.video).any() for v in out.values())
    executor.replay_only(NEG)
    assert torch.isnan(out["cond"].video).all() and torch.isnan(out["modality"].video).all()
    assert all(torch.isnan(t).all() for kv in executor.pass_graph(COND).text_kv for t in kv)
    assert not torch.isnan(out["neg"].video).any()


@pytest.mark.filterwarnings("ignore::graphs.errors.GraphMissWarning")
def test_replays_follow_capture_order_whatever_the_spec_order(fake_graphs):
    model, conditioning, video, audio = _setup()
    executor = _executor(model)
    executor.set_conditioning(conditioning)
    executor.run(video, audio, 0.7, (COND, MODALITY))
    executor.run(video, audio, 0.7, (NEG, MODALITY, COND))  # neg is new: captured after the cached ones
    pool = executor._pool
    assert pool.captured == ["cond", "modality", "neg"]
    pool.replayed.clear()
    out = executor.run(video, audio, 0.7, (NEG, MODALITY, COND))
    assert pool.replayed == ["cond", "modality", "neg"]
    assert list(out) == ["neg", "modality", "cond"]  # returned in the caller's order
    expected = _eager(model, conditioning, video, audio, 0.7, (NEG, MODALITY, COND))
    for name in expected:  # any other replay order leaves NaN in FakePool (helpers.FakeGraph)
        assert torch.equal(out[name].video, expected[name].video), name
    assert [k.pass_name for k in executor.keys()] == ["cond", "modality", "neg"]


def test_new_conditioning_values_reach_the_graphs_without_recapture(fake_graphs):
    model, conditioning, video, audio = _setup()
    executor = _executor(model)
    executor.set_conditioning(conditioning)
    executor.run(video, audio, 0.7, HQ)
    other = make_conditioning(model.config, GRID, device="cpu", seed=42)
    executor.set_conditioning(other)
    out = executor.run(video, audio, 0.7, HQ)
    assert executor.stats.captures == 3
    expected = _eager(model, other, video, audio, 0.7, HQ)
    for name in expected:
        assert torch.equal(out[name].video, expected[name].video)


def test_a_second_shape_gets_its_own_static_inputs_and_graphs(fake_graphs):
    model, conditioning, video, audio = _setup()
    executor = _executor(model)
    executor.set_conditioning(conditioning)
    executor.run(video, audio, 0.7, HQ)
    grid2 = LatentGrid.from_tokens(48, audio_tokens=12)
    _, conditioning2, video2, audio2 = _setup(grid2)
    executor.set_conditioning(conditioning2)
    with pytest.warns(GraphMissWarning, match=r"capturing a new graph.*video: 'bf16|video: fp32"):
        out = executor.run(video2, audio2, 0.4, (COND,))
    assert executor.stats.captures == 4 and len(executor._statics) == 2
    assert torch.equal(out["cond"].video, _eager(model, conditioning2, video2, audio2, 0.4, (COND,))["cond"].video)
    executor.set_conditioning(conditioning)  # back to the first shape: cached
    executor.run(video, audio, 0.7, HQ)
    assert executor.stats.captures == 4


# --------------------------------------------------------------------------- text keys/values shared by passes


def _roles(specs, share):
    return {name: str(role) for name, role in text_kv_roles(specs, share=share).items()}


def test_text_kv_roles_follow_pass_order_not_spec_order():
    assert _roles((MODALITY, NEG, PERTURBED, COND), share=True) == {
        "modality": "consume:cond", "neg": "own", "perturbed": "consume:cond", "cond": "produce"}
    assert _roles((MODALITY, PERTURBED), share=True) == {
        "modality": "consume:perturbed(skip_audio_self_attn_blocks=(1,), skip_video_self_attn_blocks=(1,))",
        "perturbed": "produce"}
    assert _roles((COND, NEG), share=True) == {"cond": "own", "neg": "own"}  # one reader per text
    assert set(_roles((COND, NEG, PERTURBED, MODALITY), share=False).values()) == {"own"}


@pytest.mark.parametrize("share", [True, False])
def test_passes_sharing_text_kv_equal_eager_at_every_sigma(fake_graphs, share):
    """The producer (cond) replays before its consumers in every evaluation (after neg, which projects its own
    text: its temporaries are free for cond's held K/V) and the consumers read what it wrote for THIS
    evaluation's sigma and texts: bitwise equal to eager passes that each project their text."""
    model, conditioning, video, audio = _setup()
    executor = _executor(model, share_text_kv=share)
    specs = (MODALITY, PERTURBED, NEG, COND)  # any order: cond still produces, and replays before its readers
    executor.set_conditioning(conditioning)
    for sigma, seed in ((0.9, 2), (0.4, 3)):
        video, audio = make_latents(model.config, GRID, device="cpu", seed=seed)
        out = executor.run(video, audio, sigma, specs)
        _assert_equal_to_eager(out, model, conditioning, video, audio, sigma, specs)
    roles = {k.pass_name: str(k.text_kv_role) for k in executor.keys()}
    if share:
        assert roles == {"cond": "produce", "modality": "consume:cond", "perturbed": "consume:cond", "neg": "own"}
        assert executor._pool.captured == ["neg", "cond", "modality", "perturbed"]  # own, produce, consume
        assert executor._pool.replayed[-4:] == ["neg", "cond", "modality", "perturbed"]
        assert "[holds the positive text K/V" in executor.progress_lines[1]
        held = executor.pass_graph(COND).text_kv
        assert len(held) == model.config.num_layers and executor.pass_graph(MODALITY).text_kv is None
    else:
        assert set(roles.values()) == {"own"}
    other = make_conditioning(model.config, GRID, device="cpu", seed=42)  # new texts reach the consumers too
    executor.set_conditioning(other)
    out = executor.run(video, audio, 0.4, specs)
    assert torch.equal(out["modality"].video, _eager(model, other, video, audio, 0.4, (MODALITY,))["modality"].video)


def test_consumers_read_the_keys_values_their_producer_holds(fake_graphs):
    """Equality with eager cannot tell a consumer that reads the held K/V from one that projects its own: poison
    the held tensors and the consumer's output must show it, the producer's (recomputed in its replay) must not."""
    model, conditioning, video, audio = _setup()
    executor = _executor(model)
    executor.set_conditioning(conditioning)
    executor.run(video, audio, 0.7, (COND, MODALITY))
    for block in executor.pass_graph(COND).text_kv:
        for tensor in block:
            tensor.fill_(float("nan"))
    assert torch.isnan(executor.replay_only(MODALITY).video).all()
    assert not torch.isnan(executor.replay_only(COND).video).any()  # the producer writes them anew
    assert not torch.isnan(executor.replay_only(MODALITY).video).any()


@pytest.mark.filterwarnings("ignore::graphs.errors.GraphMissWarning")
def test_a_consumer_graph_is_keyed_by_its_producer(fake_graphs):
    """modality reading cond's held K/V and modality reading perturbed's are different graphs (different
    addresses baked in): running (perturbed, modality) after (cond, modality) captures both anew."""
    model, conditioning, video, audio = _setup()
    executor = _executor(model)
    executor.set_conditioning(conditioning)
    executor.run(video, audio, 0.7, (COND, MODALITY))
    out = executor.run(video, audio, 0.7, (PERTURBED, MODALITY))
    assert executor.stats.captures == 4
    assert "reads the positive text K/V held by perturbed" in executor.progress_lines[-1]
    _assert_equal_to_eager(out, model, conditioning, video, audio, 0.7, (PERTURBED, MODALITY))


@pytest.mark.filterwarnings("ignore::graphs.errors.GraphMissWarning")
def test_a_producer_with_other_options_gets_its_own_consumers(fake_graphs):
    model, conditioning, video, audio = _setup()
    executor = _executor(model)
    executor.set_conditioning(conditioning)
    executor.run(video, audio, 0.7, (PERTURBED, MODALITY))
    other = PassSpec("perturbed", skip_video_self_attn_blocks=(0,), skip_audio_self_attn_blocks=(1,))
    out = executor.run(video, audio, 0.7, (other, MODALITY))  # a new producer: a new modality graph too
    assert executor.stats.captures == 4
    _assert_equal_to_eager(out, model, conditioning, video, audio, 0.7, (other, MODALITY))


def test_replay_only_refuses_text_kv_of_other_inputs(fake_graphs):
    """Held K/V are valid from their producer's replay until new inputs are loaded: a strict run that loads
    new inputs and then fails leaves them stale, and replay_only of a consumer says so instead of reading them."""
    model, conditioning, video, audio = _setup()
    executor = _executor(model, miss_policy="strict")
    executor.warmup(HQ, video, audio, sigma=0.9, conditioning=conditioning)
    with pytest.raises(GraphMissError, match="perturbed"):
        executor.run(video, audio, 0.2, (*HQ, PERTURBED))
    with pytest.raises(GraphMissError, match="no longer match the loaded inputs.*replay cond first"):
        executor.replay_only(MODALITY)
    executor.replay_only(COND)
    out = executor.replay_only(MODALITY)
    assert torch.equal(out.video, _eager(model, conditioning, video, audio, 0.2, (MODALITY,))["modality"].video)


@pytest.mark.filterwarnings("ignore::graphs.errors.GraphMissWarning")
def test_replaying_a_graph_captured_before_the_producer_invalidates_its_text_kv(fake_graphs):
    """A graph captured before the producer may have its temporaries where the producer's held K/V are."""
    model, conditioning, video, audio = _setup()
    executor = _executor(model)
    executor.set_conditioning(conditioning)
    executor.run(video, audio, 0.7, (NEG,))  # captured first
    executor.run(video, audio, 0.7, (COND, MODALITY))  # cond holds the K/V, modality reads them
    executor.replay_only(MODALITY)  # captured after cond: fine
    executor.replay_only(NEG)
    with pytest.raises(GraphMissError, match="replay cond first"):
        executor.replay_only(MODALITY)
    executor.replay_only(COND)
    executor.pass_graph(NEG).replay()  # a bare launch, which the executor cannot see: handing it out counts
    with pytest.raises(GraphMissError, match="replay cond first"):
        executor.replay_only(MODALITY)
    executor.reset()
    with pytest.raises(GraphMissError, match="no run"):
        executor.replay_only(MODALITY)


def test_audio_and_video_texts_of_different_lengths(fake_graphs):
    model, _, video, audio = _setup()
    texts = make_conditioning(model.config, GRID, device="cpu")
    short = {name: TextContext(t.video, t.audio[:, :5]) for name, t in texts.texts.items()}
    conditioning = Conditioning(texts=short, rope=texts.rope)
    executor = _executor(model)
    executor.set_conditioning(conditioning)
    out = executor.run(video, audio, 0.5, (COND, MODALITY))
    _assert_equal_to_eager(out, model, conditioning, video, audio, 0.5, (COND, MODALITY))


def test_models_without_text_kv_do_not_share(fake_graphs):
    model, conditioning, video, audio = _setup(fresh=True)
    model.text_kv = None  # e.g. the diffusers adapter: no text_kv method
    executor = _executor(model)
    assert not executor.share_text_kv
    executor.warmup(HQ, video, audio, conditioning=conditioning)
    assert {str(k.text_kv_role) for k in executor.keys()} == {"own"}
    with pytest.raises(ValueError, match="share_text_kv must be a bool"):
        _executor(model, share_text_kv="yes")


# --------------------------------------------------------------------------- miss policies


def test_strict_policy_raises_with_the_difference(fake_graphs):
    model, conditioning, video, audio = _setup()
    executor = _executor(model, miss_policy="strict")
    with pytest.raises(GraphMissError, match="no graph has been captured yet"):
        executor.set_conditioning(conditioning)
        executor.run(video, audio, 0.7, HQ)
    seconds = executor.warmup(HQ, video, audio, conditioning=conditioning)
    assert seconds >= 0.0 and executor.stats.captures == 3
    misses = executor.stats.misses
    executor.run(video, audio, 0.7, HQ)
    assert executor.stats.misses == misses
    perturbed = PassSpec("perturbed", skip_video_self_attn_blocks=(1,), skip_audio_self_attn_blocks=(1,))
    with pytest.raises(GraphMissError, match=r"skip_video_self_attn_blocks: \(1,\) \(cached: \(\)\)"):
        executor.run(video, audio, 0.7, (COND, perturbed))
    with pytest.raises(GraphMissError, match=r"video: bf16\[1,23,128\]|video: fp32\[1,23,128\]"):
        executor.run(video[:, :23], audio, 0.7, HQ)
    assert executor.stats.captures == 3


def test_eager_policy_runs_misses_eagerly_and_warns_once(fake_graphs):
    model, conditioning, video, audio = _setup()
    executor = _executor(model, miss_policy="eager")
    executor.warmup((COND,), video, audio, conditioning=conditioning)
    with pytest.warns(GraphMissWarning, match="running a pass eagerly"):
        out = executor.run(video, audio, 0.7, HQ)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        executor.run(video, audio, 0.7, HQ)
    stats = executor.stats
    # HQ runs cond as the producer of the positive text K/V (modality reads them): another key than the
    # warmed-up cond alone, so all three passes miss
    assert stats.captures == 1 and stats.eager_passes == 6 and stats.misses == 6
    expected = _eager(model, conditioning, video, audio, 0.7, HQ)
    for name in expected:
        assert torch.equal(out[name].video, expected[name].video)


def test_capture_policy_warns_once_for_later_misses(fake_graphs):
    model, conditioning, video, audio = _setup()
    executor = _executor(model)
    executor.warmup((COND,), video, audio, conditioning=conditioning)
    with pytest.warns(GraphMissWarning, match="capturing a new graph"):
        executor.run(video, audio, 0.7, (COND, NEG))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        executor.run(video, audio, 0.7, (COND, NEG, MODALITY))
    assert executor.stats.captures == 4  # cond again: with modality it also holds the positive text K/V


# --------------------------------------------------------------------------- weights: never a stale replay


def test_weight_changes_miss(fake_graphs):
    model, conditioning, video, audio = _setup(fresh=True)
    executor = _executor(model, miss_policy="strict")
    executor.warmup(HQ, video, audio, conditioning=conditioning)
    model.weights_version += 1
    with pytest.raises(GraphMissError, match="weights_version: 1 \\(cached: 0\\)"):
        executor.run(video, audio, 0.7, HQ)
    with pytest.raises(GraphMissError, match="weights_version"):
        executor.replay_only(COND)
    with pytest.warns(GraphMissWarning, match="weights changed"):  # strict's remedy: warmup recaptures ...
        executor.warmup(HQ, video, audio)
    assert executor.stats.captures == 6 and executor.stats.graphs == 3  # ... and drops the old set
    executor.run(video, audio, 0.7, HQ)  # every key hits
    with torch.no_grad():
        model.blocks[0].video_ff.fc1.weight.mul_(1.5)
    with pytest.raises(GraphMissError, match="param_versions"):
        executor.run(video, audio, 0.7, HQ)


def test_in_place_edit_recaptures_and_matches_the_edited_model(fake_graphs):
    model, conditioning, video, audio = _setup(fresh=True)
    executor = _executor(model)
    executor.set_conditioning(conditioning)
    executor.run(video, audio, 0.7, HQ)
    with torch.no_grad():
        model.video_out.weight.mul_(-1.0)
    with pytest.warns(GraphMissWarning, match="weights changed since its 3 graph"):
        out = executor.run(video, audio, 0.7, HQ)
    assert executor.stats.captures == 6
    assert executor.stats.graphs == 3  # the graphs of the old weights were dropped with their pool
    expected = _eager(model, conditioning, video, audio, 0.7, HQ)
    assert torch.equal(out["cond"].video, expected["cond"].video)


def test_tensors_moving_back_hit_again(fake_graphs):
    """Addresses alone drop nothing: a model that rebinds a buffer per grid (diffusers' coordinates) and switches
    back replays its first graphs again."""
    model, conditioning, video, audio = _setup(fresh=True)
    first, second = torch.zeros(1), torch.ones(1)
    model.register_buffer("coords", first)
    executor = _executor(model)
    executor.set_conditioning(conditioning)
    executor.run(video, audio, 0.7, HQ)
    model.coords = second
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GraphMissWarning)  # the capture of the second binding
        executor.run(video, audio, 0.7, HQ)
    model.coords = first
    executor.run(video, audio, 0.7, HQ)
    assert executor.stats.captures == 6 and executor.stats.graphs == 6


def test_a_weight_reviewed_in_place_misses(fake_graphs):
    """`.data =` a view at the same address bumps no version counter: the key still sees the new shape."""
    model, conditioning, video, audio = _setup(fresh=True)
    executor = _executor(model, miss_policy="strict")
    executor.warmup(HQ, video, audio, conditioning=conditioning)
    weight, original = model.video_out.weight, model.video_out.weight.data
    weight.data = original[: weight.shape[0] // 2]
    with pytest.raises(GraphMissError, match="weight_storage"):
        executor.run(video, audio, 0.7, HQ)
    assert executor.stats.misses == len(HQ)  # a strict miss is counted too, one per pass without its graph
    weight.data = original
    square = next(p for p in model.parameters() if p.ndim == 2 and p.shape[0] == p.shape[1])
    strict = _executor(model, miss_policy="strict")
    strict.warmup(HQ, video, audio, conditioning=conditioning)
    square.data = square.data.t()  # same address, same shape: only the strides tell
    with pytest.raises(GraphMissError, match="weight_storage"):
        strict.run(video, audio, 0.7, HQ)


def test_a_replaced_weight_drops_the_old_graphs(fake_graphs):
    """A weight replaced by another tensor (`.data =`, a cast, a move) recaptures, and the graphs that read the
    old memory go with their pool."""
    model, conditioning, video, audio = _setup(fresh=True)
    executor = _executor(model)
    executor.set_conditioning(conditioning)
    executor.run(video, audio, 0.7, HQ)
    model.video_out.weight.data = -model.video_out.weight.data
    with pytest.warns(GraphMissWarning, match="weights changed since its 3 graph"):
        out = executor.run(video, audio, 0.7, HQ)
    assert executor.stats.captures == 6 and executor.stats.graphs == 3
    _assert_equal_to_eager(out, model, conditioning, video, audio, 0.7, HQ)


def test_hooks_added_or_removed_after_capture_recapture(fake_graphs):
    """A replay runs no Python: a forward hook registered after the capture would be skipped silently. Hooks are
    part of the key, the module's and the global ones."""
    model, conditioning, video, audio = _setup(fresh=True)
    executor = _executor(model)
    executor.set_conditioning(conditioning)
    executor.run(video, audio, 0.7, HQ)
    handle = model.blocks[0].video_ff.fc1.register_forward_hook(lambda module, args, out: out * 2)
    with pytest.warns(GraphMissWarning, match=r"hooks: \(\('blocks.0.video_ff.fc1', \(\), \(\d+,\)\),\) "
                                              r"\(cached: \(\)\)"):
        out = executor.run(video, audio, 0.7, HQ)
    _assert_equal_to_eager(out, model, conditioning, video, audio, 0.7, HQ)
    handle.remove()
    executor.run(video, audio, 0.7, HQ)  # the hook-free graphs again
    assert executor.stats.captures == 6
    strict = _executor(model, miss_policy="strict")
    strict.warmup(HQ, video, audio, conditioning=conditioning)
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda module, args: None)
    try:
        with pytest.raises(GraphMissError, match=r"hooks: \(\('\*', \(\d+,\), \(\)\),\)"):
            strict.run(video, audio, 0.7, HQ)
    finally:
        handle.remove()


def test_torch_kernel_settings_are_part_of_the_key(fake_graphs):
    """With attention backend "auto" the process-wide SDPA switches pick the kernel a capture bakes in."""
    model, conditioning, video, audio = _setup()
    executor = _executor(model, miss_policy="strict")
    executor.warmup(HQ, video, audio, conditioning=conditioning)
    flash = torch.backends.cuda.flash_sdp_enabled()
    torch.backends.cuda.enable_flash_sdp(not flash)
    try:
        with pytest.raises(GraphMissError, match=f"torch.sdp_flash: {not flash} \\(cached: {flash}\\)"):
            executor.run(video, audio, 0.7, HQ)
    finally:
        torch.backends.cuda.enable_flash_sdp(flash)
    matmul = torch.backends.cuda.matmul
    precision = matmul.fp32_precision
    matmul.fp32_precision = "tf32"  # the new TF32 API: the legacy allow_tf32 getter would raise now
    try:
        with pytest.raises(GraphMissError, match="torch.matmul_fp32_precision: 'tf32'"):
            executor.run(video, audio, 0.7, HQ)
    finally:
        matmul.fp32_precision = precision
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(not deterministic)
    try:
        with pytest.raises(GraphMissError, match=f"torch.deterministic: {not deterministic}"):
            executor.run(video, audio, 0.7, HQ)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    executor.run(video, audio, 0.7, HQ)


def test_a_swapped_module_recaptures_and_matches_the_new_model(fake_graphs):
    """A module replaced after capture (an adapter, a new head) is a weights change, not a stale replay."""
    import copy

    model, conditioning, video, audio = _setup(fresh=True)
    executor = _executor(model)
    executor.set_conditioning(conditioning)
    executor.run(video, audio, 0.7, HQ)
    head = copy.deepcopy(model.video_out)
    with torch.no_grad():
        head.weight.mul_(-1.0)
    model.video_out = head
    with pytest.warns(GraphMissWarning, match="weights changed"):
        out = executor.run(video, audio, 0.7, HQ)
    assert executor.stats.captures == 6 and executor.stats.graphs == 3
    expected = _eager(model, conditioning, video, audio, 0.7, HQ)
    assert torch.equal(out["cond"].video, expected["cond"].video)


def test_a_module_class_changed_in_place_recaptures(fake_graphs):
    """Same module objects, same weights, another class (or a `forward` set on the instance): the graph runs other
    code, so the key misses and the recapture matches the model as it is now."""
    model, conditioning, video, audio = _setup(fresh=True)
    executor = _executor(model)
    executor.set_conditioning(conditioning)
    executor.run(video, audio, 0.7, (COND,))

    class Negated(nn.Linear):
        def forward(self, x):
            return -super().forward(x)

    model.video_out.__class__ = Negated
    with pytest.warns(GraphMissWarning, match="module_code"):
        out = executor.run(video, audio, 0.7, (COND,))
    assert executor.stats.captures == 2
    assert torch.equal(out["cond"].video, _eager(model, conditioning, video, audio, 0.7, (COND,))["cond"].video)
    model.audio_out.forward = lambda x: torch.zeros(*x.shape[:-1], model.audio_out.out_features, dtype=x.dtype)
    out = executor.run(video, audio, 0.7, (COND,))  # (the executor warns about misses once)
    assert executor.stats.captures == 3 and not out["cond"].audio.any()


@pytest.mark.filterwarnings("ignore::graphs.errors.GraphMissWarning")
def test_a_swapped_block_is_compiled_too(fake_graphs, monkeypatch):
    """The compiled regions sit on the block objects: a block swapped in after capture gets them at the
    recapture (it ran uncompiled under a compiled graph's key). Dynamo's eager backend, so no inductor build."""
    import contextlib
    import copy
    import functools

    import torch._dynamo

    from graphs.compile import CompiledBlocks, find_blocks

    monkeypatch.setattr(graphs.executor, "CompiledBlocks", functools.partial(CompiledBlocks, backend="eager"))
    torch._dynamo.reset()
    model, conditioning, video, audio = _setup(fresh=True)
    executor = GraphExecutor(model, miss_policy="capture", compile="default", warmup_iters=1, progress=None)
    executor.set_conditioning(conditioning)
    executor.run(video, audio, 0.7, (COND,))
    executor.run(video, audio, 0.5, (COND,))  # the key (module code included) is stable across compiled runs
    assert executor.stats.captures == 1
    compiles = executor.stats.compiles
    model.blocks[1] = copy.deepcopy(model.blocks[1])
    calls = []
    regions = type(model.blocks[1]).compile_regions
    original = CompiledBlocks._installed

    @contextlib.contextmanager
    def installed(self):
        with original(self):
            calls.append(all(set(regions) <= set(vars(b)) for b in find_blocks(model)))
            yield

    monkeypatch.setattr(CompiledBlocks, "_installed", installed)
    executor.run(video, audio, 0.7, (COND,))
    assert calls and all(calls)  # every block of the model, the new one included, ran its compiled regions
    assert executor.stats.captures == 2 and executor.stats.compiles >= compiles

    monkeypatch.setattr(CompiledBlocks, "_installed", original)

    class Subclass(type(model.blocks[0])):  # every block's class changed in place: the old class's compiled code
        pass  # would still sit on the same block objects

    for block in model.blocks:
        block.__class__ = Subclass
    executor.run(video, audio, 0.7, (COND,))
    assert executor.stats.captures == 3 and executor._blocks.block_class is Subclass

    class Wrapped(Subclass):  # a block of another class (a wrapper): one compiled class no longer fits
        pass

    wrapped = copy.deepcopy(model.blocks[0])
    wrapped.__class__ = Wrapped
    model.blocks[0] = wrapped
    with pytest.raises(CaptureError, match="must share one class.*use compile=False"):
        executor.run(video, audio, 0.7, (COND,))
    torch._dynamo.reset()


# --------------------------------------------------------------------------- the rest of the API


def test_replay_only_needs_a_run_and_a_known_spec(fake_graphs):
    model, conditioning, video, audio = _setup()
    executor = _executor(model)
    with pytest.raises(GraphMissError, match="no run"):
        executor.replay_only(COND)
    executor.warmup((COND,), video, audio, conditioning=conditioning)
    assert executor.pass_graph(COND).key.pass_name == "cond"
    with pytest.raises(GraphMissError, match="pass: 'neg'"):
        executor.replay_only(NEG)
    with pytest.raises(ValueError, match="spec must be a PassSpec"):
        executor.replay_only("cond")


def test_stats_and_reset(fake_graphs):
    model, conditioning, video, audio = _setup()
    executor = _executor(model)
    executor.warmup(HQ, video, audio, conditioning=conditioning)
    stats = executor.stats
    assert isinstance(stats, GraphStats) and stats.graphs == 3 and stats.static_bytes > 0
    assert "3 graph(s), 3 capture(s)" in str(stats) and "pool 0.0 MiB" in str(stats)
    executor.reset()
    assert executor.stats.graphs == 0 and executor.keys() == ()
    assert executor.stats.static_bytes == 0 and executor.stats.pool_bytes == 0  # everything given back
    executor.run(video, audio, 0.5, HQ)
    assert executor.stats.graphs == 3


def test_not_reentrant_from_inside_a_pass(fake_graphs):
    model, conditioning, video, audio = _setup()
    executor = _executor(model)
    executor.set_conditioning(conditioning)
    seen: list[BaseException] = []

    def hook(module, args):
        try:
            executor.run(video, audio, 0.5, (COND,))
        except RuntimeError as e:
            seen.append(e)

    handle = model.register_forward_pre_hook(hook)
    try:
        executor.run(video, audio, 0.5, (COND,))
    finally:
        handle.remove()
    assert seen and "not re-entrant" in str(seen[0])


def test_not_reentrant_across_threads(fake_graphs):
    model, conditioning, video, audio = _setup()
    executor = _executor(model)
    executor.set_conditioning(conditioning)
    inside, release = threading.Event(), threading.Event()

    def hook(module, args):
        inside.set()
        release.wait(timeout=30)

    handle = model.register_forward_pre_hook(hook)
    worker = threading.Thread(target=executor.run, args=(video, audio, 0.5, (COND,)))
    worker.start()
    try:
        assert inside.wait(timeout=30)
        with pytest.raises(RuntimeError, match="not re-entrant"):
            executor.run(video, audio, 0.5, (COND,))
        with pytest.raises(RuntimeError, match="not re-entrant"):
            executor.set_conditioning(conditioning)
    finally:
        release.set()
        worker.join()
        handle.remove()
    with pytest.warns(GraphMissWarning, match="hooks"):  # usable again once the other call is done; the graph
        executor.run(video, audio, 0.5, (COND,))  # captured with the blocking hook is not reused without it


def test_run_reads_no_tensor_data_on_the_host(fake_graphs):
    """The executor's own host work (keys, weights state, static copies) makes no host-sync op."""
    model, conditioning, video, audio = _setup()
    executor = _executor(model)
    executor.warmup((COND,), video, audio, conditioning=conditioning)
    with detect_host_syncs(mode="raise"):
        executor.set_conditioning(conditioning)
        executor.run(video, audio, 0.5, (COND,))
        executor.replay_only(COND)


@pytest.mark.filterwarnings("ignore::graphs.errors.GraphMissWarning")
def test_loop_with_stand_in_graphs_equals_eager(fake_graphs):
    """The stage-1 + stage-2 loop through the executor (static inputs, casts, held outputs, a second shape)
    equals the eager loop exactly; on a GPU the same holds with real graphs (test_graphs_gpu.py)."""
    from pipeline.denoise import denoise_stage1, denoise_stage2

    model, conditioning, video, audio = _setup()
    grid2 = LatentGrid.from_tokens(48, audio_tokens=GRID.audio_tokens)
    conditioning2 = make_conditioning(model.config, grid2, device="cpu")

    def loop(executor):
        s1 = denoise_stage1(executor, conditioning, video, audio, seed=3, steps=2, guidance="hq", quiet=True)
        video2 = s1.video.repeat(1, 2, 1)  # any [1, 48, C] stage-2 input
        s2 = denoise_stage2(executor, conditioning2, video2, s1.audio, seed=3, quiet=True)
        return s1.video, s1.audio, s2.video

    executor = _executor(model)
    for ours, eager in zip(loop(executor), loop(EagerExecutor(model))):
        assert torch.equal(ours, eager)
    assert executor.stats.captures == 4 and executor.stats.eager_passes == 0


@pytest.mark.filterwarnings("ignore::graphs.errors.GraphMissWarning")
def test_a_consumer_refuses_kv_held_by_another_graph_of_its_text(fake_graphs):
    """Two graph sets of one text (a torch switch flipped between runs): after the old cond replays, the new
    modality must not read the new cond's held K/V, which the old cond's replay may have overwritten."""
    model, conditioning, video, audio = _setup()
    executor = _executor(model)
    executor.set_conditioning(conditioning)
    flash = torch.backends.cuda.flash_sdp_enabled()
    executor.run(video, audio, 0.7, HQ)  # graphs of setting X: neg, cond(X), modality(X)
    torch.backends.cuda.enable_flash_sdp(not flash)
    try:
        executor.run(video, audio, 0.7, HQ)  # graphs of setting Y, captured after X's
        torch.backends.cuda.enable_flash_sdp(flash)
        executor.replay_only(COND)  # cond(X) now holds the positive K/V
        torch.backends.cuda.enable_flash_sdp(not flash)
        with pytest.raises(GraphMissError, match="replay cond first"):
            executor.replay_only(MODALITY)  # modality(Y) reads cond(Y)'s
    finally:
        torch.backends.cuda.enable_flash_sdp(flash)


def test_eager_fallback_follows_set_conditioning():
    """A CPU model runs every pass eagerly under miss_policy="eager"; new conditioning must reach those passes."""
    model, conditioning, video, audio = _setup()
    executor = GraphExecutor(model, miss_policy="eager", progress=None)
    executor.set_conditioning(conditioning)
    with pytest.warns(Warning):
        executor.run(video, audio, 0.5, (COND,))
    other = make_conditioning(model.config, GRID, device="cpu", seed=42)
    executor.set_conditioning(other)
    out = executor.run(video, audio, 0.5, (COND,))
    assert torch.equal(out["cond"].video, _eager(model, other, video, audio, 0.5, (COND,))["cond"].video)

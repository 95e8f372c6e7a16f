"""The diffusers adapter: diffusers' LTX-2.3 transformer with our weights and our forward signature gives our
model's output for every pass it can express (float32, CPU, relative error < 1e-5), refuses the ones it cannot,
and runs under the same pass executors (eager here; per-pass graphs on a GPU)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from graphs.diffusers_adapter import (  # noqa: E402
    DiffusersPassModel,
    diffusers_pass_kwargs,
    from_ltx2,
    peer_from_state,
    stage_to_cpu,
)
from pipeline.config import LatentGrid, ModelConfig  # noqa: E402
from pipeline.executor import Conditioning, EagerExecutor, TextContext  # noqa: E402
from pipeline.model import build_model  # noqa: E402
from pipeline.passes import PassSpec  # noqa: E402
from pipeline.rope import build_rope_tables  # noqa: E402

GRID = LatentGrid(frames=3, height=2, width=3, audio_tokens=7, fps=25.0)
TOL = 1e-5
SPECS = {
    "cond": PassSpec("cond"),
    "neg": PassSpec("neg", "negative"),
    "perturbed": PassSpec("perturbed", skip_video_self_attn_blocks=(1,), skip_audio_self_attn_blocks=(1,)),
    "modality": PassSpec("modality", disable_a2v_cross_attn=True, disable_v2a_cross_attn=True),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(scope="module")
def pair():
    config = ModelConfig.preset("tiny")
    ours = build_model(config, device="cpu", dtype=torch.float32, seed=11)
    peer = from_ltx2(ours)
    peer.prepare(GRID)
    return ours, peer


def conditioning(config, device="cpu", dtype=torch.float32, batch=1):
    gen = torch.Generator().manual_seed(3)

    def text():
        return TextContext(torch.randn(batch, 5, config.video_context_dim, generator=gen).to(device, dtype),
                           torch.randn(batch, 5, config.audio_context_dim, generator=gen).to(device, dtype))

    return Conditioning(texts={"positive": text(), "negative": text()},
                        rope=build_rope_tables(config, GRID, device=device))


def latents(config, device="cpu", dtype=torch.float32, batch=1):
    gen = torch.Generator().manual_seed(4)
    return (torch.randn(batch, GRID.num_video_tokens, config.in_channels, generator=gen).to(device, dtype),
            torch.randn(batch, GRID.num_audio_tokens, config.audio_in_channels, generator=gen).to(device, dtype))


def test_every_pass_matches_our_model_through_the_eager_executor(pair):
    ours, peer = pair
    cond = conditioning(ours.config)
    video, audio = latents(ours.config)
    mine, theirs = EagerExecutor(ours), EagerExecutor(peer)
    mine.set_conditioning(cond)
    theirs.set_conditioning(cond)
    with torch.no_grad():
        a = mine.run(video, audio, 0.6, tuple(SPECS.values()))
        b = theirs.run(video, audio, 0.6, tuple(SPECS.values()))
    for name in SPECS:
        assert rel_err(b[name].video, a[name].video) < TOL, name
        assert rel_err(b[name].audio, a[name].audio) < TOL, name
    assert rel_err(a["modality"].video, a["cond"].video) > 1e-3  # the options really change the output


def test_batch_of_two_with_different_sigmas(pair):
    ours, peer = pair
    c = conditioning(ours.config, batch=2)
    video, audio = latents(ours.config, batch=2)
    sigma = torch.tensor([0.2, 0.9])
    args = (video, audio, c.texts["positive"].video, c.texts["positive"].audio, sigma, c.rope)
    with torch.no_grad():
        for v_ours, v_peer in zip(ours(*args), peer(*args)):
            assert rel_err(v_peer, v_ours) < TOL


def test_options_diffusers_cannot_express_are_refused():
    with pytest.raises(ValueError, match="same STG blocks in both streams"):
        diffusers_pass_kwargs(skip_video_self_attn_blocks=(1,), skip_audio_self_attn_blocks=())
    with pytest.raises(ValueError, match="together"):
        diffusers_pass_kwargs(disable_a2v_cross_attn=True)
    assert diffusers_pass_kwargs(skip_video_self_attn_blocks=(2, 1), skip_audio_self_attn_blocks=(1, 2)) == {
        "spatio_temporal_guidance_blocks": [1, 2], "isolate_modalities": False}


def test_forward_needs_prepare_for_the_grid(pair):
    ours, _ = pair
    fresh = from_ltx2(ours)
    video, audio = latents(ours.config)
    c = conditioning(ours.config)
    args = (video, audio, c.texts["positive"].video, c.texts["positive"].audio, torch.tensor([0.5]), c.rope)
    with pytest.raises(ValueError, match="before prepare"):
        fresh(*args)
    fresh.prepare(LatentGrid(frames=1, height=1, width=2, audio_tokens=7))
    with pytest.raises(ValueError, match="call prepare"):
        fresh(*args)


def test_cpu_staged_copy_equals_the_direct_copy(pair):
    ours, peer = pair
    staged = peer_from_state(stage_to_cpu(ours), ours.config, device=torch.device("cpu"), dtype=torch.float32)
    assert isinstance(staged, DiffusersPassModel)
    for (name, p), (_, q) in zip(peer.transformer.named_parameters(), staged.transformer.named_parameters()):
        assert torch.equal(p, q), name


@pytest.mark.cuda
def test_diffusers_through_the_graph_executor_on_gpu():
    """Per-pass CUDA graphs of diffusers' transformer replay what eager computes (bf16, tiny config)."""
    from graphs.executor import GraphExecutor

    config = ModelConfig.preset("tiny")
    ours = build_model(config, device="cuda", dtype=torch.bfloat16, seed=1)
    peer = from_ltx2(ours)
    peer.prepare(GRID)
    cond = conditioning(config, device="cuda", dtype=torch.bfloat16)
    video, audio = latents(config, device="cuda", dtype=torch.bfloat16)
    eager, graphs = EagerExecutor(peer), GraphExecutor(peer, progress=None)
    eager.set_conditioning(cond)
    graphs.warmup(tuple(SPECS.values()), video, audio, conditioning=cond)
    with torch.no_grad():
        outputs = eager.run(video, audio, 0.4, tuple(SPECS.values()))
        expected = {k: (v.video.clone(), v.audio.clone()) for k, v in outputs.items()}
    got = graphs.run(video, audio, 0.4, tuple(SPECS.values()))
    for name in SPECS:  # the same model without compile: replays launch what eager launches
        assert torch.equal(got[name].video, expected[name][0]), name
        assert torch.equal(got[name].audio, expected[name][1]), name


def test_switching_grids_changes_the_graph_key_and_switching_back_restores_it(pair):
    """The current grid's coordinates are buffers, so a graph key (which fingerprints buffer addresses) can
    never match a graph captured for another grid; each grid's coordinates stay alive."""
    from graphs.keys import WeightsProbe

    ours, _ = pair
    peer = from_ltx2(ours)
    probe = WeightsProbe(peer)
    other = LatentGrid(frames=1, height=2, width=9, audio_tokens=7)  # same token count as GRID
    peer.prepare(GRID)
    first = probe()
    peer.prepare(other)
    assert probe() != first
    peer.prepare(GRID)
    assert probe() == first

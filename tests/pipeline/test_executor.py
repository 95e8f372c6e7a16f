"""The eager pass executor: one plain model call per spec, keyed by pass name, validated on the host."""

from fractions import Fraction

import pytest
import torch

from pipeline.config import LatentGrid, ModelConfig
from pipeline.executor import Conditioning, EagerExecutor, PassExecutor, TextContext, Velocity, random_conditioning
from pipeline.model import build_model
from pipeline.passes import PassSpec
from profiling.ranges import recorded_regions
from profiling.syncs import detect_host_syncs

GRID = LatentGrid(frames=2, height=2, width=3, audio_tokens=5)
SPECS = (
    PassSpec("cond"),
    PassSpec("neg", "negative"),
    PassSpec("perturbed", skip_video_self_attn_blocks=(1,), skip_audio_self_attn_blocks=(1,)),
    PassSpec("modality", disable_a2v_cross_attn=True, disable_v2a_cross_attn=True),
)


@pytest.fixture(scope="module")
def tiny():
    config = ModelConfig.preset("tiny")
    model = build_model(config, device="cpu", dtype=torch.float32, seed=0)
    g = torch.Generator().manual_seed(0)
    conditioning = random_conditioning(config, GRID, generator=g, text_tokens=4)
    video = torch.randn(1, GRID.num_video_tokens, config.in_channels, generator=g)
    audio = torch.randn(1, GRID.audio_tokens, config.audio_in_channels, generator=g)
    return model, conditioning, video, audio


def test_runs_every_spec_like_a_direct_call(tiny):
    model, conditioning, video, audio = tiny
    executor = EagerExecutor(model)
    assert isinstance(executor, PassExecutor)
    executor.set_conditioning(conditioning)
    with torch.no_grad():
        out = executor.run(video, audio, 0.625, SPECS)
        assert list(out) == ["cond", "neg", "perturbed", "modality"]
        sigma = torch.full((1,), 0.625)
        for spec in SPECS:
            text = conditioning.texts[spec.text]
            want = model(video, audio, text.video, text.audio, sigma, conditioning.rope, **spec.model_kwargs())
            assert isinstance(out[spec.name], Velocity)
            assert torch.equal(out[spec.name].video, want[0]) and torch.equal(out[spec.name].audio, want[1])
    assert not torch.equal(out["cond"].video, out["modality"].video)  # the options reached the model


def test_batch_one_text_is_expanded(tiny):
    model, conditioning, video, audio = tiny
    executor = EagerExecutor(model)
    executor.set_conditioning(conditioning)
    with torch.no_grad():
        two = executor.run(video.expand(2, -1, -1), audio.expand(2, -1, -1), 0.5, SPECS[:1])
        one = executor.run(video, audio, 0.5, SPECS[:1])
    assert two["cond"].video.shape[0] == 2
    torch.testing.assert_close(two["cond"].video[1:], one["cond"].video)


def test_casts_latents_to_the_model_dtype(tiny):
    _, conditioning, video, audio = tiny
    model = build_model(ModelConfig.preset("tiny"), device="cpu", dtype=torch.bfloat16, seed=0)
    executor = EagerExecutor(model)
    executor.set_conditioning(conditioning)  # float32 texts are cast once here
    with torch.no_grad():
        out = executor.run(video, audio, 0.5, SPECS[:1])
    assert out["cond"].video.dtype == torch.bfloat16


def test_a_model_cast_after_set_conditioning_casts_the_texts_again(tiny):
    """The texts are cast to the model dtype once per stage; a model cast since must not leave them behind (the
    model then refused them as "video_context has dtype float32, expected float64")."""
    _, conditioning, video, audio = tiny
    model = build_model(ModelConfig.preset("tiny"), device="cpu", dtype=torch.float32, seed=0)
    executor = EagerExecutor(model)
    executor.set_conditioning(conditioning)
    with torch.no_grad():
        before = executor.run(video, audio, 0.5, SPECS[:1])["cond"].video
        model.double()
        after = executor.run(video, audio, 0.5, SPECS[:1])["cond"].video
    assert after.dtype == torch.float64
    torch.testing.assert_close(after.float(), before)


def test_no_host_sync_and_pass_regions(tiny):
    model, conditioning, video, audio = tiny
    executor = EagerExecutor(model)
    executor.set_conditioning(conditioning)

    with recorded_regions() as pushed, torch.no_grad(), detect_host_syncs(mode="raise"):
        executor.run(video, audio, 0.3, SPECS)
    assert [n for n in pushed if n.startswith("pass ")] == [f"pass {s.name}" for s in SPECS]


def test_errors(tiny):
    model, conditioning, video, audio = tiny
    executor = EagerExecutor(model)
    with pytest.raises(ValueError, match="before set_conditioning"):
        executor.run(video, audio, 0.5, SPECS)
    with pytest.raises(ValueError, match="Conditioning"):
        executor.set_conditioning({"positive": None})
    with pytest.raises(ValueError, match="key 'neutral'"):
        executor.set_conditioning(Conditioning({"neutral": conditioning.texts["positive"]}, conditioning.rope))
    with pytest.raises(ValueError, match=r"\[B, Nt, D\]"):
        executor.set_conditioning(Conditioning({"positive": TextContext(torch.zeros(4, 32), torch.zeros(1, 4, 16))},
                                               conditioning.rope))
    positive = conditioning.texts["positive"]
    for bad in (TextContext(positive.video[:, :0], positive.audio[:, :0]),  # no tokens: a reshape error deep down
                TextContext(positive.video.long(), positive.audio.long())):  # was silently cast to float
        with pytest.raises(ValueError, match=r"texts\['positive'\]\.video must be a floating \[B, Nt, D\] tensor "
                                             r"with no empty dimension"):
            executor.set_conditioning(Conditioning({"positive": bad}, conditioning.rope))
    rope = conditioning.rope
    on_meta = type(rope)(**{name: tuple(t.to("meta") for t in pair) for name, pair in vars(rope).items()})
    with pytest.raises(ValueError, match="conditioning.rope is on meta, expected the model's device cpu"):
        executor.set_conditioning(Conditioning(conditioning.texts, on_meta))  # was refused only at run
    for name, kwargs in (("text_tokens", dict(text_tokens=0)), ("batch", dict(text_tokens=4, batch=True))):
        with pytest.raises(ValueError, match=f"{name} must be an int >= 1"):
            random_conditioning(model.config, GRID, generator=torch.Generator(), **kwargs)
    executor.set_conditioning(Conditioning({"positive": positive}, conditioning.rope))
    with pytest.raises(ValueError, match="'negative' text"):
        executor.run(video, audio, 0.5, SPECS)
    with pytest.raises(ValueError, match="unique"):
        executor.run(video, audio, 0.5, (SPECS[0], SPECS[0]))
    with pytest.raises(ValueError, match="at least one"):
        executor.run(video, audio, 0.5, ())
    with pytest.raises(ValueError, match=r"sigma must be a float in \[0, 1\], got nan"):
        executor.run(video, audio, float("nan"), SPECS[:1])
    with pytest.raises(ValueError, match="sigma must be a host float"):
        executor.run(video, audio, torch.tensor(0.5), SPECS[:1])
    with pytest.raises(ValueError, match="video must be a tensor, got NoneType"):
        executor.run(None, audio, 0.5, SPECS[:1])
    with pytest.raises(ValueError, match=r"specs must be a sequence of PassSpec"):
        executor.run(video, audio, 0.5, SPECS[0])
    executor.set_conditioning(conditioning)
    with torch.no_grad():  # batch-1 texts serve any latent batch; any host real (a NumPy scalar too) is a sigma
        out = executor.run(torch.cat([video, video]), torch.cat([audio, audio]), Fraction(1, 2), SPECS[:1])
    assert out["cond"].video.shape[0] == 2

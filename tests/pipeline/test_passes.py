"""Pass specs: only the needed passes, in a fixed order, with the right text and skip options."""

import itertools

import pytest

from pipeline.guidance import GuidanceConfig, GuidanceParams
from pipeline.passes import PASS_NAMES, PassSpec, pass_specs_for

KWARG_KEYS = {"skip_video_self_attn_blocks", "skip_audio_self_attn_blocks", "disable_a2v_cross_attn",
              "disable_v2a_cross_attn"}


def test_model_kwargs_are_exactly_the_forward_options():
    spec = PassSpec("perturbed", skip_video_self_attn_blocks=(28,), skip_audio_self_attn_blocks=(28,))
    assert spec.model_kwargs() == {
        "skip_video_self_attn_blocks": (28,),
        "skip_audio_self_attn_blocks": (28,),
        "disable_a2v_cross_attn": False,
        "disable_v2a_cross_attn": False,
    }
    assert set(PassSpec("cond").model_kwargs()) == KWARG_KEYS


def test_specs_are_hashable_and_normalised():
    a = PassSpec("perturbed", skip_video_self_attn_blocks=[3, 1])
    b = PassSpec("perturbed", skip_video_self_attn_blocks=(1, 3))
    assert a == b and hash(a) == hash(b) and a.skip_video_self_attn_blocks == (1, 3)
    assert len({PassSpec("cond"), PassSpec("cond"), PassSpec("neg", "negative")}) == 2
    with pytest.raises(AttributeError):
        a.name = "cond"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"name": "uncond"}, "name"),
        ({"name": "cond", "text": "neutral"}, "text"),
        ({"name": "cond", "skip_video_self_attn_blocks": (-1,)}, "skip_video_self_attn_blocks contains -1"),
        ({"name": "cond", "skip_audio_self_attn_blocks": (2, 2)}, "skip_audio_self_attn_blocks has duplicates"),
        ({"name": "cond", "skip_audio_self_attn_blocks": 2}, "skip_audio_self_attn_blocks must be a non-string"),
        ({"name": "cond", "skip_audio_self_attn_blocks": "12"}, "must be a non-string iterable .* got str '12'"),
        ({"name": "cond", "skip_video_self_attn_blocks": (True,)}, "bools refused.* got an element bool True"),
        ({"name": "cond", "disable_a2v_cross_attn": 1}, "bool"),
    ],
)
def test_spec_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PassSpec(**kwargs)


SCALES = [(1.0, 0.0, 1.0), (3.0, 0.0, 1.0), (1.0, 1.0, 1.0), (1.0, 0.0, 3.0), (3.0, 1.0, 3.0)]


@pytest.mark.parametrize("video,audio", list(itertools.product(SCALES, SCALES)))
def test_only_needed_passes_in_fixed_order(video, audio):
    vp = GuidanceParams(cfg=video[0], stg=video[1], modality=video[2])
    ap = GuidanceParams(cfg=audio[0], stg=audio[1], modality=audio[2])
    specs = pass_specs_for(GuidanceConfig(video=vp, audio=ap, stg_blocks=(28,)))
    names = [s.name for s in specs]
    expected = ["cond"]
    if vp.cfg != 1 or ap.cfg != 1:
        expected.append("neg")
    if vp.stg != 0 or ap.stg != 0:
        expected.append("perturbed")
    if vp.modality != 1 or ap.modality != 1:
        expected.append("modality")
    assert names == expected
    assert names == [n for n in PASS_NAMES if n in names]  # the fixed order
    by_name = {s.name: s for s in specs}
    assert by_name["cond"] == PassSpec("cond", "positive")
    if "neg" in by_name:
        assert by_name["neg"] == PassSpec("neg", "negative")
    if "perturbed" in by_name:
        assert by_name["perturbed"] == PassSpec("perturbed", "positive", (28,), (28,))
    if "modality" in by_name:
        assert by_name["modality"] == PassSpec("modality", "positive", disable_a2v_cross_attn=True,
                                               disable_v2a_cross_attn=True)


def test_rescale_alone_needs_no_pass():
    rescale_only = GuidanceConfig(video=GuidanceParams(rescale=0.7), audio=GuidanceParams())
    assert pass_specs_for(rescale_only) == (PassSpec("cond"),)


def test_stg_without_blocks_is_an_error():
    with pytest.raises(ValueError, match="stg_blocks"):
        GuidanceConfig(video=GuidanceParams(stg=1.0), audio=GuidanceParams())


def test_pass_specs_need_a_guidance_config():
    with pytest.raises(ValueError, match="config must be a GuidanceConfig"):
        pass_specs_for("hq")

"""Static inputs: writes check shape and device (never a silent broadcast), cast like the eager executor,
and the sigma buffer is filled from host floats only."""

from __future__ import annotations

import pytest
import torch

from graphs import trees
from graphs.buffers import StaticInputs, check_like
from pipeline.executor import check_host_float
from pipeline.config import LatentGrid
from pipeline.executor import Conditioning, TextContext
from pipeline.rope import RopeTables
from tests.graphs.helpers import make_conditioning, make_latents, tiny_model


def _static(dtype=torch.bfloat16, batch: int = 1, text_batch: int | None = None):
    model = tiny_model()
    grid = LatentGrid.from_tokens(24, audio_tokens=10)
    conditioning = make_conditioning(model.config, grid, device="cpu", batch=text_batch or batch)
    video, audio = make_latents(model.config, grid, device="cpu", batch=batch)
    return StaticInputs(video, audio, conditioning, dtype, generation=1), conditioning, video, audio


def test_load_casts_like_to_and_fills_sigma():
    static, _, video, audio = _static()
    static.load(video, audio, 0.25)
    assert static.video.dtype == torch.bfloat16
    assert torch.equal(static.video, video.to(torch.bfloat16))  # copy_ casts exactly as .to() does
    assert torch.equal(static.audio, audio.to(torch.bfloat16))
    assert static.sigma.dtype == torch.float32 and static.sigma.tolist() == [0.25]


def test_load_refuses_another_shape_instead_of_broadcasting():
    static, _, video, audio = _static()
    with pytest.raises(ValueError, match=r"video is fp32\[1,1,128\].*captured graph reads bf16\[1,24,128\]"):
        static.load(video[:, :1], audio, 0.5)  # copy_ would broadcast this silently
    with pytest.raises(ValueError, match="audio"):
        static.load(video, audio[:, :5], 0.5)
    with pytest.raises(ValueError, match="video is .* on meta"):
        static.load(torch.empty(video.shape, device="meta"), audio, 0.5)


def test_load_refuses_non_floating_latents():
    static, _, video, audio = _static()
    with pytest.raises(ValueError, match="video"):
        static.load(video.to(torch.int64), audio, 0.5)


@pytest.mark.parametrize("sigma", [torch.tensor(0.5), True, "0.5", None])
def test_sigma_must_be_a_host_float(sigma):
    with pytest.raises(ValueError, match="sigma must be a host float"):
        check_host_float(sigma)


def test_sigma_accepts_python_numbers():
    assert check_host_float(1) == 1.0 and check_host_float(0.5) == 0.5 and check_host_float(0) == 0.0


@pytest.mark.parametrize("sigma", [float("nan"), -0.1, 5.0])
def test_sigma_must_lie_in_the_unit_interval(sigma):
    with pytest.raises(ValueError, match=r"sigma must be a float in \[0, 1\]"):
        check_host_float(sigma)


def test_set_conditioning_copies_texts_in_model_dtype_and_rope_as_is():
    static, conditioning, _, _ = _static()
    for name, text in conditioning.texts.items():
        assert static.texts[name].video is not text.video  # the executor owns its copies
        assert torch.equal(static.texts[name].video, text.video.to(torch.bfloat16))
        assert torch.equal(static.texts[name].audio, text.audio.to(torch.bfloat16))
    assert isinstance(static.rope, RopeTables)
    for ours, theirs in zip(static.rope.tensors(), conditioning.rope.tensors()):
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
    assert static.conditioning_generation == 1


def test_set_conditioning_refuses_a_different_text_shape():
    static, conditioning, _, _ = _static()
    positive = conditioning.texts["positive"]
    bad = Conditioning(
        texts={"positive": TextContext(positive.video[:, :4], positive.audio[:, :4]),
               "negative": conditioning.texts["negative"]},
        rope=conditioning.rope,
    )
    with pytest.raises(ValueError, match=r"conditioning.texts\['positive'\].video"):
        static.set_conditioning(bad, 2)


def test_set_conditioning_refuses_other_text_names():
    static, conditioning, _, _ = _static()
    bad = Conditioning(texts={"positive": conditioning.texts["positive"]}, rope=conditioning.rope)
    with pytest.raises(ValueError, match="static buffers hold"):
        static.set_conditioning(bad, 2)


def test_model_args_expand_a_batch_one_text_context():
    static, _, _, _ = _static(batch=2, text_batch=1)
    video, audio, video_ctx, audio_ctx, sigma, rope = static.model_args("negative")
    assert video_ctx.shape[0] == 2 and video_ctx.data_ptr() == static.texts["negative"].video.data_ptr()
    assert sigma.shape == (2,) and rope is static.rope
    with pytest.raises(ValueError, match="reads text 'other'"):
        static.model_args("other")


def test_nbytes_counts_every_buffer():
    static, _, _, _ = _static()
    expected = sum(t.numel() * t.element_size() for t in
                   [static.video, static.audio, static.sigma, *static.rope.tensors()]
                   + [t for text in static.texts.values() for t in (text.video, text.audio)])
    assert static.nbytes == expected


def test_check_like_names_the_argument():
    with pytest.raises(ValueError, match="latents must be a tensor, got list"):
        check_like("latents", [1.0], torch.zeros(1))


def test_trees_map_keep_structure_and_paths():
    _, conditioning, _, _ = _static()
    paths = [p for p, _ in trees.leaves(conditioning.rope)]
    assert paths[:2] == ["video.0", "video.1"] and len(paths) == 8
    doubled = trees.map_tensors(conditioning.rope, lambda t: t * 2)
    assert isinstance(doubled, RopeTables) and torch.equal(doubled.audio[1], conditioning.rope.audio[1] * 2)
    assert trees.paths_off_device(conditioning.rope, torch.device("cpu")) == []
    assert trees.leaves({"b": 1, "a": (2, None)}) == [("a.0", 2), ("a.1", None), ("b", 1)]

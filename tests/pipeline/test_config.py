"""Config helpers: the strict pixel -> latent grid rule, the one audio-token rule, the one block-index rule."""

import pytest
import torch

from pipeline.config import (
    AUDIO_LATENTS_PER_SECOND,
    PRESET_NAMES,
    LatentGrid,
    ModelConfig,
    audio_tokens_for,
    block_indices,
)

# ---- LatentGrid.from_pixels -------------------------------------------------------------------------------------


@pytest.mark.parametrize("width, height, frames, grid", [
    (960, 544, 121, (16, 17, 30)),
    (768, 512, 121, (16, 16, 24)),
    (128, 128, 17, (3, 4, 4)),  # the CLI's CPU default (graphs/run_workload.py)
    (256, 128, 9, (2, 4, 8)),  # tests/graphs/test_runner.py
    (32, 32, 1, (1, 1, 1)),  # the smallest video: one frame, one latent
])
def test_from_pixels_exact_sizes(width, height, frames, grid):
    g = LatentGrid.from_pixels(width=width, height=height, num_frames=frames)
    assert (g.frames, g.height, g.width) == grid


@pytest.mark.parametrize("kwargs, match", [
    (dict(width=100), r"from_pixels: width must be a positive multiple of 32 .*got 100$"),
    (dict(height=540), r"from_pixels: height must be a positive multiple of 32 .*got 540$"),
    (dict(width=0), "width must be a positive multiple of 32"),
    (dict(height=-32), "height must be a positive multiple of 32"),
    (dict(width=960.0), r"width must be a positive multiple of 32 .*got 960\.0"),
    (dict(width=True), "width must be a positive multiple of 32"),
    (dict(num_frames=120), r"from_pixels: num_frames must be 8k\+1 with k >= 0 .*got 120$"),
    (dict(num_frames=122), r"num_frames must be 8k\+1 .*got 122$"),
    (dict(num_frames=0), r"num_frames must be 8k\+1 .*got 0$"),
    (dict(num_frames=121.0), r"num_frames must be 8k\+1 .*got 121\.0$"),
    (dict(fps=0.0), "fps must be a finite number > 0, got 0.0"),
])
def test_from_pixels_refuses_sizes_the_vae_does_not_produce(kwargs, match):
    """No silent flooring: 100 px used to become 96 px and 120 frames 113."""
    args = dict(width=960, height=544, num_frames=121, fps=24.0) | kwargs
    with pytest.raises(ValueError, match=match):
        LatentGrid.from_pixels(**args)


@pytest.mark.parametrize("field, value, match", [
    ("norm_eps", float("nan"), "norm_eps must be a finite number > 0, got nan"),  # read as an 'eps mismatch'
    ("norm_eps", -1.0, "norm_eps must be a finite number > 0"),  # non-finite outputs, no error
    ("timestep_scale", float("inf"), "timestep_scale must be a finite number > 0"),
    ("rope_theta", 0, "rope_theta must be a finite number > 0"),  # degenerate RoPE tables, no error
    ("cross_attn_gate_scale", True, "cross_attn_gate_scale must be a finite number > 0"),
    ("vae_scale_factors", (0, 0, 0), r"vae_scale_factors must be 3 positive ints \(t, h, w\), got \(0, 0, 0\)"),
    ("video_max_pos", (20, 2048), "video_max_pos must be 3 positive ints"),
    ("audio_hop_length", 0, "audio_hop_length must be a positive int"),
    ("causal_offset", -1, "causal_offset must be an int >= 0"),
    ("num_layers", 2.0, "num_layers must be a positive int"),
    # The prompt AdaLN shifts and scales the context with stream-width rows: any other width failed in every
    # forward with a bare size mismatch, and the diffusers export took it as the cross-attention RoPE width.
    ("video_context_dim", 40, r"video_context_dim must equal the video width video_heads x video_head_dim = 32 "),
    ("audio_context_dim", 24, r"audio_context_dim must equal the audio width audio_heads x audio_head_dim = 16 "),
])
def test_model_config_refuses_values_that_run_into_nonsense(field, value, match):
    with pytest.raises(ValueError, match=f"ModelConfig.{match}"):
        ModelConfig.preset("tiny").replace(**{field: value})
    assert ModelConfig.preset("tiny").replace(causal_offset=0).causal_offset == 0


@pytest.mark.parametrize("make, match", [
    (lambda: LatentGrid(frames=1, height=1, width=1, audio_tokens=1, fps=float("inf")),
     "LatentGrid.fps must be a finite number > 0, got inf"),  # every frame at time 0 in the RoPE tables
    (lambda: LatentGrid.from_pixels(width=128, height=128, num_frames=17, fps=float("inf")), "fps must be a finite"),
    (lambda: LatentGrid.from_tokens(True), "num_video_tokens must be a positive int, got True"),
])
def test_latent_grid_refuses_infinite_fps_and_bool_sizes(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ---- audio tokens -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_audio_latents_per_second_matches_the_model_config(name):
    """The one constant equals what the audio fields give (16 kHz / hop 160 / audio VAE 4x) in every preset."""
    c = ModelConfig.preset(name)
    assert c.audio_sampling_rate / c.audio_hop_length / c.audio_scale_factor == AUDIO_LATENTS_PER_SECOND == 25


def test_from_pixels_and_from_tokens_share_the_audio_rule():
    assert audio_tokens_for(121, 24.0) == 126 and audio_tokens_for(1, 24.0) == 1 and audio_tokens_for(121, 25) == 121
    for fps in (24.0, 25.0, 30.0):
        pixels = LatentGrid.from_pixels(width=384, height=256, num_frames=121, fps=fps)
        tokens = LatentGrid.from_tokens(pixels.num_video_tokens, fps=fps)  # 1536: 16 latent frames = 121 frames
        assert pixels.audio_tokens == tokens.audio_tokens == audio_tokens_for(121, fps)
    with pytest.raises(ValueError, match="fps must be a finite number > 0, got 0"):
        LatentGrid.from_tokens(1536, fps=0)


# ---- block indices ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [(1, 0), [1, 0], {0, 1}, frozenset({0, 1}), range(2), iter([1, 0]),
                                   {1: "a", 0: "b"}])
def test_block_indices_accepts_any_iterable_of_ints(value):
    assert block_indices(value, "blocks") == (0, 1)
    assert block_indices((), "blocks", num_layers=2) == ()


def test_block_indices_takes_numpy_ints_as_ints():
    np = pytest.importorskip("numpy")
    blocks = block_indices(np.arange(2, 4), "blocks", num_layers=4)
    assert blocks == (2, 3) and all(type(b) is int for b in blocks)  # hashable, and equal in graph keys


@pytest.mark.parametrize("value, num_layers, match", [
    (2, None, r"^blocks must be a non-string iterable \(tuple, list, set, frozenset, range, \.\.\.\) of ints, "
              r"bools refused, got int 2$"),
    ("12", None, "must be a non-string iterable .* got str '12'$"),
    (b"\x01", None, "must be a non-string iterable .* got bytes"),
    (None, None, "got NoneType None$"),
    (torch.tensor(1), None, "must be a non-string iterable .* got Tensor$"),  # 0-d: not iterable
    ((True,), None, "bools refused, got an element bool True$"),
    ((1.0,), None, "got an element float 1.0$"),
    ((torch.tensor(1),), None, "got an element Tensor$"),  # named by its type: its value is never read
    ((-1,), None, r"^blocks contains -1; expected block indices >= 0$"),
    ((0, 2), 2, r"^blocks contains 2; expected block indices in \[0, 1\]$"),
    ((1, 1), None, r"^blocks has duplicates: \[1, 1\]; expected each block at most once$"),
])
def test_block_indices_refusals_name_the_argument_and_the_accepted_values(value, num_layers, match):
    with pytest.raises(ValueError, match=match):
        block_indices(value, "blocks", num_layers=num_layers)

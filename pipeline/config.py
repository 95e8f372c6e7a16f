"""Model configuration (`ModelConfig`, named presets) and the latent grid a generation runs on (`LatentGrid`).

Both are frozen, hashable dataclasses: anything that changes a captured graph (widths, depth, token counts) is a
field, so it can be part of a graph key. Presets are plain data.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

PRESET_NAMES = ("tiny", "small", "ltx2.3")
# Audio latents per second of video: 16 kHz audio, mel hop 160, audio VAE 4x (ModelConfig's audio_sampling_rate /
# audio_hop_length / audio_scale_factor, the same in every preset; a test pins the two together).
AUDIO_LATENTS_PER_SECOND = 25


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of an LTX-2.3 audio-video transformer.

    The LTX-2.3 features are always on (gated attention, 9-row cross-attention AdaLN, the sigma-driven prompt
    AdaLN, split RoPE, cross-modality timesteps); only sizes vary between presets. Text context arrives after
    the text connector at the stream widths, which the prompt AdaLN needs (it shifts and scales the context with
    stream-width rows): `video_context_dim` / `audio_context_dim` must equal `video_dim` / `audio_dim`.
    """

    num_layers: int = 48
    video_heads: int = 32
    video_head_dim: int = 128
    audio_heads: int = 32
    audio_head_dim: int = 64
    in_channels: int = 128  # video latent channels (in and out)
    audio_in_channels: int = 128  # audio latent channels (in and out)
    video_context_dim: int = 4096
    audio_context_dim: int = 2048
    ffn_mult: int = 4
    norm_eps: float = 1e-6
    # RoPE ("split" layout, frequencies computed in float64 then cast to float32, as the reference does).
    rope_theta: float = 10000.0
    video_max_pos: tuple[int, int, int] = (20, 2048, 2048)  # (seconds, pixels, pixels)
    audio_max_pos: int = 20  # seconds
    vae_scale_factors: tuple[int, int, int] = (8, 32, 32)  # latent -> pixel (frames, height, width)
    audio_scale_factor: int = 4  # audio latent -> mel frames
    audio_sampling_rate: int = 16000
    audio_hop_length: int = 160
    causal_offset: int = 1
    # sigma -> AdaLN timestep; the A2V/V2A gate AdaLNs see timestep * cross_attn_gate_scale
    # (the reference's cross_attn_timestep_scale_multiplier / timestep_scale_multiplier = 1000 / 1000).
    timestep_scale: float = 1000.0
    cross_attn_gate_scale: float = 1.0

    def __post_init__(self) -> None:
        for name in ("num_layers", "video_heads", "video_head_dim", "audio_heads", "audio_head_dim", "in_channels",
                     "audio_in_channels", "video_context_dim", "audio_context_dim", "ffn_mult"):
            if not _is_positive_int(getattr(self, name)):
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        for name, dim, heads in (("video", self.video_dim, self.video_heads), ("audio", self.audio_dim,
                                                                               self.audio_heads)):
            if getattr(self, f"{name}_head_dim") % 2:
                raise ValueError(f"ModelConfig.{name}_head_dim must be even for split RoPE, "
                                 f"got {getattr(self, f'{name}_head_dim')}")
            if (dim // 2) % heads:
                raise ValueError(f"ModelConfig: {name} RoPE width {dim // 2} must divide into {heads} heads")
        for name, context, dim in (("video", self.video_context_dim, self.video_dim),
                                   ("audio", self.audio_context_dim, self.audio_dim)):
            if context != dim:
                raise ValueError(f"ModelConfig.{name}_context_dim must equal the {name} width {name}_heads x "
                                 f"{name}_head_dim = {dim} (the prompt AdaLN modulates the context at that width), "
                                 f"got {context}")
        # The A2V/V2A RoPE tables are audio-width; the video side splits them over the video heads (as the
        # reference does), so audio_dim / 2 must divide into the video heads too.
        if (self.audio_dim // 2) % self.video_heads:
            raise ValueError(f"ModelConfig: cross-attention RoPE width {self.audio_dim // 2} must divide into "
                             f"video_heads={self.video_heads}")
        for name in ("audio_max_pos", "audio_scale_factor", "audio_sampling_rate", "audio_hop_length"):
            if not _is_positive_int(getattr(self, name)):
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        offset = self.causal_offset
        if not is_int(offset) or offset < 0:
            raise ValueError(f"ModelConfig.causal_offset must be an int >= 0, got {self.causal_offset!r}")
        for name in ("video_max_pos", "vae_scale_factors"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or len(value) != 3 or not all(map(_is_positive_int, value)):
                raise ValueError(f"ModelConfig.{name} must be 3 positive ints (t, h, w), got {value!r}")
        # A NaN or negative eps, or an infinite timestep scale, gave non-finite outputs with no error.
        for name in ("norm_eps", "rope_theta", "timestep_scale", "cross_attn_gate_scale"):
            if not _is_positive_finite(getattr(self, name)):
                raise ValueError(f"ModelConfig.{name} must be a finite number > 0, got {getattr(self, name)!r}")

    @property
    def video_dim(self) -> int:
        return self.video_heads * self.video_head_dim

    @property
    def audio_dim(self) -> int:
        return self.audio_heads * self.audio_head_dim

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        """`tiny` (CPU tests, well under a second), `small` (full widths, 4 layers) or `ltx2.3` (48 layers, ~19B)."""
        if name == "ltx2.3":
            return cls()
        if name == "small":
            return cls(num_layers=4)
        if name == "tiny":
            return cls(num_layers=2, video_heads=2, video_head_dim=16, audio_heads=2, audio_head_dim=8,
                       video_context_dim=32, audio_context_dim=16)
        raise ValueError(f"unknown model preset {name!r}; expected one of {PRESET_NAMES}")

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def audio_tokens_for(num_frames: int, fps: float) -> int:
    """Audio latent tokens that cover `num_frames` pixel frames at `fps` (`AUDIO_LATENTS_PER_SECOND`, at least 1).

    One rule for `LatentGrid.from_pixels` and `LatentGrid.from_tokens`, so a grid built either way from the same
    video length has the same audio length (121 frames at 24 fps -> 126 tokens)."""
    if not _is_positive_finite(fps):
        raise ValueError(f"fps must be a finite number > 0, got {fps!r}")
    return max(1, round(AUDIO_LATENTS_PER_SECOND * num_frames / fps))


def is_int(value: object) -> bool:
    """An int that is not a bool: `bool` subclasses `int`, and `True` given as a size, seed or count is a mistake."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_positive_int(value: object) -> bool:
    return is_int(value) and value > 0


def _is_positive_finite(value: object) -> bool:
    """A real number (not a bool) in (0, inf): NaN and infinities fail."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf


def _shown(value: object) -> str:
    """A plain Python scalar as its repr, anything else by its type (a device tensor is never read)."""
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return f"{type(value).__name__} {value!r}"
    return type(value).__name__


def block_indices(value: object, name: str, *, num_layers: int | None = None) -> tuple[int, ...]:
    """`value` (transformer block indices) as a sorted tuple, or ValueError naming `name`.

    One rule for `PassSpec`, `GuidanceConfig.stg_blocks` and the transformer's forward, so options accepted by
    one are accepted by the others: any non-string iterable (tuple, list, set, frozenset, range, ...) of ints, NumPy
    ints included (returned as ints); bools are refused (True is not block 1), as are negative indices, duplicates and, with `num_layers`, blocks
    past the model's depth. Reads only Python values (an element that is not an int is named by its type, never
    printed), so the forward can call it without synchronising the host. Lives here, below `passes`,
    `guidance` and `model`, because `passes` imports `guidance`."""
    accepted = "a non-string iterable (tuple, list, set, frozenset, range, ...) of ints, bools refused"
    try:
        if isinstance(value, (str, bytes)):
            raise TypeError
        items = tuple(value)  # type: ignore[arg-type]
    except TypeError:  # not iterable (an int, a 0-d tensor, ...) or a string
        raise ValueError(f"{name} must be {accepted}, got {_shown(value)}") from None
    expected = "block indices >= 0" if num_layers is None else f"block indices in [0, {num_layers - 1}]"
    for b in items:  # NumPy's ints are Integral too; a tensor is not (reading it would be a host sync)
        if isinstance(b, bool) or not isinstance(b, numbers.Integral):
            raise ValueError(f"{name} must be {accepted}, got an element {_shown(b)}")
    blocks = tuple(map(int, items))
    for b in blocks:
        if b < 0 or (num_layers is not None and b >= num_layers):
            raise ValueError(f"{name} contains {b}; expected {expected}")
    if len(set(blocks)) != len(blocks):
        raise ValueError(f"{name} has duplicates: {sorted(blocks)}; expected each block at most once")
    return tuple(sorted(blocks))


# Token counts the benchmarks use, factorised the way the real resolutions are (frames x height x width latents).
_KNOWN_FACTORISATIONS = {
    1536: (16, 8, 12),  # 384x256x121 (stage 1 of the 768x512 two-stage pipeline)
    6144: (16, 16, 24),  # 768x512x121
    8160: (16, 17, 30),  # 960x544x121 (HQ stage 1)
    32640: (16, 34, 60),  # 1920x1088x121 (HQ stage 2)
}


@dataclass(frozen=True)
class LatentGrid:
    """The latent token grid of one generation: video (frames x height x width latents) plus audio tokens."""

    frames: int
    height: int
    width: int
    audio_tokens: int
    fps: float = 24.0

    def __post_init__(self) -> None:
        for name in ("frames", "height", "width", "audio_tokens"):
            if not _is_positive_int(getattr(self, name)):
                raise ValueError(f"LatentGrid.{name} must be a positive int, got {getattr(self, name)!r}")
        if not _is_positive_finite(self.fps):  # an infinite fps put every frame at time 0 in the RoPE tables
            raise ValueError(f"LatentGrid.fps must be a finite number > 0, got {self.fps!r}")

    @property
    def num_video_tokens(self) -> int:
        return self.frames * self.height * self.width

    @property
    def num_audio_tokens(self) -> int:
        return self.audio_tokens

    @classmethod
    def from_pixels(cls, *, width: int, height: int, num_frames: int, fps: float = 24.0) -> LatentGrid:
        """Latent grid of a `width` x `height` x `num_frames` video (8x temporal, 32x spatial VAE; audio tokens from
        `audio_tokens_for`).

        Why strict: LTX-2.3 videos are multiples of 32 pixels and 8k+1 frames (the VAE's strides); rounding other
        sizes down here would silently give the grid of a different video than the one asked for."""
        for name, value in (("width", width), ("height", height)):
            if not is_int(value) or value < 32 or value % 32:
                raise ValueError(f"from_pixels: {name} must be a positive multiple of 32 (the VAE's spatial "
                                 f"stride), got {value!r}")
        if not is_int(num_frames) or num_frames < 1 or (num_frames - 1) % 8:
            raise ValueError(f"from_pixels: num_frames must be 8k+1 with k >= 0 (1, 9, 17, ..., 121: the VAE's "
                             f"temporal stride is 8 after the first frame), got {num_frames!r}")
        return cls(frames=(num_frames - 1) // 8 + 1, height=height // 32, width=width // 32,
                   audio_tokens=audio_tokens_for(num_frames, fps), fps=float(fps))

    @classmethod
    def from_tokens(cls, num_video_tokens: int, *, audio_tokens: int | None = None, fps: float = 24.0) -> LatentGrid:
        """A plausible grid with exactly `num_video_tokens` video tokens (for benchmarks).

        Known sizes use the real factorisation (1536 = 16x8x12, 8160 = 16x17x30, ...); others pick the largest
        frame count in (16, 8, 4, 2, 1) that divides, then the most square height x width. Audio tokens default to
        what that many latent frames give at `fps` (16 frames -> 121 pixel frames -> 126 audio tokens).
        """
        if not _is_positive_int(num_video_tokens):
            raise ValueError(f"num_video_tokens must be a positive int, got {num_video_tokens!r}")
        if num_video_tokens in _KNOWN_FACTORISATIONS:
            frames, height, width = _KNOWN_FACTORISATIONS[num_video_tokens]
        else:
            frames = next(f for f in (16, 8, 4, 2, 1) if num_video_tokens % f == 0)
            rest = num_video_tokens // frames
            height = max(d for d in range(1, math.isqrt(rest) + 1) if rest % d == 0)
            width = rest // height
        if audio_tokens is None:
            audio_tokens = audio_tokens_for((frames - 1) * 8 + 1, fps)
        return cls(frames=frames, height=height, width=width, audio_tokens=audio_tokens, fps=float(fps))

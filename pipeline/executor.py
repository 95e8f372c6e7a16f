"""The pass-executor seam between the denoising loop and however the transformer actually runs.

The loop hands an executor the current latents, a HOST float sigma and the pass specs of one evaluation,
and gets back one velocity pair per pass. It never knows whether the passes run eagerly (`EagerExecutor`,
here), compiled, or as replayed CUDA graphs (the graph executor, one layer up): any object with the
`PassExecutor` methods drops in without changing the loop.

Contract every executor keeps:
- `set_conditioning` is called once per stage (text contexts + RoPE tables); `run` many times.
- `run` receives the latents in the loop's state dtype (e.g. float32) and casts them to the model dtype
  itself; `sigma` is a Python float that becomes a float32 device tensor [B] without a host sync.
- The returned velocities stay valid until the next `run` call (the loop reads them before calling again).
- Nothing in `run` synchronises the host.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor

from pipeline.config import is_int
from pipeline.passes import TEXT_KEYS, PassSpec
from pipeline.rope import RopeTables, build_rope_tables
from profiling.ranges import region

if TYPE_CHECKING:
    from pipeline.config import LatentGrid, ModelConfig
    from pipeline.model import LTX2Transformer


@dataclass(frozen=True, eq=False)
class TextContext:
    """One prompt's text conditioning after the connector: video [B, Nt, Dv] and audio [B, Nt, Da]."""

    video: Tensor
    audio: Tensor


@dataclass(frozen=True, eq=False)
class Conditioning:
    """Everything fixed for a stage: the prompts' text contexts (keys "positive", "negative") and RoPE."""

    texts: Mapping[str, TextContext]
    rope: RopeTables


def random_conditioning(
    config: ModelConfig,
    grid: LatentGrid,
    *,
    generator: torch.Generator,
    text_tokens: int,
    batch: int = 1,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Conditioning:
    """Seeded random positive and negative text contexts plus the grid's RoPE tables (built once, outside forward).

    There is no text encoder in this project: a context is random, with the widths the transformer sees after
    the text connector. Drawn from `generator` (a CPU generator, so one seed gives the same inputs on every
    device) in a fixed order - positive video, positive audio, negative video, negative audio - then moved to
    `device` in `dtype`.
    """

    for name, value in (("text_tokens", text_tokens), ("batch", batch)):
        if not is_int(value) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    texts = {
        key: TextContext(
            randn(batch, text_tokens, config.video_context_dim),  # [B, Nt, Dv_ctx]
            randn(batch, text_tokens, config.audio_context_dim),  # [B, Nt, Da_ctx]
        )
        for key in TEXT_KEYS
    }
    return Conditioning(texts=texts, rope=build_rope_tables(config, grid, device=device, batch_size=batch))


class Velocity(NamedTuple):
    """One pass's model output: video [B, Nv, C] and audio [B, Na, C] velocities (model dtype)."""

    video: Tensor
    audio: Tensor


@runtime_checkable
class PassExecutor(Protocol):
    """Runs guidance passes for the loop. See the module docstring for the contract."""

    def set_conditioning(self, conditioning: Conditioning) -> None: ...

    def run(self, video: Tensor, audio: Tensor, sigma: float, specs: Sequence[PassSpec]) -> dict[str, Velocity]: ...


def check_host_float(sigma: object) -> float:
    """`sigma` as a Python float in [0, 1]; any host real number is taken (a NumPy scalar too), a tensor is refused
    because reading it would synchronise the host."""
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real):
        raise ValueError(
            f"sigma must be a host float (the schedule is Python numbers), got {type(sigma).__name__}; "
            "a device tensor here would need a host sync to read"
        )
    if not 0.0 <= sigma <= 1.0:  # also refuses NaN
        raise ValueError(f"sigma must be a float in [0, 1], got {sigma!r}")
    return float(sigma)


def validate_conditioning(conditioning: Conditioning) -> None:
    """Host checks of a `Conditioning` (types, keys, ranks, matching batch and device); metadata only."""
    if not isinstance(conditioning, Conditioning):
        raise ValueError(f"conditioning must be a Conditioning, got {type(conditioning).__name__}")
    texts = conditioning.texts
    if not isinstance(conditioning.rope, RopeTables):
        raise ValueError(f"conditioning.rope must be RopeTables (pipeline.rope.build_rope_tables), got "
                         f"{type(conditioning.rope).__name__}")
    if not isinstance(texts, Mapping) or not texts:
        raise ValueError(f"conditioning.texts must be a non-empty mapping, got {texts!r}")
    for key, text in texts.items():
        if key not in TEXT_KEYS:
            raise ValueError(f"conditioning.texts has key {key!r}; expected keys among {TEXT_KEYS}")
        if not isinstance(text, TextContext):
            raise ValueError(f"conditioning.texts[{key!r}] must be a TextContext, got {type(text).__name__}")
        for field in ("video", "audio"):
            t = getattr(text, field)
            if not isinstance(t, Tensor) or t.ndim != 3 or not t.dtype.is_floating_point or 0 in t.shape:
                got = f"{t.dtype} {list(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"conditioning.texts[{key!r}].{field} must be a floating [B, Nt, D] tensor with "
                                 f"no empty dimension (at least one text token), got {got}")
        if text.video.shape[0] != text.audio.shape[0] or text.video.device != text.audio.device:
            raise ValueError(
                f"conditioning.texts[{key!r}]: video and audio contexts disagree (batch {text.video.shape[0]} "
                f"vs {text.audio.shape[0]}, device {text.video.device} vs {text.audio.device})"
            )


class EagerExecutor:
    """`PassExecutor` with plain model calls, one per spec, in the specs' order. Never synchronises the host."""

    def __init__(self, model: LTX2Transformer):
        self.model = model
        self._given: Conditioning | None = None  # as set_conditioning received it
        self._conditioning: Conditioning | None = None  # its texts in the model's dtype

    def set_conditioning(self, conditioning: Conditioning) -> None:
        validate_conditioning(conditioning)
        device = self.model.device
        placed = [(f"texts[{key!r}]", text.video.device) for key, text in conditioning.texts.items()]
        for name, where in [*placed, ("rope", conditioning.rope.device)]:
            if where != device:
                raise ValueError(f"conditioning.{name} is on {where}, expected the model's device {device}")
        self._given, self._conditioning = conditioning, None

    def _in_model_dtype(self) -> Conditioning:
        """The texts cast to the model dtype once per stage, not once per pass (again if the model was cast since)."""
        if self._given is None:
            raise ValueError("EagerExecutor.run called before set_conditioning(conditioning)")
        dtype = self.model.dtype
        if self._conditioning is None or next(iter(self._conditioning.texts.values())).video.dtype != dtype:
            texts = {k: TextContext(t.video.to(dtype), t.audio.to(dtype)) for k, t in self._given.texts.items()}
            self._conditioning = Conditioning(texts=texts, rope=self._given.rope)
        return self._conditioning

    def run(self, video: Tensor, audio: Tensor, sigma: float, specs: Sequence[PassSpec]) -> dict[str, Velocity]:
        conditioning = self._in_model_dtype()
        specs = check_specs(specs, conditioning)
        check_latents(video, audio, self.model.device, conditioning)
        b = video.shape[0]
        dtype = self.model.dtype
        video_in, audio_in = video.to(dtype), audio.to(dtype)
        sigma_t = torch.full((b,), check_host_float(sigma), dtype=torch.float32, device=video.device)  # no host read
        out: dict[str, Velocity] = {}
        for spec in specs:
            text = conditioning.texts[spec.text]
            with region(f"pass {spec.name}"):
                v, a = self.model(
                    video_in,
                    audio_in,
                    _batch(text.video, b),
                    _batch(text.audio, b),
                    sigma_t,
                    conditioning.rope,
                    **spec.model_kwargs(),
                )
            out[spec.name] = Velocity(v, a)
        return out


def check_specs(specs: Sequence[PassSpec], conditioning: Conditioning) -> tuple[PassSpec, ...]:
    """Host checks of one evaluation's specs: a sequence of PassSpecs, non-empty, unique names, their texts
    present. Returns them as a tuple."""
    if not isinstance(specs, Sequence):  # a bare PassSpec (a frozen dataclass) is not one
        raise ValueError(f"specs must be a sequence of PassSpec (e.g. (COND,)), got {type(specs).__name__}")
    specs = tuple(specs)
    if not specs:
        raise ValueError("specs must name at least one pass, got none")
    names = [s.name for s in specs if isinstance(s, PassSpec)]
    if len(names) != len(specs):
        raise ValueError(f"specs must all be PassSpec, got {[type(s).__name__ for s in specs]}")
    if len(set(names)) != len(names):
        raise ValueError(f"pass names must be unique within one evaluation, got {names}")
    for spec in specs:
        if spec.text not in conditioning.texts:
            raise ValueError(
                f"pass {spec.name!r} reads the {spec.text!r} text, but the conditioning only has "
                f"{sorted(conditioning.texts)}"
            )
    return specs


def check_latents(video: Tensor, audio: Tensor, device: torch.device, conditioning: Conditioning, *,
                  device_is: str = "the model's device") -> None:
    """Host checks of one evaluation's latents: floating [B, N, C] tensors on `device` (`device_is` says what it
    is, for the error), one batch B for both, and every text context of `conditioning` with batch 1 (shared) or
    B. Metadata only."""
    for name, t in (("video", video), ("audio", audio)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 3 or not t.dtype.is_floating_point or 0 in t.shape:
            raise ValueError(f"{name} must be a floating [B, N, C] tensor with no empty dimension, got {t.dtype} "
                             f"{tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, expected {device_is} {device}")
    b = video.shape[0]
    if audio.shape[0] != b:
        raise ValueError(f"video batch {b} != audio batch {audio.shape[0]}")
    for key, text in conditioning.texts.items():
        if text.video.shape[0] not in (1, b):
            raise ValueError(f"conditioning.texts[{key!r}] has batch {text.video.shape[0]}, expected 1 or the "
                             f"latents' batch {b}")


def _batch(context: Tensor, b: int) -> Tensor:
    """Text context for batch b: as is, or a batch-1 context expanded (a view, no copy)."""
    if context.shape[0] == b:
        return context
    if context.shape[0] == 1:
        return context.expand(b, -1, -1)
    raise ValueError(f"text context has batch {context.shape[0]}, expected 1 or the latents' batch {b}")


__all__ = [
    "Conditioning",
    "EagerExecutor",
    "PassExecutor",
    "TextContext",
    "Velocity",
    "check_latents",
    "check_specs",
    "random_conditioning",
    "validate_conditioning",
]

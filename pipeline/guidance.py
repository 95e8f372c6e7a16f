"""Multi-modal guidance: per-modality scales, presets as data, and the x0-space combine.

Per modality (video and audio have their own scales), in x0 space, in float32:

    pred = cond + (cfg - 1)(cond - neg) + stg (cond - perturbed) + (mod - 1)(cond - modality)
    if rescale != 0:  pred = pred * (rescale * std(cond) / std(pred) + (1 - rescale))

A term whose scale makes it vanish is not computed for that modality (its pass runs only if the other
modality's terms need it): missing terms are zero.
Which terms exist is decided from the Python scales, and the std-ratio rescale stays a device tensor, so
`combine` never synchronises the host.

std is taken per batch item over (tokens, channels) with Bessel's correction, as `Tensor.std()`. The
reference takes it over the whole tensor; the two agree at batch 1, and per item keeps a sample's result
independent of what it is batched with.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

from torch import Tensor

from pipeline.config import block_indices


@dataclass(frozen=True)
class GuidanceParams:
    """Guidance scales of one modality. The defaults are the identity (only the cond pass is needed)."""

    cfg: float = 1.0  # classifier-free guidance: needs the "neg" pass when != 1
    stg: float = 0.0  # spatio-temporal guidance: needs the "perturbed" pass when != 0
    rescale: float = 0.0  # std-ratio rescale strength in [0, 1]; 0 = off
    modality: float = 1.0  # modality-isolation guidance: needs the "modality" pass when != 1

    def __post_init__(self) -> None:
        for field in ("cfg", "stg", "rescale", "modality"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"GuidanceParams.{field} must be a finite number, got {value!r}")
            object.__setattr__(self, field, float(value))
        if not 0.0 <= self.rescale <= 1.0:
            raise ValueError(f"GuidanceParams.rescale must be in [0, 1], got {self.rescale!r}")

    @property
    def needs_neg(self) -> bool:
        return self.cfg != 1.0

    @property
    def needs_perturbed(self) -> bool:
        return self.stg != 0.0

    @property
    def needs_modality(self) -> bool:
        return self.modality != 1.0


@dataclass(frozen=True)
class GuidanceConfig:
    """Video and audio guidance plus the STG blocks (self-attention blocks the perturbed pass skips)."""

    video: GuidanceParams = GuidanceParams()
    audio: GuidanceParams = GuidanceParams()
    stg_blocks: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for field in ("video", "audio"):
            if not isinstance(getattr(self, field), GuidanceParams):
                raise ValueError(
                    f"GuidanceConfig.{field} must be a GuidanceParams, got {type(getattr(self, field)).__name__}"
                )
        object.__setattr__(self, "stg_blocks", block_indices(self.stg_blocks, "GuidanceConfig.stg_blocks"))
        if (self.video.needs_perturbed or self.audio.needs_perturbed) and not self.stg_blocks:
            raise ValueError(
                f"stg is nonzero (video {self.video.stg}, audio {self.audio.stg}) but stg_blocks is empty: "
                "name the self-attention blocks the perturbed pass skips, e.g. (28,)"
            )

    @classmethod
    def preset(cls, name: str) -> GuidanceConfig:
        """A named preset of guidance scales: `hq` is LTX-2.3 HQ stage 1's (passes cond, neg, modality), `dev` LTX-2.3
        dev's (cond, neg, perturbed, modality). Only the scales and passes: the reference's dev pipeline also
        samples differently (Euler, 30 steps, the schedule anchored at 4096 tokens), while `denoise_stage1` keeps
        res2s and its `steps` / `num_tokens` arguments, whatever the preset."""
        presets = _presets()
        if name not in presets:
            raise ValueError(f"unknown guidance preset {name!r}; expected one of {sorted(presets)}")
        return presets[name]

    def fitted_to(self, num_layers: int) -> tuple[GuidanceConfig, str | None]:
        """(this config with the STG blocks past the model's depth replaced by its last block, a note naming those
        blocks, or None). In-range blocks are kept, and the last block is listed once even when it was named too.
        Why: the dev preset names block 28 of the 48-layer model; the tiny and small presets have 2 and 4."""
        missing = [b for b in self.stg_blocks if b >= num_layers]
        if not missing:
            return self, None
        kept = {b for b in self.stg_blocks if b < num_layers}
        note = (f"STG block(s) {missing} do not exist in a model with {num_layers} layers: "
                f"using block {num_layers - 1} instead")
        return replace(self, stg_blocks=tuple(sorted(kept | {num_layers - 1}))), note

    def validate(self, num_layers: int) -> None:
        """Check the STG blocks against the model depth (only when a perturbed pass will run)."""
        if not (self.video.needs_perturbed or self.audio.needs_perturbed):
            return
        bad = [b for b in self.stg_blocks if b >= num_layers]
        if bad:
            raise ValueError(
                f"stg_blocks {self.stg_blocks} out of range for a model with {num_layers} layers "
                f"(valid blocks are 0..{num_layers - 1}); bad: {bad}"
            )


def _presets() -> dict[str, GuidanceConfig]:
    # Data, not code paths: the scales of the reference tables (video cfg/stg/rescale/mod, audio likewise).
    return {
        "hq": GuidanceConfig(
            video=GuidanceParams(cfg=3.0, stg=0.0, rescale=0.45, modality=3.0),
            audio=GuidanceParams(cfg=7.0, stg=0.0, rescale=1.0, modality=3.0),
            stg_blocks=(),
        ),
        "dev": GuidanceConfig(
            video=GuidanceParams(cfg=3.0, stg=1.0, rescale=0.7, modality=3.0),
            audio=GuidanceParams(cfg=7.0, stg=1.0, rescale=0.7, modality=3.0),
            stg_blocks=(28,),
        ),
    }


PRESET_NAMES = tuple(_presets())  # ("hq", "dev"); the command line spells them out (it imports no torch to parse)


def _std_per_item(x: Tensor) -> Tensor:
    return x.flatten(1).std(dim=1).view(-1, *([1] * (x.dim() - 1)))  # [B, 1, 1]


def combine(params: GuidanceParams, x0: Mapping[str, Tensor]) -> Tensor:
    """Guided x0 of one modality from the per-pass x0s (keys "cond", "neg", "perturbed", "modality").

    Only the passes `params` needs must be present. Computed in float32; the rescale factor is a device
    tensor [B, 1, 1]. Never synchronises the host.
    """
    if "cond" not in x0:
        raise ValueError(f"combine needs the 'cond' pass x0; got passes {sorted(x0)}")
    terms = (
        ("neg", params.cfg - 1.0, params.needs_neg),
        ("perturbed", params.stg, params.needs_perturbed),
        ("modality", params.modality - 1.0, params.needs_modality),
    )
    cond = x0["cond"].float()  # [B, N, C]
    pred = cond
    for name, scale, needed in terms:
        if not needed:
            continue  # zero term: not computed
        if name not in x0:
            raise ValueError(f"guidance {params} needs the {name!r} pass x0; got passes {sorted(x0)}")
        pred = pred + scale * (cond - x0[name].float())
    if params.rescale != 0.0:
        factor = params.rescale * (_std_per_item(cond) / _std_per_item(pred)) + (1.0 - params.rescale)
        pred = pred * factor
    return pred


__all__ = ["PRESET_NAMES", "GuidanceConfig", "GuidanceParams", "combine"]

"""Guidance pass specs: one transformer call each, with its text and attention-skip options as data.

A `PassSpec` is frozen and hashable, so the same value drives an eager call (`spec.model_kwargs()`) and
names a captured graph (it is part of the graph key). The four kinds:

| pass      | text     | options                                                     | needed when (video OR audio) |
|-----------|----------|-------------------------------------------------------------|------------------------------|
| cond      | positive | none                                                        | always                       |
| neg       | negative | none                                                        | cfg != 1                     |
| perturbed | positive | skip video and audio self-attention in the STG blocks       | stg != 0                     |
| modality  | positive | disable A2V and V2A cross-attention in every block          | modality != 1                |

The perturbed pass skips the STG blocks in both streams whenever it runs (as the reference does); its
output is only used by the modalities whose stg is nonzero.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import block_indices
from pipeline.guidance import GuidanceConfig

PASS_NAMES = ("cond", "neg", "perturbed", "modality")  # the eager executor's order; graphs replay in capture order
TEXT_KEYS = ("positive", "negative")


@dataclass(frozen=True)
class PassSpec:
    """One guidance pass: its name, which prompt it reads and its attention-skip options."""

    name: str  # "cond" | "neg" | "perturbed" | "modality"
    text: str = "positive"  # "positive" | "negative"
    skip_video_self_attn_blocks: tuple[int, ...] = ()
    skip_audio_self_attn_blocks: tuple[int, ...] = ()
    disable_a2v_cross_attn: bool = False
    disable_v2a_cross_attn: bool = False

    def __post_init__(self) -> None:
        if self.name not in PASS_NAMES:
            raise ValueError(f"PassSpec.name must be one of {PASS_NAMES}, got {self.name!r}")
        if self.text not in TEXT_KEYS:
            raise ValueError(f"PassSpec.text must be one of {TEXT_KEYS}, got {self.text!r}")
        for field in ("skip_video_self_attn_blocks", "skip_audio_self_attn_blocks"):
            # Normalised to a sorted tuple so equal options give equal (and equally hashed) specs.
            object.__setattr__(self, field, block_indices(getattr(self, field), f"PassSpec.{field}"))
        for field in ("disable_a2v_cross_attn", "disable_v2a_cross_attn"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"PassSpec.{field} must be a bool, got {getattr(self, field)!r}")

    def model_kwargs(self) -> dict[str, object]:
        """Exactly the four attention-skip keyword arguments of the transformer's forward."""
        return {
            "skip_video_self_attn_blocks": self.skip_video_self_attn_blocks,
            "skip_audio_self_attn_blocks": self.skip_audio_self_attn_blocks,
            "disable_a2v_cross_attn": self.disable_a2v_cross_attn,
            "disable_v2a_cross_attn": self.disable_v2a_cross_attn,
        }


def pass_specs_for(config: GuidanceConfig) -> tuple[PassSpec, ...]:
    """Only the passes the guidance needs, in the fixed order cond, neg, perturbed, modality.

    A pass is needed when either modality needs it. Identity guidance gives just `(cond,)`. The config has been
    validated where it was made (finite scales, STG blocks present when stg != 0).
    """
    if not isinstance(config, GuidanceConfig):
        raise ValueError(f"config must be a GuidanceConfig (e.g. GuidanceConfig.preset('hq')), got {config!r}")
    video, audio = config.video, config.audio
    specs = [PassSpec("cond", "positive")]
    if video.needs_neg or audio.needs_neg:
        specs.append(PassSpec("neg", "negative"))
    if video.needs_perturbed or audio.needs_perturbed:
        specs.append(PassSpec("perturbed", "positive", skip_video_self_attn_blocks=config.stg_blocks,
                              skip_audio_self_attn_blocks=config.stg_blocks))
    if video.needs_modality or audio.needs_modality:
        specs.append(PassSpec("modality", "positive", disable_a2v_cross_attn=True, disable_v2a_cross_attn=True))
    return tuple(specs)


__all__ = ["PASS_NAMES", "TEXT_KEYS", "PassSpec", "pass_specs_for"]

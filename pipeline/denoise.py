"""The LTX-2.3 HQ denoising loops: stage 1 (guided) and stage 2 (distilled refinement), both res2s.

Stage 1: text-to-video+audio from pure noise, multi-modal guidance (preset "hq": passes cond, neg,
modality), res2s over the token-aware LTX-2.3 schedule (default 15 steps; the last step lands on 0 and is
one evaluation: 29 evaluations, 87 transformer calls).

Stage 2: one unguided "cond" pass per evaluation over the distilled sigmas with the 0.0011 res2s floor
(3 full steps + the terminal floor step: 7 evaluations). The input (clean) latents are first re-noised
to the first distilled sigma, `x (1 - s0) + n s0`. Audio: as in the reference pipeline, the audio latents
are re-noised and denoised jointly with the video (the video attends to them through A2V, so they must be
at the same noise level), and by default the stage returns the *stage-1* audio unchanged - stage 2
refines video only. `audio_output="refined"` returns the stage-2 audio instead.

The loop calls only the `PassExecutor` (eager here, captured graphs one layer up). Every schedule
decision - step sizes, the terminal step, bongmath on or off - comes from host floats planned before the
first step (`pipeline.res2s.plan_res2s`), and nothing in the loop reads a device value: the loops never
synchronise the host. Regions: "stage1"/"stage2" > "loop" > "step i" > "eval i.j" (0-based), with the
executor's "pass <name>" inside.

Timings: host enqueue time per step always; on a GPU each step also records two CUDA events (no sync),
read by `StageResult.device_step_ms()` after the loop (one wait on the last event).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from pipeline import res2s
from pipeline.executor import Conditioning, PassExecutor, check_latents, check_specs, validate_conditioning
from pipeline.guidance import GuidanceConfig, GuidanceParams, combine
from pipeline.noise import NoiseSeeds, SdeNoise, derive_seed, generator, renoise, validate_seed
from pipeline.passes import PassSpec, pass_specs_for
from pipeline.sigmas import distilled_stage2_sigmas, ltx2_sigmas, validate_sigmas
from profiling.ranges import region
from profiling.syncs import allow_host_sync

DEFAULT_STAGE1_STEPS = 15


class StepTimer:
    """Per-step timings of one stage. Recording never synchronises the host.

    Host time is the wall time to enqueue a step (on CPU it is the step's whole run time). On a CUDA
    device every step also records a start and an end event on that device's current stream (not the current
    device's: the latents may live on another GPU); `device_ms()` waits for the last event once and reads all of
    them.
    """

    def __init__(self, device: torch.device, num_steps: int):
        self._device = device
        self._cuda = device.type == "cuda"
        self._events = (
            [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(num_steps)]
            if self._cuda
            else []
        )
        self._host_ms: list[float] = []

    @contextmanager
    def step(self, index: int) -> Iterator[None]:
        stream = torch.cuda.current_stream(self._device) if self._cuda else None
        if stream is not None:
            self._events[index][0].record(stream)
        start = time.perf_counter()
        yield
        if stream is not None:
            self._events[index][1].record(stream)
        self._host_ms.append((time.perf_counter() - start) * 1e3)

    @property
    def host_ms(self) -> tuple[float, ...]:
        return tuple(self._host_ms)

    def device_ms(self) -> tuple[float, ...]:
        """Device time per step in ms (host time on CPU). Waits once for the last recorded step."""
        if not self._cuda:
            return self.host_ms
        recorded = self._events[: len(self._host_ms)]
        if not recorded:
            return ()
        with allow_host_sync("read the per-step CUDA event timings after the loop"):
            recorded[-1][1].synchronize()
        return tuple(start.elapsed_time(end) for start, end in recorded)


@dataclass(frozen=True, eq=False)
class StageResult:
    """What one stage returns: final latents, the schedule it ran, call counts and per-step timings."""

    stage: str  # "stage1" | "stage2"
    video: Tensor  # [B, Nv, C], the input latents' dtype
    audio: Tensor  # [B, Na, C]
    sigmas: tuple[float, ...]
    specs: tuple[PassSpec, ...]  # the passes of every evaluation
    evaluations: int  # guided x0 evaluations (2 per step, 1 for the terminal step)
    transformer_calls: int  # evaluations x passes: every call the executor made
    timer: StepTimer

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def host_step_ms(self) -> tuple[float, ...]:
        return self.timer.host_ms

    def device_step_ms(self) -> tuple[float, ...]:
        """Per-step device time in ms (one host wait on a GPU; call after the loop)."""
        return self.timer.device_ms()


class GuidedDenoiser:
    """`denoise(latents, sigma)` for res2s: runs the passes, x0 = x - sigma v per pass, combines per modality.

    Counts the transformer calls it makes and names each evaluation "eval i.j". Never synchronises the host.
    """

    def __init__(self, executor: PassExecutor, specs: Sequence[PassSpec], guidance: GuidanceConfig):
        self.executor = executor
        self.specs = tuple(specs)
        self.guidance = guidance
        self.step_index = 0
        self.eval_index = 0
        self.evaluations = 0
        self.transformer_calls = 0

    def start_step(self, index: int) -> None:
        self.step_index, self.eval_index = index, 0

    def __call__(self, latents: res2s.Latents, sigma: float) -> res2s.Latents:
        video, audio = latents
        with region(f"eval {self.step_index}.{self.eval_index}"):
            velocities = self.executor.run(video, audio, sigma, self.specs)
            video32, audio32 = video.float(), audio.float()
            x0_video = {name: video32 - sigma * vel.video.float() for name, vel in velocities.items()}
            x0_audio = {name: audio32 - sigma * vel.audio.float() for name, vel in velocities.items()}
            guided = (combine(self.guidance.video, x0_video), combine(self.guidance.audio, x0_audio))
        self.eval_index += 1
        self.evaluations += 1
        self.transformer_calls += len(self.specs)
        return guided


def _validate_latents(video: object, audio: object, conditioning: Conditioning, executor: object) -> None:
    """Host checks of the latents against each other, the conditioning and (if known) the model."""
    if not isinstance(video, Tensor):
        raise ValueError(f"video must be a tensor, got {type(video).__name__}")
    # The model's device is the reference when the executor shows it: latents left on the CPU for a CUDA model
    # are then the error, not the conditioning that is where it should be.
    model_device = getattr(getattr(executor, "model", None), "device", None)
    if isinstance(model_device, torch.device):
        device, device_is = model_device, "the model's device"
    else:
        device, device_is = video.device, "the video's device"
    check_latents(video, audio, device, conditioning, device_is=device_is)
    for key, text in conditioning.texts.items():
        if text.video.device != device:
            raise ValueError(f"conditioning.texts[{key!r}] is on {text.video.device}, expected {device_is} {device}")
    rope = conditioning.rope  # a RopeTables (validate_conditioning)
    rope.check_fits(video, audio, name="conditioning.rope")
    if rope.device != device:
        raise ValueError(f"conditioning.rope is on {rope.device}, expected {device_is} {device}")
    config = _model_config(executor)
    if config is not None:
        for name, t, c in (("video", video, config.in_channels), ("audio", audio, config.audio_in_channels)):
            if t.shape[2] != c:
                raise ValueError(f"{name} has {t.shape[2]} channels, the model expects {c}")
        for key, text in conditioning.texts.items():
            for field, width in (("video", config.video_context_dim), ("audio", config.audio_context_dim)):
                got = getattr(text, field).shape[2]
                if got != width:
                    raise ValueError(f"conditioning.texts[{key!r}].{field} is {got} wide, the model expects {width}")


def _model_config(executor: object) -> object | None:
    """The executor's model config when it exposes one (`executor.model.config`), else None."""
    return getattr(getattr(executor, "model", None), "config", None)


def _validate_common(executor: object, conditioning: Conditioning, seed: object, eta: object, bongmath: object) -> None:
    if not isinstance(executor, PassExecutor):
        raise ValueError(f"executor must implement PassExecutor (set_conditioning, run), got {type(executor).__name__}")
    validate_conditioning(conditioning)
    validate_seed(seed)
    res2s.check_eta(eta)
    if not isinstance(bongmath, bool):
        raise ValueError(f"bongmath must be a bool, got {bongmath!r}")


def _run_res2s(
    stage: str,
    executor: PassExecutor,
    conditioning: Conditioning,
    latents: tuple[Tensor, Tensor],
    plan: tuple[res2s.Res2sStep, ...],
    specs: tuple[PassSpec, ...],
    guidance: GuidanceConfig,
    noise: SdeNoise,
    quiet: bool,
) -> tuple[tuple[Tensor, Tensor], GuidedDenoiser, StepTimer]:
    """The shared res2s loop (inside the caller's stage region). Never synchronises the host."""
    executor.set_conditioning(conditioning)
    denoiser = GuidedDenoiser(executor, specs, guidance)
    timer = StepTimer(latents[0].device, len(plan))
    with region("loop"):
        for step in plan:
            denoiser.start_step(step.index)
            with region(f"step {step.index}"), timer.step(step.index):
                # Look the step up through the module so tests can instrument it.
                latents = res2s.res2s_step(latents, step, denoiser, noise)
            if not quiet:
                print(
                    f"[{stage}] step {step.index + 1}/{len(plan)}  sigma {step.sigma:.4f} -> {step.sigma_next:.4f}  "
                    f"{step.evaluations} eval x {len(specs)} pass  host {timer.host_ms[-1]:.1f} ms",
                    file=sys.stderr,
                    flush=True,
                )
    return latents, denoiser, timer


def denoise_stage1(
    executor: PassExecutor,
    conditioning: Conditioning,
    video: Tensor,
    audio: Tensor,
    *,
    seed: int,
    steps: int | None = None,
    guidance: GuidanceConfig | str = "hq",
    num_tokens: int | None = None,
    sigmas: Sequence[float] | None = None,
    eta: float = res2s.DEFAULT_ETA,
    bongmath: bool = True,
    quiet: bool = False,
) -> StageResult:
    """Guided res2s stage 1 from `video` [B, Nv, C] / `audio` [B, Na, C] at sigma = sigmas[0] (pure noise).

    steps: default 15; with `sigmas` it may be left out, and if given it must equal len(sigmas) - 1. num_tokens:
    the schedule's token count, default the video's Nv (HQ behaviour; pass 4096 for the non-HQ anchor); it only
    shapes the computed schedule, so giving it with `sigmas` is an error.
    guidance: a `GuidanceConfig` or a preset name. seed: the SDE noise streams of this stage. Everything is
    validated on the host before the first step. Never synchronises the host.
    """
    _validate_common(executor, conditioning, seed, eta, bongmath)
    if isinstance(guidance, str):
        guidance = GuidanceConfig.preset(guidance)
    if not isinstance(guidance, GuidanceConfig):
        raise ValueError(f"guidance must be a GuidanceConfig or preset name, got {type(guidance).__name__}")
    _validate_latents(video, audio, conditioning, executor)
    config = _model_config(executor)
    if config is not None:
        guidance.validate(config.num_layers)
    if sigmas is not None and num_tokens is not None:
        raise ValueError(f"num_tokens={num_tokens!r} has no effect when sigmas are given (it only shapes the "
                         "computed schedule): pass sigmas or num_tokens, not both")
    if sigmas is None:
        steps = DEFAULT_STAGE1_STEPS if steps is None else steps
        sigmas = ltx2_sigmas(steps, video.shape[1] if num_tokens is None else num_tokens)
    schedule = validate_sigmas(sigmas)
    if steps is not None and steps != len(schedule) - 1:
        raise ValueError(f"steps={steps!r} disagrees with the {len(schedule) - 1} steps of the given sigmas")
    specs = pass_specs_for(guidance)
    check_specs(specs, conditioning)
    plan = res2s.plan_res2s(schedule, eta=eta, bongmath=bongmath)

    with region("stage1"), torch.no_grad():
        noise = SdeNoise(NoiseSeeds.for_stage(seed, 1), video.device)
        (video, audio), denoiser, timer = _run_res2s(
            "stage1", executor, conditioning, (video, audio), plan, specs, guidance, noise, quiet
        )
    return StageResult("stage1", video, audio, schedule, specs, denoiser.evaluations, denoiser.transformer_calls, timer)


def denoise_stage2(
    executor: PassExecutor,
    conditioning: Conditioning,
    video: Tensor,
    audio: Tensor,
    *,
    seed: int,
    sigmas: Sequence[float] | None = None,
    eta: float = res2s.DEFAULT_ETA,
    bongmath: bool = True,
    audio_output: Literal["stage1", "refined"] = "stage1",
    quiet: bool = False,
) -> StageResult:
    """Unguided res2s refinement of clean `video` / `audio` latents (e.g. stage 1's, upsampled).

    Both are re-noised to sigmas[0] (seeded from `seed`, stage 2 streams) and denoised jointly with one
    "cond" pass per evaluation over `sigmas` (default: the distilled list with the 0.0011 res2s floor).
    audio_output: "stage1" (default, as the reference) returns the input audio unchanged; "refined"
    returns stage 2's audio. Never synchronises the host.
    """
    _validate_common(executor, conditioning, seed, eta, bongmath)
    if audio_output not in ("stage1", "refined"):
        raise ValueError(f"audio_output must be 'stage1' or 'refined', got {audio_output!r}")
    _validate_latents(video, audio, conditioning, executor)
    schedule = validate_sigmas(distilled_stage2_sigmas() if sigmas is None else sigmas)
    guidance = GuidanceConfig(video=GuidanceParams(), audio=GuidanceParams())  # identity: only "cond"
    specs = pass_specs_for(guidance)
    check_specs(specs, conditioning)
    plan = res2s.plan_res2s(schedule, eta=eta, bongmath=bongmath)

    with region("stage2"), torch.no_grad():
        noisy = renoise((video, audio), schedule[0], generator(derive_seed(seed, 2, "renoise"), video.device))
        noise = SdeNoise(NoiseSeeds.for_stage(seed, 2), video.device)
        (refined_video, refined_audio), denoiser, timer = _run_res2s(
            "stage2", executor, conditioning, noisy, plan, specs, guidance, noise, quiet
        )
    out_audio = audio if audio_output == "stage1" else refined_audio
    return StageResult(
        "stage2", refined_video, out_audio, schedule, specs, denoiser.evaluations, denoiser.transformer_calls, timer
    )


__all__ = [
    "DEFAULT_STAGE1_STEPS",
    "GuidedDenoiser",
    "StageResult",
    "StepTimer",
    "denoise_stage1",
    "denoise_stage2",
]

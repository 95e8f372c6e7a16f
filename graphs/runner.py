"""`ltx2-graphs run`: build the model, warm up (compile/capture) the chosen executor, run stage 1 and/or 2 of the
denoising loop, and report per-step time, transformer calls, captures, host syncs and GPU busy.

Stage 2 needs clean latents at twice stage 1's width and height. Real pipelines get them from a latent
upsampler, which this project does not have: after stage 1 the latents are repeated 2x2 (nearest neighbour),
and `--stages 2` alone starts from seeded random latents. The work per step is the same either way. `--resolution`
(or `--tokens`) always names stage 1's grid.

Warm-up (torch.compile, graph capture) runs before each stage on that stage's shapes and is reported
separately: the per-step times are those of the loop alone. Syncs are counted around the loop only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from graphs.run_output import write_safetensors_atomic
from graphs.cli_console import CommandError, Progress, emit_json
from graphs.run_executors import WarmupStats, make_executor, warm_up
from graphs.bench_kernels import kernel_activity
from graphs.run_syncs import SyncCount, count_host_syncs
from graphs.run_workload import (
    Workload,
    build_model,
    cpu_threads,
    fitted_guidance,
    random_conditioning,
    resolve_executor,
    resolve_workload,
)
from pipeline.config import LatentGrid
from pipeline.denoise import DEFAULT_STAGE1_STEPS
from pipeline.guidance import GuidanceConfig, GuidanceParams

LoopContext = Callable[[int], contextlib.AbstractContextManager]


@dataclass(frozen=True)
class RunOptions:
    """A fully resolved `run` (no "auto" left)."""

    workload: Workload
    executor: str
    guidance: GuidanceConfig
    guidance_name: str
    steps: int | None  # None: the stage-1 default (15)
    stages: tuple[int, ...]
    sync_check: bool
    output: str | None = None
    gpu_busy: bool = True  # measure GPU busy with CUPTI when available
    nsys: bool = False  # mark each loop for an nsys capture range (see nsys_capture_range)
    notes: tuple[str, ...] = ()  # adjustments made while resolving the flags, printed as progress


@dataclass
class StageSummary:
    stage: str
    video_tokens: int
    audio_tokens: int
    steps: int
    evaluations: int
    transformer_calls: int
    passes: tuple[str, ...]
    step_ms: tuple[float, ...]  # device time per step (CUDA events; wall time on CPU)
    host_step_ms: tuple[float, ...]  # time to enqueue each step on the host
    loop_s: float  # wall time of the whole loop, including the final wait
    warmup: WarmupStats
    syncs: SyncCount
    loop_captures: int | None = None  # graphs captured inside the loop (cache misses), sync check or not
    gpu_busy: float | None = None  # kernel time / loop wall time, when measured
    gpu_busy_source: str = ""  # "cupti" or "cuda events (upper bound)"
    kernels: int | None = None  # kernels launched in the loop (CUPTI only)

    @property
    def median_step_ms(self) -> float:
        return statistics.median(self.step_ms) if self.step_ms else float("nan")

    @property
    def unexpected_syncs(self) -> int:
        """The syncs the check counted besides the graphs captured inside the loop (cache misses: one-time syncs,
        reported as a warning of their own); 0 when nothing was checked."""
        return 0 if self.syncs.count is None else self.syncs.count - (self.loop_captures or 0)


@dataclass
class RunSummary:
    """What `run` reports (table or JSON)."""

    workload: str
    preset: str
    device: str
    dtype: str
    executor: str
    guidance: str
    seed: int
    build_s: float
    fp8: bool = False  # the video and text projections in e4m3 (`--fp8`, pipeline/fp8.py)
    stages: list[StageSummary] = field(default_factory=list)
    total_s: float = 0.0
    output: str | None = None
    output_error: str | None = None  # why `--output` was not written (the report is still printed first)
    settings: dict = field(default_factory=dict)  # what else shaped the result (`run_settings`), also in --output

    @property
    def syncs(self) -> int | None:
        counts = [s.syncs.count for s in self.stages]
        return None if any(c is None for c in counts) else sum(counts)

    def to_json(self) -> dict:
        data = asdict(self)
        data["syncs"] = self.syncs
        for stage, summary in zip(data["stages"], self.stages):
            stage["median_step_ms"] = summary.median_step_ms
        return data


def guidance_label(options: RunOptions) -> str:
    """The guidance as the report names it: the preset, unless flags changed its scales or blocks, or no guided
    stage ran (stage 2 is unguided)."""
    if 1 not in options.stages:
        return "none (stage 2 only, unguided)"
    preset, _ = fitted_guidance(options.guidance_name, options.workload.config.num_layers)
    return options.guidance_name if options.guidance == preset else f"{options.guidance_name}, changed by flags"


def run_settings(options: RunOptions) -> dict:
    """Everything besides preset, seed, executor and grid that makes two runs' latents differ: in the JSON summary
    and the `--output` file's metadata, so two files of different runs never look alike."""
    w = options.workload
    return {
        "dtype": str(w.dtype).removeprefix("torch."), "fp8": w.fp8, "weights": w.weights, "text_tokens": w.text_tokens,
        "steps": (options.steps or DEFAULT_STAGE1_STEPS) if 1 in options.stages else None,
        "guidance": asdict(options.guidance) if 1 in options.stages else None,
    }


def guidance_from_args(args, base: GuidanceConfig | None = None) -> GuidanceConfig:
    """`base` (default: the `--guidance` preset as named) with any per-modality override flags and `--stg-blocks`
    applied (validated by GuidanceConfig)."""
    base = GuidanceConfig.preset(args.guidance) if base is None else base
    changed = {}
    for modality in ("video", "audio"):
        params: GuidanceParams = getattr(base, modality)
        overrides = {
            name: getattr(args, f"{modality}_{name}")
            for name in ("cfg", "stg", "rescale", "modality")
            if getattr(args, f"{modality}_{name}", None) is not None
        }
        changed[modality] = GuidanceParams(**{**asdict(params), **overrides})
    stg_blocks = base.stg_blocks if args.stg_blocks is None else args.stg_blocks
    try:
        return GuidanceConfig(video=changed["video"], audio=changed["audio"], stg_blocks=stg_blocks)
    except ValueError as e:
        raise CommandError(str(e), hint="set --stg-blocks (e.g. 28) or the STG scales to 0") from e


def options_from_args(args) -> RunOptions:
    workload = resolve_workload(args)
    base, note = fitted_guidance(args.guidance, workload.config.num_layers)
    guidance = guidance_from_args(args, base)  # --stg-blocks, when given, replaces the fitted blocks
    notes = []
    if note and args.stg_blocks is None:  # blocks named explicitly are checked below, never moved
        notes.append(f"{workload.preset} preset: {note} (set --stg-blocks to choose)")
    try:
        guidance.validate(workload.config.num_layers)
    except ValueError as e:
        raise CommandError(str(e), hint="pick --stg-blocks inside the model's depth") from e
    executor = resolve_executor(args.executor, workload.device)
    _refuse_ignored_flags(args, guidance, workload, executor)
    sync_check = args.sync_check != "off"
    return RunOptions(
        workload=workload,
        executor=executor,
        guidance=guidance,
        guidance_name=args.guidance,
        steps=args.steps,
        stages=args.stages,
        sync_check=sync_check,
        output=getattr(args, "output", None),
        gpu_busy=getattr(args, "gpu_busy", "auto") != "off",
        nsys=getattr(args, "nsys", False),
        notes=tuple(notes),
    )


def _refuse_ignored_flags(args, guidance, workload: Workload, executor: str) -> None:
    """A flag that would change nothing in this run is an error, not a silent no-op."""
    parser = getattr(args, "command_parser", None)
    default = (lambda name: None) if parser is None else parser.get_default  # profile's steps default to 2
    if 1 not in args.stages:
        stage1 = [f"--{name.replace('_', '-')}" for name in ("guidance", "steps")
                  if getattr(args, name) not in (None, default(name))]
        stage1 += [f"--{modality}-{name}" for modality in ("video", "audio")
                   for name in ("cfg", "stg", "rescale", "modality") if getattr(args, f"{modality}_{name}") is not None]
        stage1 += ["--stg-blocks"] if args.stg_blocks is not None else []
        if stage1:
            raise CommandError("only stage 2 runs (unguided, over its fixed distilled sigmas), so these stage-1 flags "
                               f"would change nothing: {', '.join(stage1)}", hint="drop them, or use --stages 1,2")
    if args.stg_blocks and not (guidance.video.needs_perturbed or guidance.audio.needs_perturbed):  # `none` is ()
        raise CommandError(f"--stg-blocks has no effect: guidance {args.guidance!r} with these scales runs no "
                           "perturbed pass (both STG scales are 0)",
                           hint="set --video-stg/--audio-stg above 0" + (", or use --guidance dev"
                                                                         if args.guidance != "dev" else ""))
    on_gpu = workload.device.type == "cuda"
    ignored = [flag for flag, applies in (
        ("--no-shared-text-kv", workload.share_text_kv or "graphs" in executor),  # only graphs hold K/V for others
        ("--no-audio-stream", workload.overlap_audio or on_gpu),  # a side CUDA stream: nothing to turn off on CPU
        ("--gpu-busy off", getattr(args, "gpu_busy", "auto") != "off" or on_gpu),
    ) if not applies]
    if ignored:
        raise CommandError(f"{', '.join(ignored)} would change nothing with executor {executor} on "
                           f"{workload.device.type}", hint="--no-shared-text-kv applies to the graph executors, "
                           "--no-audio-stream and --gpu-busy to GPU runs")
    if getattr(args, "nsys", False) and workload.device.type != "cuda":
        raise CommandError("--nsys marks the loop for an Nsight Systems capture of CUDA activity, and no GPU is in "
                           "use", hint="run it on a GPU, or count host syncs on CPU with plain `ltx2-graphs run`",
                           code=3)


def stage2_grid(grid: LatentGrid) -> LatentGrid:
    """Stage 2 runs at twice stage 1's latent width and height (the 2x spatial upsampler's output)."""
    return LatentGrid(grid.frames, grid.height * 2, grid.width * 2, grid.audio_tokens, grid.fps)


def upsample_2x(video: torch.Tensor, grid: LatentGrid) -> torch.Tensor:
    """Nearest-neighbour 2x2 spatial repeat of video latents [B, F*H*W, C] -> [B, F*2H*2W, C]."""
    b, _, c = video.shape
    x = video.view(b, grid.frames, grid.height, grid.width, c)  # [B, F, H, W, C]
    x = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # [B, F, 2H, 2W, C]
    return x.reshape(b, -1, c)


def run_stage(stage: int, options: RunOptions, executor, latents, workload: Workload, progress: Progress,
              loop_context: LoopContext | None = None):
    """Warm up the executor for this stage's shapes, then run the stage loop with syncs counted.

    `loop_context(stage)`, when given, is entered around the loop alone (the profile command puts the CUPTI
    profiler there); otherwise on a GPU the loop's kernel time is measured with CUPTI when it is installed.
    """
    from pipeline import denoise
    from pipeline.passes import pass_specs_for

    conditioning = random_conditioning(workload)
    video, audio = latents
    guidance = options.guidance if stage == 1 else GuidanceConfig()  # stage 2: the identity -> only "cond"
    specs = pass_specs_for(guidance)
    warmup = warm_up(executor, options.executor, specs, conditioning, video, audio, progress=progress)
    on_gpu = workload.device.type == "cuda"
    captures_before = _captures(executor)
    # Profilers outermost, the sync count innermost: only the loop itself is checked for syncs, and only the loop
    # is in `loop_s` (not the profilers' start-up, positive control or tear-down).
    with (
        kernel_activity(
            workload.device, enabled=on_gpu and options.gpu_busy and loop_context is None, cupti_only=True
        ) as activity,
        loop_context(stage) if loop_context is not None else contextlib.nullcontext(),
        count_host_syncs(workload.device, enabled=options.sync_check, compiled="compile" in options.executor) as syncs,
    ):
        started = time.perf_counter()
        if stage == 1:
            result = denoise.denoise_stage1(
                executor, conditioning, video, audio, seed=workload.seed, steps=options.steps,
                guidance=options.guidance, quiet=progress.quiet,
            )
        else:
            result = denoise.denoise_stage2(
                executor, conditioning, video, audio, seed=workload.seed, quiet=progress.quiet
            )
        step_ms = result.device_step_ms()  # one wait for the last step's event, inside allow_host_sync
        loop_s = time.perf_counter() - started
    loop_captures = _count_loop_captures(executor, captures_before, syncs)
    if activity.busy_pct is not None:
        busy, busy_source = activity.busy_pct / 100.0, activity.source
    elif on_gpu:
        busy, busy_source = busy_fraction(step_ms, loop_s), "cuda events (upper bound)"
    else:
        busy, busy_source = None, ""
    summary = StageSummary(
        stage=result.stage,
        video_tokens=workload.grid.num_video_tokens,
        audio_tokens=workload.grid.num_audio_tokens,
        steps=result.steps,
        evaluations=result.evaluations,
        transformer_calls=result.transformer_calls,
        passes=tuple(s.name for s in result.specs),
        step_ms=tuple(step_ms),
        host_step_ms=result.host_step_ms,
        loop_s=loop_s,
        warmup=warmup,
        syncs=syncs,
        loop_captures=loop_captures,
        gpu_busy=busy,
        gpu_busy_source=busy_source,
        kernels=activity.kernels,
    )
    return (result.video, result.audio), summary


def _captures(executor) -> int | None:
    stats = getattr(executor, "stats", None)
    return None if stats is None else stats.captures


def _count_loop_captures(executor, before: int | None, syncs: SyncCount) -> int | None:
    """Graphs captured inside the loop (cache misses), or None for an executor that does not capture.

    Returned whether or not syncs are checked: each capture stalls the host and inflates its step's time, which
    a run with `--sync-check off` must still report. A capture synchronises through `torch.cuda.synchronize`,
    which sync debug mode does not see, so when syncs are counted the captures are added to that count too.
    """
    after = _captures(executor)
    if before is None or after is None:
        return None
    captured = after - before
    if captured and syncs.count is not None:
        syncs.count += captured
        syncs.findings.append(f"{captured} graph capture(s) inside the loop (cache misses; each synchronises)")
    return captured


def busy_fraction(step_ms, loop_s: float) -> float | None:
    """Device time of the steps (CUDA events, back to back) over the loop's wall time.

    An upper bound on kernel-busy time (gaps between kernels inside a step count as busy); `ltx2-graphs bench`
    and `profile` measure kernel time exactly with a profiler.
    """
    if not step_ms or loop_s <= 0:
        return None
    return min(1.0, sum(step_ms) / 1e3 / loop_s)


@contextlib.contextmanager
def nsys_capture_range(device: torch.device):
    """NVTX region "profile" (domain ltx2) holding the positive control and then the loop: what
    `nsys profile --capture-range=nvtx --nvtx-capture=profile@ltx2` records, and what the nsys analyser needs
    to trust a count of zero syncs (`ltx2-graphs profile --nsys-sqlite`)."""
    from profiling.control import run_positive_control
    from profiling.ranges import region

    with region("profile"):
        if device.type == "cuda":
            run_positive_control(device)
        yield


def run(options: RunOptions, progress: Progress, loop_context: LoopContext | None = None) -> RunSummary:
    """Build, warm up and run every requested stage; write the output if asked. Returns the summary."""
    started = time.perf_counter()
    w = options.workload
    if options.nsys and loop_context is None:
        def loop_context(stage: int):
            return nsys_capture_range(w.device)

    with cpu_threads(w):
        return _run(options, progress, loop_context, started)


def _run(options: RunOptions, progress: Progress, loop_context: LoopContext | None, started: float) -> RunSummary:
    from pipeline.noise import initial_latents

    w = options.workload
    progress(f"workload: {w.describe()}; executor {options.executor}; guidance {options.guidance_name}")
    for note in options.notes:
        progress(note)
    model = build_model(w, progress)
    build_s = time.perf_counter() - started
    summary = RunSummary(
        workload=w.describe(), preset=w.preset, device=str(w.device), dtype=str(w.dtype).removeprefix("torch."),
        executor=options.executor, guidance=guidance_label(options), seed=w.seed, build_s=build_s, fp8=w.fp8,
        settings=run_settings(options),
    )
    executor = make_executor(options.executor, model, progress=progress, share_text_kv=w.share_text_kv)
    grid = w.grid
    c = w.config
    latents = initial_latents(
        (1, grid.num_video_tokens, c.in_channels), (1, grid.num_audio_tokens, c.audio_in_channels),
        seed=w.seed, device=w.device,
    )
    for stage in options.stages:
        if stage == 2:
            grid2 = stage2_grid(w.grid)
            if 1 in options.stages:
                latents = (upsample_2x(latents[0], w.grid), latents[1])
            else:
                latents = initial_latents(
                    (1, grid2.num_video_tokens, c.in_channels), (1, grid2.num_audio_tokens, c.audio_in_channels),
                    seed=w.seed, device=w.device, stage=2,
                )
            grid = grid2
        progress(f"stage {stage}: {grid.num_video_tokens} video tokens, {grid.num_audio_tokens} audio tokens")
        latents, stage_summary = run_stage(
            stage, options, executor, latents, dataclasses.replace(w, grid=grid), progress, loop_context
        )
        summary.stages.append(stage_summary)
    if options.output:
        meta = {"preset": w.preset, "seed": str(w.seed), "executor": options.executor, "guidance": summary.guidance,
                "stages": ",".join(map(str, options.stages)), "grid": json.dumps(asdict(grid)),
                "settings": json.dumps(summary.settings)}
        try:
            write_safetensors_atomic(options.output, {"video": latents[0], "audio": latents[1]}, meta)
        except OSError as e:  # the loops' results still get reported (`main` raises after the report)
            summary.output_error = f"cannot write {options.output}: {e.strerror or e}"
        else:
            summary.output = options.output
            progress(f"wrote final latents to {options.output}")
    summary.total_s = time.perf_counter() - started
    return summary


def main(args, progress: Progress) -> int:
    """Entry for `ltx2-graphs run` (called by graphs.cli)."""
    options = options_from_args(args)
    summary = run(options, progress)
    if args.json != "-":
        from graphs.run_report import format_summary

        print(format_summary(summary))
    if args.json:
        emit_json(summary.to_json(), args.json)
    if summary.output_error:  # after the report: the loops ran, only the latents are lost
        raise CommandError(f"--output: {summary.output_error}", hint="the report above is complete; pick a "
                           "writable --output path")
    synced = sum(stage.unexpected_syncs for stage in summary.stages)
    if synced:  # after the report and the latents are out: the run finished, the check failed
        where = ("`ltx2-graphs profile` with the same flags reports where each happens"
                 if options.workload.device.type == "cuda" else  # profile needs a GPU
                 "a pass run under `profiling.syncs.detect_host_syncs(mode='raise')` stops at the first, with its "
                 "traceback")
        raise CommandError(f"the sync check counted {synced} host sync(s) in the denoising loop (the report lists "
                           "the first ones)", code=4, hint=where)
    return 0

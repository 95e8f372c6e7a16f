"""Measuring one benchmark cell: one executor of one implementation on one shape.

A cell warms the executor up (compile/capture every pass it will run, timed as warm-up), then:
1. per timed pass: `profiling.timing.time_cuda` over `executor.run(..., (spec,))` for eager and compiled
   executors; graph executors run every pass of the cell once, then `executor.replay_only(spec)` is timed, so a
   pass that reads the text keys/values another pass holds (graphs/executor.py) is timed as it runs in a step,
   and the pass holding them pays for them. Then a few back-to-back calls under
   `graphs.bench_kernels.kernel_activity` for kernels per pass and GPU busy;
   with a clock sampler (`profiling.gpu_clocks`), the SM clock and power over the timed calls (warm-up included);
2. per step: real res2s steps of the guidance preset through `pipeline.denoise.denoise_stage1` (sigmas taken
   from the start of the HQ schedule, all non-terminal: 2 evaluations per step), the first one untimed. Host
   syncs are counted over every step run, that first one included (a one-time sync shows as a fraction per step:
   stricter than the timed steps alone), and the clock summary spans them all too.
Any failure inside a cell becomes that cell's `error` (one line) so one broken row does not end the run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from graphs.bench_flops import spec_flops
from graphs.bench_kernels import kernel_activity
from graphs.bench_report import PassRow, StepRow
from graphs.cli_console import failure_line
from graphs.executor import text_kv_roles
from graphs.keys import OWN, TextKVRole
from graphs.run_executors import make_executor, warm_up
from graphs.run_syncs import count_host_syncs
from profiling.gpu_clocks import ClockSampler
from profiling.timing import TimingStats, time_cuda


@dataclass(frozen=True)
class CellInputs:
    """Everything a cell runs on (shared by every executor and implementation at one shape)."""

    config: object  # pipeline.config.ModelConfig (the FLOP formula reads it)
    grid: object  # pipeline.config.LatentGrid
    text_tokens: int
    conditioning: object  # pipeline.executor.Conditioning
    video: torch.Tensor  # [1, Nv, C] model dtype
    audio: torch.Tensor  # [1, Na, C]
    seed: int


@dataclass(frozen=True)
class CellPlan:
    """What to measure in each cell."""

    timed_specs: tuple  # PassSpecs timed one by one
    guidance: object  # pipeline.guidance.GuidanceConfig of the step
    repeats: int
    warmup: int
    step_count: int  # res2s steps timed
    kernel_calls: int = 3  # back-to-back passes under the kernel profiler
    peak_tflops: float = 0.0
    share_text_kv: bool = True  # graph executors (graphs/executor.py)
    debug: bool = False  # --debug: a failed row's traceback goes to stderr


def step_sigmas(video_tokens: int, count: int) -> list[float]:
    """The first `count` steps of the 15-step HQ schedule for this token count (all non-terminal)."""
    from pipeline.sigmas import ltx2_sigmas

    schedule = ltx2_sigmas(15, video_tokens)
    return schedule[: min(count, len(schedule) - 2) + 1]


def measure_cell(
    impl: str,
    executor_name: str,
    model: torch.nn.Module,
    inputs: CellInputs,
    plan: CellPlan,
    progress: Callable[[str], None],
    clocks: ClockSampler | None = None,
) -> tuple[list[PassRow], StepRow]:
    """Rows of one cell (see the module docstring). The executor is dropped before returning."""
    from pipeline.passes import pass_specs_for

    tokens = inputs.grid.num_video_tokens
    step_specs = pass_specs_for(plan.guidance)
    all_specs = _union(step_specs, plan.timed_specs)
    rows = [PassRow(impl, executor_name, tokens, s.name, _flops(inputs, s, OWN)) for s in plan.timed_specs]
    step_row = StepRow(impl, executor_name, tokens, tuple(s.name for s in step_specs))
    progress(f"{impl} {executor_name} @ {tokens} tokens: warm-up")
    precompiled = impl == "diffusers" and "compile" in executor_name  # its own compile_repeated_blocks
    try:
        # The peer's compiled rows run its own compile (`bench.run_cells` calls it), not ours.
        executor = make_executor(executor_name, model, progress=progress, share_text_kv=plan.share_text_kv,
                                 precompiled=precompiled)
        roles = text_kv_roles(all_specs, getattr(executor, "share_text_kv", False))  # graph executors share
        for spec, row in zip(plan.timed_specs, rows):
            row.flops = _flops(inputs, spec, roles[spec.name])
        stats = warm_up(executor, executor_name, all_specs, inputs.conditioning, inputs.video, inputs.audio,
                        progress=progress)
    except Exception as e:  # the whole cell failed
        message = failure_line(e, debug=plan.debug)
        for row in rows:
            row.error = message
        step_row.error = message
        progress(f"{impl} {executor_name} @ {tokens} tokens: FAILED in warm-up: {message}")
        return rows, step_row
    step_row.warmup_s, step_row.captures = stats.seconds, stats.captures
    # A precompiled peer compiles inside its own library during warm-up, uncounted here: "-", not 0.
    step_row.compiles, step_row.pool_bytes = None if precompiled else stats.compiles, stats.pool_bytes
    for spec, row in zip(plan.timed_specs, rows):
        _measure_pass(executor, executor_name, spec, row, inputs, plan, all_specs, clocks)
        progress(f"{impl} {executor_name} @ {tokens} tokens: pass {spec.name} "
                 + (f"{row.timing.median_ms:.2f} ms" if row.timing else f"FAILED: {row.error}"))
    _measure_steps(executor, executor_name, step_row, inputs, plan, clocks)
    progress(f"{impl} {executor_name} @ {tokens} tokens: step "
             + (f"{step_row.step.median_ms:.1f} ms" if step_row.step else f"FAILED: {step_row.error}"))
    del executor
    return rows, step_row


def _flops(inputs: CellInputs, spec, text_kv_role: TextKVRole) -> int:
    """The pass's FLOPs; a pass reading text keys/values another pass holds does not project them (FLOP/s and
    MFU count the work the pass does)."""
    return spec_flops(inputs.config, inputs.grid, inputs.text_tokens, spec,
                      text_kv_projected=not text_kv_role.consumes).total


def _union(first: Sequence, second: Sequence) -> tuple:
    """The specs of both, each name once; two different specs under one name are an error (the timed pass would
    never be the one warmed up)."""
    by_name: dict = {}
    for spec in (*first, *second):
        kept = by_name.setdefault(spec.name, spec)
        if kept != spec:
            raise ValueError(f"two different '{spec.name}' passes: {kept} (the step's) and {spec} (timed)")
    return tuple(by_name.values())


def _measure_pass(executor, executor_name: str, spec, row: PassRow, inputs: CellInputs, plan: CellPlan,
                  all_specs: tuple, clocks: ClockSampler | None) -> None:
    device = inputs.video.device
    graphed = hasattr(executor, "replay_only")

    def call():
        if graphed:
            return executor.replay_only(spec)
        return executor.run(inputs.video, inputs.audio, 0.5, (spec,))

    try:
        with torch.no_grad():
            if graphed:  # load the inputs and the text K/V roles of the cell's evaluation
                executor.run(inputs.video, inputs.audio, 0.5, all_specs)
            started = time.monotonic()
            row.timing = time_cuda(call, warmup=plan.warmup, repeats=plan.repeats, device=device)
            row.clocks = None if clocks is None else clocks.summary_since(started)
            with kernel_activity(device, compiled="compile" in executor_name) as activity:
                for _ in range(plan.kernel_calls):
                    call()
    except Exception as e:
        row.error = failure_line(e, debug=plan.debug)
        return
    row.kernels, row.kernel_source = activity.per_call(plan.kernel_calls), activity.source
    row.busy_pct = activity.busy_pct
    if activity.ms_by_class is not None:
        row.kernel_ms = {name: ms / plan.kernel_calls for name, ms in activity.ms_by_class.items()}
    if activity.count_by_class is not None:
        row.kernel_counts = {name: n / plan.kernel_calls for name, n in activity.count_by_class.items()}
    if activity.count_by_name is not None:
        row.kernel_names = {name: n / plan.kernel_calls for name, n in activity.count_by_name.items()}
    if row.timing.median_ms <= 0:  # below the timer's resolution: no rate to report
        return
    row.tflops = row.flops / (row.timing.median_ms * 1e-3) / 1e12
    if plan.peak_tflops > 0:
        row.mfu_pct = 100.0 * row.tflops / plan.peak_tflops


def _measure_steps(executor, executor_name: str, row: StepRow, inputs: CellInputs, plan: CellPlan,
                   clocks: ClockSampler | None) -> None:
    from pipeline.denoise import denoise_stage1

    device = inputs.video.device
    video, audio = inputs.video.float(), inputs.audio.float()

    def steps(count: int):
        sigmas = step_sigmas(inputs.grid.num_video_tokens, count)
        result = denoise_stage1(executor, inputs.conditioning, video, audio, seed=inputs.seed, sigmas=sigmas,
                                guidance=plan.guidance, quiet=True)
        return result.device_step_ms()

    try:
        # On a GPU the sync-debug counter costs nothing, so the timed steps are also the counted ones. On CPU the
        # dispatch detector slows every op several times: time without it, then count over one more step.
        on_gpu, compiled = device.type == "cuda", "compile" in executor_name
        started = time.monotonic()
        with count_host_syncs(device, enabled=on_gpu) as syncs:
            step_ms = steps(plan.step_count + 1)  # one extra step: warm-up
        row.clocks = None if clocks is None else clocks.summary_since(started)
        counted_steps = len(step_ms)
        if not on_gpu:
            with count_host_syncs(device, compiled=compiled) as syncs:
                counted_steps = len(steps(1))
    except Exception as e:
        row.error = failure_line(e, debug=plan.debug)
        return
    timed = step_ms[1:] if len(step_ms) > 1 else step_ms  # the first step pays one-time costs
    row.step = TimingStats.from_samples(timed)
    row.sync_detector = syncs.detector
    row.sync_findings = list(syncs.findings[:5])
    row.syncs_per_step = None if syncs.count is None else syncs.count / counted_steps

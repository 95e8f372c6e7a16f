"""The benchmark's results: one row per (implementation, executor, shape, pass) plus one per step, printed as
tables (tabulate) and written as JSON.

Column meanings (units in the headers):
- pass ms: median over `--repeats` timed calls (CUDA events on a GPU), spread = (max - min) / median;
- kernels: kernels launched per pass (CUPTI or torch.profiler; on CPU the aten ops dispatched, see
  `graphs.bench_kernels`); GPU busy: kernel time / wall time over a few back-to-back passes;
- kernel time by class (CUPTI only): GEMM / attention / other (elementwise, norms, copies) ms per pass, from
  the kernels' names (`graphs.bench_kernels.kernel_class`), and the kernels per pass in each class; "other"
  is what fusion can still remove;
- TFLOP/s: the analytic FLOPs of the pass (`graphs.bench_flops`; a graph row whose pass reads the text keys/values
  another pass holds is not charged their projections) / median time; MFU: that over the bf16 matmul peak
  measured in the same run (`profiling.timing.matmul_peak_tflops`);
- step ms: median device time of real res2s steps (2 evaluations of the guidance preset's passes, the guidance
  combine and the sampler update) through `pipeline.denoise`; host syncs / step over those steps;
- warm-up s: compile + capture (+ first runs) of that executor for that shape, excluded from every timing;
  pool MiB: device memory held by the graph pool;
- clocks (GPU, `profiling.gpu_clocks`): median and lowest SM clock, median board power, and the share of
  samples the driver held the clocks down for power or heat, over each row's timed calls (its warm-up calls
  included, plus the last sample before them). A row run at a power-capped clock is slower than the same code
  on a cooler or higher-limit card; M cycles (median ms x median SM MHz) compares rows of different cards better
  than ms (the clock median moves in 15 MHz steps: ~1%);
- against the floor (`--floor`, `graphs.bench_floor`): each cond/neg pass row next to the sum of its shape's GEMM
  and attention calls timed alone, and that sum moved to the row's SM clock (floor ms x floor MHz / row MHz):
  under the power cap the floor's kernels and the pass run at different clocks, and GEMM-bound time scales with
  the clock (an approximation: memory-bound kernels scale less). pass / floor is the headroom fusion can still
  take.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from graphs.bench_kernels import KERNEL_CLASSES
from profiling.gpu_clocks import CardLimits, ClockSummary
from profiling.timing import TimingStats


@dataclass
class PassRow:
    impl: str  # "ours" | "ours-fp8" | "diffusers"
    executor: str
    video_tokens: int
    pass_name: str
    flops: int
    timing: TimingStats | None = None
    kernels: float | None = None
    kernel_source: str = ""
    busy_pct: float | None = None
    tflops: float | None = None
    mfu_pct: float | None = None
    kernel_ms: dict[str, float] | None = None  # kernel time per pass by class (gemm, attention, other)
    kernel_counts: dict[str, float] | None = None  # kernels per pass by class
    kernel_names: dict[str, float] | None = None  # kernels per pass by name, most frequent first (JSON only)
    clocks: ClockSummary | None = None  # SM clock and power over the timed calls (GPU)
    error: str | None = None


@dataclass
class StepRow:
    impl: str
    executor: str
    video_tokens: int
    passes: tuple[str, ...]
    step: TimingStats | None = None
    syncs_per_step: float | None = None
    sync_detector: str = ""
    sync_findings: list[str] = field(default_factory=list)  # what each counted sync was (first few), for the JSON
    warmup_s: float | None = None
    captures: int | None = None
    compiles: int | None = None
    pool_bytes: int | None = None
    clocks: ClockSummary | None = None
    error: str | None = None


@dataclass
class BenchReport:
    device: str
    card: str
    torch_version: str
    diffusers_version: str | None
    date: str
    preset: str
    dtype: str
    text_tokens: int
    peak_tflops: float
    guidance: str
    repeats: int
    # What else shapes every row (and `compare` checks): the --audio-tokens flag (None: each grid's own, 126 for
    # 16 latent frames), text K/V shared between passes, the audio chain on its own stream, the SDPA choice.
    audio_tokens: int | None = None
    share_text_kv: bool = True
    overlap_audio: bool = True
    attention: str = "auto"
    passes: list[PassRow] = field(default_factory=list)
    steps: list[StepRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    floors: list[dict] = field(default_factory=list)  # `--floor`: Floor.to_json() + "clocks" per shape
    card_limits: CardLimits | None = None  # the card's max SM clock and power limit, when they were read
    fp8_error: list[dict] = field(default_factory=list)  # `--fp8`: the FP8 model's cond output against bf16's

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        for row in data["passes"] + data["steps"]:
            for key in ("timing", "step"):
                if row.get(key):
                    row[key] = {k: row[key][k] for k in ("median_ms", "min_ms", "max_ms", "samples")}
        return data

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, default=str)


def _ms(stats: TimingStats | None) -> str:
    return "-" if stats is None else f"{stats.median_ms:.2f}"


def _spread(stats: TimingStats | None) -> str:
    return "-" if stats is None else f"{stats.spread_pct:.1f}%"


def _flops(value: float | None, unit: str = "") -> str:
    """Engineering notation so both the 19B model (TFLOP) and the tiny CPU one (MFLOP) read well."""
    if value is None:
        return "-"
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".strip()


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _aligned(headers: list[str]) -> tuple[str, ...]:
    """Column alignment of a row table: impl, executor and the 4th column (pass or step passes) left, the numbers
    right. The cells are formatted strings (`disable_numparse`): tabulate would re-read them as numbers and reprint
    84.70 as 84.7."""
    return tuple("left" if i in (0, 1, 3) else "right" for i in range(len(headers)))


def pass_table(report: BenchReport) -> str:
    from tabulate import tabulate

    headers = ["impl", "executor", "tokens", "pass", "pass ms", "spread", "kernels", "GPU busy", "FLOP", "FLOP/s",
               "MFU"]
    rows = []
    for r in report.passes:
        if r.error:
            rows.append([r.impl, r.executor, r.video_tokens, r.pass_name, "failed", r.error[:60], "", "", "", "", ""])
            continue
        rows.append([
            r.impl, r.executor, r.video_tokens, r.pass_name, _ms(r.timing), _spread(r.timing), _num(r.kernels, ".0f"),
            _num(r.busy_pct, ".1f") + ("%" if r.busy_pct is not None else ""), _flops(r.flops),
            _flops(None if r.tflops is None else r.tflops * 1e12, "/s"),
            _num(r.mfu_pct, ".1f") + ("%" if r.mfu_pct is not None else ""),
        ])
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True, colalign=_aligned(headers))


def step_table(report: BenchReport) -> str:
    from tabulate import tabulate

    headers = ["impl", "executor", "tokens", "step passes", "step ms", "spread", "host syncs/step", "warm-up s",
               "captures", "compiles", "pool MiB"]
    rows = []
    for r in report.steps:
        if r.error:
            rows.append([r.impl, r.executor, r.video_tokens, ",".join(r.passes), "failed", r.error[:60], "", "", "",
                         "", ""])
            continue
        rows.append([
            r.impl, r.executor, r.video_tokens, ",".join(r.passes), _ms(r.step), _spread(r.step),
            _num(r.syncs_per_step, ".1f"), _num(r.warmup_s, ".1f"), _num(r.captures, "d"), _num(r.compiles, "d"),
            _num(None if r.pool_bytes is None else r.pool_bytes / 2**20, ".1f"),
        ])
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True, colalign=_aligned(headers))


def kernel_class_table(report: BenchReport) -> str | None:
    """Where each pass's kernel time goes (GEMM / attention / the rest), when the rows measured it."""
    from tabulate import tabulate

    rows = [r for r in report.passes if r.kernel_ms]
    if not rows:
        return None
    headers = ["impl", "executor", "tokens", "pass", "pass ms", "GEMM ms", "attention ms", "other ms", "other %",
               "kernels GEMM / attention / other"]
    body = []
    for r in rows:
        total = sum(r.kernel_ms.values())
        counts = "-" if not r.kernel_counts else " / ".join(f"{r.kernel_counts[c]:,.0f}" for c in KERNEL_CLASSES)
        body.append([r.impl, r.executor, r.video_tokens, r.pass_name, _ms(r.timing), f"{r.kernel_ms['gemm']:.1f}",
                     f"{r.kernel_ms['attention']:.1f}", f"{r.kernel_ms['other']:.1f}",
                     f"{100 * r.kernel_ms['other'] / total:.1f}%" if total else "-", counts])
    return tabulate(body, headers=headers, tablefmt="github")


def clock_table(report: BenchReport) -> str | None:
    """SM clock and board power over each row's timed calls, when a sampler ran (GPU)."""
    from tabulate import tabulate

    rows = [(r, r.pass_name) for r in report.passes if r.clocks] + [(r, "step") for r in report.steps if r.clocks]
    if not rows:
        return None
    limits = report.card_limits
    headers = ["impl", "executor", "tokens", "row", "samples", "SM MHz", "lowest", "power W", "power-capped",
               "thermal", "M cycles"]
    if limits:
        headers[5] += f" (max {limits.sm_max_mhz:.0f})"
        if limits.power_limit_w is not None:
            headers[7] += f" (limit {limits.power_limit_w:.0f})"
    body = []
    for r, what in rows:
        c = r.clocks
        stats = r.timing if isinstance(r, PassRow) else r.step
        cycles = None if stats is None else stats.median_ms * c.sm_mhz_median / 1e3  # ms x MHz = k cycles
        body.append([r.impl, r.executor, r.video_tokens, what, c.samples, f"{c.sm_mhz_median:.0f}",
                     f"{c.sm_mhz_min:.0f}", _num(c.power_w_median, ".0f"), f"{c.power_capped_pct:.0f}%",
                     f"{c.thermal_pct:.0f}%", _num(cycles, ".1f")])
    return tabulate(body, headers=headers, tablefmt="github")


FLOOR_PASSES = ("cond", "neg")  # the passes whose GEMM and attention calls the floor times (graphs.bench_floor)


def floor_at_clock(floor_ms: float, floor_mhz: float | None, row_mhz: float | None) -> float:
    """The floor's time at the row's SM clock (unchanged when either clock is unknown)."""
    return floor_ms if not floor_mhz or not row_mhz else floor_ms * floor_mhz / row_mhz


def floor_table(report: BenchReport) -> str | None:
    """Each cond/neg pass row against the kernel floor of its shape, when `--floor` measured one (module
    docstring)."""
    from tabulate import tabulate

    floors = {f["video_tokens"]: f for f in report.floors}
    rows = [r for r in report.passes if r.video_tokens in floors and r.pass_name in FLOOR_PASSES and r.timing
            and r.impl != "ours-fp8"]  # the floor is of bf16 GEMMs; FP8 rows run below it
    if not rows:
        return None
    headers = ["impl", "executor", "tokens", "pass", "pass ms", "SM MHz", "floor ms", "floor SM MHz",
               "floor at the row's clock", "pass / floor"]
    body = []
    for r in rows:
        floor = floors[r.video_tokens]
        floor_ms = floor["gemm_ms"] + floor["attention_ms"]
        floor_mhz = floor.get("sm_mhz_kernel_time_weighted")
        row_mhz = r.clocks.sm_mhz_median if r.clocks else None
        at_clock = floor_at_clock(floor_ms, floor_mhz, row_mhz)
        body.append([r.impl, r.executor, r.video_tokens, r.pass_name, _ms(r.timing), _num(row_mhz, ".0f"),
                     f"{floor_ms:.1f}", _num(floor_mhz, ".0f"),
                     f"{at_clock:.1f}" if floor_mhz and row_mhz else "-",
                     f"{r.timing.median_ms / at_clock:.3f}"])
    return tabulate(body, headers=headers, tablefmt="github", disable_numparse=True)  # keep the decimals shown


def fp8_error_table(report: BenchReport) -> str | None:
    """`--fp8`: per shape and stream, the FP8 model's eager cond output against the bf16 model's (same inputs)."""
    from tabulate import tabulate

    if not report.fp8_error:
        return None
    headers = ["tokens", "stream", "relative error", "cosine"]
    body = [[e["video_tokens"], e["stream"], f"{e['relative_error']:.2e}", f"{e['cosine']:.5f}"]
            for e in report.fp8_error]
    return tabulate(body, headers=headers, tablefmt="github", disable_numparse=True)


def format_report(report: BenchReport) -> str:
    head = (
        f"{report.card} | torch {report.torch_version} | diffusers {report.diffusers_version or 'not installed'} | "
        f"{report.date}\n{report.preset} {report.dtype}, batch 1, {report.text_tokens} text tokens, "
        + (f"{report.audio_tokens} audio tokens" if report.audio_tokens else "audio tokens of each grid")
        + f"; text K/V {'shared' if report.share_text_kv else 'per pass'}, audio chain "
        + f"{'on its own stream' if report.overlap_audio else 'on the video stream'}, attention {report.attention}"
        + "; matmul peak "
        + (f"{report.peak_tflops:.3g} TFLOP/s (measured)" if report.peak_tflops > 0 else "not measured (no MFU)")
        + f"; {report.repeats} repeats per pass; step = res2s step of guidance '{report.guidance}'"
    )
    parts = [head, "", "per pass:", pass_table(report), "", "per step:", step_table(report)]
    for r in report.steps:
        if r.sync_findings:
            parts += ["", f"host syncs seen in {r.impl} {r.executor} @ {r.video_tokens} tokens:",
                      *[f"  {finding}" for finding in r.sync_findings]]
    classes = kernel_class_table(report)
    if classes:
        parts += ["", "kernel time per pass by class (CUPTI):", classes]
    clocks = clock_table(report)
    if clocks:
        parts += ["", "clocks over each row's timed calls, warm-up included (NVML samples ~50 ms apart):", clocks]
    against_floor = floor_table(report)
    if against_floor:
        parts += ["", "against the kernel floor (GEMM + attention calls alone; GEMM-bound time scaled by clock):",
                  against_floor]
    fp8 = fp8_error_table(report)
    if fp8:
        parts += ["", f"FP8 against {report.dtype} (eager cond pass at sigma 0.5, same weights and inputs; "
                  f"||fp8 - {report.dtype}|| / ||{report.dtype}||):", fp8]
    if report.notes:
        parts += ["", *[f"note: {n}" for n in report.notes]]
    return "\n".join(parts)

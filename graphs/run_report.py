"""The table `ltx2-graphs run` prints: one row per stage, then warnings for graphs captured inside a loop and the
first host syncs if any were seen."""

from __future__ import annotations

from graphs.runner import RunSummary, StageSummary


def _busy(s: StageSummary) -> str:
    if s.gpu_busy is None:
        return "-"
    bound = "<= " if s.gpu_busy_source.endswith("(upper bound)") else ""
    return f"{bound}{100 * s.gpu_busy:.1f}%"


def _captures(s: StageSummary) -> str:
    """Warm-up captures, then "+N" for graphs captured inside the loop (cache misses), e.g. "3+1"."""
    if s.warmup.captures is None and s.loop_captures is None:
        return "-"
    warm = "-" if s.warmup.captures is None else str(s.warmup.captures)
    return f"{warm}+{s.loop_captures}" if s.loop_captures else warm


def _loop_capture_warnings(summary: RunSummary) -> list[str]:
    """One line per stage that captured inside its loop: shown with or without the sync check, because each
    capture synchronises the host and inflates its step's time, whatever the sync column says."""
    return [
        f"warning: {s.stage} captured {s.loop_captures} graph(s) inside the loop (cache misses: the host waited "
        "for each, so those steps' times include a capture)"
        for s in summary.stages if s.loop_captures
    ]


def format_summary(summary: RunSummary) -> str:
    """The short table `run` prints: one row per stage, then the executor's totals."""
    from tabulate import tabulate

    rows = []
    for s in summary.stages:
        spread = f"{min(s.step_ms):.1f}-{max(s.step_ms):.1f}" if s.step_ms else "-"
        rows.append([
            s.stage, f"{s.video_tokens}+{s.audio_tokens}", s.steps, f"{s.median_step_ms:.1f}", spread,
            s.evaluations, s.transformer_calls, ",".join(s.passes), _captures(s), f"{s.warmup.seconds:.1f}",
            s.syncs.describe(), _busy(s),
        ])
    headers = ["stage", "tokens v+a", "steps", "step ms (median)", "step ms (min-max)", "evals", "transformer calls",
               "passes", "captures", "warm-up s", "host syncs", "GPU busy"]
    lines = [
        f"{summary.workload}",
        f"executor {summary.executor}, guidance {summary.guidance}, seed {summary.seed}; model built in "
        f"{summary.build_s:.1f} s, total {summary.total_s:.1f} s",
        tabulate(rows, headers=headers, tablefmt="github"),
    ]
    lines += _loop_capture_warnings(summary)
    if summary.output:
        lines.append(f"final latents: {summary.output}")
    if summary.output_error:
        lines.append(f"final latents NOT written: {summary.output_error}")
    findings = [f for s in summary.stages for f in s.syncs.findings]
    if findings:
        lines.append(f"host syncs seen ({len(findings)}), first ones:")
        lines += [f"  {f}" for f in findings[:5]]
    return "\n".join(lines)

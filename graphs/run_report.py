"""The table `ltx2-graphs run` prints: one row per stage, then the first host syncs if any were seen."""

from __future__ import annotations

from graphs.runner import RunSummary, StageSummary


def _busy(s: StageSummary) -> str:
    if s.gpu_busy is None:
        return "-"
    bound = "<= " if s.gpu_busy_source.endswith("(upper bound)") else ""
    return f"{bound}{100 * s.gpu_busy:.1f}%"


def format_summary(summary: RunSummary) -> str:
    """The short table `run` prints: one row per stage, then the executor's totals."""
    from tabulate import tabulate

    rows = []
    for s in summary.stages:
        spread = f"{min(s.step_ms):.1f}-{max(s.step_ms):.1f}" if s.step_ms else "-"
        rows.append([
            s.stage, f"{s.video_tokens}+{s.audio_tokens}", s.steps, f"{s.median_step_ms:.1f}", spread,
            s.evaluations, s.transformer_calls, ",".join(s.passes), s.warmup.captures if s.warmup.captures is not None
            else "-", f"{s.warmup.seconds:.1f}", s.syncs.describe(),
            _busy(s),
        ])
    headers = ["stage", "tokens v+a", "steps", "step ms (median)", "step ms (min-max)", "evals", "transformer calls",
               "passes", "captures", "warm-up s", "host syncs", "GPU busy"]
    lines = [
        f"{summary.workload}",
        f"executor {summary.executor}, guidance {summary.guidance}, seed {summary.seed}; model built in "
        f"{summary.build_s:.1f} s, total {summary.total_s:.1f} s",
        tabulate(rows, headers=headers, tablefmt="github"),
    ]
    if summary.output:
        lines.append(f"final latents: {summary.output}")
    findings = [f for s in summary.stages for f in s.syncs.findings]
    if findings:
        lines.append(f"host syncs seen ({len(findings)}), first ones:")
        lines += [f"  {f}" for f in findings[:5]]
    return "\n".join(lines)

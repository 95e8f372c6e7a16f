"""`ltx2-graphs compare BEFORE.json AFTER.json`: two `bench --json` reports side by side.

Why: every change in profiling/PERF_LOG.md is judged by a before/after pair of benches, and three things make a
raw pair misleading. The passes run at the board power limit, so two cards (or two minutes of one card) hold
different clocks: the M cycles column (median ms x median SM MHz) compares code, the ms column compares runs.
A kernel count can move for reasons other than the code (a GEMM that picks a split-K algorithm adds a reduction
kernel): the kernels whose per-name count changed say which. And rows present in only one report are listed, not
silently dropped. Reads JSON only: no torch, no GPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

PASS_KEY = ("impl", "executor", "video_tokens", "pass_name")
STEP_KEY = ("impl", "executor", "video_tokens", "passes")
NAME_WIDTH = 90  # kernel names are long (cuBLAS encodes its tile and schedule in them)
# What both reports must share for a row pair to compare code rather than workloads (the row key does not hold it).
# A report from before a field existed does not have it: that field is not compared.
WORKLOAD_FIELDS = ("preset", "dtype", "text_tokens", "guidance", "audio_tokens", "share_text_kv", "overlap_audio",
                   "attention")


def load_report(path: str | Path) -> dict:
    """A `ltx2-graphs bench --json` report. ValueError naming the file when it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}; expected a `ltx2-graphs bench --json` report") \
            from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not JSON ({e}); expected a `ltx2-graphs bench --json` report") from None
    if not isinstance(data, dict) or not isinstance(data.get("passes"), list):
        raise ValueError(f"{path} has no 'passes' list: expected a `ltx2-graphs bench --json` report")
    for table in ("passes", "steps"):
        if not all(isinstance(row, dict) for row in data.get(table) or ()):
            raise ValueError(f"{path}: its '{table}' are not rows (objects): expected a `ltx2-graphs bench --json` "
                             "report")
    return data


def _key(row: dict, fields: tuple[str, ...]) -> tuple:
    return tuple(tuple(v) if isinstance(v := row.get(name), list) else v for name in fields)


def _median_ms(row: dict, timing: str) -> float | None:
    stats = row.get(timing)
    return None if row.get("error") or not stats else stats.get("median_ms")


def m_cycles(row: dict, timing: str) -> float | None:
    """Median ms x median SM MHz / 1000 (millions of cycles), None without a clock reading."""
    ms, clocks = _median_ms(row, timing), row.get("clocks") or {}
    mhz = clocks.get("sm_mhz_median")
    return None if ms is None or not mhz else ms * mhz / 1000


def kernel_name_changes(before: dict | None, after: dict | None) -> list[tuple[str, float, float]]:
    """(name, count before, count after) per kernel name whose count per pass changed, largest change first."""
    if not before or not after:
        return []
    names = list(before) + [n for n in after if n not in before]
    changed = [(n, before.get(n, 0.0), after.get(n, 0.0)) for n in names if before.get(n, 0.0) != after.get(n, 0.0)]
    return sorted(changed, key=lambda c: -abs(c[2] - c[1]))


@dataclass
class RowPair:
    """One row present in both reports (its key, and the row as each report has it)."""

    key: tuple
    before: dict
    after: dict


def _duplicates(rows: list[dict], label: str) -> list[str]:
    """Keys that more than one row of a report has (a report written by hand or merged): `pair_rows` keeps the
    last of them, so the comparison says so."""
    seen: set[tuple] = set()
    out = []
    for row in rows:
        key = _key(row, STEP_KEY if "step" in row else PASS_KEY)
        if key in seen:
            out.append(f"{label}: {_key_text(key)}")
        seen.add(key)
    return out


def pair_rows(before: list[dict], after: list[dict], fields: tuple[str, ...]) -> tuple[list[RowPair], list, list]:
    """(rows in both, keys only in before, keys only in after), in the order of `after` (then `before`)."""
    old = {_key(r, fields): r for r in before}
    new = {_key(r, fields): r for r in after}
    both = [RowPair(k, old[k], r) for k, r in new.items() if k in old]
    return both, [k for k in old if k not in new], [k for k in new if k not in old]


def _change(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or a == 0 else f"{100 * (b - a) / a:+.1f}%"


def _fmt(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _key_text(key: tuple) -> str:
    return " ".join(",".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in key)


def _header(label: str, report: dict, path: str) -> str:
    fields = (report.get("card"), f"torch {report.get('torch_version')}", report.get("date"), report.get("preset"),
              report.get("dtype"))
    return f"{label}: " + " | ".join(str(f) for f in fields if f is not None) + f"  ({path})"


def compare(before: dict, after: dict, *, names_per_row: int = 8) -> dict:
    """The comparison as plain data (what `--json` writes): per pass and per step, the value in each report."""
    passes, pass_only_before, pass_only_after = pair_rows(before["passes"], after["passes"], PASS_KEY)
    steps, step_only_before, step_only_after = pair_rows(before.get("steps", []), after.get("steps", []), STEP_KEY)
    out = {"passes": [], "steps": [], "only_before": pass_only_before + step_only_before,
           "only_after": pass_only_after + step_only_after,
           "kernel_names_missing": any(not (p.before.get("kernel_names") and p.after.get("kernel_names"))
                                       for p in passes),
           "workload_differs": [(f, before[f], after[f]) for f in WORKLOAD_FIELDS
                                if f in before and f in after and before[f] != after[f]],
           "duplicate_rows": _duplicates(before["passes"] + before.get("steps", []), "before")
           + _duplicates(after["passes"] + after.get("steps", []), "after")}
    for p in passes:
        changes = kernel_name_changes(p.before.get("kernel_names"), p.after.get("kernel_names"))
        out["passes"].append({
            **_both_sides(p, "timing"),
            "flops": (p.before.get("flops"), p.after.get("flops")),
            "kernels": (p.before.get("kernels"), p.after.get("kernels")),
            "kernel_name_changes": changes[:names_per_row],
            "kernel_names_changed": len(changes),
        })
    for s in steps:
        out["steps"].append({
            **_both_sides(s, "step"),
            "syncs_per_step": (s.before.get("syncs_per_step"), s.after.get("syncs_per_step")),
        })
    return out


def _both_sides(pair: RowPair, timing: str) -> dict:
    """What pass and step rows share: the key, and (before, after) of ms, M cycles and errors."""
    return {
        "key": pair.key,
        "ms": (_median_ms(pair.before, timing), _median_ms(pair.after, timing)),
        "m_cycles": (m_cycles(pair.before, timing), m_cycles(pair.after, timing)),
        "errors": (pair.before.get("error"), pair.after.get("error")),
    }


def format_comparison(before: dict, after: dict, result: dict, before_path: str, after_path: str) -> str:
    from tabulate import tabulate

    lines = [_header("before", before, before_path), _header("after ", after, after_path)]
    if result["workload_differs"]:
        lines.append("warning: the reports measured different workloads, so a change below is not a code effect: "
                     + ", ".join(f"{f} {a} -> {b}" for f, a, b in result["workload_differs"]))
    flops_differ = [_key_text(p["key"]) for p in result["passes"] if None not in p["flops"]
                    and p["flops"][0] != p["flops"][1]]
    if flops_differ:
        lines.append("warning: these rows computed different FLOPs (another workload: audio tokens, shared text K/V "
                     "...), so their change is not a code effect: " + "; ".join(flops_differ))
    if result["duplicate_rows"]:
        lines.append("warning: rows with the same key in one report (only the last is compared): "
                     + "; ".join(result["duplicate_rows"]))
    lines += ["", "per pass:"]
    rows = []
    for p in result["passes"]:
        (ms0, ms1), (c0, c1), (k0, k1) = p["ms"], p["m_cycles"], p["kernels"]
        rows.append([*p["key"], _fmt(ms0, ".2f"), _fmt(ms1, ".2f"), _failed(p) or _change(ms0, ms1), _fmt(c0, ".1f"),
                     _fmt(c1, ".1f"), _change(c0, c1), _fmt(k0, ".0f"), _fmt(k1, ".0f")])
    lines.append(tabulate(rows, headers=["impl", "executor", "tokens", "pass", "ms before", "ms after", "change",
                                         "M cycles before", "M cycles after", "change", "kernels before",
                                         "kernels after"], tablefmt="github", disable_numparse=True))
    if result["steps"]:
        rows = []
        for s in result["steps"]:
            (ms0, ms1), (c0, c1), (y0, y1) = s["ms"], s["m_cycles"], s["syncs_per_step"]
            rows.append([*s["key"][:3], ",".join(s["key"][3]), _fmt(ms0, ".2f"), _fmt(ms1, ".2f"),
                         _failed(s) or _change(ms0, ms1),
                         _fmt(c0, ".1f"), _fmt(c1, ".1f"), _change(c0, c1), f"{_fmt(y0, '.1f')} -> {_fmt(y1, '.1f')}"])
        lines += ["", "per step:", tabulate(rows, headers=[
            "impl", "executor", "tokens", "step passes", "ms before", "ms after", "change", "M cycles before",
            "M cycles after", "change", "host syncs/step"], tablefmt="github", disable_numparse=True)]
    changed = [p for p in result["passes"] if p["kernel_name_changes"]]
    if changed:
        lines += ["", "kernels whose count per pass changed (before -> after):"]
        for p in changed:
            lines.append("  " + _key_text(p["key"]) + ":")
            lines += [f"    {n0:g} -> {n1:g}  {name[:NAME_WIDTH]}" for name, n0, n1 in p["kernel_name_changes"]]
            if p["kernel_names_changed"] > len(p["kernel_name_changes"]):
                lines.append(f"    ... {p['kernel_names_changed'] - len(p['kernel_name_changes'])} more names")
    for label in ("only_before", "only_after"):
        if result[label]:
            lines += ["", f"rows {label.replace('_', ' in ')} (not compared): "
                      + "; ".join(_key_text(k) for k in result[label])]
    if result["kernel_names_missing"]:
        lines += ["", "note: some rows have no per-name kernel counts to compare (CUPTI counts them on a GPU; CPU "
                      "rows and reports written before `kernel_names` existed have none)"]
    return "\n".join(lines)


def _failed(pair: dict) -> str:
    """'before failed' / 'after failed' / both, for the change column of a row pair with an error."""
    return " / ".join(f"{side} failed" for side, e in zip(("before", "after"), pair["errors"]) if e)


def main(args, progress) -> int:
    """The `compare` command: read both reports, print (or `--json`) the comparison."""
    from graphs.cli_console import emit_json

    before, after = load_report(args.before), load_report(args.after)
    result = compare(before, after, names_per_row=args.names)
    if args.json:
        emit_json(result, args.json)
    if args.json != "-":
        print(format_comparison(before, after, result, args.before, args.after))
    return 0

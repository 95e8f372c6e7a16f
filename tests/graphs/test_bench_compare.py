"""`ltx2-graphs compare`: two bench reports side by side (ms, M cycles, kernels, kernel names that moved)."""

from __future__ import annotations

import json

import pytest

from graphs.bench_compare import compare, kernel_name_changes, load_report, m_cycles
from graphs.cli import main


def _pass(name: str, ms: float, mhz: float | None, kernels: float, names: dict | None = None, **extra) -> dict:
    return {"impl": "ours", "executor": "compile+graphs", "video_tokens": 1536, "pass_name": name,
            "timing": {"median_ms": ms}, "kernels": kernels, "kernel_names": names,
            "clocks": None if mhz is None else {"sm_mhz_median": mhz}, "error": None, **extra}


def _report(date: str, passes: list[dict], steps: list[dict] = ()) -> dict:
    return {"card": "NVIDIA H200 (140 GiB)", "torch_version": "2.11.0+cu130", "date": date, "preset": "ltx2.3",
            "dtype": "bfloat16", "passes": passes, "steps": list(steps)}


BEFORE = _report("11:30 UTC", [
    _pass("cond", 86.54, 1575, 2461, {"nvjet_gemm": 993, "splitKreduce_kernel": 144, "triton_red": 1036}),
    _pass("neg", 87.0, 1590, 2461),
    _pass("perturbed", 90.0, 1590, 2500),
], [{"impl": "ours", "executor": "compile+graphs", "video_tokens": 1536, "passes": ["cond", "neg", "modality"],
     "step": {"median_ms": 489.3}, "clocks": {"sm_mhz_median": 1560}, "syncs_per_step": 0.0, "error": None}])
AFTER = _report("12:01 UTC", [
    _pass("modality", 65.56, 1635, 1515),
    _pass("cond", 83.51, 1635, 2317, {"nvjet_gemm": 993, "triton_red": 1036, "triton_poi": 0.5}),
    _pass("neg", 83.99, None, 2317, error="OutOfMemoryError: ..."),
], [{"impl": "ours", "executor": "compile+graphs", "video_tokens": 1536, "passes": ["cond", "neg", "modality"],
     "step": {"median_ms": 478.5}, "clocks": {"sm_mhz_median": 1620}, "syncs_per_step": 0.0, "error": None}])


def test_cycles_normalise_the_clock_and_names_say_which_kernels_moved():
    result = compare(BEFORE, AFTER)
    cond = next(p for p in result["passes"] if p["key"][3] == "cond")
    assert cond["ms"] == (86.54, 83.51) and cond["kernels"] == (2461, 2317)
    assert cond["m_cycles"] == pytest.approx((86.54 * 1575 / 1000, 83.51 * 1635 / 1000))  # ~equal: the clock moved
    assert cond["kernel_name_changes"] == [("splitKreduce_kernel", 144, 0.0), ("triton_poi", 0.0, 0.5)]
    neg = next(p for p in result["passes"] if p["key"][3] == "neg")
    assert neg["ms"] == (87.0, None) and neg["m_cycles"][1] is None and neg["errors"][1].startswith("OutOfMemory")
    assert result["only_before"] == [("ours", "compile+graphs", 1536, "perturbed")]
    assert result["only_after"] == [("ours", "compile+graphs", 1536, "modality")]
    assert result["steps"][0]["ms"] == (489.3, 478.5) and result["kernel_names_missing"]  # neg has none
    assert m_cycles({"timing": {"median_ms": 1.0}, "clocks": None}, "timing") is None
    assert kernel_name_changes(None, {"a": 1}) == []


def test_the_command_prints_both_headers_the_tables_and_the_moved_kernels(capsys, tmp_path):
    before, after = tmp_path / "before.json", tmp_path / "after.json"
    before.write_text(json.dumps(BEFORE))
    after.write_text(json.dumps(AFTER))
    assert main(["compare", str(before), str(after), "--names", "1"]) == 0
    out = capsys.readouterr().out
    assert "before: NVIDIA H200 (140 GiB) | torch 2.11.0+cu130 | 11:30 UTC" in out and str(after) in out
    cond = next(line for line in out.splitlines() if "| cond" in line)
    assert all(v in cond for v in ("86.54", "83.51", "-3.5%", "136.3", "136.5", "2461", "2317"))
    assert "after failed" in out  # the neg row failed in the second report
    assert "144 -> 0  splitKreduce_kernel" in out and "... 1 more names" in out
    assert "rows only in before (not compared): ours compile+graphs 1536 perturbed" in out
    assert "0.0 -> 0.0" in out  # host syncs per step
    assert main(["compare", str(before), str(after), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)  # bare --json: JSON only
    assert data["passes"][1]["kernels"] == [2461, 2317]


def test_a_file_that_is_not_a_bench_report_is_one_clear_line(capsys, tmp_path):
    path = tmp_path / "coldstart.json"
    path.write_text(json.dumps({"total_s": 9.2}))
    with pytest.raises(ValueError, match="has no 'passes' list: expected a `ltx2-graphs bench --json` report"):
        load_report(path)
    assert main(["compare", str(path), str(path)]) == 2
    assert "has no 'passes' list" in capsys.readouterr().err
    path.write_text("{")
    assert main(["compare", str(path), str(path)]) == 2
    assert "is not JSON" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "missing.json"), str(path)]) == 2
    assert "cannot read" in capsys.readouterr().err
    path.write_text(json.dumps({"passes": ["cond", "neg"], "total_s": 9.2}))  # `coldstart --json` names its passes
    assert main(["compare", str(path), str(path)]) == 2
    assert "its 'passes' are not rows" in capsys.readouterr().err


def _step(passes: list[str], ms: float, mhz: float, syncs: float, error: str | None = None) -> dict:
    return {"impl": "ours", "executor": "compile+graphs", "video_tokens": 1536, "passes": passes,
            "step": {"median_ms": ms}, "clocks": {"sm_mhz_median": mhz}, "syncs_per_step": syncs, "error": error}


def test_step_rows_compare_each_side_and_name_rows_and_workloads_that_differ(capsys, tmp_path):
    before = _report("a", [], [_step(["cond", "neg", "modality"], 500.0, 1500, 2.0),
                               _step(["cond"], 90.0, 1500, 0.0), _step(["neg"], 95.0, 1500, 0.0)])
    after = {**_report("b", [], [_step(["cond", "neg", "modality"], 450.0, 1600, 0.0),
                                 _step(["neg"], 96.0, 1500, 0.0, error="RuntimeError: boom")]), "dtype": "float8"}
    result = compare(before, after)
    hq = next(s for s in result["steps"] if s["key"][3] == ("cond", "neg", "modality"))
    assert hq["ms"] == (500.0, 450.0) and hq["syncs_per_step"] == (2.0, 0.0)
    assert hq["m_cycles"] == pytest.approx((750.0, 720.0))
    assert result["only_before"] == [("ours", "compile+graphs", 1536, ("cond",))]
    assert result["workload_differs"] == [("dtype", "bfloat16", "float8")]
    paths = tmp_path / "before.json", tmp_path / "after.json"
    for path, report in zip(paths, (before, after)):
        path.write_text(json.dumps(report))
    assert main(["compare", *map(str, paths)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "cond,neg,modality" in line)
    assert all(v in row for v in ("500.00", "450.00", "-10.0%", "750.0", "720.0", "-4.0%", "2.0 -> 0.0")), row
    assert "after failed" in next(line for line in out.splitlines() if "| neg " in line)
    assert "rows only in before (not compared): ours compile+graphs 1536 cond" in out  # no Python tuple
    assert "warning: the reports measured different workloads" in out and "dtype bfloat16 -> float8" in out
    assert compare(before, before)["workload_differs"] == []


def test_rows_of_other_workloads_and_duplicate_rows_are_named(capsys, tmp_path):
    """Audio tokens, shared text K/V, the audio stream and the SDPA choice are workload fields now; a report from
    before they existed is not warned about; rows whose FLOPs differ and keys a report holds twice are named."""
    before = {**_report("a", [_pass("cond", 85.0, 1600, 2300, flops=100), _pass("cond", 99.0, 1600, 2300, flops=100)]),
              "audio_tokens": None, "share_text_kv": True}
    after = {**_report("b", [_pass("cond", 80.0, 1600, 2300, flops=120)]), "audio_tokens": 400, "share_text_kv": True}
    result = compare(before, after)
    assert result["workload_differs"] == [("audio_tokens", None, 400)]
    assert result["duplicate_rows"] == ["before: ours compile+graphs 1536 cond"]
    assert compare(BEFORE, {**AFTER, "audio_tokens": 400})["workload_differs"] == []  # BEFORE predates the field
    paths = tmp_path / "before.json", tmp_path / "after.json"
    for path, report in zip(paths, (before, after)):
        path.write_text(json.dumps(report))
    assert main(["compare", *map(str, paths)]) == 0
    out = capsys.readouterr().out
    assert "audio_tokens None -> 400" in out
    assert "warning: these rows computed different FLOPs" in out and "ours compile+graphs 1536 cond" in out
    assert "warning: rows with the same key in one report (only the last is compared)" in out


@pytest.mark.parametrize("field", ["preset", "dtype", "text_tokens", "guidance", "audio_tokens", "share_text_kv",
                                   "overlap_audio", "attention"])
def test_every_workload_field_is_compared(field):
    empty = {"passes": [], "steps": []}
    assert compare({**empty, field: 1}, {**empty, field: 2})["workload_differs"] == [(field, 1, 2)]


def test_step_rows_in_one_report_only_are_listed():
    step = {"impl": "ours", "executor": "eager", "video_tokens": 48, "passes": ["cond"], "step": {"median_ms": 1.0}}
    result = compare({"passes": [], "steps": []}, {"passes": [], "steps": [step]})
    assert result["only_after"] == [("ours", "eager", 48, ("cond",))]

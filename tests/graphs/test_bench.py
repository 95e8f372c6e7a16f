"""`ltx2-graphs bench` as a CPU smoke test (tiny preset, eager rows, diffusers peer) and, on a GPU, one short
run of every executor on the small preset."""

from __future__ import annotations

import json

import pytest
import torch

from graphs.bench import peer_order
from graphs.bench_report import BenchReport, PassRow, StepRow, format_report
from graphs.cli import main
from profiling.gpu_clocks import CardLimits, ClockSummary
from profiling.timing import TimingStats


def bench_json(capsys, tmp_path, *argv: str) -> tuple[dict, str]:
    path = tmp_path / "bench.json"
    code = main(["bench", "--quiet", "--json", str(path), *argv])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(path.read_text()), out.out


def test_cpu_bench_with_peer(capsys, tmp_path):
    pytest.importorskip("diffusers")
    data, table = bench_json(capsys, tmp_path, "--device", "cpu", "--preset", "tiny", "--repeats", "2",
                             "--warmup", "1", "--passes", "cond,perturbed,modality")
    assert "per pass:" in table and "per step:" in table and "diffusers" in table
    rows = {(r["impl"], r["pass_name"]): r for r in data["passes"]}
    assert set(rows) == {(i, p) for i in ("ours", "diffusers") for p in ("cond", "perturbed", "modality")}
    for row in rows.values():
        assert row["error"] is None, row["error"]
        assert row["timing"]["median_ms"] > 0 and len(row["timing"]["samples"]) == 2
        assert row["flops"] > 0 and row["tflops"] > 0 and row["mfu_pct"] is None  # no CPU peak, no MFU
        assert row["kernels"] > 0 and row["kernel_source"] == "aten ops"
    # Same weights and inputs: the two implementations do the same work per pass.
    assert rows[("ours", "cond")]["flops"] == rows[("diffusers", "cond")]["flops"]
    assert rows[("ours", "modality")]["flops"] < rows[("ours", "cond")]["flops"]
    steps = {r["impl"]: r for r in data["steps"]}
    assert steps["ours"]["passes"] == ["cond", "neg", "modality"] and steps["ours"]["step"]["median_ms"] > 0
    assert steps["ours"]["syncs_per_step"] == 0  # our loop, checked by the dispatch detector
    assert data["peak_tflops"] == 0 and "matmul peak not measured (no MFU)" in table
    assert data["torch_version"] == torch.__version__


def test_cpu_bench_times_compiled_rows_without_counting_their_ops(capsys, tmp_path):
    """The CPU op counter is a dispatch mode, under which dynamo runs no compiled code: compiled rows are timed and
    their ops left uncounted, instead of the counter failing the row (and dynamo's later calls with it)."""
    data, table = bench_json(capsys, tmp_path, "--device", "cpu", "--preset", "tiny", "--repeats", "1",
                             "--warmup", "1", "--passes", "cond,modality", "--executors", "eager,compile", "--no-peer")
    rows = {(r["executor"], r["pass_name"]): r for r in data["passes"]}
    for (executor, _), row in rows.items():
        assert row["error"] is None and row["timing"]["median_ms"] > 0, row["error"]
        assert (row["kernel_source"], row["kernels"] is None) == (
            ("not counted (compile)", True) if executor == "compile" else ("aten ops", False))
    assert all(r["error"] is None for r in data["steps"])
    assert "compiled rows are not counted" in table


def test_cpu_bench_without_peer_and_json_to_stdout(capsys):
    code = main(["bench", "--device", "cpu", "--no-peer", "--repeats", "1", "--warmup", "1", "--passes", "cond",
                 "--quiet", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0
    assert {r["impl"] for r in data["passes"]} == {"ours"} and len(data["passes"]) == 1


def test_cpu_bench_fp8_rows_beside_ours_and_the_peer(capsys, tmp_path):
    """`--fp8`: our rows, then the same weights quantized ("ours-fp8") with their cond output against the
    unquantized model's, then the peer, rebuilt unquantized from the same seed."""
    pytest.importorskip("diffusers")
    data, table = bench_json(capsys, tmp_path, "--device", "cpu", "--preset", "tiny", "--repeats", "1",
                             "--warmup", "1", "--passes", "cond", "--fp8")
    rows = {r["impl"]: r for r in data["passes"]}
    assert set(rows) == {"ours", "ours-fp8", "diffusers"} and all(r["error"] is None for r in rows.values())
    assert rows["ours-fp8"]["flops"] == rows["ours"]["flops"]
    assert [(e["video_tokens"], e["stream"]) for e in data["fp8_error"]] == [(48, "video"), (48, "audio")]
    for e in data["fp8_error"]:
        assert 1e-3 < e["relative_error"] < 0.1 and e["cosine"] > 0.99, e
    assert "FP8 against float32" in table and "ours-fp8" in table
    assert {r["impl"] for r in data["steps"]} == {"ours", "ours-fp8", "diffusers"}
    assert all(r["syncs_per_step"] == 0 for r in data["steps"] if r["impl"] != "diffusers")


def test_a_failed_fp8_quantization_keeps_the_rows_measured_before(monkeypatch, capsys):
    import graphs.bench

    def broken(model, progress):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(graphs.bench, "quantize", broken)
    code = main(["bench", "--device", "cpu", "--no-peer", "--fp8", "--repeats", "1", "--warmup", "1", "--passes",
                 "cond", "--quiet", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 1
    assert [r["impl"] for r in data["passes"]] == ["ours"] and data["passes"][0]["error"] is None
    failed = [r for r in data["steps"] if r["impl"] == "ours-fp8"]
    assert len(failed) == 1 and "CUDA out of memory (simulated)" in failed[0]["error"]
    assert "Traceback" not in capsys.readouterr().err
    code = main(["bench", "--device", "cpu", "--no-peer", "--fp8", "--repeats", "1", "--warmup", "1", "--passes",
                 "cond", "--quiet", "--json", "--debug"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" in err and "in broken" in err  # --debug: where the row failed


def test_peer_order_runs_compiled_rows_last():
    assert peer_order(("compile+graphs", "eager", "compile", "graphs")) == ("eager", "graphs", "compile",
                                                                            "compile+graphs")
    assert peer_order(("compile+graphs", "eager")) == ("eager", "compile+graphs")


def test_failed_rows_are_reported_not_fatal(monkeypatch, capsys):
    """A failed row keeps its place in the table and the JSON; the command then exits with status 1."""
    from types import SimpleNamespace

    import graphs.bench

    report = BenchReport("cpu", "CPU", "x", None, "now", "tiny", "float32", 16, 1.0, "hq", 2)
    report.passes.append(PassRow("ours", "eager", 48, "cond", 10, TimingStats.from_samples([1.0, 2.0])))
    report.passes.append(PassRow("diffusers", "compile", 48, "cond", 10, error="CaptureError: boom"))
    report.steps.append(StepRow("diffusers", "compile", 48, ("cond",), error="CaptureError: boom"))
    text = format_report(report)
    assert "failed" in text and "boom" in text
    assert json.loads(report.dumps())["passes"][1]["error"] == "CaptureError: boom"
    monkeypatch.setattr(graphs.bench, "bench", lambda args, progress: report)
    said = []
    assert graphs.bench.main(SimpleNamespace(json=None), said.append) == 1
    assert said == ["2 row(s) failed; see the table"] and "boom" in capsys.readouterr().out
    report.passes.pop(), report.steps.pop()
    assert graphs.bench.main(SimpleNamespace(json=None), said.append) == 0


@pytest.mark.cuda
def test_gpu_bench_small_preset_one_shape(capsys, tmp_path):
    """Eager and per-pass graphs, ours and diffusers', on the small preset at 1536 tokens, 2 repeats: all rows
    succeed, graph rows capture, replays do not sync. (The compiled rows are left to the benchmark run itself:
    their compile time would dominate this test.)"""
    data, _ = bench_json(capsys, tmp_path, "--preset", "small", "--tokens", "1536", "--repeats", "2", "--warmup",
                         "1", "--passes", "cond,modality", "--executors", "eager,graphs", "--peer-executors",
                         "eager,graphs")
    failed = [(r["impl"], r["executor"], r["error"]) for r in data["passes"] + data["steps"] if r["error"]]
    assert not failed, failed
    steps = {(r["impl"], r["executor"]): r for r in data["steps"]}
    assert steps[("ours", "graphs")]["captures"] >= 3 and steps[("ours", "graphs")]["pool_bytes"] > 0
    assert steps[("ours", "graphs")]["syncs_per_step"] == 0
    assert steps[("diffusers", "graphs")]["captures"] >= 3
    for row in data["passes"]:
        assert row["kernels"] > 0 and 0 < row["busy_pct"] <= 100 and 0 < row["mfu_pct"] < 100
    max_mhz = data["card_limits"]["sm_max_mhz"]
    for row in data["passes"] + data["steps"]:  # NVML sampled the SM clock over every timed window
        assert row["clocks"]["samples"] >= 1 and 0 < row["clocks"]["sm_mhz_median"] <= max_mhz


def test_bench_without_diffusers_installed_skips_the_peer(capsys, monkeypatch):
    import graphs.diffusers_adapter as adapter

    monkeypatch.setattr(adapter, "diffusers_available", lambda: False)
    code = main(["bench", "--device", "cpu", "--repeats", "1", "--warmup", "1", "--passes", "cond", "--json"])
    out = capsys.readouterr()
    assert code == 0 and "diffusers is not installed" in out.err
    assert {r["impl"] for r in json.loads(out.out)["passes"]} == {"ours"}
    code = main(["bench", "--device", "cpu", "--executors", "none", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "nothing to measure" in err[0]


def test_report_lists_the_syncs_a_step_row_saw():
    from graphs.bench_report import BenchReport, StepRow, format_report

    report = BenchReport(device="cuda:0", card="card", torch_version="t", diffusers_version=None, date="d",
                         preset="ltx2.3", dtype="bfloat16", text_tokens=1024, peak_tflops=790.0, guidance="hq",
                         repeats=3)
    finding = "pipeline/noise.py:56: called a synchronizing CUDA operation"
    report.steps.append(StepRow("ours", "eager", 1536, ("cond",), syncs_per_step=1 / 3, sync_findings=[finding]))
    text = format_report(report)
    assert "host syncs seen in ours eager @ 1536 tokens:" in text and "pipeline/noise.py:56" in text
    assert report.to_json()["steps"][0]["sync_findings"] == [finding]


def test_report_keeps_its_digits_and_names_the_workload():
    """tabulate re-read the formatted numbers (84.70 -> 84.7, a 123456.78 ms step -> 123457); the header and the
    JSON name the audio tokens, the text K/V sharing, the audio stream and the SDPA choice."""
    report = BenchReport("cuda:0", "card", "t", None, "d", "ltx2.3", "bfloat16", 1024, 800.0, "hq", 3,
                         audio_tokens=400, share_text_kv=False, attention="cudnn")
    report.passes.append(PassRow("ours", "compile+graphs", 1536, "cond", 10, TimingStats.from_samples([84.70]),
                                 kernels=2316.67))
    report.steps.append(StepRow("ours", "compile+graphs", 1536, ("cond",), step=TimingStats.from_samples([123456.78])))
    text = format_report(report)
    assert " 84.70 |" in text and " 2317 |" in text and " 123456.78 |" in text  # numbers right-aligned
    assert "400 audio tokens; text K/V per pass, audio chain on its own stream, attention cudnn" in text
    data = report.to_json()
    assert (data["audio_tokens"], data["share_text_kv"], data["overlap_audio"], data["attention"]) == (
        400, False, True, "cudnn")


def test_lists_naming_an_item_twice_are_refused(capsys):
    """`--tokens 48,48 --passes cond,cond` timed each twice and wrote four rows with one key."""
    from tests.graphs.test_cli import run_cli

    for flag, value in (("--tokens", "48,48"), ("--passes", "cond,cond"), ("--executors", "eager,eager")):
        code, _, err = run_cli(capsys, "bench", "--device", "cpu", "--no-peer", flag, value)
        assert code == 2 and f"argument {flag}: " in err and "named more than once" in err


def test_report_shows_clocks_only_when_sampled():
    report = BenchReport("cuda:0", "card", "t", None, "d", "ltx2.3", "bfloat16", 1024, 800.0, "hq", 3)
    report.passes.append(PassRow("ours", "compile+graphs", 1536, "cond", 10, TimingStats.from_samples([86.0])))
    assert "clocks over the timed calls" not in format_report(report)
    capped = ClockSummary(12, 1560.0, 1470.0, 691.0, 100.0, 0.0)
    report.passes[0].clocks = capped
    report.steps.append(StepRow("ours", "compile+graphs", 1536, ("cond",), clocks=capped))
    report.card_limits = CardLimits(1980.0, 700.0)
    text = format_report(report)
    assert "SM MHz (max 1980)" in text and "power W (limit 700)" in text
    assert text.count(" 1560 |") == 2 and "| 100% " in text and "samples" in text
    assert "M cycles" in text and "134.2" in text  # 86.0 ms x 1560 MHz (the step row has no timing: "-")
    assert report.to_json()["passes"][0]["clocks"]["sm_mhz_median"] == 1560.0
    assert report.to_json()["card_limits"] == {"sm_max_mhz": 1980.0, "power_limit_w": 700.0}
    report.card_limits = CardLimits(1980.0, None)  # a board that reports no power limit
    assert "power W" in format_report(report) and "(limit" not in format_report(report)


def test_floor_reports_the_clock_of_each_kernel_and_their_time_weighted_mean(monkeypatch):
    """The floor's clocks are read over its kernels' timed replays (one window per kernel), not the set-up
    between them; `--floor-seconds` reaches the floor measurement."""
    from types import SimpleNamespace

    import graphs.bench_floor as bench_floor
    from graphs.bench import measure_floors
    from graphs.bench_floor import Floor, FloorKernel

    kernels = (FloorKernel("ff", "gemm", (48, 64, 64)), FloorKernel("sdpa", "attention", (1, 48, 48, 8)))
    floor = Floor(video_tokens=48, layers=2, kernels=kernels, ms=(3.0, 1.0), backends=("", "flash"))
    asked = {}

    def fake_measure_floor(model, video_tokens, audio_tokens, text_tokens, *, min_seconds, timed_windows,
                           read_clock):
        asked["min_seconds"], asked["read_clock"] = min_seconds, read_clock
        timed_windows += [(1.0, 2.0), (3.0, 4.0)]
        return floor

    class Clocks:  # the sampler's side: 1500 MHz in the first window, 1900 in the second
        def read_now(self):
            pass

        def summary_within(self, windows):
            mhz = {(1.0, 2.0): 1500.0, (3.0, 4.0): 1900.0}
            values = [mhz[w] for w in windows]
            return ClockSummary(len(values), sorted(values)[len(values) // 2], min(values), 690.0, 100.0, 0.0)

    monkeypatch.setattr(bench_floor, "measure_floor", fake_measure_floor)
    report = BenchReport("cuda:0", "card", "t", None, "d", "tiny", "bfloat16", 16, 800.0, "hq", 3)
    shapes = {48: SimpleNamespace(grid=SimpleNamespace(num_audio_tokens=18))}
    measure_floors(None, SimpleNamespace(text_tokens=16), shapes, report, lambda message: None, Clocks(), 1.5)
    assert asked["min_seconds"] == 1.5
    assert asked["read_clock"].__name__ == "read_now"  # each kernel's window gets a reading as its replays end
    data = report.floors[0]
    assert [k["sm_mhz"] for k in data["kernels"]] == [1500.0, 1900.0]
    assert data["sm_mhz_kernel_time_weighted"] == (3.0 * 1500 + 1.0 * 1900) / 4.0  # 1600
    assert "SM clock 1600 MHz weighted by kernel time; while timed: SM clock 1900 MHz median (lowest 1500)" in (
        report.notes[0])


def test_floor_seconds_needs_the_floor(capsys):
    code = main(["bench", "--device", "cpu", "--floor-seconds", "1", "--no-peer", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "--floor-seconds applies to the kernel floor" in err


def test_report_sets_cond_and_neg_rows_against_the_floor_at_their_clock():
    """The floor (GEMM + attention alone, at its kernel-time-weighted clock) moved to each cond/neg row's clock;
    modality rows, FP8 rows (the floor is of bf16 GEMMs) and shapes without a floor are left out; without clocks
    the floor is compared as timed."""
    from graphs.bench_report import floor_at_clock, floor_table

    report = BenchReport("cuda:0", "card", "t", None, "d", "ltx2.3", "bfloat16", 1024, 800.0, "hq", 3)
    report.floors.append({"video_tokens": 1536, "gemm_ms": 71.6, "attention_ms": 8.2,
                          "sm_mhz_kernel_time_weighted": 1548.0})
    for name, ms in (("cond", 85.9), ("neg", 85.5), ("modality", 66.0)):
        report.passes.append(PassRow("ours", "compile+graphs", 1536, name, 10, TimingStats.from_samples([ms]),
                                     clocks=ClockSummary(19, 1605.0, 1515.0, 485.0, 100.0, 0.0)))
    report.passes.append(PassRow("ours", "compile+graphs", 8160, "cond", 10, TimingStats.from_samples([486.0])))
    report.passes.append(PassRow("ours-fp8", "compile+graphs", 1536, "cond", 10, TimingStats.from_samples([61.0])))
    table = floor_table(report)
    at_clock = 79.8 * 1548.0 / 1605.0  # 76.96
    assert floor_at_clock(79.8, 1548.0, 1605.0) == pytest.approx(at_clock)
    lines = [line for line in table.splitlines() if "| ours" in line]
    assert len(lines) == 2 and "| cond " in lines[0] and "| neg " in lines[1] and "ours-fp8" not in table
    assert "| 77.0 " in lines[0] and f"| {85.9 / at_clock:.3f} " in lines[0]
    assert "against the kernel floor" in format_report(report)
    report.floors[0]["sm_mhz_kernel_time_weighted"] = None  # floor timed without clocks: compared as timed
    assert f"| {85.9 / 79.8:.3f} " in floor_table(report)
    report.floors.clear()
    assert floor_table(report) is None and "against the kernel floor" not in format_report(report)


def test_a_precompiled_peer_runs_its_own_compile_not_ours(monkeypatch):
    """diffusers' compiled rows: its `compile_repeated_blocks` blocks run as they are ("compile") or are captured
    without a compile of ours ("compile+graphs"); our model's rows keep our regional compile."""
    import graphs.executor
    from graphs.compile import CompiledExecutor
    from graphs.run_executors import make_executor
    from pipeline.executor import EagerExecutor

    made = []
    monkeypatch.setattr(graphs.executor, "GraphExecutor", lambda model, **kwargs: made.append(kwargs) or kwargs)
    model = torch.nn.Linear(2, 2)
    assert isinstance(make_executor("compile", model, precompiled=True), EagerExecutor)
    make_executor("compile+graphs", model, precompiled=True)
    make_executor("compile+graphs", model)
    assert [m["compile"] for m in made] == [False, "default"]
    monkeypatch.setattr("graphs.compile.find_blocks", lambda model: [model])
    assert isinstance(make_executor("compile", model), CompiledExecutor)


def _cpu_cond_bench(capsys, tmp_path) -> dict:
    path = tmp_path / "bench.json"
    code = main(["bench", "--quiet", "--json", str(path), "--device", "cpu", "--preset", "tiny", "--repeats", "2",
                 "--warmup", "1", "--passes", "cond", "--executors", "eager", "--no-peer"])
    assert code == 0, capsys.readouterr().err
    return json.loads(path.read_text())


def test_flop_rate_and_timed_steps_are_what_they_say(capsys, tmp_path):
    from graphs.bench import STEP_COUNT

    data = _cpu_cond_bench(capsys, tmp_path)
    row = data["passes"][0]
    assert row["tflops"] == pytest.approx(row["flops"] / (row["timing"]["median_ms"] * 1e-3) / 1e12)
    assert len(data["steps"][0]["step"]["samples"]) == STEP_COUNT  # the warm-up step is not among them


def test_a_sync_in_the_loop_shows_in_syncs_per_step(capsys, tmp_path, monkeypatch):
    """The column's 0 means something only if a sync in the step makes it non-zero."""
    from pipeline import res2s

    original = res2s.sde_step

    def sde_step_with_item(x, x_det, noise, **kwargs):
        x.abs().max().item()  # one host read per SDE step
        return original(x, x_det, noise, **kwargs)

    monkeypatch.setattr(res2s, "sde_step", sde_step_with_item)
    assert _cpu_cond_bench(capsys, tmp_path)["steps"][0]["syncs_per_step"] == 4  # video + audio, substep + step


def test_a_consuming_pass_is_charged_less_than_one_projecting_its_own_text_kv():
    from graphs.bench_rows import CellInputs, _flops
    from graphs.keys import OWN, TextKVRole
    from pipeline.config import LatentGrid, ModelConfig
    from pipeline.passes import PassSpec

    inputs = CellInputs(ModelConfig.preset("tiny"), LatentGrid.from_tokens(48, audio_tokens=18), 16, None, None,
                        None, 0)
    modality = PassSpec("modality", disable_a2v_cross_attn=True, disable_v2a_cross_attn=True)
    assert _flops(inputs, modality, TextKVRole.reading("cond", ())) < _flops(inputs, modality, OWN)

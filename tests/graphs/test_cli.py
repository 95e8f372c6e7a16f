"""The `ltx2-graphs` command on CPU: help, one-line errors, the default run, JSON and the atomic output file.

Commands run in-process through `graphs.cli.main(argv)` (no interpreter start-up per test); one test runs the
installed console script itself.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from graphs.cli import build_parser, main

SUBCOMMANDS = ("run", "bench", "coldstart", "profile")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `ltx2-graphs argv...`; argparse exits are caught too."""
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def error_lines(err: str) -> list[str]:
    """stderr lines that are not progress lines."""
    return [line for line in err.splitlines() if line.strip() and not line.startswith("[")]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_of_each_subcommand(capsys, command):
    code, out, _ = run_cli(capsys, command, "--help")
    assert code == 0
    assert "no text encoder" in out  # every command says where the text contexts come from
    for flag in ("--preset", "--weights", "--dtype", "--seed", "--json", "--quiet", "--debug"):
        assert flag in out, f"{command} --help lacks {flag}"


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_guidance_choices_are_the_presets(command):
    """The parser names the presets itself (no torch import to parse); they must stay those of pipeline.guidance."""
    from graphs.cli import build_parser
    from pipeline.guidance import PRESET_NAMES

    sub = build_parser()._subparsers._group_actions[0].choices[command]
    (guidance,) = [a for a in sub._actions if a.dest == "guidance"]
    assert tuple(guidance.choices) == PRESET_NAMES


def test_top_level_help_lists_the_commands(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and all(c in out for c in (*SUBCOMMANDS, "compare"))


@pytest.mark.parametrize(
    "argv, words",
    [
        (("run", "--steps", "0"), "positive integer"),
        (("run", "--resolution", "100x100"), "multiples of 32"),
        (("run", "--resolution", "wide"), "WIDTHxHEIGHT"),
        (("run", "--executor", "turbo"), "invalid choice"),
        (("run", "--stages", "3"), "1, 2 or 1,2"),
        (("run", "--video-cfg", "-1"), ">= 0"),
        (("run", "--fps", "0"), "finite number > 0"),
        (("run", "--fps", "-24"), "finite number > 0"),
        (("run", "--fps", "nan"), "finite number > 0"),
        (("coldstart", "--fps", "inf"), "finite number > 0"),
        (("run", "--frames", "10"), "--frames: must be 8k+1"),
        (("bench", "--tokens", "15x"), "comma-separated"),
        (("bench", "--passes", "cond,uncond"), "subset"),
        (("run", "--tokens", "64", "--resolution", "64x64"), "cannot be combined"),
        (("run", "--video-stg", "1"), "stg_blocks is empty"),
        (("run", "--stg-blocks", "7", "--guidance", "dev"), "out of range"),
        (("run", "--video-stg", "1", "--stg-blocks", "2"), "out of range"),
        (("run", "--device", "tpu"), "--device"),
        (("profile", "--nsys-sqlite", "/nonexistent/x.sqlite"), "no such file"),
        (("run", "--video-rescale", "5"), "--video-rescale: expected a number in [0, 1]"),
        (("run", "--output", "/"), "--output: expected a file path, got '/' (a directory)"),  # before the run
        (("bench", "--json", "/"), "--json: expected a file path"),
        (("bench", "--no-peer", "--peer-executors", "eager"), "contradict"),
        (("compare", "/nonexistent/a.json", "/nonexistent/b.json"), "cannot read /nonexistent/a.json"),
        (("run", "--seed", "-1"), "--seed: expected an integer in [0, 2**63)"),  # before the model is built
        (("run", "--executors", "eager"), "unrecognized arguments: --executors eager (see `ltx2-graphs run --help`)"),
        (("bench", "--resolution", "64x64"), "(see `ltx2-graphs bench --help`)"),
        (("run", "--weights", "/tmp/ck.safetensors", "--output", "/tmp/ck.safetensors"),
         "--output and --weights name the same file"),  # the checkpoint would be overwritten by the latents
        (("run", "--output", "/tmp/o.json", "--json", "/tmp/o.json"), "--output and --json name the same file"),
        (("compare", "/tmp/b1.json", "/tmp/b2.json", "--json", "/tmp/b1.json"), "--json and BEFORE name the same"),
        (("profile", "--nsys-sqlite", "/tmp/r.sqlite", "--trace", "/tmp/r.sqlite"), "--trace and --nsys-sqlite"),
        (("profile", "--trace", "/"), "--trace: expected a file path"),
        (("profile", "--trace", "-"), "a trace is not written to stdout"),
        (("run", "--stg-blocks", "1"), "--stg-blocks has no effect"),  # hq runs no perturbed pass
        (("run", "--stages", "2", "--steps", "3"), "these stage-1 flags would change nothing: --steps"),
        (("run", "--stages", "2", "--guidance", "dev", "--audio-cfg", "2"), "change nothing: --guidance, --audio-cfg"),
    ],
)
def test_bad_arguments_give_one_line_and_nonzero_exit(capsys, argv, words):
    code, _, err = run_cli(capsys, *argv)
    lines = error_lines(err)
    assert code == 2, (code, err)
    assert len(lines) == 1, f"expected one error line, got: {lines}"
    assert words in lines[0]
    assert "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when no GPU is visible")
@pytest.mark.parametrize(
    "argv",
    [("run", "--executor", "graphs"), ("run", "--executor", "compile+graphs"), ("run", "--device", "cuda"),
     ("bench", "--executors", "eager,graphs"), ("profile",), ("bench", "--floor"), ("bench", "--attention", "cudnn"),
     ("run", "--nsys")],
)
def test_gpu_only_requests_on_cpu_give_one_clear_line(capsys, argv):
    code, _, err = run_cli(capsys, *argv)
    lines = error_lines(err)
    assert code == 3
    assert len(lines) == 1 and "GPU" in lines[0] and "hint:" in lines[0], lines
    assert "Traceback" not in err


def test_a_weights_folder_without_weights_says_so(capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", "--weights", str(tmp_path))
    assert code == 2 and "holds neither diffusion_pytorch_model.safetensors" in err
    assert "preset" not in err  # not misread as a checkpoint of another size


def test_stg_blocks_none_is_accepted_without_a_perturbed_pass(capsys):
    code, _, err = run_cli(capsys, "run", "--stg-blocks", "none", "--steps", "1", "--quiet")
    assert code == 0, err


def test_broken_checkpoints_are_named_as_broken(capsys, tmp_path):
    """A truncated file, a missing shard of an index: said as such, never as a checkpoint of another preset."""
    from pipeline.config import ModelConfig
    from pipeline.model import build_model
    from pipeline.weights import save_diffusers_transformer

    model = build_model(ModelConfig.preset("tiny"), device="cpu", dtype=torch.float32)
    folder = tmp_path / "transformer"
    save_diffusers_transformer(model, folder, max_shard_bytes=20_000)
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) > 1
    index = next(folder.glob("*.index.json"))
    code, _, err = run_cli(capsys, "run", "--weights", str(index), "--steps", "1", "--quiet")
    assert code == 0, err  # an index JSON is a checkpoint too
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(shards[0].read_bytes()[:5000])
    code, _, err = run_cli(capsys, "run", "--weights", str(truncated))
    assert code == 2 and "is not a readable safetensors file" in err and "interrupted download" in err, err
    shards[-1].unlink()
    code, _, err = run_cli(capsys, "run", "--weights", str(folder))
    assert code == 2 and "do not exist next to it" in err and shards[-1].name in err, err
    assert "preset" not in err


def test_a_model_larger_than_free_host_memory_is_refused_before_building(capsys, monkeypatch):
    import graphs.run_workload

    monkeypatch.setattr(graphs.run_workload, "available_host_bytes", lambda: 1000)
    code, _, err = run_cli(capsys, "run", "--device", "cpu")
    assert code == 3 and "this machine has 0.0 GB free" in err and "hint:" in err, err


def test_cpu_out_of_memory_is_exit_3():
    from graphs.cli import describe_error

    line, code = describe_error(RuntimeError("[enforce fail at alloc_cpu.cpp:119] DefaultCPUAllocator: can't "
                                             "allocate memory: you tried to allocate 80000000000 bytes"))
    assert code == 3 and line.startswith("out of memory:") and "GPU" not in line


def test_a_closed_stdout_ends_the_command_quietly(capsys, monkeypatch):
    """`ltx2-graphs run --json | head -1`: the reader leaving is not an error of the command."""
    import graphs.cli

    def reader_gone(args, progress):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(graphs.cli, "_run", reader_gone)
    monkeypatch.setattr(graphs.cli.os, "dup2", lambda fd, fd2: None)  # keep pytest's stdout
    code, _, err = run_cli(capsys, "run")
    assert code == 141 and "error" not in err


def test_debug_shows_the_traceback(capsys):
    code, _, err = run_cli(capsys, "run", "--video-stg", "1", "--debug")
    assert code == 2 and "Traceback" in err


def test_defaults_resolve_to_the_cpu_configuration():
    """No flags on a machine without a GPU: tiny preset, fp32, eager, HQ guidance (15 steps), sync check on."""
    from graphs.runner import options_from_args

    if torch.cuda.is_available():
        pytest.skip("the defaults differ on a GPU machine")
    options = options_from_args(build_parser().parse_args(["run"]))
    w = options.workload
    assert (w.preset, w.dtype, str(w.device), options.executor) == ("tiny", torch.float32, "cpu", "eager")
    assert options.steps is None and options.stages == (1,) and options.sync_check
    assert w.grid.num_video_tokens == 48 and w.text_tokens == 16
    assert w.overlap_audio is True


def test_fps_given_is_the_grid_fps_and_absent_is_the_default():
    from graphs.run_workload import CPU_DEFAULTS, grid_from_args

    default_pixels = CPU_DEFAULTS[3]
    for argv, fps in ((["--fps", "0.5"], 0.5), (["--fps", "30"], 30.0), ([], default_pixels[3])):
        args = build_parser().parse_args(["run", *argv])
        assert grid_from_args(args, default_pixels=default_pixels).fps == fps, argv


def test_no_audio_stream_flag_reaches_the_model():
    from graphs.run_workload import build_model, resolve_workload

    cpu = ["run", "--device", "cpu"]
    for argv, expected in ((cpu, True), ([*cpu, "--no-audio-stream"], False)):
        workload = resolve_workload(build_parser().parse_args(argv))
        assert workload.overlap_audio is expected
        assert build_model(workload, progress=lambda line: None).overlap_audio is expected


def test_fp8_flag_quantizes_the_model():
    from graphs.run_workload import build_model, resolve_workload
    from pipeline.fp8 import is_quantized

    for argv, expected in ((["run", "--device", "cpu"], False), (["run", "--device", "cpu", "--fp8"], True)):
        workload = resolve_workload(build_parser().parse_args(argv))
        assert workload.fp8 is expected and ("FP8" in workload.describe()) is expected
        assert is_quantized(build_model(workload, progress=lambda line: None)) is expected


def test_run_json_says_whether_the_projections_were_fp8(capsys):
    code, out, _ = run_cli(capsys, "run", "--device", "cpu", "--fp8", "--steps", "1", "--quiet", "--json", "-")
    data = json.loads(out)
    assert code == 0 and data["fp8"] is True and "FP8 projections" in data["workload"] and data["syncs"] == 0


def test_no_shared_text_kv_flag_reaches_the_graph_executor(monkeypatch):
    import graphs.executor
    from graphs.run_executors import make_executor
    from graphs.run_workload import build_model, resolve_workload

    monkeypatch.setattr(graphs.executor, "graphs_supported", lambda device: True)  # build it on CPU
    cpu = ["run", "--device", "cpu"]
    for argv, expected in ((cpu, True), ([*cpu, "--no-shared-text-kv"], False)):
        workload = resolve_workload(build_parser().parse_args(argv))
        assert workload.share_text_kv is expected
        assert ("text K/V per pass" in workload.describe()) is not expected
        model = build_model(workload, progress=lambda line: None)
        assert make_executor("graphs", model, share_text_kv=workload.share_text_kv).share_text_kv is expected


def test_default_run_on_cpu(capsys, tmp_path):
    """`ltx2-graphs run` with its defaults (4 of the 15 steps, to keep CI fast): 0 syncs, table, JSON, output."""
    out_file = tmp_path / "out" / "latents.safetensors"
    json_file = tmp_path / "summary.json"
    code, out, err = run_cli(capsys, "run", "--steps", "4", "--output", str(out_file), "--json", str(json_file))
    assert code == 0, err
    assert "stage1" in out and "host syncs" in out  # the table was printed
    summary = json.loads(json_file.read_text())
    assert summary["preset"] == "tiny" and summary["executor"] == "eager" and summary["device"] == "cpu"
    stage = summary["stages"][0]
    assert stage["steps"] == 4 and stage["evaluations"] == 7 and stage["transformer_calls"] == 21
    assert stage["passes"] == ["cond", "neg", "modality"]
    assert len(stage["step_ms"]) == 4 and all(t > 0 for t in stage["step_ms"])
    assert stage["syncs"]["detector"] == "dispatch" and stage["syncs"]["count"] == 0
    assert summary["syncs"] == 0
    # The output file: complete, named tensors, metadata, and no temporary left behind.
    with safe_open(str(out_file), "pt") as f:
        assert set(f.keys()) == {"video", "audio"}
        assert f.get_tensor("video").shape == (1, 48, 128)
        assert torch.isfinite(f.get_tensor("video")).all()
        assert f.metadata()["preset"] == "tiny"
        # Everything else that makes two runs' latents differ: steps, dtype, FP8, weights, the guidance as run.
        settings = json.loads(f.metadata()["settings"])
        assert settings == summary["settings"]
        assert (settings["steps"], settings["dtype"], settings["fp8"], settings["weights"]) == (4, "float32", False, None)
        assert settings["guidance"]["video"]["cfg"] == 3.0 and f.metadata()["guidance"] == "hq"
    assert [p.name for p in out_file.parent.iterdir()] == ["latents.safetensors"]


def test_changed_guidance_and_stage_2_alone_are_named_as_such(capsys):
    code, out, _ = run_cli(capsys, "run", "--steps", "1", "--quiet", "--json", "--video-cfg", "1", "--audio-cfg", "1")
    assert code == 0 and json.loads(out)["guidance"] == "hq, changed by flags"  # not "hq": only cond + modality ran
    code, out, _ = run_cli(capsys, "run", "--stages", "2", "--quiet", "--json", "--sync-check", "off")
    assert code == 0 and json.loads(out)["guidance"] == "none (stage 2 only, unguided)"
    assert json.loads(out)["settings"]["steps"] is None


def test_a_failed_output_write_still_reports_the_run(capsys, tmp_path, monkeypatch):
    """The write came before the report: a disk that filled during the run lost the table and the --json."""
    import graphs.runner

    def disk_full(path, tensors, metadata):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(graphs.runner, "write_safetensors_atomic", disk_full)
    json_file = tmp_path / "summary.json"
    code, out, err = run_cli(capsys, "run", "--steps", "1", "--output", str(tmp_path / "x.safetensors"), "--json",
                             str(json_file))
    assert code == 2 and "stage1" in out and "final latents NOT written" in out and "No space left" in out
    assert "--output: cannot write" in err and "the report above is complete" in err
    assert json.loads(json_file.read_text())["output_error"].startswith("cannot write")


@pytest.mark.parametrize("flag", [["--no-shared-text-kv"], ["--no-audio-stream"], ["--gpu-busy", "off"]])
def test_flags_that_change_nothing_on_cpu_eager_are_refused(capsys, flag):
    code, _, err = run_cli(capsys, "run", "--device", "cpu", "--steps", "1", *flag)
    assert code == 2 and f"{' '.join(flag)} would change nothing with executor eager on cpu" in err


def test_json_to_stdout_is_pure_json(capsys):
    code, out, _ = run_cli(capsys, "run", "--steps", "1", "--quiet", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["stages"][0]["transformer_calls"] == 3  # one terminal step: 1 evaluation x 3 passes


def test_quiet_prints_no_progress(capsys):
    code, _, err = run_cli(capsys, "run", "--steps", "1", "--quiet")
    assert code == 0 and err == ""


@pytest.mark.skipif(shutil.which("ltx2-graphs") is None, reason="console script not installed (pip install -e .)")
def test_installed_console_script(tmp_path):
    proc = subprocess.run(
        ["ltx2-graphs", "run", "--steps", "1", "--quiet", "--json", str(tmp_path / "s.json")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "s.json").read_text())["syncs"] == 0
    bad = subprocess.run(["ltx2-graphs", "run", "--steps", "-3"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_parser_is_built_without_importing_the_model():
    """--help and argument errors must stay cheap: building the parser imports no model code."""
    before = set(sys.modules)
    build_parser()
    assert not any(m.startswith("pipeline.model") for m in set(sys.modules) - before)


def test_flag_vocabularies_match_their_sources():
    """The parser keeps torch-free copies of the executor and pass names; they must not drift from the originals."""
    from graphs import cli
    from graphs.run_executors import EXECUTOR_NAMES
    from pipeline.passes import PASS_NAMES

    assert cli.EXECUTORS == EXECUTOR_NAMES and cli.PASS_NAMES == PASS_NAMES


@pytest.mark.parametrize("error, start", [
    ("CaptureError", "CUDA graph capture failed:"),
    ("GraphMissError", "CUDA graph capture failed:"),
    ("BlindProfilerError", "refusing to report host syncs"),
])
def test_capture_and_blind_profiler_errors_exit_3_with_a_hint(error, start):
    """The README's exit status 3 for a failed capture and a blind profiler, checked without a GPU."""
    from graphs import errors
    from graphs.cli import describe_error
    from profiling import report

    cls = getattr(errors, error, None) or getattr(report, error)
    line, code = describe_error(cls("refusing to report host syncs" if error == "BlindProfilerError" else "boom"))
    assert code == 3 and line.startswith(start) and "hint:" in line


def test_an_interrupted_run_exits_130(capsys, monkeypatch):
    import graphs.runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(graphs.runner, "run", interrupted)
    code, _, err = run_cli(capsys, "run", "--device", "cpu", "--steps", "1")
    assert code == 130 and "ltx2-graphs run: interrupted" in err

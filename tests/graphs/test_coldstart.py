"""`ltx2-graphs coldstart`: the fresh-cache switch, the phase accounting and the command end to end.

On CPU the command runs with the eager executor (an inductor compile of even the tiny preset takes ~45 s of C++
builds on two cores with empty caches); the compiled cold start runs in the GPU test at the end.
"""

from __future__ import annotations

import json
import os
import sys
import time
import types

import pytest
import torch

from graphs.cli import main
from graphs.coldstart import (
    CACHE_ENV,
    PHASES,
    ColdStart,
    bytecode_hint,
    format_cold_start,
    fresh_compile_caches,
    measure,
    modules_without_bytecode,
    pass_specs,
    phase_seconds,
)

# Clearing inductor's caches imports torch modules that still use torch.jit.script_method (torch's own notice).
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def _local_cache_path() -> str:
    from torch._inductor.codecache import CacheBase

    return str(CacheBase.get_local_cache_path())  # memoised for the process: why the caches must be cleared


def test_fresh_caches_point_everything_at_an_empty_directory_and_restore_it(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    before = _local_cache_path()
    assert before.startswith(str(tmp_path))
    with fresh_compile_caches() as tmp:
        for name in CACHE_ENV:
            assert os.environ[name].startswith(tmp)
        assert [files for _, _, files in os.walk(tmp) if files] == []  # nothing cached yet
        assert _local_cache_path().startswith(tmp)  # the memoised path moved too
    assert not os.path.exists(tmp)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
    assert "TRITON_CACHE_DIR" not in os.environ
    assert _local_cache_path() == before


def test_a_compile_under_fresh_caches_writes_there_and_later_ones_do_not(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))

    def f(x):
        return torch.sin(x) * 2 + 1

    x = torch.randn(8)
    with fresh_compile_caches() as tmp:
        torch.testing.assert_close(torch.compile(f)(x), f(x))
        assert [files for _, _, files in os.walk(os.path.join(tmp, "inductor")) if files]  # compiled into tmp
    torch.testing.assert_close(torch.compile(f)(x), f(x))  # compiles again (in-process caches cleared) ...
    assert [files for _, _, files in os.walk(tmp_path / "inductor") if files]  # ... into the restored cache
    assert not os.path.exists(tmp)


def test_fresh_caches_restore_the_environment_on_error(monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", "/somewhere/triton")
    with pytest.raises(RuntimeError, match="boom"), fresh_compile_caches():
        raise RuntimeError("boom")
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    assert os.environ["TRITON_CACHE_DIR"] == "/somewhere/triton"


def test_phase_seconds_are_differences_and_missing_counters_say_so():
    first_key, second_key = PHASES[0][1], PHASES[1][1]
    before = {first_key: 1.0}
    after = {first_key: 4.5, second_key: 2.0}
    phases = phase_seconds(before, after)
    assert phases[PHASES[0][0]] == pytest.approx(3.5)
    assert phases[PHASES[1][0]] == pytest.approx(2.0)  # absent before = 0
    assert all(phases[label] is None for label, _ in PHASES[2:])  # not counted by this "torch"


def test_dev_guidance_on_a_shallow_preset_uses_its_last_block():
    specs = {s.name: s for s in pass_specs("dev", num_layers=2)}
    assert set(specs) == {"cond", "neg", "perturbed", "modality"}
    assert specs["perturbed"].skip_video_self_attn_blocks == (1,)
    assert [s.name for s in pass_specs("hq", num_layers=48)] == ["cond", "neg", "modality"]


@pytest.mark.parametrize("name", ["hq", "dev"])
def test_coldstart_and_run_warm_up_the_passes_of_one_fitted_guidance(name):
    """`fitted_guidance` is the one preset-to-passes path: coldstart's passes and run's guidance both come from it."""
    from graphs.cli import build_parser
    from graphs.run_workload import fitted_guidance
    from graphs.runner import options_from_args
    from pipeline.passes import pass_specs_for

    options = options_from_args(build_parser().parse_args(["run", "--device", "cpu", "--guidance", name]))
    layers = options.workload.config.num_layers
    fitted, note = fitted_guidance(name, layers)
    assert options.guidance == fitted and max(fitted.stg_blocks, default=0) < layers
    assert pass_specs(name, layers) == pass_specs_for(options.guidance)
    assert (note is not None) == (name == "dev")  # the tiny preset lacks dev's block 28
    explicit = options_from_args(build_parser().parse_args(["run", "--device", "cpu", "--guidance", name,
                                                            "--video-stg", "1", "--stg-blocks", "0"]))
    assert explicit.guidance.stg_blocks == (0,) and explicit.notes == ()  # named blocks: never moved, no note


def test_report_lists_the_phases_and_says_which_were_not_recorded():
    phases = {label: None for label, _ in PHASES}
    phases[PHASES[0][0]] = 12.5
    result = ColdStart(workload="w", executor="compile", passes=("cond",), cache="fresh", build_s=1.0,
                       warmup_s=13.0, captures=None, compiles=4, phases=phases, import_s=2.0)
    text = format_cold_start(result)
    assert "total                     14.0 s" in text and "(4 compile(s))" in text and "2.0 s" in text
    assert f"{PHASES[0][0]:36s}   12.5 s" in text
    assert text.count("not recorded in this run") == len(PHASES) - 1
    assert "modules first imported" not in text  # none imported: no line


def test_report_counts_modules_imported_inside_the_window_and_those_without_bytecode():
    result = ColdStart(workload="w", executor="compile", passes=("cond",), cache="warm", build_s=1.0,
                       warmup_s=2.0, captures=None, compiles=1, modules_imported=812)
    assert format_cold_start(result).endswith("812 Python modules first imported inside the window")
    result.modules_from_source = 700
    assert "812 Python modules first imported inside the window, 700 of them compiled from source" in \
        format_cold_start(result)
    assert format_cold_start(result).endswith(f"(hint: {bytecode_hint()})")


@pytest.mark.parametrize("writing_off", [True, False])
def test_bytecode_hint_names_the_cause_and_the_remedy(monkeypatch, writing_off):
    monkeypatch.setattr(sys, "dont_write_bytecode", writing_off)
    hint = bytecode_hint()
    assert "PYTHONPYCACHEPREFIX" in hint
    assert ("PYTHONDONTWRITEBYTECODE" in hint) == writing_off and ("look read-only" in hint) != writing_off


def test_modules_without_bytecode_are_sources_whose_bytecode_file_is_missing(monkeypatch, tmp_path):
    source = tmp_path / "m.py"
    source.write_text("")
    compiled = tmp_path / "m.cpython.pyc"
    modules = {"no_pyc": types.SimpleNamespace(__file__=str(source), __cached__=str(tmp_path / "gone.pyc")),
               "with_pyc": types.SimpleNamespace(__file__=str(source), __cached__=str(compiled)),
               "extension": types.SimpleNamespace(__file__=str(tmp_path / "m.so"), __cached__=None),
               "builtin": types.SimpleNamespace()}
    compiled.write_bytes(b"")
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, f"ltx2_test_{name}", module)
    assert modules_without_bytecode([f"ltx2_test_{name}" for name in modules]) == 1


def test_nothing_before_the_window_imports_dynamo_or_inductor():
    """A new process imports dynamo (828 modules, 1.8-5.5 s on a CPU machine) and inductor at its first compile:
    inside the window. Reading the counters and clearing the caches first imported them, so their cost fell into
    neither the window nor the `import torch` figure. Checked in a fresh interpreter."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from graphs.coldstart import compile_counters, fresh_compile_caches\n"
        "assert compile_counters() == {}\n"
        "with fresh_compile_caches():\n"
        "    pass\n"
        "print(sorted(m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr


def test_measure_rejects_an_unknown_cache_mode():
    with pytest.raises(ValueError, match="cache must be 'fresh' or 'warm', got 'cold'"):
        measure(None, "eager", "hq", "cold", progress=None)


@pytest.mark.parametrize("cache", ["fresh", "warm"])
def test_coldstart_command_with_each_cache_mode_on_cpu(capsys, cache):
    code = main(["coldstart", "--executor", "eager", "--cache", cache, "--quiet"])
    assert code == 0
    assert f"cold start ({cache} compile caches)" in capsys.readouterr().out


def test_coldstart_command_on_cpu(capsys, tmp_path):
    out_file = tmp_path / "cold.json"
    code = main(["coldstart", "--executor", "eager", "--json", str(out_file), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert "cold start (fresh compile caches)" in out and "build model" in out and "total" in out
    data = json.loads(out_file.read_text())
    assert data["passes"] == ["cond", "neg", "modality"] and data["executor"] == "eager"
    assert data["total_s"] == pytest.approx(data["build_s"] + data["warmup_s"])
    assert isinstance(data["modules_imported"], int) and isinstance(data["modules_from_source"], int)
    assert data["import_s"] > 0  # the text's "not included: importing torch" line, in the JSON too


def test_compile_and_capture_include_making_the_executor(monkeypatch):
    """A compiled executor imports dynamo when it is made, before `warm_up` starts its own clock: that second
    or more was in no line of the report."""
    import graphs.coldstart as coldstart
    from graphs.cli import build_parser
    from graphs.run_workload import resolve_workload

    real = coldstart.make_executor

    def slow_make(*args, **kwargs):
        time.sleep(0.3)
        return real(*args, **kwargs)

    monkeypatch.setattr(coldstart, "make_executor", slow_make)
    workload = resolve_workload(build_parser().parse_args(["coldstart", "--device", "cpu"]))
    result = coldstart.measure(workload, "eager", "hq", "warm", lambda line: None)
    assert result.warmup_s >= 0.3


def test_coldstart_refuses_graphs_without_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only error")
    code = main(["coldstart", "--executor", "compile+graphs", "--quiet"])
    assert code == 3
    assert "needs a GPU" in capsys.readouterr().err


@pytest.mark.cuda
def test_compiled_cold_start_on_the_gpu(capsys, tmp_path):
    """Fresh caches: everything compiles (counted), every hq pass is captured, and the phases are accounted."""
    out_file = tmp_path / "cold.json"
    code = main(["coldstart", "--preset", "small", "--tokens", "256", "--json", str(out_file), "--quiet"])
    assert code == 0, capsys.readouterr().err
    data = json.loads(out_file.read_text())
    assert data["executor"] == "compile+graphs" and data["cache"] == "fresh"
    assert data["captures"] == 3 and data["compiles"] >= 4  # four block regions, more with pass variants
    compile_total = data["phases"][PHASES[0][0]]
    assert compile_total is not None and 0 < compile_total <= data["warmup_s"]

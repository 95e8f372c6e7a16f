"""`ltx2-graphs profile --nsys-sqlite` on synthetic exports (no GPU), built with the profiling tests' own
writer (`tests/profiling/test_nsys_sqlite.py`, documented nsys schema) from their synthetic run; and the live
CUPTI profile on a GPU."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from graphs.cli import main

PROFILING_TESTS = Path(__file__).resolve().parents[1] / "profiling"


@pytest.fixture
def export_writer(monkeypatch):
    """(write_export, make_timeline) from the profiling tests, importable the way pytest imports them."""
    monkeypatch.syspath_prepend(str(PROFILING_TESTS))
    nsys_tests = importlib.import_module("test_nsys_sqlite")
    attribution_tests = importlib.import_module("test_range_attribution")
    return nsys_tests.write_export, attribution_tests.make_timeline


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_profile_reads_an_nsys_export(capsys, tmp_path, export_writer):
    write_export, make_timeline = export_writer
    path = tmp_path / "run.sqlite"
    write_export(path, make_timeline())
    report_json, trace = tmp_path / "report.json", tmp_path / "trace.json"
    code, out, err = run_cli(capsys, "profile", "--nsys-sqlite", str(path), "--json", str(report_json),
                             "--trace", str(trace))
    assert code == 1, err  # the synthetic run has unexpected syncs: exit 1 so CI can gate on it
    assert "step #" in out and "UNEXPECTED" in out and "positive control seen" in out
    data = json.loads(report_json.read_text())
    assert data["unexpected_syncs"] == 3 and data["reports"]["nsys"]["control"] == "seen"
    assert json.loads(trace.read_text())["traceEvents"]


def test_profile_kernels_table_from_an_nsys_export(capsys, tmp_path, export_writer):
    write_export, make_timeline = export_writer
    path = tmp_path / "run.sqlite"
    write_export(path, make_timeline())  # "loop" 1000-10000 ns; kernels k1 1.2 us, k2 1.0 us, k3 0.1 us
    code, out, _ = run_cli(capsys, "profile", "--nsys-sqlite", str(path), "--kernels", "2")
    assert code == 1  # the synthetic run's unexpected syncs still decide the exit status
    assert "3 kernels of 3 names" in out and "idle gap" in out
    table = out[out.index("% of kernel time"):]
    assert "k1" in table and "k2" in table and "k3" not in table  # top 2 only
    code, out, _ = run_cli(capsys, "profile", "--nsys-sqlite", str(path), "--kernels", "5", "--json")
    kernels = json.loads(out)["kernels"]["nsys"]
    assert [k["name"] for k in kernels["top_kernels"]] == ["k1", "k2", "k3"] and kernels["window_ns"] == 9000


def test_profile_refuses_an_export_without_the_control(capsys, tmp_path, export_writer):
    write_export, make_timeline = export_writer
    path = tmp_path / "clean.sqlite"
    write_export(path, make_timeline(control=False))
    code, _, err = run_cli(capsys, "profile", "--nsys-sqlite", str(path))
    lines = [line for line in err.splitlines() if not line.startswith("[")]
    assert code == 2 and len(lines) == 1 and "refusing" in lines[0] and "--no-control" in lines[0]
    code, out, _ = run_cli(capsys, "profile", "--nsys-sqlite", str(path), "--no-control", "--json")
    assert json.loads(out)["reports"]["nsys"]["control"] == "absent"


def test_profile_rejects_a_file_that_is_not_sqlite(capsys, tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("not a database")
    code, _, err = run_cli(capsys, "profile", "--nsys-sqlite", str(bad))
    lines = [line for line in err.splitlines() if not line.startswith("[")]
    assert code == 2 and len(lines) == 1 and "nsys SQLite export" in lines[0]


def test_no_control_is_refused_in_live_mode(capsys):
    code, _, err = run_cli(capsys, "profile", "--no-control")  # before any GPU check: no device needed
    lines = [line for line in err.splitlines() if not line.startswith("[")]
    assert code == 2 and len(lines) == 1
    assert "--no-control applies to --nsys-sqlite" in lines[0] and "hint:" in lines[0]


def test_run_flags_are_refused_with_an_export(capsys, tmp_path, export_writer):
    write_export, make_timeline = export_writer
    path = tmp_path / "run.sqlite"
    write_export(path, make_timeline())
    code, _, err = run_cli(capsys, "profile", "--nsys-sqlite", str(path), "--preset", "small", "--steps", "3",
                           "--resolution", "64x64", "--no-audio-stream", "--stages", "1,2")
    lines = [line for line in err.splitlines() if not line.startswith("[")]
    assert code == 2 and len(lines) == 1
    for flag in ("--preset small", "--steps 3", "--resolution 64x64", "--no-audio-stream", "--stages 1,2"):
        assert flag in lines[0], flag
    # flags at profile's defaults (--steps 2 included) are indistinguishable from absent ones: accepted
    code, _, err = run_cli(capsys, "profile", "--nsys-sqlite", str(path), "--steps", "2", "--preset", "auto")
    assert code == 1, err  # analysed (the synthetic run's unexpected syncs give 1)


def test_every_loop_flag_is_named_by_its_dest():
    """`loop_flags_given` writes "--" + dest: true of every model/shape/guidance/execution flag."""
    from graphs.cli import OneLineParser, add_loop_flags

    loop = OneLineParser(add_help=False)
    add_loop_flags(loop)
    for action in loop._actions:
        assert "--" + action.dest.replace("_", "-") in action.option_strings, action.option_strings


# A value away from profile's default for every loop flag that takes one (a new flag fails the test below until it
# is listed here, so `--nsys-sqlite` is checked to refuse it too).
LOOP_FLAG_VALUES = {
    "weights": "ck.safetensors", "device": "cpu", "seed": "5", "resolution": "64x64", "frames": "17", "fps": "30",
    "tokens": "96", "audio_tokens": "7", "text_tokens": "8", "steps": "3", "video_cfg": "2", "video_stg": "1",
    "video_rescale": "0.5", "video_modality": "2", "audio_cfg": "2", "audio_stg": "1", "audio_rescale": "0.5",
    "audio_modality": "2", "stg_blocks": "1", "stages": "1,2",
}


def test_every_loop_flag_away_from_its_default_is_seen():
    """`loop_flags_given` (what `--nsys-sqlite` refuses) must see each loop flag, not a hand-picked few."""
    import argparse

    from graphs.cli import OneLineParser, add_loop_flags, build_parser
    from graphs.cli_profile import loop_flags_given

    loop = OneLineParser(add_help=False)
    add_loop_flags(loop)
    for action in loop._actions:
        flag = "--" + action.dest.replace("_", "-")
        if isinstance(action, argparse._StoreTrueAction):
            argv = [flag]
        elif action.choices:
            argv = [flag, next(c for c in action.choices if c != action.default)]
        else:
            argv = [flag, LOOP_FLAG_VALUES[action.dest]]
        args = build_parser().parse_args(["profile", "--nsys-sqlite", "run.sqlite", *argv])
        assert any(given.split()[0] == flag for given in loop_flags_given(args)), argv


@pytest.mark.cuda
def test_live_profile_on_gpu(capsys, tmp_path):
    pytest.importorskip("cupti")
    trace = tmp_path / "trace.json"
    code, out, err = run_cli(capsys, "profile", "--preset", "small", "--tokens", "256", "--steps", "2",
                             "--trace", str(trace), "--quiet", "--json")
    data = json.loads(out)
    assert code == 0, (data.get("unexpected_syncs"), err)
    report = data["reports"]["stage1"]
    assert report["control"] == "seen" and report["unexpected_syncs"] == 0
    assert any(r["name"].startswith("replay") for r in report["ranges"])
    assert json.loads(trace.read_text())["traceEvents"]

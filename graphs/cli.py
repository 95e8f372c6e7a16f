"""The `ltx2-graphs` command: `run`, `bench`, `compare`, `coldstart` and `profile`, with one set of flags shared
where they mean the same.

This module only parses arguments and turns failures into one line; the work lives in `graphs.runner` (run),
`graphs.bench` (bench), `graphs.bench_compare` (compare), `graphs.coldstart` (coldstart) and `graphs.cli_profile`
(profile). Every value called
"auto" is resolved once the device is known (`graphs.run_workload`): on a machine without a GPU the defaults are
the tiny preset, fp32, eager passes and the dispatch-level sync detector, so `ltx2-graphs run` finishes in
seconds; with a GPU they are the `ltx2.3` preset in bf16 with one CUDA graph per guidance pass.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import traceback
from collections.abc import Sequence

from graphs.cli_console import CommandError, Progress, one_line, shorten

PROG = "ltx2-graphs"
# Copies of graphs.run_executors.EXECUTOR_NAMES and pipeline.passes.PASS_NAMES (importing those would import torch
# before --help); tests/graphs/test_cli.py checks that they agree.
EXECUTORS = ("eager", "graphs", "compile", "compile+graphs")
PASS_NAMES = ("cond", "neg", "perturbed", "modality")
NO_TEXT_ENCODER = (
    "There is no text encoder in this project: the positive and negative text contexts are random seeded tensors "
    "of the widths the transformer expects after the text connector (what matters for speed is their shape)."
)


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (message plus where to look), exit status 2.

    argparse prints the whole usage block before the error; for a command with many flags that buries the one
    line that says what is wrong.
    """

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


# ---------------------------------------------------------------------------------------------------------------
# argument types: each raises ArgumentTypeError naming the value seen and the value expected


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def seed(text: str) -> int:
    """A seed for the random weights, texts and noise: an integer in [0, 2**63) (`pipeline.noise`)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**63), got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0.0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (a rate such as --fps, where 0 means nothing and must not fall back to a default)."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0.0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def unit_fraction(text: str) -> float:
    """A number in [0, 1] (a blend strength such as --video-rescale)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def output_file(text: str) -> str:
    """A file to write at the end ('-' for --json: stdout), checked now so that a bad path fails before a long run,
    not after it: not a directory, and inside a directory that exists and is writable or can be created."""
    if text == "-":
        return text
    if not text or os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"expected a file path, got {text!r}" + (" (a directory)" if text else ""))
    parent = os.path.dirname(os.path.abspath(text))
    existing = parent
    while not os.path.isdir(existing):  # the nearest directory that exists (the rest is created when writing)
        if os.path.exists(existing):
            raise argparse.ArgumentTypeError(f"cannot write {text!r}: {existing!r} is not a directory")
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: directory {existing!r} is not writable")
    return text


def trace_file(text: str) -> str:
    """A trace file to write (`output_file`, but a trace never goes to stdout: '-' is refused, not a file named -)."""
    if text == "-":
        raise argparse.ArgumentTypeError("expected a file path (a trace is not written to stdout), got '-'")
    return output_file(text)


def resolution(text: str) -> tuple[int, int]:
    """'WxH' in pixels, each a positive multiple of 32 (the VAE's spatial stride) -> (width, height)."""
    parts = text.lower().split("x")
    try:
        width, height = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT in pixels such as 960x544, got {text!r}") from None
    if width < 32 or height < 32 or width % 32 or height % 32:
        raise argparse.ArgumentTypeError(
            f"width and height must be positive multiples of 32 (the VAE stride), got {width}x{height}"
        )
    return width, height


def frame_count(text: str) -> int:
    """A pixel frame count 8k+1 (1, 9, ..., 121): the VAE keeps the first frame and compresses time by 8."""
    frames = positive_int(text)
    if (frames - 1) % 8:
        raise argparse.ArgumentTypeError(f"must be 8k+1 (the VAE's time stride is 8) such as 121, got {frames}")
    return frames


def int_list(text: str) -> tuple[int, ...]:
    """'1536,8160' -> (1536, 8160); every item a positive integer."""
    try:
        values = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers such as 1536,8160, got {text!r}")
    return _once_each(values, text)


def _once_each(values: tuple, text: str) -> tuple:
    """`values` when none repeats: a list naming an item twice would time (and report) it twice."""
    twice = sorted({str(v) for v in values if values.count(v) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"{', '.join(twice)} named more than once in {text!r}; expected each once")
    return values


def block_list(text: str) -> tuple[int, ...]:
    """STG block indices: '28' or '28,29' or 'none' (no block skipped)."""
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        values = tuple(int(p) for p in text.split(","))
    except ValueError:
        values = (-1,)
    if min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected block indices such as 28 or 28,29 (or 'none'), got {text!r}")
    return values


def stages(text: str) -> tuple[int, ...]:
    allowed = {"1": (1,), "2": (2,), "1,2": (1, 2)}
    if text not in allowed:
        raise argparse.ArgumentTypeError(f"expected 1, 2 or 1,2, got {text!r}")
    return allowed[text]


def choice_list(choices: Sequence[str], *, allow_none: bool = False):
    """A comma-separated subset of `choices`, order kept, e.g. 'eager,graphs' ('none' = empty when allowed)."""

    def parse(text: str) -> tuple[str, ...]:
        if allow_none and text.strip().lower() == "none":
            return ()
        values = tuple(p.strip() for p in text.split(",") if p.strip())
        bad = [v for v in values if v not in choices]
        if not values or bad:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(choices)}, got {text!r}")
        return _once_each(values, text)

    return parse


# ---------------------------------------------------------------------------------------------------------------
# flag groups shared by the subcommands


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--preset",
        default="auto",
        choices=("auto", "tiny", "small", "ltx2.3"),
        help="model size: tiny (CPU tests), small, ltx2.3 (48 layers, ~19 B parameters, ~38 GB in bf16). "
        "auto: ltx2.3 on a GPU, tiny on CPU",
    )
    group.add_argument(
        "--weights",
        metavar="PATH",
        help="real weights: a Lightricks single-file .safetensors checkpoint or a diffusers transformer directory "
        "(default: random weights from --seed; their numerics are meaningless but their speed is real)",
    )
    group.add_argument(
        "--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"), help="auto: bf16 on a GPU, fp32 on CPU"
    )
    group.add_argument(
        "--device", default="auto", help="auto (cuda when a GPU is visible, else cpu), cpu, cuda, cuda:N"
    )
    group.add_argument("--seed", type=seed, default=0, help="seed for random weights, text contexts and noise")
    group.add_argument(
        "--no-audio-stream",
        action="store_true",
        help="run the audio chain on the video chain's CUDA stream (default: on a side stream next to it, so its "
        "small kernels overlap the video work; the results are bitwise the same)",
    )
    group.add_argument(
        "--fp8",
        action="store_true",
        help="FP8 (e4m3) GEMMs for the projections of video and text tokens: per-channel weight scales, per-token "
        "input scales (pipeline/fp8.py). ~1.8x the bf16 GEMM rate (GEMMs alone, H200), at the cost of precision: a "
        "speed/quality trade, not parity (bench --fp8 reports the error against bf16). Default: bf16 everywhere",
    )
    group.add_argument(
        "--no-shared-text-kv",
        action="store_true",
        help="graph executors: every pass computes its own text keys/values (default: the passes of one "
        "evaluation that read the same text share them, computed once by the first; the results are bitwise the "
        "same)",
    )


def add_shape_flags(parser: argparse.ArgumentParser, *, many_tokens: bool) -> None:
    group = parser.add_argument_group(
        "shape", "video token counts (--tokens)" if many_tokens else
        "video size in pixels (--resolution/--frames/--fps) or directly as a token count (--tokens)"
    )
    if many_tokens:
        group.add_argument(
            "--tokens",
            type=int_list,
            metavar="LIST",
            help="video token counts to benchmark, comma-separated (auto: 1536,8160 on a GPU = the two-stage and "
            "HQ stage-1 grids; a small grid on CPU)",
        )
    else:
        group.add_argument("--resolution", type=resolution, help="WIDTHxHEIGHT in pixels (multiples of 32)")
        group.add_argument("--frames", type=frame_count, help="number of pixel frames, 8k+1 such as 121")
        group.add_argument("--fps", type=positive_float, help="frame rate (sets audio length and RoPE time)")
        group.add_argument(
            "--tokens", type=positive_int, metavar="N", help="video token count instead of a resolution"
        )
    group.add_argument(
        "--audio-tokens", type=positive_int, metavar="N",
        help="audio token count (default: from the frames: 126 for 121 frames at 24 fps)",
    )
    group.add_argument(
        "--text-tokens", type=positive_int, metavar="N", help="text tokens per prompt (auto: 1024 on a GPU, 16 on CPU)"
    )


def add_guidance_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "guidance", "which passes run each step and how they combine. Stage 1 is the res2s sampler over the "
        "LTX-2.3 schedule (2 evaluations per step, 1 for the last); hq: passes cond, neg, modality; dev: all four "
        "(cond, neg, perturbed = STG on block 28, modality). Stage 2 is unguided (cond only)"
    )
    group.add_argument("--guidance", default="hq", choices=("hq", "dev"),
                       help="guidance preset (default hq): its scales and passes; the sampler stays res2s with "
                       "--steps (the reference's dev pipeline samples with Euler, 30 steps, anchored at 4096 tokens)")
    group.add_argument("--steps", type=positive_int, metavar="N",
                       help="stage-1 sampler steps (default 15; profile: 2)")
    for modality in ("video", "audio"):
        group.add_argument(f"--{modality}-cfg", type=non_negative_float, metavar="X", help=f"{modality} CFG scale")
        group.add_argument(f"--{modality}-stg", type=non_negative_float, metavar="X", help=f"{modality} STG scale")
        group.add_argument(
            f"--{modality}-rescale", type=unit_fraction, metavar="X", help=f"{modality} rescale (0..1)"
        )
        group.add_argument(
            f"--{modality}-modality", type=non_negative_float, metavar="X", help=f"{modality} modality-isolation scale"
        )
    group.add_argument("--stg-blocks", type=block_list, metavar="LIST", help="blocks skipped by STG (e.g. 28, none)")


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument(
        "--json",
        nargs="?",
        const="-",
        type=output_file,
        metavar="FILE",
        help="write the summary as JSON to FILE (bare --json: to stdout, instead of the table)",
    )
    group.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    group.add_argument("--debug", action="store_true", help="show the full traceback on errors")


def add_execution_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("execution")
    group.add_argument(
        "--executor",
        default="auto",
        choices=("auto", *EXECUTORS),
        help="how each guidance pass runs: eager, graphs (one CUDA graph per pass, GPU only), compile "
        "(regional torch.compile), compile+graphs (compiled blocks captured per pass, GPU only). "
        "auto: graphs on a GPU, eager on CPU",
    )
    group.add_argument(
        "--stages",
        type=stages,
        default=(1,),
        metavar="STAGES",
        help="1 (default), 2 or 1,2. Stage 2 refines at twice the width and height of the grid given; there is no "
        "latent upsampler here, so stage 1's latents are repeated 2x2 (or random with --stages 2 alone)",
    )
    group.add_argument(
        "--sync-check",
        default="on",
        choices=("on", "off"),
        help="check the denoising loop for host syncs: the dispatch-level detector on CPU, CUDA sync debug mode "
        "(warn) on a GPU (default on). `run` reports them and then exits with status 4 (graph captures of cache "
        "misses are warned about instead)",
    )


def add_loop_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of every command that runs the denoising loop (`run`, `profile`)."""
    add_model_flags(parser)
    add_shape_flags(parser, many_tokens=False)
    add_guidance_flags(parser)
    add_execution_flags(parser)


def build_parser() -> OneLineParser:
    parser = OneLineParser(
        prog=PROG,
        description="Sync-free, per-pass CUDA-graph execution of the LTX-2.3 audio-video denoising loop. "
        + NO_TEXT_ENCODER,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,bench,compare,coldstart,profile}")

    run = sub.add_parser(
        "run",
        help="run the denoising loop and print a per-step summary",
        description="Run stage 1 (and/or 2) of the LTX-2.3 denoising loop with the chosen pass executor and print "
        "per-step time, transformer calls, graph captures, host syncs seen and GPU busy. " + NO_TEXT_ENCODER,
    )
    add_loop_flags(run)
    run.add_argument(
        "--gpu-busy",
        default="auto",
        choices=("auto", "off"),
        help="measure kernel time / wall time of each stage loop with the CUPTI profiler (auto: when "
        "ltx2-graphs[cupti] is installed and a GPU is used; it records every kernel, which adds seconds to long "
        "eager runs). Without it the column shows an upper bound from CUDA events",
    )
    run.add_argument(
        "--nsys",
        action="store_true",
        help="for recording under Nsight Systems: wrap each stage loop in the NVTX region 'profile' (domain ltx2) "
        "that starts with the positive control, and leave CUPTI to nsys (no --gpu-busy). Record with "
        "`nsys profile --trace=cuda,nvtx --cuda-graph-trace=node --capture-range=nvtx --nvtx-capture=profile@ltx2 "
        "--capture-range-end=stop ...` (with --stages 1,2: --capture-range-end=repeat, one report per stage)",
    )
    run.add_argument(
        "--output", type=output_file, metavar="FILE.safetensors",
        help="write the final video/audio latents (atomically) to this file",
    )
    add_output_flags(run)
    run.set_defaults(handler=_run)

    bench = sub.add_parser(
        "bench",
        help="time the executors (and diffusers' transformer) side by side on the same weights",
        description="Time each guidance pass under each executor in one process, on the same weights and inputs, "
        "with diffusers' LTX2VideoTransformer3DModel as peer rows when diffusers is installed. Reports ms per pass "
        "(median and spread), ms per step, kernels per pass, GPU busy, TFLOP/s and MFU against a matmul peak "
        "measured in the same run, capture/compile time, graph pool memory and host syncs. " + NO_TEXT_ENCODER,
    )
    add_model_flags(bench)
    add_shape_flags(bench, many_tokens=True)
    bench.add_argument("--guidance", default="hq", choices=("hq", "dev"), help="passes that make up one step")
    bench.add_argument(
        "--executors",
        type=choice_list(EXECUTORS, allow_none=True),
        metavar="LIST",
        help="our rows, comma-separated, or 'none' for peer rows only (auto: eager,graphs,compile,compile+graphs "
        "on a GPU; eager on CPU)",
    )
    bench.add_argument(
        "--passes",
        type=choice_list(PASS_NAMES),
        metavar="LIST",
        help="passes to time one by one, comma-separated from cond,neg,perturbed,modality (default cond,modality; "
        "the per-step rows always run the guidance preset's passes)",
    )
    bench.add_argument("--no-peer", action="store_true", help="skip diffusers' transformer rows")
    bench.add_argument(
        "--peer-executors",
        type=choice_list(EXECUTORS),
        metavar="LIST",
        help="diffusers rows (auto: eager,graphs,compile,compile+graphs on a GPU; eager on CPU). graphs = our "
        "GraphExecutor driving diffusers' model; compile = diffusers' compile_repeated_blocks",
    )
    bench.add_argument(
        "--attention",
        default="auto",
        choices=("auto", "measure", "cudnn", "flash", "efficient", "math"),
        help="SDPA backend of our rows: auto (PyTorch picks), one backend pinned, or 'measure': time SDPA alone on "
        "each shape's video self-attention per backend and pin the fastest there (GPU; the timings are printed)",
    )
    bench.add_argument(
        "--floor",
        action="store_true",
        help="also time each GEMM and attention call of one block alone (CUDA-graph replays, fastest SDPA backend "
        "per call) and report their per-pass sums per shape: the floor no fusion can go below (GPU)",
    )
    bench.add_argument(
        "--floor-seconds",
        type=non_negative_float,
        default=0.0,
        metavar="S",
        help="with --floor: replay each kernel for at least S seconds, so a card at its power limit times it at "
        "the clock a back-to-back loop sustains (e.g. 1; default 0: short bursts, which run near the boost clock)",
    )
    bench.add_argument("--repeats", type=positive_int, default=5, help="timed repeats per pass (default 5)")
    bench.add_argument("--warmup", type=positive_int, default=2, help="untimed calls before timing (default 2)")
    add_output_flags(bench)
    bench.set_defaults(handler=_bench)

    compare = sub.add_parser(
        "compare",
        help="two `bench --json` reports side by side: ms, M cycles, kernels, and the kernels whose count changed",
        description="Compare two `ltx2-graphs bench --json` reports row by row (same impl, executor, tokens and "
        "pass): median ms, M cycles (ms x SM MHz: what to compare across cards and clocks under the power cap), "
        "kernels per pass, and the kernel names whose count per pass changed. Reads JSON only (no GPU).",
    )
    compare.add_argument("before", metavar="BEFORE.json", help="the report of the code before the change")
    compare.add_argument("after", metavar="AFTER.json", help="the report of the code after it")
    compare.add_argument("--names", type=positive_int, default=8, metavar="N",
                         help="kernel names listed per pass whose count changed (default 8, largest change first)")
    add_output_flags(compare)
    compare.set_defaults(handler=_compare)

    coldstart = sub.add_parser(
        "coldstart",
        help="time build + compile + capture of every guidance pass for one shape (fresh or warm compile caches)",
        description="Time what a start costs before the first step: build the model, then compile and capture "
        "every pass of the guidance preset for one shape. --cache fresh (default) compiles against empty "
        "temporary compile caches, as on a new machine; --cache warm uses the caches as they are. Prints where the "
        "compile time went (dynamo's counters). " + NO_TEXT_ENCODER,
    )
    add_model_flags(coldstart)
    add_shape_flags(coldstart, many_tokens=False)
    coldstart.add_argument("--guidance", default="hq", choices=("hq", "dev"), help="passes to capture (default hq)")
    coldstart.add_argument(
        "--executor",
        default="auto",
        choices=("auto", *EXECUTORS),
        help="what to warm up (auto: compile+graphs on a GPU, compile on CPU)",
    )
    coldstart.add_argument(
        "--cache",
        default="fresh",
        choices=("fresh", "warm"),
        help="fresh: empty temporary inductor/Triton caches (removed afterwards); warm: the caches as they are",
    )
    add_output_flags(coldstart)
    coldstart.set_defaults(handler=_coldstart)

    profile = sub.add_parser(
        "profile",
        help="profile a few steps for host syncs (CUPTI), or analyse an nsys export",
        description="Run a few denoising steps under the in-process CUPTI profiler and print the per-range host-sync "
        "report (loop / step / eval / pass / replay). With --nsys-sqlite, analyse an `nsys export --type sqlite` "
        "file instead (no GPU needed). " + NO_TEXT_ENCODER,
    )
    add_loop_flags(profile)
    profile.set_defaults(steps=2)
    profile.add_argument("--trace", type=trace_file, metavar="FILE",
                         help="write a Chrome/Perfetto trace (JSON) of the profiled steps")
    profile.add_argument(
        "--nsys-sqlite", metavar="FILE", help="analyse this nsys sqlite export instead of running anything (the "
        "model, shape, guidance and execution flags are then refused: the recorded run fixed them)"
    )
    profile.add_argument(
        "--no-control",
        action="store_true",
        help="with --nsys-sqlite: accept an export without the positive control (the sync count is then unverified)",
    )
    profile.add_argument(
        "--kernels",
        type=positive_int,
        metavar="N",
        help="also print the N kernels with the most time in the profiled loop and its idle gaps by length",
    )
    add_output_flags(profile)
    profile.set_defaults(handler=_profile)
    for command_parser in sub.choices.values():  # `parse` reports an unknown flag with the subcommand's help
        command_parser.set_defaults(command_parser=command_parser)
    return parser


# ---------------------------------------------------------------------------------------------------------------
# handlers: imported lazily so `--help` and argument errors never pay for importing torch


def _run(args: argparse.Namespace, progress: Progress) -> int:
    from graphs import runner

    return runner.main(args, progress)


def _bench(args: argparse.Namespace, progress: Progress) -> int:
    from graphs import bench

    return bench.main(args, progress)


def _compare(args: argparse.Namespace, progress: Progress) -> int:
    from graphs import bench_compare

    return bench_compare.main(args, progress)


def _coldstart(args: argparse.Namespace, progress: Progress) -> int:
    started = time.perf_counter()
    from graphs import coldstart  # imports torch: reported apart from the cold start itself

    args.import_seconds = time.perf_counter() - started
    return coldstart.main(args, progress)


def _profile(args: argparse.Namespace, progress: Progress) -> int:
    from graphs import cli_profile

    return cli_profile.main(args, progress)


def describe_error(exc: BaseException) -> tuple[str, int]:
    """(one line with a hint, exit status) for an exception that escaped a command."""
    if isinstance(exc, CommandError):
        return exc.line(), exc.code
    name = type(exc).__name__
    kinds = {cls.__name__ for cls in type(exc).__mro__}  # by name: no torch import just to classify an error
    text = shorten(one_line(exc))
    if "OutOfMemoryError" in kinds or "out of memory" in text.lower():
        return (
            f"out of GPU memory: {text} (hint: use a smaller grid (--tokens/--resolution), --preset small, fewer "
            "passes, or check that no other process holds GPU memory)",
            3,
        )
    if "can't allocate memory" in text:  # the CPU allocator's words
        return f"out of memory: {text} (hint: use a smaller grid (--tokens/--resolution) or --preset tiny)", 3
    if "CaptureError" in kinds:
        return f"CUDA graph capture failed: {text} (hint: try --executor eager to check the model itself)", 3
    if "BlindProfilerError" in kinds:
        return f"{text} (hint: detach other profilers (nsys, torch.profiler) from this process)", 3
    if isinstance(exc, ModuleNotFoundError):
        return f"missing package: {text} (hint: pip install the package named, e.g. 'ltx2-graphs[cupti]')", 2
    if isinstance(exc, (ValueError, OSError)):
        return f"{text}", 2
    return f"{name}: {text} (hint: rerun with --debug for the traceback)", 1


# Files a command reads, and files it writes at the end: a written file naming any other would overwrite it.
INPUT_FILES = ("weights", "nsys_sqlite", "before", "after")
OUTPUT_FILES = ("output", "json", "trace")


def _shown(name: str) -> str:
    return name.upper() if name in ("before", "after") else "--" + name.replace("_", "-")


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parsed arguments; errors name the subcommand's help (an unknown flag of `run` is `run`'s to explain), and an
    output naming the same file as another argument is refused (`--output` over `--weights` would destroy the
    checkpoint; two inputs may be one file: `compare a.json a.json`)."""
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    paths = {name: os.path.realpath(value) for name in (*INPUT_FILES, *OUTPUT_FILES)
             if (value := getattr(args, name, None)) and value != "-"}
    for output in OUTPUT_FILES:
        same = [name for name, path in paths.items() if name != output and path == paths.get(output)]
        if same:
            args.command_parser.error(f"{_shown(output)} and {_shown(same[0])} name the same file "
                                      f"{getattr(args, output)!r}: give the output its own path")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point; returns the exit status (0 on success)."""
    args = parse(argv)
    progress = Progress(quiet=args.quiet)
    try:
        return int(args.handler(args, progress) or 0)
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout left (`... | head`): stop quietly, as a killed writer would
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python exits
        return 141  # 128 + SIGPIPE, what a shell reports for a writer killed by the pipe
    except Exception as exc:  # every failure becomes one line; --debug shows where it came from
        if args.debug:
            traceback.print_exc()
        line, code = describe_error(exc)
        print(f"{PROG} {args.command}: error: {line}", file=sys.stderr)
        return code


if __name__ == "__main__":
    raise SystemExit(main())

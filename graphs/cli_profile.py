"""`ltx2-graphs profile`: a few denoising steps under the in-process CUPTI profiler, or an nsys export analysed.

Live mode (GPU): the model is built and the executor warmed up (compile/capture) OUTSIDE the profiler, then each
requested stage's loop runs inside `profiling.cupti.CuptiProfiler`, which first runs the positive control (one
deliberate sync that the report must see, or it refuses to claim zero syncs). The report lists, per region
(stage > loop > step > eval > pass/replay), unexpected syncs, device->host copies, kernels and GPU busy.

File mode (`--nsys-sqlite FILE`, no GPU needed): read an `nsys export --type sqlite` file with
`profiling.nsys` and print the same report. How to record a good file is in `profiling/nsys.py` and the README.

`--kernels N` (either mode) adds, per profiled loop, the N kernels with the most time and the idle gaps between
kernels by length (`profiling.kernel_table`).

Exit status: 0 when no unexpected sync was seen, 1 when some were (so CI can gate on it), 2/3 for errors.
"""

from __future__ import annotations

import os

from graphs.cli_console import CommandError, Progress, emit_json, shorten


def analyse_file(args, progress: Progress) -> int:
    from profiling.attribution import analyse
    from profiling.nsys import read_timeline
    from profiling.report import BlindProfilerError
    from profiling.trace import write_chrome_trace

    path = args.nsys_sqlite
    if not os.path.isfile(path):  # sqlite3 would silently create an empty database
        raise CommandError(f"--nsys-sqlite {path}: no such file", hint="export one with `nsys export --type=sqlite`")
    progress(f"reading {path}")
    try:
        timeline = read_timeline(path)
    except Exception as e:
        raise CommandError(f"--nsys-sqlite {path} could not be read as an nsys SQLite export: {e}",
                           hint="export with `nsys export --type=sqlite --output=FILE.sqlite REPORT.nsys-rep`") from e
    try:
        report = analyse(timeline, require_control=not args.no_control)
    except BlindProfilerError as e:
        raise CommandError(str(e), hint="record the positive control inside the capture range, or pass "
                           "--no-control to accept an unverified count") from e
    code = _emit(args, [("nsys", report, timeline)], extra={"source_file": path})
    if args.trace:  # after the report, so a trace that cannot be written does not lose it
        _write_trace(lambda target: write_chrome_trace(timeline, target), args.trace, progress)
    return code


def profile_live(args, progress: Progress) -> int:
    from graphs import runner
    from graphs.run_report import format_summary

    options = runner.options_from_args(args)
    if options.workload.device.type != "cuda":
        raise CommandError(
            "profile runs the CUPTI profiler, which needs a CUDA GPU, and none is in use",
            hint="on CPU use `ltx2-graphs run` (its dispatch-level detector counts syncs) or analyse an nsys "
            "export with --nsys-sqlite FILE",
            code=3,
        )
    from profiling.cupti import CuptiProfiler, import_cupti

    try:
        import_cupti()
    except ImportError as e:
        raise CommandError(f"the CUPTI profiler cannot be used: {shorten(str(e))}",
                           hint="pip install 'ltx2-graphs[cupti]' (cupti-python of torch's CUDA major version)",
                           code=2) from e
    profilers: list[tuple[str, CuptiProfiler]] = []

    def loop_context(stage: int):
        prof = CuptiProfiler()
        profilers.append((f"stage{stage}", prof))
        return prof

    summary = runner.run(options, progress, loop_context=loop_context)
    reports = [(name, prof.report(), prof.timeline) for name, prof in profilers]
    if args.json != "-":
        print(format_summary(summary))
        print()
    code = _emit(args, reports, extra={"run": summary.to_json()})
    for name, prof in profilers if args.trace else ():  # after the report, as in `profile_nsys`
        _write_trace(prof.write_trace, args.trace if len(profilers) == 1 else _numbered(args.trace, name), progress)
    return code


def _write_trace(write, target: str, progress: Progress) -> None:
    try:
        write(target)
    except OSError as e:
        raise CommandError(f"--trace: cannot write {target}: {e.strerror or e}") from e
    progress(f"wrote trace {target} (open in https://ui.perfetto.dev or chrome://tracing)")


def _numbered(path: str, name: str) -> str:
    root, ext = os.path.splitext(path)
    return f"{root}.{name}{ext or '.json'}"


def _emit(args, reports, *, extra: dict) -> int:
    """Print each (name, report, timeline): the report's table, its syncs and, with --kernels, the kernel table;
    and/or write the JSON. Exit 1 if any unexpected sync."""
    from profiling.kernel_table import kernel_report

    unexpected = sum(len(r.unexpected_syncs) for _, r, _ in reports)
    kernels = {name: kernel_report(timeline, args.kernels) for name, _, timeline in reports} if args.kernels else {}
    if args.json != "-":
        for name, report, _ in reports:
            print(f"== {name} ==")
            print(report.table())
            if report.syncs:
                print()
                print(report.syncs_table())
            print()
            if name in kernels:
                print(kernels[name][0] if kernels[name] else "no kernels were recorded in the loop (an nsys export "
                      "needs --cuda-graph-trace=node to record the kernels of graph replays)")
                print()
    if args.json:
        data = {**extra, "reports": {name: r.to_dict() for name, r, _ in reports}, "unexpected_syncs": unexpected}
        if kernels:
            data["kernels"] = {name: k[1] if k else None for name, k in kernels.items()}
        emit_json(data, args.json)
    return 1 if unexpected else 0


def loop_flags_given(args) -> list[str]:
    """The flags of the run being profiled (model, shape, guidance, execution: `graphs.cli.add_loop_flags`) whose
    value differs from `profile`'s default, as "--flag value". A flag given with its default value is not seen."""
    from graphs.cli import OneLineParser, add_loop_flags, build_parser

    loop = OneLineParser(add_help=False)
    add_loop_flags(loop)
    defaults = vars(build_parser().parse_args(["profile"]))  # profile's own defaults (--steps 2)
    given = []
    for dest in vars(loop.parse_args([])):
        value = getattr(args, dest, defaults[dest])
        if value != defaults[dest]:
            flag = "--" + dest.replace("_", "-")
            given.append(flag if value is True else f"{flag} {_as_typed(dest, value)}")
    return given


def _as_typed(dest: str, value) -> str:
    """A parsed flag value written back the way it is typed: (960, 544) -> 960x544, (1, 2) -> 1,2, () -> none."""
    if dest == "resolution":
        return "x".join(map(str, value))
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return str(value)


def check_mode_flags(args) -> None:
    """Refuse flags the chosen mode would ignore: silently dropping them would report on another run than the
    one asked for. File mode analyses what was recorded; live mode always runs the positive control."""
    if not args.nsys_sqlite:
        if args.no_control:
            raise CommandError("--no-control applies to --nsys-sqlite",
                               hint="drop --no-control: live profiling always runs the positive control")
        return
    given = loop_flags_given(args)
    if given:
        raise CommandError(
            f"--nsys-sqlite analyses a recorded export: the run flags {', '.join(given)} would be ignored "
            "(expected no model, shape, guidance or execution flag with it)",
            hint="drop them (they belong on the recorded `ltx2-graphs run --nsys` command), or profile live "
            "without --nsys-sqlite",
        )


def main(args, progress: Progress) -> int:
    """Entry for `ltx2-graphs profile` (called by graphs.cli)."""
    check_mode_flags(args)
    if args.nsys_sqlite:
        return analyse_file(args, progress)
    return profile_live(args, progress)

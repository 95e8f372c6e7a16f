"""`ltx2-graphs coldstart`: seconds from nothing to every guidance pass ready to replay, for one shape.

What is timed (the cold-start definition of the performance goals): build the model, then compile and capture
every pass of the guidance preset (`GraphExecutor.warmup`), ending with one synchronisation. Interpreter
start-up and `import torch` are not included (they are printed apart: seconds on a cold disk).

`--cache fresh` (default) points inductor's and Triton's on-disk caches at an empty temporary directory for the
duration, and clears dynamo's and inductor's in-process caches first: the time a new machine pays. Clearing
them resets dynamo, so code compiled earlier in the same process compiles again on its next call: meant for a
process (or test) that measures and then starts over, like this command. `--cache warm` keeps the caches as
they are: the time every later start pays (run it once with `warm` first to fill them).

Where the compile time went comes from dynamo's own counters (`torch._dynamo.utils.compile_times`), the
difference over this measurement: tracing Python (dynamo), the backend (AOT autograd + inductor lowering and
code generation), and inside that, building and loading the generated kernels (Triton on a GPU, C++ on CPU).

Also counted: the Python modules first imported inside the window (dynamo and inductor import much of themselves
lazily, at the first compile; nothing here imports them before the window), and how many of them had no bytecode
file to load and left none behind: those are
compiled from source in every process (an install without bytecode under `PYTHONDONTWRITEBYTECODE`, `-B` or a
read-only site-packages), seconds of a warm start that an installation with bytecode does not pay.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace

import torch

from graphs.cli_console import CommandError, Progress, emit_json
from graphs.run_executors import make_executor, warm_up
from graphs.run_workload import (
    Workload,
    build_model,
    check_executor,
    cpu_threads,
    fitted_guidance,
    random_conditioning,
    random_latents,
    resolve_workload,
)

CACHE_ENV = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
# (label, dynamo counter). Nested: "backend" is part of "compile total", "kernel builds" part of "backend".
# The counter names are dynamo's; one that was not recorded in this run (the torch version has no such counter,
# or nothing ran through it, e.g. no parallel builds) is reported as such, not as zero.
PHASES = (
    ("compile total (dynamo)", "_compile.compile_inner"),
    ("tracing Python (dynamo)", "bytecode_tracing"),
    ("backend (AOT autograd + inductor)", "OutputGraph.call_user_compiler"),
    ("building/loading kernels", "PyCodeCache.load_by_key_path"),
    ("waiting for parallel kernel builds", "async_compile.wait"),
)


@dataclass
class ColdStart:
    """One cold-start measurement (seconds)."""

    workload: str
    executor: str
    passes: tuple[str, ...]
    cache: str  # "fresh" or "warm"
    build_s: float
    warmup_s: float  # compile + capture of every pass (+ the first replay of each)
    captures: int | None
    compiles: int | None
    phases: dict[str, float | None] = field(default_factory=dict)  # label -> seconds (None: not recorded)
    modules_imported: int = 0  # Python modules first imported inside the window
    modules_from_source: int = 0  # of those, compiled from source with no bytecode file left (every process)
    import_s: float | None = None  # importing torch and this package, before the window (not in total_s)

    @property
    def total_s(self) -> float:
        return self.build_s + self.warmup_s

    def to_json(self) -> dict:
        return {**asdict(self), "total_s": self.total_s}


@contextlib.contextmanager
def fresh_compile_caches() -> Iterator[str]:
    """Empty on-disk compile caches (a temporary directory, removed afterwards) and cleared in-process ones.

    Why the in-process clear: dynamo keeps compiled code per function, and inductor remembers its cache paths
    for the life of the process (`CacheBase.get_local_cache_path` is memoised), so a new environment variable
    alone would not give an empty cache. Inductor's compile workers also keep the cache variables they were
    handed; they are shut down on exit so later compiles in this process use the restored caches, not the
    deleted directory. The previous variables are restored and the caches cleared again on exit, errors included.
    """
    saved = {name: os.environ.get(name) for name in CACHE_ENV}
    with tempfile.TemporaryDirectory(prefix="ltx2-coldstart-", ignore_cleanup_errors=True) as tmp:
        try:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tmp, "inductor")
            os.environ["TRITON_CACHE_DIR"] = os.path.join(tmp, "triton")
            _clear_in_process_caches()
            yield tmp
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            _shutdown_compile_workers()
            _clear_in_process_caches()


def _imported(name: str):
    """The module `name` if this process has imported it, else None. What the window measures may not be imported
    before it: `import torch._dynamo` alone took 1.3-5.5 s on a CPU machine (828 modules), part of what a new
    process pays to compile, and a measurement importing it first would leave it out of both the window and the
    `import torch` figure printed apart."""
    return sys.modules.get(name)


def _clear_in_process_caches() -> None:
    """Compiled code and memoised cache paths of this process: none if dynamo and inductor are not imported yet."""
    if (dynamo := _imported("torch._dynamo")) is not None:
        dynamo.reset()
    if (inductor_utils := _imported("torch._inductor.utils")) is not None:
        inductor_utils.clear_caches()


def _shutdown_compile_workers() -> None:
    if (async_compile := _imported("torch._inductor.async_compile")) is not None:
        async_compile.shutdown_compile_workers()


def compile_counters() -> dict[str, float]:
    """dynamo's cumulative compile-time counters of this process (seconds per counter name); empty before dynamo
    is imported (nothing compiled yet)."""
    dynamo_utils = _imported("torch._dynamo.utils")
    if dynamo_utils is None:
        return {}
    names, values = dynamo_utils.compile_times(repr="csv", aggregate=True)
    return {name: float(value) for name, value in zip(names, values)}


def phase_seconds(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """The PHASES over one measurement: counter differences; None where the counter was not recorded."""
    return {label: (after[key] - before.get(key, 0.0) if key in after else None) for label, key in PHASES}


def pass_specs(guidance_name: str, num_layers: int):
    """The passes of a guidance preset, its STG blocks fitted to the model's depth (`fitted_guidance`)."""
    from pipeline.passes import pass_specs_for

    guidance, _ = fitted_guidance(guidance_name, num_layers)
    return pass_specs_for(guidance)


def measure(workload: Workload, executor_name: str, guidance: str, cache: str, progress: Progress) -> ColdStart:
    """Build + compile + capture every pass once, under fresh or warm compile caches."""
    if cache not in ("fresh", "warm"):
        raise ValueError(f"cache must be 'fresh' or 'warm', got {cache!r}")
    caches = fresh_compile_caches() if cache == "fresh" else contextlib.nullcontext()
    with caches, cpu_threads(workload):
        before = compile_counters()
        modules_before = set(sys.modules)
        started = time.perf_counter()
        model = build_model(workload, progress)
        if workload.device.type == "cuda":
            torch.cuda.synchronize(workload.device)
        built = time.perf_counter()
        # Everything from here is "compile + capture": making the executor (a compiled one imports dynamo there)
        # and the inputs too, not only `warm_up`'s own clock.
        specs = pass_specs(guidance, workload.config.num_layers)
        video, audio = random_latents(workload)
        executor = make_executor(executor_name, model, progress=progress, share_text_kv=workload.share_text_kv)
        stats = warm_up(executor, executor_name, specs, random_conditioning(workload), video, audio, progress=progress)
        warmed = time.perf_counter()
        phases = phase_seconds(before, compile_counters())
        new_modules = set(sys.modules) - modules_before
    return ColdStart(
        workload=workload.describe(), executor=executor_name, passes=tuple(s.name for s in specs), cache=cache,
        build_s=built - started, warmup_s=warmed - built, captures=stats.captures, compiles=stats.compiles,
        phases=phases, modules_imported=len(new_modules), modules_from_source=modules_without_bytecode(new_modules),
    )


def modules_without_bytecode(names) -> int:
    """How many of these imported modules are Python sources whose bytecode file (`__cached__`) does not exist:
    compiled from source on import and not written back, so every process compiles them again."""
    count = 0
    for name in names:
        module = sys.modules.get(name)
        source, cached = getattr(module, "__file__", None), getattr(module, "__cached__", None)
        if source and source.endswith(".py") and cached and not os.path.exists(cached):
            count += 1
    return count


def bytecode_hint() -> str:
    """How this process could keep the bytecode it compiled, for the report's line on modules compiled from source.

    Two causes leave no bytecode behind: writing it is off (`PYTHONDONTWRITEBYTECODE`, `-B`), or the directory
    next to the sources is not writable; `PYTHONPYCACHEPREFIX` moves the bytecode to a writable tree in both cases.
    Measured on an H200 (profiling/PERF_LOG.md, seventeenth session): a warm start took 8.0 s with bytecode and
    11.8 s without, on one machine."""
    prefix = "set PYTHONPYCACHEPREFIX to a writable directory"
    later = "later processes then load bytecode instead"
    if sys.dont_write_bytecode:
        return f"writing bytecode is off here (PYTHONDONTWRITEBYTECODE or -B): turn it on (and {prefix} if the " \
            f"sources' directories are read-only); {later}"
    return f"{prefix} (the sources' directories look read-only); {later}"


def format_cold_start(result: ColdStart) -> str:
    lines = [
        f"cold start ({result.cache} compile caches): {result.workload}",
        f"  executor {result.executor}, passes {','.join(result.passes)}",
        f"  build model            {result.build_s:7.1f} s",
        f"  compile + capture      {result.warmup_s:7.1f} s" + _counts(result),
        f"  total                  {result.total_s:7.1f} s",
    ]
    if result.import_s is not None:
        lines.append(f"  (not included: importing torch and this package, {result.import_s:.1f} s)")
    if result.modules_imported:
        source = (f", {result.modules_from_source} of them compiled from source (no bytecode file: every process "
                  "pays that)") if result.modules_from_source else ""
        lines.append(f"  {result.modules_imported} Python modules first imported inside the window{source}")
        if result.modules_from_source:
            lines.append(f"  (hint: {bytecode_hint()})")
    if any(v is not None and v > 0 for v in result.phases.values()):
        lines.append("  where the compile time went (dynamo's counters; nested, not additive):")
        lines += [f"    {label:36s} " + ("not recorded in this run" if s is None else f"{s:6.1f} s")
                  for label, s in result.phases.items()]
    return "\n".join(lines)


def _counts(result: ColdStart) -> str:
    counts = [f"{n} {what}" for n, what in ((result.compiles, "compile(s)"), (result.captures, "capture(s)"))
              if n is not None]
    return f"  ({', '.join(counts)})" if counts else ""


def main(args, progress: Progress) -> int:
    """Entry for `ltx2-graphs coldstart` (called by graphs.cli)."""
    workload = resolve_workload(args)
    executor = args.executor
    if executor == "auto":
        executor = "compile+graphs" if workload.device.type == "cuda" else "compile"
    check_executor(executor, workload.device)
    if executor == "eager" and args.cache == "fresh":
        progress("executor eager compiles nothing: the compile caches do not matter")
    result = replace(measure(workload, executor, args.guidance, args.cache, progress),
                     import_s=getattr(args, "import_seconds", None))
    if args.json != "-":
        print(format_cold_start(result))
    if args.json:
        emit_json(result.to_json(), args.json)
    if result.executor in ("graphs", "compile+graphs") and not result.captures:
        raise CommandError("no pass graph was captured", hint="rerun with --debug")
    return 0

"""`ltx2-graphs bench`: every executor side by side in ONE process, on the same weights and the same inputs,
with diffusers' `LTX2VideoTransformer3DModel` (same weights) as peer rows.

Order of work, and why:
1. measure the bf16 matmul peak (the MFU denominator) before any model exists;
2. build our model once (seeded random weights, or `--weights`) and, per executor and shape, measure a cell
   (`graphs.bench_rows`); each executor is dropped after its cell so graph pools do not pile up. `--fp8` then
   quantizes that model in place for the "ours-fp8" rows (`pipeline.fp8`) and builds the bf16 model again for
   the peer;
3. peer rows: diffusers' transformer gets our weights under its names (`pipeline.weights`). The ltx2.3 preset is
   ~38 GB in bf16, so two copies plus activations do not fit an 80 GB card: when a second copy would not fit
   in free GPU memory, our weights are first copied to CPU memory, our model is freed, and the peer
   is built from the CPU copy. Smaller presets are copied GPU to GPU.
   Peer executors: eager, graphs (our GraphExecutor driving the diffusers adapter), compile (diffusers' own
   `compile_repeated_blocks`, what a diffusers user calls) and compile+graphs (those compiled blocks captured
   per pass by our GraphExecutor: the strongest combination a diffusers user can assemble by hand). The compile
   rows run last because diffusers' compile stays installed on its blocks.
4. throughout, on a GPU, NVML samples the SM clock and board power (`profiling.gpu_clocks`); each row reports
   them over its timed calls, because a power-capped card runs every kernel at a lower clock.
Inputs per shape: `LatentGrid.from_tokens` (1536 = 16x8x12, 8160 = 16x17x30 latents), 126 audio tokens, 1024
random text tokens per prompt, batch 1; the same latents and texts for every row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
from collections.abc import Iterable
from dataclasses import replace

import torch

from graphs.bench_report import BenchReport, StepRow, format_report
from graphs.bench_rows import CellInputs, CellPlan, measure_cell
from graphs.cli_console import CommandError, Progress, emit_json, failure_line
from graphs.run_executors import EXECUTOR_NAMES
from graphs.run_workload import (
    Workload,
    build_model,
    check_executor,
    cpu_threads,
    fitted_guidance,
    quantize,
    random_conditioning,
    random_latents,
    resolve_workload,
)
from pipeline.config import LatentGrid

GPU_TOKENS = (1536, 8160)
CPU_TOKENS = (48,)
GPU_EXECUTORS = EXECUTOR_NAMES
CPU_EXECUTORS = ("eager",)
DEFAULT_PASSES = ("cond", "modality")
STEP_COUNT = 2  # res2s steps timed per cell (plus one untimed)


def plan_from_args(args, workload: Workload):
    """(our executors, peer executors, timed specs, step guidance, shapes) from the flags and the device."""
    from pipeline.passes import PassSpec

    gpu = workload.device.type == "cuda"
    if args.no_peer and args.peer_executors:
        raise CommandError("--no-peer and --peer-executors contradict each other",
                           hint="drop one: --no-peer skips the peer rows that --peer-executors chooses")
    executors = args.executors if args.executors is not None else (GPU_EXECUTORS if gpu else CPU_EXECUTORS)
    peers = () if args.no_peer else (args.peer_executors or (GPU_EXECUTORS if gpu else CPU_EXECUTORS))
    for names, flag in ((executors, "--executors"), (peers, "--peer-executors")):
        for name in names:
            check_executor(name, workload.device, flag)
    dev_guidance, _ = fitted_guidance("dev", workload.config.num_layers)  # its STG blocks, fitted to the depth
    stg_blocks = dev_guidance.stg_blocks
    all_specs = {
        "cond": PassSpec("cond", "positive"),
        "neg": PassSpec("neg", "negative"),
        "perturbed": PassSpec("perturbed", "positive", skip_video_self_attn_blocks=stg_blocks,
                              skip_audio_self_attn_blocks=stg_blocks),
        "modality": PassSpec("modality", "positive", disable_a2v_cross_attn=True, disable_v2a_cross_attn=True),
    }
    timed = tuple(all_specs[name] for name in (args.passes or DEFAULT_PASSES))
    guidance, _ = fitted_guidance(args.guidance, workload.config.num_layers)
    tokens = args.tokens or (GPU_TOKENS if gpu else CPU_TOKENS)
    return executors, peers, timed, guidance, tokens


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    return f"CPU ({torch.get_num_threads()} threads)"


def _shape_inputs(workload: Workload, tokens: int, audio_tokens: int | None) -> CellInputs:
    grid = LatentGrid.from_tokens(tokens, audio_tokens=audio_tokens)  # default: 126 audio tokens (16 latent frames)
    shaped = replace(workload, grid=grid)
    video, audio = random_latents(shaped)
    return CellInputs(workload.config, grid, workload.text_tokens, random_conditioning(shaped), video, audio,
                      workload.seed)


def run_cells(impl: str, model, executors, shapes: dict[int, CellInputs], plan: CellPlan, report: BenchReport,
              progress: Progress, prepare=None, clocks=None) -> None:
    """Executor-major loop over the cells of one implementation, appending rows to `report`."""
    from graphs.diffusers_adapter import free_cuda_memory

    compiled = False
    for name in executors:
        if impl == "diffusers" and "compile" in name and not compiled:
            # diffusers' own regional compile; compile+graphs then captures these compiled blocks per pass.
            progress("diffusers: compile_repeated_blocks(fullgraph=True) (compiles on the first call of each shape)")
            model.compile_repeated_blocks(fullgraph=True)
            compiled = True
        for tokens, inputs in shapes.items():
            if prepare is not None:
                prepare(inputs.grid)
            rows, step = measure_cell(impl, name, model, inputs, plan, progress, clocks)
            report.passes += rows
            report.steps.append(step)
            free_cuda_memory()


def peer_order(executors) -> tuple[str, ...]:
    """diffusers' compile stays installed once called: run its compiled rows after the plain ones."""
    plain = [e for e in executors if "compile" not in e]
    compiled = [e for e in ("compile", "compile+graphs") if e in executors]
    return (*plain, *compiled)


def bench(args, progress: Progress) -> BenchReport:
    from graphs import diffusers_adapter as peer_lib
    from profiling.gpu_clocks import nvml_sampler
    from profiling.timing import matmul_peak_tflops

    workload = resolve_workload(args, grid=LatentGrid.from_tokens(1536))
    executors, peers, timed, guidance, tokens = plan_from_args(args, workload)
    if peers and not peer_lib.diffusers_available():
        progress("diffusers is not installed: no peer rows (pip install diffusers)")
        peers = ()
    if not executors and not peers:
        raise CommandError("nothing to measure: --executors none and no peer rows",
                           hint="drop --no-peer, install diffusers, or name executors")
    if getattr(args, "floor", False) and workload.device.type != "cuda":
        raise CommandError("--floor times kernels in CUDA graphs and needs a GPU", hint="drop --floor on CPU", code=3)
    attention = getattr(args, "attention", "auto")
    if attention not in ("auto", "math") and workload.device.type != "cuda":  # refused now, not row by row
        what = "times SDPA kernels" if attention == "measure" else "is a CUDA SDPA backend"
        raise CommandError(f"--attention {attention} {what} and needs a GPU", hint="use --attention auto on CPU",
                           code=3)
    if getattr(args, "floor_seconds", 0.0) and not getattr(args, "floor", False):
        raise CommandError("--floor-seconds applies to the kernel floor", hint="add --floor")
    # On CPU a peak measured in a second swings with whatever else the cores run, and MFU against it read from 1%
    # to over 1000% in one afternoon: no peak, no MFU there.
    peak = 0.0
    if workload.device.type == "cuda":
        progress(f"measuring the {str(workload.dtype).removeprefix('torch.')} matmul peak on {workload.device}")
        peak = matmul_peak_tflops(workload.device, workload.dtype)
    report = BenchReport(
        device=str(workload.device), card=_device_name(workload.device), torch_version=torch.__version__,
        diffusers_version=_diffusers_version(), date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        preset=workload.preset, dtype=str(workload.dtype).removeprefix("torch."), text_tokens=workload.text_tokens,
        peak_tflops=peak, guidance=args.guidance, repeats=args.repeats, audio_tokens=args.audio_tokens,
        share_text_kv=workload.share_text_kv, overlap_audio=workload.overlap_audio and workload.device.type == "cuda",
        attention=getattr(args, "attention", "auto"),
    )
    plan = CellPlan(timed_specs=timed, guidance=guidance, repeats=args.repeats, warmup=args.warmup,
                    step_count=STEP_COUNT, peak_tflops=peak, share_text_kv=workload.share_text_kv,
                    debug=args.debug)
    clocks, report.card_limits, no_clocks = nvml_sampler(workload.device)
    if no_clocks and workload.device.type == "cuda":
        report.notes.append(f"clocks: {no_clocks}")
    with cpu_threads(workload), clocks if clocks is not None else contextlib.nullcontext():
        _bench_rows(args, workload, executors, peers, plan, tokens, report, progress, clocks)
    if clocks is not None and clocks.error:
        report.notes.append(f"clocks: sampling stopped early ({clocks.error})")
    report.notes.append("kernels: " + _kernel_note(report))
    report.notes.append("audio chain: " + ("on a side CUDA stream (overlapping kernels: the per-class kernel times "
                                          "can add up to more than the pass)" if workload.overlap_audio
                                          and workload.device.type == "cuda" else "on the video chain's stream"))
    if any(r.impl.startswith("ours") and "graphs" in r.executor for r in report.passes):
        report.notes.append("text K/V (our graph rows): " + (
            "the first pass reading a text computes its keys/values for the later passes of the evaluation (the "
            "cond row includes the positive text's, the modality row reads them)" if workload.share_text_kv
            else "projected by every pass (--no-shared-text-kv)"))
    return report


def attention_plan(args, model, workload: Workload, tokens: Iterable[int], report: BenchReport, progress: Progress):
    """The `prepare(grid)` hook that sets our model's SDPA backend per shape (None: leave "auto")."""
    choice = getattr(args, "attention", "auto")
    if choice == "auto":
        return None
    if choice != "measure":
        report.notes.append(f"attention: SDPA backend pinned to {choice} for our rows")
        return lambda grid: setattr(model, "attention_backend", choice)
    from graphs.bench_attention import measure_self_attention

    best = {}
    for t in tokens:
        measured = measure_self_attention(workload.config, t, device=workload.device, dtype=workload.dtype)
        progress(f"attention backends, video self-attention at {measured.describe()}")
        report.notes.append(f"attention (SDPA alone, video self-attention) at {measured.describe()}")
        best[t] = measured.best
    return lambda grid: setattr(model, "attention_backend", best[grid.num_video_tokens])


def measure_floors(model, workload: Workload, shapes: dict[int, CellInputs], report: BenchReport,
                   progress: Progress, clocks=None, min_seconds: float = 0.0) -> None:
    """`--floor`: each GEMM and SDPA call of a cond pass timed alone per shape (`graphs.bench_floor`; each for at
    least `min_seconds`, `--floor-seconds`), with the SM clock over each kernel's timed replays: kernels timed in
    short bursts run above the clock a back-to-back loop sustains at the power limit (PERF_LOG, eighth session)."""
    from graphs.bench_floor import measure_floor

    for tokens, inputs in shapes.items():
        progress(f"kernel floor at {tokens} tokens: timing each GEMM and attention call of one block alone")
        windows: list[tuple[float, float]] = []
        floor = measure_floor(model, tokens, inputs.grid.num_audio_tokens, workload.text_tokens,
                              min_seconds=min_seconds, timed_windows=windows,
                              read_clock=None if clocks is None else clocks.read_now)
        data, described = floor.to_json(), floor.describe()
        if clocks is not None:
            described += _add_floor_clocks(data, floor.ms, windows, clocks)
        progress(f"kernel floor at {described}")
        report.notes.append(f"floor (graphs.bench_floor) at {described}")
        report.floors.append(data)


def _add_floor_clocks(data: dict, ms: tuple[float, ...], windows: list[tuple[float, float]], clocks) -> str:
    """Per-kernel median SM clocks (`sm_mhz` on each kernel entry), their kernel-time-weighted mean and the summary
    of every timed window into the floor's JSON; returns the text for its note."""
    per_kernel = [clocks.summary_within([window]) for window in windows]
    for entry, clock in zip(data["kernels"], per_kernel):
        entry["sm_mhz"] = None if clock is None else clock.sm_mhz_median
    clocked = [(t, clock.sm_mhz_median) for t, clock in zip(ms, per_kernel) if clock is not None]
    weighted = sum(t * mhz for t, mhz in clocked) / sum(t for t, _ in clocked) if clocked else None
    overall = clocks.summary_within(windows)
    data["sm_mhz_kernel_time_weighted"] = weighted
    data["clocks"] = None if overall is None else dataclasses.asdict(overall)
    text = "" if weighted is None else f"; SM clock {weighted:.0f} MHz weighted by kernel time"
    return text + ("" if overall is None else f"; while timed: {overall.describe()}")


def _bench_rows(args, workload, executors, peers, plan, tokens, report, progress, clocks) -> None:
    from graphs import diffusers_adapter as peer_lib
    from pipeline.fp8 import is_quantized

    bf16 = replace(workload, fp8=False)  # `--fp8`: our bf16 rows first, then the same weights quantized
    model = build_model(bf16, progress)
    shapes = {t: _shape_inputs(workload, t, args.audio_tokens) for t in tokens}
    prepare = attention_plan(args, model, workload, shapes.keys(), report, progress)
    if getattr(args, "floor", False):
        measure_floors(model, workload, shapes, report, progress, clocks, getattr(args, "floor_seconds", 0.0))
    run_cells("ours", model, executors, shapes, plan, report, progress, prepare=prepare, clocks=clocks)
    if workload.fp8 and executors:  # (with --executors none there are no rows of ours to quantize for)
        _fp8_rows(model, executors, shapes, plan, report, progress, prepare, clocks)
    del prepare  # its closure holds our model, which the peer rows must not keep alive
    if peers and is_quantized(model):  # the peer needs the weights the quantization released: same seed or file
        del model
        torch.compiler.reset()  # compiled code of our blocks may still reference their tensors
        peer_lib.free_cuda_memory()
        progress(f"rebuilding the {report.dtype} model (same weights) for the peer")
        model = build_model(bf16, progress)
    model.attention_backend = "auto"  # the peer copy is built from our weights, not our settings
    if peers:
        peer = _build_peer(model, workload, report, progress)
        del model
        peer_lib.free_cuda_memory()
        run_cells("diffusers", peer, peer_order(peers), shapes, plan, report, progress, prepare=peer.prepare,
                  clocks=clocks)


def _fp8_rows(model, executors, shapes: dict[int, CellInputs], plan: CellPlan, report: BenchReport,
              progress: Progress, prepare, clocks) -> None:
    """`--fp8`: quantize our model in place, then measure its cond output against bf16's and its rows
    ("ours-fp8") on the same weights and inputs. A failure before the rows (quantization, the error check) fails
    one "ours-fp8" step row per shape: the rows measured so far still come out, and the bench exits 1."""
    from pipeline.fp8 import output_error

    try:
        before = _cond_outputs(model, shapes, plan)
        torch.compiler.reset()  # our compiled regions of the bf16 model (and the weights they pin) serve no FP8 one
        quantize(model, progress)
        after = _cond_outputs(model, shapes, plan)
    except Exception as e:
        message = failure_line(e, debug=plan.debug)
        progress(f"ours-fp8: FAILED before its rows: {message}")
        report.steps += [StepRow("ours-fp8", "-", tokens, (), error=message) for tokens in shapes]
        return
    for tokens in shapes:
        for stream, ref, out in zip(("video", "audio"), before[tokens], after[tokens]):
            report.fp8_error.append({"video_tokens": tokens, "stream": stream, **output_error(out, ref)})
    del before, after
    run_cells("ours-fp8", model, executors, shapes, plan, report, progress, prepare=prepare, clocks=clocks)
    report.notes.append(f"ours-fp8: the video and text projections in e4m3 (pipeline/fp8.py); its FLOP/s and MFU "
                        f"count the same FLOPs against the {report.dtype} matmul peak")


def _cond_outputs(model, shapes: dict[int, CellInputs], plan: CellPlan) -> dict[int, tuple]:
    """Per shape, the eager cond pass's (video, audio) velocity at sigma 0.5 (`--fp8`'s accuracy check)."""
    from pipeline.executor import EagerExecutor
    from pipeline.passes import pass_specs_for

    spec = next(s for s in pass_specs_for(plan.guidance) if s.name == "cond")
    executor, outputs = EagerExecutor(model), {}
    with torch.no_grad():
        for tokens, inputs in shapes.items():
            executor.set_conditioning(inputs.conditioning)
            outputs[tokens] = tuple(executor.run(inputs.video, inputs.audio, 0.5, (spec,))["cond"])
    return outputs


def _build_peer(model, workload: Workload, report: BenchReport, progress: Progress):
    """diffusers' transformer with our weights: GPU to GPU when it fits, else staged through CPU memory."""
    from graphs import diffusers_adapter as peer_lib

    if peer_lib.needs_cpu_staging(model):
        size = peer_lib.model_bytes(model) / 1e9
        progress(f"copying our weights ({size:.1f} GB) to CPU memory under diffusers names, then freeing our model")
        state = peer_lib.stage_to_cpu(model)
        model.to("meta")  # drop our GPU copy now; the caller's reference no longer holds memory
        torch.compiler.reset()  # compiled code of our blocks may still reference their weights
        peer_lib.free_cuda_memory()
        progress("building diffusers' transformer from the CPU copy")
        peer = peer_lib.peer_from_state(state, workload.config, device=workload.device, dtype=workload.dtype)
        del state
        report.notes.append("peer weights staged through CPU memory (two copies do not fit on the GPU)")
    else:
        where = "GPU to GPU" if workload.device.type == "cuda" else "in memory"
        progress(f"building diffusers' transformer with our weights ({where} copy)")
        peer = peer_lib.from_ltx2(model)
    progress("diffusers peer ready")
    return peer


def _diffusers_version() -> str | None:
    try:
        import diffusers
    except Exception:
        return None
    return diffusers.__version__


def _kernel_note(report: BenchReport) -> str:
    sources = sorted({r.kernel_source for r in report.passes if r.kernel_source})
    cpu = {"aten ops", "not counted (compile)"}
    if sources and set(sources) <= cpu:
        return ("on CPU the kernel column counts aten ops dispatched per pass (a stand-in for kernel launches)"
                + ("; compiled rows are not counted (dynamo runs no compiled code under the counter)"
                   if "not counted (compile)" in sources else ""))
    if not sources:
        return "none counted (every row failed before its kernels were counted)"
    return f"counted with {', '.join(sources)} (graph replays count every kernel node)"


def main(args, progress: Progress) -> int:
    """Entry for `ltx2-graphs bench` (called by graphs.cli). Exit status 1 when a row failed: the tables and the
    JSON still come out, with the error in that row, and a script can tell."""
    report = bench(args, progress)
    if args.json != "-":
        print(format_report(report))
    if args.json:
        emit_json(report.to_json(), args.json)
    failed = sum(1 for r in report.passes if r.error) + sum(1 for r in report.steps if r.error)
    if failed:
        progress(f"{failed} row(s) failed; see the table")
    return 1 if failed else 0

"""The executor a `--executor` name stands for, and its warm-up (compile and/or capture) before timing.

    eager           pipeline.executor.EagerExecutor: one plain model call per pass
    compile         graphs.compile.CompiledExecutor: regional torch.compile of the blocks, passes run eagerly
    graphs          graphs.executor.GraphExecutor: one CUDA graph per pass (GPU only)
    compile+graphs  GraphExecutor(compile="default"): compiled blocks captured into one graph per pass

A model whose blocks its own library already compiled (diffusers' `compile_repeated_blocks`, the benchmark's peer)
is made with `precompiled=True`: "compile" then runs those compiled blocks as they are and "compile+graphs"
captures them, so its rows measure what a user of that library gets, not our regional compile of its blocks.

Warm-up runs before any timed or checked work and is reported on its own: for the graph executors it captures
every pass ahead of time (`GraphExecutor.warmup`), for the compiled one it runs one evaluation so every
variant compiles, for eager it runs one evaluation so one-time library set-up (cuBLAS handles, kernel
selection) stays out of the step times.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from profiling.syncs import allow_host_sync

EXECUTOR_NAMES = ("eager", "graphs", "compile", "compile+graphs")


@dataclass
class WarmupStats:
    """Warm-up cost of one executor for one set of shapes. None = not applicable to this executor."""

    seconds: float = 0.0  # wall time of the whole warm-up (compile + capture + first runs)
    captures: int | None = None  # graphs captured (graph executors)
    compiles: int | None = None  # graphs torch.compile compiled (one per region and variant)
    pool_bytes: int | None = None  # device memory held by the shared graph pool


def make_executor(name: str, model: nn.Module, *, progress: Callable[[str], None] | None = None,
                  share_text_kv: bool = True, precompiled: bool = False):
    """The pass executor for `name` (one of EXECUTOR_NAMES) driving `model`; `share_text_kv` for graph executors;
    `precompiled`: the model's blocks are compiled already (module docstring), so no compile of ours."""
    if name not in EXECUTOR_NAMES:
        raise ValueError(f"executor must be one of {EXECUTOR_NAMES}, got {name!r}")
    if name == "eager" or (name == "compile" and precompiled):
        from pipeline.executor import EagerExecutor

        return EagerExecutor(model)
    if name == "compile":
        from graphs.compile import CompiledExecutor

        return CompiledExecutor(model, "default")
    from graphs.executor import GraphExecutor

    compile = "default" if name == "compile+graphs" and not precompiled else False
    return GraphExecutor(model, miss_policy="capture", compile=compile, share_text_kv=share_text_kv,
                         progress=progress)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        with allow_host_sync("end of warm-up"):
            torch.cuda.synchronize(device)


def warm_up(
    executor,
    name: str,
    specs: Sequence,
    conditioning,
    video: torch.Tensor,
    audio: torch.Tensor,
    *,
    progress: Callable[[str], None],
) -> WarmupStats:
    """Set the conditioning and compile/capture every pass of `specs` for these shapes (see module docstring)."""
    started = time.perf_counter()
    before = getattr(executor, "stats", None)  # graph executors count cumulatively; report this warm-up's share
    blocks = getattr(executor, "blocks", None)  # our compiled blocks (CompiledExecutor), not a precompiled model's
    compiles_before = blocks.compiles if blocks is not None else 0
    passes = ",".join(s.name for s in specs)
    if name in ("graphs", "compile+graphs"):
        compiled = " with compiled blocks" if "compile" in name else ""
        progress(f"capturing {len(specs)} pass graph(s) ({passes}){compiled}")
        executor.warmup(specs, video, audio, conditioning=conditioning)
    else:
        if name == "compile":
            progress(f"compiling the blocks for passes {passes}")
        executor.set_conditioning(conditioning)
        with torch.no_grad():
            executor.run(video, audio, 1.0, specs)
    _sync(video.device)
    stats = WarmupStats(seconds=time.perf_counter() - started)
    after = getattr(executor, "stats", None)
    if after is not None:
        stats.captures = after.captures - before.captures
        stats.compiles = after.compiles - before.compiles
        stats.pool_bytes = after.pool_bytes  # the pool is shared by every graph captured so far
    elif blocks is not None:
        stats.compiles = blocks.compiles - compiles_before
    if name != "eager":
        progress(f"warm-up done in {stats.seconds:.1f} s")
    return stats

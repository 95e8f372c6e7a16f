"""Regional torch.compile of the transformer blocks, underneath CUDA graphs that stay ours.

Why regional: compiling the blocks (not the whole model) compiles ONE block structure. Dynamo keys its cache
on the block's forward code and, inlining built-in nn modules, takes each block's parameters as inputs, so
the code compiled for block 0 serves all 48 blocks. Each distinct combination of skip flags a block sees
(self-attention skipped or not, a2v/v2a on or off) and each input shape adds one variant: a handful in all,
not one per pass per block. A block class may split itself into several regions (`compile_regions`: method
names): LTX-2.3's block does, so that its forward can put the audio regions on a side CUDA stream
(pipeline/streams.py) between compiled calls; each region is then compiled and shared as above.

Why bounded: when a function recompiles too often dynamo's default is to fall back to eager silently. Here
that limit is an error (`fail_on_recompile_limit_hit`), compiles are counted (`compiles`), and outside
warm-up the stance is "fail_on_recompile", so an unexpected recompile raises instead of compiling (a compile
inside a graph capture would also sync the host and abort it).

Inductor's own CUDA graphs stay off (modes "reduce-overhead" and "max-autotune" are refused, and inductor's
cudagraphs option is patched off while compiling): the per-pass graphs capture the compiled kernels.
`dynamic=False`: each shape gets static kernels, which is what a static graph wants anyway.

Inductor's comprehensive padding is off too. It pads the row stride of buffers whose width is not a multiple of
128 bytes; the fused projections are such widths ([q | k | v | gate logits] = 3 * 4096 + 32 columns), so their
GEMM outputs became non-contiguous, and `addmm` into a non-contiguous `out` cannot use the cuBLASLt bias
epilogue: it copies the broadcast bias over the whole output and runs the GEMM with beta = 1 instead. Measured
on an H200 at 8160 video tokens: 6 such copies per block, 14.3 ms per pass (profiling/PERF_LOG.md).

So is its GEMM shape padding (`shape_padding`), for another reason: whether to pad a GEMM whose sizes are not
multiples of 8 (here the audio chain's, at 126 rows) is decided by timing both versions while compiling, and a
padded `addmm` becomes pad + mm + a separate bias-add kernel. The timings are close, so on a fresh compile cache
the decision flips from machine to machine: on an H200, two fresh processes out of about a dozen compiled 3-4 such
kernels more per block (2,461 and 2,509 kernels per cond pass against 2,317) at the same cycles per pass. Off, the
compiled graph depends on the code alone, and a fresh compile skips those timings.

The compiled callables are installed on the blocks only inside `compiling()` / `frozen()`, so the same model
driven by another executor outside them runs plain eager code. Compiler settings are restored in `finally`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import nn

from graphs.errors import CaptureError

COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
_MISSING = object()


def compile_mode_name(compile: bool | str | None) -> str:
    """The compile setting as a key value: "off", "default" or "max-autotune-no-cudagraphs"."""
    if compile is None or compile is False or compile == "off":
        return "off"
    if compile is True:
        return "default"
    if compile in COMPILE_MODES:
        return compile
    raise ValueError(
        f"compile must be False, True or one of {COMPILE_MODES}, got {compile!r} (modes that turn on inductor's "
        "own CUDA graphs are refused: the per-pass graphs are captured by this package)"
    )


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks: the longest `nn.ModuleList` whose children share one class.

    A model may name its block classes in `_repeated_blocks` (diffusers' convention); then only lists of
    those classes count.
    """
    wanted = set(getattr(model, "_repeated_blocks", None) or ())
    best: list[nn.Module] = []
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        classes = {type(child) for child in module}
        if len(classes) != 1 or (wanted and next(iter(classes)).__name__ not in wanted):
            continue
        if len(module) > len(best):
            best = list(module)
    if not best:
        raise ValueError(
            f"{type(model).__name__} has no nn.ModuleList of same-class blocks to compile"
            + (f" (looked for classes {sorted(wanted)})" if wanted else "")
        )
    return best


def _unique_graphs() -> int:
    """Dynamo's running count of graphs it has compiled (in this process)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _is_recompile_error(error: BaseException, *, limit_only: bool = False) -> bool:
    """Whether dynamo refused to compile: a region reached its recompile limit (`FailOnRecompileLimitHit`, raised
    under `fail_on_recompile_limit_hit`) or, unless `limit_only`, any recompile was refused (stance
    "fail_on_recompile": a plain RuntimeError naming the stance; config `error_on_recompile`: `RecompileError`).

    Types are matched by name, so classifying an error imports nothing. The limit is recognised by its type
    only: a message that merely mentions `recompile_limit` (a config error, say) is not a limit hit, and must not
    be reported as "too many variants". `compiling()` asks `limit_only`: a recompile refused by an enclosing
    `frozen()` stance is not its variant budget running out, and passes through to `frozen()`'s own message.
    """
    name = type(error).__name__
    if name == "FailOnRecompileLimitHit":
        return True
    return not limit_only and (name == "RecompileError" or "fail_on_recompile" in str(error))


class CompiledBlocks:
    """Compiled regions (forwards, or the methods in `compile_regions`) of the repeated blocks of one model,
    installed only inside a context.

    - `compiling()`: new variants may compile (warm-up), at most `max_variants` per region; reaching the limit
      is a `CaptureError`, never a silent eager fallback.
    - `frozen()`: any recompile is a `CaptureError` (capture, and anything after warm-up).
    `compiles` counts the graphs dynamo compiled inside `compiling()`.
    """

    def __init__(
        self,
        model: nn.Module,
        mode: str,
        *,
        max_variants: int = 16,
        backend: str = "inductor",
    ) -> None:
        if mode not in COMPILE_MODES:
            raise ValueError(f"mode must be one of {COMPILE_MODES}, got {mode!r}")
        if max_variants < 1:
            raise ValueError(f"max_variants must be >= 1, got {max_variants}")
        self.backend = backend
        self.max_variants = max_variants
        self.blocks = find_blocks(model)
        options: dict = {"backend": backend, "fullgraph": True, "dynamic": False}
        if backend == "inductor":
            options["mode"] = mode
        # The regions: the methods the block class names in `compile_regions` (a forward that switches CUDA
        # streams between them stays eager Python), else its whole forward. ONE compiled wrapper per region,
        # bound to each block: dynamo caches per code object and guards on the backend object, so a single
        # wrapper lets every block share the compiled variants.
        cls = self.block_class = type(self.blocks[0])
        self.regions: tuple[str, ...] = tuple(getattr(cls, "compile_regions", None) or ("forward",))
        self._functions = {name: getattr(cls, name) for name in self.regions}
        compiled = {name: torch.compile(fn, **options) for name, fn in self._functions.items()}
        self._bound = [{name: functools.partial(fn, block) for name, fn in compiled.items()} for block in self.blocks]
        self._new_variants = dict.fromkeys(self.regions, 0)  # variants this instance compiled, per region
        self.compiles = 0

    def covers(self, blocks: list[nn.Module]) -> bool:
        """Whether these compiled regions are those of `blocks`: the same block objects, still of the class whose
        methods were compiled (a class changed in place would otherwise run the old class's compiled code)."""
        return blocks == self.blocks and all(type(block) is self.block_class for block in blocks)

    def cached_variants(self) -> dict[str, int]:
        """Compiled variants dynamo holds per region (all instances in this process)."""
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        return {name: len(_debug_get_cache_entry_list(fn.__code__)) for name, fn in self._functions.items()}

    @contextlib.contextmanager
    def _installed(self) -> Iterator[None]:
        """Each region's compiled function shadows the class's method on each block, `forward` too: calling a
        block still goes through `nn.Module.__call__`, which runs its hooks around it. Whatever was there before
        is put back on exit (so the contexts nest)."""
        saved = [{name: block.__dict__.get(name, _MISSING) for name in self.regions} for block in self.blocks]
        try:
            for block, bound in zip(self.blocks, self._bound):
                block.__dict__.update(bound)
            yield
        finally:
            for block, shadowed in zip(self.blocks, saved):
                for name, old in shadowed.items():
                    if old is _MISSING:
                        block.__dict__.pop(name, None)
                    else:
                        block.__dict__[name] = old

    @contextlib.contextmanager
    def _inductor_settings(self) -> Iterator[None]:
        """Inductor's CUDA graphs and GEMM padding off while compiling (module docstring says why)."""
        if self.backend != "inductor":
            yield
            return
        import torch._inductor.config as inductor_config

        off = {"triton.cudagraphs": False, "comprehensive_padding": False, "shape_padding": False}
        with inductor_config.patch(off):
            yield

    @contextlib.contextmanager
    def compiling(self) -> Iterator[None]:
        """Blocks run compiled; new variants compile, bounded by `max_variants`."""
        import torch._dynamo

        before, cached = _unique_graphs(), self.cached_variants()
        # Dynamo's limit is one number checked against the cache entries of every region's code (other
        # instances' entries too): allow the largest remaining budget, then hold each region to its own.
        limit = max(1, max(cached[r] + self.max_variants - self._new_variants[r] for r in self.regions))
        try:
            with (
                torch._dynamo.config.patch(recompile_limit=limit, fail_on_recompile_limit_hit=True),
                self._inductor_settings(),
                self._installed(),
            ):
                yield
        except CaptureError:
            raise
        except Exception as e:
            if _is_recompile_error(e, limit_only=True):
                now = self.cached_variants()
                raise self._too_many_variants({r: now[r] for r in self.regions if now[r] >= limit}) from e
            raise
        finally:
            self.compiles += _unique_graphs() - before
            for name, count in self.cached_variants().items():
                self._new_variants[name] += count - cached[name]
        over = {r: n for r, n in self._new_variants.items() if n > self.max_variants}
        if over:
            raise self._too_many_variants(over)

    def _too_many_variants(self, counts: dict[str, int]) -> CaptureError:
        regions = ", ".join(f"{name} ({count})" for name, count in counts.items())
        return CaptureError(
            f"torch.compile needed more than {self.max_variants} variants of the {len(self.blocks)} "
            f"{type(self.blocks[0]).__name__} blocks (variants per region: {regions}; one per skip-flag "
            "combination and shape is expected): a guard probably specialises on something that differs per block "
            'or per call. Run with TORCH_LOGS="recompiles" to see the failing guard, or raise max_variants.'
        )

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Blocks run compiled; any recompile raises `CaptureError` (stance "fail_on_recompile")."""
        try:
            with torch.compiler.set_stance("fail_on_recompile"), self._installed():
                yield
        except CaptureError:
            raise
        except Exception as e:
            if _is_recompile_error(e):
                raise CaptureError(
                    "torch.compile wanted to recompile a block outside warm-up (an input shape, dtype or skip "
                    f"flag its warm-up did not see): {str(e).splitlines()[0]}"
                ) from e
            raise


class CompiledExecutor:
    """A pass executor that runs passes eagerly with compiled blocks (regional compile, no CUDA graphs).

    It wraps `pipeline.executor.EagerExecutor`; every call may compile a new variant, bounded as in
    `CompiledBlocks.compiling`. Sync contract: as the eager executor's, plus whatever a first compile of a
    variant does (compiles happen on the first evaluation that needs them).
    """

    def __init__(
        self, model: nn.Module, mode: str | bool = "default", *, max_variants: int = 16, backend: str = "inductor"
    ) -> None:
        from pipeline.executor import EagerExecutor

        name = compile_mode_name(mode)
        if name == "off":
            raise ValueError("CompiledExecutor needs a compile mode, got compile off (use EagerExecutor)")
        self.model = model
        self.blocks = CompiledBlocks(model, name, max_variants=max_variants, backend=backend)
        self._eager = EagerExecutor(model)

    def set_conditioning(self, conditioning) -> None:
        self._eager.set_conditioning(conditioning)

    def run(self, video, audio, sigma, specs):
        with self.blocks.compiling():
            return self._eager.run(video, audio, sigma, specs)

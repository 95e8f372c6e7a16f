"""GraphExecutor: the pipeline's pass executor, with one static CUDA graph per guidance pass.

Per evaluation `run` copies the latents into the static inputs once, fills the sigma buffer from the host
float, and replays one graph per pass spec (in capture order, see `graphs.capture`), returning each pass's
held outputs. Texts and RoPE tables are copied into their static buffers once per `set_conditioning`
(lazily, at the first `run` of each input signature after it).

Text keys/values shared (`share_text_kv`, on by default for a model with `text_kv`): passes of one evaluation
that read the same text at the same sigma (cond, perturbed, modality) need the same text cross-attention
keys/values in every block. The first of them (in `PASS_NAMES` order) computes them once and holds them as an
output of its graph; the others are captured reading those held tensors (their key names the producer and its
options), and replay after it, in the same evaluation. Passes that project their own text keys/values (neg) are
captured before the producer, so its held keys/values can sit on their temporaries (`TextKVRole.capture_rank`;
when both are new in one evaluation: a pass added to an executor that already holds the producer's graph is
captured after it, correct but with both sets in the pool, so warm up the whole pass set first). The held
keys/values are valid from the producer's replay until new inputs are loaded or a graph captured before the
producer replays (its temporaries may occupy the held keys/values' memory); a consumer replay (`run` or
`replay_only`) outside that window raises instead of reading them.

Each pass is looked up by its `GraphKey` (pass options, text K/V role, input shapes, device, model, weights,
compile mode).
A key that is not cached is a miss, handled by the miss policy:
  "capture" (default): capture it now (captures during the first run are silent, later misses warn once);
  "strict": raise `GraphMissError` naming the fields that differ from the nearest cached key;
  "eager": run that pass eagerly (warn once).
Nothing ever replays a graph for inputs it was not captured with. When the weights change (a load, an in-place
edit or a replaced weight: `weights_version`, the parameters' version counters or the weights' storage moved) and
no cached graph was captured for the new ones, every graph is dropped with its pool before the next captures (in
`run` under policies "capture" and "eager", and in `warmup`; `run` under "strict" keeps them and raises): each
set holds ~1-2 GB at `ltx2.3` scale, and reads the old weights' memory. Other buffers' addresses alone drop
nothing: they can come back (a peer model switching between grids rebinds its coordinate buffers, and switching
back hits again).

Sync contract: once every key is captured (`warmup`), `run` and `replay_only` never synchronise the host:
two device copies, one `fill_` with a host float, one graph launch per pass, host metadata reads. Captures
(on a miss or in `warmup`) synchronise deliberately (see `graphs.capture`).

Not re-entrant: the static buffers and held outputs are shared, so a second call while one is in progress
(another thread, or a call from inside a pass) raises `RuntimeError` instead of corrupting them.
On a CPU model the executor refuses (policies "capture"/"strict") or runs every pass eagerly ("eager").
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from graphs.buffers import StaticInputs
from graphs.capture import GraphPool, PassGraph, PassOutputs
from graphs.compile import CompiledBlocks, compile_mode_name, find_blocks
from graphs.errors import CaptureError, GraphMissError, GraphMissWarning
from graphs.keys import (OWN, GraphKey, InputSignature, ModelIdentity, TextKVRole, WeightsProbe, explain_miss,
                         pass_options)
from graphs.trees import paths_off_device
from pipeline.config import is_int
from pipeline.executor import (Conditioning, EagerExecutor, Velocity, check_host_float, check_latents, check_specs,
                               validate_conditioning)
from pipeline.passes import PASS_NAMES, PassSpec
from profiling.ranges import region

MISS_POLICIES = ("capture", "strict", "eager")


def _stderr_line(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class GraphStats:
    """A snapshot of what an executor has done. Times in seconds, memory in bytes."""

    graphs: int  # graphs cached now
    captures: int  # captures done (warmup and misses)
    capture_seconds: float  # warm-up (incl. compile) + capture, summed over captures
    replays: int
    misses: int  # run() lookups that found no graph
    eager_passes: int  # passes run eagerly (policy "eager" or a CPU model)
    compiles: int  # graphs torch.compile compiled during warm-ups (one per region and variant)
    pool_bytes: int  # device memory held by the shared graph pool
    static_bytes: int  # device memory of the static input buffers

    def __str__(self) -> str:
        return (
            f"{self.graphs} graph(s), {self.captures} capture(s) in {self.capture_seconds:.2f} s, "
            f"{self.replays} replay(s), {self.misses} miss(es), {self.eager_passes} eager pass(es), "
            f"{self.compiles} compile(s), pool {self.pool_bytes / 2**20:.1f} MiB, "
            f"static inputs {self.static_bytes / 2**20:.1f} MiB"
        )


def graphs_supported(device: torch.device) -> bool:
    """Whether CUDA graphs can be captured on `device` (only CUDA devices)."""
    return device.type == "cuda"


def text_kv_roles(specs: Sequence[PassSpec], share: bool) -> dict[str, TextKVRole]:
    """Each pass's text keys/values role (`graphs.keys.TextKVRole`), by pass name.

    With `share`, a text read by two or more of the passes is projected once, by the first of its readers in
    `PASS_NAMES` order (so the roles, and the graph keys, do not depend on the order the specs come in). The
    others' role names that pass and its options, sorted by name ("consume:perturbed(skip_audio_self_attn_blocks=
    (28,), ...)"): their graphs read the tensors of that very graph, so a producer with other options means other
    consumers.
    """
    roles = dict.fromkeys((s.name for s in specs), OWN)
    if share:
        for text in {s.text for s in specs}:
            readers = sorted((s for s in specs if s.text == text), key=lambda s: PASS_NAMES.index(s.name))
            if len(readers) > 1:
                producer = readers[0]
                roles[producer.name] = TextKVRole("produce")
                roles.update(dict.fromkeys((s.name for s in readers[1:]),
                                           TextKVRole.reading(producer.name, pass_options(producer))))
    return roles


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    if param is None:
        raise ValueError(f"model {type(model).__name__} has no parameters; cannot tell its device")
    return param.device


class GraphExecutor:
    """Replays one static CUDA graph per guidance pass; implements `pipeline.executor.PassExecutor`.

    Args:
        model: the transformer (`pipeline.model.LTX2Transformer` or anything with its forward signature).
        miss_policy: "capture" | "strict" | "eager", see the module docstring.
        compile: False, True/"default" or "max-autotune-no-cudagraphs": regional torch.compile of the blocks
            before capture (`graphs.compile`).
        warmup_iters: eager (or compiled) calls on the capture stream before each capture.
        max_compile_variants: bound on compiled variants per block region; more is a `CaptureError`.
        share_text_kv: passes of one text share its keys/values (module docstring); only for models with a
            `text_kv` method (`pipeline.model.LTX2Transformer`), ignored otherwise.
        progress: receives one line per capture (default: stderr); None for silence.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        miss_policy: str = "capture",
        compile: bool | str = False,
        warmup_iters: int = 2,
        max_compile_variants: int = 16,
        share_text_kv: bool = True,
        progress: Callable[[str], None] | None = _stderr_line,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module (an LTX2Transformer), got {type(model).__name__}")
        if miss_policy not in MISS_POLICIES:
            raise ValueError(f"miss_policy must be one of {MISS_POLICIES}, got {miss_policy!r}")
        if not is_int(warmup_iters) or warmup_iters < 1:
            raise ValueError(
                f"warmup_iters must be an int >= 1 (lazy initialisation must not happen in capture), got "
                f"{warmup_iters!r}"
            )
        if not is_int(max_compile_variants) or max_compile_variants < 1:
            raise ValueError(f"max_compile_variants must be an int >= 1, got {max_compile_variants!r}")
        if progress is not None and not callable(progress):
            raise ValueError(f"progress must be a callable taking one line, or None, got {progress!r}")
        self.model = model
        self.miss_policy = miss_policy
        self.compile_mode = compile_mode_name(compile)
        self.warmup_iters = warmup_iters
        self.max_compile_variants = max_compile_variants
        if not isinstance(share_text_kv, bool):
            raise ValueError(f"share_text_kv must be a bool, got {share_text_kv!r}")
        self.share_text_kv = share_text_kv and callable(getattr(model, "text_kv", None))
        self.device = _model_device(model)
        self.graphs_enabled = graphs_supported(self.device)
        if not self.graphs_enabled and miss_policy != "eager":
            raise CaptureError(
                f"GraphExecutor needs the model on a CUDA device, but it is on {self.device}: CUDA graphs exist "
                "only on CUDA. Use pipeline.executor.EagerExecutor here, or GraphExecutor(..., miss_policy='eager') "
                "to run every pass eagerly."
            )
        self._progress = progress
        self._weights = WeightsProbe(model)
        self._lock = threading.Lock()
        self._conditioning: Conditioning | None = None
        self._generation = 0
        self._statics: dict[InputSignature, StaticInputs] = {}
        self._graphs: dict[GraphKey, PassGraph] = {}
        self._pool: GraphPool | None = None
        self._blocks: CompiledBlocks | None = None
        self._earlier_compiles = 0  # compiled by the `CompiledBlocks` of blocks since swapped out
        self._eager = EagerExecutor(model)  # runs the passes the policy sends to eager
        self._eager_generation = -1
        self._last_signature: InputSignature | None = None  # inputs of the last run/warmup, for replay_only
        self._last_roles: dict[str, TextKVRole] = {}  # text K/V roles of the last run/warmup's passes, for replay_only
        self._text_kv_producers: dict[str, PassGraph] = {}  # text -> producer whose held K/V match the loaded inputs
        self._warned: set[str] = set()
        self._settled = False  # a run/warmup has completed: later misses are warned (the first run's are not)
        self._captures = 0
        self._capture_seconds = 0.0
        self._replays = 0
        self._misses = 0
        self._eager_passes = 0
        self._pool_bytes = 0

    # ------------------------------------------------------------------------------------------ public API

    def set_conditioning(self, conditioning: Conditioning) -> None:
        """Texts and RoPE tables for the next runs (once per generation/stage). The static copies are filled
        lazily by the next `run` of each input signature: device copies, no host sync."""
        with self._exclusive("set_conditioning"):
            self._set_conditioning(conditioning)

    def run(self, video: Tensor, audio: Tensor, sigma: float, specs: Sequence[PassSpec]) -> dict[str, Velocity]:
        """One guided evaluation: each spec's velocity, keyed by spec name, valid until the next `run`, or until a
        `replay_only` of a graph captured before that pass's (its temporaries may occupy the outputs' memory).

        video [B, Nv, C], audio [B, Na, C] on the model's device, any floating dtype (cast into the model-dtype
        static buffers, as the eager executor casts); `sigma` a host float. The returned tensors are the graphs'
        held outputs: read them before the next `run` or `replay_only`.
        """
        with self._exclusive("run"):
            conditioning, specs, sigma = self._checked(specs, video, audio, sigma)
            if not self.graphs_enabled:
                self._warn_once("cpu", lambda: f"CUDA graphs need a CUDA device (model on {self.device}); running "
                                               "every pass eagerly (miss_policy='eager')")
                return {s.name: self._eager_pass(s, video, audio, sigma) for s in specs}
            keyed, static = self._prepare(video, audio, sigma, specs, conditioning,
                                          drop_stale=self.miss_policy != "strict")  # strict keeps them to explain
            if self.miss_policy == "strict":
                missing = [key for _, key in keyed if key not in self._graphs]
                if missing:
                    self._misses += len(missing)
                    raise GraphMissError(f"{explain_miss(missing[0], self._graphs)} (miss_policy='strict': capture "
                                         "it ahead of time with warmup(...), or use miss_policy='capture')")
            outputs: dict[str, Velocity] = {}
            for spec, key in keyed:
                graph = self._graphs.get(key)
                if graph is None:
                    self._misses += 1
                    if self.miss_policy == "eager":
                        self._warn_once("eager", lambda: f"running a pass eagerly (miss_policy='eager'): "
                                                         f"{explain_miss(key, self._graphs)}")
                        outputs[spec.name] = self._eager_pass(spec, video, audio, sigma)
                        continue
                    if self._settled:
                        self._warn_once("capture", lambda: f"capturing a new graph (miss_policy='capture'): "
                                                           f"{explain_miss(key, self._graphs)}")
                    graph = self._capture(spec, key, static)
                outputs[spec.name] = self._replay(graph)
            self._settled = True
            return {spec.name: outputs[spec.name] for spec in specs}

    def warmup(
        self,
        specs: Sequence[PassSpec],
        video_like: Tensor,
        audio_like: Tensor,
        *,
        sigma: float = 1.0,
        conditioning: Conditioning | None = None,
    ) -> float:
        """Capture every spec for these shapes ahead of time; returns the seconds spent capturing.

        `video_like`/`audio_like` give shapes, dtypes and the values warm-up computes on; `conditioning`
        (optional) is set first. Every spec's graph, new or cached, is then replayed once, in order: so a
        producer's text keys/values are valid before its readers are captured, and no first timed replay is an
        outlier. Captures here are not misses and do not warn (a weights change that drops the old graphs does).
        No-op (0.0) on a CPU model.
        """
        with self._exclusive("warmup"):
            if conditioning is not None:
                self._set_conditioning(conditioning)
            conditioning, specs, sigma = self._checked(specs, video_like, audio_like, sigma)
            if not self.graphs_enabled:
                return 0.0
            keyed, static = self._prepare(video_like, audio_like, sigma, specs, conditioning, drop_stale=True)
            seconds = 0.0
            for spec, key in keyed:
                graph = self._graphs.get(key)
                if graph is None:
                    graph = self._capture(spec, key, static)
                    seconds += graph.seconds
                self._replay(graph)
            self._settled = True
            return seconds

    def replay_only(self, spec: PassSpec) -> Velocity:
        """Replay `spec`'s graph for the inputs of the last `run`/`warmup` without copying any input.

        For timing one pass. Re-reads the weights state (host metadata, ~1 us per weight) so a weight change
        is a `GraphMissError`, never a stale replay; a pass reading held text keys/values that are no longer
        valid (module docstring) raises `GraphMissError` too (replay their producer first). Never synchronises
        the host.
        """
        with self._exclusive("replay_only"):
            return self._replay(self._pass_graph(spec))

    def pass_graph(self, spec: PassSpec) -> PassGraph:
        """The captured graph of `spec` for the last `run`/`warmup` inputs and the current weights.

        `pass_graph(spec).replay()` is a bare graph launch for tight timing loops; it is valid only while the
        weights and the static inputs stay as they are and, for a pass reading held text keys/values, while those
        are valid (`replay_only` checks that; a bare launch cannot). Since the caller may launch it, the held text
        keys/values it could overwrite count as gone from here on (`replay_only` of their readers then raises).
        Raises `GraphMissError` when there is no such graph.
        """
        with self._exclusive("pass_graph"):
            graph = self._pass_graph(spec)
            self._forget_text_kv_under(graph)
            return graph

    @property
    def stats(self) -> GraphStats:
        return GraphStats(
            graphs=len(self._graphs),
            captures=self._captures,
            capture_seconds=self._capture_seconds,
            replays=self._replays,
            misses=self._misses,
            eager_passes=self._eager_passes,
            compiles=self._compiles(),
            pool_bytes=self._pool_bytes,
            static_bytes=sum(s.nbytes for s in self._statics.values()),
        )

    def keys(self) -> tuple[GraphKey, ...]:
        """Cached keys, in capture order."""
        return tuple(sorted(self._graphs, key=lambda k: self._graphs[k].order))

    def reset(self) -> None:
        """Drop every graph, the pool and the static inputs together (safe: the pool is never reused)."""
        with self._exclusive("reset"):
            self._drop_graphs()
            self._statics.clear()
            self._last_signature = None
            self._last_roles = {}

    # ------------------------------------------------------------------------------------------ internals

    def _drop_graphs(self) -> None:
        """Every graph with the pool: one graph cannot be freed alone (`graphs.capture`)."""
        self._graphs.clear()
        self._pool = None
        self._text_kv_producers.clear()
        self._pool_bytes = 0
        self._settled = False  # the captures that follow are announced like a first run's

    @contextlib.contextmanager
    def _exclusive(self, what: str) -> Iterator[None]:
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(
                f"GraphExecutor.{what}() called while another call is in progress (another thread, or from inside "
                "a pass): one executor is not re-entrant because its static buffers and outputs are shared; "
                "use one executor per thread"
            )
        try:
            yield
        finally:
            self._lock.release()

    def _set_conditioning(self, conditioning: Conditioning) -> None:
        validate_conditioning(conditioning)
        off = [f"texts[{n!r}].{p}" for n, t in conditioning.texts.items() for p in paths_off_device(t, self.device)]
        off += [f"rope.{p}" for p in paths_off_device(conditioning.rope, self.device)]
        if off:
            raise ValueError(f"conditioning tensors {off} are not on the model's device {self.device}")
        self._conditioning = conditioning
        self._generation += 1

    def _require_conditioning(self) -> Conditioning:
        if self._conditioning is None:
            raise ValueError(
                "call set_conditioning(conditioning) before run()/warmup(): the passes need texts and rope"
            )
        return self._conditioning

    def _checked(self, specs: Sequence[PassSpec], video: Tensor, audio: Tensor,
                 sigma: float) -> tuple[Conditioning, tuple[PassSpec, ...], float]:
        """The arguments of `run`/`warmup` checked against the conditioning and the model: (conditioning, specs as a
        tuple, sigma as a float)."""
        conditioning = self._require_conditioning()
        specs = check_specs(specs, conditioning)
        self._check_model_device()
        check_latents(video, audio, self.device, conditioning)
        return conditioning, specs, check_host_float(sigma)

    def _check_model_device(self) -> None:
        moved = _model_device(self.model)
        if moved != self.device:
            raise CaptureError(f"the model moved from {self.device} to {moved} after this GraphExecutor was built; "
                               "its graphs and buffers live on the old device: build a new GraphExecutor")

    def _model_dtype(self) -> torch.dtype:
        dtype = getattr(self.model, "dtype", None)
        return dtype if isinstance(dtype, torch.dtype) else next(self.model.parameters()).dtype

    def _static_inputs(self, signature: InputSignature, video: Tensor, audio: Tensor, conditioning) -> StaticInputs:
        static = self._statics.get(signature)
        if static is None:
            static = StaticInputs(video, audio, conditioning, self._model_dtype(), self._generation)
            self._statics[signature] = static
        elif static.conditioning_generation != self._generation:
            static.set_conditioning(conditioning, self._generation)
        return static

    def _prepare(
        self, video: Tensor, audio: Tensor, sigma: float, specs: tuple[PassSpec, ...], conditioning: Conditioning,
        *, drop_stale: bool,
    ) -> tuple[list[tuple[PassSpec, GraphKey]], StaticInputs]:
        """Keys of `specs` in replay order, and the static inputs loaded with this evaluation's values.
        `drop_stale`: drop every graph first when the weights changed since all of them (module docstring)."""
        weights = self._weights()  # once per evaluation, not per pass
        if drop_stale and self._graphs and not any(k.weights.same_weights(weights) for k in self._graphs):
            self._warn_once("weights", lambda: f"the model's weights changed since its {len(self._graphs)} graph(s) "
                                               "were captured: dropping them and their pool before capturing again")
            self._drop_graphs()
        identity = ModelIdentity.of(self.model, self._weights)
        signature = InputSignature.of(video, audio, conditioning, self._model_dtype())
        roles = text_kv_roles(specs, self.share_text_kv)
        keyed = [(s, GraphKey.make(s, signature, identity, weights, self.compile_mode, roles[s.name])) for s in specs]
        # Cached graphs first, in capture order; new keys after, by text K/V role (`TextKVRole.capture_rank`), then
        # in the given order. A graph captured later may reuse an earlier graph's temporaries, so replaying the
        # earlier one after it could overwrite its held output while the guidance combine still needs it.
        keyed.sort(key=lambda sk: (self._graphs[sk[1]].order if sk[1] in self._graphs else math.inf,
                                   sk[1].text_kv_role.capture_rank))
        static = self._static_inputs(signature, video, audio, conditioning)
        static.load(video, audio, sigma)
        self._text_kv_producers.clear()  # held keys/values were made from the previous inputs
        self._last_signature, self._last_roles = signature, roles
        return keyed, static

    def _pass_graph(self, spec: PassSpec) -> PassGraph:
        if not isinstance(spec, PassSpec):
            raise ValueError(f"spec must be a PassSpec (pipeline.passes), got {type(spec).__name__}")
        if self._last_signature is None:
            raise GraphMissError("no run() or warmup() yet: there are no inputs to replay a graph for")
        identity = ModelIdentity.of(self.model, self._weights)
        role = self._last_roles.get(spec.name, OWN)
        key = GraphKey.make(spec, self._last_signature, identity, self._weights(), self.compile_mode, role)
        graph = self._graphs.get(key)
        if graph is None:
            raise GraphMissError(explain_miss(key, self._graphs))
        return graph

    def _capture(self, spec: PassSpec, key: GraphKey, static: StaticInputs) -> PassGraph:
        """Capture `spec` (warm-up first; compiled regions compile there); a consumer of text keys/values reads
        those of the producer replayed before it."""
        if self._pool is None:
            self._pool = GraphPool(self.device)
        blocks = self._current_blocks()
        forward, producer = self._pass_function(spec, key, static)

        def warm() -> PassOutputs:
            with blocks.compiling():
                return forward()

        def frozen() -> PassOutputs:
            with blocks.frozen():
                return forward()

        graph = self._pool.capture(
            key,
            forward if blocks is None else frozen,
            static,
            order=len(self._graphs),
            warmup_iters=self.warmup_iters,
            warmup_fn=None if blocks is None else warm,
        )
        graph.text_kv_source = None if producer is None else producer.key
        self._graphs[key] = graph
        self._record_capture(graph)
        return graph

    def _current_blocks(self) -> CompiledBlocks | None:
        """The compiled regions for this capture (None without compile). Built at the first capture, and again when
        blocks were swapped in (or their class changed) since: the regions sit on the block objects, and a new
        block would otherwise run uncompiled, or as the old class, under a compiled graph's key."""
        if self.compile_mode != "off" and (self._blocks is None or not self._blocks.covers(self._compiled_blocks())):
            self._earlier_compiles += 0 if self._blocks is None else self._blocks.compiles
            self._blocks = CompiledBlocks(self.model, self.compile_mode, max_variants=self.max_compile_variants)
        return self._blocks

    def _pass_function(self, spec: PassSpec, key: GraphKey,
                       static: StaticInputs) -> tuple[Callable[[], PassOutputs], PassGraph | None]:
        """The pass as its graph runs it, reading `static`, and for a consumer of text keys/values the producer
        whose held tensors it reads (else None). A producer also returns the keys/values it holds."""
        model, args, kwargs = self.model, static.model_args(spec.text), spec.model_kwargs()
        role = key.text_kv_role
        if role.produces:
            def produce() -> PassOutputs:
                text_kv = model.text_kv(args.video_context, args.audio_context, args.sigma)
                return PassOutputs(model(*args, **kwargs, text_kv=text_kv), text_kv)

            return produce, None
        producer = None
        if role.consumes:  # `_prepare` puts producers first, and each new graph is replayed before the next capture
            producer = self._text_kv_producers.get(spec.text)
            if producer is None or producer.text_kv is None:
                raise RuntimeError(f"internal: {key.short()} captured before the pass holding its text K/V")
            if role != TextKVRole.reading(producer.key.pass_name, producer.key.options):
                raise RuntimeError(f"internal: {key.short()} would read the text K/V of {producer.key.short()}")
            kwargs["text_kv"] = producer.text_kv
        return (lambda: PassOutputs(model(*args, **kwargs))), producer

    def _record_capture(self, graph: PassGraph) -> None:
        """Counters, pool size and the progress line of a new capture."""
        self._captures += 1
        self._capture_seconds += graph.seconds
        self._pool_bytes = self._pool.reserved_bytes()
        if self._progress is not None:
            compiled = "" if self._blocks is None else f" incl. compile, {self._compiles()} compiled graph(s) so far"
            self._progress(
                f"captured {graph.key.short()} in {graph.seconds:.2f} s (warm-up {graph.warmup_seconds:.2f} s"
                f"{compiled}, capture {graph.capture_seconds:.2f} s); {len(self._graphs)} graph(s), "
                f"pool {self._pool_bytes / 2**20:.1f} MiB"
            )

    def _replay(self, graph: PassGraph) -> Velocity:
        """Every replay goes through here: it keeps `_text_kv_producers` true (module docstring)."""
        key = graph.key
        if key.text_kv_role.consumes:
            producer = self._text_kv_producers.get(key.text)
            if producer is None or producer.key != graph.text_kv_source:
                raise GraphMissError(
                    f"{key.short()} reads text K/V that no longer match the loaded inputs (new inputs since its "
                    f"producer replayed, or a graph captured before the producer replayed over them): replay "
                    f"{graph.text_kv_source.pass_name} first, or use run()")
        self._forget_text_kv_under(graph)
        if key.text_kv_role.produces:
            self._text_kv_producers[key.text] = graph
        with region(f"replay {graph.key.pass_name}"):
            out = graph.replay()
        self._replays += 1
        return out

    def _compiled_blocks(self) -> list[nn.Module]:
        """The model's blocks as regional compile sees them now; a block of another class swapped in is an error
        here, at the capture, rather than a block that runs uncompiled."""
        try:
            return find_blocks(self.model)
        except ValueError as e:
            raise CaptureError(f"compile={self.compile_mode!r} compiles the model's repeated blocks, which must share "
                               f"one class: {e} (a block swapped in for a wrapper or subclass?); use compile=False, "
                               "or swap every block") from e

    def _compiles(self) -> int:
        return self._earlier_compiles + (0 if self._blocks is None else self._blocks.compiles)

    def _forget_text_kv_under(self, graph: PassGraph) -> None:
        """Held text keys/values whose producer was captured after `graph` may sit on its temporaries: a replay of
        `graph` voids them."""
        for text, producer in list(self._text_kv_producers.items()):
            if producer.order > graph.order:
                del self._text_kv_producers[text]

    def _eager_pass(self, spec: PassSpec, video: Tensor, audio: Tensor, sigma: float) -> Velocity:
        """The pass as a plain model call (the uncompiled model) through the eager executor."""
        if self._eager_generation != self._generation:
            self._eager.set_conditioning(self._require_conditioning())
            self._eager_generation = self._generation
        with torch.no_grad():
            out = self._eager.run(video, audio, sigma, (spec,))[spec.name]
        self._eager_passes += 1
        return out

    def _warn_once(self, topic: str, message: Callable[[], str]) -> None:
        """Warn about `topic` the first time only; `message` is built only then (explaining a miss compares the
        key with every cached one)."""
        if topic not in self._warned:
            self._warned.add(topic)
            warnings.warn(f"GraphExecutor: {message()} (warned once per executor; `stats` counts misses, captures "
                          "and eager passes)",
                          GraphMissWarning, stacklevel=3)

"""Capture: one CUDA graph per pass, every graph in one shared memory pool that lives as long as its graphs.

Why each rule:
- Warm-up runs on the side stream that captures: lazy initialisation (cuBLAS handles and workspaces, cuDNN
  plans, torch.compile's first compile and autotuning, Triton kernel loading) must happen before capture.
- `capture_error_mode="global"`: a host sync or an unsafe CUDA call from any thread aborts the capture; a
  graph never silently contains one.
- One pool and one capture stream per executor: passes never run concurrently, so they can share memory. Each
  pass's outputs are allocated in the pool during its capture and held by its `PassGraph`, so no later
  capture places anything on them. A graph captured later may reuse the temporaries of one captured earlier;
  so within one evaluation graphs replay in capture order (`PassGraph.order`; the executor sorts by it), and
  then no replay can overwrite an output the guidance combine still needs.
- A pass that produces its text's keys/values for the other passes of an evaluation (`PassOutputs.text_kv`,
  see `graphs.executor`) holds them like its velocities; the passes captured after it read them at those
  addresses, and replay after it.
- Every `CUDAGraph` (a failed one too) stays referenced as long as the pool: a destroyed graph releases its
  share of the pool, and capturing into the pool afterwards trips an allocator assert.

Sync contract: capturing synchronises the device (`torch.cuda.graph` does, to free memory first, and the
warm-up is timed). That sync is deliberate: it is declared with `profiling.syncs.allow_host_sync` as one-time (a
warm loop captures nothing, so the pytest plugin's checks fail on it) and PyTorch's sync debug mode is suspended
around it. `PassGraph.replay` launches one graph on the current stream and never synchronises the host.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from graphs import trees
from graphs.buffers import StaticInputs
from graphs.errors import CaptureError
from graphs.keys import GraphKey
from pipeline.executor import Velocity
from profiling.ranges import region
from profiling.syncs import allow_host_sync, sync_debug_suspended

CAPTURE_FIX = (
    "A CUDA graph cannot contain a host sync (.item(), .cpu(), .tolist(), bool(tensor), nonzero, boolean-mask "
    "indexing, torch.tensor(list, device='cuda')) or a compile; run the pass eagerly under "
    "profiling.syncs.detect_host_syncs() to find the op"
)


def _first_error(error: BaseException) -> BaseException:
    """The error that broke a capture: ending a broken capture raises again, chaining the first one as context."""
    root = error
    for _ in range(8):
        if root.__context__ is None or root.__context__ is root:
            break
        root = root.__context__
    return root


class PassOutputs(NamedTuple):
    """What a captured pass function returns: its velocities and, when it produces them for the other passes of
    its text, the per-block text keys/values (`pipeline.model.LTX2Transformer.text_kv`)."""

    velocity: tuple[Tensor, Tensor]  # (video, audio)
    text_kv: tuple | None = None


@dataclasses.dataclass(eq=False)
class PassGraph:
    """One captured pass: the graph, its held outputs and the static inputs it reads.

    `outputs` (and `text_kv`, held by a producing pass) are allocated in the pool during this graph's capture, so
    no graph captured later writes them; a graph captured earlier may (its temporaries can be where they were
    placed). They stay valid until this graph replays again or any graph captured before it replays. `order` is
    the capture order within the pool (replay in increasing order). `text_kv_source`: the key of the pass whose
    held `text_kv` this graph reads (None when it projects its text itself).
    """

    key: GraphKey
    graph: torch.cuda.CUDAGraph
    outputs: Velocity
    static: StaticInputs  # never read here: it keeps the buffers the graph reads alive as long as the graph
    order: int
    warmup_seconds: float
    capture_seconds: float
    text_kv: tuple | None = None
    text_kv_source: GraphKey | None = None

    def replay(self) -> Velocity:
        """Launch the graph on the current stream (no host sync) and return the held outputs."""
        self.graph.replay()
        return self.outputs

    @property
    def seconds(self) -> float:
        return self.warmup_seconds + self.capture_seconds


class GraphPool:
    """The memory pool, capture stream and graph objects shared by all pass graphs of one executor."""

    def __init__(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise CaptureError(f"CUDA graphs need a CUDA device, got {device}")
        self.device = device
        with torch.cuda.device(device):
            self.handle = torch.cuda.graph_pool_handle()
            self.stream = torch.cuda.Stream(device=device)
        self._graphs: list[torch.cuda.CUDAGraph] = []  # every graph captured into the pool, failed ones too
        self._reserved_delta = 0  # memory_reserved growth across captures (fallback for reserved_bytes)
        self.failed: str | None = None  # why the pool is unusable after a failed capture

    def capture(
        self,
        key: GraphKey,
        fn: Callable[[], PassOutputs],
        static: StaticInputs,
        *,
        order: int,
        warmup_iters: int,
        warmup_fn: Callable[[], object] | None = None,
    ) -> PassGraph:
        """Warm up `warmup_fn` (default `fn`) on the capture stream, then capture `fn` into the pool.

        `fn` must read only `static`, the model and graphs captured earlier (held text keys/values), and return
        `PassOutputs`. Raises `CaptureError` (chained) when capture fails; the pool is unusable afterwards.
        """
        if self.failed is not None:
            raise CaptureError(f"this executor's graph pool is unusable after a failed capture ({self.failed}); "
                               "create a new GraphExecutor")
        warmup_fn = warmup_fn or fn
        name = key.pass_name
        with (
            region(f"capture {name}"),
            allow_host_sync(f"capture {name}", one_time=True),
            sync_debug_suspended(),
            torch.cuda.device(self.device),
            torch.no_grad(),
        ):
            start = time.perf_counter()
            self.stream.wait_stream(torch.cuda.current_stream())
            try:
                with torch.cuda.stream(self.stream):
                    for _ in range(warmup_iters):
                        warmup_fn()
            finally:  # a failed warm-up too: later work on the current stream waits for what it enqueued
                torch.cuda.current_stream().wait_stream(self.stream)
            torch.cuda.synchronize()  # warm-up (and any compile or autotune) finished: honest time split
            warm = time.perf_counter()
            torch.cuda.empty_cache()
            reserved = torch.cuda.memory_reserved(self.device)
            graph = torch.cuda.CUDAGraph()
            self._graphs.append(graph)
            try:
                with torch.cuda.graph(graph, pool=self.handle, stream=self.stream, capture_error_mode="global"):
                    out = fn()
            except CaptureError as e:
                self.failed = f"capture of {key.short()}: {e}"
                raise
            except Exception as e:
                self.failed = f"capture of {key.short()}: {type(e).__name__}"
                root = _first_error(e)
                cause = str(e) if root is e else f"{root} (then: {e})"
                raise CaptureError(f"capturing pass {name!r} ({key.short()}) failed: {cause}. {CAPTURE_FIX}.") from e
            self._reserved_delta += torch.cuda.memory_reserved(self.device) - reserved
            done = time.perf_counter()
        velocity = out.velocity if isinstance(out, PassOutputs) else None
        if not (isinstance(velocity, (tuple, list)) and len(velocity) == 2
                and all(isinstance(t, Tensor) for t in velocity)):
            raise CaptureError(f"pass {name!r} returned {type(out).__name__}, expected PassOutputs((video, audio))")
        if out.text_kv is not None and not all(isinstance(t, Tensor) for _, t in trees.leaves(out.text_kv)):
            raise CaptureError(f"pass {name!r} returned text_kv with non-tensor leaves")
        return PassGraph(key, graph, Velocity(*velocity), static, order, warm - start, done - warm, out.text_kv)

    def reserved_bytes(self) -> int:
        """Device memory the pool holds: its segments in the allocator snapshot (host-side walk, no sync)."""
        if not self._graphs:
            return 0
        pool = tuple(self.handle)
        total = sum(
            seg["total_size"] for seg in torch.cuda.memory_snapshot() if tuple(seg.get("segment_pool_id", ())) == pool
        )
        return total if total > 0 else max(self._reserved_delta, 0)

"""The audio chain on a second CUDA stream, next to the video chain on the current stream.

Why: the audio stream of LTX-2.3 is 126 tokens. Its kernels (small GEMMs, 64-dim attention, fused norms) are
latency-bound: at 1536 video tokens they are ~10 ms of a ~89 ms compiled pass, run one after another with the
video kernels although the two chains only meet at the A2V/V2A exchange of each block. On a side stream they run
alongside the video kernels. Measured on an H200 (profiling/PERF_LOG.md): bitwise the same outputs, -1.8 ms per
compiled pass at 1536 tokens, -5.6 ms without compile; less than the audio's own time because cuBLAS's
persistent GEMMs hold every SM, so the audio kernels mostly fill the tails and the elementwise kernels between.
Fork and join are stream-event waits: no host sync, and inside a CUDA graph capture they become the graph's
edges (the side stream joins the capture at the first fork).

Memory rules (PyTorch's caching allocator reuses a freed block on the stream that allocated it, with no regard
for other streams still reading it):
1. a tensor made on the current stream and read on the side stream is handed over with `fork(t)`, which keeps a
   reference to it until the next `join`: its block cannot be reused before then, and after the join the current
   stream's later work (which is what may reuse it) waits for the side stream's reads. Not
   `Tensor.record_stream`: during a graph capture the allocator keeps blocks with recorded stream uses until the
   capture ends: 22-24 MiB more graph pool at `ltx2.3` scale than a kept reference, freed at the join (H200);
2. a tensor made on the side stream and read on the current stream (after `join`) is only freed after that read
   is enqueued, and the side stream allocates again only after the next `fork`, which waits for it: so side-stream
   work (`side()`) is only allowed between a `fork` and the next `join` (checked);
3. inputs read on both streams for the whole forward (the text keys/values, RoPE tables, AdaLN outputs) stay
   referenced by the forward or its caller until after the final join.
One forward at a time per model: the side stream is the model's, and two concurrent forwards would break rule 2.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor


class AudioStreams:
    """One stream (CPU, or overlap turned off): fork, join and `side()` do nothing; all runs in program order."""

    def fork(self, *handed_over: Tensor) -> None:
        pass

    def join(self) -> None:
        pass

    def side(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


SEQUENTIAL = AudioStreams()


class OverlapStreams(AudioStreams):
    """The current stream (`main`, taken at construction) and one side stream, with fork/join between them."""

    def __init__(self, side: torch.cuda.Stream) -> None:
        self.main = torch.cuda.current_stream(side.device)
        self.side_stream = side
        self._forked = False
        self._handed_over: list[Tensor] = []

    def fork(self, *handed_over: Tensor) -> None:
        """The side stream waits for all work enqueued so far on main. `handed_over`: tensors the side stream will
        read and the forward may drop before the next join, made by main: kept alive until then (rule 1). Handing
        over a tensor the side stream made is harmless."""
        self.side_stream.wait_stream(self.main)
        self._handed_over.extend(handed_over)
        self._forked = True

    def join(self) -> None:
        """Main waits for all work enqueued so far on the side stream; then the handed-over tensors may go."""
        self.main.wait_stream(self.side_stream)
        self._handed_over.clear()
        self._forked = False

    @contextlib.contextmanager
    def side(self) -> Iterator[None]:
        if not self._forked:
            raise RuntimeError("side-stream work outside fork()/join() (pipeline/streams.py, memory rule 2)")
        with torch.cuda.stream(self.side_stream):
            yield


class SideStreamCache(dict):
    """device -> the side stream a model uses there, made on first use (`for_device`).

    CUDA streams cannot be copied or pickled: a deep copy (or unpickled copy) of a model starts with an empty
    cache and makes its own side stream when it first runs.
    """

    def for_device(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self:
            self[device] = torch.cuda.Stream(device=device)
        return self[device]

    def __deepcopy__(self, memo: dict) -> SideStreamCache:
        return type(self)()

    def __reduce__(self):
        return (type(self), ())

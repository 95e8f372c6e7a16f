"""The audio chain on a second CUDA stream, next to the video chain on the current stream.

Why: the audio stream of LTX-2.3 is 126 tokens. Its kernels (small GEMMs, 64-dim attention, fused norms) are
latency-bound: at 1536 video tokens they are ~10 ms of a ~89 ms compiled pass, run one after another with the
video kernels although the two chains only meet at the A2V/V2A exchange of each block. On a side stream they
fill the SMs the video kernels leave idle. Fork and join are stream-event waits: no host sync, and inside a CUDA
graph capture they become the graph's edges (the side stream joins the capture at the first fork).

Memory rules (PyTorch's caching allocator reuses a freed block on the stream that allocated it, with no regard
for other streams still reading it):
- a tensor made on the current stream and read on the side stream is handed over with `fork(t)`, which records
  the side stream's use (`Tensor.record_stream`), so the block is not reused before that read;
- a tensor made on the side stream and read on the current stream (after `join`) is only freed after that read
  is enqueued, and the side stream allocates again only after the next `fork`, which waits for it;
- inputs that live for the whole forward (contexts, RoPE tables, AdaLN outputs) are freed after the final join.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor


class SequentialStreams:
    """Stand-in when there is one stream (CPU, or overlap turned off): everything runs in program order."""

    def fork(self, *handed_over: Tensor) -> None:
        pass

    def join(self) -> None:
        pass

    def side(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


SEQUENTIAL = SequentialStreams()


class OverlapStreams(SequentialStreams):
    """The current stream (`main`, taken at construction) and one side stream, with fork/join between them."""

    def __init__(self, side: torch.cuda.Stream) -> None:
        self.main = torch.cuda.current_stream(side.device)
        self.side_stream = side

    def fork(self, *handed_over: Tensor) -> None:
        """The side stream waits for all work enqueued so far on main; `handed_over` are main's tensors it reads."""
        self.side_stream.wait_stream(self.main)
        for t in handed_over:
            t.record_stream(self.side_stream)

    def join(self) -> None:
        """Main waits for all work enqueued so far on the side stream."""
        self.main.wait_stream(self.side_stream)

    @contextlib.contextmanager
    def side(self) -> Iterator[None]:
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


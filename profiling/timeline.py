"""Profiler-neutral records of one profiled run: ranges, CUDA API calls, syncs, copies and kernels.

Both sources -- the in-process CUPTI profiler (:mod:`profiling.cupti`) and Nsight Systems sqlite exports
(:mod:`profiling.nsys`) -- are converted into a :class:`Timeline`, so attribution, reports and trace export
(:mod:`profiling.attribution`, :mod:`profiling.trace`) are written once and unit-tested on CPU with
synthetic records. All timestamps are integer nanoseconds on one clock (CUPTI's).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Normalised vocabularies (each source maps its own enums onto these strings).
SYNC_KINDS = ("unknown", "event_synchronize", "stream_wait_event", "stream_synchronize", "context_synchronize")
COPY_DIRECTIONS = ("HtoD", "DtoH", "DtoD", "HtoH", "PtoP", "other")

# CUDA API calls that block the calling host thread until the device catches up (names without the
# version suffix, see `canonical_api_name`). Runtime and driver spellings both appear in nsys exports.
BLOCKING_APIS = frozenset({
    "cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize", "cudaThreadSynchronize",
    "cudaMemcpy", "cudaMemcpy2D", "cudaMemcpy3D", "cudaMemcpyToSymbol", "cudaMemcpyFromSymbol",
    "cudaFree", "cudaFreeHost",
    "cuCtxSynchronize", "cuStreamSynchronize", "cuEventSynchronize", "cuMemcpyDtoH", "cuMemcpyHtoD",
    "cuMemcpy", "cuMemFree", "cuMemFreeHost",
})

_SUFFIX = re.compile(r"_v\d+$|_pt(sz|ds)$")


def canonical_api_name(name: str) -> str:
    """``cudaStreamSynchronize_v3020`` -> ``cudaStreamSynchronize``; ``cuMemcpyDtoH_v2`` -> ``cuMemcpyDtoH``.

    CUPTI and nsys name API calls with a version suffix (and ``_ptsz``/``_ptds`` for per-thread default
    streams); matching must ignore it.
    """
    previous = None
    while previous != name:
        previous, name = name, _SUFFIX.sub("", name)
    return name


def is_blocking_api(name: str) -> bool:
    return canonical_api_name(name) in BLOCKING_APIS


# Polls that return at once whether or not the work is done. CUPTI still files them as SYNCHRONIZATION records
# (seen on an H200, CUDA 13: `cudaEventQuery` as EVENT_SYNCHRONIZE, ~2 us, from the caching allocator), but the
# host never waits on them.
POLLING_APIS = frozenset({"cudaEventQuery", "cudaStreamQuery", "cuEventQuery", "cuStreamQuery"})


def is_polling_api(name: str) -> bool:
    return canonical_api_name(name) in POLLING_APIS


@dataclass(frozen=True)
class RangeRecord:
    """A region on a host thread (from the range listener, CUPTI MARKER records or nsys NVTX_EVENTS)."""

    name: str
    start: int
    end: int
    thread: int


@dataclass(frozen=True)
class ApiRecord:
    """A CUDA runtime (or driver) API call on a host thread."""

    name: str
    start: int
    end: int
    thread: int
    correlation: int


@dataclass(frozen=True)
class SyncRecord:
    """A CUPTI synchronisation record: a host thread waited (except ``stream_wait_event``: GPU-side)."""

    kind: str
    start: int
    end: int
    correlation: int
    stream: int | None = None


@dataclass(frozen=True)
class MemcpyRecord:
    """A memory copy executed by the device."""

    direction: str
    src_kind: str  # "pageable" | "pinned" | "device" | "managed" | "other"
    dst_kind: str
    bytes: int
    start: int
    end: int
    correlation: int
    stream: int | None = None


@dataclass(frozen=True)
class KernelRecord:
    """A kernel executed by the device (graph replays: one record per kernel node, launch correlation)."""

    name: str
    start: int
    end: int
    correlation: int
    stream: int | None = None


@dataclass(frozen=True)
class Timeline:
    """Everything one profiled run recorded, as plain records."""

    ranges: tuple[RangeRecord, ...] = ()
    api_calls: tuple[ApiRecord, ...] = ()
    syncs: tuple[SyncRecord, ...] = ()
    memcpys: tuple[MemcpyRecord, ...] = ()
    kernels: tuple[KernelRecord, ...] = ()
    source: str = "synthetic"

    def __post_init__(self) -> None:
        for field_name in ("ranges", "api_calls", "syncs", "memcpys", "kernels"):
            object.__setattr__(self, field_name, tuple(getattr(self, field_name)))
        for sync in self.syncs:
            if sync.kind not in SYNC_KINDS:
                raise ValueError(f"SyncRecord.kind: got {sync.kind!r}, expected one of {SYNC_KINDS}")
        for copy in self.memcpys:
            if copy.direction not in COPY_DIRECTIONS:
                raise ValueError(f"MemcpyRecord.direction: got {copy.direction!r}, expected one of {COPY_DIRECTIONS}")

"""Named regions of code: NVTX ranges in the "ltx2" domain plus a per-thread stack of open region names.

One way to mark regions serves three consumers:

* Nsight Systems (and any other NVTX tool) sees an NVTX push/pop range in domain ``ltx2``;
* the host-sync detectors read :func:`current_ranges` to say *where* a sync happened
  ("loop > step 3 > pass cond");
* the in-process CUPTI profiler registers a :func:`range_listener` and timestamps every boundary with
  CUPTI's own clock, because CUPTI only receives NVTX ranges when NVTX injection points at CUPTI
  (``NVTX_INJECTION64_PATH`` set before the process's first NVTX call), which is usually not the case.

Naming convention used by callers: ``"loop"``, ``"stage1"``/``"stage2"``, ``"step 3"``, ``"eval 3.1"``,
``"pass cond"``, ``"replay cond"``, ``"capture cond"``. NVTX calls inside a CUDA graph are recorded only at
capture, never at replay, so replays need an outer ``region("replay ...")`` on the host.

Cost when nothing listens: a list append/pop on a thread-local stack and two attribute checks; the NVTX
domain handle is a no-op object unless a tool is attached (the ``nvtx`` package decides once, at the
domain's first use, whether a tool is present).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol, TypeVar

import nvtx

DOMAIN = "ltx2"
# Region-name conventions the detectors and profilers rely on.
ALLOW_PREFIX = "allow_host_sync: "  # opened by profiling.syncs.allow_host_sync: syncs inside are deliberate
CONTROL_RANGE = "profiler control"  # the positive control's region (profiling.control)

F = TypeVar("F", bound=Callable)


class RangeListener(Protocol):
    """Receives every region boundary on the thread that crosses it (must be cheap and thread-safe)."""

    def range_push(self, name: str) -> None: ...

    def range_pop(self, name: str) -> None: ...


class _RegionState(threading.local):
    """Per-thread stack of open region names.

    Module-level by necessity: `current_ranges()` must answer from anywhere (a dispatch-mode hook deep in an
    aten call) without anything being passed down. Thread-local, so threads never see each other's regions.
    """

    def __init__(self) -> None:
        self.stack: list[str] = []


class _Listeners:
    """Process-wide listener set, copied on write so the hot path reads one tuple without a lock."""

    def __init__(self) -> None:
        self.current: tuple[RangeListener, ...] = ()
        self.lock = threading.Lock()


class _NvtxDomain:
    """The ``ltx2`` NVTX domain, resolved at the first region (never at import).

    The ``nvtx`` package decides once per process whether a tool is attached (``nvtx.get_domain`` is cached
    and returns a dummy without a tool), so the answer is cached here too and the hot path is one attribute
    read. Resolving lazily matters: NVTX injection must be configured before the first NVTX call.
    """

    def __init__(self) -> None:
        self.resolved = False
        self.domain = None  # an nvtx.Domain when a tool listens, else None

    def get(self):
        if not self.resolved:
            domain = nvtx.get_domain(DOMAIN)
            self.domain = domain if isinstance(domain, nvtx.Domain) else None
            self.resolved = True
        return self.domain


_STATE = _RegionState()
_LISTENERS = _Listeners()
_NVTX = _NvtxDomain()


def current_ranges() -> tuple[str, ...]:
    """This thread's open regions, outermost first (``()`` outside any region)."""
    return tuple(_STATE.stack)


def allowed_reason(ranges: tuple[str, ...]) -> str | None:
    """The reason of the innermost ``allow_host_sync`` region in `ranges`, or None if there is none."""
    for name in reversed(ranges):
        if name.startswith(ALLOW_PREFIX):
            return name[len(ALLOW_PREFIX):]
    return None


@contextmanager
def range_listener(listener: RangeListener) -> Iterator[RangeListener]:
    """Register `listener` for region boundaries on every thread while the block runs; removed in ``finally``."""
    with _LISTENERS.lock:
        _LISTENERS.current = (*_LISTENERS.current, listener)
    try:
        yield listener
    finally:
        with _LISTENERS.lock:
            _LISTENERS.current = tuple(x for x in _LISTENERS.current if x is not listener)


class _NameRecorder:
    def __init__(self) -> None:
        self.names: list[str] = []

    def range_push(self, name: str) -> None:
        self.names.append(name)

    def range_pop(self, name: str) -> None:
        pass


@contextmanager
def recorded_regions() -> Iterator[list[str]]:
    """The names of the regions opened while the block runs (any thread, in order): for tests and tools that
    check which regions code opens without an NVTX tool attached."""
    with range_listener(_NameRecorder()) as recorder:
        yield recorder.names


class region:
    """Mark a region: ``with region("step 3"): ...`` or ``@region("denoise")`` on a function.

    Pushes an NVTX range in domain ``ltx2`` (visible in Nsight Systems), records the name on this thread's
    region stack (:func:`current_ranges`) and notifies range listeners (the CUPTI profiler). Re-entrant and
    reusable: all state lives on the thread-local stack, not on the object.
    """

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"region(name): expected a non-empty str, got {name!r}")
        self.name = name

    def __enter__(self) -> region:
        name = self.name
        _STATE.stack.append(name)
        domain = _NVTX.domain if _NVTX.resolved else _NVTX.get()
        if domain is not None:  # a tool is attached
            domain.push_range(domain.get_event_attributes(message=name))
        for listener in _LISTENERS.current:
            listener.range_push(name)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        name = self.name
        for listener in _LISTENERS.current:
            listener.range_pop(name)
        domain = _NVTX.domain
        if domain is not None:
            domain.pop_range()
        stack = _STATE.stack
        if stack and stack[-1] == name:
            stack.pop()
        elif name in stack:  # closed out of order (e.g. a suspended generator): drop the newest match
            del stack[len(stack) - 1 - stack[::-1].index(name)]

    def __call__(self, fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with self:
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"region({self.name!r})"

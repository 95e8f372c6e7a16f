"""Host-sync detectors: prove that a block of PyTorch code never makes the host wait for the device.

Two independent detectors, because each misses something the other sees:

* :func:`detect_host_syncs` -- a dispatch-level detector (``TorchDispatchMode`` for aten ops plus a
  ``TorchFunctionMode`` for the Python calls that never reach the dispatcher, such as ``.tolist()`` and
  printing). It works on CPU tensors too, so CI without a GPU can check a whole loop. Rules live in
  :mod:`profiling.sync_rules`. Each finding names the op, the first user code line outside torch and
  this package, and the enclosing :func:`profiling.ranges.region` stack. It sees only the calling thread,
  and nothing inside compiled (inductor) code or CUDA graph replays (which cannot sync by construction). Its
  other blind spots (checked against the sync debug mode on an H200): syncs inside an op's own C++ code that
  dispatch nothing (``torch.histc`` with its default range reads min/max), ``torch.cuda.synchronize()`` and
  ``Event.synchronize()``, and on CPU anything that only syncs because of where its tensors live: a CPU tensor
  stands in for a device one, so ``torch.tensor(list, device=x.device)`` and ``t[mask] = t.mean()`` pass on CPU
  (they are flagged with tensors on a GPU). The stand-in also errs the other way: ``.item()`` of a tensor that
  really lives on the host is flagged, on a GPU machine too, and so are CPU-only internal reads such as
  ``F.one_hot``'s range check (the CUDA kernel checks on the device).
* :func:`cuda_sync_debug` -- PyTorch's own sync debug mode ("warn"/"error") on a GPU. It sees syncs inside
  C++ code but misses ``torch.cuda.synchronize()`` and pageable ``non_blocking`` copies; the CUPTI
  profiler (:mod:`profiling.cupti`) sees those.

Deliberate syncs (timing boundaries, a positive control) go inside :func:`allow_host_sync`, which opens a
region named ``"allow_host_sync: <reason>"`` so every detector and profiler can tell them apart. Those a warm loop
never makes (a CUDA graph capture: a cache miss) are declared ``one_time``: a detector records each such block
entered, seen sync or not, and the pytest plugin fails a checked block that entered one.
"""

from __future__ import annotations

import linecache
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from profiling import sync_rules
from profiling.ranges import ALLOW_PREFIX, allowed_reason, current_ranges, region
from profiling.report import findings_table

MODES = ("raise", "collect", "record")
# Frames skipped when naming the user's code line: torch, this package, context-manager plumbing.
_SKIP_DIRS = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(__file__) + os.sep, "<frozen ")


@dataclass(frozen=True)
class SyncFinding:
    """One host sync: the op, the user code line that caused it and the regions open at the time."""

    op: str
    location: str  # "path/to/file.py:42"
    ranges: tuple[str, ...]
    code: str = ""  # the source text of that line
    reason: str = ""
    detector: str = "dispatch"

    def __str__(self) -> str:
        where = " > ".join(self.ranges) or "(no region)"
        code = f" `{self.code}`" if self.code else ""
        return f"{self.op} at {self.location}{code} in {where}: {self.reason}"


@dataclass
class SyncReport:
    """What a detector saw. `allowed` holds syncs inside :func:`allow_host_sync` blocks (not failures); `one_time`
    the reasons of the one-time blocks entered (``allow_host_sync(..., one_time=True)``), whether or not a detector
    saw their sync (``torch.cuda.synchronize()`` only CUPTI sees)."""

    findings: list[SyncFinding] = field(default_factory=list)
    allowed: list[SyncFinding] = field(default_factory=list)
    one_time: list[str] = field(default_factory=list)

    def table(self) -> str:
        return findings_table(self.findings)


class HostSyncError(RuntimeError):
    """Code that must not synchronise the host did. The message lists every sync and how to fix it."""

    def __init__(self, findings: list[SyncFinding]) -> None:
        self.findings = list(findings)
        lines = [f"{len(self.findings)} host sync(s) where none is allowed:"]
        lines += [f"  {i}. {f}" for i, f in enumerate(self.findings, 1)]
        lines.append(
            "Fix: keep values on the device (torch.where, in-place ops, masks as multipliers), decide the "
            "schedule from Python floats, move the call out of the checked block, or wrap a deliberate sync "
            'in profiling.syncs.allow_host_sync("why").'
        )
        super().__init__("\n".join(lines))


def user_frame() -> tuple[str, str]:
    """``("file:line", source text)`` of the first frame outside torch, this package, contextlib and warnings (a
    finding made from a warning hook is called through ``warnings.warn``)."""
    frame = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not filename.startswith(_SKIP_DIRS) and os.path.basename(filename) not in ("contextlib.py", "warnings.py"):
            return f"{filename}:{frame.f_lineno}", linecache.getline(filename, frame.f_lineno).strip()
        frame = frame.f_back
    return "<unknown>", ""


class _OpenReports(threading.local):
    """The reports of this thread's open `detect_host_syncs` blocks, outermost first (`allow_host_sync` records a
    one-time block in each)."""

    def __init__(self) -> None:
        self.stack: list[SyncReport] = []


_OPEN_REPORTS = _OpenReports()


class _Detector:
    """State shared by the function-level and dispatch-level hooks of one :func:`detect_host_syncs` block."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.report = SyncReport()
        self.api: str | None = None  # the Python-level torch call being executed (for labels)
        self.exporting = 0  # >0 while inside a call already reported at the Python level

    def note(self, op: str, reason: str) -> None:
        ranges = current_ranges()
        location, code = user_frame()
        finding = SyncFinding(op=op, location=location, ranges=ranges, code=code, reason=reason)
        if allowed_reason(ranges) is not None:
            self.report.allowed.append(finding)
            return
        self.report.findings.append(finding)
        if self.mode == "raise":
            raise HostSyncError([finding])


def _safely(rule, func, args, kwargs) -> str | None:
    """Apply a rule; a rule that cannot read an unusual call form must never break the user's code."""
    try:
        return rule(func, args, kwargs)
    except Exception:
        return None


class _FunctionHook(TorchFunctionMode):
    """Sees Python-level torch calls: reports those the dispatcher cannot see, labels the rest."""

    def __init__(self, detector: _Detector) -> None:
        super().__init__()
        self.detector = detector

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        det = self.detector
        reason = _safely(sync_rules.function_reason, func, args, kwargs)
        outer, det.api = det.api, sync_rules.api_name(func)
        if reason is not None:
            det.note(det.api, reason)
            det.exporting += 1
        try:
            return func(*args, **kwargs)
        finally:
            det.api = outer
            if reason is not None:
                det.exporting -= 1


class _DispatchHook(TorchDispatchMode):
    """Sees every aten op that reaches the dispatcher on this thread (CPU or GPU tensors alike)."""

    def __init__(self, detector: _Detector) -> None:
        super().__init__()
        self.detector = detector

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        det = self.detector
        checked = det.exporting == 0 and isinstance(func, torch._ops.OpOverload)
        reported = False
        if checked:
            with torch._C.DisableTorchFunction():  # our own metadata reads must not re-enter the hooks
                reason = _safely(sync_rules.dispatch_reason, func, args, kwargs)
            if reason is not None:
                det.note(self._label(func), reason)
                reported = True
        out = func(*args, **kwargs)
        if checked and not reported and sync_rules.is_python_value(out) \
                and func.overloadpacket.__name__ not in sync_rules.METADATA_QUERIES \
                and sync_rules.has_tensor_arg(args, kwargs):
            det.note(self._label(func), "returned a Python value read from tensor data")
        return out

    def _label(self, func) -> str:
        api = self.detector.api
        return f"{func} via {api}" if api else str(func)


@contextmanager
def detect_host_syncs(*, mode: str = "raise") -> Iterator[SyncReport]:
    """Detect host syncs in the block on this thread; yields a :class:`SyncReport`.

    mode="raise": raise :class:`HostSyncError` at the first sync, before the op runs.
    mode="collect": run everything, raise :class:`HostSyncError` listing every sync at exit.
    mode="record": run everything, never raise; read the yielded report.
    An exception from the block itself always propagates unchanged.
    """
    if mode not in MODES:
        raise ValueError(f"detect_host_syncs(mode=...): got {mode!r}, expected one of {MODES}")
    import torch._dynamo  # noqa: F401  the modes' first op imports it (1-3 s): here, not inside the checked work

    detector = _Detector(mode)
    _OPEN_REPORTS.stack.append(detector.report)
    try:
        with _FunctionHook(detector), _DispatchHook(detector):
            yield detector.report
    finally:
        stack = _OPEN_REPORTS.stack  # by identity: two empty reports are equal dataclasses
        del stack[next(i for i, r in enumerate(stack) if r is detector.report)]
    if mode == "collect" and detector.report.findings:
        raise HostSyncError(detector.report.findings)


@contextmanager
def allow_host_sync(reason: str, *, one_time: bool = False) -> Iterator[None]:
    """Mark a deliberate sync: inside, detectors record it as allowed instead of failing.

    Opens the region ``"allow_host_sync: <reason>"`` (so the CUPTI and nsys reports classify it too) and,
    when this thread holds :func:`cuda_sync_debug`, relaxes the sync debug mode for the block.
    `one_time`: a sync that a warm loop never makes (a graph capture, a first-call setup). Open detectors
    record the block in `SyncReport.one_time`, so a check of a loop that should be warm can refuse it (like the
    dispatch detector, only blocks opened on this thread).
    """
    if not isinstance(reason, str) or not reason:
        raise ValueError(f"allow_host_sync(reason): expected a non-empty str saying why, got {reason!r}")
    if one_time:
        for report in _OPEN_REPORTS.stack:
            report.one_time.append(reason)
    with region(ALLOW_PREFIX + reason), _SYNC_DEBUG.relaxed():
        yield


class _SyncDebugOwner:
    """Who holds ``torch.cuda.set_sync_debug_mode`` -- a process-wide setting, hence one process-wide owner.

    One thread at a time may hold it (nested use on that thread is fine); a second thread asking for it
    gets a clear error rather than silently changing the first thread's setting.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.thread: int | None = None
        self.depth = 0

    def acquire(self) -> None:
        me = threading.get_ident()
        with self.lock:
            if self.thread not in (None, me):
                raise RuntimeError(
                    f"cuda_sync_debug is already active in thread {self.thread} (this is thread {me}); "
                    "torch.cuda.set_sync_debug_mode is process-wide, so two threads cannot hold it at once. "
                    "Enter cuda_sync_debug once around the work of all threads instead."
                )
            self.thread, self.depth = me, self.depth + 1

    def release(self) -> None:
        with self.lock:
            self.depth -= 1
            if self.depth == 0:
                self.thread = None

    @contextmanager
    def relaxed(self) -> Iterator[None]:
        """Turn sync debug mode off for a block, when (and only when) this thread holds it."""
        if self.thread != threading.get_ident():
            yield
            return
        with sync_debug_suspended():
            yield


@contextmanager
def sync_debug_suspended() -> Iterator[None]:
    """PyTorch's CUDA sync debug mode off for a deliberate sync, whoever set it; the previous mode restored in
    ``finally``. Prefer :func:`allow_host_sync`, which also marks the sync for the detectors and profilers."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


_SYNC_DEBUG = _SyncDebugOwner()
_DEBUG_MODES = {"default": 0, "warn": 1, "error": 2, 0: 0, 1: 1, 2: 2}


@contextmanager
def cuda_sync_debug(mode: str | int = "error") -> Iterator[bool]:
    """Set PyTorch's CUDA sync debug mode for the block and restore the previous mode in ``finally``.

    Yields True when a GPU is present and the mode was set, False (a no-op) on a machine without CUDA.
    The setting is process-wide: while active, syncs from *any* thread warn or raise. Only one thread may
    hold it at a time (nesting on the same thread is fine); see :class:`_SyncDebugOwner`.
    """
    if mode not in _DEBUG_MODES:
        raise ValueError(f"cuda_sync_debug(mode=...): got {mode!r}, expected 'default', 'warn' or 'error'")
    if not torch.cuda.is_available():
        yield False
        return
    _SYNC_DEBUG.acquire()
    previous = torch.cuda.get_sync_debug_mode()
    try:
        torch.cuda.set_sync_debug_mode(_DEBUG_MODES[mode])
        yield True
    finally:
        torch.cuda.set_sync_debug_mode(previous)
        _SYNC_DEBUG.release()


# What PyTorch's sync debug mode warns on each synchronizing call (c10/cuda/CUDAFunctions.cpp). Matching only this
# keeps out the one-time "Synchronization debug mode is a prototype feature" notice that torch emits the first time
# the mode is set in a process (counted as a sync, it made the first benchmark cell report one).
SYNC_DEBUG_WARNING = "called a synchronizing CUDA operation"
_SYNC_DEBUG_NOTICE = "Synchronization debug mode is a prototype feature"  # torch, once, when the mode is first set


@contextmanager
def sync_debug_warnings(on_sync: Callable[[str, str, int], None]) -> Iterator[bool]:
    """`cuda_sync_debug("warn")` for the block, each sync warning handed to `on_sync(message, filename, lineno)`
    as it is raised (so the stack still holds the user's line), every one of them (filter "always"). Every other
    warning goes on to the usual filters and display: a catch-all recorder would hide them (a graph-cache miss
    warned once inside a timed loop would never be seen). Torch's one-time notice that the mode is a prototype,
    raised when the mode is set, is dropped. Yields what `cuda_sync_debug` yields."""
    with ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())  # restores the filters and showwarning
        warnings.filterwarnings("ignore", message=f".*{_SYNC_DEBUG_NOTICE}")
        warnings.filterwarnings("always", message=f".*{SYNC_DEBUG_WARNING}")
        active = stack.enter_context(cuda_sync_debug("warn"))
        forward = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if SYNC_DEBUG_WARNING in str(message):
                on_sync(str(message), filename, lineno)
            else:
                forward(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield active

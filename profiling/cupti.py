"""In-process CUPTI activity profiler: which regions made the host wait for the GPU (needs a GPU).

Usage::

    from profiling.cupti import CuptiProfiler
    from profiling.ranges import region

    with CuptiProfiler() as prof:          # runs the positive control first
        with region("loop"):
            run_the_loop()
    report = prof.report()                 # raises BlindProfilerError if the control was not seen
    print(report.table()); print(report.syncs_table())
    report.to_json("profile.json"); prof.write_trace("trace.json")   # Perfetto / chrome://tracing

What is recorded (CUPTI activity kinds): RUNTIME (API calls; blocking ones are syncs), SYNCHRONIZATION
(stream/context/event syncs; stream-wait-event is GPU-side and ignored), MEMCPY (device->host copies;
pageable ones block the host), CONCURRENT_KERNEL (kernels, for counts and GPU busy %) and MARKER (NVTX,
only when NVTX injection points at CUPTI: ``NVTX_INJECTION64_PATH=<libcupti>`` set before the process's
first NVTX call, see :func:`find_libcupti`). Without injection the profiler timestamps region boundaries
itself with ``cupti.get_timestamp()`` (the clock of the activity records) through a range listener.

Needs the optional extra: ``pip install 'ltx2-graphs[cupti]'`` (cupti-python of the same CUDA major
version as torch). Only one CUPTI client per process: do not run torch.profiler or Nsight Systems at the
same time. Conversion from CUPTI records to :class:`~profiling.timeline.Timeline` is pure and
unit-tested with stand-in records; everything else here needs a GPU.
"""

from __future__ import annotations

import glob
import os
import site
import threading
from contextlib import ExitStack
from pathlib import Path

import torch

from profiling.attribution import analyse
from profiling.control import run_positive_control
from profiling.ranges import DOMAIN, range_listener
from profiling.report import ProfileReport
from profiling.syncs import allow_host_sync
from profiling.timeline import ApiRecord, KernelRecord, MemcpyRecord, RangeRecord, SyncRecord, Timeline
from profiling.trace import write_chrome_trace


def import_cupti():
    """The ``cupti`` module of cupti-python, imported on first use with an error that says the fix."""
    try:
        from cupti import cupti
    except ImportError as e:
        raise ImportError(
            "profiling.cupti needs cupti-python: pip install 'ltx2-graphs[cupti]' (its CUDA major version must "
            f"match torch's, CUDA {torch.version.cuda}); import failed with: {e}"
        ) from e
    return cupti


def find_libcupti() -> str | None:
    """Path of a libcupti shared library from the installed NVIDIA wheels, for ``NVTX_INJECTION64_PATH``."""
    roots = [*getattr(site, "getsitepackages", list)(), site.getusersitepackages()]
    for root in roots:
        hits = sorted(glob.glob(os.path.join(root, "nvidia", "**", "libcupti.so*"), recursive=True))
        if hits:
            return hits[0]
    return None


# -- pure conversion: CUPTI records -> Timeline records --------------------------------------------------------


class RecordConverter:
    """Turns CUPTI activity records into :mod:`profiling.timeline` records, copying every field.

    Records handed to the buffer-completed callback point into a buffer CUPTI frees afterwards, so they
    are converted inside the callback. `cupti` is the module (or a stand-in with the same enums in tests).
    """

    def __init__(self, cupti) -> None:
        self.cupti = cupti
        kind = cupti.ActivityKind
        self.kinds = {
            int(kind.RUNTIME): self._api, int(kind.SYNCHRONIZATION): self._sync, int(kind.MEMCPY): self._memcpy,
            int(kind.CONCURRENT_KERNEL): self._kernel, int(kind.KERNEL): self._kernel, int(kind.MARKER): self._marker,
        }
        sync = cupti.ActivitySynchronizationType
        self.sync_kinds = {int(sync.EVENT_SYNCHRONIZE): "event_synchronize",
                           int(sync.STREAM_WAIT_EVENT): "stream_wait_event",
                           int(sync.STREAM_SYNCHRONIZE): "stream_synchronize",
                           int(sync.CONTEXT_SYNCHRONIZE): "context_synchronize"}
        copy = cupti.ActivityMemcpyKind
        self.directions = {int(copy.HTOD): "HtoD", int(copy.DTOH): "DtoH", int(copy.DTOD): "DtoD",
                           int(copy.HTOH): "HtoH", int(copy.PTOP): "PtoP"}
        memory = cupti.ActivityMemoryKind
        self.memory = {int(memory.PAGEABLE): "pageable", int(memory.PINNED): "pinned", int(memory.DEVICE): "device",
                       int(memory.MANAGED): "managed"}
        flag = cupti.ActivityFlag
        self.marker_start = int(flag.MARKER_START)
        # cupti-python 13.0 drops MARKER_END from its enum (the C header defines it as the bit after START).
        self.marker_end = int(getattr(flag, "MARKER_END", self.marker_start << 1))
        self.thread_object = int(cupti.ActivityObjectKind.THREAD)
        self._api_names: dict[int, str] = {}
        self.markers: list[tuple[int, int, str, str, int, bool]] = []  # (ts, id, name, domain, thread, start?)

    def convert(self, record):
        """A timeline record, or None for kinds this profiler does not use (markers are kept aside)."""
        handler = self.kinds.get(int(record.kind))
        return handler(record) if handler else None

    def api_name(self, cbid: int) -> str:
        if cbid not in self._api_names:
            self._api_names[cbid] = str(self.cupti.get_callback_name(self.cupti.CallbackDomain.RUNTIME_API, cbid))
        return self._api_names[cbid]

    def _api(self, r) -> ApiRecord:
        return ApiRecord(self.api_name(r.cbid), r.start, r.end, r.thread_id, r.correlation_id)

    def _sync(self, r) -> SyncRecord:
        return SyncRecord(self.sync_kinds.get(int(r.type), "unknown"), r.start, r.end, r.correlation_id, r.stream_id)

    def _memcpy(self, r) -> MemcpyRecord:
        return MemcpyRecord(self.directions.get(int(r.copy_kind), "other"), self.memory.get(int(r.src_kind), "other"),
                            self.memory.get(int(r.dst_kind), "other"), r.bytes, r.start, r.end, r.correlation_id,
                            r.stream_id)

    def _kernel(self, r) -> KernelRecord:
        return KernelRecord(str(r.name), r.start, r.end, r.correlation_id, r.stream_id)

    def _marker(self, r) -> None:
        flags = int(r.flags_)
        if not flags & (self.marker_start | self.marker_end):
            return None  # instantaneous marks are not regions
        thread = r.object_id.pt.thread_id if int(r.object_kind) == self.thread_object else 0
        self.markers.append((r.timestamp, r.id, str(r.name or ""), str(r.domain or ""), thread,
                             bool(flags & self.marker_start)))
        return None


def ranges_from_markers(markers, domain: str = DOMAIN) -> list[RangeRecord]:
    """Pair CUPTI MARKER start/end records (by id) into regions of `domain` (the name is on the start)."""
    opened: dict[int, tuple[str, int, int]] = {}
    out: list[RangeRecord] = []
    for ts, marker_id, name, marker_domain, thread, is_start in sorted(markers):
        if is_start:
            if marker_domain == domain:
                opened[marker_id] = (name, ts, thread)
        elif marker_id in opened:
            name, start, thread = opened.pop(marker_id)
            out.append(RangeRecord(name, start, ts, thread))
    return out


def ranges_from_boundaries(boundaries, end_time: int) -> list[RangeRecord]:
    """Pair ``(timestamp, +1/-1, name, thread)`` push/pop events into regions; regions still open end at
    `end_time` (the profiler may stop inside a region)."""
    stacks: dict[int, list[tuple[str, int]]] = {}
    out: list[RangeRecord] = []
    for ts, step, name, thread in boundaries:  # appended in order on each thread
        stack = stacks.setdefault(thread, [])
        if step > 0:
            stack.append((name, ts))
            continue
        # The newest open region of that name: regions may close out of order (`profiling.ranges.region`).
        match = next((i for i in range(len(stack) - 1, -1, -1) if stack[i][0] == name), None)
        if match is not None:
            opened_name, start = stack.pop(match)
            out.append(RangeRecord(opened_name, start, ts, thread))
    for thread, stack in stacks.items():
        out += [RangeRecord(name, start, end_time, thread) for name, start in stack]
    return out


class _RangeClock:
    """Range listener that timestamps region boundaries on CUPTI's clock."""

    def __init__(self, timestamp, thread_id) -> None:
        self.timestamp, self.thread_id = timestamp, thread_id
        self.boundaries: list[tuple[int, int, str, int]] = []

    def range_push(self, name: str) -> None:
        self.boundaries.append((self.timestamp(), 1, name, self.thread_id()))

    def range_pop(self, name: str) -> None:
        self.boundaries.append((self.timestamp(), -1, name, self.thread_id()))


# -- the profiler ---------------------------------------------------------------------------------------------


class CuptiProfiler:
    """Context manager recording CUPTI activity for the block; see the module docstring.

    `ranges`: "auto" uses NVTX MARKER records of domain ``ltx2`` when NVTX injection delivered any, else
    the profiler's own timestamps; "markers" / "listener" force one source. `control`: run the positive
    control at the start (turning it off makes :meth:`report` refuse to certify zero syncs).

    `buffer_bytes`: size of each activity buffer CUPTI fills. Records are converted (in Python, holding the GIL)
    when CUPTI hands a full buffer back, which can happen in the middle of the profiled block and stall the
    thread that launches the work; the default (128 MiB, a few hundred thousand kernel records) delivers a whole
    graph-replayed denoising loop at the final flush, after the block. The first buffer is taken (and set up by
    CUPTI) on entry, with one tiny kernel, so a short block does not pay for it either.
    """

    KINDS = ("RUNTIME", "SYNCHRONIZATION", "MEMCPY", "CONCURRENT_KERNEL", "MARKER")

    def __init__(self, *, control: bool = True, ranges: str = "auto", buffer_bytes: int = 128 << 20) -> None:
        if ranges not in ("auto", "markers", "listener"):
            raise ValueError(f"CuptiProfiler(ranges=...): got {ranges!r}, expected 'auto', 'markers' or 'listener'")
        self.control, self.ranges_source, self.buffer_bytes = control, ranges, buffer_bytes
        self.timeline: Timeline | None = None
        self._records: list = []
        self._errors: list[BaseException] = []
        self._stack: ExitStack | None = None

    def _completed(self, activities) -> None:
        try:
            for activity in activities:
                record = self._converter.convert(activity)
                if record is not None:
                    self._records.append(record)
        except BaseException as e:  # CUPTI calls us from its own thread: keep the error for __exit__
            self._errors.append(e)

    def __enter__(self) -> CuptiProfiler:
        if not torch.cuda.is_available():
            raise RuntimeError("CuptiProfiler needs a CUDA GPU (torch.cuda.is_available() is False); on CPU use "
                               "profiling.syncs.detect_host_syncs instead")
        if self._stack is not None:
            raise RuntimeError("CuptiProfiler is already recording; one block at a time (one CUPTI client per process)")
        cupti = import_cupti()
        self._cupti, self._converter = cupti, RecordConverter(cupti)
        self.timeline, self._records, self._errors = None, [], []
        torch.cuda.synchronize()  # earlier work must not leak into this profile (not yet recording)
        stack = ExitStack()
        try:
            cupti.activity_register_callbacks(lambda: (self.buffer_bytes, 0), self._completed)
            thread_id = self._use_system_thread_ids(stack)
            for name in self.KINDS:
                kind = getattr(cupti.ActivityKind, name)
                try:
                    cupti.activity_enable(kind)
                except Exception as e:
                    if name != "MARKER":  # markers are optional (only with NVTX injection)
                        raise RuntimeError(f"CUPTI refused activity kind {name}: {e}. Is another profiler "
                                           "(torch.profiler, nsys) attached to this process?") from e
                    continue
                stack.callback(cupti.activity_disable, kind)
            self._clock = _RangeClock(cupti.get_timestamp, thread_id)
            stack.enter_context(range_listener(self._clock))
            torch.ones(1, device="cuda").add_(1)  # CUPTI takes its first buffer now, not inside the block
            if self.control:
                run_positive_control()
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def _use_system_thread_ids(self, stack: ExitStack):
        """Ask CUPTI for OS thread ids (gettid) so API records match the listener's thread ids."""
        cupti = self._cupti
        try:
            previous = cupti.get_thread_id_type()
            cupti.set_thread_id_type(cupti.ActivityThreadIdType.SYSTEM)
            stack.callback(cupti.set_thread_id_type, previous)
            return threading.get_native_id
        except Exception:  # default ids are pthread_self() truncated to 32 bits
            return lambda: threading.get_ident() & 0xFFFFFFFF

    def __exit__(self, exc_type, exc, tb) -> None:
        stack, self._stack = self._stack, None
        try:
            with allow_host_sync("profiler flush"):
                torch.cuda.synchronize()  # kernel records complete only when the kernels do
            end_time = self._cupti.get_timestamp()
            self._cupti.activity_flush_all(1)
        finally:
            stack.close()
        if self._errors:
            raise RuntimeError(f"converting CUPTI records failed: {self._errors[0]!r}") from self._errors[0]
        self.timeline = self._build_timeline(end_time)

    def _build_timeline(self, end_time: int) -> Timeline:
        markers = ranges_from_markers(self._converter.markers)
        listener = ranges_from_boundaries(self._clock.boundaries, end_time)
        use_markers = self.ranges_source == "markers" or (self.ranges_source == "auto" and markers)
        by_type: dict[type, list] = {t: [] for t in (ApiRecord, SyncRecord, MemcpyRecord, KernelRecord)}
        for record in self._records:
            by_type[type(record)].append(record)
        return Timeline(ranges=markers if use_markers else listener, api_calls=by_type[ApiRecord],
                        syncs=by_type[SyncRecord], memcpys=by_type[MemcpyRecord], kernels=by_type[KernelRecord],
                        source="cupti")

    def _timeline(self) -> Timeline:
        if self.timeline is None:
            raise RuntimeError("CuptiProfiler: no timeline yet; read results after the `with` block has ended")
        return self.timeline

    def report(self, *, require_control: bool = True) -> ProfileReport:
        """Per-region report; raises BlindProfilerError when the positive control was not seen."""
        return analyse(self._timeline(), require_control=require_control)

    def write_trace(self, path: str | Path) -> Path:
        """Chrome trace / Perfetto JSON of regions, kernels, copies and syncs."""
        return write_chrome_trace(self._timeline(), path)

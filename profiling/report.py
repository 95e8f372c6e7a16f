"""The per-range report shared by the CUPTI profiler and the nsys analyser: model, table and JSON.

A report answers one question per region ("loop", "step 3", "pass cond", ...): did the host wait for the
device in there, and was the GPU kept busy? Columns:

* ``syncs``      -- unexpected host syncs (CUPTI synchronisation records other than stream-wait-event,
                    blocking API calls, pageable device->host copies) inside the region, nested regions
                    included; ``allowed`` counts the deliberate ones (positive control, ``allow_host_sync``);
* ``D2H``        -- device->host copies whose API call was made inside the region;
* ``kernels``    -- kernels *launched* inside the region (a graph replay counts every kernel node);
* ``GPU busy %`` -- time some kernel was executing during the region's wall time / that wall time;
* ``enqueue ms`` -- host time spent in non-blocking CUDA API calls (launches, async copies, events);
* ``blocking ms``-- host time spent in blocking CUDA API calls.

Every report carries the outcome of the positive control (a deliberate ``.item()`` in the region
``CONTROL_RANGE``): "seen", "missing" (the control ran but produced no sync record: the profiler is blind)
or "absent" (no control in this capture). A report whose control was not seen never claims "0 syncs".
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

from tabulate import tabulate

from profiling.ranges import CONTROL_RANGE, allowed_reason

OUTSIDE = "(outside regions)"


class BlindProfilerError(RuntimeError):
    """The positive control's sync was not seen, so a count of zero syncs would prove nothing."""


@dataclass(frozen=True)
class RangeStats:
    """Totals for every instance of one region name (nested regions included)."""

    name: str
    instances: int = 0
    wall_ns: int = 0
    syncs: int = 0
    allowed_syncs: int = 0
    d2h_copies: int = 0
    d2h_bytes: int = 0
    kernels: int = 0
    kernel_ns: int = 0
    busy_ns: int = 0
    enqueue_ns: int = 0
    blocking_ns: int = 0

    @property
    def gpu_busy_pct(self) -> float:
        return 100.0 * self.busy_ns / self.wall_ns if self.wall_ns else 0.0

    def merged(self, other: RangeStats, name: str) -> RangeStats:
        sums = {f.name: getattr(self, f.name) + getattr(other, f.name)
                for f in dataclasses.fields(self) if f.name != "name"}
        return RangeStats(name=name, **sums)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "gpu_busy_pct": round(self.gpu_busy_pct, 2)}


@dataclass(frozen=True)
class HostSync:
    """One moment the host waited for the device, and the regions open on that thread at the time."""

    kind: str  # stream_synchronize | context_synchronize | event_synchronize | blocking call | pageable D2H copy
    api: str  # the CUDA API call behind it, without version suffix ("" when unknown)
    start_ns: int
    duration_ns: int
    thread: int | None
    ranges: tuple[str, ...]  # outermost first
    correlation: int | None = None  # of the API call behind it

    @property
    def allowed(self) -> bool:
        return allowed_reason(self.ranges) is not None

    @property
    def control(self) -> bool:
        return CONTROL_RANGE in self.ranges

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "allowed": self.allowed, "control": self.control}


@dataclass(frozen=True)
class ProfileReport:
    """Per-range statistics plus every host sync, from one profiled run."""

    source: str  # "cupti" | "nsys" | "synthetic"
    ranges: tuple[RangeStats, ...]
    syncs: tuple[HostSync, ...]
    control: str  # "seen" | "missing" | "absent"
    wall_ns: int = 0

    @property
    def unexpected_syncs(self) -> tuple[HostSync, ...]:
        """Syncs that are neither the positive control nor inside an ``allow_host_sync`` block."""
        return tuple(s for s in self.syncs if not s.control and not s.allowed)

    def check_control(self) -> None:
        """Raise :class:`BlindProfilerError` unless the positive control's sync was recorded."""
        if self.control == "seen":
            return
        why = {
            "missing": f"the positive control ran in region {CONTROL_RANGE!r} but no sync was recorded there: "
                       "the profiler is not seeing synchronisation (another CUPTI client such as torch.profiler "
                       "or nsys active, or SYNCHRONIZATION/RUNTIME activity disabled)",
            "absent": f"this capture has no positive control (no region {CONTROL_RANGE!r}); run "
                      "profiling.control.run_positive_control() inside the captured range",
        }[self.control]
        raise BlindProfilerError(f"refusing to report host syncs: {why}. A count of zero would prove nothing.")

    def summary(self) -> str:
        if self.control != "seen":
            return f"host syncs: UNVERIFIED (positive control {self.control}); {len(self.unexpected_syncs)} recorded"
        control = sum(s.control for s in self.syncs)
        allowed = sum(s.allowed and not s.control for s in self.syncs)
        return (f"{len(self.unexpected_syncs)} unexpected host sync(s); positive control seen ({control} sync), "
                f"{allowed} allowed")

    def rows(self, *, group_numbers: bool = False) -> list[RangeStats]:
        """Range rows in first-seen order; `group_numbers` folds "step 3" and "step 4" into "step #"."""
        if not group_numbers:
            return list(self.ranges)
        grouped: dict[str, RangeStats] = {}
        for stats in self.ranges:
            key = re.sub(r"\d+", "#", stats.name)
            grouped[key] = grouped[key].merged(stats, key) if key in grouped else dataclasses.replace(stats, name=key)
        return list(grouped.values())

    def table(self, *, group_numbers: bool = True) -> str:
        headers = ["range", "n", "wall ms", "syncs", "allowed", "D2H", "kernels", "GPU busy %", "enqueue ms",
                   "blocking ms"]
        body = [
            [r.name, r.instances, r.wall_ns / 1e6, r.syncs, r.allowed_syncs, r.d2h_copies, r.kernels, r.gpu_busy_pct,
             r.enqueue_ns / 1e6, r.blocking_ns / 1e6]
            for r in self.rows(group_numbers=group_numbers)
        ]
        formats = ("", "", ".3f", "", "", "", "", ".1f", ".3f", ".3f")
        text = tabulate(body, headers=headers, floatfmt=formats, tablefmt="simple")
        return f"{text}\n{self.summary()}"

    def syncs_table(self) -> str:
        body = [
            [i, s.kind, s.api, " > ".join(s.ranges) or OUTSIDE, s.duration_ns / 1e3,
             "control" if s.control else ("allowed" if s.allowed else "UNEXPECTED")]
            for i, s in enumerate(self.syncs, 1)
        ]
        return tabulate(body, headers=["#", "kind", "api", "regions", "us", "verdict"], floatfmt=".1f")

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "control": self.control,
            "wall_ns": self.wall_ns,
            "unexpected_syncs": len(self.unexpected_syncs),
            "ranges": [r.to_dict() for r in self.ranges],
            "syncs": [s.to_dict() for s in self.syncs],
        }

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text)
        return text


def findings_table(findings) -> str:
    """The dispatch detector's findings (``SyncFinding`` objects) as a table."""
    body = [[i, f.op, f.location, f.code, " > ".join(f.ranges) or OUTSIDE, f.reason]
            for i, f in enumerate(findings, 1)]
    return tabulate(body, headers=["#", "op", "location", "code", "regions", "why it syncs"])

"""The positive control: one deliberate host sync that every profiler report must see.

A profiler that reports "0 syncs" proves something only if it would have reported a sync that did happen.
Every CUPTI report runs this control first, and a run profiled under Nsight Systems should call it inside
the captured range, so the analyser can check it (:meth:`profiling.report.ProfileReport.check_control`).
"""

from __future__ import annotations

import torch

from profiling.ranges import CONTROL_RANGE, region
from profiling.syncs import allow_host_sync


def run_positive_control(device: str | torch.device | None = None) -> float:
    """Do one ``.item()`` on a device tensor inside region ``CONTROL_RANGE`` (an allowed, deliberate sync).

    The tensor is made outside the region so the region holds exactly one copy and one stream sync.
    """
    device = torch.device(device if device is not None else "cuda")
    value = torch.ones((), device=device)
    with region(CONTROL_RANGE), allow_host_sync("positive control"):
        return value.item()

"""Host-sync counting as the runner and the benchmark use it: the dispatch detector on CPU, and the counting of
CUDA sync-debug warnings (the GPU detector), simulated here by raising the warning PyTorch raises."""

from __future__ import annotations

import warnings

import pytest
import torch

from graphs.run_syncs import count_host_syncs


def test_dispatch_detector_counts_a_sync_on_cpu():
    x = torch.ones(3)
    with count_host_syncs(torch.device("cpu")) as result:
        x.sum().item()
        x.nonzero()
    assert result.detector == "dispatch" and result.count == 2 and len(result.findings) == 2


def test_disabled_check_reports_nothing():
    with count_host_syncs(torch.device("cpu"), enabled=False) as result:
        torch.ones(1).item()
    assert result.count is None and result.describe() == "not checked"


def test_sync_debug_warnings_are_counted_and_other_warnings_still_shown():
    with pytest.warns(UserWarning) as shown:
        with count_host_syncs(torch.device("cuda")) as result:  # on a CPU machine cuda_sync_debug is a no-op
            warnings.warn("called a synchronizing CUDA operation", UserWarning)
            warnings.warn("called a synchronizing CUDA operation", UserWarning)  # each one counts
            warnings.warn("something unrelated", UserWarning)
            # torch's one-time notice when the mode is first set in a process: not a sync (it once made the first
            # benchmark cell of every run report 1 host sync)
            warnings.warn("Synchronization debug mode is a prototype feature and does not yet detect all "
                          "synchronizing operations", UserWarning)
    assert result.detector == "cuda-sync-debug" and result.count == 2
    assert "synchronizing" in result.findings[0]
    # The rest reach the caller (a graph-cache miss warned inside a timed loop must not vanish); torch's
    # prototype notice is dropped.
    assert [str(w.message) for w in shown] == ["something unrelated"]


def test_every_sync_warning_from_one_line_counts():
    """Python shows a warning once per code location by default: five syncs on one line of a loop are five, even
    outside `pytest.warns` (which turns every filter to "always" itself)."""
    with warnings.catch_warnings():
        warnings.simplefilter("default")  # Python's own filter: once per location
        with count_host_syncs(torch.device("cuda")) as result:
            for _ in range(5):
                warnings.warn("called a synchronizing CUDA operation", UserWarning)
    assert result.count == 5

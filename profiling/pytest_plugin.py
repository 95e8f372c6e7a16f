"""pytest plugin (entry point ``pytest11: ltx2_graphs``): assert "no host sync here" in tests.

* Fixture ``no_host_sync``: its value is a context manager. ``with no_host_sync: ...`` runs the block
  under the detectors and, after the block, fails the test listing every sync seen (op, code line,
  regions). Reusable several times in one test; ``no_host_sync.findings`` holds the last block's syncs.
* Marker ``@pytest.mark.no_host_sync``: the same check around the whole test body (fixtures excluded, except
  those the body requests itself with ``request.getfixturevalue``). A test failing for its own reason keeps its
  error; the syncs seen before it are added to it as a note.
  Assertions that read tensor values are syncs too: make them after a ``with no_host_sync:`` block, or
  inside ``profiling.syncs.allow_host_sync("check")``.
* One-time syncs (``allow_host_sync(..., one_time=True)``: a CUDA graph capture, i.e. a cache miss) fail the check
  too: a loop checked for syncs should be warm. ``with no_host_sync.allowing_one_time(): ...`` or
  ``@pytest.mark.no_host_sync(allow_one_time=True)`` accepts them.

Detectors: on CPU, the dispatch detector (:func:`profiling.syncs.detect_host_syncs`). On a GPU also
PyTorch's sync debug mode (set to "warn"; its warnings become findings, duplicates of dispatch findings at
the same code line are dropped) and, with ``--ltx2-sync-cupti``, the CUPTI profiler (needs the ``cupti``
extra; sees ``torch.cuda.synchronize()`` and pageable copies, which the others miss).
"""

from __future__ import annotations

from collections import Counter
from contextlib import ExitStack

import pytest

MARKER = "no_host_sync"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ltx2_graphs", "ltx2-graphs host-sync checks")
    group.addoption(
        "--ltx2-sync-cupti", action="store_true", default=False,
        help="in no_host_sync checks on a GPU, also run the CUPTI profiler (needs ltx2-graphs[cupti]; "
             "not together with torch.profiler or nsys)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(allow_one_time=False): fail the test if its body synchronises the host with the device "
        "(dispatch detector; on a GPU also CUDA sync debug mode, and CUPTI with --ltx2-sync-cupti), or enters a "
        "one-time sync such as a graph capture unless allow_one_time",
    )


class _SyncDebugWarnings:
    """CUDA sync debug mode in "warn", with each warning turned into a finding at the user's code line."""

    def __init__(self) -> None:
        self.findings: list = []

    def __enter__(self) -> _SyncDebugWarnings:
        from profiling.syncs import sync_debug_warnings

        self._stack = ExitStack()
        self._stack.enter_context(sync_debug_warnings(lambda *warning: self.findings.append(self._finding())))
        return self

    @staticmethod
    def _finding():
        from profiling.ranges import current_ranges
        from profiling.syncs import SyncFinding, user_frame

        # Called synchronously from the warning: the stack still holds the user's line (the warning's own
        # filename may point into the dispatch detector that executed the op).
        location, code = user_frame()
        return SyncFinding(op="CUDA synchronizing operation", location=location, ranges=current_ranges(),
                           code=code, reason="reported by torch.cuda sync debug mode", detector="sync-debug")

    def __exit__(self, *exc) -> None:
        self._stack.close()


class HostSyncGuard:
    """The ``no_host_sync`` fixture's value: ``with guard:`` fails the test after a block that synced, or that
    entered a one-time sync block unless `allow_one_time`."""

    def __init__(self, *, use_cupti: bool = False, allow_one_time: bool = False) -> None:
        self.use_cupti = use_cupti
        self.allow_one_time = allow_one_time
        self.findings: list = []
        self._stack: ExitStack | None = None

    def allowing_one_time(self) -> HostSyncGuard:
        """A guard like this one that accepts one-time syncs (graph captures) in its block."""
        return HostSyncGuard(use_cupti=self.use_cupti, allow_one_time=True)

    def __enter__(self) -> HostSyncGuard:
        import torch

        from profiling.syncs import detect_host_syncs

        if self._stack is not None:
            raise RuntimeError("no_host_sync blocks cannot be nested; close the first block before opening another")
        stack = ExitStack()
        try:
            self._debug = self._profiler = None
            if torch.cuda.is_available():
                if self.use_cupti:
                    from profiling.cupti import CuptiProfiler

                    self._profiler = stack.enter_context(CuptiProfiler())
                self._debug = stack.enter_context(_SyncDebugWarnings())
            self._report = stack.enter_context(detect_host_syncs(mode="record"))
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        stack, self._stack = self._stack, None
        stack.close()
        try:
            self.findings = self._collect()
        except Exception:
            if exc_type is None:
                raise
            self.findings = []  # the block's own error is the one to report
        if self.findings:
            from profiling.syncs import HostSyncError

            message = f"no_host_sync: {HostSyncError(self.findings)}"
            if exc_type is None:
                pytest.fail(message, pytrace=False)
            if exc is not None:  # the block's own error propagates, and says what the check saw before it
                exc.add_note(message)
        return False

    def _collect(self) -> list:
        from profiling.ranges import ALLOW_PREFIX
        from profiling.syncs import SyncFinding

        findings = list(self._report.findings)
        if self._debug is not None:
            seen = Counter(f.location for f in findings)  # one .item() is found by both: keep one
            for finding in self._debug.findings:
                if seen[finding.location] > 0:
                    seen[finding.location] -= 1
                else:
                    findings.append(finding)
        if self._profiler is not None:
            report = self._profiler.report(require_control=True)  # BlindProfilerError if CUPTI saw nothing
            known = Counter(f.ranges for f in findings)  # CUPTI re-sees syncs already found above: match by regions
            for sync in report.unexpected_syncs:
                if known[sync.ranges] > 0:
                    known[sync.ranges] -= 1
                    continue
                findings.append(SyncFinding(op=f"CUPTI {sync.kind} {sync.api}".rstrip(), location="(CUDA API call)",
                                            ranges=sync.ranges, reason="recorded by the CUPTI profiler",
                                            detector="cupti"))
        if not self.allow_one_time:
            findings += [SyncFinding(op="one-time sync", location="(allow_host_sync block)",
                                     ranges=(ALLOW_PREFIX + reason,), detector="one-time",
                                     reason=f"{reason!r} entered inside the checked block: a warm loop makes none "
                                            "(warm up first, or use no_host_sync.allowing_one_time())")
                         for reason in self._report.one_time]
        return findings


@pytest.fixture
def no_host_sync(request: pytest.FixtureRequest) -> HostSyncGuard:
    """Context manager: ``with no_host_sync: ...`` fails the test if the block synchronised the host."""
    return HostSyncGuard(use_cupti=request.config.getoption("ltx2_sync_cupti"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    marker = item.get_closest_marker(MARKER)
    if marker is None:
        return (yield)
    allow_one_time = marker.kwargs.get("allow_one_time", False)
    if marker.args or set(marker.kwargs) - {"allow_one_time"} or not isinstance(allow_one_time, bool):  # "no" is true
        raise pytest.UsageError(f"@pytest.mark.{MARKER} takes only allow_one_time=<bool>, got args {marker.args} "
                                f"and kwargs {marker.kwargs} ({item.nodeid})")
    with HostSyncGuard(use_cupti=item.config.getoption("ltx2_sync_cupti"), allow_one_time=allow_one_time):
        return (yield)

"""The pytest plugin, run through pytester: fixture, marker, option group, failure listing."""

from __future__ import annotations

import pytest
import torch

from profiling.syncs import detect_host_syncs

pytest_plugins = ["pytester"]


@pytest.fixture(autouse=True, scope="module")
def _warm_detector():
    """Use the detector once in this process before any in-process pytester run.

    Its first use imports torch._dynamo (and ~800 modules); pytester unloads modules first imported inside
    a run, and torch's operator libraries refuse to be registered a second time on re-import.
    """
    with detect_host_syncs(mode="record"):
        torch.randn(2).sum()

HEADER = """
import pytest
import torch
from profiling.ranges import region
from profiling.syncs import allow_host_sync
"""


def _run(pytester, body: str, *args: str):
    pytester.makepyfile(test_body=HEADER + body)
    return pytester.runpytest("-p", "no:cacheprovider", *args)


def test_fixture(pytester):
    result = _run(pytester, """
def test_two_syncs(no_host_sync):
    t = torch.randn(4)
    with no_host_sync:
        with region("loop"), region("step 2"):
            value = t.sum().item()
            rows = t.tolist()
    raise AssertionError("never reached: the block's exit fails the test")

def test_clean(no_host_sync):
    t = torch.randn(4)
    with no_host_sync:
        u = torch.where(t > 0, t, 0.0).mul_(2.0)
        with allow_host_sync("check the result inside the block"):
            assert u.min().item() >= 0.0
    assert no_host_sync.findings == []
    with no_host_sync:  # reusable
        u.add_(1.0)
    assert float(u.min()) >= 1.0  # after the block: free to sync

def test_error_is_not_hidden(no_host_sync):
    with no_host_sync:
        torch.tensor(1.0).item()
        raise KeyError("the real problem")
""")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines([
        "*no_host_sync: 2 host sync(s) where none is allowed:*",
        "*aten._local_scalar_dense.default via Tensor.item at *test_body.py:*`value = t.sum().item()`"
        " in loop > step 2*",
        "*Tensor.tolist at *test_body.py:*`rows = t.tolist()` in loop > step 2*",
        "*KeyError: 'the real problem'*",
    ])
    result.stdout.no_fnmatch_line("*never reached*")
    # The KeyError test reports the KeyError, with the sync seen before it as a note.
    result.stdout.fnmatch_lines(["*KeyError: 'the real problem'*", "*no_host_sync: 1 host sync(s)*"])


def test_marker_checks_the_whole_test_body(pytester):
    result = _run(pytester, """
@pytest.fixture
def data():
    t = torch.randn(4)
    assert t.abs().sum().item() >= 0  # fixtures are outside the check
    return t

@pytest.mark.no_host_sync
def test_marked_dirty(data):
    if data.sum() > 100:
        pass

@pytest.mark.no_host_sync
def test_marked_clean(data):
    data.mul_(0.5).clamp_(-1.0, 1.0)

def test_unmarked_is_unchecked(data):
    assert data.sum().item() == data.sum().item()
""", "--strict-markers")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*test_marked_dirty*", "*Tensor.__bool__*`if data.sum() > 100:`*"])


def test_options_and_markers_are_registered(pytester):
    help_result = pytester.runpytest("--help")
    help_result.stdout.fnmatch_lines(["*ltx2-graphs host-sync checks*", "*--ltx2-sync-cupti*"])
    markers = pytester.runpytest("--markers")
    markers.stdout.fnmatch_lines(["*@pytest.mark.no_host_sync(allow_one_time=False):*"])


def test_one_time_sync_fails_unless_allowed(pytester):
    """A one-time sync block (what a graph capture declares) fails a checked block, even where no detector sees
    a sync inside it (torch.cuda.synchronize is seen only by CUPTI); allowing one-time syncs accepts it."""
    result = _run(pytester, """
def capture_like():
    with allow_host_sync("capture cond", one_time=True):
        pass

def test_fixture_refuses(no_host_sync):
    with no_host_sync:
        capture_like()

def test_fixture_allows(no_host_sync):
    with no_host_sync.allowing_one_time():
        capture_like()

@pytest.mark.no_host_sync
def test_marker_refuses():
    capture_like()

@pytest.mark.no_host_sync(allow_one_time=True)
def test_marker_allows():
    capture_like()

def test_plain_allowed_sync_passes(no_host_sync):
    with no_host_sync:
        with allow_host_sync("timing"):
            torch.ones(2).sum().item()
""")
    result.assert_outcomes(passed=3, failed=2)
    result.stdout.fnmatch_lines(["*one-time sync*'capture cond' entered inside the checked block*"])


def test_marker_and_fixture_nest_and_a_misspelt_marker_argument_is_refused(pytester):
    result = _run(pytester, """
@pytest.mark.no_host_sync
def test_nested_then_sync(no_host_sync):
    with no_host_sync:
        pass
    torch.ones(2).sum().item()

@pytest.mark.no_host_sync(allow_onetime=True)
def test_misspelt():
    pass

@pytest.mark.no_host_sync(allow_one_time="no")
def test_not_a_bool():
    pass
""")
    result.assert_outcomes(failed=3)
    result.stdout.fnmatch_lines(["*no_host_sync: 1 host sync(s) where none is allowed*",
                                 "*takes only allow_one_time=<bool>*allow_onetime*",
                                 "*takes only allow_one_time=<bool>*'allow_one_time': 'no'*"])
    result.stdout.no_fnmatch_line("*x not in list*")


def test_guard_keeps_its_cupti_option_refuses_reentry_and_reports_a_sync_seen_twice_once():
    """What a GPU run relies on, checked on CPU: `allowing_one_time()` keeps CUPTI on; a guard cannot be entered
    again while open; a sync that both the dispatch detector and torch's sync-debug mode saw is one finding."""
    from types import SimpleNamespace

    from profiling.pytest_plugin import HostSyncGuard

    assert HostSyncGuard(use_cupti=True).allowing_one_time().use_cupti
    guard = HostSyncGuard(allow_one_time=True)
    with guard, pytest.raises(RuntimeError, match="cannot be nested"):
        guard.__enter__()
    one = SimpleNamespace(location="test.py:3")
    guard._report = SimpleNamespace(findings=[one], one_time=[])
    guard._debug = SimpleNamespace(findings=[SimpleNamespace(location="test.py:3"),  # the same sync, seen again
                                             SimpleNamespace(location="test.py:9")])  # seen by sync-debug only
    guard._profiler = None
    assert [f.location for f in guard._collect()] == ["test.py:3", "test.py:9"]


def test_the_guard_demands_the_cupti_control_and_merges_syncs_seen_twice_once():
    """On CPU with a stand-in profiler: the guard must ask for the positive control (a blind profiler is an
    error, not "0 syncs"), and a sync both detectors saw counts once while a CUPTI-only one is kept."""
    from types import SimpleNamespace

    from profiling.pytest_plugin import HostSyncGuard
    from profiling.report import BlindProfilerError

    asked = []

    def report(require_control):
        asked.append(require_control)
        if require_control:
            raise BlindProfilerError("control missing")
        return SimpleNamespace(unexpected_syncs=())

    guard = HostSyncGuard(use_cupti=True, allow_one_time=True)
    guard._report, guard._debug = SimpleNamespace(findings=[], one_time=[]), None
    guard._profiler = SimpleNamespace(report=report)
    with pytest.raises(BlindProfilerError):
        guard._collect()
    assert asked == [True]

    seen = SimpleNamespace(location="t.py:3", ranges=("loop", "step 0"))
    cupti = [SimpleNamespace(kind="stream_synchronize", api="cudaStreamSynchronize", ranges=("loop", "step 0")),
             SimpleNamespace(kind="stream_synchronize", api="cudaStreamSynchronize", ranges=("loop", "step 1"))]
    guard._report = SimpleNamespace(findings=[seen], one_time=[])
    guard._profiler = SimpleNamespace(report=lambda require_control: SimpleNamespace(unexpected_syncs=cupti))
    assert [f.ranges for f in guard._collect()] == [("loop", "step 0"), ("loop", "step 1")]

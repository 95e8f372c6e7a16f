"""Regions: NVTX-backed context manager/decorator, per-thread stack, listeners for the CUPTI profiler."""

from __future__ import annotations

import threading
import timeit

import pytest

from profiling.ranges import ALLOW_PREFIX, allowed_reason, current_ranges, range_listener, region


class Recorder:
    def __init__(self):
        self.events = []

    def range_push(self, name):
        self.events.append(("push", name, threading.get_ident()))

    def range_pop(self, name):
        self.events.append(("pop", name, threading.get_ident()))


def test_nesting_context_manager_and_decorator():
    @region("pass cond")
    def one_pass(x):
        return x, current_ranges()

    assert current_ranges() == ()
    with region("loop"):
        with region("step 0"):
            value, inside = one_pass(3)
        assert current_ranges() == ("loop",)
    assert (value, inside) == (3, ("loop", "step 0", "pass cond"))
    assert one_pass.__name__ == "one_pass"
    assert current_ranges() == ()


def test_exception_closes_the_region():
    with pytest.raises(ZeroDivisionError):
        with region("loop"):
            1 / 0
    assert current_ranges() == ()


def test_regions_are_per_thread():
    seen = {}

    def worker():
        with region("worker"):
            seen["worker"] = current_ranges()

    with region("main"):
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
        seen["main"] = current_ranges()
    assert seen == {"worker": ("worker",), "main": ("main",)}


def test_listener_sees_every_boundary_until_removed():
    recorder = Recorder()
    me = threading.get_ident()
    with range_listener(recorder):
        with region("loop"):
            with region("step 0"):
                pass
    with region("after"):
        pass
    assert recorder.events == [("push", "loop", me), ("push", "step 0", me), ("pop", "step 0", me), ("pop", "loop", me)]


def test_region_object_is_reusable_and_reentrant():
    step = region("step")
    with step:
        with step:
            assert current_ranges() == ("step", "step")
    assert current_ranges() == ()


def test_name_is_validated():
    with pytest.raises(ValueError, match="non-empty str"):
        region("")
    with pytest.raises(ValueError, match="non-empty str"):
        region(3)


def test_allowed_reason_reads_the_innermost_allow_region():
    assert allowed_reason(("loop", ALLOW_PREFIX + "timing", "x")) == "timing"
    assert allowed_reason(("loop", "step 1")) is None


def test_cheap_when_nothing_listens():
    """No tool attached, no listener: a region costs a few attribute reads and a list append/pop."""
    r = region("x")

    def enter_exit():
        with r:
            pass

    seconds = min(timeit.repeat(enter_exit, number=2000, repeat=3)) / 2000
    assert seconds < 20e-6, f"region enter+exit took {seconds * 1e6:.1f} us"


def test_recorded_regions_lists_names_in_order():
    from profiling.ranges import recorded_regions

    with recorded_regions() as names:
        with region("loop"):
            with region("step 0"):
                pass
    with region("after"):
        pass
    assert names == ["loop", "step 0"]

"""The dispatch-level host-sync detector: positive controls must be caught, negative controls must be clean.

On CPU every tensor stands in for device data. `.cpu()` of a CPU tensor is a no-op alias that never reaches
the dispatcher, so it is caught at the Python level (TorchFunctionMode); the dispatch-level device->host copy
rule is exercised on CPU with FakeTensorMode tensors that claim to live on "cuda", and for real on a GPU.
"""

from __future__ import annotations

import io
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from profiling import sync_rules
from profiling.ranges import region
from profiling.syncs import (
    HostSyncError,
    SyncFinding,
    _SyncDebugOwner,
    allow_host_sync,
    cuda_sync_debug,
    detect_host_syncs,
)


def _record(fn, device="cpu"):
    """Run `fn` under the detector inside regions loop > step 0; return the findings."""
    with detect_host_syncs(mode="record") as report:
        with region("loop"), region("step 0"):
            fn()
    return report.findings


def _controls(device):
    """Positive controls: (id, callable, expected op substring). Each must be reported at least once."""
    t = torch.randn(8, device=device)
    s = torch.tensor(1.5, device=device)

    def branch():
        if s > 0:  # a data-dependent Python branch
            pass

    return [
        ("item", lambda: s.item(), "_local_scalar_dense"),
        ("bool", lambda: bool(s > 0), "_local_scalar_dense"),
        ("if", branch, "_local_scalar_dense"),
        ("float", lambda: float(s), "_local_scalar_dense"),
        ("int", lambda: int(s), "_local_scalar_dense"),
        ("tolist", lambda: t.tolist(), "Tensor.tolist"),
        ("numpy", lambda: t.cpu().numpy() if device != "cpu" else t.numpy(), "Tensor."),
        ("cpu", lambda: t.cpu(), "Tensor.cpu"),
        ("nonzero", lambda: t.nonzero(), "aten.nonzero"),
        ("mask_index", lambda: t[t > 0], "aten.index.Tensor"),
        ("masked_select", lambda: t.masked_select(t > 0), "aten.masked_select"),
        ("unique", lambda: torch.unique(t), "unique"),
        ("print", lambda: print(t, file=io.StringIO()), "Tensor.__repr__"),
        ("format", lambda: f"{s:.3f}", "Tensor.__format__"),
        ("equal", lambda: torch.equal(t, t), "aten.equal"),
        ("contains", lambda: 0.5 in t, "_local_scalar_dense"),
    ]


CPU_CONTROLS = _controls("cpu")


@pytest.mark.parametrize("name,fn,op", CPU_CONTROLS, ids=[c[0] for c in CPU_CONTROLS])
def test_positive_controls_caught_on_cpu(name, fn, op):
    findings = _record(fn)
    assert findings, f"{name}: no sync reported"
    first = findings[0]
    assert op in first.op, f"{name}: op {first.op!r} does not name {op!r}"
    assert first.ranges == ("loop", "step 0")
    assert first.location.startswith(__file__), f"{name}: location {first.location!r} is not this test file"
    assert first.code, "the user's source line is quoted"
    assert first.reason


def test_finding_names_the_exact_user_line():
    s = torch.tensor(2.0)
    findings = _record(lambda: s.item())
    assert findings[0].code == 'findings = _record(lambda: s.item())'
    assert "Tensor.item" in findings[0].op and "aten._local_scalar_dense" in findings[0].op
    assert "loop > step 0" in str(findings[0])


def test_one_sync_is_reported_once():
    """`print` and f-strings run `.item()` inside: one finding, not one per nested op."""
    s = torch.tensor(2.0)
    assert len(_record(lambda: f"{s:.2f}")) == 1
    assert len(_record(lambda: print(torch.randn(3, 3), file=io.StringIO()))) == 1


def test_blocking_host_to_device_tensor_creation_is_caught_before_it_runs():
    # torch.tensor(list, device=cuda) is checked before the call, so this works on a CPU-only build too.
    with pytest.raises(HostSyncError, match="blocking host->device copy"):
        with detect_host_syncs(mode="raise"):
            torch.tensor([1.0, 2.0], device="cuda")


def test_device_to_host_copies_seen_at_dispatch_with_fake_cuda_tensors():
    with FakeTensorMode():
        x = torch.empty(4, device="cuda")
        host = torch.empty(4)
        with detect_host_syncs(mode="record") as report:
            host.copy_(x)  # aten.copy_ cuda -> cpu
            x.to("cpu")  # Python-level Tensor.to to CPU
            x.cpu()
            y = x * 2 + 1  # device arithmetic: fine
            x.to("cpu", non_blocking=True)  # async into pinned memory: not a sync by itself
        with detect_host_syncs(mode="record") as forms:  # every call form of Tensor.to is understood
            x.to("cpu", torch.float16)
            x.to(host)
            x.to(device="cpu", dtype=torch.float16, copy=True)
            x.to(torch.float16)  # no device change
            x.to("cpu", torch.float16, True)  # non_blocking positional
    assert [f.op for f in forms.findings] == ["Tensor.to"] * 3
    ops = [f.op for f in report.findings]
    assert len(ops) == 3, ops
    assert "aten.copy_.default" in ops[0] and "device->host" in report.findings[0].reason
    assert ops[1] == "Tensor.to" and ops[2] == "Tensor.cpu"
    assert y.device.type == "cuda"


NEGATIVE_CONTROLS = [
    ("arithmetic", lambda t: (t * 2 + 1).exp().sum(dim=-1)),
    ("where", lambda t: torch.where(t > 0, t, torch.zeros_like(t))),
    ("inplace", lambda t: t.mul_(0.5).add_(1.0).clamp_(-3.0, 3.0)),
    ("int_index", lambda t: t[:, torch.tensor([0, 2])]),
    ("slicing", lambda t: t[1:, ::2].contiguous()),
    ("masked_fill", lambda t: t.masked_fill(t > 0, 0.0)),
    ("mask_assign_scalar", lambda t: t.__setitem__(t > 0, 0.0)),
    ("mask_assign_scalar_beside_a_slice", lambda t: t.__setitem__((slice(None), t[0] > 0), 0.0)),
    ("mask_multiply", lambda t: t * (t > 0)),
    ("metadata", lambda t: (t.shape[0], t.size(1), t.numel(), t.dim(), len(t), t.dtype, t.device)),
    ("full_from_float", lambda t: torch.full((2,), 0.25) * t[0, :2]),
    ("reductions", lambda t: (t.max(), t.amax(dim=0), t.mean(), t.norm())),
    ("nn", lambda t: torch.nn.functional.layer_norm(torch.softmax(t, -1), (4,))),
    ("sdpa", lambda t: torch.nn.functional.scaled_dot_product_attention(*(t.view(1, 1, 3, 4),) * 3)),
    ("cat_stack", lambda t: torch.cat([t, torch.stack([t[0], t[1]])])),
    ("matmul", lambda t: t @ t.T),
]


@pytest.mark.parametrize("name,fn", NEGATIVE_CONTROLS, ids=[c[0] for c in NEGATIVE_CONTROLS])
def test_negative_controls_are_clean_on_cpu(name, fn):
    t = torch.randn(3, 4)
    assert _record(lambda: fn(t)) == []


def test_raise_mode_stops_at_the_first_sync_before_it_runs():
    s = torch.tensor(3.0)
    ran = []
    with pytest.raises(HostSyncError) as info:
        with detect_host_syncs(mode="raise") as report:
            with region("step 7"):
                s.item()
                ran.append("after")
    assert ran == []
    assert len(report.findings) == 1 and report.findings[0].ranges == ("step 7",)
    message = str(info.value)
    assert "1 host sync(s)" in message and "step 7" in message and "allow_host_sync" in message
    assert info.value.findings == report.findings


def test_collect_mode_reports_every_sync_at_exit():
    t = torch.randn(5)
    with pytest.raises(HostSyncError) as info:
        with detect_host_syncs(mode="collect"):
            t.sum().item()
            t.tolist()
            t.nonzero()
    assert len(info.value.findings) == 3


def test_an_exception_from_the_block_is_not_masked():
    with pytest.raises(KeyError):
        with detect_host_syncs(mode="collect") as report:
            torch.tensor(1.0).item()
            raise KeyError("from the block")
    assert len(report.findings) == 1


def test_allow_host_sync_records_instead_of_failing():
    s = torch.tensor(1.0)
    with detect_host_syncs(mode="raise") as report:
        with allow_host_sync("read the final loss"):
            s.item()
    assert report.findings == []
    assert len(report.allowed) == 1 and report.allowed[0].ranges == ("allow_host_sync: read the final loss",)


def test_one_time_blocks_reach_every_open_report_and_nested_blocks_close_cleanly():
    """A one-time block is recorded in each detector open on this thread, whether or not a sync is seen in it; an
    inner block closing leaves the outer one recording (both reports are empty, hence equal, when it closes)."""
    with detect_host_syncs(mode="record") as outer:
        with detect_host_syncs(mode="record") as inner:
            with allow_host_sync("capture cond", one_time=True):
                pass
        with allow_host_sync("capture neg", one_time=True):
            torch.tensor(1.0).item()
    assert inner.one_time == ["capture cond"] and outer.one_time == ["capture cond", "capture neg"]
    assert outer.findings == [] and len(outer.allowed) == 1
    with detect_host_syncs(mode="record") as outer:
        with detect_host_syncs(mode="record"):
            pass
        with allow_host_sync("capture cond", one_time=True):
            pass
    assert outer.one_time == ["capture cond"]


def test_arguments_are_validated():
    with pytest.raises(ValueError, match="mode"):
        with detect_host_syncs(mode="warn"):
            pass
    with pytest.raises(ValueError, match="reason"):
        with allow_host_sync(""):
            pass
    with pytest.raises(ValueError, match="mode"):
        with cuda_sync_debug("loud"):
            pass


def test_detection_is_per_thread():
    """Dispatch modes are thread-local: another thread's syncs are not this block's findings."""
    done = threading.Event()

    def worker():
        torch.tensor(1.0).item()
        done.set()

    with detect_host_syncs(mode="record") as report:
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
    assert done.is_set() and report.findings == []


def test_report_table_lists_findings():
    with detect_host_syncs(mode="record") as report:
        torch.tensor(1.0).item()
    table = report.table()
    assert "aten._local_scalar_dense" in table and "why it syncs" in table


def test_finding_str_without_region():
    finding = SyncFinding(op="aten.nonzero.default", location="x.py:3", ranges=(), code="t.nonzero()")
    assert str(finding).startswith("aten.nonzero.default at x.py:3 `t.nonzero()` in (no region)")


def _aten_ops_returning_python_values():
    ops = []
    for schema in torch._C._jit_get_all_schemas():
        namespace, _, name = schema.name.partition("::")
        if namespace != "aten" or not any("Tensor" in str(a.type) for a in schema.arguments):
            continue
        if schema.returns and all(str(r.type) in sync_rules.SCALAR_TYPES for r in schema.returns):
            ops.append(name)
    return sorted(set(ops))


def test_python_value_rule_separates_data_reads_from_metadata_queries():
    ops = _aten_ops_returning_python_values()
    data = {op for op in ops if op not in sync_rules.METADATA_QUERIES}
    # Every op that hands tensor *data* to Python is caught by the general rule, not by a name list.
    assert {"_local_scalar_dense", "item", "equal", "allclose", "is_nonzero"} <= data
    assert {"sym_size", "is_contiguous", "_fused_sdp_choice", "numel", "dim"}.isdisjoint(data)


def test_mask_assignment_of_a_device_value_is_a_sync_with_fake_cuda_tensors():
    """`t[mask] = v` becomes masked_fill_ (no sync) only for a one-element value on the host, beside any None
    indices: a device value (a reduction, say) goes through nonzero."""
    index_put_ = torch.ops.aten.index_put_.default
    with FakeTensorMode():
        x = torch.empty(4, 3, device="cuda")
        rows, cols = torch.empty(4, dtype=torch.bool, device="cuda"), torch.empty(3, dtype=torch.bool, device="cuda")
        on_device = torch.empty((), device="cuda")
    on_host = torch.tensor(0.0)
    assert sync_rules.dispatch_reason(index_put_, (x, [rows], on_host), {}) is None  # x[rows] = 0.0
    assert sync_rules.dispatch_reason(index_put_, (x, [None, cols], on_host), {}) is None  # x[:, cols] = 0.0
    assert "boolean-mask assignment" in sync_rules.dispatch_reason(index_put_, (x, [rows], on_device), {})
    assert "boolean-mask assignment" in sync_rules.dispatch_reason(index_put_, (x, [rows, cols], on_host), {})


def test_linalg_info_checks_and_new_tensor_from_python_data_are_syncs():
    a = torch.eye(3) * 2
    assert [f.op for f in _record(lambda: torch.linalg.inv(a))] == [
        "aten._linalg_check_errors.default via torch.linalg_inv"]  # reads `info` on the host to raise
    assert _record(lambda: a.new_tensor([1.0])) == []  # a host tensor: no copy
    with FakeTensorMode():
        x = torch.empty(2, device="cuda")
        with pytest.raises(HostSyncError, match=r"Tensor.new_tensor\(python data\) on 'cuda'"):
            with detect_host_syncs(mode="raise"):
                x.new_tensor([1.0, 2.0])  # the device defaults to x's


def test_dispatch_reason_uses_tags_and_refines_them():
    aten = torch.ops.aten
    t = torch.randn(4)
    assert "shape depends on data" in sync_rules.dispatch_reason(aten.nonzero.default, (t,), {})
    assert sync_rules.dispatch_reason(aten.index.Tensor, (t, [torch.tensor([0, 1])]), {}) is None
    assert "boolean-mask" in sync_rules.dispatch_reason(aten.index.Tensor, (t, [t > 0]), {})
    repeats = (torch.tensor([1, 2]),)
    assert sync_rules.dispatch_reason(aten.repeat_interleave.Tensor, repeats, {"output_size": 3}) is None
    assert sync_rules.dispatch_reason(aten.repeat_interleave.Tensor, repeats, {}) is not None
    assert sync_rules.dispatch_reason(aten.add.Tensor, (t, t), {}) is None


def test_sync_debug_owner_refuses_a_second_thread():
    owner = _SyncDebugOwner()
    owner.acquire()
    owner.acquire()  # nesting on the same thread is fine
    errors = []
    thread = threading.Thread(target=lambda: errors.append(pytest.raises(RuntimeError, owner.acquire)))
    thread.start()
    thread.join()
    assert "process-wide" in str(errors[0].value)
    owner.release()
    owner.release()
    assert owner.thread is None and owner.depth == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_cuda_sync_debug_is_a_noop_without_cuda():
    with cuda_sync_debug("error") as active:
        torch.tensor(1.0).item()
    assert active is False


# -- GPU: the same controls on real device tensors, plus sync debug mode --------------------------------------

@pytest.mark.cuda
def test_positive_controls_caught_on_gpu():
    for name, fn, _ in _controls("cuda"):
        assert _record(fn), f"{name}: no sync reported on cuda"


@pytest.mark.cuda
def test_gpu_copies():
    x = torch.randn(1024, device="cuda")
    pageable = torch.empty(1024)
    pinned = torch.empty(1024, pin_memory=True)
    findings = _record(lambda: pageable.copy_(x, non_blocking=True))  # pageable: blocks the host
    assert findings and "device->host" in findings[0].reason
    assert _record(lambda: pinned.copy_(x, non_blocking=True)) == []  # pinned + non_blocking: async
    assert _record(lambda: torch.tensor([1.0, 2.0], device="cuda"))
    assert _record(lambda: torch.ones(4).to("cuda"))  # blocking host->device copy
    torch.cuda.synchronize()


@pytest.mark.cuda
@pytest.mark.parametrize("name,fn", NEGATIVE_CONTROLS, ids=[c[0] for c in NEGATIVE_CONTROLS])
def test_negative_controls_are_clean_on_gpu(name, fn):
    t = torch.randn(3, 4, device="cuda")
    if name == "int_index":
        index = torch.arange(0, 4, 2, device="cuda")  # made on the device, outside the checked block
        fn = lambda t: t[:, index]  # noqa: E731
    if name == "full_from_float":
        fn = lambda t: torch.full((2,), 0.25, device="cuda") * t[0, :2]  # noqa: E731
    assert _record(lambda: fn(t)) == []


@pytest.mark.cuda
def test_cuda_graph_replay_has_no_findings():
    static = torch.randn(256, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            (static * 2).sin_()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = (static * 2).sin_()
    with detect_host_syncs(mode="raise") as report:
        with region("replay cond"):
            graph.replay()
            static.add_(1.0)
    assert report.findings == []
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()


@pytest.mark.cuda
def test_cuda_sync_debug_errors_and_restores():
    before = torch.cuda.get_sync_debug_mode()
    s = torch.tensor(1.0, device="cuda")
    with cuda_sync_debug("error") as active:
        assert active
        with pytest.raises(RuntimeError, match="synchronizing"):
            s.item()
        with allow_host_sync("deliberate"):
            s.item()  # relaxed inside the allow block
    assert torch.cuda.get_sync_debug_mode() == before


def test_a_sync_warning_is_located_at_the_users_line():
    """The pytest plugin turns each sync-debug warning into a finding while `warnings.warn` is on the stack:
    `user_frame` skips it (and torch, and this package) to name the line that made the call."""
    import warnings

    from profiling.pytest_plugin import _SyncDebugWarnings
    from profiling.syncs import SYNC_DEBUG_WARNING

    with _SyncDebugWarnings() as hook:
        warnings.warn(SYNC_DEBUG_WARNING, UserWarning)  # the user's line
    (finding,) = hook.findings
    assert "test_sync_detector.py:" in finding.location and "warnings.warn(SYNC_DEBUG_WARNING" in finding.code


def test_the_detector_imports_dynamo_before_the_checked_block():
    """The modes' first op imported torch._dynamo (1-3 s), so the first timed step of a checked CPU run carried
    it. Checked in a fresh interpreter, where nothing has imported dynamo yet."""
    code = (
        "import sys, torch\n"
        "from profiling.syncs import detect_host_syncs\n"
        "assert 'torch._dynamo' not in sys.modules\n"
        "with detect_host_syncs(mode='record'):\n"
        "    assert 'torch._dynamo' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def test_the_positive_control_makes_exactly_one_allowed_sync_in_its_region():
    """Checkable on CPU: the control's read is a sync the detector sees, allowed inside the control's region."""
    from profiling.control import run_positive_control
    from profiling.ranges import CONTROL_RANGE

    with detect_host_syncs(mode="record") as report:
        assert run_positive_control("cpu") == 1.0
    assert report.findings == []
    assert len(report.allowed) == 1 and CONTROL_RANGE in report.allowed[0].ranges
    assert "_local_scalar_dense" in report.allowed[0].op


def test_non_blocking_copy_into_pageable_host_memory_is_a_sync():
    with FakeTensorMode():
        x = torch.empty(4, device="cuda")
        pageable = torch.empty(4)  # not pinned
        with detect_host_syncs(mode="record") as report:
            pageable.copy_(x, non_blocking=True)  # a pageable device->host copy blocks even when non_blocking
    assert len(report.findings) == 1 and "device->host" in report.findings[0].reason


def test_blocking_host_to_device_copy_is_a_sync_and_non_blocking_is_not():
    copy = torch.ops.aten.copy_.default
    with FakeTensorMode():
        dev = torch.empty(4, device="cuda")
        host = torch.empty(4)
    assert sync_rules.dispatch_reason(copy, (dev, host), {}) == (
        "blocking host->device copy (non_blocking=False synchronises the stream)")
    assert sync_rules.dispatch_reason(copy, (dev, host), {"non_blocking": True}) is None


_PEEK = torch.library.Library("ltx2_test_peek", "DEF")
_PEEK.define("peek(Tensor x) -> float?")
_PEEK.impl("peek", lambda x: float(x.sum()), "CPU")


def test_an_op_returning_an_optional_python_value_is_caught_after_the_call():
    """`-> float?` is a schema the before-the-call rule cannot classify; the value it hands to Python is data."""
    with detect_host_syncs(mode="record") as report:
        torch.ops.ltx2_test_peek.peek(torch.ones(3))
    assert [f.reason for f in report.findings] == ["returned a Python value read from tensor data"]

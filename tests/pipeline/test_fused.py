"""`pipeline.fused.linear_gelu_tanh`: the FFN's fc1 + tanh-GELU, in the cuBLASLt epilogue on CUDA.

CPU: the fallback is exactly `gelu(linear(x), "tanh")`, and the custom op's fake (meta) implementation agrees with
its real one (`torch.library.opcheck`). GPU (`cuda` marker): the epilogue matches the unfused float32 reference
within bf16 rounding, and torch.compile keeps it as one opaque op (no separate GELU kernel).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.fused import _linear_gelu_tanh_op, linear_gelu_tanh


def test_cpu_path_is_the_unfused_tanh_gelu():
    torch.manual_seed(0)
    fc = nn.Linear(16, 64)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(linear_gelu_tanh(x, fc), F.gelu(fc(x), approximate="tanh"), rtol=0, atol=0)


def test_linear_without_bias_takes_the_plain_path():
    fc = nn.Linear(16, 64, bias=False)
    x = torch.randn(3, 16)
    torch.testing.assert_close(linear_gelu_tanh(x, fc), F.gelu(fc(x), approximate="tanh"), rtol=0, atol=0)


def test_custom_op_registration_is_consistent():
    x, w, b = torch.randn(2, 3, 8), torch.randn(12, 8), torch.randn(12)
    torch.library.opcheck(_linear_gelu_tanh_op, (x, w, b), test_utils=("test_schema", "test_faketensor"))
    torch.testing.assert_close(_linear_gelu_tanh_op(x, w, b), F.gelu(F.linear(x, w, b), approximate="tanh"),
                               rtol=0, atol=0)  # the tanh GELU on CPU too, never the erf one


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_epilogue_matches_float32_reference_on_gpu(dtype):
    torch.manual_seed(0)
    fc = nn.Linear(512, 2048).to("cuda", dtype)
    x = torch.randn(3, 300, 512, device="cuda", dtype=dtype)
    with torch.no_grad():
        ours = linear_gelu_tanh(x, fc)
        ref = F.gelu(F.linear(x.double(), fc.weight.double(), fc.bias.double()), approximate="tanh")
        unfused = F.gelu(fc(x), approximate="tanh")
    assert ours.dtype == dtype and ours.shape == (3, 300, 2048)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-3  # bf16: output rounding; float32: summation order
    err_ours = (ours.double() - ref).abs().max().item()
    err_unfused = (unfused.double() - ref).abs().max().item()
    assert err_ours <= max(tol, 1.01 * err_unfused), (err_ours, err_unfused)


@pytest.mark.cuda
def test_compiled_graph_keeps_the_epilogue_op():
    torch._dynamo.reset()
    fc = nn.Linear(256, 1024).to("cuda", torch.bfloat16)
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    with torch.no_grad():
        out = torch.compile(lambda t: linear_gelu_tanh(t, fc), backend=backend, fullgraph=True)(x)
        torch.testing.assert_close(out, linear_gelu_tanh(x, fc), rtol=0, atol=0)
    assert any("linear_gelu_tanh" in t for t in seen), seen
    torch._dynamo.reset()

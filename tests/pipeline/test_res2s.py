"""res2s: host coefficients vs an independent high-precision evaluation, one step vs a float64 reference
written here from the formulas (with the reference's 100-iteration bongmath loop), closed form vs loop."""

import math

import mpmath
import pytest
import torch

from pipeline.res2s import (
    Res2sStep,
    bongmath_anchor,
    bongmath_applies,
    phi,
    plan_res2s,
    res2s_coefficients,
    res2s_step,
    sde_coefficients,
    sde_step,
)
from pipeline.sigmas import distilled_stage2_sigmas, ltx2_sigmas

mpmath.mp.dps = 120  # phi_3(1e-15) cancels ~45 digits in the closed form


def mp_phi(j, z):
    z = mpmath.mpf(z)
    if z == 0:
        return 1 / mpmath.factorial(j)
    return (mpmath.exp(z) - sum(z**k / mpmath.factorial(k) for k in range(j))) / z**j


def mp_coefficients(sigma, sigma_next, c2=0.5):
    """Independent evaluation at 120 digits."""
    h = mpmath.log(mpmath.mpf(sigma) / mpmath.mpf(sigma_next))
    a21 = c2 * mp_phi(1, -c2 * h)
    b2 = mp_phi(2, -h) / c2
    b1 = mp_phi(1, -h) - b2
    return h, a21, b1, b2, mpmath.mpf(sigma) * mpmath.exp(-c2 * h)  # = sqrt(sigma * sigma_next) at c2 = 0.5


def close(a, b, rel=1e-13):
    return abs(a - float(b)) <= rel * max(abs(float(b)), 1e-300)


@pytest.mark.parametrize("j", [1, 2, 3])
@pytest.mark.parametrize("z", [0.0, 1e-15, -1e-12, -1e-8, -1e-5, -1e-3, -0.1, -0.49, -0.5, -0.51, -1.0, -6.0, 0.3])
def test_phi_vs_mpmath(j, z):
    assert close(phi(j, z), mp_phi(j, z), rel=2e-15)


PAIRS = [
    (1.0, 0.9934909541409014),  # first HQ step
    (0.5033779335016113, 0.1),  # last full HQ step, h > 0.5
    (0.909375, 0.725),
    (0.421875, 0.0011),  # the floor step, h ~ 6
    (0.5, 0.5 * (1 - 1e-9)),  # h -> 0
    (0.5, 0.5 * (1 - 1e-6)),
    (0.7, 0.7 * math.exp(-1e-4)),
]


@pytest.mark.parametrize("c2", [0.5, 0.3, 0.8])
@pytest.mark.parametrize("sigma,sigma_next", PAIRS)
def test_coefficients_vs_independent(sigma, sigma_next, c2):
    got = res2s_coefficients(sigma, sigma_next, c2)
    assert all(type(x) is float for x in got)
    h, a21, b1, b2, sigma_mid = mp_coefficients(sigma, sigma_next, c2)
    assert close(got.h, h, rel=1e-15)
    # h itself carries the float64 rounding of sigma/sigma_next; the coefficients are smooth in h.
    assert close(got.a21, a21)
    assert close(got.b2, b2)
    assert abs(got.b1 - float(b1)) <= 1e-13 * max(abs(float(b1)), abs(float(b2)))  # b1 = phi1 - b2 cancels
    assert close(got.sigma_mid, sigma_mid, rel=1e-15)


def test_coefficients_limit_h_to_zero():
    h, a21, b1, b2, _ = res2s_coefficients(0.5, 0.5 * (1 - 1e-12))
    assert h == pytest.approx(1e-12, rel=1e-3)
    assert a21 == pytest.approx(0.5, abs=1e-12)  # c2 * phi1(0)
    assert b2 == pytest.approx(1.0, abs=1e-12)  # phi2(0) / c2
    assert b1 == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("sigma,sigma_next", [(0.5, 0.0), (0.5, 0.5), (0.4, 0.5), (float("nan"), 0.1), (1.0, -0.1)])
def test_coefficients_reject_terminal_and_bad(sigma, sigma_next):
    with pytest.raises(ValueError, match="sigma"):
        res2s_coefficients(sigma, sigma_next)


@pytest.mark.parametrize("s", [0.9, 0.5, 0.0011, 1.0])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])  # 1.0 meets the 0.9999 clamp; above 1 is refused (check_eta)
def test_sde_coefficients(s, eta):
    alpha, sigma_down, sigma_up = sde_coefficients(s, eta)
    up = min(eta * s, 0.9999 * s)
    res = math.sqrt(s * s - up * up)
    assert sigma_up == up
    assert alpha == pytest.approx((1 - s) + res, rel=1e-15)
    assert sigma_down == pytest.approx(res / ((1 - s) + res), rel=1e-15)
    assert all(math.isfinite(x) for x in (alpha, sigma_down, sigma_up))


def test_sde_coefficients_reject_terminal():
    with pytest.raises(ValueError, match="sigma_next"):
        sde_coefficients(0.0)


def test_plan_hq():
    plan = plan_res2s(ltx2_sigmas(15, 8160))
    assert len(plan) == 15
    assert [s.terminal for s in plan] == [False] * 14 + [True]
    assert sum(s.evaluations for s in plan) == 29
    for s in plan[:-1]:
        assert s.bongmath == bongmath_applies(s.coefficients.h, s.sigma)
    assert plan[0].bongmath and not plan[13].bongmath  # last full step has h ~ 1.6
    assert plan[-1].coefficients is None
    assert not any(s.bongmath for s in plan_res2s(ltx2_sigmas(15, 8160), bongmath=False))


def test_plan_stage2():
    plan = plan_res2s(distilled_stage2_sigmas())
    assert [s.evaluations for s in plan] == [2, 2, 2, 1]
    assert [s.bongmath for s in plan] == [True, False, False, False]  # h(0.909 -> 0.725) = 0.23


@pytest.mark.parametrize("eta", [-0.5, 2.0, True, float("nan"), "0.5"])
def test_plan_rejects_bad_eta(eta):
    """One rule for every entry point (`denoise` had [0, 1] and no bools; the plan took 2.0 and stored True)."""
    with pytest.raises(ValueError, match=r"eta must be a number in \[0, 1\]"):
        plan_res2s([1.0, 0.5, 0.0], eta=eta)
    assert plan_res2s([1.0, 0.5, 0.0], eta=1)[0].eta == 1.0 and isinstance(plan_res2s([1.0, 0.0], eta=1)[0].eta, float)


def test_bongmath_thresholds():
    assert bongmath_applies(0.49, 0.031)
    assert not bongmath_applies(0.5, 0.5)
    assert not bongmath_applies(0.1, 0.03)


# ----------------------------------------------------------------------------------------------
# Float64 reference of one step, written from the formulas (LTX2_REFERENCE section 5).


def reference_sde(x, x_det, sigma, sigma_next, noise, eta=0.5):
    sigma_up = min(eta * sigma_next, 0.9999 * sigma_next)
    sigma_res = math.sqrt(sigma_next**2 - sigma_up**2)
    alpha = (1 - sigma_next) + sigma_res
    sigma_down = sigma_res / alpha
    eps = (x - x_det) / (sigma - sigma_next)
    return alpha * (x - sigma * eps + sigma_down * eps) + sigma_up * noise


def reference_step(x, sigma, sigma_next, denoise, sub_noise, step_noise):
    """One res2s step in float64 with the reference's 100-iteration anchor loop."""
    if sigma_next == 0:
        return denoise(x, sigma)
    h = math.log(sigma / sigma_next)
    a21 = 0.5 * ((math.exp(-h / 2) - 1) / (-h / 2))
    b2 = ((math.exp(-h) - 1 + h) / h**2) / 0.5
    b1 = (math.exp(-h) - 1) / (-h) - b2
    sigma_mid = math.sqrt(sigma * sigma_next)
    d1 = denoise(x, sigma)
    eps1 = d1 - x
    x_mid = reference_sde(x, x + h * a21 * eps1, sigma, sigma_mid, sub_noise)
    if h < 0.5 and sigma > 0.03:
        for _ in range(100):
            x = x_mid - h * a21 * eps1
            eps1 = d1 - x
    d2 = denoise(x_mid, sigma_mid)
    x_det = x + h * (b1 * eps1 + b2 * (d2 - x))
    return reference_sde(x, x_det, sigma, sigma_next, step_noise)


def toy_denoise(x, sigma):
    """A smooth nonlinear stand-in for the guided model (x0 from x and sigma)."""
    return torch.tanh(0.7 * x) * (1.0 - 0.5 * sigma) + 0.1 * sigma * x.flip(-1)


class FixedNoise:
    """NoiseFn returning given tensors and recording the order of requests."""

    def __init__(self, sub, step):
        self.sub, self.step, self.kinds = sub, step, []

    def __call__(self, kind, like):
        self.kinds.append(kind)
        return self.sub if kind == "substep" else self.step


def _tensors(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, 12, 8), (2, 5, 8)]
    x = tuple(torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes)
    sub = tuple(torch.randn(s, generator=g, dtype=torch.float64) for s in shapes)
    step = tuple(torch.randn(s, generator=g, dtype=torch.float64) for s in shapes)
    return x, sub, step


@pytest.mark.parametrize("sigma,sigma_next", [(0.9934909541409014, 0.9860150673011954), (0.5033779335016113, 0.1),
                                              (0.421875, 0.0011), (0.909375, 0.725)])
def test_one_step_matches_float64_reference(sigma, sigma_next):
    x, sub, step_noise = _tensors(0, torch.float64)
    calls = []

    def denoise(latents, s):
        calls.append(s)
        return tuple(toy_denoise(t, s) for t in latents)

    noise = FixedNoise(sub, step_noise)
    plan = plan_res2s([sigma, sigma_next])
    got = res2s_step(x, plan[0], denoise, noise)
    assert calls == [sigma, math.sqrt(sigma * sigma_next)]
    assert noise.kinds == ["substep", "step"]
    for i in range(2):
        want = reference_step(x[i], sigma, sigma_next, toy_denoise, sub[i], step_noise[i])
        assert got[i].dtype == torch.float64
        torch.testing.assert_close(got[i], want, rtol=1e-12, atol=1e-12)


def test_one_step_float32_latents():
    """float32 state: the update runs in float64 and only the result (and the midpoint) is rounded."""
    x, sub, step_noise = _tensors(1, torch.float32)
    plan = plan_res2s([0.9, 0.8])
    denoise = lambda xs, s: tuple(toy_denoise(t.double(), s) for t in xs)  # noqa: E731
    got = res2s_step(x, plan[0], denoise, FixedNoise(sub, step_noise))
    for i in range(2):
        want = reference_step(x[i].double(), 0.9, 0.8, toy_denoise, sub[i], step_noise[i])
        assert got[i].dtype == torch.float32
        torch.testing.assert_close(got[i].double(), want, rtol=1e-6, atol=1e-6)


def test_terminal_step_is_one_evaluation():
    x, sub, step_noise = _tensors(2, torch.float32)
    calls = []

    def denoise(latents, s):
        calls.append(s)
        return tuple(toy_denoise(t, s).double() for t in latents)

    noise = FixedNoise(sub, step_noise)
    step = plan_res2s([0.1, 0.0])[0]
    got = res2s_step(x, step, denoise, noise)
    assert calls == [0.1] and noise.kinds == []
    for g, t in zip(got, x):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, toy_denoise(t, 0.1))


def test_sde_step_needs_noise_and_a_nonzero_landing_sigma():
    """A step to 0 is terminal and handled by res2s_step (no SDE step); every SDE step injects noise."""
    x, x_det = torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    with pytest.raises(ValueError, match="noise must be a Tensor shaped like x, got NoneType"):
        sde_step(x, x_det, None, sigma=0.5, sigma_next=0.2)
    with pytest.raises(ValueError, match=r"sigma_next must be in \(0, 1\] for an SDE step, got 0.0"):
        sde_step(x, x_det, torch.randn_like(x), sigma=0.1, sigma_next=0.0)
    with pytest.raises(TypeError, match="terminal"):  # the parameter is gone: terminal steps never get here
        sde_step(x, x_det, torch.randn_like(x), sigma=0.5, sigma_next=0.2, terminal=False)


def test_sde_step_eta_zero_is_deterministic_target():
    x, x_det = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    out = sde_step(x, x_det, torch.randn_like(x), sigma=0.6, sigma_next=0.3, eta=0.0)
    torch.testing.assert_close(out, x_det, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("sigma,sigma_next", [(1.0, 0.9934909541409014), (0.8277071758539091, 0.7680275824117977),
                                              (0.6738965525888666, 0.5033779335016113), (0.909375, 0.725)])
def test_bongmath_closed_form_equals_loop(sigma, sigma_next):
    h, a21, *_ = res2s_coefficients(sigma, sigma_next)
    c = h * a21
    g = torch.Generator().manual_seed(3)
    x_mid = torch.randn(2, 64, 16, generator=g, dtype=torch.float64)
    d1 = torch.randn(2, 64, 16, generator=g, dtype=torch.float64)
    eps1 = torch.randn(2, 64, 16, generator=g, dtype=torch.float64)  # the loop's starting eps
    for _ in range(100):
        x = x_mid - c * eps1
        eps1 = d1 - x
    closed = bongmath_anchor(x_mid, d1, c)
    ulp = torch.finfo(torch.float64).eps * max(x.abs().max().item(), d1.abs().max().item())
    torch.testing.assert_close(closed, x, rtol=0, atol=8 * ulp)  # a few float64 roundings apart
    torch.testing.assert_close(d1 - closed, eps1, rtol=0, atol=8 * ulp)


def test_step_dataclass_is_frozen():
    step = plan_res2s([0.5, 0.2])[0]
    assert isinstance(step, Res2sStep)
    with pytest.raises(AttributeError):
        step.sigma = 0.3

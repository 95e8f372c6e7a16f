"""The res2s sampler (RES4LYF `res_2s`, as LTX-2.3 HQ uses it), split into host numbers and device math.

Host side (Python floats): step size `h = ln(sigma / sigma_next)`, the Runge-Kutta coefficients `a21, b1, b2`,
the midpoint sigma, whether the step is terminal (`sigma_next == 0`) and whether the bongmath anchor refinement
runs (`h < 0.5 and sigma > 0.03`), all decided before the first step: `plan_res2s` turns a schedule into one
frozen `Res2sStep` per step. The SDE coefficients are host math too, computed by `sde_step` from those numbers
(eta checked by `plan_res2s` first).

Device side: `sde_step`, `bongmath_anchor` and `res2s_step` only combine tensors with those Python
numbers. None of them reads a tensor value on the host, so they never synchronise the host: there is no
`.item()`, no NaN clean-up with boolean masks and no `bool(tensor)` branch (the reference's
`(sigma_up == 0).any()` check becomes the host flag `Res2sStep.terminal`, which `res2s_step` branches on).

Precision: as in the reference, the latent update runs in float64 (anchor, eps, midpoint, SDE mix); the
model sees the midpoint cast back to the latents' dtype. The cost is a handful of elementwise float64
kernels over ~1M values per step, noise next to one transformer pass, and it keeps the 100-step-equivalent
bongmath fixed point and the small-h updates free of float32 cancellation.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

from torch import Tensor

from pipeline.sigmas import validate_sigmas

# eta of the SDE noise injection (both the substep and the step), as in the LTX-2.3 HQ reference.
DEFAULT_ETA = 0.5
# Bongmath runs only on small steps away from the end of the schedule (reference thresholds).
BONGMATH_MAX_H = 0.5
BONGMATH_MIN_SIGMA = 0.03
# Below this |z| the phi functions use their Taylor series (closed forms lose digits to cancellation).
_PHI_SERIES_RADIUS = 0.5
_PHI_SERIES_TERMS = 24

Latents = tuple[Tensor, ...]  # one tensor per modality, e.g. (video [B, Nv, C], audio [B, Na, C])
DenoiseFn = Callable[[Latents, float], Latents]  # (latents, sigma) -> x0 per modality
NoiseKind = Literal["substep", "step"]
NoiseFn = Callable[[NoiseKind, Latents], Latents]  # (kind, like) -> float64 standard noise per modality


class Res2sCoefficients(NamedTuple):
    """Host floats of one res2s step from `sigma` to `sigma_next` (both > 0)."""

    h: float  # ln(sigma / sigma_next)
    a21: float  # c2 * phi1(-c2 h): weight of eps1 in the midpoint
    b1: float  # phi1(-h) - b2
    b2: float  # phi2(-h) / c2
    sigma_mid: float  # the midpoint sigma, sigma * exp(-c2 h) (= sqrt(sigma * sigma_next) for c2 = 0.5)


class SdeCoefficients(NamedTuple):
    """Host floats of one SDE noise injection landing on `sigma_next` (> 0)."""

    alpha: float  # (1 - sigma_next) + sigma_res, the signal rescale
    sigma_down: float  # sigma_res / alpha, the deterministic target sigma
    sigma_up: float  # the injected noise level, min(eta, 0.9999) * sigma_next


def phi(j: int, z: float) -> float:
    """phi_j(z) = (e^z - sum_{k<j} z^k/k!) / z^j, accurate near 0 (Taylor series for |z| < 0.5).

    phi_1(z) = (e^z - 1)/z, phi_2(z) = (e^z - 1 - z)/z^2; phi_j(0) = 1/j!.
    """
    if j < 1:
        raise ValueError(f"phi order j must be >= 1, got {j!r}")
    z = float(z)
    if abs(z) < _PHI_SERIES_RADIUS:
        # phi_j(z) = sum_k z^k / (k + j)!, evaluated with Horner from the smallest term.
        total = 0.0
        for k in reversed(range(_PHI_SERIES_TERMS)):
            total = total * z / (k + j + 1) + 1.0
        return total / math.factorial(j)
    remainder = math.expm1(z) - sum(z**k / math.factorial(k) for k in range(1, j))
    return remainder / z**j


def res2s_coefficients(sigma: float, sigma_next: float, c2: float = 0.5) -> Res2sCoefficients:
    """The step's h, a21, b1, b2 and sigma_mid as Python floats (never touches a tensor).

    Only defined for `sigma > sigma_next > 0`: a step to 0 is terminal and has no coefficients (the
    caller returns the first evaluation's x0 instead).
    """
    sigma, sigma_next, c2 = float(sigma), float(sigma_next), float(c2)
    if not (math.isfinite(sigma) and math.isfinite(sigma_next) and sigma > sigma_next > 0.0):
        raise ValueError(
            f"res2s coefficients need finite sigma > sigma_next > 0, got sigma={sigma!r}, "
            f"sigma_next={sigma_next!r} (a step to 0 is terminal: use its first x0)"
        )
    if not 0.0 < c2 < 1.0:
        raise ValueError(f"c2 must be in (0, 1), got {c2!r}")
    # log1p of the (exact, Sterbenz) difference keeps h accurate to a few ulps even as h -> 0, where
    # log(sigma / sigma_next) would carry the quotient's rounding as an absolute error of ~1e-16.
    h = math.log1p((sigma - sigma_next) / sigma_next)
    a21 = c2 * phi(1, -c2 * h)
    b2 = phi(2, -h) / c2
    b1 = phi(1, -h) - b2
    # The reference hard-codes sqrt(sigma * sigma_next) for c2 = 0.5; keep its rounding there.
    sigma_mid = math.sqrt(sigma * sigma_next) if c2 == 0.5 else sigma * math.exp(-c2 * h)
    return Res2sCoefficients(h=h, a21=a21, b1=b1, b2=b2, sigma_mid=sigma_mid)


def check_eta(eta: object) -> float:
    """`eta` as a float, or ValueError: a real number (not a bool) in [0, 1], the one rule every entry point uses
    (`denoise_stage1/2`, `plan_res2s`, `sde_step`). The SDE clamps sigma_up at 0.9999 * sigma_next, so eta above 1
    would only mean 0.9999."""
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
    return float(eta)


def sde_coefficients(sigma_next: float, eta: float = DEFAULT_ETA) -> SdeCoefficients:
    """alpha, sigma_down, sigma_up of an SDE step landing on `sigma_next` > 0, from floats.

    `sigma_up = min(eta * s, 0.9999 * s)`, `sigma_res = sqrt(s^2 - sigma_up^2)`, `alpha = (1 - s) +
    sigma_res`, `sigma_down = sigma_res / alpha`. A landing sigma of 0 is the terminal case, which the
    caller handles without coefficients (the reference's NaN clean-up on the device is not needed).
    """
    s, eta = float(sigma_next), check_eta(eta)
    if not (math.isfinite(s) and 0.0 < s <= 1.0):
        raise ValueError(f"sigma_next must be in (0, 1] for an SDE step, got {sigma_next!r}")
    sigma_up = min(eta * s, 0.9999 * s)
    sigma_res = math.sqrt(max(s * s - sigma_up * sigma_up, 0.0))
    alpha = (1.0 - s) + sigma_res
    return SdeCoefficients(alpha=alpha, sigma_down=sigma_res / alpha, sigma_up=sigma_up)


def bongmath_applies(h: float, sigma: float) -> bool:
    """Host decision: the anchor refinement runs on steps with `h < 0.5` and `sigma > 0.03`."""
    return h < BONGMATH_MAX_H and sigma > BONGMATH_MIN_SIGMA


@dataclass(frozen=True)
class Res2sStep:
    """Everything one res2s step needs from the host, decided before the loop starts."""

    index: int
    sigma: float
    sigma_next: float
    terminal: bool  # sigma_next == 0: the step's result is the first evaluation's x0
    coefficients: Res2sCoefficients | None  # None when terminal
    bongmath: bool  # run the closed-form anchor refinement
    eta: float = DEFAULT_ETA  # SDE noise strength of the substep and the step

    @property
    def evaluations(self) -> int:
        """Denoiser evaluations of this step: 1 when terminal, else 2."""
        return 1 if self.terminal else 2


def plan_res2s(sigmas: Sequence[float], *, eta: float = DEFAULT_ETA, bongmath: bool = True) -> tuple[Res2sStep, ...]:
    """One `Res2sStep` per step of `sigmas` (validated floats; only a step to exactly 0 is terminal)."""
    values = validate_sigmas(sigmas)
    eta = check_eta(eta)  # here, before any step runs
    steps = []
    for i, (sigma, sigma_next) in enumerate(zip(values[:-1], values[1:], strict=True)):
        if sigma_next == 0.0:
            steps.append(Res2sStep(i, sigma, sigma_next, terminal=True, coefficients=None, bongmath=False, eta=eta))
            continue
        coeff = res2s_coefficients(sigma, sigma_next)
        applies = bool(bongmath) and bongmath_applies(coeff.h, sigma)
        steps.append(Res2sStep(i, sigma, sigma_next, terminal=False, coefficients=coeff, bongmath=applies, eta=eta))
    return tuple(steps)


def sde_step(
    x: Tensor,
    x_det: Tensor,
    noise: Tensor,
    *,
    sigma: float,
    sigma_next: float,
    eta: float = DEFAULT_ETA,
) -> Tensor:
    """One SDE step from `x` at `sigma` towards the deterministic target `x_det` at `sigma_next` > 0.

    `eps = (x - x_det) / (sigma - sigma_next)`; `x_new = alpha * (x - sigma*eps + sigma_down*eps) +
    sigma_up * noise`. A step to 0 is terminal and never comes here: `res2s_step` returns the first x0 for it
    (`Res2sStep.terminal`, decided on the host). Runs in the dtype of its inputs (float64 in the loop); never
    synchronises the host.
    """
    if not isinstance(noise, Tensor):
        raise ValueError(f"noise must be a Tensor shaped like x, got {type(noise).__name__}")
    alpha, sigma_down, sigma_up = sde_coefficients(sigma_next, eta)
    eps = (x - x_det) / (sigma - sigma_next)
    x0 = x - sigma * eps
    return alpha * (x0 + sigma_down * eps) + sigma_up * noise


def bongmath_anchor(x_mid: Tensor, denoised: Tensor, c: float) -> Tensor:
    """Closed-form fixed point of the reference's 100-iteration anchor refinement.

    The reference repeats `x = x_mid - c * eps1; eps1 = denoised - x` (c = h * a21, |c| < 1), a contraction
    whose fixed point is `x = (x_mid - c * denoised) / (1 - c)`; one fused expression instead of ~800
    kernel launches. The caller recomputes `eps1 = denoised - x`. Never synchronises the host.
    """
    return (x_mid - c * denoised) / (1.0 - c)


def res2s_step(latents: Latents, step: Res2sStep, denoise: DenoiseFn, noise: NoiseFn) -> Latents:
    """Advance every modality's latents by one res2s step; calls `denoise` twice (once when terminal).

    `denoise(latents, sigma)` returns x0 per modality (any float dtype; float32 from the guided loop).
    `noise(kind, like)` returns float64 standard noise shaped like each latent, "substep" before the
    midpoint evaluation and "step" after it. The result has the input latents' dtypes. Every branch is on
    host floats from `step`; never synchronises the host.
    """
    d1 = denoise(latents, step.sigma)
    if step.terminal:
        return tuple(d.to(x.dtype) for d, x in zip(d1, latents, strict=True))
    coeff = step.coefficients
    assert coeff is not None, f"non-terminal step {step.index} has no coefficients"
    h, a21, b1, b2, sigma_mid = coeff

    anchors = [x.double() for x in latents]  # float64 update, as the reference
    d1 = [d.double() for d in d1]
    eps1 = [d - x for d, x in zip(d1, anchors, strict=True)]
    sub_noise = noise("substep", latents)
    x_mid = [
        sde_step(x, x + (h * a21) * e, n, sigma=step.sigma, sigma_next=sigma_mid, eta=step.eta)
        for x, e, n in zip(anchors, eps1, sub_noise, strict=True)
    ]
    if step.bongmath:
        anchors = [bongmath_anchor(xm, d, h * a21) for xm, d in zip(x_mid, d1, strict=True)]
        eps1 = [d - x for d, x in zip(d1, anchors, strict=True)]

    d2 = denoise(tuple(xm.to(x.dtype) for xm, x in zip(x_mid, latents, strict=True)), sigma_mid)
    step_noise = noise("step", latents)
    out = []
    for x, e1, d, n, like in zip(anchors, eps1, d2, step_noise, latents, strict=True):
        x_det = x + h * (b1 * e1 + b2 * (d.double() - x))
        x_next = sde_step(x, x_det, n, sigma=step.sigma, sigma_next=step.sigma_next, eta=step.eta)
        out.append(x_next.to(like.dtype))
    return tuple(out)


__all__ = [
    "DEFAULT_ETA",
    "Res2sCoefficients",
    "Res2sStep",
    "SdeCoefficients",
    "bongmath_anchor",
    "bongmath_applies",
    "phi",
    "plan_res2s",
    "res2s_coefficients",
    "res2s_step",
    "sde_coefficients",
    "sde_step",
]

"""Sigma schedules as plain Python floats.

Every schedule decision of the denoising loop (step sizes, the terminal step, whether bongmath runs) is
made from these numbers on the host, so nothing here is ever a tensor: the loop never has to read a sigma
back from the device.

- `ltx2_sigmas`: the LTX-2.3 schedule (token-dependent shift, stretched so the last nonzero sigma is the
  terminal value), `steps + 1` floats ending in 0.0.
- `distilled_stage2_sigmas`: the distilled stage-2 list; for res2s a 0.0011 floor is inserted before the
  final 0 so that no full res2s step divides by `sigma - 0` (the floor step is then the terminal one).
- `validate_sigmas`: the checks the loops run before their first step.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

from pipeline.config import is_int

# Token anchors and shifts of the LTX-2 schedule: the shift `mu` is linear in the token count, 0.95 at
# 1024 tokens and 2.05 at 4096 tokens (not clamped outside that range).
BASE_SHIFT_TOKENS = 1024
MAX_SHIFT_TOKENS = 4096
BASE_SHIFT = 0.95
MAX_SHIFT = 2.05

# Stage 2 of the two-stage pipelines (distilled LoRA): 3 steps from 0.909375 to 0.
DISTILLED_STAGE2_SIGMAS = (0.909375, 0.725, 0.421875, 0.0)
# res2s cannot take a full step to sigma 0 (h = ln(sigma / 0) is infinite): the reference inserts this
# floor before the final 0, and the floor -> 0 step is a single (terminal) evaluation.
RES2S_SIGMA_FLOOR = 0.0011


def shift_mu(num_tokens: int) -> float:
    """The schedule shift `mu` for `num_tokens` video tokens (2.05 at the 4096 anchor)."""
    slope = (MAX_SHIFT - BASE_SHIFT) / (MAX_SHIFT_TOKENS - BASE_SHIFT_TOKENS)
    return num_tokens * slope + BASE_SHIFT - BASE_SHIFT_TOKENS * slope


def ltx2_sigmas(steps: int, num_tokens: int | None = None, terminal: float = 0.1) -> list[float]:
    """The LTX-2.3 sigma schedule: `steps + 1` Python floats from 1.0 down to 0.0.

    1. `s_i = 1 - i/steps`; 2. shift `s' = e^mu / (e^mu + 1/s - 1)` (0 stays 0) with `mu = shift_mu(T)`;
    3. stretch the nonzero part so its last value is `terminal`: `z = 1 - s'`, `s'' = 1 - z / (z_last / (1 -
    terminal))`, computed from `z = r / (e^mu + r)`, `r = 1/s - 1`, so that huge token counts keep their digits.
    `num_tokens=None` means the 4096-token anchor (the non-HQ presets); HQ stage 1 passes its
    real token count. With `steps == 1` the only nonzero sigma is the pinned 1.0, so there is nothing to
    stretch and the schedule is `[1.0, 0.0]`.

    Computed in float64. The reference computes the same formula in float32: up to 8160 tokens the two differ by
    < 5e-7 (a few float32 ulps; tests/pipeline/test_sigmas.py pins it), beyond that float32 itself loses digits
    (7e-4 at 32640 tokens and 8 steps, where 1 - s' is ~1e-6).
    """
    if not is_int(steps) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if num_tokens is None:
        num_tokens = MAX_SHIFT_TOKENS
    if not is_int(num_tokens) or num_tokens <= 0:
        raise ValueError(f"num_tokens must be a positive int or None (4096 anchor), got {num_tokens!r}")
    if not (isinstance(terminal, (int, float)) and 0.0 < terminal < 1.0):
        raise ValueError(f"terminal must be a float in the open interval (0, 1), got {terminal!r}")

    if steps == 1:
        return [1.0, 0.0]  # s = 1 shifts to 1 at any mu
    # z = 1 - s' is computed as r / (e^mu + r), r = 1/s - 1, never as a difference: from ~90k tokens e^mu is so
    # large that s' rounds to 1.0 and `1 - s'` loses every digit. The stretch needs only z_i / z_last, written
    # with e^-mu so that nothing overflows at any token count.
    inv_exp_mu = math.exp(-shift_mu(num_tokens))
    r = [1.0 / (1.0 - i / steps) - 1.0 for i in range(steps)]  # of each nonzero s; the final 0 is appended
    stretched = [1.0 - (1.0 - terminal) * (r_i / r[-1]) * (1.0 + r[-1] * inv_exp_mu) / (1.0 + r_i * inv_exp_mu)
                 for r_i in r]
    # The formula puts the last nonzero sigma at `terminal` exactly; pin it so rounding cannot move it.
    stretched[-1] = float(terminal)
    return [*stretched, 0.0]


def with_res2s_floor(sigmas: Sequence[float], floor: float = RES2S_SIGMA_FLOOR) -> list[float]:
    """Insert `floor` before a final 0.0 (unless the last nonzero sigma is already at or below it)."""
    out = [float(s) for s in sigmas]
    if len(out) >= 2 and out[-1] == 0.0 and out[-2] > floor:
        out.insert(-1, float(floor))
    return out


def distilled_stage2_sigmas(*, res2s: bool = True) -> list[float]:
    """The distilled stage-2 list; with `res2s=True` (default) the 0.0011 floor is inserted before the 0.

    With the floor, res2s runs 3 full steps (2 evaluations each) plus the terminal floor -> 0 step (one
    evaluation): 7 evaluations.
    """
    sigmas = list(DISTILLED_STAGE2_SIGMAS)
    return with_res2s_floor(sigmas) if res2s else sigmas


def validate_sigmas(sigmas: Sequence[float], *, name: str = "sigmas") -> tuple[float, ...]:
    """Check a schedule on the host and return it as a tuple of Python floats.

    A schedule has at least two finite values in [0, 1], strictly decreasing; only the last may be 0. Its items
    must be host real numbers (NumPy's too): a string is a sequence of digits and a bool a number to `float`, and
    reading a tensor's items would synchronise the host once per sigma, so none of them is a schedule.
    """
    try:
        items = tuple(sigmas)
    except TypeError:
        items = None
    if items is None or isinstance(sigmas, (str, bytes)):
        raise ValueError(f"{name} must be a sequence of Python numbers, got {type(sigmas).__name__}")
    for i, s in enumerate(items):
        if isinstance(s, bool) or not isinstance(s, numbers.Real):
            raise ValueError(f"{name} must be a sequence of Python numbers, got a {type(s).__name__} at {name}[{i}] "
                             f"(of a {type(sigmas).__name__}; a tensor's items would need a host sync to read)")
    values = tuple(float(s) for s in items)
    if len(values) < 2:
        raise ValueError(f"{name} needs at least 2 values (one step), got {list(values)}")
    for i, s in enumerate(values):
        if not math.isfinite(s) or not 0.0 <= s <= 1.0:
            raise ValueError(f"{name}[{i}] must be a finite number in [0, 1], got {s!r}")
    for i in range(len(values) - 1):
        if not values[i + 1] < values[i]:
            raise ValueError(
                f"{name} must be strictly decreasing, got {name}[{i}]={values[i]!r} then "
                f"{name}[{i + 1}]={values[i + 1]!r}"
            )
    return values

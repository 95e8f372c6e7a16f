"""Sigma schedules: the LTX-2.3 formula (float64 and the reference's float32 torch form), the distilled list."""

import math

import pytest
import torch

from pipeline.sigmas import (
    DISTILLED_STAGE2_SIGMAS,
    RES2S_SIGMA_FLOOR,
    distilled_stage2_sigmas,
    ltx2_sigmas,
    shift_mu,
    validate_sigmas,
    with_res2s_floor,
)

CASES = [(15, 8160), (15, 1536), (30, None), (40, 4096), (8, 32640), (2, 100), (5, 24)]


def formula_float64(steps, tokens, terminal=0.1):
    """Written from LTX2_REFERENCE section 4, independently of the module (float64 torch)."""
    tokens = 4096 if tokens is None else tokens
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    mu = tokens * (1.1 / 3072) + 0.95 - 1024 * (1.1 / 3072)
    shifted = torch.where(s > 0, math.exp(mu) / (math.exp(mu) + 1.0 / s - 1.0), torch.zeros_like(s))
    nz = shifted[:-1]
    z = 1.0 - nz
    stretched = 1.0 - z / (z[-1] / (1.0 - terminal))
    return [*stretched.tolist(), 0.0]


def reference_float32(steps, tokens, terminal=0.1):
    """The reference scheduler's own float32 torch computation."""
    tokens = 4096 if tokens is None else tokens
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    mm = (2.05 - 0.95) / (4096 - 1024)
    shift = tokens * mm + 0.95 - mm * 1024
    sigmas = torch.where(sigmas != 0, math.exp(shift) / (math.exp(shift) + (1 / sigmas - 1)), 0)
    mask = sigmas != 0
    one_minus_z = 1.0 - sigmas[mask]
    sigmas[mask] = 1.0 - one_minus_z / (one_minus_z[-1] / (1.0 - terminal))
    return sigmas.to(torch.float32).tolist()


@pytest.mark.parametrize("steps,tokens", CASES)
def test_matches_formula(steps, tokens):
    got = ltx2_sigmas(steps, tokens)
    assert len(got) == steps + 1
    assert all(type(s) is float for s in got)
    for a, b in zip(got, formula_float64(steps, tokens), strict=True):
        assert abs(a - b) < 1e-10  # float64 vs float64 (large token counts lose a few digits in 1 - z/scale)
    if tokens is not None and tokens > 8160:
        return  # float32 itself is off by ~4e-4 there (1 - s' ~ 1e-6 at mu ~ 12): float64 is the reference
    for a, b in zip(got, reference_float32(steps, tokens), strict=True):
        assert abs(a - b) < 5e-7  # a few float32 ulps (2.6e-7 measured at 15 steps, 8160 tokens): the docstring's bound


@pytest.mark.parametrize("steps,tokens", CASES)
@pytest.mark.parametrize("terminal", [0.1, 0.05, 0.3])
def test_shape_of_schedule(steps, tokens, terminal):
    got = ltx2_sigmas(steps, tokens, terminal)
    assert got[0] == 1.0 and got[-1] == 0.0
    assert got[-2] == terminal  # the last nonzero sigma is the terminal value
    assert all(a > b for a, b in zip(got, got[1:]))  # strictly decreasing
    assert validate_sigmas(got) == tuple(got)


@pytest.mark.parametrize("tokens", [94_000, 130_560, 2_000_000, 10**9])
def test_huge_grids_keep_their_digits(tokens):
    """From ~90k video tokens (a 4K grid has 130,560) e^mu makes s' round to 1.0 in float64, so `1 - s'` lost every
    digit: the schedule came out flat or divided by zero. Against the formula in exact rational arithmetic (mu
    rounded to a float, as the module has it; e^mu as a Fraction of its float where it fits, else the limit)."""
    from fractions import Fraction
    steps, terminal = 15, Fraction(1, 10)
    mu = shift_mu(tokens)
    exp_mu = Fraction(math.exp(mu)) if mu < 700 else None  # beyond, e^-mu underflows: the mu -> infinity limit
    r = [1 / (1 - Fraction(i, steps)) - 1 for i in range(steps)]
    z = [ri if exp_mu is None else ri / (exp_mu + ri) for ri in r]  # the limit's z is r up to a common factor
    want = [1 - (1 - terminal) * zi / z[-1] for zi in z]
    got = ltx2_sigmas(steps, tokens)
    assert validate_sigmas(got) == tuple(got)  # strictly decreasing, 1.0 ... 0.1, 0.0
    for a, b in zip(got[:-1], want, strict=True):
        assert abs(a - float(b)) < 1e-12


def test_hq_stage1_values():
    got = ltx2_sigmas(15, 8160)
    assert got[1] == pytest.approx(0.99349095414, abs=1e-10)
    assert got[13] == pytest.approx(0.50337793350, abs=1e-10)


def test_none_is_the_4096_anchor():
    assert ltx2_sigmas(30) == ltx2_sigmas(30, 4096)
    assert shift_mu(4096) == pytest.approx(2.05)
    assert shift_mu(1024) == pytest.approx(0.95)


def test_more_tokens_shift_towards_noise():
    small, large = ltx2_sigmas(10, 1024), ltx2_sigmas(10, 32640)
    assert all(b >= a for a, b in zip(small[1:-2], large[1:-2]))


def test_one_step():
    assert ltx2_sigmas(1) == [1.0, 0.0]


@pytest.mark.parametrize("steps", [0, -1, 1.5, True, "15", None])
def test_bad_steps(steps):
    with pytest.raises(ValueError, match="steps"):
        ltx2_sigmas(steps)


@pytest.mark.parametrize("tokens", [0, -4, 2.5, True])
def test_bad_tokens(tokens):
    with pytest.raises(ValueError, match="num_tokens"):
        ltx2_sigmas(10, tokens)


@pytest.mark.parametrize("terminal", [0.0, 1.0, -0.1, 1.5, "0.1"])
def test_bad_terminal(terminal):
    with pytest.raises(ValueError, match="terminal"):
        ltx2_sigmas(10, 4096, terminal)


def test_distilled_stage2():
    assert distilled_stage2_sigmas() == [0.909375, 0.725, 0.421875, 0.0011, 0.0]
    assert distilled_stage2_sigmas(res2s=False) == list(DISTILLED_STAGE2_SIGMAS)
    assert RES2S_SIGMA_FLOOR == 0.0011


def test_floor_insertion():
    assert with_res2s_floor([1.0, 0.5, 0.0]) == [1.0, 0.5, 0.0011, 0.0]
    assert with_res2s_floor([1.0, 0.5, 0.0011, 0.0]) == [1.0, 0.5, 0.0011, 0.0]  # never twice
    assert with_res2s_floor([1.0, 0.5]) == [1.0, 0.5]  # no final zero: nothing to protect
    assert with_res2s_floor([0.001, 0.0]) == [0.001, 0.0]  # already below the floor


@pytest.mark.parametrize(
    "bad,match",
    [
        ([1.0], "at least 2"),
        ([1.0, 1.0, 0.0], "strictly decreasing"),
        ([0.5, 0.7, 0.0], "strictly decreasing"),
        ([1.2, 0.5, 0.0], r"\[0, 1\]"),
        ([1.0, float("nan"), 0.0], "finite"),
        ([1.0, 0.5, -0.1], r"\[0, 1\]"),
        (["a", "b"], "Python numbers"),
        ("10", "Python numbers"),  # float("1"), float("0") would read it as [1.0, 0.0]
        ([True, False], "Python numbers"),
        (5, "Python numbers, got int"),
        # A tensor's items would each be read with a host sync: refused before any is read.
        (torch.tensor([1.0, 0.5, 0.0]), r"got a Tensor at sigmas\[0\] \(of a Tensor; a tensor's items would need"),
        ([1.0, torch.tensor(0.5), 0.0], r"got a Tensor at sigmas\[1\]"),
    ],
)
def test_validate_sigmas(bad, match):
    with pytest.raises(ValueError, match=match):
        validate_sigmas(bad)


def test_validate_sigmas_takes_host_numbers():
    np = pytest.importorskip("numpy")
    assert validate_sigmas(np.array([1.0, 0.5, 0.0])) == (1.0, 0.5, 0.0)
    assert validate_sigmas((1, 0.25, 0)) == (1.0, 0.25, 0.0)


def test_validate_sigmas_reads_no_tensor(monkeypatch):
    """A tensor schedule is refused without reading an item (each read is a host sync on a GPU)."""
    def no_read(self):
        raise AssertionError("a sigma tensor was read")

    monkeypatch.setattr(torch.Tensor, "__float__", no_read)
    monkeypatch.setattr(torch.Tensor, "item", no_read)
    with pytest.raises(ValueError, match="host sync"):
        validate_sigmas(torch.tensor([1.0, 0.5, 0.0]))

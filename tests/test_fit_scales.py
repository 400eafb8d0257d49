"""Tests of steepest.fit (issue 12): fits whose residuals or parameters are at extreme scales."""

from __future__ import annotations

import math

import pytest
import torch
from reference import seeded
from test_fit import (
    D,
    T,
    Y,
    engine,  # noqa: F401 (the autouse fixture: each test on both engines)
    pytest_generate_tests,  # noqa: F401 (the hook that parametrizes engine)
    torch_core,
)

from steepest.fit import curve_fit, least_squares


# ---------------------------------------------------------------------------- extreme scales
def _decay_problem(s: float, u: float = 1.0):
    """The expfit residuals times s, with the parameters in units u (x = p / u): a batch of 3
    starts."""
    x0 = torch.tensor([[1.0, 1.0, 0.0], [2.5, 0.5, 1.0], [0.5, 2.0, -1.0]], dtype=D) / u

    def fun(p):
        q = p * u
        return s * (q[:, :1] * torch.exp(-q[:, 1:2] * T) + q[:, 2:] - Y)

    return fun, x0


@pytest.mark.parametrize("method", ["trust-region", "levenberg-marquardt", "gauss-newton"])
def test_a_fit_does_not_depend_on_the_scale_of_its_residuals(method):
    """f and J times s change no step of the three methods, and MINPACK's scaled norms keep
    it so in floating point: scipy's lm takes the same 6 evaluations from s = 1e-300 to 1e300.
    Here the squares (||f||^2, c^T w) overflowed from s ~ 1e154 (status -1 at x0) and
    underflowed below 1e-154 (wrong parameters reported successful from 1e-160; gtol "satisfied"
    at x0 for 1e-200). A power of two outside [2^-128, 2^128] is divided out exactly: the same
    fits bit for bit; a power of ten: the same to rounding. fun and jac of the result stay in the
    user's units."""
    fun, x0 = _decay_problem(1.0)
    ref = least_squares(fun, x0, method=method)
    assert bool(ref.success.all())
    for s in (2.0**-900, 2.0**-600, 2.0**-200, 2.0**200, 2.0**600, 2.0**900):
        fun_s, _ = _decay_problem(s)
        res = least_squares(fun_s, x0, method=method)
        assert torch.equal(res.x, ref.x), (s, res.status, res.nfev, res.message)
        assert res.status.tolist() == ref.status.tolist() and torch.equal(res.nfev, ref.nfev)
        assert torch.equal(res.fun, ref.fun * s) and torch.equal(res.jac, ref.jac * s)
    for s in (1e-300, 1e-160, 1e160, 1e300):
        res = least_squares(_decay_problem(s)[0], x0, method=method)
        assert bool(res.success.all()), (s, res.message)
        torch.testing.assert_close(res.x, ref.x, rtol=1e-9, atol=1e-9)
    # one batch of fits at different scales: each scaled on its own
    scales = torch.tensor([1.0, 1e200, 1e-200], dtype=D).unsqueeze(-1)
    mixed = least_squares(lambda p: scales * fun(p), x0, method=method)
    assert bool(mixed.success.all())
    torch.testing.assert_close(mixed.x, ref.x, rtol=1e-9, atol=1e-9)


def test_the_trust_region_does_not_depend_on_the_units_of_the_parameters():
    """x in units u (J times u): MINPACK's D (J's column norms) makes the trust region
    invariant, and the column norms are computed without overflow or underflow of their
    squares (MINPACK's enorm): at u = 1e200 the torch core stopped at x0 with a non-finite
    column norm (status -1), at 1e-200 it saw zero columns and reported x0 as converged. (LM
    and Gauss-Newton form s^2 of J itself, without D: invariant to a uniform unit while that
    square is in range, status -1 beyond: the next test.)"""
    fun, x0 = _decay_problem(1.0)
    ref = least_squares(fun, x0)
    for u in (1e-200, 1e-100, 1e100, 1e200, 2.0**-700, 2.0**700):
        fun_u, x0_u = _decay_problem(1.0, u)
        res = least_squares(fun_u, x0_u)
        assert res.status.tolist() == ref.status.tolist(), u
        torch.testing.assert_close(res.x * u, ref.x, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", ["levenberg-marquardt", "gauss-newton"])
def test_lm_and_gauss_newton_stop_where_j_s_scale_cannot_be_squared(method):
    """Without D, mu = s^2 of J itself: with the parameters in units of 1e-200 (J ~ 1e-200)
    every s^2 underflowed to 0, the step was 0 and the fit reported ftol and xtol "satisfied"
    at x0; at 1e200 s^2 overflowed, likewise. Now status -1 where the largest column norm
    does not square within range, with a message that names trust-region (which is invariant:
    test above); at 1e-100 and 1e100 the fits succeed."""
    fun, x0 = _decay_problem(1.0)
    ref = least_squares(fun, x0, method=method)
    for u in (1e-200, 1e200):
        res = least_squares(*_decay_problem(1.0, u), method=method)
        assert res.status.tolist() == [-1, -1, -1] and not bool(res.success.any()), u
        assert "trust-region" in res.message[0]
    for u in (1e-100, 1e100):
        fun_u, x0_u = _decay_problem(1.0, u)
        res = least_squares(fun_u, x0_u, method=method)
        assert bool(res.success.all()), u
        torch.testing.assert_close(res.x * u, ref.x, rtol=1e-7, atol=1e-8)


def test_curve_fit_covariance_at_extreme_scales():
    """popt and pcov of ydata and the model times s are those of s = 1 (pcov = V S^-2 V^T
    ||f||^2 / (N - P) is invariant): from 1e-300 to 1e300 (scipy's curve_fit gives inf or NaN
    pcov beyond ~1e155). absolute_sigma: S^-2 in the user's units, s^-2 smaller."""

    def f(x, a, b, c):
        return a * torch.exp(-b * x) + c

    p0 = torch.tensor([[1.0, 1.0, 0.0]] * 2, dtype=D)
    popt, pcov = curve_fit(f, T, Y.repeat(2, 1), p0)
    _, pabs = curve_fit(f, T, Y.repeat(2, 1), p0, absolute_sigma=True)
    for s in (1e-300, 1e-160, 1e160, 1e300):
        got, gcov = curve_fit(lambda x, a, b, c, s=s: s * f(x, a, b, c), T, s * Y.repeat(2, 1), p0)
        torch.testing.assert_close(got, popt, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(gcov, pcov, rtol=1e-7, atol=0)
    s = 2.0**100  # absolute_sigma: pcov in the user's units, exactly 2^-200 of s = 1's
    _, gabs = curve_fit(lambda x, a, b, c: s * f(x, a, b, c), T, s * Y.repeat(2, 1), p0,
                        absolute_sigma=True)  # fmt: skip
    torch.testing.assert_close(gabs * s**2, pabs, rtol=1e-12, atol=0)


@torch_core
def test_range_scales_are_exact_powers_of_two():
    """core._range_scales: 1 in [2^-128, 2^128] and for 0, inf, NaN; outside, the power of two
    2^-e that brings the entry to [1/2, 1), exactly (subnormal scales included; a subnormal
    entry at most 2^1023, the largest power of two)."""
    from steepest.fit.core import _range_scales

    e = torch.arange(-1073, 1024)
    big = torch.ldexp(torch.full(e.shape, 1.5, dtype=D), e - 1)  # 1.5 2^(e-1): frexp's e
    big[0] = 2.0**-1074
    s = _range_scales(big)
    inside = (e >= -128) & (e <= 128)
    assert bool((s[inside] == 1).all())
    m = big[~inside] * s[~inside]
    normal = big[~inside] >= torch.finfo(D).tiny
    assert bool(((m[normal] >= 0.5) & (m[normal] < 1)).all())
    assert bool((m[~normal] > 0).all()) and bool(torch.isfinite(s).all())
    assert bool((torch.frexp(s[~inside])[0] == 0.5).all())  # a power of two
    odd = _range_scales(torch.tensor([0.0, math.inf, math.nan], dtype=D))
    assert odd.tolist() == [1.0, 1.0, 1.0]
    f32 = _range_scales(torch.tensor([2.0**15, 2.0**17, 2.0**-18], dtype=torch.float32))
    assert f32.tolist() == [1.0, 2.0**-18, 2.0**17]  # frexp: 2^17 = 0.5 2^18


def test_extreme_scales_keep_the_pointwise_check_the_weights_and_the_result_sound():
    """(a) curve_fit's pointwise probe compares u^T J of two routes with a bound whose squares
    overflowed from J ~ 1e154: a model that couples the points (a normalisation over x) passed
    it and was fitted with the wrong Jacobian (popt left at p0, or off, "successful"); now
    scaled by a power of two first. (b) weights and the scale multiply in turn: sqrt(w) = 1e4 on
    a zero residual with the others ~1e-306 had overflowed sqrt(w) / sigma (status -1, J inf).
    (c) the result's grad and cost are in the user's units, inf where out of range, never
    inf - inf = NaN."""

    def coupled(x, a, b, c):
        e = torch.exp(-b * x)
        return a * e / e.sum(-1, keepdim=True) + c

    y = coupled(T, 20.0, 1.3, 0.5) + 0.001 * torch.randn(30, generator=seeded(8), dtype=D)
    ref, _ = curve_fit(coupled, T, y, [10.0, 1.0, 0.0])
    for s in (1e200, 1e300):
        got, cov = curve_fit(
            lambda x, a, b, c, s=s: s * coupled(x, a, b, c), T, s * y, [10.0, 1.0, 0.0]
        )
        torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-10)
        assert bool(torch.isfinite(cov).all())
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0], [1.0, 3.0]], dtype=D)
    b = torch.tensor([1.0, 2.0, 0.0, 4.0], dtype=D)
    w = torch.tensor([1.0, 1.0, 1e8, 1.0], dtype=D)
    base = least_squares(lambda x: a @ x - b, torch.zeros(2, dtype=D), weights=w)
    for s in (1e-300, 1e-306):
        res = least_squares(lambda x, s=s: s * (a @ x - b), torch.zeros(2, dtype=D), weights=w)
        assert res.status == base.status and bool(torch.isfinite(res.jac).all()), s
        # x* ~ 2e-8, determined to ~1e-12 (cond(sqrt(W) A) ~ 1e4; the two engines' fits at
        # s = 1 differ by 6e-13): measured 1.5e-12 (torch) and 4.7e-12 (numba) off
        torch.testing.assert_close(res.x, base.x, rtol=0, atol=1e-11)
    fun, x0 = _decay_problem(1e200)
    res = least_squares(fun, x0)
    assert bool(res.success.all()) and not bool(res.grad.isnan().any())
    assert bool(torch.isinf(res.cost).all())  # ~1e397: beyond float64
    # a gradient entry exactly 0 stays 0 (divided by inv^2 = 0, it was 0/0 = NaN)
    flat = least_squares(
        lambda x: 1e200 * torch.stack([x[0] - 1, x[0] + 1, 0 * x[1] + 3]), [0.3, 1.0]
    )
    assert flat.grad.tolist() == [0.0, 0.0] and flat.cost == math.inf

"""Tests of steepest.fit (issue 12): robust losses (loss=, f_scale=) against scipy's trf."""

from __future__ import annotations

import math

import pytest
import torch
from reference import seeded
from scipy import optimize as sopt
from test_fit import (
    D,
    T,
    Y,
    _decay,
    _decay_jac,
    engine,  # noqa: F401 (the autouse fixture: each test on both engines)
    pytest_generate_tests,  # noqa: F401 (the hook that parametrizes engine)
    torch_core,
)

from steepest.errors import ConfigurationError
from steepest.fit import curve_fit, least_squares

# ---------------------------------------------------------------------------- robust losses
RHO = {  # scipy's rho(z), written another way (stable forms)
    "soft_l1": lambda z: 2 * z / (torch.sqrt(1 + z) + 1),
    "huber": lambda z: torch.where(z <= 1, z, 2 * torch.sqrt(z) - 1),
    "cauchy": torch.log1p,
    "arctan": torch.atan,
}


@torch_core
@pytest.mark.parametrize("name", list(RHO))
def test_robust_transform_squares_to_the_loss_and_its_factor_is_the_derivative(name):
    """f-hat^2 = C^2 rho(f^2 / C^2) (so 1/2 ||f-hat||^2 = F), the factor is d f-hat / d f (by
    autograd through the transform, where that has no cancellation), 1 at f = 0, and both stay
    finite for residuals up to 1e300 (no overflowing square)."""
    from steepest.fit.loss import robust

    c = 0.7
    transform, factor = robust(name, c)
    f = torch.tensor(
        [
            0.0,
            1e-9,
            -1e-3,
            0.004,
            0.0069,
            0.00699,
            0.00701,
            0.05,
            -0.3,
            0.69,
            0.7,
            0.71,
            3.0,
            -50.0,
        ],
        dtype=D,
    )  # (0.00699 and 0.00701: either side of the series' edge a = 1e-4... and 1e-2 x C)
    want = c**2 * RHO[name]((f / c) ** 2)
    torch.testing.assert_close(transform(f) ** 2, want, rtol=1e-13, atol=0)
    x = f.clone().requires_grad_()
    (g,) = torch.autograd.grad(transform(x).sum(), x)
    torch.testing.assert_close(factor(f), g, rtol=1e-10, atol=0)
    assert float(factor(torch.zeros(1, dtype=D))) == 1.0
    huge = torch.tensor([1e100, -1e200, 1e300], dtype=D)
    assert bool(torch.isfinite(transform(huge)).all() and torch.isfinite(factor(huge)).all())
    assert bool((torch.sign(transform(huge)) == torch.sign(huge)).all())
    edge = torch.tensor([0.99e-4, 1e-4, 1.01e-4], dtype=D) * c  # the series' edge
    torch.testing.assert_close(
        transform(edge) ** 2, c**2 * RHO[name]((edge / c) ** 2), rtol=1e-14, atol=0
    )
    f32 = torch.tensor([1e-3, 3.0, 1e20, -3e38], dtype=torch.float32)  # a^2 beyond float32
    got = transform(f32)
    assert bool(torch.isfinite(got).all() and torch.isfinite(factor(f32)).all())
    want32 = (c**2 * RHO[name]((f32.double() / c) ** 2)).sqrt()
    torch.testing.assert_close(got.double().abs(), want32, rtol=1e-5, atol=0)


def _scipy_trf(fun, x0, **kw):
    """scipy's least_squares(method="trf") on a torch residual, with its torch Jacobian,
    f_scale 0.1 and tight tolerances (1e-14)."""
    return sopt.least_squares(
        lambda p: fun(torch.from_numpy(p)).numpy(),
        x0,
        jac=lambda p: torch.func.jacrev(fun)(torch.from_numpy(p)).numpy(),
        method="trf",
        f_scale=0.1,
        ftol=1e-14,
        xtol=1e-14,
        gtol=1e-14,
        **kw,
    )


def _outliers(b: int = 1):
    g = seeded(11)
    t = torch.linspace(0, 4, 60, dtype=D)
    y = 2 * torch.exp(-1.3 * t) + 0.5 + 0.02 * torch.randn(b, 60, generator=g, dtype=D)
    y[:, ::7] += 1.5 * torch.randn(b, 9, generator=g, dtype=D)
    return t, y


@pytest.mark.parametrize("loss", ["soft_l1", "huber", "cauchy"])
@pytest.mark.parametrize("method", ["trust-region", "levenberg-marquardt", "gauss-newton"])
def test_robust_losses_reach_scipy_trf_s_minimum(loss, method):
    """loss= and f_scale= as scipy's: the three methods reach the minimum of
    F = 1/2 sum C^2 rho(f^2 / C^2) that scipy's trf reaches with the same loss (data with 9 of
    60 points off by ~1.5), cost F, grad = dF/dx (autograd of F), fun the residuals
    themselves. (arctan, a bounded rho, is not convex: local minima, not compared. Undamped
    Gauss-Newton with huber heads from this start into another basin, b -> 0, and runs to
    max_nfev: a failure reported, not compared.)"""
    t, y = _outliers()
    y = y[0]

    def fun(p):
        return p[0] * torch.exp(-p[1] * t) + p[2] - y

    def cost(p):
        return 0.5 * (0.1**2 * RHO[loss]((fun(p) / 0.1) ** 2)).sum()

    ref = _scipy_trf(fun, [1.0, 1.0, 0.0], loss=loss)
    res = least_squares(fun, [1.0, 1.0, 0.0], method=method, loss=loss, f_scale=0.1)
    if method == "gauss-newton" and loss == "huber":
        assert not res.success and res.status == 0
        return
    assert res.success, res.message
    torch.testing.assert_close(res.x, torch.from_numpy(ref.x), rtol=1e-6, atol=1e-7)
    assert res.cost == pytest.approx(float(cost(res.x)), rel=1e-12)
    assert res.cost == pytest.approx(ref.cost, rel=1e-9)
    torch.testing.assert_close(res.grad, torch.func.grad(cost)(res.x), rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(res.fun, fun(res.x), rtol=0, atol=0)
    linear = least_squares(fun, [1.0, 1.0, 0.0], method=method)
    assert float((res.x - torch.tensor([2.0, 1.3, 0.5], dtype=D)).abs().max()) < float(
        (linear.x - torch.tensor([2.0, 1.3, 0.5], dtype=D)).abs().max()
    )  # the robust fit is nearer the curve without outliers


def test_robust_curve_fit_batch_equals_single_fits_on_every_route():
    """curve_fit(loss=, f_scale=): a batch of 4 equals the single fits (popt and pcov), with the
    autograd (pointwise) Jacobian and a given jac (which costs one more evaluation of f a
    Jacobian, for f-hat's factor); pcov is scipy's formula on the robust cost and J-hat."""
    t, y = _outliers(4)
    p0 = torch.tensor([[1.0, 1.0, 0.0]] * 4, dtype=D)
    for jac in (None, _decay_jac):
        popt, pcov, res = curve_fit(
            _decay, t, y, p0, loss="cauchy", f_scale=0.1, jac=jac, full_output=True
        )
        assert bool(res.success.all())
        torch.testing.assert_close(res.fun, _decay(t, *popt.unsqueeze(-2).unbind(-1)) - y)
        for i in (0, 3):
            one, cov = curve_fit(
                _decay, t, y[i], [1.0, 1.0, 0.0], loss="cauchy", f_scale=0.1, jac=jac
            )
            torch.testing.assert_close(popt[i], one, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(pcov[i], cov, rtol=1e-7, atol=1e-16)
        r = res.fun[0] / 0.1
        jhat = (1 / (1 + r * r) / torch.sqrt(torch.log1p(r * r) / (r * r))).unsqueeze(-1)
        jhat = jhat * torch.func.jacrev(lambda p: _decay(t, *p))(popt[0])
        s2 = 2 * res.cost[0] / (60 - 3)
        torch.testing.assert_close(pcov[0], torch.linalg.inv(jhat.T @ jhat) * s2, rtol=1e-8, atol=0)


def test_a_bad_loss_is_refused_before_any_evaluation():
    calls = []

    def fun(p):
        calls.append(1)
        return p - 1

    with pytest.raises(ConfigurationError, match="unknown loss 'l1'"):
        least_squares(fun, [0.0, 0.0], loss="l1")
    for bad in (0.0, -1.0, math.inf, "1", True):
        with pytest.raises(ConfigurationError, match="f_scale"):
            least_squares(fun, [0.0, 0.0], loss="soft_l1", f_scale=bad)
        with pytest.raises(ConfigurationError, match="factor must be a finite number > 0"):
            least_squares(fun, [0.0, 0.0], factor=bad)  # the same check (True passed it)
    with pytest.raises(ConfigurationError, match="kwargs must be a dict"):
        least_squares(fun, [0.0, 0.0], kwargs=[1])
    ok = least_squares(lambda p: p - 1, [0.0, 0.0], loss="soft_l1", f_scale=torch.tensor(0.5))
    assert ok.success
    with pytest.raises(ConfigurationError, match="unknown loss"):
        curve_fit(_decay, T, Y, [1.0, 1.0, 0.0], loss="l2")
    assert calls == []


@torch_core
def test_a_robust_loss_with_bounds_reaches_scipy_trf_s_bounded_minimum():
    """loss= with bounds=: the bound on c binds, as in scipy's trf with the same loss (which
    takes bounds and losses together); the same x, cost and active_mask."""
    t, y = _outliers()
    y = y[0]

    def fun(p):
        return p[0] * torch.exp(-p[1] * t) + p[2] - y

    lb, ub = [0.0, 0.0, 0.55], [10.0, 10.0, 10.0]
    ref = _scipy_trf(fun, [1.0, 1.0, 0.6], loss="soft_l1", bounds=(lb, ub))
    res = least_squares(fun, [1.0, 1.0, 0.6], loss="soft_l1", f_scale=0.1, bounds=(lb, ub))
    assert res.success
    torch.testing.assert_close(res.x, torch.from_numpy(ref.x), rtol=1e-7, atol=1e-8)
    assert res.cost == pytest.approx(ref.cost, rel=1e-10)
    assert res.active_mask.tolist() == ref.active_mask.tolist() == [0, 0, -1]


def test_a_robust_loss_on_the_pointwise_route_takes_f_from_its_own_forward_pass():
    """J-hat needs f at each Jacobian; the pointwise route computes f in the forward pass of its
    backward, so no further evaluation: calls of f with the parameter columns (n, 1) (the
    evaluations) are at most the evaluations of the fit plus the probe, f0 and the result's f
    (35 against 18 here when each Jacobian evaluated f again)."""
    t, y = _outliers(4)
    columns = []

    def f(x, a, b, c):
        if a.ndim == 2 and a.shape[1] == 1:
            columns.append(a.shape[0])
        return a * torch.exp(-b * x) + c

    p0 = torch.tensor([[1.0, 1.0, 0.0]] * 4, dtype=D)
    _, _, res = curve_fit(f, t, y, p0, loss="cauchy", f_scale=0.1, full_output=True)
    assert bool(res.success.all())
    assert len(columns) <= int(res.nfev.max()) + 3, (len(columns), res.nfev.tolist())


def test_a_robust_loss_with_a_given_jac_evaluates_f_once_a_point():
    """J-hat's row factor needs f at each Jacobian's point, where the core evaluated f one call
    before: it is taken from there, not evaluated again (25 calls of fun for nfev 11 and njev
    10 when each Jacobian evaluated f again). The calls: nfev, the check of jac at x0 and the
    result's residuals; the fit itself is the same as before, bit for bit (both engines)."""
    t, y = _outliers()
    y = y[0]
    calls = []

    def fun(p):
        calls.append(1)
        return p[0] * torch.exp(-p[1] * t) + p[2] - y

    def jac(p):
        e = torch.exp(-p[1] * t)
        return torch.stack([e, -p[0] * t * e, torch.ones_like(e)], -1)

    res = least_squares(fun, [1.0, 1.0, 0.0], jac=jac, loss="soft_l1", f_scale=0.1)
    assert res.success and res.njev > 5
    assert len(calls) <= res.nfev + 5, (len(calls), res.nfev, res.njev)
    ref = least_squares(fun, [1.0, 1.0, 0.0], loss="soft_l1", f_scale=0.1)  # autograd's J-hat
    torch.testing.assert_close(res.x, ref.x, rtol=1e-10, atol=1e-12)

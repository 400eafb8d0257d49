"""Bounds on the parameters of least_squares and curve_fit (steepest.fit.bounds) against
scipy's bounded fits (``trf``) and against the unbounded fits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reference import DEVICES, seeded
from scipy import optimize as sopt
from torch.autograd.functional import jacobian

from steepest.errors import ConfigurationError, NonFiniteError, ShapeError
from steepest.fit import curve_fit, least_squares

D = torch.float64
INF = math.inf
T = torch.linspace(0, 4, 30, dtype=D)
Y = 2 * torch.exp(-1.3 * T) + 0.5 + 0.01 * torch.randn(30, generator=seeded(0), dtype=D)


def _fun(p):
    return p[0] * torch.exp(-p[1] * T) + p[2] - Y


def _fun_np(p):
    return p[0] * np.exp(-p[1] * T.numpy()) + p[2] - Y.numpy()


def _decay(x, a, b, c):
    return a * torch.exp(-b * x) + c


def _decay_np(x, a, b, c):
    return a * np.exp(-b * x) + c


def _scipy_trf(lb, ub, x0=(1.5, 1.6, 0.1)):
    tight = {"ftol": 1e-15, "xtol": 1e-15, "gtol": 1e-15, "max_nfev": 10_000}
    return sopt.least_squares(_fun_np, x0, bounds=(lb, ub), method="trf", **tight)


@pytest.mark.parametrize(
    "lb,ub,x0",
    [
        ([0, 0, 0], [10, 10, 10], [1.5, 1.1, 0.61]),  # inactive
        ([-INF, 0, -INF], [INF, INF, 0.3], [1.5, 1.1, 0.2]),  # c on its upper bound
        ([0, 1.5, 0], [INF, INF, INF], [1.5, 1.6, 0.1]),  # b on its lower bound
        ([1.0, -INF, 0.6], [2.0, 1.2, INF], [1.5, 1.1, 0.61]),  # a interior, b up, c down
    ],
)
def test_bounded_least_squares_matches_scipy_trf(lb, ub, x0):
    """The minimum of the box-constrained problem is scipy's trf's (tight tolerances) to 1e-7,
    the same bounds bind (active_mask), the projected-gradient optimality is small, every
    evaluation lies in the box, and where no bound binds the fit is the unbounded one."""
    seen = []

    def fun(p):
        seen.append(p.detach().clone())
        return _fun(p)

    res = least_squares(fun, x0, bounds=(lb, ub))
    ref = _scipy_trf(lb, ub, x0)
    assert res.success
    torch.testing.assert_close(res.x, torch.tensor(ref.x), rtol=1e-7, atol=1e-9)
    assert res.active_mask.tolist() == ref.active_mask.tolist()
    assert res.optimality < 1e-6
    pts = torch.stack([s for s in seen if s.ndim == 1])
    lo, hi = torch.tensor(lb, dtype=D), torch.tensor(ub, dtype=D)
    assert bool(((pts >= lo) & (pts <= hi)).all())
    # x, jac and grad in x: jac is the Jacobian of fun at x
    torch.testing.assert_close(res.jac, jacobian(_fun, res.x), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(res.grad, res.jac.T @ res.fun, rtol=1e-12, atol=1e-14)
    if not any(res.active_mask.tolist()):
        free = least_squares(_fun, [1.5, 1.1, 0.61])
        torch.testing.assert_close(res.x, free.x, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("method", ["levenberg-marquardt", "gauss-newton"])
def test_other_methods_reach_the_same_bounded_minimum(method):
    lb, ub = [-INF, 0, -INF], [INF, INF, 0.3]
    res = least_squares(_fun, [1.5, 1.6, 0.1], bounds=(lb, ub), method=method)
    ref = _scipy_trf(lb, ub)
    torch.testing.assert_close(res.x, torch.tensor(ref.x), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(
    "x0",
    [
        [0.0, 1.6, 0.1],
        [1e-10, 1.6, 0.1],
        [1e-6, 1.6, 0.1],
        [1e-3, 1.6, 0.1],
        [1.0, 0.0, 0.0],
        [1.0, 1e-3, 0.0],
        [0.01, 0.01, 0.01],
    ],
)
def test_starts_on_or_near_a_bound_reach_the_interior_minimum(x0):
    """lb = 0 on all three parameters, the minimum inside: from starts on a bound or 1e-10 to
    1e-3 from it, the fit reaches the unbounded minimum, as scipy's trf does from all of them
    (the unbounded fit from 1e-10 and 1e-6 stays put or runs off to 1e5, and a change of
    variables x = q^2-like, tried first, fell into the b -> inf valley or stayed on the bound
    from 4 of these starts)."""
    free = least_squares(_fun, [1.5, 1.6, 0.1])
    res = least_squares(_fun, x0, bounds=(0, INF))
    ref = sopt.least_squares(_fun_np, x0, bounds=(0, INF), method="trf")
    assert res.success and res.active_mask.abs().sum() == 0
    torch.testing.assert_close(res.x, free.x, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(res.x, torch.tensor(ref.x), rtol=1e-6, atol=1e-8)
    assert res.nfev <= 2 * ref.nfev + 5, (res.nfev, ref.nfev)


def test_given_jac_gives_the_autograd_fit():
    """A jac given with bounds: the same path as autograd's Jacobian, evaluation for
    evaluation."""
    lb, ub = [1.0, -INF, 0.6], [2.0, 1.2, INF]
    auto = least_squares(_fun, [1.5, 1.1, 0.61], bounds=(lb, ub))
    given = least_squares(_fun, [1.5, 1.1, 0.61], bounds=(lb, ub), jac=torch.func.jacrev(_fun))
    torch.testing.assert_close(given.x, auto.x, rtol=1e-12, atol=1e-14)
    assert (given.nfev, given.njev) == (auto.nfev, auto.njev)


def test_checks_at_x0_on_a_bound_are_one_sided():
    """x0 on its bounds (b = 1.3 on its lower bound, c = 0.5 on its upper one): the check of a
    given jac and the unseen-parameter check difference fun only inside the box, and still
    tell: a right jac is silent, a column of the wrong sign is named, a parameter that autograd
    cannot see (``float(p[2])``) is named; fun is never asked outside the box."""
    import warnings

    from steepest.errors import SteepestWarning

    lb, ub = [0.0, 1.3, -INF], [INF, INF, 0.5]
    x0 = [2.0, 1.3, 0.5]
    seen = []

    def fun(p):
        seen.append(p.detach().clone())
        return _fun(p)

    with warnings.catch_warnings():
        warnings.simplefilter("error", SteepestWarning)
        least_squares(fun, x0, bounds=(lb, ub), jac=torch.func.jacrev(_fun))
    flip = torch.tensor([1.0, -1.0, 1.0], dtype=D)
    with pytest.warns(SteepestWarning, match=r"jac disagrees .* in the columns \[1\]"):
        least_squares(fun, x0, bounds=(lb, ub), jac=lambda p: torch.func.jacrev(_fun)(p) * flip)

    def cut(p):  # float() cuts autograd's graph: c's column is exactly 0
        seen.append(p.detach().clone())
        return p[0] * torch.exp(-p[1] * T) + float(p[2]) - Y

    with pytest.warns(SteepestWarning, match=r"parameter"):
        least_squares(cut, x0, bounds=(lb, ub))
    pts = torch.stack(seen)
    assert bool((pts[:, 1] >= 1.3).all()) and bool((pts[:, 2] <= 0.5).all())


def test_batched_bounds_per_problem_equal_separate_fits():
    """Bounds per problem (B, P), a batch through vectorize=True and through curve_fit: each
    row equals its own fit."""
    lb = torch.tensor([[-INF, 0, -INF], [0, 1.5, 0], [1.0, -INF, 0.6]], dtype=D)
    ub = torch.tensor([[INF, INF, 0.3], [INF, INF, INF], [2.0, 1.2, INF]], dtype=D)
    x0 = torch.tensor([[1.5, 1.6, 0.1], [1.5, 1.6, 0.1], [1.5, 1.1, 0.61]], dtype=D)
    res = least_squares(_fun, x0, bounds=(lb, ub), vectorize=True)
    popt, pcov = curve_fit(_decay, T, Y.expand(3, 30), x0, bounds=(lb, ub))
    for i in range(3):
        one = least_squares(_fun, x0[i], bounds=(lb[i], ub[i]))
        torch.testing.assert_close(res.x[i], one.x, rtol=1e-10, atol=1e-12)
        assert res.active_mask[i].tolist() == one.active_mask.tolist()
        p1, c1 = curve_fit(_decay, T, Y, x0[i], bounds=(lb[i], ub[i]))
        torch.testing.assert_close(popt[i], p1, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(pcov[i], c1, rtol=1e-7, atol=1e-14)


@pytest.mark.parametrize("sigma", [None, "s"])
def test_bounded_curve_fit_matches_scipy_s(sigma):
    """popt and pcov of a bounded curve_fit equal scipy's curve_fit(bounds=) (trf, tight
    tolerances): pcov from the Jacobian in p at popt, bounds or not."""
    s = 0.01 + 0.02 * torch.rand(30, generator=seeded(2), dtype=D) if sigma else None
    lb, ub = [0.0, 1.5, 0.0], [INF, INF, 1.0]
    popt, pcov = curve_fit(_decay, T, Y, [1.0, 1.6, 0.1], sigma=s, bounds=(lb, ub))
    ref_p, ref_c = sopt.curve_fit(
        _decay_np,
        T.numpy(),
        Y.numpy(),
        [1.0, 1.6, 0.1],
        sigma=None if s is None else s.numpy(),
        bounds=(lb, ub),
        ftol=1e-15,
        xtol=1e-15,
        gtol=1e-15,
    )
    torch.testing.assert_close(popt, torch.tensor(ref_p), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(pcov, torch.tensor(ref_c), rtol=1e-5, atol=1e-14)


def test_bad_bounds_are_refused_before_fun_is_evaluated():
    calls = []

    def fun(p):
        calls.append(1)
        return _fun(p)

    cases = [
        ((0, 10), ConfigurationError, None),  # fine: control
        (([0, 0, 0.2], INF), ConfigurationError, "x0 is infeasible: x0\\[2\\] = 0.1"),
        (([0, 2, 0], [1, 1, 1]), ConfigurationError, "lb >= ub at 1"),
        (([0, 0], INF), ShapeError, "bounds' lb has shape \\(2,\\)"),
        (([0, float("nan"), 0], INF), NonFiniteError, "NaN"),
        ((0,), ConfigurationError, "a pair \\(lb, ub\\)"),
    ]
    for bounds, err, match in cases:
        calls.clear()
        if match is None:
            least_squares(fun, [1.5, 1.6, 0.1], bounds=bounds)
            assert calls
            continue
        with pytest.raises(err, match=match):
            least_squares(fun, [1.5, 1.6, 0.1], bounds=bounds)
        assert not calls
    with pytest.raises(ConfigurationError, match="x0 is infeasible"):
        curve_fit(_decay, T, Y, [1.0, 1.6, -0.1], bounds=(0, INF))


def test_a_large_batch_with_bounds_equals_separate_fits_and_probes_stay_in_the_box():
    """70 curves (the QR route of batches of at least 64) with c <= 0.3 binding on most:
    rows equal their separate fits; every call of f, the route probes of curve_fit included,
    sees parameters inside the box, from a start on the bound a = 0."""
    g = seeded(3)
    a = 1 + torch.rand(70, 1, generator=g, dtype=D)
    b = 0.5 + torch.rand(70, 1, generator=g, dtype=D)
    c = torch.rand(70, 1, generator=g, dtype=D)
    y = a * torch.exp(-b * T) + c + 0.01 * torch.randn(70, 30, generator=g, dtype=D)
    lows = []

    def decay(x, a, b, c):
        try:
            lows.append((float(a.min()), float(c.max())))
        except RuntimeError:  # under vmap (the probes' reference, at the same points)
            pass
        return a * torch.exp(-b * x) + c

    p0 = torch.tensor([[0.0, 1.0, 0.0]] * 70, dtype=D)
    lb, ub = [0.0, -INF, -INF], [INF, INF, 0.3]
    popt, pcov, res = curve_fit(decay, T, y, p0, bounds=(lb, ub), full_output=True)
    assert bool(res.success.all())
    assert min(lo for lo, _ in lows) >= 0 and max(hi for _, hi in lows) <= 0.3
    assert int((res.active_mask[:, 2] == 1).sum()) > 30
    for i in (0, 7, 69):
        one, cov = curve_fit(_decay, T, y[i], p0[i], bounds=(lb, ub))
        torch.testing.assert_close(popt[i], one, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(pcov[i], cov, rtol=1e-6, atol=1e-14)


def test_review_cases_of_the_projection_reach_trf_s_minimum():
    """Found by a review of the first version: (1) trust-region let the radius grow after a
    rejected projected step that does not descend (MINPACK's shrink factor above 1/2) and
    cycled to max_nfev at x0 (Rosenbrock with x1 >= 1.5; a bounded decay raised
    ConvergenceError); (2) gauss-newton, from 1e-14 above a bound, clipped every halved step
    and stopped with 'success' (xtol) at a point 15.8 above the minimum. Both now reach
    trf's minimum."""

    def rosen(x):
        return torch.stack([10 * (x[1] - x[0] ** 2), 1 - x[0]])

    res = least_squares(rosen, [-1.2, 2.0], bounds=([-INF, 1.5], INF))
    assert res.success and res.nfev < 100
    torch.testing.assert_close(res.x, torch.tensor([-1.22103, 1.5], dtype=D), rtol=0, atol=1e-5)
    t = torch.linspace(0, 4, 30, dtype=D)
    y = 1.1 * (2.5 * torch.exp(-1.3 * t) + 0.5)
    lb, ub = [0.0, 0.0, -1.0], [3.0, 1.3, 0.3]
    popt, _ = curve_fit(_decay, t, y, [3.0, 0.0, 0.3], bounds=(lb, ub), ftol=1e-14, xtol=1e-14)
    tight = {"ftol": 1e-15, "xtol": 1e-15, "gtol": 1e-15}
    ref, _ = sopt.curve_fit(
        _decay_np, t.numpy(), y.numpy(), [3.0, 0.0, 0.3], bounds=(lb, ub), **tight
    )
    torch.testing.assert_close(popt, torch.tensor(ref), rtol=1e-7, atol=1e-9)
    a = torch.tensor(
        [
            [-0.69034765759017, -0.6569643630097021, 1.1038422775260375],
            [0.21248471505412922, 0.18789586320393187, -1.6894078432479247],
            [0.8133772228465739, 0.17014205668436075, 0.15670719948949033],
            [0.8441293042591376, 0.322253750991433, -0.026573949132331097],
        ],
        dtype=D,
    )
    b = torch.tensor(
        [1.2886169642917, -2.1551754068302613, -2.759143025732489, -4.130858049409679], dtype=D
    )
    x0 = [1e-14, 0.9888535724704282, -0.6619219906078346]
    box = ([0, -INF, -1], [INF, INF, 1])
    ref = sopt.least_squares(
        lambda x: a.numpy() @ x - b.numpy(),
        x0,
        bounds=box,
        method="trf",
        ftol=1e-15,
        xtol=1e-15,
        gtol=1e-15,
    )
    for method in ("gauss-newton", "trust-region", "levenberg-marquardt"):
        res = least_squares(lambda x: a @ x - b, x0, method=method, bounds=box)
        assert res.success
        assert abs(res.cost - ref.cost) <= 1e-10 * ref.cost, (method, res.cost, ref.cost)
        assert res.optimality < 1e-6


def test_odd_inputs_of_bounds():
    """A start on a bound where fun is even in that parameter gets no 'unseen parameter'
    warning (a one-sided difference is checked at h/10 too); bounds that require grad do not
    leak into x; non-numbers are a ConfigurationError; infinite bounds on every side are the
    unbounded fit, with scipy's all-zero active_mask."""
    import warnings as w

    from steepest.errors import SteepestWarning

    t = torch.linspace(0, 2, 10, dtype=D)
    with w.catch_warnings():
        w.simplefilter("error", SteepestWarning)
        least_squares(
            lambda x: x[0] ** 2 * torch.exp(-t) - 1e-3 * torch.exp(-t), [0.0], bounds=(0, INF)
        )
    res = least_squares(_fun, [1.5, 1.6, 0.1], bounds=(torch.zeros(3, requires_grad=True), 5))
    assert not res.x.requires_grad
    with pytest.raises(ConfigurationError, match="bounds' lb must be a number"):
        least_squares(_fun, [1.5, 1.6, 0.1], bounds=("a", 1))
    free = least_squares(_fun, [1.5, 1.6, 0.1])
    same = least_squares(_fun, [1.5, 1.6, 0.1], bounds=(-INF, INF))
    assert torch.equal(same.x, free.x) and same.nfev == free.nfev
    assert same.active_mask.tolist() == [0, 0, 0]


@pytest.mark.parametrize("device", DEVICES)
def test_bounded_batch_on_the_device_of_x0_equals_the_cpu_fit(device):
    """A bounded batch (bounds per problem) runs on x0's device, every tensor of the result
    there, and gives the CPU fit's result."""
    lb = torch.tensor([[-INF, 0, -INF], [0, 1.5, 0], [1.0, -INF, 0.6]], dtype=D)
    ub = torch.tensor([[INF, INF, 0.3], [INF, INF, INF], [2.0, 1.2, INF]], dtype=D)
    x0 = torch.tensor([[1.5, 1.6, 0.1], [1.5, 1.6, 0.1], [1.5, 1.1, 0.61]], dtype=D)
    ref = least_squares(_fun, x0, bounds=(lb, ub), vectorize=True)
    t, y = T.to(device), Y.to(device)

    def fun(p):
        return p[0] * torch.exp(-p[1] * t) + p[2] - y

    res = least_squares(fun, x0.to(device), bounds=(lb.to(device), ub.to(device)), vectorize=True)
    assert res.x.device.type == device and res.active_mask.device.type == device
    torch.testing.assert_close(res.x.cpu(), ref.x, rtol=1e-9, atol=1e-11)
    assert res.active_mask.cpu().tolist() == ref.active_mask.tolist()

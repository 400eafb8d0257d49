"""Tests of steepest.minimize (fit/newton.py, issue 12): Newton with a trust region
(Moré-Sorensen, Steihaug-CG) or LM damping and Table 1's identity row on a scalar function,
against scipy's trust-exact and dense autograd references. minimize has one engine (torch):
these tests are not run per least_squares engine, as test_fit.py's are."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reference import seeded
from scipy import optimize as sopt

import steepest
from steepest.errors import ConfigurationError, NonFiniteError, ShapeError
from steepest.fit import least_squares

D = torch.float64


def _rosen(x):
    return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2


def _freudenstein_roth(x):
    """Freudenstein and Roth's residuals (MGH problem 2): large residual, a local minimum with
    F = 24.49 from (0.5, -2)."""
    return torch.stack(
        [
            -13 + x[0] + ((5 - x[1]) * x[1] - 2) * x[1],
            -29 + x[0] + ((x[1] + 1) * x[1] - 14) * x[1],
        ]
    )


def _scipy_trust_exact(f, x0):
    fs = lambda x: float(f(torch.tensor(x)))  # noqa: E731
    gs = lambda x: torch.func.grad(f)(torch.tensor(x)).numpy()  # noqa: E731
    hs = lambda x: torch.func.hessian(f)(torch.tensor(x)).numpy()  # noqa: E731
    return sopt.minimize(
        fs, np.asarray(x0), jac=gs, hess=hs, method="trust-exact", options={"gtol": 1e-8}
    )


@pytest.mark.parametrize("name", ["rosenbrock", "double-well"])
def test_minimize_trust_exact_matches_scipy(name):
    f, x0 = {
        "rosenbrock": (_rosen, [-1.2, 1.0]),
        "double-well": (
            lambda x: (x[0] ** 2 - 1) ** 2 + x[1] ** 2 + 0.1 * x[0] * x[1],
            [0.05, 1.0],
        ),
    }[name]  # starts where H is indefinite
    ref = _scipy_trust_exact(f, x0)
    # scipy's radius rule from scipy's radius: the same iterates
    res = steepest.minimize(f, x0, initial_trust_radius=1.0, max_trust_radius=1000.0)
    assert res.success and ref.success
    torch.testing.assert_close(res.x, torch.tensor(ref.x), rtol=1e-7, atol=1e-9)
    assert (res.nit, res.nfev) == (ref.nit, ref.nfev)
    assert res.fun == pytest.approx(ref.fun, abs=1e-14)
    # gradient and Hessian against dense autograd references
    torch.testing.assert_close(res.jac, torch.autograd.functional.jacobian(f, res.x))
    torch.testing.assert_close(res.hess, torch.autograd.functional.hessian(f, res.x))
    # the default (scale-free radius) and the other methods reach the same minimum
    for method in ("trust-exact", "trust-ncg", "newton-lm"):
        other = steepest.minimize(f, x0, method=method)
        assert other.success, (method, other.message)
        torch.testing.assert_close(other.x, res.x, rtol=1e-6, atol=1e-7)
        assert other.nfev == other.nit + 1  # F at an accepted point is never evaluated again


def test_minimize_radius_is_scale_free():
    """1e16 x^2 and 1e-4 x^2 from x = 1: one Newton step each (an absolute radius of 1 and
    a cap of 1e3 would not change that here, but a cap in the metric norm did: issue 12)."""
    for a in (1e16, 1e-4):
        for method in ("trust-exact", "trust-ncg"):
            res = steepest.minimize(lambda x, a=a: a * x[0] ** 2, [1.0], method=method)
            assert res.success and res.nit == 1 and float(res.x.abs()) < 1e-12, (a, method)
    res = steepest.minimize(lambda x: 1e-4 * (x[0] - 1e6) ** 2, [0.0])
    assert res.nit == 1 and float(res.x) == pytest.approx(1e6)


def test_minimize_gradient_descent_is_table_1_s_identity_row():
    """M = I: d = -eps g / ||g|| in a trust radius driven by rho against the linear model. On a
    quadratic with condition number 10 it reaches A^-1 b (gtol), forms no Hessian (one
    Hessian-vector product for the first radius), and is scale-free: F and 1e6 F take the same
    iterations (gtol scaled with F)."""
    g = seeded(5)
    q, _ = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=D))
    a = q @ torch.diag(torch.linspace(1, 10, 10, dtype=D)) @ q.T
    b = torch.randn(10, generator=g, dtype=D)
    want = torch.linalg.solve(a, b)
    runs = []
    for scale in (1.0, 1e6):
        res = steepest.minimize(
            lambda x, s=scale: s * (0.5 * x @ a @ x - b @ x),
            torch.zeros(10, dtype=D),
            method="gradient-descent",
            gtol=1e-6 * scale,
        )
        assert res.success and res.status == 0 and "hess" not in res
        assert float(res.jac.norm()) < 1e-6 * scale and res.nhev == 1
        torch.testing.assert_close(res.x, want, rtol=0, atol=1e-5)
        runs.append((res.nit, res.nfev))
    assert runs[0] == runs[1] and runs[0][0] > 10  # linear convergence: many steps, both scales
    first = steepest.minimize(
        lambda x: 0.5 * x @ a @ x - b @ x, torch.zeros(10, dtype=D), "gradient-descent", maxiter=1
    )
    # the first step: along -g (g = -b at 0), of the Cauchy length ||g||^3 / (g^T A g)
    cauchy = b.norm() ** 3 / (b @ a @ b)
    torch.testing.assert_close(first.x, cauchy * b / b.norm())


def test_least_squares_hessian_row_through_minimize():
    """The Hessian row for 1/2 ||f||^2 (J^T J + sum f_i grad^2 f_i, what least_squares'
    Gauss-Newton leaves out) is minimize(..., "trust-exact") on the sum of squares, as the
    least_squares docstring says: on a large-residual problem it reaches the same minimum as
    MINPACK's Gauss-Newton trust region, in fewer iterations (Newton converges quadratically,
    Gauss-Newton only linearly when the residual is large)."""
    fun, x0 = _freudenstein_roth, [0.5, -2.0]
    gn = least_squares(fun, x0)
    newton = steepest.minimize(
        lambda x: 0.5 * fun(x).square().sum(), torch.tensor(x0, dtype=D), gtol=1e-8
    )
    assert newton.success
    torch.testing.assert_close(newton.x, gn.x, rtol=1e-7, atol=1e-7)
    assert newton.fun == pytest.approx(gn.cost, rel=1e-12)
    assert newton.nit < gn.nit, (newton.nit, gn.nit)


def test_minimize_newton_lm_on_an_indefinite_hessian_does_not_livelock():
    """x^4 - 1e7 x^2 from x = 1e-3: H + lambda I indefinite; lambda jumps above the lowest
    eigenvalue instead of failing Cholesky forever."""
    res = steepest.minimize(lambda x: x[0] ** 4 - 1e7 * x[0] ** 2, [1e-3], method="newton-lm")
    assert res.status in (0, 2) and res.nit < 60
    # F = -2.5e13 there: its rounding (10 eps |F|) allows x to about 1e-9 relative
    assert float(res.x.abs()) == pytest.approx(math.sqrt(5e6), rel=1e-8)


def test_minimize_errors():
    with pytest.raises(ShapeError, match="scalar"):
        steepest.minimize(lambda x: x**2, [1.0, 2.0])
    with pytest.raises(ConfigurationError, match="gradient-descent"):
        steepest.minimize(_rosen, [1.0, 2.0], method="bfgs")
    with pytest.raises(NonFiniteError):
        steepest.minimize(lambda x: torch.log(x[0]), [-1.0])


@pytest.mark.parametrize("method", ["trust-exact", "trust-ncg", "newton-lm", "gradient-descent"])
def test_minimize_does_not_depend_on_the_scale_of_f(method):
    """F times s: the same steps (g^T g, the CG products and ||g|| overflowed from F ~ 1e154:
    trust-exact and trust-ncg stopped after one step with status 2). A power of two outside
    [2^-128, 2^128]: bit for bit (trust-ncg: scipy's CG tolerance is not scale-free, the same
    minimum); a power of ten: the same minimum. gtol is absolute, as scipy's: scaled with F
    here. fun, jac and hess of the result are in the user's units."""

    def rosen(x):
        return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2

    x0 = torch.tensor([-1.2, 1.0], dtype=D)
    maxiter = 400 if method != "gradient-descent" else 60  # (GD: linear, compare the path)
    ref = steepest.minimize(rosen, x0, method=method, maxiter=maxiter)
    for s in (2.0**-700, 2.0**600):
        res = steepest.minimize(
            lambda x, s=s: s * rosen(x), x0, method=method, gtol=1e-8 * s, maxiter=maxiter
        )
        if method == "trust-ncg":  # scipy's CG forcing term min(1/2, sqrt||g||) ||g|| is not
            # scale-invariant: another path to the same minimum
            assert res.success and float((res.x - 1).abs().max()) < 1e-6, s
            continue
        assert torch.equal(res.x, ref.x) and res.nit == ref.nit and res.status == ref.status, s
        assert res.fun == ref.fun * s and torch.equal(res.jac, ref.jac * s)
        if "hess" in ref:
            assert torch.equal(res.hess, ref.hess * s)
    if method != "gradient-descent":
        for s in (1e-200, 1e200, 1e300):
            res = steepest.minimize(lambda x, s=s: s * rosen(x), x0, method=method, gtol=1e-8 * s)
            assert res.success, (s, res.message)
            torch.testing.assert_close(res.x, torch.ones(2, dtype=D), rtol=0, atol=1e-6)

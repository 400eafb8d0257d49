"""Tests of steepest.fit (issue 12): least_squares, curve_fit and batched fits against scipy."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from reference import DEVICES, seeded
from scipy import optimize as sopt
from torch.autograd.functional import jacobian

import steepest
from steepest.errors import ConfigurationError, ConvergenceError, NonFiniteError, ShapeError
from steepest.fit import curve_fit, least_squares

D = torch.float64


#: a test of this file that runs on the torch core alone: a helper's unit test, an input check
#: raised before any fit, or fits the compiled core does not take (bounds, float32)
torch_core = pytest.mark.torch_core


def pytest_generate_tests(metafunc):
    """Each test on both engines (see :func:`engine`), one marked :data:`torch_core` on the
    torch core alone (its "numba" run would repeat the "torch" one under another name)."""
    one = metafunc.definition.get_closest_marker("torch_core") is not None
    metafunc.parametrize("engine", ["torch"] if one else ["torch", "numba"], indirect=True)


@pytest.fixture(autouse=True)
def engine(request, monkeypatch):
    """Every test of this file runs on both engines of least_squares: the torch core, and the
    compiled core (engine="auto" made to take numba from one fit, where it can run: float64 on
    the CPU, no bounds, M >= P; the torch core elsewhere). A "numba" run that passes must have
    reached the compiled core at least once: where it did not, the test fails at teardown and
    asks for the :data:`torch_core` mark."""
    ran = []
    callspec = getattr(request.node, "callspec", None)
    if request.param == "numba" and callspec and callspec.params.get("device") == "cuda":
        pytest.skip("the compiled core runs on the CPU: the [torch-cuda] run is this test")
    if request.param == "numba":
        assert steepest.fit.compiled.available(), steepest.fit.compiled._import_error()
        monkeypatch.setattr(steepest.fit.compiled, "AUTO_MIN_BATCH", 1)
        core = steepest.fit.compiled._least_squares_compiled

        def counted(*args, **kwargs):
            ran.append(True)
            return core(*args, **kwargs)

        monkeypatch.setattr(steepest.fit.compiled, "_least_squares_compiled", counted)
    yield request.param
    done = getattr(request.node, "rep_call", None)  # a test that failed or skipped: as it is
    if request.param == "numba" and not ran and done is not None and done.passed:
        pytest.fail(
            "this test's numba run never reached the compiled core: it repeats the torch run; "
            "mark the test @torch_core, or give it a fit that the compiled core takes"
        )


T = torch.linspace(0, 4, 30, dtype=D)
Y = 2 * torch.exp(-1.3 * T) + 0.5 + 0.01 * torch.randn(30, generator=seeded(0), dtype=D)
TI = torch.arange(1, 11, dtype=D) * 0.1
I10 = torch.arange(1, 11, dtype=D)
XM = torch.linspace(77.6, 789.7, 14, dtype=D)  # Misra1a's range: y = b1 (1 - exp(-b2 x))
YM = 238.9 * (1 - torch.exp(-5.5e-4 * XM)) + 0.1 * torch.randn(14, generator=seeded(1), dtype=D)

# classic test problems (Moré, Garbow and Hillstrom 1981) and a small exponential fit
PROBLEMS = {
    "rosenbrock": (lambda x: torch.stack([10 * (x[1] - x[0] ** 2), 1 - x[0]]), [-1.2, 1.0]),
    "expfit": (lambda p: p[0] * torch.exp(-p[1] * T) + p[2] - Y, [1.0, 1.0, 0.0]),
    "freudenstein-roth": (  # large residual: a local minimum with F = 24.49
        lambda x: torch.stack(
            [
                -13 + x[0] + ((5 - x[1]) * x[1] - 2) * x[1],
                -29 + x[0] + ((x[1] + 1) * x[1] - 14) * x[1],
            ]
        ),
        [0.5, -2.0],
    ),
    "powell-singular": (  # zero residual at x* = 0, singular J there
        lambda x: torch.stack(
            [
                x[0] + 10 * x[1],
                math.sqrt(5) * (x[2] - x[3]),
                (x[1] - 2 * x[2]) ** 2,
                math.sqrt(10) * (x[0] - x[3]) ** 2,
            ]
        ),
        [3.0, -1.0, 0.0, 1.0],
    ),
    "box3d": (
        lambda x: (
            torch.exp(-TI * x[0])
            - torch.exp(-TI * x[1])
            - x[2] * (torch.exp(-TI) - torch.exp(-10 * TI))
        ),
        [0.0, 10.0, 20.0],
    ),
    "beale": (
        lambda x: torch.stack(
            [1.5 - x[0] * (1 - x[1]), 2.25 - x[0] * (1 - x[1] ** 2), 2.625 - x[0] * (1 - x[1] ** 3)]
        ),
        [1.0, 1.0],
    ),
    "brown-dennis": (  # large residual, F = 4.3e4 at the minimum
        lambda x: (
            (x[0] + 0.4 * I10 * x[1] - torch.exp(0.4 * I10)) ** 2
            + (x[2] + x[3] * torch.sin(0.4 * I10) - torch.cos(0.4 * I10)) ** 2
        ),
        [25.0, 5.0, -5.0, -1.0],
    ),
    # lambda warm-started from the previous step (MINPACK's lmpar): 19 evaluations as
    # MINPACK; solved afresh from 0 to 1 % each step, 22
    "misra": (lambda b: b[0] * (1 - torch.exp(-b[1] * XM)) - YM, [500.0, 1e-4]),
}


def scipy_lm(fun, x0, **kw):
    jf = torch.func.jacrev(fun)
    return sopt.least_squares(
        lambda x: fun(torch.tensor(x)).numpy(),
        np.asarray(x0),
        jac=lambda x: jf(torch.tensor(x)).numpy(),
        method="lm",
        **kw,
    )


def scipy_tol(x0) -> dict:
    """scipy's ``least_squares(method="lm")`` defaults (least_squares' own are tighter)."""
    return {"ftol": 1e-8, "xtol": 1e-8, "gtol": 1e-8, "max_nfev": 100 * len(x0)}


# ---------------------------------------------------------------------------- least_squares
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_agrees_with_scipy_lm_and_counts_no_more_evaluations(name):
    fun, x0 = PROBLEMS[name]
    res = least_squares(fun, x0, **scipy_tol(x0))
    ref = scipy_lm(fun, x0)
    assert res.success and ref.success
    assert res.cost == pytest.approx(ref.cost, rel=1e-6, abs=1e-20)
    scale = max(1.0, float(np.abs(ref.x).max()))
    # large residuals: both stop on ftol = 1e-8 in F, about 4 digits of x
    tol = 1e-3 if name in ("brown-dennis", "freudenstein-roth") else 1e-6
    assert float((res.x - torch.tensor(ref.x)).abs().max()) <= tol * scale
    # MINPACK's lm (scipy) on the same problem and tolerances: no more evaluations (the same
    # path up to rounding; fewer on Powell's singular function, stopped by the residual floor)
    assert res.nfev <= ref.nfev, (res.nfev, ref.nfev)
    assert res.njev <= res.nfev and res.nit <= res.njev
    # the result's derived fields, against a dense Jacobian built by torch.autograd.functional
    j = jacobian(fun, res.x)
    torch.testing.assert_close(res.jac, j, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res.fun, fun(res.x))
    # J^T f near a minimum is a sum that cancels: its rounding is ~M eps |J|^T |f|, not eps |J^T f|
    f = fun(res.x)
    bound = 1e-12 + 10 * len(f) * 2.2e-16 * (j.abs().T @ f.abs())
    assert bool(((res.grad - j.T @ f).abs() <= bound).all()), (res.grad, j.T @ f)
    assert res.cost == pytest.approx(0.5 * float(fun(res.x).pow(2).sum()), rel=1e-12, abs=1e-30)
    assert res.optimality == pytest.approx(float(res.grad.abs().max()), abs=1e-30)
    assert res.message == steepest.fit.MESSAGES[res.status]


@torch_core
@pytest.mark.parametrize("m", [6, 2])  # full rank, and fewer residuals than parameters
def test_lmpar_meets_the_radius_against_a_dense_solve(m):
    """MINPACK's lmpar in SVD coordinates: the step -(J^T J + lambda D^2)^-1 J^T f solved
    densely with the returned lambda has ||D delta|| within 10 % of Delta, or lambda = 0 when
    the Gauss-Newton step fits in 1.1 Delta; warm starts far off on either side give the same
    accuracy."""
    from steepest.fit import _factor, _lmpar

    g = seeded(3)
    b, p = 6, 3
    jac = torch.randn(b, m, p, generator=g, dtype=D) * torch.tensor([1.0, 1e-3, 1e3], dtype=D)
    f = torch.randn(b, m, generator=g, dtype=D)
    d = jac.norm(dim=1)
    a = jac / d.unsqueeze(1)  # J D^-1; u = D delta, the least-norm solution below
    gn = torch.linalg.lstsq(a, -f.unsqueeze(-1), driver="gelsd").solution.squeeze(-1)
    gn_norm = gn.norm(dim=-1)
    fac = _factor(a, f, 0.0)
    radius = gn_norm * torch.tensor([2.0, 1.05, 0.5, 0.1, 1e-3, 1e-6], dtype=D)
    active = torch.ones(b, dtype=torch.bool)
    for par0 in (
        torch.zeros(b, dtype=D),
        torch.full((b,), 1e6, dtype=D),
        torch.full((b,), 1e-9, dtype=D),
    ):
        lam, w = _lmpar(fac, radius, par0, active)
        assert bool((lam >= 0).all())
        # the returned w is the step at the returned lambda: D delta = V w
        torch.testing.assert_close(w, fac.c / (fac.mu + lam[:, None]))
        # [J D^-1; sqrt(lambda) I] u = [-f; 0] in the least-squares sense (dense, gelsd)
        aug = torch.cat([a, lam.sqrt()[:, None, None] * torch.eye(p, dtype=D)], 1)
        rhs = torch.cat([-f, torch.zeros(b, p, dtype=D)], 1).unsqueeze(-1)
        u = torch.linalg.lstsq(aug, rhs, driver="gelsd").solution.squeeze(-1)
        dn = u.norm(dim=-1)
        fits = gn_norm <= 1.1 * radius
        assert bool((lam[fits] == 0).all())
        torch.testing.assert_close(dn[fits], gn_norm[fits])
        rel = (dn[~fits] - radius[~fits]).abs() / radius[~fits]
        assert bool((rel <= 0.1 + 1e-9).all()), rel
    # a fit that is not active gets lambda = 0
    lam, w = _lmpar(fac, radius, torch.ones(b, dtype=D), torch.zeros(b, dtype=torch.bool))
    assert bool((lam == 0).all())
    torch.testing.assert_close(w, fac.gn)


def test_zero_residual_at_zero_stops_on_its_own():
    """x* = 0 with a singular Jacobian: a relative xtol never fires, the residual floor does
    (scipy's lm runs to max_nfev here)."""
    res = least_squares(lambda x: x**2, [1.0, -2.0])
    assert res.success and res.status == 2 and res.nfev < 60
    assert float(res.x.abs().max()) < 1e-7
    ref = scipy_lm(lambda x: x**2, [1.0, -2.0])
    assert ref.status == 0  # MINPACK: max_nfev (shows the defect this rule fixes)


def test_zero_residual_nonzero_optimum_is_exact():
    res = least_squares(PROBLEMS["rosenbrock"][0], [-1.2, 1.0])
    torch.testing.assert_close(res.x, torch.ones(2, dtype=D), rtol=0, atol=1e-12)


def test_rank_deficient_jacobian_reaches_the_least_squares_minimum():
    """J = [[1, 1, 0], [2, 2, 0], [0, 0, 1]] has rank 2: the minimum (F = 0.1 at x_0 + x_1 =
    1.4, x_2 = 1) is a line; every method reaches it, and Gauss-Newton's least-norm step lands
    on the minimum-norm point (0.7, 0.7, 1) from 0."""
    fun = lambda x: torch.stack([x[0] + x[1] - 1, 2 * (x[0] + x[1]) - 3, x[2] - 1])  # noqa: E731
    for method in steepest.fit.METHODS:
        res = least_squares(fun, [0.0, 0.0, 0.0], method=method)
        assert res.success, method
        assert res.cost == pytest.approx(0.1, rel=1e-10), method
        assert res.optimality < 1e-7  # LM stops on ftol: F within 1e-8 relative
    res = least_squares(fun, [0.0, 0.0, 0.0], method="gauss-newton")
    torch.testing.assert_close(res.x, torch.tensor([0.7, 0.7, 1.0], dtype=D))


def test_large_residual_stops_on_ftol():
    res = least_squares(*PROBLEMS["freudenstein-roth"])
    assert res.status in (2, 4) and res.cost > 20


def test_defaults_give_more_digits_than_scipy_s_tolerances():
    """least_squares' defaults (ftol = 1e-14, max_nfev = 300 P; scipy's 1e-8 and 100 P): on a
    large-residual problem F is flat to second order at x*, so scipy's ftol = 1e-8 stops with
    ~4 digits of x (2.6e-5 off); the defaults give x* to ~1e-9 (x* from scipy run to 1e-15).
    Where the defaults stop is rounding noise: F there is flat within an ulp, and from 40
    starts x0 (1 + k 1e-15) x is 1.7e-9 (torch core) and 2.3e-9 (compiled) off in the median,
    1.13e-8 at most, in both engines (hence 3e-8, not 1e-8)."""
    fun, x0 = PROBLEMS["freudenstein-roth"]
    best = scipy_lm(fun, x0, ftol=1e-15, xtol=1e-15, gtol=1e-15).x
    ours = least_squares(fun, x0)
    err = float((ours.x - torch.tensor(best)).abs().max() / np.abs(best).max())
    scipy_err = float(np.abs(scipy_lm(fun, x0).x - best).max() / np.abs(best).max())
    assert ours.success and err < 3e-8 and scipy_err > 1e-6, (err, scipy_err)


def test_default_max_nfev_is_300_p():
    """Curve 341 crawls into the valley b -> 0 and never converges: with the defaults the fit
    ends after 300 P = 900 evaluations (scipy's lm: 100 P)."""
    t, y = _decay_curve(341)
    res = least_squares(lambda p: _decay(t, *p) - y, [1.0, 1.0, 0.0])
    assert res.status == 0 and res.nfev == 900


def test_max_nfev_is_respected_and_reported():
    res = least_squares(*PROBLEMS["rosenbrock"], max_nfev=4)
    assert res.nfev == 4 and res.status == 0 and not res.success
    assert "maximum number of function evaluations" in res.message


@pytest.mark.parametrize("method", ["levenberg-marquardt", "gauss-newton"])
def test_other_methods_reach_the_same_minimum(method):
    fun, x0 = PROBLEMS["expfit"]
    ref = least_squares(fun, x0)
    res = least_squares(fun, x0, method=method)
    assert res.success and res.method == method
    torch.testing.assert_close(res.x, ref.x, rtol=1e-7, atol=0)


def test_lm_is_an_alias_and_jac_callable_gives_the_same_fit():
    fun, x0 = PROBLEMS["beale"]
    a = least_squares(fun, x0, method="lm")
    b = least_squares(fun, x0, jac=torch.func.jacrev(fun))
    c = least_squares(fun, x0, jac="jacrev")
    assert a.method == "trust-region"
    torch.testing.assert_close(a.x, b.x, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(a.x, c.x, rtol=1e-12, atol=1e-14)
    assert a.nfev == b.nfev == c.nfev


def test_weights_equal_scaled_residuals():
    w = torch.rand(30, generator=seeded(1), dtype=D) + 0.5
    fun, x0 = PROBLEMS["expfit"]
    a = least_squares(fun, x0, weights=w)
    b = least_squares(lambda p: fun(p) * w.sqrt(), x0)
    torch.testing.assert_close(a.x, b.x, rtol=1e-12, atol=0)
    assert a.cost == pytest.approx(b.cost, rel=1e-12)
    torch.testing.assert_close(a.jac, b.jac)


def test_float32_follows_x0():
    fun = lambda p: p[0] * torch.exp(-p[1] * T.float()) + p[2] - Y.float()  # noqa: E731
    res = least_squares(fun, torch.tensor([1.0, 1.0, 0.0]))
    assert res.x.dtype == torch.float32 and res.success
    torch.testing.assert_close(
        res.x.double(), least_squares(*PROBLEMS["expfit"]).x, rtol=1e-4, atol=1e-4
    )


# ---------------------------------------------------------------------------- bad input
@torch_core
def test_errors_name_the_problem():
    fun, x0 = PROBLEMS["expfit"]
    with pytest.raises(NonFiniteError, match="not finite at x0"):
        least_squares(lambda p: torch.log(p[0] - 2) * T, [1.0, 1.0])
    with pytest.raises(NonFiniteError, match="x0"):
        least_squares(fun, [math.nan, 1.0, 0.0])
    with pytest.raises(ShapeError, match="scalar") as e:
        least_squares(lambda p: fun(p).pow(2).sum(), x0)
    assert "steepest.minimize" in str(e.value) and isinstance(e.value, ValueError)
    with pytest.raises(ShapeError, match="flat residual vector"):
        least_squares(lambda p: fun(p).reshape(3, 10), x0)
    with pytest.raises(ShapeError, match="weights"):
        least_squares(fun, x0, weights=torch.ones(29, dtype=D))
    with pytest.raises(ShapeError, match="jac returned"):
        least_squares(fun, x0, jac=lambda p: torch.zeros(3, 30, dtype=D))
    with pytest.raises(ConfigurationError, match="bounds"):
        least_squares(fun, x0, method="trf")
    with pytest.raises(ConfigurationError, match="ftol"):
        least_squares(fun, x0, ftol=-1)
    with pytest.raises(ConfigurationError, match="torch.Tensor"):
        least_squares(lambda p: fun(p).numpy(), x0)
    with pytest.raises(ShapeError, match=r"\(B, M\)"):
        least_squares(lambda p: p.sum(-1), torch.zeros(4, 3, dtype=D))


# ---------------------------------------------------------------------------- curve_fit
def _decay(x, a, b, c):
    return a * torch.exp(-b * x) + c


def _decay_np(x, a, b, c):
    return a * np.exp(-b * x) + c


@pytest.mark.parametrize("sigma,absolute", [(None, False), ("s", False), ("s", True)])
def test_curve_fit_matches_scipy_popt_and_pcov(sigma, absolute):
    s = 0.01 + 0.02 * torch.rand(30, generator=seeded(2), dtype=D) if sigma else None
    popt, pcov = curve_fit(_decay, T, Y, [1.0, 1.0, 0.0], sigma=s, absolute_sigma=absolute)
    ref_p, ref_c = sopt.curve_fit(
        _decay_np,
        T.numpy(),
        Y.numpy(),
        [1.0, 1.0, 0.0],
        sigma=None if s is None else s.numpy(),
        absolute_sigma=absolute,
    )
    torch.testing.assert_close(popt, torch.tensor(ref_p), rtol=1e-7, atol=0)
    torch.testing.assert_close(pcov, torch.tensor(ref_c), rtol=1e-5, atol=1e-14)


def test_curve_fit_failure_raises():
    with pytest.raises(ConvergenceError, match="Optimal parameters not found") as e:
        curve_fit(_decay, T, Y, [1.0, 1.0, 0.0], max_nfev=3)
    assert isinstance(e.value, RuntimeError)


def test_curve_fit_default_max_nfev_is_lmder_s():
    """The Jacobian is autograd's, as lmder's is given: the default limit is lmder's 100 (P + 1)
    = 400 function evaluations, what scipy's curve_fit uses with jac= (without it, lmdif's
    200 (P + 1) also pays for the forward differences). Curve 341 crawls into the valley b -> 0:
    both fail after exactly 400 evaluations."""
    t, y = _decay_curve(341)

    def jac_np(x, a, b, c):
        e = np.exp(-b * x)
        return np.stack([e, -a * x * e, np.ones_like(x)], -1)

    with pytest.raises(RuntimeError, match="maxfev = 400"):
        sopt.curve_fit(_decay_np, t.numpy(), y.numpy(), [1.0, 1.0, 0.0], jac=jac_np)
    with pytest.raises(ConvergenceError, match=r"nfev = 400\b"):
        curve_fit(_decay, t, y, [1.0, 1.0, 0.0])


@torch_core
def test_curve_fit_refuses_an_f_of_the_wrong_shape():
    """Before: xdata and ydata of different lengths gave a bare broadcasting RuntimeError, an f
    returning (N, 1) was reported as 'fun returned shape (30, 30)', and a scalar f 'fitted'."""
    y = _decay(T, 2.0, 1.3, 0.5)
    bad = {
        "short xdata": (_decay, T[:20]),
        "column": (lambda x, a, b, c: _decay(x, a, b, c).unsqueeze(-1), T),
        "scalar": (lambda x, a, b, c: _decay(x, a, b, c).sum(), T),
    }
    for f, x in bad.values():
        with pytest.raises(ShapeError, match=r"one value per point of ydata, shape \(N,\)"):
            curve_fit(f, x, y, [1.0, 1.0, 0.0])
        with pytest.raises(ShapeError, match="for the first curve"):
            curve_fit(f, x, torch.stack([y, y]), torch.tensor([[1.0, 1.0, 0.0]] * 2, dtype=D))
    calls = []  # bad settings are refused before f is called

    def counted(x, a, b, c):
        calls.append(1)
        return _decay(x, a, b, c)

    with pytest.raises(ConfigurationError, match="unknown method"):
        curve_fit(counted, T, y, [1.0, 1.0, 0.0], method="bogus")
    for trf in ("trf", "dogbox"):  # a scipy user's port: pointed at bounds= and loss=
        with pytest.raises(ConfigurationError, match="bounds= and loss= work with every method"):
            curve_fit(counted, T, y, [1.0, 1.0, 0.0], method=trf, loss="soft_l1")
        with pytest.raises(ConfigurationError, match="bounds= and loss= work with every method"):
            least_squares(lambda p: counted(T, *p) - y, [1.0, 1.0, 0.0], method=trf)
    assert not calls


def _decay_jac(x, a, b, c):
    e = torch.exp(-b * x)
    return torch.stack([e, -a * x * e, torch.ones_like(e)], -1)


def _decay_jac_np(x, a, b, c):
    e = np.exp(-b * x)
    return np.stack([e, -a * x * e, np.ones_like(x)], -1)


@pytest.mark.parametrize("sigma,absolute", [(None, False), ("s", False), ("s", True)])
def test_curve_fit_with_jac_matches_scipy_with_jac(sigma, absolute):
    """curve_fit(jac=) is scipy's: the Jacobian of f, divided by sigma inside. popt, pcov and
    the evaluation count equal scipy's curve_fit(jac=) (MINPACK lmder), and the fit equals the
    one with autograd's Jacobian."""
    s = 0.01 + 0.02 * torch.rand(30, generator=seeded(2), dtype=D) if sigma else None
    p0 = [1.0, 1.0, 0.0]
    kw = {"sigma": s, "absolute_sigma": absolute, "full_output": True}
    popt, pcov, res = curve_fit(_decay, T, Y, p0, jac=_decay_jac, **kw)
    ref_p, ref_c, info, _, _ = sopt.curve_fit(
        _decay_np,
        T.numpy(),
        Y.numpy(),
        p0,
        sigma=None if s is None else s.numpy(),
        absolute_sigma=absolute,
        jac=_decay_jac_np,
        full_output=True,
    )
    torch.testing.assert_close(popt, torch.tensor(ref_p), rtol=1e-8, atol=0)
    torch.testing.assert_close(pcov, torch.tensor(ref_c), rtol=1e-5, atol=1e-14)
    assert res.nfev == info["nfev"]
    auto_p, auto_c, auto = curve_fit(_decay, T, Y, p0, **kw)
    torch.testing.assert_close(popt, auto_p, rtol=1e-12, atol=0)
    torch.testing.assert_close(pcov, auto_c, rtol=1e-10, atol=0)
    assert (res.nfev, res.njev) == (auto.nfev, auto.njev)


@pytest.mark.parametrize("route", ["broadcast", "vmap"])
def test_batched_curve_fit_with_jac_equals_separate_fits(route):
    """A jac that broadcasts is called once a Jacobian stage with the parameter columns (B, 1)
    (no vmap); one that does not (``torch.ones_like(x)`` has shape (N,) and does not stack
    with (B, N)) is caught by the probe and vmapped. Both, with a sigma per curve, equal the
    separate fits with jac (which equal scipy's, above)."""
    y = _batch(5)
    p0 = torch.tensor([[1.0, 1.0, 0.0]] * 5, dtype=D)
    s = 0.01 + 0.02 * torch.rand(5, 30, generator=seeded(4), dtype=D)
    seen = []

    def jac(x, a, b, c):
        seen.append(tuple(a.shape))
        e = torch.exp(-b * x)
        one = torch.ones_like(e if route == "broadcast" else x)
        return torch.stack([e, -a * x * e, one], -1)

    popt, pcov = curve_fit(_decay, T, y, p0, sigma=s, jac=jac)
    columns = [sh for sh in seen if sh != ()]
    assert all(sh[1:] == (1,) for sh in columns)
    if route == "broadcast":
        # 0-d only in the shape check and the probe's vmapped reference
        assert len(columns) >= 2 and len(seen) - len(columns) == 2
    else:
        assert columns == [(5, 1)]  # the probe only; then 0-d parameters under vmap
    for i in (0, 4):
        one, cov = curve_fit(_decay, T, y[i], [1.0, 1.0, 0.0], sigma=s[i], jac=_decay_jac)
        torch.testing.assert_close(popt[i], one, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(pcov[i], cov, rtol=1e-7, atol=1e-16)


def test_a_wrong_jac_is_named_and_bad_jac_input_refused():
    """jac= is checked at x0 against a central difference of fun (two evaluations; a wrong
    one named by its columns in a SteepestWarning, single and batched, curve_fit and
    least_squares); right Jacobians, also in float32 and on a steep exponential where the
    first difference is off by its truncation error, pass silently. A jac of the wrong shape
    is a ShapeError, a string a ConfigurationError, both before f is evaluated for the fit."""
    import warnings as w

    from steepest.errors import SteepestWarning

    def scaled(x, a, b, c):  # column 2 twice too large: the same minimum, a wrong pcov
        return _decay_jac(x, a, b, c) * torch.tensor([1.0, 1.0, 2.0], dtype=x.dtype)

    with pytest.warns(SteepestWarning, match=r"jac disagrees .* in the columns \[2\]"):
        curve_fit(_decay, T, Y, [1.0, 1.0, 0.0], jac=scaled)
    p0 = torch.tensor([[1.0, 1.0, 0.0]] * 3, dtype=D)
    with pytest.warns(SteepestWarning, match=r"in the columns \[2\]"):
        curve_fit(_decay, T, _batch(3), p0, jac=scaled)

    def h(p):
        return p[0] * torch.exp(-p[1] * T) + p[2] - Y

    def swapped(p):  # the columns of b and c exchanged
        return torch.func.jacrev(h)(p)[:, [0, 2, 1]]

    with pytest.warns(SteepestWarning, match=r"in the columns \[1, 2\]"):
        least_squares(h, [1.0, 1.0, 0.0], jac=swapped)
    with pytest.warns(SteepestWarning, match=r"in the columns \[1, 2\]"):
        least_squares(h, p0, jac=swapped, vectorize=True)
    with w.catch_warnings():
        w.simplefilter("error", SteepestWarning)
        curve_fit(_decay, T, Y, [1.0, 1.0, 0.0], jac=_decay_jac)
        curve_fit(_decay, T, _batch(3), p0, jac=_decay_jac)
        t32, y32 = T.float(), Y.float()
        curve_fit(_decay, t32, y32, torch.tensor([1.0, 1.0, 0.0]), jac=_decay_jac)
        least_squares(h, [1.0, 1.0, 0.0], jac=torch.func.jacrev(h))

        def steep(p):  # d (|x| + 1) h ~ 6e-6 in p, times 2e4: the first difference is off
            return torch.exp(2e4 * p) - 1.5

        least_squares(steep, [1e-5], jac=torch.func.jacrev(steep))
    calls = []

    def counted(x, a, b, c):
        calls.append(1)
        return _decay(x, a, b, c)

    with pytest.raises(ShapeError, match=r"jac\(xdata, \*p0\) returned \(3, 30\)"):
        curve_fit(counted, T, Y, [1.0, 1.0, 0.0], jac=lambda x, *p: _decay_jac(x, *p).T)
    assert len(calls) == 1  # f's own shape check only
    calls.clear()
    with pytest.raises(ConfigurationError, match="jac must be a callable"):
        curve_fit(counted, T, Y, [1.0, 1.0, 0.0], jac="2-point")
    assert not calls


def test_jac_check_scales_runs_only_on_a_given_jac_and_points_at_the_caller(monkeypatch):
    """The check of a given jac (review of 3f309fa): silent on right Jacobians at scales that
    tripped its first version (a time constant of 1e-6, a Gaussian line at c/w = 3e5, a fixed
    offset of 1e9 in the model), a wrong column hidden under a large one named (a background
    of 10 under an amplitude of 1e6, its sign wrong: the fit 'succeeded' at -15758), the
    warning attributed to the caller's line, never run on curve_fit's own autograd Jacobian,
    and a jac of another dtype refused by name."""
    import warnings as w

    import steepest.fit.checks as checks
    from steepest.errors import SteepestWarning

    t6 = torch.linspace(0, 5e-6, 50, dtype=D)
    y6 = 2 * torch.exp(-t6 / 1e-6) + 1e-3 * torch.sin(1e7 * t6)
    tg = 1e9 + torch.linspace(-5e3, 5e3, 60, dtype=D)
    yg = torch.exp(-(((tg - 1e9) / 3.3e3) ** 2))
    to = torch.linspace(0, 1, 40, dtype=D)
    yo = 1e9 + 2 * to + 3 * to**2

    def gauss(p):
        return p[0] * torch.exp(-(((tg - p[1]) / p[2]) ** 2)) - yg

    right = [
        (lambda p: p[0] * torch.exp(-t6 / p[1]) - y6, [1.5, 1.2e-6]),
        (gauss, [0.9, 1e9 + 100, 3e3]),
        (lambda p: 1e9 + p[0] * to + p[1] * to**2 - yo, [1.0, 1.0]),
    ]
    with w.catch_warnings():
        w.simplefilter("error", SteepestWarning)
        for fun, x0 in right:
            least_squares(fun, x0, jac=torch.func.jacrev(fun), max_nfev=2)
    yb = 1e6 * torch.exp(-1.3 * T) + 10 + 3 * torch.randn(30, generator=seeded(5), dtype=D)

    def hb(p):
        return p[0] * torch.exp(-p[1] * T) + p[2] - yb

    flip = torch.tensor([1.0, 1.0, -1.0], dtype=D)
    with pytest.warns(SteepestWarning, match=r"in the columns \[2\]") as rec:
        least_squares(hb, [8e5, 1.0, 5.0], jac=lambda p: torch.func.jacrev(hb)(p) * flip)
    assert [r.filename for r in rec if "jac disagrees" in str(r.message)] == [__file__]
    with pytest.warns(SteepestWarning, match=r"in the columns \[2\]") as rec:
        curve_fit(_decay, T, Y, [1.0, 1.0, 0.0], jac=lambda x, *p: _decay_jac(x, *p) * flip)
    assert [r.filename for r in rec if "jac disagrees" in str(r.message)] == [__file__]
    calls = []
    real = checks._check_jac
    import steepest.fit.lsq as lsq

    monkeypatch.setattr(lsq, "_check_jac", lambda *a, **k: calls.append(1) or real(*a, **k))
    curve_fit(_decay, T, Y, [1.0, 1.0, 0.0])  # pointwise autograd: not the user's jac
    curve_fit(_decay, T, _batch(3), torch.tensor([[1.0, 1.0, 0.0]] * 3, dtype=D))
    assert not calls
    curve_fit(_decay, T, Y, [1.0, 1.0, 0.0], jac=_decay_jac)
    assert calls == [1]
    with pytest.raises(ShapeError, match="in p0's torch.float64"):
        curve_fit(_decay, T, Y, [1.0, 1.0, 0.0], jac=lambda x, *p: _decay_jac(x, *p).float())
    x0 = torch.tensor([[1.5, 1.6, 0.1]] * 2, dtype=D)
    with pytest.raises(ShapeError, match="jac returned torch.float32"):
        least_squares(
            PROBLEMS["expfit"][0],
            x0,
            vectorize=True,
            jac=lambda p: torch.func.jacrev(PROBLEMS["expfit"][0])(p).float(),
        )
    with pytest.raises(ConfigurationError, match="jac could not be vmapped"):
        least_squares(
            PROBLEMS["expfit"][0], x0, vectorize=True, jac=lambda p: torch.ones(30, 3) * p[0].item()
        )


def test_vectorize_runs_a_one_problem_fun_over_a_batch_of_starts():
    """vectorize=True: fun written for one x (P,) and vmapped; fun sees only x, so the batch is
    one data set from several starts (multi-start): each fit equals the separate fit from its
    start, evaluation for evaluation."""
    y = _decay(T, 2.0, 1.3, 0.5) + 0.01 * torch.randn(30, generator=seeded(4), dtype=D)

    def fun(p):
        return p[0] * torch.exp(-p[1] * T) + p[2] - y

    x0 = torch.tensor([[1.0, 1.0, 0.0], [5.0, 0.1, -3.0], [0.5, 3.0, 1.0]], dtype=D)
    res = least_squares(fun, x0, vectorize=True)
    for i in range(3):
        one = least_squares(fun, x0[i])
        torch.testing.assert_close(res.x[i], one.x, rtol=1e-10, atol=1e-12)
        assert (int(res.nfev[i]), int(res.status[i])) == (one.nfev, one.status)


# ---------------------------------------------------------------------------- batched
def _batch(n: int, device: str = "cpu"):
    g = seeded(3)
    a = 1 + torch.rand(n, 1, generator=g, dtype=D)
    b = 0.5 + torch.rand(n, 1, generator=g, dtype=D)
    c = torch.rand(n, 1, generator=g, dtype=D)
    y = a * torch.exp(-b * T) + c + 0.01 * torch.randn(n, 30, generator=g, dtype=D)
    return y.to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_batched_fit_equals_separate_fits(device):
    y = _batch(6, device)
    t = T.to(device)
    x0 = torch.tensor([[1.0, 1.0, 0.0]] * 6, dtype=D, device=device)
    x0[3] = torch.tensor([5.0, 0.1, -3.0])  # a harder start: more steps for this one
    fun = lambda p: p[:, :1] * torch.exp(-p[:, 1:2] * t) + p[:, 2:] - y  # noqa: E731
    res = least_squares(fun, x0)
    assert res.x.device.type == device and res.x.shape == (6, 3) and res.jac.shape == (6, 30, 3)
    assert len(set(res.nfev.tolist())) > 1  # each fit stops on its own
    for i in range(6):
        one = least_squares(lambda p, i=i: p[0] * torch.exp(-p[1] * t) + p[2] - y[i], x0[i])
        torch.testing.assert_close(res.x[i], one.x, rtol=1e-10, atol=1e-12)
        assert (int(res.nfev[i]), int(res.njev[i]), int(res.nit[i]), int(res.status[i])) == (
            one.nfev,
            one.njev,
            one.nit,
            one.status,
        )
        assert res.message[i] == one.message and bool(res.success[i]) == one.success
        assert float(res.cost[i]) == pytest.approx(one.cost, rel=1e-10)
    # vectorize=True: fun written for one problem, vmapped
    yv = y

    def single(p):
        return p[0] * torch.exp(-p[1] * t) + p[2]

    res_v = least_squares(lambda p: torch.func.vmap(single)(p) - yv, x0)
    torch.testing.assert_close(res_v.x, res.x)


def _decay_curve(i: int | list[int] = 9082):
    """Curves i of benchmarks/fit_speed.py's decay_data(10000) (the same generator)."""
    g = torch.Generator().manual_seed(0)
    t = torch.linspace(0, 5, 50, dtype=D)
    a = 1 + torch.rand(10_000, 1, generator=g, dtype=D)
    k = 0.3 + 2 * torch.rand(10_000, 1, generator=g, dtype=D)
    c = torch.rand(10_000, 1, generator=g, dtype=D)
    y = a * torch.exp(-k * t) + c + 0.01 * torch.randn(10_000, 50, generator=g, dtype=D)
    return t, y[i]


def test_decay_curve_that_fell_into_the_degenerate_valley_follows_minpack():
    """From p0 = (1, 1, 0) this curve's second try decides between the minimum and the valley
    b -> 0 (a = -c -> infinity, a e^{-bx} + c a line). lambda solved afresh to 1 % each try
    (the old rule) took the valley: 800 evaluations (ConvergenceError alone; cost 0.26 and a
    false "ftol" success in a batch). With MINPACK's lmpar (lambda carried from step to step,
    10 %) the path is MINPACK's evaluation by evaluation: 9 evaluations to scipy's minimum,
    alone (SVD) and in a batch of 64 (the QR route)."""
    t, y = _decay_curve(9082)
    ref, _ = sopt.curve_fit(_decay_np, t.numpy(), y.numpy(), [1.0, 1.0, 0.0], full_output=False)
    ref_cost = 0.5 * float(((_decay_np(t.numpy(), *ref) - y.numpy()) ** 2).sum())
    lm = scipy_lm(lambda p: _decay(t, *p) - y, [1.0, 1.0, 0.0])
    popt, _, res = curve_fit(_decay, t, y, [1.0, 1.0, 0.0], full_output=True)
    assert res.success and res.cost == pytest.approx(ref_cost, rel=1e-9)
    np.testing.assert_allclose(popt.numpy(), ref, rtol=1e-6)
    assert res.nfev <= lm.nfev
    yb = torch.cat([_decay_curve(list(range(63)))[1], y[None]])  # 63 other curves, then 9082
    pb, _, rb = curve_fit(
        _decay, t, yb, torch.tensor([[1.0, 1.0, 0.0]] * 64, dtype=D), full_output=True
    )
    assert bool(rb.success.all())
    torch.testing.assert_close(pb[-1], popt, rtol=1e-7, atol=1e-9)
    assert int(rb.nfev[-1]) == res.nfev


def test_batched_curve_fit_equals_separate_curve_fits():
    y = _batch(4)
    p0 = torch.tensor([[1.0, 1.0, 0.0]] * 4, dtype=D)
    popt, pcov, res = curve_fit(_decay, T, y, p0, full_output=True)
    assert popt.shape == (4, 3) and pcov.shape == (4, 3, 3) and bool(res.success.all())
    for i in range(4):
        p1, c1 = curve_fit(_decay, T, y[i], p0[i])
        torch.testing.assert_close(popt[i], p1, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(pcov[i], c1, rtol=1e-8, atol=1e-16)
    # per-curve x (B, N)
    popt2, _ = curve_fit(_decay, T.expand(4, 30), y, p0)
    torch.testing.assert_close(popt2, popt)


def test_large_batch_pcov_by_jacobi_equals_the_lapack_svd(monkeypatch):
    """B >= JACOBI_MIN_BATCH (forced to 1 here): pcov comes from the QR of J and the Jacobi SVD
    of R (unsorted singular values), and equals the pcov of separate fits (LAPACK's SVD of J),
    also where a column of J is zero (b unused: the pseudo-inverse drops it)."""
    y = _batch(6)
    p0 = torch.tensor([[1.0, 1.0, 0.0]] * 6, dtype=D)
    _, ref = curve_fit(_decay, T, y, p0)  # B = 6 < 512: LAPACK
    monkeypatch.setattr(steepest.fit.core, "JACOBI_MIN_BATCH", 1)
    _, pcov = curve_fit(_decay, T, y, p0)
    torch.testing.assert_close(pcov, ref, rtol=1e-9, atol=1e-18)

    def flat(x, a, b, c):  # b has no effect: a zero column
        return a * x + 0 * b + c

    jac = torch.stack([T, torch.zeros_like(T), torch.ones_like(T)], -1).expand(3, -1, -1)
    s, vh = steepest.fit.core._svd_values(jac)
    assert float(s.amin()) == 0.0
    _, pc = curve_fit(flat, T, y[:3], p0[:3])
    assert bool((pc[:, 1, :] == 0).all()) and bool(torch.isfinite(pc).all())
    monkeypatch.setattr(steepest.fit.core, "JACOBI_MIN_BATCH", 512)
    _, pc_ref = curve_fit(flat, T, y[:3], p0[:3])
    torch.testing.assert_close(pc, pc_ref, rtol=1e-9, atol=1e-18)


@pytest.mark.parametrize("jacobi", [False, True])
def test_pcov_of_a_fit_whose_jacobian_is_not_finite_is_inf(jacobi, monkeypatch):
    """sqrt(c) at c = 0: J is infinite at x0, that fit stops with status -1. Its pcov is inf
    (no covariance), the batch does not raise (LAPACK's SVD refused the non-finite J; Jacobi
    gave a zero matrix, i.e. perfect certainty) and the other fits' pcov equal their separate
    fits'; a single such fit raises ConvergenceError, not a linear-algebra error."""
    if jacobi:
        monkeypatch.setattr(steepest.fit.core, "JACOBI_MIN_BATCH", 1)

    def f(x, a, b, c):
        return a * torch.exp(-b * x) + torch.sqrt(c) * x

    y = _batch(4)
    p0 = torch.tensor([[1.0, 1.0, 0.2]] * 4, dtype=D)
    p0[0, 2] = 0.0
    with pytest.warns(UserWarning, match="1 of 4 fits ended without success"):
        _, pcov, res = curve_fit(f, T, y, p0, full_output=True)
    assert int(res.status[0]) == -1 and bool(torch.isinf(pcov[0]).all())
    for i in (1, 3):
        _, c1 = curve_fit(f, T, y[i], p0[i])
        torch.testing.assert_close(pcov[i], c1, rtol=1e-8, atol=1e-16)
    with pytest.raises(ConvergenceError, match="not finite"):
        curve_fit(f, T, y[0], p0[0])


@pytest.mark.parametrize("method", ["trust-region", "levenberg-marquardt"])
def test_an_unused_parameter_stays_where_it_started(method):
    """a t + 0 b + c: J's column for b is exactly 0. LAPACK's SVD of J D^-1 gives it a singular
    value of ~1e-17 with a c' of rounding noise, and the damped step c'/(s^2 + lambda) sent b
    from -2 to 6588 (scipy's lm, MINPACK's QR with an exactly zero column, keeps b = -2). Now
    the direction of an exactly zero column is dropped: b stays, a and c equal scipy's, alone
    and in a batch of 80 (QR route)."""

    def fun(p):
        return p[..., :1] * T + 0 * p[..., 1:2] + p[..., 2:] - Y

    x0 = [5.0, -2.0, 3.0]
    one = least_squares(fun, x0, method=method)
    assert one.success and float(one.x[1]) == -2.0
    ref = scipy_lm(lambda p: fun(p), x0)
    np.testing.assert_allclose(one.x.numpy()[[0, 2]], ref.x[[0, 2]], rtol=1e-9)
    many = least_squares(fun, torch.tensor([x0] * 80, dtype=D), method=method)
    assert bool(many.success.all()) and bool((many.x[:, 1] == -2.0).all())
    torch.testing.assert_close(many.x, one.x.expand(80, 3), rtol=1e-9, atol=1e-12)


def test_a_parameter_autograd_cannot_see_is_named_in_a_warning():
    """float(a) or .item() in fun cuts the graph: J's column is exactly 0 while fun moves with
    that parameter, and the fit used to leave it at x0 and report success silently (popt off
    scipy's by ~1). A central difference at x0 finds the dependence: a SteepestWarning naming
    the parameter and the fix (a heuristic, so not an error); in a batch, vmap's bare
    RuntimeError becomes a ConfigurationError. A wrong jac= with a zero column is named the
    same way. Not warned: parameters that have no effect (two of them, single and batched:
    one probe per column on distinct rows), derivatives 0 at x0 only to first order (a^2,
    cos(a) at 0, large curvature), a Gaussian width at 0."""
    import warnings as w

    from steepest.errors import SteepestWarning

    def f(x, a, b, c):
        return float(a) * torch.exp(-b * x) + c

    with pytest.warns(SteepestWarning, match=r"column 0 is exactly 0 .* does not see"):
        curve_fit(f, T, Y, [1.0, 1.0, 0.0], full_output=True)
    with pytest.raises(ConfigurationError, match="could not be vmapped"):
        curve_fit(f, T, Y.expand(3, 30), torch.tensor([[1.0, 1.0, 0.0]] * 3, dtype=D))

    def g(p):
        return p[0] * torch.exp(-p[1] * T) + p[2].item() - Y

    with pytest.warns(SteepestWarning, match=r"column 2 is exactly 0"):
        least_squares(g, [1.0, 1.0, 0.0])

    def h(p):
        return p[0] * torch.exp(-p[1] * T) + p[2] - Y

    def bad_jac(p):
        j = torch.func.jacrev(h)(p)
        return torch.cat([j[:, :2], torch.zeros(30, 1, dtype=D)], 1)

    with pytest.warns(SteepestWarning, match="or jac= is\\s+wrong"):
        least_squares(h, [1.0, 1.0, 0.0], jac=bad_jac)
    quiet = [
        (lambda p: p[0] * T + 0 * p[1] + 0 * p[2] - Y, [1.0, 0.5, 0.5]),  # two unused
        (lambda p: p[0] ** 2 * T + p[1] - Y, [0.0, 0.0]),
        (lambda p: 1e8 * p[0] ** 2 * T + p[1] - Y, [0.0, 0.0]),
        (lambda p: torch.cos(p[0]) * T + p[1] - Y, [0.0, 0.0]),
        (lambda p: p[0] * torch.exp(-((p[1] * 25 * T) ** 2)) + p[2] - Y, [1.0, 0.0, 0.0]),
    ]
    with w.catch_warnings():
        w.simplefilter("error", SteepestWarning)
        for fun, x0 in quiet:
            res = least_squares(fun, x0)
            assert bool(torch.isfinite(res.x).all())
        two = least_squares(
            quiet[0][0], torch.tensor([[1.0, 0.5, 0.5]] * 3, dtype=D), vectorize=True
        )
        torch.testing.assert_close(two.x[:, 1:], torch.full((3, 2), 0.5, dtype=D))
        _, _, rc = curve_fit(
            lambda x, a, b, c: a * x + 0 * b + 0 * c,
            T,
            Y.expand(2, 30),
            torch.tensor([[1.0, 0.5, 0.5]] * 2, dtype=D),
            full_output=True,
        )
        assert bool(rc.success.all())


def test_total_evaluations_no_more_than_minpack():
    ours = sum(least_squares(*PROBLEMS[k], **scipy_tol(PROBLEMS[k][1])).nfev for k in PROBLEMS)
    ref = sum(scipy_lm(*PROBLEMS[k]).nfev for k in PROBLEMS)
    assert ours <= ref, (ours, ref)


def test_batched_curve_fit_calls_an_elementwise_formula_once_without_vmap():
    """An elementwise formula gets the parameter columns (B, 1) of the running fits, not 0-d
    tensors under vmap (the per-call overhead of vmap dominates small working sets); a formula
    that mixes the rows of the batch (a mean over it) is caught by the probe and stays on the
    vmap route, and both give the separate fits' results."""
    y = _batch(5)
    p0 = torch.tensor([[1.0, 1.0, 0.0]] * 5, dtype=D)
    seen = []

    def decay(x, a, b, c):
        seen.append(tuple(a.shape))
        return a * torch.exp(-b * x) + c

    popt, _ = curve_fit(decay, T, y, p0)
    # evaluations on the columns (B, 1); Jacobians pointwise, the parameters spread to (B, N)
    assert (5, 1) in seen and (5, 30) in seen
    shapes = {(k, 1) for k in range(1, 6)} | {(k, 30) for k in range(1, 6)} | {()}
    assert all(s in shapes for s in seen)
    for i in (0, 4):
        one, _ = curve_fit(_decay, T, y[i], [1.0, 1.0, 0.0])
        torch.testing.assert_close(popt[i], one, rtol=1e-9, atol=1e-12)

    def mixing(x, a, b, c):  # one curve: a - mean(a) = 0; a batch: the rows would be coupled
        seen.append(tuple(a.shape))
        return a * torch.exp(-b * x) + c + 1e-2 * (a - a.mean())

    seen.clear()
    popt2, _ = curve_fit(mixing, T, y, p0)
    assert seen.count((5, 1)) == 1  # the probe only; then vmap (0-d parameters)
    torch.testing.assert_close(popt2, popt, rtol=1e-9, atol=1e-12)


def _recorded_formulas():
    """(seen, coupled, pointwise): a decay normalised over the points (it couples them) and a
    pointwise decay, each appending the shape of the parameter a it is called with to seen."""
    seen = []

    def coupled(x, a, b, c):
        seen.append(tuple(a.shape))
        e = torch.exp(-b * x)
        return a * e / e.mean(-1, keepdim=True) + c

    def pointwise(x, a, b, c):
        seen.append(tuple(a.shape))
        return a * torch.exp(-b * x) + c

    return seen, coupled, pointwise


def test_pointwise_jacobian_only_for_formulas_that_are_pointwise():
    """The batched curve_fit takes J by one backward pass through the parameters spread to one
    copy per point only when residual i depends on them through point i alone (checked by a
    probe against torch.func); a formula normalised over the points is elementwise across the
    batch but couples the points, and keeps torch.func. Both Jacobians at the solution equal a
    dense one of torch.autograd.functional, and both fits equal the separate fits."""
    y = _batch(5)
    p0 = torch.tensor([[1.0, 1.0, 0.0]] * 5, dtype=D)
    seen, coupled, pointwise = _recorded_formulas()

    curve_fit(pointwise, T.float(), y.float(), p0.float())
    assert (5, 30) in seen  # float32 too: the probe's tolerance follows the dtype
    for formula in (_decay, coupled):
        seen.clear()
        popt, _, res = curve_fit(formula, T, y, p0, full_output=True)
        assert bool(res.success.all())
        if formula is coupled:
            assert (5, 30) not in seen and () in seen  # torch.func's vmap, not the spread
        for i in (0, 3):
            one = curve_fit(formula, T, y[i], p0[i], full_output=True)[2]
            torch.testing.assert_close(popt[i], one.x, rtol=1e-9, atol=1e-12)
            assert int(res.nfev[i]) == one.nfev and int(res.njev[i]) == one.njev
            ref = jacobian(lambda q, i=i, f=formula: f(T, *q) - y[i], popt[i])
            torch.testing.assert_close(res.jac[i], ref, rtol=1e-10, atol=1e-12)


def test_single_curve_takes_the_pointwise_jacobian_only_when_pointwise():
    """One curve: a pointwise formula's J comes from one backward pass through the parameters
    spread over the points (a (1, 30) copy of each reaches f), a formula normalised over the
    points keeps torch.func (0-d parameters under vmap); both fits and Jacobians equal
    scipy's optimum and a dense torch.autograd.functional Jacobian."""
    seen, coupled, pointwise = _recorded_formulas()

    for formula in (pointwise, coupled):
        seen.clear()
        popt, _, res = curve_fit(formula, T, Y, [1.0, 1.0, 0.0], full_output=True)
        assert res.success
        spread = seen.count((1, 30))
        assert spread >= (res.njev if formula is pointwise else 1), (formula, seen)
        if formula is coupled:
            assert spread == 1  # the probe's pointwise route only (its true u^T J: 0-d params)
        ref = jacobian(lambda q, f=formula: f(T, *q) - Y, popt)
        torch.testing.assert_close(res.jac, ref, rtol=1e-10, atol=1e-12)
        ref_p = sopt.curve_fit(
            lambda x, *q, f=formula: f(torch.as_tensor(x), *map(torch.tensor, q)).numpy(),
            T.numpy(),
            Y.numpy(),
            [1.0, 1.0, 0.0],
        )[0]
        np.testing.assert_allclose(popt.numpy(), ref_p, rtol=1e-8, atol=1e-10)


def test_a_formula_that_couples_the_points_only_away_from_p0_is_caught_at_popt():
    """The pointwise probe runs near p0; this formula couples the points (e / mean(e)) only
    where a > 2, and the data come from a = 3: the pointwise Jacobian was 57 % off at popt (51
    evaluations, popt off scipy's in the 8th digit). The check at popt refits with torch.func:
    J exact, scipy's popt, alone and in a batch."""

    def f(x, a, b, c):
        e = torch.exp(-b * x)
        return a * e + c + torch.where(a > 2, (a - 2) * e / e.mean(-1, keepdim=True), 0 * a)

    y = f(T, *torch.tensor([3.0, 1.3, 0.5], dtype=D))
    popt, _, res = curve_fit(f, T, y, [1.0, 1.0, 0.0], full_output=True)
    ref = jacobian(lambda q: f(T, *q) - y, popt)
    torch.testing.assert_close(res.jac, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(popt, torch.tensor([3.0, 1.3, 0.5], dtype=D), rtol=1e-9, atol=0)
    yb = torch.stack([y, y + 0.01 * torch.randn(30, generator=seeded(5), dtype=D)])
    pb, _, rb = curve_fit(f, T, yb, torch.tensor([[1.0, 1.0, 0.0]] * 2, dtype=D), full_output=True)
    torch.testing.assert_close(pb[0], popt, rtol=1e-9, atol=1e-12)
    for i in range(2):
        ref = jacobian(lambda q, i=i: f(T, *q) - yb[i], pb[i])
        torch.testing.assert_close(rb.jac[i], ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("jacobi", [False, True])
def test_large_batch_takes_the_qr_route_and_equals_separate_fits(jacobi, monkeypatch):
    """B >= 64: while at least 64 fits run, the factorisation is the SVD of R of [J f] = QR
    (by LAPACK, or for batches of at least JACOBI_MIN_BATCH by one-sided Jacobi, forced here);
    the fits still match separate (SVD) fits, and slow fits leave the batch (compaction)
    correctly."""
    if jacobi:
        monkeypatch.setattr(steepest.fit.core, "JACOBI_MIN_BATCH", 1)
    y = _batch(64)
    x0 = torch.tensor([[1.0, 1.0, 0.0]] * 64, dtype=D)
    x0[5] = torch.tensor([5.0, 0.1, -3.0])
    res = least_squares(lambda p: p[:, :1] * torch.exp(-p[:, 1:2] * T) + p[:, 2:] - y, x0)
    assert bool(res.success.all())
    for i in (0, 5, 63):
        one = least_squares(lambda p, i=i: p[0] * torch.exp(-p[1] * T) + p[2] - y[i], x0[i])
        torch.testing.assert_close(res.x[i], one.x, rtol=1e-7, atol=1e-9)
        assert float(res.cost[i]) == pytest.approx(one.cost, rel=1e-9)


@pytest.mark.parametrize("jacobi", [False, True])
def test_large_batch_fails_where_the_separate_fit_fails(jacobi, monkeypatch):
    """Curve 341 of the speed benchmark crawls from (1, 1, 0) into the valley b -> 0 (scipy's
    curve_fit fails there too). The eigen-decomposition of (J D^-1)^T (J D^-1) used before for
    B >= 64 lost the tiny eigenvalue of that nearly rank-deficient J and reported an ftol
    "success" after ~230 evaluations at cost 0.18; by QR it follows the separate fit: the same
    evaluations, status and cost, in the batch and alone (with R's SVD by LAPACK or by
    one-sided Jacobi)."""
    if jacobi:
        monkeypatch.setattr(steepest.fit.core, "JACOBI_MIN_BATCH", 1)
    t, y = _decay_curve(341)
    batch = torch.cat([y[None], _decay_curve(list(range(63)))[1]])  # 341, then 63 others
    p0 = torch.tensor([[1.0, 1.0, 0.0]] * 64, dtype=D)
    with pytest.warns(UserWarning, match="ended without success"):
        _, _, res = curve_fit(_decay, t, batch, p0, max_nfev=300, full_output=True)
    one = least_squares(lambda p: _decay(t, *p) - y, [1.0, 1.0, 0.0], max_nfev=300)
    assert not one.success and one.status == 0 and one.nfev == 300
    assert (int(res.status[0]), int(res.nfev[0])) == (one.status, one.nfev)
    assert float(res.cost[0]) == pytest.approx(one.cost, rel=1e-6)
    assert bool(res.success[1:].all())


@torch_core
def test_jacobi_svd_has_the_relative_accuracy_of_a_high_precision_svd():
    """The one-sided Jacobi SVD of R (large batches): on graded R (column scales 1e-4 to 1e3)
    every singular value to 1e-14 relative against mpmath's SVD at 50 digits (LAPACK's gesdd
    loses ~1e-10 on the smallest here: the accuracy the eigen-decomposition of R^T R would
    lose entirely), V orthogonal and G V^T = R; a zero column and two equal columns give
    exactly zero singular values (dropped, as MINPACK drops exact zeros)."""
    mpmath = pytest.importorskip("mpmath")
    from steepest.fit.core import _jacobi

    g = seeded(5)
    for p in (3, 4):
        scale = torch.logspace(-4, 3, p, dtype=D)
        r = torch.linalg.qr(torch.randn(6, 20, p, generator=g, dtype=D) * scale, mode="r")[1]
        gm, v = _jacobi(r)
        s = torch.linalg.vector_norm(gm, dim=1).sort(-1, descending=True).values
        with mpmath.workdps(50):
            ref = torch.tensor(
                [
                    sorted(map(float, mpmath.svd_r(mpmath.matrix(m.tolist()), compute_uv=False)))
                    for m in r
                ],
                dtype=D,
            ).flip(-1)
        assert float(((s - ref).abs() / ref).max()) < 1e-14
        torch.testing.assert_close(v.mT @ v, torch.eye(p, dtype=D).expand(6, p, p))
        torch.testing.assert_close(gm @ v.mT, r, rtol=0, atol=1e-14 * float(r.abs().max()))
    a = torch.randn(2, 3, 1, generator=g, dtype=D)
    singular = torch.cat(
        [a, a, torch.zeros_like(a), torch.randn(2, 3, 1, generator=g, dtype=D)], -1
    )
    s = torch.linalg.vector_norm(_jacobi(singular)[0], dim=1)
    assert int((s == 0).sum(-1).min()) == 2


@torch_core
def test_jacobi_svd_of_float32_columns_whose_norm_product_overflows():
    """Columns of norm ~1e9 in float32: the product of two squared norms (~1e37 x 1e37)
    overflows; the rotation test must not, or no rotation happens and the column norms are
    returned as singular values (46-57 % off before the fix)."""
    from steepest.fit.core import _jacobi

    g = seeded(6)
    a = torch.randn(8, 20, 3, generator=g, dtype=D) * torch.tensor([1.0, 3.0, 0.5], dtype=D)
    r = torch.linalg.qr(a, mode="r")[1]
    r32 = (r * 1e9).to(torch.float32)
    s = torch.linalg.vector_norm(_jacobi(r32)[0].double(), dim=1).sort(-1).values
    ref = torch.linalg.svdvals(r32.double()).sort(-1).values
    assert float(((s - ref).abs() / ref).max()) < 1e-5


@torch_core
def test_pointwise_probe_sees_a_coupling_in_a_small_column_next_to_a_large_one():
    """float32, a's column 1e4 times b's, b coupled over the points (a normalisation): one
    tolerance for the whole Jacobian let the coupling through and the fits "succeeded" with b
    wrong by 1e5 relative; the per-column tolerance keeps torch.func, and the batch equals the
    separate fits (fails with the single tolerance: the batch's b is then off by ~1e5)."""

    def f(x, a, b):
        e = torch.exp(-b * x)
        return 1e4 * a * x + e / e.sum(-1, keepdim=True)

    g = seeded(8)
    x = torch.linspace(0, 3, 40)
    at = 1 + 0.1 * torch.rand(6, 1, generator=g)
    bt = 1.5 + 0.5 * torch.rand(6, 1, generator=g)
    y = f(x, at, bt)
    p0 = torch.tensor([0.9, 1.0]).expand(6, 2).clone()
    popt, _ = curve_fit(f, x, y, p0)
    for i in range(6):
        alone, _ = curve_fit(f, x, y[i], p0[i])
        torch.testing.assert_close(popt[i], alone, rtol=1e-3, atol=0)
    assert float(((popt[:, 1:] - bt) / bt).abs().max()) < 1e-2


@torch_core
def test_the_first_curve_fit_of_a_process_does_not_import_sympy():
    """The autograd routes start their backward passes from a scalar: a tensor given as
    ``grad_outputs`` makes torch check its shape through torch.fx's symbolic shapes, whose
    first import loads sympy (0.35-0.5 s: the first fit of a process took 0.37 s, then
    0.02 s). In a fresh process, a single and a batched curve_fit (the pointwise probe and
    Jacobian) must not import what ``import torch, steepest`` did not (fails with
    ``grad_outputs=torch.ones_like(r)`` in _pointwise_jac)."""
    code = (
        "import sys, torch, steepest\n"
        "before = 'sympy' in sys.modules\n"
        "x = torch.linspace(0, 4, 30, dtype=torch.float64)\n"
        "y = 2 * torch.exp(-1.3 * x) + 0.5\n"
        "f = lambda x, a, b, c: a * torch.exp(-b * x) + c\n"
        "steepest.curve_fit(f, x, y, [1.0, 1.0, 0.0], engine='torch')\n"
        "p0 = torch.tensor([[1.0, 1.0, 0.0]] * 3, dtype=torch.float64)\n"
        "steepest.curve_fit(f, x, y.expand(3, 30).clone(), p0, engine='torch')\n"
        "print(before, 'sympy' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    before, after = out.stdout.split()
    assert after == before, out.stdout


@torch_core
def test_public_names_stay_importable_from_the_package():
    """steepest.fit became a package (result, core, lsq, curve, newton): every name that was
    importable from the module still is, and the top-level names are the same objects."""
    import steepest.fit as fit

    for name in ("OptimizeResult", "least_squares", "curve_fit", "minimize"):
        assert getattr(steepest, name) is getattr(fit, name)
    for name in ("MESSAGES", "METHODS", "ALIASES", "MINIMIZE_METHODS", "MINIMIZE_MESSAGES"):
        assert getattr(fit, name)
    assert callable(fit.least_squares) and fit.least_squares.__name__ == "least_squares"
    assert callable(fit.minimize) and fit.minimize.__module__ == "steepest.fit.newton"


def test_a_formula_that_mixes_rows_of_a_batch_is_vmapped():
    """curve_fit's route probe: a formula whose batch call mixes the rows (a sum without dim,
    over the batch when the parameters are columns (B, 1)) only where a > 10, which only rows
    1-3 of 100 have (none of them among the rows compared against vmap), is caught because the
    route is called on the whole batch (on the compared rows alone it was missed: fits 3.0
    off, all reported successful) and vmapped: every curve's own parameters come back."""

    def f(x, a, b, c):
        k = torch.relu(a - 10)
        return a * torch.exp(-b * x) + c + 0.1 * (k.sum() - k)

    x = torch.linspace(0.1, 4, 30, dtype=D)
    truth = torch.tensor([2.0, 1.3, 0.5], dtype=D).repeat(100, 1)
    truth[1:4, 0] = 20.0
    y = torch.stack([f(x, *p) for p in truth])  # each curve alone: the vmapped meaning
    p0 = truth.clone()
    p0[:, 1] = 1.0
    popt, _, res = curve_fit(f, x, y, p0, full_output=True)
    assert bool(res.success.all())
    torch.testing.assert_close(popt, truth, rtol=1e-8, atol=1e-8)


@torch_core
@pytest.mark.parametrize("b", [1, 2, 15, 16, 17, 100, 2**24 + 3])
def test_probe_rows_spread_over_the_batch_within_it(b):
    """The rows compared against vmap in curve_fit's route probe: min(16, B) distinct rows
    from the first to the last, inside the batch for any B (a float32 linspace rounded
    2^24 + 3 - 1 up past the end)."""
    from steepest.fit.curve import PROBE_ROWS, _sample

    idx = _sample(b, torch.device("cpu"))
    assert idx.numel() == min(PROBE_ROWS, b) == idx.unique().numel()
    assert int(idx[0]) == 0 and int(idx[-1]) == b - 1
    assert bool((idx[1:] > idx[:-1]).all())


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


def _ar1_cov(n: int, rho: float, scale: torch.Tensor) -> torch.Tensor:
    """An AR(1) covariance: sigma_i sigma_j rho^|i-j| (correlated measurement errors)."""
    k = torch.arange(n, dtype=D)
    return (
        scale.unsqueeze(-1) * scale.unsqueeze(-2) * rho ** (k.unsqueeze(0) - k.unsqueeze(1)).abs()
    )


@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("with_jac", [False, True])
def test_curve_fit_with_a_covariance_matrix_matches_scipy(absolute, with_jac):
    """sigma as scipy's 2-D sigma, the covariance of ydata: residuals L^-1 (f - y) with
    Sigma = L L^T (the Jacobian L^-1 J, a given jac included). popt equals scipy's curve_fit
    with the same covariance; pcov equals the dense (J^T Sigma^-1 J)^-1 (times
    r^T Sigma^-1 r / (N - P)) at popt, J by torch.autograd.functional, to 1e-10, and scipy's
    to 1e-4 (scipy's comes from its last Jacobian, at the previous iterate: 2.4e-5 off the same
    formula at its own popt here). A diagonal covariance equals the vector sigma of its square
    roots."""
    s = 0.01 + 0.02 * torch.rand(30, generator=seeded(2), dtype=D)
    cov = _ar1_cov(30, 0.6, s)
    jac = _decay_jac if with_jac else None
    popt, pcov = curve_fit(
        _decay, T, Y, [1.0, 1.0, 0.0], sigma=cov, absolute_sigma=absolute, jac=jac
    )
    ref_p, ref_c = sopt.curve_fit(
        _decay_np,
        T.numpy(),
        Y.numpy(),
        [1.0, 1.0, 0.0],
        sigma=cov.numpy(),
        jac=_decay_jac_np,
        absolute_sigma=absolute,
    )
    torch.testing.assert_close(popt, torch.tensor(ref_p), rtol=1e-7, atol=0)
    torch.testing.assert_close(pcov, torch.tensor(ref_c), rtol=1e-4, atol=0)
    j = jacobian(lambda p: _decay(T, *p), popt)
    r = _decay(T, *popt) - Y
    inv = torch.linalg.inv(cov)
    want = torch.linalg.inv(j.T @ inv @ j)
    if not absolute:
        want = want * (r @ inv @ r) / (30 - 3)
    torch.testing.assert_close(pcov, want, rtol=1e-10, atol=0)
    dp, dc = curve_fit(_decay, T, Y, [1.0, 1.0, 0.0], sigma=torch.diag(s**2), jac=jac)
    vp, vc = curve_fit(_decay, T, Y, [1.0, 1.0, 0.0], sigma=s, jac=jac)
    torch.testing.assert_close(dp, vp, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dc, vc, rtol=1e-8, atol=0)


def test_batched_curve_fit_with_covariances_equals_separate_fits():
    """A batch with one covariance per curve (B, N, N), or one for all (1, N, N): each curve's
    popt and pcov are those of its own fit (the broadcast route and a given jac included)."""
    y = _batch(4)
    p0 = torch.tensor([[1.0, 1.0, 0.0]] * 4, dtype=D)
    scale = 0.01 + 0.02 * torch.rand(4, 30, generator=seeded(6), dtype=D)
    covs = _ar1_cov(30, 0.5, scale)
    for jac in (None, _decay_jac):
        popt, pcov = curve_fit(_decay, T, y, p0, sigma=covs, jac=jac)
        shared_p, shared_c = curve_fit(_decay, T, y, p0, sigma=covs[:1], jac=jac)
        for i in (0, 3):
            one, c1 = curve_fit(_decay, T, y[i], [1.0, 1.0, 0.0], sigma=covs[i], jac=jac)
            torch.testing.assert_close(popt[i], one, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(pcov[i], c1, rtol=1e-7, atol=1e-16)
            s0, c0 = curve_fit(_decay, T, y[i], [1.0, 1.0, 0.0], sigma=covs[0], jac=jac)
            torch.testing.assert_close(shared_p[i], s0, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(shared_c[i], c0, rtol=1e-7, atol=1e-16)


@torch_core
def test_a_bad_covariance_sigma_is_refused_before_the_fit():
    """Named errors: a shape that is neither standard deviations nor covariances, an
    asymmetric or indefinite covariance, non-finite entries."""
    s = 0.01 + 0.02 * torch.rand(30, generator=seeded(2), dtype=D)
    cov = _ar1_cov(30, 0.6, s)
    with pytest.raises(ShapeError, match=r"covariance \(N, N\)"):
        curve_fit(_decay, T, Y, [1.0, 1.0, 0.0], sigma=cov[:, :29])
    with pytest.raises(ShapeError, match=r"\(B, N, N\) or \(1, N, N\)"):
        curve_fit(_decay, T, _batch(2), torch.ones(2, 3, dtype=D), sigma=cov)
    bad = cov.clone()
    bad[0, 1] += 1e-3
    with pytest.raises(ConfigurationError, match="symmetric"):
        curve_fit(_decay, T, Y, [1.0, 1.0, 0.0], sigma=bad)
    with pytest.raises(ConfigurationError, match="positive definite"):
        curve_fit(
            _decay, T, Y, [1.0, 1.0, 0.0], sigma=cov - 2 * torch.eye(30, dtype=D) * s.max() ** 2
        )
    with pytest.raises(NonFiniteError, match="finite"):
        curve_fit(_decay, T, Y, [1.0, 1.0, 0.0], sigma=cov * math.nan)


def test_args_and_kwargs_reach_fun_and_jac_as_in_scipy():
    """least_squares(fun, x0, args=, kwargs=) and minimize(..., args=): fun(x, *args,
    **kwargs), a callable jac too; a non-tuple args is one argument (scipy's rule). The same fit
    as the closure."""

    def resid(p, t, y, scale=1.0):
        return scale * (p[0] * torch.exp(-p[1] * t) + p[2] - y)

    def jac(p, t, y, scale=1.0):
        e = torch.exp(-p[1] * t)
        return scale * torch.stack([e, -p[0] * t * e, torch.ones_like(t)], -1)

    x0 = [1.0, 1.0, 0.0]
    ref = least_squares(lambda p: 2.0 * resid(p, T, Y), x0)
    got = least_squares(resid, x0, args=(T, Y), kwargs={"scale": 2.0})
    assert torch.equal(got.x, ref.x) and got.nfev == ref.nfev
    with_jac = least_squares(resid, x0, jac=jac, args=(T, Y), kwargs={"scale": 2.0})
    torch.testing.assert_close(with_jac.x, ref.x, rtol=1e-10, atol=1e-12)
    one = least_squares(lambda p, y: resid(p, T, y), x0, args=Y)  # one argument, not a tuple
    torch.testing.assert_close(one.x, ref.x, rtol=1e-10, atol=1e-12)
    m = steepest.minimize(lambda p, t, y: 0.5 * resid(p, t, y).square().sum(), x0, args=(T, Y))
    torch.testing.assert_close(m.x, ref.x, rtol=1e-6, atol=1e-8)


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


def test_a_single_curve_whose_formula_cumsums_over_axis_0_is_not_taken_as_pointwise():
    """f = cumsum(a x, 0) + b couples the points of one curve; in the pointwise route's layout
    (parameters (n, N)) axis 0 is the curves, so the route and a probe written in the same
    layout both missed the coupling, and one curve was fitted with the wrong Jacobian (popt
    7e-4 off, status 3). The probe now takes the true u^T J from the vmapped one-curve
    residual: curve_fit equals least_squares on the same residual, single and batched."""

    def f(x, a, b):
        return torch.cumsum(a * x, 0) + b

    x = torch.linspace(0.1, 1, 20, dtype=D)
    y = f(x, torch.tensor(2.0, dtype=D), torch.tensor(0.5, dtype=D))
    y = y + 0.01 * torch.randn(20, generator=seeded(0), dtype=D)
    ref = least_squares(
        lambda p: f(x, p[0], p[1]) - y, [1.0, 0.0], ftol=1.49012e-8, xtol=1.49012e-8
    )
    popt, _ = curve_fit(f, x, y, [1.0, 0.0])
    torch.testing.assert_close(popt, ref.x, rtol=1e-9, atol=1e-10)
    batch, _ = curve_fit(f, x, y.repeat(3, 1), torch.tensor([[1.0, 0.0]] * 3, dtype=D))
    torch.testing.assert_close(batch, ref.x.expand(3, 2), rtol=1e-9, atol=1e-10)


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

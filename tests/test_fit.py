"""Tests of steepest.fit (issue 12): least_squares against scipy, bad input, batched fits.

Also what test_fit_curve.py, test_fit_routes.py, test_fit_scales.py and test_fit_loss.py
import from here: the engine parametrization (:func:`pytest_generate_tests`, :func:`engine`,
:data:`torch_core`), the data, the test problems and the decay curves."""

from __future__ import annotations

import math

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


#: a test of this file (or of a test_fit_*.py module that imports it) that runs on the torch
#: core alone: a helper's unit test, an input check raised before any fit, or fits the compiled
#: core does not take (bounds, float32)
torch_core = pytest.mark.torch_core


def pytest_generate_tests(metafunc):
    """Each test on both engines (see :func:`engine`), one marked :data:`torch_core` on the
    torch core alone (its "numba" run would repeat the "torch" one under another name)."""
    one = metafunc.definition.get_closest_marker("torch_core") is not None
    metafunc.parametrize("engine", ["torch"] if one else ["torch", "numba"], indirect=True)


@pytest.fixture(autouse=True)
def engine(request, monkeypatch):
    """Every test of this file, and of the test_fit_*.py modules that import this fixture and
    :func:`pytest_generate_tests`, runs on both engines of least_squares: the torch core, and the
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


# ---------------------------------------------------------------------------- decay curves
def _decay(x, a, b, c):
    return a * torch.exp(-b * x) + c


def _decay_np(x, a, b, c):
    return a * np.exp(-b * x) + c


def _decay_jac(x, a, b, c):
    e = torch.exp(-b * x)
    return torch.stack([e, -a * x * e, torch.ones_like(e)], -1)


def _decay_jac_np(x, a, b, c):
    e = np.exp(-b * x)
    return np.stack([e, -a * x * e, np.ones_like(x)], -1)


def _batch(n: int, device: str = "cpu"):
    g = seeded(3)
    a = 1 + torch.rand(n, 1, generator=g, dtype=D)
    b = 0.5 + torch.rand(n, 1, generator=g, dtype=D)
    c = torch.rand(n, 1, generator=g, dtype=D)
    y = a * torch.exp(-b * T) + c + 0.01 * torch.randn(n, 30, generator=g, dtype=D)
    return y.to(device)


def _decay_curve(i: int | list[int] = 9082):
    """Curves i of benchmarks/fit_speed.py's decay_data(10000) (the same generator)."""
    g = torch.Generator().manual_seed(0)
    t = torch.linspace(0, 5, 50, dtype=D)
    a = 1 + torch.rand(10_000, 1, generator=g, dtype=D)
    k = 0.3 + 2 * torch.rand(10_000, 1, generator=g, dtype=D)
    c = torch.rand(10_000, 1, generator=g, dtype=D)
    y = a * torch.exp(-k * t) + c + 0.01 * torch.randn(10_000, 50, generator=g, dtype=D)
    return t, y[i]


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
    # f0 is checked by its sum, then entry by entry: one inf among finite entries, one NaN in a
    # batch, are named; finite residuals whose sum overflows (1e308 each) are not
    with pytest.raises(NonFiniteError, match=r"not finite at x0 \(4 of 30"):
        least_squares(lambda p: torch.where(T < 0.5, math.inf, p[0] * T), [1.0])
    with pytest.raises(NonFiniteError, match=r"not finite at x0 \(30 of 90"):
        rows = torch.tensor([[1.0, 1], [0, 0], [1, 1]], dtype=D)  # row 1: 0/0
        least_squares(lambda p: p[:, :1] / p[:, 1:] * T, rows)
    big = least_squares(lambda p: 1e308 * torch.stack([p[0], p[0] - 1]), [0.5], max_nfev=2)
    assert big.nfev >= 1 and bool(torch.isfinite(big.fun).all())
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


# ---------------------------------------------------------------------------- batched
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


# ---------------------------------------------------------------------------- the package
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

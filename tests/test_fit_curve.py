"""Tests of steepest.fit (issue 12): curve_fit against scipy: sigma, jac=, covariances, args."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reference import seeded
from scipy import optimize as sopt
from test_fit import (
    PROBLEMS,
    D,
    T,
    Y,
    _batch,
    _decay,
    _decay_curve,
    _decay_jac,
    _decay_jac_np,
    _decay_np,
    engine,  # noqa: F401 (the autouse fixture: each test on both engines)
    pytest_generate_tests,  # noqa: F401 (the hook that parametrizes engine)
    torch_core,
)
from torch.autograd.functional import jacobian

import steepest
from steepest.errors import ConfigurationError, ConvergenceError, NonFiniteError, ShapeError
from steepest.fit import curve_fit, least_squares


# ---------------------------------------------------------------------------- curve_fit
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


# ---------------------------------------------------------------------------- jac=
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
def test_batched_curve_fit_with_jac_equals_separate_fits(route, engine):  # noqa: F811
    """A jac that broadcasts is called once a Jacobian stage with the parameter columns (B, 1)
    (no vmap); one that does not (``torch.ones_like(x)`` has shape (N,) and does not stack
    with (B, N)) is caught by the probe and vmapped. Both, with a sigma per curve, equal the
    separate fits with jac (which equal scipy's, above). A batch of at most 16 curves is
    probed whole on either engine, so the compiled core does not check J after the fit."""
    y = _batch(5)
    p0 = torch.tensor([[1.0, 1.0, 0.0]] * 5, dtype=D)
    s = 0.01 + 0.02 * torch.rand(5, 30, generator=seeded(4), dtype=D)
    seen = []

    def jac(x, a, b, c):
        seen.append(tuple(a.shape))
        e = torch.exp(-b * x)
        one = torch.ones_like(e if route == "broadcast" else x)
        return torch.stack([e, -a * x * e, one], -1)

    popt, pcov = curve_fit(_decay, T, y, p0, sigma=s, jac=jac, engine=engine)
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


# ---------------------------------------------------------------------------- a covariance sigma
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


# ---------------------------------------------------------------------------- args and kwargs
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

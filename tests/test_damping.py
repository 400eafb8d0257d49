"""Damping rules (steepest.damping): the Levenberg-Marquardt rule of Moré 1978 / Martens 2010,
and Moré's trust-region form on the scaled step (MINPACK lmder)."""

import math

import numpy as np
import pytest
import torch
from reference import rel_err, seeded

from steepest import GaussNewton, Optimizer
from steepest.damping import (
    Constant,
    Damping,
    LevenbergMarquardt,
    MoreTrustRegion,
    Trial,
    as_damping,
)
from steepest.errors import ConfigurationError
from steepest.linop import Factor, LinearOperator
from steepest.losses import MSE

F64 = torch.float64


def test_constant_is_fixed_and_never_rejects():
    c = Constant(0.5)
    for rho in (-math.inf, -1.0, 0.0, 0.5, 1.0, 10.0):
        c.update(rho)
        assert c.value == 0.5
    assert not c.adaptive and not c.reject and c.max_tries == 1
    c.raise_for_retry()
    assert c.value == 0.5


@pytest.mark.parametrize(
    "rho, factor",
    [(1.0, 2 / 3), (0.76, 2 / 3), (0.75, 1.0), (0.5, 1.0), (0.25, 1.0), (0.24, 1.5),
     (-3.0, 1.5), (-math.inf, 1.5), (math.nan, 1.5), (math.inf, 2 / 3)],
)
def test_lm_rule_thresholds(rho, factor):
    """lambda * decrease when rho > 3/4, * increase when rho < 1/4 or rho is nan/-inf."""
    lm = LevenbergMarquardt(init=1.0, decrease=2 / 3, increase=1.5)
    lm.update(rho)
    assert lm.value == pytest.approx(factor, rel=1e-15)


def test_lm_bounds_and_retry():
    lm = LevenbergMarquardt(init=1.0, decrease=0.5, increase=4.0, min=0.2, max=10.0)
    for _ in range(5):
        lm.update(1.0)
    assert lm.value == 0.2  # clipped at min
    for _ in range(5):
        lm.raise_for_retry()
    assert lm.value == 10.0  # clipped at max
    assert lm.adaptive and lm.reject and lm.max_tries == 20


def test_lm_state_dict_round_trip():
    lm = LevenbergMarquardt(init=1e-2)
    lm.update(-1.0)
    other = LevenbergMarquardt(init=7.0)
    other.load_state_dict(lm.state_dict())
    assert other.value == lm.value == pytest.approx(1e-2 * lm.increase)
    c = Constant(3.0)
    c2 = Constant()
    c2.load_state_dict(c.state_dict())
    assert c2.value == 3.0


@pytest.mark.parametrize(
    "kwargs",
    [dict(init=0.0), dict(init=-1.0), dict(decrease=1.0), dict(increase=0.9),
     dict(decrease=0.0), dict(min=2.0, max=1.0), dict(max_tries=0)],
)
def test_lm_rejects_bad_configuration(kwargs):
    with pytest.raises(ConfigurationError):
        LevenbergMarquardt(**kwargs)


@pytest.mark.parametrize("bad", [-1.0, math.inf, math.nan, "0.1"])
def test_constant_rejects_bad_lambda(bad):
    with pytest.raises(ConfigurationError):
        Constant(bad)


def test_as_damping():
    assert isinstance(as_damping(0.1), Constant) and as_damping(0.1).value == 0.1
    lm = LevenbergMarquardt()
    assert as_damping(lm) is lm
    for bad in (True, "lm", None):
        with pytest.raises(ConfigurationError):
            as_damping(bad)
    assert issubclass(LevenbergMarquardt, Damping)


# ------------------------------------------------------------------ MoreTrustRegion
def _dense_op(m: torch.Tensor, u: torch.Tensor | None = None) -> LinearOperator:
    return LinearOperator(lambda v: m @ v, m.shape[0], m.dtype,
                          factor=(lambda: Factor(u, 1)) if u is not None else None,
                          factor_rows=None if u is None else u.shape[0])


def _spd(p: int, seed: int, rank: int | None = None, spread: float = 4.0):
    """M = U^T U with columns scaled over ``spread`` decades (badly scaled parameters)."""
    g = seeded(seed)
    u = torch.randn(rank or p + 3, p, generator=g, dtype=F64)
    u = u * torch.logspace(0, spread, p, dtype=F64)
    return u.T @ u, u, torch.randn(p, generator=g, dtype=F64) * torch.logspace(0, spread, p,
                                                                                 dtype=F64)


def _try(rule: MoreTrustRegion, op: LinearOperator, g: torch.Tensor):
    damped = rule.damped(op, g, torch.zeros_like(g))
    delta = torch.linalg.solve(damped.to_dense(), -g)
    return damped, delta, rule.scale


@pytest.mark.parametrize("seed", range(4))
def test_more_step_solves_the_scaled_trust_region_problem(seed):
    """delta = -(M + lambda D^2)^-1 g with ||D delta|| = Delta (to sigma); lambda equals the
    root of ||D (M + lambda D^2)^-1 g|| = Delta found by scipy's brentq on dense solves, and
    delta beats SLSQP on min q(delta) s.t. ||D delta|| <= Delta in the scaled variables D delta;
    lambda = 0 when the Gauss-Newton step fits."""
    from scipy.optimize import brentq, minimize

    m, _, g = _spd(5, seed)
    op = _dense_op(m)
    rule = MoreTrustRegion(sigma=1e-9)
    d = m.diagonal().sqrt()
    newton = torch.linalg.solve(m, -g)
    full = float((d * newton).norm())
    ms, gs = m / d[:, None] / d[None, :], g / d

    def q(y):  # the model in the scaled variables y = D delta
        y = torch.as_tensor(y, dtype=F64)
        return float(gs @ y + 0.5 * y @ ms @ y)

    for radius in (1e-3 * full, 0.3 * full, 0.9 * full):
        rule.radius = radius
        damped, delta, scale = _try(rule, op, g)
        assert torch.equal(scale, d) and rule.value > 0
        assert float((d * delta).norm()) == pytest.approx(radius, rel=1e-8)
        assert torch.allclose(damped.shift, rule.value * d**2)

        def excess(lam, radius=radius):
            step = torch.linalg.solve(m + lam * torch.diag(d**2), -g)
            return float((d * step).norm()) - radius

        lam_ref = brentq(excess, 0.0, float(gs.norm()) / radius, xtol=1e-300, rtol=1e-14)
        assert rule.value == pytest.approx(lam_ref, rel=1e-6)
        cons = {"type": "ineq", "fun": lambda y, r=radius: r**2 - float(np.sum(y**2))}
        ref = minimize(q, np.zeros(5), method="SLSQP", constraints=[cons],
                       options={"ftol": 1e-14, "maxiter": 1000})
        assert float(np.linalg.norm(ref.x)) <= radius * (1 + 1e-6)
        assert q(d * delta) <= ref.fun + 1e-7 * abs(ref.fun)
    rule.radius = 2 * full  # the Gauss-Newton step lies inside: lambda = 0
    _, delta, _ = _try(rule, op, g)
    assert rule.value == 0.0 and rel_err(delta, newton) < 1e-10


def test_more_factor_path_equals_the_dense_path():
    """A rank-deficient M with a factor (R < P): lambda from the SVD of U D^-1 equals lambda
    from the dense eigen-decomposition."""
    m, u, g = _spd(7, 3, rank=4)
    for radius in (1e-2, 1.0, 30.0):
        lams = []
        for op in (_dense_op(m), _dense_op(m, u)):
            rule = MoreTrustRegion(sigma=1e-8)
            rule.radius = radius
            rule.damped(op, g, torch.zeros_like(g))
            lams.append(rule.value)
        assert lams[0] > 0 and lams[1] == pytest.approx(lams[0], rel=1e-6)


def test_more_on_an_indefinite_matrix_gives_descent_inside_the_radius():
    g0 = seeded(11)
    a = torch.randn(6, 6, generator=g0, dtype=F64)
    m = a + a.T  # indefinite
    g = torch.randn(6, generator=g0, dtype=F64)
    op = _dense_op(m)
    rule = MoreTrustRegion(sigma=1e-6)
    rule.radius = 0.5
    damped, delta, d = _try(rule, op, g)
    assert torch.linalg.eigvalsh(damped.to_dense())[0] > 0
    assert float(g @ delta) < 0
    assert float((d * delta).norm()) == pytest.approx(0.5, rel=1e-6)


@pytest.mark.parametrize(
    "rho, loss_new, expected",
    [(0.9, 0.5, "2p"),  # good agreement: Delta = 2 ||D delta||
     (0.5, 0.8, "same"),  # lambda > 0 and 1/4 < rho < 3/4: unchanged
     (0.1, 0.95, "half"),  # poor agreement, loss down: 1/2 min(Delta, 10 ||D delta||)
     (-1.0, 1.2, "interp"),  # loss up: quadratic interpolation, clipped to [0.1, 0.5]
     (-1.0, 500.0, "tenth")],  # loss up a hundredfold: 1/10
)
def test_more_radius_update(rho, loss_new, expected):
    m, _, g = _spd(4, 5, spread=0.0)
    rule = MoreTrustRegion()
    rule.radius = 0.01
    _, delta, d = _try(rule, _dense_op(m), g)
    assert rule.value > 0
    rule._first = False
    pnorm = float((d * delta).norm())
    gdelta = float(g @ delta)
    lam = rule.value
    rule.update(rho, Trial(delta, gdelta, 1.0, loss_new))
    mu = -gdelta / (2 * (loss_new - 1.0 - gdelta))
    temp = {"2p": 0.5, "same": 1.0, "half": 0.5, "interp": min(max(mu, 0.1), 0.5),
            "tenth": 0.1}[expected]
    want = {"2p": 2 * pnorm, "same": 0.01, "half": 0.5 * min(0.01, 10 * pnorm),
            "interp": temp * min(0.01, 10 * pnorm),
            "tenth": 0.1 * min(0.01, 10 * pnorm)}[expected]
    assert rule.radius == pytest.approx(want, rel=1e-12)
    # lambda follows the radius into the next try's lmpar (MINPACK: par / temp, par / 2)
    assert rule.value == pytest.approx(lam * (0.5 if expected == "2p" else 1 / temp), rel=1e-12)


def _scaled_factor(seed: int, m: int, p: int, spread: float = 3.0):
    """steepest.fit's factorisation of a badly scaled A (m x p) with residuals f."""
    from steepest.fit import _factor

    g = seeded(seed)
    a = torch.randn(1, m, p, generator=g, dtype=F64) * torch.logspace(0, spread, p, dtype=F64)
    f = torch.randn(1, m, generator=g, dtype=F64)
    return _factor(a, f, 0.0)


@pytest.mark.parametrize("seed", range(3))
def test_more_lambda_is_minpacks_lmpar(seed):
    """lambda of a try equals MINPACK's lmpar from the same radius and par (steepest.fit's
    _lmpar, which reproduces scipy's lm evaluation by evaluation: tests/test_fit.py), on the
    same spectrum: the Gauss-Newton step inside (lambda 0), just outside, far outside, from
    par = 0 and from a carried par; 10 iterations at most, the 10th kept."""
    from steepest.fit import _lmpar

    fac = _scaled_factor(seed, 9, 4)
    mu, c = fac.mu[0], fac.c[0]
    full = float(fac.gn_norm[0])
    rule = MoreTrustRegion()
    seen = set()
    for radius in (2 * full, 0.95 * full, 0.5 * full, 1e-3 * full, 1e-8 * full):
        for par in (0.0, 1e-6, 1.0, 1e6):
            want = float(_lmpar(fac, torch.tensor([radius], dtype=F64),
                                torch.tensor([par], dtype=F64))[0][0])
            got = rule._lmpar(mu, c, radius, par)
            assert got == pytest.approx(want, rel=1e-12, abs=0.0), (radius, par)
            seen.add(got == 0.0)
    assert seen == {True, False}


@pytest.mark.parametrize("rows", [9, 3])
def test_more_damped_operator_carries_the_inverse_of_its_svd(rows):
    """On a metric with a sample-space factor (rows >= P, and rows < P) the damped operator
    M + lambda D^2 carries its own inverse from the SVD of U D^-1 (no Cholesky of the squared
    matrix): it equals the dense solve, Auto takes it, and a further damping drops it."""
    from steepest.solvers import Auto, OwnInverse

    p = 5
    g0 = seeded(40 + rows)
    u = torch.randn(rows, p, generator=g0, dtype=F64) * torch.logspace(0, 3, p, dtype=F64)
    m = u.T @ u / 1
    g = u.T @ torch.randn(rows, generator=g0, dtype=F64)  # in the row space, as J^T r
    op = _dense_op(m, u)
    rule = MoreTrustRegion()
    rule.radius = 1e-2
    damped = rule.damped(op, g, torch.zeros(p, dtype=F64))
    assert rule.value > 0 and damped.has_inverse()
    assert isinstance(Auto().choose(damped), OwnInverse)
    dense = m + torch.diag(rule.value * rule.scale**2)
    b = torch.randn(p, generator=g0, dtype=F64)
    assert rel_err(damped.solve(b), torch.linalg.solve(dense, b)) < 1e-9
    assert not damped.add_diagonal(1.0).has_inverse()
    # the dense path (no factor) decomposes M + lambda D^2 by eigh: no inverse of its own
    assert not MoreTrustRegion().damped(_dense_op(m), g, torch.zeros(p, dtype=F64)).has_inverse()


def test_more_first_radius_and_state_dict():
    m, _, g = _spd(4, 6, spread=1.0)
    theta = torch.arange(1.0, 5.0, dtype=F64)
    rule = MoreTrustRegion(factor=100.0)
    rule.damped(_dense_op(m), g, theta)
    d = m.diagonal().sqrt()
    assert rule.radius == pytest.approx(100 * float((d * theta).norm()), rel=1e-12)
    other = MoreTrustRegion()
    other.load_state_dict(rule.state_dict())
    assert other.radius == rule.radius and torch.equal(other.scale, rule.scale)
    rule.raise_for_retry()
    assert rule.radius == pytest.approx(0.25 * other.radius)


@pytest.mark.parametrize("kwargs", [dict(factor=0.0), dict(sigma=1.0), dict(sigma=-1),
                                    dict(min_rho=0.3), dict(min_rho=-1.0),
                                    dict(radius_min=math.nan), dict(max_tries=0)])
def test_more_rejects_bad_configuration(kwargs):
    with pytest.raises(ConfigurationError, match="MoreTrustRegion"):
        MoreTrustRegion(**kwargs)


class _Exp(torch.nn.Module):
    """y = b1 exp(b2 / (x + b3)) with parameter b = c * units (the units rescale b)."""

    def __init__(self, b0, units=(1.0, 1.0, 1.0)):
        super().__init__()
        self.units = torch.tensor(units, dtype=F64)
        self.c = torch.nn.Parameter(torch.tensor(b0, dtype=F64) / self.units)

    def forward(self, x):
        b = self.c * self.units
        return b[0] * torch.exp(b[1] / (x + b[2]))


def _exp_data():
    x = torch.arange(50.0, 126.0, 5.0, dtype=F64).view(-1, 1)
    b = (0.0056, 6181.35, 345.22)  # a badly scaled fit of the MGH10 kind, data generated
    return x, b[0] * torch.exp(b[1] / (x + b[2])), b


def test_more_is_invariant_to_the_units_of_a_parameter():
    """MINPACK's scaling: rescaling b by diagonal units gives the same iterates in b."""
    x, y, _ = _exp_data()
    paths = []
    for units in ((1.0, 1.0, 1.0), (1e-3, 1e3, 10.0)):
        model = _Exp((0.02, 4000.0, 250.0), units)
        opt = Optimizer(model, MSE(), metric=GaussNewton(), damping=MoreTrustRegion(),
                        solver="cholesky")
        path = []
        for _ in range(8):
            opt.step(x, y)
            path.append((model.c * model.units).detach().clone())
        paths.append(torch.stack(path))
    assert rel_err(paths[1], paths[0]) < 1e-8


def test_more_solves_a_badly_scaled_exponential_fit():
    """From b = (2, 4e5, 2.5e4) (the hard NIST MGH10 start) on generated data: Moré's scaled
    trust region reaches the generating parameters (benchmarks/nist.md: 54 of 54)."""
    x, y, b = _exp_data()
    model = _Exp((2.0, 4e5, 2.5e4))
    opt = Optimizer(model, MSE(), metric=GaussNewton(), damping=MoreTrustRegion(),
                    solver="cholesky")
    for _ in range(600):
        info = opt.step(x, y)
        if info.accepted and info.step_norm <= 1e-13 * float(model.c.detach().norm()):
            break
    assert rel_err(model.c.detach(), torch.tensor(b, dtype=F64)) < 1e-7


def test_more_rejects_a_step_below_min_rho():
    """A try that lowers the loss but by less than min_rho of the prediction is rejected,
    and retried with a smaller radius (MINPACK accepts at ratio >= 1e-4)."""
    x, y, _ = _exp_data()
    model = _Exp((0.02, 4000.0, 250.0))
    strict = MoreTrustRegion(min_rho=0.2)
    opt = Optimizer(model, MSE(), metric=GaussNewton(), damping=strict, solver="cholesky")
    seen = []
    for _ in range(30):
        info = opt.step(x, y)
        seen.append(info)
        assert not info.accepted or info.rho >= 0.2
    rejected = [m for i in seen for m in i.message.split("; ") if "below 0.2" in m]
    assert rejected  # the rule was exercised, not only trivially satisfied
    assert MoreTrustRegion().min_rho == 1e-4 and LevenbergMarquardt().min_rho == -math.inf


class _Linear(torch.nn.Module):
    def __init__(self, p: int, seed: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(p, 1, generator=seeded(seed), dtype=F64))

    def forward(self, x):
        return x @ self.w


@pytest.mark.parametrize("n, p, solver", [(6, 10, "auto"), (6, 10, "cholesky"),
                                          (20, 5, "cholesky"), (20, 5, "auto")])
def test_more_on_a_singular_metric_never_takes_lambda_zero(n, p, solver):
    """Linear least squares with a singular J^T J (fewer samples than parameters; or a
    duplicated column, numerically rank deficient): lambda stays > 0 and the fit reaches the
    least-squares floor in a few steps. With the rule's own inverse (auto) no try fails; a
    Cholesky that cannot factorise MINPACK's tiny lambda on the duplicated column is retried
    once at the same radius with lambda lifted to the margin, before any evaluation."""
    g = seeded(100 + n)
    x = torch.randn(n, p, generator=g, dtype=F64)
    if n > p:
        x[:, -1] = x[:, 0]  # rank p - 1
    y = torch.randn(n, 1, generator=g, dtype=F64)
    floor = float(0.5 * ((x @ torch.linalg.lstsq(x, y).solution - y) ** 2).mean())
    model = _Linear(p, n)
    opt = Optimizer(model, MSE(), metric=GaussNewton(), damping=MoreTrustRegion(),
                    solver=solver)
    for _ in range(6):
        info = opt.step(x, y)
        failed = info.message.count("not positive definite")
        assert failed == 0 if (solver == "auto" or n < p) else failed <= 1
        assert info.damping > 0 and info.evaluations <= info.tries - failed
        assert info.accepted or info.converged
    loss = float(0.5 * ((model(x).detach() - y) ** 2).mean())
    assert loss - floor <= 1e-10 * max(1.0, float(0.5 * (y**2).mean()))


def test_more_hard_case_keeps_the_damped_matrix_definite():
    """c orthogonal to the eigenvector of the most negative eigenvalue (Moré-Sorensen's hard
    case): lambda stays strictly above -mu_min, so M + lambda D^2 is positive definite."""
    m = torch.diag(torch.tensor([-1.0, 1.0, 2.0], dtype=F64))
    g = torch.tensor([0.0, 1.0, 1.0], dtype=F64)
    rule = MoreTrustRegion()
    rule.radius = 10.0
    damped = rule.damped(_dense_op(m), g, torch.zeros(3, dtype=F64))
    assert rule.value > 1.0
    assert float(torch.linalg.eigvalsh(damped.to_dense())[0]) > 0
    assert int(torch.linalg.cholesky_ex(damped.to_dense()).info) == 0


def test_more_first_step_rule_lasts_until_a_step_is_accepted():
    """Delta = min(Delta, ||D delta||) applies on every try until one is accepted (MINPACK's
    iter = 1): a try rejected for rho < min_rho does not end it."""
    m, _, g = _spd(4, 8, spread=0.0)
    rule = MoreTrustRegion()
    rule.damped(_dense_op(m), g, torch.ones(4, dtype=F64))
    _, delta, d = _try(rule, _dense_op(m), g)
    rule.update(5e-5, Trial(delta, float(g @ delta), 1.0, 0.99999))  # lowered, rho < 1e-4
    assert rule._first
    rule.update(0.5, Trial(delta, float(g @ delta), 1.0, 0.5))
    assert not rule._first


class _Gated(torch.nn.Module):
    """A linear model of 6 weights and two gates entering only through relu(gate - 5): at
    gate = 0 their columns of J are exactly zero (the SVD then gives singular values ~1e-17
    s_max, not 0)."""

    def __init__(self):
        super().__init__()
        f64 = torch.float64
        self.w1 = torch.nn.Parameter(0.1 * torch.ones(2, 1, dtype=f64))
        self.gate1 = torch.nn.Parameter(torch.zeros(1, dtype=f64))
        self.w2 = torch.nn.Parameter(0.1 * torch.ones(2, 1, dtype=f64))
        self.gate2 = torch.nn.Parameter(torch.zeros(1, dtype=f64))
        self.w3 = torch.nn.Parameter(0.1 * torch.ones(2, 1, dtype=f64))

    def forward(self, x):
        w = torch.cat([self.w1, self.w2, self.w3])
        on1, on2 = torch.relu(self.gate1 - 5.0), torch.relu(self.gate2 - 5.0)
        return x @ w + on1 * x[:, :1] + on2 * x[:, 1:2]


@pytest.mark.parametrize("seed", range(4))
def test_more_trust_region_leaves_zero_jacobian_columns_alone(seed):
    """Parameters whose Jacobian column is exactly zero get no step, as in MINPACK (a zero R_kk:
    nsing) and scipy's least_squares(method="lm"): the SVD route leaves zero columns out (before:
    an SVD of the whole factor gave them singular values ~1e-17 s_max, whose rounding-noise
    c_i / (mu_i + tiny lambda) threw the gates by about the trust radius, e.g. to -764, or past
    5, switching their relu on)."""
    g = seeded(seed)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64) * torch.logspace(
        0, 2, 6, dtype=torch.float64
    )
    y = x @ torch.randn(6, 1, generator=g, dtype=torch.float64)
    y = y + 0.1 * torch.randn(40, 1, generator=g, dtype=torch.float64)
    model = _Gated()
    opt = Optimizer(model, MSE(), metric=GaussNewton(), damping=MoreTrustRegion(), gtol=1e-8)
    for _ in range(10):
        info = opt.step(x, y)
        if info.converged:
            break
    gates = torch.cat([model.gate1, model.gate2]).detach()
    assert torch.equal(gates, torch.zeros(2, dtype=torch.float64))
    w = torch.cat([model.w1, model.w2, model.w3]).detach()
    assert rel_err(w, torch.linalg.lstsq(x, y).solution) < 1e-8


class _Rare(torch.nn.Module):
    """20 weights and a parameter p that only 4 of 200 samples see (x[:, 20] = 0 elsewhere)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(20, 1, dtype=torch.float64))
        self.p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def forward(self, x):
        return x[:, :20] @ self.w + self.p * x[:, 20:21]


def test_more_trust_region_steps_along_a_zero_column_the_gradient_sees():
    """On a curvature sub-batch that misses p, p's column of the factor is zero but the
    full-batch gradient on p is not: the step is the exact (M + lambda D^2)^-1 there (1/lambda),
    and the fit reaches p = 3 as with the whole batch (a pseudo-inverse, right for a zero
    column of the gradient's own rows, froze p at 0.07 with the loss at 7.35)."""
    g = seeded(0)
    x = torch.randn(200, 21, generator=g, dtype=torch.float64)
    x[:, 20] = 0
    x[:4, 20] = 10.0
    y = x[:, :20] @ torch.randn(20, 1, generator=g, dtype=torch.float64) + 3 * x[:, 20:21]
    torch.manual_seed(0)
    model = _Rare()
    opt = Optimizer(
        model, MSE(), metric=GaussNewton(), damping=MoreTrustRegion(), curvature_batch_size=8
    )
    for _ in range(30):
        info = opt.step(x, y)
    assert abs(float(model.p.detach()) - 3.0) < 1e-4 and info.loss < 1e-8

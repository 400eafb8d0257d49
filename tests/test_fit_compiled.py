"""Tests of the compiled core of steepest.fit (fit/compiled.py): ``engine="numba"`` against
``engine="torch"``, the same MINPACK algorithm, so the same fits to rounding, evaluation for
evaluation; its driver (threads, the running set; a batch in parts:
test_fit_compiled_parts.py). Everything float64 on the CPU (the only case the compiled core
takes). Its kernels' own tests: test_fit_kernels.py."""

from __future__ import annotations

import math

import numba  # a test dependency: a broken install fails here, not skips
import numpy as np
import pytest
import torch
from numba_threads import kernels, numba_threads, record
from reference import seeded
from scipy import optimize as sopt

import steepest
from steepest.errors import ConfigurationError
from steepest.fit import compiled, curve_fit, least_squares

D = torch.float64
METHODS = ["trust-region", "levenberg-marquardt", "gauss-newton"]
B = 300  # > PARALLEL_MIN and AUTO_MIN_BATCH: the batches below take every compiled route


# ------------------------------------------------------------------------------- the problems
T = torch.linspace(0, 4, 50, dtype=D)


def _decay(x, a, b, c):
    return a * torch.exp(-b * x) + c


def decay(n: int = B, seed: int = 1, noise: float = 0.02):
    """n curves a exp(-b t) + c on 50 points with normal noise of that deviation, starts
    within 30 % of the truth; the batched fun (n, 3) -> (n, 50) and its Jacobian."""
    g = seeded(seed)
    a = 1 + torch.rand(n, 1, generator=g, dtype=D)
    b = 0.3 + 2 * torch.rand(n, 1, generator=g, dtype=D)
    c = torch.randn(n, 1, generator=g, dtype=D)
    y = a * torch.exp(-b * T) + c + noise * torch.randn(n, 50, generator=g, dtype=D)
    x0 = torch.cat([a, b, c], 1) * (0.7 + 0.6 * torch.rand(n, 3, generator=g, dtype=D))

    def fun(p):
        return p[:, :1] * torch.exp(-p[:, 1:2] * T) + p[:, 2:3] - y

    def jac(p):
        e = torch.exp(-p[:, 1:2] * T)
        return torch.stack([e, -p[:, :1] * T * e, torch.ones_like(e)], -1)

    return fun, jac, x0


def exact_decay(n: int = B, seed: int = 4):
    """decay without noise: zero residual at the truth with M > P, the endgame of a tall
    zero-residual fit, where the engines' rounding decides between the residual floor and
    xtol."""
    return decay(n, seed, noise=0.0)


def rosenbrock(n: int = B, seed: int = 2):
    """Rosenbrock's function with a third residual 0.5 (x_0 + x_1 - 2) (M > P, the same
    minimum (1, 1) at zero residual), from random starts around (-1.2, 1)."""
    x0 = torch.tensor([-1.2, 1.0], dtype=D) + torch.randn(n, 2, generator=seeded(seed), dtype=D)

    def fun(x):
        return torch.stack(
            [10 * (x[:, 1] - x[:, 0] ** 2), 1 - x[:, 0], 0.5 * (x[:, 0] + x[:, 1] - 2)], -1
        )

    def jac(x):
        one, zero = torch.ones_like(x[:, 0]), torch.zeros_like(x[:, 0])
        rows = [(-20 * x[:, 0], 10 * one), (-one, zero), (0.5 * one, 0.5 * one)]
        return torch.stack([torch.stack(r, -1) for r in rows], 1)

    return fun, jac, x0


def unused(n: int = B, seed: int = 3):
    """decay with a fourth parameter that does not enter: J's column 3 exactly 0 (rank 3)."""
    fun3, jac3, x3 = decay(n, seed)
    x0 = torch.cat([x3, torch.randn(n, 1, generator=seeded(seed), dtype=D)], 1)

    def fun(p):
        return fun3(p[:, :3]) + 0 * p[:, 3:]

    def jac(p):
        return torch.cat([jac3(p[:, :3]), torch.zeros(p.shape[0], 50, 1, dtype=D)], -1)

    return fun, jac, x0


def zero_residual(n: int = B, seed: int = 4):
    """f = (x_0 + x_1^2, x_1 - x_0^2 / 2, x_0 x_1 / 2 + x_0^3): f = 0 at x* = 0 only, where a
    relative xtol cannot fire (the residual floor stops it); two starts at x* itself (f = 0:
    gtol at x0)."""
    x0 = torch.randn(n, 2, generator=seeded(seed), dtype=D)
    x0[:2] = 0.0

    def fun(x):
        a, b = x[:, 0], x[:, 1]
        return torch.stack([a + b**2, b - 0.5 * a**2, 0.5 * a * b + a**3], -1)

    def jac(x):
        a, b = x[:, 0], x[:, 1]
        rows = [
            (torch.ones_like(a), 2 * b),
            (-a, torch.ones_like(a)),
            (0.5 * b + 3 * a**2, 0.5 * a),
        ]
        return torch.stack([torch.stack(r, -1) for r in rows], 1)

    return fun, jac, x0


PROBLEMS = {
    "decay": decay,
    "exact-decay": exact_decay,
    "rosenbrock": rosenbrock,
    "unused": unused,
    "zero": zero_residual,
}


def _rows(res, keep: torch.Tensor) -> dict:
    """The entries of a batched result on the fits ``keep`` (a dict with the same keys)."""
    return steepest.fit.OptimizeResult(
        {k: v[keep] for k, v in res.items() if isinstance(v, torch.Tensor)}
    )


def assert_same_fits(rn, rt, *, most: float = 0.99) -> None:
    """Two results of the same batch by the two engines: x to 1e-7 relative (absolute below
    1), cost to 1e-10 relative, success equal on every fit; nfev equal on at least ``most`` of
    the fits, njev on 98 %, the status on 75 %. (At convergence actred and the ftol test are
    rounding noise, so the last try may be accepted by one engine only, and a fit stop with
    status 3 where the other says 4: measured over these tests, nfev differs on at most 2 fits
    in 300, njev on 3, the status on 45 (all between the codes 1-4 of success); x by at most
    1e-8, the cost 1e-13.)"""
    scale = rt.x.abs().clamp_min(1.0)
    dx = ((rn.x - rt.x).abs() / scale).max()
    assert float(dx) <= 1e-7, float(dx)
    torch.testing.assert_close(rn.cost, rt.cost, rtol=1e-10, atol=1e-20)
    assert torch.equal(rn.success, rt.success)
    for key, share in (("nfev", most), ("njev", min(most, 0.98)), ("status", 0.75)):
        same = float((rn[key] == rt[key]).double().mean())
        assert same >= share, (key, same)


def assert_consistent(res, fun, jac) -> None:
    """The result's fun and jac are those at its x (a fit whose last step was accepted gets
    J evaluated there, not counted in njev), and the counts are ordered."""
    torch.testing.assert_close(res.fun, fun(res.x), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(res.jac, jac(res.x), rtol=1e-14, atol=1e-14)
    assert bool((res.nit <= res.njev).all() and (res.njev <= res.nit + 1).all())
    assert bool((res.njev <= res.nfev).all())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_engines_agree_on_a_batch(name, method):
    """300 fits of each problem by each method, jac= given: engine="numba" gives engine="torch"'s
    fits (assert_same_fits). Per problem: decay's fits all succeed; the unused parameter stays
    exactly at x0 (its direction is dropped); the zero-residual fits reach x* = 0 by the
    residual floor, those started at x* stop there at once by gtol."""
    fun, jac, x0 = PROBLEMS[name]()
    kw = {"method": method, "jac": jac}
    rt = least_squares(fun, x0, engine="torch", **kw)
    rn = least_squares(fun, x0, engine="numba", **kw)
    assert_same_fits(rn, rt)
    assert_consistent(rn, fun, jac)
    if name in ("decay", "unused"):
        assert bool(rn.success.all())
    if name == "unused":
        assert torch.equal(rn.x[:, 3], x0[:, 3]) and torch.equal(rt.x[:, 3], x0[:, 3])
    if name == "zero":
        assert bool(rn.success.all()) and float(rn.x.abs().max()) < 1e-7
        assert rn.status[:2].tolist() == [1, 1] and rn.nfev[:2].tolist() == [1, 1]
        assert bool((rn.status[2:] == 2).all())
    if name == "rosenbrock":
        assert float((rn.x - 1).abs().max()) < 1e-6


def trial_paths(mp: pytest.MonkeyPatch) -> dict:
    """Count, at every call of the trial kernel through compiled._call, the running fits by
    the way their step is formed: "gn", the Gauss-Newton step from R (kernels._gauss_newton_r)
    that still fits the radius; "lazy", one from R that no longer fits (a rejected step shrank
    the radius: the SVD from the kept T, kernels._factor_svd in the trial kernel); "svd", the
    Jacobian stage's SVD."""
    seen = {"gn": 0, "lazy": 0, "svd": 0}
    inner = compiled._call

    def spy(kernel, n, *args, **kw):
        if kernel == "_trial":
            act, gn_norm, radius, gq = args[0], args[8], args[11], args[-1]
            for b in act:
                fits = not gn_norm[b] - radius[b] > 0.1 * radius[b]
                seen["svd" if not gq[b] else ("gn" if fits else "lazy")] += 1
        inner(kernel, n, *args, **kw)

    mp.setattr(compiled, "_call", spy)
    return seen


@pytest.mark.parametrize("name", ["rosenbrock", "decay", "unused"])
def test_the_trust_region_steps_from_r_and_from_the_svd_give_the_torch_fits(name, monkeypatch):
    """The compiled trust region takes the Gauss-Newton step from R where it fits (no SVD),
    forms the SVD from the kept T only once a rejected step shrinks the radius below it, and
    else factors by the SVD; the torch core always by the SVD. The fits are the same
    (assert_same_fits), with each way taken: all three on Rosenbrock's valley, mostly steps
    from R on the decay curves, and never from R where J has an exactly zero column (rank
    deficient: the SVD drops it, the unused parameter stays at x0)."""
    fun, jac, x0 = PROBLEMS[name]()
    rt = least_squares(fun, x0, jac=jac, engine="torch")
    seen = trial_paths(monkeypatch)
    rn = least_squares(fun, x0, jac=jac, engine="numba")
    assert_same_fits(rn, rt)
    if name == "rosenbrock":
        assert min(seen.values()) >= 100, seen
    if name == "decay":
        assert seen["gn"] > 0.9 * sum(seen.values()), seen
    if name == "unused":
        assert seen["gn"] == seen["lazy"] == 0 and seen["svd"] > 0, seen
        assert torch.equal(rn.x[:, 3], x0[:, 3])


@pytest.mark.parametrize("method", ["levenberg-marquardt", "gauss-newton"])
def test_a_rounding_level_direction_is_not_followed(method):
    """decay plus a fourth parameter that enters as 1e-20 x_3 t: a singular value ~1e-19 of
    s_max, not exactly 0. Gauss-Newton drops it (at most eps max(M, P) s_max: the least-norm
    step; followed, c'/s would send x_3 off by ~1e20), Levenberg-Marquardt damps it: x_3 stays
    at x0 and the fits are the torch core's, by the same rule."""
    fun3, jac3, x3 = decay(B, seed=19)
    x0 = torch.cat([x3, torch.randn(B, 1, generator=seeded(20), dtype=D)], 1)

    def fun(p):
        return fun3(p[:, :3]) + 1e-20 * p[:, 3:] * T

    def jac(p):
        return torch.cat([jac3(p[:, :3]), (1e-20 * T).expand(p.shape[0], 50)[..., None]], -1)

    rt = least_squares(fun, x0, jac=jac, method=method, engine="torch")
    rn = least_squares(fun, x0, jac=jac, method=method, engine="numba")
    assert bool(rn.success.all())
    torch.testing.assert_close(rn.x[:, 3], x0[:, 3], rtol=0, atol=1e-12)
    assert_same_fits(rn, rt)


@pytest.mark.parametrize("method", ["trust-region", "gauss-newton"])
def test_a_fit_scaled_by_a_power_of_two_is_the_same_fit(method):
    """f and J scaled by 2^400 (~1e120: J's entries squared 1e240, the QR's v^T v and
    s v^T a up to 1e360 if formed in the wrong order) and by 2^-460 (~1e-139): every
    operation of the compiled core scales exactly, so the fits are the unscaled ones (x to
    1e-12, nfev and status on every fit). Scale-free methods only: Levenberg-Marquardt's
    lambda is clipped to [eps, 1/eps] in absolute terms."""
    fun, jac, x0 = decay(B, seed=21)
    ref = least_squares(fun, x0, jac=jac, method=method, engine="numba")
    for scale in (2.0**400, 2.0**-460):
        res = least_squares(
            lambda p, k=scale: fun(p) * k,
            x0,
            jac=lambda p, k=scale: jac(p) * k,
            method=method,
            engine="numba",
        )
        torch.testing.assert_close(res.x, ref.x, rtol=1e-12, atol=1e-12)
        assert torch.equal(res.nfev, ref.nfev) and torch.equal(res.status, ref.status)
        torch.testing.assert_close(res.cost, ref.cost * scale**2, rtol=1e-12, atol=0)


def _square(name: str, n: int = 300):
    """A batch of n square systems (M = P) from random starts: Rosenbrock's two residuals
    (zero residual at (1, 1)), Powell's singular function (4 x 4, J singular at x* = 0) and
    x^2 = 0 (2 x 2, J singular at x* = 0); (fun, jac, x0, x*)."""
    g = seeded(sum(map(ord, name)))
    if name == "rosenbrock":

        def fun(x):
            return torch.stack([10 * (x[:, 1] - x[:, 0] ** 2), 1 - x[:, 0]], -1)

        start, best = [-1.2, 1.0], [1.0, 1.0]
    elif name == "powell-singular":

        def fun(x):
            a, b, c, d = x.unbind(-1)
            r5, r10 = math.sqrt(5.0), math.sqrt(10.0)
            return torch.stack([a + 10 * b, r5 * (c - d), (b - 2 * c) ** 2, r10 * (a - d) ** 2], -1)

        start, best = [3.0, -1.0, 0.0, 1.0], [0.0] * 4
    else:

        def fun(x):
            return x**2

        start, best = [1.0, -2.0], [0.0, 0.0]

    def jac(x):
        return torch.func.vmap(torch.func.jacrev(lambda v: fun(v[None])[0]))(x)

    x0 = torch.tensor(start, dtype=D) + 0.3 * torch.randn(n, len(start), generator=g, dtype=D)
    return fun, jac, x0, torch.tensor(best, dtype=D)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["rosenbrock", "powell-singular", "x-squared"])
def test_engines_agree_on_square_systems(name, method):
    """M = P (a system of P equations, as a root finder poses it): both engines factor
    [J f] by Householder QR, the compiled core's R P x P (MINPACK takes M >= P). 300 starts
    each: every fit succeeds on both engines and reaches the zero-residual solution, x to
    1e-7 of each other, and the evaluation counts agree on most fits. Less often than on the
    tall problems (measured: nfev on 89-100 % of the fits, the status on 89-100 %): where a
    fit lands exactly on x* (Rosenbrock's (1, 1) is representable), one engine's rounding
    stops it on the residual floor (status 2) one evaluation before the other's xtol test
    (status 3), at the same x and a zero cost."""
    fun, jac, x0, best = _square(name)
    kw = {"method": method, "jac": jac}
    rt = least_squares(fun, x0, engine="torch", **kw)
    rn = least_squares(fun, x0, engine="numba", **kw)
    assert bool(rt.success.all()) and bool(rn.success.all())
    assert float((rn.x - rt.x).abs().max()) <= 1e-7
    tol = 1e-7 if name == "rosenbrock" else 1e-3  # singular at x*: |x - x*| ~ sqrt(||f||)
    assert float((rn.x - best).abs().max()) <= tol and float(rn.cost.max()) <= 1e-14
    assert_consistent(rn, fun, jac)
    for key in ("nfev", "njev", "status"):
        assert float((rn[key] == rt[key]).double().mean()) >= 0.8, key


@pytest.mark.parametrize("method", METHODS)
def test_engines_agree_with_autograd_jacobian_and_weights(method):
    """The Jacobian by autograd (64 fits, engine="numba" asked for explicitly below
    AUTO_MIN_BATCH), and weights per fit (B, M) and shared (M,) on 300 fits: the same fits
    by both engines; the weighted fit's fun and jac are the weighted residuals' at x."""
    fun, jac, x0 = decay(64, seed=5)
    rt = least_squares(fun, x0, engine="torch", method=method)
    rn = least_squares(fun, x0, engine="numba", method=method)
    assert_same_fits(rn, rt, most=0.95)
    assert_consistent(rn, fun, jac)
    fun, jac, x0 = decay(B, seed=6)
    for w in (
        0.5 + torch.rand(B, 50, generator=seeded(8), dtype=D),
        0.5 + torch.rand(50, generator=seeded(9), dtype=D),
    ):
        rt = least_squares(fun, x0, engine="torch", method=method, jac=jac, weights=w)
        rn = least_squares(fun, x0, engine="numba", method=method, jac=jac, weights=w)
        assert_same_fits(rn, rt)
        sw = w.sqrt().expand(B, 50)
        assert_consistent(rn, lambda p, sw=sw: fun(p) * sw, lambda p, sw=sw: jac(p) * sw[..., None])


@pytest.mark.parametrize("method", METHODS)
def test_engines_agree_on_a_single_problem(method):
    """One problem, x0 of shape (P,), engine="numba" (autograd's Jacobian): the same x (1e-9
    relative), cost, nfev, njev, nit and status as engine="torch" (a single fit has no
    neighbours to mix rounding with: the two paths agree evaluation by evaluation), for
    three curves of decay and the Rosenbrock variant."""
    fun_b, _, x0 = decay(3, seed=10)
    rfun, _, rx0 = rosenbrock(1, seed=11)
    cases = [(lambda p, i=i: fun_b(p.expand(3, 3))[i], x0[i]) for i in range(3)]
    cases.append((lambda x: rfun(x[None])[0], rx0[0]))
    for fun, start in cases:
        rt = least_squares(fun, start, engine="torch", method=method)
        rn = least_squares(fun, start, engine="numba", method=method)
        assert rn.x.shape == start.shape and isinstance(rn.nfev, int)
        torch.testing.assert_close(rn.x, rt.x, rtol=1e-9, atol=1e-12)
        assert rn.cost == pytest.approx(rt.cost, rel=1e-10, abs=1e-24)
        got = (rn.nfev, rn.njev, rn.nit, rn.status, rn.success)
        assert got == (rt.nfev, rt.njev, rt.nit, rt.status, rt.success)


# ---------------------------------------------------------------------------- failing trials
@pytest.mark.parametrize("method", METHODS)
def test_a_trial_where_fun_is_nan_is_rejected_as_by_torch(method):
    """a exp(-sqrt(q) t) from q far above the truth: the long first steps make q negative,
    fun NaN there (on the same fits in both engines, seen by a wrapper). The try is rejected
    (its ||f|| read as inf), the fit goes on: every fit succeeds, and nfev is the torch core's
    on every fit."""
    g = seeded(12)
    t = torch.linspace(0, 4, 40, dtype=D)
    a = 1 + torch.rand(B, 1, generator=g, dtype=D)
    q = 0.05 + 0.3 * torch.rand(B, 1, generator=g, dtype=D)
    y = a * torch.exp(-q.sqrt() * t) + 0.01 * torch.randn(B, 40, generator=g, dtype=D)
    x0 = torch.cat(
        [
            a * (1 + 0.5 * torch.rand(B, 1, generator=g, dtype=D)),
            1 + 4 * torch.rand(B, 1, generator=g, dtype=D),
        ],
        1,
    )
    bad: set = set()

    def fun(p):
        r = p[:, :1] * torch.exp(-p[:, 1:2].sqrt() * t) - y
        bad.update((~torch.isfinite(r).all(-1)).nonzero().flatten().tolist())
        return r

    res = {}
    for engine in ("torch", "numba"):
        bad.clear()
        res[engine] = least_squares(fun, x0, engine=engine, method=method), sorted(bad)
    (rt, bad_t), (rn, bad_n) = res["torch"], res["numba"]
    assert len(bad_t) >= 10 and bad_n == bad_t
    assert bool(rn.success.all()) and bool(rt.success.all())
    assert torch.equal(rn.nfev, rt.nfev)
    assert_same_fits(rn, rt, most=1.0)


def test_a_trial_where_fun_overflows_is_rejected_as_by_torch():
    """exp(b t) on t in [0, 20] from b ~ 0: Levenberg-Marquardt's first steps overshoot to
    exp(b t) = inf (fun inf, not NaN: factor._norm's overflow branch) on ~30 fits; they are
    rejected and those fits end as with the torch core: the same nfev and status."""
    g = seeded(5)
    t = torch.linspace(0, 20, 30, dtype=D)
    b = 0.2 + 0.2 * torch.rand(B, 1, generator=g, dtype=D)
    y = torch.exp(b * t) * (1 + 0.01 * torch.randn(B, 30, generator=g, dtype=D))
    x0 = torch.cat(
        [
            1 + 0.3 * torch.rand(B, 1, generator=g, dtype=D),
            0.01 * torch.rand(B, 1, generator=g, dtype=D),
        ],
        1,
    )
    inf: set = set()

    def fun(p):
        r = p[:, :1] * torch.exp(p[:, 1:2] * t) - y
        inf.update(torch.isinf(r).any(-1).nonzero().flatten().tolist())
        return r

    res = {}
    for engine in ("torch", "numba"):
        inf.clear()
        res[engine] = (
            least_squares(fun, x0, engine=engine, method="levenberg-marquardt"),
            sorted(inf),
        )
    (rt, inf_t), (rn, inf_n) = res["torch"], res["numba"]
    assert len(inf_t) >= 10 and inf_n == inf_t
    idx = torch.tensor(inf_t)
    assert torch.equal(rn.nfev[idx], rt.nfev[idx]) and torch.equal(rn.status[idx], rt.status[idx])
    assert_same_fits(rn, rt)


@pytest.mark.parametrize("method", METHODS)
def test_a_jacobian_not_finite_at_x0_stops_with_status_minus_one(method):
    """a exp(-b t) + sqrt(q) at q = 0: f is finite at x0, J infinite. Those fits stop at x0
    with status -1 (nfev = njev = 1, x = x0, J not finite) in both engines; the others (q
    near the truth, c^2 >= 0.25) fit as with torch."""
    g = seeded(13)
    t = torch.linspace(0, 4, 40, dtype=D)
    truth = torch.cat(
        [
            1 + torch.rand(B, 1, generator=g, dtype=D),
            0.3 + 2 * torch.rand(B, 1, generator=g, dtype=D),
            (0.5 + torch.rand(B, 1, generator=g, dtype=D)) ** 2,
        ],
        1,
    )
    y = _decay(t, *truth[:, :2].T[..., None], truth[:, 2:].sqrt())
    y = y + 0.02 * torch.randn(B, 40, generator=g, dtype=D)
    x0 = truth * (0.7 + 0.6 * torch.rand(B, 3, generator=g, dtype=D))
    stuck = torch.zeros(B, dtype=torch.bool)
    stuck[::50] = True
    x0[stuck, 2] = 0.0

    def fun(p):
        return p[:, :1] * torch.exp(-p[:, 1:2] * t) + p[:, 2:].sqrt() - y

    rt = least_squares(fun, x0, engine="torch", method=method)
    rn = least_squares(fun, x0, engine="numba", method=method)
    for r in (rt, rn):
        assert torch.equal(r.status == -1, stuck)
        assert bool((r.nfev[stuck] == 1).all() and (r.njev[stuck] == 1).all())
        assert torch.equal(r.x[stuck], x0[stuck])
        assert not bool(torch.isfinite(r.jac[stuck]).all(-1).all(-1).any())
        assert bool(r.success[~stuck].all())
    assert_same_fits(_rows(rn, ~stuck), _rows(rt, ~stuck))


# ------------------------------------------------------------------------ engine= choice
def _counting(fun):
    calls = [0]

    def counted(x):
        calls[0] += 1
        return fun(x)

    return counted, calls


def test_engine_numba_is_refused_with_the_reason_and_the_fix(monkeypatch):
    """engine="numba" where the compiled core cannot run raises a ConfigurationError that
    names the reason (bounds, float32, M < P, P > 16, numba missing) and the fix (engine='auto'
    or 'torch'), after the one evaluation at x0 that tells M (fun is never called again, no
    fit runs); an unknown engine is refused before fun is called at all, by least_squares and
    curve_fit."""
    fun, _, x0 = decay(8, seed=14)
    cases = [
        (fun, x0, {"bounds": (-10.0, 10.0)}, "bounds are given"),
        (lambda p: fun(p.double()).float(), x0.float(), {}, "torch.float32"),
        (lambda p: p[:, :2] ** 2 - 1, x0, {}, r"M = 2, P = 3"),
        (lambda p: p.repeat(1, 2), torch.ones(8, 17, dtype=D), {}, "P <= 16"),
    ]
    for f, start, kw, why in cases:
        counted, calls = _counting(f)
        with pytest.raises(ConfigurationError, match=why) as e:
            least_squares(counted, start, engine="numba", **kw)
        assert "engine='auto'" in str(e.value) and "engine='torch'" in str(e.value)
        assert calls[0] == 1, why
    with pytest.raises(ConfigurationError, match="bounds are given"):
        curve_fit(lambda x, a, b: a * x + b, T, T, [1.0, 0.0], bounds=(-5, 5), engine="numba")
    for call in (
        lambda f: least_squares(f, x0, engine="bogus"),
        lambda f: curve_fit(
            lambda x, a, b, c: f(torch.stack([a, b, c])[None])[0],
            T,
            T,
            [1.0, 1.0, 0.0],
            engine="bogus",
        ),
    ):
        counted, calls = _counting(fun)
        with pytest.raises(ConfigurationError, match="engine must be one of auto, torch, numba"):
            call(counted)
        assert calls[0] == 0
    monkeypatch.setattr(compiled, "available", lambda: False)
    with pytest.raises(ConfigurationError, match="numba is not installed") as e:
        least_squares(fun, x0, engine="numba")
    assert "pip install 'steepest[fast]'" in str(e.value)


def test_engine_auto_takes_numba_from_auto_min_batch(monkeypatch):
    """engine="auto" (the default) runs the torch core below AUTO_MIN_BATCH fits and the
    compiled one at AUTO_MIN_BATCH (seen by recording wrappers around the two cores); the
    torch core also for float32, with bounds, and where numba is missing; engine="torch"
    always the torch core."""
    ran = []
    for name, owner in (("torch", steepest.fit.lsq), ("numba", compiled)):
        attr = "_least_squares_core" if name == "torch" else "_least_squares_compiled"
        inner = getattr(owner, attr)

        def wrapper(*args, _inner=inner, _name=name, **kwargs):
            ran.append(_name)
            return _inner(*args, **kwargs)

        monkeypatch.setattr(owner, attr, wrapper)
    n = compiled.AUTO_MIN_BATCH

    def run(k, dtype=D, **kw):
        fun, jac, x0 = decay(k, seed=15)
        ran.clear()
        least_squares(
            lambda p: fun(p.double()).to(dtype),
            x0.to(dtype),
            jac=lambda p: jac(p.double()).to(dtype),
            **kw,
        )
        return ran[:]

    assert run(n - 1) == ["torch"]
    assert run(n) == ["numba"]
    assert run(n, engine="torch") == ["torch"]
    assert run(n, bounds=(-100.0, 100.0)) == ["torch"]
    assert run(n, dtype=torch.float32) == ["torch"]
    monkeypatch.setattr(compiled, "available", lambda: False)
    assert run(n) == ["torch"]


# ------------------------------------------------------------------------------- curve_fit
def cov_err(pcov: torch.Tensor, ref: torch.Tensor) -> float:
    """The largest |pcov - ref| in units of sigma_i sigma_j (ref's standard errors): a
    relative error that does not blow up on a near-zero covariance."""
    sd = ref.diagonal(dim1=-2, dim2=-1).sqrt()
    return float(((pcov - ref).abs() / (sd[..., :, None] * sd[..., None, :])).max())


def test_curve_fit_engines_agree_and_match_scipy():
    """curve_fit on 300 curves (the pointwise Jacobian, pcov by compiled.covariance on the
    numba engine and by core._svd_values, LAPACK's SVD, on the torch one): popt to 1e-7,
    pcov to 1e-6 of sigma_i sigma_j, success equal; one curve: both engines against
    scipy.optimize.curve_fit (popt 1e-7, pcov 1e-5 of sigma_i sigma_j: scipy's Jacobian is
    by finite differences)."""
    _, _, x0 = decay(B, seed=16)
    g = seeded(17)
    truth = x0 * (1 + 0.1 * torch.randn(B, 3, generator=g, dtype=D))
    y = _decay(T, *truth.T[..., None]) + 0.02 * torch.randn(B, 50, generator=g, dtype=D)
    pt, ct, rt = curve_fit(_decay, T, y, x0, engine="torch", full_output=True)
    pn, cn, rn = curve_fit(_decay, T, y, x0, engine="numba", full_output=True)
    assert bool(rt.success.all()) and torch.equal(rn.success, rt.success)
    torch.testing.assert_close(pn, pt, rtol=1e-7, atol=1e-9)
    assert cov_err(cn, ct) <= 1e-6
    yi, p0 = y[7], x0[7]
    ref_p, ref_c = sopt.curve_fit(
        lambda x, a, b, c: a * np.exp(-b * x) + c, T.numpy(), yi.numpy(), p0.numpy()
    )
    for engine in ("numba", "torch"):
        popt, pcov = curve_fit(_decay, T, yi, p0, engine=engine)
        torch.testing.assert_close(popt, torch.tensor(ref_p), rtol=1e-7, atol=1e-9)
        assert cov_err(pcov, torch.tensor(ref_c)) <= 1e-5
        assert cov_err(pcov, ct[7]) <= 1e-6  # the batch's curve 7


# ---------------------------------------------------------------------------- numba's threads
@pytest.mark.parametrize("method", ["trust-region", "gauss-newton"])
def test_parallel_fit_equals_the_serial_fit_bitwise(method):
    """A batch of 301 fits (odd: two threads' slices of unequal size): the Jacobian stages,
    trials and updates of at least PARALLEL_MIN fits run on numba's threads
    (kernels._jac_stage_parallel, _trial_parallel and _update_parallel, each seen to run) and
    give bitwise the fits of one thread: x, fun, jac, nfev, njev, status. On one thread the
    whole set is one part from the first step on, so after x0's Jacobian stage the driver
    runs its tail loop (_update_stage_trial: the update, the stage and the trial in one call;
    seen to run), which the two-thread run takes only once fewer than PARALLEL_MIN fits run.
    numba's thread count is restored after."""
    fun, jac, x0 = decay(B + 1, seed=18)
    before = numba.get_num_threads()
    names = ("_jac_stage_parallel", "_trial_parallel", "_update_parallel")
    with numba_threads(1), pytest.MonkeyPatch.context() as mp:
        calls = [record(mp, kernels, name) for name in names]
        fused = record(mp, kernels, "_update_stage_trial")
        one = least_squares(fun, x0, jac=jac, method=method, engine="numba")
        assert calls == [[], [], []]
        assert len(fused) >= 1
    with numba_threads(2), pytest.MonkeyPatch.context() as mp:
        calls = [record(mp, kernels, name) for name in names]
        two = least_squares(fun, x0, jac=jac, method=method, engine="numba")
        assert all(len(c) >= 1 for c in calls)
    assert numba.get_num_threads() == before
    for key in ("x", "fun", "jac", "nfev", "njev", "nit", "status"):
        assert torch.equal(one[key], two[key]), key


def test_the_rows_of_the_running_set_stay_one_tensor_while_the_due_ones_differ():
    """When one fit's trial is accepted and another's rejected: the driver hands fun the same
    rows tensor every time while the running set holds (curve_fit keeps its gathered data per
    rows object; a new tensor cost it a gather an iteration in the tail), and jac gets that
    same tensor too: at x0, then in the tail loop (the two fits are one part from the first
    trial on) at every trial point, the rejected one's row not read; after the loop the
    result's J at x is a call of its own. Precondition checked: a trial was rejected while
    the other fit's was accepted (nit below the iterations)."""
    # two lines fitted by a exp(-b t) + c: the fit runs off towards b = 0, a = -c = inf (a
    # line), accepting most trials and rejecting some, never converging
    y = torch.stack([1 - 0.3 * T, 2 - 0.5 * T]) + 0.01 * torch.randn(2, 50, generator=seeded(4))
    x0 = torch.tensor([[1.0, 1.0, 0.0], [2.0, 0.5, 0.0]], dtype=D)

    def fun(p):
        return p[:, :1] * torch.exp(-p[:, 1:2] * T) + p[:, 2:3] - y

    def jac(p):
        e = torch.exp(-p[:, 1:2] * T)
        return torch.stack([e, -p[:, :1] * T * e, torch.ones_like(e)], -1)

    f0 = fun(x0)
    seen_f, seen_j = [], []

    def fun_r(x, rows):
        seen_f.append(rows)
        return fun(x0.index_put((rows,), x))[rows]

    def jac_r(x, rows):
        seen_j.append(rows)
        return jac(x0.index_put((rows,), x))[rows]

    out = compiled._least_squares_compiled(
        fun_r, x0, f0, jac_r, "trust-region", 0.0, 0.0, 0.0, 40, 100.0
    )
    assert out["nfev"].tolist() == [40, 40]  # both ran to max_nfev: the set never changed
    assert bool((out["nit"] < 39).any()) and int(out["nit"].max()) > 30  # rejections
    assert all(r is seen_f[0] for r in seen_f)
    # x0's stage, then one J an evaluation of f (at the same trial points), then the result's
    assert len(seen_j) == 1 + len(seen_f) + 1 and all(r is seen_f[0] for r in seen_j[:-1])
    assert seen_j[-1] is not seen_f[0]

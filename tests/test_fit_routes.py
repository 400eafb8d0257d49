"""Tests of steepest.fit (issue 12): curve_fit's routes: pointwise J, its probe, QR and Jacobi."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from reference import seeded
from scipy import optimize as sopt
from test_fit import (
    D,
    T,
    Y,
    _batch,
    _decay,
    _decay_curve,
    engine,  # noqa: F401 (the autouse fixture: each test on both engines)
    pytest_generate_tests,  # noqa: F401 (the hook that parametrizes engine)
    torch_core,
)
from torch.autograd.functional import jacobian

import steepest
from steepest.fit import curve, curve_fit, least_squares


# ---------------------------------------------------------------------------- pointwise Jacobian
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


# ---------------------------------------------------------------------------- QR and Jacobi SVD
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


# ---------------------------------------------------------------------------- the route probe
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


def _mixing_jac(seen: list, where: float):
    """The decay's Jacobian with 0.1 (sum(k > 0) - (k > 0)), k = relu(a - where), added to
    the column of a: zero for one curve (vmapped: the sum is its own term), not in a batch call
    on the columns that holds rows with a > ``where`` (the sum runs over the batch); the shape
    of a at each call appended to ``seen``."""

    def jac(x, a, b, c):
        seen.append(tuple(a.shape))
        e = torch.exp(-b * x)
        k = torch.relu(a - where)
        da = e + 0.1 * ((k > 0).to(a.dtype).sum() - (k > 0).to(a.dtype)) * torch.ones_like(e)
        return torch.stack([da, -a * x * e, torch.ones_like(e)], -1)

    return jac


def test_a_jac_that_mixes_rows_is_vmapped_before_or_after_a_compiled_fit(engine, monkeypatch):  # noqa: F811
    """A given jac whose batch call on the columns mixes the rows, and f pointwise (noisy
    curves). Mixing all rows (every a > 0): the probe sees it on the rows it compares, before
    the fit, on both engines. Mixing only through rows 1-3 of 300 (a > 10, none of them among
    the rows compared): the torch core's probe calls the route on the whole batch, and sees it
    there; the compiled core's probe calls it on the compared rows alone (16 of 300: one call
    of 16 columns, no whole-batch call at the probe point), and the result's J, evaluated at
    the solution on the whole batch, is compared with the vmapped jac after the fit: it
    differs, and the fit is run again with the vmapped jac. Every way, popt and pcov are the
    torch core's vmapped fit's; without the check after the fit, pcov (from the route's J)
    would not be."""
    x = torch.linspace(0.1, 4, 30, dtype=D)
    truth = torch.tensor([2.0, 1.3, 0.5], dtype=D).repeat(300, 1)
    truth[:, 0] += torch.rand(300, generator=seeded(5), dtype=D)
    truth[1:4, 0] = 20.0
    g = seeded(6)
    y = torch.stack([_decay(x, *p) + 0.01 * torch.randn(30, generator=g, dtype=D) for p in truth])
    p0 = truth.clone()
    p0[:, 1] = 1.0
    ref = curve_fit(_decay, x, y, p0, jac=_mixing_jac([], 10.0), engine="torch")
    for where in (0.0, 10.0):
        seen: list = []
        popt, pcov = curve_fit(_decay, x, y, p0, jac=_mixing_jac(seen, where), engine=engine)
        torch.testing.assert_close(popt, ref[0], rtol=1e-7, atol=1e-9)  # engines: to rounding
        torch.testing.assert_close(pcov, ref[1], rtol=1e-6, atol=1e-12)
        cols = [s for s in seen if s != ()]
        if where == 0.0 or engine == "torch":  # the probe saw it: vmapped from the start
            assert cols == ([(16, 1)] if engine == "numba" else [(300, 1)])
        else:  # the columns route ran the fit, then the vmapped jac
            assert cols[0] == (16, 1) and cols.count((300, 1)) >= 2
            last = max(i for i, s in enumerate(seen) if s != ())
            assert seen[last + 1 :].count(()) >= 3  # the check, then the fit's J vmapped
    if engine == "numba":
        monkeypatch.setattr(curve, "_jac_agrees", lambda *args: True)
        _, unchecked = curve_fit(_decay, x, y, p0, jac=_mixing_jac([], 10.0), engine=engine)
        assert not torch.allclose(unchecked, ref[1], rtol=1e-3, atol=0)


def test_a_compiled_fit_with_a_pointwise_jac_probes_16_rows_and_is_not_run_again(engine):  # noqa: F811
    """A jac that does not mix the rows, on the compiled core: the probe calls it on the 16
    compared rows (no whole-batch call at the probe point), the check after the fit passes
    (the fit is not run again: the vmapped jac is called twice, at the probe and at the
    check, on 0-d parameters), and popt equals the torch core's whole-batch-probed fit."""
    y = _batch(300)
    p0 = torch.tensor([[1.0, 1.0, 0.0]], dtype=D).expand(300, 3)
    seen: list = []

    def jac(x, a, b, c):
        seen.append(tuple(a.shape))
        e = torch.exp(-b * x)
        return torch.stack([e, -a * x * e, torch.ones_like(e)], -1)

    popt, _ = curve_fit(_decay, T, y, p0, jac=jac, engine=engine)
    cols = [s for s in seen if s != ()]
    if engine == "numba":
        assert cols[0] == (16, 1) and (16, 1) not in cols[1:]
        assert seen.count(()) == 3  # the shape check at p0, the probe, the check after
    else:
        assert cols[0] == (300, 1) and seen.count(()) == 2
    ref, _ = curve_fit(_decay, T, y, p0, jac=_decay_jac_cols, engine="torch")
    torch.testing.assert_close(popt, ref, rtol=1e-7, atol=1e-9)  # the engines: to rounding


def _decay_jac_cols(x, a, b, c):
    e = torch.exp(-b * x)
    return torch.stack([e, -a * x * e, torch.ones_like(e)], -1)


@torch_core
def test_the_check_after_the_fit_leaves_out_rows_whose_j_is_not_finite():
    """curve._jac_agrees compares the rows of the result's J whose entries are finite (their
    sum is: one reduction over J, not isfinite on every entry): with rows of NaN, of inf, and
    of 1e308 (finite entries whose sum overflows) among 40, the others still agree (True); one
    finite row changed by 1e-6 disagrees (False); fewer than 2 rows evaluated after the loop
    (the others stopped on gtol, their J stored at the stage): those compared (True); fewer
    than 2 finite rows: False."""
    x = torch.rand(40, 3, generator=seeded(9), dtype=D) + 0.5

    def vjres(xs, xx, yy, ss):
        return torch.stack([_decay_jac_cols(T, *p.unbind(-1)) for p in xs])

    def args(rows, with_y=True):
        return T, None, None

    jac = vjres(x, T, None, None)
    jac[3, 0, 0], jac[17, 5, 1], jac[25] = math.nan, math.inf, 1e308
    out = {"jac": jac, "x": x, "status": torch.full((40,), 2)}
    assert curve._jac_agrees(out, vjres, args)
    bent = jac.clone()
    kept = [i for i in range(40) if i not in (3, 17, 25)]
    bent[kept[int(curve._sample(37, x.device)[5])], 0, 0] += 1e-6  # a row compared
    assert not curve._jac_agrees(dict(out, jac=bent), vjres, args)
    out["status"][1:] = 1  # stored at the stage: compared, as one row alone is too few
    assert curve._jac_agrees(out, vjres, args)
    assert not curve._jac_agrees(dict(out, jac=bent), vjres, args)
    jac[1:] = math.nan
    assert not curve._jac_agrees(out, vjres, args)


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

"""Tests of the compiled core's driver evaluating a batch in parts (fit/compiled.py,
``part_size``): each part's kernel stage after its evaluation, bitwise the batch in one part;
the layouts of J handed over; curve_fit and a vectorized fun in parts; J at the solution; the
fused calls of a set that is one part on one thread. Split from test_fit_compiled.py, whose
problems it shares."""

from __future__ import annotations

import math

import pytest
import torch
from numba_threads import kernels, numba_threads, record
from reference import seeded
from test_fit_compiled import METHODS, D, T, assert_consistent, assert_same_fits, decay

from steepest.fit import compiled, curve_fit, least_squares


# ------------------------------------------------------------------------ a batch in parts
def _rowwise(n: int, seed: int, columns: bool = False, stage: bool = True):
    """n decay curves as fun_r(x, rows) and jac_r(x, rows) of the rows asked for (the
    driver's interface), with x0 and f0; ``columns``: jac_r returns J as a (n, M, P) view of
    a contiguous (P, n, M) tensor, the layout of curve_fit's pointwise route. Every kind of
    stop: lines (b = 0 in the data, every 17th) run off to max_nfev; noisy curves stop on
    ftol, most after an accepted step (their J at the last x is evaluated after the loop);
    and, unless not ``stage``, two stops at a Jacobian stage: noise-free curves started at
    their solution (every 23rd) stop on gtol at x0 (status 1); every 37th has a Jacobian that
    is not finite (status -1 at x0)."""
    g = seeded(seed)
    a = 1 + torch.rand(n, 1, generator=g, dtype=D)
    b = (0.3 + 2 * torch.rand(n, 1, generator=g, dtype=D)) * (torch.arange(n) % 17 != 3)[:, None]
    c = torch.randn(n, 1, generator=g, dtype=D)
    exact = (torch.arange(n) % 23 == 5)[:, None] & stage
    noise = 0.02 * torch.randn(n, 50, generator=g, dtype=D) * ~exact
    y = a * torch.exp(-b * T) + c + noise
    start = torch.cat([a, b + 0.5, c], 1) * (0.7 + 0.6 * torch.rand(n, 3, generator=g, dtype=D))
    x0 = torch.where(exact, torch.cat([a, b, c], 1), start)
    broken = (torch.arange(n) % 37 == 11) & stage

    def fun_r(x, rows):
        return x[:, :1] * torch.exp(-x[:, 1:2] * T) + x[:, 2:3] - y[rows]

    def jac_r(x, rows):
        e = torch.exp(-x[:, 1:2] * T)
        j = torch.stack([e, -x[:, :1] * T * e, torch.ones_like(e)])
        j[0, broken[rows]] = math.nan
        return j.permute(1, 2, 0) if columns else j.permute(1, 2, 0).contiguous()

    return fun_r, jac_r, x0, fun_r(x0, torch.arange(n))


def _sized(fn, sizes: list):
    """fn(x, rows), recording the number of rows of each call in ``sizes``."""

    def inner(x, rows):
        assert x.shape[0] == rows.numel()
        sizes.append(rows.numel())
        return fn(x, rows)

    return inner


ALL_STOPS = {-1, 0, 1, 2}  # a non-finite J, max_nfev, gtol, ftol
KEYS = ("x", "fun", "jac", "nfev", "njev", "nit", "status")


def assert_same_bits(a: torch.Tensor, b: torch.Tensor, key: str) -> None:
    """a and b equal entry for entry, NaN where both are NaN (a non-finite J is stored)."""
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=key)


def jac_stage_layouts(mp: pytest.MonkeyPatch) -> list:
    """Record, for every call of the Jacobian stage through compiled._call, (cols, the shape
    of the J handed over)."""
    seen: list = []
    inner = compiled._call

    def spy(kernel, n, *args, **kw):
        if kernel == "_jac_stage":
            seen.append((args[1], args[0].shape))
        inner(kernel, n, *args, **kw)

    mp.setattr(compiled, "_call", spy)
    return seen


@pytest.mark.parametrize("method", METHODS)
def test_a_batch_in_parts_is_bitwise_the_batch_in_one_part(method):
    """The driver evaluates fun and jac on parts of at most ``size`` rows, each part's kernel
    stage after its evaluation: per fit the same arithmetic (and fun and jac here, exp and
    products, compute each row alike at any batch size), so x, fun, jac, nfev, njev, nit and
    status are bitwise those of one part, with fits that stop in every way (parts of 7 rows:
    the last one short; parts of 256 on two threads: each part's stages on numba's
    threads)."""
    fun_r, jac_r, x0, f0 = _rowwise(301, seed=31)
    sizes: list = []
    args = (method, 1e-10, 1e-10, 1e-12, 60, 100.0)
    whole = compiled._least_squares_compiled(fun_r, x0, f0, jac_r, *args)
    assert set(whole["status"].tolist()) >= ALL_STOPS
    assert bool((whole["nfev"] < 60).any())
    for size, threads in ((7, 1), (256, 2)):
        sizes.clear()
        with numba_threads(threads):
            parts = compiled._least_squares_compiled(
                _sized(fun_r, sizes), x0, f0, _sized(jac_r, sizes), *args, size
            )
        assert max(sizes) == size and min(sizes) < size
        for key in KEYS:
            assert_same_bits(whole[key], parts[key], f"{key}, parts of {size}")


@pytest.mark.parametrize("columns", [False, True])
def test_the_result_jac_is_j_at_x_for_every_kind_of_stop(columns):
    """The kernels keep no copy of J between stages: J of a fit that stops at a Jacobian
    stage (gtol, a non-finite J) is stored there; every fit that stops after a trial, its
    last step accepted (J never evaluated at x) or rejected (J at x evaluated before), has J
    evaluated at its x again. Either way the result's jac is bitwise jac_r at the result's x
    (NaN where J is not finite), in both layouts of J, and njev counts none of the extra
    evaluations (nit <= njev <= nit + 1)."""
    fun_r, jac_r, x0, f0 = _rowwise(301, seed=33, columns=columns)
    out = compiled._least_squares_compiled(
        fun_r, x0, f0, jac_r, "trust-region", 1e-10, 1e-10, 1e-12, 60, 100.0
    )
    assert set(out["status"].tolist()) >= ALL_STOPS
    after_trial = out["status"] != 1
    after_trial &= out["status"] != -1
    accepted = out["njev"] == out["nit"]  # the last step accepted: J not evaluated at x
    assert bool((after_trial & accepted).any()) and bool((after_trial & ~accepted).any())
    assert bool(((out["nit"] <= out["njev"]) & (out["njev"] <= out["nit"] + 1)).all())
    want = jac_r(out["x"], torch.arange(301))
    assert_same_bits(out["jac"], want.contiguous(), "jac")


@pytest.mark.parametrize("columns", [False, True])
@pytest.mark.parametrize("size", [None, 64])
def test_where_every_fit_stops_after_a_trial_the_result_jac_is_evaluated_after_the_loop(
    columns, size
):
    """No fit stops at a Jacobian stage (gtol 0, every J finite): the result's J at x is
    evaluated once the loop is over, for the whole batch: one call of jac_r (a batch evaluated
    whole), or the batch in consecutive parts of 64 (a batch evaluated in parts: each part's
    J copied into the state, no fresh (B, M, P) tensor of the user's); bitwise jac_r at the
    result's x, contiguous in both layouts of J (a route's (P, n, M) J copied to (n, M, P))."""
    fun_r, jac_r, x0, f0 = _rowwise(301, seed=33, columns=columns, stage=False)
    sizes: list = []
    out = compiled._least_squares_compiled(
        fun_r, x0, f0, _sized(jac_r, sizes), "trust-region", 1e-10, 1e-10, 0.0, 60, 100.0, size
    )
    assert set(out["status"].tolist()) == {0, 2, 3, 4}
    if size is None:  # one call on the batch; the loop's last one on fewer fits
        assert sizes[-1] == 301 and sizes[-2] < 301
    else:
        assert sizes[-5:] == [64] * 4 + [301 - 4 * 64]
    want = jac_r(out["x"], torch.arange(301))
    assert out["jac"].is_contiguous()
    assert_same_bits(out["jac"], want.contiguous(), "jac")


@pytest.mark.parametrize("size, threads", [(None, 1), (256, 2)])
def test_a_jacobian_in_columns_is_read_without_a_copy_and_gives_the_same_fit(size, threads):
    """jac_r's J as a view of a contiguous (P, n, M) tensor (curve_fit's pointwise route)
    reaches the kernel as that tensor (``cols`` True: no copy to (n, M, P)), and the fit,
    the stored J included, is bitwise that of the same J contiguous in (n, M, P): in one
    part on one thread, and in parts of 256 on two (the parallel Jacobian stage reads the
    part's size from ``due``, not from J's first axis, which is P in columns)."""
    fun_r, jac_cols, x0, f0 = _rowwise(300, seed=32, columns=True)
    jac_rows = _rowwise(300, seed=32)[1]
    fits = {}
    for name, jac_r in (("cols", jac_cols), ("rows", jac_rows)):
        with pytest.MonkeyPatch.context() as mp, numba_threads(threads):
            seen = jac_stage_layouts(mp)
            calls = record(mp, kernels, "_jac_stage_parallel")
            fits[name] = compiled._least_squares_compiled(
                fun_r, x0, f0, jac_r, "trust-region", 1e-10, 1e-10, 1e-12, 60, 100.0, size
            )
        assert seen and all(c == (name == "cols") for c, _ in seen)
        assert all(shape[0] == 3 for _, shape in seen) == (name == "cols")
        assert bool(calls) == (threads > 1)
    assert set(fits["cols"]["status"].tolist()) >= ALL_STOPS
    for key in KEYS:
        assert_same_bits(fits["cols"][key], fits["rows"][key], key)


def test_curve_fit_and_a_vectorized_fun_run_in_parts_a_whole_batch_fun_does_not(monkeypatch):
    """With parts of 256 fits (PART_ELEMENTS made small), curve_fit's f sees at most 256
    curves a call (its routes evaluate each curve on its own), with popt and pcov bitwise
    those of one part; and its autograd Jacobian reaches the kernel in columns. A
    least_squares fun with ``vectorize=True`` (vmapped, one problem at a time) is run in
    parts too (its minima those of one part, to rounding: torch.func's Jacobian rounds by
    the batch's size); one that takes the whole batch never is (each call would cost the whole
    batch): it sees all 600 rows every time."""
    n = 600
    g = seeded(33)
    a, b = 1 + torch.rand(n, 1, generator=g, dtype=D), 0.5 + torch.rand(n, 1, generator=g, dtype=D)
    y = a * torch.exp(-b * T) + 0.01 * torch.randn(n, 50, generator=g, dtype=D)
    p0 = torch.tensor([[1.0, 1.0, 0.0]], dtype=D).expand(n, 3)
    seen: list = []

    def f(x, a, b, c):
        seen.append(a.shape[0] if a.ndim else 1)  # (rows, 1) or (rows, N); 0-d inside vmap
        return a * torch.exp(-b * x) + c

    one = curve_fit(f, T, y, p0, engine="numba")
    assert max(seen) == n
    monkeypatch.setattr(compiled, "PART_ELEMENTS", 1)
    assert compiled.part_rows(50, 3) == compiled.PARALLEL_MIN == 256
    seen.clear()
    sizes_asked: list = []
    core = compiled._least_squares_compiled

    def spy_core(*args):
        sizes_asked.append(args[10] if len(args) > 10 else None)
        return core(*args)

    layouts = jac_stage_layouts(monkeypatch)
    monkeypatch.setattr(compiled, "_least_squares_compiled", spy_core)
    parts = curve_fit(f, T, y, p0, engine="numba")
    calls_in_fit = [s for s in seen if s != n]  # the route probes call f on the whole batch
    assert calls_in_fit and max(calls_in_fit) <= 256
    assert layouts and all(c for c, _ in layouts)  # the pointwise route's J: in columns
    assert torch.equal(one[0], parts[0]) and torch.equal(one[1], parts[1])

    fun, jac, x0 = decay(n, seed=34)
    rows_seen: list = []

    def whole(x):
        rows_seen.append(x.shape[0])
        return fun(x)

    sizes_asked.clear()
    least_squares(whole, x0, jac=jac, engine="numba")
    assert set(rows_seen) == {n} and sizes_asked == [None]

    def one_problem(x):  # one curve, fitted from the 600 starts x0
        return x[0] * torch.exp(-x[1] * T) + x[2] - y[0]

    vec = least_squares(one_problem, x0, vectorize=True, engine="numba")
    assert sizes_asked == [None, 256]
    monkeypatch.setattr(compiled, "PART_ELEMENTS", 2**62)
    vec_one = least_squares(one_problem, x0, vectorize=True, engine="numba")
    assert sizes_asked[-1] >= n  # one part
    # torch.func's Jacobian of the vmapped fun rounds differently on batches of another
    # size: the same minima to rounding amplified by the stopping tests, not bit for bit
    # (measured: 72 of the 598 fits both solve differ, by at most 2.1e-9)
    both = vec.success & vec_one.success
    assert int(both.sum()) >= n // 2
    torch.testing.assert_close(vec.x[both], vec_one.x[both], rtol=0, atol=1e-8)


# ------------------------------------------------------- one part on one thread: fused calls
def test_fits_that_stop_on_gtol_after_x0_leave_the_fused_stage_without_a_trial(monkeypatch):
    """On one part and one thread, after x0, the update, the Jacobian stage and the trial are
    one call (kernels._update_stage_trial); where fits stop on gtol at a stage (noise-free
    curves converging: seen, the call returning their number), the trial is taken after they
    are written out: the fits agree with the torch core's, and their results are consistent
    (J at x, f at x, the counts ordered)."""
    g = seeded(9)  # a exp(-b t): noisy curves, and every third one noise-free
    y = (1 + torch.rand(60, 1, generator=g, dtype=D)) * torch.exp(
        -torch.rand(60, 1, generator=g, dtype=D) * T
    )
    y = y + 0.01 * torch.randn(60, 50, generator=g, dtype=D) * (torch.arange(60) % 3 != 0)[:, None]
    x0 = torch.tensor([1.5, 0.8], dtype=D).expand(60, 2).clone()

    def fun(p):
        return p[:, :1] * torch.exp(-p[:, 1:2] * T) - y

    def jac(p):
        e = torch.exp(-p[:, 1:2] * T)
        return torch.stack([e, -p[:, :1] * T * e], -1)

    stops: list = []
    looped = kernels._update_stage_trial

    def counted(*args):
        out = looped(*args)
        stops.append(out[2])
        return out

    monkeypatch.setattr(kernels, "_update_stage_trial", counted)
    with numba_threads(1):
        rn = least_squares(fun, x0, jac=jac, gtol=1e-6, engine="numba")
    assert any(s > 0 for s in stops) and bool((rn.status == 1).any())
    rt = least_squares(fun, x0, jac=jac, gtol=1e-6, engine="torch")
    assert_same_fits(rn, rt)
    assert_consistent(rn, fun, jac)

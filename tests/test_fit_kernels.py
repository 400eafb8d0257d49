"""Tests of the compiled core's numba kernels (fit/kernels.py) against dense references built
by torch: LAPACK's QR and SVD, and the torch core's lmpar (fit/core.py). float64 on the CPU,
the only case the compiled core takes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from numba_threads import factor, kernels, numba_threads, record
from reference import seeded

from steepest.fit import compiled, core

D = torch.float64
EPS = torch.finfo(D).eps


# ------------------------------------------------------------------------ kernels: QR, SVD
def _matrix(name: str) -> torch.Tensor:
    """A small matrix J (M, P), M >= P: random ones of several shapes (square ones too), one
    with an exactly zero column, one with singular values 1 ... 1e-10 (condition 1e10)."""
    g = seeded(sum(map(ord, name)))
    if name == "zero-column":
        j = torch.randn(9, 4, generator=g, dtype=D)
        j[:, 1] = 0.0
        return j
    if name == "ill-conditioned":
        u = torch.linalg.qr(torch.randn(12, 5, generator=g, dtype=D))[0]
        v = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=D))[0]
        return u @ torch.diag(torch.logspace(0, -10, 5, dtype=D)) @ v.T
    m, p = map(int, name.split("x"))
    return torch.randn(m, p, generator=g, dtype=D) * torch.logspace(0, 1, p, dtype=D)


MATRICES = ["2x1", "5x2", "8x3", "7x6", "30x4", "3x3", "5x5", "zero-column", "ill-conditioned"]


@pytest.mark.parametrize("name", MATRICES)
def test_qr_kernel_equals_lapack_qr_up_to_row_signs(name):
    """factor._qr on [J f]^T: R equals LAPACK's R (torch.linalg.qr) up to the sign of each
    row, to rounding of ||J||; Q^T f equals LAPACK's Q^T f with the same signs where J is well
    conditioned (where it is not, the late columns of Q are ill-determined: there the
    identities R^T (Q^T f) = J^T f and ||Q^T f||^2 + rho^2 = ||f||^2 are checked instead,
    for every matrix). An exactly zero column of J stays an exactly zero column of R."""
    j = _matrix(name)
    m, p = j.shape
    f = torch.randn(m, generator=seeded(7), dtype=D)
    at = np.ascontiguousarray(torch.cat([j, f[:, None]], 1).T.numpy())
    factor._qr(at, p)
    r = torch.from_numpy(np.triu(at[:p, :p].T).copy())
    qtf = torch.from_numpy(at[p, :p].copy())
    rho = float(np.linalg.norm(at[p, p:]))
    q_ref, r_ref = torch.linalg.qr(j)
    sign = torch.sign((r * r_ref).sum(1))
    sign = torch.where(sign == 0, 1.0, sign)
    jn, fn = float(torch.linalg.matrix_norm(j, 2)), float(f.norm())
    tol = 10 * m * EPS
    assert float((r - sign[:, None] * r_ref).abs().max()) <= tol * jn
    assert float((r.T @ qtf - j.T @ f).abs().max()) <= tol * jn * fn
    assert float(qtf.norm()) ** 2 + rho**2 == pytest.approx(fn**2, rel=tol)
    zero = (j == 0).all(0)
    if float(torch.linalg.cond(j[:, ~zero])) < 1e3:  # (a zero column: Q's is the algorithm's)
        assert float((qtf - sign * (q_ref.T @ f)).abs().max()) <= tol * fn
    assert bool((r[:, zero] == 0).all())
    if name == "zero-column":
        assert bool(zero.any())


def _svd_ref_check(j: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> None:
    """s (P,) and V^T (P, P) of one matrix j (M, P), unsorted, against LAPACK's SVD: the sorted
    singular values to 20 max(M, P) eps s_max (measured: 2 eps s_max); each right singular
    vector, matched up to sign, within 20 max(M, P) times Davis-Kahan's eps s_max / gap
    (measured: 9 times at condition 1e10); and, with no reference, V orthogonal and JV with
    orthogonal columns of norms s to 1e-12 s_max (an SVD of J)."""
    m, p = j.shape
    _, s_ref, vh_ref = torch.linalg.svd(j, full_matrices=False)
    order = torch.argsort(s, descending=True)
    s, vh = s[order], vh[order]
    smax = float(s_ref[0])
    tol = 20 * max(m, p) * EPS
    assert float((s - s_ref).abs().max()) <= tol * smax
    for i in range(p):
        gap = (
            float(torch.cat([s_ref[:i], s_ref[i + 1 :]]).sub(s_ref[i]).abs().min()) if p > 1 else 1
        )
        sgn = 1.0 if float(vh[i] @ vh_ref[i]) >= 0 else -1.0
        err = float((sgn * vh[i] - vh_ref[i]).norm())
        assert err <= tol * smax / gap, (i, err, gap)
    torch.testing.assert_close(vh @ vh.T, torch.eye(p, dtype=D), rtol=0, atol=20 * p * EPS)
    g = j @ vh.T
    assert float((g.norm(dim=0) - s).abs().max()) <= 1e-12 * smax
    off = g.T @ g - torch.diag(g.norm(dim=0) ** 2)
    assert float(off.abs().max()) <= 1e-12 * smax**2


def _svd_of(j: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The singular values (P,) and V^T (P, P) of j (M, P), unsorted, by the compiled core's
    kernels: Householder QR (factor._qr), then one-sided Jacobi on R from V = I
    (factor._svd_r), the singular values the column norms of G = R V (factor._norm)."""
    m, p = j.shape
    at = np.ascontiguousarray(torch.cat([j, torch.zeros(m, 1, dtype=D)], 1).T.numpy())
    factor._qr(at, p)
    g, v = np.empty((p, p)), np.eye(p)
    factor._svd_r(at, p, np.ones(p), g, v)
    s = [factor._norm(np.ascontiguousarray(g[:, i])) for i in range(p)]  # scaled: no overflow
    return torch.tensor(s, dtype=D), torch.from_numpy(v.T.copy())


@pytest.mark.parametrize("name", MATRICES)
def test_svd_kernels_equal_lapack_svd(name):
    """The kernels' SVD (Householder QR, one-sided Jacobi on R) against torch.linalg.svd: see
    _svd_ref_check; the zero column gives a singular value exactly 0 whose right singular
    vector is exactly e_1 (the Jacobi rotations never touch it)."""
    j = _matrix(name)
    s, vh = _svd_of(j)
    _svd_ref_check(j, s, vh)
    if name == "zero-column":
        k = int(torch.argmin(s))
        assert float(s[k]) == 0.0 and bool((vh[k].abs() == torch.eye(4, dtype=D)[1]).all())


@pytest.mark.parametrize("scale", [1e160, 1e-160])
def test_svd_kernels_keep_full_accuracy_at_extreme_scales(scale):
    """The QR's reflectors are formed from ratios of a column's entries (LAPACK's dlarfg), and
    Jacobi scales its columns by a power of two before summing squares: at entries of 1e160
    (the sums of squares would overflow: NaN singular values before) and 1e-160 (the
    reflector's v^T v was subnormal: 1e-5 relative accuracy before) the singular values equal
    LAPACK's to rounding, and R's diagonal equals LAPACK's in magnitude."""
    j = torch.randn(6, 12, 3, dtype=D, generator=seeded(5)) * scale
    ref = torch.linalg.svdvals(j)
    for i in range(j.shape[0]):
        s, _ = _svd_of(j[i])
        assert bool(torch.isfinite(s).all())
        err = (s.sort(descending=True).values - ref[i]).abs() / ref[i, 0]
        assert float(err.max()) < 1e-14
    at = np.ascontiguousarray(torch.cat([j[0], torch.zeros(12, 1, dtype=D)], 1).T.numpy())
    factor._qr(at, 3)
    r_ref = torch.linalg.qr(j[0], mode="r")[1]
    diag = torch.from_numpy(np.diag(at[:3, :3]).copy())
    torch.testing.assert_close(diag.abs(), r_ref.diagonal().abs(), rtol=1e-13, atol=0)


# ------------------------------------------------------------- kernels: curve_fit's covariance
def _spectrum(s: list[float], m: int = 12, seed: int = 21) -> torch.Tensor:
    """A matrix (m, len(s)) with singular values s and random singular vectors."""
    g = seeded(seed)
    u = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=D))[0]
    v = torch.linalg.qr(torch.randn(len(s), len(s), generator=g, dtype=D))[0]
    return u @ torch.diag(torch.tensor(s, dtype=D)) @ v.T


#: curve_fit's covariance cases: each of MATRICES; condition 1e13, where the bound sends the
#: kernel to the SVD but nothing is dropped; singular values down to 1e-17, one dropped; the
#: smallest singular value 0.3 and 3 times the cut (eps max(M, P) s_max, M = 12): dropped, kept
COVARIANCES = MATRICES + ["cond-1e13", "one-dropped", "just-dropped", "just-kept"]
#: the way compiled.covariance takes (1: R^-1 R^-T, 2: the SVD), by the bound on the condition
BY_SVD = {"zero-column", "cond-1e13", "one-dropped", "just-dropped", "just-kept"}
NEAR_CUT = {"just-dropped": 0.3, "just-kept": 3.0}


def _cov_case(name: str) -> torch.Tensor:
    if name == "cond-1e13":
        return _spectrum([1.0, 1e-6, 1e-13])
    if name == "one-dropped":
        return _spectrum([1.0, 1e-2, 1e-17])
    if name in NEAR_CUT:
        return _spectrum([1.0, 1e-3, NEAR_CUT[name] * EPS * 12])
    return _matrix(name)


def _cov_ref(j: torch.Tensor, cut: float) -> torch.Tensor:
    """(J^T J)^+ = V S^-2 V^T by LAPACK's SVD, the singular values <= cut s_max dropped."""
    _, s, vh = torch.linalg.svd(j, full_matrices=False)
    keep = s > cut * s[0]
    return (vh[keep].T / s[keep] ** 2) @ vh[keep]


@pytest.mark.parametrize("name", COVARIANCES)
def test_covariance_equals_the_lapack_pseudo_inverse(name):
    """compiled.covariance (R^-1 R^-T from J's QR where the bound P^2 max|R| max|R^-1| says no
    singular value can be dropped, else the SVD of R with scipy's cut) against V S^-2 V^T from
    LAPACK's SVD with the same cut (eps max(M, P) s_max): to 20 max(M, P) cond(J) eps of its
    largest entry, cond over the singular values kept (measured: at most 0.03 of that); the
    way taken as the bound says (R^-1 for the well-conditioned ones, condition 1e10 too; the
    SVD for the others). The zero column and the singular values 1e-17 and 0.3 cut are
    dropped (pcov's largest entry ~1/s^2 of the next: below 1e10), 3 cut kept (above 1e20:
    there the pseudo-inverse itself is ill-conditioned, so only which values it keeps is
    checked)."""
    j = _cov_case(name)
    m, p = j.shape
    cut = EPS * max(m, p)
    cov, way = compiled.covariance(j[None].contiguous(), cut)
    assert cov.shape == (1, p, p) and way.tolist() == [2 if name in BY_SVD else 1]
    ref = _cov_ref(j, cut)
    s = torch.linalg.svdvals(j)
    kept = s[s > cut * s[0]]
    assert kept.numel() == (p - 1 if name in ("zero-column", "one-dropped", "just-dropped") else p)
    big = float(cov.abs().max())
    if name == "just-kept":
        assert big > 1e20
        return
    if name == "just-dropped":
        assert big < 1e10
    cond = float(kept[0] / kept[-1])
    err = float((cov[0] - ref).abs().max())
    assert err <= 20 * max(m, p) * cond * EPS * float(ref.abs().max()), (err, cond)


def test_covariance_is_r_inverse_where_j_has_full_rank_and_the_svd_where_not():
    """A well-conditioned J: its covariance is R^-1 R^-T of its own QR (factor._qr; R^-1 by
    torch.linalg.inv) to 1e-14, by the way R^-1; J with an exactly zero column (R^-1 does not
    exist): by the SVD, finite, the zero column's row and column exactly 0 (the
    pseudo-inverse drops it)."""
    j = _matrix("8x3")
    cut = EPS * 8
    cov, way = compiled.covariance(j[None].contiguous(), cut)
    assert way.tolist() == [1]
    at = np.ascontiguousarray(torch.cat([j, torch.zeros(8, 1, dtype=D)], 1).T.numpy())
    factor._qr(at, 3)
    r = torch.from_numpy(np.triu(at[:3, :3].T).copy())
    rinv = torch.linalg.inv(r)
    torch.testing.assert_close(cov[0], rinv @ rinv.T, rtol=1e-14, atol=0)
    jz = _matrix("zero-column")
    covz, wayz = compiled.covariance(jz[None].contiguous(), EPS * 9)
    assert wayz.tolist() == [2]
    assert bool(torch.isfinite(covz).all()) and bool((covz[0, 1] == 0).all())
    assert bool((covz[0, :, 1] == 0).all())


@pytest.mark.parametrize("scale", [1e-15, 1e-11])
def test_covariance_drops_a_singular_value_of_a_badly_scaled_j(scale):
    """J (12 x 2) with its second column scaled by 1e-15: well conditioned once its columns
    are scaled to norm 1, but its own smaller singular value (~1e-15 s_max) lies below
    scipy's cut (12 eps = 2.7e-15): dropped, by the SVD (way 2), as LAPACK's pseudo-inverse
    with the same cut does; scaled by 1e-11 (above the cut, with the bound's margin of 100)
    it is kept, by R^-1 (way 1). To 20 M eps of the largest entry."""
    j = torch.randn(12, 2, generator=seeded(13), dtype=D)
    j[:, 1] *= scale
    cut = EPS * 12
    cov, way = compiled.covariance(j[None].contiguous(), cut)
    assert way.tolist() == [2 if scale == 1e-15 else 1]
    ref = _cov_ref(j, cut)
    big = float(ref.abs().max())  # ~1/s_min^2 where s_min is kept, ~1/s_max^2 where dropped
    assert (big < 1.0) if scale == 1e-15 else (big > 1e20)
    assert float((cov[0] - ref).abs().max()) <= 20 * 12 * EPS * big


def test_covariance_parallel_path_equals_the_serial_path_bitwise():
    """A batch of PARALLEL_MIN or more matrices is split among numba's threads
    (factor._cov_rows_parallel, seen to run): bitwise the serial path's result and ways,
    which hold to LAPACK's (every 29th matrix of a mixed batch: random, condition 1e9, an
    exactly zero column; to 1e-12 of the largest entry, measured 1.6e-15), both ways taken;
    and split into 3 uneven chunks, every row is written (the outputs start NaN, -1)."""
    n = compiled.PARALLEL_MIN + 45
    g = seeded(11)
    jac = torch.randn(n, 20, 3, generator=g, dtype=D) * torch.logspace(0, 3, 3, dtype=D)
    jac[::7, :, 2] *= 1e-9  # ill-conditioned ones
    jac[3::11, :, 1] = 0.0  # exactly zero columns
    cut = EPS * 20
    with numba_threads(1):
        c1, w1 = compiled.covariance(jac, cut)
    with pytest.MonkeyPatch.context() as mp, numba_threads(2):
        calls = record(mp, factor, "_cov_rows_parallel")
        c2, w2 = compiled.covariance(jac, cut)
    assert calls == [1]
    assert torch.equal(c1, c2) and torch.equal(w1, w2)
    assert set(w1.tolist()) == {1, 2}
    for i in range(0, n, 29):
        ref = _cov_ref(jac[i], cut)
        assert float((c1[i] - ref).abs().max()) <= 1e-12 * float(ref.abs().max())
    a = np.ascontiguousarray(jac.numpy())
    c3, w3 = np.full((n, 3, 3), np.nan), np.full(n, -1, dtype=np.int8)
    factor._cov_rows_parallel(3, a, cut, c3, w3)
    assert np.array_equal(c3, c1.numpy()) and np.array_equal(w3, w1.numpy())


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_covariance_flags_a_matrix_that_is_not_finite(bad):
    """compiled.covariance reports per matrix whether all its entries are finite (way 0;
    curve_fit's pcov is inf there): one entry NaN or +-inf in matrix 1 of 3 flags it alone,
    gives it 0 (finite: no NaN leaks into the batch's arithmetic), and leaves the others'
    values equal to those of a batch without it."""
    jac = torch.randn(3, 9, 3, generator=seeded(12), dtype=D)
    c0, _ = compiled.covariance(jac, EPS * 9)
    jac[1, 4, 2] = bad
    cov, way = compiled.covariance(jac, EPS * 9)
    assert way.tolist() == [1, 0, 1]
    assert bool((cov[1] == 0).all())
    for i in (0, 2):
        assert torch.equal(cov[i], c0[i])


@pytest.mark.parametrize("scale", [1e100, 1e-100])
def test_covariance_at_extreme_scales(scale):
    """J scaled by 1e100 or 1e-100: pcov scaled by 1e-200 or 1e200, to 1e-12 relative (the
    bound on the condition number is formed from the largest entries of R and R^-1, whose
    product does not overflow where their squares would)."""
    j = _matrix("8x3")
    cut = EPS * 8
    cov, _ = compiled.covariance(j[None].contiguous(), cut)
    big, _ = compiled.covariance((j * scale)[None].contiguous(), cut)
    torch.testing.assert_close(big[0] * scale**2, cov[0], rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------- kernels: lmpar
@pytest.mark.parametrize("rank_deficient", [False, True])
def test_lmpar_kernel_equals_the_torch_lmpar(rank_deficient):
    """kernels._lmpar (one fit at a time) against core._lmpar (batched torch) on the same
    factorisation (core._factor of random J D^-1 and f, columns scaled 1, 1e-3, 1e3): the same
    lambda and w(lambda) to 1e-12 relative, for radii from 2 to 1e-6 times the Gauss-Newton
    step (lambda = 0 where it fits, Newton's iterations where it is too long) and previous
    lambdas from 0 to 1e6; rank deficient: an exactly zero column, dropped (mu = inf)."""
    n, m, p = 6, 8, 3
    g = seeded(3 + rank_deficient)
    j = torch.randn(n, m, p, generator=g, dtype=D) * torch.tensor([1.0, 1e-3, 1e3], dtype=D)
    if rank_deficient:
        j[:, :, 1] = 0.0
    f = torch.randn(n, m, generator=g, dtype=D)
    acnorm = j.norm(dim=1)
    d = torch.where(acnorm > 0, acnorm, 1.0)
    fac = core._factor(j / d[:, None], f, 0.0, acnorm == 0)
    assert bool(torch.isinf(fac.mu).any()) == rank_deficient
    radius = fac.gn_norm * torch.tensor([2.0, 1.05, 0.5, 0.1, 1e-3, 1e-6], dtype=D)
    seen_zero = seen_newton = False
    for par0 in (0.0, 1e-9, 0.3, 1e6):
        par = torch.full((n,), par0, dtype=D)
        lam_ref, w_ref = core._lmpar(fac, radius, par)
        for b in range(n):
            w = np.empty(p)
            row = [np.ascontiguousarray(t[b].numpy()) for t in (fac.mu, fac.c, fac.gn)]
            scal = [float(t[b]) for t in (fac.gn_norm, fac.gnorm, fac.lo, radius, par)]
            lam = kernels._lmpar(*row, *scal, w)
            ref = float(lam_ref[b])
            assert lam == pytest.approx(ref, rel=1e-12, abs=0), (par0, b)
            np.testing.assert_allclose(w, w_ref[b].numpy(), rtol=0, atol=1e-12 * np.linalg.norm(w))
            seen_zero |= ref == 0
            seen_newton |= ref > 0
    assert seen_zero and seen_newton


# ---------------------------------------------------- kernels: the Gauss-Newton step from R
def _qr_of(j: torch.Tensor, f: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """[J f]^T factored by factor._qr (the Jacobian stage's buffer), and D: J's column norms
    (1 for a zero column, as the stage sets D at x0)."""
    at = np.ascontiguousarray(torch.cat([j, f[:, None]], 1).T.numpy())
    factor._qr(at, j.shape[1])
    acnorm = j.norm(dim=0)
    return at, torch.where(acnorm > 0, acnorm, 1.0).numpy()


def _gauss_newton(at: np.ndarray, d: np.ndarray, radius: float) -> tuple[float, dict]:
    """kernels._gauss_newton_r for one fit (b = 0): its return and the state it wrote (z in
    gn, c, and in rt the QR buffer of T = R D^-1 and Q^T f: T_ir in rt[r, i], Q^T f in row
    P)."""
    p = d.shape[0]
    st = {"gn": np.zeros((1, p)), "c": np.zeros((1, p)), "rt": np.zeros((1, p + 1, p))}
    zn = kernels._gauss_newton_r(at, p, 0, d[None], np.array([radius]), st["gn"], st["c"], st["rt"])
    return zn, st


@pytest.mark.parametrize("name", MATRICES)
def test_the_gauss_newton_step_from_r_is_the_least_squares_step(name):
    """kernels._gauss_newton_r (back substitution in T = R D^-1 from the Jacobian stage's QR)
    against torch.linalg.lstsq of J D^-1 (QR with LAPACK's pivoting, another route): with a
    radius the step fits, z = argmin ||J D^-1 z + f|| to 1e3 cond(J D^-1) eps relative
    (measured: 3 cond eps at condition 1e10); c^T z = ||Q^T f||^2 (the model's decrease that
    _update forms) and T z = -Q^T f to rounding; ||z|| returned. J with an exactly zero
    column (rank deficient) is refused (-1: the SVD way, which drops the column)."""
    j = _matrix(name)
    m, p = j.shape
    f = torch.randn(m, generator=seeded(8), dtype=D)
    at, d = _qr_of(j, f)
    zn, st = _gauss_newton(at, d, radius=1e300)
    if name == "zero-column":
        assert zn == -1.0
        return
    jd = j / torch.from_numpy(d)
    ref = torch.linalg.lstsq(jd, -f[:, None], driver="gelsy").solution[:, 0]
    z = torch.from_numpy(st["gn"][0])
    cond = float(torch.linalg.cond(jd))
    assert float((z - ref).norm()) <= 1e3 * cond * EPS * float(ref.norm())
    assert zn == pytest.approx(float(z.norm()), rel=1e-15)
    qtf = torch.from_numpy(at[p, :p].copy())
    t = torch.from_numpy(st["rt"][0, :p].T.copy())
    assert torch.equal(t, t.triu()) and torch.equal(torch.from_numpy(st["rt"][0, p]), qtf)
    assert float((t @ z + qtf).abs().max()) <= 10 * p * EPS * float(t.abs().max() * z.norm())
    cz = float(torch.from_numpy(st["c"][0]) @ z)
    assert cz == pytest.approx(float(qtf @ qtf), rel=1e3 * cond * EPS)


@pytest.mark.parametrize("name", ["5x2", "8x3", "30x4", "ill-conditioned"])
def test_the_gauss_newton_step_from_r_is_taken_where_lmpar_takes_it(name):
    """The step is z exactly where core._lmpar (on core._factor, LAPACK's SVD of J D^-1) gives
    lambda = 0: ||z|| - radius <= radius / 10, for radii from 0.5 to 2 times ||z||, none
    within 1e-6 of the edge at 1/1.1; elsewhere -1, with c and Q^T f unwritten (z and T are
    scratch there, which the SVD way overwrites or never reads)."""
    j = _matrix(name)
    m, p = j.shape
    f = torch.randn(m, generator=seeded(9), dtype=D)
    at, d = _qr_of(j, f)
    zn, _ = _gauss_newton(at, d, radius=1e300)
    fac = core._factor((j / torch.from_numpy(d))[None], f[None], 0.0)
    taken = 0
    for ratio in (2.0, 1.2, 1 / 1.1 + 1e-6, 1 / 1.1 - 1e-6, 0.8, 0.5):
        radius = zn * ratio
        lam, _ = core._lmpar(fac, torch.tensor([radius], dtype=D), torch.zeros(1, dtype=D))
        got, st = _gauss_newton(at, d, radius)
        if float(lam[0]) == 0.0:
            assert got == zn
            taken += 1
        else:
            assert got == -1.0
            assert not st["c"].any() and not st["rt"][0, p].any()
    assert taken == 3


def test_the_svd_from_the_kept_t_gives_the_stage_factorisation_and_lmpar_step():
    """kernels._factor_svd on the QR buffer that kernels._gauss_newton_r keeps (T = R D^-1 and
    Q^T f, with D = I: the SVD of a fit whose step from R was rejected, started from V = I), and
    on the stage's own buffer with D, against core._factor (LAPACK's SVD of J D^-1): the
    same sorted mu, ||c'||, ||gn||, lmpar's lo to 1e-12 relative; then kernels._lmpar on it
    against core._lmpar at radii 0.5 to 1e-3 ||gn||: the same lambda to 1e-10 and the same
    step in the D-scaled coordinates, V w (basis-free), to 1e-10 of its norm. The two buffers
    give the same factor to rounding (T_ir is R_ir / d_r either way)."""
    n, m, p = 5, 12, 3
    g = seeded(13)
    for _ in range(n):
        j = torch.randn(m, p, generator=g, dtype=D) * torch.tensor([1.0, 1e-3, 1e3], dtype=D)
        f = torch.randn(m, generator=g, dtype=D)
        at, d = _qr_of(j, f)
        zn, st = _gauss_newton(at, d, radius=1e300)
        assert zn > 0
        fac = core._factor((j / torch.from_numpy(d))[None], f[None], 0.0)
        out = {k: np.zeros((1, p)) for k in ("mu", "c", "gn")}
        out.update({k: np.zeros(1) for k in ("gn_norm", "gnorm", "lo")})
        vh = np.eye(p)[None].copy()
        ones, g3, v3 = np.ones(p), np.empty((p, p)), np.empty((p, p))
        kernels._factor_svd(0, st["rt"][0], p, ones, g3, v3, ones, 0.0, out["mu"], out["c"], vh,
                            out["gn"], out["gn_norm"], out["gnorm"], out["lo"])  # fmt: skip
        again = {k: np.zeros_like(v) for k, v in out.items()}
        vh2 = np.eye(p)[None].copy()
        kernels._factor_svd(0, at, p, d, g3, v3, ones, 0.0, again["mu"], again["c"], vh2,
                            again["gn"], again["gn_norm"], again["gnorm"], again["lo"])  # fmt: skip
        for k in out:
            np.testing.assert_allclose(again[k], out[k], rtol=1e-13, err_msg=k)
        np.testing.assert_allclose(np.sort(out["mu"][0]), np.sort(fac.mu[0].numpy()), rtol=1e-12)
        for k in ("gn_norm", "gnorm", "lo"):
            np.testing.assert_allclose(out[k], getattr(fac, k).numpy(), rtol=1e-12, err_msg=k)
        assert float(out["gn_norm"][0]) == pytest.approx(zn, rel=1e-12)
        for shrink in (0.5, 0.1, 1e-3):
            radius = zn * shrink
            lam_ref, w_ref = core._lmpar(
                fac, torch.tensor([radius], dtype=D), torch.zeros(1, dtype=D)
            )
            w = np.empty(p)
            lam = kernels._lmpar(out["mu"][0], out["c"][0], out["gn"][0], out["gn_norm"][0],
                                 out["gnorm"][0], out["lo"][0], radius, 0.0, w)  # fmt: skip
            assert lam > 0 and lam == pytest.approx(float(lam_ref[0]), rel=1e-10)
            step, step_ref = w @ vh[0], (w_ref[0] @ fac.vh[0]).numpy()
            np.testing.assert_allclose(step, step_ref, rtol=0, atol=1e-10 * np.linalg.norm(step))

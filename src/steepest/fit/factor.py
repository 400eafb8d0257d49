r"""The compiled core's dense factorisations, in numba (:mod:`.kernels` runs them in the
stages of the loop; :func:`.compiled.covariance` runs :func:`_cov_rows`): sums of products and
norms without overflow, the Householder QR of :math:`[J\ f]`, the one-sided Jacobi SVD of
:math:`RD^{-1}`, and curve_fit's covariance. Imported with :mod:`.kernels`, when the compiled
core first runs. Tested against LAPACK's QR and SVD in ``tests/test_fit_kernels.py``."""

from __future__ import annotations

import math

import numba
import numpy as np

#: Jacobi sweeps at most (quadratic convergence: 1-2 from the previous V, 4-5 from I, P = 3)
SWEEPS = 30

# fused multiply-adds only: rounding-level differences; no reassociation (it let the compiler
# turn the QR's (s / v^T v) a into (s a) / v^T v, which overflows from entries of 1e103 and
# underflows below 1e-105), no assumption on NaN or inf (the tests below rely on them)
_jit = numba.njit(cache=True, nogil=True, error_model="numpy", fastmath={"contract"})
# reassociation in one place only: the sum of products in _dot (its flags stay on its own
# additions when it is inlined, so no quotient or product around a call is reordered)
_jit_sum = numba.njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc", "contract"})


@_jit_sum
def _dot(a, b):
    """sum_i a[i] b[i] over i < len(a), in any order: ``reassoc`` lets the compiler split the
    sum into independent SIMD partial sums (AVX2: 4 lanes, several accumulators) instead of
    one serial chain of additions; the result differs at rounding level only. NaN and inf
    entries propagate as in the plain sum; whether a partial sum of products near 1e308
    overflows depends on the order (only :math:`J^Tf` can meet this, its code -1 at the edge
    of the float64 range). The loop runs from 0 (callers pass slices): an index known
    non-negative needs no wraparound test, which otherwise kept the loads from being
    contiguous vector loads."""
    s = 0.0
    for i in range(a.shape[0]):
        s += a[i] * b[i]
    return s


@_jit
def _norm(v):
    """||v||_2 without overflow or underflow in the squares (NaN if v has one)."""
    s = _dot(v, v)
    if s != s:
        return math.nan
    if s > 1e-290 and s < 1e290:
        return math.sqrt(s)
    big = 0.0
    for t in v:
        big = max(big, abs(t))
    if big == 0.0 or big == math.inf:
        return big
    s = 0.0
    for t in v:
        s += (t / big) * (t / big)
    return big * math.sqrt(s)


@_jit
def _qr(at, p):
    r"""Householder QR of A = at^T, at (P + 1, M) = [J f]^T (columns of A contiguous), in
    place: R = at[:P, :P]^T (upper), Q^T f in at[P, :P]. Each reflector as LAPACK's ``dlarfg``
    forms it, :math:`H = I - \tau v v^T` with :math:`v_1 = 1`: its entries are ratios of
    the column's, so no product of two entries is formed (entries of 1e-160 or 1e160 keep
    full accuracy). The dot products :math:`v^T a_j` by :func:`_dot` (vectorised partial
    sums), the updates :math:`a_j \mathrel{-}= s v` as loops from 0 over row slices
    (contiguous, vectorised)."""
    m = at.shape[1]
    for k in range(p):
        alpha = _norm(at[k, k:])
        if alpha == 0.0:
            continue
        x0 = at[k, k]
        beta = -alpha if x0 >= 0 else alpha
        tau = (beta - x0) / beta
        scal = 1.0 / (x0 - beta)
        vk = at[k, k + 1 :]
        for i in range(m - k - 1):
            vk[i] *= scal  # v below its leading 1
        for j in range(k + 1, p + 1):
            aj = at[j, k + 1 :]
            s = (at[j, k] + _dot(vk, aj)) * tau
            at[j, k] -= s
            for i in range(m - k - 1):
                aj[i] -= s * vk[i]
        at[k, k] = beta


@_jit
def _jacobi(g, v, sweeps):
    """One-sided Jacobi SVD of g (P, P) in place (see :func:`.core._jacobi`): the columns
    of g rotated until pairwise orthogonal, the rotations accumulated in v (starts I)."""
    p = g.shape[1]
    tol = p * 2.220446049250313e-16
    # the sums of squares below overflow from entries of ~1e154 and lose digits below ~1e-154:
    # scale g by a power of two (exact, the rotations do not change) into range, and back
    big = 0.0
    for r in range(g.shape[0]):
        for i in range(p):
            big = max(big, abs(g[r, i]))
    shift = 0
    if big > 1e100 or (0.0 < big < 1e-100):
        shift = math.frexp(big)[1]
        for r in range(g.shape[0]):
            for i in range(p):
                g[r, i] = math.ldexp(g[r, i], -shift)
    for _ in range(sweeps):
        moved = False
        for i in range(p - 1):
            for j in range(i + 1, p):
                alpha = 0.0
                beta = 0.0
                gamma = 0.0
                for r in range(g.shape[0]):
                    alpha += g[r, i] * g[r, i]
                    beta += g[r, j] * g[r, j]
                    gamma += g[r, i] * g[r, j]
                if not abs(gamma) > tol * (math.sqrt(alpha) * math.sqrt(beta)):
                    continue
                zeta = (beta - alpha) / (2 * gamma)
                az = abs(zeta)
                root = math.sqrt(1.0 + az * az) if az < 1e150 else az
                t = math.copysign(1.0 / (az + root), zeta)
                c = 1.0 / math.sqrt(1 + t * t)
                sn = c * t
                for r in range(g.shape[0]):
                    gi, gj = g[r, i], g[r, j]
                    g[r, i] = c * gi - sn * gj
                    g[r, j] = sn * gi + c * gj
                for r in range(p):
                    vi, vj = v[r, i], v[r, j]
                    v[r, i] = c * vi - sn * vj
                    v[r, j] = sn * vi + c * vj
                moved = True
        if not moved:
            break
    if shift:
        for r in range(g.shape[0]):
            for i in range(p):
                g[r, i] = math.ldexp(g[r, i], shift)


@_jit
def _svd_r(at, p, d, g, v):
    """The SVD of :math:`RD^{-1}` from the QR in ``at`` (:func:`_qr`): G = R D^-1 V rotated by
    :func:`_jacobi` from the V given in ``v`` (the previous factorisation's, or I) until its
    columns are orthogonal; then :math:`RD^{-1} = (GS^{-1}) S V^T`, S the column norms of G."""
    for i in range(p):
        for j in range(p):
            t = 0.0
            for r in range(i, p):  # (R D^-1 V)_ij, R upper triangular
                t += at[r, i] / d[r] * v[r, j]
            g[i, j] = t
    _jacobi(g, v, SWEEPS)


@_jit
def _load_row(jac, k, at):
    """jac[k] (M, P) into ``at`` (P + 1, M) transposed, row P zero (:func:`_qr`'s layout, no
    f); returns whether every entry is finite."""
    _, m, p = jac.shape
    good = True
    for i in range(m):
        for j in range(p):
            t = jac[k, i, j]
            good = good and math.isfinite(t)
            at[j, i] = t
    at[p] = 0.0
    return good


@_jit
def _cov_rows(k0, k1, jac, cut, cov, way):
    r"""curve_fit's covariance before its scale, :math:`(J^TJ)^+ = VS^{-2}V^T` with the
    singular values :math:`s \le` ``cut`` :math:`s_{max}` dropped (scipy's rule, as
    :func:`.core._svd_values` and curve_fit's torch path form it), of jac[k] (M, P), M >= P,
    for k0 <= k < k1. From the Householder QR J = QR (:func:`_qr`): where R has no zero on its
    diagonal and :math:`P^2 \max|R_{ij}| \max|R^{-1}_{ij}| < 10^{-2}/` ``cut`` (it bounds
    :math:`\|R\|_F \|R^{-1}\|_F \ge s_{max}/s_{min}`: no singular value can be dropped,
    with a margin of 100 for the rounding of :math:`R^{-1}`), :math:`R^{-1}R^{-T}` (back
    substitution; no SVD); else the SVD of R by :func:`_jacobi` from V = I, and
    :math:`\sum_i v_iv_i^T/s_i^2` over the singular values kept. The two agree to the
    rounding of :math:`R^{-1}`, ~cond(J) eps relative (as the SVD's smallest singular value).
    way[k] (int8) = the way taken: 1 by R^-1, 2 by the SVD, 0 where an entry of jac[k] is not
    finite (cov[k] = 0 then, not factored)."""
    _, m, p = jac.shape
    at = np.zeros((p + 1, m))
    g = np.empty((p, p))
    v = np.empty((p, p))
    u = np.empty((p, p))
    ones = np.ones(p)
    sv = np.empty(p)
    for k in range(k0, k1):
        if not _load_row(jac, k, at):
            way[k] = 0
            cov[k] = 0.0
            continue
        _qr(at, p)
        # U = R^-1, upper, column by column (R_ij = at[j, i], j >= i); the largest entries of
        # R and U (their products bound the condition number without squares that overflow)
        full = True
        rmax = 0.0
        umax = 0.0
        for j in range(p):
            if at[j, j] == 0.0:
                full = False
                break
            for i in range(j + 1):
                rmax = max(rmax, abs(at[j, i]))
            u[j, j] = 1.0 / at[j, j]
            umax = max(umax, abs(u[j, j]))
            for i in range(j - 1, -1, -1):
                t = 0.0
                for r in range(i + 1, j + 1):
                    t += at[r, i] * u[r, j]
                u[i, j] = -t / at[i, i]
                umax = max(umax, abs(u[i, j]))
        if full and p * p * rmax * umax * cut < 1e-2:
            for i in range(p):
                for j in range(i, p):
                    t = 0.0
                    for r in range(j, p):  # U upper: U_ir U_jr for r >= max(i, j) = j
                        t += u[i, r] * u[j, r]
                    cov[k, i, j] = t
                    cov[k, j, i] = t
            way[k] = 1
            continue
        way[k] = 2
        for i in range(p):
            for j in range(p):
                v[i, j] = 1.0 if i == j else 0.0
        _svd_r(at, p, ones, g, v)
        smax = 0.0
        for i in range(p):
            sv[i] = _norm(g[:, i])
            smax = max(smax, sv[i])
        for i in range(p):
            for j in range(p):
                t = 0.0
                for r in range(p):
                    if sv[r] > cut * smax:
                        t += v[i, r] * v[j, r] / (sv[r] * sv[r])
                cov[k, i, j] = t


@numba.njit(cache=True, nogil=True, parallel=True)
def _cov_rows_parallel(chunks, jac, cut, cov, way):
    n = jac.shape[0]
    for t in numba.prange(chunks):
        _cov_rows(t * n // chunks, (t + 1) * n // chunks, jac, cut, cov, way)

r"""The compiled core's dense factorisations, in numba (:mod:`.kernels` runs them in the
stages of the loop; :func:`.compiled.covariance` runs :func:`_cov_rows`): sums of products and
norms without overflow, the Householder QR of :math:`[J\ f]`, R and :math:`Q^Tf` from the
Cholesky factor of :math:`J^TJ` where that is accurate, the one-sided Jacobi SVD of
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


#: :func:`_gram_r` forms R from :math:`J^TJ` where :math:`M\epsilon\kappa_F^2` of the
#: column-scaled J is at most this (its rounding then moves R by ~this relative, and
#: :math:`Q^Tf` by ~this times :math:`\|f\|`); elsewhere the Householder QR does
GRAM_TOL = 1e-10


@_jit
def _gram_r(at, p, nrm, g, u, w):
    r"""The QR factor R of J and :math:`Q^Tf` of A = at^T = [J f] (P + 1, M) from the Gram
    matrix, where that is accurate; ``nrm``: J's column norms (P,) (:func:`_norm`'s, no
    overflow); g (P + 1, P + 1), w (P, M): scratch. Each column of J is first scaled by the
    power of two :math:`s_j` that brings its norm into [0.5, 1) (exact, into w: no product
    below over- or underflows, and a J scaled by powers of two takes the same route and the
    same R up to those powers); then :math:`G = J_s^TJ_s` by :func:`_dot`, its Cholesky
    factor :math:`G = R_s^TR_s` (upper, positive diagonal), :math:`Q^Tf = R_s^{-T}J_s^Tf`
    (:math:`J_s = JS` has J's Q), :math:`R = R_sS^{-1}`, written into ``at`` in :func:`_qr`'s
    layout (R_ir = at[r, i], Q^T f in at[P, :P]), and :math:`U = R^{-1} = SR_s^{-1}` into u
    (P, P); returns True. Taken where J is tall, M >= 2P (the QR's reflections of the
    M-vectors cost most there; a square system's QR costs about what its Gram matrix does,
    and there the QR's rounding lands Rosenbrock's fits on x* = (1, 1) exactly one evaluation
    earlier more often: tests/test_fit_compiled.py), no column is zero or not finite, and
    :math:`M\epsilon\kappa_F^2 \le` :data:`GRAM_TOL`, :math:`\kappa_F =
    \|R_c\|_F\|R_c^{-1}\|_F \ge \kappa_2(R_c)` of the column-scaled :math:`R_c = R
    \mathrm{diag}(1/\|J_{:j}\|)` (:math:`\|R_c\|_F^2 = P`): G's rounding, ~M eps of its
    entries, then moves R by ~:data:`GRAM_TOL` relative (column by column) and
    :math:`Q^Tf` by ~:data:`GRAM_TOL` :math:`\|f\|`, against ~M eps kappa for the QR
    (normal equations square the condition number; measured on the tests' matrices: 1e-3 of
    the bound). Elsewhere (rank deficiency, kappa_F above ~95 at M = 50, ~194 at M = 12, a
    :math:`J^Tf`, R or U that is not finite) it returns False and leaves ``at`` as it was,
    for :func:`_qr`. Cheaper than the QR: P(P + 3)/2 dot products instead of P reflections
    of the M-vectors (0.91-0.93x the time of the Jacobian stage on 1,747 decay curves of 50
    points, in-process interleaved, one and two threads). The signs of R's rows may differ
    from the QR's, with those of Q^T f (their products, and every step and factor formed
    from them, are the same)."""
    m = at.shape[1]
    if m < 2 * p:
        return False
    for i in range(p):
        if not (nrm[i] > 0.0 and nrm[i] < math.inf):
            return False
        sc = math.ldexp(1.0, -math.frexp(nrm[i])[1])
        ai, wi = at[i], w[i]
        for k in range(m):
            wi[k] = ai[k] * sc
    for i in range(p):
        for j in range(i, p):
            g[i, j] = _dot(w[i], w[j])
        g[i, p] = _dot(w[i], at[p])  # J_s^T f
        g[p, i] = g[i, i]  # the squared scaled column norms, kept for the bound
    for i in range(p):
        s = g[i, i]
        for r in range(i):
            s -= g[r, i] * g[r, i]
        if not s > 0:
            return False
        rii = math.sqrt(s)
        g[i, i] = rii
        for j in range(i + 1, p + 1):
            t = g[i, j]
            for r in range(i):
                t -= g[r, i] * g[r, j]
            g[i, j] = t / rii
    inv2 = 0.0  # ||R_c^-1||_F^2: row i of R_s^-1 (into u) times ||J_s:i||
    for j in range(p):
        u[j, j] = 1.0 / g[j, j]
        for i in range(j - 1, -1, -1):
            t = 0.0
            for r in range(i + 1, j + 1):
                t += g[i, r] * u[r, j]
            u[i, j] = -t / g[i, i]
        for i in range(j + 1):
            inv2 += g[p, i] * u[i, j] * u[i, j]
    if not m * 2.220446049250313e-16 * p * inv2 <= GRAM_TOL:  # (NaN: not taken)
        return False
    for i in range(p):  # R = R_s S^-1 (column r divided by s_r), U = S R_s^-1 (row i times s_i)
        if not math.isfinite(g[i, p]):
            return False
        e = math.frexp(nrm[i])[1]
        for j in range(p):
            u[i, j] = math.ldexp(u[i, j], -e) if j >= i else 0.0
            if not math.isfinite(u[i, j]):
                return False
        for r in range(i, p):
            g[i, r] = math.ldexp(g[i, r], math.frexp(nrm[r])[1])
            if not math.isfinite(g[i, r]):
                return False
    for i in range(p):
        for r in range(i, p):
            at[r, i] = g[i, r]
        at[p, i] = g[i, p]
    return True


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
    for k0 <= k < k1:

    - where J is tall and its columns, scaled to norm 1, are well conditioned (:func:`_gram_r`:
      :math:`M\epsilon\kappa_F^2 \le` :data:`GRAM_TOL`), R from the Cholesky factor of
      :math:`J^TJ`; then, where the bound below says that no singular value of R itself can be
      dropped (:func:`_cut_free`: columns of very different scales can have one), its
      :math:`R^{-1}R^{-T}`, to ~:data:`GRAM_TOL` relative (way 3), else the SVD of that R, as
      below (way 2);
    - else from the Householder QR J = QR (:func:`_qr`): where R has no zero on its diagonal
      and :math:`P^2 \max|R_{ij}| \max|R^{-1}_{ij}| < 10^{-2}/` ``cut`` (it bounds
      :math:`\|R\|_F \|R^{-1}\|_F \ge s_{max}/s_{min}`: no singular value can be dropped,
      with a margin of 100 for the rounding of :math:`R^{-1}`), :math:`R^{-1}R^{-T}` (back
      substitution; no SVD; way 1); else the SVD of R by :func:`_jacobi` from V = I, and
      :math:`\sum_i v_iv_i^T/s_i^2` over the singular values kept (way 2). The two agree to
      the rounding of :math:`R^{-1}`, ~cond(J) eps relative (as the SVD's smallest singular
      value).

    way[k] (int8) = the way taken: 3, 1 or 2 as above, 0 where an entry of jac[k] is not
    finite (cov[k] = 0 then, not factored)."""
    _, m, p = jac.shape
    at = np.zeros((p + 1, m))
    g = np.empty((p, p))
    v = np.empty((p, p))
    u = np.empty((p, p))
    gg = np.empty((p + 1, p + 1))
    w = np.empty((p, m))
    nrm = np.empty(p)
    ones = np.ones(p)
    sv = np.empty(p)
    for k in range(k0, k1):
        if not _load_row(jac, k, at):
            way[k] = 0
            cov[k] = 0.0
            continue
        for i in range(p):
            nrm[i] = _norm(at[i])
        if _gram_r(at, p, nrm, gg, u, w):
            way[k] = 3 if _cut_free(at, p, u, cut) else 2  # (2: the SVD of this R)
        else:
            _qr(at, p)
            way[k] = 1 if _r_inverse(at, p, u, cut) else 2
        if way[k] == 2:
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
            continue
        for i in range(p):
            for j in range(i, p):
                t = 0.0
                for r in range(j, p):  # U upper: U_ir U_jr for r >= max(i, j) = j
                    t += u[i, r] * u[j, r]
                cov[k, i, j] = t
                cov[k, j, i] = t


@_jit
def _r_inverse(at, p, u, cut):
    """U = R^-1 (upper, column by column; R_ij = at[j, i], j >= i) of the QR in ``at``, into
    u; returns whether R has no zero on its diagonal and :func:`_cut_free`."""
    for j in range(p):
        if at[j, j] == 0.0:
            return False
        u[j, j] = 1.0 / at[j, j]
        for i in range(j - 1, -1, -1):
            t = 0.0
            for r in range(i + 1, j + 1):
                t += at[r, i] * u[r, j]
            u[i, j] = -t / at[i, i]
    return _cut_free(at, p, u, cut)


@_jit
def _cut_free(at, p, u, cut):
    r"""Whether P^2 max|R| max|U| cut < 1e-2 for R in ``at`` (R_ij = at[j, i], j >= i) and U =
    R^-1 (upper) in u: the largest entries bound :math:`\|R\|_F\|R^{-1}\|_F \ge
    s_{max}/s_{min}` without squares that overflow, so no singular value of R can be at most
    ``cut`` s_max (with a margin of 100 for the rounding of U)."""
    rmax = 0.0
    umax = 0.0
    for j in range(p):
        for i in range(j + 1):
            rmax = max(rmax, abs(at[j, i]))
            umax = max(umax, abs(u[i, j]))
    return p * p * rmax * umax * cut < 1e-2


@numba.njit(cache=True, nogil=True, parallel=True)
def _cov_rows_parallel(chunks, jac, cut, cov, way):
    n = jac.shape[0]
    for t in numba.prange(chunks):
        _cov_rows(t * n // chunks, (t + 1) * n // chunks, jac, cut, cov, way)

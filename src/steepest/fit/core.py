"""The batched MINPACK-style core of :func:`~steepest.fit.least_squares`: the Jacobian by
``torch.func``, the SVD of the scaled Jacobian, MINPACK's ``lmpar`` and the loop over the fits
still running, with bounds kept by an active set and a projection (see :mod:`steepest.fit`;
the checks before a fit starts are in :mod:`.checks`)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from ..errors import ConfigurationError
from .bounds import _box_rows, _on_bounds
from .checks import _check_seen


# ---------------------------------------------------------------------------------- helpers
def _jacobian(fun_b: Callable[[Tensor], Tensor], x: Tensor, m: int, mode: str) -> Tensor:
    """J (B, M, P) of a batched residual (B, P) -> (B, M) whose row b depends on x[b] only:
    reverse mode (M vjps, vmapped) while B M^2 is small, else forward mode (P jvps)."""
    b, p = x.shape
    if mode == "auto":  # measured (torch 2.13, CPU): M vmapped vjps cost ~B M^2, P jvps ~B M P
        mode = "jacrev" if p > m or b * m * m <= 200_000 else "jacfwd"
    try:
        if mode == "jacfwd":
            eye = torch.eye(p, dtype=x.dtype, device=x.device).unsqueeze(1).expand(p, b, p)

            def column(t: Tensor) -> Tensor:
                return torch.func.jvp(fun_b, (x,), (t,))[1]

            return torch.func.vmap(column)(eye).permute(1, 2, 0)
        _, vjp = torch.func.vjp(fun_b, x)
        eye = torch.eye(m, dtype=x.dtype, device=x.device).unsqueeze(1).expand(m, b, m)
        return torch.func.vmap(lambda u: vjp(u)[0])(eye).permute(1, 0, 2)
    except (RuntimeError, NotImplementedError) as e:
        raise ConfigurationError(
            f"torch.func could not differentiate fun ({type(e).__name__}: {e}); write fun with "
            f"torch operations only (no .item(), numpy or in-place writes to x), or pass "
            f"jac=callable."
        ) from e


def _range_exponent(dtype: torch.dtype) -> int:
    """T of :func:`_range_scales`: 1/8 of the dtype's largest binary exponent (float64 128,
    float32 16)."""
    return math.frexp(torch.finfo(dtype).max)[1] // 8


def _range_scales(big: Tensor) -> Tensor:
    r"""Per entry of ``big`` (>= 0): :math:`2^{-e}`, where :math:`2^{e-1} \le` big
    :math:`< 2^e`, for the entries outside :math:`[2^{-T-1}, 2^T)` (e outside [-T, T]), T = 1/8
    of the dtype's largest exponent (float64: 128, about 3e-39 to 3e38; float32: 16); 1 for the
    others, for 0, inf and
    NaN. A vector whose largest entry is big, times this, has its largest entry in [1/2, 1)
    exactly (a power of two; a subnormal big gets the largest power of two), so that its sum
    of squares neither overflows (beyond about 1e154 in float64) nor underflows; in range the
    numbers are left as they are."""
    _, e = torch.frexp(big)
    t = _range_exponent(big.dtype)
    out = (e > t) | (e < -t)
    # (a subnormal entry: 2^(8T - 1) at most, the largest power of two there is)
    return torch.where(out, torch.ldexp(torch.ones_like(big), (-e).clamp(max=8 * t - 1)), 1.0)


def _colnorms(a: Tensor) -> Tensor:
    """The column norms (n, P) of a batch of matrices a (n, k, P), without overflow or
    underflow of the squares (as MINPACK's ``enorm``): ``torch.linalg.vector_norm`` where every
    norm lies in :math:`[2^{-T}, 2^T]` (:func:`_range_scales`' T: no square overflowed, and the
    largest entry's did not underflow), else each column whose largest entry is out of that
    range scaled by the power of two of :func:`_range_scales` first (exact), then back. (One
    host synchronisation; the scaled route costs ~15 small operations, ~0.1 ms a stage of the
    torch core on one fit.)"""
    n = torch.linalg.vector_norm(a, dim=1)
    t = 2.0 ** _range_exponent(a.dtype)
    fine = n.clamp(1 / t, t) == n
    if bool(fine.all()):
        return n
    big = a.abs().amax(1)
    if bool((fine | (big == 0)).all()):  # the others exactly zero columns (held, unused)
        return n
    s = _range_scales(big)
    return torch.linalg.vector_norm(a * s.unsqueeze(1), dim=1) / s


# ---------------------------------------------------------------------------------- factor
#: batches of at least this many problems take the SVD of R by one-sided Jacobi in batched torch
#: instead of LAPACK's (torch 2.13, CPU, one thread, 3 x 3: LAPACK ~3.4 us a matrix, 34 ms for
#: 10,000, 1.1 ms for 300; the Jacobi sweeps 8 ms for 10,000, 1.4 ms for 300)
JACOBI_MIN_BATCH = 512


def _jacobi(r: Tensor, sweeps: int = 30) -> tuple[Tensor, Tensor]:
    r"""One-sided (Hestenes) Jacobi SVD of a batch of small matrices r (n, k, P): plane
    rotations V, applied to the columns, until every pair of columns of :math:`G = rV` is
    orthogonal to :math:`|g_i^T g_j| \le P\epsilon \|g_i\|\|g_j\|`; then
    :math:`r = (G S^{-1}) S V^T` is an SVD with S the column norms of G. Returns (G, V), shaped
    (n, k, P) and (n, P, P). The rotations work on the columns of r itself, never on
    :math:`r^T r`, so the condition number is not squared (Demmel and Veselić 1992: the small
    singular values to high relative accuracy). The columns are kept as P tensors (k, n), so a
    dot product is a sum over the short leading axis; each sweep visits the P (P - 1) / 2 pairs
    in cyclic order; at most ``sweeps`` sweeps (quadratic convergence: 3-4 for P = 3)."""
    n, _, p = r.shape
    tol = p * torch.finfo(r.dtype).eps
    g = list(r.permute(2, 1, 0).contiguous().unbind(0))
    eye = torch.eye(p, dtype=r.dtype, device=r.device)
    v = list(eye.unsqueeze(-1).expand(p, p, n).contiguous().unbind(0))
    one = torch.ones((), dtype=r.dtype, device=r.device)
    for _ in range(sweeps):
        moved = torch.zeros((), dtype=torch.bool, device=r.device)
        for i in range(p - 1):
            for j in range(i + 1, p):
                alpha = (g[i] * g[i]).sum(0)
                beta = (g[j] * g[j]).sum(0)
                gamma = (g[i] * g[j]).sum(0)
                rot = gamma.abs() > tol * (alpha.sqrt() * beta.sqrt())  # no overflow of alpha beta
                zeta = (beta - alpha) / (2 * gamma)
                t = torch.copysign(one / (zeta.abs() + torch.hypot(one, zeta)), zeta)
                t = torch.where(rot, t, 0.0)  # no rotation: c = 1, s = 0
                c = torch.rsqrt(1 + t * t)
                sn = c * t
                g[i], g[j] = c * g[i] - sn * g[j], sn * g[i] + c * g[j]
                v[i], v[j] = c * v[i] - sn * v[j], sn * v[i] + c * v[j]
                moved = moved | rot.any()
        if not bool(moved):
            break
    return torch.stack(g).permute(2, 1, 0), torch.stack(v).permute(2, 1, 0)


class _Factor(NamedTuple):
    r"""The factorisation of the scaled Jacobian :math:`A = JD^{-1} = USV^T` of each problem,
    in the form the steps use: ``mu`` = :math:`s^2` (+inf where s is dropped, so that
    :math:`c'/(\mu + \lambda)` is 0 there without a mask), ``c`` = :math:`c' = -SU^Tf` (0
    where dropped), ``vh`` = :math:`V^T`, and what :func:`_lmpar` needs of the Gauss-Newton
    step :math:`w_0 = c'/\mu`, computed once per factorisation: ``gn`` = w_0, ``gn_norm`` =
    :math:`\|w_0\|`, ``gnorm`` = :math:`\|c'\| = \|A^Tf\|`, ``lo`` =
    :math:`\|w_0\|^2 / \sum_i w_{0,i}^2/\mu_i` (MINPACK's lower bound on lambda per unit of
    (||w_0|| - Delta)/Delta; 0 when J is rank deficient)."""

    mu: Tensor
    c: Tensor
    vh: Tensor
    gn: Tensor
    gn_norm: Tensor
    gnorm: Tensor
    lo: Tensor


def _factor(jd: Tensor, f: Tensor, cut: float, zero: Tensor | None = None) -> _Factor:
    r"""The :class:`_Factor` of :math:`A` = ``jd`` (n, M, P) with residuals f (n, M) from the
    thin SVD of A (LAPACK's); see :func:`_factor_svd` for ``cut`` and ``zero``."""
    u, s, vh = torch.linalg.svd(jd, full_matrices=False)
    return _factor_svd(s, -s * (f.unsqueeze(1) @ u).squeeze(1), vh, cut, zero)


def _factor_r(rr: Tensor, qtf: Tensor, cut: float, zero: Tensor | None = None) -> _Factor:
    r"""The :class:`_Factor` of :math:`A = QR` from its triangular factor R = ``rr`` (n, P, P)
    and :math:`Q^T f` = ``qtf`` (n, P), the two taken from one Householder QR of the augmented
    matrix :math:`[A\ f] = Q [R\ Q^Tf; 0\ \rho]` (Q never formed): :math:`R = U_R S V^T`,
    :math:`U^T f = U_R^T (Q^T f)`, the same accuracy as the SVD of A (the condition number is
    not squared, as it would be by the eigen-decomposition of :math:`A^T A`). For a batch of at
    least :data:`JACOBI_MIN_BATCH` the SVD of R is :func:`_jacobi`'s, with
    :math:`SU_R^T = G^T`, else LAPACK's."""
    if rr.shape[0] >= JACOBI_MIN_BATCH:
        g, v = _jacobi(rr)
        s = torch.linalg.vector_norm(g, dim=1)
        return _factor_svd(s, -(qtf.unsqueeze(1) @ g).squeeze(1), v.mT, cut, zero)
    u, s, vh = torch.linalg.svd(rr)
    return _factor_svd(s, -s * (qtf.unsqueeze(1) @ u).squeeze(1), vh, cut, zero)


def _svd_values(jac: Tensor) -> tuple[Tensor, Tensor]:
    """The singular values s (n, P) and :math:`V^T` of a batch of tall matrices J (n, M, P),
    unsorted: for at least :data:`JACOBI_MIN_BATCH` of them, by the QR of J and
    :func:`_jacobi` on R (the same singular values and V; 18 ms against LAPACK's SVD 46 ms for
    10,000 (50, 3)), else by LAPACK's SVD."""
    n, m, p = jac.shape
    if n >= JACOBI_MIN_BATCH and m > p:
        g, v = _jacobi(torch.linalg.qr(jac, mode="r")[1])
        return torch.linalg.vector_norm(g, dim=1), v.mT
    _, s, vh = torch.linalg.svd(jac, full_matrices=False)
    return s, vh


def _factor_svd(
    s: Tensor, cp: Tensor, vh: Tensor, cut: float, zero: Tensor | None = None
) -> _Factor:
    r"""The :class:`_Factor` from the singular values s, :math:`c' = -SU^Tf` and :math:`V^T`.
    Dropped: singular values that are 0 or at most ``cut`` :math:`s_{max}`, and those whose
    right singular vector lies mostly (weight > 1/2) on the columns ``zero`` (n, P) of A that
    are exactly 0: the exact SVD gives them :math:`s = 0`, :math:`v = e_j` (MINPACK's QR an
    exactly zero column of R), but LAPACK's rounding gives ~1e-17 with a c' of rounding noise,
    whose step :math:`c'/(s^2 + \lambda)` sent the unused parameter off by thousands."""
    p = vh.shape[-1]
    mu = s * s
    keep = mu > 0
    if cut > 0:
        keep = keep & (s > cut * s.amax(-1, keepdim=True))
    if zero is not None:
        keep = keep & ((vh * vh) * zero.unsqueeze(1)).sum(-1).le(0.5)
    mu = torch.where(keep, mu, math.inf)
    cp = torch.where(keep, cp, 0.0)
    gn = cp / mu
    gn_norm = torch.linalg.vector_norm(gn, dim=-1)
    full = keep.all(-1) if mu.shape[-1] == p else torch.zeros_like(keep[:, 0])
    q0 = (gn * gn / mu).sum(-1)
    lo = torch.where(full & (q0 > 0), gn_norm.pow(2) / q0, 0.0)
    return _Factor(mu, cp, vh, gn, gn_norm, torch.linalg.vector_norm(cp, dim=-1), lo)


def _lmpar(
    fac: _Factor, radius: Tensor, par: Tensor, active: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    r"""MINPACK's ``lmpar`` (Moré 1978, section 5) in the SVD coordinates of each problem,
    :math:`w(\lambda)_i = c'_i / (\mu_i + \lambda)` with :math:`D\delta = V w`: lambda = 0 when
    the Gauss-Newton step fits, :math:`\|w(0)\| \le 1.1\Delta`; else Newton on
    :math:`1/\|w(\lambda)\| - 1/\Delta` (a concave function of lambda) from the previous step's
    lambda (``par``) clipped to the bracket [l, u] (l from the Newton step at 0 when J has full
    rank, else 0; :math:`u = \|A^T f\| / \Delta`), the bracket narrowed on every iterate, until
    :math:`|\|w\| - \Delta| \le 0.1\Delta`, or the iterates stop falling short (l = 0), or 10
    iterations (the 10th lambda kept, as MINPACK does). Only the fits ``active`` (default all) whose
    Gauss-Newton step is too long are iterated. Returns (lambda, w(lambda))."""
    k = _consts(radius.dtype, radius.device)
    fp = fac.gn_norm - radius
    tenth = k.tenth * radius
    long = fp > tenth if active is None else active & (fp > tenth)
    if not bool(long.any()):
        return torch.zeros_like(radius), fac.gn
    parl = fp / radius * fac.lo
    paru = fac.gnorm / radius
    paru = torch.where(paru > k.zero, paru, k.dwarf / radius.clamp(max=0.1))
    lam = torch.minimum(torch.maximum(par, parl), paru)
    lam = torch.where(lam == k.zero, fac.gnorm / fac.gn_norm.clamp_min(k.dwarf), lam)
    todo, prev = long, fp
    for it in range(10):
        lam = torch.where(todo & (lam == k.zero), torch.maximum(k.thousandth * paru, k.dwarf), lam)
        den = fac.mu + lam.unsqueeze(-1)
        wl = fac.c / den  # for every fit at its current lambda (frozen once it stops)
        phi = torch.linalg.vector_norm(wl, dim=-1)
        fp = phi - radius
        stop = (fp.abs() <= tenth) | ((parl == k.zero) & (fp <= prev) & (prev < k.zero))
        todo = todo & ~stop
        if it == 9 or not bool(todo.any()):
            break
        q = (wl * wl / den).sum(-1)
        parc = fp / radius * phi * phi / torch.maximum(q, k.dwarf)
        parl = torch.where(todo & (fp > k.zero), torch.maximum(parl, lam), parl)
        paru = torch.where(todo & (fp < k.zero), torch.minimum(paru, lam), paru)
        lam = torch.where(todo, torch.maximum(parl, lam + parc), lam)
        prev = torch.where(todo, fp, prev)
    return torch.where(long, lam, k.zero), torch.where(long.unsqueeze(-1), wl, fac.gn)


class _K(NamedTuple):
    zero: Tensor
    one: Tensor
    neg_one: Tensor
    tenth: Tensor
    half: Tensor
    thousandth: Tensor
    dwarf: Tensor
    quarter: Tensor
    three_quarters: Tensor
    accept: Tensor  # MINPACK's 1e-4 on rho
    ftu: Tensor  # max(ftol, eps), max(xtol, eps) (the core's stop test)
    xtu: Tensor


@functools.cache
def _consts(dtype: torch.dtype, device: torch.device, ftol: float = 0.0, xtol: float = 0.0) -> _K:
    """0-d tensors of the constants of the hot loop (never written to): an operation with a
    Python number wraps it into a tensor first, ~1.5-2x the cost of the operation on 13 fits."""
    eps, tiny = torch.finfo(dtype).eps, torch.finfo(dtype).tiny
    vals = (0.0, 1.0, -1.0, 0.1, 0.5, 1e-3, tiny, 0.25, 0.75, 1e-4, max(ftol, eps), max(xtol, eps))
    return _K(*(torch.tensor(v, dtype=dtype, device=device) for v in vals))


# ---------------------------------------------------------------------------------- core
class _Fits:
    """The state of the fits still running (a subset of the batch: ``rows``)."""

    FIELDS = ("rows", "x", "f", "fnorm", "floor", "nit", "first", "d", "radius", "lam", "lref")
    FIELDS += ("alpha", "jac", "fac", "need_jac", "lo", "hi", "g")

    def select(self, keep: Tensor) -> None:
        for name in self.FIELDS:
            val = getattr(self, name)
            if isinstance(val, _Factor):
                setattr(self, name, _Factor(*(t[keep] for t in val)))
            elif isinstance(val, Tensor):
                setattr(self, name, val[keep])


#: working sets of at least this many fits factor [J f] by Householder QR first and take the
#: SVD of the small triangular factor (torch 2.13, CPU: LAPACK's SVD of 10,000 (50, 3) matrices
#: 46 ms; the QR 15 ms, then Jacobi 9 ms); smaller sets take the SVD of J D^-1 directly (13
#: fits: one LAPACK call instead of three)
QR_MIN_BATCH = 64

#: a Jacobian stage recomputes every running fit (not only those whose step was accepted)
#: when at most this many are not due: a fit whose x did not move gets the same J, D and
#: factorisation again, cheaper than gathering and scattering a subset
RECOMPUTE_SLACK = 16


def _least_squares_core(
    fun_r: Callable[[Tensor, Tensor], Tensor],
    x0: Tensor,
    f0: Tensor,
    jac_r: Callable[[Tensor, Tensor], Tensor],
    method: str,
    ftol: float,
    xtol: float,
    gtol: float,
    max_nfev: int,
    factor: float,
    box: tuple[Tensor, Tensor] | None = None,
) -> dict:
    """B independent fits at once; see the module docstring. ``box``: bounds (lb, ub), each
    (B, P), kept by an active set and a projection (:mod:`.bounds`). ``fun_r(x, rows)`` and
    ``jac_r(x, rows)`` evaluate the problems ``rows`` of the batch at x (len(rows), P). Fits
    that stopped leave the working set, so a few slow fits do not keep the batch busy. A
    Jacobian stage on at least :data:`QR_MIN_BATCH` fits with P <= 16 and M >= P factors by the
    QR of [J f] (:func:`_factor_r`), a smaller one by the SVD of J D^-1 (:func:`_factor`).

    Every fit of the working set is tried on every iteration, so their evaluation count is one
    Python integer. One host synchronisation an iteration tells whether any fit stopped (the
    status codes are worked out only then) and how many steps were accepted (the Jacobians
    due). Returns per-fit tensors."""
    bsz, p = x0.shape
    m = f0.shape[1]
    dtype, dev = x0.dtype, x0.device
    eps = torch.finfo(dtype).eps
    qr = p <= 16 and m >= p  # for working sets of at least QR_MIN_BATCH fits
    # dropped singular values: rounding-level ones for Gauss-Newton (its least-norm step), only
    # exact zeros and exactly zero columns of J for the damped methods (as MINPACK)
    cut = eps * max(m, p) if method == "gauss-newton" else 0.0
    trust = method == "trust-region"
    out = {"x": x0.clone(), "fun": f0.clone()}
    out["jac"] = torch.zeros(bsz, m, p, dtype=dtype, device=dev)
    for name in ("status", "nfev", "njev", "nit"):
        out[name] = torch.zeros(bsz, dtype=torch.long, device=dev)
    # the thresholds of the common-path stop test: the union of MINPACK's tests and of their
    # machine-precision variants (the status codes are sorted out when one fires)
    gtu = max(gtol, eps)
    k = _consts(dtype, dev, ftol, xtol)
    s = _Fits()
    s.rows = torch.arange(bsz, device=dev)
    s.x, s.f = x0.clone(), f0
    s.fnorm = torch.linalg.vector_norm(f0, dim=-1)
    s.floor = eps * s.fnorm  # ||f|| at rounding level of ||f(x0)||: a zero-residual fit
    s.nit = torch.zeros(bsz, dtype=torch.long, device=dev)
    s.first = torch.ones(bsz, dtype=torch.bool, device=dev)  # no step accepted yet
    s.d = torch.zeros(bsz, p, dtype=dtype, device=dev) if trust else None  # D
    s.radius = torch.zeros(bsz, dtype=dtype, device=dev)  # Delta
    s.lam = torch.zeros(bsz, dtype=dtype, device=dev)  # lambda
    s.lref = torch.ones(bsz, dtype=dtype, device=dev)  # LM: max ||J_j||^2 at x0 (lambda bounds)
    s.alpha = torch.ones(bsz, dtype=dtype, device=dev) if method == "gauss-newton" else None
    s.jac = s.fac = s.need_jac = None
    s.lo, s.hi = box if box is not None else (None, None)
    s.g = torch.zeros(bsz, p, dtype=dtype, device=dev) if box is not None else None  # J^T f
    nfev = 1

    def retire(done: Tensor, code: Tensor) -> None:
        """Write the fits ``done`` (status ``code``) to the output, with J at their last x (not
        counted in njev when their last step was accepted: MINPACK stops before it), and drop
        them from the working set."""
        stale = torch.zeros_like(done) if s.need_jac is None else done & s.need_jac
        if bool(stale.any()):
            idx = stale.nonzero().squeeze(-1)
            s.jac[idx] = jac_r(s.x[idx], s.rows[idx])
        r = s.rows[done]
        out["x"][r], out["fun"][r], out["jac"][r] = s.x[done], s.f[done], s.jac[done]
        out["status"][r], out["nit"][r] = code[done], s.nit[done]
        out["njev"][r] = (s.nit + 1 - stale.long())[done]
        out["nfev"][r] = nfev
        s.select(~done)

    due: str | Tensor | None = "all"  # the Jacobians due: all, none, or a mask
    while True:
        # ---- Jacobian, scaling and factorisation at x0 and where a step was accepted
        if due is not None:
            idx = None if isinstance(due, str) else due.nonzero().squeeze(-1)
            if idx is None:
                xs, fs, fn, rs = s.x, s.f, s.fnorm, s.rows
            else:
                xs, fs, fn, rs = s.x[idx], s.f[idx], s.fnorm[idx], s.rows[idx]
            j = jm = jac_r(xs, rs)
            if box is not None:  # hold the parameters on a bound whose gradient points out
                lo, hi = _box_rows((s.lo, s.hi), idx) if idx is not None else (s.lo, s.hi)
                g0 = (fs.unsqueeze(1) @ j).squeeze(1)
                at_lo, at_hi = _on_bounds(xs, lo, hi)
                held = (at_lo & (g0 > 0)) | (at_hi & (g0 < 0))
                jm = torch.where(held.unsqueeze(1), 0.0, j)
            by_qr = qr and j.shape[0] >= QR_MIN_BATCH
            if by_qr:  # [J f] = Q [R Q^T f; 0 rho]: J's column norms and J^T f from R
                r = torch.linalg.qr(torch.cat([jm, fs.unsqueeze(-1)], -1), mode="r")[1]
                rj, qtf = r[:, :p, :p], r[:, :p, p]
                acnorm = _colnorms(rj)
                g = (qtf.unsqueeze(1) @ rj).squeeze(1)
            else:
                acnorm = _colnorms(jm)  # column norms (n, P)
                # J^T f (with bounds: the one above, the held entries 0)
                g = (fs.unsqueeze(1) @ j).squeeze(1) if j is jm else torch.where(held, 0.0, g0)
            bad = ~torch.isfinite(acnorm).all(-1) | ~torch.isfinite(g).all(-1)
            if not trust:  # mu = s^2 of J itself (no D): J's scale must square within range
                big = acnorm.amax(-1)
                sq = big * big
                bad = bad | ((big > 0) & ((sq < torch.finfo(dtype).tiny) | (sq == math.inf)))
            # gtol: the largest cosine between f and a column of J at most gtol (0 at f = 0)
            stop = (g.abs() <= (gtu * fn).unsqueeze(-1) * acnorm).all(-1) | bad
            n_bad, n_stop = torch.stack((bad.sum(), stop.sum())).tolist()
            if trust:  # D: the column norms at x0 (1 where 0), then their running maximum
                ds = torch.maximum(s.d if idx is None else s.d[idx], acnorm)
                ds = torch.where(ds > 0, ds, 1.0)
            if by_qr:  # J D^-1 = Q (R D^-1), R D^-1 still triangular
                rd = rj / ds.unsqueeze(1) if trust else rj
                if n_bad:
                    rd = torch.where(bad[:, None, None], 0.0, rd)
                    qtf = torch.where(bad[:, None], 0.0, qtf)
                fac = _factor_r(rd, qtf, cut, acnorm == 0)
            else:
                jd = jm / ds.unsqueeze(1) if trust else jm
                if n_bad:
                    jd = torch.where(bad[:, None, None], 0.0, jd)
                fac = _factor(jd, fs, cut, acnorm == 0)
            if s.jac is None:  # at x0
                _check_seen(
                    fun_r,
                    xs,
                    fs,
                    rs,
                    acnorm if j is jm else _colnorms(j),
                    box,
                )
                if trust:
                    xnorm = torch.linalg.vector_norm(ds * s.x, dim=-1)
                    s.radius = torch.where(xnorm > 0, factor * xnorm, factor)
                if method == "levenberg-marquardt":
                    big = acnorm.pow(2).amax(-1)
                    s.lam = 1e-3 * big
                    s.lref = torch.where(big > 0, big, 1.0)  # lambda's bounds: relative
            if idx is None:
                s.jac, s.fac = j, fac
                if trust:
                    s.d = ds
                if box is not None:
                    s.g = g
            else:
                s.jac[idx] = j
                if trust:
                    s.d[idx] = ds
                if box is not None:
                    s.g[idx] = g
                for old, new in zip(s.fac, fac, strict=True):
                    old[idx] = new
            s.need_jac = None
            if n_stop:
                code = torch.where(bad, -1, 1)
                if idx is not None:
                    stop = torch.zeros_like(due).index_put((idx,), stop)
                    code = torch.ones_like(s.nit).index_put((idx,), code)
                retire(stop, code)
                if not s.rows.numel():
                    break
        # ---- the try: scaled step w (D delta = V w) and its predicted reduction
        if trust:
            s.lam, w = _lmpar(s.fac, s.radius, s.lam)
        elif method == "levenberg-marquardt":
            w = s.fac.c / (s.fac.mu + s.lam.unsqueeze(-1))
        else:
            w = s.fac.gn * s.alpha.unsqueeze(-1)
        q = (w.unsqueeze(1) @ s.fac.vh).squeeze(1)  # D delta
        xt = s.x + q / s.d if trust else s.x + q
        if box is not None:  # projected on the box: the step actually taken
            xt = torch.clamp(xt, s.lo, s.hi)
            step = xt - s.x
            if method == "gauss-newton":  # a projected step that does not descend: the
                # projected Cauchy step along -g instead (the safeguard of Kanzow et al.)
                uphill = (s.g * step).sum(-1) >= 0
                if bool(uphill.any()):
                    jg = (s.jac @ s.g.unsqueeze(-1)).squeeze(-1)
                    tc = (s.g * s.g).sum(-1) / jg.square().sum(-1).clamp_min(k.dwarf)
                    xg = s.x - (s.alpha * tc).unsqueeze(-1) * s.g
                    xg = torch.clamp(xg, s.lo, s.hi)
                    xt = torch.where(uphill.unsqueeze(-1), xg, xt)
                    step = xt - s.x
            q = step * s.d if trust else step
        pnorm = torch.linalg.vector_norm(q, dim=-1)
        if trust:
            s.radius = torch.where(s.first, torch.minimum(s.radius, pnorm), s.radius)
        ft = fun_r(xt, s.rows)
        nfev += 1
        fnorm, fnorm1 = s.fnorm, torch.linalg.vector_norm(ft, dim=-1)
        fnorm1 = torch.nan_to_num(fnorm1, nan=math.inf, posinf=math.inf)
        near = k.tenth * fnorm1 < fnorm
        r1 = fnorm1 / fnorm
        actred = torch.where(near, k.one - r1 * r1, k.neg_one)
        fn2 = fnorm * fnorm
        # 1 - ||f + J delta||^2 / ||f||^2 = (||J delta||^2 + 2 lambda ||D delta||^2) / ||f||^2
        # with ||J delta||^2 = cz - lambda ||w||^2 (Gauss-Newton: alpha cz), cz = -f^T J delta
        if box is not None:  # the Gauss-Newton model's reduction for the projected step
            cz = -(s.g * step).sum(-1)
            jstep = (s.jac @ step.unsqueeze(-1)).squeeze(-1)
            prered = (2 * cz - jstep.square().sum(-1)) / fn2
        else:
            cz = (s.fac.c * w).sum(-1)
            if method == "gauss-newton":
                prered = (2 - s.alpha) * cz / fn2
            else:
                prered = (cz + s.lam * pnorm * pnorm) / fn2
        dirder = -cz / fn2
        # (with bounds a projected step may predict no reduction: never accepted on rho)
        ratio = torch.where(
            prered > k.zero if box is not None else prered != k.zero, actred / prered, k.zero
        )
        # ---- the method's update
        if trust:
            temp = k.half * dirder / (dirder + k.half * actred)
            temp = torch.where(actred >= k.zero, k.half, temp)
            temp = torch.where(~near | ~(temp >= k.tenth), k.tenth, temp)
            # MINPACK's temp is at most 1/2 by construction; a projected step that does not
            # descend (dirder > 0, bounds) can give more: the radius would grow on a rejection
            temp = torch.where(temp > k.half, k.tenth, temp)
            poor = ratio <= k.quarter
            good = (s.lam == k.zero) | (ratio >= k.three_quarters)
            s.radius = torch.where(
                poor,
                temp * torch.minimum(s.radius, pnorm / 0.1),
                torch.where(good, pnorm / 0.5, s.radius),
            )
            # lambda follows the radius into the next lmpar (MINPACK: par / temp, par / 2)
            s.lam = torch.where(poor, s.lam / temp, torch.where(good, k.half * s.lam, s.lam))
            accept = ratio >= k.accept
        elif method == "levenberg-marquardt":
            accept = fnorm1 < fnorm
            lam = torch.where(ratio > 0.75, s.lam / 3, torch.where(ratio < 0.25, s.lam * 3, s.lam))
            s.lam = torch.minimum(torch.where(lam > 0, lam, eps * s.lref), s.lref / eps)
        else:
            # Armijo: cost(x + alpha p) <= cost(x) + 1e-4 alpha g^T p, i.e. actred >= 2e-4 dirder
            accept = (actred >= -2e-4 * dirder) & (fnorm1 < fnorm)
            s.alpha = torch.where(accept, 1.0, s.alpha / 2)
        acc = accept.unsqueeze(-1)
        s.x = torch.where(acc, xt, s.x)
        s.f = torch.where(acc, ft, s.f)
        s.fnorm = torch.where(accept, fnorm1, fnorm)
        s.nit = s.nit + accept
        s.first = s.first & ~accept
        s.need_jac = accept
        xnorm = torch.linalg.vector_norm(s.d * s.x if trust else s.x, dim=-1)
        size = s.radius if trust else pnorm
        # ---- stopping rules: their union on the common path, one host synchronisation
        ok = (k.half * ratio <= k.one) & (prered >= k.zero)  # (prered < 0 only with bounds)
        aa = actred.abs()
        stop = (aa <= k.ftu) & (prered <= k.ftu) & ok
        stop = stop | (size <= k.xtu * xnorm) | (s.fnorm <= s.floor)
        n_stop, n_acc = torch.stack((stop.sum(), accept.sum())).tolist()
        if n_stop or nfev >= max_nfev:
            # MINPACK's tests in its order (later lines take precedence) and their
            # machine-precision variants (its info 6-8, folded into scipy's codes)
            # (lmder: info 5 max_nfev, then 6 ftol and 7 xtol at eps, a later one winning)
            code = torch.full_like(size, 0 if nfev >= max_nfev else -9, dtype=torch.long)
            code = torch.where((aa <= eps) & (prered <= eps) & ok, 2, code)
            code = torch.where(size <= eps * xnorm, 3, code)
            code = torch.where(s.fnorm <= s.floor, 2, code)  # residual at rounding level
            small_f = (aa <= ftol) & (prered <= ftol) & ok
            small_x = size <= xtol * xnorm
            both = torch.where(small_f & small_x, 4, torch.where(small_f, 2, 3))
            code = torch.where(small_f | small_x, both, code)
            retire(code != -9, code)
            if not s.rows.numel():
                break
            n_acc = int(s.need_jac.sum())
        n = s.rows.numel()
        due = None if n_acc == 0 else "all" if n - n_acc <= RECOMPUTE_SLACK else s.need_jac
    return out

r"""Problems without a model: :func:`least_squares`, :func:`curve_fit` and :func:`minimize`,
shaped like ``scipy.optimize``, written in torch, and batched.

A scipy user fits a formula to data or minimises a function of a few parameters; here the
function is written in torch, its derivatives come from autograd (``torch.func``), and a batch
of B independent problems runs at once, each with its own trust region and stopping rule.

The least-squares step is the sentence of the library (000 problem (1)) with the Gauss-Newton
metric :math:`M = J^T J` of the residual vector f (000 Table 1):

.. math:: \delta = -(J^T J + \lambda D^2)^{-1} J^T f,

where the method decides lambda and the scaling D:

- ``"trust-region"`` (default; ``"lm"`` is an alias, as in scipy): Moré's scaled trust region,
  the algorithm of MINPACK's ``lmder`` (Moré 1978) that ``scipy.optimize.least_squares(
  method="lm")`` wraps, and that :class:`~steepest.damping.MoreTrustRegion` runs on models:
  :math:`D = \mathrm{diag}(\max_k \|J_{:,j}\|)`, lambda solved from :math:`\|D\delta\| = \Delta`
  to 10 % from the previous step's lambda as MINPACK's ``lmpar`` does (halved after a very
  good step, divided by the radius' shrink factor after a poor one), Delta adapted to the
  reduction ratio rho. Up to rounding, the path and the evaluations are MINPACK's.
- ``"levenberg-marquardt"``: plain LM, D = I and lambda times 1/3 when rho > 3/4, times 3 when
  rho < 1/4 (the defaults of :class:`~steepest.damping.LevenbergMarquardt`), a try accepted when
  the cost went down.
- ``"gauss-newton"``: lambda = 0 (the least-norm step when J is rank deficient) with a
  backtracking (Armijo) line search on the step length.

Every solve uses the thin SVD of :math:`J D^{-1}` of each problem (one batched
``torch.linalg.svd`` per accepted step; for a batch of B >= 64 problems with M > P, P <= 16,
the SVD of the P x P factor R of its QR decomposition, cheaper and as accurate), so lambda
costs no further factorisation and a rank-deficient J is handled exactly: the damped methods
drop only exactly zero singular values (as MINPACK drops only exact zeros of R),
Gauss-Newton's least-norm step also those below :math:`\epsilon \max(M, P)\, s_{max}`.
Fits of a batch that have stopped leave the working set: ``fun`` is then called on the rows
still running (with ``vectorize=True`` and in :func:`curve_fit`), or on the whole batch with the
stopped rows held at x0.

Stopping rules, with MINPACK's meanings (and scipy's status codes):

- ``ftol`` (status 2): both the actual and the predicted relative reductions of the sum of
  squares are at most ftol (and rho <= 2); also when the residual norm has fallen to rounding
  level, :math:`\|f\| \le \epsilon\|f(x_0)\|` (a zero-residual problem, even with x* = 0, where
  a relative xtol never fires);
- ``xtol`` (status 3; 4 with ftol): the trust radius (the step norm for the other methods) is at
  most :math:`x_{tol}\|Dx\|`;
- ``gtol`` (status 1): the largest cosine between f and a column of J,
  :math:`\max_j |(J^T f)_j| / (\|f\| \|J_{:,j}\|)`, is at most gtol (exactly 0 at a zero
  residual);
- ``max_nfev`` (status 0): the evaluations of ``fun`` reached the limit (100 P by default).

Tolerances below the machine epsilon are met at machine precision (MINPACK's info 6-8, folded
into the status above). Example::

    >>> def fun(x):                               # Rosenbrock's residuals
    ...     return torch.stack([10 * (x[1] - x[0] ** 2), 1 - x[0]])
    >>> res = steepest.least_squares(fun, torch.tensor([-1.2, 1.0], dtype=torch.float64))
    >>> res.x, res.cost, res.status, res.nfev
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .errors import ConfigurationError, ConvergenceError, NonFiniteError, ShapeError

__all__ = ["OptimizeResult", "least_squares", "curve_fit", "minimize"]

MESSAGES = {
    -1: "The Jacobian is not finite at x: the fit stopped there.",
    0: "The maximum number of function evaluations is exceeded.",
    1: "`gtol` termination condition is satisfied.",
    2: "`ftol` termination condition is satisfied.",
    3: "`xtol` termination condition is satisfied.",
    4: "Both `ftol` and `xtol` termination conditions are satisfied.",
}
METHODS = ("trust-region", "levenberg-marquardt", "gauss-newton")
ALIASES = {
    "lm": "trust-region",
    "trust-region": "trust-region",
    "levenberg-marquardt": "levenberg-marquardt",
    "gauss-newton": "gauss-newton",
}


class OptimizeResult(dict):
    """The result of a fit, a dict whose keys read as attributes (as ``scipy.optimize``'s).

    For :func:`least_squares`: ``x``, ``cost`` (:math:`\\tfrac12\\|f\\|^2`), ``fun`` (f at x),
    ``jac`` (J at x), ``grad`` (:math:`J^T f`), ``optimality`` (:math:`\\|J^T f\\|_\\infty`),
    ``status``, ``message``, ``success``, ``nfev``, ``njev``, ``nit`` (accepted steps), and
    ``method``. For a batch of B problems every entry has a leading axis B (``status``, ``nfev``,
    ... tensors, ``message`` a list of B strings).

    >>> res = steepest.least_squares(fun, x0)
    >>> res.x, res["cost"], res.success
    """

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e

    __setattr__ = dict.__setitem__
    __delattr__ = dict.__delitem__

    def __repr__(self) -> str:
        if not self:
            return f"{type(self).__name__}()"
        width = max(map(len, self)) + 1
        return "\n".join(f"{k.rjust(width)}: {v!r}" for k, v in self.items())

    def __dir__(self):
        return list(self.keys())


# ---------------------------------------------------------------------------------- helpers
def _as_x0(x0) -> Tensor:
    """x0 as a floating tensor (float64 unless a floating tensor is given), 1-D or 2-D."""
    if isinstance(x0, Tensor):
        x = x0.detach().clone()
        if not x.is_floating_point():
            x = x.to(torch.float64)
    else:
        x = torch.as_tensor(x0, dtype=torch.float64).clone()
    if x.ndim == 0:
        x = x.reshape(1)
    if x.ndim > 2 or x.numel() == 0:
        raise ShapeError(
            f"x0 must be a vector (P,) or a batch of vectors (B, P) of parameters, got shape "
            f"{tuple(x.shape)}; flatten the parameters into one vector per problem."
        )
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteError("x0 holds NaN or infinite values; start from finite parameters.")
    return x


def _check_tol(**tols: float) -> None:
    for name, val in tols.items():
        if not (isinstance(val, int | float) and math.isfinite(val) and val >= 0):
            raise ConfigurationError(
                f"{name} must be a finite number >= 0, got {val!r}; MINPACK's default is 1e-8."
            )


def _evaluate(fun: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    out = fun(x)
    if not isinstance(out, Tensor):
        raise ConfigurationError(
            f"fun must return a torch.Tensor (written with torch operations, so that autograd "
            f"gives its Jacobian), got {type(out).__name__}."
        )
    return out


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


def _factor(jd: Tensor, f: Tensor, qr: bool, cut: float) -> tuple[Tensor, Tensor, Tensor]:
    r"""(mu, cp, Vh) of the scaled Jacobian :math:`A = J D^{-1} = U S V^T` of each problem:
    :math:`\mu = s^2` (0 below ``cut`` :math:`s_{max}`, or when s = 0) and
    :math:`c' = -S U^T f = -V^T A^T f`, from the thin SVD of A, or (``qr``, M > P) from
    :math:`A = QR`, :math:`R = U_R S V^T`, :math:`U = Q U_R` (the same accuracy: the condition
    number is not squared, as it would be by the eigen-decomposition of :math:`A^T A`)."""
    if qr:
        q, r = torch.linalg.qr(jd)
        u, s, vh = torch.linalg.svd(r)
        qtf = (q.transpose(1, 2) @ f.unsqueeze(-1)).squeeze(-1)
        cp = -s * (u.transpose(1, 2) @ qtf.unsqueeze(-1)).squeeze(-1)
    else:
        u, s, vh = torch.linalg.svd(jd, full_matrices=False)
        cp = -s * (u.transpose(1, 2) @ f.unsqueeze(-1)).squeeze(-1)
    mu = s.pow(2)
    keep = (s > cut * s[:, :1]) & (mu > 0)
    return torch.where(keep, mu, 0), torch.where(keep, cp, 0), vh


def _svd_solve(mu: Tensor, cp: Tensor, lam: Tensor) -> Tensor:
    r"""Scaled step coordinates :math:`w_i = c'_i / (\mu_i + \lambda)` (0 where mu_i = 0: the
    least-norm step on a singular J)."""
    den = mu + lam.unsqueeze(-1)
    w = cp / torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(mu > 0, w, torch.zeros_like(w))


def _lmpar(mu: Tensor, c: Tensor, radius: Tensor, par: Tensor, active: Tensor, p: int) -> Tensor:
    r"""MINPACK's ``lmpar`` (Moré 1978, section 5) in the SVD coordinates of each problem:
    lambda = 0 when the Gauss-Newton step fits, :math:`\|w(0)\| \le 1.1\Delta`; else Newton
    on :math:`1/\|w(\lambda)\| - 1/\Delta` (a concave function of lambda) from the previous
    step's lambda (``par``) clipped to the bracket [l, u] (l from the Newton step at 0 when J
    has full rank, else 0; :math:`u = \|A^T f\| / \Delta`), the bracket narrowed on every
    iterate, until :math:`|\|w\| - \Delta| \le 0.1\Delta`, or the iterates stop falling
    short (l = 0), or 10 iterations. Only the fits ``active`` whose Gauss-Newton step is too
    long are iterated; lambda = 0 for the others."""
    dwarf = torch.finfo(mu.dtype).tiny
    zero = torch.zeros_like(radius)
    w = _svd_solve(mu, c, zero)
    dxnorm = w.norm(dim=-1)
    fp = dxnorm - radius
    long = active & (fp > 0.1 * radius)
    if not bool(long.any()):
        return zero
    # lower bound: the Newton step on 1/||w|| at lambda = 0 (J of full rank only)
    full = (mu > 0).all(-1) & (mu.shape[-1] == p)
    q0 = (w.pow(2) / torch.where(mu > 0, mu, torch.ones_like(mu))).sum(-1)
    parl = torch.where(full & (q0 > 0), fp / radius * dxnorm.pow(2) / q0.clamp_min(dwarf), zero)
    gnorm = c.norm(dim=-1)
    paru = gnorm / radius
    paru = torch.where(paru > 0, paru, dwarf / radius.clamp(max=0.1))
    lam = torch.minimum(torch.maximum(par, parl), paru)
    lam = torch.where(lam == 0, gnorm / dxnorm.clamp_min(dwarf), lam)
    todo, prev = long, fp
    for _ in range(10):
        lam = torch.where(todo & (lam == 0), (1e-3 * paru).clamp_min(dwarf), lam)
        w = _svd_solve(mu, c, lam)
        phi = w.norm(dim=-1)
        fp = phi - radius
        stop = (fp.abs() <= 0.1 * radius) | ((parl == 0) & (fp <= prev) & (prev < 0))
        more = todo & ~stop
        den = mu + lam.unsqueeze(-1)
        q = (w.pow(2) / torch.where(den > 0, den, torch.ones_like(den))).sum(-1)
        parc = fp / radius * phi.pow(2) / q.clamp_min(dwarf)
        parl = torch.where(more & (fp > 0), torch.maximum(parl, lam), parl)
        paru = torch.where(more & (fp < 0), torch.minimum(paru, lam), paru)
        lam = torch.where(more, torch.maximum(parl, lam + parc), lam)
        prev, todo = torch.where(todo, fp, prev), more
        if not bool(todo.any()):
            break
    return torch.where(long, lam, zero)


# ---------------------------------------------------------------------------------- core
class _Fits:
    """The state of the fits still running (a subset of the batch: ``rows``)."""

    FIELDS = (
        "rows",
        "x",
        "f",
        "fnorm",
        "fnorm0",
        "active",
        "status",
        "nfev",
        "njev",
        "nit",
        "need_jac",
        "first",
        "d",
        "radius",
        "lam",
        "alpha",
        "sv",
        "c",
        "vh",
        "jac",
    )

    def select(self, keep: Tensor) -> None:
        for name in self.FIELDS:
            setattr(self, name, getattr(self, name)[keep])


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
    qr: bool | None = None,
) -> dict:
    """B independent fits at once; see the module docstring. ``fun_r(x, rows)`` and
    ``jac_r(x, rows)`` evaluate the problems ``rows`` of the batch at x (len(rows), P). Fits
    that stopped leave the working set, so a few slow fits do not keep the batch busy. Returns
    per-fit tensors."""
    bsz, p = x0.shape
    m = f0.shape[1]
    dtype, dev = x0.dtype, x0.device
    eps = torch.finfo(dtype).eps
    tiny = torch.finfo(dtype).tiny
    qr = (qr if qr is not None else bsz >= 64 and p <= 16) and m > p
    k = min(m, p)
    out = {
        "x": x0.clone(),
        "fun": f0.clone(),
        "jac": torch.zeros(bsz, m, p, dtype=dtype, device=dev),
    }
    for name in ("status", "nfev", "njev", "nit"):
        out[name] = torch.zeros(bsz, dtype=torch.long, device=dev)

    def zeros(*shape: int, dt: torch.dtype = dtype) -> Tensor:
        return torch.zeros(bsz, *shape, dtype=dt, device=dev)

    s = _Fits()
    s.rows = torch.arange(bsz, device=dev)
    s.x, s.f = x0.clone(), f0.clone()
    s.fnorm = f0.norm(dim=-1)
    s.fnorm0 = s.fnorm.clone()
    s.active = torch.ones(bsz, dtype=torch.bool, device=dev)
    s.status = zeros(dt=torch.long)
    s.nfev = torch.ones(bsz, dtype=torch.long, device=dev)
    s.njev, s.nit = zeros(dt=torch.long), zeros(dt=torch.long)
    s.need_jac = torch.ones(bsz, dtype=torch.bool, device=dev)
    s.first = torch.ones(bsz, dtype=torch.bool, device=dev)  # no step accepted yet
    s.d = zeros(p)  # D (trust-region)
    s.radius, s.lam = zeros(), zeros()  # Delta, lambda
    s.alpha = torch.ones(bsz, dtype=dtype, device=dev)  # Gauss-Newton's step length
    s.sv, s.c, s.vh = zeros(k), zeros(k), zeros(k, p)  # mu = s^2, c' = -S U^T f, V^T of J D^-1
    s.jac = zeros(m, p)
    zero = torch.zeros((), dtype=dtype, device=dev)

    def finish(mask: Tensor, code: int | Tensor) -> None:
        mask = mask & s.active
        s.status = torch.where(mask, torch.as_tensor(code, device=dev), s.status)
        s.active = s.active & ~mask

    def retire(done: Tensor) -> None:
        """Write the fits ``done`` to the output (J at their last x) and drop them."""
        if bool((done & s.need_jac).any()):
            stale = (done & s.need_jac).nonzero().squeeze(-1)
            s.jac[stale] = jac_r(s.x[stale], s.rows[stale])
        r = s.rows[done]
        for name, val in (
            ("x", s.x),
            ("fun", s.f),
            ("jac", s.jac),
            ("status", s.status),
            ("nfev", s.nfev),
            ("njev", s.njev),
            ("nit", s.nit),
        ):
            out[name][r] = val[done]
        s.select(~done)

    while True:
        if not bool(s.active.all()):
            retire(~s.active)
        if s.rows.numel() == 0:
            break
        # ---- Jacobian, scaling and factorisation where a step was accepted (or at the start)
        renew = s.need_jac
        if bool(renew.any()):
            idx = renew.nonzero().squeeze(-1)
            jnew = jac_r(s.x[idx], s.rows[idx])
            s.jac[idx] = jnew
            s.njev[idx] += 1
            s.need_jac = torch.zeros_like(s.need_jac)
            bad = torch.zeros_like(renew)
            bad[idx] = ~torch.isfinite(jnew).flatten(1).all(-1)
            finish(bad, -1)
            renew = renew & ~bad
            acnorm = s.jac.norm(dim=1)  # column norms (n, P)
            g = (s.jac * s.f.unsqueeze(-1)).sum(1)
            cosine = (g.abs() / (s.fnorm.unsqueeze(-1) * acnorm).clamp_min(tiny)).amax(-1)
            cosine = torch.where(s.fnorm > 0, cosine, zero)
            if method == "trust-region":
                # D: the column norms at the start (1 where 0), then their running maximum
                fresh = renew & (s.njev == 1)
                dnew = torch.where(
                    fresh[:, None],
                    torch.where(acnorm > 0, acnorm, torch.ones_like(acnorm)),
                    torch.maximum(s.d, acnorm),
                )
                s.d = torch.where(renew[:, None], dnew, s.d)
                xnorm = (s.d * s.x).norm(dim=-1)
                r0 = torch.where(xnorm > 0, factor * xnorm, torch.full_like(xnorm, factor))
                s.radius = torch.where(fresh, r0, s.radius)
            else:
                s.d = torch.ones_like(s.d)
            if method == "levenberg-marquardt":
                start = renew & (s.njev == 1)
                s.lam = torch.where(start, 1e-3 * acnorm.pow(2).amax(-1), s.lam)
            idx = renew.nonzero().squeeze(-1)
            if idx.numel():
                # rank: Gauss-Newton's least-norm step drops singular values at rounding level;
                # a damped method keeps every nonzero one (MINPACK: only exact zeros of R)
                cut = eps * max(m, p) if method == "gauss-newton" else 0.0
                jd = s.jac[idx] / s.d[idx].unsqueeze(1)
                s.sv[idx], s.c[idx], s.vh[idx] = _factor(jd, s.f[idx], qr, cut)
            finish(renew & (cosine <= gtol), 1)
            finish(renew & (cosine <= eps), 1)
            if not bool(s.active.all()):
                continue  # retire first
        # ---- the try: scaled step w (D delta = Vh^T w) and its predicted reduction
        if method == "trust-region":
            s.lam = _lmpar(s.sv, s.c, s.radius, s.lam, s.active, p)
            w = _svd_solve(s.sv, s.c, s.lam)
        elif method == "levenberg-marquardt":
            w = _svd_solve(s.sv, s.c, s.lam)
        else:
            w = _svd_solve(s.sv, s.c, torch.zeros_like(s.lam)) * s.alpha.unsqueeze(-1)
        q = (s.vh.transpose(1, 2) @ w.unsqueeze(-1)).squeeze(-1)  # D delta
        pnorm = q.norm(dim=-1)
        if method == "trust-region":
            s.radius = torch.where(s.first, torch.minimum(s.radius, pnorm), s.radius)
        xt = s.x + q / s.d
        ft = fun_r(xt, s.rows)
        s.nfev += 1
        fnorm, fnorm1 = s.fnorm, ft.norm(dim=-1)
        fnorm1 = torch.where(torch.isfinite(fnorm1), fnorm1, torch.full_like(fnorm1, math.inf))
        safe = fnorm.clamp_min(tiny)
        actred = torch.where(
            0.1 * fnorm1 < fnorm, 1 - (fnorm1 / safe).pow(2), -torch.ones_like(fnorm)
        )
        cz = (s.c * w).sum(-1)  # -f^T J delta
        prered = (2 * cz - (s.sv * w.pow(2)).sum(-1)) / safe.pow(2)  # 1 - ||f+J d||^2/||f||^2
        dirder = -cz / safe.pow(2)
        ratio = torch.where(prered != 0, actred / torch.where(prered != 0, prered, 1), zero)
        # ---- the method's update
        if method == "trust-region":
            temp = torch.where(
                actred >= 0, torch.full_like(ratio, 0.5), 0.5 * dirder / (dirder + 0.5 * actred)
            )
            temp = torch.where(
                (0.1 * fnorm1 >= fnorm) | ~(temp >= 0.1), torch.full_like(temp, 0.1), temp
            )
            s.radius = torch.where(
                ratio <= 0.25,
                temp * torch.minimum(s.radius, pnorm / 0.1),
                torch.where((s.lam == 0) | (ratio >= 0.75), pnorm / 0.5, s.radius),
            )
            # lambda follows the radius into the next lmpar (MINPACK: par / temp, par / 2)
            s.lam = torch.where(
                ratio <= 0.25,
                s.lam / temp,
                torch.where((s.lam == 0) | (ratio >= 0.75), 0.5 * s.lam, s.lam),
            )
            accept = ratio >= 1e-4
        elif method == "levenberg-marquardt":
            accept = fnorm1 < fnorm
            lam = torch.where(ratio > 0.75, s.lam / 3, torch.where(ratio < 0.25, s.lam * 3, s.lam))
            s.lam = torch.where(lam > 0, lam, torch.full_like(lam, eps)).clamp(max=1 / eps)
        else:
            # Armijo: cost(x + alpha p) <= cost(x) + 1e-4 alpha g^T p, i.e. actred >= 2e-4 dirder
            accept = (actred >= -2e-4 * dirder) & (fnorm1 < fnorm)
            s.alpha = torch.where(accept, torch.ones_like(s.alpha), s.alpha / 2)
        s.x = torch.where(accept[:, None], xt, s.x)
        s.f = torch.where(accept[:, None], ft, s.f)
        s.fnorm = torch.where(accept, fnorm1, fnorm)
        s.nit += accept.long()
        s.need_jac = accept
        s.first = s.first & ~accept
        xnorm = (s.d * s.x).norm(dim=-1)
        size = s.radius if method == "trust-region" else pnorm
        # ---- stopping rules (MINPACK's, then its machine-precision variants)
        small_f = (actred.abs() <= ftol) & (prered <= ftol) & (0.5 * ratio <= 1)
        small_x = size <= xtol * xnorm
        # later lines take precedence: MINPACK's order of tests
        code = torch.where(size <= eps * xnorm, 3, -9)
        code = torch.where((actred.abs() <= eps) & (prered <= eps) & (0.5 * ratio <= 1), 2, code)
        code = torch.where(s.nfev >= max_nfev, 0, code)
        code = torch.where(s.fnorm <= eps * s.fnorm0, 2, code)  # residual at rounding level
        code = torch.where(
            small_f | small_x, torch.where(small_f & small_x, 4, torch.where(small_f, 2, 3)), code
        )
        finish(code != -9, code)
    return out


# ---------------------------------------------------------------------------------- front ends
def least_squares(
    fun: Callable[[Tensor], Tensor],
    x0: Tensor | Sequence[float],
    *,
    method: str = "trust-region",
    jac: Callable[[Tensor], Tensor] | str = "auto",
    ftol: float = 1e-8,
    xtol: float = 1e-8,
    gtol: float = 1e-8,
    max_nfev: int | None = None,
    weights: Tensor | None = None,
    vectorize: bool = False,
    factor: float = 100.0,
) -> OptimizeResult:
    r"""Minimise :math:`F(x) = \tfrac12 \sum_i w_i f_i(x)^2` over x, for one problem or a batch
    of independent problems, with the Gauss-Newton metric :math:`M = J^T J` and the step
    :math:`\delta = -(J^T J + \lambda D^2)^{-1} J^T f` (000 problem (1), Table 1; Moré 1978).

    Parameters
    ----------
    fun : ``fun(x) -> f``, written in torch: x (P,) to the residual vector f (M,); for a batch
        (x0 of shape (B, P)) x (B, P) to f (B, M), row b depending on x[b] only (or pass
        ``vectorize=True`` and write fun for one problem: it is vmapped).
    x0 : the start, (P,) or (B, P). dtype and device follow x0 (float64 for a list).
    method : ``"trust-region"`` (default, MINPACK's ``lmder``; alias ``"lm"``),
        ``"levenberg-marquardt"`` (plain LM) or ``"gauss-newton"`` (with a line search); see
        :mod:`steepest.fit`.
    jac : ``"auto"`` (autograd: reverse mode while B M^2 <= 2e5 or P > M, else forward),
        ``"jacfwd"``,
        ``"jacrev"``, or a callable ``jac(x) -> J`` of shape (M, P) (batched: (B, M, P)).
    ftol, xtol, gtol : MINPACK's relative tolerances on the reduction of F, on the trust radius
        relative to :math:`\|Dx\|`, and on the cosine between f and the columns of J (scipy's
        defaults 1e-8).
    max_nfev : the most evaluations of fun per problem (default 100 P, scipy's for ``lm``).
    weights : w_i >= 0, (M,) or (B, M); the residuals become :math:`\sqrt{w_i} f_i` (1/sigma^2
        for data with standard deviations sigma). ``fun``, ``jac`` and ``cost`` of the result are
        those of the weighted residuals.
    vectorize : fun takes one problem's x (P,) even for a batch (it is applied with
        ``torch.func.vmap``).
    factor : the initial trust radius is factor * ||D x0|| (MINPACK's 100).

    Returns
    -------
    OptimizeResult with x, cost, fun, jac, grad, optimality, status (scipy's codes: 0 max_nfev,
    1 gtol, 2 ftol, 3 xtol, 4 ftol and xtol, -1 non-finite Jacobian), message, success
    (status > 0), nfev, njev, nit; for a batch each with a leading axis B.

    Raises
    ------
    NonFiniteError: x0 or the residuals at x0 are not finite.
    ShapeError: fun returns a scalar, or shapes of x0, fun's output, weights or jac disagree.
    ConfigurationError: an unknown method, a bad tolerance, fun not differentiable by torch.func.

    Example
    -------
    >>> t = torch.linspace(0, 4, 30, dtype=torch.float64); y = 2 * torch.exp(-1.3 * t) + 0.5
    >>> res = least_squares(lambda p: p[0] * torch.exp(-p[1] * t) + p[2] - y, [1.0, 1.0, 0.0])
    >>> res.x, res.success, res.nfev
    """
    if method not in ALIASES:
        hint = (
            " (scipy's trf/dogbox handle bounds; steepest has no bounds)"
            if method in ("trf", "dogbox")
            else ""
        )
        raise ConfigurationError(
            f"unknown method {method!r}{hint}; choose from "
            f"{', '.join(METHODS)} ('lm' is an alias of 'trust-region')."
        )
    method = ALIASES[method]
    _check_tol(ftol=ftol, xtol=xtol, gtol=gtol)
    if not (isinstance(factor, int | float) and math.isfinite(factor) and factor > 0):
        raise ConfigurationError(f"factor must be a finite number > 0, got {factor!r}.")
    x0 = _as_x0(x0)
    batched = x0.ndim == 2
    p = x0.shape[-1]
    if max_nfev is None:
        max_nfev = 100 * p
    if not (isinstance(max_nfev, int) and max_nfev >= 1):
        raise ConfigurationError(f"max_nfev must be an integer >= 1, got {max_nfev!r}.")
    xb = x0 if batched else x0.unsqueeze(0)
    if not batched:

        def fun_r(xs: Tensor, rows: Tensor) -> Tensor:
            return _evaluate(fun, xs.squeeze(0)).unsqueeze(0)

    elif vectorize:
        vfun = torch.func.vmap(fun)

        def fun_r(xs: Tensor, rows: Tensor) -> Tensor:
            return _evaluate(vfun, xs)

    else:  # fun takes the whole batch: the rows not asked for stay at x0

        def fun_r(xs: Tensor, rows: Tensor) -> Tensor:
            if rows.numel() == xb.shape[0]:
                return _evaluate(fun, xs)
            return _evaluate(fun, xb.index_put((rows,), xs))[rows]

    jac_r = None
    if callable(jac):
        if not batched:

            def user_jac(xs: Tensor, rows: Tensor) -> Tensor:
                return torch.as_tensor(jac(xs.squeeze(0)), dtype=xs.dtype).unsqueeze(0)

        elif vectorize:
            vjac = torch.func.vmap(jac)

            def user_jac(xs: Tensor, rows: Tensor) -> Tensor:
                return vjac(xs)

        else:

            def user_jac(xs: Tensor, rows: Tensor) -> Tensor:
                full = xs if rows.numel() == xb.shape[0] else xb.index_put((rows,), xs)
                return torch.as_tensor(jac(full), dtype=xs.dtype)[rows]

        jac_r = user_jac
    elif jac not in ("auto", "jacfwd", "jacrev"):
        raise ConfigurationError(
            f"jac must be 'auto', 'jacfwd', 'jacrev' or a callable, got {jac!r}."
        )
    out = _run(
        fun_r,
        jac_r,
        xb,
        batched,
        method,
        ftol,
        xtol,
        gtol,
        max_nfev,
        float(factor),
        weights,
        "auto" if callable(jac) else jac,
    )
    return _result(out, batched, method)


def _run(
    fun_r,
    jac_r,
    xb: Tensor,
    batched: bool,
    method: str,
    ftol: float,
    xtol: float,
    gtol: float,
    max_nfev: int,
    factor: float,
    weights: Tensor | None,
    mode: str,
) -> dict:
    """Checks f(x0), weights and jac, then runs the core (shared by the front ends)."""
    rows = torch.arange(xb.shape[0], device=xb.device)
    p = xb.shape[1]
    with torch.no_grad():
        f0 = fun_r(xb, rows)
    want = "(B, M) for x0 of shape (B, P)" if batched else "(M,)"
    if f0.ndim <= 1:
        raise ShapeError(
            f"fun returned a scalar{' per problem' if batched else ''} (shape "
            f"{tuple(f0.shape if batched else f0.squeeze(0).shape)}); least_squares needs the "
            f"vector of residuals f, shape {want}, and minimises 1/2 sum f_i^2: return the "
            f"residuals, not their sum of squares, or use steepest.minimize for a scalar "
            f"objective."
        )
    if f0.ndim != 2 or f0.shape[0] != xb.shape[0]:
        got = tuple(f0.shape if batched else f0.squeeze(0).shape)
        raise ShapeError(
            f"fun returned shape {got}; expected {want}: one flat residual vector "
            f"per problem (flatten it)."
        )
    if f0.dtype != xb.dtype or f0.device != xb.device:
        raise ShapeError(
            f"fun returned {f0.dtype} on {f0.device} for x0 of {xb.dtype} on "
            f"{xb.device}; compute the residuals in x0's dtype and device."
        )
    m = f0.shape[1]
    sw = None
    if weights is not None:
        w = torch.as_tensor(weights, dtype=xb.dtype, device=xb.device)
        if w.shape not in ((m,), (xb.shape[0], m)):
            raise ShapeError(
                f"weights of shape {tuple(w.shape)} do not match the {m} residuals"
                f"; pass (M,) = ({m},){' or (B, M)' if batched else ''}."
            )
        if not bool((torch.isfinite(w) & (w >= 0)).all()):
            raise NonFiniteError("weights must be finite and >= 0 (w_i = 1/sigma_i^2).")
        sw = w.sqrt().expand(xb.shape[0], m)
        f0 = f0 * sw
    bad = ~torch.isfinite(f0)
    if bool(bad.any()):
        where = bad.nonzero()[:5].tolist()
        raise NonFiniteError(
            f"the residuals are not finite at x0 ({int(bad.sum())} of {f0.numel()}, first at "
            f"index {where}); start where fun is defined (check divisions, logs, overflows)."
        )

    def res_r(xs: Tensor, rows: Tensor) -> Tensor:
        out = fun_r(xs, rows)
        return out * sw[rows] if sw is not None else out

    def res_nograd(xs: Tensor, rows: Tensor) -> Tensor:
        with torch.no_grad():
            return res_r(xs, rows)

    if jac_r is None:

        def jac_w(xs: Tensor, rows: Tensor) -> Tensor:
            return _jacobian(lambda xx: res_r(xx, rows), xs, m, mode).detach()

    else:

        def jac_w(xs: Tensor, rows: Tensor) -> Tensor:
            jj = jac_r(xs, rows)
            if jj.shape != (xs.shape[0], m, p):
                got = tuple(jj.shape if batched else jj.shape[1:])
                raise ShapeError(
                    f"jac returned shape {got}; expected "
                    f"{'(B, M, P) = ' + str((xb.shape[0], m, p)) if batched else (m, p)}."
                )
            return jj * sw[rows].unsqueeze(-1) if sw is not None else jj

    return _least_squares_core(
        res_nograd, xb, f0, jac_w, method, ftol, xtol, gtol, max_nfev, factor
    )


def _result(out: dict, batched: bool, method: str) -> OptimizeResult:
    f, jac = out["fun"], out["jac"]
    grad = (jac * f.unsqueeze(-1)).sum(1)
    cost = 0.5 * f.pow(2).sum(-1)
    status = out["status"]
    res = OptimizeResult(
        x=out["x"],
        cost=cost,
        fun=f,
        jac=jac,
        grad=grad,
        optimality=grad.abs().amax(-1),
        status=status,
        nfev=out["nfev"],
        njev=out["njev"],
        nit=out["nit"],
    )
    res["success"] = status > 0
    res["message"] = [MESSAGES[int(s)] for s in status.tolist()]
    if not batched:
        for key in ("x", "fun", "jac", "grad"):
            res[key] = res[key].squeeze(0)
        for key in ("cost", "optimality"):
            res[key] = float(res[key][0])
        for key in ("status", "nfev", "njev", "nit"):
            res[key] = int(res[key][0])
        res["success"] = bool(res["success"][0])
        res["message"] = res["message"][0]
    res["method"] = method
    return res


def _broadcasts(resid, vres, x0: Tensor, args: tuple) -> bool:
    """Whether ``resid`` called once on the parameter columns (B, 1, P) of a batch gives what
    the vmapped one-curve residual gives, row by row, at a point near x0 where the rows differ
    (so a formula that mixes rows, e.g. through a mean over the batch, is caught): then the
    batch needs no vmap."""
    g = torch.Generator(device="cpu").manual_seed(0)
    noise = torch.randn(x0.shape, generator=g, dtype=x0.dtype).to(x0.device)
    probe = x0 + 1e-3 * (x0.abs() + 1) * noise
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = vres(probe, *args)
            got = resid(probe.unsqueeze(-2), *args)
    except Exception:  # any failure: keep the general (vmap) route
        return False
    return (
        isinstance(got, Tensor)
        and got.shape == want.shape
        and got.dtype == want.dtype
        and bool(torch.isfinite(want).all())
        and bool(torch.allclose(got, want, rtol=1e-12, atol=1e-12 * float(want.abs().max())))
    )


def curve_fit(
    f: Callable[..., Tensor],
    xdata: Tensor,
    ydata: Tensor,
    p0: Tensor | Sequence[float],
    sigma: Tensor | None = None,
    absolute_sigma: bool = False,
    *,
    method: str = "trust-region",
    full_output: bool = False,
    ftol: float = 1.49012e-8,
    xtol: float = 1.49012e-8,
    gtol: float = 0.0,
    max_nfev: int | None = None,
):
    r"""Fit ``f(xdata, *params)`` to ydata by least squares, as ``scipy.optimize.curve_fit``:
    minimise :math:`\sum_i ((f(x_i; p) - y_i)/\sigma_i)^2` and return (popt, pcov).

    The covariance is scipy's, from the SVD :math:`J = U S V^T` of the Jacobian of the weighted
    residuals at popt (singular values below :math:`\epsilon \max(N, P) s_1` dropped):
    :math:`\mathrm{pcov} = V S^{-2} V^T`, times :math:`s^2 = \sum_i r_i^2 / (N - P)` unless
    ``absolute_sigma`` (inf when N <= P).

    A batch of B curves: p0 of shape (B, P), ydata (B, N), xdata shared (N, ...) or per curve
    (B, N, ...) (per curve when its first two axes are ydata's shape), sigma (N,) or (B, N); f is
    written for one curve and vmapped; popt is (B, P), pcov (B, P, P).

    Parameters
    ----------
    f : ``f(xdata, p_1, ..., p_P) -> (N,)`` in torch, each p_j a 0-d tensor.
    xdata, ydata : the data (ydata (N,) or (B, N)).
    p0 : the start (there is no default: scipy's ones are rarely a good start).
    sigma : standard deviations of ydata (not a covariance matrix), (N,) or (B, N).
    absolute_sigma : sigma in absolute units: pcov is not rescaled by the residual variance.
    method, ftol, xtol, gtol, max_nfev : as :func:`least_squares` (defaults: scipy's
        curve_fit/leastsq tolerances and 200 (P + 1) evaluations).
    full_output : also return the :class:`OptimizeResult` of the fit.

    Raises
    ------
    ConvergenceError: a single fit ended without success (scipy raises RuntimeError; this is
    one). A batch never raises: failed fits are named in a warning, their ``success`` is False
    in the result (``full_output=True``).

    Example
    -------
    >>> popt, pcov = curve_fit(lambda x, a, b, c: a * torch.exp(-b * x) + c, t, y,
    ...                        p0=[1.0, 1.0, 0.0])
    >>> perr = pcov.diagonal().sqrt()
    """
    x0 = _as_x0(p0)
    batched = x0.ndim == 2
    y = torch.as_tensor(ydata, dtype=x0.dtype, device=x0.device)
    xd = torch.as_tensor(xdata, device=x0.device)
    if xd.is_floating_point():
        xd = xd.to(x0.dtype)
    if y.ndim != (2 if batched else 1) or (batched and y.shape[0] != x0.shape[0]):
        want = f"(B, N) with B = {x0.shape[0]}" if batched else "(N,)"
        raise ShapeError(
            f"ydata has shape {tuple(y.shape)}; expected {want} for p0 of shape {tuple(x0.shape)}."
        )
    n = y.shape[-1]
    s = None
    if sigma is not None:
        s = torch.as_tensor(sigma, dtype=x0.dtype, device=x0.device)
        if s.shape not in ((n,), tuple(y.shape)):
            raise ShapeError(
                f"sigma of shape {tuple(s.shape)}: give the standard deviations of "
                f"ydata, shape (N,) = ({n},){' or (B, N)' if batched else ''} (a "
                f"covariance matrix is not supported)."
            )
        if not bool((torch.isfinite(s) & (s > 0)).all()):
            raise NonFiniteError("sigma must be finite and > 0.")
    x_per = batched and xd.ndim >= 2 and tuple(xd.shape[:2]) == tuple(y.shape)
    s_per = s is not None and s.ndim == 2

    def resid(pp: Tensor, xx: Tensor, yy: Tensor, ss: Tensor | None) -> Tensor:
        r = f(xx, *pp.unbind(-1)) - yy
        return r / ss if ss is not None else r

    if method not in ALIASES:
        raise ConfigurationError(f"unknown method {method!r}; choose from {', '.join(METHODS)}.")
    _check_tol(ftol=ftol, xtol=xtol, gtol=gtol)
    p = x0.shape[-1]
    max_nfev = 200 * (p + 1) if max_nfev is None else max_nfev
    if not (isinstance(max_nfev, int) and max_nfev >= 1):
        raise ConfigurationError(f"max_nfev must be an integer >= 1, got {max_nfev!r}.")
    if batched:  # one curve's residual, vmapped over the rows asked for
        dims = (0, 0 if x_per else None, 0, 0 if s_per else None)
        vres = torch.func.vmap(resid, in_dims=dims)

        def args(rows: Tensor) -> tuple:
            every = rows.numel() == y.shape[0]
            sel = (lambda t: t) if every else (lambda t: t[rows])  # noqa: E731
            return sel(xd) if x_per else xd, sel(y), sel(s) if s_per else s

        def fun_r(pp: Tensor, rows: Tensor) -> Tensor:
            return _evaluate(lambda q: vres(q, *args(rows)), pp)

        if _broadcasts(resid, vres, x0, args(torch.arange(x0.shape[0], device=x0.device))):
            # f is elementwise in its parameters: call it once on the columns (B, 1) of the
            # batch (no vmap: 0.04 ms against 0.7 ms for 13 curves of 50 points)

            def fun_r(pp: Tensor, rows: Tensor) -> Tensor:  # noqa: F811
                return _evaluate(lambda q: resid(q.unsqueeze(-2), *args(rows)), pp)

    else:

        def fun_r(pp: Tensor, rows: Tensor) -> Tensor:
            return _evaluate(lambda q: resid(q, xd, y, s), pp.squeeze(0)).unsqueeze(0)

    xb = x0 if batched else x0.unsqueeze(0)
    out = _run(
        fun_r, None, xb, batched, ALIASES[method], ftol, xtol, gtol, max_nfev, 100.0, None, "auto"
    )
    res = _result(out, batched, ALIASES[method])
    jac = res.jac if batched else res.jac.unsqueeze(0)
    cost = torch.as_tensor(res.cost, dtype=x0.dtype, device=x0.device).reshape(-1)
    _, sv, vh = torch.linalg.svd(jac, full_matrices=False)
    eps = torch.finfo(x0.dtype).eps
    keep = sv > eps * max(n, p) * sv[:, :1]
    inv = torch.where(keep, 1 / torch.where(keep, sv, 1).pow(2), 0)
    pcov = vh.transpose(1, 2) @ (inv.unsqueeze(-1) * vh)
    if not absolute_sigma:
        if n > p:
            pcov = pcov * (2 * cost / (n - p))[:, None, None]
        else:
            pcov = torch.full_like(pcov, math.inf)
            warnings.warn(
                "Covariance of the parameters could not be estimated (N <= P).", stacklevel=2
            )
    success = res.success if batched else torch.tensor([res.success])
    if not bool(torch.as_tensor(success).all()):
        if not batched:
            raise ConvergenceError(
                f"Optimal parameters not found: {res.message} (nfev = "
                f"{res.nfev}; raise max_nfev or start nearer)."
            )
        failed = (~success).nonzero().squeeze(-1).tolist()
        warnings.warn(
            f"{len(failed)} of {x0.shape[0]} fits ended without success (first: "
            f"{failed[:10]}); see result.success and result.message "
            f"(full_output=True).",
            stacklevel=2,
        )
    popt = res.x
    pcov = pcov if batched else pcov.squeeze(0)
    return (popt, pcov, res) if full_output else (popt, pcov)


# ---------------------------------------------------------------------------------- minimize
MINIMIZE_METHODS = ("trust-exact", "trust-ncg", "newton-lm")
MINIMIZE_MESSAGES = {
    0: "Optimization terminated successfully.",
    1: "Maximum number of iterations has been exceeded.",
    2: "A bad approximation caused failure to predict improvement.",
    3: "A linalg error occurred, such as a non-psd Hessian.",
}


def _trust_exact(h: Tensor, g: Tensor, radius: float) -> tuple[Tensor, bool]:
    r"""Moré and Sorensen (1983): the minimiser of :math:`g^T p + \tfrac12 p^T H p` over
    :math:`\|p\| \le \Delta` from the eigen-decomposition :math:`H = Q\,\mathrm{diag}(\mu) Q^T`:
    :math:`p(\lambda) = -Q (\mu + \lambda)^{-1} Q^T g` with :math:`\lambda \ge \max(0, -\mu_1)`
    and :math:`\|p(\lambda)\| = \Delta` unless the Newton step lies inside; in the hard case
    (:math:`Q^T g` orthogonal to the lowest eigenvector) :math:`p(-\mu_1) + \tau q_1`. Returns
    (p, hits_boundary)."""
    mu, q = torch.linalg.eigh(h)
    c = q.T @ g
    eps = torch.finfo(mu.dtype).eps
    scale = max(float(mu.abs().max()), float(torch.finfo(mu.dtype).tiny))
    lo = max(0.0, -float(mu[0]))
    if float(mu[0]) > eps * scale:
        p = -q @ (c / mu)
        if float(p.norm()) <= radius:
            return p, False

    def norm(lam: float) -> float:
        den = mu + lam
        return float((c / torch.where(den > 0, den, torch.full_like(den, math.inf))).norm())

    # hard case: the component of g along the lowest eigenspace vanishes
    low = mu <= float(mu[0]) + eps * scale
    if float(c[low].abs().max()) <= eps * float(g.norm()) and norm(lo) <= radius:
        den = mu + lo
        p = -q @ torch.where(low, torch.zeros_like(c), c / torch.where(low, 1, den))
        tau = math.sqrt(max(radius**2 - float(p @ p), 0.0))
        return p + tau * q[:, 0], True
    # Newton on 1/||p(lambda)|| - 1/Delta (concave: monotone from the left of the root),
    # safeguarded by the bracket [lo, hi] with ||p(hi)|| <= Delta
    left, right = lo, lo + float(g.norm()) / radius
    lam = right
    for _ in range(200):
        phi = norm(lam)
        if abs(phi - radius) <= 1e-12 * radius:
            break
        if phi > radius:
            left = lam
        else:
            right = lam
        den = mu + lam
        w = c / den
        dphi = -float((w.pow(2) / den).sum()) / phi if 0 < phi < math.inf else 0.0
        new = lam + (phi - radius) / radius * phi / -dphi if dphi < 0 else math.nan
        if not left < new < right:
            new = (left + right) / 2
        if new == lam:
            break
        lam = new
    return -q @ (c / (mu + lam)), True


def _steihaug(
    hvp: Callable[[Tensor], Tensor], g: Tensor, radius: float, tol: float, maxiter: int
) -> tuple[Tensor, bool]:
    r"""Steihaug-Toint CG on :math:`H p = -g` inside :math:`\|p\| \le \Delta`: stops at the
    boundary, at negative curvature (following it to the boundary), or at
    :math:`\|r\| \le \mathrm{tol}`. Returns (p, hits_boundary)."""

    def to_boundary(p: Tensor, d: Tensor) -> Tensor:
        a, b, c = float(d @ d), 2 * float(p @ d), float(p @ p) - radius**2
        tau = (-b + math.sqrt(max(b * b - 4 * a * c, 0.0))) / (2 * a)
        return p + tau * d

    p = torch.zeros_like(g)
    r = g.clone()
    d = -r
    for _ in range(maxiter):
        hd = hvp(d)
        curv = float(d @ hd)
        if curv <= 0:
            return to_boundary(p, d), True
        alpha = float(r @ r) / curv
        p_new = p + alpha * d
        if float(p_new.norm()) >= radius:
            return to_boundary(p, d), True
        r_new = r + alpha * hd
        if float(r_new.norm()) <= tol:
            return p_new, False
        beta = float(r_new @ r_new) / float(r @ r)
        p, r, d = p_new, r_new, -r_new + beta * d
    return p, False


def minimize(
    fun: Callable[[Tensor], Tensor],
    x0: Tensor | Sequence[float],
    method: str = "trust-exact",
    *,
    gtol: float = 1e-8,
    maxiter: int | None = None,
    initial_trust_radius: float | None = None,
    max_trust_radius: float | None = None,
    eta: float = 0.15,
) -> OptimizeResult:
    r"""Minimise a scalar function :math:`F(x)` with Newton's metric, the exact Hessian
    :math:`M = \nabla^2 F` by autograd (000 Table 1's Hessian row), as
    ``scipy.optimize.minimize`` with the trust-region methods.

    - ``"trust-exact"``: :math:`\min_p g^T p + \tfrac12 p^T H p` s.t. :math:`\|p\| \le \Delta`
      solved exactly (Moré and Sorensen 1983, dense eigen-decomposition, hard case included);
    - ``"trust-ncg"``: the same subproblem by Steihaug-Toint CG on Hessian-vector products
      (the Hessian is never formed);
    - ``"newton-lm"``: :math:`\delta = -(H + \lambda I)^{-1} g` by Cholesky, lambda times 1/3
      when rho > 3/4 and times 3 when rho < 1/4, kept within :math:`[\epsilon, 1/\epsilon]`
      times :math:`\|H\|` (relative bounds); when :math:`H + \lambda I` is not positive definite
      lambda jumps to :math:`2|\mu_{min}|` (the lowest eigenvalue), so it never livelocks.

    The trust radius follows scipy's rule (times 1/4 when rho < 1/4, doubled on the boundary
    when rho > 3/4, a step accepted when rho > eta), but starts scale-free: by default at the
    length of the first Newton step :math:`\|H^{-1} g\|` with |eigenvalues| (1 where that is 0),
    as MINPACK starts from the problem's own scale. Stops when :math:`\|g\| < \mathrm{gtol}`
    (status 0), after ``maxiter`` iterations (200 P; status 1), when the model predicts no
    decrease above the rounding level of F, :math:`10\epsilon|F|` (status 2: x is as good as
    the precision allows, though the gradient is above gtol), or on a linear-algebra failure
    (status 3).

    Parameters
    ----------
    fun : ``fun(x) -> scalar tensor``, written in torch; x (P,).
    x0 : the start; dtype and device follow it (float64 for a list).
    method : ``"trust-exact"``, ``"trust-ncg"`` or ``"newton-lm"``.
    gtol : stop when the gradient norm is below this.
    initial_trust_radius, max_trust_radius : radius bounds (default: scale-free start, no cap).
    eta : the least rho of an accepted step.

    Returns
    -------
    OptimizeResult with x, fun, jac (the gradient), hess (dense methods), status, message,
    success, nit, nfev, njev, nhev.

    Example
    -------
    >>> res = minimize(lambda x: (1 - x[0])**2 + 100 * (x[1] - x[0]**2)**2, [-1.2, 1.0])
    >>> res.x, res.nit, res.success
    """
    if method not in MINIMIZE_METHODS:
        raise ConfigurationError(
            f"unknown method {method!r}; choose from {', '.join(MINIMIZE_METHODS)}."
        )
    _check_tol(gtol=gtol)
    if not (isinstance(eta, int | float) and 0 <= eta < 0.25):
        raise ConfigurationError(f"eta must lie in [0, 1/4), got {eta!r}.")
    x = _as_x0(x0)
    if x.ndim != 1:
        raise ShapeError(f"minimize takes one vector x0 (P,), got shape {tuple(x.shape)}.")
    p = x.numel()
    maxiter = 200 * p if maxiter is None else maxiter
    with torch.no_grad():
        f = _evaluate(fun, x)
    if f.numel() != 1:
        raise ShapeError(
            f"fun returned shape {tuple(f.shape)}; minimize needs a scalar F(x) "
            f"(for residuals use steepest.least_squares)."
        )
    if not bool(torch.isfinite(f).all()):
        raise NonFiniteError(f"F(x0) = {float(f)}; start where fun is finite.")
    grad_fn = torch.func.grad(lambda z: fun(z).reshape(()))
    counts = {"nfev": 1, "njev": 0, "nhev": 0}

    def derivatives(z: Tensor) -> tuple[Tensor, Tensor | None]:
        counts["njev"] += 1
        g = grad_fn(z).detach()
        h = None
        if method != "trust-ncg":
            counts["nhev"] += 1
            h = torch.func.jacfwd(grad_fn)(z).detach()
            h = (h + h.T) / 2
        return g, h

    def hvp_at(z: Tensor) -> Callable[[Tensor], Tensor]:
        def hvp(v: Tensor) -> Tensor:
            counts["nhev"] += 1
            return torch.func.jvp(grad_fn, (z,), (v,))[1].detach()

        return hvp

    g, h = derivatives(x)
    if not bool(torch.isfinite(g).all()) or (h is not None and not bool(torch.isfinite(h).all())):
        raise NonFiniteError("the gradient or the Hessian is not finite at x0.")
    fval = float(f)
    radius = initial_trust_radius
    if radius is None:  # scale-free: the length of the Newton step with |H|
        if h is not None:
            mu, q = torch.linalg.eigh(h)
            keep = mu.abs() > 0
            step = (q.T @ g)[keep] / mu.abs()[keep]
            radius = float(step.norm()) if keep.any() else 1.0
        else:
            hg = hvp_at(x)(g)
            gg = float(g @ g)
            curv = float(g @ hg)
            radius = gg**0.5 * gg / abs(curv) if curv != 0 else 1.0
        radius = radius if radius > 0 and math.isfinite(radius) else 1.0
    max_radius = math.inf if max_trust_radius is None else float(max_trust_radius)
    lam = None
    status, nit = 1, 0
    while float(g.norm()) >= gtol:
        if nit >= maxiter:
            status = 1
            break
        hits = True
        try:
            if method == "trust-exact":
                step, hits = _trust_exact(h, g, radius)
            elif method == "trust-ncg":
                tol = min(0.5, math.sqrt(float(g.norm()))) * float(g.norm())
                step, hits = _steihaug(hvp_at(x), g, radius, tol, 10 * p + 10)
            else:
                hnorm = max(float(h.abs().max()), torch.finfo(x.dtype).tiny)
                if lam is None:
                    lam = 1e-3 * hnorm
                lam = min(
                    max(lam, torch.finfo(x.dtype).eps * hnorm), hnorm / torch.finfo(x.dtype).eps
                )
                eye = torch.eye(p, dtype=x.dtype, device=x.device)
                chol, info = torch.linalg.cholesky_ex(h + lam * eye)
                if int(info) != 0:  # H + lambda I indefinite: above the lowest eigenvalue
                    lam = max(2 * lam, 2 * abs(float(torch.linalg.eigvalsh(h)[0])))
                    chol, info = torch.linalg.cholesky_ex(h + lam * eye)
                    if int(info) != 0:
                        status = 3
                        break
                step = -torch.cholesky_solve(g.unsqueeze(-1), chol).squeeze(-1)
        except torch.linalg.LinAlgError:
            status = 3
            break
        if h is not None:
            predicted = -(float(g @ step) + 0.5 * float(step @ (h @ step)))
        else:
            predicted = -(float(g @ step) + 0.5 * float(step @ hvp_at(x)(step)))
        if predicted <= 0 or predicted <= 10 * torch.finfo(x.dtype).eps * abs(fval):
            status = 2  # no decrease predicted above the rounding level of F
            break
        x_new = x + step
        with torch.no_grad():
            f_new = float(_evaluate(fun, x_new))
        counts["nfev"] += 1
        actual = fval - f_new if math.isfinite(f_new) else -math.inf
        rho = actual / predicted
        nit += 1
        if method == "newton-lm":
            lam = lam / 3 if rho > 0.75 else lam * 3 if rho < 0.25 else lam
            accept = rho > eta
        else:
            if rho < 0.25:
                radius *= 0.25
            elif rho > 0.75 and hits:
                radius = min(2 * radius, max_radius)
            accept = rho > eta
        if accept:  # F at the accepted point is reused, not evaluated again
            x, fval = x_new, f_new
            g, h = derivatives(x)
        if float(g.norm()) < gtol:
            break
    else:
        status = 0
    if float(g.norm()) < gtol:
        status = 0
    res = OptimizeResult(
        x=x,
        fun=fval,
        jac=g,
        status=status,
        message=MINIMIZE_MESSAGES[status],
        success=status == 0,
        nit=nit,
        **counts,
        method=method,
    )
    if h is not None:
        res["hess"] = h
    return res

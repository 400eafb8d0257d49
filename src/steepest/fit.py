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
  to 10 % (MINPACK's ``lmpar``), Delta adapted to the reduction ratio rho.
- ``"levenberg-marquardt"``: plain LM, D = I and lambda times 1/3 when rho > 3/4, times 3 when
  rho < 1/4 (the defaults of :class:`~steepest.damping.LevenbergMarquardt`), a try accepted when
  the cost went down.
- ``"gauss-newton"``: lambda = 0 (the least-norm step when J is rank deficient) with a
  backtracking (Armijo) line search on the step length.

Every solve uses the thin SVD of :math:`J D^{-1}` of each problem (one batched
``torch.linalg.svd`` per accepted step), so a rank-deficient J is handled exactly (singular
values below :math:`\epsilon \max(M, P)\, s_{max}` count as zero) and lambda costs no further
factorisation.

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

__all__ = ["OptimizeResult", "least_squares", "curve_fit"]

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
    forward mode (P jvps, vmapped) when P <= M, reverse mode (M vjps) otherwise."""
    b, p = x.shape
    if mode == "auto":
        mode = "jacfwd" if p <= m else "jacrev"
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


def _svd_solve(s: Tensor, c: Tensor, lam: Tensor) -> Tensor:
    r"""Scaled step coordinates :math:`w_i = s_i c_i / (s_i^2 + \lambda)` (0 where s_i = 0)."""
    den = s.pow(2) + lam.unsqueeze(-1)
    w = s * c / torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(s > 0, w, torch.zeros_like(w))


def _lmpar(s: Tensor, c: Tensor, radius: Tensor, active: Tensor, sigma: float = 0.1) -> Tensor:
    r"""lambda >= 0 with :math:`\|w(\lambda)\| \le (1+\sigma)\Delta` and, when lambda > 0,
    :math:`\|w(\lambda)\| \ge \Delta` (MINPACK's lmpar, to the same 10 %), for each problem.

    Newton on :math:`1/\|w(\lambda)\| - 1/\Delta`, a concave increasing function of lambda
    (Moré and Sorensen 1983), from lambda = 0: the iterates increase monotonically to the root.
    """
    lam = torch.zeros_like(radius)
    todo = active.clone()
    for _ in range(60):
        w = _svd_solve(s, c, lam)
        phi = w.norm(dim=-1)
        todo = todo & (phi > (1 + sigma) * radius)
        if not bool(todo.any()):
            break
        den = s.pow(2) + lam.unsqueeze(-1)
        den = torch.where(den > 0, den, torch.ones_like(den))
        dphi2 = -2 * (w.pow(2) / den).sum(-1)  # d ||w||^2 / d lambda
        dphi = dphi2 / (2 * phi.clamp_min(torch.finfo(phi.dtype).tiny))
        step = (phi - radius) / radius * phi / (-dphi).clamp_min(torch.finfo(phi.dtype).tiny)
        lam = torch.where(todo, lam + step, lam)
    return lam


# ---------------------------------------------------------------------------------- core
def _least_squares_core(
    fun_b: Callable[[Tensor], Tensor],
    x0: Tensor,
    f0: Tensor,
    jac_b: Callable[[Tensor], Tensor],
    method: str,
    ftol: float,
    xtol: float,
    gtol: float,
    max_nfev: int,
    factor: float,
) -> dict:
    """B independent fits at once; see the module docstring. Returns per-fit tensors."""
    x, f = x0.clone(), f0.clone()
    bsz, p = x.shape
    dtype, dev = x.dtype, x.device
    eps = torch.finfo(dtype).eps
    m = f.shape[1]
    fnorm = f.norm(dim=-1)
    fnorm0 = fnorm.clone()
    active = torch.ones(bsz, dtype=torch.bool, device=dev)
    status = torch.full((bsz,), 0, dtype=torch.long, device=dev)
    nfev = torch.ones(bsz, dtype=torch.long, device=dev)
    njev = torch.zeros(bsz, dtype=torch.long, device=dev)
    nit = torch.zeros(bsz, dtype=torch.long, device=dev)
    need_jac = torch.ones(bsz, dtype=torch.bool, device=dev)
    first = torch.ones(bsz, dtype=torch.bool, device=dev)  # no step accepted yet
    d = torch.zeros(bsz, p, dtype=dtype, device=dev)  # D (scaled methods)
    radius = torch.zeros(bsz, dtype=dtype, device=dev)  # Delta
    lam = torch.zeros(bsz, dtype=dtype, device=dev)  # LM's lambda
    alpha = torch.ones(bsz, dtype=dtype, device=dev)  # GN's step length
    k = min(m, p)
    sv = torch.zeros(bsz, k, dtype=dtype, device=dev)
    c = torch.zeros(bsz, k, dtype=dtype, device=dev)
    vh = torch.zeros(bsz, k, p, dtype=dtype, device=dev)
    jac = torch.zeros(bsz, m, p, dtype=dtype, device=dev)
    zero = torch.zeros((), dtype=dtype, device=dev)

    def finish(mask: Tensor, code: int | Tensor) -> None:
        nonlocal active, status
        mask = mask & active
        status = torch.where(mask, torch.as_tensor(code, device=dev), status)
        active = active & ~mask

    while bool(active.any()):
        # ---- Jacobian, scaling and SVD where a step was accepted (or at the start)
        renew = need_jac & active
        if bool(renew.any()):
            jnew = jac_b(x)
            jac = torch.where(renew[:, None, None], jnew, jac)
            njev = njev + renew.long()
            need_jac = need_jac & ~renew
            bad = renew & ~torch.isfinite(jnew).flatten(1).all(-1)
            finish(bad, -1)
            renew = renew & ~bad
            acnorm = jac.norm(dim=1)  # column norms (B, P)
            g = (jac * f.unsqueeze(-1)).sum(1)
            cosine = (
                g.abs() / (fnorm.unsqueeze(-1) * acnorm).clamp_min(torch.finfo(dtype).tiny)
            ).amax(-1)
            cosine = torch.where(fnorm > 0, cosine, zero)
            if method == "trust-region":
                # D: the column norms at the start (1 where 0), then their running maximum
                fresh = renew & (njev == 1)
                dnew = torch.where(
                    fresh[:, None],
                    torch.where(acnorm > 0, acnorm, torch.ones_like(acnorm)),
                    torch.maximum(d, acnorm),
                )
                d = torch.where(renew[:, None], dnew, d)
                xnorm = (d * x).norm(dim=-1)
                r0 = torch.where(xnorm > 0, factor * xnorm, torch.full_like(xnorm, factor))
                radius = torch.where(fresh, r0, radius)
            else:
                d = torch.ones_like(d)
            if method == "levenberg-marquardt":
                start = renew & (lam == 0) & first
                lam = torch.where(start, 1e-3 * acnorm.pow(2).amax(-1), lam)
            idx = renew.nonzero().squeeze(-1)
            if idx.numel():
                u_, s_, vh_ = torch.linalg.svd(jac[idx] / d[idx].unsqueeze(1), full_matrices=False)
                s_ = torch.where(s_ > eps * max(m, p) * s_[:, :1], s_, torch.zeros_like(s_))
                sv[idx], vh[idx] = s_, vh_
                c[idx] = -(u_.transpose(1, 2) @ f[idx].unsqueeze(-1)).squeeze(-1)
            finish(renew & (cosine <= gtol), 1)
            finish(renew & (cosine <= eps), 1)
            if not bool(active.any()):
                break
        # ---- the try: scaled step w (D delta = Vh^T w) and its predicted reduction
        if method == "trust-region":
            lam = _lmpar(sv, c, radius, active)
            w = _svd_solve(sv, c, lam)
        elif method == "levenberg-marquardt":
            w = _svd_solve(sv, c, lam)
        else:
            w = _svd_solve(sv, c, zero.expand(bsz)) * alpha.unsqueeze(-1)
        q = (vh.transpose(1, 2) @ w.unsqueeze(-1)).squeeze(-1)  # D delta
        step = torch.where(active[:, None], q / d, torch.zeros_like(q))
        pnorm = q.norm(dim=-1)
        if method == "trust-region":
            radius = torch.where(active & first, torch.minimum(radius, pnorm), radius)
        xt = x + step
        ft = _evaluate(fun_b, xt)
        nfev = nfev + active.long()
        fnorm1 = ft.norm(dim=-1)
        fnorm1 = torch.where(torch.isfinite(fnorm1), fnorm1, torch.full_like(fnorm1, math.inf))
        safe = fnorm.clamp_min(torch.finfo(dtype).tiny)
        actred = torch.where(
            0.1 * fnorm1 < fnorm, 1 - (fnorm1 / safe).pow(2), -torch.ones_like(fnorm)
        )
        z = sv * w  # U^T J delta (-c is U^T f)
        prered = (2 * (c * z).sum(-1) - z.pow(2).sum(-1)) / safe.pow(2)
        dirder = -(c * z).sum(-1) / safe.pow(2)
        ratio = torch.where(prered != 0, actred / torch.where(prered != 0, prered, 1), zero)
        # ---- the method's update
        if method == "trust-region":
            shrink = ratio <= 0.25
            temp = torch.where(
                actred >= 0, torch.full_like(ratio, 0.5), 0.5 * dirder / (dirder + 0.5 * actred)
            )
            temp = torch.where(
                (0.1 * fnorm1 >= fnorm) | ~(temp >= 0.1), torch.full_like(temp, 0.1), temp
            )
            new_r = torch.where(
                shrink,
                temp * torch.minimum(radius, pnorm / 0.1),
                torch.where((lam == 0) | (ratio >= 0.75), pnorm / 0.5, radius),
            )
            radius = torch.where(active, new_r, radius)
            accept = active & (ratio >= 1e-4)
        elif method == "levenberg-marquardt":
            accept = active & (fnorm1 < fnorm)
            new_l = torch.where(ratio > 0.75, lam / 3, torch.where(ratio < 0.25, lam * 3, lam))
            new_l = torch.where(new_l > 0, new_l, torch.full_like(new_l, eps))
            lam = torch.where(active, new_l.clamp(max=1 / eps), lam)
        else:
            # Armijo: cost(x + alpha p) <= cost(x) + 1e-4 alpha g^T p, i.e. actred >= 2e-4 dirder
            accept = active & (actred >= -2e-4 * dirder) & (fnorm1 < fnorm)
            alpha = torch.where(
                accept, torch.ones_like(alpha), torch.where(active, alpha / 2, alpha)
            )
        x = torch.where(accept[:, None], xt, x)
        f = torch.where(accept[:, None], ft, f)
        fnorm = torch.where(accept, fnorm1, fnorm)
        nit = nit + accept.long()
        need_jac = need_jac | accept
        first = first & ~accept
        xnorm = (d * x).norm(dim=-1)
        size = radius if method == "trust-region" else pnorm
        # ---- stopping rules (MINPACK's, then its machine-precision variants)
        small_f = (actred.abs() <= ftol) & (prered <= ftol) & (0.5 * ratio <= 1)
        small_x = size <= xtol * xnorm
        code = torch.where(small_f & small_x, 4, torch.where(small_f, 2, 3))
        finish(small_f | small_x, code)
        finish(fnorm <= eps * fnorm0, 2)  # the residual is at rounding level
        finish(nfev >= max_nfev, 0)
        finish((actred.abs() <= eps) & (prered <= eps) & (0.5 * ratio <= 1), 2)
        finish(size <= eps * xnorm, 3)
    if bool(need_jac.any()):
        jac = torch.where(need_jac[:, None, None], jac_b(x), jac)
    return {"x": x, "fun": f, "jac": jac, "status": status, "nfev": nfev, "njev": njev, "nit": nit}


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
    jac : ``"auto"`` (autograd: forward mode when P <= M, else reverse), ``"jacfwd"``,
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
    if batched:
        fun_b = torch.func.vmap(fun) if vectorize else fun
    else:

        def fun_b(xb: Tensor) -> Tensor:
            return _evaluate(fun, xb.squeeze(0)).unsqueeze(0)

    xb = x0 if batched else x0.unsqueeze(0)
    with torch.no_grad():
        f0 = _evaluate(fun_b, xb)
    want = "(B, M) for x0 of shape (B, P)" if batched else "(M,)"
    if f0.ndim <= 1:
        raise ShapeError(
            f"fun returned a scalar{'per problem' if batched else ''} (shape "
            f"{tuple(f0.shape)}); least_squares needs the vector of residuals f, shape "
            f"{want}, and minimises 1/2 sum f_i^2: return the residuals, not their sum of "
            f"squares, or use steepest.minimize for a scalar objective."
        )
    if f0.ndim != 2 or f0.shape[0] != xb.shape[0]:
        got = tuple(f0.shape if batched else f0.squeeze(0).shape)
        raise ShapeError(
            f"fun returned shape {got}; expected {want}: one flat residual vector "
            f"per problem (flatten it)."
        )
    if f0.dtype != x0.dtype or f0.device != x0.device:
        raise ShapeError(
            f"fun returned {f0.dtype} on {f0.device} for x0 of {x0.dtype} on "
            f"{x0.device}; compute the residuals in x0's dtype and device."
        )
    m = f0.shape[1]
    sw = None
    if weights is not None:
        w = torch.as_tensor(weights, dtype=x0.dtype, device=x0.device)
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
    base = fun_b

    def res_b(xx: Tensor) -> Tensor:
        out = base(xx)
        return out * sw if sw is not None else out

    if callable(jac):

        def jac_b(xx: Tensor) -> Tensor:
            jj = jac(xx if batched else xx.squeeze(0))
            jj = torch.as_tensor(jj, dtype=xx.dtype, device=xx.device)
            jj = jj if batched else jj.unsqueeze(0)
            if jj.shape != (xb.shape[0], m, p):
                raise ShapeError(
                    f"jac returned shape {tuple(jj.shape)}; expected "
                    f"{(xb.shape[0], m, p) if batched else (m, p)} (M, P)."
                )
            return jj * sw.unsqueeze(-1) if sw is not None else jj
    elif jac in ("auto", "jacfwd", "jacrev"):

        def jac_b(xx: Tensor) -> Tensor:
            return _jacobian(res_b, xx, m, jac).detach()
    else:
        raise ConfigurationError(
            f"jac must be 'auto', 'jacfwd', 'jacrev' or a callable, got {jac!r}."
        )

    def res_nograd(xx: Tensor) -> Tensor:
        with torch.no_grad():
            return res_b(xx)

    out = _least_squares_core(
        res_nograd, xb, f0, jac_b, method, ftol, xtol, gtol, max_nfev, float(factor)
    )
    return _result(out, batched, method)


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

    if batched:
        dims = (0, 0 if x_per else None, 0, 0 if s_per else None)
        vres = torch.func.vmap(resid, in_dims=dims)

        def fun(pp: Tensor) -> Tensor:
            return vres(pp, xd, y, s)
    else:

        def fun(pp: Tensor) -> Tensor:
            return resid(pp, xd, y, s)

    p = x0.shape[-1]
    res = least_squares(
        fun,
        x0,
        method=method,
        ftol=ftol,
        xtol=xtol,
        gtol=gtol,
        max_nfev=200 * (p + 1) if max_nfev is None else max_nfev,
    )
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

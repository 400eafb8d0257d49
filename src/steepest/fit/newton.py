"""``minimize``: a scalar function by Newton's method with the exact Hessian, in a trust
region (Moré-Sorensen, Steihaug-CG) or with LM damping, or by gradient descent in a trust
region (see :mod:`steepest.fit`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..errors import ConfigurationError, NonFiniteError, ShapeError, check_tolerances
from .checks import _as_x0, _evaluate, _with_args
from .core import _range_scales
from .result import OptimizeResult

# ---------------------------------------------------------------------------------- minimize
MINIMIZE_METHODS = ("trust-exact", "trust-ncg", "newton-lm", "gradient-descent")
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
    args: tuple = (),
    kwargs: dict | None = None,
) -> OptimizeResult:
    r"""Minimise a scalar function :math:`F(x)` with Newton's metric, the exact Hessian
    :math:`M = \nabla^2 F` by autograd (000 Table 1's Hessian row), as
    ``scipy.optimize.minimize`` with the trust-region methods, or with the identity metric
    (Table 1's first row, gradient descent).

    Of Table 1's rows only these two apply to a bare scalar F: Gauss-Newton, the GGN, the Fisher
    and the gradient covariance need the residuals or the per-sample likelihood behind F (use
    :func:`least_squares`, where GGN = Gauss-Newton for :math:`\tfrac12\|f\|^2`, or
    :class:`~steepest.Optimizer` on a model).

    - ``"trust-exact"``: :math:`\min_p g^T p + \tfrac12 p^T H p` s.t. :math:`\|p\| \le \Delta`
      solved exactly (Moré and Sorensen 1983, dense eigen-decomposition, hard case included);
    - ``"trust-ncg"``: the same subproblem by Steihaug-Toint CG on Hessian-vector products
      (the Hessian is never formed);
    - ``"newton-lm"``: :math:`\delta = -(H + \lambda I)^{-1} g` by Cholesky, lambda times 1/3
      when rho > 3/4 and times 3 when rho < 1/4, kept within :math:`[\epsilon, 1/\epsilon]`
      times :math:`\|H\|` (relative bounds); when :math:`H + \lambda I` is not positive definite
      lambda jumps to :math:`2|\mu_{min}|` (the lowest eigenvalue), so it never livelocks;
    - ``"gradient-descent"``: M = I, problem (1) of 000 as it stands,
      :math:`\min_d g^T d` s.t. :math:`\|d\| \le \epsilon`, so
      :math:`d = -\epsilon\, g / \|g\|` (:math:`\alpha = \epsilon / \sqrt{g^T g}`), with
      :math:`\epsilon` the trust radius, rho measured against the linear model
      :math:`-g^T d = \epsilon \|g\|` (0.5 at the exact line minimum of a quadratic) and the
      same radius rule; no Hessian is formed (one Hessian-vector product sets the first radius).
      It converges linearly, at a rate set by the condition number of the Hessian: for
      comparison and teaching, or where Newton's steps cost too much.

    The trust radius follows scipy's rule (times 1/4 when rho < 1/4, doubled on the boundary
    when rho > 3/4, a step accepted when rho > eta), but starts scale-free: by default at the
    length of the first Newton step :math:`\|H^{-1} g\|` with |eigenvalues| (1 where that is 0),
    as MINPACK starts from the problem's own scale. Stops when :math:`\|g\| < \mathrm{gtol}`
    (status 0), after ``maxiter`` iterations (200 P; status 1), when the model predicts no
    decrease above the rounding level of F, :math:`10\epsilon|F|` (status 2: x is as good as
    the precision allows, though the gradient is above gtol), or on a linear-algebra failure
    (status 3). gtol is absolute, as scipy's (scale it with F); every other rule is invariant
    to the scale of F, and where :math:`|F(x_0)|` lies outside :math:`[2^{-129}, 2^{128})`
    (float32: :math:`[2^{-17}, 2^{16})`) the
    method runs on F times a power of two (exact), so that F of 1e160 or 1e-160 takes the
    steps of F (the squares of the gradient overflowed from ~1e154; ``"trust-ncg"``'s CG
    tolerance, scipy's :math:`\min(1/2, \sqrt{\|g\|})\|g\|`, is not scale-free: the same
    minimum by another path).

    Parameters
    ----------
    fun : ``fun(x) -> scalar tensor``, written in torch; x (P,).
    x0 : the start; dtype and device follow it (float64 for a list).
    method : ``"trust-exact"``, ``"trust-ncg"``, ``"newton-lm"`` or ``"gradient-descent"``.
    gtol : stop when the gradient norm is below this.
    initial_trust_radius, max_trust_radius : radius bounds (default: scale-free start, no cap).
    eta : the least rho of an accepted step.
    args, kwargs : extra arguments of fun, as scipy's: ``fun(x, *args, **kwargs)``.

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
    check_tolerances(gtol=gtol)
    fun = _with_args(fun, args, kwargs)
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
    # |F(x0)| out of [2^-129, 2^128): minimise F times a power of two (exact: the same steps as
    # at |F| ~ 1; g^T g, the CG products and the norms would overflow beyond ~1e154), with gtol
    # scaled alike (it stays a bound on the user's gradient)
    inv = float(_range_scales(f.detach().abs().reshape(())))
    user_fun = fun
    if inv != 1.0:
        f = f * inv
        gtol = gtol * inv

        def fun(z: Tensor) -> Tensor:
            return user_fun(z) * inv

    grad_fn = torch.func.grad(lambda z: fun(z).reshape(()))
    counts = {"nfev": 1, "njev": 0, "nhev": 0}

    def derivatives(z: Tensor) -> tuple[Tensor, Tensor | None]:
        counts["njev"] += 1
        g = grad_fn(z).detach()
        h = None
        if method in ("trust-exact", "newton-lm"):
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
            elif method == "gradient-descent":
                step = -radius / float(g.norm()) * g
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
        if method == "gradient-descent":  # the linear model of problem (1)
            predicted = -float(g @ step)
        elif h is not None:
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
    res = OptimizeResult(  # in the user's units
        x=x,
        fun=fval / inv,
        jac=g / inv,
        status=status,
        message=MINIMIZE_MESSAGES[status],
        success=status == 0,
        nit=nit,
        **counts,
        method=method,
    )
    if h is not None:
        res["hess"] = h / inv
    return res

"""The batched MINPACK-style core of :func:`~steepest.fit.least_squares`: the input checks,
the Jacobian by ``torch.func``, the SVD of the scaled Jacobian, MINPACK's ``lmpar`` and the
loop over the fits still running (see :mod:`steepest.fit`)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import ConfigurationError, NonFiniteError, ShapeError


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

"""The checks of :mod:`steepest.fit` before a fit starts: x0, what fun (or jac) returns, a
parameter autograd cannot see, and a given ``jac`` against finite differences of fun."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import (
    ConfigurationError,
    NonFiniteError,
    ShapeError,
    SteepestWarning,
    user_stacklevel,
)
from .bounds import _box_rows, _project


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


def _with_args(fun: Callable, args: tuple, kwargs: dict | None) -> Callable:
    """``fun(x, *args, **kwargs)`` as a function of x (scipy's ``args``: a non-tuple is one
    argument); fun itself when there are none."""
    args = args if isinstance(args, tuple) else (args,)
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ConfigurationError(
            f"kwargs must be a dict of keyword arguments of fun, got {type(kwargs).__name__}."
        )
    if not args and not kwargs:
        return fun
    kw = dict(kwargs or {})
    return lambda x: fun(x, *args, **kw)


def _evaluate(fun: Callable[[Tensor], Tensor], x: Tensor, name: str = "fun") -> Tensor:
    try:
        out = fun(x)
    except RuntimeError as e:
        if "vmap" not in str(e):
            raise
        hint = (
            ", or (least_squares) pass a fun that takes the batch (B, P)" if name == "fun" else ""
        )
        raise ConfigurationError(
            f"{name} could not be vmapped over the problems of the batch ({e}); write it with "
            f"torch operations on the parameters (no .item(), float(), numpy or data-dependent "
            f"Python control flow){hint}."
        ) from e
    return _returned(out, name)


def _returned(out, name: str = "fun") -> Tensor:
    """``out``, what ``name`` returned, or a ConfigurationError unless it is a tensor."""
    if not isinstance(out, Tensor):
        raise ConfigurationError(
            f"{name} must return a torch.Tensor (written with torch operations"
            f"{', so that autograd gives its Jacobian' if name == 'fun' else ''}), got "
            f"{type(out).__name__}."
        )
    return out


def _quotient(fun_r, x: Tensor, rows: Tensor, col: int, h: Tensor, box):
    """||f(x + h e_col) - f(x - h e_col)|| / (the span), both points projected on the box of
    the rows (``box``, or None), and where the span is one-sided (a bound cut it)."""
    xp, xm = x.clone(), x.clone()
    xp[:, col] += h
    xm[:, col] -= h
    xp, xm = _project(xp, box), _project(xm, box)
    with torch.no_grad():
        df = torch.linalg.vector_norm(fun_r(xp, rows) - fun_r(xm, rows), dim=-1)
    span = (xp - xm)[:, col]
    return df / span, span < 2 * h * (1 - 1e-12)


def _check_seen(
    fun_r: Callable,
    x: Tensor,
    f: Tensor,
    rows: Tensor,
    acnorm: Tensor,
    box: tuple[Tensor, Tensor] | None = None,
) -> None:
    """Warn, before the fit starts, where a Jacobian column j is exactly 0 at x0 while fun
    moves along x[j] to first order: a central difference, h = sqrt(eps) (|x_j| + 1) (even
    terms such as a^2 or cos(a) at 0 cancel), larger than 1e-6 of the larger of J's largest
    column norm and ||f|| / (|x_j| + 1); on a bound (``box``) the difference is one-sided and
    must keep its size at h/10 too (an even term falls 10x). Then autograd does not see that
    parameter (``.item()``, ``float()``, numpy, a detached tensor), x0 sits within h of a kink
    whose autograd derivative is 0, or ``jac=`` is wrong: the fit would leave x_j at x0 and may
    report success. One column at a time, on the fits where it is zero (f = 0 skipped); the 2 probes
    a column are not counted in nfev. A warning, not an error: the test is a heuristic."""
    zero = (acnorm == 0) & (torch.linalg.vector_norm(f, dim=-1) > 0).unsqueeze(-1)
    if not bool(zero.any()):
        return
    root = math.sqrt(torch.finfo(x.dtype).eps)
    for col in zero.any(0).nonzero().flatten().tolist():
        i = zero[:, col].nonzero().squeeze(-1)  # distinct rows, in order
        xi = x[i]
        sub = _box_rows(box, rows[i])
        h = root * (xi[:, col].abs() + 1)
        df, one_sided = _quotient(fun_r, xi, rows[i], col, h, sub)
        scale = torch.maximum(
            acnorm[i].amax(-1), torch.linalg.vector_norm(f[i], dim=-1) / (xi[:, col].abs() + 1)
        )
        moved = df > 1e-6 * scale  # NaN (fun not finite there): no evidence
        if bool((moved & one_sided).any()):  # an even term does not cancel one-sided: a
            # first-order change keeps its quotient at h/10, a second-order one loses 10x
            df10, _ = _quotient(fun_r, xi, rows[i], col, h / 10, sub)
            moved = moved & (~one_sided | ((df10 > 1e-6 * scale) & (df10 >= 0.3 * df)))
        if bool(moved.any()):
            k = int(moved.nonzero()[0, 0])
            warnings.warn(
                f"the Jacobian's column {col} is exactly 0 at x0 (problem {int(rows[i[k]])}), "
                f"but fun changes with x[{col}] there (|df/dx| ~ {float(df[k]):.3g} by a "
                f"finite difference): autograd does not see that parameter (a .item(), "
                f"float(), numpy call or detached tensor in fun breaks the graph), x0 sits on a "
                f"kink whose autograd derivative is 0 (relu, max: start beside it), or jac= is "
                f"wrong; the fit cannot move x[{col}]. Write fun with torch operations on x "
                f"(for curve_fit: on the parameters p_j), or fix jac.",
                SteepestWarning,
                stacklevel=user_stacklevel(),
            )
            return


def _check_jac(
    fun_r: Callable,
    jac_r: Callable,
    x: Tensor,
    f: Tensor,
    rows: Tensor,
    box: tuple[Tensor, Tensor] | None = None,
) -> None:
    r"""Warn, before the fit starts, where a given ``jac`` disagrees with fun at x0. On up to 4
    problems, :math:`J(x_+ - x_-)` against :math:`f(x_+) - f(x_-)`, :math:`x_\pm = x \pm hd`
    (projected on the box when there are bounds: then one-sided), along a fixed random
    direction balanced over the columns, :math:`d_j = v_j s_j \min(1, \max(10^{-3}, r_{min} /
    r_j))` with :math:`s_j = |x_j| + 1`, :math:`r_j = \|J_{:,j}\| s_j` (so that a small
    column's error is not hidden under a large column), at :math:`h = \epsilon^{1/3}, h/10,
    h/100, h/1000` while undecided: a disagreement at most :math:`\tau\|J(x_+ - x_-)\| +
    2\cdot10^3\epsilon\|f\|`, :math:`\tau = \max(10^{-4}, 10^3\epsilon^{2/3})`, clears
    jac; one that, divided by h, grows more than 3x as h falls is rounding (no evidence); one
    that, divided by h, stays within a factor 0.3-3 from one h to the next, above the
    tolerance, is a wrong jac (a truncation error falls 10-100x per unit of h). Then a
    SteepestWarning names the columns that disagree on their own (the same test per column,
    2P more evaluations at least). Two evaluations of fun when jac is right at h, not counted
    in nfev. A warning, not an error: a kink of fun near x0 can trip it."""
    n = min(4, x.shape[0])
    x, f, rows = x[:n], f[:n], rows[:n]
    eps = torch.finfo(x.dtype).eps
    tau = max(1e-4, 1e3 * eps ** (2 / 3))
    gen = torch.Generator(device="cpu").manual_seed(2)
    v = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
    fnorm = torch.linalg.vector_norm(f, dim=-1)
    sub = _box_rows(box, rows)
    with torch.no_grad():
        jac = jac_r(x, rows)
        scale = x.abs() + 1
        reach = torch.linalg.vector_norm(jac, dim=-2) * scale  # a column's effect on f, (n, P)
        least = torch.where(reach > 0, reach, math.inf).amin(-1, keepdim=True)
        bal = torch.where(reach > 0, (least / reach).clamp(1e-3, 1), 1.0)
        bal = torch.where(torch.isfinite(bal), bal, 1.0)

        def wrong(step: Tensor) -> Tensor:
            h, prev = eps ** (1 / 3), None
            cleared = torch.zeros(n, dtype=torch.bool, device=x.device)
            flagged = torch.zeros_like(cleared)
            for _ in range(4):
                xp, xm = _project(x + h * step, sub), _project(x - h * step, sub)
                diff = fun_r(xp, rows) - fun_r(xm, rows)
                want = (jac @ (xp - xm).unsqueeze(-1)).squeeze(-1)
                # per unit of h: a wrong jac's error stays, a truncation error falls with h
                err = torch.linalg.vector_norm(diff - want, dim=-1) / (2 * h)
                tol = (tau * torch.linalg.vector_norm(want, dim=-1) + 2e3 * eps * fnorm) / (2 * h)
                cleared = cleared | (err <= tol)  # NaN (fun not finite there): neither
                if prev is not None:
                    rounding = err > 3 * prev
                    steady = (err > tol) & (err >= 0.3 * prev) & ~rounding
                    flagged = flagged | (~cleared & steady)
                    cleared = cleared | (rounding & ~flagged)
                if bool((cleared | flagged).all()):
                    break
                prev, h = err, h / 10
            return flagged & ~cleared

        bad = wrong(v * scale * bal)
        if not bool(bad.any()):
            return
        k = int(bad.nonzero()[0, 0])
        cols = []
        for j in range(x.shape[1]):
            e = torch.zeros_like(x)
            e[:, j] = scale[:, j]
            if bool(wrong(e)[k]):
                cols.append(j)
    where = f"in the columns {cols}" if cols else "along a random direction (no single column)"
    warnings.warn(
        f"jac disagrees with finite differences of fun at x0 (problem {int(rows[k])}) "
        f"{where}: check jac (a sign, a missing factor, the columns in the order of the "
        f"parameters; jac is of the unweighted residuals: weights and sigma are applied to it "
        f"here). The fit follows jac and may stop away from a minimum.",
        SteepestWarning,
        stacklevel=user_stacklevel(),
    )

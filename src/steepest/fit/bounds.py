r"""Bounds :math:`l \le x \le u` on the parameters of :func:`~steepest.fit.least_squares` and
:func:`~steepest.fit.curve_fit`: their check, and the quantities of the result. The core
(:mod:`.core`) keeps them by an active set and a projection: at every Jacobian, the parameters
on a bound whose gradient :math:`g = J^Tf` points out of the box (:math:`x_j = l_j,\ g_j > 0`
or :math:`x_j = u_j,\ g_j < 0`) are held (their columns of J left out of the step), the step
of the method is taken in the others, and the trial point is projected on the box,
:math:`x_t = P(x + \delta)`; the reduction it predicts is the Gauss-Newton model's for the
projected step :math:`\delta' = x_t - x`, :math:`-2g^T\delta' - \|J\delta'\|^2`, so a clipped step
is judged by what it does (a projected Levenberg-Marquardt method with an active set, Kanzow,
Yamashita and Fukushima 2004; scipy's bounded methods are ``trf`` and ``dogbox``)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigurationError, NonFiniteError, ShapeError

#: how near a bound (relative to max(1, |bound|)) a parameter counts as on it, for the held
#: set and ``active_mask`` (scipy's rtol of ``find_active_constraints``)
RSTEP = 1e-10


def _as_bounds(bounds, x0: Tensor) -> tuple[Tensor, Tensor] | None:
    """Checks ``bounds = (lb, ub)`` against x0 (B, P) and returns them as (B, P) tensors (-inf /
    inf where free; None for ``bounds=None``). Each of lb, ub a number, (P,) or (B, P).
    Raised before anything is evaluated: the wrong shape, NaN, lb >= ub, x0 outside the box."""
    if bounds is None:
        return None
    if not (isinstance(bounds, tuple | list) and len(bounds) == 2):
        raise ConfigurationError(
            f"bounds must be a pair (lb, ub), each a number or one value per parameter, got "
            f"{bounds!r}; use -inf / inf for a side without a bound."
        )
    b, p = x0.shape
    out = []
    for name, v in zip(("lb", "ub"), bounds, strict=True):
        try:
            t = torch.as_tensor(v, dtype=x0.dtype, device=x0.device).detach()
        except (TypeError, ValueError, RuntimeError) as e:
            raise ConfigurationError(
                f"bounds' {name} must be a number or numbers, one per parameter, got {v!r}."
            ) from e
        if t.ndim > 2 or t.shape not in ((), (p,), (1, p), (b, p)):
            rows = f" or one row per problem (B, P) = ({b}, {p})" if b > 1 else ""
            raise ShapeError(
                f"bounds' {name} has shape {tuple(t.shape)}; give a number, one value per "
                f"parameter (P,) = ({p},){rows}."
            )
        if bool(torch.isnan(t).any()):
            raise NonFiniteError(f"bounds' {name} holds NaN; use -inf / inf for no bound.")
        out.append(t.expand(b, p).contiguous())
    lb, ub = out
    if not bool((lb < ub).all()):
        i = (lb >= ub).nonzero()[0].tolist()
        raise ConfigurationError(
            f"each lower bound must be below its upper bound; lb >= ub at {i[1] if b == 1 else i}"
            f" ({float(lb[tuple(i)])} >= {float(ub[tuple(i)])})."
        )
    outside = (x0 < lb) | (x0 > ub)
    if bool(outside.any()):
        i = outside.nonzero()[0].tolist()
        raise ConfigurationError(
            f"x0 is infeasible: x0{[i[1]] if b == 1 else i} = {float(x0[tuple(i)])} lies outside "
            f"its bounds [{float(lb[tuple(i)])}, {float(ub[tuple(i)])}]; start inside the box."
        )
    return lb, ub


def _finite(box: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor] | None:
    """The box, or None when it has no finite bound (then the fit is the unbounded one)."""
    if box is None or not bool((torch.isfinite(box[0]) | torch.isfinite(box[1])).any()):
        return None
    return box


def _on_bounds(x: Tensor, lb: Tensor, ub: Tensor) -> tuple[Tensor, Tensor]:
    """Where x is on its (finite) lower and upper bound, to within 1e-10 max(1, |bound|): the
    held set of the core and scipy's ``active_mask`` use the same rule."""
    at_lo = torch.isfinite(lb) & (x - lb <= RSTEP * lb.abs().clamp(min=1))
    at_hi = torch.isfinite(ub) & (ub - x <= RSTEP * ub.abs().clamp(min=1))
    return at_lo, at_hi


def _active(x: Tensor, lb: Tensor, ub: Tensor) -> Tensor:
    """scipy's ``active_mask``: -1 where x is on its lower bound, 1 on its upper, else 0."""
    at_lo, at_hi = _on_bounds(x, lb, ub)
    zero = torch.zeros(x.shape, dtype=torch.long, device=x.device)
    return torch.where(at_lo, -1, torch.where(at_hi, 1, zero))


def _optimality(x: Tensor, grad: Tensor, lb: Tensor, ub: Tensor) -> Tensor:
    r"""The first-order optimality of the box-constrained problem,
    :math:`\|x - P(x - g)\|_\infty` (P the projection on the box; the uniform norm of the
    gradient where no bound binds)."""
    return (x - torch.clamp(x - grad, lb, ub)).abs().amax(-1)


def _project(x: Tensor, box: tuple[Tensor, Tensor] | None) -> Tensor:
    """x projected on the box (lb, ub) of its rows, or x when there are no bounds: every
    evaluation of fun, the checks' and probes' included, lies in the box."""
    return x if box is None else torch.clamp(x, box[0], box[1])


def _box_rows(box: tuple[Tensor, Tensor] | None, rows: Tensor) -> tuple[Tensor, Tensor] | None:
    """The bounds of the problems ``rows`` of a batch (None without bounds)."""
    return None if box is None else (box[0][rows], box[1][rows])

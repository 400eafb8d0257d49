r"""Martens 2010's additions to CG for :math:`d = -(M + \lambda I)^{-1} g` ("Hessian-free"):
the diagonal preconditioners of section 4.7 and the backtracking over CG iterates of section
4.6. The optimizer computes the diagonal base once per step (it needs the metric) and calls
these per try.

- :func:`preconditioner`: :math:`P = \mathrm{diag}(M) + \lambda` (``"diagonal"``) or
  :math:`P = (\mathrm{diag}(\frac1N\sum_i \nabla l_i \odot \nabla l_i) + \lambda)^\xi`
  (``"empirical-fisher"``, Martens: :math:`\xi = 3/4`), floored at :math:`\sqrt{\text{tiny}}`.
- :func:`keeping_iterates`: a copy of a CG solver that keeps its iterates
  :math:`x_i` at :math:`i = \lceil 1.3^j \rceil`.
- :func:`backtrack_iterates`: going back from the last kept iterate while the loss
  :math:`L(\theta + x_i)` decreases.

Example
-------
>>> solver = keeping_iterates(CG(maxiter=50))
>>> sol = solver.solve(damped, -g, preconditioner=preconditioner("diagonal", diag_m, lam, 0.75))
>>> d = backtrack_iterates(sol, g, trials.loss_at)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import Tensor

from .solvers import CG, Solution

GAMMA = 1.3  # Martens 2010 section 4.6: keep CG iterates at ceil(1.3^j)


def preconditioner(
    kind: str | None, base: Tensor | None, lam: float | Tensor, xi: float
) -> Tensor | None:
    r"""The diagonal of CG's preconditioner for one try: :math:`b + \lambda` for ``"diagonal"``,
    :math:`(b + \lambda)^\xi` for ``"empirical-fisher"`` (b the step's diagonal base, clipped
    at :math:`\sqrt{\text{tiny}}`); None without a preconditioner."""
    if kind is None or base is None:
        return None
    tiny = torch.finfo(base.dtype).tiny ** 0.5
    shifted = (base + lam).clamp_min(tiny)
    return shifted if kind == "diagonal" else shifted.pow(xi)


def keeping_iterates(solver: CG) -> CG:
    r"""A copy of ``solver`` that keeps its iterates at :math:`\lceil 1.3^j \rceil`."""
    solver = copy.copy(solver)
    solver.keep_iterates = tuple(sorted({math.ceil(GAMMA**j) for j in range(80)}))
    return solver


def backtrack_iterates(sol: Solution, g: Tensor, loss_at: Callable[[Tensor], float]) -> Tensor:
    r"""Martens 2010 section 4.6: among the kept CG iterates (descent directions only) and
    the last one, go back from the last while :math:`L(\theta + x_i)` decreases; return the
    best."""
    cands = [sol.iterates[k] for k in sorted(sol.iterates)]
    if not cands or not torch.equal(cands[-1], sol.x):
        cands.append(sol.x)
    cands = [c for c in cands if float(g @ c) < 0] or [sol.x]
    best, best_loss = cands[-1], loss_at(cands[-1])
    for cand in reversed(cands[:-1]):
        value = loss_at(cand)
        if not value < best_loss:
            break
        best, best_loss = cand, value
    return best

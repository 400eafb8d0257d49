r"""Solvers for the damped system :math:`(M + \lambda I)\,x = b` (b = -g gives the direction).

- :class:`Cholesky`: dense, exact; refuses an indefinite or singular matrix with a clear error,
  or clips eigenvalues when asked (``indefinite="clip"``).
- :class:`CG`: matrix-free conjugate gradient (Hestenes-Stiefel) with Steihaug-Toint stopping
  at negative curvature, warm start, diagonal preconditioner and Martens' relative-progress
  rule (Martens 2010, section 4.4).
- :class:`Woodbury`: exact solve in sample space for :math:`M = U^T U / n` with U (R, P), R < P:
  :math:`(U^T U/n + \lambda I)^{-1} b = \frac1\lambda(b - U^T(n\lambda I + U U^T)^{-1} U b)`.
- :class:`Auto`: Woodbury when the metric has a factor with fewer rows than parameters (and
  lambda > 0), else Cholesky for small P, else CG (always CG for an indefinite metric).

A damped operator may carry a diagonal damping diag(s) instead of lambda I (the
:math:`\lambda D^2` of :class:`~steepest.damping.MoreTrustRegion`); every solver handles it.

Every solver returns a :class:`Solution` saying what happened.

Example
-------
>>> sol = CG(tol=1e-8).solve(M + 1e-3, -point.grad)
>>> sol.x, sol.iterations, sol.residual, sol.negative_curvature
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import linop
from .errors import ConfigurationError, SingularMatrixError, SolverError, all_finite
from .linop import Factor, LinearOperator, eigh


@dataclass
class Solution:
    """What a solver returned: ``x`` and how it got there (scipy-style)."""

    x: Tensor
    iterations: int
    residual: float  # ||A x - b|| / ||b||
    negative_curvature: bool = False
    exact: bool = False  # solved to machine precision by a direct method
    message: str = ""
    iterates: dict[int, Tensor] = field(default_factory=dict)  # CG iterates kept on request


def _relres(a: LinearOperator, x: Tensor, b: Tensor) -> float:
    bn = float(b.norm())
    return float((a.matvec(x) - b).norm()) / bn if bn > 0 else float(x.norm())


class Solver:
    name = "solver"

    def solve(self, a: LinearOperator, b: Tensor, x0: Tensor | None = None) -> Solution:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Cholesky(Solver):
    r"""Dense exact solve by Cholesky factorisation of :math:`M + \lambda I`.

    Parameters
    ----------
    indefinite: ``"raise"`` (default) refuses a matrix that is not positive definite;
        ``"clip"`` solves with the eigen-decomposition, eigenvalues replaced by
        ``max(|mu|, clip_floor * max|mu|)`` (the "saddle-free" absolute value), and says so.
    limit: the largest P for the dense matrix (default :data:`steepest.linop.DENSE_LIMIT`).

    >>> Cholesky().solve(M + 1e-3, -g).x
    """

    name = "Cholesky"

    def __init__(
        self, indefinite: str = "raise", clip_floor: float = 1e-8, limit: int | None = None
    ) -> None:
        if indefinite not in ("raise", "clip"):
            raise ConfigurationError(
                f"Cholesky: indefinite must be 'raise' or 'clip', got {indefinite!r}."
            )
        self.indefinite, self.clip_floor, self.limit = indefinite, clip_floor, limit

    def solve(self, a: LinearOperator, b: Tensor, x0: Tensor | None = None) -> Solution:
        m = a.to_dense(self.limit)
        chol, info = torch.linalg.cholesky_ex(m)
        if int(info) == 0:
            # a factorisation can succeed on a singular matrix thanks to rounding (a pivot of
            # the order of eps ||M||): treat a pivot at rounding level of its own diagonal
            # entry as singular (relative to each entry, so badly scaled regular matrices pass)
            piv = chol.diagonal().pow(2)
            eps = torch.finfo(m.dtype).eps
            if bool((piv <= eps * m.diagonal().abs()).any()):
                info = torch.ones((), dtype=torch.int32)
        if int(info) == 0:
            x = torch.cholesky_solve(b.unsqueeze(1), chol).squeeze(1)
            if torch.isfinite(x).all():
                return Solution(x, 1, _relres(a, x, b), exact=True, message="Cholesky")
        if self.indefinite == "clip":
            mu, q = eigh(m, a.name)
            floor = self.clip_floor * float(mu.abs().max().clamp_min(1e-300))
            clipped = mu.abs().clamp_min(floor)
            x = q @ ((q.T @ b) / clipped)
            n_neg = int((mu <= 0).sum())
            return Solution(
                x,
                1,
                _relres(a, x, b),
                negative_curvature=n_neg > 0,
                exact=False,
                message=f"eigenvalue clipping: {n_neg} eigenvalues <= 0 replaced "
                f"by |mu| (floor {floor:.3g})",
            )
        try:
            mu = torch.linalg.eigvalsh(m)
            seen = f"smallest eigenvalue {float(mu[0]):.3g}, largest {float(mu[-1]):.3g}"
        except torch.linalg.LinAlgError:
            seen = "its eigenvalues did not converge either"
        raise SingularMatrixError(
            f"{a.name} is singular or not positive definite ({seen}), so Cholesky "
            "cannot solve it; add damping (damping=1e-3 or more), use CG() which stops at "
            "negative curvature, or Cholesky(indefinite='clip')."
        )


class CG(Solver):
    r"""Conjugate gradient on :math:`A x = b`, A = M + lambda I, using products only.

    Stops when :math:`\|r\| \le tol \|b\|`, after ``maxiter`` iterations, at negative or zero
    curvature :math:`p^T A p \le 0` (Steihaug-Toint: the last iterate, or b itself on the first
    iteration, is returned, always a direction with :math:`b^T x > 0`), or, with
    ``progress_tol``, by Martens' rule on the quadratic :math:`\phi(x) = \frac12 x^TAx - b^Tx`:
    stop at iteration i > k = max(10, 0.1 i) when
    :math:`\phi(x_i) < 0` and :math:`(\phi(x_i) - \phi(x_{i-k}))/\phi(x_i) < k\,`progress_tol.

    Parameters
    ----------
    tol: relative residual tolerance
    maxiter: iteration limit (default: P, the exact-arithmetic bound, capped at 250 when P is
        large)
    progress_tol: Martens' epsilon (5e-4 in Martens 2010), or None
    preconditioner: a vector P (diagonal of a matrix approximating A; the solve uses its
        inverse), or None
    keep_iterates: iteration indices whose iterates to keep (for CG-iterate backtracking);
        the final iterate is always in ``Solution.x``.

    >>> CG(tol=1e-6, maxiter=50).solve(M + 1e-3, -g)
    """

    name = "CG"

    def __init__(
        self,
        tol: float = 1e-10,
        maxiter: int | None = None,
        progress_tol: float | None = None,
        preconditioner: Tensor | None = None,
        keep_iterates: tuple[int, ...] = (),
    ) -> None:
        if not (isinstance(tol, int | float) and tol >= 0) or (maxiter is not None and not (
                isinstance(maxiter, int) and not isinstance(maxiter, bool) and maxiter >= 1)):
            raise ConfigurationError(
                f"CG: tol must be >= 0 and maxiter >= 1, got tol={tol!r}, maxiter={maxiter!r}."
            )
        self.tol, self.maxiter, self.progress_tol = tol, maxiter, progress_tol
        self.preconditioner = preconditioner
        self.keep_iterates = tuple(keep_iterates)

    def __repr__(self) -> str:
        return f"CG(tol={self.tol}, maxiter={self.maxiter})"

    def solve(
        self,
        a: LinearOperator,
        b: Tensor,
        x0: Tensor | None = None,
        preconditioner: Tensor | None = None,
    ) -> Solution:
        n = a.size
        maxiter = self.maxiter or (n if n <= 250 else 250)
        pre = preconditioner if preconditioner is not None else self.preconditioner
        if pre is not None and not (pre > 0).all():
            raise ConfigurationError("CG: the diagonal preconditioner must be positive.")
        bnorm = float(b.norm())
        if bnorm == 0:
            return Solution(torch.zeros_like(b), 0, 0.0, message="b = 0")
        x = torch.zeros_like(b) if x0 is None else x0.clone()
        r = b - a.matvec(x) if x0 is not None else b.clone()
        zv = r / pre if pre is not None else r
        p = zv.clone()
        rz = float(r @ zv)
        phis: list[float] = [float(0.5 * x @ (b - r) - b @ x) if x0 is not None else 0.0]
        iterates: dict[int, Tensor] = {}
        neg, msg, i = False, "maxiter reached", 0
        for i in range(1, maxiter + 1):
            ap = a.matvec(p)
            pap = float(p @ ap)
            if not math.isfinite(pap):
                raise SolverError(
                    f"CG: a matrix-vector product returned a non-finite value at iteration "
                    f"{i}; the metric is not finite at these parameters."
                )
            if pap <= 0:
                neg = True
                if i == 1 and x0 is None:
                    x = p.clone()  # Steihaug: the (preconditioned) steepest-descent direction
                elif float(b @ x) <= 0:
                    x = zv.clone() if pre is not None else r.clone()
                    if float(b @ x) <= 0:  # warm start: r = b - A x0 need not descend
                        x = b / pre if pre is not None else b.clone()
                msg = f"negative curvature p^T A p = {pap:.3g} at iteration {i}"
                i -= 1
                break
            alpha = rz / pap
            x = x + alpha * p
            r = r - alpha * ap
            if i in self.keep_iterates:
                iterates[i] = x.clone()
            if float(r.norm()) <= self.tol * bnorm:
                msg = "converged"
                break
            if self.progress_tol is not None:
                phis.append(float(0.5 * x @ (b - r) - b @ x))  # phi = 1/2 x^T A x - b^T x
                k = max(10, int(0.1 * i))
                if (
                    i > k
                    and phis[-1] < 0
                    and (phis[-1] - phis[-1 - k]) / phis[-1] < k * self.progress_tol
                ):
                    msg = "relative progress below tolerance (Martens)"
                    break
            zv = r / pre if pre is not None else r
            rz_new = float(r @ zv)
            p = zv + (rz_new / rz) * p
            rz = rz_new
        # the recursive residual r drifts from b - A x in low precision (float32): report the
        # true one, at the cost of one more product
        res = _relres(a, x, b)
        if msg == "converged" and res > 10 * self.tol:
            msg = (
                f"converged in the recursive residual, but the true relative residual is "
                f"{res:.3g} > tol={self.tol:g}: the limit of {b.dtype} precision for this "
                "system; loosen tol, add damping or use float64"
            )
        return Solution(x, i, res, negative_curvature=neg, message=msg, iterates=iterates)


class Woodbury(Solver):
    r"""Exact solve in sample space for metrics :math:`M = \frac1n U^T U` (U: R x P):
    :math:`(M + \lambda I)^{-1} b = \frac1\lambda\,(b - U^T (n\lambda I_R + U U^T)^{-1} U b)`;
    with a diagonal damping :math:`A = \mathrm{diag}(s)` (a scaled trust region),
    :math:`(M + A)^{-1} b = A^{-1}b - A^{-1}U^T (n I_R + U A^{-1} U^T)^{-1} U A^{-1} b`.
    Costs one R x R Cholesky instead of P x P: the case of small batches on big models. Needs
    :math:`\lambda > 0` and a metric with a factor (GaussNewton, GGN of a convex loss, Fisher,
    EmpiricalFisher, GradientCovariance).

    >>> Woodbury().solve(GGN().operator(point) + 1e-3, -g)
    """

    name = "Woodbury"

    def solve(
        self, a: LinearOperator, b: Tensor, x0: Tensor | None = None, factor: Factor | None = None
    ) -> Solution:
        if not a.has_factor() and factor is None:
            raise ConfigurationError(
                f"Woodbury: {a.name} has no sample-space factor U (M = U^T U / n); use "
                "Cholesky() or CG() for this metric."
            )
        lam = a.shift
        if not a.damping_positive():
            shown = f"min {float(lam.min()):.3g}" if a.diagonal_shift() else f"{lam}"
            raise SingularMatrixError(
                f"Woodbury needs damping lambda > 0 (got {shown}); with lambda = 0 the matrix "
                "U^T U / n has rank at most R and is singular; set damping > 0."
            )
        f = factor or a.factor()
        u, n = f.U, f.n
        eye = torch.eye(u.shape[0], dtype=u.dtype, device=u.device)
        if a.diagonal_shift():  # M + diag(s): A^-1 b - A^-1 U^T (n I + U A^-1 U^T)^-1 U A^-1 b
            us = u / lam
            chol, info = torch.linalg.cholesky_ex(us @ u.T + n * eye)
            if int(info) != 0:
                raise SingularMatrixError("Woodbury: the sample-space matrix is not positive "
                                          "definite in this precision; raise the damping.")
            x = b / lam - us.T @ torch.cholesky_solve((us @ b).unsqueeze(1), chol).squeeze(1)
            return Solution(x, 1, _relres(a, x, b), exact=True,
                            message=f"Woodbury, R={u.shape[0]}")
        chol, info = torch.linalg.cholesky_ex(f.gram() + n * lam * eye)
        if int(info) != 0:
            raise SingularMatrixError("Woodbury: the sample-space matrix is not positive definite "
                                          "in this precision; raise the damping.")
        x = (b - u.T @ torch.cholesky_solve((u @ b).unsqueeze(1), chol).squeeze(1)) / lam
        return Solution(x, 1, _relres(a, x, b), exact=True, message=f"Woodbury, R={u.shape[0]}")


class OwnInverse(Solver):
    r"""The operator's own inverse: :math:`(M + \lambda I)^{-1} b` from a structure M knows
    (a diagonal, K-FAC's per-block eigendecompositions), at the cost of a few small dense
    products instead of a P x P factorisation or CG iterations.

    >>> OwnInverse().solve(KFAC().operator(point) + 1e-3, -g)
    """

    name = "OwnInverse"

    def solve(self, a: LinearOperator, b: Tensor, x0: Tensor | None = None) -> Solution:
        if not a.has_inverse():
            raise ConfigurationError(
                f"OwnInverse: {a.name} carries no inverse of its own for this damping; use "
                "Auto(), Cholesky() or CG()."
            )
        x = a.solve(b)
        if not all_finite(x):
            raise SingularMatrixError(
                f"{a.name} is singular at this damping (its own inverse gave non-finite "
                "values); add damping (damping=1e-3 or more)."
            )
        if a.inverse_exact and a.has_sketch():  # exact by construction: no residual product
            return Solution(x, 1, a.sketched_residual(x, b), exact=True,
                            message=f"own inverse of {a.name} (residual sketched)")
        return Solution(x, 1, _relres(a, x, b), exact=a.inverse_exact,
                        message=f"own inverse of {a.name}")


class Auto(Solver):
    r"""Chooses per step: the operator's own inverse when it has one (:class:`OwnInverse`:
    Diagonal, KFAC, EKFAC); else Woodbury when M has a sample-space factor with fewer rows than
    parameters (R < P, known from ``factor_rows`` without building it) and lambda > 0 (below
    float64 only when P > ``dense_max``: its 1/lambda cancellation loses accuracy); else
    Cholesky when P <= ``dense_max`` (default 2000) and M is PSD or damped; a small M that may
    be indefinite (the Hessian) gets the dense route too, ``Cholesky(indefinite="clip")`` (the
    eigen-decomposition with :math:`|\mu|` for the eigenvalues when the factorisation fails),
    rather than CG, which truncates at negative curvature; else CG.

    Woodbury costs :math:`O(R^2 P)` per step against :math:`O(R P^2 + P^3)` for the dense
    Cholesky: on a full-batch regression with N = 512 samples and P = 1249 parameters the
    step is several times cheaper (benchmarks/training.md).

    >>> Auto().choose(M + 1e-3)
    """

    name = "auto"

    def __init__(self, dense_max: int = 2000, cg: CG | None = None) -> None:
        self.dense_max = dense_max
        self.cg = cg or CG(tol=1e-8)

    def choose(self, a: LinearOperator) -> Solver:
        if a.has_inverse() and a.psd:
            return OwnInverse()
        small = a.size <= min(self.dense_max, linop.DENSE_LIMIT)
        if not a.psd:
            return Cholesky(indefinite="clip") if small else self.cg
        rows = a.factor_rows if a.has_factor() else None
        positive = a.damping_positive()
        # below float64 a small lambda makes Woodbury's 1/lambda cancellation inaccurate, where
        # Cholesky refuses: there Woodbury is taken only when the dense matrix is too large
        precise = a.dtype == torch.float64 or not small
        if rows is not None and rows < a.size and positive and precise:
            return Woodbury()
        if small:
            return Cholesky()
        return self.cg

    def solve(self, a: LinearOperator, b: Tensor, x0: Tensor | None = None) -> Solution:
        return self.choose(a).solve(a, b, x0)


def as_solver(solver: Solver | str) -> Solver:
    """A solver from an instance or a name: 'auto', 'cholesky', 'cg', 'woodbury'."""
    if isinstance(solver, Solver):
        return solver
    table = {"auto": Auto, "cholesky": Cholesky, "cg": CG, "woodbury": Woodbury,
             "own": OwnInverse}
    if isinstance(solver, str) and solver.lower() in table:
        return table[solver.lower()]()
    raise ConfigurationError(
        f"unknown solver {solver!r}; use one of {sorted(table)} or a steepest.solvers.Solver."
    )

r"""Symmetric linear operators on the flat parameter vector.

A :class:`LinearOperator` wraps a matrix-vector product ``v -> M v`` (never the matrix), and
optionally a cheaper batched product, a dense builder, a diagonal and a sample-space factor
``U`` with ``M = U^T U / n`` (used by the Woodbury solver). ``to_dense()`` refuses above a
size limit (:data:`DENSE_LIMIT`, default 20,000 parameters) with an error naming the limit and
the matrix-free alternative. ``to_scipy()`` adapts it to ``scipy.sparse.linalg``.

Example
-------
>>> A = LinearOperator(lambda v: 2 * v, size=3, dtype=torch.float64)
>>> (A + 1.0) @ torch.ones(3, dtype=torch.float64)     # (A + lambda I) v
tensor([3., 3., 3.], dtype=torch.float64)
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .errors import DenseTooLargeError, ShapeError, SingularMatrixError

DENSE_LIMIT = 20_000
"""Largest dimension for which ``to_dense()`` builds a matrix, unless told otherwise."""


def set_dense_limit(n: int) -> None:
    """Change the default size limit of ``to_dense()`` (the number of parameters)."""
    global DENSE_LIMIT
    DENSE_LIMIT = int(n)


@dataclass
class Factor:
    """Sample-space factor of a metric: ``M = U^T U / n``, U of shape (R, P)."""

    U: Tensor
    n: int

    def gram(self) -> Tensor:
        """``U U^T`` (R x R), computed once (a damped retry reuses it)."""
        if not hasattr(self, "_gram"):
            self._gram = self.U @ self.U.T
        return self._gram


class LinearOperator:
    """A symmetric linear operator M of size P x P, known through its products.

    Parameters
    ----------
    matvec: v (P,) -> M v (P,)
    size: P
    matmat: optional V (P, k) -> M V (P, k), a batched product
    dense: optional () -> M as a (P, P) tensor; by default U^T U / n from the factor when there
        is one, else column by column from the products
    diagonal: optional () -> diag(M) (P,)
    factor: optional () -> :class:`Factor` with M = U^T U / n
    factor_rows: the row count R of that factor when known without building it (lets
        :class:`~steepest.solvers.Auto` choose Woodbury for R < P at no cost)
    psd: whether M is known to be positive semi-definite
    name: what M is, for messages
    inverse: optional ``(b, shift) -> (M + shift)^-1 b``, the operator's own fast inverse
        (a diagonal, per-block eigendecompositions), shift a float lambda or, when
        ``inverse_diagonal``, a (P,) diagonal; :class:`~steepest.solvers.Auto` uses it first
    inverse_exact: whether that inverse is exact (False for an approximate inverse such as
        K-FAC's factored damping)
    inverse_diagonal: whether it accepts a diagonal damping diag(s) as well as lambda I
    sketch: optional ``() -> (U, MU)``: k Gaussian probe vectors U (k, P) and M U^T as rows
        (k, P), both float64, that the metric keeps while M stays (K-FAC: between
        eigendecompositions), for :meth:`sketched_residual`
    """

    def __init__(
        self,
        matvec: Callable[[Tensor], Tensor],
        size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        *,
        matmat: Callable[[Tensor], Tensor] | None = None,
        dense: Callable[[], Tensor] | None = None,
        diagonal: Callable[[], Tensor] | None = None,
        factor: Callable[[], Factor] | None = None,
        factor_rows: int | None = None,
        psd: bool = True,
        name: str = "M",
        inverse: Callable[[Tensor, float | Tensor], Tensor] | None = None,
        inverse_exact: bool = True,
        inverse_diagonal: bool = False,
        sketch: Callable[[], tuple[Tensor, Tensor]] | None = None,
    ) -> None:
        self._matvec = matvec
        self._matmat = matmat
        self._dense = dense
        self._diagonal = diagonal
        self._factor = factor
        self.factor_rows = factor_rows if factor is not None else None
        self.size = int(size)
        self.dtype = dtype
        self.device = torch.device(device)
        self.psd = psd
        self.name = name
        self._inverse = inverse
        self.inverse_exact = inverse_exact
        self.inverse_diagonal = inverse_diagonal
        self._sketch = sketch
        self._inverse_shift: float | Tensor | None = None  # the damping an inverse is for
        # the damping of M + lambda I (a float) or of M + diag(s) (a (P,) tensor, e.g. the
        # lambda D^2 of a scaled trust region); a damped operator records it
        self.shift: float | Tensor = 0.0
        # dense matrix, factor and diagonal of the undamped M, shared by its damped copies
        # (add_diagonal copies shallowly), so a retry with another lambda rebuilds nothing
        self._cache: dict[str, object] = {}

    # ----------------------------------------------------------------------------- products
    @property
    def shape(self) -> tuple[int, int]:
        return (self.size, self.size)

    def matvec(self, v: Tensor) -> Tensor:
        """``M v`` for a vector of size P."""
        if v.shape != (self.size,):
            raise ShapeError(
                f"{self.name}: expected a vector of shape ({self.size},), got {tuple(v.shape)}."
            )
        out = self._matvec(v)
        return out + self.shift * v if self.is_damped() else out

    def matmat(self, V: Tensor) -> Tensor:
        """``M V`` for a matrix of columns (P, k)."""
        if V.ndim != 2 or V.shape[0] != self.size:
            raise ShapeError(
                f"{self.name}: expected a matrix of shape ({self.size}, k), got {tuple(V.shape)}."
            )
        out = self._base_matmat(V)
        if not self.is_damped():
            return out
        return out + (self.shift[:, None] if self.diagonal_shift() else self.shift) * V

    def _base_matmat(self, V: Tensor) -> Tensor:
        if self._matmat is not None:
            return self._matmat(V)
        return torch.stack([self._matvec(V[:, j]) for j in range(V.shape[1])], 1)

    def __matmul__(self, v: Tensor) -> Tensor:
        return self.matvec(v) if v.ndim == 1 else self.matmat(v)

    def is_damped(self) -> bool:
        """Whether a damping term (a nonzero float or a diagonal) is added to M."""
        return isinstance(self.shift, Tensor) or self.shift != 0

    def diagonal_shift(self) -> bool:
        """Whether the damping is a diagonal matrix diag(s) rather than lambda I."""
        return isinstance(self.shift, Tensor)

    def damping_positive(self) -> bool:
        """Whether the damping (lambda or every entry of diag(s)) is > 0."""
        return bool((self.shift > 0).all()) if self.diagonal_shift() else self.shift > 0

    def damping_quad(self, v: Tensor) -> float:
        """:math:`v^T S v` for the damping S (lambda I or diag(s)): M + S minus M, on v."""
        return float(v @ (self.shift * v))

    def has_inverse(self) -> bool:
        """Whether M carries its own inverse for the current damping (lambda I, or diag(s)
        where the inverse accepts a diagonal)."""
        if self._inverse_shift is not None and self.shift is not self._inverse_shift:
            return False  # an inverse made for one damping (with_inverse), now another
        return self._inverse is not None and (self.inverse_diagonal or not self.diagonal_shift())

    def has_sketch(self) -> bool:
        """Whether :meth:`sketched_residual` is available (probes kept by the metric)."""
        return self._sketch is not None

    def sketched_residual(self, x: Tensor, b: Tensor) -> float:
        r"""An estimate of the relative residual :math:`\|(M + S)x - b\| / \|b\|` at
        O(kP) without a product: with the metric's k Gaussian probes :math:`u_j` and
        :math:`M u_j` (kept while M stays), :math:`u_j^T r = (M u_j + S u_j)^T x - u_j^T b`
        in float64, and :math:`E[(u^T r)^2] = \|r\|^2`, so
        :math:`(\mathrm{mean}_j (u_j^T r)^2)^{1/2}` estimates :math:`\|r\|` (for k = 2
        within a factor 10 of it with probability 0.99). For an own inverse that is exact by
        construction (K-FAC's eigenbasis), this replaces the product of the residual check.

        >>> op.sketched_residual(op.solve(b), b)  # rounding level
        """
        U, MU = self._sketch()
        xd, bd = x.detach().double(), b.detach().double()
        sx = self.shift.double() * xd if self.diagonal_shift() else self.shift * xd
        r = torch.mv(MU, xd) + torch.mv(U, sx - bd)  # no (k, P) temporary
        bn = float(bd.norm())
        return float(r.square().mean().sqrt()) / (bn if bn > 0 else 1.0)

    def solve(self, b: Tensor) -> Tensor:
        """:math:`(M + S)^{-1} b` by the operator's own inverse, S the damping."""
        if not self.has_inverse():
            raise NotImplementedError(f"{self.name} has no own inverse for this damping")
        return self._inverse(b, self.shift)

    def has_factor(self) -> bool:
        return self._factor is not None

    def factor(self) -> Factor:
        """The sample-space factor U with ``M = U^T U / n`` (raises if M has none)."""
        if self._factor is None:
            raise NotImplementedError(f"{self.name} has no sample-space factor")
        if "factor" not in self._cache:
            self._cache["factor"] = self._factor()
        return self._cache["factor"]

    # ----------------------------------------------------------------------------- matrices
    def to_dense(self, limit: int | None = None) -> Tensor:
        """The dense P x P matrix; refuses above ``limit`` (default :data:`DENSE_LIMIT`)."""
        limit = DENSE_LIMIT if limit is None else limit
        if self.size > limit:
            raise DenseTooLargeError(
                f"{self.name}: a dense matrix of {self.size} x {self.size} exceeds the limit of "
                f"{limit} parameters ({self.size**2 * 8 / 2**30:.1f} GiB in float64); use a "
                "matrix-free solver (solver=CG()) or raise the limit with "
                "steepest.linop.set_dense_limit(n) / to_dense(limit=n)."
            )
        if "dense" in self._cache:
            m = self._cache["dense"]
        else:
            if self._dense is not None:
                m = self._dense()
            elif self._factor is not None:
                f = self.factor()
                m = f.U.T @ f.U / f.n
            else:
                eye = torch.eye(self.size, dtype=self.dtype, device=self.device)
                chunk = max(1, min(self.size, 256))
                cols = range(0, self.size, chunk)
                m = torch.cat([self._base_matmat(eye[:, i : i + chunk]) for i in cols], 1)
            m = 0.5 * (m + m.T)
            self._cache["dense"] = m
        if self.diagonal_shift():
            m = m + torch.diag(self.shift)
        elif self.shift:
            m = m + self.shift * torch.eye(self.size, dtype=m.dtype, device=m.device)
        return m

    def diagonal(self) -> Tensor:
        """diag(M) as a vector of size P (read from the dense M or its factor when one was
        already formed)."""
        if "dense" in self._cache:
            d = self._cache["dense"].diagonal()
        elif "factor" in self._cache:
            f = self._cache["factor"]
            d = f.U.pow(2).sum(0) / f.n
        elif self._diagonal is not None:
            d = self._diagonal()
        elif self._factor is not None:
            f = self.factor()
            d = f.U.pow(2).sum(0) / f.n
        else:
            eye = torch.eye(self.size, dtype=self.dtype, device=self.device)
            chunk = 256
            parts = []
            for i in range(0, self.size, chunk):
                cols = self._base_matmat(eye[:, i : i + chunk])
                parts.append(cols[i : i + chunk].diagonal())
            d = torch.cat(parts)
        return d + self.shift

    # ----------------------------------------------------------------------------- algebra
    def add_diagonal(self, lam: float | Tensor) -> LinearOperator:
        r"""``M + lam I`` (Tikhonov damping) or, for a (P,) tensor s, ``M + diag(s)`` (scaled
        damping, e.g. :math:`\lambda D^2`), as a new operator; the factor of M is kept."""
        op = copy.copy(self)
        if isinstance(lam, Tensor):
            if lam.shape != (self.size,):
                raise ShapeError(
                    f"{self.name}: a diagonal damping needs shape ({self.size},), "
                    f"got {tuple(lam.shape)}."
                )
            op.shift = self.shift + lam.to(self.dtype)
            op.psd = self.psd and bool((lam >= 0).all())
            op.name = f"{self.name} + diag(s)"
            return op
        lam = float(lam)
        op.shift = self.shift + lam
        op.psd = self.psd and lam >= 0
        op.name = self.name if lam == 0 else f"{self.name} + {lam:g} I"
        return op

    def plus_diagonal(self, eta: Tensor, name: str | None = None) -> LinearOperator:
        r""":math:`M' = M + \mathrm{diag}(\eta)` as a new operator whose *own* term is
        :math:`\mathrm{diag}(\eta)` (the curvature of an L2 term
        :math:`\tfrac12\sum_j\eta_j\theta_j^2`: part of M, not damping, so
        :meth:`damping_quad` and a later :meth:`add_diagonal` do not see it).

        Products, ``to_dense()`` and ``diagonal()`` follow; the sample-space factor is
        dropped (:math:`M'` is no :math:`U^TU/n`). The own inverse is kept where it stays
        the inverse of :math:`M'`, for any later damping S:

        - an inverse that accepts a diagonal damping (``inverse_diagonal``, e.g.
          :class:`~steepest.diagonal.Diagonal`): :math:`(M' + S)^{-1} b`
          = ``inverse(b, S + eta)`` for any :math:`\eta`;
        - an inverse for :math:`\lambda I` only (K-FAC's and EKFAC's per-block
          eigendecompositions): when :math:`\eta = e\mathbf 1` is uniform,
          :math:`(M' + \lambda I)^{-1} b` = ``inverse(b, lambda + e)``; for a
          non-uniform :math:`\eta` (different weight decays per parameter group) a
          Kronecker block with :math:`\mathrm{diag}(\eta)` added has no Kronecker
          eigenbasis, so :math:`M'` carries no inverse and the solver falls back to
          Cholesky or CG.

        An inverse made for one damping only (:meth:`with_inverse`) is not kept. The residual
        sketch follows: :math:`M' U^T = M U^T + \mathrm{diag}(\eta) U^T`.

        >>> wd = (KFAC().operator(point)).plus_diagonal(torch.full((P,), 1e-4))
        >>> (wd + 1e-3).solve(b)          # (M + 1e-4 I + 1e-3 I)^-1 b by K-FAC's inverse
        """
        if eta.shape != (self.size,):
            raise ShapeError(
                f"{self.name}: a diagonal term needs shape ({self.size},), got {tuple(eta.shape)}."
            )
        eta = eta.to(self.dtype)
        base = self  # products include this operator's own damping, if any
        total = eta + self.shift  # the diagonal added to the undamped M
        # one host synchronisation: is the diagonal uniform, is it >= 0, its first entry
        uniform, nonneg, e = torch.stack(
            ((total == total[0]).all().to(total.dtype), (eta >= 0).all().to(total.dtype), total[0])
        ).tolist()
        inverse = None
        if self._inverse is not None and self._inverse_shift is None:
            own = self._inverse
            if uniform:  # the cheaper scalar shift e, also for a diagonal inverse

                def inverse(b: Tensor, s: float | Tensor) -> Tensor:
                    return own(b, s + e)
            elif self.inverse_diagonal:

                def inverse(b: Tensor, s: float | Tensor) -> Tensor:
                    return own(b, s + total)

        sketch = None
        if self._sketch is not None:
            probes = self._sketch

            def sketch() -> tuple[Tensor, Tensor]:
                u, mu = probes()
                return u, mu + u * total.double()

        return LinearOperator(
            lambda v: base.matvec(v) + eta * v,
            self.size,
            self.dtype,
            self.device,
            matmat=lambda V: base.matmat(V) + eta[:, None] * V,
            dense=lambda: base.to_dense() + torch.diag(eta),
            diagonal=lambda: base.diagonal() + eta,
            psd=self.psd and bool(nonneg),
            name=name or f"{self.name} + diag(eta)",
            inverse=inverse,
            inverse_exact=self.inverse_exact,
            inverse_diagonal=inverse is not None and self.inverse_diagonal,
            sketch=sketch,
        )

    def with_inverse(
        self, inverse: Callable[[Tensor, float | Tensor], Tensor], exact: bool = True
    ) -> LinearOperator:
        r"""This operator, damping included, with its own inverse ``inverse(b, shift)`` =
        :math:`(M + S)^{-1} b` for its present damping S only (a copy; the caches are shared;
        a further :meth:`add_diagonal` drops the inverse). For a rule that has already
        decomposed :math:`M + S` for this damping, so that
        :class:`~steepest.solvers.Auto` solves with that decomposition.

        >>> damped = op.add_diagonal(lam * d**2).with_inverse(lambda b, s: ...)
        """
        op = copy.copy(self)
        op._inverse, op.inverse_exact, op.inverse_diagonal = inverse, exact, True
        op._inverse_shift = self.shift  # valid for this damping only (not after add_diagonal)
        return op

    def __add__(self, lam: float) -> LinearOperator:
        if isinstance(lam, int | float):
            return self.add_diagonal(lam)
        return NotImplemented

    __radd__ = __add__

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 numpy in and out)."""
        from scipy.sparse.linalg import LinearOperator as ScipyOp

        def mv(x: np.ndarray) -> np.ndarray:
            v = torch.as_tensor(np.asarray(x).reshape(-1), dtype=self.dtype, device=self.device)
            return self.matvec(v).detach().cpu().double().numpy()

        def mm(X: np.ndarray) -> np.ndarray:
            V = torch.as_tensor(np.asarray(X), dtype=self.dtype, device=self.device)
            return self.matmat(V).detach().cpu().double().numpy()

        return ScipyOp(self.shape, matvec=mv, rmatvec=mv, matmat=mm, rmatmat=mm, dtype=np.float64)

    def __repr__(self) -> str:
        return f"LinearOperator({self.name}, shape={self.shape}, dtype={self.dtype})"


def eigh(m: Tensor, name: str = "M") -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh``, whose failure to converge (badly scaled float32 matrices) is a
    :class:`~steepest.errors.SingularMatrixError`, which adaptive damping answers by raising
    lambda and solving again."""
    try:
        return torch.linalg.eigh(m)
    except torch.linalg.LinAlgError as err:
        raise SingularMatrixError(
            f"the eigendecomposition of {name} ({m.shape[0]} x {m.shape[0]}, {m.dtype}) failed "
            f"to converge ({str(err).splitlines()[0]}); the matrix is badly scaled: raise the "
            "damping, use LevenbergMarquardt() (which retries with a larger lambda) or float64."
        ) from err

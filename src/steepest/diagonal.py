r"""Diagonal approximations of the rows of Table 1, to a power (Martens 2020, section 11).

``Diagonal(base, power=xi)`` is the metric

.. math:: M = \mathrm{diag}(m)^{\xi}, \qquad m = \mathrm{diag}(M_{base}),

the exact diagonal of any row of Table 1 (``GGN()``, ``Fisher()``, ``EmpiricalFisher()``, ...)
or, with ``mc_samples=k``, Hutchinson's unbiased estimate
:math:`m \approx \frac1k\sum_j v_j \odot M_{base} v_j` from Rademacher probes :math:`v_j`
(matrix-free: k products of the base). Martens (section 11.2-11.3) discusses these
approximations and the power :math:`\xi`: the Adam/RMSprop family is the diagonal of the
empirical Fisher at :math:`\xi = 1/2`. The operator carries its own inverse,
:math:`(M + \lambda I)^{-1} b = b / (m^\xi + \lambda)`, which ``solver="auto"`` uses.

Example
-------
>>> opt = Optimizer(model, CrossEntropy(), metric=Diagonal(EmpiricalFisher(), power=0.5),
...                 damping=1e-8, step=1e-3)
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import ConfigurationError
from .linop import LinearOperator
from .metrics import GGN, Metric
from .point import Point


class Diagonal(Metric):
    r"""The diagonal of a Table 1 row to the power :math:`\xi` (Martens 2020, 11.2-11.3):
    :math:`M = \mathrm{diag}(\mathrm{diag}(M_{base}))^{\xi}`.

    Parameters
    ----------
    base: the metric whose diagonal is taken (default ``GGN()``); any row of Table 1
    power: :math:`\xi > 0`; 1 is the plain diagonal, 1/2 the Adam/RMSprop family for
        ``base=EmpiricalFisher()``. For :math:`\xi \ne 1` negative entries (an indefinite base
        such as ``Hessian()``, or Monte-Carlo noise) are clipped at 0 first.
    mc_samples: None for the exact diagonal (from the base's ``diagonal()``: per-sample
        Jacobians), or k for Hutchinson's estimate from k Rademacher probes drawn with the
        point's generator (k products of the base, no per-sample work).

    Examples
    --------
    >>> M = Diagonal(GGN()).operator(point)            # diag of the GGN
    >>> M.diagonal(), M.solve(g)                       # its own inverse
    >>> adam_like = Diagonal(EmpiricalFisher(), power=0.5)
    """

    name = "Diagonal"
    # the diagonal is reduced over ranks before the power (Point.mean_over_ranks), so the
    # operator is already the whole batch's: the optimizer does not reduce its products again
    reduces_over_ranks = True

    def __init__(
        self, base: Metric | None = None, power: float = 1.0, mc_samples: int | None = None
    ) -> None:
        base = GGN() if base is None else base
        if not isinstance(base, Metric):
            raise ConfigurationError(
                f"Diagonal: base must be a steepest metric (GGN(), Fisher(), ...), got {base!r}."
            )
        if not (isinstance(power, int | float) and 0 < power < float("inf")):
            raise ConfigurationError(
                f"Diagonal: power must be a finite number > 0 (Martens' xi), got {power!r}."
            )
        if mc_samples is not None and not (isinstance(mc_samples, int) and mc_samples >= 1):
            raise ConfigurationError(
                f"Diagonal: mc_samples must be None (exact) or a positive integer, got "
                f"{mc_samples!r}."
            )
        self.base, self.power, self.mc_samples = base, float(power), mc_samples
        self.needs_distribution = base.needs_distribution
        self.psd = base.psd or self.power != 1.0

    def __repr__(self) -> str:
        return f"Diagonal(base={self.base!r}, power={self.power:g}, mc_samples={self.mc_samples})"

    def base_diagonal(self, point: Point) -> Tensor:
        """diag of the base metric, exact or by Hutchinson's estimate."""
        self.base.check(point)
        op = self.base.operator(point)
        if self.mc_samples is None:
            return op.diagonal()
        k, p = self.mc_samples, point.size
        gen = point.generator
        dev = point.theta.device
        if gen is not None:
            bits = torch.randint(0, 2, (p, k), generator=gen, device=gen.device).to(dev)
        else:
            bits = torch.randint(0, 2, (p, k), device=dev)
        v = (2 * bits - 1).to(point.theta.dtype)
        return (v * op.matmat(v)).mean(1)

    def operator(self, point: Point) -> LinearOperator:
        (m,) = point.mean_over_ranks([self.base_diagonal(point).detach()])
        if not torch.isfinite(m).all():
            raise ConfigurationError(
                f"Diagonal: the diagonal of {self.base!r} is not finite at these parameters."
            )
        d = m if self.power == 1.0 else m.clamp_min(0).pow(self.power)
        psd = bool((d >= 0).all())

        def inverse(b: Tensor, shift: float | Tensor) -> Tensor:
            den = d + shift  # (P,): one column b (P,) or columns b (P, k)
            return b / (den if b.ndim == 1 else den[:, None])

        return LinearOperator(
            lambda v: d * v,
            point.size,
            d.dtype,
            d.device,
            matmat=lambda V: d[:, None] * V,
            dense=lambda: torch.diag(d),
            diagonal=lambda: d.clone(),
            psd=psd,
            name=f"diag({self.base.name})^{self.power:g}",
            inverse=inverse,
            inverse_diagonal=True,
        )

r"""MINPACK's stopping tests of :class:`~steepest.optimizer.Optimizer` (lmder's meanings):
ftol and xtol on one try (:func:`converged`), gtol before a step (:class:`StoppingTests`, a
mixin of the Optimizer): a zero gradient, the largest gradient entry, or for a least-squares
objective MINPACK's cosine between the residual and the columns of its Jacobian.

Example
-------
>>> converged(1e-8, 1e-8, value0=1.0, actual=1e-9, predicted=1e-9, rho=1.0, step=1.0, xnorm=1.0)
'ftol'
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .damping import MoreTrustRegion
from .linop import LinearOperator
from .losses import MSE
from .metrics import GGN, Fisher, GaussNewton
from .point import Point
from .stepinfo import StepInfo


class StoppingTests:
    """The gtol tests the Optimizer makes before a step (a mixin: it reads the optimizer's
    ``loss``, ``metric``, ``damping``, ``gtol``, ``_l2`` and ``_operator``)."""

    def _gradient_stop(
        self, value0: float, g: Tensor, gnorm: float, cosine: bool
    ) -> StepInfo | None:
        r"""No step at a zero gradient, nor (gtol > 0, not a least-squares objective) where
        :math:`\max_j |g_j| \le` gtol; None otherwise."""
        if gnorm == 0:
            return StepInfo.no_step(
                value0,
                self.damping.value,
                0.0,
                "zero gradient: theta is a stationary point, no step taken",
                converged=True,
                reason="gtol",
            )
        if self.gtol > 0 and not cosine and float(g.abs().max()) <= self.gtol:
            return StepInfo.no_step(
                value0,
                self.damping.value,
                gnorm,
                f"converged: max |g_j| <= gtol = {self.gtol:g}, no step taken",
                converged=True,
                reason="gtol",
            )
        return None

    def _cosine_stop(
        self,
        point: Point,
        cpoint: Point,
        op: LinearOperator,
        value0: float,
        g: Tensor,
        gnorm: float,
    ) -> StepInfo | None:
        """No step where MINPACK's cosine (:meth:`_cosine`) is at most gtol; None otherwise."""
        cos = self._cosine(point, cpoint, op, value0, g)
        if cos > self.gtol:
            return None
        return StepInfo.no_step(
            value0,
            self.damping.value,
            gnorm,
            f"converged: max_j |J_j^T r| / (||J_j|| ||r||) = {cos:.3g} <= gtol = "
            f"{self.gtol:g}, no step taken",
            converged=True,
            reason="gtol",
        )

    def _least_squares(self) -> bool:
        """Whether the objective is a sum of squares whose residual and Jacobian the optimizer
        sees (an MSE loss, no weight decay): then gtol is MINPACK's cosine test."""
        return isinstance(self.loss, MSE) and self._l2 is None

    def _cosine(
        self, point: Point, cpoint: Point, op: LinearOperator, value0: float, g: Tensor
    ) -> float:
        r"""MINPACK's gtol quantity for the residual :math:`r = (z - y)/\sigma` of an MSE loss,
        :math:`\max_j |J_j^T r| / (\|J_j\| \|r\|)`, the largest cosine between r and a
        column of its Jacobian (0 for a zero column). With :math:`L = \|r\|^2/(2N)`,
        :math:`g = J^T r/N` and :math:`G = J^T J/N` (the GGN, = Fisher, of MSE) it is
        :math:`\max_j |g_j| / \sqrt{2 L\, G_{jj}}`. diag(G) is read from this step's metric
        when it is G up to a constant (GaussNewton, GGN, Fisher on the whole batch), from the
        matrix ``MoreTrustRegion`` forms anyway; otherwise it costs one GGN diagonal (the
        per-sample Jacobians)."""
        sigma2 = self.loss.sigma**2
        metric = type(self.metric)
        exact = metric in (GGN, GaussNewton) or (
            metric is Fisher and self.metric.mc_samples is None
        )
        if cpoint is point and exact:
            if isinstance(self.damping, MoreTrustRegion):
                self.damping.form(op)  # cached on op: the rule's decomposition reuses it
            diag = op.diagonal()
            if isinstance(self.metric, GaussNewton):  # J^T J / N without the 1/sigma^2
                diag = diag / sigma2
        else:
            diag = self._operator(GGN(), point).diagonal()
        den = (2 * value0 * diag.clamp_min(0)).sqrt()
        cos = torch.where(den > 0, g.abs() / den, torch.zeros_like(den))
        return float(cos.max())


def converged(
    ftol: float,
    xtol: float,
    value0: float,
    actual: float | None,
    predicted: float,
    rho: float | None,
    step: float,
    xnorm: float,
) -> str:
    r"""MINPACK's tests (lmder) on one try; returns the names of those that fire ('' if
    none): ftol when :math:`|L - L_{new}| \le` ftol :math:`|L|`, :math:`q(0) - q(\delta) \le`
    ftol :math:`|L|` and :math:`\rho \le 2`; xtol when :math:`\|\delta\| \le` xtol
    :math:`(\|\theta\| +` xtol) (the added xtol lets it fire at :math:`\theta^* = 0`)."""
    scale = abs(value0)
    f = (
        actual is not None
        and math.isfinite(actual)
        and abs(actual) <= ftol * scale
        and predicted <= ftol * scale
        and rho is not None
        and rho <= 2
    )
    x = actual is not None and step <= xtol * (xnorm + xtol)
    return " and ".join(n for n, on in (("ftol", f), ("xtol", x)) if on)

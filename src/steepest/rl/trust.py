r"""A fixed-KL natural step that respects its trust region in the exact KL (ACKTR's step).

ACKTR (Wu et al. 2017) takes the K-FAC natural-gradient direction
:math:`d = -(\hat F + \lambda I)^{-1} g` with the step size
:math:`\alpha_0 = \min(\alpha_{max}, \sqrt{2\delta / d^T(\hat F + \lambda I)d})`, so that the
*quadratic model* of the KL in the K-FAC Fisher :math:`\hat F` equals the bound
:math:`\delta` (``max_kl``). :math:`\hat F` is an approximation (Kronecker factors, sampled
actions), so the true mean KL of that step can exceed :math:`\delta` several times.
:class:`ExactKLClip` measures the exact mean KL of the trial step on the batch,
:math:`\overline{KL}(\alpha) = \frac1N\sum_i KL(\pi_{z_i(\theta)} \| \pi_{z_i(\theta + \alpha d)})`,
and while it exceeds :math:`\delta` rescales the step as the quadratic model of the KL
prescribes, :math:`\alpha \leftarrow \alpha\,\min(\beta, \sqrt{\delta / \overline{KL}(\alpha)})`.
Unlike TRPO's line search (:class:`~steepest.steps.KLLineSearch`) it does not ask the
surrogate to improve: the step is a clipped natural step, not a search on the loss. If no
trial passes in ``max_evals`` KL evaluations, alpha = 0 (no step).

Example
-------
>>> rule = ExactKLClip(max_kl=0.01, max_alpha=1.0)
>>> opt = Optimizer(policy, Categorical(), metric=KFAC(), damping=0.01, step=rule)
"""

from __future__ import annotations

import math

from ..errors import ConfigurationError
from ..steps import StepChoice, StepContext, StepRule


class ExactKLClip(StepRule):
    r"""The trust-region step of the metric's quadratic KL model, clipped to the exact KL bound
    (see the module docstring).

    Parameters
    ----------
    max_kl: the bound :math:`\delta` on the mean KL
    max_alpha: the cap :math:`\alpha_{max}` on the first trial (ACKTR's maximal step size)
    beta: the largest factor of one rescaling, in (0, 1)
    max_evals: the most KL evaluations (forward passes) per step

    >>> ExactKLClip(max_kl=0.01)
    ExactKLClip(max_kl=0.01, max_alpha=1)
    """

    def __init__(
        self,
        max_kl: float = 0.01,
        max_alpha: float = 1.0,
        beta: float = 0.9,
        max_evals: int = 10,
    ) -> None:
        for name, v in (("max_kl", max_kl), ("max_alpha", max_alpha), ("beta", beta)):
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise ConfigurationError(
                    f"ExactKLClip: {name} must be a finite positive number, got {v!r}."
                )
        if not beta < 1:
            raise ConfigurationError(f"ExactKLClip: beta must lie in (0, 1), got {beta!r}.")
        if not (isinstance(max_evals, int) and not isinstance(max_evals, bool) and max_evals >= 1):
            raise ConfigurationError(
                f"ExactKLClip: max_evals must be an integer >= 1, got {max_evals!r}."
            )
        self.max_kl, self.max_alpha = float(max_kl), float(max_alpha)
        self.beta, self.max_evals = float(beta), max_evals

    def __repr__(self) -> str:
        return f"ExactKLClip(max_kl={self.max_kl:g}, max_alpha={self.max_alpha:g})"

    def choose(self, ctx: StepContext) -> StepChoice:
        alpha = min(self.max_alpha, math.sqrt(2 * self.max_kl / ctx.dAd))
        for k in range(1, self.max_evals + 1):
            kl = ctx.kl_at(alpha * ctx.d)
            if math.isfinite(kl) and kl <= self.max_kl:
                return StepChoice(alpha, k)
            # the quadratic model's rescaling, at least by beta (a non-finite KL: by beta)
            shrink = math.sqrt(self.max_kl / kl) if math.isfinite(kl) else self.beta
            alpha *= min(self.beta, shrink)
        return StepChoice(
            0.0,
            self.max_evals,
            None,
            f"ExactKLClip: no step within KL {self.max_kl:g} in {self.max_evals} trials",
        )

r"""Step rules: how far to go along the direction :math:`d = -(M + \lambda I)^{-1} g`.

The step is :math:`\delta = \alpha d`. A rule sees a :class:`StepContext` (gradient, direction,
the damped operator, and functions giving the loss and the mean KL divergence at
:math:`\theta + \delta`) and returns alpha.

- :class:`LearningRate`: fixed alpha.
- :class:`TrustRegion`: problem (1) of 000, Appendix A:
  :math:`\alpha = \epsilon / \sqrt{g^T (M+\lambda I)^{-1} g}` so that
  :math:`\delta^T (M + \lambda I)\delta = \epsilon^2`; ``adaptive=True`` is the classical
  trust-region method: the full step when it lies inside the region (alpha <= 1), epsilon grown
  or shrunk with the agreement rho of the actual and predicted reduction, and a step that raised
  the loss rejected and retried with a smaller radius.
- :class:`Armijo`: backtracking line search on the true loss (sufficient decrease).
- :class:`KLLineSearch`: TRPO-style: the largest alpha in a backtracking sequence whose mean
  KL between old and new predictive distributions stays under a bound and that lowers the loss.

Example
-------
>>> opt = Optimizer(model, CrossEntropy(), metric=Fisher(), step=TrustRegion(eps=0.1))
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from .errors import ConfigurationError
from .linop import LinearOperator
from .solvers import Solution


@dataclass
class StepContext:
    """What a step rule may look at; ``loss_at`` and ``kl_at`` cost one forward pass each."""

    loss: float  # L(theta)
    g: Tensor
    d: Tensor
    damped: LinearOperator  # M + lambda I
    dAd: float  # d^T (M + lambda I) d, or -g^T d > 0 where that is not positive (negative
    # curvature met by CG or clipped eigenvalues): the squared length of d in the step's metric
    solution: Solution
    loss_at: Callable[[Tensor], float]  # delta -> L(theta + delta) on the batch
    kl_at: Callable[[Tensor], float]  # delta -> mean_i KL(R_z(theta) || R_z(theta + delta))


@dataclass
class StepChoice:
    alpha: float
    evaluations: int = 0
    loss_new: float | None = None  # L(theta + alpha d) when the rule computed it
    message: str = ""


_MAX_RADIUS = 1e150  # so that eps^2 stays finite in float64


def _count(name: str, **values: int) -> None:
    for k, v in values.items():
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            raise ConfigurationError(f"{name}: {k} must be an integer >= 1, got {v!r}.")


def _positive(name: str, **values: float) -> None:
    for k, v in values.items():
        if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
            raise ConfigurationError(f"{name}: {k} must be a finite positive number, got {v!r}.")


class StepRule:
    """Base class. ``choose(ctx)`` returns alpha; ``update(rho)`` is called after each try with
    the reduction ratio (-inf for a try with no step or a non-finite loss)."""

    adaptive = False  # whether update() uses rho
    reject = False  # whether the optimizer rejects (and retries) a step that raised the loss
    max_tries = 1  # solves per optimizer step this rule asks for (retries after rejections)

    def choose(self, ctx: StepContext) -> StepChoice:
        raise NotImplementedError

    def update(self, rho: float) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class LearningRate(StepRule):
    r"""Fixed step: :math:`\delta = -\alpha (M + \lambda I)^{-1} g`.

    >>> LearningRate(0.5)
    """

    def __init__(self, alpha: float = 1.0) -> None:
        _positive("LearningRate", alpha=alpha)
        self.alpha = float(alpha)

    def __repr__(self) -> str:
        return f"LearningRate({self.alpha})"

    def choose(self, ctx: StepContext) -> StepChoice:
        return StepChoice(self.alpha)

    def state_dict(self) -> dict:
        return {"alpha": self.alpha}

    def load_state_dict(self, state: dict) -> None:
        self.alpha = float(state["alpha"])


class TrustRegion(StepRule):
    r"""Solution of problem (1) of 000 (Appendix A):
    :math:`\alpha = \epsilon / \sqrt{g^T (M + \lambda I)^{-1} g}`, so that
    :math:`\delta^T (M + \lambda I) \delta = \epsilon^2`. For an inexact (CG) direction alpha
    uses :math:`d^T (M + \lambda I) d` so the constraint still holds exactly (and
    :math:`-g^T d` where d meets negative curvature).

    With ``adaptive=True`` it is the classical trust-region method (Moré 1978; Nocedal and
    Wright ch. 4) on the quadratic model :math:`q(\delta) = L + g^T\delta +
    \frac12\delta^T M\delta`: :math:`\alpha = \min(\epsilon/\sqrt{d^T(M+\lambda I)d},\
    \alpha_{max})` with ``max_alpha`` = 1 (the full step when it lies inside the region),
    epsilon times ``grow`` when rho > 3/4, times ``shrink`` when rho < 1/4, within
    [eps_min, eps_max], and a step that raised the loss is rejected by the optimizer and retried
    with the smaller radius (at most ``max_tries`` solves). The adaptive radius is scale-free
    (as MINPACK's, relative to the problem's own scale): eps, eps_min and eps_max are fractions
    of the length :math:`\sqrt{d_0^T (M+\lambda I) d_0}` of the first full step, measured at
    the first step (``relative=False`` keeps them absolute). Minimising :math:`10^{16} x^2`
    from x = 1 with Newton and eps = 1 takes one step.

    Parameters
    ----------
    eps: the radius epsilon
    adaptive: adapt epsilon from rho, cap alpha, reject increases (see above)
    grow, shrink: factors of epsilon on good (rho > 3/4) and poor (rho < 1/4) agreement
    eps_min, eps_max: bounds of epsilon
    max_alpha: the cap on alpha; default None: 1 when adaptive, none otherwise (always on the
        boundary, as in problem (1))
    max_tries: solves per optimizer step when adaptive (rejected steps are retried)
    relative: when adaptive, eps and its bounds are relative to the first step (default True)

    >>> TrustRegion(eps=0.1)                  # the paper's step, on the boundary
    >>> TrustRegion(eps=1.0, adaptive=True)   # classical trust region
    """

    def __init__(self, eps: float = 0.1, adaptive: bool = False, grow: float = 2.0,
                 shrink: float = 0.25, eps_min: float = 1e-12, eps_max: float = 1e6,
                 max_alpha: float | None = None, max_tries: int = 20,
                 relative: bool = True) -> None:
        _positive("TrustRegion", eps=eps, grow=grow, shrink=shrink, eps_min=eps_min,
                  eps_max=eps_max)
        if not eps_max <= _MAX_RADIUS:
            raise ConfigurationError(
                f"TrustRegion: eps_max must be at most {_MAX_RADIUS:g} (eps^2 must be finite), got "
                f"{eps_max!r}.")
        if not (eps_min <= eps <= eps_max):
            raise ConfigurationError(
                f"TrustRegion: eps must lie in [eps_min, eps_max] = [{eps_min:g}, {eps_max:g}], "
                f"got {eps!r}; a radius that large is no constraint (use LearningRate(1.0) for "
                "the full step) or raise eps_max.")
        if not (shrink < 1 < grow):
            raise ConfigurationError(
                f"TrustRegion: need shrink < 1 < grow, got shrink={shrink}, grow={grow}."
            )
        if max_alpha is not None and max_alpha != math.inf:
            _positive("TrustRegion", max_alpha=max_alpha)
        if not (isinstance(max_tries, int) and max_tries >= 1):
            raise ConfigurationError(f"TrustRegion: max_tries must be an integer >= 1, got "
                                     f"{max_tries!r}.")
        self.eps, self.adaptive = float(eps), bool(adaptive)
        self.grow, self.shrink, self.eps_min, self.eps_max = grow, shrink, eps_min, eps_max
        if max_alpha is None:
            max_alpha = 1.0 if self.adaptive else math.inf
        self.max_alpha = float(max_alpha)
        self.reject = self.adaptive
        self.max_tries = int(max_tries) if self.adaptive else 1
        self.relative = bool(relative) and self.adaptive
        self.scale = 0.0  # the first full step's length once measured (relative radius)

    def __repr__(self) -> str:
        return f"TrustRegion(eps={self.eps:g}, adaptive={self.adaptive})"

    def choose(self, ctx: StepContext) -> StepChoice:
        if self.relative and self.scale == 0:
            length = math.sqrt(ctx.dAd)
            if math.isfinite(length) and length > 0:
                self.scale = length
                self.eps = min(self.eps * length, _MAX_RADIUS)
                self.eps_min = min(self.eps_min * length, _MAX_RADIUS)
                self.eps_max = min(self.eps_max * length, _MAX_RADIUS)
        return StepChoice(min(self.eps / math.sqrt(ctx.dAd), self.max_alpha))

    def update(self, rho: float) -> None:
        if not self.adaptive:
            return
        if math.isnan(rho) or rho < 0.25:
            self.eps = max(self.eps * self.shrink, self.eps_min)
        elif rho > 0.75:
            self.eps = min(self.eps * self.grow, self.eps_max)

    def state_dict(self) -> dict:
        return {"eps": self.eps, "scale": self.scale, "eps_min": self.eps_min,
                "eps_max": self.eps_max}

    def load_state_dict(self, state: dict) -> None:
        self.eps = float(state["eps"])
        for key in ("scale", "eps_min", "eps_max"):
            if key in state:
                setattr(self, key, float(state[key]))


class Armijo(StepRule):
    r"""Backtracking line search on the true loss: the first
    :math:`\alpha = \alpha_0 \beta^k` with
    :math:`L(\theta + \alpha d) \le L(\theta) + c\,\alpha\, g^T d`. If none of ``max_evals``
    trials passes, alpha = 0: no step is taken (never a step that raises the loss).

    >>> Armijo(alpha0=1.0, c=1e-4, beta=0.5)
    """

    def __init__(self, alpha0: float = 1.0, c: float = 1e-4, beta: float = 0.5,
                 max_evals: int = 30) -> None:
        _positive("Armijo", alpha0=alpha0, c=c, beta=beta)
        _count("Armijo", max_evals=max_evals)
        if not (c < 1 and beta < 1):
            raise ConfigurationError(f"Armijo: need c < 1 and beta < 1, got c={c}, beta={beta}.")
        self.alpha0, self.c, self.beta, self.max_evals = alpha0, c, beta, int(max_evals)

    def __repr__(self) -> str:
        return f"Armijo(alpha0={self.alpha0}, c={self.c}, beta={self.beta})"

    def choose(self, ctx: StepContext) -> StepChoice:
        slope = float(ctx.g @ ctx.d)
        if not slope < 0:
            return StepChoice(0.0, 0, ctx.loss,
                              f"Armijo: d is not a descent direction (g^T d = {slope:.3g})")
        alpha = self.alpha0
        for k in range(1, self.max_evals + 1):
            new = ctx.loss_at(alpha * ctx.d)
            if math.isfinite(new) and new <= ctx.loss + self.c * alpha * slope:
                return StepChoice(alpha, k, new)
            alpha *= self.beta
        return StepChoice(0.0, self.max_evals, ctx.loss,
                          f"Armijo: no sufficient decrease in {self.max_evals} trials")


class KLLineSearch(StepRule):
    r"""KL-constrained backtracking (TRPO, Schulman et al. 2015): start from the trust-region
    step of the quadratic KL model, :math:`\alpha_0 = \sqrt{2\,\mathrm{max\_kl} / d^T (M +
    \lambda I) d}` (with the Fisher as M, :math:`\frac12\delta^T F\delta` is the second-order
    KL), and take the largest :math:`\alpha_0\beta^k` with
    :math:`\frac1N\sum_i KL(R_{z_i(\theta)} \| R_{z_i(\theta+\alpha d)}) \le` ``max_kl`` and
    :math:`L(\theta + \alpha d) < L(\theta)`. If none passes, alpha = 0 (no step).

    >>> KLLineSearch(max_kl=0.01)
    """

    def __init__(self, max_kl: float = 0.01, beta: float = 0.5, max_evals: int = 20) -> None:
        _positive("KLLineSearch", max_kl=max_kl, beta=beta)
        _count("KLLineSearch", max_evals=max_evals)
        if not beta < 1:
            raise ConfigurationError(f"KLLineSearch: need beta < 1, got {beta}.")
        self.max_kl, self.beta, self.max_evals = float(max_kl), beta, int(max_evals)

    def __repr__(self) -> str:
        return f"KLLineSearch(max_kl={self.max_kl})"

    def choose(self, ctx: StepContext) -> StepChoice:
        alpha = math.sqrt(2 * self.max_kl / ctx.dAd)
        for k in range(1, self.max_evals + 1):
            delta = alpha * ctx.d
            kl = ctx.kl_at(delta)
            if kl <= self.max_kl:
                new = ctx.loss_at(delta)
                if math.isfinite(new) and new < ctx.loss:
                    return StepChoice(alpha, k, new)
            alpha *= self.beta
        return StepChoice(0.0, self.max_evals, ctx.loss,
                          f"KL line search: no step under KL {self.max_kl} lowered the loss")


def as_step(step: StepRule | float) -> StepRule:
    """A step rule from an instance or a float (a learning rate)."""
    if isinstance(step, StepRule):
        return step
    if isinstance(step, int | float) and not isinstance(step, bool):
        return LearningRate(float(step))
    raise ConfigurationError(
        f"step must be a steepest.steps rule (LearningRate, TrustRegion, Armijo, KLLineSearch) "
        f"or a float learning rate, got {step!r}."
    )

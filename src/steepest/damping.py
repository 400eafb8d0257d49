r"""Damping rules: the lambda of :math:`M + \lambda I` (Tikhonov damping, 000 section 3.2;
Martens 2020 section 10).

- :class:`Constant`: a fixed lambda.
- :class:`LevenbergMarquardt`: lambda adapts to the reduction ratio

  .. math:: \rho = \frac{L(\theta+\delta) - L(\theta)}{q(\delta) - q(0)},\qquad
            q(\delta) = L(\theta) + g^T\delta + \tfrac12 \delta^T M\delta

  (q the quadratic model of the *undamped* metric M, whatever the metric: Identity, Hessian,
  the Gauss-Newton/Fisher family): lambda times ``decrease`` when rho > 3/4, times
  ``increase`` when rho < 1/4 (Moré 1978; Martens 2010 section 4.1 uses 2/3 and 3/2; our
  defaults 1/3 and 3 solve more of the NIST StRD problems, benchmarks/nist.md). With
  ``reject=True`` the optimizer undoes a step whose loss went up, raises lambda and solves
  again, at most ``max_tries`` solves per step (each try is reported in ``StepInfo.tries`` and
  ``StepInfo.message``).

A rule's protocol, used by :class:`~steepest.optimizer.Optimizer`: ``value`` (lambda now),
``update(rho)`` after every try (rho = -inf for a try with no step or a non-finite loss),
``raise_for_retry()`` when the damped system could not be solved or gave no descent direction,
``adaptive``, ``reject``, ``max_tries``, ``state_dict()`` / ``load_state_dict()``.

Example
-------
>>> opt = Optimizer(model, MSE(), metric=GaussNewton(), damping=LevenbergMarquardt(1e-3))
>>> info = opt.step(x, y)
>>> info.rho, info.damping, info.tries      # lambda for the next step: opt.damping.value
"""

from __future__ import annotations

import math

from .errors import ConfigurationError


class Damping:
    """Base class: ``value`` is lambda; ``update(rho)`` after each try of a step."""

    adaptive = False
    reject = False
    max_tries = 1

    @property
    def value(self) -> float:
        raise NotImplementedError

    def update(self, rho: float) -> None:
        pass

    def raise_for_retry(self) -> None:
        """Called when a step is rejected or the damped system could not be solved."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Constant(Damping):
    r"""Fixed Tikhonov damping lambda >= 0.

    >>> Constant(1e-3).value
    0.001
    """

    def __init__(self, lam: float = 0.0) -> None:
        if not (isinstance(lam, int | float) and math.isfinite(lam) and lam >= 0):
            raise ConfigurationError(
                f"damping must be a finite number >= 0, got {lam!r}; use e.g. damping=1e-3."
            )
        self.lam = float(lam)

    @property
    def value(self) -> float:
        return self.lam

    def __repr__(self) -> str:
        return f"Constant({self.lam:g})"

    def state_dict(self) -> dict:
        return {"lam": self.lam}

    def load_state_dict(self, state: dict) -> None:
        self.lam = float(state["lam"])


class LevenbergMarquardt(Damping):
    r"""Levenberg-Marquardt adaptation of lambda from the reduction ratio rho (Moré 1978,
    Martens 2010 section 4.1):

    .. math:: \lambda \leftarrow \begin{cases} \lambda \cdot \mathrm{decrease} & \rho > 3/4
              \\ \lambda \cdot \mathrm{increase} & \rho < 1/4 \text{ or nan}
              \\ \lambda & \text{otherwise}\end{cases}

    clipped to [min, max]. On a quadratic loss with the exact metric rho = 1 and lambda keeps
    shrinking (the step tends to the Newton step); when the quadratic model overestimates the
    decrease (strong higher-order terms) rho < 1/4 and lambda grows, shortening the step.

    Parameters
    ----------
    init: the first lambda
    decrease: factor (< 1) applied when rho > 3/4
    increase: factor (> 1) applied when rho < 1/4 (or the step failed)
    min, max: bounds of lambda
    reject: undo a step whose loss went up, raise lambda, retry (up to ``max_tries``)

    >>> lm = LevenbergMarquardt(init=1e-2, decrease=2/3, increase=3/2)
    >>> lm.update(0.9); lm.value        # 1e-2 * 2/3
    0.006666666666666666
    """

    adaptive = True

    def __init__(self, init: float = 1e-3, decrease: float = 1 / 3, increase: float = 3.0,
                 min: float = 1e-20, max: float = 1e12, reject: bool = True,
                 max_tries: int = 20) -> None:
        if not (init > 0 and 0 < decrease < 1 < increase and 0 <= min <= max):
            raise ConfigurationError(
                f"LevenbergMarquardt: need init > 0, 0 < decrease < 1 < increase and "
                f"0 <= min <= max; got init={init}, decrease={decrease}, increase={increase}, "
                f"min={min}, max={max}."
            )
        if max_tries < 1:
            raise ConfigurationError(f"LevenbergMarquardt: max_tries must be >= 1, got "
                                     f"{max_tries}.")
        self.lam, self.decrease, self.increase = float(init), decrease, increase
        self.min, self.max = min, max
        self.reject, self.max_tries = bool(reject), int(max_tries)

    def __repr__(self) -> str:
        return f"LevenbergMarquardt(lam={self.lam:g})"

    @property
    def value(self) -> float:
        return self.lam

    def update(self, rho: float) -> None:
        """Apply the rule to the reduction ratio of the last try (nan counts as failure)."""
        if math.isnan(rho) or rho < 0.25:
            self.lam = min(self.lam * self.increase, self.max)
        elif rho > 0.75:
            self.lam = max(self.lam * self.decrease, self.min)

    def raise_for_retry(self) -> None:
        """lambda times ``increase`` (from at least ``min``, at most ``max``)."""
        self.lam = min(max(self.lam, self.min) * self.increase, self.max)

    def state_dict(self) -> dict:
        return {"lam": self.lam}

    def load_state_dict(self, state: dict) -> None:
        self.lam = float(state["lam"])


def as_damping(damping: Damping | float) -> Damping:
    """A damping rule from an instance or a float (constant lambda)."""
    if isinstance(damping, Damping):
        return damping
    if isinstance(damping, int | float) and not isinstance(damping, bool):
        return Constant(float(damping))
    raise ConfigurationError(
        f"damping must be a float lambda >= 0 or a steepest.damping rule (Constant, "
        f"LevenbergMarquardt), got {damping!r}."
    )

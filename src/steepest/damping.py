r"""Damping rules: the lambda of :math:`M + \lambda I` (Tikhonov damping, 000 section 3.2).

- :class:`Constant`: a fixed lambda.
- :class:`LevenbergMarquardt`: lambda adapts to the reduction ratio
  :math:`\rho = \frac{L(\theta+\delta) - L(\theta)}{q(\delta) - q(0)}`, q the quadratic model
  :math:`q(\delta) = L + g^T\delta + \frac12 \delta^T M\delta` (undamped M): lambda times
  ``decrease`` when rho > 3/4, times ``increase`` when rho < 1/4 (Moré 1978; Martens 2010
  section 4.1). With ``reject=True`` a step that raises the loss is undone, lambda raised and
  the step retried, at most ``max_tries`` times.

Example
-------
>>> opt = Optimizer(model, MSE(), metric=GaussNewton(), damping=LevenbergMarquardt(1e-3))
"""

from __future__ import annotations

import math

from .errors import ConfigurationError


class Damping:
    """Base class: ``value`` is lambda; ``update(rho)`` after each step."""

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
    r"""Levenberg-Marquardt adaptation of lambda from the reduction ratio rho.

    Parameters
    ----------
    init: the first lambda
    decrease: factor (< 1) applied when rho > 3/4
    increase: factor (> 1) applied when rho < 1/4 (or the step failed)
    min, max: bounds of lambda
    reject: undo a step whose loss went up, raise lambda, retry (up to ``max_tries``)

    >>> lm = LevenbergMarquardt(init=1e-2, decrease=2/3, increase=3/2)
    """

    adaptive = True

    def __init__(self, init: float = 1e-3, decrease: float = 2 / 3, increase: float = 3 / 2,
                 min: float = 1e-12, max: float = 1e12, reject: bool = True,
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
        if not math.isfinite(rho) or rho < 0.25:
            self.lam = min(self.lam * self.increase, self.max)
        elif rho > 0.75:
            self.lam = max(self.lam * self.decrease, self.min)

    def raise_for_retry(self) -> None:
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

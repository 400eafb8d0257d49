r"""What one step of :class:`~steepest.optimizer.Optimizer` reports: :class:`StepInfo` (a
frozen, scipy-style result: the losses, alpha, rho, lambda, the solve, the evaluations counted
as MINPACK counts them, whether a stopping rule fired), the step's :class:`Notes` (each kind
once with a count, so that ``StepInfo.message`` stays short however many tries a step makes)
and MINPACK's convergence tests on one try (:func:`converged`).

Example
-------
>>> info = opt.step(x, y)
>>> info.loss, info.rho, info.accepted, info.nfev, info.converged, info.reason
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepInfo:
    """What one step did (scipy-style result).

    loss: L(theta) before the step; loss_new: L(theta + delta) (None when no step was tried)
    alpha: the step size; delta = alpha d
    predicted_reduction: q(0) - q(delta) = -(g^T delta + 1/2 delta^T M delta), M undamped
    actual_reduction: L(theta) - L(theta + delta); rho: actual / predicted (-inf when the model
        predicts no decrease or the new loss is not finite)
    quad_form: delta^T (M + lambda I) delta
    damping: lambda of the last try; iterations, residual, negative_curvature, solver: from the
        last solve
    accepted: whether theta moved; tries: solves made (> 1 after rejected tries)
    evaluations: forward passes for the loss/KL at trial points (line search, rho, backtracking)
    nfev: loss evaluations of the step, MINPACK's nfev: the forward at theta (0 when the
        previous step's accepted trial is reused, see :class:`Optimizer` ``reuse``) plus
        ``evaluations``; summed over steps, the count scipy's ``least_squares`` reports
    njev: derivative evaluations, MINPACK's njev: the points whose gradient and curvature
        were taken (1, plus 1 for a curvature batch or sub-batch); the work inside one (a
        backward, per-sample Jacobians by vmap, K-FAC's capture pass) is not counted apart
    converged: whether a stopping rule of the optimizer fired on this step (MINPACK's, see
        :class:`Optimizer` ``ftol``/``xtol``/``gtol``); then no further tries were made
    reason: which: ``"ftol"``, ``"xtol"``, ``"ftol and xtol"``, ``"gtol"``, or ``""``
    message: what happened, of bounded length (rejected tries are counted, not listed)
    """

    loss: float
    alpha: float
    predicted_reduction: float
    quad_form: float
    damping: float
    iterations: int
    residual: float
    negative_curvature: bool
    grad_norm: float
    step_norm: float
    directional_derivative: float  # g^T delta, < 0 for a descent step
    accepted: bool
    tries: int
    loss_new: float | None = None
    actual_reduction: float | None = None
    rho: float | None = None
    evaluations: int = 0
    nfev: int = 0
    njev: int = 0
    solver: str = ""
    message: str = ""
    converged: bool = False
    reason: str = ""

    @classmethod
    def no_step(
        cls, loss: float, damping: float, grad_norm: float, message: str, **more: object
    ) -> StepInfo:
        """A step that did not move theta and tried no step (``more``: other fields)."""
        return cls(
            loss=loss,
            alpha=0.0,
            predicted_reduction=0.0,
            quad_form=0.0,
            damping=damping,
            iterations=0,
            residual=more.pop("residual", 0.0),
            negative_curvature=False,
            grad_norm=grad_norm,
            step_norm=0.0,
            directional_derivative=0.0,
            accepted=False,
            tries=more.pop("tries", 0),
            message=message,
            **more,
        )


class Notes:
    """The notes of one step, each kind once with a count (so ``StepInfo.message`` stays short
    however many tries a step makes)."""

    def __init__(self) -> None:
        self._notes: dict[str, list] = {}

    def add(self, kind: str, text: str) -> None:
        """Note ``text`` under ``kind`` (a later text of the same kind replaces it)."""
        entry = self._notes.setdefault(kind, [0, text])
        entry[0] += 1
        entry[1] = text

    def render(self) -> list[str]:
        """One line per kind: the text, or "n times, the last: text"."""
        return [
            text if n == 1 else f"{n} times, the last: {text}" for n, text in self._notes.values()
        ]

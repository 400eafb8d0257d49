r"""The optimizer: one step of :math:`\delta = -\alpha (M + \lambda I)^{-1} g`.

``Optimizer.step(inputs, targets)`` evaluates the model (a :class:`~steepest.point.Point`),
builds M from the metric, damps it, solves for the direction, picks alpha with the step rule,
checks the actual loss against the quadratic model when a rule needs it, accepts or rolls back,
updates lambda and returns a frozen :class:`StepInfo`. All validation happens before a parameter
is touched; on any failure the parameters and the optimizer state are restored.

Example
-------
>>> opt = Optimizer(model, CrossEntropy(), metric=GGN(), damping=1e-3)
>>> for _ in range(10):
...     info = opt.step(x, y)
>>> info.loss, info.alpha, info.iterations
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .damping import Damping, as_damping
from .errors import ConfigurationError, SingularMatrixError, SolverError
from .linop import LinearOperator
from .losses import Loss, as_loss
from .metrics import GradientCovariance, Metric
from .params import ParamSpace
from .point import Inputs, Point, evaluate
from .solvers import CG, Solution, Solver, as_solver
from .steps import LearningRate, StepContext, StepRule, as_step


@dataclass(frozen=True)
class StepInfo:
    """What one step did (scipy-style result).

    loss: L(theta) before the step; loss_new: L(theta + delta) when it was evaluated
    alpha: the step size; delta = alpha d
    predicted_reduction: q(0) - q(delta) = -(g^T delta + 1/2 delta^T M delta), M undamped
    actual_reduction: L(theta) - L(theta + delta) when evaluated; rho their ratio
    quad_form: delta^T (M + lambda I) delta
    damping: lambda used; iterations, residual, negative_curvature, solver: from the solver
    accepted: whether theta moved; tries: solves made (> 1 after rejected steps)
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
    solver: str = ""
    message: str = ""


class Optimizer:
    r"""Unified first/second-order optimizer on any ``nn.Module`` (000, problem (1)).

    Parameters
    ----------
    model: the module; its trainable parameters are theta (frozen ones never change)
    loss: a :class:`~steepest.losses.Loss` or a callable ``(z, y) -> (N,)`` per-sample loss
    metric: a row of Table 1 (:mod:`steepest.metrics`), default ``GGN()``
    damping: lambda >= 0 or a :mod:`steepest.damping` rule (``LevenbergMarquardt``)
    solver: ``"auto"``, ``"cholesky"``, ``"cg"``, ``"woodbury"`` or a solver instance
    step: a :mod:`steepest.steps` rule or a float learning rate, default ``LearningRate(1.0)``
    momentum: heavy-ball coefficient mu: :math:`\delta_k = \alpha_k d_k + \mu\delta_{k-1}`
    warm_start: decay of the previous direction used as the iterative solver's start (Martens:
        0.95); 0 starts from zero
    preconditioner: None, ``"diagonal"`` (diag(M) + lambda) or ``"empirical-fisher"``
        ((diag of the empirical Fisher + lambda)^xi, Martens 2010 section 4.7), for CG
    xi: the exponent of the empirical-Fisher preconditioner (3/4)
    cg_backtracking: keep CG iterates at indices ceil(1.3^j) and take the one with the best
        actual loss, going back from the last (Martens 2010 section 4.6)
    curvature_batch_size: products of M on a random sub-batch of this size (the gradient on the
        whole batch); or pass ``curvature=(x, y)`` to :meth:`step`
    generator: the ``torch.Generator`` for sampling (MC Fisher, sub-batches); seeded 0 if None
    """

    def __init__(
        self,
        model: nn.Module,
        loss: Loss | Callable[[Tensor, Tensor], Tensor],
        metric: Metric | None = None,
        damping: Damping | float = 1e-3,
        solver: Solver | str = "auto",
        step: StepRule | float | None = None,
        *,
        momentum: float = 0.0,
        warm_start: float = 0.0,
        preconditioner: str | None = None,
        xi: float = 0.75,
        cg_backtracking: bool = False,
        curvature_batch_size: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        from .metrics import GGN

        if not isinstance(model, nn.Module):
            raise ConfigurationError(
                f"model must be a torch.nn.Module, got {type(model).__name__}."
            )
        self.model = model
        self.space = ParamSpace(model)
        self.loss = as_loss(loss)
        self.metric = GGN() if metric is None else metric
        if not isinstance(self.metric, Metric):
            raise ConfigurationError(
                f"metric must be a steepest.metrics metric (Identity(), GGN(), Fisher(), ...), "
                f"got {self.metric!r}."
            )
        if self.metric.needs_distribution and not self.loss.probabilistic:
            raise self.loss._not_probabilistic(f"the metric {self.metric.name}")
        self.damping = as_damping(damping)
        self.solver = as_solver(solver)
        self.step_rule = LearningRate(1.0) if step is None else as_step(step)
        for name, val, lo, hi in (("momentum", momentum, 0, 1), ("warm_start", warm_start, 0, 1)):
            if not (isinstance(val, int | float) and lo <= val < hi):
                raise ConfigurationError(f"{name} must lie in [{lo}, {hi}), got {val!r}.")
        if preconditioner not in (None, "diagonal", "empirical-fisher"):
            raise ConfigurationError(
                f"preconditioner must be None, 'diagonal' or 'empirical-fisher', got "
                f"{preconditioner!r}."
            )
        if curvature_batch_size is not None and curvature_batch_size < 1:
            raise ConfigurationError(
                f"curvature_batch_size must be a positive integer, got {curvature_batch_size}."
            )
        self.momentum, self.warm_start = float(momentum), float(warm_start)
        self.preconditioner, self.xi = preconditioner, float(xi)
        self.cg_backtracking = bool(cg_backtracking)
        self.curvature_batch_size = curvature_batch_size
        if generator is None:
            generator = torch.Generator(device=self.space.device)
            generator.manual_seed(0)
        self.generator = generator
        self.steps = 0
        self._prev_direction: Tensor | None = None
        self._prev_delta: Tensor | None = None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Everything needed to continue bit for bit (parameters excluded, as in torch.optim)."""
        return {
            "steps": self.steps,
            "damping": self.damping.state_dict(),
            "step_rule": self.step_rule.state_dict(),
            "prev_direction": None if self._prev_direction is None else
            self._prev_direction.clone(),
            "prev_delta": None if self._prev_delta is None else self._prev_delta.clone(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved."""
        missing = {"steps", "damping", "step_rule", "generator"} - set(state)
        if missing:
            raise ConfigurationError(f"state_dict lacks keys {sorted(missing)}; pass a dict "
                                     "saved by steepest.Optimizer.state_dict().")
        self.steps = int(state["steps"])
        self.damping.load_state_dict(state["damping"])
        self.step_rule.load_state_dict(state["step_rule"])
        pd, pdl = state.get("prev_direction"), state.get("prev_delta")
        self._prev_direction = None if pd is None else pd.clone()
        self._prev_delta = None if pdl is None else pdl.clone()
        self.generator.set_state(state["generator"])

    # ------------------------------------------------------------------ the step
    def point(self, inputs: Inputs, targets: Tensor) -> Point:
        """The model and loss evaluated at the current parameters on a batch."""
        return Point(self.space, self.loss, inputs, targets, generator=self.generator)

    def step(self, inputs: Inputs, targets: Tensor,
             curvature: tuple[Inputs, Tensor] | None = None) -> StepInfo:
        """One step on the batch (inputs, targets); returns a :class:`StepInfo`.

        ``curvature=(x_c, y_c)`` computes M on another (smaller) batch than the gradient.
        """
        point = self.point(inputs, targets)  # validates; raises before any change
        theta0 = point.theta.detach().clone()
        saved = copy.deepcopy(self.state_dict())
        try:
            info = self._step(point, inputs, targets, curvature, theta0)
        except BaseException:
            self.space.set(theta0)
            self.load_state_dict(saved)
            raise
        return info

    def _curvature_point(self, point: Point, curvature: tuple[Inputs, Tensor] | None) -> Point:
        if curvature is not None:
            return Point(self.space, self.loss, curvature[0], curvature[1],
                         generator=self.generator)
        k = self.curvature_batch_size
        if k is None or k >= point.n:
            return point
        idx = torch.randperm(point.n, generator=self.generator, device=self.generator.device)[:k]
        idx = idx.to(point.z.device)
        x = point.inputs
        xs = tuple(t[idx] for t in x) if isinstance(x, tuple) else x[idx]
        return Point(self.space, self.loss, xs, point.y[idx], generator=self.generator)

    def _precondition(self, point: Point, cpoint: Point, op: LinearOperator,
                      lam: float) -> Tensor | None:
        if self.preconditioner is None:
            return None
        if self.preconditioner == "diagonal":
            return op.diagonal().clamp_min(0) + max(lam, 1e-12)
        ef = GradientCovariance().operator(point)  # = empirical Fisher, any loss
        return (ef.diagonal() + max(lam, 1e-12)).pow(self.xi)

    def _solve(self, a: LinearOperator, b: Tensor, pre: Tensor | None, x0: Tensor | None,
               keep: tuple[int, ...]) -> Solution:
        solver = self.solver
        if isinstance(solver, CG):
            if keep:
                solver = copy.copy(solver)
                solver.keep_iterates = keep
            return solver.solve(a, b, x0=x0, preconditioner=pre)
        return solver.solve(a, b, x0)

    def _step(self, point: Point, inputs: Inputs, targets: Tensor,
              curvature: tuple[Inputs, Tensor] | None, theta0: Tensor) -> StepInfo:
        g = point.grad
        cpoint = self._curvature_point(point, curvature)
        op = self.metric.operator(cpoint)

        def loss_at(delta: Tensor) -> float:
            value, _ = evaluate(self.space, self.loss, inputs, targets, theta0 + delta)
            return value if math.isfinite(value) else math.inf

        def kl_at(delta: Tensor) -> float:
            _, z_new = evaluate(self.space, self.loss, inputs, targets, theta0 + delta)
            return float(self.loss.kl(point.z.detach(), z_new).mean())

        needs_rho = self.damping.adaptive or self.step_rule.adaptive or self.damping.reject
        gnorm = float(g.norm())
        tries = 0
        while True:
            tries += 1
            lam = self.damping.value
            damped = op.add_diagonal(lam)
            pre = self._precondition(point, cpoint, op, lam)
            x0 = None
            if self.warm_start and self._prev_direction is not None:
                x0 = self.warm_start * self._prev_direction
            keep = ()
            if self.cg_backtracking:
                keep = tuple(sorted({math.ceil(1.3**j) for j in range(1, 40)}))
            try:
                sol = self._solve(damped, -g, pre, x0, keep)
            except SingularMatrixError:
                if self.damping.adaptive and tries < self.damping.max_tries:
                    self.damping.raise_for_retry()
                    continue
                raise
            d = sol.x
            if not torch.isfinite(d).all():
                raise SolverError(
                    f"the solver {sol.message or type(self.solver).__name__} returned a "
                    "non-finite direction; raise the damping or use another solver."
                )
            gd = float(g @ d)
            if gnorm > 0 and not gd < 0:
                if self.damping.adaptive and tries < self.damping.max_tries:
                    self.damping.raise_for_retry()
                    continue
                raise SolverError(
                    f"the direction is not a descent direction (g^T d = {gd:.3g} >= 0) for "
                    f"{damped.name}; the matrix is indefinite or the solve inaccurate: raise the "
                    "damping, use CG() (which stops at negative curvature) or tighten tol."
                )
            evaluations = 0
            if sol.iterates and len(sol.iterates) > 1:
                d, gd, evaluations = self._backtrack_iterates(sol, d, loss_at, g)
            dAd = -gd if sol.exact else float(d @ damped.matvec(d))
            if gnorm == 0:
                dAd = 0.0
            elif not dAd > 0:
                dAd = float(d @ damped.matvec(d))
                if not dAd > 0:  # negative curvature along d: bound the step in the 2-norm
                    dAd = float(d @ d)
            ctx = StepContext(point.value, g, d, damped, dAd, sol, loss_at, kl_at)
            choice = self.step_rule.choose(ctx) if gnorm > 0 else None
            alpha = choice.alpha if choice else 0.0
            evaluations += choice.evaluations if choice else 0
            delta = alpha * d
            if self.momentum and self._prev_delta is not None:
                delta = delta + self.momentum * self._prev_delta
            if self.momentum and self._prev_delta is not None:
                quad = float(delta @ damped.matvec(delta))
            else:
                quad = alpha**2 * dAd
            gdelta = float(g @ delta)
            mquad = quad - lam * float(delta @ delta)  # delta^T M delta
            predicted = -(gdelta + 0.5 * mquad)
            loss_new = choice.loss_new if (choice and not self.momentum) else None
            if needs_rho and loss_new is None and alpha > 0:
                loss_new = loss_at(delta)
                evaluations += 1
            rho = actual = None
            if loss_new is not None:
                actual = point.value - loss_new
                rho = actual / predicted if predicted != 0 else (1.0 if actual >= 0 else -math.inf)
                if not math.isfinite(loss_new):
                    rho = -math.inf
            accepted = alpha > 0 or bool(self.momentum and self._prev_delta is not None)
            if self.damping.adaptive and rho is not None:
                self.damping.update(rho)
            if self.step_rule.adaptive and rho is not None:
                self.step_rule.update(rho)
            rejected = loss_new is not None and (
                not math.isfinite(loss_new) or (self.damping.reject and loss_new > point.value)
            )
            if rejected:
                accepted = False
                if tries < self.damping.max_tries:
                    continue
            break
        if accepted:
            self.space.set(theta0 + delta)
            self._prev_direction = d.detach().clone()
            self._prev_delta = delta.detach().clone()
            self.steps += 1
        message = "; ".join(m for m in (sol.message, choice.message if choice else "") if m)
        if not accepted:
            message = (message + "; " if message else "") + "step rejected: parameters unchanged"
        return StepInfo(
            loss=point.value, alpha=alpha, predicted_reduction=predicted, quad_form=quad,
            damping=lam, iterations=sol.iterations, residual=sol.residual,
            negative_curvature=sol.negative_curvature, grad_norm=gnorm,
            step_norm=float(delta.norm()) if accepted else 0.0, directional_derivative=gdelta,
            accepted=accepted, tries=tries, loss_new=loss_new, actual_reduction=actual, rho=rho,
            evaluations=evaluations, solver=type(self.solver).__name__, message=message,
        )

    @staticmethod
    def _backtrack_iterates(sol: Solution, d: Tensor, loss_at: Callable[[Tensor], float],
                            g: Tensor) -> tuple[Tensor, float, int]:
        """Martens 2010 section 4.6: from the last CG iterate go back while the loss drops."""
        cands = [sol.iterates[k] for k in sorted(sol.iterates)]
        if not torch.equal(cands[-1], d):
            cands.append(d)
        best, best_loss = cands[-1], loss_at(cands[-1])
        evals = 1
        for cand in reversed(cands[:-1]):
            value = loss_at(cand)
            evals += 1
            if value < best_loss:
                best, best_loss = cand, value
            else:
                break
        return best, float(g @ best), evals

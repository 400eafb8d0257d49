r"""The optimizer: one step of :math:`\delta = -\alpha (M + \lambda I)^{-1} g`.

``Optimizer.step(inputs, targets)`` evaluates the model (a :class:`~steepest.point.Point`),
builds M from the metric (on the whole batch or a curvature sub-batch), damps it, solves for
the direction d, picks alpha with the step rule, evaluates the loss at
:math:`\theta + \delta`, compares it with the quadratic model

.. math:: q(\delta) = L(\theta) + g^T\delta + \tfrac12 \delta^T M \delta \quad (M\ \text{undamped})

through the reduction ratio :math:`\rho = (L(\theta) - L(\theta+\delta)) / (q(0) - q(\delta))`,
accepts or rejects the step, updates lambda (:mod:`steepest.damping`) and the trust radius
(:mod:`steepest.steps`), and returns a frozen :class:`StepInfo`.

The step's pieces that are concepts of their own live apart, each imported one way (none
imports this module): :mod:`steepest.stepinfo` (what a step reports, MINPACK's convergence
tests), :mod:`steepest.trials` (the loss at trial points, the accepted trial's forward kept for
the next step), :mod:`steepest.hessian_free` (Martens 2010's CG preconditioners and
backtracking), :mod:`steepest.state` (a saved state checked before loading, a change of the
parameter set followed).

Guarantees
----------
- Validation happens before a parameter is touched.
- A step that *fails* (solver breakdown, a non-finite loss after the step with no retry left)
  raises a :class:`~steepest.errors.SteepestError` and leaves the parameters and the whole
  optimizer state (lambda, trust radius, momentum, warm start, generator) exactly as they were.
- A step that is *rejected* (the loss went up and the damping or trust region rejects such
  steps, or a line search found no acceptable alpha) is retried with a larger lambda / smaller
  radius up to ``max_tries`` solves; if every try is rejected, ``StepInfo.accepted`` is False and
  only lambda (raised) and an adaptive radius (shrunk) differ from before the call.

Example
-------
>>> opt = Optimizer(model, CrossEntropy(), metric=GGN(), damping=LevenbergMarquardt(1e-2))
>>> for _ in range(10):
...     info = opt.step(x, y)
>>> info.loss, info.rho, info.damping, info.accepted
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .damping import Damping, Trial, as_damping
from .distributed import DataParallel, as_data_parallel
from .errors import (
    ConfigurationError,
    NonFiniteError,
    ParameterChangeWarning,
    SingularMatrixError,
    SolverError,
    all_finite,
    check_tolerances,
)
from .guard import ForwardGuard
from .hessian_free import backtrack_iterates, keeping_iterates, preconditioner
from .linop import LinearOperator
from .losses import Loss, as_loss
from .metrics import GGN, GradientCovariance, Metric
from .params import ParamSpace
from .point import Graph, Inputs, Point
from .solvers import CG, Auto, Solution, Solver, as_solver
from .state import OptimizerState, follow_parameters
from .stepinfo import Notes, StepInfo
from .steps import LearningRate, StepContext, StepRule, as_step
from .stopping import StoppingTests, converged
from .trials import Batch, NextPoint, Trials, l2_penalty


class Optimizer(OptimizerState, StoppingTests):
    r"""Unified first/second-order optimizer on any ``nn.Module`` (000, problem (1)):
    :math:`\theta \leftarrow \theta + \alpha d`, :math:`d = -(M + \lambda I)^{-1} g`.

    Parameters
    ----------
    model: the module; its trainable parameters are theta (frozen ones never change)
    loss: a :class:`~steepest.losses.Loss` or a callable ``(z, y) -> (N,)`` per-sample loss
    metric: a row of Table 1 (:mod:`steepest.metrics`), default ``GGN()``
    damping: lambda >= 0 or a :mod:`steepest.damping` rule (``LevenbergMarquardt``;
        ``MoreTrustRegion`` damps with :math:`\lambda D^2` instead of :math:`\lambda I`);
        default None: 1e-3, but 0 for Newton (``Hessian()``) under an adaptive trust region,
        where a constant shift would make convergence only linear wherever the curvature is
        below it (the region already guards the step)
    solver: ``"auto"``, ``"cholesky"``, ``"cg"``, ``"woodbury"`` or a solver instance
    step: a :mod:`steepest.steps` rule or a float learning rate, default ``LearningRate(1.0)``
    momentum: heavy ball on the direction, mu in [0, 1):
        :math:`\tilde d_k = d_k + \mu \tilde d_{k-1}` and :math:`\delta_k = \alpha_k\tilde d_k`
        (the momentum buffer of ``torch.optim.SGD`` with the second-order direction in place of
        the gradient); the step rule (line search, trust region) sees :math:`\tilde d_k`. When
        :math:`g^T\tilde d_k \ge 0` the buffer restarts from :math:`d_k`. Default 0 (off).
    warm_start: zeta in [0, 1): CG starts from :math:`\zeta\, x_{k-1}`, the previous CG solution
        (Martens 2010 section 4.5 uses 0.95); 0 starts from zero
    preconditioner: for CG, None, ``"diagonal"`` (:math:`\mathrm{diag}(M) + \lambda`, M on the
        curvature batch) or ``"empirical-fisher"``
        (:math:`(\mathrm{diag}(\frac1N\sum_i \nabla l_i \odot \nabla l_i) + \lambda)^\xi`,
        Martens 2010 section 4.7, on the gradient batch)
    xi: the exponent of the empirical-Fisher preconditioner, in (0, 1] (Martens: 3/4)
    cg_backtracking: keep the CG iterates at :math:`\lceil 1.3^j \rceil` and, going back from the
        last, take the one with the lowest actual loss (Martens 2010 section 4.6); needs CG
    curvature_batch_size: products of M on a random sub-batch of this size, drawn with
        ``generator`` (the gradient stays on the whole batch); or pass ``curvature=(x, y)`` to
        :meth:`step`
    generator: the ``torch.Generator`` for sampling (MC Fisher, sub-batches); seeded 0 if None
    distributed: data parallelism over the ranks of ``torch.distributed``
        (:mod:`steepest.distributed`): None (one process), True (the default process group)
        or a :class:`~steepest.distributed.DataParallel`. Each rank passes its shard of the
        batch to :meth:`step`; the step is the one of the concatenated batch, identical on
        every rank. A model wrapped in ``DistributedDataParallel`` is unwrapped (steepest
        reduces, not DDP) and its process group used. ``curvature_batch_size`` is then per rank.

    In a training loop (README, "Training loops"): buffers (BatchNorm's running statistics)
    move once per step, from the forward at theta; trial evaluations run on copies of them and
    with the random state of the step's forward (the same Dropout masks); a failed step puts
    them back. The trainable set is read at every step: a frozen parameter never changes, a
    replaced or unfrozen one is trained, and state on the old flat vector is reset with a
    :class:`~steepest.errors.ParameterChangeWarning`. A ``torch.compile``'d module is run
    through its original module ``_orig_mod`` (compiled graphs have no double backward).
    float16/bfloat16 and meta-device parameters are refused by name.

    ftol, xtol, gtol: stopping rules with MINPACK's meanings (default 1e-8, 1e-8, 0), checked on
        every try: ftol on the relative actual and predicted reductions of L, xtol on the step
        norm relative to :math:`\|\theta\| +` xtol; gtol, checked at the start of a step, is
        MINPACK's cosine for an MSE loss (no weight decay), the largest cosine between the
        residual :math:`r = (z - y)/\sigma` and a column of its Jacobian,
        :math:`\max_j |J_j^T r| / (\|J_j\| \|r\|) = \max_j |g_j| / \sqrt{2 L\, G_{jj}}`
        (G the GGN of MSE: its diagonal read from the metric's M when M is GaussNewton, GGN
        or the exact Fisher on the whole batch, else one GGN diagonal more per step), and
        :math:`\max_j |g_j|` for any other loss, which has no residuals. gtol's default 0
        (off) spares that diagonal; ``gtol=1e-8`` with MSE, GaussNewton and MoreTrustRegion is
        scipy's ``least_squares(method="lm")`` with its default tolerances, try for try
        (benchmarks/fit.md). When one fires, ``StepInfo.converged`` is True with the
        ``reason`` and no further try is made: a converged run no longer burns its tries on
        rejected steps. Set a tolerance to 0 to turn it off.

    reuse: when a step is accepted, its trial's forward at :math:`\theta + \delta` becomes the
        next step's point (:class:`~steepest.point.Point` built on that forward's autograd
        graph, :mod:`steepest.trials`) instead of a new forward, as MINPACK reuses the accepted
        trial's residuals: one loss evaluation fewer per step (``StepInfo.nfev``). The trials
        then keep their graph (the last one only: one extra set of activations in memory), and
        only while the batch is the previous step's (a full-batch fit; mini-batches keep none).
        The next step reuses it only when it sees the same batch (the same tensor objects,
        unmodified: identity and ``_version``), loss, training flags and buffers, and
        parameters equal to the trial's bit for bit, and when the trial's forward drew no
        random numbers and wrote no buffer (Dropout or BatchNorm in training mode never reuse):
        then the point is bit for bit the fresh one, and so is the run, also across
        ``state_dict`` / ``load_state_dict`` (the kept forward is not state: a loaded or resumed
        optimizer evaluates its first point afresh, with the same result). Off under
        torch.distributed and in :class:`~steepest.TorchOptimizer` (a closure may compute
        anything), and after a failed step. Default True; False evaluates every point afresh.

    The number of solves per step is bounded by ``max(damping.max_tries, step.max_tries)``.

    Example
    -------
    >>> opt = Optimizer(model, MSE(), metric=GaussNewton(), damping=LevenbergMarquardt(1e-3))
    >>> info = opt.step(x, y)          # info.rho, info.damping, info.accepted
    >>> hf = Optimizer(model, CrossEntropy(), metric=GGN(), solver=CG(maxiter=50,
    ...                progress_tol=5e-4), damping=LevenbergMarquardt(1.0), warm_start=0.95,
    ...                cg_backtracking=True, preconditioner="empirical-fisher",
    ...                curvature_batch_size=256)          # Hessian-free (Martens 2010)
    """

    def __init__(
        self,
        model: nn.Module,
        loss: Loss | Callable[[Tensor, Tensor], Tensor],
        metric: Metric | None = None,
        damping: Damping | float | None = None,
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
        distributed: DataParallel | bool | None = None,
        ftol: float = 1e-8,
        xtol: float = 1e-8,
        gtol: float = 0.0,
        reuse: bool = True,
    ) -> None:
        from .metrics import Hessian

        if not isinstance(model, nn.Module):
            raise ConfigurationError(
                f"model must be a torch.nn.Module, got {type(model).__name__}."
            )
        self.distributed, model = as_data_parallel(distributed, model)
        orig = getattr(model, "_orig_mod", None)
        if isinstance(orig, nn.Module) and type(model).__name__ == "OptimizedModule":
            model = orig  # torch.compile'd: its graphs have no double backward (J v, H v)
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
        self.solver = as_solver(solver)
        self.step_rule = LearningRate(1.0) if step is None else as_step(step)
        if damping is None:
            newton_tr = isinstance(self.metric, Hessian) and self.step_rule.adaptive
            damping = 0.0 if newton_tr else 1e-3
        self.damping = as_damping(damping)
        for name, val in (("momentum", momentum), ("warm_start", warm_start)):
            if not (isinstance(val, int | float) and 0 <= val < 1):
                raise ConfigurationError(f"{name} must lie in [0, 1), got {val!r}.")
        if preconditioner not in (None, "diagonal", "empirical-fisher"):
            raise ConfigurationError(
                f"preconditioner must be None, 'diagonal' or 'empirical-fisher', got "
                f"{preconditioner!r}."
            )
        if not (isinstance(xi, int | float) and 0 < xi <= 1):
            raise ConfigurationError(f"xi must lie in (0, 1], got {xi!r} (Martens: 0.75).")
        for name, on in (
            ("preconditioner", preconditioner is not None),
            ("cg_backtracking", cg_backtracking),
        ):
            if on and not isinstance(self.solver, CG):
                raise ConfigurationError(
                    f"{name} needs the CG solver, got {self.solver!r}; pass solver=CG(...)."
                )
        if curvature_batch_size is not None and not (
            isinstance(curvature_batch_size, int) and curvature_batch_size >= 1
        ):
            raise ConfigurationError(
                f"curvature_batch_size must be a positive integer, got {curvature_batch_size!r}."
            )
        check_tolerances(ftol=ftol, xtol=xtol, gtol=gtol)
        self.ftol, self.xtol, self.gtol = float(ftol), float(xtol), float(gtol)
        if not isinstance(reuse, bool):
            raise ConfigurationError(f"reuse must be True or False, got {reuse!r}.")
        self.reuse = reuse
        self._next: NextPoint | None = None  # the accepted trial's forward, for the next step
        self._batch: Batch | None = None  # the previous step's batch
        self._keep_graph = False  # this step's trials keep their graph
        self._points = 1  # points whose derivatives this step took (StepInfo.njev)
        self.momentum, self.warm_start = float(momentum), float(warm_start)
        self.preconditioner, self.xi = preconditioner, float(xi)
        self.cg_backtracking = bool(cg_backtracking)
        self.curvature_batch_size = curvature_batch_size
        if generator is None:
            generator = torch.Generator(device=self.space.device)
            generator.manual_seed(0)
        self.generator = generator
        self._sampler = generator  # this step's generator (per rank under torch.distributed)
        self.steps = 0
        self._guard: ForwardGuard | None = None  # the buffers/RNG guard of the running step
        # set by TorchOptimizer: weight decay eta_j (an L2 term in the objective, its gradient
        # and eta in M) and per-group learning rates (a scaling of each block of the step)
        self._l2: Tensor | None = None
        # eta as the metric sees it when it differs from the gradient's (TorchOptimizer: an
        # unused parameter's decay is masked out of g but kept in M, see torch_optim)
        self._l2_metric: Tensor | None = None
        self._step_scale: Tensor | None = None
        self._prev_solution: Tensor | None = None  # last CG solution x_{k-1}, for warm start
        self._momentum_buffer: Tensor | None = None  # d~_{k-1}

    def __getstate__(self) -> dict:
        """Copies and pickles leave out the kept forward of ``reuse`` (an autograd graph, not
        state) and the weak references to the previous batch: a copy evaluates its first point
        afresh, with the same result."""
        state = self.__dict__.copy()
        state["_next"] = state["_batch"] = None
        return state

    @property
    def max_tries(self) -> int:
        """The most solves one step makes (rejected tries are retried up to this bound)."""
        return max(self.damping.max_tries, self.step_rule.max_tries)

    # ------------------------------------------------------------------ the step
    def point(self, inputs: Inputs, targets: Tensor, graph: Graph | None = None) -> Point:
        """The model and loss evaluated at the current parameters on a batch (``graph``: the
        forward an accepted trial already made there)."""
        return Point(
            self.space,
            self.loss,
            inputs,
            targets,
            generator=self._sampler,
            distributed=self.distributed,
            record=self._record(),
            graph=graph,
        )

    def step(
        self, inputs: Inputs, targets: Tensor, curvature: tuple[Inputs, Tensor] | None = None
    ) -> StepInfo:
        """One step on the batch (inputs, targets); returns a :class:`StepInfo`.

        ``curvature=(x_c, y_c)`` computes M on another (smaller) batch than the gradient.
        On an exception the parameters and the optimizer state are restored.
        """
        if torch.is_inference_mode_enabled():
            raise ConfigurationError(
                "step() cannot run under torch.inference_mode() (it needs autograd); call it "
                "outside the inference_mode block."
            )
        self._curvature_given = curvature is not None
        saved = self._rollback_state()  # its generator state is the shared one
        space0, theta0 = self.space, None
        guard = ForwardGuard(getattr(self, "model", None))
        kept, self._next = self._next, None  # the previous step's accepted trial, if any
        with guard:
            try:
                note = self._follow_parameters()
                if self.distributed is not None:  # independent samples per rank, one state
                    self._sampler = self.distributed.generator(self.generator)
                reused = (
                    kept is not None
                    and not note
                    and kept.matches(self.space, self.loss, inputs, targets)
                )
                # validates; raises before any change. Reused (only Optimizer's own point):
                # the forward at theta was the accepted trial's, no new one
                point = (
                    self.point(inputs, targets, kept.graph)
                    if reused
                    else self.point(inputs, targets)
                )
                guard.point_done()
                theta0 = point.theta.detach().clone()
                self._guard = guard
                # keep trial graphs when the batch is the previous step's (a full-batch fit):
                # not for mini-batches, whose next step sees another batch
                self._keep_graph = self._reuses() and (
                    self._batch is None or self._batch.same(inputs, targets)
                )
                self._batch = Batch(inputs, targets) if self._reuses() else None
                self._points = 1
                info = self._step(point, inputs, targets, curvature, theta0, saved)
            except BaseException:
                self._next = None
                if theta0 is not None:
                    self.space.set(theta0)
                self.space = space0
                self._load_state(saved)
                guard.rollback()
                raise
            finally:
                self._guard = None
        info = dataclasses.replace(info, nfev=int(not reused) + info.evaluations, njev=self._points)
        if note:
            info = dataclasses.replace(
                info, message="; ".join(m for m in (note, info.message) if m)
            )
        return info

    def _record(self) -> tuple[type, ...]:
        """The module types whose calls the step's forwards record for the metric (K-FAC's
        ``record_layers``: its factors then need no forward of their own); none when the
        metric is built on a curvature sub-batch (``curvature_batch_size`` or ``step``'s
        ``curvature``), whose point has a forward of its own."""
        if self.curvature_batch_size is not None or self._curvature_given:
            return ()
        return tuple(getattr(self.metric, "record_layers", ()))

    _curvature_given = False  # this step's M comes from step(curvature=...)

    def _reuses(self) -> bool:
        """Whether this optimizer may reuse the accepted trial's forward (``reuse`` on, one
        process, its own Point: a closure point (TorchOptimizer) may compute anything)."""
        return self.reuse and self.distributed is None and type(self).point is Optimizer.point

    def _follow_parameters(self) -> str:
        """Follow a change of the model's trainable parameters since the last step
        (:func:`~steepest.state.follow_parameters`): theta becomes the new set. When only the
        tensors changed the state is kept; otherwise the state that lives on the old flat
        vector (the previous CG solution, the momentum buffer, a damping rule's scaling D, a
        metric's running factors) is reset, with a
        :class:`~steepest.errors.ParameterChangeWarning`. Returns a note for
        ``StepInfo.message`` ('' when nothing changed)."""
        change = follow_parameters(self.space)
        self.space = change.space
        if change.layout_changed:
            self._prev_solution = self._momentum_buffer = None
            self.damping.parameters_changed()
            reset = getattr(self.metric, "parameters_changed", None)  # a metric with state
            if callable(reset):
                reset()
            warnings.warn(change.note, ParameterChangeWarning, stacklevel=3)
        return change.note

    def _curvature_point(self, point: Point, curvature: tuple[Inputs, Tensor] | None) -> Point:
        """The point M is built on: ``curvature`` given to ``step``, a random sub-batch of
        ``curvature_batch_size`` samples, or the step's own point."""
        if curvature is not None:
            xs, ys = curvature
        else:
            k = self.curvature_batch_size
            # under torch.distributed every rank builds the sub-batch point (its reduction is a
            # collective), also one whose shard is not larger than k
            if k is None or (k >= point.n and self.distributed is None):
                return point
            idx = torch.randperm(point.n, generator=self._sampler, device=self._sampler.device)
            idx = idx[:k].to(point.z.device)
            x = point.inputs
            xs = tuple(t[idx] for t in x) if isinstance(x, tuple) else x[idx]
            ys = point.y[idx]
        self._points += 1
        with (self._guard or ForwardGuard()).trial():  # like a trial's forward: buffers kept
            return Point(
                self.space, self.loss, xs, ys, generator=self._sampler, distributed=self.distributed
            )

    def _operator(self, metric: Metric, point: Point) -> LinearOperator:
        """The metric's M on the point; under torch.distributed the whole batch's
        (:meth:`~steepest.distributed.DataParallel.operator`)."""
        if self._guard is not None:  # K-FAC's capture forward: the point's buffers and masks
            with self._guard.trial():
                op = metric.operator(point)
        else:
            op = metric.operator(point)
        if self.distributed is None or getattr(metric, "reduces_over_ranks", False):
            return op
        return self.distributed.operator(op, point.n, point.n_total)

    def _preconditioner_base(self, point: Point, op: LinearOperator) -> Tensor | None:
        """diag(M) (clipped at 0) or diag of the empirical Fisher; lambda is added per try."""
        if self.preconditioner is None:
            return None
        if self.preconditioner == "diagonal":
            return op.diagonal().clamp_min(0)
        return self._operator(GradientCovariance(), point).diagonal()  # = empirical Fisher

    def _solve(
        self, a: LinearOperator, b: Tensor, pre_base: Tensor | None, x0: Tensor | None
    ) -> Solution:
        if not isinstance(self.solver, CG):
            return self.solver.solve(a, b, x0)
        solver = keeping_iterates(self.solver) if self.cg_backtracking else self.solver
        pre = preconditioner(self.preconditioner, pre_base, a.shift, self.xi)
        return solver.solve(a, b, x0=x0, preconditioner=pre)

    def _solver_name(self, a: LinearOperator) -> str:
        solver = self.solver.choose(a) if isinstance(self.solver, Auto) else self.solver
        return type(solver).__name__

    def _step(
        self,
        point: Point,
        inputs: Inputs,
        targets: Tensor,
        curvature: tuple[Inputs, Tensor] | None,
        theta0: Tensor,
        saved: dict,
    ) -> StepInfo:
        value0, g = point.value, point.grad
        if self._l2 is not None:  # weight decay: L + 1/2 sum_j eta_j theta_j^2 (TorchOptimizer)
            value0 = value0 + l2_penalty(self._l2, theta0)
            g = g + self._l2 * theta0
        gnorm = float(g.norm())
        cosine = self.gtol > 0 and self._least_squares()
        stop = self._gradient_stop(value0, g, gnorm, cosine)
        if stop is not None:
            return stop
        if isinstance(self.step_rule, LearningRate) and self.step_rule.alpha == 0:
            return StepInfo.no_step(
                value0,
                self.damping.value,
                gnorm,
                "learning rate 0 (e.g. a scheduler at its minimum): no step taken, no solve, "
                "damping unchanged",
            )
        # the metric's state before its operator is built (a gtol stop puts it back; taken
        # here, after a change of the parameters' layout has reset it, not from ``saved``)
        before = self._metric_state() if cosine else None
        cpoint = self._curvature_point(point, curvature)
        op = self._operator(self.metric, cpoint)
        if cosine:
            stop = self._cosine_stop(point, cpoint, op, value0, g, gnorm)
            if stop is not None:  # no step: the operator's build (a stateful metric's
                # refresh, a sub-batch draw) is undone
                self.generator.set_state(saved["generator"])
                self._set_metric_state(before)
                return stop
        if self._l2 is not None:  # after the reduction over ranks: eta is not a mean
            # M + diag(eta), eta part of M (the curvature of the L2 term), not damping; the
            # metric's own inverse is kept where it stays exact (LinearOperator.plus_diagonal)
            eta = self._l2 if self._l2_metric is None else self._l2_metric
            op = op.plus_diagonal(eta, name=f"{op.name} + weight decay")
        trials = Trials(
            self.space,
            self.loss,
            inputs,
            targets,
            theta0,
            point.z.detach(),
            self._guard,
            point,
            self._l2,
            keep_graph=self._keep_graph,
            record=self._record(),
        )
        pre_base = self._preconditioner_base(point, op)
        x0 = None
        if self.warm_start and self._prev_solution is not None:
            x0 = self.warm_start * self._prev_solution
        reject_increase = self.damping.reject or self.step_rule.reject
        notes = Notes()
        xnorm = float(theta0.norm())
        reason = ""
        solutions: dict[float, Solution] = {}
        tries = 0
        while True:
            tries += 1
            damped = self.damping.damped(op, g, theta0)
            lam = self.damping.value
            retry = tries < self.max_tries
            # --- direction d = -(M + lambda I)^-1 g (M + lambda D^2 for a scaled rule)
            sol = solutions.get(lam)
            if sol is None:
                try:
                    sol = self._solve(damped, -g, pre_base, x0)
                except SingularMatrixError as err:
                    if not self.damping.adaptive:
                        raise
                    # an adaptive rule keeps the raised lambda even after the last try, so the
                    # next step starts from it (no livelock of restored lambdas)
                    self.damping.raise_for_retry()
                    notes.add(
                        "singular",
                        f"{damped.name} not positive definite: damping raised ({self.damping!r})",
                    )
                    if retry:
                        continue
                    return self._unsolved(value0, gnorm, lam, tries, notes, saved, str(err))
                if not all_finite(sol.x):
                    raise SolverError(
                        f"the solver ({sol.message or self._solver_name(damped)}) returned a "
                        "non-finite direction; raise the damping or use another solver."
                    )
                if not float(g @ sol.x) < 0:
                    if self.damping.adaptive:
                        self.damping.raise_for_retry()
                        notes.add(
                            "descent",
                            f"no descent direction at lambda {lam:.3g}: "
                            f"damping raised ({self.damping!r})",
                        )
                        if retry:
                            continue
                        return self._unsolved(
                            value0, gnorm, lam, tries, notes, saved, "no descent direction"
                        )
                    raise SolverError(
                        f"the direction is not a descent direction (g^T d = "
                        f"{float(g @ sol.x):.3g} >= 0) for {damped.name}; the matrix is "
                        "indefinite or the solve inaccurate: raise the damping, use CG() (which "
                        "stops at negative curvature), Cholesky(indefinite='clip') or tighten tol."
                    )
                solutions[lam] = sol
            d = sol.x
            if sol.iterates:
                d = backtrack_iterates(sol, g, trials.loss_at)
            if self._momentum_buffer is not None and self.momentum:
                dm = d + self.momentum * self._momentum_buffer
                if float(g @ dm) < 0:
                    d = dm
                else:
                    notes.add("momentum", "momentum restarted (g^T d~ >= 0)")
            direction = d  # what the momentum buffer keeps
            if self._step_scale is not None:  # per-group learning rates (TorchOptimizer)
                d = self._step_scale * d
            gd = float(g @ d)
            # --- d^T (M + lambda I) d: free for an exact solve, one product otherwise
            dAd = -gd if (sol.exact and d is sol.x) else float(d @ damped.matvec(d))
            norm2 = dAd if dAd > 0 else -gd  # negative curvature: measure d by -g^T d > 0
            ctx = StepContext(value0, g, d, damped, norm2, sol, trials.loss_at, trials.kl_at)
            choice = self.step_rule.choose(ctx)
            alpha = float(choice.alpha)
            delta = alpha * d
            gdelta = alpha * gd
            quad = alpha * alpha * dAd  # inf, not OverflowError, for a huge alpha
            # q uses M undamped: remove the damping term delta^T S delta from the damped quad
            predicted = -(gdelta + 0.5 * (quad - damped.damping_quad(delta)))
            loss_new = actual = rho = None
            if alpha > 0:
                loss_new = choice.loss_new
                if loss_new is None:
                    loss_new = trials.loss_at(delta)
                actual = value0 - loss_new
                finite = math.isfinite(loss_new)
                rho = actual / predicted if (predicted > 0 and finite) else -math.inf
            # --- adapt lambda and the radius, accept or reject
            self.damping.update(
                -math.inf if rho is None else rho,
                Trial(delta if alpha > 0 else None, gdelta, value0, loss_new),
            )
            self.step_rule.update(-math.inf if rho is None else rho)
            if loss_new is None:
                rejected, why = True, choice.message or "the step rule chose alpha = 0"
            elif not math.isfinite(loss_new):
                rejected, why = True, "the loss is not finite after the step"
            elif reject_increase and loss_new > value0:
                rejected, why = True, f"the loss went up ({value0:.6g} -> {loss_new:.6g})"
            elif rho is not None and rho < self.damping.min_rho:
                rejected, why = (
                    True,
                    (
                        f"rho = {rho:.3g} below {self.damping.min_rho:g}: the "
                        "decrease is too small for the model's prediction"
                    ),
                )
            else:
                rejected, why = False, ""
            if self.ftol > 0 or self.xtol > 0:
                reason = converged(
                    self.ftol, self.xtol, value0, actual, predicted, rho, float(delta.norm()), xnorm
                )
            if rejected and retry and not reason:
                notes.add("rejected", f"try rejected: {why}")
                continue
            break
        if (
            loss_new is not None
            and not math.isfinite(loss_new)
            and not (reject_increase or self.damping.adaptive or self.step_rule.adaptive)
        ):
            # nothing adapts to a non-finite trial loss: the same step would fail again
            raise NonFiniteError(
                f"the loss is not finite after the step (alpha {alpha:.3g}, lambda {lam:.3g}, "
                f"{tries} tries) with {self.damping!r} and {self.step_rule!r}; parameters and "
                "optimizer state are unchanged. Raise the damping, use an adaptive rule "
                "(damping=LevenbergMarquardt() or step=TrustRegion(adaptive=True)), a smaller "
                "step or a line search (Armijo())."
            )
        accepted = not rejected
        if accepted:
            graph = trials.graph_at(delta)
            if graph is not None:  # the next step's point, if it sees the same batch
                self._next = NextPoint(graph, self.model, self.loss, inputs, targets)
            self.space.set(theta0 + delta)
            self._prev_solution = sol.x.detach().clone()
            self._momentum_buffer = direction.detach().clone() if self.momentum else None
            self.steps += 1
        else:
            self.generator.set_state(saved["generator"])
            notes.add("step", f"step rejected: {why}; parameters unchanged")
        if reason:
            notes.add("converged", f"converged ({reason})")
        message = "; ".join(m for m in (sol.message, choice.message, *notes.render()) if m)
        return StepInfo(
            loss=value0,
            alpha=alpha,
            predicted_reduction=predicted,
            quad_form=quad,
            damping=lam,
            iterations=sol.iterations,
            residual=sol.residual,
            negative_curvature=sol.negative_curvature,
            grad_norm=gnorm,
            step_norm=float(delta.norm()) if accepted else 0.0,
            directional_derivative=gdelta,
            accepted=accepted,
            tries=tries,
            loss_new=loss_new,
            actual_reduction=actual,
            rho=rho,
            evaluations=trials.count,
            solver=self._solver_name(damped),
            message=message,
            converged=bool(reason),
            reason=reason,
        )

    def _unsolved(
        self,
        value0: float,
        gnorm: float,
        lam: float,
        tries: int,
        notes: Notes,
        saved: dict,
        why: str,
    ) -> StepInfo:
        """A step none of whose tries gave a usable direction: rejected, parameters unchanged,
        lambda left raised."""
        self.generator.set_state(saved["generator"])
        notes.add("step", f"step rejected: {why}; parameters unchanged")
        return StepInfo.no_step(
            value0, lam, gnorm, "; ".join(notes.render()), residual=math.inf, tries=tries
        )

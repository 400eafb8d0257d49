r"""A ``torch.optim.Optimizer`` for the unified step
:math:`\delta = -\alpha (M + \lambda I)^{-1} g` (000, problem (1) and Appendix A).

:class:`TorchOptimizer` lets the optimizers of :mod:`steepest` drop into existing PyTorch
training loops: ``step(closure)``, ``zero_grad()``, ``param_groups``, learning-rate schedulers
(``param_groups[g]["lr"]`` is the alpha of the :class:`~steepest.steps.LearningRate` rule and
``["momentum"]`` the heavy-ball mu), and ``state_dict()`` / ``load_state_dict()`` in the
``torch.optim`` format. The step itself is the one of :class:`steepest.Optimizer` (metric,
damping, solver, step rule, acceptance and roll-back), computed from the autograd graph of what
the closure returns instead of from a module and a batch.

The closure contract (the closure evaluates the *same* batch each time it is called, with
gradients enabled, and must not call ``backward()``: the optimizer differentiates the result):

==============================================  ============================================
metric                                          the closure returns
==============================================  ============================================
``Identity()``, ``Hessian()``                   the scalar loss :math:`L = \frac1N\sum_i l_i`
                                                (or the per-sample losses, or
                                                ``(outputs, targets)``)
``GradientCovariance()``, ``EmpiricalFisher()``  the per-sample losses :math:`(l_i)_i`, shape
                                                (N,), or ``(outputs, targets)``
``GaussNewton()``, ``GGN()``, ``Fisher()``       ``(outputs, targets)``: the model outputs z
                                                (with their graph) and the targets y;
                                                ``loss=`` gives :math:`l(y, z)`
==============================================  ============================================

From ``(outputs, targets)`` the products are built on the closure's graph: :math:`J^T u` by
one backward pass, :math:`J v` by the double-backward trick (differentiate
:math:`u \mapsto J^T u` once more), :math:`H v` by reverse over reverse on the gradient graph.
Only the parameters given to the optimizer are in theta; others are held fixed.

Example
-------
>>> opt = TorchOptimizer(model.parameters(), loss=CrossEntropy(), metric=GGN(), lr=1.0,
...                      damping=LevenbergMarquardt(1e-2))
>>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
>>> for x, y in loader:
...     opt.step(lambda: (model(x), y))
...     sched.step()
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .closure_point import (
    _OUTPUTS,
    Closure,
    ClosurePoint,
    _accepted_kinds,
    _ClosureLoss,
    _ClosureSpace,
)
from .damping import Damping
from .distributed import DataParallel, as_data_parallel
from .errors import ConfigurationError, ParameterChangeWarning
from .losses import Loss, as_loss
from .metrics import GGN, Metric
from .optimizer import Optimizer, StepInfo
from .solvers import Solver
from .steps import KLLineSearch, LearningRate, StepRule

_STATE_KEY = "steepest"


class _ClosureOptimizer(Optimizer):
    """:class:`steepest.Optimizer` whose Point comes from a closure, not from (x, y)."""

    def __init__(self, space: _ClosureSpace, loss: Loss | None, *args: Any, **kw: Any) -> None:
        holder = nn.Module()
        holder.anchor = nn.Parameter(torch.zeros(1, dtype=space.dtype, device=space.device))
        super().__init__(holder, _ClosureLoss(loss), *args, **kw)
        self.space, self.user_loss = space, loss

    def point(self, inputs: Any, targets: Any) -> ClosurePoint:
        point = ClosurePoint(
            self.space,
            self.user_loss,
            inputs,
            self.metric,
            generator=self._sampler,
            need_per_sample=self.preconditioner == "empirical-fisher",
            need_outputs=isinstance(self.step_rule, KLLineSearch),
            distributed=self.distributed,
        )
        self.closure_loss = point.value  # the closure's loss, without a weight-decay term
        if point.unused:  # as torch.optim skips a parameter whose grad is None: a zero block
            mask = torch.ones(self.space.size, dtype=self.space.dtype, device=self.space.device)
            for i, block in enumerate(torch.split(mask, self.space.numels)):
                if i in point.unused:
                    block.zero_()
            self._step_scale = mask if self._step_scale is None else self._step_scale * mask
            if self._l2 is not None:
                # an unused parameter's rows of M are zero and its step is zeroed, so the decay
                # M keeps there changes no other step; kept, one shared decay stays uniform
                # and K-FAC/EKFAC keep their own inverse (review: masked, it fell to CG)
                self._l2_metric, self._l2 = self._l2, self._l2 * mask
        return point


# ------------------------------------------------------------------------------ the adapter
class TorchOptimizer(torch.optim.Optimizer):
    r"""The step :math:`\delta = -\alpha (M + \lambda I)^{-1} g` as a ``torch.optim.Optimizer``.

    Parameters
    ----------
    params: ``model.parameters()``, a list of tensors, a list of param-group dicts, or an
        ``nn.Module`` (its trainable parameters). As in ``torch.optim``, the parameters of the
        groups are read at every step: those with ``requires_grad=False`` are skipped, and
        those the closure's result does not depend on get a zero gradient (their block of
        the step is zero unless weight decay moves them). A module replaced after construction
        is not trained until its parameters are added (``add_param_group``); the old ones stay
        in theta with a zero gradient. When the set changes, the state on the old flat vector
        is reset with a :class:`~steepest.errors.ParameterChangeWarning`. All groups are solved
        together (M couples them), so they share ``momentum``.
    loss: a :class:`~steepest.losses.Loss` (or a callable ``(z, y) -> (N,)``), needed when the
        closure returns ``(outputs, targets)`` (the Gauss-Newton/Fisher family).
    metric: a row of Table 1 (:mod:`steepest.metrics`), default ``GGN()``.
    lr: alpha of the :class:`~steepest.steps.LearningRate` rule, ``param_groups[g]["lr"]``
        (schedulers change it; at lr = 0 no step is taken, and no solve made). Groups with
        different learning rates :math:`\alpha_k` scale their blocks of one direction:
        :math:`\delta_k = \alpha_k \tilde d_k`, :math:`d = -(M + \lambda I)^{-1} g` solved for
        all groups at once (the momentum buffer keeps the unscaled :math:`\tilde d`). Ignored
        when ``step`` is another rule, which picks alpha itself (then the groups must share lr).
    weight_decay: eta >= 0, ``param_groups[g]["weight_decay"]``: the L2 term
        :math:`\tfrac12\sum_j \eta_j\theta_j^2` added to the objective, so its gradient
        :math:`\eta\theta` joins g, its curvature :math:`\mathrm{diag}(\eta)` joins M (part of
        the metric, not of the damping), and the losses of rho and of the line searches include
        it (``StepInfo.loss`` is then the objective with the L2 term; ``step()`` returns the
        closure's loss as ``torch.optim`` does). The metric's own inverse stays the solver
        (:meth:`~steepest.linop.LinearOperator.plus_diagonal`): ``Diagonal`` for any eta,
        ``KFAC`` and ``EKFAC`` for one decay shared by all parameters (their inverse at
        :math:`\lambda + \eta`); with different decays per group, K-FAC and EKFAC have no
        Kronecker inverse of :math:`M + \mathrm{diag}(\eta)` and ``solver="auto"`` falls back
        to Cholesky (small P) or CG.
    damping: lambda >= 0 or a :mod:`steepest.damping` rule (``LevenbergMarquardt``); default
        None, the rule of :class:`steepest.Optimizer`: 1e-3, but 0 for Newton (``Hessian()``)
        under an adaptive trust region (``step=TrustRegion(adaptive=True)``), where a constant
        shift would make convergence only linear wherever the curvature is below it.
    solver: ``"auto"``, ``"cholesky"``, ``"cg"``, ``"woodbury"`` or a solver instance.
    step: None (``LearningRate(lr)``) or a :mod:`steepest.steps` rule (``TrustRegion``,
        ``Armijo``, ``KLLineSearch``).
    momentum: heavy-ball mu, ``param_groups[g]["momentum"]``.
    warm_start, preconditioner, xi, cg_backtracking, generator: as in
        :class:`steepest.Optimizer`.
    ftol, xtol, gtol: the stopping rules of :class:`steepest.Optimizer` (MINPACK's meanings;
        defaults 1e-8, 1e-8, 0): ``opt.last_info.converged`` and ``.reason`` say when one
        fired; a converged step takes no further tries (the caller decides to stop).
    distributed: data parallelism over ``torch.distributed`` ranks, as in
        :class:`steepest.Optimizer` (None, True or a
        :class:`~steepest.distributed.DataParallel`): each rank's closure evaluates its shard
        and returns per-sample losses or ``(outputs, targets)``. A
        ``DistributedDataParallel`` passed as ``params`` gives its parameters and process
        group; the closure may call it or its ``.module`` (steepest differentiates with
        ``torch.autograd.grad``, so DDP's own gradient all-reduce never runs).

    ``step(closure)`` returns the loss before the step (a 0-dim tensor) like ``torch.optim``;
    the full :class:`~steepest.optimizer.StepInfo` is ``opt.last_info``. A step that raises
    leaves the parameters and the optimizer state unchanged.

    Per-sample Jacobians and gradients (the dense and Woodbury solvers, ``Diagonal``,
    ``diagonal()``) come by ``torch.func.vmap`` over one-sample calls of the module whose output
    the closure returns, when it holds all the parameters, takes the batch as positional tensors
    and has no BatchNorm or Dropout in training mode; otherwise (outputs changed outside any
    module, such layers, a model vmap cannot trace) by a batched backward through the closure's
    graph, exact for any model but slower. Each step checks the vmapped rows against the batch
    (the one-sample outputs against the outputs, a random contraction of the rows against one
    backward) and takes the batched route where they differ, so a model that mixes its samples
    in its own way (``h - h.mean(0)``) or whose outputs are not per sample gets the right
    curvature (:mod:`steepest.closure_point`).

    Examples
    --------
    >>> opt = TorchOptimizer(model, loss=MSE(), metric=GGN(), damping=LevenbergMarquardt(1e-2))
    >>> loss = opt.step(lambda: (model(x), y))           # Gauss-Newton family
    >>> opt = TorchOptimizer(model, metric=Hessian(), damping=1e-2, solver=CG())
    >>> loss = opt.step(lambda: F.mse_loss(model(x), y))  # Newton: the scalar loss
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict] | nn.Module,
        loss: Loss | Callable[[Tensor, Tensor], Tensor] | None = None,
        metric: Metric | None = None,
        lr: float = 1.0,
        damping: Damping | float | None = None,
        solver: Solver | str = "auto",
        step: StepRule | None = None,
        *,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        warm_start: float = 0.0,
        preconditioner: str | None = None,
        xi: float = 0.75,
        cg_backtracking: bool = False,
        generator: torch.Generator | None = None,
        distributed: DataParallel | bool | None = None,
        ftol: float = 1e-8,
        xtol: float = 1e-8,
        gtol: float = 0.0,
    ) -> None:
        distributed, params = as_data_parallel(distributed, params)
        _check_weight_decay(weight_decay)
        if isinstance(params, nn.Module):
            params = [p for p in params.parameters() if p.requires_grad]
        _check_hyper(lr, momentum)
        if step is not None and not isinstance(step, StepRule):
            raise ConfigurationError(
                f"step must be None (LearningRate(lr)) or a steepest.steps rule, got {step!r}; "
                "give a learning rate as lr=."
            )
        try:
            super().__init__(
                params,
                {"lr": float(lr), "momentum": float(momentum), "weight_decay": float(weight_decay)},
            )
        except (ValueError, TypeError) as err:  # torch.optim's "empty parameter list", ...
            raise ConfigurationError(
                f"TorchOptimizer: {err}; pass model.parameters() (or the model) with at least "
                "one trainable parameter."
            ) from err
        metric = GGN() if metric is None else metric
        user_loss = None if loss is None else as_loss(loss)
        if (
            isinstance(metric, Metric)
            and user_loss is None
            and _accepted_kinds(metric) == (_OUTPUTS,)
        ):
            raise ConfigurationError(
                f"the metric {metric!r} needs the loss l(y, z) in output space: pass "
                "loss=steepest.losses.MSE() / CrossEntropy() / ..., and a closure returning "
                "(outputs, targets)."
            )
        self._inner = _ClosureOptimizer(
            _ClosureSpace(self._trainable()),
            user_loss,
            metric,
            damping,
            solver,
            LearningRate(lr) if step is None else step,
            momentum=momentum,
            warm_start=warm_start,
            preconditioner=preconditioner,
            xi=xi,
            cg_backtracking=cg_backtracking,
            generator=generator,
            distributed=distributed,
            ftol=ftol,
            xtol=xtol,
            gtol=gtol,
        )
        self.last_info: StepInfo | None = None
        self._note = ""

    # -------------------------------------------------------------------- copies
    def __getstate__(self) -> dict[str, Any]:
        """``torch.optim.Optimizer`` pickles only defaults, state and param_groups; the core
        optimizer (metric, damping, solver, step rule, generator) travels too, so
        ``copy.deepcopy`` and ``pickle`` give a working optimizer (copy the model with it:
        ``copy.deepcopy((model, opt))``)."""
        state = super().__getstate__()
        state.update(_inner=self._inner, last_info=self.last_info, _note=self._note)
        return state

    # -------------------------------------------------------------------- configuration
    @property
    def steepest(self) -> Optimizer:
        """The :class:`steepest.Optimizer` doing the work (metric, damping, solver, ...)."""
        return self._inner

    def _trainable(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        inner = getattr(self, "_inner", None)
        if inner is not None:
            self._refresh_space()

    def _refresh_space(self, warn: bool = False) -> str:
        """Follow ``param_groups`` as ``torch.optim`` does: theta is the parameters of the
        groups with ``requires_grad=True`` now. When that set (or a shape, dtype or device)
        changed, the state on the old flat vector (previous CG solution, momentum buffer, a
        damping rule's scaling D) is reset; with ``warn`` a
        :class:`~steepest.errors.ParameterChangeWarning` says so. Returns a note ('' when
        nothing changed)."""
        params = self._trainable()
        old = self._inner.space
        if len(params) == len(old.params) and all(
            p is q and p.shape == s and p.dtype == old.dtype and p.device == old.device
            for p, q, s in zip(params, old.params, old.shapes)
        ):
            return ""
        inner = self._inner
        inner.space = _ClosureSpace(params)
        inner._prev_solution = inner._momentum_buffer = None
        inner.damping.parameters_changed()
        reset = getattr(inner.metric, "parameters_changed", None)  # a metric with state (KFAC)
        if reset is not None:
            reset()
        note = (
            f"the trainable parameters changed ({old.size} -> {inner.space.size} values): "
            "followed; the previous solution, momentum buffer, damping scaling and the "
            "metric's running state were reset"
        )
        if warn:
            warnings.warn(note, ParameterChangeWarning, stacklevel=4)
        return note

    def _sync_groups(self) -> None:
        groups = self.param_groups
        mus = {float(g.get("momentum", 0.0)) for g in groups}
        if len(mus) > 1:
            raise ConfigurationError(
                f"all param_groups must share momentum (one solve couples them), got "
                f"{sorted(mus)}; use one momentum, or one optimizer per group."
            )
        mu = mus.pop()
        for g in groups:
            _check_hyper(g["lr"], mu, allow_zero_lr=True)
            _check_weight_decay(g.get("weight_decay", 0.0))
        self._note = self._refresh_space(warn=True)
        inner, space = self._inner, self._inner.space
        group_of = {id(p): g for g in groups for p in g["params"]}

        def per_element(key: str) -> Tensor:
            return torch.cat(
                [
                    torch.full(
                        (p.numel(),),
                        float(group_of[id(p)].get(key, 0.0)),
                        dtype=space.dtype,
                        device=space.device,
                    )
                    for p in space.params
                ]
            )

        lrs = {float(group_of[id(p)]["lr"]) for p in space.params}
        scale = None
        if len(lrs) == 1:
            alpha = lrs.pop()
        elif isinstance(inner.step_rule, LearningRate):
            alpha, scale = 1.0, per_element("lr")
        else:
            raise ConfigurationError(
                f"param_groups have learning rates {sorted(lrs)}, but the step rule "
                f"{inner.step_rule!r} picks alpha itself; per-group learning rates scale the "
                "blocks of a LearningRate step only (leave step=None)."
            )
        if isinstance(inner.step_rule, LearningRate):
            inner.step_rule.alpha = alpha
        inner._step_scale = scale
        wds = {float(group_of[id(p)].get("weight_decay", 0.0)) for p in space.params}
        inner._l2 = per_element("weight_decay") if wds != {0.0} else None
        inner._l2_metric = None
        inner.momentum = mu

    # -------------------------------------------------------------------- the step
    def step(self, closure: Closure | None = None) -> Tensor:  # type: ignore[override]
        """One step; ``closure()`` returns what the metric needs (see the module docstring).

        Returns the loss before the step as a 0-dim tensor; ``self.last_info`` holds the
        :class:`~steepest.optimizer.StepInfo`.
        """
        if closure is None:
            raise ConfigurationError(
                "TorchOptimizer.step needs a closure that evaluates the batch, e.g. "
                "opt.step(lambda: (model(x), y)) for GGN/Fisher or "
                "opt.step(lambda: loss_fn(model(x), y)) for Identity/Hessian."
            )
        rule_alpha = getattr(self._inner.step_rule, "alpha", None)
        saved_mu = self._inner.momentum
        saved_hooks = self._inner._l2, self._inner._l2_metric, self._inner._step_scale
        try:
            self._sync_groups()
            info = self._inner.step(closure, None)
        except BaseException as err:  # the core rolled back theta and its state; undo the sync
            if rule_alpha is not None:
                self._inner.step_rule.alpha = rule_alpha
            self._inner.momentum = saved_mu
            self._inner._l2, self._inner._l2_metric, self._inner._step_scale = saved_hooks
            if isinstance(err, RuntimeError) and "not currently support double backward" in str(
                err
            ):
                raise ConfigurationError(
                    f"the closure runs a torch.compile'd module, whose graph has no double "
                    f"backward, which {self._inner.metric!r} needs (J v, H v); call the original "
                    "module in the closure (compiled._orig_mod(x)), or use a first-order metric "
                    "(Identity(), GradientCovariance(), EmpiricalFisher())."
                ) from err
            raise
        if self._note:
            info = dataclasses.replace(
                info, message="; ".join(m for m in (self._note, info.message) if m)
            )
        self.last_info = info
        self._state_out()
        return torch.tensor(self._inner.closure_loss, dtype=self._inner.space.dtype)

    # -------------------------------------------------------------------- state
    def _state_out(self) -> None:
        """Mirror the core optimizer's state into ``self.state`` (torch.optim layout): its
        flat vectors (previous CG solution, momentum buffer) split per parameter, the rest
        (steps, damping, step rule, generator) under ``state["steepest"]``."""
        inner = self._inner.state_dict()
        space = self._inner.space
        for key in [k for k in self.state if isinstance(k, Tensor)]:
            del self.state[key]
        flat = [k for k, v in inner.items() if _is_flat(v, space.size)]
        chunks = {k: [c.clone() for c in space.unflatten(inner.pop(k))] for k in flat}
        if chunks:
            for i, p in enumerate(space.params):
                self.state[p] = {k: c[i] for k, c in chunks.items()}
        inner["per_parameter"] = flat
        self.state[_STATE_KEY] = inner

    def state_dict(self) -> dict[str, Any]:
        """The ``torch.optim`` state dict ``{"state": ..., "param_groups": ...}``: per
        parameter the slices of the core optimizer's vectors (previous CG solution, momentum
        buffer); its step count, damping, step rule and generator under
        ``state["steepest"]``."""
        self._state_out()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; the next step is then bit-identical.

        Validated and atomic: a state of other parameters (count or shapes) or of another
        damping or step rule raises a :class:`~steepest.errors.ConfigurationError` and leaves
        the optimizer as it was."""
        if _STATE_KEY not in state_dict.get("state", {}):
            raise ConfigurationError(
                "this state dict was not saved by steepest.TorchOptimizer (no "
                f"state['{_STATE_KEY}']); load one from TorchOptimizer.state_dict()."
            )
        old = self.state, self.param_groups, self._inner.space
        try:
            try:
                super().load_state_dict(state_dict)
            except (ValueError, KeyError, TypeError) as err:
                raise ConfigurationError(
                    f"cannot load this state dict: {err} Load one saved by the state_dict() of "
                    "a TorchOptimizer over the same parameters."
                ) from err
            self._refresh_space()
            space = self._inner.space
            core = dict(self.state[_STATE_KEY])
            for name in core.pop("per_parameter", []):
                parts = [self.state.get(p, {}).get(name) for p in space.params]
                if any(c is not None and c.shape != p.shape for c, p in zip(parts, space.params)):
                    raise ConfigurationError(
                        f"cannot load this state dict: its '{name}' has shapes "
                        f"{[tuple(c.shape) for c in parts if c is not None]}, the parameters "
                        f"{[tuple(p.shape) for p in space.params]}."
                    )
                core[name] = None if any(c is None for c in parts) else space.flatten(parts)
            self._inner.load_state_dict(core)  # validated, atomic
        except BaseException:
            self.state, self.param_groups, self._inner.space = old
            raise


def _is_flat(value: Any, size: int) -> bool:
    return (
        isinstance(value, Tensor)
        and value.ndim == 1
        and value.numel() == size
        and value.is_floating_point()
    )


def _check_weight_decay(eta: Any) -> None:
    if not (
        isinstance(eta, int | float)
        and not isinstance(eta, bool)
        and eta >= 0
        and eta != float("inf")
    ):
        raise ConfigurationError(f"weight_decay must be a finite number >= 0, got {eta!r}.")


def _check_hyper(lr: Any, momentum: Any, allow_zero_lr: bool = False) -> None:
    ok_lr = (
        isinstance(lr, int | float)
        and lr == lr
        and lr != float("inf")
        and (lr >= 0 if allow_zero_lr else lr > 0)
    )
    if not ok_lr:
        raise ConfigurationError(f"lr must be a finite positive number, got {lr!r}.")
    if not (isinstance(momentum, int | float) and 0 <= momentum < 1):
        raise ConfigurationError(f"momentum must lie in [0, 1), got {momentum!r}.")

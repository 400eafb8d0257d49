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

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .damping import Damping
from .distributed import DataParallel, as_data_parallel
from .errors import ConfigurationError, NonFiniteError, ParameterChangeWarning, ShapeError
from .losses import CallableLoss, Loss, as_loss
from .metrics import GGN, GradientCovariance, Hessian, Identity, Metric
from .optimizer import Optimizer, StepInfo
from .params import ParamSpace, check_dtype_device
from .point import GraphProducts
from .solvers import Solver
from .steps import KLLineSearch, LearningRate, StepRule

Closure = Callable[[], Any]

_SCALAR, _PER_SAMPLE, _OUTPUTS = "the scalar loss", "per-sample losses", "(outputs, targets)"
_STATE_KEY = "steepest"


# ---------------------------------------------------------------------------------- helpers
def _accepted_kinds(metric: Metric) -> tuple[str, ...]:
    """What a closure may return for ``metric``."""
    if isinstance(metric, Identity | Hessian):
        return (_SCALAR, _PER_SAMPLE, _OUTPUTS)
    if isinstance(metric, GradientCovariance):  # EmpiricalFisher too
        return (_PER_SAMPLE, _OUTPUTS)
    return (_OUTPUTS,)


def _describe(result: Any) -> str:
    if isinstance(result, Tensor):
        return f"a tensor of shape {tuple(result.shape)}"
    if isinstance(result, tuple | list):
        return f"a {type(result).__name__} of {len(result)} items (" + ", ".join(
            _describe(r) if isinstance(r, Tensor) else type(r).__name__ for r in result) + ")"
    return f"a {type(result).__name__}"


def _kind_of(result: Any) -> str | None:
    if isinstance(result, tuple | list) and len(result) == 2 and all(
            isinstance(r, Tensor) for r in result):
        return _OUTPUTS
    if isinstance(result, Tensor) and result.is_floating_point():
        if result.ndim == 0:
            return _SCALAR
        if result.ndim == 1:
            return _PER_SAMPLE
    return None


_GRAPH_ERRORS = ("does not require grad", "backward through the graph a second time",
                 "have already been freed", "modified by an inplace operation")


@contextlib.contextmanager
def _explain_graph_errors() -> Iterator[None]:
    """Turn the autograd error of a closure that ran backward() itself or returned no graph
    into a clear one; any other error of the user's code passes through unchanged."""
    try:
        yield
    except RuntimeError as err:
        if not any(s in str(err) for s in _GRAPH_ERRORS):
            raise
        raise ConfigurationError(
            f"differentiating the closure's result failed ({str(err).splitlines()[0]}); the "
            "closure must not call loss.backward() (steepest.TorchOptimizer differentiates the "
            "returned value itself; optimizer.zero_grad() is harmless) and must compute its "
            "result from the parameters with autograd enabled, without .detach() or .item()."
        ) from err


class _ClosureSpace(ParamSpace):
    """The flat view of the parameters handed to the optimizer (not a module's).

    ``function()`` gives ``f(theta, closure)``: the closure evaluated with the parameters' data
    temporarily swapped for theta (no in-place write, so the autograd graph of the current
    point stays valid), returning ``(outputs, targets)`` or the losses as the closure does.
    """

    def __init__(self, params: list[Tensor]) -> None:  # noqa: D107 (no super: no module)
        if not params:
            raise ConfigurationError(
                "the optimizer has no trainable parameters (none with requires_grad=True); "
                "pass model.parameters() with at least one unfrozen parameter."
            )
        self.model = None
        self.names = [f"param_{i}" for i in range(len(params))]
        self.params = list(params)
        self.shapes = [p.shape for p in params]
        self.numels = [p.numel() for p in params]
        self.size = sum(self.numels)
        dtypes = {p.dtype for p in params}
        devices = {p.device for p in params}
        if len(dtypes) > 1 or len(devices) > 1:
            raise ConfigurationError(
                f"the parameters mix dtypes {sorted(map(str, dtypes))} or devices "
                f"{sorted(map(str, devices))}; call model.to(dtype, device) first."
            )
        if not all(p.is_floating_point() for p in params):
            raise ConfigurationError("the parameters must be floating-point tensors.")
        self.dtype, self.device = params[0].dtype, params[0].device
        check_dtype_device(self.dtype, self.device)

    def stale(self) -> bool:
        """Never: :class:`TorchOptimizer` follows its ``param_groups`` itself."""
        return False

    def function(self) -> Callable[[Tensor, Closure], Any]:
        def f(theta: Tensor, closure: Closure) -> Any:
            saved = [p.data for p in self.params]
            try:
                for p, chunk in zip(self.params, self.unflatten(theta.detach())):
                    p.data = chunk
                with _explain_graph_errors():
                    result = closure()
            finally:
                for p, d in zip(self.params, saved):
                    p.data = d
            kind = _kind_of(result)
            if kind is None:
                raise ConfigurationError(
                    f"the closure returned {_describe(result)} when re-evaluated; it must "
                    "return the same kind of value at every call."
                )
            return tuple(result) if kind == _OUTPUTS else result

        return f


class _ClosureLoss(Loss):
    """The loss of what ``_ClosureSpace.function()`` returns, for the core's line searches
    and reduction ratio: ``l(y, z)`` for ``(z, y)``, the losses themselves otherwise."""

    def __init__(self, loss: Loss | None) -> None:
        self.inner = loss
        self.probabilistic = bool(loss is not None and loss.probabilistic)
        self.hessian_is_fisher = bool(loss is not None and loss.hessian_is_fisher)
        self.name = loss.name if loss is not None else "closure loss"

    def value(self, z: Any, y: Any = None) -> Tensor:
        if isinstance(z, tuple):
            return self.inner.value(*z)
        return z.reshape(-1)

    def kl(self, z_old: Tensor, z_new: Any) -> Tensor:
        if not isinstance(z_new, tuple) or self.inner is None:
            raise ConfigurationError("KLLineSearch needs a closure returning (outputs, targets).")
        return self.inner.kl(z_old, z_new[0])


class ClosurePoint(GraphProducts):
    r"""A :class:`~steepest.point.Point` built from a closure's autograd graph instead of a
    module: the same attributes and products (``z``, ``y``, ``losses``, ``value``, ``grad``,
    ``jvp``, ``vjp``, ``jacobian``, ``loss_jvp``, ``loss_vjp``, ``per_sample_grads``, ``hvp``,
    ``hmm``), differentiated with respect to the optimizer's parameters: the products are
    those of :class:`~steepest.point.GraphProducts` on the list of parameters.

    >>> point = ClosurePoint(space, CrossEntropy(), lambda: (model(x), y), GGN())
    >>> GGN().operator(point) @ v
    """

    def __init__(self, space: _ClosureSpace, loss: Loss | None, closure: Closure,
                 metric: Metric, generator: torch.Generator | None = None,
                 need_per_sample: bool = False, need_outputs: bool = False,
                 distributed: DataParallel | None = None) -> None:
        self.distributed = distributed
        args = (space, loss, closure, metric, generator, need_per_sample, need_outputs)
        if distributed is None:
            self._evaluate(*args)
            self.n_total = self.n
            return
        # under torch.distributed: the means over all ranks' shards (see steepest.point.Point)
        error = None
        try:
            self._evaluate(*args, local=True)
        except Exception as err:  # noqa: BLE001 (re-raised on this rank by distributed.mean)
            error = err
        value, grad, self.n_total = distributed.mean(
            getattr(self, "value_t", None), getattr(self, "grad", None),
            getattr(self, "n", 0), space.get(), error)
        self.value, self.grad = float(value), grad
        self._check_finite()

    def _evaluate(self, space: _ClosureSpace, loss: Loss | None, closure: Closure,
                  metric: Metric, generator: torch.Generator | None, need_per_sample: bool,
                  need_outputs: bool, local: bool = False) -> None:
        if not callable(closure):
            raise ConfigurationError(
                f"step() needs a closure (a function of no arguments), got {_describe(closure)}; "
                "e.g. opt.step(lambda: (model(x), y))."
            )
        self.space, self.params, self.size = space, space.params, space.size
        self.generator, self.inputs = generator, None
        self.closure = closure  # re-evaluated by metrics that hook modules (KFAC)
        self.theta = space.get()
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH), _record_calls() as calls:
            with _explain_graph_errors():
                result = closure()
        kind = _kind_of(result)
        accepted = _accepted_kinds(metric)
        if need_per_sample:
            accepted = tuple(k for k in accepted if k != _SCALAR)
        if need_outputs:
            accepted = tuple(k for k in accepted if k == _OUTPUTS)
        if kind not in accepted:
            raise ConfigurationError(
                f"with metric {metric!r} the closure must return "
                f"{' or '.join(accepted)}, but it returned {_describe(result)}. "
                + ("The Gauss-Newton/Fisher family needs the model outputs with their graph: "
                   "closure = lambda: (model(x), y). " if _OUTPUTS in accepted else "")
                + ("Per-sample losses are a tensor of shape (N,), e.g. "
                   "F.cross_entropy(model(x), y, reduction='none'). "
                   if _PER_SAMPLE in accepted else "")
            )
        if local and kind == _SCALAR:
            raise ConfigurationError(
                "under torch.distributed the closure must return the per-sample losses "
                "(reduction='none') or (outputs, targets), not the scalar loss: the ranks' means "
                "are weighted by their shard sizes, which a scalar does not tell."
            )
        self.kind = kind
        first = result[0] if kind == _OUTPUTS else result
        if first.ndim >= 1 and first.shape[0] == 0:
            raise ShapeError(
                "the closure's batch is empty (0 outputs or losses); a step needs at least one "
                "sample: skip empty batches (e.g. DataLoader(drop_last=True))."
            )
        self.loss: Loss = loss if loss is not None else CallableLoss(lambda z, y: z, "closure")
        if kind == _OUTPUTS:
            if loss is None:
                raise ConfigurationError(
                    "the closure returned (outputs, targets) but the optimizer has no loss; "
                    "pass loss=steepest.losses.MSE() / CrossEntropy() / ... to TorchOptimizer."
                )
            z, y = result
            if z.dtype != space.dtype:
                raise ShapeError(
                    f"the closure's outputs have dtype {z.dtype} but the parameters are "
                    f"{space.dtype}; convert inputs and model to one dtype."
                )
            self.loss.check(z.detach(), y)
            self.z, self.y = z, y
            with torch.enable_grad():
                self.losses: Tensor | None = self.loss.value(z, y)
        else:
            self.y = None
            self.losses = result if kind == _PER_SAMPLE else None
            self.z = result.reshape(-1)
        self.n = int(self.z.shape[0])
        with torch.enable_grad():
            self.value_t = self.losses.mean() if self.losses is not None else result
        self.value = float(self.value_t.detach())
        if not self.value_t.requires_grad:
            raise ConfigurationError(
                f"the closure's result has no autograd graph (it returned {_describe(result)} "
                "that does not require grad); compute it from the parameters with gradients "
                "enabled, without .detach() or .item()."
            )
        if not (local or torch.isfinite(self.value_t)):
            raise NonFiniteError(
                f"the loss is {self.value} at the current parameters; the model or data "
                "produce non-finite values (check the inputs' scale, lower the learning rate "
                "or raise the damping)."
            )
        with _explain_graph_errors():
            grads = torch.autograd.grad(self.value_t, self.params, retain_graph=True,
                                        allow_unused=True)
        if all(g is None for g in grads):
            raise ConfigurationError(
                "none of the optimizer's parameters is in the graph of the closure's result; "
                "the closure must use the parameters given to TorchOptimizer."
            )
        self.grad = self._flatten(grads).detach()
        self.unused = [i for i, g in enumerate(grads) if g is None]  # grad None: skipped
        if not local and not torch.isfinite(self.grad).all():
            raise NonFiniteError(
                "the gradient holds NaN or infinite values although the loss is finite; check "
                "for operations with infinite derivatives (sqrt(0), log(0)) in the model."
            )
        self._owner = _find_owner(calls, self) if kind == _OUTPUTS else None

    # -------------------------------------------------------------------- products
    def _wrt(self) -> list[Tensor]:
        """The optimizer's parameters."""
        return self.params

    def _per_sample(self, samples: slice, kind: str) -> Tensor | None:
        """Per-sample output Jacobians (kind='jacobian', (n, C*, P)) or loss gradients
        (kind='grad', (n, P)) by ``torch.func.vmap`` over a functional call of the module whose
        output the closure returned (found while the closure ran, and checked once to
        reproduce the outputs from its positional inputs); None (the batched backward) where
        there is no such module, where it couples the samples (BatchNorm in training mode,
        Dropout) or where vmap cannot trace it."""
        if self._owner is None:
            return None
        from torch.func import functional_call, grad, jacrev, vmap

        module, names, args = self._owner
        if not getattr(self, "_owner_checked", False):
            if not _reproduces(module, args, self.z):
                self._owner = None
                return None
            self._owner_checked = True
        fixed = {n: t.detach() for n, t in module.named_parameters() if n not in names}
        space, loss = self.space, self.loss
        xs = tuple(a[samples] for a in args)

        def f(th: Tensor, *xi: Tensor) -> Tensor:
            params = dict(fixed, **dict(zip(names, space.unflatten(th))))
            return functional_call(module, params, tuple(t.unsqueeze(0) for t in xi))

        def one_loss(th: Tensor, yi: Tensor, *xi: Tensor) -> Tensor:
            return loss.value(f(th, *xi), yi.unsqueeze(0)).sum()

        theta = self.theta.detach()
        try:
            with sdpa_kernel(SDPBackend.MATH):
                if kind == "jacobian":
                    dims = (None,) + (0,) * len(xs)
                    jac = vmap(jacrev(lambda th, *xi: f(th, *xi).reshape(-1)), in_dims=dims)
                    return jac(theta, *xs).detach()
                dims = (None, 0) + (0,) * len(xs)
                return vmap(grad(one_loss), in_dims=dims)(theta, self.y[samples], *xs).detach()
        except (RuntimeError, ValueError, TypeError, NotImplementedError):
            self._owner = None
            return None

    def _need_losses(self) -> Tensor:
        if self.losses is None:
            raise ConfigurationError(
                "this metric or preconditioner needs per-sample losses, but the closure "
                "returned the scalar loss; return the per-sample losses (reduction='none') or "
                "(outputs, targets)."
            )
        return self.losses


@contextlib.contextmanager
def _record_calls() -> Iterator[list]:
    """Record (module, positional inputs, output) of every module call while the closure
    runs (a global forward hook), to find the module whose output the closure returns."""
    calls: list = []

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        if isinstance(output, Tensor):
            calls.append((module, args, output))

    handle = nn.modules.module.register_module_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def _find_owner(calls: list, point: ClosurePoint) -> tuple | None:
    """(module, the names of the optimizer's parameters in it, its batched inputs) for the
    outermost module call whose output is the closure's outputs z, when a functional call of
    it reproduces z and it does not couple samples; else None."""
    z, n = point.z, point.n
    if not isinstance(point.y, Tensor) or point.y.shape[:1] != (n,):
        return None
    for module, args, output in reversed(calls):
        if output is not z:
            continue
        named = {id(p): name for name, p in module.named_parameters()}
        if not all(id(p) in named for p in point.params):
            return None
        if any(m.training and isinstance(m, nn.modules.batchnorm._BatchNorm | nn.Dropout)
               for m in module.modules()):
            return None
        if not args or not all(isinstance(a, Tensor) and a.shape[:1] == (n,) for a in args):
            return None
        names = [named[id(p)] for p in point.params]
        return module, names, tuple(a.detach() for a in args)
    return None


def _reproduces(module: nn.Module, args: tuple, z: Tensor) -> bool:
    """Whether a call of the module on its positional inputs gives z again (no kwargs, no
    hidden state): checked once before the vmapped per-sample path is trusted."""
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            again = module(*args)
    except Exception:  # noqa: BLE001 - any failure: use the batched backward instead
        return False
    tol = 100 * torch.finfo(z.dtype).eps
    scale = float(z.detach().abs().max())
    return (isinstance(again, Tensor) and again.shape == z.shape
            and torch.allclose(again, z.detach(), rtol=tol, atol=tol * scale))


class _ClosureOptimizer(Optimizer):
    """:class:`steepest.Optimizer` whose Point comes from a closure, not from (x, y)."""

    def __init__(self, space: _ClosureSpace, loss: Loss | None, *args: Any, **kw: Any) -> None:
        holder = nn.Module()
        holder.anchor = nn.Parameter(torch.zeros(1, dtype=space.dtype, device=space.device))
        super().__init__(holder, _ClosureLoss(loss), *args, **kw)
        self.space, self.user_loss = space, loss

    def point(self, inputs: Any, targets: Any) -> ClosurePoint:
        point = ClosurePoint(self.space, self.user_loss, inputs, self.metric,
                             generator=self._sampler,
                             need_per_sample=self.preconditioner == "empirical-fisher",
                             need_outputs=isinstance(self.step_rule, KLLineSearch),
                             distributed=self.distributed)
        self.closure_loss = point.value  # the closure's loss, without a weight-decay term
        if point.unused:  # as torch.optim skips a parameter whose grad is None: a zero block
            mask = torch.ones(self.space.size, dtype=self.space.dtype, device=self.space.device)
            for i, block in enumerate(torch.split(mask, self.space.numels)):
                if i in point.unused:
                    block.zero_()
            self._step_scale = mask if self._step_scale is None else self._step_scale * mask
            self._l2 = None if self._l2 is None else self._l2 * mask
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
        closure's loss as ``torch.optim`` does).
    damping: lambda >= 0 or a :mod:`steepest.damping` rule (``LevenbergMarquardt``).
    solver: ``"auto"``, ``"cholesky"``, ``"cg"``, ``"woodbury"`` or a solver instance.
    step: None (``LearningRate(lr)``) or a :mod:`steepest.steps` rule (``TrustRegion``,
        ``Armijo``, ``KLLineSearch``).
    momentum: heavy-ball mu, ``param_groups[g]["momentum"]``.
    warm_start, preconditioner, xi, cg_backtracking, generator: as in
        :class:`steepest.Optimizer`.
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
        damping: Damping | float = 1e-3,
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
            super().__init__(params, {"lr": float(lr), "momentum": float(momentum),
                                      "weight_decay": float(weight_decay)})
        except (ValueError, TypeError) as err:  # torch.optim's "empty parameter list", ...
            raise ConfigurationError(
                f"TorchOptimizer: {err}; pass model.parameters() (or the model) with at least "
                "one trainable parameter."
            ) from err
        metric = GGN() if metric is None else metric
        user_loss = None if loss is None else as_loss(loss)
        if isinstance(metric, Metric) and user_loss is None and \
                _accepted_kinds(metric) == (_OUTPUTS,):
            raise ConfigurationError(
                f"the metric {metric!r} needs the loss l(y, z) in output space: pass "
                "loss=steepest.losses.MSE() / CrossEntropy() / ..., and a closure returning "
                "(outputs, targets)."
            )
        self._inner = _ClosureOptimizer(
            _ClosureSpace(self._trainable()), user_loss, metric, damping, solver,
            LearningRate(lr) if step is None else step, momentum=momentum,
            warm_start=warm_start, preconditioner=preconditioner, xi=xi,
            cg_backtracking=cg_backtracking, generator=generator, distributed=distributed,
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
                for p, q, s in zip(params, old.params, old.shapes)):
            return ""
        inner = self._inner
        inner.space = _ClosureSpace(params)
        inner._prev_solution = inner._momentum_buffer = None
        inner.damping.parameters_changed()
        reset = getattr(inner.metric, "parameters_changed", None)  # a metric with state (KFAC)
        if reset is not None:
            reset()
        note = (f"the trainable parameters changed ({old.size} -> {inner.space.size} values): "
                "followed; the previous solution, momentum buffer, damping scaling and the "
                "metric's running state were reset")
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
            return torch.cat([torch.full((p.numel(),), float(group_of[id(p)].get(key, 0.0)),
                                         dtype=space.dtype, device=space.device)
                              for p in space.params])

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
        saved_hooks = self._inner._l2, self._inner._step_scale
        try:
            self._sync_groups()
            info = self._inner.step(closure, None)
        except BaseException as err:  # the core rolled back theta and its state; undo the sync
            if rule_alpha is not None:
                self._inner.step_rule.alpha = rule_alpha
            self._inner.momentum = saved_mu
            self._inner._l2, self._inner._step_scale = saved_hooks
            if isinstance(err, RuntimeError) and "not currently support double backward" in \
                    str(err):
                raise ConfigurationError(
                    f"the closure runs a torch.compile'd module, whose graph has no double "
                    f"backward, which {self._inner.metric!r} needs (J v, H v); call the original "
                    "module in the closure (compiled._orig_mod(x)), or use a first-order metric "
                    "(Identity(), GradientCovariance(), EmpiricalFisher())."
                ) from err
            raise
        if self._note:
            info = dataclasses.replace(info, message="; ".join(
                m for m in (self._note, info.message) if m))
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
    return isinstance(value, Tensor) and value.ndim == 1 and value.numel() == size and \
        value.is_floating_point()


def _check_weight_decay(eta: Any) -> None:
    if not (isinstance(eta, int | float) and not isinstance(eta, bool) and eta >= 0
            and eta != float("inf")):
        raise ConfigurationError(f"weight_decay must be a finite number >= 0, got {eta!r}.")


def _check_hyper(lr: Any, momentum: Any, allow_zero_lr: bool = False) -> None:
    ok_lr = isinstance(lr, int | float) and lr == lr and lr != float("inf") and (
        lr >= 0 if allow_zero_lr else lr > 0)
    if not ok_lr:
        raise ConfigurationError(f"lr must be a finite positive number, got {lr!r}.")
    if not (isinstance(momentum, int | float) and 0 <= momentum < 1):
        raise ConfigurationError(f"momentum must lie in [0, 1), got {momentum!r}.")

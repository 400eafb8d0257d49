r"""The point of :class:`~steepest.torch_optim.TorchOptimizer`: a closure's autograd graph as
a :class:`~steepest.point.Point` (:class:`ClosurePoint`), with the parameters handed to the
optimizer as theta (not a module's) and the closure contract's checks.

The closure returns the scalar loss :math:`L = \frac1N\sum_i l_i`, the per-sample losses
:math:`(l_i)_i`, or ``(outputs, targets)``; from the last the products are built on the
closure's graph (:class:`~steepest.point.GraphProducts`): :math:`J^T u` by one backward pass,
:math:`J v` by the double-backward trick, :math:`H v` by reverse over reverse.

Per-sample Jacobians :math:`J_i` and gradients :math:`\nabla l_i` (what ``to_dense()``,
``diagonal()``, Cholesky, Woodbury and ``Diagonal`` need) take one of two routes. The vmap fast
path: ``torch.func.vmap`` over one-sample functional calls of the module whose output the
closure returned (found by a forward hook while the closure ran), when that module holds all the
optimizer's parameters, takes the batch as positional tensors of leading dimension N, and has no
BatchNorm or Dropout in training mode. The batched route otherwise: a backward through the
closure's graph for every output row (vmapped over the rows), exact for any closure, slower.
The fast path is checked against the batch before its rows are used
(:func:`~steepest.per_sample.rows_agree`, on each point): the one-sample outputs must
equal z, and once per point a random contraction of the rows must equal the same product on
the closure's graph (one backward), to :math:`\sqrt{\epsilon}` of the dtype. A module that
mixes its samples in a way its type does not show (``h - h.mean(0)``, a batch term of zero
weight), that does not reproduce z from its positional inputs, or whose outputs do not follow
its inputs sample by sample (a residual vector posed as samples) fails it, and the point takes
the batched route from then on: the route changes the time, not the result (beyond rounding).

Example
-------
>>> space = _ClosureSpace(list(model.parameters()))
>>> point = ClosurePoint(space, CrossEntropy(), lambda: (model(x), y), GGN())
>>> GGN().operator(point) @ v
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .distributed import DataParallel
from .errors import ConfigurationError, NonFiniteError, ShapeError, all_finite
from .losses import CallableLoss, Loss
from .metrics import GradientCovariance, Hessian, Identity, Metric
from .params import ParamSpace, check_dtype_device
from .per_sample import vmapped_rows
from .point import GraphProducts

Closure = Callable[[], Any]

_SCALAR, _PER_SAMPLE, _OUTPUTS = "the scalar loss", "per-sample losses", "(outputs, targets)"


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
        return (
            f"a {type(result).__name__} of {len(result)} items ("
            + ", ".join(_describe(r) if isinstance(r, Tensor) else type(r).__name__ for r in result)
            + ")"
        )
    return f"a {type(result).__name__}"


def _kind_of(result: Any) -> str | None:
    if (
        isinstance(result, tuple | list)
        and len(result) == 2
        and all(isinstance(r, Tensor) for r in result)
    ):
        return _OUTPUTS
    if isinstance(result, Tensor) and result.is_floating_point():
        if result.ndim == 0:
            return _SCALAR
        if result.ndim == 1:
            return _PER_SAMPLE
    return None


_GRAPH_ERRORS = (
    "does not require grad",
    "backward through the graph a second time",
    "have already been freed",
    "modified by an inplace operation",
)


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

    def __init__(
        self,
        space: _ClosureSpace,
        loss: Loss | None,
        closure: Closure,
        metric: Metric,
        generator: torch.Generator | None = None,
        need_per_sample: bool = False,
        need_outputs: bool = False,
        distributed: DataParallel | None = None,
    ) -> None:
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
            getattr(self, "value_t", None),
            getattr(self, "grad", None),
            getattr(self, "n", 0),
            space.get(),
            error,
        )
        self.value, self.grad = float(value), grad
        # a parameter is skipped only if no rank's samples use it (the gradient is reduced:
        # a mask decided per rank would step it on some ranks only, and the ranks drift)
        used = torch.ones(len(self.params), dtype=grad.dtype, device=grad.device)
        used[self.unused] = 0.0
        used = distributed.sum(used)
        self.unused = [i for i in range(len(self.params)) if float(used[i]) == 0.0]
        self._check_finite()

    def _evaluate(
        self,
        space: _ClosureSpace,
        loss: Loss | None,
        closure: Closure,
        metric: Metric,
        generator: torch.Generator | None,
        need_per_sample: bool,
        need_outputs: bool,
        local: bool = False,
    ) -> None:
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
                + (
                    "The Gauss-Newton/Fisher family needs the model outputs with their graph: "
                    "closure = lambda: (model(x), y). "
                    if _OUTPUTS in accepted
                    else ""
                )
                + (
                    "Per-sample losses are a tensor of shape (N,), e.g. "
                    "F.cross_entropy(model(x), y, reduction='none'). "
                    if _PER_SAMPLE in accepted
                    else ""
                )
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
            grads = torch.autograd.grad(
                self.value_t, self.params, retain_graph=True, allow_unused=True
            )
        if all(g is None for g in grads):
            raise ConfigurationError(
                "none of the optimizer's parameters is in the graph of the closure's result; "
                "the closure must use the parameters given to TorchOptimizer."
            )
        self.grad = self._flatten(grads).detach()
        self.unused = [i for i, g in enumerate(grads) if g is None]  # grad None: skipped
        if not local and not all_finite(self.grad):
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
        output the closure returned (found while the closure ran). None, and the batched
        backward from then on, where there is no such module, where it couples the samples by
        its type (BatchNorm in training mode, Dropout), where its one-sample results differ
        from the batch's (:func:`~steepest.per_sample.rows_agree`: a custom coupling
        such as ``h - h.mean(0)``, outputs that do not follow the inputs sample by sample, or a
        call that does not reproduce z from its positional inputs) or where vmap cannot trace
        it."""
        if self._owner is None:
            return None
        from torch.func import functional_call

        module, names, args = self._owner
        fixed = {n: t.detach() for n, t in module.named_parameters() if n not in names}
        space = self.space

        def f(th: Tensor, xs: tuple[Tensor, ...]) -> Tensor:
            return functional_call(module, dict(fixed, **dict(zip(names, space.unflatten(th)))), xs)

        rows = vmapped_rows(self, f, tuple(a[samples] for a in args), samples, kind)
        if rows is None:
            self._owner = None
        return rows

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
    outermost module call whose output is the closure's outputs z, when the module holds all
    the optimizer's parameters, its positional inputs all have the batch's leading dimension
    and no BatchNorm or Dropout in training mode in it couples the samples; else None. That
    its one-sample calls reproduce the batch is checked when they run
    (:meth:`ClosurePoint._per_sample`)."""
    z, n = point.z, point.n
    if not isinstance(point.y, Tensor) or point.y.shape[:1] != (n,):
        return None
    for module, args, output in reversed(calls):
        if output is not z:
            continue
        named = {id(p): name for name, p in module.named_parameters()}
        if not all(id(p) in named for p in point.params):
            return None
        if any(
            m.training and isinstance(m, nn.modules.batchnorm._BatchNorm | nn.Dropout)
            for m in module.modules()
        ):
            return None
        if not args or not all(isinstance(a, Tensor) and a.shape[:1] == (n,) for a in args):
            return None
        names = [named[id(p)] for p in point.params]
        return module, names, tuple(a.detach() for a in args)
    return None

r"""Point: the model and loss evaluated at theta on one batch, with the products every metric
shares.

With :math:`z_i = f(x_i, \theta)` the outputs, :math:`l_i = l(y_i, z_i)` the per-sample losses
and :math:`L = \frac1N\sum_i l_i`, a Point holds z, l, L and the gradient
:math:`g = \nabla_\theta L`, and gives matrix-free:

- ``jvp(v)`` = :math:`J v` (J the Jacobian of theta -> z, all samples stacked),
- ``vjp(u)`` = :math:`J^T u`,
- ``loss_jvp(v)`` / ``loss_vjp(w)``: the same for theta -> (l_1, ..., l_N),
- ``hvp(v)`` = :math:`H v`, H the Hessian of L.

The forward graph is built once; ``J v`` uses the double-backward trick (differentiate
``u -> J^T u`` once more) so that no product repeats the forward pass, and ``H v`` reuses one
gradient graph (reverse over reverse). The mean over samples is taken here, in one place.

The products are written once, in :class:`GraphProducts`, for any list of tensors
differentiated with respect to: the single flat leaf theta here, the optimizer's parameters in
:class:`~steepest.torch_optim.ClosurePoint`.

Example
-------
>>> point = Point(model, CrossEntropy(), x, y)
>>> point.value, point.grad.shape
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .errors import ConfigurationError, NonFiniteError, ShapeError, all_finite
from .losses import Loss, as_loss
from .params import ParamSpace
from .per_sample import vmapped_rows

if TYPE_CHECKING:
    from .distributed import DataParallel

Inputs = Tensor | tuple[Tensor, ...]


def _check_finite_inputs(inputs: Inputs, targets: Tensor) -> None:
    xs = inputs if isinstance(inputs, tuple) else (inputs,)
    for k, x in enumerate(xs):
        if not isinstance(x, Tensor):
            raise ShapeError(f"inputs must be tensors, got {type(x).__name__} at position {k}.")
        if x.is_floating_point() and not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).sum())
            raise NonFiniteError(
                f"the inputs hold {bad} NaN or infinite values; clean or impute the data "
                "before the step."
            )
    if not isinstance(targets, Tensor):
        raise ShapeError(f"targets must be a tensor, got {type(targets).__name__}.")
    if targets.is_floating_point() and not torch.isfinite(targets).all():
        raise NonFiniteError("the targets hold NaN or infinite values; clean the data first.")


def _explain_forward_error(err: RuntimeError, inputs: Inputs, theta: Tensor) -> None:
    """Turn a forward failure caused by inputs of another dtype or device than the parameters
    into a :class:`ShapeError` that says so; other failures propagate unchanged."""
    xs = inputs if isinstance(inputs, tuple) else (inputs,)
    for x in xs:
        if x.is_floating_point() and x.dtype != theta.dtype:
            raise ShapeError(
                f"the model failed on inputs of dtype {x.dtype} while its parameters are "
                f"{theta.dtype}; convert the inputs with x.to({theta.dtype}) (or the model with "
                f"model.to(dtype)). The model said: {err}"
            ) from err
        if x.device != theta.device:
            raise ShapeError(
                f"the model failed on inputs on {x.device} while its parameters are on "
                f"{theta.device}; move the inputs with x.to('{theta.device}'). The model said: "
                f"{err}"
            ) from err


class GraphProducts:
    r"""The matrix-free products on a built autograd graph, written once for every point.

    A subclass evaluates the forward with autograd (it sets ``z``, ``losses``, ``value_t``,
    ``n`` and ``size``) and names what is differentiated with :meth:`_wrt`: the tensors
    :math:`\theta_1, \dots, \theta_m` whose flattened concatenation is :math:`\theta`, of size
    P (the single flat leaf of :class:`Point`, the optimizer's parameters of a closure point).
    A flat vector is split into per-tensor pieces and products are joined back into flat ones,
    with zeros for the tensors that do not appear in the graph. Then

    - ``vjp(u)`` = :math:`J^T u` by one backward pass of ``z`` with cotangent u,
    - ``jvp(v)`` = :math:`J v` by the double-backward trick: :math:`J^T u` is built once as a
      differentiable function of a dummy :math:`u` (create_graph), and
      :math:`J v = \partial \langle J^T u, v\rangle / \partial u`, so no product repeats the
      forward pass,
    - ``loss_jvp(v)`` / ``loss_vjp(w)``: the same for :math:`\theta \mapsto (l_1, \dots, l_N)`,
    - ``hvp(v)`` = :math:`H v` by reverse over reverse: the gradient graph
      :math:`g(\theta)` is built once and :math:`H v = \partial \langle g, v\rangle /
      \partial \theta`; ``hmm(V)`` batches it over the columns of V,
    - ``jacobian()`` / ``per_sample_grads()`` by a batched backward over unit cotangents,
      after the fast path :meth:`_per_sample` (None here) if a subclass has one.
    """

    size: int
    n: int
    z: Tensor
    losses: Tensor | None
    value_t: Tensor
    _gz: tuple[list[Tensor], list[int], Tensor] | None = None  # J^T u of z, linearised
    _gl: tuple[list[Tensor], list[int], Tensor] | None = None  # J_l^T u of the losses
    _ggraph: tuple[list[Tensor], list[int]] | None = None  # the gradient graph, for H v

    distributed: DataParallel | None = None  # set by a point on a rank's shard
    n_total: int
    # the forward's per-parameter views and recorded layer calls (Graph.pieces, Graph.calls)
    pieces: list[Tensor] | None = None
    calls: dict[nn.Module, list[tuple[Tensor, Tensor]]] | None = None

    def mean_over_ranks(self, tensors: list[Tensor]) -> list[Tensor]:
        r"""Statistics that are means over this point's n samples, made means over the
        samples of every rank: :math:`\sum_r (N_r/N)\, t_r` (one all_reduce under
        torch.distributed, the tensors unchanged in one process). For a metric that reduces
        its own statistics (K-FAC's factors) instead of its products.

        >>> A, G = point.mean_over_ranks([A, G])
        """
        if self.distributed is None:
            return tensors
        return self.distributed.weighted_sum(tensors, self.n / self.n_total)

    def spread_over_ranks(
        self,
        fn: Callable[[Tensor], tuple[Tensor, ...]],
        items: list[Tensor],
        shapes: Callable[[Tensor], list],
    ) -> list[tuple[Tensor, ...]]:
        """``[fn(x) for x in items]``; under torch.distributed item i is computed on rank
        i mod R only and its result broadcast to every rank (``shapes(x)``: the (shape, dtype)
        of each tensor ``fn(x)`` returns)."""
        if self.distributed is None:
            return [fn(x) for x in items]
        return self.distributed.spread(fn, items, shapes)

    def _check_finite(self) -> None:
        """Raise a NonFiniteError if ``value`` or ``grad`` is not finite."""
        if not math.isfinite(self.value):
            raise NonFiniteError(
                f"the loss is {self.value} at the current parameters; the model or data "
                "produce non-finite values (check the inputs' scale, lower the step size or "
                "raise the damping)."
            )
        if not all_finite(self.grad):
            raise NonFiniteError(
                "the gradient holds NaN or infinite values although the loss is finite; check "
                "for operations with infinite derivatives (sqrt(0), log(0)) in the model."
            )

    # ------------------------------------------------------------------ hooks
    def _wrt(self) -> list[Tensor]:
        """The tensors differentiated with respect to, in the order of the flat theta."""
        raise NotImplementedError

    def _need_losses(self) -> Tensor:
        """The per-sample losses (a subclass raises where it has none)."""
        return self.losses

    def _per_sample(self, samples: slice, kind: str) -> Tensor | None:
        """A fast path for per-sample Jacobians (kind='jacobian', (n, C*, P)) or loss
        gradients (kind='grad', (n, P)); None uses the batched backward."""
        return None

    _rows_checked: bool = False  # the per-sample rows passed the product check (per_sample)

    # ------------------------------------------------------------------ flat <-> pieces
    def _unflatten(self, v: Tensor, batch: int | None = None) -> list[Tensor]:
        """Split flat v (P,) (rows (batch, P) if batch) into pieces shaped like ``_wrt()``."""
        wrt = self._wrt()
        lead = () if batch is None else (batch,)
        if tuple(v.shape) != (*lead, self.size):
            raise ShapeError(
                f"expected a vector of shape {(*lead, self.size)} (the flat "
                f"parameters), got {tuple(v.shape)}."
            )
        parts = torch.split(v, [w.numel() for w in wrt], dim=-1)
        return [c.reshape((*lead, *w.shape)) for c, w in zip(parts, wrt)]

    def _flatten(self, parts: Iterable[Tensor | None], batch: int | None = None) -> Tensor:
        """Join per-tensor pieces into flat (P,) (rows (batch, P)), zeros for None."""
        lead = () if batch is None else (batch,)
        flat = [
            torch.zeros((*lead, w.numel()), dtype=w.dtype, device=w.device)
            if r is None
            else r.reshape(*lead, -1)
            for r, w in zip(parts, self._wrt())
        ]
        return flat[0] if len(flat) == 1 else torch.cat(flat, dim=-1)

    # ------------------------------------------------------------------ autograd helpers
    def _grad(
        self, out: Tensor | list[Tensor], cot: Tensor | list[Tensor], batch: int | None = None
    ) -> Tensor:
        r"""Flat :math:`\partial\langle out, cot\rangle / \partial\theta`, (P,) (rows
        (batch, P) for cotangents batched along their first dimension)."""
        outs = out if isinstance(out, list) else [out]
        cots = cot if isinstance(cot, list) else [cot]
        if not outs:
            wrt = self._wrt()
            shape = (self.size,) if batch is None else (batch, self.size)
            return torch.zeros(shape, dtype=wrt[0].dtype, device=wrt[0].device)
        parts = torch.autograd.grad(
            outs,
            self._wrt(),
            cots,
            retain_graph=True,
            allow_unused=True,
            is_grads_batched=batch is not None,
        )
        return self._flatten(parts, batch).detach()

    def _batched(self, out: Tensor | list[Tensor], cots: Tensor | list[Tensor], k: int) -> Tensor:
        """Rows ``cots[r] -> d<out, cots[r]>/d theta``, vmapped over r, with a loop fallback."""
        try:
            return self._grad(out, cots, batch=k)
        except RuntimeError:
            cl = cots if isinstance(cots, list) else [cots]
            return torch.stack([self._grad(out, [c[r] for c in cl]) for r in range(k)])

    def _linearised(self, out: Tensor) -> tuple[list[Tensor], list[int], Tensor]:
        """(the pieces of J^T u that depend on a dummy u, their indices in ``_wrt()``, u)
        for out = z or l."""
        u = torch.zeros_like(out, requires_grad=True)
        with torch.enable_grad():
            parts = torch.autograd.grad(
                out, self._wrt(), u, create_graph=True, retain_graph=True, allow_unused=True
            )
        keep = [(g, i) for i, g in enumerate(parts) if g is not None and g.requires_grad]
        return [g for g, _ in keep], [i for _, i in keep], u

    def _through(self, lin: tuple[list[Tensor], list[int], Tensor], v: Tensor) -> Tensor:
        r""":math:`\partial\langle J^T u, v\rangle / \partial u = J v`, shaped like u."""
        gs, idx, u = lin
        if not gs:
            return torch.zeros_like(u)
        chunks = self._unflatten(v)
        (r,) = torch.autograd.grad(
            gs, u, [chunks[i] for i in idx], retain_graph=True, allow_unused=True
        )
        return torch.zeros_like(u) if r is None else r.detach()

    # ------------------------------------------------------------------ output space
    def jvp(self, v: Tensor) -> Tensor:
        """:math:`J v`, shaped like the outputs z."""
        if self._gz is None:
            self._gz = self._linearised(self.z)
        return self._through(self._gz, v)

    def vjp(self, u: Tensor) -> Tensor:
        """:math:`J^T u` for u shaped like z, a flat vector of size P."""
        return self._grad(self.z, u)

    def jacobian(self, samples: slice | None = None) -> Tensor:
        """Per-sample output Jacobians, shape (n, C, P) for the samples in ``samples``."""
        zf = self.z.reshape(self.n, -1)
        c = zf.shape[1]
        fast = self._per_sample(samples or slice(None), "jacobian")
        if fast is not None:
            return fast.reshape(fast.shape[0], c, self.size)
        idx = list(range(self.n)[samples or slice(None)])
        cots = torch.zeros(len(idx) * c, self.n, c, dtype=zf.dtype, device=zf.device)
        rows = torch.arange(len(idx) * c, device=zf.device)
        cots[
            rows,
            torch.tensor(idx, device=zf.device).repeat_interleave(c),
            torch.arange(c, device=zf.device).repeat(len(idx)),
        ] = 1
        jac = self._batched(self.z, cots.view(-1, *self.z.shape), len(idx) * c)
        return jac.view(len(idx), c, self.size)

    # ------------------------------------------------------------------ per-sample losses
    def loss_jvp(self, v: Tensor) -> Tensor:
        """:math:`J_l v = (\\nabla l_i \\cdot v)_i`, shape (N,)."""
        if self._gl is None:
            self._gl = self._linearised(self._need_losses())
        return self._through(self._gl, v)

    def loss_vjp(self, w: Tensor) -> Tensor:
        """:math:`J_l^T w = \\sum_i w_i \\nabla l_i`, flat (P,)."""
        return self._grad(self._need_losses(), w)

    def per_sample_grads(self) -> Tensor:
        """Rows :math:`\\nabla_\\theta l_i`, shape (N, P)."""
        losses = self._need_losses()
        fast = self._per_sample(slice(None), "grad")
        if fast is not None:
            return fast
        eye = torch.eye(self.n, dtype=losses.dtype, device=losses.device)
        return self._batched(losses, eye, self.n)

    # ------------------------------------------------------------------ Hessian
    def _gradient_graph(self) -> tuple[list[Tensor], list[int]]:
        """The pieces of g(theta) = grad L that depend on theta (with their graph), and
        their indices in ``_wrt()``; built once."""
        if self._ggraph is None:
            with torch.enable_grad():
                parts = torch.autograd.grad(
                    self.value_t,
                    self._wrt(),
                    create_graph=True,
                    retain_graph=True,
                    allow_unused=True,
                )
            keep = [(g, i) for i, g in enumerate(parts) if g is not None and g.requires_grad]
            self._ggraph = [g for g, _ in keep], [i for _, i in keep]
        return self._ggraph

    def hvp(self, v: Tensor) -> Tensor:
        """:math:`H v` with H the Hessian of L (reverse over reverse, graph built once)."""
        gs, idx = self._gradient_graph()
        chunks = self._unflatten(v)
        return self._grad(gs, [chunks[i] for i in idx])

    def hmm(self, V: Tensor) -> Tensor:
        """:math:`H V` for columns V (P, k), vmapped over the columns."""
        gs, idx = self._gradient_graph()
        k = V.shape[1]
        chunks = self._unflatten(V.T.contiguous(), batch=k)
        return self._batched(gs, [chunks[i] for i in idx], k).T


class Graph(NamedTuple):
    r"""One forward of the model and loss at theta on a batch, with its autograd graph: the
    leaf ``theta`` (flat, requires grad), the outputs :math:`z = f(x, \theta)`, the per-sample
    losses :math:`l_i` and their mean :math:`L` (a 0-dim tensor), as :func:`forward` makes it.
    With ``record`` (:func:`forward`) also ``pieces``, the per-parameter views of theta the
    forward used, and ``calls``, for each recorded module the (input, output) of each of its
    calls, the output a tensor of the graph (what K-FAC's factors need, with no forward of
    their own); otherwise both None."""

    theta: Tensor
    z: Tensor
    losses: Tensor
    value_t: Tensor
    pieces: list[Tensor] | None = None
    calls: dict[nn.Module, list[tuple[Tensor, Tensor]]] | None = None


def _record_call(calls: dict, module: nn.Module, inputs: tuple, output: Any) -> Tensor | None:
    """Forward hook of :func:`forward`'s ``record``: keep the call's input (detached) and
    output; the rest of the forward gets a copy of the output, so that an in-place operation
    after the layer (``ReLU(inplace=True)``) cannot change the tensor kept."""
    if not (isinstance(output, Tensor) and output.requires_grad and inputs):
        return None
    if not isinstance(inputs[0], Tensor):
        return None
    calls.setdefault(module, []).append((inputs[0].detach(), output))
    return output.clone()


def forward(
    space: ParamSpace,
    loss: Loss,
    inputs: Inputs,
    targets: Tensor,
    theta: Tensor,
    record: tuple[type[nn.Module], ...] = (),
) -> Graph:
    r"""The model and loss at ``theta`` with the autograd graph kept, as :class:`Point` builds
    it (a fresh leaf :math:`\theta`, :math:`z = f(x, \theta)`, :math:`l_i`, :math:`L`).

    Attention runs with the math kernel of ``scaled_dot_product_attention`` (the fused ones
    have no double backward, which J v, H v and per-sample gradients need; same values).
    The model must return one tensor of the parameters' dtype, else a
    :class:`~steepest.errors.ShapeError`; the loss checks the targets. ``record``: module
    types (e.g. ``(nn.Linear,)``) whose calls' inputs and outputs the graph keeps
    (``Graph.calls``, with ``Graph.pieces``), by forward hooks for the duration of this forward.

    >>> graph = forward(ParamSpace(model), MSE(), x, y, ParamSpace(model).get())
    >>> float(graph.value_t), Point(model, MSE(), x, y, graph=graph).grad
    """
    theta = theta.detach().clone().requires_grad_(True)
    pieces = calls = None
    handles = []
    if record and space.model is not None:
        # every module of the recorded types has an entry, also one whose forward does not run
        # (an empty list): a reader tells "recorded, not called" from "not recorded"
        mods = [m for m in space.model.modules() if isinstance(m, record)]
        pieces, calls = space.unflatten(theta), {m: [] for m in mods}
        handles = [m.register_forward_hook(functools.partial(_record_call, calls)) for m in mods]
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        try:
            if pieces is None:
                z = space.function()(theta, inputs)
            else:
                args = inputs if isinstance(inputs, tuple) else (inputs,)
                z = torch.func.functional_call(space.model, dict(zip(space.names, pieces)), args)
        except RuntimeError as err:
            _explain_forward_error(err, inputs, theta)
            raise
        finally:
            for h in handles:
                h.remove()
        if not isinstance(z, Tensor):
            raise ShapeError(
                f"the model must return one tensor of outputs, got {type(z).__name__}; "
                "wrap it in a module whose forward returns the output tensor."
            )
        if z.dtype != theta.dtype:
            raise ShapeError(
                f"the model outputs dtype {z.dtype} but its parameters are {theta.dtype}; "
                "convert inputs and model to one dtype."
            )
        loss.check(z.detach(), targets)
        losses = loss.value(z, targets)
        return Graph(theta, z, losses, losses.mean(), pieces, calls)


class Point(GraphProducts):
    r"""The model and loss at ``theta`` on a batch ``(inputs, targets)``.

    Parameters
    ----------
    space: a :class:`~steepest.params.ParamSpace` (or an ``nn.Module``)
    loss: a :class:`~steepest.losses.Loss` or a callable ``(z, y) -> (N,)``
    inputs, targets: the batch; inputs a tensor or a tuple of tensors passed to forward
    theta: the flat parameters to evaluate at (default: the module's current ones)
    generator: the ``torch.Generator`` for sampled quantities (Monte-Carlo Fisher)
    distributed: a :class:`~steepest.distributed.DataParallel` when the batch is this rank's
        shard of a batch spread over ranks: then ``value`` and ``grad`` are those of the whole
        batch (:math:`\sum_r (N_r/N) L_r`, one all_reduce), ``n_total`` is N, while ``n``, the
        per-sample quantities and the products (``jvp``, ``vjp``, ``hvp``, ...) stay this
        shard's, means over its ``n`` samples (the optimizer reduces the metric built on them)
    graph: a :class:`Graph` of a forward already made at theta on this batch
        (:func:`forward`), used instead of a new forward pass: the gradient and every product
        are then taken on its autograd graph (the optimizer passes the accepted trial's graph
        to the next step). Its theta must equal the point's bit for bit (else a
        :class:`~steepest.errors.ShapeError`); that it was made on this batch, by this loss,
        with the model's buffers and random state as they are now, is the caller's to ensure.
    grad: the flat gradient (P,) the caller already holds, taken as ``grad`` instead of the
        point's own backward (the forward still runs and the loss is still checked). For a
        caller that needs only the forward and the gradient's dtype and device (the
        :class:`~steepest.preconditioner.Preconditioner` refreshing K-FAC's factors, which
        passes the ``.grad`` it preconditions); not with ``distributed``.
    record: module types whose calls the forward records (:func:`forward`; ``pieces`` and
        ``calls`` of the point): K-FAC's factors then come from this forward, not a second
        one (the optimizer passes its metric's ``record_layers``); ignored with ``graph``,
        which keeps what its own forward recorded
    """

    def __init__(
        self,
        space: ParamSpace | nn.Module,
        loss: Loss | Callable[[Tensor, Tensor], Tensor],
        inputs: Inputs,
        targets: Tensor,
        theta: Tensor | None = None,
        generator: torch.Generator | None = None,
        distributed: DataParallel | None = None,
        graph: Graph | None = None,
        grad: Tensor | None = None,
        record: tuple[type[nn.Module], ...] = (),
    ) -> None:
        self.distributed = distributed
        if grad is not None and distributed is not None:
            raise ConfigurationError(
                "Point(grad=...) takes a gradient the caller holds; under distributed the "
                "point reduces its own over the ranks: pass grad=None."
            )
        if distributed is None:
            self._evaluate(
                space,
                loss,
                inputs,
                targets,
                theta,
                generator,
                graph=graph,
                grad=grad,
                record=record,
            )
            self.n_total = self.n
            return
        # the means over the whole batch: every rank reaches the all_reduce, also one whose
        # shard failed (then every rank raises), and checks the reduced loss and gradient
        space = space if isinstance(space, ParamSpace) else ParamSpace(space)
        error = None
        try:
            self._evaluate(
                space, loss, inputs, targets, theta, generator, local=True, record=record
            )
        except Exception as err:  # noqa: BLE001 (re-raised on this rank by distributed.mean)
            error = err
        like = space.get()
        value, grad, self.n_total = distributed.mean(
            getattr(self, "value_t", None),
            getattr(self, "grad", None),
            getattr(self, "n", 0),
            like,
            error,
        )
        self.value, self.grad = float(value), grad
        self._check_finite()

    def _evaluate(
        self,
        space: ParamSpace | nn.Module,
        loss: Loss | Callable[[Tensor, Tensor], Tensor],
        inputs: Inputs,
        targets: Tensor,
        theta: Tensor | None,
        generator: torch.Generator | None,
        local: bool = False,
        graph: Graph | None = None,
        grad: Tensor | None = None,
        record: tuple[type[nn.Module], ...] = (),
    ) -> None:
        """Forward (or the given ``graph``'s) and gradient on this batch (``local``: the finite
        checks wait for the reduction over ranks; ``grad``: the caller's, no backward)."""
        self.space = space if isinstance(space, ParamSpace) else ParamSpace(space)
        self.loss = as_loss(loss)
        self.inputs, self.y = inputs, targets
        self.generator = generator
        _check_finite_inputs(inputs, targets)
        for t in (*(inputs if isinstance(inputs, tuple) else (inputs,)), targets):
            if t.ndim >= 1 and t.shape[0] == 0:
                raise ShapeError(
                    f"the batch is empty (a tensor of shape {tuple(t.shape)}); a step needs at "
                    "least one sample: skip empty batches (e.g. DataLoader(drop_last=True))."
                )
        base = self.space.get() if theta is None else theta.detach()
        if graph is None:
            graph = forward(self.space, self.loss, inputs, targets, base, record)
        elif not (graph.theta.dtype == base.dtype and torch.equal(graph.theta.detach(), base)):
            raise ShapeError(
                "Point(graph=...): the graph was evaluated at another theta than the point's; "
                "pass the graph of a forward at these parameters (steepest.point.forward)."
            )
        else:
            self.loss.check(graph.z.detach(), targets)
        self.theta, self.z, self.losses, self.value_t, self.pieces, self.calls = graph
        self.size = self.space.size
        self.n = int(self.z.shape[0])
        self.value = float(self.value_t.detach())
        if not (local or math.isfinite(self.value)):
            self._check_finite()
        if grad is not None:
            if grad.dtype != self.theta.dtype or grad.device != self.theta.device:
                raise ShapeError(
                    f"Point(grad=...): the gradient is {grad.dtype} on {grad.device}, the "
                    f"parameters {self.theta.dtype} on {self.theta.device}; pass the gradient "
                    "in the parameters' dtype and device."
                )
            if grad.shape != self.theta.shape:
                raise ShapeError(
                    f"Point(grad=...): the gradient has shape {tuple(grad.shape)}, the flat "
                    f"parameters {tuple(self.theta.shape)}; pass the flat gradient (P,)."
                )
            g = grad
        else:
            (g,) = torch.autograd.grad(
                self.value_t, self.theta, retain_graph=True, allow_unused=True
            )
        self.grad = torch.zeros_like(self.theta) if g is None else g.detach()
        if not local:
            self._check_finite()
        # per-sample quantities by vmap unless the model couples samples (BatchNorm in train)
        self._vmap_failed = any(
            m.training and isinstance(m, nn.modules.batchnorm._BatchNorm)
            for m in self.space.model.modules()
        )

    # ------------------------------------------------------------------ products
    def _wrt(self) -> list[Tensor]:
        """The single flat leaf theta (the products of :class:`GraphProducts`)."""
        return [self.theta]

    def _per_sample(self, samples: slice, kind: str) -> Tensor | None:
        """Per-sample output Jacobians (kind='jacobian', (n, C*, P)) or loss gradients
        (kind='grad', (n, P)) by ``torch.func.vmap`` over samples: O(n) model evaluations of
        one sample each, instead of a batched backward through the whole batch per row.
        Returns None, and the caller uses the batched backward from then on, where the model
        couples its samples: BatchNorm in training mode (known by its type), any other model
        whose one-sample results differ from the batch's (:func:`~steepest.per_sample.rows_agree`: a
        custom ``h - h.mean(0)``, outputs that do not follow the inputs sample by sample), or
        where vmap cannot trace it (Dropout in training: random)."""
        if self._vmap_failed:
            return None
        f = self.space.function()
        xs = self.inputs if isinstance(self.inputs, tuple) else (self.inputs,)
        rows = vmapped_rows(self, f, tuple(t[samples] for t in xs), samples, kind)
        self._vmap_failed = rows is None
        return rows


def evaluate(
    space: ParamSpace, loss: Loss, inputs: Inputs, targets: Tensor, theta: Tensor
) -> tuple[float, Tensor]:
    """Mean loss and outputs at ``theta``, without a graph (for line searches and rho).
    Attention runs with the math kernel, as in :func:`forward`, so that a trial evaluated here
    and one evaluated with its graph give the same values."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        z = space.function()(theta, inputs)
        return float(loss.value(z, targets).mean()), z

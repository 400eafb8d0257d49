r"""Trial points of one step: the loss :math:`L(\theta_0 + \delta)` that the step rule, rho and
CG backtracking ask for, memoised, and the accepted trial's forward kept for the next step.

A step of :math:`\delta = -\alpha (M + \lambda I)^{-1} g` evaluates the loss at trial points
:math:`\theta_0 + \delta` (rho's :math:`L(\theta_0 + \delta)`, line-search and backtracking
trials). When the step is accepted, :math:`\theta_1 = \theta_0 + \delta` and the next step on
the same batch evaluates the model at :math:`\theta_1` once more, to build its
:class:`~steepest.point.Point`. MINPACK's ``lmder`` does not: the residuals of the accepted
trial are those of the next iterate (Moré 1978). :class:`Trials` with ``keep_graph`` evaluates
each trial with its autograd graph (:func:`~steepest.point.forward`, the forward a Point makes)
and keeps the last one; :class:`NextPoint` holds the accepted trial's graph with what must not
have changed for the next step to use it as its point instead of a new forward: the batch (the
same tensor objects, their ``_version`` unchanged), the loss, the model's training flags and
buffers, and theta (bit for bit the trial's). The reused point is then the fresh one bit for bit:
the same function at the same theta on the same tensors.

A trial's forward is reused only when it was *pure*: it drew no random numbers and wrote no
buffer (:meth:`~steepest.guard.ForwardGuard.trial_was_pure`). Dropout in training mode draws
masks, BatchNorm in training mode writes its running statistics: a fresh forward at the next
step would draw other masks from the random state of that step, and move the statistics, so
such a model never reuses (its trials then run without a graph for the rest of the step).

Example
-------
>>> trials = Trials(space, loss, x, y, theta0, point.z.detach(), guard, point, keep_graph=True)
>>> trials.loss_at(delta), trials.count          # L(theta0 + delta), 1 forward
>>> trials.graph_at(delta)                       # its Graph, for NextPoint
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import Tensor, nn

from .guard import ForwardGuard
from .losses import Loss
from .params import ParamSpace
from .point import Graph, Inputs, Point, evaluate, forward


def l2_penalty(eta: Tensor, theta: Tensor) -> float:
    r""":math:`\tfrac12 \sum_j \eta_j \theta_j^2` (weight decay as a term of the objective)."""
    return 0.5 * float((eta * theta * theta).sum())


class Trials:
    r"""Loss and outputs at :math:`\theta_0 + \delta`, memoised (a step rule, rho and CG
    backtracking often ask for the same point); ``count`` is the number of forward passes made.

    Parameters
    ----------
    space, loss, inputs, targets: the step's model, loss and batch
    theta0: the step's point :math:`\theta_0`; z0: its outputs (for KL trials)
    guard: the step's :class:`~steepest.guard.ForwardGuard` (trials run in ``guard.trial()``)
    point: the step's point (its rank share under torch.distributed)
    l2: weight decay :math:`\eta` (TorchOptimizer), added to each trial's loss
    keep_graph: evaluate each trial with its autograd graph and keep the last pure one
        (:meth:`graph_at`); off for the rest of the step once a trial's forward was not pure
    record: module types whose calls a kept graph records (:func:`~steepest.point.forward`):
        the next step's point, and K-FAC's factors taken from it, are then this forward's
    """

    def __init__(
        self,
        space: ParamSpace,
        loss: Loss,
        inputs: Inputs,
        targets: Tensor,
        theta0: Tensor,
        z0: Tensor,
        guard: ForwardGuard | None = None,
        point: Point | None = None,
        l2: Tensor | None = None,
        keep_graph: bool = False,
        record: tuple[type[nn.Module], ...] = (),
    ) -> None:
        self.space, self.loss, self.inputs, self.targets = space, loss, inputs, targets
        self.theta0, self.z0, self.l2 = theta0, z0, l2
        self.guard = guard or ForwardGuard()
        # under torch.distributed: this rank's share N_r / N of the means (reduced over ranks)
        self.distributed = None if point is None else point.distributed
        self.weight = 1.0 if point is None else point.n / point.n_total
        self.keep_graph = keep_graph
        self.record = record
        self.count = 0
        self._memo: list[tuple[Tensor, float, Tensor]] = []
        self._graph: tuple[Tensor, Graph] | None = None  # (delta, graph) of the last trial

    def _eval(self, delta: Tensor) -> tuple[float, Tensor]:
        for d, value, z in self._memo:
            if torch.equal(d, delta):
                return value, z
        with self.guard.trial():  # the point's buffers and Dropout masks, never written
            if self.keep_graph:
                graph = forward(
                    self.space,
                    self.loss,
                    self.inputs,
                    self.targets,
                    self.theta0 + delta,
                    self.record,
                )
                pure = self.guard.trial_was_pure()
                value, z = float(graph.value_t.detach()), graph.z.detach()
            else:
                value, z = evaluate(
                    self.space, self.loss, self.inputs, self.targets, self.theta0 + delta
                )
        kept = delta.detach().clone()  # one copy, for the memo and the kept graph
        if self.keep_graph:
            self._graph = (kept, graph) if pure else None
            self.keep_graph = pure
        if self.l2 is not None:
            value += l2_penalty(self.l2, self.theta0 + delta)
        value = value if math.isfinite(value) else math.inf
        if self.distributed is not None:
            value = self.distributed.scalar(value, self.weight)
        self.count += 1
        self._memo = [*self._memo[-7:], (kept, value, z)]
        return value, z

    def loss_at(self, delta: Tensor) -> float:
        """:math:`L(\\theta_0 + \\delta)` (+ the weight-decay term), inf where not finite."""
        return self._eval(delta)[0]

    def kl_at(self, delta: Tensor) -> float:
        """:math:`\\frac1N\\sum_i KL(R_{z_i(\\theta_0)} \\| R_{z_i(\\theta_0+\\delta)})`."""
        _, z = self._eval(delta)
        kl = float(self.loss.kl(self.z0, z).mean())
        kl = kl if math.isfinite(kl) else math.inf
        if self.distributed is not None:
            kl = self.distributed.scalar(kl, self.weight)
        return kl

    def graph_at(self, delta: Tensor) -> Graph | None:
        """The kept graph of the trial at ``delta`` (None unless it was the last trial
        evaluated and its forward was pure)."""
        if self._graph is not None and torch.equal(self._graph[0], delta):
            return self._graph[1]
        return None


def _tensors(inputs: Inputs, targets: Tensor) -> tuple[Tensor, ...]:
    return (*(inputs if isinstance(inputs, tuple) else (inputs,)), targets)


class Batch:
    """What identifies a batch across steps: weak references to its tensors and their
    ``_version`` (bumped by every in-place change autograd sees). Changes that bypass the
    version counter (through ``.data`` or a NumPy array sharing the memory) are not seen."""

    def __init__(self, inputs: Inputs, targets: Tensor) -> None:
        tensors = _tensors(inputs, targets)
        self._refs = [weakref.ref(t) for t in tensors]
        self._versions = [t._version for t in tensors]

    def same(self, inputs: Inputs, targets: Tensor) -> bool:
        """Whether (inputs, targets) are the same tensor objects, unmodified since."""
        tensors = _tensors(inputs, targets)
        return len(tensors) == len(self._refs) and all(
            r() is t and t._version == v
            for r, t, v in zip(self._refs, tensors, self._versions, strict=True)
        )


class NextPoint:
    r"""The accepted trial's :class:`~steepest.point.Graph` at :math:`\theta_1`, kept for the
    next step, with what it was made from: the batch, the loss, the model's training flags, its
    buffers and all its parameters, frozen ones included (the tensor objects and their
    ``_version``). Not seen: plain Python attributes of the model or the loss and hooks changed
    between steps; a loop that changes those between steps on the same batch should pass
    ``Optimizer(reuse=False)``.

    >>> nxt = NextPoint(graph, model, loss, x, y)
    >>> nxt.graph if nxt.matches(space, loss, x, y) else None
    """

    def __init__(
        self, graph: Graph, model: nn.Module, loss: Loss, inputs: Inputs, targets: Tensor
    ) -> None:
        self.graph, self.model, self.loss = graph, model, loss
        self.batch = Batch(inputs, targets)
        self.training = [m.training for m in model.modules()]
        self.buffers = [(b, b._version) for b in model.buffers()]
        # every parameter, frozen ones included: a frozen weight changed in place between the
        # steps (alternating optimisation) changes the function without changing theta (the
        # trainable ones are compared through theta: the step writes them after this)
        self.params = [(p, p._version, p.requires_grad) for p in model.parameters()]

    def matches(self, space: ParamSpace, loss: Loss, inputs: Inputs, targets: Tensor) -> bool:
        """Whether a fresh forward at the model's parameters on (inputs, targets) would be this
        graph's: the same batch, loss, model state, and parameters equal to its theta."""
        model = space.model
        if not (model is self.model and loss is self.loss and self.batch.same(inputs, targets)):
            return False
        if [m.training for m in model.modules()] != self.training:
            return False
        buffers = list(model.buffers())
        if len(buffers) != len(self.buffers) or not all(
            b is b0 and b._version == v for b, (b0, v) in zip(buffers, self.buffers, strict=True)
        ):
            return False
        params = list(model.parameters())
        if len(params) != len(self.params) or not all(
            p is p0 and p.requires_grad == rg and (rg or p._version == v)
            for p, (p0, v, rg) in zip(params, self.params, strict=True)
        ):
            return False
        theta, ref = space.get(), self.graph.theta.detach()
        return theta.dtype == ref.dtype and theta.shape == ref.shape and torch.equal(theta, ref)

r"""Preconditioner mode: :math:`\nabla \leftarrow (M + \lambda I)^{-1}\nabla` in place on the
parameters' ``.grad``, so that any ``torch.optim`` optimizer (SGD, AdamW, ...) applies the
second-order step (the user pattern of kfac-pytorch).

.. code-block:: python

    pre = Preconditioner(model, CrossEntropy(), metric=KFAC(), damping=1e-3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, y in loader:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step(x, y)            # .grad <- (M + lambda I)^-1 .grad
        opt.step()

The metric is built on the batch (one :class:`~steepest.point.Point`: a forward pass, plus what
the metric needs, e.g. K-FAC's extra backward for the sampled labels) and solved with its own
inverse (:class:`~steepest.solvers.Auto` picks it for ``Diagonal``, ``KFAC``, ``EKFAC``). The
gradient preconditioned is the one in ``.grad``, whatever the user's loss added to it
(regularisers, weight decay by coupling). A metric that keeps state (K-FAC's running factors,
``T_cov``/``T_inv``) keeps it across calls and saves it in :meth:`state_dict`.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable
from types import SimpleNamespace

import torch
from torch import Tensor, nn

from .distributed import DataParallel, as_data_parallel
from .errors import ConfigurationError, NonFiniteError, all_finite
from .guard import ForwardGuard, _rng_state, _set_rng_state
from .losses import Loss, as_loss
from .metrics import Metric
from .params import ParamSpace
from .point import Inputs, Point
from .solvers import Auto, OwnInverse, Solution, Solver, as_solver
from .state import metric_state, set_metric_state


class _Own(Solver):
    """The operator's own inverse without the residual check (one product saved)."""

    def solve(self, a, b: Tensor, x0: Tensor | None = None) -> Solution:
        return Solution(a.solve(b), 1, float("nan"), exact=a.inverse_exact)


class Preconditioner:
    r"""Precondition ``.grad`` in place: :math:`\nabla \leftarrow (M + \lambda I)^{-1}\nabla`.

    Parameters
    ----------
    model: the module whose trainable parameters' ``.grad`` are preconditioned
    loss: the per-sample loss :math:`l(y, z)` (a :class:`~steepest.losses.Loss`) the metric
        is built from
    metric: any metric; default ``KFAC(damping="factored")`` (Fisher with one sampled label
        per input; factors every 10 steps as running averages, their damped inverses every
        100 (by Cholesky); Martens & Grosse's factored Tikhonov damping, whose inverse is a
        Kronecker product, since lambda is fixed here and no quadratic model asks for the
        exact damped matrix).
        With ``KFAC`` (not ``EKFAC``) forward hooks on the model's ``Linear`` layers record the
        inputs :math:`\bar a` and output gradients g of the user's own backward; when ``.grad``
        of a layer is their :math:`g^T\bar a` (checked each step by two random probes) and
        cheaper so, its block is :math:`(G^{-1} g^T)(\bar a A^{-1})`,
        :math:`O(R(o^2 + d^2 + od))` for R rows instead of :math:`O(o^2 d + o d^2)`; any other
        ``.grad`` (weight decay added, accumulated micro-batches) gets the dense product, the
        same value. ``metric.fast_blocks`` counts the blocks of the last step done so;
        :meth:`remove_hooks` turns the recording off
    damping: :math:`\lambda > 0`, a float
    solver: ``"auto"`` (the metric's own inverse when it has one) or a solver
    generator: the ``torch.Generator`` for sampled labels (seeded 0 if None)
    kl_clip: None (default: ``.grad`` becomes x, unscaled) or :math:`\kappa > 0`, the bound
        on the step's quadratic model of the KL divergence (kfac-pytorch's ``kl_clip``; the
        trust region :math:`d^T M d \le \epsilon^2` of Table 1): with x =
        :math:`\tilde M^{-1} g` (:math:`\tilde M` the matrix inverted: :math:`M + \lambda I`,
        or K-FAC's factored damping, :math:`\tilde M \succeq M` as well) and the optimizer's
        learning rate :math:`\eta`, ``.grad`` becomes :math:`\nu x`,
        :math:`\nu = \min(1, \sqrt{\kappa / (\eta^2 g^T x)})`, so that the step
        :math:`d = -\eta\nu x` has :math:`d^T M d \le d^T \tilde M d = \eta^2\nu^2 g^T x
        \le \kappa`. Parameter groups with different rates (a diagonal D of rates,
        :math:`d = -\nu D x`) take :math:`\nu` from :math:`q = (Dx)^T (M + \lambda I) (Dx)`,
        one product with the operator, since M couples the groups (a layer's weight and
        bias). The bound assumes the optimizer steps :math:`-\eta` ``.grad`` (SGD; a momentum
        buffer is not part of it); Adam and AdamW rescale the gradient themselves, which undoes
        :math:`\nu`. It bounds the step where M is nearly singular (a small lambda), which
        plain SGD on x does not (kfac-pytorch's default is 1e-3)
    lr: the learning rate :math:`\eta` of the optimizer that applies the step, needed with
        ``kl_clip``: the ``torch.optim`` optimizer itself (its parameter groups' current
        ``lr``, so schedulers are followed), a float, or a callable returning a float
    distributed: None, True or a :class:`~steepest.distributed.DataParallel`: under
        torch.distributed each rank passes its shard to :meth:`step` and M is the whole
        batch's (K-FAC's factors reduced over the ranks, KAISA-style); ``.grad`` must already
        be the same on every rank (a ``DistributedDataParallel`` backward averages it; pass the
        DDP model, it is unwrapped). Sampled labels are independent per rank.

    Example
    -------
    >>> pre = Preconditioner(model, CrossEntropy(), metric=KFAC(), damping=1e-3)
    >>> loss.backward(); pre.step(x, y); torch_optimizer.step()
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    >>> pre = Preconditioner(model, CrossEntropy(), kl_clip=1e-3, lr=opt)  # bounded steps
    """

    def __init__(
        self,
        model: nn.Module,
        loss: Loss | Callable[[Tensor, Tensor], Tensor],
        metric: Metric | None = None,
        damping: float = 1e-3,
        solver: Solver | str = "auto",
        generator: torch.Generator | None = None,
        distributed: DataParallel | bool | None = None,
        kl_clip: float | None = None,
        lr: float | Callable[[], float] | torch.optim.Optimizer | None = None,
    ) -> None:
        from .ekfac import EKFAC
        from .kronecker import KFAC
        from .kronecker_capture import _GradientRecorder

        if not isinstance(model, nn.Module):
            raise ConfigurationError(
                f"model must be a torch.nn.Module, got {type(model).__name__}."
            )
        self.distributed, model = as_data_parallel(distributed, model)
        self.model, self.space = model, ParamSpace(model)
        self.loss = as_loss(loss)
        self.metric = KFAC(damping="factored") if metric is None else metric
        if not isinstance(self.metric, Metric):
            raise ConfigurationError(f"metric must be a steepest metric, got {self.metric!r}.")
        if not (isinstance(damping, int | float) and 0 < damping < float("inf")):
            raise ConfigurationError(
                f"damping must be a finite number > 0 (the lambda of M + lambda I), got "
                f"{damping!r}."
            )
        self.damping = float(damping)
        if kl_clip is not None:
            if not (isinstance(kl_clip, int | float) and 0 < kl_clip < float("inf")):
                raise ConfigurationError(
                    f"kl_clip must be a finite number > 0 (the bound on the step's KL model), "
                    f"got {kl_clip!r}; pass None for no bound."
                )
            if lr is None:
                raise ConfigurationError(
                    "kl_clip bounds the step -lr * .grad, so it needs the learning rate: pass "
                    "lr=the torch.optim optimizer (or a float, or a callable returning one)."
                )
        if not (
            lr is None
            or isinstance(lr, torch.optim.Optimizer)
            or callable(lr)
            or (isinstance(lr, int | float) and 0 <= lr < float("inf"))
        ):
            raise ConfigurationError(
                f"lr must be a torch.optim optimizer, a finite float >= 0 or a callable, got "
                f"{lr!r}."
            )
        if isinstance(lr, torch.optim.Optimizer):
            held = {id(p) for g in lr.param_groups for p in g["params"]}
            missing = sum(id(p) not in held for p in self.space.params)
            if missing:
                raise ConfigurationError(
                    f"lr: the optimizer passed does not hold {missing} of the model's trainable "
                    "parameters; pass the optimizer that steps this model."
                )
        self.kl_clip = None if kl_clip is None else float(kl_clip)
        self.lr = lr
        self.last_scale = 1.0  # nu of the last step (kl_clip), 1.0 without
        self.solver = as_solver(solver) if not isinstance(solver, Solver) else solver
        if generator is None:
            generator = torch.Generator(device=self.space.device)
            generator.manual_seed(0)
        self.generator = generator
        self.last_solver = ""
        self._grad_buffer: Tensor | None = None  # the flat gradient, reused across steps
        # K-FAC preconditions the Linear layers' gradient from the rows of the user's own
        # backward when .grad is that gradient (checked per step): (G^-1 g^T)(a A^-1)
        self._recorder = None
        if isinstance(self.metric, KFAC) and not isinstance(self.metric, EKFAC):
            if self.distributed is None:  # .grad is then every rank's mean, the rows local
                self._recorder = _GradientRecorder(model)
                # a Preconditioner that is dropped takes its hooks off the model with it
                weakref.finalize(self, self._recorder.remove)
        # K-FAC (not EKFAC) without the rescaling by the exact quadratic model, one process:
        # a refresh differentiates the point's recorded forward (record_layers) and needs of
        # the point no gradient: the .grad it preconditions
        # stands in for the point's gradient (Point(grad=...): no backward)
        self._given_grad = (
            type(self.metric) is KFAC and self.metric.rescale is None and self.distributed is None
        )

    def step(self, inputs: Inputs, targets: Tensor) -> None:
        """Replace the trainable parameters' ``.grad`` by :math:`(M+\\lambda I)^{-1}` of it,
        M the metric on the batch (inputs, targets). Parameters without a gradient count as
        zero. Nothing changes when this raises."""
        params = self.space.params
        if all(p.grad is None for p in params):
            raise ConfigurationError(
                "no parameter has a .grad: call loss.backward() before Preconditioner.step()."
            )
        grad = self._flat_grad(params)
        if not all_finite(grad):
            raise NonFiniteError("the gradient in .grad holds NaN or infinite values.")
        lazy = getattr(self.metric, "needs_point", None)
        # K-FAC between refreshes: the operator comes from the metric's state alone, no
        # forward runs (no buffers to guard, no random state to put back)
        forward = lazy is None or lazy()
        saved = (self.generator.get_state(), metric_state(self.metric))
        recorder = self._recorder
        recorded = None
        if recorder is not None:
            recorded = recorder.rows(self.space)
            recorder.enabled = False
        # the user's own forward already moved BatchNorm's running statistics and drew the
        # Dropout masks of this step: every forward here runs on copies of the buffers
        # (ForwardGuard after point_done) and the global random state is put back
        rng = _rng_state() if forward else None
        try:
            dp, sampler = self.distributed, self.generator
            if dp is not None:  # independent labels per rank, one shared generator state
                sampler = dp.generator(self.generator)
            with ForwardGuard(self.space.model) if forward else contextlib.nullcontext() as guard:
                if not forward:
                    point = SimpleNamespace(
                        space=self.space, size=self.space.size, grad=grad, loss=self.loss
                    )
                else:
                    guard.point_done()
                    point = Point(
                        self.space,
                        self.loss,
                        inputs,
                        targets,
                        generator=sampler,
                        distributed=dp,
                        grad=grad if self._given_grad else None,
                        # K-FAC's factors from this forward's recorded layers: no second one
                        record=tuple(getattr(self.metric, "record_layers", ())),
                    )
                op = self.metric.operator(point)
                if dp is not None and not getattr(self.metric, "reduces_over_ranks", False):
                    op = dp.operator(op, point.n, point.n_total)
                op = op.add_diagonal(self.damping)
                solver = self.solver.choose(op) if isinstance(self.solver, Auto) else self.solver
                if isinstance(solver, OwnInverse):  # no residual product: its own inverse
                    solver = _Own()
                if recorded:
                    self.metric._recorded = recorded
                try:
                    x = solver.solve(op, grad).x
                finally:
                    if recorder is not None:
                        self.metric._recorded = None
            if not all_finite(x):
                raise NonFiniteError(
                    f"the preconditioned gradient is not finite ({op.name}); raise the damping."
                )
            scale = 1.0 if self.kl_clip is None else self._kl_scale(params, grad, x, op)
        except BaseException:
            self.generator.set_state(saved[0])
            set_metric_state(self.metric, saved[1])
            raise
        finally:
            if rng is not None:
                _set_rng_state(rng)
            if recorder is not None:
                recorder.enabled = True
        self.last_solver = "OwnInverse" if isinstance(solver, _Own) else type(solver).__name__
        self.last_scale = scale
        with torch.no_grad():
            if scale != 1.0:
                x = x * scale
            for p, chunk in zip(params, self.space.unflatten(x)):
                if p.grad is None:
                    p.grad = chunk.clone()
                else:
                    p.grad.copy_(chunk)

    def _learning_rates(self, params: list[Tensor]) -> list[float]:
        """The learning rate of each parameter (``lr``: an optimizer's groups, a float or a
        callable)."""
        lr = self.lr
        if isinstance(lr, torch.optim.Optimizer):
            by_id = {id(p): float(g["lr"]) for g in lr.param_groups for p in g["params"]}
            return [by_id[id(p)] for p in params]  # all present: checked at construction
        value = lr() if callable(lr) else lr
        if not (isinstance(value, int | float) and 0 <= value < float("inf")):
            raise ConfigurationError(f"lr() must return a finite float >= 0, got {value!r}.")
        return [float(value)] * len(params)

    def _kl_scale(self, params: list[Tensor], grad: Tensor, x: Tensor, op) -> float:
        """nu = min(1, sqrt(kl_clip / q)), q the step's size d^T M d for d = -D x (D the
        learning rates): one rate eta gives q = eta^2 g^T x (= d^T M~ d, M~ the matrix
        inverted, >= M); rates that differ between parameters (e.g. weights and biases of one
        block) need the product q = (D x)^T (M + lambda I) (D x), since M couples them."""
        rates = self._learning_rates(params)
        if len(set(rates)) == 1:
            q = rates[0] ** 2 * abs(float(grad.double() @ x.double()))
        else:
            dx = torch.cat([r * c.reshape(-1) for r, c in zip(rates, self.space.unflatten(x))])
            q = abs(float(dx.double() @ op.matvec(dx).double()))
        if not q > 0:  # g = 0, or every rate 0: nothing to bound
            return 1.0
        return min(1.0, math.sqrt(self.kl_clip / q))

    def _flat_grad(self, params: list[Tensor]) -> Tensor:
        """The gradients in ``.grad`` (zero where None) as one flat vector, written into a
        buffer kept across steps (one copy, no new allocation of P values per step). The
        vector is only read during the step; nothing keeps it."""
        like = next(p for p in params if p.grad is not None).grad
        buf = self._grad_buffer
        if buf is None or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._grad_buffer = torch.empty(
                self.space.size, dtype=like.dtype, device=like.device
            )
        # detached: after backward(create_graph=True) .grad carries a graph, which cat(out=)
        # refuses; the step only reads the values
        pieces = [
            (torch.zeros_like(p) if p.grad is None else p.grad.detach()).reshape(-1) for p in params
        ]
        return torch.cat(pieces, out=buf)

    def remove_hooks(self) -> None:
        """Remove the forward hooks with which K-FAC records the Linear layers' inputs and
        output gradients of the user's backward; later steps use the dense product."""
        if self._recorder is not None:
            self._recorder.remove()
            self._recorder = None

    def state_dict(self) -> dict:
        """The metric's state (if it keeps any) and the generator."""
        out = {"generator": self.generator.get_state()}
        if hasattr(self.metric, "state_dict"):
            out["metric"] = self.metric.state_dict()
        return out

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved."""
        if "generator" not in state:
            raise ConfigurationError("pass a dict saved by Preconditioner.state_dict().")
        self.generator.set_state(state["generator"])
        if "metric" in state and hasattr(self.metric, "load_state_dict"):
            self.metric.load_state_dict(state["metric"])

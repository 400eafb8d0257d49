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

Example
-------
>>> point = Point(model, CrossEntropy(), x, y)
>>> point.value, point.grad.shape
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .errors import NonFiniteError, ShapeError
from .losses import Loss, as_loss
from .params import ParamSpace

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


class Point:
    """The model and loss at ``theta`` on a batch ``(inputs, targets)``.

    Parameters
    ----------
    space: a :class:`~steepest.params.ParamSpace` (or an ``nn.Module``)
    loss: a :class:`~steepest.losses.Loss` or a callable ``(z, y) -> (N,)``
    inputs, targets: the batch; inputs a tensor or a tuple of tensors passed to forward
    theta: the flat parameters to evaluate at (default: the module's current ones)
    generator: the ``torch.Generator`` for sampled quantities (Monte-Carlo Fisher)
    """

    def __init__(
        self,
        space: ParamSpace | nn.Module,
        loss: Loss | Callable[[Tensor, Tensor], Tensor],
        inputs: Inputs,
        targets: Tensor,
        theta: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self.space = space if isinstance(space, ParamSpace) else ParamSpace(space)
        self.loss = as_loss(loss)
        self.inputs, self.y = inputs, targets
        self.generator = generator
        _check_finite_inputs(inputs, targets)
        base = self.space.get() if theta is None else theta.detach()
        self.theta = base.clone().requires_grad_(True)
        self.size = self.space.size
        # The fused attention kernels (flash, memory-efficient) have no double backward, which
        # the J v trick, H v and the vmapped per-sample gradients need: build the graph with
        # the math kernel of scaled_dot_product_attention (same values).
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
            try:
                z = self.space.function()(self.theta, inputs)
            except RuntimeError as err:
                _explain_forward_error(err, inputs, self.theta)
                raise
            if not isinstance(z, Tensor):
                raise ShapeError(
                    f"the model must return one tensor of outputs, got {type(z).__name__}; "
                    "wrap it in a module whose forward returns the output tensor."
                )
            if z.dtype != self.theta.dtype:
                raise ShapeError(
                    f"the model outputs dtype {z.dtype} but its parameters are "
                    f"{self.theta.dtype}; convert inputs and model to one dtype."
                )
            self.loss.check(z.detach(), targets)
            self.z = z
            self.losses = self.loss.value(z, targets)
            self.n = int(z.shape[0])
            self.value_t = self.losses.mean()
        self.value = float(self.value_t.detach())
        if not torch.isfinite(self.value_t):
            raise NonFiniteError(
                f"the loss is {self.value} at the current parameters; the model or data "
                "produce non-finite values (check the inputs' scale, lower the step size or "
                "raise the damping)."
            )
        (g,) = torch.autograd.grad(self.value_t, self.theta, retain_graph=True, allow_unused=True)
        self.grad = torch.zeros_like(self.theta) if g is None else g.detach()
        if not torch.isfinite(self.grad).all():
            raise NonFiniteError(
                "the gradient holds NaN or infinite values although the loss is finite; check "
                "for operations with infinite derivatives (sqrt(0), log(0)) in the model."
            )
        self._gz: Tensor | None = None
        self._uz: Tensor | None = None
        self._gl: Tensor | None = None
        self._ul: Tensor | None = None
        self._ggraph: Tensor | None = None
        # per-sample quantities by vmap unless the model couples samples (BatchNorm in train)
        self._vmap_failed = any(
            m.training and isinstance(m, nn.modules.batchnorm._BatchNorm)
            for m in self.space.model.modules()
        )

    # ------------------------------------------------------------------ autograd helpers
    def _grad(self, out: Tensor, wrt: Tensor, cot: Tensor, **kw) -> Tensor:
        (r,) = torch.autograd.grad(out, wrt, cot, retain_graph=True, allow_unused=True, **kw)
        if r is None:
            shape = (cot.shape[0], *wrt.shape) if kw.get("is_grads_batched") else wrt.shape
            return torch.zeros(shape, dtype=wrt.dtype, device=wrt.device)
        return r

    def _linearised(self, out: Tensor) -> tuple[Tensor, Tensor]:
        """(J^T u as a differentiable function of a dummy u, u) for out = z or l."""
        u = torch.zeros_like(out, requires_grad=True)
        with torch.enable_grad():
            (gu,) = torch.autograd.grad(
                out, self.theta, u, create_graph=True, retain_graph=True, allow_unused=True
            )
        if gu is None:
            gu = torch.zeros_like(self.theta, requires_grad=False)
        return gu, u

    def _batched(self, out: Tensor, wrt: Tensor, cots: Tensor) -> Tensor:
        """Rows ``cots[r] -> d<out, cots[r]>/d wrt``, vmapped over r, with a loop fallback."""
        try:
            return self._grad(out, wrt, cots, is_grads_batched=True)
        except RuntimeError:
            return torch.stack([self._grad(out, wrt, c) for c in cots])

    # ------------------------------------------------------------------ output space
    def jvp(self, v: Tensor) -> Tensor:
        """:math:`J v`, shaped like the outputs z."""
        if self._gz is None:
            self._gz, self._uz = self._linearised(self.z)
        if not self._gz.requires_grad:
            return torch.zeros_like(self.z)
        return self._grad(self._gz, self._uz, v).detach()

    def vjp(self, u: Tensor) -> Tensor:
        """:math:`J^T u` for u shaped like z, a flat vector of size P."""
        return self._grad(self.z, self.theta, u).detach()

    def jacobian(self, samples: slice | None = None) -> Tensor:
        """Per-sample output Jacobians, shape (n, C, P) for the samples in ``samples``."""
        zf = self.z.reshape(self.n, -1)
        c = zf.shape[1]
        fast = self._per_sample(samples or slice(None), "jacobian")
        if fast is not None:
            return fast.reshape(fast.shape[0], c, self.size)
        idx = range(self.n)[samples or slice(None)]
        cots = torch.zeros(len(idx) * c, self.n, c, dtype=zf.dtype, device=zf.device)
        rows = torch.arange(len(idx) * c, device=zf.device)
        cots[
            rows,
            torch.tensor(list(idx), device=zf.device).repeat_interleave(c),
            torch.arange(c, device=zf.device).repeat(len(idx)),
        ] = 1
        jac = self._batched(self.z, self.theta, cots.view(-1, *self.z.shape))
        return jac.detach().view(len(idx), c, self.size)

    # ------------------------------------------------------------------ per-sample losses
    def loss_jvp(self, v: Tensor) -> Tensor:
        """:math:`J_l v` = (grad l_i . v)_i, shape (N,)."""
        if self._gl is None:
            self._gl, self._ul = self._linearised(self.losses)
        if not self._gl.requires_grad:
            return torch.zeros_like(self.losses)
        return self._grad(self._gl, self._ul, v).detach()

    def loss_vjp(self, w: Tensor) -> Tensor:
        """:math:`J_l^T w = \\sum_i w_i \\nabla l_i`, flat (P,)."""
        return self._grad(self.losses, self.theta, w).detach()

    def per_sample_grads(self) -> Tensor:
        """Rows :math:`\\nabla_\\theta l_i`, shape (N, P)."""
        fast = self._per_sample(slice(None), "grad")
        if fast is not None:
            return fast
        eye = torch.eye(self.n, dtype=self.losses.dtype, device=self.losses.device)
        return self._batched(self.losses, self.theta, eye).detach()

    def _per_sample(self, samples: slice, kind: str) -> Tensor | None:
        """Per-sample output Jacobians (kind='jacobian', (n, C*, P)) or loss gradients
        (kind='grad', (n, P)) by ``torch.func.vmap`` over samples: O(n) model evaluations of
        one sample each, instead of a batched backward through the whole batch per row.
        Returns None where vmap cannot trace the model (e.g. BatchNorm in training mode,
        which couples the samples); the caller then uses the batched backward."""
        if self._vmap_failed:
            return None
        from torch.func import grad, jacrev, vmap

        f, loss = self.space.function(), self.loss
        xs = self.inputs if isinstance(self.inputs, tuple) else (self.inputs,)
        xs = tuple(t[samples] for t in xs)
        theta = self.theta.detach()

        def out(th: Tensor, *xi: Tensor) -> Tensor:
            return f(th, tuple(t.unsqueeze(0) for t in xi)).reshape(-1)

        def one_loss(th: Tensor, yi: Tensor, *xi: Tensor) -> Tensor:
            z = f(th, tuple(t.unsqueeze(0) for t in xi))
            return loss.value(z, yi.unsqueeze(0)).sum()

        try:
            with sdpa_kernel(SDPBackend.MATH):
                if kind == "jacobian":
                    dims = (None,) + (0,) * len(xs)
                    return vmap(jacrev(out), in_dims=dims)(theta, *xs).detach()
                dims = (None, 0) + (0,) * len(xs)
                return vmap(grad(one_loss), in_dims=dims)(theta, self.y[samples], *xs).detach()
        except (RuntimeError, ValueError, TypeError, NotImplementedError):
            self._vmap_failed = True
            return None

    # ------------------------------------------------------------------ Hessian
    def hvp(self, v: Tensor) -> Tensor:
        """:math:`H v` with H the Hessian of L (reverse over reverse, graph built once)."""
        return self._hessian_graph_product(v)

    def hmm(self, V: Tensor) -> Tensor:
        """:math:`H V` for columns V (P, k), vmapped over the columns."""
        return self._hessian_graph_product(V.T.contiguous(), batched=True).T

    def _hessian_graph_product(self, v: Tensor, batched: bool = False) -> Tensor:
        if self._ggraph is None:
            with torch.enable_grad():
                (gg,) = torch.autograd.grad(
                    self.value_t,
                    self.theta,
                    create_graph=True,
                    retain_graph=True,
                    allow_unused=True,
                )
            self._ggraph = gg if gg is not None else torch.zeros_like(self.theta)
        if not self._ggraph.requires_grad:
            return torch.zeros_like(v)
        if batched:
            return self._batched(self._ggraph, self.theta, v).detach()
        return self._grad(self._ggraph, self.theta, v).detach()


def evaluate(
    space: ParamSpace, loss: Loss, inputs: Inputs, targets: Tensor, theta: Tensor
) -> tuple[float, Tensor]:
    """Mean loss and outputs at ``theta``, without a graph (for line searches and rho)."""
    with torch.no_grad():
        z = space.function()(theta, inputs)
        return float(loss.value(z, targets).mean()), z

r"""Per-sample rows by ``torch.func.vmap``: output Jacobians :math:`J_i` or loss gradients
:math:`\nabla l_i`, one sample at a time, and the check that they are the batch's.

A model call on a batch of one, vmapped over the samples, gives every sample's rows in O(n)
one-sample evaluations instead of one batched backward per row. It is right only where the
model treats its samples independently; :func:`rows_agree` checks that against the batch, so
the caller (:class:`~steepest.point.Point`, :class:`~steepest.closure_point.ClosurePoint`)
takes its batched backward where it is not.

Example
-------
>>> rows = vmapped_rows(point, model_function, (x,), slice(None), "jacobian")  # or None
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel


def vmapped_rows(
    products: Any,
    f: Callable[[Tensor, tuple[Tensor, ...]], Tensor],
    xs: tuple[Tensor, ...],
    samples: slice,
    kind: str,
) -> Tensor | None:
    r"""The per-sample rows of ``products`` (a :class:`~steepest.point.GraphProducts`) for
    ``samples``: kind 'jacobian' :math:`J_i` (n, C*, P), kind 'grad' :math:`\nabla l_i`
    (n, P), by vmap over ``f(theta, inputs)``, the model called on a batch of one (``xs``
    the samples' inputs). None where vmap cannot trace the call, where the call's output is not
    one row per sample (a residual vector posed as samples, a forward that squeezes a batch of
    one to 0-d), or where the rows are not the batch's (:func:`rows_agree`)."""
    from torch.func import grad, jacrev, vmap

    loss = products.loss

    def one(th: Tensor, xi: tuple[Tensor, ...]) -> Tensor:
        z = f(th, tuple(t.unsqueeze(0) for t in xi))
        if z.ndim == 0 or z.shape[0] != 1:
            raise ValueError("the model's outputs do not follow its inputs sample by sample")
        return z

    def out(th: Tensor, *xi: Tensor) -> tuple[Tensor, Tensor]:
        z = one(th, xi).reshape(-1)
        return z, z.detach()

    def one_loss(th: Tensor, yi: Tensor, *xi: Tensor) -> tuple[Tensor, Tensor]:
        z = one(th, xi)
        return loss.value(z, yi.unsqueeze(0)).sum(), z.detach().reshape(-1)

    theta = products.theta.detach()
    try:
        with sdpa_kernel(SDPBackend.MATH):
            if kind == "jacobian":
                dims = (None,) + (0,) * len(xs)
                rows, outs = vmap(jacrev(out, has_aux=True), in_dims=dims)(theta, *xs)
            else:
                dims = (None, 0) + (0,) * len(xs)
                rows, outs = vmap(grad(one_loss, has_aux=True), in_dims=dims)(
                    theta, products.y[samples], *xs
                )
    except (RuntimeError, ValueError, TypeError, NotImplementedError):
        return None
    rows = rows.detach()
    return rows if rows_agree(products, samples, kind, rows, outs) else None


def rows_agree(products: Any, samples: slice, kind: str, rows: Tensor, outs: Tensor) -> bool:
    r"""Whether per-sample results computed one sample at a time are those of the batch, i.e.
    whether the model treats its samples independently. Two checks, with the tolerance
    :func:`check_tolerance` relative to the largest entry:

    - every call: the outputs ``outs`` (n, C*) of the one-sample calls equal the batch outputs
      z of these samples (same shape, same values; free, vmap returns them);
    - once per point (``products._rows_checked``): the rows contracted with a fixed random
      vector equal the same product on the batch's graph, :math:`\sum_i J_i^T u_i = J^T u` with
      u zero outside these samples (kind 'jacobian'), :math:`\sum_i w_i \nabla l_i = J_l^T w`
      (kind 'grad'): one backward pass. It catches a coupling that leaves the outputs unchanged
      at this theta but not their derivatives (a batch term of zero weight).

    A model that mixes its samples (batch statistics, ``h - h.mean(0)``) fails one of them.
    """
    z = products.z.detach()
    zf = z.reshape(products.n, -1)[samples]
    if outs.shape != zf.shape or rows.shape[0] != zf.shape[0]:
        return False
    tol = check_tolerance(zf)
    if not _close(outs, zf, tol):
        return False
    if products._rows_checked:
        return True
    gen = torch.Generator().manual_seed(0)  # a fixed vector: the check is reproducible
    if kind == "jacobian":
        u = torch.randn(zf.shape, generator=gen, dtype=zf.dtype).to(zf.device)
        full = torch.zeros_like(z).reshape(products.n, -1)
        full[samples] = u
        want = products.vjp(full.reshape(z.shape))
        got = u.reshape(-1) @ rows.reshape(-1, rows.shape[-1])  # a GEMV, not einsum's bmm
    else:
        losses = products._need_losses().detach()
        w = torch.randn(zf.shape[0], generator=gen, dtype=losses.dtype).to(losses.device)
        full = torch.zeros_like(losses)
        full[samples] = w
        want = products.loss_vjp(full)
        got = w @ rows
    products._rows_checked = _close(got, want, tol)
    return products._rows_checked


def _working_eps(t: Tensor) -> float:
    """The rounding unit of ``t``'s dtype as the kernels compute in it: float32 on CUDA with
    TF32 allowed (cuDNN's default for convolutions) or a lower matmul precision rounds products
    to 10 (bfloat16: 7) mantissa bits, so the batch and the one-sample calls may differ by more
    than float32's epsilon."""
    eps = torch.finfo(t.dtype).eps
    if t.dtype == torch.float32 and t.device.type == "cuda":
        precision = torch.get_float32_matmul_precision()
        if precision == "medium":
            return max(eps, 2.0**-7)
        if (
            precision == "high"
            or torch.backends.cuda.matmul.allow_tf32
            or (torch.backends.cudnn.allow_tf32)
        ):
            return max(eps, 2.0**-10)
    return eps


def check_tolerance(t: Tensor) -> float:
    r"""The check's relative tolerance: :math:`\sqrt{\epsilon}` of the dtype, or 8 rounding
    units of the kernels' working precision where that is coarser (TF32 on CUDA: 8 x 2^-10,
    not its square root, which would let a 3 % coupling through; untested without a GPU)."""
    eps, working = torch.finfo(t.dtype).eps, _working_eps(t)
    return max(eps**0.5, 8 * working)  # 8 eps < sqrt(eps) in every float dtype


def _close(a: Tensor, b: Tensor, tol: float) -> bool:
    """Entrywise |a - b| <= tol s, s the largest magnitude in a and b (False if not finite)."""
    scale = max(float(a.abs().max()), float(b.abs().max())) if a.numel() else 0.0
    return bool(((a - b).abs() <= tol * scale).all()) if math.isfinite(scale) else False

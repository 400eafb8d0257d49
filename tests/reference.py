"""Dense references for the tests, built independently of steepest's products.

Everything here uses ``torch.autograd.functional`` (jacobian, hessian), plain
``torch.autograd.grad`` one sample at a time, explicit outer products, and the loss values of
``torch.nn.functional`` / ``torch.distributions``: nothing calls steepest's Point, metrics,
``hessian_vp``, ``fisher_vp`` or ``fisher_sqrt``. Matrices are dense, so keep the models small.

Notation (000 Table 1, Martens 2020): z = f(x, theta) the outputs (N, C), J (N, C, P) the
output Jacobian, H_L and F_R (N, C, C) the output-space Hessian of the loss and Fisher of the
predictive distribution, L = mean_i l(y_i, z_i).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from steepest.losses import MSE, BCEWithLogits, CallableLoss, CrossEntropy, GaussianNLL, Loss

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def seeded(seed: int, device: str = "cpu") -> torch.Generator:
    """A generator with a fixed seed (the tests never touch the global RNG)."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


# ---------------------------------------------------------------------------------- parameters


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters in ``model.parameters()`` order, a tied tensor once."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def flat_params(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for _, p in trainable(model)])


def model_function(model: nn.Module):
    """theta -> (x -> z) with theta split by hand (no steepest.params)."""
    named = trainable(model)
    names = [n for n, _ in named]
    shapes = [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]

    def f(theta: Tensor, x: Tensor) -> Tensor:
        chunks, start = {}, 0
        for name, shape, size in zip(names, shapes, sizes):
            chunks[name] = theta[start : start + size].reshape(shape)
            start += size
        # the math kernel of attention: the fused CPU kernels have no double backward
        with sdpa_kernel(SDPBackend.MATH):
            return functional_call(model, chunks, (x,))

    return f


def _vectorized(op, fn, theta: Tensor) -> Tensor:
    """torch.autograd.functional jacobian/hessian, vmapped when the model allows it."""
    try:
        return op(fn, theta, vectorize=True)
    except RuntimeError:
        return op(fn, theta)


# ---------------------------------------------------------------------------------- losses


def loss_value(loss: Loss, z: Tensor, y: Tensor) -> Tensor:
    """Per-sample loss (N,) from torch.nn.functional / torch.distributions."""
    if isinstance(loss, MSE):
        return F.mse_loss(z, y, reduction="none").reshape(z.shape[0], -1).sum(1) / (
            2 * loss.sigma**2
        )
    if isinstance(loss, CrossEntropy):
        return F.cross_entropy(z, y, reduction="none")
    if isinstance(loss, BCEWithLogits):
        per = F.binary_cross_entropy_with_logits(z, y, reduction="none")
        return per.reshape(z.shape[0], -1).sum(1)
    if isinstance(loss, GaussianNLL):
        d = z.shape[1] // 2
        dist = torch.distributions.Normal(z[:, :d], torch.exp(0.5 * z[:, d:]))
        return -dist.log_prob(y).sum(1)
    if isinstance(loss, CallableLoss):
        return loss.fn(z, y)
    raise TypeError(f"no reference for {loss!r}")


def output_jacobian(model: nn.Module, x: Tensor, theta: Tensor | None = None) -> Tensor:
    """J (N, C, P) by torch.autograd.functional.jacobian of theta -> z."""
    f = model_function(model)
    theta = flat_params(model) if theta is None else theta
    jac = _vectorized(jacobian, lambda th: f(th, x), theta)
    return jac.reshape(jac.shape[0], -1, theta.numel())


def output_hessians(loss: Loss, z: Tensor, y: Tensor) -> Tensor:
    """H_L (N, C, C): torch.autograd.functional.hessian of z_i -> l(y_i, z_i), per sample."""
    z = z.detach()
    out = []
    for i in range(z.shape[0]):

        def li(zi: Tensor, i: int = i) -> Tensor:
            return loss_value(loss, zi.reshape(1, *z.shape[1:]), y[i : i + 1]).sum()

        out.append(hessian(li, z[i].reshape(-1)))
    return torch.stack(out)


def _score_outer(loss: Loss, zi: Tensor, ys: Tensor, w: Tensor) -> Tensor:
    """sum_q w_q grad_z l(y_q, z_i) grad_z l(y_q, z_i)^T for a batch of targets ys (Q, ...)."""
    q = ys.shape[0]
    zq = zi.detach().reshape(1, -1).expand(q, -1).clone().requires_grad_(True)
    with torch.enable_grad():
        val = loss_value(loss, zq.reshape(q, *zi.shape), ys).sum()
        (g,) = torch.autograd.grad(val, zq)
    return torch.einsum("q,qc,qd->cd", w, g, g)


def output_fishers(loss: Loss, z: Tensor) -> Tensor:
    """F_R (N, C, C) = E_{y ~ R_z}[grad_z l grad_z l^T], computed as an exact expectation:
    a sum over the classes (CrossEntropy), over all {0,1}^C target vectors (BCEWithLogits),
    or a tensor-product Gauss-Hermite rule (exact: the score products are polynomials of degree
    <= 4 in y) for the Gaussians."""
    z = z.detach()
    n = z.shape[0]
    out = []
    for i in range(n):
        zi = z[i]
        if isinstance(loss, CrossEntropy):
            c = zi.shape[0]
            ys = torch.arange(c)
            w = torch.softmax(zi, 0)
        elif isinstance(loss, BCEWithLogits):
            c = zi.numel()
            ys = torch.tensor(list(itertools.product([0.0, 1.0], repeat=c)), dtype=z.dtype)
            p = torch.sigmoid(zi.reshape(-1))
            w = torch.prod(torch.where(ys == 1, p, 1 - p), 1)
            ys = ys.reshape(-1, *zi.shape)
        elif isinstance(loss, MSE | GaussianNLL):
            if isinstance(loss, MSE):
                mu, sd = zi.reshape(-1), torch.full((zi.numel(),), loss.sigma, dtype=z.dtype)
            else:
                d = zi.shape[0] // 2
                mu, sd = zi[:d], torch.exp(0.5 * zi[d:])
            nodes, weights = np.polynomial.hermite_e.hermegauss(6)
            nodes = torch.tensor(nodes, dtype=z.dtype)
            weights = torch.tensor(weights / math.sqrt(2 * math.pi), dtype=z.dtype)
            dim = mu.numel()
            grid = torch.cartesian_prod(*[torch.arange(6)] * dim).reshape(-1, dim)
            ys = mu + sd * nodes[grid]
            w = torch.prod(weights[grid], 1)
            if isinstance(loss, MSE):
                ys = ys.reshape(-1, *zi.shape)
        else:
            raise TypeError(f"no reference Fisher for {loss!r}")
        out.append(_score_outer(loss, zi, ys, w))
    return torch.stack(out)


# ---------------------------------------------------------------------------------- theta space


def per_sample_grads(
    model: nn.Module, loss: Loss, x: Tensor, y: Tensor, theta: Tensor | None = None
) -> Tensor:
    """Rows grad_theta l(y_i, f(x_i)), one sample at a time, (N, P)."""
    f = model_function(model)
    theta = (flat_params(model) if theta is None else theta).detach()
    rows = []
    for i in range(x.shape[0]):
        th = theta.clone().requires_grad_(True)
        with torch.enable_grad():
            li = loss_value(loss, f(th, x[i : i + 1]), y[i : i + 1]).sum()
            (g,) = torch.autograd.grad(li, th, allow_unused=True)
        rows.append(torch.zeros_like(th) if g is None else g)
    return torch.stack(rows)


def loss_hessian(model: nn.Module, loss: Loss, x: Tensor, y: Tensor) -> Tensor:
    """H = Hessian of theta -> L by torch.autograd.functional.hessian, (P, P)."""
    f = model_function(model)
    return _vectorized(hessian, lambda th: loss_value(loss, f(th, x), y).mean(), flat_params(model))


def mean_loss_grad(model: nn.Module, loss: Loss, x: Tensor, y: Tensor) -> Tensor:
    return per_sample_grads(model, loss, x, y).mean(0)


def metric(
    name: str,
    model: nn.Module,
    loss: Loss,
    x: Tensor,
    y: Tensor,
    sampled_targets: list[Tensor] | None = None,
) -> Tensor:
    """The dense reference of one row of Table 1 (means over the N samples).

    name: 'identity', 'gauss-newton', 'ggn', 'fisher', 'fisher-mc' (needs ``sampled_targets``,
    the k target batches drawn from R_z), 'empirical-fisher', 'gradient-covariance',
    'gradient-covariance-centered', 'hessian'.
    """
    p = flat_params(model).numel()
    dt = flat_params(model).dtype
    if name == "identity":
        return torch.eye(p, dtype=dt)
    if name == "hessian":
        return loss_hessian(model, loss, x, y)
    if name in ("empirical-fisher", "gradient-covariance", "gradient-covariance-centered"):
        g = per_sample_grads(model, loss, x, y)
        if name.endswith("centered"):
            g = g - g.mean(0)
        return g.T @ g / x.shape[0]
    if name == "fisher-mc":
        assert sampled_targets
        k = len(sampled_targets)
        total = torch.zeros(p, p, dtype=dt)
        for ys in sampled_targets:
            g = per_sample_grads(model, loss, x, ys)
            total += g.T @ g
        return total / (k * x.shape[0])
    jac = output_jacobian(model, x)
    z = model_function(model)(flat_params(model), x).detach()
    n, c = jac.shape[0], jac.shape[1]
    if name == "gauss-newton":
        a = torch.eye(c, dtype=dt).expand(n, c, c)
    elif name == "ggn":
        a = output_hessians(loss, z, y)
    elif name == "fisher":
        a = output_fishers(loss, z)
    else:
        raise ValueError(name)
    return torch.einsum("ncp,ncd,ndq->pq", jac, a, jac) / n


def rel_err(a: Tensor, b: Tensor) -> float:
    """||a - b|| / max(||b||, tiny) in float64."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


class ResidualsAsSamples(nn.Module):
    """A residual vector r(theta) in R^3 posed as 3 samples of one output: r_i depends on all
    of theta, not on the i-th input (issue 12, defect D6: the per-sample route must not be
    taken)."""

    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))

    @staticmethod
    def r(theta):
        a, b = theta
        return torch.stack([a - 1, 10 * (b - a**2), a * b - 0.5])

    def forward(self, x):
        return self.r(self.theta).unsqueeze(1)

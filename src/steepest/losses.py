r"""Losses as predictive distributions in output space (Martens sections 4, 5 and 9).

A loss is the atomic loss :math:`l(y, z) = -\log r(y|z)` of a predictive distribution
:math:`R_z` over targets, with ``z = f(x, theta)`` the model output. Everything here is per
sample and batched over the first axis; the library takes the mean over samples itself:
:math:`L(\theta) = \frac1N \sum_i l(y_i, f(x_i, \theta))`.

Each loss gives, in output space: the per-sample value, the Hessian-vector product
:math:`H_L u` (Hessian of ``z -> l(y, z)``), the Fisher of :math:`R_z`,
:math:`F_R = E_{y\sim R_z}[\nabla_z \log r \nabla_z \log r^T]`, a square root
``S S^T = F_R``, sampling ``y ~ R_z`` and the KL divergence between two predictive
distributions. For the exponential families here (MSE, CrossEntropy, BCEWithLogits) z are the
natural parameters and ``H_L = F_R`` (Martens 9.2); ``GaussianNLL`` is Martens' example where
``H_L`` is indefinite while ``F_R`` is PSD.

Example
-------
>>> loss = CrossEntropy()
>>> z, y = torch.randn(4, 3), torch.tensor([0, 2, 1, 0])
>>> loss.value(z, y).shape
torch.Size([4])
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .errors import (
    ConfigurationError,
    ConfigurationTypeError,
    LossNotProbabilisticError,
    ShapeError,
    TargetError,
)


def _flat(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1)


class Loss:
    """Base class: a per-sample loss ``l(y, z)``; subclasses that are ``-log r(y|z)`` of a
    distribution set ``probabilistic = True`` and implement the Fisher, sampling and KL."""

    probabilistic: bool = False
    hessian_is_fisher: bool = False  # H_L = F_R: z are natural parameters (Martens 9.2)
    name: str = "loss"

    # --- required -------------------------------------------------------------------------
    def value(self, z: Tensor, y: Tensor) -> Tensor:
        """Per-sample loss, shape (N,)."""
        raise NotImplementedError

    def check(self, z: Tensor, y: Tensor) -> None:
        """Raise a clear error when outputs and targets do not fit this loss."""
        if z.ndim == 0 or y.ndim == 0:
            raise ShapeError(
                f"{self.name}: outputs and targets need a batch axis first; got output shape "
                f"{tuple(z.shape)} and target shape {tuple(y.shape)}."
            )
        if z.shape[0] != y.shape[0]:
            raise ShapeError(
                f"{self.name}: the model gives {z.shape[0]} outputs but there are "
                f"{y.shape[0]} targets; pass one target per input sample."
            )

    # --- curvature in output space ----------------------------------------------------------
    def hessian_vp(self, z: Tensor, y: Tensor, u: Tensor) -> Tensor:
        """:math:`H_L u` per sample, H_L the Hessian of ``z -> l(y, z)`` (autograd default)."""
        with torch.enable_grad():
            zz = z.detach().requires_grad_(True)
            (gz,) = torch.autograd.grad(self.value(zz, y).sum(), zz, create_graph=True)
            (hu,) = torch.autograd.grad(gz, zz, u)
        return hu

    def output_matrix(self, z: Tensor, y: Tensor | None, kind: str) -> Tensor:
        """Dense per-sample H_L (kind='hessian') or F_R (kind='fisher'), shape (N, C, C)
        with C the number of outputs per sample, built column by column from products."""
        n, c = z.shape[0], _flat(z).shape[1]
        cols = []
        for k in range(c):
            e = torch.zeros(n, c, dtype=z.dtype, device=z.device)
            e[:, k] = 1
            e = e.view_as(z)
            col = self.hessian_vp(z, y, e) if kind == "hessian" else self.fisher_vp(z, e)
            cols.append(_flat(col))
        return torch.stack(cols, dim=-1)

    def fisher_vp(self, z: Tensor, u: Tensor) -> Tensor:
        """:math:`F_R u` per sample (needs no targets)."""
        raise self._not_probabilistic("the Fisher F_R")

    def fisher_sqrt(self, z: Tensor) -> Tensor:
        """S with ``F_R = S S^T`` per sample, shape (N, C, K)."""
        raise self._not_probabilistic("a square root of the Fisher")

    def sample(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Targets drawn from the predictive distribution, ``y ~ R_z``."""
        raise self._not_probabilistic("sampling targets")

    def kl(self, z_old: Tensor, z_new: Tensor) -> Tensor:
        """Per-sample :math:`KL(R_{z_{old}} \\| R_{z_{new}})`, shape (N,)."""
        raise self._not_probabilistic("the KL divergence")

    def _not_probabilistic(self, what: str) -> LossNotProbabilisticError:
        return LossNotProbabilisticError(
            f"{what} needs a probabilistic loss (a predictive distribution), but the loss is "
            f"{self.name!r}; use one of steepest.losses MSE, CrossEntropy, BCEWithLogits, "
            "GaussianNLL, or a metric that needs no distribution (Identity, GaussNewton, GGN, "
            "GradientCovariance, Hessian)."
        )


class MSE(Loss):
    r"""Gaussian with mean z and fixed variance sigma^2:
    :math:`l(y, z) = \frac{1}{2\sigma^2}\|y - z\|^2` (constants dropped),
    :math:`H_L = F_R = I/\sigma^2`.

    >>> MSE(sigma=0.5).value(torch.zeros(2, 1), torch.ones(2, 1))
    tensor([2., 2.])
    """

    probabilistic = True
    hessian_is_fisher = True
    name = "MSE"

    def __init__(self, sigma: float = 1.0) -> None:
        if not (isinstance(sigma, int | float) and math.isfinite(sigma) and sigma > 0):
            raise ConfigurationError(
                f"MSE: sigma must be a finite positive number, got {sigma!r}.")
        self.sigma = float(sigma)

    def check(self, z: Tensor, y: Tensor) -> None:
        super().check(z, y)
        if y.shape != z.shape:
            raise ShapeError(
                f"MSE: targets must have the model output's shape {tuple(z.shape)}, got "
                f"{tuple(y.shape)}; reshape the targets (e.g. y.view(-1, 1))."
            )
        if not y.is_floating_point() or y.dtype != z.dtype:
            raise ShapeError(
                f"MSE: targets must be floating point of the output's dtype {z.dtype}, got "
                f"{y.dtype}; convert with y.to(z.dtype)."
            )

    def value(self, z: Tensor, y: Tensor) -> Tensor:
        return 0.5 * _flat(y - z).pow(2).sum(1) / self.sigma**2

    def hessian_vp(self, z: Tensor, y: Tensor, u: Tensor) -> Tensor:
        return u / self.sigma**2

    def fisher_vp(self, z: Tensor, u: Tensor) -> Tensor:
        return u / self.sigma**2

    def fisher_sqrt(self, z: Tensor) -> Tensor:
        n, c = _flat(z).shape
        eye = torch.eye(c, dtype=z.dtype, device=z.device) / self.sigma
        return eye.expand(n, c, c)

    def sample(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)
        return z.detach() + self.sigma * noise

    def kl(self, z_old: Tensor, z_new: Tensor) -> Tensor:
        return 0.5 * _flat(z_old - z_new).pow(2).sum(1) / self.sigma**2


class CrossEntropy(Loss):
    r"""Categorical distribution on logits z (N, C), targets class indices (N,):
    :math:`l(y, z) = \log\sum_k e^{z_k} - z_y`,
    :math:`H_L = F_R = \mathrm{diag}(p) - p p^T` with p = softmax(z).

    >>> CrossEntropy().value(torch.zeros(1, 4), torch.tensor([2]))
    tensor([1.3863])
    """

    probabilistic = True
    hessian_is_fisher = True
    name = "CrossEntropy"

    def check(self, z: Tensor, y: Tensor) -> None:
        super().check(z, y)
        if z.ndim != 2 or y.ndim != 1:
            raise ShapeError(
                f"CrossEntropy: expects logits of shape (N, C) and class indices of shape (N,), "
                f"got {tuple(z.shape)} and {tuple(y.shape)}; flatten extra axes first."
            )
        if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ShapeError(
                f"CrossEntropy: targets must be integer class indices, got dtype {y.dtype}; "
                "use y.long() (for one-hot targets use y.argmax(1))."
            )
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= z.shape[1]):
            raise TargetError(
                f"CrossEntropy: class indices must lie in [0, {z.shape[1] - 1}] for "
                f"{z.shape[1]} logits, got values in [{int(y.min())}, {int(y.max())}]; "
                "check the number of model outputs or relabel the targets."
            )

    def value(self, z: Tensor, y: Tensor) -> Tensor:
        return torch.logsumexp(z, 1) - z.gather(1, y.long().view(-1, 1)).squeeze(1)

    def fisher_vp(self, z: Tensor, u: Tensor) -> Tensor:
        p = torch.softmax(z, 1)
        return p * u - p * (p * u).sum(1, keepdim=True)

    def hessian_vp(self, z: Tensor, y: Tensor, u: Tensor) -> Tensor:
        return self.fisher_vp(z, u)

    def fisher_sqrt(self, z: Tensor) -> Tensor:
        p = torch.softmax(z, 1)
        sp = p.sqrt()
        return torch.diag_embed(sp) - p.unsqueeze(2) * sp.unsqueeze(1)

    def sample(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        p = torch.softmax(z.detach(), 1)
        return torch.multinomial(p, 1, generator=generator).squeeze(1)

    def kl(self, z_old: Tensor, z_new: Tensor) -> Tensor:
        lp_old, lp_new = torch.log_softmax(z_old, 1), torch.log_softmax(z_new, 1)
        return (lp_old.exp() * (lp_old - lp_new)).sum(1)


class BCEWithLogits(Loss):
    r"""Independent Bernoulli outputs on logits z, targets in {0, 1} (or [0, 1]) of z's shape,
    summed over outputs: :math:`l = \sum_k \mathrm{softplus}(z_k) - y_k z_k`,
    :math:`H_L = F_R = \mathrm{diag}(\sigma(z)(1 - \sigma(z)))`.

    >>> BCEWithLogits().value(torch.zeros(1, 2), torch.ones(1, 2))
    tensor([1.3863])
    """

    probabilistic = True
    hessian_is_fisher = True
    name = "BCEWithLogits"

    def check(self, z: Tensor, y: Tensor) -> None:
        super().check(z, y)
        if y.shape != z.shape:
            raise ShapeError(
                f"BCEWithLogits: targets must have the logits' shape {tuple(z.shape)}, got "
                f"{tuple(y.shape)}; reshape the targets (e.g. y.view(-1, 1))."
            )
        if not y.is_floating_point() or y.dtype != z.dtype:
            raise ShapeError(
                f"BCEWithLogits: targets must be floating point of the logits' dtype {z.dtype}, "
                f"got {y.dtype}; convert with y.to(z.dtype)."
            )
        if y.numel() and (float(y.min()) < 0 or float(y.max()) > 1):
            raise TargetError(
                f"BCEWithLogits: targets must lie in [0, 1], got values in "
                f"[{float(y.min())}, {float(y.max())}]; use 0/1 labels or probabilities."
            )

    def value(self, z: Tensor, y: Tensor) -> Tensor:
        return _flat(torch.nn.functional.softplus(z) - y * z).sum(1)

    def fisher_vp(self, z: Tensor, u: Tensor) -> Tensor:
        p = torch.sigmoid(z)
        return p * (1 - p) * u

    def hessian_vp(self, z: Tensor, y: Tensor, u: Tensor) -> Tensor:
        return self.fisher_vp(z, u)

    def fisher_sqrt(self, z: Tensor) -> Tensor:
        p = torch.sigmoid(_flat(z))
        return torch.diag_embed((p * (1 - p)).sqrt())

    def sample(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return torch.bernoulli(torch.sigmoid(z.detach()), generator=generator)

    def kl(self, z_old: Tensor, z_new: Tensor) -> Tensor:
        p = torch.sigmoid(z_old)
        ls_o, ls_n = torch.nn.functional.logsigmoid(z_old), torch.nn.functional.logsigmoid(z_new)
        l1_o, l1_n = ls_o - z_old, ls_n - z_new  # log(1 - sigmoid(z)) = logsigmoid(z) - z
        return _flat(p * (ls_o - ls_n) + (1 - p) * (l1_o - l1_n)).sum(1)


class GaussianNLL(Loss):
    r"""Gaussian with mean and log-variance both predicted: the output z (N, 2D) holds
    ``mu = z[:, :D]`` and ``gamma = log sigma^2 = z[:, D:]``; targets y (N, D).
    :math:`l = \sum_d \frac12\gamma_d + \frac{(y_d-\mu_d)^2}{2 e^{\gamma_d}} + \frac12\log 2\pi`.
    Per output pair (Martens 9.2),
    :math:`H_L = e^{-\gamma}\begin{bmatrix}1 & y-\mu\\ y-\mu & (y-\mu)^2/2\end{bmatrix}` is
    indefinite in general, while :math:`F_R = \mathrm{diag}(e^{-\gamma}, 1/2)` is PSD.

    >>> GaussianNLL().value(torch.zeros(1, 2), torch.zeros(1, 1))
    tensor([0.9189])
    """

    probabilistic = True
    name = "GaussianNLL"

    def check(self, z: Tensor, y: Tensor) -> None:
        super().check(z, y)
        if z.ndim != 2 or z.shape[1] % 2 or y.shape != (z.shape[0], z.shape[1] // 2):
            raise ShapeError(
                "GaussianNLL: the model output must be (N, 2D) holding means then log-variances "
                f"and the targets (N, D); got outputs {tuple(z.shape)} and targets "
                f"{tuple(y.shape)}; make the last layer output twice the target dimension."
            )
        if not y.is_floating_point() or y.dtype != z.dtype:
            raise ShapeError(
                f"GaussianNLL: targets must be floating point of dtype {z.dtype}, got {y.dtype}."
            )

    @staticmethod
    def _split(z: Tensor) -> tuple[Tensor, Tensor]:
        d = z.shape[1] // 2
        return z[:, :d], z[:, d:]

    def value(self, z: Tensor, y: Tensor) -> Tensor:
        mu, gamma = self._split(z)
        nll = 0.5 * gamma + 0.5 * (y - mu).pow(2) * torch.exp(-gamma) + 0.5 * math.log(2 * math.pi)
        return nll.sum(1)

    def hessian_vp(self, z: Tensor, y: Tensor, u: Tensor) -> Tensor:
        mu, gamma = self._split(z)
        um, ug = self._split(u)
        e, r = torch.exp(-gamma), y - mu
        return torch.cat([e * (um + r * ug), e * (r * um + 0.5 * r * r * ug)], 1)

    def fisher_vp(self, z: Tensor, u: Tensor) -> Tensor:
        _, gamma = self._split(z)
        um, ug = self._split(u)
        return torch.cat([torch.exp(-gamma) * um, 0.5 * ug], 1)

    def fisher_sqrt(self, z: Tensor) -> Tensor:
        _, gamma = self._split(z)
        diag = torch.cat([torch.exp(-0.5 * gamma), torch.full_like(gamma, math.sqrt(0.5))], 1)
        return torch.diag_embed(diag)

    def sample(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        mu, gamma = self._split(z.detach())
        noise = torch.randn(mu.shape, generator=generator, dtype=z.dtype, device=z.device)
        return mu + torch.exp(0.5 * gamma) * noise

    def kl(self, z_old: Tensor, z_new: Tensor) -> Tensor:
        m1, g1 = self._split(z_old)
        m2, g2 = self._split(z_new)
        kl = 0.5 * (g2 - g1 + (torch.exp(g1) + (m1 - m2).pow(2)) * torch.exp(-g2) - 1)
        return kl.sum(1)


class CallableLoss(Loss):
    """A plain per-sample loss ``fn(z, y) -> (N,)`` with no distribution behind it.

    Works with the metrics that need no distribution (Identity, GaussNewton, GGN through an
    autograd H_L, GradientCovariance, Hessian); the Fisher family raises
    :class:`~steepest.errors.LossNotProbabilisticError`.

    >>> loss = CallableLoss(lambda z, y: (z - y).abs().sum(1))
    """

    probabilistic = False

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor], name: str | None = None) -> None:
        self.fn = fn
        self.name = name or getattr(fn, "__name__", type(fn).__name__)

    def value(self, z: Tensor, y: Tensor) -> Tensor:
        out = self.fn(z, y)
        if out.ndim != 1 or out.shape[0] != z.shape[0]:
            raise ShapeError(
                f"loss {self.name!r} must return one value per sample, shape ({z.shape[0]},), "
                f"got shape {tuple(out.shape)}; do not reduce over the batch (steepest takes "
                "the mean itself), e.g. use reduction='none' and sum over non-batch axes."
            )
        return out


def as_loss(loss: Loss | Callable[[Tensor, Tensor], Tensor]) -> Loss:
    """Return ``loss`` if it is a :class:`Loss`, else wrap a callable in :class:`CallableLoss`."""
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, type) and issubclass(loss, Loss):
        raise ConfigurationTypeError(
            f"pass an instance of the loss, {loss.__name__}(), not the class.")
    if callable(loss):
        return CallableLoss(loss)
    raise ConfigurationTypeError(
        f"loss must be a steepest.losses.Loss or a callable (z, y) -> per-sample losses, "
        f"got {type(loss).__name__}."
    )

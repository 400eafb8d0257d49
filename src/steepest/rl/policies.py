r"""Policies as predictive distributions in output space (Kakade 2002; Schulman et al. 2015).

A policy network maps states s to the parameters z = f(s, theta) of a distribution
:math:`\pi(a|z)` over actions. Seen from :mod:`steepest.losses`, a policy is a
:class:`~steepest.losses.Loss` whose predictive distribution is :math:`\pi(\cdot|z)` and whose
per-sample value is the importance-sampled surrogate of TRPO (Schulman et al. 2015, eq. 14):

.. math:: l(y, z) = -\hat A\, \frac{\pi(a|z)}{\pi_{old}(a)}
          = -\hat A \exp(\log\pi(a|z) - \log\pi_{old}(a)),

with the target y packing, per sample, the action a taken, its advantage estimate
:math:`\hat A` and the log-probability :math:`\log\pi_{old}(a)` under the policy that acted
(:meth:`PolicyLoss.targets`). At :math:`\theta = \theta_{old}` the gradient of
:math:`L = \frac1N\sum_i l_i` is minus the policy gradient,
:math:`-\frac1N\sum_i \hat A_i \nabla\log\pi(a_i|s_i)`, and the Fisher of the predictive
distribution :math:`F_R` is the output-space factor of the policy's Fisher
:math:`F = E_s[J^T F_R J]`, so ``steepest.Fisher()``, ``CG`` and ``KLLineSearch`` give the
natural policy gradient and TRPO unchanged.

- :class:`Categorical`: logits z (N, C); :math:`F_R = \mathrm{diag}(p) - pp^T`.
- :class:`DiagonalGaussian`: z (N, 2D) = (mean mu, log standard deviation s);
  :math:`F_R = \mathrm{diag}(e^{-2s}, 2)`. The log-std is usually a learned parameter that
  does not depend on the state: :class:`GaussianHead` appends it to a mean network's output.

Example
-------
>>> pi = Categorical()
>>> z = torch.randn(5, 2)
>>> a, logp = pi.act(z, torch.Generator().manual_seed(0))
>>> y = pi.targets(a, advantages=torch.randn(5), log_prob=logp)
>>> pi.value(z, y)          # -A * ratio, ratio = 1 at the acting policy
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import ShapeError, TargetError
from ..losses import Loss


class PolicyLoss(Loss):
    r"""Base class: the TRPO surrogate of a policy distribution :math:`\pi(a|z)`.

    Subclasses give :meth:`log_prob`, :meth:`act`, the Fisher (``fisher_vp``,
    ``fisher_sqrt``), the KL divergence and the entropy; the target packing, the surrogate
    value, sampling for the Monte-Carlo Fisher and the checks live here. ``action_dim`` is the
    number of numbers that describe one action (1 for a discrete action).
    """

    probabilistic = True
    hessian_is_fisher = False  # the surrogate's Hessian in z is not F_R
    action_dim: int = 1

    # --- the distribution ------------------------------------------------------------------
    def log_prob(self, z: Tensor, actions: Tensor) -> Tensor:
        r""":math:`\log\pi(a_i|z_i)`, shape (N,); ``actions`` as packed in the targets."""
        raise NotImplementedError

    def act(self, z: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        r"""Draw :math:`a_i \sim \pi(\cdot|z_i)`; returns (actions (N, action_dim) in the
        model's dtype, their log-probabilities (N,))."""
        raise NotImplementedError

    def mode(self, z: Tensor) -> Tensor:
        """The most likely action (deterministic evaluation), shape (N, action_dim)."""
        raise NotImplementedError

    def entropy(self, z: Tensor) -> Tensor:
        r"""Per-sample entropy :math:`H(\pi(\cdot|z_i))`, shape (N,)."""
        raise NotImplementedError

    # --- targets ---------------------------------------------------------------------------
    def targets(self, actions: Tensor, advantages: Tensor, log_prob: Tensor) -> Tensor:
        r"""Pack (a, :math:`\hat A`, :math:`\log\pi_{old}(a)`) per sample into the target
        tensor y of shape (N, action_dim + 2) that :meth:`value` reads.

        >>> y = Categorical().targets(torch.tensor([0, 1]), torch.ones(2), torch.zeros(2))
        """
        n = actions.shape[0]
        dtype = log_prob.dtype if log_prob.is_floating_point() else torch.get_default_dtype()
        a = actions.reshape(n, -1).to(dtype)
        if a.shape[1] != self.action_dim or advantages.shape != (n,) or log_prob.shape != (n,):
            raise ShapeError(
                f"{self.name}: expected actions (N, {self.action_dim}) (or (N,) for one "
                f"number), advantages (N,) and log-probabilities (N,), got "
                f"{tuple(actions.shape)}, {tuple(advantages.shape)}, {tuple(log_prob.shape)}; "
                "pass one entry per sample."
            )
        return torch.cat(
            [a, advantages.reshape(n, 1).to(dtype), log_prob.reshape(n, 1).to(dtype)], 1
        ).detach()

    def unpack(self, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(actions (N, action_dim), advantages (N,), old log-probabilities (N,))."""
        k = self.action_dim
        return y[:, :k], y[:, k], y[:, k + 1]

    def check(self, z: Tensor, y: Tensor) -> None:
        super().check(z, y)
        if y.ndim != 2 or y.shape[1] != self.action_dim + 2:
            raise ShapeError(
                f"{self.name}: targets must be (N, {self.action_dim + 2}) = (action, advantage, "
                f"old log-probability) per sample, got {tuple(y.shape)}; build them with "
                f"{type(self).__name__}().targets(actions, advantages, log_prob)."
            )
        if not y.is_floating_point() or y.dtype != z.dtype:
            raise ShapeError(
                f"{self.name}: targets must be floating point of the output's dtype {z.dtype}, "
                f"got {y.dtype}; convert with y.to(z.dtype)."
            )
        if not torch.isfinite(y).all():
            raise TargetError(
                f"{self.name}: the targets hold NaN or infinite values (actions, advantages or "
                "old log-probabilities); check the rewards and the value baseline."
            )

    # --- the surrogate ---------------------------------------------------------------------
    def value(self, z: Tensor, y: Tensor) -> Tensor:
        a, adv, logp_old = self.unpack(y)
        return -adv * torch.exp(self.log_prob(z, a) - logp_old)

    def sample(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        r"""Targets whose surrogate gradient in z is :math:`-\nabla_z\log\pi(\tilde a|z)`:
        :math:`\tilde a \sim \pi(\cdot|z)`, advantage 1 and the current log-probability (so the
        ratio is 1). The Monte-Carlo ``Fisher(mc_samples=k)`` therefore estimates
        :math:`E_{\tilde a}[\nabla\log\pi\,\nabla\log\pi^T] = F_R`."""
        a, logp = self.act(z.detach(), generator)
        return self.targets(a, torch.ones_like(logp), logp)


class Categorical(PolicyLoss):
    r"""Categorical policy on logits z (N, C): :math:`\pi(a|z) = \mathrm{softmax}(z)_a`,
    :math:`F_R = \mathrm{diag}(p) - pp^T`,
    :math:`KL(\pi_{z}\|\pi_{z'}) = \sum_a p_a(\log p_a - \log p'_a)`.

    >>> pi = Categorical()
    >>> a, logp = pi.act(torch.zeros(3, 2))
    >>> pi.log_prob(torch.zeros(3, 2), a)
    tensor([-0.6931, -0.6931, -0.6931])
    """

    name = "Categorical"
    action_dim = 1

    def __repr__(self) -> str:
        return "Categorical()"

    def check(self, z: Tensor, y: Tensor) -> None:
        super().check(z, y)
        if z.ndim != 2:
            raise ShapeError(
                f"Categorical: expects logits of shape (N, C), got {tuple(z.shape)}; the policy "
                "network must output one logit per action."
            )
        a = y[:, 0]
        if a.numel() and (
            bool((a != a.round()).any()) or float(a.min()) < 0 or float(a.max()) >= z.shape[1]
        ):
            raise TargetError(
                f"Categorical: actions must be integers in [0, {z.shape[1] - 1}] for "
                f"{z.shape[1]} logits, got values in [{float(a.min())}, {float(a.max())}]; "
                "check the number of policy outputs against the action space."
            )

    def log_prob(self, z: Tensor, actions: Tensor) -> Tensor:
        idx = actions.reshape(-1, 1).long()
        return torch.log_softmax(z, 1).gather(1, idx).squeeze(1)

    def act(self, z: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        z = z.detach()
        logp = torch.log_softmax(z, 1)
        # inverse CDF: the first a with u < p_0 + ... + p_a (cheaper than torch.multinomial)
        u = torch.rand(z.shape[0], 1, generator=generator, dtype=z.dtype, device=z.device)
        a = (logp.exp().cumsum(1) <= u).sum(1, keepdim=True).clamp_max(z.shape[1] - 1)
        return a.to(z.dtype), logp.gather(1, a).squeeze(1)

    def mode(self, z: Tensor) -> Tensor:
        return z.argmax(1, keepdim=True).to(z.dtype)

    def entropy(self, z: Tensor) -> Tensor:
        lp = torch.log_softmax(z, 1)
        return -(lp.exp() * lp).sum(1)

    def fisher_vp(self, z: Tensor, u: Tensor) -> Tensor:
        p = torch.softmax(z, 1)
        return p * u - p * (p * u).sum(1, keepdim=True)

    def fisher_sqrt(self, z: Tensor) -> Tensor:
        p = torch.softmax(z, 1)
        sp = p.sqrt()
        return torch.diag_embed(sp) - p.unsqueeze(2) * sp.unsqueeze(1)

    def kl(self, z_old: Tensor, z_new: Tensor) -> Tensor:
        lp_old, lp_new = torch.log_softmax(z_old, 1), torch.log_softmax(z_new, 1)
        return (lp_old.exp() * (lp_old - lp_new)).sum(1)


class DiagonalGaussian(PolicyLoss):
    r"""Gaussian policy with diagonal covariance on z (N, 2D) = (mu, s), s = log sigma:
    :math:`\log\pi(a|z) = -\sum_d \big(\frac{(a_d - \mu_d)^2}{2e^{2s_d}} + s_d +
    \frac12\log 2\pi\big)`, :math:`F_R = \mathrm{diag}(e^{-2s}, 2)` (the Fisher of a Gaussian
    in its mean and log-std), and

    .. math:: KL(\pi_z\|\pi_{z'}) = \sum_d s'_d - s_d
              + \frac{e^{2s_d} + (\mu_d - \mu'_d)^2}{2e^{2s'_d}} - \frac12 .

    >>> pi = DiagonalGaussian(action_dim=1)
    >>> pi.log_prob(torch.zeros(1, 2), torch.zeros(1, 1))
    tensor([-0.9189])
    """

    name = "DiagonalGaussian"

    def __init__(self, action_dim: int) -> None:
        if not (isinstance(action_dim, int) and action_dim >= 1):
            raise ShapeError(
                f"DiagonalGaussian: action_dim must be a positive integer, got {action_dim!r}."
            )
        self.action_dim = action_dim

    def __repr__(self) -> str:
        return f"DiagonalGaussian(action_dim={self.action_dim})"

    def check(self, z: Tensor, y: Tensor) -> None:
        super().check(z, y)
        if z.ndim != 2 or z.shape[1] != 2 * self.action_dim:
            raise ShapeError(
                f"DiagonalGaussian: the policy output must be (N, {2 * self.action_dim}) = "
                f"(means, log-stds) for {self.action_dim} action dimensions, got "
                f"{tuple(z.shape)}; wrap the mean network in steepest.rl.GaussianHead."
            )

    def _split(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return z[:, : self.action_dim], z[:, self.action_dim :]

    def log_prob(self, z: Tensor, actions: Tensor) -> Tensor:
        mu, s = self._split(z)
        a = actions.reshape(mu.shape)
        return -(0.5 * ((a - mu) * torch.exp(-s)).pow(2) + s + 0.5 * math.log(2 * math.pi)).sum(1)

    def act(self, z: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        z = z.detach()
        mu, s = self._split(z)
        noise = torch.randn(mu.shape, generator=generator, dtype=z.dtype, device=z.device)
        a = mu + torch.exp(s) * noise
        return a, self.log_prob(z, a)

    def mode(self, z: Tensor) -> Tensor:
        return self._split(z)[0]

    def entropy(self, z: Tensor) -> Tensor:
        _, s = self._split(z)
        return (s + 0.5 * math.log(2 * math.pi * math.e)).sum(1)

    def fisher_vp(self, z: Tensor, u: Tensor) -> Tensor:
        _, s = self._split(z)
        um, us = self._split(u)
        return torch.cat([torch.exp(-2 * s) * um, 2 * us], 1)

    def fisher_sqrt(self, z: Tensor) -> Tensor:
        _, s = self._split(z)
        return torch.diag_embed(torch.cat([torch.exp(-s), torch.full_like(s, math.sqrt(2))], 1))

    def kl(self, z_old: Tensor, z_new: Tensor) -> Tensor:
        m1, s1 = self._split(z_old)
        m2, s2 = self._split(z_new)
        kl = s2 - s1 + 0.5 * (torch.exp(2 * s1) + (m1 - m2).pow(2)) * torch.exp(-2 * s2) - 0.5
        return kl.sum(1)


class GaussianHead(nn.Module):
    r"""A mean network plus a learned, state-independent log standard deviation s:
    ``forward(x) = cat(mean(x), s)``, the output z that :class:`DiagonalGaussian` reads.

    >>> net = GaussianHead(nn.Linear(3, 1), action_dim=1, log_std=0.0)
    >>> net(torch.zeros(4, 3)).shape
    torch.Size([4, 2])
    """

    def __init__(self, mean: nn.Module, action_dim: int, log_std: float = 0.0) -> None:
        super().__init__()
        self.mean = mean
        p = next(mean.parameters(), None)
        dtype = p.dtype if p is not None else torch.get_default_dtype()
        self.log_std = nn.Parameter(torch.full((action_dim,), float(log_std), dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        mu = self.mean(x)
        return torch.cat([mu, self.log_std.expand_as(mu)], -1)


def mlp(
    sizes: list[int],
    activation: type[nn.Module] = nn.Tanh,
    out_gain: float = 1.0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> nn.Sequential:
    """A multilayer perceptron ``sizes[0] -> ... -> sizes[-1]`` with orthogonal weights (gain
    sqrt(2) in the hidden layers, ``out_gain`` in the last, as Stable-Baselines3 does) and zero
    biases, drawn with ``generator``.

    >>> net = mlp([4, 64, 64, 2], out_gain=0.01, generator=torch.Generator().manual_seed(0))
    """
    layers: list[nn.Module] = []
    for k, (i, o) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = nn.Linear(i, o, dtype=dtype)
        last = k == len(sizes) - 2
        with torch.no_grad():
            q, r = torch.linalg.qr(
                torch.randn(max(o, i), min(o, i), generator=generator, dtype=torch.float64)
            )
            q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
            w = q if o >= i else q.T
            lin.weight.copy_((out_gain if last else math.sqrt(2)) * w[:o, :i])
            lin.bias.zero_()
        layers.append(lin)
        if not last:
            layers.append(activation())
    return nn.Sequential(*layers)

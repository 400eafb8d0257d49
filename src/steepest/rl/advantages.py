r"""Generalised advantage estimation (Schulman et al. 2016, "High-dimensional continuous
control using generalized advantage estimation", eq. 16).

With the temporal-difference residual
:math:`\delta_t = r_t + \gamma (1 - \mathrm{terminated}_t) V(s_{t+1}) - V(s_t)`,

.. math:: \hat A_t = \delta_t + \gamma\lambda (1 - \mathrm{done}_t) \hat A_{t+1},
          \qquad \hat R_t = \hat A_t + V(s_t),

where done = terminated or truncated. A *terminated* episode (the pole fell) has no value
after its last state; a *truncated* one (the time limit) is bootstrapped from the value of its
true last observation, which the caller passes in ``next_values``. The recursion never crosses
the end of an episode.

Example
-------
>>> adv, ret = gae(rewards, values, next_values, terminated, truncated, gamma=0.99, lam=0.95)
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigurationError, ShapeError


def gae(
    rewards: Tensor,
    values: Tensor,
    next_values: Tensor,
    terminated: Tensor,
    truncated: Tensor,
    gamma: float = 0.99,
    lam: float = 0.95,
) -> tuple[Tensor, Tensor]:
    r"""Advantages :math:`\hat A_t` and value targets :math:`\hat R_t = \hat A_t + V(s_t)`.

    Parameters
    ----------
    rewards, values, next_values: (T, E) tensors, time first, one column per environment;
        ``next_values[t]`` is :math:`V(s_{t+1})` of the observation that followed step t (for
        an episode that ended at t, the value of its final observation, not of the reset one)
    terminated, truncated: (T, E) booleans, how each step ended
    gamma: the discount, in [0, 1]; lam: the GAE lambda, in [0, 1]

    Returns
    -------
    advantages, returns: (T, E) tensors

    >>> r = torch.tensor([[1.0], [1.0]]); v = torch.zeros(2, 1)
    >>> f = torch.tensor([[False], [True]])
    >>> gae(r, v, v, f, torch.zeros_like(f), gamma=0.5, lam=1.0)[0].squeeze()
    tensor([1.5000, 1.0000])
    """
    for name, val in (("gamma", gamma), ("lam", lam)):
        if not (isinstance(val, int | float) and 0 <= val <= 1):
            raise ConfigurationError(f"gae: {name} must lie in [0, 1], got {val!r}.")
    shape = rewards.shape
    parts = (rewards, values, next_values, terminated, truncated)
    if rewards.ndim != 2 or any(t.shape != shape for t in parts):
        seen = [tuple(t.shape) for t in parts]
        raise ShapeError(
            "gae: rewards, values, next_values, terminated and truncated must all be (T, E) "
            f"(time, environment), got {seen}."
        )
    alive = 1.0 - terminated.to(rewards.dtype)
    cont = 1.0 - (terminated | truncated).to(rewards.dtype)
    delta = rewards + gamma * alive * next_values - values
    # the backward recursion on numpy rows (a torch op per row costs ~10x more)
    d = delta.detach().cpu().numpy()
    c = gamma * lam * cont.detach().cpu().numpy()
    adv = np.zeros_like(d)
    last = np.zeros_like(d[0])
    for t in range(shape[0] - 1, -1, -1):
        last = d[t] + c[t] * last
        adv[t] = last
    out = torch.as_tensor(adv, dtype=rewards.dtype, device=rewards.device)
    return out, out + values

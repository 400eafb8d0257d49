r"""Rollouts from vectorised ``gymnasium`` environments.

:class:`Collector` steps ``n_envs`` copies of an environment in lock step
(``gymnasium.vector.SyncVectorEnv``, same-step autoreset: when an episode ends its final
observation is kept for the value bootstrap and the next observation is already the reset
one). Each call to :meth:`Collector.collect` gathers ``n_steps`` steps per copy with the
current policy, :math:`a_t \sim \pi(\cdot|f(s_t, \theta))`, and returns a :class:`Rollout` with
everything GAE and the policy step need, plus the returns of the episodes that ended.

The collector is picklable (the environments, their random states and the running episode
returns), so a training run can be checkpointed between iterations and resumed bit for bit.

Example
-------
>>> col = Collector("CartPole-v1", n_envs=2, seed=0)
>>> batch = col.collect(policy, Categorical(), value, n_steps=128, generator=gen)
>>> batch.obs.shape, batch.rewards.shape          # (256, 4), (128, 2)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ConfigurationError
from .policies import Categorical, DiagonalGaussian, PolicyLoss


def _gym():
    try:
        import gymnasium
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ConfigurationError(
            "steepest.rl needs gymnasium; install it with pip install 'steepest[rl]'."
        ) from err
    return gymnasium


def make_env(env_id: str):
    """One environment (``gymnasium.make``); a picklable factory for the vector env."""
    return _gym().make(env_id)


def policy_for(space) -> PolicyLoss:
    """The policy distribution that fits a gymnasium action space: :class:`Categorical` for
    ``Discrete``, :class:`DiagonalGaussian` for a one-dimensional ``Box``."""
    gym = _gym()
    if isinstance(space, gym.spaces.Discrete):
        return Categorical()
    if isinstance(space, gym.spaces.Box) and len(space.shape) == 1:
        return DiagonalGaussian(int(space.shape[0]))
    raise ConfigurationError(
        f"steepest.rl supports Discrete and one-dimensional Box action spaces, got {space}; "
        "wrap the environment (e.g. gymnasium.wrappers.FlattenObservation) first."
    )


def check_env(env_id: str) -> None:
    """Raise :class:`~steepest.errors.ConfigurationError` for an unknown gymnasium id."""
    gym = _gym()
    try:
        gym.spec(env_id)
    except gym.error.Error as err:
        raise ConfigurationError(
            f"unknown gymnasium environment {env_id!r} ({err}); try CartPole-v1, "
            "Acrobot-v1 or Pendulum-v1."
        ) from None


@dataclass
class Episode:
    """A finished episode: the environment step count at its end, its return and length."""

    step: int
    ret: float
    length: int


@dataclass
class Rollout:
    """``n_steps`` steps of ``n_envs`` environments, time first: (T, E) for per-step scalars,
    (T * E, ...) for the flat batch the policy step sees (row t * E + e)."""

    obs: Tensor  # (T*E, obs_dim)
    actions: Tensor  # (T*E, action_dim) in the model's dtype (as packed in the targets)
    log_prob: Tensor  # (T*E,)
    rewards: Tensor  # (T, E)
    values: Tensor  # (T, E) V(s_t)
    next_values: Tensor  # (T, E) V(s_{t+1}), the final observation's value at an episode end
    terminated: Tensor  # (T, E) bool
    truncated: Tensor  # (T, E) bool
    episodes: list[Episode] = field(default_factory=list)


class Collector:
    """Vectorised environments and the bookkeeping of running episodes.

    Parameters
    ----------
    env_id: a gymnasium id (classic control: CartPole-v1, Acrobot-v1, Pendulum-v1, ...)
    n_envs: copies stepped together
    seed: seeds the copies with seed, seed + 1, ... at the first reset
    """

    def __init__(self, env_id: str, n_envs: int = 2, seed: int = 0) -> None:
        if not (isinstance(n_envs, int) and n_envs >= 1):
            raise ConfigurationError(f"n_envs must be a positive integer, got {n_envs!r}.")
        check_env(env_id)
        from gymnasium.vector import AutoresetMode, SyncVectorEnv

        self.env_id, self.n_envs = env_id, n_envs
        self.envs = SyncVectorEnv(
            [functools.partial(make_env, env_id)] * n_envs, autoreset_mode=AutoresetMode.SAME_STEP
        )
        self.action_space = self.envs.single_action_space
        self.observation_space = self.envs.single_observation_space
        self.obs, _ = self.envs.reset(seed=[seed + k for k in range(n_envs)])
        self.running_return = np.zeros(n_envs)
        self.running_length = np.zeros(n_envs, dtype=np.int64)
        self.steps = 0

    @property
    def obs_dim(self) -> int:
        return int(np.prod(self.observation_space.shape))

    def _env_action(self, a: Tensor) -> np.ndarray:
        gym = _gym()
        if isinstance(self.action_space, gym.spaces.Discrete):
            return a.reshape(-1).long().cpu().numpy()
        low, high = self.action_space.low, self.action_space.high
        return np.clip(a.cpu().numpy(), low, high).astype(self.action_space.dtype)

    def _tensor(self, obs: np.ndarray, like: Tensor) -> Tensor:
        return torch.as_tensor(obs.reshape(obs.shape[0], -1), dtype=like.dtype, device=like.device)

    @torch.no_grad()
    def collect(
        self,
        policy: nn.Module,
        loss: PolicyLoss,
        value: nn.Module,
        n_steps: int,
        generator: torch.Generator | None = None,
    ) -> Rollout:
        """Run ``n_steps`` steps in every copy with actions drawn from the policy."""
        if not (isinstance(n_steps, int) and n_steps >= 1):
            raise ConfigurationError(f"n_steps must be a positive integer, got {n_steps!r}.")
        like = next(policy.parameters())
        T, E = n_steps, self.n_envs
        obs_l, act_l, lp_l = [], [], []
        rew = np.zeros((T, E))
        term = np.zeros((T, E), dtype=bool)
        trunc = np.zeros((T, E), dtype=bool)
        finals: list[tuple[int, int, np.ndarray]] = []  # (t, e, final observation)
        episodes: list[Episode] = []
        for t in range(T):
            s = self._tensor(self.obs, like)
            a, logp = loss.act(policy(s), generator)
            obs, r, te, tr, info = self.envs.step(self._env_action(a))
            self.steps += E
            obs_l.append(s)
            act_l.append(a)
            lp_l.append(logp)
            rew[t], term[t], trunc[t] = r, te, tr
            self.running_return += r
            self.running_length += 1
            for e in np.flatnonzero(te | tr):
                finals.append((t, int(e), np.asarray(info["final_obs"][e])))
                k = self.steps - E + e + 1
                episodes.append(
                    Episode(int(k), float(self.running_return[e]), int(self.running_length[e]))
                )
                self.running_return[e] = 0.0
                self.running_length[e] = 0
            self.obs = obs
        # V(s_t) for every state and V(s_{t+1}) of what followed: the next row's state, the
        # state after the last step, or, where an episode ended, its final observation
        states = torch.cat(obs_l)
        extra = [self._tensor(self.obs, like)]
        if finals:
            extra.append(self._tensor(np.stack([f for _, _, f in finals]), like))
        v_all = value(torch.cat([states, *extra])).reshape(-1)
        values = v_all[: T * E].reshape(T, E)
        next_values = torch.cat([values[1:], v_all[T * E : T * E + E].reshape(1, E)])
        for k, (t, e, _) in enumerate(finals):
            next_values[t, e] = v_all[T * E + E + k]
        dt, dev = like.dtype, like.device
        return Rollout(
            obs=states,
            actions=torch.cat(act_l),
            log_prob=torch.cat(lp_l),
            rewards=torch.as_tensor(rew, dtype=dt, device=dev),
            values=values,
            next_values=next_values,
            terminated=torch.as_tensor(term, device=dev),
            truncated=torch.as_tensor(trunc, device=dev),
            episodes=episodes,
        )

    def close(self) -> None:
        self.envs.close()

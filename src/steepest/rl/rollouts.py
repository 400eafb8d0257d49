r"""Rollouts from vectorised ``gymnasium`` environments.

:class:`Collector` steps ``n_envs`` copies of an environment in lock step (the semantics of
``gymnasium.vector.SyncVectorEnv`` with same-step autoreset, stepped directly to save its
per-step overhead: when an episode ends its final observation is kept for the value bootstrap
and the next observation is already the reset one). Each call to :meth:`Collector.collect`
gathers ``n_steps`` steps per copy with the current policy,
:math:`a_t \sim \pi(\cdot|f(s_t, \theta))`, and returns a :class:`Rollout` with everything GAE
and the policy step need, plus the returns of the episodes that ended.

Optionally the collector normalises what the agent sees, as Stable-Baselines3's
``VecNormalize`` does (the RL Zoo uses it on several classic-control tasks):

- observations, :math:`\tilde s = \mathrm{clip}((s - \mu)/\sqrt{\sigma^2 + 10^{-8}}, \pm c)`
  with the running mean and variance of every raw observation seen so far (updated before the
  policy acts on it; the stored rollout holds the normalised states the policy saw);
- rewards, :math:`\tilde r_t = \mathrm{clip}(r_t/\sqrt{\mathrm{Var}[R] + 10^{-8}}, \pm c)`
  with the running variance of the discounted return :math:`R_t = \gamma R_{t-1} + r_t`
  (reset at episode ends) as it stands at the end of the rollout, one scale per batch.

Episode returns are always reported raw.

The collector is picklable (the environments, their random states and the running episode
returns), so a training run can be checkpointed between iterations and resumed bit for bit.

Example
-------
>>> col = Collector("CartPole-v1", n_envs=2, seed=0)
>>> batch = col.collect(policy, Categorical(), value, n_steps=128, generator=gen)
>>> batch.obs.shape, batch.rewards.shape          # (256, 4), (128, 2)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ConfigurationError
from .policies import Categorical, DiagonalGaussian, GaussianHead, PolicyLoss


def _gym():
    try:
        import gymnasium
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ConfigurationError(
            "steepest.rl needs gymnasium; install it with pip install 'steepest[rl]'."
        ) from err
    return gymnasium


def make_env(env_id: str):
    """One environment (``gymnasium.make`` without the passive checker, which only warns and
    costs time on every step)."""
    return _gym().make(env_id, disable_env_checker=True)


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


class RunningMoments:
    r"""Running mean and variance of a stream of batches (Chan et al.'s parallel update, as in
    Stable-Baselines3's ``RunningMeanStd``), in float64.

    >>> m = RunningMoments((2,))
    >>> m.update(np.array([[0.0, 1.0], [2.0, 3.0]]))
    >>> m.mean                                     # approximately [1, 2]
    """

    def __init__(self, shape: tuple[int, ...] = ()) -> None:
        self.mean = np.zeros(shape)
        self.var = np.ones(shape)
        self.count = 1e-4

    def update(self, x: np.ndarray) -> None:
        """Add a batch (rows are samples)."""
        x = np.asarray(x, dtype=np.float64)
        b_mean, b_var, b_n = x.mean(0), x.var(0), x.shape[0]
        delta = b_mean - self.mean
        n = self.count + b_n
        self.mean = self.mean + delta * b_n / n
        m2 = self.var * self.count + b_var * b_n + delta**2 * self.count * b_n / n
        self.var = m2 / n
        self.count = n


def _inference(net: nn.Module):
    """A faster forward for acting: tanh MLPs (and a :class:`GaussianHead` on one) run as
    ``addmm``/``tanh`` calls without the module machinery; anything else is called as is.
    Built per rollout (it holds the current parameter tensors, updated in place)."""
    if isinstance(net, GaussianHead):
        mean = _inference(net.mean)
        log_std = net.log_std

        def head(x: Tensor) -> Tensor:
            mu = mean(x)
            return torch.cat([mu, log_std.expand_as(mu)], -1)

        return head
    if isinstance(net, nn.Sequential) and all(isinstance(m, nn.Linear | nn.Tanh) for m in net):
        layers = [(m.weight.T, m.bias) if isinstance(m, nn.Linear) else None for m in net]
        if any(layer is not None and layer[1] is None for layer in layers):
            return net

        def forward(x: Tensor) -> Tensor:
            for layer in layers:
                x = torch.tanh(x) if layer is None else torch.addmm(layer[1], x, layer[0])
            return x

        return forward
    return net


class Collector:
    """Vectorised environments and the bookkeeping of running episodes.

    Parameters
    ----------
    env_id: a gymnasium id (classic control: CartPole-v1, Acrobot-v1, Pendulum-v1, ...)
    n_envs: copies stepped together
    seed: seeds the copies with seed, seed + 1, ... at the first reset
    normalize_obs, normalize_reward: running normalisation (see the module docstring)
    gamma: the discount of the return whose variance scales the rewards
    clip: the bound c of the normalised observations and rewards
    """

    def __init__(
        self,
        env_id: str,
        n_envs: int = 2,
        seed: int = 0,
        normalize_obs: bool = False,
        normalize_reward: bool = False,
        gamma: float = 0.99,
        clip: float = 10.0,
    ) -> None:
        if not (isinstance(n_envs, int) and n_envs >= 1):
            raise ConfigurationError(f"n_envs must be a positive integer, got {n_envs!r}.")
        if not (isinstance(clip, int | float) and clip > 0):
            raise ConfigurationError(f"clip must be a positive number, got {clip!r}.")
        if not (isinstance(gamma, int | float) and 0 <= gamma <= 1):
            raise ConfigurationError(f"gamma must lie in [0, 1], got {gamma!r}.")
        check_env(env_id)
        self.env_id, self.n_envs = env_id, n_envs
        self.envs = [make_env(env_id) for _ in range(n_envs)]
        self.action_space = self.envs[0].action_space
        self.observation_space = self.envs[0].observation_space
        self.discrete = isinstance(self.action_space, _gym().spaces.Discrete)
        self.obs = np.stack(
            [
                np.asarray(env.reset(seed=seed + k)[0], dtype=np.float64).reshape(-1)
                for k, env in enumerate(self.envs)
            ]
        )
        self.running_return = np.zeros(n_envs)
        self.running_length = np.zeros(n_envs, dtype=np.int64)
        self.steps = 0
        self.normalize_obs, self.normalize_reward = bool(normalize_obs), bool(normalize_reward)
        self.gamma, self.clip = float(gamma), float(clip)
        self.obs_moments = RunningMoments((self.obs_dim,)) if normalize_obs else None
        self.ret_moments = RunningMoments(()) if normalize_reward else None
        self.discounted = np.zeros(n_envs)
        if self.obs_moments is not None:
            self.obs_moments.update(self.obs)

    @property
    def obs_dim(self) -> int:
        return int(np.prod(self.observation_space.shape))

    def normalized(self, obs: np.ndarray) -> np.ndarray:
        """Raw observations (rows) as the policy sees them (unchanged without normalisation)."""
        if self.obs_moments is None:
            return obs
        m = self.obs_moments
        return np.clip((obs - m.mean) / np.sqrt(m.var + 1e-8), -self.clip, self.clip)

    def _env_actions(self, a: Tensor) -> list:
        if self.discrete:
            return a.reshape(-1).long().tolist()
        low, high = self.action_space.low, self.action_space.high
        return list(np.clip(a.numpy(), low, high).astype(self.action_space.dtype))

    def _tensor(self, obs: np.ndarray, like: Tensor) -> Tensor:
        return torch.as_tensor(self.normalized(obs), dtype=like.dtype, device=like.device)

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
        forward = _inference(policy)
        T, E = n_steps, self.n_envs
        obs_l, act_l, lp_l = [], [], []
        rew = np.zeros((T, E))
        term = np.zeros((T, E), dtype=bool)
        trunc = np.zeros((T, E), dtype=bool)
        finals: list[tuple[int, int, Tensor]] = []  # (t, e, final observation as seen)
        episodes: list[Episode] = []
        for t in range(T):
            s = self._tensor(self.obs, like)
            a, logp = loss.act(forward(s), generator)
            obs = np.empty_like(self.obs)
            ended = []
            for e, (env, act) in enumerate(zip(self.envs, self._env_actions(a))):
                o, r, te, tr, _ = env.step(act)
                rew[t, e], term[t, e], trunc[t, e] = r, te, tr
                obs[e] = np.asarray(o, dtype=np.float64).reshape(-1)
                if te or tr:
                    ended.append((e, obs[e].copy()))
                    obs[e] = np.asarray(env.reset()[0], dtype=np.float64).reshape(-1)
            self.steps += E
            obs_l.append(s)
            act_l.append(a)
            lp_l.append(logp)
            self.running_return += rew[t]
            self.running_length += 1
            if self.ret_moments is not None:
                self.discounted = self.discounted * self.gamma + rew[t]
                self.ret_moments.update(self.discounted)
            if self.obs_moments is not None:
                self.obs_moments.update(obs)
            for e, final in ended:
                finals.append((t, e, self._tensor(final[None], like)))
                k = self.steps - E + e + 1
                episodes.append(
                    Episode(int(k), float(self.running_return[e]), int(self.running_length[e]))
                )
                self.running_return[e] = 0.0
                self.running_length[e] = 0
                self.discounted[e] = 0.0
            self.obs = obs
        if self.ret_moments is not None:
            scale = np.sqrt(self.ret_moments.var + 1e-8)
            rew = np.clip(rew / scale, -self.clip, self.clip)
        # V(s_t) for every state and V(s_{t+1}) of what followed: the next row's state, the
        # state after the last step, or, where an episode ended, its final observation
        states = torch.cat(obs_l)
        extra = [self._tensor(self.obs, like), *(f for _, _, f in finals)]
        v_all = _inference(value)(torch.cat([states, *extra])).reshape(-1)
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
        for env in self.envs:
            env.close()

r"""Policy-gradient methods as steepest Optimizer steps (Kakade 2002; Schulman et al. 2015).

One iteration: collect a rollout with the current policy, estimate advantages with GAE
(:mod:`~steepest.rl.advantages`), pack (action, advantage, old log-probability) into the
targets of the policy's surrogate loss (:mod:`~steepest.rl.policies`), take **one**
:meth:`steepest.Optimizer.step` on the policy network, and refit the value baseline
(:mod:`~steepest.rl.value`). The methods differ only in the Optimizer's pieces
(000 Table 1 and Appendix A):

=========  ============  ======================  ==========================================
method     metric M      solver                  step rule
=========  ============  ======================  ==========================================
``vpg``    Identity      (exact)                 ``LearningRate(lr)``: :math:`\delta = \alpha g`
``npg``    Fisher        CG, damping lambda      ``TrustRegion(eps = sqrt(2 max_kl))``:
                                                 :math:`\alpha = \sqrt{2\delta/g^TF^{-1}g}`
``trpo``   Fisher        CG, damping lambda      ``KLLineSearch(max_kl)``: backtracking on
                                                 the surrogate under the KL bound
=========  ============  ======================  ==========================================

Here g is the gradient of the surrogate :math:`L(\theta) = -\frac1N\sum_i \hat A_i
\pi_\theta(a_i|s_i)/\pi_{old}(a_i|s_i)` (minus the policy gradient at :math:`\theta_{old}`),
:math:`F = E_s[J^T F_R J]` the policy's Fisher, and ``TrustRegion`` is exactly the natural
policy gradient with a fixed KL step: :math:`\delta^T F\delta = 2\,` max_kl, the quadratic model
of :math:`KL(\pi_{old}\|\pi_{new}) \le` max_kl. ``acktr`` (Wu et al. 2017) is the NPG step with
``KFAC(ema=None, T_cov=1, T_inv=1)`` (the Kronecker-factored Fisher of each update's batch
from sampled actions, inverted block by block) in place of the exact Fisher and CG, damping
max(cg_damping, 0.01), alpha capped at 1, and the step clipped to the exact KL bound
(:class:`~steepest.rl.trust.ExactKLClip`: K-FAC's Fisher is approximate, so its quadratic model
alone does not bound the KL).

Example
-------
>>> agent = Agent("CartPole-v1", method="trpo", seed=0)
>>> history = agent.learn(20_000)
>>> history[-1]["mean_return"]
"""

from __future__ import annotations

import math
import pickle
import time
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
from torch import nn

from ..damping import Constant
from ..errors import ConfigurationError
from ..kronecker import KFAC
from ..metrics import Fisher, Identity
from ..optimizer import Optimizer
from ..solvers import CG
from ..steps import KLLineSearch, LearningRate, TrustRegion
from .advantages import gae
from .policies import DiagonalGaussian, GaussianHead, PolicyLoss, mlp
from .rollouts import Collector, policy_for
from .trust import ExactKLClip
from .value import ValueFit

METHODS = ("trpo", "npg", "vpg", "acktr")
LABELS = {
    "trpo": "TRPO (Fisher, CG, KL line search)",
    "npg": "NPG (Fisher, CG, fixed KL step)",
    "vpg": "VPG (Identity, learning rate)",
    "acktr": "ACKTR (K-FAC Fisher, fixed KL step)",
}


@dataclass(frozen=True)
class Settings:
    """Hyperparameters of a run (defaults: the RL Zoo's TRPO settings for CartPole-v1).

    n_envs, n_steps: environments stepped together and steps per environment per iteration
    gamma, gae_lambda: discount and GAE lambda
    max_kl: the KL bound delta (TRPO, NPG); cg_damping: lambda added to the Fisher;
    cg_iters: CG iterations; backtrack, max_backtracks: TRPO's line-search factor and trials
    lr: the learning rate of VPG's plain gradient step (2.0: the best of 0.05, 0.5 and 2.0 on
        CartPole-v1 in one 30k-step run with seed 0)
    normalize_advantage: centre and scale the advantages per batch
    hidden: hidden layer widths of the policy and value networks (tanh)
    value_fitter, value_lr, value_epochs, value_batch: the baseline's fit (:mod:`.value`)
    log_std: initial log standard deviation of a Gaussian policy
    normalize_obs, normalize_reward: the collector's running observation and reward
        normalisation (:class:`~steepest.rl.Collector`, as ``VecNormalize``)
    episodes_window: the mean return is over the last this many finished episodes
    dtype: the networks' dtype
    """

    n_envs: int = 2
    n_steps: int = 512
    gamma: float = 0.99
    gae_lambda: float = 0.98
    max_kl: float = 0.01
    cg_damping: float = 1e-3
    cg_iters: int = 15
    backtrack: float = 0.8
    max_backtracks: int = 10
    lr: float = 2.0
    normalize_advantage: bool = True
    hidden: tuple[int, ...] = (64, 64)
    value_fitter: str = "adam"
    value_lr: float = 1e-3
    value_epochs: int = 20
    value_batch: int = 512
    log_std: float = 0.0
    normalize_obs: bool = False
    normalize_reward: bool = False
    episodes_window: int = 10
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in (
            "n_envs",
            "n_steps",
            "cg_iters",
            "max_backtracks",
            "value_epochs",
            "value_batch",
            "episodes_window",
        ):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ConfigurationError(f"{name} must be a positive integer, got {v!r}.")
        for name in ("max_kl", "lr", "value_lr"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise ConfigurationError(f"{name} must be a finite positive number, got {v!r}.")
        if not (isinstance(self.cg_damping, int | float) and 0 <= self.cg_damping < math.inf):
            raise ConfigurationError(f"cg_damping must be >= 0, got {self.cg_damping!r}.")
        if not 0 < self.backtrack < 1:
            raise ConfigurationError(f"backtrack must lie in (0, 1), got {self.backtrack!r}.")
        for name in ("gamma", "gae_lambda"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and 0 <= v <= 1):
                raise ConfigurationError(f"{name} must lie in [0, 1], got {v!r}.")
        for name in ("normalize_advantage", "normalize_obs", "normalize_reward"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigurationError(
                    f"{name} must be True or False, got {getattr(self, name)!r}."
                )
        if self.dtype not in ("float32", "float64"):
            raise ConfigurationError(f"dtype must be float32 or float64, got {self.dtype!r}.")

    def with_(self, **changes: Any) -> Settings:
        """A copy with some fields changed (validated)."""
        names = {f.name for f in fields(self)}
        bad = sorted(set(changes) - names)
        if bad:
            raise ConfigurationError(
                f"unknown setting(s) {bad}; known: {', '.join(sorted(names))}."
            )
        return replace(self, **changes)


# The default hyperparameters of every method per environment: the RL Zoo's TRPO settings
# (rl-baselines3-zoo hyperparams/trpo.yml, with sb3_contrib.TRPO's defaults for the keys the
# Zoo leaves out). Two Zoo choices are not copied: gSDE on Pendulum-v1 (an exploration scheme of
# sb3's Gaussian policies; ours samples plain Gaussian actions) and VecNormalize on Acrobot-v1
# (normalize_obs/normalize_reward stay off: with seed 0, TRPO's 10-episode mean reached -100 at
# 32,864 steps without it and at 41,719 steps with both normalisations; benchmarks/rl.md).
# Both normalisations are Settings options.
ENV_SETTINGS: dict[str, dict[str, Any]] = {
    "CartPole-v1": {
        "n_envs": 2,
        "n_steps": 512,
        "gamma": 0.99,
        "gae_lambda": 0.98,
        "cg_damping": 1e-3,
        "value_epochs": 20,
        "value_batch": 512,
    },
    "Acrobot-v1": {
        "n_envs": 2,
        "n_steps": 1024,
        "gamma": 0.99,
        "gae_lambda": 0.95,
        "cg_damping": 0.1,
        "value_epochs": 10,
        "value_batch": 128,
    },
    "Pendulum-v1": {
        "n_envs": 2,
        "n_steps": 1024,
        "gamma": 0.9,
        "gae_lambda": 0.95,
        "cg_damping": 0.1,
        "value_epochs": 15,
        "value_batch": 128,
    },
}


def settings_for(env_id: str, **changes: Any) -> Settings:
    """The default :class:`Settings` for an environment, with ``changes`` applied."""
    return Settings().with_(**{**ENV_SETTINGS.get(env_id, {}), **changes})


def policy_optimizer(
    method: str,
    policy: nn.Module,
    loss: PolicyLoss,
    s: Settings,
    generator: torch.Generator | None = None,
) -> Optimizer:
    """The steepest :class:`~steepest.Optimizer` whose one step is the method's policy update
    (see the module docstring's table).

    >>> opt = policy_optimizer("trpo", policy, Categorical(), Settings())
    >>> info = opt.step(obs, Categorical().targets(actions, advantages, log_prob))
    """
    if method == "vpg":
        return Optimizer(
            policy,
            loss,
            metric=Identity(),
            damping=0.0,
            solver=CG(maxiter=1),
            step=LearningRate(s.lr),
            generator=generator,
        )
    if method == "acktr":
        # Wu et al. 2017: the K-FAC natural gradient (Fisher from sampled actions, K-FAC's own
        # inverse) with alpha = min(1, sqrt(2 max_kl / d^T (K + lambda I) d)), clipped to the
        # exact KL bound (K is approximate: the quadratic model alone overshot it up to 7x)
        return Optimizer(
            policy,
            loss,
            # the Fisher of each update's batch (thousands of samples, one step per batch):
            # K-FAC's amortising defaults (inverses every 100 steps) would decompose the
            # factors once or twice in a whole run
            metric=KFAC(ema=None, T_cov=1, T_inv=1),
            damping=Constant(max(s.cg_damping, 1e-2)),
            solver="auto",
            step=ExactKLClip(max_kl=s.max_kl, max_alpha=1.0),
            generator=generator,
        )
    if method == "npg":
        step = TrustRegion(eps=math.sqrt(2 * s.max_kl))
    elif method == "trpo":
        step = KLLineSearch(max_kl=s.max_kl, beta=s.backtrack, max_evals=s.max_backtracks)
    else:
        raise ConfigurationError(f"unknown method {method!r}; choose from {', '.join(METHODS)}.")
    return Optimizer(
        policy,
        loss,
        metric=Fisher(),
        damping=Constant(s.cg_damping),
        solver=CG(tol=1e-10, maxiter=s.cg_iters),
        step=step,
        generator=generator,
    )


class Agent:
    """A policy, a value baseline and the vectorised environments, trained by one of
    :data:`METHODS`.

    Parameters
    ----------
    env_id: a gymnasium environment id
    method: ``"trpo"``, ``"npg"``, ``"acktr"`` or ``"vpg"``
    seed: seeds the networks, the environments and the action sampling
    settings: a :class:`Settings` (default :func:`settings_for` ``(env_id)``)

    ``learn(steps)`` runs whole iterations until at least ``steps`` environment steps are
    done; ``history`` holds one dict per iteration and ``episodes`` every finished episode.
    ``state_dict()`` / ``load_state_dict()`` checkpoint between iterations; a resumed run
    continues bit for bit.

    >>> agent = Agent("CartPole-v1", method="npg", seed=1)
    >>> agent.learn(10_000)[-1]["mean_return"]
    """

    def __init__(
        self, env_id: str, method: str = "trpo", seed: int = 0, settings: Settings | None = None
    ) -> None:
        if method not in METHODS:
            raise ConfigurationError(
                f"unknown method {method!r}; choose from {', '.join(METHODS)}."
            )
        if not (isinstance(seed, int) and seed >= 0):
            raise ConfigurationError(f"seed must be an integer >= 0, got {seed!r}.")
        self.s = settings_for(env_id) if settings is None else settings
        self.env_id, self.method, self.seed = env_id, method, seed
        self.collector = Collector(
            env_id,
            self.s.n_envs,
            seed,
            normalize_obs=self.s.normalize_obs,
            normalize_reward=self.s.normalize_reward,
            gamma=self.s.gamma,
        )
        self.loss = policy_for(self.collector.action_space)
        dtype = getattr(torch, self.s.dtype)
        self.generator = torch.Generator().manual_seed(seed)
        n_in = self.collector.obs_dim
        hidden = list(self.s.hidden)
        if isinstance(self.loss, DiagonalGaussian):
            k = self.loss.action_dim
            self.policy = GaussianHead(
                mlp([n_in, *hidden, k], out_gain=0.01, generator=self.generator, dtype=dtype),
                k,
                log_std=self.s.log_std,
            )
        else:
            n_out = int(self.collector.action_space.n)
            self.policy = mlp(
                [n_in, *hidden, n_out], out_gain=0.01, generator=self.generator, dtype=dtype
            )
        self.value = mlp([n_in, *hidden, 1], out_gain=1.0, generator=self.generator, dtype=dtype)
        self.opt = policy_optimizer(method, self.policy, self.loss, self.s, self.generator)
        self.value_fit = ValueFit(
            self.value,
            self.s.value_fitter,
            self.s.value_lr,
            self.s.value_epochs,
            self.s.value_batch,
        )
        self.history: list[dict[str, Any]] = []
        self.episodes: list[tuple[int, float]] = []
        self.wall_time = 0.0

    @property
    def steps(self) -> int:
        """Environment steps taken so far (all copies together)."""
        return self.collector.steps

    def mean_return(self) -> float | None:
        """Mean return of the last ``episodes_window`` finished episodes (None before one)."""
        last = self.episodes[-self.s.episodes_window :]
        return sum(r for _, r in last) / len(last) if last else None

    def iteration(self) -> dict[str, Any]:
        """Collect, estimate advantages, one policy step, refit the baseline."""
        t0 = time.perf_counter()
        s = self.s
        batch = self.collector.collect(
            self.policy, self.loss, self.value, s.n_steps, self.generator
        )
        self.episodes.extend((e.step, e.ret) for e in batch.episodes)
        adv, ret = gae(
            batch.rewards,
            batch.values,
            batch.next_values,
            batch.terminated,
            batch.truncated,
            s.gamma,
            s.gae_lambda,
        )
        adv, ret = adv.reshape(-1), ret.reshape(-1)
        if s.normalize_advantage:
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        y = self.loss.targets(batch.actions, adv, batch.log_prob)
        with torch.no_grad():
            z_old = self.policy(batch.obs)
        info = self.opt.step(batch.obs, y)
        with torch.no_grad():
            kl = float(self.loss.kl(z_old, self.policy(batch.obs)).mean())
        value_mse = self.value_fit.fit(batch.obs, ret, self.generator)
        self.wall_time += time.perf_counter() - t0
        row = {
            "iteration": len(self.history) + 1,
            "steps": self.steps,
            "episodes": len(self.episodes),
            "mean_return": self.mean_return(),
            "surrogate_gain": -(info.loss_new - info.loss) if info.loss_new is not None else 0.0,
            "kl": kl,
            "alpha": info.alpha,
            "accepted": info.accepted,
            "cg_iterations": info.iterations,
            "evaluations": info.evaluations,
            "value_mse": value_mse,
            "wall_time": self.wall_time,
        }
        self.history.append(row)
        return row

    def learn(self, steps: int, callback: Any = None) -> list[dict[str, Any]]:
        """Iterate until ``steps`` environment steps in all; ``callback(agent, row)`` after
        each iteration (return True from it to stop early)."""
        if not (isinstance(steps, int) and steps >= 1):
            raise ConfigurationError(f"steps must be a positive integer, got {steps!r}.")
        while self.steps < steps:
            row = self.iteration()
            if callback is not None and callback(self, row):
                break
        return self.history

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run bit for bit (environments included)."""
        return {
            "env_id": self.env_id,
            "method": self.method,
            "seed": self.seed,
            "settings": asdict(self.s),
            "policy": self.policy.state_dict(),
            "value": self.value.state_dict(),
            "opt": self.opt.state_dict(),
            "value_fit": self.value_fit.state_dict(),
            "generator": self.generator.get_state(),
            "collector": pickle.dumps(self.collector),
            "history": list(self.history),
            "episodes": list(self.episodes),
            "wall_time": self.wall_time,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (same environment, method and settings)."""
        mine = (self.env_id, self.method, self.seed, asdict(self.s))
        theirs = (
            state.get("env_id"),
            state.get("method"),
            state.get("seed"),
            state.get("settings"),
        )
        if mine != theirs:
            raise ConfigurationError(
                f"the checkpoint is of {theirs[:3]} with other settings than this run "
                f"{mine[:3]}; resume with the same environment, method, seed and settings."
            )
        self.policy.load_state_dict(state["policy"])
        self.value.load_state_dict(state["value"])
        self.opt.load_state_dict(state["opt"])
        self.value_fit.load_state_dict(state["value_fit"])
        self.generator.set_state(state["generator"])
        self.collector.close()
        self.collector = pickle.loads(state["collector"])
        self.history = list(state["history"])
        self.episodes = [tuple(e) for e in state["episodes"]]
        self.wall_time = float(state["wall_time"])

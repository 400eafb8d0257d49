"""Reinforcement learning with steepest: the natural policy gradient (Kakade 2002), TRPO
(Schulman et al. 2015) and a vanilla policy gradient as steepest Optimizer steps on gymnasium
environments.

A policy is a :class:`~steepest.losses.Loss` whose predictive distribution is pi(a|s)
(:mod:`.policies`), so ``Fisher()``, ``CG`` and ``KLLineSearch`` apply to a policy network
unchanged; :mod:`.rollouts` collects vectorised experience, :mod:`.advantages` computes GAE,
:mod:`.value` fits the baseline, :mod:`.trust` keeps ACKTR's K-FAC step within the exact KL
bound and :mod:`.agent` ties one iteration together.

>>> from steepest.rl import Agent
>>> agent = Agent("CartPole-v1", method="trpo", seed=0)
>>> agent.learn(50_000)[-1]["mean_return"]
"""

from .advantages import gae
from .agent import LABELS, METHODS, Agent, Settings, policy_optimizer, settings_for
from .policies import Categorical, DiagonalGaussian, GaussianHead, PolicyLoss, mlp
from .rollouts import Collector, Episode, Rollout, RunningMoments, policy_for
from .trust import ExactKLClip
from .value import ValueFit

__all__ = [
    "Agent",
    "Categorical",
    "Collector",
    "DiagonalGaussian",
    "Episode",
    "ExactKLClip",
    "GaussianHead",
    "LABELS",
    "METHODS",
    "PolicyLoss",
    "Rollout",
    "RunningMoments",
    "Settings",
    "ValueFit",
    "gae",
    "mlp",
    "policy_for",
    "policy_optimizer",
    "settings_for",
]

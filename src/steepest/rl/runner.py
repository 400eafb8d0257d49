r"""Run several methods and seeds on one environment, with checkpoints, and summarise.

:func:`run` trains one :class:`~steepest.rl.Agent` per (method, seed) for a budget of
environment steps and returns a :class:`Results` (the data type :mod:`.report` reads). With
``checkpoint_dir`` the state of every run is saved every ``checkpoint_every`` iterations and
at its end; ``resume=True`` continues from there (a finished run is loaded, not rerun), bit
for bit.

The measures, per run, from the finished training episodes (the Stable-Baselines3 convention of
reporting the training episodes' returns):

- final mean return: the mean return of the last ``episodes_window`` (10) episodes;
- steps to target: the environment step count at the end of the first episode at which the
  mean of the last ``episodes_window`` episodes reaches the target (None if never);
- wall time: seconds spent in the run's iterations (rollouts, advantages, policy step,
  value fit).

Example
-------
>>> res = run("CartPole-v1", ["trpo", "vpg"], seeds=[0, 1], steps=20_000)
>>> res.summary["trpo"]["median_final_return"]
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigurationError
from .agent import LABELS, METHODS, Agent, settings_for

SCHEMA = 1


@dataclass
class RLRun:
    """One (method, seed) run: its per-iteration history and finished episodes."""

    method: str
    seed: int
    steps: int
    wall_time: float
    final_return: float | None
    steps_to_target: int | None
    history: list[dict[str, Any]]
    episodes: list[tuple[int, float]]
    resumed: bool = False


@dataclass
class Results:
    """Every run of :func:`run` and the per-method summary."""

    env: str
    methods: list[str]
    seeds: list[int]
    steps: int
    target: float | None
    settings: dict[str, Any]
    runs: list[RLRun]
    summary: dict[str, dict[str, Any]] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, **asdict(self)}


def parse_methods(methods: str | Sequence[str]) -> list[str]:
    """``"trpo,npg"`` or a list -> validated method names (``"all"``: every method)."""
    names = methods.split(",") if isinstance(methods, str) else list(methods)
    names = [m.strip().lower() for m in names if m.strip()]
    if names == ["all"]:
        return list(METHODS)
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        hint = " (acktr needs steepest.KFAC, not in this version)" if "acktr" in bad else ""
        raise ConfigurationError(
            f"unknown method(s) {bad or names}{hint}; choose from {', '.join(METHODS)} or all."
        )
    return list(dict.fromkeys(names))


def steps_to_target(
    episodes: Sequence[tuple[int, float]], target: float | None, window: int
) -> int | None:
    """The step at the end of the first episode where the mean of the last ``window`` episodes
    reaches ``target``."""
    if target is None:
        return None
    for k in range(len(episodes)):
        last = episodes[max(0, k + 1 - window) : k + 1]
        if sum(r for _, r in last) / len(last) >= target:
            return int(episodes[k][0])
    return None


def default_target(env_id: str) -> float | None:
    """The environment's ``reward_threshold`` from its gymnasium spec (CartPole-v1: 475)."""
    import gymnasium

    try:
        return gymnasium.spec(env_id).reward_threshold
    except gymnasium.error.Error:
        return None


def machine() -> dict[str, Any]:
    """Versions, threads and the load average (the machine may be shared)."""
    from importlib import metadata

    info: dict[str, Any] = {}
    for dist in ("steepest", "torch", "gymnasium", "numpy"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[dist] = None
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    info.update(
        python=sys.version.split()[0],
        platform=platform.platform(),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        load_average=list(load) if load else None,
        started=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    return info


def summarize(runs: list[RLRun], methods: list[str]) -> dict[str, dict[str, Any]]:
    """Per method: median, min and max final return over seeds, how many seeds reached the
    target, the median steps to target among those, median wall time and time per 1000
    steps."""
    out: dict[str, dict[str, Any]] = {}
    for m in methods:
        rs = [r for r in runs if r.method == m]
        finals = [r.final_return for r in rs if r.final_return is not None]
        hit = [r.steps_to_target for r in rs if r.steps_to_target is not None]
        times = [r.wall_time for r in rs]
        out[m] = {
            "label": LABELS[m],
            "seeds": len(rs),
            "median_final_return": statistics.median(finals) if finals else None,
            "min_final_return": min(finals) if finals else None,
            "max_final_return": max(finals) if finals else None,
            "reached_target": len(hit),
            "median_steps_to_target": statistics.median(hit) if hit else None,
            "median_wall_time": statistics.median(times) if times else None,
            "wall_time_per_1000_steps": (
                statistics.median([1000 * r.wall_time / r.steps for r in rs if r.steps])
                if rs
                else None
            ),
        }
    return out


def _checkpoint(path: Path, agent: Agent, done: bool) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"agent": agent.state_dict(), "done": done}, tmp)
    os.replace(tmp, path)


Progress = Callable[[str, int, Agent], None]


def run(
    env_id: str,
    methods: str | Sequence[str] = "trpo,npg,vpg",
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = 100_000,
    target: float | None = None,
    settings: dict[str, Any] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
    resume: bool = False,
    progress: Progress | None = None,
) -> Results:
    """Train every (method, seed) for ``steps`` environment steps; see the module docstring.

    ``settings`` changes :class:`~steepest.rl.Settings` fields for every method (the rest are
    :func:`~steepest.rl.settings_for` ``(env_id)``); ``target`` defaults to the environment's
    reward threshold; ``progress(method, seed, agent)`` is called after every iteration.
    """
    names = parse_methods(methods)
    if not (isinstance(steps, int) and steps >= 1):
        raise ConfigurationError(f"steps must be a positive integer, got {steps!r}.")
    seeds = list(seeds)
    if not seeds or any(not isinstance(s, int) or s < 0 for s in seeds):
        raise ConfigurationError(f"seeds must be integers >= 0, got {seeds!r}.")
    s = settings_for(env_id, **(settings or {}))
    if target is None:
        target = default_target(env_id)
    ckdir = None if checkpoint_dir is None else Path(checkpoint_dir)
    if ckdir is not None:
        ckdir.mkdir(parents=True, exist_ok=True)
    runs = []
    for m in names:
        for seed in seeds:
            agent = Agent(env_id, m, seed, s)
            path = None if ckdir is None else ckdir / f"{m}-seed{seed}.pt"
            resumed, done = False, False
            if resume and path is not None and path.exists():
                state = torch.load(path, weights_only=False)
                agent.load_state_dict(state["agent"])
                resumed, done = True, bool(state["done"]) and agent.steps >= steps

            def callback(
                a: Agent,
                row: dict[str, Any],
                m: str = m,
                seed: int = seed,
                path: Path | None = path,
            ) -> bool:
                if path is not None and row["iteration"] % checkpoint_every == 0:
                    _checkpoint(path, a, False)
                if progress is not None:
                    progress(m, seed, a)
                return False

            if not done:
                agent.learn(steps, callback)
                if path is not None:
                    _checkpoint(path, agent, True)
            elif progress is not None:
                progress(m, seed, agent)
            agent.collector.close()
            runs.append(
                RLRun(
                    method=m,
                    seed=seed,
                    steps=agent.steps,
                    wall_time=agent.wall_time,
                    final_return=agent.mean_return(),
                    steps_to_target=steps_to_target(agent.episodes, target, s.episodes_window),
                    history=agent.history,
                    episodes=[list(e) for e in agent.episodes],
                    resumed=resumed,
                )
            )
    return Results(
        env=env_id,
        methods=names,
        seeds=seeds,
        steps=steps,
        target=target,
        settings=asdict(s),
        runs=runs,
        summary=summarize(runs, names),
        machine=machine(),
    )


def finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)

r"""RL benchmark (issue 13): steepest's TRPO, NPG and VPG against ``sb3_contrib.TRPO`` with the
RL Zoo's hyperparameters, on gymnasium classic-control environments, in the same run.

For each environment and seed, every method runs in turn (round-robin, so load from other
processes on a shared machine spreads over all of them) for ``--steps`` environment steps:

- steepest: :class:`steepest.rl.Agent` with :func:`steepest.rl.settings_for` (the RL Zoo's
  TRPO settings for the environment: n_envs, n_steps, gamma, GAE lambda, CG damping, critic
  updates and minibatch), max_kl 0.01, CG 15 iterations, 64-64 tanh networks, Adam value fit.
  No observation or reward normalisation.
- ``sb3``: ``sb3_contrib.TRPO("MlpPolicy", ...)`` with the RL Zoo's ``hyperparams/trpo.yml``
  entry for the environment (VecNormalize where the Zoo sets ``normalize: true``, gSDE where
  it sets ``use_sde``), episodes recorded through ``Monitor`` (raw returns).

Per run: the finished training episodes (step at the end, return), the final mean return (the
last 10 episodes), the steps at which the mean of the last 10 episodes first reached the target
(CartPole-v1: 500, the maximum, as the issue's goal; Acrobot-v1: -100 and Pendulum-v1: -200,
the usual "solved" levels), and the wall time of the training call. ``torch.set_num_threads``
is the same for all (``--threads``, default 1). The JSON holds the machine's load average at
the start and end: on a shared machine wall times are only comparable within one run.

Usage::

    python benchmarks/rl.py --envs CartPole-v1 --seeds 0 1 2 --steps 100000
    python benchmarks/rl.py --markdown benchmarks/results/rl.json      # the table

Never run by the test suite; sb3-contrib comes from the ``bench`` extra.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from steepest.rl import Agent, settings_for
from steepest.rl.runner import steps_to_target

TARGETS = {"CartPole-v1": 500.0, "Acrobot-v1": -100.0, "Pendulum-v1": -200.0}
WINDOW = 10

# rl-baselines3-zoo hyperparams/trpo.yml (the keys besides n_timesteps and policy)
ZOO = {
    "CartPole-v1": dict(
        n_envs=2,
        n_steps=512,
        batch_size=512,
        cg_damping=1e-3,
        gae_lambda=0.98,
        gamma=0.99,
        learning_rate=1e-3,
        n_critic_updates=20,
    ),
    "Acrobot-v1": dict(normalize=True, n_envs=2, n_steps=1024),
    "Pendulum-v1": dict(
        n_envs=2, n_steps=1024, gamma=0.9, n_critic_updates=15, use_sde=True, sde_sample_freq=4
    ),
}


def run_steepest(env: str, method: str, seed: int, steps: int) -> dict:
    agent = Agent(env, method, seed, settings_for(env))
    t0 = time.perf_counter()
    agent.learn(steps)
    wall = time.perf_counter() - t0
    agent.collector.close()
    return {
        "steps": agent.steps,
        "wall_time": wall,
        "episodes": agent.episodes,
        "iterations": len(agent.history),
    }


def run_sb3(env: str, seed: int, steps: int) -> dict:
    from sb3_contrib import TRPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    hp = dict(ZOO[env])
    n_envs, normalize = hp.pop("n_envs"), hp.pop("normalize", False)
    venv = make_vec_env(env, n_envs=n_envs, seed=seed)
    if normalize:
        venv = VecNormalize(venv)
    episodes: list[tuple[int, float]] = []

    class Record(BaseCallback):
        def _on_step(self) -> bool:
            for info in self.locals["infos"]:
                if "episode" in info:
                    episodes.append((int(self.num_timesteps), float(info["episode"]["r"])))
            return True

    model = TRPO("MlpPolicy", venv, seed=seed, device="cpu", **hp)
    t0 = time.perf_counter()
    model.learn(total_timesteps=steps, callback=Record())
    wall = time.perf_counter() - t0
    venv.close()
    return {
        "steps": int(model.num_timesteps),
        "wall_time": wall,
        "episodes": episodes,
        "iterations": None,
    }


def machine() -> dict:
    from importlib import metadata

    info = {
        d: _version(metadata, d)
        for d in ("torch", "gymnasium", "stable_baselines3", "sb3_contrib", "numpy")
    }
    info.update(
        python=sys.version.split()[0],
        platform=platform.platform(),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        load_average_start=list(os.getloadavg()),
        started=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    return info


def _version(metadata, dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def summarize(runs: list[dict]) -> dict:
    out: dict = {}
    for r in runs:
        out.setdefault(r["env"], {}).setdefault(r["method"], []).append(r)
    table: dict = {}
    for env, by in out.items():
        for m, rs in by.items():
            finals = [r["final_return"] for r in rs if r["final_return"] is not None]
            hit = [r["steps_to_target"] for r in rs if r["steps_to_target"] is not None]
            table.setdefault(env, {})[m] = {
                "seeds": len(rs),
                "median_final_return": statistics.median(finals) if finals else None,
                "min_final_return": min(finals) if finals else None,
                "max_final_return": max(finals) if finals else None,
                "reached_target": len(hit),
                "median_steps_to_target": statistics.median(hit) if hit else None,
                "median_wall_time": statistics.median(r["wall_time"] for r in rs),
                "median_s_per_1000_steps": statistics.median(
                    1000 * r["wall_time"] / r["steps"] for r in rs
                ),
            }
    return table


def markdown(doc: dict) -> str:
    lines = [
        "| env | method | final mean return, median [min, max] | seeds at target | "
        "steps to target (median) | s per 1000 steps (median) |",
        "|---" * 6 + "|",
    ]
    for env, by in doc["summary"].items():
        for m, s in by.items():

            def g(x, f=".1f"):
                return "-" if x is None else format(x, f)

            lines.append(
                f"| {env} | {m} | {g(s['median_final_return'])} [{g(s['min_final_return'])}, "
                f"{g(s['max_final_return'])}] | {s['reached_target']}/{s['seeds']} "
                f"(target {doc['targets'][env]:g}) | {g(s['median_steps_to_target'], '.0f')} | "
                f"{g(s['median_s_per_1000_steps'], '.2f')} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--envs", nargs="+", default=["CartPole-v1"])
    ap.add_argument("--methods", nargs="+", default=["trpo", "npg", "vpg", "sb3"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/rl.json")
    ap.add_argument("--append", action="store_true", help="add to the runs already in --out")
    ap.add_argument("--markdown", metavar="JSON", help="print the table of a results file")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    doc = {
        "targets": TARGETS,
        "window": WINDOW,
        "zoo": ZOO,
        "machine": machine(),
        "config": {
            "envs": args.envs,
            "methods": args.methods,
            "seeds": args.seeds,
            "steps": args.steps,
            "threads": args.threads,
        },
        "runs": [],
    }
    if args.append and out.exists():
        old = json.loads(out.read_text())
        doc["runs"] = old["runs"]
        doc["previous"] = old.get("previous", []) + [
            {"machine": old["machine"], "config": old["config"]}
        ]
    for env in args.envs:
        for seed in args.seeds:
            k = args.seeds.index(seed)
            order = args.methods[k % len(args.methods) :] + args.methods[: k % len(args.methods)]
            for m in order:
                res = (
                    run_sb3(env, seed, args.steps)
                    if m == "sb3"
                    else run_steepest(env, m, seed, args.steps)
                )
                eps = res["episodes"]
                last = eps[-WINDOW:]
                res.update(
                    env=env,
                    method=m,
                    seed=seed,
                    final_return=sum(r for _, r in last) / len(last) if last else None,
                    steps_to_target=steps_to_target(eps, TARGETS.get(env), WINDOW),
                    load_average=list(os.getloadavg()),
                )
                res["episodes"] = [[int(s), round(float(r), 3)] for s, r in eps]
                doc["runs"].append(res)
                print(
                    f"{env} {m} seed {seed}: final {res['final_return']:.1f}, to target "
                    f"{res['steps_to_target']}, {res['wall_time']:.1f} s",
                    flush=True,
                )
                doc["summary"] = summarize(doc["runs"])
                doc["machine"]["load_average_end"] = list(os.getloadavg())
                out.parent.mkdir(parents=True, exist_ok=True)
                tmp = out.with_suffix(".tmp")
                tmp.write_text(json.dumps(doc, indent=1) + "\n")
                os.replace(tmp, out)
    print(markdown(doc))


if __name__ == "__main__":
    main()

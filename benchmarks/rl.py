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
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
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
    times: list[float] = []  # wall time at the end of the iteration each episode ended in

    def stamp(a: Agent, row: dict) -> bool:
        times.extend([time.perf_counter() - t0] * (len(a.episodes) - len(times)))
        return False

    agent.learn(steps, stamp)
    wall = time.perf_counter() - t0
    agent.collector.close()
    return {
        "steps": agent.steps,
        "wall_time": wall,
        "episodes": [(s, r, t) for (s, r), t in zip(agent.episodes, times)],
        "iterations": len(agent.history),
        "max_kl": max(r["kl"] for r in agent.history),
        "settings": asdict(agent.s),
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
    episodes: list[tuple[int, float, float]] = []

    class Record(BaseCallback):
        def _on_step(self) -> bool:
            for info in self.locals["infos"]:
                if "episode" in info:
                    episodes.append(
                        (
                            int(self.num_timesteps),
                            float(info["episode"]["r"]),
                            time.perf_counter() - t0,
                        )
                    )
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


def one(env: str, method: str, seed: int, steps: int, threads: int) -> dict:
    """One run (in a worker process when --jobs > 1): train, then the measures."""
    torch.set_num_threads(threads)
    load_start = list(os.getloadavg())
    cpu0 = time.process_time()
    res = run_sb3(env, seed, steps) if method == "sb3" else run_steepest(env, method, seed, steps)
    res["cpu_time"] = time.process_time() - cpu0  # this process's CPU seconds (1 thread)
    eps = res["episodes"]
    last = eps[-WINDOW:]
    res.update(
        env=env,
        method=method,
        seed=seed,
        final_return=sum(e[1] for e in last) / len(last) if last else None,
        steps_to_target=steps_to_target([e[:2] for e in eps], TARGETS.get(env), WINDOW),
        load_average_start=load_start,
        load_average=list(os.getloadavg()),
        torch_threads=torch.get_num_threads(),
    )
    res["episodes"] = [[int(s), round(float(r), 3), round(float(t), 3)] for s, r, t in eps]
    return res


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
                # over the runs that recorded their CPU time (older files: none)
                "median_cpu_s_per_1000_steps": (
                    statistics.median(1000 * r["cpu_time"] / r["steps"] for r in timed)
                    if (timed := [r for r in rs if "cpu_time" in r])
                    else None
                ),
                "cpu_timed_seeds": sum("cpu_time" in r for r in rs),
            }
    return table


def markdown(doc: dict) -> str:
    lines = [
        "| env | method | final mean return, median [min, max] | seeds at target | "
        "steps to target (median) | wall s per 1000 steps (median) | CPU s per 1000 steps |",
        "|---" * 7 + "|",
    ]
    for env, by in doc["summary"].items():
        for m, s in by.items():

            def g(x, f=".1f"):
                return "-" if x is None else format(x, f)

            lines.append(
                f"| {env} | {m} | {g(s['median_final_return'])} [{g(s['min_final_return'])}, "
                f"{g(s['max_final_return'])}] | {s['reached_target']}/{s['seeds']} "
                f"(target {doc['targets'][env]:g}) | {g(s['median_steps_to_target'], '.0f')} | "
                f"{g(s['median_s_per_1000_steps'], '.2f')} | "
                f"{g(s.get('median_cpu_s_per_1000_steps'), '.2f')} |"
            )
    return "\n".join(lines)


def curve(episodes: list, grid, x: int):
    """The 10-episode running mean return at each grid point of column ``x`` (0: steps, 2:
    seconds), from the finished episodes (step, return, seconds); NaN before the first."""
    import numpy as np

    eps = [e for e in episodes if len(e) > x]
    xs = np.array([e[x] for e in eps], dtype=float)
    rs = np.array([e[1] for e in eps], dtype=float)
    means = np.array([rs[max(0, k + 1 - WINDOW) : k + 1].mean() for k in range(len(rs))])
    idx = np.searchsorted(xs, grid, side="right") - 1
    return np.where(idx >= 0, means[np.clip(idx, 0, None)], np.nan)


def plot(doc: dict, path: Path) -> None:
    """Return against environment steps and against wall time: per environment and method,
    the median over seeds of the 10-episode running mean, with a band from the lowest to the
    highest seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    envs = list(doc["summary"])
    fig, axes = plt.subplots(2, len(envs), figsize=(5 * len(envs), 7), squeeze=False)
    for j, env in enumerate(envs):
        runs = [r for r in doc["runs"] if r["env"] == env]
        for row, (x, label) in enumerate([(0, "environment steps"), (2, "wall time (s)")]):
            ax = axes[row, j]
            top = max(
                (
                    r["episodes"][-1][x]
                    for r in runs
                    if r["episodes"] and len(r["episodes"][-1]) > x
                ),
                default=1.0,
            )
            grid = np.linspace(0, top, 200)
            for m in doc["summary"][env]:
                cs = [
                    curve(r["episodes"], grid, x)
                    for r in runs
                    if r["method"] == m and r["episodes"] and len(r["episodes"][0]) > x
                ]
                if not cs:
                    continue
                c = np.array(cs)
                with warnings.catch_warnings():  # all-NaN columns before any episode ended
                    warnings.simplefilter("ignore", RuntimeWarning)
                    med = np.nanmedian(c, 0)
                    lo, hi = np.nanmin(c, 0), np.nanmax(c, 0)
                name = "sb3_contrib TRPO" if m == "sb3" else f"steepest {m.upper()}"
                (line,) = ax.plot(grid, med, label=f"{name} ({len(cs)})")
                ax.fill_between(grid, lo, hi, color=line.get_color(), alpha=0.15)
            ax.axhline(doc["targets"][env], color="grey", lw=0.8, ls="--")
            ax.set_xlabel(label)
            ax.set_ylabel("mean return (last 10 episodes)")
            ax.set_title(env)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def timing(args: argparse.Namespace, out: Path) -> None:
    """Seconds per 1000 steps of steepest TRPO and sb3 TRPO, alternating in one process."""
    env, seed = args.envs[0], args.seeds[0]
    rows = []
    for rep in range(args.reps):
        pair = {}
        for m in ("trpo", "sb3") if rep % 2 == 0 else ("sb3", "trpo"):
            res = (
                run_sb3(env, seed, args.timing)
                if m == "sb3"
                else run_steepest(env, m, seed, args.timing)
            )
            pair[m] = 1000 * res["wall_time"] / res["steps"]
        pair["ratio_trpo_over_sb3"] = pair["trpo"] / pair["sb3"]
        pair["load_average"] = list(os.getloadavg())
        rows.append(pair)
        print(pair, flush=True)
    ratios = [r["ratio_trpo_over_sb3"] for r in rows]
    doc = {
        "env": env,
        "seed": seed,
        "steps": args.timing,
        "machine": machine(),
        "reps": rows,
        "median_ratio": statistics.median(ratios),
        "min_ratio": min(ratios),
        "max_ratio": max(ratios),
    }
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(
        f"steepest TRPO / sb3 TRPO seconds per 1000 steps: median {doc['median_ratio']:.2f} "
        f"[{doc['min_ratio']:.2f}, {doc['max_ratio']:.2f}]"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--envs", nargs="+", default=["CartPole-v1"])
    ap.add_argument("--methods", nargs="+", default=["trpo", "sb3", "npg", "acktr", "vpg"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs in parallel (separate processes, --threads torch threads each)",
    )
    ap.add_argument("--out", default="benchmarks/results/rl.json")
    ap.add_argument("--append", action="store_true", help="add to the runs already in --out")
    ap.add_argument("--markdown", metavar="JSON", help="print the table of a results file")
    ap.add_argument(
        "--plot", nargs=2, metavar=("JSON", "PNG"), help="plot return against steps and time"
    )
    ap.add_argument(
        "--timing",
        type=int,
        metavar="STEPS",
        help="only time steepest TRPO against sb3 side by side: STEPS steps each, "
        "alternating, --reps times, on the first env and seed",
    )
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return
    if args.plot:
        plot(json.loads(Path(args.plot[0]).read_text()), Path(args.plot[1]))
        return
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.timing:
        timing(args, out)
        return
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
            "jobs": args.jobs,
        },
        "runs": [],
    }
    if args.append and out.exists():
        old = json.loads(out.read_text())
        doc["runs"] = old["runs"]
        doc["previous"] = old.get("previous", []) + [
            {"machine": old["machine"], "config": old["config"]}
        ]
    tasks = []  # per environment and seed, the methods in a rotated order (round-robin)
    for env in args.envs:
        for k, seed in enumerate(args.seeds):
            order = args.methods[k % len(args.methods) :] + args.methods[: k % len(args.methods)]
            tasks += [(env, m, seed, args.steps, args.threads) for m in order]
    done = {(r["env"], r["method"], r["seed"]) for r in doc["runs"]}
    tasks = [t for t in tasks if t[:3] not in done]

    def record(res: dict) -> None:
        doc["runs"].append(res)
        print(
            f"{res['env']} {res['method']} seed {res['seed']}: final {res['final_return']:.1f}, "
            f"to target {res['steps_to_target']}, {res['wall_time']:.1f} s "
            f"(load {res['load_average'][0]:.1f})",
            flush=True,
        )
        doc["summary"] = summarize(doc["runs"])
        doc["machine"]["load_average_end"] = list(os.getloadavg())
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        os.replace(tmp, out)

    if args.jobs == 1:
        for t in tasks:
            record(one(*t))
    else:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
            futures = [pool.submit(one, *t) for t in tasks]
            for f in as_completed(futures):
                record(f.result())
    print(markdown(doc))


if __name__ == "__main__":
    main()

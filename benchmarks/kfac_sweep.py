"""Steps to a target loss of K-FAC variants on the race's digits autoencoder (issue 10): what a
K-FAC user tunes (damping, Levenberg-Marquardt's initial lambda and factors, rescale, T_cov/T_inv,
ema, stats_batch), one JSON line per variant and seed: steps to the target (None if not within
``--steps``), solves ("tries", rejected tries included), CPU time and the load average.

Usage::

    python benchmarks/kfac_sweep.py                       # every variant, seeds 0 1 2
    python benchmarks/kfac_sweep.py --variants "factored|factored sb900" --seeds 0,1

Never run by the test suite; step counts are the figures to read (CPU times move with the load).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import race  # noqa: E402

import steepest  # noqa: E402

F = {"rescale": "momentum", "ema": None, "T_cov": 1, "T_inv": 1}
FA = {**F, "damping": "factored"}
VARIANTS: dict[str, tuple[dict, dict]] = {  # name -> (KFAC keywords, LevenbergMarquardt ones)
    "exact": (F, {"init": 10}),
    "factored": (FA, {"init": 10}),
    "factored init1": (FA, {"init": 1}),
    "factored init100": (FA, {"init": 100}),
    "factored noreject": (FA, {"init": 10, "reject": False}),
    "factored dec0.5 inc2": (FA, {"init": 10, "decrease": 0.5, "increase": 2.0}),
    "factored alpha": ({**FA, "rescale": "alpha"}, {"init": 10}),
    "factored T2": ({**FA, "T_cov": 2, "T_inv": 2}, {"init": 10}),
    "factored ema0.5": ({**FA, "ema": 0.5}, {"init": 10}),
    "factored sb900": ({**FA, "stats_batch": 900}, {"init": 10}),
    "factored sb450": ({**FA, "stats_batch": 450}, {"init": 10}),
    "factored sb300": ({**FA, "stats_batch": 300}, {"init": 10}),
    "factored sb900 init1": ({**FA, "stats_batch": 900}, {"init": 1}),
    "factored sb900 init100": ({**FA, "stats_batch": 900}, {"init": 100}),
    "factored sb900 T2": ({**FA, "stats_batch": 900, "T_cov": 2, "T_inv": 2}, {"init": 10}),
    "factored sb900 noreject": ({**FA, "stats_batch": 900}, {"init": 10, "reject": False}),
    "exact sb900": ({**F, "stats_batch": 900}, {"init": 10}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="|".join(VARIANTS), help="names separated by |")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--target", type=float, default=19.8)
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args()
    torch.set_num_threads(1)
    prob = race.autoencoder_problem()
    for name in args.variants.split("|"):
        kw, lm = VARIANTS[name]
        for seed in (int(s) for s in args.seeds.split(",")):
            model = prob["model"](seed)
            opt = steepest.Optimizer(
                model,
                prob["loss"],
                metric=steepest.KFAC(**kw),
                damping=steepest.LevenbergMarquardt(**lm),
            )
            cpu, tries, reached, err = 0.0, 0, None, None
            for step in range(1, args.steps + 1):
                c0 = time.process_time()
                try:
                    info = opt.step(prob["x"], prob["y"])
                except (steepest.errors.SteepestError, torch.linalg.LinAlgError) as e:
                    err = f"{type(e).__name__}: {e}"[:120]
                    break
                cpu += time.process_time() - c0
                tries += info.tries
                if race.full_loss(model, prob) <= args.target:
                    reached = step
                    break
            row = {"variant": name, "seed": seed, "steps": reached, "tries": tries}
            row.update(cpu_s=round(cpu, 2), load=os.getloadavg()[0], error=err)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

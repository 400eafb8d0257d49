"""The cost of the check that makes the vmap per-sample path safe (issue 10).

``Point`` and ``ClosurePoint`` compute per-sample Jacobians and gradients by ``torch.func.vmap``
over one-sample model calls, and check them against the batch once per step
(``GraphProducts._agrees``): the one-sample outputs against z (free: vmap returns them) and a
random contraction of the rows against the same product on the batch's graph (one backward).
This script times one step with the check and with the product check switched off
(``GraphProducts._rows_checked = True`` for the whole class), interleaved in one process, on:

- the digits CNN (batch 64), exact GGN, ``LevenbergMarquardt(1e-1)``, ``solver="auto"``
  (Woodbury: per-sample Jacobians), through ``Optimizer`` and ``TorchOptimizer``;
- the MLP 784-512-512-10 (batch 128), ``Diagonal(EmpiricalFisher(), power=0.5)`` (per-sample
  gradients), through ``Optimizer``.

It also asserts that every per-sample request took the vmap route (the check refuses none of
these uncoupled models). Wall clock, median and [min, max] over the repeats.

    PYTHONPATH=src python benchmarks/vmap_check.py --repeats 5 \\
        --out benchmarks/results/vmap_check.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from scale import problem  # noqa: E402

import steepest  # noqa: E402
from steepest.closure_point import ClosurePoint  # noqa: E402
from steepest.losses import CrossEntropy  # noqa: E402
from steepest.point import GraphProducts, Point  # noqa: E402

ROUTES: list[bool] = []


def spy(cls: type) -> None:
    """Record whether each per-sample request of ``cls`` was answered by vmap."""
    orig = cls._per_sample

    def wrapped(self, samples, kind):
        out = orig(self, samples, kind)
        ROUTES.append(out is not None)
        return out

    cls._per_sample = wrapped


def cases() -> dict:
    out = {}
    model, x, y = problem("cnn")

    def ggn():
        return dict(metric=steepest.GGN(), damping=steepest.LevenbergMarquardt(1e-1))

    m1 = copy.deepcopy(model)
    o1 = steepest.Optimizer(m1, CrossEntropy(), **ggn())
    out["cnn GGN Optimizer auto"] = lambda: o1.step(x, y)
    m2 = copy.deepcopy(model)
    o2 = steepest.TorchOptimizer(m2.parameters(), loss=CrossEntropy(), **ggn())
    out["cnn GGN TorchOptimizer auto"] = lambda: o2.step(lambda: (m2(x), y))
    mlp, xm, ym = problem("mlp")
    o3 = steepest.Optimizer(
        mlp,
        CrossEntropy(),
        metric=steepest.Diagonal(steepest.EmpiricalFisher(), power=0.5),
        damping=1e-8,
        step=1e-3,
    )
    out["mlp Diagonal(EmpiricalFisher) Optimizer"] = lambda: o3.step(xm, ym)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    spy(Point)
    spy(ClosurePoint)
    steps = cases()
    times = {k: {"checked": [], "unchecked": []} for k in steps}
    for step in steps.values():  # warm-up
        step()
    for _ in range(args.repeats):
        for k, step in steps.items():
            for mode in ("checked", "unchecked"):
                GraphProducts._rows_checked = mode == "unchecked"
                t = time.perf_counter()
                step()
                times[k][mode].append(time.perf_counter() - t)
    GraphProducts._rows_checked = False
    assert ROUTES and all(ROUTES), "a per-sample request left the vmap route"
    res = {}
    for k, t in times.items():
        c, u = statistics.median(t["checked"]), statistics.median(t["unchecked"])
        res[k] = {
            "checked_s": {"median": c, "min": min(t["checked"]), "max": max(t["checked"])},
            "unchecked_s": {"median": u, "min": min(t["unchecked"]), "max": max(t["unchecked"])},
            "ratio_checked_to_unchecked": c / u,
        }
    res["machine"] = {
        "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "repeats": args.repeats,
        "per_sample_requests_by_vmap": f"{sum(ROUTES)} of {len(ROUTES)}",
    }
    print(json.dumps(res, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()

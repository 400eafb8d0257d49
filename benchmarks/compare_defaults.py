"""Which solver should ``steepest compare`` use by default on each built-in problem?

For every built-in problem and every curvature method of ``compare`` (not vanilla), the step
time of ``solver=auto`` (exact Woodbury or dense Cholesky where small, CG otherwise) against
the old default ``solver=cg, cg_maxiter=50``, both from the same weights: ``--steps`` steps
each, after one untimed warm-up step, the two solvers interleaved per repeat so that a change of
the machine's load hits both; median and range of the per-step time over ``--repeats``.
The iterations to the problem's target with each solver (from a separate ``compare.run`` with
an iteration budget, seed 0) say whether the faster step is also the faster answer.

Writes ``benchmarks/results/compare_defaults.json`` with the load average and the torch
thread count. The machine this runs on may be shared: the ratios (measured side by side) are
what to read, not the absolute times.

    PYTHONPATH=src python benchmarks/compare_defaults.py [--problems regression,digits]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from steepest import compare
from steepest.compare import runner

METHODS = ("gauss-newton", "natural", "empirical-fisher", "gradient-covariance", "newton", "ggn")
SOLVERS = {"auto": {"solver": "auto", "cg_maxiter": 0}, "cg50": {"solver": "cg", "cg_maxiter": 50}}


def step_times(problem, method: str, settings: dict, steps: int) -> list[float]:
    model = problem.make_model(0, torch.float64, "cpu")
    x, y = problem.data(torch.float64, "cpu")
    opt = runner._build(method, settings, model, problem.loss, torch.Generator().manual_seed(0))
    opt.step(x, y)  # warm-up, untimed
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.step(x, y)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--problems", default="quadratic,logistic,regression,heteroscedastic,digits,autoencoder"
    )
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "compare_defaults.json")
    )
    args = ap.parse_args()
    rows = []
    load_before = os.getloadavg()
    for name in args.problems.split(","):
        problem = runner.get_problem(name)
        for method in METHODS:
            base = compare.resolve_settings(problem, [method])[method]
            times: dict[str, list[float]] = {k: [] for k in SOLVERS}
            for _ in range(args.repeats):
                for key, solver in SOLVERS.items():
                    ts = step_times(problem, method, {**base, **solver}, args.steps)
                    times[key].append(statistics.median(ts))
            iters = {}
            for key, solver in SOLVERS.items():
                r = compare.run(
                    problem,
                    [method],
                    iters=args.iters,
                    seeds=1,
                    tune=False,
                    settings={method: solver},
                ).runs[0]
                iters[key] = {
                    "iters_to_target": r.iters_to_target,
                    "final_loss": r.final_loss if r.final_loss == r.final_loss else None,
                    "diverged": r.diverged,
                }
            row = {
                "problem": name,
                "method": method,
                "step_ms": {
                    k: {
                        "median": 1e3 * statistics.median(v),
                        "min": 1e3 * min(v),
                        "max": 1e3 * max(v),
                    }
                    for k, v in times.items()
                },
                "ratio_auto_over_cg50": statistics.median(times["auto"])
                / statistics.median(times["cg50"]),
                "iterations": iters,
            }
            rows.append(row)
            auto, cg50 = row["step_ms"]["auto"]["median"], row["step_ms"]["cg50"]["median"]
            print(
                f"{name:16s} {method:20s} auto {auto:8.2f} ms  cg50 {cg50:8.2f} ms  ratio "
                f"{row['ratio_auto_over_cg50']:.2f}  iters to target "
                f"{iters['auto']['iters_to_target']} / {iters['cg50']['iters_to_target']}",
                flush=True,
            )
    out = {
        "benchmark": "compare_defaults",
        "torch_threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "steps": args.steps,
        "repeats": args.repeats,
        "rows": rows,
        "note": "the machine was shared while this ran; read the ratios, measured side by "
        "side, not the absolute times",
    }
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Function evaluations of the model path on classic least-squares problems, before and after
the reuse of the accepted trial's forward, against MINPACK's ``lm`` (issue 12, "Evaluations").

Each problem of tests/mgh.py (Moré, Garbow and Hillstrom 1981) is posed as a model (the
residual vector as m samples of one output, MSE against zeros) and fitted with
``Optimizer(model, MSE(), metric=GaussNewton(), damping=MoreTrustRegion())`` with the
ftol/xtol defaults (1e-8) and ``gtol`` (``--gtol``, default 1e-8: scipy's tolerances), until
a stopping rule fires or MINPACK's max_nfev = 100 (P + 1); once with ``reuse=False`` (a
forward at theta on every step: the count before) and once with the default ``reuse=True``.
scipy's ``least_squares(method="lm")`` gets the Jacobian by autograd and its default
tolerances. Counts only, no timing: the result does not depend on the
machine's load.

    PYTHONPATH=src python benchmarks/evaluations.py --out benchmarks/results/evaluations.json

``--timing`` adds the wall time with reuse over without, side by side in one process (each
repeat runs both, alternately): two of the problems and a full-batch MLP (GGN, LM, CG), the
median and the spread of the ratio over the repeats, with the load average and torch's thread
count in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from mgh import PROBLEMS, as_model, fit, scipy_lm  # noqa: E402

from steepest import Optimizer  # noqa: E402
from steepest.damping import LevenbergMarquardt, MoreTrustRegion  # noqa: E402
from steepest.losses import MSE  # noqa: E402
from steepest.metrics import GGN, GaussNewton  # noqa: E402


def ours(name: str, reuse: bool, gtol: float = 0.0) -> dict:
    infos, cost = fit(name, reuse=reuse, gtol=gtol)
    return {
        "nfev": sum(i.nfev for i in infos),
        "njev": sum(i.njev for i in infos),
        "steps": len(infos),
        "cost": cost,
        "converged": infos[-1].reason or "no (max_nfev)",
    }


def _timed_mgh(name: str, reuse: bool) -> tuple[float, int]:
    model, x, y = as_model(name)
    opt = Optimizer(model, MSE(), metric=GaussNewton(), damping=MoreTrustRegion(), reuse=reuse)
    start, nfev = time.perf_counter(), 0
    for _ in range(300):
        info = opt.step(x, y)
        nfev += info.nfev
        if info.converged:
            break
    return time.perf_counter() - start, nfev


def _timed_mlp(reuse: bool, steps: int = 8) -> tuple[float, int]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 8, generator=g, dtype=torch.float64)
    y = torch.sin(x.sum(1, keepdim=True))
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 32),
        torch.nn.Tanh(),
        torch.nn.Linear(32, 32),
        torch.nn.Tanh(),
        torch.nn.Linear(32, 1),
    ).double()
    opt = Optimizer(
        model, MSE(), metric=GGN(), damping=LevenbergMarquardt(1e-2), solver="cg", reuse=reuse
    )
    start, nfev = time.perf_counter(), 0
    for _ in range(steps):
        nfev += opt.step(x, y).nfev
    return time.perf_counter() - start, nfev


def timing(repeats: int = 5) -> dict:
    """Wall time with reuse over without, per case: median, min, max over the repeats."""
    cases = {
        "brown_dennis": lambda r: _timed_mgh("brown_dennis", r),
        "osborne1": lambda r: _timed_mgh("osborne1", r),
        "mlp_500x8_32x32_ggn_lm_cg_8_steps": _timed_mlp,
    }
    out = {}
    for label, run in cases.items():
        run(True)  # warm-up
        ratios, nfev = [], {}
        for _ in range(repeats):
            off, n_off = run(False)
            on, n_on = run(True)
            ratios.append(on / off)
            nfev = {"reuse_off": n_off, "reuse_on": n_on}
        out[label] = {
            "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "repeats": repeats,
            "nfev": nfev,
        }
        print(label, out[label])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("--timing", action="store_true", help="also time reuse on against off")
    parser.add_argument(
        "--gtol",
        type=float,
        default=1e-8,
        help="the Optimizer's gtol (MINPACK's cosine for MSE); default 1e-8, scipy's, so that "
        "both run with the same tolerances (0 turns the test off, the Optimizer's default)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    head = (
        f"{'problem':20s} {'before':>7s} {'after':>6s} {'scipy':>6s}  {'cost':>11s}  {'scipy':>11s}"
    )
    print(head)
    for name in PROBLEMS:
        before, after = ours(name, False, args.gtol), ours(name, True, args.gtol)
        ref = scipy_lm(name)
        rows.append(
            {
                "problem": name,
                "before": before,
                "after": after,
                "scipy_lm": {
                    "nfev": int(ref.nfev),
                    "njev": int(ref.njev),
                    "cost": float(ref.cost),
                    "status": int(ref.status),
                },
            }
        )
        print(
            f"{name:20s} {before['nfev']:7d} {after['nfev']:6d} {ref.nfev:6d}  "
            f"{after['cost']:11.4e}  {ref.cost:11.4e}  {after['converged']}"
        )
    solved = [r for r in rows if r["problem"] != "powell_singular"]
    totals = {k: sum(r[k]["nfev"] for r in solved) for k in ("before", "after", "scipy_lm")}
    totals_all = {k: sum(r[k]["nfev"] for r in rows) for k in ("before", "after", "scipy_lm")}
    print(
        f"{'total (w/o powell_singular)':28s} before {totals['before']}  after "
        f"{totals['after']}  scipy {totals['scipy_lm']}; all 13: {totals_all}"
    )
    times = None
    if args.timing:
        load0 = os.getloadavg()
        times = {"load_average_before": load0, **timing(), "load_average_after": os.getloadavg()}
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "what": "function evaluations (nfev) to convergence, model path vs MINPACK lm",
                    "command": "PYTHONPATH=src python benchmarks/evaluations.py --out "
                    f"{args.out} --gtol {args.gtol:g}" + (" --timing" if args.timing else ""),
                    "gtol": args.gtol,
                    "timing": times,
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "cpus": os.cpu_count(),
                    "load_average": os.getloadavg(),
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "note": "the counts do not depend on the machine or its load; the timing "
                    "ratios do (the machine was shared with other jobs)",
                    "totals_without_powell_singular": totals,
                    "totals": totals_all,
                    "problems": rows,
                },
                indent=1,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()

"""Function evaluations of the model path on classic least-squares problems, before and after
the reuse of the accepted trial's forward, against MINPACK's ``lm`` (issue 12, "Evaluations").

Each problem of tests/mgh.py (Moré, Garbow and Hillstrom 1981) is posed as a model (the
residual vector as m samples of one output, MSE against zeros) and fitted with
``Optimizer(model, MSE(), metric=GaussNewton(), damping=MoreTrustRegion())`` and the
ftol/xtol defaults (1e-8), until a stopping rule fires or MINPACK's max_nfev = 100 (P + 1);
once with ``reuse=False`` (a forward at theta on every step: the count before) and once with
the default ``reuse=True``. scipy's ``least_squares(method="lm")`` gets the Jacobian by
autograd and its default tolerances. Counts only, no timing: the result does not depend on the
machine's load.

    PYTHONPATH=src python benchmarks/evaluations.py --out benchmarks/results/evaluations.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from mgh import PROBLEMS, as_model, scipy_lm  # noqa: E402

from steepest import Optimizer  # noqa: E402
from steepest.damping import MoreTrustRegion  # noqa: E402
from steepest.losses import MSE  # noqa: E402
from steepest.metrics import GaussNewton  # noqa: E402


def ours(name: str, reuse: bool) -> dict:
    model, x, y = as_model(name)
    opt = Optimizer(model, MSE(), metric=GaussNewton(), damping=MoreTrustRegion(), reuse=reuse)
    limit = 100 * (opt.space.size + 1)
    infos = []
    while sum(i.nfev for i in infos) < limit:
        infos.append(opt.step(x, y))
        if infos[-1].converged:
            break
    cost = 0.5 * float(model.r(model.theta.detach()).pow(2).sum())
    return {
        "nfev": sum(i.nfev for i in infos),
        "njev": sum(i.njev for i in infos),
        "steps": len(infos),
        "cost": cost,
        "converged": infos[-1].reason or "no (max_nfev)",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    head = (
        f"{'problem':20s} {'before':>7s} {'after':>6s} {'scipy':>6s}  {'cost':>11s}  {'scipy':>11s}"
    )
    print(head)
    for name in PROBLEMS:
        before, after = ours(name, reuse=False), ours(name, reuse=True)
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
    print(
        f"{'total (w/o powell_singular)':28s} before {totals['before']}  after "
        f"{totals['after']}  scipy {totals['scipy_lm']}"
    )
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "what": "function evaluations (nfev) to convergence, model path vs MINPACK lm",
                    "command": "PYTHONPATH=src python benchmarks/evaluations.py --out "
                    "benchmarks/results/evaluations.json",
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "cpus": os.cpu_count(),
                    "load_average": os.getloadavg(),
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "note": "counts only: they do not depend on the machine or its load (shared)",
                    "totals_without_powell_singular": totals,
                    "problems": rows,
                },
                indent=1,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()

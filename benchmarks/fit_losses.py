r"""Robust losses of ``steepest.least_squares`` against scipy's ``trf`` (an experiment, not a
timing).

A decay curve :math:`2 e^{-1.3 t} + 0.5` on 60 points with noise 0.02 and 9 points moved by
~1.5 (outliers), fitted from (1, 1, 0) with each loss (``f_scale=0.1``) by the three methods of
steepest (torch core) and by ``scipy.optimize.least_squares(method="trf")`` with the same loss
and the same torch Jacobian (tolerances 1e-14). For each: x, the cost F, nfev, status, and the
distance of x to the curve without outliers (2, 1.3, 0.5).

Usage (from the repository root)::

    python benchmarks/fit_losses.py --out benchmarks/results/fit_losses.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import warnings

import scipy
import torch
from scipy import optimize as sopt

import steepest

D = torch.float64
LOSSES = ("linear", "soft_l1", "huber", "cauchy", "arctan")
METHODS = ("trust-region", "levenberg-marquardt", "gauss-newton")
TRUTH = torch.tensor([2.0, 1.3, 0.5], dtype=D)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    t = torch.linspace(0, 4, 60, dtype=D)
    y = 2 * torch.exp(-1.3 * t) + 0.5 + 0.02 * torch.randn(60, generator=g, dtype=D)
    y[::7] += 1.5 * torch.randn(9, generator=g, dtype=D)
    return t, y


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="JSON file for the results")
    args = ap.parse_args(argv)
    t, y = data()

    def fun(p):
        return p[0] * torch.exp(-p[1] * t) + p[2] - y

    rows = []
    for loss in LOSSES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = sopt.least_squares(
                lambda p: fun(torch.from_numpy(p)).numpy(),
                [1.0, 1.0, 0.0],
                jac=lambda p: torch.func.jacrev(fun)(torch.from_numpy(p)).numpy(),
                loss=loss,
                f_scale=0.1,
                method="trf",
                ftol=1e-14,
                xtol=1e-14,
                gtol=1e-14,
            )
        rows.append(
            {
                "loss": loss,
                "solver": "scipy trf",
                "x": ref.x.tolist(),
                "cost": float(ref.cost),
                "nfev": int(ref.nfev),
                "status": int(ref.status),
            }
        )
        for method in METHODS:
            res = steepest.least_squares(
                fun, [1.0, 1.0, 0.0], method=method, loss=loss, f_scale=0.1, engine="torch"
            )
            rows.append(
                {
                    "loss": loss,
                    "solver": f"steepest {method}",
                    "x": res.x.tolist(),
                    "cost": float(res.cost),
                    "nfev": int(res.nfev),
                    "status": int(res.status),
                }
            )
    print("| loss | solver | x | cost F | nfev | status | max abs(x - truth) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        err = float((torch.tensor(r["x"], dtype=D) - TRUTH).abs().max())
        r["error_vs_truth"] = err
        x = ", ".join(f"{v:.6g}" for v in r["x"])
        print(
            f"| {r['loss']} | {r['solver']} | {x} | {r['cost']:.8g} | {r['nfev']} | "
            f"{r['status']} | {err:.3g} |"
        )
    if args.out:
        machine = {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "scipy": scipy.__version__,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        with open(args.out, "w") as fh:
            json.dump({"machine": machine, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

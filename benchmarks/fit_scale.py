r"""Scale invariance of ``steepest.least_squares`` / ``curve_fit`` against scipy (an experiment,
not a timing).

The expfit problem of the tests, :math:`f = s\,(a e^{-bt} + c - y)` on 30 points from three
starts, with the residuals times s (f and J scale together) and with the parameters in units u
(x = p / u: J times u), through both engines and the three methods, against
``scipy.optimize.least_squares`` with ``method="lm"`` (MINPACK) and ``"trf"``, given the same
torch Jacobian (``torch.func.jacrev``, as ``benchmarks/nist.py`` does). For each case:
the largest error of the parameters (in units of p) against the fit at s = u = 1 of the same
solver, the statuses and the evaluations. Then ``curve_fit``'s pcov at s against s = 1 (and
scipy's ``curve_fit``).

Usage (from the repository root)::

    python benchmarks/fit_scale.py --out benchmarks/results/fit_scale.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import warnings

import numpy as np
import scipy
import torch
from scipy import optimize as sopt

import steepest

D = torch.float64
T = torch.linspace(0, 4, 30, dtype=D)
Y = (
    2 * torch.exp(-1.3 * T)
    + 0.5
    + 0.01 * torch.randn(30, generator=torch.Generator().manual_seed(0), dtype=D)
)
X0 = torch.tensor([[1.0, 1.0, 0.0], [2.5, 0.5, 1.0], [0.5, 2.0, -1.0]], dtype=D)
SCALES = [1e-300, 1e-200, 1e-160, 1.0, 1e160, 1e200, 1e300]
UNITS = [1e-200, 1e-100, 1.0, 1e100, 1e200]
METHODS = ("trust-region", "levenberg-marquardt", "gauss-newton")


def fun(s: float, u: float):
    def f(p):
        q = p * u
        return s * (q[..., :1] * torch.exp(-q[..., 1:2] * T) + q[..., 2:] - Y)

    return f


def steepest_case(s: float, u: float, method: str, engine: str) -> dict:
    res = steepest.least_squares(fun(s, u), X0 / u, method=method, engine=engine)
    return {"x": (res.x * u).tolist(), "status": res.status.tolist(), "nfev": res.nfev.tolist()}


def scipy_case(s: float, u: float, method: str) -> dict:
    xs, status, nfev = [], [], []
    for x0 in X0.numpy():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = sopt.least_squares(
                lambda p: fun(s, u)(torch.from_numpy(p)).numpy(),
                x0 / u,
                jac=lambda p: torch.func.jacrev(fun(s, u))(torch.from_numpy(p)).numpy(),
                method=method,
            )
        xs.append((r.x * u).tolist())
        status.append(int(r.status))
        nfev.append(int(r.nfev))
    return {"x": xs, "status": status, "nfev": nfev}


def table() -> dict:
    solvers = {f"steepest {m} ({e})": (m, e) for e in ("torch", "numba") for m in METHODS}
    solvers |= {"scipy lm": ("lm", None), "scipy trf": ("trf", None)}
    out = {}
    for kind, values in (("residuals times s", SCALES), ("parameters in units u", UNITS)):
        rows = {}
        for name, (method, engine) in solvers.items():
            cells, ref = {}, None
            for v in [1.0] + [v for v in values if v != 1.0]:
                s, u = (v, 1.0) if kind.startswith("residuals") else (1.0, v)
                r = (
                    scipy_case(s, u, method)
                    if engine is None
                    else steepest_case(s, u, method, engine)
                )
                x = np.array(r["x"])
                ref = x if ref is None else ref
                r["err"] = float(np.abs(x - ref).max()) if np.isfinite(x).all() else float("inf")
                cells[f"{v:g}"] = r
            rows[name] = cells
        out[kind] = rows
    return out


def covariances() -> dict:
    def f(x, a, b, c):
        return a * torch.exp(-b * x) + c

    p0 = X0[:1]
    out = {}
    for v in [1.0, 1e-300, 1e-160, 1e160, 1e300]:
        _, pcov = steepest.curve_fit(
            lambda x, a, b, c, v=v: v * f(x, a, b, c), T, v * Y.unsqueeze(0), p0
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, scov = sopt.curve_fit(
                lambda x, a, b, c, v=v: v * (a * np.exp(-b * x) + c),
                T.numpy(),
                v * Y.numpy(),
                p0[0].numpy(),
            )
        out[f"{v:g}"] = {"steepest": pcov[0].diagonal().tolist(), "scipy": np.diag(scov).tolist()}
    return out


def markdown(res: dict) -> str:
    lines = []
    for kind, rows in res["least_squares"].items():
        cols = list(next(iter(rows.values())))
        lines += [
            f"**{kind}**: largest error of x against the same solver at 1 (status set, mean nfev)",
            "",
        ]
        lines += ["| solver | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for name, cells in rows.items():
            cell = []
            for c in cells.values():
                status = ",".join(map(str, sorted(set(c["status"]))))
                cell.append(f"{c['err']:.0e} ({status}; {np.mean(c['nfev']):.0f})")
            lines.append(f"| {name} | " + " | ".join(cell) + " |")
        lines.append("")
    lines += [
        "**curve_fit's pcov diagonal** (first entry)",
        "",
        "| s | steepest | scipy |",
        "|---|---|---|",
    ]
    for v, c in res["curve_fit_pcov"].items():
        lines.append(f"| {v} | {c['steepest'][0]:.6g} | {c['scipy'][0]:.6g} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="JSON file for the results")
    args = ap.parse_args(argv)
    res = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "scipy": scipy.__version__,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        },
        "least_squares": table(),
        "curve_fit_pcov": covariances(),
    }
    print(markdown(res))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

r"""Bounded fits: ``steepest.least_squares(bounds=)`` against ``scipy.optimize.least_squares``'s
bounded method ``trf``: where each ends and at what cost, and (``--speed``) a batch of
bounded curves against a loop of scipy's ``curve_fit(bounds=)``.

Two sets of problems, every fit with a box that binds or a start on or near a bound:

1. ``decay``: :math:`y = a e^{-bx} + c` (30 points, noise 0.01, minimum inside the box), lb = 0
   on all three parameters, from 7 starts on or near the bounds (a = 0, 1e-10, 1e-6, 1e-3; b
   = 0, 1e-3; all 0.01).
2. ``nist`` (``--data``): the 27 NIST StRD problems from both starts, with a bound on the first
   parameter halfway between the start and the certified value (an upper bound when the start
   is below it, a lower one otherwise), so that the constrained minimum lies on it (not
   certified: the two libraries are compared with each other, by cost).

3. ``speed`` (``--speed B``): B decay curves of 50 points (``fit_speed.py``'s data), one
   batched ``steepest.curve_fit(bounds=)`` against a loop of ``scipy.optimize.curve_fit(...,
   jac=numpy Jacobian, bounds=)`` (scipy's ``trf``), box lb = 0, c <= 0.3 (binding on most
   curves), repeats interleaved; popt compared where both succeed.

steepest runs with its defaults (``ftol = 1e-14``, ``max_nfev = 300 P``); trf with ``ftol =
xtol = gtol = 1e-15`` and ``max_nfev = 300 P``, the same torch Jacobian (``jacrev``). A fit
*agrees* when the costs agree to 1e-8 relative (and, for ``decay``, x to 1e-6 of the unbounded
minimum); otherwise the lower cost is named.

Usage (from the repository root)::

    python benchmarks/fit_bounds.py --data ../shared/data/nist-strd \
        --out benchmarks/results/fit_bounds.json
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import sys
import warnings
from pathlib import Path

import scipy
import torch
from scipy import optimize as sopt

import steepest

D = torch.float64
HERE = Path(__file__).resolve().parent


def _fit_speed():
    """benchmarks/fit_speed.py as a module: its data, formulas and NIST loader."""
    spec = importlib.util.spec_from_file_location("bench_fit_speed", HERE / "fit_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compare(fun, x0, lb, ub) -> dict:
    """One bounded fit by both libraries, from x0, on the box (lb, ub)."""
    x0t = torch.tensor(x0, dtype=D)
    p = len(x0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = steepest.least_squares(fun, x0t, bounds=(lb, ub))
    jac = torch.func.jacrev(fun)

    def f_np(b):
        return fun(torch.tensor(b, dtype=D)).numpy()

    def j_np(b):
        return jac(torch.tensor(b, dtype=D)).numpy()

    tight = {"ftol": 1e-15, "xtol": 1e-15, "gtol": 1e-15, "max_nfev": 300 * p}
    ref = sopt.least_squares(f_np, x0, jac=j_np, bounds=(lb, ub), method="trf", **tight)
    c_ours, c_ref = float(ours.cost), float(ref.cost)
    rel = abs(c_ours - c_ref) / max(abs(c_ref), 1e-300)
    return {
        "x0": list(map(float, x0)),
        "steepest": {
            "x": ours.x.tolist(),
            "cost": c_ours,
            "nfev": ours.nfev,
            "status": ours.status,
            "active_mask": ours.active_mask.tolist(),
        },
        "trf": {
            "x": ref.x.tolist(),
            "cost": c_ref,
            "nfev": int(ref.nfev),
            "status": int(ref.status),
            "active_mask": ref.active_mask.tolist(),
        },
        "cost_rel_diff": rel,
        "verdict": "agree"
        if rel <= 1e-8
        else ("steepest lower" if c_ours < c_ref else "trf lower"),
    }


def bench_decay() -> dict:
    g = torch.Generator().manual_seed(0)
    t = torch.linspace(0, 4, 30, dtype=D)
    y = 2 * torch.exp(-1.3 * t) + 0.5 + 0.01 * torch.randn(30, generator=g, dtype=D)

    def fun(p):
        return p[0] * torch.exp(-p[1] * t) + p[2] - y

    free = steepest.least_squares(fun, [1.5, 1.6, 0.1]).x
    starts = [
        [0.0, 1.6, 0.1],
        [1e-10, 1.6, 0.1],
        [1e-6, 1.6, 0.1],
        [1e-3, 1.6, 0.1],
        [1.0, 0.0, 0.0],
        [1.0, 1e-3, 0.0],
        [0.01, 0.01, 0.01],
    ]
    out = []
    for x0 in starts:
        row = compare(fun, x0, [0.0] * 3, [math.inf] * 3)
        row["steepest"]["x_err"] = float((torch.tensor(row["steepest"]["x"]) - free).abs().max())
        row["trf"]["x_err"] = float((torch.tensor(row["trf"]["x"], dtype=D) - free).abs().max())
        out.append(row)
    return {"unbounded_minimum": free.tolist(), "fits": out}


def bench_nist(data: Path) -> dict:
    nist = _fit_speed()._nist()
    out = {}
    for path in sorted(data.glob("*.dat")):
        problem = nist.parse(path)
        f = nist.formula_of(problem)
        x, y = nist.tensors(problem)
        y1 = y[:, 0]

        def fun(b, f=f, x=x, y1=y1):
            return f(b, x) - y1

        cert = problem.certified
        for start in (1, 2):
            x0 = list(problem.starts[start - 1])
            p = len(x0)
            lb, ub = [-math.inf] * p, [math.inf] * p
            mid = (x0[0] + cert[0]) / 2
            if x0[0] < cert[0]:
                ub[0] = mid
            else:
                lb[0] = mid
            try:
                out[f"{problem.name}-{start}"] = {
                    "lb": lb[0],
                    "ub": ub[0],
                    **compare(fun, x0, lb, ub),
                }
            except Exception as e:  # recorded, not hidden
                out[f"{problem.name}-{start}"] = {"error": f"{type(e).__name__}: {e}"}
    return out


def bench_speed(b: int, repeats: int) -> dict:
    import statistics
    import time

    fs = _fit_speed()
    t, y = fs.decay_data(b)
    p0 = torch.tensor([fs.P0] * b, dtype=D)
    lb, ub = [0.0, 0.0, 0.0], [math.inf, math.inf, 0.3]
    tn, yn = t.numpy(), y.numpy()
    with warnings.catch_warnings():  # warm-up (torch.func's first traces), not timed
        warnings.simplefilter("ignore")
        steepest.curve_fit(fs.decay, t, y[:128], p0[:128], bounds=(lb, ub))
    ours_t, ref_t = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            popt, _, res = steepest.curve_fit(fs.decay, t, y, p0, bounds=(lb, ub), full_output=True)
        ours_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ref = torch.full((b, 3), math.nan, dtype=D)
        for i in range(b):
            try:
                ref[i] = torch.as_tensor(
                    sopt.curve_fit(
                        fs.decay_np, tn, yn[i], fs.P0, jac=fs.decay_jac_np, bounds=(lb, ub)
                    )[0]
                )
            except RuntimeError:
                pass
        ref_t.append(time.perf_counter() - t0)
    both = res.success & torch.isfinite(ref).all(-1)
    return {
        "B": b,
        "N": y.shape[1],
        "bounds": {"lb": lb, "ub": ub},
        "steepest_s": ours_t,
        "scipy_loop_s": ref_t,
        "speedup_median": statistics.median(ref_t) / statistics.median(ours_t),
        "speedups": [r / o for r, o in zip(ref_t, ours_t, strict=True)],
        "steepest_success": int(res.success.sum()),
        "scipy_success": int(torch.isfinite(ref).all(-1).sum()),
        "on_c_bound": int((res.active_mask[:, 2] == 1).sum()),
        "max_abs_popt_diff_both": float((popt - ref)[both].abs().max()),
        "nfev_mean": float(res.nfev.double().mean()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=None, help="folder of the NIST StRD .dat files")
    ap.add_argument("--out", default=None)
    ap.add_argument("--speed", type=int, default=0, help="B curves for the timing (0: none)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-fits", action="store_true", help="the timing only")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    result = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "scipy": scipy.__version__,
            "cpu_count": os.cpu_count(),
            "loadavg_start": os.getloadavg(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        },
    }
    if args.speed:
        result["speed"] = bench_speed(args.speed, args.repeats)
        print("speed:", json.dumps(result["speed"]))
    if args.skip_fits:
        args.data = None
    else:
        result["decay"] = bench_decay()
    for row in result.get("decay", {}).get("fits", []):
        print(
            f"decay x0={row['x0']}: steepest nfev {row['steepest']['nfev']} x_err "
            f"{row['steepest']['x_err']:.1e} | trf nfev {row['trf']['nfev']} x_err "
            f"{row['trf']['x_err']:.1e} | {row['verdict']}"
        )
    if args.data:
        result["nist"] = bench_nist(Path(args.data))
        rows = [r for r in result["nist"].values() if "verdict" in r]
        verdicts = [r["verdict"] for r in rows]
        summary = {v: verdicts.count(v) for v in sorted(set(verdicts))}
        summary["errors"] = len(result["nist"]) - len(rows)
        summary["nfev_steepest"] = sum(r["steepest"]["nfev"] for r in rows)
        summary["nfev_trf"] = sum(r["trf"]["nfev"] for r in rows)
        summary["on_the_bound_steepest"] = sum(r["steepest"]["active_mask"][0] != 0 for r in rows)
        summary["on_the_bound_trf"] = sum(r["trf"]["active_mask"][0] != 0 for r in rows)
        result["nist_summary"] = summary
        for k, r in result["nist"].items():
            if r.get("verdict") != "agree":
                print(
                    f"NIST {k}: {r.get('verdict', r.get('error'))} (cost rel diff "
                    f"{r.get('cost_rel_diff', float('nan')):.1e})"
                )
        print("NIST summary:", json.dumps(summary))
    result["machine"]["loadavg_end"] = os.getloadavg()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

r"""Wall time of ``steepest.least_squares`` / ``steepest.curve_fit`` against scipy (issue 12).

Three measurements, each side by side in one process (median and spread of repeats):

1. ``single``: one small fit, :math:`y = a e^{-bx} + c` on 50 points, ``steepest.curve_fit``
   (autograd Jacobian) against ``scipy.optimize.curve_fit`` (numpy model, finite differences,
   as most scipy users call it); this is the per-step overhead of torch.
2. ``nist``: NIST StRD problems (``--data``) fitted by ``steepest.least_squares`` and by
   ``scipy.optimize.least_squares(method="lm")`` with the same torch Jacobian (``jacrev``), as
   ``benchmarks/nist.py`` does, both with scipy's tolerances (ftol = 1e-8, max_nfev = 100 P;
   ``least_squares``' own defaults are tighter); goal: within 5x scipy's time.
3. ``batched``: B = 10,000 exponential-decay curves of 50 points each (random a, b, c, noise
   0.01), one batched ``steepest.curve_fit`` against a Python loop of
   ``scipy.optimize.curve_fit`` over the curves; goal: the batch at least 20x faster. Three
   pairs, interleaved: ``lmder`` (steepest's default max_nfev 100 (P + 1) against
   scipy with ``jac=`` a numpy Jacobian, whose default is the same) and ``lmdif`` (steepest with
   max_nfev = 200 (P + 1) against scipy without ``jac``, its default: forward differences,
   counted in nfev), and ``lmder-jac``: steepest given the same Jacobian in torch
   (``curve_fit(jac=)``) against the same lmder loop, like with like. Then ``tail``: the fits
   that ran to max_nfev, fitted alone as one batch (the sequential iterations that bound the
   batch's time), in ms per iteration. And ``defaults``, each library's default call as a new
   user times it, from the same repeats: steepest's ``curve_fit(f, x, Y, p0)`` (the lmder
   pair's run: autograd Jacobian, max_nfev 100 (P + 1)) against the loop of scipy's
   ``curve_fit(f, x, y, p0)`` (the lmdif pair's loop: forward differences, maxfev 200 (P + 1)
   counting them, so about 200 iterations where steepest's limit allows 400).

Usage (from the repository root)::

    python benchmarks/fit_speed.py --data ../shared/data/nist-strd \
        --out benchmarks/results/fit_speed.json

The machine's load (``os.getloadavg``) and the torch thread count go into the JSON: on a shared
machine the absolute times are noisy, the ratios less so.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import scipy
import torch
from scipy import optimize as sopt

import steepest

D = torch.float64
HERE = Path(__file__).resolve().parent


def _nist():
    spec = importlib.util.spec_from_file_location("bench_nist", HERE / "nist.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_nist"] = module
    spec.loader.exec_module(module)
    return module


def timed(fn, repeats: int) -> tuple[list[float], object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def summary(times: list[float]) -> dict:
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "repeats": len(times),
    }


def speedups(ref_t: list[float], ours_t: list[float]) -> dict:
    """scipy's times over ours, repeat by repeat: the ratio of the medians, each repeat's ratio,
    and their median (each pair ran within seconds, in one phase of a VM whose speed drifts;
    the ratio of the medians mixes phases)."""
    pairs = [r / o for r, o in zip(ref_t, ours_t, strict=True)]
    return {
        "speedup_median": statistics.median(ref_t) / statistics.median(ours_t),
        "speedups": pairs,
        "speedup_per_pair_median": statistics.median(pairs),
    }


def decay_data(b: int, n: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 5, n, dtype=D)
    a = 1 + torch.rand(b, 1, generator=g, dtype=D)
    k = 0.3 + 2 * torch.rand(b, 1, generator=g, dtype=D)
    c = torch.rand(b, 1, generator=g, dtype=D)
    y = a * torch.exp(-k * t) + c + 0.01 * torch.randn(b, n, generator=g, dtype=D)
    return t, y


def decay(x, a, b, c):
    return a * torch.exp(-b * x) + c


def decay_jac(x, a, b, c):
    e = torch.exp(-b * x)
    return torch.stack([e, -a * x * e, torch.ones_like(e)], -1)


def decay_np(x, a, b, c):
    return a * np.exp(-b * x) + c


def decay_jac_np(x, a, b, c):
    e = np.exp(-b * x)
    return np.stack([e, -a * x * e, np.ones_like(x)], -1)


P0 = [1.0, 1.0, 0.0]


def bench_single(repeats: int, engines: list[str]) -> dict:
    t, y = decay_data(1)
    tn, yn = t.numpy(), y[0].numpy()
    out, times = {}, {e: [] for e in engines}
    times["scipy"] = []
    for _ in range(repeats):  # interleaved
        for e in engines:
            dt, (popt, _) = timed(lambda e=e: steepest.curve_fit(decay, t, y[0], P0, engine=e), 1)
            times[e] += dt
        dt, (ref, _) = timed(lambda: sopt.curve_fit(decay_np, tn, yn, P0), 1)
        times["scipy"] += dt
    scipy_t = statistics.median(times["scipy"])
    for e in engines:
        out[e] = {
            **summary(times[e]),
            "ratio_to_scipy_median": statistics.median(times[e]) / scipy_t,
        }
    out["scipy"] = summary(times["scipy"])
    out["max_abs_popt_diff"] = float(np.abs(popt.numpy() - ref).max())
    return out


def bench_nist(data: Path, names: list[str], repeats: int, engine: str = "torch") -> dict:
    nist = _nist()
    out = {}
    for name in names:
        problem = nist.parse(data / f"{name}.dat")
        for start in (1, 2):
            f = nist.formula_of(problem)
            x, y = nist.tensors(problem)
            y1 = y[:, 0]
            b0 = torch.tensor(problem.starts[start - 1], dtype=D)

            def ours(f=f, x=x, y1=y1, b0=b0):  # with scipy's tolerances: like with like
                return steepest.least_squares(
                    lambda b: f(b, x) - y1, b0, ftol=1e-8, max_nfev=100 * len(b0), engine=engine
                )

            ours_t, res = timed(ours, repeats)
            ref_t, ref = timed(lambda p=problem, s=start: nist.fit_scipy(p, s, "scipy-lm"), repeats)
            out[f"{name}-{start}"] = {
                "steepest": summary(ours_t),
                "scipy": summary(ref_t),
                "ratio_median": statistics.median(ours_t) / statistics.median(ref_t),
                "nfev": {"steepest": res.nfev, "scipy": ref.evaluations},
                "lre": {
                    "steepest": nist.lre(res.x.tolist(), problem.certified, nist._cap(problem)),
                    "scipy": ref.lre,
                },
            }
    return out


def bench_batched(b: int, repeats: int, engines: list[str]) -> dict:
    t, y = decay_data(b)
    p0 = torch.tensor([P0] * b, dtype=D)
    tn, yn = t.numpy(), y.numpy()
    n_max = {"lmder": 100 * (len(P0) + 1), "lmdif": 200 * (len(P0) + 1)}
    n_max["lmder-jac"] = n_max["lmder"]  # scipy's side: the lmder loop of the same repeat

    def ours(kind, engine):
        jac = decay_jac if kind == "lmder-jac" else None
        return steepest.curve_fit(
            decay, t, y, p0, jac=jac, full_output=True, max_nfev=n_max[kind], engine=engine
        )

    def scipy_loop(kind):
        jac = decay_jac_np if kind == "lmder" else None
        out = np.full((b, 3), np.nan)
        for i in range(b):
            try:
                out[i] = sopt.curve_fit(decay_np, tn, yn[i], P0, jac=jac)[0]
            except RuntimeError:  # "Optimal parameters not found": counted below
                pass
        return out

    result = {"B": b, "N": y.shape[1]}
    times = {k: {"scipy_loop": [], **{e: [] for e in engines}} for k in n_max}
    fits, refs = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the batch names its failed fits in a warning
        for _ in range(repeats):  # interleaved, so that all see the same load
            for kind in n_max:
                for e in engines:
                    dt, (popt, _, res) = timed(lambda k=kind, e=e: ours(k, e), 1)
                    times[kind][e] += dt
                    fits[kind, e] = popt, res
                if kind == "lmder-jac":
                    times[kind]["scipy_loop"] = times["lmder"]["scipy_loop"]
                    refs[kind] = refs["lmder"]
                    continue
                dt, refs[kind] = timed(lambda k=kind: scipy_loop(k), 1)
                times[kind]["scipy_loop"] += dt
    for kind in n_max:
        ref, ref_t = refs[kind], times[kind]["scipy_loop"]
        result[kind] = {
            "max_nfev": n_max[kind],
            "steepest_call": "curve_fit(jac=torch Jacobian)"
            if kind == "lmder-jac"
            else "curve_fit() (autograd Jacobian)",
            "scipy_call": "curve_fit()" if kind == "lmdif" else "curve_fit(jac=numpy Jacobian)",
            "scipy_loop": summary(ref_t),
            "scipy_success": int(np.isfinite(ref).all(1).sum()),
        }
        for e in engines:
            popt, res = fits[kind, e]
            ours_t = times[kind][e]
            both = res.success.numpy() & np.isfinite(ref).all(1)
            result[kind][e] = {
                **summary(ours_t),
                **speedups(ref_t, ours_t),
                "success": int(res.success.sum()),
                "nfev_mean": float(res.nfev.float().mean()),
                "nfev_max": int(res.nfev.max()),
                "fits_at_max_nfev": int((res.status == 0).sum()),
                "failed_in_both": int((~res.success.numpy() & ~np.isfinite(ref).all(1)).sum()),
                "max_abs_popt_diff_both_succeeded": float(np.abs(popt.numpy() - ref)[both].max()),
            }
        res = fits[kind, engines[0]][1]
        floor = bench_floor(t, y, res, repeats, kind == "lmder-jac")
        floor["speedup_bound"] = statistics.median(ref_t) / floor["median_s"]
        floor["speedup_bound_no_qr"] = statistics.median(ref_t) / floor["no_qr_median_s"]
        result[kind]["floor"] = floor
        # the tail: the fits that ran to max_nfev, alone (max_nfev - 1 sequential iterations)
        tail = (res.status == 0).nonzero().squeeze(-1)
        if not tail.numel():
            continue
        result[kind]["tail"] = {"B": int(tail.numel()), "indices": tail.tolist()}
        for e in engines:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tail_t, _ = timed(
                    lambda k=kind, i=tail, e=e: steepest.curve_fit(
                        decay,
                        t,
                        y[i],
                        p0[i],
                        jac=decay_jac if k == "lmder-jac" else None,
                        max_nfev=n_max[k],
                        engine=e,
                    ),
                    repeats,
                )
            result[kind]["tail"][e] = {
                **summary(tail_t),
                "ms_per_iteration_median": 1e3 * statistics.median(tail_t) / (n_max[kind] - 1),
            }
    # each library's default call, as a new user times it: steepest's curve_fit(f, x, Y, p0)
    # (the autograd Jacobian, max_nfev 100 (P + 1): the lmder pair's run) against the loop of
    # scipy's curve_fit(f, x, y, p0) (lmdif: the lmdif pair's loop), from the same repeats
    ref_t = times["lmdif"]["scipy_loop"]
    result["defaults"] = {
        "steepest_call": "curve_fit(f, x, Y, p0) (the lmder pair's run)",
        "scipy_call": "curve_fit(f, x, y, p0) (the lmdif pair's loop)",
        "scipy_loop": summary(ref_t),
    }
    for e in engines:
        ours_t = times["lmder"][e]
        result["defaults"][e] = {**summary(ours_t), **speedups(ref_t, ours_t)}
    return result


def bench_floor(
    t: torch.Tensor, y: torch.Tensor, res, repeats: int, analytic: bool = False
) -> dict:
    """A lower bound for any batched implementation of the same fits in eager torch that
    factors J by Householder QR: for each evaluation i, on the fits that made more than i
    evaluations (``res.nfev``), one evaluation of the residuals, and on the fits that took
    more than i Jacobians (``res.njev``), the Jacobian (the fit's own route: pointwise
    autograd, or ``decay_jac`` when ``analytic``) and one Householder QR of [J f]; nothing
    else (no SVD, lmpar, tests, bookkeeping). The row sets are made before the clock starts.
    The same without the QR (``no_qr_*``): what is left when the factorisation is free."""
    from steepest.fit.curve import _pointwise_jac

    def resid(pp, xx, yy, ss):
        return resid_cols(pp.unbind(-1), xx, yy, ss)

    def resid_cols(cols, xx, yy, ss):
        return decay(xx, *cols) - yy

    x = res.x
    sets, last = [], None
    for i in range(int(res.nfev.max())):
        rf = (res.nfev > i).nonzero().squeeze(-1)
        rj = (res.njev > i).nonzero().squeeze(-1)
        key = (rf.numel(), rj.numel())
        if key != last:  # one gather per distinct set, outside the clock
            item = (x[rf].unsqueeze(-2), y[rf], x[rj], y[rj])
            last = key
        sets.append(item)

    def run(qr: bool = True):
        for xf, yf, xj, yj in sets:
            f = resid(xf, t, yf, None)
            if xj.shape[0]:
                if analytic:
                    j = decay_jac(t, *xj.unsqueeze(-2).unbind(-1))
                else:
                    j = _pointwise_jac(resid_cols, xj, (t, yj, None))
                if qr:
                    torch.linalg.qr(torch.cat([j, yj[..., None]], -1), mode="r")  # f: any column
        return f

    times, _ = timed(run, repeats)
    bare, _ = timed(lambda: run(False), repeats)
    return {
        "iterations": len(sets),
        "jacobian": "decay_jac" if analytic else "pointwise autograd",
        **summary(times),
        **{f"no_qr_{k}": v for k, v in summary(bare).items()},
    }


def batch_cli(ap: argparse.ArgumentParser, argv: list[str] | None):
    """The options of the scripts that time the batched fit against itself (``fit_ab.py``,
    ``fit_parts.py``): ``--batch``, ``--repeats``, ``--threads``, ``--out``, ``--note``; sets
    torch's and numba's threads and makes the decay batch. Returns (args, t, y, p0)."""
    import numba

    ap.add_argument("--batch", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1, help="torch's and numba's threads")
    ap.add_argument("--out", default=None)
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    t, y = decay_data(args.batch)
    return args, t, y, torch.tensor([P0] * args.batch, dtype=D)


def write_result(result: dict, out: str | None) -> None:
    """The load at the end into ``result["machine"]``, and the result as JSON to ``out``."""
    result["machine"]["loadavg_end"] = os.getloadavg()
    if out:
        Path(out).write_text(json.dumps(result, indent=1) + "\n")


def machine(threads: int, note: str) -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "scipy": scipy.__version__,
        "torch_threads": threads,
        "cpu_count": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "note": note,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=None, help="folder of the NIST StRD .dat files")
    ap.add_argument(
        "--nist", default="Misra1a,Thurber,MGH09,Lanczos3", help="NIST problems to time"
    )
    ap.add_argument("--batch", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-repeats", type=int, default=3, help="repeats of the 10,000 fits")
    ap.add_argument("--threads", type=int, default=1, help="torch's and numba's threads")
    ap.add_argument(
        "--engines", default="torch,numba", help="least_squares' engines to time, comma-separated"
    )
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--note", default="", help="what else ran on the machine (goes into the JSON with the load)"
    )
    args = ap.parse_args(argv)
    engines = args.engines.split(",")
    torch.set_num_threads(args.threads)
    if "numba" in engines:
        import numba

        numba.set_num_threads(args.threads)
    info = machine(args.threads, args.note)
    # warm-up: the first torch.func calls import and trace (reverse mode for small batches,
    # forward mode for large ones), the first compiled fit imports numba and loads its kernels
    # (timed: once per process); not part of any other timing
    for e in engines:
        t0 = time.perf_counter()
        for b in (1, 4, 128, 512):
            t, y = decay_data(b)
            steepest.curve_fit(
                decay,
                t,
                y[0] if b == 1 else y,
                P0 if b == 1 else torch.tensor([P0] * b, dtype=D),
                engine=e,
            )
        info[f"warm_up_s_{e}"] = time.perf_counter() - t0
    result = {"machine": info, "engines": engines, "single": bench_single(args.repeats, engines)}
    print("single fit:", json.dumps(result["single"]))
    if args.data:
        result["nist"] = {
            e: bench_nist(Path(args.data), args.nist.split(","), args.repeats, e) for e in engines
        }
        for e, rows in result["nist"].items():
            for k, v in rows.items():
                print(f"NIST {k} ({e}): ratio {v['ratio_median']:.2f}, nfev {v['nfev']}")
    result["batched"] = bench_batched(args.batch, args.batch_repeats, engines)
    for kind in ("lmder", "lmder-jac", "lmdif"):
        v = result["batched"][kind]
        for e in engines:
            print(
                f"batched {kind} ({e}): steepest {v[e]['median_s']:.3f} s, scipy loop "
                f"{v['scipy_loop']['median_s']:.3f} s, speedup {v[e]['speedup_median']:.2f}x "
                f"(per pair {v[e]['speedup_per_pair_median']:.2f}x); "
                f"tail {v.get('tail', {}).get(e, {}).get('ms_per_iteration_median', math.nan):.2f}"
                f" ms/iteration"
            )
        print(
            f"  floor {v['floor']['median_s']:.3f} s (bound {v['floor']['speedup_bound']:.1f}x; "
            f"without the QR {v['floor']['no_qr_median_s']:.3f} s, "
            f"{v['floor']['speedup_bound_no_qr']:.1f}x)"
        )
    v = result["batched"]["defaults"]
    for e in engines:
        print(
            f"batched defaults ({e}): steepest {v[e]['median_s']:.3f} s, scipy loop "
            f"{v['scipy_loop']['median_s']:.3f} s, speedup {v[e]['speedup_median']:.2f}x "
            f"(per pair {v[e]['speedup_per_pair_median']:.2f}x)"
        )
    result["machine"]["loadavg_end"] = os.getloadavg()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

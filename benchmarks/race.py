"""Races (issue 10): time to a target training loss, K-FAC against tuned Adam, SGD with momentum,
Shampoo and SOAP (pytorch-optimizer), on three problems.

Problems
--------
- ``autoencoder``: Martens' classic second-order benchmark scaled to scikit-learn's digits
  (1797 images of 8x8, pixels / 16): 64-256-128-32-128-256-64, sigmoid hidden units, logistic
  output units, binary cross-entropy summed over pixels and averaged over images
  (``steepest.BCEWithLogits``), full batch, float32. Its first plateau (loss ~27.1) is the mean
  image; leaving it takes thousands of first-order steps.
- ``cnn``: the digits CNN of the issue (conv 1->8 3x3, ReLU, conv 8->16 3x3, ReLU, 2x2 average
  pooling, linear 256->10; 3,818 parameters), cross-entropy, mini-batches of 64 drawn with the
  run's seed, float32; the training loss is the full training set's (1797 images).
- ``regression``: the regression problem of ``benchmarks/training.py`` (MLP 4-32-32-1 tanh, 512
  samples of a smooth function plus noise, MSE l = |y - z|^2 / 2), full batch, float64.

Methods
-------
- Baselines (``torch.optim``; pytorch-optimizer's ``Shampoo`` and ``SOAP``): Adam, SGD with
  momentum 0.9, Shampoo (``preconditioning_compute_steps=10``, other settings its defaults),
  SOAP (``weight_decay=0``: a race on the training loss; other settings its defaults). Each is
  *tuned*: its learning rate is searched on seed 0 over a grid with a short budget (``--tune``
  of the race's), the lowest final training loss wins; grid, trials and choice are written into
  the JSON.
- ``K-FAC (defaults)``: ``steepest.Optimizer(model, loss, metric=steepest.KFAC(),
  damping=steepest.LevenbergMarquardt())``: every setting the library's default (the
  Monte-Carlo Fisher with one sampled label, K-FAC's own T_cov/T_inv/ema, the initial lambda of
  Levenberg-Marquardt, lr 1, ``solver="auto"``, i.e. the per-block inverse).
- ``K-FAC (tuned damping)``: the same with the initial lambda of Levenberg-Marquardt searched on
  the same grid budget as the baselines (the lowest final loss wins).
- ``K-FAC (rescale=momentum; tuned damping)``: ``KFAC(rescale="momentum")``, Martens & Grosse's
  section 7 (the step and the previous one combined by the exact quadratic model of the Fisher:
  two Jacobian-vector products a step), initial lambda tuned likewise.
- ``K-FAC full batch T=1 (rescale=momentum; tuned damping)``: the same with the schedule the
  ``KFAC`` docstring gives for deterministic full-batch problems,
  ``KFAC(rescale="momentum", ema=None, T_cov=1, T_inv=1)`` (no running average, factors and
  eigendecompositions at every step); ``T=2``: ``T_cov=T_inv=2``, every other step;
  ``stats_batch=N/2``: the factors of every step from a random half of the batch
  (``KFAC(stats_batch=k)``, k in the problem's ``stats_batch``).
- ``K-FAC full batch T=1 factored damping (...)``: the T=1 row with ``damping="factored"``,
  Martens & Grosse's factored Tikhonov damping (A + pi sqrt(lambda) I) (x) (G + sqrt(lambda)/pi
  I) (section 6.3), its damped factors inverted by Cholesky at each try's
  lambda instead of twelve eigendecompositions; ``stats_batch=N/2``: with the factors from half
  the batch as above.
- ``K-FAC Preconditioner + SGD (momentum 0.9; tuned lr)``: the Preconditioner mode
  (``steepest.Preconditioner(model, loss)`` at its defaults: ``KFAC(damping="factored")``,
  lambda 1e-3) preconditioning ``.grad`` after ``loss.backward()``, then
  ``torch.optim.SGD(momentum=0.9)``, its learning rate tuned like the baselines'.

Figures
-------
Every run has the same budget of its own step time, by default on the process's CPU clock
(``time.process_time`` around ``step``, one torch thread: on a machine shared by several jobs a
run is not charged for waiting for a core; ``--clock wall`` for ``time.perf_counter``); both
clocks are recorded and both ratios reported. The full training loss is evaluated outside the
timer, after every step up to 50 and
then at log-spaced steps, ratio 1.05, and at the end). The target of a problem is tuned Adam's
final training loss on its worst seed (so every seed of tuned Adam reaches it); each row gets the
median over seeds of its time to the target with its range (a seed that does not reach it counts
as infinitely slow), and the ratio of that median to tuned Adam's. The goal of the issue: K-FAC
at most 0.5x tuned Adam's time on the autoencoder, and ahead of Shampoo/SOAP.

The machine is shared: ``torch.set_num_threads(1)`` (``--threads``), rows interleaved seed by
seed so that a slow spell spreads over the rows, and ``os.getloadavg()`` recorded before and after
every run; read ratios, not seconds. ``--reuse FILE`` keeps the rows of an earlier run (same
problems, seeds, budget, clock) that are not in ``--rows``: e.g. rerun only the K-FAC rows after
a change of the library, against the same baselines.

Usage::

    python benchmarks/race.py --problems autoencoder --budget 15 --tune 4 --seeds 3 \
        --out benchmarks/results/race_autoencoder.json
    python benchmarks/race.py --markdown benchmarks/results/race_autoencoder.json

Never run by the test suite.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import steepest  # noqa: E402
from steepest.losses import MSE, BCEWithLogits, CrossEntropy  # noqa: E402

KEEP_RATIO = 1.05  # curve points: every step up to 50, then one per factor 1.05 in steps
CLOCK = {"clock": "cpu"}  # the clock of budgets and times to target: "cpu" or "wall" (--clock)


# ---------------------------------------------------------------------------------- problems
def _digits(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=dtype) / 16.0
    return x, torch.tensor(data.target, dtype=torch.long)


def autoencoder_problem() -> dict:
    x, _ = _digits(torch.float32)
    sizes = [64, 256, 128, 32, 128, 256, 64]

    def model(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1]))
            if i < len(sizes) - 2:
                layers.append(nn.Sigmoid())
        return nn.Sequential(*layers)

    return {
        "name": "autoencoder",
        "x": x,
        "y": x,
        "model": model,
        "loss": BCEWithLogits(),
        "batch": None,
        "description": "digits autoencoder 64-256-128-32-128-256-64, sigmoid hidden, logistic "
        "outputs, binary cross-entropy (sum over pixels), 1797 images, full batch, float32",
        "adam": (3e-3, 1e-2, 3e-2),
        "sgd": (0.1, 0.3, 1.0),
        "shampoo": (3e-4, 1e-3, 3e-3),
        "soap": (1e-3, 3e-3, 1e-2),
        "kfac_damping": (1e-3, 1e-1, 1e1),
        "stats_batch": 900,  # about half the batch
        "pre_lr": (0.03, 0.1, 0.3),
    }


def cnn_problem() -> dict:
    x, y = _digits(torch.float32)
    x = x.reshape(-1, 1, 8, 8)

    def model(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(256, 10),
        )

    return {
        "name": "cnn",
        "x": x,
        "y": y,
        "model": model,
        "loss": CrossEntropy(),
        "batch": 64,
        "description": "digits CNN (conv 1-8-16 3x3, ReLU, 2x2 average pooling, linear 256-10; "
        "3,818 parameters), cross-entropy, mini-batches of 64, float32",
        "adam": (1e-2, 3e-2, 1e-1),
        "sgd": (0.03, 0.1, 0.3),
        "shampoo": (1e-2, 3e-2, 1e-1),
        "soap": (3e-3, 1e-2, 3e-2),
        "kfac_damping": (1e-3, 1e-1, 1e1),
        "stats_batch": 32,  # half the mini-batch
        "pre_lr": (0.03, 0.1, 0.3),
    }


def regression_problem() -> dict:
    dt = torch.float64
    g = torch.Generator().manual_seed(0)
    x = torch.rand(512, 4, generator=g, dtype=dt) * 4 - 2
    y = (
        torch.sin(x[:, :1] * x[:, 1:2])
        + 0.5 * torch.cos(2 * x[:, 2:3])
        - 0.3 * x[:, 3:4] ** 2
        + 0.05 * torch.randn(512, 1, generator=g, dtype=dt)
    )

    def model(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1)
        ).to(dt)

    return {
        "name": "regression",
        "x": x,
        "y": y,
        "model": model,
        "loss": MSE(),
        "batch": None,
        "description": "MLP 4-32-32-1 tanh, 512 samples, MSE, full batch, float64 (the "
        "regression problem of benchmarks/training.py)",
        "adam": (1e-2, 3e-2, 1e-1),
        "sgd": (0.1, 0.3, 1.0),
        "shampoo": (1e-2, 3e-2, 1e-1),
        "soap": (1e-2, 3e-2, 1e-1),
        "kfac_damping": (1e-3, 1e-1, 1e1),
        "stats_batch": 256,  # half the batch
        "pre_lr": (0.03, 0.1, 0.3),
    }


PROBLEMS: dict[str, Callable[[], dict]] = {
    "autoencoder": autoencoder_problem,
    "cnn": cnn_problem,
    "regression": regression_problem,
}


# ---------------------------------------------------------------------------------- steppers
def _torch_opt(kind: str, params, lr: float):
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    from pytorch_optimizer import SOAP, Shampoo

    if kind == "shampoo":
        return Shampoo(params, lr=lr, preconditioning_compute_steps=10)
    if kind == "soap":
        return SOAP(params, lr=lr, weight_decay=0.0)
    raise ValueError(kind)


# the K-FAC rows' metric settings (every other setting the library's default); the schedule
# of a deterministic full-batch problem (``KFAC`` docstring, "Full-batch problems"): no running
# average, factors and eigendecompositions of every (or every other) step
FULL = {"ema": None, "T_cov": 1, "T_inv": 1}
KFAC_KINDS: dict[str, Callable[[dict], dict]] = {
    "kfac": lambda prob: {},
    "kfac-momentum": lambda prob: {"rescale": "momentum"},
    "kfac-full": lambda prob: {"rescale": "momentum", **FULL},
    "kfac-full2": lambda prob: {"rescale": "momentum", "ema": None, "T_cov": 2, "T_inv": 2},
    "kfac-full-half": lambda prob: {
        "rescale": "momentum",
        **FULL,
        "stats_batch": prob["stats_batch"],
    },
    # Martens & Grosse's factored Tikhonov damping: the damped factors inverted by Cholesky
    "kfac-full-fact": lambda prob: {"rescale": "momentum", **FULL, "damping": "factored"},
    "kfac-full-fact-half": lambda prob: {
        "rescale": "momentum",
        **FULL,
        "damping": "factored",
        "stats_batch": prob["stats_batch"],
    },
}


def make_stepper(kind: str, value: float | None, model: nn.Module, prob: dict):
    """A function ``step(x, y)`` doing one step of method ``kind`` on ``model``."""
    loss = prob["loss"]
    if kind in KFAC_KINDS:
        damping = (
            steepest.LevenbergMarquardt()
            if value is None
            else (steepest.LevenbergMarquardt(init=value))
        )
        metric = steepest.KFAC(**KFAC_KINDS[kind](prob))
        opt = steepest.Optimizer(model, loss, metric=metric, damping=damping)
        return lambda x, y: opt.step(x, y)
    if kind in ("kfac-pre", "kfac-pre-kl"):  # .grad <- K-FAC^-1 .grad, then torch.optim
        sgd = torch.optim.SGD(model.parameters(), lr=value, momentum=0.9)
        # KFAC(damping="factored"), lambda 1e-3; kfac-pre-kl: the step's KL bounded by 1e-3
        clip = {"kl_clip": 1e-3, "lr": sgd} if kind == "kfac-pre-kl" else {}
        pre = steepest.Preconditioner(model, loss, **clip)

        def pre_step(x, y):
            sgd.zero_grad()
            loss.value(model(x), y).mean().backward()
            pre.step(x, y)
            sgd.step()

        return pre_step
    topt = _torch_opt(kind, model.parameters(), value)

    def step(x, y):
        topt.zero_grad()
        loss.value(model(x), y).mean().backward()
        topt.step()

    return step


def full_loss(model: nn.Module, prob: dict) -> float:
    with torch.no_grad():
        return float(prob["loss"].value(model(prob["x"]), prob["y"]).mean())


def run_one(prob: dict, kind: str, value: float | None, seed: int, budget: float) -> dict:
    """One run: steps until ``budget`` seconds of step time on the race's clock; the curve
    (step, wall time, CPU time, loss)."""
    model = prob["model"](seed)
    stepper = make_stepper(kind, value, model, prob)
    gen = torch.Generator().manual_seed(seed + 1)
    n = prob["x"].shape[0]
    load0 = os.getloadavg()
    steps, spent, cpu, loss = 0, 0.0, 0.0, full_loss(model, prob)
    curve = {"step": [0], "time": [0.0], "cpu_time": [0.0], "loss": [loss]}
    next_keep, error = 1, None

    def used() -> float:
        return cpu if CLOCK["clock"] == "cpu" else spent

    while used() < budget:
        if prob["batch"]:
            idx = torch.randint(0, n, (prob["batch"],), generator=gen)
            bx, by = prob["x"][idx], prob["y"][idx]
        else:
            bx, by = prob["x"], prob["y"]
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            stepper(bx, by)
        except (steepest.errors.SteepestError, torch.linalg.LinAlgError) as err:  # recorded
            error = f"{type(err).__name__}: {err}"
            break
        spent += time.perf_counter() - t0
        cpu += time.process_time() - c0
        steps += 1
        if steps >= next_keep or used() >= budget:
            loss = full_loss(model, prob)
            curve["step"].append(steps)
            curve["time"].append(spent)
            curve["cpu_time"].append(cpu)
            curve["loss"].append(loss)
            next_keep = steps + 1 if steps < 50 else max(steps + 1, int(steps * KEEP_RATIO))
            if not math.isfinite(loss):
                error = "the training loss became NaN or infinite"
                break
    return {
        "seed": seed,
        "value": value,
        "steps": steps,
        "time": spent,
        "cpu_time": cpu,
        "final_loss": curve["loss"][-1] if not error else math.nan,
        "error": error,
        "load_before": load0,
        "load_after": os.getloadavg(),
        "curve": curve,
    }


def time_to(curve: dict, target: float, clock: str | None = None) -> float | None:
    """The step time (on ``clock``, default the race's) after which the loss is <= target."""
    key = "cpu_time" if (clock or CLOCK["clock"]) == "cpu" else "time"
    for t, v in zip(curve[key], curve["loss"]):
        if v is not None and v <= target:
            return t
    return None


def _final(r: dict) -> float:
    v = r["final_loss"]
    return v if v is not None and math.isfinite(v) else math.inf


# ---------------------------------------------------------------------------------- the race
ROWS = {  # row name -> (kind, tuned key: "lr" / "damping" / None)
    "Adam": ("adam", "lr"),
    "SGD (momentum 0.9)": ("sgd", "lr"),
    "Shampoo": ("shampoo", "lr"),
    "SOAP": ("soap", "lr"),
    "K-FAC (defaults)": ("kfac", None),
    "K-FAC (tuned damping)": ("kfac", "damping"),
    "K-FAC (rescale=momentum; tuned damping)": ("kfac-momentum", "damping"),
    # "full batch T=k": ema=None, T_cov=T_inv=k (names without commas: --rows splits on them)
    "K-FAC full batch T=1 (rescale=momentum; tuned damping)": ("kfac-full", "damping"),
    "K-FAC full batch T=2 (rescale=momentum; tuned damping)": ("kfac-full2", "damping"),
    "K-FAC full batch T=1 stats_batch=N/2 (rescale=momentum; tuned damping)": (
        "kfac-full-half",
        "damping",
    ),
    "K-FAC full batch T=1 factored damping (rescale=momentum; tuned damping)": (
        "kfac-full-fact",
        "damping",
    ),
    "K-FAC full batch T=1 factored damping stats_batch=N/2 (rescale=momentum; tuned damping)": (
        "kfac-full-fact-half",
        "damping",
    ),
    "K-FAC Preconditioner + SGD (momentum 0.9; tuned lr)": ("kfac-pre", "lr"),
    "K-FAC Preconditioner kl_clip=1e-3 + SGD (momentum 0.9; tuned lr)": ("kfac-pre-kl", "lr"),
}
GRID_KEY = {
    "adam": "adam",
    "sgd": "sgd",
    "shampoo": "shampoo",
    "soap": "soap",
    "kfac": "kfac_damping",
    "kfac-momentum": "kfac_damping",
    "kfac-full": "kfac_damping",
    "kfac-full2": "kfac_damping",
    "kfac-full-half": "kfac_damping",
    "kfac-full-fact": "kfac_damping",
    "kfac-full-fact-half": "kfac_damping",
    "kfac-pre": "pre_lr",
    "kfac-pre-kl": "pre_lr",
}


def race(
    prob: dict,
    rows: list[str],
    budget: float,
    tune_budget: float,
    seeds: list[int],
    log: Callable[[str], None],
) -> dict:
    tuning: dict[str, dict] = {}
    chosen: dict[str, float | None] = {}
    for row in rows:
        kind, key = ROWS[row]
        if key is None:
            chosen[row] = None
            continue
        grid = list(prob[GRID_KEY[kind]])
        trials = [run_one(prob, kind, v, seeds[0], tune_budget) for v in grid]
        best = min(trials, key=_final)
        chosen[row] = best["value"]
        tuning[row] = {
            "key": key,
            "grid": grid,
            "budget_s": tune_budget,
            "seed": seeds[0],
            "chosen": best["value"],
            "trials": [
                {
                    "value": t["value"],
                    "final_loss": t["final_loss"],
                    "steps": t["steps"],
                    "error": t["error"],
                }
                for t in trials
            ],
        }
        tried = ", ".join(f"{t['value']:g}: {t['final_loss']:.4g}" for t in trials)
        log(f"  tuned {row}: {key} = {best['value']:g} ({tried})")
    runs: dict[str, list[dict]] = {row: [] for row in rows}
    for seed in seeds:  # interleaved: every row of a seed, then the next seed
        for row in rows:
            r = run_one(prob, ROWS[row][0], chosen[row], seed, budget)
            runs[row].append(r)
            log(
                f"  seed {seed} {row}: final {r['final_loss']:.4f} in {r['steps']} steps "
                f"({r['time']:.1f} s, load {r['load_before'][0]:.1f})"
            )
    return {"tuning": tuning, "chosen": chosen, "runs": runs}


def summarize(res: dict) -> dict:
    """Targets, times to target and ratios to tuned Adam from ``res`` (tuning, chosen, runs)."""
    tuning, chosen, runs = res["tuning"], res["chosen"], res["runs"]
    out = {"tuning": tuning, "chosen": chosen, "rows": {}, "clock": CLOCK["clock"]}
    if "Adam" in runs:
        target = max(_final(r) for r in runs["Adam"])
        out["target"] = target
        adam = {
            c: statistics.median(time_to(r["curve"], target, c) or math.inf for r in runs["Adam"])
            for c in ("cpu", "wall")
        }
        adam_t = adam[CLOCK["clock"]]
        out["adam_time_to_target_s"] = adam
    else:
        target, adam_t = None, None
    for row, rs in runs.items():
        finals = [_final(r) for r in rs]
        entry = {
            "value": chosen[row],
            "final_loss": _spread(finals),
            "steps": _spread([r["steps"] for r in rs]),
            "step_time_ms": _spread([1e3 * r["time"] / max(r["steps"], 1) for r in rs]),
            "step_cpu_ms": _spread([1e3 * r["cpu_time"] / max(r["steps"], 1) for r in rs]),
            "errors": [r["error"] for r in rs if r["error"]],
        }
        if target is not None:
            times = [time_to(r["curve"], target) for r in rs]
            tt = [math.inf if t is None else t for t in times]
            entry["time_to_target_s"] = _spread(tt)
            entry["reached"] = sum(t is not None for t in times)
            med = statistics.median(tt)
            entry["ratio_to_adam"] = med / adam_t if math.isfinite(med) else None
            entry["ratio_spread"] = [
                min(tt) / adam_t if math.isfinite(min(tt)) else None,
                max(tt) / adam_t if math.isfinite(max(tt)) else None,
            ]
            other = "wall" if CLOCK["clock"] == "cpu" else "cpu"
            to = [time_to(r["curve"], target, other) for r in rs]
            mo = statistics.median(math.inf if t is None else t for t in to)
            entry[f"{other}_ratio_to_adam"] = (
                mo / adam[other] if math.isfinite(mo) and math.isfinite(adam[other]) else None
            )
        out["rows"][row] = entry
    out["runs"] = runs
    return out


def _spread(xs: list[float]) -> dict:
    fin = lambda v: v if math.isfinite(v) else None  # noqa: E731
    return {"median": fin(statistics.median(xs)), "min": fin(min(xs)), "max": fin(max(xs))}


# ---------------------------------------------------------------------------------- report
def markdown(res: dict) -> str:
    lines = []
    for name, r in res["problems"].items():
        tgt = r.get("target")
        clock = r.get("clock", "wall")
        other = "wall" if clock == "cpu" else "cpu"
        reused = r.get("reused")
        lines += [
            "",
            f"**{name}**: {r['description']}; budget {r['budget_s']:g} s of {clock} step time "
            f"per run, tuning {r['tune_budget_s']:g} s per grid point on seed {r['seeds'][0]}, "
            f"seeds {r['seeds']}; target = tuned Adam's final loss on its worst seed"
            + (f" = {tgt:.4g}" if tgt is not None else "")
            + "."
            + (
                f" Rows {', '.join(reused['rows'])} from the run of {reused['date']}."
                if reused
                else ""
            ),
            "",
            f"| method | tuned value (grid) | final loss, median [min, max] | steps | {clock} ms "
            f"/ step | time to target ({clock} s), median [min, max] | reached | ratio to Adam "
            f"({clock}) | ratio to Adam ({other}) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row, e in r["rows"].items():
            tune = r["tuning"].get(row)
            grid = ", ".join(f"{v:g}" for v in tune["grid"]) if tune else ""
            val = f"{tune['key']} {tune['chosen']:g} ({grid})" if tune else "-"
            f, st = e["final_loss"], e["steps"]
            ms = e["step_cpu_ms"] if clock == "cpu" else e["step_time_ms"]
            tt = e.get("time_to_target_s", {})

            def num(v, fmt=".4g"):
                return "-" if v is None else format(v, fmt)

            lines.append(
                f"| {row} | {val} | {num(f['median'])} [{num(f['min'])}, {num(f['max'])}] | "
                f"{num(st['median'], '.0f')} | {num(ms['median'], '.1f')} | "
                f"{num(tt.get('median'), '.3g')} [{num(tt.get('min'), '.3g')}, "
                f"{num(tt.get('max'), '.3g')}] | {e.get('reached', '-')}/{len(r['seeds'])} | "
                f"{num(e.get('ratio_to_adam'), '.2f')} | "
                f"{num(e.get(f'{other}_ratio_to_adam'), '.2f')} |"
            )
    return "\n".join(lines)


def combine(base_file: str, new_file: str) -> dict:
    """The rows of ``new_file`` replacing or joining those of ``base_file`` (e.g. the K-FAC
    rows rerun after a change of the library), every problem summarised again."""
    with open(base_file) as f:
        base = json.load(f)
    with open(new_file) as f:
        new = json.load(f)
    meta = {**base["meta"], "combined": {"base": base_file, "new": new_file}}
    meta["combined"]["new_meta"] = new["meta"]
    out = {"meta": meta, "problems": {}}
    CLOCK["clock"] = base["meta"].get("clock", "wall")
    for name, old in base["problems"].items():
        nw = new["problems"].get(name)
        if nw is None:
            out["problems"][name] = old
            continue
        key = ("seeds", "budget_s", "clock")
        if [old.get(k) for k in key] != [nw.get(k) for k in key]:
            raise SystemExit(f"{name}: seeds, budget and clock differ between the two files")
        rows = [r for r in ROWS if r in old["runs"] or r in nw["runs"]]
        src = {r: (nw if r in nw["runs"] else old) for r in rows}
        merged = {
            "tuning": {r: src[r]["tuning"][r] for r in rows if r in src[r]["tuning"]},
            "chosen": {r: src[r]["chosen"][r] for r in rows},
            "runs": {r: src[r]["runs"][r] for r in rows},
        }
        r = summarize(merged)
        r.update({k: old[k] for k in ("description", "budget_s", "tune_budget_s", "seeds")})
        r["rows_from"] = {row: ("new" if src[row] is nw else "base") for row in rows}
        out["problems"][name] = r
    return out


def _clean(o):
    """JSON without NaN/Infinity: non-finite floats become null."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_clean(v) for v in o]
    return o


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", default="autoencoder,cnn,regression")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--budget", type=float, default=60.0, help="seconds of step time per run")
    ap.add_argument(
        "--tune",
        type=float,
        default=None,
        help="seconds per grid point of the tuning (default budget / 4)",
    )
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--markdown", default=None, help="print the tables of a results JSON")
    ap.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="budgets and times on the process's CPU time (default: a shared "
        "machine does not charge a run for waiting) or on wall-clock time",
    )
    ap.add_argument(
        "--combine",
        nargs=2,
        metavar=("BASE", "NEW"),
        default=None,
        help="run nothing: the rows of NEW replace or join those of BASE (same problems, seeds, "
        "budget and clock), summarised again into --out",
    )
    ap.add_argument(
        "--reuse",
        default=None,
        help="a results JSON of the same problems, seeds, budget and clock: its rows "
        "that are not in --rows are kept (e.g. rerun only the K-FAC rows)",
    )
    args = ap.parse_args()
    if args.markdown:
        with open(args.markdown) as f:
            print(markdown(json.load(f)))
        return
    if args.combine:
        combined = combine(*args.combine)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(_clean(combined), f, indent=1)
        print(markdown(combined))
        return
    torch.set_num_threads(args.threads)
    CLOCK["clock"] = args.clock
    reused: dict = {}
    if args.reuse:
        with open(args.reuse) as f:
            reused = json.load(f)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    for r in rows:
        if r not in ROWS:
            raise SystemExit(f"unknown row {r!r}; choose from {', '.join(ROWS)}")
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": " ".join(sys.argv),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_before": os.getloadavg(),
        "note": "shared machine: other jobs ran at the same time; loads per run in 'runs'",
        "clock": args.clock,
    }
    try:
        from importlib import metadata

        import pytorch_optimizer  # noqa: F401

        meta["pytorch_optimizer"] = metadata.version("pytorch_optimizer")
    except ImportError:
        rows = [r for r in rows if ROWS[r][0] not in ("shampoo", "soap")]
        meta["pytorch_optimizer"] = None
    res = {"meta": meta, "problems": {}}
    seeds = list(range(args.seeds))
    tune = args.tune or args.budget / 4
    for name in args.problems.split(","):
        prob = PROBLEMS[name.strip()]()
        print(f"{name}: {prob['description']}", flush=True)
        old = reused.get("problems", {}).get(name)
        keep = [] if old is None else [r for r in old["runs"] if r not in rows]
        if keep:
            same = (old["seeds"], old["budget_s"], old.get("clock", "wall"))
            if same != (seeds, args.budget, CLOCK["clock"]):
                raise SystemExit(
                    f"--reuse {args.reuse}: {name} ran with seeds, budget, clock "
                    f"{same}, not {(seeds, args.budget, CLOCK['clock'])}"
                )
            print(f"  reusing {', '.join(keep)} from {args.reuse}", flush=True)
        new = race(prob, rows, args.budget, tune, seeds, lambda s: print(s, flush=True))
        order = [r for r in ROWS if r in rows or r in keep]
        merged = {
            k: {
                r: (new[k] if r in rows else old[k]).get(r)
                for r in order
                if r in rows or k != "tuning" or r in old[k]
            }
            for k in ("tuning", "chosen", "runs")
        }
        merged["tuning"] = {r: v for r, v in merged["tuning"].items() if v is not None}
        r = summarize(merged)
        if keep:
            r["reused"] = {
                "file": args.reuse,
                "rows": keep,
                "date": reused["meta"]["date"],
                "load_before": reused["meta"]["load_before"],
            }
        r.update(
            description=prob["description"], budget_s=args.budget, tune_budget_s=tune, seeds=seeds
        )
        res["problems"][name] = r
        if args.out:  # after each problem: a crash keeps what finished
            meta["load_after"] = os.getloadavg()
            with open(args.out, "w") as f:
                json.dump(_clean(res), f, indent=1)
    meta["load_after"] = os.getloadavg()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(_clean(res), f, indent=1)
    print(markdown(res))


if __name__ == "__main__":
    main()

"""Training benchmark: steepest's metrics with Levenberg-Marquardt damping against tuned Adam
and L-BFGS, full batch, float64.

Problems
--------
- ``regression``: an MLP 4-32-32-1 (tanh) on 512 samples of a smooth function plus noise,
  loss MSE (l = |y - z|^2 / 2).
- ``digits``: an MLP 64-32-10 (tanh) on scikit-learn's digits (1797 images, pixels / 16),
  loss cross-entropy.

Methods
-------
Every steepest method is ``steepest.Optimizer(model, loss, metric, damping=LM, solver)`` with
``LevenbergMarquardt(init=1e-2, min=1e-8)`` and lr 1, untuned: Identity (gradient descent with
an adaptive step 1/(1+lambda)), GaussNewton, GGN, Fisher, EmpiricalFisher and Hessian (Newton).
Solvers: on the regression ``solver="auto"``, which takes the exact Woodbury solve in sample
space for the Gauss-Newton/Fisher family (R = N = 512 rows < P = 1249) and CG(tol=1e-8,
maxiter=50) for the indefinite Hessian; on digits (R = 17970 > P = 2410) matrix-free
CG(maxiter=30, tol=1e-6). Identity: one CG iteration (exact for (1 + lambda) I).
One more row, ``GGN+LM (TorchOptimizer, CG)``, runs GGN through
:class:`steepest.torch_optim.TorchOptimizer` (the ``step(closure)`` interface of torch.optim,
closure returning (outputs, targets)) with matrix-free CG(maxiter=50, tol=1e-8) on the
regression and CG(30, 1e-6) on digits: the closure graph gives per-sample Jacobians only by N
backward passes, so that interface stays matrix-free.
Every method (baselines too) first makes two untimed steps on a throwaway copy of the model:
the first use of ``torch.func`` in a process imports modules for about 2 s, which is not a
per-step cost.

Baselines, tuned by a grid search on the same problem (the learning rate with the lowest
loss after the iteration budget; ties to the larger rate):
Adam lr in {1e-3, 3e-3, 1e-2, 3e-2, 1e-1}; L-BFGS (history 20, 10 iterations per ``step``
call, strong-Wolfe line search; iterations counted by its ``n_iter``) lr in {0.1, 0.3, 1}.

Target and figures
------------------
The target loss of a problem is the final loss of tuned Adam (so Adam's ratio is 1 by
construction, and a method that never gets there has ratio null). For each method the JSON
records loss against iterations and cumulative wall time of the ``step`` calls (the loss is
evaluated outside the timer), the time and iterations to the target, and the ratio of its time
to Adam's. Each run also stops after a wall-time cap. The load average of the machine is
recorded before and after: timings on a shared machine are noisy.

Usage::

    python benchmarks/training.py --out benchmarks/results/training.json [--quick]
        [--md benchmarks/training.md]
    python benchmarks/training.py --render benchmarks/results/training.json \
        --md benchmarks/training.md      # rewrite the tables only

Never run by the test suite.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import steepest
from steepest.torch_optim import TorchOptimizer

DT = torch.float64
ADAM_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
LBFGS_GRID = (0.1, 0.3, 1.0)
LBFGS_INNER = 10  # L-BFGS iterations per step() call (its line search needs max_eval > 1)
METRICS = ("Identity", "GaussNewton", "GGN", "Fisher", "EmpiricalFisher", "Hessian")


# ----------------------------------------------------------------------------------- problems
def regression_problem() -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(512, 4, generator=g, dtype=DT) * 4 - 2
    y = (torch.sin(x[:, :1] * x[:, 1:2]) + 0.5 * torch.cos(2 * x[:, 2:3]) - 0.3 * x[:, 3:4] ** 2
         + 0.05 * torch.randn(512, 1, generator=g, dtype=DT))

    def model() -> nn.Module:
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                             nn.Linear(32, 1)).to(DT)

    return {"name": "regression", "x": x, "y": y, "model": model, "loss": steepest.MSE(),
            "description": "MLP 4-32-32-1 tanh, 512 samples, MSE, full batch, float64",
            "budget": {"adam": 4000, "lbfgs": 1500, "identity": 4000, "second": 200}}


def digits_problem() -> dict:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=DT) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)

    def model() -> nn.Module:
        torch.manual_seed(2)
        return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).to(DT)

    return {"name": "digits", "x": x, "y": y, "model": model, "loss": steepest.CrossEntropy(),
            "description": "scikit-learn digits (1797 x 64, pixels/16), MLP 64-32-10 tanh, "
                           "cross-entropy, full batch, float64",
            "budget": {"adam": 3000, "lbfgs": 1000, "identity": 3000, "second": 150}}


# ----------------------------------------------------------------------------------- running
def full_loss(problem: dict, model: nn.Module) -> float:
    with torch.no_grad():
        return float(problem["loss"].value(model(problem["x"]), problem["y"]).mean())


def run(problem: dict, make: Callable[[nn.Module], tuple], iters: int, cap_s: float) -> dict:
    """Steps until ``iters`` or ``cap_s`` seconds of step time; loss after every step. Two
    untimed warm-up steps on a throwaway model first (one-time imports and allocations)."""
    spare = problem["model"]()
    opt, closure = make(spare)
    for _ in range(2):
        opt.step(closure)
    model = problem["model"]()
    opt, closure = make(model)
    losses, times, its = [full_loss(problem, model)], [0.0], [0]
    elapsed = 0.0
    failed = None
    lbfgs = isinstance(opt, torch.optim.LBFGS)
    for _ in range(iters // LBFGS_INNER if lbfgs else iters):
        t0 = time.perf_counter()
        try:
            opt.step(closure)
        except Exception as err:  # a method that breaks down is reported, not fatal
            failed = f"{type(err).__name__}: {err}"
            break
        elapsed += time.perf_counter() - t0
        value = full_loss(problem, model)
        losses.append(value if math.isfinite(value) else math.inf)
        times.append(elapsed)
        its.append(opt.state[opt._params[0]]["n_iter"] if lbfgs else its[-1] + 1)
        if not math.isfinite(value) or elapsed > cap_s:
            break
    return {"loss": losses, "time": times, "iteration": its, "failed": failed}


def torch_maker(problem: dict, kind: str, lr: float) -> Callable[[nn.Module], tuple]:
    loss, x, y = problem["loss"], problem["x"], problem["y"]

    def make(model: nn.Module) -> tuple:
        if kind == "adam":
            opt = torch.optim.Adam(model.parameters(), lr=lr)
        else:
            opt = torch.optim.LBFGS(model.parameters(), lr=lr, max_iter=LBFGS_INNER,
                                    history_size=20, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            value = loss.value(model(x), y).mean()
            value.backward()
            return value

        return opt, closure

    return make


def steepest_solver(problem: dict, metric: str):
    if metric == "Identity":
        return steepest.CG(maxiter=1)  # (1 + lambda) I: exact in one iteration
    if problem["name"] != "regression":
        return steepest.CG(maxiter=30, tol=1e-6)
    if metric == "Hessian":
        return steepest.CG(maxiter=50, tol=1e-8)
    return "auto"  # Woodbury in sample space: R = 512 rows < P = 1249


def steepest_maker(problem: dict, metric: str) -> Callable[[nn.Module], tuple]:
    x, y = problem["x"], problem["y"]
    solver = steepest_solver(problem, metric)

    class Closure:  # Optimizer.step(x, y) in the step(closure) loop of run()
        def __init__(self, opt):
            self.opt = opt

        def step(self, closure):
            return self.opt.step(x, y)

    def make(model: nn.Module) -> tuple:
        opt = steepest.Optimizer(model, problem["loss"], metric=getattr(steepest, metric)(),
                                 damping=steepest.LevenbergMarquardt(1e-2, min=1e-8),
                                 solver=solver)
        return Closure(opt), None

    return make


def torch_optimizer_maker(problem: dict, metric: str) -> Callable[[nn.Module], tuple]:
    x, y = problem["x"], problem["y"]
    if problem["name"] == "regression":
        solver = steepest.CG(maxiter=50, tol=1e-8)
    else:
        solver = steepest.CG(maxiter=30, tol=1e-6)

    def make(model: nn.Module) -> tuple:
        opt = TorchOptimizer(model.parameters(), loss=problem["loss"],
                             metric=getattr(steepest, metric)(), lr=1.0,
                             damping=steepest.LevenbergMarquardt(1e-2, min=1e-8),
                             solver=solver)
        return opt, lambda: (model(x), y)

    return make


def first_reach(curve: dict, target: float) -> tuple[float | None, int | None]:
    for i, (value, t) in enumerate(zip(curve["loss"], curve["time"])):
        if value <= target:
            return t, i
    return None, None


def thin(values: list[float], k: int = 300) -> list[float]:
    if len(values) <= k:
        return values
    idx = sorted({round(i * (len(values) - 1) / (k - 1)) for i in range(k)})
    return [values[i] for i in idx]


def benchmark(problem: dict, quick: bool, log: Callable[[str], None]) -> dict:
    scale = 0.1 if quick else 1.0
    cap = 20.0 if quick else 120.0
    budget = {k: max(5, int(v * scale)) for k, v in problem["budget"].items()}
    tuning: dict[str, dict[str, float]] = {}
    runs: dict[str, dict] = {}
    for kind, grid in (("adam", ADAM_GRID), ("lbfgs", LBFGS_GRID)):
        grid = grid[1:4] if quick and kind == "adam" else grid
        best = None
        tuning[kind] = {}
        for lr in grid:
            curve = run(problem, torch_maker(problem, kind, lr), budget[kind], cap)
            final = curve["loss"][-1]
            tuning[kind][f"{lr:g}"] = final
            log(f"  {problem['name']} {kind} lr={lr:g}: final loss {final:.4g}")
            if best is None or final <= best[1]["loss"][-1]:
                best = (lr, curve)
        name = "Adam" if kind == "adam" else "L-BFGS"
        runs[name] = {**best[1], "lr": best[0]}
    for metric in METRICS:
        iters = budget["identity"] if metric == "Identity" else budget["second"]
        curve = run(problem, steepest_maker(problem, metric), iters, cap)
        runs[f"{metric}+LM"] = curve
    runs["GGN+LM (TorchOptimizer, CG)"] = run(problem, torch_optimizer_maker(problem, "GGN"),
                                              budget["second"], cap)
    for name, curve in runs.items():
        if name in ("Adam", "L-BFGS"):
            continue
        log(f"  {problem['name']} {name}: final loss {curve['loss'][-1]:.4g} in "
            f"{curve['time'][-1]:.2f}s, {curve['iteration'][-1]} steps"
            + (f" ({curve['failed']})" if curve["failed"] else ""))
    target = runs["Adam"]["loss"][-1]
    adam_time, _ = first_reach(runs["Adam"], target)
    summary = {}
    for name, curve in runs.items():
        t, i = first_reach(curve, target)
        i = None if i is None else curve["iteration"][i]
        summary[name] = {
            "final_loss": curve["loss"][-1], "iterations": curve["iteration"][-1],
            "time_total_s": curve["time"][-1], "time_to_target_s": t,
            "iterations_to_target": i,
            "ratio_to_adam": None if t is None or not adam_time else t / adam_time,
            "lr": curve.get("lr"), "failed": curve["failed"],
            "curve": {"loss": thin(curve["loss"]), "time": thin(curve["time"]),
                      "iteration": thin(curve["iteration"])},
        }
    baselines = [summary[b]["time_to_target_s"] for b in ("Adam", "L-BFGS")]
    best_baseline = min(t for t in baselines if t is not None)
    goal = {}
    for m in ("GGN+LM", "Fisher+LM"):
        t = summary[m]["time_to_target_s"]
        goal[m] = {"time_to_target_s": t, "best_baseline_s": best_baseline,
                   "faster_than_best_baseline": t is not None and t < best_baseline}
    return {"description": problem["description"],
            "n_params": sum(p.numel() for p in problem["model"]().parameters()),
            "n_samples": int(problem["x"].shape[0]), "budget": budget, "cap_s": cap,
            "target_loss": target, "target_rule": "final loss of tuned Adam",
            "tuning": tuning, "methods": summary, "goal": goal}


# ----------------------------------------------------------------------------------- report
def plot(result: dict, name: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for method, s in result["methods"].items():
        style = "--" if method in ("Adam", "L-BFGS") else "-"
        c = s["curve"]
        axes[0].plot([i + 1 for i in c["iteration"]], c["loss"], style, label=method)
        axes[1].plot([t + 1e-4 for t in c["time"]], c["loss"], style, label=method)
    for ax, xl in zip(axes, ("iteration + 1", "wall time of the steps + 1e-4 (s)")):
        ax.axhline(result["target_loss"], color="k", lw=0.7, ls=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xl)
        ax.set_ylabel("full-batch training loss")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{name}: {result['description']} (dotted: target = tuned Adam's final loss)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(results: dict) -> str:
    lines = []
    for name, r in results["problems"].items():
        lines += [f"**{name}** ({r['description']}; {r['n_params']} parameters; target loss "
                  f"{r['target_loss']:.4g})", "",
                  "| method | final loss | steps | time to target (s) | steps to target | "
                  "time / Adam's |", "|---|---|---|---|---|---|"]
        for method, s in r["methods"].items():
            tt = "-" if s["time_to_target_s"] is None else f"{s['time_to_target_s']:.3f}"
            it = "-" if s["iterations_to_target"] is None else str(s["iterations_to_target"])
            ratio = "not reached" if s["ratio_to_adam"] is None else f"{s['ratio_to_adam']:.3f}"
            label = method + (f" (lr {s['lr']:g})" if s["lr"] is not None else "")
            lines.append(f"| {label} | {s['final_loss']:.4g} | {s['iterations']} | {tt} | "
                         f"{it} | {ratio} |")
        goal = ", ".join(f"{m}: {'yes' if g['faster_than_best_baseline'] else 'no'}"
                         for m, g in r["goal"].items())
        what = ("the goal of issue 4" if name == "regression" else
                "not a goal here; the issue's goal is on the regression")
        lines += ["", f"Reached the target in less wall time than the best of Adam and "
                  f"L-BFGS ({what}): {goal}.", ""]
    m = results["machine"]
    lines.append(f"Machine: {m['processor'] or m['machine']}, {m['cpu_count']} cores, torch "
                 f"{m['torch']} ({m['threads']} threads); load average "
                 f"{m['loadavg_start'][0]:.2f} at the start, {m['loadavg_end'][0]:.2f} at the "
                 f"end. Command: `{results['command']}`.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/training.json")
    parser.add_argument("--quick", action="store_true", help="a tenth of the budget")
    parser.add_argument("--problems", default="regression,digits")
    parser.add_argument("--md", default=None,
                        help="markdown file whose results section to rewrite")
    parser.add_argument("--render", default=None,
                        help="only rewrite the tables of --md from this results JSON")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's choice); 1 is faster "
                             "on a loaded machine")
    args = parser.parse_args(argv)
    if args.render:
        text = table(json.loads(Path(args.render).read_text()))
        print(text)
        if args.md:
            write_md(Path(args.md), text)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"platform": platform.platform(), "machine": platform.machine(),
               "processor": platform.processor(), "cpu_count": os.cpu_count(),
               "threads": torch.get_num_threads(), "python": platform.python_version(),
               "torch": torch.__version__, "loadavg_start": list(os.getloadavg())}
    results = {"command": "python benchmarks/training.py " + " ".join(
        argv if argv is not None else sys.argv[1:]), "quick": args.quick, "machine": machine,
        "problems": {}}
    makers = {"regression": regression_problem, "digits": digits_problem}
    for name in args.problems.split(","):
        problem = makers[name]()
        print(f"{name}: {problem['description']}", flush=True)
        results["problems"][name] = benchmark(problem, args.quick,
                                              lambda s: print(s, flush=True))
        plot(results["problems"][name], name, out.with_name(f"{out.stem}_{name}.png"))
    machine["loadavg_end"] = list(os.getloadavg())
    machine["note"] = ("timings taken with the load average above on a machine shared with "
                       "other jobs when it is above the core count; rerun on a quiet machine "
                       "with the same command for reference figures.")
    out.write_text(json.dumps(results, indent=1))
    text = table(results)
    print(text)
    if args.md:
        write_md(Path(args.md), text)


def write_md(md: Path, text: str) -> None:
    """Replace the results section of the markdown file with ``text``."""
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    body = md.read_text() if md.exists() else f"{start}\n{end}\n"
    head, rest = body.split(start, 1)
    md.write_text(f"{head}{start}\n{text}\n{end}{rest.split(end, 1)[1]}")


if __name__ == "__main__":
    main()

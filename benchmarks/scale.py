"""Curvature at scale (issue 10): the cost of a K-FAC step as a multiple of an Adam step and the
closure path against the module path (time to a target loss: ``benchmarks/race.py``).

Part 1, step cost (float32, random data, one fixed batch): for each model the median time of
one step (after warm-up steps; several repeats) divided by the median time of one Adam step
(zero_grad, forward, backward, update) measured in the same process, interleaved:

- ``mlp``: MLP 784-512-512-10 (ReLU), batch 128, cross-entropy;
- ``cnn``: the digits CNN of the issue (conv 1->8 3x3, ReLU, conv 8->16 3x3, ReLU, 2x2 average
  pooling, linear 256->10; 3,818 parameters), batch 64, 8x8 inputs;
- ``transformer``: 2-layer encoder (d = 128, 4 heads, feed-forward 256, no dropout) on
  sequences of 32 tokens (embedding of 64 tokens), mean pooling, linear to 10 classes, batch 32;
- ``cnn-bn``: the digits CNN with BatchNorm2d after each convolution (training mode).

Rows: ``KFAC`` through ``steepest.Optimizer`` (LevenbergMarquardt, the step evaluates the loss
at the trial point for rho) and through ``steepest.TorchOptimizer`` at the defaults (``KFAC()``:
ema 0.95, T_cov = 10, T_inv = 100), timed over windows of ``--window`` = 100 steps (one
eigendecomposition, ten refreshes), and at T_cov = T_inv = 1 without EMA (windows of 10);
``KFAC preconditioner + SGD`` (the kfac-pytorch pattern: the user's backward, then
``Preconditioner.step``; factored damping, the preconditioner's default), same two settings;
and the peers where installed (``bench`` extra): curvlinops' ``KFACLinearOperator`` + its
inverse and nngeometry's ``PMatKFAC`` + ``solvePVec`` (both rebuilt every step: no running
averages) + SGD, ASDL's ``KfacGradientMaker`` on our schedule + SGD, singd's ``SINGD``.

Part 2, the closure path: one exact-GGN step (LevenbergMarquardt, ``solver="auto"``) on the
digits CNN through ``TorchOptimizer`` and through ``Optimizer``, and with ``CG(maxiter=20)``.

Part 3 (``--parts floor``), the floor of the preconditioner step on the MLP: an Adam step, the
forward + backward, SGD's update and the recorded-rows products alone at the MLP's shapes.

The machine is shared: the load average before and after (and ``uptime``), the torch thread
count and the clock are written into the JSON; read ratios, not seconds. ``--clock cpu`` times
by the thread's CPU time (one torch thread), which keeps other jobs' time slices out of both
the step and the Adam step on a loaded machine; ``--rows`` runs only the rows named.

Usage::

    python benchmarks/scale.py --parts agreement cost closure --repeats 2 \
        --out benchmarks/results/scale.json [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import steepest  # noqa: E402
from steepest.losses import CrossEntropy  # noqa: E402
from steepest.preconditioner import Preconditioner  # noqa: E402


# ---------------------------------------------------------------------------------- models
class Encoder(nn.Module):
    def __init__(self, vocab=64, d=128, classes=10):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 4, 256, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, idx):
        return self.head(self.enc(self.emb(idx)).mean(1))


def digits_cnn(bn: bool = False) -> nn.Module:
    layers = [nn.Conv2d(1, 8, 3, padding=1)]
    layers += [nn.BatchNorm2d(8)] if bn else []
    layers += [nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1)]
    layers += [nn.BatchNorm2d(16)] if bn else []
    layers += [nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(256, 10)]
    return nn.Sequential(*layers)


def problem(name: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name == "mlp":
        model = nn.Sequential(
            nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
        )
        x = torch.randn(128, 784, generator=g)
        y = torch.randint(0, 10, (128,), generator=g)
    elif name in ("cnn", "cnn-bn"):
        model = digits_cnn(bn=name == "cnn-bn")
        x = torch.randn(64, 1, 8, 8, generator=g)
        y = torch.randint(0, 10, (64,), generator=g)
    elif name == "transformer":
        model = Encoder()
        x = torch.randint(0, 64, (32, 32), generator=g)
        y = torch.randint(0, 10, (32,), generator=g)
    else:
        raise ValueError(name)
    return model, x, y


# ---------------------------------------------------------------------------------- steppers
def adam_stepper(model, x, y):
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def kfac_stepper(model, x, y, **kw):
    opt = steepest.Optimizer(
        model,
        CrossEntropy(),
        metric=steepest.KFAC(**kw),
        damping=steepest.LevenbergMarquardt(1.0),
        step=1e-2,
    )
    return lambda: opt.step(x, y)


def kfac_torch_stepper(model, x, y, **kw):
    opt = steepest.TorchOptimizer(
        model.parameters(),
        loss=CrossEntropy(),
        metric=steepest.KFAC(**kw),
        damping=steepest.LevenbergMarquardt(1.0),
        lr=1e-2,
    )
    return lambda: opt.step(lambda: (model(x), y))


def precond_stepper(model, x, y, **kw):
    metric = steepest.KFAC(**{"damping": "factored", **kw})
    pre = Preconditioner(model, CrossEntropy(), metric=metric, damping=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step(x, y)
        opt.step()

    return step


def curvlinops_stepper(model, x, y):
    from curvlinops import KFACInverseLinearOperator, KFACLinearOperator

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        k = KFACLinearOperator(
            model,
            loss_fn,
            params,
            [(x, y)],
            check_deterministic=False,
            fisher_type="mc",
            mc_samples=1,
        )
        inv = KFACInverseLinearOperator(k, damping=1.0)
        grads = [p.grad for p in params]
        new = inv @ grads
        for p, gnew in zip(params, new):
            p.grad.copy_(gnew)
        opt.step()

    return step


def asdl_stepper(model, x, y):
    """ASDL's K-FAC (sampled-label Fisher) at our defaults' schedule: factors every 10 steps
    (EMA weight 0.05 on the new ones: our 0.95), inverses every 100, damping 1, then SGD."""
    import contextlib
    import types

    import asdl.precondition.natural_gradient as asdl_ng
    from asdl import KfacGradientMaker, PreconditioningConfig

    # ASDL wraps its inverse update in torch.cuda.nvtx.range unconditionally, which raises on
    # a CPU build of torch: a no-op range instead (profiling markers only)
    asdl_ng.nvtx = types.SimpleNamespace(range=lambda *a, **k: contextlib.nullcontext())
    cfg = PreconditioningConfig(
        data_size=int(x.shape[0]),
        damping=1.0,
        curvature_upd_interval=10,
        preconditioner_upd_interval=100,
        ema_decay=0.05,
    )
    gm = KfacGradientMaker(model, cfg, fisher_type="fisher_mc")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        opt.zero_grad()
        dummy = gm.setup_model_call(model, x)
        gm.setup_loss_call(F.cross_entropy, dummy, y)
        gm.forward_and_backward()
        opt.step()

    return step


def singd_stepper(model, x, y):
    """singd's SINGD (inverse-free, empirical Fisher, dense factors), its own update every T = 10
    steps (its default)."""
    from singd.optim.optimizer import SINGD

    opt = SINGD(model, lr=1e-3, T=10, warn_unsupported=False)

    def step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def nngeometry_stepper(model, x, y):
    """nngeometry's PMatKFAC of the Fisher (closed-form expectation over the classes: one
    backward per class), rebuilt every step (no running averages), solved with damping 1 by its
    solvePVec, then SGD."""
    from nngeometry.metrics import FIM
    from nngeometry.object import PMatKFAC
    from nngeometry.object.vector import PVector

    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=int(x.shape[0])
    )
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    modules = dict(model.named_modules())

    def step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        fim = FIM(model, loader, PMatKFAC, variant="classif_logits")
        new = fim.solvePVec(PVector.from_model_grad(model), regul=1.0).to_dict()
        for name, parts in new.items():
            module = modules[name]
            module.weight.grad.copy_(parts[0])
            if len(parts) > 1:
                module.bias.grad.copy_(parts[1])
        opt.step()

    return step


CLOCK = time.perf_counter  # --clock cpu: time.thread_time (the process's own CPU time)


def timed(step, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = CLOCK()
        step()
        out.append(CLOCK() - t)
    return out


def step_costs(
    models,
    window: int,
    repeats: int,
    only: list[str] | None = None,
    adam: str = "window",
    seeds: int = 1,
) -> dict:
    """Each row's time per step over ``window`` consecutive steps (amortised: a window of 100
    holds one eigendecomposition and ten factor refreshes at the defaults), divided by Adam's
    time per step measured just before, ``repeats`` times, interleaved. ``adam="window"``:
    Adam's mean over as many consecutive steps as the row's window (the same estimator on both
    sides of the ratio); ``"median5"``: the median of 5 Adam steps (the estimator of the JSONs
    before 2026-11-29, which set a mean, inflated by every interruption of a loaded machine,
    against a median that drops them). ``only``: run the rows whose name contains one of
    these strings. ``seeds``: the whole measurement on models and batches drawn from seeds
    0 .. seeds-1 (median, min and max over seeds x repeats; each seed's median kept)."""
    once = dict(ema=None, T_cov=1, T_inv=1)
    rows = {
        "KFAC (Optimizer, defaults)": kfac_stepper,
        "KFAC (Optimizer, T=1)": lambda m, x, y: kfac_stepper(m, x, y, **once),
        "KFAC (TorchOptimizer, defaults)": kfac_torch_stepper,
        "KFAC preconditioner + SGD (defaults)": precond_stepper,
        "KFAC preconditioner + SGD (T=1)": lambda m, x, y: precond_stepper(m, x, y, **once),
    }
    peers = {
        "curvlinops": ("curvlinops KFAC (rebuilt each step) + SGD", curvlinops_stepper),
        "asdl": ("ASDL KFAC (T_cov=10, T_inv=100, ema) + SGD", asdl_stepper),
        "singd": ("singd SINGD (T=10)", singd_stepper),
        "nngeometry": ("nngeometry PMatKFAC (rebuilt each step) + SGD", nngeometry_stepper),
    }
    for module, (row, make) in peers.items():
        try:
            __import__(module)
        except ImportError:
            continue
        rows[row] = make
    if only:
        rows = {k: v for k, v in rows.items() if any(o in k for o in only)}
    res = {}
    for name in models:
        entry, ratios, adam_t = {}, {}, []
        for seed in range(seeds):
            _seed_costs(name, seed, rows, window, repeats, adam, entry, ratios, adam_t)
        entry["adam_step_s"] = statistics.median(adam_t)
        entry["adam_estimator"] = adam  # per entry: --merge may keep another run's
        entry["seeds"] = seeds
        for row, r in ratios.items():
            if "error" in entry.get(row, {}):
                continue
            flat = [v for per_seed in r.values() for v in per_seed]
            entry[row] = {
                "median": statistics.median(flat),
                "min": min(flat),
                "max": max(flat),
                "repeats": len(flat),
                "seed_medians": {k: statistics.median(v) for k, v in r.items()},
            }
        res[name] = entry
        print(name, json.dumps(entry, indent=1), flush=True)
    return res


def _seed_costs(name, seed, rows, window, repeats, adam, entry, ratios, adam_t) -> None:
    """One seed's model and batch: every row ``repeats`` times, interleaved with Adam; ratios
    appended per row (one list per seed)."""
    model0, x, y = problem(name, seed)
    entry.update(P=sum(p.numel() for p in model0.parameters()), batch=int(x.shape[0]))
    adam_m = copy.deepcopy(model0)
    adam_step = adam_stepper(adam_m, x, y)
    timed(adam_step, 3)
    steppers = {}
    for row, make in rows.items():
        m = copy.deepcopy(model0)
        try:
            steppers[row] = make(m, x, y)
            timed(steppers[row], 2)  # warm-up (torch.func imports, first factors)
        except Exception as err:  # noqa: BLE001 - a peer that cannot run this model
            steppers.pop(row, None)
            entry[row] = {"error": f"{type(err).__name__}: {str(err)[:200]}"}
    for _ in range(repeats):
        for row, st in steppers.items():
            n = 10 if "T=1" in row or "rebuilt" in row else window
            if adam == "median5":
                a = statistics.median(timed(adam_step, 5))
            else:
                a = sum(timed(adam_step, n)) / n
            adam_t.append(a)
            try:
                per_seed = ratios.setdefault(row, {}).setdefault(seed, [])
                per_seed.append(sum(timed(st, n)) / n / a)
            except Exception as err:  # noqa: BLE001 - a peer failing after warm-up
                entry[row] = {"error": f"{type(err).__name__}: {str(err)[:200]}"}
        steppers = {r: s for r, s in steppers.items() if "error" not in entry.get(r, {})}


# ---------------------------------------------------------------------------------- floor
def floor(repeats: int) -> dict:
    """The parts of the preconditioner's floor on the MLP, in ms (medians of 20 timings,
    median over repeats): an Adam step, the user's zero_grad + forward + backward, SGD's
    update, and the recorded-rows products alone at the MLP's shapes ((g G^-1)^T (a A^-1) for
    the 512 x 785 and 512 x 513 blocks, G^-1 X A^-1 for the 10 x 513 head)."""
    model0, x, y = problem("mlp")
    adam = adam_stepper(copy.deepcopy(model0), x, y)
    m = copy.deepcopy(model0)
    sgd = torch.optim.SGD(m.parameters(), lr=1e-3)

    def fwd_bwd():
        sgd.zero_grad()
        F.cross_entropy(m(x), y).backward()

    fwd_bwd()
    g = torch.Generator().manual_seed(0)
    n = int(x.shape[0])
    rows = [(torch.randn(n, 512, generator=g), torch.randn(n, d, generator=g)) for d in (785, 513)]
    invs = [
        (torch.randn(512, 512, generator=g), torch.randn(d, d, generator=g)) for d in (785, 513)
    ]
    head = (torch.randn(10, 10, generator=g), torch.randn(10, 513, generator=g))
    head_a = torch.randn(513, 513, generator=g)

    def products():
        for (gr, ar), (gi, ai) in zip(rows, invs):
            (gr @ gi).T @ (ar @ ai)
        head[0] @ head[1] @ head_a

    parts = {"adam": adam, "fwd_bwd": fwd_bwd, "sgd_update": sgd.step, "products": products}
    got: dict[str, list[float]] = {k: [] for k in parts}
    for _ in range(repeats):
        for k, f in parts.items():
            got[k].append(statistics.median(timed(f, 20)))
    out = {k: 1e3 * statistics.median(v) for k, v in got.items()}
    out["adam_update"] = out["adam"] - out["fwd_bwd"]
    out["floor_in_adam_steps"] = (out["fwd_bwd"] + out["sgd_update"] + out["products"]) / out[
        "adam"
    ]
    print(json.dumps(out, indent=1), flush=True)
    return out


# ---------------------------------------------------------------------------------- closure
def closure_path(repeats: int) -> dict:
    model0, x, y = problem("cnn")
    out = {}

    def opt_step(m, solver):
        o = steepest.Optimizer(
            m,
            CrossEntropy(),
            metric=steepest.GGN(),
            damping=steepest.LevenbergMarquardt(1e-1),
            solver=solver,
        )
        return lambda: o.step(x, y), o

    def torch_step(m, solver):
        o = steepest.TorchOptimizer(
            m.parameters(),
            loss=CrossEntropy(),
            metric=steepest.GGN(),
            damping=steepest.LevenbergMarquardt(1e-1),
            solver=solver,
        )
        return lambda: o.step(lambda: (m(x), y)), o

    cases = {
        "Optimizer auto": opt_step(copy.deepcopy(model0), "auto"),
        "TorchOptimizer auto": torch_step(copy.deepcopy(model0), "auto"),
        "Optimizer CG(maxiter=20)": opt_step(copy.deepcopy(model0), steepest.CG(maxiter=20)),
        "TorchOptimizer CG(maxiter=20)": torch_step(copy.deepcopy(model0), steepest.CG(maxiter=20)),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    for step, _ in cases.values():
        timed(step, 2)
    for _ in range(repeats):
        for k, (step, _) in cases.items():
            times[k] += timed(step, 3)
    for k, (_, o) in cases.items():
        inner = o.steepest if isinstance(o, steepest.TorchOptimizer) else o
        info = o.last_info if isinstance(o, steepest.TorchOptimizer) else None
        out[k] = {
            "median_s": statistics.median(times[k]),
            "min_s": min(times[k]),
            "max_s": max(times[k]),
            "solver": info.solver if info else "",
            "steps": inner.steps,
        }
    base = out["Optimizer auto"]["median_s"]
    for k in out:
        out[k]["ratio_to_Optimizer_auto"] = out[k]["median_s"] / base
    print(json.dumps(out, indent=1), flush=True)
    return out


def agreement() -> dict:
    """Our KFAC against curvlinops' KFACLinearOperator (float64, MLP 5-7-4, 20 samples,
    cross-entropy): the relative Frobenius difference of the dense matrices."""
    from curvlinops import KFACLinearOperator

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)).double()
    x = torch.randn(20, 5, dtype=torch.float64)
    y = torch.randint(0, 4, (20,))
    params = list(model.parameters())
    eye = torch.eye(sum(p.numel() for p in params), dtype=torch.float64)
    out = {}
    for fisher_type, base in (
        ("type-2", steepest.GGN()),
        ("empirical", steepest.EmpiricalFisher()),
    ):
        theirs = (
            KFACLinearOperator(
                model,
                nn.CrossEntropyLoss(),
                params,
                [(x, y)],
                check_deterministic=False,
                fisher_type=fisher_type,
                separate_weight_and_bias=False,
            )
            @ eye
        )
        ours = steepest.curvature(model, CrossEntropy(), x, y, steepest.KFAC(base)).to_dense()
        out[f"{base!r} vs curvlinops {fisher_type}"] = float((theirs - ours).norm() / ours.norm())
    print(json.dumps(out, indent=1), flush=True)
    return out


def markdown(res: dict) -> str:
    """The tables of benchmarks/README.md from a results JSON."""
    lines = []
    m = res["meta"]
    lines.append(
        f"Run {m['date']}, torch {m['torch']}, {m.get('cpu_model', m['cpu'])}, "
        f"{m['cores']} cores, "
        f"{m['torch_threads']} torch thread(s), load average before "
        f"{m['load_before'][0]:.1f} and after {m['load_after'][0]:.1f} "
        f"({m['note']}), quick={m['quick']}."
    )
    if "step_cost" in res:
        sc = res["step_cost"]
        names = list(sc)
        rows = [k for k in sc[names[0]] if isinstance(sc[names[0]][k], dict)]
        lines += [
            "",
            "Step cost as a multiple of one Adam step (median [min, max] over seeds x repeats):",
            "",
            "| method | "
            + " | ".join(f"{n} (P={sc[n]['P']:,}, N={sc[n]['batch']})" for n in names)
            + " |",
            "|---|" + "---|" * len(names),
        ]
        for r in rows:
            cells = []
            for n in names:
                e = sc[n].get(r, {})
                cells.append(
                    f"{e['median']:.1f} [{e['min']:.1f}, {e['max']:.1f}]"
                    if "median" in e
                    else e.get("error", "-")[:40]
                )
            lines.append(f"| {r} | " + " | ".join(cells) + " |")
        lines.append(
            "| Adam step (s) | " + " | ".join(f"{sc[n]['adam_step_s']:.3f}" for n in names) + " |"
        )
    if "closure_path" in res:
        lines += [
            "",
            "Exact GGN step on the digits CNN (LevenbergMarquardt):",
            "",
            "| path | solver | median step (s) | ratio to Optimizer auto |",
            "|---|---|---|---|",
        ]
        for k, e in res["closure_path"].items():
            lines.append(
                f"| {k} | {e['solver'] or '-'} | {e['median_s']:.3f} | "
                f"{e['ratio_to_Optimizer_auto']:.2f} |"
            )
    if "agreement" in res:
        lines += [
            "",
            "Agreement with curvlinops' K-FAC (relative Frobenius difference): "
            + ", ".join(f"{k}: {v:.1e}" for k, v in res["agreement"].items()),
        ]
    return "\n".join(lines)


def _cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--parts", nargs="*", default=["cost", "closure", "agreement"], help="also: floor"
    )
    ap.add_argument("--window", type=int, default=100, help="steps per amortised timing")
    ap.add_argument("--seeds", type=int, default=3, help="models and batches from seeds 0..n-1")
    ap.add_argument("--repeats", type=int, default=None, help="step-cost repeats (3; quick 2)")
    ap.add_argument("--models", nargs="*", default=["mlp", "cnn", "transformer", "cnn-bn"])
    ap.add_argument("--merge", default=None, help="a JSON whose step_cost entries to keep")
    ap.add_argument("--markdown", default=None, help="print the tables of a results JSON")
    ap.add_argument("--rows", nargs="*", default=None, help="step-cost rows containing these")
    ap.add_argument(
        "--adam",
        choices=["window", "median5"],
        default="window",
        help="Adam's step: the mean over the row's window (default) or the median of 5 steps "
        "(the estimator of earlier JSONs)",
    )
    ap.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: time each step by the thread's CPU time (one torch thread; a loaded machine)",
    )
    ap.add_argument(
        "--note",
        default="shared machine: other jobs ran at the same time",
        help="how the machine was used, for the JSON",
    )
    args = ap.parse_args()
    if args.markdown:
        with open(args.markdown) as f:
            print(markdown(json.load(f)))
        return
    torch.set_num_threads(args.threads)
    global CLOCK
    if args.clock == "cpu":
        if args.threads != 1:
            ap.error("--clock cpu measures one thread: use --threads 1")
        CLOCK = time.thread_time
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_before": os.getloadavg(),
        "quick": args.quick,
        "note": args.note,
        "clock": args.clock,
        "adam_estimator": args.adam,
        "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
    }
    res = {"meta": meta}
    if args.out and os.path.exists(args.out) and set(args.parts) <= {"agreement"}:
        with open(args.out) as f:  # add to an earlier run's results
            res = json.load(f)
        res["meta"]["agreement_run"] = meta
    if "agreement" in args.parts:
        res["agreement"] = agreement()
    if "cost" in args.parts:
        kept = {}
        if args.merge:  # entries of an earlier run of the same code (e.g. cut short)
            with open(args.merge) as f:
                kept = json.load(f)["step_cost"]
            meta["merged_step_cost_from"] = args.merge
        res["step_cost"] = kept | step_costs(
            [m for m in args.models if m not in kept],
            window=args.window,
            repeats=args.repeats or (2 if args.quick else 3),
            only=args.rows,
            adam=args.adam,
            seeds=args.seeds,
        )
    if "closure" in args.parts:
        res["closure_path"] = closure_path(repeats=2 if args.quick else 3)
    if "floor" in args.parts:
        res["floor_ms"] = floor(repeats=args.repeats or 3)
    meta["load_after"] = os.getloadavg()
    meta["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    if "load_after" not in res["meta"]:
        res["meta"]["load_after"] = meta["load_after"]
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()

"""Cost of weight decay with K-FAC's own inverse (issue 10).

``TorchOptimizer(weight_decay=eta)`` adds diag(eta) to M. Before, the operator
M + diag(eta) lost the metric's own inverse, so ``solver="auto"`` fell back to CG (P > 2000)
or a dense Cholesky; now one decay shared by all parameters keeps K-FAC's inverse at
lambda + eta (``LinearOperator.plus_diagonal``). This times one ``TorchOptimizer.step`` on an
MLP 64-256-256-10 (85,002 parameters, batch 128, K-FAC at its defaults,
``LevenbergMarquardt(0.1)``) in three configurations, interleaved in one process (the same
machine load for each): no weight decay, weight decay 1e-4 (own inverse), and weight decay
1e-4 with the operator of the code before the change (no inverse: CG). Writes
``benchmarks/results/weight_decay.json`` with the median and spread of the milliseconds per
step over the rounds, the solver each used, the machine load (``uptime``) and the torch
thread count.

    PYTHONPATH=src python benchmarks/weight_decay.py
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch
from torch import nn

from steepest import KFAC, LevenbergMarquardt, TorchOptimizer
from steepest.linop import LinearOperator
from steepest.losses import CrossEntropy

ROUNDS, STEPS, WARMUP = 7, 5, 2


def without_inverse(
    op: LinearOperator, eta: torch.Tensor, name: str | None = None
) -> LinearOperator:
    """M + diag(eta) as the code before this change built it: no own inverse."""
    return LinearOperator(
        lambda v: op.matvec(v) + eta * v,
        op.size,
        op.dtype,
        op.device,
        matmat=lambda V: op @ V + eta[:, None] * V,
        dense=lambda: op.to_dense() + torch.diag(eta),
        diagonal=lambda: op.diagonal() + eta,
        psd=op.psd and bool((eta >= 0).all()),
        name=f"{op.name} + weight decay",
    )


def setup(wd: float):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    opt = TorchOptimizer(
        model.parameters(),
        loss=CrossEntropy(),
        metric=KFAC(),
        weight_decay=wd,
        damping=LevenbergMarquardt(1e-1),
    )
    return model, opt


def main() -> None:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(128, 64, generator=g), torch.randint(0, 10, (128,), generator=g)
    own = LinearOperator.plus_diagonal
    configs = {
        "no weight decay": (0.0, own),
        "weight decay 1e-4, own inverse": (1e-4, own),
        "weight decay 1e-4, before (no inverse)": (1e-4, without_inverse),
    }
    runs = {}
    for name, (wd, plus) in configs.items():
        model, opt = setup(wd)
        LinearOperator.plus_diagonal = plus
        for _ in range(WARMUP):  # the first step refreshes and decomposes the factors
            opt.step(lambda model=model: (model(x), y))
        runs[name] = (model, opt, plus)
    times = {name: [] for name in configs}
    solvers = {}
    for _ in range(ROUNDS):
        for name, (model, opt, plus) in runs.items():
            LinearOperator.plus_diagonal = plus
            start = time.perf_counter()
            for _ in range(STEPS):
                opt.step(lambda model=model: (model(x), y))
            times[name].append((time.perf_counter() - start) / STEPS * 1e3)
            solvers[name] = opt.last_info.solver
    LinearOperator.plus_diagonal = own
    base = times["no weight decay"]
    out = {
        "model": "MLP 64-256-256-10 (85,002 parameters), batch 128, float32",
        "optimizer": "TorchOptimizer(metric=KFAC(), damping=LevenbergMarquardt(0.1)), "
        "KFAC defaults (T_cov=10, T_inv=100)",
        "rounds": ROUNDS,
        "steps_per_round": STEPS,
        "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "results": {
            name: {
                "solver": solvers[name],
                "ms_per_step_median": statistics.median(t),
                "ms_per_step_min": min(t),
                "ms_per_step_max": max(t),
                "ratio_to_no_weight_decay_median": statistics.median(
                    a / b for a, b in zip(t, base)
                ),
            }
            for name, t in times.items()
        },
    }
    path = Path(__file__).parent / "results" / "weight_decay.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

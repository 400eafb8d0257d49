"""Cost of the per-step buffer/random-state guard (issue 9, ``steepest.guard.ForwardGuard``).

Times ``Optimizer.step`` with the guard and with a no-op stand-in, interleaved in one process
(same machine load for both), on a small MLP and on an MLP with BatchNorm and Dropout; writes
``benchmarks/results/guard_overhead.json`` with the median and spread of the ratio, the machine
load (``uptime``) and the torch thread count.

    PYTHONPATH=src python benchmarks/guard_overhead.py
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch
from torch import nn

import steepest.optimizer as optimizer_module
from steepest import GGN, LevenbergMarquardt, Optimizer
from steepest.guard import ForwardGuard
from steepest.losses import MSE


class NullGuard:
    """The guard's interface doing nothing (the code before issue 9)."""

    def __init__(self, model=None):
        self._after_point = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def point_done(self):
        self._after_point = True

    @contextlib.contextmanager
    def trial(self):
        yield

    def rollback(self):
        pass

    def trial_was_pure(self):
        return False  # nothing checked: no forward may be reused


def models():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 1)).double()
    torch.manual_seed(0)
    bn = nn.Sequential(nn.Linear(10, 32), nn.BatchNorm1d(32), nn.Tanh(), nn.Dropout(0.1),
                       nn.Linear(32, 1)).double()
    return {"mlp": plain, "mlp_batchnorm_dropout": bn}


def time_steps(model, x, y, guard, steps):
    optimizer_module.ForwardGuard = guard
    # reuse=False on both sides: the guard's own cost, not the saving of a reused forward
    opt = Optimizer(model, MSE(), metric=GGN(), damping=LevenbergMarquardt(1e-2), reuse=False)
    t = time.perf_counter()
    for _ in range(steps):
        opt.step(x, y)
    return (time.perf_counter() - t) / steps


def main(repeats: int = 5, steps: int = 5) -> dict:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(128, 10, dtype=torch.double, generator=g)
    y = torch.sin(x.sum(1, keepdim=True))
    out = {"uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
           "torch_threads": torch.get_num_threads(), "repeats": repeats,
           "steps_per_repeat": steps, "cpu_count": os.cpu_count(), "results": {}}
    for name, model in models().items():
        ratios, with_guard, without = [], [], []
        time_steps(model, x, y, ForwardGuard, 1)  # warm-up, not timed
        time_steps(model, x, y, NullGuard, 1)
        for _ in range(repeats):
            a = time_steps(model, x, y, ForwardGuard, steps)
            b = time_steps(model, x, y, NullGuard, steps)
            with_guard.append(a)
            without.append(b)
            ratios.append(a / b)
        out["results"][name] = {
            "step_s_with_guard_median": statistics.median(with_guard),
            "step_s_without_guard_median": statistics.median(without),
            "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
        }
    optimizer_module.ForwardGuard = ForwardGuard
    return out


if __name__ == "__main__":
    res = main()
    path = Path(__file__).parent / "results" / "guard_overhead.json"
    path.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))

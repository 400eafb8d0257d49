"""The approximate metrics (KFAC, EKFAC, Diagonal) with every step and damping rule: each
pair trains a tiny float64 MLP through ``steepest.Optimizer`` and, with weight decay, through
``TorchOptimizer`` (issue 10: every approximation is a metric, so it works with every damping
rule, step rule, ``Optimizer`` and ``TorchOptimizer``)."""

from __future__ import annotations

import math

import pytest
import torch
from reference import seeded
from torch import nn

import steepest
from steepest.losses import CrossEntropy

DT = torch.float64

METRICS = {
    # refreshed and decomposed again within the run: T_cov = 2, T_inv = 4
    "KFAC": lambda: steepest.KFAC(T_cov=2, T_inv=4),
    "EKFAC": lambda: steepest.EKFAC(T_cov=2, T_inv=4),
    "Diagonal": lambda: steepest.Diagonal(steepest.GGN()),
}

RULES = {
    "Armijo": lambda: dict(damping=1e-1, step=steepest.Armijo()),
    "TrustRegion": lambda: dict(damping=1e-1, step=steepest.TrustRegion(adaptive=True)),
    "KLLineSearch": lambda: dict(damping=1e-1, step=steepest.KLLineSearch()),
    "MoreTrustRegion": lambda: dict(damping=steepest.MoreTrustRegion()),
    "LevenbergMarquardt": lambda: dict(damping=steepest.LevenbergMarquardt(1e-1)),
}

STEPS = 8


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = seeded(1)
    x = torch.randn(64, 4, generator=g, dtype=DT)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).to(DT)


def full_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(x), y))


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("metric", list(METRICS))
@pytest.mark.parametrize("front", ["Optimizer", "TorchOptimizer + weight decay"])
def test_approximate_metric_trains_with_every_rule(metric, rule, front):
    """Eight steps lower the loss to below 0.75 of its start; every StepInfo and every
    parameter is finite; the own inverse solves every step whose damping is lambda I (the
    MoreTrustRegion's lambda D^2 may take another route)."""
    x, y = data()
    model = net()
    start = full_loss(model, x, y)
    if front == "Optimizer":
        opt = steepest.Optimizer(model, CrossEntropy(), metric=METRICS[metric](), **RULES[rule]())

        def step():
            return opt.step(x, y)
    else:
        opt = steepest.TorchOptimizer(
            model, loss=CrossEntropy(), metric=METRICS[metric](), weight_decay=1e-3, **RULES[rule]()
        )

        def step():
            opt.step(lambda: (model(x), y))
            return opt.last_info

    infos = [step() for _ in range(STEPS)]
    for info in infos:
        assert math.isfinite(info.loss) and math.isfinite(info.grad_norm)
        assert info.loss_new is None or math.isfinite(info.loss_new)
        if rule != "MoreTrustRegion":
            assert info.solver == "OwnInverse", info
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert sum(i.accepted for i in infos) >= STEPS // 2
    end = full_loss(model, x, y)
    assert end < 0.75 * start, (start, end, [i.message for i in infos])

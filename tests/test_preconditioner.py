"""Preconditioner mode: ``.grad`` preconditioned in place, then any torch.optim optimizer."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from reference import seeded
from torch import nn

import steepest
from steepest.errors import ConfigurationError
from steepest.losses import CrossEntropy
from steepest.preconditioner import Preconditioner

F64 = torch.float64


def data(n=40):
    g = seeded(0)
    x = torch.randn(n, 4, generator=g, dtype=F64)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(F64)


@pytest.mark.parametrize(
    "metric", [steepest.KFAC, steepest.EKFAC, lambda: steepest.Diagonal(steepest.GGN())]
)
def test_sgd_step_equals_the_optimizer_step(metric):
    x, y = data()
    m1, m2 = net(), net()
    opt = steepest.Optimizer(m1, CrossEntropy(), metric=metric(), damping=0.1, step=0.5)
    opt.step(x, y)
    pre = Preconditioner(m2, CrossEntropy(), metric=metric(), damping=0.1)
    sgd = torch.optim.SGD(m2.parameters(), lr=0.5)
    sgd.zero_grad()
    F.cross_entropy(m2(x), y).backward()
    pre.step(x, y)
    sgd.step()
    assert pre.last_solver == "OwnInverse"
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_adamw_and_sgd_momentum_train():
    x, y = data(64)
    for make in (
        lambda p: torch.optim.AdamW(p, lr=1e-2),
        lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.9),
    ):
        model = net()
        pre = Preconditioner(
            model, CrossEntropy(), metric=steepest.KFAC(T_inv=5, ema=0.9), damping=1e-1
        )
        opt = make(model.parameters())
        losses = []
        for _ in range(25):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            pre.step(x, y)
            opt.step()
            losses.append(float(loss.detach()))
        assert losses[-1] < 0.6 * losses[0]


def test_errors_leave_grads_alone():
    model = net()
    x, y = data()
    with pytest.raises(ConfigurationError, match="damping"):
        Preconditioner(model, CrossEntropy(), damping=0)
    pre = Preconditioner(model, CrossEntropy())
    with pytest.raises(ConfigurationError, match="backward"):
        pre.step(x, y)
    F.cross_entropy(model(x), y).backward()
    grads = [copy.deepcopy(p.grad) for p in model.parameters()]
    with pytest.raises(steepest.SteepestError):
        pre.step(x, torch.full_like(y, 7))  # a class index out of range
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, model.parameters()))


@pytest.mark.parametrize("metric", [lambda: steepest.KFAC(steepest.GGN()), steepest.GGN])
def test_step_leaves_buffers_and_random_state_alone(metric):
    """The user's forward moved BatchNorm's running statistics once; Preconditioner.step's own
    forwards run on buffer copies and put the global random state back (issue 9)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.3), nn.Tanh(), nn.Linear(4, 3)
    ).double()
    x = torch.randn(8, 3, generator=seeded(40), dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=seeded(41))
    pre = Preconditioner(model, CrossEntropy(), metric=metric(), damping=1e-2)
    for _ in range(2):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        bn = model[1]
        before = {n: b.clone() for n, b in bn.named_buffers()}
        rng = torch.get_rng_state()
        pre.step(x, y)
        assert all(torch.equal(b, before[n]) for n, b in bn.named_buffers())
        assert torch.equal(torch.get_rng_state(), rng)
    assert int(model[1].num_batches_tracked) == 2  # once per user forward

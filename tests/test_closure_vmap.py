"""The fast closure path of TorchOptimizer: per-sample Jacobians and gradients by
``torch.func.vmap`` over a functional call of the module whose outputs the closure returns,
equal to the batched backward, with the fallback for sample-coupled or opaque closures."""

from __future__ import annotations

import pytest
import torch
from reference import rel_err, seeded
from torch import nn

import steepest
from steepest.closure_point import ClosurePoint, _ClosureSpace
from steepest.losses import CrossEntropy

F64 = torch.float64


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 5 * 5, 4)
    ).to(F64)


def batch(n=6):
    g = seeded(1)
    return torch.randn(n, 1, 5, 5, generator=g, dtype=F64), torch.randint(0, 4, (n,), generator=g)


@pytest.mark.parametrize("subset", [False, True])
def test_vmap_path_equals_batched_backward(subset):
    model = cnn()
    x, y = batch()
    params = list(model.parameters())
    if subset:  # only some parameters in the optimizer: the others are held fixed
        params = params[2:]
    space = _ClosureSpace(params)
    fast = ClosurePoint(space, CrossEntropy(), lambda: (model(x), y), steepest.GGN())
    slow = ClosurePoint(space, CrossEntropy(), lambda: (model(x), y), steepest.GGN())
    assert fast._owner is not None
    slow._owner = None
    assert rel_err(fast.jacobian(), slow.jacobian()) < 1e-13
    assert rel_err(fast.per_sample_grads(), slow.per_sample_grads()) < 1e-13
    assert rel_err(fast.jacobian(slice(2, 4)), slow.jacobian(slice(2, 4))) < 1e-13
    assert fast._owner is not None  # the fast path was taken, not silently dropped


def test_fallbacks():
    x, y = batch()
    model = cnn()
    space = _ClosureSpace(list(model.parameters()))
    # outputs post-processed outside any module: no owner, the batched backward
    p = ClosurePoint(space, CrossEntropy(), lambda: (2 * model(x), y), steepest.GGN())
    assert p._owner is None and p.jacobian().shape == (6, 4, space.size)
    # BatchNorm in training mode couples the samples
    bn = nn.Sequential(nn.Flatten(), nn.Linear(25, 4), nn.BatchNorm1d(4)).to(F64)
    space = _ClosureSpace(list(bn.parameters()))
    p = ClosurePoint(space, CrossEntropy(), lambda: (bn(x), y), steepest.GGN())
    assert p._owner is None


def test_torch_optimizer_steps_agree_with_optimizer():
    x, y = batch(8)
    m1, m2 = cnn(), cnn()

    def kw():
        return dict(metric=steepest.GGN(), damping=steepest.LevenbergMarquardt(1e-1))

    a = steepest.Optimizer(m1, CrossEntropy(), **kw())
    b = steepest.TorchOptimizer(m2.parameters(), loss=CrossEntropy(), **kw())
    for _ in range(2):
        ia = a.step(x, y)
        b.step(lambda: (m2(x), y))
    assert ia.solver == b.last_info.solver
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)

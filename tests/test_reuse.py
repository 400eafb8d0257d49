"""Reuse of the accepted trial's forward as the next step's point (``Optimizer(reuse=True)``,
steepest.trials) and the evaluation counters ``StepInfo.nfev`` / ``njev``: the run is the one
without reuse bit for bit, one forward fewer per accepted step on a full batch; never reused
where a fresh forward would differ (Dropout, BatchNorm in training mode, a changed batch, model
or parameters), across state_dict, after a failed step, nor in TorchOptimizer."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from steepest import Optimizer, TorchOptimizer
from steepest.damping import LevenbergMarquardt, MoreTrustRegion
from steepest.errors import ShapeError, SolverError
from steepest.losses import MSE
from steepest.metrics import GGN, GaussNewton
from steepest.params import ParamSpace
from steepest.point import Point, forward
from steepest.solvers import Cholesky

DT = torch.float64


class CountingMSE(MSE):
    """MSE that counts its evaluations: one per forward of the loss (an independent nfev)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def value(self, z, y):
        self.calls += 1
        return super().value(z, y)


def data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=DT)
    return x, torch.sin(x.sum(1, keepdim=True)) + 0.1 * x[:, :1] ** 2


def mlp(*extra: nn.Module, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), *extra, nn.Linear(6, 1)).to(DT)


def params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def run(model, loss, x, y, steps, reuse, **kw):
    opt = Optimizer(
        model,
        loss,
        metric=kw.pop("metric", GGN()),
        damping=kw.pop("damping", LevenbergMarquardt(1e-2)),
        reuse=reuse,
        **kw,
    )
    return opt, [opt.step(x, y) for _ in range(steps)]


def strip(info):
    """StepInfo without the counter that reuse changes (and the solver's class name)."""
    return {k: v for k, v in vars(info).items() if k not in ("nfev", "solver")}


@pytest.mark.parametrize("damping", [LevenbergMarquardt(1e-2), MoreTrustRegion()])
def test_reuse_gives_the_same_run_with_one_forward_fewer_per_accepted_step(damping):
    x, y = data()
    a, b = mlp(), mlp()
    la, lb = CountingMSE(), CountingMSE()
    opt_a, infos_a = run(a, la, x, y, 8, True, damping=copy.deepcopy(damping), solver=Cholesky())
    opt_b, infos_b = run(b, lb, x, y, 8, False, damping=copy.deepcopy(damping), solver=Cholesky())
    assert torch.equal(params(a), params(b))  # bit for bit
    assert [strip(i) for i in infos_a] == [strip(i) for i in infos_b]
    # without reuse: one forward at theta per step plus the trials
    assert all(i.nfev == 1 + i.evaluations and i.njev == 1 for i in infos_b)
    # with reuse: a step after an accepted one makes no forward at theta
    for prev, info in zip(infos_a, infos_a[1:]):
        assert info.nfev == info.evaluations + (0 if prev.accepted else 1)
    assert sum(i.accepted for i in infos_a[:-1]) >= 5
    # the counters are honest: the loss was evaluated exactly nfev times
    assert la.calls == sum(i.nfev for i in infos_a) and lb.calls == sum(i.nfev for i in infos_b)
    assert la.calls < lb.calls


def test_a_changed_batch_model_or_theta_is_evaluated_afresh():
    x, y = data()
    model, ref = mlp(), mlp()
    opt = Optimizer(model, MSE(), metric=GGN(), damping=LevenbergMarquardt(1e-2))
    opt_ref = Optimizer(ref, MSE(), metric=GGN(), damping=LevenbergMarquardt(1e-2), reuse=False)

    def both(xs, ys, fresh):
        info, info_ref = opt.step(xs, ys), opt_ref.step(xs, ys)
        assert strip(info) == strip(info_ref) and torch.equal(params(model), params(ref))
        assert info.nfev == info.evaluations + int(fresh)
        return info

    assert both(x, y, True).accepted
    both(x, y, False)  # the same tensors: reused
    both(x.clone(), y, True)  # equal values, another tensor: not provably the same batch
    both(x, y, True)  # back to x: fresh, and its trials keep no graph (the batch changed) ...
    both(x, y, True)
    both(x, y, False)  # ... until the batch has stayed the same for a step
    x.mul_(1.0)  # an in-place change, even one that keeps the values, bumps _version
    both(x, y, True)
    both(x, y, True)
    both(x, y, False)
    with torch.no_grad():  # the user moves the parameters
        for m in (model, ref):
            m[0].bias.add_(1e-3)
    both(x, y, True)
    both(x, y, False)
    for m in (model, ref):  # training flags (a module may branch on them)
        m.eval()
    both(x, y, True)
    both(x, y, False)
    both(torch.zeros_like(x), y, True)  # mini-batches: another batch each step
    assert not opt._keep_graph  # and no trial graph kept for them
    both(torch.ones_like(x), y, True)
    assert not opt._keep_graph and opt._next is None


@pytest.mark.parametrize(
    "extra,train",
    [
        (lambda: nn.Dropout(0.2), True),
        (lambda: nn.BatchNorm1d(6), True),
        (lambda: nn.BatchNorm1d(6), False),
    ],
)
def test_dropout_and_batchnorm(extra, train, device):
    """Dropout in training mode draws masks and BatchNorm in training mode writes its running
    statistics: never reused, and the run (buffers, random state) is the one without reuse.
    BatchNorm in eval mode only reads its buffers: reused, the same run. On CUDA the masks come
    from the device's random state, which the purity check compares too."""
    x, y = (t.to(device) for t in data())
    a, b = (mlp(extra()).train(train).to(device) for _ in range(2))

    def rng():
        return torch.get_rng_state(), torch.cuda.get_rng_state() if device == "cuda" else None

    torch.manual_seed(5)
    _, infos_a = run(a, MSE(), x, y, 5, True)
    after_a = rng()
    torch.manual_seed(5)
    _, infos_b = run(b, MSE(), x, y, 5, False)
    after_b = rng()
    assert torch.equal(after_b[0], after_a[0])
    assert after_a[1] is None or torch.equal(after_b[1], after_a[1])
    assert torch.equal(params(a), params(b))
    for ba, bb in zip(a.buffers(), b.buffers(), strict=True):
        assert torch.equal(ba, bb)
    assert [strip(i) for i in infos_a] == [strip(i) for i in infos_b]
    reused = [i.nfev == i.evaluations for i in infos_a]
    if train:
        assert not any(reused)
    else:
        assert sum(reused) >= 3


def test_state_dict_resume_and_failed_steps():
    x, y = data()
    model = mlp()
    opt = Optimizer(model, MSE(), metric=GGN(), damping=MoreTrustRegion())
    for _ in range(3):
        opt.step(x, y)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    straight = [opt.step(x, y) for _ in range(3)]
    # resumed from the state: a fresh forward first, then the same run bit for bit
    model2 = mlp(seed=1)
    model2.load_state_dict(saved_model)
    opt2 = Optimizer(model2, MSE(), metric=GGN(), damping=MoreTrustRegion())
    opt2.load_state_dict(saved_opt)
    resumed = [opt2.step(x, y) for _ in range(3)]
    assert [strip(i) for i in resumed] == [strip(i) for i in straight]
    assert torch.equal(params(model2), params(model))
    assert resumed[0].nfev == resumed[0].evaluations + 1
    assert straight[0].nfev == straight[0].evaluations  # reused
    # loading a state into a running optimizer drops its kept forward
    opt.load_state_dict(opt.state_dict())
    assert opt._next is None

    # a failed step (the solver breaks down) restores theta and state and keeps no forward
    class Failing(Cholesky):
        fail = False

        def solve(self, a, b, x0=None):
            if self.fail:
                raise SolverError("broken on purpose")
            return super().solve(a, b, x0)

    model, ref = mlp(), mlp()
    solver = Failing()
    opt = Optimizer(model, MSE(), metric=GGN(), damping=LevenbergMarquardt(1e-2), solver=solver)
    opt_ref = Optimizer(
        ref, MSE(), metric=GGN(), damping=LevenbergMarquardt(1e-2), solver=Cholesky(), reuse=False
    )
    for _ in range(2):
        opt.step(x, y), opt_ref.step(x, y)
    theta, state = params(model), copy.deepcopy(opt.state_dict())
    solver.fail = True
    with pytest.raises(SolverError):
        opt.step(x, y)
    assert torch.equal(params(model), theta) and opt._next is None
    assert opt.state_dict()["damping"] == state["damping"]
    solver.fail = False
    info, info_ref = opt.step(x, y), opt_ref.step(x, y)
    assert strip(info) == strip(info_ref) and torch.equal(params(model), params(ref))
    assert info.nfev == info.evaluations + 1


def test_torch_optimizer_never_reuses_and_counts():
    """A closure may compute anything: TorchOptimizer evaluates every point afresh."""
    x, y = data()
    net = mlp()
    opt = TorchOptimizer(net, loss=MSE(), damping=LevenbergMarquardt(1e-2))
    for _ in range(3):
        opt.step(lambda: (net(x), y))
        info = opt.last_info
        assert info.accepted and info.nfev == 1 + info.evaluations and info.njev == 1
    assert opt.steepest._next is None


def test_curvature_batches_count_as_derivative_evaluations():
    x, y = data()
    opt = Optimizer(
        mlp(), MSE(), metric=GGN(), damping=LevenbergMarquardt(1e-2), curvature_batch_size=8
    )
    assert opt.step(x, y).njev == 2
    assert opt.step(x, y, curvature=(x[:5], y[:5])).njev == 2


def test_point_from_a_graph():
    x, y = data()
    model = mlp()
    space = ParamSpace(model)
    theta = space.get()
    graph = forward(space, MSE(), x, y, theta)
    fresh, reused = Point(model, MSE(), x, y), Point(space, MSE(), x, y, graph=graph)
    assert fresh.value == reused.value and torch.equal(fresh.grad, reused.grad)
    v = torch.randn(space.size, dtype=DT)
    assert torch.equal(fresh.jvp(v), reused.jvp(v))
    with pytest.raises(ShapeError, match="another theta"):
        Point(space, MSE(), x, y, graph=forward(space, MSE(), x, y, theta + 1))


def test_reuse_must_be_a_bool():
    from steepest.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="reuse must be"):
        Optimizer(mlp(), MSE(), metric=GaussNewton(), reuse=1)

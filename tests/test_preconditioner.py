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


class _Seq(nn.Module):
    """A Linear on (N, T, d) inputs, an in-place ReLU and a plain Linear head."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(30, 24)
        self.b = nn.Linear(24, 5)

    def forward(self, x):
        return self.b(F.relu(self.a(x), inplace=True).mean(1))


@pytest.mark.parametrize("damping", ["factored", "exact"])
def test_recorded_rows_give_the_plain_product(damping):
    """K-FAC preconditions a Linear layer's gradient X = g^T a, recorded by hooks on the user's
    own backward, as (G^-1 g^T)(a A^-1) (O(R (o^2 + d^2 + o d))): in float64 this equals the
    plain (G^-1 X A^-1 or the eigenbasis) product of a Preconditioner without hooks; a .grad
    that is not the recorded gradient (weight decay added) falls back to the plain product."""
    torch.manual_seed(0)
    x = torch.randn(3, 2, 30, generator=seeded(70), dtype=F64)  # R = 6 rows, o = 24, d = 31
    y = torch.randint(0, 5, (3,), generator=seeded(71))
    for decay in (0.0, 1e-3):
        m1 = _Seq().double()
        m2 = copy.deepcopy(m1)
        pres = []
        for m in (m1, m2):
            pre = Preconditioner(
                m, CrossEntropy(), metric=steepest.KFAC(damping=damping), damping=0.1
            )
            m.zero_grad()
            loss = F.cross_entropy(m(x), y)
            loss = loss + decay * sum((p**2).sum() for p in m.parameters())
            loss.backward()
            pres.append(pre)
        pres[1].remove_hooks()
        for pre in pres:
            pre.step(x, y)
        # the first layer (o = 24, d = 31, R = 6) is cheaper factorised; the head is not
        assert pres[0].metric.fast_blocks == (1 if decay == 0 else 0)
        assert pres[1].metric.fast_blocks == 0
        for a, b in zip(m1.parameters(), m2.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-14)


def test_recorder_keeps_one_iteration_and_failed_step_restores_state():
    """The hooks keep the last forward/backward only (a new forward after a backward starts
    afresh; forwards without grad are not recorded); a step that raises leaves .grad and the
    metric's state as they were (the cheap snapshot, no copy of the factors)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 24), nn.Tanh(), nn.Linear(24, 3)).double()
    x = torch.randn(6, 30, generator=seeded(72), dtype=F64)
    y = torch.randint(0, 3, (6,), generator=seeded(73))
    made = Preconditioner(model, CrossEntropy())
    made.remove_hooks()
    default = made.metric
    assert (default.damping, default.ema, default.T_cov, default.T_inv) == (
        "factored",
        0.95,
        10,
        100,
    )
    # the third step refreshes the factors, evaluates the batch and meets the bad targets
    pre = Preconditioner(
        model, CrossEntropy(), metric=steepest.KFAC(T_cov=2, damping="factored"), damping=0.1
    )
    for _ in range(2):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            model(x)  # an evaluation pass in between: not recorded
        pre.step(x, y)
        assert pre.metric.fast_blocks == 1
    state = pre.metric.state_dict()
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(steepest.SteepestError):
        pre.step(x, torch.full_like(y, 7))
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, model.parameters()))
    after = pre.metric.state_dict()
    assert after["calls"] == state["calls"] and after["refreshes"] == state["refreshes"]
    for key, (a, g) in state["factors"]["blocks"].items():
        assert torch.equal(a, after["factors"]["blocks"][key][0])
        assert torch.equal(g, after["factors"]["blocks"][key][1])


def test_all_finite():
    from steepest.solvers import all_finite

    assert all_finite(torch.zeros(0)) and all_finite(torch.arange(5.0))
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.arange(5.0)
        t[3] = bad
        assert not all_finite(t)


def test_recorder_stays_out_of_torch_func():
    """A model with K-FAC's recording hooks still runs under torch.func (vmap of grad), and
    records nothing there (no hook on functorch tensors)."""
    model = net()
    pre = Preconditioner(model, CrossEntropy())
    x, y = data(6)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, xi, yi):
        z = torch.func.functional_call(model, p, (xi[None],))
        return F.cross_entropy(z, yi[None])

    per = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(params, x, y)
    assert per["0.weight"].shape == (6, 8, 4)
    assert pre._recorder.records == {}

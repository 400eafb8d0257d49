"""The fast closure path of TorchOptimizer: per-sample Jacobians and gradients by
``torch.func.vmap`` over a functional call of the module whose outputs the closure returns,
equal to the batched backward, with the fallback for sample-coupled or opaque closures."""

from __future__ import annotations

import pytest
import reference as ref
import torch
from reference import ResidualsAsSamples, rel_err, seeded
from torch import nn

import steepest
from steepest.closure_point import ClosurePoint, _ClosureSpace
from steepest.losses import MSE, CrossEntropy
from steepest.point import Point

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


# ------------------------------------------------------------------ sample-coupled models
# The vmap paths run the model on one sample at a time; a model that mixes its samples gives
# other per-sample Jacobians there than the batch's. The point checks the one-sample outputs
# (and once a random contraction of the rows) against the batch and then takes the batched
# backward. References: the Jacobian of the whole batch by torch.autograd.functional.jacobian
# (tests/reference.py), the gradient of the batch loss by plain autograd.


class Center(nn.Module):
    """Batch centring: h - mean over the batch (a custom BatchNorm without the scale)."""

    def forward(self, h):
        return h - h.mean(0, keepdim=True)


class HalfMean(nn.Module):
    """z = lin(x) - 0.5 mean_batch lin(x): coupled, and every one-sample output differs."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        z = self.lin(x)
        return z - 0.5 * z.mean(0, keepdim=True)


class ZeroGate(nn.Module):
    """z = head(t) + gate (t - mean_batch t), t = tanh(lin(x)), gate = 0: the outputs are
    those of an uncoupled model, the derivative with respect to the gate is not."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.head = nn.Linear(3, 3), nn.Linear(3, 3)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        t = torch.tanh(self.lin(x))
        return self.head(t) + self.gate * (t - t.mean(0, keepdim=True))


def coupled(name):
    torch.manual_seed(0)
    if name == "center":
        model = nn.Sequential(nn.Linear(3, 5), Center(), nn.Tanh(), nn.Linear(5, 3))
    else:
        model = HalfMean() if name == "half-mean" else ZeroGate()
    model = model.to(F64)
    g = seeded(2)
    x = torch.randn(6, 3, generator=g, dtype=F64)
    c = model(x).shape[1]
    y = torch.randint(0, c, (6,), generator=g)
    return model, x, y


def batch_grad(model, loss, x, y):
    """The gradient of the batch loss L(theta) = mean_i l(y_i, f(x, theta)_i), plain autograd."""
    f, theta = ref.model_function(model), ref.flat_params(model).requires_grad_(True)
    (g,) = torch.autograd.grad(ref.loss_value(loss, f(theta, x), y).mean(), theta)
    return g


COUPLED = ["center", "half-mean", "zero-gate"]
NAMES = {"ggn": steepest.GGN, "gauss-newton": steepest.GaussNewton}


@pytest.fixture
def routes(monkeypatch):
    """Record, for each per-sample request, whether the vmap fast path answered."""
    seen = []
    for cls in (Point, ClosurePoint):
        orig = cls._per_sample

        def spy(self, samples, kind, orig=orig):
            out = orig(self, samples, kind)
            seen.append(out is not None)
            return out

        monkeypatch.setattr(cls, "_per_sample", spy)
    return seen


@pytest.mark.parametrize("name", COUPLED)
@pytest.mark.parametrize("metric", ["ggn", "gauss-newton"])
def test_coupled_model_metric_equals_the_dense_reference(name, metric, routes):
    """GGN / GaussNewton of a sample-coupled custom module: ``to_dense()``, ``diagonal()``,
    the Woodbury factor and ``Diagonal(base)`` equal the reference built from the Jacobian of
    the whole batch, on the Optimizer's Point and on TorchOptimizer's ClosurePoint (before:
    off by 0.2-0.45 while ``@`` was exact)."""
    model, x, y = coupled(name)
    loss = CrossEntropy()
    dense = ref.metric(metric, model, loss, x, y)
    space = _ClosureSpace(list(model.parameters()))
    points = [
        Point(model, loss, x, y),
        ClosurePoint(space, loss, lambda: (model(x), y), NAMES[metric]()),
    ]
    for point in points:
        op = NAMES[metric]().operator(point)
        assert rel_err(op.to_dense(), dense) < 1e-12
        assert rel_err(op.diagonal(), dense.diagonal()) < 1e-12
        f = op.factor()
        assert rel_err(f.U.T @ f.U / f.n, dense) < 1e-12
        diag = steepest.Diagonal(NAMES[metric]()).operator(point)
        assert rel_err(diag.diagonal(), dense.diagonal()) < 1e-12
        assert rel_err(op @ torch.eye(op.size, dtype=F64), dense) < 1e-12
    assert routes and not any(routes)  # every request went to the batched route


@pytest.mark.parametrize("name", COUPLED)
def test_coupled_model_per_sample_grads_are_the_batch_rows(name):
    """Per-sample loss gradients of a coupled model are the rows d l_i / d theta through the
    batch (each sample's loss depends on every input): reference by autograd, row by row."""
    model, x, y = coupled(name)
    loss = CrossEntropy()
    f, theta = ref.model_function(model), ref.flat_params(model).requires_grad_(True)
    losses = ref.loss_value(loss, f(theta, x), y)
    want = torch.stack(
        [torch.autograd.grad(losses[i], theta, retain_graph=True)[0] for i in range(len(y))]
    )
    space = _ClosureSpace(list(model.parameters()))
    for point in (
        Point(model, loss, x, y),
        ClosurePoint(space, loss, lambda: (model(x), y), steepest.GGN()),
    ):
        assert rel_err(point.per_sample_grads(), want) < 1e-12


@pytest.mark.parametrize("name", COUPLED)
@pytest.mark.parametrize("solver", ["cholesky", "woodbury"])
def test_coupled_model_steps_equal_the_reference_step(name, solver, routes):
    """One step theta - (M + lambda I)^-1 g with the exact GGN through Optimizer and
    TorchOptimizer, with the dense solvers that need per-sample Jacobians, equals the step
    from the dense reference."""
    lam, loss = 0.3, CrossEntropy()
    model, x, y = coupled(name)
    theta = ref.flat_params(model)
    want = theta - torch.linalg.solve(
        ref.metric("ggn", model, loss, x, y) + lam * torch.eye(theta.numel(), dtype=F64),
        batch_grad(model, loss, x, y),
    )
    kw = dict(metric=steepest.GGN(), damping=lam, solver=solver)
    m1, _, _ = coupled(name)
    info = steepest.Optimizer(m1, loss, **kw).step(x, y)
    m2, _, _ = coupled(name)
    opt = steepest.TorchOptimizer(m2.parameters(), loss=loss, **kw)
    opt.step(lambda: (m2(x), y))
    assert info.solver == opt.last_info.solver and solver in info.solver.lower()
    for m in (m1, m2):
        assert rel_err(ref.flat_params(m), want) < 1e-12
    assert routes and not any(routes)


def test_uncoupled_model_keeps_the_vmap_route(routes):
    """The check does not refuse a model that treats its samples independently: the exact
    GGN's dense operator through Optimizer and TorchOptimizer answers every per-sample request
    by vmap, in float64 and in float32 (the check's tolerance fits the dtype), with a Conv2d
    and with chunked requests (a slice of the samples)."""
    for dtype in (F64, torch.float32):
        x, y = batch(8)
        x = x.to(dtype)
        m1, m2 = cnn().to(dtype), cnn().to(dtype)
        kw = dict(metric=steepest.GGN(), damping=0.3, solver="cholesky")
        steepest.Optimizer(m1, CrossEntropy(), **kw).step(x, y)
        opt = steepest.TorchOptimizer(m2.parameters(), loss=CrossEntropy(), **kw)
        opt.step(lambda m2=m2, x=x, y=y: (m2(x), y))
        point = Point(m1, CrossEntropy(), x, y)
        point.jacobian(slice(2, 5))
        point.per_sample_grads()
    assert len(routes) >= 8 and all(routes)


# ------------------------------------------------------------------ outputs not per sample
def test_outputs_not_per_sample_take_the_batched_route_in_torch_optimizer(routes):
    """TorchOptimizer on a model whose outputs do not follow its inputs sample by sample (the
    vmap path would give each 'sample' the whole residual vector): the closure point's
    Jacobian, per-sample gradients and Gauss-Newton matrix equal the autograd reference, one
    Cholesky step equals the reference step, and LM steps converge (before: a bare
    ``RuntimeError: shape '[3, 1, 2]' is invalid``)."""
    from steepest.losses import MSE

    x, y = torch.zeros(3, 1, dtype=F64), torch.zeros(3, 1, dtype=F64)
    model = ResidualsAsSamples()
    th = model.theta.detach().clone()
    jac = torch.autograd.functional.jacobian(ResidualsAsSamples.r, th)  # (3, 2)
    r = ResidualsAsSamples.r(th)
    space = _ClosureSpace(list(model.parameters()))
    point = ClosurePoint(space, MSE(), lambda: (model(x), y), steepest.GaussNewton())
    assert rel_err(point.jacobian(), jac[:, None, :]) < 1e-14
    assert rel_err(point.per_sample_grads(), r[:, None] * jac) < 1e-14  # l_i = r_i^2 / 2
    gn = jac.T @ jac / 3
    assert rel_err(steepest.GaussNewton().operator(point).to_dense(), gn) < 1e-14
    assert routes and not any(routes)

    lam = 0.1
    want = th - torch.linalg.solve(gn + lam * torch.eye(2, dtype=F64), jac.T @ r / 3)
    opt = steepest.TorchOptimizer(
        model.parameters(),
        loss=MSE(),
        metric=steepest.GaussNewton(),
        damping=lam,
        solver="cholesky",
    )
    opt.step(lambda: (model(x), y))
    assert rel_err(model.theta.detach(), want) < 1e-13

    opt = steepest.TorchOptimizer(
        model.parameters(),
        loss=MSE(),
        metric=steepest.GaussNewton(),
        damping=steepest.LevenbergMarquardt(),
    )
    first = float(opt.step(lambda: (model(x), y)))
    for _ in range(30):
        opt.step(lambda: (model(x), y))
        if opt.last_info.converged:
            break
    assert opt.last_info.converged and opt.last_info.loss < first
    # near the minimiser: the gradient J^T r down by 1e-6 from its start, (-197, 101.5)
    th = model.theta.detach()
    g = torch.autograd.functional.jacobian(ResidualsAsSamples.r, th).T @ ResidualsAsSamples.r(th)
    assert float(g.norm()) < 1e-6 * float(torch.tensor([-197.0, 101.5]).norm())


class Squeezed(nn.Module):
    """forward ends in .squeeze(): a batch of one gives a 0-d output (review: a bare IndexError
    in the per-sample path, before it took the batched route)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).to(F64)

    def forward(self, x):
        return self.net(x).squeeze()


@pytest.mark.parametrize("metric", ["ef", "ggn"])
def test_squeezed_outputs_take_the_batched_route(metric):
    g = seeded(8)
    x, y = torch.randn(16, 3, generator=g, dtype=F64), torch.randn(16, generator=g, dtype=F64)
    torch.manual_seed(0)
    model = Squeezed()
    point = Point(model, MSE(), x, y)
    rows = point.per_sample_grads()
    want = torch.stack(
        [
            torch.cat(
                [
                    t.reshape(-1)
                    for t in torch.autograd.grad(
                        0.5 * (model(x)[i] - y[i]) ** 2, list(model.parameters())
                    )
                ]
            )
            for i in range(16)
        ]
    )
    assert rel_err(rows, want) < 1e-12
    base = steepest.EmpiricalFisher() if metric == "ef" else steepest.GGN()
    twins = [Squeezed() for _ in range(2)]
    for t in twins:
        t.load_state_dict(model.state_dict())
    core = steepest.Optimizer(twins[0], MSE(), metric=steepest.Diagonal(base), damping=1e-2)
    torch_opt = steepest.TorchOptimizer(
        twins[1], loss=MSE(), metric=steepest.Diagonal(base), damping=1e-2
    )
    core.step(x, y)
    torch_opt.step(lambda: (twins[1](x), y))
    for p, q in zip(twins[0].parameters(), twins[1].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)

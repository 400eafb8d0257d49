"""Bad input raises the right steepest.errors class, with a message that names the problem and
the fix; through the Optimizer, before any parameter or optimizer state changes."""

from __future__ import annotations

import copy

import pytest
import torch
from reference import seeded
from torch import nn

import steepest
from steepest import errors
from steepest.errors import (
    ConfigurationError,
    DenseTooLargeError,
    LossNotProbabilisticError,
    NonFiniteError,
    ShapeError,
    SingularMatrixError,
    SteepestError,
    TargetError,
)
from steepest.linop import LinearOperator, set_dense_limit
from steepest.losses import MSE, BCEWithLogits, CrossEntropy, GaussianNLL
from steepest.metrics import GGN, EmpiricalFisher, Fisher, GaussNewton, Identity
from steepest.point import Point
from steepest.solvers import CG, Cholesky, Woodbury, as_solver

F64 = torch.float64


def mlp(out: int = 3, dtype=F64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, out)).to(dtype)


def data(n: int = 5, seed: int = 0):
    g = seeded(seed)
    return torch.randn(n, 3, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)


def test_hierarchy():
    builtin = {
        errors.ShapeError: ValueError,
        errors.TargetError: ValueError,
        errors.NonFiniteError: FloatingPointError,
        errors.SingularMatrixError: ValueError,
        errors.DenseTooLargeError: MemoryError,
        errors.LossNotProbabilisticError: TypeError,
        errors.SolverError: RuntimeError,
        errors.ConfigurationError: ValueError,
    }
    for cls, base in builtin.items():
        assert issubclass(cls, SteepestError) and issubclass(cls, base)


# ------------------------------------------------------------------------------ shapes, dtypes

x5, y5 = data()
SHAPE_CASES = {
    "mse-shape": (MSE(), 3, torch.zeros(5, 2, dtype=F64), r"\(5, 3\).*reshape"),
    "mse-dtype": (MSE(), 3, torch.zeros(5, 3, dtype=torch.float32), r"float32.*y.to"),
    "mse-int": (MSE(), 3, torch.zeros(5, 3, dtype=torch.int64), r"int64.*y.to"),
    "batch": (MSE(), 3, torch.zeros(4, 3, dtype=F64), r"5 outputs but there are 4 targets"),
    "ce-float": (CrossEntropy(), 3, y5.to(F64), r"integer class indices.*y.long\(\)"),
    "ce-onehot": (CrossEntropy(), 3, torch.zeros(5, 3, dtype=torch.int64), r"\(N,\).*flatten"),
    "bce-shape": (BCEWithLogits(), 3, torch.zeros(5, dtype=F64), r"logits' shape.*reshape"),
    "bce-dtype": (BCEWithLogits(), 3, torch.zeros(5, 3, dtype=torch.float32), r"y.to\(z.dtype"),
    "gauss-odd": (GaussianNLL(), 3, torch.zeros(5, 1, dtype=F64), r"\(N, 2D\).*twice"),
    "gauss-targets": (GaussianNLL(), 4, torch.zeros(5, 3, dtype=F64), r"\(N, 2D\).*twice"),
}


@pytest.mark.parametrize("case", SHAPE_CASES)
def test_shape_and_dtype_mismatch(case):
    loss, out, y, pattern = SHAPE_CASES[case]
    with pytest.raises(ShapeError, match=pattern):
        Point(mlp(out), loss, x5, y)


def test_model_output_and_input_mismatch():
    class Cast(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3).to(F64)

        def forward(self, x):
            return self.lin(x).float()

    with pytest.raises(ShapeError, match=r"outputs dtype torch.float32.*one dtype"):
        Point(Cast(), CrossEntropy(), x5, y5)

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3).to(F64)

        def forward(self, x):
            return self.lin(x), x

    with pytest.raises(ShapeError, match=r"one tensor.*got tuple"):
        Point(Pair(), CrossEntropy(), x5, y5)
    with pytest.raises(ShapeError, match=r"inputs of dtype torch.float32.*float64.*x.to"):
        Point(mlp(), CrossEntropy(), x5.float(), y5)
    with pytest.raises(ShapeError, match=r"batch axis"):
        CrossEntropy().check(torch.zeros(3), torch.tensor(1))
    with pytest.raises(ShapeError, match=r"must be a tensor"):
        Point(mlp(), CrossEntropy(), x5, [0, 1, 2, 0, 1])


# ------------------------------------------------------------------------------ target values


@pytest.mark.parametrize(
    "loss,y,pattern",
    [
        (CrossEntropy(), torch.tensor([0, 1, 3, 0, 1]), r"\[0, 2\] for 3 logits.*\[0, 3\]"),
        (CrossEntropy(), torch.tensor([0, -1, 2, 0, 1]), r"\[0, 2\].*relabel"),
        (BCEWithLogits(), torch.full((5, 3), 1.5, dtype=F64), r"\[0, 1\].*1.5.*0/1 labels"),
        (BCEWithLogits(), torch.full((5, 3), -0.1, dtype=F64), r"\[0, 1\].*-0.1"),
    ],
)
def test_targets_out_of_range(loss, y, pattern):
    with pytest.raises(TargetError, match=pattern):
        Point(mlp(), loss, x5, y)


# ------------------------------------------------------------------------------ non-finite


def test_non_finite_inputs_targets_loss_gradient():
    x = x5.clone()
    x[2, 1] = float("nan")
    with pytest.raises(NonFiniteError, match=r"inputs hold 1 NaN.*clean"):
        Point(mlp(), CrossEntropy(), x, y5)
    y = torch.zeros(5, 3, dtype=F64)
    y[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"targets hold NaN.*clean"):
        Point(mlp(), MSE(), x5, y)
    with pytest.raises(NonFiniteError, match=r"loss is inf.*lower the step size"):
        Point(nn.Linear(3, 3).to(F64), MSE(), 1e200 * x5, torch.zeros(5, 3, dtype=F64))

    class Sqrt(nn.Module):  # finite loss, infinite derivative of sqrt at 0
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(3, dtype=F64))

        def forward(self, x):
            return x * self.w.sqrt()

    with pytest.raises(NonFiniteError, match=r"gradient holds NaN.*sqrt\(0\)"):
        Point(Sqrt(), CrossEntropy(), x5, y5)
    # the closure path (TorchOptimizer) says the same, parameters unchanged
    model = Sqrt()
    opt = steepest.TorchOptimizer(model, loss=CrossEntropy())
    with pytest.raises(NonFiniteError, match=r"gradient holds NaN.*sqrt\(0\)"):
        opt.step(lambda: (model(x5), y5))
    assert torch.equal(model.w.detach(), torch.zeros(3, dtype=F64))


# ------------------------------------------------------------------------------ singular, size


def singular_point():
    """GaussNewton of a model with more parameters (26) than outputs (5 x 2): rank <= 10."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64)
    x = torch.randn(5, 3, generator=seeded(2), dtype=F64)
    y = torch.randn(5, 2, generator=seeded(3), dtype=F64)
    return Point(model, MSE(), x, y)


def test_singular_matrix_cholesky():
    point = singular_point()
    m = GaussNewton().operator(point)
    with pytest.raises(SingularMatrixError, match=r"singular.*add damping.*CG\(\)"):
        Cholesky().solve(m + 0.0, -point.grad)
    zero = LinearOperator(lambda v: 0 * v, 4, F64, name="zero")
    with pytest.raises(SingularMatrixError, match=r"zero is singular"):
        Cholesky().solve(zero, torch.ones(4, dtype=F64))
    with pytest.raises(SingularMatrixError, match=r"lambda > 0.*set damping > 0"):
        Woodbury().solve(m, -point.grad)
    # damped, the same matrix is solved
    assert Cholesky().solve(m + 1e-3, -point.grad).exact


def test_dense_too_large():
    op = Identity().operator(singular_point())
    with pytest.raises(DenseTooLargeError, match=r"26 x 26 exceeds the limit of 25.*CG\(\)"):
        op.to_dense(limit=25)
    with pytest.raises(DenseTooLargeError, match=r"limit of 10.*set_dense_limit"):
        Cholesky(limit=10).solve(op + 1.0, torch.ones(26, dtype=F64))
    import steepest.linop as linop

    old = linop.DENSE_LIMIT
    try:
        set_dense_limit(20)
        with pytest.raises(DenseTooLargeError, match="limit of 20"):
            op.to_dense()
        assert op.to_dense(limit=26).shape == (26, 26)
    finally:
        set_dense_limit(old)
    assert op.to_dense().shape == (26, 26)


def test_metric_needs_probabilistic_loss():
    point = Point(mlp(), lambda z, y: (z - y).pow(2).sum(1), x5, torch.zeros(5, 3, dtype=F64))
    for metric in (Fisher(), Fisher(mc_samples=2), EmpiricalFisher()):
        with pytest.raises(LossNotProbabilisticError, match=r"probabilistic loss.*CrossEntropy"):
            metric.operator(point)
        with pytest.raises(LossNotProbabilisticError, match=metric.name):
            steepest.Optimizer(mlp(), lambda z, y: (z - y).pow(2).sum(1), metric=metric)


def test_configuration_errors():
    with pytest.raises(ConfigurationError, match="mc_samples"):
        Fisher(mc_samples=0)
    with pytest.raises(ConfigurationError, match="tol"):
        CG(tol=-1.0)
    with pytest.raises(ConfigurationError, match="'raise' or 'clip'"):
        Cholesky(indefinite="abs")
    with pytest.raises(ConfigurationError, match="unknown solver.*'cg'"):
        as_solver("lu")
    op = Identity().operator(singular_point())
    with pytest.raises(ConfigurationError, match=r"no sample-space factor.*Cholesky\(\) or CG"):
        Woodbury().solve(op + 1.0, torch.ones(op.size, dtype=F64))
    with pytest.raises(ConfigurationError, match="preconditioner must be positive"):
        CG(preconditioner=torch.zeros(op.size, dtype=F64)).solve(op, torch.ones(op.size, dtype=F64))
    with pytest.raises(ShapeError, match=r"shape \(26,\), got \(30,\)"):
        op @ torch.ones(30, dtype=F64)


# ------------------------------------------------------------------------------ the optimizer


def snapshot(opt):
    return [p.detach().clone() for p in opt.model.parameters()], copy.deepcopy(opt.state_dict())


def same_state(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same_state(u, v) for u, v in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


def assert_unchanged(opt, snap):
    params, state = snap
    assert all(torch.equal(p, q) for p, q in zip(opt.model.parameters(), params))
    assert same_state(opt.state_dict(), state)


def trained_optimizer(**kw):
    """An optimizer after two accepted steps, so that its state is not the initial one."""
    model = mlp()
    opt = steepest.Optimizer(
        model,
        CrossEntropy(),
        metric=Fisher(mc_samples=2),
        damping=steepest.LevenbergMarquardt(1e-2),
        momentum=0.5,
        **kw,
    )
    for _ in range(2):
        opt.step(x5, y5)
    return opt


BAD_BATCHES = {
    "target-range": (TargetError, x5, torch.tensor([0, 1, 2, 3, 0])),
    "target-dtype": (ShapeError, x5, y5.to(F64)),
    "batch-size": (ShapeError, x5, y5[:4]),
    "nan-input": (NonFiniteError, torch.where(x5 > 1, float("nan"), x5), y5),
    "input-dtype": (ShapeError, x5.float(), y5),
}


@pytest.mark.parametrize("case", BAD_BATCHES)
def test_optimizer_raises_before_any_change(case):
    cls, x, y = BAD_BATCHES[case]
    opt = trained_optimizer()
    snap = snapshot(opt)
    with pytest.raises(cls):
        opt.step(x, y)
    assert_unchanged(opt, snap)
    opt.step(x5, y5)  # and it still works
    assert opt.steps == 3


def test_optimizer_restores_on_solver_failures():
    point = singular_point()
    model = point.space.model
    x, y = point.inputs, point.y
    for solver, damping, cls in (
        (Cholesky(), 0.0, SingularMatrixError),
        (Cholesky(limit=10), 1e-3, DenseTooLargeError),
        (Woodbury(), 0.0, SingularMatrixError),
    ):
        opt = steepest.Optimizer(
            model, MSE(), metric=GaussNewton(), damping=damping, solver=solver, momentum=0.5
        )
        snap = snapshot(opt)
        with pytest.raises(cls):
            opt.step(x, y)
        assert_unchanged(opt, snap)
    # after some accepted steps too
    opt = steepest.Optimizer(
        model, MSE(), metric=GGN(), damping=1e-2, solver=Cholesky(), momentum=0.5
    )
    opt.step(x, y)
    opt.step(x, y)
    opt.solver = Cholesky(limit=10)
    snap = snapshot(opt)
    with pytest.raises(DenseTooLargeError):
        opt.step(x, y)
    assert_unchanged(opt, snap)

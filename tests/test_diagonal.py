"""``Diagonal(base, power)`` against the diagonal of dense references (tests/reference.py).

For every loss and every row of Table 1 that applies, the exact diagonal equals the diagonal of
the independently built dense metric in float64; the power, the own inverse (at rounding
level), ``Auto`` choosing it, Hutchinson's estimate converging to the exact diagonal, and the
Adam-like optimizer it gives training a model.
"""

from __future__ import annotations

import pytest
import reference as ref
import torch
from reference import rel_err, seeded
from test_metrics import CASES, METRICS, N, make_loss, mlp

import steepest
from steepest.diagonal import Diagonal
from steepest.errors import ConfigurationError, SingularMatrixError
from steepest.losses import CrossEntropy
from steepest.metrics import GGN, EmpiricalFisher, Hessian
from steepest.point import Point
from steepest.solvers import Auto, OwnInverse

F64 = torch.float64


def _point(loss_name: str, seed: int = 123):
    loss, c, targets = make_loss(loss_name)
    model = mlp(c)
    g = seeded(1)
    x = torch.randn(N, 3, generator=g, dtype=F64)
    y = targets(g, N)
    return model, loss, x, y, Point(model, loss, x, y, generator=seeded(seed))


@pytest.mark.parametrize("loss_name,metric_name", CASES)
def test_exact_diagonal_equals_dense_reference(loss_name, metric_name):
    model, loss, x, y, point = _point(loss_name)
    sampled = None
    if metric_name == "fisher-mc":
        z = point.z.detach()
        draws = loss.sample(z.repeat(3, *([1] * (z.ndim - 1))), seeded(123))
        sampled = list(draws.split(N))
    dense = ref.metric(metric_name, model, loss, x, y, sampled_targets=sampled)
    op = Diagonal(METRICS[metric_name]()).operator(point)
    assert rel_err(op.to_dense(), torch.diag(dense.diagonal())) < 1e-10
    v = torch.randn(op.size, generator=seeded(2), dtype=F64)
    assert rel_err(op @ v, dense.diagonal() * v) < 1e-10


@pytest.mark.parametrize("power", [0.5, 0.75, 2.0])
def test_power_and_own_inverse(power):
    model, loss, x, y, point = _point("ce")
    dense = ref.metric("ggn", model, loss, x, y)
    d = dense.diagonal().clamp_min(0) ** power
    op = Diagonal(GGN(), power=power).operator(point)
    assert rel_err(op.diagonal(), d) < 1e-10
    damped = op + 0.3
    b = torch.randn(op.size, generator=seeded(5), dtype=F64)
    assert isinstance(Auto().choose(damped), OwnInverse)
    sol = Auto().solve(damped, b)
    assert sol.exact and sol.residual < 1e-14
    assert rel_err(sol.x, b / (d + 0.3)) < 1e-14
    # a diagonal damping diag(s) too (MoreTrustRegion's lambda D^2)
    s = torch.rand(op.size, generator=seeded(6), dtype=F64) + 0.1
    sol = OwnInverse().solve(op.add_diagonal(s), b)
    assert rel_err(sol.x, b / (d + s)) < 1e-14


def test_hutchinson_converges_to_exact():
    model, loss, x, y, point = _point("mse")
    exact = ref.metric("ggn", model, loss, x, y).diagonal()
    errs = [
        rel_err(
            Diagonal(GGN(), mc_samples=k).base_diagonal(
                Point(model, loss, x, y, generator=seeded(7))
            ),
            exact,
        )
        for k in (4, 400)
    ]
    assert errs[1] < 0.15 and errs[1] < errs[0] / 5  # error ~ 1/sqrt(k): 10x fewer at 100x k


def test_hessian_diagonal_indefinite_is_not_own_inverted():
    # the Hessian of the cauchy loss has negative diagonal entries: power 1 keeps them, the
    # operator is not PSD and Auto does not divide by them
    *_, point = _point("callable")
    op = Diagonal(Hessian()).operator(point)
    if bool((op.diagonal() < 0).any()):
        assert not op.psd and not isinstance(Auto().choose(op + 1e-3), OwnInverse)


def test_zero_entries_without_damping_are_singular():
    *_, point = _point("ce")
    op = Diagonal(GGN()).operator(point)
    op._inverse = lambda b, s: b / (0 * b + s)  # an all-zero diagonal
    with pytest.raises(SingularMatrixError, match="singular"):
        OwnInverse().solve(op, torch.ones(op.size, dtype=F64))


def test_bad_arguments_named():
    with pytest.raises(ConfigurationError, match="power"):
        Diagonal(power=0)
    with pytest.raises(ConfigurationError, match="mc_samples"):
        Diagonal(mc_samples=0)
    with pytest.raises(ConfigurationError, match="base"):
        Diagonal(base="ggn")


def test_adam_like_diagonal_trains():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(
        F64
    )
    g = seeded(3)
    x = torch.randn(64, 4, generator=g, dtype=F64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    opt = steepest.Optimizer(
        model, CrossEntropy(), metric=Diagonal(EmpiricalFisher(), 0.5), damping=1e-8, step=0.05
    )
    first = opt.step(x, y)
    for _ in range(60):
        info = opt.step(x, y)
    assert first.solver == "OwnInverse"
    assert info.loss < 0.6 * first.loss


def test_own_inverse_of_several_columns():
    """The own inverse of (D + lambda I) for a right-hand side of k columns (P, k), scalar and
    per-parameter shifts, against the dense solve."""
    *_, point = _point("ce")
    op = Diagonal(GGN()).operator(point)
    b = torch.randn(op.size, 3, generator=seeded(70), dtype=torch.float64)
    dense = op.to_dense()
    eye = torch.eye(op.size, dtype=torch.float64)
    x = (op + 0.1).solve(b)
    assert x.shape == b.shape
    assert rel_err(x, torch.linalg.solve(dense + 0.1 * eye, b)) < 1e-12
    shift = torch.rand(op.size, generator=seeded(71), dtype=torch.float64) + 0.1
    x = op._inverse(b, shift)  # a per-parameter shift (weight decay beside lambda)
    assert rel_err(x, torch.linalg.solve(dense + torch.diag(shift), b)) < 1e-12

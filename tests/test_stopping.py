"""Issue 12's defects on the model path of ``Optimizer``: stopping rules (``StepInfo.converged``
with MINPACK's ftol / xtol / gtol), bounded messages, the scale-free adaptive trust radius,
no constant damping under Newton with a trust region, no livelock of LM + Cholesky on an
indefinite Hessian, ``Auto``'s dense route for small indefinite M, LM's bounds relative to M,
and models whose outputs are not per sample."""

from __future__ import annotations

import math

import pytest
import torch
from reference import ResidualsAsSamples
from torch import nn

from steepest import Optimizer, TorchOptimizer
from steepest.damping import LevenbergMarquardt, MoreTrustRegion
from steepest.errors import ConfigurationError
from steepest.losses import MSE, CallableLoss
from steepest.metrics import GaussNewton, Hessian
from steepest.point import Point
from steepest.solvers import Cholesky
from steepest.steps import TrustRegion

DT = torch.float64
X0 = torch.zeros(1, 1, dtype=DT)
VALUE = CallableLoss(lambda z, y: z[:, 0])  # the loss is the model's output: minimise f(theta)


class Fun(nn.Module):
    """One parameter theta; the output f(theta) for every input row."""

    def __init__(self, theta0: float, f) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor([theta0], dtype=DT))
        self.f = f

    def forward(self, x):
        return self.f(self.theta).expand(x.shape[0], 1)


class Decay(nn.Module):
    """a exp(-b t) + c."""

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor([1.0, 1.0, 0.0], dtype=DT))

    def forward(self, t):
        a, b, c = self.p
        return a * torch.exp(-b * t) + c


def run(opt: Optimizer, x, y, steps: int) -> list:
    infos = []
    for _ in range(steps):
        infos.append(opt.step(x, y))
        if infos[-1].converged:
            break
    return infos


def test_converged_with_reason_and_no_endless_rejected_tries():
    """The issue's first report: a exp(-b x) + c with GaussNewton and MoreTrustRegion reached
    the optimum, then every step burnt its tries on rejections with a message of kilobytes."""
    t = torch.linspace(0, 4, 30, dtype=DT)[:, None]
    noise = 0.01 * torch.sin(7 * t)
    y = 2.5 * torch.exp(-1.3 * t) + 0.5 + noise
    model = Decay()
    opt = Optimizer(model, MSE(), metric=GaussNewton(), damping=MoreTrustRegion())
    infos = run(opt, t, y, 60)
    last = infos[-1]
    assert last.converged and last.reason in ("ftol", "xtol", "ftol and xtol")
    assert len(infos) < 40 and all(len(i.message) < 300 for i in infos)
    assert not any(i.converged for i in infos[:-1])
    # the optimum: the normal equations hold (J^T r = 0, relative to |J| |r|)
    point = Point(model, MSE(), t, y)
    assert float(point.grad.norm()) < 1e-5 * math.sqrt(2 * point.value)
    # steps after convergence: at most a few tries, each flagged converged, never 30
    for _ in range(3):
        info = opt.step(t, y)
        assert info.converged and info.tries <= 3 and len(info.message) < 300
    # turned off: the same run does not report convergence
    off = Optimizer(Decay(), MSE(), metric=GaussNewton(), damping=MoreTrustRegion(), ftol=0, xtol=0)
    assert not any(i.converged for i in run(off, t, y, 15))


def test_xtol_fires_at_a_zero_solution_and_gtol_on_the_gradient():
    # zero residual with theta* = 0: the relative xtol gets + xtol, so it fires
    opt = Optimizer(
        Fun(1.0, lambda th: th**3),
        MSE(),
        metric=GaussNewton(),
        damping=LevenbergMarquardt(),
        gtol=0.0,
    )
    infos = run(opt, X0, X0, 200)
    assert infos[-1].converged and "xtol" in infos[-1].reason and len(infos) < 150
    opt = Optimizer(Fun(3.0, lambda th: (th - 1) ** 2), VALUE, metric=Hessian(), gtol=1e-3)
    infos = run(opt, X0, X0, 30)
    assert infos[-1].converged and infos[-1].reason == "gtol" and infos[-1].tries == 0
    assert abs(float(opt.model.theta.detach()) - 1) < 1e-3
    for bad in (-1.0, math.nan, True):
        with pytest.raises(ConfigurationError, match="ftol must be"):
            Optimizer(Fun(1.0, lambda th: th), VALUE, ftol=bad)


def _decay_problem():
    t = torch.linspace(0, 4, 12, dtype=DT)[:, None]
    return t, 2.5 * torch.exp(-1.3 * t) + 0.5 + 0.05 * torch.sin(7 * t)


def _cosine_reference(t, y, sigma: float) -> float:
    """MINPACK's gtol quantity max_j |J_j^T r| / (|J_j| |r|) of r(p) = (f(t; p) - y) / sigma
    at the start, with J by torch.autograd.functional (dense, float64)."""

    def r(p):
        a, b, c = p
        return ((a * torch.exp(-b * t) + c - y) / sigma).reshape(-1)

    p0 = Decay().p.detach()
    jac = torch.autograd.functional.jacobian(r, p0)
    res = r(p0)
    return float(((jac.T @ res).abs() / (jac.norm(dim=0) * res.norm())).max())


@pytest.mark.parametrize(
    "metric, damping, sigma, options",
    [
        ("gauss-newton", "more", 1.0, {}),  # diag(J^T J) from the matrix MoreTrustRegion forms
        ("gauss-newton", "more", 0.5, {}),  # GaussNewton's M has no 1/sigma^2: divided out
        ("ggn", "lm", 0.5, {}),  # GGN = J^T J / sigma^2: its own diagonal
        ("identity", "lm", 1.0, {}),  # another metric: one GGN diagonal computed apart
        ("ggn", "lm", 1.0, {"curvature_batch_size": 4}),  # M on a sub-batch: not used
    ],
)
def test_gtol_is_minpacks_cosine_for_a_least_squares_loss(metric, damping, sigma, options):
    """For an MSE loss gtol tests MINPACK's cosine between the residual and the columns of its
    Jacobian, against a dense reference: just above it the step stops converged before any
    try (parameters, lambda and the generator unchanged); just below it a step is made."""
    from steepest.metrics import GGN, Identity

    t, y = _decay_problem()
    cos = _cosine_reference(t, y, sigma)
    make = {"gauss-newton": GaussNewton, "ggn": GGN, "identity": Identity}[metric]
    for factor, stops in ((1 + 1e-9, True), (1 - 1e-9, False)):
        model = Decay()
        rule = MoreTrustRegion() if damping == "more" else LevenbergMarquardt()
        opt = Optimizer(
            model, MSE(sigma), metric=make(), damping=rule, gtol=cos * factor, **options
        )
        gen = opt.generator.get_state()
        info = opt.step(t, y)
        assert info.converged == stops and (info.reason == "gtol") == stops
        if stops:
            assert info.tries == 0 and info.nfev == 1 and "<= gtol" in info.message
            assert torch.equal(model.p.detach(), Decay().p.detach())
            assert torch.equal(opt.generator.get_state(), gen)
        else:
            assert info.tries >= 1
    # the gradient test max_j |g_j| <= gtol would decide otherwise on one side of the pair
    point = Point(Decay(), MSE(sigma), t, y)
    assert abs(float(point.grad.abs().max()) - cos) > 0.1 * cos


def test_gtol_keeps_the_gradient_test_for_other_losses():
    """A loss without residuals (the model's output itself) keeps max_j |g_j| <= gtol."""
    opt = Optimizer(Fun(1.0 + 1e-4, lambda th: (th - 1) ** 2), VALUE, metric=Hessian(), gtol=3e-4)
    info = opt.step(X0, X0)
    assert info.converged and info.reason == "gtol" and "max |g_j|" in info.message


def test_messages_are_bounded_over_many_rejected_tries():
    # LM from a tiny lambda on a stiff problem: many rejected tries in one step
    opt = Optimizer(
        Fun(3.0, lambda th: torch.sqrt(1 + (1e3 * th) ** 2)),
        VALUE,
        metric=Hessian(),
        damping=LevenbergMarquardt(1e-12),
        solver=Cholesky(),
        ftol=0,
        xtol=0,
    )
    info = opt.step(X0, X0)
    assert info.tries > 5
    assert info.message.count("rejected") <= 2 and len(info.message) < 300


@pytest.mark.parametrize("eps,steps", [(1.0, 1), (0.1, 6)])
def test_adaptive_trust_radius_is_scale_free(eps, steps):
    """1e16 x^2 from 1 with Newton: 164 steps with absolute radii, one with eps = 1 relative to
    the first step."""
    model = Fun(1.0, lambda th: 1e16 * th**2)
    opt = Optimizer(model, VALUE, metric=Hessian(), step=TrustRegion(eps, adaptive=True))
    for _ in range(steps):
        opt.step(X0, X0)
    assert abs(float(model.theta.detach())) < 1e-8
    # the same problem scaled by 1e-16 takes the same steps
    small = Fun(1.0, lambda th: th**2)
    opt = Optimizer(small, VALUE, metric=Hessian(), step=TrustRegion(eps, adaptive=True))
    for _ in range(steps):
        opt.step(X0, X0)
    assert abs(float(small.theta.detach())) < 1e-8


def test_no_constant_damping_under_newton_with_a_trust_region():
    model = Fun(1.0, lambda th: 1e-4 * th**2)  # curvature 2e-4, below the default 1e-3
    opt = Optimizer(model, VALUE, metric=Hessian(), step=TrustRegion(1.0, adaptive=True))
    assert opt.damping.value == 0.0
    opt.step(X0, X0)
    assert abs(float(model.theta.detach())) < 1e-12  # the Newton step: one step
    assert Optimizer(Fun(1.0, lambda th: th), MSE()).damping.value == 1e-3  # elsewhere


def test_no_constant_damping_under_newton_with_a_trust_region_through_torch_optimizer():
    """The same default rule through TorchOptimizer (its damping default was a fixed 1e-3:
    152 steps on 1e-4 theta^2, lambda 1e-3 throughout): one Newton step."""
    theta = nn.Parameter(torch.tensor([1.0], dtype=DT))
    opt = TorchOptimizer([theta], metric=Hessian(), step=TrustRegion(1.0, adaptive=True))
    assert opt.steepest.damping.value == 0.0
    opt.step(lambda: 1e-4 * (theta**2).sum())
    assert abs(float(theta.detach())) < 1e-12
    assert opt.last_info.damping == 0.0
    other = nn.Parameter(torch.tensor([1.0], dtype=DT))
    assert TorchOptimizer([other], metric=Hessian()).steepest.damping.value == 1e-3


@pytest.mark.parametrize("solver", ["cholesky", "auto"])
def test_lm_newton_on_an_indefinite_hessian_does_not_livelock(solver):
    """x^4 - 1e7 x^2 from 1e-3: H = -2e7 there. Before: Cholesky failed at every lambda of 20
    tries, lambda was restored, and every later step failed the same way; Auto took CG, which
    truncated at negative curvature while lambda sank to its floor."""
    model = Fun(1e-3, lambda th: th**4 - 1e7 * th**2)
    opt = Optimizer(model, VALUE, metric=Hessian(), damping=LevenbergMarquardt(), solver=solver)
    infos = run(opt, X0, X0, 60)
    assert any(i.accepted for i in infos[:3])  # the raised lambda is kept: no livelock
    assert infos[-1].converged
    assert float(model.theta.detach()) == pytest.approx(math.sqrt(5e6), rel=1e-6)  # the minimiser
    if solver == "auto":
        assert all(i.solver == "Cholesky" for i in infos)  # the dense route, not CG


def test_lm_bounds_are_relative_to_the_metric():
    """Residual 1e10 atan(x) from 2: GN overshoots and lambda must reach ~|M| = 4e18 >> 1e12."""
    model = Fun(2.0, lambda th: 1e10 * torch.atan(th))
    opt = Optimizer(model, MSE(), metric=GaussNewton(), damping=LevenbergMarquardt())
    infos = [opt.step(X0, X0) for _ in range(10)]
    assert sum(i.accepted for i in infos) >= 5
    assert abs(float(model.theta.detach())) < 1e-6


def test_outputs_not_per_sample_take_the_batched_route():
    x, y = torch.zeros(3, 1, dtype=DT), torch.zeros(3, 1, dtype=DT)
    model = ResidualsAsSamples()
    point = Point(model, MSE(), x, y)
    ref = torch.autograd.functional.jacobian(ResidualsAsSamples.r, model.theta.detach())  # (3, 2)
    torch.testing.assert_close(point.jacobian(), ref[:, None, :], rtol=1e-12, atol=1e-12)
    r = ResidualsAsSamples.r(model.theta.detach())
    # per-sample loss gradients of l_i = r_i^2 / 2: r_i J_i
    torch.testing.assert_close(point.per_sample_grads(), r[:, None] * ref, rtol=1e-12, atol=1e-12)
    opt = Optimizer(model, MSE(), metric=GaussNewton(), damping=LevenbergMarquardt())
    infos = run(opt, x, y, 50)
    assert infos[-1].converged and infos[-1].loss < infos[0].loss


def test_a_gtol_stop_leaves_a_stateful_metric_unchanged():
    """The cosine is computed after the metric's operator is built: a gtol stop undoes that
    build (K-FAC's counters, factors and eigendecompositions), as a failed step does."""
    import copy

    from steepest import KFAC

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(15, 3, dtype=torch.float64)
    y = torch.randn(15, 2, dtype=torch.float64)
    opt = Optimizer(model, MSE(), metric=KFAC(), damping=LevenbergMarquardt(), gtol=1.0)
    before = copy.deepcopy(opt.state_dict())
    info = opt.step(x, y)
    assert info.converged and info.reason == "gtol"
    after = opt.state_dict()
    assert after["metric"]["calls"] == before["metric"]["calls"] == 0
    assert after["metric"]["factors"] is None and after["metric"]["eig"] is None
    assert torch.equal(after["generator"], before["generator"])


def test_a_gtol_stop_after_a_layout_change_keeps_the_new_layout():
    """A gtol stop right after the trainable parameters changed (a bias frozen) keeps the state
    reset for the new layout (before: the whole pre-step state came back, D and the previous
    solution of the old size, and the next step failed on a shape mismatch)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 1).double())
    x = torch.randn(30, 3, dtype=torch.float64)
    y = torch.randn(30, 1, dtype=torch.float64)
    opt = Optimizer(
        model, MSE(), metric=GaussNewton(), damping=MoreTrustRegion(), gtol=1e-6, warm_start=0.5
    )
    for _ in range(50):
        if opt.step(x, y).reason == "gtol":
            break
    model[0].bias.requires_grad_(False)
    with pytest.warns(Warning):
        info = opt.step(x, y)
    assert info.reason == "gtol"
    assert opt.damping.scale is None and opt._prev_solution is None
    info = opt.step(x, y + 0.3 * torch.randn(30, 1, dtype=torch.float64))
    assert info.accepted

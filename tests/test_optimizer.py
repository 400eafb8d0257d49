"""The Optimizer's mechanics (issue 4): Levenberg-Marquardt damping driven by rho, rejection and
rollback, indefinite metrics, Hessian-free CG (warm start, backtracking, preconditioners,
curvature sub-batches), line searches, momentum, state_dict, and every metric with every
mechanism."""

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from steepest import (
    CG,
    GGN,
    Armijo,
    Cholesky,
    EmpiricalFisher,
    Fisher,
    GaussNewton,
    GradientCovariance,
    Hessian,
    Identity,
    KLLineSearch,
    LearningRate,
    LevenbergMarquardt,
    MoreTrustRegion,
    Optimizer,
    TrustRegion,
    curvature,
)
from steepest.errors import (
    ConfigurationError,
    NonFiniteError,
    SingularMatrixError,
    SolverError,
)
from steepest.linop import LinearOperator
from steepest.losses import MSE, BCEWithLogits, CallableLoss, CrossEntropy
from steepest.metrics import Metric
from steepest.point import Point, evaluate

DT = torch.float64


# ---------------------------------------------------------------------------- fixtures
def mlp(seed: int, n_in: int = 3, hidden: int = 5, n_out: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, n_out)).to(DT)


def regression(seed: int, n: int = 32, n_in: int = 3, n_out: int = 1):
    g = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(n, n_in, dtype=DT, generator=g)
    y = torch.sin(x.sum(1, keepdim=True)).repeat(1, n_out) + 0.1 * torch.randn(
        n, n_out, dtype=DT, generator=g)
    return x, y


def classification(seed: int, n: int = 32, n_in: int = 3, classes: int = 3):
    g = torch.Generator().manual_seed(2000 + seed)
    x = torch.randn(n, n_in, dtype=DT, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def full_loss(opt: Optimizer, x, y) -> float:
    return evaluate(opt.space, opt.loss, x, y, opt.space.get())[0]


def snapshot(opt: Optimizer) -> tuple[torch.Tensor, dict]:
    return opt.space.get(), copy.deepcopy(opt.state_dict())


def assert_state_equal(a: dict, b: dict, skip: tuple[str, ...] = ()) -> None:
    assert set(a) == set(b)
    for k in a:
        if k in skip:
            continue
        va, vb = a[k], b[k]
        if isinstance(va, torch.Tensor) or isinstance(vb, torch.Tensor):
            assert va is not None and vb is not None and torch.equal(va, vb), k
        else:
            assert va == vb, k


class Scalar(nn.Module):
    """theta in R^k; forward gives the same output row for every input: z_i = w . theta."""

    def __init__(self, theta, weights=None):
        super().__init__()
        self.theta = nn.Parameter(torch.as_tensor(theta, dtype=DT).clone())
        k = self.theta.numel()
        self.register_buffer("w", torch.ones(k, dtype=DT) if weights is None else
                             torch.as_tensor(weights, dtype=DT))

    def forward(self, x):
        return (self.theta * self.w).sum().expand(x.shape[0], 1) + 0 * x[:, :1]


# ---------------------------------------------------------------------------- LM damping
@pytest.mark.parametrize("metric", [GaussNewton(), GGN(), Fisher(), Hessian()],
                         ids=lambda m: repr(m))
def test_lm_lambda_decreases_on_a_quadratic(metric):
    """Linear model + MSE: L is quadratic and these metrics equal its Hessian, so rho = 1."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).to(DT)
    x, y = regression(0, n_out=2)
    lm = LevenbergMarquardt(init=1e-1, decrease=0.5, increase=2.0)
    opt = Optimizer(model, MSE(), metric=metric, damping=lm, solver=Cholesky())
    for k in range(3):
        info = opt.step(x, y)
        assert info.accepted and info.tries == 1
        assert info.rho == pytest.approx(1.0, abs=1e-9)
        assert info.actual_reduction == pytest.approx(info.predicted_reduction, rel=1e-9)
        assert opt.damping.value == pytest.approx(1e-1 * 0.5 ** (k + 1), rel=1e-12)


def _overestimating_problems():
    """(name, metric, model, loss, x, y) whose quadratic model overestimates the decrease."""
    x1 = torch.zeros(4, 1, dtype=DT)
    huber = CallableLoss(lambda z, y: torch.sqrt(1 + z[:, 0] ** 2))  # pseudo-Huber, flat tails
    bce_y = torch.zeros(4, 1, dtype=DT)  # labels 0 with logit 5: a confident mistake
    return [
        ("identity-stiff", Identity(), Scalar([1.0, 1.0], [10.0, 0.0]), MSE(), x1,
         torch.zeros(4, 1, dtype=DT)),
        ("hessian-huber", Hessian(), Scalar([3.0]), huber, x1, x1),
        ("ggn-huber", GGN(), Scalar([3.0]), huber, x1, x1),
        ("fisher-bce", Fisher(), Scalar([5.0]), BCEWithLogits(), x1, bce_y),
        ("ggn-bce", GGN(), Scalar([5.0]), BCEWithLogits(), x1, bce_y),
        ("hessian-bce", Hessian(), Scalar([5.0]), BCEWithLogits(), x1, bce_y),
    ]


@pytest.mark.parametrize("case", _overestimating_problems(), ids=lambda c: c[0])
def test_lm_lambda_increases_when_the_model_overestimates(case):
    _, metric, model, loss, x, y = case
    lm = LevenbergMarquardt(init=1e-6, decrease=0.5, increase=2.0, reject=False)
    opt = Optimizer(model, loss, metric=metric, damping=lm, solver="cholesky")
    info = opt.step(x, y)
    assert info.rho < 0.25
    assert info.predicted_reduction > 0 and info.actual_reduction < 0.25 * info.predicted_reduction
    assert info.accepted and info.tries == 1  # reject=False: taken anyway
    assert opt.damping.value == pytest.approx(2e-6, rel=1e-12)


def _stiff_identity(momentum=0.0, warm_start=0.0, solver="auto", lam=1e3, **lm):
    model = Scalar([1.0, 1.0], [10.0, 0.0])
    x, y = torch.zeros(4, 1, dtype=DT), torch.zeros(4, 1, dtype=DT)
    opt = Optimizer(model, MSE(), metric=Identity(), solver=solver,
                    damping=LevenbergMarquardt(init=lam, decrease=0.5, increase=2.0, **lm),
                    momentum=momentum, warm_start=warm_start)
    return opt, x, y


def test_rejected_step_leaves_parameters_and_state_unchanged_but_lambda():
    opt, x, y = _stiff_identity(momentum=0.5, warm_start=0.9, solver=CG(), max_tries=1)
    assert opt.step(x, y).accepted  # lambda = 1e3: a short step, fills momentum and warm start
    opt.damping.lam = 1e-3  # now the step -g/(1 + lambda) overshoots: the loss goes up
    theta0, state0 = snapshot(opt)
    info = opt.step(x, y)
    assert not info.accepted and info.tries == 1 and info.step_norm == 0.0
    assert info.loss_new > info.loss and info.rho < 0
    assert "rejected" in info.message and "went up" in info.message
    assert torch.equal(opt.space.get(), theta0)
    state = opt.state_dict()
    assert_state_equal(state, state0, skip=("damping",))
    assert opt.damping.value == pytest.approx(2e-3, rel=1e-12)  # raised once, as documented


def test_rejected_steps_are_retried_until_the_loss_goes_down():
    opt, x, y = _stiff_identity(lam=1e-3)
    before = full_loss(opt, x, y)
    info = opt.step(x, y)
    assert info.accepted and info.tries > 1
    # the rejected tries are counted, not listed one by one (a bounded message)
    assert f"{info.tries - 1} times, the last: try rejected: the loss went up" in info.message
    assert info.message.count("rejected") == 1 and len(info.message) < 200
    assert info.loss_new <= info.loss and full_loss(opt, x, y) == pytest.approx(info.loss_new)
    assert full_loss(opt, x, y) < before
    assert info.damping == pytest.approx(1e-3 * 2.0 ** (info.tries - 1), rel=1e-12)


def test_non_finite_loss_after_the_step_restores_everything():
    class Exp(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.tensor([1.0], dtype=DT))

        def forward(self, x):
            return torch.exp(self.a * x)

    x = torch.linspace(1, 2, 8, dtype=DT).view(-1, 1)
    y = torch.full_like(x, 100.0)  # pulls a up: exp(a x) overflows after the long step
    model = Exp()
    opt = Optimizer(model, MSE(), metric=Identity(), damping=0.0, step=LearningRate(1e6),
                    momentum=0.3)
    theta0, state0 = snapshot(opt)
    with pytest.raises(NonFiniteError, match="not finite after the step") as err:
        opt.step(x, y)
    assert "LevenbergMarquardt()" in str(err.value)  # advised: not the rule in use
    assert torch.equal(opt.space.get(), theta0)
    assert_state_equal(opt.state_dict(), state0)


def test_non_finite_trial_losses_are_rejected_tries_under_levenberg_marquardt():
    """Issue 9: a loss finite at the point but not at the tries is a rejected step (lambda
    raised and kept), not a failure that restores lambda and repeats forever."""

    class Exp(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.tensor([1.0], dtype=DT))

        def forward(self, x):
            return torch.exp(self.a * x)

    x = torch.linspace(1, 2, 8, dtype=DT).view(-1, 1)
    y = torch.full_like(x, 100.0)
    lm = LevenbergMarquardt(init=1e-9, max_tries=3)
    opt = Optimizer(Exp(), MSE(), metric=Identity(), damping=lm, step=LearningRate(1e6))
    theta0 = opt.space.get()
    info = opt.step(x, y)
    assert not info.accepted and info.tries == 3
    assert torch.equal(opt.space.get(), theta0)
    assert lm.value == pytest.approx(1e-9 * 3.0**3, rel=1e-12)  # raised and kept
    for _ in range(40):
        info = opt.step(x, y)
        if info.accepted:
            break
    assert info.accepted and math.isfinite(info.loss_new) and info.loss_new < info.loss


class _NaNMetric(Metric):
    name = "NaN"

    def operator(self, point):
        return LinearOperator(lambda v: v * math.nan, point.size, point.theta.dtype,
                              name=self.name)


def test_solver_breakdown_restores_everything():
    model = mlp(1)
    x, y = regression(1)
    for metric, solver, err in ((_NaNMetric(), CG(), SolverError),
                                (Hessian(), Cholesky(), SingularMatrixError)):
        opt = Optimizer(model, MSE(), metric=metric, damping=0.0, solver=solver,
                        curvature_batch_size=8)
        if isinstance(metric, Hessian):  # start at a saddle-ish point: large weights
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(4.0)
            h = curvature(model, MSE(), x, y, Hessian()).to_dense()
            assert torch.linalg.eigvalsh(h)[0] < 0
        theta0, state0 = snapshot(opt)
        with pytest.raises(err):
            opt.step(x, y)
        assert torch.equal(opt.space.get(), theta0)
        assert_state_equal(opt.state_dict(), state0)


# ---------------------------------------------------------------------------- indefinite
class Saddle(nn.Module):
    """z = theta_0^2 - theta_1^2 + theta_1^4 (bounded below, a saddle region near theta_1=0)."""

    def __init__(self, theta=(1.0, 0.1)):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(theta, dtype=DT))

    def forward(self, x):
        t = self.theta
        return (t[0] ** 2 - t[1] ** 2 + t[1] ** 4).expand(x.shape[0], 1) + 0 * x[:, :1]


IDENT = CallableLoss(lambda z, y: z[:, 0], name="value")


def test_cg_with_negative_curvature_gives_descent():
    x = torch.zeros(2, 1, dtype=DT)
    model = Saddle()
    opt = Optimizer(model, IDENT, metric=Hessian(), damping=0.0, solver=CG())
    h = curvature(model, IDENT, x, x, Hessian()).to_dense()
    assert torch.linalg.eigvalsh(h)[0] < 0
    info = opt.step(x, x)
    assert info.negative_curvature and "negative curvature" in info.message
    assert info.directional_derivative < 0
    assert info.accepted and info.loss_new < info.loss


@pytest.mark.parametrize("seed", range(4))
def test_cg_hessian_descent_on_random_mlps(seed):
    """Large random weights make the Hessian indefinite; every CG direction is still descent."""
    model = mlp(seed, hidden=6)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    x, y = regression(seed)
    opt = Optimizer(model, MSE(), metric=Hessian(), damping=0.0, solver=CG(maxiter=100),
                    step=Armijo())
    for _ in range(3):
        info = opt.step(x, y)
        assert info.directional_derivative < 0
        assert info.loss_new <= info.loss


def test_dense_path_on_an_indefinite_hessian_says_what_it_did():
    x = torch.zeros(2, 1, dtype=DT)
    # constant damping: a clear error naming the fixes
    opt = Optimizer(Saddle(), IDENT, metric=Hessian(), damping=0.0, solver=Cholesky())
    with pytest.raises(SingularMatrixError, match="indefinite='clip'"):
        opt.step(x, x)
    # LM damping: lambda is raised until M + lambda I is positive definite, and said so
    opt = Optimizer(Saddle(), IDENT, metric=Hessian(), solver=Cholesky(),
                    damping=LevenbergMarquardt(init=1e-3, increase=10.0))
    info = opt.step(x, x)
    assert info.accepted and info.tries > 1 and "damping raised" in info.message
    assert info.damping > 1.88 - 0.12  # above -lambda_min of H = diag(2, -1.88)
    # eigenvalue clipping, explicitly asked for
    opt = Optimizer(Saddle(), IDENT, metric=Hessian(), damping=0.0,
                    solver=Cholesky(indefinite="clip"), step=Armijo())
    info = opt.step(x, x)
    assert "eigenvalue clipping" in info.message and info.negative_curvature
    assert info.directional_derivative < 0 and info.loss_new < info.loss


# ---------------------------------------------------------------------------- line searches
ALL_METRICS = [Identity(), GaussNewton(), GGN(), Fisher(), Fisher(mc_samples=2),
               EmpiricalFisher(), GradientCovariance(), Hessian()]


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), metric=st.sampled_from(ALL_METRICS),
       classify=st.booleans(), lam=st.sampled_from([0.0, 1e-3, 1.0]))
def test_armijo_never_accepts_a_loss_increase(seed, metric, classify, lam):
    model = mlp(seed % 97, n_out=3 if classify else 1)
    x, y = classification(seed) if classify else regression(seed)
    loss = CrossEntropy() if classify else MSE()
    solver = CG() if isinstance(metric, Hessian) or lam == 0 else "auto"
    opt = Optimizer(model, loss, metric=metric, damping=lam, solver=solver,
                    step=Armijo(alpha0=1.0, c=1e-4))
    for _ in range(2):
        before = full_loss(opt, x, y)
        info = opt.step(x, y)
        after = full_loss(opt, x, y)
        assert after <= before
        if info.accepted:
            assert after == info.loss_new
            assert info.loss_new <= info.loss + 1e-4 * info.directional_derivative
        else:
            assert after == before


def _kl(loss, z_old, z_new):
    if isinstance(loss, CrossEntropy):
        lp, lq = torch.log_softmax(z_old, 1), torch.log_softmax(z_new, 1)
        return (lp.exp() * (lp - lq)).sum(1).mean()
    if isinstance(loss, MSE):
        return (0.5 * (z_old - z_new).pow(2).sum(1) / loss.sigma**2).mean()
    p, q = torch.sigmoid(z_old), torch.sigmoid(z_new)  # Bernoulli
    return (p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))).sum(1).mean()


@pytest.mark.parametrize("loss", [CrossEntropy(), MSE(0.5), BCEWithLogits()],
                         ids=lambda c: type(c).__name__)
@pytest.mark.parametrize("metric", [Fisher(), EmpiricalFisher(), Identity()],
                         ids=lambda m: repr(m))
def test_kl_line_search_keeps_the_kl_bound(loss, metric):
    classes = 3 if isinstance(loss, CrossEntropy) else 1
    model = mlp(3, n_out=classes)
    if isinstance(loss, CrossEntropy):
        x, y = classification(3)
    else:
        x, y = regression(3)
        if isinstance(loss, BCEWithLogits):
            y = (y > 0).to(DT)
    max_kl = 1e-3
    opt = Optimizer(model, loss, metric=metric, damping=1e-4, step=KLLineSearch(max_kl=max_kl))
    for _ in range(3):
        with torch.no_grad():
            z_old = model(x)
        info = opt.step(x, y)
        with torch.no_grad():
            z_new = model(x)
        assert info.accepted and info.loss_new < info.loss
        kl = float(_kl(loss, z_old, z_new))
        assert 0 < kl <= max_kl * (1 + 1e-9)
        # alpha = alpha0 beta^k (beta = 1/2) with alpha0^2 d^T A d = 2 max_kl
        k = math.log(info.quad_form / (2 * max_kl)) / (2 * math.log(0.5))
        assert abs(k - round(k)) < 1e-6 and round(k) >= 0


# ---------------------------------------------------------------------------- HF pieces
class RecordingCG(CG):
    """CG that records what the optimizer passed and what it returned."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls = []

    def solve(self, a, b, x0=None, preconditioner=None):
        sol = super().solve(a, b, x0=x0, preconditioner=preconditioner)
        self.calls.append(dict(x0=None if x0 is None else x0.clone(), pre=preconditioner,
                               sol=sol, lam=a.shift, keep=self.keep_iterates))
        return sol


def test_warm_start_uses_the_decayed_previous_cg_solution():
    model = mlp(4)
    x, y = regression(4)
    cg = RecordingCG(maxiter=4)
    opt = Optimizer(model, MSE(), metric=GGN(), solver=cg, damping=LevenbergMarquardt(1e-2),
                    warm_start=0.9, cg_backtracking=True)
    opt.step(x, y)
    opt.step(x, y)
    first, second = cg.calls[-2]["sol"], cg.calls[-1]
    # the solution of the last solve of step 1 (the last CG iterate, before backtracking)
    assert torch.equal(second["x0"], 0.9 * first.x)
    assert cg.calls[0]["x0"] is None


def test_cg_backtracking_keeps_the_best_iterate():
    model = mlp(5, hidden=8)
    x, y = regression(5)
    cg = RecordingCG(maxiter=30)
    opt = Optimizer(model, MSE(), metric=GGN(), solver=cg, damping=1e-6, cg_backtracking=True)
    theta0 = opt.space.get()
    info = opt.step(x, y)
    call = cg.calls[-1]
    assert 1 in call["keep"] and 2 in call["keep"] and 3 in call["keep"] and 5 in call["keep"]
    cands = [*call["sol"].iterates.values(), call["sol"].x]
    assert len(cands) >= 3
    losses = [evaluate(opt.space, opt.loss, x, y, theta0 + c)[0] for c in cands]
    # the chosen step is one of the candidates: going back from the last CG iterate while the
    # loss decreases (Martens 2010 section 4.6)
    k = len(losses) - 1
    while k > 0 and losses[k - 1] < losses[k]:
        k -= 1
    torch.testing.assert_close(opt.space.get() - theta0, cands[k], rtol=0, atol=1e-14)
    assert k < len(losses) - 1  # on this problem an early iterate is better than the last
    assert info.loss_new == losses[k] <= losses[-1]


def test_preconditioners_match_martens():
    model = mlp(6)
    x, y = regression(6)
    lam = 0.05
    # empirical Fisher: (diag(1/N sum_i grad l_i^2) + lambda)^(3/4), on the gradient batch
    cg = RecordingCG(maxiter=5)
    opt = Optimizer(model, MSE(), metric=GGN(), solver=cg, damping=lam,
                    preconditioner="empirical-fisher", xi=0.75)
    theta0 = opt.space.get()
    opt.step(x, y)
    f = opt.space.function()
    grads = torch.stack([
        torch.autograd.functional.jacobian(
            lambda t, i=i: MSE().value(f(t, x[i:i + 1]), y[i:i + 1]).sum(), theta0)
        for i in range(x.shape[0])])
    expected = (grads.pow(2).mean(0) + lam).pow(0.75)
    torch.testing.assert_close(cg.calls[-1]["pre"], expected, rtol=1e-10, atol=1e-14)
    # diagonal of the GGN + lambda
    model2 = mlp(6)
    cg2 = RecordingCG(maxiter=5)
    opt2 = Optimizer(model2, MSE(), metric=GGN(), solver=cg2, damping=lam,
                     preconditioner="diagonal")
    dense = curvature(model2, MSE(), x, y, GGN()).to_dense()
    opt2.step(x, y)
    torch.testing.assert_close(cg2.calls[-1]["pre"], dense.diagonal() + lam, rtol=1e-10,
                               atol=1e-14)


def test_curvature_on_a_sub_batch():
    x, y = regression(7, n=40)
    lam = 1e-2
    # explicit curvature batch: d = -(M_c + lambda I)^-1 g, g on the full batch
    model = mlp(7)
    theta0 = ParamSpaceGet(model)
    g = Point(model, MSE(), x, y).grad
    mc = curvature(model, MSE(), x[:8], y[:8], GGN()).to_dense()
    expected = -torch.linalg.solve(mc + lam * torch.eye(mc.shape[0], dtype=DT), g)
    opt = Optimizer(model, MSE(), metric=GGN(), damping=lam, solver=Cholesky())
    opt.step(x, y, curvature=(x[:8], y[:8]))
    torch.testing.assert_close(ParamSpaceGet(model) - theta0, expected, rtol=1e-9, atol=1e-12)
    # random sub-batch drawn with the optimizer's generator
    model = mlp(7)
    gen = torch.Generator().manual_seed(11)
    idx = torch.randperm(40, generator=torch.Generator().manual_seed(11))[:8]
    mc = curvature(model, MSE(), x[idx], y[idx], GGN()).to_dense()
    expected = -torch.linalg.solve(mc + lam * torch.eye(mc.shape[0], dtype=DT), g)
    opt = Optimizer(model, MSE(), metric=GGN(), damping=lam, solver=Cholesky(),
                    curvature_batch_size=8, generator=gen)
    opt.step(x, y)
    torch.testing.assert_close(ParamSpaceGet(model) - theta0, expected, rtol=1e-9, atol=1e-12)


def ParamSpaceGet(model):  # noqa: N802 - reads like the call it wraps
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_momentum_is_heavy_ball_on_the_direction():
    model = mlp(8)
    x, y = regression(8)
    lam, mu = 1e-1, 0.5
    opt = Optimizer(model, MSE(), metric=GGN(), damping=lam, solver=Cholesky(), momentum=mu,
                    step=LearningRate(0.5))
    opt.step(x, y)
    d_prev = opt.state_dict()["momentum_buffer"]
    theta1 = opt.space.get()
    point = Point(model, MSE(), x, y)
    m = curvature(model, MSE(), x, y, GGN()).to_dense()
    d = -torch.linalg.solve(m + lam * torch.eye(m.shape[0], dtype=DT), point.grad)
    assert float(point.grad @ (d + mu * d_prev)) < 0  # else the buffer would restart
    opt.step(x, y)
    torch.testing.assert_close(opt.space.get() - theta1, 0.5 * (d + mu * d_prev), rtol=1e-9,
                               atol=1e-12)


def test_adaptive_trust_region_grows_and_shrinks():
    # quadratic: rho = 1, the full (alpha = 1) step inside the region, eps grows
    torch.manual_seed(0)
    model = nn.Linear(3, 1).to(DT)
    x, y = regression(0)
    tr = TrustRegion(eps=1e-3, adaptive=True, relative=False)
    opt = Optimizer(model, MSE(), metric=GaussNewton(), damping=0.0, step=tr)
    info = opt.step(x, y)
    assert info.rho == pytest.approx(1.0, abs=1e-9) and tr.eps == pytest.approx(2e-3)
    assert info.quad_form == pytest.approx(1e-6, rel=1e-9)  # on the boundary
    tr.eps = 1e6
    info = opt.step(x, y)
    assert info.alpha == 1.0  # the Newton step lies inside: taken in full
    # overestimating model: eps shrinks and the increase is rejected and retried
    x1 = torch.zeros(4, 1, dtype=DT)
    huber = CallableLoss(lambda z, y: torch.sqrt(1 + z[:, 0] ** 2))
    tr = TrustRegion(eps=100.0, adaptive=True, relative=False)
    opt = Optimizer(Scalar([3.0]), huber, metric=Hessian(), damping=0.0, solver=Cholesky(),
                    step=tr)
    info = opt.step(x1, x1)
    assert info.tries > 1 and info.accepted and info.loss_new < info.loss
    assert tr.eps == pytest.approx(100.0 * 0.25 ** (info.tries - 1) * (
        2.0 if info.rho > 0.75 else 0.25 if info.rho < 0.25 else 1.0))


# ---------------------------------------------------------------------------- state_dict
CONFIGS = {
    "hf-lm-momentum-mc": dict(
        metric=Fisher(mc_samples=2), solver=CG(maxiter=10, progress_tol=5e-4),
        damping=LevenbergMarquardt(1e-2), momentum=0.5, warm_start=0.95, cg_backtracking=True,
        preconditioner="empirical-fisher", curvature_batch_size=12),
    "tr-adaptive-dense": dict(metric=GGN(), damping=LevenbergMarquardt(1e-3),
                              step=TrustRegion(eps=0.5, adaptive=True), curvature_batch_size=16,
                              momentum=0.3),
    "armijo-hessian": dict(metric=Hessian(), solver=CG(maxiter=20), damping=1e-3,
                           step=Armijo(), warm_start=0.5, curvature_batch_size=10),
    "more-trust-region": dict(metric=GGN(), damping=MoreTrustRegion(), solver="cholesky",
                              momentum=0.2),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_state_dict_resumes_bit_for_bit(name):
    x, y = classification(9, n=24)
    model = mlp(9, n_out=3)
    opt = Optimizer(model, CrossEntropy(), generator=torch.Generator().manual_seed(5),
                    **copy.deepcopy(CONFIGS[name]))
    for _ in range(3):
        opt.step(x, y)
    state = copy.deepcopy(opt.state_dict())
    clone = copy.deepcopy(model)
    expected = []
    for _ in range(3):
        opt.step(x, y)
        expected.append(opt.space.get())
    other = Optimizer(clone, CrossEntropy(), generator=torch.Generator().manual_seed(123),
                      **copy.deepcopy(CONFIGS[name]))
    other.load_state_dict(state)
    for theta in expected:
        other.step(x, y)
        assert torch.equal(other.space.get(), theta)
    assert other.damping.value == opt.damping.value


# ---------------------------------------------------------------------------- the matrix
METRICS = {"identity": Identity(), "gauss-newton": GaussNewton(), "ggn": GGN(),
           "fisher": Fisher(), "fisher-mc": Fisher(mc_samples=4),
           "empirical-fisher": EmpiricalFisher(), "gradient-covariance": GradientCovariance(),
           "hessian": Hessian()}
MECHANISMS = {
    "lm": dict(damping=LevenbergMarquardt(1e-2)),
    "lm-no-reject": dict(damping=LevenbergMarquardt(1.0, reject=False)),
    "trust-region": dict(damping=1e-2, step=TrustRegion(eps=0.05), solver=CG()),
    "trust-region-adaptive": dict(damping=1e-3, step=TrustRegion(eps=0.1, adaptive=True),
                                  solver=CG()),
    "armijo": dict(damping=1e-2, step=Armijo(), solver=CG()),
    "kl": dict(damping=1e-2, step=KLLineSearch(max_kl=1e-3), solver=CG()),
    "hessian-free": dict(damping=LevenbergMarquardt(1.0), warm_start=0.95, cg_backtracking=True,
                         solver=CG(maxiter=20, progress_tol=5e-4), preconditioner="diagonal"),
    "hf-ef-subbatch": dict(damping=LevenbergMarquardt(1.0), solver=CG(maxiter=20),
                           preconditioner="empirical-fisher", curvature_batch_size=12),
    "momentum": dict(damping=LevenbergMarquardt(1e-1), momentum=0.5, step=Armijo(),
                     solver=CG()),
    "more-trust-region": dict(damping=MoreTrustRegion()),
}


@pytest.mark.parametrize("mech", sorted(MECHANISMS))
@pytest.mark.parametrize("metric", sorted(METRICS))
def test_every_metric_with_every_mechanism_lowers_the_loss(metric, mech):
    x, y = regression(10, n=24)
    model = mlp(10, hidden=4)
    opt = Optimizer(model, MSE(), metric=copy.deepcopy(METRICS[metric]),
                    **copy.deepcopy(MECHANISMS[mech]))
    first = full_loss(opt, x, y)
    for _ in range(3):
        info = opt.step(x, y)
        assert math.isfinite(info.loss)
    assert full_loss(opt, x, y) < 0.95 * first


# ---------------------------------------------------------------------------- configuration
def test_configuration_errors():
    model = mlp(0)
    with pytest.raises(ConfigurationError, match="needs the CG solver"):
        Optimizer(model, MSE(), preconditioner="diagonal", solver="cholesky")
    with pytest.raises(ConfigurationError, match="needs the CG solver"):
        Optimizer(model, MSE(), cg_backtracking=True)
    for kw in (dict(momentum=1.0), dict(warm_start=-0.1), dict(xi=0.0), dict(xi=1.5),
               dict(preconditioner="jacobi", solver=CG()), dict(curvature_batch_size=0)):
        with pytest.raises(ConfigurationError):
            Optimizer(model, MSE(), **kw)
    opt = Optimizer(model, MSE())
    with pytest.raises(ConfigurationError, match="lacks keys"):
        opt.load_state_dict({"steps": 1})


def test_zero_gradient_is_reported_without_a_step():
    torch.manual_seed(0)
    model = nn.Linear(2, 1, bias=False).to(DT)
    with torch.no_grad():
        model.weight.zero_()
    x, y = torch.randn(5, 2, dtype=DT), torch.zeros(5, 1, dtype=DT)
    opt = Optimizer(model, MSE())
    info = opt.step(x, y)
    assert not info.accepted and info.grad_norm == 0 and "stationary" in info.message
    assert opt.steps == 0

"""The torch.optim adapter (steepest.torch_optim.TorchOptimizer): closure contracts against the
core steepest.Optimizer, schedulers, param_groups, state_dict, clear errors, roll-back, and a
DataLoader training loop."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import steepest
from steepest.errors import ConfigurationError, ShapeError
from steepest.losses import MSE, CrossEntropy, GaussianNLL
from steepest.torch_optim import TorchOptimizer

DT = torch.float64


def mlp(n_in: int = 3, n_out: int = 2, hidden: int = 5, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, n_out)).to(DT)


def regression(n: int = 24, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=DT)
    return x, torch.sin(x[:, :2]) + 0.1 * torch.randn(n, 2, generator=g, dtype=DT)


def classification(n: int = 24, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=DT)
    return x, torch.randint(0, 3, (n,), generator=g)


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# closures a user writes for each contract
def outputs_closure(model, x, y):
    return lambda: (model(x), y)


def scalar_closure(model, x, y, loss):
    return lambda: loss.value(model(x), y).mean()


def per_sample_closure(model, x, y, loss):
    return lambda: loss.value(model(x), y)


CASES = [
    # (metric factory, loss, closure kind, solver)
    (steepest.GGN, "mse", "outputs", "cholesky"),
    (steepest.GaussNewton, "mse", "outputs", "cg"),
    (steepest.Fisher, "ce", "outputs", "cholesky"),
    (steepest.GGN, "ce", "outputs", "woodbury"),
    (lambda: steepest.Fisher(mc_samples=2), "ce", "outputs", "cholesky"),
    (steepest.GGN, "gnll", "outputs", "cg"),
    (steepest.Identity, "mse", "scalar", "cholesky"),
    (steepest.Identity, "ce", "outputs", "cholesky"),
    (steepest.Hessian, "mse", "scalar", "cg"),
    (steepest.Hessian, "ce", "per-sample", "cg"),
    (steepest.Hessian, "mse", "outputs", "cg"),
    (steepest.GradientCovariance, "mse", "per-sample", "cholesky"),
    (lambda: steepest.GradientCovariance(centered=True), "ce", "outputs", "cholesky"),
    (steepest.EmpiricalFisher, "ce", "per-sample", "woodbury"),
]


def problem(name: str):
    if name == "mse":
        x, y = regression()
        return mlp(), MSE(), x, y
    if name == "ce":
        x, y = classification()
        return mlp(n_out=3), CrossEntropy(), x, y
    x, y = regression()  # GaussianNLL: outputs are 2 means then 2 log-variances
    return mlp(n_out=4), GaussianNLL(), x, y


def make_closure(kind, model, loss, x, y):
    if kind == "outputs":
        return outputs_closure(model, x, y)
    if kind == "scalar":
        return scalar_closure(model, x, y, loss)
    return per_sample_closure(model, x, y, loss)


@pytest.mark.parametrize("metric_f, loss_name, kind, solver", CASES)
def test_closure_contract_gives_the_core_step(metric_f, loss_name, kind, solver):
    """Two steps from a closure equal two steps of steepest.Optimizer on the same model and
    batch (directions to 1e-10; here bit-identical up to rounding), LM damping included."""
    _same_steps(metric_f, loss_name, kind, solver, lambda: steepest.LevenbergMarquardt(0.1))


@pytest.mark.parametrize(
    "metric_f, loss_name, kind, solver",
    [
        (steepest.GaussNewton, "mse", "outputs", "cholesky"),
        (steepest.GGN, "ce", "outputs", "woodbury"),
        (steepest.Hessian, "mse", "scalar", "cg"),
    ],
)
def test_closure_contract_with_the_scaled_trust_region(metric_f, loss_name, kind, solver):
    """The same with MoreTrustRegion (damping lambda D^2, lambda solved from the radius)."""
    _same_steps(metric_f, loss_name, kind, solver, steepest.MoreTrustRegion)


def _same_steps(metric_f, loss_name, kind, solver, damping_f):
    ref_model, loss, x, y = problem(loss_name)
    model = copy.deepcopy(ref_model)

    def kw():  # fresh rules for each optimizer: they hold state
        return dict(
            metric=metric_f(),
            damping=damping_f(),
            solver=steepest.CG(maxiter=12) if solver == "cg" else solver,
        )

    ref = steepest.Optimizer(ref_model, loss, step=steepest.LearningRate(0.7), **kw())
    opt = TorchOptimizer(model.parameters(), loss=loss, lr=0.7, **kw())
    closure = make_closure(kind, model, loss, x, y)
    for _ in range(2):
        theta0 = flat(model)
        r = ref.step(x, y)
        returned = opt.step(closure)
        info = opt.last_info
        assert torch.allclose(flat(model) - theta0, flat(ref_model) - theta0, rtol=0, atol=1e-10)
        assert float(returned) == pytest.approx(r.loss, abs=1e-12)
        assert info.accepted == r.accepted and info.tries == r.tries
        assert info.predicted_reduction == pytest.approx(r.predicted_reduction, rel=1e-8, abs=1e-14)
        assert info.damping == pytest.approx(r.damping, rel=1e-12)
    assert r.step_norm > 0  # the comparison was about real steps


def test_steplr_scheduler_changes_the_step():
    """StepLR halves param_groups[0]['lr'] and with it alpha: the second step is the core step
    with LearningRate(0.5), the first with LearningRate(1)."""
    ref_model, loss, x, y = problem("mse")
    model = copy.deepcopy(ref_model)
    opt = TorchOptimizer(model, loss=loss, metric=steepest.GGN(), lr=1.0, damping=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step(outputs_closure(model, x, y))
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.5
    before = flat(model)
    ref_model.load_state_dict(model.state_dict())
    opt.step(outputs_closure(model, x, y))
    assert opt.last_info.alpha == 0.5
    ref = steepest.Optimizer(ref_model, loss, metric=steepest.GGN(), damping=0.1, step=0.5)
    ref.step(x, y)
    assert torch.allclose(flat(model) - before, flat(ref_model) - before, atol=1e-12, rtol=0)
    # and the step is half of the one with lr = 1 from the same point
    full = copy.deepcopy(ref_model)
    steepest.ParamSpace(full).set(before)
    steepest.Optimizer(full, loss, metric=steepest.GGN(), damping=0.1, step=1.0).step(x, y)
    assert torch.allclose(flat(model) - before, 0.5 * (flat(full) - before), atol=1e-12, rtol=0)


def test_lr_zero_leaves_parameters_unchanged():
    model, loss, x, y = problem("mse")
    opt = TorchOptimizer(model, loss=loss, metric=steepest.GGN(), lr=1.0)
    opt.param_groups[0]["lr"] = 0.0
    before = flat(model)
    opt.step(outputs_closure(model, x, y))
    assert torch.equal(flat(model), before) and not opt.last_info.accepted


def _configured(model, loss):
    return TorchOptimizer(
        model.parameters(),
        loss=loss,
        metric=steepest.Fisher(mc_samples=2),
        lr=0.8,
        damping=steepest.LevenbergMarquardt(1.0),
        solver=steepest.CG(maxiter=4),
        momentum=0.5,
        warm_start=0.9,
        generator=torch.Generator().manual_seed(3),
    )


def _through_torch_save(model: nn.Module, opt: TorchOptimizer) -> dict:
    """The model's and the optimizer's state_dict after a torch.save / torch.load round trip."""
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_state_dict_round_trip_gives_bit_identical_next_steps():
    """Save after 3 steps (through torch.save), load into a fresh optimizer on a copy of the
    model: the next 3 steps are bit-identical (lambda, warm start, momentum, generator)."""
    model, loss, x, y = problem("ce")
    opt = _configured(model, loss)
    for _ in range(3):
        opt.step(outputs_closure(model, x, y))
    saved = _through_torch_save(model, opt)
    sd = saved["opt"]
    assert set(sd) == {"state", "param_groups"}
    assert sd["param_groups"][0]["lr"] == 0.8 and sd["param_groups"][0]["params"] == [0, 1, 2, 3]
    assert sd["state"][0]["prev_direction"].shape == model[0].weight.shape  # per parameter
    assert sd["state"]["steepest"]["steps"] == 3

    twin, _, _, _ = problem("ce")
    twin.load_state_dict(saved["model"])
    opt2 = _configured(twin, loss)
    opt2.steepest.generator.manual_seed(12345)  # must be overwritten by the load
    opt2.load_state_dict(sd)
    for _ in range(3):
        opt.step(outputs_closure(model, x, y))
        opt2.step(outputs_closure(twin, x, y))
        assert torch.equal(flat(model), flat(twin))
        assert opt.last_info == opt2.last_info
    assert opt.last_info.step_norm > 0


@pytest.mark.parametrize("cls", [steepest.KFAC, steepest.EKFAC])
def test_kronecker_state_dict_resumes_bit_for_bit(cls):
    """K-FAC's and EKFAC's running state (moving averages of the factors, eigenbases, EKFAC's
    re-estimated scalings, the refresh counters) travels in TorchOptimizer.state_dict (through
    torch.save): after loading, the next steps (across a refresh and a new eigenbasis) are
    bit-identical, with LM damping and weight decay."""
    g = torch.Generator().manual_seed(17)
    x, y = torch.randn(24, 3, generator=g, dtype=DT), torch.randint(0, 3, (24,), generator=g)

    def make(model):
        return TorchOptimizer(
            model.parameters(),
            loss=CrossEntropy(),
            metric=cls(ema=0.9, T_cov=2, T_inv=3),
            weight_decay=1e-3,
            damping=steepest.LevenbergMarquardt(1e-1),
        )

    model = mlp(n_out=3)
    opt = make(model)
    for _ in range(3):
        opt.step(outputs_closure(model, x, y))
    saved = _through_torch_save(model, opt)
    twin = mlp(n_out=3, seed=5)
    twin.load_state_dict(saved["model"])
    opt2 = make(twin)
    opt2.step(outputs_closure(twin, x, y))  # state of its own, overwritten by the load
    twin.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    for _ in range(4):
        opt.step(outputs_closure(model, x, y))
        opt2.step(outputs_closure(twin, x, y))
        assert torch.equal(flat(model), flat(twin))
        assert opt.last_info == opt2.last_info
    assert opt.last_info.solver == "OwnInverse" and opt.last_info.step_norm > 0


def test_load_state_dict_of_another_optimizer_is_refused():
    model, loss, x, y = problem("mse")
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = TorchOptimizer(model, loss=loss)
    with pytest.raises(ConfigurationError, match="not saved by steepest.TorchOptimizer"):
        opt.load_state_dict(sgd.state_dict())


def test_only_some_parameters_equal_the_core_on_a_partly_frozen_model():
    """Given only the last layer, the step is the core step on the model with the first layer
    frozen (theta = the given parameters, the others held fixed)."""
    ref_model, loss, x, y = problem("ce")
    model = copy.deepcopy(ref_model)
    for p in ref_model[0].parameters():
        p.requires_grad_(False)
    ref = steepest.Optimizer(ref_model, loss, metric=steepest.GGN(), damping=0.05)
    opt = TorchOptimizer(model[2].parameters(), loss=loss, metric=steepest.GGN(), damping=0.05)
    first = [p.detach().clone() for p in model[0].parameters()]
    for _ in range(2):
        ref.step(x, y)
        opt.step(outputs_closure(model, x, y))
    assert torch.allclose(flat(model), flat(ref_model), atol=1e-10, rtol=0)
    assert all(torch.equal(a, b) for a, b in zip(first, model[0].parameters()))
    assert not torch.equal(model[2].weight, copy.deepcopy(problem("ce")[0])[2].weight)


def test_param_groups_are_solved_together_and_lr_scales_their_blocks():
    """One group: the core step. Groups with learning rates alpha_k: the same direction d
    (one solve for all groups), each block scaled, delta_k = alpha_k d_k (issue 9)."""
    ref_model, loss, x, y = problem("mse")
    model = copy.deepcopy(ref_model)
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters()}]
    opt = TorchOptimizer(groups, loss=loss, metric=steepest.GGN(), lr=0.5, damping=0.1)
    ref = steepest.Optimizer(ref_model, loss, metric=steepest.GGN(), damping=0.1, step=0.5)
    opt.step(outputs_closure(model, x, y))
    ref.step(x, y)
    assert torch.allclose(flat(model), flat(ref_model), atol=1e-10, rtol=0)
    # the explicit construction: the unit step d from the same point, scaled per block
    unit = copy.deepcopy(model)
    steepest.Optimizer(unit, loss, metric=steepest.GGN(), damping=0.1, step=1.0).step(x, y)
    d = flat(unit) - flat(model)
    n0 = sum(p.numel() for p in model[0].parameters())
    scale = torch.cat(
        [torch.full((n0,), 0.5, dtype=d.dtype), torch.full((d.numel() - n0,), 0.1, dtype=d.dtype)]
    )
    before = flat(model)
    opt.param_groups[1]["lr"] = 0.1
    opt.step(outputs_closure(model, x, y))
    assert torch.allclose(flat(model) - before, scale * d, atol=1e-12, rtol=0)
    assert opt.last_info.step_norm == pytest.approx(float((scale * d).norm()), rel=1e-9)
    # another step rule picks alpha itself: different lrs are refused before anything changes
    tr = TorchOptimizer(
        [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.1}],
        loss=loss,
        step=steepest.TrustRegion(0.1),
    )
    before = flat(model)
    with pytest.raises(ConfigurationError, match="LearningRate"):
        tr.step(outputs_closure(model, x, y))
    assert torch.equal(flat(model), before)


def test_weight_decay_is_the_l2_term_in_g_and_m():
    """weight_decay eta: the step of L + eta/2 ||theta||^2 (its gradient g + eta theta, its
    curvature M + eta I), checked against the explicit construction for the Hessian (the L2 term
    written into the closure) and against a dense float64 GGN reference."""
    from reference import metric as dense_metric

    eta = 0.3
    model, loss, x, y = problem("mse")
    explicit = copy.deepcopy(model)
    opt = TorchOptimizer(
        model, metric=steepest.Hessian(), damping=1.0, solver="cholesky", weight_decay=eta
    )
    ref = TorchOptimizer(explicit, metric=steepest.Hessian(), damping=1.0, solver="cholesky")

    def l2(m):
        return 0.5 * eta * sum(p.pow(2).sum() for p in m.parameters())

    for _ in range(2):
        opt.step(scalar_closure(model, x, y, loss))
        ref.step(lambda: scalar_closure(explicit, x, y, loss)() + l2(explicit))
        assert torch.allclose(flat(model), flat(explicit), atol=1e-12, rtol=0)
        assert opt.last_info.loss == pytest.approx(ref.last_info.loss, rel=1e-12)
        assert opt.last_info.rho == pytest.approx(ref.last_info.rho, rel=1e-8)
    # GGN: delta = -(G + eta I + lambda I)^-1 (g + eta theta), G the dense reference
    model, loss, x, y = problem("mse")
    theta = flat(model)
    lam = 1e-2
    G = dense_metric("ggn", model, loss, x, y)
    g = torch.autograd.grad(loss.value(model(x), y).mean(), list(model.parameters()))
    g = torch.cat([t.reshape(-1) for t in g])
    eye = torch.eye(theta.numel(), dtype=theta.dtype)
    expected = -torch.linalg.solve(G + (eta + lam) * eye, g + eta * theta)
    opt = TorchOptimizer(model, loss=loss, metric=steepest.GGN(), damping=lam, weight_decay=eta)
    loss0 = float(loss.value(model(x), y).mean().detach())
    returned = opt.step(outputs_closure(model, x, y))
    assert torch.allclose(flat(model) - theta, expected, atol=1e-10, rtol=0)
    assert float(returned) == loss0  # the closure's loss, as torch.optim returns it
    assert opt.last_info.loss == pytest.approx(loss0 + 0.5 * eta * float(theta @ theta))
    with pytest.raises(ConfigurationError, match="weight_decay"):
        TorchOptimizer(model, loss=loss, weight_decay=-1.0)


OWN_INVERSE_METRICS = {
    "KFAC": lambda: steepest.KFAC(steepest.GGN(), ema=None, T_cov=1, T_inv=3),
    "EKFAC": lambda: steepest.EKFAC(steepest.GGN(), ema=None, T_cov=1, T_inv=3),
    "Diagonal": lambda: steepest.Diagonal(steepest.GGN()),
}


@pytest.mark.parametrize("name", list(OWN_INVERSE_METRICS))
@pytest.mark.parametrize("groups", ["one decay", "per group"])
def test_weight_decay_keeps_the_metrics_own_inverse(name, groups):
    """weight_decay adds diag(eta) to M; the metric's own inverse (K-FAC's and EKFAC's
    per-block eigendecompositions, the diagonal) stays the solver: at lambda + eta for one
    decay shared by all parameters, and for the diagonal with any eta. The step equals the
    dense float64 solve of (M + diag(eta) + lambda I) d = -(g + eta theta), M the metric's
    matrix at theta; the sketched residual of the exact inverse sees eta. K-FAC and EKFAC
    with different decays per group have no Kronecker inverse of M + diag(eta): Cholesky,
    the same step."""
    make = OWN_INVERSE_METRICS[name]
    model, loss, x, y = problem("ce")
    theta = flat(model)
    lam = 1e-2
    n0 = sum(p.numel() for p in model[0].parameters())
    eta = torch.full_like(theta, 0.3)
    params = model.parameters()
    if groups == "per group":
        eta[n0:] = 0.05
        params = [
            {"params": model[0].parameters(), "weight_decay": 0.3},
            {"params": model[2].parameters(), "weight_decay": 0.05},
        ]
    M = make().operator(steepest.point.Point(model, loss, x, y)).to_dense()
    g = torch.autograd.grad(loss.value(model(x), y).mean(), list(model.parameters()))
    g = torch.cat([t.reshape(-1) for t in g]) + eta * theta
    expected = -torch.linalg.solve(
        M + torch.diag(eta) + lam * torch.eye(theta.numel(), dtype=DT), g
    )
    opt = TorchOptimizer(params, loss=loss, metric=make(), damping=lam, weight_decay=0.3)
    opt.step(outputs_closure(model, x, y))
    own = groups == "one decay" or name == "Diagonal"
    assert opt.last_info.solver == ("OwnInverse" if own else "Cholesky")
    assert torch.allclose(flat(model) - theta, expected, atol=1e-10, rtol=0)
    assert opt.last_info.residual < 1e-10  # the true (or sketched) residual of M + diag(eta)


@pytest.mark.parametrize("name", ["KFAC", "EKFAC"])
def test_weight_decay_with_an_unused_parameter_keeps_the_own_inverse(name):
    """A parameter outside the closure's graph (grad None: torch.optim skips it) has its decay
    masked out of the gradient, but M keeps it: its rows of M are zero and its step zero, so
    the decay there changes no other step, and one shared decay stays uniform (review: masked,
    K-FAC fell to Cholesky/CG). The used parameters' step equals the dense solve without the
    unused one; the unused parameter does not move."""
    model, loss, x, y = problem("ce")
    spare = nn.Linear(2, 2).to(DT)  # never called
    theta = flat(model)
    lam, eta = 1e-2, 0.3
    make = OWN_INVERSE_METRICS[name]
    M = make().operator(steepest.point.Point(model, loss, x, y)).to_dense()
    g = torch.autograd.grad(loss.value(model(x), y).mean(), list(model.parameters()))
    g = torch.cat([t.reshape(-1) for t in g]) + eta * theta
    eye = torch.eye(theta.numel(), dtype=DT)
    expected = -torch.linalg.solve(M + (eta + lam) * eye, g)
    before = [p.detach().clone() for p in spare.parameters()]
    params = list(model.parameters()) + list(spare.parameters())
    opt = TorchOptimizer(params, loss=loss, metric=make(), damping=lam, weight_decay=eta)
    opt.step(outputs_closure(model, x, y))
    assert opt.last_info.solver == "OwnInverse"
    assert torch.allclose(flat(model) - theta, expected, atol=1e-10, rtol=0)
    assert all(torch.equal(p, q) for p, q in zip(spare.parameters(), before, strict=True))


def test_weight_decay_per_group_keeps_the_diagonal_inverse_under_a_scaled_trust_region():
    """Diagonal metric, different decays per group and MoreTrustRegion's lambda D^2: the own
    inverse takes the diagonal damping plus diag(eta); its true residual on
    M + diag(eta) + lambda D^2 is at rounding level, and the loss decreases."""
    model, loss, x, y = problem("ce")
    groups = [
        {"params": model[0].parameters(), "weight_decay": 0.3},
        {"params": model[2].parameters(), "weight_decay": 0.0},
    ]
    opt = TorchOptimizer(
        groups,
        loss=loss,
        metric=steepest.Diagonal(steepest.GGN()),
        damping=steepest.MoreTrustRegion(),
    )
    infos = []
    for _ in range(4):
        opt.step(outputs_closure(model, x, y))
        infos.append(opt.last_info)
    assert all(i.solver == "OwnInverse" and i.residual < 1e-12 for i in infos)
    assert infos[-1].loss < infos[0].loss


@pytest.mark.parametrize("config", ["defaults", "newton trust region"])
def test_defaults_are_the_core_optimizers(config):
    """Every keyword TorchOptimizer shares with steepest.Optimizer has the same default, and
    the same configuration builds the same rules: damping (the Optimizer's rule: 0 for
    Newton under an adaptive trust region, else 1e-3), solver, step rule, generator state,
    tolerances, momentum, CG options."""
    import inspect

    core_sig = inspect.signature(steepest.Optimizer.__init__).parameters
    adapter_sig = inspect.signature(TorchOptimizer.__init__).parameters
    shared = [
        n
        for n in core_sig
        if n in adapter_sig and n != "self" and core_sig[n].default is not inspect.Parameter.empty
    ]
    assert {n: adapter_sig[n].default for n in shared} == {n: core_sig[n].default for n in shared}
    model, loss, x, y = problem("mse")

    def kw():
        if config == "defaults":
            return {}
        return dict(metric=steepest.Hessian(), step=steepest.TrustRegion(1.0, adaptive=True))

    core = steepest.Optimizer(model, loss, **kw())
    adapter = TorchOptimizer(model, loss=loss, **kw()).steepest
    for name in ("damping", "solver", "step_rule", "metric"):
        assert repr(getattr(adapter, name)) == repr(getattr(core, name))
    for name in (
        "momentum",
        "warm_start",
        "preconditioner",
        "xi",
        "cg_backtracking",
        "ftol",
        "xtol",
        "gtol",
        "max_tries",
        "curvature_batch_size",
    ):
        assert getattr(adapter, name) == getattr(core, name)
    assert adapter.damping.value == (1e-3 if config == "defaults" else 0.0)
    assert torch.equal(adapter.generator.get_state(), core.generator.get_state())


def test_add_param_group_extends_theta():
    model, loss, x, y = problem("mse")
    opt = TorchOptimizer(model[2].parameters(), loss=loss, metric=steepest.GGN(), damping=0.1)
    opt.step(outputs_closure(model, x, y))
    opt.add_param_group({"params": model[0].parameters()})
    first = model[0].weight.detach().clone()
    opt.step(outputs_closure(model, x, y))
    assert opt.steepest.space.size == sum(p.numel() for p in model.parameters())
    assert not torch.equal(first, model[0].weight)


# ------------------------------------------------------------------------- bad closures
def _assert_unchanged(model, opt, before, state):
    assert torch.equal(flat(model), before)
    assert repr(opt.steepest.state_dict()) == repr(state)


@pytest.mark.parametrize(
    "metric, closure_name, match",
    [
        (steepest.GGN(), "scalar", r"must return \(outputs, targets\)"),
        (steepest.Fisher(), "per-sample", r"must return \(outputs, targets\)"),
        (steepest.GradientCovariance(), "scalar", "per-sample losses"),
        (steepest.Hessian(), "detached", "no autograd graph"),
        (steepest.Identity(), "backward", r"must not call loss\.backward\(\)"),
        (steepest.GGN(), "backward-outputs", r"must not call loss\.backward\(\)"),
        (steepest.Identity(), "string", "returned a str"),
        (steepest.Identity(), "matrix", r"shape \(24, 2\)"),
        (steepest.Identity(), "other-params", "none of the optimizer's parameters"),
        (steepest.GGN(), "no-closure", "needs a closure"),
    ],
)
def test_bad_closures_give_clear_errors_and_change_nothing(metric, closure_name, match):
    model, loss, x, y = problem("mse")
    opt = TorchOptimizer(model, loss=loss, metric=metric, damping=0.1, solver="cg")
    opt.step(
        per_sample_closure(model, x, y, loss)
        if not isinstance(metric, steepest.GGN | steepest.Fisher)
        else outputs_closure(model, x, y)
    )
    before, state = flat(model), copy.deepcopy(opt.steepest.state_dict())
    other = mlp(seed=5)

    def backward():
        opt.zero_grad()
        value = F.mse_loss(model(x), y)
        value.backward()
        return value

    def backward_outputs():
        z = model(x)
        z.sum().backward()
        return z, y

    closures = {
        "scalar": scalar_closure(model, x, y, loss),
        "per-sample": per_sample_closure(model, x, y, loss),
        "detached": lambda: loss.value(model(x), y).mean().detach(),
        "backward": backward,
        "backward-outputs": backward_outputs,
        "string": lambda: "loss",
        "matrix": lambda: (model(x) - y) ** 2,
        "other-params": lambda: loss.value(other(x), y).mean(),
        "no-closure": None,
    }
    with pytest.raises(ConfigurationError, match=match):
        opt.step(closures[closure_name])
    _assert_unchanged(model, opt, before, state)


def test_gauss_newton_family_needs_a_loss():
    model = mlp()
    with pytest.raises(ConfigurationError, match="needs the loss"):
        TorchOptimizer(model, metric=steepest.GGN())
    with pytest.raises(ConfigurationError, match="no loss"):
        opt = TorchOptimizer(model, metric=steepest.Identity())
        x, y = regression()
        opt.step(outputs_closure(model, x, y))


def test_wrong_targets_give_the_loss_error():
    model, loss, x, y = problem("mse")
    opt = TorchOptimizer(model, loss=loss, metric=steepest.GGN())
    with pytest.raises(ShapeError):
        opt.step(lambda: (model(x), y[:5]))


def test_a_step_that_fails_midway_restores_parameters_and_state():
    """The closure raises at its third call (a trial evaluation inside the step, after the
    direction was solved): the error propagates, parameters and state are as before."""
    model, loss, x, y = problem("ce")
    opt = _configured(model, loss)
    opt.step(outputs_closure(model, x, y))
    before, state = flat(model), copy.deepcopy(opt.steepest.state_dict())
    torch_state = repr(opt.state_dict())
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) >= 2:
            raise ValueError("data loader broke")
        return model(x), y

    with pytest.raises(ValueError, match="data loader broke"):
        opt.step(flaky)
    assert len(calls) == 2
    _assert_unchanged(model, opt, before, state)
    assert repr(opt.state_dict()) == torch_state
    # and the optimizer still works afterwards, with the same step as an untouched twin
    opt.step(outputs_closure(model, x, y))
    assert opt.last_info.accepted


def test_nonfinite_loss_is_refused_before_any_change():
    model, loss, x, y = problem("mse")
    opt = TorchOptimizer(model, loss=loss)
    before = flat(model)
    with pytest.raises(steepest.errors.NonFiniteError):
        opt.step(lambda: (model(x) * float("nan"), y))
    assert torch.equal(flat(model), before)


# ------------------------------------------------------------------------- training loops
def test_dataloader_training_loop_lowers_the_loss():
    """The standard loop: for x, y in loader: opt.zero_grad(); opt.step(closure); scheduler."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 2, generator=g, dtype=DT)
    y = (x[:, 0] * x[:, 1] > 0).long() + (x[:, 0] > 1).long()
    model = mlp(n_in=2, n_out=3, hidden=16)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=True, generator=g
    )
    opt = TorchOptimizer(
        model,
        loss=CrossEntropy(),
        metric=steepest.GGN(),
        lr=1.0,
        damping=steepest.LevenbergMarquardt(1.0),
    )
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    start = float(F.cross_entropy(model(x), y).detach())
    for _ in range(4):
        for xb, yb in loader:
            opt.zero_grad()
            loss = opt.step(lambda xb=xb, yb=yb: (model(xb), yb))
            assert loss.ndim == 0
        sched.step()
    end = float(F.cross_entropy(model(x), y).detach())
    assert end < 0.5 * start
    assert opt.param_groups[0]["lr"] == pytest.approx(0.9**4)


def test_newton_from_a_plain_scalar_closure_and_float32():
    """The closure of an existing loop (F.mse_loss, a scalar) drives Newton with CG; a float32
    model keeps float32 state."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    x = torch.randn(64, 3)
    y = x.sum(1, keepdim=True).sin()
    opt = TorchOptimizer(
        model,
        metric=steepest.Hessian(),
        solver=steepest.CG(maxiter=20),
        damping=steepest.LevenbergMarquardt(1.0),
    )
    start = float(F.mse_loss(model(x), y).detach())
    for _ in range(10):
        opt.step(lambda: F.mse_loss(model(x), y))
    assert float(F.mse_loss(model(x), y).detach()) < 0.5 * start
    assert all(
        v.dtype == torch.float32
        for s in opt.state_dict()["state"].values()
        if isinstance(s, dict)
        for v in s.values()
        if isinstance(v, torch.Tensor) and v.is_floating_point()
    )


def test_stopping_rules_pass_through_to_the_core():
    """TorchOptimizer(ftol=, xtol=, gtol=) are the core Optimizer's rules: a model that fits
    its targets exactly stops on gtol (MINPACK's cosine for MSE) with the same StepInfo as the
    core optimizer with the same settings; ftol = xtol = 0 turns those two off; a bad value is
    the core's named error."""
    torch.manual_seed(3)
    x = torch.randn(12, 3, dtype=torch.float64)
    model = nn.Linear(3, 1).double()
    with torch.no_grad():
        y = model(x) + 0.01 * torch.randn(12, 1, dtype=torch.float64)
    m1, m2 = copy.deepcopy(model), copy.deepcopy(model)
    kw = dict(metric=steepest.GaussNewton(), damping=steepest.MoreTrustRegion())
    opt = TorchOptimizer(m1, loss=MSE(), gtol=1e-6, ftol=0.0, xtol=0.0, **kw)
    core = steepest.Optimizer(m2, MSE(), gtol=1e-6, ftol=0.0, xtol=0.0, **kw)
    assert (opt.steepest.ftol, opt.steepest.xtol, opt.steepest.gtol) == (0.0, 0.0, 1e-6)
    for _ in range(6):
        opt.step(outputs_closure(m1, x, y))
        info = core.step(x, y)
        assert opt.last_info.converged == info.converged and opt.last_info.reason == info.reason
        if info.converged:
            break
    assert info.converged and info.reason == "gtol"
    assert torch.equal(flat(m1), flat(m2))
    with pytest.raises(ConfigurationError, match="gtol"):
        TorchOptimizer(model, loss=MSE(), gtol=-1.0)

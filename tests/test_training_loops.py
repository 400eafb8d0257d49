"""Issue 9: the optimizers in real training loops: buffers (BatchNorm), Dropout, frozen and
changing parameters, state_dict validation, pickling, lr = 0, precision and named errors.
Each test fails on the code before issue 9 and passes after."""

import copy
import dataclasses
import math
import pickle
import warnings

import pytest
import torch
from torch import nn

from steepest import (
    CG,
    GGN,
    Armijo,
    Cholesky,
    Hessian,
    Identity,
    KLLineSearch,
    LearningRate,
    LevenbergMarquardt,
    MoreTrustRegion,
    Optimizer,
    TorchOptimizer,
    TrustRegion,
)
from steepest.errors import (
    ConfigurationError,
    DenseTooLargeError,
    NonFiniteError,
    ParameterChangeWarning,
    ShapeError,
    SingularMatrixError,
    SteepestError,
)
from steepest.linop import DENSE_LIMIT, set_dense_limit
from steepest.linop import eigh as linop_eigh
from steepest.losses import MSE

DT = torch.float64


def bn_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 1)).to(DT)


def dropout_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 1)).to(DT)


def data(seed: int = 0, n: int = 24):
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(n, 3, dtype=DT, generator=g)
    return x, torch.sin(x.sum(1, keepdim=True))


def buffers(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.named_buffers()}


def one_training_forward(model: nn.Module, x: torch.Tensor) -> dict:
    """The buffers after one ordinary training forward (what torch.optim's step gives)."""
    ref = copy.deepcopy(model)
    ref(x)
    return buffers(ref)


def assert_buffers(model: nn.Module, expected: dict) -> None:
    got = buffers(model)
    assert got.keys() == expected.keys()
    for k in got:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-13, atol=0)


def _optimizer(kind: str, model: nn.Module, x, y, **kw):
    """(step function, optimizer) through Optimizer or TorchOptimizer."""
    if kind == "core":
        opt = Optimizer(model, MSE(), **kw)
        return (lambda: opt.step(x, y)), opt
    opt = TorchOptimizer(model, loss=MSE(), **kw)

    def step():
        opt.step(lambda: (model(x), y))
        return opt.last_info

    return step, opt


# ------------------------------------------------------------------------ buffers
@pytest.mark.parametrize("kind", ["core", "torch"])
def test_buffers_move_once_per_step_whatever_the_trials(kind):
    """LM with rejected tries and an Armijo line search evaluate the model many times per step;
    the running statistics still move exactly as in one training forward at theta."""
    x, y = data()
    for kw in (
        dict(
            metric=GGN(),
            damping=LevenbergMarquardt(1e-12, max_tries=6),
            step=None if kind == "torch" else LearningRate(40.0),
        ),
        dict(metric=Identity(), damping=1.0, step=Armijo(alpha0=1e4)),
    ):
        if kind == "torch":
            kw = {**kw, "lr": 40.0} if kw["step"] is None else kw
            kw = {k: v for k, v in kw.items() if v is not None}
        model = bn_net()
        step, _ = _optimizer(kind, model, x, y, **kw)
        for _ in range(2):
            expected = one_training_forward(model, x)
            info = step()
            assert info.evaluations >= 2 or info.tries >= 2, info
            assert_buffers(model, expected)
        assert int(model[1].num_batches_tracked) == 2


@pytest.mark.parametrize("kind", ["core", "torch"])
def test_failed_step_restores_buffers(kind):
    """A step that fails (NonFiniteError: the loss overflows after the step, nothing adapts)
    leaves the running statistics as before the step, and the model usable in eval mode."""
    x, y = data()
    model = bn_net()
    step, opt = _optimizer(
        kind,
        model,
        x,
        y,
        metric=Identity(),
        damping=0.0,
        **({"step": LearningRate(1e300)} if kind == "core" else {"lr": 1e300}),
    )
    before = buffers(model)
    theta = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteError):
        step()
    assert_buffers(model, before)
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), theta))
    model.eval()
    assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("kind", ["core", "torch"])
def test_dropout_trials_see_the_point_masks(kind):
    """With Dropout in train mode, the loss at theta + delta is evaluated with the masks of the
    step's point: for a tiny step rho = 1 to first order (with fresh masks it is noise), and the
    global random state after the step is the one after a single training forward."""
    x, y = data(1)
    model = dropout_net()
    alpha = 1e-7
    step, _ = _optimizer(
        kind,
        model,
        x,
        y,
        metric=Identity(),
        damping=0.0,
        **({"step": LearningRate(alpha)} if kind == "core" else {"lr": alpha}),
    )
    torch.manual_seed(5)
    ref = copy.deepcopy(model)
    ref(x)
    after_one_forward = torch.get_rng_state()
    torch.manual_seed(5)
    info = step()
    assert info.rho == pytest.approx(1.0, abs=1e-4)
    assert torch.equal(torch.get_rng_state(), after_one_forward)


# ------------------------------------------------------------------------ changing parameters
def test_frozen_layer_never_changes_and_unfrozen_layer_trains():
    x, y = data()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).to(DT)
    opt = Optimizer(net, MSE(), metric=GGN(), damping=1e-2, momentum=0.5)
    opt.step(x, y)
    net[0].requires_grad_(False)
    w0 = net[0].weight.detach().clone()
    w2 = net[2].weight.detach().clone()
    with pytest.warns(ParameterChangeWarning, match="changed"):
        info = opt.step(x, y)
    assert "reset" in info.message
    assert torch.equal(net[0].weight, w0)
    assert not torch.equal(net[2].weight, w2)
    net[0].requires_grad_(True)
    with pytest.warns(ParameterChangeWarning):
        opt.step(x, y)
    assert not torch.equal(net[0].weight, w0)


def test_replaced_layer_and_assigned_weights_are_followed():
    x, y = data()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).to(DT)
    opt = Optimizer(net, MSE(), metric=GGN(), damping=LevenbergMarquardt(1e-2))
    opt.step(x, y)
    # a layer replaced by one of the same shape: new tensors, state kept, no warning
    net[2] = nn.Linear(5, 1).to(DT)
    new_w = net[2].weight.detach().clone()
    expected = float(MSE().value(net(x), y).mean().detach())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        info = opt.step(x, y)
    assert info.loss == pytest.approx(expected, rel=1e-12)
    assert "followed" in info.message and info.accepted
    assert not torch.equal(net[2].weight, new_w)
    # weights loaded with assign=True
    torch.manual_seed(7)
    other = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).to(DT)
    net.load_state_dict(other.state_dict(), assign=True)
    expected = float(MSE().value(other(x), y).mean().detach())
    info = opt.step(x, y)
    assert info.loss == pytest.approx(expected, rel=1e-12)
    # another width: the flat vector changes size, the state on it is reset with a warning
    net[0], net[2] = nn.Linear(3, 7).to(DT), nn.Linear(7, 1).to(DT)
    with pytest.warns(ParameterChangeWarning):
        info = opt.step(x, y)
    assert opt.space.size == 3 * 7 + 7 + 7 + 1 and info.accepted


def test_torch_optimizer_follows_param_groups_like_torch_optim():
    """TorchOptimizer follows torch.optim: a parameter frozen later is skipped; a replaced
    module whose parameters are not in param_groups is not trained until add_param_group."""
    x, y = data()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).to(DT)
    opt = TorchOptimizer(net.parameters(), loss=MSE(), metric=GGN(), damping=1e-2, momentum=0.5)
    opt.step(lambda: (net(x), y))
    net[0].requires_grad_(False)
    w0 = net[0].weight.detach().clone()
    with pytest.warns(ParameterChangeWarning):
        opt.step(lambda: (net(x), y))
    assert torch.equal(net[0].weight, w0)
    assert "reset" in opt.last_info.message
    net[0].requires_grad_(True)
    net[2] = nn.Linear(5, 1).to(DT)
    w2 = net[2].weight.detach().clone()
    expected = float(MSE().value(net(x), y).mean().detach())
    with pytest.warns(ParameterChangeWarning):
        loss = opt.step(lambda: (net(x), y))
    assert float(loss) == pytest.approx(expected, rel=1e-12)  # the current model's loss
    assert torch.equal(net[2].weight, w2)  # not in param_groups: held fixed (torch.optim)
    opt.add_param_group({"params": net[2].parameters()})
    opt.step(lambda: (net(x), y))
    assert not torch.equal(net[2].weight, w2)


# ------------------------------------------------------------------------ state, copies
def _mlp(hidden: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, 1)).to(DT)


def test_load_state_dict_is_validated_before_anything_changes():
    x, y = data()
    lm_opt = Optimizer(_mlp(5), MSE(), damping=LevenbergMarquardt(1e-2))
    lm_opt.step(x, y)
    lm_state = lm_opt.state_dict()
    for target, match in (
        (Optimizer(_mlp(5), MSE(), damping=MoreTrustRegion()), "LevenbergMarquardt"),
        (Optimizer(_mlp(5), MSE(), damping=1e-3), "LevenbergMarquardt"),
    ):
        target.step(x, y)
        before = copy.deepcopy(target.state_dict())
        with pytest.raises(ConfigurationError, match=match):
            target.load_state_dict(lm_state)
        after = target.state_dict()
        assert after["steps"] == before["steps"] == 1
        assert after["damping"]["lam"] == before["damping"]["lam"]
    # a state of a model with another number of parameters (momentum buffer of 26 values)
    big = Optimizer(_mlp(5), MSE(), damping=LevenbergMarquardt(), momentum=0.5)
    big.step(x, y)
    small = Optimizer(_mlp(3), MSE(), damping=LevenbergMarquardt(), momentum=0.5)
    with pytest.raises(ConfigurationError, match="26"):
        small.load_state_dict(big.state_dict())
    assert small.steps == 0 and small.state_dict()["momentum_buffer"] is None
    bad = dict(lm_state)
    del bad["damping"]
    with pytest.raises(ConfigurationError, match="lacks"):
        lm_opt.load_state_dict(bad)
    # TorchOptimizer: another model's state is refused and nothing changes
    net5, net3 = _mlp(5), _mlp(3)
    o5 = TorchOptimizer(net5, loss=MSE(), damping=LevenbergMarquardt(), momentum=0.5)
    o5.step(lambda: (net5(x), y))
    o3 = TorchOptimizer(net3, loss=MSE(), damping=LevenbergMarquardt(), momentum=0.5, lr=0.5)
    o3.step(lambda: (net3(x), y))
    before = copy.deepcopy(o3.state_dict())
    with pytest.raises(ConfigurationError):
        o3.load_state_dict(o5.state_dict())
    after = o3.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert after["state"]["steepest"]["steps"] == 1


def _same_next_step(pairs, step):
    infos = [step(*pair) for pair in pairs]
    params = [torch.cat([p.detach().reshape(-1) for p in m.parameters()]) for m, _ in pairs]
    for info, p in zip(infos[1:], params[1:]):
        # a copy does not carry the kept forward (Optimizer reuse): one forward more, the same
        # step bit for bit
        assert dataclasses.replace(info, nfev=0) == dataclasses.replace(infos[0], nfev=0)
        assert torch.equal(p, params[0])


def test_deepcopy_and_pickle_give_identical_next_steps():
    x, y = data()
    net = _mlp(5)
    core = Optimizer(net, MSE(), metric=GGN(), damping=MoreTrustRegion(), momentum=0.3)
    core.step(x, y)
    pairs = [(net, core), copy.deepcopy((net, core)), pickle.loads(pickle.dumps((net, core)))]
    _same_next_step(pairs, lambda m, o: o.step(x, y))
    net = _mlp(5)
    opt = TorchOptimizer(net, loss=MSE(), damping=MoreTrustRegion(), momentum=0.3)
    opt.step(lambda: (net(x), y))
    pairs = [(net, opt), copy.deepcopy((net, opt)), pickle.loads(pickle.dumps((net, opt)))]

    def step(m, o):
        o.step(lambda: (m(x), y))
        return o.last_info

    _same_next_step(pairs, step)


def test_learning_rate_zero_from_a_scheduler_skips_the_step():
    """CosineAnnealingLR with eta_min = 0 reaches lr = 0: no solve, lambda unchanged."""
    x, y = data()
    net = _mlp(5)
    opt = TorchOptimizer(net, loss=MSE(), damping=LevenbergMarquardt(0.03), lr=1.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=2, eta_min=0.0)
    for _ in range(2):
        opt.step(lambda: (net(x), y))
        sched.step()
    assert opt.param_groups[0]["lr"] == 0.0
    lam = opt.steepest.damping.value
    theta = [p.detach().clone() for p in net.parameters()]
    opt.step(lambda: (net(x), y))
    info = opt.last_info
    assert info.tries == 0 and not info.accepted and "learning rate 0" in info.message
    assert opt.steepest.damping.value == lam
    assert all(torch.equal(p, t) for p, t in zip(net.parameters(), theta))


# ------------------------------------------------------------------------ named errors
@pytest.mark.parametrize(
    "build",
    [
        lambda: LevenbergMarquardt(init=math.inf),
        lambda: TrustRegion(1e300),
        lambda: CG(maxiter=2.5),
        lambda: Armijo(max_evals=0),
        lambda: KLLineSearch(max_evals=0),
        lambda: MSE(sigma=-1),
        lambda: Optimizer(_mlp(3), MSE),
        lambda: TorchOptimizer([]),
        lambda: Optimizer(_mlp(3).half(), MSE()),
        lambda: Optimizer(_mlp(3).bfloat16(), MSE()),
        lambda: TorchOptimizer(_mlp(3).half(), loss=MSE()),
        lambda: Optimizer(_mlp(3).to("meta"), MSE()),
    ],
)
def test_bad_configurations_raise_named_errors(build):
    with pytest.raises(SteepestError):
        build()


def test_loss_class_error_is_still_a_type_error():
    with pytest.raises(TypeError, match=r"MSE\(\)"):
        Optimizer(_mlp(3), MSE)


@pytest.mark.parametrize("kind", ["core", "torch"])
def test_bad_steps_raise_named_errors_before_state_changes(kind):
    x, y = data()
    net = _mlp(5)
    step, opt = _optimizer(kind, net, x, y, metric=GGN(), damping=LevenbergMarquardt())
    step()
    inner = opt if kind == "core" else opt.steepest
    state = copy.deepcopy(inner.state_dict())
    theta = [p.detach().clone() for p in net.parameters()]

    def unchanged():
        now = inner.state_dict()
        assert now["steps"] == state["steps"] and now["damping"] == state["damping"]
        assert all(torch.equal(p, t) for p, t in zip(net.parameters(), theta))

    with pytest.raises(ShapeError, match="empty"):
        opt.step(x[:0], y[:0]) if kind == "core" else opt.step(lambda: (net(x[:0]), y[:0]))
    unchanged()
    with torch.inference_mode(), pytest.raises(ConfigurationError, match="inference_mode"):
        step()
    unchanged()
    net.half()  # half precision after construction: refused by name at the step
    with pytest.raises(ConfigurationError, match="float16"):
        step()
    net.double()
    theta = [t.half().double() for t in theta]  # the round trip through float16 only
    unchanged()


def test_compiled_model_runs_its_original_module():
    """torch.compile'd graphs have no double backward: the core optimizer runs `_orig_mod` (same
    step as the plain model); TorchOptimizer names the way out."""
    x, y = data()
    plain = _mlp(5)
    compiled = torch.compile(copy.deepcopy(plain), backend="aot_eager")
    a = Optimizer(plain, MSE(), metric=Hessian(), damping=1e-2).step(x, y)
    b = Optimizer(compiled, MSE(), metric=Hessian(), damping=1e-2).step(x, y)
    assert a == b
    opt = TorchOptimizer(compiled, loss=MSE(), metric=GGN())
    with pytest.raises(ConfigurationError, match="_orig_mod"):
        opt.step(lambda: (compiled(x), y))


def test_eigh_failure_is_a_singular_matrix_error_that_lm_retries(monkeypatch):
    x, y = data()
    real, calls = torch.linalg.eigh, []

    def flaky(m, *a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return real(m, *a, **k)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    with pytest.raises(SingularMatrixError, match="badly scaled"):
        linop_eigh(torch.eye(3, dtype=DT))
    calls.clear()
    # an indefinite Hessian with a tiny lambda: Cholesky fails, the clipped solve's eigh fails,
    # LM raises lambda and solves again
    opt = Optimizer(
        _mlp(5, seed=3),
        MSE(),
        metric=Hessian(),
        solver=Cholesky(indefinite="clip"),
        damping=LevenbergMarquardt(1e-12),
    )
    info = opt.step(x, y)
    assert calls and info.tries >= 2 and "damping raised" in info.message


def test_more_trust_region_too_large_names_the_real_way_out():
    x, y = data()
    set_dense_limit(10)
    try:
        opt = Optimizer(_mlp(5), MSE(), metric=Hessian(), damping=MoreTrustRegion(), solver=CG())
        with pytest.raises(DenseTooLargeError, match="LevenbergMarquardt") as err:
            opt.step(x, y)
    finally:
        set_dense_limit(DENSE_LIMIT)
    assert "use a matrix-free solver" not in str(err.value)


def test_torch_optimizer_skips_parameters_outside_the_graph():
    """torch.optim skips a parameter whose grad is None (no decay, no momentum step): a
    parameter the closure does not use never moves, even with weight decay and momentum."""
    x, y = data()
    net = _mlp(5)
    spare = nn.Linear(2, 2).to(DT)
    opt = TorchOptimizer(
        [*net.parameters(), *spare.parameters()],
        loss=MSE(),
        metric=GGN(),
        damping=1e-2,
        momentum=0.5,
        weight_decay=0.1,
    )
    w = spare.weight.detach().clone()
    for _ in range(2):
        opt.step(lambda: (net(x), y))
    assert torch.equal(spare.weight, w)
    assert opt.last_info.accepted

"""Preconditioner mode: ``.grad`` preconditioned in place, then any torch.optim optimizer."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from reference import rel_err, seeded
from torch import nn

import steepest
from steepest.errors import ConfigurationError
from steepest.losses import CrossEntropy
from steepest.point import Point
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
    # finite values whose sum overflows (the sum's answer is then checked value by value),
    # and both infinities (a NaN sum)
    for dt in (torch.float16, torch.float32):
        big = torch.full((4,), torch.finfo(dt).max, dtype=dt)
        assert not torch.isfinite(big.sum()) and all_finite(big)
        big[1] = float("inf")
        assert not all_finite(big)
    assert not all_finite(torch.tensor([float("inf"), -float("inf"), 1.0]))


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


def test_autocast_forward_and_a_small_weight_decay_take_the_plain_product():
    """The recorded rows are used only when they are the gradient: under autocast (bfloat16
    activations, float32 .grad) and with a weight decay of relative size 1e-4 added to a
    float32 .grad the block takes the plain product (before: a dtype error, and the decay
    dropped)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 24), nn.Tanh(), nn.Linear(24, 3))
    x = torch.randn(6, 30, generator=seeded(5))
    y = torch.randint(0, 3, (6,), generator=seeded(6))
    pre = Preconditioner(model, CrossEntropy(), damping=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    pre.step(x, y)
    assert pre.metric.fast_blocks == 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    for decay, fast in ((0.0, 1), (1e-4, 0)):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            w = model[0].weight
            w.grad.add_(decay * w.grad.norm() / w.norm() * w)
        pre.step(x, y)
        assert pre.metric.fast_blocks == fast, decay


def test_a_dropped_preconditioner_takes_its_hooks_off_the_model():
    import gc

    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    for _ in range(3):
        pre = Preconditioner(model, CrossEntropy())
        assert len(model[0]._forward_hooks) == 1
        del pre
        gc.collect()
        assert len(model[0]._forward_hooks) == 0


# ------------------------------------------------------------------------------ step cost
def _kron_inverse_blocks(model, x, y, lam):
    """The factored-damping inverse of each Linear block, built densely from K-FAC's factors
    of the exact GGN computed here by explicit outer products (float64): A from the layer
    inputs with a bias column, G from per-sample output gradients times F_R^{1/2} (softmax:
    diag(p) - p p^T), then (G + sqrt(lam)/pi I) (x) (A + pi sqrt(lam) I) inverted with
    torch.linalg.inv."""
    acts, outs = [], []

    def keep(module, inputs, output):
        acts.append(inputs[0])
        outs.append(output)

    hooks = [m.register_forward_hook(keep) for m in model if isinstance(m, nn.Linear)]
    z = model(x)
    for h in hooks:
        h.remove()
    p = torch.softmax(z.detach(), -1)
    fr = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    mu, q = torch.linalg.eigh(fr)
    s = q * mu.clamp_min(0).sqrt()[:, None, :]  # F_R = S S^T per sample
    n, c = z.shape
    out = []
    for a_in, o in zip(acts, outs):
        a = torch.cat([a_in, torch.ones(n, 1, dtype=F64)], 1)
        cols = []
        for k in range(c):
            (gk,) = torch.autograd.grad(z, o, s[:, :, k], retain_graph=True)
            cols.append(gk)
        g = torch.stack(cols)  # (C, N, o)
        A = a.T @ a / n
        G = torch.einsum("kno,knp->op", g, g) / n
        pi = ((A.trace() / A.shape[0]) / (G.trace() / G.shape[0])).sqrt()
        eye_g, eye_a = torch.eye(G.shape[0], dtype=F64), torch.eye(A.shape[0], dtype=F64)
        out.append(
            torch.linalg.inv(torch.kron(G + lam**0.5 / pi * eye_g, A + pi * lam**0.5 * eye_a))
        )
    return out


def test_factored_inverse_by_cholesky_equals_the_damped_kronecker_inverse():
    """With the factored damping K-FAC inverts A + pi sqrt(lam) I and G + sqrt(lam)/pi I by
    Cholesky (no eigendecomposition is kept: ``eig`` is None in the state): the
    preconditioned gradient equals the inverse of the damped Kronecker product built densely
    from the factors of the exact GGN (float64), block by block."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64)
    x, y = data(12)
    pre = Preconditioner(
        model,
        CrossEntropy(),
        metric=steepest.KFAC(steepest.GGN(), damping="factored"),
        damping=0.3,
    )
    pre.remove_hooks()  # the dense product of every block
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    pre.step(x, y)
    assert pre.metric.state_dict()["eig"] is None
    for li, inv in zip((0, 2), _kron_inverse_blocks(model, x, y, 0.3)):
        w, b = grads[li], grads[li + 1]
        rhs = torch.cat([w, b[:, None]], 1).reshape(-1)  # [W b] row-major, G (x) A order
        want = (inv @ rhs).reshape(w.shape[0], -1)
        got = torch.cat([model[li].weight.grad, model[li].bias.grad[:, None]], 1)
        assert rel_err(got, want) < 1e-12


def test_damped_inverse_falls_back_to_the_eigendecomposition():
    """A group of a factor that is not positive definite after the shift (a signed G of an
    indefinite GGN, or rounding) is inverted through its eigendecomposition, eigenvalues
    clamped at 0 unless signed; the other groups keep the Cholesky inverse."""
    from steepest.kronecker_blocks import _damped_inverse

    g = seeded(90)
    q, _ = torch.linalg.qr(torch.randn(2, 4, 4, generator=g, dtype=F64))
    mu = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-1.0, 2.0, 3.0, 4.0]], dtype=F64)
    m = q @ torch.diag_embed(mu) @ q.transpose(-1, -2)
    shift = torch.tensor([0.5, 0.5], dtype=F64)[:, None, None]
    eye = torch.eye(4, dtype=F64)
    want = torch.linalg.inv(m + shift * eye)  # group 1 is indefinite: -1 + 0.5 < 0
    torch.testing.assert_close(_damped_inverse(m, shift, True), want, rtol=1e-12, atol=1e-12)
    clamped = q[1] @ torch.diag(1 / (mu[1].clamp_min(0) + 0.5)) @ q[1].T
    got = _damped_inverse(m, shift, False)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], clamped, rtol=1e-12, atol=1e-12)


def test_damped_inverse_of_a_zero_pivot_falls_back_too():
    """A shift below the rounding of a singular factor leaves an exact zero pivot in the partial
    Cholesky factor (seen on the digits autoencoder with factored damping and
    LevenbergMarquardt(reject=False), float32): that group is inverted through its
    eigendecomposition like any other failed group (before, ``cholesky_inverse`` of the whole
    batch raised a raw LinAlgError)."""
    from steepest.kronecker_blocks import _damped_inverse

    m = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[2.0, 0.5], [0.5, 1.0]]], dtype=F64)
    shift = torch.tensor([1e-20, 1e-20], dtype=F64)[:, None, None]  # 1 + 1e-20 == 1
    assert torch.linalg.cholesky_ex(m + shift * torch.eye(2, dtype=F64))[1].tolist() == [2, 0]
    got = _damped_inverse(m, shift, False)
    mu, q = torch.linalg.eigh(m[0])
    want = q @ torch.diag(1 / (mu.clamp_min(0) + 1e-20)) @ q.T
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[0], want, rtol=1e-10, atol=0)
    torch.testing.assert_close(got[1], torch.linalg.inv(m[1]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", [steepest.KFAC, steepest.EKFAC])
def test_state_resumes_bit_for_bit_across_refreshes_and_inverses(cls):
    """Preconditioner.state_dict mid-run, loaded into a fresh Preconditioner on a copy of the
    model: the next steps (factor refreshes, K-FAC's Cholesky inverses and recorded-rows
    products, EKFAC's eigenbases and re-estimated scalings, the flat-gradient buffer) give
    bit-for-bit the same .grad."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 24), nn.Tanh(), nn.Linear(24, 3))
    x = torch.randn(16, 30, generator=seeded(91))
    y = torch.randint(0, 3, (16,), generator=seeded(92))

    def make(m):
        if cls is steepest.EKFAC:  # its damping is always exact (the eigenbasis is M's)
            metric = steepest.EKFAC(T_cov=2, T_inv=3)
        else:
            metric = steepest.KFAC(T_cov=2, T_inv=3, damping="factored")
        return Preconditioner(m, CrossEntropy(), metric=metric, damping=0.1)

    def run(m, pre, sgd, steps):
        out = []
        for _ in range(steps):
            sgd.zero_grad()
            F.cross_entropy(m(x), y).backward()
            pre.step(x, y)
            out.append([p.grad.clone() for p in m.parameters()])
            sgd.step()
        return out

    pre = make(model)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    run(model, pre, sgd, 4)
    saved = copy.deepcopy(pre.state_dict())
    model2 = copy.deepcopy(model)
    ref_grads = run(model, pre, sgd, 5)
    if cls is steepest.KFAC:
        assert pre.metric.fast_blocks == 1
    else:
        assert pre.metric.scalings()  # EKFAC's own state: its scalings
    pre2 = make(model2)
    pre2.load_state_dict(saved)
    got = run(model2, pre2, torch.optim.SGD(model2.parameters(), lr=0.1), 5)
    for a, b in zip(ref_grads, got):
        assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_recorded_rows_check_passes_cancelling_rows_and_catches_decay():
    """The recorded-rows check on a float32 gradient formed like autograd forms it
    (``g^T a``): rows whose products cancel (a batch gradient 1e-4 of the per-sample ones,
    whose rounding is then far above the plain |X| scale) still pass, since the tolerance
    follows the rows' magnitudes; on rows that do not cancel a decay of relative size 1e-3
    added to the weight or to the bias fails; a layer without bias is checked on W alone."""
    from steepest.kronecker_blocks import _recorded_gradient

    g0 = seeded(93)
    r, o, d = 8, 48, 40  # R = 16 rows: the factorised product is the cheaper
    a = torch.randn(2 * r, d, generator=g0)
    g = torch.randn(2 * r, o, generator=g0)
    ab = torch.cat([a, torch.ones(2 * r, 1)], 1)
    cache = {}
    # pairs of rows with opposite output gradients on nearly equal inputs: cancelling sums
    ac = torch.cat([a[:r], a[:r] + 1e-4 * torch.randn(r, d, generator=g0)])
    gc = torch.cat([g[:r], -g[:r]])
    acb = torch.cat([ac, torch.ones(2 * r, 1)], 1)
    xc = gc.T @ acb
    assert xc.norm() < 1e-3 * (gc.norm(dim=1) * acb.norm(dim=1)).sum()
    assert _recorded_gradient(
        xc[:, :-1].contiguous(), xc[:, -1].contiguous(), (ac, gc), True, cache
    )
    x = g.T @ ab
    w, b = x[:, :-1].contiguous(), x[:, -1].contiguous()
    assert _recorded_gradient(w, b, (a, g), True, cache)
    decay = 1e-3 * x.norm() / x.numel() ** 0.5
    assert not _recorded_gradient(w + decay, b, (a, g), True, cache)
    assert not _recorded_gradient(w, b + decay * d**0.5, (a, g), True, cache)
    xw = g.T @ a
    assert _recorded_gradient(xw, None, (a, g), True, cache)
    assert not _recorded_gradient(xw * (1 + 1e-3), None, (a, g), True, cache)


@pytest.mark.parametrize("damping", ["factored", "exact"])
def test_recorded_rows_product_of_a_layer_without_bias(damping):
    """A Linear layer without bias: the recorded-rows product written into the weight alone
    equals the plain product of a Preconditioner without hooks (float64)."""
    torch.manual_seed(0)
    x = torch.randn(6, 30, generator=seeded(94), dtype=F64)
    y = torch.randint(0, 3, (6,), generator=seeded(95))
    m1 = nn.Sequential(nn.Linear(30, 24, bias=False), nn.Tanh(), nn.Linear(24, 3)).double()
    m2 = copy.deepcopy(m1)
    pres = []
    for m in (m1, m2):
        pre = Preconditioner(m, CrossEntropy(), metric=steepest.KFAC(damping=damping), damping=0.1)
        m.zero_grad()
        F.cross_entropy(m(x), y).backward()
        pres.append(pre)
    pres[1].remove_hooks()
    for pre in pres:
        pre.step(x, y)
    assert [p.metric.fast_blocks for p in pres] == [1, 0]
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------ Optimizer path
class _WithBareParameter(nn.Module):
    """Two Linear layers and a parameter outside any layer (a diagonal block of K-FAC)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))) * self.scale


def test_exact_own_inverse_residual_is_sketched_and_follows_the_operator():
    """K-FAC's exact own inverse reports a sketched residual (two Gaussian probes and M
    applied to them, kept while M stays) instead of a product: at rounding level for the
    solve, and within a factor 10 of the true residual ||(M + lam I) x - b|| / ||b|| for a
    perturbed x (float64), also after factor refreshes (the diagonal block of a bare
    parameter changes) and eigendecompositions (the Kronecker blocks change)."""
    from steepest.solvers import OwnInverse

    torch.manual_seed(0)
    model = _WithBareParameter().double()
    x, y = data(24)
    metric = steepest.KFAC(steepest.GGN(), T_cov=2, T_inv=3)
    g = seeded(96)
    for call in range(7):
        op = metric.operator(Point(model, CrossEntropy(), x, y)) + 0.1
        b = torch.randn(op.size, generator=g, dtype=F64)
        sol = OwnInverse().solve(op, b)
        assert sol.exact and sol.residual < 1e-13 and "sketched" in sol.message
        for scale in (1e-6, 1e-2):
            wrong = sol.x + scale * torch.randn(op.size, generator=g, dtype=F64)
            true = float((op @ wrong - b).norm() / b.norm())
            assert 0.1 * true < op.sketched_residual(wrong, b) < 10 * true, (call, scale)
        with torch.no_grad():  # move the model so that refreshes see new factors
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=F64))
    # an eigendecomposition at every call or two: the residual product (cheaper than probes)
    for t_inv in (1, 2):
        op = steepest.KFAC(steepest.GGN(), T_inv=t_inv).operator(Point(model, CrossEntropy(), x, y))
        sol = OwnInverse().solve(op + 0.1, b)
        assert sol.exact and sol.residual < 1e-13 and "sketched" not in sol.message
    # an inexact inverse (the factored damping) keeps the residual of a product
    op = steepest.KFAC(steepest.GGN(), damping="factored").operator(
        Point(model, CrossEntropy(), x, y)
    )
    sol = OwnInverse().solve(op + 0.1, b)
    assert not sol.exact and "sketched" not in sol.message
    assert sol.residual == pytest.approx(float(((op + 0.1) @ sol.x - b).norm() / b.norm()))


def test_optimizer_step_that_fails_restores_kfac_state_from_its_snapshot():
    """Optimizer keeps K-FAC's state for the rollback by its cheap snapshot (no copy of the
    factors): a step that raises after the metric refreshed leaves the metric's state, the
    previous direction, the momentum buffer and the parameters as they were."""

    class Boom(steepest.LearningRate):
        armed = False

        def choose(self, ctx):
            if self.armed:
                raise RuntimeError("boom")
            return super().choose(ctx)

    torch.manual_seed(0)
    model = net()
    x, y = data(32)
    rule = Boom(0.5)
    opt = steepest.Optimizer(
        model,
        CrossEntropy(),
        metric=steepest.KFAC(T_cov=2, T_inv=3),
        damping=steepest.LevenbergMarquardt(1e-1),
        step=rule,
        momentum=0.5,
    )
    for _ in range(4):
        opt.step(x, y)
    before = copy.deepcopy(opt.state_dict())
    theta = opt.space.get().clone()
    assert before["metric"]["calls"] % 2 == 0  # the next call refreshes the factors
    rule.armed = True
    with pytest.raises(RuntimeError, match="boom"):
        opt.step(x, y)
    after = opt.state_dict()
    assert torch.equal(opt.space.get(), theta)
    assert after["metric"]["calls"] == before["metric"]["calls"]
    assert after["metric"]["refreshes"] == before["metric"]["refreshes"]
    for key, (a, g) in before["metric"]["factors"]["blocks"].items():
        assert torch.equal(a, after["metric"]["factors"]["blocks"][key][0])
        assert torch.equal(g, after["metric"]["factors"]["blocks"][key][1])
    for k in ("prev_direction", "momentum_buffer"):
        assert torch.equal(before[k], after[k])
    rule.armed = False
    opt.step(x, y)  # and the optimizer goes on


def test_step_after_a_backward_with_create_graph():
    """``loss.backward(create_graph=True)`` leaves ``.grad`` with a graph (e.g. for a gradient
    penalty); the preconditioned gradient is the same as after a plain backward (a regression:
    the flat gradient was gathered with ``torch.cat(out=)``, which refuses inputs that require
    grad)."""
    g = seeded(31)
    x, y = torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)
    grads = []
    for create_graph in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        pre = Preconditioner(model, CrossEntropy(), damping=0.1)
        F.cross_entropy(model(x), y).backward(create_graph=create_graph)
        pre.step(x, y)
        grads.append([p.grad.detach().clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_point_with_a_given_gradient():
    """Point(grad=...) takes the caller's gradient instead of its own backward (the forward
    and the loss checks stay); a wrong shape and distributed are named errors."""
    x, y = data()
    model = net()
    p = Point(model, CrossEntropy(), x, y)
    g = torch.randn(p.size, generator=seeded(5), dtype=F64)
    q = Point(model, CrossEntropy(), x, y, grad=g)
    with pytest.raises(steepest.errors.ShapeError, match="dtype"):
        Point(model, CrossEntropy(), x, y, grad=g.float())
    assert q.grad.data_ptr() == g.data_ptr() and torch.equal(q.grad, g)  # no copy
    assert q.value == p.value and torch.equal(q.z, p.z)
    with pytest.raises(steepest.errors.ShapeError, match="flat gradient"):
        Point(model, CrossEntropy(), x, y, grad=g[:-1])
    with pytest.raises(ConfigurationError, match="distributed"):
        Point(model, CrossEntropy(), x, y, grad=g, distributed=object())
    with pytest.raises(steepest.errors.NonFiniteError):
        Point(model, CrossEntropy(), x * float("inf"), y, grad=g)


def test_refresh_without_the_points_backward_keeps_the_factors():
    """A Preconditioner refresh hands .grad to the point (no backward of its own): K-FAC's
    factors and the preconditioned gradients equal those of a refresh on a full Point."""
    x, y = data()
    m1 = net()
    m2 = copy.deepcopy(m1)
    pres = [Preconditioner(m, CrossEntropy(), damping=0.1) for m in (m1, m2)]
    pres[1]._given_grad = False
    assert pres[0]._given_grad
    for _ in range(3):
        for m, pre in zip((m1, m2), pres):
            m.zero_grad()
            F.cross_entropy(m(x), y).backward()
            pre.step(x, y)
        for a, b in zip(m1.parameters(), m2.parameters()):
            assert torch.equal(a.grad, b.grad)
    f1, f2 = (p.metric.state_dict()["factors"]["blocks"] for p in pres)
    for key in f1:
        assert all(torch.equal(s, t) for s, t in zip(f1[key], f2[key]))


# ------------------------------------------------------------------------------ kl_clip
def _clip_pair(kl_clip, lr):
    """Two Preconditioners on copies of one model after the same backward: without and with
    kl_clip; returns (models, preconditioners)."""
    x, y = data()
    m1 = net()
    m2 = copy.deepcopy(m1)
    pres = [
        Preconditioner(m1, CrossEntropy(), damping=1e-3),
        Preconditioner(m2, CrossEntropy(), damping=1e-3, kl_clip=kl_clip, lr=lr(m2)),
    ]
    for m, pre in zip((m1, m2), pres):
        m.zero_grad()
        F.cross_entropy(m(x), y).backward()
        pre.step(x, y)
    return (m1, m2), pres, x, y


def test_kl_clip_scales_the_step_to_its_bound():
    """kl_clip: .grad = nu x with nu = min(1, sqrt(kappa / (lr^2 g^T x))), so the step
    d = -lr nu x has lr^2 nu^2 g^T x = kappa when it clips (g^T x = x^T (M + lambda I) x, the
    quadratic model of the KL); per-group learning rates enter squared, each on its group's
    part; a bound that is not reached leaves x as it is."""
    x, y = data()
    base = net()
    base.zero_grad()
    F.cross_entropy(base(x), y).backward()
    g = torch.cat([p.grad.reshape(-1) for p in base.parameters()])
    (m1, m2), pres, _, _ = _clip_pair(1e-6, lambda m: 0.5)
    xs = torch.cat([p.grad.reshape(-1) for p in m1.parameters()])
    got = torch.cat([p.grad.reshape(-1) for p in m2.parameters()])
    nu = min(1.0, (1e-6 / (0.25 * float(g @ xs))) ** 0.5)
    assert nu < 1 and pres[1].last_scale == pytest.approx(nu, rel=1e-12)
    torch.testing.assert_close(got, nu * xs, rtol=1e-12, atol=0)
    assert 0.25 * nu**2 * float(g @ xs) == pytest.approx(1e-6, rel=1e-10)

    # a loose bound: nothing changes
    (m1, m2), pres, _, _ = _clip_pair(1e6, lambda m: 0.5)
    assert pres[1].last_scale == 1.0
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(m1.parameters(), m2.parameters()))


@pytest.mark.parametrize("rates", [(0.01, 1.0), (0.0, 1.0), (0.1, 0.2)])
def test_kl_clip_with_different_rates_bounds_the_true_step(rates):
    """Weights and biases in two groups with their own rates (one K-FAC block couples them):
    the step d = -nu D x has d^T (M + lambda I) d = kappa exactly, M built again densely on the
    same batch (exact damping, T = 1: x solves (M + lambda I) x = g); the per-group sum
    sum_k lr_k^2 g_k^T x_k would leave it up to 1e3 kappa (or unclipped)."""
    x, y = data()
    model = net()
    ws = [p for n, p in model.named_parameters() if n.endswith("weight")]
    bs = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = torch.optim.SGD([{"params": ws, "lr": rates[0]}, {"params": bs, "lr": rates[1]}])
    metric = steepest.KFAC(steepest.GGN(), damping="exact", ema=None, T_cov=1, T_inv=1)
    lam, kappa = 1e-3, 1e-7
    pre = Preconditioner(model, CrossEntropy(), metric=metric, damping=lam, kl_clip=kappa, lr=opt)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    pre.step(x, y)
    assert pre.last_scale < 1
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    d = torch.cat([-lr_of[id(p)] * p.grad.reshape(-1) for p in model.parameters()])
    point = Point(model, CrossEntropy(), x, y)
    dense = steepest.KFAC(steepest.GGN(), damping="exact").operator(point).to_dense()
    q = float(d @ (dense + lam * torch.eye(len(d), dtype=F64)) @ d)
    assert q == pytest.approx(kappa, rel=1e-9)


def test_kl_clip_errors_name_the_fix_and_change_nothing():
    model = net()
    with pytest.raises(ConfigurationError, match="needs the learning rate"):
        Preconditioner(model, CrossEntropy(), kl_clip=1e-3)
    for bad in (0.0, -1.0, float("inf"), "1e-3"):
        with pytest.raises(ConfigurationError, match="kl_clip must be"):
            Preconditioner(model, CrossEntropy(), kl_clip=bad, lr=0.1)
    with pytest.raises(ConfigurationError, match="lr must be"):
        Preconditioner(model, CrossEntropy(), kl_clip=1e-3, lr=-0.1)
    with pytest.raises(ConfigurationError, match="does not hold 2 of"):
        part = torch.optim.SGD(list(model.parameters())[:2], lr=0.1)
        Preconditioner(model, CrossEntropy(), kl_clip=1e-3, lr=part)
    x, y = data()
    for lr, match in ((lambda: float("nan"), "finite float"), (lambda: "0.1", "finite float")):
        pre = Preconditioner(model, CrossEntropy(), kl_clip=1e-3, lr=lr)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        with pytest.raises(ConfigurationError, match=match):
            pre.step(x, y)
        assert all(torch.equal(a, p.grad) for a, p in zip(grads, model.parameters()))
        assert pre.metric.state_dict()["factors"] is None


def test_kl_clip_trains_where_the_unbounded_step_diverges():
    """On scikit-learn's digits (an MLP 64-32-10, batches of 64, SGD with momentum 0.9,
    lr 0.3, lambda 1e-3, two epochs) the unbounded K-FAC step diverges (full-batch loss above
    its start), while kl_clip = 1e-3 with lr=the optimizer trains (loss below 0.3)."""
    from sklearn.datasets import load_digits

    xs, ys = load_digits(return_X_y=True)
    xs, ys = torch.tensor(xs / 16, dtype=torch.float32), torch.tensor(ys)
    torch.manual_seed(0)
    m0 = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    start = float(F.cross_entropy(m0(xs), ys))
    final = {}
    for clip in (None, 1e-3):
        m = copy.deepcopy(m0)
        opt = torch.optim.SGD(m.parameters(), lr=0.3, momentum=0.9)
        pre = Preconditioner(m, CrossEntropy(), damping=1e-3, kl_clip=clip, lr=opt)
        perm = torch.randperm(len(xs), generator=seeded(3))
        for _ in range(2):
            for i in range(0, len(xs) - 63, 64):
                idx = perm[i : i + 64]
                opt.zero_grad()
                F.cross_entropy(m(xs[idx]), ys[idx]).backward()
                pre.step(xs[idx], ys[idx])
                opt.step()
        with torch.no_grad():
            final[clip] = float(F.cross_entropy(m(xs), ys))
    assert not final[None] < start  # diverged (or NaN)
    assert final[1e-3] < 0.3 < start


def test_a_refresh_takes_the_factors_from_the_points_recorded_forward():
    """A Preconditioner refresh records the Kronecker layers in its point's forward: the
    factors and preconditioned gradients equal those of a capture with a forward of its own
    (float64), with one forward fewer per refresh."""

    class OwnForward(steepest.KFAC):
        record_layers = ()

    x, y = data()
    runs = []
    for cls in (steepest.KFAC, OwnForward):
        model = net()
        calls = []
        model[0].register_forward_hook(lambda m, i, o, calls=calls: calls.append(1))
        pre = Preconditioner(model, CrossEntropy(), metric=cls(T_cov=2), damping=0.1)
        for _ in range(4):
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            pre.step(x, y)
        grads = [p.grad.clone() for p in model.parameters()]
        runs.append((grads, pre.metric.state_dict()["factors"], len(calls)))
    (g1, f1, n1), (g2, f2, n2) = runs
    assert n1 == n2 - 2  # two refreshes (steps 1 and 3), one forward fewer each
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    for key, (A, G) in f2["blocks"].items():
        torch.testing.assert_close(f1["blocks"][key][0], A, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(f1["blocks"][key][1], G, rtol=1e-12, atol=1e-14)

"""KFAC and EKFAC against dense references built independently (tests/reference.py, explicit
loops over patches and positions), in float64.

- ``KFAC(GGN())`` equals the exact GGN's diagonal blocks for deep linear networks with MSE
  (where the Kronecker factorisation is exact) and for one sample on an MLP; K-FAC-expand and
  K-FAC-reduce on sequence models in their exact settings;
- KFC factors of Conv1d/Conv2d (padding, stride, dilation, groups, bias) equal their definition
  built by explicit unfolding;
- the other parameters' blocks (LayerNorm, BatchNorm in eval mode, Embedding, a custom module)
  equal the exact diagonal of the base; the own inverse is the inverse at rounding level;
- EKFAC's scalings equal the exact projected diagonal (Linear and Conv2d layers);
- sequence-first layers (torch's ``TransformerEncoderLayer(batch_first=False)``) get the
  factors and scalings of batch-first ones; a layer without batch axis is refused by name
  where the per-sample rows matter; attention with ``nn.Linear`` projections gets Kronecker
  blocks equal to their definition;
- K-FAC with a Monte-Carlo Fisher converges to the exact Fisher's; with the empirical Fisher
  it is exact on one sample; a convolution's operator equals the dense GGN's blocks where
  KFC is exact (one sample, one position);
- models train with ``Optimizer`` and ``TorchOptimizer``; state_dict resumes bit for bit.
"""

from __future__ import annotations

import copy

import pytest
import reference as ref
import torch
from reference import rel_err, seeded
from torch import nn

import steepest
from steepest.ekfac import EKFAC
from steepest.errors import ConfigurationError
from steepest.kronecker import KFAC
from steepest.losses import MSE, BCEWithLogits, CrossEntropy
from steepest.metrics import GGN, EmpiricalFisher, Fisher, GaussNewton, Hessian
from steepest.point import Point
from steepest.solvers import Auto, OwnInverse

F64 = torch.float64


def layer_perm(out: int, inp: int, offset: int, bias: bool = True) -> list[int]:
    """Flat indices of [W b] in row-major order (the order of G (x) A)."""
    idx = []
    for r in range(out):
        idx += [offset + r * inp + c for c in range(inp)]
        if bias:
            idx.append(offset + out * inp + r)
    return idx


def block_mask(model: nn.Module, dt=F64) -> torch.Tensor:
    """Mask of the per-Linear [W, b] diagonal blocks in flat parameter order."""
    size = sum(p.numel() for p in model.parameters())
    mask = torch.zeros(size, size, dtype=torch.bool)
    o = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            n = m.weight.numel() + m.bias.numel()
            mask[o : o + n, o : o + n] = True
            o += n
    return mask


def _kron_dense_ok(op, dense, mask):
    k = op.to_dense()
    assert rel_err(k, dense * mask) < 1e-12
    assert rel_err(op.diagonal(), dense.diagonal()) < 1e-12
    v = torch.randn(op.size, 3, generator=seeded(9), dtype=F64)
    assert rel_err(op @ v, (dense * mask) @ v) < 1e-12


@pytest.mark.parametrize("base", [GGN(), GaussNewton(), Fisher()])
def test_deep_linear_mse_is_exact(base):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 5), nn.Linear(5, 2)).to(F64)
    g = seeded(1)
    x, y = torch.randn(7, 3, generator=g, dtype=F64), torch.randn(7, 2, generator=g, dtype=F64)
    loss = MSE(sigma=0.7)
    dense = ref.metric("ggn", model, loss, x, y)
    if isinstance(base, GaussNewton):
        dense = ref.metric("gauss-newton", model, loss, x, y)
    op = KFAC(base).operator(Point(model, loss, x, y))
    _kron_dense_ok(op, dense, block_mask(model))


@pytest.mark.parametrize("loss_name", ["ce", "bce", "mse"])
def test_one_sample_mlp_is_exact(loss_name):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(F64)
    x = torch.randn(1, 3, generator=seeded(2), dtype=F64)
    loss, y = {
        "ce": (CrossEntropy(), torch.tensor([2])),
        "bce": (BCEWithLogits(), torch.tensor([[1.0, 0.0, 1.0]], dtype=F64)),
        "mse": (MSE(), torch.randn(1, 3, generator=seeded(3), dtype=F64)),
    }[loss_name]
    dense = ref.metric("ggn", model, loss, x, y)
    op = KFAC(GGN()).operator(Point(model, loss, x, y))
    _kron_dense_ok(op, dense, block_mask(model))


def test_inverse_is_the_inverse_and_auto_uses_it():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64)
    g = seeded(4)
    x, y = torch.randn(9, 3, generator=g, dtype=F64), torch.randint(0, 3, (9,), generator=g)
    op = KFAC(GGN()).operator(Point(model, CrossEntropy(), x, y))
    damped = op + 1e-2
    b = torch.randn(op.size, generator=g, dtype=F64)
    assert isinstance(Auto().choose(damped), OwnInverse)
    sol = Auto().solve(damped, b)
    assert sol.exact and sol.residual < 1e-13
    assert rel_err(sol.x, torch.linalg.solve(damped.to_dense(), b)) < 1e-12
    # columns at once
    B = torch.randn(op.size, 3, generator=g, dtype=F64)
    assert rel_err(damped @ damped.solve(B), B) < 1e-13


def test_factored_damping_is_martens_grosse():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(2, 3)).to(F64)
    g = seeded(5)
    x, y = torch.randn(6, 2, generator=g, dtype=F64), torch.randn(6, 3, generator=g, dtype=F64)
    metric = KFAC(GGN(), damping="factored")
    op = metric.operator(Point(model, MSE(), x, y))
    (A, G) = next(iter(metric.state_dict()["factors"]["blocks"].values()))
    A, G = A[0], G[0]
    lam = 0.3
    pi = ((A.trace() / 3) / (G.trace() / 3)).sqrt()
    approx = torch.kron(
        G + lam**0.5 / pi * torch.eye(3, dtype=F64), A + pi * lam**0.5 * torch.eye(3, dtype=F64)
    )
    perm = layer_perm(3, 2, 0)
    b = torch.randn(op.size, generator=g, dtype=F64)
    sol = OwnInverse().solve(op + lam, b)
    assert not sol.exact
    assert rel_err(sol.x[perm], torch.linalg.solve(approx, b[perm])) < 1e-12


# ------------------------------------------------------------------------------ convolutions
def explicit_patches(x, k, stride, pad, dil):
    """(N, L, C*kh*kw) patches of a 2-d input by explicit indexing (zero padding)."""
    n, c, h, w = x.shape
    xp = torch.zeros(n, c, h + 2 * pad[0], w + 2 * pad[1], dtype=x.dtype)
    xp[:, :, pad[0] : pad[0] + h, pad[1] : pad[1] + w] = x
    ho = (h + 2 * pad[0] - dil[0] * (k[0] - 1) - 1) // stride[0] + 1
    wo = (w + 2 * pad[1] - dil[1] * (k[1] - 1) - 1) // stride[1] + 1
    rows = []
    for i in range(ho):
        for j in range(wo):
            vals = []
            for ch in range(c):
                for a in range(k[0]):
                    for b in range(k[1]):
                        vals.append(
                            xp[:, ch, i * stride[0] + a * dil[0], j * stride[1] + b * dil[1]]
                        )
            rows.append(torch.stack(vals, 1))
    return torch.stack(rows, 1)


@pytest.mark.parametrize(
    "conv",
    [
        dict(cin=2, cout=4, k=(3, 3), stride=(1, 1), pad=(1, 1), dil=(1, 1), groups=1, bias=True),
        dict(cin=4, cout=4, k=(2, 3), stride=(2, 1), pad=(0, 2), dil=(1, 2), groups=2, bias=True),
        dict(cin=3, cout=3, k=(3, 3), stride=(1, 2), pad=(1, 0), dil=(1, 1), groups=3, bias=False),
        dict(
            cin=2,
            cout=3,
            k=(1, 3),
            stride=(1, 2),
            pad=(0, 1),
            dil=(1, 1),
            groups=1,
            bias=True,
            one_d=True,
        ),
    ],
)
def test_kfc_equals_explicit_unfolding(conv):
    torch.manual_seed(4)
    one_d = conv.get("one_d", False)
    if one_d:
        layer = nn.Conv1d(
            conv["cin"],
            conv["cout"],
            conv["k"][1],
            conv["stride"][1],
            conv["pad"][1],
            conv["dil"][1],
            conv["groups"],
            conv["bias"],
        )
        x = torch.randn(3, conv["cin"], 7, generator=seeded(6), dtype=F64)
    else:
        layer = nn.Conv2d(
            conv["cin"],
            conv["cout"],
            conv["k"],
            conv["stride"],
            conv["pad"],
            conv["dil"],
            conv["groups"],
            conv["bias"],
        )
        x = torch.randn(3, conv["cin"], 6, 7, generator=seeded(6), dtype=F64)
    model = nn.Sequential(layer, nn.Tanh(), nn.Flatten(), nn.LazyLinear(2)).to(F64)
    model(x)  # materialise the lazy layer
    sigma = 0.8
    y = torch.randn(3, 2, generator=seeded(7), dtype=F64)
    metric = KFAC(GGN())
    metric.operator(Point(model, MSE(sigma=sigma), x, y))
    (A, G) = metric.state_dict()["factors"]["blocks"][(0, 1 if conv["bias"] else None)]
    # reference: explicit patches, and output gradients of z_k / sigma by autograd
    x2 = x.unsqueeze(2) if one_d else x
    k = (1, conv["k"][1]) if one_d else conv["k"]
    st = (1, conv["stride"][1]) if one_d else conv["stride"]
    pd = (0, conv["pad"][1]) if one_d else conv["pad"]
    dl = (1, conv["dil"][1]) if one_d else conv["dil"]
    pat = explicit_patches(x2, k, st, pd, dl)  # (N, L, Cin*kk)
    n, length, _ = pat.shape
    s = layer(x).detach().requires_grad_(True)
    z = model[3](model[2](model[1](s)))
    grads = [torch.autograd.grad(z[:, c].sum() / sigma, s, retain_graph=True)[0] for c in range(2)]
    grp, cin_g, cout_g = (
        conv["groups"],
        conv["cin"] // conv["groups"],
        conv["cout"] // conv["groups"],
    )
    kk = k[0] * k[1]
    for gi in range(grp):
        a = pat[:, :, gi * cin_g * kk : (gi + 1) * cin_g * kk].reshape(n * length, -1)
        if conv["bias"]:
            a = torch.cat([a, torch.ones(n * length, 1, dtype=F64)], 1)
        A_ref = a.T @ a / (n * length)
        G_ref = torch.zeros(cout_g, cout_g, dtype=F64)
        for gr in grads:
            go = gr[:, gi * cout_g : (gi + 1) * cout_g].reshape(n, cout_g, -1)
            go = go.permute(0, 2, 1).reshape(-1, cout_g)
            G_ref += go.T @ go / n
        assert rel_err(A[gi], A_ref) < 1e-12
        assert rel_err(G[gi], G_ref) < 1e-12


# ------------------------------------------------------------------------------ sequences
class MeanOverT(nn.Module):
    def forward(self, h):
        return h.mean(1)


def test_expand_and_reduce_in_their_exact_settings():
    torch.manual_seed(5)
    g = seeded(8)
    x = torch.randn(4, 5, 3, generator=g, dtype=F64)  # (N, T, d)
    # expand setting: a deep linear net applied at every position, MSE on every position
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).to(F64)
    y = torch.randn(4, 5, 2, generator=g, dtype=F64)
    dense = ref.metric("ggn", model, MSE(), x, y)
    op = KFAC(GGN(), sequence="expand").operator(Point(model, MSE(), x, y))
    _kron_dense_ok(op, dense, block_mask(model))
    # reduce setting: positions averaged before the last layer
    model = nn.Sequential(nn.Linear(3, 4), MeanOverT(), nn.Linear(4, 2)).to(F64)
    y = torch.randn(4, 2, generator=g, dtype=F64)
    dense = ref.metric("ggn", model, MSE(), x, y)
    op = KFAC(GGN(), sequence="reduce").operator(Point(model, MSE(), x, y))
    _kron_dense_ok(op, dense, block_mask(model))
    # and expand is not exact there (the two approximations differ)
    op_e = KFAC(GGN(), sequence="expand").operator(Point(model, MSE(), x, y))
    assert rel_err(op_e.to_dense(), dense * block_mask(model)) > 1e-3


# ------------------------------------------------------------------------------ any model
class Scale(nn.Module):
    """A custom module with its own parameter."""

    def __init__(self, d):
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, h):
        return h * self.s


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.norm = nn.LayerNorm(4)
        self.lin = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.scale = Scale(6)
        self.out = nn.Linear(6, 3)

    def forward(self, idx):
        h = self.norm(self.emb(idx))
        return self.out(torch.tanh(self.scale(self.bn(self.lin(h)))))


def mixed_data(n=24, seed=10):
    g = seeded(seed)
    idx = torch.randint(0, 7, (n,), generator=g)
    return idx, (idx % 3)


def test_other_parameters_get_the_exact_diagonal():
    torch.manual_seed(6)
    model = Mixed().to(F64).eval()
    idx, y = mixed_data(8)
    for base, name in ((GGN(), "ggn"), (EmpiricalFisher(), "empirical-fisher")):
        dense = ref.metric(name, model, CrossEntropy(), idx, y)
        op = KFAC(base).operator(Point(model, CrossEntropy(), idx, y))
        names = [n for n, _ in model.named_parameters()]
        sizes = [p.numel() for p in model.parameters()]
        offs = [sum(sizes[:i]) for i in range(len(sizes))]
        other = [i for i, n in enumerate(names) if not n.startswith(("lin.", "out."))]
        d, dref = op.diagonal(), dense.diagonal()
        for i in other:
            sl = slice(offs[i], offs[i] + sizes[i])
            assert rel_err(d[sl], dref[sl]) < 1e-12, names[i]
        v = torch.randn(op.size, generator=seeded(11), dtype=F64)
        assert rel_err((op + 0.1) @ (op + 0.1).solve(v), v) < 1e-12


@pytest.mark.parametrize(
    "metric", [KFAC(), EKFAC(), KFAC(ema=0.95, T_cov=2, T_inv=3, damping="factored")]
)
def test_mixed_model_trains_with_optimizer_and_torch_optimizer(metric):
    torch.manual_seed(7)
    model = Mixed().eval()
    idx, y = mixed_data(48)
    m0 = copy.deepcopy(model)
    opt = steepest.Optimizer(
        model,
        CrossEntropy(),
        metric=copy.deepcopy(metric),
        damping=steepest.LevenbergMarquardt(1e-1),
    )
    first = opt.step(idx, y)
    for _ in range(12):
        info = opt.step(idx, y)
    assert first.solver == "OwnInverse"
    assert info.loss < 0.7 * first.loss
    topt = steepest.TorchOptimizer(
        m0.parameters(),
        loss=CrossEntropy(),
        metric=copy.deepcopy(metric),
        damping=steepest.LevenbergMarquardt(1e-1),
    )
    l0 = float(topt.step(lambda: (m0(idx), y)))
    for _ in range(12):
        topt.step(lambda: (m0(idx), y))
    assert topt.last_info.loss < 0.7 * l0 and topt.last_info.solver == "OwnInverse"


def test_closure_and_module_paths_agree():
    torch.manual_seed(8)
    model = Mixed().to(F64).eval()
    idx, y = mixed_data(10)
    a = steepest.TorchOptimizer(model.parameters(), loss=CrossEntropy(), metric=KFAC(GGN()))
    from steepest.closure_point import ClosurePoint

    cp = ClosurePoint(a.steepest.space, CrossEntropy(), lambda: (model(idx), y), KFAC(GGN()))
    op_c = KFAC(GGN()).operator(cp)
    op_m = KFAC(GGN()).operator(Point(model, CrossEntropy(), idx, y))
    assert rel_err(op_c.to_dense(), op_m.to_dense()) < 1e-12


# ------------------------------------------------------------------------------ EKFAC
def test_ekfac_scalings_are_the_exact_projected_diagonal():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(F64)
    g = seeded(12)
    x, y = torch.randn(10, 3, generator=g, dtype=F64), torch.randint(0, 3, (10,), generator=g)
    metric = EKFAC(GGN())
    op = metric.operator(Point(model, CrossEntropy(), x, y))
    dense = ref.metric("ggn", model, CrossEntropy(), x, y)
    state = metric.state_dict()
    offset = 0
    for wi, (o, i) in ((0, (4, 3)), (2, (3, 4))):
        ea, qa, eg, qg = state["eig"][(wi, wi + 1)]
        perm = layer_perm(o, i, offset)
        block = dense[perm][:, perm]
        q = torch.kron(qg[0], qa[0])
        s_ref = (q.T @ block @ q).diagonal().reshape(o, i + 1)
        assert rel_err(state["scalings"][(wi, wi + 1)][0], s_ref) < 1e-12
        # and the operator's block is Q diag(s) Q^T
        assert (
            rel_err(op.to_dense()[perm][:, perm], q @ torch.diag(s_ref.reshape(-1)) @ q.T) < 1e-12
        )
        offset += o * i + o
    b = torch.randn(op.size, generator=g, dtype=F64)
    assert rel_err((op + 0.05) @ (op + 0.05).solve(b), b) < 1e-12


# ------------------------------------------------------------------------------ state
def _assert_resumes_bit_for_bit(make, model, x, y, warm: int, then: int) -> None:
    """``warm`` steps, then the state is saved; ``then`` more steps from the saved state in a
    fresh optimizer on a fresh model of the same architecture (4-8-3, tanh) give bit-identical
    losses and parameters."""
    opt = make(model)
    for _ in range(warm):
        opt.step(x, y)
    saved, params = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    ref_losses = [opt.step(x, y).loss for _ in range(then)]
    model2 = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    model2.load_state_dict(params)
    opt2 = make(model2)
    opt2.load_state_dict(saved)
    assert [opt2.step(x, y).loss for _ in range(then)] == ref_losses
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_state_dict_resumes_bit_for_bit(cls):
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    g = seeded(13)
    x, y = torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g)

    def make(m):
        return steepest.Optimizer(
            m,
            CrossEntropy(),
            metric=cls(ema=0.9, T_cov=2, T_inv=3),
            damping=steepest.LevenbergMarquardt(1e-1),
        )

    _assert_resumes_bit_for_bit(make, model, x, y, warm=4, then=4)


def test_refresh_schedule_and_ema():
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(2, 3)).to(F64)
    g = seeded(14)
    batches = [
        (torch.randn(5, 2, generator=g, dtype=F64), torch.randn(5, 3, generator=g, dtype=F64))
        for _ in range(3)
    ]
    metric = KFAC(GGN(), ema=0.95, T_cov=2, T_inv=4)
    fresh = [KFAC(GGN(), ema=None, T_cov=1, T_inv=1) for _ in batches]
    A, dense = [], []
    for (x, y), f in zip(batches, fresh):
        op = metric.operator(Point(model, MSE(), x, y))
        dense.append(f.operator(Point(model, MSE(), x, y)).to_dense())
        A.append(next(iter(f.state_dict()["factors"]["blocks"].values()))[0])
    got = next(iter(metric.state_dict()["factors"]["blocks"].values()))[0]
    # calls 0 and 2 refresh; eps = min(1 - 1/2, 0.95) at the second refresh
    assert rel_err(got, 0.5 * A[0] + 0.5 * A[2]) < 1e-14
    # the eigendecomposition was computed at call 0 only: until call 4 the operator is the
    # matrix decomposed then (batch 0's), so its own inverse is exact for it
    assert rel_err(op.to_dense(), dense[0]) < 1e-14 and op.inverse_exact
    damped = op + 1e-2
    b = torch.randn(op.size, generator=g, dtype=F64)
    assert rel_err(damped @ damped.solve(b), b) < 1e-13
    op = metric.operator(Point(model, MSE(), *batches[0]))  # call 3: the same matrix
    assert rel_err(op.to_dense(), dense[0]) < 1e-14
    op = metric.operator(Point(model, MSE(), *batches[1]))  # call 4: refresh and decompose
    state = metric.state_dict()
    key = next(iter(state["factors"]["blocks"]))
    assert all(a is b for a, b in zip(state["eig_factors"][key], state["factors"]["blocks"][key]))
    assert rel_err(op.to_dense(), dense[0]) > 1e-3 and op.inverse_exact


def test_bad_configuration_named():
    with pytest.raises(ConfigurationError, match="base"):
        KFAC(Hessian())
    with pytest.raises(ConfigurationError, match="sequence"):
        KFAC(sequence="mean")
    with pytest.raises(ConfigurationError, match="T_cov"):
        KFAC(T_cov=0)
    with pytest.raises(ConfigurationError, match="ema"):
        KFAC(ema=1.0)


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
@pytest.mark.parametrize("mode", ["alpha", "momentum"])
def test_rescaling_by_the_exact_quadratic_model(mode, cls):
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(F64)
    g = seeded(15)
    x, y = torch.randn(12, 3, generator=g, dtype=F64), torch.randint(0, 3, (12,), generator=g)
    lam = 0.1
    metric = cls(Fisher(mc_samples=1), rescale=mode)
    point = Point(model, CrossEntropy(), x, y, generator=seeded(16))
    op = metric.operator(point)
    assert not op.inverse_exact  # the optimizer measures the rescaled step by its own quadratic
    c = ref.metric("fisher", model, CrossEntropy(), x, y) + lam * torch.eye(op.size, dtype=F64)
    kfac = op.to_dense() + lam * torch.eye(op.size, dtype=F64)
    b1, b2 = (torch.randn(op.size, generator=g, dtype=F64) for _ in range(2))
    d1 = torch.linalg.solve(kfac, b1)
    x1 = (op + lam).solve(b1)
    assert rel_err(x1, (b1 @ d1) / (d1 @ c @ d1) * d1) < 1e-12
    # a second solve on the same operator (a try the optimizer rejected, solved again) has
    # the same previous answer as the first (here none): alpha alone, not x1 as delta_0
    again = (op + lam).solve(b2)
    d2 = torch.linalg.solve(kfac, b2)
    assert rel_err(again, (b2 @ d2) / (d2 @ c @ d2) * d2) < 1e-12
    op = metric.operator(point)  # the next step (no refresh is due: the same K-FAC matrix)
    assert rel_err(op.to_dense() + lam * torch.eye(op.size, dtype=F64), kfac) < 1e-14
    b3 = torch.randn(op.size, generator=g, dtype=F64)
    d3 = torch.linalg.solve(kfac, b3)
    x3 = (op + lam).solve(b3)
    if mode == "alpha":
        assert rel_err(x3, (b3 @ d3) / (d3 @ c @ d3) * d3) < 1e-12
        return
    basis = torch.stack([d3, again], 1)  # min 1/2 x^T C x - b^T x over span{Delta, x_prev}
    coef = torch.linalg.solve(basis.T @ c @ basis, basis.T @ b3)
    assert rel_err(x3, basis @ coef) < 1e-10
    q = lambda v: 0.5 * v @ c @ v - b3 @ v  # noqa: E731
    assert q(x3) <= q((b3 @ d3) / (d3 @ c @ d3) * d3) + 1e-14


def test_torch_optimizer_state_dict_resumes_bit_for_bit():
    torch.manual_seed(13)
    g = seeded(17)
    x, y = torch.randn(24, 4, generator=g), torch.randint(0, 3, (24,), generator=g)

    def make(model):
        return steepest.TorchOptimizer(
            model.parameters(),
            loss=CrossEntropy(),
            metric=KFAC(ema=0.9, T_cov=2, T_inv=3),
            damping=steepest.LevenbergMarquardt(1e-1),
        )

    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    opt = make(model)
    for _ in range(3):
        opt.step(lambda: (model(x), y))
    saved, params = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    losses = [float(opt.step(lambda: (model(x), y))) for _ in range(3)]
    model2 = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    model2.load_state_dict(params)
    opt2 = make(model2)
    opt2.load_state_dict(saved)
    assert [float(opt2.step(lambda: (model2(x), y))) for _ in range(3)] == losses
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


class Attention(nn.Module):
    """Self-attention (its out_proj Linear is applied functionally, never called)."""

    def __init__(self):
        super().__init__()
        self.att = nn.MultiheadAttention(4, 2, batch_first=True)
        self.out = nn.Linear(4, 3)

    def forward(self, h):
        return self.out(self.att(h, h, h, need_weights=False)[0].mean(1))


def test_attention_modules_not_called_get_the_exact_diagonal():
    torch.manual_seed(14)
    model = Attention().to(F64)
    g = seeded(18)
    x, y = torch.randn(5, 3, 4, generator=g, dtype=F64), torch.randint(0, 3, (5,), generator=g)
    dense = ref.metric("ggn", model, CrossEntropy(), x, y)
    op = KFAC(GGN()).operator(Point(model, CrossEntropy(), x, y))
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    end = sum(s for n, s in zip(names, sizes) if n.startswith("att."))
    assert rel_err(op.diagonal()[:end], dense.diagonal()[:end]) < 1e-12
    assert bool((op.diagonal()[:end] > 0).any())


def test_signed_ggn_own_inverse_inverts_the_operator():
    """GGN with GaussianNLL at large residuals: H_L is indefinite, G is signed; the own
    inverse (flagged exact) must invert the operator ``@`` applies (no clamped eigenvalues)."""
    from steepest.losses import GaussianNLL

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    x = torch.randn(1, 2, generator=seeded(30), dtype=F64)
    y = torch.full((1, 1), 5.0, dtype=F64)
    for cls in (KFAC, EKFAC):
        op = cls(GGN()).operator(Point(model, GaussianNLL(), x, y))
        dense = op.to_dense()
        assert float(torch.linalg.eigvalsh(dense).min()) < -0.1  # really indefinite
        b = torch.randn(op.size, generator=seeded(31), dtype=F64)
        lam = 5.0
        s = (op + lam).solve(b)
        res = (dense + lam * torch.eye(op.size, dtype=F64)) @ s - b
        assert op.inverse_exact
        assert float(res.norm() / b.norm()) < 1e-12, cls.__name__


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_state_of_another_model_refused_by_name(cls):
    """K-FAC factors of a model with other layer widths (same number of trainable parameters
    after dropping the optimizer's own vectors) are refused before anything changes."""
    x = torch.randn(8, 3, generator=seeded(50), dtype=F64)
    y = torch.randn(8, 2, generator=seeded(51), dtype=F64)
    torch.manual_seed(0)
    ma = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    mb = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()

    def make(m):
        metric = cls(GGN(), T_cov=5, T_inv=5)
        return steepest.Optimizer(
            m, MSE(), metric=metric, damping=steepest.LevenbergMarquardt(1e-2)
        )

    oa, ob = make(ma), make(mb)
    oa.step(x, y)
    ob.step(x, y)
    foreign = oa.state_dict()
    foreign["prev_direction"] = foreign["momentum_buffer"] = None
    before = ob.state_dict()
    with pytest.raises(ConfigurationError, match="do not fit"):
        ob.load_state_dict(foreign)
    after = ob.state_dict()
    assert after["steps"] == before["steps"]
    assert torch.equal(
        after["metric"]["factors"]["blocks"][(0, 1)][1],
        before["metric"]["factors"]["blocks"][(0, 1)][1],
    )
    ob.step(x, y)  # still works
    fresh = make(copy.deepcopy(mb))  # a fresh optimizer on the same model loads it
    fresh.load_state_dict(ob.state_dict())


class _TwiceNet(nn.Module):
    """l1 called twice in one forward (weight reuse)."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(torch.tanh(self.l1(x)))))


def test_layer_called_twice_per_sample_signs_and_scalings():
    """A Linear used twice per forward, GGN of a loss whose H_L signs vary per sample: G (signed)
    and EKFAC's scalings equal their definitions from explicit per-sample gradients, the two
    calls' contributions summed within each sample."""
    from steepest.losses import CallableLoss

    torch.manual_seed(3)
    n = 4
    model = _TwiceNet().double()
    x = torch.randn(n, 3, generator=seeded(60), dtype=F64)
    y = torch.randn(n, 2, generator=seeded(61), dtype=F64)
    loss = CallableLoss(lambda z, yy: (z**3 * yy).sum(1) / 6)  # H_L = diag(z * y)
    calls = []
    h = model.l1.register_forward_hook(lambda m, i, o: calls.append((i[0].detach(), o)))
    z = model(x)
    h.remove()
    hl = torch.stack(
        [
            torch.autograd.functional.hessian(
                lambda zz, j=j: loss.value(zz[None], y[j : j + 1]).sum(), z.detach()[j]
            )
            for j in range(n)
        ]
    )
    mu, q = torch.linalg.eigh(hl)
    s, w = q * mu.abs().sqrt()[:, None, :], torch.sign(mu)
    assert (w < 0).any() and (w > 0).any() and len({tuple(r) for r in w.tolist()}) > 1
    k = s.shape[-1]
    G = torch.zeros(3, 3, dtype=F64)
    per = torch.zeros(n, k, 3, 4, dtype=F64)  # per-sample gradients of [W b] along column k
    for c in range(k):
        gs = torch.autograd.grad(z, [o for _, o in calls], s[:, :, c], retain_graph=True)
        for (a, _), g in zip(calls, gs):
            ab = torch.cat([a, torch.ones(n, 1, dtype=F64)], 1)
            for j in range(n):
                G += w[j, c] * torch.outer(g[j], g[j])
                per[j, c] += torch.outer(g[j], ab[j])
    G /= n
    kfac = KFAC(GGN())
    kfac.operator(Point(model, loss, x, y))
    assert rel_err(kfac._state["factors"]["blocks"][(0, 1)][1][0], G) < 1e-12
    ekfac = EKFAC(GGN())
    ekfac.operator(Point(model, loss, x, y))
    _, qa, _, qg = ekfac._state["eig"][(0, 1)]
    want = (w[:, :, None, None] * (qg[0].T @ per @ qa[0]) ** 2).sum((0, 1)) / n
    assert rel_err(ekfac.scalings()[(0, 1)][0], want) < 1e-12


@pytest.mark.parametrize("stats_batch", [None, 5])
def test_capture_forward_sees_the_point_dropout_masks(stats_batch):
    """Inside Optimizer.step, K-FAC's factors come from the point's forward (recorded: no
    forward of their own) or, with ``stats_batch`` (a forward of the capture), from the same
    Dropout masks as the point's forward (and the trial's): they belong to the same network,
    A = E[a a^T] of the inputs the point's forward saw."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(0.5), nn.Linear(6, 2)).double()
    x = torch.randn(5, 6, generator=seeded(80), dtype=F64) + 3
    y = torch.randn(5, 2, generator=seeded(81), dtype=F64)
    seen = []
    model[1].register_forward_hook(lambda m, i, o: seen.append(i[0].detach().clone()))
    metric = KFAC(GGN(), stats_batch=stats_batch)
    opt = steepest.Optimizer(model, MSE(), metric=metric, damping=1e-2)
    opt.step(x, y)
    # the point, the trial, and the capture's own forward with stats_batch only
    assert len(seen) == (2 if stats_batch is None else 3)
    assert all(torch.equal(s != 0, seen[0] != 0) for s in seen)
    assert not (seen[0] != 0).all()  # Dropout really dropped something
    a = torch.cat([seen[0], torch.ones(5, 1, dtype=F64)], 1)
    A = metric.state_dict()["factors"]["blocks"][(0, 1)][0][0]
    assert rel_err(A, a.T @ a / 5) < 1e-13


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_a_replaced_layer_restarts_the_running_factors(cls):
    """Issue 9 with K-FAC's running state: after a layer is replaced by one of another width the
    optimizer follows the new parameters, warns, and the metric starts its factors afresh (the
    old EMA factors do not fit the new layers; before, the next step raised a raw size error)."""
    from steepest.errors import ParameterChangeWarning

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(16, 3, generator=seeded(60), dtype=F64)
    y = torch.randn(16, 2, generator=seeded(61), dtype=F64)
    metric = cls(GGN(), ema=0.9, T_cov=1, T_inv=1)
    opt = steepest.Optimizer(net, MSE(), metric=metric, damping=steepest.LevenbergMarquardt(1e-2))
    for _ in range(2):
        opt.step(x, y)
    assert metric.state_dict()["refreshes"] >= 2
    net[2] = nn.Linear(5, 4).double()
    net.add_module("3", nn.Linear(4, 2).double())
    twin = copy.deepcopy(net)
    with pytest.warns(ParameterChangeWarning):
        info = opt.step(x, y)
    assert torch.isfinite(torch.tensor(info.loss))
    assert metric.state_dict()["refreshes"] == 1  # one refresh since the reset
    # the factors are those of a fresh metric on the new model: no EMA mixed with the old
    # factors (the first layer kept its shape, so old factors would still fit it)
    fresh = cls(GGN(), ema=metric.ema, T_cov=metric.T_cov, T_inv=metric.T_inv)
    steepest.Optimizer(twin, MSE(), metric=fresh, damping=steepest.LevenbergMarquardt(1e-2)).step(
        x, y
    )
    ours, theirs = metric.state_dict(), fresh.state_dict()
    torch.testing.assert_close(ours["factors"], theirs["factors"], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(ours["eig"], theirs["eig"], rtol=1e-10, atol=1e-12)


def test_a_factor_eigh_that_fails_in_float32_is_redone_in_float64(monkeypatch):
    """LAPACK's eigh can fail to converge in float32 (seen on a float32 CNN); the factor is
    then decomposed in float64 (same eigenvalues to float32 rounding); a failure there too is
    a named SingularMatrixError, not a raw LinAlgError."""
    from steepest import kronecker_blocks
    from steepest.errors import SingularMatrixError

    g = torch.Generator().manual_seed(0)
    b = torch.randn(6, 6, generator=g)
    m = b @ b.T
    real = torch.linalg.eigh

    def flaky(x, *a, **k):
        if x.dtype == torch.float32:
            raise torch.linalg.LinAlgError("failed to converge")
        return real(x, *a, **k)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    mu, q = kronecker_blocks._eigh(m)
    assert mu.dtype == torch.float32 and q.dtype == torch.float32
    torch.testing.assert_close(q @ torch.diag(mu) @ q.T, m, rtol=1e-5, atol=1e-5)

    def broken(x, *a, **k):
        raise torch.linalg.LinAlgError("failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    with pytest.raises(SingularMatrixError, match="Kronecker factor"):
        kronecker_blocks._eigh(m)


# ------------------------------------------------------------------ statistics of a sub-batch
def _stats_model():
    torch.manual_seed(20)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3), nn.LayerNorm(3)).to(F64)


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_stats_batch_whole_batch_is_todays_factors(cls):
    """``stats_batch`` None, or at least the batch size, gives the factors of the whole batch
    bit for bit and draws nothing from the generator."""
    model = _stats_model()
    g = seeded(90)
    x, y = torch.randn(16, 4, generator=g, dtype=F64), torch.randint(0, 3, (16,), generator=g)
    states = []
    for k in (None, 16, 40):
        gen = seeded(91)
        metric = cls(stats_batch=k, ema=None, T_cov=1, T_inv=1)
        metric.operator(Point(model, CrossEntropy(), x, y, generator=gen))
        states.append((metric.state_dict(), gen.get_state()))
    for st, gen_state in states[1:]:
        torch.testing.assert_close(st["factors"], states[0][0]["factors"], rtol=0, atol=0)
        assert torch.equal(gen_state, states[0][1])


@pytest.mark.parametrize("base", [GGN(), Fisher(), EmpiricalFisher()])
def test_stats_batch_is_the_factors_of_that_sub_batch(base):
    """With ``stats_batch=k`` the factors (and the other parameters' diagonals) are those of
    the k samples drawn by the generator, sorted: K-FAC of a point on that sub-batch, and the
    first layer's A is the explicit mean of [x_i, 1][x_i, 1]^T over them."""
    model = _stats_model()
    g = seeded(92)
    x, y = torch.randn(20, 4, generator=g, dtype=F64), torch.randint(0, 3, (20,), generator=g)
    k = 7
    metric = KFAC(base, stats_batch=k, ema=None, T_cov=1, T_inv=1)
    metric.operator(Point(model, CrossEntropy(), x, y, generator=seeded(93)))
    idx = torch.randperm(20, generator=seeded(93))[:k].sort().values
    whole = KFAC(base, ema=None, T_cov=1, T_inv=1)
    whole.operator(Point(model, CrossEntropy(), x[idx], y[idx]))
    ours, sub = metric.state_dict()["factors"], whole.state_dict()["factors"]
    torch.testing.assert_close(ours, sub, rtol=1e-13, atol=1e-15)
    a = torch.cat([x[idx], torch.ones(k, 1, dtype=F64)], 1)
    assert rel_err(ours["blocks"][(0, 1)][0][0], a.T @ a / k) < 1e-14
    other = KFAC(base, ema=None, T_cov=1, T_inv=1)  # the whole batch's factors differ
    other.operator(Point(model, CrossEntropy(), x, y))
    assert rel_err(other.state_dict()["factors"]["blocks"][(0, 1)][0][0], a.T @ a / k) > 1e-2


def test_stats_batch_mc_fisher_draws_labels_for_the_sub_batch_only():
    """The Monte-Carlo Fisher's labels are sampled for the k samples of the sub-batch only,
    from the same generator after the draw of the sub-batch: G of a single Linear layer is the
    mean over them of the sampled output gradients' outer products, built here explicitly."""
    torch.manual_seed(21)
    model = nn.Linear(3, 4).to(F64)
    g = seeded(94)
    x, y = torch.randn(10, 3, generator=g, dtype=F64), torch.randint(0, 4, (10,), generator=g)
    k = 4
    metric = KFAC(stats_batch=k, ema=None, T_cov=1, T_inv=1)
    metric.operator(Point(model, CrossEntropy(), x, y, generator=seeded(95)))
    gen = seeded(95)
    idx = torch.randperm(10, generator=gen)[:k].sort().values
    z = model(x[idx]).detach()
    ys = CrossEntropy().sample(z, gen)
    gz = torch.softmax(z, 1) - torch.nn.functional.one_hot(ys, 4).to(F64)  # d l / d z
    G = metric.state_dict()["factors"]["blocks"][(0, 1)][1][0]
    assert rel_err(G, gz.T @ gz / k) < 1e-13


def test_stats_batch_rescaling_uses_the_whole_batch():
    """With factors from a sub-batch, the rescaling's exact Fisher is still the whole
    batch's: the answer minimises the whole batch's quadratic model along the K-FAC step."""
    model = _stats_model()
    g = seeded(96)
    x, y = torch.randn(18, 4, generator=g, dtype=F64), torch.randint(0, 3, (18,), generator=g)
    lam = 0.1
    metric = KFAC(Fisher(), stats_batch=5, rescale="alpha", ema=None, T_cov=1, T_inv=1)
    op = metric.operator(Point(model, CrossEntropy(), x, y, generator=seeded(97)))
    c = ref.metric("fisher", model, CrossEntropy(), x, y) + lam * torch.eye(op.size, dtype=F64)
    b = torch.randn(op.size, generator=g, dtype=F64)
    d = torch.linalg.solve(op.to_dense() + lam * torch.eye(op.size, dtype=F64), b)
    assert rel_err((op + lam).solve(b), (b @ d) / (d @ c @ d) * d) < 1e-11


@pytest.mark.parametrize(
    ("base", "name", "loss"),
    [
        (Fisher(), "fisher", CrossEntropy()),
        (GGN(), "ggn", MSE()),
        (GaussNewton(), "gauss-newton", CrossEntropy()),
        (EmpiricalFisher(), "empirical-fisher", CrossEntropy()),
    ],
)
def test_exact_gram_of_the_rescaling_is_the_dense_quadratic_form(base, name, loss):
    """The rescaling's V^T M V from Jacobian-vector products only equals the dense metric's."""
    from steepest.metrics import _exact_gram

    torch.manual_seed(22)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(F64)
    g = seeded(98)
    x = torch.randn(9, 3, generator=g, dtype=F64)
    y = torch.randint(0, 3, (9,), generator=g) if name != "ggn" else torch.randn(9, 3, dtype=F64)
    point = Point(model, loss, x, y)
    vs = [torch.randn(point.size, generator=g, dtype=F64) for _ in range(2)]
    dense = ref.metric(name, model, loss, x, y)
    v = torch.stack(vs, 1)
    assert rel_err(_exact_gram(base, point, vs), v.T @ dense @ v) < 1e-12


def test_stats_batch_state_dict_resumes_bit_for_bit():
    torch.manual_seed(23)
    g = seeded(99)
    x, y = torch.randn(30, 4, generator=g), torch.randint(0, 3, (30,), generator=g)

    def make(m):
        metric = KFAC(stats_batch=8, ema=0.9, T_cov=1, T_inv=2, rescale="momentum")
        return steepest.Optimizer(
            m, CrossEntropy(), metric=metric, damping=steepest.LevenbergMarquardt(1e-1)
        )

    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    _assert_resumes_bit_for_bit(make, model, x, y, warm=3, then=3)


def test_stats_batch_refused_by_name():
    for bad in (0, -3, 2.5, True, "8"):
        with pytest.raises(ConfigurationError, match="stats_batch"):
            KFAC(stats_batch=bad)
    torch.manual_seed(24)
    model = nn.Sequential(nn.Linear(4, 3))
    g = seeded(100)
    x, y = torch.randn(12, 4, generator=g), torch.randint(0, 3, (12,), generator=g)
    opt = steepest.TorchOptimizer(
        model.parameters(), loss=CrossEntropy(), metric=KFAC(stats_batch=4), damping=1e-2
    )
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ConfigurationError, match="stats_batch=4.*closure"):
        opt.step(lambda: (model(x), y))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # a closure batch no larger than stats_batch is used whole: nothing to refuse
    steepest.TorchOptimizer(
        model.parameters(), loss=CrossEntropy(), metric=KFAC(stats_batch=12), damping=1e-2
    ).step(lambda: (model(x), y))


def test_rescaling_retry_reuses_the_previous_answers_products(monkeypatch):
    """Two exact products a step and no more: a try solved again with another lambda (LM
    after a rejection) computes J Delta anew but not J delta_0, and no J^T u at all."""
    torch.manual_seed(25)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(F64)
    g = seeded(101)
    x, y = torch.randn(10, 3, generator=g, dtype=F64), torch.randint(0, 3, (10,), generator=g)
    metric = KFAC(rescale="momentum", ema=None, T_cov=1, T_inv=1)
    point = Point(model, CrossEntropy(), x, y, generator=seeded(102))
    b = torch.randn(point.size, generator=g, dtype=F64)
    (metric.operator(point) + 0.1).solve(b)  # the first step: delta_0 from here on
    counts = {"jvp": 0, "vjp": 0}
    for name in counts:
        real = getattr(Point, name)

        def counted(self, v, _real=real, _name=name):
            counts[_name] += 1
            return _real(self, v)

        monkeypatch.setattr(Point, name, counted)
    point = Point(model, CrossEntropy(), x, y, generator=seeded(103))
    op = metric.operator(point)
    (op + 0.1).solve(b)
    assert counts == {"jvp": 2, "vjp": 0}
    (op + 1.0).solve(b)  # the retry
    assert counts == {"jvp": 3, "vjp": 0}


def test_a_factor_eigh_that_returns_nan_in_float32_is_redone_in_float64(monkeypatch):
    """float32 eigh can also return NaN without raising (seen on a rank-deficient G of the
    digits autoencoder under Preconditioner + SGD): the factor is then decomposed in float64;
    a factor with non-finite entries is a named NonFiniteError, never a NaN direction."""
    from steepest import kronecker_blocks
    from steepest.errors import NonFiniteError

    g = torch.Generator().manual_seed(1)
    b = torch.randn(6, 3, generator=g)
    m = b @ b.T  # rank 3
    real = torch.linalg.eigh

    def nan32(x, *a, **k):
        mu, q = real(x, *a, **k)
        if x.dtype == torch.float32:
            return mu * float("nan"), q
        return mu, q

    monkeypatch.setattr(torch.linalg, "eigh", nan32)
    mu, q = kronecker_blocks._eigh(m)
    assert mu.dtype == torch.float32 and torch.isfinite(mu).all() and torch.isfinite(q).all()
    torch.testing.assert_close(q @ torch.diag(mu) @ q.T, m, rtol=1e-5, atol=1e-5)
    bad = m.clone()
    bad[0, 1] = float("inf")
    with pytest.raises(NonFiniteError, match="Kronecker factor"):
        kronecker_blocks._eigh(bad)


def _factored_dense(metric: KFAC, model: nn.Module, lam: float) -> torch.Tensor:
    """Martens & Grosse's factored damping (G + sqrt(lam)/pi I) (x) (A + pi sqrt(lam) I) of
    every Linear block, built densely with torch.kron from the metric's factors, in the flat
    parameter order (float64)."""
    size = sum(p.numel() for p in model.parameters())
    out = torch.zeros(size, size, dtype=F64)
    blocks = metric.state_dict()["factors"]["blocks"]
    offset = 0
    for i, m in enumerate(mod for mod in model if isinstance(mod, nn.Linear)):
        A, G = blocks[(2 * i, 2 * i + 1)]
        A, G = A[0], G[0]
        pi = ((A.trace() / A.shape[0]) / (G.trace() / G.shape[0])).sqrt()
        ea, eg = torch.eye(A.shape[0], dtype=F64), torch.eye(G.shape[0], dtype=F64)
        k = torch.kron(G + lam**0.5 / pi * eg, A + pi * lam**0.5 * ea)
        perm = layer_perm(m.out_features, m.in_features, offset)
        out[torch.tensor(perm)[:, None], torch.tensor(perm)[None, :]] = k
        offset += m.weight.numel() + m.bias.numel()
    return out


def test_factored_damping_follows_levenberg_marquardts_lambda_on_every_try():
    """``KFAC(damping="factored")`` on the Optimizer path with Levenberg-Marquardt: the
    inverse of the damped factors is kept per lambda, so a try solved again at another lambda
    (a rejected step) and every later step invert the factored matrix of their own lambda:
    each accepted step is -(factored K-FAC at the step's last lambda)^-1 g, built densely."""
    torch.manual_seed(26)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(F64)
    g = seeded(104)
    x, y = torch.randn(16, 3, generator=g, dtype=F64), torch.randn(16, 2, generator=g, dtype=F64)
    metric = KFAC(GGN(), damping="factored", ema=None, T_cov=1, T_inv=1)
    op = metric.operator(Point(model, MSE(), x, y))
    b = torch.randn(op.size, generator=g, dtype=F64)
    for lam in (0.3, 3.0, 0.3):  # the same operator, lambda changed between solves
        assert (
            rel_err((op + lam).solve(b), torch.linalg.solve(_factored_dense(metric, model, lam), b))
            < 1e-12
        )
    opt = steepest.Optimizer(
        model, MSE(), metric=metric, damping=steepest.LevenbergMarquardt(init=1e-4)
    )
    retried = 0
    for _ in range(8):
        theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        point = Point(model, MSE(), x, y)
        info = opt.step(x, y)
        theta1 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        if not info.accepted:
            continue
        retried += info.tries > 1
        want = -torch.linalg.solve(_factored_dense(metric, model, info.damping), point.grad)
        assert rel_err(theta1 - theta0, want) < 1e-10
    assert retried >= 1  # a try rejected and solved again at a raised lambda


class _OwnForwardKFAC(KFAC):
    """K-FAC whose factors always come from a forward of their own (nothing recorded)."""

    record_layers = ()


def test_factors_from_the_recorded_forward_equal_those_of_a_second_forward():
    """The Optimizer's forwards record K-FAC's layers (``record_layers``) so that a refresh
    differentiates the point's own graph: on a model with BatchNorm in training mode, an
    in-place ReLU, Dropout and a LayerNorm (a diagonal block from the per-parameter views),
    three steps are those of K-FAC with a second forward for its factors, with one forward
    fewer per step."""
    g = seeded(105)
    x, y = torch.randn(12, 4, generator=g, dtype=F64), torch.randint(0, 3, (12,), generator=g)

    def run(cls):
        torch.manual_seed(27)
        model = nn.Sequential(
            nn.Linear(4, 6),
            nn.BatchNorm1d(6),
            nn.ReLU(inplace=True),
            nn.Dropout(0.3),
            nn.Linear(6, 5),
            nn.LayerNorm(5),
            nn.Linear(5, 3),
        ).to(F64)
        forwards = []
        model[0].register_forward_hook(lambda m, i, o: forwards.append(1))
        metric = cls(ema=None, T_cov=1, T_inv=1, rescale="momentum")
        opt = steepest.Optimizer(
            model, CrossEntropy(), metric=metric, damping=steepest.LevenbergMarquardt(1e-1)
        )
        for _ in range(3):
            opt.step(x, y)
        theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        return theta, metric.state_dict()["factors"], len(forwards), model[1].running_mean

    theta, fac, n_rec, bn = run(KFAC)
    theta2, fac2, n_own, bn2 = run(_OwnForwardKFAC)
    assert rel_err(theta, theta2) < 1e-12
    for key, (A, G) in fac2["blocks"].items():
        assert rel_err(fac["blocks"][key][0], A) < 1e-12
        assert rel_err(fac["blocks"][key][1], G) < 1e-12
    assert fac["others"].keys() == fac2["others"].keys()
    for i, d in fac2["others"].items():
        assert rel_err(fac["others"][i], d) < 1e-12
    assert torch.equal(bn, bn2)  # the running statistics moved once a step in both
    assert n_rec == n_own - 3  # no capture forward


def test_conv_factors_from_the_recorded_forward_equal_those_of_a_second_forward():
    """The same for KFC (Conv2d with padding and stride, the unfolded patches of the recorded
    input) and a Conv1d called twice (two calls of one module, both recorded)."""
    g = seeded(106)
    x, y = torch.randn(6, 2, 5, 5, generator=g, dtype=F64), torch.randint(0, 3, (6,), generator=g)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3, padding=1, stride=2)
            self.conv1 = nn.Conv1d(3, 3, 2)
            self.out = nn.Linear(12, 3)

        def forward(self, inp):
            h = torch.tanh(self.conv(inp)).flatten(2)  # (N, 3, 9)
            h = torch.tanh(self.conv1(torch.tanh(self.conv1(h))))  # (N, 3, 8), (N, 3, 7)
            return self.out(h[..., :4].flatten(1))

    def run(cls):
        torch.manual_seed(28)
        model = Net().to(F64)
        forwards = []
        model.conv.register_forward_hook(lambda m, i, o: forwards.append(1))
        metric = cls(GGN(), ema=None, T_cov=1, T_inv=1)
        opt = steepest.Optimizer(
            model, CrossEntropy(), metric=metric, damping=steepest.LevenbergMarquardt(1e-1)
        )
        for _ in range(2):
            opt.step(x, y)
        theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        return theta, metric.state_dict()["factors"], len(forwards)

    theta, fac, n_rec = run(KFAC)
    theta2, fac2, n_own = run(_OwnForwardKFAC)
    assert n_rec == n_own - 2  # the recorded forward served both refreshes
    assert rel_err(theta, theta2) < 1e-12
    assert fac["blocks"].keys() == fac2["blocks"].keys() and len(fac2["blocks"]) == 3
    for key, (A, G) in fac2["blocks"].items():
        assert rel_err(fac["blocks"][key][0], A) < 1e-12
        assert rel_err(fac["blocks"][key][1], G) < 1e-12


def test_a_point_recording_fewer_layer_types_gets_a_forward_of_its_own():
    """Point(record=...) with only some of the Kronecker types (here Linear, not Conv2d): the
    capture runs its own forward, so the conv keeps its Kronecker block (before: it silently
    became a diagonal block; with record=(ReLU,) no block at all)."""
    g = seeded(107)
    x, y = torch.randn(5, 1, 4, 4, generator=g, dtype=F64), torch.randint(0, 3, (5,), generator=g)
    torch.manual_seed(29)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3)).to(F64)
    ref_point = Point(model, CrossEntropy(), x, y)
    want = KFAC(GGN()).operator(ref_point).to_dense()
    for record in ((nn.Linear,), (nn.ReLU,), (nn.Linear, nn.Conv2d)):
        metric = KFAC(GGN())
        got = metric.operator(Point(model, CrossEntropy(), x, y, record=record)).to_dense()
        assert set(metric.state_dict()["factors"]["blocks"]) == {(0, 1), (2, 3)}, record
        assert rel_err(got, want) < 1e-12, record


def test_the_optimizer_records_no_layers_for_a_curvature_sub_batch():
    """With curvature_batch_size the metric's point is the sub-batch's (a forward of its own):
    the main point records nothing (no kept activations for nothing), nor with step(curvature=...);
    without them, it records."""
    g = seeded(108)
    x, y = torch.randn(8, 4, generator=g, dtype=F64), torch.randint(0, 3, (8,), generator=g)
    torch.manual_seed(30)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(F64)
    for k, recorded in ((None, True), (4, False)):
        opt = steepest.Optimizer(model, CrossEntropy(), metric=KFAC(), curvature_batch_size=k)
        assert (opt.point(x, y).calls is not None) == recorded
        opt.step(x, y)
    # step(curvature=...): M from that batch's point, so the step's own point records nothing
    opt = steepest.Optimizer(model, CrossEntropy(), metric=KFAC(ema=None, T_cov=1))
    seen, own = [], opt.point

    def spy(xx, yy):
        p = own(xx, yy)
        seen.append(p.calls is not None)
        return p

    opt.point = spy
    opt.step(x, y, curvature=(x[:4], y[:4]))
    opt.step(x[:6], y[:6])  # another batch: a point of its own, which records
    assert seen == [False, True]


# ------------------------------------------------------------------------------ batch axis
class _Encoder(nn.Module):
    """A transformer encoder layer on (N, T, d) inputs, batch-first or sequence-first inside
    (torch's default ``batch_first=False``: its Linear layers see (T, N, d))."""

    def __init__(self, batch_first: bool, d: int = 4, readout: str = "mean"):
        super().__init__()
        self.batch_first, self.readout = batch_first, readout
        self.enc = nn.TransformerEncoderLayer(d, 2, 6, dropout=0.0, batch_first=batch_first)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.enc(x if self.batch_first else x.transpose(0, 1))
        if self.readout == "first":  # a class token: position 0 only
            return self.head(h[:, 0] if self.batch_first else h[0])
        return self.head(h.mean(1 if self.batch_first else 0))


def _factors(metric, model, loss, x, y) -> tuple[dict, torch.Tensor]:
    op = metric.operator(Point(model, loss, x, y))
    return metric.state_dict(), op.to_dense()


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
@pytest.mark.parametrize("sequence", ["expand", "reduce"])
@pytest.mark.parametrize("n,t,readout", [(3, 5, "mean"), (4, 4, "mean"), (4, 4, "first")])
def test_sequence_first_layers_get_the_batch_first_factors(cls, sequence, n, t, readout):
    """torch's TransformerEncoderLayer(batch_first=False) feeds its Linear layers (T, N, d):
    K-FAC's factors (expand and reduce) and EKFAC's scalings equal those of the same weights
    with batch_first=True, also where T = N (two axes of size N: the batch axis told by the
    gradient of one sample's outputs), with a class-token readout too (position 0 only)."""
    g = seeded(90)
    x = torch.randn(n, t, 4, generator=g, dtype=F64)
    y = torch.randint(0, 3, (n,), generator=g)
    torch.manual_seed(0)
    bf = _Encoder(True, readout=readout).to(F64).eval()
    sf = _Encoder(False, readout=readout).to(F64).eval()
    sf.load_state_dict(bf.state_dict())
    (sb, db), (ss, ds) = (
        _factors(cls(GGN(), sequence=sequence), m, CrossEntropy(), x, y) for m in (bf, sf)
    )
    assert set(sb["factors"]["blocks"]) == set(ss["factors"]["blocks"]) and sb["factors"]["blocks"]
    for key, (A, G) in sb["factors"]["blocks"].items():
        assert rel_err(ss["factors"]["blocks"][key][0], A) < 1e-12
        assert rel_err(ss["factors"]["blocks"][key][1], G) < 1e-12
    if cls is EKFAC:
        for key, s in sb["scalings"].items():
            assert rel_err(ss["scalings"][key], s) < 1e-12
    assert rel_err(ds, db) < 1e-12


@pytest.mark.parametrize("path", ["Optimizer", "TorchOptimizer"])
def test_sequence_first_layers_in_the_optimizers_own_forwards(path):
    """The same through Optimizer (the point's recorded forward) and TorchOptimizer (the
    closure's forward), T = N: EKFAC-reduce's scalings and the step equal batch-first's."""
    g = seeded(90)
    x = torch.randn(4, 4, 4, generator=g, dtype=F64)
    y = torch.randint(0, 3, (4,), generator=g)
    out = []
    for batch_first in (True, False):
        torch.manual_seed(0)
        model = _Encoder(batch_first).to(F64).eval()
        metric = EKFAC(GGN(), sequence="reduce")
        if path == "Optimizer":
            steepest.Optimizer(model, CrossEntropy(), metric=metric, damping=1e-2).step(x, y)
        else:
            opt = steepest.TorchOptimizer(
                model.parameters(), loss=CrossEntropy(), metric=metric, damping=1e-2
            )
            opt.step(lambda model=model: (model(x), y))
        out.append((metric.scalings(), torch.cat([p.reshape(-1) for p in model.parameters()])))
    (sb, pb), (ss, ps) = out
    assert set(sb) == set(ss) and all(rel_err(ss[k], sb[k]) < 1e-12 for k in sb)
    assert rel_err(ps, pb) < 1e-12


class _SeqFirstMean(nn.Module):
    """(N, T, d) -> Linear on (T, N, d) -> mean over T -> Linear: K-FAC-reduce's exact setting
    with a sequence-first layer."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(self.a(x.transpose(0, 1)).mean(0))


def test_reduce_is_exact_on_sequence_first_inputs():
    torch.manual_seed(5)
    g = seeded(91)
    x = torch.randn(4, 5, 3, generator=g, dtype=F64)
    y = torch.randn(4, 2, generator=g, dtype=F64)
    model = _SeqFirstMean().to(F64)
    dense = ref.metric("ggn", model, MSE(), x, y)
    op = KFAC(GGN(), sequence="reduce").operator(Point(model, MSE(), x, y))
    _kron_dense_ok(op, dense, block_mask(model))
    # EKFAC's scalings are the exact projected diagonal (per-sample gradients: sums over t)
    metric = EKFAC(GGN())
    metric.operator(Point(model, MSE(), x, y))
    state = metric.state_dict()
    _, qa, _, qg = state["eig"][(0, 1)]
    q = torch.kron(qg[0], qa[0])
    perm = layer_perm(4, 3, 0)
    s_ref = (q.T @ dense[perm][:, perm] @ q).diagonal().reshape(4, 4)
    assert rel_err(state["scalings"][(0, 1)][0], s_ref) < 1e-12


class _Flat(nn.Module):
    """A Linear on (N, T, d) as is, or flattened batch-major (N T, d) or time-major (T N, d)."""

    def __init__(self, order: str):
        super().__init__()
        self.order = order
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        n, t, d = x.shape
        if self.order == "as-is":
            h = self.a(x)
        elif self.order == "batch-major":
            h = self.a(x.reshape(n * t, d)).reshape(n, t, -1)
        else:
            h = self.a(x.transpose(0, 1).reshape(t * n, d)).reshape(t, n, -1).transpose(0, 1)
        return self.b(torch.tanh(h).mean(1))


class _Frames(nn.Module):
    """A Conv2d on each frame of a clip (N, m, C, H, W): frame by frame, or on the batch
    merged with the frames (N m, C, H, W)."""

    def __init__(self, merged: bool):
        super().__init__()
        self.merged = merged
        self.c, self.lin = nn.Conv2d(2, 3, 2), nn.Linear(3 * 2 * 2, 2)

    def forward(self, x):
        n, m = x.shape[:2]
        if self.merged:
            h = self.c(x.reshape(n * m, *x.shape[2:])).reshape(n, m, -1)
        else:
            h = torch.stack([self.c(x[:, i]) for i in range(m)], 1).reshape(n, m, -1)
        return self.lin(torch.tanh(h).mean(1))


@pytest.mark.parametrize("n,t", [(3, 5), (4, 4)])
def test_a_batch_merged_with_another_axis_is_told_apart(n, t):
    """A Linear on a flattened (N T, d) input, batch-major or time-major, and a Conv2d on a
    batch merged with frames: K-FAC-reduce's factors and EKFAC's scalings equal those of the
    same weights on unmerged inputs (the merged axis split by the gradient of one sample)."""
    g = seeded(98)
    x = torch.randn(n, t, 3, generator=g, dtype=F64)
    y = torch.randn(n, 2, generator=g, dtype=F64)
    for cls, sequence in ((KFAC, "reduce"), (EKFAC, "expand")):
        got = []
        for order in ("as-is", "batch-major", "time-major"):
            torch.manual_seed(0)
            got.append(_factors(cls(GGN(), sequence=sequence), _Flat(order).to(F64), MSE(), x, y))
        for st, dense in got[1:]:
            for key, (A, G) in got[0][0]["factors"]["blocks"].items():
                assert rel_err(st["factors"]["blocks"][key][0], A) < 1e-12
                assert rel_err(st["factors"]["blocks"][key][1], G) < 1e-12
            assert rel_err(dense, got[0][1]) < 1e-12
    clips = torch.randn(n, 3, 2, 3, 3, generator=g, dtype=F64)
    got = []
    for merged in (False, True):
        torch.manual_seed(0)
        got.append(_factors(EKFAC(GGN()), _Frames(merged).to(F64), MSE(), clips, y))
    assert rel_err(got[1][0]["scalings"][(0, 1)], got[0][0]["scalings"][(0, 1)]) < 1e-12
    assert rel_err(got[1][1], got[0][1]) < 1e-12


class _NoBatchAxis(nn.Module):
    """A Linear on a batch summary (T, d): no axis of its input is the batch."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 2)

    def forward(self, x):  # x (N, T, d)
        return self.b(x.mean(1)) + self.a(x.mean(0)).mean(0)


@pytest.mark.parametrize("cls,sequence", [(KFAC, "reduce"), (EKFAC, "expand")])
def test_a_layer_without_batch_axis_is_refused_by_name_before_any_change(cls, sequence):
    """Where the per-sample rows matter (reduce, EKFAC's scalings) and no axis of a layer's
    input is the batch, a named error says which layer and what to do; the metric's state
    is untouched and the optimizer's parameters too."""
    from steepest.errors import BatchAxisError

    g = seeded(92)
    x = torch.randn(4, 5, 3, generator=g, dtype=F64)
    y = torch.randn(4, 2, generator=g, dtype=F64)
    torch.manual_seed(0)
    model = _NoBatchAxis().to(F64)
    metric = cls(GGN(), sequence=sequence)
    opt = steepest.Optimizer(model, MSE(), metric=metric, damping=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(BatchAxisError, match=r"'a'.*batch_first=True") as err:
        opt.step(x, y)
    assert isinstance(err.value, ValueError)
    assert metric.state_dict()["calls"] == 0 and metric.state_dict()["factors"] is None
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    # K-FAC-expand needs no per-sample rows: the same model is served (A, G sums over rows)
    op = KFAC(GGN()).operator(Point(model, MSE(), x, y))
    assert bool(torch.isfinite(op.to_dense()).all())
    # one sample: every row is its own, no axis needed
    one = cls(GGN(), sequence=sequence)
    assert bool(torch.isfinite(one.operator(Point(model, MSE(), x[:1], y[:1])).diagonal()).all())


class _LinearAttention(nn.Module):
    """Self-attention written with nn.Linear query/key/value/output projections."""

    def __init__(self, d: int = 4, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.head = nn.Linear(d, 3)

    def forward(self, x):  # (N, T, d)
        n, t, d = x.shape

        def split(h):
            return h.reshape(n, t, self.heads, d // self.heads).transpose(1, 2)

        att = nn.functional.scaled_dot_product_attention(
            split(self.q(x)), split(self.k(x)), split(self.v(x))
        )
        return self.head(self.o(att.transpose(1, 2).reshape(n, t, d)).mean(1))


@pytest.mark.parametrize("sequence", ["expand", "reduce"])
def test_attention_with_linear_projections_gets_kronecker_blocks(sequence):
    """The q/k/v/o projections of an attention written with nn.Linear are Kronecker blocks
    whose factors equal their definition (Eschenhagen et al. 2023) from explicit per-sample,
    per-output gradients g_ntc = dz_nc/ds_nt (GaussNewton: S = I)."""
    torch.manual_seed(7)
    model = _LinearAttention().to(F64)
    g = seeded(93)
    x, y = torch.randn(3, 5, 4, generator=g, dtype=F64), torch.randint(0, 3, (3,), generator=g)
    n = x.shape[0]
    metric = KFAC(GaussNewton(), sequence=sequence)
    metric.operator(Point(model, CrossEntropy(), x, y))
    blocks = metric.state_dict()["factors"]["blocks"]
    names = [nm for nm, _ in model.named_parameters()]
    assert {names[wi] for wi, _ in blocks} == {f"{c}.weight" for c in "qkvo"} | {"head.weight"}
    calls = {}
    hooks = [
        getattr(model, c).register_forward_hook(
            lambda m, i, o, c=c: calls.__setitem__(c, (i[0].detach(), o))
        )
        for c in "qkvo"
    ]
    z = model(x)
    for h in hooks:
        h.remove()
    for c in "qkvo":
        a, s = calls[c]
        a = torch.cat([a, torch.ones(*a.shape[:-1], 1, dtype=F64)], -1)  # (N, T, d + 1)
        G_ref = torch.zeros(4, 4, dtype=F64)
        for i in range(n):
            for k in range(z.shape[1]):
                (gs,) = torch.autograd.grad(z[i, k], s, retain_graph=True)
                rows = gs[i] if sequence == "expand" else gs[i].sum(0, keepdim=True)
                G_ref += rows.T @ rows / n
        if sequence == "expand":
            A_ref = a.reshape(-1, 5).T @ a.reshape(-1, 5) / a.shape[0] / a.shape[1]
        else:
            am = a.mean(1)
            A_ref = am.T @ am / n
        wi = names.index(f"{c}.weight")
        A, G = blocks[(wi, wi + 1)]
        assert rel_err(A[0], A_ref) < 1e-12, c
        # (reduce: the key projection's summed gradients vanish, softmax ignores a shift of
        # all scores; G is rounding there, hence the absolute tolerance)
        torch.testing.assert_close(G[0], G_ref, rtol=1e-10, atol=1e-20, msg=c)


def test_ekfac_refuses_factored_damping_by_name():
    """EKFAC's inverse damps its scalings exactly: damping="factored" would be silently
    ignored, so it is refused at construction (KFAC keeps it)."""
    with pytest.raises(ConfigurationError, match=r"damping='factored'.*KFAC\(damping='factored'\)"):
        EKFAC(damping="factored")
    with pytest.raises(ConfigurationError, match="damping"):
        EKFAC(damping="tikhonov")
    assert KFAC(damping="factored").damping == "factored"
    assert EKFAC().damping == "exact"


# ------------------------------------------------------------------------------ more bases
def test_monte_carlo_fisher_factors_converge_to_the_exact_fisher_ones():
    """KFAC(Fisher(mc_samples=k)) is an unbiased estimate of KFAC(Fisher()) (G is linear in
    the sampled gradients' outer products, A does not depend on them): its error falls like
    1/sqrt(k): 0.079 at k = 10 and 0.0095 at k = 1000 with this seed (over five seeds the
    median error times sqrt(k) stays 0.16-0.19 from k = 1 to k = 1000)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(F64)
    g = seeded(94)
    x, y = torch.randn(20, 3, generator=g, dtype=F64), torch.randint(0, 3, (20,), generator=g)

    def dense(base, seed=None):
        point = Point(model, CrossEntropy(), x, y, generator=None if seed is None else seeded(seed))
        return KFAC(base, ema=None, T_cov=1, T_inv=1).operator(point).to_dense()

    exact = dense(Fisher())
    err = {k: rel_err(dense(Fisher(mc_samples=k), 3), exact) for k in (10, 1000)}
    assert err[1000] < err[10] / 5 and err[1000] < 0.015, err  # 1/sqrt(k): ~1/10


def test_empirical_fisher_one_sample_is_exact():
    """One sample: the empirical Fisher's [W b] block is g g^T of the per-sample gradient,
    g = (dl/ds) (x) a-bar, which K-FAC's G (x) A reproduces exactly."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(F64)
    x, y = torch.randn(1, 3, generator=seeded(95), dtype=F64), torch.tensor([2])
    dense = ref.metric("empirical-fisher", model, CrossEntropy(), x, y)
    op = KFAC(EmpiricalFisher()).operator(Point(model, CrossEntropy(), x, y))
    _kron_dense_ok(op, dense, block_mask(model))


def _conv_mask(model: nn.Sequential) -> torch.Tensor:
    """Mask of K-FAC's blocks in flat parameter order for Conv2d -> ... -> Linear: one block
    per group of the convolution (its output channels' weights and biases) and the Linear."""
    conv, lin = model[0], model[-1]
    size = sum(p.numel() for p in model.parameters())
    mask = torch.zeros(size, size, dtype=torch.bool)
    per = conv.weight[0].numel()  # one output channel's weights
    n_w = conv.weight.numel()
    o = conv.out_channels // conv.groups
    for gi in range(conv.groups):
        rows = []
        for c in range(gi * o, (gi + 1) * o):
            rows += list(range(c * per, (c + 1) * per))
            rows += [n_w + c] if conv.bias is not None else []
        r = torch.tensor(rows)
        mask[r[:, None], r[None, :]] = True
    n_conv = sum(p.numel() for p in conv.parameters())
    n_lin = sum(p.numel() for p in lin.parameters())
    mask[n_conv : n_conv + n_lin, n_conv : n_conv + n_lin] = True
    return mask


@pytest.mark.parametrize("groups,bias", [(1, True), (1, False), (2, True), (2, False)])
def test_conv_operator_is_the_dense_ggn_block_for_one_sample_at_one_position(groups, bias):
    """One sample and one output position (the kernel covers the input): KFC is exact, so the
    operator's to_dense(), @ and diagonal() in the flat parameter order equal the dense GGN's
    blocks (one per group of the convolution, weight and bias rows interleaved as in
    model.parameters())."""
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(4, 6, (3, 2), groups=groups, bias=bias), nn.Tanh(), nn.Flatten(), nn.Linear(6, 3)
    ).to(F64)
    x, y = torch.randn(1, 4, 3, 2, generator=seeded(96), dtype=F64), torch.tensor([1])
    dense = ref.metric("ggn", model, CrossEntropy(), x, y)
    op = KFAC(GGN()).operator(Point(model, CrossEntropy(), x, y))
    _kron_dense_ok(op, dense, _conv_mask(model))


@pytest.mark.parametrize("groups", [1, 2])
def test_ekfac_conv_scalings_are_the_exact_projected_diagonal(groups):
    """EKFAC on a convolution (several samples, four output positions): per group, the
    scalings equal diag(Q^T M Q) of the dense GGN's block, Q = Q_G (x) Q_A (per-sample
    gradients summed over positions)."""
    torch.manual_seed(4)
    conv = nn.Conv2d(2, 4, 2, groups=groups)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(4 * 2 * 2, 3)).to(F64)
    g = seeded(97)
    x, y = torch.randn(5, 2, 3, 3, generator=g, dtype=F64), torch.randint(0, 3, (5,), generator=g)
    dense = ref.metric("ggn", model, CrossEntropy(), x, y)
    metric = EKFAC(GGN())
    metric.operator(Point(model, CrossEntropy(), x, y))
    state = metric.state_dict()
    _, qa, _, qg = state["eig"][(0, 1)]
    s = state["scalings"][(0, 1)]
    assert s.shape[0] == groups
    per = conv.weight[0].numel()
    o = 4 // groups
    for gi in range(groups):
        rows = []
        for c in range(gi * o, (gi + 1) * o):  # [W_c b_c] row-major: the order of G (x) A
            rows += list(range(c * per, (c + 1) * per)) + [4 * per + c]
        q = torch.kron(qg[gi], qa[gi])
        s_ref = (q.T @ dense[rows][:, rows] @ q).diagonal().reshape(o, per + 1)
        assert rel_err(s[gi], s_ref) < 1e-12

"""Every row of Table 1 against dense references built independently (tests/reference.py).

For each loss (MSE with sigma != 1, CrossEntropy, BCEWithLogits, GaussianNLL, a plain callable)
and each metric that applies, the operator's ``to_dense()``, matrix-free ``@`` (column by
column), ``matmat``, ``diagonal()``, ``factor()`` and the solves of ``(M + lambda I) x = b``
through Cholesky, CG, Woodbury and Auto equal the reference in float64 to ~1e-10. Then the
Monte-Carlo Fisher's convergence and reproducibility, and the any-module contract (Conv2d,
LayerNorm, BatchNorm in eval mode, Embedding, MultiheadAttention, tied and frozen parameters)
in float32 and float64.
"""

from __future__ import annotations

import copy
import functools

import pytest
import reference as ref
import torch
from reference import DEVICES, rel_err, seeded
from torch import nn

import steepest
from steepest.errors import ConfigurationError
from steepest.losses import MSE, BCEWithLogits, CallableLoss, CrossEntropy, GaussianNLL
from steepest.metrics import (
    GGN,
    EmpiricalFisher,
    Fisher,
    GaussNewton,
    GradientCovariance,
    Hessian,
    Identity,
)
from steepest.point import Point
from steepest.solvers import CG, Auto, Cholesky, Woodbury

F64 = torch.float64
N = 6


def cauchy(z, y):
    """A plain, non-convex per-sample loss (its H_L is indefinite)."""
    return torch.log1p((z - y) ** 2).sum(1)


def make_loss(name: str):
    """(loss, outputs C, target maker)."""
    if name == "mse":
        return MSE(sigma=0.7), 3, lambda g, n: torch.randn(n, 3, generator=g, dtype=F64)
    if name == "ce":
        return CrossEntropy(), 3, lambda g, n: torch.randint(0, 3, (n,), generator=g)
    if name == "bce":
        return BCEWithLogits(), 3, lambda g, n: torch.randint(0, 2, (n, 3), generator=g).to(F64)
    if name == "gaussian":
        return GaussianNLL(), 4, lambda g, n: torch.randn(n, 2, generator=g, dtype=F64)
    if name == "callable":
        return CallableLoss(cauchy), 3, lambda g, n: torch.randn(n, 3, generator=g, dtype=F64)
    raise ValueError(name)


LOSSES = ["mse", "ce", "bce", "gaussian", "callable"]
METRICS = {
    "identity": Identity,
    "gauss-newton": GaussNewton,
    "ggn": GGN,
    "fisher": Fisher,
    "fisher-mc": lambda: Fisher(mc_samples=3),
    "empirical-fisher": EmpiricalFisher,
    "gradient-covariance": GradientCovariance,
    "gradient-covariance-centered": lambda: GradientCovariance(centered=True),
    "hessian": Hessian,
}
NEEDS_DISTRIBUTION = {"fisher", "fisher-mc", "empirical-fisher"}
CASES = [
    (lo, me)
    for lo in LOSSES
    for me in METRICS
    if not (lo == "callable" and me in NEEDS_DISTRIBUTION)
]


def mlp(c: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, c)).to(F64)


@functools.cache
def case(loss_name: str, metric_name: str):
    """(point, operator M, dense reference) for one loss and one metric, built once."""
    loss, c, targets = make_loss(loss_name)
    model = mlp(c)
    g = seeded(1)
    x = torch.randn(N, 3, generator=g, dtype=F64)
    y = targets(g, N)
    point = Point(model, loss, x, y, generator=seeded(123))
    op = METRICS[metric_name]().operator(point)
    sampled = None
    if metric_name == "fisher-mc":
        # the same draws as the operator: same seed, one call on z repeated k = 3 times
        z = point.z.detach()
        draws = loss.sample(z.repeat(3, *([1] * (z.ndim - 1))), seeded(123))
        sampled = list(draws.split(N))
    dense = ref.metric(metric_name, model, loss, x, y, sampled_targets=sampled)
    return point, op, dense


@pytest.mark.parametrize("loss_name,metric_name", CASES)
class TestAgainstReference:
    def test_to_dense(self, loss_name, metric_name):
        _, op, dense = case(loss_name, metric_name)
        m = op.to_dense()
        assert m.dtype == F64 and m.shape == dense.shape
        assert rel_err(m, dense) < 1e-10

    def test_matvec_columns(self, loss_name, metric_name):
        _, op, dense = case(loss_name, metric_name)
        eye = torch.eye(op.size, dtype=F64)
        cols = torch.stack([op @ eye[:, j] for j in range(op.size)], 1)
        assert rel_err(cols, dense) < 1e-10

    def test_matmat(self, loss_name, metric_name):
        _, op, dense = case(loss_name, metric_name)
        v = torch.randn(op.size, 4, generator=seeded(2), dtype=F64)
        assert rel_err(op.matmat(v), dense @ v) < 1e-10
        assert rel_err(op @ v, dense @ v) < 1e-10

    def test_diagonal(self, loss_name, metric_name):
        _, op, dense = case(loss_name, metric_name)
        assert rel_err(op.diagonal(), dense.diagonal()) < 1e-10

    def test_factor(self, loss_name, metric_name):
        _, op, dense = case(loss_name, metric_name)
        exp_family = loss_name in ("mse", "ce", "bce")
        should_have = (
            metric_name in ("gauss-newton", "fisher", "fisher-mc")
            or (metric_name.startswith(("gradient-covariance", "empirical")))
            or (metric_name == "ggn" and exp_family)
        )
        assert op.has_factor() == should_have
        if not should_have:
            with pytest.raises(NotImplementedError):
                op.factor()
            return
        f = op.factor()
        assert f.U.shape[1] == op.size and f.n == N
        assert rel_err(f.U.T @ f.U / f.n, dense) < 1e-10

    def test_damped_views(self, loss_name, metric_name):
        _, op, dense = case(loss_name, metric_name)
        lam = 0.37
        damped = op + lam
        target = dense + lam * torch.eye(op.size, dtype=F64)
        v = torch.randn(op.size, generator=seeded(3), dtype=F64)
        assert damped.shift == lam and op.shift == 0
        assert rel_err(damped.to_dense(), target) < 1e-10
        assert rel_err(damped @ v, target @ v) < 1e-10
        assert rel_err(damped.diagonal(), target.diagonal()) < 1e-10

    @pytest.mark.parametrize("solver", ["cholesky", "cg", "woodbury", "auto"])
    def test_solve(self, loss_name, metric_name, solver):
        _, op, dense = case(loss_name, metric_name)
        mu = torch.linalg.eigvalsh(dense)
        # enough damping to make M + lambda I positive definite with condition <= ~11
        lam = float(0.1 * mu.abs().max() - min(float(mu[0]), 0.0) + 1e-3)
        a = dense + lam * torch.eye(op.size, dtype=F64)
        b = torch.randn(op.size, generator=seeded(4), dtype=F64)
        x_ref = torch.linalg.solve(a, b)
        damped = op + lam
        tol = 1e-10
        if solver == "cholesky":
            sol = Cholesky().solve(damped, b)
            assert sol.exact
        elif solver == "cg":
            sol = CG(tol=1e-13, maxiter=10 * op.size).solve(damped, b)
            assert not sol.negative_curvature and sol.message == "converged"
            assert sol.residual <= 1e-13
        elif solver == "woodbury":
            if not op.has_factor():  # refused with a clear error, not a wrong answer
                with pytest.raises(ConfigurationError, match="no sample-space factor"):
                    Woodbury().solve(damped, b)
                return
            sol = Woodbury().solve(damped, b)
        else:
            chosen = Auto().choose(damped)
            if not op.psd:  # small and maybe indefinite: the dense route with clipping
                expected = Cholesky
                assert chosen.indefinite == "clip"
            elif op.has_factor() and op.factor_rows < op.size:
                expected = Woodbury
            else:
                expected = Cholesky
            assert isinstance(chosen, expected)
            if op.has_factor():  # the hint Auto uses is the true row count
                assert op.factor_rows == op.factor().U.shape[0]
            sol = Auto().solve(damped, b)
            if isinstance(chosen, CG):
                tol = 1e-7  # Auto's CG stops at a relative residual of 1e-8
        assert rel_err(sol.x, x_ref) < tol
        assert rel_err(a @ sol.x, b) < 10 * tol


def test_psd_flags():
    """psd is claimed exactly where the reference has no negative eigenvalue."""
    for loss_name, metric_name in CASES:
        _, op, dense = case(loss_name, metric_name)
        mu_min = float(torch.linalg.eigvalsh(dense)[0])
        if op.psd:
            assert mu_min > -1e-10 * float(dense.norm()), (loss_name, metric_name)
    # the Hessian and the GGN of the non-convex callable and of GaussianNLL are indefinite
    for loss_name, metric_name in [("callable", "ggn"), ("gaussian", "ggn"), ("ce", "hessian")]:
        _, op, dense = case(loss_name, metric_name)
        assert not op.psd
    _, _, dense = case("gaussian", "ggn")
    assert float(torch.linalg.eigvalsh(dense)[0]) < 0


def test_curvature_helper_matches_point():
    loss, c, targets = make_loss("ce")
    model = mlp(c)
    g = seeded(1)
    x, y = torch.randn(N, 3, generator=g, dtype=F64), targets(g, N)
    op = steepest.curvature(model, loss, x, y, GGN())
    assert rel_err(op.to_dense(), ref.metric("ggn", model, loss, x, y)) < 1e-10


def test_gradient_matches_reference():
    for loss_name in LOSSES:
        point, _, _ = case(loss_name, "identity")
        loss, c, targets = make_loss(loss_name)
        model = mlp(c)
        g = seeded(1)
        x, y = torch.randn(N, 3, generator=g, dtype=F64), targets(g, N)
        assert rel_err(point.grad, ref.mean_loss_grad(model, loss, x, y)) < 1e-12
        assert rel_err(point.per_sample_grads(), ref.per_sample_grads(model, loss, x, y)) < 1e-12
        assert rel_err(point.jacobian(), ref.output_jacobian(model, x)) < 1e-12


# ---------------------------------------------------------------------------------- MC Fisher


def _ce_setup():
    loss, c, targets = make_loss("ce")
    model = mlp(c)
    g = seeded(1)
    x, y = torch.randn(N, 3, generator=g, dtype=F64), targets(g, N)
    return model, loss, x, y


def test_mc_fisher_converges_to_exact():
    model, loss, x, y = _ce_setup()
    exact = ref.metric("fisher", model, loss, x, y)
    errs = {}
    for k in (10, 100, 1000):
        e = []
        for seed in range(3):
            point = Point(model, loss, x, y, generator=seeded(seed))
            e.append(rel_err(Fisher(mc_samples=k).operator(point).to_dense(), exact))
        errs[k] = sum(e) / len(e)
    assert errs[10] > errs[100] > errs[1000]
    # roughly 1/sqrt(k): a factor ~sqrt(10) per decade
    for lo, hi in ((10, 100), (100, 1000)):
        assert 1.5 < errs[lo] / errs[hi] < 8, errs
    assert errs[1000] < 0.1


def test_mc_fisher_reproducible_for_a_seed():
    model, loss, x, y = _ce_setup()

    def dense(seed):
        point = Point(model, loss, x, y, generator=seeded(seed))
        return Fisher(mc_samples=5).operator(point).to_dense()

    assert torch.equal(dense(7), dense(7))
    assert not torch.allclose(dense(7), dense(8))


# ---------------------------------------------------------------------------------- any module


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(4, 2, batch_first=True)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        h, _ = self.mha(x, x, x, need_weights=False)
        return self.out(h.mean(1))


class EmbedBag(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.emb(x)).mean(1))


class Tied(nn.Module):
    """A language-model-like head: the decoder reuses the embedding matrix."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.hidden = nn.Linear(3, 3)
        self.dec = nn.Linear(3, 5)
        self.dec.weight = self.emb.weight  # one tensor, used twice

    def forward(self, x):
        return self.dec(torch.tanh(self.hidden(self.emb(x).mean(1))))


def make_module(kind: str, seed: int = 0):
    """(model, inputs maker (generator, n) -> x) for the any-module contract."""
    torch.manual_seed(seed)
    if kind == "conv":
        model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 3, 3))
        return model, lambda g, n: torch.randn(n, 1, 5, 5, generator=g)
    if kind == "layernorm":
        model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3))
        return model, lambda g, n: torch.randn(n, 4, generator=g)
    if kind == "batchnorm":
        bn = nn.BatchNorm1d(5)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        model = nn.Sequential(nn.Linear(4, 5), bn, nn.Tanh(), nn.Linear(5, 3)).eval()
        return model, lambda g, n: torch.randn(n, 4, generator=g)
    if kind == "embedding":
        return EmbedBag(), lambda g, n: torch.randint(0, 7, (n, 3), generator=g)
    if kind == "attention":
        return Attention().eval(), lambda g, n: torch.randn(n, 3, 4, generator=g)
    if kind == "tied":
        return Tied(), lambda g, n: torch.randint(0, 5, (n, 2), generator=g)
    if kind == "frozen":
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        model[0].weight.requires_grad_(False)
        return model, lambda g, n: torch.randn(n, 4, generator=g)
    raise ValueError(kind)


MODULES = ["conv", "layernorm", "batchnorm", "embedding", "attention", "tied", "frozen"]
DTYPES = [torch.float64, torch.float32]


def _cast(model, x, dtype, device):
    model = copy.deepcopy(model).to(dtype=dtype, device=device)
    x = x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)
    return model, x


@functools.cache
def module_case(kind: str):
    """(module, x, y, float64 references on the CPU) for the any-module contract, built once."""
    base, inputs = make_module(kind)
    g = seeded(5)
    x0 = inputs(g, 4)
    y0 = torch.randint(0, 5 if kind == "tied" else 3, (4,), generator=g)
    loss = CrossEntropy()
    m, x = _cast(base, x0, F64, "cpu")
    refs = {
        "ggn": ref.metric("ggn", m, loss, x, y0),
        "empirical-fisher": ref.metric("empirical-fisher", m, loss, x, y0),
        "hessian": ref.metric("hessian", m, loss, x, y0),
        "grad": ref.mean_loss_grad(m, loss, x, y0),
        "size": ref.flat_params(m).numel(),
    }
    return base, x0, y0, refs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("kind", MODULES)
def test_any_module(kind, dtype, device):
    """GGN (dense, product, diagonal), empirical Fisher and Hessian products of any module
    match references computed in float64 on the CPU."""
    base, x0, y0, refs = module_case(kind)
    model, x = _cast(base, x0, dtype, device)
    y = y0.to(device)
    tol = 1e-10 if dtype == F64 else 2e-4

    point = Point(model, CrossEntropy(), x, y)
    assert point.size == refs["size"]
    assert point.z.dtype == dtype and point.z.device.type == device
    v = torch.randn(point.size, generator=seeded(6), dtype=F64)
    ggn = GGN().operator(point)
    assert rel_err(ggn.to_dense(), refs["ggn"]) < tol
    assert rel_err(ggn @ v.to(dtype=dtype, device=device), refs["ggn"] @ v) < tol
    assert rel_err(ggn.diagonal(), refs["ggn"].diagonal()) < tol
    ef = EmpiricalFisher().operator(point).to_dense()
    assert rel_err(ef, refs["empirical-fisher"]) < tol
    hv = Hessian().operator(point) @ v.to(dtype=dtype, device=device)
    assert rel_err(hv, refs["hessian"] @ v) < (tol if dtype == F64 else 1e-3)
    assert rel_err(point.grad, refs["grad"]) < tol


def test_tied_weights_against_the_shared_tensor():
    """The flat vector holds the tied tensor once, and the GGN equals one built from plain
    autograd on the module itself, differentiating w.r.t. the shared tensor (no functional
    call anywhere)."""
    model, inputs = make_module("tied")
    model = model.to(F64)
    x = inputs(seeded(5), 4)
    y = torch.randint(0, 5, (4,), generator=seeded(6))
    params = list(model.parameters())
    assert any(p is model.dec.weight for p in params)
    assert sum(p is model.emb.weight for p in params) == 1
    space = steepest.ParamSpace(model)
    assert space.size == sum(p.numel() for p in params) == 15 + 12 + 5
    z = model(x)
    rows = []
    for i in range(z.shape[0]):
        for c in range(z.shape[1]):
            gs = torch.autograd.grad(z[i, c], params, retain_graph=True)
            rows.append(torch.cat([t.reshape(-1) for t in gs]))
    jac = torch.stack(rows).view(z.shape[0], z.shape[1], -1)
    hl = ref.output_hessians(CrossEntropy(), z.detach(), y)
    expected = torch.einsum("ncp,ncd,ndq->pq", jac, hl, jac) / z.shape[0]
    got = GGN().operator(Point(model, CrossEntropy(), x, y)).to_dense()
    assert rel_err(got, expected) < 1e-10


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_frozen_parameters_left_out_and_never_changed(dtype, device):
    model, inputs = make_module("frozen")
    model = model.to(dtype=dtype, device=device)
    x = inputs(seeded(5), 8).to(dtype=dtype, device=device)
    y = torch.randint(0, 3, (8,), generator=seeded(6)).to(device)
    frozen = model[0].weight.detach().clone()
    space = steepest.ParamSpace(model)
    assert "0.weight" not in space.names and space.size == 5 + 15 + 3
    before = space.get()
    assert space.dtype == dtype
    opt = steepest.Optimizer(model, CrossEntropy(), metric=GGN(), damping=1e-2)
    for _ in range(3):
        info = opt.step(x, y)
    assert info.accepted
    assert torch.equal(model[0].weight, frozen)
    assert not torch.equal(space.get(), before)


def test_to_scipy_on_a_metric():
    """scipy's eigsh and cg run on a metric's operator and agree with the reference."""
    import numpy as np
    import scipy.sparse.linalg as sla

    _, op, dense = case("ce", "ggn")
    sop = (op + 0.1).to_scipy()
    a = (dense + 0.1 * torch.eye(op.size, dtype=F64)).numpy()
    top = sla.eigsh(sop, k=3, which="LA", return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(top), np.linalg.eigvalsh(a)[-3:], rtol=1e-9)
    b = np.random.default_rng(0).standard_normal(op.size)
    x, info = sla.cg(sop, b, rtol=1e-12, maxiter=20 * op.size)
    assert info == 0
    np.testing.assert_allclose(x, np.linalg.solve(a, b), rtol=1e-8, atol=1e-10)

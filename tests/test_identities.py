"""The papers' identities as tests (float64, small random models).

Each test states one claim of the papers and checks it against references built here,
independently of ``steepest.metrics``, with ``torch.autograd.functional`` and
``torch.nn.functional`` losses:

- GGN == Fisher for MSE, CrossEntropy, BCEWithLogits (Martens 9.2);
- GaussNewton == sigma^2 Fisher for MSE(sigma) (000 section 3.3);
- EmpiricalFisher == GradientCovariance; centered == uncentered - g g^T (000 section 4.1);
- Hessian == GGN at zero residuals, and not otherwise (Martens section 8);
- GaussianNLL: H_L indefinite, F_R PSD (Martens 9.2), hence an indefinite GGN;
- Fisher == expected Hessian of -log p under the model (003 Theorem 2);
- every metric's step is a descent direction (slides);
- TrustRegion solves problem (1) (000 Appendix A);
- damped steps minimise the damped quadratic (000 Appendix B);
- invariance under affine reparameterisations, and its failure for the Hessian under a
  nonlinear one, where the GGN still maps at first order (Martens section 12);
- Martens 11.1: the empirical Fisher fails where the Fisher converges linearly.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.optimize
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call

from steepest import (
    CG,
    GGN,
    MSE,
    BCEWithLogits,
    Cholesky,
    CrossEntropy,
    EmpiricalFisher,
    Fisher,
    GaussianNLL,
    GaussNewton,
    GradientCovariance,
    Hessian,
    Identity,
    LearningRate,
    Optimizer,
    Point,
    TrustRegion,
    Woodbury,
)

DT = torch.float64


# ----------------------------------------------------------------------------- helpers
def make_mlp(sizes: list[int], seed: int, bias_last: bool = True) -> nn.Module:
    """A tanh MLP in float64 whose weights come from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for k, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        last = k == len(sizes) - 2
        layers.append(nn.Linear(a, b, bias=bias_last or not last))
        if not last:
            layers.append(nn.Tanh())
    model = nn.Sequential(*layers).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p.shape[-1] if p.ndim > 1 else 1
            p.copy_(torch.randn(p.shape, generator=gen, dtype=DT) / math.sqrt(fan_in))
    return model


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def flat_fn(model: nn.Module):
    """theta -> (x -> model(x)) with theta the flat trainable parameters (our own flattening)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    shapes = [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]

    def f(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(theta, sizes)
        params = {n: c.view(s) for n, c, s in zip(names, chunks, shapes)}
        return functional_call(model, params, (x,))

    return f


def ref_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per-sample output Jacobians (N, C, P) from torch.autograd.functional.jacobian."""
    f = flat_fn(model)
    jac = jacobian(lambda th: f(th, x), flat_params(model))
    return jac.reshape(x.shape[0], -1, jac.shape[-1])


def ref_loss(kind: str, sigma: float = 1.0):
    """Per-sample losses from torch.nn.functional (independent of steepest.losses)."""
    if kind == "mse":
        return lambda z, y: 0.5 * ((y - z) ** 2).sum(-1) / sigma**2
    if kind == "ce":
        return lambda z, y: F.cross_entropy(z, y, reduction="none")
    if kind == "bce":
        return lambda z, y: F.binary_cross_entropy_with_logits(z, y, reduction="none").sum(-1)
    if kind == "gnll":

        def gnll(z, y):
            d = z.shape[-1] // 2
            mu, gam = z[..., :d], z[..., d:]
            return F.gaussian_nll_loss(mu, y, gam.exp(), full=True, reduction="none", eps=0.0)\
                .reshape(z.shape[0], -1).sum(-1)

        return gnll
    raise ValueError(kind)


def ref_output_hessians(kind: str, z: torch.Tensor, y: torch.Tensor,
                        sigma: float = 1.0) -> torch.Tensor:
    """H_L per sample (N, C, C) by autograd on the torch.nn.functional loss."""
    fn = ref_loss(kind, sigma)
    return torch.stack([
        hessian(lambda zi, i=i: fn(zi.unsqueeze(0), y[i : i + 1]).sum(), z[i].detach())
        for i in range(z.shape[0])
    ])


def ref_output_fishers(kind: str, z: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """F_R per sample (N, C, C) from its definition E_{y~R_z}[s s^T], s = grad_z log r(y|z):
    an exact sum over all outcomes for the discrete losses, the closed form for MSE."""
    z = z.detach()
    n, c = z.shape
    if kind == "mse":
        return (torch.eye(c, dtype=DT) / sigma**2).expand(n, c, c)
    if kind == "ce":
        outcomes = [torch.full((n,), k, dtype=torch.long) for k in range(c)]
        probs = [torch.softmax(z, 1)[:, k] for k in range(c)]
    elif kind == "bce":
        outcomes, probs = [], []
        p = torch.sigmoid(z)
        for bits in itertools.product([0.0, 1.0], repeat=c):
            yb = torch.tensor(bits, dtype=DT).expand(n, c)
            outcomes.append(yb)
            probs.append((p**yb * (1 - p) ** (1 - yb)).prod(1))
    else:
        raise ValueError(kind)
    fn = ref_loss(kind)
    out = torch.zeros(n, c, c, dtype=DT)
    for yk, pk in zip(outcomes, probs):
        zz = z.clone().requires_grad_(True)
        (s,) = torch.autograd.grad(fn(zz, yk).sum(), zz)
        out += pk[:, None, None] * s[:, :, None] * s[:, None, :]
    return out


def jtaj(jac: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ncp,ncd,ndq->pq", jac, a, jac) / jac.shape[0]


def problem(kind: str, seed: int, n: int = 12, sizes=(3, 5, 2), sigma: float = 1.0):
    """A small model, inputs, targets and the steepest loss for a loss kind."""
    model = make_mlp(list(sizes), seed)
    x = randn(n, sizes[0], seed=seed + 100)
    c = sizes[-1]
    gen = torch.Generator().manual_seed(seed + 200)
    if kind == "mse":
        y, loss = randn(n, c, seed=seed + 300), MSE(sigma)
    elif kind == "ce":
        y, loss = torch.randint(0, c, (n,), generator=gen), CrossEntropy()
    elif kind == "bce":
        y, loss = torch.randint(0, 2, (n, c), generator=gen).to(DT), BCEWithLogits()
    elif kind == "gnll":
        y, loss = 2.0 * randn(n, c // 2, seed=seed + 300), GaussianNLL()
    else:
        raise ValueError(kind)
    return model, x, y, loss


def dense(metric, model, loss, x, y) -> torch.Tensor:
    return metric.operator(Point(model, loss, x, y)).to_dense()


def ref_grad(model, kind, x, y, sigma=1.0) -> torch.Tensor:
    f, fn = flat_fn(model), ref_loss(kind, sigma)
    theta = flat_params(model).requires_grad_(True)
    (g,) = torch.autograd.grad(fn(f(theta, x), y).mean(), theta)
    return g


def ref_hessian(model, kind, x, y, sigma=1.0) -> torch.Tensor:
    f, fn = flat_fn(model), ref_loss(kind, sigma)
    return hessian(lambda th: fn(f(th, x), y).mean(), flat_params(model))


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-10) -> bool:
    """Relative agreement in the Frobenius norm."""
    return float((a - b).norm()) <= rtol * max(float(b.norm()), 1e-300)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm()) / float(b.norm())


def check_products(op, ref: torch.Tensor, seed: int) -> None:
    """Products of the operator (matvec and matmat) against a dense reference."""
    v = randn(ref.shape[0], seed=seed)
    V = randn(ref.shape[0], 3, seed=seed + 1)
    assert close(op @ v, ref @ v), rel(op @ v, ref @ v)
    assert close(op @ V, ref @ V), rel(op @ V, ref @ V)


# ----------------------------------------------------------------------------- Martens 9.2
@pytest.mark.parametrize("kind", ["mse", "ce", "bce"])
def test_ggn_equals_fisher_for_exponential_families(kind):
    """Martens 9.2: z are natural parameters, so H_L = F_R and GGN = Fisher."""
    sizes = (3, 5, 3)
    model, x, y, loss = problem(kind, seed=1, sizes=sizes, sigma=0.8 if kind == "mse" else 1.0)
    sigma = getattr(loss, "sigma", 1.0)
    jac = ref_jacobian(model, x)
    z = flat_fn(model)(flat_params(model), x)
    ggn_ref = jtaj(jac, ref_output_hessians(kind, z, y, sigma))
    fisher_ref = jtaj(jac, ref_output_fishers(kind, z, sigma))
    # the identity itself, on references built without steepest
    assert close(ggn_ref, fisher_ref, 1e-10), rel(ggn_ref, fisher_ref)
    point = Point(model, loss, x, y)
    ggn, fisher = GGN().operator(point), Fisher().operator(point)
    assert close(ggn.to_dense(), ggn_ref), rel(ggn.to_dense(), ggn_ref)
    assert close(fisher.to_dense(), fisher_ref), rel(fisher.to_dense(), fisher_ref)
    assert close(ggn.to_dense(), fisher.to_dense())
    check_products(ggn, fisher_ref, seed=11)
    check_products(fisher, ggn_ref, seed=12)
    assert close(ggn.diagonal(), fisher_ref.diagonal())


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.5])
def test_gauss_newton_is_sigma_squared_fisher_for_mse(sigma):
    """000 section 3.3: for a Gaussian with fixed variance, F = J^T J / sigma^2."""
    model, x, y, loss = problem("mse", seed=2, sigma=sigma)
    jac = ref_jacobian(model, x)
    gn_ref = torch.einsum("ncp,ncq->pq", jac, jac) / x.shape[0]
    point = Point(model, loss, x, y)
    gn, fisher = GaussNewton().operator(point), Fisher().operator(point)
    assert close(gn.to_dense(), gn_ref)
    assert close(gn.to_dense(), sigma**2 * fisher.to_dense())
    check_products(fisher, gn_ref / sigma**2, seed=21)
    check_products(gn, gn_ref, seed=22)
    if sigma != 1.0:  # the factor is really there: without it the two differ
        assert not close(gn.to_dense(), fisher.to_dense(), 1e-3)


# ----------------------------------------------------------------------------- 000 section 4.1
@pytest.mark.parametrize("kind", ["ce", "mse"])
def test_empirical_fisher_is_uncentered_gradient_covariance(kind):
    model, x, y, loss = problem(kind, seed=3, n=9, sizes=(3, 4, 3))
    f, fn = flat_fn(model), ref_loss(kind)
    theta = flat_params(model)
    grads = torch.stack([  # per-sample gradients, one autograd call each
        jacobian(lambda th, i=i: fn(f(th, x[i : i + 1]), y[i : i + 1]).sum(), theta)
        for i in range(x.shape[0])
    ])
    n = x.shape[0]
    ef_ref = grads.T @ grads / n
    gbar = grads.mean(0)
    point = Point(model, loss, x, y)
    ef = EmpiricalFisher().operator(point)
    cov = GradientCovariance().operator(point)
    cen = GradientCovariance(centered=True).operator(point)
    assert close(point.grad, gbar)
    assert close(ef.to_dense(), ef_ref) and close(cov.to_dense(), ef_ref)
    check_products(ef, ef_ref, seed=31)
    check_products(cov, ef_ref, seed=32)
    cen_ref = ef_ref - torch.outer(gbar, gbar)
    assert close(cen.to_dense(), cen_ref), rel(cen.to_dense(), cen_ref)
    assert close(cen.to_dense(), cov.to_dense() - torch.outer(point.grad, point.grad))
    check_products(cen, cen_ref, seed=33)
    assert close(cen.diagonal(), cen_ref.diagonal())
    # the centering term is not negligible here, so the last checks could fail
    assert not close(cen_ref, ef_ref, 1e-2)


# ----------------------------------------------------------------------------- Martens section 8
def test_hessian_equals_ggn_where_residuals_vanish():
    sigma = 0.7
    model, x, _, loss = problem("mse", seed=4, sigma=sigma)
    with torch.no_grad():
        y0 = model(x).clone()  # zero residuals: the targets are the model's own outputs
    point = Point(model, loss, x, y0)
    assert float(point.grad.norm()) < 1e-14
    h = Hessian().operator(point).to_dense()
    ggn = GGN().operator(point).to_dense()
    gn = GaussNewton().operator(point).to_dense()
    assert close(h, ggn, 1e-10), rel(h, ggn)
    assert close(h, gn / sigma**2, 1e-10)
    assert close(h, ref_hessian(model, "mse", x, y0, sigma), 1e-10)

    # ... and not where they do not: H = GGN + (1/N) sum_i sum_c r_ic grad^2 z_ic
    y1 = y0 + 2.0 * randn(*y0.shape, seed=41)
    point1 = Point(model, loss, x, y1)
    h1 = Hessian().operator(point1).to_dense()
    ggn1 = GGN().operator(point1).to_dense()
    assert close(ggn1, ggn, 1e-12)  # the GGN of MSE does not depend on the targets
    assert close(h1, ref_hessian(model, "mse", x, y1, sigma), 1e-10)
    assert rel(h1, ggn1) > 0.05


# ----------------------------------------------------------------------------- GaussianNLL
def test_gaussian_nll_output_hessian_indefinite_fisher_psd():
    """Martens 9.2 at y = 2, mu = gamma = 0: H_L = [[1, 2], [2, 2]] (eigenvalues of opposite
    sign) while F_R = diag(e^-gamma, 1/2) is PSD."""
    loss = GaussianNLL()
    z, y = torch.zeros(1, 2, dtype=DT), torch.full((1, 1), 2.0, dtype=DT)
    h = loss.output_matrix(z, y, "hessian")[0]
    h_ref = ref_output_hessians("gnll", z, y)[0]
    assert torch.allclose(h, h_ref, atol=1e-12)
    assert torch.allclose(h, torch.tensor([[1.0, 2.0], [2.0, 2.0]], dtype=DT), atol=1e-12)
    ev = torch.linalg.eigvalsh(h)
    assert ev[0] < -0.5 and ev[1] > 0.5
    fr = loss.output_matrix(z, None, "fisher")[0]
    assert torch.allclose(fr, torch.diag(torch.tensor([1.0, 0.5], dtype=DT)), atol=1e-15)
    # F_R = diag(e^-gamma, 1/2) for other gammas too, and equals E_y[H_L] (checked by MC below)
    gam = torch.tensor([-1.3, 0.4, 2.0], dtype=DT)
    zz = torch.stack([torch.zeros(3, dtype=DT), gam], 1)
    fr = loss.output_matrix(zz, None, "fisher")
    assert torch.allclose(fr.diagonal(dim1=1, dim2=2),
                          torch.stack([torch.exp(-gam), torch.full_like(gam, 0.5)], 1))
    assert torch.allclose(fr[:, 0, 1], torch.zeros(3, dtype=DT))
    assert torch.allclose(loss.fisher_sqrt(zz) @ loss.fisher_sqrt(zz).transpose(1, 2), fr)


def test_gaussian_nll_model_ggn_indefinite_fisher_psd():
    model, x, y, loss = problem("gnll", seed=5, n=10, sizes=(2, 4, 2))
    jac = ref_jacobian(model, x)
    z = model(x).detach()
    ggn_ref = jtaj(jac, ref_output_hessians("gnll", z, y))
    point = Point(model, loss, x, y)
    ggn = GGN().operator(point)
    fisher = Fisher().operator(point)
    assert close(ggn.to_dense(), ggn_ref)
    check_products(ggn, ggn_ref, seed=51)
    ev_ggn = torch.linalg.eigvalsh(ggn.to_dense())
    ev_f = torch.linalg.eigvalsh(fisher.to_dense())
    scale = float(ev_ggn.abs().max())
    assert ev_ggn[0] < -1e-3 * scale  # indefinite
    assert ev_ggn[-1] > 1e-3 * scale
    assert ev_f[0] > -1e-12 * float(ev_f[-1])  # PSD
    assert not ggn.psd and fisher.psd


# ----------------------------------------------------------------------------- 003 Theorem 2
@pytest.mark.parametrize("kind", ["ce", "bce"])
def test_fisher_is_expected_hessian_exact(kind):
    """F = E_x E_{y~R_z}[Hessian_theta l(y, f(x, theta))], the expectation an exact sum over
    all outcomes weighted by their model probabilities (held fixed at theta)."""
    model, x, y, loss = problem(kind, seed=6, n=7, sizes=(3, 4, 3))
    f, fn = flat_fn(model), ref_loss(kind)
    theta = flat_params(model)
    n, c = x.shape[0], 3
    with torch.no_grad():
        z = f(theta, x)
    if kind == "ce":
        p = torch.softmax(z, 1)
        outcomes = [(torch.full((n,), k, dtype=torch.long), p[:, k]) for k in range(c)]
    else:
        s = torch.sigmoid(z)
        outcomes = []
        for bits in itertools.product([0.0, 1.0], repeat=c):
            yb = torch.tensor(bits, dtype=DT).expand(n, c)
            outcomes.append((yb, (s**yb * (1 - s) ** (1 - yb)).prod(1)))
    assert torch.allclose(sum(w for _, w in outcomes), torch.ones(n, dtype=DT))

    def expected_loss(th):
        zz = f(th, x)
        return sum((w * fn(zz, yk)).mean() for yk, w in outcomes)

    expected_hessian = hessian(expected_loss, theta)
    fisher = dense(Fisher(), model, loss, x, y)
    assert close(fisher, expected_hessian, 1e-10), rel(fisher, expected_hessian)
    # the Hessian at the data labels alone is not the Fisher (the theorem needs y ~ R_z)
    assert rel(ref_hessian(model, kind, x, y), fisher) > 1e-2


def test_fisher_is_expected_hessian_monte_carlo_gaussian():
    """Same for the Gaussian with predicted variance (GaussianNLL), by Monte Carlo: the mean
    of Hessians at y ~ R_z agrees with the Fisher within 5 standard errors, entrywise."""
    model, x, _, loss = problem("gnll", seed=7, n=4, sizes=(2, 3, 2))
    f, fn = flat_fn(model), ref_loss("gnll")
    theta = flat_params(model)
    with torch.no_grad():
        z = f(theta, x)
    gen = torch.Generator().manual_seed(70)
    batches, per_batch = 20, 150
    xs = x.repeat(per_batch, 1)
    zs = z.repeat(per_batch, 1)
    hs = []
    for _ in range(batches):
        ys = loss.sample(zs, gen)  # y ~ R_z, per_batch draws for each sample
        hs.append(hessian(lambda th, ys=ys: fn(f(th, xs), ys).mean(), theta, vectorize=True))
    hs = torch.stack(hs)
    mean, se = hs.mean(0), hs.std(0) / math.sqrt(batches)
    fisher = dense(Fisher(), model, loss, x, torch.zeros(x.shape[0], 1, dtype=DT))
    err = (mean - fisher).abs()
    assert bool((err <= 5 * se + 1e-12).all()), float((err / (se + 1e-300)).max())
    assert rel(mean, fisher) < 0.05
    # the test has power: the Hessian at one fixed target (y = mu + 2 sigma) is far from F
    y_far = z[:, :1] + 2 * torch.exp(0.5 * z[:, 1:])
    h_far = ref_hessian(model, "gnll", x, y_far)
    assert bool(((h_far - fisher).abs() > 5 * se).any())


# ----------------------------------------------------------------------------- descent (slides)
METRICS = {
    "identity": lambda: Identity(),
    "gauss-newton": lambda: GaussNewton(),
    "ggn": lambda: GGN(),
    "fisher": lambda: Fisher(),
    "fisher-mc": lambda: Fisher(mc_samples=3),
    "empirical-fisher": lambda: EmpiricalFisher(),
    "gradcov": lambda: GradientCovariance(),
    "gradcov-centered": lambda: GradientCovariance(centered=True),
    "hessian": lambda: Hessian(),
}


@pytest.mark.parametrize("kind,seed", [("ce", 8), ("mse", 9), ("bce", 10), ("gnll", 11)])
@pytest.mark.parametrize("name", list(METRICS))
def test_every_metric_step_is_a_descent_direction(name, kind, seed):
    """g^T delta < 0: the step lies in the gradient's half-space, for every metric."""
    sizes = (3, 5, 4) if kind == "gnll" else (3, 5, 3)
    model, x, y, loss = problem(kind, seed=seed, n=10, sizes=sizes)
    g = ref_grad(model, kind, x, y)
    theta0 = flat_params(model)
    solver = CG(tol=1e-10) if name == "hessian" else "auto"
    opt = Optimizer(model, loss, metric=METRICS[name](), damping=1e-3, solver=solver,
                    generator=torch.Generator().manual_seed(seed))
    info = opt.step(x, y)
    delta = flat_params(model) - theta0
    assert info.accepted and float(delta.norm()) > 0
    gd = float(g @ delta)
    assert gd < 0
    assert math.isclose(info.directional_derivative, gd, rel_tol=1e-9)


def test_hessian_step_descends_at_negative_curvature():
    """With an indefinite Hessian, damped CG (Steihaug) still returns a descent direction."""
    model, x, y, loss = problem("gnll", seed=12, n=10, sizes=(3, 5, 4))
    ev = torch.linalg.eigvalsh(ref_hessian(model, "gnll", x, y))
    assert ev[0] < -1e-3  # the setup is indefinite, and more than the damping
    g, theta0 = ref_grad(model, "gnll", x, y), flat_params(model)
    opt = Optimizer(model, loss, metric=Hessian(), damping=1e-4, solver=CG(tol=1e-12))
    info = opt.step(x, y)
    assert float(g @ (flat_params(model) - theta0)) < 0
    assert info.accepted


# ----------------------------------------------------------------------------- 000 Appendix A
def ref_ggn(model, kind, x, y, sigma=1.0):
    jac = ref_jacobian(model, x)
    z = model(x).detach()
    return jtaj(jac, ref_output_hessians(kind, z, y, sigma))


@pytest.mark.parametrize("eps", [0.03, 0.3])
def test_trust_region_step_solves_problem_1(eps):
    """min g^T d s.t. d^T A d <= eps^2, A = M + lambda I: delta^T A delta = eps^2 and
    delta = -eps A^-1 g / sqrt(g^T A^-1 g) (closed form by an eigendecomposition; and SLSQP)."""
    lam = 0.05
    model, x, y, loss = problem("ce", seed=13, n=8, sizes=(2, 3, 2))
    a = ref_ggn(model, "ce", x, y) + lam * torch.eye(flat_params(model).numel(), dtype=DT)
    g, theta0 = ref_grad(model, "ce", x, y), flat_params(model)
    opt = Optimizer(model, loss, metric=GGN(), damping=lam, solver=Cholesky(),
                    step=TrustRegion(eps))
    info = opt.step(x, y)
    delta = flat_params(model) - theta0
    assert math.isclose(float(delta @ a @ delta), eps**2, rel_tol=1e-12)
    assert math.isclose(info.quad_form, eps**2, rel_tol=1e-12)
    mu, q = torch.linalg.eigh(a)
    ginv_g = float(((q.T @ g) ** 2 / mu).sum())  # g^T A^-1 g
    closed = -eps * (q @ ((q.T @ g) / mu)) / math.sqrt(ginv_g)
    assert close(delta, closed, 1e-10), rel(delta, closed)
    assert math.isclose(float(g @ delta), -eps * math.sqrt(ginv_g), rel_tol=1e-12)
    # an independent numerical solution of problem (1)
    an, gn = a.numpy(), g.numpy()
    res = scipy.optimize.minimize(
        lambda d: gn @ d, np.zeros_like(gn), jac=lambda d: gn, method="SLSQP",
        constraints=[{"type": "ineq", "fun": lambda d: eps**2 - d @ an @ d,
                      "jac": lambda d: -2 * an @ d}],
        options={"ftol": 1e-14, "maxiter": 500},
    )
    assert res.success, res.message
    assert np.linalg.norm(res.x - delta.numpy()) < 1e-5 * np.linalg.norm(res.x)
    assert gn @ res.x >= float(g @ delta) - 1e-10 * abs(float(g @ delta))


def test_trust_region_constraint_exact_with_inexact_cg_direction():
    """With a truncated CG direction the constraint still holds to machine precision."""
    lam, eps = 0.01, 0.2
    model, x, y, loss = problem("mse", seed=14, n=10, sizes=(3, 6, 2))
    p = flat_params(model).numel()
    a = ref_ggn(model, "mse", x, y) + lam * torch.eye(p, dtype=DT)
    g, theta0 = ref_grad(model, "mse", x, y), flat_params(model)
    opt = Optimizer(model, loss, metric=GGN(), damping=lam, solver=CG(maxiter=3),
                    step=TrustRegion(eps))
    info = opt.step(x, y)
    delta = flat_params(model) - theta0
    assert info.iterations == 3
    assert info.residual > 1e-3  # really inexact
    assert math.isclose(float(delta @ a @ delta), eps**2, rel_tol=1e-10)
    assert float(g @ delta) < 0


# ----------------------------------------------------------------------------- 000 Appendix B
@pytest.mark.parametrize("name,solver", [
    ("ggn", "cholesky"), ("ggn", "cg"), ("ggn", "woodbury"), ("fisher", "cholesky"),
    ("empirical-fisher", "woodbury"), ("gauss-newton", "cg"), ("identity", "cholesky"),
    ("hessian", "cholesky"),
])
def test_damped_step_minimises_damped_quadratic(name, solver):
    """LearningRate(1) with damping lambda: delta = argmin_d g^T d + 1/2 d^T (M + lambda I) d."""
    model, x, y, loss = problem("ce", seed=15, n=6, sizes=(3, 5, 3))
    metric = METRICS[name]()
    m = dense(metric, model, loss, x, y)
    p = m.shape[0]
    lam = 0.1
    if name == "hessian":  # enough damping for a minimiser to exist
        lam = max(0.1, 0.1 - float(torch.linalg.eigvalsh(m)[0]))
    a = m + lam * torch.eye(p, dtype=DT)
    g, theta0 = ref_grad(model, "ce", x, y), flat_params(model)
    solvers = {"cholesky": Cholesky(), "cg": CG(tol=1e-13), "woodbury": Woodbury()}
    opt = Optimizer(model, loss, metric=metric, damping=lam, solver=solvers[solver],
                    step=LearningRate(1.0))
    opt.step(x, y)
    d = flat_params(model) - theta0

    def q(v):
        return float(g @ v + 0.5 * v @ a @ v)

    assert float((g + a @ d).norm()) <= 1e-9 * float(g.norm())  # stationary
    gen = torch.Generator().manual_seed(16)
    for scale in (1e-3, 1e-1, 1.0):
        for _ in range(5):
            u = torch.randn(p, generator=gen, dtype=DT)
            u = scale * float(d.norm()) * u / u.norm()
            assert q(d + u) > q(d)
    assert q(d) < 0


# ----------------------------------------------------------------------------- Martens 12
class Reparam(nn.Module):
    """theta = zeta(gamma), flat theta mapped onto a frozen inner model's parameters."""

    def __init__(self, inner: nn.Module, zeta, gamma0: torch.Tensor) -> None:
        super().__init__()
        self.gamma = nn.Parameter(gamma0.clone())
        self.inner = inner
        for p in inner.parameters():
            p.requires_grad_(False)
        self.zeta = zeta
        self.f = flat_fn_all(inner)

    def forward(self, x):
        return self.f(self.zeta(self.gamma), x)


def flat_fn_all(model: nn.Module):
    named = list(model.named_parameters())
    names = [n for n, _ in named]
    shapes = [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]

    def f(theta, x):
        chunks = torch.split(theta, sizes)
        return functional_call(model, {n: c.view(s) for n, c, s in zip(names, chunks, shapes)},
                               (x,))

    return f


def undamped_steps(metric_fn, kind, inner_seed, zeta, zeta_inv, sizes=(3, 4, 2), n=40):
    """(d_theta, d_gamma, gamma0) of one LearningRate(1), damping 0 step in each
    parameterisation from the same point theta0 = zeta(gamma0)."""
    model, x, y, loss = problem(kind, seed=inner_seed, n=n, sizes=sizes)
    theta0 = flat_params(model)
    gamma0 = zeta_inv(theta0)
    assert close(zeta(gamma0), theta0, 1e-12)
    opt = Optimizer(model, loss, metric=metric_fn(), damping=0.0, solver=Cholesky())
    opt.step(x, y)
    d_theta = flat_params(model) - theta0
    inner = make_mlp(list(sizes), inner_seed + 999)  # its own weights are never used
    wrapped = Reparam(inner, zeta, gamma0)
    with torch.no_grad():
        assert torch.allclose(wrapped(x), make_model_like(sizes, theta0)(x), atol=1e-12)
    opt = Optimizer(wrapped, loss, metric=metric_fn(), damping=0.0, solver=Cholesky())
    opt.step(x, y)
    d_gamma = wrapped.gamma.detach() - gamma0
    return d_theta, d_gamma, gamma0


def make_model_like(sizes, theta):
    model = make_mlp(list(sizes), 0)
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(theta, model.parameters())
    return model


def affine_map(p: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    a = torch.eye(p, dtype=DT) + 0.4 * torch.randn(p, p, generator=gen, dtype=DT) / math.sqrt(p)
    a = a @ torch.diag(torch.exp(torch.randn(p, generator=gen, dtype=DT)))  # uneven scales
    b = torch.randn(p, generator=gen, dtype=DT)
    return a, b


@pytest.mark.parametrize("name,kind", [
    ("ggn", "mse"), ("gauss-newton", "mse"), ("fisher", "bce"), ("empirical-fisher", "bce"),
    ("ggn", "bce"),
])
def test_affine_reparameterisation_invariance(name, kind):
    """theta = A gamma + b: the undamped steps map onto each other, A d_gamma = d_theta."""
    p = 3 * 4 + 4 + 4 * 2 + 2
    a, b = affine_map(p, seed=17)
    assert float(torch.linalg.cond(a)) < 1e3
    d_theta, d_gamma, _ = undamped_steps(
        METRICS[name], kind, 18, lambda gam: a @ gam + b,
        lambda th: torch.linalg.solve(a, th - b))
    assert float(d_theta.norm()) > 1e-3
    assert close(a @ d_gamma, d_theta, 1e-8), rel(a @ d_gamma, d_theta)


def test_identity_metric_is_not_affine_invariant():
    """The test above can fail: plain gradient descent does not map, A d_gamma != d_theta."""
    p = 3 * 4 + 4 + 4 * 2 + 2
    a, b = affine_map(p, seed=17)
    d_theta, d_gamma, _ = undamped_steps(
        METRICS["identity"], "mse", 18, lambda gam: a @ gam + b,
        lambda th: torch.linalg.solve(a, th - b))
    assert rel(a @ d_gamma, d_theta) > 0.1


def test_nonlinear_reparameterisation_hessian_breaks_ggn_maps_at_first_order():
    """theta = sinh(gamma): the GGN (J^T B J form, Theorem 1 condition) still maps exactly
    through the Jacobian J_zeta = diag(cosh gamma), the Newton step does not."""
    sizes = (3, 2)  # linear regression: a positive definite Hessian in theta

    def zeta(gam):
        return torch.sinh(gam)

    for name in ("ggn", "fisher", "empirical-fisher"):
        d_theta, d_gamma, gamma0 = undamped_steps(METRICS[name], "mse", 19, zeta, torch.asinh,
                                                  sizes=sizes, n=30)
        j_zeta = torch.cosh(gamma0)
        assert float(d_theta.norm()) > 1e-3
        assert close(j_zeta * d_gamma, d_theta, 1e-9), (name, rel(j_zeta * d_gamma, d_theta))
        # first order only: the new points differ at second order
        assert not close(zeta(gamma0 + d_gamma), zeta(gamma0) + d_theta, 1e-6)

    # Newton: H_gamma = C H C + diag(g_theta sinh gamma), C = diag(cosh gamma)
    model, x, y, loss = problem("mse", seed=19, n=30, sizes=sizes)
    gamma0 = torch.asinh(flat_params(model))
    wrapped = Reparam(make_mlp(list(sizes), 5), zeta, gamma0)
    h_gamma = ref_hessian(wrapped, "mse", x, y)
    assert float(torch.linalg.eigvalsh(h_gamma)[0]) > 0  # Newton well defined in both
    d_theta, d_gamma, _ = undamped_steps(METRICS["hessian"], "mse", 19, zeta, torch.asinh,
                                         sizes=sizes, n=30)
    assert rel(torch.cosh(gamma0) * d_gamma, d_theta) > 0.1


def test_hessian_is_affine_invariant():
    """Newton's step is affine invariant (H_gamma = A^T H A), the contrast to the above."""
    sizes = (3, 2)
    p = 3 * 2 + 2
    a, b = affine_map(p, seed=20)
    d_theta, d_gamma, _ = undamped_steps(
        METRICS["hessian"], "mse", 19, lambda gam: a @ gam + b,
        lambda th: torch.linalg.solve(a, th - b), sizes=sizes, n=30)
    assert close(a @ d_gamma, d_theta, 1e-8), rel(a @ d_gamma, d_theta)


# ----------------------------------------------------------------------------- Martens 11.1
class Scalar(nn.Module):
    """f(x, theta) = theta (the input is ignored)."""

    def __init__(self, theta0: float) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor([theta0], dtype=DT))

    def forward(self, x):
        return self.theta.expand(x.shape[0], 1)


def run_scalar(metric, alpha: float, theta0: float, steps: int) -> list[float]:
    model = Scalar(theta0)
    x, y = torch.zeros(1, 1, dtype=DT), torch.zeros(1, 1, dtype=DT)
    opt = Optimizer(model, MSE(1.0), metric=metric, damping=0.0, solver=Cholesky(),
                    step=LearningRate(alpha))
    thetas = [theta0]
    for _ in range(steps):
        opt.step(x, y)
        thetas.append(float(model.theta.detach()))
    return thetas


@pytest.mark.parametrize("alpha", [0.1, 0.5, 1.0, 1.5, 1.9])
def test_martens_11_1_fisher_converges_linearly(alpha):
    """h = theta^2/2, F = 1: theta_{k+1} = (1 - alpha) theta_k for any alpha in (0, 2)."""
    thetas = run_scalar(Fisher(), alpha, 1.3, 12)
    if alpha == 1.0:
        assert thetas[1] == pytest.approx(0.0, abs=1e-15)
        return
    for a, b in zip(thetas[:-1], thetas[1:]):
        assert b / a == pytest.approx(1 - alpha, rel=1e-12)
    assert abs(thetas[-1]) <= abs(thetas[0]) * abs(1 - alpha) ** 12 * (1 + 1e-9)


@pytest.mark.parametrize("alpha", [0.1, 0.5, 1.0])
def test_martens_11_1_empirical_fisher_fails_to_converge(alpha):
    """F_bar = theta^2: theta_{k+1} = theta_k - alpha / theta_k, which never settles at 0."""
    theta0 = 1.3
    thetas = run_scalar(EmpiricalFisher(), alpha, theta0, 40)
    for a, b in zip(thetas[:-1], thetas[1:]):  # the iteration is the one in Martens 11.1
        assert b == pytest.approx(a - alpha / a, rel=1e-9, abs=1e-12)
    # |theta_k| keeps coming back to sqrt(alpha)-sized values or larger: no convergence
    tail = [abs(t) for t in thetas[-10:]]
    assert max(tail) > 0.5 * math.sqrt(alpha)
    fisher = run_scalar(Fisher(), alpha, theta0, 40)
    assert abs(fisher[-1]) < 1e-1 * max(tail) and abs(fisher[-1]) < abs(theta0) * 0.9**40 + 1e-15

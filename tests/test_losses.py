"""Per-loss checks in output space (steepest.losses), against independent computations.

value against torch.nn.functional / torch.distributions, ``hessian_vp`` against
``torch.autograd.functional.hessian``, ``fisher_vp`` and ``fisher_sqrt`` against F_R computed as
an exact expectation of score outer products (tests/reference.py), ``sample()`` statistics and
reproducibility with a generator, ``kl()`` against ``torch.distributions.kl_divergence``.
Shapes (batch size, number of outputs) are drawn by hypothesis.
"""

from __future__ import annotations

import math

import pytest
import reference as ref
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import rel_err, seeded
from torch.distributions import Bernoulli, Categorical, Normal, kl_divergence

from steepest.errors import LossNotProbabilisticError, ShapeError
from steepest.losses import (
    MSE,
    BCEWithLogits,
    CallableLoss,
    CrossEntropy,
    GaussianNLL,
    Loss,
    as_loss,
)

F64 = torch.float64
SETTINGS = settings(max_examples=8, deadline=None)
NAMES = ["mse", "ce", "bce", "gaussian"]


def cauchy(z, y):
    return torch.log1p((z - y) ** 2).sum(1)


def batch(name: str, n: int, c: int, seed: int, scale: float = 1.0):
    """(loss, z, y) for a loss with n samples and c outputs (c target dims for GaussianNLL)."""
    g = seeded(seed)
    if name == "mse":
        loss = MSE(sigma=0.6)
        z = scale * torch.randn(n, c, generator=g, dtype=F64)
        y = torch.randn(n, c, generator=g, dtype=F64)
    elif name == "ce":
        loss = CrossEntropy()
        z = scale * torch.randn(n, c + 1, generator=g, dtype=F64)
        y = torch.randint(0, c + 1, (n,), generator=g)
    elif name == "bce":
        loss = BCEWithLogits()
        z = scale * torch.randn(n, c, generator=g, dtype=F64)
        y = torch.rand(n, c, generator=g, dtype=F64).round()
    elif name == "gaussian":
        loss = GaussianNLL()
        z = scale * torch.randn(n, 2 * c, generator=g, dtype=F64)
        y = torch.randn(n, c, generator=g, dtype=F64)
    elif name == "callable":
        loss = CallableLoss(cauchy)
        z = scale * torch.randn(n, c, generator=g, dtype=F64)
        y = torch.randn(n, c, generator=g, dtype=F64)
    else:
        raise ValueError(name)
    return loss, z, y


shapes = st.tuples(st.integers(1, 5), st.integers(1, 3), st.integers(0, 10_000))


@pytest.mark.parametrize("name", NAMES + ["callable"])
@SETTINGS
@given(shape=shapes)
def test_value_matches_torch(name, shape):
    loss, z, y = batch(name, *shape)
    loss.check(z, y)
    v = loss.value(z, y)
    assert v.shape == (z.shape[0],) and v.dtype == F64
    assert rel_err(v, ref.loss_value(loss, z, y)) < 1e-13


def test_value_known_numbers():
    assert torch.allclose(
        MSE(sigma=0.5).value(torch.zeros(2, 1), torch.ones(2, 1)), torch.tensor([2.0, 2.0])
    )
    assert math.isclose(
        float(CrossEntropy().value(torch.zeros(1, 4), torch.tensor([2]))), math.log(4), rel_tol=1e-6
    )
    # GaussianNLL includes the 1/2 log(2 pi) constant: the full negative log-likelihood
    assert math.isclose(
        float(GaussianNLL().value(torch.zeros(1, 2), torch.zeros(1, 1))),
        0.5 * math.log(2 * math.pi),
        rel_tol=1e-6,
    )


@pytest.mark.parametrize("name", NAMES + ["callable"])
@SETTINGS
@given(shape=shapes)
def test_hessian_vp_matches_autograd(name, shape):
    loss, z, y = batch(name, *shape)
    h = ref.output_hessians(loss, z, y)
    u = torch.randn(z.shape, generator=seeded(shape[2] + 1), dtype=F64)
    got = loss.hessian_vp(z, y, u)
    assert got.shape == z.shape
    assert rel_err(got, torch.einsum("ncd,nd->nc", h, u)) < 1e-12
    assert rel_err(loss.output_matrix(z, y, "hessian"), h) < 1e-12


@pytest.mark.parametrize("name", NAMES)
@SETTINGS
@given(shape=shapes)
def test_fisher_vp_and_sqrt_match_expectation(name, shape):
    loss, z, _ = batch(name, *shape)
    fr = ref.output_fishers(loss, z)
    u = torch.randn(z.shape, generator=seeded(shape[2] + 2), dtype=F64)
    got = loss.fisher_vp(z, u)
    assert got.shape == z.shape
    assert rel_err(got, torch.einsum("ncd,nd->nc", fr, u)) < 1e-12
    s = loss.fisher_sqrt(z)
    assert s.shape[:2] == (z.shape[0], z[0].numel())
    assert rel_err(s @ s.transpose(1, 2), fr) < 1e-12
    assert rel_err(loss.output_matrix(z, None, "fisher"), fr) < 1e-12


@pytest.mark.parametrize("name", ["mse", "ce", "bce"])
def test_exponential_families_hessian_is_fisher(name):
    loss, z, y = batch(name, 4, 3, 0)
    assert loss.hessian_is_fisher
    assert rel_err(ref.output_hessians(loss, z, y), ref.output_fishers(loss, z)) < 1e-12


@pytest.mark.parametrize("name", ["mse", "bce"])
def test_multi_axis_outputs(name):
    """MSE and BCE accept outputs with extra axes; products keep z's shape."""
    g = seeded(3)
    z = torch.randn(3, 2, 2, generator=g, dtype=F64)
    y = torch.rand(3, 2, 2, generator=g, dtype=F64).round()
    loss = MSE(0.8) if name == "mse" else BCEWithLogits()
    loss.check(z, y)
    assert rel_err(loss.value(z, y), ref.loss_value(loss, z.reshape(3, 4), y.reshape(3, 4))) < 1e-13
    u = torch.randn(3, 2, 2, generator=g, dtype=F64)
    assert loss.fisher_vp(z, u).shape == z.shape
    assert loss.hessian_vp(z, y, u).shape == z.shape
    fr = ref.output_fishers(loss, z.reshape(3, 4))
    assert rel_err(loss.output_matrix(z, None, "fisher"), fr) < 1e-12
    s = loss.fisher_sqrt(z)
    assert rel_err(s @ s.transpose(1, 2), fr) < 1e-12


# ---------------------------------------------------------------------------------- sampling

M = 40_000  # draws per sample for the statistics


@pytest.mark.parametrize("name", NAMES)
def test_sample_statistics(name):
    loss, z, _ = batch(name, 3, 2, 11)
    zr = z.repeat(M, 1)
    y = loss.sample(zr, seeded(0))
    if name == "ce":
        assert y.dtype == torch.int64 and y.shape == (3 * M,)
        freq = torch.nn.functional.one_hot(y, z.shape[1]).to(F64).reshape(M, 3, -1).mean(0)
        p = torch.softmax(z, 1)
        se = (p * (1 - p) / M).sqrt()
        assert ((freq - p).abs() < 5 * se + 1e-12).all()
        return
    y = y.reshape(M, *z[:, : y.shape[1]].shape)
    if name == "bce":
        p = torch.sigmoid(z)
        assert set(y.unique().tolist()) <= {0.0, 1.0}
        assert ((y.mean(0) - p).abs() < 5 * (p * (1 - p) / M).sqrt()).all()
        return
    if name == "mse":
        mean, var = z, torch.full_like(z, loss.sigma**2)
    else:
        mean, var = z[:, :2], torch.exp(z[:, 2:])
    assert y.dtype == F64
    assert ((y.mean(0) - mean).abs() < 5 * (var / M).sqrt()).all()
    # the sample variance of a Gaussian has standard error var * sqrt(2 / (M - 1))
    assert ((y.var(0) - var).abs() < 5 * var * math.sqrt(2 / (M - 1))).all()


@pytest.mark.parametrize("name", NAMES)
def test_sample_reproducible_and_detached(name):
    loss, z, _ = batch(name, 6, 3, 5)
    zg = z.clone().requires_grad_(True)
    a, b = loss.sample(zg, seeded(42)), loss.sample(zg, seeded(42))
    assert torch.equal(a, b) and not a.requires_grad
    c = loss.sample(zg, seeded(43))
    assert not torch.equal(a, c)
    loss.check(z, a)  # samples are valid targets


# ---------------------------------------------------------------------------------- KL


def _distribution(name, loss, z):
    if name == "mse":
        return Normal(z, loss.sigma)
    if name == "ce":
        return Categorical(logits=z)
    if name == "bce":
        return Bernoulli(logits=z)
    d = z.shape[1] // 2
    return Normal(z[:, :d], torch.exp(0.5 * z[:, d:]))


def _kl_magnitudes(name, loss, z_old, z_new):
    r"""Per sample, :math:`S = \sum_k m_k` with :math:`m_k` bounding every quantity that our KL
    formula or torch.distributions' rounds for output k. Both are sums of differences of
    O(1)-accurate terms (a log-sigmoid, a log-softmax, a variance ratio) that cancel where the
    KL is tiny, so a rounding error of each operation is at most u times such a term, never u
    times the KL: :math:`|KL_{ours} - KL_{torch}| \le c\,u\,S` (u = 2^-53), c the number of
    rounded operations of the two formulas (about 20 per output, each transcendental to 1-2 ulp,
    plus the sum over outputs). The terms:

    - MSE (torch: :math:`\tfrac12(r + t - 1 - \log r)`, r = 1, :math:`t = \delta^2/\sigma^2`,
      rounded at 1 + t; ours :math:`\tfrac12 t`): :math:`m = 1 + t`;
    - Gaussian: :math:`m = 1 + r + t + |\log r| + |\gamma_{old}| + |\gamma_{new}|`, r the
      variance ratio, t the squared mean difference over the new variance;
    - softmax (both :math:`\sum_k p_k(\log p_k - \log q_k)`, the log-probabilities
      :math:`z_k - \mathrm{lse}(z)`): :math:`m_k = p_k(|z_k| + |z'_k| + |\mathrm{lse}| +
      |\mathrm{lse}'|)`;
    - Bernoulli (ours with :math:`\log(1 - \sigma(z)) = \log\sigma(z) - z`, torch with
      softplus, whose threshold 20 errs by :math:`e^{-20}` times a weight :math:`\le e^{-20}`,
      below u): :math:`m_k = |z_k| + |z'_k| + |\log\sigma(z_k)| + |\log\sigma(z'_k)|`.

    A relative tolerance cannot hold: where z_new is near z_old the KL is O(delta^2) while the
    rounding stays O(u); e.g. Bernoulli at z = -10, z' = z + 0.01 gives KL = 2.3e-9 and a
    relative difference of 5e-7 (and MSE differs by 1e-8 relative at small delta)."""
    if name == "mse":
        return (1 + ((z_old - z_new) / loss.sigma) ** 2).sum(1)
    if name == "gaussian":
        d = z_old.shape[1] // 2
        g1, g2 = z_old[:, d:], z_new[:, d:]
        r = torch.exp(g1 - g2)
        t = (z_old[:, :d] - z_new[:, :d]) ** 2 * torch.exp(-g2)
        return (1 + r + t + (g1 - g2).abs() + g1.abs() + g2.abs()).sum(1)
    if name == "ce":
        lse_o = torch.logsumexp(z_old, 1, keepdim=True)
        lse_n = torch.logsumexp(z_new, 1, keepdim=True)
        p = torch.softmax(z_old, 1)
        return (p * (z_old.abs() + z_new.abs() + lse_o.abs() + lse_n.abs())).sum(1)
    ls_o = torch.nn.functional.logsigmoid(z_old)
    ls_n = torch.nn.functional.logsigmoid(z_new)
    return (z_old.abs() + z_new.abs() + ls_o.abs() + ls_n.abs()).sum(1)


@pytest.mark.parametrize("name", NAMES)
@SETTINGS
@given(shape=shapes, step=st.sampled_from([0.5, 1e-2, 1e-4]))
def test_kl_matches_torch_distributions(name, shape, step):
    loss, z_old, _ = batch(name, *shape)
    z_new = z_old + step * torch.randn(z_old.shape, generator=seeded(shape[2] + 3), dtype=F64)
    kl = loss.kl(z_old, z_new)
    expected = kl_divergence(_distribution(name, loss, z_old), _distribution(name, loss, z_new))
    if expected.ndim == 2:
        expected = expected.sum(1)
    assert kl.shape == (z_old.shape[0],)
    # the rounding bound of the two formulas (_kl_magnitudes), c = 32; measured on 13,007
    # batches (the four losses, z scaled 1 to 19, steps 1e-4 to 0.5) the difference stays below
    # 2.6 u S, while the relative difference reaches 21 (softmax, a KL of rounding size)
    tol = 32 * torch.finfo(F64).eps / 2 * _kl_magnitudes(name, loss, z_old, z_new)
    assert ((kl - expected).abs() <= tol).all(), float(((kl - expected).abs() / tol).max())
    assert (kl >= 0).all()
    assert loss.kl(z_old, z_old).abs().max() < 1e-13


@pytest.mark.parametrize("name", NAMES)
def test_kl_second_order_is_fisher(name):
    """KL(R_z || R_{z + t u}) = t^2/2 u^T F_R u + O(t^3): the KL agrees with fisher_vp."""
    loss, z, _ = batch(name, 4, 2, 8)
    u = torch.randn(z.shape, generator=seeded(9), dtype=F64)
    quad = 0.5 * (u * loss.fisher_vp(z, u)).sum(1)
    errs = [float((loss.kl(z, z + t * u) / t**2 - quad).abs().max()) for t in (1e-2, 1e-3)]
    assert errs[1] < 0.2 * errs[0] + 1e-9


# ---------------------------------------------------------------------------------- callables


def test_callable_loss_is_not_probabilistic():
    loss = as_loss(cauchy)
    assert isinstance(loss, CallableLoss) and not loss.probabilistic and loss.name == "cauchy"
    z = torch.zeros(2, 3, dtype=F64)
    for call in (
        lambda: loss.fisher_vp(z, z),
        lambda: loss.fisher_sqrt(z),
        lambda: loss.sample(z, seeded(0)),
        lambda: loss.kl(z, z),
    ):
        with pytest.raises(LossNotProbabilisticError, match="cauchy.*MSE, CrossEntropy"):
            call()


def test_callable_must_not_reduce():
    loss = as_loss(lambda z, y: (z - y).pow(2).mean())
    with pytest.raises(ShapeError, match="one value per sample.*reduction='none'"):
        loss.value(torch.zeros(3, 2), torch.zeros(3, 2))


def test_as_loss_rejects_bad_arguments():
    assert isinstance(as_loss(CrossEntropy()), CrossEntropy)
    with pytest.raises(TypeError, match=r"CrossEntropy\(\)"):
        as_loss(CrossEntropy)
    with pytest.raises(TypeError, match="callable"):
        as_loss(3.0)
    for sigma in (0, -1.0, float("nan"), float("inf"), "1"):
        with pytest.raises(ValueError, match="sigma"):
            MSE(sigma=sigma)


def test_base_loss_is_abstract():
    with pytest.raises(NotImplementedError):
        Loss().value(torch.zeros(1, 1), torch.zeros(1, 1))

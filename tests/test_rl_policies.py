"""Policies as predictive distributions (steepest.rl.policies): closed forms against
torch.distributions, and the Fisher against the Hessian of the KL, in float64."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import flat_params, model_function, seeded
from torch import nn
from torch.autograd.functional import hessian
from torch.distributions import Categorical as TorchCategorical
from torch.distributions import Normal, kl_divergence

from steepest import Fisher, Point
from steepest.errors import ShapeError, SteepestError, TargetError
from steepest.rl import Categorical, DiagonalGaussian, GaussianHead, mlp

D = torch.float64


def torch_dist(pi, z):
    """The reference distribution from torch.distributions (independent of steepest)."""
    if isinstance(pi, Categorical):
        return TorchCategorical(logits=z)
    k = pi.action_dim
    return torch.distributions.Independent(Normal(z[:, :k], torch.exp(z[:, k:])), 1)


def ref_kl(pi, z_old, z_new):
    return kl_divergence(torch_dist(pi, z_old), torch_dist(pi, z_new))


def outputs(pi, n, gen):
    c = 3 if isinstance(pi, Categorical) else 2 * pi.action_dim
    return torch.randn(n, c, generator=gen, dtype=D)


POLICIES = [Categorical(), DiagonalGaussian(1), DiagonalGaussian(2)]


@pytest.mark.parametrize("pi", POLICIES, ids=repr)
def test_log_prob_kl_entropy_match_torch_distributions(pi):
    gen = seeded(0)
    z, z2 = outputs(pi, 6, gen), outputs(pi, 6, gen)
    a, logp = pi.act(z, gen)
    ref = torch_dist(pi, z)
    ta = a.squeeze(1).long() if isinstance(pi, Categorical) else a
    torch.testing.assert_close(logp, ref.log_prob(ta))
    torch.testing.assert_close(pi.log_prob(z, a), ref.log_prob(ta))
    torch.testing.assert_close(pi.kl(z, z2), ref_kl(pi, z, z2))
    torch.testing.assert_close(pi.entropy(z), ref.entropy())
    assert torch.allclose(pi.kl(z, z), torch.zeros(6, dtype=D), atol=1e-14)


@pytest.mark.parametrize("pi", POLICIES, ids=repr)
def test_fisher_is_hessian_of_kl_in_output_space(pi):
    """F_R(z) = d^2/dz'^2 KL(pi_z || pi_z') at z' = z, per sample (Hessian by autograd of the
    torch.distributions KL)."""
    z = outputs(pi, 5, seeded(1))
    fisher = pi.output_matrix(z, None, "fisher")
    for i in range(z.shape[0]):
        zi = z[i : i + 1]
        h = hessian(lambda w, zi=zi: ref_kl(pi, zi, w.reshape(zi.shape)).sum(), zi.reshape(-1))
        torch.testing.assert_close(fisher[i], h, rtol=1e-10, atol=1e-12)
    s = pi.fisher_sqrt(z)
    torch.testing.assert_close(s @ s.transpose(1, 2), fisher, rtol=1e-12, atol=1e-12)


def _policy(pi, gen):
    if isinstance(pi, Categorical):
        return mlp([3, 5, 3], generator=gen, dtype=D)
    return GaussianHead(
        mlp([3, 5, pi.action_dim], generator=gen, dtype=D), pi.action_dim, log_std=-0.3
    )


@pytest.mark.parametrize("pi", POLICIES, ids=repr)
def test_fisher_metric_of_a_policy_network_is_hessian_of_mean_kl(pi):
    """steepest.Fisher() on the surrogate equals the Hessian in theta of
    mean_i KL(pi_theta0(.|s_i) || pi_theta(.|s_i)) at theta0 (dense, autograd)."""
    gen = seeded(2)
    net = _policy(pi, gen)
    x = torch.randn(7, 3, generator=gen, dtype=D)
    with torch.no_grad():
        z0 = net(x)
    a, logp = pi.act(z0, gen)
    y = pi.targets(a, torch.randn(7, generator=gen, dtype=D), logp)
    fisher = Fisher().operator(Point(net, pi, x, y)).to_dense()
    f, theta0 = model_function(net), flat_params(net)
    ref = hessian(lambda th: ref_kl(pi, z0, f(th, x)).mean(), theta0)
    torch.testing.assert_close(fisher, ref, rtol=1e-9, atol=1e-11)
    # the Monte-Carlo Fisher from sampled actions converges to it
    mc = Fisher(mc_samples=4000).operator(Point(net, pi, x, y, generator=seeded(3))).to_dense()
    assert float((mc - ref).norm() / ref.norm()) < 0.1


@pytest.mark.parametrize("pi", POLICIES, ids=repr)
def test_surrogate_gradient_is_minus_the_policy_gradient(pi):
    gen = seeded(4)
    net = _policy(pi, gen)
    x = torch.randn(9, 3, generator=gen, dtype=D)
    with torch.no_grad():
        a, logp = pi.act(net(x), gen)
    adv = torch.randn(9, generator=gen, dtype=D)
    point = Point(net, pi, x, pi.targets(a, adv, logp))
    f, theta = model_function(net), flat_params(net).requires_grad_(True)
    ta = a.squeeze(1).long() if isinstance(pi, Categorical) else a
    pg = torch.autograd.grad((adv * torch_dist(pi, f(theta, x)).log_prob(ta)).mean(), theta)[0]
    torch.testing.assert_close(point.grad, -pg)
    assert point.value == pytest.approx(-float(adv.mean()), rel=1e-12)  # ratio 1


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 5), k=st.integers(1, 3))
def test_gaussian_targets_roundtrip(n, k):
    pi = DiagonalGaussian(k)
    a, adv, lp = (torch.randn(n, k, dtype=D), torch.randn(n, dtype=D), torch.randn(n, dtype=D))
    got = pi.unpack(pi.targets(a, adv, lp))
    for u, v in zip(got, (a, adv, lp)):
        assert torch.equal(u, v)


def test_bad_targets_are_named_errors():
    pi = Categorical()
    z = torch.zeros(3, 2, dtype=D)
    good = pi.targets(torch.tensor([0, 1, 1]), torch.ones(3, dtype=D), torch.zeros(3, dtype=D))
    pi.check(z, good)
    with pytest.raises(TargetError, match="integers in"):
        pi.check(z, good.clone().index_fill_(1, torch.tensor([0]), 2.0))
    with pytest.raises(ShapeError, match="targets"):
        pi.check(z, good[:, :2])
    with pytest.raises(ShapeError, match="dtype"):
        pi.check(z, good.float())
    with pytest.raises(TargetError, match="NaN"):
        pi.check(z, good.clone().fill_(math.nan))
    with pytest.raises(ShapeError, match="advantages"):
        pi.targets(torch.tensor([0, 1]), torch.ones(3), torch.zeros(3))
    with pytest.raises(ShapeError, match="GaussianHead"):
        DiagonalGaussian(2).check(torch.zeros(3, 2, dtype=D), torch.zeros(3, 4, dtype=D))
    with pytest.raises(SteepestError):
        DiagonalGaussian(0)


def test_gaussian_head_learns_log_std():
    net = GaussianHead(nn.Linear(3, 2, dtype=D), 2, log_std=-1.0)
    z = net(torch.zeros(4, 3, dtype=D))
    assert z.shape == (4, 4) and torch.all(z[:, 2:] == -1.0)
    names = [n for n, _ in net.named_parameters()]
    assert "log_std" in names

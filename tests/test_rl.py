"""steepest.rl: GAE by hand, the TRPO / NPG / VPG policy steps, rollouts on gymnasium
environments, a short seeded CartPole run and checkpoint/resume."""

from __future__ import annotations

import io
import math

import pytest
import torch
from reference import flat_params, model_function, seeded
from torch.autograd.functional import hessian

from steepest.errors import ConfigurationError, ShapeError
from steepest.rl import Agent, Categorical, Settings, gae, mlp, policy_optimizer, settings_for

pytest.importorskip("gymnasium")  # in the test extra; a clear skip reason elsewhere

D = torch.float64


def test_gae_against_a_hand_computed_trajectory():
    g, lam = 0.9, 0.8
    # env 0: no episode end; env 1: terminated at t=0, truncated at t=1 (bootstrapped from the
    # value 5.0 of its final observation), running at t=2
    r = torch.tensor([[1.0, 1.0], [2.0, 1.0], [3.0, 1.0]], dtype=D)
    v = torch.tensor([[0.5, 0.2], [1.0, 0.3], [1.5, 0.4]], dtype=D)
    nv = torch.tensor([[1.0, 9.0], [1.5, 5.0], [2.0, 0.6]], dtype=D)
    term = torch.tensor([[False, True], [False, False], [False, False]])
    trunc = torch.tensor([[False, False], [False, True], [False, False]])
    adv, ret = gae(r, v, nv, term, trunc, gamma=g, lam=lam)
    d0 = [1 + g * 1.0 - 0.5, 2 + g * 1.5 - 1.0, 3 + g * 2.0 - 1.5]  # 1.4, 2.35, 3.3
    a0_2 = d0[2]
    a0_1 = d0[1] + g * lam * a0_2
    a0_0 = d0[0] + g * lam * a0_1
    a1 = [1 - 0.2, 1 + g * 5.0 - 0.3, 1 + g * 0.6 - 0.4]  # each step its own episode piece
    expected = torch.tensor([[a0_0, a1[0]], [a0_1, a1[1]], [a0_2, a1[2]]], dtype=D)
    torch.testing.assert_close(adv, expected, rtol=1e-14, atol=1e-14)
    assert adv[0, 0].item() == pytest.approx(4.80272, abs=1e-12)
    torch.testing.assert_close(ret, adv + v)
    with pytest.raises(ShapeError, match=r"\(T, E\)"):
        gae(r, v[:2], nv, term, trunc)
    with pytest.raises(ConfigurationError, match="gamma"):
        gae(r, v, nv, term, trunc, gamma=1.5)


def _batch(seed: int, n: int = 64, obs: int = 4, actions: int = 3, hidden: int = 6):
    gen = seeded(seed)
    net = mlp([obs, hidden, actions], generator=gen, dtype=D)
    # a policy that is not uniform, so the Fisher is not degenerate
    with torch.no_grad():
        net[-1].weight.mul_(50.0)
    x = torch.randn(n, obs, generator=gen, dtype=D)
    pi = Categorical()
    with torch.no_grad():
        z0 = net(x)
    a, logp = pi.act(z0, gen)
    y = pi.targets(a, torch.randn(n, generator=gen, dtype=D), logp)
    return net, pi, x, y, z0


@pytest.mark.parametrize("max_kl", [1e-3, 1e-2])
def test_trpo_step_keeps_the_kl_bound_and_improves_the_surrogate(max_kl):
    net, pi, x, y, z0 = _batch(0)
    s = Settings(max_kl=max_kl, cg_iters=20, cg_damping=1e-3, dtype="float64")
    opt = policy_optimizer("trpo", net, pi, s)
    before = float(pi.value(z0, y).mean())
    info = opt.step(x, y)
    with torch.no_grad():
        z1 = net(x)
    kl = float(pi.kl(z0, z1).mean())
    after = float(pi.value(z1, y).mean())
    assert info.accepted and info.alpha > 0
    assert kl <= max_kl
    assert kl > 0.1 * max_kl  # the bound is used, not a tiny step
    assert after < before
    assert info.loss == pytest.approx(before, rel=1e-12)
    assert info.loss_new == pytest.approx(after, rel=1e-12)


def test_npg_step_is_the_trust_region_step_of_appendix_a():
    """alpha = sqrt(2 delta / g^T (F + lambda I)^-1 g) and delta^T (F + lambda I) delta =
    2 max_kl, with F the dense Hessian of the mean KL (autograd) and an exact CG solve."""
    net, pi, x, y, z0 = _batch(1, hidden=3)
    theta0 = flat_params(net)
    p = theta0.numel()
    lam, max_kl = 1e-3, 0.01
    s = Settings(max_kl=max_kl, cg_iters=4 * p, cg_damping=lam, dtype="float64")
    opt = policy_optimizer("npg", net, pi, s)
    info = opt.step(x, y)
    f = model_function(net)
    fisher = hessian(lambda th: pi.kl(z0, f(th, x)).mean(), theta0)
    theta_req = theta0.clone().requires_grad_(True)
    g = torch.autograd.grad(pi.value(f(theta_req, x), y).mean(), theta_req)[0]
    a = fisher + lam * torch.eye(p, dtype=D)
    nat = torch.linalg.solve(a, g)
    alpha = math.sqrt(2 * max_kl / float(g @ nat))
    delta = flat_params(net) - theta0
    torch.testing.assert_close(delta, -alpha * nat, rtol=1e-6, atol=1e-10)
    assert float(delta @ a @ delta) == pytest.approx(2 * max_kl, rel=1e-6)
    assert info.alpha == pytest.approx(alpha, rel=1e-6)


def test_vpg_step_is_a_gradient_step():
    net, pi, x, y, _ = _batch(2)
    theta0 = flat_params(net)
    f = model_function(net)
    th = theta0.clone().requires_grad_(True)
    g = torch.autograd.grad(pi.value(f(th, x), y).mean(), th)[0]
    policy_optimizer("vpg", net, pi, Settings(lr=0.3, dtype="float64")).step(x, y)
    torch.testing.assert_close(flat_params(net), theta0 - 0.3 * g)


def _short(method: str = "trpo", **kw) -> Agent:
    s = settings_for("CartPole-v1", n_steps=128, value_epochs=5, **kw)
    return Agent("CartPole-v1", method, seed=0, settings=s)


def test_seeded_short_cartpole_run_improves_the_mean_return(one_thread):
    agent = _short(max_kl=0.03)
    hist = agent.learn(6 * 256)
    assert len(hist) == 6 and agent.steps == 6 * 256
    first, last = hist[0]["mean_return"], hist[-1]["mean_return"]
    assert last > 2 * first, (first, last)
    assert all(h["kl"] <= agent.s.max_kl and h["accepted"] for h in hist)
    # every finished episode is counted once, at the step count where it ended
    steps = [s for s, _ in agent.episodes]
    assert steps == sorted(steps) and steps[-1] <= agent.steps
    assert len(steps) == hist[-1]["episodes"]


def test_checkpoint_resume_is_bit_for_bit(one_thread):
    a = _short("npg")
    a.learn(2 * 256)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    a.learn(4 * 256)
    b = _short("npg")
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=False))
    b.learn(4 * 256)

    def strip(h):
        return [{k: v for k, v in r.items() if k != "wall_time"} for r in h]

    assert strip(a.history) == strip(b.history)
    assert torch.equal(flat_params(a.policy), flat_params(b.policy))
    assert a.episodes == b.episodes
    c = _short("trpo")
    with pytest.raises(ConfigurationError, match="same environment, method"):
        c.load_state_dict(a.state_dict())


def test_gaussian_policy_on_pendulum_runs(one_thread):
    agent = Agent(
        "Pendulum-v1",
        "trpo",
        seed=3,
        settings=settings_for("Pendulum-v1", n_steps=200, value_epochs=2),
    )
    row = agent.iteration()
    assert row["steps"] == 400 and row["episodes"] == 2  # 200-step episodes, truncated
    assert row["kl"] <= agent.s.max_kl and row["accepted"]
    assert agent.policy.log_std.shape == (1,)


def test_bad_configuration_is_refused():
    with pytest.raises(ConfigurationError, match="unknown gymnasium environment"):
        Agent("NoSuchEnv-v0")
    with pytest.raises(ConfigurationError, match="KFAC"):
        policy_optimizer("acktr", mlp([2, 2]), Categorical(), Settings())
    with pytest.raises(ConfigurationError, match="n_steps"):
        Settings(n_steps=0)
    with pytest.raises(ConfigurationError, match="unknown setting"):
        settings_for("CartPole-v1", nsteps=3)
    with pytest.raises(ConfigurationError, match="gamma"):
        Settings(gamma=2.0)


@pytest.mark.parametrize("fitter", ["adam", "gauss-newton"])
def test_value_fitters_reduce_the_error(fitter):
    from steepest.rl import ValueFit

    gen = seeded(5)
    net = mlp([3, 8, 1], generator=gen, dtype=D)
    x = torch.randn(128, 3, generator=gen, dtype=D)
    ret = x[:, 0] ** 2 - x[:, 1] + 3.0
    with torch.no_grad():
        before = float((net(x).squeeze(1) - ret).pow(2).mean())
    after = ValueFit(net, fitter, lr=1e-2, epochs=10, batch_size=32).fit(x, ret, gen)
    assert after < 0.5 * before
    with pytest.raises(ConfigurationError, match="value fitter"):
        ValueFit(net, "lbfgs")


def test_collector_values_and_episodes(one_thread):
    from steepest.rl import Collector

    col = Collector("CartPole-v1", n_envs=3, seed=7)
    gen = seeded(7)
    policy = mlp([4, 8, 2], generator=gen)
    value = mlp([4, 8, 1], generator=gen)
    b = col.collect(policy, Categorical(), value, 40, gen)
    assert b.obs.shape == (120, 4) and b.actions.shape == (120, 1) and b.rewards.shape == (40, 3)
    assert torch.all(b.rewards == 1)
    done = b.terminated | b.truncated
    assert len(b.episodes) == int(done.sum()) > 0
    with torch.no_grad():
        torch.testing.assert_close(b.values, value(b.obs).reshape(40, 3))
    # V(s_{t+1}) is the next row's value, except where an episode ended (its final state)
    cont = ~done[:-1]
    torch.testing.assert_close(b.next_values[:-1][cont], b.values[1:][cont])
    assert col.steps == 120
    assert sum(e.length for e in b.episodes) <= 120

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
    with pytest.raises(ConfigurationError, match="unknown method"):
        policy_optimizer("a2c", mlp([2, 2]), Categorical(), Settings())
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


@pytest.mark.parametrize("max_kl", [1e-4, 1e-2])
def test_acktr_step_is_the_kfac_natural_step_within_the_exact_kl_bound(max_kl):
    """ACKTR: the direction is d = -(K + lambda I)^-1 g with K the K-FAC Fisher; the K-FAC
    trust-region size alpha0 = min(1, sqrt(2 max_kl / d^T (K + lambda I) d)) overshoots the
    exact KL on this batch (K is approximate), and the step actually taken is clipped to it."""
    from steepest import KFAC, Point
    from steepest.params import ParamSpace

    net, pi, x, y, z0 = _batch(6)
    opt = policy_optimizer("acktr", net, pi, Settings(max_kl=max_kl, dtype="float64"))
    assert isinstance(opt.metric, KFAC)
    theta0 = flat_params(net)
    gen_state = opt.generator.get_state()
    info = opt.step(x, y)
    delta = flat_params(net) - theta0
    opt.generator.set_state(gen_state)  # the same sampled actions for the K-FAC factors
    net_copy = mlp([4, 6, 3], dtype=D)
    net_copy.load_state_dict(net.state_dict())
    space = ParamSpace(net_copy)
    space.set(theta0)
    k = KFAC().operator(Point(net_copy, pi, x, y, generator=opt.generator)).to_dense()
    a = k + opt.damping.value * torch.eye(k.shape[0], dtype=D)
    fm = model_function(net_copy)
    g = torch.autograd.functional.jacobian(lambda th: pi.value(fm(th, x), y).mean(), theta0)
    d = -torch.linalg.solve(a, g)
    alpha0 = min(1.0, math.sqrt(2 * max_kl / float(d @ a @ d)))

    def kl_of(step):
        space.set(theta0 + step)
        with torch.no_grad():
            return float(pi.kl(z0, net_copy(x)).mean())

    assert kl_of(alpha0 * d) > max_kl  # the quadratic K-FAC model alone breaks the bound
    assert info.accepted and 0 < info.alpha < alpha0
    torch.testing.assert_close(delta, info.alpha * d, rtol=1e-8, atol=1e-12)
    kl = kl_of(delta)
    assert 0.3 * max_kl < kl <= max_kl
    with torch.no_grad():
        assert float(pi.value(net(x), y).mean()) < float(pi.value(z0, y).mean())


def test_exact_kl_clip_rescales_and_refuses():
    from steepest.rl.trust import ExactKLClip
    from steepest.steps import StepContext

    d = torch.tensor([1.0, 0.0], dtype=D)
    trials = []

    def ctx(kl_at, dAd=2.0):
        return StepContext(1.0, -d, d, None, dAd, None, lambda s: 0.0, kl_at)

    def quartic(step):  # the true KL grows faster than its quadratic model alpha^2 dAd / 2
        a = float(step[0])
        trials.append(a)
        return a * a + 100 * a**4

    rule = ExactKLClip(max_kl=0.01, max_alpha=1.0, beta=0.9, max_evals=10)
    choice = rule.choose(ctx(quartic))
    tried = list(trials)
    assert tried[0] == pytest.approx(0.1)  # alpha0 = sqrt(2 max_kl / dAd)
    assert len(tried) >= 2 and choice.evaluations == len(tried) and choice.alpha == tried[-1]
    assert quartic(choice.alpha * d) <= 0.01 < quartic(tried[-2] * d)
    # each rescaling is the quadratic model's, sqrt(max_kl / KL), at most beta
    a0 = tried[0]
    assert tried[1] == pytest.approx(a0 * min(0.9, math.sqrt(0.01 / (a0**2 + 100 * a0**4))))
    # capped by max_alpha; inside the bound at once
    assert ExactKLClip(0.01, max_alpha=0.05).choose(ctx(quartic)).alpha == 0.05
    # never inside the bound: no step, with a message
    refused = ExactKLClip(0.01, max_evals=3).choose(ctx(lambda s: math.inf))
    assert refused.alpha == 0 and refused.evaluations == 3 and "no step" in refused.message
    for bad in ({"max_kl": 0}, {"beta": 1.0}, {"max_evals": 0}, {"max_alpha": math.nan}):
        with pytest.raises(ConfigurationError, match="ExactKLClip"):
            ExactKLClip(**bad)


def test_acktr_step_that_cannot_meet_the_bound_changes_nothing():
    class Diverging(Categorical):  # every trial's KL is infinite
        def kl(self, z_old, z_new):
            return torch.full(z_old.shape[:1], math.inf, dtype=z_old.dtype)

    net, _, x, y, _ = _batch(2)
    opt = policy_optimizer("acktr", net, Diverging(), Settings(dtype="float64"))
    theta0 = flat_params(net)
    info = opt.step(x, y)
    assert not info.accepted
    assert torch.equal(flat_params(net), theta0)


def test_running_moments_match_the_batch_moments():
    from steepest.rl.rollouts import RunningMoments

    rng = torch.Generator().manual_seed(3)
    x = (torch.randn(300, 3, generator=rng, dtype=D) * torch.tensor([1.0, 5.0, 0.1]) + 2).numpy()
    m = RunningMoments((3,))
    for k in range(0, 300, 7):  # uneven batches
        m.update(x[k : k + 7])
    # the prior count 1e-4 at mean 0, variance 1 shifts the moments by ~1e-6 relative
    torch.testing.assert_close(
        torch.as_tensor(m.mean), torch.as_tensor(x.mean(0)), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        torch.as_tensor(m.var), torch.as_tensor(x.var(0)), rtol=1e-5, atol=1e-5
    )


def test_collector_normalises_observations_and_rewards(one_thread):
    from steepest.rl import Collector

    gen = seeded(4)
    policy = mlp([4, 8, 2], generator=gen)
    value = mlp([4, 8, 1], generator=gen)
    plain = Collector("CartPole-v1", n_envs=2, seed=4)
    norm = Collector(
        "CartPole-v1", n_envs=2, seed=4, normalize_obs=True, normalize_reward=True, gamma=0.9
    )
    b = norm.collect(policy, Categorical(), value, 50, seeded(0))
    # what the policy saw: the raw states normalised with the moments of all states so far
    # (with the prior: weight 1e-4 at mean 0, variance 1); the first row: the reset states'
    raw0 = torch.as_tensor(plain.obs)
    w0, n = 1e-4, raw0.shape[0]
    mean = raw0.sum(0) / (w0 + n)
    var = (w0 * (1 + mean**2) + ((raw0 - mean) ** 2).sum(0)) / (w0 + n)
    first = (raw0 - mean) / torch.sqrt(var + 1e-8)
    torch.testing.assert_close(b.obs[:2].double(), first, rtol=1e-5, atol=1e-5)
    assert norm.obs_moments.count == pytest.approx(51 * 2, abs=1e-3)  # reset + every step
    assert float(b.obs.abs().max()) <= 10.0
    # rewards 1 scaled by one batch scale 1/sqrt(Var[R] + 1e-8), episodes reported raw
    scale = float(b.rewards[0, 0])
    assert torch.allclose(b.rewards, torch.full_like(b.rewards, scale))
    assert scale == pytest.approx(1 / math.sqrt(norm.ret_moments.var + 1e-8), rel=1e-5)
    assert scale != pytest.approx(1.0, abs=1e-2)
    assert all(e.ret == e.length for e in b.episodes)


def test_acktr_refreshes_its_kronecker_factors_on_every_update():
    """One policy update per batch of thousands of samples: ACKTR's K-FAC is each update's
    batch (K-FAC's amortising defaults, inverses every 100 steps, would decompose the factors
    once or twice in a whole run)."""
    net, pi, x, y, _ = _batch(6)
    opt = policy_optimizer("acktr", net, pi, Settings(dtype="float64"))
    for k in range(3):
        opt.step(x[k:], y[k:])
    assert opt.metric.state_dict()["refreshes"] == 3

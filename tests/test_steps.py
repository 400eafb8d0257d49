"""Unit tests of the step rules (steepest.steps) on hand-made StepContext objects.

The context is a quadratic model problem in float64: L(theta0 + delta) = L0 + g^T delta +
1/2 delta^T H delta (plus, where a test needs it, a cubic term), A = H + lambda I the damped
operator, d = -A^-1 g. ``loss_at`` and ``kl_at`` record the deltas they are called with.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from steepest import (
    CrossEntropy,
    Fisher,
    LearningRate,
    LinearOperator,
    Optimizer,
    TrustRegion,
)
from steepest.errors import ConfigurationError, SteepestError
from steepest.solvers import Solution
from steepest.steps import Armijo, KLLineSearch, StepChoice, StepContext, StepRule, as_step

DT = torch.float64


class Problem:
    """A quadratic loss around theta0 with its damped operator, direction and recorders."""

    def __init__(self, p: int = 5, seed: int = 0, lam: float = 0.0, loss0: float = 3.0,
                 cubic: float = 0.0, kl_scale: float = 1.0) -> None:
        gen = torch.Generator().manual_seed(seed)
        b = torch.randn(p, p, generator=gen, dtype=DT)
        self.h = b @ b.T / p + 0.1 * torch.eye(p, dtype=DT)
        self.g = torch.randn(p, generator=gen, dtype=DT)
        self.a = self.h + lam * torch.eye(p, dtype=DT)
        self.d = -torch.linalg.solve(self.a, self.g)
        self.loss0, self.cubic, self.kl_scale = loss0, cubic, kl_scale
        self.loss_calls: list[torch.Tensor] = []
        self.kl_calls: list[torch.Tensor] = []
        a = self.a
        self.op = LinearOperator(lambda v: a @ v, p, DT, name="A")

    def loss(self, delta: torch.Tensor) -> float:
        return float(self.loss0 + self.g @ delta + 0.5 * delta @ self.h @ delta
                     + self.cubic * delta.norm() ** 3)

    def kl(self, delta: torch.Tensor) -> float:
        """A KL that exceeds its quadratic model 1/2 delta^T A delta for large steps."""
        q = 0.5 * float(delta @ self.a @ delta)
        return self.kl_scale * q * (1 + float(delta.norm()))

    def ctx(self, d: torch.Tensor | None = None, loss_at=None, kl_at=None) -> StepContext:
        d = self.d if d is None else d

        def rec_loss(delta):
            self.loss_calls.append(delta.clone())
            return (loss_at or self.loss)(delta)

        def rec_kl(delta):
            self.kl_calls.append(delta.clone())
            return (kl_at or self.kl)(delta)

        dad = float(d @ self.a @ d)
        sol = Solution(d, 1, 0.0, exact=True, message="dense")
        return StepContext(self.loss0, self.g, d, self.op, dad, sol, rec_loss, rec_kl)


BAD_POSITIVE = [0.0, -1.0, float("nan"), float("inf"), "1"]


# ----------------------------------------------------------------------------- LearningRate
@pytest.mark.parametrize("alpha", [1e-3, 0.5, 1.0, 3])
def test_learning_rate_returns_alpha_without_evaluations(alpha):
    prob = Problem()
    choice = LearningRate(alpha).choose(prob.ctx())
    assert isinstance(choice, StepChoice)
    assert choice.alpha == alpha and isinstance(choice.alpha, float)
    assert choice.evaluations == 0 and choice.loss_new is None
    assert prob.loss_calls == [] and prob.kl_calls == []


def test_learning_rate_state_dict_round_trip():
    rule = LearningRate(0.25)
    other = LearningRate(1.0)
    other.load_state_dict(rule.state_dict())
    assert other.alpha == 0.25
    assert not rule.adaptive
    rule.update(-5.0)  # a fixed learning rate ignores rho
    assert rule.alpha == 0.25


@pytest.mark.parametrize("alpha", BAD_POSITIVE)
def test_learning_rate_rejects_bad_alpha(alpha):
    with pytest.raises(ConfigurationError, match="alpha"):
        LearningRate(alpha)


def test_as_step():
    assert isinstance(as_step(0.5), LearningRate) and as_step(0.5).alpha == 0.5
    assert as_step(2).alpha == 2.0
    rule = TrustRegion(0.1)
    assert as_step(rule) is rule
    for bad in (True, "fast", None, [0.1]):
        with pytest.raises(ConfigurationError):
            as_step(bad)
    with pytest.raises(ConfigurationError):
        as_step(-0.1)
    assert issubclass(ConfigurationError, SteepestError) and issubclass(ConfigurationError,
                                                                        ValueError)


# ----------------------------------------------------------------------------- TrustRegion
@pytest.mark.parametrize("eps", [1e-3, 0.1, 2.0])
@pytest.mark.parametrize("lam", [0.0, 0.3])
def test_trust_region_alpha_puts_step_on_the_boundary(eps, lam):
    prob = Problem(lam=lam, seed=1)
    ctx = prob.ctx()
    choice = TrustRegion(eps).choose(ctx)
    delta = choice.alpha * ctx.d
    assert math.isclose(float(delta @ prob.a @ delta), eps**2, rel_tol=1e-12)
    # g^T A^-1 g = -g^T d: alpha = eps / sqrt(g^T A^-1 g) for the exact direction
    gag = float(prob.g @ torch.linalg.solve(prob.a, prob.g))
    assert math.isclose(choice.alpha, eps / math.sqrt(gag), rel_tol=1e-12)
    assert choice.evaluations == 0 and prob.loss_calls == []


def test_trust_region_uses_d_A_d_for_an_inexact_direction():
    prob = Problem(seed=2)
    d = 0.5 * prob.d + 0.1 * torch.linspace(-1, 1, 5, dtype=DT)  # not -A^-1 g
    choice = TrustRegion(0.2).choose(prob.ctx(d=d))
    delta = choice.alpha * d
    assert math.isclose(float(delta @ prob.a @ delta), 0.04, rel_tol=1e-12)


@pytest.mark.parametrize("rho,factor", [
    (0.9, 2.0), (0.76, 2.0), (5.0, 2.0),          # grows on rho > 3/4
    (0.1, 0.25), (0.0, 0.25), (-3.0, 0.25), (float("nan"), 0.25), (-math.inf, 0.25),
    (0.25, 1.0), (0.5, 1.0), (0.75, 1.0),          # unchanged in [1/4, 3/4]
])
def test_adaptive_trust_region_radius(rho, factor):
    rule = TrustRegion(0.1, adaptive=True, grow=2.0, shrink=0.25)
    assert rule.adaptive
    rule.update(rho)
    assert rule.eps == pytest.approx(0.1 * factor, rel=1e-15)


def test_adaptive_trust_region_bounds_and_fixed_radius():
    rule = TrustRegion(1.0, adaptive=True, grow=3.0, shrink=0.5, eps_min=0.1, eps_max=10.0)
    for _ in range(5):
        rule.update(1.0)
    assert rule.eps == 10.0
    for _ in range(10):
        rule.update(0.0)
    assert rule.eps == 0.1
    fixed = TrustRegion(1.0)
    assert not fixed.adaptive
    for rho in (0.0, 1.0, float("nan")):
        fixed.update(rho)
    assert fixed.eps == 1.0


def test_trust_region_state_dict_round_trip():
    rule = TrustRegion(0.1, adaptive=True)
    rule.update(0.9)
    other = TrustRegion(5.0, adaptive=True)
    other.load_state_dict(rule.state_dict())
    assert other.eps == rule.eps == 0.2


@pytest.mark.parametrize("kwargs", [
    {"eps": 0.0}, {"eps": -1.0}, {"eps": float("nan")}, {"eps": float("inf")},
    {"grow": 1.0}, {"grow": 0.5}, {"shrink": 1.0}, {"shrink": 2.0}, {"shrink": 0.0},
    {"eps_min": 0.0}, {"eps_max": -1.0}, {"max_alpha": 0.0}, {"max_alpha": -1.0},
    {"max_tries": 0}, {"max_tries": 1.5},
])
def test_trust_region_rejects_bad_configuration(kwargs):
    with pytest.raises(ConfigurationError):
        TrustRegion(**kwargs)


def _classifier(seed: int):
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=DT))
    x = torch.randn(20, 2, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (20,), generator=gen)
    return model, x, y


def _rule(eps: float, rho: float) -> float:
    return eps * (2.0 if rho > 0.75 else 0.25 if (math.isnan(rho) or rho < 0.25) else 1.0)


def test_adaptive_trust_region_in_the_optimizer_follows_rho():
    """One try per step: the radius after each step is the rule applied to the reported rho,
    and the step lies on the boundary delta^T A delta = eps^2 unless alpha hits max_alpha."""
    model, x, y = _classifier(3)
    rule = TrustRegion(2.0, adaptive=True, max_tries=1, relative=False)
    assert rule.reject and rule.max_alpha == 1.0
    opt = Optimizer(model, CrossEntropy(), metric=Fisher(), damping=1e-3, step=rule)
    factors = set()
    for _ in range(5):
        eps = rule.eps
        info = opt.step(x, y)
        assert info.tries == 1 and info.rho is not None
        assert info.alpha <= 1.0
        if info.alpha < 1.0:
            assert math.isclose(info.quad_form, eps**2, rel_tol=1e-9)
        else:
            assert info.quad_form <= eps**2 * (1 + 1e-12)
        assert rule.eps == pytest.approx(_rule(eps, info.rho), rel=1e-15)
        assert info.accepted == (info.loss_new <= info.loss)
        factors.add(round(rule.eps / eps, 6))
    assert len(factors) >= 2  # the radius did change, in both directions or one


def test_adaptive_trust_region_retries_with_a_smaller_radius():
    """A step that raises the loss is rejected and retried with eps * shrink."""
    model, x, y = _classifier(4)
    eps0 = 50.0  # far too large: the first tries raise the loss
    rule = TrustRegion(eps0, adaptive=True, max_alpha=1e6, relative=False)
    opt = Optimizer(model, CrossEntropy(), metric=Fisher(), damping=1e-3, step=rule)
    info = opt.step(x, y)
    assert info.tries > 1 and info.accepted
    assert info.loss_new <= info.loss
    eps_last = eps0 * 0.25 ** (info.tries - 1)  # the radius of the accepted try
    assert math.isclose(info.quad_form, eps_last**2, rel_tol=1e-9)
    assert rule.eps == pytest.approx(_rule(eps_last, info.rho), rel=1e-15)


# ----------------------------------------------------------------------------- Armijo
def test_armijo_backtracks_to_the_first_sufficient_decrease():
    """Newton direction on a quadratic: L(alpha d) - L0 = alpha s (1 - alpha/2), s = g^T d,
    so the condition holds iff alpha <= 2 (1 - c): from alpha0 = 8, trials 8, 4, 2, 1."""
    prob = Problem(seed=4)
    c = 1e-4
    choice = Armijo(alpha0=8.0, c=c, beta=0.5).choose(prob.ctx())
    assert choice.alpha == 1.0
    assert choice.evaluations == 4 == len(prob.loss_calls)
    assert [float(dl.norm() / prob.d.norm()) for dl in prob.loss_calls] == [8, 4, 2, 1]
    slope = float(prob.g @ prob.d)
    assert choice.loss_new == pytest.approx(prob.loss(prob.d), rel=1e-15)
    assert choice.loss_new <= prob.loss0 + c * choice.alpha * slope
    assert prob.loss(2 * prob.d) > prob.loss0 + c * 2 * slope  # the trial before failed


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), alpha0=st.floats(0.1, 100.0),
       c=st.floats(1e-6, 0.9), beta=st.floats(0.1, 0.9), cubic=st.floats(0.0, 5.0))
def test_armijo_sufficient_decrease_property(seed, alpha0, c, beta, cubic):
    prob = Problem(seed=seed, cubic=cubic)
    choice = Armijo(alpha0=alpha0, c=c, beta=beta).choose(prob.ctx())
    slope = float(prob.g @ prob.d)
    assert slope < 0
    if choice.alpha > 0:
        new = prob.loss(choice.alpha * prob.d)
        assert new <= prob.loss0 + c * choice.alpha * slope
        assert new < prob.loss0  # never an increase
        assert choice.loss_new == pytest.approx(new, rel=1e-12)
        # the first passing trial: every larger trial failed
        for delta in prob.loss_calls[:-1]:
            a = float(delta.norm() / prob.d.norm())
            assert prob.loss(delta) > prob.loss0 + c * a * slope
    else:
        assert choice.loss_new == prob.loss0


def test_armijo_never_accepts_an_increase_and_returns_zero():
    prob = Problem(seed=5)

    def rises(delta):  # the loss goes up along every step
        return prob.loss0 + 1e-9 + float(delta.norm())

    rule = Armijo(alpha0=1.0, max_evals=12)
    choice = rule.choose(prob.ctx(loss_at=rises))
    assert choice.alpha == 0.0
    assert choice.evaluations == 12 == len(prob.loss_calls)
    assert choice.loss_new == prob.loss0
    assert "Armijo" in choice.message


def test_armijo_refuses_an_ascent_direction_even_if_the_loss_barely_rises():
    prob = Problem(seed=7)

    def barely_rises(delta):  # within the Armijo bound if the slope were taken as given
        return prob.loss0 + 1e-9

    choice = Armijo().choose(prob.ctx(d=-prob.d, loss_at=barely_rises))
    assert choice.alpha == 0.0 and not prob.loss_calls
    assert "not a descent direction" in choice.message


def test_trust_region_accepts_an_infinite_alpha_cap():
    rule = TrustRegion(eps=0.3, max_alpha=math.inf)
    prob = Problem(seed=8)
    choice = rule.choose(prob.ctx())
    assert choice.alpha == pytest.approx(0.3 / math.sqrt(float(prob.d @ prob.a @ prob.d)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_armijo_skips_non_finite_losses(bad):
    prob = Problem(seed=6)

    def blows_up(delta):  # non-finite for steps longer than 0.3 d
        return bad if float(delta.norm()) > 0.3 * float(prob.d.norm()) else prob.loss(delta)

    choice = Armijo(alpha0=1.0, beta=0.5).choose(prob.ctx(loss_at=blows_up))
    assert choice.alpha == 0.25 and math.isfinite(choice.loss_new)
    assert choice.loss_new < prob.loss0
    nothing = Armijo(max_evals=5).choose(prob.ctx(loss_at=lambda delta: bad))
    assert nothing.alpha == 0.0 and nothing.loss_new == prob.loss0


@pytest.mark.parametrize("kwargs", [
    {"alpha0": 0.0}, {"alpha0": -1.0}, {"c": 0.0}, {"c": 1.0}, {"c": 1.5}, {"beta": 0.0},
    {"beta": 1.0}, {"beta": 2.0}, {"c": float("nan")}, {"alpha0": float("inf")},
])
def test_armijo_rejects_bad_configuration(kwargs):
    with pytest.raises(ConfigurationError):
        Armijo(**kwargs)


# ----------------------------------------------------------------------------- KLLineSearch
@pytest.mark.parametrize("max_kl", [1e-4, 1e-2, 0.5])
def test_kl_line_search_first_trial_and_bound(max_kl):
    prob = Problem(seed=7, lam=0.05)
    ctx = prob.ctx()
    choice = KLLineSearch(max_kl=max_kl, beta=0.5).choose(ctx)
    alpha0 = math.sqrt(2 * max_kl / ctx.dAd)
    assert torch.allclose(prob.kl_calls[0], alpha0 * prob.d, rtol=1e-14, atol=0)
    assert choice.alpha > 0
    delta = choice.alpha * prob.d
    assert prob.kl(delta) <= max_kl  # the bound holds for the chosen alpha
    assert choice.loss_new == pytest.approx(prob.loss(delta), rel=1e-15)
    assert choice.loss_new < prob.loss0
    k = round(math.log(choice.alpha / alpha0) / math.log(0.5))
    assert choice.alpha == pytest.approx(alpha0 * 0.5**k, rel=1e-12)
    # the largest such alpha: the trials before it broke the bound or raised the loss
    for trial in prob.kl_calls[:-1]:
        assert prob.kl(trial) > max_kl or prob.loss(trial) >= prob.loss0


def test_kl_line_search_backtracks_when_the_kl_exceeds_its_quadratic_model():
    prob = Problem(seed=8, kl_scale=4.0)  # the true KL is 4x its model: the first trial fails
    ctx = prob.ctx()
    choice = KLLineSearch(max_kl=0.01, beta=0.5).choose(ctx)
    alpha0 = math.sqrt(2 * 0.01 / ctx.dAd)
    assert prob.kl(alpha0 * prob.d) > 0.01
    assert choice.alpha < alpha0 and prob.kl(choice.alpha * prob.d) <= 0.01
    assert choice.evaluations == len(prob.kl_calls) >= 2


def test_kl_line_search_returns_zero_when_nothing_works():
    prob = Problem(seed=9)
    choice = KLLineSearch(max_kl=0.01, max_evals=6).choose(
        prob.ctx(kl_at=lambda delta: 1.0 + float(delta.norm())))
    assert choice.alpha == 0.0 and choice.evaluations == 6 and choice.loss_new == prob.loss0
    assert prob.loss_calls == [] and len(prob.kl_calls) == 6
    assert choice.message
    prob = Problem(seed=9)
    choice = KLLineSearch(max_kl=0.01, max_evals=6).choose(
        prob.ctx(loss_at=lambda delta: prob.loss0 + float(delta.norm())))
    assert choice.alpha == 0.0 and choice.loss_new == prob.loss0


@pytest.mark.parametrize("kwargs", [
    {"max_kl": 0.0}, {"max_kl": -0.1}, {"max_kl": float("nan")}, {"beta": 1.0},
    {"beta": 0.0}, {"beta": 3.0},
])
def test_kl_line_search_rejects_bad_configuration(kwargs):
    with pytest.raises(ConfigurationError):
        KLLineSearch(**kwargs)


def test_base_step_rule_and_context_defaults():
    with pytest.raises(NotImplementedError):
        StepRule().choose(Problem().ctx())
    choice = StepChoice(0.5)
    assert choice.evaluations == 0 and choice.loss_new is None and choice.message == ""
    for rule in (LearningRate(0.1), TrustRegion(0.1), Armijo(), KLLineSearch()):
        assert isinstance(repr(rule), str) and type(rule).__name__ in repr(rule)

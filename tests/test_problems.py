"""The built-in problems (steepest.problems) and the geometry of two-parameter problems."""

from __future__ import annotations

import math

import pytest
import torch

from steepest import geometry, problems
from steepest.errors import ConfigurationError
from steepest.losses import MSE
from steepest.metrics import GGN, Fisher, GaussNewton, Hessian
from steepest.point import Point
from steepest.problems import Problem
from steepest.problems.builtin import make_quadratic, mlp

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


BUILTIN = ["quadratic", "quadratic-noisy", "toy2d", "logistic", "digits", "regression",
           "heteroscedastic", "autoencoder"]


def test_registry_lists_every_builtin_problem_once():
    assert problems.names()[: len(BUILTIN)] == BUILTIN
    for name, desc in problems.describe():
        assert desc and "\n" not in desc, name


@pytest.mark.parametrize("name", BUILTIN)
def test_problem_builds_and_evaluates(name):
    prob = problems.get(name)
    assert isinstance(prob, Problem) and prob.name == name
    x, y = prob.data(F64, "cpu")
    model = prob.make_model(3, F64, "cpu")
    assert all(p.dtype == F64 for p in model.parameters())
    with torch.no_grad():
        z = model(x)
        prob.loss.check(z, y)
        value = float(prob.loss.value(z, y).mean())
    assert math.isfinite(value)
    # the target is below the starting loss: reaching it means progress
    assert prob.target_loss is not None and prob.target_loss < value
    # the same seed gives the same weights, another seed other weights
    again = prob.make_model(3, F64, "cpu")
    other = prob.make_model(4, F64, "cpu")
    for a, b in zip(model.parameters(), again.parameters()):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, c) for a, c in zip(model.parameters(), other.parameters()))
    if prob.test is not None:
        metric = prob.evaluate_test(model, F64, "cpu")
        assert metric is not None and math.isfinite(metric)
        assert prob.test_metric_name
    # float32 casts the floating data and keeps integer targets
    x32, y32 = prob.data(torch.float32, "cpu")
    assert x32.dtype == torch.float32
    assert y32.dtype == (torch.float32 if y.is_floating_point() else y.dtype)


def test_model_factory_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    mlp([3, 4, 2], 0, F64, "cpu")
    problems.get("regression").make_model(1, F64, "cpu")
    assert torch.equal(state, torch.get_rng_state())


def test_quadratic_has_the_requested_condition_number():
    prob = make_quadratic(dim=8, condition=100.0, n=40)
    model = prob.make_model(0, F64, "cpu")
    point = Point(model, prob.loss, *prob.train)
    h = Hessian().operator(point).to_dense()
    eig = torch.linalg.eigvalsh(h)
    assert float(eig.max() / eig.min()) == pytest.approx(100.0, rel=1e-8)
    assert float(eig.max()) == pytest.approx(1.0, rel=1e-8)
    # a quadratic with MSE: GGN = Gauss-Newton = Hessian
    assert torch.allclose(GGN().operator(point).to_dense(), h, atol=1e-10)


def test_quadratic_target_is_just_above_the_minimum():
    prob = make_quadratic(dim=5, condition=10.0, n=30, noise=0.3)
    x, y = prob.train
    best = torch.linalg.lstsq(x, y).solution
    l_star = float(0.5 * (x @ best - y).pow(2).mean())
    assert l_star > 0
    assert prob.target_loss == pytest.approx(l_star + 1e-4)


def test_toy2d_minimum_is_the_maximum_likelihood_fit():
    prob = problems.get("toy2d")
    _, y = prob.train
    model = prob.make_model(0, F64, "cpu")
    m, s = float(y.mean()), math.log(float(y.std(correction=0)))
    with torch.no_grad():
        model.m.fill_(m)
        model.s.fill_(s)
    point = Point(model, prob.loss, *prob.train)
    assert point.value == pytest.approx(prob.target_loss - 1e-3, abs=1e-12)
    assert float(point.grad.norm()) < 1e-10


def test_two_parameter_metrics_of_toy2d_match_closed_forms():
    prob = problems.get("toy2d")
    model = prob.make_model(0, F64, "cpu")
    with torch.no_grad():
        model.m.fill_(0.5)
        model.s.fill_(-1.0)
    point = Point(model, prob.loss, *prob.train)
    # z = (m, 2 s): J = diag(1, 2); F_R = diag(exp(-2 s), 1/2) for the Gaussian
    gn = GaussNewton().operator(point).to_dense()
    fisher = Fisher().operator(point).to_dense()
    assert torch.allclose(gn, torch.diag(torch.tensor([1.0, 4.0], dtype=F64)))
    assert torch.allclose(fisher, torch.diag(torch.tensor([math.exp(2.0), 2.0], dtype=F64)))
    # the model is linear in theta, so the GGN is the Hessian
    assert torch.allclose(GGN().operator(point).to_dense(),
                          Hessian().operator(point).to_dense(), atol=1e-10)


def test_geometry_steps_solve_problem_one():
    geom = geometry.compute("toy2d", theta=torch.tensor([0.5, -1.0]), grid=9)
    g = geom.grad
    assert set(geom.steps) == set(geometry.GEOMETRY_METRICS)
    for name, delta in geom.steps.items():
        m, eps = geom.matrices[name], geom.eps[name]
        # on the boundary of the trust region delta^T M delta = eps^2 ...
        assert float(delta @ m @ delta) == pytest.approx(eps**2, rel=1e-8), name
        # ... along -M^-1 g (Appendix A of 000), a descent direction
        d = -torch.linalg.solve(m, g)
        assert float(torch.linalg.det(torch.stack([delta, d]))) == pytest.approx(0, abs=1e-8)
        assert float(g @ delta) < 0, name
        # scaled epsilon: the longest axis of the ellipse is the radius (1)
        assert eps / math.sqrt(float(torch.linalg.eigvalsh(m).min())) == pytest.approx(1.0)
    # vanilla: the normalized negative gradient
    assert torch.allclose(geom.steps["vanilla"], -g / g.norm())
    # natural gradient: the same Fisher-norm move is smaller in the mean when the variance is
    # small (000 Figure 2): the Fisher weighs m by exp(-2 s) = e^2 here, s by 2
    m = geom.matrices["natural"]
    assert float(m[0, 0]) == pytest.approx(math.exp(2.0))
    assert geom.grid is not None and geom.grid.shape == (9, 9)
    assert torch.isfinite(geom.grid).all()


def test_geometry_with_one_epsilon_and_errors(tmp_path):
    geom = geometry.compute("toy2d", eps=0.1, grid=7, methods=["vanilla", "natural"])
    for name in ("vanilla", "natural"):
        delta = geom.steps[name]
        assert float(delta @ geom.matrices[name] @ delta) == pytest.approx(0.01)
    path = geometry.draw(geom, tmp_path / "g.png")
    assert (tmp_path / "g.png").stat().st_size > 1000 and path.endswith("g.png")
    assert [p.name for p in tmp_path.iterdir()] == ["g.png"]
    with pytest.raises(ConfigurationError, match="exactly two parameters"):
        geometry.compute("regression", grid=5)
    with pytest.raises(ConfigurationError, match="unknown method"):
        geometry.compute("toy2d", methods=["adam"])


def _custom_problem() -> Problem:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20, 2, generator=gen, dtype=F64)
    y = x.sum(1, keepdim=True)
    return Problem("sum", "learn a sum", lambda seed, dtype, device: mlp([2, 1], seed, dtype,
                   device), MSE(), (x, y), target_loss=1e-6)


def test_register_and_load_from_a_file(tmp_path):
    problems.register("custom-sum", "learn a sum", _custom_problem)
    try:
        assert "custom-sum" in problems.names()
        assert problems.get("custom-sum").name == "sum"
    finally:
        problems._REGISTRY.pop("custom-sum")
    src = tmp_path / "mine.py"
    src.write_text(
        "import torch\n"
        "from steepest.losses import MSE\n"
        "from steepest.problems import Problem\n"
        "from steepest.problems.builtin import mlp\n"
        "def make_problem():\n"
        "    x = torch.linspace(-1, 1, 10, dtype=torch.float64).view(-1, 1)\n"
        "    return Problem('line', 'a line', lambda s, d, dev: mlp([1, 1], s, d, dev), MSE(),\n"
        "                   (x, 2 * x), target_loss=1e-8)\n"
        "def not_a_problem():\n"
        "    return 3\n"
    )
    prob = problems.get(f"{src}:make_problem")
    assert prob.name == "line" and prob.n_train == 10
    problems.check_name(f"{src}:make_problem")
    with pytest.raises(ConfigurationError, match="has no function"):
        problems.get(f"{src}:missing")
    with pytest.raises(ConfigurationError, match="not a steepest.problems.Problem"):
        problems.get(f"{src}:not_a_problem")
    with pytest.raises(ConfigurationError, match="does not exist"):
        problems.check_name(f"{tmp_path}/nope.py:make_problem")
    with pytest.raises(ConfigurationError, match="unknown problem"):
        problems.get("nope")


def test_problem_validates_its_fields():
    x = torch.zeros(4, 1, dtype=F64)
    with pytest.raises(ConfigurationError, match="rows"):
        Problem("p", "d", lambda *a: None, MSE(), (x, torch.zeros(3, 1, dtype=F64)))
    with pytest.raises(ConfigurationError, match="Loss instance"):
        Problem("p", "d", lambda *a: None, lambda z, y: z, (x, x))  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="batch_size"):
        Problem("p", "d", lambda *a: None, MSE(), (x, x), batch_size=0)

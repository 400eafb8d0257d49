"""steepest.compare: settings, budgets, divergence, the summary and results.json."""

from __future__ import annotations

import json
import math

import pytest
import torch

from steepest import compare, report
from steepest.compare import METHOD_DEFAULTS, METHODS, Run, summarize
from steepest.errors import ConfigurationError

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy_all():
    """Every method, 3 iterations on toy2d (shared by several tests)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return compare.run("toy2d", methods="all", iters=3, seed=1)
    finally:
        torch.set_num_threads(n)


def test_every_method_runs_from_the_same_weights(toy_all):
    assert [r.method for r in toy_all.runs] == list(METHODS)
    starts = {r.curve["loss"][0] for r in toy_all.runs}
    assert len(starts) == 1
    for r in toy_all.runs:
        assert r.iterations == 3 and not r.diverged, (r.method, r.error)
        assert r.curve["iteration"] == [0, 1, 2, 3]
        assert r.curve["time"][0] == 0.0
        assert all(b >= a for a, b in zip(r.curve["time"], r.curve["time"][1:]))
        assert r.final_loss == r.curve["loss"][-1]
        assert r.best_loss == min(r.curve["loss"])
        assert r.wall_time == r.curve["time"][-1]
    # the curvature methods use LM damping with step rejection: the loss never goes up
    for r in toy_all.runs:
        if r.method in compare.STEEPEST_METHODS and r.method != "vanilla":
            assert all(b <= a + 1e-12 for a, b in zip(r.curve["loss"], r.curve["loss"][1:]))


def test_time_to_target_is_the_first_curve_point_below_it():
    result = compare.run("toy2d", methods=["natural", "vanilla"], iters=15)
    target = result.problem["target_loss"]
    nat, van = result.runs
    k = next(i for i, v in enumerate(nat.curve["loss"]) if v <= target)
    assert nat.iters_to_target == k and nat.time_to_target == nat.curve["time"][k]
    assert all(v > target for v in van.curve["loss"])
    assert van.time_to_target is None and van.iters_to_target is None
    assert result.summary["first_to_target"] == "natural"
    assert result.summary["sentence"].startswith(
        "On toy2d, natural gradient reached the target training loss")


def test_runs_are_reproducible():
    a = compare.run("quadratic-noisy", methods=["ggn", "sgd"], iters=4, seed=2)
    b = compare.run("quadratic-noisy", methods=["ggn", "sgd"], iters=4, seed=2)
    c = compare.run("quadratic-noisy", methods=["ggn", "sgd"], iters=4, seed=3)
    assert [r.curve["loss"] for r in a.runs] == [r.curve["loss"] for r in b.runs]
    assert [r.curve["loss"] for r in a.runs] != [r.curve["loss"] for r in c.runs]


def test_newton_solves_the_quadratic_in_one_step():
    result = compare.run("quadratic", methods=["newton", "vanilla"], iters=2,
                         settings={"newton": {"damping": 1e-10, "adaptive_damping": False}})
    newton, vanilla = result.runs
    target = result.problem["target_loss"]
    assert newton.curve["loss"][1] < target < vanilla.curve["loss"][1]
    assert newton.iters_to_target == 1


def test_scaled_trust_region_setting_uses_more():
    """--set METHOD.step=scaled-trust-region: MoreTrustRegion damping, lr 1, and it descends."""
    from steepest import MoreTrustRegion
    from steepest.steps import LearningRate

    prob = compare.get_problem("toy2d")
    s = compare.resolve_settings(prob, ["gauss-newton"], compare.parse_set(
        ["gauss-newton.step=scaled-trust-region"]))
    opt = compare._build("gauss-newton", s["gauss-newton"], torch.nn.Linear(2, 1).double(),
                         prob.loss, torch.Generator())
    assert isinstance(opt.damping, MoreTrustRegion)
    assert isinstance(opt.step_rule, LearningRate) and opt.step_rule.alpha == 1.0
    result = compare.run("logistic", methods=["gauss-newton"], iters=5, seed=0, settings={
        "gauss-newton": {"step": "scaled-trust-region"}})
    loss = result.runs[0].curve["loss"]
    assert all(b <= a for a, b in zip(loss, loss[1:])) and loss[-1] < loss[0]


def test_time_budget_stops_the_run():
    result = compare.run("toy2d", methods=["vanilla"], time=0.05)
    run = result.runs[0]
    assert result.config["iters"] is None and result.config["time"] == 0.05
    assert run.iterations >= 1
    # the budget is checked before each step: only the last step may overshoot it
    assert run.curve["time"][-2] < 0.05


def test_divergence_is_recorded_not_raised():
    # a huge learning rate on the quadratic overflows: the steepest optimizer refuses the step
    # (a NonFiniteError), torch's SGD takes it and the loss becomes inf/NaN
    result = compare.run("quadratic", methods=["vanilla", "sgd", "gauss-newton"], iters=200,
                         settings={"vanilla": {"lr": 1e6}, "sgd": {"lr": 1e6}})
    van, sgd, gn = result.runs
    assert van.diverged and van.iterations < 200
    assert "finite" in van.error
    assert sgd.diverged and sgd.iterations < 200
    assert sgd.error == "the training loss became NaN or infinite"
    assert sgd.curve["loss"][-1] is None and sgd.test_metric is None
    assert not gn.diverged and gn.iterations == 200 and gn.error is None
    assert result.summary["best_loss"] == "gauss-newton"


def test_a_steepest_error_is_recorded_as_divergence():
    # Cholesky refuses the indefinite GGN of the GaussianNLL (Martens 9.2) without damping
    result = compare.run("heteroscedastic", methods=["ggn"], iters=3, settings={
        "ggn": {"solver": "cholesky", "adaptive_damping": False, "damping": 0.0}})
    run = result.runs[0]
    assert run.diverged and run.error.startswith("SingularMatrixError")
    assert run.iterations == 0 and len(run.curve["loss"]) == 1


def test_parse_methods():
    assert compare.parse_methods("all") == list(METHODS)
    assert compare.parse_methods("ggn, adam,ggn") == ["ggn", "adam"]
    assert compare.parse_methods(["Natural", "all"])[0] == "natural"
    with pytest.raises(ConfigurationError, match="unknown method 'bfgs'"):
        compare.parse_methods("ggn,bfgs")
    with pytest.raises(ConfigurationError, match="no method"):
        compare.parse_methods(" , ")


def test_settings_are_layered_and_converted():
    prob = compare.get_problem("regression")
    s = compare.resolve_settings(prob, ["natural", "vanilla", "lbfgs"], compare.parse_set(
        ["natural.damping=1e-2", "natural.adaptive_damping=false", "natural.mc_samples=4",
         "lbfgs.line_search=none"]))
    assert s["natural"]["damping"] == 1e-2 and s["natural"]["adaptive_damping"] is False
    assert s["natural"]["mc_samples"] == 4
    assert s["vanilla"]["lr"] == prob.defaults["vanilla"]["lr"]  # the problem's default
    assert s["lbfgs"]["line_search"] == "none"
    assert set(s["natural"]) == set(METHOD_DEFAULTS["natural"])


@pytest.mark.parametrize("assignment, match", [
    ("natural.foo=1", "unknown setting natural.foo"),
    ("natural.damping=abc", "finite number"),
    ("natural.damping=-1", "finite number"),
    ("natural.cg_maxiter=1.5", "integer"),
    ("natural.adaptive_damping=maybe", "true or false"),
    ("natural.solver=lu", "one of auto, cg"),
    ("adam.beta1=1.5", "adam"),
    ("natural.damping=0", "damping must be > 0"),
    ("ggn.damping=1", "not among the methods run"),
    ("bfgs.lr=1", "unknown method"),
])
def test_bad_settings_are_refused(assignment, match):
    prob = compare.get_problem("toy2d")
    with pytest.raises(ConfigurationError, match=match):
        compare.resolve_settings(prob, ["natural", "adam"], compare.parse_set([assignment]))


def test_parse_set_needs_method_key_value():
    for bad in ("damping=1", "natural.damping", "natural.damping=", ".x=1"):
        with pytest.raises(ConfigurationError, match="METHOD.KEY=VALUE"):
            compare.parse_set([bad])


def test_plan_checks_budget_device_dtype_seed():
    with pytest.raises(ConfigurationError, match="positive integer"):
        compare.plan("toy2d", iters=0)
    with pytest.raises(ConfigurationError, match="positive number"):
        compare.plan("toy2d", time=-1.0)
    with pytest.raises(ConfigurationError, match="not both"):
        compare.plan("toy2d", iters=3, time=1.0)
    with pytest.raises(ConfigurationError, match="float32 or float64"):
        compare.plan("toy2d", dtype="float16")
    with pytest.raises(ConfigurationError, match="seed"):
        compare.plan("toy2d", seed=-1)
    with pytest.raises(ConfigurationError, match="unknown device"):
        compare.plan("toy2d", device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigurationError, match="CUDA"):
            compare.plan("toy2d", device="cuda")
    p = compare.plan("toy2d", methods="ggn")
    assert p.iters == p.problem.iters and p.seconds is None


def test_float32_runs():
    result = compare.run("regression", methods=["ggn", "adam"], iters=2, dtype="float32")
    assert result.config["dtype"] == "float32"
    for r in result.runs:
        assert not r.diverged and r.final_loss < r.curve["loss"][0]


def _run(method, final, test=None, ttt=None, it=None, diverged=False):
    r = Run(method, compare.LABELS[method], {})
    r.final_loss, r.test_metric, r.time_to_target, r.iters_to_target = final, test, ttt, it
    r.diverged = diverged
    return r


def test_summary_names_the_winners():
    prob = {"name": "p", "target_loss": 0.1, "test_metric": "test accuracy",
            "higher_is_better": True}
    runs = [_run("ggn", 0.05, 0.90, ttt=2.0, it=5), _run("adam", 0.02, 0.95, ttt=1.0, it=50),
            _run("sgd", 0.5, 0.99, diverged=True), _run("newton", 0.01, 0.80)]
    s = summarize(prob, runs)
    assert s["first_to_target"] == "adam" and s["best_test"] == "adam"
    assert s["best_loss"] == "newton"
    assert s["sentence"] == ("On p, Adam reached the target training loss 0.1 first (1.00 s, "
                             "50 iterations), and Adam ended best on the test accuracy (0.95).")
    prob["higher_is_better"] = False
    assert summarize(prob, runs)["best_test"] == "newton"
    none = summarize({**prob, "test_metric": None}, [_run("ggn", 0.5), _run("sgd", 0.4)])
    assert none["first_to_target"] is None and none["best_test"] is None
    assert none["sentence"] == ("On p, no method reached the target training loss 0.1, and "
                                "SGD (momentum) ended with the lowest training loss (0.4; the "
                                "problem has no test metric).")


def test_results_json_has_the_documented_schema(toy_all, tmp_path):
    paths = report.write(toy_all, tmp_path / "out")
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [p.rsplit("/", 1)[1] for p in paths] == list(report.FILES)
    assert data["schema"] == compare.SCHEMA
    assert set(data) == {"schema", "problem", "config", "environment", "runs", "summary"}
    assert set(data["problem"]) == {"name", "description", "target_loss", "test_metric",
                                    "higher_is_better", "n_train", "n_test", "parameters",
                                    "batch_size"}
    assert data["problem"]["parameters"] == 2
    assert set(data["config"]) == {"methods", "iters", "time", "seed", "device", "dtype",
                                   "overrides", "settings", "partial"}
    assert data["config"]["partial"] is False
    assert set(data["config"]["settings"]) == set(METHODS)
    for key in ("steepest", "python", "torch", "numpy", "platform", "machine", "cpu_count",
                "torch_threads", "cuda_device", "started"):
        assert key in data["environment"]
    assert data["environment"]["torch"] == torch.__version__.split("+")[0] or \
        data["environment"]["torch"].startswith(torch.__version__[:4])
    run_keys = {"method", "label", "settings", "iterations", "wall_time", "final_loss",
                "best_loss", "test_metric", "time_to_target", "iters_to_target", "diverged",
                "error", "curve"}
    for run in data["runs"]:
        assert set(run) == run_keys
        assert set(run["curve"]) == {"iteration", "time", "loss"}
        assert len({len(v) for v in run["curve"].values()}) == 1
        assert all(isinstance(v, float) for v in run["curve"]["loss"])
    assert set(data["summary"]) == {"first_to_target", "best_test", "best_loss", "sentence"}
    for key in ("problem", "config", "runs", "summary"):
        assert key in compare.SCHEMA_DOC


def test_non_finite_values_become_null(tmp_path):
    result = compare.run("quadratic", methods=["sgd"], iters=200, settings={"sgd": {"lr": 1e6}})
    report.write(result, tmp_path)
    text = (tmp_path / "results.json").read_text()

    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    run = json.loads(text, parse_constant=refuse)["runs"][0]
    assert run["diverged"] is True and run["final_loss"] is None
    assert run["curve"]["loss"][-1] is None
    assert math.isfinite(run["curve"]["loss"][0])

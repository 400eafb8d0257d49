"""steepest.compare: settings, budgets, divergence, the summary and results.json."""

from __future__ import annotations

import json
import math

import pytest
import torch

from steepest import compare
from steepest.compare import METHOD_DEFAULTS, METHODS, Run, report, runner, summarize
from steepest.errors import ConfigurationError

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy_all():
    """Every method, 3 iterations on toy2d (shared by several tests)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return compare.run("toy2d", methods="all", iters=3, seed=1, seeds=1, tune=False)
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
    result = compare.run("toy2d", methods=["natural", "vanilla"], iters=15, seeds=1)
    target = result.problem["target_loss"]
    nat, van = result.runs
    k = next(i for i, v in enumerate(nat.curve["loss"]) if v <= target)
    assert nat.iters_to_target == k and nat.time_to_target == nat.curve["time"][k]
    assert all(v > target for v in van.curve["loss"])
    assert van.time_to_target is None and van.iters_to_target is None
    assert result.summary["first_to_target"] == "natural"
    assert result.summary["sentence"].startswith(
        "On toy2d (1 seed, 15 iterations per method), natural gradient reached the target "
        "training loss")


def test_runs_are_reproducible():
    """Same seeds, same numbers (times aside), the learning-rate search included."""
    a = compare.run("quadratic-noisy", methods=["ggn", "sgd"], iters=4, seed=2, seeds=2)
    b = compare.run("quadratic-noisy", methods=["ggn", "sgd"], iters=4, seed=2, seeds=2)
    c = compare.run("quadratic-noisy", methods=["ggn", "sgd"], iters=4, seed=3, seeds=2)
    assert [(r.method, r.seed) for r in a.runs] == [("ggn", 2), ("ggn", 3), ("sgd", 2),
                                                    ("sgd", 3)]
    for x, y in zip(a.runs, b.runs):
        assert (x.curve["loss"], x.curve["test"], x.final_loss, x.settings) == (
            y.curve["loss"], y.curve["test"], y.final_loss, y.settings)
    assert a.tuning == b.tuning and a.tuning["sgd"]["grid"] == [
        0.5 * f for f in compare.TUNE_FACTORS]
    # seed 3 is the second seed of a and the first of c
    assert a.runs[1].curve["loss"] == c.runs[0].curve["loss"]
    assert a.runs[0].curve["loss"] != c.runs[0].curve["loss"]


def test_newton_solves_the_quadratic_in_one_step():
    result = compare.run("quadratic", methods=["newton", "vanilla"], iters=2, seeds=1,
                         settings={"newton": {"damping": 1e-10, "adaptive_damping": False}})
    newton, vanilla = result.runs
    target = result.problem["target_loss"]
    assert newton.curve["loss"][1] < target < vanilla.curve["loss"][1]
    assert newton.iters_to_target == 1


def test_scaled_trust_region_setting_uses_more():
    """--set METHOD.step=scaled-trust-region: MoreTrustRegion damping, lr 1, and it descends."""
    from steepest import MoreTrustRegion
    from steepest.steps import LearningRate

    prob = runner.get_problem("toy2d")
    s = compare.resolve_settings(prob, ["gauss-newton"], compare.parse_set(
        ["gauss-newton.step=scaled-trust-region"]))
    opt = runner._build("gauss-newton", s["gauss-newton"], torch.nn.Linear(2, 1).double(),
                         prob.loss, torch.Generator())
    assert isinstance(opt.damping, MoreTrustRegion)
    assert isinstance(opt.step_rule, LearningRate) and opt.step_rule.alpha == 1.0
    result = compare.run("logistic", methods=["gauss-newton"], iters=5, seed=0, seeds=1,
                         settings={
        "gauss-newton": {"step": "scaled-trust-region"}})
    loss = result.runs[0].curve["loss"]
    assert all(b <= a for a, b in zip(loss, loss[1:])) and loss[-1] < loss[0]


def test_time_budget_stops_the_run():
    result = compare.run("toy2d", methods=["vanilla"], time=0.05, seeds=1)
    run = result.runs[0]
    assert result.config["iters"] is None and result.config["time"] == 0.05
    assert run.iterations >= 1
    # the budget is checked before each step: only the last step may overshoot it
    assert run.curve["time"][-2] < 0.05


def test_divergence_is_recorded_not_raised():
    # a huge learning rate on the quadratic overflows: the steepest optimizer refuses the step
    # (a NonFiniteError), torch's SGD takes it and the loss becomes inf/NaN
    result = compare.run("quadratic", methods=["vanilla", "sgd", "gauss-newton"], iters=200,
                         seeds=1,
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
    result = compare.run("heteroscedastic", methods=["ggn"], iters=3, seeds=1, settings={
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
    prob = runner.get_problem("regression")
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
    prob = runner.get_problem("toy2d")
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
    with pytest.raises(ConfigurationError, match="seeds"):
        compare.plan("toy2d", seeds=0)
    p = compare.plan("toy2d", methods="ggn")
    assert p.seconds == p.problem.time and p.iters is None  # equal wall-time budgets
    assert p.seeds == [0, 1, 2]
    p = compare.plan("toy2d", methods="ggn", iters=4, seed=2**64 - 1, seeds=2)
    assert p.iters == 4 and p.seconds is None and p.seeds == [2**64 - 1, 0]


def test_float32_runs():
    result = compare.run("regression", methods=["ggn", "adam"], iters=2, dtype="float32",
                         seeds=1, tune=False)
    assert result.config["dtype"] == "float32"
    for r in result.runs:
        assert not r.diverged and r.final_loss < r.curve["loss"][0]


def _run(method, final, test=None, ttt=None, it=None, diverged=False, seed=0, curve=None):
    r = Run(method, compare.label(method), {}, seed=seed)
    r.final_loss, r.test_metric, r.time_to_target, r.iters_to_target = final, test, ttt, it
    r.diverged = diverged
    losses = curve if curve is not None else [1.0, 0.5 + seed, final]
    r.curve = {"iteration": list(range(len(losses))), "time": [0.1 * i for i in
               range(len(losses))], "loss": losses, "test": [None] * len(losses)}
    return r


PROB = {"name": "p", "target_loss": 0.1, "test_metric": "test accuracy",
        "higher_is_better": True, "loss": "CrossEntropy", "hessian_is_fisher": True}


def test_summary_names_the_winners():
    runs = [_run("ggn", 0.05, 0.90, ttt=2.0, it=5), _run("adam", 0.02, 0.95, ttt=1.0, it=50),
            _run("sgd", 0.5, 0.99, diverged=True), _run("newton", 0.01, 0.80)]
    s = summarize(PROB, runs)
    assert s["winner"] == s["first_to_target"] == "adam" and s["tied"] == []
    assert s["best_test"] == "adam"  # the diverged SGD does not count
    assert s["best_loss"] == "newton"
    assert s["sentence"] == ("On p (1 seed), Adam reached the target training loss 0.1 first "
                             "(1 s). Best test accuracy: Adam, 0.95.")
    assert summarize({**PROB, "higher_is_better": False}, runs)["best_test"] == "newton"
    none = summarize({**PROB, "test_metric": None}, [_run("ggn", 0.5), _run("sgd", 0.4)])
    assert none["first_to_target"] is None and none["best_test"] is None
    assert none["judged"] == "final_loss" and none["winner"] == "sgd"
    assert none["sentence"].startswith("On p (1 seed; no method reached the target training "
                                       "loss 0.1 on most seeds; judged on the final training "
                                       "loss), SGD (momentum) ended lowest: 0.4.")


def _seeds(method, times, finals=None):
    finals = finals or [0.05] * len(times)
    return [_run(method, f, ttt=t, it=3, seed=k, curve=[1.0, 0.5 + 0.01 * len(method), f])
            for k, (t, f) in enumerate(zip(times, finals))]


def test_overlapping_spreads_are_a_tie_and_separate_ones_a_winner():
    # medians 1.0 and 1.2; the first's range [0.8, 1.3] holds the second's median: tied
    runs = _seeds("ggn", [0.8, 1.0, 1.3]) + _seeds("adam", [1.1, 1.2, 1.5])
    s = summarize(PROB, runs, budget="1 s of step time per method")
    assert s["winner"] == "ggn" and s["tied"] == ["adam"]
    assert "tied with Adam" in s["sentence"] and "3 seeds, 1 s of step time" in s["sentence"]
    assert "median 1 s over the seeds (range 0.8 s to 1.3 s, 3 of 3 seeds" in s["sentence"]
    # the same medians with narrow ranges: a winner
    runs = _seeds("ggn", [0.95, 1.0, 1.05]) + _seeds("adam", [1.15, 1.2, 1.25])
    s = summarize(PROB, runs)
    assert s["winner"] == "ggn" and s["tied"] == [] and "tied" not in s["sentence"]
    # a median of "not reached" cannot win, however fast its one good seed
    runs = _seeds("ggn", [0.01, None, None]) + _seeds("adam", [2.0, 2.0, 3.0])
    s = summarize(PROB, runs)
    assert s["winner"] == "adam" and s["tied"] == []
    row = {t["row"]: t for t in s["rows"]}["ggn"]
    assert row["reached"] == 1 and row["time_to_target"] == {"median": None, "min": 0.01,
                                                             "max": None}


def test_coinciding_methods_are_merged_with_the_reason():
    curve = [2.0, 1.0, 0.3, 0.05]
    nat = [_run("natural", 0.05, ttt=0.5 + k, it=3, seed=k, curve=list(curve)) for k in range(2)]
    ggn = [_run("ggn", 0.05, ttt=0.4 + k, it=3, seed=k,
                curve=[v * (1 + 1e-12) for v in curve]) for k in range(2)]
    other = [_run("adam", 0.05, ttt=3.0, it=3, seed=k, curve=[2.0, 1.5, 0.9, 0.05])
             for k in range(2)]
    s = summarize(PROB, nat + ggn + other)
    assert [t["row"] for t in s["rows"]] == ["ggn", "adam"]  # the faster member shows
    merged = s["merged"][0]
    assert merged["rows"] == ["natural", "ggn"] and merged["label"] == "GGN = natural gradient"
    assert "Martens 002 section 9.2" in merged["reason"]
    assert s["winner"] == "ggn" and s["sentence"].count("GGN = natural gradient") == 1
    # not merged when the loss is not in natural parameters: then no paper reason applies
    s2 = summarize({**PROB, "hessian_is_fisher": False, "loss": "GaussianNLL"}, nat + ggn)
    assert s2["merged"][0]["reason"] is None
    # a difference beyond rounding on one seed keeps them apart
    ggn[1].curve["loss"][2] *= 1.001
    assert not compare.coinciding(nat, ggn) and summarize(PROB, nat + ggn)["merged"] == []
    assert not compare.coinciding(nat, ggn[:1])  # different seeds


def test_variants_are_rows_of_their_own():
    rows = compare.parse_methods("ggn,ggn[solver=woodbury],gauss-newton[damping=more],"
                                 "ggn[damping=0.1, solver=cg],ggn")
    assert rows == ["ggn", "ggn[solver=woodbury]", "gauss-newton[damping=more]",
                    "ggn[damping=0.1,solver=cg]"]
    assert compare.label("ggn[solver=woodbury]") == "GGN [solver=woodbury]"
    prob = runner.get_problem("regression")
    s = compare.resolve_settings(prob, rows, {"ggn": {"damping": "0.01"}})
    assert s["ggn"]["solver"] == "auto" and s["ggn"]["damping"] == 0.01
    assert s["ggn[solver=woodbury]"]["solver"] == "woodbury"
    assert s["ggn[solver=woodbury]"]["damping"] == 0.01  # the per-method override
    assert s["ggn[damping=0.1,solver=cg]"]["damping"] == 0.1  # the variant wins
    assert s["gauss-newton[damping=more]"]["step"] == "scaled-trust-region"
    for bad, match in [("ggn[solver=lu]", "one of auto"), ("ggn[foo=1]", "unknown setting"),
                       ("ggn[solver]", "KEY=VALUE"), ("bfgs[lr=1]", "unknown method")]:
        with pytest.raises(ConfigurationError, match=match):
            compare.resolve_settings(prob, compare.parse_methods(bad))
    result = compare.run("toy2d", methods="natural,natural[damping=1],natural[solver=cg]",
                         iters=4, seeds=2, tune=False)
    assert result.rows() == ["natural", "natural[damping=1]", "natural[solver=cg]"]
    assert len(result.runs) == 6
    by = {(r.method, r.seed): r for r in result.runs}
    assert by[("natural[damping=1]", 0)].settings["damping"] == 1.0
    assert by[("natural[damping=1]", 0)].curve["loss"] != by[("natural", 0)].curve["loss"]
    # CG and the exact solve take the same iterates: reported once, as the same metric
    merged = result.summary["merged"]
    assert [sorted(m["rows"]) for m in merged] == [["natural", "natural[solver=cg]"]]
    assert merged[0]["reason"].startswith("the same metric")


def test_time_budget_stops_each_method_within_one_step():
    budget = 0.2
    result = compare.run("regression", methods="ggn,adam,lbfgs,newton", time=budget, seeds=1,
                         tune=False)
    for r in result.runs:
        times = r.curve["time"]
        assert not r.diverged and r.iterations >= 1
        assert r.wall_time >= budget  # the budget was used
        # the budget is checked before each step: the run stopped at the first step that
        # crossed it, so without its last step it was still under the budget
        assert times[-2] < budget <= times[-1] or r.iterations == 1
    # equal wall-time budgets, not equal iterations
    assert len({r.iterations for r in result.runs}) > 1
    # the same on the process's CPU clock
    result = compare.run("regression", methods="ggn,adam", time=budget, seeds=1, tune=False,
                         clock="cpu")
    assert result.config["clock"] == "cpu" and "process CPU time" in result.summary["budget"]
    for r in result.runs:
        assert r.curve["time"][-2] < budget <= r.curve["time"][-1] or r.iterations == 1
    with pytest.raises(ConfigurationError, match="clock must be one of wall, cpu"):
        compare.plan("toy2d", clock="gpu")


def test_baselines_are_tuned_on_the_first_seed_unless_set():
    result = compare.run("toy2d", methods="adam,sgd,natural", iters=5, seed=4, seeds=2,
                         settings={"sgd": {"lr": 0.01}})
    assert set(result.tuning) == {"adam"}  # SGD's lr is the user's
    rec = result.tuning["adam"]
    assert rec["grid"] == [0.1 * f for f in compare.TUNE_FACTORS] and rec["seed"] == 4
    assert len(rec["trials"]) == len(rec["grid"])
    best = min(rec["trials"], key=lambda t: (t["time_to_target"] or math.inf,
                                             t["final_loss"]))
    assert rec["chosen"] == best["lr"]
    assert all(r.settings["lr"] == rec["chosen"] for r in result.runs if r.method == "adam")
    assert result.config["settings"]["adam"]["lr"] == rec["chosen"]
    assert all(r.settings["lr"] == 0.01 for r in result.runs if r.method == "sgd")
    # the first seed's run is the chosen trial itself
    first = next(r for r in result.runs if r.method == "adam" and r.seed == 4)
    assert _finite_eq(first.final_loss, best["final_loss"])


def _finite_eq(a, b):
    return a == b or (a is not None and b is not None and math.isclose(a, b, rel_tol=0))


def test_results_json_has_the_documented_schema(toy_all, tmp_path):
    paths = report.write(toy_all, tmp_path / "out")
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [p.rsplit("/", 1)[1] for p in paths] == list(report.FILES)
    assert data["schema"] == compare.SCHEMA
    assert set(data) == {"schema", "problem", "config", "environment", "tuning", "runs",
                         "summary"}
    assert set(data["problem"]) == {"name", "description", "loss", "hessian_is_fisher",
                                    "target_loss", "test_metric", "higher_is_better", "n_train",
                                    "n_test", "parameters", "batch_size"}
    assert data["problem"]["parameters"] == 2
    assert set(data["config"]) == {"methods", "iters", "time", "clock", "seeds", "tune",
                                   "device", "dtype", "overrides", "settings", "partial"}
    assert data["config"]["partial"] is False and data["config"]["seeds"] == [1]
    assert set(data["config"]["settings"]) == set(METHODS)
    for key in ("steepest", "python", "torch", "numpy", "platform", "machine", "cpu_count",
                "torch_threads", "load_average", "cuda_device", "started"):
        assert key in data["environment"]
    assert data["environment"]["torch"] == torch.__version__.split("+")[0] or \
        data["environment"]["torch"].startswith(torch.__version__[:4])
    run_keys = {"method", "label", "seed", "settings", "iterations", "wall_time", "final_loss",
                "best_loss", "test_metric", "time_to_target", "iters_to_target", "diverged",
                "error", "curve"}
    for run in data["runs"]:
        assert set(run) == run_keys
        assert set(run["curve"]) == {"iteration", "time", "loss", "test"}
        assert len({len(v) for v in run["curve"].values()}) == 1
        assert all(isinstance(v, float) for v in run["curve"]["loss"])
    assert set(data["summary"]) == {"judged", "budget", "seeds", "winner", "tied", "best_test",
                                    "best_test_tied", "first_to_target", "best_loss", "merged",
                                    "rows", "sentence"}
    row_keys = {"row", "label", "members", "reason", "reached", "seeds", "diverged",
                "time_to_target", "final_loss", "test_metric", "iterations", "wall_time"}
    for row in data["summary"]["rows"]:
        assert set(row) == row_keys
    for key in ("problem", "config", "tuning", "runs", "summary", *row_keys, *run_keys):
        assert key in compare.SCHEMA_DOC, key


def test_non_finite_values_become_null(tmp_path):
    result = compare.run("quadratic", methods=["sgd"], iters=200, seeds=1,
                         settings={"sgd": {"lr": 1e6}})
    report.write(result, tmp_path)
    text = (tmp_path / "results.json").read_text()

    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    run = json.loads(text, parse_constant=refuse)["runs"][0]
    assert run["diverged"] is True and run["final_loss"] is None
    assert run["curve"]["loss"][-1] is None
    assert math.isfinite(run["curve"]["loss"][0])


def test_the_report_and_plots_never_import_the_runner():
    """DESIGN.md: the data types sit in results.py, which the runner and the report import;
    the report (and its plots, and results) never import the runner."""
    import ast
    from pathlib import Path

    folder = Path(compare.__file__).parent
    for name in ("report.py", "plots.py", "results.py"):
        tree = ast.parse((folder / name).read_text())
        imported = {(node.module or "") for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom)}
        imported |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                     for a in node.names}
        assert not any("runner" in m for m in imported), (name, imported)
        if name == "results.py":
            assert not any(m.split(".")[0] in ("torch", "matplotlib") for m in imported)

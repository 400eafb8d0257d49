"""``steepest compare`` with the structured metrics of issue 10: ``kfac``, ``ekfac`` and
``diagonal`` as methods (settings, the metric each row builds, runs through ``compare.run``
and the command line)."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from steepest import (
    CG,
    EKFAC,
    GGN,
    KFAC,
    Auto,
    Diagonal,
    EmpiricalFisher,
    Fisher,
    GaussNewton,
    Hessian,
    LearningRate,
    LevenbergMarquardt,
    Optimizer,
    cli,
    compare,
)
from steepest.compare import METHOD_DEFAULTS, runner
from steepest.errors import ConfigurationError

pytestmark = pytest.mark.usefixtures("one_thread")

STRUCTURED = ("kfac", "ekfac", "diagonal")


def _metric(row: str, problem: str = "regression"):
    """The metric the optimizer of ``row`` is built with (settings as compare resolves them)."""
    prob = runner.get_problem(problem)
    rows = compare.parse_methods(row)
    s = compare.resolve_settings(prob, rows)[rows[0]]
    model = prob.make_model(0, torch.float64, "cpu")
    opt = runner._build(compare.base_method(rows[0]), s, model, prob.loss, torch.Generator())
    return opt.metric, s


def test_structured_methods_are_methods_with_labels_and_defaults():
    for m in STRUCTURED:
        assert m in compare.METHODS and m in compare.STEEPEST_METHODS
        assert m in compare.LABELS and m in METHOD_DEFAULTS
        assert m not in compare.TUNED  # LM adapts lambda; nothing to search
    assert compare.STEEPEST_METHODS == compare.ROW_METHODS + compare.STRUCTURED_METHODS
    assert compare.parse_methods("all")[: len(compare.STEEPEST_METHODS)] == list(
        compare.STEEPEST_METHODS
    )
    # the schedule defaults are the library's own, so compare follows KFAC's defaults
    sig = inspect.signature(KFAC.__init__).parameters
    for key in ("T_cov", "T_inv"):
        assert METHOD_DEFAULTS["kfac"][key] == sig[key].default
        assert METHOD_DEFAULTS["ekfac"][key] == sig[key].default
    assert METHOD_DEFAULTS["kfac"]["ema"] == (sig["ema"].default or 0.0)


def test_default_rows_build_the_papers_metrics():
    kfac, s = _metric("kfac")
    assert type(kfac) is KFAC and isinstance(kfac.base, Fisher)
    assert kfac.base.mc_samples == 1  # Martens & Grosse: one sampled label per input
    assert (kfac.T_cov, kfac.T_inv, kfac.damping, kfac.rescale) == (
        s["T_cov"],
        s["T_inv"],
        "exact",
        None,
    )
    ekfac, _ = _metric("ekfac")
    assert type(ekfac) is EKFAC and ekfac.base.mc_samples == 1
    diag, _ = _metric("diagonal")
    assert type(diag) is Diagonal and type(diag.base) is GGN and diag.power == 1.0
    assert diag.mc_samples is None


@pytest.mark.parametrize(
    "row, check",
    [
        ("kfac[base=ggn]", lambda m: type(m.base) is GGN),
        ("kfac[base=gauss-newton]", lambda m: type(m.base) is GaussNewton),
        ("kfac[base=empirical-fisher]", lambda m: type(m.base) is EmpiricalFisher),
        ("kfac[mc_samples=0]", lambda m: isinstance(m.base, Fisher) and m.base.mc_samples is None),
        ("kfac[mc_samples=3]", lambda m: m.base.mc_samples == 3),
        ("kfac[T_cov=5,T_inv=20,ema=0.95]", lambda m: (m.T_cov, m.T_inv, m.ema) == (5, 20, 0.95)),
        ("kfac[ema=0]", lambda m: m.ema is None),
        ("kfac[factored=true]", lambda m: m.damping == "factored"),
        ("kfac[rescale=alpha]", lambda m: m.rescale == "alpha"),
        ("ekfac[base=ggn,T_inv=3]", lambda m: type(m.base) is GGN and m.T_inv == 3),
        (
            "diagonal[base=empirical-fisher,power=0.5]",
            lambda m: type(m.base) is EmpiricalFisher and m.power == 0.5,
        ),
        ("diagonal[base=newton]", lambda m: type(m.base) is Hessian),
        ("diagonal[base=natural,mc_samples=2]", lambda m: m.base.mc_samples == 2),
        ("diagonal[probes=8]", lambda m: m.mc_samples == 8 and type(m.base) is GGN),
    ],
)
def test_variants_set_the_metric(row, check):
    metric, _ = _metric(row)
    assert check(metric), metric


@pytest.mark.parametrize(
    "row, match",
    [
        ("kfac[base=newton]", "kfac.base must be one of natural, ggn"),
        ("ekfac[base=gradient-covariance]", "ekfac.base must be one of"),
        ("diagonal[base=vanilla]", "diagonal.base must be one of"),
        ("kfac[solver=woodbury]", "no sample-space factor"),
        ("diagonal[solver=woodbury]", "no sample-space factor"),
        ("kfac[T_cov=0]", "T_cov must be a positive integer"),
        ("kfac[T_inv=2.5]", "integer"),
        ("kfac[ema=1]", "ema must be None or in"),
        ("kfac[rescale=beta]", "one of none, alpha, momentum"),
        ("ekfac[factored=true]", "unknown setting ekfac.factored"),
        ("diagonal[power=0]", "power must be a finite number > 0"),
        ("diagonal[T_cov=2]", "unknown setting diagonal.T_cov"),
    ],
)
def test_bad_structured_settings_are_refused_before_running(row, match):
    prob = runner.get_problem("regression")
    with pytest.raises(ConfigurationError, match=match):
        compare.resolve_settings(prob, compare.parse_methods(row))


def test_problem_defaults_and_overrides_layer_for_the_new_methods():
    prob = runner.get_problem("digits")
    rows = ["diagonal", "diagonal[base=ggn]", "kfac"]
    s = compare.resolve_settings(prob, rows, {"kfac": {"damping": "0.1", "T_inv": "7"}})
    assert s["diagonal"]["base"] == "empirical-fisher"  # the problem's default
    assert s["diagonal[base=ggn]"]["base"] == "ggn"  # the variant wins
    assert s["kfac"]["damping"] == 0.1 and s["kfac"]["T_inv"] == 7


def test_a_compare_row_is_the_optimizer_a_user_would_build():
    """The kfac row of compare.run takes the iterates of Optimizer(model, loss, KFAC(...),
    LevenbergMarquardt(...)) built by hand with the same seed: compare adds nothing."""
    result = compare.run(
        "regression",
        methods="kfac[T_cov=2,T_inv=3,ema=0.9,damping=0.01]",
        iters=6,
        seeds=1,
        seed=4,
        tune=False,
    )
    (run,) = result.runs
    prob = runner.get_problem("regression")
    model = prob.make_model(4, torch.float64, "cpu")
    x, y = prob.train
    opt = Optimizer(
        model,
        prob.loss,
        metric=KFAC(base=Fisher(mc_samples=1), T_cov=2, T_inv=3, ema=0.9),
        damping=LevenbergMarquardt(init=0.01),
        step=LearningRate(1.0),
        solver=Auto(cg=CG(tol=1e-8)),
        generator=torch.Generator().manual_seed(4),
    )

    def loss() -> float:
        with torch.no_grad():
            return float(prob.loss.value(model(x), y).mean())

    losses = [loss()]
    for _ in range(6):
        opt.step(x, y)
        losses.append(loss())
    assert run.curve["loss"] == pytest.approx(losses, rel=1e-12, abs=0)


def test_structured_rows_train_and_never_raise_the_loss():
    result = compare.run(
        "regression",
        methods="kfac,ekfac,diagonal,diagonal[base=empirical-fisher,power=0.5]",
        iters=8,
        seeds=2,
        tune=False,
    )
    assert result.rows() == [
        "kfac",
        "ekfac",
        "diagonal",
        "diagonal[base=empirical-fisher,power=0.5]",
    ]
    for r in result.runs:
        assert not r.diverged and r.iterations == 8, (r.method, r.error)
        loss = r.curve["loss"]
        assert loss[-1] < loss[0]
        # Levenberg-Marquardt rejects a step that raises the loss
        assert all(b <= a + 1e-12 for a, b in zip(loss, loss[1:])), r.method
    # K-FAC is a curvature method: a large decrease in 8 steps (to 0.04-0.07 of the start at
    # T_cov = T_inv = 1, to 0.37-0.40 at T_cov = 10, T_inv = 100, ema = 0.95: measured)
    kfac = [r for r in result.runs if r.method == "kfac"]
    assert all(r.final_loss < 0.6 * r.curve["loss"][0] for r in kfac)


def test_structured_rows_on_mini_batches_and_a_cnn_free_classifier():
    """The mini-batch problem (constant damping, the problem's defaults) and a classifier."""
    result = compare.run("quadratic-noisy", methods="kfac,diagonal", iters=5, seeds=1, tune=False)
    for r in result.runs:
        assert r.settings["adaptive_damping"] is False and not r.diverged
    result = compare.run("logistic", methods="ekfac,kfac[base=ggn]", iters=5, seeds=1, tune=False)
    for r in result.runs:
        assert not r.diverged and r.final_loss < r.curve["loss"][0]
        assert r.test_metric is not None


def test_cli_runs_the_structured_rows(tmp_path, capsys):
    out = tmp_path / "out"
    methods = "kfac,ekfac[T_cov=2],diagonal[base=empirical-fisher,power=0.5],adam"
    rc = cli.main(
        [
            "compare",
            "--problem",
            "regression",
            "--methods",
            methods,
            "--iters",
            "3",
            "--seeds",
            "1",
            "--no-tune",
            "--out",
            str(out),
            "--quiet",
            "--set",
            "kfac.damping=0.01",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    data = json.loads((out / "results.json").read_text())
    assert data["config"]["methods"] == compare.parse_methods(methods)
    settings = data["config"]["settings"]
    assert settings["kfac"]["damping"] == 0.01 and settings["kfac"]["base"] == "natural"
    assert settings["ekfac[T_cov=2]"]["T_cov"] == 2
    assert settings["diagonal[base=empirical-fisher,power=0.5]"]["power"] == 0.5
    for run in data["runs"]:
        assert run["iterations"] == 3 and not run["diverged"], run["error"]
    assert "K-FAC" in (out / "report.html").read_text()


def test_cli_refuses_a_bad_structured_setting_in_one_line(tmp_path, capsys):
    rc = cli.main(
        [
            "compare",
            "--methods",
            "kfac[solver=woodbury]",
            "--iters",
            "2",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "kfac.solver" in err and "own inverse" in err
    assert not (tmp_path / "o").exists()


def test_help_and_problem_defaults_list_the_new_methods(capsys):
    with pytest.raises(SystemExit):
        cli.main(["compare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for m in STRUCTURED:
        assert m in text
    assert "kfac[T_cov=10]" in text
    assert cli.main(["problems", "--defaults"]) == 0
    out = capsys.readouterr().out
    assert "kfac: damping=" in out and "T_cov=" in out and "diagonal: base=empirical-fisher" in out

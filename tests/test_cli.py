"""The ``steepest`` command line: compare end to end, geometry, problems, and bad options."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from html.parser import HTMLParser

import pytest
import torch

from steepest import cli, compare, problems

pytestmark = pytest.mark.usefixtures("one_thread")


def call(argv: list[str]) -> int:
    """``cli.main`` as the console script runs it: the exit status, also for argparse exits."""
    try:
        return cli.main(argv)
    except SystemExit as stop:
        return int(stop.code or 0)


# each problem end to end, every method covered at least once across the cases
CASES = [
    ("quadratic", "vanilla,newton,lbfgs"),
    ("quadratic-noisy", "sgd,gauss-newton"),
    ("toy2d", "all"),
    ("logistic", "natural,empirical-fisher,adam"),
    ("digits", "ggn,gradient-covariance,sgd"),
    ("regression", "gauss-newton,adam,lbfgs"),
    ("heteroscedastic", "natural,newton,vanilla"),
    ("autoencoder", "gauss-newton,adam"),
]


@pytest.mark.parametrize("problem, methods", CASES)
def test_compare_end_to_end(problem, methods, tmp_path, capsys):
    out = tmp_path / "out"
    rc = call(["compare", "--problem", problem, "--methods", methods, "--iters", "2",
               "--seeds", "1", "--no-tune", "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.out == "" and captured.err == ""  # --quiet
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["results.json", "loss_vs_iterations.png", "loss_vs_time.png", "report.html"])
    for p in out.iterdir():
        assert p.stat().st_size > 0
    for png in ("loss_vs_iterations.png", "loss_vs_time.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "results.json").read_text())
    assert data["schema"] == compare.SCHEMA and data["problem"]["name"] == problem
    assert data["config"]["methods"] == compare.parse_methods(methods)
    assert data["config"]["iters"] == 2
    for run in data["runs"]:
        assert run["iterations"] == 2 or run["diverged"], run
        assert len(run["curve"]["loss"]) == run["iterations"] + 1
    # no temporary directory left next to the output
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_report_html_opens_with_the_answer(tmp_path, capsys):
    out = tmp_path / "rep"
    rc = call(["compare", "--problem", "toy2d", "--methods", "natural,vanilla", "--iters", "12",
               "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    data = json.loads((out / "results.json").read_text())
    sentence = data["summary"]["sentence"]
    assert data["summary"]["first_to_target"] == "natural"
    page = (out / "report.html").read_text()
    body = page.split("<body>", 1)[1].lstrip()
    assert body.startswith(f'<p class="answer">{sentence}</p>')
    # plots embedded, nothing external
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 2
    assert all(base64.b64decode(img)[:4] == b"\x89PNG" for img in images)
    assert "http://" not in page and "https://" not in page
    # the terminal table and the answer are printed without --quiet
    printed = " ".join(captured.out.split())
    for column in ("final train loss", "iterations", "step time", "time to target",
                   "reached", "diverged"):
        assert column.split()[0] in printed
    assert "not reached" in printed  # vanilla does not reach the target in 12 steps
    assert " ".join(sentence.split()) in printed


def test_compare_writes_into_an_existing_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    rc = call(["compare", "--problem", "toy2d", "--methods", "ggn", "--iters", "1",
               "--out", str(tmp_path), "--quiet", "--set", "ggn.damping=0.1"])
    assert rc == 0
    assert (tmp_path / "keep.txt").read_text() == "mine"
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["keep.txt", "results.json", "loss_vs_iterations.png",
                            "loss_vs_time.png", "report.html"])
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["config"]["overrides"] == {"ggn": {"damping": "0.1"}}
    assert data["runs"][0]["settings"]["damping"] == 0.1


def test_time_budget_from_the_command_line(tmp_path):
    rc = call(["compare", "--problem", "toy2d", "--methods", "adam", "--time", "0.05",
               "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == 0
    data = json.loads((tmp_path / "o" / "results.json").read_text())
    assert data["config"]["time"] == 0.05 and data["config"]["iters"] is None
    assert data["runs"][0]["iterations"] >= 1


@pytest.mark.parametrize("argv, message", [
    (["--problem", "nope"], "unknown problem 'nope'"),
    (["--methods", "vanilla,bfgs"], "unknown method 'bfgs'"),
    (["--iters", "-3"], "--iters: must be positive"),
    (["--iters", "0"], "--iters: must be positive"),
    (["--time", "-1"], "--time: must be positive"),
    (["--iters", "2", "--time", "1"], "not allowed with argument"),
    (["--set", "natural.nonsense=1", "--methods", "natural"], "unknown setting natural."),
    (["--set", "natural.damping=x", "--methods", "natural"], "finite number"),
    (["--set", "damping=1"], "METHOD.KEY=VALUE"),
    (["--dtype", "float16"], "invalid choice"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--problem", "missing_file.py:make_problem"], "does not exist"),
])
def test_bad_options_give_one_line_and_write_nothing(argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    rc = call(["compare", *argv, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc != 0
    assert err.count("\n") == 1 and err.startswith("steepest"), err
    assert message in err
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_machine_without_it(tmp_path, capsys):
    rc = call(["compare", "--device", "cuda", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "CUDA" in err
    assert list(tmp_path.iterdir()) == []


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    rc = call(["compare", "--problem", "toy2d", "--iters", "1", "--out", str(target)])
    assert rc == 2 and "not a directory" in capsys.readouterr().err
    assert target.read_text() == "x" and len(list(tmp_path.iterdir())) == 1


def test_problems_lists_one_line_each(capsys):
    assert call(["problems"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == problems.names()
    assert call(["problems", "--defaults"]) == 0
    text = capsys.readouterr().out
    assert "global defaults" in text and "natural: damping=0.001" in text


def test_geometry_draws_a_png(tmp_path, capsys):
    out = tmp_path / "geo.png"
    assert call(["geometry", "--problem", "toy2d", "--at", "0.5,-1", "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG" and out.stat().st_size > 10_000
    assert str(out) in capsys.readouterr().out
    rc = call(["geometry", "--problem", "regression", "--out", str(tmp_path / "r.png")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "exactly two parameters" in err
    assert call(["geometry", "--at", "1,2,3", "--out", str(tmp_path / "x.png")]) == 2
    assert "two numbers" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["geo.png"]


@pytest.mark.parametrize("argv", [[], ["compare"], ["geometry"], ["problems"]])
def test_help_everywhere(argv, capsys):
    assert call([*argv, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: steepest")
    if argv == ["compare"]:
        for option in ("--problem", "--methods", "--iters", "--time", "--seed", "--seeds",
                       "--no-tune", "--device", "--dtype", "--out", "--set", "--quiet"):
            assert option in out


def test_no_command_is_an_error(capsys):
    assert call([]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_module_entry_point():
    proc = subprocess.run([sys.executable, "-m", "steepest.cli", "problems"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and "regression" in proc.stdout


# ---------------------------------------------------------------------------- issue 9: the CLI
def _refuse_to_compute(monkeypatch):
    """Make any computation fail loudly: a refusal must come before it."""
    def boom(*args, **kwargs):
        raise AssertionError("computed before the output path was checked")

    monkeypatch.setattr(compare, "execute", boom)


@pytest.mark.parametrize("command", ["compare", "geometry"])
def test_out_under_a_file_is_refused_before_computing(command, tmp_path, capsys, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    _refuse_to_compute(monkeypatch)
    from steepest import geometry

    monkeypatch.setattr(geometry, "compute", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("computed before the output path was checked")))
    out = afile / ("sub" if command == "compare" else "g.png")
    rc = call([command, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "is a file" in err, err
    assert afile.read_text() == "x" and [p.name for p in tmp_path.iterdir()] == ["afile"]


PROBLEM_FILES = {
    "syntax": ("def make(:\n    pass\n", "SyntaxError at line 1"),
    "import": ("import no_such_module_for_steepest\n", "ModuleNotFoundError"),
    "raises": ("def make():\n    raise RuntimeError('bad data')\n", "RuntimeError: bad data"),
    "type": ("def make():\n    return 42\n", "returned int, not a steepest.problems.Problem"),
    "fields": ("from steepest.problems import Problem\ndef make():\n    return Problem('p')\n",
               "TypeError"),
}


@pytest.mark.parametrize("case", sorted(PROBLEM_FILES))
def test_a_broken_problem_file_is_one_line_and_exit_2(case, tmp_path, capsys):
    text, message = PROBLEM_FILES[case]
    path = tmp_path / f"broken_{case}.py"
    path.write_text(text)
    rc = call(["compare", "--problem", f"{path}:make", "--iters", "1",
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("steepest: error:"), err
    assert message in err
    assert not (tmp_path / "out").exists()


def test_geometry_with_an_absurd_epsilon_is_refused(tmp_path, capsys):
    rc = call(["geometry", "--eps", "1e300", "--out", str(tmp_path / "g.png")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "smaller --eps" in err, err
    rc = call(["geometry", "--radius", "1e300", "--out", str(tmp_path / "g.png")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "smaller --radius" in err, err
    assert list(tmp_path.iterdir()) == []


BROADCASTING_PROBLEM = """
import torch
from steepest.losses import MSE
from steepest.problems import Problem
from steepest.problems.builtin import mlp

def make():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 2, generator=g, dtype=torch.float64)
    y = x.sum(1, keepdim=True)                       # (N, 1) targets, (N, 3) outputs
    return Problem("bcast", "outputs that broadcast against the targets",
                   lambda seed, dtype, device: mlp([2, 4, 3], seed, dtype, device),
                   MSE(), (x, y), target_loss=1e-3)
"""


def test_a_problem_whose_loss_would_broadcast_is_refused_up_front(tmp_path, capsys,
                                                                   monkeypatch):
    path = tmp_path / "bcast.py"
    path.write_text(BROADCASTING_PROBLEM)
    _refuse_to_compute(monkeypatch)
    rc = call(["compare", "--problem", f"{path}:make", "--methods", "adam,ggn", "--iters", "2",
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert "problem 'bcast' (train data)" in err and "(40, 3)" in err and "(40, 1)" in err
    assert not (tmp_path / "out").exists()


def test_interrupt_keeps_the_finished_runs_marked_partial(tmp_path, capsys, monkeypatch):
    from steepest.compare import runner

    real = runner._run_one

    def run_one(problem, method, *args, **kwargs):
        if method == "adam":
            raise KeyboardInterrupt
        return real(problem, method, *args, **kwargs)

    monkeypatch.setattr(runner, "_run_one", run_one)
    out = tmp_path / "out"
    rc = call(["compare", "--problem", "toy2d", "--methods", "vanilla,natural,adam",
               "--iters", "2", "--seeds", "2", "--no-tune", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 130 and "interrupted" in err and "partial" in err
    data = json.loads((out / "results.json").read_text())
    assert data["config"]["partial"] is True
    # seed by seed: seed 0's vanilla and natural finished before Adam was interrupted
    assert [(r["method"], r["seed"]) for r in data["runs"]] == [("vanilla", 0), ("natural", 0)]
    assert data["summary"]["sentence"].startswith("Interrupted: partial results, 2 of 6")
    assert "Interrupted: partial results" in (out / "report.html").read_text()


def test_a_new_out_directory_gets_the_ordinary_mode(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        out = tmp_path / "new" / "out"
        assert call(["compare", "--problem", "toy2d", "--methods", "adam", "--iters", "1",
                     "--out", str(out), "--quiet"]) == 0
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == 0o755
    assert ((tmp_path / "new").stat().st_mode & 0o777) == 0o755


def test_the_largest_seed_runs(tmp_path):
    out = tmp_path / "out"
    rc = call(["compare", "--problem", "quadratic-noisy", "--methods", "sgd,ggn", "--iters", "2",
               "--seed", str(2**64 - 1), "--out", str(out), "--quiet"])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    assert not any(r["diverged"] for r in data["runs"])
    assert call(["compare", "--seed", str(2**64), "--out", str(out)]) == 2


class _Page(HTMLParser):
    """Parses a page strictly enough for a test: balanced tags (void elements aside), the
    images' sources and the text of the answer paragraph."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.images: list[dict[str, str]] = []
        self.answer: list[str] = []
        self.text: list[str] = []
        self._in_answer = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        if tag not in self.VOID:
            self.stack.append(tag)
        if tag == "p" and attrs.get("class") == "answer":
            self._in_answer = True

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, (tag, self.stack[-5:])
        self.stack.pop()
        if tag == "p":
            self._in_answer = False

    def handle_data(self, data):
        self.text.append(data)
        if self._in_answer:
            self.answer.append(data)


def test_report_html_parses_with_every_image_embedded(tmp_path):
    out = tmp_path / "rep"
    assert call(["compare", "--problem", "regression", "--methods",
                 "ggn,natural,adam,ggn[damping=0.1]", "--iters", "8", "--seeds", "2",
                 "--out", str(out), "--quiet"]) == 0
    data = json.loads((out / "results.json").read_text())
    page = _Page()
    page.feed((out / "report.html").read_text(encoding="utf-8"))
    page.close()
    assert page.stack == []  # every element closed
    assert " ".join("".join(page.answer).split()) == " ".join(
        data["summary"]["sentence"].split())
    assert len(page.images) == 2
    for img in page.images:
        assert img["src"].startswith("data:image/png;base64,") and img.get("alt")
        assert base64.b64decode(img["src"].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    text = " ".join(" ".join(page.text).split())
    # how it was judged, the merged rows with their reason, the learning-rate search
    assert "Judged on the" in text and "Methods are tied when" in text
    assert "GGN = natural gradient" in text or "natural gradient = GGN" in text
    assert "Martens 002 section 9.2" in text
    assert "Learning-rate search" in text and "adam" in text
    assert "GGN [damping=0.1]" in text
    assert len(data["runs"]) == 8 and {r["seed"] for r in data["runs"]} == {0, 1}

"""The scripts in examples/ run and do what their docstrings say."""

from __future__ import annotations

import runpy
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

pytestmark = pytest.mark.usefixtures("one_thread")


def test_training_loop_trains_and_resumes(capsys):
    runpy.run_path(str(EXAMPLES / "training_loop.py"), run_name="__main__")
    out = capsys.readouterr().out
    losses = [float(line.split()[3]) for line in out.splitlines() if line.startswith("epoch")]
    assert len(losses) == 4 and max(losses) < 0.01  # sin(2x) + 5% noise: noise floor 1.25e-3
    assert "resumed at lr 0.25 after 80 steps" in out


def test_least_squares_matches_minpack_where_plain_lm_stalls(capsys):
    g = runpy.run_path(str(EXAMPLES / "least_squares.py"), run_name="__main__")
    result = g["result"]
    assert result["agreement"] < 1e-8  # MoreTrustRegion == scipy's lm (MINPACK)
    assert np.max(np.abs(result["lm"] - result["scipy"]) / np.abs(result["scipy"])) > 1
    assert "MoreTrustRegion" in capsys.readouterr().out


def test_dose_response_batch_matches_scipy_curve_by_curve(capsys):
    g = runpy.run_path(str(EXAMPLES / "dose_response.py"), run_name="__main__")
    result = g["result"]
    assert result["success"] == 1000
    assert np.abs(result["cost_rel_diff"]).max() < 1e-6  # the bounded minima are scipy's
    assert result["ec50_rel_err_median"] < 0.1
    assert "1000 curves in" in capsys.readouterr().out

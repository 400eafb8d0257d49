r"""The figures of ``steepest compare``: per row the median over the seeds as a line and the
range (min to max) as a band, on a common grid.

- :func:`plot_time`: the training loss (log) against step time (log) and, beside it, the test
  metric against step time; the target loss as a dotted line.
- :func:`plot_iterations`: the training loss (log) against iterations.

Each seed's curve is a step function (its value holds until the next recorded point; after its
last point the seed no longer counts); the grid is log-spaced in time. Rows merged because
their trajectories coincide are drawn once, labelled ``A = B``. The y limits come from the
data: the lowest band value to the highest starting loss (a diverging run is clipped there).

Example
-------
>>> plot_time(result, "loss_vs_time.png")
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from .results import Comparison, Run

GRID = 200  # points of the common grid


def _series(runs: Sequence[Run], x: str, y: str, shift: float) -> list[tuple[list, list]]:
    out = []
    for r in runs:
        pts = [(a, b - shift) for a, b in zip(r.curve[x], r.curve[y]) if b is not None]
        if pts:
            out.append(([p[0] for p in pts], [p[1] for p in pts]))
    return out


def band(
    series: Sequence[tuple[Sequence[float], Sequence[float]]], grid: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Median, min and max over the seeds' step-function curves ``(xs, ys)`` at ``grid``
    (NaN where fewer than half the seeds have a value: before their first or after their
    last point).

    >>> band([([0, 1], [3.0, 1.0]), ([0, 2], [5.0, 2.0])], np.array([0.5, 1.5]))
    """
    vals = np.full((len(series), grid.size), np.nan)
    for i, (xs, ys) in enumerate(series):
        xs_a, ys_a = np.asarray(xs, float), np.asarray(ys, float)
        idx = np.searchsorted(xs_a, grid, side="right") - 1
        ok = (idx >= 0) & (grid <= xs_a[-1])
        vals[i, ok] = ys_a[idx[ok]]
    # where fewer than half the seeds still run, the median would follow the survivors only
    few = np.sum(~np.isnan(vals), 0) < max(1, math.ceil(len(series) / 2))
    vals[:, few] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(vals, 0), np.nanmin(vals, 0), np.nanmax(vals, 0)


def _groups(result: Comparison) -> list[tuple[str, list[Run], bool]]:
    """(label, runs of the row drawn, diverged on some seed) per row of the summary."""
    rows = result.summary.get("rows") or [
        {"row": r, "label": r, "members": [r]} for r in result.rows()
    ]
    out = []
    for t in rows:
        runs = [r for r in result.runs if r.method == t["row"]]
        out.append((t["label"], runs, any(r.diverged for r in runs)))
    return out


def _shift(result: Comparison) -> tuple[float, str]:
    values = [v for r in result.runs for v in r.curve["loss"] if v is not None]
    if values and min(values) <= 0:
        spread = max(values) - min(values)
        shift = min(values) - max(1e-3 * spread, 1e-8)
        return shift, f"training loss - ({shift:.4g})"
    return 0.0, "training loss"


def _draw(
    ax: Any, result: Comparison, x: str, y: str, shift: float, log_x: bool, log_y: bool
) -> None:
    groups = _groups(result)
    all_x = [v for _, runs, _ in groups for r in runs for v in r.curve[x]]
    if log_x:
        pos = [v for v in all_x if v > 0]
        lo, hi = (min(pos), max(pos)) if pos else (1e-3, 1.0)
        grid = np.geomspace(lo, max(hi, lo * 1.0001), GRID)
    else:
        grid = np.linspace(0, max(all_x, default=1), GRID)
    starts, lows = [], []
    for k, (lab, runs, diverged) in enumerate(groups):
        series = _series(runs, x, y, shift)
        if not series:
            continue
        med, lo_b, hi_b = band(series, grid)
        ok = ~np.isnan(med)
        starts.extend(s[1][0] for s in series)
        if ok.any():
            lows.append(float(np.nanmin(lo_b[ok])))
        color, style = f"C{k % 10}", "-" if k < 10 else "--"
        name = lab + (" (diverged on a seed)" if diverged else "")
        ax.plot(grid[ok], med[ok], style, color=color, lw=1.6, label=name)
        ax.fill_between(grid[ok], lo_b[ok], hi_b[ok], color=color, alpha=0.18, lw=0)
    if log_x:
        ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    finite_starts = [s for s in starts if math.isfinite(s)]
    positive_lows = [v for v in lows if v > 0 and math.isfinite(v)]
    if log_y and finite_starts and positive_lows:
        top = max(finite_starts) * 1.5
        ax.set_ylim(min(positive_lows) * 0.7, top)
    elif finite_starts and lows:
        span = max(finite_starts) - min(lows)
        ax.set_ylim(min(lows) - 0.05 * span, max(finite_starts) + 0.05 * span + 1e-12)
    ax.grid(True, which="both", alpha=0.3)


def _figure(ncols: int) -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(6.5 * ncols, 4.6), dpi=100)


def _target(ax: Any, result: Comparison, shift: float) -> None:
    target = result.problem.get("target_loss")
    if target is not None and target - shift > 0:
        ax.axhline(target - shift, color="k", ls=":", lw=1, label="target loss")


def _title(result: Comparison) -> str:
    k = len(result.config.get("seeds") or [0])
    return f"{result.problem['name']}: median over {k} seed{'s' if k != 1 else ''}, band min-max"


def plot_time(result: Comparison, path: str | os.PathLike) -> None:
    """Training loss against step time (log-log) and, when the problem has one, the test
    metric against step time beside it; written to ``path`` (PNG)."""
    has_test = result.problem.get("test_metric") is not None and any(
        v is not None for r in result.runs for v in r.curve.get("test", [])
    )
    fig = _figure(2 if has_test else 1)
    shift, ylabel = _shift(result)
    ax = fig.add_subplot(1, 2 if has_test else 1, 1)
    _draw(ax, result, "time", "loss", shift, log_x=True, log_y=True)
    _target(ax, result, shift)
    ax.set_xlabel("step time (s, log)")
    ax.set_ylabel(ylabel)
    ax.set_title(_title(result), fontsize=9)
    ax.legend(fontsize=7, loc="best")
    if has_test:
        ax2 = fig.add_subplot(1, 2, 2)
        _draw(ax2, result, "time", "test", 0.0, log_x=True, log_y=False)
        ax2.set_xlabel("step time (s, log)")
        ax2.set_ylabel(result.problem["test_metric"])
        better = "higher" if result.problem.get("higher_is_better") else "lower"
        ax2.set_title(f"{result.problem['test_metric']} ({better} is better)", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.fspath(path), format="png")


def plot_iterations(result: Comparison, path: str | os.PathLike) -> None:
    """Training loss (log) against iterations (log); written to ``path`` (PNG)."""
    fig = _figure(1)
    shift, ylabel = _shift(result)
    ax = fig.add_subplot(1, 1, 1)
    _draw(ax, result, "iteration", "loss", shift, log_x=True, log_y=True)
    _target(ax, result, shift)
    ax.set_xlabel("iteration (log)")
    ax.set_ylabel(ylabel)
    ax.set_title(_title(result), fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(os.fspath(path), format="png")


__all__ = ["band", "plot_iterations", "plot_time"]

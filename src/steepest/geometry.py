r"""``steepest geometry``: Figure 1 of 000 for a real two-parameter model.

At one point :math:`\theta` of a problem with two parameters, draw the contours of the
training loss, and for each metric M of Table 1 the trust region
:math:`\{\delta: \delta^T M \delta \le \epsilon^2\}` as an ellipse around :math:`\theta` and
the solution of problem (1),
:math:`\delta = -\epsilon\, M^{-1} g / \sqrt{g^T M^{-1} g}` (Appendix A), which lies on the
ellipse where it touches the lowest level line of the linear model :math:`g^T\delta`.

The ellipses of different metrics have different units, so by default each metric's epsilon is
chosen to make the longest axis of its ellipse equal to ``radius`` (directions and shapes
compare; the legend gives each epsilon); ``eps=`` uses one epsilon for all. An indefinite
Hessian has no ellipse: its absolute value :math:`|H|` (eigenvalues made positive) is drawn
and the legend says so.

Example
-------
>>> geom = compute("toy2d", theta=torch.tensor([0.5, -1.0]))
>>> geom.steps["natural"]          # the natural-gradient step delta at theta
>>> draw(geom, "geometry.png")
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .errors import ConfigurationError
from .metrics import (
    GGN,
    EmpiricalFisher,
    Fisher,
    GaussNewton,
    GradientCovariance,
    Hessian,
    Identity,
    Metric,
)
from .params import ParamSpace
from .point import Point, evaluate
from .problems import Problem
from .problems import get as get_problem

#: method name -> (label, metric) drawn by :func:`compute`
GEOMETRY_METRICS: dict[str, tuple[str, Metric]] = {
    "vanilla": ("vanilla, M = I", Identity()),
    "gauss-newton": ("Gauss-Newton, E[J^T J]", GaussNewton()),
    "natural": ("natural, Fisher E[J^T F_R J]", Fisher()),
    "empirical-fisher": ("empirical Fisher", EmpiricalFisher()),
    "gradient-covariance": ("gradient covariance (centered)", GradientCovariance(centered=True)),
    "newton": ("Newton, H", Hessian()),
    "ggn": ("GGN, E[J^T H_L J]", GGN()),
}


@dataclass
class Geometry:
    """Everything drawn: the point, the gradient, per metric the 2x2 matrix M used, its
    epsilon and the step delta, and the loss on a grid (``xs``, ``ys``, ``loss[j, i]`` at
    ``(xs[i], ys[j])``)."""

    problem: str
    names: tuple[str, str]
    theta: Tensor
    loss: float
    grad: Tensor
    matrices: dict[str, Tensor] = field(default_factory=dict)
    eps: dict[str, float] = field(default_factory=dict)
    steps: dict[str, Tensor] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    xs: Tensor | None = None
    ys: Tensor | None = None
    grid: Tensor | None = None


def _psd(m: Tensor) -> tuple[Tensor, str]:
    m = 0.5 * (m + m.T)
    w, v = torch.linalg.eigh(m)
    if w.min() > 1e-12 * max(float(w.abs().max()), 1e-300):
        return m, ""
    floor = max(float(w.abs().max()) * 1e-6, 1e-12)
    note = "indefinite: |M| drawn" if w.min() < 0 else "singular: floored"
    return v @ torch.diag(w.abs().clamp_min(floor)) @ v.T, note


def compute(problem: str | Problem, theta: Tensor | None = None, seed: int = 0,
            eps: float | None = None, radius: float = 1.0, grid: int = 81,
            methods: list[str] | None = None) -> Geometry:
    """The geometry at ``theta`` (default: the model's initial weights for ``seed``) of a
    problem with exactly two trainable parameters, in float64 on the CPU."""
    prob = get_problem(problem)
    if not (radius > 0 and math.isfinite(radius)):
        raise ConfigurationError(f"radius must be a positive number, got {radius!r}.")
    if eps is not None and not (eps > 0 and math.isfinite(eps)):
        raise ConfigurationError(f"eps must be a positive number, got {eps!r}.")
    if grid < 5:
        raise ConfigurationError(f"grid must be at least 5 points a side, got {grid}.")
    methods = list(GEOMETRY_METRICS) if methods is None else methods
    unknown = [m for m in methods if m not in GEOMETRY_METRICS]
    if unknown:
        raise ConfigurationError(f"unknown method {unknown[0]!r} for geometry; choose from "
                                 f"{', '.join(GEOMETRY_METRICS)}.")
    dtype = torch.float64
    model = prob.make_model(seed, dtype, "cpu")
    space = ParamSpace(model)
    if space.size != 2:
        two = [p for p in ("toy2d",)]
        raise ConfigurationError(
            f"geometry draws problems with exactly two parameters; {prob.name!r} has "
            f"{space.size}. Use a two-parameter problem such as {', '.join(two)}."
        )
    if theta is not None:
        theta = torch.as_tensor(theta, dtype=dtype).reshape(-1)
        if theta.numel() != 2 or not torch.isfinite(theta).all():
            raise ConfigurationError(f"theta must be two finite numbers, got {theta.tolist()}.")
        space.set(theta)
    x, y = prob.data(dtype, "cpu")  # type: ignore[misc]
    point = Point(space, prob.loss, x, y)
    g = point.grad.detach()
    names = tuple(space.names)
    geom = Geometry(prob.name, (names[0], names[1]), point.theta.detach().clone(), point.value, g)
    for name in methods:
        _, metric = GEOMETRY_METRICS[name]
        m_raw = metric.operator(point).to_dense().detach()
        m, note = _psd(m_raw)
        w = torch.linalg.eigvalsh(m)
        e = eps if eps is not None else radius * math.sqrt(float(w.min()))
        minv_g = torch.linalg.solve(m, g)
        gmg = float(g @ minv_g)
        delta = -e * minv_g / math.sqrt(gmg) if gmg > 0 else torch.zeros_like(g)
        geom.matrices[name], geom.eps[name], geom.steps[name] = m, e, delta
        if note:
            geom.notes[name] = note
    span = 1.5 * radius
    if eps is not None:
        span = 1.5 * max(max(float(s.norm()) for s in geom.steps.values()), 1e-12)
    if not math.isfinite(span) or span > 1e100:
        what = f"eps={eps:g}" if eps is not None else f"radius={radius:g}"
        fix = ("a smaller --eps, or none (each metric's epsilon scaled to --radius)"
               if eps is not None else "a smaller --radius")
        raise ConfigurationError(
            f"{what} gives steps of length {span / 1.5:.3g}: far too long to draw; pass {fix}."
        )
    xs = torch.linspace(-span, span, grid, dtype=dtype) + geom.theta[0]
    ys = torch.linspace(-span, span, grid, dtype=dtype) + geom.theta[1]
    values = torch.empty(grid, grid, dtype=dtype)
    for j, b in enumerate(ys):
        for i, a in enumerate(xs):
            values[j, i] = evaluate(space, prob.loss, x, y, torch.stack([a, b]))[0]
    finite = values[torch.isfinite(values)]
    if finite.numel() < 2 or float(finite.max()) == float(finite.min()):
        raise ConfigurationError(
            f"the loss is not finite (or is constant) on the square of half-width {span:.3g} "
            f"around theta, so no contour can be drawn; pass a smaller "
            f"{'--eps' if eps is not None else '--radius'}."
        )
    geom.xs, geom.ys, geom.grid = xs, ys, values
    return geom


def draw(geom: Geometry, path: str | os.PathLike) -> str:
    """Draw ``geom`` to a PNG at ``path`` (written to a temporary file, then moved)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 6.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    assert geom.xs is not None and geom.ys is not None and geom.grid is not None
    vals = geom.grid.numpy()
    finite = vals[torch.isfinite(geom.grid).numpy()]
    levels = sorted(set(torch.quantile(torch.as_tensor(finite), torch.linspace(0.02, 0.98, 14,
                    dtype=torch.float64)).tolist()))
    cs = ax.contour(geom.xs.numpy(), geom.ys.numpy(), vals, levels=levels, colors="0.6",
                    linewidths=0.8)
    ax.clabel(cs, fontsize=6, fmt="%.3g")
    t = geom.theta.numpy()
    ax.plot([t[0]], [t[1]], "ko", ms=5)
    angles = torch.linspace(0, 2 * math.pi, 200, dtype=torch.float64)
    circle = torch.stack([angles.cos(), angles.sin()])
    for k, (name, m) in enumerate(geom.matrices.items()):
        label, _ = GEOMETRY_METRICS[name]
        w, v = torch.linalg.eigh(m)
        ell = v @ torch.diag(geom.eps[name] / w.sqrt()) @ circle  # {delta: delta^T M delta = eps^2}
        color = f"C{k % 10}"
        ax.plot(t[0] + ell[0].numpy(), t[1] + ell[1].numpy(), color=color, lw=1.2, alpha=0.8)
        d = geom.steps[name].numpy()
        extra = f", {geom.notes[name]}" if name in geom.notes else ""
        ax.annotate("", xy=(t[0] + d[0], t[1] + d[1]), xytext=(t[0], t[1]),
                    arrowprops={"arrowstyle": "->", "color": color, "lw": 1.8})
        ax.plot([], [], color=color, label=f"{label} (eps={geom.eps[name]:.3g}{extra})")
    ax.set_xlabel(geom.names[0])
    ax.set_ylabel(geom.names[1])
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_title(f"{geom.problem}: loss contours, trust regions delta^T M delta <= eps^2 and "
                 "steps", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.1), ncol=2)
    fig.tight_layout()
    dest = Path(path).resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".png", dir=dest.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return os.fspath(dest)


__all__ = ["GEOMETRY_METRICS", "Geometry", "compute", "draw"]

r"""NIST StRD nonlinear regression benchmark (issue 4).

The 27 NIST Statistical Reference Datasets for nonlinear least squares, each fitted from both
certified starts ("Start 1" far, "Start 2" near) by

- ``gn-lm``: ``steepest.Optimizer`` with the Gauss-Newton metric :math:`M = E_s[J^T J]`, the
  Levenberg-Marquardt damping rule with its DEFAULT settings and a dense Cholesky solve,
  :math:`\delta = -(M + \lambda I)^{-1} g` (000 section 3.2);
- ``gn-more``: the same Gauss-Newton step with ``steepest.MoreTrustRegion()`` (DEFAULT
  settings): Levenberg-Marquardt as a trust region on the scaled step,
  :math:`\delta = -(M + \lambda D^2)^{-1} g` with :math:`\|D\delta\| = \Delta` (Moré 1978,
  the algorithm of MINPACK's ``lmder`` that ``scipy-lm`` wraps);
- ``gn-more-ftol``: ``gn-more`` stopped when the Optimizer's own MINPACK tests fire
  (``StepInfo.converged``) with scipy's tolerances, ``ftol = xtol = gtol = 1e-8`` (ftol and
  xtol are the Optimizer's defaults; gtol, MINPACK's cosine for the MSE loss, is passed),
  instead of by the rule below: the same problems and tolerances as ``scipy-lm``;
- ``ggn-tr``: the GGN metric (equal to Gauss-Newton for the MSE loss) with the adaptive trust
  region of 000 Appendix A, :math:`\alpha = \epsilon/\sqrt{g^T (M + \lambda I)^{-1} g}`;
- ``hessian-tr``: Newton (the exact Hessian, clipped to its absolute eigenvalues when indefinite)
  with the same adaptive trust region;
- ``least-squares``: ``steepest.least_squares`` with ALL its defaults (MINPACK's trust region,
  ``ftol = 1e-14``, ``xtol = gtol = 1e-8``, ``max_nfev = 300 P``, the Jacobian by autograd) on
  the residuals :math:`f_i(b) - y_i`, its own stopping rule (not the one below);
  ``least-squares-tight`` with ``ftol = xtol = gtol = 1e-15``, as ``scipy-lm-tight``;
- ``scipy-lm`` / ``scipy-trf``: ``scipy.optimize.least_squares`` with its default tolerances,
  and ``scipy-lm-tight`` / ``scipy-trf-tight`` with ``ftol = xtol = gtol = 1e-15`` (the analytic
  Jacobian from ``torch.func.jacrev`` in all four).

The loss is the mean squared error :math:`L(b) = \frac{1}{2N}\sum_i (y_i - f(x_i; b))^2`, so the
certified values (the least-squares minimum) are its minimiser. A fit is scored by the log
relative error (LRE) of its parameters against the certified values,

.. math:: \mathrm{LRE} = \min_j -\log_{10} \frac{|b_j - b_j^{cert}|}{|b_j^{cert}|},

capped at the number of certified significant digits (11); a problem-start is *solved* at
LRE >= 4 (and, for a careful solver, >= 6).

Stopping rule of the steepest methods (the same for all four): iterate ``opt.step(x, y)`` until

1. the gradient is exactly zero, or
2. an accepted step is negligible: :math:`\|\delta\| \le x_{tol} (\|b\| + x_{tol})` with
   ``xtol = 1e-15`` (float64 resolution: the iterate no longer moves), or
3. ``patience = 3`` consecutive steps are rejected (each ``opt.step`` already retried with
   larger damping / a smaller trust region up to the rule's own limit: no decrease of the loss
   can be found any more, i.e. we are at the float64 floor of the loss), or
4. ``max_steps = 1000`` steps.

There is deliberately no test on the relative reduction of the loss alone: near a minimum the
loss changes quadratically in the parameter error, so a loss tolerance of 1e-8 stops with only
about 4 correct digits on the ill-conditioned problems (which is why scipy's defaults fail
them). Running to the float64 floor is legitimate because the certified values are the exact
least-squares minimum.

Usage (from the repository root; the data stays outside the project)::

    python benchmarks/nist.py --data ../shared/data/nist-strd --out benchmarks/results/nist.json

``--markdown benchmarks/nist.md`` also writes the table; ``--problems MGH09,Bennett5`` and
``--methods gn-lm,scipy-lm`` select a subset.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

import steepest

PI = math.pi
DTYPE = torch.float64
LRE_CAP = 11.0


# ---------------------------------------------------------------------------------- formulas
# Each formula maps (b (P,), x (N, K)) to the model output (N,), written as in the .dat header.
def _x(x: Tensor) -> Tensor:
    return x[:, 0]


def _misra1a(b: Tensor, x: Tensor) -> Tensor:  # also BoxBOD
    x = _x(x)
    return b[0] * (1 - torch.exp(-b[1] * x))


def _chwirut(b: Tensor, x: Tensor) -> Tensor:
    x = _x(x)
    return torch.exp(-b[0] * x) / (b[1] + b[2] * x)


def _lanczos(b: Tensor, x: Tensor) -> Tensor:
    x = _x(x)
    return b[0] * torch.exp(-b[1] * x) + b[2] * torch.exp(-b[3] * x) + b[4] * torch.exp(-b[5] * x)


def _gauss(b: Tensor, x: Tensor) -> Tensor:
    x = _x(x)
    return (
        b[0] * torch.exp(-b[1] * x)
        + b[2] * torch.exp(-((x - b[3]) ** 2) / b[4] ** 2)
        + b[5] * torch.exp(-((x - b[6]) ** 2) / b[7] ** 2)
    )


def _danwood(b: Tensor, x: Tensor) -> Tensor:
    return b[0] * _x(x) ** b[1]


def _misra1b(b: Tensor, x: Tensor) -> Tensor:
    return b[0] * (1 - (1 + b[1] * _x(x) / 2) ** (-2))


def _kirby2(b: Tensor, x: Tensor) -> Tensor:
    x = _x(x)
    return (b[0] + b[1] * x + b[2] * x**2) / (1 + b[3] * x + b[4] * x**2)


def _cubic_cubic(b: Tensor, x: Tensor) -> Tensor:  # Hahn1, Thurber
    x = _x(x)
    num = b[0] + b[1] * x + b[2] * x**2 + b[3] * x**3
    return num / (1 + b[4] * x + b[5] * x**2 + b[6] * x**3)


def _nelson(b: Tensor, x: Tensor) -> Tensor:  # response log(y)
    return b[0] - b[1] * x[:, 0] * torch.exp(-b[2] * x[:, 1])


def _mgh17(b: Tensor, x: Tensor) -> Tensor:
    x = _x(x)
    return b[0] + b[1] * torch.exp(-x * b[3]) + b[2] * torch.exp(-x * b[4])


def _misra1c(b: Tensor, x: Tensor) -> Tensor:
    return b[0] * (1 - (1 + 2 * b[1] * _x(x)) ** (-0.5))


def _misra1d(b: Tensor, x: Tensor) -> Tensor:
    x = _x(x)
    return b[0] * b[1] * x * (1 + b[1] * x) ** (-1)


def _roszman1(b: Tensor, x: Tensor) -> Tensor:
    x = _x(x)
    return b[0] - b[1] * x - torch.atan(b[2] / (x - b[3])) / PI


def _enso(b: Tensor, x: Tensor) -> Tensor:
    x = _x(x)
    w = 2 * PI * x
    return (
        b[0]
        + b[1] * torch.cos(w / 12)
        + b[2] * torch.sin(w / 12)
        + b[4] * torch.cos(w / b[3])
        + b[5] * torch.sin(w / b[3])
        + b[7] * torch.cos(w / b[6])
        + b[8] * torch.sin(w / b[6])
    )


def _mgh09(b: Tensor, x: Tensor) -> Tensor:
    x = _x(x)
    return b[0] * (x**2 + x * b[1]) / (x**2 + x * b[2] + b[3])


def _rat42(b: Tensor, x: Tensor) -> Tensor:
    return b[0] / (1 + torch.exp(b[1] - b[2] * _x(x)))


def _mgh10(b: Tensor, x: Tensor) -> Tensor:
    return b[0] * torch.exp(b[1] / (_x(x) + b[2]))


def _eckerle4(b: Tensor, x: Tensor) -> Tensor:
    x = _x(x)
    return (b[0] / b[1]) * torch.exp(-0.5 * ((x - b[2]) / b[1]) ** 2)


def _rat43(b: Tensor, x: Tensor) -> Tensor:
    return b[0] / (1 + torch.exp(b[1] - b[2] * _x(x))) ** (1 / b[3])


def _bennett5(b: Tensor, x: Tensor) -> Tensor:
    return b[0] * (b[1] + _x(x)) ** (-1 / b[2])


FORMULAS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "Misra1a": _misra1a,
    "Chwirut2": _chwirut,
    "Chwirut1": _chwirut,
    "Lanczos3": _lanczos,
    "Gauss1": _gauss,
    "Gauss2": _gauss,
    "DanWood": _danwood,
    "Misra1b": _misra1b,
    "Kirby2": _kirby2,
    "Hahn1": _cubic_cubic,
    "Nelson": _nelson,
    "MGH17": _mgh17,
    "Lanczos1": _lanczos,
    "Lanczos2": _lanczos,
    "Gauss3": _gauss,
    "Misra1c": _misra1c,
    "Misra1d": _misra1d,
    "Roszman1": _roszman1,
    "ENSO": _enso,
    "MGH09": _mgh09,
    "Thurber": _cubic_cubic,
    "BoxBOD": _misra1a,
    "Rat42": _rat42,
    "MGH10": _mgh10,
    "Eckerle4": _eckerle4,
    "Rat43": _rat43,
    "Bennett5": _bennett5,
}
LOG_RESPONSE = {"Nelson"}  # the model is log[y] = f(x; b): fit log(y)


# ---------------------------------------------------------------------------------- parsing
@dataclass
class Problem:
    """One NIST StRD problem as read from its .dat file."""

    name: str
    level: str  # "Lower", "Average" or "Higher"
    model: str  # the formula text of the header
    starts: list[list[float]]  # [start 1, start 2], each P values
    certified: list[float]  # P certified values
    certified_sd: list[float]
    digits: int  # fewest significant digits among the certified values
    rss: float  # certified residual sum of squares
    x: np.ndarray = field(repr=False)  # (N, K) predictors
    y: np.ndarray = field(repr=False)  # (N,) response (log y for a log-response model)

    @property
    def n_params(self) -> int:
        return len(self.certified)


_RANGE = r"{}\s+\(lines\s+(\d+)\s+to\s+(\d+)\)"
_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


def _line_range(text: str, what: str, path: Path) -> tuple[int, int]:
    m = re.search(_RANGE.format(what), text, flags=re.IGNORECASE)
    if m is None:
        raise ValueError(
            f"{path}: no '{what} (lines a to b)' in the header; not a NIST StRD "
            "nonlinear regression file."
        )
    return int(m.group(1)), int(m.group(2))


def _significant_digits(token: str) -> int:
    mantissa = re.split(r"[eE]", token)[0].lstrip("+-").replace(".", "").lstrip("0")
    return max(len(mantissa), 1)


def parse(path: str | Path) -> Problem:
    """Read a NIST StRD nonlinear regression .dat file (header line ranges, starts, certified
    values and residual sum of squares, data table y then x1 [x2])."""
    path = Path(path)
    text = path.read_text()
    lines = text.splitlines()
    name_m = re.search(r"Dataset Name:\s+(\S+)", text)
    name = name_m.group(1) if name_m else path.stem
    s0, s1 = _line_range(text, "Starting Values", path)
    c0, c1 = _line_range(text, "Certified Values", path)
    d0, d1 = _line_range(text, "Data", path)
    starts1, starts2, cert, sd, digits = [], [], [], [], []
    for line in lines[s0 - 1 : s1]:
        m = re.match(r"\s*b(\d+)\s*=\s*(.*)$", line)
        if m is None:
            raise ValueError(
                f"{path}: line '{line.strip()}' of the starting values is not "
                "'bJ = start1 start2 certified sd'."
            )
        toks = re.findall(_NUM, m.group(2))
        if len(toks) != 4:
            raise ValueError(f"{path}: expected 4 numbers after 'b{m.group(1)} =', got {toks}.")
        starts1.append(float(toks[0]))
        starts2.append(float(toks[1]))
        cert.append(float(toks[2]))
        sd.append(float(toks[3]))
        digits.append(_significant_digits(toks[2]))
    rss = math.nan
    for line in lines[c0 - 1 : c1]:
        if line.strip().lower().startswith("residual sum of squares"):
            rss = float(re.findall(_NUM, line.split(":", 1)[1])[0])
    if math.isnan(rss):
        raise ValueError(f"{path}: no 'Residual Sum of Squares:' among the certified values.")
    rows = [[float(t) for t in line.split()] for line in lines[d0 - 1 : d1] if line.strip()]
    widths = {len(r) for r in rows}
    if len(widths) != 1 or widths.pop() < 2:
        raise ValueError(f"{path}: the data lines {d0}-{d1} are not a table of y and x columns.")
    data = np.asarray(rows, dtype=np.float64)
    level_m = re.search(r"(Lower|Average|Higher)\s+Level of Difficulty", text)
    model_m = re.search(r"Model:\s*(.*?)\n\s*\n(.*?)\n\s*\n", text, flags=re.S)
    model = " ".join(model_m.group(2).split()) if model_m else ""
    y = data[:, 0]
    if name in LOG_RESPONSE:
        y = np.log(y)
    return Problem(
        name=name,
        level=level_m.group(1) if level_m else "",
        model=model,
        starts=[starts1, starts2],
        certified=cert,
        certified_sd=sd,
        digits=min(digits),
        rss=rss,
        x=data[:, 1:],
        y=y,
    )


# ---------------------------------------------------------------------------------- model
class NistModel(nn.Module):
    """The regression function f(x; b) of a problem as an nn.Module with one parameter b."""

    def __init__(self, formula: Callable[[Tensor, Tensor], Tensor], b0: Sequence[float]):
        super().__init__()
        self.formula = formula
        self.b = nn.Parameter(torch.tensor(list(b0), dtype=DTYPE))

    def forward(self, x: Tensor) -> Tensor:
        return self.formula(self.b, x).unsqueeze(1)


def formula_of(problem: Problem, formulas: dict | None = None) -> Callable:
    formulas = FORMULAS if formulas is None else formulas
    if problem.name not in formulas:
        raise KeyError(f"no formula for the NIST problem {problem.name!r}; add it to FORMULAS.")
    return formulas[problem.name]


def tensors(problem: Problem) -> tuple[Tensor, Tensor]:
    """Inputs (N, K) and targets (N, 1) in float64."""
    x = torch.as_tensor(problem.x, dtype=DTYPE)
    y = torch.as_tensor(problem.y, dtype=DTYPE).unsqueeze(1)
    return x, y


def rss_at(problem: Problem, b: Sequence[float], formulas: dict | None = None) -> float:
    """Residual sum of squares sum_i (y_i - f(x_i; b))^2."""
    x, y = tensors(problem)
    with torch.no_grad():
        r = formula_of(problem, formulas)(torch.tensor(list(b), dtype=DTYPE), x) - y[:, 0]
    return float((r**2).sum())


def rss_check(problem: Problem, formulas: dict | None = None) -> float:
    """Check of a formula against the file: the relative difference between the RSS at the
    certified values and the certified RSS, relative to max(RSS, 1e-13 sum y^2) (Lanczos1's
    certified RSS, 1.4e-25, is below float64 resolution)."""
    rss = rss_at(problem, problem.certified, formulas)
    floor = 1e-13 * float(np.sum(problem.y**2))
    return abs(rss - problem.rss) / max(problem.rss, floor)


def lre(b: Sequence[float], certified: Sequence[float], cap: float = LRE_CAP) -> float:
    """min_j -log10(|b_j - c_j| / |c_j|), capped at ``cap``; 0 for a non-finite b."""
    out = cap
    for bj, cj in zip(b, certified, strict=True):
        if not math.isfinite(bj):
            return 0.0
        err = abs(bj - cj) / abs(cj) if cj != 0 else abs(bj)
        if err > 0:
            out = min(out, -math.log10(err))
    return max(0.0, min(out, cap))


# ---------------------------------------------------------------------------------- fitting
@dataclass
class FitResult:
    problem: str
    start: int  # 1 or 2
    method: str
    lre: float
    iterations: int  # accepted steps (steepest) / nfev-based iterations (scipy: njev)
    evaluations: int  # loss / residual evaluations
    time_s: float
    rss: float
    b: list[float]
    status: str


@dataclass
class StopRule:
    """The stopping rule of the module docstring."""

    xtol: float = 1e-15
    patience: int = 3
    max_steps: int = 1000


def make_optimizer(method: str, model: nn.Module) -> steepest.Optimizer:
    """The library configuration of each steepest method (library defaults where possible)."""
    mse = steepest.MSE()
    if method == "gn-lm":
        return steepest.Optimizer(
            model,
            mse,
            metric=steepest.GaussNewton(),
            damping=steepest.LevenbergMarquardt(),
            solver="cholesky",
        )
    if method in ("gn-more", "gn-more-ftol"):
        return steepest.Optimizer(
            model,
            mse,
            metric=steepest.GaussNewton(),
            damping=steepest.MoreTrustRegion(),
            solver="cholesky",
            gtol=1e-8 if method == "gn-more-ftol" else 0.0,  # scipy's gtol (MINPACK's cosine)
        )
    if method == "ggn-tr":
        return steepest.Optimizer(
            model,
            mse,
            metric=steepest.GGN(),
            damping=steepest.LevenbergMarquardt(),
            solver="cholesky",
            step=steepest.TrustRegion(adaptive=True),
        )
    if method == "hessian-tr":
        return steepest.Optimizer(
            model,
            mse,
            metric=steepest.Hessian(),
            damping=steepest.LevenbergMarquardt(),
            solver=steepest.Cholesky(indefinite="clip"),
            step=steepest.TrustRegion(adaptive=True),
        )
    raise ValueError(f"unknown steepest method {method!r}; one of {STEEPEST_METHODS}.")


STEEPEST_METHODS = (
    "gn-lm",
    "gn-more",
    "gn-more-ftol",
    "ggn-tr",
    "hessian-tr",
    "least-squares",
    "least-squares-tight",
)
SCIPY_METHODS = ("scipy-lm", "scipy-trf", "scipy-lm-tight", "scipy-trf-tight")
METHODS = STEEPEST_METHODS + SCIPY_METHODS


@contextlib.contextmanager
def single_thread():
    """One torch thread for the duration (the problems are tiny: threads only add overhead)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def fit_steepest(
    problem: Problem,
    start: int,
    method: str = "gn-lm",
    rule: StopRule | None = None,
    formulas: dict | None = None,
) -> FitResult:
    """Fit with ``steepest.Optimizer`` from start 1 or 2 under the stopping rule."""
    with single_thread():
        return _fit_steepest(problem, start, method, rule, formulas)


def _fit_steepest(
    problem: Problem, start: int, method: str, rule: StopRule | None, formulas: dict | None
) -> FitResult:
    rule = StopRule() if rule is None else rule
    model = NistModel(formula_of(problem, formulas), problem.starts[start - 1])
    x, y = tensors(problem)
    # gn-more-ftol: gn-more stopped by the Optimizer's own MINPACK tests (ftol = xtol = 1e-8,
    # StepInfo.converged) instead of the run to the float64 floor of the rule above
    opt = make_optimizer(method, model)
    steps = evals = rejected = 0
    status = f"max_steps={rule.max_steps}"
    t0 = time.perf_counter()
    try:
        for _ in range(rule.max_steps):
            info = opt.step(x, y)
            evals += info.nfev  # MINPACK's count: 0 for the point when the trial is reused
            if method.endswith("-ftol") and info.converged:
                steps += int(info.accepted)
                status = f"converged: {info.reason}"
                break
            if info.grad_norm == 0:
                status = "zero gradient"
                break
            if not info.accepted:
                rejected += 1
                if rejected >= rule.patience:
                    status = f"{rule.patience} rejected steps in a row (loss floor)"
                    break
                continue
            steps += 1
            rejected = 0
            bnorm = float(model.b.detach().norm())
            if info.step_norm <= rule.xtol * (bnorm + rule.xtol):
                status = "step below xtol"
                break
    except steepest.SteepestError as e:  # report, do not crash the benchmark
        status = f"{type(e).__name__}: {e}"
    elapsed = time.perf_counter() - t0
    b = model.b.detach().tolist()
    return FitResult(
        problem.name,
        start,
        method,
        lre(b, problem.certified, _cap(problem)),
        steps,
        evals,
        elapsed,
        rss_at(problem, b, formulas),
        b,
        status,
    )


#: settings of the ``least-squares`` method other than the defaults (``--ls-ftol``,
#: ``--ls-max-nfev-per-param``: how the defaults' choice was measured, fit.md; ``--ls-engine``)
LS_SETTINGS: dict = {}


def fit_least_squares(
    problem: Problem, start: int, formulas: dict | None = None, tight: bool = False
) -> FitResult:
    """``steepest.least_squares`` with its defaults, or with :data:`LS_SETTINGS` (``tight``:
    ftol = xtol = gtol = 1e-15, as ``scipy-lm-tight``); evaluations = ``nfev`` (as scipy's)."""
    f = formula_of(problem, formulas)
    x, y = tensors(problem)
    y1 = y[:, 0]
    t0 = time.perf_counter()
    with single_thread():
        tol = {"ftol": 1e-15, "xtol": 1e-15, "gtol": 1e-15} if tight else {}
        if not tight and "ftol" in LS_SETTINGS:
            tol["ftol"] = LS_SETTINGS["ftol"]
        if not tight and "max_nfev_per_param" in LS_SETTINGS:
            tol["max_nfev"] = LS_SETTINGS["max_nfev_per_param"] * problem.n_params
        if "engine" in LS_SETTINGS:
            tol["engine"] = LS_SETTINGS["engine"]
        res = steepest.least_squares(
            lambda b: f(b, x) - y1, torch.tensor(problem.starts[start - 1], dtype=DTYPE), **tol
        )
    elapsed = time.perf_counter() - t0
    b = res.x.tolist()
    return FitResult(
        problem.name,
        start,
        "least-squares-tight" if tight else "least-squares",
        lre(b, problem.certified, _cap(problem)),
        res.njev,
        res.nfev,
        elapsed,
        rss_at(problem, b, formulas),
        b,
        res.message,
    )


def fit_scipy(
    problem: Problem, start: int, method: str = "scipy-lm", formulas: dict | None = None
) -> FitResult:
    """``scipy.optimize.least_squares`` with the analytic (autograd) Jacobian."""
    from scipy.optimize import least_squares

    f = formula_of(problem, formulas)
    x, y = tensors(problem)
    y1 = y[:, 0]

    def res(b: Tensor) -> Tensor:
        return f(b, x) - y1

    jac_fn = torch.func.jacrev(res)

    def fun(b: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return res(torch.from_numpy(b)).numpy()

    def jac(b: np.ndarray) -> np.ndarray:
        return jac_fn(torch.from_numpy(b)).detach().numpy()

    kind = method.removeprefix("scipy-").removesuffix("-tight")
    tol = {"ftol": 1e-15, "xtol": 1e-15, "gtol": 1e-15} if method.endswith("-tight") else {}
    t0 = time.perf_counter()
    with np.errstate(all="ignore"), single_thread():
        try:
            sol = least_squares(
                fun, np.asarray(problem.starts[start - 1]), jac=jac, method=kind, **tol
            )
            b, status = sol.x.tolist(), sol.message
            iters, evals = int(sol.njev or 0), int(sol.nfev)
        except (ValueError, np.linalg.LinAlgError) as e:
            b, status, iters, evals = [math.nan] * problem.n_params, f"error: {e}", 0, 0
    elapsed = time.perf_counter() - t0
    return FitResult(
        problem.name,
        start,
        method,
        lre(b, problem.certified, _cap(problem)),
        iters,
        evals,
        elapsed,
        rss_at(problem, b, formulas),
        b,
        status,
    )


def _cap(problem: Problem) -> float:
    return min(LRE_CAP, float(problem.digits))


def fit(problem: Problem, start: int, method: str, formulas: dict | None = None) -> FitResult:
    if method.startswith("least-squares"):
        return fit_least_squares(problem, start, formulas, tight=method.endswith("-tight"))
    if method in STEEPEST_METHODS:
        return fit_steepest(problem, start, method, formulas=formulas)
    if method in SCIPY_METHODS:
        return fit_scipy(problem, start, method, formulas=formulas)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}.")


# ---------------------------------------------------------------------------------- report
def machine() -> dict:
    import scipy

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "scipy": scipy.__version__,
        "numpy": np.__version__,
        "steepest": steepest.__version__,
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def counts(results: list[FitResult], methods: Sequence[str]) -> dict:
    out = {}
    for m in methods:
        rs = [r for r in results if r.method == m]
        out[m] = {
            "runs": len(rs),
            "lre>=4": sum(r.lre >= 4 for r in rs),
            "lre>=6": sum(r.lre >= 6 for r in rs),
            "evaluations": sum(r.evaluations for r in rs),
            "time_s": round(sum(r.time_s for r in rs), 3),
        }
    return out


def versus(results: list[FitResult], ours: str, ref: str) -> dict | None:
    """Evaluations of ``ours`` against ``ref`` per problem-start (both run in this process)."""
    a = {(r.problem, r.start): r for r in results if r.method == ours}
    b = {(r.problem, r.start): r for r in results if r.method == ref}
    keys = [k for k in a if k in b]
    if not keys:
        return None
    more = [
        f"{p} {s}: {a[p, s].evaluations} vs {b[p, s].evaluations} (LRE {a[p, s].lre:.1f} "
        f"vs {b[p, s].lre:.1f})"
        for p, s in keys
        if a[p, s].evaluations > b[p, s].evaluations
    ]
    # where the reference stopped on a tolerance at a solution (not at max_nfev, LRE > 0)
    done = [k for k in keys if b[k].lre > 0 and not b[k].status.startswith("The maximum")]
    return {
        "runs": len(keys),
        "runs_ref_converged": len(done),
        "total_ref_converged": sum(a[k].evaluations for k in done),
        "total_ref_ref_converged": sum(b[k].evaluations for k in done),
        "total": sum(a[k].evaluations for k in keys),
        "total_ref": sum(b[k].evaluations for k in keys),
        "fewer": sum(a[k].evaluations < b[k].evaluations for k in keys),
        "equal": sum(a[k].evaluations == b[k].evaluations for k in keys),
        "more": more,
    }


def markdown(results: list[FitResult], methods: Sequence[str], info: dict) -> str:
    c = counts(results, methods)
    head = "| problem | start | " + " | ".join(methods) + " |"
    sep = "|---|---|" + "---|" * len(methods)
    rows = [head, sep]
    keys = sorted(
        {(r.problem, r.start) for r in results},
        key=lambda k: (list(FORMULAS).index(k[0]) if k[0] in FORMULAS else 99, k[1]),
    )
    by = {(r.problem, r.start, r.method): r for r in results}
    for p, s in keys:
        cells = []
        for m in methods:
            r = by.get((p, s, m))
            cells.append("" if r is None else f"{r.lre:.1f} / {r.iterations} / {r.time_s:.2f}")
        rows.append(f"| {p} | {s} | " + " | ".join(cells) + " |")
    total = (
        "| **LRE>=6 (>=4)** | | "
        + " | ".join(f"**{c[m]['lre>=6']}** ({c[m]['lre>=4']}) of {c[m]['runs']}" for m in methods)
        + " |"
    )
    rows.append(total)
    mach = ", ".join(f"{k} {v}" for k, v in info.items())
    return "\n".join(rows) + f"\n\nCells: LRE / iterations / seconds. Machine: {mach}.\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", required=True, help="folder of the NIST StRD .dat files")
    ap.add_argument("--out", default=None, help="JSON file for the results")
    ap.add_argument("--markdown", default=None, help="also write the table here")
    ap.add_argument("--problems", default=None, help="comma-separated subset, e.g. MGH09,Misra1a")
    ap.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="comma-separated subset of " + ", ".join(METHODS),
    )
    ap.add_argument(
        "--ls-ftol",
        type=float,
        default=None,
        help="ftol of the least-squares method (default: its own)",
    )
    ap.add_argument(
        "--ls-engine",
        default=None,
        help="engine of the least-squares methods: auto (default: torch for one fit), torch or "
        "numba (the compiled core)",
    )
    ap.add_argument(
        "--ls-max-nfev-per-param",
        type=int,
        default=None,
        help="max_nfev of the least-squares method as a multiple of P (default: its own, 100 P)",
    )
    args = ap.parse_args(argv)
    if args.ls_ftol is not None:
        LS_SETTINGS["ftol"] = args.ls_ftol
    if args.ls_max_nfev_per_param is not None:
        LS_SETTINGS["max_nfev_per_param"] = args.ls_max_nfev_per_param
    if args.ls_engine is not None:
        LS_SETTINGS["engine"] = args.ls_engine
    data = Path(args.data)
    if not data.is_dir():
        ap.error(f"--data {data}: no such folder; pass the folder of the NIST StRD .dat files.")
    names = args.problems.split(",") if args.problems else list(FORMULAS)
    methods = args.methods.split(",")
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r}; choose from {', '.join(METHODS)}.")
    results: list[FitResult] = []
    checks = {}
    load0 = os.getloadavg()
    for name in names:
        problem = parse(data / f"{name}.dat")
        # formula check: at the certified values our formula must give the certified RSS
        checks[name] = rss_check(problem)
        for start in (1, 2):
            line = [f"{name:9s} start {start}"]
            for m in methods:
                r = fit(problem, start, m)
                results.append(r)
                line.append(f"{m} {r.lre:4.1f}")
            print("  ".join(line), flush=True)
    info = machine()
    info["loadavg_start"], info["loadavg_end"] = load0, os.getloadavg()
    info["torch_threads_per_fit"] = 1
    info["note"] = "shared machine: other jobs ran at the same time (see loadavg)"
    c = counts(results, methods)
    pairs = {
        f"{a} vs {b}": versus(results, a, b)
        for a, b in (
            ("least-squares", "scipy-lm"),
            ("least-squares-tight", "scipy-lm-tight"),
            ("gn-more-ftol", "scipy-lm"),
        )
    }
    pairs = {k: v for k, v in pairs.items() if v is not None}
    for k, v in pairs.items():
        print(
            f"evaluations {k}: {v['total']} vs {v['total_ref']} ({v['fewer']} fewer, "
            f"{v['equal']} equal, {len(v['more'])} more: {'; '.join(v['more'])}); where the "
            f"reference converged ({v['runs_ref_converged']}): {v['total_ref_converged']} vs "
            f"{v['total_ref_ref_converged']}"
        )
    for m in methods:
        print(
            f"{m:16s} LRE>=6: {c[m]['lre>=6']:2d}  LRE>=4: {c[m]['lre>=4']:2d}  of "
            f"{c[m]['runs']}  ({c[m]['time_s']:.1f} s)"
        )
    worst = max(checks.values()) if checks else 0.0
    print(f"formula check: max relative error of the RSS at the certified values {worst:.2e}")
    if args.out:
        out = {
            "machine": info,
            "stop_rule": asdict(StopRule()),
            "least_squares_settings": LS_SETTINGS or "defaults",
            "lre_cap": LRE_CAP,
            "rss_check": checks,
            "counts": c,
            "evaluations_vs": pairs,
            "results": [asdict(r) for r in results],
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(markdown(results, methods, info))
    return 0


if __name__ == "__main__":
    sys.exit(main())

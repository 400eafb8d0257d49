r"""The runner of ``steepest compare``: the six methods of Table 1 (000) and three
``torch.optim`` baselines, side by side on one problem, on several seeds.

Every row (a method, or a variant of one such as ``ggn[solver=woodbury]``) starts from the
same weights for a given seed (the problem's model factory with that seed) and runs for the
same budget: by default the problem's wall-time budget (``Problem.time`` seconds of the run's
own step time; the evaluations that record the curves are not counted), else ``iters`` steps.
A time budget is checked before each step, so a run stops within one step of it. The
steepest methods are :class:`~steepest.optimizer.Optimizer` with one metric each:

======================  =====================================  ================================
method                  M (000 Table 1)                        default settings
======================  =====================================  ================================
``vanilla``             ``Identity()``                         lr per problem, no damping
``gauss-newton``        ``GaussNewton()``  E[J^T J]            LM damping 1e-3, lr 1, auto
``natural``             ``Fisher()``       E[J^T F_R J]        LM damping 1e-3, lr 1, auto
``empirical-fisher``    ``EmpiricalFisher()``                  LM damping 1e-3, lr 1, auto
``gradient-covariance`` ``GradientCovariance(centered=True)``  LM damping 1e-3, lr 1, auto
``newton``              ``Hessian()``                          LM damping 1e-3, lr 1, auto
``ggn``                 ``GGN()``          E[J^T H_L J]        LM damping 1e-3, lr 1, auto
``kfac``                ``KFAC(base)``  per-layer G (x) A      LM damping 1e-3, lr 1, auto
                        (base: MC Fisher, 1 sample)            (its own inverse), KFAC's
                                                               T_cov, T_inv, ema
``ekfac``               ``EKFAC(base)`` eigenvalue-corrected   as ``kfac``
``diagonal``            ``Diagonal(base, power)``              LM damping 1e-3, lr 1, auto
                        (base: GGN, power 1)                   (its own inverse)
``adam``                ``torch.optim.Adam``                   lr tuned, betas (0.9, 0.999)
``sgd``                 ``torch.optim.SGD``                    lr tuned, momentum 0.9
``lbfgs``               ``torch.optim.LBFGS``                  lr tuned, history 10, Wolfe
======================  =====================================  ================================

"auto" is :class:`~steepest.solvers.Auto`: the exact Woodbury solve in sample space when the
metric has a factor with fewer rows than parameters, the dense Cholesky solve when the model
is small, CG otherwise (measured per problem in ``benchmarks/compare_defaults.py``).
"LM damping" is :class:`~steepest.damping.LevenbergMarquardt` (lambda adapted from the
reduction ratio, a step that raises the loss is undone and retried). "lr tuned": the
learning rate of each baseline is searched on the first seed over the problem's default
times :data:`TUNE_FACTORS` (same budget; the fastest to the target wins, else the lowest final
loss), unless the user sets it; grid and choice go into results.json and the report.

The full table of keys is :data:`METHOD_DEFAULTS`; each problem overrides some
(``Problem.defaults``, listed by ``steepest problems --defaults``), the user overrides any key
per method (``settings={"natural": {"damping": 1e-2}}`` here, ``--set natural.damping=1e-2``
on the command line) and per row (``--methods "ggn,ggn[solver=woodbury,damping=1e-2]"``).
Keys:

- steepest methods: ``damping`` (lambda, the initial one for LM; ``more`` means Moré's trust
  region, i.e. ``step=scaled-trust-region``), ``adaptive_damping``
  (LevenbergMarquardt if true, else a constant lambda), ``step`` (``lr``: delta = -lr
  (M+lambda I)^-1 g; ``trust-region``: delta^T (M+lambda I) delta = eps^2, adaptive;
  ``armijo``: backtracking from lr; ``scaled-trust-region``: Moré's trust region on the scaled
  step, ``damping=MoreTrustRegion()``, which then replaces ``damping``/``adaptive_damping``
  and ``lr``), ``lr``, ``eps``, ``solver`` (auto, cg, cholesky,
  woodbury), ``cg_maxiter`` (0: the solver's default), ``momentum``; ``natural`` also
  ``mc_samples`` (0: exact Fisher), ``gradient-covariance`` also ``centered``.
- ``kfac`` and ``ekfac`` (:mod:`steepest.kronecker`) also: ``base`` (the Table 1 row whose
  Kronecker factors are taken, spelled like the methods: ``natural``, ``ggn``,
  ``gauss-newton``, ``empirical-fisher``), ``mc_samples`` (for ``base=natural``: sampled
  labels per input, Martens & Grosse's 1 by default; 0: the exact Fisher), ``T_cov`` and
  ``T_inv`` (refresh the factors / their eigendecompositions every so many steps), ``ema``
  (the decay of the factors' running averages; 0: none), ``factored`` (Martens & Grosse's
  factored Tikhonov damping with the pi-correction; ``kfac`` only), ``rescale`` (``none``,
  ``alpha``, ``momentum``: the step rescaled by the exact quadratic model, section 7). The
  defaults of ``T_cov``, ``T_inv`` and ``ema`` are those of :class:`~steepest.KFAC`.
- ``diagonal`` (:mod:`steepest.diagonal`) also: ``base`` (any curvature method's row:
  ``ggn``, ``natural``, ``gauss-newton``, ``empirical-fisher``, ``gradient-covariance``,
  ``newton``), ``power`` (Martens' xi: ``diagonal[base=empirical-fisher,power=0.5]`` is the
  Adam/RMSprop family without momentum), ``mc_samples`` (for ``base=natural``, as for
  ``natural``: sampled labels, 0: the exact Fisher), ``probes`` (0: the exact diagonal; k:
  Hutchinson's estimate from k Rademacher probes, k products of the base).
- ``solver=woodbury`` is refused for ``kfac``, ``ekfac`` and ``diagonal`` (no sample-space
  factor); ``auto`` uses their own inverse.
- ``adam``: ``lr``, ``beta1``, ``beta2``; ``sgd``: ``lr``, ``momentum``; ``lbfgs``: ``lr``,
  ``history_size``, ``line_search`` (``strong_wolfe`` or ``none``).

One iteration is one ``step`` of the method (for L-BFGS one outer iteration with its line
search). A run whose loss becomes NaN/inf, or that raises a steepest error, is recorded as
diverged and stopped; the others go on.

Example
-------
>>> from steepest import compare
>>> result = compare.run("regression", methods=["vanilla", "ggn", "adam"], seeds=3)
>>> result.summary["sentence"]
>>> compare.save(result, "out")          # results.json, plots, report.html
"""

from __future__ import annotations

import inspect
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import torch
from torch import Tensor, nn

from ..damping import Constant, LevenbergMarquardt, MoreTrustRegion
from ..diagonal import Diagonal
from ..errors import ConfigurationError, SteepestError
from ..kronecker import EKFAC, KFAC
from ..metrics import (
    GGN,
    EmpiricalFisher,
    Fisher,
    GaussNewton,
    GradientCovariance,
    Hessian,
    Identity,
    Metric,
)
from ..optimizer import Optimizer
from ..problems import Problem
from ..problems import get as get_problem
from ..solvers import CG, Auto, Cholesky, Woodbury
from ..steps import Armijo, LearningRate, TrustRegion
from .results import Comparison, Run, summarize

ROW_METHODS = ("vanilla", "gauss-newton", "natural", "empirical-fisher",
               "gradient-covariance", "newton", "ggn")
#: the structured approximations of a row (issue 10): a ``base`` row and a cheap inverse
STRUCTURED_METHODS = ("kfac", "ekfac", "diagonal")
STEEPEST_METHODS = ROW_METHODS + STRUCTURED_METHODS
TORCH_METHODS = ("adam", "sgd", "lbfgs")
METHODS = STEEPEST_METHODS + TORCH_METHODS

LABELS = {
    "vanilla": "vanilla gradient", "gauss-newton": "Gauss-Newton", "natural": "natural gradient",
    "empirical-fisher": "empirical Fisher", "gradient-covariance": "gradient covariance",
    "newton": "Newton", "ggn": "GGN", "adam": "Adam", "sgd": "SGD (momentum)",
    "lbfgs": "L-BFGS", "kfac": "K-FAC", "ekfac": "EKFAC", "diagonal": "diagonal",
}

_STEEPEST_KEYS: dict[str, Any] = {
    "damping": 1e-3, "adaptive_damping": True, "step": "lr", "lr": 1.0, "eps": 0.1,
    "solver": "auto", "cg_maxiter": 0, "momentum": 0.0,
}



def _kfac_default(key: str) -> Any:
    """KFAC's own default of ``key`` (so that ``compare`` follows the library's defaults)."""
    value = inspect.signature(KFAC.__init__).parameters[key].default
    return 0.0 if key == "ema" and value is None else value


_KFAC_KEYS: dict[str, Any] = {
    **_STEEPEST_KEYS, "base": "natural", "mc_samples": 1, "T_cov": _kfac_default("T_cov"),
    "T_inv": _kfac_default("T_inv"), "ema": float(_kfac_default("ema")), "factored": False,
    "rescale": "none",
}

#: The global defaults of every method; a problem's ``defaults`` override them.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "vanilla": {**_STEEPEST_KEYS, "damping": 0.0, "adaptive_damping": False, "lr": 0.1,
                "solver": "cg", "cg_maxiter": 1},
    "gauss-newton": dict(_STEEPEST_KEYS),
    "natural": {**_STEEPEST_KEYS, "mc_samples": 0},
    "empirical-fisher": dict(_STEEPEST_KEYS),
    "gradient-covariance": {**_STEEPEST_KEYS, "centered": True},
    "newton": dict(_STEEPEST_KEYS),
    "ggn": dict(_STEEPEST_KEYS),
    "kfac": dict(_KFAC_KEYS),
    "ekfac": {k: v for k, v in _KFAC_KEYS.items() if k != "factored"},
    "diagonal": {**_STEEPEST_KEYS, "base": "ggn", "power": 1.0, "mc_samples": 0, "probes": 0},
    "adam": {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999},
    "sgd": {"lr": 1e-2, "momentum": 0.9},
    "lbfgs": {"lr": 1.0, "history_size": 10, "line_search": "strong_wolfe"},
}

_CHOICES: dict[Any, tuple[str, ...]] = {
    "step": ("lr", "trust-region", "armijo", "scaled-trust-region"),
    "solver": ("auto", "cg", "cholesky", "woodbury"),
    "line_search": ("strong_wolfe", "none"),
    "rescale": ("none", "alpha", "momentum"),
    # per method: the rows a structured approximation can be taken of
    ("kfac", "base"): ("natural", "ggn", "gauss-newton", "empirical-fisher"),
    ("ekfac", "base"): ("natural", "ggn", "gauss-newton", "empirical-fisher"),
    ("diagonal", "base"): ("ggn", "natural", "gauss-newton", "empirical-fisher",
                           "gradient-covariance", "newton"),
    ("kfac", "solver"): ("auto", "cg", "cholesky"),
    ("ekfac", "solver"): ("auto", "cg", "cholesky"),
    ("diagonal", "solver"): ("auto", "cg", "cholesky"),
}

_METRICS: dict[str, Callable[[dict], Metric]] = {
    "vanilla": lambda s: Identity(),
    "gauss-newton": lambda s: GaussNewton(),
    "natural": lambda s: Fisher(mc_samples=s["mc_samples"] or None),
    "empirical-fisher": lambda s: EmpiricalFisher(),
    "gradient-covariance": lambda s: GradientCovariance(centered=s["centered"]),
    "newton": lambda s: Hessian(),
    "ggn": lambda s: GGN(),
    "kfac": lambda s: KFAC(**_kronecker(s)),
    "ekfac": lambda s: EKFAC(**_kronecker(s)),
    "diagonal": lambda s: Diagonal(_row(s["base"], s["mc_samples"]), power=s["power"],
                                   mc_samples=s["probes"] or None),
}


def _row(name: str, mc_samples: int = 0) -> Metric:
    """The Table 1 row of a method name, at its library defaults (``natural`` with
    ``mc_samples`` sampled labels, 0: exact)."""
    if name == "natural":
        return Fisher(mc_samples=mc_samples or None)
    if name == "gradient-covariance":
        return GradientCovariance(centered=True)
    return {"gauss-newton": GaussNewton, "empirical-fisher": EmpiricalFisher,
            "newton": Hessian, "ggn": GGN}[name]()


def _kronecker(s: dict) -> dict[str, Any]:
    """The keyword arguments of KFAC/EKFAC from a row's settings."""
    kw: dict[str, Any] = {
        "base": _row(s["base"], s["mc_samples"]), "T_cov": s["T_cov"], "T_inv": s["T_inv"],
        "ema": s["ema"] or None, "rescale": None if s["rescale"] == "none" else s["rescale"],
    }
    if s.get("factored"):
        kw["damping"] = "factored"
    return kw

MAX_ITERS = 10**7  # the iteration cap of a time-budgeted run
SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes seeds in [0, 2^64)
DEFAULT_SEEDS = 3
#: the baselines whose learning rate is searched, and the grid around the problem's default
TUNED = ("adam", "sgd", "lbfgs")
TUNE_FACTORS = (0.25, 1.0, 4.0)
#: the clocks a budget and the curves' times can be read on
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


# ---------------------------------------------------------------------------- settings
def split_method(spec: str) -> tuple[str, dict[str, str]]:
    """``"ggn[solver=woodbury, damping=1e-2]"`` -> ``("ggn", {"solver": "woodbury", "damping":
    "1e-2"})``: a method and the settings of this variant (checked by
    :func:`resolve_settings`).

    >>> split_method("gauss-newton[damping=more]")
    ('gauss-newton', {'damping': 'more'})
    """
    text = str(spec).strip()
    name, bracket, rest = text.partition("[")
    name = name.strip().lower()
    if name not in METHODS:
        raise ConfigurationError(
            f"unknown method {name!r}; choose from {', '.join(METHODS)} or 'all'."
        )
    if not bracket:
        return name, {}
    if not rest.endswith("]") or "[" in rest or "]" in rest[:-1]:
        raise ConfigurationError(
            f"method variant {text!r}: write METHOD[KEY=VALUE,...], e.g. ggn[solver=woodbury]."
        )
    kv: dict[str, str] = {}
    for item in rest[:-1].split(","):
        key, eq, value = item.partition("=")
        if not (eq and key.strip() and value.strip()):
            raise ConfigurationError(
                f"method variant {text!r}: write METHOD[KEY=VALUE,...], e.g. "
                "ggn[solver=woodbury]."
            )
        kv[key.strip()] = value.strip()
    return name, kv


def method_key(name: str, variant: Mapping[str, Any]) -> str:
    """The row name of a method variant: ``ggn`` or ``ggn[solver=woodbury]``."""
    if not variant:
        return name
    return f"{name}[{','.join(f'{k}={v}' for k, v in variant.items())}]"


def base_method(row: str) -> str:
    """The method of a row: ``"ggn[solver=woodbury]"`` -> ``"ggn"``."""
    return row.split("[", 1)[0]


def label(row: str) -> str:
    """The human name of a row: ``GGN [solver=woodbury]``."""
    name, kv = split_method(row)
    return LABELS[name] + (f" [{row.split('[', 1)[1][:-1]}]" if kv else "")


def _split_list(text: str) -> list[str]:
    """Split at the commas outside brackets."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [*out, cur]


def parse_methods(methods: str | Iterable[str]) -> list[str]:
    """Row names from a comma-separated string or a list; ``all`` means every method, and
    ``METHOD[KEY=VALUE,...]`` is a variant with its own settings (a row of its own).

    >>> parse_methods("ggn,adam")
    ['ggn', 'adam']
    >>> parse_methods("ggn,ggn[solver=woodbury],gauss-newton[damping=more]")
    ['ggn', 'ggn[solver=woodbury]', 'gauss-newton[damping=more]']
    """
    items = _split_list(methods) if isinstance(methods, str) else list(methods)
    out: list[str] = []
    for raw in items:
        text = str(raw).strip()
        if not text:
            continue
        if text.lower() == "all":
            out.extend(m for m in METHODS if m not in out)
            continue
        key = method_key(*split_method(text))
        if key not in out:
            out.append(key)
    if not out:
        raise ConfigurationError(f"no method given; choose from {', '.join(METHODS)} or 'all'.")
    return out


def _convert(method: str, key: str, value: Any, default: Any) -> Any:
    where = f"{method}.{key}"
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        s = str(value).strip().lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        raise ConfigurationError(f"{where} must be true or false, got {value!r}.")
    if isinstance(default, int):
        try:
            out = int(value) if not isinstance(value, float) or value.is_integer() else None
        except (TypeError, ValueError):
            out = None
        if out is None or out < 0:
            raise ConfigurationError(f"{where} must be an integer >= 0, got {value!r}.")
        return out
    if isinstance(default, float):
        try:
            out = float(value)
        except (TypeError, ValueError):
            out = math.nan
        if not math.isfinite(out) or out < 0:
            raise ConfigurationError(f"{where} must be a finite number >= 0, got {value!r}.")
        return out
    s = str(value).strip().lower()
    choices = _CHOICES.get((method, key), _CHOICES.get(key))
    if choices is not None and s not in choices:
        hint = (" (it has no sample-space factor; auto uses its own inverse)"
                if key == "solver" and s == "woodbury" else "")
        raise ConfigurationError(f"{where} must be one of {', '.join(choices)}, got "
                                 f"{value!r}{hint}.")
    return s


def parse_set(assignments: Iterable[str]) -> dict[str, dict[str, str]]:
    """``["natural.damping=1e-2", ...]`` -> ``{"natural": {"damping": "1e-2"}}`` (values are
    converted and checked by :func:`resolve_settings`)."""
    out: dict[str, dict[str, str]] = {}
    for item in assignments:
        lhs, eq, value = item.partition("=")
        method, dot, key = lhs.strip().partition(".")
        if not (eq and dot and method and key and value.strip()):
            raise ConfigurationError(
                f"--set {item!r}: write METHOD.KEY=VALUE, e.g. --set natural.damping=1e-2."
            )
        out.setdefault(method.strip().lower(), {})[key.strip()] = value.strip()
    return out


def resolve_settings(problem: Problem, methods: list[str],
                     overrides: Mapping[str, Mapping[str, Any]] | None = None
                     ) -> dict[str, dict[str, Any]]:
    """The settings of each row: :data:`METHOD_DEFAULTS`, then the problem's defaults, then
    ``overrides`` (per method, every row of that method), then the row's own variant settings
    (``ggn[solver=woodbury]``). ``damping=more`` in a variant or an override means Moré's
    trust region (``step=scaled-trust-region``). Unknown methods or keys raise
    :class:`ConfigurationError`, as do settings the optimizer refuses (checked by building
    each optimizer on a throw-away model)."""
    overrides = overrides or {}
    bases = [base_method(r) for r in methods]
    for method, kv in overrides.items():
        if method not in METHODS:
            raise ConfigurationError(
                f"unknown method {method!r} in a setting; choose from {', '.join(METHODS)}."
            )
        if method not in bases:
            raise ConfigurationError(
                f"a setting is given for {method!r}, which is not among the methods run "
                f"({', '.join(methods)}); add it to --methods or drop the setting."
            )
        unknown = set(kv) - set(METHOD_DEFAULTS[method])
        if unknown:
            raise ConfigurationError(
                f"unknown setting {method}.{sorted(unknown)[0]}; the keys of {method} are "
                f"{', '.join(METHOD_DEFAULTS[method])}."
            )
    out: dict[str, dict[str, Any]] = {}
    for row in methods:
        method, variant = split_method(row)
        base = dict(METHOD_DEFAULTS[method])
        for layer, origin in ((problem.defaults.get(method, {}), f"problem {problem.name!r}"),
                              (overrides.get(method, {}), "the overrides"),
                              (variant, f"the variant {row}")):
            for key, value in layer.items():
                if key not in base:
                    raise ConfigurationError(
                        f"unknown setting {method}.{key} in {origin}; the keys of {method} are "
                        f"{', '.join(METHOD_DEFAULTS[method])}."
                    )
                if (key == "damping" and method in STEEPEST_METHODS
                        and str(value).strip().lower() == "more"):
                    base["step"] = "scaled-trust-region"  # Moré's rule replaces lambda and lr
                    continue
                base[key] = _convert(method, key, value, METHOD_DEFAULTS[method][key])
        out[row] = base
        _build(method, base, nn.Linear(1, 1).double(), problem.loss, torch.Generator())
    return out


def _user_set(row: str, key: str, overrides: Mapping[str, Mapping[str, Any]]) -> bool:
    method, variant = split_method(row)
    return key in variant or key in overrides.get(method, {})


def _solver(s: dict) -> Any:
    maxiter = s["cg_maxiter"] or None
    name = s["solver"]
    if name == "cg":
        return CG(tol=1e-8, maxiter=maxiter)
    if name == "cholesky":
        return Cholesky()
    if name == "woodbury":
        return Woodbury()
    return Auto(cg=CG(tol=1e-8, maxiter=maxiter))


def _build(method: str, s: dict, model: nn.Module, loss: Any, gen: torch.Generator) -> Any:
    """The optimizer of ``method`` with settings ``s`` on ``model``."""
    try:
        if method in STEEPEST_METHODS:
            if s["step"] == "scaled-trust-region":
                damping: Any = MoreTrustRegion()
            elif s["adaptive_damping"]:
                if not s["damping"] > 0:
                    raise ConfigurationError(
                        f"{method}.damping must be > 0 with adaptive_damping (Levenberg-"
                        f"Marquardt), got {s['damping']}; set {method}.adaptive_damping=false "
                        "for no damping."
                    )
                damping = LevenbergMarquardt(init=s["damping"])
            else:
                damping = Constant(s["damping"])
            if s["step"] == "trust-region":
                step: Any = TrustRegion(eps=s["eps"], adaptive=True)
            elif s["step"] == "armijo":
                step = Armijo(alpha0=s["lr"])
            elif s["step"] == "scaled-trust-region":
                step = LearningRate(1.0)  # the radius sets the length
            else:
                step = LearningRate(s["lr"])
            return Optimizer(model, loss, metric=_METRICS[method](s), damping=damping,
                             solver=_solver(s), step=step, momentum=s["momentum"],
                             generator=gen)
        params = [p for p in model.parameters() if p.requires_grad]
        if method == "adam":
            return torch.optim.Adam(params, lr=s["lr"], betas=(s["beta1"], s["beta2"]))
        if method == "sgd":
            return torch.optim.SGD(params, lr=s["lr"], momentum=s["momentum"])
        # max_eval: torch's default max_iter * 5 // 4 = 1 would starve the line search
        return torch.optim.LBFGS(params, lr=s["lr"], max_iter=1, max_eval=26,
                                 history_size=max(1, s["history_size"]),
                                 line_search_fn=None if s["line_search"] == "none"
                                 else "strong_wolfe")
    except SteepestError as err:
        raise ConfigurationError(f"{method}: {err}") from err
    except ValueError as err:  # torch.optim's own checks (negative lr, betas >= 1, ...)
        raise ConfigurationError(f"{method}: {err}") from err


def check_device(device: str | torch.device) -> torch.device:
    """``torch.device(device)``, refusing CUDA on a machine without it."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigurationError(f"unknown device {device!r}; use cpu or cuda.") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError(
            "CUDA was asked for but torch.cuda.is_available() is False on this machine; "
            "use --device cpu."
        )
    if dev.type not in ("cpu", "cuda"):
        raise ConfigurationError(f"unsupported device {device!r}; use cpu or cuda.")
    return dev


def check_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """float32 or float64 (names or torch dtypes)."""
    table = {"float32": torch.float32, "float64": torch.float64}
    if isinstance(dtype, torch.dtype) and dtype in table.values():
        return dtype
    if isinstance(dtype, str) and dtype in table:
        return table[dtype]
    raise ConfigurationError(f"dtype must be float32 or float64, got {dtype!r}.")


def check_budget(iters: int | None, seconds: float | None) -> None:
    """At most one of ``iters`` (>= 1) and ``seconds`` (> 0)."""
    if iters is not None and seconds is not None:
        raise ConfigurationError("give either an iteration budget or a time budget, not both.")
    if iters is not None and (isinstance(iters, bool) or not isinstance(iters, int)
                              or iters < 1):
        raise ConfigurationError(f"the iteration budget must be a positive integer, got "
                                 f"{iters!r}.")
    if seconds is not None and not (isinstance(seconds, int | float)
                                    and math.isfinite(seconds) and seconds > 0):
        raise ConfigurationError(f"the time budget must be a positive number of seconds, got "
                                 f"{seconds!r}.")


# ---------------------------------------------------------------------------- running
def _versions() -> dict[str, Any]:
    from importlib import metadata

    env: dict[str, Any] = {}
    for dist in ("steepest", "torch", "numpy", "scipy", "matplotlib", "scikit-learn"):
        try:
            env[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            env[dist] = None
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        load = None
    env.update(
        python=sys.version.split()[0], platform=platform.platform(), machine=platform.machine(),
        processor=platform.processor() or None, cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(), load_average=load,
        cuda_device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        started=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    return env


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`execute`: a ``KeyboardInterrupt`` that carries the runs that
    finished before it as ``partial`` (a :class:`Comparison` with ``config["partial"] = True``),
    so they can still be saved."""

    def __init__(self, partial: Comparison) -> None:
        super().__init__("interrupted")
        self.partial = partial


Progress = Callable[[str, int, int, float, float], None]  # (row, seed, iteration, loss, time)


def _full_loss(model: nn.Module, problem: Problem, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float(problem.loss.value(model(x), y).mean())


def _closure(opt: Any, model: nn.Module, problem: Problem, x: Tensor,
             y: Tensor) -> Callable[[], Tensor]:
    def closure() -> Tensor:
        opt.zero_grad()
        loss = problem.loss.value(model(x), y).mean()
        loss.backward()
        return loss

    return closure


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _kept(k: int) -> bool:
    """The iterations a curve keeps: all up to 50, then one per factor 1.05."""
    if k <= 50:
        return True
    return int(math.log(k) / math.log(1.05)) != int(math.log(k - 1) / math.log(1.05))


def _run_one(problem: Problem, row: str, settings: dict[str, Any], iters: int | None,
             seconds: float | None, seed: int, dtype: torch.dtype, device: torch.device,
             progress: Progress | None, clock_name: str = "wall") -> Run:
    method = base_method(row)
    run = Run(row, label(row), dict(settings), seed=seed)
    model = problem.make_model(seed, dtype, device)
    x, y = problem.data(dtype, device)  # type: ignore[misc]
    gen = torch.Generator(device=device).manual_seed(seed)
    batch_gen = torch.Generator(device=device).manual_seed((seed + 1) % SEED_LIMIT)
    opt = _build(method, settings, model, problem.loss, gen)
    target = problem.target_loss
    has_test = problem.test is not None
    now = CLOCKS[clock_name]

    def record(k: int, t: float, value: float) -> None:
        run.curve["iteration"].append(k)
        run.curve["time"].append(t)
        run.curve["loss"].append(_finite(value))
        test = (problem.evaluate_test(model, dtype, device)
                if has_test and math.isfinite(value) else None)
        run.curve["test"].append(_finite(test))

    loss0 = _full_loss(model, problem, x, y)
    record(0, 0.0, loss0)
    if progress:
        progress(row, seed, 0, loss0, 0.0)
    clock, k, value = 0.0, 0, loss0
    limit = iters if iters is not None else MAX_ITERS
    best = loss0
    while k < limit and (seconds is None or clock < seconds):
        if problem.batch_size is not None and problem.batch_size < x.shape[0]:
            idx = torch.randperm(x.shape[0], generator=batch_gen, device=device)
            idx = idx[: problem.batch_size]
            bx, by = x[idx], y[idx]
        else:
            bx, by = x, y
        t0 = now()
        try:
            if method in STEEPEST_METHODS:
                opt.step(bx, by)
            else:
                opt.step(_closure(opt, model, problem, bx, by))
            _sync(device)
        except (SteepestError, torch.linalg.LinAlgError, FloatingPointError) as err:
            clock += now() - t0
            run.diverged, run.error = True, f"{type(err).__name__}: {err}"
            break
        clock += now() - t0
        k += 1
        value = _full_loss(model, problem, x, y)
        if math.isfinite(value):
            best = min(best, value)
        if (target is not None and run.time_to_target is None and math.isfinite(value)
                and value <= target):
            run.time_to_target, run.iters_to_target = clock, k
        if not math.isfinite(value):
            run.diverged, run.error = True, "the training loss became NaN or infinite"
        if _kept(k) or run.diverged or run.iters_to_target == k:
            record(k, clock, value)
        if progress:
            progress(row, seed, k, value, clock)
        if run.diverged:
            break
    if run.curve["iteration"][-1] != k:
        record(k, clock, value)
    run.iterations, run.wall_time = k, clock
    run.final_loss = value if math.isfinite(value) else math.nan
    run.best_loss = best
    if not run.diverged:
        run.test_metric = _finite(problem.evaluate_test(model, dtype, device))
    return run


def _warm_up(p: Plan) -> None:
    """One untimed step of each method run, on a throwaway model and 8 samples: the first use
    of ``torch.func`` or ``torch.optim`` in a process imports modules for seconds, a cost of the
    process, not of the method that happens to run first."""
    x, y = p.problem.data(p.dtype, p.device)  # type: ignore[misc]
    x, y = x[:8], y[:8]
    for method in dict.fromkeys(base_method(r) for r in p.methods):
        row = next(r for r in p.methods if base_method(r) == method)
        model = p.problem.make_model(p.seed, p.dtype, p.device)
        opt = _build(method, p.settings[row], model, p.problem.loss,
                     torch.Generator(device=p.device).manual_seed(0))
        try:
            if method in STEEPEST_METHODS:
                opt.step(x, y)
            else:
                opt.step(_closure(opt, model, p.problem, x, y))
        except (SteepestError, torch.linalg.LinAlgError, FloatingPointError):
            pass  # the real run meets and records it


def _better(a: Run, b: Run | None) -> bool:
    """Whether ``a`` beats ``b`` in the tuning: reached the target sooner, else (neither
    reached it) a lower final loss; a diverged run never wins."""
    if b is None:
        return True
    if a.diverged != b.diverged:
        return not a.diverged
    ta = math.inf if a.time_to_target is None else a.time_to_target
    tb = math.inf if b.time_to_target is None else b.time_to_target
    if ta != tb:
        return ta < tb
    fa = a.final_loss if math.isfinite(a.final_loss) else math.inf
    fb = b.final_loss if math.isfinite(b.final_loss) else math.inf
    return fa < fb


@dataclass
class Plan:
    """A validated comparison, ready to run (everything checked, nothing computed yet).
    ``tuned``: the rows whose learning rate is searched on the first seed."""

    problem: Problem
    methods: list[str]
    settings: dict[str, dict[str, Any]]
    overrides: dict[str, dict[str, Any]]
    iters: int | None
    seconds: float | None
    seeds: list[int]
    device: torch.device
    dtype: torch.dtype
    tuned: list[str] = field(default_factory=list)
    clock: str = "wall"

    @property
    def seed(self) -> int:
        return self.seeds[0]

    @property
    def budget(self) -> str:
        if self.iters is not None:
            return f"{self.iters} iterations per method"
        cpu = " (process CPU time)" if self.clock == "cpu" else ""
        return f"{self.seconds:g} s of step time{cpu} per method"


def plan(problem: str | Problem, methods: str | Iterable[str] = "all", iters: int | None = None,
         time: float | None = None, seed: int = 0, device: str | torch.device = "cpu",
         dtype: str | torch.dtype = "float64",
         settings: Mapping[str, Mapping[str, Any]] | None = None,
         seeds: int = DEFAULT_SEEDS, tune: bool = True, clock: str = "wall") -> Plan:
    """Check every option (raising :class:`ConfigurationError`), build the problem and check
    it once for every method (:meth:`~steepest.problems.Problem.check`)."""
    check_budget(iters, time)
    if clock not in CLOCKS:
        raise ConfigurationError(f"clock must be one of {', '.join(CLOCKS)}, got {clock!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ConfigurationError(f"seed must be an integer in [0, 2^64), got {seed!r}.")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or not 1 <= seeds <= 1000:
        raise ConfigurationError(f"seeds must be an integer from 1 to 1000, got {seeds!r}.")
    dev, dt = check_device(device), check_dtype(dtype)
    names = parse_methods(methods)
    prob = get_problem(problem)
    overrides = {m: dict(kv) for m, kv in (settings or {}).items()}
    resolved = resolve_settings(prob, names, overrides)
    prob.check(seed, dt, dev)  # once, for every method, before anything runs
    if iters is None and time is None:
        if prob.time is not None:
            time = prob.time
        else:
            iters = prob.iters
    tuned = [r for r in names if tune and base_method(r) in TUNED
             and not _user_set(r, "lr", overrides)]
    seed_list = [(seed + i) % SEED_LIMIT for i in range(seeds)]
    return Plan(prob, names, resolved, overrides, iters, time, seed_list, dev, dt, tuned, clock)


def _tune(p: Plan, row: str, progress: Progress | None) -> tuple[dict[str, Any], Run]:
    """The learning-rate search of a baseline on the first seed: ``lr`` times
    :data:`TUNE_FACTORS`, the best by time to target, else final loss. Returns the record and
    the chosen run (reused as the row's first seed)."""
    base = p.settings[row]
    grid = [base["lr"] * f for f in TUNE_FACTORS]
    best: Run | None = None
    trials = []
    for lr in grid:
        trial = _run_one(p.problem, row, {**base, "lr": lr}, p.iters, p.seconds, p.seed,
                         p.dtype, p.device, progress, p.clock)
        trials.append({"lr": lr, "time_to_target": trial.time_to_target,
                       "final_loss": _finite(trial.final_loss), "diverged": trial.diverged})
        if _better(trial, best):
            best = trial
    assert best is not None
    record = {"key": "lr", "grid": grid, "chosen": best.settings["lr"], "seed": p.seed,
              "judged": "time_to_target" if best.time_to_target is not None else "final_loss",
              "trials": trials}
    return record, best


def execute(p: Plan, progress: Progress | None = None) -> Comparison:
    """Run a :class:`Plan`: the learning-rate search of the baselines on the first seed, then
    every row on every seed (seed by seed, so a slow spell of a shared machine spreads over
    the rows), each row of one seed from the same initial weights."""
    env = _versions()
    prob = p.problem
    n_params = sum(q.numel() for q in prob.make_model(p.seed, p.dtype, "cpu").parameters()
                   if q.requires_grad)
    problem_info = {
        "name": prob.name, "description": prob.description,
        "loss": type(prob.loss).__name__,
        "hessian_is_fisher": bool(getattr(prob.loss, "hessian_is_fisher", False)),
        "target_loss": _finite(prob.target_loss),
        "test_metric": prob.test_metric_name if prob.test is not None else None,
        "higher_is_better": prob.higher_is_better, "n_train": prob.n_train,
        "n_test": prob.n_test, "parameters": n_params, "batch_size": prob.batch_size,
    }
    settings = {r: dict(s) for r, s in p.settings.items()}
    config = {
        "methods": p.methods, "iters": p.iters, "time": p.seconds, "clock": p.clock,
        "seeds": p.seeds,
        "tune": bool(p.tuned), "device": str(p.device),
        "dtype": str(p.dtype).replace("torch.", ""), "overrides": p.overrides,
        "settings": settings, "partial": False,
    }
    runs: list[Run] = []
    tuning: dict[str, Any] = {}
    done: dict[tuple[str, int], Run] = {}

    def result() -> Comparison:
        order = {r: i for i, r in enumerate(p.methods)}
        ordered = sorted(runs, key=lambda r: (order[r.method], p.seeds.index(r.seed)))
        return Comparison(problem_info, config, env, ordered,
                          summarize(problem_info, ordered, p.budget), tuning)

    try:
        _warm_up(p)
        for row in p.tuned:
            tuning[row], chosen = _tune(p, row, progress)
            settings[row] = dict(chosen.settings)
            done[(row, p.seed)] = chosen
        for seed in p.seeds:
            for row in p.methods:
                run_ = done.get((row, seed)) or _run_one(
                    prob, row, settings[row], p.iters, p.seconds, seed, p.dtype, p.device,
                    progress, p.clock)
                runs.append(run_)
    except KeyboardInterrupt:
        config["partial"] = True
        partial = result()
        partial.summary["sentence"] = (
            f"Interrupted: partial results, {len(runs)} of {len(p.methods) * len(p.seeds)} "
            "runs finished. " + partial.summary["sentence"])
        raise Interrupted(partial) from None
    return result()


def run(problem: str | Problem, methods: str | Iterable[str] = "all", iters: int | None = None,
        time: float | None = None, seed: int = 0, device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float64",
        settings: Mapping[str, Mapping[str, Any]] | None = None,
        progress: Progress | None = None, seeds: int = DEFAULT_SEEDS,
        tune: bool = True, clock: str = "wall") -> Comparison:
    """Compare methods on a problem (a registered name, ``file.py:function`` or a
    :class:`~steepest.problems.Problem`).

    Parameters
    ----------
    methods: row names (see :func:`parse_methods`) as a list or comma-separated string;
        ``"all"``; a variant ``"ggn[solver=woodbury]"`` is a row of its own
    iters / time: the budget of each run: steps, or seconds of its own step time (one of
        them; default the problem's ``time``, else its ``iters``)
    seed, seeds: the runs use seeds ``seed, seed + 1, ..., seed + seeds - 1`` (weights and
        sampling; every row of one seed starts from the same weights)
    tune: search the learning rate of Adam, SGD and L-BFGS on the first seed (``lr`` times
        :data:`TUNE_FACTORS`), unless the user set it
    device, dtype: where and in which precision to run
    settings: overrides per method, ``{"natural": {"damping": 1e-2}}``
    progress: called as ``progress(row, seed, iteration, loss, step_time)`` after each step
    clock: ``"wall"`` (default: wall-clock step time, :func:`time.perf_counter`) or
        ``"cpu"`` (the process's CPU time, :func:`time.process_time`: on a shared machine a
        run that waits for a core is not charged for the wait; with several torch threads it
        counts every thread's time)

    >>> result = run("toy2d", methods=["vanilla", "natural"], iters=10, seeds=3)
    >>> result.summary["sentence"]
    """
    return execute(plan(problem, methods, iters, time, seed, device, dtype, settings, seeds,
                        tune, clock), progress)


def save(result: Comparison, out: str | os.PathLike) -> list[str]:
    """Write results.json, the plots and report.html into ``out`` (see
    :func:`steepest.compare.report.write`); returns the paths written."""
    from .report import write

    return write(result, out)


__all__ = ["CLOCKS", "DEFAULT_SEEDS", "LABELS", "METHODS", "METHOD_DEFAULTS", "SEED_LIMIT",
           "ROW_METHODS", "STEEPEST_METHODS", "STRUCTURED_METHODS", "TORCH_METHODS", "TUNED",
           "TUNE_FACTORS", "Interrupted", "Plan",
           "base_method", "check_budget", "check_device", "check_dtype", "execute", "label",
           "method_key", "parse_methods", "parse_set", "plan", "resolve_settings", "run",
           "save", "split_method"]

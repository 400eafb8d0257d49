r"""The methods of ``steepest compare``: their names, default settings, variants
(``ggn[solver=woodbury]``) and the optimizer each row builds (:func:`resolve_settings`,
:func:`_build`). The steepest methods are :class:`~steepest.optimizer.Optimizer` with one metric
each:

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

Example
-------
>>> from steepest.compare import parse_methods, split_method
>>> parse_methods("ggn, ggn[solver=cg], adam")
['ggn', 'ggn[solver=cg]', 'adam']
>>> split_method("kfac[T_inv=5, base=ggn]")
('kfac', {'T_inv': '5', 'base': 'ggn'})
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..damping import Constant, LevenbergMarquardt, MoreTrustRegion
from ..diagonal import Diagonal
from ..ekfac import EKFAC
from ..errors import ConfigurationError, SteepestError
from ..kronecker import KFAC
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
from ..solvers import CG, Auto, Cholesky, Woodbury
from ..steps import Armijo, LearningRate, TrustRegion

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


__all__ = ["LABELS", "METHODS", "METHOD_DEFAULTS", "ROW_METHODS", "STEEPEST_METHODS",
           "STRUCTURED_METHODS", "TORCH_METHODS", "base_method", "label", "method_key",
           "parse_methods", "parse_set", "resolve_settings", "split_method"]

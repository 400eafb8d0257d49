r"""``steepest compare``: the six methods of Table 1 (000) and three ``torch.optim`` baselines,
side by side on one problem.

Every method starts from the same weights (the problem's model factory with the run's seed)
and runs for the same budget (``iters`` steps, or ``time`` seconds of its own step time). The
steepest methods are :class:`~steepest.optimizer.Optimizer` with one metric each:

======================  =====================================  ================================
method                  M (000 Table 1)                        default settings
======================  =====================================  ================================
``vanilla``             ``Identity()``                         lr per problem, no damping, CG
``gauss-newton``        ``GaussNewton()``  E[J^T J]            LM damping 1e-3, lr 1, auto
``natural``             ``Fisher()``       E[J^T F_R J]        LM damping 1e-3, lr 1, auto
``empirical-fisher``    ``EmpiricalFisher()``                  LM damping 1e-3, lr 1, auto
``gradient-covariance`` ``GradientCovariance(centered=True)``  LM damping 1e-3, lr 1, auto
``newton``              ``Hessian()``                          LM damping 1e-3, lr 1, auto
``ggn``                 ``GGN()``          E[J^T H_L J]        LM damping 1e-3, lr 1, auto
``adam``                ``torch.optim.Adam``                   lr 1e-2 (per problem), betas
``sgd``                 ``torch.optim.SGD``                    lr 1e-2 (per problem), momentum
``lbfgs``               ``torch.optim.LBFGS``                  lr 1, history 10, strong Wolfe
======================  =====================================  ================================

"LM damping" is :class:`~steepest.damping.LevenbergMarquardt` (lambda adapted from the
reduction ratio, a step that raises the loss is undone and retried). The full table of keys
is :data:`METHOD_DEFAULTS`; each problem overrides some (``Problem.defaults``, listed by
``steepest problems --defaults``), and the user overrides any key: ``settings={"natural":
{"damping": 1e-2}}`` here, ``--set natural.damping=1e-2`` on the command line. Keys:

- steepest methods: ``damping`` (lambda, the initial one for LM), ``adaptive_damping``
  (LevenbergMarquardt if true, else a constant lambda), ``step`` (``lr``: delta = -lr
  (M+lambda I)^-1 g; ``trust-region``: delta^T (M+lambda I) delta = eps^2, adaptive;
  ``armijo``: backtracking from lr; ``scaled-trust-region``: Moré's trust region on the scaled
  step, ``damping=MoreTrustRegion()``, which then replaces ``damping``/``adaptive_damping``
  and ``lr``), ``lr``, ``eps``, ``solver`` (auto, cg, cholesky,
  woodbury), ``cg_maxiter`` (0: the solver's default), ``momentum``; ``natural`` also
  ``mc_samples`` (0: exact Fisher), ``gradient-covariance`` also ``centered``.
- ``adam``: ``lr``, ``beta1``, ``beta2``; ``sgd``: ``lr``, ``momentum``; ``lbfgs``: ``lr``,
  ``history_size``, ``line_search`` (``strong_wolfe`` or ``none``).

One iteration is one ``step`` of the method (for L-BFGS one outer iteration with its line
search). A run whose loss becomes NaN/inf, or that raises a steepest error, is recorded as
diverged and stopped; the others go on.

Example
-------
>>> from steepest import compare
>>> result = compare.run("regression", methods=["vanilla", "ggn", "adam"], iters=20)
>>> result.summary["sentence"]
>>> compare.save(result, "out")          # results.json, plots, report.html
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import torch
from torch import Tensor, nn

from .damping import Constant, LevenbergMarquardt, MoreTrustRegion
from .errors import ConfigurationError, SteepestError
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
from .optimizer import Optimizer
from .problems import Problem
from .problems import get as get_problem
from .solvers import CG, Auto, Cholesky, Woodbury
from .steps import Armijo, LearningRate, TrustRegion

SCHEMA = "steepest.compare/1"

STEEPEST_METHODS = ("vanilla", "gauss-newton", "natural", "empirical-fisher",
                    "gradient-covariance", "newton", "ggn")
TORCH_METHODS = ("adam", "sgd", "lbfgs")
METHODS = STEEPEST_METHODS + TORCH_METHODS

LABELS = {
    "vanilla": "vanilla gradient", "gauss-newton": "Gauss-Newton", "natural": "natural gradient",
    "empirical-fisher": "empirical Fisher", "gradient-covariance": "gradient covariance",
    "newton": "Newton", "ggn": "GGN", "adam": "Adam", "sgd": "SGD (momentum)",
    "lbfgs": "L-BFGS",
}

_STEEPEST_KEYS: dict[str, Any] = {
    "damping": 1e-3, "adaptive_damping": True, "step": "lr", "lr": 1.0, "eps": 0.1,
    "solver": "cg", "cg_maxiter": 50, "momentum": 0.0,
}

#: The global defaults of every method; a problem's ``defaults`` override them.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "vanilla": {**_STEEPEST_KEYS, "damping": 0.0, "adaptive_damping": False, "lr": 0.1,
                "cg_maxiter": 1},
    "gauss-newton": dict(_STEEPEST_KEYS),
    "natural": {**_STEEPEST_KEYS, "mc_samples": 0},
    "empirical-fisher": dict(_STEEPEST_KEYS),
    "gradient-covariance": {**_STEEPEST_KEYS, "centered": True},
    "newton": dict(_STEEPEST_KEYS),
    "ggn": dict(_STEEPEST_KEYS),
    "adam": {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999},
    "sgd": {"lr": 1e-2, "momentum": 0.9},
    "lbfgs": {"lr": 1.0, "history_size": 10, "line_search": "strong_wolfe"},
}

_CHOICES = {
    "step": ("lr", "trust-region", "armijo", "scaled-trust-region"),
    "solver": ("auto", "cg", "cholesky", "woodbury"),
    "line_search": ("strong_wolfe", "none"),
}

_METRICS: dict[str, Callable[[dict], Metric]] = {
    "vanilla": lambda s: Identity(),
    "gauss-newton": lambda s: GaussNewton(),
    "natural": lambda s: Fisher(mc_samples=s["mc_samples"] or None),
    "empirical-fisher": lambda s: EmpiricalFisher(),
    "gradient-covariance": lambda s: GradientCovariance(centered=s["centered"]),
    "newton": lambda s: Hessian(),
    "ggn": lambda s: GGN(),
}

MAX_ITERS = 10**7  # the iteration cap of a time-budgeted run
SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes seeds in [0, 2^64)


# ---------------------------------------------------------------------------- settings
def parse_methods(methods: str | Iterable[str]) -> list[str]:
    """Method names from a comma-separated string or a list; ``all`` means every method.

    >>> parse_methods("ggn,adam")
    ['ggn', 'adam']
    """
    items = methods.split(",") if isinstance(methods, str) else list(methods)
    out: list[str] = []
    for raw in items:
        name = str(raw).strip().lower()
        if not name:
            continue
        if name == "all":
            out.extend(m for m in METHODS if m not in out)
            continue
        if name not in METHODS:
            raise ConfigurationError(
                f"unknown method {name!r}; choose from {', '.join(METHODS)} or 'all'."
            )
        if name not in out:
            out.append(name)
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
    if key in _CHOICES and s not in _CHOICES[key]:
        raise ConfigurationError(f"{where} must be one of {', '.join(_CHOICES[key])}, got "
                                 f"{value!r}.")
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
    """The settings of each method: :data:`METHOD_DEFAULTS`, then the problem's defaults, then
    ``overrides``; unknown methods or keys raise :class:`ConfigurationError`, as do settings the
    optimizer refuses (checked by building each optimizer on a throw-away model)."""
    overrides = overrides or {}
    for method, kv in overrides.items():
        if method not in METHODS:
            raise ConfigurationError(
                f"unknown method {method!r} in a setting; choose from {', '.join(METHODS)}."
            )
        if method not in methods:
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
    for method in methods:
        base = dict(METHOD_DEFAULTS[method])
        for layer, origin in ((problem.defaults.get(method, {}), f"problem {problem.name!r}"),
                              (overrides.get(method, {}), "the overrides")):
            for key, value in layer.items():
                if key not in base:
                    raise ConfigurationError(
                        f"unknown setting {method}.{key} in {origin}; the keys of {method} are "
                        f"{', '.join(METHOD_DEFAULTS[method])}."
                    )
                base[key] = _convert(method, key, value, METHOD_DEFAULTS[method][key])
        out[method] = base
        _build(method, base, nn.Linear(1, 1).double(), problem.loss, torch.Generator())
    return out


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


# ---------------------------------------------------------------------------- results
@dataclass
class Run:
    """One method's run. ``curve`` holds parallel lists: iteration (0 = the start), time
    (seconds of step time before that point) and the full training loss there."""

    method: str
    label: str
    settings: dict[str, Any]
    iterations: int = 0
    wall_time: float = 0.0
    final_loss: float = math.nan
    best_loss: float = math.nan
    test_metric: float | None = None
    time_to_target: float | None = None
    iters_to_target: int | None = None
    diverged: bool = False
    error: str | None = None
    curve: dict[str, list] = field(default_factory=lambda: {"iteration": [], "time": [],
                                                             "loss": []})


@dataclass
class Comparison:
    """What :func:`run` returns; ``to_dict()`` is the content of results.json (see
    :data:`SCHEMA_DOC`)."""

    problem: dict[str, Any]
    config: dict[str, Any]
    environment: dict[str, Any]
    runs: list[Run]
    summary: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "problem": self.problem, "config": self.config,
                "environment": self.environment, "runs": [asdict(r) for r in self.runs],
                "summary": self.summary}


SCHEMA_DOC = """results.json (schema "steepest.compare/1"); floats are null where not finite.

{
  "schema": "steepest.compare/1",
  "problem": {"name", "description", "target_loss": float|null, "test_metric": name|null,
              "higher_is_better": bool, "n_train", "n_test", "parameters": int,
              "batch_size": int|null},
  "config": {"methods": [names], "iters": int|null, "time": seconds|null, "seed": int,
             "device": "cpu"|"cuda...", "dtype": "float32"|"float64",
             "overrides": {method: {key: value}}, "settings": {method: {key: value}},
             "partial": true when Ctrl-C stopped the comparison (only finished runs kept)},
  "environment": {"steepest", "python", "torch", "numpy", "scipy", "matplotlib",
                  "scikit-learn", "platform", "machine", "processor", "cpu_count",
                  "torch_threads", "cuda_device": name|null, "started": ISO 8601 UTC},
  "runs": [{"method", "label", "settings": {key: value},
            "iterations": steps taken, "wall_time": seconds of step time,
            "final_loss", "best_loss": training loss (full training set),
            "test_metric": float|null, "time_to_target": seconds|null,
            "iters_to_target": int|null, "diverged": bool, "error": message|null,
            "curve": {"iteration": [0, 1, ...], "time": [0.0, ...], "loss": [...]}}],
  "summary": {"first_to_target": method|null, "best_test": method|null,
              "best_loss": method|null, "sentence": the one-sentence answer}
}
Time is the time spent inside the method's steps (the loss evaluations that record the
curve are not counted); "time_to_target" is the first curve time with loss <= target_loss.
"""


def _versions() -> dict[str, Any]:
    from importlib import metadata

    env: dict[str, Any] = {}
    for dist in ("steepest", "torch", "numpy", "scipy", "matplotlib", "scikit-learn"):
        try:
            env[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            env[dist] = None
    env.update(
        python=sys.version.split()[0], platform=platform.platform(), machine=platform.machine(),
        processor=platform.processor() or None, cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        cuda_device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        started=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    return env


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _fmt_time(t: float) -> str:
    return f"{t:.2f} s" if t >= 0.01 else f"{t * 1000:.1f} ms"


def summarize(problem: dict[str, Any], runs: list[Run]) -> dict[str, Any]:
    """Who reached the target first, who ended best on the test metric (or the training loss
    when there is none), and the one-sentence answer."""
    target = problem["target_loss"]
    reached = [r for r in runs if r.time_to_target is not None]
    first = min(reached, key=lambda r: (r.time_to_target, r.iters_to_target)) if reached else None
    alive = [r for r in runs if not r.diverged and math.isfinite(r.final_loss)]
    best_loss = min(alive, key=lambda r: r.final_loss) if alive else None
    tested = [r for r in alive if r.test_metric is not None and math.isfinite(r.test_metric)]
    sign = -1 if problem["higher_is_better"] else 1
    best_test = min(tested, key=lambda r: sign * r.test_metric) if tested else None
    name = problem["name"]
    if target is None:
        first_part = f"On {name} (no target loss set)"
    elif first is not None:
        first_part = (f"On {name}, {first.label} reached the target training loss {target:.4g} "
                      f"first ({_fmt_time(first.time_to_target)}, {first.iters_to_target} "
                      "iterations)")
    else:
        first_part = f"On {name}, no method reached the target training loss {target:.4g}"
    if best_test is not None:
        second = (f"{best_test.label} ended best on the {problem['test_metric']} "
                  f"({best_test.test_metric:.4g})")
    elif best_loss is not None:
        second = (f"{best_loss.label} ended with the lowest training loss "
                  f"({best_loss.final_loss:.4g}; the problem has no test metric)")
    else:
        second = "every method diverged"
    return {
        "first_to_target": first.method if first else None,
        "best_test": best_test.method if best_test else None,
        "best_loss": best_loss.method if best_loss else None,
        "sentence": f"{first_part}, and {second}.",
    }


# ---------------------------------------------------------------------------- running
class Interrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`execute`: a ``KeyboardInterrupt`` that carries the runs that
    finished before it as ``partial`` (a :class:`Comparison` with ``config["partial"] = True``),
    so they can still be saved."""

    def __init__(self, partial: Comparison) -> None:
        super().__init__("interrupted")
        self.partial = partial


Progress = Callable[[str, int, float, float], None]  # (method, iteration, loss, elapsed)


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


def _run_one(problem: Problem, method: str, settings: dict[str, Any], iters: int | None,
             seconds: float | None, seed: int, dtype: torch.dtype, device: torch.device,
             progress: Progress | None) -> Run:
    run = Run(method, LABELS[method], dict(settings))
    model = problem.make_model(seed, dtype, device)
    x, y = problem.data(dtype, device)  # type: ignore[misc]
    gen = torch.Generator(device=device).manual_seed(seed)
    batch_gen = torch.Generator(device=device).manual_seed((seed + 1) % SEED_LIMIT)
    opt = _build(method, settings, model, problem.loss, gen)
    target = problem.target_loss

    def record(k: int, t: float, value: float) -> None:
        run.curve["iteration"].append(k)
        run.curve["time"].append(t)
        run.curve["loss"].append(_finite(value))
        if (target is not None and run.time_to_target is None and math.isfinite(value)
                and value <= target):
            run.time_to_target, run.iters_to_target = t, k

    loss0 = _full_loss(model, problem, x, y)
    record(0, 0.0, loss0)
    if progress:
        progress(method, 0, loss0, 0.0)
    clock, k, value = 0.0, 0, loss0
    limit = iters if iters is not None else MAX_ITERS
    while k < limit and (seconds is None or clock < seconds):
        if problem.batch_size is not None and problem.batch_size < x.shape[0]:
            idx = torch.randperm(x.shape[0], generator=batch_gen, device=device)
            idx = idx[: problem.batch_size]
            bx, by = x[idx], y[idx]
        else:
            bx, by = x, y
        t0 = time.perf_counter()
        try:
            if method in STEEPEST_METHODS:
                opt.step(bx, by)
            else:
                opt.step(_closure(opt, model, problem, bx, by))
            _sync(device)
        except (SteepestError, torch.linalg.LinAlgError, FloatingPointError) as err:
            clock += time.perf_counter() - t0
            run.diverged, run.error = True, f"{type(err).__name__}: {err}"
            break
        clock += time.perf_counter() - t0
        k += 1
        value = _full_loss(model, problem, x, y)
        record(k, clock, value)
        if progress:
            progress(method, k, value, clock)
        if not math.isfinite(value):
            run.diverged, run.error = True, "the training loss became NaN or infinite"
            break
    run.iterations, run.wall_time = k, clock
    losses = [v for v in run.curve["loss"] if v is not None]
    run.final_loss = value if math.isfinite(value) else math.nan
    run.best_loss = min(losses) if losses else math.nan
    if not run.diverged:
        run.test_metric = _finite(problem.evaluate_test(model, dtype, device))
    return run


@dataclass
class Plan:
    """A validated comparison, ready to run (everything checked, nothing computed yet)."""

    problem: Problem
    methods: list[str]
    settings: dict[str, dict[str, Any]]
    overrides: dict[str, dict[str, Any]]
    iters: int | None
    seconds: float | None
    seed: int
    device: torch.device
    dtype: torch.dtype


def plan(problem: str | Problem, methods: str | Iterable[str] = "all", iters: int | None = None,
         time: float | None = None, seed: int = 0, device: str | torch.device = "cpu",
         dtype: str | torch.dtype = "float64",
         settings: Mapping[str, Mapping[str, Any]] | None = None) -> Plan:
    """Check every option (raising :class:`ConfigurationError`) and build the problem."""
    check_budget(iters, time)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ConfigurationError(f"seed must be an integer in [0, 2^64), got {seed!r}.")
    dev, dt = check_device(device), check_dtype(dtype)
    names = parse_methods(methods)
    prob = get_problem(problem)
    overrides = {m: dict(kv) for m, kv in (settings or {}).items()}
    resolved = resolve_settings(prob, names, overrides)
    prob.check(seed, dt, dev)  # once, for every method, before anything runs
    if iters is None and time is None:
        iters = prob.iters
    return Plan(prob, names, resolved, overrides, iters, time, seed, dev, dt)


def execute(p: Plan, progress: Progress | None = None) -> Comparison:
    """Run a :class:`Plan`: every method from the same initial weights."""
    env = _versions()
    prob = p.problem
    n_params = sum(q.numel() for q in prob.make_model(p.seed, p.dtype, "cpu").parameters()
                   if q.requires_grad)
    problem_info = {
        "name": prob.name, "description": prob.description,
        "target_loss": _finite(prob.target_loss),
        "test_metric": prob.test_metric_name if prob.test is not None else None,
        "higher_is_better": prob.higher_is_better, "n_train": prob.n_train,
        "n_test": prob.n_test, "parameters": n_params, "batch_size": prob.batch_size,
    }
    config = {
        "methods": p.methods, "iters": p.iters, "time": p.seconds, "seed": p.seed,
        "device": str(p.device), "dtype": str(p.dtype).replace("torch.", ""),
        "overrides": p.overrides, "settings": p.settings,
    }
    runs: list[Run] = []
    try:
        for m in p.methods:
            runs.append(_run_one(prob, m, p.settings[m], p.iters, p.seconds, p.seed, p.dtype,
                                 p.device, progress))
    except KeyboardInterrupt:
        config["partial"] = True
        partial = Comparison(problem_info, config, env, runs, summarize(problem_info, runs))
        partial.summary["sentence"] = (
            f"Interrupted: partial results, {len(runs)} of {len(p.methods)} methods finished. "
            + partial.summary["sentence"])
        raise Interrupted(partial) from None
    config["partial"] = False
    return Comparison(problem_info, config, env, runs, summarize(problem_info, runs))


def run(problem: str | Problem, methods: str | Iterable[str] = "all", iters: int | None = None,
        time: float | None = None, seed: int = 0, device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float64",
        settings: Mapping[str, Mapping[str, Any]] | None = None,
        progress: Progress | None = None) -> Comparison:
    """Compare methods on a problem (a registered name, ``file.py:function`` or a
    :class:`~steepest.problems.Problem`).

    Parameters
    ----------
    methods: names (see :data:`METHODS`) as a list or comma-separated string; ``"all"``
    iters / time: the budget of each method: steps, or seconds of step time (one of them;
        default the problem's ``iters``)
    seed: the weights' seed (the same for every method) and the seed of sampling
    device, dtype: where and in which precision to run
    settings: overrides, ``{"natural": {"damping": 1e-2}}``
    progress: called as ``progress(method, iteration, loss, elapsed)`` after each step

    >>> result = run("toy2d", methods=["vanilla", "natural"], iters=10)
    >>> [r.final_loss for r in result.runs]
    """
    return execute(plan(problem, methods, iters, time, seed, device, dtype, settings), progress)


def save(result: Comparison, out: str | os.PathLike) -> list[str]:
    """Write results.json, the plots and report.html into ``out`` (see
    :func:`steepest.report.write`); returns the paths written."""
    from .report import write

    return write(result, out)


__all__ = ["LABELS", "METHODS", "METHOD_DEFAULTS", "SCHEMA", "SCHEMA_DOC", "Comparison",
           "Interrupted", "Plan",
           "Run", "check_budget", "check_device", "check_dtype", "execute", "parse_methods",
           "parse_set", "plan", "resolve_settings", "run", "save", "summarize"]

r"""The runner of ``steepest compare``: the six methods of Table 1 (000) and three
``torch.optim`` baselines, side by side on one problem, on several seeds.

Every row (a method, or a variant of one such as ``ggn[solver=woodbury]``) starts from the
same weights for a given seed (the problem's model factory with that seed) and runs for the
same budget: by default the problem's wall-time budget (``Problem.time`` seconds of the run's
own step time; the evaluations that record the curves are not counted), else ``iters`` steps.
A time budget is checked before each step, so a run stops within one step of it. The
steepest methods are :class:`~steepest.optimizer.Optimizer` with one metric each, the
baselines ``torch.optim`` optimizers: the methods, their default settings and keys are in
:mod:`~steepest.compare.methods`.


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

from ..errors import ConfigurationError, SteepestError
from ..problems import Problem
from ..problems import get as get_problem
from .methods import (
    STEEPEST_METHODS,
    _build,
    _user_set,
    base_method,
    label,
    parse_methods,
    resolve_settings,
)
from .results import Comparison, Run, summarize

MAX_ITERS = 10**7  # the iteration cap of a time-budgeted run
SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes seeds in [0, 2^64)
DEFAULT_SEEDS = 3
#: the baselines whose learning rate is searched, and the grid around the problem's default
TUNED = ("adam", "sgd", "lbfgs")
TUNE_FACTORS = (0.25, 1.0, 4.0)
#: the clocks a budget and the curves' times can be read on
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


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


__all__ = ["CLOCKS", "DEFAULT_SEEDS", "SEED_LIMIT", "TUNED", "TUNE_FACTORS", "Interrupted",
           "Plan", "check_budget", "check_device", "check_dtype", "execute", "plan", "run",
           "save"]

"""Built-in problems for ``steepest compare`` and ``steepest geometry``, and how to add one.

A :class:`Problem` is a plain dataclass: a model factory ``make_model(seed, dtype, device)``,
a loss, train (and optionally test) data, the target training loss that defines "time to
target", a test metric, and per-method default settings (which override the global table
:data:`steepest.compare.METHOD_DEFAULTS`). Everything is built from data shipped with
scikit-learn or generated from a seed: nothing is downloaded.

=================  ==========================================================================
name               problem
=================  ==========================================================================
``quadratic``      ill-conditioned convex quadratic (least squares, condition number 1e3);
                   ``quadratic-noisy``: the same with mini-batch gradient noise (Martens 14)
``toy2d``          Gaussian with a learned mean and log-scale: two parameters (000 Figure 2)
``logistic``       logistic regression on breast-cancer (standardized), test accuracy
``digits``         tanh MLP classifier on the 8x8 digits, held-out test accuracy
``regression``     nonlinear least squares by a small tanh MLP, held-out RMSE
``heteroscedastic`` MLP predicting mean and log-variance (GaussianNLL), held-out NLL
``autoencoder``    deep tanh autoencoder on digits images (Bernoulli outputs), scaled-down
                   Hessian-free benchmark of Hinton & Salakhutdinov / Martens 2010
=================  ==========================================================================

Your own problem, from Python or from the command line
(``steepest compare --problem my_problem.py:make_problem``):

>>> from steepest.problems import Problem
>>> def make_problem() -> Problem:
...     x = torch.randn(100, 3, dtype=torch.float64); y = x.sum(1, keepdim=True)
...     return Problem("sum", "learn a sum", lambda seed, dtype, device: linear(seed, dtype),
...                    MSE(), (x, y), target_loss=1e-4)
>>> steepest.compare.run(make_problem(), methods=["vanilla", "ggn"], iters=20)
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigurationError, SteepestError
from ..losses import Loss

ModelFactory = Callable[[int, torch.dtype, torch.device], nn.Module]
TestMetric = Callable[[Tensor, Tensor], float]  # (model outputs z, targets y) -> a number


@dataclass
class Problem:
    """One optimization problem: model, loss, data, target and test metric.

    Parameters
    ----------
    name, description: a short name and a one-line description
    make_model: ``(seed, dtype, device) -> nn.Module``; the same seed gives the same weights,
        so every method starts from the same point
    loss: a :class:`~steepest.losses.Loss` (the per-sample atomic loss; the mean is minimized)
    train: ``(inputs, targets)``; floating tensors are cast to the run's dtype, all moved to its
        device
    test: held-out ``(inputs, targets)`` or None
    target_loss: the training loss that counts as "reached" (time and iterations to target)
    test_metric: ``(z_test, y_test) -> float`` on the model outputs, or None
    test_metric_name: e.g. ``"test accuracy"``
    higher_is_better: whether a larger test metric is better
    defaults: per-method settings overriding :data:`steepest.compare.METHOD_DEFAULTS`, e.g.
        ``{"vanilla": {"lr": 0.5}, "newton": {"damping": 1e-1}}``
    iters: the iteration budget of ``compare`` on this problem when it has no ``time``
    time: the default budget of ``compare``: seconds of each run's own step time (equal
        wall-time budgets), or None for ``iters`` steps
    batch_size: None for full-batch steps; else each step draws a mini-batch of this size
        (gradient noise) with the run's generator
    two_params: the problem has exactly two parameters (``steepest geometry`` can draw it)
    """

    name: str
    description: str
    make_model: ModelFactory
    loss: Loss
    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor] | None = None
    target_loss: float | None = None
    test_metric: TestMetric | None = None
    test_metric_name: str = ""
    higher_is_better: bool = False
    defaults: dict[str, dict[str, Any]] = field(default_factory=dict)
    iters: int = 50
    time: float | None = None
    batch_size: int | None = None
    two_params: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.loss, Loss):
            raise ConfigurationError(
                f"Problem {self.name!r}: loss must be a steepest.losses.Loss instance, got "
                f"{type(self.loss).__name__}; wrap a callable with steepest.losses.as_loss."
            )
        for part, data in (("train", self.train), ("test", self.test)):
            if data is None and part == "test":
                continue
            if not (isinstance(data, tuple) and len(data) == 2
                    and all(isinstance(t, Tensor) for t in data)):
                raise ConfigurationError(
                    f"Problem {self.name!r}: {part} must be a tuple (inputs, targets) of "
                    "tensors."
                )
            if data[0].shape[0] != data[1].shape[0]:
                raise ConfigurationError(
                    f"Problem {self.name!r}: {part} inputs have {data[0].shape[0]} rows but "
                    f"targets {data[1].shape[0]}."
                )
        if self.iters < 1:
            raise ConfigurationError(f"Problem {self.name!r}: iters must be >= 1.")
        if self.time is not None and not (isinstance(self.time, int | float)
                                          and 0 < self.time < float("inf")):
            raise ConfigurationError(
                f"Problem {self.name!r}: time must be a positive number of seconds or None, "
                f"got {self.time!r}."
            )
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigurationError(f"Problem {self.name!r}: batch_size must be >= 1.")
        if self.test is not None and self.test_metric is None:
            self.test_metric_name = self.test_metric_name or "test loss"
        elif self.test_metric is not None and not self.test_metric_name:
            self.test_metric_name = "test metric"

    @property
    def n_train(self) -> int:
        return int(self.train[0].shape[0])

    @property
    def n_test(self) -> int:
        return 0 if self.test is None else int(self.test[0].shape[0])

    def data(self, dtype: torch.dtype, device: torch.device | str,
             part: str = "train") -> tuple[Tensor, Tensor] | None:
        """The train or test data cast to ``dtype`` (floating tensors only) on ``device``."""
        pair = self.train if part == "train" else self.test
        if pair is None:
            return None
        return tuple(t.to(device=device, dtype=dtype) if t.is_floating_point()
                     else t.to(device=device) for t in pair)  # type: ignore[return-value]

    def check(self, seed: int = 0, dtype: torch.dtype = torch.float64,
              device: torch.device | str = "cpu") -> None:
        """Build the model once and check that its outputs fit the loss and the targets, on
        the training and the test data, before any method runs.

        The loss's own ``check(z, y)`` refuses shapes that would broadcast (an ``(N, 3)``
        output against ``(N, 1)`` targets under MSE); ``value(z, y)`` must give one finite
        number per sample. Every method (the steepest ones and the ``torch.optim`` baselines)
        then sees a problem that was checked the same way.

        Raises
        ------
        ConfigurationError
            naming the problem, the part (train/test) and what did not fit.

        >>> get("regression").check()
        """
        try:
            model = self.make_model(seed, dtype, torch.device(device))
        except SteepestError:
            raise
        except Exception as err:
            raise ConfigurationError(
                f"problem {self.name!r}: make_model(seed, dtype, device) raised "
                f"{_describe(err)}."
            ) from err
        for part in ("train", "test"):
            data = self.data(dtype, device, part)
            if data is None:
                continue
            x, y = data
            n = min(int(x.shape[0]), 64)
            where = f"problem {self.name!r} ({part} data)"
            try:
                with torch.no_grad():
                    z = model(x[:n])
                    self.loss.check(z, y[:n])
                    value = self.loss.value(z, y[:n])
            except SteepestError as err:
                raise ConfigurationError(
                    f"{where}: {err} (checked once before any method runs)"
                ) from err
            except Exception as err:
                raise ConfigurationError(
                    f"{where}: evaluating the model and the loss raised {_describe(err)}."
                ) from err
            if not isinstance(value, Tensor) or tuple(value.shape) != (n,):
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ConfigurationError(
                    f"{where}: the loss must give one value per sample, shape ({n},), got "
                    f"{shape}; check the output and target shapes."
                )
            if part == "train" and not bool(torch.isfinite(value).all()):
                raise ConfigurationError(
                    f"{where}: the loss is not finite at the initial weights; check the data "
                    "and the model's initialisation."
                )

    def evaluate_test(self, model: nn.Module, dtype: torch.dtype,
                      device: torch.device | str) -> float | None:
        """The test metric of ``model`` (the mean test loss when no metric is given)."""
        test = self.data(dtype, device, "test")
        if test is None:
            return None
        with torch.no_grad():
            z = model(test[0])
            if self.test_metric is None:
                return float(self.loss.value(z, test[1]).mean())
            return float(self.test_metric(z, test[1]))


@dataclass(frozen=True)
class _Entry:
    description: str
    factory: Callable[[], Problem]


_REGISTRY: dict[str, _Entry] = {}


def register(name: str, description: str, factory: Callable[[], Problem]) -> None:
    """Add a problem under ``name``: ``factory()`` builds it (lazily: data loads on use).

    >>> register("mine", "my problem", make_problem)
    """
    if not name or any(c.isspace() for c in name):
        raise ConfigurationError(f"a problem name must be a non-empty word, got {name!r}.")
    _REGISTRY[name] = _Entry(description, factory)


def names() -> list[str]:
    """The registered problem names, in registration order."""
    return list(_REGISTRY)


def describe() -> list[tuple[str, str]]:
    """(name, one-line description) of each registered problem."""
    return [(k, e.description) for k, e in _REGISTRY.items()]


def _describe(err: BaseException) -> str:
    """``TypeName: message`` on one line, with the line number of a syntax error."""
    if isinstance(err, SyntaxError):
        return f"SyntaxError at line {err.lineno}: {err.msg}"
    return " ".join(f"{type(err).__name__}: {err}".split())


def _load_file(spec: str) -> Problem:
    path_s, _, func = spec.rpartition(":")
    path = Path(path_s)
    if not path.is_file():
        raise ConfigurationError(f"problem file {path_s!r} does not exist; pass "
                                 "path/to/file.py:function_name.")
    if not func.isidentifier():
        raise ConfigurationError(f"{func!r} in --problem {spec!r} is not a function name; pass "
                                 "path/to/file.py:function_name.")
    mod_name = f"_steepest_user_problem_{abs(hash(str(path.resolve())))}"
    spec_obj = importlib.util.spec_from_file_location(mod_name, path)
    if spec_obj is None or spec_obj.loader is None:
        raise ConfigurationError(f"cannot import {path_s!r} as a Python file.")
    module = importlib.util.module_from_spec(spec_obj)
    sys.modules[mod_name] = module
    try:
        spec_obj.loader.exec_module(module)
    except SteepestError:
        sys.modules.pop(mod_name, None)
        raise
    except Exception as err:  # a user's file: a syntax error, an import that fails, ...
        sys.modules.pop(mod_name, None)
        raise ConfigurationError(
            f"problem file {path_s!r} failed to import: {_describe(err)}; fix the file (run "
            f"`python {path_s}` to see the traceback)."
        ) from err
    fn = getattr(module, func, None)
    if not callable(fn):
        raise ConfigurationError(f"{path_s!r} has no function {func!r}.")
    try:
        problem = fn()
    except SteepestError:
        raise
    except Exception as err:
        raise ConfigurationError(
            f"{spec}: calling {func}() raised {_describe(err)}; fix the function (call it in "
            "Python to see the traceback)."
        ) from err
    if not isinstance(problem, Problem):
        raise ConfigurationError(
            f"{spec} returned {type(problem).__name__}, not a steepest.problems.Problem."
        )
    return problem


def get(name: str | Problem) -> Problem:
    """A problem by registered name, ``path/to/file.py:function`` or a Problem (returned as is).

    >>> problem = get("regression")
    """
    if isinstance(name, Problem):
        return name
    if isinstance(name, str) and name in _REGISTRY:
        return _REGISTRY[name].factory()
    if isinstance(name, str) and ".py:" in name:
        return _load_file(name)
    raise ConfigurationError(
        f"unknown problem {name!r}; choose one of {', '.join(names())} or pass "
        "path/to/file.py:function returning a steepest.problems.Problem."
    )


def check_name(name: str) -> None:
    """Raise :class:`ConfigurationError` for a name that is neither registered nor a file spec
    that exists (without building anything)."""
    if name in _REGISTRY:
        return
    if ".py:" in name:
        path_s = name.rpartition(":")[0]
        if Path(path_s).is_file():
            return
        raise ConfigurationError(f"problem file {path_s!r} does not exist; pass "
                                 "path/to/file.py:function_name.")
    raise ConfigurationError(
        f"unknown problem {name!r}; choose one of {', '.join(names())} or pass "
        "path/to/file.py:function returning a steepest.problems.Problem."
    )


from . import builtin as builtin  # noqa: E402  (registers the built-in problems)

__all__ = ["Problem", "builtin", "check_name", "describe", "get", "names", "register"]

"""The exceptions users can catch.

Every error raised by ``steepest`` derives from :class:`SteepestError`, and from the builtin
class that fits (``ValueError``, ``TypeError``, ...), so ``except ValueError`` keeps working.
Each message says what was wrong, the values seen, and what to do. :func:`all_finite` is the
test behind :class:`NonFiniteError`, shared by the points, the solvers and the preconditioner;
:func:`user_stacklevel` points a warning raised deep in the library at the user's line.
"""

from __future__ import annotations

import math
import os
import sys

import torch
from torch import Tensor


class SteepestError(Exception):
    """Base class of every error raised by steepest."""


class ShapeError(SteepestError, ValueError):
    """Model outputs, targets and loss disagree in shape or dtype."""


class TargetError(SteepestError, ValueError):
    """Targets hold values the loss cannot take (a class index out of range, ...)."""


class NonFiniteError(SteepestError, FloatingPointError):
    """An input, the loss, the gradient or a step is NaN or infinite."""


class SingularMatrixError(SteepestError, ValueError):
    """The damped matrix M + lambda I is singular or not positive definite."""


class DenseTooLargeError(SteepestError, MemoryError):
    """A dense matrix was asked for above the configured size limit."""


class LossNotProbabilisticError(SteepestError, TypeError):
    """A metric needs a predictive distribution but got a plain callable loss."""


class SolverError(SteepestError, RuntimeError):
    """A solver broke down or returned a direction that is not a descent direction."""


class ConfigurationError(SteepestError, ValueError):
    """An option has a value outside its domain."""


class ConfigurationTypeError(ConfigurationError, TypeError):
    """An option has the wrong type (a class where an instance is due, ...)."""


class BatchAxisError(ConfigurationError):
    """K-FAC / EKFAC cannot tell which axis of a layer's input holds the samples (no axis has
    the batch's size, or several do and the model couples them), where the per-sample rows
    matter (K-FAC-reduce, EKFAC's scalings, a signed GGN)."""


class SteepestWarning(UserWarning):
    """Base class of every warning issued by steepest."""


class ParameterChangeWarning(SteepestWarning):
    """The model's trainable parameters changed between steps (a layer frozen, unfrozen or
    replaced); the optimizer followed and reset the state that lived on the old set."""


class ConvergenceError(SteepestError, RuntimeError):
    """A fit ended without meeting its tolerances (``curve_fit``: scipy's RuntimeError)."""


class RankError(SteepestError, RuntimeError):
    """Under torch.distributed, another rank failed its part of the step (every rank raises)."""


def all_finite(t: Tensor) -> bool:
    """Whether every value of t is finite. One pass of ``sum``: a NaN or an infinity makes the
    sum non-finite, so a finite sum answers True; a non-finite sum (which finite values can
    also give, by overflow) is decided by ``torch.aminmax`` (NaN propagates into both
    extremes, an infinity into one). ``torch.isfinite(t).all()`` runs four element-wise
    kernels with two boolean temporaries (20 times slower on 670k floats, 1 thread); the sum
    is about twice as fast as ``aminmax``.

    >>> all_finite(torch.tensor([1.0, float("nan")]))
    False
    """
    if t.numel() == 0:
        return True
    t = t.detach()
    if math.isfinite(float(t.sum())):
        return True
    lo, hi = torch.aminmax(t)
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def check_tolerances(**tols: float) -> None:
    """Each stopping tolerance a finite number >= 0 (0 turns its rule off), before any state
    changes; a ConfigurationError naming the keyword otherwise.

    >>> check_tolerances(ftol=1e-8, gtol=0.0)
    """
    for name, val in tols.items():
        if not (_finite_number(val) and val >= 0):
            raise ConfigurationError(
                f"{name} must be a finite number >= 0 (0 turns the rule off), got {val!r}."
            )


def check_positive(**values: float) -> None:
    """Each value a finite number > 0 (a scale, a radius factor), before any state changes; a
    ConfigurationError naming the keyword otherwise.

    >>> check_positive(f_scale=0.1, factor=100.0)
    """
    for name, val in values.items():
        if not (_finite_number(val) and val > 0):
            raise ConfigurationError(f"{name} must be a finite number > 0, got {val!r}.")


def _finite_number(val) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(val, int | float) and not isinstance(val, bool) and math.isfinite(val)


def user_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` called by the caller of this function that
    attributes the warning to the first frame outside the ``steepest`` package: the user's
    line, however deep in the library the warning was raised.

    >>> warnings.warn("...", SteepestWarning, stacklevel=user_stacklevel())
    """
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(
        package + os.sep
    ):
        frame, level = frame.f_back, level + 1
    return level

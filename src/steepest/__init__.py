"""steepest: first- and second-order variants of gradient descent in one framework.

One sentence holds the library (Pierrot et al. 2019, problem (1) and Appendix A)::

    delta = -alpha (M + lambda I)^-1 g,    M one row of Table 1,    alpha from a step rule.

>>> import steepest
>>> opt = steepest.Optimizer(model, steepest.losses.CrossEntropy(), metric=steepest.GGN())
>>> info = opt.step(x, y)
"""

from . import compare, damping, errors, fit, linop, losses, metrics, problems, solvers, steps
from .damping import Constant, LevenbergMarquardt, MoreTrustRegion
from .diagonal import Diagonal
from .distributed import DataParallel
from .ekfac import EKFAC
from .errors import SteepestError
from .fit import OptimizeResult, curve_fit, least_squares, minimize
from .kronecker import KFAC
from .linop import LinearOperator
from .losses import MSE, BCEWithLogits, CrossEntropy, GaussianNLL, Loss
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
from .optimizer import Optimizer, StepInfo
from .params import ParamSpace
from .point import Point
from .preconditioner import Preconditioner
from .problems import Problem
from .solvers import CG, Auto, Cholesky, OwnInverse, Woodbury
from .steps import Armijo, KLLineSearch, LearningRate, TrustRegion
from .torch_optim import TorchOptimizer

__version__ = "0.1.0"


def curvature(model, loss, inputs, targets, metric) -> LinearOperator:
    """The metric M (a row of Table 1) of ``model`` on the batch, as a symmetric
    :class:`~steepest.linop.LinearOperator` on the flat vector of trainable parameters
    (``model.parameters()`` order, each flattened row-major).

    >>> M = steepest.curvature(model, CrossEntropy(), x, y, GGN())
    >>> M @ v, M.to_dense(), M.diagonal(), M.to_scipy()
    """
    point = Point(model, loss, inputs, targets)
    return metric.operator(point)


__all__ = [
    "Armijo",
    "Auto",
    "BCEWithLogits",
    "CG",
    "Cholesky",
    "Constant",
    "CrossEntropy",
    "DataParallel",
    "Diagonal",
    "EKFAC",
    "EmpiricalFisher",
    "Fisher",
    "GGN",
    "GaussNewton",
    "GaussianNLL",
    "GradientCovariance",
    "Hessian",
    "Identity",
    "KFAC",
    "KLLineSearch",
    "LearningRate",
    "LevenbergMarquardt",
    "MoreTrustRegion",
    "LinearOperator",
    "Loss",
    "MSE",
    "Metric",
    "OptimizeResult",
    "Optimizer",
    "OwnInverse",
    "ParamSpace",
    "Point",
    "Preconditioner",
    "Problem",
    "SteepestError",
    "StepInfo",
    "TorchOptimizer",
    "TrustRegion",
    "Woodbury",
    "compare",
    "curve_fit",
    "curvature",
    "damping",
    "errors",
    "fit",
    "linop",
    "least_squares",
    "losses",
    "metrics",
    "minimize",
    "problems",
    "solvers",
    "steps",
]

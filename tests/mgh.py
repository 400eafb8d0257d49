"""Classic nonlinear least-squares test problems (Moré, Garbow and Hillstrom 1981, "Testing
unconstrained optimization software", ACM TOMS 7) as residual functions r(x) in torch, their
standard starting points, and the model form that ``steepest.Optimizer`` takes: the residual
vector posed as m samples of one output (MSE against zeros), so the loss is
:math:`L = \\frac{1}{m}\\sum_i \\tfrac12 r_i^2`, scipy's cost / m.

Used by tests/test_evaluations.py and benchmarks/evaluations.py.
"""

from __future__ import annotations

import math

import torch
from torch import nn

D = torch.float64


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=D)


def rosenbrock(x):
    return torch.stack([10 * (x[1] - x[0] ** 2), 1 - x[0]])


def freudenstein_roth(x):
    return torch.stack(
        [
            -13 + x[0] + ((5 - x[1]) * x[1] - 2) * x[1],
            -29 + x[0] + ((x[1] + 1) * x[1] - 14) * x[1],
        ]
    )


def powell_badly_scaled(x):
    return torch.stack([1e4 * x[0] * x[1] - 1, torch.exp(-x[0]) + torch.exp(-x[1]) - 1.0001])


def beale(x):
    i = torch.arange(1, 4, dtype=D)
    return _t(1.5, 2.25, 2.625) - x[0] * (1 - x[1] ** i)


def jennrich_sampson(x):
    i = torch.arange(1, 11, dtype=D)
    return 2 + 2 * i - (torch.exp(i * x[0]) + torch.exp(i * x[1]))


def helical_valley(x):
    theta = torch.atan2(x[1], x[0]) / (2 * math.pi)
    return torch.stack(
        [10 * (x[2] - 10 * theta), 10 * (torch.sqrt(x[0] ** 2 + x[1] ** 2) - 1), x[2]]
    )


def box3d(x):
    t = 0.1 * torch.arange(1, 11, dtype=D)
    return torch.exp(-t * x[0]) - torch.exp(-t * x[1]) - x[2] * (torch.exp(-t) - torch.exp(-10 * t))


def powell_singular(x):
    return torch.stack(
        [
            x[0] + 10 * x[1],
            math.sqrt(5) * (x[2] - x[3]),
            (x[1] - 2 * x[2]) ** 2,
            math.sqrt(10) * (x[0] - x[3]) ** 2,
        ]
    )


def wood(x):
    return torch.stack(
        [
            10 * (x[1] - x[0] ** 2),
            1 - x[0],
            math.sqrt(90) * (x[3] - x[2] ** 2),
            1 - x[2],
            math.sqrt(10) * (x[1] + x[3] - 2),
            (x[1] - x[3]) / math.sqrt(10),
        ]
    )


def bard(x):
    y = _t(.14, .18, .22, .25, .29, .32, .35, .39, .37, .58, .73, .96, 1.34, 2.1, 4.39)  # fmt: skip
    u = torch.arange(1, 16, dtype=D)
    v = 16 - u
    w = torch.minimum(u, v)
    return y - (x[0] + u / (v * x[1] + w * x[2]))


def kowalik_osborne(x):
    y = _t(.1957, .1947, .1735, .1600, .0844, .0627, .0456, .0342, .0323, .0235, .0246)  # fmt: skip
    u = _t(4, 2, 1, .5, .25, .167, .125, .1, .0833, .0714, .0625)  # fmt: skip
    return y - x[0] * (u**2 + u * x[1]) / (u**2 + u * x[2] + x[3])


def brown_dennis(x):
    t = torch.arange(1, 21, dtype=D) / 5
    return (x[0] + t * x[1] - torch.exp(t)) ** 2 + (x[2] + x[3] * torch.sin(t) - torch.cos(t)) ** 2


def osborne1(x):
    y = _t(.844, .908, .932, .936, .925, .908, .881, .850, .818, .784, .751, .718, .685, .658,
           .628, .603, .580, .558, .538, .522, .506, .490, .478, .467, .457, .448, .438, .431,
           .424, .420, .414, .411, .406)  # fmt: skip
    t = 10 * torch.arange(33, dtype=D)
    return y - (x[0] + x[1] * torch.exp(-t * x[3]) + x[2] * torch.exp(-t * x[4]))


# name: (residuals, standard starting point)
PROBLEMS = {
    "rosenbrock": (rosenbrock, [-1.2, 1.0]),
    "freudenstein_roth": (freudenstein_roth, [0.5, -2.0]),
    "powell_badly_scaled": (powell_badly_scaled, [0.0, 1.0]),
    "beale": (beale, [1.0, 1.0]),
    "jennrich_sampson": (jennrich_sampson, [0.3, 0.4]),
    "helical_valley": (helical_valley, [-1.0, 0.0, 0.0]),
    "box3d": (box3d, [0.0, 10.0, 20.0]),
    "powell_singular": (powell_singular, [3.0, -1.0, 0.0, 1.0]),
    "wood": (wood, [-3.0, -1.0, -3.0, -1.0]),
    "bard": (bard, [1.0, 1.0, 1.0]),
    "kowalik_osborne": (kowalik_osborne, [0.25, 0.39, 0.415, 0.39]),
    "brown_dennis": (brown_dennis, [25.0, 5.0, -5.0, -1.0]),
    "osborne1": (osborne1, [0.5, 1.5, -1.0, 0.01, 0.02]),
}


class Residuals(nn.Module):
    """r(theta) posed as m samples of one output: ``forward(x)`` returns (m, 1) whatever x."""

    def __init__(self, r, x0) -> None:
        super().__init__()
        self.r = r
        self.theta = nn.Parameter(torch.tensor(x0, dtype=D))

    def forward(self, x):
        return self.r(self.theta).unsqueeze(1)


def as_model(name: str):
    """(model, inputs, targets) of problem ``name``: MSE against zero targets."""
    r, x0 = PROBLEMS[name]
    m = len(r(torch.tensor(x0, dtype=D)))
    return Residuals(r, x0), torch.zeros(m, 1, dtype=D), torch.zeros(m, 1, dtype=D)


def fit(name: str, max_nfev: int | None = None, reuse: bool = True, **options):
    """The model path on problem ``name`` (MSE + GaussNewton + MoreTrustRegion, the default
    tolerances, or ``options`` of the Optimizer such as ``gtol=1e-8``): steps until a stopping
    rule fires or MINPACK's default max_nfev = 100 (P + 1). Returns (the StepInfos, the final
    cost 1/2 ||r||^2)."""
    from steepest import Optimizer
    from steepest.damping import MoreTrustRegion
    from steepest.losses import MSE
    from steepest.metrics import GaussNewton

    model, x, y = as_model(name)
    opt = Optimizer(
        model, MSE(), metric=GaussNewton(), damping=MoreTrustRegion(), reuse=reuse, **options
    )
    limit = max_nfev or 100 * (opt.space.size + 1)
    infos = []
    while sum(i.nfev for i in infos) < limit:
        infos.append(opt.step(x, y))
        if infos[-1].converged:
            break
    cost = 0.5 * float(model.r(model.theta.detach()).pow(2).sum())
    return infos, cost


def scipy_lm(name: str, **kw):
    """``scipy.optimize.least_squares(method="lm")`` with the Jacobian by autograd (MINPACK's
    lmder: nfev counts the residual evaluations, njev the Jacobian ones)."""
    import numpy as np
    from scipy.optimize import least_squares

    r, x0 = PROBLEMS[name]
    jac = torch.func.jacrev(r)
    return least_squares(
        lambda x: r(torch.tensor(x)).numpy(),
        np.asarray(x0, dtype=float),
        jac=lambda x: jac(torch.tensor(x)).numpy(),
        method="lm",
        **kw,
    )

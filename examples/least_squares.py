"""Nonlinear least squares with Gauss-Newton and Moré's scaled trust region.

The model y = b1 exp(b2 / (x + b3)) (the form of NIST's MGH10, on data generated here) is
badly scaled: at the hard start b = (2, 4e5, 2.5e4) the columns of the Jacobian differ by ten
orders of magnitude. ``MoreTrustRegion`` (Levenberg-Marquardt as a trust region on the scaled
step, the algorithm of MINPACK's lmder) fits it; plain ``LevenbergMarquardt`` damping
(lambda I) freezes b2 and b3 and stalls. The fit is checked against
``scipy.optimize.least_squares(method="lm")``.

Run: ``python examples/least_squares.py`` (a few seconds).
"""

import numpy as np
import torch
from scipy.optimize import least_squares
from torch import nn

import steepest

torch.manual_seed(0)
x = torch.arange(50.0, 126.0, 5.0, dtype=torch.float64).unsqueeze(1)
true_b = (0.0056, 6181.35, 345.22)
y = true_b[0] * torch.exp(true_b[1] / (x + true_b[2]))
y = y * (1 + 1e-3 * torch.randn_like(y))  # 0.1% noise
start = (2.0, 4e5, 2.5e4)


class Exponential(nn.Module):
    def __init__(self, b0):
        super().__init__()
        self.b = nn.Parameter(torch.tensor(b0, dtype=torch.float64))

    def forward(self, x):
        return self.b[0] * torch.exp(self.b[1] / (x + self.b[2]))


def fit(damping, max_steps=1000):
    """Gauss-Newton steps until the step is negligible; returns (b, accepted steps)."""
    model = Exponential(start)
    opt = steepest.Optimizer(model, steepest.MSE(), metric=steepest.GaussNewton(),
                             damping=damping, solver="cholesky")
    steps = 0
    for _ in range(max_steps):
        info = opt.step(x, y)  # loss = 1/(2N) sum (y - f)^2
        steps += info.accepted
        if info.accepted and info.step_norm <= 1e-12 * float(model.b.detach().norm()):
            break
    return model.b.detach().numpy(), steps


def scipy_fit():
    xs, ys = x.numpy().ravel(), y.numpy().ravel()

    def residual(b):
        return b[0] * np.exp(b[1] / (xs + b[2])) - ys

    def jacobian(b):
        e = np.exp(b[1] / (xs + b[2]))
        return np.stack([e, b[0] * e / (xs + b[2]), -b[0] * b[1] * e / (xs + b[2]) ** 2], 1)

    sol = least_squares(residual, start, jac=jacobian, method="lm", xtol=1e-15, ftol=1e-15,
                        gtol=1e-15)
    return sol.x, sol.njev


b_more, n_more = fit(steepest.MoreTrustRegion())
b_lm, n_lm = fit(steepest.LevenbergMarquardt(), max_steps=100)
b_scipy, n_scipy = scipy_fit()
agreement = float(np.max(np.abs(b_more - b_scipy) / np.abs(b_scipy)))
result = {"more": b_more, "lm": b_lm, "scipy": b_scipy, "agreement": agreement}

if __name__ == "__main__":
    print(f"MoreTrustRegion      b = {b_more}  ({n_more} steps)")
    print(f"LevenbergMarquardt   b = {b_lm}  ({n_lm} steps, stalled)")
    print(f"scipy lm (MINPACK)   b = {b_scipy}  ({n_scipy} Jacobians)")
    print(f"largest relative difference MoreTrustRegion vs scipy: {agreement:.1e}")

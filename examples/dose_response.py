"""A thousand dose-response curves at once: the four-parameter logistic, with bounds.

Each curve is y = bottom + (top - bottom) / (1 + (x / ec50)^hill) at 12 doses. The EC50 must
stay positive (a negative one makes (x / ec50)^hill undefined) and the Hill slope sensible, so
the fits are bounded: bottom, ec50 > 0 and 0.2 <= hill <= 5. One call of
``steepest.curve_fit`` fits all 1,000 curves, each with its own trust region and stopping rule,
and returns scipy's (popt, pcov) per curve; 20 of them are checked against
``scipy.optimize.curve_fit(bounds=...)``, curve by curve.

Run: ``python examples/dose_response.py`` (a few seconds).
"""

import time

import numpy as np
import torch
from scipy.optimize import curve_fit

import steepest

torch.manual_seed(0)
B = 1000
dose = torch.logspace(-3, 2, 12, dtype=torch.float64)  # 1 nM .. 100 uM, in uM
truth = torch.stack(
    [
        0.05 * torch.rand(B, dtype=torch.float64),  # bottom
        0.9 + 0.2 * torch.rand(B, dtype=torch.float64),  # top
        10 ** (-2 + 3 * torch.rand(B, dtype=torch.float64)),  # ec50: 0.01 .. 10 uM
        0.6 + 1.8 * torch.rand(B, dtype=torch.float64),  # hill
    ],
    1,
)


def logistic(x, bottom, top, ec50, hill):  # operators only: torch tensors and numpy arrays
    return bottom + (top - bottom) / (1 + (x / ec50) ** hill)


y = logistic(dose, *truth.unsqueeze(-1).unbind(1)) + 0.02 * torch.randn(B, 12, dtype=torch.float64)
# starts read off the data: the plateaus, the middle dose, a unit slope
p0 = torch.stack([y.amin(1).clamp(min=0), y.amax(1), torch.full((B,), 0.3), torch.ones(B)], 1).to(
    torch.float64
)
lb = [0.0, -np.inf, 1e-6, 0.2]
ub = [np.inf, np.inf, np.inf, 5.0]

t0 = time.perf_counter()
popt, pcov, res = steepest.curve_fit(logistic, dose, y, p0, bounds=(lb, ub), full_output=True)
seconds = time.perf_counter() - t0
err = pcov.diagonal(dim1=1, dim2=2).sqrt()
ec50_rel = ((popt[:, 2] - truth[:, 2]) / truth[:, 2]).abs()
print(
    f"{B} curves in {seconds:.2f} s: {int(res.success.sum())} succeeded, "
    f"{int((res.active_mask != 0).any(1).sum())} end on a bound; "
    f"median |EC50 error| {float(ec50_rel.median()):.1%} "
    f"(median reported standard error {float((err[:, 2] / popt[:, 2]).median()):.1%})"
)

# the same fits by scipy, one curve at a time (its bounded method, trf)
costs = []
for i in range(20):
    ref, _ = curve_fit(logistic, dose.numpy(), y[i].numpy(), p0[i].numpy(), bounds=(lb, ub))
    ours = 0.5 * float(((logistic(dose, *popt[i]) - y[i]) ** 2).sum())
    theirs = 0.5 * float(((logistic(dose.numpy(), *ref) - y[i].numpy()) ** 2).sum())
    costs.append((ours - theirs) / theirs)
result = {
    "success": int(res.success.sum()),
    "cost_rel_diff": np.array(costs),  # ours - scipy's, relative; negative: ours lower
    "ec50_rel_err_median": float(ec50_rel.median()),
}
print(
    f"against scipy's curve_fit(bounds=) on 20 curves: costs within "
    f"{np.abs(costs).max():.1e} relative (largest gap ours - scipy's: {max(costs):.1e})"
)

r"""Robust losses of :func:`~steepest.fit.least_squares` and :func:`~steepest.fit.curve_fit`
(scipy's ``loss=`` and ``f_scale=``): the cost :math:`F(x) = \tfrac12 \sum_i C^2
\rho(f_i^2 / C^2)`, C = ``f_scale``, with scipy's :math:`\rho(z)`:

- ``"linear"``: :math:`z` (least squares);
- ``"soft_l1"``: :math:`2(\sqrt{1 + z} - 1)`;
- ``"huber"``: :math:`z` for :math:`z \le 1`, else :math:`2\sqrt z - 1`;
- ``"cauchy"``: :math:`\ln(1 + z)`;
- ``"arctan"``: :math:`\arctan z`.

The fit runs on the transformed residuals :math:`\hat f_i = f_i \sqrt{h(z_i)}`,
:math:`h(z) = \rho(z)/z` (h(0) = 1), so that :math:`\tfrac12\|\hat f\|^2 = F` exactly and
:math:`\hat J^T \hat f = J^T \rho'(z) f = \nabla F`, with
:math:`\hat J = \mathrm{diag}(\rho'(z_i) / \sqrt{h(z_i)})\, J`: the same methods, engines,
stopping rules and bounds, on F. Its Gauss-Newton matrix :math:`\hat J^T \hat J =
J^T \mathrm{diag}(\rho'^2 / h) J` is positive semidefinite for every loss; scipy's ``trf``
(Triggs et al.'s correction) takes :math:`J^T \mathrm{diag}(\rho' + 2\rho'' z) J`, clipped at
:math:`\epsilon` where outliers make it negative. Both minimise the same F: the minima agree,
the paths and ``jac`` of the result (each method's :math:`\hat J`) differ.

>>> res = steepest.least_squares(fun, x0, loss="soft_l1", f_scale=0.1)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import ConfigurationError

LOSSES = ("linear", "soft_l1", "huber", "cauchy", "arctan")


def _sqrt_h(name: str, a: Tensor) -> Tensor:
    r""":math:`\sqrt{h(a^2)}`, :math:`h(z) = \rho(z)/z`, for :math:`a = |f|/C \ge 0`: 1 at
    a = 0, smooth (even in a), with no square of a that could overflow and no branch whose
    unused side is NaN (autograd through ``torch.where`` would carry it)."""
    if name == "soft_l1":  # 2 / (sqrt(1 + a^2) + 1) (rsqrt: its derivative has no overflowing
        # square of the denominator)
        return math.sqrt(2) * torch.rsqrt(torch.hypot(torch.ones_like(a), a) + 1)
    if name == "huber":  # 1, then sqrt(2a - 1) / a
        big = a > 1
        s = torch.where(big, a, 2.0)
        return torch.where(big, torch.sqrt(2 * s - 1) / s, 1.0)
    small = a < 1e-2
    s = torch.where(small, 1.0, a)
    t = torch.where(small, a, 0.0)
    z = t * t  # the series' z = a^2, where it is used
    if name == "cauchy":  # log1p(a^2) / a^2: 1 - z/2 + z^2/3 - ...; 2 log(a) / a^2 for huge a
        huge = s > 1e100
        m = torch.where(huge, 1.0, s)
        far = torch.sqrt(2 * torch.log(torch.where(huge, s, 2.0))) / torch.where(huge, s, 1.0)
        mid = torch.sqrt(torch.log1p(m * m)) / m
        return torch.where(small, torch.sqrt(1 - z / 2 + z * z / 3), torch.where(huge, far, mid))
    # arctan: atan(a^2) / a^2 = 1 - z^2/3 + ...
    return torch.where(small, torch.sqrt(1 - z * z / 3), torch.sqrt(torch.atan(s * s)) / s)


def _drho(name: str, a: Tensor) -> Tensor:
    r""":math:`\rho'(a^2)` (no overflowing square where it matters)."""
    if name == "soft_l1":
        return 1 / torch.hypot(torch.ones_like(a), a)
    if name == "huber":
        return torch.where(a > 1, 1 / torch.where(a > 1, a, 1.0), 1.0)
    if name == "cauchy":
        return 1 / (1 + a * a)
    return 1 / (1 + (a * a) * (a * a))


def robust(loss: str, f_scale: float) -> tuple[Callable, Callable] | None:
    r"""For ``loss`` with scale C = ``f_scale``: (``transform(f)`` = :math:`\hat f`,
    ``factor(f)`` = :math:`\rho'(z)/\sqrt{h(z)}`, the row factor of :math:`\hat J`), both
    elementwise; None for ``"linear"``. Raises ConfigurationError for an unknown loss or a
    f_scale that is not a finite number > 0."""
    if loss not in LOSSES:
        raise ConfigurationError(f"unknown loss {loss!r}; choose from {', '.join(LOSSES)}.")
    if not (isinstance(f_scale, int | float) and math.isfinite(f_scale) and f_scale > 0):
        raise ConfigurationError(f"f_scale must be a finite number > 0, got {f_scale!r}.")
    if loss == "linear":
        return None
    c = float(f_scale)

    def transform(f: Tensor) -> Tensor:
        return f * _sqrt_h(loss, f.abs() / c)

    def factor(f: Tensor) -> Tensor:
        a = f.abs() / c
        return _drho(loss, a) / _sqrt_h(loss, a)

    return transform, factor

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
the paths and ``jac`` of the result (each method's :math:`\hat J`) differ. Undamped
Gauss-Newton can stall on a robust F (``benchmarks/fit.md``): the trust region is the default.
Under autograd the rows of :math:`\hat J` of residuals far out on a bounded loss (arctan from
|f|/C ~ 1e6) lose relative accuracy to cancellation; their size is ~1e-19 and less.

>>> res = steepest.least_squares(fun, x0, loss="soft_l1", f_scale=0.1)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import ConfigurationError, check_positive

LOSSES = ("linear", "soft_l1", "huber", "cauchy", "arctan")


def _sqrt_h(name: str, a: Tensor) -> Tensor:
    r""":math:`\sqrt{h(a^2)}`, :math:`h(z) = \rho(z)/z`, for :math:`a = |f|/C \ge 0`: 1 at
    a = 0, smooth (even in a), with no square of a that could overflow and no branch whose
    unused side is NaN (autograd through ``torch.where`` would carry it)."""
    if name == "soft_l1":  # 2 / (sqrt(1 + a^2) + 1) (rsqrt: its derivative has no overflowing
        # square of the denominator)
        return math.sqrt(2) * torch.rsqrt(torch.hypot(torch.ones_like(a), a) + 1)
    if name == "huber":  # 1, then sqrt(2a - 1) / a (2a would overflow near the dtype's max)
        big = a > 1
        s = torch.where(big, a, 2.0)
        return torch.where(big, math.sqrt(2) * torch.sqrt(s - 0.5) / s, 1.0)
    # the series below 1e-4: z = a^2 <= 1e-8, the first term left out ~z^3 (1e-24)
    small = a < 1e-4
    s = torch.where(small, 1.0, a)
    t = torch.where(small, a, 0.0)
    z = t * t  # the series' z = a^2, where it is used
    if name == "cauchy":  # log1p(a^2) / a^2: 1 - z/2 + z^2/3 - ...; 2 log(a) / a^2 where a^2
        # would overflow (from the dtype's max^(1/4): float64 ~1e77, float32 ~4e9; the term
        # left out, log1p(1/a^2) / a^2, is below 1e-19 of it there)
        huge = s > torch.finfo(a.dtype).max ** 0.25
        m = torch.where(huge, 1.0, s)
        far = torch.sqrt(2 * torch.log(torch.where(huge, s, 2.0))) / torch.where(huge, s, 1.0)
        mid = torch.sqrt(torch.log1p(m * m)) / m
        return torch.where(small, torch.sqrt(1 - z / 2 + z * z / 3), torch.where(huge, far, mid))
    # arctan: atan(a^2) / a^2 = 1 - z^2/3 + ...
    return torch.where(small, torch.sqrt(1 - z * z / 3), torch.sqrt(torch.atan(s * s)) / s)


def _drho(name: str, a: Tensor) -> Tensor:
    r""":math:`\rho'(a^2)` (cauchy's and arctan's underflow to 0 for a beyond ~1e154 and
    ~1e77 in float64, where they are below 1e-154: such an outlier's row of :math:`\hat J` is
    0, its true size ~1e-157 or less)."""
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
    if isinstance(f_scale, torch.Tensor) and f_scale.numel() == 1:
        f_scale = float(f_scale)
    check_positive(f_scale=f_scale)
    if loss == "linear":
        return None
    c = float(f_scale)

    def wide(f: Tensor) -> Tensor:  # below float64, in float64 (|f| / C may overflow there)
        return f.double() if f.dtype in (torch.float32, torch.float16, torch.bfloat16) else f

    def transform(f: Tensor) -> Tensor:
        w = wide(f)
        return (w * _sqrt_h(loss, w.abs() / c)).to(f.dtype)

    def factor(f: Tensor) -> Tensor:
        a = wide(f).abs() / c
        return (_drho(loss, a) / _sqrt_h(loss, a)).to(f.dtype)

    return transform, factor

"""Tests of curve_fit's direct route into the compiled core (fit/curve.py ``_direct``, the
driver's ``direct``): the user's model and Jacobian called on the parameter columns from and
to numpy, the residuals f = model - y formed by the update kernel; bitwise the fit of the
wrapped route (torch tensors through lsq's wrappers, f - y in torch), which a sigma of ones
takes (a division by 1 is exact); the errors of a model or Jacobian that changes its output
during the fit."""

from __future__ import annotations

import pytest
import torch
from numba_threads import numba_threads
from reference import seeded
from test_fit_compiled import D, T

from steepest.errors import ConfigurationError, ShapeError
from steepest.fit import compiled, curve_fit

N = 600


def _curves(n: int = N, seed: int = 41):
    """n decay curves on T; every 17th a line (b = 0 in the data: some of those fits run to
    max_nfev, the driver's tail), the rest noisy (they stop on ftol or xtol)."""
    g = seeded(seed)
    a = 1 + torch.rand(n, 1, generator=g, dtype=D)
    b = (0.3 + 2 * torch.rand(n, 1, generator=g, dtype=D)) * (torch.arange(n) % 17 != 3)[:, None]
    c = torch.rand(n, 1, generator=g, dtype=D)
    y = a * torch.exp(-b * T) + c + 0.01 * torch.randn(n, 50, generator=g, dtype=D)
    return y, torch.tensor([[1.0, 1.0, 0.0]], dtype=D).expand(n, 3)


def _decay(x, a, b, c):
    return a * torch.exp(-b * x) + c


def _decay32(x, a, b, c):  # the model in float32: f - y promotes it to float64
    return (a * torch.exp(-b * x) + c).float()


def _decay_jac(x, a, b, c):
    e = torch.exp(-b * x)
    return torch.stack([e, -a * x * e, torch.ones_like(e)], -1)


def _spy(monkeypatch) -> list:
    """The ``direct`` argument of each call of the compiled driver."""
    seen: list = []
    core = compiled._least_squares_compiled

    def spy(*args):
        seen.append(args[11] if len(args) > 11 else None)
        return core(*args)

    monkeypatch.setattr(compiled, "_least_squares_compiled", spy)
    return seen


@pytest.mark.parametrize("model, jac", [(_decay, _decay_jac), (_decay, None), (_decay32, None)])
@pytest.mark.parametrize("part, threads", [(None, 1), (256, 2)])
def test_the_direct_route_is_bitwise_the_wrapped_one(monkeypatch, model, jac, part, threads):
    """curve_fit without sigma takes the direct route (the driver given (model, jac or None,
    y)); with sigma = 1 the wrapped one (None). popt, pcov, fun, jac, nfev, njev and status
    are bitwise the same: the kernel's f - y rounds as torch's (a float32 model promoted to
    float64 first, as torch does), in one part and in parts of 256 fits on two threads, with
    fits that stop on ftol or xtol after a trial and fits that run to max_nfev in the tail
    (one part on one thread: the fused update)."""
    y, p0 = _curves()
    seen = _spy(monkeypatch)
    if part is not None:
        monkeypatch.setattr(compiled, "PART_ELEMENTS", 1)
        assert compiled.part_rows(50, 3) == part
    with numba_threads(threads):
        direct = curve_fit(model, T, y, p0, jac=jac, full_output=True, max_nfev=120,
                           engine="numba")  # fmt: skip
        wrapped = curve_fit(model, T, y, p0, jac=jac, sigma=torch.ones(50, dtype=D),
                            full_output=True, max_nfev=120, engine="numba")  # fmt: skip
    assert seen[0] is not None and seen[1] is None
    assert (seen[0][1] is None) == (jac is None)
    res = direct[2]
    assert bool((res.status == 0).any()) and int(res.nfev.max()) == 120  # a tail
    assert int(res.success.sum()) > N // 2
    for a, b in zip(direct[:2], wrapped[:2], strict=True):
        assert torch.equal(a, b)
    for key in ("fun", "jac", "nfev", "njev", "status", "x"):
        assert torch.equal(getattr(res, key), getattr(wrapped[2], key)), key


def test_the_direct_route_is_not_taken_where_f_is_weighed_or_transformed(monkeypatch):
    """A sigma, a robust loss, or residuals out of range (scaled by a power of two in lsq)
    keep the wrapped route: f is not the model less y there."""
    y, p0 = _curves(300)
    seen = _spy(monkeypatch)
    curve_fit(_decay, T, y, p0, engine="numba")
    curve_fit(_decay, T, y, p0, sigma=0.5 * torch.ones(50, dtype=D), engine="numba")
    curve_fit(_decay, T, y, p0, loss="soft_l1", engine="numba")
    curve_fit(lambda x, a, b, c: 1e200 * _decay(x, a, b, c), T, 1e200 * y, p0, engine="numba")
    assert seen[0] is not None and seen[1:] == [None, None, None]


def test_a_jacobian_or_model_that_changes_its_output_during_the_fit_is_named(monkeypatch):
    """The direct route checks each J (shape and dtype, as lsq's wrapper: _check_jac_out) and
    each model output (a tensor, as _evaluate): a jac that returns another shape once fewer
    curves run, or a model that returns a list instead of a tensor, raise the named errors
    mid-fit, not a numpy or kernel failure."""
    y, p0 = _curves(300)

    def jac_later(x, a, b, c):  # the columns (n, 1) of 21-299 curves (the driver's J at
        j = _decay_jac(x, a, b, c)  # the accepted points; its checks at p0 take 4): 2 columns
        return j[..., :2] if a.ndim == 2 and 20 < a.shape[0] < 300 else j

    named = r"jac returned shape \(\d\d+, 50, 2\) for \d\d+ problems; expected \(B, M, P\)"
    with pytest.raises(ShapeError, match=named):  # mid-fit: 21-299 curves (p0's check: 4)
        curve_fit(_decay, T, y, p0, jac=jac_later, engine="numba")

    def model_later(x, a, b, c):  # the columns of fewer than 300 curves: a list
        out = _decay(x, a, b, c)
        short = a.ndim == 2 and a.shape[1] == 1 and a.shape[0] < 300
        return out.tolist() if short else out

    with pytest.raises(ConfigurationError, match=r"fun must return a torch.Tensor .* got list"):
        curve_fit(model_later, T, y, p0, engine="numba")

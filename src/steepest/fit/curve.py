"""``curve_fit``: scipy's curve fitting on :func:`~steepest.fit.least_squares`, one curve or a
batch of curves (see :mod:`steepest.fit`)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import (
    ConfigurationError,
    ConvergenceError,
    NonFiniteError,
    ShapeError,
    check_tolerances,
)
from . import compiled
from .bounds import _as_bounds, _box_rows, _finite, _project
from .checks import _as_x0, _evaluate, _returned
from .core import _range_scales, _svd_values
from .loss import robust
from .lsq import _check_engine, _check_jac_out, _check_method, _run
from .result import _result

#: the rows of a batch, spread evenly over it, on which the routes of f and jac are compared
#: against vmap (vmapping all rows of a large batch cost more than the fit: 0.19 s of 0.7 s for
#: 10,000 curves); the route itself is called on the whole batch, so that a formula mixing the
#: rows anywhere shows in the rows compared (a given jac on the compiled core: on these rows,
#: and the result's J, evaluated on the whole batch, is compared after the fit:
#: :func:`_jac_agrees`)
PROBE_ROWS = 16


def _sample(b: int, device) -> Tensor:
    """:data:`PROBE_ROWS` rows spread evenly over a batch of b (all of them when fewer)."""
    n = min(PROBE_ROWS, b)
    return torch.arange(n, device=device) * (b - 1) // max(n - 1, 1)


def _columns(pp: Tensor) -> tuple[Tensor, ...]:
    """The P parameter columns (B, 1) of a batch pp (B, P), as views, in one torch call:
    ``unsafe_chunk``, ``chunk`` without autograd's view tracking (3.0-3.3 us on 13 fits
    against 3.8-6.4 us for ``chunk``, in four measurements in different phases of the
    machine; ``unsqueeze`` then ``unbind`` and ``split`` cost more). The routes call it under
    ``torch.no_grad()`` on a batch made for the evaluation (the compiled core's tail evaluates
    f and jac on the same one), so no gradient can go wrong where a user's f writes into a
    column."""
    return pp.unsafe_chunk(pp.shape[-1], -1)


def _probe_point(x0: Tensor, box) -> Tensor:
    """A point near the batch x0 (B, P) where the rows differ (projected on the box, or None),
    at which :func:`_broadcasts` compares the routes: the same for f and for jac, made once (a
    fixed seed; uniform draws in [-1, 1): 10,000 x 3 take 0.17 ms, normal ones in float64 1.0
    ms on two threads, torch 2.13)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    noise = 2 * torch.rand(x0.shape, generator=g, dtype=x0.dtype).to(x0.device) - 1
    return _project(x0 + 1e-3 * (x0.abs() + 1) * noise, box)


def _broadcasts(resid_cols, vres, probe: Tensor, args, whole: bool = True) -> bool:
    """Whether ``resid_cols`` called once on the P parameter columns (B, 1) of the whole batch
    (:func:`_columns`, as the route calls it) gives what the vmapped one-curve residual gives,
    on the rows :func:`_sample` (``args(rows)``: the data of those rows), at ``probe``, a
    point near x0 where the rows differ (:func:`_probe_point`: so a formula that mixes rows,
    e.g. through a sum over the batch, is caught): then the batch needs no vmap. Not
    ``whole``: the route called on the sampled rows alone (a formula that fails on columns,
    or mixes the rows compared, is caught; one that mixes them with others only by
    :func:`_jac_agrees` after the fit)."""
    sample = _sample(probe.shape[0], probe.device)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = vres(probe[sample], *args(sample))
            if whole:
                every = torch.arange(probe.shape[0], device=probe.device)
                got = resid_cols(_columns(probe), *args(every))
                if not isinstance(got, Tensor) or got.shape[:1] != probe.shape[:1]:
                    return False
                got = got[sample]
            else:
                got = resid_cols(_columns(probe[sample]), *args(sample))
    except Exception:  # any failure: keep the general (vmap) route
        return False
    return _close(got, want)


def _close(got: Tensor, want: Tensor) -> bool:
    """The route's values ``got`` are the vmapped ones ``want``: same shape and dtype, want
    finite, equal to 1e-12 relative to want's largest entry."""
    return (
        isinstance(got, Tensor)
        and got.shape == want.shape
        and got.dtype == want.dtype
        and bool(torch.isfinite(want).all())
        and bool(torch.allclose(got, want, rtol=1e-12, atol=1e-12 * float(want.abs().max())))
    )


def _jac_agrees(out: dict, vjres, args) -> bool:
    """After a compiled fit whose jac took the columns route probed on the sampled rows alone
    (:func:`_broadcasts`, not ``whole``): whether the result's J equals the vmapped jac at the
    result's x, on up to :data:`PROBE_ROWS` rows spread over those whose J the compiled core
    evaluated after the loop (status other than 1 and -1: all of them at once, in parts of
    the batch, so that a jac that mixes the rows shows where the rows of a part do), and
    finite there (the sum of the row's entries finite: one reduction over J, 0.3 ms for
    10,000 curves of 50 points, where ``isfinite`` on every entry took ~4 ms and cost what the
    deferred probe saves; a finite row whose sum overflows is left out). Fewer than 2 such
    rows (a batch that stopped on gtol, its J stored at the stage): the finite rows of any
    status; fewer than 2 of those: False (the caller refits with the vmapped jac). Weaker
    than the whole-batch probe: mixing only through the rows of other parts, only through
    rows that stopped at a stage, or only away from popt, is not seen."""
    finite = out["jac"].flatten(1).sum(1).isfinite()
    after = ((out["status"] != 1) & (out["status"] != -1) & finite).nonzero().squeeze(-1)
    if after.numel() < 2:
        after = finite.nonzero().squeeze(-1)
        if after.numel() < 2:
            return False
    rows = after[_sample(after.numel(), after.device)]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = vjres(out["x"][rows], *args(rows))
    return _close(out["jac"][rows], want)


def _as_sigma(sigma, x0: Tensor, y: Tensor) -> tuple[Tensor | None, bool]:
    """curve_fit's sigma as (the standard deviations, False) or (the lower Cholesky factor L of
    a covariance, True), or (None, False); checked: shape, finite, > 0, symmetric positive
    definite. One curve: (N,) or a covariance (N, N); a batch of B: (N,) or (B, N), or
    covariances (B, N, N) or one for all, (1, N, N)."""
    if sigma is None:
        return None, False
    s = torch.as_tensor(sigma, dtype=x0.dtype, device=x0.device)
    batched, n = y.ndim == 2, y.shape[-1]
    std = ((n,), tuple(y.shape)) if batched else ((n,),)
    covs = ((y.shape[0], n, n), (1, n, n)) if batched else ((n, n),)
    if tuple(s.shape) not in std + covs:
        want = (
            "(N,) or (B, N), or covariances (B, N, N) or (1, N, N)"
            if batched
            else ("(N,), or a covariance (N, N)")
        )
        raise ShapeError(
            f"sigma of shape {tuple(s.shape)} for ydata of shape {tuple(y.shape)}: give the "
            f"standard deviations of ydata, {want} (N = {n}"
            f"{f', B = {y.shape[0]}' if batched else ''})."
        )
    if not bool(torch.isfinite(s).all()):
        raise NonFiniteError("sigma must be finite.")
    if tuple(s.shape) in std:
        if not bool((s > 0).all()):
            raise NonFiniteError("sigma (standard deviations) must be > 0.")
        return s, False
    if not torch.allclose(s, s.mT, rtol=1e-12, atol=1e-14 * float(s.abs().max())):
        raise ConfigurationError(
            "sigma, a covariance matrix, must be symmetric (pass (S + S^T) / 2 if it is up to "
            "rounding)."
        )
    chol, info = torch.linalg.cholesky_ex(s)
    if bool((info != 0).any()):
        raise ConfigurationError(
            "sigma, a covariance matrix, must be positive definite (its Cholesky factorisation "
            "failed); a singular covariance has no inverse to weigh the residuals with."
        )
    return (chol[0] if batched and s.shape[0] == 1 else chol), True  # (1, N, N): shared


def _weigh(r: Tensor, ss: Tensor | None, cov: bool, columns: bool = False) -> Tensor:
    r"""The residuals r (..., N) (``columns``: a Jacobian (..., N, P)) weighed by sigma:
    :math:`r_i / \sigma_i`, or :math:`L^{-1} r` for a covariance :math:`\Sigma = LL^T` (scipy's
    whitening: :math:`\|L^{-1}r\|^2 = r^T\Sigma^{-1}r`)."""
    if ss is None:
        return r
    if not cov:
        return r / ss.unsqueeze(-1) if columns else r / ss
    rhs = r if columns else r.unsqueeze(-1)
    out = torch.linalg.solve_triangular(ss, rhs, upper=False)
    return out if columns else out.squeeze(-1)


def _pointwise_jac(resid_cols, pp: Tensor, args: tuple, with_f: bool = False):
    r"""J (n, N, P) of a pointwise formula: each parameter spread to one copy per point,
    :math:`p_{jbi} = p_{bj}` (one leaf of shape (P, n, N)), and one backward pass of
    :math:`\sum_{bi} r_{bi}` gives :math:`\partial r_{bi} / \partial p_{jbi} = J_{bij}`.
    ``resid_cols(cols, *args)`` takes the parameters as P columns (the leaf's views along its
    first axis: unbind's backward stacks the P gradients along that axis, a contiguous copy;
    a leaf (n, N, P) unbound along its last axis made that copy strided, 45 % of the route's
    time). J is returned as a view of the contiguous (P, n, N) gradient, column by column (the
    compiled core reads it so without a copy). Torch 2.13, curves of 50 points, against P
    leaves of shape (n, N) (bitwise the same J): 13 curves 93 against 112 us, 1,747 curves
    1.01-1.03x the time on one thread, 0.94x on two (scratch timings, 7-15 rounds); 13 curves
    against M vmapped vjps: 0.25 against 0.9 ms. The backward pass starts from the scalar
    :math:`\sum r` (bitwise the same J as ``grad_outputs=ones``): torch checks the shape of
    a given ``grad_outputs`` through its symbolic-shapes module, whose first import loads sympy
    (0.35-0.5 s, the first fit of a process: 0.37 s then, 0.02 s without; 3-6 % more time
    an iteration in a 13-fit tail for the extra reduction). ``with_f``: (J, r), the residuals
    of the same forward pass too (a robust loss' factor of :math:`\hat J` needs them)."""
    n, p = pp.shape
    leaf = pp.T.unsqueeze(-1).expand(p, n, args[1].shape[-1]).clone().requires_grad_()
    with torch.enable_grad():
        r = resid_cols(leaf.unbind(0), *args)
        (grad,) = torch.autograd.grad(r.sum(), leaf, allow_unused=True, materialize_grads=True)
    jac = grad.permute(1, 2, 0)
    return (jac, r.detach()) if with_f else jac


def _is_pointwise(resid_cols, vres, x0: Tensor, args: tuple, m: int, box=None) -> bool:
    """Whether :func:`_pointwise_jac` gives the Jacobian of ``resid_cols`` (residual i of a curve
    depends on the parameters only through their copy at point i): checked near x0 on up to 4
    curves, along a random combination u of the residuals: :math:`u^T J` of the pointwise
    route against the true :math:`u^T J`, one backward pass of :math:`u^T r` of the vmapped
    one-curve residual ``vres`` (a coupling makes the two differ for almost every u). A
    formula that couples the points (a normalisation over x, a cumulative sum) fails it and
    keeps ``torch.func``."""
    g = torch.Generator(device="cpu").manual_seed(1)
    noise = torch.randn(x0.shape, generator=g, dtype=x0.dtype).to(x0.device)
    probe = _project(x0 + 1e-3 * (x0.abs() + 1) * noise, box)
    u = torch.randn((x0.shape[0], m), generator=g, dtype=x0.dtype).to(x0.device)
    try:
        with warnings.catch_warnings(), torch.enable_grad():
            warnings.simplefilter("ignore")
            leaf = probe.detach().clone().requires_grad_()
            # the true u^T J: the vmapped one-curve residual, 0-d parameters (the broadcast
            # layout (n, M) would let an axis-0 operation, cumsum(a * x, 0), mix the curves
            # instead of the points, the same way in both routes: a single curve was fitted
            # with the wrong Jacobian, "successful")
            out = vres(leaf, *args)
            if out.shape != u.shape:
                return False
            (ref,) = torch.autograd.grad(  # from a scalar, as _pointwise_jac (no sympy)
                (out * u).sum(), leaf, allow_unused=True, materialize_grads=True
            )
            got = _pointwise_jac(resid_cols, probe, args)
    except Exception:  # any failure: keep the torch.func route
        return False
    if got.shape != (*u.shape, x0.shape[1]):
        return False
    if not (bool(torch.isfinite(ref).all()) and bool(torch.isfinite(got).all())):
        return False
    # rounding of two routes (a coupling is O(1) of its column): the tolerance of each
    # parameter's column is relative to that column's largest entry, so a large column cannot
    # hide a coupling in a small one
    # (the projection sums M rounding errors of random signs: their l2 norm, not their sum)
    # (a column out of range first scaled by a power of two, exactly: the bound's squares
    # overflowed from entries of ~1e154, and every formula passed)
    tol = 1e4 * torch.finfo(ref.dtype).eps
    two = _range_scales(got.abs().amax(dim=(0, 1), keepdim=True))
    got, ref = got * two, ref * two.squeeze(0)
    scale = got.abs().amax(dim=(0, 1), keepdim=True)
    bound = tol * torch.linalg.vector_norm(u.unsqueeze(-1) * (got.abs() + scale), dim=1)
    return bool(((u.unsqueeze(-1) * got).sum(1) - ref).abs().le(bound).all())


def _user_jac(jac, xd, y, s, cov, xb, args, dims, batched, x_per, spread, probe, defer=False):
    """``(jac_r(pp, rows), columns, vjres, jac_v)`` of curve_fit's ``jac=`` (of the residuals:
    divided by sigma, or :math:`L^{-1}J` for a covariance, :func:`_weigh`), after a
    check of its shape on the first curve at p0: a batch calls it once with the parameter
    columns (B, 1) when :func:`_broadcasts` says that equals the vmapped jac (``columns``
    True), else vmaps it (jac_v; vjres: the vmapped one-curve J; both None for one curve).
    ``defer``: the probe calls the route on the sampled rows alone, and the caller checks the
    fit's J after it (:func:`_jac_agrees`): the compiled core, which evaluates J at the
    solution on the whole batch at once (in parts), spares the probe's whole-batch call (3.6
    of 4.1 ms for 10,000 curves of 50 points; the fit given J 0.960x the time, per pair over
    61 interleaved pairs, ``benchmarks/results/fit_ab_s33_defer_2t.json``)."""
    n, p = y.shape[-1], xb.shape[-1]
    with torch.no_grad():
        j0 = jac(xd[0] if x_per else xd, *xb[0].unbind(-1))
    if not isinstance(j0, Tensor) or tuple(j0.shape) != (n, p) or j0.dtype != xb.dtype:
        got = f"{tuple(j0.shape)} {j0.dtype}" if isinstance(j0, Tensor) else type(j0).__name__
        raise ShapeError(
            f"jac(xdata, *p0) returned {got}{' for the first curve' if batched else ''}; "
            f"expected a torch tensor of shape (N, P) = ({n}, {p}) in p0's {xb.dtype}: a row "
            f"per point of ydata, a column per parameter (scipy's layout)."
        )

    def jres_cols(cols, xx: Tensor, yy: Tensor, ss: Tensor | None) -> Tensor:
        return _weigh(jac(xx, *cols), ss, cov, columns=True)

    def jres(pp: Tensor, xx: Tensor, yy: Tensor, ss: Tensor | None) -> Tensor:
        return jres_cols(pp.unbind(-1), xx, yy, ss)

    if not batched:

        def jac_r(pp: Tensor, rows: Tensor) -> Tensor:
            return _evaluate(lambda q: jres(q, xd, y, s), pp.squeeze(0), "jac").unsqueeze(0)

        return jac_r, False, None, None
    vjres = torch.func.vmap(jres, in_dims=dims)

    def jac_v(pp: Tensor, rows: Tensor) -> Tensor:
        return _evaluate(lambda q: vjres(q, *args(rows)), pp, "jac")

    if spread and _broadcasts(jres_cols, vjres, probe, args, whole=not defer):

        def jac_r(pp: Tensor, rows: Tensor) -> Tensor:
            return _evaluate(lambda q: jres_cols(_columns(q), *args(rows, False)), pp, "jac")

        return jac_r, True, vjres, jac_v
    return jac_v, False, vjres, jac_v


def _direct(f, jac, args, y: Tensor, p: int) -> tuple:
    r"""curve_fit's routes on the parameter columns, for the compiled core's ``direct``
    (:func:`.compiled._least_squares_compiled`): ``(model, jac_d, y)``, the model
    :math:`g(x_i; p)` (N per curve, the residual :math:`g - y` formed by the kernel) and, if
    ``jac`` is given, the user's J (else None: the driver's ``jac_r``), each from and to numpy
    arrays, with no wrapper between: for an unweighted fit whose f (and jac) the route probe
    (:func:`_broadcasts`) found to take the batch's columns."""
    m = y.shape[-1]
    last: list = [None, None, ()]  # the points last given (the array), as a tensor, columns

    def columns(xs) -> tuple:
        """The points xs (n, P) as a tensor and its parameter columns (n, 1), views of xs;
        those made for the same array before, where the driver's tail hands f's trial points
        to jac (torch.from_numpy and unsafe_chunk: ~3 us a call on 13 fits)."""
        if last[0] is not xs:
            q = torch.from_numpy(xs)
            last[:] = xs, q, q.unsafe_chunk(p, -1)
        return last[1], last[2]

    def model(xs, rows: Tensor):
        out = _returned(f(args(rows, False)[0], *columns(xs)[1]))
        out = out.detach() if out.requires_grad else out
        if out.shape != (xs.shape[0], m):  # as f - y would broadcast it
            out = out.expand(xs.shape[0], m)
        return np.ascontiguousarray(out.numpy(), np.float64)

    def jac_d(xs, rows: Tensor):
        q, cols = columns(xs)
        j = _returned(jac(args(rows, False)[0], *cols), "jac")
        _check_jac_out(j, q, m, True)
        return np.ascontiguousarray((j.detach() if j.requires_grad else j).numpy())

    return model, jac_d if jac is not None else None, np.ascontiguousarray(y.detach().numpy())


def curve_fit(
    f: Callable[..., Tensor],
    xdata: Tensor,
    ydata: Tensor,
    p0: Tensor | Sequence[float],
    sigma: Tensor | None = None,
    absolute_sigma: bool = False,
    *,
    method: str = "trust-region",
    jac: Callable[..., Tensor] | None = None,
    bounds: tuple | None = None,
    full_output: bool = False,
    ftol: float = 1.49012e-8,
    xtol: float = 1.49012e-8,
    gtol: float = 0.0,
    max_nfev: int | None = None,
    engine: str = "auto",
    loss: str = "linear",
    f_scale: float = 1.0,
):
    r"""Fit ``f(xdata, *params)`` to ydata by least squares, as ``scipy.optimize.curve_fit``:
    minimise :math:`\sum_i ((f(x_i; p) - y_i)/\sigma_i)^2` (or
    :math:`(f - y)^T \Sigma^{-1} (f - y)` for a covariance sigma) and return (popt, pcov).

    The covariance is scipy's, from the SVD :math:`J = U S V^T` of the Jacobian of the weighted
    residuals at popt (singular values below :math:`\epsilon \max(N, P) s_1` dropped):
    :math:`\mathrm{pcov} = V S^{-2} V^T`, times :math:`s^2 = \sum_i r_i^2 / (N - P)` unless
    ``absolute_sigma`` (inf when N <= P, and for a fit whose Jacobian at popt is not finite,
    status -1). (scipy's ``lm`` takes it from the QR of its last Jacobian, evaluated one step
    before popt: the two may differ by 1e-5 to 1e-4 relative.) The compiled core forms the same
    matrix as :math:`R^{-1}R^{-T}` from the QR :math:`J = QR` where no singular value can be
    dropped (the SVD elsewhere): equal to rounding.

    A batch of B curves: p0 of shape (B, P), ydata (B, N), xdata shared (N, ...) or per curve
    (B, N, ...) (per curve when its first two axes are ydata's shape), sigma (N,) or (B, N), or
    covariances (B, N, N) or (1, N, N) (one for every curve); f is
    written for one curve and vmapped; popt is (B, P), pcov (B, P, P).

    Parameters
    ----------
    f : ``f(xdata, p_1, ..., p_P) -> (N,)`` in torch, each p_j a 0-d tensor. A formula that
        broadcasts (``a * torch.exp(-b * x)``) is also called with each p_j a column (B, 1) of
        a batch and, for its Jacobian, with one copy per point, (B, N) or (1, N), after a probe
        near p0 (and a check at popt, up to 4 fits) against torch.func says that gives the
        same values and derivatives; otherwise it is vmapped with 0-d parameters.
    xdata, ydata : the data (ydata (N,) or (B, N)).
    p0 : the start (there is no default: scipy's ones are rarely a good start).
    sigma : the standard deviations of ydata, (N,) or (B, N): residuals
        :math:`(f(x_i; p) - y_i)/\sigma_i`; or, as scipy's 2-D sigma, the covariance
        :math:`\Sigma` of ydata, (N, N) (a batch: (B, N, N), or (1, N, N) for all curves):
        residuals :math:`L^{-1}(f - y)` with :math:`\Sigma = LL^T` (Cholesky), so that the fit
        minimises :math:`(f - y)^T \Sigma^{-1} (f - y)`.
    absolute_sigma : sigma in absolute units: pcov is not rescaled by the residual variance.
    method, ftol, xtol, gtol : as :func:`least_squares` (defaults: scipy's curve_fit/leastsq
        tolerances).
    jac : ``jac(xdata, p_1, ..., p_P) -> (N, P)``, the Jacobian
        :math:`\partial f(x_i; p) / \partial p_j` in torch, as scipy's callable ``jac`` (divided
        by sigma here, as there; checked at p0 against finite differences of f, a
        SteepestWarning if they disagree: :func:`least_squares`). For a batch it is written
        for one curve and vmapped, or called once with the parameter columns (B, 1) when a
        probe says that gives the same (B, N, P) (on the compiled core, for more than 16
        curves and no robust loss, the probe calls it on 16 rows, and the result's J, at popt
        and evaluated on the batch in parts, is checked against the vmapped jac on up to 16
        curves after the fit, which runs again vmapped where they differ: a jac that mixes
        the rows).
        Default None: autograd (one backward pass for a pointwise f, as above).
    bounds : ``(lb, ub)``, as scipy's: each a number, one value per parameter (P,) or, for a
        batch, per curve (B, P); -inf / inf where a side is free; with any method, as in
        :func:`least_squares`. pcov is from the Jacobian at popt, as scipy's (a parameter on
        its bound is not held fixed in pcov). Default None: no bounds.
    max_nfev : the most evaluations of f per curve; default 100 (P + 1), MINPACK ``lmder``'s
        (what ``scipy.optimize.curve_fit`` uses when given ``jac=``). The Jacobian here is
        analytic (autograd, or ``jac=``) and, as in ``lmder``, not counted in nfev; scipy's
        default without ``jac``, ``lmdif``'s 200 (P + 1), budgets the P evaluations of each
        forward-difference Jacobian too, so it stops after about 200 (P + 1) / (P + 1) = 200
        iterations, where the same 200 (P + 1) here would allow 200 (P + 1) iterations. With
        100 (P + 1) a fit is MINPACK's ``lmder`` evaluation by evaluation, limit included.
    full_output : also return the :class:`OptimizeResult` of the fit.
    loss, f_scale : a robust loss of the weighted residuals, as scipy's (there with
        method="trf"): ``"soft_l1"``, ``"huber"``, ``"cauchy"``, ``"arctan"`` or ``"linear"``
        (default), scale C = f_scale (:func:`least_squares`); pcov is then scipy's formula with
        the robust cost and the Jacobian :math:`\hat J` of the transformed residuals
        (scipy's Jacobian is Triggs' correction: the two pcov differ). The factor of
        :math:`\hat J` takes f from the last evaluation at the Jacobian's point (rows
        evaluated elsewhere since, as by the check of jac at x0, are evaluated again; the
        pointwise route has f from its own forward pass).
    engine : ``"auto"`` (default), ``"torch"`` or ``"numba"``: who runs the algebra between
        the evaluations, as in :func:`least_squares` (numba, where installed, for float64 on
        the CPU without bounds; "auto" takes it for batches of at least 256 curves).

    Raises
    ------
    ConvergenceError: a single fit ended without success (scipy raises RuntimeError; this is
    one). A batch never raises: failed fits are named in a warning, their ``success`` is False
    in the result (``full_output=True``).
    ConfigurationError: f cannot be vmapped over a batch (``float(a)``, ``.item()``, numpy);
    jac not callable; bounds with lb >= ub, not numbers, or p0 outside them (ShapeError:
    bounds or jac of the wrong shape or dtype; NonFiniteError: NaN bounds).
    A SteepestWarning names a parameter whose Jacobian column is exactly 0 at p0 while f
    moves with it (autograd's graph cut by ``float(a)``, ``.item()``, numpy): see
    :func:`least_squares`.
    ShapeError, NonFiniteError: as :func:`least_squares` (f's output not (N,), data or sigma
    of the wrong shape, not finite at p0).

    Example
    -------
    >>> popt, pcov = curve_fit(lambda x, a, b, c: a * torch.exp(-b * x) + c, t, y,
    ...                        p0=[1.0, 1.0, 0.0])
    >>> perr = pcov.diagonal().sqrt()
    """
    x0 = _as_x0(p0)
    batched = x0.ndim == 2
    y = torch.as_tensor(ydata, dtype=x0.dtype, device=x0.device)
    xd = torch.as_tensor(xdata, device=x0.device)
    if xd.is_floating_point():
        xd = xd.to(x0.dtype)
    if y.ndim != (2 if batched else 1) or (batched and y.shape[0] != x0.shape[0]):
        want = f"(B, N) with B = {x0.shape[0]}" if batched else "(N,)"
        raise ShapeError(
            f"ydata has shape {tuple(y.shape)}; expected {want} for p0 of shape {tuple(x0.shape)}."
        )
    n = y.shape[-1]
    s, cov = _as_sigma(sigma, x0, y)  # cov: s is the Cholesky factor L of a covariance
    x_per = batched and xd.ndim >= 2 and tuple(xd.shape[:2]) == tuple(y.shape)
    s_per = s is not None and s.ndim == (3 if cov else 2)  # one per curve (a batch)

    def resid_cols(cols, xx: Tensor, yy: Tensor, ss: Tensor | None) -> Tensor:
        return _weigh(f(xx, *cols) - yy, ss, cov)

    def resid(pp: Tensor, xx: Tensor, yy: Tensor, ss: Tensor | None) -> Tensor:
        return resid_cols(pp.unbind(-1), xx, yy, ss)

    method = _check_method(method)
    if jac is not None and not callable(jac):
        raise ConfigurationError(
            f"jac must be a callable jac(xdata, *params) -> (N, P) in torch, or None for "
            f"autograd, got {jac!r} (scipy's finite-difference strings are not needed: the "
            f"Jacobian is analytic here)."
        )
    check_tolerances(ftol=ftol, xtol=xtol, gtol=gtol)
    _check_engine(engine)
    rob = robust(loss, f_scale)
    p = x0.shape[-1]
    max_nfev = 100 * (p + 1) if max_nfev is None else max_nfev  # lmder's (see above)
    if not (isinstance(max_nfev, int) and max_nfev >= 1):
        raise ConfigurationError(f"max_nfev must be an integer >= 1, got {max_nfev!r}.")
    box = _as_bounds(bounds, x0 if batched else x0.unsqueeze(0))
    with torch.no_grad():  # one value per data point, before any subtraction broadcasts
        first = f(xd[0] if x_per else xd, *(x0[0] if batched else x0).unbind(-1))
    if not isinstance(first, Tensor) or tuple(first.shape) != (n,):
        got = tuple(first.shape) if isinstance(first, Tensor) else type(first).__name__
        raise ShapeError(
            f"f(xdata, *p0) returned {got}{' for the first curve' if batched else ''}; "
            f"curve_fit needs one value per point of ydata, shape (N,) = ({n},): check that "
            f"xdata has ydata's N points and that f returns a flat vector (no trailing axis "
            f"of 1, no sum; a constant model: return c + 0 * x)."
        )
    jac_r = None  # torch.func's, unless the formula is pointwise (below) or jac is given
    jac_cols = defer = False  # a given jac on the columns; checked after the fit
    if batched:  # one curve's residual, vmapped over the rows asked for
        dims = (0, 0 if x_per else None, 0, 0 if s_per else None)

        last: dict = {}  # with y or not: the last rows asked for (the same object), their data

        def args(rows: Tensor, with_y: bool = True) -> tuple:
            """The data of the curves ``rows`` (ydata None unless ``with_y``: a jac does not
            need it); the gather is kept while the same rows tensor comes back (the running set
            changes only when fits stop; a batch evaluated in parts by the compiled core
            gathers each part's data at each call, a fraction of the part's evaluation)."""
            if with_y in last and last[with_y][0] is rows:
                return last[with_y][1]
            every = rows.numel() == y.shape[0]
            sel = (lambda t: t) if every else (lambda t: t.index_select(0, rows))  # noqa: E731
            got = sel(xd) if x_per else xd, sel(y) if with_y else None, sel(s) if s_per else s
            last[with_y] = rows, got
            return got

    else:  # one curve: the same routes on a batch of one

        def args(rows: Tensor, with_y: bool = True) -> tuple:
            return xd, y, s

        dims = (0, None, None, None)
    if batched:
        vres = torch.func.vmap(resid, in_dims=dims)  # the one-curve residual of each row

        def fun_r(pp: Tensor, rows: Tensor) -> Tensor:
            return _evaluate(lambda q: vres(q, *args(rows)), pp)

        # f elementwise in its parameters: called once on the columns (B, 1) of the batch (no
        # vmap: 0.04 ms against 0.7 ms for 13 curves of 50 points)
        probe = _probe_point(x0, box)
        spread = _broadcasts(resid_cols, vres, probe, args)
        if spread:

            def fun_r(pp: Tensor, rows: Tensor) -> Tensor:  # noqa: F811
                return _evaluate(lambda q: resid_cols(_columns(q), *args(rows)), pp)

    else:

        def vres(pp: Tensor, xx: Tensor, yy: Tensor, ss: Tensor | None) -> Tensor:
            # one curve: the residual itself on its batch of one (vmap cost 0.2 ms a probe)
            return resid(pp.squeeze(0), xx, yy, ss).unsqueeze(0)

        def fun_r(pp: Tensor, rows: Tensor) -> Tensor:
            return _evaluate(lambda q: resid(q, xd, y, s), pp.squeeze(0)).unsqueeze(0)

        spread, probe = True, None
    xb = x0 if batched else x0.unsqueeze(0)
    few = torch.arange(min(4, xb.shape[0]), device=x0.device)
    # a pointwise f: J by one backward pass through the parameters spread over the points
    # (13 curves of 50 points: 0.25 ms against 0.9 ms for M vmapped vjps; one curve 0.22 ms
    # against 1.0 ms; torch 2.13, CPU)
    pointwise = (
        jac is None
        and not cov  # L^-1 mixes the points
        and spread
        and _is_pointwise(resid_cols, vres, xb[few], args(few), n, _box_rows(box, few))
    )
    if pointwise:

        def jac_r(pp: Tensor, rows: Tensor) -> Tensor:
            return _pointwise_jac(resid_cols, pp, args(rows), with_f=rob is not None)

    elif jac is not None:
        # the compiled core evaluates J at the solution on the whole batch: the route is
        # checked there after the fit (a robust loss' result holds J-hat, not J: before it;
        # a batch of at most PROBE_ROWS: the probe's rows are the whole batch)
        defer = (
            rob is None
            and xb.shape[0] > PROBE_ROWS
            and compiled.choose(engine, xb, n, _finite(box), strict=False)
        )
        jac_r, jac_cols, vjres, jac_v = _user_jac(
            jac, xd, y, s, cov, xb, args, dims, batched, x_per, spread, probe, defer
        )
        defer = defer and jac_cols
    given = jac is not None

    def direct_for(cols: bool):
        """The compiled core's direct route (taken where f is not scaled there; ``cols``: with
        the user's jac on the columns), or None."""
        cpu64 = x0.dtype == torch.float64 and x0.device.type == "cpu"
        if not (batched and spread and s is None and rob is None and cpu64):
            return None
        return _direct(f, jac if cols else None, args, y, p)

    direct = direct_for(given and jac_cols)

    def fit(jac_route):
        return _run(
            fun_r,
            jac_route,
            xb,
            batched,
            method,
            ftol,
            xtol,
            gtol,
            max_nfev,
            100.0,
            None,
            "auto",
            box,
            check_jac=given,
            engine=engine,
            loss=rob,
            per_row=batched,
            direct=direct,
        )

    out = fit(jac_r)
    if given and defer and not _jac_agrees(out, vjres, args):
        direct = direct_for(False)
        out = fit(jac_v)  # jac mixes the rows of a batch: vmapped
    if pointwise:  # the probe was near p0: check again at popt (up to 4 solved fits)
        done = (out["status"] > 0).nonzero().squeeze(-1)[:4]
        if done.numel() and not _is_pointwise(
            resid_cols, vres, out["x"][done], args(done), n, _box_rows(box, done)
        ):
            out = fit(None)  # f couples the points away from p0: torch.func's Jacobian
    res = _result(out, batched, method, box)
    jac = res.jac if batched else res.jac.unsqueeze(0)
    cost = torch.as_tensor(res.cost, dtype=x0.dtype, device=x0.device).reshape(-1)
    # f and J out of range: both times the power of two the fit's result was formed at (pcov
    # unchanged; cost and S^2 in user units may overflow or underflow)
    tau = None if absolute_sigma else out["scale"]
    if tau is not None:
        jac, cost = jac * tau[:, None, None], out["cost_scaled"]
    cut = torch.finfo(x0.dtype).eps * max(n, p)
    if out["engine"] == "numba":  # J not finite (status -1): pcov = inf
        pcov, way = compiled.covariance(jac, cut)
        finite = way > 0
    else:
        finite = torch.isfinite(jac).flatten(1).all(1)
        sv, vh = _svd_values(torch.where(finite[:, None, None], jac, 0.0))
        keep = sv > cut * sv.amax(-1, keepdim=True)
        inv = torch.where(keep, 1 / torch.where(keep, sv, 1).pow(2), 0)
        pcov = vh.transpose(1, 2) @ (inv.unsqueeze(-1) * vh)
    pcov = torch.where(finite[:, None, None], pcov, math.inf)
    if not absolute_sigma:
        if n > p:
            pcov = pcov * (2 * cost / (n - p))[:, None, None]
        else:
            pcov = torch.full_like(pcov, math.inf)
            warnings.warn(
                "Covariance of the parameters could not be estimated (N <= P).", stacklevel=2
            )
    success = res.success if batched else torch.tensor([res.success])
    if not bool(torch.as_tensor(success).all()):
        if not batched:
            raise ConvergenceError(
                f"Optimal parameters not found: {res.message} (nfev = "
                f"{res.nfev}; raise max_nfev or start nearer)."
            )
        failed = (~success).nonzero().squeeze(-1).tolist()
        warnings.warn(
            f"{len(failed)} of {x0.shape[0]} fits ended without success (first: "
            f"{failed[:10]}); see result.success and result.message "
            f"(full_output=True).",
            stacklevel=2,
        )
    popt = res.x
    pcov = pcov if batched else pcov.squeeze(0)
    return (popt, pcov, res) if full_output else (popt, pcov)

"""``least_squares``: the front end of the core for residual functions (see
:mod:`steepest.fit`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..errors import (
    ConfigurationError,
    NonFiniteError,
    ShapeError,
    check_positive,
    check_tolerances,
)
from . import compiled
from .bounds import _as_bounds, _finite
from .checks import _as_x0, _check_jac, _evaluate, _with_args
from .core import _jacobian, _least_squares_core, _range_scales
from .loss import robust
from .result import OptimizeResult, _result

METHODS = ("trust-region", "levenberg-marquardt", "gauss-newton")
ALIASES = {
    "lm": "trust-region",
    "trust-region": "trust-region",
    "levenberg-marquardt": "levenberg-marquardt",
    "gauss-newton": "gauss-newton",
}


# ---------------------------------------------------------------------------------- front ends
def least_squares(
    fun: Callable[[Tensor], Tensor],
    x0: Tensor | Sequence[float],
    *,
    method: str = "trust-region",
    jac: Callable[[Tensor], Tensor] | str = "auto",
    ftol: float = 1e-14,
    xtol: float = 1e-8,
    gtol: float = 1e-8,
    max_nfev: int | None = None,
    weights: Tensor | None = None,
    bounds: tuple | None = None,
    vectorize: bool = False,
    factor: float = 100.0,
    engine: str = "auto",
    loss: str = "linear",
    f_scale: float = 1.0,
    args: tuple = (),
    kwargs: dict | None = None,
) -> OptimizeResult:
    r"""Minimise :math:`F(x) = \tfrac12 \sum_i w_i f_i(x)^2` over x, for one problem or a batch
    of independent problems, with the Gauss-Newton metric :math:`M = J^T J` and the step
    :math:`\delta = -(J^T J + \lambda D^2)^{-1} J^T f` (000 problem (1), Table 1; Moré 1978).

    Parameters
    ----------
    fun : ``fun(x) -> f``, written in torch: x (P,) to the residual vector f (M,); for a batch
        (x0 of shape (B, P)) x (B, P) to f (B, M), row b depending on x[b] only (or pass
        ``vectorize=True`` and write fun for one problem: it is vmapped).
    x0 : the start, (P,) or (B, P). dtype and device follow x0 (float64 for a list).
    method : ``"trust-region"`` (default, MINPACK's ``lmder``; alias ``"lm"``),
        ``"levenberg-marquardt"`` (plain LM) or ``"gauss-newton"`` (with a line search); see
        :mod:`steepest.fit`. Other rows of Table 1: for :math:`\tfrac12\|f\|^2` the loss'
        Hessian is I, so the GGN is this Gauss-Newton metric; the Hessian row,
        :math:`J^T J + \sum_i f_i \nabla^2 f_i` (faster than Gauss-Newton when the residual at
        the minimum is large), is ``steepest.minimize(lambda x: 0.5 * fun(x).square().sum(),
        x0, method="trust-exact")``.
    jac : ``"auto"`` (autograd: reverse mode while B M^2 <= 2e5 or P > M, else forward),
        ``"jacfwd"``,
        ``"jacrev"``, or a callable ``jac(x) -> J`` of shape (M, P) (batched: (B, M, P)) of the
        unweighted residuals, checked at x0 against finite differences of fun (below).
    ftol, xtol, gtol : MINPACK's relative tolerances on the reduction of F, on the trust radius
        relative to :math:`\|Dx\|`, and on the cosine between f and the columns of J. Defaults
        1e-14, 1e-8, 1e-8: scipy's are 1e-8 for all three, but a relative reduction of F below
        1e-8 is reached while a poorly conditioned parameter still has only ~4 correct digits
        (F is flat to second order: an error e in x changes F by ~e^2); ftol = 1e-14 gives the
        NIST StRD certified values to >= 6 digits on all 54 problem-starts (35 of 54 with
        scipy's values; ``benchmarks/fit.md``). Pass ``ftol=1e-8, max_nfev=100 * P`` for
        scipy's ``least_squares(method="lm")`` stop, evaluation for evaluation.
    max_nfev : the most evaluations of fun per problem (default 300 P; scipy's 100 P stops
        NIST's Bennett5 and MGH09 from their first starts, which need 253 P and 130 P).
    weights : w_i >= 0, (M,) or (B, M); the residuals become :math:`\sqrt{w_i} f_i` (1/sigma^2
        for data with standard deviations sigma). ``fun``, ``jac`` and ``cost`` of the result are
        those of the weighted residuals.
    bounds : ``(lb, ub)``, each a number, (P,) or (B, P); -inf / inf where a side is free
        (scipy's form); x0 must lie in the box (on a bound is fine). Kept by an active set and
        a projection (:mod:`steepest.fit.bounds`): parameters on a bound whose gradient points
        out are held, the method's step is taken in the others and projected on the box, and
        judged by the Gauss-Newton model's reduction for the projected step; every evaluation
        lies in the box. The result also has ``active_mask`` (-1 on a lower bound, 1 on an
        upper one, as scipy's) and ``optimality`` becomes :math:`\|x - P(x - J^Tf)\|_\infty`
        (P the projection on the box). A fit may end in another local minimum than scipy's
        ``trf`` (on a bound where trf finds an interior one, or the reverse): a local method
        keeps the basin its path enters. Default None: no bounds.
    vectorize : fun takes one problem's x (P,) even for a batch (it is applied with
        ``torch.func.vmap``).
    factor : the initial trust radius is factor * ||D x0|| (MINPACK's 100).
    engine : who runs the algebra between the evaluations: ``"torch"`` (the torch core:
        batched torch operations, any device and dtype), ``"numba"`` (the compiled core,
        :mod:`steepest.fit.compiled`: float64 on the CPU, no bounds, M >= P, P <= 16; numba
        installed, ``pip install 'steepest[fast]'``), or ``"auto"`` (default: numba for a batch
        of at least 256 fits where it can run, else torch). The two run the same algorithm and
        agree to rounding; the compiled one's iteration costs 0.26-0.28 ms where the torch
        core's costs 1.4-1.7 ms on 13 curves (evaluations included), so it pays most on the
        last fits of a batch and on a single fit (its first use in a process loads it, ~1 s).
        Once the fits still running are one part of the batch (all of them, where fun takes
        the whole batch) on one numba thread (fewer than 256 fits, or one thread), the
        compiled core evaluates jac together with fun at every trial point: jac then also
        sees the points of steps that are rejected (not counted in njev), and gets the
        trial points that fun got. It should be a function of its point alone, defined
        wherever fun is, and not write into its argument, as scipy's.
    loss, f_scale : scipy's robust losses, :math:`F = \tfrac12 \sum_i C^2 \rho(w_i f_i^2/C^2)`
        with C = f_scale (:math:`w_i` = 1 without ``weights``): ``"linear"`` (default),
        ``"soft_l1"``, ``"huber"``, ``"cauchy"``, ``"arctan"``; any method, engine and bounds
        (scipy: trf and dogbox only; undamped Gauss-Newton can stall on a robust F, the trust
        region suits it). The fit runs
        on residuals :math:`\hat f` with :math:`\tfrac12\|\hat f\|^2 = F`
        (:mod:`steepest.fit.loss`); the result's ``cost`` and ``grad`` are F's, ``fun`` the
        residuals f, ``jac`` :math:`\hat J` (as scipy's, a Jacobian whose :math:`J^TJ` is the
        Gauss-Newton matrix of F); with a given jac, J-hat's row factor takes f from the last
        evaluation at the Jacobian's point (rows evaluated elsewhere since, as by the check of
        jac at x0, are evaluated again).
    args, kwargs : extra arguments of fun and of a callable jac, as scipy's:
        ``fun(x, *args, **kwargs)`` (shared by every problem of a batch).

    Returns
    -------
    OptimizeResult with x, cost, fun, jac, grad, optimality, status (scipy's codes: 0 max_nfev,
    1 gtol, 2 ftol, 3 xtol, 4 ftol and xtol, -1 a non-finite Jacobian, or one whose scale
    cannot be squared for levenberg-marquardt and gauss-newton), message, success
    (status > 0), nfev, njev, nit; for a batch each with a leading axis B.

    Raises
    ------
    NonFiniteError: x0 or the residuals at x0 are not finite; bounds hold NaN.
    ShapeError: fun returns a scalar, or shapes of x0, fun's output, weights or jac disagree.
    ConfigurationError: an unknown method, a bad tolerance, fun not differentiable by torch.func,
        bounds with lb >= ub or an x0 outside them (ShapeError: bounds of the wrong shape),
        a fun that cannot be vmapped (``vectorize=True``).

    Warns
    -----
    SteepestWarning: a column of the Jacobian is exactly 0 at x0 while fun moves with that
    parameter (a central difference tells: ``.item()``, ``float()`` or numpy in fun cut
    autograd's graph, x0 on a kink, or ``jac`` is wrong): the fit cannot move it. A callable
    ``jac`` that disagrees with finite differences of fun at x0 (on up to 4 problems, along a
    random direction balanced over the columns, at up to four step sizes): its columns that
    disagree are named.

    Example
    -------
    >>> t = torch.linspace(0, 4, 30, dtype=torch.float64); y = 2 * torch.exp(-1.3 * t) + 0.5
    >>> res = least_squares(lambda p: p[0] * torch.exp(-p[1] * t) + p[2] - y, [1.0, 1.0, 0.0])
    >>> res.x, res.success, res.nfev
    """
    method = _check_method(method)
    _check_engine(engine)
    check_tolerances(ftol=ftol, xtol=xtol, gtol=gtol)
    rob = robust(loss, f_scale)
    fun = _with_args(fun, args, kwargs)
    if callable(jac):
        jac = _with_args(jac, args, kwargs)
    check_positive(factor=factor)
    x0 = _as_x0(x0)
    batched = x0.ndim == 2
    p = x0.shape[-1]
    if max_nfev is None:
        max_nfev = 300 * p
    if not (isinstance(max_nfev, int) and max_nfev >= 1):
        raise ConfigurationError(f"max_nfev must be an integer >= 1, got {max_nfev!r}.")
    xb = x0 if batched else x0.unsqueeze(0)
    box = _as_bounds(bounds, xb)
    if not batched:

        def fun_r(xs: Tensor, rows: Tensor) -> Tensor:
            return _evaluate(fun, xs.squeeze(0)).unsqueeze(0)

    elif vectorize:
        vfun = torch.func.vmap(fun)

        def fun_r(xs: Tensor, rows: Tensor) -> Tensor:
            return _evaluate(vfun, xs)

    else:  # fun takes the whole batch: the rows not asked for stay at x0

        def fun_r(xs: Tensor, rows: Tensor) -> Tensor:
            if rows.numel() == xb.shape[0]:
                return _evaluate(fun, xs)
            return _evaluate(fun, xb.index_put((rows,), xs))[rows]

    jac_r = None
    if callable(jac):
        if not batched:

            def user_jac(xs: Tensor, rows: Tensor) -> Tensor:
                return torch.as_tensor(jac(xs.squeeze(0)), dtype=xs.dtype).unsqueeze(0)

        elif vectorize:
            vjac = torch.func.vmap(jac)

            def user_jac(xs: Tensor, rows: Tensor) -> Tensor:
                return _evaluate(vjac, xs, "jac")

        else:

            def user_jac(xs: Tensor, rows: Tensor) -> Tensor:
                full = xs if rows.numel() == xb.shape[0] else xb.index_put((rows,), xs)
                return torch.as_tensor(jac(full), dtype=xs.dtype)[rows]

        jac_r = user_jac
    elif jac not in ("auto", "jacfwd", "jacrev"):
        raise ConfigurationError(
            f"jac must be 'auto', 'jacfwd', 'jacrev' or a callable, got {jac!r}."
        )
    out = _run(
        fun_r,
        jac_r,
        xb,
        batched,
        method,
        ftol,
        xtol,
        gtol,
        max_nfev,
        float(factor),
        weights,
        "auto" if callable(jac) else jac,
        box,
        check_jac=callable(jac),
        engine=engine,
        loss=rob,
        per_row=batched and vectorize,
    )
    return _result(out, batched, method, box)


ENGINES = ("auto", "torch", "numba")


def _check_method(method: str) -> str:
    """The method's own name (``ALIASES``), or a ConfigurationError naming the choices (and,
    for scipy's trf or dogbox, where its bounds and losses went)."""
    if method not in ALIASES:
        hint = (
            " (scipy's trf/dogbox are its methods for bounds and losses; here bounds= and loss= "
            "work with every method)"
            if method in ("trf", "dogbox")
            else ""
        )
        raise ConfigurationError(
            f"unknown method {method!r}{hint}; choose from "
            f"{', '.join(METHODS)} ('lm' is an alias of 'trust-region')."
        )
    return ALIASES[method]


def _check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise ConfigurationError(f"engine must be one of {', '.join(ENGINES)}; got {engine!r}.")


def _check_jac_out(jj: Tensor, xs: Tensor, m: int, batched: bool) -> None:
    """A ShapeError unless ``jj``, what jac returned at the points xs (n, P), is J (n, M, P)
    in xs' dtype and on its device."""
    n, p = xs.shape
    if jj.shape != (n, m, p):
        got = tuple(jj.shape if batched else jj.shape[1:])
        raise ShapeError(
            f"jac returned shape {got}{f' for {n} problems' if batched else ''}; expected "
            f"{'(B, M, P) = ' + str((n, m, p)) if batched else (m, p)}."
        )
    _same_kind(jj, xs, "jac", "the Jacobian")


def _same_kind(out: Tensor, x: Tensor, name: str, what: str) -> None:
    """A ShapeError unless ``out`` (what ``name`` returned) has x's dtype and device."""
    if out.dtype != x.dtype or out.device != x.device:
        raise ShapeError(
            f"{name} returned {out.dtype} on {out.device} for x of {x.dtype} on {x.device}; "
            f"compute {what} in x0's dtype and device."
        )


def _run(
    fun_r,
    jac_r,
    xb: Tensor,
    batched: bool,
    method: str,
    ftol: float,
    xtol: float,
    gtol: float,
    max_nfev: int,
    factor: float,
    weights: Tensor | None,
    mode: str,
    box: tuple[Tensor, Tensor] | None = None,
    check_jac: bool = False,
    engine: str = "auto",
    loss: tuple | None = None,
    per_row: bool = False,
    direct: tuple | None = None,
) -> dict:
    """Checks f(x0), weights and jac, then runs the core (shared by the front ends); ``box``:
    the bounds (lb, ub) from :func:`~.bounds._as_bounds`, or None; ``check_jac``: jac_r is the
    user's, checked against fun (:func:`~.checks._check_jac`); ``engine``: the torch core or
    the compiled one (:mod:`.compiled`); ``loss``: (transform, factor) of :func:`.loss.robust`,
    or None; ``per_row``: fun_r and jac_r cost in proportion to the rows asked for (each fit
    evaluated on its own, as curve_fit's routes and a vectorized fun are; not a fun that takes
    the whole batch), so that the compiled core may evaluate a large batch in parts;
    ``direct``: fun_r as a model less data, for the compiled core (its ``direct``), taken
    where f is neither weighted, transformed nor scaled here. The
    returned fun is the (weighted) residual vector, jac the core's (of the
    transformed residuals under a robust loss), cost and grad those of the fitted F."""
    rows = torch.arange(xb.shape[0], device=xb.device)
    p = xb.shape[1]
    with torch.no_grad():
        f0 = fun_r(xb, rows)
    want = "(B, M) for x0 of shape (B, P)" if batched else "(M,)"
    if f0.ndim <= 1:
        raise ShapeError(
            f"fun returned a scalar{' per problem' if batched else ''} (shape "
            f"{tuple(f0.shape if batched else f0.squeeze(0).shape)}); least_squares needs the "
            f"vector of residuals f, shape {want}, and minimises 1/2 sum f_i^2: return the "
            f"residuals, not their sum of squares, or use steepest.minimize for a scalar "
            f"objective."
        )
    if f0.ndim != 2 or f0.shape[0] != xb.shape[0]:
        got = tuple(f0.shape if batched else f0.squeeze(0).shape)
        raise ShapeError(
            f"fun returned shape {got}; expected {want}: one flat residual vector "
            f"per problem (flatten it)."
        )
    _same_kind(f0, xb, "fun", "the residuals")
    m = f0.shape[1]
    box = _finite(box)  # an all-infinite box is no box (the core's unbounded path)
    fast = compiled.choose(engine, xb, m, box)
    sw = None
    if weights is not None:
        w = torch.as_tensor(weights, dtype=xb.dtype, device=xb.device)
        if w.shape not in ((m,), (xb.shape[0], m)):
            raise ShapeError(
                f"weights of shape {tuple(w.shape)} do not match the {m} residuals"
                f"; pass (M,) = ({m},){' or (B, M)' if batched else ''}."
            )
        if not bool((torch.isfinite(w) & (w >= 0)).all()):
            raise NonFiniteError("weights must be finite and >= 0 (w_i = 1/sigma_i^2).")
        sw = w.sqrt().expand(xb.shape[0], m)
        f0 = f0 * sw
    # f0 finite: its sum is (one reduction: 0.06 ms for 10,000 x 50, against 1.6 ms for
    # isfinite on every entry), or, where the sum is not, entry by entry (a finite sum that
    # overflows passes there)
    bad = None if bool(f0.sum().isfinite()) else ~torch.isfinite(f0)
    if bad is not None and bool(bad.any()):
        where = bad.nonzero()[:5].tolist()
        raise NonFiniteError(
            f"the residuals are not finite at x0 ({int(bad.sum())} of {f0.numel()}, first at "
            f"index {where}); start where fun is defined (check divisions, logs, overflows)."
        )

    transform, factor_l = loss if loss is not None else (None, None)
    # a robust loss with J from jac_r: J-hat's row factor needs f at the Jacobian's point, where
    # the core evaluated f one call before (x0, the accepted trial, a stopped fit's x): each
    # row's last point and weighted f, kept by res_w (not under autograd's route, which takes
    # the Jacobian of f-hat itself)
    last = None
    if factor_l is not None and jac_r is not None:
        last = (xb.detach().clone(), f0.detach().clone())
    if transform is not None:  # a robust loss: the fit runs on f-hat, 1/2 ||f-hat||^2 = F
        f0 = transform(f0)
    inv = _scales(f0)  # out of range: the fit runs on f and J times a power of two
    if inv is not None:
        f0 = f0 * inv.unsqueeze(-1)

    def res_w(xs: Tensor, rows: Tensor) -> Tensor:  # weighted (and transformed), user's scale
        out = fun_r(xs, rows)
        out = out * sw[rows] if sw is not None else out
        if last is not None:
            last[0][rows], last[1][rows] = xs.detach(), out.detach()
        return transform(out) if transform is not None else out

    def res_r(xs: Tensor, rows: Tensor) -> Tensor:  # then scaled (sw inv may overflow)
        out = res_w(xs, rows)
        return out * inv[rows].unsqueeze(-1) if inv is not None else out

    def res_nograd(xs: Tensor, rows: Tensor) -> Tensor:
        with torch.no_grad():
            return res_r(xs, rows)

    if jac_r is None:

        def jac_w(xs: Tensor, rows: Tensor) -> Tensor:
            # of the weighted residuals, then scaled: the backward pass would multiply by
            # inv sw first, which may overflow where f sw and J sw do not
            jj = _jacobian(lambda xx: res_w(xx, rows), xs, m, mode).detach()
            return jj * inv[rows][:, None, None] if inv is not None else jj

    else:

        def jac_w(xs: Tensor, rows: Tensor) -> Tensor:
            jj = jac_r(xs, rows)  # or (J, f): a route that has f at xs anyway
            jj, fw = jj if isinstance(jj, tuple) else (jj, None)
            _check_jac_out(jj, xs, m, batched)
            jj = jj * sw[rows].unsqueeze(-1) if sw is not None else jj
            if last is not None:  # J-hat = diag(rho' / sqrt(h)) J, at f: the route's own f,
                # or each row's last f where it was last evaluated at xs; the other rows (the
                # torch core recomputes J on a few rows whose trial failed) evaluated again,
                # not counted in nfev (the core keeps f-hat)
                if fw is not None:
                    fw = fw * sw[rows] if sw is not None else fw
                else:
                    fw = last[1][rows]
                    miss = (last[0][rows] != xs).any(-1)
                    if bool(miss.any()):
                        with torch.no_grad():
                            again = fun_r(xs[miss], rows[miss])
                        fw[miss] = again * sw[rows[miss]] if sw is not None else again
                jj = factor_l(fw).unsqueeze(-1) * jj
            return jj * inv[rows][:, None, None] if inv is not None else jj

        if check_jac:
            _check_jac(res_nograd, jac_w, xb, f0, rows, box)
    if fast:
        with torch.no_grad():  # once around the loop, not once an evaluation (~2 us each);
            # torch.func's Jacobians ignore it (a function transform), curve_fit's pointwise
            # one enables grad for its backward pass
            plain = sw is None and transform is None and inv is None
            out = compiled._least_squares_compiled(
                res_r, xb, f0, jac_w, method, ftol, xtol, gtol, max_nfev, factor,
                compiled.part_rows(m, p) if per_row else None, direct if plain else None,
            )  # fmt: skip
    else:
        out = _least_squares_core(
            res_nograd, xb, f0, jac_w, method, ftol, xtol, gtol, max_nfev, factor, box
        )
    # cost and grad of F from the core's (scaled) f and J, then all in the user's units (inf
    # where out of range, never inf - inf = NaN); f may also have left the range during the
    # fit (a zero-residual one): then one more power of two
    fs, js = out["fun"], out["jac"]
    tau = _scales(fs)
    if tau is not None:
        fs, js = fs * tau.unsqueeze(-1), js * tau[:, None, None]
        inv = tau if inv is None else inv * tau
    grad = (fs.unsqueeze(-2) @ js).squeeze(-2)  # J^T f (a batched matmul: no (B, M, P) temporary)
    cost = 0.5 * fs.pow(2).sum(-1)
    out["scale"], out["cost_scaled"] = inv, cost  # (curve_fit's pcov: J and f scaled alike)
    if inv is not None:  # back to the user's units (exact; divided twice: inv^2 itself
        # under- or overflows beyond 2^+-511, and a zero entry of grad became 0/0 = NaN)
        iv = inv.unsqueeze(-1)
        grad, cost = grad / iv / iv, cost / inv / inv
        out["fun"] = fs / iv
        out["jac"] = js / inv[:, None, None]
    out["grad"], out["cost"] = grad, cost
    if transform is not None:  # fun: the residuals themselves, not f-hat (one more evaluation)
        with torch.no_grad():
            fw = fun_r(out["x"], rows)
        out["fun"] = fw * sw if sw is not None else fw
    out["engine"] = "numba" if fast else "torch"  # the one that ran (curve_fit's pcov follows)
    return out


def _scales(f: Tensor) -> Tensor | None:
    r"""Per problem, :math:`1/\sigma`, a power of two (:func:`.core._range_scales` of
    :math:`\max_i |f_i|`), or None when it is 1 for all. The fit runs on :math:`f / \sigma` and
    :math:`J / \sigma`: the squares it forms (:math:`\|f\|^2`, :math:`c^T w`, the predicted
    reduction) overflow beyond :math:`\|f\| \approx 10^{154}` and lose the ratio tests to
    underflow below :math:`10^{-154}`, while every step and test of the three methods is
    invariant to the scale of f and J together, and a power of two scales exactly: such a fit
    takes the steps it takes at :math:`\|f\| \approx 1`, bit for bit (MINPACK gets the same
    from its scaled norms, ``enorm``)."""
    inv = _range_scales(f.detach().abs().amax(-1))
    return None if bool((inv == 1).all()) else inv

r"""The compiled core: :mod:`.core`'s loop with its per-fit algebra compiled by numba, for
float64 fits on the CPU.

The torch core (:func:`.core._least_squares_core`) runs the algebra of an iteration as ~250
batched torch operations. On a large batch each costs little per fit; on the few fits that run
longest (the tail of a batch) each costs its fixed overhead of a few microseconds, and an
iteration 1.4-1.8 ms. Here the same algorithm is one compiled call per stage over the fits
still running (:mod:`.kernels`):

- at a new Jacobian: J's column norms, :math:`J^Tf` and the gtol test, the scaling D, the
  Householder QR of :math:`[J\ f]` and the one-sided Jacobi SVD of :math:`RD^{-1} = USV^T`
  (started from the previous V: two or three rotating sweeps), giving :math:`\mu = s^2`,
  :math:`c' = -SU^Tf`, :math:`V^T` and the Gauss-Newton step, as :func:`.core._factor_r`.
  With the trust region (the default method), where the fit's last step was a Gauss-Newton
  step, the Gauss-Newton step is first formed from R by back substitution, as MINPACK's
  ``lmpar`` does; where J has full rank and the step fits the radius, that is the step, and
  no SVD is formed (46,883 of the 55,829 trials on the 10,000 decay curves of
  ``benchmarks/fit_speed.py``). The SVD is then formed only if a rejected step shrinks the
  radius below the step (from the kept :math:`RD^{-1}` and :math:`Q^Tf`: 721 trials). The
  torch core always takes the SVD; the two steps are equal in exact arithmetic and differ at
  rounding level;
- the step: MINPACK's ``lmpar`` in the SVD coordinates (:func:`.core._lmpar`), or the plain
  LM / Gauss-Newton step, :math:`D\delta = Vw`;
- after the trial: rho, the radius or lambda, acceptance and MINPACK's stopping tests.

``fun`` and ``jac`` stay the user's torch functions, evaluated on the fits still running as one
batch (the state lives in numpy arrays shared with torch by ``torch.from_numpy``), or, where each
fit is evaluated on its own (curve_fit, a vectorized fun), in parts of :func:`part_rows` fits,
each part's kernel stage right after its evaluation, while its data are still in the cache. The
kernels' arithmetic per fit is the same in parts; the user's function may round differently on a
batch of another size (torch's vectorised and scalar loops round ``pow`` and ``hypot``
differently, so an entry can differ in its last bit depending on where a loop's tail falls), as it
already could when the running set shrinks: a fit in parts then differs from one part at rounding
level (5e-15 in popt, a power law with ``pow`` on 4,000 curves); the decay curves of the tests and
benchmarks (``exp`` and products) fit bitwise alike in parts and in one. A Jacobian formed column
by column (curve_fit's pointwise autograd route: (P, n, M)) is read so by the kernel, not copied
to (n, M, P). curve_fit's unweighted residual, a model less its data, takes a direct route: the
user's model (and jac, if given) called on the parameter columns of numpy arrays, their output
handed to the kernels as numpy, and f = g - y formed by the update kernel (``direct``: bitwise the
same fit; 0.956-0.975x the time of the 10,000 decay fits given J, 0.92-0.93x their 13-fit tail,
against the wrapped route's torch tensors through :mod:`.lsq`'s wrappers; ``benchmarks/fit.md``).
The algorithm and its constants are :mod:`.core`'s, line for line; the two agree to rounding
(``tests/test_fit_compiled.py``). Each stage over at least :data:`PARALLEL_MIN` fits is shared
among numba's threads (``numba.set_num_threads``), in contiguous slices of the fits, bitwise the
one-thread result. Per iteration and part the driver makes two calls to the user (fun at the trial
points, jac at the accepted ones) and two kernel calls, and per iteration two more (the trial
steps, the sorting out). Once the running set is one part on one thread (the tail of a batch, or
a small batch after x0's Jacobian), a loop of its own evaluates f and J together at the trial
points from the next trial on (the direct route hands both the same parameter columns) and makes
one kernel call an iteration: the update, the Jacobian stage of the fits that moved (J at the
accepted trial point is J at the new x) and the next trial (:func:`.kernels._update_stage_trial`).
jac is then also evaluated at the trial points of steps that are rejected (their rows are not
read, nor counted in njev): on the 13 fits of ``benchmarks/fit_speed.py`` that run to max_nfev,
the loop took 0.85-0.88x the time of the one with J at the accepted points only and two kernel
calls an iteration (interleaved, one and two threads; bitwise the same fits;
``benchmarks/fit.md``). The fits that stop after a trial have J evaluated at their x for the
result once all fits stopped (in parts, or in one call on the whole batch where it is evaluated
whole): the kernels do not keep each J (9,889 of 10,000 decay fits stop after an accepted step,
whose J MINPACK never evaluates; the tail evaluates it at the trial point, unused). The loop runs
under one ``torch.no_grad()``.

:func:`~steepest.fit.least_squares` and :func:`~steepest.fit.curve_fit` take it with
``engine="numba"``, and with ``engine="auto"`` (default) for a batch of at least
:data:`AUTO_MIN_BATCH` fits, when numba is installed (``pip install 'steepest[fast]'``), x0 is
float64 on the CPU, there are no bounds, and :math:`M \ge P`, :math:`P \le 16` (square systems,
M = P, too: 10,000 Rosenbrock systems 0.11 s against the torch core's 0.33 s, one thread). Its
first use in a process imports numba and loads the kernels from numba's on-disk cache (~1 s);
the first use on a machine compiles them (~20-35 s, once). Once loaded, it is faster than the
torch core at every batch size (one thread: one curve 7.5 against 13.9 ms, 64 curves 17.7
against 45.9 ms, in a slow phase of the VM; ``benchmarks/fit.md``): the threshold of ``"auto"``
is a design choice, so that a script with a few small fits does not pay the load
(``engine="numba"`` takes it at any size).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from .checks import _check_seen

METHOD_CODES = {"trust-region": 0, "levenberg-marquardt": 1, "gauss-newton": 2}

#: the largest P the compiled core takes (the Jacobi sweeps cost ~P^3 a factorisation)
MAX_P = 16

#: the stages (factorisation, trial, update; curve_fit's covariance) over at least this many
#: fits are shared among numba's threads (a choice, not tuned: fewer take ~0.5 ms on one
#: thread)
PARALLEL_MIN = 256

#: a batch is evaluated and processed in parts of about this many entries of J (2 MB in
#: float64: a part's residuals, Jacobian and the user's temporaries stay in the cache between
#: the evaluation and its kernel stage; torch 2.13, one thread, 10,000 curves of 50 points:
#: 0.88-0.91x the time of one whole-batch part with the autograd Jacobian, 0.92-0.95x with a
#: given one; 2^16 entries 0.95-0.98x, 2^17 0.93-0.95x, 2^19 0.90-0.94x;
#: ``benchmarks/fit_parts.py``, two runs)
PART_ELEMENTS = 2**18

#: ``engine="auto"`` takes the compiled core from this many fits (a choice: a fit of fewer
#: costs the torch core well under the ~1 s that loading the kernels costs a fresh process)
AUTO_MIN_BATCH = 256


@functools.cache
def _import_error() -> str | None:
    """None when numba imports, else why not (the first call imports it, ~0.3 s)."""
    if importlib.util.find_spec("numba") is None:
        return "numba is not installed (pip install 'steepest[fast]')"
    try:
        importlib.import_module("numba")
    except Exception as e:  # a numba built for another numpy, llvmlite's library missing, ...
        return f"numba cannot be imported ({type(e).__name__}: {e})"
    return None


def available() -> bool:
    """Whether numba can be imported (installed, and importable with this numpy and llvmlite):
    the compiled core can run. Imports numba on the first call."""
    return _import_error() is None


@functools.cache
def _kernels():
    """The kernels module (imports numba; the first call in a process loads the kernels)."""
    return importlib.import_module(".kernels", __package__)


@functools.cache
def _factor():
    """The factorisations' module (:mod:`.factor`, imported with the kernels)."""
    return importlib.import_module(".factor", __package__)


def eligible(x0: Tensor, m: int, box) -> str | None:
    """None when the compiled core can run the fits x0 (B, P) with M = m residuals and bounds
    ``box``, else the reason it cannot."""
    if x0.device.type != "cpu":
        return f"x0 is on {x0.device} (the compiled core runs on the CPU)"
    if x0.dtype != torch.float64:
        return f"x0 is {x0.dtype} (the compiled core is float64)"
    if box is not None:
        return "bounds are given (the compiled core has none)"
    p = x0.shape[-1]
    if not m >= p or p > MAX_P:
        return f"M = {m}, P = {p} (the compiled core needs M >= P and P <= {MAX_P})"
    if not available():
        return _import_error() or "numba is not installed (pip install 'steepest[fast]')"
    return None


def choose(engine: str, x0: Tensor, m: int, box, strict: bool = True) -> bool:
    """Whether ``engine`` ("auto", "torch" or "numba") runs the fits x0 (B, P) compiled; raises
    for "numba" where it cannot run (unless not ``strict``: then False)."""
    if engine == "torch":
        return False
    if engine == "auto" and x0.shape[0] < AUTO_MIN_BATCH:
        return False
    why_not = eligible(x0, m, box)
    if engine == "numba" and why_not is not None and strict:
        from ..errors import ConfigurationError

        raise ConfigurationError(
            f"engine='numba' cannot run this fit: {why_not}; pass engine='auto' (numba where it "
            f"can run, else torch) or engine='torch'."
        )
    return why_not is None


def part_rows(m: int, p: int) -> int:
    """The fits per part of a batch with M = m residuals and P = p parameters
    (:data:`PART_ELEMENTS` entries of J, and at least :data:`PARALLEL_MIN` fits, so that a
    full part's stages are still shared among numba's threads; the last part of a set holds
    what is left, down to one fit)."""
    return max(PARALLEL_MIN, PART_ELEMENTS // (m * p))


def _threads(n: int) -> int:
    """The numba threads a stage over n items is shared among: numba's thread count from
    :data:`PARALLEL_MIN` items, else 1."""
    return _kernels().numba.get_num_threads() if n >= PARALLEL_MIN else 1


def _call(name: str, n: int, *args, mod=None) -> None:
    """The kernel ``name`` of :mod:`.kernels` (or of the module ``mod``) over items 0..n-1:
    ``name(0, n, *args)`` on this thread, or, on :func:`_threads` > 1,
    ``name_parallel(threads, *args)`` (contiguous slices, one a thread: bitwise the same
    result)."""
    kern = _kernels() if mod is None else mod
    if (threads := _threads(n)) > 1:
        getattr(kern, name + "_parallel")(threads, *args)
    else:
        getattr(kern, name)(0, n, *args)


def covariance(jac: Tensor, cut: float) -> tuple[Tensor, Tensor]:
    r"""curve_fit's covariance before its scale, :math:`(J^TJ)^+ = VS^{-2}V^T` with the
    singular values at most ``cut`` :math:`s_{max}` dropped, of a batch of tall float64 CPU
    matrices jac (n, M, P), M >= P (n, P, P); :math:`R^{-1}R^{-T}` from J's QR where that
    drops nothing, else by the SVD of R (:func:`.factor._cov_rows`); and the way each matrix
    took (n,) int8: 1 by R^-1, 2 by the SVD, 0 not finite (its covariance 0, not factored)."""
    a = np.ascontiguousarray(jac.detach().numpy())
    n, _, p = a.shape
    cov, way = np.empty((n, p, p)), np.empty(n, dtype=np.int8)
    _call("_cov_rows", n, a, float(cut), cov, way, mod=_factor())
    return torch.from_numpy(cov), torch.from_numpy(way)


def _least_squares_compiled(
    fun_r: Callable[[Tensor, Tensor], Tensor],
    x0: Tensor,
    f0: Tensor,
    jac_r: Callable[[Tensor, Tensor], Tensor],
    method: str,
    ftol: float,
    xtol: float,
    gtol: float,
    max_nfev: int,
    factor: float,
    part_size: int | None = None,
    direct: tuple | None = None,
) -> dict:
    """:func:`.core._least_squares_core` (without bounds) with the algebra compiled; the same
    arguments and the same returned dict. The state lives in numpy arrays of the whole batch,
    shared with torch (``torch.from_numpy``); the fits still running are the index array
    ``act``; ``fun_r`` and ``jac_r`` see the running (or due) rows as one batch, or, given
    ``part_size``, in consecutive parts of at most ``part_size`` rows, each part's kernel
    stage right after its evaluation (see :func:`part_rows`). ``direct``: (model, jac, y) of
    a residual that is a model less data, :math:`f = g(x) - y` (curve_fit's, unweighted):
    ``model(xs, rows)`` the model's values (n, M) at the points xs (a numpy array (n, P)) as a
    float64 numpy array, ``jac(xs, rows)`` J (n, M, P) so (or None: ``jac_r``), y (B, M); the
    update kernel then forms f itself (no torch tensor for the residuals, no wrappers between
    the user's calls and the kernels: in a 13-fit tail they took ~25 of an iteration's
    ~106 us). ``fun_r`` still evaluates f0 and the checks at x0."""
    bsz, p = x0.shape
    m = f0.shape[1]
    model, jac_d, yd = direct if direct is not None else (None, None, np.empty((0, m)))
    kern = _kernels()
    eps = float(np.finfo(np.float64).eps)
    meth = METHOD_CODES[method]
    cut = eps * max(m, p) if method == "gauss-newton" else 0.0
    x = x0.detach().numpy().copy()
    f = f0.detach().numpy().copy()
    fnorm = np.linalg.norm(f, axis=1)
    floor = eps * fnorm
    d = np.zeros((bsz, p)) if meth == 0 else np.ones((bsz, p))
    jac = np.empty((bsz, m, p))  # J of the fits that stop at a stage (:func:`final_jac`)
    mu, c, gn, w = (np.zeros((bsz, p)) for _ in range(4))
    vh = np.tile(np.eye(p), (bsz, 1, 1))  # V: I until a fit's first SVD (the next's start)
    rt = np.zeros((bsz, p + 1, p))  # T = R D^-1 and Q^T f of a step from R (kernels), gq:
    gq = np.zeros(bsz, dtype=np.bool_)  # the fits that hold one (their SVD not formed)
    gn_norm, gnorm, lo, radius, lam, pnorm = (np.zeros(bsz) for _ in range(6))
    lref = np.ones(bsz)  # LM: the largest squared column norm of J at x0 (lambda's bounds)
    alpha = np.ones(bsz)
    nit = np.zeros(bsz, dtype=np.int64)
    first = np.ones(bsz, dtype=np.bool_)
    # per fit when it stops (x, f, nit and stale of a stopped fit do not change after)
    status, nfevs = np.zeros(bsz, dtype=np.int64), np.zeros(bsz, dtype=np.int64)
    stale = np.zeros(bsz, dtype=np.bool_)  # J not at x (the last step accepted)
    act = np.arange(bsz)
    due = act
    nfev = 1
    # one signature for the kernels: float tolerances, max_nfev within int64
    ftol, xtol, gtol, factor = float(ftol), float(xtol), float(gtol), float(factor)
    max_nfev = min(int(max_nfev), 2**62)
    gtu = max(gtol, eps)
    ftu, xtu = max(ftol, eps), max(xtol, eps)

    held: list = []  # the two index arrays last used (act, due) and their tensors, the most
    # recent last: the same tensor back for the same array, so that curve_fit keeps its
    # gathered data while the running set holds (the loop below alternates act and a new
    # due array when some trials are rejected; the tail passes act alone)

    def rows(idx: np.ndarray) -> Tensor:
        for k, (i, t) in enumerate(held):
            if i is idx:
                if k == 0 and len(held) == 2:  # the last used goes last: act survives a
                    held.reverse()  # run of different due arrays
                return t
        t = torch.from_numpy(idx)
        held[:] = [*held[-1:], (idx, t)]
        return t

    size = bsz if part_size is None else part_size

    def alone(n: int) -> bool:
        """Whether a set of n rows is one part on this thread: its stages fused into fewer
        kernel calls (the tail)."""
        return n <= size and _threads(n) == 1

    def spans(n: int):
        """The parts (i, k) of a set of n rows, each evaluated and processed in turn."""
        if n <= size:  # one part, or none
            return ((0, n),) if n else ()
        return [(i, min(i + size, n)) for i in range(0, n, size)]

    def part(idx: np.ndarray, i: int, k: int) -> Tensor:
        """The rows idx[i:k] as a tensor: the held one when the part is the whole set."""
        return rows(idx) if i == 0 and k == idx.size else torch.from_numpy(idx[i:k])

    def evaluate_jac(xs: np.ndarray, at: Tensor) -> tuple[np.ndarray, bool]:
        """J at xs (the points of the rows ``at``, :func:`part`), (n, M, P), or (P, n, M) and
        True where the route formed it so (the kernel reads either; a copy to (n, M, P) cost
        ~5 ms for 10,000 fits of 50 points)."""
        if jac_d is not None:
            return jac_d(xs, at), False
        j = jac_r(torch.from_numpy(xs), at).detach()
        if j.dtype == torch.float64 and not j.is_contiguous():
            cols = j.permute(2, 0, 1)
            if cols.is_contiguous():
                return cols.numpy(), True
        return np.ascontiguousarray(j.numpy(), dtype=np.float64), False

    def retire(done: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """Write the fits act[done] out (status ``codes[done]``); returns the new ``act``."""
        nonlocal act
        idx = act[done]
        status[idx] = codes[done]
        nfevs[idx] = nfev
        act = act[~done]
        return act

    def final_jac() -> Tensor:
        """J at x of every fit that stopped after a trial, not counted in njev (after an
        accepted step MINPACK stops before it; after a rejected one it is the J at x evaluated
        before, again); the others' J the stage stored (its stops: status 1, gtol, and -1, J
        not finite; a trial's are 0, 2, 3 and 4). Evaluated once all fits stopped: in parts
        where the batch is evaluated so, each part copied into the state's numpy array (for
        10,000 decay fits one call on the whole batch took 9.9 ms, against 3.5 ms for the same
        call earlier in the fit: torch's fresh 12 MB J and its temporaries faulted in 5,300
        pages of 4 kB; numpy's 12 MB array, filled part by part, 0-376, its memory reused or
        madvised into huge pages); else in one call on the whole batch where no fit stopped at
        a stage (its J is the result as it comes)."""
        stored = (status == 1) | (status == -1)
        if part_size is None and not stored.any():
            j = jac_r(torch.from_numpy(x.copy()), rows(np.arange(bsz))).detach()
            return j.contiguous()  # a route's column-by-column J: (n, M, P) as the state
        idx = np.flatnonzero(~stored)
        every = idx.size == bsz  # the common case: a part is a slice of the state
        for i, k in spans(idx.size):
            j, cols = evaluate_jac(x[idx[i:k]], part(idx, i, k))
            at = slice(i, k) if every else idx[i:k]
            jac[at] = np.moveaxis(j, 0, -1) if cols else j
        return torch.from_numpy(jac)

    def evaluate_f(xs: np.ndarray, at: Tensor) -> np.ndarray:
        """f at xs (the trial points of the rows ``at``) as a float64 numpy array (n, M); the
        model's values g there on the direct route (the kernel forms g - y)."""
        if model is not None:
            return model(xs, at)
        ft = fun_r(torch.from_numpy(xs), at)
        return np.ascontiguousarray((ft.detach() if ft.requires_grad else ft).numpy(), np.float64)

    def stop_due(codes: np.ndarray) -> None:
        """Write out the due fits that stop at their Jacobian (``codes``: per due fit, 0 for
        one that goes on)."""
        full = np.zeros(bsz, dtype=np.int64)
        full[due] = codes
        codes = full[act]
        retire(codes != 0, codes)

    codes_buf, due_buf = np.empty(bsz, dtype=np.int64), np.empty(bsz, dtype=np.int64)
    acn_buf = np.empty((bsz, p))  # J's column norms (checked at x0 only)

    scodes_buf = np.empty(bsz, dtype=np.int64)  # the tail's stage codes (per due fit)

    def tail() -> None:
        """The loop once the running set is one part on this thread (:func:`alone`; it stays so
        as it shrinks), from the trial after a Jacobian stage of the loop below on: the tail
        of a batch, or a small batch after x0. Per iteration f and J at the trial points, then
        one kernel call (:func:`.kernels._update_stage_trial`): the update, the Jacobian stage
        of the fits that moved (J at their new x is J at their trial point), and the next
        trial. The same arithmetic per fit as the loop below, with one kernel call an
        iteration instead of two, and one set of parameter columns for f and J (the direct
        route); jac is then also evaluated at the trial points of steps that are rejected
        (not counted in njev; their rows are not read). The 13 fits that run to max_nfev in
        ``benchmarks/fit_speed.py``: ~380 iterations."""
        nonlocal due, nfev
        at_act, xt = rows(act), None
        while True:
            if xt is None:  # the trial alone (at the start, or after fits stopped at their J)
                xt = np.empty((act.size, p))  # new each time: fun and jac may keep what they
                # were given
                kern._trial(0, act.size, act, meth, x, d, mu, c, vh, gn, gn_norm, gnorm, lo,
                            radius, lam, alpha, first, w, pnorm, xt, cut, rt, gq)  # fmt: skip
            nfev += 1
            ft = evaluate_f(xt, at_act)
            jt, cols = evaluate_jac(xt, at_act)
            n = act.size
            codes, due, xn = codes_buf[:n], due_buf[:n], np.empty((n, p))
            n_done, n_due, stops = kern._update_stage_trial(act, ft, jt, cols, yd, meth, nfev,
                max_nfev, ftol, xtol, ftu, xtu, x, f, fnorm, floor, d, c, w, pnorm, radius, lam,
                lref, alpha, nit, first, stale, xt, codes, due, scodes_buf, mu, vh, gn, gn_norm,
                gnorm, lo, jac, cut, gtu, factor, acn_buf, rt, gq, xn)  # fmt: skip
            if n_done:
                retire(codes != -9, codes)
                if not act.size:
                    return
                at_act = rows(act)
            xt = xn[: act.size]
            if stops:  # no trial was taken: it follows, on the fits left
                due = due[:n_due]
                stop_due(scodes_buf[:n_due])
                if not act.size:
                    return
                at_act, xt = rows(act), None

    xdue = x.copy()  # the points of the due Jacobians (row k: fit due[k]; a copy: fun and
    # jac never see the state itself)
    while True:
        at_x0 = nfev == 1
        if due.size:
            codes = np.empty(due.size, dtype=np.int64)
            acn = acn_buf[: due.size]
            for i, k in spans(due.size):
                j, cols = evaluate_jac(xdue[i:k], part(due, i, k))
                _call("_jac_stage", k - i, j, cols, due[i:k], at_x0, f, fnorm, x, d, jac, mu, c,
                      vh, gn, gn_norm, gnorm, lo, radius, lam, lref, meth, cut, gtu, factor,
                      codes[i:k], stale, acn[i:k], rt, gq)  # fmt: skip
            if at_x0:
                _check_seen(fun_r, x0, f0, rows(act), torch.from_numpy(acn), None)
            if np.count_nonzero(codes):
                stop_due(codes)
                if not act.size:
                    break
        if alone(act.size):  # from the trial on: the tail's loop
            tail()
            break
        n = act.size
        xt = np.empty((n, p))  # new each time: fun and jac may keep what they were given
        _call("_trial", n, act, meth, x, d, mu, c, vh, gn, gn_norm, gnorm, lo, radius, lam,
              alpha, first, w, pnorm, xt, cut, rt, gq)  # fmt: skip
        nfev += 1
        codes = codes_buf[:n]
        due, xdue = due_buf[:n], np.empty((n, p))
        for i, k in spans(n):
            _call("_update", k - i, act[i:k], evaluate_f(xt[i:k], part(act, i, k)), yd, meth, nfev,
                  max_nfev, ftol, xtol, ftu, xtu, x, f, fnorm, floor, d, c, w, pnorm, radius, lam,
                  lref, alpha, nit, first, stale, xt[i:k], codes[i:k])  # fmt: skip
        n_done, n_due = kern._sort_out(act, codes, x, due, xdue)
        # every running fit moved: the same rows object (curve_fit keeps its gathered data)
        due, xdue = (act, xdue) if n_due == n else (due[:n_due], xdue[:n_due])
        if n_done:
            retire(codes != -9, codes)
            if not act.size:
                break
    njev = nit + 1 - stale  # stale: J evaluated at the last x after the stop, not counted
    out = {"x": x, "fun": f, "status": status, "nfev": nfevs, "njev": njev, "nit": nit}
    return {"jac": final_jac()} | {k: torch.from_numpy(v) for k, v in out.items()}

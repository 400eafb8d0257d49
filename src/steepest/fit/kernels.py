r"""The kernels of the compiled core (:mod:`.compiled`), in numba: the per-fit algebra of
:mod:`.core`'s loop, fit by fit (see :mod:`.compiled` for what each stage computes and
:mod:`.core` for the math), on the factorisations of :mod:`.factor`. Imported only when the
compiled core first runs (numba's import and the load of the kernels from its on-disk cache
take ~1 s; the first compilation on a machine ~20-35 s). Tested against LAPACK's QR and SVD
and the torch core's lmpar in ``tests/test_fit_kernels.py``."""

from __future__ import annotations

import math

import numba
import numpy as np

from .factor import _dot, _jit, _norm, _qr, _svd_r


@_jit
def _factor_svd(b, at, p, d, g, v, acnorm, cut, mu, c, vh, gn, gn_norm, gnorm, lo):
    r"""Fit b's factor from the QR in ``at`` (:func:`_qr`'s layout: R in rows 0..P-1, Q^T f in
    row P) and the scaling ``d``, as :func:`.core._factor_r` / :func:`.core._factor_svd`: the
    SVD :math:`RD^{-1} = USV^T` by :func:`_svd_r` from the fit's previous V (``vh[b]``, I
    before its first: J moved little, so on the 10,000 decay curves two or three rotating
    sweeps and one that finds nothing left to rotate), then :math:`\mu = s^2`,
    :math:`c' = -SU^Tf = -G^T Q^Tf`, :math:`V^T`, with the directions dropped whose s is 0 or
    at most ``cut`` s_max, or that lie mostly (weight > 1/2) on the columns of J whose norm
    ``acnorm`` is 0; then the Gauss-Newton step gn = c'/mu, its norm, ||c'|| and lmpar's lower
    bound's factor ``lo``."""
    for i in range(p):
        for j in range(p):
            v[i, j] = vh[b, j, i]
    _svd_r(at, p, d, g, v)
    smax = 0.0
    for i in range(p):  # singular value i: the norm of column i of G = R D^-1 V
        sv = _norm(g[:, i])
        ci = 0.0
        for r in range(p):
            ci += at[p, r] * g[r, i]
        mu[b, i] = sv * sv
        c[b, i] = -ci  # c' = -S U^T f = -G^T (Q^T f)
        smax = max(smax, sv)
        for j in range(p):
            vh[b, i, j] = v[j, i]
    full = True
    for i in range(p):
        keep = mu[b, i] > 0
        if cut > 0 and not math.sqrt(mu[b, i]) > cut * smax:
            keep = False
        wz = 0.0
        for j in range(p):
            if acnorm[j] == 0:
                wz += vh[b, i, j] * vh[b, i, j]
        if not wz <= 0.5:
            keep = False
        if not keep:
            mu[b, i] = math.inf
            c[b, i] = 0.0
            full = False
    gn2 = 0.0
    q0 = 0.0
    cn = 0.0
    for i in range(p):
        gn[b, i] = c[b, i] / mu[b, i]
        gn2 += gn[b, i] * gn[b, i]
        q0 += gn[b, i] * gn[b, i] / mu[b, i]
        cn += c[b, i] * c[b, i]
    gn_norm[b] = math.sqrt(gn2)
    gnorm[b] = math.sqrt(cn)
    lo[b] = gn_norm[b] ** 2 / q0 if full and q0 > 0 else 0.0


@_jit
def _gauss_newton_r(at, p, b, d, radius, gn, c, rt):
    r"""The Gauss-Newton step of fit b from the QR in ``at`` (:func:`_qr`), as MINPACK's
    ``lmpar`` first forms it: :math:`\delta = D^{-1}z`, :math:`Tz = -Q^Tf`,
    :math:`T = RD^{-1}` (back substitution; T into ``rt[b]`` in ``at``'s layout). It is the
    fit's step when T has no zero on its diagonal (J has full rank: a zero column of J gives a
    zero one of R), z is finite, and z fits the trust region as lmpar tests it,
    :math:`\|z\| - \Delta \le 0.1\Delta`. Then z goes into ``gn[b]`` (in the D-scaled
    coordinates themselves, not V's), :math:`c = -T^TQ^Tf` into ``c[b]`` (so that
    :math:`c^Tz = \|Q^Tf\|^2`, the model's decrease :math:`c'^Tw` that :func:`_update` forms,
    in any orthogonal coordinates), Q^T f into row P of ``rt[b]`` (there T and Q^T f are a QR
    buffer for :func:`_factor_svd`, should a rejected step shrink the radius below z:
    :func:`_trial`), and the return is ||z||. Else the return is -1, and the fit goes the SVD
    way, whose pseudo-inverse drops what a rank-deficient T cannot solve. In exact arithmetic
    z is the SVD's :math:`Vc'/\mu`; the two differ at rounding level (the condition number of
    T times the unit roundoff)."""
    zz = 0.0
    for i in range(p - 1, -1, -1):  # T_ir = rt[b, r, i], r >= i (R_ir = at[r, i])
        for r in range(i, p):
            rt[b, r, i] = at[r, i] / d[b, r]
        tii = rt[b, i, i]
        if tii == 0.0:
            return -1.0
        s = -at[p, i]
        for r in range(i + 1, p):
            s -= rt[b, r, i] * gn[b, r]
        gn[b, i] = s / tii
        zz += gn[b, i] * gn[b, i]
    zn = math.sqrt(zz)
    if not (zz > 1e-290 and zz < 1e290):  # the sum of squares out of range: again, scaled
        zn = _norm(gn[b])
    if not math.isfinite(zn) or zn - radius[b] > 0.1 * radius[b]:
        return -1.0
    for i in range(p):
        rt[b, p, i] = at[p, i]
        ci = 0.0
        for r in range(i + 1):
            ci += rt[b, i, r] * at[p, r]
        c[b, i] = -ci
    return zn


@_jit
def _jac_stage(
    k0, k1, jac_new, cols, due, first, f, fnorm, x, d, jac, mu, c, vh, gn, gn_norm, gnorm, lo,
    radius, lam, lref, method, cut, gtu, factor, codes, stale, acn, rt, gq,
):  # fmt: skip
    """At the fits ``due`` (k-th has J = jac_new[k], or, ``cols``, column j of J =
    jac_new[j, k]: a route that forms J column by column hands it over so, uncopied): J at x
    (``stale`` False), its column norms in acn[k], test gtol (codes[k] = 1, or
    -1 for a non-finite J^T f or column norm, or, without D, a largest column norm whose
    square over- or underflows), update D (trust region), factor
    :math:`JD^{-1}` into (mu, c, vh, gn, gn_norm, gnorm, lo) as :func:`.core._factor_r` /
    :func:`.core._factor_svd` do (:func:`_factor_svd`; or, trust region, take the Gauss-Newton
    step from R where the fit's last step was one and it fits: :func:`_gauss_newton_r`,
    ``gq[b]`` set, no SVD); at x0 (``first``) also the radius or lambda. J is
    transposed into ``at`` row by row (element by element: numba's slice assignment
    ``jac[b] = jb`` took its generic broadcasting path), then its column norms and
    :math:`J^T f` by :func:`_dot` over the rows of ``at``. J is stored in ``jac`` only for a
    fit that stops here (codes[k] != 0): storing every J cost ~200 ns a fit (scattered rows
    of a state of 12 MB for 10,000 fits of 50 points, each row written to memory), and 9,889
    of those 10,000 fits stop after an accepted step, with J evaluated again at their x; the
    driver evaluates J at x for every fit that stops after a trial
    (:func:`.compiled._least_squares_compiled`)."""
    if cols:
        p, _, m = jac_new.shape
    else:
        _, m, p = jac_new.shape
    trust = method == 0
    at = np.empty((p + 1, m))
    g = np.empty((p, p))
    v = np.empty((p, p))
    acnorm = np.empty(p)
    jtf = np.empty(p)
    for k in range(k0, k1):
        b = due[k]
        if cols:
            for j in range(p):
                aj = at[j]
                src = jac_new[j, k]
                for i in range(m):
                    aj[i] = src[i]
        else:
            jb = jac_new[k]
            for j in range(p):  # A^T = [J f]^T, row by row (contiguous writes)
                aj = at[j]
                for i in range(m):
                    aj[i] = jb[i, j]
        fb = f[b]
        for i in range(m):
            at[p, i] = fb[i]
        for j in range(p):  # the squared column norms and J^T f
            acnorm[j] = _dot(at[j], at[j])
            jtf[j] = _dot(at[j], at[p])
        bad = False
        stop = True
        stale[b] = False
        for j in range(p):
            sq = acnorm[j]
            acnorm[j] = math.sqrt(sq) if sq > 1e-290 and sq < 1e290 else _norm(at[j])
            acn[k, j] = acnorm[j]
            if not (math.isfinite(acnorm[j]) and math.isfinite(jtf[j])):
                bad = True
            if not abs(jtf[j]) <= gtu * fnorm[b] * acnorm[j]:
                stop = False
        if not trust:  # mu = s^2 of J itself (no D): J's scale must square within range
            big = 0.0
            for j in range(p):
                big = max(big, acnorm[j])
            if big > 0 and not (big * big >= 2.2250738585072014e-308 and big * big < math.inf):
                bad = True
        codes[k] = -1 if bad else (1 if stop else 0)
        if codes[k] != 0:  # the fit stops at this J: stored (one that goes on is stored,
            # if at all, by the driver when it stops: J at its x evaluated again then)
            jc = jac[b]
            for i in range(m):
                for j in range(p):
                    jc[i, j] = at[j, i]
        if trust:
            for j in range(p):
                dj = max(d[b, j], acnorm[j])
                d[b, j] = dj if dj > 0 else 1.0
        if first:
            if trust:
                xn = 0.0
                for j in range(p):
                    xn += (d[b, j] * x[b, j]) ** 2
                xn = math.sqrt(xn)
                radius[b] = factor * xn if xn > 0 else factor
            if method == 1:
                big = 0.0
                for j in range(p):
                    big = max(big, acnorm[j] * acnorm[j])
                lam[b] = 1e-3 * big
                lref[b] = big if big > 0 else 1.0
        if bad:
            continue
        _qr(at, p)
        if trust and lam[b] == 0:
            # the Gauss-Newton step from R where it fits: no SVD (48,076 of the 49,469 trials
            # after a Jacobian on the 10,000 decay curves were Gauss-Newton steps); tried
            # where the fit's last step was one (lambda = 0; a fit whose steps lmpar damps,
            # as the 13 that run to max_nfev, goes straight to the SVD)
            zn = _gauss_newton_r(at, p, b, d, radius, gn, c, rt)
            gq[b] = zn >= 0
            if gq[b]:
                gn_norm[b] = zn
                continue
        _factor_svd(b, at, p, d[b], g, v, acnorm, cut, mu, c, vh, gn, gn_norm, gnorm, lo)


@numba.njit(cache=True, nogil=True, parallel=True)
def _jac_stage_parallel(
    chunks, jac_new, cols, due, first, f, fnorm, x, d, jac, mu, c, vh, gn, gn_norm, gnorm, lo,
    radius, lam, lref, method, cut, gtu, factor, codes, stale, acn, rt, gq,
):  # fmt: skip
    """:func:`_jac_stage` on ``chunks`` slices of the fits, one per thread."""
    n = due.shape[0]
    for t in numba.prange(chunks):
        _jac_stage(
            t * n // chunks, (t + 1) * n // chunks, jac_new, cols, due, first, f, fnorm, x, d, jac,
            mu, c, vh, gn, gn_norm, gnorm, lo, radius, lam, lref, method, cut, gtu, factor, codes,
            stale, acn, rt, gq,
        )  # fmt: skip


@_jit
def _lmpar(mu, c, gn, gn_norm, gnorm, lo, radius, par, w):
    """:func:`.core._lmpar` for one fit: writes w(lambda), returns lambda."""
    p = mu.shape[0]
    dwarf = 2.2250738585072014e-308
    fp = gn_norm - radius
    tenth = 0.1 * radius
    if not fp > tenth:
        w[:] = gn
        return 0.0
    parl = fp / radius * lo
    paru = gnorm / radius
    if not paru > 0:
        paru = dwarf / min(radius, 0.1)
    lam = min(max(par, parl), paru)
    if lam == 0:
        lam = gnorm / max(gn_norm, dwarf)
    prev = fp
    for it in range(10):
        if lam == 0:
            lam = max(1e-3 * paru, dwarf)
        phi2 = 0.0
        q = 0.0
        for i in range(p):
            den = mu[i] + lam
            w[i] = c[i] / den
            phi2 += w[i] * w[i]
            q += w[i] * w[i] / den
        phi = math.sqrt(phi2)
        fp = phi - radius
        if abs(fp) <= tenth or (parl == 0 and fp <= prev and prev < 0) or it == 9:
            break
        parc = fp / radius * phi * phi / max(q, dwarf)
        if fp > 0:
            parl = max(parl, lam)
        if fp < 0:
            paru = min(paru, lam)
        lam = max(parl, lam + parc)
        prev = fp
    return lam


@_jit
def _trial(k0, k1, act, method, x, d, mu, c, vh, gn, gn_norm, gnorm, lo, radius, lam, alpha,
           first, w, pnorm, xt, cut, rt, gq):  # fmt: skip
    """The step of the running fits act[k0:k1] (k-th: row k of xt). A trust-region fit whose
    Gauss-Newton step was formed from R (``gq``: :func:`_gauss_newton_r`) takes it while it
    fits the radius (lambda = 0, w = z, in the D-scaled coordinates); once it does not (a
    rejected step shrank the radius), its SVD is formed from the kept T and Q^T f
    (:func:`_factor_svd` on ``rt[b]``, D = I there) and lmpar runs as for any other fit."""
    p = x.shape[1]
    for k in range(k0, k1):
        b = act[k]
        basis = True  # w in the coordinates of V (else in the D-scaled ones)
        if method == 0:
            if gq[b] and not gn_norm[b] - radius[b] > 0.1 * radius[b]:
                lam[b] = 0.0
                for i in range(p):
                    w[b, i] = gn[b, i]
                basis = False
            else:
                if gq[b]:  # rare (721 of 55,829 trials on the decay curves): scratch here;
                    # J has full rank there (no zero column: ones as its column norms)
                    g, v, ones = np.empty((p, p)), np.empty((p, p)), np.ones(p)
                    _factor_svd(b, rt[b], p, ones, g, v, ones, cut, mu, c, vh, gn, gn_norm,
                                gnorm, lo)  # fmt: skip
                    gq[b] = False
                lam[b] = _lmpar(mu[b], c[b], gn[b], gn_norm[b], gnorm[b], lo[b], radius[b],
                                lam[b], w[b])  # fmt: skip
        elif method == 1:
            for i in range(p):
                w[b, i] = c[b, i] / (mu[b, i] + lam[b])
        else:
            for i in range(p):
                w[b, i] = gn[b, i] * alpha[b]
        pn = 0.0
        for j in range(p):
            if basis:
                qj = 0.0
                for i in range(p):
                    qj += w[b, i] * vh[b, i, j]
            else:
                qj = w[b, j]
            xt[k, j] = x[b, j] + qj / d[b, j]
            pn += qj * qj
        pnorm[b] = math.sqrt(pn)
        if method == 0 and first[b]:
            radius[b] = min(radius[b], pnorm[b])


@numba.njit(cache=True, nogil=True, parallel=True)
def _trial_parallel(
    chunks, act, method, x, d, mu, c, vh, gn, gn_norm, gnorm, lo, radius, lam, alpha, first, w,
    pnorm, xt, cut, rt, gq,
):  # fmt: skip
    """:func:`_trial` on ``chunks`` slices of the running fits, one per thread."""
    n = act.shape[0]
    for t in numba.prange(chunks):
        _trial(
            t * n // chunks, (t + 1) * n // chunks, act, method, x, d, mu, c, vh, gn, gn_norm,
            gnorm, lo, radius, lam, alpha, first, w, pnorm, xt, cut, rt, gq,
        )  # fmt: skip


@_jit
def _update(k0, k1, act, ft, y, method, nfev, max_nfev, ftol, xtol, ftu, xtu, x, f, fnorm,
            floor, d, c, w, pnorm, radius, lam, lref, alpha, nit, first, stale, xt,
            codes):  # fmt: skip
    """After the trial: rho, the method's update, acceptance and the stopping tests of the
    running fits act[k0:k1] (as :func:`.core._least_squares_core`); codes[k] = the status of
    a fit that stops, -9 for one that goes on, -8 for one that goes on and moved (due a
    Jacobian); stale[b] = its step was accepted (J not at x). ft[k]: the residuals at the
    trial point of fit act[k]; or, given data ``y`` (B, M) (not (0, M)), the model's values
    there, whose residuals are :math:`f = ft_k - y_b` (the subtraction torch would do, the
    same rounding; ft itself is not written: it may be the user's tensor)."""
    p = x.shape[1]
    eps = 2.220446049250313e-16
    fold = y.shape[0] > 0
    rbuf = np.empty(ft.shape[1])
    for k in range(k0, k1):
        b = act[k]
        if fold:
            yb = y[b]
            fk = ft[k]
            for i in range(rbuf.shape[0]):
                rbuf[i] = fk[i] - yb[i]
            fk = rbuf
        else:
            fk = ft[k]
        fnorm1 = _norm(fk)
        if not fnorm1 <= math.inf:  # NaN
            fnorm1 = math.inf
        fn = fnorm[b]
        near = 0.1 * fnorm1 < fn
        r1 = fnorm1 / fn
        actred = 1 - r1 * r1 if near else -1.0
        fn2 = fn * fn
        cz = 0.0
        for i in range(p):
            cz += c[b, i] * w[b, i]
        if method == 2:
            prered = (2 - alpha[b]) * cz / fn2
        else:
            prered = (cz + lam[b] * pnorm[b] * pnorm[b]) / fn2
        dirder = -cz / fn2
        ratio = actred / prered if prered != 0 else 0.0
        if method == 0:
            temp = 0.5 * dirder / (dirder + 0.5 * actred)
            if actred >= 0:
                temp = 0.5
            if not near or not temp >= 0.1:
                temp = 0.1
            if temp > 0.5:
                temp = 0.1
            poor = ratio <= 0.25
            good = lam[b] == 0 or ratio >= 0.75
            if poor:
                radius[b] = temp * min(radius[b], pnorm[b] / 0.1)
                lam[b] = lam[b] / temp
            elif good:
                radius[b] = pnorm[b] / 0.5
                lam[b] = 0.5 * lam[b]
            accept = ratio >= 1e-4
        elif method == 1:
            accept = fnorm1 < fn
            la = lam[b] / 3 if ratio > 0.75 else (lam[b] * 3 if ratio < 0.25 else lam[b])
            la = la if la > 0 else eps * lref[b]
            lam[b] = min(la, lref[b] / eps)
        else:
            accept = actred >= -2e-4 * dirder and fnorm1 < fn
            alpha[b] = 1.0 if accept else alpha[b] / 2
        if accept:
            x[b] = xt[k]
            f[b] = fk
            fnorm[b] = fnorm1
            nit[b] += 1
            first[b] = False
        stale[b] = accept
        xn = 0.0
        for j in range(p):
            xn += (d[b, j] * x[b, j]) ** 2
        xnorm = math.sqrt(xn)
        size = radius[b] if method == 0 else pnorm[b]
        ok = 0.5 * ratio <= 1 and prered >= 0
        aa = abs(actred)
        stop = (aa <= ftu and prered <= ftu and ok) or size <= xtu * xnorm
        stop = stop or fnorm[b] <= floor[b]
        if not (stop or nfev >= max_nfev):
            codes[k] = -8 if accept else -9
            continue
        code = 0 if nfev >= max_nfev else -9
        if aa <= eps and prered <= eps and ok:
            code = 2
        if size <= eps * xnorm:
            code = 3
        if fnorm[b] <= floor[b]:
            code = 2
        small_f = aa <= ftol and prered <= ftol and ok
        small_x = size <= xtol * xnorm
        if small_f or small_x:
            code = 4 if small_f and small_x else (2 if small_f else 3)
        codes[k] = code


@numba.njit(cache=True, nogil=True, parallel=True)
def _update_parallel(
    chunks, act, ft, y, method, nfev, max_nfev, ftol, xtol, ftu, xtu, x, f, fnorm, floor, d, c,
    w, pnorm, radius, lam, lref, alpha, nit, first, stale, xt, codes,
):  # fmt: skip
    """:func:`_update` on ``chunks`` slices of the running fits, one per thread."""
    n = act.shape[0]
    for t in numba.prange(chunks):
        _update(
            t * n // chunks, (t + 1) * n // chunks, act, ft, y, method, nfev, max_nfev, ftol, xtol,
            ftu, xtu, x, f, fnorm, floor, d, c, w, pnorm, radius, lam, lref, alpha, nit, first,
            stale,
            xt, codes,
        )  # fmt: skip


@_jit
def _update_stage_trial(
    act, ft, jt, cols, y, method, nfev, max_nfev, ftol, xtol, ftu, xtu, x, f, fnorm, floor, d,
    c, w, pnorm, radius, lam, lref, alpha, nit, first, stale, xt, codes, due, scodes, mu, vh, gn,
    gn_norm, gnorm, lo, jac, cut, gtu, factor, acn, rt, gq, xn,
):  # fmt: skip
    """One iteration of the driver's tail with J evaluated at every trial point, jt (row k:
    J at xt[k], the trial point of fit act[k]; or, ``cols``, column j at jt[j, k]), in one
    call: :func:`_update` on all the running fits (codes: a stopped fit's status, -9 for one
    that goes on), then :func:`_jac_stage` on those that moved and go on (into due[:n_due],
    the stage's codes into scodes[:n_due]) with their rows of jt, then, where none stops at
    the stage, :func:`_trial` on all that go on (in act's order, their points into xn). The
    rows of jt of the fits whose step was rejected, or that stopped, are not read. Returns
    (the number of fits that stop at the update, n_due, the number that stop at the
    stage)."""
    n = act.shape[0]
    _update(
        0, n, act, ft, y, method, nfev, max_nfev, ftol, xtol, ftu, xtu, x, f, fnorm, floor, d,
        c, w, pnorm, radius, lam, lref, alpha, nit, first, stale, xt, codes,
    )  # fmt: skip
    if cols:
        p, _, m = jt.shape
        jd = np.empty((p, n, m))
    else:
        _, m, p = jt.shape
        jd = np.empty((n, m, p))
    keep = np.empty(n, dtype=act.dtype)
    n_keep = 0
    n_due = 0
    for k in range(n):
        if codes[k] == -8:  # moved: J at its new x is jt's row k
            due[n_due] = act[k]
            for j in range(p):  # (element by element: see _jac_stage)
                for i in range(m):
                    if cols:
                        jd[j, n_due, i] = jt[j, k, i]
                    else:
                        jd[n_due, i, j] = jt[k, i, j]
            n_due += 1
            codes[k] = -9
        if codes[k] == -9:
            keep[n_keep] = act[k]
            n_keep += 1
    _jac_stage(
        0, n_due, jd, cols, due, False, f, fnorm, x, d, jac, mu, c, vh, gn, gn_norm, gnorm, lo,
        radius, lam, lref, method, cut, gtu, factor, scodes, stale, acn, rt, gq,
    )  # fmt: skip
    stops = 0
    for k in range(n_due):
        if scodes[k] != 0:
            stops += 1
    if stops == 0:
        _trial(
            0, n_keep, keep[:n_keep], method, x, d, mu, c, vh, gn, gn_norm, gnorm, lo, radius,
            lam, alpha, first, w, pnorm, xn, cut, rt, gq,
        )  # fmt: skip
    return n - n_keep, n_due, stops


@_jit
def _sort_out(act, codes, x, due, xdue):
    """After :func:`_update`: the fits that moved and go on (codes -8) into due[:n_due] and
    their x into xdue[:n_due] (the points of the next Jacobians), those that go on into
    codes -9; returns (the number of fits that stop, n_due)."""
    n_done = 0
    n_due = 0
    for k in range(act.shape[0]):
        if codes[k] == -8:
            b = act[k]
            due[n_due] = b
            xdue[n_due] = x[b]
            n_due += 1
            codes[k] = -9
        elif codes[k] != -9:
            n_done += 1
    return n_done, n_due

r"""Damping rules: the lambda of :math:`M + \lambda I` (Tikhonov damping, 000 section 3.2;
Martens 2020 section 10).

- :class:`Constant`: a fixed lambda.
- :class:`MoreTrustRegion`: Levenberg-Marquardt in trust-region form on the *scaled* step
  (Moré 1978, the algorithm of MINPACK's ``lmder``): the damping is :math:`\lambda D^2`,
  D a running maximum of :math:`\sqrt{\mathrm{diag}(M)}`, and lambda is solved from a radius
  :math:`\|D\delta\| \le \Delta` that adapts to rho; invariant to rescaling a parameter.
- :class:`LevenbergMarquardt`: lambda adapts to the reduction ratio

  .. math:: \rho = \frac{L(\theta+\delta) - L(\theta)}{q(\delta) - q(0)},\qquad
            q(\delta) = L(\theta) + g^T\delta + \tfrac12 \delta^T M\delta

  (q the quadratic model of the *undamped* metric M, whatever the metric: Identity, Hessian,
  the Gauss-Newton/Fisher family): lambda times ``decrease`` when rho > 3/4, times
  ``increase`` when rho < 1/4 (Moré 1978; Martens 2010 section 4.1 uses 2/3 and 3/2; our
  defaults 1/3 and 3 solve more of the NIST StRD problems, benchmarks/nist.md). With
  ``reject=True`` the optimizer undoes a step whose loss went up, raises lambda and solves
  again, at most ``max_tries`` solves per step (each try is reported in ``StepInfo.tries`` and
  ``StepInfo.message``).

A rule holds state (lambda, the radius, D): give each optimizer its own instance; one instance
passed to two optimizers would share (and mix) their lambdas.

A rule's protocol, used by :class:`~steepest.optimizer.Optimizer`: ``damped(op, g, theta)``
(the damped operator of a try: ``op + value`` by default), ``value`` (lambda now),
``update(rho, trial)`` after every try (rho = -inf for a try with no step or a non-finite loss;
``trial`` a :class:`Trial`), ``raise_for_retry()`` when the damped system could not be solved
or gave no descent direction, ``adaptive``, ``reject``, ``max_tries``, ``min_rho`` (a try
whose rho falls below it is rejected and retried; -inf by default), ``state_dict()`` /
``load_state_dict()``.

Example
-------
>>> opt = Optimizer(model, MSE(), metric=GaussNewton(), damping=LevenbergMarquardt(1e-3))
>>> info = opt.step(x, y)
>>> info.rho, info.damping, info.tries      # lambda for the next step: opt.damping.value
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import ConfigurationError, DenseTooLargeError
from .linop import LinearOperator, eigh

#: MoreTrustRegion decomposes M through the SVD of its sample-space factor (R x P) also when
#: R >= P, as long as R P is at most this many entries (32 MiB in float64); above, through the
#: eigen-decomposition of the dense P x P matrix (which squares the conditioning)
FACTOR_SVD_MAX = 2**22


@dataclass(frozen=True)
class Trial:
    r"""What the optimizer saw on one try: the step delta (None when no step was tried),
    :math:`g^T\delta`, :math:`L(\theta)` and :math:`L(\theta+\delta)` (None: not evaluated)."""

    delta: Tensor | None
    gdelta: float
    loss: float
    loss_new: float | None


class Damping:
    """Base class: ``value`` is lambda; ``damped(op, g, theta)`` is M + lambda I for a try;
    ``update(rho, trial)`` after each try of a step."""

    adaptive = False
    reject = False
    max_tries = 1
    min_rho = -math.inf  # a try with rho below this is rejected (and retried)

    @property
    def value(self) -> float:
        raise NotImplementedError

    def damped(self, op: LinearOperator, g: Tensor, theta: Tensor) -> LinearOperator:
        r"""The damped operator of this try, :math:`M + \lambda I` (``op`` is M undamped)."""
        return op.add_diagonal(self.value)

    def update(self, rho: float, trial: Trial | None = None) -> None:
        pass

    def raise_for_retry(self) -> None:
        """Called when a step is rejected or the damped system could not be solved."""

    def parameters_changed(self) -> None:
        """The set of trainable parameters changed: forget state that lives on the old one."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Constant(Damping):
    r"""Fixed Tikhonov damping lambda >= 0.

    >>> Constant(1e-3).value
    0.001
    """

    def __init__(self, lam: float = 0.0) -> None:
        if not (isinstance(lam, int | float) and math.isfinite(lam) and lam >= 0):
            raise ConfigurationError(
                f"damping must be a finite number >= 0, got {lam!r}; use e.g. damping=1e-3."
            )
        self.lam = float(lam)

    @property
    def value(self) -> float:
        return self.lam

    def __repr__(self) -> str:
        return f"Constant({self.lam:g})"

    def state_dict(self) -> dict:
        return {"lam": self.lam}

    def load_state_dict(self, state: dict) -> None:
        self.lam = float(state["lam"])


class LevenbergMarquardt(Damping):
    r"""Levenberg-Marquardt adaptation of lambda from the reduction ratio rho (Moré 1978,
    Martens 2010 section 4.1):

    .. math:: \lambda \leftarrow \begin{cases} \lambda \cdot \mathrm{decrease} & \rho > 3/4
              \\ \lambda \cdot \mathrm{increase} & \rho < 1/4 \text{ or nan}
              \\ \lambda & \text{otherwise}\end{cases}

    clipped to [min, max] relative to M: once lambda would leave [min, max], the bounds of
    the step become :math:`[\mathrm{min}\, s, \mathrm{max}\, s]`, where
    :math:`s = |g^T M g| / g^T g` is the scale of M along the gradient (1 when that is 0 or not
    finite), so that they mean the same for M of any magnitude (a residual 1e10 atan(x) needs
    lambda far above 1e12). s costs one product with M, made only then.

    On a quadratic loss with the exact metric rho = 1 and lambda keeps shrinking (the step
    tends to the Newton step); when the quadratic model overestimates the decrease (strong
    higher-order terms) rho < 1/4 and lambda grows, shortening the step.

    Parameters
    ----------
    init: the first lambda
    decrease: factor (< 1) applied when rho > 3/4
    increase: factor (> 1) applied when rho < 1/4 (or the step failed)
    min, max: bounds of lambda relative to the scale s of M (see above)
    reject: undo a step whose loss went up, raise lambda, retry (up to ``max_tries``)

    >>> lm = LevenbergMarquardt(init=1e-2, decrease=2/3, increase=3/2)
    >>> lm.update(0.9); lm.value        # 1e-2 * 2/3
    0.006666666666666666
    """

    adaptive = True

    def __init__(self, init: float = 1e-3, decrease: float = 1 / 3, increase: float = 3.0,
                 min: float = 1e-20, max: float = 1e12, reject: bool = True,
                 max_tries: int = 20) -> None:
        finite = all(isinstance(v, int | float) and math.isfinite(v)
                     for v in (init, decrease, increase, min, max))
        if not (finite and init > 0 and 0 < decrease < 1 < increase and 0 <= min <= max):
            raise ConfigurationError(
                f"LevenbergMarquardt: need finite init > 0, 0 < decrease < 1 < increase "
                f"and 0 <= min <= max; got init={init}, decrease={decrease}, increase={increase}, "
                f"min={min}, max={max}."
            )
        if not (isinstance(max_tries, int) and max_tries >= 1):
            raise ConfigurationError(f"LevenbergMarquardt: max_tries must be >= 1, got "
                                     f"{max_tries}.")
        self.lam, self.decrease, self.increase = float(init), decrease, increase
        self.min, self.max = min, max
        self.reject, self.max_tries = bool(reject), int(max_tries)
        self._op: tuple | None = None  # weak references to M and g of the current step
        self._scale: float | None = None

    def __repr__(self) -> str:
        return f"LevenbergMarquardt(lam={self.lam:g})"

    def damped(self, op: LinearOperator, g: Tensor, theta: Tensor) -> LinearOperator:
        if self._op is None or self._op[0]() is not op:
            self._op, self._scale = (weakref.ref(op), weakref.ref(g)), None
        return op.add_diagonal(self.value)

    def _bounds(self, lam: float) -> tuple[float, float]:
        """[min s, max s]; s (one product with M) is computed only when lam reaches a bound."""
        if self._scale is None and not (self.min < lam < self.max):
            s = 1.0
            op, g = (None, None) if self._op is None else (self._op[0](), self._op[1]())
            if op is not None and g is not None:
                s = abs(float(g @ op.matvec(g).detach())) / max(float(g @ g), 1e-300)
            self._scale = s if (math.isfinite(s) and s > 0) else 1.0
        s = 1.0 if self._scale is None else self._scale
        return self.min * s, self.max * s

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_op": None, "_scale": None}

    @property
    def value(self) -> float:
        return self.lam

    def update(self, rho: float, trial: Trial | None = None) -> None:
        """Apply the rule to the reduction ratio of the last try (nan counts as failure)."""
        if math.isnan(rho) or rho < 0.25:
            new = self.lam * self.increase
            self.lam = min(new, self._bounds(new)[1])
        elif rho > 0.75:
            new = self.lam * self.decrease
            self.lam = max(new, self._bounds(new)[0])

    def raise_for_retry(self) -> None:
        """lambda times ``increase`` (from at least ``min``, at most ``max``, relative to M)."""
        lo, _ = self._bounds(self.lam)
        new = max(self.lam, lo) * self.increase
        self.lam = min(new, self._bounds(new)[1])

    def state_dict(self) -> dict:
        return {"lam": self.lam}

    def load_state_dict(self, state: dict) -> None:
        self.lam = float(state["lam"])


class MoreTrustRegion(Damping):
    r"""Levenberg-Marquardt as a trust region on the scaled step (Moré 1978; MINPACK
    ``lmder``): each try takes

    .. math:: \delta = -(M + \lambda D^2)^{-1} g,\qquad \lambda \ge 0 \text{ such that }
              \|D\delta\| = \Delta \text{ (or } \lambda = 0 \text{ when }
              \|D M^{-1} g\| \le (1 + \sigma)\Delta),

    the solution of :math:`\min_\delta q(\delta)` subject to :math:`\|D\delta\| \le \Delta`
    (000 problem (1) with the metric :math:`D^2` for the constraint and M for the model).
    :math:`D = \mathrm{diag}(d_j)`, :math:`d_j = \max(d_j^{\text{prev}},
    \sqrt{M_{jj}})` (MINPACK's column norms of J for M = J^T J; 1 where zero), so a parameter in
    units a thousand times larger gets the same steps. The radius starts at
    ``factor`` :math:`\|D\theta_0\|` (``factor`` if that is 0), is cut to
    :math:`\min(\Delta, \|D\delta\|)` on every try until the first step is accepted, and
    then adapts to rho: when rho <= 1/4, :math:`\Delta \leftarrow \mu \min(\Delta,
    10\|D\delta\|)` with mu from the quadratic interpolation of the loss along the step,
    :math:`\mu = -g^T\delta / (2(L(\theta+\delta) - L(\theta) - g^T\delta))` (1/2 when the
    loss went down), clipped to [1/10, 1/2], and 1/10 when
    :math:`L(\theta+\delta) \ge 100 L(\theta)` (MINPACK's test that the residual norm grew
    tenfold; for a loss that is not a sum of squares a heuristic); when rho >= 3/4 or lambda = 0,
    :math:`\Delta \leftarrow 2\|D\delta\|`. A try is accepted when rho >= ``min_rho``
    (MINPACK: 1e-4) and the loss did not go up; otherwise it is rejected and retried with the
    smaller radius.

    lambda is MINPACK's (``lmpar``, Moré 1978 section 5): in the eigen-coordinates of the scaled
    metric :math:`D^{-1} M D^{-1}`, :math:`\|D\delta(\lambda)\|^2 = \sum_i c_i^2 /
    (\mu_i + \lambda)^2`; lambda = 0 when the Gauss-Newton step fits,
    :math:`\|D\delta(0)\| \le (1 + \sigma)\Delta`, else Newton on :math:`1/\|D\delta\| -
    1/\Delta` from the previous try's lambda (carried as MINPACK's ``par``: divided by mu when
    the radius shrinks, halved when it doubles) inside MINPACK's bracket, until
    :math:`|\|D\delta\| - \Delta| \le \sigma\Delta` or 10 iterations. With the default
    ``sigma = 0.1`` the tries are lmder's: on the NIST StRD problems and the Moré-Garbow-Hillstrom
    set the model path evaluates the residuals at lmder's points, up to rounding
    (tests/test_evaluations.py, benchmarks/fit.md).

    The spectrum comes from the SVD of the factor :math:`U D^{-1}` when M has a sample-space
    factor (``GaussNewton()``, ``GGN()``, ``Fisher()``) with fewer rows than parameters or at
    most :data:`FACTOR_SVD_MAX` entries, else from the eigen-decomposition of the dense M. On
    the SVD route the damped operator carries its own inverse from that SVD, which the default
    solver (``Auto``) uses: the step then has the accuracy of MINPACK's QR of :math:`J D^{-1}`
    (the conditioning of J, where a Cholesky of :math:`M + \lambda D^2` squares it; Powell's
    singular function converges only this way). This costs one decomposition per step: the
    rule is for problems where M or its factor fits in memory (nonlinear least squares, small
    models; benchmarks/nist.md). When M is singular (a factor with fewer rows than parameters,
    singular values below :math:`\epsilon \max(R, P)\, s_{max}`, or :math:`\mu_{min} \le
    0`) lambda is never 0 but at least :math:`100\,P\,\epsilon\,\mu_{max}`, so the damped
    matrix stays numerically positive definite (MINPACK's ``lmpar`` takes a least-squares step
    there instead; a try at that floor counts as lambda = 0 for the radius update, as in
    MINPACK). For an indefinite M (Hessian) lambda stays above :math:`-\mu_{min}` by at least
    that margin (the hard case of Moré and Sorensen is not treated further).

    Parameters
    ----------
    factor: the initial radius is ``factor`` ||D theta_0|| (MINPACK's default 100)
    sigma: relative accuracy of ||D delta|| = Delta (MINPACK's 0.1, the default; smaller
        values solve the trust-region problem more exactly, but leave MINPACK's tries)
    min_rho: the least reduction ratio of an accepted step (MINPACK's 1e-4)
    radius_min: the radius never falls below this
    max_tries: solves per optimizer step (rejected steps are retried)

    >>> opt = Optimizer(model, MSE(), metric=GaussNewton(), damping=MoreTrustRegion(),
    ...                 gtol=1e-8)              # MINPACK lmder with scipy's tolerances
    >>> info = opt.step(x, y); opt.damping.radius, info.damping     # Delta, lambda
    """

    adaptive = True
    reject = True

    def __init__(self, factor: float = 100.0, sigma: float = 0.1, min_rho: float = 1e-4,
                 radius_min: float = 1e-300, max_tries: int = 30) -> None:
        for name, val in (("factor", factor), ("sigma", sigma), ("radius_min", radius_min)):
            if not (isinstance(val, int | float) and math.isfinite(val) and val > 0):
                raise ConfigurationError(
                    f"MoreTrustRegion: {name} must be a finite number > 0, got {val!r}.")
        if not sigma < 1:
            raise ConfigurationError(f"MoreTrustRegion: sigma must be < 1, got {sigma}.")
        if not (isinstance(min_rho, int | float) and 0 <= min_rho < 0.25):
            raise ConfigurationError(
                f"MoreTrustRegion: min_rho must lie in [0, 1/4), got {min_rho!r}.")
        if not (isinstance(max_tries, int) and max_tries >= 1):
            raise ConfigurationError(
                f"MoreTrustRegion: max_tries must be an integer >= 1, got {max_tries!r}.")
        self.factor, self.sigma, self.radius_min = float(factor), float(sigma), radius_min
        self.min_rho = float(min_rho)
        self.max_tries = max_tries
        self.radius: float | None = None  # Delta; None until the first step
        self.lam = 0.0
        self.scale: Tensor | None = None  # D
        self._first = True  # the first try adjusts Delta to min(Delta, ||D delta||)
        self._spectrum: tuple | None = None  # (refs to op and g, D, mu, c, ...) of this step
        # V^T of the factor's SVD (kept rows, and all rows where a complement exists)
        self._basis: tuple | None = None
        self._floor = False  # lambda is the singular margin standing for MINPACK's 0
        self._tiny = False  # this step's factor is numerically rank deficient
        self._lift = False

    def __repr__(self) -> str:
        return f"MoreTrustRegion(radius={self.radius}, lam={self.lam:g})"

    @property
    def value(self) -> float:
        return self.lam

    # ------------------------------------------------------------------ lambda from Delta
    @staticmethod
    def _uses_factor(op: LinearOperator) -> bool:
        """Whether lambda comes from the SVD of M's sample-space factor (fewer rows than
        parameters, or at most :data:`FACTOR_SVD_MAX` entries) rather than the
        eigen-decomposition of the dense M."""
        rows = op.factor_rows if op.has_factor() else None
        return rows is not None and (rows < op.size or rows * op.size <= FACTOR_SVD_MAX)

    def form(self, op: LinearOperator) -> Tensor:
        """The matrix this rule decomposes for M = ``op``: its sample-space factor U (on the
        SVD route, see the class) or the dense M; cached on ``op``, so that whoever reads
        diag(M) first (the optimizer's gtol cosine) costs nothing more.

        >>> rule.form(op)                  # then op.diagonal() reads it
        """
        if self._uses_factor(op):
            return op.factor().U
        try:
            return op.to_dense()
        except DenseTooLargeError as err:
            raise DenseTooLargeError(
                f"MoreTrustRegion solves lambda from the eigendecomposition of the dense "
                f"{op.size} x {op.size} scaled metric, whatever the solver, and {op.size} "
                "parameters exceed the dense limit (steepest.linop.DENSE_LIMIT). Use "
                "damping=LevenbergMarquardt() (lambda I: no decomposition, works with "
                "solver=CG()), or a metric with a sample-space factor (GaussNewton(), GGN(), "
                "Fisher()) on a curvature batch with fewer rows than parameters "
                "(curvature_batch_size), or raise the limit with "
                "steepest.linop.set_dense_limit(n) if the matrix fits in memory."
            ) from err

    def _scaled_spectrum(self, op: LinearOperator, g: Tensor) -> tuple:
        """(D, mu, c, c_perp2, singular) for this step's M and g, computed once per step."""
        cached = self._spectrum
        if cached is not None and cached[0]() is op and cached[1]() is g:
            return cached[2:]
        factor = self._uses_factor(op)
        if factor:
            f = op.factor()
            diag = f.U.pow(2).sum(0) / f.n
        else:
            m = self.form(op)
            diag = m.diagonal()
        d = diag.clamp_min(0).sqrt()
        d = torch.where(d > 0, d, torch.ones_like(d))
        if self.scale is not None:
            d = torch.maximum(self.scale.to(d), d)
        gs = g / d
        vh_all = live = None
        n_live = op.size
        if factor:
            us = f.U / d / math.sqrt(f.n)
            # a column of J that is exactly zero (a parameter the residuals do not see here) is
            # MINPACK's zero R_kk: no step along it. In an SVD of the whole factor it would get
            # a singular value ~1e-17 s_max, not 0, and the c_i / (mu_i + lambda) of its
            # rounding-noise c_i would spend the trust radius on a direction J does not see
            dead = (f.U == 0).all(0)
            if bool(dead.any()):
                live = ~dead
                n_live = int(live.sum())
                _, sv, vh_live = torch.linalg.svd(us[:, live], full_matrices=False)
                vh = us.new_zeros(vh_live.shape[0], op.size)
                vh[:, live] = vh_live
            else:
                _, sv, vh = torch.linalg.svd(us, full_matrices=False)
            mu = sv.pow(2)
            c = vh @ gs
            # g on a zero column: exactly 0 when g and the factor come from the same rows
            # (MINPACK: no step there, a pseudo-inverse); not when M is built on a curvature
            # sub-batch that does not see the parameter: there (M + lambda D^2)^-1 is exact,
            # 1/lambda on those coordinates, and they count in g outside the row space
            seen = live is not None and bool((gs[~live] != 0).any())
            if seen:
                live = None  # the complement term covers the zero columns too
            # g outside the row space of the factor (when it has fewer rows than the parameters
            # it sees, or g lives on zero columns)
            fewer = mu.numel() < n_live or seen
            c_perp2 = max(float(gs @ gs - c @ c), 0.0) if fewer else 0.0
            vh_all = vh if fewer else None
        else:
            mu, q = eigh(m / d[:, None] / d[None, :], f"the scaled {op.name}")
            c = q.T @ gs
            c_perp2 = 0.0
            vh = None
        # singular: fewer singular values than parameters, or an eigenvalue at or below 0. A tiny
        # positive one is kept: a nearly flat direction with a tiny gradient still has a
        # well-defined Gauss-Newton step c_i / mu_i (MINPACK treats only exact zeros as singular)
        singular = (vh_all is not None or mu.numel() < n_live) or (
            mu.numel() > 0 and float(mu.min()) <= 0)
        # numerically rank deficient (numpy's rank test on the singular values), or zero
        # columns: lambda is still MINPACK's (on the live columns), but kept at least at the
        # margin below, so that M + lambda D^2 stays positive definite for any other solver
        eps = torch.finfo(mu.dtype).eps
        self._tiny = vh is not None and not singular and (
            live is not None
            or float(mu.min()) <= (eps * max(f.U.shape)) ** 2 * float(mu.max()))
        self._lift = False  # lambda lifted to the margin after a failed factorisation
        # weak references: the step's operator (and its graph) is not kept alive after it
        self._spectrum = (weakref.ref(op), weakref.ref(g), d, mu, c, c_perp2, singular)
        self._basis = (vh, vh_all, live)
        return self._spectrum[2:]

    @staticmethod
    def _norm(mu: Tensor, c: Tensor, c_perp2: float, lam: float) -> tuple[float, float]:
        """||D delta(lambda)|| and its derivative in lambda."""
        den = mu + lam
        if bool((den <= 0).any()) or (c_perp2 > 0 and lam <= 0):
            return math.inf, -math.inf
        q2 = float((c / den).pow(2).sum()) + (c_perp2 / lam**2 if c_perp2 else 0.0)
        dq2 = -2 * float((c.pow(2) / den.pow(3)).sum()) - (2 * c_perp2 / lam**3 if c_perp2
                                                           else 0.0)
        phi = math.sqrt(q2)
        return phi, dq2 / (2 * phi) if phi > 0 else 0.0

    def _solve_lambda(self, mu: Tensor, c: Tensor, c_perp2: float, radius: float,
                      singular: bool = False) -> float:
        """The lambda of the class docstring for the scaled spectrum (mu, c): MINPACK's
        ``lmpar`` (:meth:`_lmpar`) when M is positive definite, else the safeguarded Newton
        iteration kept above the singular or indefinite margin."""
        self._floor = False
        eps = torch.finfo(mu.dtype).eps
        mu_min = float(mu.min()) if mu.numel() else 0.0
        mu_max = float(mu.abs().max()) if mu.numel() else 1.0
        # the least lambda that keeps Cholesky of M + lambda D^2 stable in this precision
        margin = 100 * mu.numel() * eps * max(abs(mu_min), mu_max, eps)
        if not singular and c_perp2 == 0.0 and mu.numel():
            lam = self._lmpar(mu, c, radius, self.lam)
            if self._tiny and lam < margin and (lam == 0 or self._lift):
                # MINPACK's lambda 0 on a numerically rank-deficient M, or a tiny lambda that a
                # solver could not factorise (raise_for_retry): the margin, counted as 0 by
                # update() when it stands for 0
                self._floor = lam == 0
                return margin
            if math.isfinite(lam):
                return lam
        if mu_min < 0:
            lo = -mu_min + margin  # M + lambda D^2 positive definite
        elif singular:
            lo = margin  # never lambda = 0 on a singular M
        else:
            lo = 0.0
        phi_lo, _ = self._norm(mu, c, c_perp2, lo)
        if phi_lo <= (1 + self.sigma) * radius:
            # the (near-)undamped step fits in the region; on a singular PSD M this is
            # MINPACK's lambda = 0 (its least-squares step), kept at the margin for the solve
            self._floor = mu_min >= 0
            return lo
        gnorm = math.sqrt(float(c @ c) + c_perp2)
        hi = lo + gnorm / radius  # ||D delta(hi)|| <= radius
        lam = hi
        for _ in range(100):
            phi, dphi = self._norm(mu, c, c_perp2, lam)
            if abs(phi - radius) <= self.sigma * radius:
                return lam
            if phi > radius:
                lo = lam
            else:
                hi = lam
            # Newton on 1/phi - 1/radius (Moré-Sorensen), safeguarded by the bracket
            new = lam - (phi - radius) / radius * phi / dphi if dphi < 0 else math.nan
            if not (lo < new < hi):
                new = math.sqrt(lo * hi) if lo > 0 else lo + 1e-3 * (hi - lo)
            if new == lam:
                break
            lam = new
        return lam

    def _lmpar(self, mu: Tensor, c: Tensor, radius: float, par: float) -> float:
        r"""MINPACK's ``lmpar`` (Moré 1978, section 5) in the eigen-coordinates of the
        positive definite scaled metric: :math:`\|D\delta(\lambda)\| = \|w(\lambda)\|`,
        :math:`w_i = c_i / (\mu_i + \lambda)`. lambda = 0 when the Gauss-Newton step fits,
        :math:`\|w(0)\| \le (1 + \sigma)\Delta`; else Newton on the concave
        :math:`1/\|w(\lambda)\| - 1/\Delta` from ``par`` (the previous try's lambda, raised
        or lowered with the radius by :meth:`update`, as MINPACK carries ``par`` from try to
        try) clipped to the bracket [l, u], :math:`l = (\|w(0)\| - \Delta)/\Delta \cdot
        \|w(0)\|^2 / \sum_i w_i(0)^2/\mu_i`, :math:`u = \|c\|/\Delta`, the bracket narrowed
        on every iterate, until :math:`|\|w\| - \Delta| \le \sigma\Delta` or 10 iterations
        (the 10th lambda kept, as MINPACK does). With ``sigma = 0.1`` and the same D, radius and
        par this is lmder's lambda, so the tries are MINPACK's (up to rounding)."""
        dwarf = torch.finfo(mu.dtype).tiny
        w0 = c / mu
        gn_norm = float(w0.norm())
        fp = gn_norm - radius
        if fp <= self.sigma * radius:
            return 0.0
        parl = fp / radius * gn_norm**2 / float((w0 * w0 / mu).sum())
        gnorm = float(c.norm())
        paru = gnorm / radius
        if paru == 0:
            paru = dwarf / min(radius, 0.1)
        lam = min(max(par, parl), paru)
        if lam == 0:
            lam = gnorm / gn_norm
        prev = fp
        for it in range(10):
            if lam == 0:
                lam = max(dwarf, 1e-3 * paru)
            den = mu + lam
            wl = c / den
            phi = float(wl.norm())
            fp = phi - radius
            if abs(fp) <= self.sigma * radius or (parl == 0 and fp <= prev < 0) or it == 9:
                break
            q = float((wl * wl / den).sum())
            parc = fp / radius * phi * phi / max(q, dwarf)
            if fp > 0:
                parl = max(parl, lam)
            elif fp < 0:
                paru = min(paru, lam)
            lam = max(parl, lam + parc)
            prev = fp
        return lam

    def damped(self, op: LinearOperator, g: Tensor, theta: Tensor) -> LinearOperator:
        r""":math:`M + \lambda D^2` with lambda solved from the radius (see the class)."""
        d, mu, c, c_perp2, singular = self._scaled_spectrum(op, g)
        if self.radius is None:
            size = float((d * theta.detach().to(d)).norm())
            self.radius = self.factor * size if size > 0 else self.factor
        self.lam = self._solve_lambda(mu, c, c_perp2, self.radius, singular)
        self.scale = d.detach().clone()  # D only grows (MINPACK mode 1)
        damped = op.add_diagonal(self.lam * d.pow(2))
        vh, vh_all, live = self._basis if self._basis is not None else (None, None, None)
        if vh is None or op.is_damped() or (self.lam <= 0 and vh_all is not None):
            return damped
        return damped.with_inverse(self._svd_inverse(d, mu, vh, self.lam, vh_all, live))

    @staticmethod
    def _svd_inverse(d: Tensor, mu: Tensor, vh: Tensor, lam: float,
                     vh_all: Tensor | None = None, live: Tensor | None = None):
        r"""The inverse of :math:`M + \lambda D^2` from the SVD of the scaled factor,
        :math:`U D^{-1}/\sqrt n = W S V^T`, :math:`\mu = s^2`:

        .. math:: (M + \lambda D^2)^{-1} b = D^{-1}\big(V (\mathrm{diag}(\mu) +
                  \lambda)^{-1} V^T + \lambda^{-1}(I - V V^T)\big) D^{-1} b

        (the last term only when the factor has fewer rows than the parameters it sees,
        ``vh_all``). Parameters whose column of the factor is exactly zero (``live`` False:
        MINPACK's zero R_kk) get no component: a pseudo-inverse there, as MINPACK's step has
        none along a zero column of J. The step then has the
        accuracy of MINPACK's QR of :math:`J D^{-1}`: the conditioning of J, not of
        :math:`J^T J` (a Cholesky of the damped M squares it)."""
        inv = 1.0 / (mu + lam)

        def inverse(b: Tensor, shift: float | Tensor) -> Tensor:
            y = b / d
            w = vh @ y
            x = vh.T @ (inv * w)
            if vh_all is not None:
                rest = y - vh_all.T @ (vh_all @ y)
                x = x + (rest if live is None else rest * live) / lam
            return x / d

        return inverse

    # ------------------------------------------------------------------ the radius
    def update(self, rho: float, trial: Trial | None = None) -> None:
        """Moré's radius update from rho and the step (see the class docstring)."""
        if self.scale is None or self.radius is None:
            return
        d = self.scale  # D of this step, set by damped()
        delta = None if trial is None else trial.delta
        pnorm = float((d * delta).norm()) if delta is not None else self.radius
        if self._first and delta is not None:
            self.radius = min(self.radius, pnorm)
        if math.isnan(rho) or rho <= 0.25:
            mu = 0.5
            if trial is not None and trial.loss_new is not None:
                up = trial.loss_new - trial.loss
                if not math.isfinite(trial.loss_new) or (trial.loss > 0 and
                                                        trial.loss_new >= 100 * trial.loss):
                    mu = 0.1
                elif up > 0:
                    curv = up - trial.gdelta
                    mu = -trial.gdelta / (2 * curv) if curv > 0 else 0.1
            mu = min(max(mu, 0.1), 0.5)
            self.radius = max(mu * min(self.radius, pnorm / 0.1), self.radius_min)
            # the next try's lmpar starts here (MINPACK: par / temp; 0 after a lambda = 0 step)
            self.lam = 0.0 if self._floor else self.lam / mu
        elif self.lam == 0 or self._floor or rho >= 0.75:
            self.radius = max(2 * pnorm, self.radius_min)
            self.lam = 0.0 if self._floor else 0.5 * self.lam
        if delta is not None and math.isfinite(rho) and rho >= max(self.min_rho, 0.0):
            self._first = False  # the first step is accepted

    def raise_for_retry(self) -> None:
        """The damped system could not be solved (lambda = 0 on a singular M): shrink Delta;
        on a numerically rank-deficient factor first retry at the same radius with lambda
        lifted to the margin (a solver other than the rule's own inverse, e.g. Cholesky, failed
        on MINPACK's tiny lambda; no evaluation is lost)."""
        if self._tiny and not self._lift:
            self._lift = True
            return
        if self.radius is not None:
            self.radius = max(0.25 * self.radius, self.radius_min)

    def parameters_changed(self) -> None:
        """A new parameter set: D, the radius and the first-step rule start afresh."""
        self.radius, self.scale, self._first, self._spectrum = None, None, True, None
        self._basis = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_spectrum"] = state["_basis"] = None  # per-step caches
        return state

    def state_dict(self) -> dict:
        return {"radius": self.radius, "lam": self.lam, "first": self._first,
                "scale": None if self.scale is None else self.scale.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.radius, self.lam, self._first = state["radius"], float(state["lam"]), state["first"]
        self.scale = None if state["scale"] is None else state["scale"].clone()
        self._spectrum = self._basis = None


def as_damping(damping: Damping | float) -> Damping:
    """A damping rule from an instance or a float (constant lambda)."""
    if isinstance(damping, Damping):
        return damping
    if isinstance(damping, int | float) and not isinstance(damping, bool):
        return Constant(float(damping))
    raise ConfigurationError(
        f"damping must be a float lambda >= 0 or a steepest.damping rule (Constant, "
        f"LevenbergMarquardt, MoreTrustRegion), got {damping!r}."
    )

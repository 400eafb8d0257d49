r"""Problems without a model: :func:`least_squares`, :func:`curve_fit` and :func:`minimize`,
shaped like ``scipy.optimize``, written in torch, and batched.

A scipy user fits a formula to data or minimises a function of a few parameters; here the
function is written in torch, its derivatives come from autograd (``torch.func``), and a batch
of B independent problems runs at once, each with its own trust region and stopping rule.

The least-squares step is the sentence of the library (000 problem (1)) with the Gauss-Newton
metric :math:`M = J^T J` of the residual vector f (000 Table 1):

.. math:: \delta = -(J^T J + \lambda D^2)^{-1} J^T f,

where the method decides lambda and the scaling D:

- ``"trust-region"`` (default; ``"lm"`` is an alias, as in scipy): Moré's scaled trust region,
  the algorithm of MINPACK's ``lmder`` (Moré 1978) that ``scipy.optimize.least_squares(
  method="lm")`` wraps, and that :class:`~steepest.damping.MoreTrustRegion` runs on models:
  :math:`D = \mathrm{diag}(\max_k \|J_{:,j}\|)`, lambda solved from :math:`\|D\delta\| = \Delta`
  to 10 % from the previous step's lambda as MINPACK's ``lmpar`` does (halved after a very
  good step, divided by the radius' shrink factor after a poor one), Delta adapted to the
  reduction ratio rho. Up to rounding, the path and the evaluations are MINPACK's.
- ``"levenberg-marquardt"``: plain LM, D = I and lambda times 1/3 when rho > 3/4, times 3 when
  rho < 1/4 (the defaults of :class:`~steepest.damping.LevenbergMarquardt`), a try accepted when
  the cost went down; lambda starts at :math:`10^{-3}\max_j \|J_{:,j}\|^2`, is capped at
  :math:`1/\epsilon` times :math:`\max_j \|J_{:,j}\|^2` at x0 and restarts from
  :math:`\epsilon` times it should it reach 0 (relative: the absolute cap :math:`1/\epsilon` it
  had left LM undamped once J's columns passed ~1e9, ~1e5 in float32; such float32 fits now
  take other steps).
- ``"gauss-newton"``: lambda = 0 (the least-norm step when J is rank deficient) with a
  backtracking (Armijo) line search on the step length.

Every solve uses the thin SVD of :math:`J D^{-1}` of each problem (one batched
``torch.linalg.svd`` per accepted step; while at least 64 fits of a batch are running, with
M >= P and P <= 16, the SVD of the P x P factor R of the Householder QR of :math:`[J\ f]`
instead, cheaper and as accurate: J's column norms and :math:`J^T f` come from R too, and
:math:`R D^{-1}` is still triangular; R's SVD by LAPACK or, for at least 512 fits, by one-sided
Jacobi rotations in batched torch, which also gives the small singular values to full relative
accuracy), so lambda costs no further factorisation and a rank-deficient J is handled exactly:
the damped methods drop only zero singular values and the directions of exactly zero columns
of J (as MINPACK drops only exact zeros of R), Gauss-Newton's least-norm step also those below
:math:`\epsilon \max(M, P)\, s_{max}`. Fits of a batch that have stopped leave the working
set: ``fun`` is then called on the rows still running (with ``vectorize=True`` and in
:func:`curve_fit`), or on the whole batch with the stopped rows held at x0. :func:`curve_fit`
on a batch calls an elementwise formula once on the parameter columns and, when the formula
is pointwise (residual i depends on the parameters through point i only; checked by a probe
near p0 and again at popt on up to 4 solved fits: a formula coupling the points only far
from both on other fits is not caught), takes J by one backward pass through the parameters
spread to one copy per point, on one curve as on a batch. A ``jac=`` given to either front end
is checked at x0 against a central difference of ``fun`` along a random direction (two
evaluations, not counted in nfev; a SteepestWarning names the columns that disagree).

Two engines run this algorithm (``engine=`` of :func:`least_squares` and :func:`curve_fit`):
the torch core (:mod:`.core`: every step a few hundred batched torch operations, on any device
and dtype) and the compiled core (:mod:`.compiled`, with its numba kernels in :mod:`.kernels`:
the same algebra fit by fit in one compiled call per stage, the factorisations shared among
numba's threads; float64 on the CPU without bounds, M >= P, P <= 16; ``pip install
'steepest[fast]'``). The two agree to rounding: on 10,000 decay curves nfev and njev are equal
for every fit and the costs to 4e-11 (the status differs on 0.7 %, a near tie of the ftol and
xtol tests); on NIST StRD's 54 starts nfev and status are equal on 48, the other 6 end at the
same cost to 10 digits, 0-16 evaluations apart or with another status on a near tie (both at
LRE >= 6 on all 54). The
torch core's operations cost a few microseconds each however few fits they carry, so the
compiled one pays most where few fits run long: the last fits of a batch (the 13 curves of
``benchmarks/fit_speed.py`` that run to max_nfev: 0.26-0.28 ms an iteration against
1.42-1.71 ms with a given ``jac``, evaluations included) and a single fit; 10,000 curves take
0.24-0.36 s against 0.82-1.10 s on one thread (``benchmarks/fit.md``).
``engine="auto"`` takes it for batches of at least 256 fits (its first use in a process loads
the kernels, ~1 s; the first on a machine compiles them, ~20-35 s).

Bounds :math:`l \le x \le u` (``bounds=(lb, ub)``, any method, :mod:`.bounds`): at every
Jacobian the parameters on a bound whose gradient :math:`J^Tf` points out of the box are held
(their columns left out of the factorisation, as exactly zero columns are), the method's step
is taken in the others and the trial point projected on the box; the step is judged by the
Gauss-Newton model's reduction :math:`-2g^T\delta' - \|J\delta'\|^2` for the projected step
:math:`\delta'` (a projected Levenberg-Marquardt method with an active set). Every evaluation
of ``fun`` lies in the box; the result adds scipy's ``active_mask``.

Robust losses (``loss=``, ``f_scale=``, :mod:`.loss`): scipy's ``soft_l1``, ``huber``,
``cauchy`` and ``arctan``, :math:`F = \tfrac12 \sum_i C^2\rho(f_i^2/C^2)`, with any method,
engine and bounds (scipy: trf and dogbox only): the fit runs on residuals :math:`\hat f` with
:math:`\tfrac12\|\hat f\|^2 = F` exactly and :math:`\hat J^T \hat f = \nabla F`, so every
rule above applies to F; the minima are scipy's trf's (``tests/test_fit.py``).

Scale. Every step and test of the three methods is invariant to the scale of f and J together,
and the trust region's D also to the units of the parameters; in floating point the squares
(:math:`\|f\|^2`, :math:`c^Tw`, J's column norms) would overflow beyond ~1e154 and underflow
below ~1e-154. MINPACK avoids them by its scaled norms (``enorm``: scipy's ``lm`` takes the
same steps from 1e-300 to 1e300); here a problem whose largest residual at x0 lies outside
:math:`[2^{-129}, 2^{128})` runs on f and J divided by a power of two (exact: the same steps,
bit for bit, as at :math:`\|f\| \approx 1`; ``fun`` and ``jac`` of the result are in the
user's units), J's column norms are computed the same way, and :func:`curve_fit`'s pcov from
the scaled f and J (with ``absolute_sigma=True``, from J in the user's units, where
:math:`s^2` is not formed; scipy's pcov is inf or NaN beyond ~1e155). Without D, LM and
Gauss-Newton form :math:`s^2` of J itself: where the square of J's largest column norm over- or
underflows (parameters in units ~1e±160 and beyond) they stop with status -1 and a message
naming ``"trust-region"`` (they reported x0, or a point ~1e-5 off, as converged before).
``cost`` and ``grad`` of the result are in the user's units: beyond ~1e154 they are inf, the
true values being out of range.

Stopping rules, with MINPACK's meanings (and scipy's status codes):

- ``ftol`` (status 2): both the actual and the predicted relative reductions of the sum of
  squares are at most ftol (and rho <= 2); also when the residual norm has fallen to rounding
  level, :math:`\|f\| \le \epsilon\|f(x_0)\|` (a zero-residual problem, even with x* = 0, where
  a relative xtol never fires);
- ``xtol`` (status 3; 4 with ftol): the trust radius (the step norm for the other methods) is at
  most :math:`x_{tol}\|Dx\|`;
- ``gtol`` (status 1): the largest cosine between f and a column of J,
  :math:`\max_j |(J^T f)_j| / (\|f\| \|J_{:,j}\|)`, is at most gtol (exactly 0 at a zero
  residual);
- ``max_nfev`` (status 0): the evaluations of ``fun`` reached the limit (300 P by default).

:func:`least_squares`' defaults (ftol = 1e-14, xtol = gtol = 1e-8, max_nfev = 300 P) are
tighter than scipy's (1e-8 and 100 P) so that a default fit gives the digits a user expects
(NIST StRD: 54 of 54 problem-starts to 6 digits, against 35 with scipy's values);
:func:`curve_fit` keeps scipy's ``curve_fit`` defaults.

Tolerances below the machine epsilon are met at machine precision (MINPACK's info 6-8, folded
into the status above). Example::

    >>> def fun(x):                               # Rosenbrock's residuals
    ...     return torch.stack([10 * (x[1] - x[0] ** 2), 1 - x[0]])
    >>> res = steepest.least_squares(fun, torch.tensor([-1.2, 1.0], dtype=torch.float64))
    >>> res.x, res.cost, res.status, res.nfev
"""

# the package: bounds (their checks, projection, active mask) <- result (OptimizeResult,
# messages); bounds <- checks (before a fit: x0, fun's output, unseen parameters, a given jac);
# bounds, checks <- core (the batched MINPACK loop in torch); kernels (numba only) <- compiled
# (the same loop, its algebra compiled; checks); loss (robust losses, torch only); core,
# compiled, loss <- lsq (least_squares) <- curve (curve_fit); newton (minimize) uses result,
# checks and core only
from .core import _factor as _factor
from .core import _lmpar as _lmpar
from .curve import curve_fit
from .lsq import ALIASES as ALIASES
from .lsq import METHODS as METHODS
from .lsq import least_squares
from .newton import MINIMIZE_MESSAGES as MINIMIZE_MESSAGES
from .newton import MINIMIZE_METHODS as MINIMIZE_METHODS
from .newton import minimize
from .result import MESSAGES as MESSAGES
from .result import OptimizeResult

__all__ = ["OptimizeResult", "least_squares", "curve_fit", "minimize"]
